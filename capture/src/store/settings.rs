//! Store settings shared by the one-shot CLI (its flags) and the daemon (`[store]` in its
//! configuration): validated once, then turned into a capture's [`StoreTarget`].

use std::{path::PathBuf, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use super::{
    Destination, UploadError,
    catalog::{Catalog, Manifest},
    dir::DirSink,
    gcs::{GcsConfig, GcsSink},
    object::{MIN_PART_BYTES, ObjectOwner, UploadConfig},
    read::{Format, MergeOptions, read_captures},
    s3::{S3Config, S3Sink},
    stream::{
        Recovered, StartStore, StoreOptions, StoreOutput, StoreTarget, recover_dead_capture, recover_spools,
    },
};
use crate::store::compress::{Adaptive, Compression};

/// How captures reach a store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// Where captures may be stored: `s3://bucket/prefix` and `gs://bucket/prefix` URLs and
    /// local directories. A
    /// request names one of them or a place under one; the first is the default.
    pub destinations: Vec<String>,
    /// Endpoint of an S3-compatible store (e.g. `http://127.0.0.1:3900`); default: AWS.
    pub s3_endpoint: Option<String>,
    /// Region; default: from the environment or profile.
    pub s3_region: Option<String>,
    /// Path-style addressing (endpoint/bucket/key), which most S3-compatible stores need.
    pub s3_path_style: bool,
    /// Endpoint of Google Cloud Storage's JSON API for `gs://` destinations (an emulator's,
    /// e.g. `http://127.0.0.1:4443`); default: Google's. With it and no key file, requests
    /// carry no credentials.
    pub gcs_endpoint: Option<String>,
    /// A service-account JSON key file for `gs://` destinations; default: Application Default
    /// Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, then the metadata server).
    pub gcs_key_file: Option<PathBuf>,
    /// Server-side encryption: `AES256` or `aws:kms`.
    pub sse: Option<String>,
    /// KMS key id for `sse = "aws:kms"`.
    pub sse_kms_key_id: Option<String>,
    /// Storage class (e.g. `STANDARD_IA`).
    pub storage_class: Option<String>,
    /// Canned ACL (e.g. `bucket-owner-full-control`).
    pub acl: Option<String>,
    /// Multipart part size, at least 5 MiB.
    pub part_size_bytes: u64,
    /// Parts uploading at once per object.
    pub parts_in_flight: usize,
    /// TCP connections to the store open at once at most, idle ones included (over all
    /// captures); requests beyond wait for one.
    pub max_connections: usize,
    /// Start a new object past this size.
    pub rotate_size_bytes: u64,
    /// Start a new object when the open one is this old, in seconds.
    pub rotate_age_secs: u64,
    /// Compression: `"auto"` (zstd, from level -5 when chunks queue up for compression to
    /// level 6 when none waits), a fixed zstd level (`"1"` to `"19"`), or `"none"`.
    pub compression: String,
    /// Compression threads per capture (they run off the writers' cores).
    pub compress_threads: usize,
    /// Object key template: `{prefix}`, `{node}`, `{capture}`, `{start}`, `{seq}`, `{ext}`.
    pub key_template: String,
    /// Directory where chunks wait while the store is unreachable; what an earlier run left
    /// there is uploaded on start.
    pub spool_dir: PathBuf,
    /// Bytes one capture may spool at most; beyond, frames are dropped and counted.
    pub spool_max_bytes: u64,
    /// Compressed chunks held in memory while the store is slow; more go to the spool.
    pub upload_queue: usize,
    /// How long the store may stay unreachable before a capture fails, in seconds.
    pub outage_max_secs: u64,
    /// Tag every object written to S3 (x-amz-tagging on PutObject and CreateMultipartUpload)
    /// with `customer=<customer>` (requests that name one) and `retention=<class>`, for
    /// lifecycle rules that expire by tag. Garage accepts the tags and ignores them; set it
    /// to false for a store that refuses them.
    pub tagging: bool,
    /// The retention class of captures whose request names none (the `retention` tag);
    /// none: no retention tag. 1 to 64 letters, digits, `.`, `_` or `-`.
    pub retention: Option<String>,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            destinations: Vec::new(),
            s3_endpoint: None,
            s3_region: None,
            s3_path_style: false,
            gcs_endpoint: None,
            gcs_key_file: None,
            sse: None,
            sse_kms_key_id: None,
            storage_class: None,
            acl: None,
            part_size_bytes: 8 << 20,
            parts_in_flight: 4,
            max_connections: 16,
            rotate_size_bytes: 1 << 30,
            rotate_age_secs: 300,
            compression: "auto".into(),
            compress_threads: 1,
            key_template: "{prefix}/{node}/{capture}/{start}-{seq}.{ext}".into(),
            spool_dir: "/var/tmp/tapstream/spool".into(),
            spool_max_bytes: 4 << 30,
            upload_queue: 16,
            outage_max_secs: 3600,
            tagging: true,
            retention: None,
        }
    }
}

