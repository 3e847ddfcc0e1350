//! Reading captures back: one object, all of it or only the frames of a time window, fetched
//! with ranged GETs through the index beside the object ([`read_window`]); or every frame of
//! the captures the catalog lists, across nodes, captures and objects, merged in timestamp
//! order and filtered in user space ([`read_captures`]). Either writes PCAP (the records as
//! stored), or pcapng ([`Format`]): one interface per node and interface, named `node/interface`,
//! with the capture's filter, and its drops in the statistics at the end.

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
use tapstream_pcap::pcapng;

/// The file format a read writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Classic PCAP: the records as stored, after one file header.
    #[default]
    Pcap,
    /// pcapng, whose section comment is this (what was read, and why).
    Pcapng { comment: String },
}

/// One interface of a pcapng file: the frames of one interface of one node, over the captures
/// read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadInterface {
    /// `node/interface` (the interface as the request named it); for an object with no
    /// manifest, its key.
    pub name: String,
    /// The node, the device and the captures.
    pub description: String,
    /// The tcpdump filter its frames passed: the captures' (if they all had the same one),
    /// and the read's.
    pub filter: Option<String>,
    pub snaplen: u32,
    /// Frames the captures dropped; none if not known (a capture still running, or one over
    /// several interfaces that dropped some: its drops are not counted per interface).
    pub dropped: Option<u64>,
    /// When the first capture started and the last ended (none while one runs).
    pub start_ns: Option<u64>,
    pub end_ns: Option<u64>,
    /// What the figures above do not say.
    pub comment: Option<String>,
}

