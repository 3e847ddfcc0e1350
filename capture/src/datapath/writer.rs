//! Writers: one thread per RX queue, pinned to a core, turning received frames into PCAP
//! chunks.
//!
//! A writer owns its queue's AF_XDP socket. For each frame it reads the capture mask from the
//! XDP metadata and appends a record to the open chunk of every running capture in the mask,
//! cut to that capture's snaplen, with the kernel's receive time converted to wall-clock time
//! ([`crate::datapath::clock`]). Full chunks (and chunks older than `flush_after`) go to the next stage
//! through a bounded channel. The writer never blocks its ring: a chunk that cannot be queued
//! waits in the writer, and frames for that capture are dropped and counted meanwhile; frames
//! for which no chunk buffer is free are dropped and counted too.
//!
//! On an interface that keeps a history, the writer also appends the frames the recorder's
//! slot marks to its recording chunk ([`crate::datapath::lookback`]), and a capture with a
//! lookback starts at a seam: the history before it, the live frames after.
//!
//! Nothing on the per-frame path allocates or takes a lock: chunk buffers come from the
//! preallocated [`ChunkPool`], the channel is a lock-free array queue, and statistics are
//! published once per batch.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use capture_common::MAX_CAPTURES;
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::{
    datapath::capture::CaptureShared,
    datapath::chunk::{Chunk, ChunkPool},
    datapath::clock::TaiClock,
    datapath::lookback::{QueueRecording, RECORDER_SLOT},
    datapath::xsk::{XskSocket, XskStats},
    metrics::WriterMetrics,
};

/// How a writer runs.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Core to pin the thread to; `None` leaves it unpinned.
    pub core: Option<usize>,
    /// Most frames taken off the ring at once.
    pub batch: u32,
    /// A chunk older than this is handed on even if not full, so recent traffic is readable.
    pub flush_after: Duration,
    /// After a small batch, sleep this long so frames accumulate (fewer wakeups per frame);
    /// zero disables.
    pub coalesce: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            core: None,
            batch: 256,
            flush_after: Duration::from_secs(1),
            coalesce: Duration::from_millis(1),
        }
    }
}

/// Orders for a writer.
pub enum WriterCommand {
    /// Start appending frames whose mask has bit `slot` to `capture`; `started` is signalled
    /// once the writer takes such frames, so the XDP program is told to mark frames only then.
    /// A capture with a lookback also has `seam`: the generation of the filter program that
    /// marks it (see [`capture_common::FrameMeta::generation`]) and the time its history
    /// begins (ns since the Unix epoch).
    Start { slot: usize, capture: Arc<CaptureShared>, started: Sender<()>, seam: Option<(u32, u64)> },
    /// Stop the capture in `slot`: hand on its open chunk, then send [`Output::Done`].
    Stop { slot: usize },
    /// The device is gone, so nothing more arrives: take every frame still on the ring now,
    /// before the commands that follow (the captures' stops) are applied.
    Drain,
}

/// What writers hand to the next stage.
pub enum Output {
    /// A chunk of records.
    Chunk(Chunk),
    /// This queue has handed on every chunk of the capture.
    Done { capture: Arc<CaptureShared>, queue: u32 },
    /// Records from the interface's history for a capture with a lookback (they come before
    /// the capture's live chunks of the same queue).
    History(Chunk),
    /// The history of `queue` for `capture` is complete: `frames` records were sent;
    /// `oldest_ns` is the oldest frame the history held for the queue (`None`: none).
    HistoryDone { capture: Arc<CaptureShared>, queue: u32, frames: u64, oldest_ns: Option<u64> },
}

/// Counters of one writer, readable while it runs.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Frames taken off the RX ring.
    pub frames: AtomicU64,
    /// Bytes of those frames.
    pub bytes: AtomicU64,
    /// Records appended to chunks.
    pub records: AtomicU64,
    /// Frames dropped because a chunk could not be queued.
    pub drops_queue_full: AtomicU64,
    /// Frames dropped because no chunk buffer was free.
    pub drops_no_buffer: AtomicU64,
    /// Descriptors outside the UMEM (never expected).
    pub invalid_descs: AtomicU64,
    /// The socket's kernel counters at the last sample.
    pub kernel: std::sync::Mutex<XskStats>,
}

/// A running writer.
pub struct Writer {
    queue: u32,
    commands: Sender<WriterCommand>,
    stats: Arc<QueueStats>,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<XskSocket>>,
}

