//! A daemon that dies mid-capture (`kill -9`): the next start finishes what it left in the
//! store (its open multipart upload) and reports it in the capture's state.

use std::time::{Duration, Instant};

use tapstream::control::CaptureState;
use tapstream_testenv::{Garage, Sender, VethPair, unique_name};

use crate::{
    daemon::TestDaemon,
    upload::{client, random_frames, raw_object, read, records, sink},
};
use tapstream::store::Sink as _;

/// A daemon storing to `s3://bucket/prefix` on `garage`, in 5 MiB parts of zstd level 1.
fn s3_daemon(veth: &VethPair, garage: &Garage, prefix: &str) -> TestDaemon {
    let (bucket, endpoint, region) = (garage.bucket.clone(), garage.endpoint.clone(), garage.region.clone());
    let prefix = prefix.to_owned();
    TestDaemon::start_with_store(
        veth,
        "",
        move |d| {
            format!(
                "destinations = [\"s3://{bucket}/{prefix}\"]\ns3_endpoint = \"{endpoint}\"\n\
                 s3_region = \"{region}\"\ns3_path_style = true\ncompression = \"1\"\n\
                 part_size_bytes = 5242880\nparts_in_flight = 1\nspool_dir = \"{d}/spool\"\n"
            )
        },
        garage.aws_env(),
    )
}

/// Parts the store holds of each multipart upload under `prefix`.
fn open_parts(veth: &VethPair, garage: &Garage, prefix: &str) -> Vec<(String, usize)> {
    veth.capture_ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let client = client(garage).await;
            let mut out = Vec::new();
            for upload in sink(garage).await.list_multipart(prefix).await.expect("list uploads") {
                let parts = client
                    .list_parts()
                    .bucket(&garage.bucket)
                    .key(&upload.key)
                    .upload_id(&upload.upload_id)
                    .send()
                    .await
                    .expect("list parts");
                out.push((upload.key, parts.parts().len()));
            }
            out
        })
    })
}

/// `zstd -d` of `object`.
pub(crate) fn zstd_d(object: &[u8]) -> Vec<u8> {
    use std::process::{Command, Stdio};
    let mut zstd =
        Command::new("zstd").args(["-d", "-c"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = zstd.stdin.take().unwrap();
    let raw = object.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &raw));
    let out = zstd.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "zstd -d: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[test]
fn a_killed_daemon_s_capture_is_completed_from_its_open_upload_on_restart() {
    let veth = VethPair::new(1);
    let garage = Garage::start_in(&veth.capture_ns);
    let prefix = unique_name("crash");
    let mut daemon = s3_daemon(&veth, &garage, &prefix);
    let id = daemon.start_capture(&["-i", "tap", "--duration", "300s", "--id", "crashme"]);

    // Incompressible frames: 5 MiB parts fill after ~3,800 of them.
    let frames = random_frames(12_000, 11);
    let sender = Sender::new(&veth);
    for f in &frames {
        sender.send(f).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open = open_parts(&veth, &garage, &prefix);
        if open.iter().any(|(_, parts)| *parts >= 1) {
            break;
        }
        assert!(Instant::now() < deadline, "no part uploaded: {open:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Progress is saved every 2 s: let it see the frames.
    std::thread::sleep(Duration::from_secs(3));
    let (_, log) = daemon.running.take().expect("running").signal_and_wait(libc::SIGKILL);
    eprintln!("first daemon:\n{log}");
    assert!(!open_parts(&veth, &garage, &prefix).is_empty(), "the dead run left an open upload");

    daemon.restart(&veth);
    // Recovery runs in the background at start; its result lands in the capture's state.
    let deadline = Instant::now() + Duration::from_secs(90);
    let info = loop {
        let info = daemon.client().status(&id).expect("status");
        let value = serde_json::to_value(&info).unwrap();
        if value["summary"]["recovery"]["pending"] == serde_json::Value::Bool(false) {
            break info;
        }
        if Instant::now() > deadline {
            break info;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("capture after the restart: {info:?}");
    let summary = info.summary.clone().expect("a summary");
    assert_eq!(info.state, CaptureState::Finished);
    assert_eq!(summary.stop_reason.as_str(), "interrupted");

    let pending = open_parts(&veth, &garage, &prefix);
    assert!(pending.is_empty(), "no multipart upload of the dead run stays open: {pending:?}");
    assert!(!summary.outputs.is_empty(), "the capture lists the objects recovered: {info:?}");

    // The objects, in order, hold the first frames sent, each once.
    let mut got = Vec::new();
    for url in &summary.outputs {
        let key = url.strip_prefix(&format!("s3://{}/", garage.bucket)).expect("an s3 URL in the bucket");
        assert!(key.starts_with(&format!("{prefix}/testnode/{id}/")), "under the capture's key space: {key}");
        let (pcap, _) = read(&veth.capture_ns, &garage, url, &[]);
        assert_eq!(zstd_d(&raw_object(&veth.capture_ns, &garage, key)), pcap, "zstd -d reads {key} too");
        got.extend(records(&pcap).into_iter().map(|(_, data)| data));
    }
    assert!(!got.is_empty(), "frames recovered");
    assert!(got.len() <= frames.len());
    assert!(got == frames[..got.len()], "the objects hold a prefix of the frames sent, none twice");
    let recovery = serde_json::to_value(&info).unwrap()["summary"]["recovery"].clone();
    assert_eq!(recovery["packets_kept"], got.len() as u64, "{recovery}");
}
