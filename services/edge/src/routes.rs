//! The edge's table of live tunnels: public name → the agent connections serving it.
//!
//! Read on every viewer request, written when an agent connects or leaves; the lock is
//! never held across an `.await`. A name whose last connection left is remembered for a
//! while as *offline*, so a viewer gets "the agent is not connected" (503) rather than
//! "no such tunnel" (404) while the agent reconnects.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use netbore_mux::Mux;
use parking_lot::{Mutex, RwLock};

/// How long a name stays known as offline after its last agent connection left.
pub const OFFLINE_MEMORY: Duration = Duration::from_secs(3600);

/// Most offline names remembered; the oldest are forgotten first.
pub const MAX_OFFLINE_NAMES: usize = 100_000;

/// One agent connection serving a tunnel.
#[derive(Clone, Debug)]
pub struct Route {
    /// The tunnel.
    pub tunnel_id: String,
    /// Unique per connection on this edge.
    pub conn_id: u64,
    /// The connection.
    pub mux: Mux,
    /// The tunnel's access policy, as this connection's token carried it.
    pub access: std::sync::Arc<crate::access::TunnelAccess>,
    /// The tunnel credential this connection's token was issued for, if any.
    pub credential: Option<String>,
    /// The agent's instance id from its hello (may be empty).
    pub instance_id: String,
    /// The link's session id (as in the welcome): names the link in reports.
    pub session_id: String,
    /// The agent's self-description from its hello (`netbore/0.1.0`).
    pub agent: String,
    /// The agent's address as this edge sees it.
    pub peer: String,
    /// Unix seconds when the link opened.
    pub connected_at: u64,
}

/// Requests and errors are counted per tunnel in buckets of this many seconds.
pub const TRAFFIC_BUCKET_SECS: u64 = 60;
/// Buckets kept: the counts cover the last `TRAFFIC_BUCKETS × TRAFFIC_BUCKET_SECS`
/// seconds (5 minutes).
pub const TRAFFIC_BUCKETS: usize = 5;

/// A tunnel's requests and errors over the last five minutes, as a ring of one-minute
/// buckets keyed by the bucket's number (Unix seconds / 60). Pure: the caller gives
/// the time.
#[derive(Debug, Default, Clone)]
pub struct TrafficWindow {
    buckets: [(u64, u64, u64); TRAFFIC_BUCKETS],
}

impl TrafficWindow {
    /// Counts one request at `now` (Unix seconds), and an error with it when `error`.
    pub fn count(&mut self, now: u64, error: bool) {
        let n = now / TRAFFIC_BUCKET_SECS;
        let b = &mut self.buckets[(n % TRAFFIC_BUCKETS as u64) as usize];
        if b.0 != n {
            *b = (n, 0, 0);
        }
        b.1 += 1;
        b.2 += u64::from(error);
    }

