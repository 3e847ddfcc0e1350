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
    Bench {
        #[command(subcommand)]
        what: BenchTask,
    },
    /// rustfmt --check and clippy -D warnings on the userspace (stable) and eBPF (nightly) crates.
    Lint,
}

#[derive(Subcommand)]
enum BenchTask {
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
        Task::Bench { what: BenchTask::Capture { frames, rate, null, tapstream_args } } => {
            setup::run(&root)?;
            bench::capture(&root, &bench::CaptureBench { frames, rate, null, tapstream_args })
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
    // Garage runs in the capture namespace, so the capture reaches it on that loopback.
    let garage = tapstream_testenv::Garage::start_in(&veth.capture_ns);
    println!(
        "demo: veth {} (namespace {}) <- {} (namespace {}); Garage at {} in the capture namespace, bucket {}",
        veth.capture_if,
        veth.capture_ns.name(),
        veth.sender_if,
        veth.sender_ns.name(),
        garage.endpoint,
        garage.bucket
    );
    let out_dir = root.join("target/demo");
    std::fs::create_dir_all(&out_dir)?;
    let s3 = ["--s3-endpoint", &garage.endpoint, "--s3-region", &garage.region, "--s3-path-style"];
    // A bounded capture: the first 5,000 frames, or 30 s, or 3 s without traffic, streamed
    // as zstd-compressed objects to the bucket.
    let mut capture = veth
        .capture_ns
        .command(&bin)
        .args(["capture", "-i", &veth.capture_if, "--upload", &format!("s3://{}/demo", garage.bucket)])
        .args(["--packets", "5000", "--duration", "30s", "--idle", "3s", "--id", "demo", "--json"])
        .args(["--spool-dir"])
        .arg(out_dir.join("spool"))
        .args(s3)
        .envs(garage.aws_env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("start tapstream")?;
    let stderr = capture.stderr.take().expect("piped");
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("capturing on") {
                let _ = ready_tx.send(());
            }
            eprintln!("{line}");
        }
    });
    if ready.recv_timeout(std::time::Duration::from_secs(30)).is_err() {
        let _ = capture.kill();
        let _ = log.join();
        bail!("tapstream did not start capturing");
    }
    let frames = tapstream_testenv::corpus_frames();
    let sent = tapstream_testenv::Sender::new(&veth).send_all(&frames);
    println!("demo: replayed {} frames of the tcpdump test corpus into {}", sent.len(), veth.sender_if);
    let output = capture.wait_with_output()?;
    let _ = log.join();
    if !output.status.success() {
        bail!("tapstream capture failed: {}", output.status);
    }
    let summary = String::from_utf8_lossy(&output.stdout);
    println!("demo: capture summary:\n{summary}");
    let parsed: serde_json::Value = serde_json::from_str(&summary).context("the summary is JSON")?;
    let object = parsed["outputs"][0].as_str().context("no object URL in the summary")?.to_owned();
    let pcap = out_dir.join("demo.pcap");
    println!("demo: reading {object} back into {}", pcap.display());
    let read = veth
        .capture_ns
        .command(&bin)
        .args(["read", &object])
        .args(s3)
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
    Ok(())
}
