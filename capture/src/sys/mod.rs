//! The system calls tapstream makes outside the AF_XDP rings (`datapath::xsk`) and libpcap
//! (`filter::pcap`), each behind a safe function: interface lookup, RX queue count, core
//! pinning, clocks, random bytes, resource limits, groups, polling, the filter compiler's
//! child; which capabilities the process has, to name the missing one when the kernel
//! refuses; and the process's [`Shutdown`], which signals trigger. Code elsewhere holds no
//! `unsafe` (a test below checks it).

#[cfg(test)]
pub(crate) mod alloc_count;
mod process;
mod shutdown;

pub use process::confine_child;
pub use shutdown::Shutdown;

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    time::Duration,
};

/// The index of interface `name` in this thread's network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 { Err(io::Error::last_os_error()) } else { Ok(index) }
}

/// The index of device `name` now, or `None` if there is no such device (it was removed,
/// renamed, or is not there yet). Other failures (out of descriptors, say) are errors: they
/// say nothing about the device.
pub fn device_index(name: &str) -> io::Result<Option<u32>> {
    match ifindex(name) {
        Ok(index) => Ok(Some(index)),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

const ETHTOOL_GCHANNELS: u32 = 0x3c;

/// `struct ethtool_channels` from linux/ethtool.h.
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

/// The number of RX queues of `interface` (ethtool's channel count: combined + rx-only), or 1
/// when the driver does not report channels.
pub fn rx_queues(interface: &str) -> io::Result<u32> {
    let mut channels = EthtoolChannels { cmd: ETHTOOL_GCHANNELS, ..Default::default() };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = interface.as_bytes();
    if name.len() >= ifr.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut channels).cast();
    // SAFETY: a plain datagram socket, owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: SIOCETHTOOL reads `ifr` and writes the ethtool_channels `ifr` points to; both
    // live until the call returns.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::SIOCETHTOOL, &mut ifr) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Ok(1),
            _ => Err(err),
        };
    }
    Ok((channels.combined_count + channels.rx_count).max(1))
}

/// Pins the calling thread to one CPU core.
pub fn pin_to_core(core: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if core >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("core {core} out of range")));
    }
    // SAFETY: `core` is below CPU_SETSIZE (checked above), so the bit is inside `set`.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The current time of `clock` (`CLOCK_REALTIME`, `CLOCK_TAI`...) in nanoseconds since its
/// epoch.
#[inline]
pub fn clock_ns(clock: libc::clockid_t) -> io::Result<i128> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the kernel to write; an unknown clock is refused
    // with EINVAL, not undefined.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec))
}

/// Fills `buf` with random bytes from the kernel's pool (getrandom(2); blocks only while the
/// pool is not yet initialised, early in boot).
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is valid for writes of its length; the kernel writes at most that.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        } else {
            // Large requests may be filled in part (over 32 MiB, or when a signal comes).
            filled += n as usize;
        }
    }
    Ok(())
}

