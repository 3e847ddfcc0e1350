//! The daemon and its control API: bounded captures on request, with real traffic on a veth,
//! the CLI as an operator runs it, and objects in a local store read back with tshark.

use std::{
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use tapstream::control::{CaptureInfo, CaptureState, client::Client};
use tapstream_testenv::{CORPUS_RING_SIZE, CorpusFrame, Sender, VethPair, corpus_frames};

use crate::{
    common::{Running, read_capture, tapstream_bin, walk},
    upload::leave_spool,
};

/// A daemon in the capture namespace of a veth pair, with its socket, state and a local store
/// in a temporary directory. Objects are stored uncompressed (plain PCAP) so that tshark reads
/// them directly.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub running: Option<Running>,
    config: PathBuf,
    /// Its `daemon.node` (`testnode` unless started with [`TestDaemon::start_as`]).
    pub node: String,
    /// Extra environment of the daemon process (e.g. S3 credentials).
    env: Vec<(&'static str, String)>,
}

/// The `[store]` section of [`TestDaemon::start`]: a local directory, plain PCAP.
pub(crate) fn local_store(d: &str) -> String {
    format!(
        "destinations = [\"{d}/store\"]\ncompression = \"none\"\nspool_dir = \"{d}/spool\"\nrotate_age_secs = 1\n"
    )
}

impl TestDaemon {
    pub fn start(veth: &VethPair, extra: &str) -> Self {
        Self::start_with_limits(veth, extra, "")
    }

    /// Like [`TestDaemon::start`], with `node` as `daemon.node`.
    pub fn start_as(veth: &VethPair, node: &str, extra: &str) -> Self {
        Self::start_full(veth, node, extra, "", local_store, Vec::new())
    }

    /// Like [`TestDaemon::start_as`], with `env` in the daemon's environment.
    pub fn start_as_with_env(
        veth: &VethPair,
        node: &str,
        extra: &str,
        env: Vec<(&'static str, String)>,
    ) -> Self {
        Self::start_full(veth, node, extra, "", local_store, env)
    }

    /// Like [`TestDaemon::start`], with `limits` added to the `[limits]` section.
    pub fn start_with_limits(veth: &VethPair, extra: &str, limits: &str) -> Self {
        Self::start_full(veth, "testnode", extra, limits, local_store, Vec::new())
    }

    /// Like [`TestDaemon::start`], with the `[store]` section `store(dir)` (`dir`: the daemon's
    /// temporary directory) and `env` in the daemon's environment.
    pub fn start_with_store(
        veth: &VethPair,
        extra: &str,
        store: impl FnOnce(&str) -> String,
        env: Vec<(&'static str, String)>,
    ) -> Self {
        Self::start_full(veth, "testnode", extra, "", store, env)
    }

    fn start_full(
        veth: &VethPair,
        node: &str,
        extra: &str,
        limits: &str,
        store: impl FnOnce(&str) -> String,
        env: Vec<(&'static str, String)>,
    ) -> Self {
        Self::start_aliased(veth, node, "tap", extra, limits, store, env)
    }

    /// The daemon of every other constructor, with `alias` as the veth's interface alias.
    pub fn start_aliased(
        veth: &VethPair,
        node: &str,
        alias: &str,
        extra: &str,
        limits: &str,
        store: impl FnOnce(&str) -> String,
        env: Vec<(&'static str, String)>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Others may use the socket (the test drops privileges for one request).
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let d = dir.path().display().to_string();
        let config = dir.path().join("tapstream.toml");
        // Eight captures at once unless the test says otherwise.
        let cap =
            if limits.contains("max_concurrent_captures") { "" } else { "max_concurrent_captures = 8\n" };
        std::fs::write(
            &config,
            format!(
                "[daemon]\nsocket = \"{d}/control.sock\"\nstate_dir = \"{d}/state\"\nnode = \"{node}\"\n{extra}\n\
                 [interfaces.{alias}]\ndevice = \"{}\"\ndrop_unmatched = false\nring_size = {CORPUS_RING_SIZE}\n\
                 [limits]\nmax_duration_secs = 600\nmax_packets = 100000\n{cap}{limits}\n\
                 [store]\n{}",
                veth.capture_if,
                store(&d)
            ),
        )
        .unwrap();
        let mut daemon = Self { dir, running: None, config, node: node.to_owned(), env };
        daemon.restart(veth);
        daemon
    }

    /// Starts the daemon process (again).
    pub fn restart(&mut self, veth: &VethPair) {
        let mut running = Running::start_until(
            &veth.capture_ns,
            &["daemon", "--config", self.config.to_str().unwrap()],
            &self.env,
            "daemon ready",
        );
        running.wait_ready();
        self.running = Some(running);
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// The local directory the daemon stores captures in (its one destination).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn client(&self) -> Client {
        Client::new(self.socket())
    }

    /// Runs `tapstream capture ARGS --socket SOCKET`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(tapstream_bin())
            .arg("capture")
            .args(args)
            .env("TAPSTREAM_SOCKET", self.socket())
            .output()
            .expect("run tapstream")
    }

    /// Starts a capture with the CLI and returns its id.
    pub fn start_capture(&self, args: &[&str]) -> String {
        let out = self.cli(&[&["start", "--json"], args].concat());
        assert!(out.status.success(), "capture start {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let info: CaptureInfo = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info.state, CaptureState::Running);
        info.id
    }

    /// Waits for capture `id` to end and returns it.
    pub fn wait(&self, id: &str) -> CaptureInfo {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let info = self.client().wait(id, Duration::from_secs(5)).unwrap();
            if info.state != CaptureState::Running {
                return info;
            }
            assert!(Instant::now() < deadline, "capture {id} never ended: {info:?}");
        }
    }

    /// Every frame stored for capture `id`, in object order.
    pub fn stored(&self, id: &str) -> Vec<Vec<u8>> {
        self.stored_in(&self.dir.path().join("store").join(&self.node).join(id))
    }

    /// Every frame stored for interface `alias` of capture `id` over several, in object order.
    pub fn stored_part(&self, id: &str, alias: &str) -> Vec<Vec<u8>> {
        self.stored_in(&self.dir.path().join("store").join(&self.node).join(id).join(alias))
    }

    fn stored_in(&self, dir: &std::path::Path) -> Vec<Vec<u8>> {
        let mut objects: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "pcap"))
                .collect(),
            Err(_) => return Vec::new(),
        };
        objects.sort();
        objects.iter().flat_map(|p| read_capture(p)).map(|(_, data)| data).collect()
    }
}

/// The corpus frames the sender can send, in order.
pub fn sendable(veth: &VethPair) -> Vec<CorpusFrame> {
    let sender = Sender::new(veth);
    corpus_frames().into_iter().filter(|f| sender.can_send(&f.data)).collect()
}

pub fn data(frames: &[&CorpusFrame]) -> Vec<Vec<u8>> {
    frames.iter().map(|f| f.data.clone()).collect()
}

pub fn reason(info: &CaptureInfo) -> &'static str {
    info.summary.as_ref().unwrap_or_else(|| panic!("no summary: {info:?}")).stop_reason.as_str()
}

