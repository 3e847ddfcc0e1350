//! Captures at work on an interface: [`InterfaceService`] runs any number of them at once
//! (the daemon), [`run_capture`] one until its first limit (the one-shot `tapstream
//! capture`). Each capture's chunks go to its own output: a local PCAP file, or objects in a
//! store ([`crate::store`]).

use std::{
    fs::File,
    io::{Seek as _, Write as _},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tapstream_pcap::{FileHeader, LINKTYPE_ETHERNET};

use crate::{
    datapath::capture::{CaptureShared, CaptureSpec, Limits, StopReason},
    datapath::chunk::{Chunk, ChunkPool},
    datapath::clock::TaiClock,
    datapath::pipeline::{InterfaceConfig, InterfaceRuntime, PipelineError, QueueSnapshot},
    datapath::writer::Output,
    store::stream::{StoreOutput, StoreTarget},
    sys::Shutdown,
};

/// Errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("upload failed")]
    Upload(#[from] crate::store::UploadError),
    #[error("the upload has stopped")]
    UploadStopped,
    #[error("the interface's service has stopped")]
    ServiceGone,
    #[error("{} was removed", interface_name(.alias.as_deref(), .device))]
    InterfaceRemoved { alias: Option<String>, device: String },
    #[error(
        "{} is absent: no capture can start on it until a device of that name appears",
        interface_name(.alias.as_deref(), .device)
    )]
    InterfaceAbsent { alias: Option<String>, device: String },
    #[error("cannot start the interface's service thread")]
    Thread {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A write failed part-way and the file could not be cut back to its last whole record.
    #[error(
        "cannot write {path} ({write}), nor cut it back to its last whole record at byte {whole}: \
         it ends in a partial record"
    )]
    Torn {
        path: PathBuf,
        write: std::io::Error,
        whole: u64,
        #[source]
        source: std::io::Error,
    },
}

impl SessionError {
    fn removed(config: &InterfaceConfig) -> Self {
        Self::InterfaceRemoved { alias: config.alias.clone(), device: config.interface.clone() }
    }

    fn absent(config: &InterfaceConfig) -> Self {
        Self::InterfaceAbsent { alias: config.alias.clone(), device: config.interface.clone() }
    }
}

/// `interface "public" (device eth1)` for one of the daemon's interfaces, `interface eth1`
/// for the one-shot capture's.
fn interface_name(alias: Option<&str>, device: &str) -> String {
    match alias {
        Some(alias) => format!("interface {alias:?} (device {device})"),
        None => format!("interface {device}"),
    }
}

/// How often the service checks that its device is still the one it set up (a cheap lookup
/// of the name's index) and, while the device is missing, whether it has returned.
const DEVICE_CHECK: Duration = Duration::from_millis(250);

/// How long the service waits before trying again to attach to a returned device it could
/// not attach to.
const ATTACH_RETRY: Duration = Duration::from_secs(5);

/// What a finished capture reports.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CaptureSummary {
    /// Capture id.
    pub id: String,
    /// Interface captured from.
    pub interface: String,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Frames stored.
    pub packets: u64,
    /// Frame bytes stored (after snaplen).
    pub bytes: u64,
    /// Seconds it ran.
    pub elapsed_secs: f64,
    /// Where the capture was stored (empty if no frame was captured).
    pub outputs: Vec<String>,
    /// Frames of this capture lost in the writers (chunk queue full or no buffer), or because
    /// its output failed (the frames of every chunk it could not store).
    pub dropped_writer: u64,
    /// Frames of this capture lost because their chunks found the spool full (the store behind
    /// or failed).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_spool_full: u64,
    /// Frames the AF_XDP sockets lost (all captures; kernel counters).
    pub dropped_kernel: u64,
    /// Frames a capture wanted that could not be redirected (no socket on the queue).
    pub redirect_errors: u64,
    /// Frames cut to fit a UMEM frame.
    pub truncated: u64,
    /// Per-queue counters at the end.
    pub queues: Vec<QueueSummary>,
    /// What ended the capture early, when something outside it did (its interface was
    /// removed) or its output failed (a full disk, a store that gave up); what it had stored
    /// is kept and counted above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a capture whose daemon died while it ran: what the next start recovered of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<Recovery>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a restarted daemon made of a capture its dead predecessor left running.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recovery {
    /// Not done yet (the store was unreachable): tried again until it is.
    pub pending: bool,
    /// Objects made at recovery (the open upload completed, spooled chunks uploaded); they
    /// are also among the summary's outputs, after the objects finished before the death.
    pub objects: Vec<String>,
    /// Frames in the capture's objects, those finished before the death included.
    pub packets_kept: u64,
    /// Frames the capture had taken when its progress was last saved that are in no object
    /// (in memory, or in parts the store never confirmed, when the process died). At least
    /// this many were lost: frames taken after that save are not known.
    pub packets_lost_at_least: u64,
    /// Unfinished multipart uploads of the dead run that were aborted (none of their parts
    /// was confirmed, so they held nothing to keep).
    pub uploads_aborted: usize,
    /// Why recovery failed or is pending.
    pub error: Option<String>,
}

