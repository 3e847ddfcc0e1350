//! Google Cloud Storage through its JSON API, over hyper.
//!
//! A small object is one multipart request (its metadata and its bytes, with their CRC32C). A
//! large one is a resumable upload session fed part by part while the capture runs: the
//! session's URI is the upload id, so the spool journal keeps it as it keeps an S3 upload id.
//! A session takes its bytes in order, in pieces that are multiples of 256 KiB except the
//! last, so parts are sent one after the other (part `n` waits for part `n - 1`), and the tail
//! of each part past the last 256 KiB boundary is held in memory and sent with the next part,
//! or with the final request, which also carries the CRC32C of the whole object
//! (`x-goog-hash`); the store's own checksum of the object is compared with it. Aborting an
//! upload cancels its session (`DELETE`).
//!
//! GCS cannot list open sessions (they expire after a week and cost nothing meanwhile), so
//! [`Sink::list_multipart`] finds none. A session begun by an earlier process can be completed
//! when every byte of it reached the store; more cannot be appended to it, as the bytes the
//! earlier process held in memory are gone (an error that is not retried).
//!
//! Credentials: a service-account JSON key (a JWT signed with its RSA key, exchanged for an
//! access token at the key's `token_uri`), or Application Default Credentials
//! (`GOOGLE_APPLICATION_CREDENTIALS`, then the metadata server). With an endpoint override
//! (an emulator) and no key file, requests carry no credentials. Tokens and keys are never
//! logged.
//!
//! Why not Google's own crate: its resumable uploads ignored an emulator's port in a trial, it
//! brings a large tree (gRPC and its own HTTP stack) to a machine that builds on two cores, and
//! the [`Sink`] needs a handful of HTTP requests, which hyper (already here) makes.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::Semaphore;

use super::{BoxError, ObjectMeta, PartDone, PendingUpload, Result, Sink, UploadError};

/// GCS's own endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";

/// The unit of a resumable upload's pieces (all but the last).
pub const CHUNK_UNIT: usize = 256 << 10;

/// Where and how objects are stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcsConfig {
    /// Bucket.
    pub bucket: String,
    /// Endpoint (an emulator's, e.g. `http://127.0.0.1:4443`); `None`: GCS.
    pub endpoint: Option<String>,
    /// A service-account JSON key file; `None`: Application Default Credentials (none with an
    /// endpoint override).
    pub key_file: Option<PathBuf>,
    /// HTTP requests to the store at once at most (so TCP connections).
    pub max_connections: usize,
}

/// An endpoint: scheme, host and port, and the path it starts with.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    tls: bool,
    host: String,
    port: u16,
    /// Path the endpoint's URL has, without the trailing slash ("" for none).
    base: String,
}

/// Checks an endpoint URL (`store.gcs_endpoint`): why it cannot be used, if so.
pub fn check_endpoint(url: &str) -> std::result::Result<(), String> {
    Endpoint::parse(url).map(drop)
}

impl Endpoint {
    fn parse(url: &str) -> std::result::Result<Self, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err("the URL must start with http:// or https://".into());
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| format!("{p:?} is not a port"))?)
            }
            _ => (authority, if tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("no host".into());
        }
        Ok(Self { tls, host: host.to_owned(), port, base: path.trim_end_matches('/').to_owned() })
    }

    fn authority(&self) -> String {
        match (self.tls, self.port) {
            (true, 443) | (false, 80) => self.host.clone(),
            _ => format!("{}:{}", self.host, self.port),
        }
    }
}

/// Percent-encodes `s` for a URL path segment or query value (everything but the unreserved
/// characters).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An answer: status, headers we need, body.
struct Answer {
    status: u16,
    location: Option<String>,
    range: Option<String>,
    body: Bytes,
}

/// A request to send.
struct Call<'a> {
    operation: &'static str,
    key: &'a str,
    method: hyper::Method,
    /// The whole URL (its endpoint must be the store's).
    url: String,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
    /// How long it may take.
    timeout: Duration,
}

/// A service account's key, as the JSON key file holds it.
#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    client_email: String,
    #[serde(default)]
    private_key: String,
    #[serde(default)]
    token_uri: String,
}

