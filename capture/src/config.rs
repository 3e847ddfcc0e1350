//! The daemon's configuration file (TOML): `tapstream daemon --config FILE`.
//!
//! Every field has a default; the doc comments here are the configuration reference (the
//! README's table is checked against them by a test). [`Config::load`] parses and validates;
//! errors name the file and the field (`interfaces.public.ring_size: ...`).

pub mod access;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    datapath::{
        capture::DEFAULT_SNAPLEN, lookback::LookbackConfig, pipeline::InterfaceConfig, xdp::AttachMode,
        xsk::ZeroCopy,
    },
    filter::{CaptureFilter, CbpfProgram, FilterError, program::Instructions},
    store::{cloudshark::CloudSharkSection, settings::StoreSettings},
};
use access::{AccessSection, AuditSection};

/// Errors in a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, an unknown field or a value of the wrong type; `message` names the field
    /// and the line.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value out of range; `field` is its dotted path.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

/// A UMEM frame size, in bytes: 2048 or 4096 (the file's `frame_size_bytes`, the CLI's
/// `--frame-size`).
pub fn check_frame_size(bytes: u32) -> Result<u32, String> {
    if [2048, 4096].contains(&bytes) { Ok(bytes) } else { Err(format!("{bytes} is not 2048 or 4096")) }
}

/// Entries of a socket's RX and fill rings: a power of two from 64 to 2^20 (the file's
/// `ring_size`, the CLI's `--ring-size`).
pub fn check_ring_size(entries: u32) -> Result<u32, String> {
    if entries.is_power_of_two() && (64..=1 << 20).contains(&entries) {
        Ok(entries)
    } else {
        Err(format!("{entries} is not a power of two from 64 to 1048576"))
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message: message.into() }
}

/// serde's message with the strings it quotes left out (`invalid type: string "…", expected
/// u64` becomes `invalid type: a string, expected u64`): a string in the wrong field may be a
/// secret.
fn without_strings(message: &str) -> String {
    let mut out = String::new();
    let mut rest = message;
    while let Some(at) = rest.find("string \"") {
        out.push_str(&rest[..at]);
        out.push_str("a string");
        let quoted = &rest[at + "string \"".len()..];
        let mut escaped = false;
        let end = quoted.char_indices().find(|&(_, c)| {
            let closes = c == '"' && !escaped;
            escaped = c == '\\' && !escaped;
            closes
        });
        rest = match end {
            Some((i, _)) => &quoted[i + 1..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

/// The dotted field a TOML line sets (`section.key: `), from the line's `key =` and the last
/// `[section]` above it; `None` where that does not apply (arrays over several lines).
fn field_at(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let key = lines.get(line.checked_sub(1)?)?.split_once('=')?.0.trim();
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.') {
        return None;
    }
    let section = lines[..line - 1]
        .iter()
        .rev()
        .find_map(|l| l.trim().strip_prefix('[').and_then(|l| l.strip_suffix(']')))
        .map(|s| format!("{}.", s.trim()))
        .unwrap_or_default();
    Some(format!("{section}{key}: "))
}

/// Highest `limits.max_filter_bytes`: a longer filter could not arrive in a request body.
const MAX_FILTER_BYTES: u64 = 64 * 1024;
/// Highest `limits.filter_compile_timeout_secs`.
const MAX_FILTER_COMPILE_SECS: u64 = 3600;

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The daemon itself: control socket, state, metrics.
    pub daemon: DaemonSection,
    /// Interfaces to capture from, by alias (e.g. `[interfaces.public]`): a request names the
    /// alias, so one request works on hosts whose NICs are named differently.
    pub interfaces: BTreeMap<String, InterfaceSection>,
    /// Caps on what one request may ask (a request above one is refused, naming it).
    pub limits: LimitsSection,
    /// What a request gets for what it leaves out.
    pub defaults: DefaultsSection,
    /// Where captures are stored and how objects are cut, compressed and uploaded.
    pub store: StoreSettings,
    /// Captures asked through a broker, for fleets of tap hosts (see the README's "Fleet").
    pub fleet: FleetSection,
    /// Who may capture what (see the README's "Access").
    pub access: AccessSection,
    /// The record of every request (see the README's "Access").
    pub audit: AuditSection,
    /// CloudShark appliances a capture may also be sent to, by name (e.g.
    /// `[cloudshark.lab]`; see the README's "CloudShark").
    pub cloudshark: BTreeMap<String, CloudSharkSection>,
}

/// `[fleet]`: the brokers the daemon takes capture requests from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetSection {
    /// Redis Streams; none: no requests through Redis.
    pub redis: Option<RedisSection>,
    /// NATS JetStream; none: no requests through NATS.
    pub nats: Option<NatsSection>,
}

/// `[fleet.nats]`: capture requests read from a NATS JetStream stream, events published to
/// another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSection {
    /// The server: `nats://host:port`, or `tls://host:port` for TLS. A user and password may
    /// come from the environment variables `TAPSTREAM_NATS_USER` and `TAPSTREAM_NATS_PASSWORD`,
    /// or a token from `TAPSTREAM_NATS_TOKEN`; they are never logged.
    pub url: String,
    /// With `tls://`: PEM certificates of the authorities trusted for the server's
    /// certificate; none: the system's.
    pub tls_ca_file: Option<PathBuf>,
    /// With `tls://`, for servers that verify clients: this node's certificate (PEM), with
    /// `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// The key of `tls_cert_file` (PEM). Keep it readable by the daemon only.
    pub tls_key_file: Option<PathBuf>,
    /// JetStream stream the capture requests are kept in (created when missing).
    pub requests_stream: String,
    /// Requests are published on `<requests_subject_prefix>.<node>` (for one node) or
    /// `<requests_subject_prefix>.all`; the requests stream holds `<requests_subject_prefix>.>`.
    pub requests_subject_prefix: String,
    /// JetStream stream the events are kept in (created when missing).
    pub events_stream: String,
    /// Each node publishes its events on `<events_subject_prefix>.<node>`; the events stream
    /// holds `<events_subject_prefix>.>`.
    pub events_subject_prefix: String,
    /// Each node reads through its own durable consumer, `<consumer_prefix><node>`, so every
    /// node sees every request.
    pub consumer_prefix: String,
    /// How long the requests stream keeps a request, in seconds: a stale one expires on the
    /// server.
    pub request_max_age_secs: u64,
    /// Window in which the server drops a message whose `Nats-Msg-Id` it has seen (a request
    /// or an event published twice), in seconds; at most `request_max_age_secs`.
    pub duplicate_window_secs: u64,
    /// How long the server waits for a node to acknowledge a request before it delivers it
    /// again, in seconds.
    pub ack_wait_secs: u64,
    /// Events kept while the broker is unreachable (in memory, and in
    /// `<state_dir>/fleet/nats/outbox.jsonl` so a restart loses none); beyond it the oldest
    /// are dropped (and counted).
    pub max_pending_events: usize,
    /// Messages the events stream keeps (the oldest are removed first). 0: no limit.
    pub events_max_messages: u64,
    /// Key-value bucket in which each node announces itself every 5 s (key: the node's name,
    /// expiring after 15 s without a heartbeat): what `tapstream fleet nodes` lists.
    pub nodes_bucket: String,
}

