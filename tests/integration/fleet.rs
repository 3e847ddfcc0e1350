//! Captures asked through Redis Streams: daemons in their own namespaces, one real
//! `redis-server` they reach over its Unix socket, traffic on each daemon's veth, and what an
//! operator reads back: the events stream and the stored frames.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::streams::{StreamInfoGroupsReply, StreamRangeReply};
use serde_json::{Value, json};
use tapstream_testenv::{Garage, Redis, Sender, VethPair};

use crate::{
    common::eventually,
    daemon::{TestDaemon, data, reason, sendable},
    upload::{read, records},
};

const REQUESTS: &str = "tapstream:requests";
const EVENTS: &str = "tapstream:events";

/// The `[daemon]` additions of a fleet node: its labels and the broker.
pub(crate) fn fleet_config(redis: &Redis, labels: &str) -> String {
    format!("labels = {{ {labels} }}\n[fleet.redis]\nurl = \"{}\"\n", redis.url())
}

pub(crate) fn connect(redis: &Redis) -> redis::Connection {
    redis::Client::open(redis.url()).and_then(|c| c.get_connection()).expect("connect to redis")
}

/// Unix seconds `secs` from now.
fn in_secs(secs: u64) -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + secs
}

/// Adds a request (its JSON text) to the requests stream; returns the entry's id.
pub(crate) fn publish(con: &mut redis::Connection, body: &str) -> String {
    redis::cmd("XADD").arg(REQUESTS).arg("*").arg("request").arg(body).query(con).expect("XADD")
}

/// A request for `packets` frames on `target`, valid for a minute.
pub(crate) fn request(id: &str, target: Value, packets: u64) -> String {
    json!({
        "id": id,
        "not_after": in_secs(60),
        "target": target,
        "capture": {"packets": packets, "duration_secs": 60, "alert_id": "alert-7", "customer": "acme",
                    "tags": {"case": "c1"}}
    })
    .to_string()
}

/// Every event in the stream, as JSON, checking the entry's fields against the JSON.
fn events(con: &mut redis::Connection) -> Vec<Value> {
    let reply: StreamRangeReply =
        redis::cmd("XRANGE").arg(EVENTS).arg("-").arg("+").query(con).expect("XRANGE");
    reply
        .ids
        .iter()
        .map(|entry| {
            let field =
                |name: &str| -> String { entry.get(name).unwrap_or_else(|| panic!("no {name}: {entry:?}")) };
            let event: Value = serde_json::from_str(&field("json")).expect("event JSON");
            assert_eq!(event["event"], field("event"));
            assert_eq!(event["node"], field("node"));
            event
        })
        .collect()
}

/// The events of request `id`, as (node, kind, event).
pub(crate) fn events_of(con: &mut redis::Connection, id: &str) -> Vec<(String, String, Value)> {
    events(con)
        .into_iter()
        .filter(|e| e["request_id"] == id)
        .map(|e| (e["node"].as_str().unwrap().to_owned(), e["event"].as_str().unwrap().to_owned(), e))
        .collect()
}

/// Waits for the event `kind` of request `id` from each of `nodes`; returns them by node.
pub(crate) fn wait_events(con: &mut redis::Connection, id: &str, kind: &str, nodes: &[&str]) -> Vec<Value> {
    eventually(&format!("{kind} of {id} from {nodes:?}"), || {
        let all = events_of(con, id);
        nodes
            .iter()
            .map(|node| all.iter().find(|(n, k, _)| n == node && k == kind).map(|(_, _, e)| e.clone()))
            .collect()
    })
}

/// The consumer group of `node`, if it exists.
fn group(con: &mut redis::Connection, node: &str) -> Option<redis::streams::StreamInfoGroup> {
    let reply: StreamInfoGroupsReply = redis::cmd("XINFO").arg("GROUPS").arg(REQUESTS).query(con).ok()?;
    reply.groups.into_iter().find(|g| g.name == format!("tapstream-{node}"))
}

/// Waits until `node` has read and acknowledged everything up to entry `id`.
fn wait_decided(con: &mut redis::Connection, node: &str, id: &str) {
    eventually(&format!("{node} to decide entry {id}"), || {
        group(con, node).filter(|g| g.last_delivered_id == id && g.pending == 0)
    });
}

pub(crate) fn wait_group(con: &mut redis::Connection, node: &str) {
    eventually(&format!("the consumer group of {node}"), || group(con, node));
}

