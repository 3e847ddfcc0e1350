//! Fleet requests from a NATS JetStream stream, events to another (`[fleet.nats]`).
//!
//! Subjects and streams (with the default names):
//! - a request is published on `tapstream.requests.<node>` (for one node) or
//!   `tapstream.requests.all`, its body the request's JSON and its `Nats-Msg-Id` header the
//!   request's id, into the stream `TAPSTREAM_REQUESTS` (subjects `tapstream.requests.>`,
//!   `max_age` = `request_max_age_secs`, so stale requests expire on the server, and a
//!   `duplicate_window` in which a second publish of the same id is dropped);
//! - each node reads through its own durable pull consumer `tapstream-<node>` (filter
//!   `tapstream.requests.>`: nats-server 2.9 allows one filter subject per consumer), with
//!   explicit acknowledgements, and acknowledges a message once decided; one it received and
//!   did not acknowledge (a crash, an outage) is delivered again after `ack_wait_secs`.
//!   A message on another node's subject is acknowledged and ignored (no event); for the
//!   others, the body's target decides ([`Node::handle`]);
//! - each event is one message on `tapstream.events.<node>` in the stream `TAPSTREAM_EVENTS`
//!   (subjects `tapstream.events.>`), published with JetStream's acknowledgement and a
//!   `Nats-Msg-Id` stable per event ([`event_id`]), so an event sent again after an outage or
//!   a restart is dropped by the server as a duplicate.
//!
//! The daemon creates both streams when they are missing, and its consumer (new: it does not
//! replay old requests). Events wait in a bounded [`Outbox`] while the broker is unreachable
//! and are sent in order when it is back; the outbox and the captures started are kept in
//! `<state_dir>/fleet/nats/`. The client reconnects by itself (200 ms doubling to 5 s); the
//! reader and the sender retry with the same backoff.

use std::{path::PathBuf, sync::Arc, time::Duration};

use async_nats::{
    ConnectOptions,
    jetstream::{
        self, AckKind,
        consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
        message::PublishMessage,
        stream,
    },
};
use futures_util::StreamExt as _;
use tokio::{sync::watch, task::JoinHandle};

use super::{Event, Node, Outbox, What};
use crate::{config::NatsSection, control::daemon::Daemon, sys::Shutdown};