#[test]
fn the_packet_limit_ends_the_capture_with_exactly_that_many_frames() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let id = daemon.start_capture(&["-i", "tap", "-c", "250", "--duration", "60s"]);
    let frames = sendable(&veth);
    let sent = Sender::new(&veth).send_all(&frames[..1000]);
    let info = daemon.wait(&id);
    assert_eq!(reason(&info), "packets");
    assert_eq!(info.summary.as_ref().unwrap().packets, 250);
    assert!(daemon.stored(&id) == data(&sent[..250]), "the first 250 frames sent, in order");
}

#[test]
fn the_byte_limit_ends_the_capture_below_it() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let limit: u64 = 100_000;
    let id = daemon.start_capture(&["-i", "tap", "--bytes", &limit.to_string(), "--duration", "60s"]);
    let frames = sendable(&veth);
    let sent = Sender::new(&veth).send_all(&frames[..2000]);
    let info = daemon.wait(&id);
    assert_eq!(reason(&info), "bytes");
    let mut total = 0u64;
    let expected: Vec<&CorpusFrame> = sent
        .iter()
        .take_while(|f| {
            total += f.data.len() as u64;
            total <= limit
        })
        .copied()
        .collect();
    let stored = daemon.stored(&id);
    let stored_bytes: u64 = stored.iter().map(|f| f.len() as u64).sum();
    assert!(stored_bytes <= limit, "{stored_bytes} bytes stored, limit {limit}");
    assert!(
        stored == data(&expected),
        "stored {} frames, expected the first {}",
        stored.len(),
        expected.len()
    );
    assert_eq!(info.summary.as_ref().unwrap().bytes, stored_bytes);
}

