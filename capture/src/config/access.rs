//! `[access]` and `[audit]`: who may capture what, and the record of every request.
//!
//! The sections are parsed and checked here, with the rest of the file; what the rules mean
//! for a request is in [`crate::request::access`], the audit log in `control::audit`.

use std::{io::Read as _, os::unix::fs::PermissionsExt as _, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, invalid};
use crate::filter::{CaptureFilter, CbpfProgram, program::Instructions};

/// What a client that no access rule holds may do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAccess {
    /// Anything, as when there were no access rules.
    #[default]
    Allow,
    /// Nothing: every request is refused.
    Deny,
}

/// `[access]`: who may capture what.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessSection {
    /// What a client no rule holds may do: `"allow"` anything (as before access rules) or `"deny"` everything. The holder of `daemon.token_file`'s token may always do anything.
    pub default: DefaultAccess,
    /// Access rules (`[[access.rules]]`), in order: a local user is held to the first whose `groups` hold one of the groups of the connection; a TCP client to the rule whose token it presents.
    pub rules: Vec<AccessRule>,
    /// The rule broker requests are held to, by transport (`[access.brokers]`).
    pub brokers: BrokerAccess,
}

/// `[[access.rules]]`: what the clients one rule holds may do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessRule {
    /// Its name, in refusals, captures' owners and the audit log (1 to 64 letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// Unix groups, by name, whose members it holds (the connection's primary or supplementary groups, as its credentials carry them).
    pub groups: Vec<String>,
    /// File holding a bearer token of the TCP API (`daemon.tcp_listen`) that stands for this rule; only its owner, and its group if so chosen, may read it (mode 600 or 640).
    pub token_file: Option<PathBuf>,
    /// Interfaces (aliases or devices) it may capture on; empty: all.
    pub interfaces: Vec<String>,
    /// Destinations it may store into, each one of `store.destinations` or a place under one, the first its default; empty: those of the store.
    pub destinations: Vec<String>,
    /// Longest capture, in seconds (also its default duration when shorter than `defaults.duration_secs`); none: `limits.max_duration_secs`.
    pub max_duration_secs: Option<u64>,
    /// Most frame bytes one capture may store; a request that names no byte limit gets this one; none: `limits.max_bytes`.
    pub max_bytes: Option<u64>,
    /// Most frames one capture may store; a request that names no packet limit gets this one; none: `limits.max_packets`.
    pub max_packets: Option<u64>,
    /// Most captures of this rule running at once; none: `limits.max_concurrent_captures` (for all rules together).
    pub max_concurrent_captures: Option<usize>,
    /// A tcpdump filter clause ANDed to every request's filter, `(theirs) and (this)` (this alone when a request has none), so that only its frames are stored (e.g. `net 10.20.0.0/16`).
    pub forced_filter: Option<String>,
    /// Whether it may stop captures others started.
    pub may_stop_others: bool,
    /// Whether it may see captures others started (list, status, wait: their filters, places and summaries).
    pub may_read_others: bool,
}

/// `[access.brokers]`: the rule (by name) each broker's requests are held to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerAccess {
    /// The rule requests from `[fleet.redis]`'s requests stream are held to; none: `access.default`.
    pub redis: Option<String>,
    /// The rule requests from `[fleet.nats]` are held to; none: `access.default`.
    pub nats: Option<String>,
    /// The rule pcapdaemon messages (`fleet.redis.pcapdaemon_channel`) are held to; none: `access.default`.
    pub pcapdaemon: Option<String>,
}

/// `[audit]`: the record of every request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSection {
    /// File the audit log is appended to, one JSON line per start, refusal, stop, wait and read (with who asked, what, what was decided and why), each on disk before the answer; default: `audit.jsonl` in `daemon.state_dir`.
    pub path: Option<PathBuf>,
    /// Size past which the file is rotated: renamed `<path>.1`, the older ones `.2`, `.3`...
    pub max_bytes: u64,
    /// Rotated files kept (the oldest beyond are deleted).
    pub keep: usize,
}

impl Default for AuditSection {
    fn default() -> Self {
        Self { path: None, max_bytes: 100 << 20, keep: 10 }
    }
}

/// Longest rule name.
const MAX_RULE_NAME: usize = 64;
/// Smallest `audit.max_bytes`: a few lines.
const MIN_AUDIT_BYTES: u64 = 4096;

