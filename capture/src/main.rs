//! The `tapstream` command: capture daemon and CLI.

use std::{
    io::IsTerminal as _,
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::{Context as _, bail};
use capture_common::Unmatched;
use clap::{Args, Parser, Subcommand};
use tapstream::{
    capture::{CaptureSpec, DEFAULT_SNAPLEN, Limits},
    compress::Compression,
    filter::{CaptureFilter, CbpfProgram, LoadedFilter, program::Instructions},
    pipeline::InterfaceConfig,
    session::{CaptureSummary, StartStore, StoreTarget, Target, run_capture},
    upload::{
        Destination,
        dir::DirSink,
        object::{MIN_PART_BYTES, ObjectOwner, UploadConfig},
        parse_object_url,
        read::read_window,
        s3::{S3Config, S3Sink},
        stream::{StoreOptions, StoreOutput},
    },
    xdp::AttachMode,
    xsk::ZeroCopy,
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
    /// Capture from an interface until the first limit, into a local PCAP file or a store.
    Capture(Box<CaptureArgs>),
    /// Write a stored capture object as PCAP to stdout (for `tshark -r -`), optionally only
    /// the frames of a time window, fetched with ranged GETs.
    Read(Box<ReadArgs>),
    /// tcpdump filter expressions.
    #[command(subcommand)]
    Filter(FilterCommand),
}

#[derive(Args, Debug)]
struct CaptureArgs {
    /// Interface to capture from.
    #[arg(short, long = "iface", value_name = "IF")]
    interface: String,
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
    /// Bytes stored per frame at most.
    #[arg(short, long, default_value_t = DEFAULT_SNAPLEN)]
    snaplen: u32,
    /// Capture id (for summaries and object names).
    #[arg(long, default_value = "capture")]
    id: String,
    /// A tag stored in each object's metadata as x-amz-meta-tag-KEY (repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// The alert that asked for this capture, stored in the objects' metadata.
    #[arg(long, value_name = "ID")]
    alert_id: Option<String>,
    /// The customer the capture is for, stored in the objects' metadata.
    #[arg(long)]
    customer: Option<String>,
    /// XDP attach mode.
    #[arg(long, default_value_t = AttachMode::Auto)]
    xdp_mode: AttachMode,
    /// AF_XDP zero-copy: auto (try, then copy), required, off.
    #[arg(long, value_enum, default_value = "auto")]
    zero_copy: ZeroCopyArg,
    /// UMEM frame size: 2048 or 4096 (longer frames are cut and counted).
    #[arg(long, default_value_t = 4096, value_parser = parse_frame_size)]
    frame_size: u32,
    /// Entries of each socket's RX and fill rings (a power of two). The UMEM holds half as
    /// many frames, all lent to the kernel: that is how many frames a queue buffers while its
    /// writer is busy (memory per queue: ring size / 2 x frame size, 16 MiB by default).
    #[arg(long, default_value_t = 8192, value_parser = parse_ring_size)]
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
    /// tcpdump filter expression, as tcpdump takes it (the remaining words, e.g.
    /// `tcp port 443 and net 10.0.0.0/8`); none captures every frame. It runs in the kernel:
    /// frames it rejects never leave it.
    #[arg(value_name = "EXPR", trailing_var_arg = true)]
    filter: Vec<String>,
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
    fn s3(&self, bucket: String) -> S3Config {
        S3Config {
            bucket,
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_path_style,
            sse: self.sse.clone(),
            sse_kms_key_id: self.sse_kms_key_id.clone(),
            storage_class: self.storage_class.clone(),
            acl: self.acl.clone(),
            max_attempts: 5,
            static_credentials: None,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ZeroCopyArg {
    Auto,
    Required,
    Off,
}

/// A `KEY=VALUE` tag: the key a metadata token (letters, digits, `-`, `_`), the value printable
/// ASCII, as S3 user metadata requires.
fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("a tag is KEY=VALUE, not {s:?}"))?;
    if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(format!("tag key {k:?}: only letters, digits, - and _"));
    }
    if !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!("tag {k}: the value must be printable ASCII"));
    }
    Ok((k.to_ascii_lowercase(), v.to_owned()))
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n.is_power_of_two() && (64..=65536).contains(&n) => Ok(n),
        _ => Err(format!("ring size must be a power of two from 64 to 65536, not {s}")),
    }
}

fn parse_frame_size(s: &str) -> Result<u32, String> {
    match s {
        "2048" => Ok(2048),
        "4096" => Ok(4096),
        _ => Err(format!("frame size must be 2048 or 4096, not {s}")),
    }
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
        Command::Capture(args) => capture(*args),
        Command::Read(args) => read(*args),
        Command::Filter(FilterCommand::Check { expression, file }) => {
            filter_check(&expression, file.as_deref())
        }
    };
    if let Err(e) = result {
        eprintln!("tapstream: {e:#}");
        std::process::exit(1);
    }
}

