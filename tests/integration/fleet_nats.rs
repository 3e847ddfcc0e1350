//! Captures asked through NATS JetStream: daemons in their own namespaces, each linked by veth
//! to a hub namespace where one real `nats-server -js` runs, traffic on each daemon's capture
//! veth, and what an operator reads back: the events stream and the stored frames.

use std::{
    future::Future,
    path::Path,
    process::{Command, Stdio},
    time::SystemTime,
};

use async_nats::jetstream::{self, consumer, message::PublishMessage, publish::PublishAck};
use serde_json::{Value, json};
use tapstream_testenv::{Nats, Redis, VethPair};

use crate::{
    common::{eventually, read_capture, tapstream_bin},
    daemon::{TestDaemon, reason},
    fleet::{self as redis_fleet, CONNECTED, FAILED, PUBLISHED, check_finished, metric, request, send},
    fleet_cli::capture_while_sending,
};

const REQUESTS: &str = "TAPSTREAM_REQUESTS";
const EVENTS: &str = "TAPSTREAM_EVENTS";

/// The test's client of the server, from inside the hub namespace: a runtime whose threads
/// were made there (so are its sockets), and one connection.
struct Hub {
    rt: tokio::runtime::Runtime,
    js: jetstream::Context,
}

/// An event as read back: the message's subject, its `Nats-Msg-Id`, when the server stored it
/// (ns since the epoch), and its JSON.
struct Stored {
    subject: String,
    msg_id: String,
    stored_ns: i128,
    event: Value,
}

