//! Generated requests against a running daemon: capture requests with odd, oversized and
//! wrong-typed fields, and raw HTTP with odd methods, paths, headers and bodies. Every one gets
//! a documented answer (never a 500, never a hang), every capture it starts can be stopped,
//! and the daemon neither panics nor lets a request's bytes forge a line of its log.
//!
//! `TAPSTREAM_FUZZ_CASES` sets the number of cases of each property (default 300, about half
//! a minute each here); proptest prints a failing case shrunk to its smallest form.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use proptest::{prelude::*, test_runner::TestCaseError};
use serde_json::{Map, Value};
use tapstream::control::{CaptureInfo, CaptureState};
use tapstream_testenv::VethPair;

use crate::daemon::TestDaemon;

/// Statuses the API documents (see `tapstream::control`); 500 is a defect here: none of
/// these requests can fail for a reason of the server's own.
const DOCUMENTED: [u16; 11] = [200, 201, 400, 401, 403, 404, 408, 409, 413, 431, 503];

/// A string a request may carry in any field: a marker after a line break checks the log.
const INJECTED: &str = "FORGED-LOG-LINE";

/// The configuration of each property: `TAPSTREAM_FUZZ_CASES` cases, no file of failures.
fn config() -> ProptestConfig {
    let cases = std::env::var("TAPSTREAM_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Strings that have broken parsers, paths, headers and logs elsewhere.
fn odd_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9._-]{0,20}",
        ".{0,40}",
        Just(String::new()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just("../../etc".to_owned()),
        Just("a/b".to_owned()),
        Just("\0".to_owned()),
        Just("ü☃".to_owned()),
        Just(format!("x\r\n{INJECTED}: y")),
        Just(format!("x\n{INJECTED}")),
        Just("%2e%2e".to_owned()),
        (1usize..3000).prop_map(|n| "a".repeat(n)),
    ]
}

/// A JSON value of any shape, for fields given the wrong type and for unknown fields.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        odd_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(odd_string(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Seconds as a request may give them: in range, at the edges, beyond them, or negative.
fn seconds() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0.05f64..5.0).prop_map(Value::from),
        1 => prop::sample::select(vec![0.0, -1.0, 1e-12, 599.0, 600.0, 601.0, 3.2e7, 1e30, 1.7e308, -0.0])
            .prop_map(Value::from),
        1 => any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        1 => any::<i64>().prop_map(Value::from),
    ]
}

/// A count as a request may give it.
fn count() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0u64..5000).prop_map(Value::from),
        1 => prop::sample::select(vec![u64::MAX, u64::from(u32::MAX), u64::from(u32::MAX) + 1, 100_001])
            .prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => Just(Value::from(1.5)),
    ]
}

fn filter() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => prop::sample::select(vec!["udp port 9", "tcp", "arp or icmp", "vlan and udp", "ip protochain 6", "inbound", "tcp port"])
            .prop_map(Value::from),
        // A few hosts compile in milliseconds; 700 are over the length limit, refused unread.
        1 => prop_oneof![1usize..40, Just(700)].prop_map(|n| Value::from(vec!["host 10.0.0.1"; n].join(" or "))),
        1 => odd_string().prop_map(Value::String),
    ]
}

/// One field of a capture request: the right type and a sensible value mostly (so that
/// requests get as far as starting captures), edge values often, the wrong type sometimes.
fn field(name: &'static str, device: String) -> BoxedStrategy<Value> {
    let right: BoxedStrategy<Value> = match name {
        "id" => {
            prop_oneof![3 => "[a-z0-9][a-z0-9._-]{0,11}", 1 => odd_string()].prop_map(Value::String).boxed()
        }
        "customer" | "alert_id" => {
            prop_oneof![3 => "[ -~]{0,20}", 1 => odd_string()].prop_map(Value::String).boxed()
        }
        "interface" => prop_oneof![
            6 => Just(Value::from("tap")),
            1 => Just(Value::from(device)),
            1 => odd_string().prop_map(Value::String)
        ]
        .boxed(),
        "filter" => filter().boxed(),
        "snaplen" | "packets" | "bytes" => count().boxed(),
        "duration_secs" | "idle_timeout_secs" => seconds().boxed(),
        "tags" => prop::collection::btree_map(
            prop_oneof![3 => "[a-z_-]{1,8}", 1 => odd_string()],
            odd_string(),
            0..3,
        )
        .prop_map(|m: BTreeMap<String, String>| {
            Value::Object(m.into_iter().map(|(k, v)| (k, v.into())).collect())
        })
        .boxed(),
        "destination" => prop_oneof![
            2 => Just(Value::from("local")),
            2 => Just(Value::from("local/sub")),
            1 => odd_string().prop_map(Value::String)
        ]
        .boxed(),
        _ => unreachable!("{name}"),
    };
    prop_oneof![15 => right, 1 => any_json()].boxed()
}

const FIELDS: [&str; 12] = [
    "id",
    "interface",
    "filter",
    "snaplen",
    "packets",
    "bytes",
    "duration_secs",
    "idle_timeout_secs",
    "tags",
    "customer",
    "alert_id",
    "destination",
];

