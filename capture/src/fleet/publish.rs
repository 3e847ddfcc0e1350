//! The operator's side of the fleet: the live nodes, publishing a request, and following what
//! each node answers.
//!
//! [`Broker`] speaks to Redis or NATS JetStream (blocking: the CLI has no runtime of its own;
//! NATS calls run on a small one); [`Answers`] folds the events of one request into one answer
//! per node, and says when nothing more is to come.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use ::redis::{
    Connection, RedisError,
    streams::{StreamRangeReply, StreamReadReply},
};
use serde::Serialize;

use super::{
    Event, FleetRequest, RefusalCode, What,
    nats::FleetNatsError,
    presence::Presence,
    redis::{FleetRedisError, REQUEST_FIELD, client, mask_password},
};
use crate::config::{NatsSection, RedisSection};

/// Errors speaking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Url(#[from] FleetRedisError),
    #[error("Redis at {url}: {source}")]
    Redis {
        url: String,
        #[source]
        source: RedisError,
    },
    #[error("encode the request: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    NatsUrl(#[from] FleetNatsError),
    #[error("NATS at {url}: {message}")]
    Nats { url: String, message: String },
}

/// The fleet's broker and its names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerSettings {
    Redis(RedisSection),
    Nats(NatsSection),
}

/// A connection to the fleet's broker.
/// (Both boxed: they differ much in size, and one is made per command.)
pub enum Broker {
    Redis(Box<RedisBroker>),
    Nats(Box<NatsBroker>),
}

impl Broker {
    pub fn connect(settings: &BrokerSettings) -> Result<Self, PublishError> {
        Ok(match settings {
            BrokerSettings::Redis(s) => Self::Redis(Box::new(RedisBroker::connect(s)?)),
            BrokerSettings::Nats(s) => Self::Nats(Box::new(NatsBroker::connect(s)?)),
        })
    }

    /// The URL, credentials masked.
    pub fn shown(&self) -> &str {
        match self {
            Self::Redis(b) => b.shown(),
            Self::Nats(b) => &b.shown,
        }
    }

    /// The live nodes, by name.
    pub fn nodes(&mut self) -> Result<Vec<Presence>, PublishError> {
        match self {
            Self::Redis(b) => b.nodes(),
            Self::Nats(b) => b.nodes(),
        }
    }

    /// Publishes `request`; returns the events' position just before, from which
    /// [`Broker::events`] reads its answers.
    pub fn publish(&mut self, request: &FleetRequest) -> Result<String, PublishError> {
        match self {
            Self::Redis(b) => b.publish(request),
            Self::Nats(b) => b.publish(request),
        }
    }

    /// The events after `cursor`, waiting up to `block` for one; moves `cursor` past them.
    pub fn events(&mut self, cursor: &mut String, block: Duration) -> Result<Vec<Event>, PublishError> {
        match self {
            Self::Redis(b) => b.events(cursor, block),
            Self::Nats(b) => b.events(cursor, block),
        }
    }
}

/// A connection to Redis.
pub struct RedisBroker {
    conn: Connection,
    settings: RedisSection,
    /// The URL with its password masked.
    shown: String,
}

impl RedisBroker {
    pub fn connect(settings: &RedisSection) -> Result<Self, PublishError> {
        let shown = mask_password(&settings.url);
        let conn = client(settings)?
            .get_connection_with_timeout(Duration::from_secs(5))
            .map_err(|source| PublishError::Redis { url: shown.clone(), source })?;
        Ok(Self { conn, settings: settings.clone(), shown })
    }

