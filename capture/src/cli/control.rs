//! `tapstream capture start|list|status|stop|wait`: the daemon's client.

use std::{io::IsTerminal as _, time::Duration};

use crate::{
    cli::{args::*, output::*},
    control::{CaptureInfo, CaptureState, client::Client},
    datapath::capture::StopReason,
};
use anyhow::bail;

pub fn control(action: CaptureAction) -> anyhow::Result<()> {
    match action {
        CaptureAction::Start(args) => {
            let request = args.request.request(args.destination.clone());
            let client = Client::new(&args.client.socket);
            let info = client.start(&request)?;
            if !args.wait {
                return show(&info, args.client.json);
            }
            if !args.client.json {
                eprintln!("capture {} started on {}", info.id, info.interfaces_shown());
            }
            let info = wait_for(&client, &info.id, !args.client.json && std::io::stderr().is_terminal())?;
            show(&info, args.client.json)?;
            ended_well(&info)
        }
        CaptureAction::List(client_args) => {
            let all = Client::new(&client_args.socket).list()?;
            if client_args.json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!(
                    "{:<28} {:<10} {:<9} {:>10} {:>12}  filter",
                    "id", "interface", "state", "packets", "bytes"
                );
                for c in all {
                    let state = match (&c.state, &c.summary) {
                        (_, Some(s)) => s.stop_reason.as_str().to_owned(),
                        (state, None) => format!("{state:?}").to_lowercase(),
                    };
                    println!(
                        "{:<28} {:<10} {:<9} {:>10} {:>12}  {}",
                        c.id,
                        c.interfaces.join(","),
                        state,
                        c.progress.packets,
                        c.progress.bytes,
                        c.request.filter.as_deref().unwrap_or("")
                    );
                }
            }
            Ok(())
        }
        CaptureAction::Status(a) => show(&Client::new(&a.client.socket).status(&a.id)?, a.client.json),
        CaptureAction::Stop(a) => {
            let client = Client::new(&a.client.socket);
            client.stop(&a.id)?;
            let info = wait_for(&client, &a.id, false)?;
            show(&info, a.client.json)?;
            ended_well(&info)
        }
        CaptureAction::Wait(a) => {
            let client = Client::new(&a.client.socket);
            let info = wait_for(&client, &a.id, !a.client.json && std::io::stderr().is_terminal())?;
            show(&info, a.client.json)?;
            ended_well(&info)
        }
    }
}

/// An error (so a non-zero exit) for a capture that ended on an error (a removed interface, a
/// failed output) or failed, after its summary is printed: scripts that wait for a capture
/// learn that it is incomplete.
pub fn ended_well(info: &CaptureInfo) -> anyhow::Result<()> {
    let error = match (&info.state, &info.summary) {
        (CaptureState::Failed, _) => info.error.clone().unwrap_or_else(|| "failed".into()),
        (_, Some(summary)) if summary.stop_reason == StopReason::Error => {
            summary.error.clone().or_else(|| info.error.clone()).unwrap_or_else(|| "ended on an error".into())
        }
        _ => return Ok(()),
    };
    bail!("capture {} did not end well: {error}", info.id)
}

/// Waits for a capture to end; on a terminal, with a progress line against its limits.
pub fn wait_for(client: &Client, id: &str, live: bool) -> anyhow::Result<CaptureInfo> {
    loop {
        let info =
            client.wait(id, if live { Duration::from_millis(500) } else { Duration::from_secs(60) })?;
        if info.state != CaptureState::Running {
            if live {
                eprintln!();
            }
            return Ok(info);
        }
        if live {
            eprint!("\r{}   ", progress_line(&info));
        }
    }
}