/// Sends `range` of the sendable corpus frames into `veth`; returns their bytes.
pub(crate) fn send(veth: &VethPair, range: std::ops::Range<usize>) -> Vec<Vec<u8>> {
    let frames = sendable(veth);
    let sent = Sender::new(veth).send_all(&frames[range]);
    data(&sent)
}

/// Checks a `finished` event: 20 frames, ended by the packet limit, with outputs; and that the
/// node stored exactly the first 20 frames sent to it.
pub(crate) fn check_finished(event: &Value, daemon: &TestDaemon, id: &str, sent: &[Vec<u8>]) {
    assert_eq!(event["stop_reason"], "packets", "{event}");
    assert_eq!(event["packets"], 20, "{event}");
    assert_eq!(event["capture_id"], id, "{event}");
    assert_eq!(
        (&event["alert_id"], &event["customer"], &event["tags"]["case"]),
        (&json!("alert-7"), &json!("acme"), &json!("c1"))
    );
    let outputs = event["outputs"].as_array().unwrap_or_else(|| panic!("no outputs: {event}"));
    assert!(!outputs.is_empty(), "{event}");
    assert!(
        outputs.iter().all(|o| o.as_str().unwrap().contains(&format!("/{}/{id}/", daemon.node))),
        "{event}"
    );
    assert!(daemon.stored(id) == sent[..20], "{} stored the first 20 frames sent to it", daemon.node);
    // The catalog's manifest names the request.
    let out = std::process::Command::new(crate::common::tapstream_bin())
        .arg("ls")
        .arg(daemon.store_dir())
        .args(["--json", "--capture", id])
        .output()
        .unwrap();
    assert!(out.status.success(), "ls: {}", String::from_utf8_lossy(&out.stderr));
    let listed: Vec<tapstream::store::catalog::Manifest> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].request_id.as_deref(), Some(id), "the request's id in the manifest");
}

#[test]
fn a_request_runs_on_exactly_the_nodes_it_targets_and_they_report_what_they_stored() {
    let redis = Redis::start();
    let mut con = connect(&redis);
    let nodes = [
        ("fra1-a", "site = \"fra1\", role = \"edge\""),
        ("fra1-b", "site = \"fra1\", role = \"core\""),
        ("ams1-a", "site = \"ams1\", role = \"edge\""),
    ];
    let veths: Vec<VethPair> = nodes.iter().map(|_| VethPair::new(1)).collect();
    let daemons: Vec<TestDaemon> = nodes
        .iter()
        .zip(&veths)
        .map(|((node, labels), veth)| TestDaemon::start_as(veth, node, &fleet_config(&redis, labels)))
        .collect();
    for (node, _) in nodes {
        wait_group(&mut con, node);
    }
    // By name, then by labels: two of the three nodes each time.
    for (id, target, chosen, left) in [
        ("by-regex", json!({"node_regex": "fra1-.*"}), [0, 1], 2),
        ("by-labels", json!({"node": "any", "labels": {"role": "edge"}}), [0, 2], 1),
    ] {
        let entry = publish(&mut con, &request(id, target, 20));
        let names: Vec<&str> = chosen.iter().map(|&i| nodes[i].0).collect();
        wait_events(&mut con, id, "started", &names);
        let sent: Vec<Vec<Vec<u8>>> = (0..3).map(|i| send(&veths[i], 100 * i..100 * i + 60)).collect();
        let finished = wait_events(&mut con, id, "finished", &names);
        for (event, &i) in finished.iter().zip(&chosen) {
            check_finished(event, &daemons[i], id, &sent[i]);
        }
        // The third read the request, acknowledged it, and said nothing.
        wait_decided(&mut con, nodes[left].0, &entry);
        let all = events_of(&mut con, id);
        assert!(
            all.iter().all(|(n, _, _)| n != nodes[left].0),
            "{} reported on {id}: {all:?}",
            nodes[left].0
        );
        let kinds: Vec<(&str, &str)> = all.iter().map(|(n, k, _)| (n.as_str(), k.as_str())).collect();
        for name in &names {
            let mine: Vec<&str> = kinds.iter().filter(|(n, _)| n == name).map(|(_, k)| *k).collect();
            assert_eq!(mine, ["accepted", "started", "finished"], "{name} on {id}");
        }
        assert!(daemons[left].client().status(id).is_err(), "no capture {id} on {}", nodes[left].0);
        assert!(daemons[left].stored(id).is_empty());
    }
}

