//! Chunks of a running capture to objects: a pool of compression threads (off the capture
//! cores) feeds an [`Uploader`] task on a small tokio runtime.
//!
//! Chunks get a sequence number as they leave the writers; the uploader appends them in that
//! order whatever order the compression threads finish in, so every queue's records stay in
//! receive order in the objects. The channels between the stages are bounded: when the store is
//! slower than the traffic, the writers' output queue fills and they count drops (never block).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use tokio::sync::{Semaphore, mpsc};

use super::{
    LostPackets, Sink, UploadError,
    object::{CompressedChunk, ObjectOwner, UploadConfig, Uploader, with_retry},
    spool::{JournalState, Leftover, SalvageRecord, Spool, SpoolOwner, read_chunk},
};
use crate::{
    datapath::chunk::{Chunk, ChunkPool},
    store::compress::{Adaptive, Compressor, LevelCounts},
};

/// Starts a store output, given the chunk pool and the PCAP file header objects begin with.
pub type StartStore = Box<dyn FnOnce(Arc<ChunkPool>, &[u8]) -> Result<StoreOutput, UploadError> + Send>;

/// A store target, started when the capture starts.
pub struct StoreTarget {
    /// Starts the output, given the chunk pool and the PCAP file header objects begin with.
    pub start: StartStore,
}

/// Threads and spool of a store output.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Compression threads.
    pub threads: usize,
    /// zstd levels that follow the backlog; `None`: the configured level throughout.
    pub adaptive: Option<Adaptive>,
    /// Directory for the spools of all captures (each gets a subdirectory).
    pub spool_root: std::path::PathBuf,
    /// Bytes one capture may spool at most.
    pub spool_max_bytes: u64,
    /// Compressed chunks held in memory for the uploader; more go to the spool.
    pub memory_chunks: usize,
    /// Whether an output starting uploads the spools of runs that died (not those of a failed
    /// store, which any output to that store takes). The daemon leaves them to its recovery
    /// of interrupted captures ([`recover_capture`]), which records them in the capture's state.
    pub recover_killed: bool,
}

/// Where a capture's chunks go while it runs.
pub struct StoreOutput {
    chunks: Option<crossbeam_channel::Sender<(u64, Chunk)>>,
    workers: Vec<JoinHandle<()>>,
    uploader: Option<tokio::task::JoinHandle<Result<Vec<String>, UploadError>>>,
    runtime: tokio::runtime::Runtime,
    /// The capture's id, for errors.
    capture: String,
    next_seq: u64,
    /// The first failure of a compression thread.
    failed: Arc<Mutex<Option<UploadError>>>,
    /// Chunks compressed at each zstd level.
    levels: Arc<LevelCounts>,
    /// Set when the store has failed for good and chunks only go to the spool.
    gave_up: Arc<AtomicBool>,
    /// Packets whose chunks found the spool full (the store behind or failed), counted as
    /// they are lost.
    lost: Arc<AtomicU64>,
}

/// The uploader of a running capture, until the store fails for good; then the spool alone.
struct Store<S: Sink> {
    uploader: Option<Uploader<S>>,
    spool: Arc<Spool>,
    owner: ObjectOwner,
    compression: crate::store::compress::Compression,
    /// The error that made the store give up.
    failure: Option<UploadError>,
    /// Packets whose chunks found the spool full (read live by [`StoreOutput`]).
    lost: Arc<AtomicU64>,
    gave_up: Arc<AtomicBool>,
}

impl<S: Sink> Store<S> {
    /// Appends chunk `seq` to the capture's objects, or spools it once the store has failed.
    async fn deliver(&mut self, seq: u64, chunk: CompressedChunk) -> Result<(), UploadError> {
        let Some(uploader) = self.uploader.as_mut() else {
            if !self.spool.put(seq, &chunk).map_err(|e| self.spool_error(e))? {
                self.lost.fetch_add(chunk.packets, Ordering::Relaxed);
            }
            return Ok(());
        };
        match uploader.push(chunk).await {
            Ok(()) => Ok(()),
            Err(e) => self.give_up(e, seq + 1).await,
        }
    }

    /// Rotates an object that is old enough.
    async fn tick(&mut self, next: u64) -> Result<(), UploadError> {
        let Some(uploader) = self.uploader.as_mut() else { return Ok(()) };
        match uploader.tick().await {
            Ok(()) => Ok(()),
            Err(e) => self.give_up(e, next).await,
        }
    }

    /// The store has failed for good (an error that retrying cannot mend, or an outage longer
    /// than allowed): what it has not confirmed goes to the spool, with a record of the open
    /// multipart upload, and so does every chunk after it. `next` is the first sequence number
    /// not yet delivered: the salvaged chunks take the numbers just below it.
    async fn give_up(&mut self, error: UploadError, next: u64) -> Result<(), UploadError> {
        let mut uploader = self.uploader.take().expect("a live uploader");
        log::error!(
            "capture {}: {}; keeping what the store has not confirmed in the spool {}",
            self.owner.capture,
            crate::report::chain(&error),
            self.spool.dir().display()
        );
        self.gave_up.store(true, Ordering::Relaxed);
        let salvage = uploader.salvage().await;
        let first = next - salvage.chunks.len() as u64;
        for (i, chunk) in salvage.chunks.iter().enumerate() {
            self.spool.put_over_limit(first + i as u64, chunk).map_err(|e| self.spool_error(e))?;
        }
        let record = SalvageRecord {
            owner: self.owner.clone(),
            compression: self.compression,
            next_object: salvage.next_object,
            resume: salvage.resume,
            error: crate::report::chain(&error),
        };
        self.spool.write_salvage(&record).map_err(|e| self.spool_error(e))?;
        self.failure = Some(error);
        Ok(())
    }

