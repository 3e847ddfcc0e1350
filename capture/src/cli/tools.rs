//! `check-config`, `filter check`, `read` and `ls`: tools that need no daemon.

use crate::{
    cli::args::*,
    config::Config,
    filter::{
        CaptureFilter, CbpfProgram, FilterError, LoadedFilter,
        compiler::{self, CLI_MAX_FILTER_BYTES},
        program::Instructions,
    },
    store::{
        Destination, Sink,
        catalog::{self, CatalogError, Manifest, Selector},
        dir::DirSink,
        gcs::GcsSink,
        parse_object_url,
        read::{Format, MergeOptions, MergeStats, read_captures, read_window, section_comment},
        s3::S3Sink,
    },
};
use std::sync::Arc;

use anyhow::{Context as _, bail};

pub fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    // What the access rules need of this host: their groups, their token files.
    crate::request::access::AccessPolicy::load(&config).with_context(|| format!("{}", file.display()))?;
    println!(
        "{}: valid; {} interface(s): {}; {} destination(s); {} access rule(s), access.default = {}",
        file.display(),
        config.interfaces.len(),
        config.interfaces.iter().map(|(a, i)| format!("{a} ({})", i.device)).collect::<Vec<_>>().join(", "),
        config.store.destinations.len(),
        config.access.rules.len(),
        match config.access.default {
            crate::config::access::DefaultAccess::Allow => "allow",
            crate::config::access::DefaultAccess::Deny => "deny",
        }
    );
    Ok(())
}

/// Compiles a filter given on the command line, in this process (whoever runs it can
/// interrupt it), refusing one longer than [`CLI_MAX_FILTER_BYTES`].
pub fn compile_cli(expression: &str) -> Result<CbpfProgram, FilterError> {
    compiler::check_length(expression, CLI_MAX_FILTER_BYTES, "the longest filter the command line compiles")?;
    CbpfProgram::compile(expression)
}

pub fn filter_check(expression: &str, file: Option<&std::path::Path>) -> anyhow::Result<()> {
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
        // A record cut short by a snaplen is run as libpcap runs it: `len` is its length on the
        // wire, and loads past the bytes at hand fail.
        let wire_len = record.origlen.max(record.data.len() as u32);
        let run = loaded.test_run_wire(record.data, wire_len, 1).with_context(|| format!("frame {total}"))?;
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
pub const MIN_TEST_FRAME: usize = 14;
/// Longest (a page less XDP's headroom and tailroom).
pub const MAX_TEST_FRAME: usize = 3_520;

/// Whether `url` names one object (its key ends as a capture object's does), not a prefix.
pub fn is_object(url: &str) -> bool {
    url.ends_with(".pcap.zst") || url.ends_with(".pcap")
}

pub fn read(args: ReadArgs) -> anyhow::Result<()> {
    if !is_object(&args.url) {
        return read_prefix(args);
    }
    if args.select.selects() || !args.filter.is_empty() {
        bail!(
            "{} is one object (its name ends in .pcap.zst or .pcap): only --since and --until apply; \
             give a prefix to select captures or filter frames",
            args.url
        );
    }
    let (since, until) = window(&args.select)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut out = output(args.write.as_deref())?;
    let format = match args.format {
        FileFormat::Pcap => Format::Pcap,
        FileFormat::Pcapng => Format::Pcapng { comment: asked(&args) },
    };
    let stats = runtime
        .block_on(async {
            match &args.dir {
                Some(dir) => {
                    read_window(&DirSink::new(dir)?, &args.url, since, until, format, &mut out).await
                }
                None => match parse_object_url(&args.url)? {
                    (Destination::Gs { bucket, .. }, key) => {
                        let sink = GcsSink::new(args.store.settings().gcs(bucket))?;
                        read_window(&sink, &key, since, until, format, &mut out).await
                    }
                    (Destination::S3 { bucket, .. }, key) => {
                        let sink = S3Sink::new(args.store.s3(bucket)).await;
                        read_window(&sink, &key, since, until, format, &mut out).await
                    }
                    (Destination::Dir { .. }, _) => unreachable!("an object URL names a bucket"),
                },
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

/// What a read asked for, for a pcapng file's comment: the command's words that select.
fn asked(args: &ReadArgs) -> String {
    let mut words = vec!["tapstream read".to_owned(), args.url.clone()];
    let s = &args.select;
    let mut flag = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            words.push(format!("--{name} {v}"));
        }
    };
    flag("since", s.since.map(exact_time));
    flag("until", s.until.map(exact_time));
    flag("node", s.node.clone());
    flag("customer", s.customer.clone());
    flag("alert-id", s.alert_id.clone());
    flag("capture", s.capture.clone());
    for (k, v) in &s.tags {
        flag("tag", Some(format!("{k}={v}")));
    }
    if !args.filter.is_empty() {
        words.push(args.filter.join(" "));
    }
    words.join(" ")
}

/// Where the frames go: `-w FILE`, or stdout (no `-w`, or `-w -` as tcpdump takes it).
fn output(write: Option<&std::path::Path>) -> anyhow::Result<Box<dyn std::io::Write>> {
    Ok(match write {
        Some(path) if path != std::path::Path::new("-") => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
        )),
        _ => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    })
}

/// The window the selectors give, both ends included; refused if it is empty.
fn window(select: &SelectArgs) -> anyhow::Result<(u64, u64)> {
    let (since, until) = (select.since.unwrap_or(0), select.until.unwrap_or(u64::MAX));
    if since > until {
        bail!("--since {} is after --until {}: the window is empty", exact_time(since), exact_time(until));
    }
    Ok((since, until))
}

/// `ns` in RFC 3339, with as many decimals as it needs.
fn exact_time(ns: u64) -> String {
    match ns % 1_000_000_000 {
        0 => humantime::format_rfc3339_seconds(time_of(ns)).to_string(),
        _ => humantime::format_rfc3339_nanos(time_of(ns)).to_string(),
    }
}

fn time_of(ns: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns)
}

