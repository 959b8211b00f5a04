//! Runs the Netbore tunnel protocol over one WebSocket connection.
//!
//! A [`Mux`] owns a WebSocket ([`WsLink`], framing of our own) after the handshake and carries many concurrent streams on
//! it. The edge opens streams with [`Mux::open`]; the agent takes them from
//! [`Incoming`]. Each stream is a [`StreamSender`] and a [`StreamReceiver`], usable from
//! different tasks.
//!
//! The protocol itself (stream table, id order, limits, go-away, heartbeat, both credit
//! windows) is [`netbore_protocol::conn::Connection`], a state machine without sockets
//! or clocks. One **driver task** per link owns the socket and the timer: it feeds the
//! connection what it reads, acts on its events, runs its timeout on Tokio's clock (so a
//! paused test clock drives it), and batches the frames it polls into as few WebSocket
//! messages as it can. Stream handles reach the connection through one lock and wake
//! the driver through one `Notify`; a sender waiting for credit parks its waker until
//! the connection reports the stream writable. Memory is bounded by the protocol's
//! credit windows: a receiver returns credit only for bytes its consumer has taken.
//!
//! Dropping a [`StreamSender`] that has not finished, or a [`StreamReceiver`] before the
//! peer finished, resets the stream: a forgotten stream frees itself.

pub mod body;
pub mod fair;
pub mod link;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use netbore_protocol::conn::{
    Config as ConnConfig, Connection, ConnectionError, Event as ConnEvent, OpError, Refusal,
};
use netbore_protocol::ws::{MAX_HEADER_LEN, OpCode, WsMessage};
use netbore_protocol::{AgentStatus, Header, Limits, RequestHead, ResetCode, ResponseHead};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use link::WsLink;
use link::{Framer, Reader};

pub use netbore_protocol::conn::{
    HEARTBEAT_MISSES, MAX_DATA_CHUNK, MAX_LINK_HEAD_BYTES, MAX_QUEUED_FRAMES, STREAM_ID_RETIRE,
};

/// The writer stops adding frames to one WebSocket message beyond this many bytes.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// A batch smaller than this (heads, window updates, small bodies) waits for one turn
/// of the scheduler before it is written, so frames queued right behind it share its
/// write. Bulk data is written at once: there the wait only adds delay.
pub const CORK_BELOW: usize = 16 * 1024;

/// Default longest time one write to the peer may make no progress before the peer is
/// taken to have stopped reading and the connection is closed. A write is at most one
/// batch ([`MAX_BATCH_BYTES`] plus a frame), so this allows links down to ~10 KB/s.
pub const DEFAULT_WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes tungstenite allocates for reading during the upgrade; the link takes the
/// socket back right after it ([`WsLink::after_upgrade`]) and reads through its own
/// buffer ([`link::READ_COLD`] while traffic is light, none while idle).
pub const WS_READ_BUFFER: usize = 4 * 1024;

/// The WebSocket settings both ends give tokio-tungstenite for the upgrade (the link's
/// frames are read by [`WsLink`], bounded by the same `max_message`).
pub fn ws_config(max_message: usize) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * max_message)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Which end of the tunnel this is. The edge opens streams; the agent accepts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The edge side.
    Edge,
    /// The agent side.
    Agent,
}

/// Settings for one connection, mostly from the handshake.
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// Which side we are.
    pub role: Role,
    /// Limits agreed in the handshake.
    pub limits: Limits,
    /// Ping when quiet this long; dead after [`HEARTBEAT_MISSES`] of them.
    pub heartbeat_interval: Duration,
    /// A label for logs (session id).
    pub label: String,
    /// A write that makes no progress for this long closes the connection (the peer
    /// stopped reading); [`DEFAULT_WRITE_STALL_TIMEOUT`] unless configured.
    pub write_stall_timeout: Duration,
}

/// Why a connection or stream operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// The connection is gone.
    #[error("tunnel connection closed: {0}")]
    Closed(String),
    /// The peer (or we) reset the stream.
    #[error("stream reset ({code:?}): {message}")]
    Reset {
        /// Reset reason.
        code: ResetCode,
        /// Detail.
        message: String,
    },
    /// The connection is at its concurrent stream limit, or going away.
    #[error("tunnel connection refuses new streams: {0}")]
    Refused(&'static str),
    /// A head or trailers too large for the wire format or the frame limit.
    #[error("head too large to send: {0}")]
    TooLarge(String),
    /// The caller misused the stream (a bug, reported rather than panicking).
    #[error("stream misuse: {0}")]
    Misuse(String),
}

/// What a [`StreamReceiver`] yields.
#[derive(Debug)]
pub enum Event {
    /// The response head (edge side only).
    Head(ResponseHead),
    /// Body bytes (or raw bytes of an upgraded stream).
    Data(Bytes),
    /// Trailers; the peer's half is finished.
    Trailers(Vec<Header>),
    /// The peer's half finished cleanly.
    End,
    /// The stream was reset; nothing more follows.
    Reset(ResetCode, String),
}

/// The driver's view of one open stream: where its events go and who waits on it.
struct Slot {
    tx: mpsc::UnboundedSender<Event>,
    /// A sender parked for credit.
    send_waker: Option<Waker>,
    /// Our half is finished (sent its end, trailers, or an end-stream head).
    local_done: bool,
    /// Its ticket in the link's [`fair::FairOpen`] until the response head arrives or
    /// the stream ends (0: none).
    ticket: fair::Ticket,
}

