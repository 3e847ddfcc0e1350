//! `tapstream capture -i IF ...`: one capture in this process, until its first limit.

use std::io::IsTerminal as _;

use crate::{
    captures::{Target, run_capture},
    cli::{args::*, output::*, serve_metrics},
    config::InterfaceSection,
    datapath::{
        capture::{CaptureSpec, DEFAULT_SNAPLEN, Limits},
        xsk::ZeroCopy,
    },
    filter::{CaptureFilter, CbpfProgram, LoadedFilter},
    store::settings::{ObjectLabels, StoreSettings, hostname, object_metadata},
    sys::Shutdown,
};
use anyhow::{Context as _, bail};

pub fn capture(args: CaptureArgs) -> anyhow::Result<()> {
    let r = &args.request;
    let Some(interface) = r.interface.clone() else { bail!("give the interface to capture from with -i IF") };
    let snaplen = r.snaplen.unwrap_or(DEFAULT_SNAPLEN);
    if snaplen == 0 {
        bail!("--snaplen must be at least 1");
    }
    let id = r.id.clone().unwrap_or_else(|| "capture".into());
    // The same settings as an interface of the daemon's configuration.
    let mut config = InterfaceSection {
        device: interface.clone(),
        queues: args.queues,
        cores: args.cores.clone(),
        attach: args.xdp_mode,
        zero_copy: match args.zero_copy {
            ZeroCopyArg::Auto => ZeroCopy::Auto,
            ZeroCopyArg::Required => ZeroCopy::Required,
            ZeroCopyArg::Off => ZeroCopy::Off,
        },
        frame_size_bytes: args.frame_size,
        ring_size: args.ring_size,
        drop_unmatched: args.drop_unmatched,
        ..InterfaceSection::default()
    }
    .pipeline();
    // Kept exact: the flag takes any duration, the file whole microseconds.
    config.writer.coalesce = args.batch_wait;
    let filter = match r.filter() {
        Some(expression) => {
            // Compiled once, and checked before anything starts: libpcap's message for a syntax
            // error, the reason for what the kernel cannot run, the verifier's complaint (the
            // program is loaded once and dropped; the capture loads it again with the
            // interface's own).
            let program = crate::cli::tools::compile_cli(&expression)?;
            LoadedFilter::load(&[CaptureFilter { slot: 0, filter: Some(&program) }])?;
            Some(program)
        }
        None => None,
    };
    let spec = CaptureSpec { id: id.clone(), filter, snaplen };
    let limits = Limits { packets: r.packets, bytes: r.bytes, duration: r.duration, idle: r.idle };

    if let Some(addr) = args.metrics_listen {
        serve_metrics(addr)?;
    }
    let stop = Shutdown::new();
    stop.trigger_on_termination().context("install signal handlers")?;
    let tty = std::io::stderr().is_terminal() && !args.json;
    let target = match (&args.write, &args.upload) {
        (Some(path), _) => Target::File(path.clone()),
        (None, Some(url)) => {
            store_target(&args, url, &id, spec.filter.as_ref().map(CbpfProgram::expression))?
        }
        (None, None) => bail!("give --write FILE or --upload URL"),
    };
    let summary = run_capture(config, spec, limits, target, &stop, |p| {
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
        ..args.store.settings()
    }
}

/// Validates the store options into a target that starts the upload with the capture; checks
/// the store (one that refuses is an error; one that is down is logged, and the capture spools
/// until it answers).
pub fn store_target(args: &CaptureArgs, url: &str, id: &str, filter: Option<&str>) -> anyhow::Result<Target> {
    let settings = store_settings(args);
    if let Err((field, message)) = settings.validate() {
        bail!("--{}: {message}", flag_of(field));
    }
    let node = args.objects.node.clone().unwrap_or_else(hostname);
    let r = &args.request;
    let metadata = object_metadata(id, &node, filter, r.alert_id.as_deref(), r.customer.as_deref(), &r.tags)
        .map_err(anyhow::Error::msg)?;
    settings
        .target(url, ObjectLabels { capture: id.to_owned(), node, metadata }, true)
        .with_context(|| format!("cannot store the capture in {url}"))
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
