//! `tapstream capture -i IF ...`: one capture in this process, until its first limit.

use std::io::IsTerminal as _;

use crate::{
    captures::{Target, output::PcapngHead, run_capture},
    cli::{args::*, output::*, serve_metrics, tools::compile_cli},
    config::InterfaceSection,
    datapath::xsk::ZeroCopy,
    filter::{CaptureFilter, LoadedFilter},
    request::{CapturePlan, Policy},
    store::settings::{ObjectLabels, StoreSettings, hostname},
    sys::Shutdown,
};
use anyhow::{Context as _, bail};

/// The plan the flags make: the request they give ([`RequestArgs::request`]), resolved as the
/// daemon resolves one ([`CapturePlan::resolve`]) against the one-shot's [`Policy`]: the
/// interface given with `-i`, the store given with `--upload` (or none: a file), no caps.
/// The filter is compiled in this process (whoever runs it can interrupt it).
pub fn plan(args: &CaptureArgs) -> anyhow::Result<CapturePlan> {
    let r = &args.request;
    let device = match r.interface.as_slice() {
        [device] => device,
        [] => bail!("give the interface to capture from with -i IF"),
        _ => bail!("the one-shot capture takes one interface (-i IF); the daemon takes several"),
    };
    if args.format == FileFormat::Pcapng && args.write.is_none() {
        bail!(
            "--format pcapng is for a --write file; a store's objects are PCAP (read them back as pcapng \
             with tapstream read --format pcapng)"
        );
    }
    if r.cloudshark.is_some() {
        bail!(
            "--cloudshark is for the daemon's captures (tapstream capture start), whose configuration names it"
        );
    }
    let node = args.objects.node.clone().unwrap_or_else(hostname);
    let policy = Policy::one_shot(device, args.upload.as_deref(), &node);
    Ok(CapturePlan::resolve(r.request(args.upload.clone()), &policy, 0, compile_cli)?)
}