/// How long one pull waits for requests.
const BLOCK: Duration = Duration::from_secs(1);
/// Requests pulled at a time.
const BATCH: usize = 16;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a JetStream request (a publish's acknowledgement, a stream's info) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The environment variables of the credentials.
pub const USER_VAR: &str = "TAPSTREAM_NATS_USER";
pub const PASSWORD_VAR: &str = "TAPSTREAM_NATS_PASSWORD";
pub const TOKEN_VAR: &str = "TAPSTREAM_NATS_TOKEN";

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Errors setting up the transport.
#[derive(Debug, thiserror::Error)]
pub enum FleetNatsError {
    /// The URL or the credentials cannot be used (the URL shown without credentials).
    #[error("fleet.nats.url {url}: {message}")]
    Url { url: String, message: String },
    /// The node's name cannot be a subject token.
    #[error("daemon.node {node:?} cannot name a NATS subject or consumer: use letters, digits, - and _")]
    Node { node: String },
    /// The fleet's part of the state directory cannot be used.
    #[error("cannot use the fleet's state in {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The credentials from the environment.
#[derive(Debug, PartialEq, Eq)]
pub enum Credentials {
    UserPassword { user: String, password: String },
    Token(String),
}

/// The credentials in the environment (`env` looks a variable up), if any.
pub fn credentials(env: impl Fn(&str) -> Option<String>) -> Result<Option<Credentials>, String> {
    match (env(USER_VAR), env(PASSWORD_VAR), env(TOKEN_VAR)) {
        (None, None, None) => Ok(None),
        (Some(user), Some(password), None) => Ok(Some(Credentials::UserPassword { user, password })),
        (None, None, Some(token)) => Ok(Some(Credentials::Token(token))),
        (_, _, Some(_)) => Err(format!("{TOKEN_VAR} excludes {USER_VAR} and {PASSWORD_VAR}")),
        _ => Err(format!("{USER_VAR} and {PASSWORD_VAR} go together")),
    }
}

/// `url` with any credentials in it replaced by `***`.
pub fn mask(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// A client of the server of `settings`, with the credentials of the environment; it
/// reconnects with a backoff from 200 ms to 5 s. `background`: it also makes its first
/// connection in the background (a daemon), rather than failing when the server is away (the
/// CLI).
pub async fn client(
    settings: &NatsSection,
    name: &str,
    background: bool,
) -> Result<async_nats::Client, FleetNatsError> {
    let shown = mask(&settings.url);
    let bad = |message: String| FleetNatsError::Url { url: shown.clone(), message };
    let mut options = ConnectOptions::new();
    match credentials(|name| std::env::var(name).ok()).map_err(bad)? {
        Some(Credentials::UserPassword { user, password }) => {
            options = options.user_and_password(user, password)
        }
        Some(Credentials::Token(token)) => options = options.token(token),
        None => {}
    }
    if settings.url.starts_with("tls://") {
        options = options.require_tls(true);
        if let Some(ca) = &settings.tls_ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&settings.tls_cert_file, &settings.tls_key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    let logged = shown.clone();
    if background {
        options = options.retry_on_initial_connect();
    }
    options = options
        .name(name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(REQUEST_TIMEOUT))
        .reconnect_delay_callback(|attempts| {
            let shift = attempts.min(8) as u32;
            (BACKOFF_MIN * 2u32.pow(shift)).min(BACKOFF_MAX)
        })
        .event_callback(move |event| {
            let logged = logged.clone();
            async move {
                match event {
                    async_nats::Event::Connected => log::info!("fleet: connected to NATS at {logged}"),
                    async_nats::Event::Disconnected => {
                        connected(false);
                        log::warn!("fleet: NATS at {logged} is unreachable; reconnecting");
                    }
                    // An authorization refused, a slow consumer: what the retries' timeouts
                    // would not say.
                    e @ (async_nats::Event::ServerError(_) | async_nats::Event::ClientError(_)) => {
                        log::warn!("fleet: NATS at {logged}: {e}")
                    }
                    other => log::debug!("fleet: NATS at {logged}: {other}"),
                }
            }
        });
    options.connect(settings.url.as_str()).await.map_err(|e| bad(e.to_string()))
}

/// The running transport: reader, event sender and the watcher of captures' ends.
pub struct NatsFleet {
    reader: JoinHandle<()>,
    watcher: JoinHandle<()>,
    sender: JoinHandle<()>,
    /// Tells the watcher, then the sender, to finish.
    finish: watch::Sender<bool>,
    outbox: Arc<Outbox>,
}

/// Where to connect and what to use there.
#[derive(Clone)]
struct Link {
    js: jetstream::Context,
    /// The URL without credentials, for logs.
    shown: String,
    settings: NatsSection,
    /// This node's name.
    node: String,
    /// Its durable consumer.
    consumer: String,
}

impl Link {
    fn requests_stream(&self) -> stream::Config {
        let s = &self.settings;
        stream::Config {
            name: s.requests_stream.clone(),
            subjects: vec![format!("{}.>", s.requests_subject_prefix)],
            max_age: Duration::from_secs(s.request_max_age_secs),
            duplicate_window: Duration::from_secs(s.duplicate_window_secs),
            storage: stream::StorageType::File,
            ..Default::default()
        }
    }

    fn events_stream(&self) -> stream::Config {
        let s = &self.settings;
        stream::Config {
            name: s.events_stream.clone(),
            subjects: vec![format!("{}.>", s.events_subject_prefix)],
            max_messages: if s.events_max_messages == 0 { -1 } else { s.events_max_messages as i64 },
            duplicate_window: Duration::from_secs(s.duplicate_window_secs),
            storage: stream::StorageType::File,
            ..Default::default()
        }
    }

    /// The subject of this node's events.
    fn events_subject(&self) -> String {
        format!("{}.{}", self.settings.events_subject_prefix, self.node)
    }

    /// Whether a request published on `subject` may be for this node: on its own subject or
    /// on `.all`.
    fn addressed_here(&self, subject: &str) -> bool {
        match subject
            .strip_prefix(self.settings.requests_subject_prefix.as_str())
            .and_then(|s| s.strip_prefix('.'))
        {
            Some(rest) => rest == "all" || rest == self.node,
            None => false,
        }
    }
}

impl NatsFleet {
    /// Starts reading requests for `daemon` on the current tokio runtime; stops reading
    /// when `shutdown` turns true. Events are sent until [`NatsFleet::finish`].
    pub async fn start(
        daemon: Arc<Daemon>,
        settings: &NatsSection,
        shutdown: Shutdown,
    ) -> Result<Self, FleetNatsError> {
        crate::metrics::register_fleet(super::RefusalCode::ALL.map(super::RefusalCode::as_str), "nats");
        let node_name = daemon.node().to_owned();
        if !crate::config::nats_name(&node_name) {
            return Err(FleetNatsError::Node { node: node_name });
        }
        let client = client(settings, &format!("tapstream {node_name}"), true).await?;
        let js = jetstream::ContextBuilder::new().timeout(REQUEST_TIMEOUT).build(client);
        let link = Link {
            js,
            shown: mask(&settings.url),
            settings: settings.clone(),
            consumer: format!("{}{node_name}", settings.consumer_prefix),
            node: node_name,
        };
        // What must survive a restart: the events not sent yet, and the captures started.
        let dir = daemon.config().daemon.state_dir.join("fleet").join("nats");
        let (node, outbox, ends) = super::open_node(daemon, "nats", &dir, settings.max_pending_events)
            .map_err(|source| FleetNatsError::State { path: dir.clone(), source })?;
        let (finish, finishing) = watch::channel(false);
        let reader = tokio::spawn(read_requests(node.clone(), link.clone(), shutdown));
        let watcher = super::watch_ends(node.clone(), ends, finishing.clone());
        let sender = tokio::spawn(send_events(outbox.clone(), link, finishing));
        Ok(Self { reader, watcher, sender, finish, outbox })
    }

    /// After the daemon's captures have ended: reports their ends and sends what events are
    /// left, for at most `grace`.
    pub async fn finish(self, grace: Duration) {
        let _ = self.finish.send(true);
        let _ = self.watcher.await;
        if tokio::time::timeout(grace, self.sender).await.is_err() {
            log::warn!(
                "fleet: {} events could not be sent to NATS before the daemon stopped",
                self.outbox.len()
            );
        }
        self.reader.abort();
    }
}

fn connected(up: bool) {
    metrics::gauge!(crate::metrics::FLEET_BROKER_CONNECTED, "transport" => "nats").set(if up {
        1.0
    } else {
        0.0
    });
}

/// Reads and decides requests until `shutdown`; starts again after errors.
async fn read_requests(node: Arc<Node>, link: Link, shutdown: Shutdown) {
    let mut backoff = BACKOFF_MIN;
    loop {
        if shutdown.is_set() {
            return;
        }
        match read_from(&node, &link, &shutdown, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                connected(false);
                log::warn!("fleet: NATS at {}: {e}; trying again in {backoff:?}", link.shown);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            () = shutdown.wait() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The consumer of this node, its streams created first when missing. Streams and a
/// consumer that exist already keep their settings (a warning says where they differ from
/// the configuration's).
async fn consumer(link: &Link) -> Result<PullConsumer, Error> {
    let wanted = link.requests_stream();
    let requests = link.js.get_or_create_stream(wanted.clone()).await?;
    let have = &requests.cached_info().config;
    if (&have.subjects, have.max_age, have.duplicate_window)
        != (&wanted.subjects, wanted.max_age, wanted.duplicate_window)
    {
        log::warn!(
            "fleet: NATS stream {} exists with subjects {:?}, max age {:?}, duplicate window {:?}; \
             the configuration's {:?}, {:?}, {:?} are not applied to it",
            wanted.name,
            have.subjects,
            have.max_age,
            have.duplicate_window,
            wanted.subjects,
            wanted.max_age,
            wanted.duplicate_window
        );
    }
    link.js.get_or_create_stream(link.events_stream()).await?;
    let config = pull::Config {
        durable_name: Some(link.consumer.clone()),
        filter_subject: format!("{}.>", link.settings.requests_subject_prefix),
        deliver_policy: DeliverPolicy::New,
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(link.settings.ack_wait_secs),
        max_deliver: -1,
        ..Default::default()
    };
    let consumer: PullConsumer = requests.get_or_create_consumer(&link.consumer, config.clone()).await?;
    let have = &consumer.cached_info().config;
    if (&have.filter_subject, have.ack_wait) != (&config.filter_subject, config.ack_wait) {
        log::warn!(
            "fleet: NATS consumer {} exists with filter {:?} and ack wait {:?}; the configuration's \
             {:?} and {:?} are not applied to it (delete the consumer to apply them)",
            link.consumer,
            have.filter_subject,
            have.ack_wait,
            config.filter_subject,
            config.ack_wait
        );
    }
    Ok(consumer)
}

/// Reads until `shutdown` (Ok) or an error.
async fn read_from(
    node: &Arc<Node>,
    link: &Link,
    shutdown: &Shutdown,
    backoff: &mut Duration,
) -> Result<(), Error> {
    let consumer = tokio::select! {
        consumer = consumer(link) => consumer?,
        () = shutdown.wait() => return Ok(()),
    };
    connected(true);
    *backoff = BACKOFF_MIN;
    log::info!(
        "fleet: reading requests from NATS stream {} ({}.>) on {} as consumer {}",
        link.settings.requests_stream,
        link.settings.requests_subject_prefix,
        link.shown,
        link.consumer
    );
    loop {
        let mut batch = tokio::select! {
            batch = consumer.batch().max_messages(BATCH).expires(BLOCK).messages() => batch?,
            () = shutdown.wait() => return Ok(()),
        };
        loop {
            // A pull the server never answers (the connection is gone) ends here.
            let next = tokio::select! {
                next = tokio::time::timeout(BLOCK + REQUEST_TIMEOUT, batch.next()) => next,
                () = shutdown.wait() => return Ok(()),
            };
            let message = match next {
                Ok(Some(message)) => message?,
                Ok(None) => break,
                Err(_) => return Err("no answer to a pull of requests".into()),
            };
            decide(node, link, message).await?;
            if shutdown.is_set() {
                return Ok(());
            }
        }
    }
}

/// Decides one message (on a blocking thread, keeping it in progress meanwhile) and
/// acknowledges it if decided.
async fn decide(node: &Arc<Node>, link: &Link, message: jetstream::Message) -> Result<(), Error> {
    let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
    let outcome = if !link.addressed_here(message.subject.as_str()) {
        log::debug!("fleet: message {sequence} on {} is for another node", message.subject);
        node.not_for_this_node()
    } else {
        let body = message.payload.clone();
        let deciding = node.clone();
        let mut handle = tokio::task::spawn_blocking(move || deciding.handle(Some(&body)));
        // A decision may take a while (a filter's compile): the server is told it goes on.
        let progress = Duration::from_secs(link.settings.ack_wait_secs).max(Duration::from_secs(2)) / 2;
        let decided = loop {
            tokio::select! {
                decided = &mut handle => break decided,
                _ = tokio::time::sleep(progress) => {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            }
        };
        match decided {
            Ok(outcome) => outcome,
            Err(e) => {
                log::error!("fleet: deciding message {sequence} failed: {e}; it will be delivered again");
                return Ok(());
            }
        }
    };
    log::debug!("fleet: message {sequence}: {outcome:?}");
    if outcome.decided() {
        message.ack().await?;
    }
    Ok(())
}

/// Sends the outbox's events in order until `finish` and the outbox is empty; keeps each
/// until the server acknowledged it.
async fn send_events(outbox: Arc<Outbox>, link: Link, mut finish: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    let mut failed = false;
    loop {
        let Some(event) = outbox.front() else {
            if *finish.borrow() {
                return;
            }
            tokio::select! {
                _ = outbox.wait() => {}
                _ = finish.wait_for(|f| *f) => {}
            }
            continue;
        };
        let result = async {
            if failed {
                // The stream may be gone with the server's state: make it again.
                link.js.get_or_create_stream(link.events_stream()).await?;
            }
            publish_event(&link, &event).await
        }
        .await;
        match result {
            Ok(ack) => {
                outbox.sent();
                metrics::counter!(crate::metrics::FLEET_EVENTS_PUBLISHED).increment(1);
                log::debug!(
                    "fleet: event {} of request {:?} sent as {}{}",
                    event.kind(),
                    event.request_id,
                    ack.sequence,
                    if ack.duplicate { " (a duplicate the server dropped)" } else { "" }
                );
                if failed {
                    connected(true);
                }
                failed = false;
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                failed = true;
                connected(false);
                metrics::counter!(crate::metrics::FLEET_EVENTS_FAILED).increment(1);
                log::warn!(
                    "fleet: cannot send events to NATS at {} ({e}); {} wait, trying again in {backoff:?}",
                    link.shown,
                    outbox.len()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Publishes `event` and waits for the server's acknowledgement.
async fn publish_event(link: &Link, event: &Event) -> Result<jetstream::publish::PublishAck, Error> {
    let json = serde_json::to_vec(event)?;
    let publish = PublishMessage::build().payload(json.into()).message_id(event_id(event));
    Ok(link.js.send_publish(link.events_subject(), publish).await?.await?)
}

/// The `Nats-Msg-Id` of an event: the same each time the same event is sent (after an
/// outage, after a restart), distinct between the events of a request:
/// `<node>.<request id>.<kind>` (a refusal adds its code); an event without a request id (a
/// message that was no request) is named by a hash of its JSON.
pub fn event_id(event: &Event) -> String {
    match (&event.request_id, &event.what) {
        (Some(id), What::Refused { code, .. }) => format!("{}.{id}.refused.{}", event.node, code.as_str()),
        (Some(id), _) => format!("{}.{id}.{}", event.node, event.kind()),
        (None, _) => {
            let json = serde_json::to_vec(event).unwrap_or_default();
            // FNV-1a: the same in every run and build.
            let hash = json
                .iter()
                .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
            format!("{}.{}.{hash:016x}", event.node, event.kind())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{FleetRequest, MessageError, RefusalCode};

    #[test]
    fn credentials_come_from_the_environment_and_are_masked_in_urls() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        assert_eq!(credentials(env(&[])), Ok(None));
        assert_eq!(
            credentials(env(&[(USER_VAR, "u"), (PASSWORD_VAR, "p")])),
            Ok(Some(Credentials::UserPassword { user: "u".into(), password: "p".into() }))
        );
        assert_eq!(credentials(env(&[(TOKEN_VAR, "t")])), Ok(Some(Credentials::Token("t".into()))));
        let err = credentials(env(&[(USER_VAR, "u")])).unwrap_err();
        assert!(err.contains(USER_VAR) && err.contains(PASSWORD_VAR), "{err}");
        assert!(credentials(env(&[(TOKEN_VAR, "t"), (USER_VAR, "u"), (PASSWORD_VAR, "p")])).is_err());
        assert_eq!(mask("nats://alice:s3cret@h:4222"), "nats://***@h:4222");
        assert_eq!(mask("nats://s3cret@h:4222"), "nats://***@h:4222");
        assert_eq!(mask("nats://h:4222"), "nats://h:4222");
    }

    #[test]
    fn event_ids_are_stable_and_distinct_per_event() {
        let request = FleetRequest::parse(br#"{"id": "r1", "not_after": 1, "capture": {}}"#).unwrap();
        let accepted = Event::about(&request, "n1", What::Accepted);
        let mut later = accepted.clone();
        later.time = "2030-01-01T00:00:00Z".into();
        assert_eq!(event_id(&accepted), "n1.r1.accepted");
        assert_eq!(event_id(&later), event_id(&accepted), "the same event, sent again");
        let started = Event::about(
            &request,
            "n1",
            What::Started { interfaces: vec!["i".into()], location: "l".into() },
        );
        assert_eq!(event_id(&started), "n1.r1.started");
        let refused =
            Event::about(&request, "n1", What::Refused { code: RefusalCode::Expired, reason: "x".into() });
        assert_eq!(event_id(&refused), "n1.r1.refused.expired");
        assert_ne!(event_id(&Event::about(&request, "n2", What::Accepted)), event_id(&accepted));
        // Messages that were no request: by their content.
        let a = Event::malformed("n1", None, &MessageError::NoBody { field: "a" });
        let b = Event::malformed("n1", None, &MessageError::NoBody { field: "b" });
        assert_eq!(event_id(&a), event_id(&a.clone()));
        assert_ne!(event_id(&a), event_id(&b));
        assert!(event_id(&a).starts_with("n1.refused."), "{}", event_id(&a));
    }
}