#[test]
fn duplicates_start_one_capture_and_bad_requests_are_refused_with_a_reason() {
    let redis = Redis::start();
    let mut con = connect(&redis);
    let veth = VethPair::new(1);
    let daemon = TestDaemon::start_as(&veth, "solo", &fleet_config(&redis, ""));
    wait_group(&mut con, "solo");

    // The same request twice: one capture, one `accepted`.
    let body = request("dup-1", json!({"node": "solo"}), 20);
    publish(&mut con, &body);
    let second = publish(&mut con, &body);
    wait_decided(&mut con, "solo", &second);
    wait_events(&mut con, "dup-1", "started", &["solo"]);
    let sent = send(&veth, 0..60);
    let finished = wait_events(&mut con, "dup-1", "finished", &["solo"]);
    check_finished(&finished[0], &daemon, "dup-1", &sent);
    // And once more after it ended: still nothing new.
    let third = publish(&mut con, &body);
    wait_decided(&mut con, "solo", &third);
    let kinds: Vec<String> = events_of(&mut con, "dup-1").into_iter().map(|(_, k, _)| k).collect();
    assert_eq!(kinds, ["accepted", "started", "finished"]);
    assert_eq!(daemon.client().list().unwrap().len(), 1);

    // Refusals, each with its code and the daemon's reason.
    let refusals = [
        (
            "old-1",
            json!({"id": "old-1", "not_after": 1000, "capture": {"packets": 5}}).to_string(),
            "expired",
            "expired",
        ),
        (
            "typo-1",
            json!({"id": "typo-1", "not_after": in_secs(60), "capture": {"filtre": "tcp"}}).to_string(),
            "bad_request",
            "unknown field `filtre`",
        ),
        (
            "filter-1",
            json!({"id": "filter-1", "not_after": in_secs(60), "capture": {"filter": "tcp and and", "packets": 5}})
                .to_string(),
            "bad_filter",
            "syntax error",
        ),
        (
            "cap-1",
            json!({"id": "cap-1", "not_after": in_secs(60), "capture": {"packets": 1_000_000}}).to_string(),
            "over_cap",
            "limits.max_packets",
        ),
        (
            "id with spaces",
            json!({"id": "id with spaces", "not_after": in_secs(60), "capture": {"packets": 5}}).to_string(),
            "bad_request",
            "capture id",
        ),
    ];
    for (id, body, code, reason) in refusals {
        publish(&mut con, &body);
        let refused = wait_events(&mut con, id, "refused", &["solo"]);
        assert_eq!(refused[0]["code"], code, "{id}: {}", refused[0]);
        let text = refused[0]["reason"].as_str().unwrap();
        assert!(text.contains(reason), "{id}: {text}");
    }
    // Not JSON at all: refused, without a request id.
    let before = events(&mut con).len();
    let last = publish(&mut con, "{{{");
    wait_decided(&mut con, "solo", &last);
    let all = events(&mut con);
    assert_eq!(all.len(), before + 1, "{all:?}");
    let refused = all.last().unwrap();
    assert_eq!(
        (&refused["event"], &refused["code"]),
        (&json!("refused"), &json!("bad_request")),
        "{refused}"
    );
    assert!(refused["reason"].as_str().unwrap().starts_with("malformed request"), "{refused}");
    assert!(refused.get("request_id").is_none(), "{refused}");
    // Nothing of these started, and the daemon still serves.
    let ids: Vec<String> = daemon.client().list().unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(ids, ["dup-1"]);
}