/// One RX queue's counters at the end of a capture.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSummary {
    /// RX queue.
    pub queue: u32,
    /// Frames the XDP program saw on this queue.
    pub xdp_seen: u64,
    /// Frames it redirected to the queue's socket.
    pub xdp_redirected: u64,
    /// Frames a capture wanted but that could not be redirected.
    pub xdp_redirect_errors: u64,
    /// Frames no capture wanted, passed to the network stack.
    pub xdp_passed: u64,
    /// Frames no capture wanted, dropped.
    pub xdp_dropped: u64,
    /// Frames without room for the metadata (not captured; passed or dropped as unmatched).
    pub xdp_meta_errors: u64,
    /// Frames cut to fit a UMEM frame.
    pub xdp_truncated: u64,
    /// Frames the socket dropped (no fill buffer / too long).
    pub xsk_rx_dropped: u64,
    /// Frames the socket dropped because its RX ring was full.
    pub xsk_rx_ring_full: u64,
    /// Frames the writer took off the RX ring.
    pub frames: u64,
    /// Records the writer appended (one per capture that wanted a frame).
    pub records: u64,
    /// Frames the writer dropped: chunk queue full.
    pub drops_queue_full: u64,
    /// Frames the writer dropped: no chunk buffer.
    pub drops_no_buffer: u64,
}

impl QueueSummary {
    /// What changed on the queue from `start` to `end`.
    fn delta(start: &QueueSnapshot, end: &QueueSnapshot) -> Self {
        Self {
            queue: end.queue,
            xdp_seen: end.xdp.seen - start.xdp.seen,
            xdp_redirected: end.xdp.redirected - start.xdp.redirected,
            xdp_redirect_errors: end.xdp.redirect_errors - start.xdp.redirect_errors,
            xdp_passed: end.xdp.passed - start.xdp.passed,
            xdp_dropped: end.xdp.dropped - start.xdp.dropped,
            xdp_meta_errors: end.xdp.meta_errors - start.xdp.meta_errors,
            xdp_truncated: end.xdp.truncated - start.xdp.truncated,
            xsk_rx_dropped: end.xsk.rx_dropped - start.xsk.rx_dropped,
            xsk_rx_ring_full: end.xsk.rx_ring_full - start.xsk.rx_ring_full,
            frames: end.frames - start.frames,
            records: end.records - start.records,
            drops_queue_full: end.drops_queue_full - start.drops_queue_full,
            drops_no_buffer: end.drops_no_buffer - start.drops_no_buffer,
        }
    }
}

/// A PCAP file written as chunks arrive; created with the first chunk. A chunk holds whole
/// records: one that cannot be written whole (a full disk) is cut off again, so the file
/// always ends on a whole record.
struct FileOutput {
    path: PathBuf,
    snaplen: u32,
    file: Option<File>,
    /// Bytes of the file that hold its header and whole records.
    whole: u64,
    packets: u64,
    bytes: u64,
}

