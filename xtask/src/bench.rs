//! Whole-system benchmarks, with the peers in the same run.
//!
//! `cargo xtask bench capture`: trafgen (pinned to CPU 0) offers the same number of 64-byte
//! frames to a veth end, once per capturer: tapstream (`tapstream capture`, writer pinned to
//! CPU 1), `tcpdump -w` and `netsniff-ng --out` (pinned to CPU 1). For each it reports the
//! frames captured of the frames offered, the CPU time of the capturing process per frame
//! (user + system, from `wait4`'s rusage) and its peak memory. Kernel work done in softirq on
//! the sender's CPU (XDP and the copy into the UMEM for tapstream, the packet socket's copy into
//! its ring for tcpdump and netsniff-ng) is in no capturer's time.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tapstream_testenv::VethPair;

/// Options of `bench capture`.
pub struct CaptureBench {
    /// Frames offered per run.
    pub frames: u64,
    /// Offered rate in frames per second; 0 = as fast as trafgen goes.
    pub rate: u64,
    /// Write to /dev/null instead of a file, to measure the capture without the file system.
    pub null: bool,
    /// Offer frames of which a filter keeps 1%, and filter with it.
    pub one_percent: bool,
    /// Extra arguments for `tapstream capture`.
    pub tapstream_args: Vec<String>,
}

struct Outcome {
    tool: &'static str,
    offered: u64,
    /// Frames the filter keeps of those offered.
    expected: u64,
    send_secs: f64,
    captured: u64,
    cpu_secs: f64,
    user_secs: f64,
    /// Frames the capturer says it lost.
    counted_drops: u64,
    /// Peak resident memory.
    max_rss_mib: f64,
}

