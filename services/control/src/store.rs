//! Control's state: tunnels and the names they hold.
//!
//! Behind a trait so a Redis implementation can replace the in-memory one; every
//! operation that can race is a single atomic step in the contract (a claim has exactly
//! one winner; a removal names the tunnel id it removes).

use std::collections::BTreeMap;

use parking_lot::Mutex;
use serde::Serialize;

/// One tunnel as control knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TunnelRecord {
    /// Tunnel id.
    pub tunnel_id: String,
    /// Public name.
    pub name: String,
    /// Creation time (Unix seconds).
    pub created_at: u64,
    /// When the name is released unless recreated (Unix seconds).
    pub expires_at: u64,
}

/// Result of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The name is now held by the given record (new or refreshed).
    Won(TunnelRecord),
    /// Another tunnel holds the name.
    Taken(TunnelRecord),
}

/// The store's contract.
pub trait ControlStore: Send + Sync + 'static {
    /// Claims `name` for `tunnel_id` until `expires_at`: wins when the name is free,
    /// expired, or already held by `tunnel_id` (which refreshes it); with `force`, takes
    /// it from another tunnel (an administrator's claim). Atomic.
    fn claim(&self, name: &str, tunnel_id: &str, now: u64, expires_at: u64, force: bool) -> Claim;
    /// The live record holding `name`.
    fn by_name(&self, name: &str, now: u64) -> Option<TunnelRecord>;
    /// The live record of `tunnel_id`.
    fn by_id(&self, tunnel_id: &str, now: u64) -> Option<TunnelRecord>;
    /// Removes `tunnel_id`'s record (only if it still holds its name). Returns it.
    fn remove(&self, tunnel_id: &str) -> Option<TunnelRecord>;
    /// Live records whose name starts with `prefix`, ordered by name, after `cursor`.
    fn list(&self, prefix: &str, after: Option<&str>, limit: usize, now: u64) -> Vec<TunnelRecord>;
    /// Marks a deleted tunnel so its recreate tokens are refused until `until`.
    fn revoke(&self, tunnel_id: &str, until: u64);
    /// True while `tunnel_id` is revoked.
    fn is_revoked(&self, tunnel_id: &str, now: u64) -> bool;
}

/// The one-process store.
#[derive(Default)]
pub struct MemoryStore {
    by_name: Mutex<BTreeMap<String, TunnelRecord>>,
    revoked: Mutex<std::collections::HashMap<String, u64>>,
}

impl ControlStore for MemoryStore {
    fn claim(&self, name: &str, tunnel_id: &str, now: u64, expires_at: u64, force: bool) -> Claim {
        let mut m = self.by_name.lock();
        match m.get_mut(name) {
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
                m.insert(name.into(), r.clone());
                Claim::Won(r)
            }
        }
    }

    fn by_name(&self, name: &str, now: u64) -> Option<TunnelRecord> {
        self.by_name
            .lock()
            .get(name)
            .filter(|r| r.expires_at > now)
            .cloned()
    }

    fn by_id(&self, tunnel_id: &str, now: u64) -> Option<TunnelRecord> {
        self.by_name
            .lock()
            .values()
            .find(|r| r.tunnel_id == tunnel_id && r.expires_at > now)
            .cloned()
    }

    fn remove(&self, tunnel_id: &str) -> Option<TunnelRecord> {
        let mut m = self.by_name.lock();
        let name = m
            .iter()
            .find(|(_, r)| r.tunnel_id == tunnel_id)
            .map(|(n, _)| n.clone())?;
        m.remove(&name)
    }

    fn list(&self, prefix: &str, after: Option<&str>, limit: usize, now: u64) -> Vec<TunnelRecord> {
        let m = self.by_name.lock();
        m.range(after.map(|a| a.to_string()).unwrap_or_default()..)
            .filter(|(n, _)| after.is_none_or(|a| n.as_str() > a))
            .filter(|(n, r)| n.starts_with(prefix) && r.expires_at > now)
            .take(limit)
            .map(|(_, r)| r.clone())
            .collect()
    }

    fn revoke(&self, tunnel_id: &str, until: u64) {
        let mut r = self.revoked.lock();
        // Forget expired tombstones as new ones arrive, so the map stays bounded by
        // the deletions of one recreate-token lifetime.
        let now = netbore_tokens::now_unix();
        r.retain(|_, u| *u > now);
        r.insert(tunnel_id.to_string(), until);
    }

    fn is_revoked(&self, tunnel_id: &str, now: u64) -> bool {
        self.revoked.lock().get(tunnel_id).is_some_and(|u| *u > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_have_one_winner_and_expire() {
        let s = MemoryStore::default();
        assert!(matches!(s.claim("a", "t1", 10, 100, false), Claim::Won(_)));
        assert!(matches!(
            s.claim("a", "t2", 20, 100, false),
            Claim::Taken(_)
        ));
        assert!(matches!(s.claim("a", "t1", 20, 200, false), Claim::Won(r) if r.expires_at == 200));
        assert!(matches!(s.claim("a", "t2", 201, 300, false), Claim::Won(_)));
        assert!(matches!(s.claim("a", "t3", 202, 300, true), Claim::Won(_)));
        assert_eq!(s.by_name("a", 203).unwrap().tunnel_id, "t3");
        assert!(s.remove("t2").is_none());
        assert!(s.remove("t3").is_some());
        assert!(s.by_name("a", 203).is_none());
    }

    #[test]
    fn list_pages_by_name() {
        let s = MemoryStore::default();
        for n in ["b", "a", "c", "ab"] {
            s.claim(n, &format!("t-{n}"), 0, 100, false);
        }
        let p1 = s.list("", None, 2, 1);
        assert_eq!(
            p1.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["a", "ab"]
        );
        let p2 = s.list("", Some("ab"), 2, 1);
        assert_eq!(
            p2.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );
        assert_eq!(s.list("a", None, 10, 1).len(), 2);
    }
}