impl Writer {
    /// Starts the writer thread for `socket`.
    pub fn spawn(
        socket: XskSocket,
        config: WriterConfig,
        output: Sender<Output>,
        pool: Arc<ChunkPool>,
        recording: Option<QueueRecording>,
    ) -> std::io::Result<Self> {
        let queue = socket.queue();
        let (commands, command_rx) = crossbeam_channel::unbounded();
        let stats = Arc::new(QueueStats::default());
        let shutdown = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name(format!("tapstream-q{queue}")).spawn({
            let stats = stats.clone();
            let shutdown = shutdown.clone();
            move || {
                if let Some(core) = config.core {
                    match crate::sys::pin_to_core(core) {
                        Ok(()) => log::info!("writer for queue {queue} pinned to core {core}"),
                        Err(e) => log::warn!("writer for queue {queue}: cannot pin to core {core}: {e}"),
                    }
                }
                let mut state = WriterState {
                    metrics: WriterMetrics::new(socket.queue()),
                    socket,
                    config,
                    output,
                    pool,
                    stats,
                    commands: command_rx,
                    slots: (0..MAX_CAPTURES).map(|_| None).collect(),
                    active: 0,
                    present: 0,
                    pending: 0,
                    recording,
                    clock: TaiClock::measure(),
                };
                state.run(&shutdown);
                state.socket
            }
        })?;
        Ok(Self { queue, commands, stats, shutdown, thread: Some(thread) })
    }

    /// The RX queue.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// The writer's counters.
    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    /// Sends an order; false if the writer has exited.
    pub fn command(&self, command: WriterCommand) -> bool {
        self.commands.send(command).is_ok()
    }