impl Default for NatsSection {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            requests_stream: "TAPSTREAM_REQUESTS".into(),
            requests_subject_prefix: "tapstream.requests".into(),
            events_stream: "TAPSTREAM_EVENTS".into(),
            events_subject_prefix: "tapstream.events".into(),
            consumer_prefix: "tapstream-".into(),
            request_max_age_secs: 3600,
            duplicate_window_secs: 120,
            ack_wait_secs: 30,
            max_pending_events: 10_000,
            events_max_messages: 100_000,
            nodes_bucket: "tapstream_nodes".into(),
        }
    }
}

/// Whether `name` may be a NATS stream, consumer or bucket name, or one token of a subject:
/// letters, digits, `-` and `_`.
pub fn nats_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `prefix` is a subject of one or more [`nats_name`] tokens joined by `.`.
fn nats_subject(prefix: &str) -> bool {
    prefix.split('.').all(nats_name)
}

/// `[fleet.redis]`: capture requests read from a Redis stream, events written to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSection {
    /// The server: `redis://[user[:password]@]host:port[/db]`, `rediss://...` for TLS, or
    /// `unix:///path/to/redis.sock`. A password may also come from the environment
    /// variable `TAPSTREAM_REDIS_PASSWORD` (and a user from `TAPSTREAM_REDIS_USERNAME`);
    /// it is never logged.
    pub url: String,
    /// With `rediss://`: PEM certificates of the authorities trusted for the server's
    /// certificate; none: the system's.
    pub tls_ca_file: Option<PathBuf>,
    /// With `rediss://`, for servers that require client certificates: this node's
    /// certificate (PEM), with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// The key of `tls_cert_file` (PEM). Keep it readable by the daemon only.
    pub tls_key_file: Option<PathBuf>,
    /// Stream the capture requests are read from.
    pub requests_stream: String,
    /// Stream the events (accepted, refused, started, finished, failed) are added to.
    pub events_stream: String,
    /// Each node reads through its own consumer group, `<group_prefix><node>`, so every node
    /// sees every request.
    pub group_prefix: String,
    /// Events kept while the broker is unreachable (in memory, and in
    /// `<state_dir>/fleet/outbox.jsonl` so a restart loses none); beyond it the oldest are
    /// dropped (and counted).
    pub max_pending_events: usize,
    /// Each node announces itself every 5 s in the key `<nodes_prefix><node>` (expiring after
    /// 15 s without a heartbeat): what `tapstream fleet nodes` lists.
    pub nodes_prefix: String,
    /// Entries the events stream keeps, about (each event is added with `MAXLEN ~`): older
    /// ones are trimmed. 0: never trimmed.
    pub events_max_len: u64,
    /// A pub/sub channel whose messages are capture requests in pcapdaemon's format (e.g.
    /// `capture`, pcapdaemon's default), for fleets moving from pcapdaemon; their events go to
    /// `events_stream`. Pub/sub delivers a message only to the nodes connected when it is
    /// published. Empty: not subscribed.
    pub pcapdaemon_channel: String,
}

impl Default for RedisSection {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            requests_stream: "tapstream:requests".into(),
            events_stream: "tapstream:events".into(),
            group_prefix: "tapstream-".into(),
            max_pending_events: 10_000,
            nodes_prefix: "tapstream:nodes:".into(),
            events_max_len: 100_000,
            pcapdaemon_channel: String::new(),
        }
    }
}

