//! Runs the Netbore tunnel protocol over one WebSocket connection.
//!
//! A [`Mux`] owns a WebSocket after the handshake and carries many concurrent streams on
//! it. The edge opens streams with [`Mux::open`]; the agent takes them from
//! [`Incoming`]. Each stream is a [`StreamSender`] and a [`StreamReceiver`], usable from
//! different tasks.
//!
//! Three tasks serve a connection: a reader that decodes frames and routes them to
//! streams, a writer that batches queued frames into as few WebSocket messages as it can
//! (one write per burst, not per frame), and a heartbeat. Memory is bounded by the
//! protocol's credit windows: a sender waits for credit before queuing data, and a
//! receiver returns credit only for bytes its consumer has taken, so a slow viewer or
//! origin never makes either side buffer more than a window.
//!
//! Dropping a [`StreamSender`] that has not finished, or a [`StreamReceiver`] before the
//! peer finished, resets the stream: a forgotten stream frees itself.

pub mod body;
pub mod fair;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use netbore_protocol::{
    AgentStatus, Frame, GoAway, Header, Limits, RecvWindow, RequestHead, ResetCode, ResponseHead,
    StreamEvent, StreamState, decode, encode,
};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Largest data payload put in one frame. Big enough that bulk transfer is not
/// dominated by per-frame cost, small enough that streams interleave fairly.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;

/// The writer stops adding frames to one WebSocket message beyond this many bytes.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// A batch smaller than this (heads, window updates, small bodies) waits for one turn
/// of the scheduler before it is written, so frames queued right behind it share its
/// write. Bulk data is written at once: there the wait only adds delay.
pub const CORK_BELOW: usize = 16 * 1024;

/// The edge stops opening streams on a connection at this id and sends go-away, so
/// ids never wrap (the agent reconnects long before 2^32).
pub const STREAM_ID_RETIRE: u32 = 1 << 31;

/// Frames queued for the writer beyond which the peer is taken to have stopped
/// reading and the connection is closed (data is bounded by the windows and heads by
/// [`MAX_LINK_HEAD_BYTES`]; this bounds the small control frames too, e.g. pongs owed
/// to a peer that pings without reading).
pub const MAX_QUEUED_FRAMES: usize = 65_536;

/// Bytes of heads (request heads on the edge, response heads on the agent) that the
/// open streams of one connection may hold, counting the heads the peer sent us too.
/// Heads are not covered by the credit windows and HTTP/2 header compression lets a
/// viewer turn a few bytes into a 64 KiB head, so without this a flood of requests
/// queues without bound. A new stream beyond it is refused at once (the edge answers
/// 503 `tunnel_busy`; the agent resets a stream the edge opens beyond it with
/// `REFUSED`). 16 MiB holds 256 heads of 64 KiB, or thousands of ordinary ones.
pub const MAX_LINK_HEAD_BYTES: usize = 16 * 1024 * 1024;

/// Default longest time one write to the peer may make no progress before the peer is
/// taken to have stopped reading and the connection is closed. A write is at most one
/// batch ([`MAX_BATCH_BYTES`] plus a frame), so this allows links down to ~10 KB/s.
pub const DEFAULT_WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Missing this many heartbeat intervals without hearing anything from the peer means
/// the link is dead.
pub const HEARTBEAT_MISSES: u32 = 3;

/// Bytes tungstenite allocates up front per connection for reading. A trade between
/// memory per idle tunnel and read syscalls under bulk load.
pub const WS_READ_BUFFER: usize = 32 * 1024;

/// The WebSocket settings both ends use for the tunnel link: messages bounded by
/// `max_message` (a batch plus one frame), and a bounded write buffer so a stalled
/// peer cannot make us queue without limit inside tungstenite.
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

/// Per-stream state shared between the reader and the stream's two handles.
struct StreamCtl {
    id: u32,
    /// Send credit in bytes. Closed when the stream is reset.
    send_credit: Semaphore,
    recv_window: Mutex<RecvWindow>,
    reset: AtomicBool,
    /// The receiver was dropped before the peer finished; reset once we finish too.
    recv_dropped: AtomicBool,
    /// The stream was reset before its head was written: the writer dropped the head,
    /// so it drops every later frame of the stream too (the peer never heard of it).
    unsent: AtomicBool,
    /// Bytes of heads this stream holds against [`MAX_LINK_HEAD_BYTES`].
    head_bytes: std::sync::atomic::AtomicUsize,
    /// Its ticket in the link's [`fair::FairOpen`] until the response head arrives or
    /// the stream ends (0: none, or already answered).
    pipe_ticket: AtomicU64,
}

/// A frame waiting for the writer, with the stream it belongs to (when it has one) so
/// frames of a stream abandoned before its head left are dropped, not sent.
struct Out {
    frame: Frame,
    ctl: Option<Arc<StreamCtl>>,
    len: usize,
}

struct Entry {
    tx: mpsc::UnboundedSender<Event>,
    ctl: Arc<StreamCtl>,
    state: StreamState,
    local_done: bool,
}

