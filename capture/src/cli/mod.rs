//! The command line: [`args`] parses; [`oneshot`] runs a capture in this process; [`serve`]
//! runs the daemon; [`control`] asks it; [`fleet`] asks the fleet through its broker;
//! [`tools`] needs none; [`output`] prints.

pub mod args;
pub mod control;
pub mod fleet;
pub mod oneshot;
pub mod output;
pub mod serve;
pub mod tools;

use anyhow::Context as _;

/// Serves Prometheus metrics at http://ADDR/metrics, every series registered at zero.
pub fn serve_metrics(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .with_context(|| format!("serve metrics on {addr}"))?;
    crate::metrics::register_all(crate::datapath::capture::StopReason::ALL.map(|r| r.as_str()));
    log::info!("metrics at http://{addr}/metrics");
    Ok(())
}
