//! Starting a capture while its S3 store is down: the capture starts and spools its chunks, as
//! a running capture does during an outage, uploads them once the store is back, and the
//! captures already running on the interface lose nothing meanwhile.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tapstream::{captures::CaptureSummary, control::CaptureState};
use tapstream_testenv::{CORPUS_RING_SIZE, Garage, Netns, Sender, VethPair, unique_name};

use crate::{
    common::{Running, walk},
    daemon::{TestDaemon, error_of, sendable},
    recovery::zstd_d,
    upload::{
        leave_spool, random_frames, raw_object, records, recovered_object, spooled_chunks, start_upload,
    },
};

/// The frames the S3 captures here take (the random frames' EtherType); the canary takes the rest.
const S3_FILTER: &str = "ether proto 0x88b5";

/// Waits (generously) until a chunk waits in a spool under `root`.
fn wait_for_spooled_chunk(root: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while spooled_chunks(root) == 0 {
        assert!(Instant::now() < deadline, "no chunk spooled in {} while the store is down", root.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A daemon whose captures go to `garage`'s bucket under `prefix` (zstd level 1, one chunk in
/// memory) or, with `--destination local`, to its local directory; `extra` adds to its
/// `[store]` section.
fn s3_daemon(veth: &VethPair, garage: &Garage, prefix: &str, extra: &str) -> TestDaemon {
    let (bucket, endpoint, region) = (&garage.bucket, &garage.endpoint, &garage.region);
    TestDaemon::start_with_store(
        veth,
        "",
        |d| {
            format!(
                "destinations = [\"s3://{bucket}/{prefix}\", \"{d}/store\"]\ns3_endpoint = \"{endpoint}\"\n\
                 s3_region = \"{region}\"\ns3_path_style = true\ncompression = \"1\"\nupload_queue = 1\n\
                 {extra}spool_dir = \"{d}/spool\"\n"
            )
        },
        garage.aws_env(),
    )
}

/// Starts the canary: a capture of every frame the S3 captures do not take, into the daemon's
/// local directory, with the id `canary`.
fn start_canary(daemon: &TestDaemon) -> String {
    daemon.start_capture(&[
        "-i",
        "tap",
        "--destination",
        "local",
        "--duration",
        "300s",
        "--id",
        "canary",
        "not",
        "ether",
        "proto",
        "0x88b5",
    ])
}

/// The frames of the canary's objects in the daemon's local directory, in order.
fn canary_stored(daemon: &TestDaemon) -> Vec<Vec<u8>> {
    let mut objects: Vec<_> = walk(&daemon.dir.path().join("store/testnode/canary"))
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".pcap.zst"))
        .collect();
    objects.sort();
    objects
        .iter()
        .flat_map(|o| records(&zstd_d(&std::fs::read(o).unwrap())).into_iter().map(|(_, d)| d))
        .collect()
}

/// Starts a one-shot capture of the frames of [`S3_FILTER`] into `url` as capture `id` of node
/// `n`, compressed with `compression`, spooling in `spool`, until 6 s without a frame; its ring
/// holds the bursts of frames sent here. Waits until it captures.
fn start_one_shot(
    veth: &VethPair,
    garage: &Garage,
    url: &str,
    id: &str,
    compression: &str,
    spool: &Path,
) -> Running {
    let ring = CORPUS_RING_SIZE.to_string();
    let flags = [
        "--id",
        id,
        "--node",
        "n",
        "--idle",
        "6s",
        "--duration",
        "120s",
        "--json",
        "--compression",
        compression,
        "--upload-queue",
        "1",
        "--spool-dir",
        spool.to_str().unwrap(),
        "--ring-size",
        &ring,
    ];
    let flags: Vec<&str> = flags.into_iter().chain(S3_FILTER.split(' ')).collect();
    let mut run = start_upload(veth, garage, url, &flags);
    run.wait_ready();
    run
}

/// Waits for a one-shot capture that must succeed once the store is back; returns its summary
/// and log.
fn summary_once_back(run: Running) -> (CaptureSummary, String) {
    let (status, stdout, log) = run.finish();
    eprintln!("tapstream log:\n{log}");
    assert!(status.success(), "the capture succeeds once the store is back ({status}):\n{log}");
    let summary =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("summary is not JSON ({e}):\n{stdout}"));
    (summary, log)
}