    /// Asks the writer to hand on everything and exit, waits for it, and returns its socket
    /// (for final statistics). Running captures get their chunks and `Done` sent first.
    pub fn stop(mut self) -> Option<XskSocket> {
        self.shutdown.store(true, Ordering::Release);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One capture as a writer sees it.
struct Slot {
    capture: Arc<CaptureShared>,
    snaplen: u32,
    counted: bool,
    open: Option<Chunk>,
    /// Chunks (at most a few) waiting for room in the output channel, oldest first.
    waiting: VecDeque<Chunk>,
    seq: u64,
    stopping: bool,
    done_sent: bool,
    /// For a capture with a lookback: the generation of the program that marks it. Until a
    /// frame of that generation comes, recorded frames its filter accepts are its too.
    live_from: u32,
}

impl Slot {
    fn new(capture: Arc<CaptureShared>) -> Self {
        Self {
            counted: capture.is_counted_by_writers(),
            snaplen: capture.spec.snaplen,
            capture,
            open: None,
            // A full chunk, a flushed one and the last one at stop: never more than this.
            waiting: VecDeque::with_capacity(4),
            seq: 0,
            stopping: false,
            done_sent: false,
            live_from: 0,
        }
    }
}

struct WriterState {
    socket: XskSocket,
    config: WriterConfig,
    output: Sender<Output>,
    pool: Arc<ChunkPool>,
    stats: Arc<QueueStats>,
    commands: Receiver<WriterCommand>,
    slots: Vec<Option<Slot>>,
    /// Slots that take frames (started, not stopping).
    active: u64,
    /// Slots that exist (including stopping ones with chunks left to hand on).
    present: u64,
    /// Slots with a lookback whose filter program is not yet in force for every frame.
    pending: u64,
    /// This queue's side of the interface's history, if it keeps one.
    recording: Option<QueueRecording>,
    clock: TaiClock,
    metrics: WriterMetrics,
}

/// Counts of one batch, published to the shared counters after it.
#[derive(Default)]
struct BatchCounts {
    bytes: u64,
    records: u64,
    drops_queue_full: u64,
    drops_no_buffer: u64,
    chunks: u64,
    /// Captures that got a frame in this batch, and the latest receive time seen.
    seen_mask: u64,
    last_tai_ns: u64,
}

impl WriterState {
    fn run(&mut self, shutdown: &AtomicBool) {
        let mut last_tick = Instant::now();
        let mut shutting_down = false;
        let mut deadline = None;
        loop {
            while let Ok(command) = self.commands.try_recv() {
                self.apply(command);
            }
            if !shutting_down && shutdown.load(Ordering::Acquire) {
                shutting_down = true;
                deadline = Some(Instant::now() + Duration::from_secs(10));
                for slot in 0..MAX_CAPTURES {
                    self.apply(WriterCommand::Stop { slot });
                }
            }
            let n = self.receive_batch();
            let now = Instant::now();
            self.hand_on(now);
            if now.duration_since(last_tick) >= Duration::from_secs(1) {
                last_tick = now;
                self.clock = TaiClock::measure();
                *self.stats.kernel.lock().unwrap_or_else(|e| e.into_inner()) = self.socket.stats();
            }
            if shutting_down {
                if self.present == 0 {
                    break;
                }
                if deadline.is_some_and(|d| now > d) {
                    self.abandon();
                    break;
                }
            }
            if n == 0 {
                let timeout = if self.present != 0 { 10 } else { 100 };
                self.socket.wait(timeout);
            } else if n < self.config.batch / 2 && !self.config.coalesce.is_zero() {
                std::thread::sleep(self.config.coalesce);
            }
        }
        *self.stats.kernel.lock().unwrap_or_else(|e| e.into_inner()) = self.socket.stats();
    }

    fn apply(&mut self, command: WriterCommand) {
        match command {
            WriterCommand::Start { slot, capture, started, seam } => {
                if slot >= MAX_CAPTURES {
                    log::error!("capture slot {slot} out of range");
                    return;
                }
                let mut new = Slot::new(capture.clone());
                if let Some((live_from, since_ns)) = seam {
                    // The seam: what this writer handled so far is history.
                    let asked = self.recording.as_mut().is_some_and(|r| r.replay(capture.clone(), since_ns));
                    if !asked {
                        log::error!(
                            "queue {}: no history for capture {} (the recorder is behind)",
                            self.socket.queue(),
                            capture.spec.id
                        );
                        let done = Output::HistoryDone {
                            capture,
                            queue: self.socket.queue(),
                            frames: 0,
                            oldest_ns: None,
                        };
                        let _ = self.output.send_timeout(done, Duration::from_secs(5));
                    }
                    new.live_from = live_from;
                    self.pending |= 1 << slot;
                }
                self.slots[slot] = Some(new);
                self.active |= 1 << slot;
                self.present |= 1 << slot;
                let _ = started.send(());
            }
            WriterCommand::Stop { slot } => {
                if let Some(s) = self.slots.get_mut(slot).and_then(Option::as_mut)
                    && !s.stopping
                {
                    s.stopping = true;
                    self.pending &= !(1 << slot);
                    if let Some(chunk) = s.open.take().filter(|c| !c.is_empty()) {
                        s.waiting.push_back(chunk);
                    }
                    self.active &= !(1 << slot);
                }
            }
            WriterCommand::Drain => {
                // A batch that comes back short has emptied the ring.
                while self.receive_batch() >= self.config.batch.max(1) {}
            }
        }
    }

    /// Takes up to one batch off the ring and appends it; returns the number of frames.
    fn receive_batch(&mut self) -> u32 {
        let mut counts = BatchCounts::default();
        let active = self.active;
        let clock = self.clock;
        let queue = self.socket.queue();
        let slots = &mut self.slots;
        let pool = &self.pool;
        let output = &self.output;
        let pending = self.pending;
        let mut in_force = 0u64;
        let recording = &mut self.recording;
        let (n, invalid) = self.socket.receive(self.config.batch, |meta, frame| {
            counts.bytes += frame.len() as u64;
            let recorded = meta.mask & 1 << RECORDER_SLOT != 0;
            let mut mask = meta.mask & active;
            if pending != 0 {
                in_force |= seam_frame(pending, slots, meta, frame, recorded, &mut mask);
            }
            if mask == 0 && !recorded {
                return;
            }
            let ts = clock.to_unix_ns(meta.rx_tai_ns);
            if recorded && let Some(recording) = recording.as_mut() {
                recording.record(ts, meta.orig_len, frame);
            }
            if mask == 0 {
                return;
            }
            counts.seen_mask |= mask;
            counts.last_tai_ns = counts.last_tai_ns.max(meta.rx_tai_ns);
            while mask != 0 {
                let bit = mask.trailing_zeros() as usize;
                mask &= mask - 1;
                if let Some(slot) = slots[bit].as_mut() {
                    append(slot, queue, ts, meta.orig_len, frame, pool, output, &mut counts);
                }
            }
        });
        self.pending &= !in_force;
        if let Some(recording) = self.recording.as_mut() {
            recording.publish();
        }
        let mut seen = counts.seen_mask;
        while seen != 0 {
            let bit = seen.trailing_zeros() as usize;
            seen &= seen - 1;
            if let Some(slot) = self.slots[bit].as_ref() {
                slot.capture.saw_frame(counts.last_tai_ns);
            }
        }
        if n > 0 {
            let s = &self.stats;
            s.frames.fetch_add(u64::from(n), Ordering::Relaxed);
            s.bytes.fetch_add(counts.bytes, Ordering::Relaxed);
            s.records.fetch_add(counts.records, Ordering::Relaxed);
            s.drops_queue_full.fetch_add(counts.drops_queue_full, Ordering::Relaxed);
            s.drops_no_buffer.fetch_add(counts.drops_no_buffer, Ordering::Relaxed);
            s.invalid_descs.fetch_add(u64::from(invalid), Ordering::Relaxed);
            let m = &self.metrics;
            m.frames.increment(u64::from(n));
            m.bytes.increment(counts.bytes);
            m.records.increment(counts.records);
            m.drops_queue_full.increment(counts.drops_queue_full);
            m.drops_no_buffer.increment(counts.drops_no_buffer);
            m.chunks.increment(counts.chunks);
        }
        n
    }

    /// Hands on waiting chunks, chunks older than `flush_after`, and `Done` for stopped
    /// captures whose chunks are all handed on.
    fn hand_on(&mut self, now: Instant) {
        let mut present = self.present;
        let mut counts = BatchCounts::default();
        while present != 0 {
            let bit = present.trailing_zeros() as usize;
            present &= present - 1;
            let Some(slot) = self.slots[bit].as_mut() else { continue };
            if let Some(open) = &slot.open
                && !open.is_empty()
                && now.duration_since(open.opened) >= self.config.flush_after
                && slot.waiting.is_empty()
            {
                let chunk = slot.open.take().expect("checked above");
                slot.waiting.push_back(chunk);
            }
            send_waiting(slot, &self.output, &self.pool, &mut counts);
            if slot.stopping && slot.waiting.is_empty() && !slot.done_sent {
                // The capture's summary reads the socket's counters once every queue is done.
                *self.stats.kernel.lock().unwrap_or_else(|e| e.into_inner()) = self.socket.stats();
                let done = Output::Done { capture: slot.capture.clone(), queue: self.socket.queue() };
                match self.output.try_send(done) {
                    Ok(()) | Err(TrySendError::Disconnected(_)) => slot.done_sent = true,
                    Err(TrySendError::Full(_)) => {}
                }
            }
            if slot.done_sent {
                self.slots[bit] = None;
                self.present &= !(1 << bit);
            }
        }
        self.metrics.chunks.increment(counts.chunks);
        self.metrics.drops_queue_full.increment(counts.drops_queue_full);
        self.stats.drops_queue_full.fetch_add(counts.drops_queue_full, Ordering::Relaxed);
    }

    /// Gives up on chunks that could not be handed on before the shutdown deadline, counting
    /// their frames as dropped.
    fn abandon(&mut self) {
        for slot in self.slots.iter_mut().filter_map(Option::take) {
            let lost: u64 = slot.waiting.iter().chain(slot.open.iter()).map(|c| u64::from(c.frames)).sum();
            if lost > 0 {
                log::error!(
                    "queue {}: {lost} frames of capture {} not handed on before shutdown",
                    self.socket.queue(),
                    slot.capture.spec.id
                );
                slot.capture.count_dropped(lost);
                self.stats.drops_queue_full.fetch_add(lost, Ordering::Relaxed);
            }
        }
        self.present = 0;
    }
}

/// For a frame that may have been marked before the filter program of a capture with a
/// lookback was in force: adds to `mask` each such capture whose filter accepts the frame,
/// if the recorder has it (else it is in neither the history nor the capture: the seam is
/// exact for the frames the history keeps). Returns the slots whose program is in force
/// (the frame's generation is theirs or later).
#[inline]
fn seam_frame(
    pending: u64,
    slots: &[Option<Slot>],
    meta: &capture_common::FrameMeta,
    frame: &[u8],
    recorded: bool,
    mask: &mut u64,
) -> u64 {
    let mut in_force = 0;
    let mut bits = pending;
    while bits != 0 {
        let bit = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        let Some(slot) = slots[bit].as_ref() else { continue };
        // Generations wrap: before means behind by less than half the range.
        if (meta.generation.wrapping_sub(slot.live_from) as i32) >= 0 {
            in_force |= 1 << bit;
        } else if recorded
            && *mask & 1 << bit == 0
            && slot.capture.spec.filter.as_ref().is_none_or(|f| f.matches(frame, meta.orig_len))
        {
            *mask |= 1 << bit;
        }
    }
    in_force
}

/// Appends one frame to a slot's open chunk, handing on a full chunk and taking a fresh buffer
/// as needed. Dropped frames are counted.
#[expect(clippy::too_many_arguments, reason = "the per-frame path passes borrowed state, not a struct")]
#[inline]
fn append(
    slot: &mut Slot,
    queue: u32,
    ts: u64,
    orig_len: u32,
    frame: &[u8],
    pool: &ChunkPool,
    output: &Sender<Output>,
    counts: &mut BatchCounts,
) {
    let stored = frame.len().min(slot.snaplen as usize);
    if slot.counted && !slot.capture.admit(stored as u64) {
        // Beyond the capture's packet or byte limit: not stored, not a loss.
        return;
    }
    let need = Chunk::record_len(frame.len(), slot.snaplen);
    if slot.open.as_ref().is_some_and(|c| !c.fits(need)) {
        let full = slot.open.take().expect("checked above");
        slot.waiting.push_back(full);
    }
    // Chunks waiting for the channel go first, in order.
    send_waiting(slot, output, pool, counts);
    if slot.open.is_none() {
        if !slot.waiting.is_empty() {
            slot.capture.count_dropped(1);
            counts.drops_queue_full += 1;
            return;
        }
        let Some(buf) = pool.take() else {
            slot.capture.count_dropped(1);
            counts.drops_no_buffer += 1;
            return;
        };
        slot.open = Some(Chunk::new(slot.capture.clone(), queue, slot.seq, buf));
        slot.seq += 1;
    }
    let chunk = slot.open.as_mut().expect("opened above");
    chunk.append(ts, orig_len, frame, slot.snaplen);
    counts.records += 1;
}

/// Sends a slot's waiting chunks, oldest first, until the channel is full. If the next stage
/// is gone, the chunks' frames are counted as dropped and their buffers go back to the pool.
#[inline]
fn send_waiting(slot: &mut Slot, output: &Sender<Output>, pool: &ChunkPool, counts: &mut BatchCounts) {
    while let Some(chunk) = slot.waiting.pop_front() {
        match output.try_send(Output::Chunk(chunk)) {
            Ok(()) => counts.chunks += 1,
            Err(TrySendError::Full(Output::Chunk(chunk))) => {
                slot.waiting.push_front(chunk);
                break;
            }
            Err(TrySendError::Disconnected(Output::Chunk(chunk))) => {
                slot.capture.count_dropped(u64::from(chunk.frames));
                counts.drops_queue_full += u64::from(chunk.frames);
                pool.put(chunk.data);
            }
            Err(_) => unreachable!("a chunk was sent"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::capture::{CaptureSpec, Limits};

    /// The per-frame path (limit check, record append, chunk hand-over, a fresh buffer from the
    /// pool, drops when the channel or the pool is exhausted) allocates nothing.
    #[test]
    fn the_per_frame_path_does_not_allocate() {
        let pool = ChunkPool::new(4, 64 * 1024);
        let (output, received) = crossbeam_channel::bounded(2);
        let spec = CaptureSpec { snaplen: 1000, ..CaptureSpec::default() };
        let capture = CaptureShared::new(spec, Limits { packets: Some(1_000_000), ..Limits::default() });
        let mut slot = Slot::new(capture.clone());
        let frames: Vec<Vec<u8>> = (0..20_000).map(|i| vec![i as u8; 60 + (i * 37) % 1455]).collect();
        let mut counts = BatchCounts::default();

        let allocations = crate::sys::alloc_count::count(|| {
            for (i, frame) in frames.iter().enumerate() {
                let ts = 1_700_000_000_000_000_000 + i as u64;
                append(&mut slot, 0, ts, frame.len() as u32, frame, &pool, &output, &mut counts);
                if i == 10_000 {
                    // The next stage catches up once: buffers come back to the pool.
                    while let Ok(Output::Chunk(chunk)) = received.try_recv() {
                        pool.put(chunk.data);
                    }
                }
            }
        });

        assert_eq!(allocations, 0, "the per-frame path allocated");
        // The run exercised every branch: chunks handed on, then frames dropped and counted.
        assert!(counts.chunks >= 4, "chunks handed on: {}", counts.chunks);
        assert!(counts.records > 100, "records: {}", counts.records);
        assert!(counts.drops_queue_full + counts.drops_no_buffer > 1000, "drops were exercised");
        assert_eq!(counts.records + counts.drops_queue_full + counts.drops_no_buffer, frames.len() as u64);
        assert_eq!(capture.dropped(), counts.drops_queue_full + counts.drops_no_buffer);
    }
}
