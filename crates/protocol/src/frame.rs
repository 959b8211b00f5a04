//! Binary frames: the unit of everything after the handshake.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! +--------+--------+----------------+----------------+=============+
//! | type:8 | flags:8| stream id:32   | length:32      | payload ... |
//! +--------+--------+----------------+----------------+=============+
//! ```
//!
//! A binary WebSocket message holds one or more whole frames, back to back. A frame
//! never spans two messages. [`decode`] returns `Ok(None)` when the buffer holds only
//! part of a frame ("need more bytes" is not an error); anything else that does not
//! parse is a [`DecodeError`] naming what was wrong.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Size of the fixed frame header in bytes.
pub const FRAME_HEADER_LEN: usize = 10;

/// Largest payload a peer may send in one frame unless the handshake lowers it.
/// Large enough for a head with 64 KiB of headers, small enough that one frame cannot
/// make the receiver allocate much.
pub const DEFAULT_MAX_FRAME_LEN: usize = 256 * 1024;

/// Most header fields in one head or trailer block, either direction. hyper's HTTP/1.1
/// parser and Envoy stop at 100 by default; HTTP/2 viewers can send up to about 2,000
/// within the 64 KiB header list. A block over it refuses only its stream (the frame
/// is skipped whole, the link stays up), and no memory is reserved for its fields.
pub const MAX_HEADER_FIELDS: usize = 1024;

/// The flag that ends the sender's half of a stream (on heads and data).
pub const FLAG_END_STREAM: u8 = 0x1;

/// Frame types. Values are part of the wire format and never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Edge → agent: opens a stream with a viewer's request line and headers.
    RequestHead = 0x1,
    /// Agent → edge: the origin's status and headers for a stream.
    ResponseHead = 0x2,
    /// Both ways: body bytes (or raw bytes of an upgraded stream).
    Data = 0x3,
    /// Both ways: trailing headers; always ends the sender's half.
    Trailers = 0x4,
    /// Both ways: abandons a stream with a reason.
    Reset = 0x5,
    /// Both ways: grants more send credit (stream 0 = the whole connection).
    WindowUpdate = 0x6,
    /// Both ways: heartbeat request, answered by [`FrameType::Pong`].
    Ping = 0x7,
    /// Both ways: heartbeat answer echoing the ping's payload.
    Pong = 0x8,
    /// Edge → agent: "I am leaving; open no new work here, move to another edge".
    GoAway = 0x9,
    /// Agent → edge: how the agent's last probe of its origin went, and how many
    /// distinct edges it wants. Sent only to an edge whose welcome lists the
    /// [`crate::handshake::CAP_AGENT_STATUS`] capability (older edges never see it).
    AgentStatus = 0xa,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<FrameType> {
        Some(match v {
            0x1 => FrameType::RequestHead,
            0x2 => FrameType::ResponseHead,
            0x3 => FrameType::Data,
            0x4 => FrameType::Trailers,
            0x5 => FrameType::Reset,
            0x6 => FrameType::WindowUpdate,
            0x7 => FrameType::Ping,
            0x8 => FrameType::Pong,
            0x9 => FrameType::GoAway,
            0xa => FrameType::AgentStatus,
            _ => return None,
        })
    }
}

/// Why a stream was reset. Unknown codes decode as [`ResetCode::Other`] so newer peers
/// can add codes without breaking older ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResetCode {
    /// The peer broke the protocol on this stream.
    Protocol,
    /// Something failed inside the sender that is not the peer's fault.
    Internal,
    /// The peer sent more data than its credit allowed.
    FlowControl,
    /// The stream was refused before any work started (limit reached, draining);
    /// it is safe to retry elsewhere.
    Refused,
    /// The other end lost interest (viewer went away, request cancelled).
    Cancel,
    /// The agent could not connect to the origin (refused, DNS, TLS).
    OriginUnreachable,
    /// The origin did not answer in time.
    OriginTimeout,
    /// The origin broke the exchange after it had started (reset, malformed reply).
    OriginError,
    /// A head or trailer block the receiver refused for its size (more than
    /// [`MAX_HEADER_FIELDS`] fields); the message names the limit.
    TooLarge,
    /// A code this build does not know.
    Other(u32),
}

