//! pcapdaemon's capture message, for fleets moving from pcapdaemon: taken as it is from a
//! Redis pub/sub channel (`[fleet.redis] pcapdaemon_channel`) and made a [`FleetRequest`].
//!
//! ```json
//! {"node": "tap-fra1-01", "interface": ["bond1", "bond2"], "bpf": "dst host 10.0.0.1",
//!  "tags": "blah,tagme,stuff", "customer": "importantcustomer", "snap": 1500, "packets": 50,
//!  "alertid": 655443, "timeout": 15, "duration": 60, "bytes": 1000,
//!  "folder": "myfolder", "bucket": "mybucket"}
//! ```
//!
//! How each field is taken, and where tapstream differs from pcapdaemon:
//! - `node` (a name, or `any`) and `nodere` (a regular expression found anywhere in the name,
//!   unanchored as pcapdaemon has it) target hosts; pcapdaemon takes one of them, tapstream
//!   either (a host named by one is targeted), and none means every host.
//! - `interface` and `alias` (lists, or one name) name interfaces by device or alias;
//!   pcapdaemon takes one of them and starts a capture per interface, tapstream takes both
//!   and starts one capture over all of them, its limits applying to the sum.
//! - `bpf` is the filter, `snap` the snaplen, `packets`, `bytes` and `duration` (seconds)
//!   the limits, `timeout` (seconds without a frame) the idle timeout; 0 leaves one out.
//! - `customer`, `alertid` and `tags` (comma-separated; kept as the tag `tags`) label the
//!   capture, its objects and its events.
//! - `bucket` and `folder` choose the destination `s3://bucket/folder`, which must be one the
//!   daemon allows (else the request is refused saying so).
//! - `endpoint`, `region`, `acl` and `encryption` are not applied: where and how objects are
//!   stored is the destination's configuration, not a message's to choose. `packetdebug` is
//!   not applied either; `logrequest` logs the message. Each field not applied is named in
//!   the `accepted` event's `ignored`.
//!
//! The request's id is made (`pd-<alertid>-<random>`): pcapdaemon's messages have none, and
//! Redis pub/sub delivers a message at most once, to the nodes connected when it is published.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{FleetRequest, MessageError, Target};
use crate::request::CaptureRequest;

/// The message format of pcapdaemon's README, as it is there (both `node` and `nodere`, both
/// `interface` and `alias`): what a sender moving from pcapdaemon publishes, and the tests'.
pub const README_EXAMPLE: &str = r#"    {
        "node": "node name",
        "nodere": "node regex",
        "interface": ["bond1","bond2"],
        "alias": ["local","public"],
        "tags": "blah,tagme,stuff",
        "bpf": "dst host 10.0.0.1",
        "customer": "importantcustomer",
        "snap": 1500,
        "packets": 50,
        "alertid": 655443,
        "timeout": 15,
        "duration": 60,
        "bytes": 1000,
        "packetdebug":false,
        "logrequest":false,
        "folder": "myfolder",
        "bucket": "mybucket",
        "acl": "public-read",
        "region": "us-east-1",
        "endpoint": "s3.amazonaws.com",
        "encryption": false
    }"#;

/// A pcapdaemon capture message. Fields pcapdaemon does not know are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PcapdaemonMessage {
    pub node: Option<String>,
    pub nodere: Option<String>,
    #[serde(deserialize_with = "names")]
    pub interface: Vec<String>,
    #[serde(deserialize_with = "names")]
    pub alias: Vec<String>,
    /// Set by pcapdaemon itself (cleared from messages): ignored.
    pub aliasmatched: Option<String>,
    pub tags: Option<String>,
    pub bpf: Option<String>,
    pub customer: Option<String>,
    pub snap: Option<u32>,
    pub packets: Option<u64>,
    pub alertid: Option<serde_json::Number>,
    /// In pcapdaemon's message type, never used there: ignored.
    pub alertstr: Option<serde_json::Value>,
    pub timeout: Option<f64>,
    pub duration: Option<f64>,
    pub bytes: Option<u64>,
    pub packetdebug: Option<bool>,
    pub logrequest: Option<bool>,
    pub folder: Option<String>,
    pub bucket: Option<String>,
    pub acl: Option<String>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub encryption: Option<bool>,
}

