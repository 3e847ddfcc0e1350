//! What the CLI prints of captures: progress lines and summaries.

use crate::{
    captures::CaptureSummary,
    control::{CaptureInfo, CaptureState},
};

/// `1234 packets / 10000, 5.6 MB, 12.3 s / 60 s, 0 dropped`.
pub fn progress_line(info: &CaptureInfo) -> String {
    let p = &info.progress;
    let r = &info.request;
    let of = |limit: Option<String>| limit.map(|l| format!(" / {l}")).unwrap_or_default();
    format!(
        "{} packets{}, {} bytes{}, {:.1} s{}, {} dropped",
        p.packets,
        of(r.packets.map(|n| n.to_string())),
        p.bytes,
        of(r.bytes.map(|n| n.to_string())),
        p.elapsed_secs,
        of(r.duration_secs.map(|d| format!("{d} s"))),
        p.dropped
    )
}

pub fn show(info: &CaptureInfo, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(info)?);
        return Ok(());
    }
    match (&info.state, &info.summary, &info.error) {
        (_, Some(summary), _) => print_summary(summary),
        (CaptureState::Failed, _, Some(error)) => println!("capture {} failed: {error}", info.id),
        _ => {
            println!("capture {} running on {}", info.id, info.interfaces_shown());
            println!("  {}", progress_line(info));
            println!("  into {}", info.location);
            if let Some(rule) = &info.owner {
                println!("  under access rule {rule}");
            }
        }
    }
    Ok(())
}

pub fn print_summary(s: &CaptureSummary) {
    println!("capture {} on {} ended: {}", s.id, s.interface, s.stop_reason);
    println!("  {} packets, {} bytes in {:.1} s", s.packets, s.bytes, s.elapsed_secs);
    if s.outputs.is_empty() {
        if s.packets == 0 {
            println!("  no packets captured: nothing stored");
        } else {
            println!("  no object finished (see the error below)");
        }
    }
    for output in &s.outputs {
        println!("  stored: {output}");
    }
    if let Some(c) = &s.cloudshark {
        for file in &c.files {
            println!("  in CloudShark: {} ({}, {} bytes)", file.url, file.filename, file.bytes);
        }
        for spooled in &c.spooled {
            println!("  waiting for {}: {spooled}", c.destination);
        }
        if let Some(error) = &c.error {
            println!("  CloudShark {}: {error}", c.destination);
        }
    }
    println!(
        "  dropped: {} in writers, {} in the kernel's AF_XDP sockets, {} redirect errors; {} truncated",
        s.dropped_writer, s.dropped_kernel, s.redirect_errors, s.truncated
    );
    if s.dropped_spool_full > 0 {
        println!(
            "  lost: {} packets found the spool full while the store was unreachable",
            s.dropped_spool_full
        );
    }
    if let Some(error) = &s.error {
        println!("  error: {error}");
    }
}