    /// The URL, password masked.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    fn failed(&self) -> impl Fn(RedisError) -> PublishError + '_ {
        |source| PublishError::Redis { url: self.shown.clone(), source }
    }

    /// The live nodes (their presence keys), by name.
    pub fn nodes(&mut self) -> Result<Vec<Presence>, PublishError> {
        let pattern = format!("{}*", self.settings.nodes_prefix);
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query(&mut self.conn)
                .map_err(self.failed())?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        keys.sort();
        keys.dedup();
        let mut nodes = Vec::new();
        for key in keys {
            // Expired since the scan: gone.
            let json: Option<String> =
                ::redis::cmd("GET").arg(&key).query(&mut self.conn).map_err(self.failed())?;
            match json.map(|j| serde_json::from_str::<Presence>(&j)) {
                Some(Ok(presence)) => nodes.push(presence),
                Some(Err(e)) => log::warn!("{key} is not a node's presence: {e}"),
                None => {}
            }
        }
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(nodes)
    }

    /// Publishes `request`; returns the events stream's position just before, from which
    /// [`Broker::events`] reads its answers.
    pub fn publish(&mut self, request: &FleetRequest) -> Result<String, PublishError> {
        let last: StreamRangeReply = ::redis::cmd("XREVRANGE")
            .arg(&self.settings.events_stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(&mut self.conn)
            .map_err(self.failed())?;
        let cursor = last.ids.first().map_or_else(|| "0-0".to_owned(), |e| e.id.clone());
        let json = serde_json::to_string(request)?;
        let _: String = ::redis::cmd("XADD")
            .arg(&self.settings.requests_stream)
            .arg("*")
            .arg(REQUEST_FIELD)
            .arg(json)
            .query(&mut self.conn)
            .map_err(self.failed())?;
        Ok(cursor)
    }

    /// The events after `cursor`, waiting up to `block` for one; moves `cursor` past them.
    /// Entries that are not events are skipped.
    pub fn events(&mut self, cursor: &mut String, block: Duration) -> Result<Vec<Event>, PublishError> {
        let reply: Option<StreamReadReply> = ::redis::cmd("XREAD")
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.settings.events_stream)
            .arg(cursor.as_str())
            .query(&mut self.conn)
            .map_err(self.failed())?;
        let mut events = Vec::new();
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            *cursor = entry.id.clone();
            let json: Option<String> = entry.get("json");
            match json.map(|j| serde_json::from_str::<Event>(&j)) {
                Some(Ok(event)) => events.push(event),
                _ => log::debug!("events entry {} is not an event", entry.id),
            }
        }
        Ok(events)
    }
}

/// A connection to NATS JetStream, on a runtime of its own (the CLI blocks).
pub struct NatsBroker {
    rt: tokio::runtime::Runtime,
    js: async_nats::jetstream::Context,
    settings: NatsSection,
    /// The URL without credentials.
    shown: String,
}

