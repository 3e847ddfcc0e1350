//! Captures stored as compressed objects in a real Garage, read back with `tapstream read`,
//! `zstd -d`, capinfos and tshark.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use tapstream::{
    store::compress::Compression,
    store::{
        ObjectMeta, Sink, UploadError,
        fault::{FaultSink, Operation},
        object::{CompressedChunk, ObjectOwner, UploadConfig, Uploader},
        s3::{S3Config, S3Sink},
        spool::Spool,
    },
};
use tapstream_testenv::{CORPUS_RING_SIZE, Garage, Netns, Sender, VethPair, corpus_frames, unique_name};

use crate::{
    common::{Running, tapstream_bin, walk},
    recovery::zstd_d,
};

pub(crate) fn s3_args(garage: &Garage) -> Vec<String> {
    ["--s3-endpoint", &garage.endpoint, "--s3-region", &garage.region, "--s3-path-style"]
        .map(String::from)
        .to_vec()
}

/// Starts a one-shot `tapstream capture -i <capture interface> --upload <url>` in the capture
/// namespace of `veth`, with the flags and credentials of `garage`'s store, then `flags` (a
/// filter last). It is not waited for: see [`Running::wait_ready`].
pub(crate) fn start_upload(veth: &VethPair, garage: &Garage, url: &str, flags: &[&str]) -> Running {
    start_upload_with_env(veth, garage, url, flags, &garage.aws_env())
}

/// Like [`start_upload`], with `env` (credentials) in the environment instead of `garage`'s.
pub(crate) fn start_upload_with_env(
    veth: &VethPair,
    garage: &Garage,
    url: &str,
    flags: &[&str],
    env: &[(&str, String)],
) -> Running {
    let store_args = s3_args(garage);
    let args: Vec<&str> = ["capture", "-i", &veth.capture_if, "--upload", url]
        .into_iter()
        .chain(store_args.iter().map(String::as_str))
        .chain(flags.iter().copied())
        .collect();
    Running::start_with_env(&veth.capture_ns, &args, env)
}

/// `tapstream read` of an object; returns (stdout, stderr).
pub(crate) fn read(ns: &Netns, garage: &Garage, url: &str, window: &[&str]) -> (Vec<u8>, String) {
    let out = ns
        .command(tapstream_bin())
        .arg("read")
        .arg(url)
        .args(window)
        .args(s3_args(garage))
        .envs(garage.aws_env())
        .env("RUST_LOG", "info")
        .output()
        .expect("run tapstream read");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "tapstream read {url} failed: {stderr}");
    (out.stdout, stderr)
}

/// The raw bytes of an object, fetched from inside `ns`.
pub(crate) fn raw_object(ns: &Netns, garage: &Garage, key: &str) -> Vec<u8> {
    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async { sink(garage).await.get(key, None).await.expect("GET the object") })
    })
}

pub(crate) async fn sink(garage: &Garage) -> S3Sink {
    S3Sink::new(s3_config(garage)).await
}

/// The configuration of a sink for `garage`'s bucket.
fn s3_config(garage: &Garage) -> S3Config {
    S3Config {
        static_credentials: Some((garage.access_key.clone(), garage.secret_key.clone())),
        bucket: garage.bucket.clone(),
        endpoint: Some(garage.endpoint.clone()),
        region: Some(garage.region.clone()),
        path_style: true,
        max_attempts: 3,
        ..S3Config::default()
    }
}

pub(crate) fn records(pcap: &[u8]) -> Vec<(u64, Vec<u8>)> {
    tapstream_pcap::Reader::new(pcap)
        .expect("a PCAP header")
        .map(|r| r.map(|r| (r.ts_nanos, r.data.to_vec())))
        .collect::<Result<_, _>>()
        .expect("records")
}

