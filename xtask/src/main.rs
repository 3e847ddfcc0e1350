//! Developer tasks: `cargo xtask setup | test | demo | lint`.
//!
//! xtask only orchestrates: it installs tools, prepares environments (through the
//! `tapstream-testenv` crate) and runs cargo and the `tapstream` binary.

mod bench;
mod setup;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use std::{
    path::{Path, PathBuf},
    process::Command,
};

#[derive(Parser)]
#[command(about = "tapstream developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install (idempotently) the toolchains, bpf-linker, Garage and the Debian packages.
    Setup,
    /// Set up, then run every test (unit and integration).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, then run a bounded capture on the local defaults and read the result back.
    Demo,
    /// Whole-system benchmarks (see BENCHMARKS.md).
    /// Without a subcommand: every whole-system benchmark in turn (capture at rising rates,
    /// the 1% filter, concurrent captures, capture to S3, fleet trigger latency, lookback, reading
    /// a window back), each printing
    /// its table.
    Bench {
        #[command(subcommand)]
        what: Option<BenchTask>,
    },
    /// rustfmt --check and clippy -D warnings on the userspace (stable) and eBPF (nightly) crates.
    Lint,
}

#[derive(Subcommand)]
enum BenchTask {
    /// Time from the first frame to a complete object in Garage: tapstream streaming, against
    /// `tcpdump -w` then `aws s3 cp`.
    S3 {
        /// Frames offered (1000 bytes each).
        #[arg(long, default_value_t = 300_000)]
        frames: u64,
        /// Offered rate in frames per second.
        #[arg(long, default_value_t = 100_000)]
        rate: u64,
    },
    /// CPU per offered frame as the daemon runs more captures at once, each with its own
    /// filter keeping 1%: the daemon's time and the XDP programs' run time.
    Concurrent {
        /// Frames offered per run.
        #[arg(long, default_value_t = 2_000_000)]
        frames: u64,
        /// Numbers of captures to run at once.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,32")]
        captures: Vec<usize>,
    },
    /// Fleet requests through a real redis-server to one daemon: the time from publishing a
    /// request to its `accepted` and `started` events and to its capture's first frame, and
    /// the requests per second the daemon decides.
    Trigger {
        /// Requests of the latency run, one after another.
        #[arg(long, default_value_t = 100)]
        requests: usize,
        /// Requests published at once in each throughput run (accepted, then refused for a
        /// cap); 0: no throughput run.
        #[arg(long, default_value_t = 200)]
        burst: usize,
    },
    /// What keeping a lookback history costs per frame (none, plain, zstd), the horizon of a
    /// 1 GiB budget, and the time from a lookback request to its history stored.
    Lookback {
        /// Frames offered per run.
        #[arg(long, default_value_t = 2_000_000)]
        frames: u64,
        /// Corpus frames trafgen sends in turn.
        #[arg(long, default_value_t = 1000)]
        distinct: usize,
    },
    /// A 10-second window with a filter out of a long multi-object capture in Garage:
    /// `tapstream read` (ranged GETs of the indexed frames) against downloading every object
    /// and filtering it with tcpdump; time, CPU and bytes fetched.
    Read {
        /// Length of the capture, in minutes.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Offered rate in frames per second.
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        /// Corpus frames trafgen sends in turn.
        #[arg(long, default_value_t = 1000)]
        distinct: usize,
    },
    /// tapstream vs `tcpdump -w` on a veth fed by trafgen: frames captured, CPU per frame.
    Capture {
        /// Frames offered to each capturer.
        #[arg(long, default_value_t = 2_000_000)]
        frames: u64,
        /// Offered rate in frames per second (0: as fast as trafgen goes).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Write to /dev/null: the capture's cost without the file system's.
        #[arg(long)]
        null: bool,
        /// Offer UDP frames whose destination port cycles over 100 values, and give every
        /// capturer the filter `udp dst port 9984`, which keeps 1% of them.
        #[arg(long)]
        one_percent: bool,
        /// Extra arguments for `tapstream capture` (e.g. --batch-wait 1ms).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        tapstream_args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup::run(&root),
        Task::Test { args } => {
            setup::run(&root)?;
            cargo(
                &root,
                None,
                &[&["test", "--workspace", "--exclude", "capture-ebpf"], &as_strs(&args)[..]].concat(),
            )
        }
        Task::Demo => {
            setup::run(&root)?;
            demo(&root)
        }
        Task::Lint => lint(&root),
        Task::Bench { what: None } => {
            setup::run(&root)?;
            for rate in [100_000, 200_000, 300_000, 0] {
                println!("\n## bench capture --frames 2000000 --rate {rate}");
                let opts = bench::CaptureBench {
                    frames: 2_000_000,
                    rate,
                    null: false,
                    one_percent: false,
                    tapstream_args: Vec::new(),
                };
                bench::capture(&root, &opts)?;
            }
            println!("\n## bench capture --frames 5000000 --one-percent");
            let opts = bench::CaptureBench {
                frames: 5_000_000,
                rate: 0,
                null: false,
                one_percent: true,
                tapstream_args: Vec::new(),
            };
            bench::capture(&root, &opts)?;
            println!("\n## bench concurrent --frames 2000000 --captures 1,4,16,32");
            bench::concurrent(&root, 2_000_000, &[1, 4, 16, 32])?;
            println!("\n## bench s3 --frames 300000 --rate 100000");
            bench::s3(&root, 300_000, 100_000)?;
            println!("\n## bench trigger --requests 100 --burst 200");
            bench::trigger(&root, &bench::TriggerBench { requests: 100, burst: 200 })?;
            println!("\n## bench lookback --frames 2000000");
            bench::lookback(&root, &bench::LookbackBench { frames: 2_000_000, distinct: 1000 })?;
            println!("\n## bench read --minutes 10 --rate 5000");
            bench::read(&root, &bench::ReadBench { minutes: 10, rate: 5000, distinct: 1000 })
        }
        Task::Bench { what: Some(BenchTask::Lookback { frames, distinct }) } => {
            setup::run(&root)?;
            bench::lookback(&root, &bench::LookbackBench { frames, distinct })
        }
        Task::Bench { what: Some(BenchTask::Read { minutes, rate, distinct }) } => {
            setup::run(&root)?;
            bench::read(&root, &bench::ReadBench { minutes, rate, distinct })
        }
        Task::Bench { what: Some(BenchTask::Trigger { requests, burst }) } => {
            setup::run(&root)?;
            bench::trigger(&root, &bench::TriggerBench { requests, burst })
        }
        Task::Bench { what: Some(BenchTask::S3 { frames, rate }) } => {
            setup::run(&root)?;
            bench::s3(&root, frames, rate)
        }
        Task::Bench { what: Some(BenchTask::Concurrent { frames, captures }) } => {
            setup::run(&root)?;
            bench::concurrent(&root, frames, &captures)
        }
        Task::Bench {
            what: Some(BenchTask::Capture { frames, rate, null, one_percent, tapstream_args }),
        } => {
            setup::run(&root)?;
            bench::capture(&root, &bench::CaptureBench { frames, rate, null, one_percent, tapstream_args })
        }
    }
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The workspace root (the parent of this crate's folder).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_path_buf()
}

/// Runs `cargo [+toolchain] args...` in `dir`, failing if it fails.
fn cargo(dir: &Path, toolchain: Option<&str>, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    if let Some(toolchain) = toolchain {
        cmd.arg(format!("+{toolchain}"));
    }
    cmd.args(args).current_dir(dir);
    status(&mut cmd)
}

/// Runs a command, failing with the command line if it fails.
fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn lint(root: &Path) -> anyhow::Result<()> {
    let nightly = setup::nightly(root)?;
    cargo(root, None, &["fmt", "--all", "--", "--check"])?;
    cargo(
        root,
        None,
        &["clippy", "--workspace", "--exclude", "capture-ebpf", "--all-targets", "--", "-D", "warnings"],
    )?;
    let ebpf = root.join("capture-ebpf");
    cargo(&ebpf, Some(&nightly), &["fmt", "--", "--check"])?;
    cargo(
        &ebpf,
        Some(&nightly),
        &["clippy", "--target", "bpfel-unknown-none", "-Z", "build-std=core", "--", "-D", "warnings"],
    )
}

fn demo(root: &Path) -> anyhow::Result<()> {
    cargo(root, None, &["build", "--release", "--package", "tapstream"])?;
    let bin = root.join("target/release/tapstream");
    let veth = tapstream_testenv::VethPair::new(1);
    // Garage, the daemon and Prometheus run in the capture namespace and meet on its loopback.
    let ns = &veth.capture_ns;
    let garage = tapstream_testenv::Garage::start_in(ns);
    println!(
        "demo: veth {} (namespace {}) <- {} (namespace {}); Garage at {} in the capture namespace, bucket {}",
        veth.capture_if,
        ns.name(),
        veth.sender_if,
        veth.sender_ns.name(),
        garage.endpoint,
        garage.bucket
    );
    let out_dir = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir)?;
    let d = out_dir.display();
    let config = out_dir.join("tapstream.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = \"{d}/control.sock\"\nstate_dir = \"{d}/state\"\nmetrics_listen = \"127.0.0.1:9464\"\nnode = \"demo\"\n\n\
             [interfaces.tap]\ndevice = \"{}\"\n\n\
             [store]\ndestinations = [\"s3://{}/captures\"]\ns3_endpoint = \"{}\"\ns3_region = \"{}\"\ns3_path_style = true\nspool_dir = \"{d}/spool\"\n",
            veth.capture_if, garage.bucket, garage.endpoint, garage.region
        ),
    )?;
    println!("demo: daemon configuration {}", config.display());
    status(Command::new(&bin).arg("check-config").arg(&config))?;

    // Prometheus scrapes the daemon every second.
    let prometheus = tapstream_testenv::Prometheus::start_in(ns, &out_dir);

    let mut daemon = ns
        .command(&bin)
        .args(["daemon", "--config"])
        .arg(&config)
        .envs(garage.aws_env())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("start tapstream daemon")?;
    let log = bench::wait_ready(&mut daemon, "the tapstream daemon", &["daemon ready"], true)?;
    let daemon = KillOnDrop(daemon);
    let socket = out_dir.join("control.sock");
    let cli = |args: &[&str]| bench::daemon_cli(&bin, &socket, args);
    // A bounded capture: IPv4 and IPv6 frames only, the first 5,000, or 30 s, or 3 s without
    // traffic, streamed as zstd-compressed objects to the bucket.
    println!("demo: tapstream capture start -i tap -c 5000 --duration 30s --idle 3s --id demo ip or ip6");
    cli(&[
        "start",
        "-i",
        "tap",
        "-c",
        "5000",
        "--duration",
        "30s",
        "--idle",
        "3s",
        "--id",
        "demo",
        "ip",
        "or",
        "ip6",
    ])?;
    let frames = tapstream_testenv::corpus_frames();
    let sent = tapstream_testenv::Sender::new(&veth).send_all(&frames);
    println!("demo: replayed {} frames of the tcpdump test corpus into {}", sent.len(), veth.sender_if);
    let info = cli(&["wait", "demo"])?;
    let summary = &info["summary"];
    println!("demo: capture summary:\n{}", serde_json::to_string_pretty(summary)?);
    let object = summary["outputs"][0].as_str().context("no object URL in the summary")?.to_owned();
    let pcap = out_dir.join("demo.pcap");
    println!("demo: reading {object} back into {}", pcap.display());
    let read = ns
        .command(&bin)
        .args([
            "read",
            &object,
            "--s3-endpoint",
            &garage.endpoint,
            "--s3-region",
            &garage.region,
            "--s3-path-style",
        ])
        .envs(garage.aws_env())
        .output()
        .context("run tapstream read")?;
    if !read.status.success() {
        bail!("tapstream read failed: {}", String::from_utf8_lossy(&read.stderr));
    }
    std::fs::write(&pcap, &read.stdout)?;
    status(Command::new("capinfos").arg(&pcap))?;
    let tshark = Command::new("tshark").arg("-r").arg(&pcap).output().context("run tshark")?;
    let text = String::from_utf8_lossy(&tshark.stdout);
    println!("demo: tshark reads {} frames; the first five:", text.lines().count());
    for line in text.lines().take(5) {
        println!("  {line}");
    }

    // What Prometheus scraped from the daemon meanwhile.
    let query = |expr: &str| prometheus.query(expr);
    let packets = summary["packets"].as_f64().unwrap_or(-1.0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while query("sum(tapstream_writer_records_total)") != Some(packets)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    println!("demo: Prometheus (http://127.0.0.1:9090 in namespace {}) has scraped:", ns.name());
    for expr in [
        "sum(tapstream_xdp_seen_frames_total)",
        "sum(tapstream_xdp_matched_frames_total)",
        "sum(tapstream_writer_records_total)",
        "sum(tapstream_upload_bytes_total)",
        "sum(tapstream_captures_ended_total)",
    ] {
        println!("  {expr} = {}", query(expr).map_or("(none)".into(), |v| v.to_string()));
    }
    if query("sum(tapstream_writer_records_total)") != Some(packets) {
        bail!("Prometheus does not show the capture's {packets} packets");
    }
    drop(daemon);
    let _ = log.join();
    Ok(())
}

/// A child process killed (SIGTERM, then waited for) when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}
