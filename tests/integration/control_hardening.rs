//! The control API under abuse: connection floods (past the bound of a listener and past the
//! daemon's file descriptor limit), slow and silent clients, odd requests, and a stop while a
//! request waits. Each test makes its own daemon (the [`TestDaemon`] of the daemon tests).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    sync::mpsc,
    time::{Duration, Instant},
};

use tapstream::control::{CaptureInfo, CaptureState};
use tapstream_testenv::VethPair;

use crate::daemon::TestDaemon;

/// Where the daemons of these tests serve the TCP API (inside their own namespace).
pub(crate) const TCP_ADDR: &str = "127.0.0.1:9465";
/// The bearer token of these tests.
const TOKEN: &str = "hardening-test-token";
/// Generous bounds for a slow VM: the server's timeouts are 10 s.
const CLOSED_WITHIN: Duration = Duration::from_secs(30);
/// How long a request to the Unix API may take while the TCP API is flooded.
const ANSWERS_WITHIN: Duration = Duration::from_secs(10);

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

/// The process id of the daemon (found by its configuration file, unique to the test).
fn daemon_pid(daemon: &TestDaemon) -> i32 {
    let config = daemon.dir.path().join("tapstream.toml");
    let config = config.to_str().unwrap().as_bytes();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"tapstream")) && args.contains(&config) {
            return pid;
        }
    }
    panic!("no tapstream process with {}", String::from_utf8_lossy(config));
}

/// File descriptors `pid` has open.
fn open_fds(pid: i32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64
}

/// Sets the soft and hard RLIMIT_NOFILE of `pid` to `limit` (what `prlimit --nofile` does).
fn limit_fds(pid: i32, limit: u64) {
    let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    // SAFETY: prlimit(2) with a valid new limit and no old-limit pointer.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &rlimit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit {pid} nofile {limit}: {}", std::io::Error::last_os_error());
}

/// Asserts that `GET /v1/captures` on the Unix socket answers within [`ANSWERS_WITHIN`]
/// (the request runs on a thread, so that a daemon that never answers fails the test).
fn assert_unix_api_answers(daemon: &TestDaemon, when: &str) {
    let client = daemon.client();
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(client.list().map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(ANSWERS_WITHIN) {
        Ok(Ok(_)) => eprintln!("{when}: the Unix API answered in {:?}", started.elapsed()),
        Ok(Err(e)) => panic!("{when}: the Unix API failed: {e}"),
        Err(_) => panic!("{when}: the Unix API did not answer within {ANSWERS_WITHIN:?}"),
    }
}

/// Opens up to `n` TCP connections to the daemon's TCP API, from inside its namespace, and
/// sends nothing on them. Connections the server has already refused count too: the point is
/// to offer them. Stops early after a run of failed connects (a backlog the server does not
/// drain).
pub(crate) fn flood(veth: &VethPair, n: usize) -> Vec<TcpStream> {
    let addr: SocketAddr = TCP_ADDR.parse().unwrap();
    veth.capture_ns.enter(|| {
        let mut open = Vec::with_capacity(n);
        let mut failed_in_a_row = 0;
        for _ in 0..n {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(stream) => {
                    failed_in_a_row = 0;
                    open.push(stream);
                }
                Err(_) => {
                    failed_in_a_row += 1;
                    if failed_in_a_row == 20 {
                        break;
                    }
                }
            }
        }
        eprintln!("flood: {} of {n} connections made", open.len());
        open
    })
}