impl AuditSection {
    /// The file the audit log goes to.
    pub fn file(&self, config: &Config) -> PathBuf {
        self.path.clone().unwrap_or_else(|| config.daemon.state_dir.join("audit.jsonl"))
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(invalid("audit.path", "must be an absolute path"));
        }
        if self.max_bytes < MIN_AUDIT_BYTES {
            return Err(invalid("audit.max_bytes", format!("must be at least {MIN_AUDIT_BYTES}")));
        }
        if self.keep == 0 {
            return Err(invalid("audit.keep", "must be at least 1"));
        }
        Ok(())
    }
}

impl AccessRule {
    /// The dotted name of one of its fields in messages: `access.rules.<name>.<field>`.
    pub fn field(&self, name: &str) -> String {
        format!("access.rules.{}.{name}", self.name)
    }
}

impl AccessSection {
    /// The rule of this name.
    pub fn rule(&self, name: &str) -> Option<&AccessRule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// Checks the rules against the rest of the file: names, interfaces, destinations, caps,
    /// filters, the brokers' rules. What the host must have (the groups, the token files) is
    /// checked by [`AccessSection::check_host`].
    pub(super) fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.name.is_empty()
                || rule.name.len() > MAX_RULE_NAME
                || !rule.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(invalid(
                    format!("access.rules[{i}].name"),
                    format!("{:?}: use 1 to {MAX_RULE_NAME} letters, digits, '.', '_' or '-'", rule.name),
                ));
            }
            if !names.insert(&rule.name) {
                return Err(invalid(rule.field("name"), "another rule has this name"));
            }
            for group in &rule.groups {
                if !valid_group_name(group) {
                    return Err(invalid(rule.field("groups"), format!("{group:?} is not a group name")));
                }
            }
            if rule.token_file.is_some() && config.daemon.tcp_listen.is_none() {
                return Err(invalid(
                    rule.field("token_file"),
                    "a token is presented on the TCP API: set daemon.tcp_listen",
                ));
            }
            for name in &rule.interfaces {
                if !config.interfaces.iter().any(|(alias, i)| alias == name || i.device == *name) {
                    let configured: Vec<&str> = config.interfaces.keys().map(String::as_str).collect();
                    return Err(invalid(
                        rule.field("interfaces"),
                        format!(
                            "no interface {name:?} is configured (configured: {})",
                            configured.join(", ")
                        ),
                    ));
                }
            }
            for destination in &rule.destinations {
                if !config.store.destinations.iter().any(|base| under(destination, base)) {
                    return Err(invalid(
                        rule.field("destinations"),
                        format!(
                            "{destination:?} is not one of store.destinations ({}) nor under one",
                            config.store.destinations.join(", ")
                        ),
                    ));
                }
            }
            let l = &config.limits;
            for (field, value, limit) in [
                ("max_duration_secs", rule.max_duration_secs, l.max_duration_secs),
                ("max_bytes", rule.max_bytes, l.max_bytes),
                ("max_packets", rule.max_packets, l.max_packets),
                (
                    "max_concurrent_captures",
                    rule.max_concurrent_captures.map(|n| n as u64),
                    l.max_concurrent_captures as u64,
                ),
            ] {
                match value {
                    Some(0) => return Err(invalid(rule.field(field), "must be at least 1")),
                    Some(v) if v > limit => {
                        return Err(invalid(
                            rule.field(field),
                            format!("{v} is above limits.{field} = {limit}"),
                        ));
                    }
                    _ => {}
                }
            }
            if let Some(clause) = &rule.forced_filter {
                check_clause(clause).map_err(|m| invalid(rule.field("forced_filter"), m))?;
            }
        }
        for (transport, name) in self.brokers.iter() {
            if let Some(name) = name
                && self.rule(name).is_none()
            {
                return Err(invalid(
                    format!("access.brokers.{transport}"),
                    format!("no access rule is named {name:?}"),
                ));
            }
        }
        Ok(())
    }

    /// What the host must have for the rules: each group, and each token file (readable by
    /// its owner and group only, not empty, each token its own). Returns the tokens, by rule.
    /// `check-config` and the daemon's start call it.
    pub fn check_host(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let mut tokens: Vec<(String, String)> = Vec::new();
        for rule in &self.rules {
            for group in &rule.groups {
                match crate::sys::group_id(group) {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        return Err(invalid(rule.field("groups"), format!("no group named {group:?} here")));
                    }
                    Err(e) => {
                        return Err(invalid(
                            rule.field("groups"),
                            format!("cannot look up group {group:?}: {e}"),
                        ));
                    }
                }
            }
            if let Some(path) = &rule.token_file {
                let token = read_token_file(path).map_err(|m| invalid(rule.field("token_file"), m))?;
                if let Some((other, _)) = tokens.iter().find(|(_, t)| *t == token) {
                    return Err(invalid(
                        rule.field("token_file"),
                        format!("holds the same token as rule {other:?}'s: give each rule its own"),
                    ));
                }
                tokens.push((rule.name.clone(), token));
            }
        }
        Ok(tokens)
    }
}

