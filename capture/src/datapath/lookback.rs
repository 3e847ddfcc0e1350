//! Lookback: a rolling history of an interface's recent frames, from which a capture starts
//! in the past and continues live.
//!
//! The recorder takes one capture slot of the interface ([`RECORDER_SLOT`]): the XDP program
//! marks the frames it wants (its own filter, default every frame), and each writer appends
//! them, cut to the recorder's snaplen, to a recording chunk of its own. Full chunks go to the
//! recorder thread through a bounded channel; when it is full the chunk's frames are dropped
//! and counted as recording drops, so recording never holds a writer up. The recorder thread
//! compresses each chunk (zstd at a fast level) or keeps it as it is, and keeps it in a ring
//! with its time span, evicting the oldest chunks beyond the memory budget. With a directory
//! configured, evicted chunks go there instead, one file each, for a longer horizon within a
//! byte budget of their own (the oldest files are deleted first); the directory is emptied
//! when the recorder starts (a history covers one run of the daemon).
//!
//! A capture with a lookback: the writer of each queue, as it takes the capture's start,
//! seals its recording chunk and asks the recorder for the queue's history since the start
//! less the lookback. That point is the seam: every frame the writer handled before it is in
//! the history, every frame after it is live. Until the filter program that marks the new
//! capture is in force (the frames' generation says so), the writer also hands the capture
//! the recorded frames its filter accepts (libpcap's interpreter), so no frame falls between
//! history and live. The recorder sends the history's frames that the capture's filter
//! accepts, cut to its snaplen, as chunks to the next stage, then a note that the queue's
//! history is complete; the next stage holds the capture's live chunks until every queue's
//! note has come.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use capture_common::MAX_CAPTURES;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use tapstream_pcap::RECORD_HEADER_LEN;

use crate::{
    datapath::capture::CaptureShared,
    datapath::chunk::{Chunk, ChunkPool},
    datapath::writer::Output,
    filter::CbpfProgram,
    metrics::LookbackMetrics,
};

/// The capture slot the recorder takes on an interface that keeps a history.
pub const RECORDER_SLOT: usize = MAX_CAPTURES - 1;

/// Bytes of a writer's recording chunk.
pub const RECORDING_CHUNK_BYTES: usize = 256 * 1024;

/// Recording chunks each writer has (one filling, the others on their way to the ring).
const WRITER_BUFFERS: usize = 8;

/// Sealed chunks the recorder's channel holds.
const RECORDER_QUEUE: usize = 64;

/// zstd level of the history kept compressed: the fastest of the regular levels.
const ZSTD_LEVEL: i32 = 1;

/// How an interface keeps its history.
#[derive(Clone, Debug, PartialEq)]
pub struct LookbackConfig {
    /// Bytes the ring of chunks may hold (compressed, when compressed).
    pub memory_bytes: u64,
    /// The frames to keep; `None`: every frame.
    pub filter: Option<CbpfProgram>,
    /// Bytes kept per frame at most.
    pub snaplen: u32,
    /// Whether chunks are kept zstd-compressed.
    pub compress: bool,
    /// Where chunks evicted from memory are kept, and the bytes they may take there.
    pub disk: Option<(std::path::PathBuf, u64)>,
}

/// Counters of the history, readable while it runs.
#[derive(Debug, Default)]
pub struct HistoryStats {
    /// Frames put in the history.
    pub recorded: AtomicU64,
    /// Frames the recording dropped (the recorder behind, or no recording buffer free).
    pub dropped: AtomicU64,
    /// Frames evicted (the oldest, beyond the budget).
    pub evicted: AtomicU64,
    /// Bytes the ring holds in memory.
    pub bytes: AtomicU64,
    /// Bytes the history holds in its directory.
    pub disk_bytes: AtomicU64,
    /// Bytes of the records the ring holds, before compression.
    pub raw_bytes: AtomicU64,
    /// Time of the oldest frame held (ns since the Unix epoch; 0: none).
    pub oldest_ns: AtomicU64,
    /// Time of the newest frame held.
    pub newest_ns: AtomicU64,
}

/// Records of one queue: a writer's recording chunk, and a chunk of the ring.
struct Records {
    queue: u32,
    frames: u32,
    first_ns: u64,
    last_ns: u64,
    data: Vec<u8>,
}

