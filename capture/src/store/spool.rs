//! The spool: compressed chunks that cannot go to the uploader now (the store is slow or
//! unreachable) wait in a bounded local directory, in files named by their sequence number,
//! and go up in order when the store answers again. Chunks left by a process that was killed
//! are found on the next start and uploaded ([`Spool::leftovers`]).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use super::{
    PartDone,
    object::{CompressedChunk, ObjectOwner, ResumeRecord},
};
use crate::store::compress::{Compression, FrameEntry};

/// Bytes before the chunk in a spool file: decompressed length, first and last timestamp,
/// record count, each a little-endian u64.
const HEADER: usize = 32;

/// The file holding the PCAP file header of a spooled capture.
pub const PCAP_HEADER_FILE: &str = "header.pcap";

/// The file describing a spool left by a capture whose store failed ([`SalvageRecord`]).
const SALVAGE_FILE: &str = "salvage.json";

/// Written when a capture's store fails for good (e.g. its credentials were revoked): whose
/// chunks these are and the multipart upload they continue, so the next run finishes the
/// capture's objects under its own name.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SalvageRecord {
    /// The capture's owner (prefix, node, id, metadata).
    pub owner: ObjectOwner,
    /// How the chunks are compressed.
    pub compression: Compression,
    /// Sequence number of the next object.
    pub next_object: u32,
    /// The multipart upload that was open.
    pub resume: Option<ResumeRecord>,
    /// Why the store failed, as the store said it.
    pub error: String,
}

/// The file saying whose chunks a spool holds ([`SpoolOwner`]), written when it is created.
const OWNER_FILE: &str = "owner.json";

/// The file where a capture's uploader notes its progress ([`JournalEntry`], one JSON a line).
const JOURNAL_FILE: &str = "journal.jsonl";

/// Whose chunks a spool holds and how their objects are named, written when the capture
/// starts: if the process dies, the next run uploads them under the capture's own name (not the
/// spool's) and finds the capture's open multipart upload.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SpoolOwner {
    /// The capture's owner (prefix, node, id, metadata).
    pub owner: ObjectOwner,
    /// How the chunks are compressed.
    pub compression: Compression,
    /// The object key template in force.
    pub key_template: String,
}

/// What a capture's uploader has done, as it goes: enough for the next run to finish the
/// capture's objects if the process dies (see [`JournalState`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalEntry {
    /// Object number `seq` was begun.
    Begun { seq: u32 },
    /// More parts of the multipart upload of `key` are confirmed by the store: `parts` (the
    /// new ones) and the frames that lie in them; the confirmed parts now end at `length`.
    Confirmed {
        key: String,
        upload_id: String,
        parts: Vec<PartDone>,
        frames: Vec<FrameEntry>,
        length: u64,
        /// The seek table is in the confirmed parts: the upload only needs completing.
        sealed: bool,
    },
    /// The object `key` is finished (index stored) as `url`, with `packets` records.
    Finished { key: String, url: String, packets: u64 },
}

/// The journal file of a live spool; appends are small and rare (an object begun, a part
/// confirmed, an object finished).
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl Journal {
    /// Appends `entry`. A journal that cannot be written only costs the next run's recovery
    /// after a crash, never the capture: the error is logged.
    pub fn append(&self, entry: &JournalEntry) {
        use std::io::Write as _;
        let mut line = serde_json::to_vec(entry).expect("a journal entry serializes");
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(&line) {
            log::error!("cannot write the journal {}: {e}", self.path.display());
        }
    }
}

/// What a dead run's journal says: the objects it finished, the upload it had open, and the
/// number its next object would have had.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JournalState {
    /// Objects finished: (URL, records).
    pub finished: Vec<(String, u64)>,
    /// The multipart upload left open, with its confirmed parts and their frames.
    pub open: Option<ResumeRecord>,
    /// Number of the next object (above every object begun).
    pub next_object: u32,
}

impl JournalState {
    /// Replays `entries`.
    pub fn replay(entries: &[JournalEntry]) -> Self {
        let mut state = Self::default();
        for entry in entries {
            match entry {
                JournalEntry::Begun { seq } => state.next_object = state.next_object.max(seq + 1),
                JournalEntry::Confirmed { key, upload_id, parts, frames, length, sealed } => {
                    // A new object's upload replaces the one before (finished or given up).
                    state.open.take_if(|o| o.upload_id != *upload_id);
                    let open = state.open.get_or_insert_with(|| ResumeRecord {
                        key: key.clone(),
                        upload_id: upload_id.clone(),
                        parts: Vec::new(),
                        frames: Vec::new(),
                        length: 0,
                        sealed: false,
                    });
                    open.parts.extend(parts.iter().cloned());
                    open.frames.extend(frames.iter().copied());
                    open.length = *length;
                    open.sealed = *sealed;
                }
                JournalEntry::Finished { key, url, packets } => {
                    state.open.take_if(|o| o.key == *key);
                    state.finished.push((url.clone(), *packets));
                }
            }
        }
        state
    }
}