/// The id of the group `name`, or `None` if there is none of that name.
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    /// Beyond this, a group's entry (its member list) is not believed.
    const MAX_BUFFER: usize = 1 << 20;
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: `struct group` is plain data (integers and pointers); all-zero is valid.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: the name is a valid C string; `group` and `found` are valid for writes; the
        // strings getgrnam_r points `group`'s fields at go in `buf`, of the length passed. The
        // reentrant form, as other threads may look up users or groups meanwhile.
        let rc = unsafe {
            libc::getgrnam_r(c.as_ptr(), &mut group, buf.as_mut_ptr().cast(), buf.len(), &mut found)
        };
        match rc {
            0 if found.is_null() => return Ok(None),
            // Only the id is read: it does not point into `buf`.
            0 => return Ok(Some(group.gr_gid)),
            libc::ERANGE if buf.len() < MAX_BUFFER => buf.resize(buf.len() * 2, 0),
            libc::EINTR => {}
            // What getgrnam_r(3) says some systems return for a name not found.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// The name of group `gid`, or `None` if the host has none.
pub fn group_name(gid: u32) -> io::Result<Option<String>> {
    /// Beyond this, a group's entry (its member list) is not believed.
    const MAX_BUFFER: usize = 1 << 20;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: `struct group` is plain data (integers and pointers); all-zero is valid.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: `group` and `found` are valid for writes; the strings getgrgid_r points
        // `group`'s fields at go in `buf`, of the length passed. The reentrant form, as other
        // threads may look up users or groups meanwhile.
        let rc = unsafe { libc::getgrgid_r(gid, &mut group, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
        match rc {
            0 if found.is_null() || group.gr_name.is_null() => return Ok(None),
            0 => {
                // SAFETY: on success `gr_name` points at a NUL-terminated string in `buf`, which
                // lives until the end of this function; it is copied out here.
                let name = unsafe { std::ffi::CStr::from_ptr(group.gr_name) };
                return Ok(Some(name.to_string_lossy().into_owned()));
            }
            libc::ERANGE if buf.len() < MAX_BUFFER => buf.resize(buf.len() * 2, 0),
            libc::EINTR => {}
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// The supplementary groups of the peer of the Unix socket `fd`, as they were when it
/// connected (`SO_PEERGROUPS`, Linux 4.13).
pub fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    /// NGROUPS_MAX on Linux.
    const MAX_GROUPS: usize = 65_536;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `groups` is valid for writes of `len` bytes, which the kernel writes at most;
        // it sets `len` to the bytes written, or needed when ERANGE.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        match e.raw_os_error() {
            Some(libc::ERANGE) if needed > groups.len() && needed <= MAX_GROUPS => groups.resize(needed, 0),
            _ => return Err(e),
        }
    }
}

/// Waits up to `timeout` (whole milliseconds) for `fd` to be readable; returns whether it is.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, of a descriptor `fd` keeps open, for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, millis) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc > 0 && pfd.revents & libc::POLLIN != 0)
}

/// The cores this process may run on.
pub fn online_cores() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}

/// `BPF_PROG_TEST_RUN`.
const BPF_PROG_TEST_RUN: libc::c_int = 10;

/// The `test` member of `union bpf_attr` (linux/bpf.h), as far as this uses it.
#[repr(C)]
#[derive(Default)]
struct BpfTestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `struct xdp_md` (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// Runs the XDP program `prog_fd` on `frame` in the kernel, `repeat` times, with the metadata
/// area `meta` in front of the frame; returns the metadata and frame
/// as the program left them, its return value and the mean run time in nanoseconds.
/// Needs kernel 5.15 (metadata in test runs).
pub fn xdp_test_run(prog_fd: i32, meta: &[u8], frame: &[u8], repeat: u32) -> io::Result<(Vec<u8>, u32, u32)> {
    let meta_len = meta.len();
    let data_in = [meta, frame].concat();
    // The program may grow the frame; the kernel refuses to copy out more than this holds.
    let mut data_out = vec![0u8; data_in.len() + 4096];
    let mut ctx = XdpMd { data: meta_len as u32, data_end: data_in.len() as u32, ..Default::default() };
    let mut attr = BpfTestRunAttr {
        prog_fd: prog_fd as u32,
        data_size_in: data_in.len() as u32,
        data_size_out: data_out.len() as u32,
        data_in: data_in.as_ptr() as u64,
        data_out: data_out.as_mut_ptr() as u64,
        repeat,
        ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
        ctx_in: &raw mut ctx as u64,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid bpf_attr for BPF_PROG_TEST_RUN whose pointers refer to live
    // buffers of the sizes given (the kernel writes at most `data_size_out` bytes to
    // `data_out`); the size passed is the struct's.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &raw mut attr, std::mem::size_of::<BpfTestRunAttr>())
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    data_out.truncate(attr.data_size_out as usize);
    Ok((data_out, attr.retval, attr.duration))
}

/// A capability the capture needs (the systemd unit grants exactly these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    /// Create BPF maps and load programs.
    Bpf,
    /// Load programs that do pointer arithmetic on packets, as the filters do.
    Perfmon,
    /// Load XDP programs, create the socket map, attach to an interface.
    NetAdmin,
    /// Open AF_XDP sockets.
    NetRaw,
    /// Lock the UMEM in memory beyond RLIMIT_MEMLOCK.
    IpcLock,
}

impl Capability {
    /// The capability's bit in the kernel's sets (linux/capability.h).
    fn bit(self) -> u32 {
        match self {
            Self::NetAdmin => 12,
            Self::NetRaw => 13,
            Self::IpcLock => 14,
            Self::Perfmon => 38,
            Self::Bpf => 39,
        }
    }

    /// Its name, as systemd and capsh spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bpf => "CAP_BPF",
            Self::Perfmon => "CAP_PERFMON",
            Self::NetAdmin => "CAP_NET_ADMIN",
            Self::NetRaw => "CAP_NET_RAW",
            Self::IpcLock => "CAP_IPC_LOCK",
        }
    }
}

