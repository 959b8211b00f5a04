//! Fair shares of a tunnel's request slots between client addresses.
//!
//! A tunnel's agent connections carry a bounded number of concurrent streams (its
//! *slots*: `Limits::max_concurrent_streams` per connection, at most
//! `max_streams_per_tunnel` in all). Without a share, one client that opens thousands
//! of slow requests holds every slot and honest viewers get 503 `tunnel_busy`. Here each
//! client address may hold at most `client_slot_share` percent of the tunnel's slots;
//! beyond it the request is refused with 429 `client_busy` before anything is
//! forwarded, and the other addresses keep the rest.
//!
//! IPv6 clients are counted per /64 (one host usually holds a whole /64, so counting
//! single addresses would give it billions of shares). The table holds an entry only
//! while a request is in flight, so its size is bounded by the requests in flight.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use parking_lot::Mutex;

/// Default share of a tunnel's slots one client address may hold, in percent.
pub const DEFAULT_CLIENT_SLOT_SHARE: u8 = 50;

/// The key a client is counted under: its IPv4 address, or its IPv6 /64.
pub(crate) fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The class a client's requests share in an agent link's send order
/// (`netbore_mux::Mux::open_fair`): one per client key, so an IPv6 /64 is one client
/// there too.
pub fn client_class(ip: IpAddr) -> netbore_mux::fair::Class {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    client_key(ip).hash(&mut h);
    h.finish()
}

/// Most slots one client may hold out of `capacity` with a share of `percent`
/// (at least one, so a tiny tunnel still serves everyone).
pub fn client_cap(capacity: usize, percent: u8) -> usize {
    (capacity * usize::from(percent.min(100)) / 100).max(1)
}

/// Requests in flight per tunnel and client.
#[derive(Default)]
pub struct ClientSlots {
    /// Tunnel name → client key → requests in flight.
    table: Mutex<HashMap<String, HashMap<IpAddr, usize>>>,
}

impl std::fmt::Debug for ClientSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSlots")
            .field("tunnels", &self.table.lock().len())
            .finish()
    }
}

impl ClientSlots {
    /// Takes a slot on tunnel `name` for `client` when it holds fewer than `cap`;
    /// the slot is given back when the guard drops (the request ended).
    pub fn try_take(self: &Arc<Self>, name: &str, client: IpAddr, cap: usize) -> Option<SlotGuard> {
        let key = client_key(client);
        let mut t = self.table.lock();
        let per = t.entry(name.to_string()).or_default();
        let n = per.entry(key).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(SlotGuard {
            slots: self.clone(),
            name: name.to_string(),
            key,
        })
    }

    /// Requests in flight for `client` on tunnel `name`.
    pub fn held(&self, name: &str, client: IpAddr) -> usize {
        self.table
            .lock()
            .get(name)
            .and_then(|m| m.get(&client_key(client)).copied())
            .unwrap_or(0)
    }

    fn give_back(&self, name: &str, key: IpAddr) {
        let mut t = self.table.lock();
        let Some(per) = t.get_mut(name) else { return };
        if let Some(n) = per.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per.remove(&key);
            }
        }
        if per.is_empty() {
            t.remove(name);
        }
    }
}

/// One request's slot; dropping it gives the slot back.
pub struct SlotGuard {
    slots: Arc<ClientSlots>,
    name: String,
    key: IpAddr,
}

impl std::fmt::Debug for SlotGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotGuard")
            .field("tunnel", &self.name)
            .finish()
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.give_back(&self.name, self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_is_capped_and_others_are_not_and_slots_come_back() {
        let s = Arc::new(ClientSlots::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| s.try_take("t", a, 3).unwrap()).collect();
        assert!(s.try_take("t", a, 3).is_none());
        assert!(s.try_take("other", a, 3).is_some());
        let g = s.try_take("t", b, 3).unwrap();
        drop(held);
        assert_eq!(s.held("t", a), 0);
        assert!(s.try_take("t", a, 3).is_some());
        drop(g);
        assert!(
            s.table.lock().get("t").is_none(),
            "empty entries are removed"
        );
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let s = Arc::new(ClientSlots::default());
        let x: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let z: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _g = s.try_take("t", x, 1).unwrap();
        assert!(s.try_take("t", y, 1).is_none());
        assert!(s.try_take("t", z, 1).is_some());
    }

    #[test]
    fn a_64_is_one_class_in_the_send_order() {
        let x: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let z: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_class(x), client_class(y));
        assert_ne!(client_class(x), client_class(z));
        assert_eq!(client_class(v4), client_class(mapped));
    }

    #[test]
    fn the_cap_is_a_share_of_the_capacity_and_never_zero() {
        assert_eq!(client_cap(1024, 50), 512);
        assert_eq!(client_cap(1, 50), 1);
        assert_eq!(client_cap(10, 100), 10);
    }
}
