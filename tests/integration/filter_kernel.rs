//! Filters run by the kernel: the generated XDP program, loaded and run with
//! `BPF_PROG_TEST_RUN`, against libpcap's own interpreter on every frame of the corpus.

use tapstream::filter::{CaptureFilter, CbpfProgram, LoadedFilter};

/// Beside the expressions the filter issue lists ([`tapstream_testenv::LISTED_FILTERS`]),
/// more that exercise other parts of libpcap's code generator (indexed loads, arithmetic,
/// VLAN and MPLS offsets, IPv6 headers, lengths).
const MORE_EXPRESSIONS: &[&str] = &[
    "tcp",
    "udp",
    "icmp",
    "arp",
    "ip",
    "ip6",
    "port 53",
    "tcp port 80",
    "not tcp",
    "less 100",
    "ether multicast",
    "ip6 multicast",
    "net 192.168.0.0/16",
    "src net 10.0.0.0/8 or dst net 172.16.0.0/12",
    "ip proto 47",
    "ip6 proto 58",
    "tcp[13] & 2 != 0",
    "ether proto 0x88cc",
    "vlan",
    "mpls",
    "vlan and vlan",
    "pppoes and ip",
    "len > 500",
    "tcp[((tcp[12:1] & 0xf0) >> 2):4] = 0x47455420",
    "ip[2:2] > 1000",
    "ip and ip[8] < 64",
    "icmp6 and ip6[40] == 135",
    "udp and (udp[0:2] = 53 or udp[2:2] = 53)",
    "not (tcp or udp or icmp or arp)",
    "sctp",
    "tcp[tcpflags] & tcp-rst != 0",
    "udp dst port 4789",
    "ip6 and tcp port 443",
    "ip[0] & 0xf > 5",
    "tcp and (ip[2:2] - ((ip[0] & 0xf) << 2) - ((tcp[12] & 0xf0) >> 2)) != 0",
    "icmp[0] / 2 == 4",
    "ip[1] % 4 == 0 and ip",
    "ip[8] * 2 > 100",
    "ip[0] >> 4 == 4",
    "ip6 and ip6[6] == 44",
    "ether src 00:00:00:00:00:00 or ether dst 00:00:00:00:00:01",
    "udp port 67 or udp port 68",
    "(tcp or udp) and portrange 1-1023",
    "vlan and ip6",
];

/// Shortest frame the kernel's test run takes (an Ethernet header; no NIC delivers less).
const MIN_FRAME: usize = 14;
/// Longest frame it hands whole to an XDP program (a page less XDP's headroom and tailroom);
/// longer corpus frames (captures of offloaded super-frames) are cut to this, and libpcap is
/// asked about the same bytes.
const MAX_FRAME: usize = 3_520;