impl Hub {
    fn connect(nats: &Nats) -> Self {
        let rt = nats.hub().enter(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime")
        });
        let url = nats.local_url();
        let mut options = async_nats::ConnectOptions::new().retry_on_initial_connect();
        if let Some((user, password)) = nats.credentials() {
            options = options.user_and_password(user.into(), password.into());
        }
        if nats.tls() {
            options = options.require_tls(true).add_root_certificates(nats.ca_file());
        }
        let js = rt
            .block_on(rt.spawn(async move {
                let client = options.connect(url).await;
                jetstream::new(client.expect("connect to nats"))
            }))
            .expect("hub task");
        Self { rt, js }
    }

    /// Runs `f` on the hub's runtime (its threads, its namespace).
    fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        self.rt.block_on(self.rt.spawn(f)).expect("hub task")
    }

    /// Publishes `body` on `tapstream.requests.<to>` with `Nats-Msg-Id` `msg_id`; returns the
    /// server's acknowledgement.
    fn publish(&self, to: &str, msg_id: &str, body: &str) -> PublishAck {
        let (js, subject, msg_id, body) =
            (self.js.clone(), format!("tapstream.requests.{to}"), msg_id.to_owned(), body.to_owned());
        self.run(async move {
            let publish = PublishMessage::build().payload(body.into()).message_id(msg_id);
            js.send_publish(subject, publish).await.expect("publish").await.expect("publish ack")
        })
    }

    /// Every event in the events stream, in order.
    fn events(&self) -> Vec<Stored> {
        let js = self.js.clone();
        self.run(async move {
            let Ok(stream) = js.get_stream(EVENTS).await else { return Vec::new() };
            let info = stream.get_info().await.expect("events stream info");
            let mut out = Vec::new();
            for seq in info.state.first_sequence.max(1)..=info.state.last_sequence {
                let Ok(message) = stream.get_raw_message(seq).await else { continue };
                let event: Value = serde_json::from_slice(&message.payload).expect("event JSON");
                assert_eq!(
                    message.subject.as_str(),
                    format!("tapstream.events.{}", event["node"].as_str().unwrap())
                );
                out.push(Stored {
                    subject: message.subject.to_string(),
                    msg_id: message.headers.get("Nats-Msg-Id").map(|v| v.to_string()).unwrap_or_default(),
                    stored_ns: message.time.unix_timestamp_nanos(),
                    event,
                });
            }
            out
        })
    }

    /// The events of request `id`, in order.
    fn events_of(&self, id: &str) -> Vec<Stored> {
        self.events().into_iter().filter(|e| e.event["request_id"] == id).collect()
    }

    /// `(node, kind)` of the events of request `id`, in order.
    fn kinds_of(&self, id: &str) -> Vec<(String, String)> {
        self.events_of(id)
            .iter()
            .map(|e| {
                (e.event["node"].as_str().unwrap().to_owned(), e.event["event"].as_str().unwrap().to_owned())
            })
            .collect()
    }

    /// Waits for the event `kind` of request `id` from each of `nodes`; returns them by node.
    fn wait_events(&self, id: &str, kind: &str, nodes: &[&str]) -> Vec<Stored> {
        eventually(&format!("{kind} of {id} from {nodes:?}"), || {
            let mut all = self.events_of(id);
            nodes
                .iter()
                .map(|node| {
                    let at = all.iter().position(|e| e.event["node"] == *node && e.event["event"] == kind)?;
                    Some(all.remove(at))
                })
                .collect()
        })
    }

    /// The durable consumer of `node`, if it exists.
    fn consumer(&self, node: &str) -> Option<consumer::Info> {
        let (js, name) = (self.js.clone(), format!("tapstream-{node}"));
        self.run(async move {
            let stream = js.get_stream(REQUESTS).await.ok()?;
            stream.consumer_info(name).await.ok()
        })
    }

    fn wait_consumer(&self, node: &str) {
        eventually(&format!("the consumer of {node}"), || self.consumer(node));
    }

    /// Waits until `node` has acknowledged everything up to the stream's message `seq`.
    fn wait_decided(&self, node: &str, seq: u64) {
        eventually(&format!("{node} to decide message {seq}"), || {
            self.consumer(node).filter(|c| c.ack_floor.stream_sequence >= seq && c.num_ack_pending == 0)
        });
    }

    /// The subject of the last request published.
    fn last_request_subject(&self) -> String {
        let js = self.js.clone();
        self.run(async move {
            let stream = js.get_stream(REQUESTS).await.expect("requests stream");
            let last = stream.get_info().await.expect("requests stream info").state.last_sequence;
            stream.get_raw_message(last).await.expect("the last request").subject.to_string()
        })
    }

    /// The presence `node` announces in the nodes bucket, if any.
    fn presence(&self, node: &str) -> Option<Value> {
        let (js, node) = (self.js.clone(), node.to_owned());
        self.run(async move {
            let store = js.get_key_value("tapstream_nodes").await.ok()?;
            let bytes = store.get(node).await.expect("get from the nodes bucket")?;
            Some(serde_json::from_slice(&bytes).expect("presence JSON"))
        })
    }

    /// Pulls one message through `node`'s consumer, as that node would, without acknowledging it.
    fn pull_without_ack(&self, node: &str) -> u64 {
        let (js, name) = (self.js.clone(), format!("tapstream-{node}"));
        self.run(async move {
            use futures_util::StreamExt as _;
            let stream = js.get_stream(REQUESTS).await.expect("requests stream");
            let consumer: consumer::PullConsumer = stream.get_consumer(&name).await.expect("consumer");
            let mut batch = consumer
                .batch()
                .max_messages(1)
                .expires(std::time::Duration::from_secs(5))
                .messages()
                .await
                .expect("pull");
            let message = batch.next().await.expect("a message").expect("a message");
            message.info().expect("message info").stream_sequence
        })
    }
}

/// The `[daemon]` additions of a node: its labels and the broker at `url`, with a short ack wait.
fn nats_config(url: &str, labels: &str) -> String {
    format!("labels = {{ {labels} }}\n[fleet.nats]\nurl = \"{url}\"\nack_wait_secs = 2\n")
}

