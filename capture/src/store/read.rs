//! Reading a capture object back: all of it, or only the frames of a time window, fetched with
//! ranged GETs through the index beside the object.

use std::io::Write;

use super::{Sink, UploadError, object::index_key};
use crate::store::compress::{Index, decompress_frame};

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
