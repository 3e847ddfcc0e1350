//! The soak: a canary capture of sequence-numbered frames runs while the bad inputs that once
//! broke the daemon are thrown at it (poisoned tags, durations no clock holds, odd ids and
//! destinations, long and slow filters, huge declared bodies, silent and half-open
//! connections, bursts, a hundred concurrent starts, start/stop races, generated requests).
//! Each bad input gets its documented answer, and the canary stores every frame, once, in
//! order.

use std::{
    io::Write as _,
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use proptest::{
    strategy::{Strategy as _, ValueTree as _},
    test_runner::TestRunner,
};
use serde_json::{Value, json};
use tapstream::control::CaptureState;
use tapstream_testenv::{CANARY_FILTER, Sender, VethPair, canary_seq};

use crate::{
    control_hardening::{TCP_ADDR, flood},
    daemon::{TestDaemon, reason},
    fuzz::{capture_request, exchange, post},
};

/// Canary frames a second: the ring (8,192 frames of UMEM) covers four seconds of a writer
/// that does not run; a stall that long would be a defect of its own.
const CANARY_RATE: u64 = 2000;

/// A request and its reply: status, and the reply's JSON.
fn exchange_json(socket: &std::path::Path, request: &[u8]) -> (u16, Value) {
    let (status, body) = exchange(socket, request, false)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no reply to {}", String::from_utf8_lossy(request)));
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// A request and its reply: status and the error message (empty for a success).
fn ask(socket: &std::path::Path, request: &[u8]) -> (u16, String) {
    let (status, reply) = exchange_json(socket, request);
    (status, reply["error"].as_str().unwrap_or_default().to_owned())
}

fn start(socket: &std::path::Path, body: &Value) -> (u16, String) {
    ask(socket, &post("/v1/captures", body.to_string().as_bytes()))
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: tapstream\r\nConnection: close\r\n\r\n").into_bytes()
}

fn hosts(n: usize) -> String {
    (0..n)
        .map(|i| format!("host 10.{}.{}.{}", i / 250, i % 250, (i * 7) % 250 + 1))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Throws each bad input at the daemon and checks its answer.
fn throw_bad_inputs(veth: &VethPair, socket: &std::path::Path, store: &str) {
    // Refused, each with the reason, and nothing registered.
    for (body, status, says) in [
        (json!({"id": "poison", "duration_secs": 2, "tags": {"ü☃": "v"}}), 400, "tag key"),
        (json!({"id": "crlf", "duration_secs": 2, "tags": {"a\r\nFORGED": "v"}}), 400, "tag key"),
        (json!({"idle_timeout_secs": 1e30}), 400, "idle_timeout_secs must be"),
        (json!({"duration_secs": 1e30}), 400, "duration_secs must be"),
        (json!({"id": "."}), 400, "capture id"),
        (json!({"id": ".."}), 400, "capture id"),
        (json!({"destination": format!("{store}/a\u{0}b")}), 400, "control character"),
        (json!({"destination": format!("{store}/../x")}), 403, "not under an allowed one"),
        (json!({"filter": hosts(450)}), 403, "limits.max_filter_bytes"),
        (json!({"packets": u64::MAX}), 403, "limits.max_packets"),
    ] {
        let (got, error) = start(socket, &body);
        assert_eq!((got, error.contains(says)), (status, true), "{body}: {got} {error}");
    }
    let (got, error) = ask(socket, &get("/v1/captures/canary/wait?timeout_secs=NaN"));
    assert_eq!(got, 400, "{error}");
    let (got, error) = ask(
        socket,
        b"POST /v1/captures HTTP/1.1\r\nHost: tapstream\r\nContent-Length: 1000000000\r\nConnection: close\r\n\r\n{",
    );
    assert_eq!(got, 413, "{error}");

    // Silent clients on the Unix socket (with the hundred starts below, within its bound of
    // 128 connections) and half-open connections past the TCP API's bound, held while the
    // rest goes on.
    let silent: Vec<UnixStream> = (0..20)
        .map(|_| {
            let mut s = UnixStream::connect(socket).expect("connect");
            s.write_all(b"GET /v1/captures HTTP/1.1\r\nHost: tapstream\r\nX-Slow: ").unwrap();
            s
        })
        .collect();
    let half_open = flood(veth, 300);

    std::thread::scope(|s| {
        // Filters slow to compile, three at once: each abandoned at the time limit.
        let slow: Vec<_> = (0..3)
            .map(|_| s.spawn(|| start(socket, &json!({"filter": hosts(400), "duration_secs": 5}))))
            .collect();
        for answer in slow {
            let (got, error) = answer.join().unwrap();
            assert!(got == 403 && error.contains("limits.filter_compile_timeout_secs"), "{got} {error}");
        }
    });
    std::thread::scope(|s| {
        // A hundred concurrent starts of captures that outlast them: the cap (8, the canary
        // holds one) and nothing else.
        let many: Vec<_> = (0..100)
            .map(|i| {
                s.spawn(move || {
                    start(
                        socket,
                        &json!({"id": format!("many{i}"), "duration_secs": 60, "filter": "udp port 1"}),
                    )
                })
            })
            .collect();
        let answers: Vec<(u16, String)> = many.into_iter().map(|a| a.join().unwrap()).collect();
        let started = answers.iter().filter(|(got, _)| *got == 201).count();
        assert_eq!(started, 7, "concurrent starts accepted beside the canary (cap 8): {answers:?}");
        for (got, error) in &answers {
            assert!(
                *got == 201 || (*got == 403 && error.contains("max_concurrent_captures")),
                "{got} {error}"
            );
        }
        for (i, _) in answers.iter().enumerate().filter(|(_, (got, _))| *got == 201) {
            assert_eq!(ask(socket, &post(&format!("/v1/captures/many{i}/stop"), b"")).0, 200);
        }
    });

    // A burst of a thousand requests.
    for _ in 0..1000 {
        assert_eq!(ask(socket, &get("/v1/captures")).0, 200);
    }

    // Starts and stops racing, in two threads.
    std::thread::scope(|s| {
        for t in 0..2 {
            s.spawn(move || {
                for i in 0..25 {
                    let id = format!("race{t}-{i}");
                    let mut got =
                        start(socket, &json!({"id": id, "duration_secs": 30, "filter": "udp port 2"}));
                    while got.0 == 403 {
                        // The cap, while the hundred above end.
                        std::thread::sleep(Duration::from_millis(100));
                        got = start(socket, &json!({"id": id, "duration_secs": 30, "filter": "udp port 2"}));
                    }
                    assert_eq!(got.0, 201, "{id}: {}", got.1);
                    let stop = ask(socket, &post(&format!("/v1/captures/{id}/stop"), b""));
                    assert_eq!(stop.0, 200, "{id}: {}", stop.1);
                }
            });
        }
    });

    // Generated requests (the fuzz tests' capture requests), each answered as documented;
    // those that start a capture are stopped.
    let mut runner = TestRunner::default();
    let strategy = capture_request(veth.capture_if.clone());
    for _ in 0..200 {
        let request = strategy.new_tree(&mut runner).unwrap().current();
        let (got, reply) = exchange_json(socket, &post("/v1/captures", request.to_string().as_bytes()));
        assert!([201, 400, 403, 409].contains(&got), "{got} for {request}: {reply}");
        if got == 201 {
            let id = reply["id"].as_str().expect("a started capture's id");
            assert_eq!(ask(socket, &post(&format!("/v1/captures/{id}/stop"), b"")).0, 200);
        }
    }

    // The Unix API answered all along; let the held connections go.
    drop(silent);
    drop(half_open);
}

#[test]
fn a_canary_capture_stores_every_frame_while_bad_inputs_are_thrown() {
    let veth = VethPair::new(1);
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, "soak-test-token\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let daemon = TestDaemon::start_with_limits(
        &veth,
        &format!("tcp_listen = \"{TCP_ADDR}\"\ntoken_file = \"{}\"", token_file.display()),
        "filter_compile_timeout_secs = 1",
    );
    let mut canary_args = vec!["-i", "tap", "--duration", "600s", "--id", "canary"];
    canary_args.extend(CANARY_FILTER.split(' '));
    let canary = daemon.start_capture(&canary_args);
    let sender = Sender::new(&veth);
    let done = AtomicBool::new(false);
    let (socket, store) = (daemon.socket(), daemon.dir.path().join("store").display().to_string());

    let sent = std::thread::scope(|s| {
        let sending = s.spawn(|| sender.send_canary(u64::MAX, CANARY_RATE, &done));
        let thrown = s.spawn(|| throw_bad_inputs(&veth, &socket, &store));
        let outcome = thrown.join();
        // A second more of frames after the last bad input.
        std::thread::sleep(Duration::from_secs(1));
        done.store(true, Ordering::Relaxed);
        let sent = sending.join().unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
        sent
    });

    let stop = daemon.cli(&["stop", &canary]);
    assert!(stop.status.success(), "{}", String::from_utf8_lossy(&stop.stderr));
    let info = daemon.wait(&canary);
    assert_eq!((info.state, reason(&info)), (CaptureState::Finished, "stopped"), "{info:?}");
    let summary = info.summary.as_ref().expect("summary");
    let stored: Vec<u64> =
        daemon.stored(&canary).iter().map(|f| canary_seq(f).expect("a canary frame")).collect();
    let missing = (0..sent).filter(|seq| stored.binary_search(seq).is_err()).count();
    assert!(
        stored.len() as u64 == sent && stored.iter().copied().eq(0..sent),
        "{sent} canary frames sent, {} stored, {missing} missing (drops: writer {}, kernel {})",
        stored.len(),
        summary.dropped_writer,
        summary.dropped_kernel
    );
    assert_eq!(summary.packets, sent);
    eprintln!("soak: {sent} canary frames sent and stored");
}
