//! CloudShark as a destination: a finished capture, as one PCAP file (or several, cut between
//! frames at `split_bytes`), sent to a CloudShark appliance, where analysts open it in a browser.
//!
//! What is implemented is CloudShark's documented upload API (its API reference, "Upload"):
//! `POST /api/v1/<api token>/upload` with a `multipart/form-data` body whose `file` part is
//! the capture and whose optional text parts are `filename` (the name shown),
//! `additional_tags` (comma-separated tags) and `description`. CloudShark answers 200 with the
//! JSON `{"filename": ..., "id": ...}`, the file then being at `/captures/<id>`; an error is
//! an HTTP status with the JSON `{"status": <code>, "exceptions": [<messages>]}` (401 or 403
//! for a token that is missing, wrong or lacks the upload permission).
//!
//! The token is part of the request's path, so it is never logged, never in an error, a
//! summary, an event or a metric: errors name the host and the status, and the URL recorded
//! is the file's view URL. A file waits in a spool ([`Spool`]) until CloudShark has taken it:
//! through an outage it is sent again later (on a timer and when the daemon starts).

use std::{
    io::{BufRead as _, BufReader, BufWriter, Read as _, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Errors of a CloudShark destination. Each message names the host, never the API token.
#[derive(Debug, thiserror::Error)]
pub enum CloudSharkError {
    #[error("{url:?} is not a CloudShark URL: {reason}")]
    Url { url: String, reason: String },
    #[error("the CloudShark API token file {path} cannot be read")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the CloudShark API token file {path} may be read by others (mode {mode:o}): allow its owner and \
         group only (chmod 640)"
    )]
    TokenReadableByOthers { path: PathBuf, mode: u32 },
    #[error("the CloudShark API token from {origin} is empty")]
    EmptyToken { origin: String },
    #[error("the environment variable {name} holding the CloudShark API token is not set")]
    TokenEnvMissing { name: String },
    /// The token goes in the upload's path: only characters a path takes as they are.
    #[error(
        "the CloudShark API token from {origin} holds characters other than letters, digits, '-', '_', '.'"
    )]
    TokenChars { origin: String },
    #[error("cannot connect to CloudShark at {host}")]
    Unreachable {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the TLS handshake with CloudShark at {host} failed")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP exchange with CloudShark at {host} failed")]
    Http {
        host: String,
        #[source]
        source: hyper::Error,
    },
    #[error("CloudShark at {host} did not answer within {secs} s")]
    Timeout { host: String, secs: u64 },
    /// 401 or 403: the token is wrong or may not upload. Sending again cannot help until the
    /// configuration changes.
    #[error("CloudShark at {host} refused the API token: HTTP {status}{message}")]
    Refused { host: String, status: u16, message: String },
    #[error("CloudShark at {host} answered HTTP {status}{message}")]
    Status { host: String, status: u16, message: String },
    #[error("cannot make the upload request for CloudShark at {host}: {reason}")]
    Request { host: String, reason: String },
    #[error("CloudShark at {host} answered 200 but not with a capture id: {reason}")]
    BadAnswer { host: String, reason: String },
    #[error("{operation} {path}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a PCAP file this daemon wrote: {reason}")]
    NotPcap { path: PathBuf, reason: String },
    #[error("no CloudShark destination {name:?} is configured")]
    Unknown { name: String },
}

impl CloudSharkError {
    /// Whether sending the same file again later may succeed: CloudShark down, slow, or
    /// failing on its side (5xx, 408, 429).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Tls { .. } | Self::Http { .. } | Self::Timeout { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }
}

fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CloudSharkError {
    let path = path.to_owned();
    move |source| CloudSharkError::Io { operation, path, source }
}

/// A CloudShark appliance: `cloudshark://host[:port]` (HTTPS, port 443 by default) or
/// `cloudshark+http://host[:port]` (plain HTTP, port 80 by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudSharkUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for CloudSharkUrl {
    type Err = CloudSharkError;

    fn from_str(url: &str) -> Result<Self, CloudSharkError> {
        let bad = |reason: &str| CloudSharkError::Url { url: url.into(), reason: reason.into() };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("cloudshark://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("cloudshark+http://") {
            (false, rest)
        } else {
            return Err(bad("use cloudshark://host[:port] (HTTPS) or cloudshark+http://host[:port]"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(bad("only a host and a port: no path, query or user"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 address without a port: [::1].
            Some((h, p)) if !p.contains(']') => (
                h,
                p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| bad("the port is not 1 to 65535"))?,
            ),
            _ => (rest, if tls { 443 } else { 80 }),
        };
        let name = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let valid = !name.is_empty()
            && (name.parse::<std::net::Ipv6Addr>().is_ok() && host.starts_with('[')
                || name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
        if !valid {
            return Err(bad("no host name"));
        }
        Ok(Self { tls, host: name.to_owned(), port })
    }
}

impl CloudSharkUrl {
    fn default_port(&self) -> u16 {
        if self.tls { 443 } else { 80 }
    }

    /// `host` or `host:port` (the port when not the scheme's), IPv6 in brackets: for the
    /// `Host` header, URLs and messages.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == self.default_port() { host } else { format!("{host}:{}", self.port) }
    }

    /// The file's page in CloudShark: `https://host/captures/<id>`.
    pub fn view_url(&self, id: &str) -> String {
        format!("{}://{}/captures/{id}", if self.tls { "https" } else { "http" }, self.authority())
    }
}

impl std::fmt::Display for CloudSharkUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "cloudshark" } else { "cloudshark+http" };
        write!(f, "{scheme}://{}", self.authority())
    }
}