    fn spool_error(&self, source: std::io::Error) -> UploadError {
        UploadError::Io { operation: "write spool", path: self.spool.dir().display().to_string(), source }
    }

    /// Finishes the last object; returns every object's URL, or, if the store failed, what it
    /// left in the spool.
    async fn finish(mut self, next: u64) -> Result<Vec<String>, UploadError> {
        if let Some(mut uploader) = self.uploader.take() {
            match uploader.finish_objects().await {
                Ok(urls) => {
                    let (spooled, _) = self.spool.counts();
                    if spooled > 0 {
                        log::info!("{spooled} chunks went through the spool");
                    }
                    self.spool.remove_if_empty().map_err(|e| self.spool_error(e))?;
                    return Ok(urls);
                }
                Err(e) => {
                    self.uploader = Some(uploader);
                    self.give_up(e, next).await?;
                }
            }
        }
        let (chunks, bytes) = self.spool.held();
        let cause = self.failure.take().expect("the store failed");
        Err(UploadError::Spooled {
            cause: Box::new(cause),
            chunks,
            bytes,
            dir: self.spool.dir().display().to_string(),
            lost: LostPackets(self.lost.load(Ordering::Relaxed)),
        })
    }
}

/// A capture's store output made ready to start: its runtime and client built, the store
/// checked. Made where a request is handled ([`StoreOutput::prepare`]), so that
/// [`PreparedStore::start`], on the interface's thread, sends no request to the store.
pub struct PreparedStore<S: Sink> {
    runtime: tokio::runtime::Runtime,
    sink: Arc<S>,
    config: UploadConfig,
    owner: ObjectOwner,
    options: StoreOptions,
}

impl StoreOutput {
    /// Builds the output's runtime and client (`make_sink` runs on the runtime: clients need
    /// one to be built) and checks the store with one short request ([`Sink::check`]). A
    /// store that refuses (no such bucket, wrong credentials) is an error, and nothing starts;
    /// one that cannot be reached now (refused or timed out connections, 5xx, throttling) is
    /// logged, and the capture starts all the same: its chunks spool, as in an outage, until
    /// the store answers.
    pub fn prepare<S, F>(
        make_sink: impl FnOnce() -> F,
        config: UploadConfig,
        owner: ObjectOwner,
        options: StoreOptions,
    ) -> Result<PreparedStore<S>, UploadError>
    where
        S: Sink,
        F: std::future::Future<Output = Result<S, UploadError>>,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tapstream-upload")
            .enable_all()
            .build()
            .map_err(|source| UploadError::Runtime { source })?;
        let sink = Arc::new(runtime.block_on(make_sink())?);
        let prefix = key_space(&config, &owner);
        // The sink bounds its check; this bounds the wait for a connection of the pool too.
        let wait = super::CHECK_TIMEOUT + Duration::from_secs(1);
        let checked = runtime.block_on(async {
            tokio::time::timeout(wait, sink.check(&prefix)).await.unwrap_or_else(|_| {
                Err(UploadError::Store {
                    operation: "ListMultipartUploads",
                    key: prefix.clone(),
                    reason: format!("no answer within {} s", wait.as_secs()),
                    retryable: true,
                    source: None,
                })
            })
        });
        match checked {
            Ok(()) => {}
            Err(e) if e.is_retryable() => log::warn!(
                "capture {}: the store {} cannot be reached now ({}); the capture starts all the same and \
                 its chunks wait in the spool under {} (at most {} bytes) until the store answers",
                owner.capture,
                sink.describe(),
                crate::report::chain(&e),
                options.spool_root.display(),
                options.spool_max_bytes
            ),
            Err(e) => return Err(e),
        }
        Ok(PreparedStore { runtime, sink, config, owner, options })
    }
}

