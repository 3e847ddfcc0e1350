//! A capture's objects: compressed frames in, finished objects (and their indexes) out.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{sync::Semaphore, task::JoinSet};

use super::{
    ObjectMeta, PartDone, Sink, UploadError,
    spool::{Journal, JournalEntry},
};
use crate::metrics as m;
use crate::store::{
    catalog::{Catalog, ManifestObject},
    compress::{Compression, Compressor, FrameEntry, Index, seek_table},
};

/// The smallest part S3 accepts (except the last).
pub const MIN_PART_BYTES: usize = 5 << 20;

/// How a capture's objects are made.
#[derive(Clone, Debug)]
pub struct UploadConfig {
    /// Bytes per multipart part (at least 5 MiB).
    pub part_bytes: usize,
    /// Parts of one object uploading at once at most.
    pub parts_in_flight_per_object: usize,
    /// An object is finished and a new one begun past this many bytes.
    pub object_max_bytes: u64,
    /// ... or when it is this old, so recent traffic is readable soon.
    pub object_max_age: Duration,
    /// Key template: `{prefix}`, `{node}`, `{capture}`, `{start}` (UTC, e.g. 20261124T010203Z),
    /// `{seq}` (0000, 0001, ...), `{ext}` (`pcap.zst` or `pcap`).
    pub key_template: String,
    /// How chunks are stored.
    pub compression: Compression,
    /// How long a store may stay unreachable (retryable errors) before the capture fails;
    /// meanwhile requests are retried with backoff and chunks spool to disk.
    pub outage_max: Duration,
}

impl Default for UploadConfig {
    fn default() -> Self {
        Self {
            part_bytes: 8 << 20,
            parts_in_flight_per_object: 4,
            object_max_bytes: 1 << 30,
            object_max_age: Duration::from_secs(300),
            key_template: "{prefix}/{node}/{capture}/{start}-{seq}.{ext}".into(),
            compression: Compression::default(),
            outage_max: Duration::from_secs(3600),
        }
    }
}

