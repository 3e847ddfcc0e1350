//! The control API's HTTP server: a Unix socket (its permissions decide who may ask) and
//! optionally a TCP listener that requires a bearer token.
//!
//! What one client may hold is bounded, so that neither a flood of connections nor slow
//! clients take the API from the others:
//!
//! - Each listener serves at most [`MAX_UNIX_CONNECTIONS`] or [`MAX_TCP_CONNECTIONS`]
//!   connections at once, each its own bound (a flood of the TCP port leaves the Unix socket
//!   answering). A connection over the bound is accepted and closed at once, not left waiting:
//!   the kernel's backlog stays drained, and a client that is refused knows it at once and may
//!   retry. A TCP connection that would leave fewer than [`TCP_FD_RESERVE`] file descriptors
//!   free is refused the same way, so that the Unix socket, the captures and the store keep
//!   theirs whatever the limit on open files.
//! - Request headers must arrive within [`HEADER_TIMEOUT`] (which is also how long an idle
//!   keep-alive connection stays open), and a request's body within [`BODY_TIMEOUT`].
//! - An accept that fails (out of file descriptors: EMFILE, ENFILE) is retried after a pause
//!   that doubles up to [`ACCEPT_BACKOFF_MAX`], not at once in a loop; warnings about
//!   refused connections and failed accepts are logged at most once per [`WARN_INTERVAL`] per
//!   listener, with the number held back.
//! - When the daemon stops, each connection finishes the request it is serving within
//!   [`SHUTDOWN_GRACE`], or is dropped.

use std::{
    convert::Infallible,
    io::Read as _,
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::fs::PermissionsExt as _,
    },
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Body as _, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};

use super::{CaptureRequest, ErrorReply};
use crate::{
    captures::SessionError,
    control::{
        audit::Action,
        daemon::{Daemon, RequestError},
    },
    datapath::pipeline::PipelineError,
    filter::FilterError,
    request::{
        PlanError,
        access::{AccessDenied, Group, Subject, constant_time_eq},
    },
    store::UploadError,
    sys::Shutdown,
};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Longest a `wait` may block.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// How long a `wait` that names no `timeout_secs` blocks.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// Connections the Unix socket serves at once; more are closed at once. Local users are few;
/// this bounds what one of them may hold.
pub const MAX_UNIX_CONNECTIONS: usize = 128;
/// Connections the TCP listener serves at once; more are closed at once.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// File descriptors a new TCP connection must leave free (below the soft `RLIMIT_NOFILE`), or
/// it is closed at once.
pub const TCP_FD_RESERVE: u64 = 64;
/// Longest a client may take to send a request's headers; also how long an idle keep-alive
/// connection stays open. The connection is closed when it passes.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a request's body may take to arrive, in all (it is at most 64 KiB); past it, the
/// reply is 408 and the connection is closed.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// When the daemon stops: how long a connection may take to finish the request it is serving
/// before it is dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// First pause after a failed accept; it doubles with each failure in a row.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest pause after failed accepts.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning per listener and kind (refused connections, failed accepts) this often.
pub const WARN_INTERVAL: Duration = Duration::from_secs(5);

/// Errors setting up the listeners.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {path}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("another daemon is listening on {path}")]
    InUse { path: String },
    #[error("no group named {group:?} (daemon.socket_group)")]
    NoGroup { group: String },
    #[error("cannot set the owner or mode of {path}")]
    Permissions {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the bearer token from {path}")]
    Token {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the bearer token file {path} is empty")]
    EmptyToken { path: String },
    #[error(
        "the bearer token file {path} has mode {mode:04o}: other users may read it; \
         allow its owner only (chmod 600 {path}), or its group too (chmod 640 {path})"
    )]
    TokenReadableByOthers { path: String, mode: u32 },
}

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
enum Peer {
    /// A local user (from the socket's peer credentials).
    Unix { subject: Subject },
    /// A TCP client: it must present a token, `daemon.token_file`'s (if any) or an access
    /// rule's.
    Tcp { token: Option<Arc<String>> },
}

/// The local user on the other end of `stream`: its uid and gid, and its groups (the
/// primary, then the supplementary ones), not named yet ([`named_groups`]).
fn local_subject(stream: &tokio::net::UnixStream) -> Subject {
    let cred = stream.peer_cred().ok();
    let gid = cred.map(|c| c.gid());
    let supplementary = crate::sys::peer_groups(stream.as_fd()).unwrap_or_else(|e| {
        log::warn!("cannot read the groups of a control socket client: {e}");
        Vec::new()
    });
    let mut gids: Vec<u32> = gid.into_iter().collect();
    for g in supplementary {
        if !gids.contains(&g) {
            gids.push(g);
        }
    }
    let groups = gids.into_iter().map(|gid| Group { gid, name: None }).collect();
    Subject::Local { uid: cred.map(|c| c.uid()), gid, groups }
}