struct Shared {
    cfg: MuxConfig,
    out: mpsc::UnboundedSender<Out>,
    streams: Mutex<HashMap<u32, Entry>>,
    next_id: AtomicU32,
    last_remote_id: AtomicU32,
    conn_credit: Semaphore,
    conn_recv: Mutex<RecvWindow>,
    cancel: CancellationToken,
    close_reason: Mutex<Option<String>>,
    going_away: AtomicBool,
    going_away_notify: Notify,
    idle_notify: Notify,
    started: Instant,
    last_heard_ms: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    queued: std::sync::atomic::AtomicUsize,
    /// Encoded bytes waiting for the writer, and the most there ever were.
    queued_bytes: std::sync::atomic::AtomicUsize,
    peak_queued_bytes: std::sync::atomic::AtomicUsize,
    /// Bytes of heads held by open streams (see [`MAX_LINK_HEAD_BYTES`]).
    head_bytes: std::sync::atomic::AtomicUsize,
    writer_done: AtomicBool,
    writer_done_notify: Notify,
    /// Admission of request heads, fair between clients ([`Mux::open_fair`]).
    gate: Mutex<Gate>,
    /// The agent's last AGENT_STATUS (edge side), with the Unix time it arrived.
    agent_status: Mutex<Option<(AgentStatus, u64)>>,
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
fn gate_now() -> Instant {
    tokio::time::Instant::now().into_std()
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
        {
            let mut g = self.shared.gate.lock();
            g.waiters.remove(&self.ticket);
            let admitted = g.fair.cancel(self.ticket, gate_now());
            g.wake(admitted);
        }
        self.shared.release_head_bytes(self.head_bytes);
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
    rx: mpsc::Receiver<IncomingStream>,
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

impl Mux {
    /// Starts serving `ws` (already past the handshake). Returns the handle and, for the
    /// agent role, the stream of incoming streams. The connection closes when `cancel`
    /// fires, the peer goes away, or the link dies.
    pub fn start<S>(
        ws: WebSocketStream<S>,
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
        ws: WebSocketStream<S>,
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
        ws: WebSocketStream<S>,
        cfg: MuxConfig,
        cancel: CancellationToken,
        greeting: Option<(String, tokio::sync::oneshot::Receiver<()>)>,
    ) -> (Mux, Option<Incoming>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let limits = cfg.limits;
        let role = cfg.role;
        let shared = Arc::new(Shared {
            out: out_tx,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            last_remote_id: AtomicU32::new(0),
            conn_credit: Semaphore::new(limits.connection_window as usize),
            conn_recv: Mutex::new(RecvWindow::new(limits.connection_window)),
            cancel,
            close_reason: Mutex::new(None),
            going_away: AtomicBool::new(false),
            going_away_notify: Notify::new(),
            agent_status: Mutex::new(None),
            agent_status_changed: Notify::new(),
            idle_notify: Notify::new(),
            started: Instant::now(),
            last_heard_ms: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            queued: std::sync::atomic::AtomicUsize::new(0),
            queued_bytes: std::sync::atomic::AtomicUsize::new(0),
            peak_queued_bytes: std::sync::atomic::AtomicUsize::new(0),
            head_bytes: std::sync::atomic::AtomicUsize::new(0),
            writer_done: AtomicBool::new(false),
            writer_done_notify: Notify::new(),
            gate: Mutex::new(Gate::default()),
            cfg,
        });
        let (accept_tx, incoming) = if role == Role::Agent {
            let (tx, rx) = mpsc::channel(limits.max_concurrent_streams.max(1) as usize);
            (Some(tx), Some(Incoming { rx }))
        } else {
            (None, None)
        };
        let (sink, stream) = ws.split();
        let mux = Mux {
            shared: shared.clone(),
        };
        tokio::spawn(writer(shared.clone(), sink, out_rx, greeting));
        tokio::spawn(reader(shared.clone(), stream, accept_tx));
        tokio::spawn(heartbeat(shared));
        (mux, incoming)
    }

    /// Opens a stream carrying `head` (edge side). Returns immediately; the request
    /// head is queued for the writer.
    pub fn open(
        &self,
        head: RequestHead,
        end_stream: bool,
    ) -> Result<(StreamSender, StreamReceiver), MuxError> {
        self.open_inner(head, end_stream, None)
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
        let (head, head_len) = self.check_head(head, end_stream)?;
        if !sh.take_head_bytes(head_len) {
            return Err(MuxError::Refused(
                "the connection holds its limit of request head bytes",
            ));
        }
        let mut admission = Admission {
            shared: sh.clone(),
            ticket: 0,
            head_bytes: head_len,
            opened: false,
        };
        let waiting = {
            let mut g = sh.gate.lock();
            let (ticket, admitted) = g.fair.arrive(class, head_len, gate_now());
            admission.ticket = ticket;
            let now = admitted.contains(&ticket);
            g.wake(admitted);
            (!now).then(|| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                g.waiters.insert(ticket, tx);
                rx
            })
        };
        if let Some(mut rx) = waiting {
            loop {
                let next = sh.gate.lock().fair.next_expiry();
                let aged = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = &mut rx => match r {
                        Ok(()) => break,
                        Err(_) => return Err(MuxError::Closed(self.close_reason())),
                    },
                    _ = aged => {
                        let mut g = sh.gate.lock();
                        let admitted = g.fair.expire(gate_now());
                        g.wake(admitted);
                    }
                    _ = sh.cancel.cancelled() => return Err(MuxError::Closed(self.close_reason())),
                }
            }
        }
        let opened = self.open_inner(head, end_stream, Some((admission.ticket, head_len)))?;
        // The stream holds the ticket and the head bytes now.
        admission.opened = true;
        Ok(opened)
    }

    /// Checks that a stream can be opened with `head`; returns it with its encoded size.
    fn check_head(
        &self,
        head: RequestHead,
        end_stream: bool,
    ) -> Result<(RequestHead, usize), MuxError> {
        let sh = &self.shared;
        if sh.cancel.is_cancelled() {
            return Err(MuxError::Closed(self.close_reason()));
        }
        if sh.going_away.load(Ordering::Acquire) {
            return Err(MuxError::Refused("the connection is going away"));
        }
        let probe = Frame::RequestHead {
            stream_id: 1,
            head,
            end_stream,
        };
        netbore_protocol::frame::check_encodable(&probe, sh.cfg.limits.max_frame_len as usize)
            .map_err(MuxError::TooLarge)?;
        let probe_len = probe.encoded_len();
        let Frame::RequestHead { head, .. } = probe else {
            unreachable!("built above")
        };
        Ok((head, probe_len))
    }