fn capture(args: CaptureArgs) -> anyhow::Result<()> {
    if args.snaplen == 0 {
        bail!("--snaplen must be at least 1");
    }
    let mut config = InterfaceConfig::new(&args.interface);
    config.attach = args.xdp_mode;
    config.xsk.frame_size = args.frame_size;
    config.writer.coalesce = args.batch_wait;
    config.xsk.rx_ring_size = args.ring_size;
    config.xsk.fill_ring_size = args.ring_size;
    config.xsk.fill_frames = args.ring_size / 2;
    config.xsk.umem_frames = args.ring_size / 2;
    config.xsk.zero_copy = match args.zero_copy {
        ZeroCopyArg::Auto => ZeroCopy::Auto,
        ZeroCopyArg::Required => ZeroCopy::Required,
        ZeroCopyArg::Off => ZeroCopy::Off,
    };
    config.queues = args.queues;
    config.cores = args.cores.clone();
    config.unmatched = if args.drop_unmatched { Unmatched::Drop } else { Unmatched::Pass };
    let filter = args.filter.join(" ");
    let filter = if filter.trim().is_empty() {
        None
    } else {
        // Checked before anything starts: libpcap's message for a syntax error, the reason for
        // what the kernel cannot run.
        Instructions::build(&[CaptureFilter { slot: 0, filter: Some(&CbpfProgram::compile(&filter)?) }])?;
        Some(filter)
    };
    let spec = CaptureSpec { id: args.id.clone(), filter, snaplen: args.snaplen };
    let limits =
        Limits { packets: args.packets, bytes: args.bytes, duration: args.duration, idle: args.idle };

    if let Some(addr) = args.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serve metrics on {addr}"))?;
        tapstream::metrics::register_all();
        log::info!("metrics at http://{addr}/metrics");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("install signal handler")?;
    }
    let tty = std::io::stderr().is_terminal() && !args.json;
    let target = match (&args.write, &args.upload) {
        (Some(path), _) => Target::File(path.clone()),
        (None, Some(url)) => store_target(&args, url)?,
        (None, None) => bail!("give --write FILE or --upload URL"),
    };
    let summary = run_capture(config, spec, limits, target, &stop, |p| {
        if tty {
            eprint!("\r{} packets, {} bytes, {:.1} s   ", p.packets, p.bytes, p.elapsed_secs);
        }
    })
    .with_context(|| format!("capture on {}", args.interface))?;
    if tty {
        eprintln!();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
}

/// Validates the store options into a target that starts the upload with the capture.
fn store_target(args: &CaptureArgs, url: &str) -> anyhow::Result<Target> {
    let o = &args.objects;
    if o.part_size < MIN_PART_BYTES as u64 {
        bail!("--part-size must be at least 5MiB (S3's minimum part), not {}", o.part_size);
    }
    if o.parts_in_flight == 0 || o.compress_threads == 0 {
        bail!("--parts-in-flight and --compress-threads must be at least 1");
    }
    let compression = match o.compression.as_str() {
        "none" => Compression::None,
        level => match level.parse::<i32>() {
            Ok(l) if (1..=19).contains(&l) => Compression::Zstd { level: l },
            _ => bail!("--compression must be a zstd level from 1 to 19 or none, not {level:?}"),
        },
    };
    let node = match &o.node {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "node".into()),
    };
    let destination: Destination = url.parse()?;
    let prefix = match &destination {
        Destination::S3 { prefix, .. } => prefix.clone(),
        Destination::Dir { .. } => String::new(),
    };
    let config = UploadConfig {
        part_bytes: o.part_size as usize,
        parts_in_flight_per_object: o.parts_in_flight,
        object_max_bytes: o.rotate_size,
        object_max_age: o.rotate_age,
        key_template: o.key_template.clone(),
        compression,
        outage_max: o.outage_max,
    };
    let owner = ObjectOwner {
        prefix,
        node: node.clone(),
        capture: args.id.clone(),
        metadata: object_metadata(args, &node)?,
    };
    let options = StoreOptions {
        threads: o.compress_threads,
        spool_root: o.spool_dir.clone(),
        spool_max_bytes: o.spool_max,
        memory_chunks: o.upload_queue,
    };
    let store = args.store.clone();
    let start: StartStore = match destination {
        Destination::S3 { bucket, .. } => Box::new(move |pool, header| {
            let s3 = store.s3(bucket);
            StoreOutput::start(
                || async move { Ok(S3Sink::new(s3).await) },
                config,
                owner,
                header,
                options,
                pool,
            )
        }),
        Destination::Dir { path } => Box::new(move |pool, header| {
            StoreOutput::start(|| async move { DirSink::new(path) }, config, owner, header, options, pool)
        }),
    };
    Ok(Target::Store(StoreTarget { start }))
}

/// The user metadata stored with every object of the capture; S3 allows 2 KB in all.
fn object_metadata(args: &CaptureArgs, node: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut meta = vec![("capture-id".to_owned(), args.id.clone()), ("node".to_owned(), node.to_owned())];
    meta.extend(args.alert_id.iter().map(|a| ("alert-id".to_owned(), a.clone())));
    meta.extend(args.customer.iter().map(|c| ("customer".to_owned(), c.clone())));
    meta.extend(args.tags.iter().map(|(k, v)| (format!("tag-{k}"), v.clone())));
    for (k, v) in &meta {
        if !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            bail!("{k} must be printable ASCII to be stored as object metadata");
        }
    }
    let size: usize = meta.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > 2048 {
        bail!("object metadata (capture id, node, alert id, customer, tags) is {size} bytes; S3 allows 2048");
    }
    Ok(meta)
}

fn filter_check(expression: &str, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    let program = CbpfProgram::compile(expression)?;
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
        println!("  no packets captured: nothing stored");
    }
    for output in &s.outputs {
        println!("  stored: {output}");
    }
    println!(
        "  dropped: {} in writers, {} in the kernel's AF_XDP sockets, {} redirect errors; {} truncated",
        s.dropped_writer, s.dropped_kernel, s.redirect_errors, s.truncated
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_checked() {
        assert_eq!(parse_tag("Team=net ops"), Ok(("team".into(), "net ops".into())));
        assert!(parse_tag("no-equals").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_tag("bad key=x").unwrap_err().contains("only letters"));
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
    fn byte_counts() {
        assert_eq!(parse_bytes("123"), Ok(123));
        assert_eq!(parse_bytes("10M"), Ok(10_000_000));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert!(parse_bytes("12 parsecs").unwrap_err().contains("unknown byte unit"));
        assert!(parse_bytes("x").is_err());
    }
}