/// The file naming the store a spool's chunks are for (`s3://bucket/`, `file:///dir/`), so
/// that they are only ever uploaded there.
const DESTINATION_FILE: &str = "destination";

/// The lock file a live spool holds (flock), so another process never takes its chunks.
const LOCK_FILE: &str = "lock";
/// The folder under the spool root for spools that can never be uploaded.
pub const QUARANTINE_DIR: &str = "quarantine";
/// In a quarantined spool: why it was quarantined.
const REASON_FILE: &str = "REASON";

/// A capture's spool directory.
pub struct Spool {
    dir: PathBuf,
    _lock: std::fs::File,
    limit_bytes: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    files: BTreeMap<u64, u64>,
    bytes: u64,
    spooled: u64,
    /// Chunks that found the spool full and were dropped: the uploader passes over them.
    lost: std::collections::BTreeSet<u64>,
}

impl Spool {
    /// A spool in `dir` (created) holding at most `limit_bytes`; `pcap_header` is kept beside
    /// the chunks so leftovers can be made into objects after a restart.
    pub fn create(
        dir: PathBuf,
        limit_bytes: u64,
        pcap_header: &[u8],
        destination: &str,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let lock = std::fs::File::create(dir.join(LOCK_FILE))?;
        if !crate::sys::try_lock_exclusive(&lock)? {
            return Err(std::io::Error::other(format!("{} is in use by another process", dir.display())));
        }
        std::fs::write(dir.join(DESTINATION_FILE), destination)?;
        std::fs::write(dir.join(PCAP_HEADER_FILE), pcap_header)?;
        Ok(Self { dir, _lock: lock, limit_bytes, state: Mutex::default() })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:016}.chunk"))
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores chunk `seq`; false if the spool is full (see [`Spool::mark_lost`]).
    pub fn put(&self, seq: u64, chunk: &CompressedChunk) -> std::io::Result<bool> {
        self.put_within(seq, chunk, true)
    }

    /// Stores chunk `seq` even past the limit: for chunks a failed upload hands back, which
    /// would otherwise be lost (at most the parts that were in flight).
    pub fn put_over_limit(&self, seq: u64, chunk: &CompressedChunk) -> std::io::Result<()> {
        self.put_within(seq, chunk, false).map(|_| ())
    }

    fn put_within(&self, seq: u64, chunk: &CompressedChunk, limited: bool) -> std::io::Result<bool> {
        let len = (HEADER + chunk.data.len()) as u64;
        {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if limited && state.bytes + len > self.limit_bytes {
                return Ok(false);
            }
        }
        let mut body = Vec::with_capacity(len as usize);
        for v in [chunk.decompressed_len, chunk.first_ns, chunk.last_ns, chunk.packets] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(&chunk.data);
        write_whole(&self.path(seq), &body)?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.files.insert(seq, len);
        state.bytes += len;
        state.spooled += 1;
        metrics::gauge!(crate::metrics::SPOOL_CHUNKS).increment(1.0);
        metrics::gauge!(crate::metrics::SPOOL_BYTES).increment(len as f64);
        Ok(true)
    }

