//! Captures at work on an interface: [`InterfaceService`] runs any number of them at once
//! (the daemon), [`run_capture`] one until its first limit (the one-shot `tapstream
//! capture`). Each capture's chunks go to its own output: a local PCAP file, or objects in a
//! store ([`crate::store`]). A capture over several interfaces is a part on each interface's
//! service, sharing one budget for its limits, whose outcomes are [`gather`]ed into one.

pub mod output;
pub mod service;
pub mod single;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use crate::{
    datapath::capture::StopReason,
    datapath::pipeline::{InterfaceConfig, PipelineError, QueueSnapshot},
};

pub use output::Target;
pub use service::{CaptureOrder, InterfaceService};
pub use single::run_capture;

/// Errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("upload failed")]
    Upload(#[from] crate::store::UploadError),
    #[error("the upload has stopped")]
    UploadStopped,
    #[error("the interface's service has stopped")]
    ServiceGone,
    #[error("{} was removed", interface_name(.alias.as_deref(), .device))]
    InterfaceRemoved { alias: Option<String>, device: String },
    #[error(
        "{} is absent: no capture can start on it until a device of that name appears",
        interface_name(.alias.as_deref(), .device)
    )]
    InterfaceAbsent { alias: Option<String>, device: String },
    /// A lookback on an interface that keeps no history (checked by the plan too).
    #[error("{interface} keeps no history for a lookback (configure [interfaces.<alias>.lookback])")]
    NoHistory { interface: String },
    #[error("cannot start the interface's service thread")]
    Thread {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A write failed part-way and the file could not be cut back to its last whole record.
    #[error(
        "cannot write {path} ({write}), nor cut it back to its last whole record at byte {whole}: \
         it ends in a partial record"
    )]
    Torn {
        path: PathBuf,
        write: std::io::Error,
        whole: u64,
        #[source]
        source: std::io::Error,
    },
}

impl SessionError {
    pub(super) fn removed(config: &InterfaceConfig) -> Self {
        Self::InterfaceRemoved { alias: config.alias.clone(), device: config.interface.clone() }
    }

    pub(super) fn absent(config: &InterfaceConfig) -> Self {
        Self::InterfaceAbsent { alias: config.alias.clone(), device: config.interface.clone() }
    }
}

/// `interface "public" (device eth1)` for one of the daemon's interfaces, `interface eth1`
/// for the one-shot capture's.
pub(super) fn interface_name(alias: Option<&str>, device: &str) -> String {
    match alias {
        Some(alias) => format!("interface {alias:?} (device {device})"),
        None => format!("interface {device}"),
    }
}

/// What a finished capture reports.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CaptureSummary {
    /// Capture id.
    pub id: String,
    /// Interface captured from.
    pub interface: String,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Frames stored.
    pub packets: u64,
    /// Frame bytes stored (after snaplen).
    pub bytes: u64,
    /// Seconds it ran.
    pub elapsed_secs: f64,
    /// Where the capture was stored (empty if no frame was captured).
    pub outputs: Vec<String>,
    /// Frames of this capture lost in the writers (chunk queue full or no buffer), or because
    /// its output failed (the frames of every chunk it could not store).
    pub dropped_writer: u64,
    /// Frames of this capture lost because their chunks found the spool full (the store behind
    /// or failed).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_spool_full: u64,
    /// Frames the AF_XDP sockets lost (all captures; kernel counters).
    pub dropped_kernel: u64,
    /// Frames a capture wanted that could not be redirected (no socket on the queue).
    pub redirect_errors: u64,
    /// Frames cut to fit a UMEM frame.
    pub truncated: u64,
    /// Per-queue counters at the end.
    pub queues: Vec<QueueSummary>,
    /// What ended the capture early, when something outside it did (its interface was
    /// removed) or its output failed (a full disk, a store that gave up); what it had stored
    /// is kept and counted above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a capture whose daemon died while it ran: what the next start recovered of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<Recovery>,
    /// Chunks compressed at each zstd level (with `compression = "auto"` the level follows the
    /// backlog); empty for files and plain objects.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub zstd_levels: std::collections::BTreeMap<i32, u64>,
    /// For a capture over several interfaces, each one's own summary (the fields above are
    /// their sums); empty for a capture of one interface.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<CaptureSummary>,
    /// For a capture that started in the past: what came from the interface's history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookback: Option<LookbackSummary>,
    /// For a capture also sent to CloudShark: the files it took (their ids and URLs), or the
    /// error and the files waiting in the spool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloudshark: Option<crate::store::cloudshark::CloudSharkSummary>,
}

impl LookbackSummary {
    /// The parts' together: the shortest reach, the sums of frames.
    fn combine<'a>(parts: impl Iterator<Item = &'a LookbackSummary>) -> Option<Self> {
        parts.fold(None, |sum: Option<Self>, part| {
            Some(match sum {
                None => part.clone(),
                Some(s) => Self {
                    asked_secs: s.asked_secs,
                    since_ns: s.since_ns.min(part.since_ns),
                    reached_secs: s.reached_secs.min(part.reached_secs),
                    complete: s.complete && part.complete,
                    history_frames: s.history_frames + part.history_frames,
                    live_frames: s.live_frames + part.live_frames,
                },
            })
        })
    }
}

