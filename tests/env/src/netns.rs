//! Network namespaces and veth pairs, made with iproute2 and removed on drop.

use std::{fs::File, os::fd::AsRawFd as _, process::Command};

use crate::{run, unique_name};

/// A network namespace, deleted (with its interfaces) when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a unique name starting with `prefix`, loopback up.
    pub fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        run(Command::new("ip").args(["netns", "add", &name]));
        let netns = Self { name };
        // No IPv6 autoconfiguration: the kernel would send its own frames (router and
        // neighbour solicitations, MLD reports) and tests count every frame.
        run(netns.command("sysctl").args([
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]));
        run(netns.command("ip").args(["link", "set", "lo", "up"]));
        netns
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (through `ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a new thread that has entered the namespace, and returns its result.
    /// Sockets and BPF links made there stay in the namespace after the thread ends.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        enter_named(&self.name, f)
    }
}

/// Runs `f` on a new thread inside the namespace called `name`.
pub(crate) fn enter_named<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{name}");
    let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: `ns` is an open namespace file for the whole call; setns only
                // changes this new thread's network namespace.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns into {name}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Two namespaces joined by a veth pair: the capture end (where tapstream attaches) and the
/// sender end (where test traffic is written).
#[derive(Debug)]
pub struct VethPair {
    /// Namespace holding the capture end.
    pub capture_ns: Netns,
    /// Namespace holding the sender end.
    pub sender_ns: Netns,
    /// Name of the capture end.
    pub capture_if: String,
    /// Name of the sender end.
    pub sender_if: String,
    /// Number of RX (and TX) queues of each end.
    pub queues: u32,
    /// MTU of both ends.
    pub mtu: u32,
}

impl VethPair {
    /// The largest MTU a veth peer may have while a (non-multi-buffer) native XDP program is
    /// attached to the other end on 4 KiB pages: 4096 - 258 headroom - 14 Ethernet header -
    /// 320 skb_shared_info.
    pub const MAX_XDP_MTU: u32 = 3504;

    /// A veth pair with `queues` RX/TX queues per end and the largest MTU native XDP allows.
    pub fn new(queues: u32) -> Self {
        Self::with_mtu(queues, Self::MAX_XDP_MTU)
    }

    /// A veth pair with `queues` RX/TX queues per end and the given MTU.
    pub fn with_mtu(queues: u32, mtu: u32) -> Self {
        let pair = Self {
            capture_ns: Netns::new("tscap"),
            sender_ns: Netns::new("tssnd"),
            capture_if: unique_name("tc"),
            sender_if: unique_name("ts"),
            queues,
            mtu,
        };
        pair.add();
        pair
    }

    /// Makes the pair (both ends, up) in the namespaces, under the pair's names.
    fn add(&self) {
        let q = self.queues.to_string();
        run(Command::new("ip").args([
            "link",
            "add",
            &self.capture_if,
            "netns",
            self.capture_ns.name(),
            "numrxqueues",
            &q,
            "numtxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            &self.sender_if,
            "netns",
            self.sender_ns.name(),
            "numrxqueues",
            &q,
            "numtxqueues",
            &q,
        ]));
        let mtu = self.mtu.to_string();
        for (ns, ifname) in [(&self.capture_ns, &self.capture_if), (&self.sender_ns, &self.sender_if)] {
            run(ns.command("ip").args(["link", "set", ifname, "mtu", &mtu, "up"]));
        }
    }

    /// Deletes the pair (deleting the capture end takes the sender end with it), as an
    /// operator's `ip link del` or a vanishing NIC does; the namespaces stay. A [`Sender`]
    /// made before is bound to the old device: make a new one after [`VethPair::recreate`].
    ///
    /// [`Sender`]: crate::Sender
    pub fn remove(&self) {
        run(self.capture_ns.command("ip").args(["link", "del", &self.capture_if]));
    }

    /// Makes the pair again after [`VethPair::remove`]: same names, same namespaces, same
    /// queues and MTU, but new devices (with new interface indexes).
    pub fn recreate(&self) {
        self.add();
    }

    /// Moves the capture end into `ns` (up, same MTU), beside another pair's capture end: a
    /// host with two tapped links. `capture_ns` no longer holds it; `remove` no longer works.
    pub fn move_capture_end(&self, ns: &Netns) {
        run(self.capture_ns.command("ip").args(["link", "set", &self.capture_if, "netns", ns.name()]));
        let mtu = self.mtu.to_string();
        run(ns.command("ip").args(["link", "set", &self.capture_if, "mtu", &mtu, "up"]));
    }

    /// Renames the capture end (as a host names its NICs: `bond1`); names are per namespace.
    pub fn rename_capture_end(&mut self, name: &str) {
        let ip = |args: &[&str]| run(self.capture_ns.command("ip").args(args));
        ip(&["link", "set", &self.capture_if, "down"]);
        ip(&["link", "set", &self.capture_if, "name", name]);
        ip(&["link", "set", name, "up"]);
        self.capture_if = name.to_owned();
    }

    /// The largest frame (Ethernet header included, one VLAN tag allowed) the sender can send.
    pub fn max_frame_len(&self) -> usize {
        self.mtu as usize + 14 + 4
    }
}