/// Everything about the link behind its one lock.
struct Inner {
    conn: Connection,
    slots: HashMap<u32, Slot>,
    /// Streams the edge opens, handed to the agent's [`Incoming`].
    accept: Option<mpsc::UnboundedSender<IncomingStream>>,
    close_reason: Option<String>,
    /// Admission of request heads, fair between clients ([`Mux::open_fair`]).
    gate: Gate,
    /// Bytes of request heads waiting at the gate (counted against
    /// [`MAX_LINK_HEAD_BYTES`] with the open streams' heads).
    waiting_head_bytes: usize,
    peak_queued_bytes: usize,
    /// The agent's last AGENT_STATUS (edge side), with the Unix time it arrived.
    agent_status: Option<(AgentStatus, u64)>,
    writer_done: bool,
}

struct Shared {
    cfg: MuxConfig,
    /// The link's epoch on Tokio's clock; the connection's `now` is the time since.
    start: tokio::time::Instant,
    inner: Mutex<Inner>,
    /// Wakes the driver: frames to write, or the link closed.
    wake: Notify,
    cancel: CancellationToken,
    going_away_notify: Notify,
    idle_notify: Notify,
    writer_done_notify: Notify,
    /// Woken when the agent's origin turns healthy or unhealthy (or first reports).
    agent_status_changed: Notify,
}

/// [`fair::FairOpen`] and the requests waiting on it.
#[derive(Default)]
struct Gate {
    fair: fair::FairOpen,
    waiters: HashMap<fair::Ticket, tokio::sync::oneshot::Sender<()>>,
}

impl Gate {
    /// Wakes the waiters of `admitted` tickets.
    fn wake(&mut self, admitted: Vec<fair::Ticket>) {
        for t in admitted {
            if let Some(w) = self.waiters.remove(&t) {
                let _ = w.send(());
            }
        }
    }
}

/// The clock [`fair::FairOpen`] is driven with: Tokio's, so a paused test clock
/// drives it too.
fn gate_now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// A request head admitted or waiting on the gate; dropped before its stream opened
/// (the viewer left, the link closed), it gives back its place and its head bytes.
struct Admission {
    shared: Arc<Shared>,
    ticket: fair::Ticket,
    head_bytes: usize,
    /// Its stream opened and took over the ticket and the head bytes.
    opened: bool,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.opened {
            return;
        }
        let mut inner = self.shared.inner.lock();
        inner.gate.waiters.remove(&self.ticket);
        let admitted = inner.gate.fair.cancel(self.ticket, gate_now());
        inner.gate.wake(admitted);
        inner.waiting_head_bytes -= self.head_bytes;
    }
}

/// A handle to one multiplexed connection; cheap to clone.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux")
            .field("label", &self.shared.cfg.label)
            .field("open_streams", &self.open_streams())
            .finish()
    }
}

/// Releases a held-back greeting (see [`Mux::start_with_greeting`]); dropping it
/// without sending closes the connection.
pub struct Greeting(tokio::sync::oneshot::Sender<()>);

impl Greeting {
    /// Sends the greeting now.
    pub fn release(self) {
        let _ = self.0.send(());
    }
}

/// Streams the edge opens, as the agent receives them.
pub struct Incoming {
    rx: mpsc::UnboundedReceiver<IncomingStream>,
}

impl Incoming {
    /// The next stream, or `None` once the connection is closed.
    pub async fn accept(&mut self) -> Option<IncomingStream> {
        self.rx.recv().await
    }
}

/// A stream opened by the edge: a viewer's request.
pub struct IncomingStream {
    /// The request head.
    pub head: RequestHead,
    /// True when the request has no body.
    pub end_stream: bool,
    /// Sends the response.
    pub sender: StreamSender,
    /// Receives the request body.
    pub receiver: StreamReceiver,
}

fn refused(r: Refusal) -> MuxError {
    MuxError::Refused(match r {
        Refusal::TooManyStreams(_) => "too many concurrent streams",
        Refusal::GoingAway => "the connection is going away",
        Refusal::HeadBytes => "the connection holds its limit of head bytes",
    })
}

fn stream_gone() -> MuxError {
    MuxError::Reset {
        code: ResetCode::Cancel,
        message: "stream was reset or its connection closed".into(),
    }
}

