//! Filters from requests are bounded: a length cap before compiling, a time limit on the
//! compile (a child process, killed), and neither a long nor a slow filter disturbs the
//! captures already running or holds up a stopping daemon.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use tapstream::control::client::Client;
use tapstream_testenv::{Sender, VethPair};

use crate::daemon::{TestDaemon, data, error_of, reason, sendable};

/// `host A or host B or ...`: `n` hosts (about 20 bytes each). libpcap's optimizer takes
/// seconds on a few hundred (8 s for 400 on the test VM).
fn hosts(n: usize) -> String {
    (0..n)
        .map(|i| format!("host 10.{}.{}.{}", i / 250, i % 250, (i * 7) % 250 + 1))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// `portrange A-B or ...`: `n` ranges (about 23 bytes each); slower still per byte (10 s for 150
/// on the test VM, and steeply more beyond).
fn portranges(n: usize) -> String {
    (0..n).map(|i| format!("portrange {}-{}", 1000 + i * 10, 1003 + i * 10)).collect::<Vec<_>>().join(" or ")
}

/// POSTs a capture request with `filter`; returns the status, the error message (if any) and
/// how long the answer took.
fn post(socket: &std::path::Path, filter: &str) -> (u16, String, Duration) {
    let body = serde_json::json!({"interface": "tap", "duration_secs": 5, "filter": filter});
    let start = Instant::now();
    let (status, reply) =
        Client::new(socket).raw("POST", "/v1/captures", Some(body.to_string().as_bytes())).expect("request");
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let error = if status >= 400 { error_of(&reply) } else { reply };
    (status, error, start.elapsed())
}

#[test]
fn long_and_slow_filters_are_refused_by_name_and_the_running_capture_loses_nothing() {
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start_with_limits(&veth, "", "filter_compile_timeout_secs = 1");
    let frames = sendable(&veth);
    let socket = daemon.socket();
    let running = daemon.start_capture(&["-i", "tap", "--duration", "300s", "--id", "steady"]);

    let long = hosts(450);
    assert!(long.len() > 8192, "{} bytes", long.len());
    let slow = hosts(400);
    assert!(slow.len() <= 8192, "{} bytes", slow.len());

    // Steady traffic (about 4,000 frames a second) for as long as the requests take.
    let sender = Sender::new(&veth);
    let done = AtomicBool::new(false);
    let sent = std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            let mut sent = Vec::new();
            let start = Instant::now();
            for frame in frames.iter().cycle() {
                if done.load(Ordering::Relaxed) && start.elapsed() > Duration::from_secs(3) {
                    break;
                }
                sent.extend(sender.send_all([frame]));
                if sent.len() % 4 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            sent
        });
        std::thread::sleep(Duration::from_millis(500));

        // Over the length cap: refused before compiling, naming the cap.
        let (status, error, took) = post(&socket, &long);
        assert_eq!(status, 403, "{error}");
        assert!(
            error.contains(&format!("filter length (bytes) {}", long.len()))
                && error.contains("limits.max_filter_bytes = 8192"),
            "{error}"
        );
        assert!(took < Duration::from_secs(30), "answered after {took:?}");

        // Slow to compile: three at once (as the probe sent them), each refused naming the time
        // limit within seconds; none waits for another.
        let answers: Vec<(u16, String, Duration)> = (0..3)
            .map(|_| s.spawn(|| post(&socket, &slow)))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("request thread"))
            .collect();
        for (status, error, took) in answers {
            assert_eq!(status, 403, "{error}");
            assert!(
                error.contains("limits.filter_compile_timeout_secs = 1") && error.contains("abandoned"),
                "{error}"
            );
            assert!(
                took >= Duration::from_secs(1) && took < Duration::from_secs(30),
                "answered after {took:?}"
            );
        }

        // A bad filter still gets libpcap's own words, and a good one still runs.
        let (status, error, _) = post(&socket, "tcp port");
        assert!(status == 400 && error.contains("syntax error"), "{status}: {error}");
        let (status, reply, _) = post(&socket, "udp port 53");
        assert_eq!(status, 201, "{reply}");

        done.store(true, Ordering::Relaxed);
        traffic.join().expect("traffic thread")
    });
    assert!(sent.len() > 5_000, "only {} frames sent", sent.len());

    daemon.client().stop(&running).unwrap();
    let info = daemon.wait(&running);
    assert_eq!(reason(&info), "stopped", "{info:?}");
    let summary = info.summary.as_ref().unwrap();
    assert_eq!(
        (summary.dropped_writer, summary.dropped_kernel),
        (0, 0),
        "nothing dropped while filters were refused: {summary:?}"
    );
    let stored = daemon.stored(&running);
    assert_eq!(stored.len(), sent.len(), "every frame sent was stored");
    assert!(stored == data(&sent), "every frame sent, in order");
    // Only the running capture and the good filter's: no refused request left one behind.
    assert_eq!(daemon.client().list().unwrap().len(), 2);
}

