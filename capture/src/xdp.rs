//! The XDP program: loading, attaching to an interface, and reading its counters.

use std::ffi::CString;

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use capture_common::XdpCounters;

/// The XDP program built by `build.rs` from the `capture-ebpf` crate.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tapstream-xdp"));

const ENTRY_PROGRAM: &str = "tapstream_xdp";
const COUNTERS_MAP: &str = "COUNTERS";

/// How the program is attached to the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// Native (driver) mode if the driver supports it, else generic.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode: works on every interface, slower.
    Generic,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

/// Errors loading or attaching the XDP program.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("cannot load the XDP program (are you root, or do you have CAP_BPF and CAP_NET_ADMIN?)")]
    Load(#[source] aya::EbpfError),
    #[error("the XDP object has no {kind} named {name}")]
    Missing { kind: &'static str, name: &'static str },
    #[error("cannot load the XDP program into the kernel")]
    Verify(#[source] aya::programs::ProgramError),
    #[error("no interface named {interface:?}")]
    NoSuchInterface { interface: String },
    #[error("cannot attach XDP to {interface} in {mode} mode")]
    Attach {
        interface: String,
        mode: AttachMode,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot read the XDP counters")]
    Counters(#[source] aya::maps::MapError),
}

/// The loaded XDP program, attached to one interface. Detached when dropped.
pub struct XdpProgram {
    ebpf: Ebpf,
    interface: String,
    link: Option<XdpLinkId>,
    mode: AttachMode,
}

impl XdpProgram {
    /// Loads the program into the kernel (not attached yet).
    pub fn load(interface: &str) -> Result<Self, XdpError> {
        let mut ebpf = Ebpf::load(PROGRAM_OBJECT).map_err(XdpError::Load)?;
        let program = Self::entry(&mut ebpf)?;
        program.load().map_err(XdpError::Verify)?;
        Ok(Self { ebpf, interface: interface.to_owned(), link: None, mode: AttachMode::Auto })
    }

    fn entry(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
        let missing = XdpError::Missing { kind: "program", name: ENTRY_PROGRAM };
        ebpf.program_mut(ENTRY_PROGRAM)
            .ok_or(missing)?
            .try_into()
            .map_err(|_| XdpError::Missing { kind: "XDP program", name: ENTRY_PROGRAM })
    }

    /// Attaches the program to the interface. In `Auto` mode native is tried first, then
    /// generic; [`XdpProgram::mode`] says which one is in use.
    pub fn attach(&mut self, mode: AttachMode) -> Result<AttachMode, XdpError> {
        let name = CString::new(self.interface.as_str())
            .map_err(|_| XdpError::NoSuchInterface { interface: self.interface.clone() })?;
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(XdpError::NoSuchInterface { interface: self.interface.clone() });
        }
        let tries: &[(AttachMode, XdpMode)] = match mode {
            AttachMode::Auto => &[(AttachMode::Native, XdpMode::Driver), (AttachMode::Generic, XdpMode::Skb)],
            AttachMode::Native => &[(AttachMode::Native, XdpMode::Driver)],
            AttachMode::Generic => &[(AttachMode::Generic, XdpMode::Skb)],
        };
        let interface = self.interface.clone();
        let program = Self::entry(&mut self.ebpf)?;
        let mut last = None;
        for &(ours, theirs) in tries {
            match program.attach(ifindex, theirs) {
                Ok(link) => {
                    self.link = Some(link);
                    self.mode = ours;
                    log::info!("XDP attached to {interface} in {ours} mode");
                    return Ok(ours);
                }
                Err(source) => {
                    log::debug!("XDP {ours} attach to {interface} failed: {source}");
                    last = Some(XdpError::Attach { interface: interface.clone(), mode: ours, source });
                }
            }
        }
        Err(last.expect("at least one attach mode is tried"))
    }

    /// The mode the program is attached in.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// The interface the program is for.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The program's counters, summed over all CPUs.
    pub fn counters(&self) -> Result<XdpCounters, XdpError> {
        let map = self.ebpf.map(COUNTERS_MAP).ok_or(XdpError::Missing { kind: "map", name: COUNTERS_MAP })?;
        let array = PerCpuArray::<_, XdpCounters>::try_from(map).map_err(XdpError::Counters)?;
        let per_cpu = array.get(&0, 0).map_err(XdpError::Counters)?;
        let mut total = XdpCounters::default();
        for cpu in per_cpu.iter() {
            total.add(cpu);
        }
        Ok(total)
    }
}
