//! The per-address limit on anonymous tunnel creation.
//!
//! A creation without a credential (no management token, no recreate token) costs a
//! stranger nothing and holds a name, so each client address gets a token bucket: a
//! burst of [`DEFAULT_ANONYMOUS_CREATE_BURST`] creations, refilled at
//! [`DEFAULT_ANONYMOUS_CREATE_PER_MINUTE`] a minute. Past it control answers 429
//! `rate_limited` (gRPC `RESOURCE_EXHAUSTED`) with the seconds to wait. Creations with a
//! management or recreate token are never counted: a running agent refreshing its token
//! and an operator's scripts are unaffected. `--require-token` turns anonymous creation
//! off altogether.
//!
//! The client is the TCP peer, unless the peer is a trusted proxy (`--trusted-proxies`):
//! then it is the rightmost `X-Forwarded-For` address that is not itself trusted, as the
//! edge decides. IPv6 clients are counted per /64. Memory is bounded: at most
//! [`MAX_TRACKED_ADDRESSES`] buckets; when full, buckets that have refilled (the same as
//! no bucket) are dropped, and if none has, new addresses are refused until some do.
//!
//! Each control replica counts on its own: with N replicas behind a load balancer an
//! address may get up to N bursts.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use netbore_tokens::access::Cidr;
use parking_lot::Mutex;

/// Default anonymous creations one address may make at once before it must wait.
pub const DEFAULT_ANONYMOUS_CREATE_BURST: u32 = 20;
/// Default anonymous creations one address regains per minute.
pub const DEFAULT_ANONYMOUS_CREATE_PER_MINUTE: u32 = 6;
/// Most client addresses tracked at once (about 64 bytes each).
pub const MAX_TRACKED_ADDRESSES: usize = 100_000;
/// Header and metadata naming the client when the peer is a trusted proxy.
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// Why an anonymous creation may not go ahead now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// This address used its burst; one more is allowed after this long.
    Wait(Duration),
    /// Too many addresses are tracked; retry after this long.
    Crowded(Duration),
}

