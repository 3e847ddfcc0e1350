//! What a node reports about the fleet requests it took: one JSON schema for every event.
//!
//! ```json
//! {"event": "finished", "node": "tap-fra1-01", "request_id": "alert-4711",
//!  "capture_id": "alert-4711", "alert_id": "4711", "customer": "acme", "tags": {},
//!  "time": "2026-05-01T11:59:30.123Z",
//!  "stop_reason": "packets", "packets": 10000, "bytes": 912345, "dropped": 0,
//!  "outputs": ["s3://bucket/captures/tap-fra1-01/alert-4711/...pcap.zst"]}
//! ```
//!
//! Every event has `event`, `node`, `request_id` (absent for a message that had none),
//! `capture_id`, `alert_id`, `customer`, `tags` and `time`. Then, by `event`:
//! - `accepted`: the request is for this node and passed every check;
//! - `refused`: `code` (one of [`RefusalCode`]) and `reason` (the daemon's message);
//! - `started`: `interfaces` (their aliases) and `location` (where its objects go);
//! - `finished`: `stop_reason`, `packets`, `bytes`, `dropped` (every frame lost, all
//!   causes), `outputs` (the objects or files stored), `error` (what ended it early, if
//!   something did) and, for a capture that started in the past, `lookback` (where its
//!   window began, how far back the history reached, frames from history and live) and, for
//!   a capture also sent to CloudShark, `cloudshark` (its files' ids and URLs, or the error
//!   and the files waiting in the spool);
//! - `failed`: `error`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::message::{FleetRequest, MessageError};
use crate::{
    control::{CaptureInfo, CaptureState, daemon::RequestError},
    request::PlanError,
};

/// One event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(flatten)]
    pub what: What,
    /// The node that reports it.
    pub node: String,
    /// The fleet request's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The capture's id (the request's id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// When it happened, RFC 3339 (UTC, milliseconds).
    pub time: String,
    /// In `accepted`: fields of the message that were not applied (see
    /// [`super::pcapdaemon`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored: Vec<String>,
}

/// What happened, with what it carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum What {
    Accepted,
    Refused {
        code: RefusalCode,
        reason: String,
    },
    Started {
        /// The aliases of the interfaces it captures from.
        interfaces: Vec<String>,
        location: String,
    },
    Finished {
        stop_reason: String,
        packets: u64,
        bytes: u64,
        dropped: u64,
        outputs: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lookback: Option<crate::captures::LookbackSummary>,
        /// For a capture also sent to CloudShark: its files' ids and URLs, or the error.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cloudshark: Option<crate::store::cloudshark::CloudSharkSummary>,
    },
    Failed {
        error: String,
    },
}

/// Why a request was refused, for machines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// Past its `not_after`.
    Expired,
    /// Above one of the node's `[limits]` (concurrent captures included).
    OverCap,
    /// The filter does not compile, or the kernel cannot run it.
    BadFilter,
    /// Malformed JSON, an unknown field, a bad id, value or regular expression.
    BadRequest,
    /// A destination the node does not allow.
    NotAllowed,
    /// The node cannot capture now: its interface is absent, its store refuses, the
    /// capture could not start.
    Unavailable,
}

impl RefusalCode {
    /// Every code, for the metrics' labels.
    pub const ALL: [Self; 6] = [
        Self::Expired,
        Self::OverCap,
        Self::BadFilter,
        Self::BadRequest,
        Self::NotAllowed,
        Self::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::OverCap => "over_cap",
            Self::BadFilter => "bad_filter",
            Self::BadRequest => "bad_request",
            Self::NotAllowed => "not_allowed",
            Self::Unavailable => "unavailable",
        }
    }

    /// The code of a refusal by the daemon.
    pub fn of(error: &RequestError) -> Self {
        match error {
            RequestError::Plan(plan) => match plan {
                PlanError::OverCap(_) => Self::OverCap,
                PlanError::Filter(_) | PlanError::FilterCannotRun(_) => Self::BadFilter,
                PlanError::DestinationNotAllowed { .. } | PlanError::NoLocalDestination => Self::NotAllowed,
                PlanError::NoDestinations => Self::Unavailable,
                _ => Self::BadRequest,
            },
            // The access rule of the broker's transport (`[access.brokers]`) forbids it.
            RequestError::Access(_) => Self::NotAllowed,
            RequestError::IdTaken { .. } | RequestError::NoCapture { .. } => Self::BadRequest,
            RequestError::Absent(_)
            | RequestError::Stopping
            | RequestError::Store(_)
            | RequestError::Start(_) => Self::Unavailable,
        }
    }
}

impl MessageError {
    /// Every message error is the request's fault.
    pub fn code(&self) -> RefusalCode {
        RefusalCode::BadRequest
    }
}

impl Event {
    /// An event about `request` on `node`.
    pub fn about(request: &FleetRequest, node: &str, what: What) -> Self {
        let what_is_accepted = what == What::Accepted;
        Self {
            what,
            node: node.to_owned(),
            request_id: Some(request.id.clone()),
            capture_id: Some(request.id.clone()),
            alert_id: request.capture.alert_id.clone(),
            customer: request.capture.customer.clone(),
            tags: request.capture.tags.clone(),
            time: now(),
            ignored: if what_is_accepted { request.ignored.clone() } else { Vec::new() },
        }
    }

