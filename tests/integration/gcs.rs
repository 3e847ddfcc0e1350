//! Captures stored in Google Cloud Storage (`gs://`), against a real emulator
//! (fake-gcs-server) the tests start: resumable uploads part by part, small objects in one
//! request, reads of a whole object and of a time window, an outage, and a start that names
//! a missing bucket or a bad key file.

use std::sync::Arc;

use tapstream::store::{
    Sink,
    gcs::{GcsConfig, GcsSink},
    object::{CompressedChunk, ObjectOwner, UploadConfig, Uploader},
};
use tapstream_testenv::{CORPUS_RING_SIZE, FakeGcs, Netns, Sender, VethPair, corpus_frames, unique_name};

use crate::{
    common::{Running, tapstream_bin},
    upload::records,
};

fn gcs_args(gcs: &FakeGcs) -> Vec<String> {
    vec!["--gcs-endpoint".into(), gcs.endpoint.clone()]
}

fn sink(gcs: &FakeGcs) -> GcsSink {
    GcsSink::new(GcsConfig {
        bucket: gcs.bucket.clone(),
        endpoint: Some(gcs.endpoint.clone()),
        key_file: None,
        max_connections: 4,
    })
    .expect("a client for the emulator")
}

fn start_upload(veth: &VethPair, gcs: &FakeGcs, url: &str, flags: &[&str]) -> Running {
    let store = gcs_args(gcs);
    let args: Vec<&str> = ["capture", "-i", &veth.capture_if, "--upload", url]
        .into_iter()
        .chain(store.iter().map(String::as_str))
        .chain(flags.iter().copied())
        .collect();
    Running::start(&veth.capture_ns, &args)
}

/// `tapstream read` of an object; returns (stdout, stderr).
fn read(ns: &Netns, gcs: &FakeGcs, url: &str, window: &[&str]) -> (Vec<u8>, String) {
    let out = ns
        .command(tapstream_bin())
        .arg("read")
        .arg(url)
        .args(window)
        .args(gcs_args(gcs))
        .env("RUST_LOG", "info")
        .output()
        .expect("run tapstream read");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "tapstream read {url} failed: {stderr}");
    (out.stdout, stderr)
}

/// Pseudo-random bytes (incompressible), from `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn a_large_object_goes_up_part_by_part_in_one_resumable_session_and_reads_back_exactly() {
    let gcs = FakeGcs::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let owner = ObjectOwner {
        prefix: unique_name("big"),
        node: "n".into(),
        capture: "c".into(),
        metadata: vec![("capture-id".into(), "c".into()), ("node".into(), "n".into())],
        ..Default::default()
    };
    // Chunks of uneven sizes, so parts end off the 256 KiB grid; three parts in flight.
    let config = UploadConfig {
        part_bytes: 5 << 20,
        parts_in_flight_per_object: 3,
        compression: tapstream::store::compress::Compression::None,
        ..Default::default()
    };
    let header = b"header-bytes".to_vec();
    let chunks: Vec<Vec<u8>> = (0..14).map(|i| noise(1_000_003 + i * 7919, i as u64 + 1)).collect();
    let sink = Arc::new(sink(&gcs));
    let urls = rt.block_on(async {
        let global = Arc::new(tokio::sync::Semaphore::new(8));
        let mut up = Uploader::new(sink.clone(), config, owner.clone(), &header, global).unwrap();
        for (i, data) in chunks.iter().enumerate() {
            let chunk = CompressedChunk {
                decompressed_len: data.len() as u64,
                data: data.clone(),
                first_ns: i as u64,
                last_ns: i as u64,
                packets: 1,
            };
            up.push(chunk).await.unwrap();
        }
        up.finish().await.unwrap()
    });
    assert_eq!(urls.len(), 1, "{urls:?}");
    let key = urls[0].strip_prefix(&format!("gs://{}/", gcs.bucket)).expect("a gs:// URL").to_owned();
    let stored = rt.block_on(sink.get(&key, None)).unwrap();
    let mut expected = header.clone();
    for c in &chunks {
        expected.extend_from_slice(c);
    }
    // Uncompressed: no seek table after the frames.
    assert_eq!(stored.len(), expected.len(), "the object's length");
    assert!(stored == expected, "the object holds every chunk once, in order");
    // A ranged read gives exactly the range.
    let range = rt.block_on(sink.get(&key, Some((5_000_000, 5_000_999)))).unwrap();
    assert!(range[..] == stored[5_000_000..5_001_000]);
    // The listing names the object and its index, with their sizes.
    let listed = rt.block_on(sink.list(&format!("{}/", owner.prefix), None)).unwrap();
    assert!(listed.contains(&(key.clone(), stored.len() as u64)), "{listed:?}");
    assert!(listed.iter().any(|(k, _)| *k == format!("{key}.idx.json")), "{listed:?}");
    // The object carries its metadata and the CRC32C of its bytes.
    let (status, resource) =
        gcs.http("GET", &format!("/storage/v1/b/{}/o/{}", gcs.bucket, key.replace('/', "%2F")), "");
    assert_eq!(status, 200, "{resource}");
    let resource: serde_json::Value = serde_json::from_str(&resource).unwrap();
    assert_eq!(resource["metadata"]["capture-id"], "c", "{resource}");
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, &stored) as u32;
    let b64 = aws_smithy_types::base64::encode(crc.to_be_bytes());
    assert_eq!(resource["crc32c"], b64.as_str(), "{resource}");
}