#[test]
fn the_kernel_agrees_with_libpcap_on_every_corpus_frame() {
    let expressions: Vec<&str> =
        tapstream_testenv::LISTED_FILTERS.iter().chain(MORE_EXPRESSIONS).copied().collect();
    assert!(expressions.len() >= 40 && expressions.len() <= capture_common::MAX_CAPTURES);
    let filters: Vec<CbpfProgram> = expressions
        .iter()
        .map(|e| CbpfProgram::compile(e).unwrap_or_else(|err| panic!("{e}: {err}")))
        .collect();
    // One program with every filter, as a busy interface runs it: expression i is slot i.
    let captures: Vec<CaptureFilter<'_>> = filters
        .iter()
        .enumerate()
        .map(|(slot, filter)| CaptureFilter { slot, filter: Some(filter) })
        .collect();
    let program = LoadedFilter::load(&captures).unwrap_or_else(|e| panic!("{e:#}"));

    let frames = tapstream_testenv::corpus_frames();
    let mut tried = 0usize;
    let mut skipped = Vec::new();
    let mut matches = vec![0usize; filters.len()];
    let mut mismatches = Vec::new();
    for frame in &frames {
        if frame.data.len() < MIN_FRAME {
            skipped.push(frame.data.len());
            continue;
        }
        let data = &frame.data[..frame.data.len().min(MAX_FRAME)];
        let run = program
            .test_run(data, 1)
            .unwrap_or_else(|e| panic!("{} frame {}: {e:#}", frame.file.display(), frame.index));
        tried += 1;
        for (i, filter) in filters.iter().enumerate() {
            // The kernel sees the captured bytes: libpcap is asked about the same bytes.
            let theirs = filter.matches(data, data.len() as u32);
            let ours = run.mask & (1 << i) != 0;
            matches[i] += usize::from(theirs);
            if ours != theirs {
                mismatches.push(format!(
                    "{:?} on {} frame {}: kernel {ours}, libpcap {theirs}",
                    expressions[i],
                    frame.file.file_name().unwrap().to_string_lossy(),
                    frame.index
                ));
            }
        }
    }
    eprintln!(
        "{tried} frames x {} expressions; {} frames shorter than {MIN_FRAME} bytes not tried: {skipped:?}",
        filters.len(),
        skipped.len()
    );
    assert!(mismatches.is_empty(), "{} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
    assert!(tried > 3_000 && skipped.len() * 100 < frames.len(), "{tried} tried, {} skipped", skipped.len());
    // The comparison means something: most expressions match some frames and miss others.
    let discriminating = matches.iter().filter(|&&m| m > 0 && m < tried).count();
    assert!(discriminating >= 40, "only {discriminating} expressions split the corpus: {matches:?}");
}

#[test]
fn what_the_kernel_cannot_run_is_refused_with_the_reason() {
    let protochain = CbpfProgram::compile("ip protochain 6").unwrap();
    let err = LoadedFilter::load(&[CaptureFilter { slot: 0, filter: Some(&protochain) }]).err().unwrap();
    let text = format!("{err:#}");
    assert!(text.contains("ip protochain 6") && text.contains("protochain"), "{text}");
}

/// Frames of `sent` that libpcap's interpreter accepts for `expression`, as stored.
fn libpcap_selects(expression: &str, sent: &[&tapstream_testenv::CorpusFrame]) -> Vec<Vec<u8>> {
    let filter = CbpfProgram::compile(expression).unwrap();
    sent.iter().filter(|f| filter.matches(&f.data, f.data.len() as u32)).map(|f| f.data.clone()).collect()
}

/// Three captures with different filters run at once on one interface; each stores exactly
/// the frames of the corpus its filter matches, in order, and nothing else.
#[test]
fn concurrent_captures_each_store_exactly_what_their_filter_matches() {
    use std::{sync::Arc, time::Duration};

    use tapstream::{
        datapath::capture::{CaptureShared, CaptureSpec, Limits},
        datapath::pipeline::{InterfaceConfig, InterfaceRuntime},
        datapath::writer::Output,
    };
    use tapstream_testenv::{Sender, VethPair, corpus_frames};

    let expressions = ["tcp and not port 80", "udp port 53 or arp", "ip6 and not icmp6"];
    let veth = VethPair::new(1);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    let dir = tempfile::tempdir().unwrap();
    let (sent, queues) = veth.capture_ns.enter(|| {
        let mut config = InterfaceConfig::new(&veth.capture_if);
        config.xsk.set_ring_size(tapstream_testenv::CORPUS_RING_SIZE);
        let mut runtime = InterfaceRuntime::start(config).unwrap();
        let captures: Vec<Arc<CaptureShared>> = expressions
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let spec = CaptureSpec {
                    id: format!("c{i}"),
                    filter: Some(tapstream::filter::CbpfProgram::compile(e).unwrap()),
                    ..Default::default()
                };
                CaptureShared::new(spec, Limits::default())
            })
            .collect();
        let slots: Vec<usize> = captures.iter().map(|c| runtime.start_capture(c.clone()).unwrap()).collect();
        let sent = sender.send_all(&frames);

        // Wait until every frame sent has been through XDP and off the rings.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let snap = runtime.snapshot().unwrap();
            let seen: u64 = snap.iter().map(|q| q.xdp.seen).sum();
            let redirected: u64 = snap.iter().map(|q| q.xdp.redirected).sum();
            let taken: u64 = snap.iter().map(|q| q.frames + q.xsk.rx_dropped + q.xsk.rx_ring_full).sum();
            if seen == sent.len() as u64 && taken == redirected {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "frames still in flight: {snap:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        for slot in slots {
            runtime.stop_capture(slot).unwrap();
        }
        // Each capture's chunks, into a PCAP file of its own.
        let mut files: Vec<Vec<u8>> = captures
            .iter()
            .map(|_| {
                tapstream_pcap::FileHeader { snaplen: 262_144, linktype: 1, nanos: true }.encode().to_vec()
            })
            .collect();
        let mut done = 0;
        while done < captures.len() {
            match runtime
                .outputs()
                .recv_timeout(Duration::from_secs(10))
                .expect("writers hand on every capture")
            {
                Output::Chunk(chunk) => {
                    let i = captures.iter().position(|c| Arc::ptr_eq(c, &chunk.capture)).unwrap();
                    files[i].extend_from_slice(&chunk.data);
                    runtime.pool().put(chunk.data);
                }
                Output::Done { .. } => done += 1,
            }
        }
        for (i, file) in files.iter().enumerate() {
            std::fs::write(dir.path().join(format!("c{i}.pcap")), file).unwrap();
        }
        let (queues, _) = runtime.shutdown();
        (sent, queues)
    });

    let drops: u64 = queues
        .iter()
        .map(|q| q.xsk.rx_dropped + q.xsk.rx_ring_full + q.drops_queue_full + q.drops_no_buffer)
        .sum();
    assert_eq!(drops, 0, "no frame lost: {queues:?}");
    let mut wanted_by_any = std::collections::HashSet::new();
    for (i, expression) in expressions.iter().enumerate() {
        let stored: Vec<Vec<u8>> = crate::common::read_capture(&dir.path().join(format!("c{i}.pcap")))
            .into_iter()
            .map(|(_, data)| data)
            .collect();
        let expected = libpcap_selects(expression, &sent);
        assert!(!expected.is_empty(), "the corpus has frames for {expression:?}");
        assert_eq!(stored.len(), expected.len(), "{expression:?}: frames stored vs matched by libpcap");
        assert!(stored == expected, "{expression:?}: the stored frames are the matching frames, in order");
        wanted_by_any.extend(expected);
    }
    // The kernel redirected only frames some capture wanted; it passed the rest on.
    let redirected: u64 = queues.iter().map(|q| q.xdp.redirected).sum();
    let passed: u64 = queues.iter().map(|q| q.xdp.passed).sum();
    let distinct_wanted = sent.iter().filter(|f| wanted_by_any.contains(&f.data)).count() as u64;
    assert_eq!(redirected, distinct_wanted, "frames redirected = frames at least one filter matched");
    assert_eq!(passed, sent.len() as u64 - distinct_wanted, "the others stayed in the kernel");
}