/// `subject` with its groups named where the host names them. The lookup may read files or
/// ask a directory service: it runs on a blocking thread, in the connection's own task, so
/// neither the runtime nor the accepting of other connections waits for it.
async fn named_groups(subject: Subject) -> Subject {
    let unnamed = subject.clone();
    tokio::task::spawn_blocking(move || {
        let mut subject = subject;
        if let Subject::Local { groups, .. } = &mut subject {
            for group in groups {
                group.name = crate::sys::group_name(group.gid).ok().flatten();
            }
        }
        subject
    })
    .await
    .unwrap_or(unnamed)
}

/// Binds the control socket: a stale socket file is replaced; one a live daemon answers on
/// is not. The socket gets `mode` and, if given, `group`.
pub fn bind_unix(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> Result<tokio::net::UnixListener, ServerError> {
    let shown = path.display().to_string();
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse { path: shown });
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|source| ServerError::Bind { path: shown.clone(), source })?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|source| ServerError::Bind { path: shown.clone(), source })?;
    let gid = match group {
        Some(name) => Some(
            crate::sys::group_id(name)
                .ok()
                .flatten()
                .ok_or_else(|| ServerError::NoGroup { group: name.to_owned() })?,
        ),
        None => None,
    };
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|source| ServerError::Permissions { path: shown.clone(), source })?;
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|source| ServerError::Permissions { path: shown, source })?;
    Ok(listener)
}

/// Reads the bearer token for the TCP listener. A file other users may read is refused: its
/// owner, and its group if the operator chose so, are the only ones who may know the token.
pub fn read_token(path: &Path) -> Result<String, ServerError> {
    let shown = path.display().to_string();
    let token_error = |source| ServerError::Token { path: shown.clone(), source };
    let mut file = std::fs::File::open(path).map_err(token_error)?;
    // The mode of the file opened (not of the path, which could change in between).
    let mode = file.metadata().map_err(token_error)?.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(ServerError::TokenReadableByOthers { path: shown, mode });
    }
    let mut token = String::new();
    file.read_to_string(&mut token).map_err(token_error)?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(ServerError::EmptyToken { path: shown });
    }
    Ok(token)
}

/// A listener of the control API.
enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp { listener: tokio::net::TcpListener, token: Option<Arc<String>> },
}

/// A connection's stream, whichever the listener.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Listener {
    /// Its name in the log.
    fn name(&self) -> &'static str {
        match self {
            Self::Unix(_) => "control socket",
            Self::Tcp { .. } => "control TCP listener",
        }
    }

    /// Connections it serves at once.
    fn bound(&self) -> usize {
        match self {
            Self::Unix(_) => MAX_UNIX_CONNECTIONS,
            Self::Tcp { .. } => MAX_TCP_CONNECTIONS,
        }
    }

    /// File descriptors a new connection must leave free.
    fn fd_reserve(&self) -> u64 {
        match self {
            Self::Unix(_) => 0,
            Self::Tcp { .. } => TCP_FD_RESERVE,
        }
    }

    /// The next connection, who is on the other end, and its file descriptor.
    async fn accept(&self) -> std::io::Result<(Box<dyn Io>, Peer, i32)> {
        match self {
            Self::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                let subject = local_subject(&stream);
                let fd = stream.as_raw_fd();
                Ok((Box::new(stream), Peer::Unix { subject }, fd))
            }
            Self::Tcp { listener, token } => {
                let (stream, _) = listener.accept().await?;
                let fd = stream.as_raw_fd();
                Ok((Box::new(stream), Peer::Tcp { token: token.clone() }, fd))
            }
        }
    }
}

