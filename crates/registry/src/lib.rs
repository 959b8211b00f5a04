//! Netbore's live-tunnel registry: which agent connections, on which edges, serve a
//! tunnel right now.
//!
//! Every edge registers each agent connection it holds as a *lease* under the tunnel's
//! public name and refreshes it every heartbeat; a lease that is not refreshed expires
//! (an edge that died without cleaning up drops out by itself). An edge that gets a
//! viewer request for a tunnel it does not hold looks the name up here and forwards to
//! a holder's internal address.
//!
//! - [`MemoryRegistry`]: one process (tests, several edges in one process).
//! - [`RedisRegistry`]: many edges sharing one Redis. A lease is a member of a sorted
//!   set `netbore:live:tunnel:<name>` scored by its expiry, so a registration is one
//!   `ZADD` and a lookup one `ZRANGEBYSCORE`; members name the edge *and* the
//!   connection, so removing one (`ZREM`) is a compare-and-delete that can never erase
//!   a newer registration of the same tunnel. Changes are announced on the pub/sub
//!   channel [`CHANNEL`] so edges can drop cached lookups.
//!
//! Lease expiry compares wall clocks of different edges: keep them in sync (NTP), as
//! any cluster does; a skew shortens or lengthens a dead edge's afterlife by as much.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::sync::broadcast;

/// Key prefix of every key the registry writes.
pub const KEY_PREFIX: &str = "netbore:live:";
/// Pub/sub channel carrying names whose holders changed (`*`: forget everything).
pub const CHANNEL: &str = "netbore:live:changed";
/// Longest wait for one Redis command; past it the registry counts as unreachable.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait between attempts to re-subscribe to [`CHANNEL`] after Redis went away.
pub const RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(500);
/// Change notifications buffered per subscriber; a slow one gets `*` (forget all).
pub const CHANGE_BUFFER: usize = 1024;

/// A message on [`CHANNEL`] meaning "forget every cached lookup".
pub const ALL: &str = "*";

/// How long a name counts as *known* (a tunnel that is offline rather than unknown)
/// after its last lease was written: as long as a holder edge remembers it as
/// offline (`OFFLINE_MEMORY` in the edge), so every edge gives the same answer.
pub const KNOWN_FOR: Duration = Duration::from_secs(3600);

/// One agent connection serving a tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Holder {
    /// The edge holding it.
    pub edge_id: String,
    /// The edge's internal address (`host:port`), where other edges forward to.
    pub addr: String,
    /// The connection, unique on its edge.
    pub conn_id: u64,
    /// The tunnel the connection serves (a name can change hands after a delete).
    pub tunnel_id: String,
}

impl Holder {
    fn encode(&self) -> String {
        format!(
            "{}\t{}\t{}\t{}",
            self.edge_id, self.addr, self.conn_id, self.tunnel_id
        )
    }

    fn decode(s: &str) -> Option<Holder> {
        let mut it = s.split('\t');
        let h = Holder {
            edge_id: it.next()?.to_string(),
            addr: it.next()?.to_string(),
            conn_id: it.next()?.parse().ok()?,
            tunnel_id: it.next()?.to_string(),
        };
        it.next().is_none().then_some(h)
    }
}

/// Why the registry could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// Redis did not answer (down, unreachable, too slow).
    #[error(
        "the registry (Redis at {url}) is unreachable: {reason}; check that Redis is running and reachable from the edge"
    )]
    Unavailable {
        /// Redis URL without credentials.
        url: String,
        /// What failed.
        reason: String,
    },
    /// An edge id or address that cannot be stored.
    #[error("invalid registration: {0}")]
    Invalid(String),
}

/// A boxed future, for object-safe async methods.
pub type RegistryFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, RegistryError>> + Send + 'a>>;

