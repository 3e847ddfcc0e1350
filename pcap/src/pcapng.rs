//! Writing the pcapng format (as read by tshark, Wireshark, capinfos and tcpdump), for files
//! that hold frames of several interfaces and say what they are: where each frame came from,
//! the filter it passed, how many the capture dropped.
//!
//! A file is a Section Header Block ([`section_header`]), one Interface Description Block per
//! interface ([`interface_description`]; the first has id 0, the next 1, ...), the frames as
//! Enhanced Packet Blocks ([`enhanced_packet`]) and, at the end, an Interface Statistics Block
//! per interface ([`interface_statistics`]). Blocks are in the host's byte order (the section
//! header's magic tells readers which); every block and option value is padded to 32 bits;
//! timestamps are in nanoseconds (`if_tsresol` = 9 on every interface).

/// Block type of a Section Header Block.
pub const SECTION_HEADER: u32 = 0x0a0d_0d0a;
/// Block type of an Interface Description Block.
pub const INTERFACE_DESCRIPTION: u32 = 1;
/// Block type of an Interface Statistics Block.
pub const INTERFACE_STATISTICS: u32 = 5;
/// Block type of an Enhanced Packet Block.
pub const ENHANCED_PACKET: u32 = 6;
/// The section header's byte-order magic, as the writer's `u32`.
pub const BYTE_ORDER_MAGIC: u32 = 0x1a2b_3c4d;

/// Option codes (pcapng, section 3.5 and the blocks' own).
pub mod option {
    /// End of the options.
    pub const END: u16 = 0;
    /// A UTF-8 comment, in any block.
    pub const COMMENT: u16 = 1;
    /// `shb_userappl`: the application that wrote the section.
    pub const SHB_USERAPPL: u16 = 4;
    /// `if_name`, `if_description`.
    pub const IF_NAME: u16 = 2;
    pub const IF_DESCRIPTION: u16 = 3;
    /// `if_tsresol`: one byte, a power of ten (9: nanoseconds).
    pub const IF_TSRESOL: u16 = 9;
    /// `if_filter`: a first byte saying the kind (0: a libpcap filter string), then the filter.
    pub const IF_FILTER: u16 = 11;
    /// `isb_starttime`, `isb_endtime`: timestamps, as a packet's (high and low 32 bits).
    pub const ISB_STARTTIME: u16 = 2;
    pub const ISB_ENDTIME: u16 = 3;
    /// `isb_ifdrop`: packets the interface dropped, 64 bits.
    pub const ISB_IFDROP: u16 = 5;
    /// `isb_usrdeliv`: packets delivered to the user, 64 bits.
    pub const ISB_USRDELIV: u16 = 8;
}

/// The kind byte of an `if_filter` holding a libpcap filter string.
const FILTER_LIBPCAP: u8 = 0;

/// Length of an Enhanced Packet Block without its data and padding.
pub const ENHANCED_PACKET_OVERHEAD: usize = 32;

/// What an Interface Description Block says of one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    /// Link type (1 for Ethernet).
    pub linktype: u16,
    /// Largest number of bytes stored per frame.
    pub snaplen: u32,
    /// `if_name`.
    pub name: String,
    /// `if_description`.
    pub description: Option<String>,
    /// The tcpdump filter its frames passed (`if_filter`).
    pub filter: Option<String>,
    /// A comment.
    pub comment: Option<String>,
}

/// What an Interface Statistics Block says of one interface. Times in ns since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Statistics {
    /// When the statistics were taken.
    pub ts_ns: u64,
    pub start_ns: Option<u64>,
    pub end_ns: Option<u64>,
    /// Frames dropped (`isb_ifdrop`).
    pub dropped: Option<u64>,
    /// Frames written to this file (`isb_usrdeliv`).
    pub delivered: Option<u64>,
}

/// Builds one block: its type and length, the body, the options and the trailing length.
struct Block {
    bytes: Vec<u8>,
    options: bool,
}

impl Block {
    fn new(kind: u32) -> Self {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // the length, set by `finish`
        Self { bytes, options: false }
    }

    fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_ne_bytes());
        self
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_ne_bytes());
        self
    }

    /// `value`, then zeros to the next 32-bit boundary.
    fn padded(&mut self, value: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(value);
        self.bytes.resize(self.bytes.len().next_multiple_of(4), 0);
        self
    }

    /// An option whose value is the concatenation of `parts`. A value longer than an
    /// option can hold (64 KiB) is cut at a character boundary.
    fn option(&mut self, code: u16, parts: &[&[u8]]) -> &mut Self {
        let mut value: Vec<u8> = parts.concat();
        if value.len() > usize::from(u16::MAX) {
            let mut end = usize::from(u16::MAX);
            while end > 0 && (value[end] & 0xc0) == 0x80 {
                end -= 1;
            }
            value.truncate(end);
        }
        self.options = true;
        self.u16(code).u16(value.len() as u16).padded(&value)
    }

    fn text(&mut self, code: u16, text: Option<&str>) -> &mut Self {
        match text {
            Some(t) => self.option(code, &[t.as_bytes()]),
            None => self,
        }
    }

    fn u64_option(&mut self, code: u16, v: Option<u64>) -> &mut Self {
        match v {
            Some(v) => self.option(code, &[&v.to_ne_bytes()]),
            None => self,
        }
    }

    fn timestamp_option(&mut self, code: u16, ns: Option<u64>) -> &mut Self {
        match ns {
            Some(ns) => {
                let (high, low) = split(ns);
                self.option(code, &[&high.to_ne_bytes(), &low.to_ne_bytes()])
            }
            None => self,
        }
    }

    /// The end of the options (if there were any), and the length at both ends.
    fn finish(mut self) -> Vec<u8> {
        if self.options {
            self.u16(option::END).u16(0);
        }
        let len = self.bytes.len() as u32 + 4;
        self.bytes[4..8].copy_from_slice(&len.to_ne_bytes());
        self.u32(len);
        self.bytes
    }
}

/// A timestamp's high and low 32 bits.
fn split(ns: u64) -> (u32, u32) {
    ((ns >> 32) as u32, ns as u32)
}

/// A Section Header Block of a section of unknown length, naming `application`
/// (`shb_userappl`), with `comment` (`opt_comment`).
pub fn section_header(application: &str, comment: Option<&str>) -> Vec<u8> {
    let mut b = Block::new(SECTION_HEADER);
    b.u32(BYTE_ORDER_MAGIC).u16(1).u16(0);
    b.bytes.extend_from_slice(&(-1i64).to_ne_bytes());
    b.text(option::COMMENT, comment).text(option::SHB_USERAPPL, Some(application));
    b.finish()
}

/// An Interface Description Block for `interface`, with nanosecond timestamps.
pub fn interface_description(interface: &Interface) -> Vec<u8> {
    let mut b = Block::new(INTERFACE_DESCRIPTION);
    b.u16(interface.linktype).u16(0).u32(interface.snaplen);
    b.text(option::IF_NAME, Some(&interface.name))
        .text(option::IF_DESCRIPTION, interface.description.as_deref())
        .option(option::IF_TSRESOL, &[&[9]]);
    if let Some(filter) = &interface.filter {
        b.option(option::IF_FILTER, &[&[FILTER_LIBPCAP], filter.as_bytes()]);
    }
    b.text(option::COMMENT, interface.comment.as_deref());
    b.finish()
}

/// Appends to `out` an Enhanced Packet Block of interface `interface_id`: the frame `data`,
/// taken at `ts_ns` (ns since the Unix epoch), `origlen` bytes long on the wire.
#[inline]
pub fn enhanced_packet(out: &mut Vec<u8>, interface_id: u32, ts_ns: u64, data: &[u8], origlen: u32) {
    let padded = data.len().next_multiple_of(4);
    let len = (ENHANCED_PACKET_OVERHEAD + padded) as u32;
    let (high, low) = split(ts_ns);
    out.reserve(len as usize);
    for word in [ENHANCED_PACKET, len, interface_id, high, low, data.len() as u32, origlen] {
        out.extend_from_slice(&word.to_ne_bytes());
    }
    out.extend_from_slice(data);
    out.resize(out.len() + padded - data.len(), 0);
    out.extend_from_slice(&len.to_ne_bytes());
}