    /// Opens a stream; `admitted` is its ticket and the head bytes already taken when
    /// it came through [`Mux::open_fair`] (on an error the caller still owns both).
    fn open_inner(
        &self,
        head: RequestHead,
        end_stream: bool,
        admitted: Option<(fair::Ticket, usize)>,
    ) -> Result<(StreamSender, StreamReceiver), MuxError> {
        let sh = &self.shared;
        let (head, probe_len) = match admitted {
            Some((_, len)) => {
                // It may have waited: the connection can have closed meanwhile.
                if sh.cancel.is_cancelled() {
                    return Err(MuxError::Closed(self.close_reason()));
                }
                if sh.going_away.load(Ordering::Acquire) {
                    return Err(MuxError::Refused("the connection is going away"));
                }
                (head, len)
            }
            None => self.check_head(head, end_stream)?,
        };
        let prepaid = admitted.is_some();
        let ticket = admitted.map_or(0, |(t, _)| t);
        let mut state = StreamState::new();
        state
            .on_send(StreamEvent::Head { end_stream })
            .map_err(|e| MuxError::Misuse(e.to_string()))?;
        let head_len = probe_len;
        let (tx, rx) = mpsc::unbounded_channel();
        // The id is taken and the head queued under one lock, so heads reach the wire
        // in id order (the agent refuses an id that is not above the last one).
        let ctl = {
            let mut streams = sh.streams.lock();
            if streams.len() >= sh.cfg.limits.max_concurrent_streams as usize {
                return Err(MuxError::Refused("too many concurrent streams"));
            }
            if !prepaid && !sh.take_head_bytes(head_len) {
                return Err(MuxError::Refused(
                    "the connection holds its limit of request head bytes",
                ));
            }
            let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
            if id >= STREAM_ID_RETIRE {
                drop(streams);
                if !prepaid {
                    sh.release_head_bytes(head_len);
                }
                // Ids are running out: move the agent to a fresh connection first.
                self.go_away("stream ids exhausted; reconnect");
                return Err(MuxError::Refused("the connection is going away"));
            }
            let ctl = new_ctl(id, &sh.cfg.limits, head_len);
            ctl.pipe_ticket.store(ticket, Ordering::Release);
            streams.insert(
                id,
                Entry {
                    tx,
                    ctl: ctl.clone(),
                    state,
                    local_done: end_stream,
                },
            );
            if let Err(e) = sh.send_for(
                Frame::RequestHead {
                    stream_id: id,
                    head,
                    end_stream,
                },
                &ctl,
            ) {
                streams.remove(&id);
                if !prepaid {
                    sh.release_head_bytes(head_len);
                }
                return Err(e);
            }
            ctl
        };
        Ok(self.handles(ctl, rx, state))
    }

    fn handles(
        &self,
        ctl: Arc<StreamCtl>,
        rx: mpsc::UnboundedReceiver<Event>,
        state: StreamState,
    ) -> (StreamSender, StreamReceiver) {
        (
            StreamSender {
                shared: self.shared.clone(),
                ctl: ctl.clone(),
                state,
            },
            StreamReceiver {
                shared: self.shared.clone(),
                ctl,
                rx,
                finished: false,
            },
        )
    }

    /// Tells the agent this edge is leaving (edge side). No new streams are opened
    /// here afterwards; open ones run to completion.
    pub fn go_away(&self, message: &str) {
        let sh = &self.shared;
        if !sh.going_away.swap(true, Ordering::AcqRel) {
            let _ = sh.send(Frame::GoAway(GoAway {
                last_stream_id: sh.next_id.load(Ordering::Relaxed).saturating_sub(1),
                message: message.to_string(),
            }));
            sh.going_away_notify.notify_waiters();
        }
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
        let _ = self.shared.send(Frame::AgentStatus(status));
    }

    /// The agent's last AGENT_STATUS and the Unix time it arrived (edge side); `None`
    /// until one arrives (older agents never send one).
    pub fn agent_status(&self) -> Option<(AgentStatus, u64)> {
        self.shared.agent_status.lock().clone()
    }

    /// Resolves when the agent's origin turned healthy or unhealthy, or reported for
    /// the first time, since the last call (edge side).
    pub async fn agent_status_changed(&self) {
        self.shared.agent_status_changed.notified().await;
    }

    /// True once either side announced go-away.
    pub fn is_going_away(&self) -> bool {
        self.shared.going_away.load(Ordering::Acquire)
    }

