//! The store: compressed chunks become objects while the capture runs.
//!
//! [`compress`] (zstd frames and their index) -> [`stream`] (a capture's chunks, the upload
//! queue, the spool while the store is away) -> [`object`] (objects, rotation, parts) -> a
//! [`Sink`]. [`settings`] turns configuration into a destination; [`catalog`] keeps each
//! capture's manifest beside its objects and lists captures by time and labels; [`read`] reads
//! back, one object or the captures of a prefix merged; [`cloudshark`] sends a finished
//! capture to a CloudShark appliance.
//!
//! [`Sink`] is the small interface to a store, with three implementations: [`s3::S3Sink`]
//! (aws-sdk-s3, any S3-compatible endpoint), [`gcs::GcsSink`] (Google Cloud Storage's JSON
//! API) and [`dir::DirSink`] (a local directory); tests
//! wrap either in a [`fault::FaultSink`], which counts calls and fails those it is told to.
//! [`object::Uploader`] turns a capture's compressed frames into objects: rotation by size and
//! age, multipart uploads with parts in order and CRC32C checksums, a single PutObject for small
//! objects, bounded parts in flight, and an index object beside each object.

pub mod catalog;
pub mod cloudshark;
pub mod compress;
pub mod dir;
pub mod fault;
pub mod gcs;
pub(crate) mod http;
pub mod object;
pub mod read;
pub mod s3;
pub mod settings;
pub mod spool;
pub mod stream;

use std::future::Future;

/// Object metadata stored with every object (S3 user metadata).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Content type of the object.
    pub content_type: String,
    /// User metadata (`x-amz-meta-*`), e.g. capture id, filter, node.
    pub metadata: Vec<(String, String)>,
    /// Object tags (`x-amz-tagging`), e.g. customer and retention class; an S3 sink sends them
    /// unless its tagging is off.
    pub tags: Vec<(String, String)>,
}

/// A finished part of a multipart upload.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartDone {
    /// 1-based part number.
    pub number: i32,
    /// ETag the store gave it.
    pub etag: String,
    /// Base64 CRC32C of the part, as the store computed it (S3 only).
    pub crc32c: Option<String>,
}

/// A multipart upload that was started and not finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingUpload {
    /// Object key.
    pub key: String,
    /// Upload id.
    pub upload_id: String,
}

/// The error underneath an [`UploadError`]: the S3 SDK's, or another library's.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of a store. Each says whether trying again may help. Each message reads on its own
/// (a log line that prints one); [`crate::report::chain`] adds what lies underneath.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// A request the store did not carry out: `reason` is what the store answered (its error
    /// code and message) or why no answer came; `source`, the client's error, in full.
    #[error("{operation} {key}: {reason}")]
    Store {
        operation: &'static str,
        key: String,
        reason: String,
        /// Whether the same request may succeed later (network, throttling, 5xx).
        retryable: bool,
        #[source]
        source: Option<BoxError>,
    },
    /// The request itself can never succeed: the client could not build it (a header the
    /// HTTP rules forbid) or the store refused it as invalid. Retrying, now or after a
    /// restart, gives the same answer.
    #[error("{operation} {key}: {reason} (the request is invalid and is not retried)")]
    Refused {
        operation: &'static str,
        key: String,
        reason: String,
        #[source]
        source: BoxError,
    },
    #[error("{operation} {path}")]
    Io {
        operation: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid destination {url:?}: {reason}")]
    Destination { url: String, reason: String },
    /// A store setting has a value that cannot be used.
    #[error("store setting {field}: {reason}")]
    Setting { field: &'static str, reason: String },
    #[error("compression failed")]
    Compress(#[from] crate::store::compress::CompressError),
    /// The threads of the runtime that runs the uploads could not start.
    #[error("cannot start the upload runtime")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    /// A compression thread could not start.
    #[error("cannot start the compression thread {name}")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// Compression thread `name` panicked: the chunk it was compressing is lost, and with
    /// one thread, every chunk after it.
    #[error("the compression thread {name} panicked: {message}")]
    CompressionPanicked { name: String, message: String },
    /// The task uploading a part of `key` panicked or was cancelled: the part is not
    /// confirmed.
    #[error("the upload of a part of {key} did not finish")]
    PartTask {
        key: String,
        #[source]
        source: tokio::task::JoinError,
    },
    /// The task making capture `capture`'s objects panicked or was cancelled.
    #[error("the uploader of capture {capture} did not finish")]
    Uploader {
        capture: String,
        #[source]
        source: tokio::task::JoinError,
    },
    /// The store failed for good while a capture ran (`cause`); what it did not confirm is
    /// spooled.
    #[error(
        "the {chunks} chunks ({bytes} bytes) the store did not confirm are kept in the spool {dir}{lost}, \
         and are uploaded when a capture next starts with a store that accepts them; the store failed for good"
    )]
    Spooled {
        #[source]
        cause: Box<UploadError>,
        chunks: usize,
        bytes: u64,
        dir: String,
        lost: LostPackets,
    },
}