impl<S: Sink> PreparedStore<S> {
    /// Starts `threads` compression threads and the uploader for the capture. Sends no request
    /// to the store: the uploader first finishes what earlier runs left ([`recover_leftovers`], [`abort_open_uploads`]), then
    /// uploads, each waiting for a store that is down; chunks spool meanwhile.
    pub fn start(self, pool: Arc<ChunkPool>, pcap_header: &[u8]) -> Result<StoreOutput, UploadError> {
        let Self { runtime, sink, config, owner, options } = self;
        let threads = options.threads;
        let global = Arc::new(Semaphore::new(config.parts_in_flight_per_object.max(1)));
        let spool_name = match &owner.part {
            Some(part) => format!("{}-{part}-{}", owner.capture, crate::sys::unix_now_ns()),
            None => format!("{}-{}", owner.capture, crate::sys::unix_now_ns()),
        };
        let spool_dir = options.spool_root.join(spool_name);
        let spool = Arc::new(
            Spool::create(spool_dir.clone(), options.spool_max_bytes, pcap_header, &sink.url("")).map_err(
                |source| UploadError::Io {
                    operation: "create spool",
                    path: spool_dir.display().to_string(),
                    source,
                },
            )?,
        );
        let journal = spool
            .record_owner(&SpoolOwner {
                owner: owner.clone(),
                compression: config.compression,
                key_template: config.key_template.clone(),
            })
            .map_err(|source| UploadError::Io {
                operation: "create spool",
                path: spool_dir.display().to_string(),
                source,
            })?;
        let uploader =
            Uploader::new(sink.clone(), config.clone(), owner.clone(), pcap_header, global.clone())?
                .with_journal(Arc::new(journal));
        // Compressed chunks waiting for the uploader: a bounded memory budget.
        let (done_tx, mut done_rx) = mpsc::channel::<(u64, CompressedChunk)>(options.memory_chunks.max(1));
        let (chunk_tx, chunk_rx) = crossbeam_channel::bounded::<(u64, Chunk)>(threads.max(1) * 2);
        let levels = Arc::new(LevelCounts::default());
        let failed = Arc::new(Mutex::new(None));
        // Packets lost to a full spool, counted live (progress shows them as they happen).
        let lost = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let (rx, tx, pool, failed) = (chunk_rx.clone(), done_tx.clone(), pool.clone(), failed.clone());
            let (spool, lost) = (spool.clone(), lost.clone());
            let levels = Levels { adaptive: options.adaptive, counts: levels.clone() };
            let compression = config.compression;
            let name = format!("tapstream-zstd{i}");
            let worker = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || compress_loop(compression, levels, &rx, &tx, &pool, &spool, &failed, &lost))
                .map_err(|source| UploadError::Thread { name, source })?;
            workers.push(worker);
        }
        drop(done_tx);
        let age_check = config.object_max_age.min(Duration::from_secs(1));
        let gave_up = Arc::new(AtomicBool::new(false));
        let mut store = Store {
            uploader: Some(uploader),
            spool: spool.clone(),
            owner: owner.clone(),
            compression: config.compression,
            failure: None,
            lost: lost.clone(),
            gave_up: gave_up.clone(),
        };
        let capture = owner.capture.clone();
        let task = runtime.spawn(async move {
            // The capture is in the catalog from its start (a failed write is logged; the
            // manifest is written again with each object).
            if let Some(catalog) = &owner.catalog {
                catalog.write_or_log(&*sink, &owner.prefix, config.outage_max).await;
            }
            // What earlier runs left goes first: recovery aborts the uploads left open in this
            // capture's key space, which must come before its own. Chunks wait meanwhile, in
            // memory and then in the spool; a store that fails recovery for good, or stays
            // down longer than the outage allows, fails the capture's uploads as it would.
            let recovered =
                match recover_leftovers(Recovery::of(&sink, &config, &owner, &options, &global)).await {
                    Ok(()) => abort_open_uploads(&sink, &config, &owner).await,
                    failed => failed,
                };
            if let Err(e) = recovered {
                store.give_up(e, 0).await?;
            }
            let mut waiting = BTreeMap::new();
            let mut next = 0u64;
            let mut tick = tokio::time::interval(age_check);
            let spool_err = |source| UploadError::Io {
                operation: "read spool",
                path: spool_dir.display().to_string(),
                source,
            };
            loop {
                tokio::select! {
                    got = done_rx.recv() => {
                        let Some((seq, chunk)) = got else { break };
                        waiting.insert(seq, chunk);
                    }
                    _ = tick.tick() => store.tick(next).await?,
                }
                // The next chunk in order is in memory or in the spool, or not compressed yet.
                loop {
                    let chunk = match waiting.remove(&next) {
                        Some(c) => c,
                        // It found the spool full: lost, and counted.
                        None if spool.take_lost(next) => {
                            next += 1;
                            continue;
                        }
                        None if !spool.contains(next) => break,
                        // Once the store has failed, spooled chunks stay where they are.
                        None if store.uploader.is_none() => {
                            next += 1;
                            continue;
                        }
                        None => spool.take(next).map_err(spool_err)?.expect("in the spool"),
                    };
                    store.deliver(next, chunk).await?;
                    next += 1;
                }
            }
            // Every chunk is compressed now; a chunk whose compression failed leaves a gap.
            loop {
                let from_memory = waiting.keys().next().copied();
                let from_spool = if store.uploader.is_some() { spool.first() } else { None };
                let seq = match (from_memory, from_spool) {
                    (None, None) => break,
                    (a, b) => a.unwrap_or(u64::MAX).min(b.unwrap_or(u64::MAX)),
                };
                let chunk = match waiting.remove(&seq) {
                    Some(c) => c,
                    None => spool.take(seq).map_err(spool_err)?.expect("listed in the spool"),
                };
                store.deliver(seq, chunk).await?;
                next = seq + 1;
            }
            store.finish(next).await
        });
        Ok(StoreOutput {
            chunks: Some(chunk_tx),
            workers,
            uploader: Some(task),
            runtime,
            capture,
            next_seq: 0,
            failed,
            levels,
            gave_up,
            lost,
        })
    }
}

