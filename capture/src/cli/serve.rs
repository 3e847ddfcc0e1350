//! `tapstream daemon`: the daemon's process: control listeners, signals, the recovery thread,
//! the periodic save of progress, and an orderly stop.

use std::{sync::Arc, time::Duration};

use crate::{
    cli::serve_metrics,
    config::Config,
    control::{daemon::Daemon, server},
    store::settings::hostname,
    sys::Shutdown,
};
use anyhow::Context as _;

/// How often running captures' progress is saved (what a killed daemon's captures report).
const SAVE_PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How often captures whose store was unreachable are recovered again.
const RECOVERY_RETRY: Duration = Duration::from_secs(30);

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
    // The daemon's stop: SIGINT and SIGTERM trigger it, and every part below is given it.
    let shutdown = Shutdown::new();
    let (store, node) = (config.store.clone(), config.daemon.node.clone().unwrap_or_else(hostname));
    let daemon = Arc::new(Daemon::start(config, shutdown.clone())?);
    // First the captures a dead daemon left running (their open uploads completed, their
    // spools uploaded under their names and recorded in their state), then the other spools
    // (what earlier runs left in the spool goes up now, not only when a capture next starts);
    // captures whose store is unreachable are tried again every 30 s until the daemon stops.
    let recovering = daemon.clone();
    let stopping = shutdown.clone();
    std::thread::Builder::new()
        .name("tapstream-recover".into())
        .spawn(move || {
            let mut pending = recovering.recover_interrupted();
            for (url, result) in store.recover_spools(&node) {
                if let Err(e) = result {
                    log::warn!("what earlier runs spooled for {url} stays in the spool for now: {e}");
                }
            }
            while pending && !stopping.wait_timeout(RECOVERY_RETRY) {
                pending = recovering.recover_interrupted();
            }
        })
        .context("start the spool recovery thread")?;
    shutdown.trigger_on_termination().context("install signal handlers")?;
    let server = runtime.spawn(server::serve(daemon.clone(), unix, tcp, shutdown.clone()));
    log::info!("daemon ready: control socket {}", socket.display());
    // Running captures' progress is saved every 2 s until the stop, which ends the wait at once.
    while !shutdown.wait_timeout(SAVE_PROGRESS_EVERY) {
        daemon.save_progress();
    }
    log::info!("stopping: running captures end as interrupted, their outputs are finished");
    // New captures are already refused and the server stops accepting; pending waits return
    // now (with the capture as it is), and the server's connections finish their requests
    // within its grace.
    daemon.begin_shutdown();
    let server_stopped = runtime.block_on(async {
        tokio::time::timeout(server::SHUTDOWN_GRACE + Duration::from_secs(3), server).await
    });
    if server_stopped.is_err() {
        log::warn!("the control API did not stop in time; stopping anyway");
    }
    let _ = std::fs::remove_file(&socket);
    // Requests still being served hold the daemon, which ends its captures all the same.
    daemon.shutdown();
    // Blocking tasks still running (a request's last moments) must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    log::info!("stopped");
    Ok(())
}
