//! One capture interface at work: the XDP program, an AF_XDP socket and a writer per RX queue,
//! the chunk pool, and the channel to the next stage.
//!
//! [`InterfaceRuntime::start`] sets it up in the order that loses nothing: program loaded,
//! sockets bound and registered in the socket map, writers running, and only then the program
//! attached. Captures are started and stopped on a running interface with
//! [`InterfaceRuntime::start_capture`] and [`InterfaceRuntime::stop_capture`].

use std::{sync::Arc, time::Duration};

use capture_common::{MAX_CAPTURES, Unmatched, XdpConfig, XdpCounters};
use crossbeam_channel::Receiver;

use crate::{
    datapath::capture::CaptureShared,
    datapath::chunk::ChunkPool,
    datapath::lookback::{HistoryStats, LookbackConfig, RECORDER_SLOT, Recorder},
    datapath::writer::{Output, QueueStats, Writer, WriterCommand, WriterConfig},
    datapath::xdp::{AttachMode, XdpError, XdpProgram},
    datapath::xsk::{XskConfig, XskError, XskMode, XskSocket, XskStats},
    filter::{CaptureFilter, CbpfProgram, FilterError, LoadedFilter},
    metrics::QueueKernelMetrics,
};

/// Everything about how one interface is captured from.
#[derive(Clone, Debug)]
pub struct InterfaceConfig {
    /// Interface name.
    pub interface: String,
    /// The name the daemon's configuration gives the interface (`[interfaces.ALIAS]`), for
    /// messages; `None` for the one-shot capture.
    pub alias: Option<String>,
    /// XDP attach mode.
    pub attach: AttachMode,
    /// RX queues to open; `None`: as many as the device has.
    pub queues: Option<u32>,
    /// Cores to pin writers to, in queue order (wrapping); empty: unpinned.
    pub cores: Vec<usize>,
    /// Socket and UMEM sizes.
    pub xsk: XskConfig,
    /// Writer behaviour (its `core` is set from `cores`).
    pub writer: WriterConfig,
    /// What to do with frames no capture wants.
    pub unmatched: Unmatched,
    /// Bytes per chunk buffer.
    pub chunk_bytes: usize,
    /// Chunk buffers in all (the memory budget is `chunk_bytes * chunk_buffers`).
    pub chunk_buffers: usize,
    /// Chunks the queue to the next stage holds.
    pub chunk_queue: usize,
    /// The history it keeps for captures that start in the past; `None`: none.
    pub lookback: Option<LookbackConfig>,
}

impl InterfaceConfig {
    /// Defaults for `interface`.
    pub fn new(interface: &str) -> Self {
        Self {
            interface: interface.to_owned(),
            alias: None,
            attach: AttachMode::Auto,
            queues: None,
            cores: Vec::new(),
            xsk: XskConfig::default(),
            writer: WriterConfig::default(),
            unmatched: Unmatched::Pass,
            chunk_bytes: 1 << 20,
            chunk_buffers: 64,
            chunk_queue: 32,
            lookback: None,
        }
    }
}

/// Errors starting or running an interface.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Xdp(#[from] XdpError),
    #[error(transparent)]
    Xsk(#[from] XskError),
    #[error("cannot read the RX queue count of {interface}")]
    Queues {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the lookback history")]
    Recorder(#[source] std::io::Error),
    #[error("cannot start the writer thread for queue {queue}")]
    Thread {
        queue: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the writer of queue {queue} did not take the new capture within 5 s (it has stopped)")]
    WriterGone { queue: u32 },
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("all {MAX_CAPTURES} capture slots of {interface} are in use")]
    NoFreeSlot { interface: String },
    /// The capture's filter is accepted alone, but not beside the running captures' filters:
    /// the program for all of them is more than the kernel's verifier takes.
    #[error(
        "the filter program of {interface} for this capture beside the {running} running with \
         filters is more than the kernel's verifier accepts (this filter alone is accepted: it \
         can start when fewer filtered captures run there): {message}"
    )]
    Crowded { interface: String, running: usize, message: String },
}

/// The state of one queue at a moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// RX queue.
    pub queue: u32,
    /// The XDP program's counters for the queue.
    pub xdp: XdpCounters,
    /// The socket's counters.
    pub xsk: XskStats,
    /// Frames the writer took off the ring.
    pub frames: u64,
    /// Bytes of those frames.
    pub bytes: u64,
    /// Records appended.
    pub records: u64,
    /// Frames dropped because a chunk could not be queued.
    pub drops_queue_full: u64,
    /// Frames dropped for lack of a chunk buffer.
    pub drops_no_buffer: u64,
}

