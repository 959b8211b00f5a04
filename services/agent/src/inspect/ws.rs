//! WebSocket sessions in the inspector.
//!
//! After a `101 Switching Protocols` to `Upgrade: websocket`, the agent relays raw bytes
//! between the tunnel and the origin ([`netbore_mux::bridge`]). [`WsTap`] wraps the
//! origin's side of that relay and hands a *copy* of each chunk, as it passes, to a
//! [`FrameParser`] per direction: the relayed bytes are never held, split or delayed,
//! and the parser keeps at most one frame header (14 bytes), one control payload (125
//! bytes) and the first [`InspectConfig::ws_message_cap`] bytes of the first
//! [`InspectConfig::ws_messages`] messages each way.
//!
//! The parser is sans-I/O (feed it bytes, read its counters) and never fails the relay:
//! on anything it cannot read (an extension's frames, e.g. compressed
//! `permessage-deflate`; an invalid length; a frame out of order) it stops, the session
//! is marked *capture stopped* with the reason, and the bytes keep flowing (still
//! counted).
//!
//! [`InspectConfig::ws_message_cap`]: super::InspectConfig::ws_message_cap
//! [`InspectConfig::ws_messages`]: super::InspectConfig::ws_messages

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Messages kept each way, by default (the rest are counted).
pub const DEFAULT_WS_MESSAGES: usize = 20;
/// Bytes kept of each kept message, by default (the rest are counted).
pub const DEFAULT_WS_MESSAGE_CAP: usize = 4096;
/// The longest frame header: 2 bytes, an 8-byte length, a 4-byte mask.
const MAX_HEADER: usize = 14;
/// A control frame's payload is at most this long (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;
/// Bytes of the inspector's weight each kept message adds beyond its data.
pub const MESSAGE_OVERHEAD: usize = 48;

/// A data message's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Opcode 1: UTF-8 text.
    Text,
    /// Opcode 2: bytes.
    Binary,
}

/// A whole data message (its fragments joined), as kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsMessage {
    /// Text or binary.
    pub kind: MessageKind,
    /// Payload bytes of the whole message.
    pub size: u64,
    /// The first bytes, up to the cap.
    pub data: Bytes,
}

/// A close frame's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// The status code; `None` for a close frame without one (1005 in the RFC's terms).
    pub code: Option<u16>,
    /// The reason, as sent (lossy UTF-8).
    pub reason: String,
}

/// Where the parser is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Collecting a frame header.
    Header,
    /// Inside a frame's payload.
    Payload,
    /// Gave up; counts bytes only.
    Stopped,
}

/// The data message being assembled from fragments.
#[derive(Debug)]
struct Partial {
    kind: MessageKind,
    size: u64,
    /// `None` when the message will not be kept (past the message count).
    data: Option<Vec<u8>>,
}

/// One direction's frames, parsed incrementally from copies of the relayed bytes.
#[derive(Debug)]
pub struct FrameParser {
    keep_messages: usize,
    message_cap: usize,
    phase: Phase,
    header: [u8; MAX_HEADER],
    header_len: usize,
    // The frame in hand.
    opcode: u8,
    fin: bool,
    mask: Option<[u8; 4]>,
    /// Payload offset within the frame (for unmasking).
    offset: u64,
    remaining: u64,
    control: Vec<u8>,
    message: Option<Partial>,
    /// Bytes seen on the wire, frames and all, parsed or not.
    pub wire_bytes: u64,
    /// Whole data messages seen.
    pub messages: u64,
    /// Payload bytes of data messages.
    pub payload_bytes: u64,
    /// Ping and pong frames seen.
    pub pings: u64,
    /// The first messages.
    pub kept: Vec<WsMessage>,
    /// The close frame, once seen.
    pub close: Option<Close>,
    /// Why parsing stopped, when it did.
    pub stopped: Option<String>,
}

impl FrameParser {
    /// A parser keeping the first `keep_messages` messages, `message_cap` bytes of each.
    pub fn new(keep_messages: usize, message_cap: usize) -> FrameParser {
        FrameParser {
            keep_messages,
            message_cap,
            phase: Phase::Header,
            header: [0; MAX_HEADER],
            header_len: 0,
            opcode: 0,
            fin: false,
            mask: None,
            offset: 0,
            remaining: 0,
            control: Vec::new(),
            message: None,
            wire_bytes: 0,
            messages: 0,
            payload_bytes: 0,
            pings: 0,
            kept: Vec::new(),
            close: None,
            stopped: None,
        }
    }

