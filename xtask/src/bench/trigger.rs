//! `cargo xtask bench trigger`: how fast a capture starts when a fleet request asks for it, and
//! how many requests one daemon decides per second.
//!
//! A real `redis-server` (on a Unix socket) and one release-built daemon in the capture
//! namespace of a veth pair, configured with `[fleet.redis]`, a local-directory store and
//! `compression = "none"`.
//!
//! Trigger latency: requests one after another, request i for a capture of `packets = 1`
//! with the filter `udp dst port P_i` (a port of its own). A sender thread sends request i's
//! probe frame (UDP to P_i) into the veth every millisecond from just before the request is
//! published until its capture has finished; each probe carries its CLOCK_REALTIME send time,
//! its number, and the send time of the probe before it. The capture stores the first probe
//! the XDP program marked for it. Reading that frame back from the stored PCAP gives:
//! - "first frame": its send time minus the publish time (the CLOCK_REALTIME taken just
//!   before the XADD of the request), both taken in this process. The capture's filter was
//!   live in the kernel at some moment after the previous probe was sent and before this one
//!   arrived: the figure overstates the start by less than one probe interval (also reported:
//!   the gap to the probe before, whose send time is the lower bound);
//! - beside it, the PCAP timestamp (the kernel's receive time, taken in XDP) minus its send
//!   time: the veth's delivery plus the clock conversion, a check that both clocks agree.
//!
//! `accepted` and `started` are timed when a reader blocked in `XREAD` on the events stream
//! receives them: the events' own `time` field has a resolution of one second.
//!
//! The peer in the same run: the same captures asked through the daemon's control API (a
//! `POST /v1/captures` on its Unix socket), timed the same way from just before the request
//! is written; the difference is what the broker path adds.
//!
//! Requests per second: `--burst` requests published in one pipeline, first requests the
//! daemon accepts (a capture of 1 s with a filter for a port no traffic uses), then requests
//! refused for a cap (`packets` above `limits.max_packets`); from just before the pipeline is
//! written until the reader has seen the last `accepted` or `refused` event.