#[test]
fn corpus_capture_lands_as_objects_that_read_back_byte_for_byte() {
    let veth = VethPair::new(1);
    let garage = Garage::start_in(&veth.capture_ns);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    let prefix = unique_name("it");
    let url = format!("s3://{}/{prefix}", garage.bucket);
    let ring = CORPUS_RING_SIZE.to_string();
    let spool = tempfile::tempdir().unwrap();
    let mut run = start_upload(
        &veth,
        &garage,
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
            "--part-size",
            "5MiB",
            "--spool-dir",
            spool.path().to_str().unwrap(),
            "--alert-id",
            "A-17",
            "--customer",
            "acme",
            "--tag",
            "site=ams1",
        ],
    );
    run.wait_ready();
    let sent = sender.send_all(&frames);
    let summary = run.summary();

    assert_eq!(summary.packets, sent.len() as u64);
    assert_eq!(summary.outputs.len(), 1, "one object: {:?}", summary.outputs);
    let object_url = &summary.outputs[0];
    let key = object_url.strip_prefix(&format!("s3://{}/", garage.bucket)).expect("an s3 URL in the bucket");
    assert!(key.starts_with(&format!("{prefix}/it-node/corpus/")) && key.ends_with(".pcap.zst"), "{key}");

    // The object carries who it belongs to.
    let head = veth.capture_ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let client = client(&garage).await;
            client.head_object().bucket(&garage.bucket).key(key).send().await.expect("HEAD the object")
        })
    });
    let meta = head.metadata().cloned().unwrap_or_default();
    for (k, v) in [
        ("capture-id", "corpus"),
        ("node", "it-node"),
        ("alert-id", "A-17"),
        ("customer", "acme"),
        ("tag-site", "ams1"),
    ] {
        assert_eq!(meta.get(k).map(String::as_str), Some(v), "metadata {k}: {meta:?}");
    }

    // The whole object through `tapstream read`: every frame sent, in order, byte for byte.
    let (pcap, _) = read(&veth.capture_ns, &garage, object_url, &[]);
    let stored = records(&pcap);
    assert_eq!(stored.len(), sent.len());
    for (i, ((_, data), frame)) in stored.iter().zip(&sent).enumerate() {
        assert_eq!(data, &frame.data, "frame {i} differs");
    }

    // The raw object through the zstd tool: the same PCAP (the seek table is skipped).
    let raw = raw_object(&veth.capture_ns, &garage, key);
    assert_eq!(zstd_d(&raw), pcap, "zstd -d gives the same PCAP as tapstream read");
    // Each chunk is a zstd frame (after the one of the PCAP header), compressed at a level of
    // `auto`'s range, the default; the summary counts them by level.
    let frames_in_object = u32::from_le_bytes(raw[raw.len() - 9..raw.len() - 5].try_into().unwrap());
    assert_eq!(
        summary.zstd_levels.values().sum::<u64>(),
        u64::from(frames_in_object - 1),
        "{:?}",
        summary.zstd_levels
    );
    assert!(summary.zstd_levels.keys().all(|l| (-5..=6).contains(l)), "{:?}", summary.zstd_levels);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &pcap).unwrap();
    crate::common::read_capture(file.path());

    // A time window: exactly the frames in it, from fewer bytes than the object.
    let times: Vec<u64> = stored.iter().map(|(t, _)| *t).collect();
    let (since, until) = (times[times.len() / 2], times[times.len() * 3 / 4]);
    let secs = |ns: u64| format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000);
    let (window, log) =
        read(&veth.capture_ns, &garage, object_url, &["--since", &secs(since), "--until", &secs(until)]);
    let expected: Vec<_> = stored.iter().filter(|(t, _)| (since..=until).contains(t)).collect();
    let got = records(&window);
    assert_eq!(got.len(), expected.len(), "frames in the window");
    assert!(got.iter().zip(&expected).all(|(a, b)| a == *b));
    // The window as pcapng: the same frames, on one interface named by the object's key.
    let (ng, _) = read(
        &veth.capture_ns,
        &garage,
        object_url,
        &["--format", "pcapng", "--since", &secs(since), "--until", &secs(until)],
    );
    let ng_file = tempfile::Builder::new().suffix(".pcapng").tempfile().unwrap();
    std::fs::write(ng_file.path(), &ng).unwrap();
    assert!(crate::catalog::pcapng_records(ng_file.path()) == crate::catalog::records(&window));
    let (_, interfaces) = crate::catalog::capinfos(ng_file.path());
    assert_eq!(interfaces.len(), 1);
    assert_eq!(interfaces[0]["Name"], key);
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
fn a_missing_bucket_is_named_and_nothing_starts() {
    let veth = VethPair::new(1);
    let garage = Garage::start_in(&veth.capture_ns);
    let url = "s3://no-such-bucket-here/x";
    let run = start_upload(&veth, &garage, url, &["--duration", "60s", "--idle", "3s"]);
    let (status, _, stderr) = run.finish();
    assert!(!status.success(), "the capture must fail: {stderr}");
    assert!(stderr.contains("no-such-bucket-here") && stderr.contains("NoSuchBucket"), "{stderr}");
    assert!(!stderr.contains("capturing on"), "nothing started: {stderr}");
    assert!(!stderr.contains(&garage.secret_key), "the secret never appears in the log");
}

