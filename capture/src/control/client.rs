//! The CLI's side of the control API: one HTTP/1.1 request per connection over the daemon's
//! Unix socket.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::de::DeserializeOwned;

use super::{CaptureInfo, CaptureRequest, ErrorReply, InterfaceInfo};

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {socket}: {hint}")]
    Connect {
        socket: PathBuf,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon")]
    Io(#[from] std::io::Error),
    #[error("the daemon's reply is not understood: {0}")]
    Protocol(String),
    /// The daemon refused or failed the request; `message` is its reason.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
}

/// A connection to the daemon's control socket.
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into() }
    }

    /// Starts a capture.
    pub fn start(&self, request: &CaptureRequest) -> Result<CaptureInfo, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call("POST", "/v1/captures", Some(&body))
    }

    /// Every capture.
    pub fn list(&self) -> Result<Vec<CaptureInfo>, ClientError> {
        self.call("GET", "/v1/captures", None)
    }

    /// The daemon's interfaces, and whether each one's device is there.
    pub fn interfaces(&self) -> Result<Vec<InterfaceInfo>, ClientError> {
        self.call("GET", "/v1/interfaces", None)
    }

    /// One capture.
    pub fn status(&self, id: &str) -> Result<CaptureInfo, ClientError> {
        self.call("GET", &format!("/v1/captures/{id}"), None)
    }

    /// Ends a capture.
    pub fn stop(&self, id: &str) -> Result<CaptureInfo, ClientError> {
        self.call("POST", &format!("/v1/captures/{id}/stop"), None)
    }

    /// Waits up to `timeout` for a capture to end.
    pub fn wait(&self, id: &str, timeout: Duration) -> Result<CaptureInfo, ClientError> {
        self.call("GET", &format!("/v1/captures/{id}/wait?timeout_secs={}", timeout.as_secs_f64()), None)
    }

    /// Sends a raw request; returns the status and the body (for tests of malformed input).
    pub fn raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<(u16, Vec<u8>), ClientError> {
        let mut stream = UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            socket: self.socket.clone(),
            hint: hint(&source),
            source,
        })?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: tapstream\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply)?;
        parse_reply(&reply)
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<T, ClientError> {
        let (status, body) = self.raw(method, path, body)?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<ErrorReply>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Api { status, message });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

fn hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::PermissionDenied => {
            "permission denied: only the socket's owner and group may ask for captures (ask to be added to its group)"
        }
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            "is the daemon running (systemctl status tapstream), and is this its socket (--socket)?"
        }
        _ => "the socket could not be opened",
    }
}

/// Splits an HTTP/1.1 reply into status and body (the server sends a Content-Length and
/// closes the connection).
fn parse_reply(reply: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
    let end = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| ClientError::Protocol("no end of headers".into()))?;
    let head = String::from_utf8_lossy(&reply[..end]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("bad status line in {head:?}")))?;
    Ok((status, reply[end + 4..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse() {
        let (status, body) = parse_reply(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((status, body.as_slice()), (404, b"{}".as_slice()));
        assert!(parse_reply(b"garbage").is_err());
    }
}