impl StoreOutput {
    /// Hands a chunk on for compression and upload; waits while the compression threads are
    /// all busy (compression slower than the capture), calling `waiting` every
    /// `every` meanwhile, so that the caller can report what happens during the wait (the
    /// writers' drops). Returns the chunk if the stage has failed (its frames are then lost).
    pub fn write(&mut self, chunk: Chunk, every: Duration, mut waiting: impl FnMut()) -> Result<(), Chunk> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let Some(tx) = &self.chunks else { return Err(chunk) };
        let mut item = (seq, chunk);
        loop {
            match tx.send_timeout(item, every) {
                Ok(()) => return Ok(()),
                Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => {
                    item = back;
                    waiting();
                }
                Err(crossbeam_channel::SendTimeoutError::Disconnected((_, chunk))) => return Err(chunk),
            }
        }
    }

    /// Chunks compressed so far at each zstd level (none for uncompressed objects).
    pub fn levels(&self) -> Arc<LevelCounts> {
        self.levels.clone()
    }

    /// The packets lost so far because their chunks found the spool full, the store being
    /// behind or failed: a counter that goes on counting until [`Self::finish`] returns.
    pub fn lost_packets(&self) -> Arc<AtomicU64> {
        self.lost.clone()
    }

    /// Whether the uploader has stopped (failed) early, or the store has failed for good.
    pub fn has_failed(&self) -> bool {
        self.gave_up.load(Ordering::Relaxed) || self.uploader.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for every chunk to be stored and every object finished; returns their URLs.
    pub fn finish(mut self) -> Result<Vec<String>, UploadError> {
        self.chunks = None;
        let mut panicked = None;
        for w in self.workers.drain(..) {
            let name = w.thread().name().unwrap_or("tapstream-zstd").to_owned();
            if let Err(payload) = w.join() {
                panicked.get_or_insert(UploadError::CompressionPanicked {
                    name,
                    message: panic_message(&*payload),
                });
            }
        }
        let task = self.uploader.take().expect("finished once");
        let result = self
            .runtime
            .block_on(task)
            .map_err(|source| UploadError::Uploader { capture: self.capture.clone(), source })?;
        if let Some(e) = self.failed.lock().unwrap_or_else(|e| e.into_inner()).take().or(panicked) {
            return Err(e);
        }
        result
    }
}

/// The message a thread panicked with.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_owned(),
        (None, Some(s)) => s.clone(),
        (None, None) => "no message".to_owned(),
    }
}

/// The levels a compression thread uses, and where it counts them.
struct Levels {
    adaptive: Option<Adaptive>,
    counts: Arc<LevelCounts>,
}

#[expect(clippy::too_many_arguments, reason = "one thread's whole context, passed once")]
fn compress_loop(
    compression: crate::store::compress::Compression,
    levels: Levels,
    chunks: &crossbeam_channel::Receiver<(u64, Chunk)>,
    out: &mpsc::Sender<(u64, CompressedChunk)>,
    pool: &ChunkPool,
    spool: &Spool,
    failed: &Mutex<Option<UploadError>>,
    lost: &AtomicU64,
) {
    let mut compressor = match Compressor::new(compression) {
        Ok(c) => c,
        Err(e) => {
            failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e.into());
            return;
        }
    };
    let fixed = match compression {
        crate::store::compress::Compression::Zstd { level } => Some(level),
        crate::store::compress::Compression::None => None,
    };
    let mut level = match levels.adaptive {
        Some(a) => Adaptive::START.clamp(a.fastest, a.strongest),
        None => fixed.unwrap_or(0),
    };
    if levels.adaptive.is_some() && compressor.set_level(level).is_err() {
        level = fixed.unwrap_or(level);
    }
    let capacity = chunks.capacity().unwrap_or(1);
    for (seq, chunk) in chunks {
        if let (Some(adaptive), Some(_)) = (levels.adaptive, fixed) {
            let next = adaptive.next(level, chunks.len(), capacity);
            if next != level && compressor.set_level(next).is_ok() {
                level = next;
            }
        }
        if fixed.is_some() {
            levels.counts.add(level);
            metrics::gauge!(crate::metrics::COMPRESS_LEVEL).set(f64::from(level));
        }
        let started = std::time::Instant::now();
        let frame = compressor.frame(&chunk.data);
        metrics::histogram!(crate::metrics::COMPRESS_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::counter!(crate::metrics::COMPRESS_INPUT_BYTES).increment(chunk.data.len() as u64);
        if let Ok(f) = &frame {
            metrics::counter!(crate::metrics::COMPRESS_OUTPUT_BYTES).increment(f.len() as u64);
        }
        let (packets, first_ns, last_ns, len) =
            (u64::from(chunk.frames), chunk.first_ns, chunk.last_ns, chunk.data.len() as u64);
        match frame {
            Ok(data) => {
                pool.put(chunk.data);
                let done = CompressedChunk { data, decompressed_len: len, first_ns, last_ns, packets };
                // The uploader is behind (a slow or unreachable store): spool the chunk; if the
                // spool is full too, wait, which in the end makes the writers drop and count.
                let done = match out.try_send((seq, done)) {
                    Ok(()) => continue,
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        chunk.capture.count_dropped(packets);
                        continue;
                    }
                    Err(mpsc::error::TrySendError::Full((_, done))) => done,
                };
                match spool.put(seq, &done) {
                    Ok(true) => {}
                    // The spool is full too: this capture loses the chunk, counted. Waiting
                    // instead would stall the thread that hands every capture on the
                    // interface its chunks, and the others would lose frames for this one.
                    Ok(false) => {
                        spool.mark_lost(seq);
                        lost.fetch_add(packets, Ordering::Relaxed);
                    }
                    Err(e) => {
                        log::error!("cannot spool a chunk: {e}");
                        if out.blocking_send((seq, done)).is_err() {
                            chunk.capture.count_dropped(packets);
                        }
                    }
                }
            }
            Err(e) => {
                chunk.capture.count_dropped(packets);
                pool.put(chunk.data);
                failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e.into());
            }
        }
    }
}