impl ResetCode {
    /// The wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            ResetCode::Protocol => 1,
            ResetCode::Internal => 2,
            ResetCode::FlowControl => 3,
            ResetCode::Refused => 4,
            ResetCode::Cancel => 5,
            ResetCode::OriginUnreachable => 6,
            ResetCode::OriginTimeout => 7,
            ResetCode::OriginError => 8,
            ResetCode::TooLarge => 9,
            ResetCode::Other(v) => v,
        }
    }

    /// From the wire value.
    pub fn from_u32(v: u32) -> ResetCode {
        match v {
            1 => ResetCode::Protocol,
            2 => ResetCode::Internal,
            3 => ResetCode::FlowControl,
            4 => ResetCode::Refused,
            5 => ResetCode::Cancel,
            6 => ResetCode::OriginUnreachable,
            7 => ResetCode::OriginTimeout,
            8 => ResetCode::OriginError,
            9 => ResetCode::TooLarge,
            other => ResetCode::Other(other),
        }
    }
}

/// One header field. Names are lowercase ASCII; values are opaque bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Field name, lowercase.
    pub name: String,
    /// Field value as sent.
    pub value: Bytes,
}

impl Header {
    /// Builds a header from a name and value.
    pub fn new(name: impl Into<String>, value: impl Into<Bytes>) -> Header {
        Header {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// A viewer's request as the edge forwards it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Method token (`GET`, `POST`, ...).
    pub method: String,
    /// Origin-form target: path and query (`/a?b=c`).
    pub target: String,
    /// Header fields, hop-by-hop ones already removed by the edge.
    pub headers: Vec<Header>,
}

/// The origin's answer as the agent returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code (100–999).
    pub status: u16,
    /// Header fields.
    pub headers: Vec<Header>,
}

/// The go-away notice an edge sends before it leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoAway {
    /// Streams up to and including this id will still be completed.
    pub last_stream_id: u32,
    /// Human-readable reason (for logs).
    pub message: String,
}

/// Longest message an [`AgentStatus`] frame may carry, in bytes (a longer one is a
/// connection error; senders cut theirs to fit).
pub const MAX_AGENT_STATUS_MESSAGE: usize = 512;

/// The result of the agent's last probe of its origin. Unknown wire values decode as
/// [`OriginState::Other`] so newer agents can add causes without breaking older edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OriginState {
    /// The origin answered below 500 (or the connection opened).
    Healthy,
    /// Nothing listens at the origin's address (TCP refused).
    ConnectionRefused,
    /// No answer within the probe's timeout.
    TimedOut,
    /// The TLS handshake with an `https://` origin failed (certificate, protocol).
    TlsRefused,
    /// The origin answered 500 or above.
    ServerError,
    /// Any other failure to reach it (DNS, unreachable network, reset).
    Unreachable,
    /// A value this build does not know (unhealthy).
    Other(u8),
}

impl OriginState {
    /// The wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            OriginState::Healthy => 0,
            OriginState::ConnectionRefused => 1,
            OriginState::TimedOut => 2,
            OriginState::TlsRefused => 3,
            OriginState::ServerError => 4,
            OriginState::Unreachable => 5,
            OriginState::Other(v) => v,
        }
    }

    /// From the wire value.
    pub fn from_u8(v: u8) -> OriginState {
        match v {
            0 => OriginState::Healthy,
            1 => OriginState::ConnectionRefused,
            2 => OriginState::TimedOut,
            3 => OriginState::TlsRefused,
            4 => OriginState::ServerError,
            5 => OriginState::Unreachable,
            other => OriginState::Other(other),
        }
    }

    /// True for [`OriginState::Healthy`] only.
    pub fn is_healthy(self) -> bool {
        self == OriginState::Healthy
    }

    /// The stable name used in reports and APIs (`healthy`, `connection_refused`,
    /// `timed_out`, `tls_refused`, `server_error`, `unreachable`, `unknown`).
    pub fn as_str(self) -> &'static str {
        match self {
            OriginState::Healthy => "healthy",
            OriginState::ConnectionRefused => "connection_refused",
            OriginState::TimedOut => "timed_out",
            OriginState::TlsRefused => "tls_refused",
            OriginState::ServerError => "server_error",
            OriginState::Unreachable => "unreachable",
            OriginState::Other(_) => "unknown",
        }
    }
}