/// Sends 6,000 random frames (from `seed`) for the S3 captures while `garage` is down, until a
/// chunk waits in a spool under `spool`, and the second half once it is back. Returns the frames.
fn send_across_outage(veth: &VethPair, garage: &mut Garage, spool: &Path, seed: u64) -> Vec<Vec<u8>> {
    let frames = random_frames(6_000, seed);
    let (during, after) = frames.split_at(3_000);
    let sender = Sender::new(veth);
    send_frames(&sender, during);
    wait_for_spooled_chunk(spool);
    garage.resume();
    send_frames(&sender, after);
    frames
}

/// The warning line of `log` naming `garage`'s endpoint and bucket.
fn store_warning<'a>(log: &'a str, garage: &Garage) -> &'a str {
    log.lines()
        .find(|l| l.contains("WARN") && l.contains(&garage.endpoint) && l.contains(&garage.bucket))
        .unwrap_or_else(|| panic!("no warning naming the store's endpoint and bucket:\n{log}"))
}

/// The frames of the objects at `urls` (in the bucket of `garage`), in order; an object named
/// `.zst` is decompressed with `zstd -d`, the others are PCAP as they are.
fn frames_in_objects(ns: &Netns, garage: &Garage, urls: &[String]) -> Vec<Vec<u8>> {
    let mut urls = urls.to_vec();
    urls.sort();
    let mut frames = Vec::new();
    for url in &urls {
        let key = url.strip_prefix(&format!("s3://{}/", garage.bucket)).expect("an s3 URL in the bucket");
        let object = raw_object(ns, garage, key);
        let pcap = if key.ends_with(".zst") { zstd_d(&object) } else { object };
        frames.extend(records(&pcap).into_iter().map(|(_, data)| data));
    }
    frames
}

/// Asserts that the objects at `urls` hold exactly `frames`, in order, and that nothing is left
/// in the spools under `spool`.
fn assert_all_uploaded(veth: &VethPair, garage: &Garage, urls: &[String], frames: &[Vec<u8>], spool: &Path) {
    let got = frames_in_objects(&veth.capture_ns, garage, urls);
    assert!(
        got == frames,
        "the objects hold exactly the {} frames sent ({} stored)",
        frames.len(),
        got.len()
    );
    assert_eq!(spooled_chunks(spool), 0, "nothing is left in the spool");
}

/// Sends `frames` into the veth in slices of 200, 20 ms apart (about 10,000 frames a second),
/// from a thread of its own: once through all of them, then on until `stop` is set. Returns
/// every frame sent, in order.
fn send_until(
    veth: &VethPair,
    frames: Vec<Vec<u8>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    let sender = Sender::new(veth);
    std::thread::spawn(move || {
        let mut sent = Vec::new();
        let mut rounds = 0;
        while rounds == 0 || !stop.load(Ordering::Relaxed) {
            for slice in frames.chunks(200) {
                send_frames(&sender, slice);
                sent.extend_from_slice(slice);
                std::thread::sleep(Duration::from_millis(20));
            }
            rounds += 1;
        }
        sent
    })
}

