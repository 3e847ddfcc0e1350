//! Access rules and the audit log: local users held to their group's rule (the CLI run as
//! another uid with groups the test creates), bearer tokens held to theirs over the TCP API,
//! broker requests to their transport's, and the audit log as an operator reads it after a
//! kill and a rotation.

use std::{
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use serde_json::{Value, json};
use tapstream::control::{CaptureInfo, CaptureRequest, CaptureState};
use tapstream_testenv::{Redis, Sender, VethPair, unique_name};

use crate::{
    common::tapstream_bin,
    daemon::{TestDaemon, data, local_store, sendable},
    fleet::{connect, fleet_config, metric, publish, request, wait_events, wait_group},
};

/// Where the daemons of these tests serve the TCP API (inside their own namespace).
const TCP_ADDR: &str = "127.0.0.1:9465";

/// A Unix group made for a test, removed when dropped.
struct TestGroup {
    name: String,
    gid: u32,
}

impl TestGroup {
    fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        let out = Command::new("groupadd").arg(&name).output().expect("run groupadd");
        assert!(out.status.success(), "groupadd {name}: {}", String::from_utf8_lossy(&out.stderr));
        let out = Command::new("getent").args(["group", &name]).output().expect("run getent");
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let gid = line.split(':').nth(2).and_then(|g| g.parse().ok()).unwrap_or_else(|| panic!("{line:?}"));
        Self { name, gid }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// A token file of mode 600 holding `token`, in a directory of its own.
fn token_file(token: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (dir, path)
}

/// Runs `tapstream capture ARGS` against `daemon` as `uid`, primary group `gid`, with the
/// supplementary `groups`.
fn cli_as(daemon: &TestDaemon, uid: u32, gid: u32, groups: &[u32], args: &[&str]) -> Output {
    let groups = groups.to_vec();
    let mut command = Command::new(tapstream_bin());
    command.arg("capture").args(args).env("TAPSTREAM_SOCKET", daemon.socket());
    let drop_privileges = move || {
        // SAFETY: `groups` is a valid array of that many gids.
        if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: plain system calls on integers.
        if unsafe { libc::setgid(gid) } != 0 || unsafe { libc::setuid(uid) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: between fork and exec, the child calls only setgroups, setgid and setuid
    // (async-signal-safe), on a vector allocated before the fork.
    unsafe { command.pre_exec(drop_privileges) };
    command.output().expect("run tapstream")
}

/// A request to the TCP API inside the daemon's namespace: (status, body as JSON).
fn api(veth: &VethPair, token: Option<&str>, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut cmd = veth.capture_ns.command("curl");
    cmd.args(["-s", "-o", "/dev/stderr", "-w", "%{http_code}", "-X", method]);
    if let Some(token) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    if let Some(body) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", &body.to_string()]);
    }
    let out = cmd.arg(format!("http://{TCP_ADDR}{path}")).output().expect("run curl");
    let status = String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0);
    let body =
        serde_json::from_slice(&out.stderr).unwrap_or_else(|_| json!(String::from_utf8_lossy(&out.stderr)));
    (status, body)
}

/// The error of an error reply.
fn error(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_else(|| panic!("no error: {body}"))
}

/// The audit files of `daemon` (its default place, `<state_dir>/audit.jsonl`), oldest first.
fn audit_files(daemon: &TestDaemon) -> Vec<PathBuf> {
    let base = daemon.dir.path().join("state/audit.jsonl");
    let mut files: Vec<PathBuf> = (1..10)
        .rev()
        .map(|n| PathBuf::from(format!("{}.{n}", base.display())))
        .filter(|p| p.exists())
        .collect();
    files.push(base);
    files
}

/// Every line of the audit log, oldest first.
fn audit_lines(daemon: &TestDaemon) -> Vec<Value> {
    audit_files(daemon)
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>()
        })
        .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Every file under `dir` holding `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<PathBuf> {
    crate::common::walk(dir)
        .into_iter()
        .filter(|p| std::fs::read(p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes())))
        .collect()
}

#[test]
fn a_group_may_capture_on_its_interface_only_and_is_refused_another_naming_the_rule() {
    let team = TestGroup::new("tsa");
    let nobody = TestGroup::new("tsn");
    let veth = VethPair::new(1);
    let extra = format!(
        "socket_mode = \"0666\"\n\
         [access]\ndefault = \"deny\"\n\
         [[access.rules]]\nname = \"ops\"\ngroups = [\"root\"]\nmay_stop_others = true\nmay_read_others = true\n\
         [[access.rules]]\nname = \"team-a\"\ngroups = [\"{}\"]\ninterfaces = [\"public\"]\n\
         [interfaces.private]\ndevice = \"{}\"\n",
        team.name,
        unique_name("tsabs")
    );
    let daemon = TestDaemon::start_aliased(&veth, "testnode", "public", &extra, "", local_store, Vec::new());

    // A member of team-a through a supplementary group may capture on `public`...
    let out = cli_as(
        &daemon,
        4242,
        nobody.gid,
        &[team.gid],
        &["start", "-i", "public", "--duration", "1s", "--json"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: CaptureInfo = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((info.owner.as_deref(), info.requested_by), (Some("team-a"), Some(4242)));
    // ... and not on `private`, refused with the rule's name.
    let out = cli_as(&daemon, 4242, nobody.gid, &[team.gid], &["start", "-i", "private", "--duration", "1s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("access rule \"team-a\" does not allow interface \"private\"")
            && err.contains("HTTP 403"),
        "{err}"
    );
    // By its primary group too.
    let out = cli_as(&daemon, 4243, team.gid, &[], &["start", "-i", "private"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("access rule \"team-a\""), "{out:?}");
    // A user in no rule's group may do nothing: access.default is deny.
    let out = cli_as(&daemon, 4244, nobody.gid, &[], &["start", "-i", "public", "--duration", "1s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("access.default is \"deny\"") && err.contains("uid 4244"),
        "{err}"
    );
    // The operators (root's group) see team-a's capture, and it ends as asked.
    let ended = daemon.wait(&info.id);
    assert_eq!(ended.state, CaptureState::Finished);
    assert_eq!(ended.owner.as_deref(), Some("team-a"));

    // The audit log names each of them, and the rule.
    let lines = audit_lines(&daemon);
    let refused = lines
        .iter()
        .find(|l| l["action"] == "start" && l["subject"]["uid"] == 4242 && l["decision"] == "refused")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(refused["rule"], "team-a", "{refused}");
    assert_eq!(refused["request"]["interfaces"], json!(["private"]), "{refused}");
    let groups = refused["subject"]["groups"].as_array().unwrap();
    assert!(groups.iter().any(|g| g["name"] == team.name.as_str() && g["gid"] == team.gid), "{refused}");
    assert!(refused["reason"].as_str().unwrap().contains("does not allow interface"), "{refused}");
    let denied = lines.iter().find(|l| l["subject"]["uid"] == 4244).unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!((&denied["rule"], &denied["decision"]), (&Value::Null, &json!("refused")), "{denied}");
}

/// The token of the rule `team-b` in the token tests.
const TEAM_B_TOKEN: &str = "team-b-token-7f3a9c0e";

/// A daemon with the TCP API and a rule `team-b` whose token is [`TEAM_B_TOKEN`], with
/// `rule` added to the rule, its metrics served; anyone else may do anything.
fn token_daemon(veth: &VethPair, rule: &str, audit: &str) -> (TestDaemon, tempfile::TempDir) {
    let (dir, path) = token_file(TEAM_B_TOKEN);
    let extra = format!(
        "tcp_listen = \"{TCP_ADDR}\"\nmetrics_listen = \"127.0.0.1:9464\"\n[[access.rules]]\nname = \"team-b\"\ntoken_file = \"{}\"\n{rule}\n{audit}\n",
        path.display()
    );
    (TestDaemon::start(veth, &extra), dir)
}

#[test]
fn a_tokens_forced_clause_limits_what_its_capture_stores() {
    let veth = VethPair::new(1);
    let (daemon, _token) = token_daemon(&veth, "forced_filter = \"udp\"", "");
    let asked =
        json!({"interface": "tap", "filter": "tcp or udp", "idle_timeout_secs": 2, "duration_secs": 60});
    let (status, info) = api(&veth, Some(TEAM_B_TOKEN), "POST", "/v1/captures", Some(&asked));
    assert_eq!(status, 201, "{info}");
    let info: CaptureInfo = serde_json::from_value(info).unwrap();
    assert_eq!(info.request.filter.as_deref(), Some("(tcp or udp) and (udp)"));
    assert_eq!(info.owner.as_deref(), Some("team-b"));
    let frames = sendable(&veth);
    let sent = Sender::new(&veth).send_all(&frames);
    let ended = daemon.wait(&info.id);
    assert_eq!(ended.state, CaptureState::Finished);
    // What libpcap matches of the corpus sent: with the clause, and without it.
    let matching = |expression: &str| {
        let filter = tapstream::filter::CbpfProgram::compile(expression).unwrap();
        sent.iter().filter(|f| filter.matches(&f.data, f.data.len() as u32)).copied().collect::<Vec<_>>()
    };
    let expected = matching("(tcp or udp) and (udp)");
    assert!(!expected.is_empty() && expected.len() < matching("tcp or udp").len(), "the clause narrows");
    assert!(daemon.stored(&info.id) == data(&expected), "exactly the frames of (filter) and (clause)");
    // A filter that would reach out of its parentheses is refused.
    let sneaky = json!({"interface": "tap", "filter": "tcp) or (tcp", "duration_secs": 1});
    let (status, body) = api(&veth, Some(TEAM_B_TOKEN), "POST", "/v1/captures", Some(&sneaky));
    assert_eq!(status, 400, "{body}");
    assert!(error(&body).contains("parentheses"), "{body}");
}

#[test]
fn a_token_may_not_stop_or_read_another_ones_capture() {
    let veth = VethPair::new(1);
    let (daemon, _token) = token_daemon(&veth, "", "");
    // Started on the socket by root, whom no rule holds (access.default: allow).
    let theirs = daemon.start_capture(&["-i", "tap", "--duration", "60s", "--id", "theirs"]);
    let b = Some(TEAM_B_TOKEN);
    let (status, body) = api(&veth, b, "GET", "/v1/captures/theirs", None);
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        error(&body),
        "access rule \"team-b\" may not see capture \"theirs\": another started it \
         (access.rules.team-b.may_read_others)"
    );
    let (status, body) = api(&veth, b, "GET", "/v1/captures/theirs/wait?timeout_secs=0", None);
    assert_eq!(status, 403, "{body}");
    let (status, body) = api(&veth, b, "POST", "/v1/captures/theirs/stop", None);
    assert_eq!(status, 403, "{body}");
    assert!(error(&body).contains("may not stop") && error(&body).contains("may_stop_others"), "{body}");
    // Its own capture it may see, list (alone) and stop.
    let (status, body) =
        api(&veth, b, "POST", "/v1/captures", Some(&json!({"interface": "tap", "id": "mine"})));
    assert_eq!(status, 201, "{body}");
    let (status, list) = api(&veth, b, "GET", "/v1/captures", None);
    assert_eq!(status, 200);
    let ids: Vec<&str> = list.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["mine"]);
    assert_eq!(api(&veth, b, "GET", "/v1/captures/mine", None).0, 200);
    assert_eq!(api(&veth, b, "POST", "/v1/captures/mine/stop", None).0, 200);
    // The other is untouched, and its owner may stop it.
    assert_eq!(daemon.client().status(&theirs).unwrap().state, CaptureState::Running);
    daemon.client().stop(&theirs).unwrap();
    assert_eq!(daemon.wait(&theirs).state, CaptureState::Finished);
    assert_eq!(daemon.client().list().unwrap().len(), 2, "root sees both");
}

#[test]
fn broker_requests_are_held_to_their_transports_rule() {
    let redis = Redis::start();
    let mut con = connect(&redis);
    let veth = VethPair::new(1);
    let extra = format!(
        "{}[access]\ndefault = \"deny\"\n[access.brokers]\nredis = \"fleet\"\n\
         [[access.rules]]\nname = \"fleet\"\nmax_packets = 100\nforced_filter = \"udp\"\n\
         [[access.rules]]\nname = \"ops\"\ngroups = [\"root\"]\nmay_read_others = true\nmay_stop_others = true\n",
        fleet_config(&redis, "")
    );
    let daemon = TestDaemon::start_as(&veth, "brk", &extra);
    wait_group(&mut con, "brk");
    // Above the rule's cap (though within the daemon's): refused, naming the rule.
    publish(&mut con, &request("too-many", json!({"node": "brk"}), 1000));
    let refused = wait_events(&mut con, "too-many", "refused", &["brk"]);
    assert_eq!(refused[0]["code"], "not_allowed", "{}", refused[0]);
    let reason = refused[0]["reason"].as_str().unwrap();
    assert!(reason.contains("access rule \"fleet\"") && reason.contains("max_packets = 100"), "{reason}");
    // Within it: started under the rule, its clause ANDed.
    publish(&mut con, &request("within", json!({"node": "brk"}), 20));
    wait_events(&mut con, "within", "started", &["brk"]);
    let info = daemon.client().status("within").unwrap();
    assert_eq!((info.owner.as_deref(), info.request.filter.as_deref()), (Some("fleet"), Some("udp")));
    daemon.client().stop("within").unwrap();
    // The audit log: the broker, by transport and message id.
    let lines = audit_lines(&daemon);
    for (id, decision) in [("too-many", "refused"), ("within", "allowed")] {
        let line = lines
            .iter()
            .find(|l| l["action"] == "start" && l["subject"]["message_id"] == id)
            .unwrap_or_else(|| panic!("{id}: {lines:#?}"));
        assert_eq!(line["subject"], json!({"kind": "broker", "transport": "redis", "message_id": id}));
        assert_eq!((&line["rule"], &line["decision"]), (&json!("fleet"), &json!(decision)), "{line}");
    }
}

#[test]
fn the_audit_log_has_a_line_per_action_survives_a_kill_rotates_and_holds_no_token() {
    let veth = VethPair::new(1);
    let (mut daemon, _token) =
        token_daemon(&veth, "may_read_others = true", "[audit]\nmax_bytes = 8192\nkeep = 2\n");
    let before = audit_lines(&daemon).len();
    let client = daemon.client();
    let request = |interface: &str| CaptureRequest {
        id: Some("a1".into()),
        interfaces: vec![interface.into()],
        duration_secs: Some(60.0),
        ..CaptureRequest::default()
    };
    client.start(&request("tap")).unwrap();
    client.start(&request("eth9")).unwrap_err();
    client.status("a1").unwrap();
    client.wait("a1", Duration::ZERO).unwrap();
    client.list().unwrap();
    assert_eq!(api(&veth, Some(TEAM_B_TOKEN), "GET", "/v1/captures", None).0, 200);
    assert_eq!(api(&veth, Some("not-the-token"), "GET", "/v1/captures/a1", None).0, 401);
    client.stop("a1").unwrap();
    // Killed at once after the last answer: every line answered is on disk.
    let (_, log) = daemon.running.take().unwrap().signal_and_wait(libc::SIGKILL);
    let lines = audit_lines(&daemon);
    let lines = &lines[before..];
    let summary: Vec<(String, String, String)> = lines
        .iter()
        .map(|l| {
            let who = match l["subject"]["kind"].as_str().unwrap() {
                "local" => format!("uid {}", l["subject"]["uid"]),
                "token" => format!("token {}", l["subject"]["rule"].as_str().unwrap()),
                kind => kind.to_owned(),
            };
            (l["action"].as_str().unwrap().to_owned(), who, l["decision"].as_str().unwrap().to_owned())
        })
        .collect();
    let expected = [
        ("start", "uid 0", "allowed"),
        ("start", "uid 0", "refused"),
        ("read", "uid 0", "allowed"),
        ("wait", "uid 0", "allowed"),
        ("list", "uid 0", "allowed"),
        ("list", "token team-b", "allowed"),
        ("read", "unauthenticated", "refused"),
        ("stop", "uid 0", "allowed"),
    ];
    let expected: Vec<(String, String, String)> =
        expected.iter().map(|(a, w, d)| (a.to_string(), w.to_string(), d.to_string())).collect();
    assert_eq!(summary, expected, "{lines:#?}");
    assert_eq!(lines[0]["capture"], "a1");
    assert_eq!(lines[0]["request"]["duration_secs"], 60.0);
    assert!(lines[1]["reason"].as_str().unwrap().contains("no interface \"eth9\""), "{}", lines[1]);
    assert_eq!(lines[5]["rule"], "team-b");

    // After the restart, enough reads to rotate the file past its size twice and more: at most
    // `keep` rotated files, none past the size, the newest line last.
    daemon.restart(&veth);
    let client = daemon.client();
    for _ in 0..150 {
        client.status("a1").unwrap();
    }
    let files = audit_files(&daemon);
    let names: Vec<String> =
        files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]);
    for file in &files {
        let size = std::fs::metadata(file).unwrap().len();
        assert!(size > 0 && size <= 8192, "{}: {size} bytes", file.display());
    }
    let lines = audit_lines(&daemon);
    assert!(lines.len() > 60, "{}", lines.len());
    // Counted, each written: since the restart, the 150 reads.
    assert_eq!(metric(&veth, "tapstream_audit_lines_total"), 150.0);
    assert_eq!(metric(&veth, "tapstream_audit_write_errors_total"), 0.0);
    assert!(lines.iter().rev().take(60).all(|l| l["action"] == "read" && l["capture"] == "a1"));

    // No audit file, nor any other file of the daemon, nor its log, holds the token.
    assert!(files_holding(daemon.dir.path(), TEAM_B_TOKEN).is_empty());
    assert!(!log.contains(TEAM_B_TOKEN), "{log}");
    let (_, log) = daemon.running.take().unwrap().signal_and_wait(libc::SIGTERM);
    assert!(!log.contains(TEAM_B_TOKEN), "{log}");
    let found = files_holding(daemon.dir.path(), TEAM_B_TOKEN);
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn check_config_names_a_wrong_rule_by_its_field_and_never_shows_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = "check-config-token-5d2e";
    let (_token_dir, token_path) = token_file(token);
    std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let check = |daemon: &str, rule: &str| {
        let file = dir.path().join("tapstream.toml");
        std::fs::write(
            &file,
            format!(
                "[daemon]\n{daemon}\n[interfaces.public]\ndevice = \"eth1\"\n[store]\ndestinations = [\"/srv/caps\"]\n\
                 [[access.rules]]\nname = \"team-a\"\n{rule}\n"
            ),
        )
        .unwrap();
        let out =
            Command::new(tapstream_bin()).arg("check-config").arg(&file).output().expect("run tapstream");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let tcp = "tcp_listen = \"127.0.0.1:9465\"";
    let token_rule = format!("token_file = \"{}\"", token_path.display());
    for (daemon, rule, field, words) in [
        (tcp, token_rule.as_str(), "access.rules.team-a.token_file", "has mode 0644"),
        ("", "groups = [\"tapstream-no-such-group\"]", "access.rules.team-a.groups", "no group named"),
        ("", "groups = [\"a b\"]", "access.rules.team-a.groups", "is not a group name"),
        ("", "interfaces = [\"private\"]", "access.rules.team-a.interfaces", "no interface \"private\""),
        (
            "",
            "destinations = [\"/srv/other\"]",
            "access.rules.team-a.destinations",
            "not one of store.destinations",
        ),
        ("", "forced_filter = \"net 10.20.0.0/33\"", "access.rules.team-a.forced_filter", ""),
        ("", "token_file = \"/nonexistent/token\"", "access.rules.team-a.token_file", "tcp_listen"),
        (tcp, "token_file = \"/nonexistent/token\"", "access.rules.team-a.token_file", "cannot read"),
    ] {
        let (ok, text) = check(daemon, rule);
        assert!(!ok && text.contains(field) && text.contains(words), "{rule}: {text}");
    }
    std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, text) = check(tcp, &format!("{token_rule}\ninterfaces = [\"public\"]\ngroups = [\"root\"]"));
    assert!(ok && text.contains("1 access rule(s), access.default = allow"), "{text}");
    assert!(!text.contains(token), "{text}");
}
