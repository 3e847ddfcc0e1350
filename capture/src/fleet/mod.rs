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
//! [`Node`] is this decision, whatever the broker; [`redis`] reads and writes Redis Streams.

pub mod event;
pub mod message;
pub mod presence;
pub mod publish;
pub mod redis;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::SystemTime,
};

pub use event::{Event, RefusalCode, What};
pub use message::{FleetRequest, MessageError, Target};

use crate::control::{CaptureInfo, CaptureState, daemon::Daemon, daemon::RequestError};

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
/// counted).
pub struct Outbox {
    queue: Mutex<VecDeque<Event>>,
    max: usize,
    ready: tokio::sync::Notify,
}

impl Outbox {
    pub fn new(max: usize) -> Self {
        Self { queue: Mutex::new(VecDeque::new()), max: max.max(1), ready: tokio::sync::Notify::new() }
    }

    pub fn push(&self, event: Event) {
        let mut queue = self.lock();
        if queue.len() >= self.max {
            if let Some(lost) = queue.pop_front() {
                log::warn!(
                    "fleet: {} events wait for the broker; dropping the oldest ({} of request {:?})",
                    self.max,
                    lost.kind(),
                    lost.request_id
                );
            }
            metrics::counter!(crate::metrics::FLEET_EVENTS_DROPPED).increment(1);
        }
        queue.push_back(event);
        drop(queue);
        self.ready.notify_one();
    }

    /// The oldest event, left in place until [`Outbox::sent`].
    pub fn front(&self) -> Option<Event> {
        self.lock().front().cloned()
    }

    /// The oldest event was sent.
    pub fn sent(&self) {
        self.lock().pop_front();
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until an event may have been pushed.
    pub async fn wait(&self) {
        self.ready.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Event>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
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

/// This node's side of the fleet: decides requests, reports events.
pub struct Node {
    daemon: Arc<Daemon>,
    name: String,
    labels: BTreeMap<String, String>,
    outbox: Arc<Outbox>,
    /// The captures fleet requests started in this process, by id, until they end.
    started: Mutex<HashMap<String, Started>>,
}

impl Node {
    pub fn new(daemon: Arc<Daemon>, outbox: Arc<Outbox>) -> Self {
        let name = daemon.node().to_owned();
        let labels = daemon.config().daemon.labels.clone();
        Self { daemon, name, labels, outbox, started: Mutex::new(HashMap::new()) }
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Decides one message (`None`: it had no request body) and reports it. Blocks: it may
    /// compile a filter and start a capture.
    pub fn handle(&self, message: Option<&[u8]>) -> Outcome {
        metrics::counter!(crate::metrics::FLEET_REQUESTS_RECEIVED).increment(1);
        let outcome = self.decide(message);
        if let Some(label) = outcome.label() {
            metrics::counter!(crate::metrics::FLEET_REQUESTS, "outcome" => label).increment(1);
        }
        if let Outcome::Refused(code) = outcome {
            metrics::counter!(crate::metrics::FLEET_REFUSED, "code" => code.as_str()).increment(1);
        }
        outcome
    }

    fn decide(&self, message: Option<&[u8]>) -> Outcome {
        let parsed = match message {
            Some(json) => FleetRequest::parse(json),
            None => Err(MessageError::NoBody { field: self::redis::REQUEST_FIELD }),
        };
        let request = match parsed {
            Ok(request) => request,
            Err(e) => {
                let id = message.and_then(request_id);
                log::warn!("fleet: refusing a message (request {id:?}): {e}");
                self.outbox.push(Event::malformed(&self.name, id, &e));
                return Outcome::Refused(e.code());
            }
        };
        match request.target.matches(&self.name, &self.labels) {
            Ok(true) => {}
            Ok(false) => {
                log::debug!("fleet: request {} is not for {}", request.id, self.name);
                return Outcome::Ignored;
            }
            Err(e) => return self.refuse(&request, e.code(), e.to_string()),
        }
        if request.expired(SystemTime::now()) {
            let reason = format!(
                "expired: not_after {} has passed",
                humantime::format_rfc3339_seconds(request.not_after.0)
            );
            return self.refuse(&request, RefusalCode::Expired, reason);
        }
        if request.capture.id.as_ref().is_some_and(|id| *id != request.id) {
            return self.refuse(
                &request,
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
        let mut capture = request.capture.clone();
        capture.id = Some(request.id.clone());
        match self.daemon.start_capture(capture, None) {
            Ok(info) => {
                log::info!(
                    "fleet: request {} accepted: capture {} on {}",
                    request.id,
                    info.id,
                    info.interface
                );
                self.outbox.push(Event::about(&request, &self.name, What::Accepted));
                self.outbox.push(Event::about(
                    &request,
                    &self.name,
                    What::Started { interface: info.interface.clone(), location: info.location.clone() },
                ));
                let mut started = self.lock();
                if let Some(entry) = started.get_mut(&request.id) {
                    match entry.ended.take() {
                        Some(end) => {
                            self.outbox.push(Event::ended(&request, &self.name, &end));
                            started.remove(&request.id);
                        }
                        None => entry.announced = true,
                    }
                }
                Outcome::Accepted
            }
            Err(e) => {
                self.lock().remove(&request.id);
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
        if info.state == CaptureState::Running {
            return;
        }
        let mut started = self.lock();
        let Some(entry) = started.get_mut(&info.id) else { return };
        if entry.announced {
            self.outbox.push(Event::ended(&entry.request, &self.name, info));
            started.remove(&info.id);
        } else {
            entry.ended = Some(info.clone());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Started>> {
        self.started.lock().unwrap_or_else(|e| e.into_inner())
    }
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

    #[test]
    fn a_malformed_message_still_names_its_id() {
        assert_eq!(request_id(br#"{"id": "x1", "bogus": 1}"#).as_deref(), Some("x1"));
        assert_eq!(request_id(b"{not json"), None);
        assert_eq!(request_id(br#"{"id": 5}"#), None);
    }
}
