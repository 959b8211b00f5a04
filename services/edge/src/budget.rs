//! Per-client budget of request-head bytes in flight.
//!
//! HTTP/2 header compression lets a viewer send a 64 KiB head for a few bytes on the
//! wire, so the number of requests alone says little about the memory they take at the
//! edge, in the agent connection's queue and at the agent. Each client address (the
//! viewer as [`crate::proxy`] sees it, after the trusted-proxy rules) may have at most
//! [`MAX_CLIENT_HEAD_BYTES`] of request heads in flight; beyond it its requests get 429
//! `client_overloaded` at once, while other clients are served. The agent connection's
//! own limit (`netbore_mux::MAX_LINK_HEAD_BYTES`) is four times as large, so one client
//! cannot fill it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

/// Bytes of request heads one client address may have in flight on this edge: 64
/// requests with the largest head allowed (64 KiB), or thousands of ordinary ones.
pub const MAX_CLIENT_HEAD_BYTES: usize = 4 * 1024 * 1024;

/// The head bytes each client has in flight.
#[derive(Default)]
pub struct ClientBudget {
    held: Mutex<HashMap<IpAddr, usize>>,
}

impl ClientBudget {
    /// Takes `n` bytes for `client`, or `None` when that would exceed
    /// [`MAX_CLIENT_HEAD_BYTES`]. The bytes return when the guard drops.
    pub fn take(self: &Arc<Self>, client: IpAddr, n: usize) -> Option<HeadGuard> {
        let mut held = self.held.lock();
        let h = held.entry(client).or_default();
        // One head is always allowed, so a single large request is never refused here.
        if *h > 0 && *h + n > MAX_CLIENT_HEAD_BYTES {
            return None;
        }
        *h += n;
        Some(HeadGuard {
            budget: self.clone(),
            client,
            n,
        })
    }

    /// Bytes `client` has in flight.
    pub fn held(&self, client: IpAddr) -> usize {
        self.held.lock().get(&client).copied().unwrap_or(0)
    }
}

/// Head bytes held for one request; released on drop.
pub struct HeadGuard {
    budget: Arc<ClientBudget>,
    client: IpAddr,
    n: usize,
}

impl Drop for HeadGuard {
    fn drop(&mut self) {
        let mut held = self.budget.held.lock();
        if let Some(h) = held.get_mut(&self.client) {
            *h = h.saturating_sub(self.n);
            if *h == 0 {
                held.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_bounded_and_others_are_not_affected() {
        let b = Arc::new(ClientBudget::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let c: IpAddr = "10.0.0.2".parse().unwrap();
        let mut guards = Vec::new();
        while let Some(g) = b.take(a, 64 * 1024) {
            guards.push(g);
            assert!(guards.len() <= 64);
        }
        assert_eq!(guards.len(), 64);
        assert!(b.take(c, 64 * 1024).is_some());
        guards.pop();
        assert!(b.take(a, 64 * 1024).is_some());
        drop(guards);
        assert_eq!(b.held(a), 0);
    }
}
