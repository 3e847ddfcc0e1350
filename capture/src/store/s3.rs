//! S3 (and S3-compatible stores) through aws-sdk-s3.
//!
//! Credentials come from the AWS default chain (environment, profile, web identity, IMDSv2,
//! assume-role); they are never logged. Multipart uploads are created with CRC32C checksums:
//! the SDK computes each part's checksum, the store verifies it, and CompleteMultipartUpload
//! lists the parts in order with their checksums. The SDK retries retryable errors (network,
//! throttling, 5xx) with exponential backoff; other errors fail at once.
//!
//! Connections: every client of the process shares one HTTP connection pool per limit
//! (`store.max_connections`), whose capacity bounds the TCP connections open to each store
//! endpoint: a connection holds a unit of it from before it is established until it is
//! closed, idle ones included. The pool returns a closing connection's unit as soon as it
//! stops taking requests, before its socket is closed, so a request also waits until no
//! connection is left closing ([`Admission`]). The pool's connections run on a small runtime
//! of their own, so they outlive the runtime of any one capture.

use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_s3::{
    Client,
    config::http::HttpResponse,
    error::{ProvideErrorMetadata, SdkError},
    primitives::ByteStream,
    types::{
        ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectCannedAcl, ServerSideEncryption,
        StorageClass,
    },
};

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use aws_smithy_http_client::{
    pool::{self, ConnectionEvent, ConnectionPool, DriverSpawner, Partition, PartitionId},
    tls::{self, rustls_provider::CryptoMode},
};

use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use bytes::Bytes;

use super::{ObjectMeta, PartDone, PendingUpload, Result, Sink, UploadError};

/// Where and how objects are stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct S3Config {
    /// Bucket.
    pub bucket: String,
    /// Endpoint URL for S3-compatible stores (e.g. `http://127.0.0.1:3900`); `None` for AWS.
    pub endpoint: Option<String>,
    /// Region; `None` takes the default chain's (environment, profile).
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible stores need.
    pub path_style: bool,
    /// Server-side encryption: `AES256` or `aws:kms`.
    pub sse: Option<String>,
    /// KMS key id for `aws:kms`.
    pub sse_kms_key_id: Option<String>,
    /// Storage class, e.g. `STANDARD_IA`.
    pub storage_class: Option<String>,
    /// Canned ACL, e.g. `bucket-owner-full-control`.
    pub acl: Option<String>,
    /// Attempts per request, retries included.
    pub max_attempts: u32,
    /// TCP connections open at once to the store at most, idle ones included, over every
    /// client of the process that has the same limit; 0 for no limit.
    pub max_connections: usize,
    /// Fixed credentials (access key id, secret) instead of the default chain: for tests and
    /// tools that hold their own; the CLI and daemon always use the default chain.
    pub static_credentials: Option<(String, String)>,
    /// Send objects' tags (x-amz-tagging); off, they are left out.
    pub tagging: bool,
}

/// A bucket through aws-sdk-s3.
pub struct S3Sink {
    client: Client,
    config: S3Config,
    /// Admits a request when the pool can serve it without opening a connection beyond its
    /// limit.
    admission: Arc<Admission>,
}

/// When a request may go to the pool.
struct Admission {
    /// One permit per request in progress, as many as the pool has connections: a request
    /// waits here (and is counted as waiting) rather than in the pool's queue.
    requests: Semaphore,
    /// Connections that take no more requests but whose sockets are not yet closed. The pool
    /// has already returned their capacity, so a request sent now could open a connection
    /// while one of them is still open: the limit would be passed for that moment.
    closing: AtomicUsize,
    /// Wakes the requests waiting for `closing` to fall to 0.
    closed: Notify,
}

impl Admission {
    fn new(max: usize) -> Self {
        Self {
            requests: Semaphore::new(if max == 0 { Semaphore::MAX_PERMITS } else { max }),
            closing: AtomicUsize::new(0),
            closed: Notify::new(),
        }
    }

