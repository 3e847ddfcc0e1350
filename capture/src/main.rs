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
    pipeline::InterfaceConfig,
    session::{CaptureSummary, capture_to_file},
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
    /// Capture from an interface until the first limit, into a local PCAP file.
    Capture(CaptureArgs),
}

#[derive(Args, Debug)]
struct CaptureArgs {
    /// Interface to capture from.
    #[arg(short, long = "iface", value_name = "IF")]
    interface: String,
    /// PCAP file to write (nanosecond timestamps).
    #[arg(short, long, value_name = "FILE.pcap")]
    write: PathBuf,
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
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ZeroCopyArg {
    Auto,
    Required,
    Off,
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
        Command::Capture(args) => capture(args),
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
    let spec = CaptureSpec { id: args.id.clone(), filter: None, snaplen: args.snaplen };
    let limits =
        Limits { packets: args.packets, bytes: args.bytes, duration: args.duration, idle: args.idle };

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("install signal handler")?;
    }
    let tty = std::io::stderr().is_terminal() && !args.json;
    let summary = capture_to_file(config, spec, limits, &args.write, &stop, |packets, bytes, elapsed| {
        if tty {
            eprint!("\r{packets} packets, {bytes} bytes, {:.1} s   ", elapsed.as_secs_f64());
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
    fn byte_counts() {
        assert_eq!(parse_bytes("123"), Ok(123));
        assert_eq!(parse_bytes("10M"), Ok(10_000_000));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert!(parse_bytes("12 parsecs").unwrap_err().contains("unknown byte unit"));
        assert!(parse_bytes("x").is_err());
    }
}