impl Shared {
    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.start)
    }

    fn closed_error(&self, inner: &Inner) -> MuxError {
        MuxError::Closed(inner.close_reason.clone().unwrap_or_default())
    }

    /// Maps a connection error for a stream operation.
    fn op_error(&self, inner: &Inner, e: OpError) -> MuxError {
        match e {
            OpError::Closed(_) => self.closed_error(inner),
            OpError::UnknownStream(_) => stream_gone(),
            OpError::Refused(r) => refused(r),
            OpError::WrongRole { .. } | OpError::Misuse(_) => MuxError::Misuse(e.to_string()),
            OpError::TooLarge(m) => MuxError::TooLarge(m),
        }
    }

    /// Acts on everything the connection reported, under the lock, then wakes the
    /// driver if frames are waiting.
    fn after(self: &Arc<Self>, inner: &mut Inner) {
        while let Some(ev) = inner.conn.poll() {
            self.on_event(inner, ev);
        }
        let q = inner.conn.queued_bytes();
        inner.peak_queued_bytes = inner.peak_queued_bytes.max(q);
        if inner.conn.queued_frames() > 0 || inner.conn.is_closed() {
            self.wake.notify_one();
        }
        // Forget slots whose stream the connection forgot (finished both ways).
        if inner.slots.len() != inner.conn.open_streams() {
            let gone: Vec<u32> = inner
                .slots
                .keys()
                .copied()
                .filter(|id| !inner.conn.is_open(*id))
                .collect();
            for id in gone {
                self.forget(inner, id);
            }
        }
    }

    fn forget(&self, inner: &mut Inner, id: u32) {
        if let Some(mut slot) = inner.slots.remove(&id) {
            if let Some(w) = slot.send_waker.take() {
                w.wake();
            }
            self.answered(inner, slot.ticket);
        }
        if inner.slots.is_empty() {
            self.idle_notify.notify_waiters();
        }
    }

    /// A stream's head was answered (or the stream ended): its bytes leave the gate's
    /// pipe, and the next waiting heads go.
    fn answered(&self, inner: &mut Inner, ticket: fair::Ticket) {
        if ticket != 0 {
            let admitted = inner.gate.fair.answered(ticket, gate_now());
            inner.gate.wake(admitted);
        }
    }

    fn on_event(self: &Arc<Self>, inner: &mut Inner, ev: ConnEvent) {
        match ev {
            ConnEvent::Opened {
                stream_id,
                head,
                end_stream,
            } => {
                let (tx, rx) = mpsc::unbounded_channel();
                inner.slots.insert(
                    stream_id,
                    Slot {
                        tx,
                        send_waker: None,
                        local_done: false,
                        ticket: 0,
                    },
                );
                let (sender, receiver) = handles(self.clone(), stream_id, rx);
                let incoming = IncomingStream {
                    head,
                    end_stream,
                    sender,
                    receiver,
                };
                let refused = match inner.accept.as_ref() {
                    Some(a) => a.send(incoming).err().map(|e| e.0),
                    None => Some(incoming),
                };
                if let Some(mut incoming) = refused {
                    // Dropped under the lock: the handles must not take it again.
                    incoming.sender.done = true;
                    incoming.receiver.finished = true;
                    drop(incoming);
                    inner.conn.close("agent stopped accepting streams");
                }
            }
            ConnEvent::Head { stream_id, head } => {
                if let Some(slot) = inner.slots.get_mut(&stream_id) {
                    let _ = slot.tx.send(Event::Head(head));
                    let ticket = std::mem::take(&mut slot.ticket);
                    self.answered(inner, ticket);
                }
            }
            ConnEvent::Data { stream_id, data } => {
                let n = data.len();
                let delivered = inner
                    .slots
                    .get(&stream_id)
                    .is_some_and(|s| s.tx.send(Event::Data(data)).is_ok());
                if !delivered {
                    let now = self.now();
                    inner.conn.consumed(now, stream_id, n);
                }
            }
            ConnEvent::Trailers { stream_id, headers } => {
                if let Some(slot) = inner.slots.get(&stream_id) {
                    let _ = slot.tx.send(Event::Trailers(headers));
                }
            }
            ConnEvent::End { stream_id } => {
                if let Some(slot) = inner.slots.get(&stream_id) {
                    let _ = slot.tx.send(Event::End);
                }
            }
            ConnEvent::Reset {
                stream_id,
                code,
                message,
            } => {
                if let Some(slot) = inner.slots.get(&stream_id) {
                    let _ = slot.tx.send(Event::Reset(code, message));
                }
                self.forget(inner, stream_id);
            }
            ConnEvent::Writable { stream_id } => {
                if let Some(w) = inner
                    .slots
                    .get_mut(&stream_id)
                    .and_then(|s| s.send_waker.take())
                {
                    w.wake();
                }
            }
            ConnEvent::GoAway(g) => {
                debug!(session = %self.cfg.label, message = %g.message, "edge is going away");
                self.going_away_notify.notify_waiters();
            }
            ConnEvent::AgentStatus => {
                let Some(a) = inner.conn.agent_status().cloned() else {
                    return;
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                let healthy = a.origin.is_healthy();
                let before = inner
                    .agent_status
                    .replace((a, now))
                    .map(|(b, _)| b.origin.is_healthy());
                if before != Some(healthy) {
                    self.agent_status_changed.notify_one();
                }
            }
            ConnEvent::Closed(e) => {
                let reason = match &e {
                    ConnectionError::HeartbeatTimeout { .. } => {
                        warn!(session = %self.cfg.label, "no heartbeat from the peer; closing the tunnel connection");
                        "heartbeat timeout: the peer stopped answering".to_string()
                    }
                    ConnectionError::Closed(r) => r.clone(),
                    other => {
                        warn!(session = %self.cfg.label, reason = %other, "closing tunnel connection");
                        other.to_string()
                    }
                };
                if inner.close_reason.is_none() {
                    inner.close_reason = Some(reason);
                }
                let ids: Vec<u32> = inner.slots.keys().copied().collect();
                for id in ids {
                    self.forget(inner, id);
                }
                inner.accept = None;
                for (_, w) in inner.gate.waiters.drain() {
                    drop(w);
                }
                self.cancel.cancel();
                self.going_away_notify.notify_waiters();
                self.idle_notify.notify_waiters();
                self.wake.notify_one();
            }
        }
    }

    fn close(self: &Arc<Self>, reason: &str) {
        let mut inner = self.inner.lock();
        inner.conn.close(reason);
        self.after(&mut inner);
        drop(inner);
        self.cancel.cancel();
        self.wake.notify_one();
    }
}

fn handles(
    shared: Arc<Shared>,
    id: u32,
    rx: mpsc::UnboundedReceiver<Event>,
) -> (StreamSender, StreamReceiver) {
    (
        StreamSender {
            shared: shared.clone(),
            id,
            done: false,
        },
        StreamReceiver {
            shared,
            id,
            rx,
            finished: false,
        },
    )
}

