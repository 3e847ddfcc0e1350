//! Reading captures back: one object, all of it or only the frames of a time window, fetched
//! with ranged GETs through the index beside the object ([`read_window`]); or every frame of
//! the captures the catalog lists, across nodes, captures and objects, merged in timestamp
//! order and filtered in user space ([`read_captures`]).

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
    io::Write,
    sync::Arc,
};

use super::{Sink, UploadError, catalog::Manifest, object::index_key};
use crate::{
    filter::CbpfProgram,
    store::compress::{Compression, FrameEntry, Index, decompress_frame},
};

/// What a read fetched and wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Bytes fetched from the object (index not counted).
    pub bytes_fetched: u64,
    /// Bytes of the whole object.
    pub object_bytes: u64,
    /// Records written.
    pub packets: u64,
}

/// Writes the PCAP of `key` to `out`, keeping only records with `since <= ts <= until` (ns
/// since the Unix epoch) and fetching only the frames that may hold them.
pub async fn read_window<S: Sink>(
    sink: &S,
    key: &str,
    since: u64,
    until: u64,
    out: &mut impl Write,
) -> Result<ReadStats, UploadError> {
    let raw = sink.get(&index_key(key), None).await?;
    let index: Index = serde_json::from_slice(&raw).map_err(|e| UploadError::Store {
        operation: "read index",
        key: index_key(key),
        reason: "not an index of frames".into(),
        retryable: false,
        source: Some(Box::new(e)),
    })?;
    let io_err = |source| UploadError::Io { operation: "write", path: "output".into(), source };
    let mut stats = ReadStats { object_bytes: index.object_length, ..ReadStats::default() };
    let head = index.frames.first().ok_or_else(|| UploadError::Store {
        operation: "read index",
        key: index_key(key),
        reason: "no frames".into(),
        retryable: false,
        source: None,
    })?;
    let bytes = sink.get(key, Some((head.offset, head.offset + head.length - 1))).await?;
    stats.bytes_fetched += bytes.len() as u64;
    let header = decompress_frame(index.compression, 0, head, &bytes)?;
    out.write_all(&header).map_err(io_err)?;

    // Fetch runs of adjacent selected frames with one ranged GET each.
    let selected: Vec<_> = index.frames_in(since, until).collect();
    let mut i = 0;
    while i < selected.len() {
        let mut j = i;
        while j + 1 < selected.len() && selected[j + 1].0 == selected[j].0 + 1 {
            j += 1;
        }
        let (start, end) = (selected[i].1.offset, selected[j].1.offset + selected[j].1.length);
        let bytes = sink.get(key, Some((start, end - 1))).await?;
        stats.bytes_fetched += bytes.len() as u64;
        for &(n, entry) in &selected[i..=j] {
            let at = (entry.offset - start) as usize;
            let frame = bytes.get(at..at + entry.length as usize).ok_or_else(|| UploadError::Store {
                operation: "GetObject",
                key: key.to_owned(),
                reason: format!("short ranged read for frame {n}"),
                retryable: true,
                source: None,
            })?;
            let records = decompress_frame(index.compression, n, entry, frame)?;
            let mut file = header.clone();
            file.extend_from_slice(&records);
            let not_pcap = |e: tapstream_pcap::PcapError| UploadError::Store {
                operation: "read frame",
                key: key.to_owned(),
                reason: format!("frame {n} is not PCAP records"),
                retryable: false,
                source: Some(Box::new(e)),
            };
            let reader = tapstream_pcap::Reader::new(&file).map_err(not_pcap)?;
            let mut pos = header.len();
            for record in reader {
                let record = record.map_err(not_pcap)?;
                let len = tapstream_pcap::RECORD_HEADER_LEN + record.data.len();
                if (since..=until).contains(&record.ts_nanos) {
                    out.write_all(&file[pos..pos + len]).map_err(io_err)?;
                    stats.packets += 1;
                }
                pos += len;
            }
        }
        i = j + 1;
    }
    out.flush().map_err(io_err)?;
    Ok(stats)
}

/// What a read over captures fetched and wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MergeStats {
    /// Captures read.
    pub captures: usize,
    /// Objects of those captures, and their bytes.
    pub objects: usize,
    pub object_bytes: u64,
    /// Objects with frames in the window, whose indexes were fetched.
    pub objects_read: usize,
    /// Bytes fetched from the objects (their zstd frames and PCAP headers; indexes apart).
    pub bytes_fetched: u64,
    /// Bytes of the indexes fetched.
    pub index_bytes: u64,
    /// zstd frames fetched.
    pub frames_fetched: u64,
    /// Records decompressed, and records written (in the window, accepted by the filter).
    pub packets_read: u64,
    pub packets: u64,
}

