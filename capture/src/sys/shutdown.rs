//! The process's stop, as a value passed down to every stage that must end with it.
//!
//! One [`Shutdown`] is made where the process starts (`tapstream daemon`, `tapstream
//! capture`), triggered by SIGINT or SIGTERM ([`Shutdown::trigger_on_termination`]), and
//! cloned into whatever must notice it: blocking loops wait on it with a timeout
//! ([`Shutdown::wait_timeout`], which returns at once when it is triggered), async code awaits
//! it ([`Shutdown::wait`]), and code that works in steps looks at it between them
//! ([`Shutdown::is_set`]). It is triggered once and stays so.
//!
//! This module uses no other module of the crate, so that any of them may take one.

use std::{
    io,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// The stop of a process (or of a test's part of one). Clones share it: triggering one
/// triggers all.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Set once, never cleared; read without the lock by [`Shutdown::is_set`].
    set: AtomicBool,
    /// What blocking waiters wait on: set under `lock`, so that none misses the wakeup.
    lock: Mutex<()>,
    changed: Condvar,
    /// What async waiters wait on. Held here, so it never closes while a waiter lives.
    watch: tokio::sync::watch::Sender<bool>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            set: AtomicBool::new(false),
            lock: Mutex::new(()),
            changed: Condvar::new(),
            watch: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Shutdown {
    /// A shutdown not yet triggered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Triggers it: every waiter returns, now and later. Triggering again does nothing.
    pub fn trigger(&self) {
        let guard = self.inner.lock.lock().unwrap_or_else(|e| e.into_inner());
        // Release: whatever the triggering thread did before is visible to a thread that sees
        // the flag set (is_set's Acquire), not only the flag itself.
        let was_set = self.inner.set.swap(true, Ordering::Release);
        drop(guard);
        if !was_set {
            self.inner.changed.notify_all();
            self.inner.watch.send_replace(true);
        }
    }

    /// Whether it has been triggered.
    pub fn is_set(&self) -> bool {
        self.inner.set.load(Ordering::Acquire)
    }

    /// Blocks until it is triggered or `timeout` has passed, whichever comes first; returns
    /// whether it is triggered. Returns at once when it is triggered meanwhile.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut guard = self.inner.lock.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the lock `trigger` sets it under: a trigger between the check and the
        // wait below is impossible, so none is missed. The loop covers spurious wakeups.
        while !self.is_set() {
            let left = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                // Beyond what an Instant holds: as good as for ever.
                None => Duration::from_secs(u64::from(u32::MAX)),
            };
            if left.is_zero() {
                return false;
            }
            guard = self.inner.changed.wait_timeout(guard, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    /// Resolves once it is triggered (at once if it already is). For tokio code; any runtime
    /// will do.
    pub async fn wait(&self) {
        let mut watch = self.inner.watch.subscribe();
        // The sender lives in `inner`, which this borrows: the channel cannot close.
        let _ = watch.wait_for(|&set| set).await;
    }

    /// Triggers it when the process receives one of `signals` (which then no longer end the
    /// process). A thread of its own reads them; the handlers themselves only record the
    /// signal (signal-hook's self-pipe), which is all a signal handler may safely do.
    pub fn trigger_on(&self, signals: &[libc::c_int]) -> io::Result<()> {
        let mut received = signal_hook::iterator::Signals::new(signals)?;
        let shutdown = self.clone();
        std::thread::Builder::new().name("tapstream-signals".into()).spawn(move || {
            for signal in received.forever() {
                log::debug!("signal {signal} received: stopping");
                shutdown.trigger();
            }
        })?;
        Ok(())
    }

    /// Triggers it on SIGINT (Ctrl-C) and SIGTERM (`systemctl stop`, `kill`). A second one
    /// does no more than the first: the stop already under way finishes what it must.
    pub fn trigger_on_termination(&self) -> io::Result<()> {
        self.trigger_on(&[signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long enough that a test that returns sooner was woken, not timed out.
    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn a_trigger_is_seen_by_every_clone_and_stays() {
        let shutdown = Shutdown::new();
        let clone = shutdown.clone();
        assert!(!shutdown.is_set() && !clone.is_set());
        clone.trigger();
        assert!(shutdown.is_set() && clone.is_set());
        clone.trigger();
        assert!(shutdown.is_set(), "triggering again changes nothing");
        assert!(!Shutdown::new().is_set(), "another shutdown is another");
    }

    #[test]
    fn a_wait_times_out_when_nothing_triggers() {
        let shutdown = Shutdown::new();
        let start = Instant::now();
        assert!(!shutdown.wait_timeout(Duration::from_millis(100)));
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert!(!shutdown.wait_timeout(Duration::ZERO));
    }

    #[test]
    fn a_wait_returns_at_once_when_triggered() {
        let shutdown = Shutdown::new();
        let start = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                shutdown.clone().trigger();
            });
            assert!(shutdown.wait_timeout(LONG));
        });
        assert!(start.elapsed() < Duration::from_secs(10), "woken after {:?}", start.elapsed());
        // Already triggered: no wait at all, whatever the timeout.
        let start = Instant::now();
        assert!(shutdown.wait_timeout(LONG));
        assert!(shutdown.wait_timeout(Duration::ZERO));
        assert!(shutdown.wait_timeout(Duration::MAX), "a timeout no Instant holds");
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn many_waiters_all_wake() {
        let shutdown = Shutdown::new();
        let start = Instant::now();
        std::thread::scope(|s| {
            let waiters: Vec<_> = (0..8).map(|_| s.spawn(|| shutdown.wait_timeout(LONG))).collect();
            std::thread::sleep(Duration::from_millis(50));
            shutdown.trigger();
            assert!(waiters.into_iter().all(|w| w.join().unwrap()));
        });
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn async_waits_resolve_when_triggered() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let shutdown = Shutdown::new();
        runtime.block_on(async {
            let waiting = tokio::spawn({
                let shutdown = shutdown.clone();
                async move { shutdown.wait().await }
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!waiting.is_finished());
            shutdown.trigger();
            tokio::time::timeout(LONG, waiting).await.expect("woken").unwrap();
            // Already triggered: resolves at once.
            tokio::time::timeout(Duration::from_secs(1), shutdown.wait()).await.expect("at once");
        });
    }

    #[test]
    fn a_signal_triggers_it() {
        // SIGUSR2: no other test uses it, and SIGINT or SIGTERM would be taken from the test
        // harness for the rest of the run.
        let shutdown = Shutdown::new();
        shutdown.trigger_on(&[signal_hook::consts::SIGUSR2]).unwrap();
        assert!(!shutdown.is_set());
        signal_hook::low_level::raise(signal_hook::consts::SIGUSR2).unwrap();
        assert!(shutdown.wait_timeout(LONG));
    }
}
