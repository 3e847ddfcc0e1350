//! Compression of PCAP chunks for objects.
//!
//! Each chunk becomes one independent zstd frame, so each part of an object decompresses on its
//! own and a reader can fetch only the frames it needs. An object is: a frame holding the PCAP
//! file header, one frame per chunk, and a seek table in zstd's seekable format (a skippable
//! frame, which plain `zstd -d` ignores, so `zstd -d` of an object is a valid PCAP file). An
//! index object beside it ([`Index`]) lists every frame with its offset, sizes, first and last
//! timestamp and record count, for time-window reads with ranged GETs.
//!
//! With [`Compression::None`] the "frames" are the raw bytes and there is no seek table: the
//! object is a plain PCAP file, and the index still lists the chunks.

use serde::{Deserialize, Serialize};

/// Magic number of a zstd skippable frame holding a seek table.
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
/// Magic number ending a seek table.
const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
/// Bytes of the seek table footer: frame count, descriptor, magic.
const FOOTER_LEN: usize = 9;

/// How chunks are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "codec")]
pub enum Compression {
    /// Plain PCAP.
    None,
    /// zstd at a level (1-19; 3 is zstd's default).
    Zstd { level: i32 },
}

impl Default for Compression {
    fn default() -> Self {
        Self::Zstd { level: 3 }
    }
}

impl Compression {
    /// The object name suffix.
    pub fn extension(self) -> &'static str {
        match self {
            Self::None => "pcap",
            Self::Zstd { .. } => "pcap.zst",
        }
    }
}

/// zstd levels that follow the compression backlog (`compression = "auto"`): a compression
/// thread takes the fastest level at once when chunks fill its queue, one level faster for
/// each chunk it finds waiting, and one level stronger for each chunk it finds none waiting.
/// So compression keeps up with the capture (a faster level rather than a lost frame) and is
/// as strong as the time it has allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adaptive {
    /// The fastest level (zstd's negative levels trade ratio for speed).
    pub fastest: i32,
    /// The strongest level.
    pub strongest: i32,
}

impl Adaptive {
    /// `compression = "auto"`'s range.
    pub const AUTO: Self = Self { fastest: -5, strongest: 6 };
    /// The level a thread starts at: zstd's default.
    pub const START: i32 = 3;

    /// The level for the next chunk, after `level`, with `waiting` chunks queued for the
    /// compression threads out of `capacity`.
    pub fn next(self, level: i32, waiting: usize, capacity: usize) -> i32 {
        if waiting >= capacity.max(1) {
            self.fastest
        } else if waiting > 0 {
            (level - 1).max(self.fastest)
        } else {
            (level + 1).min(self.strongest)
        }
    }
}

/// Chunks compressed at each zstd level, over a capture's compression threads.
#[derive(Debug, Default)]
pub struct LevelCounts(std::sync::Mutex<std::collections::BTreeMap<i32, u64>>);

impl LevelCounts {
    pub fn add(&self, level: i32) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(level).or_default() += 1;
    }

    pub fn snapshot(&self) -> std::collections::BTreeMap<i32, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Errors of compression and of reading compressed objects.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("zstd failed")]
    Zstd(#[source] std::io::Error),
    #[error("the object has no valid seek table: {reason}")]
    SeekTable { reason: &'static str },
    #[error("frame {index} decompresses to {actual} bytes, the index says {expected}")]
    FrameSize { index: usize, expected: u64, actual: u64 },
}

/// One frame of an object as the index lists it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameEntry {
    /// Offset of the frame in the object.
    pub offset: u64,
    /// Bytes of the frame in the object.
    pub length: u64,
    /// Bytes it decompresses to.
    pub decompressed_length: u64,
    /// Timestamp (ns since the Unix epoch) of its first record; 0 for the header frame.
    pub first_ns: u64,
    /// Timestamp of its last record.
    pub last_ns: u64,
    /// Records in it.
    pub packets: u64,
}