pub fn capture(args: CaptureArgs) -> anyhow::Result<()> {
    let plan = plan(&args)?;
    if let Some(program) = &plan.spec.filter {
        // Checked before anything starts: the verifier's complaint (the program is loaded once
        // and dropped; the capture loads it again with the interface's own).
        LoadedFilter::load(&[CaptureFilter { slot: 0, filter: Some(program) }])?;
    }
    // The same settings as an interface of the daemon's configuration.
    let device = plan.interfaces[0].1.clone();
    let mut config = InterfaceSection {
        device: device.clone(),
        queues: args.queues,
        cores: args.cores.clone(),
        attach: args.xdp_mode,
        zero_copy: match args.zero_copy {
            ZeroCopyArg::Auto => ZeroCopy::Auto,
            ZeroCopyArg::Required => ZeroCopy::Required,
            ZeroCopyArg::Off => ZeroCopy::Off,
        },
        frame_size_bytes: args.frame_size,
        huge_pages: !args.no_huge_pages,
        ring_size: args.ring_size,
        drop_unmatched: args.drop_unmatched,
        ..InterfaceSection::default()
    }
    .pipeline();
    // Kept exact: the flag takes any duration, the file whole microseconds.
    config.writer.coalesce = args.batch_wait;
    let interface = device;

    if let Some(addr) = args.metrics_listen {
        serve_metrics(addr)?;
    }
    let stop = Shutdown::new();
    stop.trigger_on_termination().context("install signal handlers")?;
    let tty = std::io::stderr().is_terminal() && !args.json;
    let pcapng = (args.format == FileFormat::Pcapng).then(|| pcapng_head(&args, &plan));
    let started_ns = crate::sys::unix_now_ns();
    let target = match (&args.write, &plan.destination) {
        (Some(path), _) => Target::File(path.clone(), pcapng.clone().map(Box::new)),
        (None, Some(url)) => store_target(&args, url, plan.labels.clone())?,
        (None, None) => bail!("give --write FILE or --upload URL"),
    };
    let summary = run_capture(config, plan.spec, plan.limits, target, &stop, |p| {
        if tty {
            eprint!(
                "\r{} packets, {} bytes, {:.1} s, {} dropped   ",
                p.packets, p.bytes, p.elapsed_secs, p.dropped
            );
        }
    })
    .with_context(|| format!("capture on {interface}"))?;
    if tty {
        eprintln!();
    }
    if let (Some(path), Some(_)) = (&args.write, &pcapng) {
        // The statistics at the end of a pcapng file (if there is one: a capture of no frame
        // writes none).
        let stats = tapstream_pcap::pcapng::Statistics {
            ts_ns: crate::sys::unix_now_ns(),
            start_ns: Some(started_ns),
            end_ns: Some(crate::sys::unix_now_ns()),
            dropped: Some(summary.catalog_end().drops),
            delivered: Some(summary.packets),
        };
        if path.exists() {
            append_statistics(path, &stats).with_context(|| {
                format!("append the statistics (drops) to {}; the frames are in it", path.display())
            })?;
        }
    }
    // The manifest's last write: the counts and the stop reason.
    if let (None, Some(url), Some(catalog)) = (&args.write, &plan.destination, &plan.labels.catalog) {
        catalog.end(summary.catalog_end());
        if let Err(e) = store_settings(&args).write_catalog(url, catalog) {
            log::warn!(
                "capture {}: cannot write its manifest to the catalog: {}",
                summary.id,
                crate::report::chain(&e)
            );
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    // Ended by an error from outside (its interface removed): what it stored is kept and
    // summarised above, and the command fails.
    if let Some(error) = &summary.error {
        bail!("capture on {interface}: {error}");
    }
    Ok(())
}

/// The head of a one-shot's pcapng file: its interface named `node/device` with the filter,
/// and a comment naming the capture and what it was for.
fn pcapng_head(args: &CaptureArgs, plan: &CapturePlan) -> PcapngHead {
    let node = args.objects.node.clone().unwrap_or_else(hostname);
    let device = &plan.interfaces[0].1;
    let r = &plan.request;
    let mut comment = vec![format!("tapstream capture -i {device} on node {node}: capture {}", plan.id)];
    comment.extend(r.request_id.as_ref().map(|q| format!("request {q}")));
    comment.extend(r.alert_id.as_ref().map(|a| format!("alert {a}")));
    comment.extend(r.customer.as_ref().map(|c| format!("customer {c}")));
    if !r.tags.is_empty() {
        let tags: Vec<String> = r.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        comment.push(format!("tags {}", tags.join(", ")));
    }
    PcapngHead {
        comment: comment.join("; "),
        interface: tapstream_pcap::pcapng::Interface {
            linktype: tapstream_pcap::LINKTYPE_ETHERNET as u16,
            name: format!("{node}/{device}"),
            description: Some(format!("device {device} of node {node}; capture {}", plan.id)),
            filter: plan.spec.filter.as_ref().map(|f| f.expression().to_owned()),
            ..Default::default()
        },
    }
}

/// Appends the statistics block of interface 0 to the pcapng file at `path`, and syncs it.
fn append_statistics(
    path: &std::path::Path,
    stats: &tapstream_pcap::pcapng::Statistics,
) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    file.write_all(&tapstream_pcap::pcapng::interface_statistics(0, stats))?;
    if file.metadata()?.is_file() {
        file.sync_all()?;
    }
    Ok(())
}

/// The store settings the flags give.
pub fn store_settings(args: &CaptureArgs) -> StoreSettings {
    let o = &args.objects;
    StoreSettings {
        part_size_bytes: o.part_size,
        parts_in_flight: o.parts_in_flight,
        rotate_size_bytes: o.rotate_size,
        rotate_age_secs: o.rotate_age.as_secs().max(1),
        compression: o.compression.clone(),
        compress_threads: o.compress_threads,
        key_template: o.key_template.clone(),
        spool_dir: o.spool_dir.clone(),
        spool_max_bytes: o.spool_max,
        upload_queue: o.upload_queue,
        outage_max_secs: o.outage_max.as_secs(),
        tagging: !o.no_tagging,
        ..args.store.settings()
    }
}

/// Validates the store options into a target that starts the upload with the capture; checks
/// the store (one that refuses is an error; one that is down is logged, and the capture spools
/// until it answers).
pub fn store_target(args: &CaptureArgs, url: &str, labels: ObjectLabels) -> anyhow::Result<Target> {
    let settings = store_settings(args);
    if let Err((field, message)) = settings.validate() {
        bail!("--{}: {message}", flag_of(field));
    }
    let target =
        settings.target(url, labels, true).with_context(|| format!("cannot store the capture in {url}"))?;
    Ok(Target::Store(target))
}

/// The flag that sets a store setting.
pub fn flag_of(field: &str) -> String {
    match field {
        "part_size_bytes" => "part-size".into(),
        "rotate_size_bytes" => "rotate-size".into(),
        "spool_max_bytes" => "spool-max".into(),
        other => other.replace('_', "-"),
    }
}