/// Serves the API until `shutdown` is triggered; then gives the connections
/// [`SHUTDOWN_GRACE`] to finish the requests they are serving, and returns.
pub async fn serve(
    daemon: Arc<Daemon>,
    unix: tokio::net::UnixListener,
    tcp: Option<(tokio::net::TcpListener, Option<String>)>,
    shutdown: Shutdown,
) {
    let mut listeners = vec![Listener::Unix(unix)];
    if let Some((listener, token)) = tcp {
        listeners.push(Listener::Tcp { listener, token: token.map(Arc::new) });
    }
    // One task per listener: a listener pausing after failed accepts does not hold up the other.
    let mut tasks = JoinSet::new();
    for listener in listeners {
        tasks.spawn(run_listener(daemon.clone(), listener, shutdown.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

/// Accepts connections on `listener` and serves each on a task of its own, within the
/// listener's bound, until `shutdown`.
async fn run_listener(daemon: Arc<Daemon>, listener: Listener, shutdown: Shutdown) {
    let name = listener.name();
    let bound = listener.bound();
    let permits = Arc::new(Semaphore::new(bound));
    let mut connections = JoinSet::new();
    let mut backoff = Backoff::default();
    let mut refused = Throttle::new(WARN_INTERVAL);
    let mut failed = Throttle::new(WARN_INTERVAL);
    loop {
        let accepted = tokio::select! {
            () = shutdown.wait() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer, fd)) => {
                backoff.reset();
                let permit = if fds_left_after(fd) < listener.fd_reserve() {
                    Err(format!("fewer than {} file descriptors would be left", listener.fd_reserve()))
                } else {
                    permits
                        .clone()
                        .try_acquire_owned()
                        .map_err(|_| format!("{bound} connections are open, the most it serves at once"))
                };
                match permit {
                    Ok(permit) => {
                        connections.spawn(serve_connection(
                            daemon.clone(),
                            stream,
                            peer,
                            permit,
                            shutdown.clone(),
                        ));
                    }
                    Err(why) => {
                        drop(stream);
                        if let Some(held_back) = refused.ready(Instant::now()) {
                            log::warn!("{name}: refused a connection: {why}{}", held_back_note(held_back));
                        }
                    }
                }
            }
            Err(e) => {
                if let Some(held_back) = failed.ready(Instant::now()) {
                    log::warn!("{name}: cannot accept a connection: {e}{}", held_back_note(held_back));
                }
                // A client that gave up before its connection was accepted is no reason to
                // pause; anything else (EMFILE, ENFILE, ENOMEM) would fail again at once.
                if !is_connection_error(&e) {
                    tokio::time::sleep(backoff.next_pause()).await;
                }
            }
        }
    }
    for (throttle, what) in [(&mut refused, "connections refused"), (&mut failed, "failed accepts")] {
        if throttle.held_back > 0 {
            log::warn!("{name}: {} more {what} since the last warning", throttle.held_back);
        }
    }
    // Each connection finishes its request within SHUTDOWN_GRACE; the margin is for the
    // scheduler. Those still running after it are dropped with the set.
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), drained).await.is_err() {
        log::warn!("{name}: dropping {} connections at shutdown", connections.len());
    }
}

/// Serves one connection (holding one of its listener's `permit`s) until the client closes
/// it, a timeout closes it, or the daemon stops.
async fn serve_connection(
    daemon: Arc<Daemon>,
    stream: Box<dyn Io>,
    peer: Peer,
    permit: OwnedSemaphorePermit,
    shutdown: Shutdown,
) {
    let peer = match peer {
        Peer::Unix { subject } => Peer::Unix { subject: named_groups(subject).await },
        tcp => tcp,
    };
    let service = service_fn(move |request| handle(daemon.clone(), request, peer.clone()));
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.wait() => {
            // An idle connection closes at once; one serving a request answers it first.
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(SHUTDOWN_GRACE, connection.as_mut()).await {
                Ok(result) => result,
                Err(_) => {
                    log::debug!("control connection dropped at shutdown");
                    Ok(())
                }
            }
        }
    };
    if let Err(e) = result {
        log::debug!("control connection: {e}");
    }
    drop(permit);
}

/// Whether an accept error concerns only the connection it would have returned.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock)
}

/// File descriptors the process may still open once `fd` is open: a lower bound, as the
/// kernel gives out the lowest free number, so every one below `fd` is in use. Unbounded if
/// the limit cannot be read.
fn fds_left_after(fd: i32) -> u64 {
    let Some(limit) = crate::sys::open_files_limit() else { return u64::MAX };
    limit.saturating_sub(u64::try_from(fd).unwrap_or(0) + 1)
}

/// The pause after failed accepts: [`ACCEPT_BACKOFF_FIRST`], doubling with each failure in a
/// row up to [`ACCEPT_BACKOFF_MAX`].
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: ACCEPT_BACKOFF_FIRST }
    }
}