impl BrokerAccess {
    /// (transport, rule name).
    pub fn iter(&self) -> [(&'static str, Option<&String>); 3] {
        [
            ("redis", self.redis.as_ref()),
            ("nats", self.nats.as_ref()),
            ("pcapdaemon", self.pcapdaemon.as_ref()),
        ]
    }
}

/// A group name as `groupadd` takes it.
fn valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-$".contains(&b))
}

/// Whether `place` is `base` or a place under it (a path or URL prefix, by whole segments).
pub fn under(place: &str, base: &str) -> bool {
    let (place, base) = (place.trim_end_matches('/'), base.trim_end_matches('/'));
    !place.split('/').any(|part| part == ".." || part == ".")
        && (place == base || (place.starts_with(base) && place[base.len()..].starts_with('/')))
}

/// A forced clause: it compiles, and runs in the kernel; its parentheses balance.
fn check_clause(clause: &str) -> Result<(), String> {
    if clause.trim().is_empty() {
        return Err("is empty: leave it out for no forced clause".into());
    }
    if !balanced(clause) {
        return Err(format!("{clause:?}: its parentheses do not balance"));
    }
    let program = CbpfProgram::compile(clause).map_err(|e| crate::report::chain(&e))?;
    Instructions::build(&[CaptureFilter { slot: 0, filter: Some(&program) }])
        .map_err(|e| crate::report::chain(&e))?;
    Ok(())
}

/// Whether every `(` of `expression` is closed by a later `)` and no `)` closes nothing: a
/// clause that cannot reach out of its own parentheses.
pub fn balanced(expression: &str) -> bool {
    let mut depth = 0usize;
    for c in expression.chars() {
        match c {
            '(' => depth += 1,
            ')' => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            _ => {}
        }
    }
    depth == 0
}

