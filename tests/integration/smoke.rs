//! The XDP program attached to a real veth counts every frame replayed from the corpus.

use std::time::{Duration, Instant};

use tapstream::datapath::xdp::{AttachMode, XdpProgram};
use tapstream_testenv::{Sender, VethPair, corpus_frames};

#[test]
fn xdp_counts_every_corpus_frame() {
    let veth = VethPair::new(1);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    let program = veth.capture_ns.enter(|| {
        let mut program = XdpProgram::load(&veth.capture_if).expect("load XDP program");
        let mode = program.attach(AttachMode::Native).expect("attach XDP in native mode");
        assert_eq!(mode, AttachMode::Native);
        program
    });
    assert_eq!(program.counters().expect("counters").seen, 0, "no frame sent yet");

    let sent = sender.send_all(&frames);
    assert!(sent.len() > 7000, "only {} of {} corpus frames could be sent", sent.len(), frames.len());

    // Frames cross the veth asynchronously (the receiver's NAPI); wait for the count to settle.
    let deadline = Instant::now() + Duration::from_secs(30);
    let counters = loop {
        let counters = program.counters().expect("counters");
        if counters.seen >= sent.len() as u64 || Instant::now() > deadline {
            break counters;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(counters.seen, sent.len() as u64, "frames seen by XDP vs frames sent: {counters:?}");
    assert_eq!(counters.passed, counters.seen, "every frame is passed while no capture runs");
}