    /// Stops parsing (bytes are still counted) and says why.
    pub fn stop(&mut self, why: impl Into<String>) {
        if self.phase != Phase::Stopped {
            self.phase = Phase::Stopped;
            self.stopped = Some(why.into());
            self.message = None;
            self.control = Vec::new();
        }
    }

    /// Takes in the next bytes of the stream, in any split.
    pub fn feed(&mut self, mut buf: &[u8]) {
        self.wire_bytes += buf.len() as u64;
        while !buf.is_empty() {
            match self.phase {
                Phase::Stopped => return,
                Phase::Header => {
                    let need = header_len(&self.header[..self.header_len]);
                    let take = (need - self.header_len).min(buf.len());
                    self.header[self.header_len..self.header_len + take]
                        .copy_from_slice(&buf[..take]);
                    self.header_len += take;
                    buf = &buf[take..];
                    // The length is known once the first two bytes are in.
                    if self.header_len == header_len(&self.header[..self.header_len]) {
                        self.begin_frame();
                    }
                }
                Phase::Payload => {
                    let take = (self.remaining.min(buf.len() as u64)) as usize;
                    self.payload(&buf[..take]);
                    buf = &buf[take..];
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.end_frame();
                    }
                }
            }
        }
    }

    /// The header is complete: check it and start the payload.
    fn begin_frame(&mut self) {
        let h = self.header;
        let n = self.header_len;
        self.header_len = 0;
        let (b0, b1) = (h[0], h[1]);
        self.fin = b0 & 0x80 != 0;
        self.opcode = b0 & 0x0f;
        let masked = b1 & 0x80 != 0;
        let (len, at) = match b1 & 0x7f {
            126 => (u16::from_be_bytes([h[2], h[3]]) as u64, 4),
            127 => (
                u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                10,
            ),
            l => (l as u64, 2),
        };
        self.mask = masked.then(|| [h[at], h[at + 1], h[at + 2], h[at + 3]]);
        debug_assert_eq!(n, at + if masked { 4 } else { 0 });
        if b0 & 0x70 != 0 {
            return self.stop(
                "a frame uses an extension (reserved bits set, e.g. permessage-deflate compression)",
            );
        }
        if len >> 63 != 0 {
            return self.stop("a frame declares a length over 2^63 bytes (not WebSocket)");
        }
        match self.opcode {
            0x8..=0xa => {
                if !self.fin || len > MAX_CONTROL_PAYLOAD as u64 {
                    return self.stop(format!(
                        "a control frame is fragmented or over {MAX_CONTROL_PAYLOAD} bytes"
                    ));
                }
                self.control.clear();
            }
            0x0 => {
                if self.message.is_none() {
                    return self.stop("a continuation frame without a message to continue");
                }
            }
            0x1 | 0x2 => {
                if self.message.is_some() {
                    return self.stop("a new message began before the last one ended");
                }
                let keep = (self.kept.len() < self.keep_messages).then(Vec::new);
                self.message = Some(Partial {
                    kind: if self.opcode == 1 {
                        MessageKind::Text
                    } else {
                        MessageKind::Binary
                    },
                    size: 0,
                    data: keep,
                });
            }
            op => return self.stop(format!("a frame has the unknown opcode {op:#x}")),
        }
        self.offset = 0;
        self.remaining = len;
        self.phase = Phase::Payload;
        if len == 0 {
            self.end_frame();
        }
    }

    /// Payload bytes of the frame in hand.
    fn payload(&mut self, chunk: &[u8]) {
        let control = self.opcode >= 0x8;
        let room = if control {
            MAX_CONTROL_PAYLOAD
        } else {
            match &mut self.message {
                Some(Partial {
                    data: Some(d),
                    size,
                    ..
                }) => {
                    *size += chunk.len() as u64;
                    self.message_cap.saturating_sub(d.len())
                }
                Some(p) => {
                    p.size += chunk.len() as u64;
                    0
                }
                None => 0,
            }
        };
        if !control {
            self.payload_bytes += chunk.len() as u64;
        }
        let take = room.min(chunk.len());
        let offset = self.offset;
        self.offset += chunk.len() as u64;
        if take > 0 {
            let mask = self.mask;
            let out = match (&mut self.message, control) {
                (_, true) => &mut self.control,
                (Some(Partial { data: Some(d), .. }), false) => d,
                // No room without a kept message.
                _ => return,
            };
            out.extend(chunk[..take].iter().enumerate().map(|(i, b)| match mask {
                Some(m) => b ^ m[((offset + i as u64) % 4) as usize],
                None => *b,
            }));
        }
    }

    /// The frame in hand ended.
    fn end_frame(&mut self) {
        self.phase = Phase::Header;
        match self.opcode {
            0x8 => {
                let c = &self.control;
                let close = if c.len() >= 2 {
                    Close {
                        code: Some(u16::from_be_bytes([c[0], c[1]])),
                        reason: String::from_utf8_lossy(&c[2..]).into_owned(),
                    }
                } else {
                    Close {
                        code: None,
                        reason: String::new(),
                    }
                };
                self.close.get_or_insert(close);
            }
            0x9 | 0xa => self.pings += 1,
            _ if self.fin => {
                if let Some(p) = self.message.take() {
                    self.messages += 1;
                    if let Some(d) = p.data {
                        self.kept.push(WsMessage {
                            kind: p.kind,
                            size: p.size,
                            data: Bytes::from(d),
                        });
                    }
                }
            }
            _ => {}
        }
    }

    /// Bytes the kept messages weigh against the store's byte cap.
    pub fn weight(&self) -> usize {
        self.kept
            .iter()
            .map(|m| m.data.len() + MESSAGE_OVERHEAD)
            .sum()
    }
}