/// Uploads what earlier runs left in the spool for `sink`'s store (see [`abort_open_uploads`]) without
/// starting a capture: what a daemon does when it starts.
pub fn recover_spools<S, F>(
    make_sink: impl FnOnce() -> F,
    config: UploadConfig,
    owner: ObjectOwner,
    options: StoreOptions,
) -> Result<(), UploadError>
where
    S: Sink,
    F: std::future::Future<Output = Result<S, UploadError>>,
{
    on_own_runtime(make_sink, config.parts_in_flight_per_object, |sink, global| async move {
        recover_leftovers(Recovery::of(&sink, &config, &owner, &options, &global)).await
    })
}

/// Finishes what capture `owner.capture` left when its process died (see [`recover_capture`]),
/// on a runtime of its own: what a daemon does at start for each interrupted capture.
pub fn recover_dead_capture<S, F>(
    make_sink: impl FnOnce() -> F,
    config: UploadConfig,
    owner: ObjectOwner,
    options: StoreOptions,
) -> Result<Recovered, UploadError>
where
    S: Sink,
    F: std::future::Future<Output = Result<S, UploadError>>,
{
    on_own_runtime(make_sink, config.parts_in_flight_per_object, |sink, global| async move {
        recover_capture(&sink, &config, &owner, &options, &global).await
    })
}

/// Runs `work` with the store `make_sink` makes and a limit of `parts_in_flight`, on a runtime
/// of its own that ends with it.
fn on_own_runtime<S, F, T, W>(
    make_sink: impl FnOnce() -> F,
    parts_in_flight: usize,
    work: impl FnOnce(Arc<S>, Arc<Semaphore>) -> W,
) -> Result<T, UploadError>
where
    S: Sink,
    F: std::future::Future<Output = Result<S, UploadError>>,
    W: std::future::Future<Output = Result<T, UploadError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| UploadError::Runtime { source })?;
    let global = Arc::new(Semaphore::new(parts_in_flight.max(1)));
    runtime.block_on(async {
        let sink = Arc::new(make_sink().await?);
        work(sink, global).await
    })
}

/// Aborts the multipart uploads left open in this capture's own key space by an earlier run
/// (call after [`recover_leftovers`]), so none keeps costing money.
async fn abort_open_uploads<S: Sink>(
    sink: &Arc<S>,
    config: &UploadConfig,
    owner: &ObjectOwner,
) -> Result<(), UploadError> {
    // Without a daemon that knows every live capture, only this capture's own key space is
    // certain to hold no live upload: the key up to its last '/'.
    // A store that is down is waited for, as the capture's own uploads would wait.
    let prefix = key_space(config, owner);
    let pending =
        with_retry("ListMultipartUploads", config.outage_max, || sink.list_multipart(&prefix)).await?;
    for pending in pending {
        log::warn!("aborting an unfinished upload of {} left by an earlier run", pending.key);
        with_retry("AbortMultipartUpload", config.outage_max, || {
            sink.abort_multipart(&pending.key, &pending.upload_id)
        })
        .await?;
    }
    Ok(())
}

/// The key prefix of a capture's objects: its first key up to the last '/'.
fn key_space(config: &UploadConfig, owner: &ObjectOwner) -> String {
    let own = super::object::object_key(config, owner, 0, 0);
    own.rsplit_once('/').map(|(p, _)| format!("{p}/")).unwrap_or_default()
}

/// What finishing earlier runs' leftovers works with: the store, how objects are made and whose
/// they are, where spools are, and the limit on parts in flight.
struct Recovery<'a, S> {
    sink: &'a Arc<S>,
    config: &'a UploadConfig,
    owner: &'a ObjectOwner,
    options: &'a StoreOptions,
    global: &'a Arc<Semaphore>,
}

impl<'a, S> Recovery<'a, S> {
    fn of(
        sink: &'a Arc<S>,
        config: &'a UploadConfig,
        owner: &'a ObjectOwner,
        options: &'a StoreOptions,
        global: &'a Arc<Semaphore>,
    ) -> Self {
        Self { sink, config, owner, options, global }
    }
}

// Copied whatever `S` is: it holds only references.
impl<S> Clone for Recovery<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S> Copy for Recovery<'_, S> {}

/// Uploads the spools earlier runs left for the sink's store. One that can never upload (its requests are invalid, or its files are corrupt) is moved to the
/// quarantine and reported; one the store cannot take now stays for the next start. Neither
/// stops the others, nor the capture that is starting.
async fn recover_leftovers<S: Sink>(r: Recovery<'_, S>) -> Result<(), UploadError> {
    let Recovery { sink, options, .. } = r;
    for left in Spool::leftovers(&options.spool_root).map_err(recover_io(&options.spool_root))? {
        // Chunks for another bucket or directory wait for a capture that goes there.
        if left.destination.as_ref().is_some_and(|d| *d != sink.url("")) {
            continue;
        }
        if !options.recover_killed && left.salvage.is_none() && left.owner.is_some() {
            continue;
        }
        match recover_leftover(r, &left).await {
            Ok(_) => {}
            // The store is unreachable or refuses: the next leftovers would wait as long.
            Err(e) if e.is_retryable() => break,
            Err(_) => {}
        }
    }
    Ok(())
}