#[test]
fn the_duration_ends_the_capture_while_traffic_goes_on() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let frames = sendable(&veth);
    let id = daemon.start_capture(&["-i", "tap", "--duration", "2s"]);
    // Traffic for about twice as long as the capture: a frame every 10 ms.
    let sender = Sender::new(&veth);
    let mut sent = Vec::new();
    let start = Instant::now();
    for frame in frames.iter().take(400) {
        sender.send(&frame.data).unwrap();
        sent.push(frame);
        std::thread::sleep(Duration::from_millis(10));
        if start.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    let info = daemon.wait(&id);
    assert_eq!(reason(&info), "duration");
    let elapsed = info.summary.as_ref().unwrap().elapsed_secs;
    assert!(elapsed >= 2.0, "ended after {elapsed} s");
    let stored = daemon.stored(&id);
    assert!(!stored.is_empty() && stored.len() < sent.len(), "{} of {} frames", stored.len(), sent.len());
    assert!(stored == data(&sent[..stored.len()]), "what was stored is the frames sent first, in order");
}

#[test]
fn the_idle_timeout_ends_the_capture_after_the_traffic() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let frames = sendable(&veth);
    let id = daemon.start_capture(&["-i", "tap", "--idle", "1s", "--duration", "60s"]);
    let sent = Sender::new(&veth).send_all(&frames[..500]);
    let info = daemon.wait(&id);
    assert_eq!(reason(&info), "idle");
    assert!(info.summary.as_ref().unwrap().elapsed_secs < 30.0);
    assert!(daemon.stored(&id) == data(&sent), "every frame of the burst");
}

#[test]
fn three_concurrent_captures_with_their_own_filters_and_limits() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let frames = sendable(&veth);
    let tcp = daemon.start_capture(&["-i", "tap", "-c", "40", "--duration", "60s", "tcp"]);
    let dns = daemon.start_capture(&["-i", "tap", "--idle", "2s", "--duration", "60s", "udp", "port", "53"]);
    let all = daemon.start_capture(&["-i", "tap", "--bytes", "50000", "--duration", "60s"]);
    let sent = Sender::new(&veth).send_all(&frames);
    let matching = |expression: &str| {
        let filter = tapstream::filter::CbpfProgram::compile(expression).unwrap();
        sent.iter().filter(|f| filter.matches(&f.data, f.data.len() as u32)).copied().collect::<Vec<_>>()
    };

    let info = daemon.wait(&tcp);
    assert_eq!(reason(&info), "packets");
    assert!(daemon.stored(&tcp) == data(&matching("tcp")[..40]));

    let info = daemon.wait(&dns);
    assert_eq!(reason(&info), "idle");
    let expected = matching("udp port 53");
    assert!(expected.len() > 10);
    assert!(daemon.stored(&dns) == data(&expected), "every DNS frame, nothing else");

    let info = daemon.wait(&all);
    assert_eq!(reason(&info), "bytes");
    let mut total = 0;
    let expected: Vec<&CorpusFrame> = sent
        .iter()
        .take_while(|f| {
            total += f.data.len();
            total <= 50_000
        })
        .copied()
        .collect();
    assert!(daemon.stored(&all) == data(&expected));

    let list = daemon.client().list().unwrap();
    assert_eq!(list.len(), 3);
    assert!(list.iter().all(|c| c.state == CaptureState::Finished));
}

