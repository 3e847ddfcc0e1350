//! tapstream: packet capture from XDP through AF_XDP rings to PCAP chunks, compressed and
//! streamed to object storage.
//!
//! A frame's path reads in the module names: [`xdp`] (the kernel program and its counters).

pub mod xdp;
