//! Control's state, in two parts with two contracts.
//!
//! - [`ControlStore`], what must last: tunnels, the names they hold and tombstones of
//!   deleted tunnels. One implementation, [`crate::sql_store::SqlStore`], on SQLite (a
//!   file, or in memory for `netbore dev` and tests) or PostgreSQL (several replicas).
//! - [`LiveState`], what the replicas share and the edges can rebuild: edge reports and
//!   deletion announcements. In this process ([`LocalLive`]) for one replica, in Redis
//!   ([`crate::redis_store::RedisLive`]) for several. A Redis flush loses nothing
//!   durable.
//!
//! Operations return futures (a networked store waits on I/O) and may fail with
//! [`StoreError`] (a networked store can be unreachable). Every operation that can race
//! is one atomic step in the contract: a claim has exactly one winner, a removal
//! removes only the record of the tunnel it names, and a tombstone once written stays
//! until its time.

use std::future::Future;
use std::pin::Pin;

use serde::Serialize;
use tokio::sync::broadcast;

use crate::EdgeStatus;

/// "Never" as a time: the largest time the database holds (`i64::MAX` seconds). Every
/// time at or past it (up to `u64::MAX`) is stored, and read back, as this.
pub const NEVER: u64 = i64::MAX as u64;

/// One tunnel as control knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TunnelRecord {
    /// Tunnel id.
    pub tunnel_id: String,
    /// Public name.
    pub name: String,
    /// Creation time (Unix seconds).
    pub created_at: u64,
    /// When the name is released unless recreated or refreshed (Unix seconds;
    /// [`NEVER`] for a hold until the tunnel is deleted).
    pub expires_at: u64,
    /// The subject of the token or API key that created it; `None` for an anonymous
    /// quick tunnel (only `admin` acts on those).
    pub owner: Option<String>,
    /// When its owner disabled it (Unix seconds); `None`: enabled. A disabled tunnel
    /// holds its name whatever `expires_at` says, and is refused to agents and viewers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<u64>,
}

/// The `expires_at` of a name held until its tunnel is deleted (a *named* tunnel: made
/// with a management token and a requested name): [`NEVER`], so stores need no
/// separate flag.
pub const HELD_UNTIL_DELETED: u64 = NEVER;

/// A tunnel credential as control stores it (its secret only as a hash, kept apart:
/// see [`ControlStore::credential_by_prefix`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CredentialRecord {
    /// Credential id (`tcr_…`).
    pub id: String,
    /// The tunnel it runs.
    pub tunnel_id: String,
    /// The secret's first characters, unique: how a presented secret is found.
    pub prefix: String,
    /// Label given at issue.
    pub label: String,
    /// Issue time (Unix seconds).
    pub created_at: u64,
    /// Last time an agent got a token with it (Unix seconds).
    pub last_used_at: Option<u64>,
    /// Revocation time (Unix seconds); a revoked credential is refused for good.
    pub revoked_at: Option<u64>,
}

/// Result of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The name is now held by the given record (new or refreshed).
    Won(TunnelRecord),
    /// Another tunnel holds the name.
    Taken(TunnelRecord),
}

/// The store could not do what was asked; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backing service is unreachable or failed; retrying later may work.
    #[error("the state store is unavailable: {0}")]
    Unavailable(String),
}

