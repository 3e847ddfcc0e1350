//! `cargo xtask bench read`: "the packets of this filter in this 10-second window", out of a
//! long capture of several objects in Garage, read two ways:
//! - `tapstream read s3://bucket/prefix --since S --until S+10 FILTER -w FILE`: the catalog
//!   finds the capture, the indexes the zstd frames overlapping the window, and only those
//!   are fetched (ranged GETs);
//! - the way without an index: `aws s3 cp --recursive` of every object, then for each one
//!   `zstd -dc | tcpdump -r - -w` with the filter, `mergecap` of the results and `editcap
//!   -A/-B` to the window (both writing nanosecond PCAP, as the objects are).
//!
//! The capture: trafgen (pinned to CPU 0) offers the first `--distinct` frames of the corpus in
//! turn, at `--rate` frames a second for `--minutes` minutes, to a one-shot `tapstream
//! capture` (pinned to CPU 1) into Garage with a new object every minute. The window is 10 s
//! in the middle of it. Each way runs three times; the table gives the median wall time (and
//! the range), the CPU time of the processes it ran, and the bytes it fetched from the store.
//! Both outputs must hold the same frames, timestamps and bytes, or the bench fails.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use tapstream_testenv::{Garage, Netns, VethPair};

use super::{awscli, corpus_trafgen, offered, tempdir, wait_ready};

/// Options of `bench read`.
pub struct ReadBench {
    /// Length of the capture.
    pub minutes: u64,
    /// Offered frames per second.
    pub rate: u64,
    /// Corpus frames trafgen sends in turn.
    pub distinct: usize,
}

/// The filter both ways apply: one host's packets, about 5% of the frames sent.
const FILTER: &str = "host 192.168.0.30";
/// The window read, in seconds.
const WINDOW_SECS: u64 = 10;
/// Runs of each way.
const RUNS: usize = 3;

/// One run of one way.
struct Run {
    wall_secs: f64,
    cpu_secs: f64,
    fetched: u64,
    frames: Vec<(u64, Vec<u8>)>,
}

pub fn read(root: &Path, opts: &ReadBench) -> anyhow::Result<()> {
    crate::cargo(root, None, &["build", "--release", "--package", "tapstream"])?;
    let bin = root.join("target/release/tapstream");
    let aws = awscli(root)?;
    let work = tempdir()?;
    let veth = VethPair::new(1);
    let ns = &veth.capture_ns;
    let garage = Garage::start_in(ns);
    let url = format!("s3://{}/bench", garage.bucket);

    let (offered, objects, object_bytes, start_ns) = capture(&bin, &veth, &garage, &url, &work, opts)?;
    let since = start_ns / 1_000_000_000 + opts.minutes * 30;
    let until = since + WINDOW_SECS;
    println!(
        "captured {offered} frames offered over {} min into {objects} objects ({object_bytes} bytes); \
         reading `{FILTER}` from {since} to {until} (Unix seconds)",
        opts.minutes
    );

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..RUNS {
        ours.push(tapstream_read(&bin, ns, &garage, &url, &work, since, until)?);
        theirs.push(download_and_filter(&aws, ns, &garage, &url, &work, since, until)?);
    }
    for (a, b) in ours.iter().zip(&theirs) {
        if a.frames != b.frames {
            bail!(
                "the two ways disagree: tapstream read wrote {} frames, the download and tcpdump {}",
                a.frames.len(),
                b.frames.len()
            );
        }
    }
    if ours[0].frames.is_empty() {
        bail!("no frame of the window matched `{FILTER}`: nothing was compared");
    }

    println!(
        "\n{} frames in the window match; median of {RUNS} runs (min-max)\n\n\
         | way | wall time (s) | CPU time (s) | bytes fetched | share of the objects |\n|---|---:|---:|---:|---:|",
        ours[0].frames.len()
    );
    for (way, runs) in [
        ("`tapstream read` with the window and the filter", &ours),
        ("`aws s3 cp --recursive`, `zstd -dc \\| tcpdump -r - -w`, `mergecap`, `editcap -A -B`", &theirs),
    ] {
        let mut wall: Vec<f64> = runs.iter().map(|r| r.wall_secs).collect();
        let mut cpu: Vec<f64> = runs.iter().map(|r| r.cpu_secs).collect();
        wall.sort_by(f64::total_cmp);
        cpu.sort_by(f64::total_cmp);
        let fetched = runs[0].fetched;
        println!(
            "| {way} | {:.2} ({:.2}-{:.2}) | {:.2} ({:.2}-{:.2}) | {fetched} | {:.2}% |",
            wall[RUNS / 2],
            wall[0],
            wall[RUNS - 1],
            cpu[RUNS / 2],
            cpu[0],
            cpu[RUNS - 1],
            100.0 * fetched as f64 / object_bytes.max(1) as f64
        );
    }
    drop(garage);
    std::fs::remove_dir_all(&work).ok();
    Ok(())
}

