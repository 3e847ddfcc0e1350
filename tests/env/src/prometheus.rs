//! A real Prometheus server in a test namespace, scraping tapstream's metrics, and its query
//! API.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Prometheus (the Debian package) in a namespace, scraping `127.0.0.1:9464` every second and
/// answering on `127.0.0.1:9090` there; killed on drop.
pub struct Prometheus {
    child: Child,
    ns: String,
}

impl Prometheus {
    /// Starts it in `ns`, with its configuration and data under `dir`.
    pub fn start_in(ns: &crate::Netns, dir: &Path) -> Self {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tapstream\n    static_configs:\n      - targets: ['127.0.0.1:9464']\n",
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let child = ns
            .command("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("prometheus-data").display()))
            .arg("--web.listen-address=127.0.0.1:9090")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (Debian package prometheus)");
        Self { child, ns: ns.name().to_owned() }
    }

    /// The value of an instant query, if Prometheus answers with one sample.
    pub fn query(&self, expr: &str) -> Option<f64> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-sf", "--get", "http://127.0.0.1:9090/api/v1/query"])
            .arg("--data-urlencode")
            .arg(format!("query={expr}"))
            .output()
            .ok()?;
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        reply["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Polls `expr` until it equals `want` or `timeout` passes; returns the last value.
    pub fn wait_for(&self, expr: &str, want: f64, timeout: Duration) -> Option<f64> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(expr);
            if last == Some(want) {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        last
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