/// Recovers one leftover spool: removed once uploaded, quarantined if it never can be, left
/// for the next start otherwise (logged in each case).
async fn recover_leftover<S: Sink>(r: Recovery<'_, S>, left: &Leftover) -> Result<Recovered, UploadError> {
    let Recovery { sink, config, owner, options, global } = r;
    let dir = options.spool_root.join(&left.name);
    match recover_one(sink, config, owner, global, left).await {
        Ok(recovered) => {
            std::fs::remove_dir_all(&dir).map_err(recover_io(&dir))?;
            Ok(recovered)
        }
        Err(e) if e.is_permanent() => {
            let to = Spool::quarantine(&options.spool_root, &left.name, &crate::report::chain(&e))
                .map_err(recover_io(&dir))?;
            metrics::counter!(crate::metrics::SPOOL_QUARANTINED).increment(1);
            log::error!(
                "the spool {} can never be uploaded ({}); moved to {} with the reason, so it no \
                 longer holds up other captures",
                dir.display(),
                crate::report::chain(&e),
                to.display()
            );
            Err(e)
        }
        Err(e) => {
            log::warn!(
                "cannot upload the spool {} now ({}); it stays for the next start",
                dir.display(),
                crate::report::chain(&e)
            );
            Err(e)
        }
    }
}

/// What recovery made of a dead run's leftovers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Objects the run finished before it died (from its journal).
    pub earlier: Vec<String>,
    /// Records in them.
    pub earlier_packets: u64,
    /// Objects made now: its open upload completed, its spooled chunks uploaded.
    pub objects: Vec<String>,
    /// Records in them.
    pub packets: u64,
    /// Records the store no longer had (an upload that was aborted or expired meanwhile).
    pub lost_packets: u64,
    /// Unfinished uploads of the run that were aborted (none of their parts was confirmed).
    pub aborted: usize,
}

impl Recovered {
    fn add(&mut self, other: Self) {
        self.earlier.extend(other.earlier);
        self.earlier_packets += other.earlier_packets;
        self.objects.extend(other.objects);
        self.packets += other.packets;
        self.lost_packets += other.lost_packets;
        self.aborted += other.aborted;
    }
}

/// Finishes what capture `capture`, interrupted by the death of its process, left for
/// `sink`'s store: its spools (its open multipart upload completed with the parts the store
/// confirmed, then its spooled chunks) and then any upload of it still open, aborted. `config`
/// and `fallback` name its objects if no spool says how (a spool of an older version).
pub async fn recover_capture<S: Sink>(
    sink: &Arc<S>,
    config: &UploadConfig,
    fallback: &ObjectOwner,
    options: &StoreOptions,
    global: &Arc<Semaphore>,
) -> Result<Recovered, UploadError> {
    let mut recovered = Recovered::default();
    let mut key_spaces = Vec::new();
    for left in Spool::leftovers(&options.spool_root).map_err(recover_io(&options.spool_root))? {
        let Some(spool_owner) = left.owner.as_ref().filter(|o| o.owner.capture == fallback.capture) else {
            continue;
        };
        if left.destination.as_ref().is_some_and(|d| *d != sink.url("")) {
            continue;
        }
        let named = UploadConfig { key_template: spool_owner.key_template.clone(), ..config.clone() };
        key_spaces.push(key_space(&named, &spool_owner.owner));
        let r = Recovery { sink, config, owner: fallback, options, global };
        recovered.add(recover_leftover(r, &left).await?);
    }
    if key_spaces.is_empty() {
        key_spaces.push(key_space(config, fallback));
    }
    for prefix in key_spaces {
        recovered.aborted += abort_dead_uploads(sink, &prefix, &fallback.capture).await?;
    }
    Ok(recovered)
}

/// Aborts every multipart upload under `prefix`, the key space of capture `capture`, whose run
/// is dead; returns how many. A key space that does not name the capture (a key template with
/// `{capture}` only in the file name) may hold other captures' live uploads: left alone.
async fn abort_dead_uploads<S: Sink>(
    sink: &Arc<S>,
    prefix: &str,
    capture: &str,
) -> Result<usize, UploadError> {
    if !prefix.split('/').any(|part| part == capture) {
        log::warn!(
            "the key space {prefix:?} of capture {capture} does not name it alone: uploads its dead run \
             left open there cannot be told from others' and are left"
        );
        return Ok(0);
    }
    let mut aborted = 0;
    for pending in sink.list_multipart(prefix).await? {
        log::warn!("aborting an unfinished upload of {} left by the dead run of {capture}", pending.key);
        sink.abort_multipart(&pending.key, &pending.upload_id).await?;
        aborted += 1;
    }
    Ok(aborted)
}

/// The error of a failed file operation of recovery on `path`.
fn recover_io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> UploadError {
    let path = path.display().to_string();
    move |source| UploadError::Io { operation: "recover spool", path, source }
}

