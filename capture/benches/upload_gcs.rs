//! Upload throughput to a local Google Cloud Storage emulator (fake-gcs-server), three ways
//! with the same bytes, in one run: tapstream's uploader to `gs://` (one resumable session,
//! 8 MiB parts, 8 in flight, which the session takes in order), the same client's
//! single-request upload of the whole object, and `gcloud storage cp` (when installed),
//! pointed at the emulator through its endpoint override with credentials off and parallel
//! composite uploads off.
//!
//! Run: `cargo bench -p tapstream --bench upload_gcs` (needs `./dev setup` for the emulator).

use std::{
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use tapstream::store::{
    ObjectMeta, Sink,
    compress::Compression,
    gcs::{GcsConfig, GcsSink},
    object::{CompressedChunk, ObjectOwner, UploadConfig, Uploader},
};
use tapstream_testenv::FakeGcs;

const MIB: usize = 1 << 20;
const TOTAL: usize = 256 * MIB;
const PART: usize = 8 * MIB;
const IN_FLIGHT: usize = 8;

fn main() {
    let gcs = FakeGcs::start();
    let data = Arc::new(random(TOTAL));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &*data).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let config = GcsConfig {
        bucket: gcs.bucket.clone(),
        endpoint: Some(gcs.endpoint.clone()),
        key_file: None,
        // The default connection limit, as a user gets it.
        max_connections: 16,
    };
    let gcloud = Command::new("gcloud").arg("version").output().is_ok_and(|o| o.status.success());
    let mut rows = Vec::new();
    for round in 1..=2 {
        let t = rt.block_on(tapstream_upload(&config, data.clone(), round));
        rows.push(("tapstream uploader (resumable)", round, t));
        let t = rt.block_on(single_request(&config, data.clone(), round));
        rows.push(("one request (the same client)", round, t));
        if gcloud {
            rows.push(("gcloud storage cp", round, gcloud_cp(&gcs, file.path(), round)));
        }
    }
    if !gcloud {
        println!("gcloud is not installed: its row is left out");
    }
    println!(
        "\n| uploader ({} MiB, {} MiB parts, {IN_FLIGHT} in flight) | run | seconds | MiB/s |",
        TOTAL / MIB,
        PART / MIB
    );
    println!("|---|---:|---:|---:|");
    for (name, round, t) in &rows {
        println!(
            "| {name} | {round} | {:.2} | {:.0} |",
            t.as_secs_f64(),
            TOTAL as f64 / MIB as f64 / t.as_secs_f64()
        );
    }
}

fn random(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

async fn tapstream_upload(config: &GcsConfig, data: Arc<Vec<u8>>, round: usize) -> Duration {
    let sink = Arc::new(GcsSink::new(config.clone()).unwrap());
    let upload = UploadConfig {
        part_bytes: PART,
        parts_in_flight_per_object: IN_FLIGHT,
        compression: Compression::None,
        ..UploadConfig::default()
    };
    let owner = ObjectOwner {
        prefix: format!("bench/tapstream{round}"),
        node: "n".into(),
        capture: "c".into(),
        ..Default::default()
    };
    let started = Instant::now();
    let global = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut up = Uploader::new(sink, upload, owner, &[0u8; 24], global).unwrap();
    for (i, chunk) in data.chunks(MIB).enumerate() {
        let c = CompressedChunk {
            data: chunk.to_vec(),
            decompressed_len: chunk.len() as u64,
            first_ns: i as u64,
            last_ns: i as u64,
            packets: 1,
        };
        up.push(c).await.unwrap();
    }
    up.finish().await.unwrap();
    started.elapsed()
}

async fn single_request(config: &GcsConfig, data: Arc<Vec<u8>>, round: usize) -> Duration {
    let sink = GcsSink::new(config.clone()).unwrap();
    let meta = ObjectMeta { content_type: "application/octet-stream".into(), ..Default::default() };
    let body = bytes::Bytes::from(data.to_vec());
    let started = Instant::now();
    sink.put_object(&format!("bench/single{round}"), body, &meta).await.unwrap();
    started.elapsed()
}

fn gcloud_cp(gcs: &FakeGcs, file: &std::path::Path, round: usize) -> Duration {
    let home = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let status = Command::new("gcloud")
        .args(["storage", "cp", "--quiet"])
        .arg(file)
        .arg(format!("gs://{}/bench/gcloud{round}", gcs.bucket))
        .env("CLOUDSDK_CONFIG", home.path())
        .env("CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE", format!("{}/", gcs.endpoint))
        .env("CLOUDSDK_AUTH_DISABLE_CREDENTIALS", "true")
        .env("CLOUDSDK_CORE_PROJECT", "test")
        // Its parallel composite uploads fail against the emulator (an answer it cannot
        // parse); one stream, as tapstream's one session.
        .env("CLOUDSDK_STORAGE_PARALLEL_COMPOSITE_UPLOAD_ENABLED", "False")
        .output()
        .unwrap();
    assert!(status.status.success(), "gcloud storage cp failed: {}", String::from_utf8_lossy(&status.stderr));
    started.elapsed()
}
