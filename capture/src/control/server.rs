//! The control API's HTTP server: a Unix socket (its permissions decide who may ask) and
//! optionally a TCP listener that requires a bearer token.

use std::{
    convert::Infallible, io::Read as _, os::unix::fs::PermissionsExt as _, path::Path, sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use super::{ApiError, CaptureRequest, ErrorReply};
use crate::daemon::Daemon;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Longest a `wait` may block.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// How long a `wait` that names no `timeout_secs` blocks.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

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
    /// A local user (uid from the socket's peer credentials).
    Unix { uid: Option<u32> },
    /// A TCP client: it must present the token.
    Tcp { token: Arc<String> },
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
        Some(name) => Some(group_id(name).ok_or_else(|| ServerError::NoGroup { group: name.to_owned() })?),
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

fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid C string; getgrnam returns null or a pointer to static storage
    // that is read at once, before any other call could overwrite it.
    let group = unsafe { libc::getgrnam(c.as_ptr()) };
    // SAFETY: non-null pointers from getgrnam point at a valid `struct group`.
    (!group.is_null()).then(|| unsafe { (*group).gr_gid })
}

/// Serves the API until `shutdown` turns true.
pub async fn serve(
    daemon: Arc<Daemon>,
    unix: tokio::net::UnixListener,
    tcp: Option<(tokio::net::TcpListener, String)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let token = tcp.as_ref().map(|(_, t)| Arc::new(t.clone()));
    let (tcp_listener, token) = match (tcp, token) {
        (Some((l, _)), Some(t)) => (Some(l), Some(t)),
        _ => (None, None),
    };
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = unix.accept() => match accepted {
                Ok((stream, _)) => {
                    let uid = stream.peer_cred().ok().map(|c| c.uid());
                    spawn_connection(daemon.clone(), stream, Peer::Unix { uid });
                }
                Err(e) => log::warn!("control socket: {e}"),
            },
            accepted = async { tcp_listener.as_ref().expect("checked").accept().await }, if tcp_listener.is_some() => {
                match accepted {
                    Ok((stream, _)) => {
                        let token = token.clone().expect("set with the listener");
                        spawn_connection(daemon.clone(), stream, Peer::Tcp { token });
                    }
                    Err(e) => log::warn!("control TCP listener: {e}"),
                }
            }
        }
    }
}

fn spawn_connection<S>(daemon: Arc<Daemon>, stream: S, peer: Peer)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = service_fn(move |request| handle(daemon.clone(), request, peer.clone()));
        if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
            log::debug!("control connection: {e}");
        }
    });
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
            let body = serde_json::to_vec(&ErrorReply { error: e.message }).unwrap_or_default();
            response(status, body)
        }
    };
    Ok(reply)
}

fn response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

/// Whether `presented` equals `token`, in time that does not depend on where they differ.
fn token_matches(presented: &[u8], token: &[u8]) -> bool {
    presented.len() == token.len() && presented.iter().zip(token).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn route(
    daemon: Arc<Daemon>,
    request: Request<Incoming>,
    peer: &Peer,
) -> Result<(StatusCode, Vec<u8>), ApiError> {
    let requested_by = match peer {
        Peer::Unix { uid } => *uid,
        Peer::Tcp { token } => {
            let presented = request
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer_token)
                .unwrap_or("");
            if !token_matches(presented.as_bytes(), token.as_bytes()) {
                return Err(ApiError { status: 401, message: "a valid bearer token is required".into() });
            }
            None
        }
    };
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let body = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            ApiError::bad_request(format!("cannot read the request body (at most {MAX_BODY} bytes): {e}"))
        })?
        .to_bytes();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::POST, ["v1", "captures"]) => {
            let request: CaptureRequest = serde_json::from_slice(&body)
                .map_err(|e| ApiError::bad_request(format!("malformed capture request: {e}")))?;
            let info = blocking(move || daemon.start_capture(request, requested_by)).await?;
            Ok((StatusCode::CREATED, json(&info)))
        }
        (&Method::GET, ["v1", "captures"]) => Ok((StatusCode::OK, json(&daemon.list()))),
        (&Method::GET, ["v1", "captures", id]) => Ok((StatusCode::OK, json(&daemon.get(id)?))),
        (&Method::POST, ["v1", "captures", id, "stop"]) => {
            Ok((StatusCode::OK, json(&daemon.stop_capture(id)?)))
        }
        (&Method::GET, ["v1", "captures", id, "wait"]) => {
            let timeout = wait_timeout(&query)?;
            let id = (*id).to_owned();
            let info = blocking(move || daemon.wait(&id, timeout)).await?;
            Ok((StatusCode::OK, json(&info)))
        }
        _ => Err(ApiError::not_found(format!("no route {method} {path}"))),
    }
}

/// The token of an `Authorization` header of the Bearer scheme: the scheme's name in any case
/// (RFC 7235), one or more spaces, the token.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, rest) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim_start_matches(' ').trim_end())
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
            ApiError::bad_request(format!(
                "timeout_secs must be a number of seconds in 0..={}, not {shown:?}",
                MAX_WAIT.as_secs()
            ))
        })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(e.to_string()))?
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
    fn tokens_compare_whole() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secreT", b"secret"));
        assert!(!token_matches(b"secret1", b"secret"));
        assert!(!token_matches(b"", b"secret"));
    }
}
