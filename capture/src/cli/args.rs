//! The command line: every subcommand and flag, and the parsers of their values.

use std::{path::PathBuf, time::Duration};

use crate::{
    config::InterfaceSection,
    datapath::xdp::AttachMode,
    store::settings::{StoreSettings, check_tag},
};
use clap::{Args, Parser, Subcommand};

use crate::request::CaptureRequest;

/// High-rate packet capture: tcpdump filters in XDP, AF_XDP rings, zstd, S3.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Capture from an interface until the first limit, into a local PCAP file or a store
    /// (`capture -i IF ...`, no daemon needed); or ask the daemon (`capture start|list|
    /// status|stop|wait`).
    Capture(Box<CaptureCli>),
    /// Run the daemon: attach to the configured interfaces and take capture requests on the
    /// control socket.
    Daemon(DaemonArgs),
    /// Check a daemon configuration file: exit 0 if it is valid, else name the wrong field.
    CheckConfig {
        /// The configuration file.
        file: PathBuf,
    },
    /// Write stored frames as PCAP or pcapng to stdout (for `tshark -r -`) or a file: of one object
    /// (a key ending in .pcap.zst or .pcap), or of every capture under a prefix that the
    /// selectors match, merged in timestamp order and filtered; only the zstd frames in the
    /// time window are fetched, with ranged GETs.
    Read(Box<ReadArgs>),
    /// List the captures under a prefix (s3://bucket/prefix or a local store directory) that
    /// the selectors match, from the catalog kept beside their objects.
    Ls(Box<LsArgs>),
    /// tcpdump filter expressions.
    #[command(subcommand)]
    Filter(FilterCommand),
    /// The fleet through its broker (`[fleet.redis]` or `[fleet.nats]`): the live nodes, captures on many
    /// nodes at once.
    #[command(subcommand)]
    Fleet(FleetCommand),
}

#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// The live nodes: their labels, interfaces and running captures.
    Nodes(FleetNodesArgs),
    /// Publish a capture request for the nodes the target matches; print its id, or with
    /// `--wait` follow each node's answer until every node that took it is done.
    Capture(Box<FleetCaptureArgs>),
}

/// Where the fleet's broker is.
#[derive(Args, Debug)]
pub struct BrokerArgs {
    /// The broker is Redis: redis://[user[:password]@]host:port[/db] or unix:///path
    /// (default: the environment's TAPSTREAM_REDIS, else the `[fleet.redis]` url of the
    /// configuration file).
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// The broker is NATS JetStream: nats://host:port (default: the environment's
    /// TAPSTREAM_NATS, else the `[fleet.nats]` url of the configuration file; credentials from
    /// TAPSTREAM_NATS_USER and TAPSTREAM_NATS_PASSWORD, or TAPSTREAM_NATS_TOKEN).
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// A daemon configuration file whose `[fleet.redis]` (else `[fleet.nats]`) names the
    /// broker and its streams (default: /etc/tapstream/tapstream.toml if it exists).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FleetNodesArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
}

#[derive(Args, Debug)]
pub struct FleetCaptureArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Only the node of this name.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Only the nodes whose whole name matches this regular expression.
    #[arg(long = "nodes", value_name = "REGEX")]
    pub node_regex: Option<String>,
    /// Only the nodes with this label (repeatable: all of them).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Nodes refuse the request after this time (RFC 3339 or Unix seconds).
    #[arg(long, value_name = "TIME", value_parser = parse_time, conflicts_with = "deadline")]
    pub not_after: Option<u64>,
    /// Nodes refuse the request this long after it is published (default 60s).
    #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration)]
    pub deadline: Option<Duration>,
    /// Where each node stores it: one of its destinations, a place under one, or `local`.
    #[arg(long, value_name = "URL")]
    pub destination: Option<String>,
    /// Follow the nodes' answers until the deadline has passed (or every live node the
    /// target matches has answered) and every node that took it is done; exit non-zero if
    /// one refused or failed.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub request: RequestArgs,
}

