//! Control's state: tunnels and the names they hold.
//!
//! Behind a trait so a Redis implementation can replace the in-memory one. Operations
//! return futures (a networked store waits on I/O) and may fail with [`StoreError`]
//! (a networked store can be unreachable). Every operation that can race is one atomic
//! step in the contract: a claim has exactly one winner, a removal removes only the
//! record of the tunnel it names, and a tombstone once written stays until its time.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::EdgeStatus;

/// One tunnel as control knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TunnelRecord {
    /// Tunnel id.
    pub tunnel_id: String,
    /// Public name.
    pub name: String,
    /// Creation time (Unix seconds).
    pub created_at: u64,
    /// When the name is released unless recreated or refreshed (Unix seconds);
    /// [`HELD_UNTIL_DELETED`] for a named tunnel.
    pub expires_at: u64,
}

/// The `expires_at` of a name held until its tunnel is deleted (a *named* tunnel: made
/// with a management token and a requested name). The largest value every store can
/// keep exactly (SQL `BIGINT`, Redis strings), so stores need no separate flag.
pub const HELD_UNTIL_DELETED: u64 = i64::MAX as u64;

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

/// The store's contract.
pub trait ControlStore: Send + Sync + 'static {
    /// Claims `name` for `tunnel_id` until `expires_at`, atomically: wins when the name
    /// is free, expired, or already held by `tunnel_id` (which extends it, never
    /// shortens it); with `force`, takes it from another tunnel (an administrator's
    /// claim). Of concurrent claims for one free name, exactly one wins.
    fn claim<'a>(
        &'a self,
        name: &'a str,
        tunnel_id: &'a str,
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
    ) -> StoreFuture<'a, Vec<TunnelRecord>>;
    /// Extends the hold of each of these tunnels (a link to it is live on some edge) to at
    /// least `until`: for each id whose record is live at `now`, expires_at = max(expires_at, until).
    fn refresh<'a>(&'a self, tunnel_ids: &'a [String], now: u64, until: u64)
    -> StoreFuture<'a, ()>;
    /// Marks a deleted tunnel so its recreate tokens are refused until `until`.
    fn revoke<'a>(&'a self, tunnel_id: &'a str, until: u64) -> StoreFuture<'a, ()>;
    /// True while `tunnel_id` is revoked.
    fn is_revoked<'a>(&'a self, tunnel_id: &'a str, now: u64) -> StoreFuture<'a, bool>;

    // What a store shared by several replicas adds. The defaults are those of a store
    // that lives in one process: always reachable, and this replica's view of the
    // edges is the whole view.

    /// Fails while the store cannot serve (readiness probes ask this).
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
    /// Every edge any replica has a recent report of; `None` when the store keeps no
    /// edges (then this replica's own reports are the whole view).
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
}

/// How often the in-memory store forgets expired names and tombstones (seconds).
pub const SWEEP_INTERVAL_SECS: u64 = 60;

#[derive(Default)]
struct State {
    by_name: BTreeMap<String, TunnelRecord>,
    /// tunnel id → the name it holds.
    by_id: HashMap<String, String>,
    /// tunnel id → refused until.
    revoked: HashMap<String, u64>,
    next_sweep: u64,
}

impl State {
    fn sweep(&mut self, now: u64) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_INTERVAL_SECS;
        let by_id = &mut self.by_id;
        self.by_name.retain(|_, r| {
            let live = r.expires_at > now;
            if !live {
                by_id.remove(&r.tunnel_id);
            }
            live
        });
        self.revoked.retain(|_, until| *until > now);
    }

    fn insert(&mut self, r: TunnelRecord) {
        if let Some(old) = self.by_name.insert(r.name.clone(), r.clone()) {
            self.by_id.remove(&old.tunnel_id);
        }
        // A tunnel holds one name: if it held another, that one is released.
        if let Some(prev) = self.by_id.insert(r.tunnel_id.clone(), r.name.clone())
            && prev != r.name
        {
            self.by_name.remove(&prev);
        }
    }
}

/// The one-process store: a mutex around maps, so every operation is atomic.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

