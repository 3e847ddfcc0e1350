//! The `tapstream` command: capture daemon and CLI.

use std::{
    io::IsTerminal as _,
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use tapstream::{
    captures::{CaptureSummary, Target, run_capture},
    config::{Config, InterfaceSection},
    control::daemon::Daemon,
    control::{CaptureInfo, CaptureRequest, CaptureState, client::Client, server},
    datapath::capture::{CaptureSpec, DEFAULT_SNAPLEN, Limits, StopReason},
    datapath::xdp::AttachMode,
    datapath::xsk::ZeroCopy,
    filter::{
        CaptureFilter, CbpfProgram, LoadedFilter,
        compiler::{self, CLI_MAX_FILTER_BYTES},
        program::Instructions,
    },
    store::{
        dir::DirSink,
        parse_object_url,
        read::read_window,
        s3::S3Sink,
        settings::{ObjectLabels, StoreSettings, check_tag, hostname, object_metadata},
    },
};

/// High-rate packet capture: tcpdump filters in XDP, AF_XDP rings, zstd, S3.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
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
    /// Write a stored capture object as PCAP to stdout (for `tshark -r -`), optionally only
    /// the frames of a time window, fetched with ranged GETs.
    Read(Box<ReadArgs>),
    /// tcpdump filter expressions.
    #[command(subcommand)]
    Filter(FilterCommand),
}

#[derive(Args, Debug)]
struct CaptureArgs {
    /// PCAP file to write (nanosecond timestamps).
    #[arg(
        short,
        long,
        value_name = "FILE.pcap",
        required_unless_present = "upload",
        conflicts_with = "upload"
    )]
    write: Option<PathBuf>,
    /// Store the capture as compressed objects: `s3://bucket/prefix` or a local directory.
    #[arg(long, value_name = "URL")]
    upload: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    objects: ObjectArgs,
    /// XDP attach mode.
    #[arg(long, default_value_t = AttachMode::Auto)]
    xdp_mode: AttachMode,
    /// AF_XDP zero-copy: auto (try, then copy), required, off.
    #[arg(long, value_enum, default_value = "auto")]
    zero_copy: ZeroCopyArg,
    /// UMEM frame size: 2048 or 4096 (longer frames are cut and counted).
    #[arg(long, default_value_t = InterfaceSection::default().frame_size_bytes, value_parser = parse_frame_size)]
    frame_size: u32,
    /// Entries of each socket's RX and fill rings (a power of two, 64 to 2^20). The UMEM holds half as
    /// many frames, all lent to the kernel: that is how many frames a queue buffers while its
    /// writer is busy (memory per queue: ring size / 2 x frame size, 16 MiB by default).
    #[arg(long, default_value_t = InterfaceSection::default().ring_size, value_parser = parse_ring_size)]
    ring_size: u32,
    /// RX queues to capture (default: all the device has).
    #[arg(long)]
    queues: Option<u32>,
    /// Cores to pin the writers to, one per queue in order (e.g. 2,3).
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// After a writer finds only a few frames, it waits this long for more before the next
    /// look at its ring: fewer wakeups per frame at moderate rates, at the cost of latency.
    /// The ring holds frames meanwhile; full batches are taken without waiting.
    #[arg(long, value_name = "TIME", default_value = "1ms", value_parser = humantime::parse_duration)]
    batch_wait: Duration,
    /// Drop the frames no capture wants instead of passing them to the kernel stack.
    #[arg(long)]
    drop_unmatched: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics while the capture runs (e.g.
    /// 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    request: RequestArgs,
}

/// What a capture asks, the same for the one-shot and for the daemon.
#[derive(Args, Debug)]
struct RequestArgs {
    /// Interface: the device (one-shot), or an alias or device the daemon is configured with.
    #[arg(short, long = "iface", value_name = "IF")]
    interface: Option<String>,
    /// Stop after this many frames.
    #[arg(short = 'c', long, value_name = "N")]
    packets: Option<u64>,
    /// Stop before the stored frame bytes exceed this (suffixes K, M, G, KiB, MiB, GiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    bytes: Option<u64>,
    /// Stop after this long (e.g. 30s, 5m, 1h).
    #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Stop after this long without a frame.
    #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration)]
    idle: Option<Duration>,
    /// Bytes stored per frame at most (default 262144).
    #[arg(short, long)]
    snaplen: Option<u32>,
    /// Capture id, for summaries and object names (default: `capture` for the one-shot, a
    /// generated one for the daemon).
    #[arg(long)]
    id: Option<String>,
    /// A tag stored in each object's metadata as x-amz-meta-tag-KEY (repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// The alert that asked for this capture, stored in the objects' metadata.
    #[arg(long, value_name = "ID")]
    alert_id: Option<String>,
    /// The customer the capture is for, stored in the objects' metadata.
    #[arg(long)]
    customer: Option<String>,
    /// tcpdump filter expression, as tcpdump takes it (the remaining words, e.g.
    /// `tcp port 443 and net 10.0.0.0/8`); none captures every frame. It runs in the kernel:
    /// frames it rejects never leave it.
    #[arg(value_name = "EXPR", trailing_var_arg = true)]
    filter: Vec<String>,
}

