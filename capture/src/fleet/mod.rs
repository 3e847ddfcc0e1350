//! Captures asked through a broker, for fleets of tap hosts.
//!
//! A publisher (an IDS or SIEM alert's handler) adds a [`FleetRequest`] to the requests
//! stream. Every node reads every request through a consumer group of its own and decides:
//! not for it (its name, the `node_regex`, its labels): ignored; for it: refused (expired,
//! malformed, above a cap, a bad filter...) or started as a capture of the daemon, whose id is
//! the request's. Each decision, then the capture's end, is reported as an [`Event`] on the
//! events stream. A request is acknowledged once decided, so one a node received but had not
//! decided when it died is decided after its restart; one decided twice starts one capture,
//! since the daemon refuses a second capture of the same id (its state survives restarts).
//!
//! The events not sent yet ([`Outbox`]) and the captures fleet requests started are kept in
//! the daemon's state directory: events are sent at least once, across broker outages and
//! daemon restarts, and a capture cut by the daemon's death is reported, once, as interrupted.
//!
//! [`Node`] is this decision, whatever the broker; [`redis`] reads and writes Redis Streams,
//! [`nats`] NATS JetStream.

pub mod event;
pub mod message;
pub mod nats;
pub mod pcapdaemon;
pub mod presence;
pub mod publish;
pub mod redis;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fs::{File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

pub use event::{Event, RefusalCode, What};
pub use message::{FleetRequest, MessageError, Target};

use crate::{
    control::{
        CaptureInfo, CaptureState,
        audit::Action,
        daemon::{Daemon, RequestError, recovery_pending},
    },
    request::access::Subject,
};

/// What became of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A capture started.
    Accepted,
    /// Refused, and said so in an event.
    Refused(RefusalCode),
    /// Not for this node.
    Ignored,
    /// Seen before: its capture exists (running or ended); nothing new.
    Duplicate,
    /// Not decided (the daemon is stopping): leave it unacknowledged, for the next start.
    Retry,
}

impl Outcome {
    /// Whether the message is done with (acknowledge it).
    pub fn decided(self) -> bool {
        self != Self::Retry
    }

    fn label(self) -> Option<&'static str> {
        match self {
            Self::Accepted => Some("accepted"),
            Self::Refused(_) => Some("refused"),
            Self::Ignored => Some("ignored"),
            Self::Duplicate => Some("duplicate"),
            Self::Retry => None,
        }
    }
}

/// Events waiting to be sent, oldest first; bounded: when full, the oldest is dropped (and
/// counted). Kept in a journal file too, when opened with [`Outbox::open`], so that the events
/// not sent before the daemon stopped (or was killed) are sent after its next start.
pub struct Outbox {
    state: Mutex<OutboxState>,
    max: usize,
    ready: tokio::sync::Notify,
}

struct OutboxState {
    queue: VecDeque<Event>,
    journal: Option<Journal>,
}

/// One line of the outbox's journal: an event added, or the oldest one gone (sent or dropped).
/// Replaying the lines gives the events waiting.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    Event(Box<Event>),
    Gone,
}

/// The outbox's journal: lines appended, the file rewritten with what waits when it holds
/// much more than that (and emptied when nothing waits).
struct Journal {
    path: PathBuf,
    file: File,
    /// Lines in the file.
    lines: usize,
}

/// Lines a journal may hold beyond twice the events waiting before it is rewritten.
const JOURNAL_SLACK: usize = 1024;

impl Outbox {
    /// An outbox in memory only.
    pub fn new(max: usize) -> Self {
        Self::with(VecDeque::new(), None, max)
    }

