//! Captures that start in the past: the interface keeps a history, and a capture with a
//! lookback stores the history's frames of its window that its filter accepts, then the live
//! frames, with no gap and no duplicate at the seam.
//!
//! Each test runs a reference capture (no filter, no lookback) from before the traffic: the
//! kernel gives every capture the same receive time, so each capture with a lookback must
//! hold exactly the reference's frames from its window's start (`since_ns` in its summary) to
//! its last frame, less those its filter rejects, byte for byte.

use std::sync::atomic::{AtomicBool, Ordering};

use tapstream::{captures::LookbackSummary, control::CaptureInfo, filter::CbpfProgram};
use tapstream_testenv::{CANARY_FILTER, Sender, VethPair, canary_seq};

use crate::common::eventually;
use crate::daemon::{TestDaemon, reason};
use crate::fleet::metric;

/// (receive time in ns, frame) of every frame stored for capture `id`, in object order.
fn stored(daemon: &TestDaemon, id: &str) -> Vec<(u64, Vec<u8>)> {
    // The tools read every object (the daemon's helper runs capinfos and tshark on each).
    let checked = daemon.stored(id);
    let dir = daemon.store_dir().join("testnode").join(id);
    let mut objects: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "pcap"))
                .collect()
        })
        .unwrap_or_default();
    objects.sort();
    let frames: Vec<(u64, Vec<u8>)> = objects
        .iter()
        .flat_map(|path| {
            let bytes = std::fs::read(path).unwrap();
            tapstream_pcap::Reader::new(&bytes)
                .unwrap()
                .map(|r| {
                    let r = r.unwrap();
                    (r.ts_nanos, r.data.to_vec())
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(frames.iter().map(|(_, d)| d).eq(checked.iter()), "tshark and the reader agree");
    frames
}

/// The lookback part of a finished capture's summary.
fn lookback(info: &CaptureInfo) -> &LookbackSummary {
    info.summary.as_ref().and_then(|s| s.lookback.as_ref()).unwrap_or_else(|| panic!("no lookback: {info:?}"))
}

/// Asserts that capture `id` stored exactly the reference's frames its `filter` accepts from
/// its window's start to its own last frame, and that its summary counts them; returns
/// (frames from history, live frames).
fn assert_exact(daemon: &TestDaemon, id: &str, filter: &str, reference: &[(u64, Vec<u8>)]) -> (u64, u64) {
    let info = daemon.wait(id);
    assert_eq!(reason(&info), "stopped", "{info:?}");
    let summary = info.summary.as_ref().unwrap();
    assert_eq!((summary.dropped_writer, summary.dropped_kernel), (0, 0), "{summary:?}");
    let look = lookback(&info);
    let got = stored(daemon, id);
    let program = CbpfProgram::compile(filter).unwrap();
    let last = got.last().unwrap_or_else(|| panic!("{id} stored nothing")).0;
    let expected: Vec<&(u64, Vec<u8>)> = reference
        .iter()
        .filter(|(ts, data)| *ts >= look.since_ns && *ts <= last && program.matches(data, data.len() as u32))
        .collect();
    assert_eq!(
        got.len(),
        expected.len(),
        "{id}: frames stored against the reference's in its window: {look:?}"
    );
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert!(
            g == *e,
            "{id}: frame {i} differs from the reference's (seq {:?} vs {:?})",
            canary_seq(&g.1),
            canary_seq(&e.1)
        );
    }
    // The window began its lookback before the start, and the history held it.
    let started = info.started_ns;
    let before = started.saturating_sub(look.since_ns) as f64 / 1e9;
    assert!((before - look.asked_secs).abs() < 1.0, "{id} started {started}: {look:?}");
    assert!(look.complete, "{id}: the history reached back as asked: {look:?}");
    assert_eq!(look.reached_secs, look.asked_secs);
    assert!(got.first().unwrap().0 < started, "{id} begins before its start");
    assert_eq!(look.history_frames + look.live_frames, summary.packets);
    assert_eq!(summary.packets, got.len() as u64);
    (look.history_frames, look.live_frames)
}

#[test]
fn captures_with_lookbacks_store_their_window_then_live_frames_with_no_gap_and_no_duplicate() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start_with_limits(
        &veth,
        "metrics_listen = \"127.0.0.1:9464\"",
        "[interfaces.tap.lookback]\nmemory_bytes = 67108864\ncompress = true",
    );
    let reference = daemon.start_capture(&["-i", "tap", "--duration", "300s", "--id", "reference"]);
    let sender = Sender::new(&veth);
    let stop = AtomicBool::new(false);
    // Canary frames at 2,000 a second: several seconds of history before the captures start.
    let even = format!("{CANARY_FILTER} and ip[5] & 1 == 0");
    let (sent, histories) = std::thread::scope(|s| {
        let traffic = s.spawn(|| sender.send_canary(u64::MAX, 2_000, &stop));
        eventually("3.5 s of traffic recorded", || {
            (metric(&veth, "tapstream_lookback_recorded_frames_total") >= 7_000.0).then_some(())
        });
        let all = daemon.start_capture(&[
            "-i",
            "tap",
            "--duration",
            "300s",
            "--id",
            "all",
            "--lookback",
            "2s",
            CANARY_FILTER,
        ]);
        // A packet limit counts the history's frames first.
        let limited = daemon.start_capture(&[
            "-i",
            "tap",
            "--duration",
            "300s",
            "--id",
            "limited",
            "--lookback",
            "2s",
            "-c",
            "5000",
            CANARY_FILTER,
        ]);
        let evens = daemon.start_capture(&[
            "-i",
            "tap",
            "--duration",
            "300s",
            "--id",
            "evens",
            "--lookback",
            "1s",
            &even,
        ]);
        // Live traffic (1.5 s of it in the reference, whose progress is told each second), then
        // the captures end, then the traffic.
        live(&daemon, &reference, 3_000);
        for id in [&all, &evens] {
            daemon.client().stop(id).unwrap();
        }
        for id in [&all, &evens] {
            daemon.wait(id);
        }
        daemon.wait(&limited);
        stop.store(true, Ordering::Relaxed);
        let sent = traffic.join().unwrap();
        (sent, [all, evens, limited])
    });
    let reference_frames = stop_reference(&daemon, &reference, sent);

    let (history, live) = assert_exact(&daemon, &histories[0], CANARY_FILTER, &reference_frames);
    // 2 s of history at 2,000 a second.
    assert!((3_000..=5_000).contains(&history) && live > 1_000, "{history} from history, {live} live");
    let (history, live) = assert_exact(&daemon, &histories[1], &even, &reference_frames);
    assert!((500..=1_500).contains(&history) && live > 500, "{history} from history, {live} live");

    // Exactly the first 5,000 frames of its window: about 4,000 from the history, then live.
    let info = daemon.wait(&histories[2]);
    assert_eq!(reason(&info), "packets", "{info:?}");
    let look = lookback(&info);
    let got = stored(&daemon, &histories[2]);
    let window: Vec<&(u64, Vec<u8>)> = reference_frames
        .iter()
        .filter(|(ts, d)| *ts >= look.since_ns && canary_seq(d).is_some())
        .take(5_000)
        .collect();
    assert_eq!(got.len(), 5_000);
    assert!(got.iter().zip(&window).all(|(g, e)| g == *e), "the first 5,000 frames of the window");
    assert_eq!(
        (look.history_frames + look.live_frames, info.summary.as_ref().unwrap().packets),
        (5_000, 5_000)
    );
    assert!((3_000..=5_000).contains(&look.history_frames), "{look:?}");
}

#[test]
fn a_lookback_on_an_interface_without_history_is_refused_by_name() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let out = daemon.cli(&["start", "-i", "tap", "--duration", "10s", "--lookback", "5s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("lookback_secs: tap keeps no history (configure [interfaces.tap.lookback])"),
        "{stderr}"
    );
    assert!(daemon.client().list().unwrap().is_empty(), "nothing started");
    let out = daemon.cli(&["start", "-i", "tap", "--duration", "10s", "--lookback", "0s"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lookback_secs must be a number of seconds above 0")
    );
}

#[test]
fn a_lookback_beyond_the_horizon_takes_what_the_history_holds_and_says_how_far_it_reached() {
    let veth = VethPair::new(1);
    // 1 MiB of plain records of about 80 bytes: some 13,000 canary frames, 6.5 s at 2,000 a second.
    let daemon = TestDaemon::start_with_limits(
        &veth,
        "metrics_listen = \"127.0.0.1:9464\"",
        "[interfaces.tap.lookback]\nmemory_bytes = 1048576\ncompress = false",
    );
    let reference = daemon.start_capture(&["-i", "tap", "--duration", "300s", "--id", "reference"]);
    let sender = Sender::new(&veth);
    let stop = AtomicBool::new(false);
    let (sent, id) = std::thread::scope(|s| {
        let traffic = s.spawn(|| sender.send_canary(u64::MAX, 2_000, &stop));
        eventually("the oldest frames evicted", || {
            (metric(&veth, "tapstream_lookback_evicted_frames_total") >= 4_000.0).then_some(())
        });
        let bytes = metric(&veth, "tapstream_lookback_bytes");
        assert!(bytes > 900_000.0 && bytes <= 1_048_576.0, "the history holds {bytes} bytes of its 1 MiB");
        let horizon = metric(&veth, "tapstream_lookback_horizon_seconds");
        assert!(horizon > 3.0 && horizon < 10.0, "horizon {horizon} s");
        let id = daemon.start_capture(&[
            "-i",
            "tap",
            "--duration",
            "300s",
            "--id",
            "far",
            "--lookback",
            "60s",
            CANARY_FILTER,
        ]);
        live(&daemon, &reference, 2_000);
        daemon.client().stop(&id).unwrap();
        daemon.wait(&id);
        stop.store(true, Ordering::Relaxed);
        (traffic.join().unwrap(), id)
    });
    let reference_frames = stop_reference(&daemon, &reference, sent);

    let info = daemon.wait(&id);
    let look = lookback(&info).clone();
    assert!(!look.complete, "60 s is beyond the horizon: {look:?}");
    assert!(look.reached_secs > 3.0 && look.reached_secs < 10.0, "{look:?}");
    let got = stored(&daemon, &id);
    // It begins with the oldest frame the history held.
    assert_unbroken(&got, &reference_frames);
    assert!(canary_seq(&got[0].1).unwrap() > 0, "the oldest frames were evicted");
    let reached = (info.started_ns - got[0].0) as f64 / 1e9;
    assert!((reached - look.reached_secs).abs() < 0.5, "reached {reached} s, reported {look:?}");
}

/// Stops the reference capture and returns its frames, having checked that it holds every
/// canary frame sent (`0..sent`), once, in order, with nothing lost in the kernel.
fn stop_reference(daemon: &TestDaemon, reference: &str, sent: u64) -> Vec<(u64, Vec<u8>)> {
    daemon.client().stop(reference).unwrap();
    let info = daemon.wait(reference);
    assert_eq!(info.summary.as_ref().unwrap().dropped_kernel, 0, "{info:?}");
    let frames = stored(daemon, reference);
    let seqs: Vec<u64> = frames.iter().filter_map(|(_, d)| canary_seq(d)).collect();
    assert_eq!(seqs, (0..sent).collect::<Vec<u64>>(), "the reference has every frame sent");
    frames
}

/// Asserts that `got` is the reference's canary frames from `got`'s first frame to its last:
/// none missing, none twice, byte for byte.
fn assert_unbroken(got: &[(u64, Vec<u8>)], reference: &[(u64, Vec<u8>)]) {
    let first = reference.iter().position(|f| *f == got[0]).expect("its first frame is the reference's");
    let last = got.last().unwrap().0;
    let expected: Vec<&(u64, Vec<u8>)> =
        reference[first..].iter().filter(|(ts, d)| *ts <= last && canary_seq(d).is_some()).collect();
    assert_eq!(got.len(), expected.len());
    assert!(got.iter().zip(&expected).all(|(g, e)| g == *e), "no gap, no duplicate");
}

/// Waits until the reference capture has stored `frames` more than it had.
fn live(daemon: &TestDaemon, reference: &str, frames: u64) {
    let from = daemon.client().status(reference).unwrap().progress.packets;
    eventually("live frames", || {
        (daemon.client().status(reference).unwrap().progress.packets > from + frames).then_some(())
    });
}