/// Runs the capture; returns the frames offered, the objects stored and their bytes, and the
/// capture's start (ns since the epoch).
fn capture(
    bin: &Path,
    veth: &VethPair,
    garage: &Garage,
    url: &str,
    work: &Path,
    opts: &ReadBench,
) -> anyhow::Result<(u64, usize, u64, u64)> {
    let (_, cfg) = corpus_trafgen(work, opts.distinct)?;
    let secs = opts.minutes * 60;
    let mut child = veth
        .capture_ns
        .command("taskset")
        .args(["-c", "1"])
        .arg(bin)
        .args(["capture", "-i", &veth.capture_if, "--json", "--upload", url])
        .args(["--duration", &format!("{}s", secs + 5), "--rotate-age", "60s"])
        .args(["--s3-endpoint", &garage.endpoint, "--s3-region", &garage.region, "--s3-path-style"])
        .arg("--spool-dir")
        .arg(work.join("spool"))
        .envs(garage.aws_env())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start tapstream capture")?;
    let log = wait_ready(&mut child, "tapstream", &["capturing on"], false)?;
    eprintln!("offering {} frames a second for {} min", opts.rate, opts.minutes);
    let sent = veth
        .sender_ns
        .command("taskset")
        .args(["-c", "0", "trafgen", "-o", &veth.sender_if, "-c"])
        .arg(&cfg)
        .args(["-P", "1", "-H", "-n", &(opts.rate * secs).to_string(), "-b", &format!("{}pps", opts.rate)])
        .stderr(Stdio::null())
        .output()
        .context("run trafgen")?;
    let offered = offered(&sent.stdout)?;
    let out = child.wait_with_output()?;
    let log = log.join().unwrap_or_default();
    if !out.status.success() {
        bail!("tapstream capture failed:\n{log}");
    }
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).context("the capture's summary")?;
    // Both ways read the same stored frames: a frame the capture lost (a busy machine) changes
    // what they read, not the comparison. Reported all the same.
    let stored = summary["packets"].as_u64().unwrap_or(0);
    if stored != offered {
        println!("the capture stored {stored} of the {offered} frames offered (see its summary's drops)");
    }
    let listing = veth
        .capture_ns
        .command(bin)
        .args(["ls", url, "--json"])
        .args(["--s3-endpoint", &garage.endpoint, "--s3-region", &garage.region, "--s3-path-style"])
        .envs(garage.aws_env())
        .output()
        .context("tapstream ls")?;
    let captures: serde_json::Value = serde_json::from_slice(&listing.stdout)
        .with_context(|| format!("tapstream ls: {}", String::from_utf8_lossy(&listing.stderr)))?;
    let manifest = &captures[0];
    let start_ns = manifest["start_ns"].as_u64().context("the manifest's start_ns")?;
    let objects = manifest["objects"].as_array().context("the manifest's objects")?;
    let object_bytes = objects.iter().filter_map(|o| o["bytes"].as_u64()).sum();
    Ok((offered, objects.len(), object_bytes, start_ns))
}

/// CPU time (user and system) of the children waited for so far.
fn children_cpu_secs() -> f64 {
    // SAFETY: getrusage(2) writes one rusage into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    super::tv(usage.ru_utime) + super::tv(usage.ru_stime)
}

