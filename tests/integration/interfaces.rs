//! One capture over several interfaces (both directions of an optical tap): a host with two
//! tapped veth links, a daemon configured with both, and what it stores of each.

use tapstream::control::CaptureState;
use tapstream_testenv::{CORPUS_RING_SIZE, Sender, VethPair};

use crate::{
    common::eventually,
    daemon::{TestDaemon, data, reason, sendable},
};

/// Two links whose capture ends are in one namespace, and a daemon there that has the first
/// as `tap` and the second as `west`.
pub(crate) fn two_links() -> (VethPair, VethPair, TestDaemon) {
    let east = VethPair::new(1);
    let west = VethPair::new(1);
    west.move_capture_end(&east.capture_ns);
    let second = format!(
        "\n[interfaces.west]\ndevice = \"{}\"\ndrop_unmatched = false\nring_size = {CORPUS_RING_SIZE}\n",
        west.capture_if
    );
    let daemon = TestDaemon::start(&east, &second);
    (east, west, daemon)
}

/// Waits until capture `id` has taken `packets` frames.
fn wait_taken(daemon: &TestDaemon, id: &str, packets: u64) {
    eventually(&format!("capture {id} to take {packets} frames"), || {
        let info = daemon.client().status(id).unwrap();
        (info.progress.packets >= packets).then_some(())
    });
}

#[test]
fn a_capture_over_two_interfaces_stops_at_the_limit_of_their_sum_and_stores_each_apart() {
    let (east, west, daemon) = two_links();
    let id = daemon.start_capture(&["-i", "tap", "-i", "west", "-c", "40", "--duration", "60s"]);
    let info = daemon.client().status(&id).unwrap();
    assert_eq!(info.interfaces, ["tap", "west"]);
    assert_eq!(info.devices, [east.capture_if.clone(), west.capture_if.clone()]);
    assert!(info.location.ends_with(&format!("/{id}/")), "{}", info.location);

    // 30 frames on one link, all taken, then 30 on the other: the limit of 40 takes 10 of them.
    let east_frames = sendable(&east);
    let sent_east = data(&Sender::new(&east).send_all(&east_frames[..30]));
    wait_taken(&daemon, &id, 30);
    let west_frames = sendable(&west);
    let sent_west = data(&Sender::new(&west).send_all(&west_frames[200..230]));
    let info = daemon.wait(&id);

    assert_eq!(reason(&info), "packets");
    let summary = info.summary.as_ref().unwrap();
    assert_eq!((summary.packets, summary.error.as_deref()), (40, None), "{summary:?}");
    let parts: Vec<_> = summary.parts.iter().map(|p| (p.interface.as_str(), p.packets)).collect();
    assert_eq!(parts, [(east.capture_if.as_str(), 30), (west.capture_if.as_str(), 10)]);
    assert_eq!(summary.bytes, summary.parts.iter().map(|p| p.bytes).sum::<u64>());
    for output in &summary.outputs {
        assert!(
            output.contains(&format!("/{id}/tap/")) || output.contains(&format!("/{id}/west/")),
            "{output} is not under an interface's own place"
        );
    }
    assert!(daemon.stored_part(&id, "tap") == sent_east, "every frame sent on the first link, in order");
    assert!(daemon.stored_part(&id, "west") == sent_west[..10], "the first 10 frames sent on the second");
    assert!(daemon.stored(&id).is_empty(), "nothing stored outside the interfaces' places");
}

#[test]
fn stopping_a_capture_over_two_interfaces_ends_both_with_what_each_took() {
    let (east, west, daemon) = two_links();
    // Named by device and by alias alike, the same interface twice counts once.
    let id = daemon.start_capture(&["-i", &east.capture_if, "-i", "west", "-i", "tap", "--duration", "60s"]);
    assert_eq!(daemon.client().status(&id).unwrap().interfaces, ["tap", "west"]);
    let sent_east = data(&Sender::new(&east).send_all(&sendable(&east)[..7]));
    let sent_west = data(&Sender::new(&west).send_all(&sendable(&west)[50..55]));
    wait_taken(&daemon, &id, 12);
    let out = daemon.cli(&["stop", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info = daemon.wait(&id);
    assert_eq!((info.state, reason(&info)), (CaptureState::Finished, "stopped"));
    let summary = info.summary.as_ref().unwrap();
    assert_eq!(summary.parts.iter().map(|p| p.stop_reason.as_str()).collect::<Vec<_>>(), ["stopped"; 2]);
    assert_eq!(summary.packets, 12);
    assert!(daemon.stored_part(&id, "tap") == sent_east);
    assert!(daemon.stored_part(&id, "west") == sent_west);
}

#[test]
fn a_request_naming_an_unknown_interface_among_others_starts_nothing() {
    let (_east, _west, daemon) = two_links();
    let out = daemon.cli(&["start", "-i", "tap", "-i", "bond9", "--duration", "10s"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no interface \"bond9\" here; configured:"), "{stderr}");
    assert!(daemon.client().list().unwrap().is_empty(), "nothing started");
}