impl QueueSnapshot {
    /// Queue `queue`'s counters now: the program's, the socket's and its writer's.
    fn new(queue: u32, xdp: XdpCounters, xsk: XskStats, writer: &QueueStats) -> Self {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        Self {
            queue,
            xdp,
            xsk,
            frames: load(&writer.frames),
            bytes: load(&writer.bytes),
            records: load(&writer.records),
            drops_queue_full: load(&writer.drops_queue_full),
            drops_no_buffer: load(&writer.drops_no_buffer),
        }
    }
}

/// A running capture (its compiled filter in its spec).
struct Slot {
    capture: Arc<CaptureShared>,
}

/// A capture interface at work.
pub struct InterfaceRuntime {
    config: InterfaceConfig,
    /// The index of the device set up: a device of the same name with another index is
    /// another device (the one set up was removed).
    ifindex: u32,
    xdp: XdpProgram,
    // Dropped before the writers, so that writers stopped by a drop see the next stage gone
    // (and count what they held as dropped) instead of waiting for room in the channel.
    outputs: Receiver<Output>,
    writers: Vec<Writer>,
    pool: Arc<ChunkPool>,
    slots: Vec<Option<Slot>>,
    next_slot: usize,
    xsk_mode: XskMode,
    kernel_metrics: Vec<QueueKernelMetrics>,
    chunk_gauges: crate::metrics::ChunkGauges,
    /// The history's recorder (it holds [`RECORDER_SLOT`]), if the interface keeps one.
    recorder: Option<Recorder>,
    /// The generation of the filter program in force (see [`XdpConfig::generation`]).
    generation: u32,
}

impl InterfaceRuntime {
    /// Sets up the interface and starts its writers; no capture runs yet.
    pub fn start(config: InterfaceConfig) -> Result<Self, PipelineError> {
        let interface = config.interface.clone();
        let ifindex = crate::sys::ifindex(&interface)
            .map_err(|_| XdpError::NoSuchInterface { interface: interface.clone() })?;
        let queues = match config.queues {
            Some(q) => q,
            None => crate::sys::rx_queues(&interface)
                .map_err(|source| PipelineError::Queues { interface: interface.clone(), source })?,
        };
        let mut xdp = XdpProgram::load(&interface)?;
        xdp.set_config(XdpConfig {
            default_mask: 0,
            max_frame_len: config.xsk.max_frame_len(),
            unmatched: config.unmatched as u32,
            generation: 0,
            reserved: 0,
        })?;
        let pool = ChunkPool::new(config.chunk_buffers, config.chunk_bytes);
        let (output_tx, outputs) = crossbeam_channel::bounded(config.chunk_queue.max(1));
        let (recorder, mut recordings) = match &config.lookback {
            Some(lookback) => {
                let (recorder, sides) =
                    Recorder::start(lookback, &interface, queues, output_tx.clone(), pool.clone())
                        .map_err(PipelineError::Recorder)?;
                (Some(recorder), sides.into_iter().map(Some).collect())
            }
            None => (None, (0..queues).map(|_| None).collect::<Vec<_>>()),
        };
        let mut writers = Vec::with_capacity(queues as usize);
        let mut xsk_mode = XskMode::ZeroCopy;
        for queue in 0..queues {
            let socket = XskSocket::open(&interface, queue, &config.xsk)?;
            log::info!("{interface} queue {queue}: UMEM in {}", socket.umem_backing());
            if socket.mode() == XskMode::Copy {
                xsk_mode = XskMode::Copy;
            }
            xdp.register_socket(queue, socket.raw_fd())?;
            let mut writer_config = config.writer.clone();
            writer_config.core =
                (!config.cores.is_empty()).then(|| config.cores[queue as usize % config.cores.len()]);
            let recording = recordings[queue as usize].take();
            let writer = Writer::spawn(socket, writer_config, output_tx.clone(), pool.clone(), recording)
                .map_err(|source| PipelineError::Thread { queue, source })?;
            writers.push(writer);
        }
        let mode = xdp.attach(config.attach)?;
        log::info!("attached to {interface}: {queues} RX queue(s), XDP {mode} mode, AF_XDP {xsk_mode} mode");
        let kernel_metrics = (0..queues).map(QueueKernelMetrics::new).collect();
        let mut runtime = Self {
            config,
            ifindex,
            xdp,
            writers,
            outputs,
            pool,
            slots: (0..MAX_CAPTURES).map(|_| None).collect(),
            next_slot: 0,
            xsk_mode,
            kernel_metrics,
            chunk_gauges: crate::metrics::ChunkGauges::new(),
            recorder,
            generation: 0,
        };
        if runtime.recorder.is_some() {
            // Recording starts now, before any capture.
            let program = runtime.filter_program(None)?;
            runtime.install(program)?;
        }
        Ok(runtime)
    }

