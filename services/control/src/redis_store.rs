//! The live state several control replicas share in Redis: edge reports and deletion
//! announcements, so several replicas behind one address behave as one. Only what the
//! edges rebuild within a report interval lives here; tunnels, names and tombstones are
//! in the database ([`crate::sql_store`]), so a Redis flush loses nothing durable.
//!
//! Every key starts with [`KEY_PREFIX`] (edges use `netbore:live:`; the two never meet):
//!
//! | key | type | holds | expires |
//! | --- | --- | --- | --- |
//! | `edge:{id}` | hash | the edge's last report and the replica it is linked to | [`EDGE_REPORT_TTL`] after the report |
//! | `edges` | set | edge ids (the index of `edge:*`) | ids whose hash is gone are dropped on read |
//! | `tunnel:{id}` | hash | the tunnel's live status: its links, traffic and last seen time ([`crate::status`]) | [`crate::status::LAST_SEEN_TTL`] after the last write; stale fields are skipped on read |
//!
//! What can race is one Lua script, so it is atomic. Deletions are published on
//! [`DELETED_CHANNEL`] so every replica disconnects the tunnel on the edges linked to it.
//!
//! Every call is bounded by [`REDIS_CALL_TIMEOUT`]; an unreachable Redis is a
//! [`StoreError::Unavailable`] naming it, never a hang. The connection (a
//! [`ConnectionManager`]) and the subscription reconnect by themselves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::store::{LiveState, StoreError, StoreFuture};
use crate::{ConfigError, EdgeEntry, EdgeStatus};

/// Prefix of every key control keeps in Redis.
pub const KEY_PREFIX: &str = "netbore:control:";
/// Pub/sub channel of deletions: messages are `{replica} {tunnel_id}`.
pub const DELETED_CHANNEL: &str = "netbore:control:deleted";
/// Longest wait for any one Redis call; past it the call fails as unavailable.
pub const REDIS_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a connection to Redis.
pub const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between attempts to (re)connect or resubscribe.
pub const RECONNECT_INTERVAL: Duration = Duration::from_millis(500);
/// How often the subscription is pinged, so a silently dead connection is replaced.
pub const SUBSCRIPTION_PING_INTERVAL: Duration = Duration::from_secs(5);
/// An edge's report lives this long in Redis: three report intervals (edges report
/// every 5 s), so an edge that stops reporting disappears from every replica.
pub const EDGE_REPORT_TTL: Duration = Duration::from_secs(15);

const PUT_EDGE: &str = r#"
redis.call('HSET', KEYS[1], 'edge_url', ARGV[2], 'region', ARGV[3], 'tunnels', ARGV[4],
  'connections', ARGV[5], 'streams', ARGV[6], 'draining', ARGV[7], 'last_report', ARGV[8],
  'connected', '1', 'replica', ARGV[9])
redis.call('EXPIRE', KEYS[1], ARGV[10])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"#;

const EDGE_CLOSED: &str = r#"
if redis.call('HGET', KEYS[1], 'replica') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'connected', '0')
end
return 1
"#;

const EDGES: &str = r#"
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('HMGET', ARGV[1] .. 'edge:' .. id, 'edge_url', 'region', 'tunnels',
    'connections', 'streams', 'draining', 'last_report', 'connected')
  if not h[1] then
    redis.call('SREM', KEYS[1], id)
  else
    table.insert(out, id)
    for i = 1, 8 do table.insert(out, h[i] or '') end
  end
end
return out
"#;

struct Scripts {
    put_edge: Script,
    edge_closed: Script,
    edges: Script,
}

/// The live state several replicas share in one Redis.
pub struct RedisLive {
    shared: Arc<Shared>,
    scripts: Scripts,
    _stop: DropGuard,
}

struct Shared {
    client: redis::Client,
    /// Set once the first connection is made; reconnects by itself afterwards.
    conn: OnceLock<ConnectionManager>,
    /// The URL without its password, for messages.
    shown_url: String,
    /// This replica's id, to tell its own deletion messages from the others'.
    replica: String,
    deletions: OnceLock<broadcast::Sender<String>>,
    subscribed: AtomicBool,
}