    /// Takes chunk `seq` out of the spool, if it is there.
    pub fn take(&self, seq: u64) -> std::io::Result<Option<CompressedChunk>> {
        let len = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let Some(len) = state.files.remove(&seq) else { return Ok(None) };
            state.bytes -= len;
            metrics::gauge!(crate::metrics::SPOOL_CHUNKS).decrement(1.0);
            metrics::gauge!(crate::metrics::SPOOL_BYTES).decrement(len as f64);
            len
        };
        let path = self.path(seq);
        let chunk = read_chunk(&path)?;
        debug_assert_eq!((HEADER + chunk.data.len()) as u64, len);
        std::fs::remove_file(&path)?;
        Ok(Some(chunk))
    }

    /// Notes that chunk `seq` found the spool full and was dropped, so that the uploader,
    /// which takes chunks in order, passes over it instead of waiting for it.
    pub fn mark_lost(&self, seq: u64) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).lost.insert(seq);
    }

    /// Whether chunk `seq` was dropped ([`Spool::mark_lost`]); forgets it (it is asked once).
    pub fn take_lost(&self, seq: u64) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).lost.remove(&seq)
    }

    /// Whether chunk `seq` is in the spool.
    pub fn contains(&self, seq: u64) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).files.contains_key(&seq)
    }

    /// Chunks and bytes in the spool now.
    pub fn held(&self) -> (usize, u64) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (state.files.len(), state.bytes)
    }

    /// Writes the record that tells the next run how to finish this capture's objects.
    pub fn write_salvage(&self, record: &SalvageRecord) -> std::io::Result<()> {
        write_json(&self.dir.join(SALVAGE_FILE), record)
    }

    /// Records whose chunks these are (see [`SpoolOwner`]) and opens the journal the
    /// capture's uploader keeps here.
    pub fn record_owner(&self, owner: &SpoolOwner) -> std::io::Result<Journal> {
        write_json(&self.dir.join(OWNER_FILE), owner)?;
        let path = self.dir.join(JOURNAL_FILE);
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Journal { path, file: Mutex::new(file) })
    }

    /// The lowest sequence number in the spool.
    pub fn first(&self) -> Option<u64> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).files.keys().next().copied()
    }

    /// Chunks spooled so far, and chunks in the spool now.
    pub fn counts(&self) -> (u64, usize) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (state.spooled, state.files.len())
    }

    /// Removes the spool directory if it holds no chunk.
    pub fn remove_if_empty(&self) -> std::io::Result<()> {
        if self.counts().1 == 0 {
            std::fs::remove_dir_all(&self.dir)?;
        }
        Ok(())
    }

    /// Moves the leftover spool `name` under `root` to `root/quarantine/name`, with a file
    /// `REASON` saying why; returns where it went. Quarantined spools are never recovered:
    /// an operator inspects them, and moves one back to retry it.
    pub fn quarantine(root: &Path, name: &str, reason: &str) -> std::io::Result<PathBuf> {
        let to = root.join(QUARANTINE_DIR).join(name);
        std::fs::create_dir_all(root.join(QUARANTINE_DIR))?;
        std::fs::rename(root.join(name), &to)?;
        std::fs::write(to.join(REASON_FILE), format!("{reason}\n"))?;
        Ok(to)
    }

    /// Spool directories under `root` left by earlier runs (their lock is free).
    pub fn leftovers(root: &Path) -> std::io::Result<Vec<Leftover>> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(root) else { return Ok(out) };
        for entry in entries {
            let dir = entry?.path();
            if dir.file_name().is_some_and(|n| n == QUARANTINE_DIR) {
                continue;
            }
            // A spool whose lock is held belongs to a running capture, or is being recovered by
            // another; the lock taken here is held as long as the returned Leftover lives.
            let lock = match std::fs::File::open(dir.join(LOCK_FILE)) {
                Ok(lock) if !crate::sys::try_lock_exclusive(&lock)? => continue,
                Ok(lock) => Some(lock),
                Err(_) => None,
            };
            let Ok(header) = std::fs::read(dir.join(PCAP_HEADER_FILE)) else { continue };
            let mut chunks: Vec<PathBuf> = std::fs::read_dir(&dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "chunk"))
                .collect();
            chunks.sort();
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let salvage = read_json(&dir.join(SALVAGE_FILE))?;
            let destination = std::fs::read_to_string(dir.join(DESTINATION_FILE)).ok();
            let owner = read_json(&dir.join(OWNER_FILE))?;
            let journal = read_journal(&dir.join(JOURNAL_FILE))?;
            out.push(Leftover { name, header, chunks, salvage, destination, owner, journal, _lock: lock });
        }
        Ok(out)
    }
}

/// A spool left by an earlier run.
#[derive(Debug)]
pub struct Leftover {
    /// Its directory's name.
    pub name: String,
    /// The capture's PCAP file header.
    pub header: Vec<u8>,
    /// Chunk files, in order.
    pub chunks: Vec<PathBuf>,
    /// Set when the capture's store failed for good, rather than the process dying.
    pub salvage: Option<SalvageRecord>,
    /// The store its chunks are for (absent in spools of older versions).
    pub destination: Option<String>,
    /// Whose chunks these are (absent in spools of older versions).
    pub owner: Option<SpoolOwner>,
    /// What the capture's uploader had done when the process died.
    pub journal: Vec<JournalEntry>,
    /// The spool's lock, held so that no other process recovers it at the same time.
    _lock: Option<std::fs::File>,
}