use std::{
    path::Path,
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tapstream_testenv::{Redis, Sender, VethPair};

const REQUESTS: &str = "tapstream:requests";
const EVENTS: &str = "tapstream:events";
const NODE: &str = "bench";
/// The daemon's `limits.max_concurrent_captures`: the most one interface allows.
const MAX_CONCURRENT: usize = 64;
/// The daemon's `limits.max_packets`; the refused burst asks one more.
const MAX_PACKETS: u64 = 100_000;
/// Probe ports: request i of the latency run uses `LATENCY_PORT + i`, request j of a burst
/// `BURST_PORT + j` (no probe is sent there).
const LATENCY_PORT: u32 = 20_000;
const BURST_PORT: u32 = 50_000;
/// Request i asked through the control API uses `API_PORT + i`.
const API_PORT: u32 = 35_000;
/// How often a probe is sent.
const PROBE_EVERY: Duration = Duration::from_millis(1);
const PROBE_MAGIC: &[u8; 8] = b"tsprobe1";
/// How long one request may take to be decided and its capture to end.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of `bench trigger`.
pub struct TriggerBench {
    /// Requests of the latency run, one after another.
    pub requests: usize,
    /// Requests published at once in each throughput run.
    pub burst: usize,
}

/// CLOCK_REALTIME now, in ns since the Unix epoch.
fn realtime_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// One event, as the reader received it.
struct Seen {
    /// When the reader's XREAD returned it (CLOCK_REALTIME ns).
    at_ns: u64,
    event: Value,
}

/// The figures of one latency request, in ns.
struct Latency {
    accepted: u64,
    started: u64,
    first_frame: u64,
    /// Send time of the probe before the stored one minus the publish time (0 if the stored
    /// probe was the first): the start happened after this.
    lower_bound: i64,
    /// The stored probe's PCAP timestamp minus its send time.
    delivery: i64,
}

pub fn trigger(root: &Path, opts: &TriggerBench) -> anyhow::Result<()> {
    anyhow::ensure!(opts.requests >= 1, "--requests must be at least 1");
    anyhow::ensure!(
        opts.requests <= (API_PORT - LATENCY_PORT) as usize && opts.burst <= (65_535 - BURST_PORT) as usize,
        "at most {} requests and {} per burst",
        API_PORT - LATENCY_PORT,
        65_535 - BURST_PORT
    );
    crate::cargo(root, None, &["build", "--release", "--package", "tapstream"])?;
    let bin = root.join("target/release/tapstream");
    let work = super::tempdir()?;
    let result = run(&bin, &work, opts);
    std::fs::remove_dir_all(&work).ok();
    result
}

fn run(bin: &Path, work: &Path, opts: &TriggerBench) -> anyhow::Result<()> {
    // Dropped in reverse order: the daemon first (SIGTERM, waited for), then redis-server
    // (killed), then the namespaces.
    let veth = VethPair::new(1);
    let redis = Redis::start();
    let d = work.display();
    let config = work.join("tapstream.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = \"{d}/control.sock\"\nstate_dir = \"{d}/state\"\nnode = \"{NODE}\"\n\
             [interfaces.tap]\ndevice = \"{}\"\n\
             [limits]\nmax_duration_secs = 600\nmax_packets = {MAX_PACKETS}\nmax_concurrent_captures = {MAX_CONCURRENT}\n\
             [store]\ndestinations = [\"{d}/store\"]\ncompression = \"none\"\nspool_dir = \"{d}/spool\"\n\
             [fleet.redis]\nurl = \"{}\"\n",
            veth.capture_if,
            redis.url()
        ),
    )?;
    let mut child = veth
        .capture_ns
        .command(bin)
        .args(["daemon", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .context("start the daemon")?;
    let log = super::wait_ready(&mut child, "the daemon", &["daemon ready"], false)?;
    let daemon = crate::KillOnDrop(child);

    let client = redis::Client::open(redis.url()).context("redis client")?;
    let mut con = client.get_connection().context("connect to redis-server")?;
    wait_for_group(&mut con)?;

    let mut reader_con = client.get_connection().context("connect to redis-server")?;
    let port = AtomicU32::new(0);
    let stop = AtomicBool::new(false);
    let sender = Sender::new(&veth);
    let (events_tx, events) = mpsc::channel();
    let (sender, port, stop) = (&sender, &port, &stop);
    let outcome = std::thread::scope(|scope| {
        let probes = scope.spawn(move || send_probes(sender, port, stop));
        // Owns the channel's sending end: a reader that fails ends the waits at once.
        let reader = scope.spawn(move || read_events(&mut reader_con, &events_tx, stop));
        let result = measure(&mut con, &events, port, &work.join("control.sock"), opts);
        stop.store(true, Ordering::Relaxed);
        let _ = probes.join();
        let read = reader.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the event reader panicked")));
        let result = result?;
        read?;
        Ok::<_, anyhow::Error>(result)
    });
    drop(daemon);
    let log = log.join().unwrap_or_default();
    let (fleet, api, bursts) = outcome.with_context(|| format!("the daemon's log:\n{log}"))?;
    report(&fleet, &api, &bursts, opts);
    drop(redis);
    drop(veth);
    Ok(())
}

/// Waits until the daemon has made its consumer group: from then on it reads every request.
fn wait_for_group(con: &mut redis::Connection) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let group = format!("tapstream-{NODE}");
    loop {
        let reply: Result<redis::streams::StreamInfoGroupsReply, _> =
            redis::cmd("XINFO").arg("GROUPS").arg(REQUESTS).query(con);
        if reply.is_ok_and(|r| r.groups.iter().any(|g| g.name == group)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the daemon made no consumer group {group} on {REQUESTS} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends the probe of the port in `port` (none while it is 0) every [`PROBE_EVERY`] until
/// `stop`. Numbers and the previous send time start again with each new port.
fn send_probes(sender: &Sender, port: &AtomicU32, stop: &AtomicBool) {
    let mut current = 0;
    let mut seq = 0;
    let mut prev_ns = 0;
    while !stop.load(Ordering::Relaxed) {
        // Relaxed: the port is the only thing shared, and a probe a moment late is harmless.
        let p = port.load(Ordering::Relaxed);
        if p != current {
            (current, seq, prev_ns) = (p, 0, 0);
        }
        if p != 0 {
            let now = realtime_ns();
            // A full queue loses this probe; the next comes a millisecond later.
            let _ = sender.send(&probe_frame(p as u16, seq, now, prev_ns));
            (seq, prev_ns) = (seq + 1, now);
        }
        std::thread::sleep(PROBE_EVERY);
    }
}

/// A probe: UDP from 10.98.0.1 port 9 to 10.98.0.2 port `port`, its payload the magic, `seq`,
/// its send time and the previous probe's (ns, big-endian).
fn probe_frame(port: u16, seq: u64, sent_ns: u64, prev_ns: u64) -> Vec<u8> {
    let mut payload = PROBE_MAGIC.to_vec();
    for v in [seq, sent_ns, prev_ns] {
        payload.extend_from_slice(&v.to_be_bytes());
    }
    let udp_len = 8 + payload.len() as u16;
    let ip_len = 20 + udp_len;
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00];
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 98, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 98, 0, 2]);
    let sum = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!(((folded & 0xffff) + (folded >> 16)) as u16)).to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&9u16.to_be_bytes());
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&payload);
    frame
}

