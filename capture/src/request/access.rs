//! Who asks, and what the access rules (`[access]`) let them do.
//!
//! A request's [`Subject`] (a local user by the socket's credentials, a bearer token, a
//! broker's transport) is held to a [`Grant`]: anything (no rule holds it and
//! `access.default` allows, or the operator's `daemon.token_file` token), nothing, or one
//! rule. A rule narrows the daemon's [`Policy`] before the request is resolved (its
//! interfaces, destinations, default duration and limits), ANDs its forced clause to the
//! request's filter before it is compiled, and caps the completed request; a capture records
//! the rule that started it, whose clients alone may stop or see it unless their rule says
//! otherwise.

use std::fmt;

use serde::Serialize;

use super::{CaptureRequest, Policy};
use crate::config::{
    Config, ConfigError,
    access::{AccessRule, BrokerAccess, DefaultAccess, balanced},
};

/// A group of a local client: its id, and its name where the host has one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Group {
    pub gid: u32,
    pub name: Option<String>,
}

/// Who asks. Never holds a secret: a token is known by the name of its rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Subject {
    /// A local user on the control socket, by its credentials (`None`: unknown).
    Local { uid: Option<u32>, gid: Option<u32>, groups: Vec<Group> },
    /// A TCP client that presented the token of an access rule.
    Token { rule: String },
    /// A TCP client that presented the token of `daemon.token_file`.
    OperatorToken,
    /// A TCP client without a valid token.
    Unauthenticated,
    /// A broker's request: its transport (`redis`, `nats`, `pcapdaemon`) and its id.
    Broker { transport: &'static str, message_id: Option<String> },
}

impl Subject {
    /// The user id, for a local client.
    pub fn uid(&self) -> Option<u32> {
        match self {
            Self::Local { uid, .. } => *uid,
            _ => None,
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local { uid: None, .. } => f.write_str("a local client of unknown credentials"),
            Self::Local { uid: Some(uid), groups, .. } => {
                let names: Vec<String> =
                    groups.iter().map(|g| g.name.clone().unwrap_or_else(|| g.gid.to_string())).collect();
                write!(f, "uid {uid} (groups {})", names.join(", "))
            }
            Self::Token { rule } => write!(f, "the token of access rule {rule:?}"),
            Self::OperatorToken => f.write_str("the token of daemon.token_file"),
            Self::Unauthenticated => f.write_str("a TCP client without a valid token"),
            Self::Broker { transport, .. } => write!(f, "requests from {transport}"),
        }
    }
}

/// Why access rules refuse a request. Each names the rule (or `access.default`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessDenied {
    #[error("no access rule holds {subject}, and access.default is \"deny\"")]
    NoRule { subject: String },
    #[error(
        "access rule {rule:?} does not allow interface {interface:?} (access.rules.{rule}.interfaces: {allowed})"
    )]
    Interface { rule: String, interface: String, allowed: String },
    #[error(
        "access rule {rule:?} does not allow destination {asked:?} (access.rules.{rule}.destinations: {allowed})"
    )]
    Destination { rule: String, asked: String, allowed: String },
    #[error("{what} {asked} exceeds access rule {rule:?}'s access.rules.{rule}.{field} = {limit}")]
    Cap { rule: String, what: &'static str, asked: u64, field: &'static str, limit: u64 },
    #[error(
        "access rule {rule:?} may not {action} capture {id:?}: another started it (access.rules.{rule}.{permission})"
    )]
    NotOwner { rule: String, action: &'static str, id: String, permission: &'static str },
    #[error("the filter's parentheses do not balance (access rule {rule:?} ANDs its clause to it)")]
    Unbalanced { rule: String },
}

/// A rule, with the ids of its groups.
#[derive(Debug)]
struct LoadedRule {
    rule: AccessRule,
    gids: Vec<u32>,
}

/// The daemon's access rules, with their groups looked up and their tokens read.
#[derive(Debug)]
pub struct AccessPolicy {
    default: DefaultAccess,
    rules: Vec<LoadedRule>,
    /// (rule name, token).
    tokens: Vec<(String, Vec<u8>)>,
    brokers: BrokerAccess,
}

/// What one subject may do.
#[derive(Clone, Copy, Debug)]
pub enum Grant<'a> {
    /// Anything.
    Anything,
    /// Nothing (`access.default = "deny"` and no rule holds the subject).
    Nothing,
    /// What a rule allows.
    Rule(&'a AccessRule),
}