impl NatsSection {
    /// Checks the section; an error names the field (without the section's path).
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let Some((scheme, rest)) = self.url.split_once("://") else {
            return Err(("url", "must be nats://host:port or tls://host:port".into()));
        };
        if !matches!(scheme, "nats" | "tls") || rest.is_empty() || rest.contains(['/', '?', ' ']) {
            return Err(("url", "must be nats://host:port or tls://host:port".into()));
        }
        let tls_files = [
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ];
        if scheme != "tls"
            && let Some((field, _)) = tls_files.iter().find(|(_, f)| f.is_some())
        {
            return Err((field, "is for a tls:// url only".into()));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(("tls_key_file", "give tls_cert_file and tls_key_file together".into()));
        }
        for (field, name) in [
            ("requests_stream", &self.requests_stream),
            ("events_stream", &self.events_stream),
            ("nodes_bucket", &self.nodes_bucket),
        ] {
            if !nats_name(name) {
                return Err((field, "must be letters, digits, - and _ only".into()));
            }
        }
        if self.requests_stream == self.events_stream {
            return Err(("events_stream", "must differ from requests_stream".into()));
        }
        if !self.consumer_prefix.is_empty() && !nats_name(&self.consumer_prefix) {
            return Err(("consumer_prefix", "must be letters, digits, - and _ only".into()));
        }
        for (field, prefix) in [
            ("requests_subject_prefix", &self.requests_subject_prefix),
            ("events_subject_prefix", &self.events_subject_prefix),
        ] {
            if !nats_subject(prefix) {
                return Err((field, "must be tokens of letters, digits, - and _, joined by .".into()));
            }
        }
        let (a, b) = (&self.requests_subject_prefix, &self.events_subject_prefix);
        if a == b || a.starts_with(&format!("{b}.")) || b.starts_with(&format!("{a}.")) {
            return Err(("events_subject_prefix", "must not overlap requests_subject_prefix".into()));
        }
        if self.request_max_age_secs == 0 {
            return Err(("request_max_age_secs", "must be at least 1".into()));
        }
        if self.duplicate_window_secs == 0 || self.duplicate_window_secs > self.request_max_age_secs {
            return Err((
                "duplicate_window_secs",
                format!(
                    "{} is not from 1 to request_max_age_secs = {}",
                    self.duplicate_window_secs, self.request_max_age_secs
                ),
            ));
        }
        if self.ack_wait_secs == 0 {
            return Err(("ack_wait_secs", "must be at least 1".into()));
        }
        if self.max_pending_events == 0 {
            return Err(("max_pending_events", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// `[daemon]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonSection {
    /// Unix socket of the control API (HTTP and JSON). Whoever may open it may start
    /// captures, within what their access rule allows (`[access]`).
    pub socket: PathBuf,
    /// Group that owns the socket (its members may start captures); none: the daemon's.
    pub socket_group: Option<String>,
    /// Permissions of the socket, in octal.
    pub socket_mode: String,
    /// Also serve the control API over TCP at this address (e.g. `127.0.0.1:9465`); every
    /// request must then carry `Authorization: Bearer <token>`.
    pub tcp_listen: Option<String>,
    /// File holding the bearer token for `tcp_listen` (required with it unless access rules
    /// have token files; never put the token in this file); its holder may do anything. Only its owner, and its group if so chosen, may read it (mode 600 or
    /// 640): a file others may read is refused at start.
    pub token_file: Option<PathBuf>,
    /// Directory where the state of captures is kept, so it survives a restart.
    pub state_dir: PathBuf,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (e.g. `127.0.0.1:9464`).
    pub metrics_listen: Option<String>,
    /// This host's name in object keys and metadata; default: the hostname.
    pub node: Option<String>,
    /// Labels of this host (e.g. `{ site = "fra1", role = "edge" }`): a fleet request whose
    /// target names labels is for the hosts that have all of them.
    pub labels: BTreeMap<String, String>,
    /// Ended captures whose state is kept (the oldest are forgotten first; their objects stay
    /// in the store).
    pub keep_finished: usize,
}

impl Default for DaemonSection {
    fn default() -> Self {
        Self {
            socket: "/run/tapstream/control.sock".into(),
            socket_group: None,
            socket_mode: "0660".into(),
            tcp_listen: None,
            token_file: None,
            state_dir: "/var/lib/tapstream".into(),
            metrics_listen: None,
            node: None,
            labels: BTreeMap::new(),
            keep_finished: 1000,
        }
    }
}

/// `[interfaces.<alias>]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InterfaceSection {
    /// The network device (e.g. `eth1`). While it is missing (at start, or removed later),
    /// the interface is absent: captures on it are refused, and it is attached when a device
    /// of that name appears.
    pub device: String,
    /// RX queues to capture; default: all the device has.
    pub queues: Option<u32>,
    /// Cores to pin the writers to, one per queue in order (wrapping); empty: unpinned.
    pub cores: Vec<usize>,
    /// XDP attach mode: `auto` (native, else generic), `native` or `generic`.
    pub attach: AttachMode,
    /// AF_XDP zero-copy: `auto` (try, then copy), `required` or `off`.
    pub zero_copy: ZeroCopy,
    /// UMEM frame size: 2048 or 4096 (longer frames are cut and counted).
    pub frame_size_bytes: u32,
    /// Back each UMEM with huge pages: reserved ones (`vm.nr_hugepages`) if enough are free,
    /// else transparent ones; base pages where neither is to be had. The log says which.
    pub huge_pages: bool,
    /// Entries of each socket's RX and fill rings (a power of two); the UMEM holds half as
    /// many frames per queue.
    pub ring_size: u32,
    /// How long a writer that found only a few frames waits for more, in microseconds.
    pub batch_wait_us: u64,
    /// Drop the frames no capture wants (`true`, usual on a tap host) instead of passing
    /// them to the kernel stack.
    pub drop_unmatched: bool,
    /// Bytes per chunk buffer.
    pub chunk_bytes: usize,
    /// Chunk buffers in all (memory: `chunk_bytes * chunk_buffers`).
    pub chunk_buffers: usize,
    /// A history of the interface's recent frames, from which a capture can start in the past (`lookback_secs`); none when left out.
    pub lookback: Option<LookbackSection>,
}

/// `[interfaces.<alias>.lookback]`: the history an interface keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LookbackSection {
    /// Bytes of memory the history may hold (compressed, when compressed); the oldest frames are evicted first.
    pub memory_bytes: u64,
    /// tcpdump filter of the frames kept; empty: every frame.
    pub filter: String,
    /// Bytes kept per frame at most.
    pub snaplen: u32,
    /// Keep the history zstd-compressed (a fast level, on a thread of its own): a longer horizon for the memory.
    pub compress: bool,
    /// A local directory where chunks evicted from memory are kept, for a longer horizon (emptied when the daemon starts); empty: none.
    pub dir: String,
    /// Bytes the history may take in `dir`; the oldest files are deleted first.
    pub dir_bytes: u64,
}

impl Default for LookbackSection {
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            filter: String::new(),
            snaplen: 262_144,
            compress: true,
            dir: String::new(),
            dir_bytes: 10 << 30,
        }
    }
}

