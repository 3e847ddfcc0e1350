//! A capture's output: a local PCAP or pcapng file, or a stream of objects to a store.

use std::{
    fs::File,
    io::{Seek as _, Write as _},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tapstream_pcap::{FileHeader, LINKTYPE_ETHERNET, pcapng};

use crate::{
    datapath::capture::CaptureShared,
    datapath::chunk::{Chunk, ChunkPool},
    store::stream::{StoreOutput, StoreTarget},
};

use super::*;

/// A PCAP (or pcapng) file written as chunks arrive; created with the first chunk. A chunk
/// holds whole records: one that cannot be written whole (a full disk) is cut off again, so the
/// file always ends on a whole record (block).
pub(super) struct FileOutput {
    pub(super) path: PathBuf,
    pub(super) snaplen: u32,
    /// pcapng: the head of the file; none: PCAP.
    pub(super) pcapng: Option<Box<PcapngHead>>,
    /// pcapng: the chunk being written, as packet blocks.
    pub(super) blocks: Vec<u8>,
    pub(super) file: Option<File>,
    /// Bytes of the file that hold its header and whole records.
    pub(super) whole: u64,
    pub(super) packets: u64,
    pub(super) bytes: u64,
}

impl FileOutput {
    pub(super) fn write(&mut self, chunk_frames: u32, records: &[u8]) -> Result<(), SessionError> {
        let err = |source| SessionError::Write { path: self.path.clone(), source };
        if self.file.is_none() {
            // Chunks are large already: written as they are, without another copy into a buffer.
            let mut file = File::create(&self.path).map_err(err)?;
            let header = match &self.pcapng {
                None => FileHeader { snaplen: self.snaplen, linktype: LINKTYPE_ETHERNET, nanos: true }
                    .encode()
                    .to_vec(),
                Some(head) => head.encode(self.snaplen),
            };
            if let Err(source) = file.write_all(&header) {
                // Not even the header fits: no file rather than one that is not a capture.
                drop(file);
                let _ = std::fs::remove_file(&self.path);
                return Err(err(source));
            }
            self.whole = header.len() as u64;
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("created above");
        let out = match &self.pcapng {
            None => records,
            Some(_) => {
                self.blocks.clear();
                to_packet_blocks(records, &mut self.blocks);
                &self.blocks
            }
        };
        if let Err(write) = file.write_all(out) {
            // Part of the chunk may be in the file: cut it back to the last whole record (and
            // put the offset there, so that nothing written later leaves a hole).
            let whole = self.whole;
            let cut = file.set_len(whole).and_then(|()| file.seek(std::io::SeekFrom::Start(whole)));
            return Err(match cut {
                Ok(_) => SessionError::Write { path: self.path.clone(), source: write },
                Err(source) => SessionError::Torn { path: self.path.clone(), write, whole, source },
            });
        }
        self.whole += out.len() as u64;
        self.packets += u64::from(chunk_frames);
        self.bytes +=
            records.len() as u64 - u64::from(chunk_frames) * tapstream_pcap::RECORD_HEADER_LEN as u64;
        Ok(())
    }

    pub(super) fn finish(&mut self) -> Result<Option<PathBuf>, SessionError> {
        let Some(mut file) = self.file.take() else { return Ok(None) };
        let err = |source| SessionError::Write { path: self.path.clone(), source };
        file.flush().map_err(err)?;
        // Regular files are synced; a device such as /dev/null has nothing to sync.
        if file.metadata().map_err(err)?.is_file() {
            file.sync_all().map_err(err)?;
        }
        Ok(Some(self.path.clone()))
    }
}

/// What starts a pcapng file: the section's comment and its one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PcapngHead {
    pub comment: String,
    /// The interface (its snaplen is the capture's).
    pub interface: pcapng::Interface,
}

impl PcapngHead {
    /// The section header and the interface, of a capture of `snaplen`.
    pub fn encode(&self, snaplen: u32) -> Vec<u8> {
        let application = concat!("tapstream ", env!("CARGO_PKG_VERSION"));
        let mut out = pcapng::section_header(application, Some(&self.comment));
        let interface = pcapng::Interface { snaplen, ..self.interface.clone() };
        out.extend(pcapng::interface_description(&interface));
        out
    }
}

/// PCAP records (as the writers make them: host byte order, nanoseconds) as pcapng packet
/// blocks of interface 0, appended to `out`; a record cut short ends the conversion.
pub fn to_packet_blocks(records: &[u8], out: &mut Vec<u8>) {
    for (h, data) in tapstream_pcap::records(records) {
        pcapng::enhanced_packet(out, 0, h.ts_nanos(), data, h.origlen);
    }
}

/// Where a capture's frames go.
pub enum Target {
    /// A local PCAP file, or pcapng with this head.
    File(PathBuf, Option<Box<PcapngHead>>),
    /// Objects in a store; see [`crate::store`].
    Store(StoreTarget),
}

/// How often a capture's progress is published, also while its output makes it wait.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_millis(200);

pub(super) enum Out {
    File(FileOutput),
    /// `packets` and `bytes` were handed to the output; `lost` of those packets found the
    /// spool full once the store had failed.
    Store {
        output: StoreOutput,
        packets: u64,
        bytes: u64,
        lost: Arc<AtomicU64>,
    },
}

impl Out {
    /// Packets and bytes stored (or on their way to the store).
    pub(super) fn stored(&self) -> (u64, u64) {
        let (packets, bytes) = self.handed();
        (packets.saturating_sub(self.lost()), bytes)
    }

    /// Packets and bytes handed to the output.
    pub(super) fn handed(&self) -> (u64, u64) {
        match self {
            Out::File(f) => (f.packets, f.bytes),
            Out::Store { packets, bytes, .. } => (*packets, *bytes),
        }
    }

    /// Packets lost to a full spool while the store was behind or had failed.
    pub(super) fn lost(&self) -> u64 {
        self.lost_counter().map_or(0, |l| l.load(Ordering::Relaxed))
    }

    /// The counter of [`Self::lost`], which goes on counting while the output finishes.
    pub(super) fn lost_counter(&self) -> Option<Arc<AtomicU64>> {
        match self {
            Out::File(_) => None,
            Out::Store { lost, .. } => Some(lost.clone()),
        }
    }

    /// The counts of chunks compressed at each zstd level, which go on counting while the
    /// output finishes; `None` for a file.
    pub(super) fn zstd_levels(&self) -> Option<Arc<crate::store::compress::LevelCounts>> {
        match self {
            Out::File(_) => None,
            Out::Store { output, .. } => Some(output.levels()),
        }
    }

    /// Hands a chunk on; the chunk's frames are counted as dropped if that fails. While the
    /// output makes it wait, the capture's progress is still published every
    /// [`PROGRESS_EVERY`] (the writers count drops meanwhile).
    pub(super) fn write(
        &mut self,
        chunk: Chunk,
        capture: &CaptureShared,
        pool: &ChunkPool,
        progress: &Mutex<Progress>,
        started: Instant,
    ) -> Result<(), SessionError> {
        let frames = u64::from(chunk.frames);
        match self {
            Out::File(file) => {
                let result = file.write(chunk.frames, &chunk.data);
                if result.is_err() {
                    capture.count_dropped(frames);
                }
                pool.put(chunk.data);
                result
            }
            Out::Store { output, packets, bytes, lost } => {
                let data = chunk.data.len() as u64 - frames * tapstream_pcap::RECORD_HEADER_LEN as u64;
                let waiting = || {
                    let lost = lost.load(Ordering::Relaxed);
                    publish(
                        progress,
                        (packets.saturating_sub(lost), *bytes),
                        started,
                        capture.dropped() + lost,
                    );
                };
                match output.write(chunk, PROGRESS_EVERY, waiting) {
                    Ok(()) => {
                        *packets += frames;
                        *bytes += data;
                        Ok(())
                    }
                    Err(chunk) => {
                        capture.count_dropped(frames);
                        pool.put(chunk.data);
                        Err(SessionError::UploadStopped)
                    }
                }
            }
        }
    }

    /// Finishes the output: the file synced, or every object complete. Returns where the
    /// capture is stored.
    pub(super) fn finish(self) -> Result<(u64, u64, Vec<String>), SessionError> {
        match self {
            Out::File(mut file) => {
                let stored = file.finish()?;
                Ok((file.packets, file.bytes, stored.iter().map(|p| p.display().to_string()).collect()))
            }
            Out::Store { output, packets, bytes, lost } => {
                let outputs = output.finish()?;
                Ok((packets.saturating_sub(lost.load(Ordering::Relaxed)), bytes, outputs))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tapstream_pcap::RecordHeader;

    use super::*;

    #[test]
    fn records_become_packet_blocks_of_the_same_frames() {
        let mut records = Vec::new();
        let frames: [(&[u8], u32); 3] = [(b"abcde", 5), (b"", 60), (b"0123456789ab", 1500)];
        for (i, (data, origlen)) in frames.iter().enumerate() {
            let h =
                RecordHeader { ts_sec: 7, ts_frac: i as u32, caplen: data.len() as u32, origlen: *origlen };
            records.extend(h.encode());
            records.extend(*data);
        }
        let mut blocks = Vec::new();
        to_packet_blocks(&records, &mut blocks);
        let mut expected = Vec::new();
        for (i, (data, origlen)) in frames.iter().enumerate() {
            pcapng::enhanced_packet(&mut expected, 0, 7_000_000_000 + i as u64, data, *origlen);
        }
        assert_eq!(blocks, expected);
        // A record cut short ends the conversion with the whole ones before it.
        let mut cut = Vec::new();
        to_packet_blocks(&records[..records.len() - 1], &mut cut);
        assert_eq!(cut.len(), 2 * pcapng::ENHANCED_PACKET_OVERHEAD + 8);
    }
}