/// Writes `body` to `path` through a temporary file, so that the next run never finds half of
/// it.
fn write_whole(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

/// Writes `value` to `path` as JSON, whole.
fn write_json(path: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    write_whole(path, &serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)
}

/// A spool file that does not hold the JSON it should.
#[derive(Debug, thiserror::Error)]
#[error("{path} cannot be read")]
struct NotJson {
    path: PathBuf,
    #[source]
    source: serde_json::Error,
}

/// Reads the JSON file `path`, if there is one.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(body) => serde_json::from_slice(&body).map(Some).map_err(|source| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, NotJson { path: path.to_owned(), source })
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads a journal; a last line cut short (the process died while writing it) ends it.
fn read_journal(path: &Path) -> std::io::Result<Vec<JournalEntry>> {
    let body = match std::fs::read(path) {
        Ok(body) => body,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(body.split(|b| *b == b'\n').map_while(|line| serde_json::from_slice(line).ok()).collect())
}

/// Reads a spooled chunk file.
pub fn read_chunk(path: &Path) -> std::io::Result<CompressedChunk> {
    let body = std::fs::read(path)?;
    if body.len() < HEADER {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is truncated", path.display()),
        ));
    }
    let at = |i: usize| u64::from_le_bytes(body[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Ok(CompressedChunk {
        decompressed_len: at(0),
        first_ns: at(1),
        last_ns: at(2),
        packets: at(3),
        data: body[HEADER..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8) -> CompressedChunk {
        CompressedChunk { data: vec![n; 100], decompressed_len: 300, first_ns: 1, last_ns: 2, packets: 3 }
    }

    #[test]
    fn chunks_come_back_in_order_and_the_limit_holds() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::create(dir.path().join("cap"), 3 * 132, b"hdr", "s3://b/").unwrap();
        for seq in 0..3 {
            assert!(spool.put(seq, &chunk(seq as u8)).unwrap());
        }
        assert!(!spool.put(3, &chunk(3)).unwrap(), "full");
        assert!(Spool::leftovers(dir.path()).unwrap().is_empty(), "a live spool is not a leftover");
        let back = spool.take(1).unwrap().unwrap();
        assert_eq!((back.data, back.decompressed_len, back.packets), (vec![1; 100], 300, 3));
        assert!(spool.take(1).unwrap().is_none());
        assert!(spool.put(3, &chunk(3)).unwrap(), "room again");
        assert_eq!(spool.counts(), (4, 3));
        drop(spool);
        let left = Spool::leftovers(dir.path()).unwrap();
        assert!(Spool::leftovers(dir.path()).unwrap().is_empty(), "a leftover being recovered is locked");
        assert_eq!(left.len(), 1);
        assert_eq!(
            (left[0].name.as_str(), left[0].header.as_slice(), left[0].chunks.len()),
            ("cap", &b"hdr"[..], 3)
        );
        assert!(left[0].salvage.is_none());
        assert_eq!(left[0].destination.as_deref(), Some("s3://b/"));
    }
    #[test]
    fn a_journal_replays_to_the_finished_objects_and_the_open_upload() {
        let part = |n| PartDone { number: n, etag: format!("e{n}"), crc32c: None };
        let frame = |offset| FrameEntry { offset, length: 10, packets: 2, ..FrameEntry::default() };
        let confirmed = |key: &str, n, offset| JournalEntry::Confirmed {
            key: key.into(),
            upload_id: format!("{key}-id"),
            parts: vec![part(n)],
            frames: vec![frame(offset)],
            length: offset + 10,
            sealed: false,
        };
        let entries = vec![
            JournalEntry::Begun { seq: 0 },
            confirmed("k0", 1, 0),
            JournalEntry::Finished { key: "k0".into(), url: "s3://b/k0".into(), packets: 2 },
            JournalEntry::Begun { seq: 1 },
            confirmed("k1", 1, 0),
            confirmed("k1", 2, 10),
        ];
        let state = JournalState::replay(&entries);
        assert_eq!(state.finished, vec![("s3://b/k0".to_owned(), 2)]);
        assert_eq!(state.next_object, 2);
        let open = state.open.expect("k1 is open");
        assert_eq!((open.key.as_str(), open.upload_id.as_str(), open.length), ("k1", "k1-id", 20));
        assert_eq!(open.parts, vec![part(1), part(2)]);
        assert_eq!(open.frames, vec![frame(0), frame(10)]);

        // A line cut short by a crash ends the journal.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let mut body = Vec::new();
        for e in &entries[..2] {
            body.extend(serde_json::to_vec(e).unwrap());
            body.push(b'\n');
        }
        body.extend_from_slice(b"{\"begun\":{\"se");
        std::fs::write(&path, body).unwrap();
        assert_eq!(read_journal(&path).unwrap(), entries[..2]);
    }
}