/// A key loaded for signing.
struct ServiceAccount {
    email: String,
    token_uri: String,
    key: Arc<dyn tokio_rustls::rustls::sign::SigningKey>,
}

/// How requests are authorized.
enum Credentials {
    /// None (an emulator).
    Anonymous,
    /// A service account's key.
    Key(ServiceAccount),
    /// The metadata server of the machine (Compute Engine, GKE).
    Metadata,
}

/// An access token and when it stops being used.
#[derive(Clone)]
struct Token {
    value: String,
    until: Instant,
}

/// What a resumable session has received: the parts in order, the tail held back.
#[derive(Default)]
struct Session {
    /// The part the session takes next.
    next_part: i32,
    /// Bytes the store has.
    offset: u64,
    /// Bytes past the last 256 KiB boundary, sent with the next part or the final request.
    carry: Vec<u8>,
    /// CRC32C of every byte given so far (sent and held).
    crc: Option<crc_fast::Digest>,
    content_type: String,
    /// Wakes the tasks of later parts when a part is in.
    turn: Arc<tokio::sync::Notify>,
}

/// Errors of loading credentials.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read the service-account key file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the service-account key file {path} is not a service-account JSON key: {reason}")]
    Invalid { path: String, reason: String },
}

/// A bucket through the GCS JSON API.
pub struct GcsSink {
    bucket: String,
    endpoint: Endpoint,
    credentials: Credentials,
    token: tokio::sync::Mutex<Option<Token>>,
    requests: Semaphore,
    sessions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Session>>>>,
}

