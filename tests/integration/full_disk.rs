//! `-w` onto a disk that fills up: the file ends on a whole record, the capture ends with an
//! error naming the file and the OS's reason, and its summary accounts for every frame.

use std::{path::Path, process::Command};

use tapstream::captures::CaptureSummary;
use tapstream_testenv::{CORPUS_RING_SIZE, Sender, VethPair, corpus_frames};

use crate::common::{capture_to_file, read_capture};

/// A tmpfs of a fixed size mounted on a temporary directory; unmounted when dropped (also when
/// a test panics).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(out.status.success(), "mount a tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_disk_ends_the_capture_with_whole_records_an_error_and_the_summary() {
    let veth = VethPair::new(1);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    // Room for the first 1 MiB chunk and not for the rest of the corpus (about 1.7 MB of
    // records): the second chunk is written only in part before the disk is full.
    let disk = Tmpfs::mount("1280k");
    let out = disk.path().join("full.pcap");
    let ring = CORPUS_RING_SIZE.to_string();
    let run = capture_to_file(&veth, &out, &["--duration", "120s", "--ring-size", &ring]);
    // Every frame is in the socket's ring (it holds the corpus) before the writer takes the
    // first: the capture has had every frame when its output fails.
    let sent = run.stopped_while(|| sender.send_all(&frames));
    let (status, stdout, stderr) = run.finish();
    eprintln!("tapstream log:\n{stderr}\nstdout:\n{stdout}");

    assert!(!status.success(), "a capture whose disk filled up must fail ({status})");
    let path = out.display().to_string();
    let error_line = stderr.lines().rev().find(|l| l.starts_with("tapstream:")).unwrap_or_default();
    assert!(
        error_line.contains(&path) && error_line.contains("No space left on device"),
        "the error names the file and the reason: {error_line:?}"
    );
    // No torn record: capinfos, tshark and our reader read every record to the end.
    let stored = read_capture(&out);
    assert!(!stored.is_empty(), "the first chunk fitted and was kept");
    for (i, ((_, data), frame)) in stored.iter().zip(&sent).enumerate() {
        assert_eq!(data, &frame.data, "record {i} is frame {i} sent");
    }

    let json: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("the summary is printed as JSON on stdout ({e}):\n{stdout}"));
    let summary: CaptureSummary = serde_json::from_value(json.clone()).expect("a summary");
    assert_eq!(summary.stop_reason.as_str(), "error");
    let error = json["error"].as_str().unwrap_or_default();
    assert!(error.contains(&path) && error.contains("No space left on device"), "summary error: {error:?}");
    assert_eq!(summary.outputs, [path], "the file holds what was stored");
    assert_eq!(stored.len() as u64, summary.packets, "records in the file = packets in the summary");
    assert!(summary.dropped_writer > 0, "the frames that did not fit are counted: {summary:?}");
    assert_eq!(
        summary.packets + summary.dropped_writer + summary.dropped_kernel,
        sent.len() as u64,
        "every frame sent is stored or counted as dropped: {summary:?}"
    );
}
