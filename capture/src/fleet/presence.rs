//! A node's presence: a heartbeat in the broker, so an operator sees which nodes are live.
//!
//! Every [`HEARTBEAT`] a daemon with `[fleet.redis]` sets the key `<nodes_prefix><node>` to a
//! [`Presence`] (JSON), expiring after [`TTL`]: a node that dies vanishes within 15 s; one that
//! stops in order deletes its key. `tapstream fleet nodes` lists these keys. With
//! `[fleet.nats]` it puts the same under the key `<node>` of the key-value bucket
//! `nodes_bucket` (created when missing, its entries expiring after [`TTL`]), and purges it
//! when it stops in order ([`NatsHeartbeat`]).
//!
//! ```json
//! {"node": "tap-fra1-01", "version": "0.1.0", "labels": {"site": "fra1"},
//!  "interfaces": [{"alias": "tap0", "device": "eth1", "state": "attached"}],
//!  "captures": [{"id": "alert-4711", "interfaces": ["tap0"], "filter": "udp", "started_ns": 1}],
//!  "updated_ns": 1795000000000000000}
//! ```

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use ::redis::{AsyncConnectionConfig, Client, aio::MultiplexedConnection};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{
    nats::FleetNatsError,
    redis::{FleetRedisError, client, mask_password},
};
use crate::{
    config::{NatsSection, RedisSection},
    control::{CaptureState, InterfaceInfo, daemon::Daemon},
    sys::Shutdown,
};

/// How often a node announces itself.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long an announcement lasts: three heartbeats.
pub const TTL: Duration = Duration::from_secs(15);

/// What a node says of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// Its name (`daemon.node`, else the hostname).
    pub node: String,
    /// Its tapstream version.
    pub version: String,
    /// Its `daemon.labels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its configured interfaces, attached or absent.
    #[serde(default)]
    pub interfaces: Vec<InterfaceInfo>,
    /// Its running captures.
    #[serde(default)]
    pub captures: Vec<RunningCapture>,
    /// When it said so, ns since the Unix epoch.
    pub updated_ns: u64,
}

/// A running capture, as a node's presence shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningCapture {
    pub id: String,
    /// Interface aliases.
    pub interfaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Start time, ns since the Unix epoch.
    pub started_ns: u64,
}

impl Presence {
    /// The daemon's presence now.
    pub fn of(daemon: &Daemon) -> Self {
        Self {
            node: daemon.node().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            labels: daemon.config().daemon.labels.clone(),
            interfaces: daemon.interfaces(),
            captures: daemon
                .list()
                .into_iter()
                .filter(|c| c.state == CaptureState::Running)
                .map(|c| RunningCapture {
                    id: c.id,
                    interfaces: c.interfaces,
                    filter: c.request.filter,
                    started_ns: c.started_ns,
                })
                .collect(),
            updated_ns: crate::sys::unix_now_ns(),
        }
    }
}

/// The key of `node`'s presence.
pub fn key(settings: &RedisSection, node: &str) -> String {
    format!("{}{node}", settings.nodes_prefix)
}

/// The heartbeat task of a daemon; it deletes its key when the shutdown comes.
pub struct Heartbeat {
    task: JoinHandle<()>,
}

impl Heartbeat {
    /// Starts announcing `daemon` on the current tokio runtime until `shutdown`.
    pub fn start(
        daemon: Arc<Daemon>,
        settings: &RedisSection,
        shutdown: Shutdown,
    ) -> Result<Self, FleetRedisError> {
        let client = client(settings)?;
        let key = key(settings, daemon.node());
        let shown = mask_password(&settings.url);
        Ok(Self { task: tokio::spawn(beat(daemon, client, shown, key, shutdown)) })
    }

    /// After the shutdown: waits up to `grace` for the key to be deleted.
    pub async fn finish(self, grace: Duration) {
        if tokio::time::timeout(grace, self.task).await.is_err() {
            log::warn!("fleet: this node's presence could not be withdrawn; it expires within {TTL:?}");
        }
    }
}

async fn connect(client: &Client) -> Result<MultiplexedConnection, ::redis::RedisError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    client.get_multiplexed_async_connection_with_config(&config).await
}