impl FileOutput {
    fn write(&mut self, chunk_frames: u32, records: &[u8]) -> Result<(), SessionError> {
        let err = |source| SessionError::Write { path: self.path.clone(), source };
        if self.file.is_none() {
            // Chunks are large already: written as they are, without another copy into a buffer.
            let mut file = File::create(&self.path).map_err(err)?;
            let header = FileHeader { snaplen: self.snaplen, linktype: LINKTYPE_ETHERNET, nanos: true };
            if let Err(source) = file.write_all(&header.encode()) {
                // Not even the header fits: no file rather than one that is not a capture.
                drop(file);
                let _ = std::fs::remove_file(&self.path);
                return Err(err(source));
            }
            self.whole = tapstream_pcap::FILE_HEADER_LEN as u64;
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("created above");
        if let Err(write) = file.write_all(records) {
            // Part of the chunk may be in the file: cut it back to the last whole record (and
            // put the offset there, so that nothing written later leaves a hole).
            let whole = self.whole;
            let cut = file.set_len(whole).and_then(|()| file.seek(std::io::SeekFrom::Start(whole)));
            return Err(match cut {
                Ok(_) => SessionError::Write { path: self.path.clone(), source: write },
                Err(source) => SessionError::Torn { path: self.path.clone(), write, whole, source },
            });
        }
        self.whole += records.len() as u64;
        self.packets += u64::from(chunk_frames);
        self.bytes +=
            records.len() as u64 - u64::from(chunk_frames) * tapstream_pcap::RECORD_HEADER_LEN as u64;
        Ok(())
    }

    fn finish(&mut self) -> Result<Option<PathBuf>, SessionError> {
        let Some(mut file) = self.file.take() else { return Ok(None) };
        let err = |source| SessionError::Write { path: self.path.clone(), source };
        file.flush().map_err(err)?;
        // Regular files are synced; a device such as /dev/null has nothing to sync.
        if file.metadata().map_err(err)?.is_file() {
            file.sync_all().map_err(err)?;
        }
        Ok(Some(self.path.clone()))
    }
}

/// Where a capture's frames go.
pub enum Target {
    /// A local PCAP file.
    File(PathBuf),
    /// Objects in a store; see [`crate::store`].
    Store(StoreTarget),
}

/// How often a capture's progress is published, also while its output makes it wait.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

enum Out {
    File(FileOutput),
    /// `packets` and `bytes` were handed to the output; `lost` of those packets found the
    /// spool full once the store had failed.
    Store {
        output: StoreOutput,
        packets: u64,
        bytes: u64,
        lost: Arc<AtomicU64>,
    },
}

impl Out {
    /// Packets and bytes stored (or on their way to the store).
    fn stored(&self) -> (u64, u64) {
        let (packets, bytes) = self.handed();
        (packets.saturating_sub(self.lost()), bytes)
    }

    /// Packets and bytes handed to the output.
    fn handed(&self) -> (u64, u64) {
        match self {
            Out::File(f) => (f.packets, f.bytes),
            Out::Store { packets, bytes, .. } => (*packets, *bytes),
        }
    }

    /// Packets lost to a full spool while the store was behind or had failed.
    fn lost(&self) -> u64 {
        self.lost_counter().map_or(0, |l| l.load(Ordering::Relaxed))
    }

    /// The counter of [`Self::lost`], which goes on counting while the output finishes.
    fn lost_counter(&self) -> Option<Arc<AtomicU64>> {
        match self {
            Out::File(_) => None,
            Out::Store { lost, .. } => Some(lost.clone()),
        }
    }

