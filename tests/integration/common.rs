//! Running the `tapstream` binary inside a test namespace.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use tapstream::captures::CaptureSummary;
use tapstream_testenv::{CorpusFrame, Netns, VethPair};

/// Path of the tapstream binary under test.
pub fn tapstream_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tapstream")
}

/// A `tapstream` process running in a namespace; killed if dropped unfinished.
pub struct Running {
    child: Option<Child>,
    ready: mpsc::Receiver<()>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    /// Starts `tapstream args...` in `ns`.
    pub fn start(ns: &Netns, args: &[&str]) -> Self {
        Self::start_with_env(ns, args, &[])
    }

    /// Starts `tapstream args...` in `ns` with extra environment variables.
    pub fn start_with_env(ns: &Netns, args: &[&str], env: &[(&str, String)]) -> Self {
        Self::start_until(ns, args, env, "capturing on")
    }

    /// Starts `tapstream args...` in `ns`; it is ready once its log shows `marker`.
    pub fn start_until(ns: &Netns, args: &[&str], env: &[(&str, String)], marker: &'static str) -> Self {
        let mut child = ns
            .command(tapstream_bin())
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tapstream");
        let (tx, ready) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(marker) {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        Self { child: Some(child), ready, stderr }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    /// Waits until the capture is attached and running; panics with the log if it exits.
    pub fn wait_ready(&mut self) {
        match self.ready.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => {}
            Err(_) => {
                let mut child = self.child.take().expect("child");
                let _ = child.kill();
                let status = child.wait().expect("wait");
                let log = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
                panic!("tapstream never became ready ({status}):\n{}", log.join().unwrap_or_default());
            }
        }
    }

    /// Runs `f` while the process is stopped (SIGSTOP, then SIGCONT): what a writer that is
    /// not scheduled meanwhile sees.
    pub fn stopped_while<T>(&self, f: impl FnOnce() -> T) -> T {
        let pid = self.pid() as i32;
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let result = f();
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        result
    }

    /// Sends `signal` and waits for the process to exit; returns its log.
    pub fn signal_and_wait(mut self, signal: i32) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().expect("child");
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().expect("wait tapstream");
        let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        (status, stderr.join().unwrap_or_default())
    }

    /// Waits for the process to exit (it must, by one of its limits) and returns its exit
    /// status, stdout and stderr.
    pub fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        let mut child = self.child.take().expect("child");
        let mut stdout = String::new();
        child.stdout.take().expect("stdout").read_to_string(&mut stdout).expect("read stdout");
        let status = child.wait().expect("wait tapstream");
        let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        (status, stdout, stderr.join().unwrap_or_default())
    }

    /// Like [`Running::finish`], requiring success and a JSON summary on stdout.
    pub fn summary(self) -> CaptureSummary {
        let (status, stdout, stderr) = self.finish();
        // Shown by the test harness when the test fails.
        eprintln!("tapstream log:\n{stderr}");
        assert!(status.success(), "tapstream failed ({status}):\n{stderr}");
        eprintln!("summary: {stdout}");
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("summary is not JSON ({e}):\n{stdout}\n{stderr}"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts a one-shot `tapstream capture -i <capture interface> -w <out> --json <flags>` in the
/// capture namespace of `veth` and waits until it captures. A filter goes last in `flags`.
pub fn capture_to_file(veth: &VethPair, out: &Path, flags: &[&str]) -> Running {
    let args = [&["capture", "-i", &veth.capture_if, "-w", out.to_str().unwrap(), "--json"], flags].concat();
    let mut run = Running::start(&veth.capture_ns, &args);
    run.wait_ready();
    run
}

/// The records of a PCAP file as (wire length, stored bytes), after checking that tshark and
/// capinfos read it cleanly (capinfos with `-M`: without it, 12000 packets read "12 k").
pub fn read_capture(path: &Path) -> Vec<(u32, Vec<u8>)> {
    let capinfos =
        std::process::Command::new("capinfos").args(["-c", "-M"]).arg(path).output().expect("run capinfos");
    assert!(
        capinfos.status.success(),
        "capinfos rejects {}: {}",
        path.display(),
        String::from_utf8_lossy(&capinfos.stderr)
    );
    let tshark = std::process::Command::new("tshark").arg("-r").arg(path).output().expect("run tshark");
    let tshark_err = String::from_utf8_lossy(&tshark.stderr);
    assert!(tshark.status.success(), "tshark rejects {}: {tshark_err}", path.display());
    assert!(
        !tshark_err.contains("cut short") && !tshark_err.contains("isn't a capture file"),
        "tshark: {tshark_err}"
    );

    let bytes = std::fs::read(path).expect("read capture");
    let reader = tapstream_pcap::Reader::new(&bytes).expect("PCAP header");
    assert!(reader.header().nanos, "tapstream writes nanosecond timestamps");
    let records: Vec<_> =
        reader.map(|r| r.map(|r| (r.origlen, r.data.to_vec()))).collect::<Result<_, _>>().expect("records");
    let count: usize = String::from_utf8_lossy(&capinfos.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Number of packets:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("capinfos packet count");
    assert_eq!(count, records.len(), "capinfos and our reader agree on the count");
    records
}

/// Asserts that `stored` holds exactly the frames of `sent`, each as often, in any order (captures
/// taken over several queues interleave them); on failure, says how many differ and shows a few.
pub fn assert_same_frames(
    stored: impl IntoIterator<Item = Vec<u8>>,
    sent: impl IntoIterator<Item = Vec<u8>>,
) {
    let mut counts = std::collections::HashMap::<Vec<u8>, i64>::new();
    let mut n_sent = 0;
    let mut n_stored = 0;
    for f in sent {
        n_sent += 1;
        *counts.entry(f).or_default() += 1;
    }
    for f in stored {
        n_stored += 1;
        *counts.entry(f).or_default() -= 1;
    }
    let missing: Vec<_> = counts.iter().filter(|&(_, &c)| c > 0).collect();
    let extra: Vec<_> = counts.iter().filter(|&(_, &c)| c < 0).collect();
    let show = |v: &[(&Vec<u8>, &i64)]| {
        v.iter()
            .take(3)
            .map(|(f, c)| format!("{} bytes x{}: {:02x?}", f.len(), c.abs(), &f[..f.len().min(24)]))
            .collect::<Vec<_>>()
    };
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{n_sent} frames sent, {n_stored} stored; {} distinct frames missing {:?}; {} distinct frames extra {:?}",
        missing.len(),
        show(&missing),
        extra.len(),
        show(&extra)
    );
}

/// The data of corpus frames.
pub fn data<'a>(frames: impl IntoIterator<Item = &'a CorpusFrame>) -> Vec<Vec<u8>> {
    frames.into_iter().map(|f| f.data.clone()).collect()
}

/// Every file under `dir`, at any depth.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Polls `f` until it returns `Some`, for at most 30 s.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(std::time::Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