/// The index object stored beside each capture object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Format version.
    pub version: u32,
    /// Key of the object this indexes.
    pub object: String,
    /// Capture id.
    pub capture_id: String,
    /// How the frames are stored.
    pub compression: Compression,
    /// Frames in object order; the first holds the PCAP file header.
    pub frames: Vec<FrameEntry>,
    /// Bytes of the object, seek table included.
    pub object_length: u64,
}

impl Index {
    /// Frames (besides the header frame) that may hold records in `[since, until]` (ns).
    pub fn frames_in(&self, since: u64, until: u64) -> impl Iterator<Item = (usize, &FrameEntry)> {
        self.frames
            .iter()
            .enumerate()
            .skip(1)
            .filter(move |(_, f)| f.packets > 0 && f.last_ns >= since && f.first_ns <= until)
    }
}

/// Compresses chunks; keeps a zstd context between calls.
pub struct Compressor {
    compression: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Compressor {
    /// A compressor for `compression`.
    pub fn new(compression: Compression) -> Result<Self, CompressError> {
        let zstd = match compression {
            Compression::None => None,
            Compression::Zstd { level } => {
                let mut c = zstd::bulk::Compressor::new(level).map_err(CompressError::Zstd)?;
                c.include_contentsize(true).map_err(CompressError::Zstd)?;
                c.include_checksum(true).map_err(CompressError::Zstd)?;
                Some(c)
            }
        };
        Ok(Self { compression, zstd })
    }

    /// Changes the zstd level of the next frames (nothing for uncompressed objects).
    pub fn set_level(&mut self, level: i32) -> Result<(), CompressError> {
        if let Some(c) = &mut self.zstd {
            c.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))
                .map_err(CompressError::Zstd)?;
        }
        Ok(())
    }

    /// `data` as one independent frame.
    pub fn frame(&mut self, data: &[u8]) -> Result<Vec<u8>, CompressError> {
        match &mut self.zstd {
            None => Ok(data.to_vec()),
            Some(c) => c.compress(data).map_err(CompressError::Zstd),
        }
    }

    /// How the frames are stored.
    pub fn compression(&self) -> Compression {
        self.compression
    }
}

/// The seek table (a zstd skippable frame) for `frames`, to end an object with; empty for
/// uncompressed objects.
pub fn seek_table(compression: Compression, frames: &[FrameEntry]) -> Vec<u8> {
    if compression == Compression::None {
        return Vec::new();
    }
    let content = frames.len() * 8 + FOOTER_LEN;
    let mut out = Vec::with_capacity(8 + content);
    out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&(content as u32).to_le_bytes());
    for f in frames {
        out.extend_from_slice(&(f.length as u32).to_le_bytes());
        out.extend_from_slice(&(f.decompressed_length as u32).to_le_bytes());
    }
    out.extend_from_slice(&(frames.len() as u32).to_le_bytes());
    out.push(0); // descriptor: no checksums in the table (each frame carries its own)
    out.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
    out
}

/// Reads the seek table at the end of `object`: (compressed, decompressed) size per frame.
pub fn parse_seek_table(object: &[u8]) -> Result<Vec<(u32, u32)>, CompressError> {
    let bad = |reason| CompressError::SeekTable { reason };
    if object.len() < 8 + FOOTER_LEN {
        return Err(bad("object shorter than a seek table"));
    }
    let footer = &object[object.len() - FOOTER_LEN..];
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    if u32_at(footer, 5) != SEEKABLE_MAGIC {
        return Err(bad("no seekable magic number at the end"));
    }
    if footer[4] & 0x7c != 0 {
        return Err(bad("reserved descriptor bits set"));
    }
    let entry_len = if footer[4] & 0x80 != 0 { 12 } else { 8 };
    let count = u32_at(footer, 0) as usize;
    let table_len = count
        .checked_mul(entry_len)
        .and_then(|n| n.checked_add(8 + FOOTER_LEN))
        .ok_or(bad("frame count too large"))?;
    if table_len > object.len() {
        return Err(bad("frame count larger than the object"));
    }
    let table = &object[object.len() - table_len..];
    if u32_at(table, 0) != SKIPPABLE_MAGIC || u32_at(table, 4) as usize != table_len - 8 {
        return Err(bad("skippable frame header does not match the footer"));
    }
    Ok((0..count).map(|i| (u32_at(table, 8 + i * entry_len), u32_at(table, 12 + i * entry_len))).collect())
}