/// A node in `veth`'s capture namespace, linked to the hub.
fn node(nats: &Nats, veth: &VethPair, name: &str, labels: &str, metered: bool) -> TestDaemon {
    let url = nats.link(&veth.capture_ns);
    let metrics = if metered { "metrics_listen = \"127.0.0.1:9464\"\n" } else { "" };
    TestDaemon::start_as(veth, name, &format!("{metrics}{}", nats_config(&url, labels)))
}

/// Reads back every object a `finished` event names and checks they hold exactly `frames`.
fn check_outputs(event: &Value, frames: &[Vec<u8>]) {
    let read: Vec<Vec<u8>> = event["outputs"]
        .as_array()
        .unwrap_or_else(|| panic!("no outputs: {event}"))
        .iter()
        .flat_map(|o| read_capture(Path::new(o.as_str().unwrap().trim_start_matches("file://"))))
        .map(|(_, data)| data)
        .collect();
    assert!(
        read == frames,
        "the objects of {event} hold {} frames, not the {} expected",
        read.len(),
        frames.len()
    );
}

#[test]
fn a_nats_request_runs_on_exactly_the_nodes_it_targets_and_they_report_what_they_stored() {
    let nats = Nats::start();
    let hub = Hub::connect(&nats);
    let nodes = [("fra1-a", "site = \"fra1\""), ("fra1-b", "site = \"fra1\""), ("ams1-a", "site = \"ams1\"")];
    let veths: Vec<VethPair> = nodes.iter().map(|_| VethPair::new(1)).collect();
    let daemons: Vec<TestDaemon> = nodes
        .iter()
        .zip(&veths)
        .map(|((name, labels), veth)| node(&nats, veth, name, labels, false))
        .collect();
    for (name, _) in nodes {
        hub.wait_consumer(name);
    }
    // Each announces itself, with its labels and interface.
    for ((name, labels), veth) in nodes.iter().zip(&veths) {
        let presence = eventually(&format!("the presence of {name}"), || hub.presence(name));
        assert_eq!(presence["node"], *name, "{presence}");
        assert_eq!(presence["labels"]["site"], labels.split('"').nth(1).unwrap(), "{presence}");
        assert_eq!(presence["interfaces"][0]["device"], veth.capture_if.as_str(), "{presence}");
        assert_eq!(presence["interfaces"][0]["state"], "attached", "{presence}");
    }
    // By regex, to every node; then on one node's own subject, whatever the body's target.
    for (id, to, target, chosen, silent) in [
        ("nats-regex", "all", json!({"node_regex": "fra1-.*"}), vec![0, 1], vec![2]),
        ("nats-subject", "fra1-b", json!({}), vec![1], vec![0, 2]),
    ] {
        let ack = hub.publish(to, id, &request(id, target, 20));
        assert!(!ack.duplicate);
        let names: Vec<&str> = chosen.iter().map(|&i| nodes[i].0).collect();
        hub.wait_events(id, "started", &names);
        let sent: Vec<Vec<Vec<u8>>> = (0..3).map(|i| send(&veths[i], 100 * i..100 * i + 60)).collect();
        let finished = hub.wait_events(id, "finished", &names);
        for (stored, &i) in finished.iter().zip(&chosen) {
            check_finished(&stored.event, &daemons[i], id, &sent[i]);
            check_outputs(&stored.event, &sent[i][..20]);
            assert_eq!(stored.subject, format!("tapstream.events.{}", nodes[i].0));
            assert_eq!(stored.msg_id, format!("{}.{id}.finished", nodes[i].0));
        }
        // The others read the request, acknowledged it, and said nothing.
        for &i in &silent {
            hub.wait_decided(nodes[i].0, ack.sequence);
            assert!(daemons[i].client().status(id).is_err(), "no capture {id} on {}", nodes[i].0);
            assert!(daemons[i].stored(id).is_empty());
        }
        let kinds = hub.kinds_of(id);
        for name in nodes.iter().map(|n| n.0) {
            let mine: Vec<&str> = kinds.iter().filter(|(n, _)| n == name).map(|(_, k)| k.as_str()).collect();
            let expected: &[&str] =
                if names.contains(&name) { &["accepted", "started", "finished"] } else { &[] };
            assert_eq!(mine, expected, "{name} on {id}");
        }
    }
    // An orderly stop withdraws the node's presence at once; the others stay.
    let mut daemons = daemons;
    let (status, _) = daemons[2].running.take().unwrap().signal_and_wait(libc::SIGTERM);
    assert!(status.success());
    assert_eq!(hub.presence("ams1-a"), None);
    assert!(hub.presence("fra1-a").is_some() && hub.presence("fra1-b").is_some());
}