/// What a capture's objects carry besides the frames.
#[derive(Clone, Debug, Default)]
pub struct ObjectLabels {
    /// Capture id.
    pub capture: String,
    /// This host.
    pub node: String,
    /// For a capture over several interfaces, the interface these objects hold (their keys
    /// are under `<capture>/<part>/`); `None`: the capture's only one.
    pub part: Option<String>,
    /// S3 user metadata (capture id, node, filter, tags...).
    pub metadata: Vec<(String, String)>,
    /// S3 object tags ([`object_tags`]).
    pub object_tags: Vec<(String, String)>,
    /// The capture's manifest in the catalog, written as its objects are made; `None`: none.
    pub catalog: Option<Arc<Catalog>>,
}

impl StoreSettings {
    /// Checks the values; the error is (field, message).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.part_size_bytes < MIN_PART_BYTES as u64 {
            return Err((
                "part_size_bytes",
                format!("{} is below S3's minimum part of 5 MiB", self.part_size_bytes),
            ));
        }
        if self.parts_in_flight == 0 {
            return Err(("parts_in_flight", "must be at least 1".into()));
        }
        if self.max_connections == 0 {
            return Err(("max_connections", "must be at least 1".into()));
        }
        if self.compress_threads == 0 {
            return Err(("compress_threads", "must be at least 1".into()));
        }
        self.compression().map_err(|m| ("compression", m))?;
        for d in &self.destinations {
            d.parse::<Destination>().map_err(|e| ("destinations", format!("{d:?}: {e}")))?;
            if !d.starts_with("s3://") && !d.starts_with("gs://") && !d.starts_with('/') {
                return Err((
                    "destinations",
                    format!(
                        "{d:?} is neither s3://bucket/prefix, gs://bucket/prefix nor an absolute directory"
                    ),
                ));
            }
        }
        if let Some(url) = &self.gcs_endpoint {
            super::gcs::check_endpoint(url).map_err(|m| ("gcs_endpoint", format!("{url:?}: {m}")))?;
        }
        if let Some(sse) = &self.sse
            && sse != "AES256"
            && sse != "aws:kms"
        {
            return Err(("sse", format!("{sse:?} is not AES256 or aws:kms")));
        }
        if self.sse_kms_key_id.is_some() && self.sse.as_deref() != Some("aws:kms") {
            return Err(("sse_kms_key_id", "needs sse = \"aws:kms\"".into()));
        }
        if let Some(class) = &self.retention {
            check_retention(class).map_err(|m| ("retention", m))?;
        }
        Ok(())
    }

    /// The compression asked.
    pub fn compression(&self) -> Result<Compression, String> {
        match self.compression.as_str() {
            "none" => Ok(Compression::None),
            "auto" => Ok(Compression::Zstd { level: Adaptive::AUTO.strongest }),
            level => match level.parse::<i32>() {
                Ok(l) if (1..=19).contains(&l) => Ok(Compression::Zstd { level: l }),
                _ => Err(format!("{level:?} is not auto, a zstd level from 1 to 19, or none")),
            },
        }
    }

    /// The S3 client settings for `bucket`.
    pub fn s3(&self, bucket: String) -> S3Config {
        S3Config {
            bucket,
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_path_style,
            sse: self.sse.clone(),
            sse_kms_key_id: self.sse_kms_key_id.clone(),
            storage_class: self.storage_class.clone(),
            acl: self.acl.clone(),
            max_attempts: 5,
            max_connections: self.max_connections,
            static_credentials: None,
            tagging: self.tagging,
        }
    }

    /// The Google Cloud Storage client settings for `bucket`.
    pub fn gcs(&self, bucket: String) -> GcsConfig {
        GcsConfig {
            bucket,
            endpoint: self.gcs_endpoint.clone(),
            key_file: self.gcs_key_file.clone(),
            max_connections: self.max_connections,
        }
    }

    /// Uploads what earlier runs left in the spool for each configured destination; returns
    /// each destination's outcome. Spools for a store that is unreachable now stay for the next
    /// capture that goes there.
    pub fn recover_spools(&self, node: &str) -> Vec<(String, Result<(), UploadError>)> {
        self.destinations
            .iter()
            .map(|url| {
                let labels =
                    ObjectLabels { capture: "recovery".into(), node: node.into(), ..Default::default() };
                (url.clone(), self.recover_one(url, labels))
            })
            .collect()
    }

    /// Finishes what capture `labels.capture`, stored at `url`, left when its process died:
    /// its open multipart upload completed with the parts the store confirmed, its spooled
    /// chunks uploaded under its own name, its uploads still open aborted.
    pub fn recover_capture(&self, url: &str, labels: ObjectLabels) -> Result<Recovered, UploadError> {
        let (destination, config, owner, options) = self.parts(url, labels, true)?;
        let config = UploadConfig { outage_max: Duration::from_secs(60), ..config };
        match destination {
            Destination::S3 { bucket, .. } => {
                let s3 = self.s3(bucket);
                recover_dead_capture(|| async move { Ok(S3Sink::new(s3).await) }, config, owner, options)
            }
            Destination::Gs { bucket, .. } => {
                let gcs = self.gcs(bucket);
                recover_dead_capture(|| async move { GcsSink::new(gcs) }, config, owner, options)
            }
            Destination::Dir { path } => {
                recover_dead_capture(|| async move { DirSink::new(path) }, config, owner, options)
            }
        }
    }

    /// Writes `catalog`'s manifest under the destination `url` (its last write, once the
    /// capture has ended), with a client of its own, retrying for at most 30 s of failures: a
    /// store that is down longer keeps the manifest of the capture's last object.
    pub fn write_catalog(&self, url: &str, catalog: &Catalog) -> Result<(), UploadError> {
        let destination: Destination = url.parse()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| UploadError::Runtime { source })?;
        let outage = Duration::from_secs(self.outage_max_secs.min(30));
        runtime.block_on(async {
            match destination {
                Destination::S3 { bucket, prefix } => {
                    catalog.write(&S3Sink::new(self.s3(bucket)).await, &prefix, outage).await
                }
                Destination::Gs { bucket, prefix } => {
                    catalog.write(&GcsSink::new(self.gcs(bucket))?, &prefix, outage).await
                }
                Destination::Dir { path } => catalog.write(&DirSink::new(path)?, "", outage).await,
            }
        })
    }

    /// Writes every frame of the capture `manifest` describes, stored under the destination
    /// `url`, to the file `out` as one file in `format` (its interfaces merged in time order),
    /// read back from the store with a client of its own.
    pub fn read_capture(
        &self,
        url: &str,
        manifest: &Manifest,
        format: Format,
        out: &std::path::Path,
    ) -> Result<u64, UploadError> {
        let destination: Destination = url.parse()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| UploadError::Runtime { source })?;
        let io = |source| UploadError::Io { operation: "write", path: out.display().to_string(), source };
        let mut file = std::io::BufWriter::new(std::fs::File::create(out).map_err(io)?);
        let options = MergeOptions { since: 0, until: u64::MAX, filter: None, in_flight: 4, format };
        let captures = std::slice::from_ref(manifest);
        let stats = runtime.block_on(async {
            match destination {
                Destination::S3 { bucket, .. } => {
                    let sink = Arc::new(S3Sink::new(self.s3(bucket)).await);
                    read_captures(sink, captures, &options, &mut file, |_| {}).await
                }
                Destination::Gs { bucket, .. } => {
                    let sink = Arc::new(GcsSink::new(self.gcs(bucket))?);
                    read_captures(sink, captures, &options, &mut file, |_| {}).await
                }
                Destination::Dir { path } => {
                    read_captures(Arc::new(DirSink::new(path)?), captures, &options, &mut file, |_| {}).await
                }
            }
        })?;
        std::io::Write::flush(&mut file).map_err(io)?;
        Ok(stats.packets)
    }

    fn recover_one(&self, url: &str, labels: ObjectLabels) -> Result<(), UploadError> {
        let (destination, config, owner, options) = self.parts(url, labels, true)?;
        // Recovery at start-up gives up on an unreachable store sooner: its spools wait for
        // the next capture that goes there.
        let config = UploadConfig { outage_max: Duration::from_secs(60), ..config };
        match destination {
            Destination::S3 { bucket, .. } => {
                let s3 = self.s3(bucket);
                recover_spools(|| async move { Ok(S3Sink::new(s3).await) }, config, owner, options)
            }
            Destination::Gs { bucket, .. } => {
                let gcs = self.gcs(bucket);
                recover_spools(|| async move { GcsSink::new(gcs) }, config, owner, options)
            }
            Destination::Dir { path } => {
                recover_spools(|| async move { DirSink::new(path) }, config, owner, options)
            }
        }
    }

    /// What a capture's (or a recovery's) store output is made of: where, how objects are cut,
    /// whose they are, and the threads and spool. `recover_killed`: see [`StoreOptions`].
    fn parts(
        &self,
        url: &str,
        labels: ObjectLabels,
        recover_killed: bool,
    ) -> Result<(Destination, UploadConfig, ObjectOwner, StoreOptions), UploadError> {
        let compression =
            self.compression().map_err(|reason| UploadError::Setting { field: "compression", reason })?;
        let destination: Destination = url.parse()?;
        let prefix = destination.prefix().to_owned();
        let config = UploadConfig {
            part_bytes: self.part_size_bytes as usize,
            parts_in_flight_per_object: self.parts_in_flight,
            object_max_bytes: self.rotate_size_bytes,
            object_max_age: Duration::from_secs(self.rotate_age_secs),
            key_template: self.key_template.clone(),
            compression,
            outage_max: Duration::from_secs(self.outage_max_secs),
        };
        let owner = ObjectOwner {
            prefix,
            node: labels.node,
            capture: labels.capture,
            part: labels.part,
            metadata: labels.metadata,
            object_tags: labels.object_tags,
            catalog: labels.catalog,
        };
        let options = StoreOptions {
            threads: self.compress_threads,
            adaptive: (self.compression == "auto").then_some(Adaptive::AUTO),
            spool_root: self.spool_dir.clone(),
            spool_max_bytes: self.spool_max_bytes,
            memory_chunks: self.upload_queue,
            recover_killed,
        };
        Ok((destination, config, owner, options))
    }

    /// A target that stores a capture at `url` (validated settings). `recover_killed`: whether
    /// it uploads the spools of runs that died when it starts (see [`StoreOptions`]).
    ///
    /// The store's client is built and the store checked here, on the caller's thread, within
    /// a few seconds (see [`StoreOutput::prepare`]): a store that refuses is an error; one that
    /// cannot be reached now is logged and the capture spools until it answers. Starting the
    /// target, on the interface's thread, then sends no request to the store.
    pub fn target(
        &self,
        url: &str,
        labels: ObjectLabels,
        recover_killed: bool,
    ) -> Result<StoreTarget, UploadError> {
        let (destination, config, owner, options) = self.parts(url, labels, recover_killed)?;
        let start: StartStore = match destination {
            Destination::S3 { bucket, .. } => {
                let s3 = self.s3(bucket);
                let prepared = StoreOutput::prepare(
                    || async move { Ok(S3Sink::new(s3).await) },
                    config,
                    owner,
                    options,
                )?;
                Box::new(move |pool, header| prepared.start(pool, header))
            }
            Destination::Gs { bucket, .. } => {
                let gcs = self.gcs(bucket);
                let prepared =
                    StoreOutput::prepare(|| async move { GcsSink::new(gcs) }, config, owner, options)?;
                Box::new(move |pool, header| prepared.start(pool, header))
            }
            Destination::Dir { path } => {
                let prepared =
                    StoreOutput::prepare(|| async move { DirSink::new(path) }, config, owner, options)?;
                Box::new(move |pool, header| prepared.start(pool, header))
            }
        };
        Ok(StoreTarget { start })
    }
}