/// A probe's (destination port, seq, send time, previous send time), if `frame` is one.
fn parse_probe(frame: &[u8]) -> Option<(u16, u64, u64, u64)> {
    let port = u16::from_be_bytes(frame.get(36..38)?.try_into().ok()?);
    let payload = frame.get(42..)?.strip_prefix(PROBE_MAGIC.as_slice())?;
    let word = |i: usize| Some(u64::from_be_bytes(payload.get(8 * i..8 * i + 8)?.try_into().ok()?));
    Some((port, word(0)?, word(1)?, word(2)?))
}

/// Reads the events stream from its start, handing on each event with the time it arrived,
/// until `stop` (checked at least every 100 ms).
fn read_events(
    con: &mut redis::Connection,
    out: &mpsc::Sender<Seen>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let mut last = "0-0".to_owned();
    while !stop.load(Ordering::Relaxed) {
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(EVENTS)
            .arg(&last)
            .query(con)
            .context("XREAD the events")?;
        let at_ns = realtime_ns();
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            let json: String =
                entry.get("json").with_context(|| format!("event {} has no json", entry.id))?;
            let event = serde_json::from_str(&json).with_context(|| format!("event {}: {json}", entry.id))?;
            last = entry.id;
            if out.send(Seen { at_ns, event }).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// What one burst gave.
struct Burst {
    what: &'static str,
    published: usize,
    accepted: usize,
    refused: usize,
    /// Refusal codes and how many.
    codes: std::collections::BTreeMap<String, usize>,
    /// From just before the pipeline of XADDs to the last decision seen.
    secs: f64,
}

fn measure(
    con: &mut redis::Connection,
    events: &mpsc::Receiver<Seen>,
    port: &AtomicU32,
    socket: &Path,
    opts: &TriggerBench,
) -> anyhow::Result<(Vec<Latency>, Vec<Latency>, Vec<Burst>)> {
    let not_after = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    let mut fleet = Vec::new();
    for i in 0..opts.requests {
        let p = LATENCY_PORT + i as u32;
        let id = format!("lat-{i}");
        let body = json!({
            "id": id, "not_after": not_after, "target": {"node": NODE},
            "capture": {"filter": format!("udp dst port {p}"), "packets": 1, "duration_secs": 30}
        })
        .to_string();
        port.store(p, Ordering::Relaxed);
        let published = realtime_ns();
        let _: String = redis::cmd("XADD").arg(REQUESTS).arg("*").arg("request").arg(&body).query(con)?;
        let (mut accepted, mut started) = (None, None);
        let finished = loop {
            let seen = next_event(events, &id)?;
            match seen.event["event"].as_str() {
                Some("accepted") => accepted = Some(seen.at_ns),
                Some("started") => started = Some(seen.at_ns),
                Some("finished") => break seen.event,
                _ => bail!("request {id}: {}", seen.event),
            }
        };
        port.store(0, Ordering::Relaxed);
        let (accepted, started) = (
            accepted.context("no accepted event before finished")?,
            started.context("no started event before finished")?,
        );
        let output = finished["outputs"][0].as_str().with_context(|| format!("no output: {finished}"))?;
        fleet.push(first_frame(output, p, published, accepted, started)?);
    }
    // The same captures asked through the control API (its Unix socket), for comparison: the
    // reply comes once the capture runs.
    let mut api = Vec::new();
    for i in 0..opts.requests {
        let p = API_PORT + i as u32;
        let id = format!("api-{i}");
        let body =
            json!({"id": id, "filter": format!("udp dst port {p}"), "packets": 1, "duration_secs": 30});
        port.store(p, Ordering::Relaxed);
        let asked = realtime_ns();
        api_call(socket, "POST", "/v1/captures", Some(&body.to_string()))?;
        let replied = realtime_ns();
        let info = api_call(socket, "GET", &format!("/v1/captures/{id}/wait?timeout_secs=60"), None)?;
        port.store(0, Ordering::Relaxed);
        let output = info["summary"]["outputs"][0]
            .as_str()
            .with_context(|| format!("capture {id}: no output: {info}"))?;
        api.push(first_frame(output, p, asked, replied, replied)?);
    }
    let mut bursts = Vec::new();
    for (what, packets) in
        [("accepted (1 s, 1 packet)", 1), ("refused (over limits.max_packets)", MAX_PACKETS + 1)]
    {
        if opts.burst > 0 {
            bursts.push(burst(con, events, what, packets, not_after, opts.burst)?);
        }
    }
    Ok((fleet, api, bursts))
}

/// The figures of a capture asked at `asked` (CLOCK_REALTIME ns) whose object `output` must
/// hold a probe for port `p` first.
fn first_frame(output: &str, p: u32, asked: u64, accepted: u64, started: u64) -> anyhow::Result<Latency> {
    // A local destination's objects are named by file:// URLs.
    let output = output.strip_prefix("file://").unwrap_or(output);
    let bytes = std::fs::read(output).with_context(|| format!("read {output}"))?;
    let mut reader = tapstream_pcap::Reader::new(&bytes).map_err(|e| anyhow::anyhow!("{output}: {e}"))?;
    let record = reader
        .next()
        .with_context(|| format!("{output} holds no frame"))?
        .map_err(|e| anyhow::anyhow!("{output}: {e}"))?;
    let (probe_port, seq, sent, prev) =
        parse_probe(record.data).with_context(|| format!("{output}: the stored frame is no probe"))?;
    anyhow::ensure!(u32::from(probe_port) == p, "{output}: a probe for port {probe_port}, not {p}");
    Ok(Latency {
        accepted: accepted.saturating_sub(asked),
        started: started.saturating_sub(asked),
        first_frame: sent.saturating_sub(asked),
        lower_bound: if seq == 0 { 0 } else { prev as i64 - asked as i64 },
        delivery: record.ts_nanos as i64 - sent as i64,
    })
}

/// One request to the daemon's control API over its Unix socket; the reply's JSON, or an
/// error with its status and body.
fn api_call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<Value> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connect to {}", socket.display()))?;
    let body = body.unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: tapstream\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).with_context(|| format!("{method} {path}: the reply"))?;
    let (head, json) = reply.split_once("\r\n\r\n").with_context(|| format!("{method} {path}: {reply}"))?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    anyhow::ensure!(status.starts_with('2'), "{method} {path}: {head}\n{json}");
    serde_json::from_str(json).with_context(|| format!("{method} {path}: {json}"))
}