impl PcapdaemonMessage {
    pub fn parse(json: &[u8]) -> Result<Self, MessageError> {
        Ok(serde_json::from_slice(json)?)
    }

    /// The tapstream request it asks for, and the fields given that are not applied.
    pub fn request(self) -> Result<FleetRequest, MessageError> {
        let mut ignored = Vec::new();
        let mut ignore = |name: &str, given: bool| {
            if given {
                ignored.push(name.to_owned());
            }
        };
        ignore("endpoint", self.endpoint.is_some());
        ignore("region", self.region.is_some());
        ignore("acl", self.acl.is_some());
        ignore("encryption", self.encryption.is_some());
        ignore("packetdebug", self.packetdebug == Some(true));
        let positive = |n: Option<u64>| n.filter(|&n| n > 0);
        let seconds = |s: Option<f64>| s.filter(|&s| s != 0.0);
        let destination = match (&self.bucket, &self.folder) {
            (Some(bucket), folder) => Some(match folder.as_deref().map(|f| f.trim_matches('/')) {
                Some(folder) if !folder.is_empty() => format!("s3://{bucket}/{folder}"),
                _ => format!("s3://{bucket}"),
            }),
            (None, Some(_)) => {
                return Err(MessageError::Pcapdaemon { message: "folder is given without a bucket".into() });
            }
            (None, None) => None,
        };
        let alert_id = self.alertid.map(|n| n.to_string());
        let tags: BTreeMap<String, String> =
            self.tags.filter(|t| !t.trim().is_empty()).map(|t| ("tags".to_owned(), t)).into_iter().collect();
        let capture = CaptureRequest {
            id: None,
            interfaces: self.interface.into_iter().chain(self.alias).collect(),
            filter: self.bpf,
            snaplen: self.snap.filter(|&s| s > 0),
            packets: positive(self.packets),
            bytes: positive(self.bytes),
            duration_secs: seconds(self.duration),
            idle_timeout_secs: seconds(self.timeout),
            // pcapdaemon has no history to start in.
            lookback_secs: None,
            tags,
            customer: self.customer.filter(|c| !c.is_empty()),
            alert_id: alert_id.clone(),
            // pcapdaemon has no retention class: the node's `[store] retention`.
            retention: None,
            // The fleet request's id, filled in by the node.
            request_id: None,
            destination,
            // Where pcapdaemon sends to CloudShark is its configuration's, not a message's.
            cloudshark: None,
        };
        let target = Target {
            node_regex: node_regex(self.node.as_deref(), self.nodere.as_deref()),
            ..Target::default()
        };
        let mut request = FleetRequest::new(capture, target);
        let random = crate::sys::random_bytes::<4>();
        let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
        request.id = match alert_id
            .filter(|a| a.len() <= 40 && a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            Some(alert) => format!("pd-{alert}-{suffix}"),
            None => format!("pd-{suffix}"),
        };
        request.ignored = ignored;
        Ok(request)
    }
}

/// The anchored `node_regex` that targets what `node` and `nodere` do together: the name
/// `node` (`any`: every name), or a name in which `nodere` is found; `None`: every host.
fn node_regex(node: Option<&str>, nodere: Option<&str>) -> Option<String> {
    let node = node.filter(|n| !n.is_empty());
    let nodere = nodere.filter(|n| !n.is_empty());
    if node == Some("any") {
        return None;
    }
    match (node, nodere) {
        (None, None) => None,
        (Some(node), None) => Some(regex::escape(node)),
        (None, Some(re)) => Some(format!(".*(?:{re}).*")),
        (Some(node), Some(re)) => Some(format!("{}|.*(?:{re}).*", regex::escape(node))),
    }
}

