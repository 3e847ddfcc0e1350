//! The classic PCAP file format (as written by libpcap and read by tcpdump, tshark and
//! Wireshark).
//!
//! Writing: [`FileHeader::encode`] and [`RecordHeader::encode`] produce the bytes; tapstream
//! writes nanosecond-resolution files in the host's byte order, which every reader accepts.
//!
//! Reading: [`Reader`] walks a file held in memory. It accepts both byte orders and both time
//! resolutions, and treats the input as untrusted: a record whose length runs past the end or
//! exceeds the snapshot length is an error naming the record, never a panic or a huge
//! allocation.
//!
//! [`pcapng`] writes the newer pcapng format, whose files name their interfaces.

pub mod pcapng;

/// Magic number of a microsecond-resolution file, as the writer's `u32`.
pub const MAGIC_MICROS: u32 = 0xa1b2_c3d4;
/// Magic number of a nanosecond-resolution file, as the writer's `u32`.
pub const MAGIC_NANOS: u32 = 0xa1b2_3c4d;
/// Link type of Ethernet frames (`DLT_EN10MB`).
pub const LINKTYPE_ETHERNET: u32 = 1;
/// Length of the file header.
pub const FILE_HEADER_LEN: usize = 24;
/// Length of a record header.
pub const RECORD_HEADER_LEN: usize = 16;
/// The largest record length a reader accepts whatever the header's snaplen says (libpcap's
/// own limit for Ethernet is 262144).
pub const MAX_RECORD_LEN: u32 = 262_144;

/// The 24-byte header at the start of every PCAP file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    /// Largest number of bytes stored per frame.
    pub snaplen: u32,
    /// Link type of every record (1 for Ethernet).
    pub linktype: u32,
    /// Whether timestamps' fraction is in nanoseconds (else microseconds).
    pub nanos: bool,
}

impl FileHeader {
    /// The header's bytes, in the host's byte order.
    pub fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let magic = if self.nanos { MAGIC_NANOS } else { MAGIC_MICROS };
        let mut out = [0u8; FILE_HEADER_LEN];
        out[0..4].copy_from_slice(&magic.to_ne_bytes());
        out[4..6].copy_from_slice(&2u16.to_ne_bytes());
        out[6..8].copy_from_slice(&4u16.to_ne_bytes());
        // thiszone (8..12) and sigfigs (12..16) are zero.
        out[16..20].copy_from_slice(&self.snaplen.to_ne_bytes());
        out[20..24].copy_from_slice(&self.linktype.to_ne_bytes());
        out
    }
}

/// The 16-byte header before every frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Seconds since the Unix epoch.
    pub ts_sec: u32,
    /// Fraction of the second, in nanoseconds or microseconds as the file header says.
    pub ts_frac: u32,
    /// Bytes of the frame stored in the record.
    pub caplen: u32,
    /// Length of the frame on the wire.
    pub origlen: u32,
}

impl RecordHeader {
    /// The header of a frame received at `ts_ns` (nanoseconds since the Unix epoch) with
    /// `caplen` bytes stored of its `origlen` (never less than `caplen`).
    #[inline]
    pub fn at_nanos(ts_ns: u64, caplen: u32, origlen: u32) -> Self {
        Self {
            ts_sec: (ts_ns / 1_000_000_000) as u32,
            ts_frac: (ts_ns % 1_000_000_000) as u32,
            caplen,
            origlen: origlen.max(caplen),
        }
    }

    /// The timestamp in nanoseconds since the Unix epoch, for a nanosecond file.
    #[inline]
    pub fn ts_nanos(&self) -> u64 {
        u64::from(self.ts_sec) * 1_000_000_000 + u64::from(self.ts_frac)
    }

    /// The header's bytes, in the host's byte order.
    #[inline]
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut out = [0u8; RECORD_HEADER_LEN];
        out[0..4].copy_from_slice(&self.ts_sec.to_ne_bytes());
        out[4..8].copy_from_slice(&self.ts_frac.to_ne_bytes());
        out[8..12].copy_from_slice(&self.caplen.to_ne_bytes());
        out[12..16].copy_from_slice(&self.origlen.to_ne_bytes());
        out
    }

    /// A header as [`RecordHeader::encode`] wrote it (in the host's byte order).
    #[inline]
    pub fn decode(bytes: &[u8; RECORD_HEADER_LEN]) -> Self {
        let word = |at: usize| u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        Self { ts_sec: word(0), ts_frac: word(4), caplen: word(8), origlen: word(12) }
    }
}

