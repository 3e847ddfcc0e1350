//! Rebuilds the XDP program when the bpf-linker that links it changes (it is installed by
//! `cargo xtask setup` into `.tools/bin` and named in `.cargo/config.toml`).
fn main() {
    println!("cargo::rerun-if-changed=../.tools/bin/bpf-linker");
}