    /// The history's counters, if the interface keeps one.
    pub fn history(&self) -> Option<&Arc<HistoryStats>> {
        self.recorder.as_ref().map(Recorder::stats)
    }

    /// The interface name.
    pub fn interface(&self) -> &str {
        &self.config.interface
    }

    /// The settings it was started with.
    pub fn config(&self) -> &InterfaceConfig {
        &self.config
    }

    /// The index of the device it was set up on.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Number of RX queues captured.
    pub fn queues(&self) -> u32 {
        self.writers.len() as u32
    }

    /// XDP attach mode in use.
    pub fn attach_mode(&self) -> AttachMode {
        self.xdp.mode()
    }

    /// AF_XDP mode in use (copy if any queue is in copy mode).
    pub fn xsk_mode(&self) -> XskMode {
        self.xsk_mode
    }

    /// Chunks and end-of-capture notes from the writers.
    pub fn outputs(&self) -> &Receiver<Output> {
        &self.outputs
    }

    /// The chunk pool (downstream stages give buffers back to it).
    pub fn pool(&self) -> &Arc<ChunkPool> {
        &self.pool
    }

    /// Starts a capture: returns its slot. The filter program for every running capture plus
    /// this one is built and verified first, so a filter that cannot run starts nothing; then
    /// every writer takes the capture, and only then does the kernel mark frames for it. The
    /// capture's filter comes compiled: libpcap never runs here.
    ///
    /// A capture with a lookback begins with the history since `since_ns` (ns since the Unix
    /// epoch): the frames each writer handled before it took the start.
    pub fn start_capture(
        &mut self,
        capture: Arc<CaptureShared>,
        since_ns: Option<u64>,
    ) -> Result<usize, PipelineError> {
        // Slots are taken round-robin, so a slot just freed (whose last frames may still be in
        // the rings) is not handed to the next capture at once.
        let recording = self.recorder.is_some();
        let slot = (0..MAX_CAPTURES)
            .map(|i| (self.next_slot + i) % MAX_CAPTURES)
            .find(|&i| self.slots[i].is_none() && !(recording && i == RECORDER_SLOT))
            .ok_or_else(|| PipelineError::NoFreeSlot { interface: self.config.interface.clone() })?;
        let program = self
            .filter_program(Some((slot, capture.spec.filter.as_ref())))
            .map_err(|e| self.crowded(e, capture.spec.filter.as_ref()))?;

        // Every writer must take the capture's frames before the program marks any. A capture
        // with a lookback learns the generation the program marking it will have.
        let seam = since_ns.map(|since| (self.generation.wrapping_add(1), since));
        let (started, acks) = crossbeam_channel::bounded(self.writers.len());
        for writer in &self.writers {
            writer.command(WriterCommand::Start {
                slot,
                capture: capture.clone(),
                started: started.clone(),
                seam,
            });
        }
        for writer in &self.writers {
            if acks.recv_timeout(Duration::from_secs(5)).is_err() {
                for w in &self.writers {
                    w.command(WriterCommand::Stop { slot });
                }
                return Err(PipelineError::WriterGone { queue: writer.queue() });
            }
        }
        self.slots[slot] = Some(Slot { capture });
        self.next_slot = (slot + 1) % MAX_CAPTURES;
        self.install(program)?;
        Ok(slot)
    }

    /// Stops the capture in `slot`: the kernel stops marking frames for it, and each writer
    /// hands on its last chunk and then an [`Output::Done`].
    pub fn stop_capture(&mut self, slot: usize) -> Result<(), PipelineError> {
        let Some(stopped) = self.slots[slot].take() else { return Ok(()) };
        let result = match self.filter_program(None) {
            Ok(program) => self.install(program),
            Err(e) => {
                // Not expected (the running captures' filters were all verified before), but
                // the stopped capture's bit must go whatever happens: without a program, only
                // the unfiltered captures get frames until the next one is built.
                log::error!(
                    "cannot rebuild the filter program after stopping {}: {e}",
                    stopped.capture.spec.id
                );
                self.install(None)
            }
        };
        for writer in &self.writers {
            writer.command(WriterCommand::Stop { slot });
        }
        result
    }

    /// For a device that is gone (so nothing more arrives): has every writer take the frames
    /// still on its ring before it applies the orders that follow, such as the captures' stops.
    pub fn drain(&self) {
        for writer in &self.writers {
            writer.command(WriterCommand::Drain);
        }
    }