#[test]
fn a_nats_duplicate_runs_once_and_an_expired_request_is_refused() {
    let nats = Nats::start();
    let hub = Hub::connect(&nats);
    let veth = VethPair::new(1);
    let daemon = node(&nats, &veth, "solo", "", false);
    hub.wait_consumer("solo");

    // The same request twice with one Nats-Msg-Id: the server keeps one.
    let body = request("ndup-1", json!({"node": "solo"}), 20);
    let first = hub.publish("solo", "ndup-1", &body);
    let second = hub.publish("solo", "ndup-1", &body);
    assert!(!first.duplicate && second.duplicate, "{first:?} {second:?}");
    assert_eq!(second.sequence, first.sequence);
    hub.wait_events("ndup-1", "started", &["solo"]);
    let sent = send(&veth, 0..60);
    let finished = hub.wait_events("ndup-1", "finished", &["solo"]);
    check_finished(&finished[0].event, &daemon, "ndup-1", &sent);
    // Published again under another message id, past the server's de-duplication: the node
    // knows the capture, and says nothing new.
    let third = hub.publish("all", "ndup-1-again", &body);
    assert!(!third.duplicate);
    hub.wait_decided("solo", third.sequence);
    let kinds: Vec<String> = hub.kinds_of("ndup-1").into_iter().map(|(_, k)| k).collect();
    assert_eq!(kinds, ["accepted", "started", "finished"]);
    assert_eq!(daemon.client().list().unwrap().len(), 1);

    // Past its not_after: refused as expired, nothing started.
    let old = json!({"id": "nold-1", "not_after": 1000, "capture": {"packets": 5}}).to_string();
    let ack = hub.publish("solo", "nold-1", &old);
    let refused = hub.wait_events("nold-1", "refused", &["solo"]);
    assert_eq!(refused[0].event["code"], "expired", "{}", refused[0].event);
    assert!(refused[0].event["reason"].as_str().unwrap().contains("expired"), "{}", refused[0].event);
    assert_eq!(refused[0].msg_id, "solo.nold-1.refused.expired");
    hub.wait_decided("solo", ack.sequence);
    let ids: Vec<String> = daemon.client().list().unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(ids, ["ndup-1"]);
}

#[test]
fn a_nats_request_received_but_not_acknowledged_before_a_crash_runs_once_after_the_restart() {
    let nats = Nats::start();
    let hub = Hub::connect(&nats);
    let veth = VethPair::new(1);
    let mut daemon = node(&nats, &veth, "ncrash", "", false);
    hub.wait_consumer("ncrash");
    let (status, _) = daemon.running.take().unwrap().signal_and_wait(libc::SIGKILL);
    assert!(!status.success());
    // What the dead daemon had received and not acknowledged: a message delivered through its
    // consumer.
    let body = request("ncrash-1", json!({}), 20);
    let ack = hub.publish("all", "ncrash-1", &body);
    assert_eq!(hub.pull_without_ack("ncrash"), ack.sequence);
    assert_eq!(hub.consumer("ncrash").unwrap().num_ack_pending, 1);

    // Delivered again once its ack wait (2 s) has passed, and decided by the restarted daemon.
    daemon.restart(&veth);
    hub.wait_events("ncrash-1", "started", &["ncrash"]);
    let sent = send(&veth, 0..60);
    let finished = hub.wait_events("ncrash-1", "finished", &["ncrash"]);
    check_finished(&finished[0].event, &daemon, "ncrash-1", &sent);
    hub.wait_decided("ncrash", ack.sequence);
    let info = hub.consumer("ncrash").unwrap();
    assert!(info.delivered.stream_sequence >= ack.sequence && info.num_ack_pending == 0, "{info:?}");

    // Killed again and restarted, the request published once more: it does not run again.
    let (_, _) = daemon.running.take().unwrap().signal_and_wait(libc::SIGKILL);
    daemon.restart(&veth);
    let again = hub.publish("all", "ncrash-1-again", &body);
    hub.wait_decided("ncrash", again.sequence);
    let kinds: Vec<String> = hub.kinds_of("ncrash-1").into_iter().map(|(_, k)| k).collect();
    assert_eq!(kinds, ["accepted", "started", "finished"]);
    assert_eq!(daemon.client().list().unwrap().len(), 1);
}

