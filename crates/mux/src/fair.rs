//! A fair order for the request heads one link carries, between clients.
//!
//! The edge sends request heads to the agent in the order streams are opened, and the
//! agent works through them in that order. A client that keeps megabytes of large heads
//! in flight (HTTP/2 header compression makes a 56 KiB head out of a few bytes) puts all
//! of them in front of everyone else's next request: during issue 12's header flood an
//! honest GET waited behind up to 4 MiB of the attacker's heads (p99 1.3 s against 14 ms).
//!
//! Stream ids must reach the agent in increasing order, so heads cannot be reordered
//! once they have ids. Instead a stream is *admitted* before it is opened:
//!
//! - Heads sent and not yet answered (no response head yet) are *in the pipe*. The pipe
//!   holds at most [`PIPE_HEAD_BYTES`] (one head always fits, whatever its size).
//! - A client (a *class*: the edge uses the client address, IPv6 per /64) that has
//!   nothing in the pipe and nothing waiting is admitted at once: an honest client
//!   that sends one request at a time never waits behind anybody's queue.
//! - Otherwise its head waits in its class's queue, and when the pipe has room the
//!   queues are served by deficit round robin over bytes ([`QUANTUM`] per turn), so
//!   every waiting client gets the same bytes per round however many heads it queued.
//! - A head unanswered after [`PIPE_HOLD`] stops counting (a long poll that the origin
//!   holds open is no longer "in the pipe"), so slow requests cannot stall the link.
//!
//! [`FairOpen`] is the state machine alone: no I/O, no clock of its own (every call
//! that needs the time is given it). [`crate::Mux::open_fair`] drives it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

// Tokio's instant, so a paused test clock drives the gate too.
use tokio::time::Instant;

/// Bytes of unanswered request heads one link carries before new heads wait their
/// turn: hundreds of ordinary heads (a few hundred bytes each), or four of the largest
/// (64 KiB). What an honest head can find in front of it on the link.
pub const PIPE_HEAD_BYTES: usize = 256 * 1024;

/// A head unanswered for this long stops counting against [`PIPE_HEAD_BYTES`]: by
/// then the agent has it and the origin is taking its time (a long poll).
pub const PIPE_HOLD: Duration = Duration::from_millis(500);

/// Bytes a waiting class may send per round of the deficit round robin. Smaller than
/// a large head (which then takes a few rounds), larger than ordinary ones (several
/// per round).
pub const QUANTUM: usize = 8 * 1024;

/// Identifies one request in [`FairOpen`], from its arrival until it is answered.
pub type Ticket = u64;

/// Who a request is from; requests of one class share one queue and one turn.
pub type Class = u64;

#[derive(Debug)]
struct Piped {
    class: Class,
    cost: usize,
}

#[derive(Debug, Default)]
struct ClassState {
    /// Tickets waiting to be admitted, with their cost in bytes: tickets are issued in
    /// increasing order, so the first key is the oldest.
    waiting: BTreeMap<Ticket, usize>,
    /// Bytes this class may still send in its current turn.
    deficit: usize,
    /// Heads of this class in the pipe.
    piped: usize,
}

/// Admission of request heads onto one link: see the module docs.
#[derive(Debug)]
pub struct FairOpen {
    budget: usize,
    hold: Duration,
    quantum: usize,
    next_ticket: Ticket,
    in_pipe: usize,
    pipe: HashMap<Ticket, Piped>,
    /// Admission times, oldest first (entries already answered are skipped).
    aging: VecDeque<(Instant, Ticket)>,
    classes: HashMap<Class, ClassState>,
    /// The class each waiting ticket waits in.
    waiting_in: HashMap<Ticket, Class>,
    /// Classes with waiting tickets, in round-robin order; the front one has the turn.
    ring: VecDeque<Class>,
    /// The front class already got its quantum for this turn.
    front_charged: bool,
}

impl Default for FairOpen {
    fn default() -> Self {
        FairOpen::new(PIPE_HEAD_BYTES, PIPE_HOLD, QUANTUM)
    }
}