impl RequestArgs {
    fn filter(&self) -> Option<String> {
        let filter = self.filter.join(" ");
        (!filter.trim().is_empty()).then_some(filter)
    }
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct CaptureCli {
    #[command(subcommand)]
    action: Option<CaptureAction>,
    #[command(flatten)]
    oneshot: CaptureArgs,
}

#[derive(Subcommand, Debug)]
enum CaptureAction {
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
struct StartArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Where to store it: one of the daemon's destinations, a place under one, or `local`
    /// (default: the daemon's first destination).
    #[arg(long, value_name = "URL")]
    destination: Option<String>,
    /// Wait for the capture to end, with a live progress line on a terminal, then print its
    /// summary.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    request: RequestArgs,
}

#[derive(Args, Debug)]
struct ClientArgs {
    /// The daemon's control socket.
    #[arg(long, env = "TAPSTREAM_SOCKET", default_value = "/run/tapstream/control.sock")]
    socket: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct IdArgs {
    /// The capture id.
    id: String,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args, Debug)]
struct DaemonArgs {
    /// Configuration file.
    #[arg(long, value_name = "FILE", default_value = "/etc/tapstream/tapstream.toml")]
    config: PathBuf,
}

/// How to reach an S3-compatible store. Credentials come from the AWS default chain
/// (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, web identity, IMDSv2).
#[derive(Args, Debug, Clone)]
struct StoreArgs {
    /// Endpoint of an S3-compatible store (e.g. http://127.0.0.1:3900); default: AWS.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Region (default: from the environment or profile).
    #[arg(long)]
    s3_region: Option<String>,
    /// Path-style addressing (endpoint/bucket/key), which most S3-compatible stores need.
    #[arg(long)]
    s3_path_style: bool,
    /// Server-side encryption: AES256 or aws:kms.
    #[arg(long, value_name = "ALG")]
    sse: Option<String>,
    /// KMS key id for --sse aws:kms.
    #[arg(long, value_name = "ID")]
    sse_kms_key_id: Option<String>,
    /// Storage class (e.g. STANDARD_IA).
    #[arg(long)]
    storage_class: Option<String>,
    /// Canned ACL (e.g. bucket-owner-full-control).
    #[arg(long)]
    acl: Option<String>,
    /// Requests to the store at once (so HTTP connections) at most.
    #[arg(long, value_name = "N", default_value_t = 16)]
    s3_max_connections: usize,
}

/// How objects are cut, compressed and uploaded.
#[derive(Args, Debug, Clone)]
struct ObjectArgs {
    /// Multipart part size (at least 5MiB).
    #[arg(long, value_name = "SIZE", default_value = "8MiB", value_parser = parse_bytes)]
    part_size: u64,
    /// Parts uploading at once at most.
    #[arg(long, value_name = "N", default_value_t = 4)]
    parts_in_flight: usize,
    /// Start a new object past this size.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_bytes)]
    rotate_size: u64,
    /// Start a new object when the open one is this old.
    #[arg(long, value_name = "TIME", default_value = "5m", value_parser = humantime::parse_duration)]
    rotate_age: Duration,
    /// Compression: a zstd level (1-19) or `none`.
    #[arg(long, value_name = "LEVEL", default_value = "3")]
    compression: String,
    /// Compression threads (they run off the writers' cores).
    #[arg(long, value_name = "N", default_value_t = 1)]
    compress_threads: usize,
    /// Directory where chunks wait while the store is unreachable (one subdirectory per
    /// capture); what an earlier run left there is uploaded on start.
    #[arg(long, value_name = "DIR", default_value = "/var/tmp/tapstream/spool")]
    spool_dir: PathBuf,
    /// Bytes one capture may spool at most; beyond, frames are dropped and counted.
    #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = parse_bytes)]
    spool_max: u64,
    /// Compressed chunks held in memory while the store is slow; more go to the spool.
    #[arg(long, value_name = "N", default_value_t = 16)]
    upload_queue: usize,
    /// How long the store may stay unreachable before the capture fails.
    #[arg(long, value_name = "TIME", default_value = "1h", value_parser = humantime::parse_duration)]
    outage_max: Duration,
    /// This host's name in object keys (default: the hostname).
    #[arg(long)]
    node: Option<String>,
    /// Object key template: {prefix}, {node}, {capture}, {start}, {seq}, {ext}.
    #[arg(long, default_value = "{prefix}/{node}/{capture}/{start}-{seq}.{ext}")]
    key_template: String,
}

#[derive(Subcommand, Debug)]
enum FilterCommand {
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
struct ReadArgs {
    /// The object: s3://bucket/key, or a path under a local store directory given with --dir.
    url: String,
    /// Local store directory the key is relative to (instead of S3).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Only frames at or after this time (RFC 3339, e.g. 2026-11-24T01:02:03Z, or Unix seconds).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    since: Option<u64>,
    /// Only frames at or before this time.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<u64>,
    #[command(flatten)]
    store: StoreArgs,
}

/// A time as ns since the Unix epoch: RFC 3339 or (fractional) Unix seconds.
fn parse_time(s: &str) -> Result<u64, String> {
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
    fn settings(&self) -> StoreSettings {
        StoreSettings {
            s3_endpoint: self.s3_endpoint.clone(),
            s3_region: self.s3_region.clone(),
            s3_path_style: self.s3_path_style,
            sse: self.sse.clone(),
            sse_kms_key_id: self.sse_kms_key_id.clone(),
            storage_class: self.storage_class.clone(),
            acl: self.acl.clone(),
            max_connections: self.s3_max_connections,
            ..StoreSettings::default()
        }
    }

    fn s3(&self, bucket: String) -> tapstream::store::s3::S3Config {
        self.settings().s3(bucket)
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ZeroCopyArg {
    Auto,
    Required,
    Off,
}

/// A `KEY=VALUE` tag, checked as every tag is ([`check_tag`]).
fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("a tag is KEY=VALUE, not {s:?}"))?;
    check_tag(k, v)
}

/// A ring size, checked as the configuration file's `ring_size` is.
fn parse_ring_size(s: &str) -> Result<u32, String> {
    s.parse::<u32>()
        .map_err(|_| format!("{s:?} is not a number"))
        .and_then(tapstream::config::check_ring_size)
}

/// A frame size, checked as the configuration file's `frame_size_bytes` is.
fn parse_frame_size(s: &str) -> Result<u32, String> {
    s.parse::<u32>()
        .map_err(|_| format!("{s:?} is not a number"))
        .and_then(tapstream::config::check_frame_size)
}

/// Parses a byte count with an optional unit: K/M/G are powers of 1000, KiB/MiB/GiB of 1024.
fn parse_bytes(s: &str) -> Result<u64, String> {
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

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Capture(cli) => match cli.action {
            None => capture(cli.oneshot),
            Some(action) => control(action),
        },
        Command::Daemon(args) => daemon(&args.config),
        Command::CheckConfig { file } => check_config(&file),
        Command::Read(args) => read(*args),
        Command::Filter(FilterCommand::Check { expression, file }) => {
            filter_check(&expression, file.as_deref())
        }
        Command::Filter(FilterCommand::CompileChild) => {
            match compiler::run_child(std::io::stdin().lock(), std::io::stdout().lock()) {
                Ok(true) => std::process::exit(0),
                Ok(false) => std::process::exit(2),
                Err(e) => Err(anyhow::Error::new(e).context("compile a filter for the daemon")),
            }
        }
    };
    if let Err(e) = result {
        eprintln!("tapstream: {e:#}");
        std::process::exit(1);
    }
}

fn capture(args: CaptureArgs) -> anyhow::Result<()> {
    let r = &args.request;
    let Some(interface) = r.interface.clone() else { bail!("give the interface to capture from with -i IF") };
    let snaplen = r.snaplen.unwrap_or(DEFAULT_SNAPLEN);
    if snaplen == 0 {
        bail!("--snaplen must be at least 1");
    }
    let id = r.id.clone().unwrap_or_else(|| "capture".into());
    // The same settings as an interface of the daemon's configuration.
    let mut config = InterfaceSection {
        device: interface.clone(),
        queues: args.queues,
        cores: args.cores.clone(),
        attach: args.xdp_mode,
        zero_copy: match args.zero_copy {
            ZeroCopyArg::Auto => ZeroCopy::Auto,
            ZeroCopyArg::Required => ZeroCopy::Required,
            ZeroCopyArg::Off => ZeroCopy::Off,
        },
        frame_size_bytes: args.frame_size,
        ring_size: args.ring_size,
        drop_unmatched: args.drop_unmatched,
        ..InterfaceSection::default()
    }
    .pipeline();
    // Kept exact: the flag takes any duration, the file whole microseconds.
    config.writer.coalesce = args.batch_wait;
    let filter = match r.filter() {
        Some(expression) => {
            // Compiled once, and checked before anything starts: libpcap's message for a syntax
            // error, the reason for what the kernel cannot run, the verifier's complaint (the
            // program is loaded once and dropped; the capture loads it again with the
            // interface's own).
            let program = compile_cli(&expression)?;
            LoadedFilter::load(&[CaptureFilter { slot: 0, filter: Some(&program) }])?;
            Some(program)
        }
        None => None,
    };
    let spec = CaptureSpec { id: id.clone(), filter, snaplen };
    let limits = Limits { packets: r.packets, bytes: r.bytes, duration: r.duration, idle: r.idle };

    if let Some(addr) = args.metrics_listen {
        serve_metrics(addr)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("install signal handler")?;
    }
    let tty = std::io::stderr().is_terminal() && !args.json;
    let target = match (&args.write, &args.upload) {
        (Some(path), _) => Target::File(path.clone()),
        (None, Some(url)) => {
            store_target(&args, url, &id, spec.filter.as_ref().map(CbpfProgram::expression))?
        }
        (None, None) => bail!("give --write FILE or --upload URL"),
    };
    let summary = run_capture(config, spec, limits, target, &stop, |p| {
        if tty {
            eprint!(
                "\r{} packets, {} bytes, {:.1} s, {} dropped   ",
                p.packets, p.bytes, p.elapsed_secs, p.dropped
            );
        }
    })
    .with_context(|| format!("capture on {interface}"))?;
    if tty {
        eprintln!();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    // Ended by an error from outside (its interface removed): what it stored is kept and
    // summarised above, and the command fails.
    if let Some(error) = &summary.error {
        bail!("capture on {interface}: {error}");
    }
    Ok(())
}

/// The store settings the flags give.
fn store_settings(args: &CaptureArgs) -> StoreSettings {
    let o = &args.objects;
    StoreSettings {
        part_size_bytes: o.part_size,
        parts_in_flight: o.parts_in_flight,
        rotate_size_bytes: o.rotate_size,
        rotate_age_secs: o.rotate_age.as_secs().max(1),
        compression: o.compression.clone(),
        compress_threads: o.compress_threads,
        key_template: o.key_template.clone(),
        spool_dir: o.spool_dir.clone(),
        spool_max_bytes: o.spool_max,
        upload_queue: o.upload_queue,
        outage_max_secs: o.outage_max.as_secs(),
        ..args.store.settings()
    }
}

/// Validates the store options into a target that starts the upload with the capture; checks
/// the store (one that refuses is an error; one that is down is logged, and the capture spools
/// until it answers).
fn store_target(args: &CaptureArgs, url: &str, id: &str, filter: Option<&str>) -> anyhow::Result<Target> {
    let settings = store_settings(args);
    if let Err((field, message)) = settings.validate() {
        bail!("--{}: {message}", flag_of(field));
    }
    let node = args.objects.node.clone().unwrap_or_else(hostname);
    let r = &args.request;
    let metadata = object_metadata(id, &node, filter, r.alert_id.as_deref(), r.customer.as_deref(), &r.tags)
        .map_err(anyhow::Error::msg)?;
    settings
        .target(url, ObjectLabels { capture: id.to_owned(), node, metadata }, true)
        .with_context(|| format!("cannot store the capture in {url}"))
}

/// The flag that sets a store setting.
fn flag_of(field: &str) -> String {
    match field {
        "part_size_bytes" => "part-size".into(),
        "rotate_size_bytes" => "rotate-size".into(),
        "spool_max_bytes" => "spool-max".into(),
        other => other.replace('_', "-"),
    }
}

/// Serves Prometheus metrics at http://ADDR/metrics, every series registered at zero.
fn serve_metrics(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .with_context(|| format!("serve metrics on {addr}"))?;
    tapstream::metrics::register_all();
    log::info!("metrics at http://{addr}/metrics");
    Ok(())
}

fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    println!(
        "{}: valid; {} interface(s): {}; {} destination(s)",
        file.display(),
        config.interfaces.len(),
        config.interfaces.iter().map(|(a, i)| format!("{a} ({})", i.device)).collect::<Vec<_>>().join(", "),
        config.store.destinations.len()
    );
    Ok(())
}

fn daemon(file: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    if let Some(addr) = &config.daemon.metrics_listen {
        serve_metrics(addr.parse()?)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tapstream-control")
        .enable_all()
        .build()?;
    let (unix, tcp) = runtime.block_on(async {
        let unix = server::bind_unix(
            &config.daemon.socket,
            config.socket_mode(),
            config.daemon.socket_group.as_deref(),
        )?;
        let tcp = match (&config.daemon.tcp_listen, &config.daemon.token_file) {
            (Some(addr), Some(token_file)) => {
                let token = server::read_token(token_file)?;
                let listener =
                    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listen on {addr}"))?;
                Some((listener, token))
            }
            _ => None,
        };
        anyhow::Ok((unix, tcp))
    })?;
    let socket = config.daemon.socket.clone();
    // What earlier runs left in the spool goes up now, not only when a capture next starts.
    let (store, node) = (config.store.clone(), config.daemon.node.clone().unwrap_or_else(hostname));
    let daemon = Arc::new(Daemon::start(config)?);
    // First the captures a dead daemon left running (their open uploads completed, their
    // spools uploaded under their names and recorded in their state), then the other spools;
    // captures whose store is unreachable are tried again every 30 s.
    let recovering = daemon.clone();
    std::thread::Builder::new()
        .name("tapstream-recover".into())
        .spawn(move || {
            let mut pending = recovering.recover_interrupted();
            for (url, result) in store.recover_spools(&node) {
                if let Err(e) = result {
                    log::warn!("what earlier runs spooled for {url} stays in the spool for now: {e}");
                }
            }
            while pending {
                std::thread::sleep(Duration::from_secs(30));
                pending = recovering.recover_interrupted();
            }
        })
        .context("start the spool recovery thread")?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("install signal handler")?;
    }
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let server = runtime.spawn(server::serve(daemon.clone(), unix, tcp, shutdown_rx));
    log::info!("daemon ready: control socket {}", socket.display());
    // Signals are checked twice a second; running captures' progress is saved every 2 s (what a
    // killed daemon's captures report as interrupted).
    let mut ticks = 0u32;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(500));
        ticks += 1;
        if ticks.is_multiple_of(4) {
            daemon.save_progress();
        }
    }
    log::info!("stopping: running captures end as interrupted, their outputs are finished");
    // Pending waits return now (with the capture as it is), new captures are refused; then the
    // server stops accepting, and its connections finish their requests within its grace.
    daemon.begin_shutdown();
    let _ = shutdown_tx.send(true);
    let server_stopped = runtime.block_on(async {
        tokio::time::timeout(server::SHUTDOWN_GRACE + Duration::from_secs(3), server).await
    });
    if server_stopped.is_err() {
        log::warn!("the control API did not stop in time; stopping anyway");
    }
    let _ = std::fs::remove_file(&socket);
    // Requests still being served hold the daemon, which ends its captures all the same.
    daemon.shutdown();
    // Blocking tasks still running (a request's last moments) must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    log::info!("stopped");
    Ok(())
}