    /// Resolves when the peer (or we) announced go-away, or the connection closed.
    pub async fn going_away(&self) {
        let sh = &self.shared;
        loop {
            let notified = sh.going_away_notify.notified();
            if sh.going_away.load(Ordering::Acquire) || sh.cancel.is_cancelled() {
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
                if sh.writer_done.load(Ordering::Acquire) {
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
        self.shared.close_reason.lock().clone().unwrap_or_default()
    }

    /// Streams currently open on this connection.
    pub fn open_streams(&self) -> usize {
        self.shared.streams.lock().len()
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
        (
            self.shared.bytes_in.load(Ordering::Relaxed),
            self.shared.bytes_out.load(Ordering::Relaxed),
        )
    }

    /// The label given in the config (the session id).
    pub fn label(&self) -> &str {
        &self.shared.cfg.label
    }

    /// Encoded bytes waiting to be written to the peer now, and the most there have
    /// ever been on this connection.
    pub fn queued_bytes(&self) -> (usize, usize) {
        (
            self.shared.queued_bytes.load(Ordering::Relaxed),
            self.shared.peak_queued_bytes.load(Ordering::Relaxed),
        )
    }

    /// Request heads waiting for their turn in [`Mux::open_fair`].
    pub fn waiting_heads(&self) -> usize {
        self.shared.gate.lock().fair.waiting()
    }

    /// Bytes of heads held by this connection's open streams (at most
    /// [`MAX_LINK_HEAD_BYTES`]).
    pub fn head_bytes(&self) -> usize {
        self.shared.head_bytes.load(Ordering::Relaxed)
    }
}

fn new_ctl(id: u32, limits: &Limits, head_bytes: usize) -> Arc<StreamCtl> {
    Arc::new(StreamCtl {
        id,
        send_credit: Semaphore::new(limits.initial_stream_window as usize),
        recv_window: Mutex::new(RecvWindow::new(limits.initial_stream_window)),
        reset: AtomicBool::new(false),
        recv_dropped: AtomicBool::new(false),
        unsent: AtomicBool::new(false),
        head_bytes: std::sync::atomic::AtomicUsize::new(head_bytes),
        pipe_ticket: AtomicU64::new(0),
    })
}

impl Shared {
    fn send(&self, frame: Frame) -> Result<(), MuxError> {
        self.enqueue(frame, None)
    }

    /// Queues a frame of the stream `ctl`.
    fn send_for(&self, frame: Frame, ctl: &Arc<StreamCtl>) -> Result<(), MuxError> {
        self.enqueue(frame, Some(ctl.clone()))
    }

    fn enqueue(&self, frame: Frame, ctl: Option<Arc<StreamCtl>>) -> Result<(), MuxError> {
        let closed = || MuxError::Closed(self.close_reason.lock().clone().unwrap_or_default());
        if self.queued.load(Ordering::Relaxed) >= MAX_QUEUED_FRAMES {
            // Closing here could take the streams lock a caller holds: only mark the
            // connection closed; the reader's exit resets the streams.
            self.mark_closed("the peer stopped reading: too many frames queued for it");
            return Err(closed());
        }
        let len = frame.encoded_len();
        self.queued.fetch_add(1, Ordering::Relaxed);
        let now = self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        self.peak_queued_bytes.fetch_max(now, Ordering::Relaxed);
        self.out.send(Out { frame, ctl, len }).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            closed()
        })
    }

    /// Takes `n` bytes of the head budget, or returns false when it is spent.
    fn take_head_bytes(&self, n: usize) -> bool {
        self.head_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + n <= MAX_LINK_HEAD_BYTES).then_some(held + n)
            })
            .is_ok()
    }

    fn release_head_bytes(&self, n: usize) {
        self.head_bytes.fetch_sub(n, Ordering::AcqRel);
    }

    /// Forgets a stream: releases what it held.
    fn forget(&self, e: &Entry) {
        self.release_head_bytes(e.ctl.head_bytes.swap(0, Ordering::AcqRel));
        self.answered(&e.ctl);
    }

    /// The stream's head was answered (or the stream ended): its bytes leave the
    /// gate's pipe, and the next waiting heads go.
    fn answered(&self, ctl: &StreamCtl) {
        let ticket = ctl.pipe_ticket.swap(0, Ordering::AcqRel);
        if ticket != 0 {
            let mut g = self.gate.lock();
            let admitted = g.fair.answered(ticket, gate_now());
            g.wake(admitted);
        }
    }

    /// Records why and cancels, without touching the streams (see [`Shared::close`]).
    fn mark_closed(&self, reason: &str) {
        {
            let mut r = self.close_reason.lock();
            if r.is_none() {
                *r = Some(reason.to_string());
            }
        }
        self.cancel.cancel();
    }

    fn close(&self, reason: &str) {
        {
            let mut r = self.close_reason.lock();
            if r.is_none() {
                *r = Some(reason.to_string());
            }
        }
        self.cancel.cancel();
        let drained: Vec<Entry> = self.streams.lock().drain().map(|(_, e)| e).collect();
        for e in drained {
            e.ctl.reset.store(true, Ordering::Release);
            self.forget(&e);
            e.ctl.send_credit.close();
            let _ = e.tx.send(Event::Reset(
                ResetCode::Cancel,
                format!("tunnel connection closed: {reason}"),
            ));
        }
        self.conn_credit.close();
        self.going_away_notify.notify_waiters();
        self.idle_notify.notify_waiters();
    }

    /// Marks our half done; forgets the stream when both halves are.
    fn local_done(&self, id: u32) {
        let mut streams = self.streams.lock();
        if let Some(e) = streams.get_mut(&id) {
            e.local_done = true;
            if e.state.remote() == netbore_protocol::stream::Half::Closed {
                if let Some(e) = streams.remove(&id) {
                    self.forget(&e);
                }
                if streams.is_empty() {
                    self.idle_notify.notify_waiters();
                }
            } else if e.ctl.recv_dropped.load(Ordering::Acquire) {
                drop(streams);
                self.reset_stream(id, ResetCode::Cancel, "nobody reads the rest of the stream");
            }
        }
    }

    fn is_local_done(&self, id: u32) -> bool {
        self.streams.lock().get(&id).is_none_or(|e| e.local_done)
    }

    /// Resets a stream from our side: tells the peer, fails our handles.
    fn reset_stream(&self, id: u32, code: ResetCode, message: &str) {
        let entry = self.streams.lock().remove(&id);
        let frame = Frame::Reset {
            stream_id: id,
            code,
            message: message.to_string(),
        };
        if let Some(e) = entry {
            e.ctl.reset.store(true, Ordering::Release);
            self.forget(&e);
            e.ctl.send_credit.close();
            let _ = e.tx.send(Event::Reset(code, message.to_string()));
            if self.streams.lock().is_empty() {
                self.idle_notify.notify_waiters();
            }
            let _ = self.send_for(frame, &e.ctl);
        } else {
            let _ = self.send(frame);
        }
    }

    fn credit_connection(&self, n: usize) {
        if n == 0 {
            return;
        }
        let inc = self.conn_recv.lock().on_consumed(n);
        if let Some(increment) = inc {
            let _ = self.send(Frame::WindowUpdate {
                stream_id: 0,
                increment,
            });
        }
    }

    fn heard(&self) {
        self.last_heard_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Sends one direction of a stream.
pub struct StreamSender {
    shared: Arc<Shared>,
    ctl: Arc<StreamCtl>,
    state: StreamState,
}

impl StreamSender {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.ctl.id
    }

    fn check(&mut self, ev: StreamEvent) -> Result<(), MuxError> {
        if self.ctl.reset.load(Ordering::Acquire) {
            return Err(MuxError::Reset {
                code: ResetCode::Cancel,
                message: "stream was reset".into(),
            });
        }
        self.state
            .on_send(ev)
            .map_err(|e| MuxError::Misuse(e.to_string()))
    }

    fn after_send(&mut self) {
        if self.state.local() == netbore_protocol::stream::Half::Closed {
            self.shared.local_done(self.ctl.id);
        }
    }

    /// Sends the response head (agent side).
    pub fn send_response(&mut self, head: ResponseHead, end_stream: bool) -> Result<(), MuxError> {
        let frame = Frame::ResponseHead {
            stream_id: self.ctl.id,
            head,
            end_stream,
        };
        netbore_protocol::frame::check_encodable(
            &frame,
            self.shared.cfg.limits.max_frame_len as usize,
        )
        .map_err(MuxError::TooLarge)?;
        self.check(StreamEvent::Head { end_stream })?;
        let len = frame.encoded_len();
        if !self.shared.take_head_bytes(len) {
            // The caller resets the stream, as for any failed send.
            return Err(MuxError::Refused(
                "the connection holds its limit of head bytes",
            ));
        }
        self.ctl.head_bytes.fetch_add(len, Ordering::AcqRel);
        if self.ctl.reset.load(Ordering::Acquire) {
            // Reset meanwhile: its entry may already be forgotten, so release here
            // (the swap makes sure the bytes are released once).
            self.shared
                .release_head_bytes(self.ctl.head_bytes.swap(0, Ordering::AcqRel));
        }
        self.shared.send_for(frame, &self.ctl)?;
        self.after_send();
        Ok(())
    }

    /// Sends body bytes, waiting for credit as needed, split into frames of at most
    /// [`MAX_DATA_CHUNK`] bytes.
    pub async fn send_data(&mut self, mut data: Bytes) -> Result<(), MuxError> {
        if self.state.local() != netbore_protocol::stream::Half::Body {
            self.check(StreamEvent::Data { end_stream: false })?;
        }
        while !data.is_empty() {
            let want = data.len().min(MAX_DATA_CHUNK);
            let n = self.acquire_credit(want).await?;
            let chunk = data.split_to(n);
            self.shared.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            self.shared.send_for(
                Frame::Data {
                    stream_id: self.ctl.id,
                    data: chunk,
                    end_stream: false,
                },
                &self.ctl,
            )?;
        }
        Ok(())
    }

    /// Sends the last body bytes and ends our half in the same frame, saving the
    /// separate empty end-of-stream frame (and often a WebSocket message) per response.
    pub async fn send_data_and_finish(&mut self, mut data: Bytes) -> Result<(), MuxError> {
        if data.is_empty() {
            return self.finish();
        }
        if self.state.local() != netbore_protocol::stream::Half::Body {
            self.check(StreamEvent::Data { end_stream: false })?;
        }
        while !data.is_empty() {
            let want = data.len().min(MAX_DATA_CHUNK);
            let n = self.acquire_credit(want).await?;
            let chunk = data.split_to(n);
            let end_stream = data.is_empty();
            if end_stream {
                self.check(StreamEvent::Data { end_stream: true })?;
            }
            self.shared.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            self.shared.send_for(
                Frame::Data {
                    stream_id: self.ctl.id,
                    data: chunk,
                    end_stream,
                },
                &self.ctl,
            )?;
        }
        self.after_send();
        Ok(())
    }

    /// Takes between 1 and `want` bytes of both stream and connection credit.
    async fn acquire_credit(&self, want: usize) -> Result<usize, MuxError> {
        let closed = || MuxError::Reset {
            code: ResetCode::Cancel,
            message: "stream was reset or its connection closed".into(),
        };
        let n = take_some(&self.ctl.send_credit, want)
            .await
            .ok_or_else(closed)?;
        let m = take_some(&self.shared.conn_credit, n)
            .await
            .ok_or_else(closed)?;
        if m < n {
            self.ctl.send_credit.add_permits(n - m);
        }
        Ok(m)
    }

    /// Ends our half with trailers.
    pub fn send_trailers(&mut self, headers: Vec<Header>) -> Result<(), MuxError> {
        let frame = Frame::Trailers {
            stream_id: self.ctl.id,
            headers,
        };
        netbore_protocol::frame::check_encodable(
            &frame,
            self.shared.cfg.limits.max_frame_len as usize,
        )
        .map_err(MuxError::TooLarge)?;
        self.check(StreamEvent::Trailers)?;
        self.shared.send_for(frame, &self.ctl)?;
        self.after_send();
        Ok(())
    }

    /// Ends our half cleanly.
    pub fn finish(&mut self) -> Result<(), MuxError> {
        self.check(StreamEvent::Data { end_stream: true })?;
        self.shared.send_for(
            Frame::Data {
                stream_id: self.ctl.id,
                data: Bytes::new(),
                end_stream: true,
            },
            &self.ctl,
        )?;
        self.after_send();
        Ok(())
    }

    /// Abandons the stream in both directions.
    pub fn reset(&mut self, code: ResetCode, message: &str) {
        if !self.ctl.reset.load(Ordering::Acquire) && !self.state.is_closed() {
            let _ = self.state.on_send(StreamEvent::Reset);
            self.shared.reset_stream(self.ctl.id, code, message);
        }
    }

    /// True once our half is finished or the stream was reset.
    pub fn is_done(&self) -> bool {
        self.state.local() == netbore_protocol::stream::Half::Closed
            || self.ctl.reset.load(Ordering::Acquire)
    }
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

async fn take_some(sem: &Semaphore, want: usize) -> Option<usize> {
    let first = sem.acquire().await.ok()?;
    first.forget();
    let extra = (want - 1).min(sem.available_permits());
    if extra > 0
        && let Ok(p) = sem.try_acquire_many(extra as u32)
    {
        p.forget();
        return Some(1 + extra);
    }
    Some(1)
}

/// Receives one direction of a stream.
pub struct StreamReceiver {
    shared: Arc<Shared>,
    ctl: Arc<StreamCtl>,
    rx: mpsc::UnboundedReceiver<Event>,
    finished: bool,
}

impl StreamReceiver {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.ctl.id
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
                    "tunnel connection closed".into(),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Abandons the stream in both directions (e.g. the viewer stopped waiting).
    pub fn reset(&mut self, code: ResetCode, message: &str) {
        if !self.ctl.reset.load(Ordering::Acquire) {
            self.finished = true;
            self.shared.reset_stream(self.ctl.id, code, message);
        }
    }

    fn consumed(&self, n: usize) {
        let inc = self.ctl.recv_window.lock().on_consumed(n);
        if let Some(increment) = inc {
            let _ = self.shared.send_for(
                Frame::WindowUpdate {
                    stream_id: self.ctl.id,
                    increment,
                },
                &self.ctl,
            );
        }
        self.shared.credit_connection(n);
    }
}

impl Drop for StreamReceiver {
    fn drop(&mut self) {
        // Return the connection credit held by data nobody will read.
        let mut unread = 0;
        while let Ok(ev) = self.rx.try_recv() {
            match ev {
                Event::Data(d) => unread += d.len(),
                Event::End | Event::Trailers(_) | Event::Reset(..) => self.finished = true,
                Event::Head(_) => {}
            }
        }
        self.shared.credit_connection(unread);
        if !self.finished && !self.ctl.reset.load(Ordering::Acquire) {
            // While we are still answering, only stop reading: the reply may go on (an
            // origin that answers before reading the whole upload). Reset once both
            // halves are of no more use.
            self.ctl.recv_dropped.store(true, Ordering::Release);
            if !self.shared.is_local_done(self.ctl.id) {
                return;
            }
            self.shared.reset_stream(
                self.ctl.id,
                ResetCode::Cancel,
                "receiver dropped before the end of the stream",
            );
        }
    }
}

async fn writer<S>(
    shared: Arc<Shared>,
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    greeting: Option<(String, tokio::sync::oneshot::Receiver<()>)>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stall = shared.cfg.write_stall_timeout;
    if let Some((text, gate)) = greeting {
        let released = tokio::select! {
            r = gate => r.is_ok(),
            _ = shared.cancel.cancelled() => false,
        };
        if !released {
            shared.close("greeting withheld");
            let _ = sink.close().await;
            return;
        }
        if let Err(e) = sink.send(Message::text(text)).await {
            shared.close(&format!("write failed: {e}"));
            return;
        }
    }
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        let first = tokio::select! {
            biased;
            f = rx.recv() => f,
            _ = shared.cancel.cancelled() => None,
        };
        let Some(first) = first else { break };
        put(&shared, first, &mut buf);
        drain_into(&shared, &mut rx, &mut buf);
        if buf.len() < CORK_BELOW {
            // Let the tasks that are about to queue more run first (a response's data
            // right behind its head, other streams' frames), so that one write carries
            // them all instead of one write per tiny frame.
            tokio::task::yield_now().await;
            drain_into(&shared, &mut rx, &mut buf);
        }
        if buf.is_empty() {
            continue; // every frame belonged to abandoned streams
        }
        let msg = Message::Binary(buf.split().freeze());
        match tokio::time::timeout(stall, sink.send(msg)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shared.close(&format!("write failed: {e}"));
                break;
            }
            Err(_) => {
                warn!(session = %shared.cfg.label, ?stall, "the peer stopped reading; closing the tunnel connection");
                shared.close(&format!(
                    "the peer stopped reading: a write made no progress for {stall:?}"
                ));
                break;
            }
        }
        if buf.capacity() > 4 * MAX_BATCH_BYTES {
            buf = BytesMut::with_capacity(16 * 1024);
        }
    }
    // Flush what is queued (a go-away or resets) then close politely, unless the peer
    // has stopped reading.
    while let Ok(out) = rx.try_recv() {
        put(&shared, out, &mut buf);
    }
    let _ = tokio::time::timeout(stall, async {
        if !buf.is_empty() {
            let _ = sink.send(Message::Binary(buf.split().freeze())).await;
        }
        let _ = sink.close().await;
    })
    .await;
    shared.writer_done.store(true, Ordering::Release);
    shared.writer_done_notify.notify_waiters();
}

