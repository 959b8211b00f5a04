//! One tunnel link as a sans-I/O state machine: the stream table, stream-id order, the
//! concurrency limit, go-away, the heartbeat deadline and both credit windows, once.
//!
//! In the manner of `quinn-proto`'s `Connection`, a [`Connection`] owns no socket and
//! reads no clock. Its driver feeds it what arrived ([`Connection::handle_message`] for a
//! binary WebSocket message, [`Connection::handle_frame`] for one decoded frame) and the
//! current time, calls the local operations ([`Connection::open`],
//! [`Connection::send_data`], [`Connection::reset`], ...), and then polls it:
//!
//! * [`Connection::poll_transmit`] / [`Connection::transmit_into`] for frames to write,
//! * [`Connection::poll`] for [`Event`]s (a stream opened, a head, data, its end, a
//!   reset, credit to send again, go-away, the link closed),
//! * [`Connection::poll_timeout`] for when to call [`Connection::handle_timeout`] next.
//!
//! Time is a [`Duration`] since an epoch the driver picks (the link's start, say), so
//! tests drive two connections against each other with a simulated clock.
//!
//! The rules are `docs/protocol.md`'s; each connection error names the violation
//! ([`ConnectionError`]), and each stream error becomes a reset of that stream alone.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};

use crate::flow::{FlowError, RecvWindow, SendWindow};
use crate::frame::{
    AgentStatus, DecodeError, Frame, FrameType, GoAway, Header, RequestHead, ResetCode,
    ResponseHead, check_encodable, decode, encode,
};
use crate::handshake::Limits;
use crate::stream::{Half, StreamError, StreamEvent, StreamState};

/// Largest DATA payload put in one frame. Big enough that bulk transfer is not
/// dominated by per-frame cost, small enough that streams interleave fairly.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;

/// Missing this many heartbeat intervals without hearing anything from the peer means
/// the link is dead.
pub const HEARTBEAT_MISSES: u32 = 3;

/// The shortest heartbeat interval a connection uses (a zero interval would make the
/// connection ping in a loop).
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(1);

/// The edge stops opening streams on a connection at this id and sends go-away, so
/// ids never wrap (the agent reconnects long before 2^32).
pub const STREAM_ID_RETIRE: u32 = 1 << 31;

/// Frames waiting to be written beyond which a peer that keeps making us answer (pings,
/// refused heads) is taken to have stopped reading, and the connection is closed. Data
/// is bounded by the windows; this bounds the small frames the peer can make us queue.
pub const MAX_QUEUED_FRAMES: usize = 65_536;

/// Bytes of request heads (and, on the agent, response heads) that the open streams of
/// one connection may hold. Heads are not covered by the credit windows, so without
/// this a flood of requests would queue without bound. A new stream beyond it is
/// refused: [`Connection::open`] fails, and the agent resets a stream the edge opens
/// beyond it with `REFUSED`. 16 MiB holds 256 heads of 64 KiB.
pub const MAX_LINK_HEAD_BYTES: usize = 16 * 1024 * 1024;

/// Which end of the tunnel a connection is. The edge opens streams; the agent answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The edge side: opens streams, may send go-away.
    Edge,
    /// The agent side: answers streams, may send agent status.
    Agent,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Agent => "agent",
        }
    }

    fn peer(self) -> Role {
        match self {
            Role::Edge => Role::Agent,
            Role::Agent => Role::Edge,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a connection obeys, mostly from the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Which side this is.
    pub role: Role,
    /// Limits agreed in the handshake (frame size, windows, concurrent streams).
    pub limits: Limits,
    /// Ping when nothing was sent for this long; dead after [`HEARTBEAT_MISSES`]
    /// intervals without hearing anything. At least [`MIN_HEARTBEAT_INTERVAL`].
    pub heartbeat_interval: Duration,
    /// Bytes of heads the open streams may hold ([`MAX_LINK_HEAD_BYTES`] by default).
    pub max_head_bytes: usize,
}

impl Config {
    /// A configuration with the default head budget.
    pub fn new(role: Role, limits: Limits, heartbeat_interval: Duration) -> Config {
        Config {
            role,
            limits,
            heartbeat_interval,
            max_head_bytes: MAX_LINK_HEAD_BYTES,
        }
    }
}

/// Why a connection closed. Every variant but [`ConnectionError::Closed`] and
/// [`ConnectionError::HeartbeatTimeout`] names a protocol violation by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    /// A frame that could not be decoded (unknown type, bad length, ...).
    #[error("protocol error: {0}")]
    Decode(DecodeError),
    /// A message ended in the middle of a frame (frames never span messages).
    #[error("protocol error: {len} bytes of a partial frame at the end of a message")]
    PartialFrame {
        /// Bytes left over.
        len: usize,
    },
    /// A frame only the other role may send (e.g. a request head from the agent).
    #[error("protocol error: the {sender} sent {frame:?}, which only the {} sends", .sender.peer())]
    WrongSender {
        /// The frame's type.
        frame: FrameType,
        /// Who sent it.
        sender: Role,
    },
    /// A request head whose stream id is not above the last one.
    #[error("protocol error: stream id {stream_id} is not above the last one ({last})")]
    StreamIdNotIncreasing {
        /// The id received.
        stream_id: u32,
        /// The last id the edge opened.
        last: u32,
    },
    /// DATA beyond the connection's credit, or a connection window update that
    /// overflows the window.
    #[error("flow control error on the connection: {0}")]
    Flow(FlowError),
    /// The peer kept making us answer (pings, refusals) without reading our frames.
    #[error("the peer stopped reading: {queued} frames queued for it")]
    PeerNotReading {
        /// Frames waiting.
        queued: usize,
    },
    /// Nothing heard from the peer for [`HEARTBEAT_MISSES`] heartbeat intervals.
    #[error("heartbeat timeout: nothing heard from the peer for {silent:?}")]
    HeartbeatTimeout {
        /// How long the peer was silent.
        silent: Duration,
    },
    /// Closed by our side (shutdown, the transport failed or closed); the reason as
    /// the driver gave it.
    #[error("{0}")]
    Closed(String),
}

