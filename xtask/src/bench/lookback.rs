//! `cargo xtask bench lookback`: what keeping a history costs per frame, how far back a memory
//! budget reaches, and how soon a capture with a lookback has its history stored.
//!
//! trafgen (pinned to CPU 0) offers `--frames` frames of real traffic: the first frames of the
//! corpus (Ethernet, 60 to 1514 bytes), in turn, as one trafgen packet each. One release-built
//! daemon (pinned to CPU 1) runs one capture with the filter `udp port 53` into a local
//! directory, uncompressed; none of these frames is DNS, so the capture keeps nothing and what
//! a history adds is the recording's. Three runs: no history, a plain history,
//! a zstd-compressed history (1 GiB budget each, every frame recorded), and a plain history of
//! 128 MiB, full after a quarter of the run (its buffers then reused: the steady state of a
//! history that has filled). Reported per run:
//! - the daemon's CPU per offered frame (/proc/PID/stat), and the difference recording makes;
//!   recording brings every frame to user space, where without it only the capture's do;
//! - the recorder's own counts (metrics): frames recorded and dropped, and the history's bytes
//!   per recorded frame, from which the horizon a 1 GiB budget holds at 1 Gbit/s of this
//!   traffic;
//! - the daemon's resident memory once the traffic is recorded (VmRSS), and its peak over the
//!   whole run, the replay below included (VmHWM);
//! - the time from a capture request with `--lookback 1h` (all of the history) to that
//!   capture finished with its history stored: `start`, then `stop` at once, then `wait`.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tapstream_testenv::VethPair;

use super::{corpus_trafgen, daemon_cli, offered, pinned_daemon, process_cpu_secs, tempdir, watch_peak_rss};

/// Options of `bench lookback`.
pub struct LookbackBench {
    /// Frames offered per run.
    pub frames: u64,
    /// Corpus frames trafgen sends in turn.
    pub distinct: usize,
}

struct Row {
    history: &'static str,
    offered: u64,
    rss_mib: f64,
    daemon_ns: f64,
    recorded: f64,
    dropped: f64,
    history_bytes: f64,
    peak_rss_mib: f64,
    replay_secs: Option<f64>,
    replayed: u64,
}

pub fn lookback(root: &Path, opts: &LookbackBench) -> anyhow::Result<()> {
    crate::cargo(root, None, &["build", "--release", "--package", "tapstream"])?;
    let bin = root.join("target/release/tapstream");
    let work = tempdir()?;
    let (frames, cfg) = corpus_trafgen(&work, opts.distinct)?;
    let mean_len = frames.iter().map(Vec::len).sum::<usize>() as f64 / frames.len() as f64;
    let mut rows = Vec::new();
    for (history, section) in [
        ("none", ""),
        ("plain, 1 GiB", "[interfaces.tap.lookback]\nmemory_bytes = 1073741824\ncompress = false\n"),
        ("zstd, 1 GiB", "[interfaces.tap.lookback]\nmemory_bytes = 1073741824\ncompress = true\n"),
        ("plain, 128 MiB", "[interfaces.tap.lookback]\nmemory_bytes = 134217728\ncompress = false\n"),
    ] {
        rows.push(run(&bin, &work, &cfg, opts.frames, history, section)?);
    }
    println!(
        "\n{} corpus frames in turn, {mean_len:.0} bytes on average; 1 GiB budget\n\n\
         | history | frames offered | daemon CPU ns/offered frame | added by recording | recorded | recording drops | history bytes/frame | horizon of 1 GiB at 1 Gbit/s | RSS MiB recorded | peak RSS MiB | lookback request to history stored |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        frames.len()
    );
    let base = rows[0].daemon_ns;
    for r in &rows {
        let per_frame = if r.recorded > 0.0 { r.history_bytes / r.recorded } else { 0.0 };
        // 1 Gbit/s of this traffic: 125e6 / mean_len frames a second.
        let horizon =
            if per_frame > 0.0 { (1u64 << 30) as f64 / (per_frame * 125e6 / mean_len) } else { 0.0 };
        println!(
            "| {} | {} | {:.1} | {} | {:.0} | {:.0} | {} | {} | {:.0} | {:.0} | {} |",
            r.history,
            r.offered,
            r.daemon_ns,
            if r.history == "none" { "-".to_owned() } else { format!("{:+.1}", r.daemon_ns - base) },
            r.recorded,
            r.dropped,
            if per_frame > 0.0 { format!("{per_frame:.0}") } else { "-".into() },
            if horizon > 0.0 { format!("{horizon:.0} s") } else { "-".into() },
            r.rss_mib,
            r.peak_rss_mib,
            r.replay_secs.map_or("-".to_owned(), |s| format!("{s:.2} s ({} frames)", r.replayed)),
        );
    }
    std::fs::remove_dir_all(&work).ok();
    Ok(())
}