/// `[cloudshark.<name>]`: a CloudShark appliance captures may be sent to. A request names it
/// (by `<name>` or its `url`) in its `cloudshark` field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudSharkSection {
    /// The appliance: `cloudshark://host[:port]` (HTTPS, checked against the system's CA
    /// certificates) or `cloudshark+http://host[:port]` (plain HTTP).
    pub url: String,
    /// File holding the API token (mode 600 or 640: a file others may read is refused).
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the API token, instead of `token_file`.
    pub token_env: Option<String>,
    /// How long one upload may take, in seconds; past it the upload is tried again.
    pub timeout_secs: u64,
    /// Largest file sent, in bytes: a larger capture is sent as several files, cut between
    /// frames; 0: one file whatever its size.
    pub split_bytes: u64,
    /// Attempts at each file when a capture ends (1 s, 2 s, 4 s... apart) while CloudShark is
    /// down or failing, before the file waits in the spool.
    pub attempts: u32,
    /// How often files waiting in the spool are sent again, in seconds (also when the daemon
    /// starts).
    pub retry_secs: u64,
    /// File format sent: `pcap`, or `pcapng` (each interface of a capture over several its own,
    /// a section comment naming the capture); a pcapng file is not cut (`split_bytes` 0).
    pub format: String,
}

impl Default for CloudSharkSection {
    fn default() -> Self {
        Self {
            url: String::new(),
            token_file: None,
            token_env: None,
            timeout_secs: 300,
            split_bytes: 0,
            attempts: 3,
            retry_secs: 60,
            format: "pcap".into(),
        }
    }
}

impl CloudSharkSection {
    /// Checks the values and that the token can be read; the error is (field, message).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        self.url.parse::<CloudSharkUrl>().map_err(|e| ("url", e.to_string()))?;
        if self.timeout_secs == 0 {
            return Err(("timeout_secs", "must be at least 1".into()));
        }
        if self.attempts == 0 {
            return Err(("attempts", "must be at least 1".into()));
        }
        if self.retry_secs == 0 {
            return Err(("retry_secs", "must be at least 1".into()));
        }
        if !["pcap", "pcapng"].contains(&self.format.as_str()) {
            return Err(("format", format!("{:?} is not pcap or pcapng", self.format)));
        }
        if self.format == "pcapng" && self.split_bytes != 0 {
            return Err((
                "split_bytes",
                "must be 0 with format = \"pcapng\": pcapng files are not cut".into(),
            ));
        }
        if self.split_bytes != 0 && self.split_bytes < 64 * 1024 {
            return Err(("split_bytes", format!("{} is below 65536 (and not 0)", self.split_bytes)));
        }
        match (&self.token_file, &self.token_env) {
            (Some(_), Some(_)) => Err(("token_env", "give token_file or token_env, not both".into())),
            (None, None) => Err(("token_file", "the API token is needed: token_file or token_env".into())),
            (Some(_), None) => self.token().map(drop).map_err(|e| ("token_file", e.to_string())),
            (None, Some(_)) => self.token().map(drop).map_err(|e| ("token_env", e.to_string())),
        }
    }

    /// Reads the API token.
    fn token(&self) -> Result<Token, CloudSharkError> {
        let (token, origin) = match (&self.token_file, &self.token_env) {
            (Some(path), _) => (read_token_file(path)?, path.display().to_string()),
            (None, Some(name)) => (
                std::env::var(name).map_err(|_| CloudSharkError::TokenEnvMissing { name: name.clone() })?,
                format!("${name}"),
            ),
            (None, None) => return Err(CloudSharkError::EmptyToken { origin: "the configuration".into() }),
        };
        let token = token.trim().to_owned();
        if token.is_empty() {
            return Err(CloudSharkError::EmptyToken { origin });
        }
        if !token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(CloudSharkError::TokenChars { origin });
        }
        Ok(Token(token))
    }
}