/// A capture request: some of its fields, now and then an unknown one.
pub(crate) fn capture_request(device: String) -> impl Strategy<Value = Value> {
    let fields: Vec<BoxedStrategy<Option<Value>>> =
        FIELDS.iter().map(|name| prop::option::weighted(0.4, field(name, device.clone())).boxed()).collect();
    (fields, prop::option::weighted(0.1, (odd_string(), any_json()))).prop_map(|(values, unknown)| {
        let mut object = Map::new();
        for (name, value) in FIELDS.iter().zip(values) {
            if let Some(value) = value {
                object.insert((*name).to_owned(), value);
            }
        }
        if let Some((name, value)) = unknown {
            object.insert(name, value);
        }
        Value::Object(object)
    })
}

/// An HTTP exchange on the daemon's Unix socket: `request` is written whole and whatever comes
/// back is read until the daemon closes. With `half_close` the write side is closed after the
/// request (the server then closes too, perhaps without a reply: `None`).
pub(crate) fn exchange(
    socket: &Path,
    request: &[u8],
    half_close: bool,
) -> Result<Option<(u16, Vec<u8>)>, TestCaseError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| TestCaseError::fail(format!("connect: {e}")))?;
    // The server's header and body timeouts are 10 s: a reply or a close comes before this.
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The daemon may answer and close before reading everything (e.g. 413): a broken pipe
    // here is an answer, not a failure.
    let _ = stream.write_all(request);
    if half_close {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut reply = Vec::new();
    match stream.read_to_end(&mut reply) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(TestCaseError::fail(format!("no reply and no close within 30 s: {e}"))),
    }
    if reply.is_empty() {
        return Ok(None);
    }
    // An interim reply (100 Continue) comes before the final one.
    let mut text = String::from_utf8_lossy(&reply).into_owned();
    while text.starts_with("HTTP/1.1 1")
        && let Some(at) = text.find("\r\n\r\n")
    {
        text = text[at + 4..].to_owned();
    }
    let reply = text.as_bytes().to_vec();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| TestCaseError::fail(format!("not an HTTP reply: {text:?}")))?;
    let body = match reply.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(at) => reply[at + 4..].to_vec(),
        None => Vec::new(),
    };
    Ok(Some((status, body)))
}

pub(crate) fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: tapstream\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// An error reply's message: present, one line, no control characters.
fn check_error_body(status: u16, body: &[u8]) -> Result<(), TestCaseError> {
    let reply: Value = serde_json::from_slice(body)
        .map_err(|e| TestCaseError::fail(format!("{status} with a body that is not JSON ({e}): {body:?}")))?;
    let message = reply["error"].as_str().unwrap_or_default();
    prop_assert!(!message.is_empty(), "{status} without an error message: {reply}");
    prop_assert!(!message.chars().any(char::is_control), "control characters in {message:?}");
    Ok(())
}

/// Ends a capture a generated request started, so the next cases are not refused for the cap.
fn stop(daemon: &TestDaemon, info: &CaptureInfo) -> Result<(), TestCaseError> {
    let path = format!("/v1/captures/{}/stop", info.id);
    let reply = exchange(&daemon.socket(), &post(&path, b""), false)?;
    let Some((status, body)) = reply else {
        return Err(TestCaseError::fail(format!("no reply to stopping {}", info.id)));
    };
    prop_assert_eq!(status, 200, "stopping {}: {}", info.id, String::from_utf8_lossy(&body));
    let ended = daemon.wait(&info.id);
    prop_assert!(ended.state != CaptureState::Running, "{ended:?}");
    Ok(())
}

/// Asserts that the generated requests got each status of `expected` (`statuses` counts the
/// answers by status): the cases reach what they are meant to.
fn assert_each_answered(statuses: &BTreeMap<u16, u32>, expected: &[u16]) {
    eprintln!("statuses: {statuses:?}");
    for expected in expected {
        assert!(statuses.contains_key(expected), "no case was answered {expected}: {statuses:?}");
    }
}

/// After the generated requests: nothing runs that was not stopped, the daemon answers, and
/// its log has no panic and no line forged by a request.
fn assert_daemon_unharmed(mut daemon: TestDaemon) {
    let list = daemon.client().list().expect("the daemon answers after the generated requests");
    let running: Vec<&str> =
        list.iter().filter(|c| c.state == CaptureState::Running).map(|c| c.id.as_str()).collect();
    assert!(running.is_empty(), "captures left running: {running:?}");
    let (status, log) = daemon.running.take().expect("daemon").signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "the daemon exits cleanly on SIGTERM ({status}):\n{log}");
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    let forged: Vec<&str> = log.lines().filter(|l| l.trim_start().starts_with(INJECTED)).collect();
    assert!(forged.is_empty(), "a request's line break reached the log: {forged:?}");
}