enum ToRecorder {
    Sealed(Records),
    /// The history of `queue` since `since_ns` for `capture`.
    Replay {
        capture: Arc<CaptureShared>,
        queue: u32,
        since_ns: u64,
    },
}

/// A writer's side of the recording.
pub struct QueueRecording {
    queue: u32,
    snaplen: u32,
    open: Option<Records>,
    spare: Vec<Vec<u8>>,
    to_recorder: Sender<ToRecorder>,
    /// Buffers the recorder gives back.
    back: Receiver<Vec<u8>>,
    stats: Arc<HistoryStats>,
    /// Frames dropped since the last batch's publication.
    dropped: u64,
    dropped_metric: metrics::Counter,
}

impl QueueRecording {
    /// Appends a frame to the recording chunk (never allocates); a full chunk goes to the
    /// recorder.
    #[inline]
    pub fn record(&mut self, ts_ns: u64, orig_len: u32, frame: &[u8]) {
        let stored = &frame[..frame.len().min(self.snaplen as usize)];
        let need = RECORD_HEADER_LEN + stored.len();
        if self.open.as_ref().is_some_and(|r| r.data.len() + need > r.data.capacity()) {
            self.seal();
        }
        if self.open.is_none() {
            while let Ok(buf) = self.back.try_recv() {
                self.spare.push(buf);
            }
            let Some(data) = self.spare.pop() else {
                self.dropped += 1;
                return;
            };
            self.open = Some(Records { queue: self.queue, frames: 0, first_ns: ts_ns, last_ns: ts_ns, data });
        }
        let records = self.open.as_mut().expect("opened above");
        let header = tapstream_pcap::RecordHeader::at_nanos(ts_ns, stored.len() as u32, orig_len);
        records.data.extend_from_slice(&header.encode());
        records.data.extend_from_slice(stored);
        records.frames += 1;
        records.last_ns = ts_ns;
    }

    /// Hands the recording chunk to the recorder; when its channel is full, the chunk's frames
    /// are dropped and counted, and the buffer is kept.
    pub fn seal(&mut self) {
        let Some(records) = self.open.take() else { return };
        if records.frames == 0 {
            self.spare.push(records.data);
            return;
        }
        match self.to_recorder.try_send(ToRecorder::Sealed(records)) {
            Ok(()) => {}
            Err(
                TrySendError::Full(ToRecorder::Sealed(mut r))
                | TrySendError::Disconnected(ToRecorder::Sealed(mut r)),
            ) => {
                self.dropped += u64::from(r.frames);
                r.data.clear();
                self.spare.push(r.data);
            }
            Err(_) => unreachable!("a sealed chunk was sent"),
        }
    }

    /// The seam for a capture with a lookback: everything recorded so far goes to the
    /// recorder, followed by the request for the history since `since_ns`. Waits up to a
    /// second for room in the channel (the start of a capture, not the per-frame path); false
    /// if there was none, and then no history comes for this queue.
    pub fn replay(&mut self, capture: Arc<CaptureShared>, since_ns: u64) -> bool {
        if let Some(records) = self.open.take() {
            if records.frames == 0 {
                self.spare.push(records.data);
            } else if let Err(e) =
                self.to_recorder.send_timeout(ToRecorder::Sealed(records), Duration::from_secs(1))
                && let ToRecorder::Sealed(mut r) = e.into_inner()
            {
                self.dropped += u64::from(r.frames);
                r.data.clear();
                self.spare.push(r.data);
            }
        }
        let replay = ToRecorder::Replay { capture, queue: self.queue, since_ns };
        self.to_recorder.send_timeout(replay, Duration::from_secs(1)).is_ok()
    }

    /// Publishes the drops counted since the last call.
    pub fn publish(&mut self) {
        if self.dropped > 0 {
            self.stats.dropped.fetch_add(self.dropped, Ordering::Relaxed);
            self.dropped_metric.increment(self.dropped);
            self.dropped = 0;
        }
    }
}

/// The recorder of one interface: its thread and its counters.
pub struct Recorder {
    stats: Arc<HistoryStats>,
    thread: Option<JoinHandle<()>>,
}