/// Reads a token file that others may not read (the mode of the file opened, not of the path).
fn read_token_file(path: &Path) -> Result<String, CloudSharkError> {
    use std::os::unix::fs::PermissionsExt as _;
    let error = |source| CloudSharkError::TokenFile { path: path.to_owned(), source };
    let mut file = std::fs::File::open(path).map_err(error)?;
    let mode = file.metadata().map_err(error)?.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(CloudSharkError::TokenReadableByOthers { path: path.to_owned(), mode });
    }
    let mut token = String::new();
    file.read_to_string(&mut token).map_err(error)?;
    Ok(token)
}

/// The API token; its `Debug` does not show it.
#[derive(Clone)]
struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// What a file is sent with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    /// The name CloudShark shows (`filename`).
    pub filename: String,
    /// Its tags (`additional_tags`).
    pub tags: Vec<String>,
    /// Its description (`description`).
    pub description: String,
}

/// What CloudShark made of a file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudSharkFile {
    /// CloudShark's id of the file.
    pub id: String,
    /// Its page: `https://host/captures/<id>`.
    pub url: String,
    /// The name it was sent under.
    pub filename: String,
    /// Its bytes.
    pub bytes: u64,
}

/// A capture's delivery to CloudShark, in its summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudSharkSummary {
    /// The appliance: `cloudshark://host[:port]`.
    pub destination: String,
    /// The files CloudShark took, in order.
    pub files: Vec<CloudSharkFile>,
    /// Files waiting in the spool to be sent again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spooled: Vec<String>,
    /// Why files are not sent yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The form's parts besides the file, and the file part's name and content type.
const FILE_FIELD: &str = "file";
const PCAP_TYPE: &str = "application/vnd.tcpdump.pcap";