impl Backoff {
    fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (pause * 2).min(ACCEPT_BACKOFF_MAX);
        pause
    }

    fn reset(&mut self) {
        self.next = ACCEPT_BACKOFF_FIRST;
    }
}

/// At most one warning per interval; counts those held back.
#[derive(Debug)]
struct Throttle {
    interval: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    fn new(interval: Duration) -> Self {
        Self { interval, last: None, held_back: 0 }
    }

    /// Whether to log a warning at `now`: `Some(n)` if so, `n` being how many were held back
    /// since the last one.
    fn ready(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

fn held_back_note(held_back: u64) -> String {
    if held_back == 0 { String::new() } else { format!(" ({held_back} more since the last warning)") }
}

async fn handle(
    daemon: Arc<Daemon>,
    request: Request<Incoming>,
    peer: Peer,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = match route(daemon, request, &peer).await {
        Ok((status, body)) => response(status, body),
        Err(e) => {
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = serde_json::to_vec(&ErrorReply { error: printable(&e.message) }).unwrap_or_default();
            let mut reply = response(status, body);
            // The body was not read (too large, or too slow): the connection cannot carry
            // another request.
            if matches!(status, StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT) {
                reply
                    .headers_mut()
                    .insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
            }
            reply
        }
    };
    Ok(reply)
}

/// `message` with its control characters escaped (`\n` -> `\\n`, NUL -> `\\0`): an error
/// may quote what the request held (serde names an unknown field), and the CLI prints it to a
/// terminal.
fn printable(message: &str) -> String {
    if !message.chars().any(char::is_control) {
        return message.to_owned();
    }
    message
        .chars()
        .map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() })
        .collect()
}

fn response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

/// A refused or failed request: an HTTP status and a message a user can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status: status.as_u16(), message: message.into() }
    }
}

/// The one place a refusal becomes an HTTP status: 400 for what the request got wrong, 403
/// for what a cap or the allowed destinations forbid, 404, 409, 503 for what is absent or
/// stopping now, 500 for what failed here.
impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let message = e.to_string();
        let status = match &e {
            RequestError::Access(AccessDenied::Unbalanced { .. }) => 400,
            RequestError::Access(_) => 403,
            RequestError::Plan(plan) => match plan {
                PlanError::OverCap(_)
                | PlanError::NoDestinations
                | PlanError::NoLocalDestination
                | PlanError::DestinationNotAllowed { .. } => 403,
                PlanError::Filter(FilterError::Timeout { .. }) => {
                    log::warn!("refused a filter: {message}");
                    403
                }
                PlanError::Filter(FilterError::Cancelled) => 503,
                PlanError::Filter(
                    FilterError::Syntax { .. } | FilterError::Nul | FilterError::TooLong { .. },
                ) => 400,
                PlanError::Filter(_) => 500,
                _ => 400,
            },
            RequestError::Absent(_) | RequestError::Stopping => 503,
            RequestError::IdTaken { .. } => 409,
            RequestError::NoCapture { .. } => 404,
            RequestError::Store(UploadError::Destination { .. }) => 400,
            RequestError::Store(_) => 500,
            RequestError::Start(start) => match start {
                SessionError::Pipeline(PipelineError::Filter(_)) => 400,
                // Room on the interface may come back when captures end.
                SessionError::Pipeline(PipelineError::Crowded { .. } | PipelineError::NoFreeSlot { .. })
                | SessionError::InterfaceAbsent { .. }
                | SessionError::InterfaceRemoved { .. } => 503,
                _ => 500,
            },
        };
        Self { status, message }
    }
}

/// What a route does, for the audit log, and the capture it names.
fn audited_action(method: &Method, segments: &[&str]) -> Option<(Action, Option<String>)> {
    match (method, segments) {
        (&Method::POST, ["v1", "captures"]) => Some((Action::Start, None)),
        (&Method::GET, ["v1", "captures"]) => Some((Action::List, None)),
        (&Method::GET, ["v1", "captures", id]) => Some((Action::Read, Some((*id).to_owned()))),
        (&Method::POST, ["v1", "captures", id, "stop"]) => Some((Action::Stop, Some((*id).to_owned()))),
        (&Method::GET, ["v1", "captures", id, "wait"]) => Some((Action::Wait, Some((*id).to_owned()))),
        _ => None,
    }
}

