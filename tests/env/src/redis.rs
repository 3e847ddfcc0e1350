//! A Redis server on a Unix socket, for the fleet tests.
//!
//! Unix sockets are files: a daemon in any network namespace reaches the server through its
//! socket, so the server runs in the test's own namespace. `cargo xtask setup` installs
//! Debian's `redis-server`.

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
}

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

    fn start_with(persistent: bool) -> Self {
        let dir = tempfile::Builder::new().prefix("tapstream-redis-").tempdir().expect("temp dir");
        // The daemons may run as other users in other tests' setups: let them reach the socket.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod the redis dir");
        let child = Self::spawn(&dir, persistent);
        let mut redis = Self { child, dir, persistent };
        crate::wait_ready(&mut redis, Duration::from_secs(10));
        redis
    }

    fn spawn(dir: &tempfile::TempDir, persistent: bool) -> Child {
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
        Command::new("redis-server")
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
        self.child = Self::spawn(&self.dir, self.persistent);
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
