//! The daemon: the configured interfaces at work, and the captures operators ask for.
//!
//! Each capture's state is a JSON file in `<state_dir>/captures/`, written when it starts,
//! about every second while it runs, and when it ends, so a restarted daemon still reports
//! it. A capture that was running when the daemon went away without stopping it (killed, a
//! crash, power) is reported as interrupted; what reached the store before stays there.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use crate::{
    captures::{
        CaptureOrder, CaptureSummary, InterfaceService, OnDone, Progress, Recovery, SessionError, Target,
        gather,
    },
    config::{Config, ConfigError},
    control::{
        CaptureInfo, CaptureRequest, CaptureState, InterfaceInfo, InterfaceState,
        audit::{Action, AuditError, AuditLog, Record},
    },
    datapath::{
        capture::{Budget, StopReason},
        pipeline::PipelineError,
    },
    filter::BoundedCompiler,
    report,
    request::{
        CapturePlan, PlanError, Policy,
        access::{AccessDenied, AccessPolicy, Grant, Subject},
    },
    store::{
        UploadError,
        catalog::{CaptureEnd, Catalog, Manifest, ManifestInterface, recovered_objects},
        cloudshark::{self, CloudShark, CloudSharkError, CloudSharkSummary, Pending, Upload},
        read::{Format, section_comment},
        settings::{ObjectLabels, hostname},
    },
    sys::Shutdown,
};

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot use the state directory {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the CloudShark appliance [cloudshark.{name}]")]
    CloudShark {
        name: String,
        #[source]
        source: CloudSharkError,
    },
    #[error("cannot start capturing on {alias} ({device})")]
    Interface {
        alias: String,
        device: String,
        #[source]
        source: Box<SessionError>,
    },
    /// An access rule's group or token file is not as it must be.
    #[error(transparent)]
    Access(ConfigError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// Why the daemon did not do what a request asked. The HTTP layer gives each a status.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request itself is refused (see [`PlanError`]).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The access rules do not allow it (see [`AccessDenied`]).
    #[error(transparent)]
    Access(#[from] AccessDenied),
    /// The interface's device is not there now.
    #[error(transparent)]
    Absent(SessionError),
    #[error("a capture with id {id:?} exists")]
    IdTaken { id: String },
    #[error("no capture {id:?}")]
    NoCapture { id: String },
    #[error("the daemon is stopping: no new captures")]
    Stopping,
    /// The destination's store refused to be used, or its settings are wrong.
    #[error("{}", report::chain(.0))]
    Store(UploadError),
    /// The interface could not start the capture.
    #[error("{}", report::chain(.0))]
    Start(SessionError),
}

impl RequestError {
    fn no_capture(id: &str) -> Self {
        Self::NoCapture { id: id.to_owned() }
    }
}

struct Entry {
    info: CaptureInfo,
    /// While it runs: the progress of its part on each interface.
    progress: Vec<Arc<Mutex<Progress>>>,
}

struct Shared {
    captures: Mutex<BTreeMap<String, Entry>>,
    changed: Condvar,
    /// The daemon's stop (a signal, or [`Daemon::begin_shutdown`]): once it is triggered, new
    /// captures are refused, filter compiles are abandoned, recovery pauses, and waits return
    /// at once (woken by `begin_shutdown`).
    stopping: Shutdown,
    state_dir: PathBuf,
    /// Ended captures kept (`daemon.keep_finished`).
    keep_finished: usize,
    /// Told of each capture that starts and each that ends ([`Daemon::subscribe`]).
    subscribers: Mutex<Vec<tokio::sync::mpsc::UnboundedSender<CaptureInfo>>>,
    /// The configured CloudShark appliances, by name, and the files on their way to them.
    cloudshark: BTreeMap<String, Arc<CloudShark>>,
    cloudshark_spool: cloudshark::Spool,
}

/// The daemon's interfaces and captures.
pub struct Daemon {
    config: Config,
    node: String,
    /// Emptied by [`Daemon::shutdown`].
    services: Mutex<HashMap<String, InterfaceService>>,
    shared: Arc<Shared>,
    /// Compiles requests' filters, each in a child process within
    /// `limits.filter_compile_timeout_secs`.
    compiler: BoundedCompiler,
    /// What requests are resolved against (from the configuration).
    policy: Policy,
    /// Who may do what (`[access]`).
    access: AccessPolicy,
    /// The record of every request (`[audit]`).
    audit: AuditLog,
}

impl Daemon {
    /// Loads the state of earlier captures (those that were running are marked interrupted)
    /// and starts every configured interface. An interface whose device does not exist yet is
    /// reported absent and attached when the device appears. `shutdown` is the daemon's stop.
    pub fn start(config: Config, shutdown: Shutdown) -> Result<Self, DaemonError> {
        let access = AccessPolicy::load(&config).map_err(DaemonError::Access)?;
        let audit = AuditLog::open(&config.audit.file(&config), config.audit.max_bytes, config.audit.keep)?;
        let state_dir = config.daemon.state_dir.join("captures");
        std::fs::create_dir_all(&state_dir)
            .map_err(|source| DaemonError::State { path: state_dir.clone(), source })?;
        let cloudshark = config
            .cloudshark
            .iter()
            .map(|(name, section)| {
                CloudShark::new(name, section)
                    .map(|c| (name.clone(), Arc::new(c)))
                    .map_err(|source| DaemonError::CloudShark { name: name.clone(), source })
            })
            .collect::<Result<_, _>>()?;
        let shared = Arc::new(Shared {
            captures: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
            stopping: shutdown,
            state_dir,
            keep_finished: config.daemon.keep_finished,
            subscribers: Mutex::new(Vec::new()),
            cloudshark,
            cloudshark_spool: cloudshark::Spool::new(&config.daemon.state_dir),
        });
        shared.load()?;
        let mut services = HashMap::new();
        for (alias, interface) in &config.interfaces {
            let mut pipeline = interface.pipeline();
            pipeline.alias = Some(alias.clone());
            let service =
                InterfaceService::start_or_wait(pipeline).map_err(|source| DaemonError::Interface {
                    alias: alias.clone(),
                    device: interface.device.clone(),
                    source: Box::new(source),
                })?;
            services.insert(alias.clone(), service);
        }
        let node = config.daemon.node.clone().unwrap_or_else(hostname);
        let compiler = BoundedCompiler::this_binary(
            Duration::from_secs(config.limits.filter_compile_timeout_secs),
            "limits.filter_compile_timeout_secs",
        );
        let policy = Policy::daemon(&config, &node);
        Ok(Self { config, node, services: Mutex::new(services), shared, compiler, policy, access, audit })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This host's name (`daemon.node`, else the hostname).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A channel that gets each capture started from now on as it starts, and each capture as
    /// it ends (finished or failed): the start first (not told for a capture that ended before
    /// its start was complete), then the end. A capture interrupted by the death of an earlier
    /// run is told again each time its recovery has got further ([`Daemon::recover_interrupted`]).
    pub fn subscribe(&self) -> tokio::sync::mpsc::UnboundedReceiver<CaptureInfo> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.shared.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        rx
    }

    /// The access rules (for the control API's tokens).
    pub fn access(&self) -> &AccessPolicy {
        &self.access
    }

    /// Records in the audit log what `subject` asked and what became of it: `outcome` is the
    /// reason of a refusal.
    pub fn audit(
        &self,
        action: Action,
        subject: &Subject,
        capture: Option<&str>,
        request: Option<&CaptureRequest>,
        outcome: Result<(), String>,
    ) {
        let rule = self.access.grant(subject).rule();
        self.audit.write(&Record {
            time: crate::control::audit::now(),
            action,
            subject,
            rule,
            capture,
            request,
            decision: if outcome.is_ok() { "allowed" } else { "refused" },
            reason: outcome.err(),
        });
    }

    fn audited<T>(
        &self,
        action: Action,
        subject: &Subject,
        capture: Option<&str>,
        request: Option<&CaptureRequest>,
        result: &Result<T, RequestError>,
    ) {
        let outcome = result.as_ref().map(|_| ()).map_err(|e| report::chain(e));
        self.audit(action, subject, capture, request, outcome);
    }

    /// Checks `request` against what `subject` may do, resolves it into a plan
    /// ([`CapturePlan::resolve`]) and starts the capture; records it in the audit log.
    pub fn start_capture(
        &self,
        request: CaptureRequest,
        subject: &Subject,
    ) -> Result<CaptureInfo, RequestError> {
        let asked = request.clone();
        let result = self.start_for(request, subject);
        let id = match &result {
            Ok(info) => Some(info.id.as_str()),
            Err(_) => asked.id.as_deref(),
        };
        self.audited(Action::Start, subject, id, Some(&asked), &result);
        result
    }

    fn start_for(&self, mut request: CaptureRequest, subject: &Subject) -> Result<CaptureInfo, RequestError> {
        let grant = self.access.grant(subject);
        let policy = grant.narrow(subject, &mut request, &self.policy)?;
        // Compiled here, once, on this request's own (blocking) thread, in a child process
        // within the time limit: the interface's thread gets the program and never waits for
        // libpcap, and neither do other requests or a stopping daemon.
        // A CloudShark appliance as the destination: the capture is stored in a local staging
        // directory of its own, sent from there when it ends, and its objects removed once
        // the file is in CloudShark or in the CloudShark spool.
        let mut staged_policy = None;
        if let Some(asked) = request.destination.clone().filter(|d| d.starts_with("cloudshark")) {
            let appliance = self.find_cloudshark(&asked)?;
            if let Some(also) = &request.cloudshark
                && self.find_cloudshark(also)?.name != appliance.name
            {
                return Err(RequestError::Plan(PlanError::DestinationNotAllowed {
                    asked: also.clone(),
                    allowed: vec![asked],
                }));
            }
            let staging = self.staging_dir().display().to_string();
            request.cloudshark = Some(appliance.name.clone());
            request.destination = Some(staging.clone());
            let mut staged = policy.clone();
            staged.destinations.get_or_insert_default().push(staging);
            staged_policy = Some(staged);
        }
        let staged = staged_policy.is_some();
        let mut plan = CapturePlan::resolve(
            request,
            staged_policy.as_ref().unwrap_or(&policy),
            self.running(),
            |expression| self.compiler.compile(expression, &self.shared.stopping),
        )
        .map_err(|e| match e {
            PlanError::DestinationNotAllowed { ref asked, .. } => {
                grant.destination_refused(asked).map_or(RequestError::Plan(e), RequestError::Access)
            }
            e => RequestError::Plan(e),
        })?;
        grant.check_caps(&plan.request)?;
        let owner = grant.rule().map(str::to_owned);
        // Also to CloudShark: one of the configured appliances, by its name or its URL.
        let cloudshark = match plan.request.cloudshark.take() {
            Some(asked) => {
                let found = self.find_cloudshark(&asked)?;
                plan.request.cloudshark = Some(found.name.clone());
                Some(found)
            }
            None => None,
        };
        let services = self.services();
        if let Some((alias, device)) =
            plan.interfaces.iter().find(|(alias, _)| services.get(alias).is_some_and(|s| !s.attached()))
        {
            return Err(RequestError::Absent(SessionError::InterfaceAbsent {
                alias: Some(alias.clone()),
                device: device.clone(),
            }));
        }
        drop(services);
        let destination = plan.destination.clone().ok_or(RequestError::Plan(PlanError::NoDestinations))?;
        // A capture over several interfaces stores each one's frames under `<id>/<alias>/`.
        let several = plan.interfaces.len() > 1;
        let targets = plan
            .interfaces
            .iter()
            .map(|(alias, _)| {
                let labels = ObjectLabels { part: several.then(|| alias.clone()), ..plan.labels.clone() };
                self.config
                    .store
                    // The spools of interrupted captures are theirs to recover (recover_interrupted).
                    .target(&destination, labels, false)
                    // The store is checked here, on this request's thread, not the interface's: one
                    // that refuses is named and nothing starts; one that is down does not stop the
                    // start.
                    .map_err(RequestError::Store)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let id = plan.id.clone();
        let (aliases, devices): (Vec<String>, Vec<String>) = plan.interfaces.iter().cloned().unzip();
        let info = CaptureInfo {
            id: id.clone(),
            interfaces: aliases.clone(),
            devices,
            request: plan.request.clone(),
            location: plan.location().unwrap_or_default(),
            started_ns: crate::sys::unix_now_ns(),
            requested_by: subject.uid(),
            owner: owner.clone(),
            state: CaptureState::Running,
            progress: Progress::default(),
            summary: None,
            error: None,
        };
        {
            let mut captures = self.shared.lock();
            if captures.contains_key(&id) {
                return Err(RequestError::IdTaken { id });
            }
            let running = captures.values().filter(|e| e.info.state == CaptureState::Running).count();
            plan.check_caps(&policy, running)?;
            if let Grant::Rule(_) = grant {
                let theirs = captures
                    .values()
                    .filter(|e| e.info.state == CaptureState::Running && e.info.owner == owner)
                    .count();
                grant.check_concurrent(theirs)?;
            }
            captures.insert(id.clone(), Entry { info: info.clone(), progress: Vec::new() });
        }
        self.shared.persist(&info);

        let shared = self.shared.clone();
        let done_id = id.clone();
        let (catalog, store, url) =
            (plan.labels.catalog.clone(), self.config.store.clone(), destination.clone());
        let described = describe(&plan, &self.node);
        let on_done: OnDone = Box::new(move |mut result| {
            // The manifest's last write, before the capture is reported finished (on the
            // thread that finishes it, never an interface's).
            if let (Ok(summary), Some(catalog)) = (&result, &catalog) {
                catalog.end(summary.catalog_end());
                if let Err(e) = store.write_catalog(&url, catalog) {
                    log::warn!(
                        "capture {done_id}: cannot write its manifest to the catalog: {}",
                        report::chain(&e)
                    );
                }
            }
            // Then to CloudShark, read back from the store, before it is reported finished:
            // its summary holds the files' ids and URLs, or where they wait.
            if let (Ok(summary), Some(cloudshark), Some(catalog)) = (&mut result, &cloudshark, &catalog) {
                let (tags, description) = described;
                let pending = Pending {
                    destination: cloudshark.name.clone(),
                    capture: done_id.clone(),
                    upload: Upload {
                        filename: format!("{done_id}.{}", if cloudshark.pcapng { "pcapng" } else { "pcap" }),
                        tags,
                        description: format!("{description}, {}", window(catalog)),
                    },
                    refused: false,
                };
                let manifest = catalog.manifest();
                let format = if cloudshark.pcapng {
                    let asked = format!("capture {done_id}, sent to CloudShark");
                    Format::Pcapng { comment: section_comment(&asked, std::slice::from_ref(&manifest)) }
                } else {
                    Format::Pcap
                };
                // A stopping daemon does not wait for CloudShark: the next start sends it.
                let stopping = shared.stopping.is_set();
                let sent =
                    cloudshark::deliver(cloudshark, &shared.cloudshark_spool, pending, stopping, |out| {
                        store.read_capture(&url, &manifest, format, out).map_err(|e| report::chain(&e))
                    });
                // Staged for CloudShark alone: once the file is there or in its spool, the
                // staged objects go.
                if staged && (!sent.files.is_empty() || !sent.spooled.is_empty()) {
                    cloudshark::remove_staged(std::path::Path::new(&url), &manifest);
                    summary.outputs.clear();
                }
                summary.cloudshark = Some(sent);
            }
            shared.finish(&done_id, result)
        });
        let on_done = if several { gather(aliases.clone(), on_done) } else { vec![on_done] };
        // Its limits apply to the sum of its interfaces.
        let budget = Budget::new();
        let mut started = Vec::new();
        let mut failed = None;
        for ((alias, target), on_done) in aliases.iter().zip(targets).zip(on_done) {
            let order = CaptureOrder {
                spec: plan.spec.clone(),
                limits: plan.limits,
                budget: budget.clone(),
                target: Target::Store(target),
                on_done,
            };
            let result = match self.services().get(alias) {
                Some(service) if !self.shared.stopping.is_set() => service.start_capture(order),
                _ => Err(SessionError::ServiceGone),
            };
            match result {
                Ok(progress) => started.push(progress),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            // Nothing starts: the parts started already are stopped, and their outcome (to a
            // capture the daemon no longer knows) is dropped.
            self.shared.lock().remove(&id);
            self.shared.forget(&id);
            for alias in aliases.iter().take(started.len()) {
                if let Some(service) = self.services().get(alias) {
                    service.stop_capture(&id, StopReason::Stopped);
                }
            }
            return Err(match e {
                SessionError::Pipeline(PipelineError::Filter(_))
                | SessionError::InterfaceAbsent { .. }
                | SessionError::InterfaceRemoved { .. } => RequestError::Start(e),
                _ if self.shared.stopping.is_set() => RequestError::Stopping,
                e => RequestError::Start(e),
            });
        }
        let mut captures = self.shared.lock();
        if let Some(entry) = captures.get_mut(&id) {
            entry.progress = started;
            // Under the lock, and only if it has not ended yet: its end is told after.
            if entry.info.state == CaptureState::Running {
                self.shared.notify(&info);
            }
        }
        drop(captures);
        log::info!(
            "capture {id} started on {} for {subject}{}: filter {:?}, into {destination}",
            info.interfaces_shown(),
            owner.as_deref().map(|r| format!(" (access rule {r})")).unwrap_or_default(),
            plan.request.filter.as_deref().unwrap_or("")
        );
        Ok(info)
    }

    /// The configured interfaces, and whether each one's device is there and attached.
    pub fn interfaces(&self) -> Vec<InterfaceInfo> {
        let services = self.services();
        self.config
            .interfaces
            .iter()
            .map(|(alias, interface)| InterfaceInfo {
                alias: alias.clone(),
                device: interface.device.clone(),
                state: if services.get(alias).is_some_and(InterfaceService::attached) {
                    InterfaceState::Attached
                } else {
                    InterfaceState::Absent
                },
            })
            .collect()
    }

    /// Every capture the daemon knows, newest first.
    pub fn list(&self) -> Vec<CaptureInfo> {
        let mut all: Vec<CaptureInfo> = self.shared.lock().values().map(Entry::current).collect();
        all.sort_by_key(|c| std::cmp::Reverse(c.started_ns));
        all
    }

    /// Every capture `subject` may see, newest first; recorded in the audit log.
    pub fn list_for(&self, subject: &Subject) -> Result<Vec<CaptureInfo>, RequestError> {
        let grant = self.access.grant(subject);
        let result = grant.check_any(subject).map_err(RequestError::from).map(|()| {
            let mut all = self.list();
            all.retain(|c| grant.may_read(subject, &c.id, c.owner.as_deref()).is_ok());
            all
        });
        self.audited(Action::List, subject, None, None, &result);
        result
    }

    /// One capture.
    pub fn get(&self, id: &str) -> Result<CaptureInfo, RequestError> {
        self.shared.lock().get(id).map(Entry::current).ok_or_else(|| RequestError::no_capture(id))
    }

    /// One capture, if `subject` may see it; recorded in the audit log.
    pub fn read(&self, id: &str, subject: &Subject) -> Result<CaptureInfo, RequestError> {
        let result = self.readable(id, subject);
        self.audited(Action::Read, subject, Some(id), None, &result);
        result
    }

    fn readable(&self, id: &str, subject: &Subject) -> Result<CaptureInfo, RequestError> {
        let grant = self.access.grant(subject);
        grant.check_any(subject)?;
        let info = self.get(id)?;
        grant.may_read(subject, id, info.owner.as_deref())?;
        Ok(info)
    }

    /// Ends a running capture (its output is finished as for any other end), if `subject` may;
    /// recorded in the audit log.
    pub fn stop_capture(&self, id: &str, subject: &Subject) -> Result<CaptureInfo, RequestError> {
        let result = self.stop_for(id, subject);
        self.audited(Action::Stop, subject, Some(id), None, &result);
        result
    }

    fn stop_for(&self, id: &str, subject: &Subject) -> Result<CaptureInfo, RequestError> {
        let grant = self.access.grant(subject);
        grant.check_any(subject)?;
        let info = self.get(id)?;
        grant.may_stop(subject, id, info.owner.as_deref())?;
        if info.state == CaptureState::Running {
            let services = self.services();
            for service in info.interfaces.iter().filter_map(|alias| services.get(alias)) {
                service.stop_capture(id, StopReason::Stopped);
            }
        }
        Ok(info)
    }

    /// Waits up to `timeout` for a capture `subject` may see to end, or for the daemon to
    /// begin stopping; returns it as it is then. Recorded in the audit log when it begins.
    pub fn wait(&self, id: &str, timeout: Duration, subject: &Subject) -> Result<CaptureInfo, RequestError> {
        let allowed = self.readable(id, subject);
        self.audited(Action::Wait, subject, Some(id), None, &allowed);
        allowed?;
        let deadline = Instant::now() + timeout;
        let mut captures = self.shared.lock();
        loop {
            let entry = captures.get(id).ok_or_else(|| RequestError::no_capture(id))?;
            let now = Instant::now();
            if entry.info.state != CaptureState::Running || now >= deadline || self.shared.stopping.is_set() {
                return Ok(entry.current());
            }
            captures = self
                .shared
                .changed
                .wait_timeout(captures, (deadline - now).min(Duration::from_millis(500)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Finishes what the captures interrupted by a dead daemon left in the store and the
    /// spool (see [`crate::store::settings::StoreSettings::recover_capture`]) and records it in
    /// their state: the objects recovered among their outputs, the frames kept and lost. Returns
    /// whether some are still pending (their store is unreachable): call again later.
    pub fn recover_interrupted(&self) -> bool {
        let pending: Vec<CaptureInfo> = self
            .shared
            .lock()
            .values()
            .filter(|e| recovery_pending(&e.info))
            .map(|e| e.info.clone())
            .collect();
        let mut left = false;
        for info in pending {
            if self.shared.stopping.is_set() {
                return false;
            }
            let Some(destination) = info.request.destination.clone() else { continue };
            let labels = ObjectLabels {
                capture: info.id.clone(),
                node: self.node.clone(),
                part: None,
                metadata: Vec::new(),
                object_tags: crate::store::settings::object_tags(
                    info.request.customer.as_deref(),
                    info.request.retention.as_deref(),
                ),
                catalog: None,
            };
            let result = self.config.store.recover_capture(&destination, labels);
            let mut captures = self.shared.lock();
            let Some(entry) = captures.get_mut(&info.id) else { continue };
            let saved_packets = entry.info.progress.packets;
            let Some(summary) = entry.info.summary.as_mut() else { continue };
            let recovery = summary.recovery.get_or_insert_default();
            let mut ended = None;
            match result {
                Ok(r) => {
                    let kept = r.earlier_packets + r.packets;
                    let lost = saved_packets.saturating_sub(kept);
                    *recovery = Recovery {
                        pending: false,
                        objects: r.objects.clone(),
                        packets_kept: kept,
                        packets_lost_at_least: lost,
                        uploads_aborted: r.aborted,
                        error: (r.lost_packets > 0).then(|| {
                            format!(
                                "the store no longer had the open upload: its {} frames are lost",
                                r.lost_packets
                            )
                        }),
                    };
                    summary.outputs = r.earlier.into_iter().chain(r.objects).collect();
                    // Its manifest, last written while it ran, is to say how it ended.
                    ended =
                        Some(interrupted_manifest(&info, &self.node, &destination, &summary.outputs, kept));
                    log::info!(
                        "capture {}, interrupted: {} objects recovered, {kept} frames kept, at least {lost} \
                         lost, {} unfinished uploads aborted",
                        info.id,
                        recovery.objects.len(),
                        recovery.uploads_aborted
                    );
                }
                Err(e) => {
                    let message = report::chain(&e);
                    if e.is_retryable() {
                        log::warn!(
                            "capture {}, interrupted: cannot recover it now ({message}); trying again later",
                            info.id
                        );
                        left = true;
                    } else {
                        log::error!("capture {}, interrupted: cannot recover it: {message}", info.id);
                        recovery.pending = false;
                    }
                    recovery.error = Some(message);
                }
            }
            let info = entry.info.clone();
            drop(captures);
            // Written with the registry unlocked: the store may take its time.
            if let Some(catalog) = ended
                && let Err(e) = self.config.store.write_catalog(&destination, &catalog)
            {
                log::warn!(
                    "capture {}, interrupted: cannot write its manifest to the catalog: {}",
                    info.id,
                    report::chain(&e)
                );
            }
            self.shared.persist(&info);
            self.shared.changed.notify_all();
            self.shared.notify(&info);
        }
        left
    }

    /// Sends what waits in the CloudShark spool (files CloudShark could not take when their
    /// capture ended) and records each file taken in its capture's summary. Files CloudShark
    /// refused for good (the token) are sent again only when `refused_too` (at start, after a
    /// change of the configuration). Stops at an appliance's first error of the round.
    pub fn resend_cloudshark(&self, refused_too: bool) {
        let spool = &self.shared.cloudshark_spool;
        let mut failing: Vec<String> = Vec::new();
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                log::error!("cannot start a runtime to send the CloudShark spool: {e}");
                return;
            }
        };
        for (claim, pending) in spool.pending() {
            if self.shared.stopping.is_set() {
                return;
            }
            if (pending.refused && !refused_too) || failing.contains(&pending.destination) {
                continue;
            }
            let Some(cloudshark) = self.shared.cloudshark.get(&pending.destination) else {
                log::warn!(
                    "{} waits for [cloudshark.{}], which is not configured: left in the spool",
                    claim.path().display(),
                    pending.destination
                );
                continue;
            };
            let result = runtime.block_on(spool.send(cloudshark, &claim, &pending));
            let path = claim.path().display().to_string();
            let message = result.as_ref().err().map(|e| report::chain(e));
            match &result {
                Ok(done) => log::info!(
                    "capture {}: {} sent to {} from the spool, as {}",
                    pending.capture,
                    done.filename,
                    cloudshark.url,
                    done.url
                ),
                Err(_) => {
                    log::warn!(
                        "capture {}: {} still not sent to {}: {}",
                        pending.capture,
                        pending.upload.filename,
                        cloudshark.url,
                        message.as_deref().unwrap_or_default()
                    );
                    failing.push(pending.destination.clone());
                }
            }
            self.shared.update_cloudshark(&pending.capture, |c| match result {
                Ok(done) => {
                    c.spooled.retain(|p| *p != path);
                    c.files.push(done);
                    if c.spooled.is_empty() {
                        c.error = None;
                    }
                }
                Err(_) => c.error = message,
            });
        }
    }

    /// The configured CloudShark appliance `asked` names (its name or its URL); refused with
    /// the list of those configured.
    fn find_cloudshark(&self, asked: &str) -> Result<Arc<CloudShark>, RequestError> {
        let found = self.shared.cloudshark.values().find(|c| {
            c.name == asked || asked.parse::<cloudshark::CloudSharkUrl>().is_ok_and(|u| u == c.url)
        });
        found.cloned().ok_or_else(|| {
            let allowed = self.shared.cloudshark.values().map(|c| format!("{} ({})", c.url, c.name));
            RequestError::Plan(PlanError::DestinationNotAllowed {
                asked: asked.to_owned(),
                allowed: allowed.collect(),
            })
        })
    }

    /// Where captures whose destination is a CloudShark appliance are stored until they are
    /// sent.
    fn staging_dir(&self) -> PathBuf {
        self.config.daemon.state_dir.join("cloudshark-staging")
    }

    /// How often the CloudShark spool is sent again: the shortest `retry_secs` configured;
    /// `None`: no appliance is configured.
    pub fn cloudshark_retry(&self) -> Option<Duration> {
        self.shared.cloudshark.values().map(|c| c.retry).min()
    }

    /// Writes the progress of running captures to the state directory.
    pub fn save_progress(&self) {
        let running: Vec<CaptureInfo> = self
            .shared
            .lock()
            .values()
            .filter(|e| e.info.state == CaptureState::Running)
            .map(Entry::current)
            .collect();
        for info in running {
            self.shared.persist(&info);
        }
    }

    /// Begins to stop: triggers the daemon's shutdown (if a signal has not already), so new
    /// captures are refused (503), and wakes pending waits, which return at once (with the
    /// capture as it is), as later ones do.
    pub fn begin_shutdown(&self) {
        // Triggered under the lock a waiter checks it under, and the waiters woken after: none
        // misses the wakeup, whoever triggered it first.
        let captures = self.shared.lock();
        self.shared.stopping.trigger();
        drop(captures);
        self.shared.changed.notify_all();
    }

    /// Ends every capture as interrupted, waits for their outputs, and takes the interfaces
    /// down. Requests still being served meanwhile are answered (a start with 503).
    pub fn shutdown(&self) {
        self.begin_shutdown();
        let services: Vec<InterfaceService> = self.services().drain().map(|(_, s)| s).collect();
        for service in services {
            service.shutdown(StopReason::Interrupted);
        }
    }

    fn services(&self) -> std::sync::MutexGuard<'_, HashMap<String, InterfaceService>> {
        self.services.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn running(&self) -> usize {
        self.shared.lock().values().filter(|e| e.info.state == CaptureState::Running).count()
    }
}

impl Entry {
    fn current(&self) -> CaptureInfo {
        let mut info = self.info.clone();
        if info.state == CaptureState::Running && !self.progress.is_empty() {
            let mut sum = Progress::default();
            for part in &self.progress {
                let p = *part.lock().unwrap_or_else(|e| e.into_inner());
                sum.packets += p.packets;
                sum.bytes += p.bytes;
                sum.dropped += p.dropped;
                sum.elapsed_secs = sum.elapsed_secs.max(p.elapsed_secs);
            }
            info.progress = sum;
        }
        info
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.captures.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, id: &str) -> PathBuf {
        self.state_dir.join(format!("{id}.json"))
    }

    /// Writes a capture's state (through a temporary file, so a crash never leaves half).
    fn persist(&self, info: &CaptureInfo) {
        let path = self.path(&info.id);
        let tmp = path.with_extension("json.tmp");
        let result = serde_json::to_vec_pretty(info)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            log::error!("cannot save the state of capture {} in {}: {e}", info.id, path.display());
        }
    }

    fn forget(&self, id: &str) {
        let _ = std::fs::remove_file(self.path(id));
    }

    /// Reads the captures of earlier runs; those still marked running were interrupted.
    fn load(&self) -> Result<(), DaemonError> {
        let err = |source| DaemonError::State { path: self.state_dir.clone(), source };
        let mut captures = self.lock();
        for entry in std::fs::read_dir(&self.state_dir).map_err(err)? {
            let path = entry.map_err(err)?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let info = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<CaptureInfo>(&b).map_err(|e| e.to_string()));
            let mut info = match info {
                Ok(info) => info,
                Err(e) => {
                    log::warn!("ignoring unreadable capture state {}: {e}", path.display());
                    continue;
                }
            };
            if info.state == CaptureState::Running {
                log::warn!(
                    "capture {} was running when the daemon stopped: reported as interrupted; what reached {} stays there",
                    info.id,
                    info.location
                );
                info.state = CaptureState::Finished;
                info.summary = Some(CaptureSummary {
                    id: info.id.clone(),
                    interface: info.devices.join(","),
                    stop_reason: StopReason::Interrupted,
                    packets: info.progress.packets,
                    bytes: info.progress.bytes,
                    elapsed_secs: info.progress.elapsed_secs,
                    outputs: Vec::new(),
                    dropped_writer: info.progress.dropped,
                    dropped_spool_full: 0,
                    dropped_kernel: 0,
                    redirect_errors: 0,
                    truncated: 0,
                    queues: Vec::new(),
                    error: None,
                    recovery: Some(Recovery { pending: true, ..Recovery::default() }),
                    zstd_levels: Default::default(),
                    parts: Vec::new(),
                    lookback: None,
                    cloudshark: None,
                });
                metrics::counter!(crate::metrics::CAPTURES_ENDED, "reason" => StopReason::Interrupted.as_str())
                    .increment(1);
                self.persist(&info);
            }
            captures.insert(info.id.clone(), Entry { info, progress: Vec::new() });
        }
        drop(captures);
        self.forget_oldest();
        Ok(())
    }

    /// Records a capture's outcome.
    fn finish(&self, id: &str, result: Result<CaptureSummary, SessionError>) {
        let info = {
            let mut captures = self.lock();
            let Some(entry) = captures.get_mut(id) else { return };
            entry.info.progress = entry.current().progress;
            match result {
                Ok(summary) => {
                    entry.info.progress.packets = summary.packets;
                    entry.info.progress.bytes = summary.bytes;
                    entry.info.progress.elapsed_secs = summary.elapsed_secs;
                    entry.info.state = CaptureState::Finished;
                    match &summary.error {
                        Some(error) => log::error!(
                            "capture {id} ended ({}): {error}; {} packets, {} bytes stored",
                            summary.stop_reason,
                            summary.packets,
                            summary.bytes
                        ),
                        None => log::info!(
                            "capture {id} ended ({}): {} packets, {} bytes",
                            summary.stop_reason,
                            summary.packets,
                            summary.bytes
                        ),
                    }
                    entry.info.error = summary.error.clone();
                    entry.info.summary = Some(summary);
                }
                Err(e) => {
                    let message = report::chain(&e);
                    log::error!("capture {id} failed: {message}");
                    entry.info.state = CaptureState::Failed;
                    entry.info.error = Some(message);
                }
            }
            entry.progress.clear();
            entry.info.clone()
        };
        self.persist(&info);
        self.forget_oldest();
        self.changed.notify_all();
        self.notify(&info);
    }

    /// Changes the CloudShark part of capture `id`'s summary, if it has one, and records it.
    fn update_cloudshark(&self, id: &str, change: impl FnOnce(&mut CloudSharkSummary)) {
        let info = {
            let mut captures = self.lock();
            let Some(entry) = captures.get_mut(id) else { return };
            let Some(summary) = entry.info.summary.as_mut().and_then(|s| s.cloudshark.as_mut()) else {
                return;
            };
            change(summary);
            entry.info.clone()
        };
        self.persist(&info);
        self.changed.notify_all();
        self.notify(&info);
    }

    /// Tells the subscribers; forgets those gone.
    fn notify(&self, info: &CaptureInfo) {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).retain(|s| s.send(info.clone()).is_ok());
    }

    /// Forgets the oldest ended captures beyond `keep_finished`, so the state directory does
    /// not grow for ever on a long-running appliance.
    fn forget_oldest(&self) {
        let mut captures = self.lock();
        let mut ended: Vec<(u64, String)> = captures
            .values()
            .filter(|e| e.info.state != CaptureState::Running)
            .map(|e| (e.info.started_ns, e.info.id.clone()))
            .collect();
        if ended.len() <= self.keep_finished {
            return;
        }
        ended.sort();
        let excess = ended.len() - self.keep_finished;
        for (_, id) in ended.into_iter().take(excess) {
            captures.remove(&id);
            self.forget(&id);
        }
    }
}

/// What a capture is sent to CloudShark with: its tags (the request's, customer, alert id,
/// node) and the start of its description (node, interfaces, filter).
fn describe(plan: &CapturePlan, node: &str) -> (Vec<String>, String) {
    let r = &plan.request;
    let tags = cloudshark::capture_tags(&r.tags, r.customer.as_deref(), r.alert_id.as_deref(), node);
    let interfaces: Vec<String> =
        plan.interfaces.iter().map(|(alias, device)| format!("{alias} ({device})")).collect();
    let description = format!(
        "tapstream capture {} on {node}, interface {}, filter {}",
        plan.id,
        interfaces.join(" + "),
        r.filter.as_deref().map_or_else(|| "none (every frame)".to_owned(), |f| format!("\"{f}\""))
    );
    (tags, description)
}

/// A capture's time window, UTC, from its manifest (its first and last frames when known).
fn window(catalog: &Catalog) -> String {
    let m = catalog.manifest();
    let first = m.objects.iter().map(|o| o.first_ns).min().unwrap_or(m.start_ns);
    let last = m.objects.iter().map(|o| o.last_ns).max().or(m.end_ns).unwrap_or(first);
    let utc = |ns: u64| humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_nanos(ns));
    format!("from {} to {}", utc(first), utc(last))
}

/// Whether an interrupted capture's leftovers are still to be recovered.
pub fn recovery_pending(info: &CaptureInfo) -> bool {
    info.summary.as_ref().and_then(|s| s.recovery.as_ref()).is_some_and(|r| r.pending)
}

/// The manifest of a capture a dead daemon interrupted, once recovered: what its state says of
/// it (bytes and drops as last saved), its objects (their times are in their indexes), ended
/// now, as `interrupted`.
fn interrupted_manifest(
    info: &CaptureInfo,
    node: &str,
    destination: &str,
    outputs: &[String],
    frames: u64,
) -> std::sync::Arc<Catalog> {
    let r = &info.request;
    let objects = match destination.parse() {
        Ok(d) => recovered_objects(&d, outputs),
        Err(_) => Vec::new(),
    };
    let catalog = Catalog::new(Manifest {
        capture_id: info.id.clone(),
        request_id: r.request_id.clone(),
        node: node.to_owned(),
        interfaces: info
            .interfaces
            .iter()
            .zip(&info.devices)
            .map(|(alias, device)| ManifestInterface { alias: alias.clone(), device: device.clone() })
            .collect(),
        filter: r.filter.clone(),
        snaplen: r.snaplen.unwrap_or_default(),
        tags: r.tags.clone(),
        customer: r.customer.clone(),
        alert_id: r.alert_id.clone(),
        retention: r.retention.clone(),
        start_ns: info.started_ns,
        objects,
        ..Manifest::default()
    });
    catalog.end(CaptureEnd {
        end_ns: crate::sys::unix_now_ns(),
        frames,
        bytes: info.progress.bytes,
        drops: info.progress.dropped,
        stop_reason: "interrupted".into(),
        error: info.error.clone(),
    });
    catalog
}