/// Each (header, stored bytes) of a run of records without a file header, as tapstream's
/// writers make them (host byte order, nanoseconds); a record cut short ends the run.
pub fn records(mut bytes: &[u8]) -> impl Iterator<Item = (RecordHeader, &[u8])> {
    std::iter::from_fn(move || {
        let (head, rest) = bytes.split_first_chunk::<RECORD_HEADER_LEN>()?;
        let header = RecordHeader::decode(head);
        let (data, rest) = rest.split_at_checked(header.caplen as usize)?;
        bytes = rest;
        Some((header, data))
    })
}

/// What is wrong with a PCAP file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PcapError {
    #[error("not a PCAP file: {len} bytes, shorter than the 24-byte file header")]
    ShortHeader { len: usize },
    #[error("not a PCAP file: unknown magic number {magic:#010x}")]
    BadMagic { magic: u32 },
    #[error("record {index} at byte {offset}: header cut short by the end of the file")]
    ShortRecordHeader { index: u64, offset: usize },
    #[error(
        "record {index} at byte {offset}: stored length {caplen} runs past the end of the file ({remaining} bytes left)"
    )]
    ShortRecord { index: u64, offset: usize, caplen: u32, remaining: usize },
    #[error("record {index} at byte {offset}: stored length {caplen} is larger than the limit {limit}")]
    RecordTooLong { index: u64, offset: usize, caplen: u32, limit: u32 },
}

/// One frame read from a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Timestamp in nanoseconds since the Unix epoch (microsecond files are scaled).
    pub ts_nanos: u64,
    /// Length of the frame on the wire.
    pub origlen: u32,
    /// The stored bytes of the frame.
    pub data: &'a [u8],
    /// Offset of the record header in the file.
    pub offset: usize,
}

/// Reads the records of a PCAP file held in memory.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    header: FileHeader,
    big_endian: bool,
    bytes: &'a [u8],
    offset: usize,
    index: u64,
    failed: bool,
}

impl<'a> Reader<'a> {
    /// Parses the file header. Records are read by iterating.
    pub fn new(bytes: &'a [u8]) -> Result<Self, PcapError> {
        let head: [u8; FILE_HEADER_LEN] = bytes
            .get(..FILE_HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(PcapError::ShortHeader { len: bytes.len() })?;
        let magic_le = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let magic_be = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let (big_endian, nanos) = match (magic_le, magic_be) {
            (MAGIC_MICROS, _) => (false, false),
            (MAGIC_NANOS, _) => (false, true),
            (_, MAGIC_MICROS) => (true, false),
            (_, MAGIC_NANOS) => (true, true),
            _ => return Err(PcapError::BadMagic { magic: magic_be }),
        };
        let word = |at: usize| {
            let b = [head[at], head[at + 1], head[at + 2], head[at + 3]];
            if big_endian { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) }
        };
        let header = FileHeader { snaplen: word(16), linktype: word(20), nanos };
        Ok(Self { header, big_endian, bytes, offset: FILE_HEADER_LEN, index: 0, failed: false })
    }

    /// The file header.
    pub fn header(&self) -> FileHeader {
        self.header
    }

    fn word(&self, at: usize) -> u32 {
        let b = [self.bytes[at], self.bytes[at + 1], self.bytes[at + 2], self.bytes[at + 3]];
        if self.big_endian { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) }
    }

    fn next_record(&mut self) -> Result<Record<'a>, PcapError> {
        let (index, offset) = (self.index, self.offset);
        if self.bytes.len() - offset < RECORD_HEADER_LEN {
            return Err(PcapError::ShortRecordHeader { index, offset });
        }
        let ts_sec = self.word(offset);
        let ts_frac = self.word(offset + 4);
        let caplen = self.word(offset + 8);
        let origlen = self.word(offset + 12);
        if caplen > MAX_RECORD_LEN {
            return Err(PcapError::RecordTooLong { index, offset, caplen, limit: MAX_RECORD_LEN });
        }
        let start = offset + RECORD_HEADER_LEN;
        let remaining = self.bytes.len() - start;
        if caplen as usize > remaining {
            return Err(PcapError::ShortRecord { index, offset, caplen, remaining });
        }
        let data = &self.bytes[start..start + caplen as usize];
        let frac_nanos = if self.header.nanos { u64::from(ts_frac) } else { u64::from(ts_frac) * 1000 };
        self.offset = start + caplen as usize;
        self.index += 1;
        Ok(Record { ts_nanos: u64::from(ts_sec) * 1_000_000_000 + frac_nanos, origlen, data, offset })
    }
}

