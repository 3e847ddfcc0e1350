//! `tapstream fleet nodes|capture`: the fleet from the operator's side, through its broker.

use std::{
    collections::BTreeMap,
    io::IsTerminal as _,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::{
    cli::args::{BrokerArgs, FleetCaptureArgs, FleetCommand},
    config::{Config, NatsSection, RedisSection},
    control::InterfaceState,
    fleet::{
        FleetRequest, Target,
        message::NotAfter,
        presence::Presence,
        publish::{Answer, Answers, Broker, BrokerSettings},
    },
};

/// The configuration file read when `--config` is not given, if it exists.
const DEFAULT_CONFIG: &str = "/etc/tapstream/tapstream.toml";
/// How long one read of the events stream blocks.
const POLL: Duration = Duration::from_millis(500);

pub fn fleet(command: FleetCommand) -> anyhow::Result<()> {
    match command {
        FleetCommand::Nodes(args) => nodes(&args.broker),
        FleetCommand::Capture(args) => capture(CapturePlan::resolve(*args)?),
    }
}

/// The broker's settings: `--nats URL` (or `TAPSTREAM_NATS`) names a NATS server, `--redis
/// URL` (or `TAPSTREAM_REDIS`) a Redis one, each with the names of the configuration file's
/// section for it if it has one; without either, the file's `[fleet.redis]`, else its
/// `[fleet.nats]`.
fn broker_settings(args: &BrokerArgs) -> anyhow::Result<BrokerSettings> {
    broker_settings_in(args, |name| std::env::var(name).ok())
}

/// A broker's URL given on the command line or in the environment.
enum Given {
    Redis(String),
    Nats(String),
}

/// [`broker_settings`], with `env` looking the environment up. A flag wins over the
/// environment (so `--nats` works where `TAPSTREAM_REDIS` is set).
fn broker_settings_in(
    args: &BrokerArgs,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<BrokerSettings> {
    let given = match (&args.redis, &args.nats) {
        (Some(_), Some(_)) => bail!("--redis and --nats: give one broker"),
        (Some(url), None) => Some(Given::Redis(url.clone())),
        (None, Some(url)) => Some(Given::Nats(url.clone())),
        (None, None) => match (env("TAPSTREAM_REDIS"), env("TAPSTREAM_NATS")) {
            (Some(_), Some(_)) => {
                bail!(
                    "TAPSTREAM_REDIS and TAPSTREAM_NATS are both set: choose with --redis URL or --nats URL"
                )
            }
            (Some(url), None) => Some(Given::Redis(url)),
            (None, Some(url)) => Some(Given::Nats(url)),
            (None, None) => None,
        },
    };
    let default = Path::new(DEFAULT_CONFIG);
    let file = match &args.config {
        Some(path) => Some((path.as_path(), true)),
        None => default.exists().then_some((default, false)),
    };
    let (mut redis, mut nats) = (None, None);
    if let Some((path, explicit)) = file {
        match Config::load(path) {
            Ok(config) => (redis, nats) = (config.fleet.redis, config.fleet.nats),
            Err(e) if explicit || given.is_none() => return Err(e.into()),
            Err(e) => log::warn!("ignoring {}: {e}", path.display()),
        }
        if explicit && redis.is_none() && nats.is_none() && given.is_none() {
            bail!(
                "{} has neither [fleet.redis] nor [fleet.nats]: give the broker with --redis URL or --nats URL",
                path.display()
            );
        }
    }
    match given {
        Some(Given::Nats(url)) => {
            return Ok(BrokerSettings::Nats(NatsSection { url, ..nats.unwrap_or_default() }));
        }
        Some(Given::Redis(url)) => {
            return Ok(BrokerSettings::Redis(RedisSection { url, ..redis.unwrap_or_default() }));
        }
        None => {}
    }
    match (redis, nats) {
        (Some(redis), _) => Ok(BrokerSettings::Redis(redis)),
        (None, Some(nats)) => Ok(BrokerSettings::Nats(nats)),
        (None, None) => bail!(
            "no broker: give --redis URL (or TAPSTREAM_REDIS) or --nats URL (or TAPSTREAM_NATS), \
             or a --config FILE with [fleet.redis] or [fleet.nats]"
        ),
    }
}

fn nodes(args: &BrokerArgs) -> anyhow::Result<()> {
    let settings = broker_settings(args)?;
    let nodes = Broker::connect(&settings)?.nodes()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    if nodes.is_empty() {
        match &settings {
            BrokerSettings::Redis(s) => eprintln!("no live node announces itself under {}*", s.nodes_prefix),
            BrokerSettings::Nats(s) => {
                eprintln!("no live node announces itself in bucket {}", s.nodes_bucket)
            }
        }
        return Ok(());
    }
    println!("{:<20} {:<24} {:<32} captures", "node", "labels", "interfaces");
    for node in &nodes {
        println!(
            "{:<20} {:<24} {:<32} {}",
            node.node,
            labels(&node.labels),
            interfaces(node),
            captures(node)
        );
    }
    Ok(())
}

fn labels(labels: &BTreeMap<String, String>) -> String {
    let all: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if all.is_empty() { "-".into() } else { all.join(",") }
}

fn interfaces(node: &Presence) -> String {
    let all: Vec<String> = node
        .interfaces
        .iter()
        .map(|i| {
            let state = match i.state {
                InterfaceState::Attached => "attached",
                InterfaceState::Absent => "absent",
            };
            format!("{} ({}) {state}", i.alias, i.device)
        })
        .collect();
    if all.is_empty() { "-".into() } else { all.join(", ") }
}

fn captures(node: &Presence) -> String {
    let all: Vec<String> = node
        .captures
        .iter()
        .map(|c| match &c.filter {
            Some(filter) => format!("{} on {} ({filter})", c.id, c.interfaces.join(",")),
            None => format!("{} on {}", c.id, c.interfaces.join(",")),
        })
        .collect();
    if all.is_empty() { "-".into() } else { all.join(", ") }
}

/// `fleet capture`, resolved: the broker, the request, how to follow it.
struct CapturePlan {
    settings: BrokerSettings,
    request: FleetRequest,
    wait: bool,
    json: bool,
}

impl CapturePlan {
    fn resolve(args: FleetCaptureArgs) -> anyhow::Result<Self> {
        let settings = broker_settings(&args.broker)?;
        let target = Target {
            node: args.node.clone(),
            node_regex: args.node_regex.clone(),
            labels: args.labels.iter().cloned().collect(),
        };
        // A regular expression no node could use is refused here, not by every node.
        target.node_regex().context("--nodes")?;
        let mut request = FleetRequest::new(args.request.request(args.destination.clone()), target);
        let now = SystemTime::now();
        if let Some(ns) = args.not_after {
            request.not_after = NotAfter(UNIX_EPOCH + Duration::from_nanos(ns));
        } else if let Some(deadline) = args.deadline {
            request.not_after = NotAfter(now + deadline);
        }
        if request.expired(now) {
            bail!("the deadline has passed already: nodes would refuse the request as expired");
        }
        Ok(Self { settings, request, wait: args.wait, json: args.broker.json })
    }
}

fn capture(plan: CapturePlan) -> anyhow::Result<()> {
    let CapturePlan { settings, request, wait, json } = plan;
    let mut broker = Broker::connect(&settings)?;
    // Nodes decide whether a request is theirs; the live ones that should are expected.
    let expected: Vec<String> = broker
        .nodes()?
        .into_iter()
        .filter(|n| request.target.matches(&n.node, &n.labels).unwrap_or(false))
        .map(|n| n.node)
        .collect();
    let mut cursor = broker.publish(&request)?;
    let not_after = humantime::format_rfc3339_seconds(request.not_after.0).to_string();
    if !wait {
        if json {
            let doc = json!({"request_id": request.id, "not_after": not_after, "expected": expected});
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            println!("{}", request.id);
        }
        return Ok(());
    }
    if !json {
        eprintln!(
            "request {} published on {}, valid until {not_after}; live nodes it targets: {}",
            request.id,
            broker.shown(),
            if expected.is_empty() { "none".to_owned() } else { expected.join(", ") }
        );
    }
    let live = !json && std::io::stderr().is_terminal();
    let mut answers = Answers::new(&request.id, expected);
    let mut shown_lines = 0;
    if live {
        shown_lines = redraw(&table(&answers, false), 0);
    }
    while !answers.done(SystemTime::now(), request.not_after.0) {
        let mut changed = Vec::new();
        for event in broker.events(&mut cursor, POLL)? {
            let node = event.node.clone();
            if answers.take(event) {
                changed.push(node);
            }
        }
        if changed.is_empty() || json {
            continue;
        }
        if live {
            shown_lines = redraw(&table(&answers, false), shown_lines);
        } else {
            for node in changed {
                if let Some(answer) = answers.by_node.get(&node) {
                    eprintln!("{node}: {}", describe(answer));
                }
            }
        }
    }
    if json {
        let doc = json!({
            "request_id": request.id,
            "not_after": not_after,
            "target": request.target,
            "nodes": answers.by_node,
            "no_answer": answers.silent(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        if live {
            redraw(&[], shown_lines);
        }
        for line in table(&answers, true) {
            println!("{line}");
        }
        for (node, answer) in &answers.by_node {
            if let Answer::Finished { outputs, .. } = answer {
                for output in outputs {
                    println!("  {node} stored: {output}");
                }
            }
        }
    }
    let problems = answers.problems();
    if !problems.is_empty() {
        let all: Vec<String> = problems.iter().map(|(node, why)| format!("{node} {why}")).collect();
        bail!("request {}: {}", request.id, all.join("; "));
    }
    Ok(())
}

/// One line per node: those that answered, then those expected that did not (yet).
fn table(answers: &Answers, ended: bool) -> Vec<String> {
    let mut lines = vec![format!("{:<20} {}", "node", "answer")];
    for (node, answer) in &answers.by_node {
        lines.push(format!("{node:<20} {}", describe(answer)));
    }
    for node in answers.silent() {
        lines.push(format!("{node:<20} {}", if ended { "no answer" } else { "waiting" }));
    }
    if ended && lines.len() == 1 {
        lines.push("(no node answered, and no live node matches the target)".into());
    }
    lines
}

fn describe(answer: &Answer) -> String {
    match answer {
        Answer::Accepted => "accepted".into(),
        Answer::Refused { code, reason } => format!("refused ({}): {reason}", code.as_str()),
        Answer::Started { interfaces } => format!("started on {}", interfaces.join(",")),
        Answer::Finished { stop_reason, packets, bytes, dropped, outputs, error, .. } => {
            let mut line = format!(
                "finished ({stop_reason}): {packets} packets, {bytes} bytes, {dropped} dropped, {} outputs",
                outputs.len()
            );
            if let Some(error) = error {
                line.push_str(&format!("; error: {error}"));
            }
            line
        }
        Answer::Failed { error } => format!("failed: {error}"),
    }
}

/// Replaces the `previous` lines last drawn on stderr with `lines`; returns how many it drew.
fn redraw(lines: &[String], previous: usize) -> usize {
    let mut out = String::new();
    if previous > 0 {
        out.push_str(&format!("\x1b[{previous}A"));
    }
    for line in lines {
        out.push_str(&format!("\x1b[2K{line}\n"));
    }
    // Lines left over from a longer drawing.
    if previous > lines.len() {
        out.push_str("\x1b[J");
    }
    eprint!("{out}");
    lines.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::{Cli, Command};
    use clap::Parser as _;

    fn plan(args: &[&str]) -> anyhow::Result<CapturePlan> {
        let all = [&["tapstream", "fleet", "capture"][..], args].concat();
        let Command::Fleet(FleetCommand::Capture(args)) = Cli::try_parse_from(all)?.command else {
            panic!("not fleet capture")
        };
        CapturePlan::resolve(*args)
    }

    #[test]
    fn a_fleet_capture_resolves_into_a_request() {
        let p = plan(&[
            "--redis",
            "redis://:pw@host",
            "--label",
            "site=fra1",
            "--nodes",
            "tap-.*",
            "--deadline",
            "10s",
            "-c",
            "5",
            "udp",
            "port",
            "53",
        ])
        .unwrap();
        let BrokerSettings::Redis(settings) = &p.settings else { panic!("{:?}", p.settings) };
        assert_eq!(settings.url, "redis://:pw@host");
        assert_eq!(settings.requests_stream, "tapstream:requests");
        assert_eq!(p.request.target.labels["site"], "fra1");
        assert_eq!(p.request.target.node_regex.as_deref(), Some("tap-.*"));
        assert_eq!(p.request.capture.filter.as_deref(), Some("udp port 53"));
        assert_eq!(p.request.capture.packets, Some(5));
        let left = p.request.not_after.0.duration_since(SystemTime::now()).unwrap();
        assert!(left <= Duration::from_secs(10) && left > Duration::from_secs(5), "{left:?}");
        let err = plan(&["--redis", "redis://h", "--nodes", "("]).err().unwrap();
        assert!(format!("{err:#}").contains("--nodes"), "{err:#}");
        let err = plan(&["--redis", "redis://h", "--not-after", "1000"]).err().unwrap();
        assert!(err.to_string().contains("passed"), "{err}");
        let err = plan(&["--config", "/nonexistent"]).err().unwrap();
        assert!(format!("{err:#}").contains("/nonexistent"), "{err:#}");
        // NATS, by its flag.
        let p = plan(&["--nats", "nats://h:4222", "--node", "tap1", "udp"]).unwrap();
        let BrokerSettings::Nats(settings) = &p.settings else { panic!("{:?}", p.settings) };
        assert_eq!(settings.url, "nats://h:4222");
        assert_eq!(settings.requests_subject_prefix, "tapstream.requests");
        assert!(plan(&["--nats", "nats://h:4222", "--redis", "redis://h"]).is_err(), "one broker at a time");
    }

    #[test]
    fn a_broker_flag_wins_over_the_environment() {
        let args = |redis: Option<&str>, nats: Option<&str>| BrokerArgs {
            redis: redis.map(str::to_owned),
            nats: nats.map(str::to_owned),
            config: None,
            json: false,
        };
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        let redis_env = env(&[("TAPSTREAM_REDIS", "redis://env")]);
        let Ok(BrokerSettings::Nats(s)) = broker_settings_in(&args(None, Some("nats://flag:1")), redis_env)
        else {
            panic!("--nats wins over TAPSTREAM_REDIS")
        };
        assert_eq!(s.url, "nats://flag:1");
        let Ok(BrokerSettings::Redis(s)) = broker_settings_in(&args(None, None), redis_env) else {
            panic!("TAPSTREAM_REDIS alone")
        };
        assert_eq!(s.url, "redis://env");
        let Ok(BrokerSettings::Nats(s)) =
            broker_settings_in(&args(None, None), env(&[("TAPSTREAM_NATS", "nats://env:2")]))
        else {
            panic!("TAPSTREAM_NATS alone")
        };
        assert_eq!(s.url, "nats://env:2");
        let both = env(&[("TAPSTREAM_REDIS", "redis://env"), ("TAPSTREAM_NATS", "nats://env:2")]);
        let err = broker_settings_in(&args(None, None), both).unwrap_err().to_string();
        assert!(err.contains("both set"), "{err}");
    }
}
