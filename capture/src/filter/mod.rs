//! tcpdump filters.
//!
//! Expressions are compiled by libpcap itself ([`pcap`]), so a filter means exactly what it
//! means to tcpdump. The translation of the classic BPF to eBPF for the XDP program (issue 4)
//! builds on this module; until it lands, filters can be checked and tried on saved captures
//! with libpcap's own interpreter, not applied to live captures.

pub mod pcap;

pub use pcap::{CbpfProgram, FilterError};