fn control(action: CaptureAction) -> anyhow::Result<()> {
    match action {
        CaptureAction::Start(args) => {
            let r = &args.request;
            let request = CaptureRequest {
                id: r.id.clone(),
                interface: r.interface.clone(),
                filter: r.filter(),
                snaplen: r.snaplen,
                packets: r.packets,
                bytes: r.bytes,
                duration_secs: r.duration.map(|d| d.as_secs_f64()),
                idle_timeout_secs: r.idle.map(|d| d.as_secs_f64()),
                tags: r.tags.iter().cloned().collect(),
                customer: r.customer.clone(),
                alert_id: r.alert_id.clone(),
                destination: args.destination.clone(),
            };
            let client = Client::new(&args.client.socket);
            let info = client.start(&request)?;
            if !args.wait {
                return show(&info, args.client.json);
            }
            if !args.client.json {
                eprintln!("capture {} started on {} ({})", info.id, info.interface, info.device);
            }
            let info = wait_for(&client, &info.id, !args.client.json && std::io::stderr().is_terminal())?;
            show(&info, args.client.json)?;
            ended_well(&info)
        }
        CaptureAction::List(client_args) => {
            let all = Client::new(&client_args.socket).list()?;
            if client_args.json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!(
                    "{:<28} {:<10} {:<9} {:>10} {:>12}  filter",
                    "id", "interface", "state", "packets", "bytes"
                );
                for c in all {
                    let state = match (&c.state, &c.summary) {
                        (_, Some(s)) => s.stop_reason.as_str().to_owned(),
                        (state, None) => format!("{state:?}").to_lowercase(),
                    };
                    println!(
                        "{:<28} {:<10} {:<9} {:>10} {:>12}  {}",
                        c.id,
                        c.interface,
                        state,
                        c.progress.packets,
                        c.progress.bytes,
                        c.request.filter.as_deref().unwrap_or("")
                    );
                }
            }
            Ok(())
        }
        CaptureAction::Status(a) => show(&Client::new(&a.client.socket).status(&a.id)?, a.client.json),
        CaptureAction::Stop(a) => {
            let client = Client::new(&a.client.socket);
            client.stop(&a.id)?;
            let info = wait_for(&client, &a.id, false)?;
            show(&info, a.client.json)?;
            ended_well(&info)
        }
        CaptureAction::Wait(a) => {
            let client = Client::new(&a.client.socket);
            let info = wait_for(&client, &a.id, !a.client.json && std::io::stderr().is_terminal())?;
            show(&info, a.client.json)?;
            ended_well(&info)
        }
    }
}