/// Encodes one queued frame into `buf`, unless its stream was abandoned before its
/// head was written: then neither the head nor anything after it is sent (the peer
/// never hears of the stream), and the connection credit its data took comes back.
fn put(shared: &Shared, out: Out, buf: &mut BytesMut) {
    shared.queued.fetch_sub(1, Ordering::Relaxed);
    shared.queued_bytes.fetch_sub(out.len, Ordering::Relaxed);
    if let Some(ctl) = &out.ctl {
        let is_head = matches!(
            out.frame,
            Frame::RequestHead { .. } | Frame::ResponseHead { .. }
        );
        if is_head && ctl.reset.load(Ordering::Acquire) {
            ctl.unsent.store(true, Ordering::Release);
        }
        if ctl.unsent.load(Ordering::Acquire) {
            if let Frame::Data { data, .. } = &out.frame
                && !data.is_empty()
            {
                shared.conn_credit.add_permits(data.len());
            }
            return;
        }
    }
    encode(&out.frame, buf);
}

/// Encodes queued frames into `buf` until the queue is empty or the batch is full.
fn drain_into(shared: &Shared, rx: &mut mpsc::UnboundedReceiver<Out>, buf: &mut BytesMut) {
    while buf.len() < MAX_BATCH_BYTES {
        match rx.try_recv() {
            Ok(out) => put(shared, out, buf),
            Err(_) => break,
        }
    }
}

