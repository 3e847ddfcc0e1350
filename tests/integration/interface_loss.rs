//! A capture device that goes away (`ip link del`, a NIC unplugged or renamed) and comes back:
//! the captures on it end with an error naming it and keep what they stored, new ones are
//! refused while it is missing, and the daemon attaches again when a device of that name
//! returns.

use std::time::{Duration, Instant};

use tapstream_testenv::{CORPUS_RING_SIZE, Netns, Sender, VethPair};

use crate::{
    common::{capture_to_file, read_capture},
    daemon::{TestDaemon, data, reason, sendable},
};

/// Frames the writers have taken off their rings, from the process's metrics endpoint
/// (`127.0.0.1:9464` in `ns`).
fn writer_frames(ns: &Netns) -> u64 {
    let out = ns.command("curl").args(["-sf", "http://127.0.0.1:9464/metrics"]).output().expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("tapstream_writer_frames_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits until the writers have taken `n` frames off their rings in all: they are in the
/// writers' open chunks (handed on after a second), not yet in any output.
fn wait_for_writer_frames(ns: &Netns, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let taken = writer_frames(ns);
        if taken >= n as u64 {
            return;
        }
        assert!(Instant::now() < deadline, "the writers took {taken} of the {n} frames sent");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon's interfaces (`GET /v1/interfaces`): alias and state of each.
fn interface_states(daemon: &TestDaemon) -> Vec<(String, String, String)> {
    let (status, body) = daemon.client().raw("GET", "/v1/interfaces", None).unwrap();
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 200, "GET /v1/interfaces: {body}");
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {body}"))
        .iter()
        .map(|i| {
            let field =
                |name: &str| i[name].as_str().unwrap_or_else(|| panic!("no {name}: {body}")).to_owned();
            (field("alias"), field("device"), field("state"))
        })
        .collect()
}

/// Waits until the daemon reports interface `tap` in `state`.
fn wait_for_state(daemon: &TestDaemon, veth: &VethPair, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let states = interface_states(daemon);
        if states == [("tap".to_owned(), veth.capture_if.clone(), state.to_owned())] {
            return;
        }
        assert!(Instant::now() < deadline, "the interface never became {state}: {states:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A capture request on `tap` while its device is missing: refused (503) naming the interface
/// and its device, and nothing registered.
fn assert_refused_while_absent(daemon: &TestDaemon, veth: &VethPair) {
    let before = daemon.client().list().unwrap().len();
    let out = daemon.cli(&["start", "-i", "tap", "--duration", "60s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a capture started on a missing device: {err}");
    let absent = format!("interface \"tap\" (device {}) is absent", veth.capture_if);
    assert!(err.contains(&absent) && err.contains("503"), "{err}");
    assert_eq!(daemon.client().list().unwrap().len(), before, "the refused request left a capture behind");
}

/// A capture that runs until its idle timeout on the (returned) device stores every frame sent.
fn assert_captures(daemon: &TestDaemon, veth: &VethPair, frames: &[tapstream_testenv::CorpusFrame]) {
    let id = daemon.start_capture(&["-i", "tap", "--idle", "2s", "--duration", "60s"]);
    let sent = Sender::new(veth).send_all(frames);
    let info = daemon.wait(&id);
    assert_eq!(reason(&info), "idle", "{info:?}");
    assert!(info.error.is_none(), "{info:?}");
    assert!(daemon.stored(&id) == data(&sent), "every frame sent on the returned device is stored");
}

#[test]
fn a_removed_device_ends_its_captures_with_an_error_and_is_attached_again_when_it_returns() {
    let veth = VethPair::new(1);
    let mut daemon = TestDaemon::start(&veth, "metrics_listen = \"127.0.0.1:9464\"");
    let frames = sendable(&veth);
    let ns = &veth.capture_ns;
    let id = daemon.start_capture(&["-i", "tap", "--duration", "300s"]);
    let sent = Sender::new(&veth).send_all(&frames[..500]);
    // The frames are in the writer's open chunk: the removal must not lose them.
    wait_for_writer_frames(ns, sent.len());
    veth.remove();

    let info = daemon.wait(&id);
    let removed = format!("interface \"tap\" (device {}) was removed", veth.capture_if);
    assert_eq!(reason(&info), "error", "{info:?}");
    assert!(info.error.as_deref().is_some_and(|e| e.contains(&removed)), "{info:?}");
    // The summary says so too, and accounts for every frame taken before the removal.
    let (status, body) = daemon.client().raw("GET", &format!("/v1/captures/{id}"), None).unwrap();
    assert_eq!(status, 200);
    let raw: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let summary_error = raw["summary"]["error"].as_str().unwrap_or_default();
    assert!(summary_error.contains(&removed), "summary: {}", raw["summary"]);
    let summary = info.summary.as_ref().unwrap();
    assert!(!summary.outputs.is_empty(), "{summary:?}");
    assert_eq!(summary.packets, sent.len() as u64);
    assert!(daemon.stored(&id) == data(&sent), "every frame taken before the removal is stored");
    // A script that waits for the capture learns that it is incomplete: the summary, then a
    // non-zero exit naming the cause.
    let out = daemon.cli(&["wait", &id]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "capture wait exits 0 for a capture that ended on an error:\n{stdout}");
    assert!(stdout.contains(&format!("capture {id} on {} ended: error", veth.capture_if)), "{stdout}");
    assert!(stderr.contains(&format!("capture {id} did not end well: {removed}")), "{stderr}");

    // While the device is missing: shown absent, new captures refused.
    assert_eq!(interface_states(&daemon), [("tap".to_owned(), veth.capture_if.clone(), "absent".to_owned())]);
    assert_refused_while_absent(&daemon, &veth);

    // A device of that name returns (a new device, a new index): attached again by itself.
    veth.recreate();
    wait_for_state(&daemon, &veth, "attached");
    assert_captures(&daemon, &veth, &frames[500..1000]);

    let (status, log) = daemon.running.take().unwrap().signal_and_wait(libc::SIGTERM);
    eprintln!("daemon log:\n{log}");
    assert!(status.success(), "{log}");
    let lines = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert_eq!(lines(&format!("{removed}: 1 running capture")), 1, "the removal is logged once:\n{log}");
    assert_eq!(lines(&format!("capture {id} ended (error): {removed}")), 1, "and the capture's end:\n{log}");
    assert_eq!(lines("is back: attached again"), 1, "the return is logged once:\n{log}");
}

#[test]
fn a_daemon_started_without_its_device_attaches_when_the_device_appears() {
    let veth = VethPair::new(1);
    let frames = sendable(&veth);
    veth.remove();
    let mut daemon = TestDaemon::start(&veth, "");
    wait_for_state(&daemon, &veth, "absent");
    assert_refused_while_absent(&daemon, &veth);

    veth.recreate();
    wait_for_state(&daemon, &veth, "attached");
    assert_captures(&daemon, &veth, &frames[..500]);

    // Gone again, and the daemon asked to stop meanwhile: it stops, cleanly.
    veth.remove();
    wait_for_state(&daemon, &veth, "absent");
    let (status, log) = daemon.running.take().unwrap().signal_and_wait(libc::SIGTERM);
    eprintln!("daemon log:\n{log}");
    assert!(status.success(), "{log}");
    assert!(log.contains("stopped"), "{log}");
}

#[test]
fn a_one_shot_capture_whose_device_is_removed_exits_with_the_error_and_keeps_its_frames() {
    let veth = VethPair::new(1);
    let frames = sendable(&veth);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("removed.pcap");
    let ring = CORPUS_RING_SIZE.to_string();
    let run = capture_to_file(
        &veth,
        &out,
        &["--duration", "60s", "--ring-size", &ring, "--metrics-listen", "127.0.0.1:9464"],
    );
    let sent = Sender::new(&veth).send_all(&frames[..500]);
    wait_for_writer_frames(&veth.capture_ns, sent.len());
    veth.remove();

    let (status, stdout, stderr) = run.finish();
    eprintln!("tapstream log:\n{stderr}");
    let removed = format!("interface {} was removed", veth.capture_if);
    assert!(!status.success(), "a capture whose device was removed succeeded:\n{stdout}");
    assert!(stderr.lines().last().is_some_and(|l| l.contains(&removed)), "the last line names it:\n{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("no JSON summary on stdout ({e}):\n{stdout}"));
    assert_eq!(summary["stop_reason"], "error", "{summary}");
    assert!(summary["error"].as_str().is_some_and(|e| e.contains(&removed)), "{summary}");
    assert_eq!(summary["packets"], sent.len() as u64, "{summary}");
    let stored: Vec<Vec<u8>> = read_capture(&out).into_iter().map(|(_, d)| d).collect();
    assert!(
        stored == data(&sent),
        "{} frames stored of the {} sent before the removal",
        stored.len(),
        sent.len()
    );
}
