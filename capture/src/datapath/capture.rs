//! Captures: what was asked (filter, snaplen, limits) and the state the writers share.
//!
//! Several writers (one per RX queue) append frames of the same capture at once. The packet
//! and byte limits are exact across them: each frame is admitted by an atomic reservation
//! against the limit before it is appended, so the stored capture never holds more than asked.
//! Captures without a packet or byte limit skip the reservation. A capture over several
//! interfaces is one [`CaptureShared`] per interface sharing one [`Budget`]: the limits, and
//! the idle timeout, apply to the sum.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

/// Default number of bytes stored per frame (tcpdump's default).
pub const DEFAULT_SNAPLEN: u32 = 262_144;

/// What a capture stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureSpec {
    /// Identifier, unique on this host.
    pub id: String,
    /// The filter, compiled (by the daemon off the interface's thread, or by the one-shot
    /// command before it starts); `None` captures every frame.
    pub filter: Option<crate::filter::CbpfProgram>,
    /// Bytes stored per frame at most.
    pub snaplen: u32,
    /// How far back before its start the capture begins, from the interface's history
    /// ([`crate::datapath::lookback`]); `None`: it starts at its start.
    pub lookback: Option<Duration>,
}

impl Default for CaptureSpec {
    fn default() -> Self {
        Self { id: "capture".into(), filter: None, snaplen: DEFAULT_SNAPLEN, lookback: None }
    }
}

/// When a capture ends: the first limit reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Frames stored at most.
    pub packets: Option<u64>,
    /// Frame bytes stored at most (after snaplen; PCAP headers not counted).
    pub bytes: Option<u64>,
    /// Time from start.
    pub duration: Option<Duration>,
    /// Time without a frame for this capture.
    pub idle: Option<Duration>,
}

/// Why a capture ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The duration limit.
    Duration,
    /// The packet limit.
    Packets,
    /// The byte limit.
    Bytes,
    /// No frame for the idle timeout.
    Idle,
    /// Stopped on request (or by a signal).
    Stopped,
    /// Failed.
    Error,
    /// The daemon stopped while the capture ran.
    Interrupted,
}

impl StopReason {
    /// Every reason, for metrics registered at zero.
    pub const ALL: [StopReason; 7] = [
        Self::Duration,
        Self::Packets,
        Self::Bytes,
        Self::Idle,
        Self::Stopped,
        Self::Error,
        Self::Interrupted,
    ];

    /// The reason's name in summaries, JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Duration => "duration",
            Self::Packets => "packets",
            Self::Bytes => "bytes",
            Self::Idle => "idle",
            Self::Stopped => "stopped",
            Self::Error => "error",
            Self::Interrupted => "interrupted",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const LIMIT_NONE: u8 = 0;
const LIMIT_PACKETS: u8 = 1;
const LIMIT_BYTES: u8 = 2;

/// What a capture has admitted against its packet and byte limits, which limit it reached,
/// and when its latest frame arrived: shared by the interfaces of a capture over several.
#[derive(Debug, Default)]
pub struct Budget {
    admitted_packets: AtomicU64,
    admitted_bytes: AtomicU64,
    limit_hit: AtomicU8,
    last_frame_tai_ns: AtomicU64,
}

impl Budget {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }
}

/// State of a running capture on one interface, shared by its writers and its controller.
#[derive(Debug)]
pub struct CaptureShared {
    /// What was asked.
    pub spec: CaptureSpec,
    /// The limits.
    pub limits: Limits,
    budget: Arc<Budget>,
    dropped: AtomicU64,
}

impl CaptureShared {
    /// New shared state, with a budget of its own.
    pub fn new(spec: CaptureSpec, limits: Limits) -> Arc<Self> {
        Self::sharing(spec, limits, Budget::new())
    }

    /// New shared state admitting frames against `budget`, which other interfaces' parts of
    /// the same capture share.
    pub fn sharing(spec: CaptureSpec, limits: Limits, budget: Arc<Budget>) -> Arc<Self> {
        Arc::new(Self { spec, limits, budget, dropped: AtomicU64::new(0) })
    }

    /// Whether the writers reserve each frame against the packet and byte limits. A capture
    /// with a lookback is counted by the next stage instead, which sees its history first.
    #[inline]
    pub fn is_counted_by_writers(&self) -> bool {
        self.is_counted() && self.spec.lookback.is_none()
    }

