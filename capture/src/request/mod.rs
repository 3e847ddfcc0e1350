//! One capture request, from wherever it comes, resolved once into a plan.
//!
//! A [`CaptureRequest`] is what someone asked for, as they wrote it: flags of the one-shot
//! `tapstream capture`, the JSON body of `POST /v1/captures`, later a broker's message.
//! [`CapturePlan::resolve`] checks it against a [`Policy`] (the interfaces there are, the
//! defaults, the caps, the allowed destinations) and either fills in the defaults and compiles
//! its filter, or refuses it with a [`PlanError`] that says what is wrong and carries the
//! values. Every entry point calls it; only the HTTP layer turns a refusal into a status code.

pub mod access;
pub mod plan;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use plan::{CapturePlan, Defaults, MAX_REQUEST_SECS, PlanError, Policy};

/// A request for a capture. Everything but the bounds is optional; the daemon's
/// `[defaults]` fill in what is left out, and its `[limits]` cap what is asked.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureRequest {
    /// Capture id (letters, digits, `.`, `_`, `-`); default: generated.
    pub id: Option<String>,
    /// Interfaces, each an alias (from the configuration) or a device name: one capture over
    /// all of them (both directions of a tap), its limits applying to the sum, each
    /// interface's frames in objects of their own. Default: the only configured interface.
    /// The JSON may also give one name as `"interface": "public"`.
    #[serde(alias = "interface", deserialize_with = "one_or_many", skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
    /// tcpdump filter expression; none: every frame.
    pub filter: Option<String>,
    /// Bytes stored per frame at most.
    pub snaplen: Option<u32>,
    /// Stop after this many frames (exact).
    pub packets: Option<u64>,
    /// Stop before the stored frame bytes exceed this (exact).
    pub bytes: Option<u64>,
    /// Stop after this many seconds.
    pub duration_secs: Option<f64>,
    /// Stop after this many seconds without a frame.
    pub idle_timeout_secs: Option<f64>,
    /// Begin this many seconds before the start, from the interface's history (its
    /// `lookback` section), then continue live.
    pub lookback_secs: Option<f64>,
    /// Tags stored in the objects' metadata.
    pub tags: BTreeMap<String, String>,
    /// The customer the capture is for.
    pub customer: Option<String>,
    /// The alert that asked for the capture.
    pub alert_id: Option<String>,
    /// The id of the request this capture answers, when it is not the capture's own id (an
    /// outside system's request or ticket; a fleet request's id, which the node fills in),
    /// kept in the catalog's manifest: 1 to 128 printable ASCII characters.
    pub request_id: Option<String>,
    /// Retention class, stored as the objects' `retention` tag for lifecycle rules (1 to 64
    /// letters, digits, `.`, `_` or `-`); default: `[store] retention`.
    pub retention: Option<String>,
    /// Where to store it: one of the configured destinations or a place under one, or
    /// `local` (the first local directory), or a configured CloudShark appliance's URL
    /// (`cloudshark://host`: kept locally only until it is sent there); default: the first
    /// destination.
    pub destination: Option<String>,
    /// A CloudShark appliance to send it to as well when it ends: the name of a configured
    /// `[cloudshark.<name>]` or its URL (`cloudshark://host`); none: not sent.
    pub cloudshark: Option<String>,
}

/// A list of interface names, or one name alone: `"a"` or `["a", "b"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct Names;
    impl<'de> serde::de::Visitor<'de> for Names {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an interface name or a list of interface names")
        }

        fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Self::Value, E> {
            Ok(vec![name.to_owned()])
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut names = Vec::new();
            while let Some(name) = seq.next_element()? {
                names.push(name);
            }
            Ok(names)
        }
    }
    deserializer.deserialize_any(Names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_are_one_name_or_a_list() {
        let one: CaptureRequest = serde_json::from_str(r#"{"interface": "public"}"#).unwrap();
        assert_eq!(one.interfaces, ["public"]);
        let many: CaptureRequest = serde_json::from_str(r#"{"interfaces": ["east", "west"]}"#).unwrap();
        assert_eq!(many.interfaces, ["east", "west"]);
        let error = serde_json::from_str::<CaptureRequest>(r#"{"interfaces": 3}"#).unwrap_err();
        assert!(error.to_string().contains("expected an interface name or a list"), "{error}");
        assert_eq!(serde_json::to_value(&many).unwrap()["interfaces"], serde_json::json!(["east", "west"]));
    }
}