#[test]
fn parts_in_flight_never_exceed_the_limit_and_the_object_is_exact() {
    let garage = Garage::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        // Counts the parts in flight around the real store.
        let sink = Arc::new(FaultSink::new(sink(&garage).await));
        let limit = 2;
        let config = UploadConfig {
            part_bytes: 5 << 20,
            parts_in_flight_per_object: limit,
            compression: Compression::None,
            ..UploadConfig::default()
        };
        let owner = ObjectOwner {
            prefix: unique_name("parts"),
            node: "n".into(),
            capture: "c".into(),
            ..Default::default()
        };
        let global = Arc::new(tokio::sync::Semaphore::new(limit));
        let header = [7u8; 24];
        let mut up = Uploader::new(sink.clone(), config, owner, &header, global).unwrap();
        let mut expected = header.to_vec();
        let mut seed = 0x1234_5678_u32;
        for i in 0..48 {
            // Incompressible, distinct 1 MiB chunks: 48 MiB, ten parts.
            let data: Vec<u8> = (0..1 << 20)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            expected.extend_from_slice(&data);
            let chunk = CompressedChunk {
                decompressed_len: data.len() as u64,
                data,
                first_ns: i,
                last_ns: i,
                packets: 1,
            };
            up.push(chunk).await.unwrap();
        }
        let urls = up.finish().await.unwrap();
        assert_eq!(urls.len(), 1);
        let max = sink.counts(Operation::UploadPart).max_in_flight as usize;
        assert!(max <= limit, "{max} parts were in flight with a limit of {limit}");
        assert_eq!(max, limit, "parts did upload concurrently");
        let key = urls[0].strip_prefix(&format!("s3://{}/", garage.bucket)).unwrap();
        let stored = sink.get(key, None).await.unwrap();
        let tail =
            sink.get(key, Some((expected.len() as u64 - 10, expected.len() as u64 - 1))).await.unwrap();
        assert_eq!(tail, expected[expected.len() - 10..], "the last bytes, by a ranged GET");
        assert!(
            stored == expected,
            "the object is the bytes pushed, in order ({} vs {} bytes)",
            stored.len(),
            expected.len()
        );
        let pending = sink.list_multipart("").await.unwrap();
        assert!(pending.is_empty(), "no multipart upload left behind: {pending:?}");
    });
}

#[test]
fn a_store_outage_spools_and_loses_nothing() {
    let veth = VethPair::new(1);
    let mut garage = Garage::start_in(&veth.capture_ns);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    let spool = tempfile::tempdir().unwrap();
    let url = format!("s3://{}/{}", garage.bucket, unique_name("outage"));
    let ring = CORPUS_RING_SIZE.to_string();
    let mut run = start_upload(
        &veth,
        &garage,
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
    garage.stop();
    // While the store is down: chunks flush every second, objects end every second.
    for part in &parts[1..5] {
        sent.extend(sender.send_all(*part));
        std::thread::sleep(std::time::Duration::from_millis(1200));
    }
    let spooled = std::fs::read_dir(spool.path())
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .filter(|f| f.as_ref().unwrap().path().extension().is_some_and(|x| x == "chunk"))
        .count();
    assert!(spooled > 0, "chunks wait in the spool during the outage");
    garage.resume();
    sent.extend(sender.send_all(parts[5]));
    let summary = run.summary();

    assert_eq!(summary.packets, sent.len() as u64);
    assert_eq!(summary.dropped_writer, 0);
    let mut urls = summary.outputs.clone();
    urls.sort();
    assert!(urls.len() >= 2, "objects rotate by age: {urls:?}");
    let mut stored = Vec::new();
    for url in &urls {
        let (pcap, _) = read(&veth.capture_ns, &garage, url, &[]);
        stored.extend(records(&pcap));
    }
    assert_eq!(stored.len(), sent.len(), "frames stored across the outage");
    for (i, ((_, data), frame)) in stored.iter().zip(&sent).enumerate() {
        assert_eq!(data, &frame.data, "frame {i} differs");
    }
    let left: Vec<_> = std::fs::read_dir(spool.path()).unwrap().collect();
    assert!(left.is_empty(), "the spool is empty at the end: {left:?}");
}

/// Ethernet frames with incompressible payloads (so chunks fill parts quickly), each unique.
pub(crate) fn random_frames(count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut x = seed | 1;
    (0..count)
        .map(|i| {
            let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x88, 0xb5];
            f.extend_from_slice(&(i as u64).to_be_bytes());
            f.extend((0..1378).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }));
            f
        })
        .collect()
}

