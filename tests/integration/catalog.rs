//! The catalog in a real Garage: captures of two nodes listed with `tapstream ls` (also while
//! they run), and read back over the prefix with `tapstream read`, merged, windowed and
//! filtered, against what libpcap (through tcpdump) accepts of the objects read whole; as
//! pcapng too, checked with capinfos and tshark.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use tapstream::store::{
    catalog::{CaptureEnd, Catalog, Manifest, ManifestInterface},
    compress::{Compression, Compressor},
    object::{CompressedChunk, ObjectOwner, UploadConfig, Uploader},
};
use tapstream_testenv::{CORPUS_RING_SIZE, Garage, Netns, Sender, VethPair, corpus_frames, unique_name};

use crate::{
    common::{Running, eventually, tapstream_bin},
    recovery::zstd_d,
    upload::{raw_object, s3_args, sink},
};

/// `tapstream COMMAND ARGS` (with the store's flags, before a filter's words, and credentials)
/// in `ns`: (success, stdout, stderr).
fn tapstream(ns: &Netns, garage: &Garage, args: &[&str]) -> (bool, Vec<u8>, String) {
    let out = ns
        .command(tapstream_bin())
        .arg(args[0])
        .args(s3_args(garage))
        .args(&args[1..])
        .envs(garage.aws_env())
        .output()
        .expect("run tapstream");
    (out.status.success(), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `tapstream ls URL --json ARGS`: the captures listed.
fn ls(ns: &Netns, garage: &Garage, url: &str, args: &[&str]) -> Vec<Manifest> {
    let all: Vec<&str> = ["ls", url, "--json"].into_iter().chain(args.iter().copied()).collect();
    let (ok, stdout, stderr) = tapstream(ns, garage, &all);
    assert!(ok, "tapstream ls {args:?} failed: {stderr}");
    serde_json::from_slice(&stdout).unwrap_or_else(|e| panic!("ls --json is not JSON ({e}): {stderr}"))
}

fn ids(captures: &[Manifest]) -> Vec<String> {
    let mut ids: Vec<String> = captures.iter().map(|m| m.capture_id.clone()).collect();
    ids.sort();
    ids
}

/// The records of a PCAP file (nanosecond timestamps): (time, length on the wire, bytes).
pub(crate) fn records(pcap: &[u8]) -> Vec<(u64, u32, Vec<u8>)> {
    let reader = tapstream_pcap::Reader::new(pcap).expect("a PCAP header");
    assert!(reader.header().nanos, "nanosecond timestamps");
    reader
        .map(|r| r.map(|r| (r.ts_nanos, r.origlen, r.data.to_vec())))
        .collect::<Result<_, _>>()
        .expect("records")
}

/// What libpcap's filter accepts of `pcap`, as tcpdump reads a file (no code under test).
fn tcpdump_filter(pcap: &[u8], filter: &str, dir: &Path) -> Vec<u8> {
    let input = dir.join(format!("{}.pcap", unique_name("in")));
    let output = dir.join(format!("{}.pcap", unique_name("out")));
    std::fs::write(&input, pcap).unwrap();
    let out = Command::new("tcpdump")
        .args(["--time-stamp-precision=nano", "-r"])
        .arg(&input)
        .arg("-w")
        .arg(&output)
        .arg(filter)
        .output()
        .expect("run tcpdump");
    assert!(out.status.success(), "tcpdump: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(&output).unwrap()
}

/// The numbers of "fetched A of B bytes" in the read's summary.
fn fetched(stderr: &str) -> (u64, u64) {
    stderr
        .lines()
        .find_map(|l| l.split("fetched ").nth(1))
        .and_then(|t| {
            let mut w = t.split_whitespace();
            Some((w.next()?.parse().ok()?, w.nth(1)?.parse().ok()?))
        })
        .unwrap_or_else(|| panic!("no fetch statistics in: {stderr}"))
}

/// What `capinfos -k -I` says of a pcapng file: the capture comment, and per interface in
/// order, its fields (`Name`, `Description`, `Filter string`, `Number of packets`, ...).
pub(crate) fn capinfos(file: &Path) -> (String, Vec<BTreeMap<String, String>>) {
    let out = Command::new("capinfos").args(["-k", "-I"]).arg(file).output().expect("run capinfos");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "capinfos: {}{text}", String::from_utf8_lossy(&out.stderr));
    let mut comment = String::new();
    let mut interfaces: Vec<BTreeMap<String, String>> = Vec::new();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix("Capture comment:") {
            comment = c.trim().to_owned();
        } else if line.starts_with("Interface #") {
            interfaces.push(BTreeMap::new());
        } else if let (Some(i), Some((k, v))) = (interfaces.last_mut(), line.split_once(" = ")) {
            i.insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    (comment, interfaces)
}

/// A field of every Interface Statistics Block of a pcapng file, in order, as tshark's dissector
/// of the file format reads it (`dropped`, `delivered_to_user`).
pub(crate) fn interface_statistics(file: &Path, field: &str) -> Vec<u64> {
    let out = Command::new("tshark")
        .args(["-X", "read_format:MIME Files Format", "-r"])
        .arg(file)
        .args(["-T", "fields", "-e", &format!("pcapng.options.option.data.interface.{field}")])
        .output()
        .expect("run tshark");
    assert!(out.status.success(), "tshark: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .split([',', '\n'])
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("not a count: {v:?}")))
        .collect()
}

/// The records of a pcapng file, as editcap converts it to nanosecond PCAP.
pub(crate) fn pcapng_records(file: &Path) -> Vec<(u64, u32, Vec<u8>)> {
    let pcap = file.with_extension("converted.pcap");
    let out =
        Command::new("editcap").args(["-F", "nsecpcap"]).arg(file).arg(&pcap).output().expect("editcap");
    assert!(out.status.success(), "editcap: {}", String::from_utf8_lossy(&out.stderr));
    records(&std::fs::read(&pcap).unwrap())
}

/// The interface name of each frame tshark reads from `pcapng` on its stdin (`tshark -r -`).
fn tshark_interfaces(pcapng: &[u8]) -> Vec<String> {
    let mut tshark = Command::new("tshark")
        .args(["-r", "-", "-T", "fields", "-e", "frame.interface_name"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tshark");
    let mut stdin = tshark.stdin.take().unwrap();
    let input = pcapng.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = tshark.wait_with_output().unwrap();
    writer.join().unwrap().expect("tshark read its input");
    assert!(out.status.success(), "tshark -r -: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

fn secs(ns: u64) -> String {
    format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
}

#[test]
fn three_captures_of_two_nodes_are_listed_and_read_merged_windowed_and_filtered() {
    // Three tapped links on one host's namespace, where the store is too.
    let (a, b, c) = (VethPair::new(1), VethPair::new(1), VethPair::new(1));
    b.move_capture_end(&a.capture_ns);
    c.move_capture_end(&a.capture_ns);
    let ns = &a.capture_ns;
    let garage = Garage::start_in(ns);
    let prefix = unique_name("cat");
    let url = format!("s3://{}/{prefix}", garage.bucket);
    let spool = tempfile::tempdir().unwrap();
    let ring = CORPUS_RING_SIZE.to_string();
    let senders = [Sender::new(&a), Sender::new(&b), Sender::new(&c)];
    let frames: Vec<_> = corpus_frames()
        .into_iter()
        .filter(|f| senders.iter().all(|s| s.can_send(&f.data)))
        .take(3000)
        .collect();
    let count = frames.len().to_string();
    // (capture end, node, id, labels)
    let captures = [
        (
            &a.capture_if,
            "node-a",
            "cap-1",
            ["--customer", "acme", "--alert-id", "A-1", "--tag", "site=ams1", "--request-id", "ticket 9"],
        ),
        (
            &b.capture_if,
            "node-b",
            "cap-2",
            ["--customer", "acme", "--alert-id", "A-2", "--tag", "site=fra1", "--request-id", "R-2"],
        ),
        (
            &c.capture_if,
            "node-a",
            "cap-3",
            ["--customer", "other", "--alert-id", "A-3", "--tag", "site=ams1", "--request-id", "R-3"],
        ),
    ];
    let store_args = s3_args(&garage);
    let mut runs: Vec<Running> = captures
        .iter()
        .map(|(iface, node, id, labels)| {
            let mut args = vec!["capture", "-i", iface, "--upload", &url, "--node", node, "--id", id];
            args.extend(store_args.iter().map(String::as_str));
            args.extend([
                "-c",
                &count,
                "--duration",
                "300s",
                "--json",
                "--ring-size",
                &ring,
                "--rotate-age",
                "2s",
            ]);
            args.extend(["--spool-dir", spool.path().to_str().unwrap()]);
            args.extend(labels);
            let mut run = Running::start_with_env(ns, &args, &garage.aws_env());
            run.wait_ready();
            run
        })
        .collect();

    // Listed before any frame: each capture ends only at its packet count.
    let listed = eventually("three running captures listed", || {
        let l = ls(ns, &garage, &url, &[]);
        (l.len() == 3).then_some(l)
    });
    assert_eq!(ids(&listed), ["cap-1", "cap-2", "cap-3"]);
    assert!(listed.iter().all(|m| m.end_ns.is_none() && m.stop_reason.is_none()), "{listed:#?}");
    let cap1 = listed.iter().find(|m| m.capture_id == "cap-1").unwrap();
    assert_eq!((cap1.node.as_str(), cap1.customer.as_deref()), ("node-a", Some("acme")));
    assert_eq!(cap1.request_id.as_deref(), Some("ticket 9"), "the request's id in the manifest");
    assert_eq!(cap1.interfaces[0].device, a.capture_if);

    // The frames in bursts more than a chunk's flush time apart (so each burst is a zstd frame
    // of its own), each frame to the three links in turn (so their times interleave).
    let bursts = 6;
    let per_burst = frames.len().div_ceil(bursts);
    for (i, burst) in frames.chunks(per_burst).enumerate() {
        for frame in burst {
            for s in &senders {
                s.send_retrying(&frame.data, || format!("frame {}", frame.index));
            }
        }
        if i == 2 {
            // Rotated objects are in the manifest of a capture still running.
            eventually("an object of a running capture in its manifest", || {
                let l = ls(ns, &garage, &url, &["--capture", "cap-1"]);
                l.first().filter(|m| m.end_ns.is_none() && !m.objects.is_empty()).cloned()
            });
        }
        std::thread::sleep(Duration::from_millis(1300));
    }
    let summaries: Vec<_> = runs.drain(..).map(Running::summary).collect();
    for s in &summaries {
        assert_eq!(s.packets, frames.len() as u64, "capture {}", s.id);
    }

    // Ended: the counts, the stop reason, the objects.
    let listed = ls(ns, &garage, &url, &[]);
    assert_eq!(ids(&listed), ["cap-1", "cap-2", "cap-3"]);
    for m in &listed {
        assert!(m.end_ns.is_some(), "{m:#?}");
        assert_eq!(m.stop_reason.as_deref(), Some("packets"));
        assert_eq!(m.frames, frames.len() as u64);
        assert!(m.objects.len() >= 2, "rotated every 2 s: {:#?}", m.objects);
        assert_eq!(m.objects.iter().map(|o| o.frames).sum::<u64>(), frames.len() as u64);
    }
    // Each selector narrows the list.
    for (args, expected) in [
        (vec!["--node", "^node-a$"], vec!["cap-1", "cap-3"]),
        (vec!["--node", "b"], vec!["cap-2"]),
        (vec!["--customer", "acme"], vec!["cap-1", "cap-2"]),
        (vec!["--alert-id", "A-3"], vec!["cap-3"]),
        (vec!["--tag", "site=ams1"], vec!["cap-1", "cap-3"]),
        (vec!["--tag", "site=ams1", "--customer", "acme"], vec!["cap-1"]),
        (vec!["--capture", "cap-2"], vec!["cap-2"]),
        (vec!["--since", "10m"], vec!["cap-1", "cap-2", "cap-3"]),
        (vec!["--until", "2h"], vec![]),
        (vec!["--node", "node-c"], vec![]),
    ] {
        assert_eq!(ids(&ls(ns, &garage, &url, &args)), expected, "ls {args:?}");
    }
    let table = tapstream(ns, &garage, &["ls", &url, "--node", "node-b"]);
    assert!(table.0, "{}", table.2);
    let table = String::from_utf8_lossy(&table.1).into_owned();
    assert!(table.starts_with("NODE") && table.contains("cap-2") && !table.contains("cap-1"), "{table}");

    // The expectation, without the code under test: every object read whole (zstd -d), each
    // filtered by libpcap through tcpdump, the window applied, the union in time order.
    let filter = "tcp or icmp";
    let dir = tempfile::tempdir().unwrap();
    let mut stored = Vec::new();
    let mut accepted = Vec::new();
    // Per capture: node/interface, and what the filter accepts of its frames.
    let mut accepted_by = Vec::new();
    let mut total_bytes = 0u64;
    for m in &listed {
        let mut mine = Vec::new();
        for o in &m.objects {
            let raw = raw_object(ns, &garage, &o.key);
            total_bytes += raw.len() as u64;
            let pcap = zstd_d(&raw);
            stored.extend(records(&pcap));
            mine.extend(records(&tcpdump_filter(&pcap, filter, dir.path())));
        }
        accepted.extend(mine.iter().cloned());
        accepted_by.push((format!("{}/{}", m.node, m.interfaces[0].alias), mine));
    }
    assert_eq!(stored.len(), 3 * frames.len());
    let mut times: Vec<u64> = stored.iter().map(|r| r.0).collect();
    times.sort_unstable();
    // A small window in the middle: a twentieth of the frames.
    let (since, until) = (times[times.len() / 2], times[times.len() / 2 + times.len() / 20]);
    let mut expected: Vec<_> = accepted.into_iter().filter(|r| (since..=until).contains(&r.0)).collect();
    expected.sort();
    let in_window = stored.iter().filter(|r| (since..=until).contains(&r.0)).count();
    assert!(!expected.is_empty() && expected.len() < in_window, "the filter keeps some frames of the window");

    let mut read_args = vec!["read", &url];
    let (since_s, until_s) = (secs(since), secs(until));
    read_args.extend(["--since", &since_s, "--until", &until_s, filter]);
    let (ok, pcap, stderr) = tapstream(ns, &garage, &read_args);
    assert!(ok, "tapstream read failed: {stderr}");
    eprintln!(
        "read {read_args:?}: {stderr}; {} frames expected of {in_window} in the window",
        expected.len()
    );
    let got = records(&pcap);
    assert!(got.windows(2).all(|w| w[0].0 <= w[1].0), "the frames are in timestamp order");
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted.len(), expected.len(), "frames read vs libpcap's over the objects: {stderr}");
    assert!(sorted == expected, "the same frames, byte for byte");
    let (bytes_fetched, object_bytes) = fetched(&stderr);
    assert_eq!(object_bytes, total_bytes, "the objects' size: {stderr}");
    assert!(
        bytes_fetched * 3 < object_bytes,
        "a twentieth of the frames fetched {bytes_fetched} of {object_bytes} bytes: {stderr}"
    );

    // To a file, and piped into tshark.
    let file = dir.path().join("merged.pcap");
    read_args.splice(1..1, ["-w", file.to_str().unwrap()]);
    let (ok, stdout, stderr) = tapstream(ns, &garage, &read_args);
    assert!(ok && stdout.is_empty(), "read -w: {stderr}");
    assert_eq!(std::fs::read(&file).unwrap(), pcap, "-w FILE holds what stdout had");
    let mut read = ns
        .command(tapstream_bin())
        .arg("read")
        .args(s3_args(&garage))
        .args([&url, "--since", &since_s, "--until", &until_s, filter])
        .envs(garage.aws_env())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run tapstream read");
    let tshark = Command::new("tshark")
        .args(["-r", "-", "-T", "fields", "-e", "frame.len"])
        .stdin(Stdio::from(read.stdout.take().unwrap()))
        .output()
        .expect("run tshark");
    assert!(read.wait().unwrap().success());
    assert!(tshark.status.success(), "tshark -r -: {}", String::from_utf8_lossy(&tshark.stderr));
    let lengths: Vec<u32> = String::from_utf8_lossy(&tshark.stdout)
        .lines()
        .map(|l| l.trim().parse().expect("a length"))
        .collect();
    assert_eq!(lengths, got.iter().map(|r| r.1).collect::<Vec<_>>(), "tshark reads every frame, in order");

    // pcapng: the same frames, each on the interface of its node and capture, which says what
    // it is; the section comment names the captures and alerts.
    let ng = dir.path().join("merged.pcapng");
    let ng_args = ["--format", "pcapng", &url, "--since", &since_s, "--until", &until_s, filter];
    let (ok, to_stdout, stderr) = tapstream(ns, &garage, &[&["read", "-w", "-"][..], &ng_args].concat());
    assert!(ok, "read --format pcapng -w -: {stderr}");
    let (ok, _, stderr) =
        tapstream(ns, &garage, &[&["read", "-w", ng.to_str().unwrap()][..], &ng_args].concat());
    assert!(ok, "read --format pcapng -w: {stderr}");
    assert_eq!(std::fs::read(&ng).unwrap(), to_stdout, "-w FILE holds what -w - wrote to stdout");
    assert!(pcapng_records(&ng) == got, "the frames of the PCAP read, in the same order, byte for byte");
    let (comment, interfaces) = capinfos(&ng);
    assert!(comment.starts_with(&format!("tapstream read {url} --since ")), "{comment}");
    for words in [
        "captures cap-1 (node node-a), cap-2 (node node-b), cap-3 (node node-a)",
        "requests ticket 9, R-2, R-3",
        "alerts A-1, A-2, A-3",
    ] {
        assert!(comment.contains(words), "the comment says {words:?}: {comment}");
    }
    let shown: Vec<(String, String, usize)> = interfaces
        .iter()
        .map(|i| (i["Name"].clone(), i["Filter string"].clone(), i["Number of packets"].parse().unwrap()))
        .collect();
    let expected_by: Vec<(String, String, usize)> = accepted_by
        .iter()
        .map(|(name, mine)| {
            (name.clone(), filter.to_owned(), mine.iter().filter(|r| (since..=until).contains(&r.0)).count())
        })
        .collect();
    assert_eq!(shown, expected_by, "one interface per node and interface, with its frames");
    assert_eq!(shown.iter().map(|s| s.2).sum::<usize>(), got.len());
    for (i, m) in interfaces.iter().zip(&listed) {
        assert_eq!(i["Time precision"], "nanoseconds (9)");
        assert!(i["Description"].contains(&format!("capture {}", m.capture_id)), "{i:?}");
    }
    let mut from_stdin = tshark_interfaces(&to_stdout);
    from_stdin.sort();
    from_stdin.dedup();
    let mut names: Vec<String> = shown.iter().filter(|s| s.2 > 0).map(|s| s.0.clone()).collect();
    names.sort();
    assert_eq!(from_stdin, names, "tshark -r - reads the interfaces' frames");
    let drops: Vec<u64> = listed.iter().map(|m| m.drops.expect("ended")).collect();
    assert_eq!(interface_statistics(&ng, "dropped"), drops, "each capture's drops");
    let delivered: Vec<u64> = shown.iter().map(|s| s.2 as u64).collect();
    assert_eq!(interface_statistics(&ng, "delivered_to_user"), delivered);

    let (ok, _, stderr) = tapstream(ns, &garage, &["read", "--format", "pcap-ng", &url]);
    assert!(!ok && stderr.contains("possible values: pcap, pcapng"), "{stderr}");
}

#[test]
fn bad_input_is_named() {
    let ns = Netns::new("tscat");
    let garage = Garage::start_in(&ns);
    let prefix = unique_name("cat");
    let url = format!("s3://{}/{prefix}", garage.bucket);
    let fails = |args: &[&str], needle: &str| {
        let (ok, stdout, stderr) = tapstream(&ns, &garage, args);
        assert!(!ok && stdout.is_empty(), "tapstream {args:?} should fail: {stderr}");
        assert!(stderr.contains(needle), "tapstream {args:?}: expected {needle:?} in: {stderr}");
    };
    let window = ["--since", "2026-12-02T10:00:00Z", "--until", "2026-12-02T09:00:00Z"];
    for command in ["ls", "read"] {
        let args: Vec<&str> = [command, &url].into_iter().chain(window).collect();
        fails(
            &args,
            "--since 2026-12-02T10:00:00Z is after --until 2026-12-02T09:00:00Z: the window is empty",
        );
        fails(&[command, &url], "nothing is stored under");
    }
    fails(&["read", &url, "tcp", "port"], "syntax error");
    fails(&["read", &url, "--capture", "x", "host", "10.1.2.300"], "invalid filter");
    fails(&["ls", &url, "--node", "("], "is not a regular expression");
    // An object written before the catalog (with its index, no manifest): ls names it, read
    // reads it through its index.
    let stored: Vec<(u64, Vec<u8>)> =
        (0..50u64).map(|i| (1_795_000_000_000_000_000 + i * 1_000, vec![i as u8; 60])).collect();
    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let owner = ObjectOwner {
                prefix: prefix.clone(),
                node: "old-node".into(),
                capture: "c1".into(),
                ..Default::default()
            };
            let header = tapstream_pcap::FileHeader { snaplen: 262_144, linktype: 1, nanos: true }.encode();
            let mut up = Uploader::new(
                std::sync::Arc::new(sink(&garage).await),
                UploadConfig::default(),
                owner,
                &header,
                std::sync::Arc::new(tokio::sync::Semaphore::new(4)),
            )
            .unwrap();
            let mut compressor = Compressor::new(Compression::default()).unwrap();
            for chunk in stored.chunks(10) {
                let mut raw = Vec::new();
                for (ts, data) in chunk {
                    let len = data.len() as u32;
                    let (ts_sec, ts_frac) = ((ts / 1_000_000_000) as u32, (ts % 1_000_000_000) as u32);
                    raw.extend(
                        tapstream_pcap::RecordHeader { ts_sec, ts_frac, caplen: len, origlen: len }.encode(),
                    );
                    raw.extend(data);
                }
                up.push(CompressedChunk {
                    data: compressor.frame(&raw).unwrap(),
                    decompressed_len: raw.len() as u64,
                    first_ns: chunk[0].0,
                    last_ns: chunk[chunk.len() - 1].0,
                    packets: chunk.len() as u64,
                })
                .await
                .unwrap();
            }
            up.finish().await.unwrap();
        })
    });
    fails(&["ls", &url], "holds objects but no catalog");
    fails(&["read", &url, "--node", "old-node"], "has no catalog");
    let (ok, pcap, stderr) = tapstream(&ns, &garage, &["read", &url, "--since", &secs(stored[20].0)]);
    assert!(ok, "read of objects without a catalog: {stderr}");
    assert!(
        stderr.contains("has no catalog") && stderr.contains("reading its 1 objects with an index"),
        "{stderr}"
    );
    let got: Vec<(u64, Vec<u8>)> = records(&pcap).into_iter().map(|(t, _, d)| (t, d)).collect();
    assert_eq!(got, stored[20..], "the frames from the window on, through the index");
}

#[test]
fn a_local_directory_store_has_a_catalog_too() {
    let veth = VethPair::new(1);
    let store = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let sender = Sender::new(&veth);
    let frames: Vec<_> = corpus_frames().into_iter().filter(|f| sender.can_send(&f.data)).take(500).collect();
    let count = frames.len().to_string();
    let dir = store.path().to_str().unwrap();
    let args = [
        "capture",
        "-i",
        &veth.capture_if,
        "--upload",
        dir,
        "--node",
        "local-node",
        "--id",
        "loc-1",
        "-c",
        &count,
        "--duration",
        "300s",
        "--json",
        "--spool-dir",
        spool.path().to_str().unwrap(),
        "--tag",
        "site=lab",
    ];
    let mut run = Running::start(&veth.capture_ns, &args);
    run.wait_ready();
    let sent = sender.send_all(&frames);
    let summary = run.summary();
    assert_eq!(summary.packets, sent.len() as u64);

    let run_here = |args: &[&str]| {
        let out = veth.capture_ns.command(tapstream_bin()).args(args).output().expect("run tapstream");
        assert!(out.status.success(), "tapstream {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let listed: Vec<Manifest> =
        serde_json::from_slice(&run_here(&["ls", dir, "--json", "--tag", "site=lab"])).unwrap();
    assert_eq!(ids(&listed), ["loc-1"]);
    let m = &listed[0];
    assert_eq!(
        (m.node.as_str(), m.frames, m.stop_reason.as_deref()),
        ("local-node", sent.len() as u64, Some("packets"))
    );
    let keys: Vec<String> = crate::common::walk(store.path())
        .iter()
        .map(|p| p.strip_prefix(store.path()).unwrap().display().to_string())
        .filter(|k| k.starts_with("catalog/"))
        .collect();
    let first = format!("catalog/{}/local-node/loc-1.json", tapstream::store::catalog::utc_day(m.start_ns));
    assert!(keys.contains(&first), "the manifest under the day it started: {keys:?}");
    assert!(keys.iter().all(|k| k.ends_with("/local-node/loc-1.json")), "{keys:?}");
    let none: Vec<Manifest> =
        serde_json::from_slice(&run_here(&["ls", dir, "--json", "--tag", "site=elsewhere"])).unwrap();
    assert!(none.is_empty());

    // Every frame, as sent, through the catalog and the index.
    let pcap = run_here(&["read", dir]);
    let got: Vec<Vec<u8>> = records(&pcap).into_iter().map(|(_, _, d)| d).collect();
    assert_eq!(got, sent.iter().map(|f| f.data.clone()).collect::<Vec<_>>());
}

#[test]
fn a_daemons_capture_over_two_interfaces_has_one_manifest_with_both() {
    let (east, west, daemon) = crate::interfaces::two_links();
    let store = daemon.dir.path().join("store");
    let store = store.to_str().unwrap();
    let ls_json = |args: &[&str]| -> Vec<Manifest> {
        let out = east
            .capture_ns
            .command(tapstream_bin())
            .args(["ls", store, "--json"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ls: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let id = daemon.start_capture(&[
        "-i",
        "tap",
        "-i",
        "west",
        "-c",
        "60",
        "--duration",
        "60s",
        "--customer",
        "acme",
    ]);
    // Both interfaces' outputs write the manifest when they start: one capture, running.
    let running = eventually("the running capture listed", || {
        let l = ls_json(&["--customer", "acme"]);
        (l.len() == 1).then(|| l[0].clone())
    });
    assert_eq!(running.capture_id, id);
    assert_eq!(running.end_ns, None);
    let aliases: Vec<&str> = running.interfaces.iter().map(|i| i.alias.as_str()).collect();
    assert_eq!(aliases, ["tap", "west"]);

    let sent_east = crate::daemon::data(&Sender::new(&east).send_all(&crate::daemon::sendable(&east)[..30]));
    let sent_west =
        crate::daemon::data(&Sender::new(&west).send_all(&crate::daemon::sendable(&west)[100..130]));
    let info = daemon.wait(&id);
    let summary = info.summary.as_ref().unwrap();
    assert_eq!(summary.packets, 60);

    // Ended: written last by the daemon, with the summary's counts and both interfaces' objects.
    let ended = ls_json(&["--capture", &id]);
    assert_eq!(ended.len(), 1);
    let m = &ended[0];
    assert_eq!(
        (m.frames, m.stop_reason.as_deref(), m.node.as_str()),
        (60, Some("packets"), daemon.node.as_str())
    );
    assert!(m.end_ns.is_some() && m.drops == Some(0) && m.bytes == Some(summary.bytes), "{m:#?}");
    let mut parts: Vec<&str> = m.objects.iter().filter_map(|o| o.interface.as_deref()).collect();
    parts.sort_unstable();
    parts.dedup();
    assert_eq!(parts, ["tap", "west"], "{:#?}", m.objects);
    assert_eq!(m.objects.len(), summary.outputs.len());

    // Read over the store: both links' frames, merged in time order.
    let out =
        east.capture_ns.command(tapstream_bin()).args(["read", store, "--capture", &id]).output().unwrap();
    assert!(out.status.success(), "read: {}", String::from_utf8_lossy(&out.stderr));
    let got = records(&out.stdout);
    assert!(got.windows(2).all(|w| w[0].0 <= w[1].0), "in timestamp order");
    let mut got: Vec<Vec<u8>> = got.into_iter().map(|(_, _, d)| d).collect();
    let mut sent: Vec<Vec<u8>> = sent_east.into_iter().chain(sent_west).collect();
    got.sort();
    sent.sort();
    assert!(got == sent, "every frame of both links, once");
}

#[test]
fn a_capture_a_killed_daemon_interrupted_is_listed_as_interrupted_once_recovered() {
    let veth = VethPair::new(1);
    let mut daemon = crate::daemon::TestDaemon::start(&veth, "");
    let store = daemon.dir.path().join("store");
    let store = store.to_str().unwrap().to_owned();
    let ls_json = |args: &[&str]| -> Vec<Manifest> {
        let out = veth
            .capture_ns
            .command(tapstream_bin())
            .args(["ls", &store, "--json"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ls: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let id = daemon.start_capture(&["-i", "tap", "--duration", "300s"]);
    let sent = Sender::new(&veth).send_all(&crate::daemon::sendable(&veth)[..40]).len() as u64;
    // Objects are finished every second: one is in the manifest of the running capture.
    eventually("an object in the running capture's manifest", || {
        let l = ls_json(&["--capture", &id]);
        l.first()
            .filter(|m| m.end_ns.is_none() && m.objects.iter().map(|o| o.frames).sum::<u64>() == sent)
            .cloned()
    });
    let (_, log) = daemon.running.take().expect("running").signal_and_wait(libc::SIGKILL);
    eprintln!("first daemon:\n{log}");
    assert!(ls_json(&["--capture", &id])[0].end_ns.is_none(), "a dead daemon's capture looks running");

    daemon.restart(&veth);
    let m = eventually("the recovered capture listed as interrupted", || {
        let l = ls_json(&["--capture", &id]);
        l.first().filter(|m| m.end_ns.is_some()).cloned()
    });
    assert_eq!(m.stop_reason.as_deref(), Some("interrupted"), "{m:#?}");
    let info = daemon.client().status(&id).unwrap();
    let summary = info.summary.as_ref().expect("a summary");
    assert_eq!(m.objects.len(), summary.outputs.len(), "{m:#?} vs {summary:?}");
    assert_eq!(m.frames, sent);
    // Read through the catalog, the recovered objects' times from their indexes.
    let out =
        veth.capture_ns.command(tapstream_bin()).args(["read", &store, "--capture", &id]).output().unwrap();
    assert!(out.status.success(), "read: {}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<Vec<u8>> = records(&out.stdout).into_iter().map(|(_, _, d)| d).collect();
    assert_eq!(got.len() as u64, sent);
    assert!(got == daemon.stored(&id), "the frames of its objects");
}

/// Stores `frames` as one capture's objects under `prefix` of `sink`, with its manifest in
/// the catalog (if `catalogued`: else as before the catalog existed), ended with `drops`
/// frames dropped.
pub(crate) async fn store_capture<S: tapstream::store::Sink + 'static>(
    sink: std::sync::Arc<S>,
    prefix: &str,
    manifest: Manifest,
    frames: &[(u64, Vec<u8>)],
    drops: u64,
    catalogued: bool,
) {
    let catalog = Catalog::new(manifest.clone());
    let owner = ObjectOwner {
        prefix: prefix.to_owned(),
        node: manifest.node.clone(),
        capture: manifest.capture_id.clone(),
        catalog: catalogued.then(|| catalog.clone()),
        ..Default::default()
    };
    let header = tapstream_pcap::FileHeader { snaplen: 262_144, linktype: 1, nanos: true }.encode();
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
    let mut up = Uploader::new(sink.clone(), UploadConfig::default(), owner, &header, permits).unwrap();
    let mut compressor = Compressor::new(Compression::default()).unwrap();
    for chunk in frames.chunks(10) {
        let mut raw = Vec::new();
        for (ts, data) in chunk {
            let len = data.len() as u32;
            let (ts_sec, ts_frac) = ((ts / 1_000_000_000) as u32, (ts % 1_000_000_000) as u32);
            raw.extend(tapstream_pcap::RecordHeader { ts_sec, ts_frac, caplen: len, origlen: len }.encode());
            raw.extend(data);
        }
        up.push(CompressedChunk {
            data: compressor.frame(&raw).unwrap(),
            decompressed_len: raw.len() as u64,
            first_ns: chunk[0].0,
            last_ns: chunk[chunk.len() - 1].0,
            packets: chunk.len() as u64,
        })
        .await
        .unwrap();
    }
    up.finish().await.unwrap();
    if !catalogued {
        return;
    }
    catalog.end(CaptureEnd {
        end_ns: frames.last().unwrap().0 + 1,
        frames: frames.len() as u64,
        drops,
        stop_reason: "packets".into(),
        ..CaptureEnd::default()
    });
    catalog.write(&*sink, prefix, Duration::from_secs(10)).await.unwrap();
}

#[test]
fn a_pcapng_read_says_each_captures_filter_and_drops() {
    let store = tempfile::tempdir().unwrap();
    let t0 = 1_795_000_000_000_000_000u64;
    let capture = |id: &str, node: &str, device: &str, filter: Option<&str>| Manifest {
        capture_id: id.into(),
        node: node.into(),
        interfaces: vec![ManifestInterface { alias: device.into(), device: device.into() }],
        filter: filter.map(Into::into),
        snaplen: 1500,
        start_ns: t0,
        alert_id: Some("4711".into()),
        ..Manifest::default()
    };
    // Two captures, their frames interleaved in time.
    let frames = |offset: u64, byte: u8| -> Vec<(u64, Vec<u8>)> {
        (0..40u64).map(|i| (t0 + i * 1_000 + offset, vec![byte; 60 + i as usize % 4])).collect()
    };
    let (one, two) = (frames(0, 1), frames(500, 2));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let sink = std::sync::Arc::new(tapstream::store::dir::DirSink::new(store.path()).unwrap());
        store_capture(sink.clone(), "caps", capture("c1", "tap-1", "eth0", Some("udp")), &one, 17, true)
            .await;
        store_capture(sink, "caps", capture("c2", "tap-2", "eth1", None), &two, 0, true).await;
    });
    let file = store.path().join("alert.pcapng");
    let out = Command::new(tapstream_bin())
        .args(["read", "--dir"])
        .arg(store.path())
        .args(["caps", "--alert-id", "4711", "--format", "pcapng", "-w"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "read: {}", String::from_utf8_lossy(&out.stderr));

    let (comment, interfaces) = capinfos(&file);
    assert_eq!(
        comment,
        "tapstream read caps --alert-id 4711; captures c1 (node tap-1), c2 (node tap-2); alerts 4711"
    );
    let names: Vec<&str> = interfaces.iter().map(|i| i["Name"].as_str()).collect();
    assert_eq!(names, ["tap-1/eth0", "tap-2/eth1"]);
    assert_eq!(interfaces[0].get("Filter string").map(String::as_str), Some("udp"));
    assert_eq!(interfaces[1].get("Filter string"), None, "no filter: every frame");
    assert_eq!(interfaces[0]["Capture length"], "1500");
    for i in &interfaces {
        assert_eq!(i["Number of packets"], "40");
        assert_eq!(i["Number of stat entries"], "1");
    }
    assert_eq!(interface_statistics(&file, "dropped"), [17, 0]);
    assert_eq!(interface_statistics(&file, "delivered_to_user"), [40, 40]);
    let mut expected: Vec<(u64, u32, Vec<u8>)> =
        one.iter().chain(&two).map(|(t, d)| (*t, d.len() as u32, d.clone())).collect();
    expected.sort();
    assert!(pcapng_records(&file) == expected, "every frame of both, in time order");
    let interface_of: Vec<String> = tshark_interfaces(&std::fs::read(&file).unwrap());
    assert_eq!(interface_of[..2], ["tap-1/eth0", "tap-2/eth1"], "each frame on its capture's interface");
}