/// An error (so a non-zero exit) for a capture that ended on an error (a removed interface, a
/// failed output) or failed, after its summary is printed: scripts that wait for a capture
/// learn that it is incomplete.
fn ended_well(info: &CaptureInfo) -> anyhow::Result<()> {
    let error = match (&info.state, &info.summary) {
        (CaptureState::Failed, _) => info.error.clone().unwrap_or_else(|| "failed".into()),
        (_, Some(summary)) if summary.stop_reason == StopReason::Error => {
            summary.error.clone().or_else(|| info.error.clone()).unwrap_or_else(|| "ended on an error".into())
        }
        _ => return Ok(()),
    };
    bail!("capture {} did not end well: {error}", info.id)
}

/// Waits for a capture to end; on a terminal, with a progress line against its limits.
fn wait_for(client: &Client, id: &str, live: bool) -> anyhow::Result<CaptureInfo> {
    loop {
        let info =
            client.wait(id, if live { Duration::from_millis(500) } else { Duration::from_secs(60) })?;
        if info.state != CaptureState::Running {
            if live {
                eprintln!();
            }
            return Ok(info);
        }
        if live {
            eprint!("\r{}   ", progress_line(&info));
        }
    }
}

/// `1234 packets / 10000, 5.6 MB, 12.3 s / 60 s, 0 dropped`.
fn progress_line(info: &CaptureInfo) -> String {
    let p = &info.progress;
    let r = &info.request;
    let of = |limit: Option<String>| limit.map(|l| format!(" / {l}")).unwrap_or_default();
    format!(
        "{} packets{}, {} bytes{}, {:.1} s{}, {} dropped",
        p.packets,
        of(r.packets.map(|n| n.to_string())),
        p.bytes,
        of(r.bytes.map(|n| n.to_string())),
        p.elapsed_secs,
        of(r.duration_secs.map(|d| format!("{d} s"))),
        p.dropped
    )
}