/// What a capture with a lookback took from the interface's history.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LookbackSummary {
    /// Seconds before its start the capture asked to begin.
    pub asked_secs: f64,
    /// Where the history it asked for begins (ns since the Unix epoch): frames from then on.
    pub since_ns: u64,
    /// Seconds before its start the history reached (the age of its oldest frame then, or
    /// `asked_secs` when it held more than asked).
    pub reached_secs: f64,
    /// Whether the history reached back as far as asked.
    pub complete: bool,
    /// Frames stored from the history.
    pub history_frames: u64,
    /// Frames stored live (after the history).
    pub live_frames: u64,
}

impl CaptureSummary {
    /// How the capture ended, for the last write of its manifest in the catalog.
    pub fn catalog_end(&self) -> crate::store::catalog::CaptureEnd {
        crate::store::catalog::CaptureEnd {
            end_ns: crate::sys::unix_now_ns(),
            frames: self.packets,
            bytes: self.bytes,
            drops: self.dropped_writer + self.dropped_spool_full + self.dropped_kernel,
            stop_reason: self.stop_reason.as_str().to_owned(),
            error: self.error.clone(),
        }
    }

    /// The summary of a capture over several interfaces from its parts' outcomes (`alias`,
    /// outcome), in the order of its interfaces: counts summed, outputs in that order. It
    /// ended on an error if one part did (what the others stored is kept and counted); it
    /// failed only if every part failed.
    pub fn combine(parts: Vec<(String, Result<CaptureSummary, SessionError>)>) -> Result<Self, SessionError> {
        let mut errors = Vec::new();
        let mut done = Vec::new();
        let mut failure = None;
        for (alias, outcome) in parts {
            match outcome {
                Ok(summary) => {
                    if let Some(error) = &summary.error {
                        errors.push(format!("{alias}: {error}"));
                    }
                    done.push(summary);
                }
                Err(e) => {
                    errors.push(format!("{alias}: {}", crate::report::chain(&e)));
                    failure.get_or_insert(e);
                }
            }
        }
        let Some(first) = done.first() else {
            return Err(failure.unwrap_or(SessionError::ServiceGone));
        };
        let reasons = || done.iter().map(|s| s.stop_reason);
        let stop_reason = if failure.is_some() || reasons().any(|r| r == StopReason::Error) {
            StopReason::Error
        } else {
            reasons()
                .find(|r| matches!(r, StopReason::Packets | StopReason::Bytes))
                .unwrap_or(first.stop_reason)
        };
        let sum = |field: fn(&CaptureSummary) -> u64| done.iter().map(field).sum::<u64>();
        Ok(Self {
            id: first.id.clone(),
            interface: done.iter().map(|s| s.interface.as_str()).collect::<Vec<_>>().join(","),
            stop_reason,
            packets: sum(|s| s.packets),
            bytes: sum(|s| s.bytes),
            elapsed_secs: done.iter().map(|s| s.elapsed_secs).fold(0.0, f64::max),
            outputs: done.iter().flat_map(|s| s.outputs.iter().cloned()).collect(),
            dropped_writer: sum(|s| s.dropped_writer),
            dropped_spool_full: sum(|s| s.dropped_spool_full),
            dropped_kernel: sum(|s| s.dropped_kernel),
            redirect_errors: sum(|s| s.redirect_errors),
            truncated: sum(|s| s.truncated),
            queues: Vec::new(),
            error: (!errors.is_empty()).then(|| errors.join("; ")),
            recovery: None,
            zstd_levels: done.iter().flat_map(|s| s.zstd_levels.iter()).fold(
                std::collections::BTreeMap::new(),
                |mut sum, (level, chunks)| {
                    *sum.entry(*level).or_default() += chunks;
                    sum
                },
            ),
            lookback: LookbackSummary::combine(done.iter().filter_map(|s| s.lookback.as_ref())),
            cloudshark: None,
            parts: done,
        })
    }
}

/// Outcomes of the parts of one capture over several interfaces (their aliases, in order),
/// gathered into one for `on_done` once every part has ended ([`CaptureSummary::combine`]).
/// Returns one [`OnDone`] per part, in the same order.
pub fn gather(aliases: Vec<String>, on_done: OnDone) -> Vec<OnDone> {
    struct Gathered {
        outcomes: Vec<Option<Result<CaptureSummary, SessionError>>>,
        aliases: Vec<String>,
        on_done: Option<OnDone>,
    }
    let count = aliases.len();
    let shared = Arc::new(Mutex::new(Gathered {
        outcomes: (0..count).map(|_| None).collect(),
        aliases,
        on_done: Some(on_done),
    }));
    (0..count)
        .map(|i| {
            let shared = shared.clone();
            let part: OnDone = Box::new(move |outcome| {
                let mut gathered = shared.lock().unwrap_or_else(|e| e.into_inner());
                gathered.outcomes[i] = Some(outcome);
                if gathered.outcomes.iter().any(Option::is_none) {
                    return;
                }
                let Some(on_done) = gathered.on_done.take() else { return };
                let outcomes = std::mem::take(&mut gathered.outcomes).into_iter().flatten();
                let parts = gathered.aliases.iter().cloned().zip(outcomes).collect();
                drop(gathered);
                on_done(CaptureSummary::combine(parts));
            });
            part
        })
        .collect()
}