/// What every store operation returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The durable store's contract: what must survive a restart of control and of Redis.
pub trait ControlStore: crate::accounts::AccountStore + Send + Sync + 'static {
    /// Claims `name` for `tunnel_id` until `expires_at`, atomically: wins when the name
    /// is free, expired, or already held by `tunnel_id` (which extends it, never
    /// shortens it); with `force`, takes it from another tunnel (an administrator's
    /// claim). Of concurrent claims for one free name, exactly one wins. A tunnel holds
    /// one name: winning another releases the one it held.
    fn claim<'a>(
        &'a self,
        name: &'a str,
        tunnel_id: &'a str,
        now: u64,
        expires_at: u64,
        force: bool,
    ) -> StoreFuture<'a, Claim> {
        self.claim_owned(name, tunnel_id, None, now, expires_at, force)
    }
    /// [`ControlStore::claim`] for `owner` (a token's subject): a tunnel it inserts is
    /// owned by `owner`, one it wins over (forced) or extends passes to `owner`; with
    /// `None`, an existing tunnel keeps its owner and a new one has none.
    fn claim_owned<'a>(
        &'a self,
        name: &'a str,
        tunnel_id: &'a str,
        owner: Option<&'a str>,
        now: u64,
        expires_at: u64,
        force: bool,
    ) -> StoreFuture<'a, Claim>;
    /// The live (unexpired at `now`) record holding `name`.
    fn by_name<'a>(&'a self, name: &'a str, now: u64) -> StoreFuture<'a, Option<TunnelRecord>>;
    /// The live record of `tunnel_id`.
    fn by_id<'a>(&'a self, tunnel_id: &'a str, now: u64) -> StoreFuture<'a, Option<TunnelRecord>>;
    /// Removes `tunnel_id`'s record, if it still holds its name, and returns it. Atomic:
    /// a name another tunnel has claimed meanwhile is left alone.
    fn remove<'a>(&'a self, tunnel_id: &'a str) -> StoreFuture<'a, Option<TunnelRecord>>;
    /// Up to `limit` live records whose name starts with `prefix`, ordered by name,
    /// strictly after the name `after`.
    fn list<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
        now: u64,
    ) -> StoreFuture<'a, Vec<TunnelRecord>> {
        self.list_owned(prefix, after, limit, now, None)
    }
    /// [`ControlStore::list`], only the tunnels `owner` owns when it is given.
    fn list_owned<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
        now: u64,
        owner: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<TunnelRecord>>;
    /// Extends the hold of each of these tunnels (a link to it is live on some edge) to at
    /// least `until`: for each id whose record is live at `now`, expires_at = max(expires_at, until).
    fn refresh<'a>(&'a self, tunnel_ids: &'a [String], now: u64, until: u64)
    -> StoreFuture<'a, ()>;
    /// Marks a deleted tunnel so its recreate tokens are refused until `until`.
    fn revoke<'a>(&'a self, tunnel_id: &'a str, until: u64) -> StoreFuture<'a, ()>;
    /// True while `tunnel_id` is revoked.
    fn is_revoked<'a>(&'a self, tunnel_id: &'a str, now: u64) -> StoreFuture<'a, bool>;
    /// Fails while the store cannot serve (readiness probes ask this).
    fn ping(&self) -> StoreFuture<'_, ()>;
    /// The public TCP port of `tunnel_id`: the one it holds when that is in `range`,
    /// else the lowest port of `range` no live tunnel holds, now held by it (ports of
    /// tunnels that are gone are free again). `None` when every port is held.
    fn tcp_port<'a>(
        &'a self,
        tunnel_id: &'a str,
        range: netbore_tokens::PortRange,
        now: u64,
    ) -> StoreFuture<'a, Option<u16>>;
    /// Stores a new credential with the SHA-256 (hex) of its secret. Fails on a prefix
    /// already used (odds about 2^-48; the caller may retry with a new secret) and on a
    /// tunnel that no longer exists.
    fn insert_credential<'a>(
        &'a self,
        cred: &'a CredentialRecord,
        secret_hash: &'a str,
    ) -> StoreFuture<'a, ()>;
    /// The credential whose secret starts with `prefix`, and its secret's hash.
    fn credential_by_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> StoreFuture<'a, Option<(CredentialRecord, String)>>;
    /// Every credential of `tunnel_id`, revoked ones included, oldest first.
    fn credentials_of<'a>(&'a self, tunnel_id: &'a str) -> StoreFuture<'a, Vec<CredentialRecord>>;
    /// Marks credential `id` of `tunnel_id` revoked at `now` (a second revocation keeps
    /// the first time) and returns it; `None` when the tunnel has no such credential.
    fn revoke_credential<'a>(
        &'a self,
        tunnel_id: &'a str,
        id: &'a str,
        now: u64,
    ) -> StoreFuture<'a, Option<CredentialRecord>>;
    /// Records that credential `id` was used at `now`.
    fn touch_credential<'a>(&'a self, id: &'a str, now: u64) -> StoreFuture<'a, ()>;
    /// Disables (`Some(now)`) or enables (`None`) a tunnel; the record after the change,
    /// `None` when no such tunnel is live. Disabling keeps the name held (whatever its
    /// hold was) until enabled; enabling gives back the hold it had, or `hold_until` when
    /// that lapsed meanwhile.
    fn set_disabled<'a>(
        &'a self,
        tunnel_id: &'a str,
        disabled_at: Option<u64>,
        now: u64,
        hold_until: u64,
    ) -> StoreFuture<'a, Option<TunnelRecord>>;
    /// Every disabled tunnel (id and name), at most `limit`: what edges must refuse.
    fn disabled_tunnels(&self, limit: usize) -> StoreFuture<'_, Vec<(String, String)>>;
}

