//! WebSocket framing (RFC 6455 §5) for the agent link, without sockets.
//!
//! The link carries the protocol's frames inside binary WebSocket messages. This module
//! is the framing of those messages, written so that a payload is never copied: a sender
//! writes the header from [`encode_header`] and the payload side by side (one vectored
//! write), masking the payload in place first when it is the client ([`apply_mask`]); a
//! receiver takes whole frames off its read buffer with [`decode`], which unmasks them in
//! place and hands the payload out as `Bytes` sharing that buffer. [`Reassembly`] joins a
//! fragmented message, which a standard peer may send.
//!
//! Chosen over the WebSocket crates by measurement (docs/benchmarks.md, "WebSocket
//! layer"). The HTTP upgrade stays with tokio-tungstenite. Extensions are not
//! negotiated, so the RSV bits must be clear; lengths must use the minimal encoding.

use bytes::{Buf, Bytes, BytesMut};

/// The longest frame header: 2 bytes, 8 of extended length, 4 of masking key.
pub const MAX_HEADER_LEN: usize = 14;

/// The longest payload of a control frame (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Frame opcodes (§5.2). Values are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    /// A later piece of a fragmented message.
    Continuation = 0x0,
    /// The first frame of a UTF-8 text message (the handshake's JSON).
    Text = 0x1,
    /// The first frame of a binary message (the protocol's frames).
    Binary = 0x2,
    /// Closes the connection; may carry a code and a reason.
    Close = 0x8,
    /// Asks the peer for a [`OpCode::Pong`] with the same payload.
    Ping = 0x9,
    /// Answers a ping, or a one-way heartbeat.
    Pong = 0xA,
}

impl OpCode {
    /// The opcode for a 4-bit value, or `None` for the values RFC 6455 reserves.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// Close, ping and pong: never fragmented, at most 125 bytes.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// Why bytes from the peer are not a frame this end accepts. Every variant is the
/// peer's fault; the link closes with it as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// RSV1-3 set, but no extension was negotiated.
    #[error("websocket frame with reserved bits set (no extension was negotiated)")]
    ReservedBits,
    /// An opcode RFC 6455 reserves.
    #[error("websocket frame with reserved opcode 0x{0:x}")]
    ReservedOpcode(u8),
    /// A client sent an unmasked frame or a server a masked one (§5.1).
    #[error("websocket frame masked the wrong way for its direction")]
    Masking,
    /// A control frame fragmented or over [`MAX_CONTROL_PAYLOAD`] bytes (§5.5).
    #[error("websocket control frame fragmented or over 125 bytes")]
    BadControl,
    /// A length not in its shortest form, or a 64-bit length with the top bit set.
    #[error("websocket frame length not minimally encoded")]
    BadLength,
    /// A frame or message longer than this end accepts.
    #[error("websocket message of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Length announced (for a message: reached so far).
        len: u64,
        /// Allowed maximum.
        max: usize,
    },
    /// A continuation without a message to continue, or a new message before the
    /// last one ended (§5.4).
    #[error("websocket fragments out of order")]
    Fragmentation,
}

/// One frame taken off the read buffer, its payload unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsFrame {
    /// FIN: the last frame of its message.
    pub fin: bool,
    /// What the frame carries.
    pub opcode: OpCode,
    /// The masking key the frame came with (kept so a frame can be re-encoded).
    pub mask: Option<[u8; 4]>,
    /// The payload, unmasked, sharing the read buffer's allocation.
    pub payload: Bytes,
}

