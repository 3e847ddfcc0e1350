//! Chunks of a running capture to objects: a pool of compression threads (off the capture
//! cores) feeds an [`Uploader`] task on a small tokio runtime.
//!
//! Chunks get a sequence number as they leave the writers; the uploader appends them in that
//! order whatever order the compression threads finish in, so every queue's records stay in
//! receive order in the objects. The channels between the stages are bounded: when the store is
//! slower than the traffic, the writers' output queue fills and they count drops (never block).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use tokio::sync::{Semaphore, mpsc};

use super::{
    Sink, UploadError,
    object::{CompressedChunk, ObjectOwner, UploadConfig, Uploader},
    spool::{Spool, read_chunk},
};
use crate::{
    chunk::{Chunk, ChunkPool},
    compress::Compressor,
};

/// Threads and spool of a store output.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Compression threads.
    pub threads: usize,
    /// Directory for the spools of all captures (each gets a subdirectory).
    pub spool_root: std::path::PathBuf,
    /// Bytes one capture may spool at most.
    pub spool_max_bytes: u64,
    /// Compressed chunks held in memory for the uploader; more go to the spool.
    pub memory_chunks: usize,
}

/// Where a capture's chunks go while it runs.
pub struct StoreOutput {
    chunks: Option<crossbeam_channel::Sender<(u64, Chunk)>>,
    workers: Vec<JoinHandle<()>>,
    uploader: Option<tokio::task::JoinHandle<Result<Vec<String>, UploadError>>>,
    runtime: tokio::runtime::Runtime,
    next_seq: u64,
    /// The first failure of a compression thread.
    failed: Arc<Mutex<Option<UploadError>>>,
}

impl StoreOutput {
    /// Starts `threads` compression threads and the uploader for one capture. `make_sink` runs
    /// on the output's runtime (clients need one to be built).
    pub fn start<S, F>(
        make_sink: impl FnOnce() -> F,
        config: UploadConfig,
        owner: ObjectOwner,
        pcap_header: &[u8],
        options: StoreOptions,
        pool: Arc<ChunkPool>,
    ) -> Result<Self, UploadError>
    where
        S: Sink,
        F: std::future::Future<Output = Result<S, UploadError>>,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tapstream-upload")
            .enable_all()
            .build()
            .map_err(|e| UploadError::Task(format!("cannot start the upload runtime: {e}")))?;
        let threads = options.threads;
        let sink = Arc::new(runtime.block_on(make_sink())?);
        let global = Arc::new(Semaphore::new(config.parts_in_flight_per_object.max(1)));
        runtime.block_on(recover(&sink, &config, &owner, &options, &global))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let spool_dir = options.spool_root.join(format!("{}-{}", owner.capture, now.as_nanos()));
        let spool = Arc::new(
            Spool::create(spool_dir.clone(), options.spool_max_bytes, pcap_header).map_err(|source| {
                UploadError::Io { operation: "create spool", path: spool_dir.display().to_string(), source }
            })?,
        );
        let mut uploader = Uploader::new(sink, config.clone(), owner, pcap_header, global)?;
        // Compressed chunks waiting for the uploader: a bounded memory budget.
        let (done_tx, mut done_rx) = mpsc::channel::<(u64, CompressedChunk)>(options.memory_chunks.max(1));
        let (chunk_tx, chunk_rx) = crossbeam_channel::bounded::<(u64, Chunk)>(threads.max(1) * 2);
        let failed = Arc::new(Mutex::new(None));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let (rx, tx, pool, failed) = (chunk_rx.clone(), done_tx.clone(), pool.clone(), failed.clone());
            let spool = spool.clone();
            let compression = config.compression;
            let worker = std::thread::Builder::new()
                .name(format!("tapstream-zstd{i}"))
                .spawn(move || compress_loop(compression, &rx, &tx, &pool, &spool, &failed))
                .map_err(|e| UploadError::Task(format!("cannot start a compression thread: {e}")))?;
            workers.push(worker);
        }
        drop(done_tx);
        let age_check = config.object_max_age.min(Duration::from_secs(1));
        let task = runtime.spawn(async move {
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
                    _ = tick.tick() => uploader.tick().await?,
                }
                // The next chunk in order is in memory or in the spool, or not compressed yet.
                loop {
                    let chunk = match waiting.remove(&next) {
                        Some(c) => c,
                        None => match spool.take(next).map_err(spool_err)? {
                            Some(c) => c,
                            None => break,
                        },
                    };
                    uploader.push(chunk).await?;
                    next += 1;
                }
            }
            // Every chunk is compressed now; a chunk whose compression failed leaves a gap.
            loop {
                let from_memory = waiting.keys().next().copied();
                let from_spool = spool.first();
                let seq = match (from_memory, from_spool) {
                    (None, None) => break,
                    (a, b) => a.unwrap_or(u64::MAX).min(b.unwrap_or(u64::MAX)),
                };
                let chunk = match waiting.remove(&seq) {
                    Some(c) => c,
                    None => spool.take(seq).map_err(spool_err)?.expect("listed in the spool"),
                };
                uploader.push(chunk).await?;
            }
            let (spooled, _) = spool.counts();
            if spooled > 0 {
                log::info!("{spooled} chunks went through the spool");
            }
            let urls = uploader.finish().await?;
            spool.remove_if_empty().map_err(spool_err)?;
            Ok(urls)
        });
        Ok(Self { chunks: Some(chunk_tx), workers, uploader: Some(task), runtime, next_seq: 0, failed })
    }

    /// Hands a chunk on for compression and upload; waits while the compression threads are
    /// all busy. Returns the chunk if the stage has failed (its frames are then lost).
    pub fn write(&mut self, chunk: Chunk) -> Result<(), Chunk> {
        let seq = self.next_seq;
        self.next_seq += 1;
        match &self.chunks {
            Some(tx) => tx.send((seq, chunk)).map_err(|e| e.into_inner().1),
            None => Err(chunk),
        }
    }

    /// Whether the uploader has stopped (failed) early.
    pub fn has_failed(&self) -> bool {
        self.uploader.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for every chunk to be stored and every object finished; returns their URLs.
    pub fn finish(mut self) -> Result<Vec<String>, UploadError> {
        self.chunks = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let task = self.uploader.take().expect("finished once");
        let result = self.runtime.block_on(task).map_err(|e| UploadError::Task(e.to_string()))?;
        if let Some(e) = self.failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e);
        }
        result
    }
}

