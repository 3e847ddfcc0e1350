//! The catalog: one small JSON manifest per capture, kept in the store beside its objects, so
//! that captures can be found by time, node and labels with no database (`tapstream ls`, and
//! `tapstream read` over a prefix).
//!
//! Key layout, under the destination's prefix:
//!
//! ```text
//! <prefix>/catalog/<YYYY-MM-DD>/<node>/<capture-id>.json
//! ```
//!
//! with one copy of the manifest under every UTC day the capture spans, from the day it
//! started to the day of the latest write (its end, its last frame, or now while it runs). A
//! time window's query lists the days of the window, and the day before it (a capture that
//! began the day before and has not been written since midnight), and nothing else.
//!
//! The manifest is written when the capture's output starts, again each time one of its
//! objects is finished (so a running capture is listed, with the objects readable so far), and
//! at the end with the counts and the stop reason. Each write goes through the same retries as
//! the objects ([`with_retry`], up to the outage limit); a write that still fails is logged and
//! the next write (the next object, or the end) puts the whole manifest again.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt as _;

use super::{ObjectMeta, Sink, UploadError, object::with_retry};

/// The manifest's format version.
pub const MANIFEST_VERSION: u32 = 1;

/// What the catalog says of one capture.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Manifest {
    /// Format version ([`MANIFEST_VERSION`]).
    pub version: u32,
    /// Capture id.
    pub capture_id: String,
    /// The id of the request that asked for it, apart from the capture id (a fleet request's
    /// id, which its captures also take as theirs; an outside system's): none if not given.
    pub request_id: Option<String>,
    /// The host that captured.
    pub node: String,
    /// Its interfaces, (alias, device).
    pub interfaces: Vec<ManifestInterface>,
    /// The tcpdump filter; none: every frame.
    pub filter: Option<String>,
    /// Bytes stored per frame at most.
    pub snaplen: u32,
    /// Tags of the request.
    pub tags: BTreeMap<String, String>,
    /// The customer it is for.
    pub customer: Option<String>,
    /// The alert that asked for it.
    pub alert_id: Option<String>,
    /// Its retention class (its objects' `retention` tag).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    /// When it started (ns since the Unix epoch).
    pub start_ns: u64,
    /// When it ended; none while it runs.
    pub end_ns: Option<u64>,
    /// When this manifest was written.
    pub updated_ns: u64,
    /// Frames stored: in the finished objects while it runs, the summary's count at the end.
    pub frames: u64,
    /// Frame bytes stored (known at the end).
    pub bytes: Option<u64>,
    /// Frames dropped, all causes (known at the end).
    pub drops: Option<u64>,
    /// Why it ended (known at the end).
    pub stop_reason: Option<String>,
    /// The error it ended with, if any.
    pub error: Option<String>,
    /// Its finished objects, in the order they were finished.
    pub objects: Vec<ManifestObject>,
}

/// One interface of a capture.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestInterface {
    /// The name the request used (an alias of the configuration, or the device).
    pub alias: String,
    /// The network device.
    pub device: String,
}

/// One finished object of a capture.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestObject {
    /// The object's key (in the bucket, or under the directory).
    pub key: String,
    /// Its index's key.
    pub index: String,
    /// For a capture over several interfaces, the interface whose frames it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Time of its first and last frame (ns since the Unix epoch); 0 and `u64::MAX` when
    /// unknown (objects recovered after their process died: their index has them).
    pub first_ns: u64,
    pub last_ns: u64,
    /// Frames in it; 0 when unknown.
    pub frames: u64,
    /// Bytes of the object.
    pub bytes: u64,
}

/// How a capture ended, for the last write of its manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaptureEnd {
    pub end_ns: u64,
    pub frames: u64,
    pub bytes: u64,
    pub drops: u64,
    pub stop_reason: String,
    pub error: Option<String>,
}

impl Manifest {
    /// The last time it holds frames of (or may: it runs until `now_ns`).
    pub fn latest_ns(&self, now_ns: u64) -> u64 {
        let known = self.objects.iter().map(|o| o.last_ns).filter(|t| *t != u64::MAX);
        let last_frame = known.max().unwrap_or(0);
        self.end_ns.unwrap_or(now_ns).max(last_frame).max(self.start_ns)
    }
}