impl GcsSink {
    /// A client for `config.bucket`; reads and checks the key file, if any.
    pub fn new(config: GcsConfig) -> Result<Self> {
        let url = config.endpoint.clone().unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let endpoint =
            Endpoint::parse(&url).map_err(|reason| UploadError::Setting { field: "gcs_endpoint", reason })?;
        let credentials = match (&config.key_file, &config.endpoint) {
            (Some(path), _) => Credentials::Key(load_key(path).map_err(setting_error)?),
            (None, Some(_)) => Credentials::Anonymous,
            (None, None) => match std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS") {
                Some(path) => Credentials::Key(load_key(Path::new(&path)).map_err(setting_error)?),
                None => Credentials::Metadata,
            },
        };
        Ok(Self {
            bucket: config.bucket,
            endpoint,
            credentials,
            token: tokio::sync::Mutex::new(None),
            requests: Semaphore::new(config.max_connections.max(1)),
            sessions: Mutex::new(HashMap::new()),
        })
    }

    fn api(&self, path: &str) -> String {
        format!("{}{}{path}", self.origin(), self.endpoint.base)
    }

    fn origin(&self) -> String {
        format!("{}://{}", if self.endpoint.tls { "https" } else { "http" }, self.endpoint.authority())
    }

    fn object_url(&self, key: &str) -> String {
        self.api(&format!("/storage/v1/b/{}/o/{}", encode(&self.bucket), encode(key)))
    }

    /// The `Authorization` header, if requests carry one.
    async fn authorization(&self, operation: &'static str, key: &str) -> Result<Option<String>> {
        if matches!(self.credentials, Credentials::Anonymous) {
            return Ok(None);
        }
        let mut token = self.token.lock().await;
        if let Some(t) = token.as_ref().filter(|t| t.until > Instant::now()) {
            return Ok(Some(format!("Bearer {}", t.value)));
        }
        let fresh = self.fetch_token().await.map_err(|(reason, retryable)| UploadError::Store {
            operation,
            key: key.to_owned(),
            reason: format!("cannot get an access token: {reason}"),
            retryable,
            source: None,
        })?;
        let header = format!("Bearer {}", fresh.value);
        *token = Some(fresh);
        Ok(Some(header))
    }

    /// A new access token; the error: why not, and whether trying again may help.
    async fn fetch_token(&self) -> std::result::Result<Token, (String, bool)> {
        #[derive(Deserialize)]
        struct Granted {
            access_token: String,
            #[serde(default)]
            expires_in: u64,
        }
        let (url, method, headers, body) = match &self.credentials {
            Credentials::Anonymous => unreachable!("anonymous requests need no token"),
            Credentials::Key(account) => {
                let assertion = account.assertion().map_err(|e| (e, false))?;
                let form = format!(
                    "grant_type={}&assertion={}",
                    encode("urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    encode(&assertion)
                );
                let headers = vec![("content-type", "application/x-www-form-urlencoded".to_owned())];
                (account.token_uri.clone(), hyper::Method::POST, headers, Bytes::from(form))
            }
            Credentials::Metadata => (
                "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token"
                    .to_owned(),
                hyper::Method::GET,
                vec![("metadata-flavor", "Google".to_owned())],
                Bytes::new(),
            ),
        };
        let endpoint = Endpoint::parse(&url).map_err(|e| (format!("token URL {url:?}: {e}"), false))?;
        let path = path_of(&url);
        let exchange = exchange(&endpoint, method, &path, &headers, body);
        let answer = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
            Err(_) => return Err((format!("{} did not answer within 10 s", endpoint.host), true)),
            Ok(Err(e)) => return Err((format!("{}: {}", endpoint.host, crate::report::chain(&*e)), true)),
            Ok(Ok(answer)) => answer,
        };
        if answer.status != 200 {
            let retryable = answer.status == 429 || answer.status >= 500;
            return Err((
                format!("{} answered {}{}", endpoint.host, answer.status, message(&answer.body)),
                retryable,
            ));
        }
        let granted: Granted = serde_json::from_slice(&answer.body)
            .map_err(|e| (format!("{} answered without a token: {e}", endpoint.host), false))?;
        // Used until a minute before it expires.
        let life = Duration::from_secs(granted.expires_in.max(120) - 60);
        Ok(Token { value: granted.access_token, until: Instant::now() + life })
    }

    /// Sends `call` once (under the limit on requests at once).
    async fn send(&self, call: Call<'_>) -> Result<Answer> {
        let Call { operation, key, method, url, mut headers, body, timeout } = call;
        if let Some(auth) = self.authorization(operation, key).await? {
            headers.push(("authorization", auth));
        }
        let endpoint = Endpoint::parse(&url).map_err(|reason| UploadError::Refused {
            operation,
            key: key.to_owned(),
            reason: format!("the URL {url:?} the store gave: {reason}"),
            source: reason.clone().into(),
        })?;
        let _permit = self.requests.acquire().await.expect("the limit is never closed");
        let path = path_of(&url);
        match tokio::time::timeout(timeout, exchange(&endpoint, method, &path, &headers, body)).await {
            Err(_) => Err(UploadError::Store {
                operation,
                key: key.to_owned(),
                reason: format!("no answer within {} s", timeout.as_secs()),
                retryable: true,
                source: None,
            }),
            Ok(Err(source)) => Err(UploadError::Store {
                operation,
                key: key.to_owned(),
                reason: format!("cannot reach {}", endpoint.authority()),
                retryable: true,
                source: Some(source),
            }),
            Ok(Ok(answer)) => Ok(answer),
        }
    }

    /// Sends `call`, and turns an answer outside `ok` into an error.
    async fn request(&self, call: Call<'_>, ok: &[u16]) -> Result<Answer> {
        let (operation, key) = (call.operation, call.key.to_owned());
        let answer = self.send(call).await?;
        if ok.contains(&answer.status) {
            return Ok(answer);
        }
        Err(status_error(operation, &key, &self.bucket, &answer))
    }

    /// The session of `upload_id`, known to this process or not.
    fn session(&self, upload_id: &str) -> Option<Arc<tokio::sync::Mutex<Session>>> {
        self.sessions.lock().expect("never poisoned").get(upload_id).cloned()
    }

    /// How many bytes the store has of the session `upload_id`: (bytes, whether it is
    /// complete).
    async fn persisted(&self, key: &str, upload_id: &str) -> Result<(u64, bool)> {
        let call = Call {
            operation: "QueryResumableUpload",
            key,
            method: hyper::Method::PUT,
            url: upload_id.to_owned(),
            headers: vec![("content-range", "bytes */*".to_owned())],
            body: Bytes::new(),
            timeout: Duration::from_secs(30),
        };
        let answer = self.request(call, &[200, 201, 308]).await?;
        if answer.status != 308 {
            return Ok((0, true));
        }
        let end = answer
            .range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes=0-"))
            .and_then(|n| n.parse::<u64>().ok())
            .map_or(0, |last| last + 1);
        Ok((end, false))
    }

    /// Sends bytes `offset..offset + body.len()` of a session; `total`: the object's length,
    /// for the final request. The store must have them all after it.
    async fn put_chunk(
        &self,
        key: &str,
        upload_id: &str,
        offset: u64,
        body: Bytes,
        total: Option<(u64, u32)>,
        content_type: &str,
    ) -> Result<Answer> {
        let len = body.len() as u64;
        let range = match (len, total) {
            (0, Some((total, _))) => format!("bytes */{total}"),
            (_, Some((total, _))) => format!("bytes {offset}-{}/{total}", offset + len - 1),
            (_, None) => format!("bytes {offset}-{}/*", offset + len - 1),
        };
        let mut headers = vec![("content-range", range), ("content-type", content_type.to_owned())];
        if let Some((_, crc)) = total {
            headers.push(("x-goog-hash", format!("crc32c={}", crc_base64(crc))));
        }
        let call = Call {
            operation: if total.is_some() { "CompleteResumableUpload" } else { "UploadChunk" },
            key,
            method: hyper::Method::PUT,
            url: upload_id.to_owned(),
            headers,
            body,
            timeout: transfer_timeout(len),
        };
        let ok: &[u16] = if total.is_some() { &[200, 201] } else { &[308] };
        let answer = self.request(call, ok).await?;
        if total.is_none() {
            let have = answer
                .range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes=0-"))
                .and_then(|n| n.parse::<u64>().ok())
                .map_or(0, |last| last + 1);
            if have != offset + len {
                return Err(UploadError::Store {
                    operation: "UploadChunk",
                    key: key.to_owned(),
                    reason: format!("the store has {have} bytes of the upload, not {}", offset + len),
                    retryable: true,
                    source: None,
                });
            }
        }
        Ok(answer)
    }
}

