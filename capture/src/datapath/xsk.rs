//! AF_XDP sockets: one UMEM, fill ring and RX ring per RX queue of the capture interface.
//!
//! The XDP program redirects wanted frames into the socket of their RX queue. The kernel takes
//! free UMEM frames from the fill ring, writes the frame (with the XDP metadata in front of it)
//! and puts a descriptor on the RX ring. [`XskSocket::receive`] hands each frame to the writer
//! and gives the UMEM frame straight back to the fill ring, so the number of frames lent to
//! the kernel stays constant.
//!
//! Zero-copy binding is tried first (real NICs with zero-copy drivers), then copy mode (veth,
//! and every other driver); [`XskSocket::mode`] says which one is in use.
//!
//! This module and `sys` hold the project's ring and syscall `unsafe`.

use std::{ffi::CString, num::NonZeroU32, ptr::NonNull};

use capture_common::{FRAME_META_LEN, FrameMeta};
use xdpilone::{DeviceQueue, IfInfo, RingRx, Socket, SocketConfig, Umem, UmemConfig, User};

use crate::sys::{Capability, CapabilityError};

/// Headroom the kernel keeps in front of a frame in each UMEM frame (`XDP_PACKET_HEADROOM`);
/// the XDP metadata lives in it.
pub const XDP_PACKET_HEADROOM: u32 = 256;

/// How long a bind that finds the queue busy is retried.
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether to use zero-copy binding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ZeroCopy {
    /// Try zero-copy, fall back to copy mode.
    #[default]
    Auto,
    /// Zero-copy or fail.
    Required,
    /// Copy mode only.
    Off,
}

/// How a socket is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XskMode {
    /// The driver DMAs straight into the UMEM.
    ZeroCopy,
    /// The kernel copies each frame into the UMEM.
    Copy,
}

impl std::fmt::Display for XskMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ZeroCopy => "zero-copy",
            Self::Copy => "copy",
        })
    }
}

/// Ring and UMEM sizes of one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XskConfig {
    /// Bytes per UMEM frame: 2048 or 4096.
    pub frame_size: u32,
    /// UMEM frames per queue.
    pub umem_frames: u32,
    /// Entries of the fill ring (a power of two).
    pub fill_ring_size: u32,
    /// Frames lent to the kernel through the fill ring (at most `fill_ring_size` and
    /// `umem_frames`). Keeping the fill ring about half full lost the fewest frames here.
    pub fill_frames: u32,
    /// Entries of the RX ring (a power of two).
    pub rx_ring_size: u32,
    /// Zero-copy policy.
    pub zero_copy: ZeroCopy,
    /// Back the UMEM with huge pages where the host has them ([`UmemBacking`]).
    pub huge_pages: bool,
}

impl XskConfig {
    /// Sizes the RX and fill rings to `ring_size` entries and the UMEM to half as many frames,
    /// all lent to the kernel: the ring can take every frame the UMEM holds while the writer
    /// is busy.
    pub fn set_ring_size(&mut self, ring_size: u32) {
        self.rx_ring_size = ring_size;
        self.fill_ring_size = ring_size;
        self.fill_frames = ring_size / 2;
        self.umem_frames = ring_size / 2;
    }
}

impl Default for XskConfig {
    fn default() -> Self {
        Self {
            frame_size: 4096,
            umem_frames: 4096,
            fill_ring_size: 8192,
            fill_frames: 4096,
            rx_ring_size: 8192,
            zero_copy: ZeroCopy::Auto,
            huge_pages: true,
        }
    }
}

impl XskConfig {
    /// The longest frame a UMEM frame holds; the XDP program cuts longer ones to this.
    pub fn max_frame_len(&self) -> u32 {
        self.frame_size - XDP_PACKET_HEADROOM
    }
}

