//! Types shared by the XDP program (`capture-ebpf`) and the daemon (`tapstream`).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes it into BPF maps and the XDP
//! metadata area, and user space reads the same bytes. With the `user` feature the types
//! implement `aya::Pod` so they can be read from maps.
#![no_std]

/// Per-CPU frame counters kept by the XDP program, one slot per CPU in the `COUNTERS` map.
///
/// Every frame the program sees is counted once in `seen`, then in exactly one of
/// `redirected`, `redirect_errors`, `passed` or `dropped`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpCounters {
    /// Frames the program was called for.
    pub seen: u64,
    /// Frames handed to an AF_XDP socket.
    pub redirected: u64,
    /// Frames a capture wanted but the redirect into the socket map failed for.
    pub redirect_errors: u64,
    /// Frames no capture wanted, passed on to the kernel stack.
    pub passed: u64,
    /// Frames no capture wanted, dropped.
    pub dropped: u64,
}

impl XdpCounters {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, other: &Self) {
        self.seen += other.seen;
        self.redirected += other.redirected;
        self.redirect_errors += other.redirect_errors;
        self.passed += other.passed;
        self.dropped += other.dropped;
    }
}

// SAFETY: `XdpCounters` is `repr(C)`, made only of `u64` fields (no padding), and every bit
// pattern is a valid value, which is what `aya::Pod` requires.
#[cfg(feature = "user")]
unsafe impl aya::Pod for XdpCounters {}