    /// The filter program for the running captures, plus `adding`; `None` when no capture
    /// has a filter (every running capture takes every frame: `default_mask` does it).
    fn filter_program(
        &self,
        adding: Option<(usize, Option<&CbpfProgram>)>,
    ) -> Result<Option<LoadedFilter>, PipelineError> {
        let mut captures: Vec<CaptureFilter<'_>> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| {
                s.as_ref().map(|s| CaptureFilter { slot, filter: s.capture.spec.filter.as_ref() })
            })
            .collect();
        if let Some((slot, filter)) = adding {
            captures.push(CaptureFilter { slot, filter });
        }
        if let Some(lookback) = self.config.lookback.as_ref().filter(|_| self.recorder.is_some()) {
            captures.push(CaptureFilter { slot: RECORDER_SLOT, filter: lookback.filter.as_ref() });
        }
        if captures.iter().all(|c| c.filter.is_none()) {
            return Ok(None);
        }
        Ok(Some(LoadedFilter::load(&captures)?))
    }

    /// `error` from loading the program for the running captures plus one with `filter`: when
    /// the verifier refused it for its size, yet takes `filter` alone, the interface is
    /// crowded (a protochain filter, unrolled, is thousands of instructions: a dozen of them
    /// together reach the verifier's limits).
    fn crowded(&self, error: PipelineError, filter: Option<&CbpfProgram>) -> PipelineError {
        let (PipelineError::Filter(FilterError::Verifier { message }), Some(filter)) = (&error, filter)
        else {
            return error;
        };
        let running = self.slots.iter().flatten().filter(|s| s.capture.spec.filter.is_some()).count();
        if running == 0 || LoadedFilter::load(&[CaptureFilter { slot: 0, filter: Some(filter) }]).is_err() {
            return error;
        }
        PipelineError::Crowded { interface: self.config.interface.clone(), running, message: message.clone() }
    }

    /// Puts `program` in force with the running captures' default mask. Each frame sees
    /// either the state before or the state after.
    fn install(&mut self, program: Option<LoadedFilter>) -> Result<(), PipelineError> {
        let recorder = if self.recorder.is_some() { 1u64 << RECORDER_SLOT } else { 0 };
        let mask = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .fold(recorder, |m, (slot, _)| m | 1 << slot);
        // The program first, then the generation that says it is in force.
        self.generation = self.generation.wrapping_add(1);
        let mut config = self.xdp.config();
        config.default_mask = mask;
        config.generation = self.generation;
        match program {
            // The program decides every bit; the default mask is not used while it is there.
            Some(program) => {
                self.xdp.install_filter(Some(program))?;
                self.xdp.set_config(config)?;
            }
            // The default mask must be right before the program goes.
            None => {
                self.xdp.set_config(config)?;
                self.xdp.install_filter(None)?;
            }
        }
        Ok(())
    }

    /// Counters of every queue now; also published as metrics.
    pub fn snapshot(&self) -> Result<Vec<QueueSnapshot>, PipelineError> {
        let xdp = self.xdp.queue_counters(self.queues())?;
        let pool = self.pool();
        self.chunk_gauges.buffers_in_use.set((pool.capacity() - pool.available()) as f64);
        self.chunk_gauges.queue_depth.set(self.outputs().len() as f64);
        Ok(self
            .writers
            .iter()
            .zip(xdp)
            .zip(&self.kernel_metrics)
            .map(|((writer, xdp), metrics)| {
                let stats: &QueueStats = writer.stats();
                let xsk = *stats.kernel.lock().unwrap_or_else(|e| e.into_inner());
                metrics.set_xdp(&xdp);
                metrics.set_xsk([
                    xsk.rx_dropped,
                    xsk.rx_ring_full,
                    xsk.rx_fill_ring_empty_descs,
                    xsk.rx_invalid_descs,
                ]);
                QueueSnapshot::new(writer.queue(), xdp, xsk, stats)
            })
            .collect())
    }

    /// Detaches the program, stops the writers (they hand on what they hold), and returns the
    /// final counters. Outputs still queued stay readable from [`Self::outputs`] until the
    /// returned receiver is dropped.
    pub fn shutdown(mut self) -> (Vec<QueueSnapshot>, Receiver<Output>) {
        self.xdp.detach();
        // Let frames already redirected reach the rings before the writers go.
        std::thread::sleep(Duration::from_millis(20));
        let writers = std::mem::take(&mut self.writers);
        let queues = writers.len() as u32;
        let mut finals = Vec::new();
        for writer in writers {
            let stats = writer.stats().clone();
            let queue = writer.queue();
            let socket = writer.stop();
            let xsk = socket.as_ref().map(XskSocket::stats).unwrap_or_default();
            finals.push((queue, stats, xsk));
        }
        let xdp = self.xdp.queue_counters(queues).unwrap_or_default();
        let snapshots = finals
            .into_iter()
            .map(|(queue, stats, xsk)| {
                QueueSnapshot::new(queue, xdp.get(queue as usize).copied().unwrap_or_default(), xsk, &stats)
            })
            .collect();
        (snapshots, self.outputs.clone())
    }
}