    /// A refusal of a message that is not a request; `request_id` if one could be read.
    pub fn malformed(node: &str, request_id: Option<String>, error: &MessageError) -> Self {
        Self {
            what: What::Refused { code: error.code(), reason: error.to_string() },
            node: node.to_owned(),
            capture_id: None,
            request_id,
            alert_id: None,
            customer: None,
            tags: BTreeMap::new(),
            time: now(),
            ignored: Vec::new(),
        }
    }

    /// The end of a capture a fleet request started: `finished` or `failed`.
    pub fn ended(request: &FleetRequest, node: &str, info: &CaptureInfo) -> Self {
        let what = match (&info.state, &info.summary) {
            (CaptureState::Finished, Some(s)) => What::Finished {
                stop_reason: s.stop_reason.as_str().to_owned(),
                packets: s.packets,
                bytes: s.bytes,
                dropped: s.dropped_writer + s.dropped_spool_full + s.dropped_kernel + s.redirect_errors,
                outputs: s.outputs.clone(),
                error: s.error.clone(),
                lookback: s.lookback.clone(),
                cloudshark: s.cloudshark.clone(),
            },
            _ => {
                What::Failed { error: info.error.clone().unwrap_or_else(|| "ended without a summary".into()) }
            }
        };
        Self::about(request, node, what)
    }

    /// The event's name: `accepted`, `refused`, ...
    pub fn kind(&self) -> &'static str {
        match self.what {
            What::Accepted => "accepted",
            What::Refused { .. } => "refused",
            What::Started { .. } => "started",
            What::Finished { .. } => "finished",
            What::Failed { .. } => "failed",
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CapExceeded;

    #[test]
    fn events_are_flat_json_with_their_kind() {
        let request = FleetRequest::parse(
            br#"{"id": "r1", "not_after": 1, "capture": {"alert_id": "a9", "customer": "acme", "tags": {"k": "v"}}}"#,
        )
        .unwrap();
        let event = Event::about(
            &request,
            "tap1",
            What::Refused { code: RefusalCode::Expired, reason: "expired".into() },
        );
        let json: serde_json::Value = serde_json::to_value(&event).unwrap();
        assert_eq!(json["event"], "refused");
        assert_eq!(json["code"], "expired");
        assert_eq!(json["node"], "tap1");
        assert_eq!(json["request_id"], "r1");
        assert_eq!(json["capture_id"], "r1");
        assert_eq!(json["alert_id"], "a9");
        assert_eq!(json["customer"], "acme");
        assert_eq!(json["tags"]["k"], "v");
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.kind(), "refused");
    }

    #[test]
    fn the_finished_event_carries_the_cloudshark_files_and_never_the_token() {
        let request = FleetRequest::parse(br#"{"id": "r2", "not_after": 1, "capture": {}}"#).unwrap();
        let summary: crate::captures::CaptureSummary = serde_json::from_value(serde_json::json!({
            "id": "r2", "interface": "eth1", "stop_reason": "packets", "packets": 5, "bytes": 500,
            "elapsed_secs": 1.0, "outputs": [], "dropped_writer": 0, "dropped_kernel": 0,
            "redirect_errors": 0, "truncated": 0, "queues": [],
            "cloudshark": {"destination": "cloudshark://cs.example.net",
                           "files": [{"id": "c0ffee", "url": "https://cs.example.net/captures/c0ffee",
                                      "filename": "r2.pcap", "bytes": 604}]}
        }))
        .unwrap();
        let info = CaptureInfo {
            id: "r2".into(),
            interfaces: vec!["public".into()],
            devices: vec!["eth1".into()],
            request: crate::request::CaptureRequest::default(),
            location: String::new(),
            started_ns: 0,
            requested_by: None,
            owner: None,
            state: CaptureState::Finished,
            progress: crate::captures::Progress::default(),
            summary: Some(summary),
            error: None,
        };
        let json = serde_json::to_value(Event::ended(&request, "tap1", &info)).unwrap();
        assert_eq!(json["event"], "finished");
        assert_eq!(json["cloudshark"]["files"][0]["url"], "https://cs.example.net/captures/c0ffee");
        assert_eq!(json["cloudshark"]["files"][0]["id"], "c0ffee");
    }

    #[test]
    fn refusals_get_their_code() {
        let over = RequestError::Plan(PlanError::OverCap(CapExceeded {
            what: "packet limit",
            asked: 9,
            cap: "limits.max_packets",
            limit: 1,
        }));
        assert_eq!(RefusalCode::of(&over), RefusalCode::OverCap);
        assert_eq!(RefusalCode::of(&RequestError::Plan(PlanError::ZeroLimit)), RefusalCode::BadRequest);
        let not = PlanError::DestinationNotAllowed { asked: "x".into(), allowed: vec![] };
        assert_eq!(RefusalCode::of(&RequestError::Plan(not)), RefusalCode::NotAllowed);
        assert_eq!(RefusalCode::of(&RequestError::Stopping), RefusalCode::Unavailable);
        assert_eq!(serde_json::to_value(RefusalCode::OverCap).unwrap(), "over_cap");
        for code in RefusalCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }
}