impl<'a> Iterator for Reader<'a> {
    type Item = Result<Record<'a>, PcapError>;

    /// The next record; after an error, `None`.
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.offset == self.bytes.len() {
            return None;
        }
        let record = self.next_record();
        self.failed = record.is_err();
        Some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_records_reads_back_until_one_is_cut_short() {
        let mut run = Vec::new();
        for (ts, data) in
            [(1_500_000_000_123_456_789u64, &b"abc"[..]), (1_500_000_001_000_000_000, &b"de"[..])]
        {
            run.extend_from_slice(&RecordHeader::at_nanos(ts, data.len() as u32, 60).encode());
            run.extend_from_slice(data);
        }
        let read: Vec<(u64, u32, Vec<u8>)> =
            records(&run).map(|(h, d)| (h.ts_nanos(), h.origlen, d.to_vec())).collect();
        assert_eq!(
            read,
            [
                (1_500_000_000_123_456_789, 60, b"abc".to_vec()),
                (1_500_000_001_000_000_000, 60, b"de".to_vec())
            ]
        );
        assert_eq!(records(&run[..run.len() - 1]).count(), 1, "the last record is cut short");
        assert_eq!(RecordHeader::at_nanos(0, 9, 3).origlen, 9, "never shorter than what is stored");
    }

    fn file(records: &[(&[u8], u32)]) -> Vec<u8> {
        let mut out =
            FileHeader { snaplen: 65535, linktype: LINKTYPE_ETHERNET, nanos: true }.encode().to_vec();
        for (i, (data, origlen)) in records.iter().enumerate() {
            let header = RecordHeader {
                ts_sec: 10 + i as u32,
                ts_frac: 5,
                caplen: data.len() as u32,
                origlen: *origlen,
            };
            out.extend_from_slice(&header.encode());
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn round_trip() {
        let bytes = file(&[(b"abc", 3), (b"defg", 100)]);
        let records: Vec<_> = Reader::new(&bytes).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].data, b"abc");
        assert_eq!(records[0].ts_nanos, 10_000_000_005);
        assert_eq!(records[1].origlen, 100);
        assert_eq!(records[1].offset, FILE_HEADER_LEN + RECORD_HEADER_LEN + 3);
        let header = RecordHeader { ts_sec: 1, ts_frac: 2, caplen: 3, origlen: 4 };
        assert_eq!(RecordHeader::decode(&header.encode()), header);
    }

    #[test]
    fn big_endian_micros() {
        let mut bytes =
            vec![0xa1, 0xb2, 0xc3, 0xd4, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 1];
        bytes.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1, 0xaa]);
        let mut reader = Reader::new(&bytes).unwrap();
        assert_eq!(reader.header(), FileHeader { snaplen: 65535, linktype: 1, nanos: false });
        let record = reader.next().unwrap().unwrap();
        assert_eq!(record.ts_nanos, 1_000_002_000);
        assert_eq!(record.data, &[0xaa]);
        assert!(reader.next().is_none());
    }

    #[test]
    fn truncated_and_absurd_records_are_errors() {
        let mut bytes = file(&[(b"abcdef", 6)]);
        bytes.truncate(bytes.len() - 2);
        let err = Reader::new(&bytes).unwrap().next().unwrap().unwrap_err();
        assert_eq!(err, PcapError::ShortRecord { index: 0, offset: 24, caplen: 6, remaining: 4 });

        let mut bytes = file(&[]);
        bytes.extend_from_slice(
            &RecordHeader { ts_sec: 0, ts_frac: 0, caplen: u32::MAX, origlen: 1 }.encode(),
        );
        let err = Reader::new(&bytes).unwrap().next().unwrap().unwrap_err();
        assert!(matches!(err, PcapError::RecordTooLong { caplen: u32::MAX, .. }), "{err}");

        let mut bytes = file(&[]);
        bytes.extend_from_slice(&[1, 2, 3]);
        let mut reader = Reader::new(&bytes).unwrap();
        assert_eq!(
            reader.next().unwrap().unwrap_err(),
            PcapError::ShortRecordHeader { index: 0, offset: 24 }
        );
        assert!(reader.next().is_none(), "a reader stops after an error");

        assert_eq!(Reader::new(b"short").unwrap_err(), PcapError::ShortHeader { len: 5 });
        assert!(matches!(Reader::new(&[0u8; 24]).unwrap_err(), PcapError::BadMagic { .. }));
    }
}