#[test]
fn bad_requests_are_refused_with_the_reason_and_disturb_nothing() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let frames = sendable(&veth);
    let running = daemon.start_capture(&["-i", "tap", "--idle", "2s", "--duration", "60s", "arp"]);
    let client = daemon.client();

    // Above a cap: refused, naming the cap.
    let out = daemon.cli(&["start", "-i", "tap", "--duration", "2h"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.max_duration_secs = 600") && err.contains("403"), "{err}");
    let out = daemon.cli(&["start", "-i", "tap", "-c", "1000000"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.max_packets = 100000"));

    // A bad filter: libpcap's message.
    let out = daemon.cli(&["start", "-i", "tap", "tcp", "port"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("syntax error") && err.contains("400"), "{err}");

    // What the kernel cannot run: the reason.
    let out = daemon.cli(&["start", "-i", "tap", "inbound"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("SKF_AD"), "{err}");

    // Malformed JSON, an unknown field, a wrong type: 400 with serde's reason.
    for (body, reason) in [
        (&b"{\"interface\": \"tap\""[..], "EOF"),
        (b"{\"interfce\": \"tap\"}", "unknown field `interfce`"),
        (b"{\"packets\": \"many\"}", "invalid type"),
    ] {
        let (status, reply) = client.raw("POST", "/v1/captures", Some(body)).unwrap();
        let reply = String::from_utf8_lossy(&reply);
        assert_eq!(status, 400, "{reply}");
        assert!(reply.contains("malformed capture request") && reply.contains(reason), "{reply}");
    }
    // An unknown interface and a destination outside the allowed ones.
    let out = daemon.cli(&["start", "-i", "eth9"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no interface \"eth9\" here; configured: tap"));
    let out = daemon.cli(&["start", "-i", "tap", "--destination", "/etc"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not under an allowed one"));
    let (status, _) = client.raw("GET", "/v1/captures/nope", None).unwrap();
    assert_eq!(status, 404);

    // A user outside the socket's group cannot even connect.
    let out = Command::new(tapstream_bin())
        .args(["capture", "list", "--socket"])
        .arg(daemon.socket())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("permission denied"), "{err}");

    // The capture running meanwhile is untouched.
    let sent = Sender::new(&veth).send_all(&frames);
    let info = daemon.wait(&running);
    assert_eq!(reason(&info), "idle");
    let arp = tapstream::filter::CbpfProgram::compile("arp").unwrap();
    let expected: Vec<&CorpusFrame> =
        sent.iter().filter(|f| arp.matches(&f.data, f.data.len() as u32)).copied().collect();
    assert!(!expected.is_empty() && daemon.stored(&running) == data(&expected));
    assert_eq!(client.list().unwrap().len(), 1, "no refused request left a capture behind");
}

#[test]
fn a_daemon_killed_mid_capture_reports_it_interrupted_and_keeps_what_was_stored() {
    let veth = VethPair::new(1);
    let mut daemon = TestDaemon::start(&veth, "");
    let frames = sendable(&veth);
    let id = daemon.start_capture(&["-i", "tap", "--duration", "300s", "--id", "before-kill"]);
    let sent = Sender::new(&veth).send_all(&frames[..300]);
    // Chunks are handed on after 1 s and objects close after 1 s: wait until every frame sent
    // is in a finished object.
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.stored(&id).len() < sent.len() {
        assert!(Instant::now() < deadline, "{} of {} frames stored", daemon.stored(&id).len(), sent.len());
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, log) = daemon.running.take().unwrap().signal_and_wait(libc::SIGKILL);
    eprintln!("daemon log before the kill:\n{log}");

    daemon.restart(&veth);
    let info = daemon.client().status(&id).unwrap();
    assert_eq!(info.state, CaptureState::Finished);
    assert_eq!(reason(&info), "interrupted");
    assert!(daemon.stored(&id) == data(&sent), "what was stored before the kill is still there, whole");

    // A graceful stop (SIGTERM) also ends a running capture as interrupted, and stores all.
    let id = daemon.start_capture(&["-i", "tap", "--duration", "300s"]);
    let sent = Sender::new(&veth).send_all(&frames[300..600]);
    std::thread::sleep(Duration::from_millis(500));
    let (status, log) = daemon.running.take().unwrap().signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{log}");
    daemon.restart(&veth);
    let info = daemon.client().status(&id).unwrap();
    assert_eq!(reason(&info), "interrupted");
    assert!(daemon.stored(&id) == data(&sent), "a graceful stop stores every frame");
    assert_eq!(info.summary.unwrap().packets, sent.len() as u64);
}

#[test]
fn start_wait_on_a_terminal_shows_progress_and_the_summary() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let frames = sendable(&veth);
    let session = tapstream_testenv::unique_name("tsw");
    let out_file = daemon.dir.path().join("terminal.txt");
    let command = format!(
        "TAPSTREAM_SOCKET={} {} capture start -i tap -c 100 --duration 60s --id term --wait; echo EXIT=$? ; sleep 30",
        daemon.socket().display(),
        tapstream_bin()
    );
    let tmux = |args: &[&str]| Command::new("tmux").args(args).output().expect("run tmux");
    let started = tmux(&["new-session", "-d", "-s", &session, "-x", "160", "-y", "20", &command]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let _kill = KillSession(session.clone());
    let screen =
        || String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).into_owned();
    // `start` prints this once the daemon has the capture running (the kernel marks frames for
    // it): only then is traffic sent.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !screen().contains("capture term started on tap") {
        assert!(Instant::now() < deadline, "the capture never started:\n{}", screen());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Half the frames: the live line shows them against the limit.
    let sender = Sender::new(&veth);
    sender.send_all(&frames[..50]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !screen().contains("50 packets / 100,") {
        assert!(Instant::now() < deadline, "no progress line on the terminal:\n{}", screen());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(screen().contains("s / 60 s, 0 dropped"), "{}", screen());
    sender.send_all(&frames[50..500]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !screen().contains("EXIT=") {
        assert!(Instant::now() < deadline, "no summary on the terminal:\n{}", screen());
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = screen();
    std::fs::write(&out_file, &text).unwrap();
    eprintln!("terminal:\n{text}");
    assert!(text.contains("capture term started on tap"), "{text}");
    assert!(text.contains("capture term on") && text.contains("ended: packets"), "{text}");
    assert!(text.contains("100 packets"), "{text}");
    assert!(text.contains("stored: file://") || text.contains("stored: "), "{text}");
    assert!(text.contains("EXIT=0"), "{text}");
}

struct KillSession(String);

impl Drop for KillSession {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.0]).output();
    }
}

#[test]
fn a_capture_that_saw_nothing_stores_nothing_and_says_so() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let id = daemon.start_capture(&["-i", "tap", "--duration", "1s", "udp", "port", "9"]);
    let info = daemon.wait(&id);
    let summary = info.summary.as_ref().unwrap();
    assert_eq!((summary.stop_reason.as_str(), summary.packets), ("duration", 0));
    assert!(summary.outputs.is_empty(), "{summary:?}");
    assert!(!daemon.dir.path().join("store/testnode").join(&id).exists(), "no object, not even an empty one");
    let out = daemon.cli(&["status", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("no packets captured: nothing stored"), "{text}");
}

#[test]
fn the_tcp_api_requires_the_bearer_token() {
    let veth = VethPair::new(1);
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("token");
    let token = "s3cr3t-token-for-this-test";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    // Only its owner may read it (the daemon refuses a token others may read).
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let daemon = TestDaemon::start(
        &veth,
        &format!("tcp_listen = \"127.0.0.1:9465\"\ntoken_file = \"{}\"", token_file.display()),
    );
    let curl = |auth: Option<&str>| {
        let mut cmd = veth.capture_ns.command("curl");
        cmd.args(["-s", "-o", "/dev/stderr", "-w", "%{http_code}"]);
        if let Some(a) = auth {
            cmd.args(["-H", &format!("Authorization: {a}")]);
        }
        let out = cmd.arg("http://127.0.0.1:9465/v1/captures").output().unwrap();
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, body) = curl(None);
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("bearer token"), "{body}");
    assert_eq!(curl(Some("Bearer wrong")).0, "401");
    assert_eq!(curl(Some(&format!("Bearer {token}x"))).0, "401");
    let (code, body) = curl(Some(&format!("Bearer {token}")));
    assert_eq!((code.as_str(), body.as_str()), ("200", "[]"));
    // The token never reaches the log.
    let (_, log) = daemon_log(daemon);
    assert!(!log.contains(token), "{log}");
}

fn daemon_log(mut daemon: TestDaemon) -> (std::process::ExitStatus, String) {
    daemon.running.take().unwrap().signal_and_wait(libc::SIGTERM)
}

#[test]
fn only_the_newest_ended_captures_are_kept() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "keep_finished = 2");
    for id in ["first", "second", "third"] {
        daemon.start_capture(&["-i", "tap", "--duration", "0.3s", "--id", id]);
        daemon.wait(id);
    }
    let kept: Vec<String> = daemon.client().list().unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(kept, ["third", "second"], "newest first, the oldest forgotten");
    let files = std::fs::read_dir(daemon.dir.path().join("state/captures")).unwrap().count();
    assert_eq!(files, 2, "its state file is gone too");
    assert_eq!(daemon.client().status("first").unwrap_err().to_string(), "no capture \"first\" (HTTP 404)");
}

#[test]
fn the_daemon_uploads_what_an_earlier_run_left_in_the_spool_when_it_starts() {
    use tapstream::store::{Sink as _, dir::DirSink};
    let veth = VethPair::new(1);
    let mut daemon = TestDaemon::start(&veth, "");
    drop(daemon.running.take()); // killed, as a crash would
    let d = daemon.dir.path().to_owned();
    let store = d.join("store");
    // A spool an earlier run left for the daemon's store.
    let spooled = leave_spool(d.join("spool/old-1"), &DirSink::new(&store).unwrap().url(""));
    daemon.restart(&veth);
    let deadline = Instant::now() + Duration::from_secs(20);
    let object = loop {
        let found = walk(&store).into_iter().find(|p| p.extension().is_some_and(|x| x == "pcap"));
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "no object from the leftover spool in {}", store.display());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(object.to_string_lossy().contains("old-1"), "named after the spool: {}", object.display());
    // The spool goes once the object is complete (the object shows before that).
    crate::common::eventually("the spool gone", || (!d.join("spool/old-1").exists()).then_some(()));
    assert_eq!(std::fs::read(&object).unwrap(), spooled, "the spooled bytes, whole");
}

#[test]
fn tag_keys_are_checked_by_the_api_as_by_the_cli() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let client = daemon.client();
    for (key, shown) in [("\u{fc}\u{2603}", "\"\u{fc}\u{2603}\""), ("a\r\nb", "\"a\\r\\nb\""), ("", "\"\"")] {
        let body = serde_json::json!({"interface": "tap", "duration_secs": 1, "tags": {key: "v"}});
        let (status, reply) = client.raw("POST", "/v1/captures", Some(body.to_string().as_bytes())).unwrap();
        let reply = String::from_utf8_lossy(&reply);
        assert_eq!(status, 400, "tag key {key:?}: {reply}");
        let error = error_of(&reply);
        assert!(error.contains("tag key") && error.contains(shown), "the key, quoted and escaped: {error}");
    }
    assert!(client.list().unwrap().is_empty(), "no refused request left a capture behind");
    // Keys are stored as S3 stores them: lowercased.
    let body =
        serde_json::json!({"interface": "tap", "duration_secs": 0.2, "id": "t", "tags": {"Team": "net ops"}});
    let (status, reply) = client.raw("POST", "/v1/captures", Some(body.to_string().as_bytes())).unwrap();
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&reply));
    let info = daemon.wait("t");
    assert_eq!(info.request.tags.get("team").map(String::as_str), Some("net ops"));
}