/// What loading the XDP and filter programs needs: maps and programs (CAP_BPF), programs of
/// the XDP type and the socket map (CAP_NET_ADMIN), pointer arithmetic on packets, which
/// filters do (CAP_PERFMON).
pub const BPF_LOAD_CAPABILITIES: [Capability; 3] =
    [Capability::Bpf, Capability::NetAdmin, Capability::Perfmon];

/// Capabilities a step needs that the process lacks, for messages: `CAP_BPF and CAP_PERFMON`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MissingCapabilities(pub Vec<Capability>);

impl MissingCapabilities {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for MissingCapabilities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, cap) in self.0.iter().enumerate() {
            let sep = match i {
                0 => "",
                i if i + 1 == self.0.len() => " and ",
                _ => ", ",
            };
            write!(f, "{sep}{}", cap.name())?;
        }
        Ok(())
    }
}

/// This thread's effective capability set, from `/proc` (`None` if it cannot be read).
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status")
        .or_else(|_| std::fs::read_to_string("/proc/self/status"))
        .ok()?;
    effective_from_status(&status)
}

/// The `CapEff:` field of a `/proc/*/status` text.
fn effective_from_status(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Those of `needed` that this thread does not have (none if its set cannot be read: a
/// message then says what the kernel said, and guesses nothing).
pub fn missing_capabilities(needed: &[Capability]) -> MissingCapabilities {
    let Some(effective) = effective_capabilities() else { return MissingCapabilities::default() };
    MissingCapabilities(needed.iter().copied().filter(|c| effective & (1 << c.bit()) == 0).collect())
}

/// Whether the kernel refused for lack of privilege somewhere in `error`'s chain (EPERM or
/// EACCES; the verifier's EACCES included, which is how a missing CAP_PERFMON shows).
pub fn refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// The kernel refused a step for lack of privilege, and this process lacks a capability the
/// step needs.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot {step}: this process lacks {missing} (grant it, as the systemd unit's \
     AmbientCapabilities= does, or run as root)"
)]
pub struct CapabilityError {
    /// What could not be done (`load the XDP program`).
    pub step: String,
    /// The capabilities it needs that the process does not have.
    pub missing: MissingCapabilities,
    /// What the kernel said.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl CapabilityError {
    /// `error` of `step` as a missing capability, if the kernel refused for lack of privilege
    /// (`refused`: see [`refused`]) and this process lacks some of `needed`; otherwise `error`
    /// as it is.
    pub fn check<E: std::error::Error + Send + Sync + 'static>(
        step: impl Into<String>,
        needed: &[Capability],
        refused: bool,
        error: E,
    ) -> Result<Self, E> {
        if !refused {
            return Err(error);
        }
        let missing = missing_capabilities(needed);
        if missing.is_empty() {
            return Err(error);
        }
        Ok(Self { step: step.into(), missing, source: Box::new(error) })
    }
}

/// The soft limit on locked memory (`RLIMIT_MEMLOCK`) in bytes; `None`: unlimited or unknown.
pub fn memlock_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid rlimit for the kernel to fill in.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// `N` random bytes from the kernel; zeros if it has none to give (getrandom does not fail for
/// so few bytes once the pool is initialised: callers add the time).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut random = [0u8; N];
    let _ = fill_random(&mut random);
    random
}