/// Makes objects of one spool an earlier run left. A spool whose store failed for good
/// continues that capture's objects under its own name (and its open multipart upload). One
/// left by a process that died does the same from its journal: its open upload is completed
/// with the parts the store confirmed (each part holds whole zstd frames, so the object
/// decompresses; the index is made from the journal's frames, and the spooled chunks follow
/// with a seek table at the end), then its uploads still open are aborted. A spool of an older
/// version, without an owner, becomes objects named after the spool.
async fn recover_one<S: Sink>(
    sink: &Arc<S>,
    config: &UploadConfig,
    owner: &ObjectOwner,
    global: &Arc<Semaphore>,
    left: &Leftover,
) -> Result<Recovered, UploadError> {
    let mut recovered = Recovered::default();
    let (owner, config, next_object, mut resume) = match (&left.salvage, &left.owner) {
        (Some(s), _) => (
            s.owner.clone(),
            UploadConfig { compression: s.compression, ..config.clone() },
            s.next_object,
            s.resume.clone(),
        ),
        (None, Some(o)) => {
            let journal = JournalState::replay(&left.journal);
            recovered.earlier_packets = journal.finished.iter().map(|(_, p)| p).sum();
            recovered.earlier = journal.finished.into_iter().map(|(url, _)| url).collect();
            let config = UploadConfig {
                compression: o.compression,
                key_template: o.key_template.clone(),
                ..config.clone()
            };
            (o.owner.clone(), config, journal.next_object, journal.open)
        }
        (None, None) => {
            (ObjectOwner { capture: left.name.clone(), ..owner.clone() }, config.clone(), 0, None)
        }
    };
    if let Some(r) = resume.take_if(|r| r.parts.is_empty()) {
        // No part of it was confirmed: its chunks are all in the spool.
        if let Err(e) = sink.abort_multipart(&r.key, &r.upload_id).await {
            log::warn!(
                "cannot abort the upload of {} left by an earlier run: {}",
                r.key,
                crate::report::chain(&e)
            );
        }
    }
    if !left.chunks.is_empty() || resume.is_some() {
        recovered.add(upload_leftover(sink, &config, &owner, next_object, resume, global, left).await?);
    }
    if left.salvage.is_none() && left.owner.is_some() {
        // The run is dead (its spool's lock was free): no upload of it may stay open.
        recovered.aborted += abort_dead_uploads(sink, &key_space(&config, &owner), &owner.capture).await?;
    }
    Ok(recovered)
}