#[test]
fn a_spool_that_can_never_upload_is_quarantined_and_blocks_nothing() {
    use tapstream::store::{Sink as _, dir::DirSink};
    let veth = VethPair::new(1);
    let mut daemon = TestDaemon::start(&veth, "");
    drop(daemon.running.take()); // killed, as a crash would
    let d = daemon.dir.path().to_owned();
    let store = d.join("store");
    let url = DirSink::new(&store).unwrap().url("");
    // Two spools an earlier run left: one whose chunk file was cut short (it can never be
    // uploaded), named so that it comes first, and a whole one.
    leave_spool(d.join("spool/aaa-bad-1"), &url);
    let spooled = leave_spool(d.join("spool/zzz-good-1"), &url);
    let bad_chunk =
        walk(&d.join("spool/aaa-bad-1")).into_iter().find(|p| p.extension().is_some_and(|x| x == "chunk"));
    std::fs::write(bad_chunk.expect("a chunk file"), b"cut").unwrap();

    daemon.restart(&veth);
    let quarantined = d.join("spool/quarantine/aaa-bad-1");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(quarantined.join("REASON").exists() && !d.join("spool/zzz-good-1").exists()) {
        assert!(Instant::now() < deadline, "the bad spool is not quarantined or the good one not uploaded");
        std::thread::sleep(Duration::from_millis(100));
    }
    let why = std::fs::read_to_string(quarantined.join("REASON")).unwrap();
    assert!(why.contains("truncated"), "the reason names the fault: {why}");
    let objects: Vec<PathBuf> =
        walk(&store).into_iter().filter(|p| p.extension().is_some_and(|x| x == "pcap")).collect();
    assert_eq!(objects.len(), 1, "the whole spool became an object: {objects:?}");
    assert_eq!(std::fs::read(&objects[0]).unwrap(), spooled);

    // New captures start and store as usual, and the quarantine stays as it is.
    let frames = sendable(&veth);
    let id = daemon.start_capture(&["-i", "tap", "--idle", "2s", "--duration", "60s", "--id", "after"]);
    let sent = Sender::new(&veth).send_all(&frames);
    let info = daemon.wait(&id);
    assert_eq!(reason(&info), "idle", "{info:?}");
    assert_eq!(daemon.stored(&id), data(&sent));
    assert!(quarantined.join("REASON").exists());
    let log = daemon_log(daemon).1;
    assert!(log.contains("can never be uploaded") && log.contains("aaa-bad-1"), "the log says so: {log}");
}

