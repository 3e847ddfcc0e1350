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

/// Expressions on the frame's length, which libpcap takes from the wire, not the record.
const LENGTH_EXPRESSIONS: [&str; 4] =
    ["len < 100 and ip", "greater 200", "less 60", "len = 1514 or len > 9000"];

/// Every Ethernet record of the corpus: (file, frame number from 1, bytes, length on the wire).
fn corpus_records() -> Vec<(std::path::PathBuf, usize, Vec<u8>, u32)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(tapstream_testenv::corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pcap"))
        .collect();
    files.sort();
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let Ok(reader) = tapstream_pcap::Reader::new(&bytes) else { continue };
        if reader.header().linktype != tapstream_pcap::LINKTYPE_ETHERNET {
            continue;
        }
        for (i, record) in reader.enumerate() {
            let Ok(record) = record else { break };
            out.push((path.clone(), i + 1, record.data.to_vec(), record.origlen));
        }
    }
    out
}

#[test]
fn records_cut_short_get_libpcaps_verdict_on_their_wire_length() {
    use tapstream::filter::{CaptureFilter, CbpfProgram, LoadedFilter};
    let records = corpus_records();
    let cut: Vec<_> = records.iter().filter(|r| (r.3 as usize) > r.2.len() && r.2.len() >= 14).collect();
    assert!(cut.len() >= 100, "the corpus has {} records cut short", cut.len());
    let filters: Vec<CbpfProgram> =
        LENGTH_EXPRESSIONS.iter().map(|e| CbpfProgram::compile(e).unwrap()).collect();
    let captures: Vec<CaptureFilter<'_>> =
        filters.iter().enumerate().map(|(slot, f)| CaptureFilter { slot, filter: Some(f) }).collect();
    let program = LoadedFilter::load(&captures).unwrap();
    let mut mismatches = Vec::new();
    let mut differs_from_caplen = 0;
    for (path, n, data, wire) in &cut {
        if data.len() > 3_520 {
            continue;
        }
        let run = program.test_run_wire(data, *wire, 1).unwrap();
        for (i, filter) in filters.iter().enumerate() {
            let libpcap = filter.matches(data, *wire);
            differs_from_caplen += usize::from(libpcap != filter.matches(data, data.len() as u32));
            if (run.mask & (1 << i) != 0) != libpcap {
                mismatches.push(format!("{:?}: {} frame {n}", LENGTH_EXPRESSIONS[i], path.display()));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches: {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(10)]
    );
    // The wire length decides: taken from the record, half of these verdicts would be wrong.
    assert!(differs_from_caplen >= 100, "{differs_from_caplen}");

    // And `filter check` says what `tcpdump -r` says on the files that hold such records.
    let mut files: Vec<&std::path::PathBuf> = cut.iter().map(|r| &r.0).collect();
    files.dedup();
    let mut compared = 0;
    for file in &files {
        for expression in LENGTH_EXPRESSIONS {
            let ours = run(&[expression, file.to_str().unwrap()]);
            assert!(ours.status.success(), "{}", String::from_utf8_lossy(&ours.stderr));
            let text = String::from_utf8_lossy(&ours.stdout);
            // "frame N": a match; "frame N not tried: ...": a record XDP cannot see.
            let (mut matched, mut skipped) = (Vec::new(), Vec::new());
            for rest in text.lines().filter_map(|l| l.trim().strip_prefix("frame ")) {
                let (n, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let n: usize = n.parse().unwrap_or_else(|_| panic!("{rest}"));
                if tail.is_empty() { matched.push(n) } else { skipped.push(n) }
            }
            // What tcpdump keeps of the file, record for record, against the records we name.
            let kept = tempfile::NamedTempFile::new().unwrap();
            let tcpdump = Command::new("tcpdump")
                .arg("-r")
                .arg(file)
                .arg("-w")
                .arg(kept.path())
                .arg(expression)
                .output()
                .unwrap();
            assert!(tcpdump.status.success(), "{}", String::from_utf8_lossy(&tcpdump.stderr));
            let in_file: Vec<&Vec<u8>> = records.iter().filter(|r| &r.0 == *file).map(|r| &r.2).collect();
            // libpcap clamps a record longer than the file's snaplen (the corpus has crafted
            // ones, and empty records 'not tried' here): tcpdump's copy is a prefix of the record.
            let same = |ours: &[u8], theirs: &[u8]| ours.starts_with(theirs);
            let skipped: Vec<&Vec<u8>> = skipped.iter().map(|n| in_file[n - 1]).collect();
            let theirs: Vec<Vec<u8>> = tapstream_pcap::Reader::new(&std::fs::read(kept.path()).unwrap())
                .unwrap()
                .map(|r| r.unwrap().data.to_vec())
                .filter(|d| !skipped.iter().any(|s| same(s, d)))
                .collect();
            let ours: Vec<&Vec<u8>> = matched.iter().map(|n| in_file[n - 1]).collect();
            assert!(
                ours.len() == theirs.len() && ours.iter().zip(&theirs).all(|(o, t)| same(o, t)),
                "{expression:?} on {}: we match frames {matched:?}, tcpdump keeps {} records",
                file.display(),
                theirs.len()
            );
            compared += 1;
        }
    }
    assert!(compared >= 8, "{compared}");
}