impl Recorder {
    /// Starts the recorder thread of `interface` for `queues` writers; returns it and each
    /// writer's side. `output` is the next stage, where history chunks go.
    pub fn start(
        config: &LookbackConfig,
        interface: &str,
        queues: u32,
        output: Sender<Output>,
        pool: Arc<ChunkPool>,
    ) -> std::io::Result<(Self, Vec<QueueRecording>)> {
        let stats = Arc::new(HistoryStats::default());
        let metrics = LookbackMetrics::new(interface);
        let (to_recorder, inbox) = crossbeam_channel::bounded(RECORDER_QUEUE);
        let mut giving_back = Vec::new();
        let mut sides = Vec::new();
        for queue in 0..queues {
            let (back_tx, back) = crossbeam_channel::bounded(WRITER_BUFFERS * 2);
            giving_back.push(back_tx);
            sides.push(QueueRecording {
                queue,
                snaplen: config.snaplen,
                open: None,
                spare: (0..WRITER_BUFFERS).map(|_| Vec::with_capacity(RECORDING_CHUNK_BYTES)).collect(),
                to_recorder: to_recorder.clone(),
                back,
                stats: stats.clone(),
                dropped: 0,
                dropped_metric: metrics.dropped.clone(),
            });
        }
        drop(to_recorder);
        let disk = match &config.disk {
            Some((dir, max_bytes)) => Some(Disk::open(dir, *max_bytes).map_err(|e| {
                std::io::Error::new(e.kind(), format!("the history's directory {}: {e}", dir.display()))
            })?),
            None => None,
        };
        let mut ring = Ring {
            disk,
            pool,
            config: config.clone(),
            chunks: VecDeque::new(),
            bytes: 0,
            raw_bytes: 0,
            stats: stats.clone(),
            metrics,
            giving_back,
            output,
        };
        let thread = std::thread::Builder::new()
            .name(format!("tapstream-lb-{}", interface.chars().take(6).collect::<String>()))
            .spawn(move || {
                // Ends when every writer is gone.
                while let Ok(message) = inbox.recv() {
                    match message {
                        ToRecorder::Sealed(records) => ring.keep(records),
                        ToRecorder::Replay { capture, queue, since_ns } => {
                            ring.replay(&capture, queue, since_ns)
                        }
                    }
                }
            })?;
        Ok((Self { stats, thread: Some(thread) }, sides))
    }

    /// The history's counters.
    pub fn stats(&self) -> &Arc<HistoryStats> {
        &self.stats
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // The writers hold the channel: the thread ends once they have stopped.
        if let Some(thread) = self.thread.take()
            && thread.is_finished()
        {
            let _ = thread.join();
        }
    }
}

/// What a chunk of the history holds, wherever it is kept.
#[derive(Clone, Copy)]
struct Span {
    queue: u32,
    frames: u32,
    first_ns: u64,
    last_ns: u64,
    /// Bytes of its records before compression.
    raw_len: usize,
    compressed: bool,
}

/// A chunk of the ring in memory.
struct Kept {
    span: Span,
    data: Vec<u8>,
}

/// A chunk of the history in its directory.
struct OnDisk {
    span: Span,
    path: std::path::PathBuf,
    size: u64,
}

/// The history's directory: chunks evicted from memory, oldest first.
struct Disk {
    dir: std::path::PathBuf,
    max_bytes: u64,
    chunks: VecDeque<OnDisk>,
    bytes: u64,
    next: u64,
}

impl Disk {
    /// The directory, created, and emptied of an earlier run's chunks.
    fn open(dir: &std::path::Path, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "hist") {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(Self { dir: dir.to_owned(), max_bytes, chunks: VecDeque::new(), bytes: 0, next: 0 })
    }
}

struct Ring {
    config: LookbackConfig,
    chunks: VecDeque<Kept>,
    /// Memory the chunks take (their buffers' capacity).
    bytes: u64,
    /// Bytes of their records before compression.
    raw_bytes: u64,
    stats: Arc<HistoryStats>,
    metrics: LookbackMetrics,
    giving_back: Vec<Sender<Vec<u8>>>,
    output: Sender<Output>,
    /// The interface's chunk pool, which history chunks come from.
    pool: Arc<ChunkPool>,
    disk: Option<Disk>,
}

