//! Developer tasks: `cargo xtask setup | test | demo | lint`.
//!
//! xtask only orchestrates: it installs tools, prepares environments (through the
//! `tapstream-testenv` crate) and runs cargo and the `tapstream` binary.

mod setup;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use std::{
    path::{Path, PathBuf},
    process::Command,
};

#[derive(Parser)]
#[command(about = "tapstream developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install (idempotently) the toolchains, bpf-linker, Garage and the Debian packages.
    Setup,
    /// Set up, then run every test (unit and integration).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, then run a bounded capture on the local defaults and read the result back.
    Demo,
    /// rustfmt --check and clippy -D warnings on the userspace (stable) and eBPF (nightly) crates.
    Lint,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup::run(&root),
        Task::Test { args } => {
            setup::run(&root)?;
            cargo(
                &root,
                None,
                &[&["test", "--workspace", "--exclude", "capture-ebpf"], &as_strs(&args)[..]].concat(),
            )
        }
        Task::Demo => {
            setup::run(&root)?;
            demo(&root)
        }
        Task::Lint => lint(&root),
    }
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The workspace root (the parent of this crate's folder).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_path_buf()
}

/// Runs `cargo [+toolchain] args...` in `dir`, failing if it fails.
fn cargo(dir: &Path, toolchain: Option<&str>, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    if let Some(toolchain) = toolchain {
        cmd.arg(format!("+{toolchain}"));
    }
    cmd.args(args).current_dir(dir);
    status(&mut cmd)
}

/// Runs a command, failing with the command line if it fails.
fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn lint(root: &Path) -> anyhow::Result<()> {
    let nightly = setup::nightly(root)?;
    cargo(root, None, &["fmt", "--all", "--", "--check"])?;
    cargo(
        root,
        None,
        &["clippy", "--workspace", "--exclude", "capture-ebpf", "--all-targets", "--", "-D", "warnings"],
    )?;
    let ebpf = root.join("capture-ebpf");
    cargo(&ebpf, Some(&nightly), &["fmt", "--", "--check"])?;
    cargo(
        &ebpf,
        Some(&nightly),
        &["clippy", "--target", "bpfel-unknown-none", "-Z", "build-std=core", "--", "-D", "warnings"],
    )
}

fn demo(root: &Path) -> anyhow::Result<()> {
    cargo(root, None, &["build", "--release", "--package", "tapstream"])?;
    let veth = tapstream_testenv::VethPair::new(1);
    let garage = tapstream_testenv::Garage::start();
    println!(
        "demo: veth {} (namespace {}) <- {} (namespace {}); Garage at {}, bucket {}",
        veth.capture_if,
        veth.capture_ns.name(),
        veth.sender_if,
        veth.sender_ns.name(),
        garage.endpoint,
        garage.bucket
    );
    println!("demo: a bounded capture into Garage is not yet there (issues 3 to 6)");
    Ok(())
}
