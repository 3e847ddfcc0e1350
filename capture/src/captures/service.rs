//! An interface's captures at work: [`InterfaceService`] runs any number at once on the
//! interface's own thread (the daemon's), and follows its device (removed, returned).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tapstream_pcap::{FileHeader, LINKTYPE_ETHERNET};

use crate::{
    datapath::capture::{Budget, CaptureShared, CaptureSpec, Limits, StopReason},
    datapath::chunk::Chunk,
    datapath::clock::TaiClock,
    datapath::pipeline::{InterfaceConfig, InterfaceRuntime, QueueSnapshot},
    datapath::writer::Output,
};

use super::{output::*, *};

/// How often the service checks that its device is still the one it set up (a cheap lookup
/// of the name's index) and, while the device is missing, whether it has returned.
pub(super) const DEVICE_CHECK: Duration = Duration::from_millis(250);

/// How long the service waits before trying again to attach to a returned device it could
/// not attach to.
pub(super) const ATTACH_RETRY: Duration = Duration::from_secs(5);

/// A capture to start on an interface.
pub struct CaptureOrder {
    /// What to capture.
    pub spec: CaptureSpec,
    /// When to stop.
    pub limits: Limits,
    /// What its frames are admitted against: its own ([`Budget::new`]), or the one the
    /// interfaces of a capture over several share.
    pub budget: Arc<Budget>,
    /// Where the frames go.
    pub target: Target,
    /// Receives the outcome, from a thread of its own once the output is finished.
    pub on_done: OnDone,
}

pub(super) enum ServiceCommand {
    Start {
        order: Box<CaptureOrder>,
        reply: crossbeam_channel::Sender<Result<Arc<Mutex<Progress>>, SessionError>>,
    },
    Stop {
        id: String,
        reason: StopReason,
    },
    Shutdown {
        reason: StopReason,
    },
}

/// A capture running in the service.
pub(super) struct Active {
    pub(super) capture: Arc<CaptureShared>,
    pub(super) slot: usize,
    pub(super) out: Out,
    pub(super) started: Instant,
    pub(super) started_tai: u64,
    /// Counters when it started: its summary reports what changed while it ran.
    pub(super) start_counters: Vec<QueueSnapshot>,
    pub(super) reason: Option<StopReason>,
    pub(super) failure: Option<SessionError>,
    /// What ended it from outside (its interface removed), for its summary.
    pub(super) cause: Option<String>,
    pub(super) done_queues: u32,
    pub(super) progress: Arc<Mutex<Progress>>,
    pub(super) on_done: Option<OnDone>,
    /// For a capture with a lookback: its history's progress.
    pub(super) history: Option<History>,
}

/// The history of a capture with a lookback, as it arrives: each queue's history chunks come
/// from the recorder, then its note that it is complete; the capture's live chunks are held
/// until every queue's note has come, so the stored capture is its history, then live.
pub(super) struct History {
    asked: Duration,
    /// When it started (ns since the Unix epoch).
    start_ns: u64,
    /// Where its history begins: `asked` before `start_ns`.
    since_ns: u64,
    queues_done: u32,
    /// The oldest frame any queue's history held.
    oldest_ns: Option<u64>,
    held: std::collections::VecDeque<Chunk>,
    /// Frames stored from the history.
    frames: u64,
}

impl History {
    fn complete(&self, queues: u32) -> bool {
        self.queues_done >= queues
    }
}