/// What an agent tells its edge about itself (see [`FrameType::AgentStatus`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// How the last origin probe went.
    pub origin: OriginState,
    /// Distinct edges the agent wants links to (its `--connections`).
    pub wanted_links: u16,
    /// Detail for people (e.g. `HEAD / answered 503`); at most
    /// [`MAX_AGENT_STATUS_MESSAGE`] bytes, never a secret.
    pub message: String,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`FrameType::RequestHead`].
    RequestHead {
        /// Stream being opened (non-zero).
        stream_id: u32,
        /// The request.
        head: RequestHead,
        /// True when the request has no body.
        end_stream: bool,
    },
    /// See [`FrameType::ResponseHead`].
    ResponseHead {
        /// Stream answered.
        stream_id: u32,
        /// The response.
        head: ResponseHead,
        /// True when the response has no body.
        end_stream: bool,
    },
    /// See [`FrameType::Data`].
    Data {
        /// Stream the bytes belong to.
        stream_id: u32,
        /// The bytes (may be empty when only `end_stream` is set).
        data: Bytes,
        /// True when these are the sender's last bytes on the stream.
        end_stream: bool,
    },
    /// See [`FrameType::Trailers`].
    Trailers {
        /// Stream the trailers end.
        stream_id: u32,
        /// Trailer fields.
        headers: Vec<Header>,
    },
    /// See [`FrameType::Reset`].
    Reset {
        /// Stream abandoned.
        stream_id: u32,
        /// Why.
        code: ResetCode,
        /// Human-readable detail (for logs and error pages; never secrets).
        message: String,
    },
    /// See [`FrameType::WindowUpdate`].
    WindowUpdate {
        /// Stream whose credit grows, or 0 for the connection.
        stream_id: u32,
        /// Bytes of credit added (non-zero).
        increment: u32,
    },
    /// See [`FrameType::Ping`].
    Ping {
        /// Opaque value to echo.
        payload: u64,
    },
    /// See [`FrameType::Pong`].
    Pong {
        /// The ping's value.
        payload: u64,
    },
    /// See [`FrameType::GoAway`].
    GoAway(GoAway),
    /// See [`FrameType::AgentStatus`].
    AgentStatus(AgentStatus),
}

impl Frame {
    /// The stream this frame belongs to (0 for connection-level frames).
    pub fn stream_id(&self) -> u32 {
        match self {
            Frame::RequestHead { stream_id, .. }
            | Frame::ResponseHead { stream_id, .. }
            | Frame::Data { stream_id, .. }
            | Frame::Trailers { stream_id, .. }
            | Frame::Reset { stream_id, .. }
            | Frame::WindowUpdate { stream_id, .. } => *stream_id,
            Frame::Ping { .. } | Frame::Pong { .. } | Frame::GoAway(_) | Frame::AgentStatus(_) => 0,
        }
    }

    /// Bytes this frame occupies on the wire.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN + self.payload_len()
    }

    fn payload_len(&self) -> usize {
        fn headers_len(h: &[Header]) -> usize {
            2 + h
                .iter()
                .map(|h| 4 + h.name.len() + h.value.len())
                .sum::<usize>()
        }
        match self {
            Frame::RequestHead { head, .. } => {
                1 + head.method.len() + 2 + head.target.len() + headers_len(&head.headers)
            }
            Frame::ResponseHead { head, .. } => 2 + headers_len(&head.headers),
            Frame::Data { data, .. } => data.len(),
            Frame::Trailers { headers, .. } => headers_len(headers),
            Frame::Reset { message, .. } => 4 + message.len(),
            Frame::WindowUpdate { .. } => 4,
            Frame::Ping { .. } | Frame::Pong { .. } => 8,
            Frame::GoAway(g) => 4 + g.message.len(),
            Frame::AgentStatus(a) => 3 + a.message.len(),
        }
    }
}