/// A running capture's manifest, shared by the outputs of its interfaces, which write it.
#[derive(Debug)]
pub struct Catalog {
    manifest: Mutex<Manifest>,
    /// One write at a time, so an older manifest never overwrites a newer one.
    writing: tokio::sync::Mutex<()>,
}

impl Catalog {
    /// A catalog entry for a capture starting now.
    pub fn new(manifest: Manifest) -> Arc<Self> {
        Arc::new(Self {
            manifest: Mutex::new(Manifest { version: MANIFEST_VERSION, ..manifest }),
            writing: tokio::sync::Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Manifest> {
        self.manifest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The manifest as it is now.
    pub fn manifest(&self) -> Manifest {
        self.lock().clone()
    }

    /// Notes a finished object.
    pub fn record_object(&self, object: ManifestObject) {
        let mut m = self.lock();
        if m.end_ns.is_none() {
            m.frames += object.frames;
        }
        m.objects.push(object);
    }

    /// Notes how the capture ended.
    pub fn end(&self, end: CaptureEnd) {
        let mut m = self.lock();
        m.end_ns = Some(end.end_ns);
        m.frames = end.frames;
        m.bytes = Some(end.bytes);
        m.drops = Some(end.drops);
        m.stop_reason = Some(end.stop_reason);
        m.error = end.error;
    }

    /// Puts the manifest under every day it spans (see the module's documentation), each with
    /// the retries of the objects, for at most `outage_max` of failures.
    pub async fn write<S: Sink>(
        &self,
        sink: &S,
        prefix: &str,
        outage_max: Duration,
    ) -> Result<(), UploadError> {
        let _turn = self.writing.lock().await;
        let now = crate::sys::unix_now_ns();
        let mut manifest = self.manifest();
        manifest.updated_ns = now;
        let body = bytes::Bytes::from(serde_json::to_vec_pretty(&manifest).expect("a manifest serializes"));
        let meta = ObjectMeta {
            content_type: "application/json".into(),
            metadata: Vec::new(),
            tags: super::settings::object_tags(manifest.customer.as_deref(), manifest.retention.as_deref()),
        };
        for key in manifest_keys(prefix, &manifest, now) {
            with_retry("PutObject", outage_max, || sink.put_object(&key, body.clone(), &meta)).await?;
        }
        Ok(())
    }

    /// Like [`Catalog::write`], but a failure is only logged: the next write puts it again.
    pub async fn write_or_log<S: Sink>(&self, sink: &S, prefix: &str, outage_max: Duration) {
        if let Err(e) = self.write(sink, prefix, outage_max).await {
            let id = self.lock().capture_id.clone();
            log::warn!(
                "capture {id}: cannot write its manifest to the catalog ({}); it is written again \
                 with its next object or at its end",
                crate::report::chain(&e)
            );
        }
    }
}

/// The objects at `urls` (as a [`Sink::url`] names them) of the store at `destination`, as
/// manifest entries whose times are unknown: what a recovery after a dead process knows.
pub fn recovered_objects(destination: &super::Destination, urls: &[String]) -> Vec<ManifestObject> {
    let base = match destination {
        super::Destination::S3 { bucket, .. } => format!("s3://{bucket}/"),
        super::Destination::Gs { bucket, .. } => format!("gs://{bucket}/"),
        super::Destination::Dir { path } => format!("file://{}/", path.display()),
    };
    urls.iter()
        .filter_map(|url| url.strip_prefix(&base))
        .map(|key| ManifestObject {
            key: key.to_owned(),
            index: super::object::index_key(key),
            first_ns: 0,
            last_ns: u64::MAX,
            ..ManifestObject::default()
        })
        .collect()
}

/// Where the catalog is under `prefix`: `<prefix>/catalog/` (or `catalog/` with no prefix).
pub fn catalog_prefix(prefix: &str) -> String {
    match prefix.trim_matches('/') {
        "" => "catalog/".into(),
        p => format!("{p}/catalog/"),
    }
}

const DAY_NS: u64 = 86_400 * 1_000_000_000;

/// `ns` since the Unix epoch as the UTC day `YYYY-MM-DD`.
pub fn utc_day(ns: u64) -> String {
    let c = super::object::utc_compact(ns);
    format!("{}-{}-{}", &c[0..4], &c[4..6], &c[6..8])
}

/// The UTC days from the one holding `from` to the one holding `to`, as `YYYY-MM-DD`.
pub fn days(from: u64, to: u64) -> Vec<String> {
    let (first, last) = (from / DAY_NS, to.max(from) / DAY_NS);
    (first..=last).map(|d| utc_day(d * DAY_NS)).collect()
}

/// The keys of a manifest written at `now_ns`: one per day it spans.
pub fn manifest_keys(prefix: &str, m: &Manifest, now_ns: u64) -> Vec<String> {
    let base = catalog_prefix(prefix);
    days(m.start_ns, m.latest_ns(now_ns))
        .into_iter()
        .map(|day| format!("{base}{day}/{}/{}.json", m.node, m.capture_id))
        .collect()
}

/// Which captures a query wants. Times in ns since the Unix epoch.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    /// Captures holding frames at or after this time.
    pub since: Option<u64>,
    /// ... and at or before this one.
    pub until: Option<u64>,
    /// Nodes whose name this matches (anywhere in the name, as a regex finds).
    pub node: Option<regex::Regex>,
    pub customer: Option<String>,
    pub alert_id: Option<String>,
    /// Every one of these tags.
    pub tags: Vec<(String, String)>,
    pub capture: Option<String>,
}

impl Selector {
    /// Whether `m` is wanted, at `now_ns` (a running capture extends to now).
    pub fn matches(&self, m: &Manifest, now_ns: u64) -> bool {
        self.since.is_none_or(|s| m.latest_ns(now_ns) >= s)
            && self.until.is_none_or(|u| m.start_ns <= u)
            && self.node.as_ref().is_none_or(|re| re.is_match(&m.node))
            && self.customer.as_ref().is_none_or(|c| m.customer.as_ref() == Some(c))
            && self.alert_id.as_ref().is_none_or(|a| m.alert_id.as_ref() == Some(a))
            && self.tags.iter().all(|(k, v)| m.tags.get(k) == Some(v))
            && self.capture.as_ref().is_none_or(|c| &m.capture_id == c)
    }

    /// The key prefixes to list for it under `prefix`: the days of the window and the one
    /// before, or the whole catalog without a start.
    pub fn listing_prefixes(&self, prefix: &str, now_ns: u64) -> Vec<String> {
        let base = catalog_prefix(prefix);
        match self.since {
            None => vec![base],
            Some(since) => {
                let until = self.until.unwrap_or(now_ns).max(since);
                days(since.saturating_sub(DAY_NS), until).into_iter().map(|d| format!("{base}{d}/")).collect()
            }
        }
    }
}

/// What a listing of the catalog found.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// The captures wanted, by start time, each once (its newest manifest).
    pub captures: Vec<Manifest>,
    /// Manifests read (every copy, wanted or not).
    pub manifests_read: usize,
}

/// Why a listing found nothing to list.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("nothing is stored under {url}: no such prefix (check the bucket and the prefix)")]
    UnknownPrefix { url: String },
    #[error(
        "{url} holds objects but no catalog (no manifests under {catalog}): they were written \
         before the catalog existed, or by another tool"
    )]
    NoManifests { url: String, catalog: String },
    #[error("manifest {key} is not a capture manifest")]
    BadManifest {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Store(#[from] UploadError),
}

/// Manifests fetched at once by [`list`].
const MANIFESTS_IN_FLIGHT: usize = 8;

/// The captures `selector` wants under `prefix` of `sink`. A catalog with no manifest at all
/// is an error that says whether anything is stored under the prefix.
pub async fn list<S: Sink>(
    sink: &S,
    prefix: &str,
    selector: &Selector,
    now_ns: u64,
) -> Result<Listing, CatalogError> {
    let mut newest: BTreeMap<(String, String), Manifest> = BTreeMap::new();
    let mut listing = Listing::default();
    let mut keys = Vec::new();
    for under in selector.listing_prefixes(prefix, now_ns) {
        keys.extend(
            sink.list(&under, None).await?.into_iter().map(|(k, _)| k).filter(|k| k.ends_with(".json")),
        );
    }
    // A few GETs at once: a catalog of many captures lists in a fraction of the time.
    let mut fetched =
        futures_util::stream::iter(keys.iter().map(|key| async move { (key, sink.get(key, None).await) }))
            .buffered(MANIFESTS_IN_FLIGHT);
    while let Some((key, raw)) = fetched.next().await {
        let m: Manifest = serde_json::from_slice(&raw?)
            .map_err(|source| CatalogError::BadManifest { key: key.clone(), source })?;
        listing.manifests_read += 1;
        let id = (m.node.clone(), m.capture_id.clone());
        if newest.get(&id).is_none_or(|old| old.updated_ns < m.updated_ns) {
            newest.insert(id, m);
        }
    }
    if listing.manifests_read == 0 {
        let catalog = catalog_prefix(prefix);
        if sink.list(&catalog, Some(1)).await?.is_empty() {
            let under = match prefix.trim_matches('/') {
                "" => String::new(),
                p => format!("{p}/"),
            };
            let url = sink.url(&under);
            return Err(if sink.list(&under, Some(1)).await?.is_empty() {
                CatalogError::UnknownPrefix { url }
            } else {
                CatalogError::NoManifests { url, catalog: sink.url(&catalog) }
            });
        }
    }
    listing.captures = newest.into_values().filter(|m| selector.matches(m, now_ns)).collect();
    listing
        .captures
        .sort_by(|a, b| (a.start_ns, &a.node, &a.capture_id).cmp(&(b.start_ns, &b.node, &b.capture_id)));
    Ok(listing)
}

/// The objects under `prefix` that have an index, as manifests of unknown captures (one per
/// object, its times unknown: a reader learns them from the index): what a prefix written
/// before the catalog existed holds.
pub async fn uncatalogued<S: Sink>(sink: &S, prefix: &str) -> Result<Vec<Manifest>, UploadError> {
    let under = match prefix.trim_matches('/') {
        "" => String::new(),
        p => format!("{p}/"),
    };
    let listed = sink.list(&under, None).await?;
    let sizes: BTreeMap<&str, u64> = listed.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    Ok(listed
        .iter()
        .filter_map(|(key, _)| {
            let object = key.strip_suffix(".idx.json")?;
            let bytes = *sizes.get(object)?;
            Some(Manifest {
                version: MANIFEST_VERSION,
                capture_id: object.to_owned(),
                objects: vec![ManifestObject {
                    key: object.to_owned(),
                    index: key.clone(),
                    first_ns: 0,
                    last_ns: u64::MAX,
                    bytes,
                    ..ManifestObject::default()
                }],
                ..Manifest::default()
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_795_000_000_000_000_000; // 2026-11-18T11:06:40Z

    fn manifest(node: &str, id: &str, start: u64, end: Option<u64>) -> Manifest {
        Manifest {
            capture_id: id.into(),
            node: node.into(),
            start_ns: start,
            end_ns: end,
            ..Manifest::default()
        }
    }

    #[test]
    fn a_manifest_is_kept_under_every_day_it_spans() {
        let m = manifest("tap1", "c1", T0, Some(T0 + 2 * DAY_NS));
        assert_eq!(
            manifest_keys("caps", &m, T0),
            [
                "caps/catalog/2026-11-18/tap1/c1.json",
                "caps/catalog/2026-11-19/tap1/c1.json",
                "caps/catalog/2026-11-20/tap1/c1.json"
            ]
        );
        // Running: up to now.
        let running = manifest("tap1", "c1", T0, None);
        assert_eq!(manifest_keys("", &running, T0 + 60).len(), 1);
        assert_eq!(manifest_keys("", &running, T0 + DAY_NS)[1], "catalog/2026-11-19/tap1/c1.json");
    }

    #[test]
    fn a_window_lists_its_days_and_the_one_before() {
        let s = Selector { since: Some(T0), until: Some(T0 + DAY_NS), ..Selector::default() };
        assert_eq!(
            s.listing_prefixes("p", T0),
            ["p/catalog/2026-11-17/", "p/catalog/2026-11-18/", "p/catalog/2026-11-19/"]
        );
        assert_eq!(Selector::default().listing_prefixes("p/", T0), ["p/catalog/"]);
    }

    #[test]
    fn selectors_narrow() {
        let mut m = manifest("tap-fra1", "c1", T0, Some(T0 + 10));
        m.customer = Some("acme".into());
        m.tags.insert("site".into(), "fra1".into());
        let all = Selector::default();
        assert!(all.matches(&m, T0));
        assert!(!Selector { since: Some(T0 + 11), ..all.clone() }.matches(&m, T0 + 100));
        assert!(Selector { since: Some(T0 + 10), ..all.clone() }.matches(&m, T0 + 100));
        assert!(!Selector { until: Some(T0 - 1), ..all.clone() }.matches(&m, T0));
        assert!(Selector { node: Some(regex::Regex::new("^tap-").unwrap()), ..all.clone() }.matches(&m, T0));
        assert!(!Selector { node: Some(regex::Regex::new("ams").unwrap()), ..all.clone() }.matches(&m, T0));
        assert!(!Selector { customer: Some("other".into()), ..all.clone() }.matches(&m, T0));
        assert!(Selector { tags: vec![("site".into(), "fra1".into())], ..all.clone() }.matches(&m, T0));
        assert!(!Selector { tags: vec![("site".into(), "ams1".into())], ..all.clone() }.matches(&m, T0));
        assert!(!Selector { alert_id: Some("A".into()), ..all.clone() }.matches(&m, T0));
        assert!(!Selector { capture: Some("c2".into()), ..all }.matches(&m, T0));
        // Running: it reaches now.
        let running = manifest("n", "c", T0, None);
        assert!(Selector { since: Some(T0 + 50), ..Selector::default() }.matches(&running, T0 + 60));
    }

    #[test]
    fn manifests_written_to_a_directory_are_listed_and_an_empty_one_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let sink = crate::store::dir::DirSink::new(dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let now = crate::sys::unix_now_ns();
        let all = Selector::default();
        rt.block_on(async {
            let e = list(&sink, "", &all, now).await.unwrap_err();
            assert!(matches!(e, CatalogError::UnknownPrefix { .. }), "{e}");
            sink.put_object("n1/c0/x.pcap.zst", bytes::Bytes::from_static(b"x"), &ObjectMeta::default())
                .await
                .unwrap();
            let e = list(&sink, "", &all, now).await.unwrap_err();
            assert!(matches!(e, CatalogError::NoManifests { .. }), "{e}");

            let catalog = Catalog::new(manifest("n1", "c1", now - 1_000, None));
            catalog.write(&sink, "", Duration::from_secs(1)).await.unwrap();
            let running = list(&sink, "", &all, now).await.unwrap();
            assert_eq!(running.captures.len(), 1);
            assert_eq!(running.captures[0].end_ns, None, "listed while it runs");
            catalog.record_object(ManifestObject { key: "k".into(), frames: 3, ..ManifestObject::default() });
            catalog.end(CaptureEnd {
                end_ns: now,
                frames: 3,
                stop_reason: "packets".into(),
                ..CaptureEnd::default()
            });
            catalog.write(&sink, "", Duration::from_secs(1)).await.unwrap();
            let since = Selector { since: Some(now - 10_000), ..Selector::default() };
            let ended = list(&sink, "", &since, now).await.unwrap();
            assert_eq!(ended.captures.len(), 1);
            assert_eq!(ended.captures[0].stop_reason.as_deref(), Some("packets"));
            assert_eq!(ended.captures[0].objects.len(), 1);
            let later = Selector { since: Some(now + 1), ..Selector::default() };
            assert!(list(&sink, "", &later, now).await.unwrap().captures.is_empty());
        });
    }

    #[test]
    fn a_store_that_fails_for_a_moment_gets_the_manifest_on_a_retry() {
        use crate::store::fault::{Fault, FaultSink, Operation, When};
        let dir = tempfile::tempdir().unwrap();
        let sink = FaultSink::new(crate::store::dir::DirSink::new(dir.path()).unwrap());
        sink.inject(Operation::PutObject, When::Call(1), Fault::Retryable("SlowDown: busy".into()));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let now = crate::sys::unix_now_ns();
        rt.block_on(async {
            let catalog = Catalog::new(manifest("n1", "c1", now, None));
            catalog.write(&sink, "p", Duration::from_secs(60)).await.unwrap();
            let puts = sink.counts(Operation::PutObject);
            assert_eq!((puts.calls, puts.injected), (2, 1), "{puts:?}");
            let listing = list(&sink, "p", &Selector::default(), now).await.unwrap();
            assert_eq!(listing.captures.len(), 1);
        });
        // A store that refuses for good: the write fails and says so (the caller logs it).
        let refusing = FaultSink::new(crate::store::dir::DirSink::new(dir.path()).unwrap());
        refusing.inject(Operation::PutObject, When::Always, Fault::Failed("AccessDenied: no".into()));
        let e = rt
            .block_on(Catalog::new(manifest("n1", "c2", now, None)).write(
                &refusing,
                "p",
                Duration::from_secs(60),
            ))
            .unwrap_err();
        assert!(e.to_string().contains("AccessDenied"), "{e}");
    }
}