/// A `multipart/form-data` body (RFC 7578): the text fields, then the file.
pub fn multipart_body(boundary: &str, fields: &[(&str, &str)], filename: &str, file: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(file.len() + 512);
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{FILE_FIELD}\"; filename=\"{filename}\"\r\n\
             Content-Type: {PCAP_TYPE}\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

/// A tag as CloudShark takes it in its comma-separated list: no comma, no control character.
fn clean(value: &str) -> String {
    value.chars().map(|c| if c == ',' || c.is_control() { '_' } else { c }).collect()
}

/// A configured appliance, ready to send to.
#[derive(Clone, Debug)]
pub struct CloudShark {
    /// Its `[cloudshark.<name>]`.
    pub name: String,
    pub url: CloudSharkUrl,
    token: Token,
    timeout: Duration,
    /// Largest file, 0: no limit.
    pub split_bytes: u64,
    attempts: u32,
    /// How often the spool is sent again.
    pub retry: Duration,
    /// Whether files are sent as pcapng (else PCAP).
    pub pcapng: bool,
}

impl CloudShark {
    /// The appliance of `[cloudshark.<name>]` (validated), with its token read.
    pub fn new(name: &str, section: &CloudSharkSection) -> Result<Self, CloudSharkError> {
        Ok(Self {
            name: name.to_owned(),
            url: section.url.parse()?,
            token: section.token()?,
            timeout: Duration::from_secs(section.timeout_secs),
            split_bytes: section.split_bytes,
            attempts: section.attempts,
            retry: Duration::from_secs(section.retry_secs),
            pcapng: section.format == "pcapng",
        })
    }

    /// Sends one file, once: CloudShark's id and view URL, or why not.
    pub async fn upload(&self, upload: &Upload, file: Bytes) -> Result<CloudSharkFile, CloudSharkError> {
        let host = self.url.authority();
        let secs = self.timeout.as_secs();
        let bytes = file.len() as u64;
        let boundary = {
            let r = crate::sys::random_bytes::<12>();
            format!("tapstream-{}", r.iter().map(|b| format!("{b:02x}")).collect::<String>())
        };
        let tags = upload.tags.iter().map(|t| clean(t)).collect::<Vec<_>>().join(",");
        let fields = [
            ("filename", upload.filename.as_str()),
            ("additional_tags", tags.as_str()),
            ("description", &clean(&upload.description)),
        ];
        let body = multipart_body(&boundary, &fields, &upload.filename, &file);
        drop(file);
        let request = hyper::Request::post(format!("/api/v1/{}/upload", self.token.0))
            .header(hyper::header::HOST, &host)
            .header(hyper::header::CONTENT_TYPE, format!("multipart/form-data; boundary={boundary}"))
            .header(hyper::header::CONTENT_LENGTH, body.len())
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, concat!("tapstream/", env!("CARGO_PKG_VERSION")))
            .body(http_body_util::Full::new(Bytes::from(body)))
            .map_err(|e| CloudSharkError::Request { host: host.clone(), reason: e.to_string() })?;
        let exchange = self.exchange(request);
        let (status, answer) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| CloudSharkError::Timeout { host: host.clone(), secs })??;
        metrics::counter!(crate::metrics::CLOUDSHARK_BYTES).increment(bytes);
        let message = error_message(&answer);
        match status {
            200 | 201 => {
                #[derive(Deserialize)]
                struct Answer {
                    id: serde_json::Value,
                }
                let answer: Answer = serde_json::from_slice(&answer)
                    .map_err(|e| CloudSharkError::BadAnswer { host: host.clone(), reason: e.to_string() })?;
                let id = match answer.id {
                    serde_json::Value::String(s) if !s.is_empty() => s,
                    serde_json::Value::Number(n) => n.to_string(),
                    other => {
                        return Err(CloudSharkError::BadAnswer { host, reason: format!("id is {other}") });
                    }
                };
                if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                    return Err(CloudSharkError::BadAnswer {
                        host,
                        reason: "the id is not a plain name".into(),
                    });
                }
                Ok(CloudSharkFile {
                    url: self.url.view_url(&id),
                    id,
                    filename: upload.filename.clone(),
                    bytes,
                })
            }
            401 | 403 => Err(CloudSharkError::Refused { host, status, message }),
            _ => Err(CloudSharkError::Status { host, status, message }),
        }
    }

    /// Sends `request` on a connection of its own: (status, body).
    async fn exchange(
        &self,
        request: hyper::Request<http_body_util::Full<Bytes>>,
    ) -> Result<(u16, Bytes), CloudSharkError> {
        let host = self.url.authority();
        let tcp = tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|source| CloudSharkError::Unreachable { host: host.clone(), source })?;
        let http = |source| CloudSharkError::Http { host: host.clone(), source };
        if self.url.tls {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(self.url.host.clone()).map_err(
                |e| CloudSharkError::Tls { host: host.clone(), source: std::io::Error::other(e.to_string()) },
            )?;
            let stream = super::http::tls_connector()
                .map_err(|source| CloudSharkError::Tls { host: host.clone(), source })?
                .connect(name, tcp)
                .await
                .map_err(|source| CloudSharkError::Tls { host: host.clone(), source })?;
            super::http::send(hyper_util::rt::TokioIo::new(stream), request).await
        } else {
            super::http::send(hyper_util::rt::TokioIo::new(tcp), request).await
        }
        .map(|answer| (answer.status().as_u16(), answer.into_body()))
        .map_err(http)
    }

    /// Sends one file, trying again while CloudShark is down or failing (up to `attempts`,
    /// 1 s, 2 s, 4 s... apart); returns the last error.
    pub async fn upload_with_retries(
        &self,
        upload: &Upload,
        file: Bytes,
    ) -> Result<CloudSharkFile, CloudSharkError> {
        let mut wait = Duration::from_secs(1);
        let mut attempt = 1;
        loop {
            match self.upload(upload, file.clone()).await {
                Ok(done) => {
                    metrics::counter!(crate::metrics::CLOUDSHARK_UPLOADS, "result" => "ok").increment(1);
                    return Ok(done);
                }
                Err(e) => {
                    metrics::counter!(crate::metrics::CLOUDSHARK_UPLOADS, "result" => "failed").increment(1);
                    if !e.is_retryable() || attempt >= self.attempts {
                        return Err(e);
                    }
                    log::warn!(
                        "sending {} to {}: {}; trying again in {} s",
                        upload.filename,
                        self.url,
                        crate::report::chain(&e),
                        wait.as_secs()
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(60));
                    attempt += 1;
                }
            }
        }
    }
}

/// The error's text from CloudShark's JSON answer (`exceptions`), as `: text`, printable and
/// short; empty when there is none.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Failure {
        #[serde(default)]
        exceptions: Vec<String>,
    }
    let text = match serde_json::from_slice::<Failure>(body) {
        Ok(f) if !f.exceptions.is_empty() => f.exceptions.join("; "),
        _ => return String::new(),
    };
    let text: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
    format!(": {text}")
}

/// A file waiting in the spool: what it is sent with and for which capture.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The `[cloudshark.<name>]` it goes to.
    pub destination: String,
    /// The capture it holds frames of.
    pub capture: String,
    pub upload: Upload,
    /// CloudShark refused it for good (the token): sent again only when the daemon starts.
    #[serde(default)]
    pub refused: bool,
}

/// Files on their way to CloudShark, each `<capture>.<n>.pcap` (or `.pcapng`) with its `.json`
/// ([`Pending`]), in `<state_dir>/cloudshark`. A file leaves once CloudShark has taken it.
#[derive(Clone, Debug)]
pub struct Spool {
    dir: PathBuf,
    /// Files being sent now (by a capture's end or by the timer): each is sent by one only.
    busy: Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>,
}

/// A spooled file claimed for sending; released when dropped.
#[derive(Debug)]
pub struct Claim {
    path: PathBuf,
    busy: Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>,
}

impl Claim {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.path);
    }
}

