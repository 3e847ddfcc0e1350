//! Filters run by the kernel: the generated XDP program, loaded and run with
//! `BPF_PROG_TEST_RUN`, against libpcap's own interpreter on every frame of the corpus.

use tapstream::filter::{CaptureFilter, CbpfProgram, LoadedFilter};

/// The expressions first, then more that exercise other parts of libpcap's code
/// generator (indexed loads, arithmetic, VLAN and MPLS offsets, IPv6 headers, lengths).
const EXPRESSIONS: &[&str] = &[
    "tcp port 443 and net 10.0.0.0/8",
    "vlan and udp",
    "ip6 and not icmp6",
    "host 192.168.1.10",
    "udp portrange 1024-65535",
    "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn",
    "icmp[icmptype] == icmp-echo",
    "ip[6:2] & 0x1fff != 0",
    "ip multicast",
    "ether broadcast",
    "vlan 100 and vlan 200",
    "arp or (ip and icmp)",
    "greater 1000",
    "mpls and udp",
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
    assert!(EXPRESSIONS.len() >= 40 && EXPRESSIONS.len() <= capture_common::MAX_CAPTURES);
    let filters: Vec<CbpfProgram> = EXPRESSIONS
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
                    EXPRESSIONS[i],
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