/// Writes the header of a frame with `len` payload bytes into `out` and returns its
/// length. With `mask` the header carries the key; the caller masks the payload.
pub fn encode_header(
    out: &mut [u8; MAX_HEADER_LEN],
    fin: bool,
    opcode: OpCode,
    len: usize,
    mask: Option<[u8; 4]>,
) -> usize {
    out[0] = (u8::from(fin) << 7) | opcode as u8;
    let m = if mask.is_some() { 0x80 } else { 0 };
    let mut n = if len < 126 {
        out[1] = m | len as u8;
        2
    } else if let Ok(l) = u16::try_from(len) {
        out[1] = m | 126;
        out[2..4].copy_from_slice(&l.to_be_bytes());
        4
    } else {
        out[1] = m | 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    if let Some(k) = mask {
        out[n..n + 4].copy_from_slice(&k);
        n += 4;
    }
    n
}

/// XORs `buf` with the masking key, in place: masks and unmasks alike (§5.3).
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let k = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut words = buf.chunks_exact_mut(8);
    for w in &mut words {
        let v = u64::from_ne_bytes(w.try_into().expect("8 bytes")) ^ k;
        w.copy_from_slice(&v.to_ne_bytes());
    }
    // The rest starts at a multiple of 8, where the key lines up at its first byte.
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Takes one whole frame off the front of `buf`. `Ok(None)` when the frame is not all
/// there yet (nothing is consumed; "need more bytes" is not an error); see [`needed`]
/// for how much to read. `masked` is whether frames in this direction must be masked
/// (this end is the server); `max` bounds the payload. On an error nothing is consumed.
pub fn decode(buf: &mut BytesMut, masked: bool, max: usize) -> Result<Option<WsFrame>, WsError> {
    let Some((head, len)) = parse_header(buf, masked, max)? else {
        return Ok(None);
    };
    if buf.len() < head + len {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = OpCode::from_u8(buf[0] & 0x0F).expect("checked by parse_header");
    let mask = masked.then(|| {
        let k = &buf[head - 4..head];
        [k[0], k[1], k[2], k[3]]
    });
    buf.advance(head);
    let mut payload = buf.split_to(len);
    if let Some(k) = mask {
        apply_mask(&mut payload, k);
    }
    Ok(Some(WsFrame {
        fin,
        opcode,
        mask,
        payload: payload.freeze(),
    }))
}

/// How many more bytes `buf` needs before [`decode`] can return the frame at its front
/// (at least 1 when it returned `Ok(None)`; 0 when a frame or an error is ready).
pub fn needed(buf: &[u8], masked: bool, max: usize) -> usize {
    match parse_header(buf, masked, max) {
        Ok(Some((head, len))) => (head + len).saturating_sub(buf.len()),
        Ok(None) => {
            let short = buf.get(1).map_or(0, |b| b & 0x7F);
            let ext: usize = match short {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            (2 + ext + if masked { 4 } else { 0 })
                .saturating_sub(buf.len())
                .max(1)
        }
        Err(_) => 0,
    }
}

/// The header's length and the payload's, once the header is all in `buf`.
fn parse_header(buf: &[u8], masked: bool, max: usize) -> Result<Option<(usize, usize)>, WsError> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(WsError::ReservedBits);
    }
    let opcode = OpCode::from_u8(b0 & 0x0F).ok_or(WsError::ReservedOpcode(b0 & 0x0F))?;
    if (b1 & 0x80 != 0) != masked {
        return Err(WsError::Masking);
    }
    let short = b1 & 0x7F;
    let ext = match short {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let head = 2 + ext + if masked { 4 } else { 0 };
    if buf.len() < head {
        return Ok(None);
    }
    let len = match ext {
        0 => u64::from(short),
        2 => {
            let l = u64::from(u16::from_be_bytes([buf[2], buf[3]]));
            if l < 126 {
                return Err(WsError::BadLength);
            }
            l
        }
        _ => {
            let l = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if l >> 63 != 0 || l <= u64::from(u16::MAX) {
                return Err(WsError::BadLength);
            }
            l
        }
    };
    if opcode.is_control() && (b0 & 0x80 == 0 || len > MAX_CONTROL_PAYLOAD as u64) {
        return Err(WsError::BadControl);
    }
    if len > max as u64 {
        return Err(WsError::TooLarge { len, max });
    }
    Ok(Some((head, len as usize)))
}

/// A whole message: what the link acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsMessage {
    /// A binary message (the protocol's frames).
    Binary(Bytes),
    /// A text message, not yet checked for UTF-8 (the handshake parses it as JSON).
    Text(Bytes),
    /// A ping; the payload goes back in a pong.
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// The peer closes (code and reason, if any, in the payload).
    Close(Bytes),
}

/// Joins the frames of fragmented messages (§5.4), bounded by a message limit. A
/// message in one frame passes through without a copy; only fragments are copied.
#[derive(Debug, Default)]
pub struct Reassembly {
    /// The message being joined: its opcode and the payloads so far.
    partial: Option<(OpCode, BytesMut)>,
}

impl Reassembly {
    /// Feeds one frame; returns the message it completes, if any. Control frames may
    /// arrive between fragments and come out at once. `max` bounds the joined message.
    pub fn push(&mut self, frame: WsFrame, max: usize) -> Result<Option<WsMessage>, WsError> {
        let message = |op: OpCode, p: Bytes| match op {
            OpCode::Text => WsMessage::Text(p),
            _ => WsMessage::Binary(p),
        };
        match (frame.opcode, self.partial.as_mut()) {
            (OpCode::Ping, _) => Ok(Some(WsMessage::Ping(frame.payload))),
            (OpCode::Pong, _) => Ok(Some(WsMessage::Pong(frame.payload))),
            (OpCode::Close, _) => Ok(Some(WsMessage::Close(frame.payload))),
            (OpCode::Text | OpCode::Binary, None) if frame.fin => {
                Ok(Some(message(frame.opcode, frame.payload)))
            }
            (OpCode::Text | OpCode::Binary, None) => {
                self.partial = Some((frame.opcode, BytesMut::from(&frame.payload[..])));
                Ok(None)
            }
            (OpCode::Continuation, Some((_, buf))) => {
                let len = buf.len() + frame.payload.len();
                if len > max {
                    return Err(WsError::TooLarge {
                        len: len as u64,
                        max,
                    });
                }
                buf.extend_from_slice(&frame.payload);
                if !frame.fin {
                    return Ok(None);
                }
                let (op, buf) = self.partial.take().expect("matched Some");
                Ok(Some(message(op, buf.freeze())))
            }
            (OpCode::Continuation, None) | (OpCode::Text | OpCode::Binary, Some(_)) => {
                Err(WsError::Fragmentation)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of one frame as a peer would send them.
    fn wire(fin: bool, op: OpCode, body: &[u8], mask: Option<[u8; 4]>) -> BytesMut {
        let mut head = [0; MAX_HEADER_LEN];
        let n = encode_header(&mut head, fin, op, body.len(), mask);
        let mut w = BytesMut::from(&head[..n]);
        let mut p = body.to_vec();
        if let Some(k) = mask {
            apply_mask(&mut p, k);
        }
        w.extend_from_slice(&p);
        w
    }

    #[test]
    fn every_length_class_round_trips_and_prefixes_only_need_more() {
        for len in [0, 1, 125, 126, 65535, 65536, 200_000] {
            for masked in [false, true] {
                let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let mask = masked.then_some([1, 2, 3, 4]);
                let mut w = wire(true, OpCode::Binary, &body, mask);
                let whole = w.len();
                for cut in [0, 1, 2, whole / 2, whole - 1]
                    .into_iter()
                    .filter(|&c| c < whole)
                {
                    let mut part = BytesMut::from(&w[..cut]);
                    assert_eq!(decode(&mut part, masked, 1 << 20), Ok(None));
                    assert_eq!(part.len(), cut, "a partial frame was consumed");
                    assert!(needed(&part, masked, 1 << 20) >= 1);
                    assert!(needed(&part, masked, 1 << 20) <= whole - cut);
                }
                assert_eq!(needed(&w, masked, 1 << 20), 0);
                w.extend_from_slice(&[0x82, 0]); // the next frame stays in the buffer
                let f = decode(&mut w, masked, 1 << 20).unwrap().unwrap();
                assert_eq!((f.fin, f.opcode, f.mask), (true, OpCode::Binary, mask));
                assert_eq!(&f.payload[..], &body[..]);
                assert_eq!(&w[..], &[0x82, 0]);
            }
        }
    }

    #[test]
    fn mask_matches_the_bytewise_definition_at_every_length() {
        for len in 0..40 {
            let mut a: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
            let b: Vec<u8> = a
                .iter()
                .enumerate()
                .map(|(i, v)| v ^ [9, 8, 7, 6][i % 4])
                .collect();
            apply_mask(&mut a, [9, 8, 7, 6]);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn refuses_what_the_rfc_forbids_and_consumes_nothing() {
        let d = |b: &[u8], masked| {
            let mut buf = BytesMut::from(b);
            let r = decode(&mut buf, masked, 100_000);
            assert_eq!(&buf[..], b, "an error consumed bytes");
            r
        };
        assert_eq!(d(&[0xC2, 0], false), Err(WsError::ReservedBits));
        assert_eq!(d(&[0x83, 0], false), Err(WsError::ReservedOpcode(3)));
        assert_eq!(d(&[0x82, 0], true), Err(WsError::Masking));
        assert_eq!(d(&[0x82, 0x80, 0, 0, 0, 0], false), Err(WsError::Masking));
        assert_eq!(d(&[0x09, 0], false), Err(WsError::BadControl));
        assert_eq!(d(&[0x89, 126, 0, 126], false), Err(WsError::BadControl));
        assert_eq!(d(&[0x82, 126, 0, 125], false), Err(WsError::BadLength));
        let mut l = vec![0x82, 127];
        l.extend_from_slice(&65535u64.to_be_bytes());
        assert_eq!(d(&l, false), Err(WsError::BadLength));
        l[2] = 0x80;
        assert_eq!(d(&l, false), Err(WsError::BadLength));
        let mut l = vec![0x82, 127];
        l.extend_from_slice(&100_001u64.to_be_bytes());
        assert_eq!(
            d(&l, false),
            Err(WsError::TooLarge {
                len: 100_001,
                max: 100_000
            })
        );
    }

    #[test]
    fn fragments_join_with_control_frames_between() {
        let frame = |fin, opcode, p: &'static [u8]| WsFrame {
            fin,
            opcode,
            mask: None,
            payload: Bytes::from_static(p),
        };
        let mut r = Reassembly::default();
        assert_eq!(r.push(frame(false, OpCode::Binary, b"ab"), 10), Ok(None));
        assert_eq!(
            r.push(frame(true, OpCode::Ping, b"p"), 10),
            Ok(Some(WsMessage::Ping(Bytes::from_static(b"p"))))
        );
        assert_eq!(
            r.push(frame(false, OpCode::Continuation, b"cd"), 10),
            Ok(None)
        );
        assert_eq!(
            r.push(frame(true, OpCode::Continuation, b"e"), 10),
            Ok(Some(WsMessage::Binary(Bytes::from_static(b"abcde"))))
        );
        assert_eq!(
            r.push(frame(true, OpCode::Text, b"{}"), 10),
            Ok(Some(WsMessage::Text(Bytes::from_static(b"{}"))))
        );
        assert_eq!(
            r.push(frame(true, OpCode::Continuation, b"x"), 10),
            Err(WsError::Fragmentation)
        );
        assert_eq!(
            r.push(frame(false, OpCode::Binary, b"123456"), 10),
            Ok(None)
        );
        assert_eq!(
            r.push(frame(false, OpCode::Binary, b"x"), 10),
            Err(WsError::Fragmentation)
        );
        assert_eq!(
            r.push(frame(true, OpCode::Continuation, b"78901"), 10),
            Err(WsError::TooLarge { len: 11, max: 10 })
        );
    }
}
