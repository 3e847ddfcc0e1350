//! The control API under abuse: odd requests, refused with the reason. Each test makes its
//! own daemon (the [`TestDaemon`] of the daemon tests).

use tapstream_testenv::VethPair;

use crate::daemon::TestDaemon;

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