async fn beat(daemon: Arc<Daemon>, client: Client, shown: String, key: String, shutdown: Shutdown) {
    let mut conn: Option<MultiplexedConnection> = None;
    let mut failing = false;
    while !shutdown.is_set() {
        let json = match serde_json::to_string(&Presence::of(&daemon)) {
            Ok(json) => json,
            Err(e) => {
                log::error!("fleet: cannot describe this node: {e}");
                return;
            }
        };
        let result = async {
            if conn.is_none() {
                conn = Some(connect(&client).await?);
            }
            let conn = conn.as_mut().expect("connected above");
            ::redis::cmd("SET").arg(&key).arg(json).arg("EX").arg(TTL.as_secs()).query_async::<()>(conn).await
        }
        .await;
        match result {
            Ok(()) => {
                if failing {
                    log::info!("fleet: presence in {key} on {shown} again");
                }
                failing = false;
            }
            Err(e) => {
                conn = None;
                if !failing {
                    log::warn!("fleet: cannot announce this node in {key} on {shown}: {e}");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT) => {}
            () = shutdown.wait() => {}
        }
    }
    // An orderly stop: withdraw at once rather than expire.
    let deleted = async {
        let mut conn = match conn {
            Some(conn) => conn,
            None => connect(&client).await?,
        };
        ::redis::cmd("DEL").arg(&key).query_async::<()>(&mut conn).await
    }
    .await;
    match deleted {
        Ok(()) => log::info!("fleet: presence {key} withdrawn"),
        Err(e) => log::warn!("fleet: cannot withdraw presence {key} ({e}); it expires within {TTL:?}"),
    }
}

/// The stream behind the key-value bucket of the nodes' presence in NATS (`KV_<bucket>`, as
/// the key-value API lays it out): one entry per node, none kept past [`TTL`]. Made as a stream
/// because the client's `create_key_value` first asks for the account's info, whose reply from
/// nats-server 2.9 it cannot read.
pub fn nats_bucket(settings: &NatsSection) -> async_nats::jetstream::stream::Config {
    use async_nats::jetstream::stream;
    let bucket = &settings.nodes_bucket;
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some("tapstream nodes: each node's presence, expiring without a heartbeat".into()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: TTL,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// The NATS heartbeat task of a daemon; it purges its key when the shutdown comes.
pub struct NatsHeartbeat {
    task: JoinHandle<()>,
}

impl NatsHeartbeat {
    /// Starts announcing `daemon` in the nodes bucket on the current tokio runtime until
    /// `shutdown`.
    pub async fn start(
        daemon: Arc<Daemon>,
        settings: &NatsSection,
        shutdown: Shutdown,
    ) -> Result<Self, FleetNatsError> {
        let client =
            super::nats::client(settings, &format!("tapstream {} presence", daemon.node()), true).await?;
        let js = async_nats::jetstream::ContextBuilder::new().timeout(Duration::from_secs(2)).build(client);
        let shown = super::nats::mask(&settings.url);
        let bucket = settings.nodes_bucket.clone();
        Ok(Self { task: tokio::spawn(beat_nats(daemon, js, shown, bucket, nats_bucket(settings), shutdown)) })
    }

    /// After the shutdown: waits up to `grace` for the key to be purged.
    pub async fn finish(self, grace: Duration) {
        if tokio::time::timeout(grace, self.task).await.is_err() {
            log::warn!(
                "fleet: this node's presence in NATS could not be withdrawn; it expires within {TTL:?}"
            );
        }
    }
}

/// The nodes bucket, created when missing.
async fn nodes_store(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    stream: &async_nats::jetstream::stream::Config,
) -> Result<async_nats::jetstream::kv::Store, async_nats::Error> {
    js.get_or_create_stream(stream.clone()).await?;
    Ok(js.get_key_value(bucket).await?)
}

async fn beat_nats(
    daemon: Arc<Daemon>,
    js: async_nats::jetstream::Context,
    shown: String,
    bucket: String,
    stream: async_nats::jetstream::stream::Config,
    shutdown: Shutdown,
) {
    let key = daemon.node().to_owned();
    let mut store = None;
    let mut failing = false;
    while !shutdown.is_set() {
        let json = match serde_json::to_vec(&Presence::of(&daemon)) {
            Ok(json) => json,
            Err(e) => {
                log::error!("fleet: cannot describe this node: {e}");
                return;
            }
        };
        let result = async {
            if store.is_none() {
                store = Some(nodes_store(&js, &bucket, &stream).await?);
            }
            store.as_ref().expect("made above").put(&key, json.into()).await?;
            Ok::<_, async_nats::Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                if failing {
                    log::info!("fleet: presence in NATS bucket {} on {shown} again", bucket);
                }
                failing = false;
            }
            Err(e) => {
                store = None;
                if !failing {
                    log::warn!("fleet: cannot announce this node in NATS bucket {} on {shown}: {e}", bucket);
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT) => {}
            () = shutdown.wait() => {}
        }
    }
    // An orderly stop: withdraw at once rather than expire.
    let purged = async {
        let store = match store {
            Some(store) => store,
            None => nodes_store(&js, &bucket, &stream).await?,
        };
        store.purge(&key).await?;
        Ok::<_, async_nats::Error>(())
    }
    .await;
    match purged {
        Ok(()) => log::info!("fleet: presence {key} withdrawn from NATS bucket {}", bucket),
        Err(e) => {
            log::warn!("fleet: cannot withdraw presence {key} from NATS ({e}); it expires within {TTL:?}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_presence_round_trips_and_its_key_has_the_prefix() {
        let settings = RedisSection::default();
        assert_eq!(key(&settings, "tap1"), "tapstream:nodes:tap1");
        let json = r#"{"node": "tap1", "version": "0.1.0", "labels": {"site": "fra1"},
            "interfaces": [{"alias": "tap0", "device": "eth1", "state": "absent"}],
            "captures": [{"id": "c1", "interfaces": ["tap0"], "filter": "udp", "started_ns": 7}],
            "updated_ns": 9}"#;
        let presence: Presence = serde_json::from_str(json).unwrap();
        assert_eq!(presence.labels["site"], "fra1");
        assert_eq!(presence.captures[0].filter.as_deref(), Some("udp"));
        let back: Presence = serde_json::from_str(&serde_json::to_string(&presence).unwrap()).unwrap();
        assert_eq!(back, presence);
        assert!(TTL >= HEARTBEAT * 3);
    }
}
