//! The `tapstream` command: capture daemon and CLI.

use clap::Parser;

/// High-rate packet capture: tcpdump filters in XDP, AF_XDP rings, zstd, S3.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!("tapstream: no command yet");
}
