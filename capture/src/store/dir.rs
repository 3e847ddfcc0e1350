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
        let mut body = Vec::new();
        for p in &parts {
            let path = dir.join(format!("{:05}", p.number));
            body.extend_from_slice(&std::fs::read(&path).map_err(|e| io("read", &path, e))?);
        }
        write_atomic(&self.path(key), &body)?;
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

    async fn get(&self, key: &str, range: Option<(u64, u64)>) -> Result<Vec<u8>> {
        let path = self.path(key);
        let all = std::fs::read(&path).map_err(|e| io("read", &path, e))?;
        Ok(match range {
            None => all,
            Some((a, b)) => all
                .get(a as usize..=(b as usize).min(all.len().saturating_sub(1)))
                .unwrap_or_default()
                .to_vec(),
        })
    }

    fn url(&self, key: &str) -> String {
        format!("file://{}", self.path(key).display())
    }
}
