//! A Redis server on a Unix socket, for the fleet tests.
//!
//! Unix sockets are files: a daemon in any network namespace reaches the server through its
//! socket, so the server runs in the test's own namespace. A server with TLS also listens on
//! TCP inside a namespace the test gives ([`Redis::start_tls_in`]), with certificates made
//! for it by `openssl`. `cargo xtask setup` installs Debian's `redis-server`.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

/// A running `redis-server` with its own directory, killed and removed on drop.
#[derive(Debug)]
pub struct Redis {
    child: Child,
    dir: tempfile::TempDir,
    /// Every write is in an append-only file (fsynced), so the data survives a kill.
    persistent: bool,
    /// The namespace whose 127.0.0.1:[`TLS_PORT`] takes TLS connections, if any.
    tls_netns: Option<String>,
}

/// The configuration file of a server started with [`Redis::start_with_config`], in its
/// directory.
const CONFIG_FILE: &str = "redis.conf";

/// The TCP port of a server with TLS, in its namespace.
pub const TLS_PORT: u16 = 6380;

impl Redis {
    /// Starts a server (no TCP port, no persistence) and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Starts a server that keeps every write in an append-only file, so that its streams
    /// survive [`Redis::kill`] and [`Redis::restart`].
    pub fn start_persistent() -> Self {
        Self::start_with(true)
    }

    /// Starts a server that also takes TLS connections on 127.0.0.1:[`TLS_PORT`] inside `ns`,
    /// with a certificate for `127.0.0.1` signed by its own authority ([`Redis::ca_file`]).
    /// Another authority, which signed nothing of it, is in [`Redis::other_ca_file`].
    pub fn start_tls_in(ns: &crate::Netns) -> Self {
        Self::start_full(false, Some(ns.name().to_owned()), None)
    }

    /// Starts a server with the configuration file text `config` (users, say), the harness's
    /// own settings after it (the harness checks readiness as `default`: keep that user able
    /// to PING).
    pub fn start_with_config(config: &str) -> Self {
        Self::start_full(false, None, Some(config))
    }

    fn start_with(persistent: bool) -> Self {
        Self::start_full(persistent, None, None)
    }

    fn start_full(persistent: bool, tls_netns: Option<String>, config: Option<&str>) -> Self {
        let dir = tempfile::Builder::new().prefix("tapstream-redis-").tempdir().expect("temp dir");
        // The daemons may run as other users in other tests' setups: let them reach the socket.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod the redis dir");
        if tls_netns.is_some() {
            crate::tls::make_certificates(dir.path(), &["IP:127.0.0.1".to_owned()]);
        }
        if let Some(config) = config {
            std::fs::write(dir.path().join(CONFIG_FILE), config).expect("write the configuration file");
        }
        let child = Self::spawn(&dir, persistent, tls_netns.as_deref());
        let mut redis = Self { child, dir, persistent, tls_netns };
        crate::wait_ready(&mut redis, Duration::from_secs(10));
        redis
    }

    fn spawn(dir: &tempfile::TempDir, persistent: bool, tls_netns: Option<&str>) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("redis.log"))
            .expect("redis log");
        let aof: &[&str] = if persistent {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let mut command = match tls_netns {
            Some(ns) => {
                let d = |name: &str| dir.path().join(name);
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "redis-server"])
                    .args(["--tls-port", &TLS_PORT.to_string(), "--bind", "127.0.0.1", "--tls-cert-file"])
                    .arg(d("server.pem"))
                    .arg("--tls-key-file")
                    .arg(d("server.key"))
                    .arg("--tls-ca-cert-file")
                    .arg(d("ca.pem"))
                    .args(["--tls-auth-clients", "optional"]);
                c
            }
            None => Command::new("redis-server"),
        };
        let config = dir.path().join(CONFIG_FILE);
        if config.exists() {
            command.arg(config);
        }
        command
            .args(["--port", "0", "--unixsocket"])
            .arg(dir.path().join("redis.sock"))
            .args(["--unixsocketperm", "777", "--save", ""])
            .args(aof)
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start redis-server (install it with `cargo xtask setup`)")
    }

    /// Kills the server (SIGKILL: its clients' connections break) and removes its socket:
    /// the broker is away until [`Redis::restart`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.socket());
    }

    /// Starts a new server on the same socket and directory (after [`Redis::kill`], or
    /// killing it first); a persistent one has its data back.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.dir, self.persistent, self.tls_netns.as_deref());
        crate::wait_ready(self, Duration::from_secs(10));
    }

    /// The server's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// A URL for clients: `unix:///path/redis.sock`.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The URL of the TLS listener, for clients in its namespace: `rediss://127.0.0.1:6380`.
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{TLS_PORT}")
    }

    /// The authority that signed the server's certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// An authority that signed nothing of this server (PEM).
    pub fn other_ca_file(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = UnixStream::connect(self.socket()) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl crate::Server for Redis {
    const NAME: &'static str = "redis-server";
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait redis-server")
    }
    fn answers(&self) -> bool {
        self.answers_ping()
    }
    fn log(&self) -> String {
        Redis::log(self)
    }
}
