//! `tapstream daemon`: the daemon's process: control listeners, signals, the recovery thread,
//! the periodic save of progress, and an orderly stop.

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use crate::{
    cli::serve_metrics,
    config::Config,
    control::{daemon::Daemon, server},
    fleet::redis::RedisFleet,
    store::settings::hostname,
};
use anyhow::Context as _;

pub fn daemon(file: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    if let Some(addr) = &config.daemon.metrics_listen {
        serve_metrics(addr.parse()?)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tapstream-control")
        .enable_all()
        .build()?;
    let (unix, tcp) = runtime.block_on(async {
        let unix = server::bind_unix(
            &config.daemon.socket,
            config.socket_mode(),
            config.daemon.socket_group.as_deref(),
        )?;
        let tcp = match (&config.daemon.tcp_listen, &config.daemon.token_file) {
            (Some(addr), Some(token_file)) => {
                let token = server::read_token(token_file)?;
                let listener =
                    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listen on {addr}"))?;
                Some((listener, token))
            }
            _ => None,
        };
        anyhow::Ok((unix, tcp))
    })?;
    let socket = config.daemon.socket.clone();
    // What earlier runs left in the spool goes up now, not only when a capture next starts.
    let (store, node) = (config.store.clone(), config.daemon.node.clone().unwrap_or_else(hostname));
    let daemon = Arc::new(Daemon::start(config)?);
    // First the captures a dead daemon left running (their open uploads completed, their
    // spools uploaded under their names and recorded in their state), then the other spools;
    // captures whose store is unreachable are tried again every 30 s.
    let recovering = daemon.clone();
    std::thread::Builder::new()
        .name("tapstream-recover".into())
        .spawn(move || {
            let mut pending = recovering.recover_interrupted();
            for (url, result) in store.recover_spools(&node) {
                if let Err(e) = result {
                    log::warn!("what earlier runs spooled for {url} stays in the spool for now: {e}");
                }
            }
            while pending {
                std::thread::sleep(Duration::from_secs(30));
                pending = recovering.recover_interrupted();
            }
        })
        .context("start the spool recovery thread")?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("install signal handler")?;
    }
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    // Capture requests through a broker, when one is configured: read until the shutdown,
    // their events sent until the captures have ended.
    let fleet = match daemon.config().fleet.redis.clone() {
        Some(redis) => {
            let _guard = runtime.enter();
            Some(RedisFleet::start(daemon.clone(), &redis, shutdown_rx.clone())?)
        }
        None => None,
    };
    let server = runtime.spawn(server::serve(daemon.clone(), unix, tcp, shutdown_rx));
    log::info!("daemon ready: control socket {}", socket.display());
    // Signals are checked twice a second; running captures' progress is saved every 2 s (what a
    // killed daemon's captures report as interrupted).
    let mut ticks = 0u32;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(500));
        ticks += 1;
        if ticks.is_multiple_of(4) {
            daemon.save_progress();
        }
    }
    log::info!("stopping: running captures end as interrupted, their outputs are finished");
    // Pending waits return now (with the capture as it is), new captures are refused; then the
    // server stops accepting, and its connections finish their requests within its grace.
    daemon.begin_shutdown();
    let _ = shutdown_tx.send(true);
    let server_stopped = runtime.block_on(async {
        tokio::time::timeout(server::SHUTDOWN_GRACE + Duration::from_secs(3), server).await
    });
    if server_stopped.is_err() {
        log::warn!("the control API did not stop in time; stopping anyway");
    }
    let _ = std::fs::remove_file(&socket);
    // Requests still being served hold the daemon, which ends its captures all the same.
    daemon.shutdown();
    if let Some(fleet) = fleet {
        runtime.block_on(fleet.finish(Duration::from_secs(3)));
    }
    // Blocking tasks still running (a request's last moments) must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    log::info!("stopped");
    Ok(())
}