impl Refused {
    /// Seconds to put in `Retry-After` (at least one).
    pub fn retry_after_secs(self) -> u64 {
        let (Refused::Wait(d) | Refused::Crowded(d)) = self;
        d.as_secs_f64().ceil().max(1.0) as u64
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per client address.
#[derive(Debug)]
pub struct CreateLimiter {
    burst: f64,
    per_sec: f64,
    max_tracked: usize,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl CreateLimiter {
    /// A limiter with `burst` and `per_minute`; `None` when `per_minute` is 0 (no limit).
    pub fn new(burst: u32, per_minute: u32) -> Option<CreateLimiter> {
        CreateLimiter::with_capacity(burst, per_minute, MAX_TRACKED_ADDRESSES)
    }

    /// Like [`CreateLimiter::new`] with another bound on tracked addresses (tests).
    pub fn with_capacity(burst: u32, per_minute: u32, max_tracked: usize) -> Option<CreateLimiter> {
        (per_minute > 0).then(|| CreateLimiter {
            burst: f64::from(burst.max(1)),
            per_sec: f64::from(per_minute) / 60.0,
            max_tracked: max_tracked.max(1),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one creation for `client` at `now`.
    pub fn take(&self, client: IpAddr, now: Instant) -> Result<(), Refused> {
        let key = client_key(client);
        let mut b = self.buckets.lock();
        if !b.contains_key(&key) && b.len() >= self.max_tracked {
            // Buckets that have refilled hold nothing worth keeping.
            b.retain(|_, v| self.level(v, now) < self.burst);
            if b.len() >= self.max_tracked {
                let soonest = b
                    .values()
                    .map(|v| self.full_in(v, now))
                    .min()
                    .unwrap_or(Duration::from_secs(1));
                return Err(Refused::Crowded(soonest));
            }
        }
        let bucket = b.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let level = self.level(bucket, now);
        if level < 1.0 {
            return Err(Refused::Wait(Duration::from_secs_f64(
                (1.0 - level) / self.per_sec,
            )));
        }
        *bucket = Bucket {
            tokens: level - 1.0,
            at: now,
        };
        Ok(())
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().len()
    }

    fn level(&self, b: &Bucket, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        (b.tokens + dt * self.per_sec).min(self.burst)
    }

    fn full_in(&self, b: &Bucket, now: Instant) -> Duration {
        Duration::from_secs_f64((self.burst - self.level(b, now)).max(0.0) / self.per_sec)
    }
}

/// The key a client is counted under: its IPv4 address, or its IPv6 /64.
fn client_key(ip: IpAddr) -> IpAddr {
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

/// The client a request comes from: the TCP `peer`, or, when the peer is one of
/// `trusted`, the rightmost address of the `X-Forwarded-For` values that is not trusted.
pub fn client_address<'a>(
    peer: IpAddr,
    forwarded_for: impl Iterator<Item = &'a str>,
    trusted: &[Cidr],
) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let chain: Vec<IpAddr> = forwarded_for
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    chain
        .into_iter()
        .rev()
        .find(|ip| !is_trusted(*ip))
        .unwrap_or(peer)
}

/// [`client_address`] for a peer socket address, when there is one.
pub fn client_of<'a>(
    peer: Option<SocketAddr>,
    forwarded_for: impl Iterator<Item = &'a str>,
    trusted: &[Cidr],
) -> Option<IpAddr> {
    peer.map(|p| client_address(p.ip(), forwarded_for, trusted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_then_the_refill_rate() {
        let l = CreateLimiter::new(3, 60).unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.take(ip("192.0.2.1"), t0), Ok(()));
        }
        let Err(Refused::Wait(d)) = l.take(ip("192.0.2.1"), t0) else {
            panic!("the fourth is refused")
        };
        assert!(d <= Duration::from_secs(1), "{d:?}");
        assert_eq!(
            l.take(ip("192.0.2.2"), t0),
            Ok(()),
            "another address is not"
        );
        assert_eq!(l.take(ip("192.0.2.1"), t0 + Duration::from_secs(1)), Ok(()));
        assert!(
            l.take(ip("192.0.2.1"), t0 + Duration::from_secs(1))
                .is_err()
        );
    }

    #[test]
    fn ipv6_counts_per_64() {
        let l = CreateLimiter::new(1, 1).unwrap();
        let t0 = Instant::now();
        assert!(l.take(ip("2001:db8::1"), t0).is_ok());
        assert!(l.take(ip("2001:db8::2"), t0).is_err());
        assert!(l.take(ip("2001:db8:0:1::1"), t0).is_ok());
    }

    #[test]
    fn memory_is_bounded_and_refilled_buckets_make_room() {
        let l = CreateLimiter::with_capacity(1, 60, 2).unwrap();
        let t0 = Instant::now();
        assert!(l.take(ip("192.0.2.1"), t0).is_ok());
        assert!(l.take(ip("192.0.2.2"), t0).is_ok());
        assert!(matches!(
            l.take(ip("192.0.2.3"), t0),
            Err(Refused::Crowded(_))
        ));
        assert_eq!(l.tracked(), 2);
        let later = t0 + Duration::from_secs(2);
        assert!(l.take(ip("192.0.2.3"), later).is_ok());
        assert!(l.tracked() <= 2);
    }

    #[test]
    fn forwarded_for_counts_only_from_a_trusted_proxy() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = ["198.51.100.7, 10.1.2.3"];
        assert_eq!(
            client_address(ip("10.0.0.1"), xff.iter().copied(), &trusted),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_address(ip("203.0.113.9"), xff.iter().copied(), &trusted),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn zero_per_minute_means_no_limit() {
        assert!(CreateLimiter::new(20, 0).is_none());
    }
}