/// Why a local operation failed. The connection itself is unharmed unless the
/// variant is [`OpError::Closed`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// The connection is closed.
    #[error("tunnel connection closed: {0}")]
    Closed(ConnectionError),
    /// No such stream: never opened, reset, or finished in both directions.
    #[error("stream {0} is not open (reset or finished)")]
    UnknownStream(u32),
    /// A new stream was refused (limit reached, going away); retry elsewhere.
    #[error("tunnel connection refuses new streams: {0}")]
    Refused(Refusal),
    /// The operation belongs to the other role (e.g. the agent opening a stream).
    #[error("the {role} cannot {what}")]
    WrongRole {
        /// Our role.
        role: Role,
        /// What was attempted.
        what: &'static str,
    },
    /// A head or trailers too large for the wire format or the frame limit.
    #[error("head too large to send: {0}")]
    TooLarge(String),
    /// The frame does not fit the stream's state (a bug in the caller).
    #[error("stream misuse: {0}")]
    Misuse(StreamError),
}

/// Why [`Connection::open`] refused a new stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `limits.max_concurrent_streams` are open.
    #[error("too many concurrent streams ({0} open)")]
    TooManyStreams(u32),
    /// Go-away was sent or received: open the stream on another connection.
    #[error("the connection is going away")]
    GoingAway,
    /// The open streams hold [`Config::max_head_bytes`] of heads.
    #[error("the connection holds its limit of head bytes")]
    HeadBytes,
}

/// What a connection reports to its driver, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The edge opened a stream (agent side).
    Opened {
        /// The new stream.
        stream_id: u32,
        /// The viewer's request.
        head: RequestHead,
        /// The request has no body (an [`Event::End`] follows).
        end_stream: bool,
    },
    /// The response head arrived (edge side).
    Head {
        /// The stream.
        stream_id: u32,
        /// The response.
        head: ResponseHead,
    },
    /// Body bytes (or raw bytes of an upgraded stream). Report them with
    /// [`Connection::consumed`] once passed on, to return their credit.
    Data {
        /// The stream.
        stream_id: u32,
        /// The bytes.
        data: Bytes,
    },
    /// Trailers arrived; the peer's half is finished (an [`Event::End`] follows).
    Trailers {
        /// The stream.
        stream_id: u32,
        /// Trailer fields.
        headers: Vec<Header>,
    },
    /// The peer's half of the stream finished cleanly.
    End {
        /// The stream.
        stream_id: u32,
    },
    /// The stream was reset, by the peer or by us because the peer broke a stream
    /// rule (or the connection closed); nothing more follows on it.
    Reset {
        /// The stream.
        stream_id: u32,
        /// Why.
        code: ResetCode,
        /// Detail.
        message: String,
    },
    /// Credit arrived for a stream whose data was held back for lack of it.
    Writable {
        /// The stream.
        stream_id: u32,
    },
    /// The edge announced go-away (agent side): move to another connection; streams
    /// up to `last_stream_id` still finish here.
    GoAway(GoAway),
    /// The agent reported on its origin (edge side). Only the latest report is kept
    /// ([`Connection::agent_status`]); this event says a new one arrived.
    AgentStatus,
    /// The connection closed; every open stream was reset before this event.
    Closed(ConnectionError),
}

/// One stream's entry in the table.
#[derive(Debug)]
struct Stream {
    state: StreamState,
    send: SendWindow,
    recv: RecvWindow,
    /// Bytes of heads held against [`Config::max_head_bytes`].
    head_bytes: usize,
    /// We opened it and its head is still in the transmit queue: a reset now takes
    /// its frames back and the peer never hears of it.
    head_unsent: bool,
    /// A send was cut short for lack of credit: report [`Event::Writable`] on credit.
    blocked: bool,
    /// Nobody reads the peer's half any more: its data is credited back at once, and
    /// the stream is reset once our half is finished.
    not_reading: bool,
}