/// What a store's operations return.
pub type Result<T, E = UploadError> = std::result::Result<T, E>;

/// Packets that did not fit in a full spool, for [`UploadError::Spooled`]'s message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LostPackets(pub u64);

impl std::fmt::Display for LostPackets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(f, " ({n} packets did not fit in the full spool and were lost)"),
        }
    }
}

impl UploadError {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store { retryable, .. } => *retryable,
            Self::Io { .. } => true,
            _ => false,
        }
    }

    /// Whether the same request can never succeed, whatever the store's state: a refused
    /// request, or data that cannot be read back (a corrupt spool file).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Refused { .. } => true,
            Self::Io { source, .. } => source.kind() == std::io::ErrorKind::InvalidData,
            Self::Spooled { cause, .. } => cause.is_permanent(),
            _ => false,
        }
    }
}

/// A store of objects. Keys are relative to the store's bucket or directory.
/// Bodies are [`bytes::Bytes`]: a retry hands the same bytes on again without copying them.
pub trait Sink: Send + Sync + 'static {
    /// Stores `body` as `key` in one request.
    fn put_object(
        &self,
        key: &str,
        body: bytes::Bytes,
        meta: &ObjectMeta,
    ) -> impl Future<Output = Result<(), UploadError>> + Send;
    /// Starts a multipart upload; returns its id.
    fn create_multipart(
        &self,
        key: &str,
        meta: &ObjectMeta,
    ) -> impl Future<Output = Result<String, UploadError>> + Send;
    /// Uploads part `number` (1-based).
    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: bytes::Bytes,
    ) -> impl Future<Output = Result<PartDone, UploadError>> + Send;
    /// Completes an upload from its parts, in order.
    fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<PartDone>,
    ) -> impl Future<Output = Result<(), UploadError>> + Send;
    /// Aborts an upload.
    fn abort_multipart(
        &self,
        key: &str,
        upload_id: &str,
    ) -> impl Future<Output = Result<(), UploadError>> + Send;
    /// Unfinished multipart uploads under `prefix`.
    fn list_multipart(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<PendingUpload>, UploadError>> + Send;
    /// Bytes `range` (start, inclusive end) of `key`, or all of it.
    fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> impl Future<Output = Result<Vec<u8>, UploadError>> + Send;
    /// Objects whose keys start with `prefix`, as (key, bytes), in key order; at most `max`
    /// of them. Only readers list (`tapstream ls` and `read` over a prefix).
    fn list(
        &self,
        prefix: &str,
        max: Option<usize>,
    ) -> impl Future<Output = Result<Vec<(String, u64)>, UploadError>> + Send;
    /// A URL naming `key`, for summaries (`s3://bucket/key`, `file:///dir/key`).
    fn url(&self, key: &str) -> String;
    /// Checks, before a capture starts, that the store takes requests for keys under
    /// `prefix`: one request, not retried, answered within about [`CHECK_TIMEOUT`]. An error
    /// that [`UploadError::is_retryable`] is a store that cannot be reached now; any other, a
    /// store that refuses (no such bucket, wrong credentials).
    fn check(&self, prefix: &str) -> impl Future<Output = Result<(), UploadError>> + Send {
        async move { self.list_multipart(prefix).await.map(drop) }
    }
    /// The store, for logs: its bucket or directory and, for S3, its endpoint (never
    /// credentials).
    fn describe(&self) -> String {
        self.url("")
    }
}