#[test]
fn a_capture_across_a_nats_outage_completes_and_its_events_arrive_once_when_the_broker_is_back() {
    let mut nats = Nats::start();
    let hub = Hub::connect(&nats);
    let veth = VethPair::new(1);
    let daemon = node(&nats, &veth, "noutage", "", true);
    hub.wait_consumer("noutage");
    hub.publish("all", "nout-1", &request("nout-1", json!({}), 20));
    hub.wait_events("nout-1", "started", &["noutage"]);
    eventually("the broker connected", || (metric(&veth, CONNECTED) == 1.0).then_some(()));
    // Accepted and started, their acknowledgements read: killed before, the broker would be
    // sent again what it holds.
    eventually("the daemon took the server's answers", || (metric(&veth, PUBLISHED) == 2.0).then_some(()));
    let published = metric(&veth, PUBLISHED);

    // The broker goes away mid-capture; the capture completes, and the daemon serves its API.
    nats.kill();
    let sent = send(&veth, 0..60);
    let info = daemon.wait("nout-1");
    assert_eq!(reason(&info), "packets", "{info:?}");
    assert_eq!(info.summary.as_ref().map(|s| s.packets), Some(20), "{info:?}");
    eventually("a failed send and the broker seen gone", || {
        (metric(&veth, FAILED) > 0.0 && metric(&veth, CONNECTED) == 0.0).then_some(())
    });
    assert_eq!(metric(&veth, PUBLISHED), published);

    let back_ns = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as i128;
    nats.restart();
    let finished = hub.wait_events("nout-1", "finished", &["noutage"]);
    check_finished(&finished[0].event, &daemon, "nout-1", &sent);
    check_outputs(&finished[0].event, &sent[..20]);
    assert!(
        finished[0].stored_ns >= back_ns,
        "the finished event was stored at {} ns, the broker was back at {back_ns} ns",
        finished[0].stored_ns
    );
    eventually("the broker connected again, the end sent", || {
        (metric(&veth, CONNECTED) == 1.0 && metric(&veth, PUBLISHED) == published + 1.0).then_some(())
    });
    // None lost, none twice (whatever the client re-sent after the outage).
    let kinds: Vec<String> = hub.kinds_of("nout-1").into_iter().map(|(_, k)| k).collect();
    assert_eq!(kinds, ["accepted", "started", "finished"]);
    assert_eq!(daemon.client().list().unwrap().len(), 1);
}