fn show(info: &CaptureInfo, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(info)?);
        return Ok(());
    }
    match (&info.state, &info.summary, &info.error) {
        (_, Some(summary), _) => print_summary(summary),
        (CaptureState::Failed, _, Some(error)) => println!("capture {} failed: {error}", info.id),
        _ => {
            println!("capture {} running on {} ({})", info.id, info.interface, info.device);
            println!("  {}", progress_line(info));
            println!("  into {}", info.location);
        }
    }
    Ok(())
}

/// Compiles a filter given on the command line, in this process (whoever runs it can
/// interrupt it), refusing one longer than [`CLI_MAX_FILTER_BYTES`].
fn compile_cli(expression: &str) -> anyhow::Result<CbpfProgram> {
    compiler::check_length(expression, CLI_MAX_FILTER_BYTES, "the longest filter the command line compiles")?;
    Ok(CbpfProgram::compile(expression)?)
}

fn filter_check(expression: &str, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    let program = compile_cli(expression)?;
    println!("{expression:?} compiles to {} classic BPF instructions:", program.instructions().len());
    print!("{}", program.dump());
    let capture = [CaptureFilter { slot: 0, filter: Some(&program) }];
    let instructions = Instructions::build(&capture)?;
    println!("and to an XDP filter program of {} eBPF instructions", instructions.len());
    let Some(path) = file else { return Ok(()) };
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let reader = tapstream_pcap::Reader::new(&bytes)
        .with_context(|| format!("{} is not a PCAP file", path.display()))?;
    if reader.header().linktype != tapstream_pcap::LINKTYPE_ETHERNET {
        bail!("{} holds link type {}, not Ethernet (1)", path.display(), reader.header().linktype);
    }
    let loaded = LoadedFilter::load(&capture).context("load the filter program into the kernel")?;
    let (mut total, mut matched, mut skipped) = (0u64, Vec::new(), Vec::new());
    for record in reader {
        let record = record.with_context(|| format!("{}: frame {}", path.display(), total + 1))?;
        total += 1;
        if !(MIN_TEST_FRAME..=MAX_TEST_FRAME).contains(&record.data.len()) {
            skipped.push((total, record.data.len()));
            continue;
        }
        let run = loaded.test_run(record.data, 1).with_context(|| format!("frame {total}"))?;
        if run.mask != 0 {
            matched.push(total);
        }
    }
    println!(
        "{} of {total} frames of {} match (the program run by the kernel, BPF_PROG_TEST_RUN):",
        matched.len(),
        path.display()
    );
    for n in matched {
        println!("  frame {n}");
    }
    for (n, len) in skipped {
        println!(
            "  frame {n} not tried: {len} bytes (XDP sees frames of {MIN_TEST_FRAME} to {MAX_TEST_FRAME} bytes)"
        );
    }
    Ok(())
}

