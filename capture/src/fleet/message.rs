//! A fleet request: which hosts, until when, and the capture itself.
//!
//! ```json
//! {"id": "alert-4711",
//!  "not_after": "2026-05-01T12:00:00Z",
//!  "target": {"node": "any", "node_regex": "tap-fra1-.*", "labels": {"site": "fra1"}},
//!  "capture": {"filter": "host 10.1.2.3", "packets": 10000, "duration_secs": 60}}
//! ```
//!
//! `capture` is a [`CaptureRequest`] exactly as `POST /v1/captures` takes it; its capture id
//! is the request's `id`, which therefore follows the capture-id rule. Unknown fields are
//! refused everywhere.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::request::CaptureRequest;

/// Longest `node_regex`, in bytes.
pub const MAX_REGEX_BYTES: usize = 1024;
/// Most memory a compiled `node_regex` may take.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// How long a request made by [`FleetRequest::new`] stays valid.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(60);

/// A capture request for the hosts of a fleet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetRequest {
    /// The request's id, also the id of the capture it starts on each host (1 to 64 letters,
    /// digits, `.`, `_`, `-`, not starting with `.`): a request seen twice starts one capture.
    pub id: String,
    /// After this time the request is refused as expired: RFC 3339 (`2026-05-01T12:00:00Z`,
    /// or with an offset) or seconds since the Unix epoch.
    pub not_after: NotAfter,
    /// Which hosts it is for; default: every host.
    #[serde(default)]
    pub target: Target,
    /// The capture, as the control API takes it.
    pub capture: CaptureRequest,
    /// Fields of the message it was made from that are not applied (a pcapdaemon message's
    /// `endpoint`...): named in the `accepted` event. Not part of the JSON.
    #[serde(skip)]
    pub ignored: Vec<String>,
}

/// Which hosts a request is for: those that match every condition given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Target {
    /// A host's name exactly, or `any`; default: `any`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// A regular expression the whole name must match (anchored at both ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_regex: Option<String>,
    /// Labels the host must all have, with these values (`[daemon] labels`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A point in time, read from RFC 3339 or Unix seconds, written as RFC 3339 (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NotAfter(pub SystemTime);

/// Why a message is not a request this host can consider.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("malformed request: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the message has no request (field {field:?} missing or not text)")]
    NoBody { field: &'static str },
    #[error("target.node_regex: {message}")]
    Regex { message: String },
    /// A pcapdaemon message that cannot be made a request.
    #[error("pcapdaemon message: {message}")]
    Pcapdaemon { message: String },
}

impl FleetRequest {
    /// A request for `capture` on `target`, with a fresh id (unless the capture names one)
    /// valid for [`DEFAULT_VALIDITY`]: what a publisher makes.
    pub fn new(mut capture: CaptureRequest, target: Target) -> Self {
        let id = capture.id.take().unwrap_or_else(|| {
            let random = crate::sys::random_bytes::<6>();
            format!("fleet-{}", random.iter().map(|b| format!("{b:02x}")).collect::<String>())
        });
        Self {
            id,
            not_after: NotAfter(SystemTime::now() + DEFAULT_VALIDITY),
            target,
            capture,
            ignored: Vec::new(),
        }
    }

    /// Parses a message (JSON).
    pub fn parse(json: &[u8]) -> Result<Self, MessageError> {
        Ok(serde_json::from_slice(json)?)
    }

    /// Whether it has expired at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        now > self.not_after.0
    }
}

impl Target {
    /// Whether a host named `node` with `labels` is targeted.
    pub fn matches(&self, node: &str, labels: &BTreeMap<String, String>) -> Result<bool, MessageError> {
        if let Some(name) = self.node.as_deref()
            && name != "any"
            && name != node
        {
            return Ok(false);
        }
        if let Some(regex) = self.node_regex()?
            && !regex.is_match(node)
        {
            return Ok(false);
        }
        Ok(self.labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    /// `node_regex` compiled, anchored to the whole name, within the size limits; refused
    /// with the reason if it is too long or not a regular expression.
    pub fn node_regex(&self) -> Result<Option<regex::Regex>, MessageError> {
        let Some(pattern) = &self.node_regex else { return Ok(None) };
        if pattern.len() > MAX_REGEX_BYTES {
            return Err(MessageError::Regex {
                message: format!("{} bytes, more than {MAX_REGEX_BYTES}", pattern.len()),
            });
        }
        regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map(Some)
            .map_err(|e| MessageError::Regex { message: e.to_string() })
    }
}

impl Serialize for NotAfter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_seconds(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for NotAfter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(f64),
            Text(String),
        }
        let time = match Raw::deserialize(d)? {
            Raw::Seconds(s) if (0.0..1e12).contains(&s) => UNIX_EPOCH + Duration::from_secs_f64(s),
            Raw::Seconds(s) => return Err(serde::de::Error::custom(format!("not_after: {s} is not a time"))),
            Raw::Text(t) => parse_rfc3339(&t).map_err(serde::de::Error::custom)?,
        };
        Ok(Self(time))
    }
}