impl AccessPolicy {
    /// The rules of `config`: each group looked up, each token file read (see
    /// [`crate::config::access::AccessSection::check_host`]).
    pub fn load(config: &Config) -> Result<Self, ConfigError> {
        let access = &config.access;
        let tokens = access.check_host()?;
        let rules = access
            .rules
            .iter()
            .map(|rule| LoadedRule {
                gids: rule.groups.iter().filter_map(|g| crate::sys::group_id(g).ok().flatten()).collect(),
                rule: rule.clone(),
            })
            .collect();
        Ok(Self {
            default: access.default,
            rules,
            tokens: tokens.into_iter().map(|(name, token)| (name, token.into_bytes())).collect(),
            brokers: access.brokers.clone(),
        })
    }

    /// The rule whose token `presented` is, if any. Every token is compared, each in time
    /// that depends on its length and the presented one's only.
    pub fn token(&self, presented: &[u8]) -> Option<String> {
        let mut found = None;
        for (name, token) in &self.tokens {
            if constant_time_eq(presented, token) {
                found = Some(name.clone());
            }
        }
        found
    }

    /// What `subject` may do.
    pub fn grant(&self, subject: &Subject) -> Grant<'_> {
        let rule = match subject {
            Subject::OperatorToken => return Grant::Anything,
            Subject::Unauthenticated => return Grant::Nothing,
            Subject::Local { uid: Some(_), gid, groups } => self.rules.iter().find(|r| {
                r.gids.iter().any(|g| Some(*g) == *gid || groups.iter().any(|group| group.gid == *g))
            }),
            Subject::Local { uid: None, .. } => None,
            Subject::Token { rule } => self.rules.iter().find(|r| r.rule.name == *rule),
            Subject::Broker { transport, .. } => {
                let name = self.brokers.iter().into_iter().find(|(t, _)| t == transport).and_then(|(_, n)| n);
                name.and_then(|name| self.rules.iter().find(|r| r.rule.name == *name))
            }
        };
        match (rule, self.default) {
            (Some(r), _) => Grant::Rule(&r.rule),
            (None, DefaultAccess::Allow) => Grant::Anything,
            (None, DefaultAccess::Deny) => Grant::Nothing,
        }
    }
}