/// A `KEY=VALUE` label of a fleet target.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("a label is KEY=VALUE, not {s:?}"))?;
    if k.is_empty() {
        return Err(format!("a label needs a key: {s:?}"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

#[derive(Args, Debug)]
pub struct CaptureArgs {
    /// PCAP (or with --format pcapng, pcapng) file to write (nanosecond timestamps).
    #[arg(
        short,
        long,
        value_name = "FILE.pcap",
        required_unless_present = "upload",
        conflicts_with = "upload"
    )]
    pub write: Option<PathBuf>,
    /// The format of the --write file: pcap, or pcapng (its interface named node/device, with
    /// the filter, and the drops in the statistics at the end).
    #[arg(long, value_enum, default_value_t = FileFormat::Pcap)]
    pub format: FileFormat,
    /// Store the capture as compressed objects: `s3://bucket/prefix` or a local directory.
    #[arg(long, value_name = "URL")]
    pub upload: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub objects: ObjectArgs,
    /// XDP attach mode.
    #[arg(long, default_value_t = AttachMode::Auto)]
    pub xdp_mode: AttachMode,
    /// AF_XDP zero-copy: auto (try, then copy), required, off.
    #[arg(long, value_enum, default_value = "auto")]
    pub zero_copy: ZeroCopyArg,
    /// UMEM frame size: 2048 or 4096 (longer frames are cut and counted).
    #[arg(long, default_value_t = InterfaceSection::default().frame_size_bytes, value_parser = parse_frame_size)]
    pub frame_size: u32,
    /// Back the UMEM with base pages only (by default: huge pages where the host has them).
    #[arg(long)]
    pub no_huge_pages: bool,
    /// Entries of each socket's RX and fill rings (a power of two, 64 to 2^20). The UMEM holds half as
    /// many frames, all lent to the kernel: that is how many frames a queue buffers while its
    /// writer is busy (memory per queue: ring size / 2 x frame size, 16 MiB by default).
    #[arg(long, default_value_t = InterfaceSection::default().ring_size, value_parser = parse_ring_size)]
    pub ring_size: u32,
    /// RX queues to capture (default: all the device has).
    #[arg(long)]
    pub queues: Option<u32>,
    /// Cores to pin the writers to, one per queue in order (e.g. 2,3).
    #[arg(long, value_delimiter = ',')]
    pub cores: Vec<usize>,
    /// After a writer finds only a few frames, it waits this long for more before the next
    /// look at its ring: fewer wakeups per frame at moderate rates, at the cost of latency.
    /// The ring holds frames meanwhile; full batches are taken without waiting.
    #[arg(long, value_name = "TIME", default_value = "1ms", value_parser = humantime::parse_duration)]
    pub batch_wait: Duration,
    /// Drop the frames no capture wants instead of passing them to the kernel stack.
    #[arg(long)]
    pub drop_unmatched: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics while the capture runs (e.g.
    /// 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub request: RequestArgs,
}

/// What a capture asks, the same for the one-shot and for the daemon.
#[derive(Args, Debug)]
pub struct RequestArgs {
    /// Interface: the device (one-shot), or an alias or device the daemon is configured with.
    /// The daemon takes several (repeat it): one capture over all of them, its limits on the sum.
    #[arg(short, long = "iface", value_name = "IF")]
    pub interface: Vec<String>,
    /// Stop after this many frames.
    #[arg(short = 'c', long, value_name = "N")]
    pub packets: Option<u64>,
    /// Stop before the stored frame bytes exceed this (suffixes K, M, G, KiB, MiB, GiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub bytes: Option<u64>,
    /// Stop after this long (e.g. 30s, 5m, 1h).
    #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this long without a frame.
    #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration)]
    pub idle: Option<Duration>,
    /// Begin this long before the start, from the interface's history (daemon interfaces
    /// with a `lookback` section), then continue live.
    #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration)]
    pub lookback: Option<Duration>,
    /// Bytes stored per frame at most (default 262144).
    #[arg(short, long)]
    pub snaplen: Option<u32>,
    /// Capture id, for summaries and object names (default: `capture` for the one-shot, a
    /// generated one for the daemon).
    #[arg(long)]
    pub id: Option<String>,
    /// A tag stored in each object's metadata as x-amz-meta-tag-KEY (repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// The alert that asked for this capture, stored in the objects' metadata.
    #[arg(long, value_name = "ID")]
    pub alert_id: Option<String>,
    /// The id of the request this capture answers (a ticket, an outside system's request),
    /// kept in the catalog's manifest.
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
    /// The customer the capture is for, stored in the objects' metadata (and as their
    /// `customer` tag).
    #[arg(long)]
    pub customer: Option<String>,
    /// Retention class, stored as the objects' `retention` tag for lifecycle rules that expire
    /// by tag (default for the daemon: `[store] retention`).
    #[arg(long, value_name = "CLASS")]
    pub retention: Option<String>,
    /// Also send the capture, when it ends, to this CloudShark appliance of the daemon's
    /// configuration (its `[cloudshark.NAME]` name or its `cloudshark://host` URL).
    #[arg(long, value_name = "NAME")]
    pub cloudshark: Option<String>,
    /// tcpdump filter expression, as tcpdump takes it (the remaining words, e.g.
    /// `tcp port 443 and net 10.0.0.0/8`); none captures every frame. It runs in the kernel:
    /// frames it rejects never leave it.
    #[arg(value_name = "EXPR", trailing_var_arg = true)]
    pub filter: Vec<String>,
}

impl RequestArgs {
    /// The filter expression: the remaining words, joined; none if they are blank.
    pub fn filter(&self) -> Option<String> {
        let filter = self.filter.join(" ");
        (!filter.trim().is_empty()).then_some(filter)
    }

    /// The request these flags make, as the HTTP API takes it.
    pub fn request(&self, destination: Option<String>) -> CaptureRequest {
        CaptureRequest {
            id: self.id.clone(),
            interfaces: self.interface.clone(),
            filter: self.filter(),
            snaplen: self.snaplen,
            packets: self.packets,
            bytes: self.bytes,
            duration_secs: self.duration.map(|d| d.as_secs_f64()),
            idle_timeout_secs: self.idle.map(|d| d.as_secs_f64()),
            lookback_secs: self.lookback.map(|d| d.as_secs_f64()),
            tags: self.tags.iter().cloned().collect(),
            customer: self.customer.clone(),
            alert_id: self.alert_id.clone(),
            request_id: self.request_id.clone(),
            retention: self.retention.clone(),
            destination,
            cloudshark: self.cloudshark.clone(),
        }
    }
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CaptureCli {
    #[command(subcommand)]
    pub action: Option<CaptureAction>,
    #[command(flatten)]
    pub oneshot: CaptureArgs,
}

#[derive(Subcommand, Debug)]
pub enum CaptureAction {
    /// Ask the daemon for a capture.
    Start(Box<StartArgs>),
    /// Every capture the daemon knows, newest first.
    List(ClientArgs),
    /// One capture: state, progress, and its summary once ended.
    Status(IdArgs),
    /// End a running capture; its output is finished as for any other end.
    Stop(IdArgs),
    /// Wait for a capture to end, then print its summary.
    Wait(IdArgs),
}

#[derive(Args, Debug)]
pub struct StartArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Where to store it: one of the daemon's destinations, a place under one, or `local`
    /// (default: the daemon's first destination).
    #[arg(long, value_name = "URL")]
    pub destination: Option<String>,
    /// Wait for the capture to end, with a live progress line on a terminal, then print its
    /// summary.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub request: RequestArgs,
}

#[derive(Args, Debug)]
pub struct ClientArgs {
    /// The daemon's control socket.
    #[arg(long, env = "TAPSTREAM_SOCKET", default_value = "/run/tapstream/control.sock")]
    pub socket: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct IdArgs {
    /// The capture id.
    pub id: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Configuration file.
    #[arg(long, value_name = "FILE", default_value = "/etc/tapstream/tapstream.toml")]
    pub config: PathBuf,
}

/// How to reach an S3-compatible store. Credentials come from the AWS default chain
/// (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, web identity, IMDSv2).
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Endpoint of an S3-compatible store (e.g. http://127.0.0.1:3900); default: AWS.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Region (default: from the environment or profile).
    #[arg(long)]
    s3_region: Option<String>,
    /// Path-style addressing (endpoint/bucket/key), which most S3-compatible stores need.
    #[arg(long)]
    s3_path_style: bool,
    /// Endpoint of Google Cloud Storage for gs:// (e.g. an emulator's http://127.0.0.1:4443);
    /// default: Google's. With it and no key file, requests carry no credentials.
    #[arg(long, value_name = "URL")]
    gcs_endpoint: Option<String>,
    /// Service-account JSON key file for gs:// (default: Application Default Credentials).
    #[arg(long, value_name = "FILE")]
    gcs_key_file: Option<std::path::PathBuf>,
    /// Server-side encryption: AES256 or aws:kms.
    #[arg(long, value_name = "ALG")]
    pub sse: Option<String>,
    /// KMS key id for --sse aws:kms.
    #[arg(long, value_name = "ID")]
    pub sse_kms_key_id: Option<String>,
    /// Storage class (e.g. STANDARD_IA).
    #[arg(long)]
    pub storage_class: Option<String>,
    /// Canned ACL (e.g. bucket-owner-full-control).
    #[arg(long)]
    pub acl: Option<String>,
    /// Requests to the store at once (so HTTP connections) at most.
    #[arg(long, value_name = "N", default_value_t = StoreSettings::default().max_connections)]
    s3_max_connections: usize,
}

/// How objects are cut, compressed and uploaded.
#[derive(Args, Debug, Clone)]
pub struct ObjectArgs {
    /// Multipart part size (at least 5MiB).
    #[arg(long, value_name = "SIZE", default_value = "8MiB", value_parser = parse_bytes)]
    pub part_size: u64,
    /// Parts uploading at once at most.
    #[arg(long, value_name = "N", default_value_t = StoreSettings::default().parts_in_flight)]
    pub parts_in_flight: usize,
    /// Start a new object past this size.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_bytes)]
    pub rotate_size: u64,
    /// Start a new object when the open one is this old.
    #[arg(long, value_name = "TIME", default_value = "5m", value_parser = humantime::parse_duration)]
    pub rotate_age: Duration,
    /// Compression: `auto` (zstd, faster levels down to -5 while chunks queue up for compression,
    /// stronger up to 6 while none waits), a zstd level (1-19), or `none`.
    #[arg(long, value_name = "LEVEL", default_value_t = StoreSettings::default().compression)]
    pub compression: String,
    /// Compression threads (they run off the writers' cores).
    #[arg(long, value_name = "N", default_value_t = StoreSettings::default().compress_threads)]
    pub compress_threads: usize,
    /// Directory where chunks wait while the store is unreachable (one subdirectory per
    /// capture); what an earlier run left there is uploaded on start.
    #[arg(long, value_name = "DIR", default_value_os_t = StoreSettings::default().spool_dir)]
    pub spool_dir: PathBuf,
    /// Bytes one capture may spool at most; beyond, frames are dropped and counted.
    #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = parse_bytes)]
    pub spool_max: u64,
    /// Compressed chunks held in memory while the store is slow; more go to the spool.
    #[arg(long, value_name = "N", default_value_t = StoreSettings::default().upload_queue)]
    pub upload_queue: usize,
    /// How long the store may stay unreachable before the capture fails.
    #[arg(long, value_name = "TIME", default_value = "1h", value_parser = humantime::parse_duration)]
    pub outage_max: Duration,
    /// This host's name in object keys (default: the hostname).
    #[arg(long)]
    pub node: Option<String>,
    /// Object key template: {prefix}, {node}, {capture}, {start}, {seq}, {ext}.
    #[arg(long, default_value_t = StoreSettings::default().key_template)]
    pub key_template: String,
    /// Send no object tags (customer, retention class): for a store that refuses them.
    #[arg(long)]
    pub no_tagging: bool,
}

#[derive(Subcommand, Debug)]
pub enum FilterCommand {
    /// Compile EXPR with libpcap, print its classic BPF as `tcpdump -d` does, and with a
    /// capture file, which of its frames match (libpcap's interpreter).
    Check {
        /// The filter, in tcpdump syntax.
        expression: String,
        /// A PCAP file of Ethernet frames to try the filter on.
        file: Option<PathBuf>,
    },
    /// The daemon's filter compiler: compiles the expression on stdin with libpcap and writes
    /// the program, or libpcap's message, to stdout (see `filter::compiler`).
    #[command(name = "compile-child", hide = true)]
    CompileChild,
}

#[derive(Args, Debug)]
pub struct ReadArgs {
    /// What to read. A URL or key ending in `.pcap.zst` or `.pcap` is one object:
    /// s3://bucket/key, or a key under --dir. Anything else is a prefix (s3://bucket/prefix,
    /// or a local store directory, or with --dir a prefix under it): every capture its catalog
    /// lists that the selectors match, across nodes, merged in timestamp order.
    pub url: String,
    /// A tcpdump filter (the last words, after every option, as tcpdump takes them), run on
    /// each frame by libpcap's own interpreter; a prefix only.
    #[arg(value_name = "EXPR", trailing_var_arg = true)]
    pub filter: Vec<String>,
    /// Local store directory the key or prefix is relative to (instead of S3).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Write the frames to FILE instead of stdout (`-w -`: stdout).
    #[arg(short = 'w', long = "write", value_name = "FILE")]
    pub write: Option<PathBuf>,
    /// The file format: pcap (the records as stored), or pcapng (one interface per node and
    /// interface, named node/interface, with each capture's filter and drop count, and a
    /// comment naming the captures, requests and alerts read).
    #[arg(long, value_enum, default_value_t = FileFormat::Pcap)]
    pub format: FileFormat,
    /// Ranged GETs in flight at once.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub in_flight: u16,
    /// Print the summary as JSON (on stderr).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Which captures (`ls`, and `read` of a prefix); a capture is chosen if it matches them all.
#[derive(Args, Debug, Clone, Default)]
pub struct SelectArgs {
    /// Frames at or after TIME: RFC 3339 (2026-11-24T01:02:03Z), Unix seconds, or a time ago
    /// as tcpdump and stenoread users write it (10m, 2h, 1d, 1h30m, "5m ago").
    #[arg(long, value_name = "TIME", value_parser = parse_window_time)]
    pub since: Option<u64>,
    /// Frames at or before TIME (the same forms).
    #[arg(long, value_name = "TIME", value_parser = parse_window_time)]
    pub until: Option<u64>,
    /// Captures of the nodes whose name this regular expression matches.
    #[arg(long, value_name = "REGEX")]
    pub node: Option<String>,
    /// Captures for this customer.
    #[arg(long, value_name = "NAME")]
    pub customer: Option<String>,
    /// Captures asked for by this alert.
    #[arg(long, value_name = "ID")]
    pub alert_id: Option<String>,
    /// Captures with this tag (repeat: all of them).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// The capture with this id.
    #[arg(long, value_name = "ID")]
    pub capture: Option<String>,
}

impl SelectArgs {
    /// Whether any selector besides the window is given.
    pub fn selects(&self) -> bool {
        self.node.is_some()
            || self.customer.is_some()
            || self.alert_id.is_some()
            || !self.tags.is_empty()
            || self.capture.is_some()
    }
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// The store: s3://bucket/prefix or a local store directory.
    pub url: String,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Print JSON (every manifest whole).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// A time of a window: what [`parse_time`] takes, or a time ago (`10m`, `2h`, `1d`, `5m ago`),
/// as ns since the Unix epoch.
pub fn parse_window_time(s: &str) -> Result<u64, String> {
    let ago = s.trim().strip_suffix("ago").map(str::trim_end).unwrap_or(s.trim());
    if ago.ends_with(|c: char| c.is_ascii_alphabetic()) && !ago.contains(['-', ':']) {
        let d = humantime::parse_duration(ago).map_err(|e| format!("not a time ago ({e}): {s}"))?;
        let now = crate::sys::unix_now_ns();
        return Ok(now.saturating_sub(d.as_nanos().min(u128::from(u64::MAX)) as u64));
    }
    parse_time(s)
}

/// A time as ns since the Unix epoch: RFC 3339 or (fractional) Unix seconds.
pub fn parse_time(s: &str) -> Result<u64, String> {
    // Unix seconds with up to nine decimals, exactly (a float would round nanoseconds).
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if !int.is_empty() && int.bytes().all(|b| b.is_ascii_digit()) && frac.bytes().all(|b| b.is_ascii_digit())
    {
        if frac.len() > 9 {
            return Err(format!("at most nine decimals (nanoseconds): {s}"));
        }
        let secs: u64 = int.parse().map_err(|_| format!("not a time: {s}"))?;
        let nanos: u64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<9}").parse().map_err(|_| format!("not a time: {s}"))?
        };
        return secs
            .checked_mul(1_000_000_000)
            .and_then(|n| n.checked_add(nanos))
            .ok_or_else(|| format!("too late: {s}"));
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| format!("not a time ({e}): {s}"))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH).map_err(|_| format!("before 1970: {s}"))?.as_nanos() as u64)
}

impl StoreArgs {
    /// The store settings these flags give (the rest at their defaults).
    pub fn settings(&self) -> StoreSettings {
        StoreSettings {
            s3_endpoint: self.s3_endpoint.clone(),
            s3_region: self.s3_region.clone(),
            s3_path_style: self.s3_path_style,
            gcs_endpoint: self.gcs_endpoint.clone(),
            gcs_key_file: self.gcs_key_file.clone(),
            sse: self.sse.clone(),
            sse_kms_key_id: self.sse_kms_key_id.clone(),
            storage_class: self.storage_class.clone(),
            acl: self.acl.clone(),
            max_connections: self.s3_max_connections,
            ..StoreSettings::default()
        }
    }

    pub fn s3(&self, bucket: String) -> crate::store::s3::S3Config {
        self.settings().s3(bucket)
    }
}

/// The format of a capture file written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FileFormat {
    #[default]
    Pcap,
    Pcapng,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ZeroCopyArg {
    Auto,
    Required,
    Off,
}

/// A `KEY=VALUE` tag, checked as every tag is ([`check_tag`]).
pub fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("a tag is KEY=VALUE, not {s:?}"))?;
    check_tag(k, v)
}