/// Starts (see [`start_upload`]) a capture into `url` as capture `id` of node `n`, in 5 MiB
/// parts of zstd level 1 (incompressible frames fill parts quickly), spooling in `spool`, with
/// `extra` flags.
fn start_multipart(
    veth: &VethPair,
    garage: &Garage,
    url: &str,
    id: &str,
    spool: &Path,
    extra: &[&str],
) -> Running {
    let base = [
        "--id",
        id,
        "--node",
        "n",
        "--compression",
        "1",
        "--part-size",
        "5MiB",
        "--spool-dir",
        spool.to_str().unwrap(),
    ];
    start_upload(veth, garage, url, &[&base, extra].concat())
}

/// Chunk files waiting in the spools under `root`.
pub(crate) fn spooled_chunks(root: &Path) -> usize {
    walk(root).into_iter().filter(|p| p.extension().is_some_and(|x| x == "chunk")).count()
}

/// The URL of the object that a spool an earlier run left became, as `log` reports it.
pub(crate) fn recovered_object(log: &str) -> Option<String> {
    log.lines().find_map(|l| l.split(" by an earlier run as ").nth(1)).map(|url| url.trim().to_owned())
}

/// Leaves a spool at `path` for the store at `url`, as a run that ended before uploading it
/// does: a PCAP header and one chunk of one record. Returns the bytes of the object it becomes.
pub(crate) fn leave_spool(path: PathBuf, url: &str) -> Vec<u8> {
    let header: Vec<u8> = [
        0xa1b2_c3d4u32.to_le_bytes().as_slice(),
        &[2, 0, 4, 0],
        &[0; 8],
        &65535u32.to_le_bytes(),
        &1u32.to_le_bytes(),
    ]
    .concat();
    let record: Vec<u8> =
        [&1u32.to_le_bytes()[..], &0u32.to_le_bytes(), &4u32.to_le_bytes(), &4u32.to_le_bytes(), b"left"]
            .concat();
    let spool = Spool::create(path, 1 << 20, &header, url).unwrap();
    let chunk = CompressedChunk {
        data: record.clone(),
        decompressed_len: record.len() as u64,
        first_ns: 1_000_000_000,
        last_ns: 1_000_000_000,
        packets: 1,
    };
    assert!(spool.put(0, &chunk).unwrap());
    [header, record].concat()
}

#[test]
fn a_killed_capture_leaves_no_orphan_upload_and_its_spool_is_uploaded_on_restart() {
    let veth = VethPair::new(1);
    let mut garage = Garage::start_in(&veth.capture_ns);
    let sender = Sender::new(&veth);
    let spool = tempfile::tempdir().unwrap();
    let prefix = unique_name("killed");
    let url = format!("s3://{}/{prefix}", garage.bucket);
    let start = |garage: &Garage, duration: &str| {
        let extra = ["--parts-in-flight", "1", "--upload-queue", "1", "--duration", duration];
        start_multipart(&veth, garage, &url, "killme", spool.path(), &extra)
    };
    let mut run = start(&garage, "120s");
    run.wait_ready();
    let frames = random_frames(16_000, 7);
    let (before, during) = frames.split_at(5_000);
    for f in before {
        sender.send(f).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    garage.stop();
    for burst in during.chunks(2_000) {
        for f in burst {
            sender.send(f).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    assert!(spooled_chunks(spool.path()) > 0, "chunks spooled while the store was down");
    drop(run); // SIGKILL, as a crash would

    garage.resume();
    let run = start(&garage, "2s");
    let (status, _, log) = run.finish();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("aborting an unfinished upload") || log.contains("completing the unfinished upload"),
        "the killed run's multipart upload is completed or aborted: {log}"
    );
    let recovered = recovered_object(&log).unwrap_or_else(|| panic!("no recovered object in: {log}"));
    let (pcap, _) = read(&veth.capture_ns, &garage, &recovered, &[]);
    let got = records(&pcap);
    assert!(!got.is_empty());
    // The recovered frames are frames that were sent, in the order they were sent.
    let index: std::collections::HashMap<&[u8], usize> =
        frames.iter().enumerate().map(|(i, f)| (f.as_slice(), i)).collect();
    let positions: Vec<usize> =
        got.iter().map(|(_, d)| *index.get(d.as_slice()).expect("a frame that was sent")).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "in order");

    let pending = veth.capture_ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async { sink(&garage).await.list_multipart(&prefix).await.unwrap() })
    });
    assert!(pending.is_empty(), "no multipart upload left under the prefix: {pending:?}");
    assert_eq!(spooled_chunks(spool.path()), 0, "the spool is empty");
}

