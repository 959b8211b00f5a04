//! The Redis store: tunnels, names, tombstones and edge reports shared by every control
//! replica, so several replicas behind one address behave as one.
//!
//! Every key starts with [`KEY_PREFIX`] (edges use `netbore:live:`; the two never meet):
//!
//! | key | type | holds | expires |
//! | --- | --- | --- | --- |
//! | `name:{name}` | hash | `tunnel_id`, `created_at`, `expires_at` | at `expires_at` (never for a named tunnel) |
//! | `tunnel:{id}` | string | the name the tunnel holds | with its name |
//! | `names` | sorted set, all scores 0 | every held name, in name order (the list index) | entries whose record is gone are dropped when a list or the sweep passes them |
//! | `revoked:{id}` | string | refused-until (Unix seconds) | then |
//! | `edge:{id}` | hash | the edge's last report and the replica it is linked to | [`EDGE_REPORT_TTL`] after the report |
//! | `edges` | set | edge ids (the index of `edge:*`) | ids whose hash is gone are dropped on read |
//!
//! Everything that can race is one Lua script, so it is atomic: a claim has exactly one
//! winner, a removal deletes a name only while the tunnel it names still holds it
//! (compare-and-delete), a tombstone only ever lengthens. Deletions are published on
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

use crate::store::{Claim, ControlStore, StoreError, StoreFuture, TunnelRecord};
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
/// How often each replica drops names of expired tunnels from the list index.
pub const INDEX_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Tunnel ids one refresh script extends (a report with more runs several).
pub const REFRESH_BATCH: usize = 500;
/// Entries of the list index a script reads per step.
const LIST_BATCH: usize = 200;

/// Lua helpers the scripts that write `expires_at` share. Times stay strings from Rust
/// to Redis and back: Lua numbers are doubles, which would round
/// [`crate::store::HELD_UNTIL_DELETED`] and print it in exponent form. A hold past
/// [`NO_EXPIRY_FROM`] never expires in Redis (`PERSIST`; `EXPIREAT` refuses such times).
const EXPIRY_HELPERS: &str = r#"
local function later(a, b)
  if tonumber(a) >= tonumber(b) then return a else return b end
end
local function expire_at(k, e, never)
  if tonumber(e) >= tonumber(never) then redis.call('PERSIST', k) else redis.call('EXPIREAT', k, e) end
end
"#;

/// Holds ending at or after this Unix time are kept without a Redis expiry (year 33658:
/// only [`crate::store::HELD_UNTIL_DELETED`] is that far, and `EXPIREAT` in milliseconds overflows
/// somewhat further on).
pub const NO_EXPIRY_FROM: u64 = 1_000_000_000_000;

const CLAIM: &str = r#"
local name, id = ARGV[1], ARGV[2]
local now = tonumber(ARGV[3])
local force, p = ARGV[5] == '1', ARGV[6]
local cur = redis.call('HMGET', KEYS[1], 'tunnel_id', 'created_at', 'expires_at')
local live = cur[1] and tonumber(cur[3]) > now
if live and cur[1] ~= id and not force then
  return {0, cur[1], cur[2], cur[3]}
end
if live and cur[1] == id then
  local e = later(cur[3], ARGV[4])
  redis.call('HSET', KEYS[1], 'expires_at', e)
  expire_at(KEYS[1], e, ARGV[7])
  redis.call('SET', KEYS[2], name)
  expire_at(KEYS[2], e, ARGV[7])
  redis.call('ZADD', KEYS[3], 0, name)
  return {1, id, cur[2], e}
end
-- The name is free, expired, or taken over: the old holder loses it.
if cur[1] and cur[1] ~= id then
  local old = p .. 'tunnel:' .. cur[1]
  if redis.call('GET', old) == name then redis.call('DEL', old) end
end
-- A tunnel holds one name: if it held another, that one is released.
local prev = redis.call('GET', KEYS[2])
if prev and prev ~= name then
  local pk = p .. 'name:' .. prev
  if redis.call('HGET', pk, 'tunnel_id') == id then
    redis.call('DEL', pk)
    redis.call('ZREM', KEYS[3], prev)
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'tunnel_id', id, 'created_at', ARGV[3], 'expires_at', ARGV[4])
expire_at(KEYS[1], ARGV[4], ARGV[7])
redis.call('SET', KEYS[2], name)
expire_at(KEYS[2], ARGV[4], ARGV[7])
redis.call('ZADD', KEYS[3], 0, name)
return {1, id, ARGV[3], ARGV[4]}
"#;