/// The state of one tunnel link. See the module documentation.
#[derive(Debug)]
pub struct Connection {
    cfg: Config,
    streams: HashMap<u32, Stream>,
    /// Next id the edge opens.
    next_id: u32,
    /// Highest id the edge opened (as the agent saw it).
    last_remote_id: u32,
    conn_send: SendWindow,
    conn_recv: RecvWindow,
    head_bytes: usize,
    going_away: bool,
    closed: Option<ConnectionError>,
    transmit: VecDeque<Frame>,
    /// Encoded bytes of the frames in `transmit`.
    transmit_bytes: usize,
    events: VecDeque<Event>,
    /// The latest time the driver gave.
    now: Duration,
    last_heard: Duration,
    last_sent: Duration,
    pings: u64,
    agent_status: Option<AgentStatus>,
    agent_status_pending: bool,
    bytes_in: u64,
    bytes_out: u64,
}

impl Connection {
    /// A connection that starts at `now` (it has heard the peer then: the handshake).
    pub fn new(mut cfg: Config, now: Duration) -> Connection {
        cfg.heartbeat_interval = cfg.heartbeat_interval.max(MIN_HEARTBEAT_INTERVAL);
        Connection {
            streams: HashMap::new(),
            next_id: 1,
            last_remote_id: 0,
            conn_send: SendWindow::new(cfg.limits.connection_window),
            conn_recv: RecvWindow::new(cfg.limits.connection_window),
            head_bytes: 0,
            going_away: false,
            closed: None,
            transmit: VecDeque::new(),
            transmit_bytes: 0,
            events: VecDeque::new(),
            now,
            last_heard: now,
            last_sent: now,
            pings: 0,
            agent_status: None,
            agent_status_pending: false,
            bytes_in: 0,
            bytes_out: 0,
            cfg,
        }
    }

    // -----------------------------------------------------------------------------
    // Input: what arrived, and time.
    // -----------------------------------------------------------------------------

    /// Feeds one binary WebSocket message: one or more whole frames. A frame that
    /// cannot be decoded, or a partial frame at the end, closes the connection (the
    /// error is returned and reported as [`Event::Closed`]); a head or trailer block
    /// with too many fields is skipped and only its stream refused.
    pub fn handle_message(&mut self, now: Duration, mut msg: Bytes) -> Result<(), ConnectionError> {
        self.tick(now);
        self.check_open()?;
        self.heard(now);
        let max = self.cfg.limits.max_frame_len as usize;
        loop {
            match decode(&mut msg, max) {
                Ok(Some(frame)) => self.handle_frame(now, frame)?,
                Ok(None) if msg.is_empty() => return Ok(()),
                Ok(None) => return Err(self.fail(ConnectionError::PartialFrame { len: msg.len() })),
                Err(
                    e @ DecodeError::TooManyHeaders {
                        frame,
                        stream_id,
                        frame_len,
                        ..
                    },
                ) => {
                    msg.advance(frame_len);
                    self.refuse_oversized(frame, stream_id, e.to_string())?;
                }
                Err(e) => return Err(self.fail(ConnectionError::Decode(e))),
            }
        }
    }

    /// Records a sign of life that carries no frame (a WebSocket ping or pong).
    pub fn heard(&mut self, now: Duration) {
        self.last_heard = self.last_heard.max(now);
    }

    /// Feeds one decoded frame. A connection-level violation closes the connection
    /// (the error is returned and reported as [`Event::Closed`]); a stream-level one
    /// resets that stream.
    pub fn handle_frame(&mut self, now: Duration, frame: Frame) -> Result<(), ConnectionError> {
        self.tick(now);
        self.check_open()?;
        self.heard(now);
        self.apply(frame)?;
        // Whatever the peer made us queue (pongs, refusals, credit for data nobody
        // reads) is bounded: a peer that keeps it growing is not reading.
        if self.transmit.len() > MAX_QUEUED_FRAMES {
            let queued = self.transmit.len();
            return Err(self.fail(ConnectionError::PeerNotReading { queued }));
        }
        Ok(())
    }

