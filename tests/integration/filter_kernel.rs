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
    // `inbound` reads the packet type, which only a socket's filter has.
    let inbound = CbpfProgram::compile("inbound").unwrap();
    let err = LoadedFilter::load(&[CaptureFilter { slot: 0, filter: Some(&inbound) }]).err().unwrap();
    let text = tapstream::report::chain(&err);
    assert!(text.contains("inbound") && text.contains("SKF_AD"), "{text}");
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
        let slots: Vec<usize> =
            captures.iter().map(|c| runtime.start_capture(c.clone(), None).unwrap()).collect();
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
                Output::History(_) | Output::HistoryDone { .. } => panic!("no capture here has a lookback"),
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

/// Every form of `protochain` libpcap takes for Ethernet: IPv4, IPv6 or both, by number or by
/// name, for the protocols a chain ends in and for the extension headers themselves.
const PROTOCHAIN: &[&str] = &[
    "ip protochain 6",
    "ip protochain 17",
    "ip protochain 51",
    "ip6 protochain 6",
    "ip6 protochain 17",
    "ip6 protochain 58",
    "ip6 protochain 59",
    "ip6 protochain 0",
    "ip6 protochain 44",
    "ip6 protochain 51",
    "protochain 6",
    "protochain 17",
    "ip6 protochain \\tcp",
    "ip6 protochain \\udp",
    "protochain \\tcp",
    "not ip6 protochain 6",
];

/// IPv6 extension headers the chains are built of: hop-by-hop, destination options, routing,
/// fragment (8 bytes each).
const EXTENSIONS: [u8; 4] = [0, 60, 43, 44];

/// An Ethernet frame: IPv6, then `chain` extension headers of 8 bytes, then `last` (its next
/// header) with 20 bytes of its own.
fn ipv6_chain(chain: &[u8], last: u8) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
    let payload = (chain.len() * 8 + 20) as u16;
    let first = chain.first().copied().unwrap_or(last);
    f.extend_from_slice(&[0x60, 0, 0, 0, (payload >> 8) as u8, payload as u8, first, 64]);
    f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    for (i, _) in chain.iter().enumerate() {
        let next = chain.get(i + 1).copied().unwrap_or(last);
        // Next header, length 0 (8 bytes), then padding.
        f.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    f.extend((0..20u8).map(|b| b.wrapping_mul(7)));
    f
}

/// An Ethernet frame: IPv4 (20 bytes), an AH header of 24 bytes whose next header is
/// `next`, then 20 bytes.
fn ipv4_ah(next: u8) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    f.extend_from_slice(&[0x45, 0, 0, 64, 0, 0, 0, 0, 64, 51, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    f.extend_from_slice(&[next, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]);
    f.extend_from_slice(&[0; 12]);
    f.extend((0..20u8).map(|b| b.wrapping_mul(3)));
    f
}

#[test]
fn protochain_runs_in_the_kernel_with_libpcaps_verdicts() {
    let filters: Vec<CbpfProgram> = PROTOCHAIN
        .iter()
        .map(|e| CbpfProgram::compile(e).unwrap_or_else(|err| panic!("{e}: {err}")))
        .collect();
    let captures: Vec<CaptureFilter<'_>> = filters
        .iter()
        .enumerate()
        .map(|(slot, filter)| CaptureFilter { slot, filter: Some(filter) })
        .collect();
    let program = LoadedFilter::load(&captures).unwrap_or_else(|e| panic!("{e:#}"));
    let bound = tapstream::filter::LOOP_PASSES;

    // (frame, the IPv6 extension headers it was built with).
    let mut frames: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for length in 0..=bound + 3 {
        for last in [6, 17, 58, 59] {
            let chain: Vec<u8> = (0..length).map(|i| EXTENSIONS[(i + length) % EXTENSIONS.len()]).collect();
            frames.push((ipv6_chain(&chain, last), chain));
        }
    }
    // AH (libpcap takes its length as the offset of what follows, not added to where it is).
    for (chain, last) in
        [(&[][..], 51), (&[51][..], 6), (&[51][..], 17), (&[0, 51][..], 6), (&[60, 51][..], 59)]
    {
        frames.push((ipv6_chain(chain, last), chain.to_vec()));
    }
    for next in [6, 17, 59] {
        frames.push((ipv4_ah(next), Vec::new()));
    }
    // Each cut short at every length, as a capture with a small snaplen stores them.
    let whole = frames.clone();
    for (frame, chain) in &whole {
        for len in (MIN_FRAME..frame.len()).step_by(5) {
            frames.push((frame[..len].to_vec(), chain.clone()));
        }
    }
    // And the corpus.
    frames.extend(
        tapstream_testenv::corpus_frames()
            .into_iter()
            .filter(|f| f.data.len() >= MIN_FRAME)
            .map(|f| (f.data[..f.data.len().min(MAX_FRAME)].to_vec(), Vec::new())),
    );

    let (mut beyond, mut agreed, mut matched) = (0usize, 0usize, vec![0usize; filters.len()]);
    let mut mismatches = Vec::new();
    for (frame, chain) in &frames {
        let run = program.test_run(frame, 1).unwrap_or_else(|e| panic!("{e:#}"));
        for (i, filter) in filters.iter().enumerate() {
            let libpcap = filter.matches(frame, frame.len() as u32);
            let kernel = run.mask & (1 << i) != 0;
            // The IPv6 loop takes one pass per extension header until it finds the protocol:
            // one it would find only after more than the bound makes the whole filter not
            // match (documented); libpcap walks on.
            let passes = match target(PROTOCHAIN[i]) {
                Some(_) if PROTOCHAIN[i].contains("ip ") => 0,
                Some(protocol) => chain.iter().position(|&h| h == protocol).unwrap_or(chain.len()),
                None => 0,
            };
            let expected = if passes > bound { false } else { libpcap };
            beyond += usize::from(passes > bound && libpcap);
            if kernel == expected {
                agreed += 1;
                matched[i] += usize::from(kernel);
            } else {
                mismatches.push(format!(
                    "{:?} on a frame of {} bytes, extension headers {chain:?}: kernel {kernel}, libpcap {libpcap}",
                    PROTOCHAIN[i],
                    frame.len()
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(20)].join("\n")
    );
    eprintln!(
        "{} frames x {} expressions agree; {beyond} libpcap matches beyond the bound of {bound} passes are not \
         matches in the kernel, as documented",
        frames.len(),
        filters.len()
    );
    // Long chains do reach the bound (libpcap matches them, the kernel does not), and every
    // expression matches some frames and not others.
    assert!(beyond > 0);
    assert!(matched.iter().all(|&m| m > 0 && m < frames.len()), "{matched:?}");
    assert!(agreed > 10_000, "{agreed}");
}

/// The protocol number a `protochain` expression looks for.
fn target(expression: &str) -> Option<u8> {
    match expression.rsplit(' ').next()? {
        "\\tcp" => Some(6),
        "\\udp" => Some(17),
        number => number.parse().ok(),
    }
}
