//! Fleet requests from a Redis stream, events to another (`[fleet.redis]`).
//!
//! A request is an entry of the requests stream whose field `request` holds the JSON. Each
//! node reads through its own consumer group (`<group_prefix><node>`, created at the end of
//! the stream when missing, so a new node does not replay old requests), as consumer
//! `<node>`, with `XREADGROUP ... BLOCK`, and acknowledges (`XACK`) each entry once decided.
//! At every (re)connection it first takes back its group's pending entries (`XAUTOCLAIM`),
//! those received before a crash or an outage and not acknowledged, and decides them.
//!
//! Each event is an entry of the events stream with the fields `event` (its kind), `node`,
//! `request_id` and `json` (the whole [`Event`](super::Event)), added with `MAXLEN ~` so the
//! stream keeps about `events_max_len` entries. Events wait in a bounded [`Outbox`] while the
//! broker is unreachable, and are sent in order when it is back; the outbox and the captures
//! started are kept in `<state_dir>/fleet/`, so neither is lost when the daemon restarts.
//!
//! Two connections: one blocks in `XREADGROUP`, the other adds events. Both reconnect with a
//! backoff from 200 ms to 5 s.

use std::{path::PathBuf, sync::Arc, time::Duration};

use ::redis::{
    AsyncConnectionConfig, Client, ConnectionInfo, IntoConnectionInfo as _, RedisError,
    aio::MultiplexedConnection,
    streams::{StreamAutoClaimReply, StreamId, StreamReadReply},
};
use tokio::{sync::watch, task::JoinHandle};

use super::{Node, Outbox};
use crate::{config::RedisSection, control::daemon::Daemon, sys::Shutdown};

