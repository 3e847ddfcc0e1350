//! `tapstream daemon`: the daemon's process: control listeners, signals, the recovery thread,
//! the periodic save of progress, and an orderly stop.

use std::{sync::Arc, thread::JoinHandle, time::Duration};

use crate::{
    cli::serve_metrics,
    config::Config,
    control::{daemon::Daemon, server},
    fleet::{
        nats::NatsFleet,
        presence::{Heartbeat, NatsHeartbeat},
        redis::RedisFleet,
    },
    store::settings::{StoreSettings, hostname},
    sys::Shutdown,
};
use anyhow::Context as _;

/// How often running captures' progress is saved (what a killed daemon's captures report).
const SAVE_PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How often captures whose store was unreachable are recovered again.
const RECOVERY_RETRY: Duration = Duration::from_secs(30);
/// How long a stopping daemon waits, once its captures have ended, for a recovery of what
/// earlier runs left that is still under way (an upload to a slow store); past it, the daemon
/// exits, and the next start takes up what was left.
const RECOVERY_GRACE: Duration = Duration::from_secs(5);

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
        // Access rules may have tokens of their own beside (or instead of) the daemon's.
        let tcp = match &config.daemon.tcp_listen {
            Some(addr) => {
                let token = config.daemon.token_file.as_deref().map(server::read_token).transpose()?;
                let listener =
                    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listen on {addr}"))?;
                Some((listener, token))
            }
            None => None,
        };
        anyhow::Ok((unix, tcp))
    })?;
    let socket = config.daemon.socket.clone();
    // The daemon's stop: SIGINT and SIGTERM trigger it, and every part below is given it.
    let shutdown = Shutdown::new();
    let (store, node) = (config.store.clone(), config.daemon.node.clone().unwrap_or_else(hostname));
    let daemon = Arc::new(Daemon::start(config, shutdown.clone())?);
    let recovery = spawn_recovery(daemon.clone(), store, node, shutdown.clone())
        .context("start the spool recovery thread")?;
    let cloudshark = match daemon.cloudshark_retry() {
        Some(every) => Some(
            spawn_cloudshark(daemon.clone(), every, shutdown.clone())
                .context("start the CloudShark spool thread")?,
        ),
        None => None,
    };
    shutdown.trigger_on_termination().context("install signal handlers")?;
    // Capture requests through a broker, when one is configured: read until the shutdown,
    // their events sent until the captures have ended.
    // This node's presence is announced until the shutdown.
    let (fleet, presence) = match daemon.config().fleet.redis.clone() {
        Some(redis) => {
            let _guard = runtime.enter();
            (
                Some(RedisFleet::start(daemon.clone(), &redis, shutdown.clone())?),
                Some(Heartbeat::start(daemon.clone(), &redis, shutdown.clone())?),
            )
        }
        None => (None, None),
    };
    // The same through NATS JetStream, beside Redis or instead of it.
    let (nats, nats_presence) = match daemon.config().fleet.nats.clone() {
        Some(nats) => runtime.block_on(async {
            anyhow::Ok((
                Some(NatsFleet::start(daemon.clone(), &nats, shutdown.clone()).await?),
                Some(NatsHeartbeat::start(daemon.clone(), &nats, shutdown.clone()).await?),
            ))
        })?,
        None => (None, None),
    };
    let server = runtime.spawn(server::serve(daemon.clone(), unix, tcp, shutdown.clone()));
    log::info!("daemon ready: control socket {}", socket.display());
    // Running captures' progress is saved every 2 s until the stop, which ends the wait at once.
    while !shutdown.wait_timeout(SAVE_PROGRESS_EVERY) {
        daemon.save_progress();
    }
    log::info!("stopping: running captures end as interrupted, their outputs are finished");
    if let Some(presence) = presence {
        runtime.block_on(presence.finish(Duration::from_secs(3)));
    }
    if let Some(presence) = nats_presence {
        runtime.block_on(presence.finish(Duration::from_secs(3)));
    }
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
    // The fleet's last events (the captures' ends) go out now.
    if let Some(fleet) = fleet {
        runtime.block_on(fleet.finish(Duration::from_secs(3)));
    }
    if let Some(nats) = nats {
        runtime.block_on(nats.finish(Duration::from_secs(3)));
    }
    // A recovery under way (an upload to a slow or unreachable store) gets a little longer;
    // what it has not finished then stays in the spool and in the captures' state, and the
    // next start takes it up.
    if !recovery.join(RECOVERY_GRACE) {
        log::warn!(
            "the recovery of what earlier runs left is still under way {} s after the captures \
             ended: stopping anyway; the next start takes it up",
            RECOVERY_GRACE.as_secs()
        );
    }
    if let Some(cloudshark) = cloudshark
        && !cloudshark.join(RECOVERY_GRACE)
    {
        log::warn!(
            "a CloudShark upload from the spool is still under way: stopping anyway; the file stays there"
        );
    }
    // Blocking tasks still running (a request's last moments) must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    log::info!("stopped");
    Ok(())
}