fn key(parts: &[&str]) -> String {
    let mut k = String::from(KEY_PREFIX);
    for p in parts {
        k.push_str(p);
    }
    k
}

impl Shared {
    fn unavailable(&self, detail: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(format!(
            "Redis at {} is unreachable ({detail}); check that Redis is running and that --redis-url (NETBORE_REDIS_URL) points at it; control recovers by itself when Redis answers again",
            self.shown_url
        ))
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(REDIS_CALL_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                Err(self.unavailable(e))
            }
            Ok(Err(e)) => Err(StoreError::Unavailable(format!(
                "Redis at {} refused a command: {e}; check that it is a Redis server (not Redis Cluster), version 6 or later, and its logs",
                self.shown_url
            ))),
            Err(_) => Err(self.unavailable(format!(
                "no answer within {} ms",
                REDIS_CALL_TIMEOUT.as_millis()
            ))),
        }
    }

    fn conn(&self) -> Result<ConnectionManager, StoreError> {
        self.conn
            .get()
            .cloned()
            .ok_or_else(|| self.unavailable("no connection yet"))
    }
}

impl RedisLive {
    /// Live state on the Redis at `url` (`redis://[:password@]host:port[/db]`). Returns at
    /// once: the connection is made in the background and retried every
    /// [`RECONNECT_INTERVAL`], so control starts (not ready) while Redis is down.
    /// Must be called inside a Tokio runtime; the background tasks stop when the store
    /// is dropped.
    pub fn open(url: &str) -> Result<RedisLive, ConfigError> {
        let shown_url = crate::sql_store::redact_url(url);
        let client = redis::Client::open(url).map_err(|e| {
            ConfigError(format!(
                "--redis-url '{shown_url}' is not a usable Redis URL ({e}); use redis://HOST:PORT or redis://:PASSWORD@HOST:PORT/DB"
            ))
        })?;
        let replica = format!("ctl_{:016x}", rand::random::<u64>());
        let shared = Arc::new(Shared {
            client,
            conn: OnceLock::new(),
            shown_url,
            replica,
            deletions: OnceLock::new(),
            subscribed: AtomicBool::new(false),
        });
        let stop = CancellationToken::new();
        let span = tracing::info_span!("redis", replica = %shared.replica, url = %shared.shown_url);
        tokio::spawn(connect(shared.clone(), stop.clone()).instrument(span.clone()));
        tokio::spawn(subscribe(shared.clone(), stop.clone()).instrument(span));
        Ok(RedisLive {
            shared,
            scripts: Scripts {
                put_edge: Script::new(PUT_EDGE),
                edge_closed: Script::new(EDGE_CLOSED),
                edges: Script::new(EDGES),
            },
            _stop: stop.drop_guard(),
        })
    }