/// Runs `op` until it succeeds, fails with an error that is not retryable, or has failed for
/// longer than `outage_max`; waits between attempts with exponential backoff (0.2 s to 10 s).
pub async fn with_retry<T, F, Fut>(
    what: &'static str,
    outage_max: Duration,
    mut op: F,
) -> Result<T, UploadError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, UploadError>>,
{
    let started = Instant::now();
    let mut wait = Duration::from_millis(200);
    let mut warned = false;
    loop {
        match op().await {
            Ok(v) => {
                if warned {
                    log::info!(
                        "{what}: the store answers again after {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                }
                return Ok(v);
            }
            Err(e) if e.is_retryable() && started.elapsed() < outage_max => {
                metrics::counter!(m::UPLOAD_RETRIES, "operation" => what).increment(1);
                if !warned {
                    log::warn!(
                        "{what}: {}; retrying (chunks spool to disk meanwhile)",
                        crate::report::chain(&e)
                    );
                    warned = true;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                metrics::counter!(m::UPLOAD_ERRORS, "retryable" => if e.is_retryable() { "true" } else { "false" })
                    .increment(1);
                return Err(e);
            }
        }
    }
}

/// One compressed chunk, ready to append.
#[derive(Debug)]
pub struct CompressedChunk {
    /// The frame's bytes.
    pub data: Vec<u8>,
    /// Bytes it decompresses to.
    pub decompressed_len: u64,
    /// First and last record timestamps (ns since the Unix epoch).
    pub first_ns: u64,
    pub last_ns: u64,
    /// Records in it.
    pub packets: u64,
}

/// Who the objects belong to, for their names and metadata.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ObjectOwner {
    /// Key prefix (no slashes at the ends).
    pub prefix: String,
    /// This host's name.
    pub node: String,
    /// Capture id.
    pub capture: String,
    /// For a capture over several interfaces, the interface (alias) these objects hold: its
    /// objects are named under `{capture}/<part>/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
    /// Object metadata (capture id, filter, node, tags, ...).
    pub metadata: Vec<(String, String)>,
    /// Object tags (customer, retention class).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub object_tags: Vec<(String, String)>,
    /// The capture's manifest, written again with each finished object.
    #[serde(skip)]
    pub catalog: Option<Arc<Catalog>>,
}

impl ObjectOwner {
    /// What `{capture}` stands for in keys: the capture id, and the part below it if any.
    pub fn capture_path(&self) -> String {
        match &self.part {
            Some(part) => format!("{}/{part}", self.capture),
            None => self.capture.clone(),
        }
    }
}

struct OpenObject {
    key: String,
    opened: Instant,
    upload_id: Option<String>,
    /// Bytes of the object so far.
    length: u64,
    /// Bytes not yet in a part.
    pending: Vec<u8>,
    next_part: i32,
    parts: JoinSet<Result<PartDone, UploadError>>,
    /// Parts already uploaded.
    done: Vec<PartDone>,
    /// Offset in the object of each part sent (part `n` at index `n - 1`).
    part_starts: Vec<u64>,
    /// Offset in the object of the end of each part sent.
    part_ends: Vec<u64>,
    /// Parts and frames already in the journal.
    journaled_parts: usize,
    journaled_frames: usize,
    /// Bodies of the parts after the first run of confirmed parts: what a failure would lose.
    unconfirmed: BTreeMap<i32, bytes::Bytes>,
    frames: Vec<FrameEntry>,
    /// The seek table is in the object: nothing more may be appended.
    sealed: bool,
    /// Continued from an earlier run's [`ResumeRecord`] (never aborted: its parts hold data).
    resumed: bool,
}

impl OpenObject {
    /// Parts 1..=k confirmed by the store, for the largest such k.
    fn confirmed_parts(&self) -> usize {
        let mut numbers: Vec<i32> = self.done.iter().map(|p| p.number).collect();
        numbers.sort_unstable();
        numbers.dedup();
        numbers.iter().enumerate().take_while(|(i, n)| **n == *i as i32 + 1).count()
    }

    /// Records a confirmed part and lets go of the bodies no failure can lose any more.
    fn confirm(&mut self, part: PartDone) {
        self.done.push(part);
        let k = self.confirmed_parts() as i32;
        self.unconfirmed.retain(|n, _| *n > k);
    }

    /// Notes in `journal` the parts confirmed since the last note, with the frames in them, so
    /// that if the process dies the next run completes the upload with them.
    fn journal_confirmed(&mut self, journal: Option<&Journal>) {
        let Some(journal) = journal else { return };
        let k = self.confirmed_parts();
        let Some(upload_id) = &self.upload_id else { return };
        if k <= self.journaled_parts {
            return;
        }
        let end = self.part_ends[k - 1];
        let mut parts: Vec<PartDone> = self
            .done
            .iter()
            .filter(|p| p.number as usize > self.journaled_parts && p.number as usize <= k)
            .cloned()
            .collect();
        parts.sort_by_key(|p| p.number);
        parts.dedup_by_key(|p| p.number);
        let frames: Vec<FrameEntry> = self.frames[self.journaled_frames..]
            .iter()
            .take_while(|f| f.offset + f.length <= end)
            .copied()
            .collect();
        self.journaled_frames += frames.len();
        self.journaled_parts = k;
        journal.append(&JournalEntry::Confirmed {
            key: self.key.clone(),
            upload_id: upload_id.clone(),
            parts,
            frames,
            length: end,
            sealed: self.sealed && k == self.part_ends.len() && self.pending.is_empty(),
        });
    }
}

/// An unfinished multipart upload handed from a failed run to the next: its confirmed parts
/// and the frames they hold. The frames after them are spooled as chunks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResumeRecord {
    /// Object key.
    pub key: String,
    /// Upload id.
    pub upload_id: String,
    /// Parts 1..=k, confirmed by the store (may be empty: the upload is then only aborted).
    pub parts: Vec<PartDone>,
    /// The frames of those parts (the PCAP header first).
    pub frames: Vec<FrameEntry>,
    /// Bytes of those parts.
    pub length: u64,
    /// The seek table is in the last part: the upload only needs completing.
    pub sealed: bool,
}

/// What a failed uploader still holds: the open upload's confirmed part, and every chunk the
/// store has not confirmed, in order.
#[derive(Debug, Default)]
pub struct Salvage {
    /// The open multipart upload, if there was one.
    pub resume: Option<ResumeRecord>,
    /// Chunks not confirmed by the store, in the order they were pushed.
    pub chunks: Vec<CompressedChunk>,
    /// Sequence number the next object would have had.
    pub next_object: u32,
}

/// Makes the objects of one capture.
pub struct Uploader<S: Sink> {
    sink: Arc<S>,
    config: UploadConfig,
    owner: ObjectOwner,
    /// Parts in flight over all uploaders sharing it.
    global: Arc<Semaphore>,
    per_object: Arc<Semaphore>,
    header: Vec<u8>,
    open: Option<OpenObject>,
    seq: u32,
    done: Vec<String>,
    /// Where progress is noted for the next run, should this one die.
    journal: Option<Arc<Journal>>,
}

impl<S: Sink> Uploader<S> {
    /// An uploader whose objects start with the PCAP file header `pcap_header`. `global`
    /// bounds the parts in flight over every uploader that shares it.
    pub fn new(
        sink: Arc<S>,
        config: UploadConfig,
        owner: ObjectOwner,
        pcap_header: &[u8],
        global: Arc<Semaphore>,
    ) -> Result<Self, UploadError> {
        let mut compressor = Compressor::new(config.compression)?;
        let header = compressor.frame(pcap_header)?;
        let per_object = Arc::new(Semaphore::new(config.parts_in_flight_per_object.max(1)));
        Ok(Self {
            sink,
            config,
            owner,
            global,
            per_object,
            header,
            open: None,
            seq: 0,
            done: Vec::new(),
            journal: None,
        })
    }

    /// Names the next object `seq` (an uploader continuing an earlier run's objects).
    pub fn with_next_object(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    /// Notes progress in `journal` (objects begun, parts confirmed, objects finished).
    pub fn with_journal(mut self, journal: Arc<Journal>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Continues an earlier run's multipart upload: chunks pushed next are appended after its
    /// confirmed parts (or, if it is sealed, it is completed first and they begin a new object).
    pub fn resume(&mut self, record: ResumeRecord) {
        debug_assert!(self.open.is_none());
        let k = record.parts.len();
        self.open = Some(OpenObject {
            key: record.key,
            opened: Instant::now(),
            upload_id: Some(record.upload_id),
            length: record.length,
            pending: Vec::new(),
            next_part: k as i32 + 1,
            parts: JoinSet::new(),
            done: record.parts,
            part_starts: vec![0; k],
            part_ends: vec![record.length; k],
            journaled_parts: k,
            journaled_frames: record.frames.len(),
            unconfirmed: BTreeMap::new(),
            frames: record.frames,
            sealed: record.sealed,
            resumed: true,
        });
    }

    /// Appends a chunk to the open object (beginning one if needed), uploading full parts and
    /// finishing the object when it is large enough.
    pub async fn push(&mut self, chunk: CompressedChunk) -> Result<(), UploadError> {
        if self.open.as_ref().is_some_and(|o| o.sealed) {
            self.finish_object().await?;
        }
        if self.open.is_none() {
            self.begin(chunk.first_ns);
        }
        let obj = self.open.as_mut().expect("begun above");
        obj.frames.push(FrameEntry {
            offset: obj.length,
            length: chunk.data.len() as u64,
            decompressed_length: chunk.decompressed_len,
            first_ns: chunk.first_ns,
            last_ns: chunk.last_ns,
            packets: chunk.packets,
        });
        obj.length += chunk.data.len() as u64;
        obj.pending.extend_from_slice(&chunk.data);
        if obj.pending.len() >= self.config.part_bytes.max(MIN_PART_BYTES) {
            self.send_part().await?;
        }
        if self.open.as_ref().is_some_and(|o| o.length >= self.config.object_max_bytes) {
            self.finish_object().await?;
        }
        Ok(())
    }

    /// Finishes the open object if it is older than the age limit.
    pub async fn tick(&mut self) -> Result<(), UploadError> {
        if self.open.as_ref().is_some_and(|o| o.opened.elapsed() >= self.config.object_max_age) {
            self.finish_object().await?;
        }
        Ok(())
    }

    /// Finishes the open object and returns the URLs of every object made.
    pub async fn finish(mut self) -> Result<Vec<String>, UploadError> {
        self.finish_objects().await
    }

    /// Like [`Uploader::finish`], but keeps the uploader, so that after a failure what it
    /// holds can still be salvaged.
    pub async fn finish_objects(&mut self) -> Result<Vec<String>, UploadError> {
        self.finish_object().await?;
        Ok(std::mem::take(&mut self.done))
    }

    fn begin(&mut self, first_ns: u64) {
        let key = object_key(&self.config, &self.owner, first_ns, self.seq);
        if let Some(journal) = &self.journal {
            journal.append(&JournalEntry::Begun { seq: self.seq });
        }
        self.seq += 1;
        let header = FrameEntry {
            offset: 0,
            length: self.header.len() as u64,
            decompressed_length: tapstream_pcap::FILE_HEADER_LEN as u64,
            ..FrameEntry::default()
        };
        self.open = Some(OpenObject {
            key,
            opened: Instant::now(),
            upload_id: None,
            length: self.header.len() as u64,
            pending: self.header.clone(),
            next_part: 1,
            parts: JoinSet::new(),
            done: Vec::new(),
            part_starts: Vec::new(),
            part_ends: Vec::new(),
            journaled_parts: 0,
            journaled_frames: 0,
            unconfirmed: BTreeMap::new(),
            frames: vec![header],
            sealed: false,
            resumed: false,
        });
    }

    fn meta(&self) -> ObjectMeta {
        let content_type = match self.config.compression {
            Compression::None => "application/vnd.tcpdump.pcap",
            Compression::Zstd { .. } => "application/zstd",
        };
        ObjectMeta {
            content_type: content_type.into(),
            metadata: self.owner.metadata.clone(),
            tags: self.owner.object_tags.clone(),
        }
    }

    /// Uploads the pending bytes of the open object as its next part, waiting for room under
    /// the in-flight limits first.
    async fn send_part(&mut self) -> Result<(), UploadError> {
        let meta = self.meta();
        let obj = self.open.as_mut().expect("an open object");
        if obj.upload_id.is_none() {
            let (sink, key) = (&self.sink, &obj.key);
            let id = with_retry("CreateMultipartUpload", self.config.outage_max, || {
                sink.create_multipart(key, &meta)
            })
            .await?;
            obj.upload_id = Some(id);
        }
        let global = self.global.clone().acquire_owned().await.expect("the limits are never closed");
        let local = self.per_object.clone().acquire_owned().await.expect("the limits are never closed");
        let body = bytes::Bytes::from(std::mem::take(&mut obj.pending));
        let number = obj.next_part;
        obj.next_part += 1;
        obj.part_starts.push(obj.length - body.len() as u64);
        obj.part_ends.push(obj.length);
        obj.unconfirmed.insert(number, body.clone());
        let (sink, key, id) =
            (self.sink.clone(), obj.key.clone(), obj.upload_id.clone().expect("created above"));
        let outage_max = self.config.outage_max;
        obj.parts.spawn(async move {
            let _permits = (global, local);
            let in_flight = metrics::gauge!(m::UPLOAD_PARTS_IN_FLIGHT);
            in_flight.increment(1.0);
            let started = Instant::now();
            let len = body.len() as u64;
            let done =
                with_retry("UploadPart", outage_max, || sink.upload_part(&key, &id, number, body.clone()))
                    .await;
            in_flight.decrement(1.0);
            if done.is_ok() {
                metrics::histogram!(m::UPLOAD_PART_SECONDS).record(started.elapsed().as_secs_f64());
                metrics::counter!(m::UPLOAD_PARTS).increment(1);
                metrics::counter!(m::UPLOAD_BYTES).increment(len);
            }
            done
        });
        // Surface failures early rather than at the end of the object. A failed uploader keeps
        // its open object for [`Uploader::salvage`].
        while let Some(done) = obj.parts.try_join_next() {
            obj.confirm(part_result(&obj.key, done)?);
            obj.journal_confirmed(self.journal.as_deref());
        }
        Ok(())
    }

    /// Ends the open object: the seek table goes last; a small object is one PutObject, a
    /// large one's last part is sent and the upload completed with its parts in order. Then the
    /// index object is stored beside it.
    async fn finish_object(&mut self) -> Result<(), UploadError> {
        let meta = self.meta();
        let Some(obj) = self.open.as_mut() else { return Ok(()) };
        if !obj.sealed {
            let table = seek_table(self.config.compression, &obj.frames);
            obj.length += table.len() as u64;
            obj.pending.extend_from_slice(&table);
            obj.sealed = true;
        }
        if obj.upload_id.is_none() {
            let body = bytes::Bytes::from(std::mem::take(&mut obj.pending));
            let (sink, key) = (&self.sink, &obj.key);
            let put =
                with_retry("PutObject", self.config.outage_max, || sink.put_object(key, body.clone(), &meta))
                    .await;
            if let Err(e) = put {
                obj.pending = Vec::from(body); // kept for a salvage
                return Err(e);
            }
            // A small object is one PutObject: its bytes count as uploaded like a part's.
            metrics::counter!(m::UPLOAD_BYTES).increment(body.len() as u64);
            let obj = self.open.take().expect("open");
            return self.store_index(obj.key, obj.frames, obj.length).await;
        }
        if !obj.pending.is_empty() {
            self.send_part().await?;
        }
        let obj = self.open.as_mut().expect("open");
        while let Some(done) = obj.parts.join_next().await {
            obj.confirm(part_result(&obj.key, done)?);
            obj.journal_confirmed(self.journal.as_deref());
        }
        let mut parts = obj.done.clone();
        parts.sort_by_key(|p| p.number);
        let id = obj.upload_id.clone().expect("multipart");
        let (sink, key) = (&self.sink, &obj.key);
        with_retry("CompleteMultipartUpload", self.config.outage_max, || {
            sink.complete_multipart(key, &id, parts.clone())
        })
        .await?;
        let obj = self.open.take().expect("open");
        self.store_index(obj.key, obj.frames, obj.length).await
    }

    async fn store_index(
        &mut self,
        key: String,
        frames: Vec<FrameEntry>,
        length: u64,
    ) -> Result<(), UploadError> {
        let index = Index {
            version: 1,
            object: key.clone(),
            capture_id: self.owner.capture.clone(),
            compression: self.config.compression,
            frames,
            object_length: length,
        };
        let body = bytes::Bytes::from(serde_json::to_vec(&index).expect("an index serializes"));
        let meta = ObjectMeta {
            content_type: "application/json".into(),
            metadata: self.owner.metadata.clone(),
            tags: self.owner.object_tags.clone(),
        };
        let (sink, ikey) = (&self.sink, index_key(&key));
        with_retry("PutObject", self.config.outage_max, || sink.put_object(&ikey, body.clone(), &meta))
            .await?;
        let url = self.sink.url(&key);
        if let Some(journal) = &self.journal {
            let packets = index.frames.iter().map(|f| f.packets).sum();
            journal.append(&JournalEntry::Finished { key, url: url.clone(), packets });
        }
        self.done.push(url);
        metrics::counter!(m::OBJECTS).increment(1);
        if let Some(catalog) = &self.owner.catalog {
            let records = index.frames.iter().skip(1).filter(|f| f.packets > 0);
            catalog.record_object(ManifestObject {
                index: ikey,
                interface: self.owner.part.clone(),
                first_ns: records.clone().map(|f| f.first_ns).min().unwrap_or(0),
                last_ns: records.clone().map(|f| f.last_ns).max().unwrap_or(0),
                frames: records.map(|f| f.packets).sum(),
                bytes: length,
                key: index.object,
            });
            catalog.write_or_log(&*self.sink, &self.owner.prefix, self.config.outage_max).await;
        }
        Ok(())
    }

    /// After a failure: stops the parts in flight and returns what the store has not
    /// confirmed, so nothing is lost. The uploader holds no object afterwards.
    pub async fn salvage(&mut self) -> Salvage {
        let next_object = self.seq;
        let Some(mut obj) = self.open.take() else { return Salvage { next_object, ..Salvage::default() } };
        while let Some(done) = obj.parts.try_join_next() {
            if let Ok(Ok(part)) = done {
                obj.confirm(part);
            }
        }
        obj.parts.shutdown().await;
        let k = obj.confirmed_parts();
        let sent = obj.part_starts.len();
        let confirmed_end = obj.part_starts.get(k).copied().unwrap_or(obj.length - obj.pending.len() as u64);
        let mut rest = Vec::new();
        for (_, body) in obj.unconfirmed.range(k as i32 + 1..) {
            rest.extend_from_slice(body);
        }
        rest.extend_from_slice(&obj.pending);
        // Frames after the confirmed parts, cut back out of the bytes (the PCAP header, frame 0,
        // is made again by whoever uploads them).
        let chunks = obj
            .frames
            .iter()
            .skip(1)
            .filter(|f| f.offset >= confirmed_end)
            .map(|f| {
                let at = (f.offset - confirmed_end) as usize;
                CompressedChunk {
                    data: rest[at..at + f.length as usize].to_vec(),
                    decompressed_len: f.decompressed_length,
                    first_ns: f.first_ns,
                    last_ns: f.last_ns,
                    packets: f.packets,
                }
            })
            .collect();
        let mut parts = obj.done.clone();
        parts.sort_by_key(|p| p.number);
        parts.dedup_by_key(|p| p.number);
        parts.truncate(k);
        let resume = obj.upload_id.map(|upload_id| ResumeRecord {
            key: obj.key,
            upload_id,
            parts,
            frames: obj.frames.into_iter().filter(|f| f.offset < confirmed_end).collect(),
            length: confirmed_end,
            sealed: obj.sealed && k == sent && obj.pending.is_empty(),
        });
        Salvage { resume, chunks, next_object }
    }

    /// After a failure: aborts the open multipart upload (unless it continues an earlier run's,
    /// whose parts hold data), so it costs nothing.
    pub async fn abort(&mut self) {
        let Some(mut obj) = self.open.take() else { return };
        obj.parts.shutdown().await;
        if let Some(id) = &obj.upload_id
            && !obj.resumed
            && let Err(e) = self.sink.abort_multipart(&obj.key, id).await
        {
            log::error!("cannot abort the upload of {}: {}", obj.key, crate::report::chain(&e));
        }
    }
}

/// What the task uploading a part of `key` ended with.
fn part_result(
    key: &str,
    done: Result<Result<PartDone, UploadError>, tokio::task::JoinError>,
) -> Result<PartDone, UploadError> {
    done.map_err(|source| UploadError::PartTask { key: key.to_owned(), source })?
}

/// The key of an index object.
pub fn index_key(object_key: &str) -> String {
    format!("{object_key}.idx.json")
}

/// The key of object `seq` of a capture whose first frame is at `first_ns`.
pub fn object_key(config: &UploadConfig, owner: &ObjectOwner, first_ns: u64, seq: u32) -> String {
    let key = config
        .key_template
        .replace("{prefix}", &owner.prefix)
        .replace("{node}", &owner.node)
        .replace("{capture}", &owner.capture_path())
        .replace("{start}", &utc_compact(first_ns))
        .replace("{seq}", &format!("{seq:04}"))
        .replace("{ext}", config.compression.extension());
    key.trim_start_matches('/').replace("//", "/")
}

/// `ns` since the Unix epoch as `YYYYMMDDTHHMMSSZ`.
pub fn utc_compact(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fault::{Fault, FaultSink, Operation, When};

    #[test]
    fn keys_follow_the_template() {
        let owner = ObjectOwner {
            prefix: "caps".into(),
            node: "tap1".into(),
            capture: "c42".into(),
            ..Default::default()
        };
        let key = object_key(&UploadConfig::default(), &owner, 1_795_000_000_123_000_000, 3);
        assert_eq!(key, "caps/tap1/c42/20261118T110640Z-0003.pcap.zst");
        let part = ObjectOwner { part: Some("west".into()), ..owner.clone() };
        let key = object_key(&UploadConfig::default(), &part, 1_795_000_000_123_000_000, 3);
        assert_eq!(key, "caps/tap1/c42/west/20261118T110640Z-0003.pcap.zst");
        let owner = ObjectOwner { prefix: "".into(), ..owner };
        assert!(
            object_key(&UploadConfig::default(), &owner, 0, 0).starts_with("tap1/c42/19700101T000000Z-0000")
        );
    }

    #[test]
    fn utc_dates_are_right_across_leap_years() {
        assert_eq!(utc_compact(0), "19700101T000000Z");
        assert_eq!(utc_compact(951_782_400 * 1_000_000_000), "20000229T000000Z");
        // 2100 is not a leap year; `date -u -d @4107542399` agrees.
        assert_eq!(utc_compact(4_107_542_399 * 1_000_000_000), "21000228T235959Z");
        assert_eq!(utc_compact(4_107_542_400 * 1_000_000_000), "21000301T000000Z");
    }

    /// Chunks of incompressible bytes, so that parts fill quickly.
    fn random_chunks(count: usize, len: usize) -> Vec<(Vec<u8>, CompressedChunk)> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut compressor = Compressor::new(Compression::default()).unwrap();
        (0..count)
            .map(|i| {
                let raw: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let data = compressor.frame(&raw).unwrap();
                let t = i as u64 * 1_000_000_000;
                let chunk = CompressedChunk {
                    data,
                    decompressed_len: len as u64,
                    first_ns: t,
                    last_ns: t + 1,
                    packets: 1,
                };
                (raw, chunk)
            })
            .collect()
    }

    /// What the upload tests share: a runtime, an owner, and 5 MiB parts, two in flight.
    fn fixture() -> (tokio::runtime::Runtime, ObjectOwner, UploadConfig) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let owner =
            ObjectOwner { prefix: "p".into(), node: "n".into(), capture: "c".into(), ..Default::default() };
        let config =
            UploadConfig { part_bytes: MIN_PART_BYTES, parts_in_flight_per_object: 2, ..Default::default() };
        (rt, owner, config)
    }

    /// Asserts that the object at `url` is `header` and then every chunk once, in order.
    fn assert_holds(url: &str, header: &[u8], chunks: &[(Vec<u8>, CompressedChunk)]) {
        let path = url.strip_prefix("file://").unwrap();
        let stored = zstd::stream::decode_all(&std::fs::read(path).unwrap()[..]).unwrap();
        let mut expected = header.to_vec();
        for (raw, _) in chunks {
            expected.extend_from_slice(raw);
        }
        assert!(stored == expected, "the object holds every chunk once, in order");
    }

    #[test]
    fn requests_the_store_fails_for_a_moment_are_sent_again_and_the_object_is_exact() {
        let (rt, owner, config) = fixture();
        let dir = tempfile::tempdir().unwrap();
        let header = b"pcap-file-header".to_vec();
        // 12 MiB in 5 MiB parts: three parts.
        let chunks = random_chunks(12, 1 << 20);
        let sink = Arc::new(FaultSink::new(crate::store::dir::DirSink::new(dir.path()).unwrap()));
        sink.inject(Operation::UploadPart, When::Call(2), Fault::Retryable("SlowDown: busy".into()));
        let later = Fault::Retryable("InternalError: later".into());
        sink.inject(Operation::CompleteMultipart, When::Call(1), later);
        let urls = rt.block_on(async {
            let mut up =
                Uploader::new(sink.clone(), config, owner, &header, Arc::new(Semaphore::new(4))).unwrap();
            for (_, chunk) in &chunks {
                up.push(CompressedChunk { data: chunk.data.clone(), ..*chunk }).await.unwrap();
            }
            up.finish().await.unwrap()
        });
        let parts = sink.counts(Operation::UploadPart);
        assert_eq!((parts.calls, parts.injected), (4, 1), "three parts, one sent twice: {parts:?}");
        let complete = sink.counts(Operation::CompleteMultipart);
        assert_eq!((complete.calls, complete.injected), (2, 1), "{complete:?}");
        assert_eq!(urls.len(), 1, "{urls:?}");
        assert_holds(&urls[0], &header, &chunks);
    }

    #[test]
    fn a_failed_upload_is_salvaged_and_the_next_run_completes_it_byte_for_byte() {
        let (rt, owner, config) = fixture();
        let dir = tempfile::tempdir().unwrap();
        let header = b"pcap-file-header".to_vec();
        let chunks = random_chunks(24, 1 << 20);
        let mut chunks_iter = chunks.iter().map(|(_, c)| CompressedChunk { data: c.data.clone(), ..*c });
        let (salvage, error) = rt.block_on(async {
            // The directory store, refusing part 3 of every upload for good.
            let sink = Arc::new(FaultSink::new(crate::store::dir::DirSink::new(dir.path()).unwrap()));
            sink.inject(Operation::UploadPart, When::Part(3), Fault::Failed("AccessDenied: revoked".into()));
            let mut up = Uploader::new(
                sink.clone(),
                config.clone(),
                owner.clone(),
                &header,
                Arc::new(Semaphore::new(4)),
            )
            .unwrap();
            let mut error = None;
            for chunk in chunks_iter.by_ref() {
                if let Err(e) = up.push(chunk).await {
                    error = Some(e);
                    break;
                }
            }
            if error.is_none() {
                error = up.finish_objects().await.err();
            }
            let salvage = up.salvage().await;
            let parts = sink.counts(Operation::UploadPart);
            assert_eq!(parts.injected, 1, "part 3 is refused once, and not retried: {parts:?}");
            assert_eq!(parts.in_flight, 0, "no part is still uploading after the salvage");
            (salvage, error.expect("part 3 fails"))
        });
        assert!(error.to_string().contains("AccessDenied"), "{error}");
        let resume = salvage.resume.clone().expect("an open multipart upload");
        // Part 3 starts once part 1 is done (two in flight); part 2 may still be in flight
        // when part 3's failure is seen, and is then given up and salvaged too.
        let numbers: Vec<i32> = resume.parts.iter().map(|p| p.number).collect();
        assert!(numbers == [1] || numbers == [1, 2], "the confirmed run of parts: {numbers:?}");
        assert!(!resume.sealed);
        let kept: u64 = resume.frames.iter().map(|f| f.packets).sum();
        assert_eq!(
            kept as usize + salvage.chunks.len(),
            chunks.len() - chunks_iter.len(),
            "nothing pushed is lost"
        );

        // The next run, with a store that works: resume, push the salvaged and the rest.
        let urls = rt.block_on(async {
            let sink = Arc::new(crate::store::dir::DirSink::new(dir.path()).unwrap());
            let mut up =
                Uploader::new(sink, config.clone(), owner.clone(), &header, Arc::new(Semaphore::new(4)))
                    .unwrap()
                    .with_next_object(salvage.next_object);
            up.resume(resume);
            for chunk in salvage.chunks.into_iter().chain(chunks_iter) {
                up.push(chunk).await.unwrap();
            }
            up.finish_objects().await.unwrap()
        });
        assert_eq!(urls.len(), 1, "{urls:?}");
        assert_holds(&urls[0], &header, &chunks);
        let path = urls[0].strip_prefix("file://").unwrap();
        let index: Index = serde_json::from_slice(&std::fs::read(index_key(path)).unwrap()).unwrap();
        assert_eq!(index.frames.iter().map(|f| f.packets).sum::<u64>(), chunks.len() as u64);
        assert_eq!(std::fs::read_dir(dir.path().join(".uploads")).unwrap().count(), 0, "no upload left open");
    }
}