/// What to read of the captures.
pub struct MergeOptions<'a> {
    /// The window, ns since the Unix epoch, both ends included.
    pub since: u64,
    pub until: u64,
    /// The tcpdump filter each frame must pass (libpcap's interpreter); none: every frame.
    pub filter: Option<&'a CbpfProgram>,
    /// Ranged GETs in flight at once (at least 1).
    pub in_flight: usize,
}

/// An object with frames in the window.
struct Source {
    key: String,
    compression: Compression,
    /// Its PCAP file header, decompressed.
    header: Vec<u8>,
}

/// A zstd frame the index says overlaps the window, not fetched yet.
struct Pending {
    first_ns: u64,
    source: usize,
    frame: usize,
    entry: FrameEntry,
}

/// A fetched frame, decompressed: its records as a PCAP file (the object's header first), and
/// each record's (time, offset, length with its header, length on the wire).
struct OpenFrame {
    file: Vec<u8>,
    records: Vec<(u64, usize, usize, u32)>,
    next: usize,
}

fn store_error(operation: &'static str, key: &str, reason: String) -> UploadError {
    UploadError::Store { operation, key: key.to_owned(), reason, retryable: false, source: None }
}

/// Writes to `out`, as one PCAP file, every frame of `captures` in the window that the filter
/// accepts, in timestamp order (ties: in object and record order), as mergecap merges files.
/// Only the zstd frames the indexes say overlap the window are fetched, each with a ranged GET,
/// `in_flight` at once, in the order the merge needs them; memory holds the frames in flight
/// and those whose times overlap the frame being written, never a whole object.
/// `progress` is called with the counts as frames are fetched.
pub async fn read_captures<S: Sink>(
    sink: Arc<S>,
    captures: &[Manifest],
    options: &MergeOptions<'_>,
    out: &mut impl Write,
    mut progress: impl FnMut(&MergeStats),
) -> Result<MergeStats, UploadError> {
    let (since, until) = (options.since, options.until);
    let io_err = |source| UploadError::Io { operation: "write", path: "output".into(), source };
    let mut stats = MergeStats { captures: captures.len(), ..MergeStats::default() };
    let mut sources = Vec::new();
    let mut pending = Vec::new();
    let mut header: Option<tapstream_pcap::FileHeader> = None;
    for object in captures.iter().flat_map(|m| &m.objects) {
        stats.objects += 1;
        stats.object_bytes += object.bytes;
        if object.last_ns < since || object.first_ns > until {
            continue;
        }
        let raw = sink.get(&object.index, None).await?;
        stats.index_bytes += raw.len() as u64;
        stats.objects_read += 1;
        let index: Index = serde_json::from_slice(&raw).map_err(|e| UploadError::Store {
            operation: "read index",
            key: object.index.clone(),
            reason: "not an index of frames".into(),
            retryable: false,
            source: Some(Box::new(e)),
        })?;
        let selected: Vec<(usize, FrameEntry)> =
            index.frames_in(since, until).map(|(n, f)| (n, *f)).collect();
        let Some(head) = index.frames.first().filter(|_| !selected.is_empty()) else { continue };
        let bytes = sink.get(&object.key, Some((head.offset, head.offset + head.length - 1))).await?;
        stats.bytes_fetched += bytes.len() as u64;
        let file_header = decompress_frame(index.compression, 0, head, &bytes)?;
        let this = tapstream_pcap::Reader::new(&file_header)
            .map_err(|e| store_error("read object", &object.key, format!("no PCAP header: {e}")))?
            .header();
        match &mut header {
            None => header = Some(this),
            Some(h) if h.linktype == this.linktype && h.nanos == this.nanos => {
                h.snaplen = h.snaplen.max(this.snaplen)
            }
            Some(h) => {
                return Err(store_error(
                    "read object",
                    &object.key,
                    format!(
                        "link type {} and {} timestamps, unlike the objects before (link type {}, {}): \
                         they cannot be merged into one PCAP file",
                        this.linktype,
                        if this.nanos { "ns" } else { "us" },
                        h.linktype,
                        if h.nanos { "ns" } else { "us" }
                    ),
                ));
            }
        }
        let source = sources.len();
        sources.push(Source { key: object.key.clone(), compression: index.compression, header: file_header });
        pending.extend(selected.into_iter().map(|(frame, entry)| Pending {
            first_ns: entry.first_ns,
            source,
            frame,
            entry,
        }));
    }
    let header = header.unwrap_or(tapstream_pcap::FileHeader {
        snaplen: tapstream_pcap::MAX_RECORD_LEN,
        linktype: tapstream_pcap::LINKTYPE_ETHERNET,
        nanos: true,
    });
    out.write_all(&header.encode()).map_err(io_err)?;
    progress(&stats);

    // The merge: a record is written once every frame that may hold an earlier one is open.
    pending.sort_by_key(|p| (p.first_ns, p.source, p.frame));
    let fetch = |p: &Pending| {
        let (sink, key) = (sink.clone(), sources[p.source].key.clone());
        let range = (p.entry.offset, p.entry.offset + p.entry.length - 1);
        tokio::spawn(async move { sink.get(&key, Some(range)).await })
    };
    let mut fetches = VecDeque::new();
    let (mut next_fetch, mut next_open) = (0, 0);
    let mut open: Vec<Option<OpenFrame>> = Vec::new();
    // (time of its next record, source, frame, slot in `open`)
    let mut heap: BinaryHeap<Reverse<(u64, usize, usize, usize)>> = BinaryHeap::new();
    loop {
        while fetches.len() < options.in_flight.max(1) && next_fetch < pending.len() {
            fetches.push_back(fetch(&pending[next_fetch]));
            next_fetch += 1;
        }
        let head = heap.peek().map(|Reverse((ts, ..))| *ts);
        if next_open < pending.len() && head.is_none_or(|t| pending[next_open].first_ns <= t) {
            let p = &pending[next_open];
            next_open += 1;
            let source = &sources[p.source];
            let task = fetches.pop_front().expect("fetched in the order frames are opened");
            let bytes = task
                .await
                .map_err(|e| store_error("GetObject", &source.key, format!("the fetch failed: {e}")))??;
            if bytes.len() as u64 != p.entry.length {
                return Err(UploadError::Store {
                    operation: "GetObject",
                    key: source.key.clone(),
                    reason: format!("short ranged read for frame {}", p.frame),
                    retryable: true,
                    source: None,
                });
            }
            stats.bytes_fetched += bytes.len() as u64;
            stats.frames_fetched += 1;
            let records = decompress_frame(source.compression, p.frame, &p.entry, &bytes)?;
            let mut file = source.header.clone();
            file.extend_from_slice(&records);
            let not_pcap = |e: tapstream_pcap::PcapError| UploadError::Store {
                operation: "read frame",
                key: source.key.clone(),
                reason: format!("frame {} is not PCAP records", p.frame),
                retryable: false,
                source: Some(Box::new(e)),
            };
            let spans = tapstream_pcap::Reader::new(&file)
                .map_err(not_pcap)?
                .map(|r| {
                    r.map(|r| {
                        (r.ts_nanos, r.offset, tapstream_pcap::RECORD_HEADER_LEN + r.data.len(), r.origlen)
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(not_pcap)?;
            if let Some(&(ts, ..)) = spans.first() {
                let slot = open.iter().position(Option::is_none).unwrap_or_else(|| {
                    open.push(None);
                    open.len() - 1
                });
                heap.push(Reverse((ts, p.source, p.frame, slot)));
                open[slot] = Some(OpenFrame { file, records: spans, next: 0 });
            }
            progress(&stats);
            continue;
        }
        let Some(Reverse((ts, source, frame, slot))) = heap.pop() else { break };
        let f = open[slot].as_mut().expect("an open frame");
        let (_, at, len, wire_len) = f.records[f.next];
        f.next += 1;
        stats.packets_read += 1;
        let record = &f.file[at..at + len];
        let data = &record[tapstream_pcap::RECORD_HEADER_LEN..];
        if (since..=until).contains(&ts) && options.filter.is_none_or(|p| p.matches(data, wire_len)) {
            out.write_all(record).map_err(io_err)?;
            stats.packets += 1;
        }
        match f.records.get(f.next) {
            Some(&(next_ts, ..)) => heap.push(Reverse((next_ts, source, frame, slot))),
            None => open[slot] = None,
        }
    }
    out.flush().map_err(io_err)?;
    Ok(stats)
}