    fn apply(&mut self, frame: Frame) -> Result<(), ConnectionError> {
        let role = self.cfg.role;
        let frame_len = frame.encoded_len();
        let wrong = |frame: FrameType| ConnectionError::WrongSender {
            frame,
            sender: role.peer(),
        };
        match frame {
            Frame::RequestHead {
                stream_id,
                head,
                end_stream,
            } => {
                if role != Role::Agent {
                    return Err(self.fail(wrong(FrameType::RequestHead)));
                }
                self.check_new_remote_id(stream_id)?;
                let head_len = frame_len;
                let refusal =
                    if self.streams.len() >= self.cfg.limits.max_concurrent_streams as usize {
                        Some("agent is at its concurrent stream limit")
                    } else if self.head_bytes + head_len > self.cfg.max_head_bytes {
                        Some("agent holds its limit of request head bytes on this connection")
                    } else {
                        None
                    };
                if let Some(message) = refusal {
                    return self.queue_reply(Frame::Reset {
                        stream_id,
                        code: ResetCode::Refused,
                        message: message.into(),
                    });
                }
                let mut stream = self.new_stream(head_len, false);
                // A fresh stream always takes its head.
                let _ = stream.state.on_recv(StreamEvent::Head { end_stream });
                self.head_bytes += head_len;
                self.streams.insert(stream_id, stream);
                self.events.push_back(Event::Opened {
                    stream_id,
                    head,
                    end_stream,
                });
                if end_stream {
                    self.events.push_back(Event::End { stream_id });
                }
            }
            Frame::ResponseHead {
                stream_id,
                head,
                end_stream,
            } => {
                if role != Role::Edge {
                    return Err(self.fail(wrong(FrameType::ResponseHead)));
                }
                self.on_stream_frame(
                    stream_id,
                    StreamEvent::Head { end_stream },
                    Some(Event::Head { stream_id, head }),
                    0,
                );
            }
            Frame::Data {
                stream_id,
                data,
                end_stream,
            } => {
                let len = data.len();
                if let Err(e) = self.conn_recv.on_data(len) {
                    return Err(self.fail(ConnectionError::Flow(e)));
                }
                self.bytes_in += len as u64;
                let ev = (len > 0).then_some(Event::Data { stream_id, data });
                self.on_stream_frame(stream_id, StreamEvent::Data { end_stream }, ev, len);
            }
            Frame::Trailers { stream_id, headers } => {
                self.on_stream_frame(
                    stream_id,
                    StreamEvent::Trailers,
                    Some(Event::Trailers { stream_id, headers }),
                    0,
                );
            }
            Frame::Reset {
                stream_id,
                code,
                message,
            } => {
                if self.remove(stream_id).is_some() {
                    self.events.push_back(Event::Reset {
                        stream_id,
                        code,
                        message,
                    });
                }
            }
            Frame::WindowUpdate {
                stream_id: 0,
                increment,
            } => {
                if let Err(e) = self.conn_send.grant(increment) {
                    return Err(self.fail(ConnectionError::Flow(e)));
                }
                self.wake_blocked(None);
            }
            Frame::WindowUpdate {
                stream_id,
                increment,
            } => {
                let granted = self
                    .streams
                    .get_mut(&stream_id)
                    .map(|s| s.send.grant(increment));
                match granted {
                    Some(Ok(())) => self.wake_blocked(Some(stream_id)),
                    Some(Err(e)) => {
                        self.reset_on_violation(stream_id, ResetCode::FlowControl, e.to_string())
                    }
                    None => {}
                }
            }
            Frame::Ping { payload } => self.queue_reply(Frame::Pong { payload })?,
            Frame::Pong { .. } => {}
            Frame::GoAway(g) => {
                if role != Role::Agent {
                    return Err(self.fail(wrong(FrameType::GoAway)));
                }
                if !self.going_away {
                    self.going_away = true;
                    self.events.push_back(Event::GoAway(g));
                }
            }
            Frame::AgentStatus(a) => {
                if role != Role::Edge {
                    return Err(self.fail(wrong(FrameType::AgentStatus)));
                }
                self.agent_status = Some(a);
                if !self.agent_status_pending {
                    self.agent_status_pending = true;
                    self.events.push_back(Event::AgentStatus);
                }
            }
        }
        Ok(())
    }

