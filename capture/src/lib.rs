//! tapstream: packet capture from XDP through AF_XDP rings to PCAP chunks, compressed and
//! streamed to object storage.
//!
//! A frame's path reads in the module names, top to bottom:
//! [`filter`] (tcpdump filters, compiled for the kernel) ->
//! [`datapath`] (the XDP program, AF_XDP rings, one writer thread per queue, PCAP chunks) ->
//! [`captures`] (each capture's output) ->
//! [`store`] (zstd frames, objects, multipart streams, the spool, S3 and local directories).
//!
//! A request's path: [`cli`] or the HTTP API in [`control`] ->
//! [`request`] (one capture request, resolved into a plan) ->
//! [`control`] (the daemon's registry of captures) -> [`captures`] -> events.
//! Beside them: [`config`], [`metrics`] and [`sys`] (every system call outside the rings and
//! libpcap, and the [`sys::Shutdown`] every stage that must stop with the process is given).

pub mod captures;
pub mod cli;
pub mod config;
pub mod control;
pub mod datapath;
pub mod filter;
pub mod metrics;
pub mod store;
pub mod sys;