#[test]
fn out_of_range_numbers_ids_and_destinations_are_refused_and_leave_nothing_behind() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let client = daemon.client();
    let store = daemon.dir.path().join("store").display().to_string();
    for (body, status, says) in [
        (
            serde_json::json!({"interface": "tap", "idle_timeout_secs": 1e30}),
            400,
            "idle_timeout_secs must be",
        ),
        (serde_json::json!({"interface": "tap", "duration_secs": 1e30}), 400, "duration_secs must be"),
        (serde_json::json!({"interface": "tap", "duration_secs": -1}), 400, "duration_secs must be"),
        (serde_json::json!({"interface": "tap", "duration_secs": 5e-324}), 201, ""),
        (serde_json::json!({"interface": "tap", "id": "."}), 400, "capture id \".\""),
        (serde_json::json!({"interface": "tap", "id": ".."}), 400, "capture id \"..\""),
        (
            serde_json::json!({"interface": "tap", "destination": format!("{store}/a\u{0}b")}),
            400,
            "control character",
        ),
        (
            serde_json::json!({"interface": "tap", "destination": format!("{store}/./x")}),
            403,
            "not under an allowed one",
        ),
    ] {
        let (got, reply) = client.raw("POST", "/v1/captures", Some(body.to_string().as_bytes())).unwrap();
        let reply = String::from_utf8_lossy(&reply);
        assert_eq!(got, status, "{body}: {reply}");
        assert!(status == 201 || error_of(&reply).contains(says), "{body}: {reply}");
    }
    // The one accepted (a tiny duration) ends by itself; no refused request left a capture.
    let ids: Vec<String> = client.list().unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let info = daemon.wait(&ids[0]);
    assert_eq!(info.state, CaptureState::Finished, "{info:?}");
    // Nothing above holds a slot: the cap of 8 concurrent captures is all there.
    let running: Vec<String> = (0..8)
        .map(|i| daemon.start_capture(&["-i", "tap", "--duration", "0.5s", "--id", &format!("c{i}")]))
        .collect();
    for id in running {
        daemon.wait(&id);
    }
}

