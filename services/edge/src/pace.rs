//! Pacing of a client that keeps being refused for overload.
//!
//! A 429 (`client_overloaded`, `client_busy`) frees the memory a request held, but not
//! the work: the attacker of issue 12's finding 3 sends its next 56 KiB head (a few
//! bytes on the wire, thanks to HPACK) the moment a refusal arrives, so the edge spends
//! its cores decoding and refusing, and every other viewer's request waits in the same
//! run queues (an honest p99 of 1.9 s against 8 ms). Refusing faster does not help: the
//! attacker only sends faster.
//!
//! Here a refusal for overload also *charges* the client address (IPv4, or IPv6 per
//! /64) with the refused head's bytes (at least [`MIN_CHARGE`]), on a token bucket
//! kept as a theoretical arrival time (GCRA): [`Pacer::rate`] bytes a second, with
//! [`Pacer::burst`] of tolerance. A client in debt beyond the tolerance has **its
//! connections not read** until the debt is paid: its bytes wait in the kernel's socket
//! buffer, where they cost the edge nothing, and TCP flow control slows the sender.
//! A client that is never refused is never paced, however fast it sends (a load test,
//! a busy NAT): only refusals cost.
//!
//! Connections from a trusted proxy (a load balancer) are never paced: one abusive
//! viewer behind it must not stall everyone else's connection.
//!
//! The table holds a client while one of its connections is open or its debt is
//! unpaid; it is bounded by [`MAX_TRACKED`] (when full, new clients are not tracked,
//! and are then not paced: fail open, since pacing is a courtesy to others and the
//! byte limits still hold).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
// Tokio's clock, so paused-clock tests drive the pace.
use tokio::time::{Instant, Sleep};

/// Default bytes of refused request heads a client may be charged per second before
/// its connections are paced: 16 refused 64 KiB heads, or about a thousand refused
/// ordinary requests.
pub const DEFAULT_RATE: u64 = 1024 * 1024;

/// Default tolerance: a client may run this far ahead of [`DEFAULT_RATE`] (in bytes
/// refused) before it is paced; a brief spike that meets a few 429s is not slowed.
pub const DEFAULT_BURST: u64 = 4 * 1024 * 1024;

/// Least a refusal costs, whatever the head's size: a refused request costs the edge
/// work even when its head is tiny.
pub const MIN_CHARGE: u64 = 1024;

/// Most clients tracked at once.
pub const MAX_TRACKED: usize = 100_000;

/// One client's account: its theoretical arrival time, in nanoseconds since the
/// pacer's start. Debt is how far it lies in the future.
#[derive(Debug, Default)]
pub struct Account {
    tat: AtomicU64,
}

/// The accounts of all clients, and the rate they are paced at.
pub struct Pacer {
    /// Bytes a second (0: pacing off).
    rate: u64,
    /// Tolerance in nanoseconds of debt.
    burst_ns: u64,
    start: Instant,
    accounts: Mutex<HashMap<IpAddr, Arc<Account>>>,
}

