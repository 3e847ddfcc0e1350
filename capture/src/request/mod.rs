//! One capture request, from wherever it comes, resolved once into a plan.
//!
//! A [`CaptureRequest`] is what someone asked for, as they wrote it: flags of the one-shot
//! `tapstream capture`, the JSON body of `POST /v1/captures`, later a broker's message.
//! [`CapturePlan::resolve`] checks it against a [`Policy`] (the interfaces there are, the
//! defaults, the caps, the allowed destinations) and either fills in the defaults and compiles
//! its filter, or refuses it with a [`PlanError`] that says what is wrong and carries the
//! values. Every entry point calls it; only the HTTP layer turns a refusal into a status code.

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
    /// Interface alias (from the configuration) or device name; default: the only
    /// configured interface.
    pub interface: Option<String>,
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
    /// Tags stored in the objects' metadata.
    pub tags: BTreeMap<String, String>,
    /// The customer the capture is for.
    pub customer: Option<String>,
    /// The alert that asked for the capture.
    pub alert_id: Option<String>,
    /// Where to store it: one of the configured destinations or a place under one, or
    /// `local` (the first local directory); default: the first destination.
    pub destination: Option<String>,
}