impl Ring {
    /// Keeps a sealed chunk, evicting the oldest beyond the budget.
    fn keep(&mut self, records: Records) {
        let Records { queue, frames, first_ns, last_ns, mut data } = records;
        let raw_len = data.len();
        let compressed = if self.config.compress {
            match zstd::bulk::compress(&data, ZSTD_LEVEL) {
                Ok(mut compressed) => {
                    // The compressor's buffer has room for the worst case: give it back.
                    compressed.shrink_to_fit();
                    Some(compressed)
                }
                Err(e) => {
                    log::error!("lookback: cannot compress a chunk ({e}): kept as it is");
                    None
                }
            }
        } else {
            None
        };
        let span = Span { queue, frames, first_ns, last_ns, raw_len, compressed: compressed.is_some() };
        // Compressed, the writer's buffer goes back to it at once.
        let (kept, buffer) = match compressed {
            Some(compressed) => {
                data.clear();
                (Kept { span, data: compressed }, Some(data))
            }
            None => (Kept { span, data }, None),
        };
        self.stats.recorded.fetch_add(u64::from(frames), Ordering::Relaxed);
        self.metrics.recorded.increment(u64::from(frames));
        // The memory a chunk takes is its buffer's, used or not.
        self.bytes += kept.data.capacity() as u64;
        self.raw_bytes += raw_len as u64;
        self.chunks.push_back(kept);
        let mut freed = buffer;
        while self.bytes > self.config.memory_bytes
            && let Some(oldest) = self.chunks.pop_front()
        {
            self.bytes -= oldest.data.capacity() as u64;
            self.raw_bytes -= oldest.span.raw_len as u64;
            if !self.spill(&oldest) {
                self.stats.evicted.fetch_add(u64::from(oldest.span.frames), Ordering::Relaxed);
                self.metrics.evicted.increment(u64::from(oldest.span.frames));
            }
            if freed.is_none() && !oldest.span.compressed {
                let mut data = oldest.data;
                data.clear();
                freed = Some(data);
            }
        }
        // The writer gets a buffer back for the one it sent.
        let buffer = freed.unwrap_or_else(|| Vec::with_capacity(RECORDING_CHUNK_BYTES));
        if let Some(back) = self.giving_back.get(queue as usize) {
            let _ = back.try_send(buffer);
        }
        self.publish();
    }

    /// Keeps a chunk evicted from memory in the directory, if there is one, deleting the
    /// oldest files beyond its budget (their frames are evicted); false if it is not kept.
    fn spill(&mut self, kept: &Kept) -> bool {
        let Some(disk) = self.disk.as_mut() else { return false };
        let path = disk.dir.join(format!("{:016}.hist", disk.next));
        disk.next += 1;
        if let Err(e) = std::fs::write(&path, &kept.data) {
            log::warn!(
                "lookback: cannot keep a chunk in {}: {e} (its frames are evicted)",
                disk.dir.display()
            );
            let _ = std::fs::remove_file(&path);
            return false;
        }
        let size = kept.data.len() as u64;
        disk.bytes += size;
        disk.chunks.push_back(OnDisk { span: kept.span, path, size });
        while disk.bytes > disk.max_bytes
            && let Some(oldest) = disk.chunks.pop_front()
        {
            disk.bytes -= oldest.size;
            if let Err(e) = std::fs::remove_file(&oldest.path) {
                log::warn!("lookback: cannot delete {}: {e}", oldest.path.display());
            }
            self.stats.evicted.fetch_add(u64::from(oldest.span.frames), Ordering::Relaxed);
            self.metrics.evicted.increment(u64::from(oldest.span.frames));
        }
        true
    }