/// Why bytes could not be decoded into a frame. Each variant names the fault so the
/// peer's log (and the reset or close reason) says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The type byte is not one this version knows.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The length field exceeds the negotiated maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced payload length.
        len: usize,
        /// Allowed maximum.
        max: usize,
    },
    /// The payload ended before a field it announced.
    #[error("{frame:?} frame truncated while reading {field}")]
    Truncated {
        /// Frame being parsed.
        frame: FrameType,
        /// Field that did not fit.
        field: &'static str,
    },
    /// Bytes were left after the last field.
    #[error("{frame:?} frame has {extra} unexpected trailing bytes")]
    TrailingBytes {
        /// Frame being parsed.
        frame: FrameType,
        /// Bytes left over.
        extra: usize,
    },
    /// A text field was not valid UTF-8 or a header name had invalid characters.
    #[error("{frame:?} frame has an invalid {field}")]
    InvalidField {
        /// Frame being parsed.
        frame: FrameType,
        /// Field at fault.
        field: &'static str,
    },
    /// The stream id is 0 where a stream is required, or non-zero where it must be 0.
    #[error("{frame:?} frame has stream id {stream_id}, which is not allowed for this type")]
    BadStreamId {
        /// Frame being parsed.
        frame: FrameType,
        /// The id found.
        stream_id: u32,
    },
    /// Flags that this frame type does not define were set.
    #[error("{frame:?} frame has undefined flags 0x{flags:02x}")]
    BadFlags {
        /// Frame being parsed.
        frame: FrameType,
        /// The flags found.
        flags: u8,
    },
    /// A window update of zero, which would never unblock anyone.
    #[error("window update with zero increment")]
    ZeroIncrement,
    /// A head or trailer block with more than [`MAX_HEADER_FIELDS`] fields. Unlike the
    /// other errors this one concerns one stream only: the frame is whole and well
    /// delimited, so the receiver may skip its `frame_len` bytes, refuse the stream and
    /// keep the connection.
    #[error("{frame:?} frame on stream {stream_id} has {count} header fields; the limit is {max}")]
    TooManyHeaders {
        /// Frame being parsed.
        frame: FrameType,
        /// The stream it belongs to.
        stream_id: u32,
        /// Fields announced.
        count: usize,
        /// The limit ([`MAX_HEADER_FIELDS`]).
        max: usize,
        /// Bytes the whole frame occupies (header included), to skip it.
        frame_len: usize,
    },
}

/// Checks that `frame` fits its wire fields and `max_len`, so [`encode`] cannot panic
/// on it. Senders call this for heads and trailers, whose contents come from viewers
/// and origins; the error says which field is too large.
pub fn check_encodable(frame: &Frame, max_len: usize) -> Result<(), String> {
    fn headers(h: &[Header]) -> Result<(), String> {
        if h.len() > MAX_HEADER_FIELDS {
            return Err(format!(
                "{} header fields (at most {MAX_HEADER_FIELDS})",
                h.len()
            ));
        }
        for f in h {
            if f.name.len() > usize::from(u16::MAX) || f.value.len() > usize::from(u16::MAX) {
                return Err(format!(
                    "header field '{}' is over 65535 bytes",
                    &f.name[..f.name.len().min(40)]
                ));
            }
        }
        Ok(())
    }
    match frame {
        Frame::RequestHead { head, .. } => {
            if head.method.len() > usize::from(u8::MAX) {
                return Err("method longer than 255 bytes".into());
            }
            if head.target.len() > usize::from(u16::MAX) {
                return Err("request target longer than 65535 bytes".into());
            }
            headers(&head.headers)?;
        }
        Frame::ResponseHead { head, .. } => headers(&head.headers)?,
        Frame::Trailers { headers: h, .. } => headers(h)?,
        _ => {}
    }
    let len = frame.encoded_len() - FRAME_HEADER_LEN;
    if len > max_len {
        return Err(format!(
            "{len} bytes of head, over the {max_len} byte frame limit"
        ));
    }
    Ok(())
}

/// Appends the wire form of `frame` to `dst`.
///
/// Callers keep each field within its wire width (method ≤ 255 bytes, target, header
/// names and values ≤ 65,535 bytes, at most 65,535 headers); the edge enforces far
/// smaller limits on what viewers send, so this only panics on a programming error.
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    let len = frame.payload_len();
    dst.reserve(FRAME_HEADER_LEN + len);
    let (ty, flags) = match frame {
        Frame::RequestHead { end_stream, .. } => (FrameType::RequestHead, end_flag(*end_stream)),
        Frame::ResponseHead { end_stream, .. } => (FrameType::ResponseHead, end_flag(*end_stream)),
        Frame::Data { end_stream, .. } => (FrameType::Data, end_flag(*end_stream)),
        Frame::Trailers { .. } => (FrameType::Trailers, 0),
        Frame::Reset { .. } => (FrameType::Reset, 0),
        Frame::WindowUpdate { .. } => (FrameType::WindowUpdate, 0),
        Frame::Ping { .. } => (FrameType::Ping, 0),
        Frame::Pong { .. } => (FrameType::Pong, 0),
        Frame::GoAway(_) => (FrameType::GoAway, 0),
        Frame::AgentStatus(_) => (FrameType::AgentStatus, 0),
    };
    dst.put_u8(ty as u8);
    dst.put_u8(flags);
    dst.put_u32(frame.stream_id());
    dst.put_u32(u32::try_from(len).expect("frame payload fits in u32"));
    match frame {
        Frame::RequestHead { head, .. } => {
            put_str8(dst, &head.method);
            put_str16(dst, head.target.as_bytes());
            put_headers(dst, &head.headers);
        }
        Frame::ResponseHead { head, .. } => {
            dst.put_u16(head.status);
            put_headers(dst, &head.headers);
        }
        Frame::Data { data, .. } => dst.put_slice(data),
        Frame::Trailers { headers, .. } => put_headers(dst, headers),
        Frame::Reset { code, message, .. } => {
            dst.put_u32(code.to_u32());
            dst.put_slice(message.as_bytes());
        }
        Frame::WindowUpdate { increment, .. } => dst.put_u32(*increment),
        Frame::Ping { payload } | Frame::Pong { payload } => dst.put_u64(*payload),
        Frame::GoAway(g) => {
            dst.put_u32(g.last_stream_id);
            dst.put_slice(g.message.as_bytes());
        }
        Frame::AgentStatus(a) => {
            dst.put_u8(a.origin.to_u8());
            dst.put_u16(a.wanted_links);
            dst.put_slice(a.message.as_bytes());
        }
    }
}