/// Longest tag key accepted.
pub const MAX_TAG_KEY: usize = 64;

/// Checks a tag for object metadata (`x-amz-meta-tag-KEY`): the key 1 to [`MAX_TAG_KEY`]
/// letters, digits, `-` and `_` (an HTTP header name token; lowercased, as S3 stores it), the
/// value printable ASCII. The one rule for tags from the CLI, the API and every other source.
pub fn check_tag(key: &str, value: &str) -> Result<(String, String), String> {
    if key.is_empty()
        || key.len() > MAX_TAG_KEY
        || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!("tag key {key:?}: use 1 to {MAX_TAG_KEY} letters, digits, - and _"));
    }
    if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!("tag {key}: the value must be printable ASCII"));
    }
    Ok((key.to_ascii_lowercase(), value.to_owned()))
}

/// Longest retention class.
pub const MAX_RETENTION: usize = 64;

/// Checks a retention class (the value of the `retention` object tag): 1 to [`MAX_RETENTION`]
/// letters, digits, `.`, `_` or `-`.
pub fn check_retention(class: &str) -> Result<(), String> {
    if class.is_empty()
        || class.len() > MAX_RETENTION
        || !class.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(format!(
            "retention class {class:?}: use 1 to {MAX_RETENTION} letters, digits, '.', '_' or '-'"
        ));
    }
    Ok(())
}