/// The message of an error reply.
pub fn error_of(reply: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(reply).unwrap_or_else(|e| panic!("{e}: {reply}"));
    value["error"].as_str().unwrap_or_else(|| panic!("no error in {reply}")).to_owned()
}

#[test]
fn a_hundred_concurrent_starts_never_exceed_the_cap() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let client = daemon.client();
    // Each compiles a filter between its first check of the cap and its registration: the
    // window in which concurrent requests once got past the cap (63 of 100 with a cap of 8).
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let asks: Vec<_> = (0..100)
            .map(|i| {
                let client = &client;
                s.spawn(move || {
                    let body = serde_json::json!({"id": format!("c{i}"), "duration_secs": 60, "filter": "udp port 1"});
                    let (status, reply) =
                        client.raw("POST", "/v1/captures", Some(body.to_string().as_bytes())).unwrap();
                    (status, String::from_utf8_lossy(&reply).into_owned())
                })
            })
            .collect();
        asks.into_iter().map(|a| a.join().unwrap()).collect()
    });
    let started: Vec<String> = client.list().unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(answers.iter().filter(|(status, _)| *status == 201).count(), started.len());
    assert_eq!(started.len(), 8, "the cap is 8: {started:?}");
    for (status, reply) in &answers {
        assert!(
            *status == 201 || (*status == 403 && reply.contains("limits.max_concurrent_captures = 8")),
            "{status} {reply}"
        );
    }
    for id in &started {
        client.stop(id).unwrap();
        daemon.wait(id);
    }
}
