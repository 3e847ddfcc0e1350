//! The XDP program: loading, attaching to an interface, its settings, its socket map and its
//! counters. The program's own diagnostics (aya-log) are carried to the daemon's log by a
//! background thread; nothing is logged per frame.

use std::{
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, ProgramArray, XskMap},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use capture_common::{FILTER_SLOT, MAX_QUEUES, XdpConfig, XdpCounters};

use crate::{
    filter::LoadedFilter,
    sys::{BPF_LOAD_CAPABILITIES, Capability, CapabilityError},
};

/// The XDP program built by `build.rs` from the `capture-ebpf` crate.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tapstream-xdp"));

const ENTRY_PROGRAM: &str = "tapstream_xdp";
const REDIRECT_PROGRAM: &str = "tapstream_redirect";
const COUNTERS_MAP: &str = "COUNTERS";
const CONFIG_MAP: &str = "CONFIG";
const XSKS_MAP: &str = "XSKS";
const FILTERS_MAP: &str = "FILTERS";

/// How the program is attached to the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
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

impl std::str::FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            other => Err(format!("unknown XDP mode {other:?} (auto, native or generic)")),
        }
    }
}

/// Errors loading or attaching the XDP program.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("cannot load the XDP program (are you root, or do you have CAP_BPF and CAP_NET_ADMIN?)")]
    Load(#[source] aya::EbpfError),
    #[error("the XDP object has no {kind} named {name}")]
    Missing { kind: &'static str, name: &'static str },
    #[error("the kernel refused the XDP program {name}")]
    Verify {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("no interface named {interface:?}")]
    NoSuchInterface { interface: String },
    #[error("cannot attach XDP to {interface} in {mode} mode")]
    Attach {
        interface: String,
        mode: AttachMode,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot use the XDP map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("RX queue {queue} is beyond the {MAX_QUEUES} queues the XDP program supports")]
    TooManyQueues { queue: u32 },
    #[error("cannot install the filter program")]
    Filter(#[source] crate::filter::FilterError),
    /// The kernel refused, and the process lacks a capability the step needs.
    #[error(transparent)]
    Capability(Box<CapabilityError>),
}

impl XdpError {
    /// `error` of `step` as a missing capability of `needed` if the kernel refused it and the
    /// process lacks one; otherwise what `otherwise` makes of it.
    fn or_capability<E: std::error::Error + Send + Sync + 'static>(
        step: &str,
        needed: &[Capability],
        error: E,
        otherwise: impl FnOnce(E) -> Self,
    ) -> Self {
        let refused = crate::sys::refused(&error);
        match CapabilityError::check(step, needed, refused, error) {
            Ok(missing) => Self::Capability(Box::new(missing)),
            Err(error) => otherwise(error),
        }
    }
}

/// The loaded XDP program, attached to one interface. Detached when dropped.
pub struct XdpProgram {
    ebpf: Ebpf,
    interface: String,
    link: Option<XdpLinkId>,
    mode: AttachMode,
    config: XdpConfig,
    /// The filter program in `FILTERS[FILTER_SLOT]`, kept loaded while it is installed.
    filter: Option<LoadedFilter>,
    /// The program installed before it, kept loaded until the next swap: a frame still
    /// running in it on another CPU must find its `NEXT` map intact (closing the map empties
    /// it).
    retired: Option<LoadedFilter>,
    logger: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl XdpProgram {
    /// Loads the programs into the kernel (not attached yet).
    pub fn load(interface: &str) -> Result<Self, XdpError> {
        let step = "load the XDP program";
        let mut ebpf = Ebpf::load(PROGRAM_OBJECT)
            .map_err(|e| XdpError::or_capability(step, &BPF_LOAD_CAPABILITIES, e, XdpError::Load))?;
        for name in [ENTRY_PROGRAM, REDIRECT_PROGRAM] {
            let verify = |source| XdpError::Verify { name, source };
            Self::program(&mut ebpf, name)?
                .load()
                .map_err(|e| XdpError::or_capability(step, &BPF_LOAD_CAPABILITIES, e, verify))?;
        }
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(spawn_logger(logger)),
            Err(e) => {
                log::warn!("XDP program diagnostics will not be logged: {e}");
                None
            }
        };
        let mut program = Self {
            ebpf,
            interface: interface.to_owned(),
            link: None,
            mode: AttachMode::Auto,
            config: XdpConfig::default(),
            filter: None,
            retired: None,
            logger,
        };
        program.set_config(XdpConfig::default())?;
        Ok(program)
    }

    fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, XdpError> {
        ebpf.program_mut(name)
            .ok_or(XdpError::Missing { kind: "program", name })?
            .try_into()
            .map_err(|_| XdpError::Missing { kind: "XDP program", name })
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, XdpError> {
        self.ebpf.map_mut(name).ok_or(XdpError::Missing { kind: "map", name })
    }

    /// Attaches the entry program to the interface. In `Auto` mode native is tried first,
    /// then generic; the mode in use is returned and logged.
    pub fn attach(&mut self, mode: AttachMode) -> Result<AttachMode, XdpError> {
        let ifindex = crate::sys::ifindex(&self.interface)
            .map_err(|_| XdpError::NoSuchInterface { interface: self.interface.clone() })?;
        let tries: &[(AttachMode, XdpMode)] = match mode {
            AttachMode::Auto => &[(AttachMode::Native, XdpMode::Driver), (AttachMode::Generic, XdpMode::Skb)],
            AttachMode::Native => &[(AttachMode::Native, XdpMode::Driver)],
            AttachMode::Generic => &[(AttachMode::Generic, XdpMode::Skb)],
        };
        let interface = self.interface.clone();
        let program = Self::program(&mut self.ebpf, ENTRY_PROGRAM)?;
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
                    log::info!("XDP {ours} attach to {interface} failed: {source}");
                    let step = format!("attach XDP to {interface}");
                    last = Some(XdpError::or_capability(&step, &[Capability::NetAdmin], source, |source| {
                        XdpError::Attach { interface: interface.clone(), mode: ours, source }
                    }));
                }
            }
        }
        Err(last.expect("at least one attach mode is tried"))
    }

    /// Detaches the program from the interface (it stays loaded).
    pub fn detach(&mut self) {
        if let Some(link) = self.link.take()
            && let Ok(program) = Self::program(&mut self.ebpf, ENTRY_PROGRAM)
            && let Err(e) = program.detach(link)
        {
            log::warn!("detaching XDP from {}: {e}", self.interface);
        }
    }

    /// The mode the program is attached in.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// The interface the program is for.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The settings in force.
    pub fn config(&self) -> XdpConfig {
        self.config
    }

    /// Replaces the settings (takes effect for the next frame).
    pub fn set_config(&mut self, config: XdpConfig) -> Result<(), XdpError> {
        let map = self.map_mut(CONFIG_MAP)?;
        let mut array = Array::<_, XdpConfig>::try_from(map)
            .map_err(|source| XdpError::Map { name: CONFIG_MAP, source })?;
        array.set(0, &config, 0).map_err(|source| XdpError::Map { name: CONFIG_MAP, source })?;
        self.config = config;
        Ok(())
    }

    /// Installs `filter` as the program the entry program tail-calls (an atomic swap: every
    /// frame sees either the old program or the new one), or with `None` removes it, so that
    /// frames get `default_mask`. The program replaced is unloaded.
    pub fn install_filter(&mut self, filter: Option<LoadedFilter>) -> Result<(), XdpError> {
        let map_err = |source| XdpError::Map { name: FILTERS_MAP, source };
        match filter {
            Some(mut filter) => {
                let redirect = Self::program(&mut self.ebpf, REDIRECT_PROGRAM)?
                    .fd()
                    .and_then(|fd| fd.try_clone().map_err(Into::into))
                    .map_err(|source| XdpError::Verify { name: REDIRECT_PROGRAM, source })?;
                filter.set_next(&redirect).map_err(XdpError::Filter)?;
                let fd = filter.fd().map_err(XdpError::Filter)?.try_clone().map_err(|e| {
                    XdpError::Filter(crate::filter::FilterError::Load { reason: e.to_string() })
                })?;
                let mut filters = ProgramArray::try_from(self.map_mut(FILTERS_MAP)?).map_err(map_err)?;
                filters.set(FILTER_SLOT, &fd, 0).map_err(map_err)?;
                self.retired = self.filter.replace(filter);
            }
            None => {
                if self.filter.is_some() {
                    let mut filters = ProgramArray::try_from(self.map_mut(FILTERS_MAP)?).map_err(map_err)?;
                    filters.clear_index(&FILTER_SLOT).map_err(map_err)?;
                }
                if let Some(old) = self.filter.take() {
                    self.retired = Some(old);
                }
            }
        }
        Ok(())
    }

    /// Puts an AF_XDP socket in the socket map for `queue`.
    pub fn register_socket(&mut self, queue: u32, socket_fd: i32) -> Result<(), XdpError> {
        if queue >= MAX_QUEUES {
            return Err(XdpError::TooManyQueues { queue });
        }
        let map = self.map_mut(XSKS_MAP)?;
        let mut xsks = XskMap::<&mut MapData>::try_from(map)
            .map_err(|source| XdpError::Map { name: XSKS_MAP, source })?;
        xsks.set(queue, socket_fd, 0).map_err(|source| XdpError::Map { name: XSKS_MAP, source })
    }

    /// The program's counters for each of the first `queues` RX queues, summed over CPUs.
    pub fn queue_counters(&self, queues: u32) -> Result<Vec<XdpCounters>, XdpError> {
        let map = self.ebpf.map(COUNTERS_MAP).ok_or(XdpError::Missing { kind: "map", name: COUNTERS_MAP })?;
        let array = PerCpuArray::<_, XdpCounters>::try_from(map)
            .map_err(|source| XdpError::Map { name: COUNTERS_MAP, source })?;
        (0..queues.min(MAX_QUEUES))
            .map(|queue| {
                let per_cpu =
                    array.get(&queue, 0).map_err(|source| XdpError::Map { name: COUNTERS_MAP, source })?;
                let mut total = XdpCounters::default();
                for cpu in per_cpu.iter() {
                    total.add(cpu);
                }
                Ok(total)
            })
            .collect()
    }

    /// The program's counters over every queue and CPU.
    pub fn counters(&self) -> Result<XdpCounters, XdpError> {
        let mut total = XdpCounters::default();
        for queue in self.queue_counters(MAX_QUEUES)? {
            total.add(&queue);
        }
        Ok(total)
    }
}

impl Drop for XdpProgram {
    fn drop(&mut self) {
        self.detach();
        if let Some((stop, thread)) = self.logger.take() {
            stop.store(true, Ordering::Release);
            let _ = thread.join();
        }
    }
}

/// Forwards the XDP program's log records (aya-log ring buffer) to the `log` crate.
fn spawn_logger(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> (Arc<AtomicBool>, JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let thread = std::thread::Builder::new()
        .name("tapstream-xdplog".into())
        .spawn({
            let stop = stop.clone();
            move || {
                while !stop.load(Ordering::Acquire) {
                    // Woken by records, or after 200 ms to look at `stop`; a failed poll (a signal)
                    // only means an early flush.
                    let _ = crate::sys::poll_readable(logger.as_fd(), Duration::from_millis(200));
                    logger.flush();
                }
            }
        })
        .expect("spawn the XDP log thread");
    (stop, thread)
}