/// Who a TCP client is, by the token it presents: every token is compared, each in constant
/// time; `daemon.token_file`'s first.
fn token_subject(daemon: &Daemon, operator: Option<&Arc<String>>, presented: &str) -> Subject {
    let operator = operator.is_some_and(|token| constant_time_eq(presented.as_bytes(), token.as_bytes()));
    let rule = daemon.access().token(presented.as_bytes());
    match (operator, rule) {
        (true, _) => Subject::OperatorToken,
        (false, Some(rule)) => Subject::Token { rule },
        (false, None) => Subject::Unauthenticated,
    }
}

async fn route(
    daemon: Arc<Daemon>,
    request: Request<Incoming>,
    peer: &Peer,
) -> Result<(StatusCode, Vec<u8>), ApiError> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let action = audited_action(&method, &segments);
    let subject = match peer {
        Peer::Unix { subject } => subject.clone(),
        Peer::Tcp { token } => {
            let presented = request
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer_token)
                .unwrap_or("");
            let subject = token_subject(&daemon, token.as_ref(), presented);
            if subject == Subject::Unauthenticated {
                const REFUSED: &str = "a valid bearer token is required";
                if let Some((action, id)) = action {
                    let daemon = daemon.clone();
                    blocking(move || {
                        daemon.audit(action, &subject, id.as_deref(), None, Err(REFUSED.into()));
                        Ok(())
                    })
                    .await?;
                }
                return Err(ApiError::new(StatusCode::UNAUTHORIZED, REFUSED));
            }
            subject
        }
    };
    let body = read_body(request.into_body()).await?;
    match (&method, segments.as_slice()) {
        (&Method::POST, ["v1", "captures"]) => {
            let request: CaptureRequest = match serde_json::from_slice(&body) {
                Ok(request) => request,
                Err(e) => {
                    let message = format!("malformed capture request: {e}");
                    let reason = message.clone();
                    blocking(move || {
                        daemon.audit(Action::Start, &subject, None, None, Err(reason));
                        Ok(())
                    })
                    .await?;
                    return Err(ApiError::new(StatusCode::BAD_REQUEST, message));
                }
            };
            let info = blocking(move || Ok(daemon.start_capture(request, &subject)?)).await?;
            Ok((StatusCode::CREATED, json(&info)))
        }
        (&Method::GET, ["v1", "captures"]) => {
            let all = blocking(move || Ok(daemon.list_for(&subject)?)).await?;
            Ok((StatusCode::OK, json(&all)))
        }
        (&Method::GET, ["v1", "interfaces"]) => Ok((StatusCode::OK, json(&daemon.interfaces()))),
        (&Method::GET, ["v1", "captures", id]) => {
            let id = (*id).to_owned();
            let info = blocking(move || Ok(daemon.read(&id, &subject)?)).await?;
            Ok((StatusCode::OK, json(&info)))
        }
        (&Method::POST, ["v1", "captures", id, "stop"]) => {
            let id = (*id).to_owned();
            let info = blocking(move || Ok(daemon.stop_capture(&id, &subject)?)).await?;
            Ok((StatusCode::OK, json(&info)))
        }
        (&Method::GET, ["v1", "captures", id, "wait"]) => {
            let timeout = wait_timeout(&query)?;
            let id = (*id).to_owned();
            let info = blocking(move || Ok(daemon.wait(&id, timeout, &subject)?)).await?;
            Ok((StatusCode::OK, json(&info)))
        }
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no route {method} {path}"))),
    }
}

/// The token of an `Authorization` header of the Bearer scheme: the scheme's name in any case
/// (RFC 7235), one or more spaces, the token.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, rest) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim_start_matches(' ').trim_end())
}

/// Reads a request's body: at most [`MAX_BODY`] bytes, within [`BODY_TIMEOUT`] in all.
async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    let declared = body.size_hint().lower();
    if declared > MAX_BODY as u64 {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is {declared} bytes; at most {MAX_BODY} are accepted"),
        ));
    }
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over {MAX_BODY} bytes, the most accepted"),
        )),
        Ok(Err(e)) => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}")))
        }
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body did not arrive within {} s", BODY_TIMEOUT.as_secs()),
        )),
    }
}