#[test]
fn sigterm_during_a_slow_compile_exits_promptly_and_kills_the_compile() {
    let veth = VethPair::new(1);
    let mut daemon = TestDaemon::start_with_limits(&veth, "", "filter_compile_timeout_secs = 600");
    let running = daemon.running.take().expect("daemon");
    let socket = daemon.socket();
    let pid = running.pid();
    // Over a minute to compile on the test VM, well under the time limit.
    let slow = portranges(300);
    assert!(slow.len() <= 8192, "{} bytes", slow.len());

    std::thread::scope(|s| {
        let request = s.spawn(|| post(&socket, &slow));
        // The compile runs in a child of the daemon.
        let deadline = Instant::now() + Duration::from_secs(30);
        let compiler = loop {
            if let Some(child) = children(pid).into_iter().find(|&c| cmdline(c).contains("compile-child")) {
                break child;
            }
            assert!(Instant::now() < deadline, "no compiler process under the daemon ({pid})");
            std::thread::sleep(Duration::from_millis(50));
        };
        std::thread::sleep(Duration::from_secs(1));
        assert!(alive(compiler), "the compile is still running when SIGTERM comes");

        let start = Instant::now();
        let (status, log) = running.signal_and_wait(libc::SIGTERM);
        let took = start.elapsed();
        assert!(status.success(), "{status}: {log}");
        assert!(took < Duration::from_secs(30), "the daemon took {took:?} to stop:\n{log}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(compiler) {
            assert!(Instant::now() < deadline, "the compiler process {compiler} outlived the daemon");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The request got an answer (refused: the daemon is stopping), or its connection closed.
        if let Ok((status, error, _)) = request.join() {
            assert_ne!(status, 201, "{error}");
        }
    });
    // The refused request left no capture behind.
    daemon.restart(&veth);
    assert!(daemon.client().list().unwrap().is_empty());
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat(p).is_some_and(|(_, ppid)| ppid == pid))
        .collect()
}

/// A process's state letter and parent, from /proc/PID/stat.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the fields follow the last ')'.
    let mut fields = text[text.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// POSTs a capture request for ten minutes with `filter` and `id`; returns the status and the
/// reply (the error's message when refused).
fn post_long(socket: &std::path::Path, filter: &str, id: &str) -> (u16, String) {
    let body = serde_json::json!({"interface": "tap", "duration_secs": 600, "filter": filter, "id": id});
    let (status, reply) =
        Client::new(socket).raw("POST", "/v1/captures", Some(body.to_string().as_bytes())).expect("request");
    let reply = String::from_utf8_lossy(&reply).into_owned();
    (status, if status >= 400 { error_of(&reply) } else { reply })
}

#[test]
fn filters_the_verifier_takes_alone_but_not_together_are_refused_by_name_and_start_when_there_is_room() {
    const FILTER: &str = "ip6 protochain 17";
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start_with_limits(&veth, "", "max_concurrent_captures = 64");
    let socket = daemon.socket();

    // protochain's loop, unrolled, makes each copy thousands of instructions: start copies
    // until the interface's program is more than the verifier takes.
    let mut running: Vec<String> = Vec::new();
    let error = loop {
        assert!(running.len() < 63, "{} copies of {FILTER} all started", running.len());
        let id = format!("chain-{}", running.len());
        match post_long(&socket, FILTER, &id) {
            (201, _) => running.push(id),
            (status, error) => {
                assert_eq!(status, 503, "{error}");
                break error;
            }
        }
    };
    assert!(running.len() >= 8, "only {} copies of {FILTER} run together", running.len());
    assert!(
        error.contains("filter program of")
            && error.contains(&format!("beside the {} running with filters", running.len()))
            && error.contains("this filter alone is accepted")
            && error.contains("verifier"),
        "{error}"
    );
    // The refusal left the running captures as they were.
    let listed = daemon.client().list().unwrap();
    assert_eq!(listed.len(), running.len(), "{listed:?}");

    // With one stopped, the refused request starts.
    let first = running.remove(0);
    daemon.client().stop(&first).unwrap();
    daemon.wait(&first);
    let (status, reply) = post_long(&socket, FILTER, "chain-last");
    assert_eq!(status, 201, "{reply}");
    running.push("chain-last".into());

    // Every capture, the last one too, stores exactly the frames its filter wants.
    let filter = tapstream::filter::CbpfProgram::compile(FILTER).unwrap();
    let frames = sendable(&veth);
    let sent = Sender::new(&veth).send_all(&frames);
    let wanted: Vec<&tapstream_testenv::CorpusFrame> =
        sent.into_iter().filter(|f| filter.matches(&f.data, f.data.len() as u32)).collect();
    assert!(wanted.len() >= 100, "only {} frames sent match {FILTER}", wanted.len());
    for id in &running {
        daemon.client().stop(id).unwrap();
    }
    for id in &running {
        let info = daemon.wait(id);
        assert_eq!(reason(&info), "stopped", "{info:?}");
        assert!(daemon.stored(id) == data(&wanted), "{id} stored other frames than {FILTER} matches");
    }
}