/// The next event of request `id`, skipping those of others; fails after [`REQUEST_TIMEOUT`].
fn next_event(events: &mpsc::Receiver<Seen>, id: &str) -> anyhow::Result<Seen> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let seen = events.recv_timeout(left).with_context(|| format!("no event of request {id} in time"))?;
        if seen.event["request_id"] == id {
            return Ok(seen);
        }
    }
}

/// Publishes `count` requests in one pipeline and waits for every decision, then for the end
/// of every capture they started.
fn burst(
    con: &mut redis::Connection,
    events: &mpsc::Receiver<Seen>,
    what: &'static str,
    packets: u64,
    not_after: u64,
    count: usize,
) -> anyhow::Result<Burst> {
    let prefix = if packets == 1 { "acc" } else { "ref" };
    let mut pipe = redis::pipe();
    for j in 0..count {
        let body = json!({
            "id": format!("{prefix}-{j}"), "not_after": not_after, "target": {"node": NODE},
            "capture": {"filter": format!("udp dst port {}", BURST_PORT + j as u32), "packets": packets,
                        "duration_secs": 1}
        })
        .to_string();
        pipe.cmd("XADD").arg(REQUESTS).arg("*").arg("request").arg(body);
    }
    let first = realtime_ns();
    let _: Vec<String> = pipe.query(con).context("publish the burst")?;
    let mut result =
        Burst { what, published: count, accepted: 0, refused: 0, codes: Default::default(), secs: 0.0 };
    let mut finished = 0;
    let deadline = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(count as u64);
    while result.accepted + result.refused < count || finished < result.accepted {
        let left = deadline.saturating_duration_since(Instant::now());
        let seen = events.recv_timeout(left).with_context(|| {
            format!(
                "burst {what}: {} accepted, {} refused, {finished} finished of {count} in time",
                result.accepted, result.refused
            )
        })?;
        if !seen.event["request_id"].as_str().is_some_and(|id| id.starts_with(prefix)) {
            continue;
        }
        match seen.event["event"].as_str() {
            Some("accepted") => result.accepted += 1,
            Some("refused") => {
                result.refused += 1;
                *result.codes.entry(seen.event["code"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
            }
            Some("finished" | "failed") => {
                finished += 1;
                continue;
            }
            _ => continue,
        }
        if result.accepted + result.refused == count {
            result.secs = seen.at_ns.saturating_sub(first) as f64 / 1e9;
        }
    }
    Ok(result)
}

/// The value at quantile `q` (nearest rank) of sorted `v`.
fn quantile<T: Copy>(v: &[T], q: f64) -> T {
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

fn report(fleet: &[Latency], api: &[Latency], bursts: &[Burst], opts: &TriggerBench) {
    let ms = |ns: f64| ns / 1e6;
    println!(
        "\n{} requests one after another on each path; times from just before the request is \
         written (the XADD, or the control API's POST), in ms:\n\n\
         | path | from request to | median | p90 | p99 | max |\n|---|---|---:|---:|---:|---:|",
        opts.requests
    );
    let row = |path: &str, name: &str, mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        println!(
            "| {path} | {name} | {:.2} | {:.2} | {:.2} | {:.2} |",
            quantile(&v, 0.5),
            quantile(&v, 0.9),
            quantile(&v, 0.99),
            quantile(&v, 1.0)
        );
    };
    let of = |v: &[Latency], f: fn(&Latency) -> f64| v.iter().map(|l| ms(f(l))).collect::<Vec<f64>>();
    row("fleet", "`accepted` event seen", of(fleet, |l| l.accepted as f64));
    row("fleet", "`started` event seen", of(fleet, |l| l.started as f64));
    for (path, v) in [("fleet", fleet), ("control API", api)] {
        if path == "control API" {
            row(path, "reply (capture running)", of(v, |l| l.started as f64));
        }
        row(path, "first frame marked (its send time)", of(v, |l| l.first_frame as f64));
        row(path, "previous probe sent (lower bound)", of(v, |l| l.lower_bound as f64));
        row(path, "probe gap (resolution)", of(v, |l| (l.first_frame as i64 - l.lower_bound.max(0)) as f64));
        row(path, "pcap timestamp - send time", of(v, |l| l.delivery as f64));
    }
    if !bursts.is_empty() {
        println!(
            "\n| burst | published | accepted | refused (codes) | first XADD to last decision (s) | requests/s |\n|---|---:|---:|---:|---:|---:|"
        );
        for b in bursts {
            let codes: Vec<String> = b.codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
            let codes = if codes.is_empty() { "-".to_owned() } else { codes.join(", ") };
            println!(
                "| {} | {} | {} | {} ({}) | {:.3} | {:.0} |",
                b.what,
                b.published,
                b.accepted,
                b.refused,
                codes,
                b.secs,
                b.published as f64 / b.secs.max(1e-9)
            );
        }
    }
    println!("\npcapdaemon (Go) is not installed on this machine: it is not in this run.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_carry_their_port_number_and_times() {
        let frame = probe_frame(20_007, 3, 1_700_000_000_123_456_789, 1_700_000_000_122_000_000);
        assert_eq!(
            parse_probe(&frame),
            Some((20_007, 3, 1_700_000_000_123_456_789, 1_700_000_000_122_000_000))
        );
        assert_eq!(parse_probe(&frame[..60]), None);
        let sum = frame[14..34].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
        assert_eq!((sum & 0xffff) + (sum >> 16), 0xffff);
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(
            (quantile(&v, 0.5), quantile(&v, 0.9), quantile(&v, 0.99), quantile(&v, 1.0)),
            (50, 90, 99, 100)
        );
        assert_eq!(quantile(&[7], 0.99), 7);
    }
}