    /// Every chunk kept, oldest first: the directory's, then memory's.
    fn sources(&self) -> impl Iterator<Item = Source<'_>> {
        let disk = self.disk.iter().flat_map(|d| d.chunks.iter().map(Source::Disk));
        disk.chain(self.chunks.iter().map(Source::Memory))
    }

    fn publish(&self) {
        let (bytes, raw) = (self.bytes, self.raw_bytes);
        let disk_bytes = self.disk.as_ref().map_or(0, |d| d.bytes);
        self.stats.disk_bytes.store(disk_bytes, Ordering::Relaxed);
        self.metrics.disk_bytes.set(disk_bytes as f64);
        let oldest = self.sources().map(|s| s.span().first_ns).min().unwrap_or(0);
        let newest = self.sources().map(|s| s.span().last_ns).max().unwrap_or(0);
        self.stats.bytes.store(bytes, Ordering::Relaxed);
        self.stats.raw_bytes.store(raw, Ordering::Relaxed);
        self.stats.oldest_ns.store(oldest, Ordering::Relaxed);
        self.stats.newest_ns.store(newest, Ordering::Relaxed);
        self.metrics.bytes.set(bytes as f64);
        self.metrics.chunks.set(self.chunks.len() as f64);
        let horizon = if oldest == 0 { 0.0 } else { newest.saturating_sub(oldest) as f64 / 1e9 };
        self.metrics.horizon.set(horizon);
    }

    /// A buffer for a chunk of history, from the interface's chunk pool, so that what a replay
    /// has in flight is bounded as the live chunks are: taken only while more than half the
    /// pool is free (the live captures keep the rest), waiting meanwhile; after a second of
    /// waiting, a buffer of its own (the pool does not take it back), so a replay always ends.
    fn history_buffer(&self) -> Vec<u8> {
        let waited = std::time::Instant::now();
        loop {
            if self.pool.available() > self.pool.capacity() / 2
                && let Some(buffer) = self.pool.take()
            {
                return buffer;
            }
            if waited.elapsed() > Duration::from_secs(1) {
                return Vec::with_capacity(RECORDING_CHUNK_BYTES);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sends `capture` the frames of `queue` since `since_ns` that its filter accepts, cut to
    /// its snaplen, then the note that the queue's history is complete.
    fn replay(&mut self, capture: &Arc<CaptureShared>, queue: u32, since_ns: u64) {
        let snaplen = capture.spec.snaplen;
        let mut frames = 0u64;
        // The oldest frame the history held for the queue, whether or not the window needs it.
        let oldest_ns =
            self.sources().map(|s| *s.span()).filter(|s| s.queue == queue).map(|s| s.first_ns).min();
        let mut chunk = None;
        let mut scratch: Vec<u8>;
        let mut read: Vec<u8>;
        let sources: Vec<Source<'_>> =
            self.sources().filter(|s| s.span().queue == queue && s.span().last_ns >= since_ns).collect();
        for source in sources {
            let Span { compressed, raw_len, .. } = *source.span();
            let stored: &[u8] = match source {
                Source::Memory(kept) => &kept.data,
                Source::Disk(c) => match std::fs::read(&c.path) {
                    Ok(bytes) => {
                        read = bytes;
                        &read
                    }
                    Err(e) => {
                        log::error!("lookback: cannot read {}: {e}", c.path.display());
                        continue;
                    }
                },
            };
            let records: &[u8] = if compressed {
                match zstd::bulk::decompress(stored, raw_len) {
                    Ok(records) => {
                        scratch = records;
                        &scratch
                    }
                    Err(e) => {
                        log::error!("lookback: a chunk of the history does not decompress: {e}");
                        continue;
                    }
                }
            } else {
                stored
            };
            for (header, data) in tapstream_pcap::records(records) {
                let (ts_ns, orig_len) = (header.ts_nanos(), header.origlen);
                if ts_ns < since_ns {
                    continue;
                }
                if let Some(filter) = &capture.spec.filter
                    && !filter.matches(data, orig_len)
                {
                    continue;
                }
                let need = Chunk::record_len(data.len(), snaplen);
                if chunk.is_none() {
                    chunk = Some(Chunk::new(capture.clone(), queue, 0, self.history_buffer()));
                }
                let open = chunk.as_mut().expect("opened above");
                if !open.fits(need) {
                    let full = chunk.take().expect("just used");
                    let _ = self.output.send(Output::History(full));
                    chunk = Some(Chunk::new(capture.clone(), queue, 0, self.history_buffer()));
                }
                chunk.as_mut().expect("opened above").append(ts_ns, orig_len, data, snaplen);
                frames += 1;
            }
        }
        if let Some(last) = chunk.filter(|c| !c.is_empty()) {
            let _ = self.output.send(Output::History(last));
        }
        let _ = self.output.send(Output::HistoryDone { capture: capture.clone(), queue, frames, oldest_ns });
    }
}

/// Where a chunk replayed is.
enum Source<'a> {
    Memory(&'a Kept),
    Disk(&'a OnDisk),
}

impl Source<'_> {
    fn span(&self) -> &Span {
        match self {
            Source::Memory(kept) => &kept.span,
            Source::Disk(on_disk) => &on_disk.span,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::capture::{CaptureSpec, Limits};

    /// A frame numbered `seq`, the rest bytes that do not compress.
    fn frame(seq: u32, len: usize) -> Vec<u8> {
        let mut x = u64::from(seq).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut f: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        f[..4].copy_from_slice(&seq.to_be_bytes());
        f
    }

    fn recorder(memory_bytes: u64, compress: bool) -> (Recorder, QueueRecording, Receiver<Output>) {
        let config = LookbackConfig { memory_bytes, filter: None, snaplen: 65_535, compress, disk: None };
        let (output, outputs) = crossbeam_channel::unbounded();
        let (recorder, mut sides) =
            Recorder::start(&config, "test", 1, output, ChunkPool::new(8, 64 * 1024)).unwrap();
        (recorder, sides.remove(0), outputs)
    }

    /// (timestamp, data) of each record replayed.
    type Replayed = Vec<(u64, Vec<u8>)>;

    /// History chunks and the completion note for one replay.
    fn replayed(outputs: &Receiver<Output>) -> (Replayed, u64, Option<u64>) {
        let mut frames = Vec::new();
        loop {
            match outputs.recv_timeout(Duration::from_secs(10)).expect("the recorder answers") {
                Output::History(chunk) => {
                    frames.extend(
                        tapstream_pcap::records(&chunk.data).map(|(h, d)| (h.ts_nanos(), d.to_vec())),
                    );
                }
                Output::HistoryDone { frames: n, oldest_ns, .. } => return (frames, n, oldest_ns),
                _ => panic!("not from the recorder"),
            }
        }
    }

    #[test]
    fn a_replay_gives_the_window_in_order_and_the_budget_evicts_the_oldest() {
        for compress in [false, true] {
            // About 1,000 records of 1,000 bytes: far more than the 600 KB budget.
            let (recorder, mut side, outputs) = recorder(600_000, compress);
            let base = 1_700_000_000_000_000_000u64;
            for seq in 0..3_000u32 {
                side.record(base + u64::from(seq) * 1_000, 1_000, &frame(seq, 1_000));
                if seq % 200 == 0 {
                    // The recorder keeps up (the test is not about its drops).
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            let capture =
                CaptureShared::new(CaptureSpec { snaplen: 100, ..CaptureSpec::default() }, Limits::default());
            // Since record 2,900: within what is kept.
            assert!(side.replay(capture.clone(), base + 2_900_000));
            let (frames, n, oldest) = replayed(&outputs);
            let seqs: Vec<u32> =
                frames.iter().map(|(_, d)| u32::from_be_bytes(d[..4].try_into().unwrap())).collect();
            assert_eq!(seqs, (2_900..3_000).collect::<Vec<u32>>(), "compress {compress}");
            assert_eq!(n, 100);
            assert!(frames.iter().all(|(_, d)| d.len() == 100), "cut to the capture's snaplen");
            let stats = recorder.stats();
            assert!(stats.bytes.load(Ordering::Relaxed) <= 600_000, "the budget holds");
            assert!(stats.evicted.load(Ordering::Relaxed) > 0, "the oldest were evicted");
            let oldest = oldest.expect("something is kept");
            assert!(oldest > base, "the oldest records are gone");

            // Since before the horizon: everything kept, from the oldest on, contiguous.
            assert!(side.replay(capture.clone(), base));
            let (frames, n, oldest_again) = replayed(&outputs);
            assert_eq!(oldest_again, Some(oldest));
            assert_eq!(frames.first().map(|f| f.0), Some(oldest));
            let first = u32::from_be_bytes(frames[0].1[..4].try_into().unwrap());
            let seqs: Vec<u32> =
                frames.iter().map(|(_, d)| u32::from_be_bytes(d[..4].try_into().unwrap())).collect();
            assert_eq!(seqs, (first..3_000).collect::<Vec<u32>>());
            assert_eq!(n, u64::from(3_000 - first));
            assert_eq!(
                stats.recorded.load(Ordering::Relaxed) - stats.evicted.load(Ordering::Relaxed),
                n,
                "recorded less evicted is what is kept"
            );
        }
    }
}