/// The field of a requests stream entry that holds the request's JSON.
pub const REQUEST_FIELD: &str = "request";
/// How long one `XREADGROUP` blocks.
const BLOCK: Duration = Duration::from_secs(1);
/// Entries read or claimed at a time.
const BATCH: usize = 16;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Errors setting up the transport.
#[derive(Debug, thiserror::Error)]
pub enum FleetRedisError {
    /// The URL cannot be used (the message names the URL with its password masked).
    #[error("fleet.redis.url {url}: {message}")]
    Url { url: String, message: String },
    /// A TLS file of the configuration cannot be read.
    #[error("fleet.redis.{field} {}", path.display())]
    TlsFile {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The fleet's part of the state directory cannot be used.
    #[error("cannot use the fleet's state in {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The running transport: reader, event sender and the watcher of captures' ends.
pub struct RedisFleet {
    reader: JoinHandle<()>,
    /// Reads `pcapdaemon_channel`, when set.
    pubsub: Option<JoinHandle<()>>,
    watcher: JoinHandle<()>,
    sender: JoinHandle<()>,
    /// Tells the watcher, then the sender, to finish.
    finish: watch::Sender<bool>,
    outbox: Arc<Outbox>,
}

/// Where to connect and what to use there.
#[derive(Clone)]
struct Link {
    client: Client,
    /// The URL with its password masked, for logs.
    shown: String,
    requests: String,
    events: String,
    /// `MAXLEN ~` of each `XADD` to the events stream; 0: none.
    events_max_len: u64,
    group: String,
    consumer: String,
}

impl RedisFleet {
    /// Starts reading requests for `daemon` on the current tokio runtime; stops reading
    /// when `shutdown` turns true. Events are sent until [`RedisFleet::finish`].
    pub fn start(
        daemon: Arc<Daemon>,
        settings: &RedisSection,
        shutdown: Shutdown,
    ) -> Result<Self, FleetRedisError> {
        crate::metrics::register_fleet(super::RefusalCode::ALL.map(super::RefusalCode::as_str), "redis");
        let shown = mask_password(&settings.url);
        let client = client(settings)?;
        let node_name = daemon.node().to_owned();
        let link = Link {
            client,
            shown,
            requests: settings.requests_stream.clone(),
            events: settings.events_stream.clone(),
            events_max_len: settings.events_max_len,
            group: format!("{}{node_name}", settings.group_prefix),
            consumer: node_name,
        };
        // What must survive a restart: the events not sent yet, and the captures started.
        let dir = daemon.config().daemon.state_dir.join("fleet");
        let (node, outbox, ends) = super::open_node(daemon, "redis", &dir, settings.max_pending_events)
            .map_err(|source| FleetRedisError::State { path: dir.clone(), source })?;
        let (finish, finishing) = watch::channel(false);
        let pubsub = (!settings.pcapdaemon_channel.is_empty()).then(|| {
            let channel = settings.pcapdaemon_channel.clone();
            tokio::spawn(read_pcapdaemon(node.clone(), link.clone(), channel, shutdown.clone()))
        });
        let reader = tokio::spawn(read_requests(node.clone(), link.clone(), shutdown));
        let watcher = super::watch_ends(node.clone(), ends, finishing.clone());
        let sender = tokio::spawn(send_events(outbox.clone(), link, finishing));
        Ok(Self { reader, pubsub, watcher, sender, finish, outbox })
    }

    /// After the daemon's captures have ended: reports their ends and sends what events are
    /// left, for at most `grace`.
    pub async fn finish(self, grace: Duration) {
        let _ = self.finish.send(true);
        let _ = self.watcher.await;
        if tokio::time::timeout(grace, self.sender).await.is_err() {
            log::warn!("fleet: {} events could not be sent before the daemon stopped", self.outbox.len());
        }
        self.reader.abort();
        if let Some(pubsub) = self.pubsub {
            pubsub.abort();
        }
    }
}

/// A client for the server of `settings`: over TLS for `rediss://`, trusting `tls_ca_file`
/// (else the system's authorities) and presenting `tls_cert_file` if given.
pub fn client(settings: &RedisSection) -> Result<Client, FleetRedisError> {
    let info = connection_info(settings, |name| std::env::var(name).ok())?;
    let bad =
        |e: RedisError| FleetRedisError::Url { url: mask_password(&settings.url), message: e.to_string() };
    if !settings.url.starts_with("rediss://") {
        return Client::open(info).map_err(bad);
    }
    let read = |field: &'static str, path: &PathBuf| {
        std::fs::read(path).map_err(|source| FleetRedisError::TlsFile { field, path: path.clone(), source })
    };
    let root_cert = settings.tls_ca_file.as_ref().map(|p| read("tls_ca_file", p)).transpose()?;
    let client_tls = match (&settings.tls_cert_file, &settings.tls_key_file) {
        (Some(cert), Some(key)) => Some(::redis::ClientTlsConfig {
            client_cert: read("tls_cert_file", cert)?,
            client_key: read("tls_key_file", key)?,
        }),
        _ => None,
    };
    Client::build_with_tls(info, ::redis::TlsCertificates { client_tls, root_cert }).map_err(bad)
}

/// The connection settings: the URL's, with the user and password from the environment
/// (`TAPSTREAM_REDIS_USERNAME`, `TAPSTREAM_REDIS_PASSWORD`) when set.
pub(crate) fn connection_info(
    settings: &RedisSection,
    env: impl Fn(&str) -> Option<String>,
) -> Result<ConnectionInfo, FleetRedisError> {
    let bad = |message: String| FleetRedisError::Url { url: mask_password(&settings.url), message };
    let mut info = settings.url.as_str().into_connection_info().map_err(|e| bad(e.to_string()))?;
    let mut redis = info.redis_settings().clone();
    if let Some(user) = env("TAPSTREAM_REDIS_USERNAME") {
        redis = redis.set_username(user);
    }
    if let Some(password) = env("TAPSTREAM_REDIS_PASSWORD") {
        redis = redis.set_password(password);
    }
    info = info.set_redis_settings(redis);
    Ok(info)
}

/// `url` with the password of its user part replaced by `***`.
pub fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let Some((user_info, host)) = authority.rsplit_once('@') else { return url.to_owned() };
    let user = match user_info.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => user_info.to_owned(),
    };
    // A password in the query (`?password=`) is masked too.
    let path = match path.find("password=") {
        Some(at) => {
            let value_end = path[at..].find('&').map_or(path.len(), |i| at + i);
            format!("{}password=***{}", &path[..at], &path[value_end..])
        }
        None => path.to_owned(),
    };
    format!("{scheme}://{user}@{host}{path}")
}

async fn connect(link: &Link) -> Result<MultiplexedConnection, RedisError> {
    // A blocked read answers after BLOCK; a connection silent well beyond that is dead.
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(BLOCK + Duration::from_secs(5)));
    link.client.get_multiplexed_async_connection_with_config(&config).await
}

fn connected(up: bool) {
    metrics::gauge!(crate::metrics::FLEET_BROKER_CONNECTED, "transport" => "redis").set(if up {
        1.0
    } else {
        0.0
    });
}

