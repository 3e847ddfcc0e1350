//! A small FFI to libpcap's filter compiler and interpreter.
//!
//! Expressions compile on a dead DLT_EN10MB handle (a live Linux handle would emit VLAN
//! extension loads that XDP cannot run), with the optimizer on and the netmask unknown, as the
//! platform notes prescribe. libpcap's compiler and `bpf_image` keep global state in the
//! versions Debian ships, so every call into them holds one lock.

use std::{
    ffi::{CStr, CString, c_char, c_int, c_uint, c_void},
    sync::Mutex,
};

use super::FilterError;

/// DLT_EN10MB: Ethernet.
const DLT_EN10MB: c_int = 1;
/// The snapshot length the program is compiled for (tcpdump's default).
const SNAPLEN: c_int = 262_144;
/// PCAP_NETMASK_UNKNOWN.
const NETMASK_UNKNOWN: u32 = 0xffff_ffff;

/// One classic BPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BpfInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

#[repr(C)]
struct BpfProgram {
    bf_len: c_uint,
    bf_insns: *mut BpfInsn,
}

#[repr(C)]
struct PcapPkthdr {
    ts: libc::timeval,
    caplen: u32,
    len: u32,
}

#[link(name = "pcap")]
unsafe extern "C" {
    fn pcap_open_dead(linktype: c_int, snaplen: c_int) -> *mut c_void;
    fn pcap_compile(
        p: *mut c_void,
        fp: *mut BpfProgram,
        s: *const c_char,
        optimize: c_int,
        mask: u32,
    ) -> c_int;
    fn pcap_geterr(p: *mut c_void) -> *mut c_char;
    fn pcap_freecode(fp: *mut BpfProgram);
    fn pcap_close(p: *mut c_void);
    fn pcap_offline_filter(fp: *const BpfProgram, h: *const PcapPkthdr, pkt: *const u8) -> c_int;
    fn bpf_image(insn: *const BpfInsn, n: c_int) -> *mut c_char;
}

/// Serializes calls into libpcap's compiler and `bpf_image`.
static LIBPCAP: Mutex<()> = Mutex::new(());

/// A compiled filter: libpcap's classic BPF for Ethernet frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CbpfProgram {
    expression: String,
    insns: Vec<BpfInsn>,
}

impl CbpfProgram {
    /// Compiles `expression` as tcpdump would for Ethernet.
    pub fn compile(expression: &str) -> Result<Self, FilterError> {
        let text = CString::new(expression).map_err(|_| FilterError::Nul)?;
        let _guard = LIBPCAP.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: plain constructor; the handle is closed below on every path.
        let handle = unsafe { pcap_open_dead(DLT_EN10MB, SNAPLEN) };
        if handle.is_null() {
            return Err(FilterError::NoHandle);
        }
        let mut program = BpfProgram { bf_len: 0, bf_insns: std::ptr::null_mut() };
        // SAFETY: `handle` is live, `program` is a valid out-parameter, `text` is a C string that
        // outlives the call; the lock serializes libpcap's global compiler state.
        let rc = unsafe { pcap_compile(handle, &mut program, text.as_ptr(), 1, NETMASK_UNKNOWN) };
        let result = if rc != 0 {
            // SAFETY: after a failed compile the handle's error buffer holds a C string, valid
            // until the next call on the handle; it is copied before the handle is closed.
            let message = unsafe { CStr::from_ptr(pcap_geterr(handle)) }.to_string_lossy().into_owned();
            Err(FilterError::Syntax { expression: expression.to_owned(), message })
        } else {
            // SAFETY: a successful compile filled `program` with `bf_len` instructions at
            // `bf_insns`; they are copied, then freed with pcap_freecode.
            let insns =
                unsafe { std::slice::from_raw_parts(program.bf_insns, program.bf_len as usize) }.to_vec();
            // SAFETY: `program` came from pcap_compile and is freed once.
            unsafe { pcap_freecode(&mut program) };
            Ok(Self { expression: expression.to_owned(), insns })
        };
        // SAFETY: `handle` came from pcap_open_dead and is closed once.
        unsafe { pcap_close(handle) };
        result
    }

    /// A program given as instructions (for tests of the translation); `label` stands in for
    /// the expression.
    pub fn from_instructions(label: &str, insns: Vec<BpfInsn>) -> Self {
        Self { expression: label.to_owned(), insns }
    }

    /// The expression it was compiled from.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The instructions.
    pub fn instructions(&self) -> &[BpfInsn] {
        &self.insns
    }