async fn reader<S>(
    shared: Arc<Shared>,
    mut stream: futures_util::stream::SplitStream<WebSocketStream<S>>,
    accept: Option<mpsc::Sender<IncomingStream>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let max_len = shared.cfg.limits.max_frame_len as usize;
    let reason = loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = shared.cancel.cancelled() => break "closed locally".to_string(),
        };
        let msg = match msg {
            None => break "peer closed the connection".to_string(),
            Some(Err(e)) => break format!("read failed: {e}"),
            Some(Ok(m)) => m,
        };
        shared.heard();
        let data = match msg {
            Message::Binary(b) => b,
            Message::Close(_) => break "peer closed the connection".to_string(),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            Message::Text(_) => break "protocol error: text message after the handshake".into(),
        };
        // Decoded in place: data payloads share the message's allocation (turning it
        // into a `BytesMut` would copy the whole message, as tungstenite still holds
        // the rest of its read buffer).
        let mut buf: Bytes = data;
        let mut fatal = None;
        loop {
            match decode(&mut buf, max_len) {
                Ok(Some(frame)) => {
                    if let Err(e) = dispatch(&shared, frame, accept.as_ref()).await {
                        fatal = Some(e);
                        break;
                    }
                }
                Ok(None) => {
                    if !buf.is_empty() {
                        fatal = Some(format!(
                            "protocol error: {} bytes of a partial frame at the end of a message",
                            buf.len()
                        ));
                    }
                    break;
                }
                Err(
                    e @ netbore_protocol::DecodeError::TooManyHeaders {
                        frame,
                        stream_id,
                        frame_len,
                        ..
                    },
                ) => {
                    // The frame is whole: skip it and refuse its stream alone.
                    buf.advance(frame_len);
                    if let Err(reason) = refuse_oversized(&shared, frame, stream_id, &e) {
                        fatal = Some(reason);
                        break;
                    }
                }
                Err(e) => {
                    fatal = Some(format!("protocol error: {e}"));
                    break;
                }
            }
        }
        if let Some(reason) = fatal {
            warn!(session = %shared.cfg.label, %reason, "closing tunnel connection");
            break reason;
        }
    };
    debug!(session = %shared.cfg.label, %reason, "tunnel connection reader finished");
    shared.close(&reason);
}