    /// Follows the pool's connections: each one closing counts from the moment it takes no
    /// more requests (logical close) until the client lets go of its socket (physical close);
    /// the pool reports the first before the second, once each per connection.
    fn observe(&self, event: &ConnectionEvent<'_>) {
        match event {
            ConnectionEvent::LogicalClose(_) => self.closing_began(),
            ConnectionEvent::PhysicalClose(_) => self.closing_ended(),
            _ => {}
        }
    }

    fn closing_began(&self) {
        self.closing.fetch_add(1, Ordering::AcqRel);
    }

    fn closing_ended(&self) {
        if self.closing.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.closed.notify_waiters();
        }
    }

    /// Waits for a request permit, then until no connection is closing.
    async fn admit(&self) -> SemaphorePermit<'_> {
        let permit = self.requests.acquire().await.expect("the semaphore is never closed");
        loop {
            // Registered before the check, so a close that ends between the two still wakes it.
            let closed = self.closed.notified();
            if self.closing.load(Ordering::Acquire) == 0 {
                return permit;
            }
            closed.await;
        }
    }
}

/// The HTTP client with at most `max` connections to each store endpoint (0: unbounded),
/// shared by every S3 client of the process built with that limit, and the matching request
/// limit. The pool's capacity counts a connection from the start of its establishment to its
/// close, idle or busy, so the pool never has more than `max` connections open.
///
/// Its connections are driven by a runtime of its own, which lives as long as the process
/// (a capture's runtime ends with the capture). A thread's network namespace decides where
/// its sockets connect, and the runtime's threads take the namespace of the thread that
/// starts them, so there is one pool per namespace: one for the daemon, one per test
/// namespace in the tests.
fn connection_pool(max: usize) -> (pool::Client, Arc<Admission>) {
    static POOLS: Mutex<BTreeMap<(usize, u64), Pool>> = Mutex::new(BTreeMap::new());
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    let pool = pools.entry((max, network_namespace())).or_insert_with(|| Pool::new(max));
    (pool.http.clone(), pool.admission.clone())
}

/// One connection pool, kept for the life of the process.
struct Pool {
    http: pool::Client,
    admission: Arc<Admission>,
    /// Drives the pool's connections: two threads, started from (so in the network namespace
    /// of) the thread that made the pool.
    _runtime: tokio::runtime::Runtime,
}

impl Pool {
    fn new(max: usize) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tapstream-s3-conn")
            .enable_all()
            .build()
            .expect("the process can start two threads");
        let partition = PartitionId::from_index(0);
        let spawner = DriverSpawner::tokio(runtime.handle().clone());
        let admission = Arc::new(Admission::new(max));
        let observer = admission.clone();
        let mut builder = ConnectionPool::builder()
            .partitions([Partition::new(partition, spawner)])
            .event_listener(move |event: &ConnectionEvent<'_>| observer.observe(event));
        if max > 0 {
            builder = builder.max_connections_per_host(max);
        }
        let pool = builder
            .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
            .build_https()
            .expect("a pool with one explicit partition is valid");
        let http = pool::Client::from_partition(&pool, partition).expect("the partition was declared");
        Self { http, admission, _runtime: runtime }
    }
}

/// The network namespace of the calling thread (its inode), 0 if it cannot be read.
fn network_namespace() -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino()).unwrap_or(0)
}