fn end_flag(end: bool) -> u8 {
    if end { FLAG_END_STREAM } else { 0 }
}

fn put_str8(dst: &mut BytesMut, s: &str) {
    dst.put_u8(u8::try_from(s.len()).expect("method fits in 255 bytes"));
    dst.put_slice(s.as_bytes());
}

fn put_str16(dst: &mut BytesMut, s: &[u8]) {
    dst.put_u16(u16::try_from(s.len()).expect("field fits in 65535 bytes"));
    dst.put_slice(s);
}

fn put_headers(dst: &mut BytesMut, headers: &[Header]) {
    dst.put_u16(u16::try_from(headers.len()).expect("at most 65535 headers"));
    for h in headers {
        put_str16(dst, h.name.as_bytes());
        put_str16(dst, &h.value);
    }
}

/// Decodes one frame from the front of `src`.
///
/// Returns `Ok(None)` when `src` holds less than a whole frame (nothing is consumed),
/// `Ok(Some(frame))` after consuming exactly that frame, or an error for a frame that
/// can never be valid. `max_len` bounds the payload length the peer may announce, so
/// a hostile length never makes us wait for (or allocate) more.
///
/// `src` is a [`BytesMut`] (bytes accumulating from a stream) or a [`Bytes`] (one whole
/// message, as the tunnel's WebSocket delivers them); either way a data payload is
/// split off without copying.
pub fn decode<B: DecodeBuf>(src: &mut B, max_len: usize) -> Result<Option<Frame>, DecodeError> {
    if src.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let ty_byte = src[0];
    let ty = FrameType::from_u8(ty_byte).ok_or(DecodeError::UnknownType(ty_byte))?;
    let flags = src[1];
    let stream_id = u32::from_be_bytes([src[2], src[3], src[4], src[5]]);
    let len = u32::from_be_bytes([src[6], src[7], src[8], src[9]]) as usize;
    if len > max_len {
        return Err(DecodeError::TooLarge { len, max: max_len });
    }
    if src.len() < FRAME_HEADER_LEN + len {
        return Ok(None);
    }
    let allowed_flags = match ty {
        FrameType::RequestHead | FrameType::ResponseHead | FrameType::Data => FLAG_END_STREAM,
        _ => 0,
    };
    if flags & !allowed_flags != 0 {
        return Err(DecodeError::BadFlags { frame: ty, flags });
    }
    let needs_stream = !matches!(
        ty,
        FrameType::Ping
            | FrameType::Pong
            | FrameType::GoAway
            | FrameType::WindowUpdate
            | FrameType::AgentStatus
    );
    let conn_only = matches!(
        ty,
        FrameType::Ping | FrameType::Pong | FrameType::GoAway | FrameType::AgentStatus
    );
    if (needs_stream && stream_id == 0) || (conn_only && stream_id != 0) {
        return Err(DecodeError::BadStreamId {
            frame: ty,
            stream_id,
        });
    }
    let end_stream = flags & FLAG_END_STREAM != 0;
    if ty == FrameType::Data {
        // Nothing in a data payload can be invalid: take it without copying.
        src.advance(FRAME_HEADER_LEN);
        let data = src.split_frozen(len);
        return Ok(Some(Frame::Data {
            stream_id,
            data,
            end_stream,
        }));
    }
    // Other payloads are parsed from a copy (they are small) so that a payload which
    // fails to parse leaves `src` untouched, like every other error.
    let mut p = Bytes::copy_from_slice(&src[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len]);
    let frame = match ty {
        FrameType::Data => unreachable!("handled above"),
        FrameType::RequestHead => {
            let method = get_str8(&mut p, ty, "method")?;
            if method.is_empty() || !method.bytes().all(is_tchar) {
                return Err(DecodeError::InvalidField {
                    frame: ty,
                    field: "method",
                });
            }
            let target = get_string16(&mut p, ty, "target")?;
            let headers = get_headers(&mut p, ty, stream_id, FRAME_HEADER_LEN + len)?;
            Frame::RequestHead {
                stream_id,
                head: RequestHead {
                    method,
                    target,
                    headers,
                },
                end_stream,
            }
        }
        FrameType::ResponseHead => {
            let status = get_u16(&mut p, ty, "status")?;
            if !(100..=999).contains(&status) {
                return Err(DecodeError::InvalidField {
                    frame: ty,
                    field: "status",
                });
            }
            let headers = get_headers(&mut p, ty, stream_id, FRAME_HEADER_LEN + len)?;
            Frame::ResponseHead {
                stream_id,
                head: ResponseHead { status, headers },
                end_stream,
            }
        }
        FrameType::Trailers => Frame::Trailers {
            stream_id,
            headers: get_headers(&mut p, ty, stream_id, FRAME_HEADER_LEN + len)?,
        },
        FrameType::Reset => {
            let code = ResetCode::from_u32(get_u32(&mut p, ty, "code")?);
            let message = take_utf8(&mut p, ty, "message")?;
            Frame::Reset {
                stream_id,
                code,
                message,
            }
        }
        FrameType::WindowUpdate => {
            let increment = get_u32(&mut p, ty, "increment")?;
            if increment == 0 {
                return Err(DecodeError::ZeroIncrement);
            }
            Frame::WindowUpdate {
                stream_id,
                increment,
            }
        }
        FrameType::Ping => Frame::Ping {
            payload: get_u64(&mut p, ty)?,
        },
        FrameType::Pong => Frame::Pong {
            payload: get_u64(&mut p, ty)?,
        },
        FrameType::GoAway => {
            let last_stream_id = get_u32(&mut p, ty, "last_stream_id")?;
            let message = take_utf8(&mut p, ty, "message")?;
            Frame::GoAway(GoAway {
                last_stream_id,
                message,
            })
        }
        FrameType::AgentStatus => {
            let origin = OriginState::from_u8(get_u8(&mut p, ty, "origin")?);
            let wanted_links = get_u16(&mut p, ty, "wanted_links")?;
            if p.len() > MAX_AGENT_STATUS_MESSAGE {
                return Err(DecodeError::InvalidField {
                    frame: ty,
                    field: "message",
                });
            }
            let message = take_utf8(&mut p, ty, "message")?;
            Frame::AgentStatus(AgentStatus {
                origin,
                wanted_links,
                message,
            })
        }
    };
    if !p.is_empty() {
        return Err(DecodeError::TrailingBytes {
            frame: ty,
            extra: p.len(),
        });
    }
    src.advance(FRAME_HEADER_LEN + len);
    Ok(Some(frame))
}

