//! A capture session: one capture on one interface, run until its first limit, its chunks
//! written to a local PCAP file. This is the one-shot `tapstream capture --write FILE`.

use std::{
    fs::File,
    io::Write as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tapstream_pcap::{FileHeader, LINKTYPE_ETHERNET};

use crate::{
    capture::{CaptureShared, CaptureSpec, Limits, StopReason},
    clock::TaiClock,
    pipeline::{InterfaceConfig, InterfaceRuntime, PipelineError, QueueSnapshot},
    upload::stream::StoreOutput,
    writer::Output,
};

/// Errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("upload failed")]
    Upload(#[from] crate::upload::UploadError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a finished capture reports.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
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
    /// Frames of this capture lost in the writers (chunk queue full or no buffer).
    pub dropped_writer: u64,
    /// Frames the AF_XDP sockets lost (all captures; kernel counters).
    pub dropped_kernel: u64,
    /// Frames a capture wanted that could not be redirected (no socket on the queue).
    pub redirect_errors: u64,
    /// Frames cut to fit a UMEM frame.
    pub truncated: u64,
    /// Per-queue counters at the end.
    pub queues: Vec<QueueSummary>,
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

impl From<&QueueSnapshot> for QueueSummary {
    fn from(q: &QueueSnapshot) -> Self {
        Self {
            queue: q.queue,
            xdp_seen: q.xdp.seen,
            xdp_redirected: q.xdp.redirected,
            xdp_redirect_errors: q.xdp.redirect_errors,
            xdp_passed: q.xdp.passed,
            xdp_dropped: q.xdp.dropped,
            xdp_meta_errors: q.xdp.meta_errors,
            xdp_truncated: q.xdp.truncated,
            xsk_rx_dropped: q.xsk.rx_dropped,
            xsk_rx_ring_full: q.xsk.rx_ring_full,
            frames: q.frames,
            records: q.records,
            drops_queue_full: q.drops_queue_full,
            drops_no_buffer: q.drops_no_buffer,
        }
    }
}

/// A PCAP file written as chunks arrive; created with the first chunk.
struct FileOutput {
    path: PathBuf,
    snaplen: u32,
    file: Option<File>,
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
            file.write_all(&header.encode()).map_err(err)?;
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("created above");
        file.write_all(records).map_err(|source| SessionError::Write { path: self.path.clone(), source })?;
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
    /// Objects in a store; see [`crate::upload`].
    Store(StoreTarget),
}

/// Starts a store output, given the chunk pool and the PCAP file header objects begin with.
pub type StartStore =
    Box<dyn FnOnce(Arc<crate::chunk::ChunkPool>, &[u8]) -> Result<StoreOutput, crate::upload::UploadError>>;

/// A store target, started when the capture starts.
pub struct StoreTarget {
    /// Starts the output, given the chunk pool and the PCAP file header objects begin with.
    pub start: StartStore,
}

enum Out {
    File(FileOutput),
    Store { output: StoreOutput, packets: u64, bytes: u64 },
}

/// Runs one capture on `config.interface` until a limit is reached or `stop` is set, into
/// `target`. `progress` is called about every 200 ms with (packets, bytes, elapsed).
pub fn run_capture(
    config: InterfaceConfig,
    spec: CaptureSpec,
    limits: Limits,
    target: Target,
    stop: &AtomicBool,
    mut progress: impl FnMut(u64, u64, Duration),
) -> Result<CaptureSummary, SessionError> {
    let mut runtime = InterfaceRuntime::start(config)?;
    let capture = CaptureShared::new(spec, limits);
    let queues = runtime.queues();
    let pool = runtime.pool().clone();
    let header =
        FileHeader { snaplen: capture.spec.snaplen, linktype: LINKTYPE_ETHERNET, nanos: true }.encode();
    let (mut out, description) = match target {
        Target::File(path) => {
            let d = path.display().to_string();
            (
                Out::File(FileOutput {
                    path,
                    snaplen: capture.spec.snaplen,
                    file: None,
                    packets: 0,
                    bytes: 0,
                }),
                d,
            )
        }
        Target::Store(store) => (
            Out::Store { output: (store.start)(pool.clone(), &header)?, packets: 0, bytes: 0 },
            "the store".into(),
        ),
    };
    let started = Instant::now();
    let started_tai = TaiClock::now_tai_ns();
    let slot = runtime.start_capture(capture.clone())?;
    log::info!("capturing on {} into {description}", runtime.interface());
    metrics::gauge!(crate::metrics::CAPTURES_ACTIVE).increment(1.0);
    let mut reason = None;
    let mut done_queues = 0;
    let mut last_progress = Instant::now();
    let outputs = runtime.outputs().clone();
    let mut failure = None;
    while done_queues < queues {
        match outputs.recv_timeout(Duration::from_millis(20)) {
            Ok(Output::Chunk(chunk)) => {
                let frames = u64::from(chunk.frames);
                match &mut out {
                    _ if failure.is_some() => {
                        capture.count_dropped(frames);
                        pool.put(chunk.data);
                    }
                    Out::File(file) => {
                        if let Err(e) = file.write(chunk.frames, &chunk.data) {
                            capture.count_dropped(frames);
                            failure = Some(e);
                            reason.get_or_insert(StopReason::Error);
                        }
                        pool.put(chunk.data);
                    }
                    Out::Store { output, packets, bytes } => {
                        let data =
                            chunk.data.len() as u64 - frames * tapstream_pcap::RECORD_HEADER_LEN as u64;
                        match output.write(chunk) {
                            Ok(()) => {
                                *packets += frames;
                                *bytes += data;
                            }
                            Err(chunk) => {
                                capture.count_dropped(frames);
                                pool.put(chunk.data);
                                reason.get_or_insert(StopReason::Error);
                            }
                        }
                    }
                }
            }
            Ok(Output::Done { capture: done, .. }) if Arc::ptr_eq(&done, &capture) => done_queues += 1,
            Ok(Output::Done { .. }) => {}
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                log::error!("every writer has stopped");
                reason.get_or_insert(StopReason::Error);
                break;
            }
        }
        if reason.is_none() {
            if matches!(&out, Out::Store { output, .. } if output.has_failed()) {
                log::error!("the upload has stopped; ending the capture");
                reason = Some(StopReason::Error);
            } else {
                reason = check_limits(&capture, &limits, started, started_tai, stop);
            }
            if reason.is_some() {
                runtime.stop_capture(slot)?;
            }
        }
        if last_progress.elapsed() >= Duration::from_millis(200) {
            last_progress = Instant::now();
            let (p, b) = match &out {
                Out::File(f) => (f.packets, f.bytes),
                Out::Store { packets, bytes, .. } => (*packets, *bytes),
            };
            progress(p, b, started.elapsed());
            let _ = runtime.snapshot();
        }
    }
    let elapsed = started.elapsed();
    metrics::gauge!(crate::metrics::CAPTURES_ACTIVE).decrement(1.0);
    let ended = reason.unwrap_or(StopReason::Stopped);
    metrics::counter!(crate::metrics::CAPTURES_ENDED, "reason" => ended.as_str()).increment(1);
    let interface = runtime.interface().to_owned();
    let (queues, _) = runtime.shutdown();
    if let Some(e) = failure {
        return Err(e);
    }
    let (packets, bytes, stored) = match out {
        Out::File(mut file) => {
            let stored = file.finish()?;
            (file.packets, file.bytes, stored.iter().map(|p| p.display().to_string()).collect())
        }
        Out::Store { output, packets, bytes } => (packets, bytes, output.finish()?),
    };
    Ok(CaptureSummary {
        id: capture.spec.id.clone(),
        interface,
        stop_reason: reason.unwrap_or(StopReason::Stopped),
        packets,
        bytes,
        elapsed_secs: elapsed.as_secs_f64(),
        outputs: stored,
        dropped_writer: capture.dropped(),
        dropped_kernel: queues.iter().map(|q| q.xsk.rx_dropped + q.xsk.rx_ring_full).sum(),
        redirect_errors: queues.iter().map(|q| q.xdp.redirect_errors).sum(),
        truncated: queues.iter().map(|q| q.xdp.truncated).sum(),
        queues: queues.iter().map(QueueSummary::from).collect(),
    })
}

/// The limit that ends the capture now, if any.
fn check_limits(
    capture: &CaptureShared,
    limits: &Limits,
    started: Instant,
    started_tai: u64,
    stop: &AtomicBool,
) -> Option<StopReason> {
    if let Some(reason) = capture.limit_reached() {
        return Some(reason);
    }
    if stop.load(Ordering::Relaxed) {
        return Some(StopReason::Stopped);
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
