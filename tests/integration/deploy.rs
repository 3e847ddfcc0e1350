//! The deployment kit agrees with the code: the IAM policies grant exactly what the S3 client
//! calls (a capture host's, and a reader's as a real server sees them), and Prometheus accepts
//! the scrape config and alert rules.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use tapstream::store::catalog::{Manifest, ManifestInterface};
use tapstream_testenv::{Garage, VethPair, unique_name};

use crate::common::tapstream_bin;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The IAM action each S3 API call of a capture host needs.
fn iam_action(call: &str) -> Option<&'static str> {
    Some(match call {
        "put_object" | "create_multipart_upload" | "upload_part" | "complete_multipart_upload" => {
            "s3:PutObject"
        }
        "abort_multipart_upload" => "s3:AbortMultipartUpload",
        "list_multipart_uploads" => "s3:ListBucketMultipartUploads",
        // Only `tapstream read` and `ls` fetch and list objects (deploy/iam-reader-policy.json);
        // capture hosts need no read access (they write the catalog's manifests, never read
        // them).
        "get_object" | "list_objects_v2" => return None,
        other => panic!("the S3 client calls {other}, which the IAM policy test does not know"),
    })
}

#[test]
fn the_iam_policy_grants_exactly_the_calls_the_s3_client_makes() {
    let source = std::fs::read_to_string(root().join("capture/src/store/s3.rs")).unwrap();
    // Every request the client builds: `.client` followed by `.operation()`.
    let mut calls = BTreeSet::new();
    let mut rest = source.as_str();
    while let Some(i) = rest.find(".client") {
        rest = &rest[i + ".client".len()..];
        let after = rest.trim_start();
        if let Some(op) = after.strip_prefix('.') {
            let name: String = op.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            if op[name.len()..].starts_with("()") {
                calls.insert(name);
            }
        }
    }
    assert!(calls.len() >= 6, "found the client's calls: {calls:?}");
    let mut needed: BTreeSet<String> = calls.iter().filter_map(|c| iam_action(c)).map(String::from).collect();
    // Writes that carry object tags (x-amz-tagging) need PutObjectTagging besides PutObject.
    if source.contains(".set_tagging(") {
        needed.insert("s3:PutObjectTagging".into());
    }

    assert_eq!(granted("deploy/iam-policy.json"), needed, "IAM actions granted vs needed by {calls:?}");
}

/// The actions a policy file grants, after checking that each statement allows (no deny) on
/// the bucket of the placeholder's name.
fn granted(file: &str) -> BTreeSet<String> {
    let policy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join(file)).unwrap()).unwrap();
    let mut granted = BTreeSet::new();
    for s in policy["Statement"].as_array().unwrap() {
        assert_eq!(s["Effect"], "Allow", "{file}");
        let resource = s["Resource"].as_str().unwrap();
        assert!(resource.starts_with("arn:aws:s3:::CAPTURE-BUCKET"), "{file}: {resource}");
        granted.extend(s["Action"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()));
    }
    granted
}

/// The IAM action each S3 operation of `tapstream ls` and `read` needs, by the name Garage's
/// log gives the operation.
fn reader_action(operation: &str) -> &'static str {
    match operation {
        "GetObject" | "HeadObject" => "s3:GetObject",
        "ListObjectsV2" | "ListObjects" => "s3:ListBucket",
        other => panic!("tapstream ls or read called {other}, which the reader policy test does not know"),
    }
}

