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

mod lookback;
mod read;
mod trigger;

pub use lookback::{LookbackBench, lookback};
pub use read::{ReadBench, read};
pub use trigger::{TriggerBench, trigger};

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
    /// CPU time of the whole machine from the first frame sent to the capturer's exit: the
    /// sender, the capturer, and the kernel's work for each frame (softirq on either CPU,
    /// which on a veth is mostly charged to the sender).
    system_secs: f64,
}

/// Busy CPU seconds of the whole machine so far, all CPUs (/proc/stat: user, nice, system,
/// irq, softirq; not steal, the time the hypervisor gave to others).
fn machine_busy_secs() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("/proc/stat is empty")?;
    let v: Vec<u64> = cpu.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    anyhow::ensure!(v.len() >= 8, "unexpected /proc/stat: {cpu}");
    let busy = v[0] + v[1] + v[2] + v[5] + v[6];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(busy as f64 / hz)
}

/// Runs trafgen (pinned to CPU 0) in the sender namespace to the end; returns its stdout.
fn run_trafgen(veth: &VethPair, cfg: &Path, opts: &CaptureBench) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut trafgen = veth.sender_ns.command("taskset");
    trafgen.args(["-c", "0", "trafgen", "-o", &veth.sender_if, "-c"]).arg(cfg).args(["-P", "1", "-H", "-n"]);
    trafgen.arg(opts.frames.to_string());
    if opts.rate > 0 {
        trafgen.args(["-b", &format!("{}pps", opts.rate)]);
    }
    let mut child = trafgen.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().context("run trafgen")?;
    let mut out = Vec::new();
    child.stdout.take().context("piped")?.read_to_end(&mut out)?;
    // Its exit status says nothing more: `offered` fails if the count is missing.
    child.wait().context("wait for trafgen")?;
    Ok(out)
}

pub fn capture(root: &Path, opts: &CaptureBench) -> anyhow::Result<()> {
    crate::cargo(root, None, &["build", "--release", "--package", "tapstream"])?;
    let bin = root.join("target/release/tapstream");
    let work = tempdir()?;
    let cfg = work.join("frame.cfg");
    // 64-byte frames (60 + FCS on a wire). Plain: four random bytes so frames differ.
    let (frame, filter): (&str, &[&str]) = if opts.one_percent {
        (ONE_PERCENT_FRAME, &["udp", "dst", "port", "9984"])
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
        let peak_rss = watch_peak_rss(pid as u32);
        let (ready_tx, ready) = std::sync::mpsc::channel();
        // Each tool says it is ready on one of its outputs: tapstream "capturing on" and
        // tcpdump "listening on" on stderr, netsniff-ng "Running!" on stdout.
        const MARKERS: &[&str] = &["capturing on", "listening on", "Running!"];
        let log = log_reader(child.stderr.take().expect("piped"), MARKERS, ready_tx.clone(), false);
        let out_text = log_reader(child.stdout.take().expect("piped"), MARKERS, ready_tx, false);
        if ready.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            bail!("{tool} did not start:\n{}", log.join().unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(500));

        let busy_before = machine_busy_secs()?;
        let started = Instant::now();
        let sent = run_trafgen(&veth, &cfg, opts)?;
        let send_secs = started.elapsed().as_secs_f64();
        let offered = offered(&sent)?;

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
        let system_secs = machine_busy_secs()? - busy_before;
        let log = log.join().unwrap_or_default();
        let stdout = out_text.join().unwrap_or_default();
        // wait4's ru_maxrss would count the RSS the child had between fork and exec (this
        // process's); VmHWM of the capturer's own image is its peak.
        let max_rss_mib = peak_rss.join().unwrap_or(0) as f64 / 1024.0;
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
            system_secs,
        });
        drop(veth);
    }
    // The same traffic to a veth nobody captures on: the kernel's cost of delivering (and
    // discarding) the frames, which every capturer's machine-wide time also holds.
    let baseline = {
        let veth = VethPair::new(1);
        std::thread::sleep(Duration::from_millis(500));
        let busy_before = machine_busy_secs()?;
        let sent = run_trafgen(&veth, &cfg, opts)?;
        std::thread::sleep(Duration::from_secs(2));
        let system_secs = machine_busy_secs()? - busy_before;
        system_secs / offered(&sent)?.max(1) as f64
    };
    println!(
        "\n| capturer | frames offered | offered rate (kpps) | wanted | captured | lost | drops it reports | CPU s (user) | CPU ns/captured frame | CPU ns/offered frame | machine ns/offered frame | beyond no capture | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let beyond = |r: &Outcome| r.system_secs * 1e9 / r.offered.max(1) as f64 - baseline * 1e9;
    for r in &results {
        println!(
            "| {} | {} | {:.0} | {} | {} | {:.3}% | {} | {:.2} ({:.2}) | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} |",
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
            r.system_secs * 1e9 / r.offered.max(1) as f64,
            beyond(r),
            r.max_rss_mib,
        );
    }
    println!("| no capturer | | | | | | | | | | {:.1} | 0 | |", baseline * 1e9);
    if let [ours, tcpdump, ..] = &results[..] {
        let a = ours.cpu_secs / ours.offered.max(1) as f64;
        let b = tcpdump.cpu_secs / tcpdump.offered.max(1) as f64;
        println!("\ntapstream CPU per offered frame / tcpdump CPU per offered frame = {:.2}", a / b);
        println!(
            "tapstream / tcpdump, machine-wide CPU per offered frame beyond delivering it to a veth \
             nobody captures on = {:.2}",
            beyond(ours) / beyond(tcpdump)
        );
    }
    std::fs::remove_dir_all(&work).ok();
    Ok(())
}