/// A ring size, checked as the configuration file's `ring_size` is.
pub fn parse_ring_size(s: &str) -> Result<u32, String> {
    s.parse::<u32>().map_err(|_| format!("{s:?} is not a number")).and_then(crate::config::check_ring_size)
}

/// A frame size, checked as the configuration file's `frame_size_bytes` is.
pub fn parse_frame_size(s: &str) -> Result<u32, String> {
    s.parse::<u32>().map_err(|_| format!("{s:?} is not a number")).and_then(crate::config::check_frame_size)
}

/// Parses a byte count with an optional unit: K/M/G are powers of 1000, KiB/MiB/GiB of 1024.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("not a byte count: {s:?}"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "k" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown byte unit {other:?} (K, M, G, KiB, MiB, GiB)")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("{s} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cli::oneshot::store_settings, datapath::xsk::ZeroCopy};

    #[test]
    fn tags_are_checked() {
        assert_eq!(parse_tag("Team=net ops"), Ok(("team".into(), "net ops".into())));
        assert!(parse_tag("no-equals").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_tag("bad key=x").unwrap_err().contains("letters, digits"));
        assert!(parse_tag("\u{fc}\u{2603}=v").unwrap_err().contains("letters, digits"));
        assert!(parse_tag("a\r\nb=v").unwrap_err().contains("\\r\\n"), "control characters are escaped");
        assert!(parse_tag("k=caf\u{e9}").unwrap_err().contains("printable ASCII"));
    }

    #[test]
    fn times_parse_exactly() {
        assert_eq!(parse_time("1795000000.123456789"), Ok(1_795_000_000_123_456_789));
        assert_eq!(parse_time("1795000000.5"), Ok(1_795_000_000_500_000_000));
        assert_eq!(parse_time("10"), Ok(10_000_000_000));
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1_000_000_000));
        assert!(parse_time("1.1234567891").is_err());
        assert!(parse_time("yesterday").unwrap_err().contains("not a time"));
    }

    #[test]
    fn window_times_take_a_time_ago_too() {
        let now = crate::sys::unix_now_ns();
        for (text, ago_secs) in [("10m", 600), ("2h", 7200), ("1d", 86_400), ("5m ago", 300), ("1h30m", 5400)]
        {
            let t = parse_window_time(text).unwrap();
            let expected = now - ago_secs * 1_000_000_000;
            // The parse reads the clock after `now`: at most a few seconds later.
            assert!((expected..expected + 5_000_000_000).contains(&t), "{text}: {t} vs {expected}");
        }
        assert_eq!(parse_window_time("1970-01-01T00:00:01Z"), Ok(1_000_000_000));
        assert_eq!(parse_window_time("10"), Ok(10_000_000_000));
        assert!(parse_window_time("10 parsecs").unwrap_err().contains("not a time ago"));
    }

    /// Each flag of the one-shot capture defaults to what the configuration file defaults to,
    /// and takes the values the file takes.
    #[test]
    fn flags_default_to_the_configuration_files_defaults() {
        let Command::Capture(cli) =
            Cli::try_parse_from(["tapstream", "capture", "-i", "eth9", "-w", "x.pcap"])
                .expect("parse")
                .command
        else {
            panic!("not a capture")
        };
        let args = cli.oneshot;
        assert_eq!(store_settings(&args), StoreSettings::default());
        let file = InterfaceSection::default();
        assert_eq!(
            (args.ring_size, args.frame_size, args.batch_wait, args.queues, &args.cores, args.xdp_mode),
            (
                file.ring_size,
                file.frame_size_bytes,
                Duration::from_micros(file.batch_wait_us),
                file.queues,
                &file.cores,
                file.attach
            )
        );
        assert!(matches!((args.zero_copy, file.zero_copy), (ZeroCopyArg::Auto, ZeroCopy::Auto)));
        // The one difference, on purpose: the one-shot passes frames no capture wants on to the
        // host's stack (it may run on a host whose traffic it must not cut); a tap host's
        // daemon drops them.
        assert!(!args.drop_unmatched && file.drop_unmatched);

        for (flag, value, ok) in [
            ("--ring-size", "1048576", true),
            ("--ring-size", "1000", false),
            ("--frame-size", "3000", false),
        ] {
            let parsed =
                Cli::try_parse_from(["tapstream", "capture", "-i", "eth9", "-w", "x.pcap", flag, value]);
            assert_eq!(parsed.is_ok(), ok, "{flag} {value}");
        }
    }

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("123"), Ok(123));
        assert_eq!(parse_bytes("10M"), Ok(10_000_000));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert!(parse_bytes("12 parsecs").unwrap_err().contains("unknown byte unit"));
        assert!(parse_bytes("x").is_err());
    }
}
