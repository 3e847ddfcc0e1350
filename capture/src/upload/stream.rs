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
};
use crate::{
    chunk::{Chunk, ChunkPool},
    compress::Compressor,
};

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
        threads: usize,
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
        let sink = Arc::new(runtime.block_on(make_sink())?);
        let global = Arc::new(Semaphore::new(config.parts_in_flight_per_object.max(1)));
        let mut uploader = Uploader::new(sink, config.clone(), owner, pcap_header, global)?;
        // Compressed chunks waiting for the uploader: a bounded memory budget.
        let (done_tx, mut done_rx) = mpsc::channel::<(u64, CompressedChunk)>(threads.max(1) * 4);
        let (chunk_tx, chunk_rx) = crossbeam_channel::bounded::<(u64, Chunk)>(threads.max(1) * 2);
        let failed = Arc::new(Mutex::new(None));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let (rx, tx, pool, failed) = (chunk_rx.clone(), done_tx.clone(), pool.clone(), failed.clone());
            let compression = config.compression;
            let worker = std::thread::Builder::new()
                .name(format!("tapstream-zstd{i}"))
                .spawn(move || compress_loop(compression, &rx, &tx, &pool, &failed))
                .map_err(|e| UploadError::Task(format!("cannot start a compression thread: {e}")))?;
            workers.push(worker);
        }
        drop(done_tx);
        let age_check = config.object_max_age.min(Duration::from_secs(1));
        let task = runtime.spawn(async move {
            let mut waiting = BTreeMap::new();
            let mut next = 0u64;
            let mut tick = tokio::time::interval(age_check);
            loop {
                tokio::select! {
                    got = done_rx.recv() => {
                        let Some((seq, chunk)) = got else { break };
                        waiting.insert(seq, chunk);
                        while let Some(chunk) = waiting.remove(&next) {
                            uploader.push(chunk).await?;
                            next += 1;
                        }
                    }
                    _ = tick.tick() => uploader.tick().await?,
                }
            }
            // A chunk whose compression failed leaves a gap: append what is left in order.
            for (_, chunk) in waiting {
                uploader.push(chunk).await?;
            }
            uploader.finish().await
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
        let frame = compressor.frame(&chunk.data);
        let (packets, first_ns, last_ns, len) =
            (u64::from(chunk.frames), chunk.first_ns, chunk.last_ns, chunk.data.len() as u64);
        match frame {
            Ok(data) => {
                pool.put(chunk.data);
                let done = CompressedChunk { data, decompressed_len: len, first_ns, last_ns, packets };
                if out.blocking_send((seq, done)).is_err() {
                    chunk.capture.count_dropped(packets);
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