impl LookbackSection {
    /// The data path's settings, the filter compiled.
    pub fn pipeline(&self) -> Result<LookbackConfig, FilterError> {
        let filter = match self.filter.trim() {
            "" => None,
            expression => {
                let program = CbpfProgram::compile(expression)?;
                Instructions::build(&[CaptureFilter { slot: 0, filter: Some(&program) }])?;
                Some(program)
            }
        };
        let disk = (!self.dir.is_empty()).then(|| (PathBuf::from(&self.dir), self.dir_bytes));
        Ok(LookbackConfig {
            memory_bytes: self.memory_bytes,
            filter,
            snaplen: self.snaplen,
            compress: self.compress,
            disk,
        })
    }
}

impl Default for InterfaceSection {
    /// The data path's own defaults ([`InterfaceConfig::new`]), but for `drop_unmatched`: a
    /// tap host's daemon drops what no capture wants (the one-shot passes it on, since it may
    /// run on a host whose traffic it must not cut).
    fn default() -> Self {
        let path = InterfaceConfig::new("");
        Self {
            device: String::new(),
            queues: path.queues,
            cores: path.cores,
            attach: path.attach,
            zero_copy: path.xsk.zero_copy,
            frame_size_bytes: path.xsk.frame_size,
            huge_pages: path.xsk.huge_pages,
            ring_size: path.xsk.rx_ring_size,
            batch_wait_us: path.writer.coalesce.as_micros() as u64,
            drop_unmatched: true,
            chunk_bytes: path.chunk_bytes,
            chunk_buffers: path.chunk_buffers,
            lookback: None,
        }
    }
}

/// `[limits]`: server-side caps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Longest duration a request may ask, in seconds.
    pub max_duration_secs: u64,
    /// Most frame bytes a request may ask to store.
    pub max_bytes: u64,
    /// Most frames a request may ask to store.
    pub max_packets: u64,
    /// Most captures running at once (on all interfaces; at most 64 per interface).
    pub max_concurrent_captures: usize,
    /// Largest snaplen a request may ask.
    pub max_snaplen: u32,
    /// Longest filter expression a request may give, in bytes (at most 65536, the API's body
    /// cap). libpcap's optimizer slows steeply with length (minutes for a few hundred hosts);
    /// 8 KiB admits hand-written filters and lists of a few hundred hosts or ports.
    pub max_filter_bytes: u64,
    /// Longest a request's filter may take to compile, in seconds (1 to 3600); past it the
    /// compile, which runs in a process of its own, is killed and the request refused.
    pub filter_compile_timeout_secs: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_duration_secs: 3600,
            max_bytes: 10_000_000_000,
            max_packets: 100_000_000,
            max_concurrent_captures: 16,
            max_snaplen: DEFAULT_SNAPLEN,
            max_filter_bytes: 8 * 1024,
            filter_compile_timeout_secs: 10,
        }
    }
}

/// `[defaults]`: what a request gets for what it leaves out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DefaultsSection {
    /// Bytes stored per frame.
    pub snaplen: u32,
    /// Duration of a capture that names no duration, in seconds (every capture is bounded).
    pub duration_secs: u64,
    /// Idle timeout of a capture that names none, in seconds; 0: none.
    pub idle_timeout_secs: u64,
}

