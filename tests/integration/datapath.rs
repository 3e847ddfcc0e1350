//! The capture data path end to end: XDP -> AF_XDP -> writers -> PCAP file, on a real veth
//! with the real corpus.

use std::path::PathBuf;

use tapstream::captures::CaptureSummary;
use tapstream_testenv::{CORPUS_RING_SIZE, CorpusFrame, Sender, VethPair, corpus_frames};

use crate::common::{assert_same_frames, capture_to_file, data, read_capture};

/// Every frame redirected by XDP is taken off a ring or counted as lost by the socket, and
/// every frame taken off a ring is stored or counted as dropped by the writer.
/// Every frame sent was seen by XDP, and each was either redirected or counted otherwise.
fn assert_accounted(summary: &CaptureSummary, sent: usize) {
    let seen: u64 = summary.queues.iter().map(|q| q.xdp_seen).sum();
    assert_eq!(seen, sent as u64, "XDP saw every frame sent: {:?}", summary.queues);
    for q in &summary.queues {
        assert_eq!(
            q.xdp_seen,
            q.xdp_redirected + q.xdp_redirect_errors + q.xdp_passed + q.xdp_dropped + q.xdp_meta_errors,
            "queue {}: every frame seen is redirected or counted: {q:?}",
            q.queue
        );
        assert_eq!(
            q.xdp_redirected,
            q.frames + q.xsk_rx_dropped + q.xsk_rx_ring_full,
            "queue {}: redirected = received + socket drops: {q:?}",
            q.queue
        );
        assert_eq!(q.frames, q.records + q.drops_queue_full + q.drops_no_buffer, "queue {}: {q:?}", q.queue);
    }
    let written: u64 = summary.queues.iter().map(|q| q.records).sum();
    assert_eq!(written, summary.packets, "records appended = packets stored");
}

/// Whether the writer runs while the corpus is sent.
enum Writer {
    Running,
    /// Stopped for the whole send (SIGSTOP), as a writer that is not scheduled meanwhile.
    Stopped,
}

/// A one-shot capture of the corpus into a PCAP file, ended by one of its limits.
struct CorpusCapture {
    /// The frames sent, in order.
    sent: Vec<CorpusFrame>,
    summary: CaptureSummary,
    /// The PCAP file, in `_dir`.
    out: PathBuf,
    _dir: tempfile::TempDir,
}

/// Sends the corpus into a one-shot capture on a veth of `queues` queues, into a PCAP file,
/// with `flags` besides `--duration 120s` and a ring whose UMEM holds the corpus; waits for
/// the capture's summary.
fn capture_corpus(queues: u32, flags: &[&str], writer: Writer) -> CorpusCapture {
    let veth = VethPair::new(queues);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("corpus.pcap");
    let ring = CORPUS_RING_SIZE.to_string();
    let run = capture_to_file(&veth, &out, &[&["--duration", "120s", "--ring-size", &ring], flags].concat());
    let sent = match writer {
        Writer::Running => sender.send_all(&frames),
        Writer::Stopped => run.stopped_while(|| sender.send_all(&frames)),
    };
    let sent = sent.into_iter().cloned().collect();
    let summary = run.summary();
    CorpusCapture { sent, summary, out, _dir: dir }
}

#[test]
fn corpus_replay_is_stored_byte_for_byte_in_order() {
    let CorpusCapture { sent, summary, out, _dir } = capture_corpus(1, &["--idle", "3s"], Writer::Running);

    assert_eq!(summary.stop_reason.as_str(), "idle");
    let stored = read_capture(&out);
    assert_eq!(stored.len(), sent.len(), "frames stored vs frames sent");
    for (i, ((origlen, bytes), frame)) in stored.iter().zip(&sent).enumerate() {
        assert_eq!(bytes, &frame.data, "frame {i} ({} #{}) differs", frame.file.display(), frame.index);
        assert_eq!(*origlen as usize, frame.data.len(), "frame {i}: wire length");
    }
    assert_eq!(summary.packets, sent.len() as u64);
    assert_eq!(summary.bytes, sent.iter().map(|f| f.data.len() as u64).sum::<u64>());
    assert_eq!((summary.dropped_writer, summary.dropped_kernel, summary.truncated), (0, 0, 0));
    assert_accounted(&summary, sent.len());
}

#[test]
fn frames_spread_over_queues_are_all_stored_once_by_pinned_writers() {
    let CorpusCapture { sent, summary, out, _dir } =
        capture_corpus(2, &["--idle", "3s", "--cores", "0,1"], Writer::Running);

    assert_eq!(summary.queues.len(), 2);
    for q in &summary.queues {
        assert!(q.frames > 100, "queue {} got only {} frames: {:?}", q.queue, q.frames, summary.queues);
    }
    let stored = read_capture(&out);
    assert_same_frames(stored.into_iter().map(|(_, b)| b), data(&sent));
    assert_accounted(&summary, sent.len());
}

