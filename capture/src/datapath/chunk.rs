//! PCAP chunks: the unit that leaves a writer.
//!
//! A chunk is a run of PCAP records (no file header) of one capture from one RX queue, in
//! receive order. Chunks are preallocated buffers taken from a [`ChunkPool`], which bounds the
//! memory of everything queued behind the writers; downstream stages give buffers back with
//! [`ChunkPool::put`]. Appending a frame copies it once and never allocates.

use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use tapstream_pcap::{RECORD_HEADER_LEN, RecordHeader};

use crate::datapath::capture::CaptureShared;

/// A bounded set of reusable chunk buffers.
pub struct ChunkPool {
    free: ArrayQueue<Vec<u8>>,
    chunk_bytes: usize,
}

impl ChunkPool {
    /// A pool of `count` buffers of `chunk_bytes` each, all allocated now.
    pub fn new(count: usize, chunk_bytes: usize) -> Arc<Self> {
        let free = ArrayQueue::new(count.max(1));
        for _ in 0..count.max(1) {
            let _ = free.push(Vec::with_capacity(chunk_bytes));
        }
        Arc::new(Self { free, chunk_bytes })
    }

    /// A free buffer, if any is left.
    #[inline]
    pub fn take(&self) -> Option<Vec<u8>> {
        self.free.pop()
    }

    /// Gives a buffer back (emptied). Buffers of the wrong capacity are dropped.
    pub fn put(&self, mut buf: Vec<u8>) {
        buf.clear();
        if buf.capacity() >= self.chunk_bytes {
            let _ = self.free.push(buf);
        }
    }

    /// Buffers currently free.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Buffers in the pool in all.
    pub fn capacity(&self) -> usize {
        self.free.capacity()
    }

    /// Bytes per buffer.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }
}

/// PCAP records of one capture from one queue.
pub struct Chunk {
    /// The capture the records belong to.
    pub capture: Arc<CaptureShared>,
    /// RX queue the frames came from.
    pub queue: u32,
    /// Sequence number of this chunk among the chunks of this capture and queue.
    pub seq: u64,
    /// Records in the chunk.
    pub frames: u32,
    /// Timestamp of the first record (ns since the Unix epoch).
    pub first_ns: u64,
    /// Timestamp of the last record.
    pub last_ns: u64,
    /// Receive time (monotonic) of the first frame, for age-based flushing.
    pub opened: std::time::Instant,
    /// The records.
    pub data: Vec<u8>,
}

impl Chunk {
    /// An empty chunk in `buf`.
    pub fn new(capture: Arc<CaptureShared>, queue: u32, seq: u64, buf: Vec<u8>) -> Self {
        Self {
            capture,
            queue,
            seq,
            frames: 0,
            first_ns: 0,
            last_ns: 0,
            opened: std::time::Instant::now(),
            data: buf,
        }
    }

    /// Bytes a record of `frame` cut to `snaplen` takes.
    #[inline]
    pub fn record_len(frame_len: usize, snaplen: u32) -> usize {
        RECORD_HEADER_LEN + frame_len.min(snaplen as usize)
    }

    /// Whether a record of `record_len` bytes fits.
    #[inline]
    pub fn fits(&self, record_len: usize) -> bool {
        self.data.len() + record_len <= self.data.capacity()
    }

    /// Appends a record: `frame` cut to `snaplen`, with its wire length and timestamp. The
    /// caller has checked [`Chunk::fits`]; this never reallocates.
    #[inline]
    pub fn append(&mut self, ts_ns: u64, orig_len: u32, frame: &[u8], snaplen: u32) {
        let stored = &frame[..frame.len().min(snaplen as usize)];
        debug_assert!(self.fits(RECORD_HEADER_LEN + stored.len()));
        let header = RecordHeader::at_nanos(ts_ns, stored.len() as u32, orig_len);
        self.data.extend_from_slice(&header.encode());
        self.data.extend_from_slice(stored);
        if self.frames == 0 {
            self.first_ns = ts_ns;
            self.opened = std::time::Instant::now();
        }
        self.last_ns = ts_ns;
        self.frames += 1;
    }

    /// Whether the chunk holds no record.
    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::capture::{CaptureSpec, Limits};

    #[test]
    fn records_read_back_with_snaplen_and_wire_length() {
        let pool = ChunkPool::new(1, 256);
        let capture =
            CaptureShared::new(CaptureSpec { snaplen: 4, ..CaptureSpec::default() }, Limits::default());
        let mut chunk = Chunk::new(capture, 0, 0, pool.take().unwrap());
        assert!(pool.take().is_none(), "the pool holds one buffer");
        chunk.append(1_500_000_000_123_456_789, 60, &[1, 2, 3, 4, 5, 6], 4);
        chunk.append(1_500_000_001_000_000_000, 3, &[7, 8, 9], 4);

        let mut file = tapstream_pcap::FileHeader { snaplen: 4, linktype: 1, nanos: true }.encode().to_vec();
        file.extend_from_slice(&chunk.data);
        let records: Vec<_> = tapstream_pcap::Reader::new(&file).unwrap().map(Result::unwrap).collect();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].data, &[1, 2, 3, 4]);
        assert_eq!(records[0].origlen, 60);
        assert_eq!(records[0].ts_nanos, 1_500_000_000_123_456_789);
        assert_eq!(records[1].data, &[7, 8, 9]);
        assert_eq!(
            (chunk.frames, chunk.first_ns, chunk.last_ns),
            (2, 1_500_000_000_123_456_789, 1_500_000_001_000_000_000)
        );

        let cap = chunk.data.capacity();
        assert!(!chunk.fits(cap), "a record larger than the room left does not fit");
        pool.put(chunk.data);
        assert_eq!(pool.available(), 1);
    }
}