/// A buffer [`decode`] reads frames from: its bytes, and a way to split off a prefix as
/// [`Bytes`] without copying.
pub trait DecodeBuf: Buf + std::ops::Deref<Target = [u8]> {
    /// Removes the first `n` bytes and returns them, sharing the allocation.
    fn split_frozen(&mut self, n: usize) -> Bytes;
}

impl DecodeBuf for BytesMut {
    fn split_frozen(&mut self, n: usize) -> Bytes {
        self.split_to(n).freeze()
    }
}

impl DecodeBuf for Bytes {
    fn split_frozen(&mut self, n: usize) -> Bytes {
        self.split_to(n)
    }
}

/// RFC 9110 token characters (methods and header names).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn get_u8(p: &mut Bytes, frame: FrameType, field: &'static str) -> Result<u8, DecodeError> {
    if p.remaining() < 1 {
        return Err(DecodeError::Truncated { frame, field });
    }
    Ok(p.get_u8())
}

fn get_u16(p: &mut Bytes, frame: FrameType, field: &'static str) -> Result<u16, DecodeError> {
    if p.remaining() < 2 {
        return Err(DecodeError::Truncated { frame, field });
    }
    Ok(p.get_u16())
}

fn get_u32(p: &mut Bytes, frame: FrameType, field: &'static str) -> Result<u32, DecodeError> {
    if p.remaining() < 4 {
        return Err(DecodeError::Truncated { frame, field });
    }
    Ok(p.get_u32())
}

