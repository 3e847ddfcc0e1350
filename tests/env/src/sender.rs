//! Sends frames into the sender end of a veth pair through an `AF_PACKET` socket, and reads
//! the corpus of real captures to send.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use crate::{VethPair, corpus_dir};

/// A raw socket bound to the sender end of a veth pair.
#[derive(Debug)]
pub struct Sender {
    fd: OwnedFd,
    max_frame_len: usize,
}

/// One frame of a corpus file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorpusFrame {
    /// The file it came from.
    pub file: PathBuf,
    /// Its index in that file.
    pub index: usize,
    /// The stored bytes (what is sent).
    pub data: Vec<u8>,
}

impl Sender {
    /// Opens a raw socket in the sender namespace, bound to the sender interface.
    pub fn new(veth: &VethPair) -> Self {
        let ifname = CString::new(veth.sender_if.as_str()).expect("interface name");
        let fd = veth.sender_ns.enter(|| {
            // SAFETY: plain socket(2) call; the returned descriptor is owned below.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            assert!(raw >= 0, "socket(AF_PACKET): {}", io::Error::last_os_error());
            // SAFETY: `raw` is a fresh descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: `ifname` is a valid NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            assert_ne!(ifindex, 0, "no interface {ifname:?} in the sender namespace");
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            // SAFETY: `addr` is a valid sockaddr_ll of the length passed.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind AF_PACKET to {ifname:?}: {}", io::Error::last_os_error());
            fd
        });
        Self { fd, max_frame_len: veth.max_frame_len() }
    }

    /// Whether a frame can cross the veth unchanged: at least an Ethernet header (the kernel
    /// pads shorter ones) and no longer than the MTU allows.
    pub fn can_send(&self, frame: &[u8]) -> bool {
        (14..=self.max_frame_len).contains(&frame.len())
    }

    /// Sends one frame as is. Errors (e.g. a full queue) are returned, not retried.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for `frame.len()` bytes for the duration of the call.
        let rc = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        assert_eq!(rc as usize, frame.len(), "short send");
        Ok(())
    }

    /// Sends one frame, retrying while the socket's queue is full.
    pub fn send_retrying(&self, frame: &[u8], what: impl FnOnce() -> String) {
        loop {
            match self.send(frame) {
                Ok(()) => return,
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOBUFS) || e.kind() == io::ErrorKind::WouldBlock =>
                {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                Err(e) => panic!("send {}: {e}", what()),
            }
        }
    }

    /// Sends every frame that [`Sender::can_send`] allows, retrying on a full queue, and
    /// returns the frames sent, in order.
    pub fn send_all<'a>(&self, frames: impl IntoIterator<Item = &'a CorpusFrame>) -> Vec<&'a CorpusFrame> {
        let mut sent = Vec::new();
        for frame in frames {
            if !self.can_send(&frame.data) {
                continue;
            }
            self.send_retrying(&frame.data, || format!("frame {} of {}", frame.index, frame.file.display()));
            sent.push(frame);
        }
        sent
    }

    /// Sends canary frames `0..count` at `per_second` (on average over each 10 ms), or until
    /// `stop` is set; returns how many were sent.
    pub fn send_canary(&self, count: u64, per_second: u64, stop: &std::sync::atomic::AtomicBool) -> u64 {
        use std::time::{Duration, Instant};
        let start = Instant::now();
        for seq in 0..count {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return seq;
            }
            let due = start + Duration::from_secs_f64(seq as f64 / per_second as f64);
            let now = Instant::now();
            if due > now + Duration::from_millis(10) {
                std::thread::sleep(due - now);
            }
            self.send_retrying(&canary_frame(seq), || format!("canary frame {seq}"));
        }
        count
    }
}

/// The UDP port of canary frames.
pub const CANARY_PORT: u16 = 7777;
/// A filter that matches canary frames.
pub const CANARY_FILTER: &str = "udp port 7777";
const CANARY_MAGIC: &[u8; 16] = b"tapstream-canary";

/// Canary frame `seq`: UDP from 10.99.0.1 to 10.99.0.2, port [`CANARY_PORT`] both ways, whose
/// payload carries `seq`, so a test can tell that every frame sent was stored once, in order.
pub fn canary_frame(seq: u64) -> Vec<u8> {
    let payload: Vec<u8> = CANARY_MAGIC.iter().copied().chain(seq.to_be_bytes()).collect();
    let udp_len = 8 + payload.len() as u16;
    let ip_len = 20 + udp_len;
    let mut frame = Vec::with_capacity(14 + ip_len as usize);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 99, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 99, 0, 2]);
    let sum = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&CANARY_PORT.to_be_bytes());
    frame.extend_from_slice(&CANARY_PORT.to_be_bytes());
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&payload);
    frame
}

/// The sequence number of a canary frame; `None` for any other frame.
pub fn canary_seq(frame: &[u8]) -> Option<u64> {
    let payload = frame.get(14 + 20 + 8..)?;
    let seq = payload.strip_prefix(CANARY_MAGIC.as_slice())?;
    Some(u64::from_be_bytes(seq.get(..8)?.try_into().ok()?))
}

/// The frames of one PCAP file, as stored. Records after a malformed one are skipped (the
/// corpus holds deliberately broken files).
pub fn read_pcap_frames(path: &Path) -> Vec<CorpusFrame> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let Ok(reader) = tapstream_pcap::Reader::new(&bytes) else {
        return Vec::new();
    };
    reader
        .map_while(Result::ok)
        .enumerate()
        .map(|(index, record)| CorpusFrame { file: path.to_owned(), index, data: record.data.to_vec() })
        .collect()
}

/// The ring size for a capture that must store every corpus frame sent at full speed: its UMEM
/// (half the ring) holds the whole corpus, so a writer that is not scheduled until the send has
/// ended (two cores, tests in parallel) still loses nothing. The default ring holds about half
/// the corpus, and a full CI run once lost 463 frames to it (counted, as kernel drops).
pub const CORPUS_RING_SIZE: u32 = 16384;

/// Every frame of every corpus file, files in name order.
pub fn corpus_frames() -> Vec<CorpusFrame> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("read corpus folder")
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "pcap"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .pcap files in {}", corpus_dir().display());
    let frames: Vec<CorpusFrame> = files.iter().flat_map(|path| read_pcap_frames(path)).collect();
    assert!(
        frames.len() < CORPUS_RING_SIZE as usize / 2,
        "{} corpus frames no longer fit the UMEM of CORPUS_RING_SIZE ({CORPUS_RING_SIZE}): raise it",
        frames.len()
    );
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_frames_carry_their_number_and_match_the_filter_port() {
        let frame = canary_frame(123_456_789);
        assert_eq!(canary_seq(&frame), Some(123_456_789));
        assert_eq!(u16::from_be_bytes([frame[36], frame[37]]), CANARY_PORT);
        assert_eq!(canary_seq(&frame[..40]), None);
        // A header whose checksum is right sums to 0xffff.
        let sum = frame[14..34].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
        assert_eq!((sum & 0xffff) + (sum >> 16), 0xffff);
    }
}
