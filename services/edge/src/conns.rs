//! Connection limits that hold from the moment of accept: how many connections one
//! address may keep open, and how long a connection may sit without a request.
//!
//! hyper's header timeout starts only at a request's first byte, and HTTP/2 has none,
//! so a socket that sends nothing (or half an HTTP/2 preface) was kept for ever. Here
//! every viewer connection carries an [`Activity`]: requests in flight, and since when
//! it has had none. A watchdog closes it once it has had no request in flight for the
//! idle timeout, counted from accept: a connection must deliver a complete request
//! (head, or HTTP/2 preface, SETTINGS and HEADERS) within that time, and a keep-alive
//! connection is closed after that long between requests.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Time a connection closed for idleness gets to finish politely (HTTP/2 GOAWAY, a
/// request that raced the close) before it is dropped.
pub const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Open connections per peer address, with a cap (0: none).
pub struct PerAddress {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    /// A counter allowing `max` connections per address (0: no limit).
    pub fn new(max: usize) -> PerAddress {
        PerAddress {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a new connection from `ip`, or `None` when `ip` is at the cap. The slot
    /// frees when the guard drops.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnSlot> {
        let mut open = self.open.lock();
        let n = open.entry(ip).or_default();
        if self.max > 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            owner: self.clone(),
            ip,
        })
    }

    /// Connections open from `ip`.
    pub fn open(&self, ip: IpAddr) -> usize {
        self.open.lock().get(&ip).copied().unwrap_or(0)
    }
}

/// One counted connection.
pub struct ConnSlot {
    owner: Arc<PerAddress>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Requests in flight on one connection, for its idle watchdog.
#[derive(Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    changed: Notify,
}

impl Activity {
    /// Marks a request in flight until the guard drops (when its response has been
    /// written, or abandoned).
    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
        ActivityGuard(self.clone())
    }

    /// Resolves once the connection has had no request in flight for `idle` in a row
    /// (counted from the call, i.e. from accept).
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            if tokio::time::timeout(idle, changed).await.is_err()
                && self.in_flight.load(Ordering::Acquire) == 0
            {
                return;
            }
        }
    }

    /// True while a request is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }
}

/// A request in flight on a connection.
pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_counts_open_connections_per_address() {
        let p = Arc::new(PerAddress::new(2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = p.admit(a).unwrap();
        let _s2 = p.admit(a).unwrap();
        assert!(p.admit(a).is_none());
        assert!(p.admit(b).is_some());
        drop(s1);
        assert!(p.admit(a).is_some());
        let none = Arc::new(PerAddress::new(0));
        let all: Vec<_> = (0..1000).map(|_| none.admit(a).unwrap()).collect();
        assert_eq!(none.open(a), 1000);
        drop(all);
        assert_eq!(none.open(a), 0);
    }

    #[tokio::test]
    async fn idle_counts_only_time_without_requests() {
        let a = Arc::new(Activity::default());
        let idle = Duration::from_millis(100);
        let t0 = std::time::Instant::now();
        let g = a.begin();
        let a2 = a.clone();
        let w = tokio::spawn(async move { a2.idle_for(idle).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!w.is_finished(), "a request in flight is not idle");
        drop(g);
        w.await.unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(400));
    }
}