fn get_u64(p: &mut Bytes, frame: FrameType) -> Result<u64, DecodeError> {
    if p.remaining() < 8 {
        return Err(DecodeError::Truncated {
            frame,
            field: "payload",
        });
    }
    Ok(p.get_u64())
}

fn get_bytes(
    p: &mut Bytes,
    n: usize,
    frame: FrameType,
    field: &'static str,
) -> Result<Bytes, DecodeError> {
    if p.remaining() < n {
        return Err(DecodeError::Truncated { frame, field });
    }
    Ok(p.split_to(n))
}

fn to_string(b: Bytes, frame: FrameType, field: &'static str) -> Result<String, DecodeError> {
    String::from_utf8(b.to_vec()).map_err(|_| DecodeError::InvalidField { frame, field })
}

fn get_str8(p: &mut Bytes, frame: FrameType, field: &'static str) -> Result<String, DecodeError> {
    if p.remaining() < 1 {
        return Err(DecodeError::Truncated { frame, field });
    }
    let n = p.get_u8() as usize;
    let b = get_bytes(p, n, frame, field)?;
    to_string(b, frame, field)
}

fn get_string16(
    p: &mut Bytes,
    frame: FrameType,
    field: &'static str,
) -> Result<String, DecodeError> {
    let n = get_u16(p, frame, field)? as usize;
    let b = get_bytes(p, n, frame, field)?;
    to_string(b, frame, field)
}

fn take_utf8(p: &mut Bytes, frame: FrameType, field: &'static str) -> Result<String, DecodeError> {
    let b = std::mem::take(p);
    to_string(b, frame, field)
}