#[test]
fn wrong_credentials_are_named_and_nothing_starts() {
    let veth = VethPair::new(1);
    let garage = Garage::start_in(&veth.capture_ns);
    let spool = tempfile::tempdir().unwrap();
    let url = format!("s3://{}/creds", garage.bucket);
    let flags = ["--duration", "60s", "--spool-dir", spool.path().to_str().unwrap()];
    let wrong_secret = "0".repeat(64);
    let mut env = garage.aws_env();
    for (k, v) in &mut env {
        if *k == "AWS_SECRET_ACCESS_KEY" {
            *v = wrong_secret.clone();
        }
    }
    let (status, _, stderr) = start_upload_with_env(&veth, &garage, &url, &flags, &env).finish();
    assert!(!status.success(), "{stderr}");
    assert!(
        ["SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "Forbidden"]
            .iter()
            .any(|e| stderr.contains(e)),
        "the store's refusal is named: {stderr}"
    );
    assert!(!stderr.contains("capturing on"), "nothing started: {stderr}");
    assert!(!stderr.contains(&wrong_secret) && !stderr.contains(&garage.secret_key), "no secret in the log");
}

/// An S3 client of the test's own, for what tapstream's sink does not do (listing objects).
pub(crate) async fn client(garage: &Garage) -> aws_sdk_s3::Client {
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(garage.region.clone()))
        .endpoint_url(&garage.endpoint)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            &garage.access_key,
            &garage.secret_key,
            None,
            None,
            "test",
        ))
        .load()
        .await;
    aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&shared).force_path_style(true).build())
}

/// Keys under `prefix`, sorted, listed from inside `ns`.
fn list_keys(ns: &Netns, garage: &Garage, prefix: &str) -> Vec<String> {
    ns.enter(|| list_keys_here(garage, prefix))
}

/// Keys under `prefix`, sorted, listed from the test's own namespace.
pub(crate) fn list_keys_here(garage: &Garage, prefix: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let out = client(garage)
            .await
            .list_objects_v2()
            .bucket(&garage.bucket)
            .prefix(prefix)
            .send()
            .await
            .expect("list the bucket");
        let mut keys: Vec<String> =
            out.contents().iter().filter_map(|o| o.key().map(str::to_owned)).collect();
        keys.sort();
        keys
    })
}

/// Parts the store holds of the open multipart uploads under `prefix`.
fn stored_parts(ns: &Netns, garage: &Garage, prefix: &str) -> usize {
    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let client = client(garage).await;
            let uploads = client.list_multipart_uploads().bucket(&garage.bucket).prefix(prefix).send().await;
            let mut parts = 0;
            for u in uploads.expect("list the uploads").uploads() {
                let (Some(key), Some(id)) = (u.key(), u.upload_id()) else { continue };
                let listed = client.list_parts().bucket(&garage.bucket).key(key).upload_id(id).send().await;
                parts += listed.expect("list the parts").parts().len();
            }
            parts
        })
    })
}