/// Sends every frame (retrying on a full socket queue).
fn send_frames(sender: &Sender, frames: &[Vec<u8>]) {
    for f in frames {
        while let Err(e) = sender.send(f) {
            assert!(e.raw_os_error() == Some(libc::ENOBUFS), "send: {e}");
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

#[test]
fn the_daemon_starts_an_s3_capture_while_the_store_is_down_and_the_running_capture_loses_nothing() {
    let veth = VethPair::new(1);
    let mut garage = Garage::start_in(&veth.capture_ns);
    let prefix = unique_name("down");
    garage.stop();
    let mut daemon = s3_daemon(&veth, &garage, &prefix, "");
    let spool = daemon.dir.path().join("spool");
    let client = daemon.client();

    // A capture already running, into the local directory, with frames flowing throughout.
    let corpus: Vec<Vec<u8>> = sendable(&veth).into_iter().map(|f| f.data).collect();
    let canary = start_canary(&daemon);
    let stop_sending = Arc::new(AtomicBool::new(false));
    let to_canary = send_until(&veth, corpus, stop_sending.clone());

    // The S3 capture starts while the store is down, and runs.
    let body = serde_json::json!({
        "interface": "tap",
        "id": "behind",
        "filter": S3_FILTER,
        "duration_secs": 120,
        "idle_timeout_secs": 6,
    });
    let (status, reply) = client.raw("POST", "/v1/captures", Some(body.to_string().as_bytes())).unwrap();
    let reply = String::from_utf8_lossy(&reply).into_owned();
    stop_sending.store(true, Ordering::Relaxed);
    assert_eq!(status, 201, "the capture starts while the store is down: {}", error_of(&reply));
    let id: String =
        serde_json::from_str::<serde_json::Value>(&reply).unwrap()["id"].as_str().unwrap().into();
    assert_eq!(client.status(&id).unwrap().state, CaptureState::Running);

    // The canary stored every frame sent to it while the other capture started.
    let canary_sent = to_canary.join().unwrap();
    client.stop(&canary).unwrap();
    let canary_info = daemon.wait(&canary);
    let canary_summary = canary_info.summary.clone().unwrap_or_else(|| panic!("{canary_info:?}"));
    let stored = canary_stored(&daemon);
    assert_eq!(
        (canary_summary.packets, canary_summary.dropped_writer, canary_summary.dropped_kernel),
        (canary_sent.len() as u64, 0, 0),
        "the running capture stored every frame sent while the other started: {canary_summary:?}"
    );
    assert!(
        stored == canary_sent,
        "the canary's objects hold the {} frames sent, in order",
        canary_sent.len()
    );

    // While the store is down its chunks wait in the spool; once it is back they go up.
    let frames = send_across_outage(&veth, &mut garage, &spool, 23);

    let info = daemon.wait(&id);
    let summary =
        info.summary.clone().unwrap_or_else(|| panic!("the capture ended without a summary: {info:?}"));
    assert_eq!(info.state, CaptureState::Finished, "{info:?}");
    assert_eq!(summary.stop_reason.as_str(), "idle", "{info:?}");
    assert_eq!(summary.packets, frames.len() as u64, "{summary:?}");
    assert_eq!(
        summary.bytes,
        frames.iter().map(|f| f.len() as u64).sum::<u64>(),
        "bytes stored = bytes sent"
    );
    assert!(!summary.outputs.is_empty(), "the capture lists its objects: {info:?}");
    for url in &summary.outputs {
        assert!(
            url.starts_with(&format!("s3://{}/{prefix}/testnode/{id}/", garage.bucket)),
            "an object of the capture: {url}"
        );
    }
    let got = frames_in_objects(&veth.capture_ns, &garage, &summary.outputs);
    assert_eq!(got.len(), frames.len(), "frames in the objects");
    assert!(got == frames, "the objects hold exactly the frames sent, in order");
    assert_eq!(spooled_chunks(&spool), 0, "nothing is left in the spool");

    let (_, log) = daemon.running.take().expect("running").signal_and_wait(libc::SIGTERM);
    eprintln!("daemon log:\n{log}");
    let warning = store_warning(&log, &garage);
    assert!(warning.contains(&id), "the warning names the capture: {warning}");
    assert!(!log.contains(&garage.secret_key), "no secret in the log");
}

#[test]
fn a_one_shot_capture_starts_while_the_store_is_down_and_uploads_everything_once_it_is_back() {
    let veth = VethPair::new(1);
    let mut garage = Garage::start_in(&veth.capture_ns);
    garage.stop();
    let spool = tempfile::tempdir().unwrap();
    let prefix = unique_name("down1");
    let url = format!("s3://{}/{prefix}", garage.bucket);
    let run = start_one_shot(&veth, &garage, &url, "oneshot", "1", spool.path());

    let frames = send_across_outage(&veth, &mut garage, spool.path(), 29);
    let (summary, log) = summary_once_back(run);

    assert_eq!(summary.packets, frames.len() as u64, "{summary:?}");
    assert_eq!(summary.dropped_writer, 0, "{summary:?}");
    assert!(!summary.outputs.is_empty(), "the summary lists the objects: {summary:?}");
    assert_all_uploaded(&veth, &garage, &summary.outputs, &frames, spool.path());
    let warning = store_warning(&log, &garage);
    assert!(warning.contains("spool"), "the warning says the chunks spool: {warning}");
    assert!(!log.contains(&garage.secret_key), "no secret in the log");
}

#[test]
fn a_leftover_spool_for_a_store_that_is_down_waits_for_it_without_holding_up_the_start() {
    let veth = VethPair::new(1);
    let mut garage = Garage::start_in(&veth.capture_ns);
    garage.stop();
    let spool = tempfile::tempdir().unwrap();
    // A spool an earlier run left for the bucket.
    let leftover = spool.path().join("old-1");
    let spooled = leave_spool(leftover.clone(), &format!("s3://{}/", garage.bucket));
    let prefix = unique_name("left");
    let url = format!("s3://{}/{prefix}", garage.bucket);
    // The capture starts although the leftover cannot be uploaded yet. Frames come in bursts of
    // 1,500: a UMEM that holds more loses none of them.
    let run = start_one_shot(&veth, &garage, &url, "after", "none", spool.path());
    let frames = random_frames(3_000, 31);
    let (during, after) = frames.split_at(1_500);
    let sender = Sender::new(&veth);
    send_frames(&sender, during);
    assert!(leftover.is_dir(), "the leftover waits for the store");
    garage.resume();
    send_frames(&sender, after);
    let (summary, log) = summary_once_back(run);

    // The leftover became an object once the store answered, and its spool is gone.
    let recovered = recovered_object(&log).unwrap_or_else(|| panic!("the leftover was not uploaded:\n{log}"));
    let key = recovered.strip_prefix(&format!("s3://{}/", garage.bucket)).expect("an s3 URL in the bucket");
    assert!(key.contains("old-1"), "named after the spool: {key}");
    assert_eq!(raw_object(&veth.capture_ns, &garage, key), spooled, "the spooled bytes, whole");
    assert!(!leftover.exists(), "the leftover spool is gone");

    // And the capture that started meanwhile stored every frame.
    assert_eq!(summary.packets, frames.len() as u64, "{summary:?}");
    assert_all_uploaded(&veth, &garage, &summary.outputs, &frames, spool.path());
}

#[test]
fn a_capture_whose_spool_is_full_loses_its_own_chunks_and_no_other_capture_loses_a_frame() {
    let veth = VethPair::new(1);
    let mut garage = Garage::start_in(&veth.capture_ns);
    let prefix = unique_name("full");
    garage.stop();
    // One compressed chunk in memory, a spool that holds none, and an outage allowed to last:
    // the S3 capture's chunks find nowhere to wait.
    let daemon = s3_daemon(&veth, &garage, &prefix, "spool_max_bytes = 1\noutage_max_secs = 600\n");
    let client = daemon.client();
    let canary = start_canary(&daemon);
    let full = daemon.start_capture(&["-i", "tap", "--duration", "300s", "--id", "full", S3_FILTER]);

    // About 8 MB for the S3 capture, then the corpus for the canary.
    let frames = random_frames(6_000, 31);
    send_frames(&Sender::new(&veth), &frames);
    let corpus: Vec<Vec<u8>> = sendable(&veth).into_iter().map(|f| f.data).collect();
    let canary_sent = send_until(&veth, corpus, Arc::new(AtomicBool::new(true))).join().unwrap();

    // The canary goes on capturing while the other capture's chunks have nowhere to go.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let progress = client.status(&canary).unwrap().progress;
        if progress.packets == canary_sent.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the canary's progress stopped at {} of {} frames while the S3 capture's spool was full",
            progress.packets,
            canary_sent.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    client.stop(&canary).unwrap();
    let info = daemon.wait(&canary);
    let summary = info.summary.clone().unwrap_or_else(|| panic!("{info:?}"));
    assert_eq!(
        (summary.packets, summary.dropped_writer, summary.dropped_kernel),
        (canary_sent.len() as u64, 0, 0)
    );
    let stored = canary_stored(&daemon);
    assert!(stored == canary_sent, "the canary stored every frame sent to it, in order");

    // The S3 capture lost its own chunks, counted as they were lost; what it kept goes up
    // once the store is back.
    let progress = client.status(&full).unwrap().progress;
    assert!(progress.dropped > 0, "the losses show while the capture runs: {progress:?}");
    garage.resume();
    client.stop(&full).unwrap();
    let info = daemon.wait(&full);
    let summary = info.summary.clone().unwrap_or_else(|| panic!("{info:?}"));
    assert!(summary.dropped_spool_full > 0, "{summary:?}");
    assert_eq!(
        summary.packets + summary.dropped_spool_full + summary.dropped_writer,
        frames.len() as u64,
        "stored + lost = sent: {summary:?}"
    );
    let got = frames_in_objects(&veth.capture_ns, &garage, &summary.outputs);
    assert_eq!(got.len() as u64, summary.packets, "the objects hold the packets the summary counts");
    let mut rest = frames.iter();
    assert!(
        got.iter().all(|g| rest.any(|f| f == g)),
        "what is stored is frames sent, in order, whole chunks missing"
    );
}