fn get_headers(
    p: &mut Bytes,
    frame: FrameType,
    stream_id: u32,
    frame_len: usize,
) -> Result<Vec<Header>, DecodeError> {
    let count = get_u16(p, frame, "header count")? as usize;
    // Refused on the count alone, before anything is reserved or parsed: an `http`
    // HeaderMap panics beyond 24,576 fields, and nobody needs that many.
    if count > MAX_HEADER_FIELDS {
        return Err(DecodeError::TooManyHeaders {
            frame,
            stream_id,
            count,
            max: MAX_HEADER_FIELDS,
            frame_len,
        });
    }
    // Each header needs at least 4 bytes, so a hostile count cannot make us reserve
    // more than the payload could hold.
    let mut headers = Vec::with_capacity(count.min(p.remaining() / 4));
    for _ in 0..count {
        let n = get_u16(p, frame, "header name")? as usize;
        let name = get_bytes(p, n, frame, "header name")?;
        if name.is_empty() || !name.iter().all(|b| is_tchar(*b) && !b.is_ascii_uppercase()) {
            return Err(DecodeError::InvalidField {
                frame,
                field: "header name",
            });
        }
        let name = to_string(name, frame, "header name")?;
        let n = get_u16(p, frame, "header value")? as usize;
        let value = get_bytes(p, n, frame, "header value")?;
        if value.iter().any(|b| *b == b'\r' || *b == b'\n' || *b == 0) {
            return Err(DecodeError::InvalidField {
                frame,
                field: "header value",
            });
        }
        headers.push(Header { name, value });
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let mut b = BytesMut::new();
        encode(&f, &mut b);
        assert_eq!(b.len(), f.encoded_len());
        let got = decode(&mut b, DEFAULT_MAX_FRAME_LEN).unwrap().unwrap();
        assert_eq!(got, f);
        assert!(b.is_empty());
        // The same bytes as one whole message (`Bytes`) decode the same.
        let mut m = BytesMut::new();
        encode(&f, &mut m);
        let mut m = m.freeze();
        assert_eq!(decode(&mut m, DEFAULT_MAX_FRAME_LEN).unwrap().unwrap(), f);
        assert!(m.is_empty());
    }

    #[test]
    fn every_frame_type_round_trips() {
        roundtrip(Frame::RequestHead {
            stream_id: 1,
            head: RequestHead {
                method: "POST".into(),
                target: "/upload?x=1".into(),
                headers: vec![Header::new("content-type", "text/plain")],
            },
            end_stream: false,
        });
        roundtrip(Frame::ResponseHead {
            stream_id: 7,
            head: ResponseHead {
                status: 101,
                headers: vec![],
            },
            end_stream: true,
        });
        roundtrip(Frame::Data {
            stream_id: 3,
            data: Bytes::from_static(b"hello"),
            end_stream: true,
        });
        roundtrip(Frame::Trailers {
            stream_id: 3,
            headers: vec![Header::new("grpc-status", "0")],
        });
        roundtrip(Frame::Reset {
            stream_id: 3,
            code: ResetCode::OriginUnreachable,
            message: "connection refused".into(),
        });
        roundtrip(Frame::WindowUpdate {
            stream_id: 0,
            increment: 65536,
        });
        roundtrip(Frame::Ping { payload: 42 });
        roundtrip(Frame::Pong { payload: 42 });
        roundtrip(Frame::GoAway(GoAway {
            last_stream_id: 9,
            message: "draining".into(),
        }));
    }

    #[test]
    fn partial_input_needs_more_bytes_and_consumes_nothing() {
        let mut b = BytesMut::new();
        encode(
            &Frame::Data {
                stream_id: 1,
                data: Bytes::from_static(b"abcdef"),
                end_stream: false,
            },
            &mut b,
        );
        for cut in 0..b.len() {
            let mut part = BytesMut::from(&b[..cut]);
            assert_eq!(decode(&mut part, 1024), Ok(None));
            assert_eq!(part.len(), cut);
        }
    }

    #[test]
    fn agent_status_has_a_fixed_wire_form_and_a_bounded_message() {
        let f = Frame::AgentStatus(AgentStatus {
            origin: OriginState::ConnectionRefused,
            wanted_links: 2,
            message: "no".into(),
        });
        let mut b = BytesMut::new();
        encode(&f, &mut b);
        assert_eq!(
            &b[..],
            &[0xa, 0, 0, 0, 0, 0, 0, 0, 0, 5, 1, 0, 2, b'n', b'o'][..]
        );
        assert_eq!(decode(&mut b, 1024), Ok(Some(f)));
        // On a stream: refused.
        let mut b = BytesMut::from(&[0xa, 0, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 1][..]);
        assert!(matches!(
            decode(&mut b, 1024),
            Err(DecodeError::BadStreamId { .. })
        ));
        // A message over the limit: refused, even within the frame limit.
        let long = Frame::AgentStatus(AgentStatus {
            origin: OriginState::Healthy,
            wanted_links: 1,
            message: "x".repeat(MAX_AGENT_STATUS_MESSAGE + 1),
        });
        let mut b = BytesMut::new();
        encode(&long, &mut b);
        assert!(matches!(
            decode(&mut b, 1 << 20),
            Err(DecodeError::InvalidField {
                field: "message",
                ..
            })
        ));
        // Unknown states survive a round trip as unhealthy.
        assert_eq!(OriginState::from_u8(77), OriginState::Other(77));
        assert!(!OriginState::Other(77).is_healthy());
    }

    #[test]
    fn hostile_frames_are_errors_with_reasons() {
        let mut b = BytesMut::from(&[0xee, 0, 0, 0, 0, 1, 0, 0, 0, 0][..]);
        assert_eq!(decode(&mut b, 1024), Err(DecodeError::UnknownType(0xee)));
        let mut b = BytesMut::from(&[3, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode(&mut b, 1024),
            Err(DecodeError::TooLarge { .. })
        ));
        let mut b = BytesMut::from(&[3, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        assert!(matches!(
            decode(&mut b, 1024),
            Err(DecodeError::BadStreamId { .. })
        ));
        let mut b = BytesMut::from(&[6, 0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0][..]);
        assert_eq!(decode(&mut b, 1024), Err(DecodeError::ZeroIncrement));
        // A header count that promises more than the payload holds.
        let mut b = BytesMut::from(&[2, 0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 200, 0, 200][..]);
        assert!(matches!(
            decode(&mut b, 1024),
            Err(DecodeError::Truncated { .. })
        ));
        // More fields than MAX_HEADER_FIELDS: refused on the count, skippable.
        let mut b = BytesMut::from(&[2, 0, 0, 0, 0, 7, 0, 0, 0, 4, 0, 200, 0xff, 0xff][..]);
        assert_eq!(
            decode(&mut b, 1024),
            Err(DecodeError::TooManyHeaders {
                frame: FrameType::ResponseHead,
                stream_id: 7,
                count: 65535,
                max: MAX_HEADER_FIELDS,
                frame_len: 14,
            })
        );
        assert_eq!(b.len(), 14, "like every error, nothing is consumed");
    }

    #[test]
    fn senders_never_send_more_fields_than_receivers_take() {
        let headers = vec![Header::new("a", ""); MAX_HEADER_FIELDS + 1];
        let f = Frame::Trailers {
            stream_id: 1,
            headers,
        };
        assert!(check_encodable(&f, DEFAULT_MAX_FRAME_LEN).is_err());
    }
}