/// `tapstream fleet SUBCOMMAND --nats URL ARGS`, run in the hub namespace (the filter's words
/// come last).
fn fleet_cli(nats: &Nats, subcommand: &str, args: &[&str]) -> Command {
    let mut command = nats.hub().command(tapstream_bin());
    command
        .args(["fleet", subcommand, "--nats", &nats.local_url()])
        .args(args)
        .env_remove("TAPSTREAM_NATS")
        .env_remove("TAPSTREAM_REDIS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

#[test]
fn the_operator_lists_the_nodes_and_runs_a_capture_over_nats() {
    let nats = Nats::start();
    let hub = Hub::connect(&nats);
    let (veth_a, veth_b) = (VethPair::new(1), VethPair::new(1));
    let _a = node(&nats, &veth_a, "ncli-fra1", "site = \"fra1\"", false);
    let b = node(&nats, &veth_b, "ncli-ams1", "site = \"ams1\"", false);
    hub.wait_consumer("ncli-fra1");
    hub.wait_consumer("ncli-ams1");

    // Both nodes, with their labels and interfaces.
    let listed = eventually("both nodes in `fleet nodes`", || {
        let out = fleet_cli(&nats, "nodes", &["--json"]).output().expect("run fleet nodes");
        assert!(out.status.success(), "fleet nodes: {}", String::from_utf8_lossy(&out.stderr));
        let listed: Vec<Value> = serde_json::from_slice(&out.stdout).expect("fleet nodes JSON");
        let names: Vec<&str> = listed.iter().map(|n| n["node"].as_str().unwrap()).collect();
        (names == ["ncli-ams1", "ncli-fra1"]).then_some(listed)
    });
    assert_eq!(listed[0]["labels"]["site"], "ams1", "{}", listed[0]);
    assert_eq!(listed[1]["interfaces"][0]["device"], veth_a.capture_if.as_str(), "{}", listed[1]);

    // A capture on the fra1 node only, followed to its end.
    let out = capture_while_sending(
        fleet_cli(
            &nats,
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
    let answered: Vec<&String> = report["nodes"].as_object().unwrap().keys().collect();
    assert_eq!(answered, ["ncli-fra1"], "{report}");
    let answer = &report["nodes"]["ncli-fra1"];
    assert_eq!((&answer["state"], &answer["packets"]), (&json!("finished"), &json!(5)), "{report}");
    let outputs = answer["outputs"].as_array().unwrap();
    assert!(!outputs.is_empty(), "{report}");
    for output in outputs {
        let path = output.as_str().unwrap().trim_start_matches("file://");
        assert!(Path::new(path).is_file(), "{path} is not on disk: {report}");
    }
    assert_eq!(report["no_answer"], json!([]), "{report}");
    let id = report["request_id"].as_str().unwrap();
    assert!(b.client().status(id).is_err(), "no capture {id} on ncli-ams1");

    // A bad filter for one node (published on its subject): refused, named, non-zero exit.
    let out =
        fleet_cli(&nats, "capture", &["--node", "ncli-ams1", "--packets", "5", "--wait", "tcp and and"])
            .output()
            .expect("run fleet capture");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a refused request exits non-zero: {stderr}");
    assert!(stderr.contains("ncli-ams1 refused (bad_filter)") && stderr.contains("syntax error"), "{stderr}");
    let refused = hub.events().into_iter().find(|e| e.event["event"] == "refused").expect("the refusal");
    assert_eq!(refused.event["node"], "ncli-ams1", "{}", refused.event);
    assert_eq!(hub.last_request_subject(), "tapstream.requests.ncli-ams1");
}

#[test]
fn events_not_sent_and_captures_cut_by_a_crash_are_reported_once_after_the_restart_over_nats() {
    let mut nats = Nats::start();
    let hub = Hub::connect(&nats);
    let veth = VethPair::new(1);
    let mut daemon = node(&nats, &veth, "nrestart", "", true);
    hub.wait_consumer("nrestart");
    // One capture ends during an outage, its end not sent; the other runs when the daemon dies.
    hub.publish("all", "nrs-ends", &request("nrs-ends", json!({}), 20));
    let running = request("nrs-cut", json!({}), 100_000);
    hub.publish("all", "nrs-cut", &running);
    hub.wait_events("nrs-ends", "started", &["nrestart"]);
    hub.wait_events("nrs-cut", "started", &["nrestart"]);
    eventually("the daemon took the server's answers", || (metric(&veth, PUBLISHED) == 4.0).then_some(()));

    nats.kill();
    let sent = send(&veth, 0..60);
    let info = daemon.wait("nrs-ends");
    assert_eq!(reason(&info), "packets", "{info:?}");
    eventually("a failed send", || (metric(&veth, FAILED) > 0.0).then_some(()));
    // The end waits in the NATS transport's own outbox; Redis's place is left alone.
    let state = daemon.dir.path().join("state/fleet");
    let journal = std::fs::read_to_string(state.join("nats/outbox.jsonl")).expect("the NATS outbox");
    assert!(journal.contains("\"nrs-ends\"") && journal.contains("\"finished\""), "{journal}");
    assert!(!state.join("outbox.jsonl").exists(), "Redis's outbox path is not used");
    let (status, _) = daemon.running.take().unwrap().signal_and_wait(libc::SIGKILL);
    assert!(!status.success());
    nats.restart();
    daemon.restart(&veth);

    let finished = hub.wait_events("nrs-ends", "finished", &["nrestart"]);
    check_finished(&finished[0].event, &daemon, "nrs-ends", &sent);
    let cut = hub.wait_events("nrs-cut", "finished", &["nrestart"]);
    assert_eq!(cut[0].event["stop_reason"], "interrupted", "{}", cut[0].event);

    // Killed and restarted again, the request published once more: nothing is reported twice.
    let (_, _) = daemon.running.take().unwrap().signal_and_wait(libc::SIGKILL);
    daemon.restart(&veth);
    let again = hub.publish("all", "nrs-cut-again", &running);
    hub.wait_decided("nrestart", again.sequence);
    for id in ["nrs-ends", "nrs-cut"] {
        let kinds: Vec<String> = hub.kinds_of(id).into_iter().map(|(_, k)| k).collect();
        assert_eq!(kinds, ["accepted", "started", "finished"], "{id}");
    }
    assert_eq!(daemon.client().list().unwrap().len(), 2);
}

#[test]
fn a_daemon_takes_requests_from_redis_and_nats_at_once_and_answers_each_on_its_own() {
    let nats = Nats::start();
    let hub = Hub::connect(&nats);
    let redis = Redis::start();
    let mut con = redis_fleet::connect(&redis);
    let veth = VethPair::new(1);
    let url = nats.link(&veth.capture_ns);
    let extra = format!(
        "metrics_listen = \"127.0.0.1:9464\"\n{}[fleet.nats]\nurl = \"{url}\"\n",
        redis_fleet::fleet_config(&redis, "")
    );
    let daemon = TestDaemon::start_as(&veth, "both", &extra);
    hub.wait_consumer("both");
    redis_fleet::wait_group(&mut con, "both");

    redis_fleet::publish(&mut con, &request("by-redis", json!({}), 20));
    hub.publish("all", "by-nats", &request("by-nats", json!({}), 20));
    redis_fleet::wait_events(&mut con, "by-redis", "started", &["both"]);
    hub.wait_events("by-nats", "started", &["both"]);
    let sent = send(&veth, 0..60);
    // Both captures see the same frames; each end is told on the broker that asked.
    let on_redis = redis_fleet::wait_events(&mut con, "by-redis", "finished", &["both"]);
    check_finished(&on_redis[0], &daemon, "by-redis", &sent);
    let on_nats = hub.wait_events("by-nats", "finished", &["both"]);
    check_finished(&on_nats[0].event, &daemon, "by-nats", &sent);
    assert!(redis_fleet::events_of(&mut con, "by-nats").is_empty());
    assert!(hub.events_of("by-redis").is_empty());
    let state = daemon.dir.path().join("state/fleet");
    assert!(state.join("outbox.jsonl").is_file() && state.join("nats/outbox.jsonl").is_file());
    // One connection gauge per broker; the counters add up both.
    for transport in ["redis", "nats"] {
        let series = format!("{CONNECTED}{{transport=\"{transport}\"}}");
        eventually(&format!("{series} = 1"), || (metric(&veth, &series) == 1.0).then_some(()));
    }
    eventually("both brokers' events counted", || (metric(&veth, PUBLISHED) == 6.0).then_some(()));
}

#[test]
fn credentials_come_from_the_environment_and_stay_out_of_the_log() {
    let nats = Nats::start_with_user("tapnode", "n4ts-s3cret-pw");
    let hub = Hub::connect(&nats);
    let veth = VethPair::new(1);
    let url = nats.link(&veth.capture_ns);
    let env = vec![
        ("TAPSTREAM_NATS_USER", "tapnode".to_owned()),
        ("TAPSTREAM_NATS_PASSWORD", "n4ts-s3cret-pw".to_owned()),
    ];
    let mut daemon = TestDaemon::start_as_with_env(&veth, "authed", &nats_config(&url, ""), env);
    hub.wait_consumer("authed");
    hub.publish("authed", "auth-1", &request("auth-1", json!({}), 20));
    hub.wait_events("auth-1", "started", &["authed"]);
    let sent = send(&veth, 0..60);
    let finished = hub.wait_events("auth-1", "finished", &["authed"]);
    check_finished(&finished[0].event, &daemon, "auth-1", &sent);
    let (status, log) = daemon.running.take().unwrap().signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{log}");
    assert!(log.contains("connected to NATS at"), "{log}");
    // The streams and the consumer it made have the configuration's settings.
    assert!(!log.contains("are not applied"), "{log}");
    assert!(!log.contains("n4ts-s3cret-pw"), "the password is in the log:\n{log}");
}

#[test]
fn a_node_and_an_operator_reach_nats_over_tls_and_a_wrong_authority_is_named() {
    let nats = Nats::start_tls();
    let hub = Hub::connect(&nats);
    let veth = VethPair::new(1);
    let url = nats.link(&veth.capture_ns).replace("nats://", "tls://");
    let broker = |ca: &Path| {
        format!("[fleet.nats]\nurl = \"{url}\"\ntls_ca_file = \"{}\"\nack_wait_secs = 2\n", ca.display())
    };
    let daemon = TestDaemon::start_as(&veth, "ntls", &broker(&nats.ca_file()));
    hub.wait_consumer("ntls");
    hub.publish("ntls", "ntls-1", &request("ntls-1", json!({"node": "ntls"}), 20));
    hub.wait_events("ntls-1", "started", &["ntls"]);
    let sent = send(&veth, 0..60);
    let finished = hub.wait_events("ntls-1", "finished", &["ntls"]);
    check_finished(&finished[0].event, &daemon, "ntls-1", &sent);

    // The operator's CLI on the host with the node's configuration lists it over TLS; trusting
    // another authority, it fails saying why.
    let cli = |config: &Path| {
        veth.capture_ns
            .command(tapstream_bin())
            .args(["fleet", "nodes", "--json", "--config"])
            .arg(config)
            .env_remove("TAPSTREAM_NATS")
            .env_remove("TAPSTREAM_REDIS")
            .output()
            .expect("run fleet nodes")
    };
    let right = daemon.dir.path().join("tapstream.toml");
    let wrong = daemon.dir.path().join("wrong-ca.toml");
    let ca = nats.ca_file().display().to_string();
    let text = std::fs::read_to_string(&right).unwrap();
    assert!(text.contains(&ca));
    std::fs::write(&wrong, text.replace(&ca, &nats.other_ca_file().display().to_string())).unwrap();
    eventually("ntls in fleet nodes over TLS", || {
        let nodes: Vec<Value> = serde_json::from_slice(&cli(&right).stdout).ok()?;
        nodes.iter().any(|n| n["node"] == "ntls").then_some(())
    });
    let out = cli(&wrong);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("UnknownIssuer") || stderr.contains("unknown issuer"), "{stderr}");
}