/// Runs `cmd` to success.
fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out =
        cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The frames of a PCAP file: (timestamp in ns, bytes).
fn frames_of(path: &Path) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let reader =
        tapstream_pcap::Reader::new(&bytes).with_context(|| format!("{} is no PCAP file", path.display()))?;
    reader
        .map(|r| r.map(|r| (r.ts_nanos, r.data.to_vec())))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is cut short", path.display()))
}

fn tapstream_read(
    bin: &Path,
    ns: &Netns,
    garage: &Garage,
    url: &str,
    work: &Path,
    since: u64,
    until: u64,
) -> anyhow::Result<Run> {
    let file = work.join("tapstream-read.pcap");
    let cpu = children_cpu_secs();
    let started = Instant::now();
    let out = ns
        .command(bin)
        .args(["read", url, "--since", &since.to_string(), "--until", &until.to_string(), "--json", "-w"])
        .arg(&file)
        .args(["--s3-endpoint", &garage.endpoint, "--s3-region", &garage.region, "--s3-path-style"])
        .arg(FILTER)
        .envs(garage.aws_env())
        .output()
        .context("tapstream read")?;
    let wall_secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("tapstream read failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stats: serde_json::Value = String::from_utf8_lossy(&out.stderr)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .context("tapstream read --json wrote no statistics")?;
    let fetched = stats["bytes_fetched"].as_u64().unwrap_or(0) + stats["index_bytes"].as_u64().unwrap_or(0);
    Ok(Run { wall_secs, cpu_secs: children_cpu_secs() - cpu, fetched, frames: frames_of(&file)? })
}

fn download_and_filter(
    aws: &Path,
    ns: &Netns,
    garage: &Garage,
    url: &str,
    work: &Path,
    since: u64,
    until: u64,
) -> anyhow::Result<Run> {
    let dir = work.join("download");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir)?;
    let cpu = children_cpu_secs();
    let started = Instant::now();
    run(
        ns.command(aws)
            .args(["--endpoint-url", &garage.endpoint, "s3", "cp", "--recursive", url])
            .arg(&dir)
            .args(["--exclude", "*", "--include", "*.pcap.zst"])
            .envs(garage.aws_env())
            .env("AWS_DEFAULT_REGION", &garage.region),
        "aws s3 cp",
    )?;
    let mut objects = Vec::new();
    let mut pending = vec![dir.clone()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.to_string_lossy().ends_with(".pcap.zst") {
                objects.push(path);
            }
        }
    }
    objects.sort();
    let fetched = objects.iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum();
    let mut filtered: Vec<PathBuf> = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        let out = dir.join(format!("filtered-{i}.pcap"));
        let shell = format!(
            "zstd -dc '{}' | tcpdump --time-stamp-precision nano -r - -w '{}' '{FILTER}'",
            object.display(),
            out.display()
        );
        run(Command::new("sh").args(["-c", &shell]), "zstd -dc | tcpdump")?;
        filtered.push(out);
    }
    let merged = dir.join("merged.pcap");
    run(Command::new("mergecap").args(["-F", "nsecpcap", "-w"]).arg(&merged).args(&filtered), "mergecap")?;
    // editcap's -B excludes its time; `--until` includes it.
    let window = work.join("download-window.pcap");
    run(
        Command::new("editcap")
            .args(["-F", "nsecpcap", "-A", &rfc3339(since, 0)?, "-B", &rfc3339(until, 1)?])
            .arg(&merged)
            .arg(&window),
        "editcap",
    )?;
    let wall_secs = started.elapsed().as_secs_f64();
    Ok(Run { wall_secs, cpu_secs: children_cpu_secs() - cpu, fetched, frames: frames_of(&window)? })
}

/// `secs` (Unix seconds) and `nanos` as editcap's -A/-B take them, in UTC.
fn rfc3339(secs: u64, nanos: u32) -> anyhow::Result<String> {
    let out = Command::new("date").args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%S"]).output()?;
    Ok(format!("{}.{nanos:09}Z", String::from_utf8(out.stdout)?.trim()))
}