/// Shortest frame the kernel runs an XDP program on in a test (an Ethernet header).
const MIN_TEST_FRAME: usize = 14;
/// Longest (a page less XDP's headroom and tailroom).
const MAX_TEST_FRAME: usize = 3_520;

fn read(args: ReadArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (since, until) = (args.since.unwrap_or(0), args.until.unwrap_or(u64::MAX));
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let stats = runtime
        .block_on(async {
            match &args.dir {
                Some(dir) => read_window(&DirSink::new(dir)?, &args.url, since, until, &mut out).await,
                None => {
                    let (bucket, key) = parse_object_url(&args.url)?;
                    let sink = S3Sink::new(args.store.s3(bucket)).await;
                    read_window(&sink, &key, since, until, &mut out).await
                }
            }
        })
        .with_context(|| format!("read {}", args.url))?;
    log::info!(
        "{} packets; fetched {} of {} bytes of the object",
        stats.packets,
        stats.bytes_fetched,
        stats.object_bytes
    );
    Ok(())
}

fn print_summary(s: &CaptureSummary) {
    println!("capture {} on {} ended: {}", s.id, s.interface, s.stop_reason);
    println!("  {} packets, {} bytes in {:.1} s", s.packets, s.bytes, s.elapsed_secs);
    if s.outputs.is_empty() {
        if s.packets == 0 {
            println!("  no packets captured: nothing stored");
        } else {
            println!("  no object finished (see the error below)");
        }
    }
    for output in &s.outputs {
        println!("  stored: {output}");
    }
    println!(
        "  dropped: {} in writers, {} in the kernel's AF_XDP sockets, {} redirect errors; {} truncated",
        s.dropped_writer, s.dropped_kernel, s.redirect_errors, s.truncated
    );
    if s.dropped_spool_full > 0 {
        println!(
            "  lost: {} packets found the spool full while the store was unreachable",
            s.dropped_spool_full
        );
    }
    if let Some(error) = &s.error {
        println!("  error: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