impl<'a> Grant<'a> {
    /// The name of its rule.
    pub fn rule(&self) -> Option<&'a str> {
        match self {
            Self::Rule(rule) => Some(&rule.name),
            _ => None,
        }
    }

    /// Refuses a subject that may do nothing.
    pub fn check_any(&self, subject: &Subject) -> Result<(), AccessDenied> {
        match self {
            Self::Nothing => Err(AccessDenied::NoRule { subject: subject.to_string() }),
            _ => Ok(()),
        }
    }

    /// Checks what `request` names against the rule and makes it the rule's: its forced
    /// clause ANDed to the filter, its byte and packet caps as the limits a request leaves
    /// out. Returns the daemon's `policy` narrowed to the rule: its interfaces, destinations,
    /// and a default duration within its cap.
    pub fn narrow(
        &self,
        subject: &Subject,
        request: &mut CaptureRequest,
        policy: &Policy,
    ) -> Result<Policy, AccessDenied> {
        self.check_any(subject)?;
        let Self::Rule(rule) = self else { return Ok(policy.clone()) };
        let mut narrowed = policy.clone();
        if !rule.interfaces.is_empty() {
            let allowed = |(alias, device): &(String, String)| {
                rule.interfaces.iter().any(|name| name == alias || name == device)
            };
            for name in &request.interfaces {
                if let Some(interface) = policy.interface(name)
                    && !allowed(interface)
                {
                    return Err(AccessDenied::Interface {
                        rule: rule.name.clone(),
                        interface: name.clone(),
                        allowed: rule.interfaces.join(", "),
                    });
                }
            }
            narrowed.interfaces.retain(allowed);
        }
        if !rule.destinations.is_empty() && narrowed.destinations.is_some() {
            narrowed.destinations = Some(rule.destinations.clone());
        }
        if let Some(max) = rule.max_duration_secs {
            let max = max as f64;
            narrowed.defaults.duration_secs =
                Some(narrowed.defaults.duration_secs.map_or(max, |d| d.min(max)));
        }
        request.bytes = request.bytes.or(rule.max_bytes);
        request.packets = request.packets.or(rule.max_packets);
        if let Some(clause) = &rule.forced_filter {
            request.filter = Some(match request.filter.as_deref().map(str::trim).filter(|f| !f.is_empty()) {
                Some(theirs) if !balanced(theirs) => {
                    return Err(AccessDenied::Unbalanced { rule: rule.name.clone() });
                }
                Some(theirs) => format!("({theirs}) and ({clause})"),
                None => clause.clone(),
            });
        }
        Ok(narrowed)
    }

    /// Refuses a completed request (defaults filled in) above the rule's caps.
    pub fn check_caps(&self, request: &CaptureRequest) -> Result<(), AccessDenied> {
        let Self::Rule(rule) = self else { return Ok(()) };
        let checks = [
            (
                "duration (s)",
                request.duration_secs.map(|d| d.ceil() as u64),
                "max_duration_secs",
                rule.max_duration_secs,
            ),
            ("byte limit", request.bytes, "max_bytes", rule.max_bytes),
            ("packet limit", request.packets, "max_packets", rule.max_packets),
        ];
        for (what, asked, field, limit) in checks {
            if let (Some(asked), Some(limit)) = (asked, limit)
                && asked > limit
            {
                return Err(AccessDenied::Cap { rule: rule.name.clone(), what, asked, field, limit });
            }
        }
        Ok(())
    }

    /// Refuses one more capture when `running` of the rule's run already.
    pub fn check_concurrent(&self, running: usize) -> Result<(), AccessDenied> {
        let Self::Rule(rule) = self else { return Ok(()) };
        match rule.max_concurrent_captures {
            Some(limit) if running >= limit => Err(AccessDenied::Cap {
                rule: rule.name.clone(),
                what: "concurrent captures",
                asked: running as u64 + 1,
                field: "max_concurrent_captures",
                limit: limit as u64,
            }),
            _ => Ok(()),
        }
    }

    /// Whether it may see capture `id`, started under `owner`'s rule.
    pub fn may_read(&self, subject: &Subject, id: &str, owner: Option<&str>) -> Result<(), AccessDenied> {
        self.check_any(subject)?;
        match self {
            Self::Rule(rule) if !rule.may_read_others && owner != Some(&rule.name) => {
                Err(AccessDenied::NotOwner {
                    rule: rule.name.clone(),
                    action: "see",
                    id: id.to_owned(),
                    permission: "may_read_others",
                })
            }
            _ => Ok(()),
        }
    }

    /// Whether it may stop capture `id`, started under `owner`'s rule.
    pub fn may_stop(&self, subject: &Subject, id: &str, owner: Option<&str>) -> Result<(), AccessDenied> {
        self.check_any(subject)?;
        match self {
            Self::Rule(rule) if !rule.may_stop_others && owner != Some(&rule.name) => {
                Err(AccessDenied::NotOwner {
                    rule: rule.name.clone(),
                    action: "stop",
                    id: id.to_owned(),
                    permission: "may_stop_others",
                })
            }
            _ => Ok(()),
        }
    }

    /// A destination refused by the narrowed policy, as the rule's refusal (`None`: the
    /// daemon's own refusal stands).
    pub fn destination_refused(&self, asked: &str) -> Option<AccessDenied> {
        match self {
            Self::Rule(rule) if !rule.destinations.is_empty() => Some(AccessDenied::Destination {
                rule: rule.name.clone(),
                asked: asked.to_owned(),
                allowed: rule.destinations.join(", "),
            }),
            _ => None,
        }
    }
}

