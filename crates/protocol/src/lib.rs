//! The Netbore tunnel wire protocol, without sockets or clocks.
//!
//! One WebSocket connection between an agent and an edge carries many concurrent
//! streams. It opens with a JSON handshake ([`handshake`]), after which every binary
//! WebSocket message carries one or more [`Frame`]s ([`frame`]). Each stream is a
//! viewer request (or an upgraded byte stream) and is governed by a small state
//! machine ([`stream`]) and by credit windows ([`flow`]) that bound how much either
//! side may buffer.
//!
//! [`conn::Connection`] puts these together for one link: the stream table, id order,
//! the concurrency limit, go-away, the heartbeat deadline and both credit windows, fed
//! frames and the current time and polled for frames, events and its next timeout.
//!
//! [`ws`] is the WebSocket framing those messages travel in, sans-I/O as well.
//!
//! Everything here is plain data: feed it bytes, get frames back. The multiplexer in
//! `netbore-mux` owns the socket; tests and fuzzers drive this crate directly.
//! The normative description is `docs/protocol.md`.

pub mod conn;
pub mod flow;
pub mod frame;
pub mod handshake;
pub mod stream;
pub mod ws;

pub use conn::{Connection, ConnectionError};
pub use flow::{FlowError, RecvWindow, SendWindow};
pub use frame::{
    AgentStatus, DecodeBuf, DecodeError, Frame, FrameType, GoAway, Header, MAX_HEADER_FIELDS,
    OriginState, RequestHead, ResetCode, ResponseHead, decode, encode,
};
pub use handshake::{AgentHello, EdgeReply, Limits, Refusal, Welcome};
pub use stream::{StreamError, StreamEvent, StreamState};

/// The protocol version this build speaks. A peer that announces another version is
/// refused during the handshake with [`handshake::RefusalCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u32 = 1;
