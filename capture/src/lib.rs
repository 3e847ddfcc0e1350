//! tapstream: packet capture from XDP through AF_XDP rings to PCAP chunks, compressed and
//! streamed to object storage.
//!
//! A frame's path reads in the module names:
//! [`filter`] (tcpdump filters, run in the kernel) ->
//! [`xdp`] (the kernel program: metadata, counters, redirect) ->
//! [`xsk`] (AF_XDP rings) ->
//! [`writer`] (one thread per RX queue) ->
//! [`chunk`] (PCAP records in pooled buffers) ->
//! [`session`] (each capture's output) ->
//! [`compress`] (zstd frames) ->
//! [`upload`] (objects in a store).
//! Beside them: [`capture`] (what a capture asks for and the state its writers share),
//! [`pipeline`] (an interface with its writers), [`clock`] (kernel time to wall-clock),
//! [`daemon`] with its [`config`] and [`control`] API, [`metrics`] and [`sys`].

#[cfg(test)]
mod alloc_count;
pub mod capture;
pub mod chunk;
pub mod clock;
pub mod compress;
pub mod config;
pub mod control;
pub mod daemon;
pub mod filter;
pub mod metrics;
pub mod pipeline;
pub mod session;
pub mod sys;
pub mod upload;
pub mod writer;
pub mod xdp;
pub mod xsk;