/// An Interface Statistics Block of interface `interface_id`.
pub fn interface_statistics(interface_id: u32, stats: &Statistics) -> Vec<u8> {
    let mut b = Block::new(INTERFACE_STATISTICS);
    let (high, low) = split(stats.ts_ns);
    b.u32(interface_id).u32(high).u32(low);
    b.timestamp_option(option::ISB_STARTTIME, stats.start_ns)
        .timestamp_option(option::ISB_ENDTIME, stats.end_ns)
        .u64_option(option::ISB_IFDROP, stats.dropped)
        .u64_option(option::ISB_USRDELIV, stats.delivered);
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn half(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes(b[at..at + 2].try_into().unwrap())
    }

    /// Checks a block's framing (a multiple of 4 long, the same length at both ends, of
    /// `kind`) and returns its options (code, value), read from `at` to the end option.
    fn options(block: &[u8], kind: u32, at: usize) -> Vec<(u16, Vec<u8>)> {
        assert_eq!(word(block, 0), kind);
        let len = word(block, 4) as usize;
        assert_eq!(len, block.len(), "the length counts the whole block");
        assert_eq!(len % 4, 0, "blocks are padded to 32 bits");
        assert_eq!(word(block, len - 4), len as u32, "the length again at the end");
        let mut out = Vec::new();
        let mut at = at;
        while at < len - 4 {
            let (code, n) = (half(block, at), usize::from(half(block, at + 2)));
            at += 4;
            if code == option::END {
                assert_eq!(n, 0);
                assert_eq!(at, len - 4, "the end option is the last");
                return out;
            }
            out.push((code, block[at..at + n].to_vec()));
            let padded = n.next_multiple_of(4);
            assert!(block[at + n..at + padded].iter().all(|b| *b == 0), "padding is zeros");
            at += padded;
        }
        assert!(out.is_empty(), "options end with the end option");
        out
    }

    #[test]
    fn section_header_layout() {
        let b = section_header("tapstream 0.1.0", Some("captures c1, c2"));
        assert_eq!(word(&b, 8), BYTE_ORDER_MAGIC);
        assert_eq!((half(&b, 12), half(&b, 14)), (1, 0), "version 1.0");
        assert_eq!(i64::from_ne_bytes(b[16..24].try_into().unwrap()), -1, "length not given");
        let opts = options(&b, SECTION_HEADER, 24);
        assert_eq!(
            opts,
            [
                (option::COMMENT, b"captures c1, c2".to_vec()),
                (option::SHB_USERAPPL, b"tapstream 0.1.0".to_vec())
            ]
        );
        // 28 bytes of header and trailer, a 15-byte comment in 4 + 16, 15 bytes again, the end.
        assert_eq!(b.len(), 28 + 20 + 20 + 4);
    }

    #[test]
    fn interface_description_layout() {
        let b = interface_description(&Interface {
            linktype: 1,
            snaplen: 262_144,
            name: "tap1/eth0".into(),
            description: Some("node tap1, device eth0".into()),
            filter: Some("tcp port 443".into()),
            comment: None,
        });
        assert_eq!((half(&b, 8), half(&b, 10), word(&b, 12)), (1, 0, 262_144));
        let opts = options(&b, INTERFACE_DESCRIPTION, 16);
        assert_eq!(
            opts,
            [
                (option::IF_NAME, b"tap1/eth0".to_vec()),
                (option::IF_DESCRIPTION, b"node tap1, device eth0".to_vec()),
                (option::IF_TSRESOL, vec![9]),
                (option::IF_FILTER, b"\0tcp port 443".to_vec()),
            ]
        );
        // No filter: no if_filter option.
        let bare =
            interface_description(&Interface { linktype: 1, name: "x".into(), ..Interface::default() });
        assert_eq!(options(&bare, INTERFACE_DESCRIPTION, 16).len(), 2);
    }

    #[test]
    fn enhanced_packets_are_padded_and_carry_ns_timestamps() {
        let ts = 1_795_000_000_123_456_789u64;
        for len in 0..9usize {
            let data: Vec<u8> = (1..=len as u8).collect();
            let mut out = vec![0xee]; // appended after what is there
            enhanced_packet(&mut out, 3, ts, &data, 1500);
            let b = &out[1..];
            assert_eq!(options(b, ENHANCED_PACKET, b.len() - 4), []);
            assert_eq!(b.len(), ENHANCED_PACKET_OVERHEAD + len.next_multiple_of(4));
            assert_eq!(word(b, 8), 3, "interface id");
            assert_eq!((u64::from(word(b, 12)) << 32) | u64::from(word(b, 16)), ts);
            assert_eq!((word(b, 20), word(b, 24)), (len as u32, 1500));
            assert_eq!(&b[28..28 + len], data);
            assert!(b[28 + len..b.len() - 4].iter().all(|b| *b == 0));
        }
    }

    #[test]
    fn interface_statistics_layout() {
        let stats = Statistics {
            ts_ns: 5 << 32 | 7,
            start_ns: Some(1 << 32 | 2),
            end_ns: None,
            dropped: Some(42),
            delivered: Some(1000),
        };
        let b = interface_statistics(2, &stats);
        assert_eq!((word(&b, 8), word(&b, 12), word(&b, 16)), (2, 5, 7));
        let mut start = 1u32.to_ne_bytes().to_vec();
        start.extend(2u32.to_ne_bytes());
        assert_eq!(
            options(&b, INTERFACE_STATISTICS, 20),
            [
                (option::ISB_STARTTIME, start),
                (option::ISB_IFDROP, 42u64.to_ne_bytes().to_vec()),
                (option::ISB_USRDELIV, 1000u64.to_ne_bytes().to_vec()),
            ]
        );
        // No statistics known: no options, and no end option either.
        let empty = interface_statistics(0, &Statistics::default());
        assert_eq!(empty.len(), 24);
        assert_eq!(options(&empty, INTERFACE_STATISTICS, 20), []);
    }

    #[test]
    fn an_overlong_value_is_cut_at_a_character() {
        let comment = "\u{e9}".repeat(40_000); // 80,000 bytes
        let b = section_header("t", Some(&comment));
        let opts = options(&b, SECTION_HEADER, 24);
        assert_eq!(opts[0].1.len(), 65_534);
        assert!(std::str::from_utf8(&opts[0].1).is_ok());
    }
}