/// Refuses the stream of a head or trailer block that had too many fields
/// ([`netbore_protocol::MAX_HEADER_FIELDS`]); an error is a connection-level violation.
fn refuse_oversized(
    shared: &Arc<Shared>,
    frame: netbore_protocol::FrameType,
    stream_id: u32,
    e: &netbore_protocol::DecodeError,
) -> Result<(), String> {
    use netbore_protocol::FrameType;
    let message = e.to_string();
    warn!(session = %shared.cfg.label, %message, "refusing a stream");
    match frame {
        FrameType::RequestHead => {
            if shared.cfg.role != Role::Agent {
                return Err("protocol error: the agent sent a request head".into());
            }
            if stream_id <= shared.last_remote_id.swap(stream_id, Ordering::AcqRel) {
                return Err(format!(
                    "protocol error: stream id {stream_id} is not above the last one"
                ));
            }
            // The stream never opened here: only the peer needs to hear of it.
            let _ = shared.send(Frame::Reset {
                stream_id,
                code: ResetCode::TooLarge,
                message,
            });
        }
        _ => shared.reset_stream(stream_id, ResetCode::TooLarge, &message),
    }
    Ok(())
}

/// Routes one frame; an error is a connection-level protocol violation.
async fn dispatch(
    shared: &Arc<Shared>,
    frame: Frame,
    accept: Option<&mpsc::Sender<IncomingStream>>,
) -> Result<(), String> {
    let frame_len = frame.encoded_len();
    match frame {
        Frame::RequestHead {
            stream_id,
            head,
            end_stream,
        } => {
            let Some(accept) = accept else {
                return Err("protocol error: the agent sent a request head".into());
            };
            if stream_id <= shared.last_remote_id.swap(stream_id, Ordering::AcqRel) {
                return Err(format!(
                    "protocol error: stream id {stream_id} is not above the last one"
                ));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let ctl = new_ctl(stream_id, &shared.cfg.limits, frame_len);
            let mut state = StreamState::new();
            let _ = state.on_recv(StreamEvent::Head { end_stream });
            {
                let mut streams = shared.streams.lock();
                let refusal = if streams.len() >= shared.cfg.limits.max_concurrent_streams as usize
                {
                    Some("agent is at its concurrent stream limit")
                } else if !shared.take_head_bytes(frame_len) {
                    Some("agent holds its limit of request head bytes on this connection")
                } else {
                    None
                };
                if let Some(message) = refusal {
                    drop(streams);
                    let _ = shared.send(Frame::Reset {
                        stream_id,
                        code: ResetCode::Refused,
                        message: message.into(),
                    });
                    return Ok(());
                }
                streams.insert(
                    stream_id,
                    Entry {
                        tx: tx.clone(),
                        ctl: ctl.clone(),
                        state,
                        local_done: false,
                    },
                );
            }
            if end_stream {
                let _ = tx.send(Event::End);
            }
            let mux = Mux {
                shared: shared.clone(),
            };
            let mut local = StreamState::new();
            let _ = local.on_recv(StreamEvent::Head { end_stream });
            let (sender, receiver) = mux.handles(ctl, rx, local);
            let incoming = IncomingStream {
                head,
                end_stream,
                sender,
                receiver,
            };
            if accept.send(incoming).await.is_err() {
                return Err("agent stopped accepting streams".into());
            }
        }
        Frame::ResponseHead {
            stream_id,
            head,
            end_stream,
        } => {
            if accept.is_some() {
                return Err("protocol error: the edge sent a response head".into());
            }
            on_stream_frame(
                shared,
                stream_id,
                StreamEvent::Head { end_stream },
                Some(Event::Head(head)),
                0,
            );
        }
        Frame::Data {
            stream_id,
            data,
            end_stream,
        } => {
            let len = data.len();
            if let Err(e) = shared.conn_recv.lock().on_data(len) {
                return Err(format!("flow control error on the connection: {e}"));
            }
            shared.bytes_in.fetch_add(len as u64, Ordering::Relaxed);
            let ev = if len > 0 {
                Some(Event::Data(data))
            } else {
                None
            };
            on_stream_frame(shared, stream_id, StreamEvent::Data { end_stream }, ev, len);
        }
        Frame::Trailers { stream_id, headers } => {
            on_stream_frame(
                shared,
                stream_id,
                StreamEvent::Trailers,
                Some(Event::Trailers(headers)),
                0,
            );
        }
        Frame::Reset {
            stream_id,
            code,
            message,
        } => {
            let entry = shared.streams.lock().remove(&stream_id);
            if let Some(e) = entry {
                e.ctl.reset.store(true, Ordering::Release);
                shared.forget(&e);
                e.ctl.send_credit.close();
                let _ = e.tx.send(Event::Reset(code, message));
                if shared.streams.lock().is_empty() {
                    shared.idle_notify.notify_waiters();
                }
            }
        }
        Frame::WindowUpdate {
            stream_id,
            increment,
        } => {
            if stream_id == 0 {
                if shared.conn_credit.available_permits() + increment as usize
                    > netbore_protocol::flow::MAX_WINDOW as usize
                {
                    return Err("flow control error: connection window overflow".into());
                }
                shared.conn_credit.add_permits(increment as usize);
            } else {
                let ctl = shared.streams.lock().get(&stream_id).map(|e| e.ctl.clone());
                if let Some(ctl) = ctl {
                    if ctl.send_credit.available_permits() + increment as usize
                        > netbore_protocol::flow::MAX_WINDOW as usize
                    {
                        shared.reset_stream(
                            stream_id,
                            ResetCode::FlowControl,
                            "window update overflows the stream window",
                        );
                    } else {
                        ctl.send_credit.add_permits(increment as usize);
                    }
                }
            }
        }
        Frame::Ping { payload } => {
            if shared.queued.load(Ordering::Relaxed) > MAX_QUEUED_FRAMES {
                return Err("the peer sends but does not read; closing".into());
            }
            let _ = shared.send(Frame::Pong { payload });
        }
        Frame::Pong { .. } => {}
        Frame::GoAway(g) => {
            if accept.is_none() {
                return Err("protocol error: the agent sent go-away".into());
            }
            debug!(session = %shared.cfg.label, message = %g.message, "edge is going away");
            shared.going_away.store(true, Ordering::Release);
            shared.going_away_notify.notify_waiters();
        }
        Frame::AgentStatus(a) => {
            if accept.is_some() {
                return Err("protocol error: the edge sent agent status".into());
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            let healthy = a.origin.is_healthy();
            let before = shared
                .agent_status
                .lock()
                .replace((a, now))
                .map(|(b, _)| b.origin.is_healthy());
            if before != Some(healthy) {
                shared.agent_status_changed.notify_one();
            }
        }
    }
    Ok(())
}

/// Applies a stream-level frame from the peer. Frames for unknown streams (already
/// reset by us, say) are dropped, returning their connection credit.
fn on_stream_frame(
    shared: &Arc<Shared>,
    stream_id: u32,
    ev: StreamEvent,
    payload: Option<Event>,
    data_len: usize,
) {
    let mut violation = None;
    let mut delivered = false;
    let is_head = matches!(payload, Some(Event::Head(_)));
    let mut answered = None;
    {
        let mut streams = shared.streams.lock();
        if let Some(e) = streams.get_mut(&stream_id) {
            if is_head {
                answered = Some(e.ctl.clone());
            }
            if data_len > 0
                && let Err(err) = e.ctl.recv_window.lock().on_data(data_len)
            {
                violation = Some((ResetCode::FlowControl, err.to_string()));
            } else if let Err(err) = e.state.on_recv(ev) {
                violation = Some((ResetCode::Protocol, err.to_string()));
            } else {
                let ended = e.state.remote() == netbore_protocol::stream::Half::Closed;
                if let Some(p) = payload {
                    delivered = e.tx.send(p).is_ok();
                }
                if ended {
                    let _ = e.tx.send(Event::End);
                    if e.local_done {
                        if let Some(e) = streams.remove(&stream_id) {
                            shared.forget(&e);
                        }
                        if streams.is_empty() {
                            shared.idle_notify.notify_waiters();
                        }
                    }
                }
            }
        }
    }
    if !delivered {
        shared.credit_connection(data_len);
    }
    if let Some(ctl) = answered {
        shared.answered(&ctl);
    }
    if let Some((code, msg)) = violation {
        shared.reset_stream(stream_id, code, &msg);
    }
}

async fn heartbeat(shared: Arc<Shared>) {
    let interval = shared.cfg.heartbeat_interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.cancel.cancelled() => return,
        }
        let now = shared.started.elapsed().as_millis() as u64;
        let heard = shared.last_heard_ms.load(Ordering::Relaxed);
        if now.saturating_sub(heard) > interval.as_millis() as u64 * u64::from(HEARTBEAT_MISSES) {
            warn!(session = %shared.cfg.label, "no heartbeat from the peer; closing the tunnel connection");
            shared.close("heartbeat timeout: the peer stopped answering");
            return;
        }
        n += 1;
        let _ = shared.send(Frame::Ping { payload: n });
    }
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
