//! A NATS server with JetStream, for the fleet tests.
//!
//! nats-server listens on TCP only, and each test daemon runs in a network namespace of its
//! own, so the server runs in a hub namespace the environment makes; [`Nats::link`] joins
//! another namespace to the hub with a veth pair and gives the URL a process there uses. The
//! test itself reaches the server from inside the hub ([`Nats::hub`], [`Netns::enter`]).
//! `cargo xtask setup` installs Debian's `nats-server`.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Child, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::{Netns, netns::enter_named, run, unique_name};

/// The client port inside the hub namespace.
pub const PORT: u16 = 4222;
/// The monitoring port inside the hub namespace (`/healthz` says when JetStream is ready).
const MONITOR_PORT: u16 = 8222;

/// A running `nats-server -js` in a namespace of its own, with its store in a temporary
/// directory; killed, and the namespace and directory removed, on drop.
#[derive(Debug)]
pub struct Nats {
    child: Child,
    dir: tempfile::TempDir,
    hub: Netns,
    /// Links made so far (each gets its own /30).
    links: AtomicU32,
    /// The user and password clients must give, if any.
    credentials: Option<(String, String)>,
    /// Whether it requires TLS (certificates in its directory).
    tls: bool,
}

/// Links a hub's server certificate names: `10.99.<k>.1` for `k` below this.
const TLS_LINKS: u32 = 16;

impl Nats {
    /// Starts a server in a new hub namespace and waits until JetStream is ready.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Like [`Nats::start`], with a server that admits only `user` with `password`.
    pub fn start_with_user(user: &str, password: &str) -> Self {
        Self::start_with(Some((user.to_owned(), password.to_owned())))
    }

    /// Like [`Nats::start`], with a server that requires TLS, its certificate (for 127.0.0.1
    /// and the hub's end of its first links) signed by [`Nats::ca_file`].
    pub fn start_tls() -> Self {
        Self::start_full(None, true)
    }

    fn start_with(credentials: Option<(String, String)>) -> Self {
        Self::start_full(credentials, false)
    }

    fn start_full(credentials: Option<(String, String)>, tls: bool) -> Self {
        let dir = tempfile::Builder::new().prefix("tapstream-nats-").tempdir().expect("temp dir");
        if tls {
            let sans: Vec<String> = std::iter::once("IP:127.0.0.1".to_owned())
                .chain((0..TLS_LINKS).map(|k| format!("IP:10.99.{k}.1")))
                .collect();
            crate::tls::make_certificates(dir.path(), &sans);
        }
        let hub = Netns::new("tsnats");
        let child = Self::spawn(&hub, &dir, credentials.as_ref(), tls);
        let mut nats = Self { child, dir, hub, links: AtomicU32::new(0), credentials, tls };
        crate::wait_ready(&mut nats, Duration::from_secs(10));
        nats
    }

    /// The user and password clients must give, if the server asks for them.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    fn spawn(
        hub: &Netns,
        dir: &tempfile::TempDir,
        credentials: Option<&(String, String)>,
        tls: bool,
    ) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("nats.log"))
            .expect("nats log");
        let mut command = hub.command("nats-server");
        if let Some((user, password)) = credentials {
            command.args(["--user", user, "--pass", password]);
        }
        if tls {
            command.arg("--tls").arg("--tlscert").arg(dir.path().join("server.pem"));
            command.arg("--tlskey").arg(dir.path().join("server.key"));
        }
        command
            .args(["-js", "-a", "0.0.0.0", "-p", &PORT.to_string(), "-m", &MONITOR_PORT.to_string()])
            .arg("-sd")
            .arg(dir.path().join("store"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start nats-server (install it with `cargo xtask setup`)")
    }

    /// The hub namespace, where the server listens on `127.0.0.1:4222` ([`Nats::local_url`]).
    pub fn hub(&self) -> &Netns {
        &self.hub
    }

    /// The URL for clients inside the hub namespace.
    pub fn local_url(&self) -> String {
        format!("nats://127.0.0.1:{PORT}")
    }

    /// Joins namespace `ns` to the hub with a veth pair (hub side `10.99.<k>.1/30`, `ns`'s side
    /// `.2`, a distinct `k` per link) and returns the URL processes in `ns` use.
    pub fn link(&self, ns: &Netns) -> String {
        let k = self.links.fetch_add(1, Ordering::Relaxed);
        assert!(k < 256 && (!self.tls || k < TLS_LINKS), "too many links to one hub");
        let (hub_if, ns_if) = (unique_name("nh"), unique_name("nl"));
        run(std::process::Command::new("ip").args([
            "link",
            "add",
            &hub_if,
            "netns",
            self.hub.name(),
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
            "netns",
            ns.name(),
        ]));
        for (netns, ifname, addr) in [(&self.hub, &hub_if, 1), (ns, &ns_if, 2)] {
            run(netns.command("ip").args(["addr", "add", &format!("10.99.{k}.{addr}/30"), "dev", ifname]));
            run(netns.command("ip").args(["link", "set", ifname, "up"]));
        }
        format!("nats://10.99.{k}.1:{PORT}")
    }

    /// Kills the server (SIGKILL: its clients' connections break); the broker is away until
    /// [`Nats::restart`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a new server with the same store (streams, consumers and their state are back)
    /// after [`Nats::kill`], or killing it first, and waits until JetStream is ready.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.hub, &self.dir, self.credentials.as_ref(), self.tls);
        crate::wait_ready(self, Duration::from_secs(10));
    }

    /// Whether it requires TLS ([`Nats::start_tls`]).
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The authority that signed the certificate of a server started with [`Nats::start_tls`].
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// An authority that signed nothing of this server.
    pub fn other_ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Whether `/healthz` answers `ok` (the server and JetStream are ready).
    fn healthy(&self) -> bool {
        enter_named(self.hub.name(), || {
            let Ok(mut stream) =
                TcpStream::connect_timeout(&([127, 0, 0, 1], MONITOR_PORT).into(), Duration::from_secs(1))
            else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            if stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
                return false;
            }
            let mut reply = String::new();
            let _ = stream.read_to_string(&mut reply);
            reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200")
        })
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl crate::Server for Nats {
    const NAME: &'static str = "nats-server";
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait nats-server")
    }
    fn answers(&self) -> bool {
        self.healthy()
    }
    fn log(&self) -> String {
        Nats::log(self)
    }
}