/// Uploads a leftover's chunks after the upload `resume` continues, if any.
async fn upload_leftover<S: Sink>(
    sink: &Arc<S>,
    config: &UploadConfig,
    owner: &ObjectOwner,
    next_object: u32,
    mut resume: Option<super::object::ResumeRecord>,
    global: &Arc<Semaphore>,
    left: &Leftover,
) -> Result<Recovered, UploadError> {
    let mut lost_packets = 0;
    loop {
        let mut uploader =
            Uploader::new(sink.clone(), config.clone(), owner.clone(), &left.header, global.clone())?
                .with_next_object(next_object);
        let resumed = resume.is_some();
        let mut packets = 0;
        if let Some(r) = resume.clone() {
            log::info!(
                "completing the unfinished upload of {} left by an earlier run with its {} confirmed parts",
                r.key,
                r.parts.len()
            );
            packets += r.frames.iter().map(|f| f.packets).sum::<u64>();
            uploader.resume(r);
        }
        let mut result = Ok(());
        for file in &left.chunks {
            result = match read_chunk(file).map_err(recover_io(file)) {
                Ok(chunk) => {
                    packets += chunk.packets;
                    uploader.push(chunk).await
                }
                Err(e) => Err(e),
            };
            if result.is_err() {
                break;
            }
        }
        let result = match result {
            Ok(()) => uploader.finish_objects().await,
            Err(e) => Err(e),
        };
        match result {
            Ok(urls) => {
                log::info!(
                    "uploaded {} chunks spooled by an earlier run as {}",
                    left.chunks.len(),
                    urls.join(", ")
                );
                return Ok(Recovered { objects: urls, packets, lost_packets, ..Recovered::default() });
            }
            // The store no longer has the upload (aborted or expired): its confirmed parts are
            // gone; the spooled chunks still make an object of their own.
            Err(e) if resumed && e.to_string().contains("NoSuchUpload") => {
                let r = resume.take().expect("resumed");
                let lost: u64 = r.frames.iter().map(|f| f.packets).sum();
                log::error!("the upload of {} no longer exists in the store: {lost} packets are lost", r.key);
                lost_packets += lost;
                uploader.abort().await;
            }
            Err(e) => {
                uploader.abort().await;
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{dir::DirSink, object::CompressedChunk};
    use std::thread::JoinHandle;

    #[test]
    fn a_spool_is_only_uploaded_to_the_store_it_was_for() {
        let root = tempfile::tempdir().unwrap();
        let (store_a, store_b, spools) =
            (root.path().join("a"), root.path().join("b"), root.path().join("spool"));
        let sink_a = Arc::new(DirSink::new(&store_a).unwrap());
        let sink_b = Arc::new(DirSink::new(&store_b).unwrap());
        let config =
            UploadConfig { compression: crate::store::compress::Compression::None, ..Default::default() };
        // A spool left for store A by a run that died.
        {
            let spool = Spool::create(spools.join("cap-1"), 1 << 20, b"hdr", &sink_a.url("")).unwrap();
            let chunk = CompressedChunk {
                data: b"frames".to_vec(),
                decompressed_len: 6,
                first_ns: 1,
                last_ns: 2,
                packets: 1,
            };
            assert!(spool.put(0, &chunk).unwrap());
        }
        let options = StoreOptions {
            adaptive: None,
            threads: 1,
            spool_root: spools.clone(),
            spool_max_bytes: 1 << 20,
            memory_chunks: 1,
            recover_killed: true,
        };
        let owner = ObjectOwner { node: "n".into(), capture: "next".into(), ..Default::default() };
        let global = Arc::new(Semaphore::new(1));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

        rt.block_on(recover_leftovers(Recovery::of(&sink_b, &config, &owner, &options, &global))).unwrap();
        rt.block_on(abort_open_uploads(&sink_b, &config, &owner)).unwrap();
        assert_eq!(pcap_files(&store_b), 0, "a capture to store B leaves store A's chunks alone");
        assert!(spools.join("cap-1").is_dir());

        rt.block_on(recover_leftovers(Recovery::of(&sink_a, &config, &owner, &options, &global))).unwrap();
        rt.block_on(abort_open_uploads(&sink_a, &config, &owner)).unwrap();
        assert_eq!(pcap_files(&store_a), 1, "a capture to store A uploads them");
        assert!(!spools.join("cap-1").exists());
    }

    /// One compression thread with `compression = "auto"`'s levels and a queue of `capacity`
    /// chunks, each chunk's bytes a pattern of its own; `queued` chunks are in the queue
    /// before the thread starts.
    struct AdaptiveThread {
        tx: Option<crossbeam_channel::Sender<(u64, Chunk)>>,
        out: mpsc::Receiver<(u64, CompressedChunk)>,
        capture: Arc<crate::datapath::capture::CaptureShared>,
        counts: Arc<LevelCounts>,
        worker: Option<JoinHandle<()>>,
        received: Vec<(u64, CompressedChunk)>,
        _dir: tempfile::TempDir,
    }

    impl AdaptiveThread {
        fn start(capacity: usize, queued: u64) -> Self {
            use crate::datapath::capture::{CaptureShared, CaptureSpec, Limits};
            let dir = tempfile::tempdir().unwrap();
            let spool = Spool::create(dir.path().join("spool"), 1 << 30, b"hdr", "file:///x").unwrap();
            let pool = ChunkPool::new(1, 1 << 20);
            let (tx, rx) = crossbeam_channel::bounded::<(u64, Chunk)>(capacity);
            let (out_tx, out) = mpsc::channel(1024);
            let counts = Arc::new(LevelCounts::default());
            let levels = Levels { adaptive: Some(Adaptive::AUTO), counts: counts.clone() };
            let capture = CaptureShared::new(CaptureSpec::default(), Limits::default());
            let mut this =
                Self { tx: Some(tx), out, capture, counts, worker: None, received: Vec::new(), _dir: dir };
            for seq in 0..queued {
                this.send(seq);
            }
            this.worker = Some(std::thread::spawn(move || {
                let (failed, lost) = (Mutex::new(None), AtomicU64::new(0));
                let compression =
                    crate::store::compress::Compression::Zstd { level: Adaptive::AUTO.strongest };
                compress_loop(compression, levels, &rx, &out_tx, &pool, &spool, &failed, &lost);
                assert!(failed.lock().unwrap().is_none(), "compression failed");
                assert_eq!(lost.load(Ordering::Relaxed), 0, "no chunk lost");
            }));
            this
        }

        fn bytes(seq: u64) -> Vec<u8> {
            (0..256u64 << 10).map(|i| ((i * (seq + 7)) >> 5) as u8 ^ (i % 251) as u8).collect()
        }

        fn send(&self, seq: u64) {
            let mut chunk = Chunk::new(self.capture.clone(), 0, seq, Self::bytes(seq));
            chunk.frames = 1;
            self.tx.as_ref().unwrap().send((seq, chunk)).unwrap();
        }

        /// Waits for the next compressed chunk.
        fn receive(&mut self) {
            let done = self.out.blocking_recv().expect("a compressed chunk");
            self.received.push(done);
        }

        /// Ends the thread; checks every chunk sent came out and decompresses to its bytes;
        /// returns the chunks compressed at each level.
        fn finish(mut self, sent: u64) -> std::collections::BTreeMap<i32, u64> {
            drop(self.tx.take());
            self.worker.take().unwrap().join().unwrap();
            while let Ok(done) = self.out.try_recv() {
                self.received.push(done);
            }
            assert_eq!(self.received.len() as u64, sent, "every chunk compressed");
            for (seq, done) in &self.received {
                let plain = zstd::bulk::decompress(&done.data, 1 << 20).unwrap();
                assert!(plain == Self::bytes(*seq), "chunk {seq} decompresses to its bytes");
            }
            self.counts.snapshot()
        }
    }

    #[test]
    fn chunks_queued_up_make_the_level_fall_one_step_a_chunk_to_the_fastest() {
        // Forty chunks queued before the thread takes the first: it finds 39, 38, ... waiting.
        let thread = AdaptiveThread::start(40, 40);
        let levels = thread.finish(40);
        // From zstd's default (3) down a level a chunk to -5, there while chunks wait; the
        // last finds none waiting and is one level stronger.
        let expected: std::collections::BTreeMap<i32, u64> =
            [(2, 1), (1, 1), (0, 1), (-1, 1), (-2, 1), (-3, 1), (-4, 2), (-5, 32)].into();
        assert_eq!(levels, expected);
    }

    #[test]
    fn an_idle_queue_makes_the_level_rise_to_the_strongest() {
        let mut thread = AdaptiveThread::start(2, 0);
        for seq in 0..6 {
            thread.send(seq);
            thread.receive();
        }
        let levels = thread.finish(6);
        assert_eq!(levels, [(4, 1), (5, 1), (6, 4)].into());
    }

    /// PCAP files under `dir`, at any depth.
    fn pcap_files(dir: &std::path::Path) -> usize {
        let entries = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path());
        entries
            .map(|p| {
                if p.is_dir() {
                    pcap_files(&p)
                } else {
                    usize::from(p.extension().is_some_and(|x| x == "pcap"))
                }
            })
            .sum()
    }
}
