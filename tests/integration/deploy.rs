//! The deployment kit agrees with the code: the IAM policy grants exactly what the S3 client
//! calls, and Prometheus accepts the scrape config and alert rules.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

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
        // Only `tapstream read` fetches objects; capture hosts need no read access.
        "get_object" => return None,
        other => panic!("the S3 client calls {other}, which the IAM policy test does not know"),
    })
}

#[test]
fn the_iam_policy_grants_exactly_the_calls_the_s3_client_makes() {
    let source = std::fs::read_to_string(root().join("capture/src/upload/s3.rs")).unwrap();
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
    let needed: BTreeSet<&str> = calls.iter().filter_map(|c| iam_action(c)).collect();

    let policy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("deploy/iam-policy.json")).unwrap())
            .unwrap();
    let granted: BTreeSet<&str> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["Action"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()))
        .collect();
    assert_eq!(granted, needed, "IAM actions granted vs needed by {calls:?}");
    for s in policy["Statement"].as_array().unwrap() {
        assert_eq!(s["Effect"], "Allow");
        let resource = s["Resource"].as_str().unwrap();
        assert!(resource.starts_with("arn:aws:s3:::CAPTURE-BUCKET"), "{resource}");
    }
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