#[test]
fn the_reader_policy_grants_exactly_the_calls_ls_and_read_make() {
    let garage = Garage::start_logging_calls();
    let prefix = unique_name("rd");
    let url = format!("s3://{}/{prefix}", garage.bucket);
    let t0 = 1_795_000_000_000_000_000u64;
    let frames: Vec<(u64, Vec<u8>)> = (0..30u64).map(|i| (t0 + i * 1_000, vec![i as u8; 60])).collect();
    let manifest = Manifest {
        capture_id: "c1".into(),
        node: "tap-1".into(),
        interfaces: vec![ManifestInterface { alias: "eth0".into(), device: "eth0".into() }],
        start_ns: t0,
        alert_id: Some("A-1".into()),
        ..Manifest::default()
    };
    // Written with the writer's key; an object of a prefix without a catalog too.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let sink = std::sync::Arc::new(rt.block_on(crate::upload::sink(&garage)));
    rt.block_on(crate::catalog::store_capture(sink.clone(), &prefix, manifest.clone(), &frames, 0, true));
    let old = format!("{prefix}-old");
    let without_catalog = Manifest { capture_id: "c0".into(), ..manifest };
    rt.block_on(crate::catalog::store_capture(sink, &old, without_catalog, &frames, 0, false));
    let old_objects = crate::upload::list_keys_here(&garage, &format!("{old}/"));
    let object = old_objects.iter().find(|k| k.ends_with(".pcap.zst")).expect("an object").clone();

    // The reader's key may only read: every call below must work with it.
    let (id, secret) = garage.read_only_key();
    let from = garage.log().len();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let object_url = format!("s3://{}/{object}", garage.bucket);
    let old_url = format!("s3://{}/{old}", garage.bucket);
    let since = format!("{}", t0 / 1_000_000_000);
    for args in [
        vec!["ls", url.as_str(), "--json"],
        vec!["ls", &url, "--since", &since, "--alert-id", "A-1"],
        vec!["read", &url, "-w", out],
        vec!["read", &url, "--format", "pcapng", "-w", out, "--capture", "c1", "tcp"],
        vec!["read", &object_url, "-w", out],
        vec!["read", &old_url, "-w", out],
    ] {
        // The store's flags before a filter's words.
        let run = Command::new(tapstream_bin())
            .arg(args[0])
            .args(crate::upload::s3_args(&garage))
            .args(&args[1..])
            .envs(garage.aws_env())
            .env("AWS_ACCESS_KEY_ID", &id)
            .env("AWS_SECRET_ACCESS_KEY", &secret)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "tapstream {args:?} with a read-only key: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    let calls = garage.calls(from);
    eprintln!("the reader's calls: {calls:?}");
    // The key is read-only indeed: a write with it is refused.
    let reader = tapstream::store::s3::S3Config {
        bucket: garage.bucket.clone(),
        endpoint: Some(garage.endpoint.clone()),
        region: Some(garage.region.clone()),
        path_style: true,
        max_attempts: 1,
        static_credentials: Some((id, secret)),
        ..Default::default()
    };
    let put = rt.block_on(async {
        let sink = tapstream::store::s3::S3Sink::new(reader).await;
        let meta = tapstream::store::ObjectMeta::default();
        tapstream::store::Sink::put_object(
            &sink,
            &format!("{prefix}/x"),
            bytes::Bytes::from_static(b"x"),
            &meta,
        )
        .await
    });
    let refused = put.expect_err("a read-only key cannot write").to_string();
    assert!(refused.contains("AccessDenied"), "{refused}");
    assert!(calls.contains("GetObject") && calls.contains("ListObjectsV2"), "the reader's calls: {calls:?}");
    let needed: BTreeSet<String> = calls.iter().map(|c| reader_action(c).to_owned()).collect();
    assert_eq!(granted("deploy/iam-reader-policy.json"), needed, "actions granted vs needed by {calls:?}");
}

#[test]
fn the_lifecycle_example_expires_by_the_tag_the_store_writes_and_aborts_stale_uploads() {
    let text = std::fs::read_to_string(root().join("deploy/s3-lifecycle-example.json")).unwrap();
    let lifecycle: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let rules = lifecycle["Rules"].as_array().unwrap();
    // The tags the S3 sink writes for a capture of customer C and class K.
    let written = tapstream::store::settings::object_tags(Some("C"), Some("K"));
    let retention_key = &written[1].0;
    let mut classes = Vec::new();
    for rule in rules {
        assert_eq!(rule["Status"], "Enabled");
        let filter = &rule["Filter"];
        if let Some(abort) = rule.get("AbortIncompleteMultipartUpload") {
            assert!(abort["DaysAfterInitiation"].as_u64().is_some_and(|d| d > 0), "{rule}");
            assert_eq!(filter["Prefix"], "CAPTURE-PREFIX/");
            continue;
        }
        assert_eq!(filter["And"]["Prefix"], "CAPTURE-PREFIX/", "{rule}");
        let tags = filter["And"]["Tags"].as_array().unwrap();
        assert_eq!(tags.len(), 1);
        assert_eq!(tags[0]["Key"].as_str(), Some(retention_key.as_str()), "expires by the tag written");
        let class = tags[0]["Value"].as_str().unwrap();
        tapstream::store::settings::check_retention(class).expect("a class a request can ask");
        assert!(rule["Expiration"]["Days"].as_u64().is_some_and(|d| d > 0), "{rule}");
        classes.push(class.to_owned());
    }
    assert_eq!(classes, ["short", "standard", "long"]);
    assert_eq!(rules.len(), classes.len() + 1, "one rule aborts incomplete uploads");
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(readme.contains("deploy/s3-lifecycle-example.json"), "the README shows it");
}

#[test]
fn prometheus_accepts_the_scrape_config_and_alert_rules() {
    let dir = root().join("deploy/prometheus");
    for (what, file) in [("config", "prometheus.yml"), ("rules", "tapstream-alerts.yml")] {
        let out = Command::new("promtool")
            .args(["check", what])
            .arg(dir.join(file))
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool check {what} {file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Metric names (`tapstream_...`) that a deploy file refers to.
pub fn referenced_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in ["deploy/grafana/tapstream-dashboard.json", "deploy/prometheus/tapstream-alerts.yml"] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("tapstream_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            names.insert(name);
        }
    }
    names
}

#[test]
fn the_dashboard_is_valid_json() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/tapstream-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 6));
    assert!(referenced_metrics().len() >= 10);
}