/// The live state several replicas share: what edges can rebuild within a report
/// interval, so losing it loses nothing durable. The defaults are those of one
/// replica in one process ([`LocalLive`]): always reachable, and this replica's view of
/// the edges is the whole view.
pub trait LiveState: Send + Sync + 'static {
    /// Fails while the live state cannot serve (readiness probes ask this).
    fn ping(&self) -> StoreFuture<'_, ()> {
        ready(())
    }
    /// Shares an edge's report with the other replicas.
    fn put_edge<'a>(&'a self, _status: &'a EdgeStatus) -> StoreFuture<'a, ()> {
        ready(())
    }
    /// Marks an edge's link to this replica closed (unless it has linked elsewhere since).
    fn edge_closed<'a>(&'a self, _edge_id: &'a str) -> StoreFuture<'a, ()> {
        ready(())
    }
    /// Every edge any replica has a recent report of; `None` when nothing is shared
    /// (then this replica's own reports are the whole view).
    fn edges(&self, _now: u64) -> StoreFuture<'_, Option<Vec<EdgeStatus>>> {
        ready(None)
    }
    /// Tells the other replicas that `tunnel_id` was deleted, so they disconnect it on
    /// the edges linked to them.
    fn publish_deletion<'a>(&'a self, _tunnel_id: &'a str) -> StoreFuture<'a, ()> {
        ready(())
    }
    /// Where to deliver deletions published by other replicas.
    fn attach_deletions(&self, _deletions: broadcast::Sender<String>) {}
    /// Writes fields of tunnels' live status, `(tunnel id, field, value)` (see
    /// [`crate::status`]); each tunnel's set lives [`crate::status::LAST_SEEN_TTL`]
    /// past its last write. `false`: not shared (the caller keeps them in memory).
    fn put_tunnel_fields<'a>(
        &'a self,
        _fields: &'a [(String, String, String)],
    ) -> StoreFuture<'a, bool> {
        ready(false)
    }
    /// Removes fields of tunnels' live status, `(tunnel id, field)`. `false`: not shared.
    fn del_tunnel_fields<'a>(&'a self, _fields: &'a [(String, String)]) -> StoreFuture<'a, bool> {
        ready(false)
    }
    /// Every field of each tunnel's live status, in the order of `tunnel_ids`; `None`:
    /// not shared.
    fn tunnel_fields<'a>(
        &'a self,
        _tunnel_ids: &'a [String],
    ) -> StoreFuture<'a, Option<Vec<TunnelFields>>> {
        ready(None)
    }
}

/// One tunnel's live status fields, `(field, value)` (see [`crate::status`]).
pub type TunnelFields = Vec<(String, String)>;

/// The live state of a single replica: nothing to share.
#[derive(Debug, Default)]
pub struct LocalLive;

impl LiveState for LocalLive {}

/// A ready future.
pub(crate) fn ready<'a, T: Send + 'a>(v: T) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(Ok(v)))
}