    /// Waits until the store answers and its deletion subscription is up, or `within`
    /// passes; true when ready.
    pub async fn wait_ready(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.ping().await.is_ok() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// This replica's id (in deletion messages and edge records).
    pub fn replica(&self) -> &str {
        &self.shared.replica
    }
}

/// Makes the first connection, retrying until it succeeds; the manager reconnects by
/// itself afterwards.
async fn connect(shared: Arc<Shared>, stop: CancellationToken) {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(REDIS_CONNECT_TIMEOUT)
        .set_response_timeout(REDIS_CALL_TIMEOUT)
        // Fail a reconnection fast: the next call starts another, and callers see a
        // clear error in the meantime instead of waiting on a long backoff.
        .set_number_of_retries(1)
        .set_max_delay(RECONNECT_INTERVAL.as_millis() as u64);
    let mut warned = false;
    loop {
        let attempt = tokio::time::timeout(
            REDIS_CONNECT_TIMEOUT * 2,
            ConnectionManager::new_with_config(shared.client.clone(), config.clone()),
        );
        let err = tokio::select! {
            _ = stop.cancelled() => return,
            r = attempt => match r {
                Ok(Ok(m)) => {
                    let _ = shared.conn.set(m);
                    tracing::info!("connected to Redis");
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "connection timed out".to_string(),
            },
        };
        if !warned {
            tracing::warn!(error = %err, "Redis is unreachable; control is not ready and retries");
            warned = true;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RECONNECT_INTERVAL) => {}
        }
    }
}

/// Pings a connection in subscribed mode: true when Redis answered within
/// [`REDIS_CALL_TIMEOUT`]. In that mode Redis answers `PING` with the array
/// `["pong", ""]`, not `PONG`, so the answer is taken as any value (asking for a
/// `String`, as before, failed every time on Redis 7 and rebuilt the subscription
/// every [`SUBSCRIPTION_PING_INTERVAL`]).
pub async fn ping_subscription(sink: &mut redis::aio::PubSubSink) -> bool {
    matches!(
        tokio::time::timeout(REDIS_CALL_TIMEOUT, sink.ping::<redis::Value>()).await,
        Ok(Ok(_))
    )
}

/// Keeps a subscription to [`DELETED_CHANNEL`] and hands other replicas' deletions to
/// this replica's edge links; resubscribes whenever the connection is lost.
async fn subscribe(shared: Arc<Shared>, stop: CancellationToken) {
    let mut lost = false;
    while !stop.is_cancelled() {
        let attempt = async {
            let ps = tokio::time::timeout(REDIS_CONNECT_TIMEOUT, shared.client.get_async_pubsub())
                .await
                .map_err(|_| "connection timed out".to_string())?
                .map_err(|e| e.to_string())?;
            let (mut sink, stream) = ps.split();
            tokio::time::timeout(REDIS_CALL_TIMEOUT, sink.subscribe(DELETED_CHANNEL))
                .await
                .map_err(|_| "SUBSCRIBE timed out".to_string())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((sink, stream))
        };
        let (mut sink, mut stream) = tokio::select! {
            _ = stop.cancelled() => return,
            r = attempt => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot subscribe to deletions yet");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(RECONNECT_INTERVAL) => {}
                    }
                    continue;
                }
            },
        };
        shared.subscribed.store(true, Ordering::SeqCst);
        if lost {
            tracing::info!("resubscribed to deletions");
        }
        let mut ping = tokio::time::interval(SUBSCRIPTION_PING_INTERVAL);
        ping.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ping.tick() => {
                    if !ping_subscription(&mut sink).await { break; }
                }
                m = stream.next() => match m {
                    Some(msg) => {
                        let payload: String = msg.get_payload().unwrap_or_default();
                        if let Some((from, tunnel_id)) = payload.split_once(' ')
                            && from != shared.replica
                            && let Some(tx) = shared.deletions.get()
                        {
                            tracing::debug!(tunnel = %tunnel_id, from = %from, "deletion from another replica");
                            let _ = tx.send(tunnel_id.to_string());
                        }
                    }
                    None => break,
                },
            }
        }
        shared.subscribed.store(false, Ordering::SeqCst);
        lost = true;
        tracing::warn!(
            "lost the Redis subscription to deletions; resubscribing (deletions made meanwhile on other replicas are not forwarded)"
        );
    }
}

fn to_u64(s: &str) -> u64 {
    s.parse().unwrap_or(0)
}