#[test]
fn a_cancelled_upload_leaves_no_session_and_a_lost_one_is_named() {
    let mut gcs = FakeGcs::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let sink = sink(&gcs);
    let key = format!("{}/cancelled.pcap.zst", unique_name("cancel"));
    rt.block_on(async {
        let meta =
            tapstream::store::ObjectMeta { content_type: "application/zstd".into(), ..Default::default() };
        let session = sink.create_multipart(&key, &meta).await.unwrap();
        sink.upload_part(&key, &session, 1, bytes::Bytes::from(noise(300_000, 3))).await.unwrap();
        sink.abort_multipart(&key, &session).await.unwrap();
        let e = sink
            .upload_part(&key, &session, 2, bytes::Bytes::from(noise(300_000, 4)))
            .await
            .expect_err("a cancelled session takes nothing");
        assert!(e.to_string().contains("earlier process") || e.to_string().contains("404"), "{e}");
    });
    // The emulator forgets open sessions when it restarts (GCS keeps them a week): the next
    // part is refused for good, and the error says the session is gone.
    let session = rt.block_on(async {
        let meta =
            tapstream::store::ObjectMeta { content_type: "application/zstd".into(), ..Default::default() };
        let session = sink.create_multipart(&key, &meta).await.unwrap();
        sink.upload_part(&key, &session, 1, bytes::Bytes::from(noise(300_000, 5))).await.unwrap();
        session
    });
    gcs.stop();
    gcs.resume();
    let e = rt
        .block_on(sink.upload_part(&key, &session, 2, bytes::Bytes::from(noise(300_000, 6))))
        .expect_err("a forgotten session takes nothing");
    assert!(e.to_string().contains("session is gone") && !e.is_retryable(), "{e}");
}

#[test]
fn corpus_capture_to_gs_reads_back_byte_for_byte_and_a_window_fetches_less() {
    let veth = VethPair::new(1);
    let gcs = FakeGcs::start_in(&veth.capture_ns);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    let prefix = unique_name("gs");
    let url = format!("gs://{}/{prefix}", gcs.bucket);
    let ring = CORPUS_RING_SIZE.to_string();
    let spool = tempfile::tempdir().unwrap();
    let mut run = start_upload(
        &veth,
        &gcs,
        &url,
        &[
            "--idle",
            "3s",
            "--duration",
            "120s",
            "--json",
            "--id",
            "corpus",
            "--ring-size",
            &ring,
            "--node",
            "it-node",
            "--spool-dir",
            spool.path().to_str().unwrap(),
            "--customer",
            "acme",
        ],
    );
    run.wait_ready();
    let sent = sender.send_all(&frames);
    let summary = run.summary();

    assert_eq!(summary.packets, sent.len() as u64);
    assert_eq!(summary.outputs.len(), 1, "one object: {:?}", summary.outputs);
    let object_url = &summary.outputs[0];
    let key = object_url.strip_prefix(&format!("gs://{}/", gcs.bucket)).expect("a gs:// URL in the bucket");
    assert!(key.starts_with(&format!("{prefix}/it-node/corpus/")) && key.ends_with(".pcap.zst"), "{key}");
    let (status, resource) =
        gcs.http("GET", &format!("/storage/v1/b/{}/o/{}", gcs.bucket, key.replace('/', "%2F")), "");
    assert_eq!(status, 200, "{resource}");
    let resource: serde_json::Value = serde_json::from_str(&resource).unwrap();
    for (k, v) in [("capture-id", "corpus"), ("node", "it-node"), ("customer", "acme")] {
        assert_eq!(resource["metadata"][k], v, "metadata {k}: {resource}");
    }

    let (pcap, _) = read(&veth.capture_ns, &gcs, object_url, &[]);
    let stored = records(&pcap);
    assert_eq!(stored.len(), sent.len());
    for (i, ((_, data), frame)) in stored.iter().zip(&sent).enumerate() {
        assert_eq!(data, &frame.data, "frame {i} differs");
    }

    // `ls` finds the capture in the catalog; `read` of the prefix gives the same frames.
    let out = veth
        .capture_ns
        .command(tapstream_bin())
        .args(["ls", &url, "--json"])
        .args(gcs_args(&gcs))
        .output()
        .expect("run tapstream ls");
    assert!(out.status.success(), "ls failed: {}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ls --json is JSON");
    let ids: Vec<&str> = listed.as_array().unwrap().iter().filter_map(|m| m["capture_id"].as_str()).collect();
    assert_eq!(ids, ["corpus"], "{listed}");
    let (merged, _) = read(&veth.capture_ns, &gcs, &url, &[]);
    assert!(records(&merged) == stored, "the prefix reads back the same frames");

    let times: Vec<u64> = stored.iter().map(|(t, _)| *t).collect();
    let (since, until) = (times[times.len() / 2], times[times.len() * 3 / 4]);
    let secs = |ns: u64| format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000);
    let (window, log) =
        read(&veth.capture_ns, &gcs, object_url, &["--since", &secs(since), "--until", &secs(until)]);
    let expected: Vec<_> = stored.iter().filter(|(t, _)| (since..=until).contains(t)).collect();
    let got = records(&window);
    assert_eq!(got.len(), expected.len(), "frames in the window");
    assert!(got.iter().zip(&expected).all(|(a, b)| a == *b));
    let fetched = log
        .lines()
        .find_map(|l| l.split("fetched ").nth(1))
        .and_then(|t| {
            let mut w = t.split_whitespace();
            Some((w.next()?.parse::<u64>().ok()?, w.nth(1)?.parse::<u64>().ok()?))
        })
        .unwrap_or_else(|| panic!("no fetch statistics in: {log}"));
    assert!(fetched.0 < fetched.1, "the window read fetched {} of {} bytes", fetched.0, fetched.1);
}

