//! A request checked against the policy of the place that runs it, and made a plan.

use std::time::Duration;

use super::CaptureRequest;
use crate::{
    config::{Asked, CapExceeded, Config, LimitsSection},
    datapath::capture::{CaptureSpec, DEFAULT_SNAPLEN, Limits},
    filter::{CaptureFilter, CbpfProgram, FilterError, program::Instructions},
    report,
    store::{
        catalog::{Catalog, Manifest, ManifestInterface},
        settings::{ObjectLabels, check_retention, check_tag, object_metadata, object_tags},
    },
};

/// The longest duration or idle timeout a request may ask for (a year), whatever the caps:
/// beyond it a number of seconds is a mistake, not a plan.
pub const MAX_REQUEST_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// Longest capture id.
pub const MAX_ID_BYTES: usize = 64;
/// Longest request id.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// What a request gets for what it leaves out.
#[derive(Clone, Debug, PartialEq)]
pub struct Defaults {
    /// Bytes stored per frame.
    pub snaplen: u32,
    /// Duration, in seconds; `None`: until another limit or a stop.
    pub duration_secs: Option<f64>,
    /// Idle timeout, in seconds; `None`: none.
    pub idle_timeout_secs: Option<f64>,
    /// The capture id; `None`: a fresh one for each request (the UTC time and a random suffix).
    pub id: Option<String>,
    /// The retention class (`[store] retention`); `None`: none.
    pub retention: Option<String>,
}

/// What the place that runs a capture allows and fills in: the daemon's configuration, or
/// the one-shot command's flags.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// The interfaces a request may name: (alias, device), in the order they are listed.
    pub interfaces: Vec<(String, String)>,
    /// What a request gets for what it leaves out.
    pub defaults: Defaults,
    /// The caps on what a request may ask; `None`: none (the one-shot, whose user owns the
    /// host it runs on).
    pub caps: Option<LimitsSection>,
    /// The destinations a request may store under; `None`: the capture is not stored in a
    /// store (the one-shot writing a file).
    pub destinations: Option<Vec<String>>,
    /// This host's name, in object keys and metadata.
    pub node: String,
    /// The interfaces (aliases) that keep a history a request may start in.
    pub histories: Vec<String>,
}

impl Policy {
    /// The daemon's: its interfaces, `[defaults]`, `[limits]` and `[store] destinations`.
    pub fn daemon(config: &Config, node: &str) -> Self {
        let d = &config.defaults;
        Self {
            interfaces: config
                .interfaces
                .iter()
                .map(|(alias, i)| (alias.clone(), i.device.clone()))
                .collect(),
            defaults: Defaults {
                snaplen: d.snaplen,
                duration_secs: Some(d.duration_secs as f64),
                idle_timeout_secs: (d.idle_timeout_secs > 0).then_some(d.idle_timeout_secs as f64),
                id: None,
                retention: config.store.retention.clone(),
            },
            caps: Some(config.limits.clone()),
            destinations: Some(config.store.destinations.clone()),
            node: node.to_owned(),
            histories: config
                .interfaces
                .iter()
                .filter(|(_, i)| i.lookback.is_some())
                .map(|(alias, _)| alias.clone())
                .collect(),
        }
    }

    /// The one-shot command's: the one device it was given, no caps, no default duration, the
    /// id `capture`; and the store URL it was given, if any (else it writes a file).
    pub fn one_shot(device: &str, destination: Option<&str>, node: &str) -> Self {
        Self {
            interfaces: vec![(device.to_owned(), device.to_owned())],
            defaults: Defaults {
                snaplen: DEFAULT_SNAPLEN,
                duration_secs: None,
                idle_timeout_secs: None,
                id: Some("capture".into()),
                retention: None,
            },
            caps: None,
            destinations: destination.map(|d| vec![d.to_owned()]),
            node: node.to_owned(),
            histories: Vec::new(),
        }
    }

    /// The interface a request names, by its alias or its device: (alias, device).
    pub fn interface(&self, name: &str) -> Option<&(String, String)> {
        self.interfaces
            .iter()
            .find(|(alias, _)| alias == name)
            .or_else(|| self.interfaces.iter().find(|(_, device)| device == name))
    }