impl Mux {
    /// Starts serving `ws` (already past the handshake). Returns the handle and, for the
    /// agent role, the stream of incoming streams. The connection closes when `cancel`
    /// fires, the peer goes away, or the link dies.
    pub fn start<S>(
        ws: WsLink<S>,
        cfg: MuxConfig,
        cancel: CancellationToken,
    ) -> (Mux, Option<Incoming>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Mux::start_inner(ws, cfg, cancel, None)
    }

    /// Like [`Mux::start`], but the first message on the wire is the text `greeting`,
    /// sent only when the returned [`Greeting`] is released. The edge uses it to send
    /// its welcome after the tunnel is routable, so an agent never announces a URL
    /// the edge does not serve yet.
    pub fn start_with_greeting<S>(
        ws: WsLink<S>,
        cfg: MuxConfig,
        cancel: CancellationToken,
        greeting: String,
    ) -> (Mux, Greeting)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (mux, _) = Mux::start_inner(ws, cfg, cancel, Some((greeting, rx)));
        (mux, Greeting(tx))
    }

    fn start_inner<S>(
        ws: WsLink<S>,
        cfg: MuxConfig,
        cancel: CancellationToken,
        greeting: Option<(String, tokio::sync::oneshot::Receiver<()>)>,
    ) -> (Mux, Option<Incoming>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let role = match cfg.role {
            Role::Edge => netbore_protocol::conn::Role::Edge,
            Role::Agent => netbore_protocol::conn::Role::Agent,
        };
        let conn = Connection::new(
            ConnConfig::new(role, cfg.limits, cfg.heartbeat_interval),
            Duration::ZERO,
        );
        let (accept, incoming) = if cfg.role == Role::Agent {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(Incoming { rx }))
        } else {
            (None, None)
        };
        let shared = Arc::new(Shared {
            start: tokio::time::Instant::now(),
            inner: Mutex::new(Inner {
                conn,
                slots: HashMap::new(),
                accept,
                close_reason: None,
                gate: Gate::default(),
                waiting_head_bytes: 0,
                peak_queued_bytes: 0,
                agent_status: None,
                writer_done: false,
            }),
            wake: Notify::new(),
            cancel,
            going_away_notify: Notify::new(),
            idle_notify: Notify::new(),
            writer_done_notify: Notify::new(),
            agent_status_changed: Notify::new(),
            cfg,
        });
        tokio::spawn(drive(shared.clone(), ws, greeting));
        (Mux { shared }, incoming)
    }

    /// Opens a stream carrying `head` (edge side). Returns immediately; the request
    /// head is queued for the writer.
    pub fn open(
        &self,
        head: RequestHead,
        end_stream: bool,
    ) -> Result<(StreamSender, StreamReceiver), MuxError> {
        self.open_inner(head, end_stream, 0)
    }

    /// Like [`Mux::open`], but the stream opens only when the link's fair order
    /// ([`fair`]) admits it: a client (`class`, e.g. its address) with nothing in flight
    /// goes at once; otherwise the head waits its turn, with the other clients' waiting
    /// heads served round robin by bytes, while the link carries more than
    /// [`fair::PIPE_HEAD_BYTES`] of unanswered heads. The head's bytes count against
    /// [`MAX_LINK_HEAD_BYTES`] while it waits. Dropping the future gives up the place.
    pub async fn open_fair(
        &self,
        head: RequestHead,
        end_stream: bool,
        class: fair::Class,
    ) -> Result<(StreamSender, StreamReceiver), MuxError> {
        let sh = &self.shared;
        let probe = netbore_protocol::Frame::RequestHead {
            stream_id: 1,
            head,
            end_stream,
        };
        netbore_protocol::frame::check_encodable(&probe, sh.cfg.limits.max_frame_len as usize)
            .map_err(MuxError::TooLarge)?;
        let head_len = probe.encoded_len();
        let netbore_protocol::Frame::RequestHead { head, .. } = probe else {
            unreachable!("built above")
        };
        let mut admission = Admission {
            shared: sh.clone(),
            ticket: 0,
            head_bytes: 0,
            opened: false,
        };
        let waiting = {
            let mut inner = sh.inner.lock();
            if inner.conn.is_closed() {
                return Err(sh.closed_error(&inner));
            }
            if inner.conn.is_going_away() {
                return Err(refused(Refusal::GoingAway));
            }
            if inner.conn.head_bytes() + inner.waiting_head_bytes + head_len > MAX_LINK_HEAD_BYTES {
                return Err(MuxError::Refused(
                    "the connection holds its limit of request head bytes",
                ));
            }
            inner.waiting_head_bytes += head_len;
            admission.head_bytes = head_len;
            let (ticket, admitted) = inner.gate.fair.arrive(class, head_len, gate_now());
            admission.ticket = ticket;
            let now = admitted.contains(&ticket);
            inner.gate.wake(admitted);
            (!now).then(|| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                inner.gate.waiters.insert(ticket, tx);
                rx
            })
        };
        if let Some(mut rx) = waiting {
            loop {
                let next = sh.inner.lock().gate.fair.next_expiry();
                let aged = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = &mut rx => match r {
                        Ok(()) => break,
                        Err(_) => return Err(MuxError::Closed(self.close_reason())),
                    },
                    _ = aged => {
                        let mut inner = sh.inner.lock();
                        let admitted = inner.gate.fair.expire(gate_now());
                        inner.gate.wake(admitted);
                    }
                    _ = sh.cancel.cancelled() => return Err(MuxError::Closed(self.close_reason())),
                }
            }
        }
        // The stream takes over the ticket; its head bytes move to the connection.
        {
            let mut inner = sh.inner.lock();
            inner.waiting_head_bytes -= admission.head_bytes;
        }
        admission.head_bytes = 0;
        let opened = self.open_inner(head, end_stream, admission.ticket);
        admission.opened = opened.is_ok();
        opened
    }

    fn open_inner(
        &self,
        head: RequestHead,
        end_stream: bool,
        ticket: fair::Ticket,
    ) -> Result<(StreamSender, StreamReceiver), MuxError> {
        let sh = &self.shared;
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut inner = sh.inner.lock();
            if inner.conn.is_closed() {
                return Err(sh.closed_error(&inner));
            }
            let now = sh.now();
            let id = match inner.conn.open(now, head, end_stream) {
                Ok(id) => id,
                Err(OpError::Refused(Refusal::HeadBytes)) => {
                    return Err(MuxError::Refused(
                        "the connection holds its limit of request head bytes",
                    ));
                }
                Err(e) => {
                    let err = sh.op_error(&inner, e);
                    sh.after(&mut inner);
                    return Err(err);
                }
            };
            inner.slots.insert(
                id,
                Slot {
                    tx,
                    send_waker: None,
                    local_done: end_stream,
                    ticket,
                },
            );
            sh.after(&mut inner);
            drop(inner);
            let (mut s, r) = handles(sh.clone(), id, rx);
            s.done = end_stream;
            Ok((s, r))
        }
    }

    /// Tells the agent this edge is leaving (edge side). No new streams are opened
    /// here afterwards; open ones run to completion.
    pub fn go_away(&self, message: &str) {
        let sh = &self.shared;
        let mut inner = sh.inner.lock();
        if inner.conn.is_going_away() {
            return;
        }
        let now = sh.now();
        inner.conn.go_away(now, message);
        sh.after(&mut inner);
        drop(inner);
        sh.going_away_notify.notify_waiters();
    }

    /// Tells the edge how the agent's origin is (agent side). Send only when the
    /// edge's welcome lists [`netbore_protocol::handshake::CAP_AGENT_STATUS`]; the
    /// message is cut to [`netbore_protocol::frame::MAX_AGENT_STATUS_MESSAGE`] bytes.
    pub fn send_agent_status(&self, mut status: AgentStatus) {
        let max = netbore_protocol::frame::MAX_AGENT_STATUS_MESSAGE;
        if status.message.len() > max {
            let mut cut = max;
            while !status.message.is_char_boundary(cut) {
                cut -= 1;
            }
            status.message.truncate(cut);
        }
        let sh = &self.shared;
        let mut inner = sh.inner.lock();
        let now = sh.now();
        let _ = inner.conn.send_agent_status(now, status);
        sh.after(&mut inner);
    }

    /// The agent's last AGENT_STATUS and the Unix time it arrived (edge side); `None`
    /// until one arrives (older agents never send one).
    pub fn agent_status(&self) -> Option<(AgentStatus, u64)> {
        self.shared.inner.lock().agent_status.clone()
    }

    /// Resolves when the agent's origin turned healthy or unhealthy, or reported for
    /// the first time, since the last call (edge side).
    pub async fn agent_status_changed(&self) {
        self.shared.agent_status_changed.notified().await;
    }

    /// True once either side announced go-away.
    pub fn is_going_away(&self) -> bool {
        self.shared.inner.lock().conn.is_going_away()
    }

    /// Resolves when the peer (or we) announced go-away, or the connection closed.
    pub async fn going_away(&self) {
        let sh = &self.shared;
        loop {
            let notified = sh.going_away_notify.notified();
            if self.is_going_away() || sh.cancel.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = notified => {}
                _ = sh.cancel.cancelled() => return,
            }
        }
    }

    /// Closes the connection now; open streams are reset.
    pub fn close(&self, reason: &str) {
        self.shared.close(reason);
    }

    /// Closes the connection after everything already queued (the last frames of
    /// finished streams) has been written, waiting at most `within`. Use before the
    /// process exits, so no response loses its end.
    pub async fn close_and_flush(&self, reason: &str, within: Duration) {
        self.close(reason);
        let sh = &self.shared;
        let _ = tokio::time::timeout(within, async {
            loop {
                let notified = sh.writer_done_notify.notified();
                if sh.inner.lock().writer_done {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }

    /// True once the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// Resolves when the connection is closed.
    pub async fn closed(&self) {
        self.shared.cancel.cancelled().await
    }

    /// Why the connection closed (empty while open).
    pub fn close_reason(&self) -> String {
        self.shared
            .inner
            .lock()
            .close_reason
            .clone()
            .unwrap_or_default()
    }

    /// Streams currently open on this connection.
    pub fn open_streams(&self) -> usize {
        self.shared.inner.lock().slots.len()
    }

    /// Resolves when no stream is open (for draining).
    pub async fn idle(&self) {
        loop {
            let notified = self.shared.idle_notify.notified();
            if self.open_streams() == 0 || self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// Payload bytes received and sent so far.
    pub fn bytes(&self) -> (u64, u64) {
        self.shared.inner.lock().conn.bytes()
    }

    /// The label given in the config (the session id).
    pub fn label(&self) -> &str {
        &self.shared.cfg.label
    }

    /// Encoded bytes waiting to be written to the peer now, and the most there have
    /// ever been on this connection.
    pub fn queued_bytes(&self) -> (usize, usize) {
        let inner = self.shared.inner.lock();
        (inner.conn.queued_bytes(), inner.peak_queued_bytes)
    }

    /// Request heads waiting for their turn in [`Mux::open_fair`].
    pub fn waiting_heads(&self) -> usize {
        self.shared.inner.lock().gate.fair.waiting()
    }

    /// Bytes of heads held by this connection's open streams and waiting heads (at
    /// most [`MAX_LINK_HEAD_BYTES`]).
    pub fn head_bytes(&self) -> usize {
        let inner = self.shared.inner.lock();
        inner.conn.head_bytes() + inner.waiting_head_bytes
    }
}

/// Sends one direction of a stream.
pub struct StreamSender {
    shared: Arc<Shared>,
    id: u32,
    /// Our half is finished or the stream was reset by us.
    done: bool,
}

impl StreamSender {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Runs `op` on the connection under the lock, then acts on what it reported.
    fn with<T>(
        &mut self,
        op: impl FnOnce(&mut Connection, Duration, u32) -> Result<T, OpError>,
    ) -> Result<T, MuxError> {
        let sh = &self.shared;
        let mut inner = sh.inner.lock();
        let now = sh.now();
        let r = op(&mut inner.conn, now, self.id);
        let r = r.map_err(|e| sh.op_error(&inner, e));
        sh.after(&mut inner);
        r
    }

    /// Sends the response head (agent side).
    pub fn send_response(&mut self, head: ResponseHead, end_stream: bool) -> Result<(), MuxError> {
        self.with(|c, now, id| c.send_response(now, id, head, end_stream))?;
        if end_stream {
            self.mark_done();
        }
        Ok(())
    }

    fn mark_done(&mut self) {
        self.done = true;
        if let Some(slot) = self.shared.inner.lock().slots.get_mut(&self.id) {
            slot.local_done = true;
        }
    }

    /// Sends `data`, waiting for credit as needed; with `end`, the last frame ends our
    /// half.
    async fn send(&mut self, mut data: Bytes, end: bool) -> Result<(), MuxError> {
        std::future::poll_fn(|cx| {
            let sh = &self.shared;
            let mut inner = sh.inner.lock();
            let now = sh.now();
            match inner.conn.send_data(now, self.id, &mut data, end) {
                Ok(_) if data.is_empty() => {
                    sh.after(&mut inner);
                    Poll::Ready(Ok(()))
                }
                Ok(_) => {
                    if let Some(slot) = inner.slots.get_mut(&self.id) {
                        slot.send_waker = Some(cx.waker().clone());
                    }
                    sh.after(&mut inner);
                    Poll::Pending
                }
                Err(e) => {
                    let err = sh.op_error(&inner, e);
                    sh.after(&mut inner);
                    Poll::Ready(Err(err))
                }
            }
        })
        .await?;
        if end {
            self.mark_done();
        }
        Ok(())
    }

    /// Sends body bytes, waiting for credit as needed, split into frames of at most
    /// [`MAX_DATA_CHUNK`] bytes.
    pub async fn send_data(&mut self, data: Bytes) -> Result<(), MuxError> {
        if data.is_empty() {
            // Nothing to send, but the stream must still be open for a body.
            return self
                .with(|c, now, id| c.send_data(now, id, &mut Bytes::new(), false).map(|_| ()));
        }
        self.send(data, false).await
    }

    /// Sends the last body bytes and ends our half in the same frame, saving the
    /// separate empty end-of-stream frame (and often a WebSocket message) per response.
    pub async fn send_data_and_finish(&mut self, data: Bytes) -> Result<(), MuxError> {
        self.send(data, true).await
    }

    /// Ends our half with trailers.
    pub fn send_trailers(&mut self, headers: Vec<Header>) -> Result<(), MuxError> {
        self.with(|c, now, id| c.send_trailers(now, id, headers))?;
        self.mark_done();
        Ok(())
    }

    /// Ends our half cleanly.
    pub fn finish(&mut self) -> Result<(), MuxError> {
        self.with(|c, now, id| c.finish(now, id))?;
        self.mark_done();
        Ok(())
    }

    /// Abandons the stream in both directions.
    pub fn reset(&mut self, code: ResetCode, message: &str) {
        self.done = true;
        reset_stream(&self.shared, self.id, code, message);
    }

    /// True once our half is finished or the stream was reset.
    pub fn is_done(&self) -> bool {
        self.done || !self.shared.inner.lock().slots.contains_key(&self.id)
    }
}

/// Resets a stream from our side: tells the peer, fails our handles.
fn reset_stream(sh: &Arc<Shared>, id: u32, code: ResetCode, message: &str) {
    let mut inner = sh.inner.lock();
    if !inner.conn.is_open(id) {
        return;
    }
    let now = sh.now();
    inner.conn.reset(now, id, code, message);
    if let Some(slot) = inner.slots.get(&id) {
        let _ = slot.tx.send(Event::Reset(code, message.to_string()));
    }
    sh.forget(&mut inner, id);
    sh.after(&mut inner);
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        if !self.is_done() {
            self.reset(
                ResetCode::Cancel,
                "sender dropped before the end of the stream",
            );
        }
    }
}

/// Receives one direction of a stream.
pub struct StreamReceiver {
    shared: Arc<Shared>,
    id: u32,
    rx: mpsc::UnboundedReceiver<Event>,
    finished: bool,
}

impl StreamReceiver {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The next event, or `None` after the last one. Receiving data returns its credit
    /// to the peer.
    pub async fn recv(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Poll form of [`StreamReceiver::recv`], for `http_body::Body` impls.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(ev)) => {
                match &ev {
                    Event::Data(d) => self.consumed(d.len()),
                    Event::End | Event::Trailers(_) | Event::Reset(..) => self.finished = true,
                    Event::Head(_) => {}
                }
                Poll::Ready(Some(ev))
            }
            Poll::Ready(None) => {
                self.finished = true;
                Poll::Ready(Some(Event::Reset(
                    ResetCode::Cancel,
                    format!("tunnel connection closed: {}", {
                        self.shared
                            .inner
                            .lock()
                            .close_reason
                            .clone()
                            .unwrap_or_default()
                    }),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Abandons the stream in both directions (e.g. the viewer stopped waiting).
    pub fn reset(&mut self, code: ResetCode, message: &str) {
        self.finished = true;
        reset_stream(&self.shared, self.id, code, message);
    }

    fn consumed(&self, n: usize) {
        let sh = &self.shared;
        let mut inner = sh.inner.lock();
        let now = sh.now();
        inner.conn.consumed(now, self.id, n);
        sh.after(&mut inner);
    }
}

impl Drop for StreamReceiver {
    fn drop(&mut self) {
        // Return the credit held by data nobody will read.
        let mut unread = 0;
        while let Ok(ev) = self.rx.try_recv() {
            match ev {
                Event::Data(d) => unread += d.len(),
                Event::End | Event::Trailers(_) | Event::Reset(..) => self.finished = true,
                Event::Head(_) => {}
            }
        }
        if self.finished && unread == 0 {
            return;
        }
        let sh = &self.shared;
        let mut inner = sh.inner.lock();
        let now = sh.now();
        if unread > 0 {
            inner.conn.consumed(now, self.id, unread);
        }
        if !self.finished && inner.conn.is_open(self.id) {
            // While we are still answering, only stop reading: the reply may go on (an
            // origin that answers before reading the whole upload). The connection
            // resets once both halves are of no more use.
            let local_done = inner.slots.get(&self.id).is_none_or(|s| s.local_done);
            if local_done {
                inner.conn.reset(
                    now,
                    self.id,
                    ResetCode::Cancel,
                    "receiver dropped before the end of the stream",
                );
                sh.forget(&mut inner, self.id);
            } else {
                inner.conn.stop_reading(now, self.id);
            }
        }
        sh.after(&mut inner);
    }
}

type Write<S> = Pin<Box<dyn Future<Output = (WriteHalf<S>, Result<(), String>)> + Send>>;

/// One write of the whole `frame`, bounded by the stall timeout; gives the half back.
fn write<S>(mut w: WriteHalf<S>, frame: BytesMut, stall: Duration) -> Write<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    Box::pin(async move {
        let r = match tokio::time::timeout(stall, async {
            w.write_all(&frame).await?;
            w.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write failed: {e}")),
            Err(_) => Err(format!(
                "the peer stopped reading: a write made no progress for {stall:?}"
            )),
        };
        (w, r)
    })
}

/// The frames waiting, as one WebSocket frame of at most about [`MAX_BATCH_BYTES`],
/// built in place: the protocol frames are encoded after room for the header, which
/// [`Framer::seal`] fills in (masking the payload where it lies on the agent side). A
/// small batch waits one turn of the scheduler first, so frames queued right behind it
/// (a response's data behind its head) share its write.
async fn next_batch(shared: &Shared, buf: &mut BytesMut, framer: Framer) -> Option<BytesMut> {
    let limit = MAX_BATCH_BYTES + MAX_HEADER_LEN;
    Framer::start(buf);
    if shared.inner.lock().conn.transmit_into(buf, limit) == 0 {
        buf.clear();
        return None;
    }
    if buf.len() < CORK_BELOW {
        tokio::task::yield_now().await;
        shared.inner.lock().conn.transmit_into(buf, limit);
    }
    framer.seal(OpCode::Binary, buf);
    let batch = buf.split();
    if buf.capacity() > 4 * MAX_BATCH_BYTES {
        *buf = BytesMut::new();
    }
    Some(batch)
}

/// What one message read from the link means for the driver: `Some(reason)` ends it.
fn on_message(
    shared: &Arc<Shared>,
    framer: Framer,
    pong: &mut Option<BytesMut>,
    msg: std::io::Result<Option<WsMessage>>,
) -> Option<String> {
    match msg {
        Ok(None | Some(WsMessage::Close(_))) => Some("peer closed the connection".to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            Some(format!("protocol error: {e}"))
        }
        Err(e) => Some(format!("read failed: {e}")),
        Ok(Some(WsMessage::Text(_))) => {
            Some("protocol error: text message after the handshake".to_string())
        }
        Ok(Some(m @ (WsMessage::Ping(_) | WsMessage::Pong(_)))) => {
            if let WsMessage::Ping(p) = m {
                // Only the latest ping needs its pong (RFC 6455 §5.5.3).
                *pong = Some(framer.frame(OpCode::Pong, &p));
            }
            let now = shared.now();
            shared.inner.lock().conn.heard(now);
            None
        }
        Ok(Some(WsMessage::Binary(data))) => {
            let mut inner = shared.inner.lock();
            let now = shared.now();
            let r = inner.conn.handle_message(now, data);
            shared.after(&mut inner);
            r.err().map(|e| e.to_string())
        }
    }
}

/// The one task that owns a link's socket: it reads, writes and runs the
/// connection's timer, so the state machine sees events in one order.
async fn drive<S>(
    shared: Arc<Shared>,
    link: WsLink<S>,
    mut greeting: Option<(String, tokio::sync::oneshot::Receiver<()>)>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stall = shared.cfg.write_stall_timeout;
    let (io, mut reader, framer): (S, Reader, Framer) = link.into_parts();
    let (mut rd, w): (ReadHalf<S>, WriteHalf<S>) = tokio::io::split(io);
    let mut sink = Some(w);
    let mut writing: Option<Write<S>> = None;
    let mut pong: Option<BytesMut> = None;
    // Grows with the batches written; given back when the link is quiet (below).
    let mut buf = BytesMut::new();
    loop {
        // Start a write when the socket is free; nothing goes before the greeting.
        if writing.is_none()
            && greeting.is_none()
            && let Some(s) = sink.take()
        {
            if let Some(p) = pong.take() {
                writing = Some(write(s, p, stall));
            } else {
                match next_batch(&shared, &mut buf, framer).await {
                    Some(batch) => writing = Some(write(s, batch, stall)),
                    None => sink = Some(s),
                }
            }
        }
        let deadline = shared
            .inner
            .lock()
            .conn
            .poll_timeout()
            .map(|t| shared.start + t);
        tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => {
                shared.close("closed locally");
                break;
            }
            released = async { (&mut greeting.as_mut().expect("guarded").1).await }, if greeting.is_some() => {
                let (text, _) = greeting.take().expect("guarded");
                if released.is_err() {
                    shared.close("greeting withheld");
                    break;
                }
                let s = sink.take().expect("no write before the greeting");
                writing = Some(write(s, framer.frame(OpCode::Text, text.as_bytes()), stall));
            }
            done = async { writing.as_mut().expect("guarded").await }, if writing.is_some() => {
                writing = None;
                let (s, r) = done;
                sink = Some(s);
                if let Err(reason) = r {
                    if reason.starts_with("the peer stopped reading") {
                        warn!(session = %shared.cfg.label, ?stall, "the peer stopped reading; closing the tunnel connection");
                    }
                    shared.close(&reason);
                    break;
                }
            }
            msg = reader.recv(&mut rd) => {
                if let Some(reason) = on_message(&shared, framer, &mut pong, msg) {
                    shared.close(&reason);
                    break;
                }
            }
            _ = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let mut inner = shared.inner.lock();
                let now = shared.now();
                // The timer fires when the link has been quiet (a heartbeat is due): an
                // idle link keeps no buffer or table its last burst grew.
                inner.conn.shrink_idle();
                if inner.slots.is_empty() {
                    inner.slots = HashMap::new();
                }
                if buf.is_empty() {
                    buf = BytesMut::new();
                }
                reader.shrink_idle();
                inner.conn.handle_timeout(now);
                shared.after(&mut inner);
                if inner.conn.is_closed() {
                    break;
                }
            }
            _ = shared.wake.notified() => {
                if shared.inner.lock().conn.is_closed() {
                    break;
                }
            }
        }
    }
    debug!(session = %shared.cfg.label, reason = %{ shared.inner.lock().close_reason.clone().unwrap_or_default() }, "tunnel connection driver finished");
    // A peer that broke the protocol (or stopped reading, or went silent) gets no
    // more writes: drop the socket at once.
    let peer_fault = matches!(
        shared.inner.lock().conn.close_reason(),
        Some(e) if !matches!(e, ConnectionError::Closed(_))
    );
    if peer_fault {
        drop(writing.take());
        drop(sink.take());
        drop(rd);
    }
    // Otherwise flush what is queued (a go-away, the last resets) then close politely,
    // unless the peer has stopped reading.
    let _ = tokio::time::timeout(stall, async {
        if let Some(w) = writing.take() {
            let (s, r) = w.await;
            if r.is_err() {
                return;
            }
            sink = Some(s);
        }
        let Some(mut s) = sink.take() else { return };
        if greeting.is_none() {
            loop {
                let mut buf = BytesMut::new();
                Framer::start(&mut buf);
                if shared
                    .inner
                    .lock()
                    .conn
                    .transmit_into(&mut buf, MAX_BATCH_BYTES + MAX_HEADER_LEN)
                    == 0
                {
                    break;
                }
                framer.seal(OpCode::Binary, &mut buf);
                if s.write_all(&buf).await.is_err() {
                    return;
                }
            }
        }
        let _ = s.write_all(&framer.close(1000)).await;
        let _ = s.shutdown().await;
    })
    .await;
    shared.inner.lock().writer_done = true;
    shared.writer_done_notify.notify_waiters();
}

/// Size of each read from an upgraded connection.
const BRIDGE_READ_CHUNK: usize = 32 * 1024;

/// Joins an upgraded connection (a WebSocket, say) or a raw TCP connection to a stream
/// as a raw bidirectional byte stream. EOF on either side becomes a half-close on the
/// other (the other direction keeps flowing); a reset or an I/O error ends both at
/// once, so a peer waiting to read is not left hanging.
pub async fn bridge<IO>(io: IO, mut tx: StreamSender, mut rx: StreamReceiver)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut r, mut w) = tokio::io::split(io);
    // Each direction returns true when it failed (reset, I/O error): both end then.
    let up = async move {
        let mut buf = BytesMut::with_capacity(BRIDGE_READ_CHUNK);
        loop {
            buf.reserve(BRIDGE_READ_CHUNK);
            match r.read_buf(&mut buf).await {
                Ok(0) => {
                    let _ = tx.finish();
                    return false;
                }
                Ok(_) => {
                    if tx.send_data(buf.split().freeze()).await.is_err() {
                        return true;
                    }
                }
                Err(_) => {
                    tx.reset(ResetCode::Cancel, "upgraded connection failed");
                    return true;
                }
            }
        }
    };
    let down = async move {
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Data(d) => {
                    if w.write_all(&d).await.is_err() {
                        rx.reset(ResetCode::Cancel, "upgraded connection failed");
                        return true;
                    }
                }
                Event::End | Event::Trailers(_) => {
                    let _ = w.shutdown().await;
                    return false;
                }
                Event::Reset(..) => return true,
                Event::Head(_) => {}
            }
        }
        true
    };
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            failed = &mut up, if !up_done => {
                if failed {
                    return;
                }
                up_done = true;
            }
            failed = &mut down, if !down_done => {
                if failed {
                    return;
                }
                down_done = true;
            }
        }
    }
}