impl Spool {
    /// The spool under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self { dir: state_dir.join("cloudshark"), busy: Arc::default() }
    }

    /// Claims `path` for sending, unless it is being sent already.
    fn claim(&self, path: &Path) -> Option<Claim> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.insert(path.to_owned()).then(|| Claim { path: path.to_owned(), busy: self.busy.clone() })
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A path in the spool for a capture's whole file, before it is cut.
    pub fn whole_path(&self, capture: &str) -> Result<PathBuf, CloudSharkError> {
        std::fs::create_dir_all(&self.dir).map_err(io_error("create", &self.dir))?;
        Ok(self.dir.join(format!("{capture}.whole.tmp")))
    }

    /// Moves the PCAP file `whole` into the spool as files of at most `split_bytes` (0: one
    /// file), each a PCAP file (the header, then whole records: a record longer than the
    /// limit is a file of its own), to be sent with `upload` (their names numbered when there
    /// are several). Returns the files in order, each with what it is sent with, claimed by
    /// the caller.
    pub fn add(
        &self,
        whole: &Path,
        split_bytes: u64,
        pending: &Pending,
    ) -> Result<Vec<(Claim, Pending)>, CloudSharkError> {
        let capture = &pending.capture;
        let ext = if pending.upload.filename.ends_with(".pcapng") { "pcapng" } else { "pcap" };
        let size = std::fs::metadata(whole).map_err(io_error("read", whole))?.len();
        let mut files = Vec::new();
        if split_bytes == 0 || size <= split_bytes {
            let path = self.dir.join(format!("{capture}.1.{ext}"));
            std::fs::rename(whole, &path).map_err(io_error("rename", whole))?;
            files.push(path);
        } else {
            files = split(whole, split_bytes, |n| self.dir.join(format!("{capture}.{n}.pcap")))?;
            std::fs::remove_file(whole).map_err(io_error("remove", whole))?;
        }
        let count = files.len();
        let mut claimed = Vec::with_capacity(count);
        for (i, path) in files.into_iter().enumerate() {
            let mut p = pending.clone();
            if count > 1 {
                let stem = p.upload.filename.trim_end_matches(".pcap").to_owned();
                p.upload.filename = format!("{stem}-{}of{count}.{ext}", i + 1);
            }
            // Claimed before it is described: the timer never takes a file being added.
            let claim = self.claim(&path).ok_or_else(|| CloudSharkError::Io {
                operation: "claim",
                path: path.clone(),
                source: std::io::Error::other("the file is being sent already"),
            })?;
            write_pending(&path, &p)?;
            metrics::gauge!(crate::metrics::CLOUDSHARK_SPOOLED).increment(1.0);
            claimed.push((claim, p));
        }
        Ok(claimed)
    }

    /// The files waiting and not being sent, by capture (in file order within one), with
    /// what they are sent with, claimed by the caller; unreadable descriptions are logged and
    /// left.
    pub fn pending(&self) -> Vec<(Claim, Pending)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut found: Vec<(std::time::SystemTime, PathBuf, usize, Pending)> = Vec::new();
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().is_none_or(|e| e != "pcap" && e != "pcapng") {
                continue;
            }
            let described = std::fs::read(path.with_extension("json"))
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Pending>(&b).map_err(|e| e.to_string()));
            match described {
                Ok(p) => {
                    let n = path
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .and_then(|s| s.rsplit('.').next())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    let time =
                        std::fs::metadata(&path).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                    found.push((time, path, n, p));
                }
                Err(e) => {
                    log::warn!("{}: no readable description beside it ({e}); left there", path.display())
                }
            }
        }
        // Every file waiting, those being sent included (the count survives a restart).
        metrics::gauge!(crate::metrics::CLOUDSHARK_SPOOLED).set(found.len() as f64);
        found.sort_by(|a, b| a.0.cmp(&b.0).then((&a.3.capture, a.2).cmp(&(&b.3.capture, b.2))));
        found.into_iter().filter_map(|(_, path, _, p)| Some((self.claim(&path)?, p))).collect()
    }

    /// Sends the spooled file `path` to `cloudshark` (with retries); once CloudShark has taken
    /// it, it leaves the spool. A refusal of the token is recorded beside it.
    pub async fn send(
        &self,
        cloudshark: &CloudShark,
        claim: &Claim,
        pending: &Pending,
    ) -> Result<CloudSharkFile, CloudSharkError> {
        let path = claim.path();
        let file = tokio::fs::read(path).await.map_err(io_error("read", path))?;
        match cloudshark.upload_with_retries(&pending.upload, Bytes::from(file)).await {
            Ok(done) => {
                std::fs::remove_file(path).map_err(io_error("remove", path))?;
                let _ = std::fs::remove_file(path.with_extension("json"));
                metrics::gauge!(crate::metrics::CLOUDSHARK_SPOOLED).decrement(1.0);
                Ok(done)
            }
            Err(e) => {
                if !e.is_retryable() && !pending.refused {
                    let refused = Pending { refused: true, ..pending.clone() };
                    if let Err(w) = write_pending(path, &refused) {
                        log::warn!("{}", crate::report::chain(&w));
                    }
                }
                Err(e)
            }
        }
    }
}