#[test]
fn credentials_revoked_mid_capture_spool_what_is_unconfirmed_and_the_next_start_completes_it() {
    let veth = VethPair::new(1);
    let garage = Garage::start_in(&veth.capture_ns);
    let sender = Sender::new(&veth);
    let spool = tempfile::tempdir().unwrap();
    let prefix = unique_name("rvk");
    let url = format!("s3://{}/{prefix}", garage.bucket);
    // The frames come in bursts of up to 8,000 (the test's debug build writes slower than the
    // sender sends): a ring whose UMEM holds a whole burst loses none of them.
    let ring = CORPUS_RING_SIZE.to_string();
    let start = |id: &str, duration: &str| {
        let extra =
            ["--parts-in-flight", "2", "--rotate-age", "20s", "--ring-size", &ring, "--duration", duration];
        start_multipart(&veth, &garage, &url, id, spool.path(), &extra)
    };
    let mut run = start("revoked", "120s");
    run.wait_ready();
    // About 11 MB of incompressible frames: two 5 MiB parts go up, the rest waits for more.
    let frames = random_frames(10_000, 11);
    let (before, after) = frames.split_at(8_000);
    for f in before {
        sender.send(f).unwrap();
    }
    // Revoke once the store holds a part of the open object (not after a fixed time: on a
    // loaded machine the first part can take seconds), well before its age ends it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while stored_parts(&veth.capture_ns, &garage, &prefix) == 0 {
        assert!(std::time::Instant::now() < deadline, "no part stored within 15 s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    garage.revoke_key();
    // Less than a part: captured, then the object's age ends it and the store refuses.
    for f in after {
        sender.send(f).unwrap();
    }
    let (status, _, log) = run.finish();
    assert!(!status.success(), "the capture fails: {log}");
    assert!(log.contains("AccessDenied"), "the store's refusal is named: {log}");
    assert!(log.contains("kept in the spool"), "the error says where the data is: {log}");
    assert!(!log.contains(&garage.secret_key), "no secret in the log");
    let files = walk(spool.path());
    let salvage = files
        .iter()
        .find(|p| p.file_name().is_some_and(|n| n == "salvage.json"))
        .unwrap_or_else(|| panic!("a salvage record in the spool: {files:?}"));
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(salvage).unwrap()).unwrap();
    let confirmed = record["resume"]["parts"].as_array().map_or(0, Vec::len);
    assert!(confirmed >= 1, "the open upload's confirmed parts are kept, not aborted: {record}");
    assert!(files.iter().any(|p| p.extension().is_some_and(|x| x == "chunk")), "unconfirmed chunks spooled");

    // The key works again: the next capture finishes the revoked one's objects first.
    garage.grant_key();
    let (status, _, log) = start("after", "1s").finish();
    assert!(status.success(), "{log}");
    assert!(log.contains("spooled by an earlier run"), "{log}");

    let keys: Vec<String> = list_keys(&veth.capture_ns, &garage, &format!("{prefix}/n/revoked/"))
        .into_iter()
        .filter(|k| k.ends_with(".pcap.zst"))
        .collect();
    assert!(!keys.is_empty());
    let mut stored = Vec::new();
    for key in &keys {
        let (pcap, _) = read(&veth.capture_ns, &garage, &format!("s3://{}/{key}", garage.bucket), &[]);
        stored.extend(records(&pcap));
    }
    assert_eq!(stored.len(), frames.len(), "every frame captured is stored, once: {keys:?}");
    for (i, ((_, data), frame)) in stored.iter().zip(&frames).enumerate() {
        assert_eq!(data, frame, "frame {i} differs");
    }
    let pending = veth.capture_ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async { sink(&garage).await.list_multipart(&prefix).await.unwrap() })
    });
    assert!(pending.is_empty(), "no multipart upload left under the prefix: {pending:?}");
    assert!(
        walk(spool.path()).iter().all(|p| p.extension().is_none_or(|x| x != "chunk")),
        "the spool is empty"
    );
}

/// TCP connections to `port` in this network namespace that are open or opening
/// (ESTABLISHED or SYN_SENT), by their (local, remote) addresses as /proc/net/tcp writes
/// them. A set: the kernel reads the table out in pieces, and a socket opened meanwhile can
/// make it list another twice.
fn connections_to(port: u16) -> std::collections::BTreeSet<(String, String)> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let remote_port = cols[2].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            (remote_port == Some(port) && (cols[3] == "01" || cols[3] == "02"))
                .then(|| (cols[1].to_owned(), cols[2].to_owned()))
        })
        .collect()
}