/// Decompresses one frame of an object, checking its size against the index.
pub fn decompress_frame(
    compression: Compression,
    index: usize,
    entry: &FrameEntry,
    bytes: &[u8],
) -> Result<Vec<u8>, CompressError> {
    let out = match compression {
        Compression::None => bytes.to_vec(),
        Compression::Zstd { .. } => {
            zstd::bulk::decompress(bytes, entry.decompressed_length as usize).map_err(CompressError::Zstd)?
        }
    };
    if out.len() as u64 != entry.decompressed_length {
        return Err(CompressError::FrameSize {
            index,
            expected: entry.decompressed_length,
            actual: out.len() as u64,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_level_follows_the_backlog_within_its_range() {
        let a = Adaptive::AUTO;
        assert_eq!(a.next(3, 4, 4), a.fastest, "a full queue: the fastest at once");
        assert_eq!(a.next(3, 1, 4), 2, "chunks waiting: one level faster");
        assert_eq!(a.next(a.fastest, 3, 4), a.fastest);
        assert_eq!(a.next(3, 0, 4), 4, "none waiting: one level stronger");
        assert_eq!(a.next(a.strongest, 0, 4), a.strongest);
        let mut c = Compressor::new(Compression::Zstd { level: 3 }).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 97) as u8).collect();
        for level in [a.fastest, -1, 1, a.strongest, 19] {
            c.set_level(level).unwrap();
            assert_eq!(
                zstd::bulk::decompress(&c.frame(&data).unwrap(), data.len()).unwrap(),
                data,
                "{level}"
            );
        }
    }

    fn object(compression: Compression, parts: &[&[u8]]) -> (Vec<u8>, Vec<FrameEntry>) {
        let mut c = Compressor::new(compression).unwrap();
        let mut object = Vec::new();
        let mut frames = Vec::new();
        for p in parts {
            let f = c.frame(p).unwrap();
            frames.push(FrameEntry {
                offset: object.len() as u64,
                length: f.len() as u64,
                decompressed_length: p.len() as u64,
                ..FrameEntry::default()
            });
            object.extend_from_slice(&f);
        }
        object.extend_from_slice(&seek_table(compression, &frames));
        (object, frames)
    }

    #[test]
    fn frames_decompress_alone_and_together() {
        let parts: [&[u8]; 3] = [b"header..", &[7u8; 100_000], b"tail records"];
        let (obj, frames) = object(Compression::Zstd { level: 3 }, &parts);
        // As a whole, with the seek table skipped, like `zstd -d`.
        let all = zstd::stream::decode_all(&obj[..]).unwrap();
        assert_eq!(all, parts.concat());
        // Each frame alone, from its offset.
        for (i, (f, p)) in frames.iter().zip(parts).enumerate() {
            let bytes = &obj[f.offset as usize..(f.offset + f.length) as usize];
            assert_eq!(decompress_frame(Compression::Zstd { level: 3 }, i, f, bytes).unwrap(), p);
        }
        let table = parse_seek_table(&obj).unwrap();
        assert_eq!(
            table,
            frames.iter().map(|f| (f.length as u32, f.decompressed_length as u32)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn uncompressed_objects_are_the_plain_bytes() {
        let (obj, _) = object(Compression::None, &[b"ab", b"cd"]);
        assert_eq!(obj, b"abcd");
    }

    #[test]
    fn damaged_seek_tables_are_refused_not_trusted() {
        let (obj, _) = object(Compression::Zstd { level: 1 }, &[b"x".as_slice(), b"y", b"z"]);
        for cut in [1, 5, 9, obj.len() - 3] {
            assert!(parse_seek_table(&obj[..obj.len() - cut]).is_err(), "cut {cut}");
        }
        let mut huge = obj.clone();
        let n = huge.len();
        huge[n - 9..n - 5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse_seek_table(&huge), Err(CompressError::SeekTable { .. })));
        assert!(parse_seek_table(&[]).is_err());
    }
}