/// The path and query of a URL.
fn path_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    match rest.find('/') {
        Some(at) => rest[at..].to_owned(),
        None => "/".to_owned(),
    }
}

/// How long a request carrying `len` bytes may take: 20 s, and 1 s per MiB.
fn transfer_timeout(len: u64) -> Duration {
    Duration::from_secs(20 + (len >> 20))
}

fn crc_base64(crc: u32) -> String {
    aws_smithy_types::base64::encode(crc.to_be_bytes())
}

fn setting_error(e: CredentialsError) -> UploadError {
    UploadError::Setting { field: "gcs_key_file", reason: crate::report::chain(&e) }
}

/// The `error.message` of a JSON error answer, as `: message`, printable and short.
fn message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Failure {
        error: Detail,
    }
    #[derive(Deserialize)]
    struct Detail {
        #[serde(default)]
        message: String,
    }
    let text = match serde_json::from_slice::<Failure>(body) {
        Ok(f) => f.error.message,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let text: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
    if text.trim().is_empty() { String::new() } else { format!(": {}", text.trim()) }
}

/// The error an answer with an unexpected status is.
fn status_error(operation: &'static str, key: &str, bucket: &str, answer: &Answer) -> UploadError {
    let status = answer.status;
    let text = message(&answer.body);
    let reason = match status {
        404 if operation == "List" || operation == "Check" => format!("no bucket {bucket} (404{text})"),
        404 | 410 if operation.contains("Resumable") || operation == "UploadChunk" => {
            format!("the resumable upload session is gone ({status}{text})")
        }
        404 => format!("not found (404{text})"),
        401 | 403 => format!("access denied ({status}{text})"),
        _ => format!("the store answered {status}{text}"),
    };
    if status == 400 || status == 411 || status == 413 {
        return UploadError::Refused {
            operation,
            key: key.to_owned(),
            reason: reason.clone(),
            source: reason.into(),
        };
    }
    UploadError::Store {
        operation,
        key: key.to_owned(),
        reason,
        retryable: status == 408 || status == 429 || status >= 500,
        source: None,
    }
}