/// Errors setting up a socket.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("cannot map {bytes} bytes of UMEM for queue {queue}")]
    Mmap {
        queue: u32,
        bytes: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("AF_XDP {step} failed for {interface} queue {queue}: {errno}")]
    Socket { interface: String, queue: u32, step: &'static str, errno: String },
    #[error("zero-copy AF_XDP is required but {interface} queue {queue} does not support it: {errno}")]
    NoZeroCopy { interface: String, queue: u32, errno: String },
    /// Without CAP_IPC_LOCK, the kernel counts each UMEM against RLIMIT_MEMLOCK.
    #[error(
        "cannot register the UMEM of {interface} queue {queue} ({}): it is over the locked-memory \
         limit (RLIMIT_MEMLOCK = {}) and this process lacks CAP_IPC_LOCK: grant CAP_IPC_LOCK, raise \
         LimitMEMLOCK, or use a smaller ring size (--ring-size, interfaces.<alias>.ring_size)",
        Size(*bytes as u64),
        limit.map_or_else(|| "unknown".to_owned(), |l| Size(l).to_string())
    )]
    MemlockLimit {
        interface: String,
        queue: u32,
        bytes: usize,
        limit: Option<u64>,
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused, and the process lacks a capability the step needs.
    #[error(transparent)]
    Capability(Box<CapabilityError>),
}

/// A byte count for messages: `16 MiB`, `6 MiB`, `640 KiB`, `100 bytes`.
struct Size(u64);

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            n if n >= 1 << 20 && n % (1 << 20) == 0 => write!(f, "{} MiB", n >> 20),
            n if n >= 1 << 20 => write!(f, "{:.1} MiB", n as f64 / f64::from(1 << 20)),
            n if n >= 1 << 10 && n % (1 << 10) == 0 => write!(f, "{} KiB", n >> 10),
            n => write!(f, "{n} bytes"),
        }
    }
}

/// Counters of one socket, from the kernel (`XDP_STATISTICS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XskStats {
    /// Frames dropped by the socket for lack of a UMEM frame or because they were too long.
    pub rx_dropped: u64,
    /// Frames dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty (frames then dropped; overlaps
    /// `rx_dropped` in copy mode).
    pub rx_fill_ring_empty_descs: u64,
    /// Invalid descriptors.
    pub rx_invalid_descs: u64,
}

/// Size of a huge page on x86-64 and arm64 (with 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// What backs a UMEM's memory. Every frame handed to user space costs a TLB miss when each
/// 4 KiB UMEM frame sits on its own page; a 2 MiB page holds 512 of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UmemBacking {
    /// Huge pages the operator reserved (`vm.nr_hugepages`), mapped with `MAP_HUGETLB`.
    Reserved,
    /// Transparent huge pages asked for with `madvise(MADV_HUGEPAGE)`: `huge_bytes` of the
    /// UMEM got them (the kernel gives base pages where it finds no free 2 MiB).
    Transparent { huge_bytes: u64 },
    /// Base pages only: huge pages are off, or none was to be had.
    Pages,
}

impl std::fmt::Display for UmemBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reserved => f.write_str("reserved huge pages"),
            Self::Transparent { huge_bytes } => {
                write!(f, "transparent huge pages ({} huge)", Size(*huge_bytes))
            }
            Self::Pages => f.write_str("base pages"),
        }
    }
}

/// An anonymous, page-aligned mapping for the UMEM, populated at once, unmapped on drop.
struct Area {
    ptr: NonNull<u8>,
    len: usize,
    backing: UmemBacking,
}

impl Area {
    /// Maps `len` bytes. With `huge_pages`: reserved huge pages if enough are free, else
    /// transparent huge pages (2 MiB-aligned, advised before they are populated), else base
    /// pages.
    fn new(len: usize, huge_pages: bool) -> std::io::Result<Self> {
        if huge_pages
            && len.is_multiple_of(HUGE_PAGE)
            && reserved_huge_pages_free() >= len
            && let Ok(area) = Self::map(len, libc::MAP_HUGETLB | libc::MAP_POPULATE, UmemBacking::Reserved)
        {
            return Ok(area);
        }
        if !huge_pages {
            return Self::map(len, libc::MAP_POPULATE, UmemBacking::Pages);
        }
        // Over-map by a huge page and trim, so the area starts on a 2 MiB boundary: the kernel
        // backs only aligned 2 MiB ranges with a huge page.
        let mut area = Self::map(len + HUGE_PAGE, 0, UmemBacking::Pages)?;
        let start = area.ptr.as_ptr() as usize;
        let head = start.next_multiple_of(HUGE_PAGE) - start;
        let tail = HUGE_PAGE - head;
        // SAFETY: both ranges lie inside the mapping just made, which nothing uses yet; what
        // remains is [start + head, start + head + len), recorded below as the area.
        unsafe {
            if head > 0 {
                libc::munmap(area.ptr.as_ptr().cast(), head);
            }
            if tail > 0 {
                libc::munmap(area.ptr.as_ptr().add(head + len).cast(), tail);
            }
            area.ptr = NonNull::new_unchecked(area.ptr.as_ptr().add(head));
        }
        area.len = len;
        // SAFETY: madvise(2) on the area's own range, not yet touched.
        let advised = unsafe { libc::madvise(area.ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE) } == 0;
        area.populate();
        area.backing = match (advised, area.huge_bytes()) {
            (true, huge) if huge > 0 => UmemBacking::Transparent { huge_bytes: huge },
            _ => UmemBacking::Pages,
        };
        Ok(area)
    }

