//! The control API: how operators ask the daemon for captures.
//!
//! HTTP and JSON on a Unix socket (whose permissions decide who may ask), optionally also on
//! TCP with a bearer token. Routes:
//!
//! | Method and path                            | Does                                     |
//! |--------------------------------------------|------------------------------------------|
//! | `POST /v1/captures` (a [`CaptureRequest`]) | starts a capture; 201 and its [`CaptureInfo`] |
//! | `GET /v1/captures`                         | every capture the daemon knows           |
//! | `GET /v1/captures/{id}`                    | one capture                              |
//! | `POST /v1/captures/{id}/stop`              | ends a running capture                   |
//! | `GET /v1/captures/{id}/wait?timeout_secs=N`| returns once it has ended, or after N s  |
//! | `GET /v1/interfaces`                       | the configured interfaces ([`InterfaceInfo`]) |
//!
//! A wait's `timeout_secs` is in 0..=300 (longer is shortened to 300; default 30); a wait
//! also returns, with the capture as it then is, when the daemon stops.
//!
//! Who asks is held to an access rule (`[access]`, [`crate::request::access`]): a local user
//! by the socket's credentials, a TCP client by its token. A rule that does not allow a start
//! refuses it, naming the rule; one that does not hold a capture's owner lists it not, and
//! refuses to show, wait for or stop it. Each start, refusal, stop, wait and read is written
//! to the [`audit`] log before the answer.
//!
//! Errors are `{"error": "..."}` with 400 (malformed or invalid request), 401 (TCP without
//! a valid token), 403 (above a server cap, a destination not allowed, or what the client's
//! access rule does not allow), 404 (no such
//! capture), 408 (the body did not arrive in time), 409 (id taken), 413 (body too large),
//! 500, or 503 (the daemon is stopping, or the interface's device is absent). The server's
//! bounds on connections and its timeouts are in [`server`].

pub mod audit;
pub mod client;
pub mod daemon;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::captures::{CaptureSummary, Progress};
pub use crate::request::CaptureRequest;

/// Where a capture is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureState {
    /// Capturing.
    Running,
    /// Ended (see the summary's stop reason).
    Finished,
    /// Ended without a summary (see `error`).
    Failed,
}

/// What the daemon knows of a capture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaptureInfo {
    /// Capture id.
    pub id: String,
    /// Interface aliases: one, or several for a capture over several interfaces.
    pub interfaces: Vec<String>,
    /// Their network devices, in the same order.
    pub devices: Vec<String>,
    /// The request as the daemon completed it (defaults filled in).
    pub request: CaptureRequest,
    /// Where its objects go (URL prefix).
    pub location: String,
    /// Start time, ns since the Unix epoch.
    pub started_ns: u64,
    /// The user id that asked (from the socket's peer credentials), if known.
    pub requested_by: Option<u32>,
    /// The access rule it was started under (`[[access.rules]]`): only the clients of that
    /// rule may stop or see it, unless theirs allows more; `None`: no rule.
    #[serde(default)]
    pub owner: Option<String>,
    /// Running, finished or failed.
    pub state: CaptureState,
    /// Packets, bytes, elapsed time and drops so far.
    pub progress: Progress,
    /// The final report, once finished.
    pub summary: Option<CaptureSummary>,
    /// Why it failed, if it did (then without a summary); or the error that ended it early
    /// (its interface removed), also in its summary.
    pub error: Option<String>,
}

impl CaptureInfo {
    /// `alias (device), ...`.
    pub fn interfaces_shown(&self) -> String {
        self.interfaces
            .iter()
            .zip(&self.devices)
            .map(|(alias, device)| format!("{alias} ({device})"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One of the daemon's interfaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceInfo {
    /// Its alias in the configuration.
    pub alias: String,
    /// Its network device.
    pub device: String,
    /// Whether the device is there.
    pub state: InterfaceState,
}

/// Whether an interface's device is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterfaceState {
    /// Attached (XDP program and sockets): captures can start.
    Attached,
    /// No such device (removed, renamed, or not there yet): captures are refused until a
    /// device of that name appears, which is then attached.
    Absent,
}

/// An error reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}