/// ARGV: key prefix, now, until, [`NO_EXPIRY_FROM`], then the tunnel ids.
const REFRESH: &str = r#"
local p, now, untl, never = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local n = 0
for i = 5, #ARGV do
  local id = ARGV[i]
  local tk = p .. 'tunnel:' .. id
  local name = redis.call('GET', tk)
  if name then
    local nk = p .. 'name:' .. name
    local cur = redis.call('HMGET', nk, 'tunnel_id', 'expires_at')
    if cur[1] == id and tonumber(cur[2]) > now and tonumber(untl) > tonumber(cur[2]) then
      redis.call('HSET', nk, 'expires_at', untl)
      expire_at(nk, untl, never)
      expire_at(tk, untl, never)
      n = n + 1
    end
  end
end
return n
"#;

const BY_ID: &str = r#"
local name = redis.call('GET', KEYS[1])
if not name then return {} end
local cur = redis.call('HMGET', ARGV[2] .. 'name:' .. name, 'tunnel_id', 'created_at', 'expires_at')
if cur[1] ~= ARGV[1] then return {} end
return {name, cur[2], cur[3]}
"#;

const REMOVE: &str = r#"
local name = redis.call('GET', KEYS[1])
if not name then return {} end
redis.call('DEL', KEYS[1])
local nk = ARGV[2] .. 'name:' .. name
local cur = redis.call('HMGET', nk, 'tunnel_id', 'created_at', 'expires_at')
if cur[1] ~= ARGV[1] then return {} end
redis.call('DEL', nk)
redis.call('ZREM', KEYS[2], name)
return {name, cur[2], cur[3]}
"#;

const LIST: &str = r#"
local min, max = ARGV[1], ARGV[2]
local limit, now, batch_size = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
local out, n = {}, 0
while n < limit do
  local batch = redis.call('ZRANGEBYLEX', KEYS[1], min, max, 'LIMIT', 0, batch_size)
  if #batch == 0 then break end
  for _, name in ipairs(batch) do
    local cur = redis.call('HMGET', ARGV[5] .. 'name:' .. name, 'tunnel_id', 'created_at', 'expires_at')
    if not cur[1] then
      redis.call('ZREM', KEYS[1], name)
    elseif tonumber(cur[3]) > now and n < limit then
      table.insert(out, name)
      table.insert(out, cur[1])
      table.insert(out, cur[2])
      table.insert(out, cur[3])
      n = n + 1
    end
  end
  if #batch < batch_size then break end
  min = '(' .. batch[#batch]
end
return out
"#;

const REVOKE: &str = r#"
local u = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(ARGV[1]))
redis.call('SET', KEYS[1], string.format('%d', u))
redis.call('EXPIREAT', KEYS[1], u)
return u
"#;

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

