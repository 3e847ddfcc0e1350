//! Converting the XDP program's receive timestamps to wall-clock time.
//!
//! The XDP program stamps each frame with `bpf_ktime_get_tai_ns()`, the kernel's CLOCK_TAI.
//! CLOCK_TAI and CLOCK_REALTIME are the same clock read with a different offset: the kernel
//! keeps `CLOCK_TAI = CLOCK_REALTIME + tai_offset`, with `tai_offset` a whole number of
//! seconds (37 s since 2017 when NTP sets it, 0 when nothing does). Both follow NTP slewing and
//! clock steps alike, so
//!
//! ```text
//! wall-clock ns = TAI ns - tai_offset
//! ```
//!
//! is exact. The offset is measured by reading both clocks and rounding their difference to
//! the nearest second (the reads are nanoseconds apart), and re-measured every second so that
//! a leap second or an offset change by NTP is followed within a second.

/// The TAI-to-UTC offset, measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaiClock {
    offset_ns: u64,
}

fn now_ns(clock: libc::clockid_t) -> i128 {
    // Both clocks exist on every supported kernel.
    crate::sys::clock_ns(clock).unwrap_or_else(|e| panic!("clock_gettime({clock}): {e}"))
}

impl TaiClock {
    /// Measures the current offset.
    pub fn measure() -> Self {
        let real = now_ns(libc::CLOCK_REALTIME);
        let tai = now_ns(libc::CLOCK_TAI);
        let diff = tai - real;
        let seconds = (diff + 500_000_000).div_euclid(1_000_000_000);
        Self { offset_ns: (seconds.max(0) as u64) * 1_000_000_000 }
    }

    /// The offset in whole seconds.
    pub fn offset_secs(&self) -> u64 {
        self.offset_ns / 1_000_000_000
    }

    /// Wall-clock nanoseconds since the Unix epoch for a TAI timestamp.
    #[inline]
    pub fn to_unix_ns(&self, tai_ns: u64) -> u64 {
        tai_ns.saturating_sub(self.offset_ns)
    }

    /// The current TAI time, in the clock the XDP program stamps frames with.
    pub fn now_tai_ns() -> u64 {
        now_ns(libc::CLOCK_TAI) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converted_tai_matches_realtime() {
        let clock = TaiClock::measure();
        let tai = TaiClock::now_tai_ns();
        let real = now_ns(libc::CLOCK_REALTIME) as u64;
        let converted = clock.to_unix_ns(tai);
        assert!(converted <= real, "conversion of an earlier reading is not later than now");
        assert!(real - converted < 1_000_000_000, "converted {converted} vs realtime {real}");
    }
}