/// The registry, as edges use it.
pub trait LiveRegistry: Send + Sync + 'static {
    /// Registers or refreshes leases (`name`, holder) valid for `lease`, in one round
    /// trip, and announces new names.
    fn register<'a>(
        &'a self,
        entries: &'a [(String, Holder)],
        lease: Duration,
    ) -> RegistryFuture<'a, ()>;

    /// Removes one lease (only that exact connection's).
    fn unregister<'a>(&'a self, name: &'a str, holder: &'a Holder) -> RegistryFuture<'a, ()>;

    /// The live holders of `name`.
    fn lookup<'a>(&'a self, name: &'a str) -> RegistryFuture<'a, Vec<Holder>>;

    /// Names whose holders changed, as announced ([`ALL`] means every name).
    fn changes(&self) -> broadcast::Receiver<String>;

    /// True when `name` had a lease registered within [`KNOWN_FOR`]: a tunnel whose
    /// agent is offline, not an unknown name. A registry that does not remember
    /// answers `false`.
    fn known<'a>(&'a self, _name: &'a str) -> RegistryFuture<'a, bool> {
        Box::pin(async { Ok(false) })
    }

    /// Takes one of at most `max` places counted under `key` by every edge sharing the
    /// registry (an ephemeral token's links); the count is forgotten after `ttl` (the
    /// token's remaining life). `Ok(false)` when every place is taken. A registry that
    /// lives in one process counts nothing here (each edge counts its own).
    fn acquire<'a>(&'a self, _key: &'a str, _max: u64, _ttl: Duration) -> RegistryFuture<'a, bool> {
        Box::pin(async { Ok(true) })
    }

    /// Gives back a place taken with [`LiveRegistry::acquire`].
    fn release<'a>(&'a self, _key: &'a str) -> RegistryFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// Key prefix of the per-token link counts ([`LiveRegistry::acquire`]).