/// Reads a service-account key file and loads its private key.
fn load_key(path: &Path) -> std::result::Result<ServiceAccount, CredentialsError> {
    let shown = path.display().to_string();
    let invalid = |reason: String| CredentialsError::Invalid { path: shown.clone(), reason };
    let text =
        std::fs::read(path).map_err(|source| CredentialsError::Read { path: shown.clone(), source })?;
    let key: KeyFile =
        serde_json::from_slice(&text).map_err(|e| invalid(format!("not JSON of a key ({e})")))?;
    if key.kind != "service_account" {
        return Err(invalid(format!("its type is {:?}, not \"service_account\"", key.kind)));
    }
    if key.client_email.is_empty() {
        return Err(invalid("it names no client_email".into()));
    }
    let token_uri = if key.token_uri.is_empty() {
        "https://oauth2.googleapis.com/token".to_owned()
    } else {
        key.token_uri
    };
    // The PEM's base64 between its BEGIN and END lines is the PKCS#8 key.
    let pem = key.private_key;
    let b64: String =
        pem.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("-----")).collect();
    if !pem.contains("BEGIN PRIVATE KEY") {
        return Err(invalid("its private_key is not a PEM PKCS#8 key".into()));
    }
    let der = aws_smithy_types::base64::decode(&b64)
        .map_err(|_| invalid("its private_key is not valid base64".into()))?;
    let der = tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(der.into());
    let signing = tokio_rustls::rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)
        .map_err(|_| invalid("its private_key is not a key that can sign".into()))?;
    if signing.choose_scheme(&[tokio_rustls::rustls::SignatureScheme::RSA_PKCS1_SHA256]).is_none() {
        return Err(invalid("its private_key is not an RSA key".into()));
    }
    Ok(ServiceAccount { email: key.client_email, token_uri, key: signing })
}

fn base64url(bytes: &[u8]) -> String {
    aws_smithy_types::base64::encode(bytes).trim_end_matches('=').replace('+', "-").replace('/', "_")
}

impl ServiceAccount {
    /// A JWT for the token endpoint, signed RS256, valid for an hour.
    fn assertion(&self) -> std::result::Result<String, String> {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        let header = base64url(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iss": self.email,
            "scope": "https://www.googleapis.com/auth/devstorage.read_write",
            "aud": self.token_uri,
            "iat": now,
            "exp": now + 3600,
        });
        let claims = base64url(claims.to_string().as_bytes());
        let signed = format!("{header}.{claims}");
        let signer = self
            .key
            .choose_scheme(&[tokio_rustls::rustls::SignatureScheme::RSA_PKCS1_SHA256])
            .ok_or("the key cannot sign RS256")?;
        let signature = signer.sign(signed.as_bytes()).map_err(|e| format!("cannot sign: {e}"))?;
        Ok(format!("{signed}.{}", base64url(&signature)))
    }
}

