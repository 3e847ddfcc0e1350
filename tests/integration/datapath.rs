//! The capture data path end to end: XDP -> AF_XDP -> writers -> PCAP file, on a real veth
//! with the real corpus.

use tapstream::captures::CaptureSummary;
use tapstream_testenv::{CORPUS_RING_SIZE, Sender, VethPair, corpus_frames};

use crate::common::{Running, assert_same_frames, data, read_capture};

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

#[test]
fn corpus_replay_is_stored_byte_for_byte_in_order() {
    let veth = VethPair::new(1);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("corpus.pcap");
    let ring = CORPUS_RING_SIZE.to_string();
    let mut run = Running::start(
        &veth.capture_ns,
        &[
            "capture",
            "-i",
            &veth.capture_if,
            "-w",
            out.to_str().unwrap(),
            "--idle",
            "3s",
            "--duration",
            "120s",
            "--ring-size",
            &ring,
            "--json",
        ],
    );
    run.wait_ready();
    let sent = sender.send_all(&frames);
    let summary = run.summary();

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
    let veth = VethPair::new(2);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("multi.pcap");
    let ring = CORPUS_RING_SIZE.to_string();
    let mut run = Running::start(
        &veth.capture_ns,
        &[
            "capture",
            "-i",
            &veth.capture_if,
            "-w",
            out.to_str().unwrap(),
            "--idle",
            "3s",
            "--duration",
            "120s",
            "--cores",
            "0,1",
            "--ring-size",
            &ring,
            "--json",
        ],
    );
    run.wait_ready();
    let sent = sender.send_all(&frames);
    let summary = run.summary();

    assert_eq!(summary.queues.len(), 2);
    for q in &summary.queues {
        assert!(q.frames > 100, "queue {} got only {} frames: {:?}", q.queue, q.frames, summary.queues);
    }
    let stored = read_capture(&out);
    assert_same_frames(stored.into_iter().map(|(_, b)| b), data(sent.iter().copied()));
    assert_accounted(&summary, sent.len());
}

#[test]
fn long_frames_are_cut_to_the_umem_frame_and_counted() {
    let veth = VethPair::new(1);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cut.pcap");
    let ring = CORPUS_RING_SIZE.to_string();
    let mut run = Running::start(
        &veth.capture_ns,
        &[
            "capture",
            "-i",
            &veth.capture_if,
            "-w",
            out.to_str().unwrap(),
            "--idle",
            "3s",
            "--duration",
            "120s",
            "--frame-size",
            "2048",
            "--ring-size",
            &ring,
            "--json",
        ],
    );
    run.wait_ready();
    // Tests share two cores: the writer may not run at all while the corpus is sent. Stop it
    // for the whole send; the UMEM of a CORPUS_RING_SIZE ring holds every frame meanwhile.
    let sent = run.stopped_while(|| sender.send_all(&frames));
    let summary = run.summary();

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
    let veth = VethPair::new(1);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("limit.pcap");
    let ring = CORPUS_RING_SIZE.to_string();
    let mut run = Running::start(
        &veth.capture_ns,
        &[
            "capture",
            "-i",
            &veth.capture_if,
            "-w",
            out.to_str().unwrap(),
            "--packets",
            "1000",
            "--snaplen",
            "64",
            "--duration",
            "120s",
            "--ring-size",
            &ring,
            "--json",
        ],
    );
    run.wait_ready();
    let sent = sender.send_all(&frames);
    let summary = run.summary();

    assert_eq!(summary.stop_reason.as_str(), "packets");
    let stored = read_capture(&out);
    assert_eq!(stored.len(), 1000);
    for ((origlen, bytes), frame) in stored.iter().zip(&sent) {
        assert_eq!(bytes[..], frame.data[..frame.data.len().min(64)]);
        assert_eq!(*origlen as usize, frame.data.len());
    }
}