impl Default for DefaultsSection {
    fn default() -> Self {
        Self { snaplen: DEFAULT_SNAPLEN, duration_secs: 60, idle_timeout_secs: 0 }
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text` (read from `path`, for messages).
    pub fn parse(text: &str, path: &std::path::Path) -> Result<Self, ConfigError> {
        // toml's own message quotes the offending line, which may hold a secret someone put
        // in the file; the position and the reason are enough.
        let config: Config = toml::from_str(text).map_err(|e| {
            let position = e.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}: {}", field_at(text, line).unwrap_or_default())
            });
            ConfigError::Parse {
                path: path.to_owned(),
                message: format!("{}{}", position.unwrap_or_default(), without_strings(e.message())),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; the error names the first field that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.daemon;
        if d.socket.as_os_str().is_empty() {
            return Err(invalid("daemon.socket", "must be a path"));
        }
        u32::from_str_radix(d.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "daemon.socket_mode",
                    format!("{:?} is not an octal mode such as \"0660\"", d.socket_mode),
                )
            })?;
        if d.tcp_listen.is_some()
            && d.token_file.is_none()
            && self.access.rules.iter().all(|r| r.token_file.is_none())
        {
            return Err(invalid(
                "daemon.token_file",
                "is required with daemon.tcp_listen, unless access rules have token files (the TCP API needs \
                 a bearer token)",
            ));
        }
        if let Some(addr) = &d.tcp_listen {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|e| invalid("daemon.tcp_listen", format!("{addr:?}: {e}")))?;
        }
        if let Some(addr) = &d.metrics_listen {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|e| invalid("daemon.metrics_listen", format!("{addr:?}: {e}")))?;
        }
        if self.interfaces.is_empty() {
            return Err(invalid(
                "interfaces",
                "at least one interface is needed, e.g. [interfaces.capture] device = \"eth1\"",
            ));
        }
        let mut devices = std::collections::HashSet::new();
        for (alias, i) in &self.interfaces {
            let field = |name: &str| format!("interfaces.{alias}.{name}");
            if i.device.is_empty() {
                return Err(invalid(field("device"), "is required (the network device, e.g. \"eth1\")"));
            }
            if !devices.insert(&i.device) {
                return Err(invalid(
                    field("device"),
                    format!("{} is already captured under another alias", i.device),
                ));
            }
            check_frame_size(i.frame_size_bytes).map_err(|m| invalid(field("frame_size_bytes"), m))?;
            check_ring_size(i.ring_size).map_err(|m| invalid(field("ring_size"), m))?;
            if i.queues == Some(0) {
                return Err(invalid(field("queues"), "must be at least 1"));
            }
            if i.chunk_bytes < 64 * 1024 || i.chunk_buffers < 2 {
                return Err(invalid(field("chunk_bytes"), "chunks need at least 64 KiB each and 2 buffers"));
            }
            if let Some(lookback) = &i.lookback {
                if lookback.memory_bytes < 1 << 20 {
                    return Err(invalid(field("lookback.memory_bytes"), "must be at least 1048576 (1 MiB)"));
                }
                if !lookback.dir.is_empty() && !std::path::Path::new(&lookback.dir).is_absolute() {
                    return Err(invalid(field("lookback.dir"), "must be an absolute path"));
                }
                if !lookback.dir.is_empty() && lookback.dir_bytes < 1 << 20 {
                    return Err(invalid(field("lookback.dir_bytes"), "must be at least 1048576 (1 MiB)"));
                }
                if lookback.snaplen == 0 {
                    return Err(invalid(field("lookback.snaplen"), "must be at least 1"));
                }
                lookback
                    .pipeline()
                    .map_err(|e| invalid(field("lookback.filter"), crate::report::chain(&e)))?;
            }
        }
        let l = &self.limits;
        if l.max_concurrent_captures == 0 || l.max_concurrent_captures > capture_common::MAX_CAPTURES {
            return Err(invalid(
                "limits.max_concurrent_captures",
                format!("{} is not from 1 to {}", l.max_concurrent_captures, capture_common::MAX_CAPTURES),
            ));
        }
        if l.max_snaplen == 0 {
            return Err(invalid("limits.max_snaplen", "must be at least 1"));
        }
        if !(1..=MAX_FILTER_BYTES).contains(&l.max_filter_bytes) {
            return Err(invalid(
                "limits.max_filter_bytes",
                format!("{} is not from 1 to {MAX_FILTER_BYTES}", l.max_filter_bytes),
            ));
        }
        if !(1..=MAX_FILTER_COMPILE_SECS).contains(&l.filter_compile_timeout_secs) {
            return Err(invalid(
                "limits.filter_compile_timeout_secs",
                format!("{} is not from 1 to {MAX_FILTER_COMPILE_SECS}", l.filter_compile_timeout_secs),
            ));
        }
        let def = &self.defaults;
        if def.snaplen == 0 || def.snaplen > l.max_snaplen {
            return Err(invalid(
                "defaults.snaplen",
                format!("{} is not from 1 to limits.max_snaplen = {}", def.snaplen, l.max_snaplen),
            ));
        }
        if def.duration_secs == 0 || def.duration_secs > l.max_duration_secs {
            return Err(invalid(
                "defaults.duration_secs",
                format!(
                    "{} is not from 1 to limits.max_duration_secs = {}",
                    def.duration_secs, l.max_duration_secs
                ),
            ));
        }
        if let Some(r) = &self.fleet.redis {
            let scheme = r.url.split_once("://").map(|(s, _)| s);
            if !matches!(scheme, Some("redis" | "rediss" | "unix" | "redis+unix")) {
                return Err(invalid(
                    "fleet.redis.url",
                    "must start with redis://, rediss:// (TLS), unix:// or redis+unix://",
                ));
            }
            let tls_files = [
                ("tls_ca_file", &r.tls_ca_file),
                ("tls_cert_file", &r.tls_cert_file),
                ("tls_key_file", &r.tls_key_file),
            ];
            if scheme != Some("rediss")
                && let Some((field, _)) = tls_files.iter().find(|(_, f)| f.is_some())
            {
                return Err(invalid(format!("fleet.redis.{field}"), "is for a rediss:// url only"));
            }
            if r.tls_cert_file.is_some() != r.tls_key_file.is_some() {
                return Err(invalid(
                    "fleet.redis.tls_key_file",
                    "give tls_cert_file and tls_key_file together",
                ));
            }
            for (field, value) in
                [("requests_stream", &r.requests_stream), ("events_stream", &r.events_stream)]
            {
                if value.is_empty() {
                    return Err(invalid(format!("fleet.redis.{field}"), "must name a stream"));
                }
            }
            if r.requests_stream == r.events_stream {
                return Err(invalid("fleet.redis.events_stream", "must differ from requests_stream"));
            }
            if r.nodes_prefix.is_empty() || r.nodes_prefix.contains(['*', '?', '[', ']', '\\']) {
                return Err(invalid("fleet.redis.nodes_prefix", "must be non-empty, without * ? [ ] \\"));
            }
            if r.max_pending_events == 0 {
                return Err(invalid("fleet.redis.max_pending_events", "must be at least 1"));
            }
        }
        if let Some(n) = &self.fleet.nats {
            n.validate().map_err(|(field, message)| invalid(format!("fleet.nats.{field}"), message))?;
            if let Some(node) = &self.daemon.node
                && !nats_name(node)
            {
                return Err(invalid(
                    "daemon.node",
                    "with [fleet.nats], must be letters, digits, - and _ only (it is a subject token)",
                ));
            }
        }
        self.store.validate().map_err(|(field, message)| invalid(format!("store.{field}"), message))?;
        for (name, c) in &self.cloudshark {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(invalid(format!("cloudshark.{name}"), "name it with letters, digits, - and _"));
            }
            c.validate()
                .map_err(|(field, message)| invalid(format!("cloudshark.{name}.{field}"), message))?;
        }
        self.access.validate(self)?;
        self.audit.validate()
    }

    /// The socket's permission bits (validated).
    pub fn socket_mode(&self) -> u32 {
        u32::from_str_radix(self.daemon.socket_mode.trim_start_matches("0o"), 8).unwrap_or(0o660)
    }
}

impl InterfaceSection {
    /// The pipeline settings for this interface.
    pub fn pipeline(&self) -> InterfaceConfig {
        let mut config = InterfaceConfig::new(&self.device);
        config.attach = self.attach;
        config.queues = self.queues;
        config.cores = self.cores.clone();
        config.xsk.frame_size = self.frame_size_bytes;
        config.xsk.zero_copy = self.zero_copy;
        config.xsk.huge_pages = self.huge_pages;
        config.xsk.set_ring_size(self.ring_size);
        config.writer.coalesce = Duration::from_micros(self.batch_wait_us);
        config.unmatched = if self.drop_unmatched {
            capture_common::Unmatched::Drop
        } else {
            capture_common::Unmatched::Pass
        };
        config.chunk_bytes = self.chunk_bytes;
        config.chunk_buffers = self.chunk_buffers;
        // Checked when the configuration was loaded; a filter that fails now keeps no history.
        config.lookback = self.lookback.as_ref().and_then(|l| match l.pipeline() {
            Ok(lookback) => Some(lookback),
            Err(e) => {
                log::error!(
                    "{}: lookback filter: {}: no history is kept",
                    self.device,
                    crate::report::chain(&e)
                );
                None
            }
        });
        config
    }
}

/// What a request asks, as the caps see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Asked {
    pub duration_secs: u64,
    pub bytes: Option<u64>,
    pub packets: Option<u64>,
    pub snaplen: u32,
    /// Length of the filter expression, in bytes (0: none).
    pub filter_bytes: u64,
    /// Captures running now.
    pub running: usize,
}

/// A request above a cap.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} {asked} exceeds the server's {cap} = {limit}")]
pub struct CapExceeded {
    pub what: &'static str,
    pub asked: u64,
    pub cap: &'static str,
    pub limit: u64,
}

impl LimitsSection {
    /// Refuses what a request asks above a cap, naming the cap.
    pub fn check(&self, asked: &Asked) -> Result<(), CapExceeded> {
        let checks = [
            ("duration (s)", Some(asked.duration_secs), "limits.max_duration_secs", self.max_duration_secs),
            ("byte limit", asked.bytes, "limits.max_bytes", self.max_bytes),
            ("packet limit", asked.packets, "limits.max_packets", self.max_packets),
            ("snaplen", Some(u64::from(asked.snaplen)), "limits.max_snaplen", u64::from(self.max_snaplen)),
            (
                "filter length (bytes)",
                Some(asked.filter_bytes),
                "limits.max_filter_bytes",
                self.max_filter_bytes,
            ),
        ];
        for (what, value, cap, limit) in checks {
            if let Some(value) = value
                && value > limit
            {
                return Err(CapExceeded { what, asked: value, cap, limit });
            }
        }
        if asked.running >= self.max_concurrent_captures {
            return Err(CapExceeded {
                what: "concurrent captures",
                asked: asked.running as u64 + 1,
                cap: "limits.max_concurrent_captures",
                limit: self.max_concurrent_captures as u64,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file's interface defaults make the data path's own defaults (but for unmatched
    /// frames, on purpose): one source of truth.
    #[test]
    fn interface_defaults_are_the_data_paths() {
        let (file, path) = (InterfaceSection::default().pipeline(), InterfaceConfig::new(""));
        assert_eq!(
            (file.xsk.frame_size, file.xsk.rx_ring_size, file.xsk.fill_ring_size, file.xsk.umem_frames),
            (path.xsk.frame_size, path.xsk.rx_ring_size, path.xsk.fill_ring_size, path.xsk.umem_frames)
        );
        assert_eq!(file.writer.coalesce, path.writer.coalesce);
        assert_eq!((file.chunk_bytes, file.chunk_buffers), (path.chunk_bytes, path.chunk_buffers));
        assert_eq!((file.queues, &file.cores, file.attach), (path.queues, &path.cores, path.attach));
        assert_eq!(file.unmatched, capture_common::Unmatched::Drop);
    }

    const EXAMPLE: &str = include_str!("../../config/tapstream.toml");

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, std::path::Path::new("test.toml"))
    }

    #[test]
    fn a_string_in_the_wrong_field_is_not_echoed() {
        let text = "[daemon]\nkeep_finished = \"AKIAEXAMPLESECRET\\\"more\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(!err.contains("AKIA") && !err.contains("more"), "{err}");
        assert!(err.contains("daemon.keep_finished") && err.contains("a string"), "{err}");
    }

    #[test]
    fn the_shipped_config_is_valid() {
        let config = parse(EXAMPLE).unwrap();
        assert!(config.interfaces.contains_key("capture"));
    }

    /// Each public field of `strukt` in `source` with its doc comment, joined into one line.
    fn documented_fields(source: &str, strukt: &str) -> Vec<(String, String)> {
        let start = source.find(&format!("pub struct {strukt} {{")).expect("struct in source");
        let body = &source[start..start + source[start..].find("\n}\n").expect("end of struct")];
        let mut out = Vec::new();
        let mut doc = Vec::new();
        for line in body.lines().skip(1).map(str::trim) {
            if let Some(d) = line.strip_prefix("///") {
                doc.push(d.trim());
            } else if let Some(field) = line.strip_prefix("pub ") {
                let name = field.split(':').next().unwrap().to_owned();
                out.push((name, doc.join(" ")));
                doc.clear();
            } else if !line.starts_with('#') {
                doc.clear();
            }
        }
        out
    }

    /// Every field of every section: its dotted path and its doc comment.
    fn all_fields() -> Vec<(String, String)> {
        let config = include_str!("config.rs");
        let settings = include_str!("store/settings.rs");
        let access = include_str!("config/access.rs");
        let mut out = Vec::new();
        for (section, source, strukt) in [
            ("daemon", config, "DaemonSection"),
            ("interfaces.<alias>", config, "InterfaceSection"),
            ("interfaces.<alias>.lookback", config, "LookbackSection"),
            ("limits", config, "LimitsSection"),
            ("defaults", config, "DefaultsSection"),
            ("store", settings, "StoreSettings"),
            ("fleet.redis", config, "RedisSection"),
            ("fleet.nats", config, "NatsSection"),
            ("access", access, "AccessSection"),
            ("access.rules", access, "AccessRule"),
            ("access.brokers", access, "BrokerAccess"),
            ("audit", access, "AuditSection"),
            ("cloudshark.<name>", include_str!("store/cloudshark.rs"), "CloudSharkSection"),
        ] {
            for (name, doc) in documented_fields(source, strukt) {
                out.push((format!("{section}.{name}"), doc));
            }
        }
        out
    }

    #[test]
    fn every_field_is_in_the_shipped_config_and_the_readme_with_its_docs() {
        let readme = include_str!("../../README.md");
        let fields = all_fields();
        // The structs as serde sees them have exactly these fields.
        let mut config = Config::default();
        config.interfaces.insert("a".into(), InterfaceSection::default());
        config.cloudshark.insert("a".into(), CloudSharkSection::default());
        let value = toml::Value::try_from(&config).unwrap();
        let count = |t: &toml::Value| t.as_table().map_or(0, |t| t.len());
        let serde_fields = ["daemon", "limits", "defaults", "store", "access", "audit"]
            .iter()
            .map(|s| count(&value[s]))
            .sum::<usize>()
            + count(&value["interfaces"]["a"])
            + count(&value["cloudshark"]["a"]);
        // Optional fields left unset are not serialized; count them from the sources.
        let unset = fields.iter().filter(|(f, _)| value_at(&value, f).is_none()).count();
        assert_eq!(serde_fields + unset, fields.len(), "every serde field has a doc comment");
        assert!(fields.len() > 40, "{fields:?}");
        for (field, doc) in fields {
            assert!(!doc.is_empty(), "{field} has no doc comment");
            let key = field.rsplit('.').next().unwrap();
            assert!(
                EXAMPLE
                    .lines()
                    .any(|l| l.trim_start_matches('#').trim_start().starts_with(&format!("{key} ="))),
                "config/tapstream.toml does not show {field}"
            );
            let row = format!("| `{field}` | {doc} |");
            assert!(readme.contains(&row), "README.md's configuration reference lacks the row\n{row}");
        }
    }

    fn value_at<'a>(value: &'a toml::Value, field: &str) -> Option<&'a toml::Value> {
        let path = field.replace("<alias>", "a").replace("<name>", "a");
        path.split('.').try_fold(value, |v, k| v.get(k))
    }

    #[test]
    fn unknown_fields_and_credentials_are_refused_by_name() {
        let err = parse("[store]\naccess_key = \"AKIA-SECRET\"\n").unwrap_err().to_string();
        assert!(err.contains("test.toml") && err.contains("access_key") && err.contains("line 2"), "{err}");
        assert!(!err.contains("AKIA-SECRET"), "the value is not echoed: {err}");
        let err = parse("[daemon]\nsocket_mode = 660\n").unwrap_err().to_string();
        assert!(err.contains("socket_mode"), "{err}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let base = "[interfaces.public]\ndevice = \"eth1\"\n";
        let cases = [
            ("[interfaces.public]\ndevice = \"eth1\"\nring_size = 1000\n", "interfaces.public.ring_size"),
            (
                "[interfaces.public]\ndevice = \"eth1\"\nframe_size_bytes = 3000\n",
                "interfaces.public.frame_size_bytes",
            ),
            ("[interfaces.public]\n", "interfaces.public.device"),
            ("[interfaces.a]\ndevice = \"eth1\"\n[interfaces.b]\ndevice = \"eth1\"\n", "interfaces.b.device"),
            ("", "interfaces"),
        ];
        for (text, field) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(field), "{text:?}: {err}");
        }
        for (extra, field) in [
            ("[daemon]\ntcp_listen = \"127.0.0.1:9\"\n", "daemon.token_file"),
            ("[daemon]\nsocket_mode = \"999\"\n", "daemon.socket_mode"),
            ("[limits]\nmax_concurrent_captures = 65\n", "limits.max_concurrent_captures"),
            ("[defaults]\nduration_secs = 7200\n", "defaults.duration_secs"),
            ("[store]\npart_size_bytes = 1000\n", "store.part_size_bytes"),
            ("[store]\ncompression = \"fast\"\n", "store.compression"),
            ("[store]\ndestinations = [\"ftp://x\"]\n", "store.destinations"),
            ("[store]\ngcs_endpoint = \"127.0.0.1:4443\"\n", "store.gcs_endpoint"),
            ("[cloudshark.lab]\nurl = \"https://cs\"\ntoken_env = \"PATH\"\n", "cloudshark.lab.url"),
            ("[cloudshark.lab]\nurl = \"cloudshark://cs\"\n", "cloudshark.lab.token_file"),
            (
                "[cloudshark.lab]\nurl = \"cloudshark://cs\"\ntoken_file = \"/nonexistent\"\n",
                "cloudshark.lab.token_file",
            ),
            ("[cloudshark.\"a b\"]\nurl = \"cloudshark://cs\"\n", "cloudshark.a b"),
        ] {
            let err = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(err.starts_with(field), "{extra:?}: {err}");
        }
    }

    #[test]
    fn the_nats_section_is_validated_by_field() {
        let base = "[interfaces.public]\ndevice = \"eth1\"\n";
        let config = parse(&format!("{base}[fleet.nats]\n")).unwrap();
        assert_eq!(config.fleet.nats, Some(NatsSection::default()));
        assert_eq!(config.fleet.redis, None);
        for (section, field) in [
            ("url = \"redis://h:1\"", "fleet.nats.url"),
            ("url = \"nats://h:1/x\"", "fleet.nats.url"),
            ("requests_stream = \"a.b\"", "fleet.nats.requests_stream"),
            ("events_stream = \"TAPSTREAM_REQUESTS\"", "fleet.nats.events_stream"),
            ("requests_subject_prefix = \"a.*\"", "fleet.nats.requests_subject_prefix"),
            ("events_subject_prefix = \"tapstream.requests.x\"", "fleet.nats.events_subject_prefix"),
            ("consumer_prefix = \"a.\"", "fleet.nats.consumer_prefix"),
            ("duplicate_window_secs = 7200", "fleet.nats.duplicate_window_secs"),
            ("ack_wait_secs = 0", "fleet.nats.ack_wait_secs"),
            ("max_pending_events = 0", "fleet.nats.max_pending_events"),
            ("nodes_bucket = \"\"", "fleet.nats.nodes_bucket"),
        ] {
            let err = parse(&format!("{base}[fleet.nats]\n{section}\n")).unwrap_err().to_string();
            assert!(err.starts_with(field), "{section:?}: {err}");
        }
        let err = parse(&format!("[daemon]\nnode = \"tap.fra1\"\n{base}[fleet.nats]\n")).unwrap_err();
        assert!(err.to_string().starts_with("daemon.node"), "{err}");
        // Both brokers at once, and a password in the URL is not echoed.
        let config =
            parse(&format!("{base}[fleet.redis]\n[fleet.nats]\nurl = \"nats://u:pw@h:4222\"\n")).unwrap();
        assert!(config.fleet.redis.is_some() && config.fleet.nats.is_some());
        let err = parse(&format!("{base}[fleet.nats]\nurl = \"nats://u:s3cret@h:4222/x\"\n")).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn caps_name_the_cap() {
        let limits = LimitsSection::default();
        let ok = Asked { duration_secs: 60, snaplen: 128, ..Default::default() };
        assert!(limits.check(&ok).is_ok());
        let err = limits.check(&Asked { duration_secs: 7200, ..ok }).unwrap_err().to_string();
        assert_eq!(err, "duration (s) 7200 exceeds the server's limits.max_duration_secs = 3600");
        let err = limits.check(&Asked { packets: Some(1 << 40), ..ok }).unwrap_err().to_string();
        assert!(err.contains("limits.max_packets"), "{err}");
        let err = limits.check(&Asked { running: 16, ..ok }).unwrap_err().to_string();
        assert!(err.contains("limits.max_concurrent_captures = 16"), "{err}");
    }

    #[test]
    fn the_filter_length_cap_is_checked_and_named() {
        let limits = LimitsSection::default();
        let ok = Asked { duration_secs: 60, snaplen: 128, ..Default::default() };
        assert!(limits.check(&Asked { filter_bytes: 8192, ..ok }).is_ok(), "the cap itself is allowed");
        let err = limits.check(&Asked { filter_bytes: 8193, ..ok }).unwrap_err().to_string();
        assert_eq!(err, "filter length (bytes) 8193 exceeds the server's limits.max_filter_bytes = 8192");
        let strict = LimitsSection { max_filter_bytes: 10, ..LimitsSection::default() };
        assert!(strict.check(&Asked { filter_bytes: 11, ..ok }).unwrap_err().to_string().contains("= 10"));
    }

    #[test]
    fn filter_limits_are_validated() {
        let base = "[interfaces.public]\ndevice = \"eth1\"\n[limits]\n";
        for (extra, field) in [
            ("max_filter_bytes = 0\n", "limits.max_filter_bytes"),
            ("max_filter_bytes = 65537\n", "limits.max_filter_bytes"),
            ("filter_compile_timeout_secs = 0\n", "limits.filter_compile_timeout_secs"),
            ("filter_compile_timeout_secs = 3601\n", "limits.filter_compile_timeout_secs"),
        ] {
            let err = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(err.starts_with(field), "{extra:?}: {err}");
        }
        let config =
            parse(&format!("{base}max_filter_bytes = 65536\nfilter_compile_timeout_secs = 1\n")).unwrap();
        assert_eq!((config.limits.max_filter_bytes, config.limits.filter_compile_timeout_secs), (65536, 1));
        let err = parse(&format!("{base}filter_compile_timeout = 5\n")).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "units in the name: {err}");
    }
}
