//! The test environment every integration test, the demo and the benchmarks use.
//!
//! Each piece creates what it needs under a unique name, so tests can run in parallel, and
//! removes it when dropped:
//! - [`Netns`]: a network namespace;
//! - [`VethPair`]: two namespaces joined by a veth pair, optionally with several RX queues;
//! - [`Sender`]: an `AF_PACKET` socket on the sending end, to replay corpus files or send
//!   generated frames;
//! - [`Garage`]: an S3-compatible server on a free loopback port, with its own directory,
//!   keys and bucket;
//! - [`FakeGcs`]: a Google Cloud Storage emulator on a free loopback port, with its own
//!   directory and bucket;
//! - [`Redis`]: a Redis server on a Unix socket (which daemons in any namespace reach);
//! - [`Nats`]: a NATS server with JetStream in a hub namespace, linked to others by veth.
//!
//! Everything here needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and the tools that
//! `cargo xtask setup` installs.

mod fake_gcs;
mod garage;
mod nats;
mod netns;
mod prometheus;
mod redis;
mod sender;
mod tls;

use std::path::PathBuf;

pub use fake_gcs::FakeGcs;
pub use garage::Garage;
pub use nats::Nats;
pub use netns::{Netns, VethPair};
pub use prometheus::Prometheus;
pub use redis::Redis;
pub use sender::{
    CANARY_FILTER, CANARY_PORT, CORPUS_RING_SIZE, CorpusFrame, Sender, canary_frame, canary_seq,
    corpus_frames, read_pcap_frames,
};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

/// Where `cargo xtask setup` installs tools (bpf-linker, Garage).
pub fn tools_dir() -> PathBuf {
    workspace_root().join(".tools")
}

/// The folder of real Ethernet captures (tcpdump's test suite): `$TAPSTREAM_CORPUS`, else
/// `../shared/corpus/tcpdump-ethernet` beside the checkout, else the workplace's shared
/// folder `/work/shared/corpus/tcpdump-ethernet`.
pub fn corpus_dir() -> PathBuf {
    let candidates = match std::env::var_os("TAPSTREAM_CORPUS") {
        Some(dir) => vec![PathBuf::from(dir)],
        None => vec![
            workspace_root().join("../shared/corpus/tcpdump-ethernet"),
            PathBuf::from("/work/shared/corpus/tcpdump-ethernet"),
        ],
    };
    candidates.iter().find(|dir| dir.is_dir()).cloned().unwrap_or_else(|| {
        panic!(
            "the capture corpus is in none of {candidates:?}: set TAPSTREAM_CORPUS to the folder of tcpdump's Ethernet test captures"
        )
    })
}

/// The filter expressions the filter issue names: the differential test runs them against
/// libpcap, and the filter benchmark times them.
pub const LISTED_FILTERS: [&str; 14] = [
    "tcp port 443 and net 10.0.0.0/8",
    "vlan and udp",
    "ip6 and not icmp6",
    "host 192.168.1.10",
    "udp portrange 1024-65535",
    "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn",
    "icmp[icmptype] == icmp-echo",
    "ip[6:2] & 0x1fff != 0",
    "ip multicast",
    "ether broadcast",
    "vlan 100 and vlan 200",
    "arp or (ip and icmp)",
    "greater 1000",
    "mpls and udp",
];

/// A name no other test in this or another process uses at the same time: `prefix`, the
/// process id and a counter, at most 15 bytes so it can name an interface.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id() % 1_000_000);
    assert!(name.len() <= 15, "name {name} is longer than an interface name may be");
    name
}

/// Random bytes as lower-case hex, from the kernel's generator.
pub fn random_hex(bytes: usize) -> String {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs a command to completion and panics with its output if it fails.
pub fn run(cmd: &mut std::process::Command) -> String {
    let output = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A server this environment starts: its process, whether it answers, and its log.
pub(crate) trait Server {
    /// Its name in messages.
    const NAME: &'static str;
    /// Its exit status, if its process has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus>;
    /// Whether it answers requests.
    fn answers(&self) -> bool;
    /// What it logged.
    fn log(&self) -> String;
}

/// Waits until `server` answers; panics with its log if it exits first or `within` passes.
pub(crate) fn wait_ready<S: Server>(server: &mut S, within: std::time::Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = server.exited() {
            panic!("{} exited ({status}) before it was ready:\n{}", S::NAME, server.log());
        }
        if server.answers() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} not ready after {within:?}:\n{}",
            S::NAME,
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