/// The interfaces of `captures` for a pcapng file whose frames also passed `read_filter`, and
/// for each capture, the interface (index in the first) of each of its objects.
pub fn read_interfaces(
    captures: &[Manifest],
    read_filter: Option<&str>,
) -> (Vec<ReadInterface>, Vec<Vec<u32>>) {
    /// What is known of an interface's captures.
    #[derive(Default)]
    struct Seen {
        /// The node and the interface (empty for an object with no manifest).
        node: String,
        alias: String,
        captures: Vec<String>,
        filters: Vec<Option<String>>,
        devices: Vec<String>,
        notes: Vec<String>,
    }
    let mut interfaces: Vec<ReadInterface> = Vec::new();
    let mut seen: Vec<Seen> = Vec::new();
    let mut of_objects = Vec::new();
    for m in captures {
        let aliases: Vec<(String, String)> = match m.interfaces.as_slice() {
            [] => vec![(String::new(), String::new())],
            list => list.iter().map(|i| (i.alias.clone(), i.device.clone())).collect(),
        };
        let name_of = |alias: &str| match (m.node.as_str(), alias) {
            ("", "") => m.capture_id.clone(),
            (node, alias) => format!("{node}/{alias}"),
        };
        let mut ids = Vec::new();
        for (alias, device) in &aliases {
            let name = name_of(alias);
            let id = interfaces.iter().position(|i| i.name == name).unwrap_or_else(|| {
                interfaces.push(ReadInterface {
                    name: name.clone(),
                    dropped: Some(0),
                    ..ReadInterface::default()
                });
                seen.push(Seen { node: m.node.clone(), alias: alias.clone(), ..Seen::default() });
                interfaces.len() - 1
            });
            let i = &mut interfaces[id];
            i.snaplen = i.snaplen.max(m.snaplen);
            i.dropped = match (i.dropped, m.drops) {
                (_, None) => None,
                (known, Some(0)) => known,
                (known, Some(n)) if aliases.len() == 1 => known.map(|a| a + n),
                (_, Some(n)) => {
                    seen[id].notes.push(format!(
                        "capture {} dropped {n} frames over its {} interfaces",
                        m.capture_id,
                        aliases.len()
                    ));
                    None
                }
            };
            if m.start_ns > 0 {
                i.start_ns = Some(i.start_ns.map_or(m.start_ns, |s| s.min(m.start_ns)));
            }
            let seen = &mut seen[id];
            i.end_ns = match (seen.captures.is_empty(), i.end_ns, m.end_ns) {
                (true, _, end) => end,
                (false, Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
            seen.captures.push(m.capture_id.clone());
            seen.filters.push(m.filter.clone());
            if !device.is_empty() && !seen.devices.contains(device) {
                seen.devices.push(device.clone());
            }
            ids.push((alias.clone(), id as u32));
        }
        let default = ids[0].1;
        of_objects.push(
            m.objects
                .iter()
                .map(|o| {
                    o.interface
                        .as_ref()
                        .and_then(|name| ids.iter().find(|(alias, _)| alias == name))
                        .map_or(default, |(_, id)| *id)
                })
                .collect(),
        );
    }
    for (i, Seen { node, alias, captures: ids, filters, devices, notes }) in interfaces.iter_mut().zip(seen) {
        let mut description = match (node.as_str(), devices.as_slice()) {
            ("", _) if alias.is_empty() => format!("object {}", i.name),
            (_, []) => format!("interface {alias} of node {node}"),
            (_, d) => format!("interface {alias} (device {}) of node {node}", d.join(", ")),
        };
        description.push_str(&format!(
            "; capture{} {}",
            if ids.len() == 1 { "" } else { "s" },
            ids.join(", ")
        ));
        i.description = description;
        if filters.iter().all(|f| *f == filters[0]) {
            i.filter = match (&filters[0], read_filter) {
                (Some(f), Some(r)) => Some(format!("({f}) and ({r})")),
                (None, Some(r)) => Some(r.to_owned()),
                (f, None) => f.clone(),
            };
        } else {
            let each: Vec<String> = ids
                .iter()
                .zip(&filters)
                .map(|(id, f)| format!("{id}: {}", f.as_deref().unwrap_or("(every frame)")))
                .collect();
            i.comment = Some(format!("the captures had different filters: {}", each.join("; ")));
        }
        if !notes.is_empty() {
            let note = notes.join("; ");
            i.comment = Some(match i.comment.take() {
                Some(c) => format!("{c}; {note}"),
                None => note,
            });
        }
    }
    (interfaces, of_objects)
}

/// The section comment of a pcapng file of `captures`: `asked` (what was read), then the
/// captures with their nodes, and the requests, alerts and customers they were for.
pub fn section_comment(asked: &str, captures: &[Manifest]) -> String {
    let mut parts = vec![asked.to_owned()];
    let list = |name: &str, values: Vec<String>| {
        let mut unique: Vec<String> = Vec::new();
        for v in values {
            if !unique.contains(&v) {
                unique.push(v);
            }
        }
        (!unique.is_empty()).then(|| format!("{name} {}", unique.join(", ")))
    };
    let ids = captures
        .iter()
        .map(|m| match m.node.as_str() {
            "" => m.capture_id.clone(),
            node => format!("{} (node {node})", m.capture_id),
        })
        .collect();
    parts.extend(list("captures", ids));
    parts.extend(list("requests", captures.iter().filter_map(|m| m.request_id.clone()).collect()));
    parts.extend(list("alerts", captures.iter().filter_map(|m| m.alert_id.clone()).collect()));
    parts.extend(list("customers", captures.iter().filter_map(|m| m.customer.clone()).collect()));
    parts.join("; ")
}

/// Writes what a read selects: the PCAP records as stored after one file header, or pcapng
/// blocks (a section header, the interfaces, a packet block per record, the statistics).
struct FrameWriter<'w, W: Write> {
    out: &'w mut W,
    pcapng: Option<PcapngState>,
}

struct PcapngState {
    comment: String,
    interfaces: Vec<ReadInterface>,
    /// Records written per interface.
    written: Vec<u64>,
    /// The block being written.
    block: Vec<u8>,
}

impl<'w, W: Write> FrameWriter<'w, W> {
    fn new(out: &'w mut W, format: Format, interfaces: Vec<ReadInterface>) -> Self {
        let pcapng = match format {
            Format::Pcap => None,
            Format::Pcapng { comment } => Some(PcapngState {
                comment,
                written: vec![0; interfaces.len()],
                interfaces,
                block: Vec::new(),
            }),
        };
        Self { out, pcapng }
    }

    /// The file's head: the PCAP file header `encoded`, or the section header and interfaces
    /// (of the link type `header` gives, and its snaplen if theirs is not known).
    fn head(&mut self, header: &tapstream_pcap::FileHeader, encoded: &[u8]) -> std::io::Result<()> {
        let Some(ng) = &self.pcapng else { return self.out.write_all(encoded) };
        let application = concat!("tapstream ", env!("CARGO_PKG_VERSION"));
        self.out.write_all(&pcapng::section_header(application, Some(&ng.comment)))?;
        for i in &ng.interfaces {
            let block = pcapng::interface_description(&pcapng::Interface {
                linktype: header.linktype as u16,
                snaplen: if i.snaplen > 0 { i.snaplen } else { header.snaplen },
                name: i.name.clone(),
                description: Some(i.description.clone()),
                filter: i.filter.clone(),
                comment: i.comment.clone(),
            });
            self.out.write_all(&block)?;
        }
        Ok(())
    }

    /// One record (its PCAP header first) of `interface`, taken at `ts_ns`, `wire_len` long.
    #[inline]
    fn record(&mut self, interface: u32, ts_ns: u64, wire_len: u32, record: &[u8]) -> std::io::Result<()> {
        let Some(ng) = &mut self.pcapng else { return self.out.write_all(record) };
        ng.block.clear();
        let data = &record[tapstream_pcap::RECORD_HEADER_LEN..];
        pcapng::enhanced_packet(&mut ng.block, interface, ts_ns, data, wire_len);
        ng.written[interface as usize] += 1;
        self.out.write_all(&ng.block)
    }

    /// The statistics of each interface (pcapng), and the flush.
    fn finish(&mut self) -> std::io::Result<()> {
        if let Some(ng) = &self.pcapng {
            let now = crate::sys::unix_now_ns();
            for (id, (i, written)) in ng.interfaces.iter().zip(&ng.written).enumerate() {
                let stats = pcapng::Statistics {
                    ts_ns: i.end_ns.unwrap_or(now),
                    start_ns: i.start_ns,
                    end_ns: i.end_ns,
                    dropped: i.dropped,
                    delivered: Some(*written),
                };
                self.out.write_all(&pcapng::interface_statistics(id as u32, &stats))?;
            }
        }
        self.out.flush()
    }
}

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
/// In pcapng, the object is one interface named by its key.
pub async fn read_window<S: Sink>(
    sink: &S,
    key: &str,
    since: u64,
    until: u64,
    format: Format,
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
    let file_header = tapstream_pcap::Reader::new(&header)
        .map_err(|e| store_error("read object", key, format!("no PCAP header: {e}")))?
        .header();
    let interface = ReadInterface {
        name: key.to_owned(),
        description: format!("object {key}; capture {}", index.capture_id),
        ..ReadInterface::default()
    };
    let mut out = FrameWriter::new(out, format, vec![interface]);
    // The object's own header, as stored.
    out.head(&file_header, &header).map_err(io_err)?;

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
                    out.record(0, record.ts_nanos, record.origlen, &file[pos..pos + len]).map_err(io_err)?;
                    stats.packets += 1;
                }
                pos += len;
            }
        }
        i = j + 1;
    }
    out.finish().map_err(io_err)?;
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
    pub format: Format,
}