/// How long the check of a store before a capture starts ([`Sink::check`]) may take.
pub const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A destination given on the command line: `s3://bucket/prefix`, `gs://bucket/prefix` or a
/// local directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A bucket and a key prefix (no leading or trailing slash).
    S3 { bucket: String, prefix: String },
    /// A Google Cloud Storage bucket and a key prefix (no leading or trailing slash).
    Gs { bucket: String, prefix: String },
    /// A local directory.
    Dir { path: std::path::PathBuf },
}

impl std::str::FromStr for Destination {
    type Err = UploadError;

    fn from_str(url: &str) -> Result<Self, UploadError> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(UploadError::Destination { url: url.into(), reason: "no bucket name".into() });
            }
            return Ok(Self::S3 { bucket: bucket.into(), prefix: prefix.trim_matches('/').into() });
        }
        if let Some(rest) = url.strip_prefix("gs://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(UploadError::Destination { url: url.into(), reason: "no bucket name".into() });
            }
            return Ok(Self::Gs { bucket: bucket.into(), prefix: prefix.trim_matches('/').into() });
        }
        if url.contains("://") {
            return Err(UploadError::Destination {
                url: url.into(),
                reason: "only s3:// and gs:// URLs and local directories are supported".into(),
            });
        }
        Ok(Self::Dir { path: url.into() })
    }
}

/// Splits `s3://bucket/key` or `gs://bucket/key` into the destination (its prefix the key)
/// and the key.
pub fn parse_object_url(url: &str) -> Result<(Destination, String), UploadError> {
    match url.parse::<Destination>()? {
        d @ (Destination::S3 { .. } | Destination::Gs { .. }) if !d.prefix().is_empty() => {
            let key = d.prefix().to_owned();
            Ok((d, key))
        }
        _ => Err(UploadError::Destination {
            url: url.into(),
            reason: "expected s3://bucket/key or gs://bucket/key".into(),
        }),
    }
}

impl Destination {
    /// The key prefix in the bucket ("" for a directory).
    pub fn prefix(&self) -> &str {
        match self {
            Self::S3 { prefix, .. } | Self::Gs { prefix, .. } => prefix,
            Self::Dir { .. } => "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_or_say_why_not() {
        assert_eq!(
            "s3://b/captures/x/".parse::<Destination>().unwrap(),
            Destination::S3 { bucket: "b".into(), prefix: "captures/x".into() }
        );
        assert_eq!(
            "s3://b".parse::<Destination>().unwrap(),
            Destination::S3 { bucket: "b".into(), prefix: "".into() }
        );
        assert_eq!(
            "/var/tmp/c".parse::<Destination>().unwrap(),
            Destination::Dir { path: "/var/tmp/c".into() }
        );
        assert_eq!(
            "gs://b/captures/x/".parse::<Destination>().unwrap(),
            Destination::Gs { bucket: "b".into(), prefix: "captures/x".into() }
        );
        let e = "az://b/x".parse::<Destination>().unwrap_err().to_string();
        assert!(e.contains("only s3:// and gs://"), "{e}");
        assert!("gs:///x".parse::<Destination>().unwrap_err().to_string().contains("no bucket"));
        assert!("s3:///x".parse::<Destination>().unwrap_err().to_string().contains("no bucket"));
        assert!(parse_object_url("s3://b").is_err());
    }
}