    fn map(len: usize, flags: libc::c_int, backing: UmemBacking) -> std::io::Result<Self> {
        // SAFETY: an anonymous private mapping with no address hint has no preconditions.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Self { ptr, len, backing })
    }

    /// Faults every page in now (as `MAP_POPULATE` would have), not on the first frames.
    fn populate(&self) {
        // SAFETY: madvise(2) on the area's own range; MADV_POPULATE_WRITE (Linux 5.14) only
        // faults pages in.
        if unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_POPULATE_WRITE) } == 0 {
            return;
        }
        // Older kernels: touch one byte per base page.
        for offset in (0..self.len).step_by(4096) {
            // SAFETY: `offset` is inside the area, which is writable and not yet shared with
            // the kernel's rings.
            unsafe { self.ptr.as_ptr().add(offset).write_volatile(0) };
        }
    }

    /// Bytes of the area backed by transparent huge pages (`AnonHugePages` of its mapping in
    /// /proc/self/smaps); 0 if that cannot be read.
    fn huge_bytes(&self) -> u64 {
        let start = self.ptr.as_ptr() as usize;
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else { return 0 };
        let mut inside = false;
        let mut huge = 0;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((from, to)) = range.split_once('-')
                && let (Ok(from), Ok(to)) = (usize::from_str_radix(from, 16), usize::from_str_radix(to, 16))
            {
                inside = from <= start && start < to;
            } else if inside && let Some(kb) = line.strip_prefix("AnonHugePages:") {
                huge += kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024;
            }
        }
        huge
    }
}