    /// (requests, errors) in the buckets still within the window at `now`.
    pub fn totals(&self, now: u64) -> (u64, u64) {
        let n = now / TRAFFIC_BUCKET_SECS;
        self.buckets
            .iter()
            .filter(|b| b.0 + (TRAFFIC_BUCKETS as u64) > n && b.0 <= n && (b.1 > 0))
            .fold((0, 0), |(r, e), b| (r + b.1, e + b.2))
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Result of looking a name up.
#[derive(Debug)]
pub enum Lookup {
    /// A connection to use, and the tunnel's requests in flight over all connections.
    Found(Route, usize),
    /// The tunnel exists but no agent is connected right now.
    Offline,
    /// No such tunnel on this edge.
    Unknown,
}

/// The route table.
#[derive(Default)]
pub struct Routes {
    live: RwLock<HashMap<String, Vec<Route>>>,
    /// Names whose last connection left: when, and the tunnel that held them.
    offline: Mutex<HashMap<String, (Instant, String)>>,
    /// Woken when a tunnel gains its first connection here, so the link to control
    /// reports it at once (control holds its name from that report on).
    first_link: tokio::sync::Notify,
    /// Payload bytes (in, out) of connections that have left the table, so the
    /// totals [`Routes::load`] reports never go down when an agent disconnects.
    retired: [std::sync::atomic::AtomicU64; 2],
    /// Requests served by this edge's links, per tunnel id, over the last 5 minutes.
    traffic: Mutex<HashMap<String, TrafficWindow>>,
}

impl Routes {
    /// Adds a connection for `name`, unless another tunnel holds the name with a live
    /// connection (then returns that tunnel's id): a link never displaces another
    /// tunnel's, so an old token of a deleted tunnel cannot take back a name given out
    /// again. Closed connections of another tunnel are dropped. The tunnel's other
    /// connections take the new one's access policy (the newest agent's wins).
    pub fn insert(&self, name: &str, route: Route) -> Result<(), String> {
        let first = {
            let mut live = self.live.write();
            let v = live.entry(name.to_string()).or_default();
            v.retain(|r| {
                let keep = r.tunnel_id == route.tunnel_id || !r.mux.is_closed();
                if !keep {
                    self.retire(r);
                }
                keep
            });
            if let Some(other) = v.iter().find(|r| r.tunnel_id != route.tunnel_id) {
                return Err(other.tunnel_id.clone());
            }
            // One policy per tunnel: the newest connection's (the owner changed it).
            for r in v.iter_mut() {
                r.access = route.access.clone();
            }
            let first = v.is_empty();
            v.push(route);
            first
        };
        if first {
            self.first_link.notify_one();
        }
        self.offline.lock().remove(name);
        Ok(())
    }

    /// Adds a connection's bytes to the totals of connections that have left.
    fn retire(&self, r: &Route) {
        use std::sync::atomic::Ordering::Relaxed;
        let (i, o) = r.mux.bytes();
        self.retired[0].fetch_add(i, Relaxed);
        self.retired[1].fetch_add(o, Relaxed);
    }

    /// The tunnel id of a live connection for `name` of another tunnel than `tunnel_id`.
    pub fn live_other_tunnel(&self, name: &str, tunnel_id: &str) -> Option<String> {
        self.live
            .read()
            .get(name)?
            .iter()
            .find(|r| r.tunnel_id != tunnel_id && !r.mux.is_closed())
            .map(|r| r.tunnel_id.clone())
    }

    /// Removes one connection (it closed).
    pub fn remove(&self, name: &str, conn_id: u64) {
        let mut tunnel = None;
        let now_empty = {
            let mut live = self.live.write();
            let Some(v) = live.get_mut(name) else { return };
            v.retain(|r| {
                let keep = r.conn_id != conn_id;
                if !keep {
                    self.retire(r);
                    tunnel = Some(r.tunnel_id.clone());
                }
                keep
            });
            if v.is_empty() {
                live.remove(name);
                true
            } else {
                false
            }
        };
        if now_empty {
            let mut off = self.offline.lock();
            if off.len() >= MAX_OFFLINE_NAMES {
                off.retain(|_, (t, _)| t.elapsed() < OFFLINE_MEMORY);
                if off.len() >= MAX_OFFLINE_NAMES
                    && let Some(oldest) = off
                        .iter()
                        .min_by_key(|(_, (t, _))| *t)
                        .map(|(k, _)| k.clone())
                {
                    off.remove(&oldest);
                }
            }
            off.insert(
                name.to_string(),
                (Instant::now(), tunnel.unwrap_or_default()),
            );
        }
    }

    /// Forgets that `tunnel_id`'s name was served here (the tunnel was deleted), so its
    /// viewers get "no such tunnel" rather than "offline".
    pub fn forget_tunnel(&self, tunnel_id: &str) {
        self.offline.lock().retain(|_, (_, t)| t != tunnel_id);
    }

    /// The least busy usable connection for `name`.
    pub fn pick(&self, name: &str) -> Lookup {
        {
            let live = self.live.read();
            if let Some(v) = live.get(name) {
                let mut total = 0;
                let mut best: Option<(&Route, usize)> = None;
                for r in v
                    .iter()
                    .filter(|r| !r.mux.is_closed() && !r.mux.is_going_away())
                {
                    let n = r.mux.open_streams();
                    total += n;
                    if best.is_none_or(|(_, b)| n < b) {
                        best = Some((r, n));
                    }
                }
                if let Some((r, _)) = best {
                    return Lookup::Found(r.clone(), total);
                }
                return Lookup::Offline;
            }
        }
        match self.offline.lock().get(name) {
            Some((t, _)) if t.elapsed() < OFFLINE_MEMORY => Lookup::Offline,
            _ => Lookup::Unknown,
        }
    }

    /// Usable connections (open, not going away) serving `name`.
    pub fn connections(&self, name: &str) -> usize {
        self.live.read().get(name).map_or(0, |v| {
            v.iter()
                .filter(|r| !r.mux.is_closed() && !r.mux.is_going_away())
                .count()
        })
    }

    /// Number of tunnels with at least one connection, and of connections.
    pub fn counts(&self) -> (usize, usize) {
        let live = self.live.read();
        (live.len(), live.values().map(Vec::len).sum())
    }

    /// Load for reports: tunnels, connections, open streams, and payload bytes in and
    /// out since the edge started (connections that closed included, so they only grow).
    pub fn load(&self) -> (u64, u64, u64, u64, u64) {
        let live = self.live.read();
        use std::sync::atomic::Ordering::Relaxed;
        let (mut conns, mut streams) = (0u64, 0u64);
        // Since the edge started: connections that left, then the open ones.
        let (mut bin, mut bout) = (self.retired[0].load(Relaxed), self.retired[1].load(Relaxed));
        for r in live.values().flatten() {
            conns += 1;
            streams += r.mux.open_streams() as u64;
            let (i, o) = r.mux.bytes();
            bin += i;
            bout += o;
        }
        (live.len() as u64, conns, streams, bin, bout)
    }

    /// Counts a request a local link of `tunnel_id` took, and whether it failed (a
    /// 5xx, a reset, no answer in time).
    pub fn count_request(&self, tunnel_id: &str, error: bool) {
        let now = unix_now();
        let mut t = self.traffic.lock();
        match t.get_mut(tunnel_id) {
            Some(w) => w.count(now, error),
            None => {
                let mut w = TrafficWindow::default();
                w.count(now, error);
                t.insert(tunnel_id.to_string(), w);
            }
        }
    }

    /// (requests, errors) over the last 5 minutes for `tunnel_id`; forgets tunnels
    /// with none (so the table holds only tunnels busy in the last 5 minutes).
    pub fn traffic(&self, tunnel_id: &str) -> (u64, u64) {
        let now = unix_now();
        let mut t = self.traffic.lock();
        let v = t.get(tunnel_id).map_or((0, 0), |w| w.totals(now));
        if v == (0, 0) {
            t.remove(tunnel_id);
        }
        v
    }

    /// Every live connection of the tunnels in `tunnel_ids`.
    pub fn links_of(&self, tunnel_ids: &[String]) -> Vec<Route> {
        let ids: std::collections::HashSet<&str> = tunnel_ids.iter().map(String::as_str).collect();
        self.live
            .read()
            .values()
            .flatten()
            .filter(|r| ids.contains(r.tunnel_id.as_str()) && !r.mux.is_closed())
            .cloned()
            .collect()
    }

    /// Ids of the tunnels with at least one connection here, each once.
    pub fn tunnel_ids(&self) -> Vec<String> {
        let live = self.live.read();
        let mut ids: Vec<String> = live
            .values()
            .flatten()
            .map(|r| r.tunnel_id.clone())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Resolves when a tunnel has gained its first connection here since the last call
    /// (at once if one did meanwhile).
    pub async fn first_link(&self) {
        self.first_link.notified().await;
    }

    /// Memory held for agents: bytes queued now (all connections), the highest peak
    /// of one open connection's queue, and bytes of heads held by open streams.
    pub fn queue_load(&self) -> (u64, u64, u64) {
        let live = self.live.read();
        let (mut now, mut peak, mut heads) = (0u64, 0u64, 0u64);
        for r in live.values().flatten() {
            let (q, p) = r.mux.queued_bytes();
            now += q as u64;
            peak = peak.max(p as u64);
            heads += r.mux.head_bytes() as u64;
        }
        (now, peak, heads)
    }

    /// The connections to advertise in the registry: (name, tunnel id, connection id)
    /// of every open connection not going away.
    pub fn registrations(&self) -> Vec<(String, String, u64)> {
        let live = self.live.read();
        live.iter()
            .flat_map(|(name, v)| {
                v.iter()
                    .filter(|r| !r.mux.is_closed() && !r.mux.is_going_away())
                    .map(move |r| (name.clone(), r.tunnel_id.clone(), r.conn_id))
            })
            .collect()
    }

    fn all(&self) -> Vec<Route> {
        self.live.read().values().flatten().cloned().collect()
    }

    /// Sends go-away on every connection.
    pub fn go_away_all(&self, message: &str) {
        for r in self.all() {
            r.mux.go_away(message);
        }
    }

    /// Closes every connection now.
    pub fn close_all(&self, reason: &str) {
        for r in self.all() {
            r.mux.close(reason);
        }
    }

    /// Instance ids, other than `instance_id`, of agents linked here with tunnel
    /// credential `credential` (each once, sorted).
    pub fn other_instances(&self, credential: &str, instance_id: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .all()
            .into_iter()
            .filter(|r| {
                r.credential.as_deref() == Some(credential)
                    && !r.instance_id.is_empty()
                    && r.instance_id != instance_id
                    && !r.mux.is_closed()
            })
            .map(|r| r.instance_id)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The open connections whose token was issued for tunnel credential `credential`.
    pub fn by_credential(&self, credential: &str) -> Vec<Route> {
        self.all()
            .into_iter()
            .filter(|r| r.credential.as_deref() == Some(credential) && !r.mux.is_closed())
            .collect()
    }

    /// Closes the connections of one tunnel; returns how many.
    pub fn disconnect_tunnel(&self, tunnel_id: &str) -> usize {
        let hit: Vec<Route> = self
            .all()
            .into_iter()
            .filter(|r| r.tunnel_id == tunnel_id)
            .collect();
        for r in &hit {
            r.mux.close("the tunnel was deleted");
        }
        hit.len()
    }
}

#[cfg(test)]
mod traffic_tests {
    use super::*;

    #[test]
    fn the_window_counts_five_minutes_and_forgets_older_ones() {
        let mut w = TrafficWindow::default();
        let t0 = 1_000_000 * TRAFFIC_BUCKET_SECS;
        w.count(t0, false);
        w.count(t0 + 10, true);
        w.count(t0 + 61, false);
        assert_eq!(w.totals(t0 + 61), (3, 1));
        // Four minutes later the first minute is still in; five later it is not.
        assert_eq!(w.totals(t0 + 4 * 60 + 59), (3, 1));
        assert_eq!(w.totals(t0 + 5 * 60), (1, 0));
        assert_eq!(w.totals(t0 + 6 * 60 + 1), (0, 0));
        // A bucket reused after the ring wraps starts from zero.
        w.count(t0 + 5 * 60, true);
        assert_eq!(w.totals(t0 + 5 * 60), (2, 1));
    }
}