fn ready<'a, T: Send + 'a>(v: T) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(Ok(v)))
}

impl ControlStore for MemoryStore {
    fn claim<'a>(
        &'a self,
        name: &'a str,
        tunnel_id: &'a str,
        now: u64,
        expires_at: u64,
        force: bool,
    ) -> StoreFuture<'a, Claim> {
        let mut st = self.state.lock();
        st.sweep(now);
        let out = match st.by_name.get_mut(name) {
            Some(r) if r.expires_at > now && r.tunnel_id != tunnel_id && !force => {
                Claim::Taken(r.clone())
            }
            Some(r) if r.expires_at > now && r.tunnel_id == tunnel_id => {
                r.expires_at = r.expires_at.max(expires_at);
                Claim::Won(r.clone())
            }
            _ => {
                let r = TunnelRecord {
                    tunnel_id: tunnel_id.into(),
                    name: name.into(),
                    created_at: now,
                    expires_at,
                };
                st.insert(r.clone());
                Claim::Won(r)
            }
        };
        ready(out)
    }

    fn by_name<'a>(&'a self, name: &'a str, now: u64) -> StoreFuture<'a, Option<TunnelRecord>> {
        let st = self.state.lock();
        ready(st.by_name.get(name).filter(|r| r.expires_at > now).cloned())
    }

    fn by_id<'a>(&'a self, tunnel_id: &'a str, now: u64) -> StoreFuture<'a, Option<TunnelRecord>> {
        let st = self.state.lock();
        let r = st
            .by_id
            .get(tunnel_id)
            .and_then(|n| st.by_name.get(n))
            .filter(|r| r.tunnel_id == tunnel_id && r.expires_at > now)
            .cloned();
        ready(r)
    }

    fn remove<'a>(&'a self, tunnel_id: &'a str) -> StoreFuture<'a, Option<TunnelRecord>> {
        let mut st = self.state.lock();
        let r = match st.by_id.remove(tunnel_id) {
            Some(name)
                if st
                    .by_name
                    .get(&name)
                    .is_some_and(|r| r.tunnel_id == tunnel_id) =>
            {
                st.by_name.remove(&name)
            }
            _ => None,
        };
        ready(r)
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
        now: u64,
    ) -> StoreFuture<'a, Vec<TunnelRecord>> {
        use std::ops::Bound;
        let st = self.state.lock();
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        let page = st
            .by_name
            .range((start, Bound::Unbounded))
            .take_while(|(n, _)| n.starts_with(prefix))
            .filter(|(_, r)| r.expires_at > now)
            .take(limit)
            .map(|(_, r)| r.clone())
            .collect();
        ready(page)
    }

    fn refresh<'a>(
        &'a self,
        tunnel_ids: &'a [String],
        now: u64,
        until: u64,
    ) -> StoreFuture<'a, ()> {
        let mut st = self.state.lock();
        let st = &mut *st;
        for id in tunnel_ids {
            if let Some(name) = st.by_id.get(id)
                && let Some(r) = st.by_name.get_mut(name)
                && r.tunnel_id == *id
                && r.expires_at > now
            {
                r.expires_at = r.expires_at.max(until);
            }
        }
        ready(())
    }

    fn revoke<'a>(&'a self, tunnel_id: &'a str, until: u64) -> StoreFuture<'a, ()> {
        let mut st = self.state.lock();
        let until = st.revoked.get(tunnel_id).map_or(until, |u| (*u).max(until));
        st.revoked.insert(tunnel_id.to_string(), until);
        ready(())
    }

    fn is_revoked<'a>(&'a self, tunnel_id: &'a str, now: u64) -> StoreFuture<'a, bool> {
        let st = self.state.lock();
        ready(st.revoked.get(tunnel_id).is_some_and(|u| *u > now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn won(s: &MemoryStore, name: &str, id: &str, now: u64, exp: u64, force: bool) -> bool {
        matches!(
            s.claim(name, id, now, exp, force).await.unwrap(),
            Claim::Won(_)
        )
    }

    #[tokio::test]
    async fn claims_have_one_winner_and_expire() {
        let s = MemoryStore::default();
        assert!(won(&s, "a", "t1", 10, 100, false).await);
        assert!(!won(&s, "a", "t2", 20, 100, false).await);
        // The holder extends its hold.
        assert!(
            matches!(s.claim("a", "t1", 20, 200, false).await.unwrap(), Claim::Won(r) if r.expires_at == 200)
        );
        // After expiry, anyone.
        assert!(won(&s, "a", "t2", 201, 300, false).await);
        // An administrator's claim takes it.
        assert!(won(&s, "a", "t3", 202, 300, true).await);
        assert_eq!(s.by_name("a", 203).await.unwrap().unwrap().tunnel_id, "t3");
        assert!(s.by_id("t2", 203).await.unwrap().is_none());
        assert!(s.remove("t2").await.unwrap().is_none());
        assert!(s.remove("t3").await.unwrap().is_some());
        assert!(s.by_name("a", 203).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn concurrent_claims_of_one_name_have_exactly_one_winner() {
        let s = std::sync::Arc::new(MemoryStore::default());
        let mut tasks = Vec::new();
        for i in 0..32 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                won(&s, "contested", &format!("t{i}"), 1, 100, false).await
            }));
        }
        let mut winners = 0;
        for t in tasks {
            winners += usize::from(t.await.unwrap());
        }
        assert_eq!(winners, 1);
    }

    #[tokio::test]
    async fn list_pages_by_name_within_the_prefix() {
        let s = MemoryStore::default();
        for n in ["b", "a", "c", "ab", "ba"] {
            s.claim(n, &format!("t-{n}"), 0, 100, false).await.unwrap();
        }
        let names = |v: Vec<TunnelRecord>| v.into_iter().map(|r| r.name).collect::<Vec<_>>();
        assert_eq!(names(s.list("", None, 2, 1).await.unwrap()), ["a", "ab"]);
        assert_eq!(
            names(s.list("", Some("ab"), 2, 1).await.unwrap()),
            ["b", "ba"]
        );
        assert_eq!(names(s.list("a", None, 10, 1).await.unwrap()), ["a", "ab"]);
        assert_eq!(names(s.list("b", Some("b"), 10, 1).await.unwrap()), ["ba"]);
        // Expired records are not listed.
        assert!(s.list("", None, 10, 100).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn refresh_extends_only_live_records_and_never_shortens() {
        let s = MemoryStore::default();
        s.claim("live", "t1", 0, 10, false).await.unwrap();
        s.claim("gone", "t2", 0, 5, false).await.unwrap();
        s.claim("named", "t3", 0, HELD_UNTIL_DELETED, false)
            .await
            .unwrap();
        let ids = ["t1", "t2", "t3", "t-unknown"].map(String::from);
        s.refresh(&ids, 6, 100).await.unwrap();
        assert_eq!(s.by_id("t1", 6).await.unwrap().unwrap().expires_at, 100);
        // An expired record is not brought back by a late report.
        assert!(s.by_id("t2", 6).await.unwrap().is_none());
        assert_eq!(
            s.by_id("t3", 6).await.unwrap().unwrap().expires_at,
            HELD_UNTIL_DELETED
        );
        s.refresh(&ids, 7, 50).await.unwrap();
        assert_eq!(s.by_id("t1", 7).await.unwrap().unwrap().expires_at, 100);
    }

    #[tokio::test]
    async fn expired_names_and_tombstones_are_forgotten() {
        let s = MemoryStore::default();
        s.claim("old", "t1", 0, 10, false).await.unwrap();
        s.revoke("t0", 10).await.unwrap();
        assert!(s.is_revoked("t0", 5).await.unwrap());
        // The next sweep comes at most SWEEP_INTERVAL_SECS after the first claim.
        s.claim("new", "t2", SWEEP_INTERVAL_SECS, 1000, false)
            .await
            .unwrap();
        let st = s.state.lock();
        assert!(!st.by_name.contains_key("old"));
        assert!(!st.by_id.contains_key("t1"));
        assert!(st.revoked.is_empty());
    }
}