fn unit() -> String {
    std::fs::read_to_string(root().join("deploy/systemd/tapstream.service")).unwrap()
}

/// The value of `key=` lines in the unit.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_owned).collect()
}

#[test]
fn systemd_accepts_the_unit() {
    let unit = unit();
    assert_eq!(
        unit_values(&unit, "ExecStart"),
        ["/usr/local/bin/tapstream daemon --config /etc/tapstream/tapstream.toml"]
    );
    // systemd-analyze checks that the binaries exist: point the unit at the one just built.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tapstream.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/tapstream", env!("CARGO_BIN_EXE_tapstream"))).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}

#[test]
fn the_unit_runs_unprivileged_with_only_the_capabilities_it_documents() {
    let unit = unit();
    let caps = |key: &str| -> BTreeSet<String> {
        unit_values(&unit, key).iter().flat_map(|v| v.split_whitespace().map(str::to_owned)).collect()
    };
    let expected: BTreeSet<String> =
        ["CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_PERFMON", "CAP_IPC_LOCK"].map(String::from).into();
    assert_eq!(caps("AmbientCapabilities"), expected);
    assert_eq!(caps("CapabilityBoundingSet"), expected);
    for cap in &expected {
        assert!(unit.contains(&format!("#   {cap} ")), "the unit says why it needs {cap}");
    }
    assert_eq!(unit_values(&unit, "User"), ["tapstream"]);
    assert_eq!(unit_values(&unit, "NoNewPrivileges"), ["yes"]);
    assert_eq!(unit_values(&unit, "ProtectSystem"), ["strict"]);
    assert!(unit_values(&unit, "PrivateNetwork").is_empty(), "the daemon needs the host's NICs");
    assert!(unit_values(&unit, "RestrictAddressFamilies")[0].contains("AF_XDP"));
}

#[test]
fn install_sh_installs_into_a_root_and_keeps_the_configuration() {
    let script = root().join("deploy/install.sh");
    assert!(Command::new("bash").arg("-n").arg(&script).status().unwrap().success());
    let dest = tempfile::tempdir().unwrap();
    let install = |extra: &[&str]| {
        Command::new(&script)
            .args(["--binary", env!("CARGO_BIN_EXE_tapstream"), "--root"])
            .arg(dest.path())
            .args(extra)
            .output()
            .unwrap()
    };
    let out = install(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &str| std::fs::metadata(dest.path().join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("usr/local/bin/tapstream"), 0o755);
    assert_eq!(mode("etc/systemd/system/tapstream.service"), 0o644);
    assert_eq!(mode("etc/tapstream/tapstream.toml"), 0o640);
    for file in [
        "usr/local/share/tapstream/prometheus/prometheus.yml",
        "usr/local/share/tapstream/prometheus/tapstream-alerts.yml",
        "usr/local/share/tapstream/grafana/tapstream-dashboard.json",
        "usr/local/share/tapstream/iam-policy.json",
        "usr/local/share/tapstream/iam-reader-policy.json",
        "usr/local/share/doc/tapstream/tuning.md",
    ] {
        assert!(dest.path().join(file).is_file(), "{file} installed");
    }
    // The installed configuration is valid for the installed binary.
    let check = Command::new(dest.path().join("usr/local/bin/tapstream"))
        .arg("check-config")
        .arg(dest.path().join("etc/tapstream/tapstream.toml"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    // Again: an edited configuration is kept.
    let config = dest.path().join("etc/tapstream/tapstream.toml");
    std::fs::write(&config, "# edited\n").unwrap();
    let out = install(&[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("keeping the existing"));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "# edited\n");

    // A dry run changes nothing; bad arguments are named.
    let fresh = tempfile::tempdir().unwrap();
    let out = Command::new(&script)
        .args(["--binary", env!("CARGO_BIN_EXE_tapstream"), "--dry-run", "--root"])
        .arg(fresh.path())
        .output()
        .unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("would run: install"));
    assert_eq!(std::fs::read_dir(fresh.path()).unwrap().count(), 0);
    let out = Command::new(&script).arg("--frobnicate").output().unwrap();
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("unknown argument --frobnicate")
    );
    let out = Command::new(&script).args(["--binary", "/nonexistent"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tapstream binary at /nonexistent"));
}

#[test]
fn the_tuning_guide_names_only_exported_metrics() {
    let guide = std::fs::read_to_string(root().join("docs/tuning.md")).unwrap();
    let metrics = std::fs::read_to_string(root().join("capture/src/metrics.rs")).unwrap();
    let mut named = 0;
    for word in guide.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("tapstream_") {
            assert!(
                metrics.contains(&format!("\"{word}\"")),
                "docs/tuning.md names {word}, which is not a metric"
            );
            named += 1;
        }
    }
    assert!(named >= 6);
}

#[test]
fn check_config_accepts_the_shipped_file_and_names_a_wrong_field() {
    let ok = Command::new(env!("CARGO_BIN_EXE_tapstream"))
        .arg("check-config")
        .arg(root().join("config/tapstream.toml"))
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[interfaces.public]\ndevice = \"eth1\"\nring_size = 1000\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tapstream")).arg("check-config").arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("interfaces.public.ring_size: 1000 is not a power of two"),
        "{err}"
    );
}