impl FairOpen {
    /// A state machine with a pipe of `budget` bytes, heads counted for at most `hold`,
    /// and `quantum` bytes per class per round.
    pub fn new(budget: usize, hold: Duration, quantum: usize) -> Self {
        FairOpen {
            budget,
            hold,
            quantum: quantum.max(1),
            next_ticket: 1,
            in_pipe: 0,
            pipe: HashMap::new(),
            aging: VecDeque::new(),
            classes: HashMap::new(),
            waiting_in: HashMap::new(),
            ring: VecDeque::new(),
            front_charged: false,
        }
    }

    /// A head of `cost` bytes from `class` arrives. Returns its ticket and every ticket
    /// admitted by this call (its own among them when it may go at once).
    pub fn arrive(&mut self, class: Class, cost: usize, now: Instant) -> (Ticket, Vec<Ticket>) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let mut admitted = self.expire(now);
        let c = self.classes.entry(class).or_default();
        let alone = c.waiting.is_empty() && c.piped == 0;
        let fits = self.ring.is_empty() && self.in_pipe + cost <= self.budget;
        if alone || fits || self.in_pipe == 0 && self.ring.is_empty() {
            self.admit(ticket, class, cost, now);
            admitted.push(ticket);
        } else {
            let c = self.classes.entry(class).or_default();
            c.waiting.insert(ticket, cost);
            self.waiting_in.insert(ticket, class);
            if c.waiting.len() == 1 {
                self.ring.push_back(class);
            }
            admitted.extend(self.grant(now));
        }
        (ticket, admitted)
    }

    /// The response head of `ticket` arrived, or its stream ended: its bytes leave the
    /// pipe. Returns the tickets this admits.
    pub fn answered(&mut self, ticket: Ticket, now: Instant) -> Vec<Ticket> {
        self.unpipe(ticket);
        self.grant(now)
    }

    /// `ticket` is given up (its request went away while waiting, or after it was
    /// admitted and before its head was sent). Returns the tickets this admits.
    pub fn cancel(&mut self, ticket: Ticket, now: Instant) -> Vec<Ticket> {
        if let Some(class) = self.waiting_in.remove(&ticket) {
            if let Some(c) = self.classes.get_mut(&class) {
                c.waiting.remove(&ticket);
            }
            let empty = self
                .classes
                .get(&class)
                .is_some_and(|c| c.waiting.is_empty());
            if empty {
                if self.ring.front() == Some(&class) {
                    self.front_charged = false;
                }
                self.ring.retain(|c| *c != class);
                if let Some(c) = self.classes.get_mut(&class) {
                    c.deficit = 0;
                }
                self.forget_if_idle(class);
            }
        } else {
            self.unpipe(ticket);
        }
        self.grant(now)
    }

    /// Heads admitted longer than the hold ago stop counting. Returns the tickets
    /// this admits.
    pub fn expire(&mut self, now: Instant) -> Vec<Ticket> {
        let mut aged = false;
        while let Some(&(since, ticket)) = self.aging.front() {
            if now.saturating_duration_since(since) < self.hold {
                break;
            }
            self.aging.pop_front();
            aged |= self.unpipe(ticket);
        }
        if aged { self.grant(now) } else { Vec::new() }
    }

    /// When [`FairOpen::expire`] should be called next: the oldest head in the pipe
    /// ages out then (`None` while the pipe is empty).
    pub fn next_expiry(&mut self) -> Option<Instant> {
        // Heads answered already are dropped from the front on the way.
        while let Some((since, t)) = self.aging.front() {
            if self.pipe.contains_key(t) {
                return Some(*since + self.hold);
            }
            self.aging.pop_front();
        }
        None
    }

    /// Bytes of heads in the pipe.
    pub fn in_pipe(&self) -> usize {
        self.in_pipe
    }

    /// Tickets waiting to be admitted.
    pub fn waiting(&self) -> usize {
        self.classes.values().map(|c| c.waiting.len()).sum()
    }

    /// Serves the waiting classes in deficit round robin while the pipe has room.
    fn grant(&mut self, now: Instant) -> Vec<Ticket> {
        let mut out = Vec::new();
        while let Some(&class) = self.ring.front() {
            let quantum = self.quantum;
            let Some(c) = self.classes.get_mut(&class) else {
                self.ring.pop_front();
                self.front_charged = false;
                continue;
            };
            let Some((&ticket, &cost)) = c.waiting.first_key_value() else {
                c.deficit = 0;
                self.ring.pop_front();
                self.front_charged = false;
                self.forget_if_idle(class);
                continue;
            };
            if !self.front_charged {
                c.deficit += quantum;
                self.front_charged = true;
            }
            if cost > c.deficit {
                // Its turn is over; it keeps its deficit for the next one.
                self.ring.rotate_left(1);
                self.front_charged = false;
                continue;
            }
            if self.in_pipe > 0 && self.in_pipe + cost > self.budget {
                break; // no room: the turn waits for an answer
            }
            c.waiting.pop_first();
            self.waiting_in.remove(&ticket);
            c.deficit -= cost;
            self.admit(ticket, class, cost, now);
            out.push(ticket);
        }
        out
    }

    fn admit(&mut self, ticket: Ticket, class: Class, cost: usize, now: Instant) {
        self.in_pipe += cost;
        self.pipe.insert(ticket, Piped { class, cost });
        self.aging.push_back((now, ticket));
        self.classes.entry(class).or_default().piped += 1;
    }

    /// Takes `ticket` out of the pipe; false when it was not there.
    fn unpipe(&mut self, ticket: Ticket) -> bool {
        let Some(p) = self.pipe.remove(&ticket) else {
            return false;
        };
        self.in_pipe -= p.cost;
        if let Some(c) = self.classes.get_mut(&p.class) {
            c.piped -= 1;
        }
        self.forget_if_idle(p.class);
        if self.pipe.is_empty() {
            self.aging.clear();
        }
        true
    }

    /// Drops the state of a class that holds nothing, so the table only grows with
    /// requests in flight.
    fn forget_if_idle(&mut self, class: Class) {
        if self
            .classes
            .get(&class)
            .is_some_and(|c| c.piped == 0 && c.waiting.is_empty())
            && !self.ring.contains(&class)
        {
            self.classes.remove(&class);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: usize = 1024;

    fn machine() -> (FairOpen, Instant) {
        (FairOpen::new(256 * KIB, PIPE_HOLD, QUANTUM), Instant::now())
    }

    /// The attacker (class 1) fills the pipe and queues many more large heads.
    fn flooded(f: &mut FairOpen, t0: Instant) -> (Vec<Ticket>, Vec<Ticket>) {
        let mut admitted = Vec::new();
        let mut waiting = Vec::new();
        for _ in 0..64 {
            let (t, now) = f.arrive(1, 56 * KIB, t0);
            if now.contains(&t) {
                admitted.push(t);
            } else {
                waiting.push(t);
            }
        }
        (admitted, waiting)
    }

    #[test]
    fn the_pipe_is_bounded_and_answers_let_the_next_ones_in() {
        let (mut f, t0) = machine();
        let (admitted, waiting) = flooded(&mut f, t0);
        // 256 KiB holds four heads of 56 KiB (the first always goes).
        assert_eq!(admitted.len(), 4);
        assert_eq!(waiting.len(), 60);
        assert!(f.in_pipe() <= 256 * KIB);
        let next = f.answered(admitted[0], t0);
        assert_eq!(
            next,
            vec![waiting[0]],
            "one answer makes room for one head, in order"
        );
        assert_eq!(f.waiting(), 59);
    }

    #[test]
    fn a_client_with_nothing_in_flight_goes_at_once_during_a_flood() {
        let (mut f, t0) = machine();
        flooded(&mut f, t0);
        let (t, now) = f.arrive(2, 300, t0);
        assert_eq!(now, vec![t]);
    }

    #[test]
    fn waiting_clients_share_the_room_by_bytes_not_by_requests() {
        let (mut f, t0) = machine();
        let (admitted, _) = flooded(&mut f, t0);
        // Client 2 already has a request in the pipe, then queues ten small ones.
        let (first, _) = f.arrive(2, 400, t0);
        let small: Vec<Ticket> = (0..10).map(|_| f.arrive(2, 400, t0).0).collect();
        assert_eq!(f.waiting(), 60 + 10);
        // One answer frees 56 KiB: the small client's ten heads (4 KiB) go before the
        // attacker's 60 queued heads get a second one in, though they queued later.
        let mut order = Vec::new();
        order.extend(f.answered(admitted[0], t0));
        order.extend(f.answered(admitted[1], t0));
        let small_done = small.iter().all(|t| order.contains(t));
        assert!(
            small_done,
            "every small head admitted within two answers: {order:?}"
        );
        let attacker_in = order.iter().filter(|t| !small.contains(t)).count();
        assert!(
            attacker_in <= 2,
            "the attacker got {attacker_in} heads in meanwhile"
        );
        let _ = first;
    }

    #[test]
    fn deficit_round_robin_gives_equal_bytes_per_round() {
        // An empty pipe of one byte: every admission waits for the previous answer.
        let mut f = FairOpen::new(1, Duration::from_secs(3600), 1000);
        let t0 = Instant::now();
        let (blocker, _) = f.arrive(9, 1, t0);
        // Each class's first head goes at once (it had nothing in the pipe).
        let (b0, now) = f.arrive(1, 2000, t0);
        assert_eq!(now, vec![b0]);
        let (s0, now) = f.arrive(2, 500, t0);
        assert_eq!(now, vec![s0]);
        let mut big = Vec::new();
        let mut small = Vec::new();
        for _ in 0..20 {
            big.push(f.arrive(1, 2000, t0).0);
            small.push(f.arrive(2, 500, t0).0);
        }
        assert!(
            f.answered(b0, t0).is_empty(),
            "the blocker still fills the pipe"
        );
        assert!(f.answered(s0, t0).is_empty());
        let mut served = f.answered(blocker, t0);
        let mut order = Vec::new();
        while let Some(t) = served.pop() {
            order.push(t);
            served.extend(f.answered(t, t0));
        }
        assert_eq!(order.len(), 40);
        // In the first 20 admissions: bytes of each class within one large head.
        let first = &order[..20];
        let big_bytes = first.iter().filter(|t| big.contains(t)).count() * 2000;
        let small_bytes = first.iter().filter(|t| small.contains(t)).count() * 500;
        assert!(
            big_bytes.abs_diff(small_bytes) <= 2000,
            "big {big_bytes} B against small {small_bytes} B"
        );
    }

    #[test]
    fn unanswered_heads_stop_counting_after_the_hold() {
        let (mut f, t0) = machine();
        let (_admitted, waiting) = flooded(&mut f, t0);
        assert_eq!(f.next_expiry(), Some(t0 + PIPE_HOLD));
        assert!(f.expire(t0 + PIPE_HOLD / 2).is_empty());
        let later = f.expire(t0 + PIPE_HOLD);
        assert_eq!(
            later,
            waiting[..4].to_vec(),
            "four more admitted, oldest first"
        );
        assert_eq!(f.next_expiry(), Some(t0 + 2 * PIPE_HOLD));
    }

    #[test]
    fn a_head_larger_than_the_pipe_still_goes_when_the_pipe_is_empty() {
        let mut f = FairOpen::new(1000, PIPE_HOLD, 100);
        let t0 = Instant::now();
        let (a, now) = f.arrive(1, 5000, t0);
        assert_eq!(now, vec![a]);
        let (b, now) = f.arrive(1, 5000, t0);
        assert!(now.is_empty());
        assert_eq!(f.answered(a, t0), vec![b]);
    }

    #[test]
    fn cancelled_waiters_leave_no_state_and_cancelled_admissions_free_the_pipe() {
        let (mut f, t0) = machine();
        let (admitted, waiting) = flooded(&mut f, t0);
        for t in &waiting {
            assert!(f.cancel(*t, t0).is_empty());
        }
        assert_eq!(f.waiting(), 0);
        for t in &admitted {
            f.cancel(*t, t0);
        }
        assert_eq!(f.in_pipe(), 0);
        assert!(f.classes.is_empty() && f.ring.is_empty() && f.pipe.is_empty());
        assert!(f.waiting_in.is_empty());
        assert_eq!(f.next_expiry(), None);
        // Answering or cancelling twice is harmless.
        assert!(f.answered(admitted[0], t0).is_empty());
    }
}