/// Starts the thread that finishes what earlier runs left: first the captures a dead daemon
/// left running (their open uploads completed, their spools uploaded under their names and
/// recorded in their state), then the other spools (what earlier runs left in the spool goes
/// up now, not only when a capture next starts); captures whose store is unreachable are
/// tried again every 30 s until the daemon stops. A stop keeps the next step from starting;
/// one under way is waited for, within [`RECOVERY_GRACE`] (see [`daemon`]).
fn spawn_recovery(
    daemon: Arc<Daemon>,
    store: StoreSettings,
    node: String,
    shutdown: Shutdown,
) -> std::io::Result<BoundedJoin> {
    BoundedJoin::spawn("tapstream-recover", move || {
        let mut pending = daemon.recover_interrupted();
        if !shutdown.is_set() {
            for (url, result) in store.recover_spools(&node) {
                if let Err(e) = result {
                    log::warn!(
                        "what earlier runs spooled for {url} stays in the spool for now: {}",
                        crate::report::chain(&e)
                    );
                }
            }
        }
        while pending && !shutdown.wait_timeout(RECOVERY_RETRY) {
            pending = daemon.recover_interrupted();
        }
    })
}

/// Starts the thread that sends what waits in the CloudShark spool: at once (files CloudShark
/// refused included, the configuration may have changed), then every `every` until the stop.
fn spawn_cloudshark(
    daemon: Arc<Daemon>,
    every: Duration,
    shutdown: Shutdown,
) -> std::io::Result<BoundedJoin> {
    BoundedJoin::spawn("tapstream-cloudshark", move || {
        daemon.resend_cloudshark(true);
        while !shutdown.wait_timeout(every) {
            daemon.resend_cloudshark(false);
        }
    })
}

/// A thread the exit waits for, but only so long.
struct BoundedJoin {
    thread: JoinHandle<()>,
    /// Disconnected when the thread ends, however it ends (its sender is dropped then, in a
    /// panic too).
    ended: crossbeam_channel::Receiver<()>,
}

impl BoundedJoin {
    fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<Self> {
        let (ending, ended) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            let _ending = ending;
            f();
        })?;
        Ok(Self { thread, ended })
    }

    /// Waits up to `grace` for the thread to end, and joins it; returns whether it ended (a
    /// thread that panicked has ended). Past `grace`, leaves it to end with the process.
    fn join(self, grace: Duration) -> bool {
        match self.ended.recv_timeout(grace) {
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                let name = self.thread.thread().name().unwrap_or("?").to_owned();
                if self.thread.join().is_err() {
                    log::error!("the {name} thread panicked");
                }
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_bounded_join_waits_for_a_thread_that_ends_and_no_longer_for_one_that_does_not() {
        let start = Instant::now();
        let quick =
            BoundedJoin::spawn("test-quick", || std::thread::sleep(Duration::from_millis(50))).unwrap();
        assert!(quick.join(Duration::from_secs(60)));
        assert!(start.elapsed() < Duration::from_secs(10), "joined after {:?}", start.elapsed());

        let panics = BoundedJoin::spawn("test-panics", || panic!("on purpose")).unwrap();
        assert!(panics.join(Duration::from_secs(60)), "a thread that panicked has ended");

        let release = Shutdown::new();
        let stuck = BoundedJoin::spawn("test-stuck", {
            let release = release.clone();
            move || {
                release.wait_timeout(Duration::from_secs(600));
            }
        })
        .unwrap();
        let start = Instant::now();
        assert!(!stuck.join(Duration::from_millis(200)));
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(10), "{took:?}");
        release.trigger();
    }
}