impl NatsBroker {
    pub fn connect(settings: &NatsSection) -> Result<Self, PublishError> {
        let shown = super::nats::mask(&settings.url);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PublishError::Nats { url: shown.clone(), message: e.to_string() })?;
        let js = rt.block_on(async {
            let client = super::nats::client(settings, "tapstream fleet", false).await?;
            Ok::<_, FleetNatsError>(
                async_nats::jetstream::ContextBuilder::new().timeout(Duration::from_secs(5)).build(client),
            )
        })?;
        Ok(Self { rt, js, settings: settings.clone(), shown })
    }

    fn failed(&self) -> impl Fn(async_nats::Error) -> PublishError + '_ {
        |e| PublishError::Nats { url: self.shown.clone(), message: e.to_string() }
    }

    /// The live nodes (the entries of the nodes bucket), by name.
    fn nodes(&mut self) -> Result<Vec<Presence>, PublishError> {
        use futures_util::TryStreamExt as _;
        let (js, bucket) = (&self.js, &self.settings.nodes_bucket);
        let found = self.rt.block_on(async {
            // No bucket: no node has announced itself yet.
            let Ok(store) = js.get_key_value(bucket.as_str()).await else { return Ok(Vec::new()) };
            let keys: Vec<String> = store.keys().await?.try_collect().await?;
            let mut found = Vec::new();
            for key in keys {
                // Expired since the listing: gone.
                if let Some(value) = store.get(&key).await? {
                    found.push((key, value));
                }
            }
            Ok::<_, async_nats::Error>(found)
        });
        let mut nodes = Vec::new();
        for (key, value) in found.map_err(self.failed())? {
            match serde_json::from_slice::<Presence>(&value) {
                Ok(presence) => nodes.push(presence),
                Err(e) => log::warn!("{key} in bucket {bucket} is not a node's presence: {e}"),
            }
        }
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(nodes)
    }

    /// The last sequence of the events stream (0: none yet).
    async fn last_event(js: &async_nats::jetstream::Context, stream: &str) -> Result<u64, async_nats::Error> {
        match js.get_stream(stream).await {
            Ok(stream) => Ok(stream.get_info().await?.state.last_sequence),
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::jetstream::context::GetStreamErrorKind::JetStream(j)
                        if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Publishes `request` on the subject of the node it names, else on `.all`, with its id as
    /// `Nats-Msg-Id`, and waits for the server's acknowledgement.
    fn publish(&mut self, request: &FleetRequest) -> Result<String, PublishError> {
        let json = serde_json::to_vec(request)?;
        let s = &self.settings;
        let to = match request.target.node.as_deref() {
            Some(node) if node != "any" => node,
            _ => "all",
        };
        let subject = format!("{}.{to}", s.requests_subject_prefix);
        let js = &self.js;
        let cursor = self.rt.block_on(async {
            let cursor = Self::last_event(js, &s.events_stream).await?;
            let publish = async_nats::jetstream::message::PublishMessage::build()
                .payload(json.into())
                .message_id(&request.id);
            js.send_publish(subject, publish).await?.await?;
            Ok::<_, async_nats::Error>(cursor)
        });
        Ok(cursor.map_err(self.failed())?.to_string())
    }

    /// The events after sequence `cursor`, waiting up to `block` for one.
    fn events(&mut self, cursor: &mut String, block: Duration) -> Result<Vec<Event>, PublishError> {
        let after: u64 = cursor.parse().unwrap_or(0);
        let (js, stream) = (&self.js, &self.settings.events_stream);
        let read = self.rt.block_on(async {
            let deadline = tokio::time::Instant::now() + block;
            loop {
                let last = Self::last_event(js, stream).await?;
                if last > after {
                    let stream = js.get_stream(stream).await?;
                    let mut read = Vec::new();
                    for seq in after + 1..=last.min(after + 256) {
                        // Removed (the stream's limit): skipped.
                        if let Ok(message) = stream.get_raw_message(seq).await {
                            read.push((seq, message.payload));
                        }
                    }
                    return Ok::<_, async_nats::Error>((last.min(after + 256), read));
                }
                if tokio::time::Instant::now() >= deadline {
                    return Ok((after, Vec::new()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let (last, read) = read.map_err(self.failed())?;
        *cursor = last.to_string();
        let mut events = Vec::new();
        for (seq, payload) in read {
            match serde_json::from_slice::<Event>(&payload) {
                Ok(event) => events.push(event),
                Err(_) => log::debug!("events message {seq} is not an event"),
            }
        }
        Ok(events)
    }
}

/// What one node answered to a request, so far.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Answer {
    Accepted,
    Refused {
        code: RefusalCode,
        reason: String,
    },
    Started {
        interfaces: Vec<String>,
    },
    Finished {
        /// Its interfaces, if its start was seen.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        interfaces: Vec<String>,
        stop_reason: String,
        packets: u64,
        bytes: u64,
        dropped: u64,
        outputs: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Failed {
        error: String,
    },
}

impl Answer {
    /// Nothing more is to come from this node.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Refused { .. } | Self::Finished { .. } | Self::Failed { .. })
    }

    /// What went wrong, for a node that refused, failed or ended on an error.
    pub fn problem(&self) -> Option<String> {
        match self {
            Self::Refused { code, reason } => Some(format!("refused ({}): {reason}", code.as_str())),
            Self::Failed { error } => Some(format!("failed: {error}")),
            Self::Finished { error: Some(error), .. } => Some(format!("ended on an error: {error}")),
            _ => None,
        }
    }
}

/// The answers to one request, by node.
#[derive(Debug)]
pub struct Answers {
    request_id: String,
    /// The live nodes the target matched when it was published: those expected to answer.
    expected: Vec<String>,
    pub by_node: BTreeMap<String, Answer>,
}

impl Answers {
    pub fn new(request_id: &str, expected: Vec<String>) -> Self {
        Self { request_id: request_id.to_owned(), expected, by_node: BTreeMap::new() }
    }

    /// Takes in an event; returns whether it was about this request.
    pub fn take(&mut self, event: Event) -> bool {
        if event.request_id.as_deref() != Some(self.request_id.as_str()) {
            return false;
        }
        let interfaces = match self.by_node.get(&event.node) {
            Some(Answer::Started { interfaces }) => interfaces.clone(),
            _ => Vec::new(),
        };
        let answer = match event.what {
            What::Accepted => Answer::Accepted,
            What::Refused { code, reason } => Answer::Refused { code, reason },
            What::Started { interfaces, .. } => Answer::Started { interfaces },
            What::Finished { stop_reason, packets, bytes, dropped, outputs, error, .. } => {
                Answer::Finished { interfaces, stop_reason, packets, bytes, dropped, outputs, error }
            }
            What::Failed { error } => Answer::Failed { error },
        };
        // A late duplicate of an earlier step does not undo a final answer.
        if !self.by_node.get(&event.node).is_some_and(Answer::is_final) {
            self.by_node.insert(event.node, answer);
        }
        true
    }

    /// The expected nodes that have not answered.
    pub fn silent(&self) -> Vec<&str> {
        self.expected.iter().filter(|n| !self.by_node.contains_key(*n)).map(String::as_str).collect()
    }

    /// Whether to stop following: every node that answered is done, and either every
    /// expected node answered or the request's `not_after` is past (no node takes it after).
    pub fn done(&self, now: SystemTime, not_after: SystemTime) -> bool {
        self.by_node.values().all(Answer::is_final)
            && (now > not_after || self.silent().is_empty() && !self.by_node.is_empty())
    }

    /// The nodes that refused or failed, with why.
    pub fn problems(&self) -> Vec<(&str, String)> {
        self.by_node.iter().filter_map(|(n, a)| a.problem().map(|p| (n.as_str(), p))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(node: &str, id: &str, what: What) -> Event {
        let request =
            FleetRequest::parse(format!(r#"{{"id": "{id}", "not_after": 1, "capture": {{}}}}"#).as_bytes())
                .unwrap();
        Event::about(&request, node, what)
    }

    fn finished(packets: u64) -> What {
        What::Finished {
            stop_reason: "packets".into(),
            packets,
            bytes: 10,
            dropped: 0,
            outputs: vec!["o".into()],
            error: None,
            lookback: None,
            cloudshark: None,
        }
    }

    #[test]
    fn answers_end_when_every_expected_node_is_done_or_the_deadline_passed() {
        let now = SystemTime::now();
        let later = now + Duration::from_secs(60);
        let mut answers = Answers::new("r1", vec!["a".into(), "b".into()]);
        assert!(!answers.done(now, later));
        assert!(answers.done(later + Duration::from_secs(1), later), "nobody answered by the deadline");
        assert!(!answers.take(event("a", "other", What::Accepted)));
        assert!(answers.take(event("a", "r1", What::Accepted)));
        answers.take(event(
            "a",
            "r1",
            What::Started { interfaces: vec!["tap0".into()], location: "x".into() },
        ));
        assert!(!answers.done(later + Duration::from_secs(1), later), "a is still capturing");
        answers.take(event("a", "r1", finished(5)));
        assert!(!answers.done(now, later), "b has not answered yet");
        assert_eq!(answers.silent(), ["b"]);
        answers.take(event(
            "b",
            "r1",
            What::Refused { code: RefusalCode::BadFilter, reason: "syntax error".into() },
        ));
        assert!(answers.done(now, later));
        let Answer::Finished { interfaces, packets, .. } = &answers.by_node["a"] else { panic!() };
        assert_eq!((interfaces.as_slice(), *packets), (&["tap0".to_owned()][..], 5));
        assert_eq!(answers.problems(), [("b", "refused (bad_filter): syntax error".to_owned())]);
        // A node that was not expected but answered counts as well.
        answers.take(event("c", "r1", What::Accepted));
        assert!(!answers.done(now, later));
    }
}
