//! The fleet from the operator's side: `tapstream fleet nodes` and `tapstream fleet capture
//! --wait` run as processes against a real `redis-server` and two daemons in their
//! namespaces.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tapstream_testenv::{Redis, Sender, VethPair};

use crate::{
    common::{eventually, tapstream_bin},
    daemon::{TestDaemon, sendable},
};

/// The `[daemon]` additions of a fleet node: its labels and the broker.
fn fleet_config(redis: &Redis, labels: &str) -> String {
    format!("labels = {{ {labels} }}\n[fleet.redis]\nurl = \"{}\"\n", redis.url())
}

/// `tapstream fleet SUBCOMMAND --redis URL ARGS` (the test host has no /etc/tapstream; the
/// filter's words come last).
fn fleet(redis: &Redis, subcommand: &str, args: &[&str]) -> Command {
    let mut command = Command::new(tapstream_bin());
    command
        .args(["fleet", subcommand, "--redis", &redis.url()])
        .args(args)
        .env_remove("TAPSTREAM_REDIS")
        .env_remove("TAPSTREAM_NATS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// `fleet nodes --json`, by node name.
fn nodes(redis: &Redis) -> Vec<Value> {
    let out = fleet(redis, "nodes", &["--json"]).output().expect("run fleet nodes");
    assert!(out.status.success(), "fleet nodes: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("fleet nodes JSON")
}

fn names(nodes: &[Value]) -> Vec<&str> {
    nodes.iter().map(|n| n["node"].as_str().unwrap()).collect()
}

/// Waits until `node` reads requests (its consumer group exists).
fn wait_group(redis: &Redis, node: &str) {
    let mut con = redis::Client::open(redis.url()).and_then(|c| c.get_connection()).expect("connect");
    eventually(&format!("the consumer group of {node}"), || {
        let reply: redis::streams::StreamInfoGroupsReply =
            redis::cmd("XINFO").arg("GROUPS").arg("tapstream:requests").query(&mut con).ok()?;
        reply.groups.iter().any(|g| g.name == format!("tapstream-{node}")).then_some(())
    });
}

/// Runs `command` (a `fleet capture --wait`) while sending UDP frames into `veth` until it
/// exits.
pub(crate) fn capture_while_sending(mut command: Command, veth: &VethPair) -> Output {
    let mut child = command.spawn().expect("spawn");
    // UDP over IPv4 or IPv6, untagged: what the filter `udp` takes.
    let frames: Vec<_> = sendable(veth)
        .into_iter()
        .filter(|f| match f.data.get(12..14) {
            Some([0x08, 0x00]) => f.data.get(23) == Some(&17),
            Some([0x86, 0xdd]) => f.data.get(20) == Some(&17),
            _ => false,
        })
        .take(20)
        .collect();
    assert!(frames.len() >= 5, "the corpus has {} UDP frames", frames.len());
    let sender = Sender::new(veth);
    let deadline = Instant::now() + Duration::from_secs(45);
    // Its output is a few lines: the pipes do not fill while it runs.
    while child.try_wait().expect("poll fleet capture").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("fleet capture still running after 45 s: {:?}", child.wait_with_output());
        }
        sender.send_all(&frames);
        std::thread::sleep(Duration::from_millis(200));
    }
    child.wait_with_output().expect("fleet capture's output")
}

#[test]
fn the_operator_lists_the_nodes_and_runs_a_capture_on_those_a_label_targets() {
    let redis = Redis::start();
    let (veth_a, veth_b) = (VethPair::new(1), VethPair::new(1));
    let a = TestDaemon::start_as(&veth_a, "cli-fra1", &fleet_config(&redis, "site = \"fra1\""));
    let mut b = TestDaemon::start_as(&veth_b, "cli-ams1", &fleet_config(&redis, "site = \"ams1\""));
    wait_group(&redis, "cli-fra1");
    wait_group(&redis, "cli-ams1");

    // Both nodes, with their labels and interfaces.
    let listed = eventually("both nodes in `fleet nodes`", || {
        let listed = nodes(&redis);
        (names(&listed) == ["cli-ams1", "cli-fra1"]).then_some(listed)
    });
    for (node, site, veth) in [(&listed[0], "ams1", &veth_b), (&listed[1], "fra1", &veth_a)] {
        assert_eq!(node["labels"]["site"], site, "{node}");
        assert_eq!(node["version"], env!("CARGO_PKG_VERSION"), "{node}");
        let interfaces = node["interfaces"].as_array().unwrap();
        assert_eq!(interfaces.len(), 1, "{node}");
        assert_eq!(
            (&interfaces[0]["alias"], &interfaces[0]["device"], &interfaces[0]["state"]),
            (&Value::from("tap"), &Value::from(veth.capture_if.as_str()), &Value::from("attached")),
            "{node}"
        );
    }

    // A capture on the fra1 node only, followed to its end.
    let out = capture_while_sending(
        fleet(
            &redis,
            "capture",
            &[
                "--wait",
                "--json",
                "--label",
                "site=fra1",
                "--packets",
                "5",
                "--duration",
                "20s",
                "--deadline",
                "20s",
                "udp",
            ],
        ),
        &veth_a,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fleet capture failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    let nodes_answered = report["nodes"].as_object().unwrap();
    assert_eq!(nodes_answered.keys().collect::<Vec<_>>(), ["cli-fra1"], "{report}");
    let answer = &report["nodes"]["cli-fra1"];
    assert_eq!(
        (&answer["state"], &answer["packets"]),
        (&Value::from("finished"), &Value::from(5)),
        "{report}"
    );
    assert_eq!(answer["stop_reason"], "packets", "{report}");
    let outputs = answer["outputs"].as_array().unwrap();
    assert!(!outputs.is_empty(), "{report}");
    for output in outputs {
        let path = output.as_str().unwrap().trim_start_matches("file://");
        assert!(Path::new(path).is_file(), "{path} is not on disk: {report}");
    }
    assert_eq!(report["no_answer"], Value::Array(vec![]), "{report}");
    let id = report["request_id"].as_str().unwrap();
    assert!(b.client().status(id).is_err(), "no capture {id} on cli-ams1");

    // A bad filter: refused by the node, named with the reason, and a non-zero exit.
    let out = fleet(&redis, "capture", &["--node", "cli-fra1", "--packets", "5", "--wait", "tcp and and"])
        .output()
        .expect("run fleet capture");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a refused request exits non-zero: {stderr}");
    assert!(stderr.contains("cli-fra1 refused (bad_filter)") && stderr.contains("syntax error"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("refused (bad_filter)"));

    // An orderly stop withdraws the node at once.
    let (status, _) = b.running.take().unwrap().signal_and_wait(libc::SIGTERM);
    assert!(status.success());
    let listed = nodes(&redis);
    assert_eq!(names(&listed), ["cli-fra1"], "{listed:?}");
    drop(a);
}

/// What a terminal shows after `output`: the lines drawn, with the cursor moves, line
/// clearing and clearing to the end that the live table uses applied.
fn screen(output: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(output);
    let mut lines: Vec<Vec<char>> = vec![Vec::new()];
    let (mut row, mut col) = (0usize, 0usize);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => col = 0,
            '\n' => {
                row += 1;
                col = 0;
                if lines.len() <= row {
                    lines.push(Vec::new());
                }
            }
            '\x1b' if chars.peek() == Some(&'[') => {
                chars.next();
                let mut n = String::new();
                while let Some(d) = chars.next_if(char::is_ascii_digit) {
                    n.push(d);
                }
                match chars.next() {
                    Some('A') => row = row.saturating_sub(n.parse().unwrap_or(1)),
                    Some('K') => lines[row].clear(),
                    Some('J') => {
                        lines[row].truncate(col);
                        lines.truncate(row + 1);
                    }
                    other => panic!("an escape the table does not use: {n:?} {other:?}"),
                }
            }
            c => {
                let line = &mut lines[row];
                if line.len() <= col {
                    line.resize(col, ' ');
                    line.push(c);
                } else {
                    line[col] = c;
                }
                col += 1;
            }
        }
    }
    lines
        .into_iter()
        .map(|l| l.into_iter().collect::<String>().trim_end().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn on_a_terminal_fleet_capture_draws_a_live_table_and_leaves_the_final_one() {
    let redis = Redis::start();
    let veth = VethPair::new(1);
    let _daemon = TestDaemon::start_as(&veth, "tty-fra1", &fleet_config(&redis, "site = \"fra1\""));
    wait_group(&redis, "tty-fra1");
    // `script` runs it on a pseudo-terminal: stdout and stderr are a terminal, as an
    // operator's are.
    let line = format!(
        "{} fleet capture --redis {} --node tty-fra1 --packets 5 --duration 20s --deadline 20s --wait udp",
        tapstream_bin(),
        redis.url()
    );
    let mut command = Command::new("script");
    command
        .args(["--quiet", "--return", "--flush", "--command", &line, "/dev/null"])
        .env_remove("TAPSTREAM_REDIS")
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = capture_while_sending(command, &veth);
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "fleet capture on a terminal failed: {raw}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It drew the table live (moving up over its last drawing), not line after line.
    assert!(raw.contains("\x1b[2Knode"), "no live table: {raw:?}");
    assert!(raw.contains("\x1b[2A"), "it never drew over its table: {raw:?}");
    let shown = screen(&out.stdout);
    let [intro, header, row, stored] = &shown[..] else { panic!("the terminal shows {shown:#?}") };
    assert!(
        intro.starts_with("request fleet-") && intro.ends_with("live nodes it targets: tty-fra1"),
        "{intro}"
    );
    assert_eq!(header, "node                 answer");
    assert!(
        row.starts_with("tty-fra1             finished (packets): 5 packets, ")
            && row.ends_with(" bytes, 0 dropped, 1 outputs"),
        "{row}"
    );
    let path = stored.strip_prefix("  tty-fra1 stored: file://").unwrap_or_else(|| panic!("{stored}"));
    assert!(Path::new(path).is_file(), "{path}");
}

/// Runs `redis-cli` on the server's socket as `user` (the harness's `default` when `None`).
fn redis_cli(redis: &Redis, user: Option<(&str, &str)>, args: &[&str]) -> String {
    let mut command = Command::new("redis-cli");
    command.arg("-s").arg(redis.socket());
    if let Some((name, password)) = user {
        command.args(["--user", name, "--pass", password, "--no-auth-warning"]);
    }
    let out = command.args(args).output().expect("run redis-cli");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn the_shipped_redis_users_let_nodes_and_operators_do_their_part_and_no_more() {
    let shipped = std::fs::read_to_string(
        tapstream_testenv::workspace_root().join("deploy/fleet/redis-tapstream.conf"),
    )
    .expect("deploy/fleet/redis-tapstream.conf");
    // The shipped users, and a default user for the harness's own checks.
    let redis = Redis::start_with_config(&format!("{shipped}\nuser default on nopass ~* &* +@all\n"));
    for (user, password) in [("tapstream-node", "node-pw"), ("tapstream-operator", "op-pw")] {
        let set = redis_cli(&redis, None, &["ACL", "SETUSER", user, "on", &format!(">{password}")]);
        assert_eq!(set.trim(), "OK", "{set}");
    }
    let veth = VethPair::new(1);
    let node = [
        ("TAPSTREAM_REDIS_USERNAME", "tapstream-node".to_owned()),
        ("TAPSTREAM_REDIS_PASSWORD", "node-pw".to_owned()),
    ];
    let extra = format!("{}pcapdaemon_channel = \"capture\"\n", fleet_config(&redis, ""));
    let _daemon = TestDaemon::start_aliased(
        &veth,
        "acl-1",
        "tap",
        &extra,
        "",
        crate::daemon::local_store,
        node.to_vec(),
    );
    wait_group(&redis, "acl-1");
    // Subscribed to pcapdaemon's channel too.
    eventually("acl-1 on channel capture", || {
        redis_cli(&redis, None, &["PUBSUB", "NUMSUB", "capture"])
            .lines()
            .nth(1)
            .filter(|n| *n == "1")
            .map(|_| ())
    });

    // The operator's part: list the nodes, run a capture and follow it to its end.
    let operator = |mut command: Command| {
        command
            .env("TAPSTREAM_REDIS_USERNAME", "tapstream-operator")
            .env("TAPSTREAM_REDIS_PASSWORD", "op-pw");
        command
    };
    eventually("acl-1 in fleet nodes", || {
        let out = operator(fleet(&redis, "nodes", &["--json"])).output().expect("run fleet nodes");
        let nodes: Vec<Value> = serde_json::from_slice(&out.stdout).ok()?;
        (names(&nodes) == ["acl-1"]).then_some(())
    });
    let out = capture_while_sending(
        operator(fleet(
            &redis,
            "capture",
            &["--node", "acl-1", "--packets", "5", "--deadline", "20s", "--wait", "--json", "udp"],
        )),
        &veth,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(report["nodes"]["acl-1"]["state"], "finished", "{report}");
    assert_eq!(report["nodes"]["acl-1"]["packets"], 5, "{report}");

    // And no more: a node cannot publish a request, an operator cannot forge an event or read
    // the requests through a group, and neither can touch anything else.
    let (as_node, as_operator) = (Some(("tapstream-node", "node-pw")), Some(("tapstream-operator", "op-pw")));
    for (user, args) in [
        (as_node, &["XADD", "tapstream:requests", "*", "request", "{}"][..]),
        (as_node, &["GET", "other"]),
        (as_operator, &["XADD", "tapstream:events", "*", "json", "{}"]),
        (as_operator, &["XREADGROUP", "GROUP", "tapstream-acl-1", "x", "STREAMS", "tapstream:requests", ">"]),
        (as_operator, &["SET", "tapstream:nodes:fake", "{}"]),
        (as_operator, &["PUBLISH", "capture", "{}"]),
    ] {
        let reply = redis_cli(&redis, user, args);
        assert!(reply.contains("NOPERM"), "{:?} {args:?}: {reply}", user.unwrap().0);
    }
}
