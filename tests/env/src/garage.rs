//! A single-node Garage server (S3-compatible) on loopback, for tests and the demo.
//!
//! Garage is AGPL software; it runs as a separate process and is never linked. `cargo xtask
//! setup` installs it into `.tools/bin/garage`.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{random_hex, tools_dir};

/// A running Garage server with one bucket and one key, stopped and removed on drop.
#[derive(Debug)]
pub struct Garage {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Network namespace the server runs in (`None`: the test's own).
    netns: Option<String>,
    /// Whether the log records every request: its endpoint (`Endpoint: GetObject`) and headers.
    log_calls: bool,
    config: PathBuf,
    /// S3 endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Region clients must sign with.
    pub region: String,
    /// The bucket created at start.
    pub bucket: String,
    /// Access key id.
    pub access_key: String,
    /// Secret key.
    pub secret_key: String,
    s3_addr: SocketAddr,
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind a free port").port()
}

impl Garage {
    /// The installed Garage binary.
    pub fn binary() -> PathBuf {
        let path = tools_dir().join("bin/garage");
        assert!(path.is_file(), "Garage is not installed at {}: run `cargo xtask setup`", path.display());
        path
    }

    /// Starts a server with a fresh directory, keys and bucket, and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(None, false)
    }

    /// Like [`Garage::start`], with a log that records every request the server takes: its
    /// S3 operation ([`Garage::calls`]) and its headers.
    pub fn start_logging_calls() -> Self {
        Self::start_with(None, true)
    }

    /// Like [`Garage::start`], but inside network namespace `ns`, so that processes there
    /// (a capture attached to the namespace's veth end) reach it on the namespace's loopback.
    pub fn start_in(ns: &crate::Netns) -> Self {
        Self::start_with(Some(ns.name().to_owned()), false)
    }

    /// [`Garage::start_in`] and [`Garage::start_logging_calls`] at once.
    pub fn start_in_logging_calls(ns: &crate::Netns) -> Self {
        Self::start_with(Some(ns.name().to_owned()), true)
    }

    fn start_with(netns: Option<String>, log_calls: bool) -> Self {
        let dir = tempfile::Builder::new().prefix("tapstream-garage-").tempdir().expect("temp dir");
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
                dir = dir.path().display(),
                secret = random_hex(32),
            ),
        )
        .expect("write garage.toml");
        let mut garage = Self {
            child: None,
            config,
            endpoint: format!("http://127.0.0.1:{s3}"),
            region: "garage".into(),
            bucket: "tapstream-test".into(),
            access_key: format!("GK{}", random_hex(12)),
            secret_key: random_hex(32),
            s3_addr: SocketAddr::from(([127, 0, 0, 1], s3)),
            dir,
            netns,
            log_calls,
        };
        garage.resume();
        garage
    }

    /// Starts the server process again after [`Garage::stop`] (same data, keys and port).
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "Garage is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("garage.log"))
            .expect("garage log");
        let child = self
            .command()
            .arg("-c")
            .arg(&self.config)
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &self.access_key)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret_key)
            .env("GARAGE_DEFAULT_BUCKET", &self.bucket)
            .env(
                "RUST_LOG",
                if self.log_calls {
                    "garage=warn,garage_api_common::generic_server=debug"
                } else {
                    "garage=warn"
                },
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start garage");
        self.child = Some(child);
        // Garage creates the default key and bucket before it starts listening, so an answer
        // means the bucket is there.
        crate::wait_ready(self, Duration::from_secs(30));
    }

    /// Stops the server process (an outage); [`Garage::resume`] starts it again.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    /// The S3 operations of the requests logged after the first `from` bytes of the log (a
    /// server started with [`Garage::start_logging_calls`]), each once, in Garage's names
    /// (`GetObject`, `ListObjectsV2`, `PutObject`, ...).
    pub fn calls(&self, from: usize) -> std::collections::BTreeSet<String> {
        assert!(self.log_calls, "this server does not log its requests");
        let log = self.log();
        log[from.min(log.len())..]
            .lines()
            .filter_map(|l| l.split_once("Endpoint: ").map(|(_, e)| e.trim().to_owned()))
            .collect()
    }

    /// The requests logged after the first `from` bytes of the log, as Garage prints them (a
    /// server started with [`Garage::start_logging_calls`]): `Request { method: PUT, uri:
    /// /bucket/key, ..., headers: {"x-amz-tagging": "...", ...} }`, one line each.
    pub fn requests(&self, from: usize) -> Vec<String> {
        assert!(self.log_calls, "this server does not log its requests");
        let log = self.log();
        log[from.min(log.len())..]
            .lines()
            .filter_map(|l| l.find("Request { method: ").map(|at| l[at..].to_owned()))
            .collect()
    }

    /// Makes a second key that may only read the bucket (list and get its objects), as
    /// (access key id, secret).
    pub fn read_only_key(&self) -> (String, String) {
        let (id, secret) = (format!("GK{}", random_hex(12)), random_hex(32));
        self.admin(&["key", "import", "--yes", "-n", "reader", &id, &secret]);
        self.admin(&["bucket", "allow", "--read", "--key", &id, &self.bucket]);
        (id, secret)
    }

    /// Whether the S3 port answers an (anonymous) HTTP request.
    fn answers_http(&self) -> bool {
        let (addr, bucket) = (self.s3_addr, self.bucket.clone());
        match &self.netns {
            Some(ns) => crate::netns::enter_named(ns, move || answers_http(addr, &bucket)),
            None => answers_http(addr, &bucket),
        }
    }
}

/// Whether an S3 server at `addr` answers a HEAD of `bucket` with HTTP.
fn answers_http(s3_addr: SocketAddr, bucket: &str) -> bool {
    {
        use std::io::{Read as _, Write as _};
        let Ok(mut stream) = TcpStream::connect_timeout(&s3_addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request = format!("HEAD /{bucket} HTTP/1.1\r\nHost: {s3_addr}\r\nConnection: close\r\n\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        reply.starts_with("HTTP/1.1 ")
    }
}

impl Garage {
    /// Runs Garage's command-line tool against this server (it speaks Garage's RPC, so it
    /// runs in the server's namespace); panics with its output if it fails.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = self.command().arg("-c").arg(&self.config).args(args).output().expect("run garage");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "garage {args:?} failed: {text}");
        text
    }

    /// Takes the key's rights on the bucket away, as an operator revoking credentials would:
    /// every request then fails with AccessDenied.
    pub fn revoke_key(&self) {
        self.key_rights("deny");
    }

    /// Gives the key its rights on the bucket back.
    pub fn grant_key(&self) {
        self.key_rights("allow");
    }

    /// `garage bucket allow|deny` of every right of the key on the bucket.
    fn key_rights(&self, verb: &str) {
        self.admin(&[
            "bucket",
            verb,
            "--read",
            "--write",
            "--owner",
            "--key",
            &self.access_key,
            &self.bucket,
        ]);
    }

    /// The Garage binary, run in the server's namespace.
    fn command(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(Self::binary());
                c
            }
            None => Command::new(Self::binary()),
        }
    }

    /// Environment variables that point the AWS SDK (and tapstream) at this server.
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
        ]
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

impl crate::Server for Garage {
    const NAME: &'static str = "Garage";
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().expect("wait garage"))
    }
    fn answers(&self) -> bool {
        self.answers_http()
    }
    fn log(&self) -> String {
        Garage::log(self)
    }
}