/// Now, in ns since the Unix epoch (0 for a clock set before 1970).
pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The soft limit on open file descriptors (`RLIMIT_NOFILE`); `None`: unlimited or unknown.
pub fn open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid rlimit for the kernel to fill in.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Takes an exclusive flock on `file` without waiting; false if another open file holds it.
/// The lock goes with the open file (released when it is closed, and when the process dies,
/// even when it is killed).
pub fn try_lock_exclusive(file: &std::fs::File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor `file` keeps open for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(false) } else { Err(err) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_has_no_index_and_is_no_error() {
        assert!(matches!(device_index("lo"), Ok(Some(index)) if index > 0));
        assert!(matches!(device_index("tsnosuchdev0"), Ok(None)));
        assert!(device_index("a\0b").is_err(), "a name no device can have is an error, not an absence");
    }

    #[test]
    fn missing_capabilities_read_as_a_list() {
        let caps = |c: &[Capability]| MissingCapabilities(c.to_vec()).to_string();
        assert_eq!(caps(&[Capability::Bpf]), "CAP_BPF");
        assert_eq!(caps(&[Capability::Bpf, Capability::Perfmon]), "CAP_BPF and CAP_PERFMON");
        assert_eq!(
            caps(&[Capability::Bpf, Capability::NetAdmin, Capability::Perfmon]),
            "CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
        );
        let status = "Name:\ttapstream\nCapEff:\t0000000000003000\n";
        assert_eq!(effective_from_status(status), Some((1 << 12) | (1 << 13)));
    }

    #[test]
    fn clocks_random_bytes_limits_groups_and_polls() {
        let realtime = clock_ns(libc::CLOCK_REALTIME).unwrap();
        let system = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        assert!((realtime - system.as_nanos() as i128).abs() < 1_000_000_000, "{realtime} vs {system:?}");
        assert!(clock_ns(-1000).is_err(), "no such clock");

        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        fill_random(&mut a).unwrap();
        fill_random(&mut b).unwrap();
        assert!(a != b && a != [0; 32], "random: {a:?} {b:?}");
        fill_random(&mut []).unwrap();

        assert_ne!(open_files_limit(), Some(0));

        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(group_id("tsnosuchgroup").unwrap(), None);
        assert!(group_id("a\0b").is_err());

        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsFd as _;
        let start = std::time::Instant::now();
        assert!(!poll_readable(rx.as_fd(), Duration::from_millis(50)).unwrap());
        assert!(start.elapsed() >= Duration::from_millis(50));
        std::io::Write::write_all(&mut tx, b"x").unwrap();
        assert!(poll_readable(rx.as_fd(), Duration::from_secs(60)).unwrap());
    }

    #[test]
    fn an_exclusive_lock_is_held_until_its_file_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = std::fs::File::create(&path).unwrap();
        let second = std::fs::File::open(&path).unwrap();
        assert!(try_lock_exclusive(&first).unwrap());
        assert!(!try_lock_exclusive(&second).unwrap(), "another open file holds it");
        drop(first);
        assert!(try_lock_exclusive(&second).unwrap());
    }

    /// Where `unsafe` may be written, relative to `capture/src`: this module (the system
    /// calls), the AF_XDP rings, libpcap's FFI.
    const UNSAFE_ALLOWED: [&str; 3] = ["sys/", "datapath/xsk.rs", "filter/pcap.rs"];

    #[test]
    fn unsafe_code_lives_only_in_sys_the_rings_and_libpcap() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    files.push(path);
                }
            }
        }
        assert!(files.len() > 20, "the sources are where they were: {}", root.display());
        let mut offenders = Vec::new();
        for path in files {
            let relative = path.strip_prefix(&root).unwrap().to_string_lossy().into_owned();
            if UNSAFE_ALLOWED
                .iter()
                .any(|a| if a.ends_with('/') { relative.starts_with(a) } else { relative == *a })
            {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            if let Some(line) = unsafe_line(&source) {
                offenders.push(format!("capture/src/{relative}:{line}"));
            }
        }
        offenders.sort();
        assert!(
            offenders.is_empty(),
            "`unsafe` outside {UNSAFE_ALLOWED:?} (move the call into a safe function in capture/src/sys): {}",
            offenders.join(", ")
        );
    }

    #[test]
    fn only_unsafe_in_code_counts() {
        assert_eq!(unsafe_line("fn f() {\n    unsafe { g() }\n}"), Some(2));
        assert_eq!(unsafe_line("unsafe impl Send for X {}"), Some(1));
        assert_eq!(unsafe_line("#[unsafe(no_mangle)]\nfn f() {}"), Some(1));
        assert_eq!(unsafe_line("let s = b\"x\"; unsafe {}"), Some(1));
        for clean in [
            "// unsafe here\nfn f() {}",
            "/// # Safety: unsafe\nfn f() {}",
            "/* unsafe /* nested unsafe */ unsafe */ fn f() {}",
            "let s = \"an unsafe \\\" quote unsafe\";",
            "let s = r#\"raw \" unsafe\"#;",
            "let s = br##\"raw \"# unsafe\"##;",
            "let c = '\"'; let s = \"unsafe\"; let d = '\\'';",
            "fn f<'a>(x: &'a str) -> &'a str { x } // unsafe",
            "let not_unsafe = 1; let unsafe_ish = 2; let r#type = 3;",
            "#![deny(unsafe_op_in_unsafe_fn, unsafe_code)]",
        ] {
            assert_eq!(unsafe_line(clean), None, "{clean}");
        }
    }

    /// The line of the first `unsafe` keyword in `source`'s code: comments, string literals
    /// (raw ones too) and character literals are not code.
    fn unsafe_line(source: &str) -> Option<usize> {
        let chars: Vec<char> = source.chars().collect();
        let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
        let ident = |c: char| c.is_alphanumeric() || c == '_';
        let (mut i, mut line) = (0, 1);
        // Skips to `end` (the index past a literal or comment), counting the lines passed.
        let skip = |from: usize, end: usize, line: &mut usize| {
            *line += chars[from..end.min(chars.len())].iter().filter(|&&c| c == '\n').count();
            end.min(chars.len())
        };
        while i < chars.len() {
            let c = chars[i];
            if c == '\n' {
                line += 1;
                i += 1;
            } else if c == '/' && at(i + 1) == '/' {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            } else if c == '/' && at(i + 1) == '*' {
                let (mut j, mut depth) = (i + 2, 1);
                while j < chars.len() && depth > 0 {
                    if at(j) == '/' && at(j + 1) == '*' {
                        depth += 1;
                        j += 2;
                    } else if at(j) == '*' && at(j + 1) == '/' {
                        depth -= 1;
                        j += 2;
                    } else {
                        j += 1;
                    }
                }
                i = skip(i, j, &mut line);
            } else if c == '"' {
                let mut j = i + 1;
                while j < chars.len() && chars[j] != '"' {
                    j += if chars[j] == '\\' { 2 } else { 1 };
                }
                i = skip(i, j + 1, &mut line);
            } else if c == '\'' {
                // A character literal ('x', '\n', '\u{1f}'), or a lifetime ('a), left as is.
                if at(i + 1) == '\\' {
                    let mut j = i + 3;
                    while j < chars.len() && chars[j] != '\'' {
                        j += 1;
                    }
                    i = skip(i, j + 1, &mut line);
                } else if at(i + 2) == '\'' {
                    i += 3;
                } else {
                    i += 1;
                }
            } else if ident(c) {
                let start = i;
                while i < chars.len() && ident(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                if word == "unsafe" {
                    return Some(line);
                }
                // A raw string: r"...", r#"..."#, br##"..."## (not a raw identifier, r#type).
                if matches!(word.as_str(), "r" | "br" | "cr") {
                    let hashes = chars[i..].iter().take_while(|&&c| c == '#').count();
                    if at(i + hashes) == '"' {
                        let close: Vec<char> =
                            std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
                        let mut j = i + hashes + 1;
                        while j < chars.len() && !chars[j..].starts_with(&close) {
                            j += 1;
                        }
                        i = skip(i, j + close.len(), &mut line);
                    }
                }
            } else {
                i += 1;
            }
        }
        None
    }
}