#[test]
fn the_connection_pool_never_opens_more_connections_than_its_limit() {
    let garage = Garage::start();
    let port: u16 = garage.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let sink = Arc::new(rt.block_on(S3Sink::new(S3Config { max_connections: 3, ..s3_config(&garage) })));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The most connections seen open at once, and which.
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut most = std::collections::BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let open = connections_to(port);
                if open.len() > most.len() {
                    most = open;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            most
        })
    };
    let prefix = unique_name("pool");
    let body = bytes::Bytes::from(vec![7u8; 2 << 20]);
    rt.block_on(async {
        let mut puts = tokio::task::JoinSet::new();
        for i in 0..50 {
            let (sink, body, key) = (sink.clone(), body.clone(), format!("{prefix}/{i}"));
            puts.spawn(async move { sink.put_object(&key, body, &ObjectMeta::default()).await });
        }
        while let Some(done) = puts.join_next().await {
            done.unwrap().expect("every request succeeds, some after waiting");
        }
    });
    stop.store(true, Ordering::Relaxed);
    let most = sampler.join().unwrap();
    assert!(!most.is_empty(), "the sampler saw the connections");
    assert!(most.len() <= 3, "{} connections open at once, limit 3: {most:?}", most.len());
    assert_eq!(list_keys_here(&garage, &prefix).len(), 50, "all fifty objects stored");
}

#[test]
fn a_request_the_client_cannot_send_is_refused_for_good_not_retried() {
    let garage = Garage::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let err = rt.block_on(async {
        let meta =
            ObjectMeta { metadata: vec![("tag-\u{fc}\u{2603}".into(), "v".into())], ..ObjectMeta::default() };
        sink(&garage).await.put_object(&unique_name("rfs"), bytes::Bytes::from_static(b"x"), &meta).await
    });
    let err = err.expect_err("no such header can be sent");
    assert!(
        matches!(err, UploadError::Refused { .. }) && err.is_permanent() && !err.is_retryable(),
        "{err:?}"
    );
    assert!(err.to_string().contains("not retried"), "{err}");
}

/// The value of header `name` in a request line of Garage's log ([`Garage::requests`]).
fn logged_header(request: &str, name: &str) -> Option<String> {
    let (_, rest) = request.split_once(&format!("\"{name}\": \""))?;
    rest.split_once('"').map(|(value, _)| value.to_owned())
}

#[test]
fn every_object_written_carries_the_customer_and_retention_tags_unless_tagging_is_off() {
    let veth = VethPair::new(1);
    let garage = Garage::start_in_logging_calls(&veth.capture_ns);
    let sender = Sender::new(&veth);
    let spool = tempfile::tempdir().unwrap();
    let prefix = unique_name("tags");
    let url = format!("s3://{}/{prefix}", garage.bucket);
    // Incompressible frames past a 5 MiB part: a multipart object, its index, the manifest.
    let frames = random_frames(5_000, 11);
    let count = frames.len().to_string();
    let labels =
        ["--customer", "acme & co/1", "--retention", "short", "-c", &count, "--duration", "120s", "--json"];
    for (id, off, expected) in [
        ("tagged", None, Some("customer=acme%20%26%20co%2F1&retention=short")),
        ("untagged", Some("--no-tagging"), None),
    ] {
        let from = garage.log().len();
        let mut run = start_multipart(
            &veth,
            &garage,
            &url,
            id,
            spool.path(),
            &[&labels[..], &Vec::from_iter(off)].concat(),
        );
        run.wait_ready();
        for f in &frames {
            sender.send_retrying(f, || "a random frame".into());
        }
        let summary = run.summary();
        assert_eq!(summary.packets, frames.len() as u64);
        // Every write of an object of the capture: PutObject, or CreateMultipartUpload.
        let writes: Vec<String> = garage
            .requests(from)
            .into_iter()
            .filter(|r| r.contains(&format!("/{prefix}/")))
            .filter(|r| {
                (r.starts_with("Request { method: PUT") && !r.contains("partNumber="))
                    || (r.starts_with("Request { method: POST") && r.contains("?uploads"))
            })
            .collect();
        let creates = writes.iter().filter(|r| r.contains("?uploads")).count();
        let puts = writes.len() - creates;
        assert!(creates >= 1 && puts >= 2, "a multipart object, its index and the manifest: {writes:#?}");
        for w in &writes {
            assert_eq!(logged_header(w, "x-amz-tagging").as_deref(), expected, "{id}: {w}");
        }
    }
}
