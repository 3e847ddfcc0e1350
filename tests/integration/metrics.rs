//! The real Prometheus server scrapes a running daemon during a capture; what it stores agrees
//! with the capture's own summary.

use std::time::Duration;

use tapstream_testenv::{Prometheus, Sender, VethPair, corpus_frames};

use crate::{common::walk, daemon::TestDaemon};

#[test]
fn prometheus_scrapes_a_running_daemon_and_agrees_with_the_capture_summary() {
    let veth = VethPair::new(1);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    let prometheus_dir = tempfile::tempdir().unwrap();
    let prometheus = Prometheus::start_in(&veth.capture_ns, prometheus_dir.path());
    let daemon = TestDaemon::start(&veth, "metrics_listen = \"127.0.0.1:9464\"");
    let ns = &veth.capture_ns;
    // Series with nothing to count yet exist at zero from the start.
    assert_eq!(prometheus.wait_for("tapstream_captures_active", 0.0, Duration::from_secs(10)), Some(0.0));
    let retries = prometheus.query("count(tapstream_upload_retries_total)");
    let ended = prometheus.query("count(tapstream_captures_ended_total)");

    let id = daemon.start_capture(&["-i", "tap", "--duration", "60s"]);
    let active = prometheus.wait_for("tapstream_captures_active", 1.0, Duration::from_secs(10));
    let sent = sender.send_all(&frames).len() as f64;
    let records = prometheus.wait_for("sum(tapstream_writer_records_total)", sent, Duration::from_secs(12));
    let seen = prometheus.wait_for("sum(tapstream_xdp_seen_frames_total)", sent, Duration::from_secs(5));
    let exported =
        ns.command("curl").args(["-sf", "http://127.0.0.1:9464/metrics"]).output().expect("curl /metrics");
    let exported = String::from_utf8_lossy(&exported.stdout).into_owned();
    let out = daemon.cli(&["stop", &id, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: tapstream::control::CaptureInfo = serde_json::from_slice(&out.stdout).unwrap();
    let summary = info.summary.expect("a summary once stopped");
    let stopped = prometheus.wait_for(
        "tapstream_captures_ended_total{reason=\"stopped\"}",
        1.0,
        Duration::from_secs(5),
    );
    // Bytes uploaded: the objects' sizes (indexes aside).
    let stored: u64 = walk(&daemon.dir.path().join("store"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "pcap"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let uploaded =
        prometheus.wait_for("sum(tapstream_upload_bytes_total)", stored as f64, Duration::from_secs(5));
    drop(prometheus);

    assert!(stored > 0);
    assert_eq!(uploaded, Some(stored as f64), "bytes uploaded, scraped vs the objects stored");
    assert_eq!(active, Some(1.0), "the running capture is counted");
    assert_eq!(stopped, Some(1.0), "and its end, by reason");
    assert_eq!(records, Some(summary.packets as f64), "records scraped vs the summary");
    assert_eq!(records, Some(sent));
    let summary_seen: u64 = summary.queues.iter().map(|q| q.xdp_seen).sum();
    assert_eq!(seen, Some(summary_seen as f64), "frames XDP saw, scraped vs the summary");
    assert_eq!(retries, Some(4.0), "one retry series per store operation, at zero");
    assert_eq!(ended, Some(7.0), "one series per stop reason");

    // Every metric the dashboard and the alert rules use is exported.
    let names: std::collections::BTreeSet<&str> = exported
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    let missing: Vec<_> =
        crate::deploy::referenced_metrics().into_iter().filter(|n| !names.contains(n.as_str())).collect();
    assert!(missing.is_empty(), "deploy files use metrics that are not exported: {missing:?}\n{exported}");
}
