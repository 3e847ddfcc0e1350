//! A local directory as a store: objects are files; multipart uploads keep their parts in a
//! hidden folder until they are completed (concatenated) or aborted.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{ObjectMeta, PartDone, PendingUpload, Result, Sink, UploadError};

/// Objects under a directory.
pub struct DirSink {
    root: PathBuf,
}

const UPLOADS: &str = ".uploads";

impl DirSink {
    /// A store in `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join(UPLOADS)).map_err(|source| io("create", &root, source))?;
        Ok(Self { root })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn upload_dir(&self, upload_id: &str) -> PathBuf {
        self.root.join(UPLOADS).join(upload_id)
    }
}

fn io(operation: &'static str, path: &Path, source: std::io::Error) -> UploadError {
    UploadError::Io { operation, path: path.display().to_string(), source }
}

/// Writes `body` to `path` through a temporary file, so readers never see half an object.
fn write_atomic(path: &Path, body: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
    }
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, body).map_err(|e| io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("rename", path, e))
}

impl Sink for DirSink {
    async fn put_object(&self, key: &str, body: Bytes, _meta: &ObjectMeta) -> Result<()> {
        write_atomic(&self.path(key), &body)
    }

    async fn create_multipart(&self, key: &str, _meta: &ObjectMeta) -> Result<String> {
        let id = format!("{:016x}", u64::from_ne_bytes(crate::sys::random_bytes()));
        let dir = self.upload_dir(&id);
        std::fs::create_dir_all(&dir).map_err(|e| io("create", &dir, e))?;
        std::fs::write(dir.join("key"), key).map_err(|e| io("write", &dir, e))?;
        Ok(id)
    }

    async fn upload_part(&self, _key: &str, upload_id: &str, number: i32, body: Bytes) -> Result<PartDone> {
        let path = self.upload_dir(upload_id).join(format!("{number:05}"));
        write_atomic(&path, &body)?;
        Ok(PartDone { number, etag: format!("{number}-{}", body.len()), crc32c: None })
    }

    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: Vec<PartDone>) -> Result<()> {
        let dir = self.upload_dir(upload_id);
        // The parts are copied file to file: an object is never whole in memory (a 1 GiB
        // object once was, at its completion).
        let path = self.path(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
        }
        let tmp = path.with_extension("partial");
        let mut object = std::fs::File::create(&tmp).map_err(|e| io("write", &tmp, e))?;
        for p in &parts {
            let part = dir.join(format!("{:05}", p.number));
            let mut from = std::fs::File::open(&part).map_err(|e| io("read", &part, e))?;
            std::io::copy(&mut from, &mut object).map_err(|e| io("write", &tmp, e))?;
        }
        drop(object);
        std::fs::rename(&tmp, &path).map_err(|e| io("rename", &path, e))?;
        std::fs::remove_dir_all(&dir).map_err(|e| io("remove", &dir, e))
    }

    async fn abort_multipart(&self, _key: &str, upload_id: &str) -> Result<()> {
        let dir = self.upload_dir(upload_id);
        std::fs::remove_dir_all(&dir).map_err(|e| io("remove", &dir, e))
    }

    async fn list_multipart(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        let dir = self.root.join(UPLOADS);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| io("list", &dir, e))? {
            let entry = entry.map_err(|e| io("list", &dir, e))?;
            let key = std::fs::read_to_string(entry.path().join("key")).unwrap_or_default();
            if key.starts_with(prefix) {
                out.push(PendingUpload { key, upload_id: entry.file_name().to_string_lossy().into_owned() });
            }
        }
        Ok(out)
    }

    async fn list(&self, prefix: &str, max: Option<usize>) -> Result<Vec<(String, u64)>> {
        // The directory the prefix's last `/` ends, walked whole; keys filtered by the prefix.
        let start = match prefix.rfind('/') {
            Some(at) => self.root.join(&prefix[..at]),
            None => self.root.clone(),
        };
        let mut out = Vec::new();
        let mut dirs = vec![start];
        while let Some(dir) = dirs.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("list", &dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| io("list", &dir, e))?;
                let path = entry.path();
                let kind = entry.file_type().map_err(|e| io("list", &path, e))?;
                if kind.is_dir() {
                    if entry.file_name() != UPLOADS {
                        dirs.push(path);
                    }
                    continue;
                }
                let Some(key) = path.strip_prefix(&self.root).ok().and_then(|k| k.to_str()) else { continue };
                if key.starts_with(prefix) && !key.ends_with(".partial") {
                    let len = entry.metadata().map_err(|e| io("list", &path, e))?.len();
                    out.push((key.to_owned(), len));
                }
            }
        }
        out.sort();
        out.truncate(max.unwrap_or(usize::MAX));
        Ok(out)
    }

    async fn get(&self, key: &str, range: Option<(u64, u64)>) -> Result<Vec<u8>> {
        use std::io::{Read as _, Seek as _};
        let path = self.path(key);
        let Some((a, b)) = range else { return std::fs::read(&path).map_err(|e| io("read", &path, e)) };
        // Only the range is read, as a ranged GET fetches only it.
        let mut file = std::fs::File::open(&path).map_err(|e| io("read", &path, e))?;
        file.seek(std::io::SeekFrom::Start(a)).map_err(|e| io("read", &path, e))?;
        let mut out = Vec::new();
        file.take(b.saturating_sub(a).saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|e| io("read", &path, e))?;
        Ok(out)
    }

    fn url(&self, key: &str) -> String {
        format!("file://{}", self.path(key).display())
    }
}