    /// Hands a chunk on; the chunk's frames are counted as dropped if that fails. While the
    /// output makes it wait, the capture's progress is still published every
    /// [`PROGRESS_EVERY`] (the writers count drops meanwhile).
    fn write(
        &mut self,
        chunk: Chunk,
        capture: &CaptureShared,
        pool: &ChunkPool,
        progress: &Mutex<Progress>,
        started: Instant,
    ) -> Result<(), SessionError> {
        let frames = u64::from(chunk.frames);
        match self {
            Out::File(file) => {
                let result = file.write(chunk.frames, &chunk.data);
                if result.is_err() {
                    capture.count_dropped(frames);
                }
                pool.put(chunk.data);
                result
            }
            Out::Store { output, packets, bytes, lost } => {
                let data = chunk.data.len() as u64 - frames * tapstream_pcap::RECORD_HEADER_LEN as u64;
                let waiting = || {
                    let lost = lost.load(Ordering::Relaxed);
                    publish(
                        progress,
                        (packets.saturating_sub(lost), *bytes),
                        started,
                        capture.dropped() + lost,
                    );
                };
                match output.write(chunk, PROGRESS_EVERY, waiting) {
                    Ok(()) => {
                        *packets += frames;
                        *bytes += data;
                        Ok(())
                    }
                    Err(chunk) => {
                        capture.count_dropped(frames);
                        pool.put(chunk.data);
                        Err(SessionError::UploadStopped)
                    }
                }
            }
        }
    }

    /// Finishes the output: the file synced, or every object complete. Returns where the
    /// capture is stored.
    fn finish(self) -> Result<(u64, u64, Vec<String>), SessionError> {
        match self {
            Out::File(mut file) => {
                let stored = file.finish()?;
                Ok((file.packets, file.bytes, stored.iter().map(|p| p.display().to_string()).collect()))
            }
            Out::Store { output, packets, bytes, lost } => {
                let outputs = output.finish()?;
                Ok((packets.saturating_sub(lost.load(Ordering::Relaxed)), bytes, outputs))
            }
        }
    }
}

/// How far a running capture has got; updated about every 200 ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Frames handed to the output.
    pub packets: u64,
    /// Their bytes (after snaplen).
    pub bytes: u64,
    /// Seconds since the start.
    pub elapsed_secs: f64,
    /// Frames of this capture lost: in the writers, to a failed output, or to a full spool
    /// once the store had failed.
    pub dropped: u64,
}

/// Publishes a capture's progress.
fn publish(progress: &Mutex<Progress>, (packets, bytes): (u64, u64), started: Instant, dropped: u64) {
    let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
    *p = Progress { packets, bytes, elapsed_secs: started.elapsed().as_secs_f64(), dropped };
}

/// Called once with a capture's outcome.
pub type OnDone = Box<dyn FnOnce(Result<CaptureSummary, SessionError>) + Send>;

/// A capture to start on an interface.
pub struct CaptureOrder {
    /// What to capture.
    pub spec: CaptureSpec,
    /// When to stop.
    pub limits: Limits,
    /// Where the frames go.
    pub target: Target,
    /// Receives the outcome, from a thread of its own once the output is finished.
    pub on_done: OnDone,
}