/// Asserts, three times a second apart, that the Unix API answers (see
/// [`assert_unix_api_answers`]) while the connections of a flood (`when`) stay open.
fn assert_unix_api_answers_throughout(daemon: &TestDaemon, when: &str) {
    for round in 0..3 {
        assert_unix_api_answers(daemon, &format!("{when}, round {round}"));
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Waits until the server has closed every connection of `streams` (a read returns end of
/// file or a reset), at most `within`; returns how many it closed.
fn closed_by_server(streams: &[TcpStream], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut closed = vec![false; streams.len()];
    loop {
        for (stream, closed) in streams.iter().zip(closed.iter_mut()).filter(|(_, c)| !**c) {
            stream.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 512];
            match (&*stream).read(&mut buf) {
                Ok(0) => *closed = true,
                Ok(_) => {} // a reply (an error, say); the close follows
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => *closed = true,
            }
        }
        let n = closed.iter().filter(|c| **c).count();
        if n == streams.len() || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Stops the daemon with SIGTERM and returns its log.
fn stop_daemon(daemon: &mut TestDaemon) -> String {
    let (status, log) = daemon.running.take().unwrap().signal_and_wait(libc::SIGTERM);
    eprintln!("daemon log:\n{log}");
    assert!(status.success(), "the daemon failed ({status}):\n{log}");
    log
}

/// Stops the daemon after a flood (see [`stop_daemon`]) and returns its log, which must not
/// have grown with the number of refused connections or accept errors: a few lines of start
/// and stop, and rate-limited warnings.
fn stop_daemon_with_a_small_log(daemon: &mut TestDaemon) -> String {
    let log = stop_daemon(daemon);
    let lines = log.lines().count();
    assert!(
        lines < 100,
        "{lines} log lines; the first 40:\n{}",
        log.lines().take(40).collect::<Vec<_>>().join("\n")
    );
    log
}

#[test]
fn a_tcp_flood_past_the_fd_limit_leaves_the_unix_api_answering_and_the_log_small() {
    let veth = VethPair::new(1);
    let (mut daemon, _token) = tcp_daemon(&veth);
    // As the probe found it: the daemon at `ulimit -n 1024`, 1,100 half-open connections.
    limit_fds(daemon_pid(&daemon), 1024);
    let streams = flood(&veth, 1100);
    assert!(streams.len() > 1024 - open_fds(daemon_pid(&daemon)) as usize, "the flood went past the limit");
    assert_unix_api_answers_throughout(&daemon, "flood");
    // Every connection is closed by the server: those over the bound at once, the others
    // when their header timeout passes.
    let closed = closed_by_server(&streams, CLOSED_WITHIN);
    assert_eq!(closed, streams.len(), "connections the server left open");
    assert_unix_api_answers(&daemon, "after the flood");
    drop(streams);
    let log = stop_daemon_with_a_small_log(&mut daemon);
    assert!(log.contains("refused"), "the refusals are reported:\n{log}");
}

#[test]
fn a_tcp_flood_with_few_fds_left_does_not_take_those_the_unix_api_needs() {
    let veth = VethPair::new(1);
    let (mut daemon, _token) = tcp_daemon(&veth);
    let pid = daemon_pid(&daemon);
    // Fewer free descriptors than the TCP listener's bound of connections.
    let open = open_fds(pid);
    limit_fds(pid, open + 96);
    let streams = flood(&veth, 400);
    assert_unix_api_answers_throughout(&daemon, &format!("flood with {} fds at most", open + 96));
    assert_eq!(closed_by_server(&streams, CLOSED_WITHIN), streams.len(), "connections the server left open");
    drop(streams);
    stop_daemon_with_a_small_log(&mut daemon);
}

/// CPU time `pid` has used, user and system.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name (in parentheses): state is field 3, utime and stime 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf(3) has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_sec)
}

/// CPU time `pid` uses over `period`, as a fraction of it.
fn cpu_share(pid: i32, period: Duration) -> f64 {
    let before = cpu_time(pid);
    std::thread::sleep(period);
    (cpu_time(pid) - before).as_secs_f64() / period.as_secs_f64()
}

#[test]
fn a_unix_flood_past_the_fd_limit_pauses_accepts_instead_of_spinning() {
    let veth = VethPair::new(1);
    let mut daemon = TestDaemon::start(&veth, "");
    let pid = daemon_pid(&daemon);
    let idle = cpu_share(pid, Duration::from_secs(2));
    // A few descriptors left: the flood runs the daemon out of them (EMFILE on accept).
    limit_fds(pid, open_fds(pid) + 16);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let flooder = {
        let (socket, stop) = (daemon.socket(), stop.clone());
        std::thread::spawn(move || {
            // Connects may block once the backlog is full: the main thread does not wait for them.
            for _ in 0..300 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let Ok(mut stream) = UnixStream::connect(&socket) else { break };
                let _ = stream.write_all(b"GET /v1/captures HTTP/1.1\r\nHost: tapstream\r\n");
                if tx.send(stream).is_err() {
                    break;
                }
            }
        })
    };
    let mut streams = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while let Ok(stream) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        streams.push(stream);
    }
    eprintln!("{} connections made", streams.len());
    let flooded = cpu_share(pid, Duration::from_secs(3));
    eprintln!("CPU share of the daemon: {idle:.2} idle, {flooded:.2} out of descriptors");
    assert!(flooded < idle + 0.5, "the daemon spins: {flooded:.2} of a core while out of descriptors");

    // The flood ends: the daemon accepts again.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(streams);
    let drain = std::thread::spawn(move || rx.iter().count());
    let deadline = Instant::now() + CLOSED_WITHIN;
    loop {
        let (tx, answered) = mpsc::channel();
        let client = daemon.client();
        std::thread::spawn(move || {
            let _ = tx.send(client.list().is_ok());
        });
        if answered.recv_timeout(ANSWERS_WITHIN) == Ok(true) {
            break;
        }
        assert!(Instant::now() < deadline, "the Unix API never answered again after the flood");
        std::thread::sleep(Duration::from_millis(500));
    }
    flooder.join().unwrap();
    drain.join().unwrap();
    let log = stop_daemon_with_a_small_log(&mut daemon);
    assert!(log.contains("cannot accept a connection"), "the failed accepts are reported:\n{log}");
}

/// Reads from `stream` until the server closes it or [`CLOSED_WITHIN`] passes; returns what the
/// server sent, how long the read took, and how it ended.
fn read_until_closed(stream: &mut UnixStream) -> (String, Duration, std::io::Result<usize>) {
    stream.set_read_timeout(Some(CLOSED_WITHIN)).unwrap();
    let started = Instant::now();
    let mut reply = Vec::new();
    let result = stream.read_to_end(&mut reply);
    let elapsed = started.elapsed();
    (String::from_utf8_lossy(&reply).into_owned(), elapsed, result)
}

/// Whether a read of [`read_until_closed`] ended because the server closed the connection in
/// time (not because the read timed out).
fn closed_in_time(elapsed: Duration, result: &std::io::Result<usize>) -> bool {
    elapsed < CLOSED_WITHIN && !matches!(result, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn a_client_that_never_finishes_its_headers_is_closed() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    let mut stream = UnixStream::connect(daemon.socket()).unwrap();
    stream.write_all(b"GET /v1/captures HTTP/1.1\r\nHost: tapstream\r\nX-Slow: ").unwrap();
    let (_, elapsed, result) = read_until_closed(&mut stream);
    assert!(closed_in_time(elapsed, &result), "still open after {elapsed:?} ({result:?})");

    // An idle keep-alive connection too: one request answered, then nothing.
    let mut stream = UnixStream::connect(daemon.socket()).unwrap();
    stream.write_all(b"GET /v1/captures HTTP/1.1\r\nHost: tapstream\r\n\r\n").unwrap();
    let (reply, elapsed, result) = read_until_closed(&mut stream);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        closed_in_time(elapsed, &result),
        "idle keep-alive connection still open after {elapsed:?} ({result:?})"
    );
}

#[test]
fn a_body_that_never_arrives_gets_an_error_or_a_close() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start(&veth, "");
    // A body far over the largest accepted, and one within it: neither arrives.
    for declared in [1_000_000_000u64, 1_000] {
        let mut stream = UnixStream::connect(daemon.socket()).unwrap();
        let head = format!(
            "POST /v1/captures HTTP/1.1\r\nHost: tapstream\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n{{\"id\""
        );
        stream.write_all(head.as_bytes()).unwrap();
        let (reply, elapsed, result) = read_until_closed(&mut stream);
        eprintln!("Content-Length {declared}: after {elapsed:?}: {reply}");
        assert!(
            closed_in_time(elapsed, &result),
            "Content-Length {declared}: still waiting after {elapsed:?} ({result:?})"
        );
        assert!(reply.is_empty() || reply.starts_with("HTTP/1.1 4"), "{reply}");
    }
    assert!(daemon.client().list().unwrap().is_empty(), "no capture started");
}