#[test]
fn a_request_received_before_a_crash_runs_once_after_the_restart() {
    let redis = Redis::start();
    let mut con = connect(&redis);
    let veth = VethPair::new(1);
    let mut daemon = TestDaemon::start_as(&veth, "crash", &fleet_config(&redis, ""));
    wait_group(&mut con, "crash");
    let (status, _) = daemon.running.take().unwrap().signal_and_wait(libc::SIGKILL);
    assert!(!status.success());
    // What the dead daemon had read and not acknowledged: an entry delivered to its consumer.
    let body = request("crash-1", json!({}), 20);
    let entry = publish(&mut con, &body);
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("tapstream-crash")
        .arg("crash")
        .arg("STREAMS")
        .arg(REQUESTS)
        .arg(">")
        .query(&mut con)
        .unwrap();
    assert_eq!(group(&mut con, "crash").unwrap().pending, 1);

    daemon.restart(&veth);
    wait_events(&mut con, "crash-1", "started", &["crash"]);
    let sent = send(&veth, 0..60);
    let finished = wait_events(&mut con, "crash-1", "finished", &["crash"]);
    check_finished(&finished[0], &daemon, "crash-1", &sent);
    wait_decided(&mut con, "crash", &entry);

    // Killed again and restarted, with the request published once more: it does not run again.
    let (_, _) = daemon.running.take().unwrap().signal_and_wait(libc::SIGKILL);
    daemon.restart(&veth);
    let again = publish(&mut con, &body);
    wait_decided(&mut con, "crash", &again);
    let kinds: Vec<String> = events_of(&mut con, "crash-1").into_iter().map(|(_, k, _)| k).collect();
    assert_eq!(kinds, ["accepted", "started", "finished"]);
    assert_eq!(daemon.client().list().unwrap().len(), 1);
}