/// The S3 object tags of a capture's objects: `customer` and `retention`, those it has.
pub fn object_tags(customer: Option<&str>, retention: Option<&str>) -> Vec<(String, String)> {
    let mut tags = Vec::new();
    tags.extend(customer.map(|c| ("customer".to_owned(), c.to_owned())));
    tags.extend(retention.map(|r| ("retention".to_owned(), r.to_owned())));
    tags
}

/// S3 user metadata for a capture, checked against S3's rules (printable ASCII, 2 KB in all);
/// tags are checked with [`check_tag`].
pub fn object_metadata(
    capture: &str,
    node: &str,
    filter: Option<&str>,
    alert_id: Option<&str>,
    customer: Option<&str>,
    tags: &[(String, String)],
) -> Result<Vec<(String, String)>, String> {
    let mut meta = vec![("capture-id".to_owned(), capture.to_owned()), ("node".to_owned(), node.to_owned())];
    meta.extend(filter.map(|f| ("filter".to_owned(), f.to_owned())));
    meta.extend(alert_id.map(|a| ("alert-id".to_owned(), a.to_owned())));
    meta.extend(customer.map(|c| ("customer".to_owned(), c.to_owned())));
    for (k, v) in tags {
        let (k, v) = check_tag(k, v)?;
        meta.push((format!("tag-{k}"), v));
    }
    for (k, v) in &meta {
        if !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(format!("{k} must be printable ASCII to be stored as object metadata"));
        }
    }
    let size: usize = meta.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > 2048 {
        return Err(format!(
            "object metadata (capture id, node, filter, alert id, customer, tags) is {size} bytes; S3 allows 2048"
        ));
    }
    Ok(meta)
}

/// This host's name (for object keys), from the kernel.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "node".into())
}