/// The `timeout_secs` of a wait's query: seconds in 0..=300 (a longer wait is shortened to
/// 300 s); 30 s if absent. Not a number, negative, infinite or NaN: refused.
fn wait_timeout(query: &str) -> Result<Duration, ApiError> {
    let Some(value) = query.split('&').find_map(|kv| kv.strip_prefix("timeout_secs=")) else {
        return Ok(DEFAULT_WAIT);
    };
    value
        .parse::<f64>()
        .ok()
        .filter(|secs| secs.is_finite() && *secs >= 0.0)
        // abs: -0 is 0, not a negative duration.
        .and_then(|secs| Duration::try_from_secs_f64(secs.abs().min(MAX_WAIT.as_secs_f64())).ok())
        .ok_or_else(|| {
            let shown: String = value.chars().take(40).collect();
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "timeout_secs must be a number of seconds in 0..={}, not {shown:?}",
                    MAX_WAIT.as_secs()
                ),
            )
        })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// A reply body.
fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_timeouts_are_seconds_in_range() {
        assert_eq!(wait_timeout(""), Ok(DEFAULT_WAIT));
        assert_eq!(wait_timeout("other=1"), Ok(DEFAULT_WAIT));
        assert_eq!(wait_timeout("timeout_secs=0"), Ok(Duration::ZERO));
        assert_eq!(wait_timeout("timeout_secs=-0"), Ok(Duration::ZERO));
        assert_eq!(wait_timeout("timeout_secs=0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(wait_timeout("x=1&timeout_secs=300"), Ok(MAX_WAIT));
        assert_eq!(wait_timeout("timeout_secs=1e9"), Ok(MAX_WAIT), "longer waits are shortened");
        for bad in
            ["NaN", "nan", "inf", "-inf", "infinity", "-1", "-1e-9", "1e400", "-1e400", "", "soon", "1s"]
        {
            let e = wait_timeout(&format!("timeout_secs={bad}")).unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
            assert!(
                e.message.contains("timeout_secs") && e.message.contains("0..=300"),
                "{bad}: {}",
                e.message
            );
        }
        let long = format!("timeout_secs={}", "9".repeat(300));
        assert_eq!(wait_timeout(&long), Ok(MAX_WAIT));
        let junk = format!("timeout_secs={}", "x".repeat(1000));
        assert!(wait_timeout(&junk).unwrap_err().message.len() < 200, "the value is shown cut short");
    }

    #[test]
    fn the_bearer_scheme_is_any_case_with_any_spaces() {
        for header in
            ["Bearer t0k", "bearer t0k", "BEARER t0k", "bEaReR t0k", "Bearer    t0k", "bearer t0k  "]
        {
            assert_eq!(bearer_token(header), Some("t0k"), "{header:?}");
        }
        for header in ["Bearert0k", "Basic t0k", "Bearer", "t0k", "", "Bear t0k", "Bearers t0k"] {
            assert_eq!(bearer_token(header), None, "{header:?}");
        }
        assert_eq!(bearer_token("Bearer "), Some(""), "an empty token, which never matches");
    }

    #[test]
    fn a_token_file_others_may_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        for mode in [0o600, 0o400, 0o640, 0o440] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(read_token(&path).unwrap(), "s3cr3t", "mode {mode:o}");
        }
        for mode in [0o644, 0o604, 0o666, 0o601] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = read_token(&path).unwrap_err();
            assert!(matches!(e, ServerError::TokenReadableByOthers { mode: m, .. } if m == mode), "{e:?}");
            let message = e.to_string();
            assert!(
                message.contains(&path.display().to_string())
                    && message.contains(&format!("{mode:04o}"))
                    && message.contains("chmod 600"),
                "{message}"
            );
        }
    }

    #[test]
    fn failed_accepts_pause_longer_each_time_up_to_a_second() {
        let mut backoff = Backoff::default();
        let pauses: Vec<u64> = (0..6).map(|_| backoff.next_pause().as_millis() as u64).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next_pause(), ACCEPT_BACKOFF_FIRST);
    }

    #[test]
    fn warnings_are_throttled_and_count_those_held_back() {
        let mut throttle = Throttle::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(throttle.ready(t0), Some(0));
        for ms in [1, 100, 4_999] {
            assert_eq!(throttle.ready(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(throttle.ready(t0 + Duration::from_secs(5)), Some(3));
        assert_eq!(throttle.ready(t0 + Duration::from_secs(6)), None);
        assert_eq!(throttle.ready(t0 + Duration::from_secs(11)), Some(1));
    }

    #[test]
    fn error_messages_carry_no_control_characters() {
        assert_eq!(printable("unknown field `\0`"), "unknown field `\\0`");
        assert_eq!(printable("a\r\nb\u{1b}[2J"), "a\\r\\nb\\u{1b}[2J");
        assert_eq!(printable("ü☃ ok"), "ü☃ ok");
    }
}