/// Reads a bearer token file: refused when others may read it (the mode of the file opened,
/// not of the path), or empty. The message never holds the token.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let shown = path.display();
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mode =
        file.metadata().map_err(|e| format!("cannot read {shown}: {e}"))?.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(format!(
            "{shown} has mode {mode:04o}: other users may read it; allow its owner only (chmod 600 {shown}), \
             or its group too (chmod 640 {shown})"
        ));
    }
    let mut token = String::new();
    file.read_to_string(&mut token).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(format!("{shown} is empty"));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[daemon]\ntcp_listen = \"127.0.0.1:9\"\ntoken_file = \"/t\"\n\
                        [interfaces.public]\ndevice = \"eth1\"\n[interfaces.private]\ndevice = \"eth2\"\n\
                        [store]\ndestinations = [\"/srv/caps\", \"s3://bucket/taps\"]\n";

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{BASE}{extra}"), std::path::Path::new("test.toml"))
    }

    #[test]
    fn a_two_team_policy_parses() {
        let config = parse(
            "[access]\ndefault = \"deny\"\n\
             [[access.rules]]\nname = \"team-a\"\ngroups = [\"team-a\"]\ninterfaces = [\"public\"]\n\
             destinations = [\"s3://bucket/taps/team-a\"]\nmax_duration_secs = 600\nforced_filter = \"net 10.20.0.0/16\"\n\
             [[access.rules]]\nname = \"siem\"\ntoken_file = \"/etc/tapstream/tokens/siem\"\nmay_read_others = true\n\
             [access.brokers]\nredis = \"siem\"\n[audit]\nmax_bytes = 1048576\n",
        )
        .unwrap();
        assert_eq!(config.access.default, DefaultAccess::Deny);
        assert_eq!(config.access.rules.len(), 2);
        assert!(config.access.rule("siem").unwrap().may_read_others);
        assert_eq!(config.access.brokers.redis.as_deref(), Some("siem"));
        assert_eq!(config.audit.file(&config), PathBuf::from("/var/lib/tapstream/audit.jsonl"));
    }

    #[test]
    fn bad_rules_name_their_field() {
        for (extra, field) in [
            ("[[access.rules]]\nname = \"a b\"\n", "access.rules[0].name"),
            ("[[access.rules]]\nname = \"a\"\n[[access.rules]]\nname = \"a\"\n", "access.rules.a.name"),
            ("[[access.rules]]\nname = \"a\"\ngroups = [\"bad group\"]\n", "access.rules.a.groups"),
            ("[[access.rules]]\nname = \"a\"\ninterfaces = [\"eth9\"]\n", "access.rules.a.interfaces"),
            (
                "[[access.rules]]\nname = \"a\"\ndestinations = [\"/srv/other\"]\n",
                "access.rules.a.destinations",
            ),
            (
                "[[access.rules]]\nname = \"a\"\ndestinations = [\"/srv/caps/../x\"]\n",
                "access.rules.a.destinations",
            ),
            ("[[access.rules]]\nname = \"a\"\nmax_duration_secs = 0\n", "access.rules.a.max_duration_secs"),
            ("[[access.rules]]\nname = \"a\"\nmax_packets = 1000000000000\n", "access.rules.a.max_packets"),
            ("[[access.rules]]\nname = \"a\"\nforced_filter = \"net\"\n", "access.rules.a.forced_filter"),
            (
                "[[access.rules]]\nname = \"a\"\nforced_filter = \"tcp) or (udp\"\n",
                "access.rules.a.forced_filter",
            ),
            ("[access.brokers]\nnats = \"nobody\"\n", "access.brokers.nats"),
            ("[audit]\nmax_bytes = 10\n", "audit.max_bytes"),
            ("[audit]\nkeep = 0\n", "audit.keep"),
            ("[audit]\npath = \"audit.jsonl\"\n", "audit.path"),
        ] {
            let err = parse(extra).unwrap_err().to_string();
            assert!(err.starts_with(field), "{extra:?}: {err}");
        }
        let text =
            "[interfaces.public]\ndevice = \"eth1\"\n[[access.rules]]\nname = \"a\"\ntoken_file = \"/t\"\n";
        let err = Config::parse(text, std::path::Path::new("t.toml")).unwrap_err().to_string();
        assert!(err.starts_with("access.rules.a.token_file") && err.contains("tcp_listen"), "{err}");
    }

    #[test]
    fn missing_groups_and_token_files_others_may_read_are_refused_by_field() {
        let config =
            parse("[[access.rules]]\nname = \"a\"\ngroups = [\"no-such-group-tapstream\"]\n").unwrap();
        let err = config.access.check_host().unwrap_err().to_string();
        assert!(err.starts_with("access.rules.a.groups") && err.contains("no group named"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "t0ken-a\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config =
            parse(&format!("[[access.rules]]\nname = \"a\"\ntoken_file = \"{}\"\n", path.display())).unwrap();
        let err = config.access.check_host().unwrap_err().to_string();
        assert!(err.starts_with("access.rules.a.token_file") && err.contains("0644"), "{err}");
        assert!(!err.contains("t0ken-a"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(config.access.check_host().unwrap(), [("a".to_owned(), "t0ken-a".to_owned())]);
        let missing = parse("[[access.rules]]\nname = \"a\"\ntoken_file = \"/nonexistent/token\"\n").unwrap();
        let err = missing.access.check_host().unwrap_err().to_string();
        assert!(err.starts_with("access.rules.a.token_file") && err.contains("cannot read"), "{err}");
    }

    #[test]
    fn the_readmes_two_team_example_is_valid() {
        let readme = include_str!("../../../README.md");
        let section = &readme[readme.find("### Access:").expect("the README's access section")..];
        let start = section.find("```toml\n").expect("its example") + "```toml\n".len();
        let text = &section[start..start + section[start..].find("```").unwrap()];
        let config = Config::parse(text, std::path::Path::new("README.md")).unwrap();
        let names: Vec<&str> = config.access.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["team-a", "team-b", "soc", "fleet"]);
        assert_eq!(config.access.default, DefaultAccess::Deny);
        assert_eq!(config.access.brokers.redis.as_deref(), Some("fleet"));
    }

    #[test]
    fn places_under_a_destination_are_whole_segments() {
        assert!(under("s3://b/taps/team-a", "s3://b/taps"));
        assert!(under("s3://b/taps/", "s3://b/taps"));
        assert!(!under("s3://b/tapsx", "s3://b/taps"));
        assert!(!under("s3://b/taps/../x", "s3://b/taps"));
        assert!(balanced("(a) and (b or (c))"));
        assert!(!balanced("a) or (b"));
        assert!(!balanced("(a"));
    }
}