/// 64-byte IPv4/UDP frames (60 + FCS on a wire) to port 0x27xx, xx counting 0 to 99 in turn:
/// `udp dst port 9984` (0x2700) matches every hundredth frame, `udp dst port 9984+i` another.
const ONE_PERCENT_FRAME: &str = "{ 0x02,0,0,0,0,0x01, 0x02,0,0,0,0,0x02, c16(0x0800), \
     0x45,0x00, c16(46), c16(0), c16(0), 64, 17, c16(0), 10,0,0,1, 10,0,0,2, \
     c16(1234), 0x27, dinc(0, 99), c16(26), c16(0), fill(0x00, 18) }\n";

/// The frame count trafgen reports sending.
fn offered(trafgen_stdout: &[u8]) -> anyhow::Result<u64> {
    let text = String::from_utf8_lossy(trafgen_stdout);
    text.lines()
        .find_map(|l| l.trim().strip_suffix("packets outgoing"))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("trafgen's packet count not found in: {text}"))
}

/// Reads a child's output line by line on a thread: signals `ready` at the first line holding
/// one of `markers`, echoes each line to stderr if `echo`, and returns all of it at the end.
pub(crate) fn log_reader(
    pipe: impl std::io::Read + Send + 'static,
    markers: &'static [&'static str],
    ready: std::sync::mpsc::Sender<()>,
    echo: bool,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if markers.iter().any(|m| line.contains(m)) {
                let _ = ready.send(());
            }
            if echo {
                eprintln!("{line}");
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    })
}

/// Follows `child`'s stderr (see [`log_reader`]) and waits up to 30 s for one of `markers`;
/// kills the child and fails with its log if none comes.
pub(crate) fn wait_ready(
    child: &mut std::process::Child,
    what: &str,
    markers: &'static [&'static str],
    echo: bool,
) -> anyhow::Result<std::thread::JoinHandle<String>> {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let log = log_reader(child.stderr.take().context("stderr is piped")?, markers, ready_tx, echo);
    if ready.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = child.kill();
        bail!("{what} did not start:\n{}", log.join().unwrap_or_default());
    }
    Ok(log)
}