#[test]
fn the_emulator_stopped_mid_capture_and_restarted_loses_nothing() {
    let veth = VethPair::new(1);
    let mut gcs = FakeGcs::start_in(&veth.capture_ns);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    let spool = tempfile::tempdir().unwrap();
    let url = format!("gs://{}/{}", gcs.bucket, unique_name("outage"));
    let ring = CORPUS_RING_SIZE.to_string();
    let mut run = start_upload(
        &veth,
        &gcs,
        &url,
        &[
            "--idle",
            "6s",
            "--duration",
            "120s",
            "--json",
            "--rotate-age",
            "1s",
            "--upload-queue",
            "1",
            "--spool-dir",
            spool.path().to_str().unwrap(),
            "--ring-size",
            &ring,
        ],
    );
    run.wait_ready();

    let parts: Vec<_> = frames.chunks(frames.len() / 6 + 1).collect();
    let mut sent = sender.send_all(parts[0]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    gcs.stop();
    for part in &parts[1..5] {
        sent.extend(sender.send_all(*part));
        std::thread::sleep(std::time::Duration::from_millis(1200));
    }
    let spooled = crate::upload::spooled_chunks(spool.path());
    assert!(spooled > 0, "chunks wait in the spool during the outage");
    gcs.resume();
    sent.extend(sender.send_all(parts[5]));
    let summary = run.summary();

    assert_eq!(summary.packets, sent.len() as u64);
    assert_eq!(summary.dropped_writer, 0);
    let mut urls = summary.outputs.clone();
    urls.sort();
    assert!(urls.len() >= 2, "objects rotate by age: {urls:?}");
    let mut stored = Vec::new();
    for url in &urls {
        let (pcap, _) = read(&veth.capture_ns, &gcs, url, &[]);
        stored.extend(records(&pcap));
    }
    assert_eq!(stored.len(), sent.len(), "frames stored across the outage");
    for (i, ((_, data), frame)) in stored.iter().zip(&sent).enumerate() {
        assert_eq!(data, &frame.data, "frame {i} differs");
    }
    let left: Vec<_> = std::fs::read_dir(spool.path()).unwrap().collect();
    assert!(left.is_empty(), "the spool is empty at the end: {left:?}");
}

#[test]
fn a_missing_bucket_or_a_bad_key_file_is_named_and_nothing_starts() {
    let veth = VethPair::new(1);
    let gcs = FakeGcs::start_in(&veth.capture_ns);
    let spool = tempfile::tempdir().unwrap();
    let flags = ["--duration", "60s", "--idle", "3s", "--spool-dir", spool.path().to_str().unwrap()];
    let (status, _, stderr) = start_upload(&veth, &gcs, "gs://no-such-bucket-here/x", &flags).finish();
    assert!(!status.success(), "the capture must fail: {stderr}");
    assert!(stderr.contains("no-such-bucket-here") && stderr.contains("no bucket"), "{stderr}");
    assert!(!stderr.contains("capturing on"), "nothing started: {stderr}");

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("bad-key.json");
    let secret = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC-not-a-key";
    std::fs::write(
        &key,
        format!(
            r#"{{"type":"service_account","client_email":"w@p.iam.gserviceaccount.com","private_key":"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n"}}"#
        ),
    )
    .unwrap();
    let url = format!("gs://{}/x", gcs.bucket);
    let with_key = [&flags[..], &["--gcs-key-file", key.to_str().unwrap()]].concat();
    let (status, _, stderr) = start_upload(&veth, &gcs, &url, &with_key).finish();
    assert!(!status.success(), "the capture must fail: {stderr}");
    assert!(stderr.contains("bad-key.json"), "the key file is named: {stderr}");
    assert!(!stderr.contains("capturing on"), "nothing started: {stderr}");
    assert!(!stderr.contains(secret), "the key never appears in the log: {stderr}");
}

/// A token endpoint of the test's own on a loopback port: it answers every request with an
/// access token and hands each request's text (head and body) to the test.
fn token_endpoint() -> (String, std::sync::mpsc::Receiver<String>) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = Vec::new();
            let mut buf = [0u8; 8192];
            // The head, then as many body bytes as it announces.
            loop {
                let n = stream.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_owned())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= len {
                        break;
                    }
                }
            }
            let answer = r#"{"access_token":"test-token-1","expires_in":3600,"token_type":"Bearer"}"#;
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
            if tx.send(String::from_utf8_lossy(&request).into_owned()).is_err() {
                return;
            }
        }
    });
    (url, rx)
}