/// Reads and decides requests until `shutdown`; reconnects after errors.
async fn read_requests(node: Arc<Node>, link: Link, shutdown: Shutdown) {
    let mut backoff = BACKOFF_MIN;
    loop {
        if shutdown.is_set() {
            return;
        }
        let result = match connect(&link).await {
            Ok(mut conn) => read_from(&node, &link, &mut conn, &shutdown, &mut backoff).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                connected(false);
                log::warn!("fleet: Redis at {}: {e}; trying again in {backoff:?}", link.shown);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            () = shutdown.wait() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Decides the pcapdaemon-format messages of `channel` until `shutdown`; subscribes again
/// after errors (what is published meanwhile is not delivered: pub/sub keeps nothing).
async fn read_pcapdaemon(node: Arc<Node>, link: Link, channel: String, shutdown: Shutdown) {
    use futures_util::StreamExt as _;
    let mut backoff = BACKOFF_MIN;
    loop {
        let subscribed = async {
            let mut pubsub = link.client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, RedisError>(pubsub)
        };
        let error = match tokio::time::timeout(Duration::from_secs(5), subscribed).await {
            Ok(Ok(pubsub)) => {
                log::info!("fleet: taking pcapdaemon messages from channel {channel} on {}", link.shown);
                backoff = BACKOFF_MIN;
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        message = messages.next() => message,
                        () = shutdown.wait() => return,
                    };
                    let Some(message) = message else { break };
                    let payload = message.get_payload_bytes().to_vec();
                    let deciding = node.clone();
                    match tokio::task::spawn_blocking(move || deciding.handle_pcapdaemon(&payload)).await {
                        Ok(outcome) => log::debug!("fleet: pcapdaemon message on {channel}: {outcome:?}"),
                        Err(e) => log::error!("fleet: deciding a pcapdaemon message failed: {e}"),
                    }
                }
                "the subscription ended".to_owned()
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 5 s".to_owned(),
        };
        log::warn!(
            "fleet: channel {channel} on {}: {error}; subscribing again in {backoff:?} (messages published \
             meanwhile are not delivered)",
            link.shown
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            () = shutdown.wait() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Reads from one connection: the group's pending entries first, then new ones. Returns Ok
/// at shutdown.
async fn read_from(
    node: &Arc<Node>,
    link: &Link,
    conn: &mut MultiplexedConnection,
    shutdown: &Shutdown,
    backoff: &mut Duration,
) -> Result<(), RedisError> {
    let created: Result<(), RedisError> = ::redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&link.requests)
        .arg(&link.group)
        .arg("$")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() != Some("BUSYGROUP") => return Err(e),
        _ => {}
    }
    connected(true);
    *backoff = BACKOFF_MIN;
    log::info!(
        "fleet: reading requests from {} on {} as group {}, consumer {}",
        link.requests,
        link.shown,
        link.group,
        link.consumer
    );
    // What was received before and not acknowledged (a crash, an outage).
    let mut cursor = "0-0".to_owned();
    loop {
        let reply: StreamAutoClaimReply = ::redis::cmd("XAUTOCLAIM")
            .arg(&link.requests)
            .arg(&link.group)
            .arg(&link.consumer)
            .arg(0)
            .arg(&cursor)
            .arg("COUNT")
            .arg(BATCH)
            .query_async(conn)
            .await?;
        if !reply.claimed.is_empty() {
            log::info!(
                "fleet: {} requests received earlier and not decided: deciding them now",
                reply.claimed.len()
            );
        }
        for entry in reply.claimed {
            decide(node, link, conn, entry).await?;
        }
        cursor = reply.next_stream_id;
        if cursor == "0-0" {
            break;
        }
    }
    loop {
        let read = ::redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&link.group)
            .arg(&link.consumer)
            .arg("COUNT")
            .arg(BATCH)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&link.requests)
            .arg(">")
            .to_owned();
        let reply: Option<StreamReadReply> = tokio::select! {
            reply = read.query_async(conn) => reply?,
            () = shutdown.wait() => return Ok(()),
        };
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            decide(node, link, conn, entry).await?;
            if shutdown.is_set() {
                return Ok(());
            }
        }
    }
}

/// Decides one entry (on a blocking thread) and acknowledges it if decided.
async fn decide(
    node: &Arc<Node>,
    link: &Link,
    conn: &mut MultiplexedConnection,
    entry: StreamId,
) -> Result<(), RedisError> {
    let body: Option<Vec<u8>> =
        entry.map.get(REQUEST_FIELD).and_then(|v| ::redis::from_redis_value_ref::<Vec<u8>>(v).ok());
    let deciding = node.clone();
    let outcome = match tokio::task::spawn_blocking(move || deciding.handle(body.as_deref())).await {
        Ok(outcome) => outcome,
        Err(e) => {
            log::error!("fleet: deciding entry {} failed: {e}; it stays pending", entry.id);
            return Ok(());
        }
    };
    log::debug!("fleet: entry {}: {outcome:?}", entry.id);
    if outcome.decided() {
        let _: i64 = ::redis::cmd("XACK")
            .arg(&link.requests)
            .arg(&link.group)
            .arg(&entry.id)
            .query_async(conn)
            .await?;
    }
    Ok(())
}