enum ServiceCommand {
    Start {
        order: CaptureOrder,
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
struct Active {
    capture: Arc<CaptureShared>,
    slot: usize,
    out: Out,
    started: Instant,
    started_tai: u64,
    /// Counters when it started: its summary reports what changed while it ran.
    start_counters: Vec<QueueSnapshot>,
    reason: Option<StopReason>,
    failure: Option<SessionError>,
    /// What ended it from outside (its interface removed), for its summary.
    cause: Option<String>,
    done_queues: u32,
    progress: Arc<Mutex<Progress>>,
    on_done: Option<OnDone>,
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

    fn spawn(config: InterfaceConfig, runtime: Option<InterfaceRuntime>) -> Result<Self, SessionError> {
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
        self.commands.send(ServiceCommand::Start { order, reply }).map_err(|_| SessionError::ServiceGone)?;
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

    fn stop_all(&mut self, reason: StopReason) {
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
fn serve(
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
fn wait_for_device(
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
enum Ended {
    /// Told to stop: every capture has ended.
    Shutdown,
    /// The device was removed: every capture on it has ended.
    Removed,
}

struct Service {
    runtime: InterfaceRuntime,
    commands: crossbeam_channel::Receiver<ServiceCommand>,
    active: Vec<Active>,
    /// The device was removed: captures are refused, the running ones end.
    removed: bool,
}

impl Service {
    /// Runs captures on the interface until told to stop or until its device is removed, and
    /// then until every capture has ended; the threads finishing their outputs are added to
    /// `finishing`.
    fn run(&mut self, finishing: &mut Vec<std::thread::JoinHandle<()>>, attached: &AtomicBool) -> Ended {
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
                            self.start(order)
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
            match self.runtime.outputs().recv_timeout(Duration::from_millis(20)) {
                Ok(Output::Chunk(chunk)) => self.dispatch(chunk),
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
    fn device_gone(&self) -> bool {
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
    fn device_removed(&mut self, attached: &AtomicBool) {
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

    fn start(&mut self, order: CaptureOrder) -> Result<Arc<Mutex<Progress>>, SessionError> {
        let capture = CaptureShared::new(order.spec, order.limits);
        let header =
            FileHeader { snaplen: capture.spec.snaplen, linktype: LINKTYPE_ETHERNET, nanos: true }.encode();
        let out = match order.target {
            Target::File(path) => Out::File(FileOutput {
                path,
                snaplen: capture.spec.snaplen,
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
        let slot = self.runtime.start_capture(capture.clone())?;
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
        });
        Ok(progress)
    }

    fn dispatch(&mut self, chunk: Chunk) {
        let pool = self.runtime.pool().clone();
        let Some(a) = self.active.iter_mut().find(|a| Arc::ptr_eq(&a.capture, &chunk.capture)) else {
            // Its capture has finished: nothing wants it (never expected).
            chunk.capture.count_dropped(u64::from(chunk.frames));
            pool.put(chunk.data);
            return;
        };
        if a.failure.is_some() {
            a.capture.count_dropped(u64::from(chunk.frames));
            pool.put(chunk.data);
            return;
        }
        if let Err(e) = a.out.write(chunk, &a.capture, &pool, &a.progress, a.started) {
            log::error!("capture {}: {}", a.capture.spec.id, crate::report::chain(&e));
            a.failure = Some(e);
        }
    }

    /// Ends the captures `which` selects with `reason` (if still running).
    fn end(&mut self, which: impl Fn(&Active) -> bool, reason: StopReason) {
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

    fn check_limits(&mut self) {
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
    fn finish_done(&mut self) -> Vec<std::thread::JoinHandle<()>> {
        let queues = self.runtime.queues();
        let mut threads = Vec::new();
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].done_queues < queues {
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
    fn publish_progress(&self) {
        publish(&self.progress, self.out.stored(), self.started, self.capture.dropped() + self.out.lost());
    }
}

/// Runs one capture on `config.interface` until a limit is reached or `stop` is triggered
/// (then it ends as stopped, its output finished), into `target` (the one-shot `tapstream
/// capture`). `progress` is called about every 200 ms.
pub fn run_capture(
    config: InterfaceConfig,
    spec: CaptureSpec,
    limits: Limits,
    target: Target,
    stop: &Shutdown,
    mut progress: impl FnMut(&Progress),
) -> Result<CaptureSummary, SessionError> {
    let service = InterfaceService::start(config)?;
    let id = spec.id.clone();
    let (done_tx, done) = crossbeam_channel::bounded(1);
    let on_done: OnDone = Box::new(move |result| {
        let _ = done_tx.send(result);
    });
    let shared = service.start_capture(CaptureOrder { spec, limits, target, on_done })?;
    log::info!("capturing on {}", service.interface());
    let mut stopping = false;
    let result = loop {
        match done.recv_timeout(Duration::from_millis(200)) {
            Ok(result) => break result,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break Err(SessionError::ServiceGone),
        }
        if !stopping && stop.is_set() {
            stopping = true;
            service.stop_capture(&id, StopReason::Stopped);
        }
        progress(&shared.lock().unwrap_or_else(|e| e.into_inner()));
    };
    service.shutdown(StopReason::Stopped);
    result
}

/// The limit that ends the capture now, if any.
fn check_limits(
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