impl Pacer {
    /// A pacer at `rate` bytes a second with `burst` bytes of tolerance (rate 0: off).
    pub fn new(rate: u64, burst: u64) -> Pacer {
        let burst_ns = if rate == 0 {
            0
        } else {
            (u128::from(burst) * 1_000_000_000 / u128::from(rate)).min(u128::from(u64::MAX)) as u64
        };
        Pacer {
            rate,
            burst_ns,
            start: Instant::now(),
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// Bytes a second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Tolerance in bytes.
    pub fn burst(&self) -> u64 {
        (u128::from(self.burst_ns) * u128::from(self.rate) / 1_000_000_000) as u64
    }

    fn now_ns(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.start)
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64
    }

    /// The account of the client at `ip` (its key: IPv4, or IPv6 /64), for one of its
    /// connections; `None` when pacing is off or the table is full.
    pub fn account(&self, ip: IpAddr) -> Option<Arc<Account>> {
        if self.rate == 0 {
            return None;
        }
        let key = crate::fair::client_key(ip);
        let mut accounts = self.accounts.lock();
        if let Some(a) = accounts.get(&key) {
            return Some(a.clone());
        }
        if accounts.len() >= MAX_TRACKED {
            // Drop what nobody holds and nobody owes; if still full, don't track.
            let now = self.now_ns();
            accounts.retain(|_, a| Arc::strong_count(a) > 1 || a.tat.load(Ordering::Relaxed) > now);
            if accounts.len() >= MAX_TRACKED {
                return None;
            }
        }
        let a = Arc::new(Account::default());
        accounts.insert(key, a.clone());
        Some(a)
    }

    /// Lets go of a connection's account: forgotten once no connection holds it and
    /// its debt is paid (a client cannot clear its debt by reconnecting).
    pub fn release(&self, ip: IpAddr, account: Arc<Account>) {
        self.release_at(ip, account, self.now_ns());
    }

    fn release_at(&self, ip: IpAddr, account: Arc<Account>, now_ns: u64) {
        let key = crate::fair::client_key(ip);
        let mut accounts = self.accounts.lock();
        drop(account);
        if let Some(a) = accounts.get(&key)
            && Arc::strong_count(a) == 1
            && a.tat.load(Ordering::Relaxed) <= now_ns
        {
            accounts.remove(&key);
        }
    }

    /// Clients tracked now.
    pub fn tracked(&self) -> usize {
        self.accounts.lock().len()
    }

    /// Charges `account` for a refused request whose head took `head_bytes`.
    pub fn charge(&self, account: &Account, head_bytes: u64) {
        self.charge_at(account, head_bytes, self.now_ns());
    }

    /// [`Pacer::charge`] at `now` (nanoseconds since the pacer's start).
    fn charge_at(&self, account: &Account, head_bytes: u64, now: u64) {
        if self.rate == 0 {
            return;
        }
        let cost = head_bytes.max(MIN_CHARGE);
        // Rounded up: a refusal never costs less than its bytes.
        let cost_ns = (u128::from(cost) * 1_000_000_000)
            .div_ceil(u128::from(self.rate))
            .min(u128::from(u64::MAX)) as u64;
        let _ = account
            .tat
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                Some(tat.max(now).saturating_add(cost_ns))
            });
    }

    /// When `account`'s connections may be read again, if they must wait now.
    pub fn resume_at(&self, account: &Account) -> Option<Instant> {
        self.resume_at_ns(account, self.now_ns())
            .map(|at| self.start + Duration::from_nanos(at))
    }

    /// [`Pacer::resume_at`] in nanoseconds since the pacer's start, at `now`.
    fn resume_at_ns(&self, account: &Account, now: u64) -> Option<u64> {
        let allowed = account
            .tat
            .load(Ordering::Relaxed)
            .saturating_sub(self.burst_ns);
        (allowed > now).then_some(allowed)
    }
}

/// The bytes a request's head is charged for: its target and every field, with the
/// 32 bytes per field RFC 9113 counts (what HPACK decoded for it).
pub fn head_cost<B>(req: &http::Request<B>) -> u64 {
    let fields: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum();
    let uri = req.uri();
    let target = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    (fields + target + req.method().as_str().len()) as u64
}

/// Set on a response refused for overload (429 `client_overloaded` / `client_busy`):
/// the refused head's [`head_cost`], which the connection charges its client.
#[derive(Debug, Clone, Copy)]
pub struct Refused(pub u64);

/// A connection's account, held for as long as the connection is open.
pub struct Held {
    pacer: Arc<Pacer>,
    ip: IpAddr,
    account: Option<Arc<Account>>,
}

impl Held {
    /// The account of a connection from `ip` (`None` inside: not paced).
    pub fn new(pacer: &Arc<Pacer>, ip: IpAddr, paced: bool) -> Held {
        Held {
            pacer: pacer.clone(),
            ip,
            account: if paced { pacer.account(ip) } else { None },
        }
    }

    /// Charges the connection's client for one refused head.
    pub fn charge(&self, head_bytes: u64) {
        if let Some(a) = &self.account {
            self.pacer.charge(a, head_bytes);
        }
    }

    fn resume_at(&self) -> Option<Instant> {
        self.account.as_ref().and_then(|a| self.pacer.resume_at(a))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(a) = self.account.take() {
            self.pacer.release(self.ip, a);
        }
    }
}

/// A connection whose reads wait while its client is in debt (see the module docs).
/// Writes are never held: responses already owed still go out.
pub struct Paced<S> {
    inner: S,
    held: Arc<Held>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Counts the reads held.
    held_reads: Counter,
}

