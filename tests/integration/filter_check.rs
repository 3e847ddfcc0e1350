//! `tapstream filter check`: libpcap's program and verdicts, as tcpdump gives them.

use std::process::Command;

use crate::common::tapstream_bin;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(tapstream_bin()).args(["filter", "check"]).args(args).output().expect("run tapstream")
}

#[test]
fn verdicts_on_corpus_files_equal_tcpdumps() {
    let dir = tapstream_testenv::corpus_dir();
    let mut compared = 0;
    let mut matched = 0;
    for file in [
        "802.1ad_QinQ.pcap",
        "dns_tcp.pcap",
        "arp-too-long-tha.pcap",
        "ipv6-bad-version.pcap",
        "mpls-traceroute.pcap",
    ] {
        let path = dir.join(file);
        if !path.exists() {
            continue;
        }
        for expression in
            ["udp", "tcp port 53", "arp or (ip and icmp)", "ip6", "mpls and udp", "ether broadcast"]
        {
            let ours = run(&[expression, path.to_str().unwrap()]);
            assert!(ours.status.success(), "{}", String::from_utf8_lossy(&ours.stderr));
            let text = String::from_utf8_lossy(&ours.stdout);
            let count: usize = text
                .lines()
                .find_map(|l| l.split(" of ").next().filter(|_| l.contains(" frames of ")))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("no count in {text}"));
            let tcpdump = Command::new("tcpdump")
                .args(["-n", "-r"])
                .arg(&path)
                .arg(expression)
                .output()
                .expect("run tcpdump");
            let theirs = String::from_utf8_lossy(&tcpdump.stdout).lines().count();
            assert_eq!(count, theirs, "{file}: {expression}");
            compared += 1;
            matched += count;
        }
    }
    assert!(compared >= 20 && matched > 0, "{compared} comparisons, {matched} matches");
}

#[test]
fn a_bad_expression_fails_with_libpcaps_message() {
    let out = run(&["tcp port"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("syntax error") && stderr.contains("\"tcp port\""), "{stderr}");
}

#[test]
fn an_expression_over_the_command_lines_bound_is_refused_before_compiling() {
    let long = vec!["host 10.1.2.3"; 5_000].join(" or ");
    let start = std::time::Instant::now();
    let out = run(&[&long]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("the filter expression is {} bytes", long.len()))
            && stderr.contains("65536 bytes"),
        "{stderr}"
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(30), "refused after {:?}", start.elapsed());
    // The one-shot capture refuses it before anything starts.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(tapstream_bin())
        .args(["capture", "-i", "no-such-if", "-w"])
        .arg(dir.path().join("x.pcap"))
        .arg(&long)
        .output()
        .expect("run tapstream");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("65536 bytes") && !stderr.contains("no-such-if"),
        "{stderr}"
    );
}