impl S3Sink {
    /// A client for `config`, with credentials from the default chain.
    pub async fn new(config: S3Config) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(config.max_attempts.max(1)));
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some((id, secret)) = &config.static_credentials {
            loader = loader
                .credentials_provider(aws_sdk_s3::config::Credentials::new(id, secret, None, None, "static"));
        }
        let (http, admission) = connection_pool(config.max_connections);
        let shared = loader.http_client(http).load().await;
        let s3 = aws_sdk_s3::config::Builder::from(&shared).force_path_style(config.path_style).build();
        Self { client: Client::from_conf(s3), config, admission }
    }

    /// The x-amz-tagging value of `meta`'s tags, if tagging is on and it has any.
    fn tagging(&self, meta: &ObjectMeta) -> Option<String> {
        (self.config.tagging && !meta.tags.is_empty()).then(|| encode_tags(&meta.tags))
    }

    /// Waits until the pool can serve one more request; held for one request.
    async fn connection(&self) -> SemaphorePermit<'_> {
        let waiting = metrics::gauge!(crate::metrics::UPLOAD_CONNECTIONS_WAITING);
        waiting.increment(1.0);
        let permit = self.admission.admit().await;
        waiting.decrement(1.0);
        permit
    }
}

/// Tags as x-amz-tagging takes them: `key=value` pairs joined by `&`, each key and value
/// URL-encoded (every byte but letters, digits and `-_.~` as `%XX`).
pub fn encode_tags(tags: &[(String, String)]) -> String {
    let encode = |s: &str| {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    };
    tags.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
}

/// Whether the store's answer `reason` is about object tags, or says the request is not
/// implemented (as a store without tagging may). Not any mention of "Tag": an ETag is not one.
fn about_tags(reason: &str) -> bool {
    reason.starts_with("NotImplemented")
        || reason.starts_with("InvalidTag")
        || reason.to_ascii_lowercase().contains("tagging")
}

/// A write that carried object tags and that the store refused for them (an unimplemented
/// request, or an error about tags) is refused for good, and says which setting turns the
/// tags off; other errors are as they were.
fn tags_refused(tagged: bool, err: UploadError) -> UploadError {
    match err {
        UploadError::Store { operation, key, reason, source, .. } if tagged && about_tags(&reason) => {
            UploadError::Refused {
                operation,
                key,
                reason: format!(
                    "{reason}; the request carried object tags (x-amz-tagging): for a store that does not \
                     take them, set [store] tagging = false (--no-tagging)"
                ),
                source: source.unwrap_or_else(|| "the store refused the object tags".into()),
            }
        }
        UploadError::Refused { operation, key, reason, source } if tagged && about_tags(&reason) => {
            UploadError::Refused {
                operation,
                key,
                reason: format!("{reason}; set [store] tagging = false (--no-tagging) to leave the tags out"),
                source,
            }
        }
        other => other,
    }
}

/// Turns an SDK error into ours, kept whole as its source: what the store answered (its
/// error code and message) or why no answer came, whether retrying may help, and whether the
/// request can never succeed.
fn store_error<E>(operation: &'static str, key: &str, err: SdkError<E, HttpResponse>) -> UploadError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let retryable = matches!(err, SdkError::TimeoutError(_) | SdkError::DispatchFailure(_))
        || status.is_some_and(|s| s >= 500 || s == 429);
    let code = err.as_service_error().and_then(|e| e.code()).map(str::to_owned);
    let reason = match &err {
        SdkError::ServiceError(_) => {
            let message = err.as_service_error().and_then(|e| e.message());
            let code = code.clone().or(status.map(|s| format!("HTTP {s}")));
            match (code, message) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(code), None) => code,
                (None, message) => message.unwrap_or("the store refused it").to_owned(),
            }
        }
        SdkError::ConstructionFailure(_) => "the request cannot be built".to_owned(),
        SdkError::TimeoutError(_) => "no answer in time".to_owned(),
        SdkError::DispatchFailure(_) => "cannot reach the store".to_owned(),
        SdkError::ResponseError(_) => "the store's answer cannot be read".to_owned(),
        _ => "the request failed".to_owned(),
    };
    // A request the client cannot build, or one the store calls invalid (not a 400 about
    // credentials or time, which an operator or the clock can fix).
    let refused = matches!(err, SdkError::ConstructionFailure(_))
        || code.as_deref().is_some_and(|c| {
            [
                "InvalidArgument",
                "InvalidRequest",
                "MetadataTooLarge",
                "KeyTooLongError",
                "InvalidStorageClass",
            ]
            .contains(&c)
        });
    let key = key.to_owned();
    if refused {
        return UploadError::Refused { operation, key, reason, source: Box::new(err) };
    }
    UploadError::Store { operation, key, reason, retryable, source: Some(Box::new(err)) }
}

