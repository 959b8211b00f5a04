//! Two [`Connection`]s, an edge and an agent, wired to each other through in-memory
//! queues of encoded messages, with a simulated clock (in the manner of quinn-proto's
//! test `Pair`). Every frame goes through the real encoder and decoder.

#![allow(dead_code)]

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use netbore_protocol::conn::{Config, Connection, Event, Role};
use netbore_protocol::{Header, Limits, RequestHead, ResponseHead};

/// The heartbeat interval the pair runs with unless a test says otherwise.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// Most bytes one simulated WebSocket message carries (as the mux batches).
pub const MESSAGE_BYTES: usize = 256 * 1024;

/// One side of the pair and what it has reported.
pub struct Side {
    pub conn: Connection,
    pub events: Vec<Event>,
    /// While false, what this side writes is lost (a silent peer or a dead path).
    pub link_up: bool,
    /// Messages this side has written.
    pub messages_sent: usize,
}

impl Side {
    /// Takes the events reported so far.
    pub fn take_events(&mut self) -> Vec<Event> {
        collect(self);
        std::mem::take(&mut self.events)
    }
}

/// The pair and its clock.
pub struct Pair {
    pub now: Duration,
    pub edge: Side,
    pub agent: Side,
}

impl Pair {
    /// A pair with the same limits on both sides.
    pub fn new(limits: Limits) -> Pair {
        Pair::with(limits, limits, HEARTBEAT)
    }

    /// A pair whose sides were told different limits (a misconfigured or older peer).
    pub fn with(edge: Limits, agent: Limits, heartbeat: Duration) -> Pair {
        let now = Duration::ZERO;
        let side = |role, limits| Side {
            conn: Connection::new(Config::new(role, limits, heartbeat), now),
            events: Vec::new(),
            link_up: true,
            messages_sent: 0,
        };
        Pair {
            now,
            edge: side(Role::Edge, edge),
            agent: side(Role::Agent, agent),
        }
    }

    /// Moves what each side wrote to the other, one message at a time, until neither
    /// has anything left to write. Returns the messages moved.
    pub fn drive(&mut self) -> usize {
        for moved in 0..100_000 {
            let a = transfer(self.now, &mut self.edge, &mut self.agent);
            let b = transfer(self.now, &mut self.agent, &mut self.edge);
            if !a && !b {
                collect(&mut self.edge);
                collect(&mut self.agent);
                return moved;
            }
        }
        panic!("the pair never went quiet");
    }

    /// Advances the simulated clock to `until`, stopping at every timeout on the way
    /// and delivering what each side writes.
    pub fn advance_to(&mut self, until: Duration) {
        self.drive();
        for _ in 0..100_000 {
            let next = [
                self.edge.conn.poll_timeout(),
                self.agent.conn.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .filter(|t| *t <= until)
            .min();
            let Some(t) = next else {
                self.now = until;
                self.drive();
                return;
            };
            self.now = self.now.max(t);
            self.edge.conn.handle_timeout(self.now);
            self.agent.conn.handle_timeout(self.now);
            self.drive();
        }
        panic!("timers kept firing");
    }

    /// Advances the clock by `d`.
    pub fn advance(&mut self, d: Duration) {
        self.advance_to(self.now + d);
    }
}

/// Writes `from`'s queued frames as one message to `to`. False when nothing was queued.
fn transfer(now: Duration, from: &mut Side, to: &mut Side) -> bool {
    let mut buf = BytesMut::new();
    if from.conn.transmit_into(&mut buf, MESSAGE_BYTES) == 0 {
        return false;
    }
    from.messages_sent += 1;
    if from.link_up && !to.conn.is_closed() {
        let _ = to.conn.handle_message(now, buf.freeze());
    }
    collect(to);
    collect(from);
    true
}

fn collect(side: &mut Side) {
    while let Some(ev) = side.conn.poll() {
        side.events.push(ev);
    }
}

/// A small GET.
pub fn get(path: &str) -> RequestHead {
    RequestHead {
        method: "GET".into(),
        target: path.into(),
        headers: vec![Header::new("host", "app.example.test")],
    }
}

/// A 200 with a content type.
pub fn ok() -> ResponseHead {
    ResponseHead {
        status: 200,
        headers: vec![Header::new("content-type", "text/plain")],
    }
}

/// `n` bytes of a repeating pattern, so a reordered or lost chunk shows.
pub fn pattern(n: usize) -> Bytes {
    (0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into()
}