/// How long the header whose first bytes are `h` is (2 until the second byte is known).
fn header_len(h: &[u8]) -> usize {
    if h.len() < 2 {
        return 2;
    }
    let ext = match h[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if h[1] & 0x80 != 0 { 4 } else { 0 }
}

/// One WebSocket session: both directions, and when it started and ended.
#[derive(Debug)]
pub struct WsSession {
    /// Frames the viewer sent to the origin.
    pub to_origin: FrameParser,
    /// Frames the origin sent to the viewer.
    pub from_origin: FrameParser,
    started: Instant,
    ended: Option<Instant>,
}

impl WsSession {
    /// A session starting now; `extensions` is the origin's `Sec-WebSocket-Extensions`
    /// answer: frames of a negotiated extension are not decoded, so capture stops at
    /// once (the bytes are still counted).
    pub fn new(keep_messages: usize, message_cap: usize, extensions: Option<&str>) -> WsSession {
        let mut s = WsSession {
            to_origin: FrameParser::new(keep_messages, message_cap),
            from_origin: FrameParser::new(keep_messages, message_cap),
            started: Instant::now(),
            ended: None,
        };
        if let Some(x) = extensions.map(str::trim).filter(|x| !x.is_empty()) {
            let why = format!(
                "the session uses the extension '{x}', whose frames the inspector does not decode"
            );
            s.to_origin.stop(why.clone());
            s.from_origin.stop(why);
        }
        s
    }

    /// From the 101 to the end of the relay (or until now, while it lasts).
    pub fn duration(&self) -> Duration {
        self.ended
            .unwrap_or_else(Instant::now)
            .duration_since(self.started)
    }

    /// Why capture stopped, naming the direction; `None` while it goes on.
    pub fn stopped(&self) -> Option<String> {
        match (&self.to_origin.stopped, &self.from_origin.stopped) {
            (Some(a), Some(b)) if a == b => Some(a.clone()),
            (Some(a), _) => Some(format!("viewer to origin: {a}")),
            (_, Some(b)) => Some(format!("origin to viewer: {b}")),
            _ => None,
        }
    }

    /// Bytes it holds against the store's byte cap.
    pub fn weight(&self) -> usize {
        self.to_origin.weight() + self.from_origin.weight()
    }

    /// The session as `/api/requests/{id}` shows it.
    pub fn view(&self) -> Value {
        json!({
            "duration_ms": self.duration().as_millis() as u64,
            "capture_stopped": self.stopped(),
            "to_origin": direction_view(&self.to_origin),
            "from_origin": direction_view(&self.from_origin),
        })
    }
}

fn direction_view(p: &FrameParser) -> Value {
    json!({
        "messages": p.messages,
        "bytes": p.wire_bytes,
        "payload_bytes": p.payload_bytes,
        "pings": p.pings,
        "close": p.close.as_ref().map(|c| json!({"code": c.code, "reason": c.reason})),
        "first": p.kept.iter().map(message_view).collect::<Vec<_>>(),
    })
}

/// A message as shown: text as text (cut at a character), binary as its size and a hex
/// preview; a text message that is not UTF-8 shows as binary.
fn message_view(m: &WsMessage) -> Value {
    let truncated = m.size > m.data.len() as u64;
    let mut v = json!({"size": m.size, "captured": m.data.len(), "truncated": truncated});
    let text = match (m.kind, std::str::from_utf8(&m.data)) {
        (MessageKind::Text, Ok(t)) => Some(t),
        (MessageKind::Text, Err(e)) if truncated && e.error_len().is_none() => {
            std::str::from_utf8(&m.data[..e.valid_up_to()]).ok()
        }
        _ => None,
    };
    match text {
        Some(t) => {
            v["kind"] = json!("text");
            v["text"] = json!(t);
        }
        None => {
            v["kind"] = json!("binary");
            v["hex"] = json!(super::hex_preview(
                &m.data[..m.data.len().min(super::HEX_PREVIEW)]
            ));
        }
    }
    v
}

/// The origin's side of an upgraded connection, copying what passes each way into a
/// [`WsSession`]: reads are the origin's frames, writes the viewer's. Bytes pass
/// exactly as they would without it.
pub struct WsTap<IO> {
    inner: IO,
    session: Arc<Mutex<WsSession>>,
}

impl<IO> WsTap<IO> {
    /// Taps `inner` into `session`.
    pub fn new(inner: IO, session: Arc<Mutex<WsSession>>) -> WsTap<IO> {
        WsTap { inner, session }
    }
}

impl<IO> Drop for WsTap<IO> {
    fn drop(&mut self) {
        self.session.lock().ended.get_or_insert_with(Instant::now);
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WsTap<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                self.session.lock().from_origin.feed(new);
            }
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WsTap<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.session.lock().to_origin.feed(&buf[..n]);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One frame as a peer would send it.
    fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n < 65536 => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(k) => {
                f.extend_from_slice(&k);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => f.extend_from_slice(payload),
        }
        f
    }

    /// A conversation with every feature: fragmented text with a ping and a pong
    /// between its fragments, a 16-bit-length binary message, an empty message, a close.
    fn conversation(mask: Option<[u8; 4]>) -> Vec<u8> {
        let bin: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        [
            frame(true, 1, b"hello", mask),
            frame(false, 1, b"frag", mask),
            frame(true, 9, b"ping!", mask),
            frame(false, 0, b"ment", mask),
            frame(true, 10, b"", mask),
            frame(true, 0, b"ed", mask),
            frame(true, 2, &bin, mask),
            frame(true, 1, b"", mask),
            frame(true, 8, b"\x03\xe8bye", mask),
        ]
        .concat()
    }

    fn check(p: &FrameParser, wire: usize) {
        assert_eq!(p.stopped, None);
        assert_eq!(p.wire_bytes, wire as u64);
        assert_eq!(p.messages, 4);
        assert_eq!(p.pings, 2);
        assert_eq!(p.payload_bytes, 5 + 10 + 300);
        let texts: Vec<&[u8]> = p.kept.iter().map(|m| &m.data[..]).collect();
        assert_eq!(texts[0], b"hello");
        assert_eq!(texts[1], b"fragmented");
        assert_eq!(p.kept[2].kind, MessageKind::Binary);
        assert_eq!(p.kept[2].size, 300);
        assert_eq!(p.kept[2].data.len(), 300);
        assert_eq!(p.kept[2].data[299], 43);
        assert_eq!(texts[3], b"");
        assert_eq!(
            p.close,
            Some(Close {
                code: Some(1000),
                reason: "bye".into()
            })
        );
    }

    #[test]
    fn masked_and_unmasked_conversations_parse_split_at_every_byte_boundary() {
        for mask in [None, Some([0x37, 0xfa, 0x21, 0x3d])] {
            let wire = conversation(mask);
            let mut whole = FrameParser::new(20, 4096);
            whole.feed(&wire);
            check(&whole, wire.len());
            // Every split into two pieces, and byte by byte.
            for at in 0..=wire.len() {
                let mut p = FrameParser::new(20, 4096);
                p.feed(&wire[..at]);
                p.feed(&wire[at..]);
                check(&p, wire.len());
            }
            let mut p = FrameParser::new(20, 4096);
            for b in &wire {
                p.feed(std::slice::from_ref(b));
            }
            check(&p, wire.len());
        }
    }

    #[test]
    fn big_lengths_caps_and_counts() {
        // A 64-bit length; only the cap is kept, everything counted; only two kept.
        let big = vec![b'x'; 70_000];
        let wire = [
            frame(true, 2, &big, Some([1, 2, 3, 4])),
            frame(true, 1, b"second", None),
            frame(true, 1, b"third", None),
        ]
        .concat();
        let mut p = FrameParser::new(2, 100);
        for c in wire.chunks(777) {
            p.feed(c);
        }
        assert_eq!(p.stopped, None);
        assert_eq!(p.messages, 3);
        assert_eq!(p.payload_bytes, 70_000 + 6 + 5);
        assert_eq!(p.kept.len(), 2);
        assert_eq!(p.kept[0].size, 70_000);
        assert_eq!(&p.kept[0].data[..], &[b'x'; 100][..]);
        assert_eq!(&p.kept[1].data[..], b"second");
        assert_eq!(p.weight(), 100 + 6 + 2 * MESSAGE_OVERHEAD);
    }

    #[test]
    fn what_it_cannot_read_stops_capture_and_still_counts_bytes() {
        let stops = |wire: Vec<u8>, why: &str| {
            let mut p = FrameParser::new(20, 4096);
            p.feed(&wire);
            p.feed(b"more bytes after");
            let got = p.stopped.clone().unwrap_or_default();
            assert!(got.contains(why), "{got:?} should say {why:?}");
            assert_eq!(p.wire_bytes, wire.len() as u64 + 16);
        };
        // permessage-deflate sets RSV1.
        let mut deflated = frame(true, 1, b"zz", None);
        deflated[0] |= 0x40;
        stops(deflated, "reserved bits");
        let mut huge = frame(true, 2, &[0; 70_000], None);
        huge[2] = 0x80;
        stops(huge, "over 2^63");
        stops(frame(true, 9, &[0; 126], None), "control frame");
        stops(frame(false, 8, b"", None), "control frame");
        stops(frame(true, 0, b"x", None), "continuation");
        stops(
            [frame(false, 1, b"a", None), frame(true, 1, b"b", None)].concat(),
            "before the last one ended",
        );
        stops(frame(true, 3, b"", None), "unknown opcode 0x3");
        // An extension in the 101 stops both directions from the start.
        let s = WsSession::new(20, 4096, Some("permessage-deflate"));
        assert!(s.stopped().unwrap().contains("permessage-deflate"));
    }

    #[test]
    fn the_view_shows_text_as_text_and_binary_as_hex() {
        let mut s = WsSession::new(20, 2, None);
        s.to_origin
            .feed(&frame(true, 1, "héllo".as_bytes(), Some([9, 9, 9, 9])));
        s.from_origin.feed(&frame(true, 2, &[0, 1, 2, 255], None));
        s.from_origin.feed(&frame(true, 8, b"\x03\xe9gone", None));
        let v = s.view();
        let up = &v["to_origin"];
        assert_eq!(up["messages"], 1);
        // Cut at the cap inside 'é': the text shows up to the last whole character.
        assert_eq!(up["first"][0]["kind"], "text");
        assert_eq!(up["first"][0]["text"], "h");
        assert_eq!(up["first"][0]["size"], 6);
        assert_eq!(up["first"][0]["truncated"], true);
        let down = &v["from_origin"];
        assert_eq!(down["first"][0]["kind"], "binary");
        assert!(down["first"][0]["hex"].as_str().unwrap().contains("00 01"));
        assert_eq!(down["first"][0]["size"], 4);
        assert_eq!(down["close"], json!({"code": 1001, "reason": "gone"}));
        assert_eq!(v["capture_stopped"], Value::Null);
    }
}