fn run(
    bin: &Path,
    work: &Path,
    cfg: &Path,
    frames: u64,
    history: &'static str,
    section: &str,
) -> anyhow::Result<Row> {
    let veth = VethPair::new(1);
    let dir = work.join(history.replace([',', ' '], ""));
    std::fs::create_dir_all(&dir)?;
    let (mut daemon, log) = pinned_daemon(
        bin,
        &veth,
        &dir,
        "metrics_listen = \"127.0.0.1:9464\"",
        section,
        "max_duration_secs = 3600",
    )?;
    let pid = daemon.id();
    let peak = watch_peak_rss(pid);
    let socket = dir.join("control.sock");
    let cli = |args: &[&str]| daemon_cli(bin, &socket, args);
    let metrics = || -> String {
        let out = veth.capture_ns.command("curl").args(["-sf", "http://127.0.0.1:9464/metrics"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    };
    let capture = cli(&["start", "-i", "tap", "--duration", "3600s", "udp", "port", "53"])?;
    let capture = capture["id"].as_str().context("capture id")?.to_owned();
    std::thread::sleep(Duration::from_millis(500));
    let cpu_before = process_cpu_secs(pid)?;
    let sent = veth
        .sender_ns
        .command("taskset")
        .args(["-c", "0", "trafgen", "-o", &veth.sender_if, "-c"])
        .arg(cfg)
        .args(["-P", "1", "-H", "-n", &frames.to_string()])
        .stderr(Stdio::null())
        .output()
        .context("run trafgen")?;
    let offered = offered(&sent.stdout)?;
    // Until the writers have taken everything (their frame count stands still for a second).
    let mut last = -1.0;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = metric(&metrics(), "tapstream_writer_frames_total")
            + metric(&metrics(), "tapstream_lookback_recorded_frames_total");
        if now == last {
            break;
        }
        last = now;
    }
    let daemon_secs = process_cpu_secs(pid)? - cpu_before;
    let text = metrics();
    let (recorded, dropped, history_bytes) = (
        metric(&text, "tapstream_lookback_recorded_frames_total")
            - metric(&text, "tapstream_lookback_evicted_frames_total"),
        metric(&text, "tapstream_lookback_dropped_frames_total"),
        metric(&text, "tapstream_lookback_bytes"),
    );
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    cli(&["stop", &capture])?;
    let (replay_secs, replayed) = if section.is_empty() {
        (None, 0)
    } else {
        let asked = Instant::now();
        let info = cli(&["start", "-i", "tap", "--duration", "3600s", "--lookback", "1h"])?;
        let id = info["id"].as_str().context("capture id")?.to_owned();
        cli(&["stop", &id])?;
        let done = cli(&["wait", &id])?;
        let took = asked.elapsed().as_secs_f64();
        (Some(took), done["summary"]["lookback"]["history_frames"].as_u64().unwrap_or(0))
    };
    // SAFETY: plain kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let _ = daemon.wait();
    let _ = log.join();
    let peak_kib = peak.join().unwrap_or(0);
    std::fs::remove_dir_all(&dir).ok();
    eprintln!("history {history}: {offered} offered, {recorded} recorded, {dropped} recording drops");
    Ok(Row {
        history,
        offered,
        rss_mib: rss_kib as f64 / 1024.0,
        daemon_ns: daemon_secs * 1e9 / offered.max(1) as f64,
        recorded,
        dropped,
        history_bytes,
        peak_rss_mib: peak_kib as f64 / 1024.0,
        replay_secs,
        replayed,
    })
}

/// The sum of a metric's series in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