impl Sink for S3Sink {
    async fn put_object(&self, key: &str, body: Bytes, meta: &ObjectMeta) -> Result<()> {
        let _connection = self.connection().await;
        let c = &self.config;
        let mut req = self
            .client
            .put_object()
            .bucket(&c.bucket)
            .key(key)
            .content_type(&meta.content_type)
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .set_server_side_encryption(c.sse.as_deref().map(ServerSideEncryption::from))
            .set_ssekms_key_id(c.sse_kms_key_id.clone())
            .set_storage_class(c.storage_class.as_deref().map(StorageClass::from))
            .set_acl(c.acl.as_deref().map(ObjectCannedAcl::from))
            .set_tagging(self.tagging(meta))
            .body(ByteStream::from(body));
        for (k, v) in &meta.metadata {
            req = req.metadata(k, v);
        }
        let tagged = self.tagging(meta).is_some();
        req.send().await.map_err(|e| tags_refused(tagged, store_error("PutObject", key, e)))?;
        Ok(())
    }

    async fn create_multipart(&self, key: &str, meta: &ObjectMeta) -> Result<String> {
        let _connection = self.connection().await;
        let c = &self.config;
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&c.bucket)
            .key(key)
            .content_type(&meta.content_type)
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .set_server_side_encryption(c.sse.as_deref().map(ServerSideEncryption::from))
            .set_ssekms_key_id(c.sse_kms_key_id.clone())
            .set_storage_class(c.storage_class.as_deref().map(StorageClass::from))
            .set_acl(c.acl.as_deref().map(ObjectCannedAcl::from))
            .set_tagging(self.tagging(meta));
        for (k, v) in &meta.metadata {
            req = req.metadata(k, v);
        }
        let tagged = self.tagging(meta).is_some();
        let out = req
            .send()
            .await
            .map_err(|e| tags_refused(tagged, store_error("CreateMultipartUpload", key, e)))?;
        out.upload_id.ok_or_else(|| UploadError::Store {
            operation: "CreateMultipartUpload",
            key: key.to_owned(),
            reason: "the reply has no upload id".into(),
            retryable: false,
            source: None,
        })
    }

    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Bytes) -> Result<PartDone> {
        let _connection = self.connection().await;
        let out = self
            .client
            .upload_part()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| store_error("UploadPart", key, e))?;
        Ok(PartDone { number, etag: out.e_tag.unwrap_or_default(), crc32c: out.checksum_crc32_c })
    }

    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: Vec<PartDone>) -> Result<()> {
        let _connection = self.connection().await;
        let parts = parts
            .into_iter()
            .map(|p| {
                CompletedPart::builder()
                    .part_number(p.number)
                    .e_tag(p.etag)
                    .set_checksum_crc32_c(p.crc32c)
                    .build()
            })
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(|e| store_error("CompleteMultipartUpload", key, e))?;
        Ok(())
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        let _connection = self.connection().await;
        self.client
            .abort_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| store_error("AbortMultipartUpload", key, e))?;
        Ok(())
    }

    async fn list_multipart(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None, None);
        loop {
            let _connection = self.connection().await;
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.config.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| store_error("ListMultipartUploads", prefix, e))?;
            for u in page.uploads() {
                if let (Some(key), Some(id)) = (u.key(), u.upload_id()) {
                    out.push(PendingUpload { key: key.to_owned(), upload_id: id.to_owned() });
                }
            }
            if page.is_truncated() != Some(true) {
                return Ok(out);
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            id_marker = page.next_upload_id_marker().map(str::to_owned);
        }
    }

    async fn list(&self, prefix: &str, max: Option<usize>) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let _connection = self.connection().await;
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.config.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .set_max_keys(max.map(|m| m.min(1000) as i32))
                .send()
                .await
                .map_err(|e| store_error("ListObjectsV2", prefix, e))?;
            for o in page.contents() {
                if let Some(key) = o.key() {
                    out.push((key.to_owned(), o.size().unwrap_or(0).max(0) as u64));
                }
            }
            if max.is_some_and(|m| out.len() >= m) {
                out.truncate(max.unwrap_or(usize::MAX));
                return Ok(out);
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => return Ok(out),
            }
        }
    }

    async fn get(&self, key: &str, range: Option<(u64, u64)>) -> Result<Vec<u8>> {
        let _connection = self.connection().await;
        let out = self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key)
            .set_range(range.map(|(a, b)| format!("bytes={a}-{b}")))
            .send()
            .await
            .map_err(|e| store_error("GetObject", key, e))?;
        let body = out.body.collect().await.map_err(|e| UploadError::Store {
            operation: "GetObject",
            key: key.to_owned(),
            reason: "cannot read the body".into(),
            retryable: true,
            source: Some(Box::new(e)),
        })?;
        Ok(body.into_bytes().to_vec())
    }

    fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.config.bucket)
    }

    /// One ListMultipartUploads of the capture's key space (what starting a capture lists
    /// anyway), with no retry and a deadline: a store that does not answer is known in
    /// seconds, not after the SDK's retries.
    async fn check(&self, prefix: &str) -> Result<()> {
        let _connection = self.connection().await;
        let once = aws_sdk_s3::config::Builder::default()
            .retry_config(RetryConfig::standard().with_max_attempts(1))
            .timeout_config(TimeoutConfig::builder().operation_timeout(super::CHECK_TIMEOUT).build());
        self.client
            .list_multipart_uploads()
            .bucket(&self.config.bucket)
            .prefix(prefix)
            .max_uploads(1)
            .customize()
            .config_override(once)
            .send()
            .await
            .map_err(|e| store_error("ListMultipartUploads", prefix, e))?;
        Ok(())
    }

    fn describe(&self) -> String {
        let endpoint = match &self.config.endpoint {
            // Whatever user information the URL holds stays out of the logs.
            Some(url) => match url.split_once("://") {
                Some((scheme, rest)) => {
                    format!("{scheme}://{}", rest.rsplit_once('@').map_or(rest, |(_, host)| host))
                }
                None => url.rsplit_once('@').map_or(url.as_str(), |(_, host)| host).to_owned(),
            },
            None => "AWS S3".to_owned(),
        };
        format!("s3://{}/ at {endpoint}", self.config.bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::chain as error_chain;

    #[test]
    fn a_request_waits_while_a_connection_is_closing() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let admission = Arc::new(Admission::new(2));
            admission.closing_began();
            let waiting = {
                let admission = admission.clone();
                tokio::spawn(async move { drop(admission.admit().await) })
            };
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert!(!waiting.is_finished(), "admitted while a connection's socket is still open");
            admission.closing_began();
            admission.closing_ended();
            tokio::task::yield_now().await;
            assert!(!waiting.is_finished(), "one connection is still closing");
            admission.closing_ended();
            waiting.await.unwrap();
            // Nothing closing: admitted at once, up to the limit.
            let (_a, _b) = (admission.admit().await, admission.admit().await);
            assert_eq!(admission.requests.available_permits(), 0);
        });
    }
    use aws_sdk_s3::{
        error::{ConnectorError, ErrorMetadata},
        operation::list_multipart_uploads::ListMultipartUploadsError,
        primitives::SdkBody,
    };

    type ListError = SdkError<ListMultipartUploadsError, HttpResponse>;

    /// The error the SDK gives for an answer of the store.
    fn answer(status: u16, code: &str, message: &str) -> ListError {
        let meta = ErrorMetadata::builder().code(code).message(message).build();
        let raw = HttpResponse::new(status.try_into().expect("a status"), SdkBody::empty());
        SdkError::service_error(ListMultipartUploadsError::generic(meta), raw)
    }

    #[test]
    fn tags_are_url_encoded() {
        let tags = [
            ("customer".to_owned(), "acme & co/ü=1".to_owned()),
            ("retention".to_owned(), "short".to_owned()),
        ];
        assert_eq!(encode_tags(&tags), "customer=acme%20%26%20co%2F%C3%BC%3D1&retention=short");
        assert_eq!(encode_tags(&[]), "");
    }

    #[test]
    fn a_store_that_refuses_the_tags_names_the_setting_that_leaves_them_out() {
        let refused = |status, code, message, tagged| {
            tags_refused(tagged, store_error("PutObject", "k", answer(status, code, message)))
        };
        let e = refused(501, "NotImplemented", "x-amz-tagging", true);
        assert!(matches!(e, UploadError::Refused { .. }) && e.is_permanent(), "{e:?}");
        assert!(e.to_string().contains("set [store] tagging = false (--no-tagging)"), "{e}");
        let e = refused(400, "InvalidTag", "The TagValue you have provided is invalid", true);
        assert!(e.is_permanent() && e.to_string().contains("[store] tagging = false"), "{e}");
        // Without tags, or another error: as it was.
        let e = refused(501, "NotImplemented", "x", false);
        assert!(e.is_retryable() && !e.to_string().contains("tagging"), "{e}");
        let e = refused(403, "AccessDenied", "Forbidden", true);
        assert_eq!(e.to_string(), "PutObject k: AccessDenied: Forbidden");
        let e = refused(412, "PreconditionFailed", "the ETag does not match", true);
        assert!(!e.to_string().contains("tagging"), "an ETag is not a tag: {e}");
        let e = refused(400, "InvalidArgument", "The header 'x-amz-tagging' shall be encoded", true);
        assert!(e.to_string().contains("(--no-tagging)"), "{e}");
    }

    #[test]
    fn sdk_errors_stay_whole_underneath_and_the_message_names_request_and_answer() {
        let e = store_error("ListMultipartUploads", "caps/", answer(403, "AccessDenied", "Forbidden"));
        assert_eq!(e.to_string(), "ListMultipartUploads caps/: AccessDenied: Forbidden");
        assert!(!e.is_retryable() && !e.is_permanent(), "{e:?}");
        let source = std::error::Error::source(&e).expect("the SDK's error underneath");
        assert!(source.downcast_ref::<ListError>().is_some(), "{source:?}");

        let e = store_error("ListMultipartUploads", "caps/", answer(503, "SlowDown", "Reduce your rate"));
        assert!(e.is_retryable(), "{e:?}");

        let e = store_error("ListMultipartUploads", "caps/", answer(400, "InvalidArgument", "Bad prefix"));
        assert!(matches!(e, UploadError::Refused { .. }) && e.is_permanent(), "{e:?}");
        assert_eq!(
            e.to_string(),
            "ListMultipartUploads caps/: InvalidArgument: Bad prefix (the request is invalid and is not retried)"
        );

        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = store_error(
            "ListMultipartUploads",
            "caps/",
            ListError::dispatch_failure(ConnectorError::io(refused.into())),
        );
        assert!(e.is_retryable(), "{e:?}");
        assert_eq!(e.to_string(), "ListMultipartUploads caps/: cannot reach the store");
        let chain = error_chain(&e);
        assert!(
            chain.starts_with("ListMultipartUploads caps/: cannot reach the store: dispatch failure"),
            "{chain}"
        );
        assert!(chain.ends_with("connection refused"), "{chain}");
    }
}