/// An interface at work with any number of captures: its runtime lives on a thread of its
/// own, which hands each capture's chunks to the capture's output, ends captures at their
/// first limit, and finishes their outputs.
///
/// The thread also watches the device: when it is removed (or replaced by another device of
/// the same name), the captures on it end with [`SessionError::InterfaceRemoved`] in their
/// summaries, keeping what they stored; while it is missing, captures are refused with
/// [`SessionError::InterfaceAbsent`]; when a device of that name appears, the interface is set
/// up on it again.
pub struct InterfaceService {
    interface: String,
    commands: crossbeam_channel::Sender<ServiceCommand>,
    /// Whether the device is there and set up (captures can start).
    attached: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InterfaceService {
    /// Sets up the interface (on the calling thread, so in its network namespace) and starts
    /// the service thread; no capture runs yet.
    pub fn start(config: InterfaceConfig) -> Result<Self, SessionError> {
        let runtime = InterfaceRuntime::start(config.clone())?;
        Self::spawn(config, Some(runtime))
    }

    /// Like [`InterfaceService::start`], but a device that does not exist is not an error:
    /// the service refuses captures until a device of that name appears, then sets it up (the
    /// daemon, whose devices may come up after it).
    pub fn start_or_wait(config: InterfaceConfig) -> Result<Self, SessionError> {
        if matches!(crate::sys::device_index(&config.interface), Ok(None)) {
            log::warn!(
                "{} is absent: no capture can start on it until it appears, then it is attached",
                interface_name(config.alias.as_deref(), &config.interface)
            );
            return Self::spawn(config, None);
        }
        Self::start(config)
    }

    pub(super) fn spawn(
        config: InterfaceConfig,
        runtime: Option<InterfaceRuntime>,
    ) -> Result<Self, SessionError> {
        let interface = config.interface.clone();
        let attached = Arc::new(AtomicBool::new(runtime.is_some()));
        let (commands, rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name(format!("tapstream-{interface}"))
            .spawn({
                let attached = attached.clone();
                move || serve(config, runtime, rx, &attached)
            })
            .map_err(|source| SessionError::Thread { source })?;
        Ok(Self { interface, commands, attached, thread: Some(thread) })
    }

    /// The interface name.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Whether the device is there and set up: false while it is missing (captures are
    /// refused then).
    pub fn attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// Starts a capture; returns its progress once the kernel marks frames for it. A filter
    /// the kernel cannot run, or an output that cannot start, starts nothing.
    pub fn start_capture(&self, order: CaptureOrder) -> Result<Arc<Mutex<Progress>>, SessionError> {
        let (reply, result) = crossbeam_channel::bounded(1);
        self.commands
            .send(ServiceCommand::Start { order: Box::new(order), reply })
            .map_err(|_| SessionError::ServiceGone)?;
        result.recv().map_err(|_| SessionError::ServiceGone)?
    }

    /// Ends capture `id` with `reason` (if it is still running).
    pub fn stop_capture(&self, id: &str, reason: StopReason) {
        let _ = self.commands.send(ServiceCommand::Stop { id: id.to_owned(), reason });
    }

    /// Ends every capture with `reason`, waits for their outputs to finish, and takes the
    /// interface down.
    pub fn shutdown(mut self, reason: StopReason) {
        self.stop_all(reason);
    }

    pub(super) fn stop_all(&mut self, reason: StopReason) {
        let _ = self.commands.send(ServiceCommand::Shutdown { reason });
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for InterfaceService {
    fn drop(&mut self) {
        self.stop_all(StopReason::Interrupted);
    }
}

/// The service thread: the captures while the device is there ([`Service::run`]), the wait
/// for it while it is missing ([`wait_for_device`]), until it is told to stop.
pub(super) fn serve(
    config: InterfaceConfig,
    mut runtime: Option<InterfaceRuntime>,
    commands: crossbeam_channel::Receiver<ServiceCommand>,
    attached: &AtomicBool,
) {
    let mut finishing = Vec::new();
    loop {
        let Some(current) = runtime.take() else {
            attached.store(false, Ordering::Release);
            match wait_for_device(&config, &commands) {
                Some(found) => {
                    runtime = Some(found);
                    continue;
                }
                None => break,
            }
        };
        attached.store(true, Ordering::Release);
        let mut service =
            Service { runtime: current, commands: commands.clone(), active: Vec::new(), removed: false };
        let ended = service.run(&mut finishing, attached);
        match ended {
            Ended::Removed => {
                let _ = service.runtime.shutdown();
            }
            Ended::Shutdown => {
                // Outputs finish (uploads complete) before the interface goes down.
                for thread in finishing.drain(..) {
                    let _ = thread.join();
                }
                let _ = service.runtime.shutdown();
                return;
            }
        }
    }
    for thread in finishing {
        let _ = thread.join();
    }
}

/// While the device is missing: refuses captures, and looks for a device of that name every
/// [`DEVICE_CHECK`]. Returns the interface set up on it, or `None` when told to stop.
pub(super) fn wait_for_device(
    config: &InterfaceConfig,
    commands: &crossbeam_channel::Receiver<ServiceCommand>,
) -> Option<InterfaceRuntime> {
    let name = interface_name(config.alias.as_deref(), &config.interface);
    let mut next_try = Instant::now();
    let mut failed_on = None;
    loop {
        match commands.recv_timeout(DEVICE_CHECK) {
            Ok(ServiceCommand::Start { reply, .. }) => {
                let _ = reply.send(Err(SessionError::absent(config)));
            }
            // Its captures have ended already.
            Ok(ServiceCommand::Stop { .. }) | Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Ok(ServiceCommand::Shutdown { .. }) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return None;
            }
        }
        if Instant::now() < next_try {
            continue;
        }
        let Ok(Some(index)) = crate::sys::device_index(&config.interface) else { continue };
        match InterfaceRuntime::start(config.clone()) {
            Ok(runtime) => {
                log::info!("{name} is back: attached again (device index {})", runtime.ifindex());
                return Some(runtime);
            }
            Err(e) => {
                // Logged once per device; tried again every ATTACH_RETRY (it may still be
                // coming up, or be gone again).
                if failed_on != Some(index) {
                    log::error!(
                        "{name} is back (device index {index}) but cannot be attached: {}; trying again every {} s",
                        crate::report::chain(&e),
                        ATTACH_RETRY.as_secs()
                    );
                    failed_on = Some(index);
                }
                next_try = Instant::now() + ATTACH_RETRY;
            }
        }
    }
}

/// Why [`Service::run`] returned.
pub(super) enum Ended {
    /// Told to stop: every capture has ended.
    Shutdown,
    /// The device was removed: every capture on it has ended.
    Removed,
}

pub(super) struct Service {
    pub(super) runtime: InterfaceRuntime,
    pub(super) commands: crossbeam_channel::Receiver<ServiceCommand>,
    pub(super) active: Vec<Active>,
    /// The device was removed: captures are refused, the running ones end.
    pub(super) removed: bool,
}

impl Service {
    /// Runs captures on the interface until told to stop or until its device is removed, and
    /// then until every capture has ended; the threads finishing their outputs are added to
    /// `finishing`.
    pub(super) fn run(
        &mut self,
        finishing: &mut Vec<std::thread::JoinHandle<()>>,
        attached: &AtomicBool,
    ) -> Ended {
        let mut shutdown = None;
        let mut last_progress = Instant::now();
        let mut last_check = Instant::now();
        loop {
            while let Ok(command) = self.commands.try_recv() {
                match command {
                    ServiceCommand::Start { order, reply } => {
                        // A capture is not started on a device that has just gone.
                        if !self.removed && self.device_gone() {
                            self.device_removed(attached);
                        }
                        let result = if shutdown.is_some() {
                            Err(SessionError::ServiceGone)
                        } else if self.removed {
                            Err(SessionError::absent(self.runtime.config()))
                        } else {
                            self.start(*order)
                        };
                        let _ = reply.send(result);
                    }
                    ServiceCommand::Stop { id, reason } => self.end(|a| a.capture.spec.id == id, reason),
                    ServiceCommand::Shutdown { reason } => {
                        shutdown = Some(reason);
                        self.end(|_| true, reason);
                    }
                }
            }
            let next = match self.runtime.outputs().try_recv() {
                Err(crossbeam_channel::TryRecvError::Empty) => {
                    // Nothing from the writers: wait for them or for a command, whichever
                    // comes first (a capture's start is not held up behind the wait).
                    let mut ready = crossbeam_channel::Select::new();
                    ready.recv(self.runtime.outputs());
                    ready.recv(&self.commands);
                    let _ = ready.ready_timeout(Duration::from_millis(20));
                    Err(crossbeam_channel::RecvTimeoutError::Timeout)
                }
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected)
                }
                Ok(output) => Ok(output),
            };
            match next {
                Ok(Output::Chunk(chunk)) => self.live(chunk),
                Ok(Output::History(chunk)) => self.history_chunk(chunk),
                Ok(Output::HistoryDone { capture, oldest_ns, .. }) => self.history_done(&capture, oldest_ns),
                Ok(Output::Done { capture, .. }) => {
                    if let Some(a) = self.active.iter_mut().find(|a| Arc::ptr_eq(&a.capture, &capture)) {
                        a.done_queues += 1;
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    log::error!("every writer of {} has stopped", self.runtime.interface());
                    self.end(|_| true, StopReason::Error);
                    for a in &mut self.active {
                        a.done_queues = self.runtime.queues();
                    }
                }
            }
            if !self.removed && last_check.elapsed() >= DEVICE_CHECK {
                last_check = Instant::now();
                if self.device_gone() {
                    self.device_removed(attached);
                }
            }
            self.check_limits();
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                let _ = self.runtime.snapshot();
                for a in &self.active {
                    a.publish_progress();
                }
            }
            finishing.extend(self.finish_done());
            if self.active.is_empty() {
                if shutdown.is_some() {
                    return Ended::Shutdown;
                }
                if self.removed {
                    return Ended::Removed;
                }
            }
        }
    }

    /// Whether the device set up is gone: no device has its name now, or another one does.
    pub(super) fn device_gone(&self) -> bool {
        match crate::sys::device_index(self.runtime.interface()) {
            Ok(index) => index != Some(self.runtime.ifindex()),
            // Not knowing (out of descriptors, say) is no sign of a removal.
            Err(e) => {
                log::debug!("cannot look up {}: {e}", self.runtime.interface());
                false
            }
        }
    }

    /// The device is gone: new captures are refused, and the running ones end with the error
    /// once the writers have taken what the rings still held.
    pub(super) fn device_removed(&mut self, attached: &AtomicBool) {
        self.removed = true;
        attached.store(false, Ordering::Release);
        let error = SessionError::removed(self.runtime.config());
        let running = self.active.iter().filter(|a| a.reason.is_none()).count();
        log::error!(
            "{error}: {running} running capture(s) end with this error; no capture can start on it until a \
             device of that name appears"
        );
        self.runtime.drain();
        let message = error.to_string();
        for a in self.active.iter_mut().filter(|a| a.reason.is_none()) {
            a.cause = Some(message.clone());
        }
        self.end(|_| true, StopReason::Error);
    }

    pub(super) fn start(&mut self, order: CaptureOrder) -> Result<Arc<Mutex<Progress>>, SessionError> {
        let capture = CaptureShared::sharing(order.spec, order.limits, order.budget);
        let header =
            FileHeader { snaplen: capture.spec.snaplen, linktype: LINKTYPE_ETHERNET, nanos: true }.encode();
        let out = match order.target {
            Target::File(path, pcapng) => Out::File(FileOutput {
                path,
                snaplen: capture.spec.snaplen,
                pcapng,
                blocks: Vec::new(),
                file: None,
                whole: 0,
                packets: 0,
                bytes: 0,
            }),
            Target::Store(store) => {
                let output = (store.start)(self.runtime.pool().clone(), &header)?;
                let lost = output.lost_packets();
                Out::Store { output, packets: 0, bytes: 0, lost }
            }
        };
        let start_counters = self.runtime.snapshot()?;
        let started = Instant::now();
        let started_tai = TaiClock::now_tai_ns();
        let start_ns = crate::sys::unix_now_ns();
        let lookback = capture.spec.lookback;
        if lookback.is_some() && self.runtime.history().is_none() {
            return Err(SessionError::NoHistory { interface: self.runtime.interface().to_owned() });
        }
        let since_ns = lookback.map(|l| start_ns.saturating_sub(l.as_nanos() as u64));
        let slot = self.runtime.start_capture(capture.clone(), since_ns)?;
        log::info!("capture {} running on {}", capture.spec.id, self.runtime.interface());
        metrics::gauge!(crate::metrics::CAPTURES_ACTIVE).increment(1.0);
        let progress = Arc::new(Mutex::new(Progress::default()));
        self.active.push(Active {
            capture,
            slot,
            out,
            started,
            started_tai,
            start_counters,
            reason: None,
            failure: None,
            cause: None,
            done_queues: 0,
            progress: progress.clone(),
            on_done: Some(order.on_done),
            history: lookback.map(|asked| History {
                asked,
                start_ns,
                since_ns: since_ns.unwrap_or_default(),
                queues_done: 0,
                oldest_ns: None,
                held: std::collections::VecDeque::new(),
                frames: 0,
            }),
        });
        Ok(progress)
    }

    /// A live chunk: to the capture's output, or held while its history is on its way.
    pub(super) fn live(&mut self, chunk: Chunk) {
        let queues = self.runtime.queues();
        // While a capture's history is on its way, a quarter of the chunk buffers at most are
        // held for it; its frames beyond are dropped and counted.
        let most_held = (self.runtime.pool().capacity() / 4).max(1);
        if let Some(h) = self
            .active
            .iter_mut()
            .find(|a| Arc::ptr_eq(&a.capture, &chunk.capture))
            .and_then(|a| a.history.as_mut())
            .filter(|h| !h.complete(queues))
        {
            if h.held.len() < most_held {
                h.held.push_back(chunk);
            } else {
                chunk.capture.count_dropped(u64::from(chunk.frames));
                self.runtime.pool().put(chunk.data);
            }
            return;
        }
        self.dispatch(chunk);
    }

    /// A chunk of a capture's history.
    pub(super) fn history_chunk(&mut self, chunk: Chunk) {
        let (capture, frames) = self.dispatch(chunk);
        if let Some(h) = self
            .active
            .iter_mut()
            .find(|a| Arc::ptr_eq(&a.capture, &capture))
            .and_then(|a| a.history.as_mut())
        {
            h.frames += frames;
        }
    }

    /// A queue's history for `capture` is complete: once every queue's is, the live chunks
    /// held go out.
    pub(super) fn history_done(&mut self, capture: &Arc<CaptureShared>, oldest_ns: Option<u64>) {
        let queues = self.runtime.queues();
        let Some(a) = self.active.iter_mut().find(|a| Arc::ptr_eq(&a.capture, capture)) else { return };
        let Some(h) = a.history.as_mut() else { return };
        h.queues_done += 1;
        h.oldest_ns = match (h.oldest_ns, oldest_ns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if h.complete(queues) {
            let held = std::mem::take(&mut h.held);
            for chunk in held {
                self.dispatch(chunk);
            }
        }
    }

    /// Hands a chunk to its capture's output; returns the capture and the frames it stored.
    /// A capture with a lookback is admitted against its limits here, record by record, in
    /// the order stored (the writers do not: its history comes first).
    pub(super) fn dispatch(&mut self, mut chunk: Chunk) -> (Arc<CaptureShared>, u64) {
        let pool = self.runtime.pool().clone();
        let capture = chunk.capture.clone();
        if capture.spec.lookback.is_some() && capture.is_counted() {
            admit_records(&mut chunk);
            if chunk.is_empty() {
                pool.put(chunk.data);
                return (capture, 0);
            }
        }
        let frames = u64::from(chunk.frames);
        let Some(a) = self.active.iter_mut().find(|a| Arc::ptr_eq(&a.capture, &chunk.capture)) else {
            // Its capture has finished: nothing wants it (never expected).
            chunk.capture.count_dropped(u64::from(chunk.frames));
            pool.put(chunk.data);
            return (capture, 0);
        };
        if a.failure.is_some() {
            a.capture.count_dropped(u64::from(chunk.frames));
            pool.put(chunk.data);
            return (capture, 0);
        }
        if let Err(e) = a.out.write(chunk, &a.capture, &pool, &a.progress, a.started) {
            log::error!("capture {}: {}", a.capture.spec.id, crate::report::chain(&e));
            a.failure = Some(e);
            return (capture, 0);
        }
        (capture, frames)
    }

    /// Ends the captures `which` selects with `reason` (if still running).
    pub(super) fn end(&mut self, which: impl Fn(&Active) -> bool, reason: StopReason) {
        for i in 0..self.active.len() {
            if self.active[i].reason.is_none() && which(&self.active[i]) {
                self.active[i].reason = Some(reason);
                let slot = self.active[i].slot;
                if let Err(e) = self.runtime.stop_capture(slot) {
                    log::error!("stopping capture {}: {e}", self.active[i].capture.spec.id);
                }
            }
        }
    }

    pub(super) fn check_limits(&mut self) {
        for i in 0..self.active.len() {
            let a = &self.active[i];
            if a.reason.is_some() {
                continue;
            }
            let failed =
                a.failure.is_some() || matches!(&a.out, Out::Store { output, .. } if output.has_failed());
            let reason = if failed {
                log::error!("capture {}: its output has stopped; ending the capture", a.capture.spec.id);
                Some(StopReason::Error)
            } else {
                check_limits(&a.capture, &a.capture.limits, a.started, a.started_tai)
            };
            if let Some(reason) = reason {
                let id = a.capture.spec.id.clone();
                self.end(|a| a.capture.spec.id == id, reason);
            }
        }
    }

    /// Hands each capture every queue has finished to a thread that finishes its output and
    /// reports.
    pub(super) fn finish_done(&mut self) -> Vec<std::thread::JoinHandle<()>> {
        let queues = self.runtime.queues();
        let mut threads = Vec::new();
        let mut i = 0;
        while i < self.active.len() {
            let history_due = self.active[i].history.as_ref().is_some_and(|h| !h.complete(queues));
            if self.active[i].done_queues < queues || history_due {
                i += 1;
                continue;
            }
            let mut a = self.active.swap_remove(i);
            let end_counters = self.runtime.snapshot().unwrap_or_default();
            let interface = self.runtime.interface().to_owned();
            let elapsed = a.started.elapsed();
            metrics::gauge!(crate::metrics::CAPTURES_ACTIVE).decrement(1.0);
            let reason = a.reason.unwrap_or(StopReason::Stopped);
            let reason = if a.failure.is_some() { StopReason::Error } else { reason };
            metrics::counter!(crate::metrics::CAPTURES_ENDED, "reason" => reason.as_str()).increment(1);
            a.publish_progress();
            let on_done = a.on_done.take().expect("reported once");
            let lookback = a.history.take().map(|h| {
                let asked_secs = h.asked.as_secs_f64();
                let since_ns = h.since_ns;
                let complete = h.oldest_ns.is_some_and(|oldest| oldest <= since_ns);
                let reached_secs = match h.oldest_ns {
                    _ if complete => asked_secs,
                    Some(oldest) => h.start_ns.saturating_sub(oldest) as f64 / 1e9,
                    None => 0.0,
                };
                let summary = LookbackSummary {
                    asked_secs,
                    since_ns,
                    reached_secs,
                    complete,
                    history_frames: h.frames,
                    live_frames: 0,
                };
                (h.frames, summary)
            });
            let queues: Vec<QueueSummary> = end_counters
                .iter()
                .map(|end| {
                    let start =
                        a.start_counters.iter().find(|s| s.queue == end.queue).copied().unwrap_or_default();
                    QueueSummary::delta(&start, end)
                })
                .collect();
            let spawned = std::thread::Builder::new().name("tapstream-finish".into()).spawn(move || {
                // A capture whose output failed (a full disk, a store that gave up) reports its
                // summary as every other: what was stored, what was lost, and the error. What
                // was handed to an output that cannot be finished is what a failed store keeps
                // in its spool, less what found the spool full (counted until it is finished).
                let (handed, lost) = (a.out.handed(), a.out.lost_counter());
                let levels = a.out.zstd_levels();
                let lost_now = || lost.as_ref().map_or(0, |l| l.load(Ordering::Relaxed));
                let (packets, bytes, outputs, failure) = match (a.failure, a.out.finish()) {
                    (None, Ok((packets, bytes, outputs))) => (packets, bytes, outputs, None),
                    (Some(e), Ok((packets, bytes, outputs))) => (packets, bytes, outputs, Some(e)),
                    (Some(e), Err(_)) | (None, Err(e)) => {
                        (handed.0.saturating_sub(lost_now()), handed.1, Vec::new(), Some(e))
                    }
                };
                let failure = failure.map(|e| crate::report::chain(&e));
                on_done(Ok(CaptureSummary {
                    id: a.capture.spec.id.clone(),
                    interface,
                    stop_reason: if failure.is_some() { StopReason::Error } else { reason },
                    packets,
                    bytes,
                    elapsed_secs: elapsed.as_secs_f64(),
                    outputs,
                    dropped_writer: a.capture.dropped(),
                    dropped_spool_full: lost_now(),
                    dropped_kernel: queues.iter().map(|q| q.xsk_rx_dropped + q.xsk_rx_ring_full).sum(),
                    redirect_errors: queues.iter().map(|q| q.xdp_redirect_errors).sum(),
                    truncated: queues.iter().map(|q| q.xdp_truncated).sum(),
                    queues,
                    error: a.cause.or(failure),
                    recovery: None,
                    zstd_levels: levels.map(|l| l.snapshot()).unwrap_or_default(),
                    parts: Vec::new(),
                    lookback: lookback.map(|(history, summary)| LookbackSummary {
                        live_frames: packets.saturating_sub(history),
                        ..summary
                    }),
                    cloudshark: None,
                }));
            });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => log::error!("cannot start a thread to finish a capture: {e}"),
            }
        }
        threads
    }
}

impl Active {
    pub(super) fn publish_progress(&self) {
        publish(&self.progress, self.out.stored(), self.started, self.capture.dropped() + self.out.lost());
    }
}

/// Admits a chunk's records against its capture's limits in order, cutting it at the first
/// that is refused (beyond the limit: not stored, not a loss).
fn admit_records(chunk: &mut Chunk) {
    let mut kept = 0usize;
    let mut frames = 0u32;
    let mut last_ns = chunk.first_ns;
    for (header, data) in tapstream_pcap::records(&chunk.data) {
        if !chunk.capture.admit(data.len() as u64) {
            break;
        }
        kept += tapstream_pcap::RECORD_HEADER_LEN + data.len();
        frames += 1;
        last_ns = header.ts_nanos();
    }
    chunk.data.truncate(kept);
    chunk.frames = frames;
    chunk.last_ns = last_ns;
}

/// The limit that ends the capture now, if any.
pub(super) fn check_limits(
    capture: &CaptureShared,
    limits: &Limits,
    started: Instant,
    started_tai: u64,
) -> Option<StopReason> {
    if let Some(reason) = capture.limit_reached() {
        return Some(reason);
    }
    if limits.duration.is_some_and(|d| started.elapsed() >= d) {
        return Some(StopReason::Duration);
    }
    if let Some(idle) = limits.idle {
        let last = capture.last_frame_tai_ns().max(started_tai);
        if TaiClock::now_tai_ns().saturating_sub(last) >= idle.as_nanos() as u64 {
            return Some(StopReason::Idle);
        }
    }
    None
}
