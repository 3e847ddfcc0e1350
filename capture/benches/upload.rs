//! Upload throughput to a local Garage, three ways with the same bytes, in one run:
//! tapstream's uploader (8 MiB parts, 8 in flight), a bare aws-sdk-s3 multipart upload with the
//! same part size and concurrency, and `aws s3 cp` (awscli, installed into .tools/awscli on
//! first use) with the same part size and concurrency.
//!
//! Run: `cargo bench -p tapstream --bench upload` (needs `./dev setup` for Garage).

use std::{
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use aws_sdk_s3::{
    primitives::ByteStream,
    types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart},
};
use tapstream::{
    store::compress::Compression,
    store::{
        object::{CompressedChunk, ObjectOwner, UploadConfig, Uploader},
        s3::{S3Config, S3Sink},
    },
};
use tapstream_testenv::{Garage, tools_dir};

const MIB: usize = 1 << 20;
const TOTAL: usize = 512 * MIB;
const PART: usize = 8 * MIB;
const IN_FLIGHT: usize = 8;

fn main() {
    let garage = Garage::start();
    let data = Arc::new(random(TOTAL));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let config = S3Config {
        bucket: garage.bucket.clone(),
        endpoint: Some(garage.endpoint.clone()),
        region: Some(garage.region.clone()),
        path_style: true,
        max_attempts: 3,
        static_credentials: Some((garage.access_key.clone(), garage.secret_key.clone())),
        // The default connection limit, as a user gets it.
        max_connections: 16,
        ..S3Config::default()
    };
    let mut rows = Vec::new();
    for round in 0..2 {
        let t = rt.block_on(tapstream_upload(&config, data.clone(), round));
        rows.push(("tapstream uploader", t));
        let t = rt.block_on(bare_sdk(&config, data.clone(), round));
        rows.push(("bare aws-sdk-s3 multipart", t));
        let t = aws_cli(&garage, &data, round);
        rows.push(("aws s3 cp", t));
    }
    println!(
        "\n| uploader ({} MiB, {} MiB parts, {IN_FLIGHT} in flight) | run | seconds | MiB/s |",
        TOTAL / MIB,
        PART / MIB
    );
    println!("|---|---:|---:|---:|");
    for (i, (name, t)) in rows.iter().enumerate() {
        println!(
            "| {name} | {} | {:.2} | {:.0} |",
            i / 3 + 1,
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

async fn tapstream_upload(config: &S3Config, data: Arc<Vec<u8>>, round: usize) -> Duration {
    let sink = Arc::new(S3Sink::new(config.clone()).await);
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

async fn bare_sdk(config: &S3Config, data: Arc<Vec<u8>>, round: usize) -> Duration {
    let (id, secret) = config.static_credentials.clone().unwrap();
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(config.region.clone().unwrap()))
        .endpoint_url(config.endpoint.clone().unwrap())
        .credentials_provider(aws_sdk_s3::config::Credentials::new(id, secret, None, None, "bench"))
        .load()
        .await;
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&shared).force_path_style(true).build(),
    );
    let key = format!("bench/bare{round}");
    let started = Instant::now();
    let upload = client
        .create_multipart_upload()
        .bucket(&config.bucket)
        .key(&key)
        .checksum_algorithm(ChecksumAlgorithm::Crc32C)
        .send()
        .await
        .unwrap();
    let upload_id = upload.upload_id.unwrap();
    let limit = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, part) in data.chunks(PART).enumerate() {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let (client, bucket, key, upload_id, body) =
            (client.clone(), config.bucket.clone(), key.clone(), upload_id.clone(), part.to_vec());
        tasks.spawn(async move {
            let _permit = permit;
            let out = client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(i as i32 + 1)
                .checksum_algorithm(ChecksumAlgorithm::Crc32C)
                .body(ByteStream::from(body))
                .send()
                .await
                .unwrap();
            CompletedPart::builder()
                .part_number(i as i32 + 1)
                .set_e_tag(out.e_tag)
                .set_checksum_crc32_c(out.checksum_crc32_c)
                .build()
        });
    }
    let mut parts: Vec<_> = tasks.join_all().await;
    parts.sort_by_key(|p| p.part_number);
    client
        .complete_multipart_upload()
        .bucket(&config.bucket)
        .key(&key)
        .upload_id(upload_id)
        .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
        .send()
        .await
        .unwrap();
    started.elapsed()
}

fn aws_cli(garage: &Garage, data: &[u8], round: usize) -> Duration {
    let aws = tools_dir().join("awscli/bin/aws");
    if !aws.exists() {
        let venv = tools_dir().join("awscli");
        let ok = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().unwrap().success()
            && Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "awscli"])
                .status()
                .unwrap()
                .success();
        assert!(ok, "cannot install awscli into {}", venv.display());
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.bin");
    std::fs::write(&file, data).unwrap();
    let config = dir.path().join("config");
    std::fs::write(
        &config,
        format!(
            "[default]\nregion = {}\ns3 =\n  addressing_style = path\n  multipart_chunksize = {}MB\n  max_concurrent_requests = {IN_FLIGHT}\n",
            garage.region,
            PART / MIB
        ),
    )
    .unwrap();
    let started = Instant::now();
    let status = Command::new(aws)
        .args(["s3", "cp", "--only-show-errors", "--endpoint-url", &garage.endpoint])
        .arg(&file)
        .arg(format!("s3://{}/bench/awscli{round}", garage.bucket))
        .env("AWS_CONFIG_FILE", &config)
        .env("AWS_ACCESS_KEY_ID", &garage.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &garage.secret_key)
        .status()
        .unwrap();
    assert!(status.success(), "aws s3 cp failed");
    started.elapsed()
}