#[test]
fn generated_capture_requests_get_a_documented_answer_and_break_nothing() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let socket = daemon.socket();
    let statuses = std::cell::RefCell::new(BTreeMap::<u16, u32>::new());
    proptest!(config(), |(request in capture_request(veth.capture_if.clone()))| {
        let body = serde_json::to_vec(&request).unwrap();
        let Some((status, reply)) = exchange(&socket, &post("/v1/captures", &body), false)? else {
            return Err(TestCaseError::fail("a well-formed request got no reply"));
        };
        *statuses.borrow_mut().entry(status).or_default() += 1;
        prop_assert!(DOCUMENTED.contains(&status) && status != 431, "{status} for {request}: {}", String::from_utf8_lossy(&reply));
        if status == 201 {
            let info: CaptureInfo = serde_json::from_slice(&reply).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if let Some(id) = request.get("id").and_then(Value::as_str) {
                prop_assert_eq!(&info.id, id);
            }
            stop(&daemon, &info)?;
        } else {
            check_error_body(status, &reply)?;
        }
    });
    assert_each_answered(&statuses.into_inner(), &[201, 400, 403]);
    assert_daemon_unharmed(daemon);
}

/// A raw request: well-formed HTTP with odd methods, targets, headers and bodies, or bytes
/// that are not HTTP at all (sent with the write side closed after them).
#[derive(Clone, Debug)]
enum RawRequest {
    Http(Vec<u8>),
    Garbage(Vec<u8>),
}

fn raw_request() -> impl Strategy<Value = RawRequest> {
    let method =
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "get", "BREW"]);
    let path = prop_oneof![
        prop::sample::select(vec![
            "/v1/captures",
            "/v1/captures/",
            "//v1//captures",
            "/v1/captures/x",
            "/v1/captures/x/stop",
            "/v1/captures/x/wait?timeout_secs=NaN",
            "/v1/captures/x/wait?timeout_secs=1e400",
            "/v1/captures/x/wait?timeout_secs=-1",
            "/v1/captures/../../etc/passwd",
            "/v1/captures/%00",
            "*",
            "http://other/v1/captures",
        ])
        .prop_map(str::to_owned),
        "/[a-zA-Z0-9/%?=&._-]{0,60}",
    ];
    // Headers that keep the request complete: a body always comes with its true length,
    // unless a length the server refuses at once (too large, negative) replaces it.
    let header = prop_oneof![
        Just("Content-Length: 999999999999".to_owned()),
        Just("Content-Length: -1".to_owned()),
        Just("Authorization: Bearer x".to_owned()),
        Just("Authorization: Basic eDp4".to_owned()),
        Just("Content-Type: text/plain".to_owned()),
        (1usize..20000).prop_map(|n| format!("X-Long: {}", "a".repeat(n))),
        "X-[A-Za-z-]{1,12}: [ -~]{0,30}",
    ];
    let body = prop_oneof![
        Just(Vec::new()),
        any_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        prop::collection::vec(any::<u8>(), 0..200),
    ];
    prop_oneof![
        6 => (method, path, prop::collection::vec(header, 0..4), body).prop_map(|(m, p, headers, body)| {
            let mut request = format!("{m} {p} HTTP/1.1\r\nHost: tapstream\r\nConnection: close\r\n");
            if !headers.iter().any(|h| h.starts_with("Content-Length")) {
                request.push_str(&format!("Content-Length: {}\r\n", body.len()));
            }
            for h in headers {
                request.push_str(&h);
                request.push_str("\r\n");
            }
            request.push_str("\r\n");
            let mut request = request.into_bytes();
            request.extend_from_slice(&body);
            RawRequest::Http(request)
        }),
        1 => prop::collection::vec(any::<u8>(), 0..300).prop_map(RawRequest::Garbage),
        // Well-formed reads of the real routes, so that every run also asks what a client
        // asks (by chance alone, a run of a few hundred cases may send none).
        2 => prop::sample::select(vec!["/v1/captures", "/v1/interfaces", "/v1/captures/x"]).prop_map(|p| {
            RawRequest::Http(format!("GET {p} HTTP/1.1\r\nHost: tapstream\r\nConnection: close\r\n\r\n").into_bytes())
        }),
    ]
}

#[test]
fn generated_http_requests_get_a_documented_answer_or_a_close_and_break_nothing() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let socket = daemon.socket();
    let statuses = std::cell::RefCell::new(BTreeMap::<u16, u32>::new());
    proptest!(config(), |(request in raw_request())| {
        let (bytes, half_close) = match &request {
            RawRequest::Http(bytes) => (bytes, false),
            RawRequest::Garbage(bytes) => (bytes, true),
        };
        let reply = exchange(&socket, bytes, half_close)?;
        let shown = String::from_utf8_lossy(bytes);
        let Some((status, reply)) = reply else {
            prop_assert!(half_close, "no reply to a complete request: {shown:?}");
            return Ok(());
        };
        *statuses.borrow_mut().entry(status).or_default() += 1;
        prop_assert!(DOCUMENTED.contains(&status), "{status} for {shown:?}: {}", String::from_utf8_lossy(&reply));
        if status == 201 {
            let info: CaptureInfo = serde_json::from_slice(&reply).map_err(|e| TestCaseError::fail(e.to_string()))?;
            stop(&daemon, &info)?;
        }
    });
    assert_each_answered(&statuses.into_inner(), &[200, 400, 404, 413]);
    assert_daemon_unharmed(daemon);
}