/// The selectors as a [`Selector`], checked.
fn selector(select: &SelectArgs) -> anyhow::Result<Selector> {
    window(select)?;
    let node = match &select.node {
        Some(re) => Some(
            regex::RegexBuilder::new(re)
                .size_limit(1 << 20)
                .build()
                .with_context(|| format!("--node {re:?} is not a regular expression"))?,
        ),
        None => None,
    };
    Ok(Selector {
        since: select.since,
        until: select.until,
        node,
        customer: select.customer.clone(),
        alert_id: select.alert_id.clone(),
        tags: select.tags.clone(),
        capture: select.capture.clone(),
    })
}

/// A store given as a prefix (`--dir DIR` and a prefix under it, a local directory, or
/// s3://bucket/prefix), as the sink and the prefix, for `work`.
async fn with_store<T>(
    url: &str,
    dir: Option<&std::path::Path>,
    store: &StoreArgs,
    work: impl AsyncStore<T>,
) -> anyhow::Result<T> {
    match dir {
        Some(dir) => work.run(Arc::new(DirSink::new(dir)?), url.trim_matches('/')).await,
        None => match url.parse::<Destination>()? {
            Destination::S3 { bucket, prefix } => {
                work.run(Arc::new(S3Sink::new(store.s3(bucket)).await), &prefix).await
            }
            Destination::Gs { bucket, prefix } => {
                work.run(Arc::new(GcsSink::new(store.settings().gcs(bucket))?), &prefix).await
            }
            Destination::Dir { path } => {
                if !path.is_dir() {
                    bail!(
                        "{} is not a directory (a local store is a directory; S3 is s3://bucket/prefix)",
                        path.display()
                    );
                }
                work.run(Arc::new(DirSink::new(path)?), "").await
            }
        },
    }
}

/// What runs against a store whatever its kind.
trait AsyncStore<T> {
    async fn run<S: Sink>(self, sink: Arc<S>, prefix: &str) -> anyhow::Result<T>;
}

/// The captures the selectors match.
struct ListCaptures<'a>(&'a Selector);

impl AsyncStore<Vec<Manifest>> for ListCaptures<'_> {
    async fn run<S: Sink>(self, sink: Arc<S>, prefix: &str) -> anyhow::Result<Vec<Manifest>> {
        let listing = catalog::list(&*sink, prefix, self.0, crate::sys::unix_now_ns()).await?;
        log::debug!("{} manifests read", listing.manifests_read);
        Ok(listing.captures)
    }
}