impl LiveState for RedisLive {
    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut c = self.shared.conn()?;
            let cmd = redis::cmd("PING");
            let _: String = self.shared.timed(cmd.query_async(&mut c)).await?;
            if !self.shared.subscribed.load(Ordering::SeqCst) {
                return Err(self
                    .shared
                    .unavailable("the subscription to deletions is not up yet"));
            }
            Ok(())
        })
    }

    fn put_edge<'a>(&'a self, s: &'a EdgeStatus) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut c = self.shared.conn()?;
            let mut inv = self.scripts.put_edge.key(key(&["edge:", &s.entry.edge_id]));
            inv.key(key(&["edges"]))
                .arg(&s.entry.edge_id)
                .arg(&s.entry.edge_url)
                .arg(&s.entry.region)
                .arg(s.tunnels)
                .arg(s.connections)
                .arg(s.streams)
                .arg(u8::from(s.draining))
                .arg(s.last_report)
                .arg(&self.shared.replica)
                .arg(EDGE_REPORT_TTL.as_secs());
            let _: u8 = self.shared.timed(inv.invoke_async(&mut c)).await?;
            Ok(())
        })
    }

    fn edge_closed<'a>(&'a self, edge_id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut c = self.shared.conn()?;
            let mut inv = self.scripts.edge_closed.key(key(&["edge:", edge_id]));
            inv.arg(&self.shared.replica);
            let _: u8 = self.shared.timed(inv.invoke_async(&mut c)).await?;
            Ok(())
        })
    }

    fn edges(&self, _now: u64) -> StoreFuture<'_, Option<Vec<EdgeStatus>>> {
        Box::pin(async move {
            let mut c = self.shared.conn()?;
            let mut inv = self.scripts.edges.key(key(&["edges"]));
            inv.arg(KEY_PREFIX);
            let v: Vec<String> = self.shared.timed(inv.invoke_async(&mut c)).await?;
            Ok(Some(
                v.chunks_exact(9)
                    .map(|h| EdgeStatus {
                        entry: EdgeEntry {
                            edge_id: h[0].clone(),
                            edge_url: h[1].clone(),
                            region: h[2].clone(),
                        },
                        tunnels: to_u64(&h[3]),
                        connections: to_u64(&h[4]),
                        streams: to_u64(&h[5]),
                        draining: h[6] == "1",
                        last_report: to_u64(&h[7]),
                        connected: h[8] == "1",
                    })
                    .collect(),
            ))
        })
    }

    fn publish_deletion<'a>(&'a self, tunnel_id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut c = self.shared.conn()?;
            let cmd = redis::cmd("PUBLISH")
                .arg(DELETED_CHANNEL)
                .arg(format!("{} {tunnel_id}", self.shared.replica))
                .to_owned();
            let _: u64 = self.shared.timed(cmd.query_async(&mut c)).await?;
            Ok(())
        })
    }

    fn attach_deletions(&self, deletions: broadcast::Sender<String>) {
        let _ = self.shared.deletions.set(deletions);
    }

    fn put_tunnel_fields<'a>(
        &'a self,
        fields: &'a [(String, String, String)],
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut c = self.shared.conn()?;
            let mut pipe = redis::pipe();
            let mut keys: Vec<String> = Vec::new();
            for (t, k, v) in fields {
                let hk = key(&["tunnel:", t]);
                pipe.hset(&hk, k, v).ignore();
                keys.push(hk);
            }
            keys.sort_unstable();
            keys.dedup();
            let ttl = crate::status::LAST_SEEN_TTL.as_secs() as i64;
            for k in &keys {
                pipe.expire(k, ttl).ignore();
            }
            let _: () = self.shared.timed(pipe.query_async(&mut c)).await?;
            Ok(true)
        })
    }

    fn del_tunnel_fields<'a>(&'a self, fields: &'a [(String, String)]) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut c = self.shared.conn()?;
            let mut pipe = redis::pipe();
            for (t, k) in fields {
                pipe.hdel(key(&["tunnel:", t]), k).ignore();
            }
            let _: () = self.shared.timed(pipe.query_async(&mut c)).await?;
            Ok(true)
        })
    }

    fn tunnel_fields<'a>(
        &'a self,
        tunnel_ids: &'a [String],
    ) -> StoreFuture<'a, Option<Vec<crate::store::TunnelFields>>> {
        Box::pin(async move {
            if tunnel_ids.is_empty() {
                return Ok(Some(Vec::new()));
            }
            let mut c = self.shared.conn()?;
            let mut pipe = redis::pipe();
            for t in tunnel_ids {
                pipe.hgetall(key(&["tunnel:", t]));
            }
            let v: Vec<Vec<(String, String)>> = self.shared.timed(pipe.query_async(&mut c)).await?;
            Ok(Some(v))
        })
    }
}