/// Sends the outbox's events in order until `finish` and the outbox is empty; keeps each
/// until the broker took it.
async fn send_events(outbox: Arc<Outbox>, link: Link, mut finish: watch::Receiver<bool>) {
    let mut conn: Option<MultiplexedConnection> = None;
    let mut backoff = BACKOFF_MIN;
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
            if conn.is_none() {
                conn = Some(connect(&link).await?);
            }
            let id: String = add_event(&link.events, link.events_max_len, &event)?
                .query_async(conn.as_mut().expect("connected above"))
                .await?;
            Ok::<_, RedisError>(id)
        }
        .await;
        match result {
            Ok(id) => {
                outbox.sent();
                metrics::counter!(crate::metrics::FLEET_EVENTS_PUBLISHED).increment(1);
                log::debug!("fleet: event {} of request {:?} sent as {id}", event.kind(), event.request_id);
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                conn = None;
                connected(false);
                metrics::counter!(crate::metrics::FLEET_EVENTS_FAILED).increment(1);
                log::warn!(
                    "fleet: cannot send events to {} ({e}); {} wait, trying again in {backoff:?}",
                    link.shown,
                    outbox.len()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// The `XADD` of `event` to `stream`, trimmed to about `max_len` entries (0: not trimmed).
fn add_event(stream: &str, max_len: u64, event: &super::Event) -> Result<::redis::Cmd, RedisError> {
    let json = serde_json::to_string(event).map_err(|e| RedisError::from(std::io::Error::other(e)))?;
    let mut xadd = ::redis::cmd("XADD");
    xadd.arg(stream);
    if max_len > 0 {
        xadd.arg("MAXLEN").arg("~").arg(max_len);
    }
    xadd.arg("*")
        .arg("event")
        .arg(event.kind())
        .arg("node")
        .arg(&event.node)
        .arg("request_id")
        .arg(event.request_id.as_deref().unwrap_or(""))
        .arg("json")
        .arg(json);
    Ok(xadd)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arguments of a command, as text.
    fn args(cmd: &::redis::Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|a| match a {
                ::redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => "<not simple>".into(),
            })
            .collect()
    }

    #[test]
    fn events_are_added_with_an_approximate_max_len() {
        let request =
            super::super::FleetRequest::parse(br#"{"id": "r1", "not_after": 1, "capture": {}}"#).unwrap();
        let event = super::super::Event::about(&request, "n1", super::super::What::Accepted);
        let trimmed = args(&add_event("ev", 100_000, &event).unwrap());
        assert_eq!(trimmed[..8], ["XADD", "ev", "MAXLEN", "~", "100000", "*", "event", "accepted"]);
        assert_eq!(trimmed[8..12], ["node", "n1", "request_id", "r1"]);
        let untrimmed = args(&add_event("ev", 0, &event).unwrap());
        assert_eq!(untrimmed[..4], ["XADD", "ev", "*", "event"]);
    }

    #[test]
    fn passwords_are_masked_in_logs() {
        assert_eq!(mask_password("redis://:s3cret@host:6379/0"), "redis://:***@host:6379/0");
        assert_eq!(mask_password("redis://user:s3cret@host"), "redis://user:***@host");
        assert_eq!(mask_password("redis://user@host"), "redis://user@host");
        assert_eq!(mask_password("redis://host:6379"), "redis://host:6379");
        assert_eq!(mask_password("unix:///run/redis.sock"), "unix:///run/redis.sock");
        assert_eq!(
            mask_password("unix://x@/run/redis.sock?db=1&password=s3cret&x=1"),
            "unix://x@/run/redis.sock?db=1&password=***&x=1"
        );
    }

    #[test]
    fn the_password_may_come_from_the_environment() {
        let settings =
            RedisSection { url: "redis://alice@127.0.0.1:6390/2".into(), ..RedisSection::default() };
        let info =
            connection_info(&settings, |name| (name == "TAPSTREAM_REDIS_PASSWORD").then(|| "pw".into()))
                .unwrap();
        assert_eq!(info.redis_settings().password(), Some("pw"));
        assert_eq!(info.redis_settings().username(), Some("alice"));
        let info = connection_info(
            &RedisSection { url: "unix:///tmp/r.sock".into(), ..RedisSection::default() },
            |_| None,
        )
        .unwrap();
        assert_eq!(info.redis_settings().password(), None);
        let err =
            connection_info(&RedisSection { url: "redis://:pw@".into(), ..RedisSection::default() }, |_| {
                None
            })
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(!err.contains("pw@"), "{err}");
    }
}
