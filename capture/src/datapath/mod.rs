//! The data path: from the kernel to PCAP chunks.
//!
//! [`xdp`] (the kernel program: filters, metadata, counters, redirect) ->
//! [`xsk`] (AF_XDP sockets and their rings) ->
//! [`writer`] (one thread per RX queue, pinned) ->
//! [`chunk`] (PCAP records in pooled buffers).
//! Beside them: [`capture`] (what a capture asks for and the state its writers share),
//! [`clock`] (kernel time to wall-clock), [`lookback`] (an interface's recent history, from
//! which a capture starts in the past) and [`pipeline`] (an interface with its writers).

pub mod capture;
pub mod chunk;
pub mod clock;
pub mod lookback;
pub mod pipeline;
pub mod writer;
pub mod xdp;
pub mod xsk;