fn write_pending(path: &Path, pending: &Pending) -> Result<(), CloudSharkError> {
    let json = path.with_extension("json");
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(pending).map_err(|e| CloudSharkError::Io {
        operation: "describe",
        path: json.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&tmp, bytes).map_err(io_error("write", &tmp))?;
    std::fs::rename(&tmp, &json).map_err(io_error("rename", &tmp))
}

/// Cuts the PCAP file `whole` into files named by `name(n)` (1-based) of at most `limit`
/// bytes each, header included, between records.
fn split(whole: &Path, limit: u64, name: impl Fn(usize) -> PathBuf) -> Result<Vec<PathBuf>, CloudSharkError> {
    let not_pcap = |reason: &str| CloudSharkError::NotPcap { path: whole.to_owned(), reason: reason.into() };
    let mut input = BufReader::new(std::fs::File::open(whole).map_err(io_error("open", whole))?);
    let mut header = [0u8; 24];
    input.read_exact(&mut header).map_err(|_| not_pcap("shorter than a PCAP header"))?;
    let little = match header[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => return Err(not_pcap("no PCAP magic number")),
    };
    let mut files: Vec<PathBuf> = Vec::new();
    let mut out: Option<(BufWriter<std::fs::File>, u64)> = None;
    let mut record = Vec::new();
    loop {
        if input.fill_buf().map_err(io_error("read", whole))?.is_empty() {
            break;
        }
        let mut head = [0u8; 16];
        input.read_exact(&mut head).map_err(|_| not_pcap("ends in a partial record header"))?;
        let field = [head[8], head[9], head[10], head[11]];
        let length = if little { u32::from_le_bytes(field) } else { u32::from_be_bytes(field) } as usize;
        record.resize(length, 0);
        input.read_exact(&mut record).map_err(|_| not_pcap("ends in a partial record"))?;
        let size = 16 + length as u64;
        if out.as_ref().is_some_and(|(_, written)| written + size > limit) {
            let (mut w, _) = out.take().expect("checked");
            w.flush().map_err(io_error("write", files.last().expect("open")))?;
        }
        if out.is_none() {
            let path = name(files.len() + 1);
            let mut w = BufWriter::new(std::fs::File::create(&path).map_err(io_error("create", &path))?);
            w.write_all(&header).map_err(io_error("write", &path))?;
            files.push(path);
            out = Some((w, header.len() as u64));
        }
        let (w, written) = out.as_mut().expect("opened");
        let path = files.last().expect("open");
        w.write_all(&head).and_then(|()| w.write_all(&record)).map_err(io_error("write", path))?;
        *written += size;
    }
    if let Some((mut w, _)) = out {
        w.flush().map_err(io_error("write", files.last().expect("open")))?;
    }
    if files.is_empty() {
        // No record: the header alone, as one file.
        let path = name(1);
        std::fs::write(&path, header).map_err(io_error("write", &path))?;
        files.push(path);
    }
    Ok(files)
}

/// Sends a finished capture to `cloudshark`: `write` puts its frames in the file it is given
/// (one PCAP file; it returns the frames written), which goes into the spool, cut at the
/// appliance's `split_bytes`; each file is then sent (with retries) and leaves the spool once
/// CloudShark has taken it. What is not taken stays in the spool, named in the summary with
/// the error. `stopping`: the daemon is stopping, and does not wait for CloudShark: the files
/// are spooled, to be sent when it next starts.
pub fn deliver(
    cloudshark: &CloudShark,
    spool: &Spool,
    pending: Pending,
    stopping: bool,
    write: impl FnOnce(&Path) -> Result<u64, String>,
) -> CloudSharkSummary {
    let mut summary = CloudSharkSummary { destination: cloudshark.url.to_string(), ..Default::default() };
    let whole = match spool.whole_path(&pending.capture) {
        Ok(path) => path,
        Err(e) => {
            summary.error = Some(crate::report::chain(&e));
            return summary;
        }
    };
    match write(&whole) {
        Ok(0) => {
            let _ = std::fs::remove_file(&whole);
            summary.error = Some("the capture holds no frame: nothing was sent".into());
            return summary;
        }
        Ok(_) => {}
        Err(e) => {
            let _ = std::fs::remove_file(&whole);
            summary.error = Some(format!("cannot read the capture back from its store: {e}"));
            return summary;
        }
    }
    let files = match spool.add(&whole, cloudshark.split_bytes, &pending) {
        Ok(files) => files,
        Err(e) => {
            let _ = std::fs::remove_file(&whole);
            summary.error = Some(crate::report::chain(&e));
            return summary;
        }
    };
    if stopping {
        summary.error = Some("the daemon was stopping: sent when it next starts".into());
        summary.spooled = files.iter().map(|(c, _)| c.path().display().to_string()).collect();
        return summary;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            summary.error = Some(format!("cannot start the upload runtime: {e}"));
            summary.spooled = files.iter().map(|(c, _)| c.path().display().to_string()).collect();
            return summary;
        }
    };
    let mut files = files.into_iter();
    for (claim, pending) in files.by_ref() {
        match runtime.block_on(spool.send(cloudshark, &claim, &pending)) {
            Ok(done) => {
                log::info!(
                    "capture {}: {} sent to {} as {}",
                    pending.capture,
                    done.filename,
                    cloudshark.url,
                    done.url
                );
                summary.files.push(done);
            }
            Err(e) => {
                let message = crate::report::chain(&e);
                log::error!(
                    "capture {}: {} not sent to {}: {message}; it waits in the spool {}",
                    pending.capture,
                    pending.upload.filename,
                    cloudshark.url,
                    spool.dir().display()
                );
                summary.spooled.push(claim.path().display().to_string());
                summary.error = Some(message);
                break;
            }
        }
    }
    summary.spooled.extend(files.map(|(c, _)| c.path().display().to_string()));
    summary
}

