//! Builds the XDP program (`capture-ebpf`) on the pinned nightly and leaves its object in
//! `OUT_DIR`, where `src/datapath/xdp.rs` embeds it.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root =
        std::path::Path::new(&manifest_dir).parent().ok_or_else(|| anyhow!("capture/ has no parent"))?;
    let ebpf_dir = root.join("capture-ebpf");
    let ebpf_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    println!("cargo::rerun-if-changed={}", root.join("capture-common").display());
    // The nightly pinned in capture-ebpf/rust-toolchain.toml (its `channel = "..."` line).
    let pin_file = root.join("capture-ebpf/rust-toolchain.toml");
    let pin = std::fs::read_to_string(&pin_file).with_context(|| format!("read {}", pin_file.display()))?;
    let nightly = pin
        .lines()
        .find_map(|line| line.trim().strip_prefix("channel = \"")?.strip_suffix('"'))
        .ok_or_else(|| anyhow!("no channel line in {}", pin_file.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "capture-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::Custom(nightly),
    )
}