#[test]
fn sigterm_ends_captures_and_exits_while_a_wait_is_pending() {
    let veth = VethPair::new(1);
    let mut daemon = TestDaemon::start(&veth, "");
    let id = daemon.start_capture(&["-i", "tap", "--duration", "300s", "--id", "long"]);
    let client = daemon.client();
    let (wait_tx, wait_rx) = mpsc::channel();
    let waiting_id = id.clone();
    std::thread::spawn(move || {
        let _ = wait_tx.send(client.wait(&waiting_id, Duration::from_secs(300)).map_err(|e| e.to_string()));
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(wait_rx.try_recv().is_err(), "the wait is pending");

    let pid = daemon_pid(&daemon);
    let running = daemon.running.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(running.signal_and_wait(libc::SIGTERM));
    });
    let (status, log) = match rx.recv_timeout(CLOSED_WITHIN) {
        Ok(exited) => exited,
        Err(_) => {
            // SAFETY: kill(2) of the daemon this test started, so that it does not outlive it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the daemon was still running {CLOSED_WITHIN:?} after SIGTERM");
        }
    };
    eprintln!("daemon log:\n{log}");
    assert!(status.success(), "{status}");
    // The pending wait was answered (with the capture as it then was) or dropped.
    match wait_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(info)) => assert_eq!(info.id, id),
        Ok(Err(e)) => eprintln!("the pending wait was dropped: {e}"),
        Err(_) => panic!("the pending wait neither answered nor failed"),
    }
    // The capture ended as interrupted, and its state says so.
    let state = daemon.dir.path().join("state/captures").join(format!("{id}.json"));
    let saved: CaptureInfo = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(saved.state, CaptureState::Finished, "{saved:?}");
    assert_eq!(saved.summary.as_ref().map(|s| s.stop_reason.as_str()), Some("interrupted"), "{saved:?}");
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