#[test]
fn long_frames_are_cut_to_the_umem_frame_and_counted() {
    // Tests share two cores: the writer may not run at all while the corpus is sent. Stop it
    // for the whole send; the UMEM of a CORPUS_RING_SIZE ring holds every frame meanwhile.
    let CorpusCapture { sent, summary, out, _dir } =
        capture_corpus(1, &["--idle", "3s", "--frame-size", "2048"], Writer::Stopped);

    let max = 2048 - 256;
    let long = sent.iter().filter(|f| f.data.len() > max).count();
    assert!(long > 0, "the corpus has frames longer than {max} bytes");
    assert_eq!(summary.truncated, long as u64, "every cut frame is counted");
    let stored = read_capture(&out);
    assert_eq!(stored.len(), sent.len());
    for ((origlen, bytes), frame) in stored.iter().zip(&sent) {
        let keep = frame.data.len().min(max);
        assert_eq!(bytes[..], frame.data[..keep]);
        assert_eq!(*origlen as usize, frame.data.len(), "the wire length survives the cut");
    }
    assert_accounted(&summary, sent.len());
}

#[test]
fn snaplen_and_packet_limit_are_exact() {
    let CorpusCapture { sent, summary, out, _dir } =
        capture_corpus(1, &["--packets", "1000", "--snaplen", "64"], Writer::Running);

    assert_eq!(summary.stop_reason.as_str(), "packets");
    let stored = read_capture(&out);
    assert_eq!(stored.len(), 1000);
    for ((origlen, bytes), frame) in stored.iter().zip(&sent) {
        assert_eq!(bytes[..], frame.data[..frame.data.len().min(64)]);
        assert_eq!(*origlen as usize, frame.data.len());
    }
}

#[test]
fn a_pcapng_file_names_its_interface_and_filter_and_holds_the_drops() {
    let veth = VethPair::new(1);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("capture.pcapng");
    // A ring of 64 entries (a UMEM of 32 frames) and the writer stopped while the corpus is
    // sent: most frames the filter accepts are dropped, and counted.
    let filter = ["ip", "or", "ip6"];
    let flags = ["--format", "pcapng", "--node", "tap-9", "--id", "ng-1", "--alert-id", "A-7"];
    let limits = ["--idle", "3s", "--duration", "120s", "--ring-size", "64"];
    let run = capture_to_file(&veth, &out, &[&flags[..], &limits, &filter].concat());
    let sent = run.stopped_while(|| sender.send_all(&frames));
    let summary = run.summary();
    let drops = summary.dropped_writer + summary.dropped_kernel + summary.dropped_spool_full;
    assert!(drops > 0 && summary.packets > 0, "{summary:?}");

    let (comment, interfaces) = crate::catalog::capinfos(&out);
    assert_eq!(
        comment,
        format!("tapstream capture -i {0} on node tap-9: capture ng-1; alert A-7", veth.capture_if)
    );
    assert_eq!(interfaces.len(), 1);
    let i = &interfaces[0];
    assert_eq!(i["Name"], format!("tap-9/{}", veth.capture_if));
    assert_eq!(i["Filter string"], "ip or ip6");
    assert_eq!(i["Time precision"], "nanoseconds (9)");
    assert_eq!(i["Capture length"], "262144");
    assert_eq!(i["Number of packets"], summary.packets.to_string());
    assert_eq!(crate::catalog::interface_statistics(&out, "dropped"), [drops]);
    assert_eq!(crate::catalog::interface_statistics(&out, "delivered_to_user"), [summary.packets]);

    // The frames stored are frames sent, in the order sent, whole.
    let stored = crate::catalog::pcapng_records(&out);
    assert_eq!(stored.len() as u64, summary.packets);
    let mut rest = sent.iter();
    for (n, (_, origlen, data)) in stored.iter().enumerate() {
        assert!(rest.any(|f| &f.data == data), "stored frame {n} is not a frame sent after the one before");
        assert_eq!(*origlen as usize, data.len());
    }

    // pcapng is for a file; an unknown format names the known ones. Refused before anything
    // starts (the interface is not looked at).
    for (args, needle) in [
        (
            ["--upload", dir.path().to_str().unwrap(), "--format", "pcapng"],
            "--format pcapng is for a --write file",
        ),
        (["-w", out.to_str().unwrap(), "--format", "pcap-ng"], "[possible values: pcap, pcapng]"),
    ] {
        let run = std::process::Command::new(crate::common::tapstream_bin())
            .args(["capture", "-i", "no-such-if"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success() && stderr.contains(needle), "{args:?}: {stderr}");
    }
}