/// One HTTP/1.1 exchange on a connection of its own.
async fn exchange(
    endpoint: &Endpoint,
    method: hyper::Method,
    path: &str,
    headers: &[(&'static str, String)],
    body: Bytes,
) -> std::result::Result<Answer, BoxError> {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, endpoint.authority())
        .header(hyper::header::USER_AGENT, concat!("tapstream/", env!("CARGO_PKG_VERSION")))
        .header(hyper::header::CONTENT_LENGTH, body.len());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request.body(http_body_util::Full::new(body))?;
    let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
    tcp.set_nodelay(true)?;
    let response = if endpoint.tls {
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(endpoint.host.clone())?;
        let stream = super::http::tls_connector()?.connect(name, tcp).await?;
        super::http::send(hyper_util::rt::TokioIo::new(stream), request).await
    } else {
        super::http::send(hyper_util::rt::TokioIo::new(tcp), request).await
    }?;
    let header = |name| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (location, range) = (header("location"), header("range"));
    Ok(Answer { status: response.status().as_u16(), location, range, body: response.into_body() })
}

/// The JSON resource of a new object: name, type, metadata, and its CRC32C if known.
fn resource(key: &str, meta: &ObjectMeta, crc: Option<u32>) -> serde_json::Value {
    // Object tags become metadata too (GCS has no object tags; lifecycle rules match on
    // storage class and age, and tools read the metadata).
    let mut metadata = serde_json::Map::new();
    for (k, v) in meta.metadata.iter().chain(&meta.tags) {
        metadata.insert(k.clone(), serde_json::Value::String(v.clone()));
    }
    let mut object = serde_json::json!({
        "name": key,
        "contentType": meta.content_type,
        "metadata": metadata,
    });
    if let Some(crc) = crc {
        object["crc32c"] = serde_json::Value::String(crc_base64(crc));
    }
    object
}

fn crc32c(data: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}

/// The store's CRC32C of an object, from its JSON resource.
fn stored_crc(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Object {
        crc32c: Option<String>,
    }
    serde_json::from_slice::<Object>(body).ok()?.crc32c
}

impl Sink for GcsSink {
    async fn put_object(&self, key: &str, body: Bytes, meta: &ObjectMeta) -> Result<()> {
        let crc = crc32c(&body);
        let boundary = {
            let r = crate::sys::random_bytes::<12>();
            format!("tapstream-{}", r.iter().map(|b| format!("{b:02x}")).collect::<String>())
        };
        let json = resource(key, meta, Some(crc)).to_string();
        let mut form = Vec::with_capacity(body.len() + json.len() + 256);
        form.extend_from_slice(
            format!("--{boundary}\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n{json}\r\n")
                .as_bytes(),
        );
        form.extend_from_slice(
            format!("--{boundary}\r\ncontent-type: {}\r\n\r\n", meta.content_type).as_bytes(),
        );
        form.extend_from_slice(&body);
        form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let url = self.api(&format!("/upload/storage/v1/b/{}/o?uploadType=multipart", encode(&self.bucket)));
        let len = form.len() as u64;
        let call = Call {
            operation: "PutObject",
            key,
            method: hyper::Method::POST,
            url,
            headers: vec![("content-type", format!("multipart/related; boundary={boundary}"))],
            body: Bytes::from(form),
            timeout: transfer_timeout(len),
        };
        let answer = self.request(call, &[200, 201]).await?;
        check_crc(key, &answer, crc)
    }

    async fn create_multipart(&self, key: &str, meta: &ObjectMeta) -> Result<String> {
        let url = self.api(&format!(
            "/upload/storage/v1/b/{}/o?uploadType=resumable&name={}",
            encode(&self.bucket),
            encode(key)
        ));
        let call = Call {
            operation: "CreateResumableUpload",
            key,
            method: hyper::Method::POST,
            url,
            headers: vec![
                ("content-type", "application/json; charset=UTF-8".to_owned()),
                ("x-upload-content-type", meta.content_type.clone()),
            ],
            body: Bytes::from(resource(key, meta, None).to_string()),
            timeout: Duration::from_secs(30),
        };
        let answer = self.request(call, &[200, 201]).await?;
        let Some(session) = answer.location else {
            return Err(UploadError::Store {
                operation: "CreateResumableUpload",
                key: key.to_owned(),
                reason: "the store gave no session URI (Location)".into(),
                retryable: true,
                source: None,
            });
        };
        let state = Session {
            next_part: 1,
            crc: Some(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi)),
            content_type: meta.content_type.clone(),
            ..Session::default()
        };
        self.sessions
            .lock()
            .expect("never poisoned")
            .insert(session.clone(), Arc::new(tokio::sync::Mutex::new(state)));
        Ok(session)
    }

    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Bytes) -> Result<PartDone> {
        let Some(session) = self.session(upload_id) else {
            return Err(UploadError::Refused {
                operation: "UploadChunk",
                key: key.to_owned(),
                reason: "the resumable session was begun by an earlier process: the bytes it held back \
                         are gone, so nothing more can be appended to it"
                    .into(),
                source: "unknown GCS session".into(),
            });
        };
        // Parts go in order: wait for the one before.
        loop {
            let turn = {
                let state = session.lock().await;
                if state.next_part > number {
                    // Sent already (a retry after an answer that was lost).
                    return Ok(part_done(number, state.offset + state.carry.len() as u64));
                }
                if state.next_part == number {
                    break;
                }
                state.turn.clone()
            };
            let notified = turn.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if session.lock().await.next_part >= number {
                continue;
            }
            notified.await;
        }
        let mut state = session.lock().await;
        let mut data = Vec::with_capacity(state.carry.len() + body.len());
        data.extend_from_slice(&state.carry);
        data.extend_from_slice(&body);
        let whole = data.len() / CHUNK_UNIT * CHUNK_UNIT;
        if whole > 0 {
            let data = Bytes::from(data);
            let content_type = state.content_type.clone();
            self.put_chunk(key, upload_id, state.offset, data.slice(..whole), None, &content_type).await?;
            state.offset += whole as u64;
            state.carry = data[whole..].to_vec();
        } else {
            state.carry = data;
        }
        if let Some(crc) = state.crc.as_mut() {
            crc.update(&body);
        }
        state.next_part = number + 1;
        state.turn.notify_waiters();
        Ok(part_done(number, state.offset + state.carry.len() as u64))
    }

    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: Vec<PartDone>) -> Result<()> {
        let Some(session) = self.session(upload_id) else {
            return self.complete_earlier(key, upload_id, &parts).await;
        };
        let mut state = session.lock().await;
        let expected = parts.last().map_or(0, |p| p.number + 1);
        if state.next_part != expected {
            return Err(UploadError::Refused {
                operation: "CompleteResumableUpload",
                key: key.to_owned(),
                reason: format!(
                    "parts up to {} were sent, the completion names {}",
                    state.next_part - 1,
                    expected - 1
                ),
                source: "parts out of order".into(),
            });
        }
        let total = state.offset + state.carry.len() as u64;
        let crc = state.crc.as_ref().map(|d| d.finalize() as u32);
        let content_type = state.content_type.clone();
        let tail = Bytes::from(state.carry.clone());
        let answer = self
            .put_chunk(key, upload_id, state.offset, tail, Some((total, crc.unwrap_or(0))), &content_type)
            .await?;
        if let Some(crc) = crc {
            check_crc(key, &answer, crc)?;
        }
        state.offset = total;
        state.carry.clear();
        drop(state);
        self.sessions.lock().expect("never poisoned").remove(upload_id);
        Ok(())
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        self.sessions.lock().expect("never poisoned").remove(upload_id);
        let call = Call {
            operation: "CancelResumableUpload",
            key,
            method: hyper::Method::DELETE,
            url: upload_id.to_owned(),
            headers: Vec::new(),
            body: Bytes::new(),
            timeout: Duration::from_secs(30),
        };
        // GCS answers 499 to a cancelled session; one already gone is cancelled too.
        self.request(call, &[200, 204, 404, 410, 499]).await.map(drop)
    }

    async fn list_multipart(&self, _prefix: &str) -> Result<Vec<PendingUpload>> {
        Ok(Vec::new())
    }

    async fn get(&self, key: &str, range: Option<(u64, u64)>) -> Result<Vec<u8>> {
        let mut headers = Vec::new();
        if let Some((a, b)) = range {
            headers.push(("range", format!("bytes={a}-{b}")));
        }
        let call = Call {
            operation: "GetObject",
            key,
            method: hyper::Method::GET,
            url: format!("{}?alt=media", self.object_url(key)),
            headers,
            body: Bytes::new(),
            timeout: Duration::from_secs(300),
        };
        let answer = self.request(call, &[200, 206]).await?;
        Ok(answer.body.to_vec())
    }

    async fn list(&self, prefix: &str, max: Option<usize>) -> Result<Vec<(String, u64)>> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Page {
            #[serde(default)]
            items: Vec<Item>,
            next_page_token: Option<String>,
        }
        #[derive(Deserialize)]
        struct Item {
            name: String,
            size: String,
        }
        let max = max.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!(
                "{}?prefix={}&maxResults={}&fields=items(name,size),nextPageToken",
                self.api(&format!("/storage/v1/b/{}/o", encode(&self.bucket))),
                encode(prefix),
                (max - out.len()).min(1000)
            );
            if let Some(t) = &token {
                url.push_str(&format!("&pageToken={}", encode(t)));
            }
            let call = Call {
                operation: "List",
                key: prefix,
                method: hyper::Method::GET,
                url,
                headers: Vec::new(),
                body: Bytes::new(),
                timeout: Duration::from_secs(60),
            };
            let answer = self.request(call, &[200]).await?;
            let page: Page = serde_json::from_slice(&answer.body).map_err(|e| UploadError::Store {
                operation: "List",
                key: prefix.to_owned(),
                reason: format!("the store's listing is not JSON of objects: {e}"),
                retryable: false,
                source: Some(Box::new(e)),
            })?;
            for item in page.items {
                out.push((item.name, item.size.parse().unwrap_or(0)));
            }
            token = page.next_page_token.filter(|t| !t.is_empty());
            if token.is_none() || out.len() >= max {
                break;
            }
        }
        out.sort();
        out.truncate(max);
        Ok(out)
    }

    fn url(&self, key: &str) -> String {
        format!("gs://{}/{key}", self.bucket)
    }

    async fn check(&self, prefix: &str) -> Result<()> {
        let url = format!(
            "{}?prefix={}&maxResults=1&fields=nextPageToken",
            self.api(&format!("/storage/v1/b/{}/o", encode(&self.bucket))),
            encode(prefix)
        );
        let call = Call {
            operation: "Check",
            key: prefix,
            method: hyper::Method::GET,
            url,
            headers: Vec::new(),
            body: Bytes::new(),
            timeout: super::CHECK_TIMEOUT,
        };
        self.request(call, &[200]).await.map(drop)
    }

    fn describe(&self) -> String {
        format!("gs://{}/ at {}", self.bucket, self.origin())
    }
}

