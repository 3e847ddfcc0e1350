//! One request model: the one-shot command's flags and the daemon's HTTP API resolve the same
//! request into the same plan, and refuse the same request in the same words.
//!
//! The CLI path is the one-shot's own (`tapstream capture -i IF --upload DIR FLAGS...` parsed
//! by its argument parser and planned by `cli::oneshot::plan`, which the command runs before it
//! captures); the HTTP path is a real daemon's `POST /v1/captures`, configured with the same
//! interface, destination and node.

use clap::Parser as _;
use serde_json::{Value, json};
use tapstream::{
    cli::{
        args::{Cli, Command},
        oneshot,
    },
    control::{CaptureInfo, CaptureState, client::Client},
    request::{CapturePlan, PlanError},
};
use tapstream_testenv::VethPair;

use crate::daemon::{TestDaemon, error_of};

/// The one-shot's plan for `flags`, with the interface, store and node of the test daemon.
fn cli_plan(daemon: &TestDaemon, veth: &VethPair, flags: &[&str]) -> anyhow::Result<CapturePlan> {
    let store = daemon.store_dir();
    let store = store.to_str().unwrap();
    let argv =
        [&["tapstream", "capture", "-i", &veth.capture_if, "--upload", store, "--node", "testnode"], flags]
            .concat();
    let Command::Capture(cli) = Cli::try_parse_from(&argv).expect("flags parse").command else {
        panic!("{argv:?} is not a capture")
    };
    assert!(cli.action.is_none(), "{argv:?} is a one-shot");
    oneshot::plan(&cli.oneshot)
}

/// `POST /v1/captures` with `body`: the status and the reply.
fn http(client: &Client, body: &Value) -> (u16, String) {
    let (status, reply) =
        client.raw("POST", "/v1/captures", Some(&serde_json::to_vec(body).unwrap())).expect("daemon answers");
    (status, String::from_utf8(reply).unwrap())
}

#[test]
fn the_cli_and_the_http_api_make_the_same_plans() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let client = daemon.client();
    let cases: [(&[&str], Value); 4] = [
        (
            &[
                "--id",
                "parity-1",
                "--duration",
                "30s",
                "-c",
                "10",
                "--snaplen",
                "128",
                "--tag",
                "Team=net ops",
                "--alert-id",
                "A-1",
                "--customer",
                "acme",
                "tcp",
                "port",
                "443",
            ],
            json!({"id": "parity-1", "duration_secs": 30, "packets": 10, "snaplen": 128,
                   "tags": {"Team": "net ops"}, "alert_id": "A-1", "customer": "acme",
                   "filter": "tcp port 443"}),
        ),
        (
            &["--id", "parity-2", "--duration", "1500ms", "--idle", "1s", "--bytes", "1M"],
            json!({"id": "parity-2", "duration_secs": 1.5, "idle_timeout_secs": 1, "bytes": 1_000_000}),
        ),
        (
            &["--id", "parity-4", "--duration", "20s", "--retention", "short", "--request-id", "T-9"],
            json!({"id": "parity-4", "duration_secs": 20, "retention": "short", "request_id": "T-9"}),
        ),
        (
            &["--id", "parity-3", "--duration", "20s", "udp", "or", "icmp"],
            json!({"id": "parity-3", "interface": veth.capture_if, "duration_secs": 20,
                   "filter": "udp or icmp"}),
        ),
    ];
    for (flags, body) in cases {
        let plan = cli_plan(&daemon, &veth, flags).unwrap_or_else(|e| panic!("{flags:?}: {e:#}"));
        let (status, reply) = http(&client, &body);
        assert_eq!(status, 201, "{body}: {reply}");
        let info: CaptureInfo = serde_json::from_str(&reply).unwrap();
        // The one difference: the daemon names the interface by its configured alias, the
        // one-shot (which has no configuration) by its device.
        assert_eq!(info.interfaces, ["tap"]);
        let device = &veth.capture_if;
        assert_eq!(plan.interfaces, [(device.clone(), device.clone())]);
        assert_eq!(info.devices, std::slice::from_ref(device));
        let mut daemon_request = info.request.clone();
        daemon_request.interfaces = plan.request.interfaces.clone();
        assert_eq!(daemon_request, plan.request, "{flags:?} and {body}");
        assert_eq!(Some(&info.location), plan.location().as_ref());
        assert_eq!(plan.spec.filter.as_ref().map(|f| f.expression()), info.request.filter.as_deref());

        client.stop(&info.id).unwrap();
        let ended = client.wait(&info.id, std::time::Duration::from_secs(30)).unwrap();
        assert_ne!(ended.state, CaptureState::Running, "{} did not end", info.id);
    }
}

#[test]
fn the_cli_and_the_http_api_refuse_the_same_requests_in_the_same_words() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let client = daemon.client();
    let cases: [(&[&str], Value, &str); 10] = [
        (&["--id", "bad id", "--duration", "5s"], json!({"id": "bad id", "duration_secs": 5}), "capture id"),
        (
            &["--id", ".hidden", "--duration", "5s"],
            json!({"id": ".hidden", "duration_secs": 5}),
            "capture id",
        ),
        (&["--snaplen", "0", "--duration", "5s"], json!({"snaplen": 0, "duration_secs": 5}), "snaplen"),
        (&["-c", "0", "--duration", "5s"], json!({"packets": 0, "duration_secs": 5}), "at least 1"),
        (&["--bytes", "0", "--duration", "5s"], json!({"bytes": 0, "duration_secs": 5}), "at least 1"),
        (
            &["--duration", "5s", "tcp", "port"],
            json!({"filter": "tcp port", "duration_secs": 5}),
            "invalid filter \"tcp port\"",
        ),
        (
            &["--duration", "5s", "host", "999.1.1.1"],
            json!({"filter": "host 999.1.1.1", "duration_secs": 5}),
            "invalid filter",
        ),
        (
            &["--duration", "5s", "--customer", "caf\u{e9}"],
            json!({"customer": "caf\u{e9}", "duration_secs": 5}),
            "printable ASCII",
        ),
        (
            &["--duration", "5s", "--retention", "a b"],
            json!({"retention": "a b", "duration_secs": 5}),
            "retention class \"a b\"",
        ),
        (
            &["--duration", "5s", "--request-id", "caf\u{e9}"],
            json!({"request_id": "caf\u{e9}", "duration_secs": 5}),
            "request_id",
        ),
    ];
    for (flags, body, words) in cases {
        let refusal = cli_plan(&daemon, &veth, flags).expect_err(&format!("{flags:?} is refused"));
        assert!(
            refusal.downcast_ref::<PlanError>().is_some(),
            "{flags:?}: not a plan's refusal: {refusal:#}"
        );
        let cli_words = refusal.to_string();
        let (status, reply) = http(&client, &body);
        assert_eq!(status, 400, "{body}: {reply}");
        assert_eq!(error_of(&reply), cli_words, "{flags:?} and {body}");
        assert!(cli_words.contains(words), "{cli_words:?} does not say {words:?}");
    }
    assert!(client.list().unwrap().is_empty(), "a refused request started a capture");
}