pub const PLACES_PREFIX: &str = "netbore:live:places:";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn check(h: &Holder) -> Result<(), RegistryError> {
    let bad = |s: &str| s.is_empty() || s.contains(['\t', '\n', '\r']);
    if bad(&h.edge_id) || bad(&h.addr) || bad(&h.tunnel_id) {
        return Err(RegistryError::Invalid(format!(
            "edge id, address and tunnel id must be non-empty without tabs or newlines: {h:?}"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------

/// The registry in this process's memory.
pub struct MemoryRegistry {
    leases: Mutex<HashMap<String, HashMap<Holder, u64>>>,
    /// Name → when it stops being known (ms).
    known: Mutex<HashMap<String, u64>>,
    changes: broadcast::Sender<String>,
}

impl Default for MemoryRegistry {
    fn default() -> MemoryRegistry {
        MemoryRegistry {
            leases: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
            changes: broadcast::channel(CHANGE_BUFFER).0,
        }
    }
}

impl LiveRegistry for MemoryRegistry {
    fn register<'a>(
        &'a self,
        entries: &'a [(String, Holder)],
        lease: Duration,
    ) -> RegistryFuture<'a, ()> {
        Box::pin(async move {
            entries.iter().try_for_each(|(_, h)| check(h))?;
            let until = now_ms() + lease.as_millis() as u64;
            let mut fresh = Vec::new();
            {
                let known_until = now_ms() + KNOWN_FOR.as_millis() as u64;
                let mut known = self.known.lock();
                let now = now_ms();
                known.retain(|_, t| *t > now);
                for (name, _) in entries {
                    known.insert(name.clone(), known_until);
                }
            }
            {
                let mut map = self.leases.lock();
                for (name, h) in entries {
                    if map
                        .entry(name.clone())
                        .or_default()
                        .insert(h.clone(), until)
                        .is_none()
                    {
                        fresh.push(name.clone());
                    }
                }
            }
            for n in fresh {
                let _ = self.changes.send(n);
            }
            Ok(())
        })
    }

    fn unregister<'a>(&'a self, name: &'a str, holder: &'a Holder) -> RegistryFuture<'a, ()> {
        Box::pin(async move {
            let removed = {
                let mut map = self.leases.lock();
                let removed = map.get_mut(name).and_then(|m| m.remove(holder)).is_some();
                if map.get(name).is_some_and(|m| m.is_empty()) {
                    map.remove(name);
                }
                removed
            };
            if removed {
                let _ = self.changes.send(name.to_string());
            }
            Ok(())
        })
    }

    fn lookup<'a>(&'a self, name: &'a str) -> RegistryFuture<'a, Vec<Holder>> {
        Box::pin(async move {
            let now = now_ms();
            let mut map = self.leases.lock();
            let Some(m) = map.get_mut(name) else {
                return Ok(Vec::new());
            };
            m.retain(|_, until| *until > now);
            Ok(m.keys().cloned().collect())
        })
    }

    fn known<'a>(&'a self, name: &'a str) -> RegistryFuture<'a, bool> {
        Box::pin(async move { Ok(self.known.lock().get(name).is_some_and(|t| *t > now_ms())) })
    }

    fn changes(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }
}

// ---------------------------------------------------------------------------------

/// The registry in Redis, shared by every edge.
pub struct RedisRegistry {
    client: redis::Client,
    url: String,
    conn: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    changes: broadcast::Sender<String>,
}

fn tunnel_key(name: &str) -> String {
    format!("{KEY_PREFIX}tunnel:{name}")
}

fn known_key(name: &str) -> String {
    format!("{KEY_PREFIX}known:{name}")
}

/// A Redis URL without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://<redacted>@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

impl RedisRegistry {
    /// A registry on the Redis at `url` (`redis://host:port[/db]`). Connects lazily
    /// (an edge starts while Redis is down) and starts following [`CHANNEL`].
    pub fn new(url: &str) -> Result<Arc<RedisRegistry>, RegistryError> {
        let client = redis::Client::open(url).map_err(|e| RegistryError::Unavailable {
            url: redact_url(url),
            reason: format!("not a usable Redis URL ({e})"),
        })?;
        let r = Arc::new(RedisRegistry {
            client,
            url: redact_url(url),
            conn: tokio::sync::Mutex::new(None),
            changes: broadcast::channel(CHANGE_BUFFER).0,
        });
        tokio::spawn(follow_changes(Arc::downgrade(&r)));
        Ok(r)
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> RegistryError {
        RegistryError::Unavailable {
            url: self.url.clone(),
            reason: reason.to_string(),
        }
    }

    async fn conn(&self) -> Result<redis::aio::ConnectionManager, RegistryError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(OP_TIMEOUT)
            .set_response_timeout(OP_TIMEOUT)
            .set_number_of_retries(1);
        let c = tokio::time::timeout(
            OP_TIMEOUT,
            redis::aio::ConnectionManager::new_with_config(self.client.clone(), cfg),
        )
        .await
        .map_err(|_| self.unavailable("connecting timed out"))?
        .map_err(|e| self.unavailable(e))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, RegistryError> {
        let mut c = self.conn().await?;
        tokio::time::timeout(OP_TIMEOUT, pipe.query_async::<T>(&mut c))
            .await
            .map_err(|_| self.unavailable(format!("no answer within {OP_TIMEOUT:?}")))?
            .map_err(|e| self.unavailable(e))
    }
}

impl LiveRegistry for RedisRegistry {
    fn acquire<'a>(&'a self, key: &'a str, max: u64, ttl: Duration) -> RegistryFuture<'a, bool> {
        Box::pin(async move {
            let key = format!("{PLACES_PREFIX}{key}");
            let mut pipe = redis::pipe();
            pipe.cmd("INCR").arg(&key);
            pipe.cmd("PEXPIRE")
                .arg(&key)
                .arg(ttl.as_millis().max(1) as u64)
                .ignore();
            let (n,): (u64,) = self.run(&pipe).await?;
            if n <= max {
                return Ok(true);
            }
            let mut undo = redis::pipe();
            undo.cmd("DECR").arg(&key).ignore();
            self.run::<()>(&undo).await?;
            Ok(false)
        })
    }

    fn release<'a>(&'a self, key: &'a str) -> RegistryFuture<'a, ()> {
        Box::pin(async move {
            let key = format!("{PLACES_PREFIX}{key}");
            // Only while the count exists: a count that expired is not brought back
            // below zero.
            let mut pipe = redis::pipe();
            pipe.cmd("EVAL")
                .arg("if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('DECR', KEYS[1]) end return 0")
                .arg(1)
                .arg(&key)
                .ignore();
            self.run::<()>(&pipe).await
        })
    }

    fn register<'a>(
        &'a self,
        entries: &'a [(String, Holder)],
        lease: Duration,
    ) -> RegistryFuture<'a, ()> {
        Box::pin(async move {
            if entries.is_empty() {
                return Ok(());
            }
            entries.iter().try_for_each(|(_, h)| check(h))?;
            let now = now_ms();
            let until = now + lease.as_millis() as u64;
            let mut pipe = redis::pipe();
            for (name, h) in entries {
                let key = tunnel_key(name);
                // ZADD answers 1 for a new member: announced below.
                pipe.cmd("ZADD").arg(&key).arg(until).arg(h.encode());
                pipe.cmd("ZREMRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(now)
                    .ignore();
                pipe.cmd("PEXPIRE")
                    .arg(&key)
                    .arg(lease.as_millis() as u64 * 2)
                    .ignore();
                pipe.cmd("SET")
                    .arg(known_key(name))
                    .arg(1)
                    .arg("PX")
                    .arg(KNOWN_FOR.as_millis() as u64)
                    .ignore();
            }
            let added: Vec<i64> = self.run(&pipe).await?;
            let fresh: Vec<&String> = entries
                .iter()
                .zip(&added)
                .filter(|(_, n)| **n > 0)
                .map(|((name, _), _)| name)
                .collect();
            if !fresh.is_empty() {
                let mut p = redis::pipe();
                for n in fresh {
                    p.cmd("PUBLISH").arg(CHANNEL).arg(n).ignore();
                }
                self.run::<()>(&p).await?;
            }
            Ok(())
        })
    }

    fn unregister<'a>(&'a self, name: &'a str, holder: &'a Holder) -> RegistryFuture<'a, ()> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("ZREM")
                .arg(tunnel_key(name))
                .arg(holder.encode())
                .ignore();
            pipe.cmd("PUBLISH").arg(CHANNEL).arg(name).ignore();
            self.run::<()>(&pipe).await
        })
    }

    fn lookup<'a>(&'a self, name: &'a str) -> RegistryFuture<'a, Vec<Holder>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("ZRANGEBYSCORE")
                .arg(tunnel_key(name))
                .arg(now_ms())
                .arg("+inf");
            let (members,): (Vec<String>,) = self.run(&pipe).await?;
            Ok(members.iter().filter_map(|m| Holder::decode(m)).collect())
        })
    }

    fn known<'a>(&'a self, name: &'a str) -> RegistryFuture<'a, bool> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("EXISTS").arg(known_key(name));
            let (n,): (i64,) = self.run(&pipe).await?;
            Ok(n > 0)
        })
    }

    fn changes(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }
}

