//! Types shared by the XDP program (`capture-ebpf`) and the daemon (`tapstream`).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes it into BPF maps and the XDP
//! metadata area, and user space reads the same bytes. With the `user` feature the types
//! implement `aya::Pod` so they can be read from and written to maps.
#![no_std]

/// Most captures that can run at once on one interface: one bit each in [`FrameMeta::mask`].
pub const MAX_CAPTURES: usize = 64;

/// Most RX queues per interface (entries of the socket map).
pub const MAX_QUEUES: u32 = 256;

/// Slot of the program array that holds the generated filter program.
pub const FILTER_SLOT: u32 = 0;

/// Per-CPU frame counters kept by the XDP program, one slot per CPU in the `COUNTERS` map.
///
/// Every frame the program sees is counted once in `seen`, then in exactly one of
/// `redirected`, `redirect_errors`, `passed`, `dropped` or `meta_errors`. `matched` is
/// `redirected + redirect_errors`; `truncated` counts the wanted frames that were cut to fit
/// a UMEM frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpCounters {
    /// Frames the program was called for.
    pub seen: u64,
    /// Frames at least one capture wanted (the filter program matched).
    pub matched: u64,
    /// Frames handed to an AF_XDP socket.
    pub redirected: u64,
    /// Frames a capture wanted but the redirect into the socket map failed for (no socket on
    /// that queue); they are passed or dropped like unwanted frames.
    pub redirect_errors: u64,
    /// Frames no capture wanted, passed on to the kernel stack.
    pub passed: u64,
    /// Frames no capture wanted, dropped.
    pub dropped: u64,
    /// Frames longer than a UMEM frame holds, cut before the redirect (their original length
    /// stays in the metadata).
    pub truncated: u64,
    /// Frames that could not get their metadata (the driver has no room for it); passed or
    /// dropped like unwanted frames.
    pub meta_errors: u64,
}

impl XdpCounters {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, other: &Self) {
        self.seen += other.seen;
        self.matched += other.matched;
        self.redirected += other.redirected;
        self.redirect_errors += other.redirect_errors;
        self.passed += other.passed;
        self.dropped += other.dropped;
        self.truncated += other.truncated;
        self.meta_errors += other.meta_errors;
    }
}

/// What the program does with frames no capture wants.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmatched {
    /// Drop them (usual on a tap host: nothing else wants the mirrored traffic).
    Drop = 1,
    /// Pass them on to the kernel stack.
    Pass = 2,
}

/// Settings user space writes into the single entry of the `CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpConfig {
    /// Captures a frame belongs to when no filter program is installed (bit i = capture
    /// slot i). Zero: no capture runs.
    pub default_mask: u64,
    /// Longest frame the AF_XDP sockets can take (UMEM frame size less headroom); longer
    /// frames are cut to this length.
    pub max_frame_len: u32,
    /// An [`Unmatched`] value.
    pub unmatched: u32,
    /// Raised by user space each time it puts a new filter program in force (the program
    /// first, then this): copied into [`FrameMeta::generation`], it tells the writers which
    /// frames the new program marked.
    pub generation: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

impl Default for XdpConfig {
    fn default() -> Self {
        Self {
            default_mask: 0,
            max_frame_len: 1792,
            unmatched: Unmatched::Pass as u32,
            generation: 0,
            reserved: 0,
        }
    }
}

/// Written by the XDP program in the metadata area just before each redirected frame; user
/// space finds it right before the frame's data in the UMEM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameMeta {
    /// Receive time: the kernel's CLOCK_TAI in nanoseconds (`bpf_ktime_get_tai_ns`).
    pub rx_tai_ns: u64,
    /// The captures this frame belongs to (bit i = capture slot i).
    pub mask: u64,
    /// Length of the frame on the wire, before any truncation.
    pub orig_len: u32,
    /// [`XdpConfig::generation`] when the program saw the frame.
    pub generation: u32,
}

/// Size of [`FrameMeta`] in bytes (a multiple of 4, at most 32, as `bpf_xdp_adjust_meta`
/// requires).
pub const FRAME_META_LEN: usize = core::mem::size_of::<FrameMeta>();

// SAFETY: repr(C), only u64 fields, no padding (size checked below): every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for XdpCounters {}
// SAFETY: repr(C), integer fields, no padding (size checked below): every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for XdpConfig {}
// SAFETY: repr(C), integer fields, no padding (size checked below): every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for FrameMeta {}

const _: () = assert!(core::mem::size_of::<XdpCounters>() == 8 * 8);
const _: () = assert!(core::mem::size_of::<XdpConfig>() == 24);
const _: () = assert!(FRAME_META_LEN == 24 && FRAME_META_LEN.is_multiple_of(4));