impl GcsSink {
    /// Completes a session an earlier process began, if the store has every byte of it (the
    /// parts' end offsets say how many there are).
    async fn complete_earlier(&self, key: &str, upload_id: &str, parts: &[PartDone]) -> Result<()> {
        let total = parts.last().and_then(|p| p.etag.strip_prefix("end-")?.parse::<u64>().ok()).unwrap_or(0);
        let (have, complete) = self.persisted(key, upload_id).await?;
        if complete {
            return Ok(());
        }
        if have != total {
            return Err(UploadError::Refused {
                operation: "CompleteResumableUpload",
                key: key.to_owned(),
                reason: format!(
                    "the resumable session of an earlier process has {have} of its {total} bytes; the rest \
                     were held in that process's memory"
                ),
                source: "incomplete GCS session".into(),
            });
        }
        // The store computes the CRC32C of what it has; without the bytes, none is sent.
        let call = Call {
            operation: "CompleteResumableUpload",
            key,
            method: hyper::Method::PUT,
            url: upload_id.to_owned(),
            headers: vec![("content-range", format!("bytes */{total}"))],
            body: Bytes::new(),
            timeout: Duration::from_secs(30),
        };
        self.request(call, &[200, 201]).await.map(drop)
    }
}

/// A part's receipt: its etag names the object's length after it.
fn part_done(number: i32, end: u64) -> PartDone {
    PartDone { number, etag: format!("end-{end}"), crc32c: None }
}