/// An object with frames in the window.
struct Source {
    key: String,
    compression: Compression,
    /// Its PCAP file header, decompressed.
    header: Vec<u8>,
    /// The interface of its frames, in pcapng.
    interface: u32,
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
    let (interfaces, of_objects) = read_interfaces(captures, options.filter.map(|p| p.expression()));
    let objects = captures.iter().zip(&of_objects).flat_map(|(m, ids)| m.objects.iter().zip(ids));
    for (object, &interface) in objects {
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
        sources.push(Source {
            key: object.key.clone(),
            compression: index.compression,
            header: file_header,
            interface,
        });
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
    let mut out = FrameWriter::new(out, options.format.clone(), interfaces);
    out.head(&header, &header.encode()).map_err(io_err)?;
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
            out.record(sources[source].interface, ts, wire_len, record).map_err(io_err)?;
            stats.packets += 1;
        }
        match f.records.get(f.next) {
            Some(&(next_ts, ..)) => heap.push(Reverse((next_ts, source, frame, slot))),
            None => open[slot] = None,
        }
    }
    out.finish().map_err(io_err)?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::catalog::{ManifestInterface, ManifestObject};

    fn capture(id: &str, node: &str, aliases: &[&str], drops: Option<u64>, filter: Option<&str>) -> Manifest {
        Manifest {
            capture_id: id.into(),
            node: node.into(),
            interfaces: aliases
                .iter()
                .map(|a| ManifestInterface { alias: (*a).into(), device: format!("dev-{a}") })
                .collect(),
            filter: filter.map(Into::into),
            snaplen: 1500,
            start_ns: 100,
            end_ns: drops.map(|_| 200),
            drops,
            objects: aliases
                .iter()
                .map(|a| ManifestObject {
                    key: format!("{id}/{a}"),
                    interface: (aliases.len() > 1).then(|| (*a).into()),
                    ..ManifestObject::default()
                })
                .collect(),
            ..Manifest::default()
        }
    }

    #[test]
    fn one_interface_per_node_and_interface_with_the_captures_drops() {
        let captures = [
            capture("c1", "n1", &["eth0"], Some(3), Some("tcp")),
            capture("c2", "n1", &["eth0"], Some(4), Some("tcp")),
            capture("c3", "n2", &["eth0", "eth1"], Some(5), None),
            capture("c4", "n3", &["eth0", "eth1"], Some(0), Some("udp")),
            capture("c5", "n4", &["eth0"], None, Some("udp")),
            capture("c6", "n5", &["eth0"], Some(0), Some("udp")),
            capture("c7", "n5", &["eth0"], Some(0), None),
        ];
        let (interfaces, of_objects) = read_interfaces(&captures, None);
        let names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["n1/eth0", "n2/eth0", "n2/eth1", "n3/eth0", "n3/eth1", "n4/eth0", "n5/eth0"]);
        assert_eq!(of_objects, [vec![0], vec![0], vec![1, 2], vec![3, 4], vec![5], vec![6], vec![6]]);
        // The read's filter: beside the captures' own.
        let (filtered, _) = read_interfaces(&captures, Some("port 53"));
        assert_eq!(filtered[0].filter.as_deref(), Some("(tcp) and (port 53)"));
        assert_eq!(filtered[1].filter.as_deref(), Some("port 53"));
        assert_eq!(filtered[6].filter, None, "different filters: said in the comment");
        // An object with no manifest (written before the catalog): an interface named by its key.
        let old = Manifest {
            capture_id: "p/n/c/x.pcap.zst".into(),
            objects: vec![ManifestObject::default()],
            ..Manifest::default()
        };
        let (unknown, of_unknown) = read_interfaces(&[old], None);
        assert_eq!(unknown[0].name, "p/n/c/x.pcap.zst");
        assert_eq!(unknown[0].description, "object p/n/c/x.pcap.zst; capture p/n/c/x.pcap.zst");
        assert_eq!((unknown[0].dropped, unknown[0].start_ns), (None, None));
        assert_eq!(of_unknown, [vec![0]]);
        let n1 = &interfaces[0];
        assert_eq!((n1.dropped, n1.filter.as_deref(), n1.comment.as_deref()), (Some(7), Some("tcp"), None));
        assert_eq!(n1.description, "interface eth0 (device dev-eth0) of node n1; captures c1, c2");
        assert_eq!((n1.start_ns, n1.end_ns, n1.snaplen), (Some(100), Some(200), 1500));
        // Drops over two interfaces are not split: unknown on each, and said.
        assert_eq!(interfaces[1].dropped, None);
        assert!(interfaces[2].comment.as_deref().unwrap().contains("capture c3 dropped 5 frames over its 2"));
        // None dropped over two interfaces: none on each.
        assert_eq!((interfaces[3].dropped, interfaces[4].dropped), (Some(0), Some(0)));
        // Still running: drops and end unknown.
        assert_eq!((interfaces[5].dropped, interfaces[5].end_ns), (None, None));
        // Different filters on one interface: none given, each named in the comment.
        assert_eq!(interfaces[6].filter, None);
        assert_eq!(
            interfaces[6].comment.as_deref(),
            Some("the captures had different filters: c6: udp; c7: (every frame)")
        );
    }

    #[test]
    fn the_section_comment_names_the_captures_requests_and_alerts() {
        let mut a = capture("c1", "n1", &["eth0"], Some(0), None);
        a.alert_id = Some("A-1".into());
        a.request_id = Some("r-9".into());
        a.customer = Some("acme".into());
        let mut b = capture("c2", "n2", &["eth0"], Some(0), None);
        b.alert_id = Some("A-1".into());
        assert_eq!(
            section_comment("tapstream read s3://b/p", &[a, b]),
            "tapstream read s3://b/p; captures c1 (node n1), c2 (node n2); requests r-9; alerts A-1; customers acme"
        );
    }
}
