//! `check-config`, `filter check` and `read`: tools that need no daemon.

use crate::{
    cli::args::*,
    config::Config,
    filter::{
        CaptureFilter, CbpfProgram, FilterError, LoadedFilter,
        compiler::{self, CLI_MAX_FILTER_BYTES},
        program::Instructions,
    },
    store::{dir::DirSink, parse_object_url, read::read_window, s3::S3Sink},
};
use anyhow::{Context as _, bail};

pub fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
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
pub const MIN_TEST_FRAME: usize = 14;
/// Longest (a page less XDP's headroom and tailroom).
pub const MAX_TEST_FRAME: usize = 3_520;

pub fn read(args: ReadArgs) -> anyhow::Result<()> {
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