/// The fleet metric `name` (summed over its labels) of the daemon in `veth`'s namespace, whose
/// `metrics_listen` is `127.0.0.1:9464`.
pub(crate) fn metric(veth: &VethPair, name: &str) -> f64 {
    let out = veth
        .capture_ns
        .command("curl")
        .args(["-sf", "http://127.0.0.1:9464/metrics"])
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub(crate) const CONNECTED: &str = "tapstream_fleet_broker_connected";
pub(crate) const PUBLISHED: &str = "tapstream_fleet_events_published_total";
pub(crate) const FAILED: &str = "tapstream_fleet_events_failed_total";

/// A fleet node with its metrics served in its namespace.
fn metered_node(veth: &VethPair, redis: &Redis, node: &str) -> TestDaemon {
    let extra = format!("metrics_listen = \"127.0.0.1:9464\"\n{}", fleet_config(redis, ""));
    TestDaemon::start_as(veth, node, &extra)
}

/// The kinds of the events of request `id`, in order.
fn kinds_of(con: &mut redis::Connection, id: &str) -> Vec<String> {
    events_of(con, id).into_iter().map(|(_, k, _)| k).collect()
}

/// Kills the broker once the daemon has sent what it had, and waits until the daemon has
/// tried to send an event without it (the capture's end).
fn wait_failed_send(veth: &VethPair) {
    eventually("a failed send and the broker seen gone", || {
        (metric(veth, FAILED) > 0.0 && metric(veth, CONNECTED) == 0.0).then_some(())
    });
}

#[test]
fn a_capture_that_ends_during_a_broker_outage_is_reported_once_when_the_broker_is_back() {
    let mut redis = Redis::start_persistent();
    let mut con = connect(&redis);
    let veth = VethPair::new(1);
    let daemon = metered_node(&veth, &redis, "outage");
    wait_group(&mut con, "outage");
    publish(&mut con, &request("out-1", json!({}), 20));
    wait_events(&mut con, "out-1", "started", &["outage"]);
    eventually("the broker connected", || (metric(&veth, CONNECTED) == 1.0).then_some(()));
    // Accepted and started, their answers read (see the restart test).
    eventually("the daemon took the server's answers", || (metric(&veth, PUBLISHED) == 2.0).then_some(()));
    let published = metric(&veth, PUBLISHED);

    redis.kill();
    let sent = send(&veth, 0..60);
    // The capture ends while the broker is away, and the daemon serves its API throughout.
    let info = daemon.wait("out-1");
    assert_eq!(reason(&info), "packets", "{info:?}");
    assert_eq!(info.summary.as_ref().map(|s| s.packets), Some(20), "{info:?}");
    wait_failed_send(&veth);
    assert_eq!(daemon.client().list().unwrap().len(), 1);
    assert_eq!(metric(&veth, PUBLISHED), published);

    let back_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
    redis.restart();
    let mut con = connect(&redis);
    let finished = wait_events(&mut con, "out-1", "finished", &["outage"]);
    check_finished(&finished[0], &daemon, "out-1", &sent);
    // Sent after the return: the entry's id is its time.
    let last: StreamRangeReply =
        redis::cmd("XREVRANGE").arg(EVENTS).arg("+").arg("-").arg("COUNT").arg(1).query(&mut con).unwrap();
    let entry_ms: u128 = last.ids[0].id.split('-').next().unwrap().parse().unwrap();
    assert!(
        entry_ms >= back_ms,
        "the finished event was added at {entry_ms}, the broker was back at {back_ms}"
    );
    eventually("the broker connected again", || {
        (metric(&veth, CONNECTED) == 1.0 && metric(&veth, PUBLISHED) == published + 1.0).then_some(())
    });
    assert_eq!(kinds_of(&mut con, "out-1"), ["accepted", "started", "finished"]);
    assert_eq!(daemon.client().list().unwrap().len(), 1);
}

#[test]
fn events_not_sent_and_captures_cut_by_a_crash_are_reported_once_after_the_restart() {
    let mut redis = Redis::start_persistent();
    let mut con = connect(&redis);
    let veth = VethPair::new(1);
    let mut daemon = metered_node(&veth, &redis, "restart");
    wait_group(&mut con, "restart");
    // One capture ends during an outage, its end not sent; the other runs when the daemon dies.
    publish(&mut con, &request("rs-ends", json!({}), 20));
    let running = request("rs-cut", json!({}), 100_000);
    publish(&mut con, &running);
    wait_events(&mut con, "rs-ends", "started", &["restart"]);
    wait_events(&mut con, "rs-cut", "started", &["restart"]);
    // The events are in the stream, but the daemon may not have read the server's answer yet:
    // killed then, it would send again what the stream holds (at least once, as documented).
    eventually("the daemon took the server's answers", || (metric(&veth, PUBLISHED) == 4.0).then_some(()));

    redis.kill();
    let sent = send(&veth, 0..60);
    let info = daemon.wait("rs-ends");
    assert_eq!(reason(&info), "packets", "{info:?}");
    wait_failed_send(&veth);
    // The running one's frames are in an object (rotated after a second) when the daemon dies.
    eventually("rs-cut's first object", || (daemon.stored("rs-cut").len() == sent.len()).then_some(()));
    let (status, _) = daemon.running.take().unwrap().signal_and_wait(libc::SIGKILL);
    assert!(!status.success());
    redis.restart();
    let mut con = connect(&redis);
    daemon.restart(&veth);

    let finished = wait_events(&mut con, "rs-ends", "finished", &["restart"]);
    check_finished(&finished[0], &daemon, "rs-ends", &sent);
    let cut = wait_events(&mut con, "rs-cut", "finished", &["restart"]);
    assert_eq!(cut[0]["stop_reason"], "interrupted", "{}", cut[0]);
    assert_eq!(cut[0]["capture_id"], "rs-cut", "{}", cut[0]);
    let summary = daemon.client().status("rs-cut").unwrap().summary.unwrap();
    assert_eq!(summary.stop_reason.as_str(), "interrupted");
    // Reported once what it stored was recovered: the objects, in the event as in its summary,
    // hold the frames the recovery kept, the first ones sent.
    let recovery = summary.recovery.as_ref().unwrap();
    assert!(!recovery.pending && recovery.packets_kept > 0, "{summary:?}");
    let outputs: Vec<String> = serde_json::from_value(cut[0]["outputs"].clone()).unwrap();
    assert!(!outputs.is_empty() && outputs == summary.outputs, "{} against {summary:?}", cut[0]);
    assert!(daemon.stored("rs-cut") == sent, "every frame, in the objects its event lists");
    assert_eq!(recovery.packets_kept, sent.len() as u64);

    // Killed and restarted again, the request read once more: nothing is reported twice.
    let (_, _) = daemon.running.take().unwrap().signal_and_wait(libc::SIGKILL);
    daemon.restart(&veth);
    let again = publish(&mut con, &running);
    wait_decided(&mut con, "restart", &again);
    eventually("the broker connected", || (metric(&veth, CONNECTED) == 1.0).then_some(()));
    std::thread::sleep(Duration::from_secs(1));
    for id in ["rs-ends", "rs-cut"] {
        assert_eq!(kinds_of(&mut con, id), ["accepted", "started", "finished"], "{id}");
    }
    assert_eq!(daemon.client().list().unwrap().len(), 2);
}

/// An IPv4 UDP frame of `len` bytes to `dst` (a.b.c.d), numbered `seq` in its payload.
fn udp_frame(dst: [u8; 4], seq: u16, len: usize) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    let ip_len = (len - 14) as u16;
    f.extend_from_slice(&[0x45, 0, (ip_len >> 8) as u8, ip_len as u8, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&[10, 9, 9, 9]);
    f.extend_from_slice(&dst);
    let udp_len = ip_len - 20;
    f.extend_from_slice(&[0x30, 0x39, 0x30, 0x39, (udp_len >> 8) as u8, udp_len as u8, 0, 0]);
    f.extend_from_slice(&seq.to_be_bytes());
    f.resize(len, 0xab);
    f
}

#[test]
fn pcapdaemons_readme_example_published_verbatim_starts_the_capture_it_describes() {
    let redis = Redis::start();
    let mut con = connect(&redis);
    // The host the example names: "node name", with bond1 and bond2, aliased local and public,
    // and the bucket "mybucket".
    let mut east = VethPair::new(1);
    let mut west = VethPair::new(1);
    east.rename_capture_end("bond1");
    west.rename_capture_end("bond2");
    west.move_capture_end(&east.capture_ns);
    let garage = Garage::start_in(&east.capture_ns);
    garage.admin(&["bucket", "create", "mybucket"]);
    garage.admin(&[
        "bucket",
        "allow",
        "--read",
        "--write",
        "--owner",
        "mybucket",
        "--key",
        &garage.access_key,
    ]);
    let extra = format!(
        "[interfaces.public]\ndevice = \"bond2\"\ndrop_unmatched = false\n[fleet.redis]\nurl = \"{}\"\n\
         pcapdaemon_channel = \"capture\"\n",
        redis.url()
    );
    let (endpoint, region) = (garage.endpoint.clone(), garage.region.clone());
    let daemon = TestDaemon::start_aliased(
        &east,
        "node name",
        "local",
        &extra,
        "",
        move |d| {
            format!(
                "destinations = [\"s3://mybucket/myfolder\"]\ns3_endpoint = \"{endpoint}\"\n\
                 s3_region = \"{region}\"\ns3_path_style = true\ncompression = \"none\"\n\
                 spool_dir = \"{d}/spool\"\n"
            )
        },
        garage.aws_env(),
    );
    let subscribed = || {
        let counts: Vec<(String, u64)> =
            redis::cmd("PUBSUB").arg("NUMSUB").arg("capture").query(&mut connect(&redis)).unwrap();
        (counts[0].1 == 1).then_some(())
    };
    eventually("the daemon's subscription to channel capture", subscribed);

    // A message pcapdaemon would not know: refused, naming the field; nothing starts.
    let receivers: u64 = redis::cmd("PUBLISH")
        .arg("capture")
        .arg(r#"{"node": "any", "interface": ["bond1"], "hostname": "x"}"#)
        .query(&mut con)
        .unwrap();
    assert_eq!(receivers, 1);
    let refused =
        eventually("the refusal", || events(&mut con).into_iter().find(|e| e["event"] == "refused"));
    assert_eq!(refused["code"], "bad_request", "{refused}");
    assert!(refused["reason"].as_str().unwrap().contains("unknown field `hostname`"), "{refused}");

    let _: u64 = redis::cmd("PUBLISH")
        .arg("capture")
        .arg(tapstream::fleet::pcapdaemon::README_EXAMPLE)
        .query(&mut con)
        .unwrap();
    let started = eventually("the example's capture to start", || {
        events(&mut con).into_iter().find(|e| e["event"] == "started")
    });
    let id = started["request_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("pd-655443-"), "{started}");
    assert_eq!(started["interfaces"], json!(["local", "public"]), "one capture over both links: {started}");
    let accepted = events_of(&mut con, &id).into_iter().find(|(_, k, _)| k == "accepted").unwrap().2;
    assert_eq!(accepted["ignored"], json!(["endpoint", "region", "acl", "encryption"]), "{accepted}");
    assert_eq!(
        (&accepted["node"], &accepted["alert_id"], &accepted["customer"], &accepted["tags"]),
        (
            &json!("node name"),
            &json!("655443"),
            &json!("importantcustomer"),
            &json!({"tags": "blah,tagme,stuff"})
        )
    );

    // 100-byte frames: the byte limit of 1000 takes 10, over both links; `dst host 10.0.0.1`
    // leaves the others out.
    let frame = |dst: u8, seq: u16| udp_frame([10, 0, 0, dst], seq, 100);
    let (east_sender, west_sender) = (Sender::new(&east), Sender::new(&west));
    let mut wanted_east = Vec::new();
    for seq in 0..6 {
        east_sender.send_retrying(&frame(2, seq), || "frame".into());
        east_sender.send_retrying(&frame(1, seq), || "frame".into());
        wanted_east.push(frame(1, seq));
    }
    eventually("the 6 frames of bond1", || {
        (daemon.client().status(&id).unwrap().progress.packets >= 6).then_some(())
    });
    for seq in 100..106 {
        west_sender.send_retrying(&frame(1, seq), || "frame".into());
    }
    let finished = wait_events(&mut con, &id, "finished", &["node name"]).remove(0);
    assert_eq!(
        (&finished["stop_reason"], &finished["packets"], &finished["bytes"]),
        (&json!("bytes"), &json!(10), &json!(1000)),
        "{finished}"
    );
    let mut stored: Vec<Vec<u8>> = Vec::new();
    let outputs = finished["outputs"].as_array().unwrap();
    for (part, expected) in
        [("local", wanted_east.clone()), ("public", (100..104).map(|s| frame(1, s)).collect())]
    {
        let mine: Vec<&str> = outputs
            .iter()
            .map(|o| o.as_str().unwrap())
            .filter(|o| o.contains(&format!("/{id}/{part}/")))
            .collect();
        assert!(!mine.is_empty(), "no object of {part}: {finished}");
        let mut frames = Vec::new();
        for url in mine {
            assert!(url.starts_with("s3://mybucket/myfolder/node name/"), "{url}");
            let (pcap, stderr) = read(&east.capture_ns, &garage, url, &[]);
            assert!(!pcap.is_empty(), "{url}: {stderr}");
            frames.extend(records(&pcap).into_iter().map(|(_, data)| data));
        }
        assert!(frames == expected, "{part} holds the frames to 10.0.0.1 sent on it, up to the byte limit");
        stored.extend(frames);
    }
    assert_eq!(stored.len(), 10);
}

#[test]
fn a_node_and_an_operator_reach_the_broker_over_tls_and_a_wrong_authority_is_named() {
    let veth = VethPair::new(1);
    // The server takes TLS on 127.0.0.1 in the node's namespace; the test itself publishes
    // over the Unix socket.
    let redis = Redis::start_tls_in(&veth.capture_ns);
    let mut con = connect(&redis);
    let broker = |ca: &std::path::Path| {
        format!("[fleet.redis]\nurl = \"{}\"\ntls_ca_file = \"{}\"\n", redis.tls_url(), ca.display())
    };
    let daemon = TestDaemon::start_as(&veth, "tls-1", &broker(&redis.ca_file()));
    wait_group(&mut con, "tls-1");
    publish(&mut con, &request("tls-req", json!({"node": "tls-1"}), 20));
    wait_events(&mut con, "tls-req", "started", &["tls-1"]);
    let sent = send(&veth, 0..60);
    let finished = wait_events(&mut con, "tls-req", "finished", &["tls-1"]);
    check_finished(&finished[0], &daemon, "tls-req", &sent);

    // The operator's CLI on the host, over TLS: the node is listed.
    let cli = |config: &std::path::Path| {
        veth.capture_ns
            .command(crate::common::tapstream_bin())
            .args(["fleet", "nodes", "--json", "--config"])
            .arg(config)
            .env_remove("TAPSTREAM_REDIS")
            .output()
            .expect("run fleet nodes")
    };
    // The node's own configuration, as on a tap host; and the same trusting another authority.
    let right = daemon.dir.path().join("tapstream.toml");
    let wrong = daemon.dir.path().join("wrong-ca.toml");
    let text = std::fs::read_to_string(&right).unwrap();
    let ca = redis.ca_file().display().to_string();
    assert!(text.contains(&ca));
    std::fs::write(&wrong, text.replace(&ca, &redis.other_ca_file().display().to_string())).unwrap();
    let listed = eventually("tls-1 in fleet nodes", || {
        let out = cli(&right);
        let nodes: Vec<Value> = serde_json::from_slice(&out.stdout).ok()?;
        nodes.iter().any(|n| n["node"] == "tls-1").then_some(out)
    });
    assert!(listed.status.success());
    // Trusting an authority that did not sign the server's certificate: refused, saying why.
    let out = cli(&wrong);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("UnknownIssuer") || stderr.contains("unknown issuer"), "{stderr}");
}