    /// An outbox kept in the journal `path` too: the events it holds (those not sent by an
    /// earlier run) wait first.
    pub fn open(path: &Path, max: usize) -> std::io::Result<Self> {
        let mut queue = VecDeque::new();
        match std::fs::read(path) {
            Ok(bytes) => {
                for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    match serde_json::from_slice(line) {
                        Ok(Record::Event(event)) => queue.push_back(*event),
                        Ok(Record::Gone) => {
                            queue.pop_front();
                        }
                        // A line cut by a crash: the last one, and never acknowledged.
                        Err(e) => log::warn!("fleet: skipping an unreadable line of {}: {e}", path.display()),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        while queue.len() > max.max(1) {
            queue.pop_front();
            metrics::counter!(crate::metrics::FLEET_EVENTS_DROPPED).increment(1);
        }
        if !queue.is_empty() {
            log::info!("fleet: {} events of an earlier run wait to be sent", queue.len());
        }
        let journal = Journal::rewrite(path.to_owned(), &queue)?;
        Ok(Self::with(queue, Some(journal), max))
    }

    fn with(queue: VecDeque<Event>, journal: Option<Journal>, max: usize) -> Self {
        Self {
            state: Mutex::new(OutboxState { queue, journal }),
            max: max.max(1),
            ready: tokio::sync::Notify::new(),
        }
    }

    pub fn push(&self, event: Event) {
        let mut state = self.lock();
        if state.queue.len() >= self.max {
            if let Some(lost) = state.queue.pop_front() {
                log::warn!(
                    "fleet: {} events wait for the broker; dropping the oldest ({} of request {:?})",
                    self.max,
                    lost.kind(),
                    lost.request_id
                );
                state.record(&Record::Gone);
            }
            metrics::counter!(crate::metrics::FLEET_EVENTS_DROPPED).increment(1);
        }
        state.record(&Record::Event(Box::new(event.clone())));
        state.queue.push_back(event);
        drop(state);
        self.ready.notify_one();
    }

    /// The oldest event, left in place until [`Outbox::sent`].
    pub fn front(&self) -> Option<Event> {
        self.lock().queue.front().cloned()
    }

    /// The oldest event was sent.
    pub fn sent(&self) {
        let mut state = self.lock();
        if state.queue.pop_front().is_some() {
            state.record(&Record::Gone);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until an event may have been pushed.
    pub async fn wait(&self) {
        self.ready.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl OutboxState {
    /// Appends `record` to the journal, then rewrites it if it has grown well beyond the
    /// events waiting. A journal that cannot be written is logged: the events still go out
    /// while the daemon runs.
    fn record(&mut self, record: &Record) {
        let Some(journal) = self.journal.as_mut() else { return };
        let mut line = serde_json::to_vec(record).expect("an event serializes");
        line.push(b'\n');
        let waiting = self.queue.len() + usize::from(matches!(record, Record::Event(_)));
        // An event is on disk before it counts as kept (a power cut loses none); a `Gone` line
        // lost only sends its event again, which readers tolerate.
        let durable = |file: &mut File| match record {
            Record::Event(_) => file.sync_data(),
            Record::Gone => Ok(()),
        };
        let result = journal.file.write_all(&line).and_then(|()| durable(&mut journal.file)).and_then(|()| {
            journal.lines += 1;
            if matches!(record, Record::Gone) && (waiting == 0 || journal.lines > 2 * waiting + JOURNAL_SLACK)
            {
                *journal = Journal::rewrite(journal.path.clone(), &self.queue)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            log::error!("fleet: cannot write the outbox journal {}: {e}", journal.path.display());
        }
    }
}

impl Journal {
    /// Replaces the file at `path` with one holding `queue` (through a temporary file, so a
    /// crash leaves the old or the new one).
    fn rewrite(path: PathBuf, queue: &VecDeque<Event>) -> std::io::Result<Self> {
        let tmp = path.with_extension("tmp");
        let mut bytes = Vec::new();
        for event in queue {
            serde_json::to_writer(&mut bytes, &Record::Event(Box::new(event.clone())))
                .map_err(std::io::Error::other)?;
            bytes.push(b'\n');
        }
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok(Self { path, file, lines: queue.len() })
    }
}

/// A capture a fleet request started: its end is reported once its start has been.
struct Started {
    request: FleetRequest,
    /// `accepted` and `started` are in the outbox.
    announced: bool,
    /// It ended before they were.
    ended: Option<CaptureInfo>,
}

/// What the state directory keeps of a capture a fleet request started, from just before it
/// starts until its end is in the outbox: `<dir>/<id>.json`. A daemon that finds one at its
/// start reports the capture's end (interrupted, if it was running when the daemon died).
#[derive(Serialize, Deserialize)]
struct StartedFile {
    request: FleetRequest,
    /// `accepted` and `started` are in the outbox.
    announced: bool,
}

/// This node's side of the fleet: decides requests, reports events.
pub struct Node {
    daemon: Arc<Daemon>,
    /// The transport its requests come through (`redis`, `nats`): their subject in the access
    /// rules (`[access.brokers]`) and the audit log. pcapdaemon's messages are `pcapdaemon`.
    transport: &'static str,
    name: String,
    labels: BTreeMap<String, String>,
    outbox: Arc<Outbox>,
    /// The captures fleet requests started in this process, by id, until they end.
    started: Mutex<HashMap<String, Started>>,
    /// Where each of them is kept ([`StartedFile`]); `None`: in memory only.
    started_dir: Option<PathBuf>,
}

impl Node {
    /// A node that keeps what it started in memory only.
    pub fn new(daemon: Arc<Daemon>, transport: &'static str, outbox: Arc<Outbox>) -> Self {
        let name = daemon.node().to_owned();
        let labels = daemon.config().daemon.labels.clone();
        Self {
            daemon,
            transport,
            name,
            labels,
            outbox,
            started: Mutex::new(HashMap::new()),
            started_dir: None,
        }
    }

    /// A node that keeps the captures it started in `dir`, one file each until its end is
    /// reported, and reports now the ends of those an earlier run left there (the captures
    /// that were running when it died end as interrupted). Call it after the daemon has loaded
    /// its captures and before deciding requests.
    pub fn persistent(
        daemon: Arc<Daemon>,
        transport: &'static str,
        outbox: Arc<Outbox>,
        dir: PathBuf,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut node = Self::new(daemon, transport, outbox);
        let mut earlier = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<StartedFile>(&b).map_err(|e| e.to_string()))
            {
                Ok(file) => earlier.push(file),
                Err(e) => log::warn!("fleet: ignoring the unreadable {}: {e}", path.display()),
            }
        }
        node.started_dir = Some(dir);
        for file in earlier {
            node.report_earlier(file);
        }
        Ok(node)
    }

    /// Reports what became of a capture an earlier run started for the fleet.
    fn report_earlier(&self, file: StartedFile) {
        let StartedFile { request, announced } = file;
        let info = match self.daemon.get(&request.id) {
            Ok(info) => info,
            Err(_) => {
                // It never started (the daemon died first; the request, not acknowledged, is
                // decided again), or it ended so long ago the daemon forgot it.
                log::info!("fleet: capture {} is unknown to the daemon: nothing to report", request.id);
                self.forget(&request.id);
                return;
            }
        };
        if !announced {
            self.outbox.push(Event::about(&request, &self.name, What::Accepted));
            self.outbox.push(Event::about(
                &request,
                &self.name,
                What::Started { interfaces: info.interfaces.clone(), location: info.location.clone() },
            ));
        }
        if info.state == CaptureState::Running || recovery_pending(&info) {
            // Not after a restart (the daemon marks those interrupted), or interrupted with
            // what it stored still to be recovered: its end is told later, with its objects.
            self.keep(&request, true);
            self.lock().insert(request.id.clone(), Started { request, announced: true, ended: None });
            return;
        }
        log::info!("fleet: reporting the end of capture {}, started before the restart", request.id);
        self.outbox.push(Event::ended(&request, &self.name, &info));
        self.forget(&request.id);
    }

    /// Writes the [`StartedFile`] of `request` (through a temporary file).
    fn keep(&self, request: &FleetRequest, announced: bool) {
        let Some(dir) = &self.started_dir else { return };
        let path = dir.join(format!("{}.json", request.id));
        let tmp = path.with_extension("json.tmp");
        let file = StartedFile { request: request.clone(), announced };
        let result = serde_json::to_vec(&file)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            log::error!("fleet: cannot save {}: {e}", path.display());
        }
    }

    /// Removes the [`StartedFile`] of capture `id`: its end is reported (or it never started).
    fn forget(&self, id: &str) {
        let Some(dir) = &self.started_dir else { return };
        let path = dir.join(format!("{id}.json"));
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            log::error!("fleet: cannot remove {}: {e}", path.display());
        }
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counts a message a transport saw was for another node (by its address, before any
    /// decision): acknowledge it, report nothing.
    pub fn not_for_this_node(&self) -> Outcome {
        metrics::counter!(crate::metrics::FLEET_REQUESTS_RECEIVED).increment(1);
        metrics::counter!(crate::metrics::FLEET_REQUESTS, "outcome" => "ignored").increment(1);
        Outcome::Ignored
    }

    /// Decides one message (`None`: it had no request body) and reports it. Blocks: it may
    /// compile a filter and start a capture.
    pub fn handle(&self, message: Option<&[u8]>) -> Outcome {
        let parsed = match message {
            Some(json) => FleetRequest::parse(json),
            None => Err(MessageError::NoBody { field: self::redis::REQUEST_FIELD }),
        };
        self.count(self.decide(self.transport, parsed, || message.and_then(request_id)))
    }

    /// Decides one message in pcapdaemon's format ([`pcapdaemon`]) and reports it. Blocks.
    pub fn handle_pcapdaemon(&self, message: &[u8]) -> Outcome {
        let parsed = pcapdaemon::PcapdaemonMessage::parse(message).and_then(|m| {
            if m.logrequest == Some(true) {
                log::info!("fleet: pcapdaemon message: {}", String::from_utf8_lossy(message));
            }
            m.request()
        });
        self.count(self.decide("pcapdaemon", parsed, || None))
    }

    fn count(&self, outcome: Outcome) -> Outcome {
        metrics::counter!(crate::metrics::FLEET_REQUESTS_RECEIVED).increment(1);
        if let Some(label) = outcome.label() {
            metrics::counter!(crate::metrics::FLEET_REQUESTS, "outcome" => label).increment(1);
        }
        if let Outcome::Refused(code) = outcome {
            metrics::counter!(crate::metrics::FLEET_REFUSED, "code" => code.as_str()).increment(1);
        }
        outcome
    }

    /// Decides a request that came through `transport`, or refuses a message that is none
    /// (naming the id `id_of` finds). Refusals before the daemon's decision are recorded in its
    /// audit log here; the daemon records its own.
    fn decide(
        &self,
        transport: &'static str,
        parsed: Result<FleetRequest, MessageError>,
        id_of: impl FnOnce() -> Option<String>,
    ) -> Outcome {
        let request = match parsed {
            Ok(request) => request,
            Err(e) => {
                let id = id_of();
                log::warn!("fleet: refusing a message (request {id:?}): {e}");
                let subject = Subject::Broker { transport, message_id: id.clone() };
                self.daemon.audit(Action::Start, &subject, None, None, Err(e.to_string()));
                self.outbox.push(Event::malformed(&self.name, id, &e));
                return Outcome::Refused(e.code());
            }
        };
        let subject = Subject::Broker { transport, message_id: Some(request.id.clone()) };
        let refuse_early = |code: RefusalCode, reason: String| {
            self.daemon.audit(Action::Start, &subject, None, Some(&request.capture), Err(reason.clone()));
            self.refuse(&request, code, reason)
        };
        match request.target.matches(&self.name, &self.labels) {
            Ok(true) => {}
            Ok(false) => {
                log::debug!("fleet: request {} is not for {}", request.id, self.name);
                return Outcome::Ignored;
            }
            Err(e) => return refuse_early(e.code(), e.to_string()),
        }
        if request.expired(SystemTime::now()) {
            let reason = format!(
                "expired: not_after {} has passed",
                humantime::format_rfc3339_seconds(request.not_after.0)
            );
            return refuse_early(RefusalCode::Expired, reason);
        }
        if request.capture.id.as_ref().is_some_and(|id| *id != request.id) {
            return refuse_early(
                RefusalCode::BadRequest,
                "capture.id: leave it out (the capture's id is the request's id)".into(),
            );
        }
        {
            let mut started = self.lock();
            if started.contains_key(&request.id) {
                log::info!("fleet: request {} is being started already: duplicate", request.id);
                return Outcome::Duplicate;
            }
            started.insert(
                request.id.clone(),
                Started { request: request.clone(), announced: false, ended: None },
            );
        }
        // Before it starts: a daemon killed from now on reports it at its next start.
        self.keep(&request, false);
        let mut capture = request.capture.clone();
        capture.id = Some(request.id.clone());
        capture.request_id = Some(request.id.clone());
        match self.daemon.start_capture(capture, &subject) {
            Ok(info) => {
                log::info!(
                    "fleet: request {} accepted: capture {} on {}",
                    request.id,
                    info.id,
                    info.interfaces_shown()
                );
                self.outbox.push(Event::about(&request, &self.name, What::Accepted));
                self.outbox.push(Event::about(
                    &request,
                    &self.name,
                    What::Started { interfaces: info.interfaces.clone(), location: info.location.clone() },
                ));
                let mut started = self.lock();
                if let Some(entry) = started.get_mut(&request.id) {
                    match entry.ended.take() {
                        Some(end) => {
                            self.outbox.push(Event::ended(&request, &self.name, &end));
                            started.remove(&request.id);
                            self.forget(&request.id);
                        }
                        None => {
                            entry.announced = true;
                            self.keep(&request, true);
                        }
                    }
                }
                Outcome::Accepted
            }
            Err(e) => {
                self.lock().remove(&request.id);
                self.forget(&request.id);
                match e {
                    RequestError::IdTaken { .. } => {
                        log::info!("fleet: request {} was seen before: duplicate", request.id);
                        Outcome::Duplicate
                    }
                    RequestError::Stopping => Outcome::Retry,
                    e => self.refuse(&request, RefusalCode::of(&e), e.to_string()),
                }
            }
        }
    }

    fn refuse(&self, request: &FleetRequest, code: RefusalCode, reason: String) -> Outcome {
        log::warn!("fleet: request {} refused ({}): {reason}", request.id, code.as_str());
        self.outbox.push(Event::about(request, &self.name, What::Refused { code, reason }));
        Outcome::Refused(code)
    }

    /// A capture of the daemon started or ended ([`Daemon::subscribe`]): reports the end of
    /// those fleet requests started.
    pub fn capture_changed(&self, info: &CaptureInfo) {
        if info.state == CaptureState::Running || recovery_pending(info) {
            return;
        }
        let mut started = self.lock();
        let Some(entry) = started.get_mut(&info.id) else { return };
        if entry.announced {
            self.outbox.push(Event::ended(&entry.request, &self.name, info));
            started.remove(&info.id);
            self.forget(&info.id);
        } else {
            entry.ended = Some(info.clone());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Started>> {
        self.started.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a transport keeps of a node in `dir` (its own part of the state directory): the
/// node, with the captures it started in `dir/requests/` and the events not sent yet in
/// `dir/outbox.jsonl` (at most `max_pending`), and the daemon's captures as they start and
/// end, for [`watch_ends`]. Subscribed before the node reports what an earlier run left, so
/// no end falls between.
pub fn open_node(
    daemon: Arc<Daemon>,
    transport: &'static str,
    dir: &Path,
    max_pending: usize,
) -> std::io::Result<(Arc<Node>, Arc<Outbox>, tokio::sync::mpsc::UnboundedReceiver<CaptureInfo>)> {
    std::fs::create_dir_all(dir)?;
    let outbox = Arc::new(Outbox::open(&dir.join("outbox.jsonl"), max_pending)?);
    let ends = daemon.subscribe();
    let node = Arc::new(Node::persistent(daemon, transport, outbox.clone(), dir.join("requests"))?);
    Ok((node, outbox, ends))
}

/// Tells `node` of each capture's end from `ends` until `finishing` turns true, then of those
/// told before it.
pub fn watch_ends(
    node: Arc<Node>,
    mut ends: tokio::sync::mpsc::UnboundedReceiver<CaptureInfo>,
    mut finishing: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                info = ends.recv() => match info {
                    Some(info) => node.capture_changed(&info),
                    None => return,
                },
                _ = finishing.wait_for(|f| *f) => {
                    while let Ok(info) = ends.try_recv() {
                        node.capture_changed(&info);
                    }
                    return;
                }
            }
        }
    })
}

/// The `id` of a message that is not a valid request, if it has a short textual one.
fn request_id(json: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(json).ok()?;
    value.get("id")?.as_str().filter(|id| id.len() <= 256).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> Event {
        let request =
            FleetRequest::parse(format!(r#"{{"id": "{id}", "not_after": 1, "capture": {{}}}}"#).as_bytes())
                .unwrap();
        Event::about(&request, "n", What::Accepted)
    }

    #[test]
    fn the_outbox_keeps_the_newest_when_full() {
        let outbox = Outbox::new(2);
        for id in ["a", "b", "c"] {
            outbox.push(event(id));
        }
        assert_eq!(outbox.len(), 2);
        assert_eq!(outbox.front().unwrap().request_id.as_deref(), Some("b"));
        outbox.sent();
        assert_eq!(outbox.front().unwrap().request_id.as_deref(), Some("c"));
        outbox.sent();
        assert!(outbox.is_empty());
    }

    fn ids(outbox: &Outbox) -> Vec<String> {
        outbox.lock().queue.iter().map(|e| e.request_id.clone().unwrap()).collect()
    }

    #[test]
    fn the_outbox_journal_keeps_what_was_not_sent_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.jsonl");
        {
            let outbox = Outbox::open(&path, 3).unwrap();
            for id in ["a", "b", "c", "d"] {
                outbox.push(event(id));
            }
            // "a" was dropped (full), "b" sent: "c" and "d" wait.
            outbox.sent();
            assert_eq!(ids(&outbox), ["c", "d"]);
        }
        let outbox = Outbox::open(&path, 3).unwrap();
        assert_eq!(ids(&outbox), ["c", "d"]);
        // Reopening rewrote the journal with what waits.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        outbox.sent();
        outbox.sent();
        assert!(outbox.is_empty());
        // Nothing waits: the journal is emptied.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        outbox.push(event("e"));
        // A line cut by a crash is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"event\": {\"ev")
            .unwrap();
        drop(outbox);
        assert_eq!(ids(&Outbox::open(&path, 3).unwrap()), ["e"]);
    }

    #[test]
    fn the_outbox_journal_is_rewritten_when_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.jsonl");
        let outbox = Outbox::open(&path, 10).unwrap();
        outbox.push(event("kept"));
        for _ in 0..JOURNAL_SLACK {
            outbox.push(event("x"));
            outbox.push(event("y"));
            outbox.sent();
            outbox.sent();
            outbox.push(event("kept"));
            outbox.sent();
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= 2 * outbox.len() + JOURNAL_SLACK + 1, "{lines} lines");
        assert_eq!(ids(&Outbox::open(&path, 10).unwrap()), ids(&outbox));
    }

    #[test]
    fn a_malformed_message_still_names_its_id() {
        assert_eq!(request_id(br#"{"id": "x1", "bogus": 1}"#).as_deref(), Some("x1"));
        assert_eq!(request_id(b"{not json"), None);
        assert_eq!(request_id(br#"{"id": 5}"#), None);
    }
}