/// RFC 3339 with `Z` or a `+hh:mm`/`-hh:mm` offset.
fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    let bad = || format!("not_after: {text:?} is not an RFC 3339 time or a number of Unix seconds");
    let t = text.trim();
    if t.ends_with(['Z', 'z']) {
        return humantime::parse_rfc3339_weak(&t[..t.len() - 1]).map_err(|_| bad());
    }
    // The last 6 bytes are the offset.
    let split = t.len().checked_sub(6).filter(|&i| t.is_char_boundary(i)).ok_or_else(bad)?;
    let (local, offset) = t.split_at(split);
    let sign = match offset.as_bytes()[0] {
        b'+' => 1i64,
        b'-' => -1,
        _ => return Err(bad()),
    };
    let (h, m) = offset[1..].split_once(':').ok_or_else(bad)?;
    let (h, m): (i64, i64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    let local = humantime::parse_rfc3339_weak(local).map_err(|_| bad())?;
    let shift = Duration::from_secs((h * 3600 + m * 60) as u64);
    // Local time minus the offset is UTC.
    Ok(if sign > 0 { local - shift } else { local + shift })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_request_parses_with_either_time_and_refuses_unknown_fields() {
        let json = br#"{"id": "a-1", "not_after": "2030-01-01T00:00:00Z",
            "target": {"node_regex": "tap-.*"}, "capture": {"filter": "tcp", "packets": 5}}"#;
        let r = FleetRequest::parse(json).unwrap();
        assert_eq!(r.not_after.0, UNIX_EPOCH + Duration::from_secs(1_893_456_000));
        assert_eq!(r.capture.packets, Some(5));
        let r = FleetRequest::parse(br#"{"id": "a", "not_after": 1893456000, "capture": {}}"#).unwrap();
        assert_eq!(r.not_after.0, UNIX_EPOCH + Duration::from_secs(1_893_456_000));
        let r =
            FleetRequest::parse(br#"{"id": "a", "not_after": "2030-01-01T02:00:00+02:00", "capture": {}}"#)
                .unwrap();
        assert_eq!(r.not_after.0, UNIX_EPOCH + Duration::from_secs(1_893_456_000));
        for bad in [
            &br#"{"id": "a", "not_after": 1, "capture": {}, "extra": 1}"#[..],
            br#"{"id": "a", "not_after": 1, "capture": {"filtre": "tcp"}}"#,
            br#"{"id": "a", "not_after": 1, "target": {"host": "x"}, "capture": {}}"#,
            br#"{"id": "a", "not_after": "tomorrow", "capture": {}}"#,
            br#"{"id": "a", "capture": {}}"#,
            b"not json",
        ] {
            let err = FleetRequest::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("malformed request"), "{err}");
        }
    }

    #[test]
    fn a_made_request_expires_after_a_minute_and_round_trips() {
        let r =
            FleetRequest::new(CaptureRequest { packets: Some(1), ..Default::default() }, Target::default());
        assert!(r.id.starts_with("fleet-"));
        assert!(!r.expired(SystemTime::now()));
        assert!(r.expired(SystemTime::now() + Duration::from_secs(61)));
        let back = FleetRequest::parse(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back.id, r.id);
        assert_eq!(back.capture, r.capture);
    }

    #[test]
    fn targets_match_by_name_anchored_regex_and_all_labels() {
        let here = labels(&[("site", "fra1"), ("role", "edge")]);
        let t = |node: Option<&str>, re: Option<&str>, l: &[(&str, &str)]| Target {
            node: node.map(Into::into),
            node_regex: re.map(Into::into),
            labels: labels(l),
        };
        assert!(t(None, None, &[]).matches("tap1", &here).unwrap());
        assert!(t(Some("any"), None, &[]).matches("tap1", &here).unwrap());
        assert!(t(Some("tap1"), None, &[]).matches("tap1", &here).unwrap());
        assert!(!t(Some("tap2"), None, &[]).matches("tap1", &here).unwrap());
        assert!(t(None, Some("tap[12]"), &[]).matches("tap1", &here).unwrap());
        assert!(!t(None, Some("tap"), &[]).matches("tap1", &here).unwrap(), "anchored at the end");
        assert!(!t(None, Some("ap1"), &[]).matches("tap1", &here).unwrap(), "anchored at the start");
        assert!(!t(None, Some("a|tap1x"), &[]).matches("tap1", &here).unwrap(), "alternation stays anchored");
        assert!(t(None, None, &[("site", "fra1")]).matches("tap1", &here).unwrap());
        assert!(!t(None, None, &[("site", "fra1"), ("role", "core")]).matches("tap1", &here).unwrap());
        assert!(!t(None, None, &[("rack", "1")]).matches("tap1", &here).unwrap());
        let err = t(None, Some("("), &[]).matches("tap1", &here).unwrap_err().to_string();
        assert!(err.starts_with("target.node_regex"), "{err}");
        let huge = t(None, Some(r"\w{1000}\w{1000}"), &[]).matches("tap1", &here).unwrap_err().to_string();
        assert!(huge.contains("size limit") || huge.contains("exceed"), "{huge}");
    }
}