    /// Acts on the timers: closes the connection when the peer has been silent for
    /// [`HEARTBEAT_MISSES`] intervals, and queues a ping when we have sent nothing for
    /// an interval.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.tick(now);
        if self.closed.is_some() {
            return;
        }
        let silent = now.saturating_sub(self.last_heard);
        if silent >= self.dead_after() {
            self.fail(ConnectionError::HeartbeatTimeout { silent });
            return;
        }
        if now >= self.last_sent + self.cfg.heartbeat_interval {
            self.pings += 1;
            self.queue(Frame::Ping {
                payload: self.pings,
            });
        }
    }

    /// When [`Connection::handle_timeout`] should next be called; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.closed.is_some() {
            return None;
        }
        let ping = self.last_sent + self.cfg.heartbeat_interval;
        let dead = self.last_heard + self.dead_after();
        Some(ping.min(dead))
    }

    fn dead_after(&self) -> Duration {
        self.cfg.heartbeat_interval * HEARTBEAT_MISSES
    }

    // -----------------------------------------------------------------------------
    // Output: frames to write and events.
    // -----------------------------------------------------------------------------

    /// The next frame to write, in order. Frames queued before the connection closed
    /// are still returned, so a driver may flush them (a go-away, the last resets).
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        let frame = self.transmit.pop_front()?;
        self.transmit_bytes -= frame.encoded_len();
        if let Frame::RequestHead { stream_id, .. } = &frame
            && let Some(s) = self.streams.get_mut(stream_id)
        {
            s.head_unsent = false;
        }
        Some(frame)
    }

    /// Encodes queued frames into `buf` until it holds at least `max_bytes` or the
    /// queue is empty (one WebSocket message); returns how many frames it took.
    pub fn transmit_into(&mut self, buf: &mut BytesMut, max_bytes: usize) -> usize {
        let mut n = 0;
        while buf.len() < max_bytes {
            let Some(frame) = self.poll_transmit() else {
                break;
            };
            encode(&frame, buf);
            n += 1;
        }
        n
    }

    /// Gives back the memory of the collections a burst grew that are empty now. A
    /// driver calls it when the link is quiet, so an idle link holds only its state.
    pub fn shrink_idle(&mut self) {
        if self.streams.is_empty() {
            self.streams = HashMap::new();
        }
        if self.transmit.is_empty() {
            self.transmit = VecDeque::new();
        }
        if self.events.is_empty() {
            self.events = VecDeque::new();
        }
    }

    /// Frames waiting to be written.
    pub fn queued_frames(&self) -> usize {
        self.transmit.len()
    }

    /// Encoded bytes of the frames waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.transmit_bytes
    }

    /// The next event, in order.
    pub fn poll(&mut self) -> Option<Event> {
        let ev = self.events.pop_front()?;
        if matches!(ev, Event::AgentStatus) {
            self.agent_status_pending = false;
        }
        Some(ev)
    }

    // -----------------------------------------------------------------------------
    // Local operations.
    // -----------------------------------------------------------------------------

    /// Opens a stream carrying `head` (edge side) and queues its head; returns its id.
    /// Refused at the concurrency limit, at the head byte budget and after go-away;
    /// when ids run out it sends go-away itself.
    pub fn open(
        &mut self,
        now: Duration,
        head: RequestHead,
        end_stream: bool,
    ) -> Result<u32, OpError> {
        self.tick(now);
        self.check_op()?;
        if self.cfg.role != Role::Edge {
            return Err(OpError::WrongRole {
                role: self.cfg.role,
                what: "open a stream",
            });
        }
        if self.going_away {
            return Err(OpError::Refused(Refusal::GoingAway));
        }
        let open = self.streams.len();
        if open >= self.cfg.limits.max_concurrent_streams as usize {
            return Err(OpError::Refused(Refusal::TooManyStreams(open as u32)));
        }
        let frame = Frame::RequestHead {
            stream_id: self.next_id,
            head,
            end_stream,
        };
        check_encodable(&frame, self.cfg.limits.max_frame_len as usize)
            .map_err(OpError::TooLarge)?;
        let len = frame.encoded_len();
        if self.head_bytes + len > self.cfg.max_head_bytes {
            return Err(OpError::Refused(Refusal::HeadBytes));
        }
        if self.next_id >= STREAM_ID_RETIRE {
            // Ids are running out: move the agent to a fresh connection first.
            self.go_away(now, "stream ids exhausted; reconnect");
            return Err(OpError::Refused(Refusal::GoingAway));
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut stream = self.new_stream(len, true);
        let _ = stream.state.on_send(StreamEvent::Head { end_stream });
        self.head_bytes += len;
        self.streams.insert(id, stream);
        self.queue(frame);
        Ok(id)
    }

    /// Sends the response head of `stream_id` (agent side).
    pub fn send_response(
        &mut self,
        now: Duration,
        stream_id: u32,
        head: ResponseHead,
        end_stream: bool,
    ) -> Result<(), OpError> {
        self.tick(now);
        self.check_op()?;
        if self.cfg.role != Role::Agent {
            return Err(OpError::WrongRole {
                role: self.cfg.role,
                what: "send a response head",
            });
        }
        let frame = Frame::ResponseHead {
            stream_id,
            head,
            end_stream,
        };
        check_encodable(&frame, self.cfg.limits.max_frame_len as usize)
            .map_err(OpError::TooLarge)?;
        let len = frame.encoded_len();
        let over = self.head_bytes + len > self.cfg.max_head_bytes;
        let s = self.stream_mut(stream_id)?;
        if s.state.local() == Half::AwaitHead && over {
            // The caller resets the stream, as for any failed send.
            return Err(OpError::Refused(Refusal::HeadBytes));
        }
        s.state
            .on_send(StreamEvent::Head { end_stream })
            .map_err(OpError::Misuse)?;
        s.head_bytes += len;
        self.head_bytes += len;
        self.queue(frame);
        self.after_local(stream_id);
        Ok(())
    }

    /// Sends as much of `data` as the stream's and the connection's credit allow, in
    /// frames of at most [`MAX_DATA_CHUNK`] bytes, taking the sent bytes off the front
    /// of `data`. With `end_stream`, the frame that carries the last byte (or an empty
    /// frame when `data` is empty) ends our half. Returns the bytes sent; when some are
    /// left, an [`Event::Writable`] follows once credit arrives.
    pub fn send_data(
        &mut self,
        now: Duration,
        stream_id: u32,
        data: &mut Bytes,
        end_stream: bool,
    ) -> Result<usize, OpError> {
        self.tick(now);
        self.check_op()?;
        let chunk = MAX_DATA_CHUNK
            .min(self.cfg.limits.max_frame_len as usize)
            .max(1);
        let conn_avail = self.conn_send.allowance(data.len());
        let s = self.stream_mut(stream_id)?;
        match s.state.local() {
            Half::Body => {}
            _ => {
                return Err(OpError::Misuse(match s.state.local() {
                    Half::AwaitHead => StreamError::BeforeHead(StreamEvent::Data { end_stream }),
                    _ => StreamError::AfterEnd(StreamEvent::Data { end_stream }),
                }));
            }
        }
        let mut budget = s.send.allowance(conn_avail);
        let mut frames = Vec::new();
        let mut sent = 0;
        loop {
            let n = budget.min(chunk).min(data.len());
            let last = n == data.len();
            if n == 0 && !(last && end_stream) {
                break;
            }
            let end = last && end_stream;
            if end {
                // Cannot fail: the half is in its body.
                let _ = s.state.on_send(StreamEvent::Data { end_stream: true });
            }
            let _ = s.send.consume(n);
            budget -= n;
            sent += n;
            frames.push(Frame::Data {
                stream_id,
                data: data.split_to(n),
                end_stream: end,
            });
            if end || data.is_empty() {
                break;
            }
        }
        s.blocked = !data.is_empty();
        let _ = self.conn_send.consume(sent);
        self.bytes_out += sent as u64;
        for f in frames {
            self.queue(f);
        }
        self.after_local(stream_id);
        Ok(sent)
    }

    /// Ends our half with trailers.
    pub fn send_trailers(
        &mut self,
        now: Duration,
        stream_id: u32,
        headers: Vec<Header>,
    ) -> Result<(), OpError> {
        self.tick(now);
        self.check_op()?;
        let frame = Frame::Trailers { stream_id, headers };
        check_encodable(&frame, self.cfg.limits.max_frame_len as usize)
            .map_err(OpError::TooLarge)?;
        self.stream_mut(stream_id)?
            .state
            .on_send(StreamEvent::Trailers)
            .map_err(OpError::Misuse)?;
        self.queue(frame);
        self.after_local(stream_id);
        Ok(())
    }

    /// Ends our half cleanly (an empty DATA with END_STREAM).
    pub fn finish(&mut self, now: Duration, stream_id: u32) -> Result<(), OpError> {
        self.send_data(now, stream_id, &mut Bytes::new(), true)
            .map(|_| ())
    }

    /// Abandons a stream in both directions. A stream we opened whose head has not
    /// been written yet is taken back whole (the peer never hears of it, and the
    /// connection credit its data took returns). No-op for a stream that is not open.
    pub fn reset(&mut self, now: Duration, stream_id: u32, code: ResetCode, message: &str) {
        self.tick(now);
        if self.closed.is_some() {
            return;
        }
        let Some(s) = self.remove(stream_id) else {
            return;
        };
        if s.head_unsent {
            let mut refund = 0;
            self.transmit.retain(|f| match f {
                Frame::Data {
                    stream_id: id,
                    data,
                    ..
                } if *id == stream_id => {
                    refund += data.len();
                    false
                }
                f => f.stream_id() != stream_id,
            });
            self.transmit_bytes = self.transmit.iter().map(Frame::encoded_len).sum();
            let _ = self.conn_send.grant(refund.min(u32::MAX as usize) as u32);
            self.bytes_out -= refund as u64;
            return;
        }
        self.queue(Frame::Reset {
            stream_id,
            code,
            message: message.to_string(),
        });
    }

    /// Reports `n` bytes of a stream's data passed on (to the viewer or the origin):
    /// returns their credit to the peer, batched per half window. Also right for a
    /// stream that has since ended (only the connection credit then matters).
    pub fn consumed(&mut self, now: Duration, stream_id: u32, n: usize) {
        self.tick(now);
        if self.closed.is_some() || n == 0 {
            return;
        }
        let inc = self
            .streams
            .get_mut(&stream_id)
            .and_then(|s| s.recv.on_consumed(n));
        if let Some(increment) = inc {
            self.queue(Frame::WindowUpdate {
                stream_id,
                increment,
            });
        }
        self.credit_connection(n);
    }

    /// Nobody will read the rest of the peer's half: its data is credited back as it
    /// arrives, and once our half is finished too the stream is reset with `CANCEL`
    /// (at once, when it already is).
    pub fn stop_reading(&mut self, now: Duration, stream_id: u32) {
        self.tick(now);
        let Some(s) = self.streams.get_mut(&stream_id) else {
            return;
        };
        s.not_reading = true;
        if s.state.local() == Half::Closed {
            self.reset(
                now,
                stream_id,
                ResetCode::Cancel,
                "nobody reads the rest of the stream",
            );
        }
    }

    /// Announces go-away (edge side): no new stream opens here; open ones finish.
    pub fn go_away(&mut self, now: Duration, message: &str) {
        self.tick(now);
        if self.cfg.role != Role::Edge || self.going_away || self.closed.is_some() {
            return;
        }
        self.going_away = true;
        self.queue(Frame::GoAway(GoAway {
            last_stream_id: self.next_id - 1,
            message: message.to_string(),
        }));
    }

    /// Tells the edge how the agent's origin is (agent side; only to an edge whose
    /// welcome lists the `agent_status` capability).
    pub fn send_agent_status(&mut self, now: Duration, status: AgentStatus) -> Result<(), OpError> {
        self.tick(now);
        self.check_op()?;
        if self.cfg.role != Role::Agent {
            return Err(OpError::WrongRole {
                role: self.cfg.role,
                what: "send agent status",
            });
        }
        let frame = Frame::AgentStatus(status);
        check_encodable(&frame, self.cfg.limits.max_frame_len as usize)
            .map_err(OpError::TooLarge)?;
        self.queue(frame);
        Ok(())
    }

    /// Closes the connection: every open stream is reset (`CANCEL`) and
    /// [`Event::Closed`] reported. Frames already queued can still be polled.
    pub fn close(&mut self, reason: &str) {
        if self.closed.is_none() {
            self.fail(ConnectionError::Closed(reason.to_string()));
        }
    }

    // -----------------------------------------------------------------------------
    // Queries.
    // -----------------------------------------------------------------------------

    /// Which side this is.
    pub fn role(&self) -> Role {
        self.cfg.role
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.cfg.limits
    }

    /// Streams open (not yet finished in both directions, nor reset).
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// True while `stream_id` is open.
    pub fn is_open(&self, stream_id: u32) -> bool {
        self.streams.contains_key(&stream_id)
    }

    /// Bytes `stream_id` may send now (the smaller of its and the connection's credit).
    pub fn send_credit(&self, stream_id: u32) -> usize {
        self.streams.get(&stream_id).map_or(0, |s| {
            self.conn_send.allowance(s.send.allowance(usize::MAX))
        })
    }

    /// Connection send credit left.
    pub fn connection_credit(&self) -> i64 {
        self.conn_send.available()
    }

    /// True once go-away was sent or received.
    pub fn is_going_away(&self) -> bool {
        self.going_away
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<&ConnectionError> {
        self.closed.as_ref()
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// The agent's latest status report (edge side).
    pub fn agent_status(&self) -> Option<&AgentStatus> {
        self.agent_status.as_ref()
    }

    /// Bytes of heads held by open streams (at most [`Config::max_head_bytes`]).
    pub fn head_bytes(&self) -> usize {
        self.head_bytes
    }

    /// DATA payload bytes received and sent so far.
    pub fn bytes(&self) -> (u64, u64) {
        (self.bytes_in, self.bytes_out)
    }

    // -----------------------------------------------------------------------------
    // Internals.
    // -----------------------------------------------------------------------------

    fn new_stream(&self, head_bytes: usize, local: bool) -> Stream {
        Stream {
            state: StreamState::new(),
            send: SendWindow::new(self.cfg.limits.initial_stream_window),
            recv: RecvWindow::new(self.cfg.limits.initial_stream_window),
            head_bytes,
            head_unsent: local,
            blocked: false,
            not_reading: false,
        }
    }

    fn check_open(&self) -> Result<(), ConnectionError> {
        match &self.closed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn check_op(&self) -> Result<(), OpError> {
        self.check_open().map_err(OpError::Closed)
    }

    fn stream_mut(&mut self, stream_id: u32) -> Result<&mut Stream, OpError> {
        self.streams
            .get_mut(&stream_id)
            .ok_or(OpError::UnknownStream(stream_id))
    }

    fn check_new_remote_id(&mut self, stream_id: u32) -> Result<(), ConnectionError> {
        if stream_id <= self.last_remote_id {
            return Err(self.fail(ConnectionError::StreamIdNotIncreasing {
                stream_id,
                last: self.last_remote_id,
            }));
        }
        self.last_remote_id = stream_id;
        Ok(())
    }

    /// Moves the clock forward (never back: a driver's clock may be coarse).
    fn tick(&mut self, now: Duration) {
        self.now = self.now.max(now);
    }

    /// Queues a frame we decided to send; sending counts as activity for the heartbeat.
    fn queue(&mut self, frame: Frame) {
        self.last_sent = self.now;
        self.transmit_bytes += frame.encoded_len();
        self.transmit.push_back(frame);
    }

    /// Queues a frame the peer made us send (a pong, a refusal); a peer that makes us
    /// queue more than [`MAX_QUEUED_FRAMES`] without reading closes the connection.
    fn queue_reply(&mut self, frame: Frame) -> Result<(), ConnectionError> {
        if self.transmit.len() >= MAX_QUEUED_FRAMES {
            let queued = self.transmit.len();
            return Err(self.fail(ConnectionError::PeerNotReading { queued }));
        }
        // A reply is not our own activity: the heartbeat still pings an idle peer.
        self.transmit_bytes += frame.encoded_len();
        self.transmit.push_back(frame);
        Ok(())
    }

    /// Closes with `e`: resets every stream, reports [`Event::Closed`].
    fn fail(&mut self, e: ConnectionError) -> ConnectionError {
        if self.closed.is_none() {
            let mut ids: Vec<u32> = self.streams.keys().copied().collect();
            ids.sort_unstable();
            for stream_id in ids {
                self.remove(stream_id);
                self.events.push_back(Event::Reset {
                    stream_id,
                    code: ResetCode::Cancel,
                    message: format!("tunnel connection closed: {e}"),
                });
            }
            self.closed = Some(e.clone());
            self.events.push_back(Event::Closed(e.clone()));
        }
        e
    }

    fn remove(&mut self, stream_id: u32) -> Option<Stream> {
        let s = self.streams.remove(&stream_id)?;
        self.head_bytes -= s.head_bytes;
        Some(s)
    }

    /// After a local send: forget the stream when both halves are done, or reset it
    /// when nobody reads the peer's half.
    fn after_local(&mut self, stream_id: u32) {
        let Some(s) = self.streams.get(&stream_id) else {
            return;
        };
        if s.state.is_closed() {
            self.remove(stream_id);
        } else if s.state.local() == Half::Closed && s.not_reading {
            let now = self.now;
            self.reset(
                now,
                stream_id,
                ResetCode::Cancel,
                "nobody reads the rest of the stream",
            );
        }
    }

    /// Applies a stream frame from the peer. Frames for unknown streams are dropped
    /// (returning their connection credit); a frame that breaks the stream's rules or
    /// its window resets the stream.
    fn on_stream_frame(
        &mut self,
        stream_id: u32,
        ev: StreamEvent,
        payload: Option<Event>,
        data_len: usize,
    ) {
        let Some(s) = self.streams.get_mut(&stream_id) else {
            self.credit_connection(data_len);
            return;
        };
        if data_len > 0
            && let Err(e) = s.recv.on_data(data_len)
        {
            self.credit_connection(data_len);
            self.reset_on_violation(stream_id, ResetCode::FlowControl, e.to_string());
            return;
        }
        if let Err(e) = s.state.on_recv(ev) {
            self.credit_connection(data_len);
            self.reset_on_violation(stream_id, ResetCode::Protocol, e.to_string());
            return;
        }
        let ended = s.state.remote() == Half::Closed;
        let closed = s.state.is_closed();
        if s.not_reading {
            // Nobody will pass it on: its connection credit returns at once.
            self.credit_connection(data_len);
        } else if let Some(p) = payload {
            self.events.push_back(p);
        }
        if ended {
            self.events.push_back(Event::End { stream_id });
        }
        if closed {
            self.remove(stream_id);
        }
    }

    /// Resets a stream because the peer broke its rules, telling the peer and the
    /// driver.
    fn reset_on_violation(&mut self, stream_id: u32, code: ResetCode, message: String) {
        if self.remove(stream_id).is_none() {
            return;
        }
        self.events.push_back(Event::Reset {
            stream_id,
            code,
            message: message.clone(),
        });
        // Bounded by the peer's frames, like a pong.
        let _ = self.queue_reply(Frame::Reset {
            stream_id,
            code,
            message,
        });
    }

    /// Refuses the stream of a head or trailer block with too many fields.
    fn refuse_oversized(
        &mut self,
        frame: FrameType,
        stream_id: u32,
        message: String,
    ) -> Result<(), ConnectionError> {
        match frame {
            FrameType::RequestHead => {
                if self.cfg.role != Role::Agent {
                    return Err(self.fail(ConnectionError::WrongSender {
                        frame,
                        sender: self.cfg.role.peer(),
                    }));
                }
                self.check_new_remote_id(stream_id)?;
                // The stream never opened here: only the peer needs to hear of it.
                self.queue_reply(Frame::Reset {
                    stream_id,
                    code: ResetCode::TooLarge,
                    message,
                })
            }
            FrameType::ResponseHead if self.cfg.role != Role::Edge => {
                Err(self.fail(ConnectionError::WrongSender {
                    frame,
                    sender: self.cfg.role.peer(),
                }))
            }
            _ => {
                self.reset_on_violation(stream_id, ResetCode::TooLarge, message);
                self.check_open()
            }
        }
    }

    fn credit_connection(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        if let Some(increment) = self.conn_recv.on_consumed(n) {
            self.queue(Frame::WindowUpdate {
                stream_id: 0,
                increment,
            });
        }
    }

    /// Reports [`Event::Writable`] for blocked streams that can send again (`only`
    /// one, after its own window update; all, after a connection update).
    fn wake_blocked(&mut self, only: Option<u32>) {
        if self.conn_send.available() <= 0 {
            return;
        }
        let mut woken: Vec<u32> = self
            .streams
            .iter_mut()
            .filter(|(id, s)| only.is_none_or(|o| o == **id) && s.blocked && s.send.available() > 0)
            .map(|(id, s)| {
                s.blocked = false;
                *id
            })
            .collect();
        woken.sort_unstable();
        self.events.extend(
            woken
                .into_iter()
                .map(|stream_id| Event::Writable { stream_id }),
        );
    }
}