pub fn ls(args: LsArgs) -> anyhow::Result<()> {
    let selector = selector(&args.select)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let captures = runtime
        .block_on(with_store(&args.url, None, &args.store, ListCaptures(&selector)))
        .with_context(|| format!("list {}", args.url))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&captures)?);
        return Ok(());
    }
    if captures.is_empty() {
        eprintln!("no capture under {} matches", args.url);
        return Ok(());
    }
    let rows: Vec<[String; 9]> = captures
        .iter()
        .map(|m| {
            [
                m.node.clone(),
                m.capture_id.clone(),
                rfc3339(m.start_ns),
                m.end_ns.map_or_else(|| "running".into(), rfc3339),
                m.frames.to_string(),
                m.objects.len().to_string(),
                m.stop_reason.clone().unwrap_or_else(|| "-".into()),
                m.interfaces.iter().map(|i| i.alias.as_str()).collect::<Vec<_>>().join(","),
                m.filter.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let head = ["NODE", "CAPTURE", "START", "END", "FRAMES", "OBJECTS", "STOP", "INTERFACES", "FILTER"];
    let mut widths = head.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out
    };
    println!("{}", line(&head));
    for row in &rows {
        println!("{}", line(&row.each_ref().map(String::as_str)));
    }
    Ok(())
}

fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_millis(time_of(ns)).to_string()
}

/// The frames of the captures the selectors match, merged.
struct ReadCaptures<'a> {
    selector: &'a Selector,
    /// Whether selectors besides the window were given.
    selects: bool,
    options: MergeOptions<'a>,
    out: &'a mut dyn std::io::Write,
    /// For pcapng: what was asked, for the file's comment.
    asked: Option<String>,
}

impl AsyncStore<MergeStats> for ReadCaptures<'_> {
    async fn run<S: Sink>(self, sink: Arc<S>, prefix: &str) -> anyhow::Result<MergeStats> {
        let captures = match catalog::list(&*sink, prefix, self.selector, crate::sys::unix_now_ns()).await {
            Ok(listing) => listing.captures,
            // Objects written before the catalog: read through their indexes, every one.
            Err(CatalogError::NoManifests { url, .. }) => {
                if self.selects {
                    bail!(
                        "{url} has no catalog (its objects were written before it existed): only --since \
                         and --until apply to its objects"
                    );
                }
                let found = catalog::uncatalogued(&*sink, prefix).await?;
                eprintln!(
                    "{url} has no catalog (its objects were written before it existed): reading its {} \
                     objects with an index",
                    found.len()
                );
                found
            }
            Err(e) => return Err(e.into()),
        };
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut out = self.out;
        let mut options = self.options;
        if let Some(asked) = &self.asked {
            options.format = Format::Pcapng { comment: section_comment(asked, &captures) };
        }
        let stats = read_captures(sink, &captures, &options, &mut out, |s| {
            if tty {
                eprint!(
                    "\r{} captures, {} objects: {} frames fetched ({} bytes), {} packets written   ",
                    s.captures, s.objects_read, s.frames_fetched, s.bytes_fetched, s.packets
                );
            }
        })
        .await?;
        if tty {
            eprintln!();
        }
        Ok(stats)
    }
}

fn read_prefix(args: ReadArgs) -> anyhow::Result<()> {
    let selector = selector(&args.select)?;
    let (since, until) = window(&args.select)?;
    let filter = match args.filter.join(" ") {
        f if f.trim().is_empty() => None,
        f => Some(compile_cli(&f)?),
    };
    let mut out = output(args.write.as_deref())?;
    let options = MergeOptions {
        since,
        until,
        filter: filter.as_ref(),
        in_flight: args.in_flight.into(),
        format: Format::Pcap,
    };
    let asked = (args.format == FileFormat::Pcapng).then(|| asked(&args));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let stats = runtime
        .block_on(with_store(
            &args.url,
            args.dir.as_deref(),
            &args.store,
            ReadCaptures {
                selector: &selector,
                selects: args.select.selects(),
                options,
                out: &mut out,
                asked,
            },
        ))
        .with_context(|| format!("read {}", args.url))?;
    if args.json {
        eprintln!("{}", serde_json::to_string(&stats)?);
    } else {
        let share = match stats.object_bytes {
            0 => 0.0,
            total => 100.0 * stats.bytes_fetched as f64 / total as f64,
        };
        eprintln!(
            "{} packets from {} captures ({} of {} objects read, {} zstd frames); fetched {} of {} bytes of \
             the objects ({share:.1}%), and {} bytes of indexes",
            stats.packets,
            stats.captures,
            stats.objects_read,
            stats.objects,
            stats.frames_fetched,
            stats.bytes_fetched,
            stats.object_bytes,
            stats.index_bytes
        );
    }
    Ok(())
}