/// Removes what a capture staged in the local directory `dir` for CloudShark alone: its
/// objects, their indexes and its manifests, and the directories they leave empty.
pub fn remove_staged(dir: &Path, manifest: &super::catalog::Manifest) {
    let keys = manifest
        .objects
        .iter()
        .flat_map(|o| [o.key.clone(), o.index.clone()])
        .chain(super::catalog::manifest_keys("", manifest, crate::sys::unix_now_ns()));
    for key in keys {
        let path = dir.join(&key);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                // Its directories, up to `dir`, once empty (remove_dir refuses the others).
                let mut parent = path.parent();
                while let Some(p) = parent.filter(|p| p.starts_with(dir) && *p != dir) {
                    if std::fs::remove_dir(p).is_err() {
                        break;
                    }
                    parent = p.parent();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove the staged {}: {e}", path.display()),
        }
    }
}

/// The tags a capture is sent with: its request's tags (`key:value`), `customer:<customer>`,
/// `alert:<alert id>` and `node:<node>`.
pub fn capture_tags(
    tags: &std::collections::BTreeMap<String, String>,
    customer: Option<&str>,
    alert_id: Option<&str>,
    node: &str,
) -> Vec<String> {
    let mut out: Vec<String> = tags.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    out.extend(customer.map(|c| format!("customer:{c}")));
    out.extend(alert_id.map(|a| format!("alert:{a}")));
    out.push(format!("node:{node}"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_why_not() {
        let url: CloudSharkUrl = "cloudshark://cs.example.net".parse().unwrap();
        assert_eq!(url, CloudSharkUrl { tls: true, host: "cs.example.net".into(), port: 443 });
        assert_eq!(url.to_string(), "cloudshark://cs.example.net");
        assert_eq!(url.view_url("a1b2"), "https://cs.example.net/captures/a1b2");
        let url: CloudSharkUrl = "cloudshark+http://127.0.0.1:8080/".parse().unwrap();
        assert_eq!(url, CloudSharkUrl { tls: false, host: "127.0.0.1".into(), port: 8080 });
        assert_eq!(url.view_url("x"), "http://127.0.0.1:8080/captures/x");
        let url: CloudSharkUrl = "cloudshark://[::1]:8443".parse().unwrap();
        assert_eq!((url.host.as_str(), url.port, url.authority()), ("::1", 8443, "[::1]:8443".into()));
        for (bad, why) in [
            ("https://cs.example.net", "use cloudshark://"),
            ("cloudshark://", "no host"),
            ("cloudshark://cs:0", "port"),
            ("cloudshark://cs:http", "port"),
            ("cloudshark://cs/api", "no path"),
            ("cloudshark://user@cs", "no path, query or user"),
            ("cloudshark://c s", "no host"),
        ] {
            let e = bad.parse::<CloudSharkUrl>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn section(dir: &Path, token: &str, mode: u32) -> CloudSharkSection {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join("token");
        std::fs::write(&path, token).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        CloudSharkSection {
            url: "cloudshark://cs.example.net".into(),
            token_file: Some(path),
            ..CloudSharkSection::default()
        }
    }

    #[test]
    fn the_token_is_read_from_a_private_file_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let good = section(dir.path(), "0123abcdef\n", 0o640);
        good.validate().unwrap();
        let cs = CloudShark::new("cs", &good).unwrap();
        assert!(!format!("{cs:?}").contains("0123abcdef"), "{cs:?}");
        let (field, message) = section(dir.path(), "0123abcdef", 0o644).validate().unwrap_err();
        assert_eq!(field, "token_file");
        assert!(message.contains("may be read by others (mode 644)"), "{message}");
        let (_, message) = section(dir.path(), " \n", 0o600).validate().unwrap_err();
        assert!(message.contains("is empty"), "{message}");
        let (_, message) = section(dir.path(), "se/cret", 0o600).validate().unwrap_err();
        assert!(message.contains("holds characters") && !message.contains("se/cret"), "{message}");
        let missing = CloudSharkSection { token_file: Some(dir.path().join("nope")), ..good.clone() };
        let (field, message) = missing.validate().unwrap_err();
        assert!(field == "token_file" && message.contains("cannot be read"), "{message}");
        let none = CloudSharkSection { token_file: None, ..good.clone() };
        assert_eq!(none.validate().unwrap_err().0, "token_file");
        let unset = CloudSharkSection {
            token_file: None,
            token_env: Some("TAPSTREAM_TEST_UNSET_TOKEN".into()),
            ..good.clone()
        };
        let (field, message) = unset.validate().unwrap_err();
        assert_eq!(field, "token_env");
        assert!(
            message.contains("TAPSTREAM_TEST_UNSET_TOKEN") && message.contains("is not set"),
            "{message}"
        );
        let bad_url = CloudSharkSection { url: "s3://b".into(), ..good.clone() };
        assert_eq!(bad_url.validate().unwrap_err().0, "url");
        let small = CloudSharkSection { split_bytes: 100, ..good.clone() };
        assert_eq!(small.validate().unwrap_err().0, "split_bytes");
        let cut = CloudSharkSection { format: "pcapng".into(), split_bytes: 1 << 20, ..good.clone() };
        assert!(cut.validate().unwrap_err().1.contains("pcapng files are not cut"));
        let other = CloudSharkSection { format: "erf".into(), ..good };
        assert_eq!(other.validate().unwrap_err().0, "format");
    }

    #[test]
    fn the_form_is_multipart_with_the_documented_fields() {
        let body = multipart_body(
            "XyZ",
            &[("filename", "c.pcap"), ("additional_tags", "a:b,node:n")],
            "c.pcap",
            b"\xd4\xc3\r\n--",
        );
        let text = String::from_utf8_lossy(&body);
        let expected = "--XyZ\r\nContent-Disposition: form-data; name=\"filename\"\r\n\r\nc.pcap\r\n\
                        --XyZ\r\nContent-Disposition: form-data; name=\"additional_tags\"\r\n\r\na:b,node:n\r\n\
                        --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.pcap\"\r\n\
                        Content-Type: application/vnd.tcpdump.pcap\r\n\r\n";
        assert!(text.starts_with(expected), "{text:?}");
        assert!(body.ends_with(b"\xd4\xc3\r\n--\r\n--XyZ--\r\n"));
        assert_eq!(clean("a,b\nc"), "a_b_c");
        let tags =
            capture_tags(&[("case".to_owned(), "42".to_owned())].into(), Some("acme"), Some("7"), "tap1");
        assert_eq!(tags, ["case:42", "customer:acme", "alert:7", "node:tap1"]);
    }

    #[test]
    fn a_capture_is_cut_between_records() {
        let dir = tempfile::tempdir().unwrap();
        let header = tapstream_pcap::FileHeader { snaplen: 65535, linktype: 1, nanos: true }.encode();
        let mut whole = header.to_vec();
        let mut records = Vec::new();
        for i in 0..10u8 {
            let data = vec![i; 100 + usize::from(i)];
            let mut r = Vec::new();
            r.extend_from_slice(&u32::from(i).to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&(data.len() as u32).to_le_bytes());
            r.extend_from_slice(&(data.len() as u32).to_le_bytes());
            r.extend_from_slice(&data);
            records.push(r);
        }
        whole.extend(records.concat());
        let path = dir.path().join("whole");
        std::fs::write(&path, &whole).unwrap();
        let files = split(&path, 400, |n| dir.path().join(format!("{n}.pcap"))).unwrap();
        assert!(files.len() > 3, "{files:?}");
        let mut joined = Vec::new();
        for f in &files {
            let bytes = std::fs::read(f).unwrap();
            assert!(bytes.len() <= 400, "{} is {} bytes", f.display(), bytes.len());
            assert_eq!(&bytes[..24], &header[..]);
            joined.extend_from_slice(&bytes[24..]);
        }
        assert_eq!(joined, records.concat(), "the records, in order, each once");
        std::fs::write(&path, &whole[..30]).unwrap();
        assert!(
            split(&path, 400, |n| dir.path().join(format!("t{n}")))
                .unwrap_err()
                .to_string()
                .contains("partial")
        );
    }
}