/// Fails unless the store's CRC32C of the object is `crc`.
fn check_crc(key: &str, answer: &Answer, crc: u32) -> Result<()> {
    let ours = crc_base64(crc);
    match stored_crc(&answer.body) {
        Some(theirs) if theirs != ours => Err(UploadError::Store {
            operation: "CompleteResumableUpload",
            key: key.to_owned(),
            reason: format!("the store's CRC32C of the object is {theirs}, not {ours}"),
            retryable: false,
            source: None,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("http://127.0.0.1:4443").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port, e.base.as_str()), (false, "127.0.0.1", 4443, ""));
        let e = Endpoint::parse("https://storage.googleapis.com/").unwrap();
        assert_eq!((e.tls, e.port, e.authority().as_str()), (true, 443, "storage.googleapis.com"));
        assert!(Endpoint::parse("storage.googleapis.com").is_err());
        assert_eq!(path_of("http://h:1/upload/x?a=b"), "/upload/x?a=b");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn crc32c_is_castagnoli() {
        // The check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc_base64(0xe306_9283), "4waSgw==");
    }

    #[test]
    fn a_bad_key_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        std::fs::write(&path, r#"{"type":"service_account","client_email":"a@b","private_key":"x"}"#)
            .unwrap();
        let e = load_key(&path).err().expect("a bad key");
        assert!(e.to_string().contains("key.json") && e.to_string().contains("PKCS#8"), "{e}");
        let e = load_key(&dir.path().join("missing.json")).err().expect("no file");
        assert!(e.to_string().contains("missing.json"), "{e}");
    }
}
