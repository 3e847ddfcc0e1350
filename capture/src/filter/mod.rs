//! tcpdump filters, run in the kernel.
//!
//! Expressions are compiled by libpcap itself ([`pcap`]), so a filter means exactly what it
//! means to tcpdump; expressions from clients compile in a child process, within a length cap
//! and a time limit ([`compiler`]). The classic BPF is translated to eBPF with libpcap's semantics
//! ([`ebpf`]), and the filters of every capture on an interface become one XDP program
//! ([`program`]) that the fixed XDP program tail-calls: frames no capture wants never leave
//! the kernel.

pub mod compiler;
pub mod ebpf;
pub mod pcap;
pub mod program;

pub use compiler::BoundedCompiler;
pub use ebpf::LOOP_PASSES;
pub use pcap::CbpfProgram;
pub use program::{CaptureFilter, LoadedFilter};

/// Errors of filter expressions and the filter program.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// libpcap refused the expression; `message` is its own words.
    #[error("invalid filter {expression:?}: {message}")]
    Syntax { expression: String, message: String },
    #[error("the filter expression contains a NUL byte")]
    Nul,
    /// Refused before compiling: longer than `setting` allows.
    #[error("the filter expression is {bytes} bytes, over {setting} ({limit} bytes)")]
    TooLong { bytes: usize, setting: &'static str, limit: usize },
    /// The compile ran past the time limit `setting` and was abandoned (its process killed).
    #[error(
        "the filter did not compile within the server's {setting} = {limit_secs}: the compile was \
         abandoned (long lists of hosts or ports compile slowly; shorten the filter)"
    )]
    Timeout { setting: &'static str, limit_secs: f64 },
    /// The compile was abandoned because the daemon is stopping.
    #[error("the filter compile was abandoned: the daemon is stopping")]
    Cancelled,
    #[error("cannot run the filter compiler {program}")]
    CompilerSpawn {
        program: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The compiler process ended without an answer we understand.
    #[error("the filter compiler failed: {reason}")]
    CompilerFailed { reason: String },
    #[error("libpcap could not open a dead Ethernet handle")]
    NoHandle,
    /// libpcap compiled it, but the kernel cannot run it as it is.
    #[error("filter {expression:?} cannot run in XDP")]
    Translate {
        expression: String,
        #[source]
        source: ebpf::TranslateError,
    },
    #[error("capture slot {slot} is beyond the {} the filter program supports", capture_common::MAX_CAPTURES)]
    TooManyCaptures { slot: usize },
    #[error("cannot load the filter program: {reason}")]
    Load { reason: String },
    /// The kernel verifier refused the program; `message` ends with its reason.
    #[error("the kernel verifier refused the filter program: {message}")]
    Verifier { message: String },
    /// The kernel refused to load the program, and the process lacks a capability it needs.
    #[error(transparent)]
    Capability(Box<crate::sys::CapabilityError>),
    #[error("cannot run the filter program on a frame (BPF_PROG_TEST_RUN)")]
    TestRun {
        #[source]
        source: std::io::Error,
    },
}