/// Whether `presented` equals `secret`, in time that depends only on their lengths, never on
/// where they differ.
pub fn constant_time_eq(presented: &[u8], secret: &[u8]) -> bool {
    let mut diff = u8::from(presented.len() != secret.len());
    for (i, s) in secret.iter().enumerate() {
        diff |= s ^ presented.get(i).copied().unwrap_or(!s);
    }
    // The compiler may not turn this into an early exit: the OR over every byte is one value.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{CapturePlan, PlanError};

    fn config(extra: &str) -> Config {
        let text = format!(
            "[interfaces.public]\ndevice = \"eth1\"\n[interfaces.private]\ndevice = \"eth2\"\n\
             [store]\ndestinations = [\"/srv/caps\", \"/srv/other\"]\n{extra}"
        );
        Config::parse(&text, std::path::Path::new("test.toml")).unwrap()
    }

    const TEAM_A: &str = "[[access.rules]]\nname = \"team-a\"\ngroups = [\"root\"]\ninterfaces = [\"public\"]\n\
                          destinations = [\"/srv/caps/team-a\"]\nmax_duration_secs = 30\nmax_bytes = 1000000\n\
                          forced_filter = \"net 10.20.0.0/16\"\n";

    fn root() -> Subject {
        Subject::Local { uid: Some(0), gid: Some(0), groups: vec![] }
    }

    #[test]
    fn the_default_policy_allows_anything() {
        let access = AccessPolicy::load(&config("")).unwrap();
        assert!(matches!(access.grant(&root()), Grant::Anything));
        let broker = Subject::Broker { transport: "redis", message_id: Some("r1".into()) };
        assert!(matches!(access.grant(&broker), Grant::Anything));
        assert!(matches!(access.grant(&Subject::Unauthenticated), Grant::Nothing));
        let deny = AccessPolicy::load(&config("[access]\ndefault = \"deny\"\n")).unwrap();
        let err = deny.grant(&root()).check_any(&root()).unwrap_err().to_string();
        assert!(err.contains("access.default is \"deny\"") && err.contains("uid 0"), "{err}");
    }

    #[test]
    fn a_rule_narrows_the_policy_and_names_itself_when_it_refuses() {
        let config = config(TEAM_A);
        let access = AccessPolicy::load(&config).unwrap();
        let policy = Policy::daemon(&config, "node");
        let grant = access.grant(&root());
        assert_eq!(grant.rule(), Some("team-a"));
        let mut request = CaptureRequest { interfaces: vec!["private".into()], ..Default::default() };
        let err = grant.narrow(&root(), &mut request, &policy).unwrap_err().to_string();
        assert_eq!(
            err,
            "access rule \"team-a\" does not allow interface \"private\" (access.rules.team-a.interfaces: public)"
        );
        let mut request = CaptureRequest { filter: Some("tcp port 80".into()), ..Default::default() };
        let narrowed = grant.narrow(&root(), &mut request, &policy).unwrap();
        assert_eq!(request.filter.as_deref(), Some("(tcp port 80) and (net 10.20.0.0/16)"));
        assert_eq!(request.bytes, Some(1_000_000));
        assert_eq!(narrowed.interfaces, [("public".to_owned(), "eth1".to_owned())]);
        assert_eq!(narrowed.defaults.duration_secs, Some(30.0));
        let compile = |e: &str| crate::filter::CbpfProgram::compile(e);
        let plan = CapturePlan::resolve(request.clone(), &narrowed, 0, compile).unwrap();
        assert_eq!(plan.destination.as_deref(), Some("/srv/caps/team-a"));
        assert!(grant.check_caps(&plan.request).is_ok());
        let long = CaptureRequest { duration_secs: Some(31.0), ..request.clone() };
        let plan = CapturePlan::resolve(long, &narrowed, 0, compile).unwrap();
        let err = grant.check_caps(&plan.request).unwrap_err().to_string();
        assert_eq!(
            err,
            "duration (s) 31 exceeds access rule \"team-a\"'s access.rules.team-a.max_duration_secs = 30"
        );
        let elsewhere = CaptureRequest { destination: Some("/srv/other".into()), ..request };
        match CapturePlan::resolve(elsewhere, &narrowed, 0, compile) {
            Err(PlanError::DestinationNotAllowed { asked, .. }) => {
                let err = grant.destination_refused(&asked).unwrap().to_string();
                assert!(err.contains("team-a") && err.contains("/srv/other"), "{err}");
            }
            other => panic!("{other:?}"),
        }
        // A filter that would reach out of its parentheses is refused.
        let mut sneaky = CaptureRequest { filter: Some("tcp) or (udp".into()), ..Default::default() };
        let err = grant.narrow(&root(), &mut sneaky, &policy).unwrap_err();
        assert!(matches!(err, AccessDenied::Unbalanced { .. }), "{err}");
        // Others' captures.
        assert!(grant.may_stop(&root(), "x", Some("team-a")).is_ok());
        let err = grant.may_stop(&root(), "x", None).unwrap_err().to_string();
        assert!(err.contains("may_stop_others") && err.contains("team-a"), "{err}");
        assert!(grant.may_read(&root(), "x", Some("team-b")).is_err());
    }

    #[test]
    fn brokers_get_their_transports_rule() {
        let config =
            config(&format!("[access]\ndefault = \"deny\"\n[access.brokers]\nnats = \"team-a\"\n{TEAM_A}"));
        let access = AccessPolicy::load(&config).unwrap();
        let nats = Subject::Broker { transport: "nats", message_id: None };
        let redis = Subject::Broker { transport: "redis", message_id: None };
        assert_eq!(access.grant(&nats).rule(), Some("team-a"));
        assert!(matches!(access.grant(&redis), Grant::Nothing));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret1", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"\0", b""));
    }
}
