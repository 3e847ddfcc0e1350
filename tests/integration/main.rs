//! Integration tests: one binary, one module per stage. They need root (network namespaces,
//! XDP) and the tools `cargo xtask setup` installs; each test makes its own namespaces and
//! servers and removes them when done.

mod access;
mod catalog;
mod cloudshark;
mod common;
mod control_hardening;
mod daemon;
mod datapath;
mod deploy;
mod filter_check;
mod filter_kernel;
mod filter_limits;
mod fleet;
mod fleet_cli;
mod fleet_nats;
mod full_disk;
mod fuzz;
mod gcs;
mod interface_loss;
mod interfaces;
mod live_drops;
mod lookback;
mod metrics;
mod recovery;
mod request_parity;
mod smoke;
mod soak;
mod store_down;
mod upload;