    /// `alias (device), ...`.
    fn describe_interfaces(&self) -> String {
        self.interfaces
            .iter()
            .map(|(alias, device)| format!("{alias} ({device})"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Why a request is refused: each variant says what is wrong and carries the values.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// More than one interface is configured and the request names none.
    #[error("name an interface: {configured}")]
    NoInterface { configured: String },
    #[error("no interface {name:?} here; configured: {configured}")]
    UnknownInterface { name: String, configured: String },
    /// A tag that cannot be stored as object metadata (the rule is [`check_tag`]'s).
    #[error("{message}")]
    Tag { message: String },
    #[error("{field} must be a number of seconds above 0 and at most {MAX_REQUEST_SECS}, not {value}")]
    Seconds { field: &'static str, value: f64 },
    #[error("lookback_secs: {interface} keeps no history (configure [interfaces.{interface}.lookback])")]
    NoHistory { interface: String },
    #[error("snaplen must be at least 1")]
    ZeroSnaplen,
    #[error("packets and bytes limits must be at least 1")]
    ZeroLimit,
    /// Above one of the caps: which, what was asked and the cap's value.
    #[error(transparent)]
    OverCap(#[from] CapExceeded),
    /// The filter did not compile: libpcap's message, or the limit the compile ran into.
    #[error(transparent)]
    Filter(FilterError),
    /// The filter compiled but the kernel cannot run it as it is.
    #[error("{}", report::chain(.0))]
    FilterCannotRun(FilterError),
    #[error("the daemon has no destinations configured ([store] destinations)")]
    NoDestinations,
    #[error("destination {asked:?} holds a control character")]
    DestinationControl { asked: String },
    #[error("no local directory is among the configured destinations")]
    NoLocalDestination,
    #[error("destination {asked:?} is not under an allowed one: {}", .allowed.join(", "))]
    DestinationNotAllowed { asked: String, allowed: Vec<String> },
    #[error(
        "capture id {id:?}: use 1 to {MAX_ID_BYTES} letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    BadId { id: String },
    /// What the objects would carry breaks S3's rules for metadata.
    #[error("{message}")]
    Metadata { message: String },
    #[error("request_id {id:?}: use 1 to {MAX_REQUEST_ID_BYTES} printable ASCII characters")]
    BadRequestId { id: String },
    /// A retention class that cannot be an object tag (the rule is [`check_retention`]'s).
    #[error("{message}")]
    Retention { message: String },
}

/// A request resolved: every default filled in, the filter compiled, everything checked.
#[derive(Clone, Debug)]
pub struct CapturePlan {
    /// The request as completed (defaults filled in, the interface by its alias): what the
    /// API reports and the state file keeps.
    pub request: CaptureRequest,
    /// The capture's id.
    pub id: String,
    /// The interfaces, (alias, device) (the one-shot: its device twice), each once, in the
    /// order asked.
    pub interfaces: Vec<(String, String)>,
    /// What the writers store: id, compiled filter, snaplen.
    pub spec: CaptureSpec,
    /// When it ends.
    pub limits: Limits,
    /// Where its objects go (a URL or a local directory); `None`: not to a store.
    pub destination: Option<String>,
    /// What its objects carry besides the frames.
    pub labels: ObjectLabels,
}

impl CapturePlan {
    /// Checks `request` against `policy` with `running` captures already running, fills in
    /// the defaults and compiles its filter with `compile` (the daemon's runs in a child
    /// process within a time limit; the one-shot's in its own process). Cheap checks come
    /// first, so a request refused for its bounds costs no compile.
    pub fn resolve(
        mut request: CaptureRequest,
        policy: &Policy,
        running: usize,
        compile: impl FnOnce(&str) -> Result<CbpfProgram, FilterError>,
    ) -> Result<Self, PlanError> {
        let interfaces = interfaces(&request.interfaces, policy)?;
        request.interfaces = interfaces.iter().map(|(alias, _)| alias.clone()).collect();
        request.tags = std::mem::take(&mut request.tags)
            .iter()
            .map(|(k, v)| check_tag(k, v))
            .collect::<Result<_, _>>()
            .map_err(|message| PlanError::Tag { message })?;
        request.filter = request.filter.filter(|f| !f.trim().is_empty());
        let defaults = &policy.defaults;
        request.retention = request.retention.or_else(|| defaults.retention.clone());
        if let Some(class) = &request.retention {
            check_retention(class).map_err(|message| PlanError::Retention { message })?;
        }
        if let Some(id) = &request.request_id
            && (id.is_empty()
                || id.len() > MAX_REQUEST_ID_BYTES
                || !id.bytes().all(|b| (0x20..0x7f).contains(&b)))
        {
            return Err(PlanError::BadRequestId { id: id.clone() });
        }
        request.duration_secs = match request.duration_secs.or(defaults.duration_secs) {
            Some(s) => Some(seconds("duration_secs", s)?),
            None => None,
        };
        request.idle_timeout_secs = match request.idle_timeout_secs.or(defaults.idle_timeout_secs) {
            Some(s) => Some(seconds("idle_timeout_secs", s)?),
            None => None,
        };
        request.lookback_secs = match request.lookback_secs {
            Some(s) => Some(seconds("lookback_secs", s)?),
            None => None,
        };
        if request.lookback_secs.is_some()
            && let Some((alias, _)) = interfaces.iter().find(|(alias, _)| !policy.histories.contains(alias))
        {
            return Err(PlanError::NoHistory { interface: alias.clone() });
        }
        let snaplen = request.snaplen.unwrap_or(defaults.snaplen);
        if snaplen == 0 {
            return Err(PlanError::ZeroSnaplen);
        }
        request.snaplen = Some(snaplen);
        if request.packets == Some(0) || request.bytes == Some(0) {
            return Err(PlanError::ZeroLimit);
        }
        check_caps(&request, policy, running)?;
        let filter = match &request.filter {
            Some(expression) => {
                let program = compile(expression).map_err(PlanError::Filter)?;
                Instructions::build(&[CaptureFilter { slot: 0, filter: Some(&program) }])
                    .map_err(PlanError::FilterCannotRun)?;
                Some(program)
            }
            None => None,
        };
        let destination = match &policy.destinations {
            Some(allowed) => Some(destination(request.destination.as_deref(), allowed)?),
            None => None,
        };
        request.destination = destination.clone();
        let id = match request.id.take().or_else(|| defaults.id.clone()) {
            Some(id) => check_id(id)?,
            None => generate_id(),
        };
        request.id = Some(id.clone());
        let tags: Vec<(String, String)> = request.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let metadata = object_metadata(
            &id,
            &policy.node,
            request.filter.as_deref(),
            request.alert_id.as_deref(),
            request.customer.as_deref(),
            &tags,
        )
        .map_err(|message| PlanError::Metadata { message })?;
        let limits = Limits {
            packets: request.packets,
            bytes: request.bytes,
            duration: request.duration_secs.map(Duration::from_secs_f64),
            idle: request.idle_timeout_secs.map(Duration::from_secs_f64),
        };
        // The capture's manifest in the catalog, when it goes to a store.
        let catalog = destination.is_some().then(|| {
            Catalog::new(Manifest {
                capture_id: id.clone(),
                request_id: request.request_id.clone(),
                node: policy.node.clone(),
                interfaces: interfaces
                    .iter()
                    .map(|(alias, device)| ManifestInterface { alias: alias.clone(), device: device.clone() })
                    .collect(),
                filter: request.filter.clone(),
                snaplen,
                tags: request.tags.clone(),
                customer: request.customer.clone(),
                alert_id: request.alert_id.clone(),
                retention: request.retention.clone(),
                start_ns: crate::sys::unix_now_ns(),
                ..Manifest::default()
            })
        });
        Ok(Self {
            id: id.clone(),
            interfaces,
            spec: CaptureSpec {
                id: id.clone(),
                filter,
                snaplen,
                lookback: request.lookback_secs.map(Duration::from_secs_f64),
            },
            limits,
            destination,
            labels: ObjectLabels {
                catalog,
                capture: id,
                node: policy.node.clone(),
                part: None,
                metadata,
                object_tags: object_tags(request.customer.as_deref(), request.retention.as_deref()),
            },
            request,
        })
    }

    /// Checks the caps again with `running` captures running: others may have started since
    /// the plan was made.
    pub fn check_caps(&self, policy: &Policy, running: usize) -> Result<(), PlanError> {
        check_caps(&self.request, policy, running)
    }

    /// Where its objects go: `destination/node/id/`.
    pub fn location(&self) -> Option<String> {
        self.destination
            .as_ref()
            .map(|d| format!("{}/{}/{}/", d.trim_end_matches('/'), self.labels.node, self.id))
    }
}

/// The interfaces `asked` names, each once, (alias, device); none asked: the only one.
fn interfaces(asked: &[String], policy: &Policy) -> Result<Vec<(String, String)>, PlanError> {
    if asked.is_empty() {
        return match policy.interfaces.as_slice() {
            [only] => Ok(vec![only.clone()]),
            _ => Err(PlanError::NoInterface { configured: policy.describe_interfaces() }),
        };
    }
    let mut found: Vec<(String, String)> = Vec::with_capacity(asked.len());
    for name in asked {
        let interface = policy.interface(name).ok_or_else(|| PlanError::UnknownInterface {
            name: name.clone(),
            configured: policy.describe_interfaces(),
        })?;
        if !found.contains(interface) {
            found.push(interface.clone());
        }
    }
    Ok(found)
}

/// A number of seconds a `Duration` holds and a capture can mean (Durations are made of it:
/// 1e300 would panic there).
fn seconds(field: &'static str, value: f64) -> Result<f64, PlanError> {
    if value.is_finite() && value > 0.0 && value <= MAX_REQUEST_SECS {
        Ok(value)
    } else {
        Err(PlanError::Seconds { field, value })
    }
}

fn check_caps(request: &CaptureRequest, policy: &Policy, running: usize) -> Result<(), PlanError> {
    let Some(caps) = &policy.caps else { return Ok(()) };
    let asked = Asked {
        duration_secs: request.duration_secs.map_or(0, |d| d.ceil() as u64),
        bytes: request.bytes,
        packets: request.packets,
        snaplen: request.snaplen.unwrap_or(policy.defaults.snaplen),
        filter_bytes: request.filter.as_ref().map_or(0, |f| f.len() as u64),
        running,
    };
    Ok(caps.check(&asked)?)
}

/// The destination a request may use: one of the allowed ones, a place under one, or `local`
/// (the first local directory); none asked: the first.
fn destination(asked: Option<&str>, allowed: &[String]) -> Result<String, PlanError> {
    if allowed.is_empty() {
        return Err(PlanError::NoDestinations);
    }
    let Some(asked) = asked else { return Ok(allowed[0].clone()) };
    if asked.chars().any(char::is_control) {
        return Err(PlanError::DestinationControl { asked: asked.to_owned() });
    }
    if asked == "local" {
        return allowed.iter().find(|d| d.starts_with('/')).cloned().ok_or(PlanError::NoLocalDestination);
    }
    let normal = asked.trim_end_matches('/');
    let under = |base: &String| {
        let base = base.trim_end_matches('/');
        normal == base || (normal.starts_with(base) && normal[base.len()..].starts_with('/'))
    };
    if normal.split('/').any(|part| part == ".." || part == ".") || !allowed.iter().any(under) {
        return Err(PlanError::DestinationNotAllowed { asked: asked.to_owned(), allowed: allowed.to_vec() });
    }
    Ok(normal.to_owned())
}

/// A capture id: 1 to [`MAX_ID_BYTES`] letters, digits, `.`, `_`, `-`, not starting with `.`
/// (it names a file and a part of an object key).
fn check_id(id: String) -> Result<String, PlanError> {
    if id.is_empty()
        || id.len() > MAX_ID_BYTES
        || id.starts_with('.')
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(PlanError::BadId { id });
    }
    Ok(id)
}

/// A fresh capture id: the UTC start time and a random suffix.
fn generate_id() -> String {
    let now = crate::sys::unix_now_ns();
    let random = crate::sys::random_bytes::<3>();
    format!("{}-{:02x}{:02x}{:02x}", crate::store::object::utc_compact(now), random[0], random[1], random[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_is_found_by_alias_or_device() {
        let text = "[interfaces.public]\ndevice = \"eth1\"\n";
        let config = Config::parse(text, std::path::Path::new("test.toml")).unwrap();
        let policy = Policy::daemon(&config, "node");
        assert_eq!(policy.interface("public").unwrap().0, "public");
        assert_eq!(policy.interface("eth1").unwrap().0, "public");
        assert!(policy.interface("eth2").is_none());
    }

    #[test]
    fn several_interfaces_are_each_taken_once() {
        let text = "[interfaces.east]\ndevice = \"eth1\"\n[interfaces.west]\ndevice = \"eth2\"\n";
        let config = Config::parse(text, std::path::Path::new("test.toml")).unwrap();
        let policy = Policy::daemon(&config, "node");
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let both = interfaces(&names(&["eth2", "east", "west", "eth1"]), &policy).unwrap();
        assert_eq!(both, [("west".into(), "eth2".into()), ("east".into(), "eth1".into())]);
        let error = interfaces(&[], &policy).unwrap_err().to_string();
        assert_eq!(error, "name an interface: east (eth1), west (eth2)");
        let error = interfaces(&names(&["east", "bond0"]), &policy).unwrap_err().to_string();
        assert_eq!(error, "no interface \"bond0\" here; configured: east (eth1), west (eth2)");
    }

    #[test]
    fn the_retention_class_defaults_to_the_stores_and_is_checked() {
        let text = "[interfaces.public]\ndevice = \"eth1\"\n[store]\ndestinations = [\"/srv/caps\"]\n\
                    retention = \"short\"\n";
        let config = Config::parse(text, std::path::Path::new("test.toml")).unwrap();
        let policy = Policy::daemon(&config, "node");
        let compile = |_: &str| -> Result<CbpfProgram, FilterError> { unreachable!("no filter") };
        let request = CaptureRequest { customer: Some("acme corp".into()), ..CaptureRequest::default() };
        let plan = CapturePlan::resolve(request.clone(), &policy, 0, compile).unwrap();
        assert_eq!(plan.request.retention.as_deref(), Some("short"));
        let tags =
            [("customer".to_owned(), "acme corp".to_owned()), ("retention".to_owned(), "short".to_owned())];
        assert_eq!(plan.labels.object_tags, tags);
        assert_eq!(plan.labels.catalog.unwrap().manifest().retention.as_deref(), Some("short"));
        // The request's own class wins; a class that cannot be a tag is refused by name.
        let own = CaptureRequest { retention: Some("legal-hold".into()), ..request.clone() };
        let plan = CapturePlan::resolve(own, &policy, 0, compile).unwrap();
        assert_eq!(plan.labels.object_tags[1].1, "legal-hold");
        let bad = CaptureRequest { retention: Some("a b".into()), ..request };
        let error = CapturePlan::resolve(bad, &policy, 0, compile).unwrap_err().to_string();
        assert_eq!(error, "retention class \"a b\": use 1 to 64 letters, digits, '.', '_' or '-'");
        // And in the configuration, by the field's name.
        let text = "[interfaces.public]\ndevice = \"eth1\"\n[store]\nretention = \"\"\n";
        let error = Config::parse(text, std::path::Path::new("test.toml")).unwrap_err().to_string();
        assert!(error.contains("store.retention") && error.contains("retention class"), "{error}");
    }
}

#[cfg(test)]
mod lookback_tests {
    use super::*;

    #[test]
    fn a_lookback_is_for_interfaces_that_keep_a_history() {
        let text = "[interfaces.east]\ndevice = \"eth1\"\n[interfaces.east.lookback]\nmemory_bytes = 1048576\n\
                    [interfaces.west]\ndevice = \"eth2\"\n[store]\ndestinations = [\"/tmp/x\"]\n";
        let config = Config::parse(text, std::path::Path::new("test.toml")).unwrap();
        let policy = Policy::daemon(&config, "node");
        // A broker message's capture is the same JSON.
        let request = |json: &str| serde_json::from_str::<CaptureRequest>(json).unwrap();
        let compile = |_: &str| -> Result<CbpfProgram, FilterError> { unreachable!("no filter") };
        let plan = CapturePlan::resolve(
            request(r#"{"interface": "east", "lookback_secs": 2.5}"#),
            &policy,
            0,
            compile,
        )
        .unwrap();
        assert_eq!(plan.spec.lookback, Some(Duration::from_millis(2_500)));
        assert_eq!(plan.request.lookback_secs, Some(2.5));
        let plan = CapturePlan::resolve(request(r#"{"interface": "west"}"#), &policy, 0, compile).unwrap();
        assert_eq!(plan.spec.lookback, None);
        let err = CapturePlan::resolve(
            request(r#"{"interfaces": ["east", "west"], "lookback_secs": 5}"#),
            &policy,
            0,
            compile,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "lookback_secs: west keeps no history (configure [interfaces.west.lookback])"
        );
        let err = CapturePlan::resolve(
            request(r#"{"interface": "east", "lookback_secs": -1}"#),
            &policy,
            0,
            compile,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("lookback_secs must be a number of seconds above 0"), "{err}");
    }
}