/// A list of names, or one name alone.
fn names<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Names {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<Names>::deserialize(deserializer)? {
        None => Vec::new(),
        Some(Names::One(one)) => vec![one],
        Some(Names::Many(many)) => many,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(request: &FleetRequest, node: &str) -> bool {
        request.target.matches(node, &BTreeMap::new()).unwrap()
    }

    #[test]
    fn the_readme_example_becomes_the_request_it_describes() {
        let request = PcapdaemonMessage::parse(README_EXAMPLE.as_bytes()).unwrap().request().unwrap();
        let c = &request.capture;
        assert_eq!(c.interfaces, ["bond1", "bond2", "local", "public"]);
        assert_eq!(c.filter.as_deref(), Some("dst host 10.0.0.1"));
        assert_eq!((c.snaplen, c.packets, c.bytes), (Some(1500), Some(50), Some(1000)));
        assert_eq!((c.duration_secs, c.idle_timeout_secs), (Some(60.0), Some(15.0)));
        assert_eq!(c.tags["tags"], "blah,tagme,stuff");
        assert_eq!(
            (c.customer.as_deref(), c.alert_id.as_deref()),
            (Some("importantcustomer"), Some("655443"))
        );
        assert_eq!(c.destination.as_deref(), Some("s3://mybucket/myfolder"));
        assert_eq!(request.ignored, ["endpoint", "region", "acl", "encryption"]);
        assert!(request.id.starts_with("pd-655443-"), "{}", request.id);
        assert!(matches(&request, "node name"));
        assert!(matches(&request, "a node regex host"), "nodere is found anywhere, as pcapdaemon has it");
        assert!(!matches(&request, "node"));
        assert!(!request.expired(std::time::SystemTime::now()));
    }

    #[test]
    fn targets_follow_pcapdaemon() {
        let target = |json: &str| PcapdaemonMessage::parse(json.as_bytes()).unwrap().request().unwrap();
        let any = target(r#"{"node": "any"}"#);
        assert!(matches(&any, "tap1") && matches(&any, "x"));
        let exact = target(r#"{"node": "tap.1"}"#);
        assert!(matches(&exact, "tap.1") && !matches(&exact, "tapx1") && !matches(&exact, "tap.10"));
        let re = target(r#"{"nodere": "fra[0-9]"}"#);
        assert!(matches(&re, "tap-fra1-01") && !matches(&re, "tap-ams1-01"));
        let alternation = target(r#"{"nodere": "^ams|fra$"}"#);
        assert!(
            matches(&alternation, "ams-1")
                && matches(&alternation, "x-fra")
                && !matches(&alternation, "fra-1")
        );
        assert!(matches(&target("{}"), "anything"));
    }

    #[test]
    fn what_tapstream_cannot_take_is_refused_with_the_reason() {
        for (json, expected) in [
            (r#"{"folder": "f"}"#, "folder is given without a bucket"),
            (r#"{"node": "a", "hostname": "b"}"#, "unknown field `hostname`"),
            (r#"{"packets": "ten"}"#, "invalid type"),
            (r#"{"interface": 3}"#, "did not match"),
        ] {
            let error = PcapdaemonMessage::parse(json.as_bytes()).and_then(PcapdaemonMessage::request);
            let error = error.unwrap_err().to_string();
            assert!(error.contains(expected), "{json}: {error}");
        }
        // Zeros leave a limit out, as pcapdaemon's defaults do.
        let request = PcapdaemonMessage::parse(
            br#"{"packets": 0, "bytes": 0, "timeout": 0, "snap": 0, "interface": "eth1"}"#,
        )
        .unwrap()
        .request()
        .unwrap();
        let c = &request.capture;
        assert_eq!((c.packets, c.bytes, c.idle_timeout_secs, c.snaplen), (None, None, None, None));
        assert_eq!(c.interfaces, ["eth1"]);
        assert!(request.ignored.is_empty());
    }
}