pub(super) fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a restarted daemon made of a capture its dead predecessor left running.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recovery {
    /// Not done yet (the store was unreachable): tried again until it is.
    pub pending: bool,
    /// Objects made at recovery (the open upload completed, spooled chunks uploaded); they
    /// are also among the summary's outputs, after the objects finished before the death.
    pub objects: Vec<String>,
    /// Frames in the capture's objects, those finished before the death included.
    pub packets_kept: u64,
    /// Frames the capture had taken when its progress was last saved that are in no object
    /// (in memory, or in parts the store never confirmed, when the process died). At least
    /// this many were lost: frames taken after that save are not known.
    pub packets_lost_at_least: u64,
    /// Unfinished multipart uploads of the dead run that were aborted (none of their parts
    /// was confirmed, so they held nothing to keep).
    pub uploads_aborted: usize,
    /// Why recovery failed or is pending.
    pub error: Option<String>,
}

/// One RX queue's counters at the end of a capture.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSummary {
    /// RX queue.
    pub queue: u32,
    /// Frames the XDP program saw on this queue.
    pub xdp_seen: u64,
    /// Frames it redirected to the queue's socket.
    pub xdp_redirected: u64,
    /// Frames a capture wanted but that could not be redirected.
    pub xdp_redirect_errors: u64,
    /// Frames no capture wanted, passed to the network stack.
    pub xdp_passed: u64,
    /// Frames no capture wanted, dropped.
    pub xdp_dropped: u64,
    /// Frames without room for the metadata (not captured; passed or dropped as unmatched).
    pub xdp_meta_errors: u64,
    /// Frames cut to fit a UMEM frame.
    pub xdp_truncated: u64,
    /// Frames the socket dropped (no fill buffer / too long).
    pub xsk_rx_dropped: u64,
    /// Frames the socket dropped because its RX ring was full.
    pub xsk_rx_ring_full: u64,
    /// Frames the writer took off the RX ring.
    pub frames: u64,
    /// Records the writer appended (one per capture that wanted a frame).
    pub records: u64,
    /// Frames the writer dropped: chunk queue full.
    pub drops_queue_full: u64,
    /// Frames the writer dropped: no chunk buffer.
    pub drops_no_buffer: u64,
}

impl QueueSummary {
    /// What changed on the queue from `start` to `end`.
    pub(super) fn delta(start: &QueueSnapshot, end: &QueueSnapshot) -> Self {
        Self {
            queue: end.queue,
            xdp_seen: end.xdp.seen - start.xdp.seen,
            xdp_redirected: end.xdp.redirected - start.xdp.redirected,
            xdp_redirect_errors: end.xdp.redirect_errors - start.xdp.redirect_errors,
            xdp_passed: end.xdp.passed - start.xdp.passed,
            xdp_dropped: end.xdp.dropped - start.xdp.dropped,
            xdp_meta_errors: end.xdp.meta_errors - start.xdp.meta_errors,
            xdp_truncated: end.xdp.truncated - start.xdp.truncated,
            xsk_rx_dropped: end.xsk.rx_dropped - start.xsk.rx_dropped,
            xsk_rx_ring_full: end.xsk.rx_ring_full - start.xsk.rx_ring_full,
            frames: end.frames - start.frames,
            records: end.records - start.records,
            drops_queue_full: end.drops_queue_full - start.drops_queue_full,
            drops_no_buffer: end.drops_no_buffer - start.drops_no_buffer,
        }
    }
}

/// How far a running capture has got; updated about every 200 ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Frames handed to the output.
    pub packets: u64,
    /// Their bytes (after snaplen).
    pub bytes: u64,
    /// Seconds since the start.
    pub elapsed_secs: f64,
    /// Frames of this capture lost: in the writers, to a failed output, or to a full spool
    /// once the store had failed.
    pub dropped: u64,
}

/// Publishes a capture's progress.
pub(super) fn publish(
    progress: &Mutex<Progress>,
    (packets, bytes): (u64, u64),
    started: Instant,
    dropped: u64,
) {
    let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
    *p = Progress { packets, bytes, elapsed_secs: started.elapsed().as_secs_f64(), dropped };
}

/// Called once with a capture's outcome.
pub type OnDone = Box<dyn FnOnce(Result<CaptureSummary, SessionError>) + Send>;