impl<S> Paced<S> {
    /// `inner`, paced by `held`; every read held counts in `held_reads`.
    pub fn new(inner: S, held: Arc<Held>, held_reads: Counter) -> Paced<S> {
        Paced {
            inner,
            held,
            sleep: None,
            held_reads,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Paced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(s) = self.sleep.as_mut() {
                if s.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            match self.held.resume_at() {
                Some(at) => {
                    self.held_reads.inc();
                    self.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
                }
                None => return Pin::new(&mut self.inner).poll_read(cx, buf),
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Paced<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const SEC: u64 = 1_000_000_000;
    const MIB: u64 = 1 << 20;

    fn account(pacer: &Pacer, ip: &str) -> Arc<Account> {
        pacer.account(ip.parse().unwrap()).expect("tracked")
    }

    #[test]
    fn a_client_in_debt_waits_until_it_is_paid() {
        // 1 MiB/s with 1 MiB of tolerance; the clock is given, not read.
        let pacer = Pacer::new(MIB, MIB);
        let a = account(&pacer, "10.0.0.1");
        // Within the tolerance: not paced.
        pacer.charge_at(&a, MIB, 0);
        assert_eq!(pacer.resume_at_ns(&a, 0), None);
        // 2 MiB more: 2 s of debt beyond the tolerance.
        pacer.charge_at(&a, 2 * MIB, 0);
        assert_eq!(pacer.resume_at_ns(&a, 0), Some(2 * SEC));
        assert_eq!(pacer.resume_at_ns(&a, 2 * SEC - 1), Some(2 * SEC));
        assert_eq!(pacer.resume_at_ns(&a, 2 * SEC), None);
        // Paid back over time: after 10 idle seconds a new charge starts from now.
        pacer.charge_at(&a, MIB, 10 * SEC);
        assert_eq!(pacer.resume_at_ns(&a, 10 * SEC), None);
    }

    #[test]
    fn other_clients_and_unrefused_clients_are_never_paced() {
        let pacer = Arc::new(Pacer::new(MIB, MIB));
        let bad = account(&pacer, "10.0.0.1");
        let good = account(&pacer, "10.0.0.2");
        for _ in 0..100 {
            pacer.charge_at(&bad, 64 * 1024, 0);
        }
        assert!(pacer.resume_at_ns(&bad, 0).is_some());
        assert_eq!(pacer.resume_at_ns(&good, 0), None);
        // A trusted proxy's connection holds no account, so charging it does nothing.
        let behind_proxy = Held::new(&pacer, "10.0.0.3".parse().unwrap(), false);
        behind_proxy.charge(u64::MAX);
        assert_eq!(behind_proxy.resume_at(), None);
        // Tiny refusals still cost MIN_CHARGE each: 2,048 of them are 2 MiB.
        let tiny = account(&pacer, "10.0.0.4");
        for _ in 0..2048 {
            pacer.charge_at(&tiny, 10, 0);
        }
        let at = pacer.resume_at_ns(&tiny, 0).unwrap();
        assert!((SEC..SEC + 1_000_000).contains(&at), "{at}");
        // One IPv6 /64 is one client.
        let v6a = account(&pacer, "2001:db8::1");
        let v6b = account(&pacer, "2001:db8::2");
        assert!(Arc::ptr_eq(&v6a, &v6b));
    }

    #[test]
    fn reconnecting_does_not_clear_a_debt_and_a_paid_client_is_forgotten() {
        let pacer = Arc::new(Pacer::new(MIB, 0));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = pacer.account(ip).unwrap();
        pacer.charge_at(&a, MIB, 0);
        pacer.release_at(ip, a, 0);
        assert_eq!(pacer.tracked(), 1, "kept while it owes");
        let again = pacer.account(ip).unwrap();
        assert!(
            pacer.resume_at_ns(&again, 0).is_some(),
            "the debt survives a reconnect"
        );
        pacer.release_at(ip, again, 2 * SEC);
        assert_eq!(pacer.tracked(), 0, "paid and unheld: forgotten");
    }

    #[test]
    fn pacing_off_tracks_nothing() {
        let pacer = Arc::new(Pacer::new(0, DEFAULT_BURST));
        let held = Held::new(&pacer, "10.0.0.1".parse().unwrap(), true);
        held.charge(u64::MAX);
        assert_eq!(held.resume_at(), None);
        assert_eq!(pacer.tracked(), 0);
    }

    #[tokio::test]
    async fn a_paced_connection_is_read_only_once_its_client_has_paid() {
        // 1 MiB/s, no tolerance: 50 KiB of refusals is ~49 ms of debt.
        let pacer = Arc::new(Pacer::new(MIB, 0));
        let held = Arc::new(Held::new(&pacer, "10.0.0.1".parse().unwrap(), true));
        held.charge(50 * 1024);
        assert!(held.resume_at().is_some());
        let (mut client, server) = tokio::io::duplex(64);
        let counted = Counter::default();
        let mut paced = Paced::new(server, held.clone(), counted.clone());
        tokio::io::AsyncWriteExt::write_all(&mut client, b"x")
            .await
            .unwrap();
        let t = std::time::Instant::now();
        let mut b = [0u8; 1];
        paced.read_exact(&mut b).await.unwrap();
        // A lower bound only: the byte was there all along, and the read waited.
        assert!(
            t.elapsed() >= Duration::from_millis(45),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(held.resume_at(), None);
        assert_eq!(counted.get(), 1);
        // Unpaced now: the next byte is read at once.
        tokio::io::AsyncWriteExt::write_all(&mut client, b"y")
            .await
            .unwrap();
        paced.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"y");
        assert_eq!(counted.get(), 1);
    }
}