/// The one-shot capture with a filter: only matching frames are stored; a bad filter starts
/// nothing and says what libpcap says.
#[test]
fn a_filtered_capture_stores_only_matching_frames() {
    use tapstream_testenv::{Sender, VethPair, corpus_frames};

    let veth = VethPair::new(1);
    let frames = corpus_frames();
    let sender = Sender::new(&veth);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dns.pcap");
    let expression = "udp port 53 and not vlan";
    let run = crate::common::capture_to_file(
        &veth,
        &out,
        &["--idle", "3s", "udp", "port", "53", "and", "not", "vlan"],
    );
    let sent = sender.send_all(&frames);
    let summary = run.summary();
    let expected = libpcap_selects(expression, &sent);
    let stored: Vec<Vec<u8>> = crate::common::read_capture(&out).into_iter().map(|(_, d)| d).collect();
    assert!(expected.len() > 10, "{} frames of the corpus match", expected.len());
    assert!(stored == expected, "stored {} frames, libpcap matches {}", stored.len(), expected.len());
    assert_eq!(summary.packets, expected.len() as u64);
    let passed: u64 = summary.queues.iter().map(|q| q.xdp_passed).sum();
    assert_eq!(passed, (sent.len() - expected.len()) as u64, "unmatched frames stay in the kernel");

    let bad = std::process::Command::new(crate::common::tapstream_bin())
        .args(["capture", "-i", &veth.capture_if, "-w"])
        .arg(dir.path().join("never.pcap"))
        .args(["--duration", "1s", "tcp", "port"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("syntax error") && stderr.contains("\"tcp port\""), "{stderr}");
    assert!(!stderr.contains("attached"), "nothing started: {stderr}");
    assert!(!dir.path().join("never.pcap").exists());
}