    /// Whether this capture has a packet or byte limit (and so admission to check).
    #[inline]
    pub fn is_counted(&self) -> bool {
        self.limits.packets.is_some() || self.limits.bytes.is_some()
    }

    /// Reserves room for one frame of `stored_len` bytes. `false` means a limit is reached:
    /// the frame is not stored and the capture should end.
    #[inline]
    pub fn admit(&self, stored_len: u64) -> bool {
        if let Some(max) = self.limits.bytes {
            let before = self.budget.admitted_bytes.fetch_add(stored_len, Ordering::Relaxed);
            if before + stored_len > max {
                self.hit(LIMIT_BYTES);
                return false;
            }
        }
        if let Some(max) = self.limits.packets {
            let before = self.budget.admitted_packets.fetch_add(1, Ordering::Relaxed);
            if before >= max {
                self.hit(LIMIT_PACKETS);
                return false;
            }
            if before + 1 == max {
                // The last frame allowed: end now rather than at the next frame, which may
                // never come.
                self.hit(LIMIT_PACKETS);
            }
        }
        true
    }

    fn hit(&self, which: u8) {
        let _ =
            self.budget.limit_hit.compare_exchange(LIMIT_NONE, which, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The packet or byte limit reached first, if any.
    pub fn limit_reached(&self) -> Option<StopReason> {
        match self.budget.limit_hit.load(Ordering::Relaxed) {
            LIMIT_PACKETS => Some(StopReason::Packets),
            LIMIT_BYTES => Some(StopReason::Bytes),
            _ => None,
        }
    }

    /// Counts frames this capture lost because its chunk could not be queued.
    #[inline]
    pub fn count_dropped(&self, frames: u64) {
        self.dropped.fetch_add(frames, Ordering::Relaxed);
    }

    /// Frames lost because a chunk could not be queued (memory budget or queue full).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Notes the receive time (kernel TAI ns) of the latest frame seen for this capture.
    #[inline]
    pub fn saw_frame(&self, tai_ns: u64) {
        self.budget.last_frame_tai_ns.fetch_max(tai_ns, Ordering::Relaxed);
    }

    /// Receive time of the latest frame (kernel TAI ns), 0 if none; over every interface of
    /// a capture over several.
    pub fn last_frame_tai_ns(&self) -> u64 {
        self.budget.last_frame_tai_ns.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_limit_is_exact_across_threads() {
        let capture =
            CaptureShared::new(CaptureSpec::default(), Limits { packets: Some(1000), ..Limits::default() });
        let admitted: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..10_000).filter(|_| capture.admit(100)).count() as u64))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 1000);
        assert_eq!(capture.limit_reached(), Some(StopReason::Packets));
    }

    #[test]
    fn byte_limit_never_exceeded() {
        let capture =
            CaptureShared::new(CaptureSpec::default(), Limits { bytes: Some(250), ..Limits::default() });
        assert!(capture.admit(100));
        assert!(capture.admit(100));
        assert_eq!(capture.limit_reached(), None);
        assert!(!capture.admit(100), "300 bytes would exceed 250");
        assert_eq!(capture.limit_reached(), Some(StopReason::Bytes));
    }

    #[test]
    fn last_allowed_packet_ends_the_capture() {
        let capture =
            CaptureShared::new(CaptureSpec::default(), Limits { packets: Some(2), ..Limits::default() });
        assert!(capture.admit(1));
        assert_eq!(capture.limit_reached(), None);
        assert!(capture.admit(1));
        assert_eq!(capture.limit_reached(), Some(StopReason::Packets));
    }

    #[test]
    fn parts_sharing_a_budget_are_limited_together() {
        let budget = Budget::new();
        let limits = Limits { packets: Some(3), ..Limits::default() };
        let a = CaptureShared::sharing(CaptureSpec::default(), limits, budget.clone());
        let b = CaptureShared::sharing(CaptureSpec::default(), limits, budget);
        assert!(a.admit(1));
        assert!(b.admit(1));
        a.saw_frame(7);
        assert_eq!(b.last_frame_tai_ns(), 7, "idle is judged over both");
        assert!(b.admit(1));
        assert_eq!(a.limit_reached(), Some(StopReason::Packets), "b's frame was the third of both");
        assert!(!a.admit(1));
        // Drops stay each part's own.
        a.count_dropped(2);
        assert_eq!((a.dropped(), b.dropped()), (2, 0));
    }
}