const SWEEP: &str = r#"
local min, removed = '-', 0
while true do
  local batch = redis.call('ZRANGEBYLEX', KEYS[1], min, '+', 'LIMIT', 0, tonumber(ARGV[2]))
  if #batch == 0 then break end
  for _, name in ipairs(batch) do
    if redis.call('EXISTS', ARGV[1] .. 'name:' .. name) == 0 then
      redis.call('ZREM', KEYS[1], name)
      removed = removed + 1
    end
  end
  if #batch < tonumber(ARGV[2]) then break end
  min = '(' .. batch[#batch]
end
return removed
"#;

struct Scripts {
    claim: Script,
    refresh: Script,
    by_id: Script,
    remove: Script,
    list: Script,
    revoke: Script,
    put_edge: Script,
    edge_closed: Script,
    edges: Script,
}

/// The state of several replicas in one Redis.
pub struct RedisStore {
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

/// `url` with any credentials (`user:password@`) replaced by `***@`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
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

impl RedisStore {
    /// A store on the Redis at `url` (`redis://[:password@]host:port[/db]`). Returns at
    /// once: the connection is made in the background and retried every
    /// [`RECONNECT_INTERVAL`], so control starts (not ready) while Redis is down.
    /// Must be called inside a Tokio runtime; the background tasks stop when the store
    /// is dropped.
    pub fn open(url: &str) -> Result<RedisStore, ConfigError> {
        let shown_url = redact(url);
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
        tokio::spawn(subscribe(shared.clone(), stop.clone()).instrument(span.clone()));
        tokio::spawn(sweep(shared.clone(), stop.clone()).instrument(span));
        Ok(RedisStore {
            shared,
            scripts: Scripts {
                claim: Script::new(&format!("{EXPIRY_HELPERS}{CLAIM}")),
                refresh: Script::new(&format!("{EXPIRY_HELPERS}{REFRESH}")),
                by_id: Script::new(BY_ID),
                remove: Script::new(REMOVE),
                list: Script::new(LIST),
                revoke: Script::new(REVOKE),
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

fn record(name: &str, v: Vec<String>) -> Option<TunnelRecord> {
    match v.as_slice() {
        [tunnel_id, created, expires] if !tunnel_id.is_empty() => Some(TunnelRecord {
            tunnel_id: tunnel_id.clone(),
            name: name.to_string(),
            created_at: to_u64(created),
            expires_at: to_u64(expires),
        }),
        _ => None,
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
                    let ok = matches!(
                        tokio::time::timeout(REDIS_CALL_TIMEOUT, sink.ping::<String>()).await,
                        Ok(Ok(_))
                    );
                    if !ok { break; }
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

/// Drops names of expired tunnels from the list index now and then, so it does not
/// grow with names nobody lists.
async fn sweep(shared: Arc<Shared>, stop: CancellationToken) {
    let script = Script::new(SWEEP);
    let mut tick = tokio::time::interval(INDEX_SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(mut c) = shared.conn() else { continue };
        let mut inv = script.key(key(&["names"]));
        inv.arg(KEY_PREFIX).arg(LIST_BATCH);
        match shared.timed(inv.invoke_async::<u64>(&mut c)).await {
            Ok(n) if n > 0 => tracing::debug!(removed = n, "swept the name index"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "name index sweep skipped"),
        }
    }
}

fn to_u64(s: &str) -> u64 {
    s.parse().unwrap_or(0)
}

impl ControlStore for RedisStore {
    fn claim<'a>(
        &'a self,
        name: &'a str,
        tunnel_id: &'a str,
        now: u64,
        expires_at: u64,
        force: bool,
    ) -> StoreFuture<'a, Claim> {
        Box::pin(async move {
            let mut c = self.shared.conn()?;
            let mut inv = self.scripts.claim.key(key(&["name:", name]));
            inv.key(key(&["tunnel:", tunnel_id]))
                .key(key(&["names"]))
                .arg(name)
                .arg(tunnel_id)
                .arg(now)
                .arg(expires_at)
                .arg(if force { "1" } else { "0" })
                .arg(KEY_PREFIX)
                .arg(NO_EXPIRY_FROM);
            let (won, id, created, expires): (u8, String, u64, u64) =
                self.shared.timed(inv.invoke_async(&mut c)).await?;
            let r = TunnelRecord {
                tunnel_id: id,
                name: name.to_string(),
                created_at: created,
                expires_at: expires,
            };
            Ok(if won == 1 {
                Claim::Won(r)
            } else {
                Claim::Taken(r)
            })
        })
    }

    fn by_name<'a>(&'a self, name: &'a str, now: u64) -> StoreFuture<'a, Option<TunnelRecord>> {
        Box::pin(async move {
            let mut c = self.shared.conn()?;
            let cmd = redis::cmd("HMGET")
                .arg(key(&["name:", name]))
                .arg("tunnel_id")
                .arg("created_at")
                .arg("expires_at")
                .to_owned();
            let v: Vec<Option<String>> = self.shared.timed(cmd.query_async(&mut c)).await?;
            let v: Vec<String> = v.into_iter().map(Option::unwrap_or_default).collect();
            Ok(record(name, v).filter(|r| r.expires_at > now))
        })
    }

    fn by_id<'a>(&'a self, tunnel_id: &'a str, now: u64) -> StoreFuture<'a, Option<TunnelRecord>> {
        Box::pin(async move {
            let mut c = self.shared.conn()?;
            let mut inv = self.scripts.by_id.key(key(&["tunnel:", tunnel_id]));
            inv.arg(tunnel_id).arg(KEY_PREFIX);
            let v: Vec<String> = self.shared.timed(inv.invoke_async(&mut c)).await?;
            Ok(match v.as_slice() {
                [name, created, expires] => Some(TunnelRecord {
                    tunnel_id: tunnel_id.to_string(),
                    name: name.clone(),
                    created_at: to_u64(created),
                    expires_at: to_u64(expires),
                })
                .filter(|r| r.expires_at > now),
                _ => None,
            })
        })
    }

    fn remove<'a>(&'a self, tunnel_id: &'a str) -> StoreFuture<'a, Option<TunnelRecord>> {
        Box::pin(async move {
            let mut c = self.shared.conn()?;
            let mut inv = self.scripts.remove.key(key(&["tunnel:", tunnel_id]));
            inv.key(key(&["names"])).arg(tunnel_id).arg(KEY_PREFIX);
            let v: Vec<String> = self.shared.timed(inv.invoke_async(&mut c)).await?;
            Ok(match v.as_slice() {
                [name, created, expires] => Some(TunnelRecord {
                    tunnel_id: tunnel_id.to_string(),
                    name: name.clone(),
                    created_at: to_u64(created),
                    expires_at: to_u64(expires),
                }),
                _ => None,
            })
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
        now: u64,
    ) -> StoreFuture<'a, Vec<TunnelRecord>> {
        Box::pin(async move {
            let mut c = self.shared.conn()?;
            let min: Vec<u8> = match after {
                Some(a) if a >= prefix => [b"(", a.as_bytes()].concat(),
                _ if prefix.is_empty() => b"-".to_vec(),
                _ => [b"[", prefix.as_bytes()].concat(),
            };
            // Names are ASCII, so every name with the prefix sorts before prefix + 0xff.
            let max: Vec<u8> = if prefix.is_empty() {
                b"+".to_vec()
            } else {
                [b"[", prefix.as_bytes(), &[0xff]].concat()
            };
            let mut inv = self.scripts.list.key(key(&["names"]));
            inv.arg(min)
                .arg(max)
                .arg(limit)
                .arg(now)
                .arg(KEY_PREFIX)
                .arg(LIST_BATCH);
            let v: Vec<String> = self.shared.timed(inv.invoke_async(&mut c)).await?;
            Ok(v.chunks_exact(4)
                .map(|r| TunnelRecord {
                    name: r[0].clone(),
                    tunnel_id: r[1].clone(),
                    created_at: to_u64(&r[2]),
                    expires_at: to_u64(&r[3]),
                })
                .collect())
        })
    }

    fn refresh<'a>(
        &'a self,
        tunnel_ids: &'a [String],
        now: u64,
        until: u64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if tunnel_ids.is_empty() {
                return Ok(());
            }
            let mut c = self.shared.conn()?;
            // One script per batch: each is atomic and short, so a large edge does not
            // hold Redis for long.
            for batch in tunnel_ids.chunks(REFRESH_BATCH) {
                let mut inv = self.scripts.refresh.prepare_invoke();
                inv.arg(KEY_PREFIX).arg(now).arg(until).arg(NO_EXPIRY_FROM);
                for id in batch {
                    inv.arg(id);
                }
                let _: u64 = self.shared.timed(inv.invoke_async(&mut c)).await?;
            }
            Ok(())
        })
    }

    fn revoke<'a>(&'a self, tunnel_id: &'a str, until: u64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut c = self.shared.conn()?;
            let mut inv = self.scripts.revoke.key(key(&["revoked:", tunnel_id]));
            inv.arg(until);
            let _: u64 = self.shared.timed(inv.invoke_async(&mut c)).await?;
            Ok(())
        })
    }

    fn is_revoked<'a>(&'a self, tunnel_id: &'a str, now: u64) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut c = self.shared.conn()?;
            let cmd = redis::cmd("GET")
                .arg(key(&["revoked:", tunnel_id]))
                .to_owned();
            let v: Option<String> = self.shared.timed(cmd.query_async(&mut c)).await?;
            Ok(v.is_some_and(|u| to_u64(&u) > now))
        })
    }

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
}

/// Control with the store its configuration names: Redis when `redis_url` is set, the
/// in-memory store otherwise. Must be called inside a Tokio runtime.
pub fn control_for(
    config: crate::ControlConfig,
    keys: netbore_tokens::KeySet,
) -> Result<crate::Control, ConfigError> {
    let store: Box<dyn ControlStore> = match &config.redis_url {
        Some(url) => Box::new(RedisStore::open(url.expose())?),
        None => Box::new(crate::store::MemoryStore::default()),
    };
    Ok(crate::Control::with_store(config, keys, store))
}