fn compress_loop(
    compression: crate::compress::Compression,
    chunks: &crossbeam_channel::Receiver<(u64, Chunk)>,
    out: &mpsc::Sender<(u64, CompressedChunk)>,
    pool: &ChunkPool,
    spool: &Spool,
    failed: &Mutex<Option<UploadError>>,
) {
    let mut compressor = match Compressor::new(compression) {
        Ok(c) => c,
        Err(e) => {
            failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e.into());
            return;
        }
    };
    for (seq, chunk) in chunks {
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
                    Ok(false) => {
                        if out.blocking_send((seq, done)).is_err() {
                            chunk.capture.count_dropped(packets);
                        }
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

/// Finishes what an earlier run left: spooled chunks become objects (named after their spool),
/// and multipart uploads under the prefix that no running capture owns are aborted, so none
/// keeps costing money.
async fn recover<S: Sink>(
    sink: &Arc<S>,
    config: &UploadConfig,
    owner: &ObjectOwner,
    options: &StoreOptions,
    global: &Arc<Semaphore>,
) -> Result<(), UploadError> {
    let io = |path: &std::path::Path| {
        let path = path.display().to_string();
        move |source| UploadError::Io { operation: "recover spool", path, source }
    };
    for (name, header, files) in Spool::leftovers(&options.spool_root).map_err(io(&options.spool_root))? {
        let dir = options.spool_root.join(&name);
        if !files.is_empty() {
            let owner = ObjectOwner { capture: name.clone(), ..owner.clone() };
            let mut uploader = Uploader::new(sink.clone(), config.clone(), owner, &header, global.clone())?;
            for file in &files {
                uploader.push(read_chunk(file).map_err(io(file))?).await?;
            }
            let urls = uploader.finish().await?;
            log::info!("uploaded {} chunks spooled by an earlier run as {}", files.len(), urls.join(", "));
        }
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    // Without a daemon that knows every live capture, only this capture's own key space is
    // certain to hold no live upload: the key up to its last '/'.
    let own = super::object::object_key(config, owner, 0, 0);
    let prefix = own.rsplit_once('/').map(|(p, _)| format!("{p}/")).unwrap_or_default();
    for pending in sink.list_multipart(&prefix).await? {
        log::warn!("aborting an unfinished upload of {} left by an earlier run", pending.key);
        sink.abort_multipart(&pending.key, &pending.upload_id).await?;
    }
    Ok(())
}