/// Bytes of reserved huge pages free now (`HugePages_Free` of the default size).
fn reserved_huge_pages_free() -> usize {
    let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") else { return 0 };
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
    };
    match (field("HugePages_Free:"), field("Hugepagesize:")) {
        (Some(free), Some(kb)) if kb * 1024 == HUGE_PAGE => free * HUGE_PAGE,
        _ => 0,
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new` (trimmed there); the
        // sockets that used it are dropped before the area (field order of `XskSocket`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One AF_XDP socket with its own UMEM, bound to one RX queue.
pub struct XskSocket {
    queue: u32,
    mode: XskMode,
    rx: RingRx,
    device: DeviceQueue,
    user: User,
    _umem: Umem,
    // Dropped last: the rings above refer to it.
    area: Area,
}

// SAFETY: the rings and UMEM are owned by this value alone and used from one thread at a time;
// the raw pointers inside point into mappings that live as long as the value.
unsafe impl Send for XskSocket {}

impl XskSocket {
    /// Creates the UMEM and rings for `interface` queue `queue` and binds them, zero-copy
    /// first if allowed.
    pub fn open(interface: &str, queue: u32, config: &XskConfig) -> Result<Self, XskError> {
        let err = |step: &'static str, errno: xdpilone::Errno| XskError::Socket {
            interface: interface.to_owned(),
            queue,
            step,
            errno: errno.to_string(),
        };
        let bytes = config.frame_size as usize * config.umem_frames as usize;
        let area =
            Area::new(bytes, config.huge_pages).map_err(|source| XskError::Mmap { queue, bytes, source })?;
        let mut info = IfInfo::invalid();
        let name = CString::new(interface).map_err(|_| XskError::Socket {
            interface: interface.to_owned(),
            queue,
            step: "interface name",
            errno: "contains a NUL byte".into(),
        })?;
        info.from_name(&name).map_err(|e| err("interface lookup", e))?;
        info.set_queue(queue);

        let attempts: &[(u16, XskMode)] = match config.zero_copy {
            ZeroCopy::Auto => &[
                (SocketConfig::XDP_BIND_ZEROCOPY, XskMode::ZeroCopy),
                (SocketConfig::XDP_BIND_COPY, XskMode::Copy),
            ],
            ZeroCopy::Required => &[(SocketConfig::XDP_BIND_ZEROCOPY, XskMode::ZeroCopy)],
            ZeroCopy::Off => &[(SocketConfig::XDP_BIND_COPY, XskMode::Copy)],
        };
        let mut last = None;
        let mut bound = None;
        // A socket a process that just exited had bound to this queue is released by the
        // kernel a moment later (a daemon restarted at once meets it): EBUSY is retried for a
        // few seconds.
        let deadline = std::time::Instant::now() + BUSY_RETRY;
        'retry: loop {
            for &(flags, mode) in attempts {
                // Each attempt starts from a new socket: rings cannot be set up twice on one.
                match Self::bind(&area, config, &info, flags) {
                    Ok(parts) => {
                        bound = Some((parts, mode));
                        break 'retry;
                    }
                    Err((step, errno)) => {
                        log::debug!(
                            "AF_XDP {mode} setup of {interface} queue {queue} failed at {step}: {errno}"
                        );
                        last = Some((step, errno));
                    }
                }
            }
            let busy = last.as_ref().is_some_and(|(step, e)| *step == "bind" && e.get_raw() == libc::EBUSY);
            if !busy || std::time::Instant::now() >= deadline {
                break;
            }
            log::info!("{interface} queue {queue} is still held by a socket being released; retrying");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let Some(((umem, mut device, user), mode)) = bound else {
            let (step, errno) = last.expect("at least one attempt");
            return Err(if config.zero_copy == ZeroCopy::Required && step == "bind" {
                XskError::NoZeroCopy { interface: interface.to_owned(), queue, errno: errno.to_string() }
            } else {
                Self::refusal(interface, queue, bytes, step, errno.get_raw())
                    .unwrap_or_else(|| err(step, errno))
            });
        };
        let rx = user.map_rx().map_err(|e| err("RX ring mapping", e))?;

        // Lend frames to the kernel.
        let lend = config.fill_frames.min(config.fill_ring_size).min(config.umem_frames);
        let frame_size = u64::from(config.frame_size);
        let mut fill = device.fill(lend);
        let filled = fill.insert((0..u64::from(lend)).map(|i| i * frame_size));
        fill.commit();
        drop(fill);
        if filled != lend {
            return Err(XskError::Socket {
                interface: interface.to_owned(),
                queue,
                step: "initial fill",
                errno: format!("only {filled} of {lend} frames fitted"),
            });
        }
        log::info!("AF_XDP socket on {interface} queue {queue} bound in {mode} mode");
        Ok(Self { queue, mode, rx, device, user, _umem: umem, area })
    }

    /// What a refused step means when the process lacks a capability: a UMEM over the
    /// locked-memory limit without CAP_IPC_LOCK (the kernel counts the UMEMs of all the
    /// user's processes against RLIMIT_MEMLOCK and answers ENOBUFS), or an AF_XDP socket
    /// without CAP_NET_RAW (EPERM). `None` when it is something else.
    fn refusal(
        interface: &str,
        queue: u32,
        bytes: usize,
        step: &'static str,
        errno: i32,
    ) -> Option<XskError> {
        let source = std::io::Error::from_raw_os_error(errno);
        if step == "UMEM registration"
            && errno == libc::ENOBUFS
            && !crate::sys::missing_capabilities(&[Capability::IpcLock]).is_empty()
        {
            let limit = crate::sys::memlock_limit();
            return Some(XskError::MemlockLimit {
                interface: interface.to_owned(),
                queue,
                bytes,
                limit,
                source,
            });
        }
        let step = format!("open an AF_XDP socket on {interface} queue {queue} ({step})");
        CapabilityError::check(step, &[Capability::NetRaw], errno == libc::EPERM, source)
            .ok()
            .map(|missing| XskError::Capability(Box::new(missing)))
    }

    /// Registers the UMEM on a new socket, sets up its rings and binds it with `flags`.
    fn bind(
        area: &Area,
        config: &XskConfig,
        info: &IfInfo,
        flags: u16,
    ) -> Result<(Umem, DeviceQueue, User), (&'static str, xdpilone::Errno)> {
        let umem_config = UmemConfig {
            fill_size: config.fill_ring_size,
            complete_size: config.fill_ring_size,
            frame_size: config.frame_size,
            headroom: 0,
            flags: 0,
        };
        let slice = NonNull::slice_from_raw_parts(area.ptr, area.len);
        // SAFETY: `slice` is a page-aligned mapping of exactly `len` bytes, which outlives the
        // UMEM: both live in the same `XskSocket`, whose field order drops the area last.
        let umem = unsafe { Umem::new(umem_config, slice) }.map_err(|e| ("UMEM registration", e))?;
        let socket = Socket::with_shared(info, &umem).map_err(|e| ("socket", e))?;
        let device = umem.fq_cq(&socket).map_err(|e| ("fill/completion rings", e))?;
        let socket_config = SocketConfig {
            rx_size: NonZeroU32::new(config.rx_ring_size),
            tx_size: None,
            bind_flags: flags | SocketConfig::XDP_BIND_NEED_WAKEUP,
        };
        let user = umem.rx_tx(&socket, &socket_config).map_err(|e| ("RX ring", e))?;
        umem.bind(&user).map_err(|e| ("bind", e))?;
        Ok((umem, device, user))
    }

    /// The RX queue this socket is bound to.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// How the socket is bound.
    pub fn mode(&self) -> XskMode {
        self.mode
    }

    /// What backs the socket's UMEM.
    pub fn umem_backing(&self) -> UmemBacking {
        self.area.backing
    }

    /// The socket's descriptor, for the XDP program's socket map.
    pub fn raw_fd(&self) -> i32 {
        self.user.as_raw_fd()
    }

    /// Hands up to `max` received frames to `f` (metadata, frame bytes), then returns their
    /// UMEM frames to the fill ring. Returns the number of frames.
    ///
    /// Frames whose descriptor does not fit the UMEM (never expected) are skipped and counted
    /// in the return value's second field.
    #[inline]
    pub fn receive(&mut self, max: u32, mut f: impl FnMut(&FrameMeta, &[u8])) -> (u32, u32) {
        let area_ptr = self.area.ptr.as_ptr();
        let area_len = self.area.len as u64;
        let mut rx = self.rx.receive(max);
        let n = rx.capacity();
        if n == 0 {
            return (0, 0);
        }
        let mut invalid = 0;
        let mut handled = 0;
        // Every frame taken from the RX ring goes straight back to the fill ring. The fill ring
        // always has room for them (the number of lent frames is fixed and at most its size),
        // but one reservation can return fewer slots than asked: the ring's cached consumer
        // index is refreshed only when the cached view shows no room at all. So when a
        // reservation runs out, it is committed and a new one taken, which refreshes the view.
        let mut fill = self.device.fill(n);
        while let Some(desc) = rx.read() {
            let start = desc.addr;
            let end = start + u64::from(desc.len);
            if start < FRAME_META_LEN as u64 || end > area_len {
                invalid += 1;
            } else {
                // SAFETY: `start - FRAME_META_LEN .. end` lies inside the UMEM mapping (checked
                // above). The kernel wrote this frame and its metadata before publishing the
                // descriptor (the RX ring's acquire load in `receive` orders our reads after its
                // writes), and does not touch the frame again until we return it to the fill
                // ring, after `f` has returned.
                let (meta, data) = unsafe {
                    let meta =
                        area_ptr.add((start as usize) - FRAME_META_LEN).cast::<FrameMeta>().read_unaligned();
                    let data = std::slice::from_raw_parts(area_ptr.add(start as usize), desc.len as usize);
                    (meta, data)
                };
                f(&meta, data);
            }
            handled += 1;
            while !fill.insert_once(desc.addr) {
                fill.commit();
                drop(fill);
                fill = self.device.fill(n - handled + 1);
            }
        }
        fill.commit();
        drop(fill);
        rx.release();
        drop(rx);
        if self.device.needs_wakeup() {
            self.device.wake();
        }
        (handled, invalid)
    }

    /// Waits up to `timeout_ms` for frames on the RX ring.
    pub fn wait(&self, timeout_ms: i32) {
        let mut pfd = libc::pollfd { fd: self.raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    }

    /// The kernel's counters for this socket.
    pub fn stats(&self) -> XskStats {
        match self.user.statistics_v2() {
            Ok(s) => XskStats {
                rx_dropped: s.rx_dropped,
                rx_ring_full: s.rx_ring_full,
                rx_fill_ring_empty_descs: s.rx_fill_ring_empty_descs,
                rx_invalid_descs: s.rx_invalid_descs,
            },
            Err(e) => {
                log::warn!("XDP_STATISTICS on queue {}: {e}", self.queue);
                XskStats::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UMEM: usize = 16 << 20;

    /// Held by the tests whose outcome depends on the reserved huge pages free, one of which
    /// reserves some.
    static HUGE_PAGES: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Writes and reads back every page of `area`.
    fn exercise(area: &Area) {
        for offset in (0..area.len).step_by(4096) {
            // SAFETY: inside the area, which this test alone uses.
            unsafe { area.ptr.as_ptr().add(offset).write(offset as u8 | 1) };
        }
        for offset in (0..area.len).step_by(4096) {
            // SAFETY: as above.
            assert_eq!(unsafe { area.ptr.as_ptr().add(offset).read() }, offset as u8 | 1);
        }
    }

    #[test]
    fn a_umem_without_huge_pages_is_base_pages() {
        let area = Area::new(UMEM, false).unwrap();
        assert_eq!(area.backing, UmemBacking::Pages);
        assert_eq!(area.huge_bytes(), 0);
        exercise(&area);
    }

    #[test]
    fn a_umem_gets_transparent_huge_pages_where_the_host_allows_them() {
        let _alone = HUGE_PAGES.lock().unwrap_or_else(|e| e.into_inner());
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        let reserved = reserved_huge_pages_free() >= UMEM;
        let area = Area::new(UMEM, true).unwrap();
        if reserved {
            assert_eq!(area.backing, UmemBacking::Reserved, "reserved huge pages are free");
        } else if mode.contains("[never]") || mode.is_empty() {
            assert_eq!(area.backing, UmemBacking::Pages, "THP: {mode}");
        } else {
            assert_eq!(area.ptr.as_ptr() as usize % HUGE_PAGE, 0, "aligned to a huge page");
            let UmemBacking::Transparent { huge_bytes } = area.backing else {
                panic!("THP is {mode:?}, yet the UMEM got {}", area.backing)
            };
            assert!(huge_bytes > 0 && huge_bytes <= UMEM as u64, "{huge_bytes}");
        }
        exercise(&area);
    }

    #[test]
    fn a_umem_takes_reserved_huge_pages_when_enough_are_free() {
        let _alone = HUGE_PAGES.lock().unwrap_or_else(|e| e.into_inner());
        let knob = "/proc/sys/vm/nr_hugepages";
        let Ok(before) = std::fs::read_to_string(knob) else { return };
        let before: usize = before.trim().parse().unwrap();
        let wanted = before + UMEM / HUGE_PAGE;
        if std::fs::write(knob, wanted.to_string()).is_err() {
            eprintln!("cannot reserve huge pages here (not root?): skipped");
            return;
        }
        struct Restore(usize);
        impl Drop for Restore {
            fn drop(&mut self) {
                let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.0.to_string());
            }
        }
        let _restore = Restore(before);
        let total: usize = std::fs::read_to_string(knob).unwrap().trim().parse().unwrap();
        assert_eq!(total, wanted, "the kernel found memory for the huge pages asked for");
        let area = Area::new(UMEM, true).unwrap();
        assert_eq!(area.backing, UmemBacking::Reserved);
        exercise(&area);
        // Not enough left for a second one: it falls back, and says so.
        let second = Area::new(UMEM, true).unwrap();
        assert_ne!(second.backing, UmemBacking::Reserved);
        exercise(&second);
    }
}