#[test]
fn a_service_account_key_is_exchanged_for_a_token_once_with_a_jwt_it_signed() {
    let gcs = FakeGcs::start();
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("key.pem");
    tapstream_testenv::run(
        std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
            .arg(&pem),
    );
    let (token_uri, requests) = token_endpoint();
    let key = serde_json::json!({
        "type": "service_account",
        "client_email": "writer@project.iam.gserviceaccount.com",
        "private_key": std::fs::read_to_string(&pem).unwrap(),
        "token_uri": token_uri,
    });
    let key_file = dir.path().join("key.json");
    std::fs::write(&key_file, key.to_string()).unwrap();
    let sink = GcsSink::new(GcsConfig {
        bucket: gcs.bucket.clone(),
        endpoint: Some(gcs.endpoint.clone()),
        key_file: Some(key_file),
        max_connections: 2,
    })
    .expect("a valid key loads");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let name = format!("{}/small", unique_name("sa"));
    rt.block_on(async {
        sink.check("").await.expect("the check passes with a token");
        let meta = tapstream::store::ObjectMeta { content_type: "text/plain".into(), ..Default::default() };
        sink.put_object(&name, bytes::Bytes::from_static(b"hello"), &meta).await.unwrap();
        assert_eq!(sink.get(&name, None).await.unwrap(), b"hello");
    });
    let request = requests.try_recv().expect("one token request");
    assert!(requests.try_recv().is_err(), "the token is reused");
    let body = request.split_once("\r\n\r\n").unwrap().1;
    assert!(
        body.starts_with("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion="),
        "{body}"
    );
    let jwt = body.split("assertion=").nth(1).unwrap();
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "{jwt}");
    let decode = |s: &str| {
        let mut s = s.replace('-', "+").replace('_', "/");
        while !s.len().is_multiple_of(4) {
            s.push('=');
        }
        aws_smithy_types::base64::decode(&s).unwrap()
    };
    let header: serde_json::Value = serde_json::from_slice(&decode(parts[0])).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&decode(parts[1])).unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(claims["iss"], "writer@project.iam.gserviceaccount.com");
    assert_eq!(claims["aud"], token_uri.as_str());
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 3600);
    // The signature verifies with the key's public half.
    let public = dir.path().join("public.pem");
    tapstream_testenv::run(
        std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&pem)
            .arg("-out")
            .arg(&public),
    );
    std::fs::write(dir.path().join("signed"), format!("{}.{}", parts[0], parts[1])).unwrap();
    std::fs::write(dir.path().join("signature"), decode(parts[2])).unwrap();
    tapstream_testenv::run(
        std::process::Command::new("openssl")
            .args(["dgst", "-sha256", "-verify"])
            .arg(&public)
            .arg("-signature")
            .arg(dir.path().join("signature"))
            .arg(dir.path().join("signed")),
    );
}