/// `tapstream capture ACTION --json ARGS...` against the daemon at `socket`, its JSON reply.
/// `--json` comes before the rest: a filter expression takes the words at the end.
pub(crate) fn daemon_cli(bin: &Path, socket: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(bin)
        .arg("capture")
        .arg(args[0])
        .arg("--json")
        .args(&args[1..])
        .env("TAPSTREAM_SOCKET", socket)
        .output()?;
    if !out.status.success() {
        bail!("tapstream capture {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The first `distinct` Ethernet frames of the corpus of 60 to 1514 bytes, and a trafgen
/// configuration in `work` that sends them in turn, one trafgen packet each.
fn corpus_trafgen(work: &Path, distinct: usize) -> anyhow::Result<(Vec<Vec<u8>>, std::path::PathBuf)> {
    let frames: Vec<Vec<u8>> = tapstream_testenv::corpus_frames()
        .into_iter()
        .map(|f| f.data)
        .filter(|d| (60..=1514).contains(&d.len()))
        .take(distinct)
        .collect();
    let cfg = work.join("corpus.cfg");
    let packets: Vec<String> = frames
        .iter()
        .map(|f| format!("{{ {} }}", f.iter().map(|b| format!("{b:#04x}")).collect::<Vec<_>>().join(",")))
        .collect();
    std::fs::write(&cfg, packets.join("\n") + "\n")?;
    Ok((frames, cfg))
}

fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(tapstream_testenv::unique_name("tsbench"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `cargo xtask bench concurrent`: how the cost grows with the number of captures running at
/// once on one interface, each with its own filter.
///
/// For each count N, the daemon runs N captures; capture i keeps `udp dst port 9984+i`, so with
/// the one-percent traffic of `bench capture --one-percent` (destination ports 9984 to 10083 in
/// turn) each keeps its own 1% of the frames and N captures keep N%. Reported per offered frame:
/// the daemon's CPU time (/proc/PID/stat) and, from the kernel's BPF statistics
/// (`kernel.bpf_stats_enabled`), the run time of the XDP program: the kernel counts it for the
/// attached entry program, and that time includes the programs it tail-calls (the generated
/// filter program, which evaluates all N filters, and the redirect).
pub fn concurrent(root: &Path, frames: u64, counts: &[usize]) -> anyhow::Result<()> {
    crate::cargo(root, None, &["build", "--release", "--package", "tapstream"])?;
    let bin = root.join("target/release/tapstream");
    let work = tempdir()?;
    let cfg = work.join("frame.cfg");
    std::fs::write(&cfg, ONE_PERCENT_FRAME)?;
    let stats_were = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")?;
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")?;
    let mut rows = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for &n in counts {
            rows.push(concurrent_run(&bin, &work, &cfg, frames, n)?);
        }
        Ok(())
    })();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_were.trim())?;
    result?;
    println!(
        "\n| captures | frames offered | stored (all captures) | daemon CPU ns/offered frame | XDP ns/frame (entry, filters, redirect) |\n|---:|---:|---:|---:|---:|"
    );
    for r in &rows {
        println!("| {} | {} | {} | {:.1} | {:.1} |", r.captures, r.offered, r.stored, r.daemon_ns, r.xdp_ns);
    }
    std::fs::remove_dir_all(&work).ok();
    Ok(())
}

struct ConcurrentRow {
    captures: usize,
    offered: u64,
    stored: u64,
    daemon_ns: f64,
    xdp_ns: f64,
}

fn concurrent_run(
    bin: &Path,
    work: &Path,
    cfg: &Path,
    frames: u64,
    n: usize,
) -> anyhow::Result<ConcurrentRow> {
    let veth = VethPair::new(1);
    let dir = work.join(format!("daemon{n}"));
    std::fs::create_dir_all(&dir)?;
    let (mut daemon, log) = pinned_daemon(bin, &veth, &dir, "", "", "max_concurrent_captures = 64")?;
    let socket = dir.join("control.sock");
    let cli = |args: &[&str]| daemon_cli(bin, &socket, args);
    let mut ids = Vec::new();
    for i in 0..n {
        let port = (9984 + i).to_string();
        let info = cli(&["start", "-i", "tap", "--duration", "600s", "udp", "dst", "port", &port])?;
        ids.push(info["id"].as_str().context("capture id")?.to_owned());
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = daemon.id();
    let cpu_before = process_cpu_secs(pid)?;
    let xdp_before = prog_stats("tapstream_xdp")?;
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
    // Until every capture has handed on its share (or 20 s).
    let want = offered / 100 * n as u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stored = 0;
    while Instant::now() < deadline {
        let list = cli(&["list"])?;
        stored =
            list.as_array().map_or(0, |a| a.iter().filter_map(|c| c["progress"]["packets"].as_u64()).sum());
        if stored >= want {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let daemon_secs = process_cpu_secs(pid)? - cpu_before;
    let xdp_after = prog_stats("tapstream_xdp")?;
    for id in &ids {
        cli(&["stop", id])?;
    }
    // SAFETY: plain kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let _ = daemon.wait();
    let _ = log.join();
    let per = |(t1, c1): (u64, u64), (t0, c0): (u64, u64)| {
        if c1 > c0 { (t1 - t0) as f64 / (c1 - c0) as f64 } else { 0.0 }
    };
    eprintln!("{n} captures: {stored} of {want} frames stored");
    Ok(ConcurrentRow {
        captures: n,
        offered,
        stored,
        daemon_ns: daemon_secs * 1e9 / offered.max(1) as f64,
        xdp_ns: per(xdp_after, xdp_before),
    })
}

/// Starts the daemon `bin` pinned to CPU 1 in `veth`'s capture namespace, configured in `dir`
/// with the interface `tap` (its writer on CPU 1) and an uncompressed local store, `daemon`
/// added to `[daemon]`, `interface` after `[interfaces.tap]` (its sub-tables) and `limits` to
/// `[limits]`; returns it once ready, with the reader of its log.
fn pinned_daemon(
    bin: &Path,
    veth: &VethPair,
    dir: &Path,
    daemon: &str,
    interface: &str,
    limits: &str,
) -> anyhow::Result<(std::process::Child, std::thread::JoinHandle<String>)> {
    let d = dir.display();
    let config = dir.join("tapstream.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = \"{d}/control.sock\"\nstate_dir = \"{d}/state\"\nnode = \"bench\"\n{daemon}\n\
             [interfaces.tap]\ndevice = \"{}\"\ncores = [1]\n{interface}\n\
             [limits]\n{limits}\n\
             [store]\ndestinations = [\"{d}/store\"]\ncompression = \"none\"\nspool_dir = \"{d}/spool\"\n",
            veth.capture_if
        ),
    )?;
    let mut child = veth
        .capture_ns
        .command("taskset")
        .args(["-c", "1"])
        .arg(bin)
        .args(["daemon", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .context("start the daemon")?;
    let log = wait_ready(&mut child, "the daemon", &["daemon ready"], false)?;
    Ok((child, log))
}

/// User + system CPU seconds of process `pid` so far (all its threads).
fn process_cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// (run time ns, run count) summed over loaded programs named `name` (bpftool's view of the
/// kernel's BPF statistics).
fn prog_stats(name: &str) -> anyhow::Result<(u64, u64)> {
    let out =
        std::process::Command::new("bpftool").args(["prog", "show", "-j"]).output().context("run bpftool")?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    let mut total = (0, 0);
    for p in progs.as_array().into_iter().flatten() {
        if p["name"].as_str().is_some_and(|n| name.starts_with(n) || n.starts_with(name)) {
            total.0 += p["run_time_ns"].as_u64().unwrap_or(0);
            total.1 += p["run_cnt"].as_u64().unwrap_or(0);
        }
    }
    Ok(total)
}

/// `cargo xtask bench s3`: the time from the first frame offered to the capture being a
/// complete object in Garage: tapstream streaming to the store while it captures, against
/// `tcpdump -w` followed by `aws s3 cp` of its file (what a user would otherwise script), with
/// the time tcpdump's file alone takes beside it. trafgen offers `frames` 1000-byte frames
/// (half random bytes, half zeros) at `rate` frames per second, which every path keeps up with.
pub fn s3(root: &Path, frames: u64, rate: u64) -> anyhow::Result<()> {
    crate::cargo(root, None, &["build", "--release", "--package", "tapstream"])?;
    let bin = root.join("target/release/tapstream");
    let aws = awscli(root)?;
    let work = tempdir()?;
    let cfg = work.join("frame.cfg");
    std::fs::write(
        &cfg,
        "{ 0x02,0,0,0,0,0x01, 0x02,0,0,0,0,0x02, c16(0x0800), \
         0x45,0x00, c16(986), c16(0), c16(0), 64, 17, c16(0), 10,0,0,1, 10,0,0,2, \
         c16(1234), c16(5678), c16(966), c16(0), drnd(479), fill(0x00, 479) }\n",
    )?;
    let mut rows = Vec::new();
    for tool in ["tapstream", "tcpdump + aws s3 cp"] {
        let veth = VethPair::new(1);
        let ns = &veth.capture_ns;
        let garage = tapstream_testenv::Garage::start_in(ns);
        let file = work.join("tcpdump.pcap");
        let mut cmd = ns.command("taskset");
        cmd.args(["-c", "1"]);
        if tool == "tapstream" {
            cmd.arg(&bin)
                .args([
                    "capture",
                    "-i",
                    &veth.capture_if,
                    "-c",
                    &frames.to_string(),
                    "--json",
                    "--drop-unmatched",
                ])
                .args(["--upload", &format!("s3://{}/bench", garage.bucket)])
                .args(["--s3-endpoint", &garage.endpoint, "--s3-region", &garage.region, "--s3-path-style"])
                .args(["--compress-threads", "1", "--cores", "1", "--spool-dir"])
                .arg(work.join("spool"))
                .envs(garage.aws_env())
                .env("RUST_LOG", "info");
        } else {
            cmd.args(["tcpdump", "-i", &veth.capture_if, "-n", "-B", "65536", "-s", "262144"])
                .args(["-c", &frames.to_string(), "-w"])
                .arg(&file);
        }
        let mut child =
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("start the capturer")?;
        let log = wait_ready(&mut child, tool, &["capturing on", "listening on"], false)?;
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let sent = veth
            .sender_ns
            .command("taskset")
            .args(["-c", "0", "trafgen", "-o", &veth.sender_if, "-c"])
            .arg(&cfg)
            .args(["-P", "1", "-H", "-n", &frames.to_string(), "-b", &format!("{rate}pps")])
            .stderr(Stdio::null())
            .output()
            .context("run trafgen")?;
        let sent_secs = started.elapsed().as_secs_f64();
        // With frames lost, `-c` is never reached: tcpdump is stopped 5 s after the traffic,
        // as tapstream's --idle 5s stops it.
        let pid = child.id() as libc::pid_t;
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if done_rx.recv_timeout(Duration::from_secs(5)).is_err() {
                // SAFETY: kill(2) has no memory-safety preconditions. The pid is our child's; in
                // the instant between its reaping and `done_tx`, it could only hit a process
                // that took over the pid at once, which a bench host does not see.
                unsafe { libc::kill(pid, libc::SIGINT) };
            }
        });
        let out = child.wait_with_output();
        let _ = done_tx.send(());
        let _ = watchdog.join();
        let out = out?;
        let log = log.join().unwrap_or_default();
        if !out.status.success() {
            bail!("{tool} failed:\n{log}");
        }
        let captured_secs = started.elapsed().as_secs_f64();
        let (stored_bytes, file_secs, stored, drops) = if tool == "tapstream" {
            let summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let drops: u64 = ["dropped_writer", "dropped_kernel", "redirect_errors"]
                .iter()
                .filter_map(|k| summary[k].as_u64())
                .sum();
            (summary["bytes"].as_u64().unwrap_or(0), None, summary["packets"].as_u64().unwrap_or(0), drops)
        } else {
            let file_secs = captured_secs;
            // aws runs in the capture namespace, where Garage listens.
            let status = ns
                .command(&aws)
                .args(["--endpoint-url", &garage.endpoint, "s3", "cp"])
                .arg(&file)
                .arg(format!("s3://{}/bench/tcpdump.pcap", garage.bucket))
                .envs(garage.aws_env())
                .env("AWS_DEFAULT_REGION", &garage.region)
                .stdout(Stdio::null())
                .status()
                .context("run aws s3 cp")?;
            if !status.success() {
                bail!("aws s3 cp failed");
            }
            let count = |suffix: &str| {
                log.lines()
                    .find_map(|l| l.strip_suffix(suffix))
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            (
                std::fs::metadata(&file)?.len(),
                Some(file_secs),
                count(" packets captured"),
                count(" packets dropped by kernel"),
            )
        };
        let total = started.elapsed().as_secs_f64();
        let offered = offered(&sent.stdout).unwrap_or(0);
        rows.push((tool, offered, sent_secs, file_secs, total, stored_bytes, stored, drops));
        drop(garage);
    }
    println!(
        "\n| path | frames offered | offered for (s) | frames stored | drops counted | file written after (s) | object complete after (s) | bytes |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (tool, offered, sent, file, total, bytes, stored, drops) in &rows {
        println!(
            "| {tool} | {offered} | {sent:.2} | {stored} | {drops} | {} | {total:.2} | {bytes} |",
            file.map_or("-".to_owned(), |f| format!("{f:.2}"))
        );
    }
    std::fs::remove_dir_all(&work).ok();
    Ok(())
}

/// The `aws` command, installed into `.tools/awscli` (a Python virtual environment) on first use.
fn awscli(root: &Path) -> anyhow::Result<std::path::PathBuf> {
    let venv = root.join(".tools/awscli");
    let aws = venv.join("bin/aws");
    if !aws.exists() {
        crate::status(std::process::Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        crate::status(std::process::Command::new(venv.join("bin/pip")).args(["install", "-q", "awscli"]))?;
    }
    Ok(aws)
}

/// Follows process `pid`'s peak resident memory (VmHWM, KiB) until it exits.
fn watch_peak_rss(pid: u32) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        // The status file stays readable until the process is reaped; a zombie has no VmHWM.
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if status.lines().any(|l| l.starts_with("State:") && l.contains("zombie")) {
                break;
            }
            if let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak = peak.max(kib);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        peak
    })
}