    /// The program as `tcpdump -d` prints it.
    pub fn dump(&self) -> String {
        let _guard = LIBPCAP.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (i, insn) in self.insns.iter().enumerate() {
            // SAFETY: `insn` is a valid instruction; bpf_image returns a pointer to a static
            // buffer that stays valid until the next call, which the lock rules out until the
            // string is copied.
            let line = unsafe { CStr::from_ptr(bpf_image(insn, i as c_int)) };
            out.push_str(&line.to_string_lossy());
            out.push('\n');
        }
        out
    }

    /// Whether libpcap's interpreter accepts `frame` (the captured bytes) of a frame `wire_len`
    /// bytes long on the wire.
    pub fn matches(&self, frame: &[u8], wire_len: u32) -> bool {
        let program =
            BpfProgram { bf_len: self.insns.len() as c_uint, bf_insns: self.insns.as_ptr().cast_mut() };
        let header = PcapPkthdr {
            ts: libc::timeval { tv_sec: 0, tv_usec: 0 },
            caplen: frame.len() as u32,
            len: wire_len.max(frame.len() as u32),
        };
        // SAFETY: `program` points at our instructions, which the interpreter only reads;
        // `frame` holds `caplen` bytes; the interpreter checks every load against `caplen`.
        unsafe { pcap_offline_filter(&program, &header, frame.as_ptr()) != 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PCAP file with only a header (Ethernet, snaplen 262144), for `tcpdump -d -r`.
    fn empty_capture() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let header = tapstream_pcap::FileHeader { snaplen: 262_144, linktype: 1, nanos: false }.encode();
        std::fs::write(file.path(), header).unwrap();
        file
    }

    fn tcpdump_d(file: &std::path::Path, expression: &str) -> std::process::Output {
        std::process::Command::new("tcpdump")
            .arg("-d")
            .arg("-r")
            .arg(file)
            .arg(expression)
            .output()
            .expect("run tcpdump")
    }

    #[test]
    fn programs_print_as_tcpdump_prints_them() {
        let file = empty_capture();
        for expression in
            ["tcp port 443 and net 10.0.0.0/8", "vlan and udp", "ip6 and not icmp6", "greater 1000", ""]
        {
            let ours = CbpfProgram::compile(expression).unwrap();
            let theirs = tcpdump_d(file.path(), expression);
            assert!(theirs.status.success());
            assert_eq!(ours.dump(), String::from_utf8_lossy(&theirs.stdout), "{expression:?}");
        }
    }

    #[test]
    fn a_bad_expression_gets_libpcaps_own_message() {
        let file = empty_capture();
        for expression in ["tcp port", "host 999.1.1.1", "nonsense", "port 70000"] {
            let err = CbpfProgram::compile(expression).unwrap_err();
            let FilterError::Syntax { message, .. } = &err else { panic!("{err:?}") };
            let theirs = tcpdump_d(file.path(), expression);
            assert!(!theirs.status.success());
            let stderr = String::from_utf8_lossy(&theirs.stderr);
            assert!(
                stderr.contains(message.as_str()),
                "libpcap says {message:?}; tcpdump printed {stderr:?}"
            );
            assert!(err.to_string().contains(expression), "the error names the expression: {err}");
        }
    }

    #[test]
    fn ip_broadcast_needs_a_netmask_we_never_have() {
        // tcpdump reading a file compiles with netmask 0 and accepts it; with the netmask
        // unknown, as for a tap host's filters, libpcap refuses it and says why.
        let err = CbpfProgram::compile("ip broadcast").unwrap_err().to_string();
        assert!(err.contains("netmask"), "{err}");
    }

    #[test]
    fn matching_follows_libpcap() {
        let arp_request = {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
            f.extend_from_slice(&[
                0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 192, 168, 1, 10, 0, 0, 0, 0, 0, 0, 192, 168, 1, 1,
            ]);
            f
        };
        let host = CbpfProgram::compile("host 192.168.1.10").unwrap();
        assert!(
            host.matches(&arp_request, arp_request.len() as u32),
            "`host` also matches ARP, as in libpcap"
        );
        assert!(CbpfProgram::compile("ether broadcast").unwrap().matches(&arp_request, 42));
        assert!(!CbpfProgram::compile("ip").unwrap().matches(&arp_request, 42));
        assert!(
            CbpfProgram::compile("greater 1000").unwrap().matches(&arp_request[..20], 1500),
            "wire length counts"
        );
        assert!(!CbpfProgram::compile("tcp").unwrap().matches(&[], 0), "an empty frame never crashes");
    }
}
