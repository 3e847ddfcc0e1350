//! The control API under abuse: odd requests, refused with the reason. Each test makes its
//! own daemon (the [`TestDaemon`] of the daemon tests).

use std::os::unix::fs::PermissionsExt as _;

use tapstream_testenv::VethPair;

use crate::daemon::TestDaemon;

/// Where the daemons of these tests serve the TCP API (inside their own namespace).
const TCP_ADDR: &str = "127.0.0.1:9465";
/// The bearer token of these tests.
const TOKEN: &str = "hardening-test-token";

/// A daemon that also serves the TCP API, with its token in a file only its owner reads.
fn tcp_daemon(veth: &VethPair) -> (TestDaemon, tempfile::TempDir) {
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let daemon = TestDaemon::start(
        veth,
        &format!("tcp_listen = \"{TCP_ADDR}\"\ntoken_file = \"{}\"", token_file.display()),
    );
    (daemon, token_dir)
}

/// Stops the daemon with SIGTERM and returns its log.
fn stop_daemon(daemon: &mut TestDaemon) -> String {
    let (status, log) = daemon.running.take().unwrap().signal_and_wait(libc::SIGTERM);
    eprintln!("daemon log:\n{log}");
    assert!(status.success(), "the daemon failed ({status}):\n{log}");
    log
}

#[test]
fn odd_wait_timeouts_are_refused_naming_the_allowed_range() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let id = daemon.start_capture(&["-i", "tap", "--duration", "60s"]);
    let client = daemon.client();
    for value in ["NaN", "inf", "-inf", "-1", "1e400", "", "soon"] {
        let (status, body) =
            client.raw("GET", &format!("/v1/captures/{id}/wait?timeout_secs={value}"), None).unwrap();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 400, "timeout_secs={value}: {body}");
        assert!(body.contains("timeout_secs") && body.contains("0..=300"), "timeout_secs={value}: {body}");
    }
    let (status, _) = client.raw("GET", &format!("/v1/captures/{id}/wait?timeout_secs=0.1"), None).unwrap();
    assert_eq!(status, 200);
}

#[test]
fn a_duration_no_clock_can_hold_is_refused_and_leaves_no_capture_behind() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let client = daemon.client();
    for body in [&br#"{"idle_timeout_secs": 1e300}"#[..], br#"{"duration_secs": 1e300}"#] {
        let (status, reply) = client.raw("POST", "/v1/captures", Some(body)).unwrap();
        let reply = String::from_utf8_lossy(&reply);
        assert!(status == 400 || status == 403, "{status} {reply}");
    }
    assert!(client.list().unwrap().is_empty(), "no capture left behind");
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let veth = VethPair::new(1);
    let (mut daemon, _token) = tcp_daemon(&veth);
    let curl = |auth: &str| {
        let out = veth
            .capture_ns
            .command("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("Authorization: {auth}"))
            .arg(format!("http://{TCP_ADDR}/v1/captures"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        assert_eq!(curl(&format!("{scheme} {TOKEN}")), "200", "{scheme}");
        assert_eq!(curl(&format!("{scheme}    {TOKEN}")), "200", "{scheme} and spaces");
        assert_eq!(curl(&format!("{scheme} {TOKEN}x")), "401", "{scheme} and a wrong token");
    }
    assert_eq!(curl(&format!("Basic {TOKEN}")), "401");
    assert_eq!(curl(&format!("Bearer{TOKEN}")), "401", "no space after the scheme");
    assert_eq!(curl(TOKEN), "401");
    let log = stop_daemon(&mut daemon);
    assert!(!log.contains(TOKEN), "{log}");
}