/// Follows [`CHANNEL`] while the registry lives, re-subscribing after Redis trouble
/// (and then announcing [`ALL`], since changes may have been missed).
async fn follow_changes(reg: std::sync::Weak<RedisRegistry>) {
    use futures_util::StreamExt;
    let mut first = true;
    loop {
        let Some(r) = reg.upgrade() else { return };
        let client = r.client.clone();
        let tx = r.changes.clone();
        drop(r);
        let sub = async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(CHANNEL).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        match tokio::time::timeout(OP_TIMEOUT, sub).await {
            Ok(Ok(mut ps)) => {
                if !first {
                    let _ = tx.send(ALL.to_string());
                }
                let mut stream = ps.on_message();
                while let Some(m) = stream.next().await {
                    if reg.strong_count() == 0 {
                        return;
                    }
                    if let Ok(name) = m.get_payload::<String>() {
                        let _ = tx.send(name);
                    }
                }
                tracing::warn!("registry change feed from Redis ended; re-subscribing");
                let _ = tx.send(ALL.to_string());
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "registry change feed: subscribe failed"),
            Err(_) => tracing::debug!("registry change feed: subscribe timed out"),
        }
        first = false;
        tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(edge: &str, conn: u64) -> Holder {
        Holder {
            edge_id: edge.into(),
            addr: format!("127.0.0.1:{conn}"),
            conn_id: conn,
            tunnel_id: "tun_a".into(),
        }
    }

    #[test]
    fn holders_round_trip_through_their_encoding() {
        let x = h("edge-1", 7);
        assert_eq!(Holder::decode(&x.encode()), Some(x));
        assert_eq!(Holder::decode("a\tb\tnot-a-number\td"), None);
        assert!(
            check(&Holder {
                edge_id: "a\tb".into(),
                ..h("e", 1)
            })
            .is_err()
        );
    }

    #[test]
    fn urls_lose_their_password_in_messages() {
        assert_eq!(
            redact_url("redis://:hunter2@redis:6379/0"),
            "redis://<redacted>@redis:6379/0"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }

    #[tokio::test]
    async fn memory_leases_expire_and_removal_is_per_connection() {
        let r = MemoryRegistry::default();
        let mut changes = r.changes();
        let entries = vec![
            ("app".to_string(), h("e1", 1)),
            ("app".to_string(), h("e2", 2)),
        ];
        r.register(&entries, Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(changes.recv().await.unwrap(), "app");
        assert_eq!(r.lookup("app").await.unwrap().len(), 2);
        // A stale edge removing its old connection leaves the newer one alone.
        r.unregister("app", &h("e1", 99)).await.unwrap();
        assert_eq!(r.lookup("app").await.unwrap().len(), 2);
        r.unregister("app", &h("e1", 1)).await.unwrap();
        assert_eq!(r.lookup("app").await.unwrap(), vec![h("e2", 2)]);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(r.lookup("app").await.unwrap().is_empty(), "lease expired");
    }
}