// --- The unit's capabilities, tried: a capture as nobody with exactly those (from the
// deploy-kit helper's measurements) ---

const CAPABILITIES: [&str; 5] = ["CAP_BPF", "CAP_IPC_LOCK", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_PERFMON"];

/// The memlock limit the capability test runs under: 6 MiB, below the default 8 MiB hard
/// limit, which an unprivileged test cannot raise (raising needs CAP_SYS_RESOURCE).
const TEST_MEMLOCK_BYTES: u64 = 6 << 20;
/// `--ring-size` values whose UMEM (ring size / 2 x 4096 bytes) is above and below that limit.
const RING_16_MIB: &str = "8192";
const RING_2_MIB: &str = "1024";

/// Every capability Linux 6.x knows, for dropping all but a few from the bounding set.
const ALL_CAPABILITIES: [&str; 41] = [
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

/// Runs a one-second capture on the capture end of `veth` as user nobody with exactly `caps`
/// (ambient, permitted, effective and bounding set, no new privileges), as systemd runs the
/// unit, under a memlock limit of [`TEST_MEMLOCK_BYTES`], with `filter`. Returns whether it
/// succeeded, and its log. (capsh, from libcap2-bin: Debian 12's setpriv does not know CAP_BPF
/// and CAP_PERFMON.)
fn capture_with(
    veth: &VethPair,
    caps: &[&str],
    ring_size: &str,
    dir: &std::path::Path,
    filter: &[&str],
) -> (bool, String) {
    let keep: Vec<String> = caps.iter().map(|c| c.to_ascii_lowercase()).collect();
    let drop: Vec<String> =
        ALL_CAPABILITIES.iter().map(|c| format!("cap_{c}")).filter(|c| !keep.contains(c)).collect();
    let keep = keep.join(",");
    let mut cmd = veth.capture_ns.command("prlimit");
    cmd.arg(format!("--memlock={TEST_MEMLOCK_BYTES}")).arg("capsh");
    // capsh needs CAP_SETPCAP to shrink the bounding set and CAP_SETUID/SETGID to become
    // nobody; --keep=1 carries the permitted set across the change of user, and none of the
    // three is in it.
    if keep.is_empty() {
        cmd.arg("--caps=cap_setpcap,cap_setuid,cap_setgid+ep");
    } else {
        cmd.arg(format!("--caps={keep}+eip cap_setpcap,cap_setuid,cap_setgid+ep"));
    }
    cmd.arg(format!("--drop={}", drop.join(","))).args(["--keep=1", "--user=nobody"]);
    if !keep.is_empty() {
        cmd.arg(format!("--addamb={keep}"));
    }
    let out = cmd
        .arg("--no-new-privs")
        .arg(concat!("--shell=", env!("CARGO_BIN_EXE_tapstream")))
        .args(["--", "capture", "--iface", &veth.capture_if, "--duration", "1s", "--cores", "0"])
        .args(["--ring-size", ring_size])
        .arg("--write")
        .arg(dir.join("capture.pcap"))
        .args(filter)
        .env("RUST_LOG", "info")
        .output()
        .expect("run prlimit (util-linux) and capsh (libcap2-bin)");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!log.contains("prlimit: failed"), "cannot set the test's memlock limit:\n{log}");
    assert!(!log.contains("capsh") && !log.contains("usage:"), "capsh failed:\n{log}");
    (out.status.success(), log)
}

/// A filter with indexed loads (the port after a variable IPv4 header), so that the generated
/// filter program is verified under the capabilities tried too.
const FILTER: [&str; 3] = ["tcp", "port", "80"];

/// The last line of a log: the error a failed capture ends with.
fn last_line(log: &str) -> &str {
    log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

#[test]
fn a_capture_runs_with_the_units_capabilities_and_needs_each_one() {
    let veth = VethPair::new(1);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();

    // All five, and a UMEM larger than the memlock limit: CAP_IPC_LOCK exempts it.
    let (ok, log) = capture_with(&veth, &CAPABILITIES, RING_16_MIB, dir.path(), &FILTER);
    assert!(ok, "a capture as an unprivileged user with {CAPABILITIES:?} fails:\n{log}");
    assert!(log.contains("attached to"), "the capture attached XDP and bound its socket:\n{log}");
    // No CAP_SYS_NICE: a thread may pin itself.
    assert!(log.contains("pinned to core 0"), "the writer pinned itself without CAP_SYS_NICE:\n{log}");

    // Without any one of them, it fails, and says which one it lacks.
    for missing in CAPABILITIES {
        let fewer: Vec<&str> = CAPABILITIES.into_iter().filter(|c| *c != missing).collect();
        let (ok, log) = capture_with(&veth, &fewer, RING_16_MIB, dir.path(), &FILTER);
        assert!(!ok, "a capture without {missing} succeeds, so the unit need not grant it:\n{log}");
        let error = last_line(&log);
        eprintln!("without {missing}: {error}");
        assert!(
            error.contains(&format!("lacks {missing}")),
            "the error names the missing {missing}: {error}"
        );
        if missing == "CAP_IPC_LOCK" {
            // The UMEM over the limit: by how much, and what to do.
            for words in ["UMEM", "(16 MiB)", "RLIMIT_MEMLOCK = 6 MiB", "LimitMEMLOCK", "--ring-size"] {
                assert!(error.contains(words), "the memlock error says {words:?}: {error}");
            }
        }
    }
    // Without a filter, the XDP program itself is loaded and attached first (as the daemon
    // does); what it lacks is named there too.
    for missing in ["CAP_BPF", "CAP_NET_ADMIN"] {
        let fewer: Vec<&str> = CAPABILITIES.into_iter().filter(|c| *c != missing).collect();
        let (ok, log) = capture_with(&veth, &fewer, RING_16_MIB, dir.path(), &[]);
        let error = last_line(&log);
        eprintln!("without {missing} and a filter: {error}");
        assert!(!ok && error.contains(&format!("lacks {missing}")), "the error names {missing}: {error}");
    }
    // Without CAP_IPC_LOCK only the memlock limit stands in the way: a UMEM below it works,
    // which is what LimitMEMLOCK=infinity gives any size.
    let without_lock: Vec<&str> = CAPABILITIES.into_iter().filter(|c| *c != "CAP_IPC_LOCK").collect();
    let (ok, log) = capture_with(&veth, &without_lock, RING_2_MIB, dir.path(), &FILTER);
    assert!(ok, "without CAP_IPC_LOCK a UMEM under the memlock limit is enough:\n{log}");
}