pub fn capture(root: &Path, opts: &CaptureBench) -> anyhow::Result<()> {
    crate::cargo(root, None, &["build", "--release", "--package", "tapstream"])?;
    let bin = root.join("target/release/tapstream");
    let work = tempdir()?;
    let cfg = work.join("frame.cfg");
    // 64-byte frames (60 + FCS on a wire). Plain: four random bytes so frames differ. One
    // percent: IPv4/UDP to port 0x27xx, xx counting 0 to 99, so `udp dst port 9984` (0x2700)
    // matches every hundredth frame.
    let (frame, filter): (&str, &[&str]) = if opts.one_percent {
        (
            "{ 0x02,0,0,0,0,0x01, 0x02,0,0,0,0,0x02, c16(0x0800), \
             0x45,0x00, c16(46), c16(0), c16(0), 64, 17, c16(0), 10,0,0,1, 10,0,0,2, \
             c16(1234), 0x27, dinc(0, 99), c16(26), c16(0), fill(0x00, 18) }\n",
            &["udp", "dst", "port", "9984"],
        )
    } else {
        ("{ 0x02,0,0,0,0,0x01, 0x02,0,0,0,0,0x02, c16(0x0800), drnd(4), fill(0x00, 42) }\n", &[])
    };
    std::fs::write(&cfg, frame)?;
    let expected = |offered: u64| if opts.one_percent { offered / 100 } else { offered };
    let mut results = Vec::new();
    for tool in ["tapstream", "tcpdump", "netsniff-ng"] {
        let veth = VethPair::new(1);
        let out = if opts.null { "/dev/null".into() } else { work.join(format!("{tool}.pcap")) };
        let mut cmd = veth.capture_ns.command("taskset");
        cmd.arg("-c").arg("1");
        match tool {
            "tapstream" => {
                cmd.arg(&bin).args(["capture", "-i", &veth.capture_if, "-w"]).arg(&out).args([
                    "--idle",
                    "2s",
                    "--cores",
                    "1",
                    "--drop-unmatched",
                    "--json",
                ]);
                cmd.args(&opts.tapstream_args);
                cmd.args(filter);
                cmd.env("RUST_LOG", "info");
            }
            "tcpdump" => {
                cmd.args(["tcpdump", "-i", &veth.capture_if, "-n", "-B", "65536", "-s", "262144", "-w"])
                    .arg(&out)
                    .args(filter);
            }
            _ => {
                cmd.args(["netsniff-ng", "--in", &veth.capture_if, "--silent", "--out"]).arg(&out);
                if !filter.is_empty() {
                    cmd.arg("--filter").arg(filter.join(" "));
                }
            }
        }
        let mut child =
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("start the capturer")?;
        let pid = child.id() as libc::pid_t;
        let (ready_tx, ready) = std::sync::mpsc::channel();
        // Each tool says it is ready on one of its outputs: tapstream "capturing on" and
        // tcpdump "listening on" on stderr, netsniff-ng "Running!" on stdout.
        let reader = |pipe: Box<dyn std::io::Read + Send>, ready_tx: std::sync::mpsc::Sender<()>| {
            std::thread::spawn(move || {
                let mut all = String::new();
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if ["capturing on", "listening on", "Running!"].iter().any(|m| line.contains(m)) {
                        let _ = ready_tx.send(());
                    }
                    all.push_str(&line);
                    all.push('\n');
                }
                all
            })
        };
        let log = reader(Box::new(child.stderr.take().expect("piped")), ready_tx.clone());
        let out_text = reader(Box::new(child.stdout.take().expect("piped")), ready_tx);
        if ready.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            bail!("{tool} did not start:\n{}", log.join().unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(500));

        let started = Instant::now();
        let mut trafgen = veth.sender_ns.command("taskset");
        trafgen
            .args(["-c", "0", "trafgen", "-o", &veth.sender_if, "-c"])
            .arg(&cfg)
            .args(["-P", "1", "-H", "-n"]);
        trafgen.arg(opts.frames.to_string());
        if opts.rate > 0 {
            trafgen.args(["-b", &format!("{}pps", opts.rate)]);
        }
        let sent = trafgen.stderr(Stdio::null()).output().context("run trafgen")?;
        let send_secs = started.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&sent.stdout);
        let offered: u64 = text
            .lines()
            .find_map(|l| l.trim().strip_suffix("packets outgoing"))
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("trafgen's packet count not found in: {text}"))?;

        if tool != "tapstream" {
            std::thread::sleep(Duration::from_secs(2));
            // SAFETY: plain kill(2) on our own child's pid, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for the kernel to overwrite.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child (not reaped elsewhere: `child` is never waited on)
        // and writes into the two locals.
        if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } != pid {
            bail!("wait4 for {tool}: {}", std::io::Error::last_os_error());
        }
        let log = log.join().unwrap_or_default();
        let stdout = out_text.join().unwrap_or_default();
        let max_rss_mib = usage.ru_maxrss as f64 / 1024.0;
        let cpu_secs = tv(usage.ru_utime) + tv(usage.ru_stime);
        let counted_drops = if tool == "tcpdump" {
            log.lines()
                .find_map(|l| l.strip_suffix(" packets dropped by kernel"))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0)
        } else if tool == "netsniff-ng" {
            stdout
                .lines()
                .find_map(|l| l.trim().strip_suffix("packets failed filter (out of space)"))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0)
        } else {
            let summary: serde_json::Value = serde_json::from_str(&stdout)
                .with_context(|| format!("tapstream summary: {stdout}\n{log}"))?;
            ["dropped_writer", "dropped_kernel", "redirect_errors"]
                .iter()
                .filter_map(|k| summary[k].as_u64())
                .sum()
        };
        let captured = if !opts.null {
            let bytes = std::fs::read(&out).with_context(|| format!("{tool} wrote no file:\n{log}"))?;
            tapstream_pcap::Reader::new(&bytes).map_err(|e| anyhow::anyhow!("{tool}'s file: {e}"))?.count()
                as u64
        } else if tool == "netsniff-ng" {
            stdout
                .lines()
                .find_map(|l| l.trim().strip_suffix("packets passed filter"))
                .and_then(|n| n.trim().parse().ok())
                .with_context(|| format!("netsniff-ng's count not found:\n{stdout}"))?
        } else if tool == "tcpdump" {
            log.lines()
                .find_map(|l| l.strip_suffix(" packets captured"))
                .and_then(|n| n.trim().parse().ok())
                .with_context(|| format!("tcpdump's count not found:\n{log}"))?
        } else {
            let summary: serde_json::Value = serde_json::from_str(&stdout)
                .with_context(|| format!("tapstream summary: {stdout}\n{log}"))?;
            summary["packets"].as_u64().context("packets in the summary")?
        };
        if tool == "tcpdump" {
            eprint!(
                "{}",
                log.lines()
                    .filter(|l| l.contains("packets"))
                    .map(|l| format!("tcpdump: {l}\n"))
                    .collect::<String>()
            );
        }
        results.push(Outcome {
            tool,
            offered,
            expected: expected(offered),
            send_secs,
            captured,
            cpu_secs,
            user_secs: tv(usage.ru_utime),
            counted_drops,
            max_rss_mib,
        });
        drop(veth);
    }
    println!(
        "\n| capturer | frames offered | offered rate (kpps) | wanted | captured | lost | drops it reports | CPU s (user) | CPU ns/captured frame | CPU ns/offered frame | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &results {
        println!(
            "| {} | {} | {:.0} | {} | {} | {:.3}% | {} | {:.2} ({:.2}) | {:.0} | {:.1} | {:.0} |",
            r.tool,
            r.offered,
            r.offered as f64 / r.send_secs / 1000.0,
            r.expected,
            r.captured,
            100.0 * (r.expected.saturating_sub(r.captured)) as f64 / r.expected.max(1) as f64,
            r.counted_drops,
            r.cpu_secs,
            r.user_secs,
            r.cpu_secs * 1e9 / r.captured.max(1) as f64,
            r.cpu_secs * 1e9 / r.offered.max(1) as f64,
            r.max_rss_mib,
        );
    }
    if let [ours, tcpdump, ..] = &results[..] {
        let a = ours.cpu_secs / ours.offered.max(1) as f64;
        let b = tcpdump.cpu_secs / tcpdump.offered.max(1) as f64;
        println!("\ntapstream CPU per offered frame / tcpdump CPU per offered frame = {:.2}", a / b);
    }
    std::fs::remove_dir_all(&work).ok();
    Ok(())
}

fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(tapstream_testenv::unique_name("tsbench"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
