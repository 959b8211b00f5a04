//! RFC 6455 framing of our own, for the `own` candidate of `ws-layers`: binary frames
//! written as header + payload in one vectored write (the payload is never copied; a
//! client masks it in place), received frames unmasked in place in the read buffer and
//! handed out as `Bytes` that share it.
//!
//! The codec ([`encode_header`], [`decode`], [`apply_mask`]) does no I/O; [`Link`] drives
//! it over a socket. Only what the tunnel link needs: unfragmented messages (a
//! continuation frame is refused), pings and pongs skipped, close ends the stream.

use std::fmt;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The longest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub const MAX_HEADER: usize = 14;

/// The read buffer grows by at least this much per read.
const READ_CHUNK: usize = 32 * 1024;

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// 0x0, a later piece of a fragmented message.
    Continuation,
    /// 0x1.
    Text,
    /// 0x2.
    Binary,
    /// 0x8.
    Close,
    /// 0x9.
    Ping,
    /// 0xA.
    Pong,
}

impl OpCode {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn to_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// Why a peer's bytes are not a frame we accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// RSV1-3 set: no extension was negotiated.
    ReservedBits,
    /// An opcode RFC 6455 reserves.
    BadOpcode(u8),
    /// A server got an unmasked frame, or a client a masked one (§5.1).
    Masking,
    /// A control frame fragmented or longer than 125 bytes (§5.5).
    BadControl,
    /// A 64-bit length with its top bit set (§5.2).
    BadLength,
    /// Longer than the limit.
    TooLong(u64),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::ReservedBits => f.write_str("reserved bits set"),
            FrameError::BadOpcode(o) => write!(f, "reserved opcode {o:#x}"),
            FrameError::Masking => f.write_str("frame masked the wrong way for its direction"),
            FrameError::BadControl => f.write_str("control frame fragmented or over 125 bytes"),
            FrameError::BadLength => f.write_str("64-bit length with the top bit set"),
            FrameError::TooLong(n) => write!(f, "frame of {n} bytes over the limit"),
        }
    }
}

impl std::error::Error for FrameError {}

/// One received frame, its payload unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// FIN: the last frame of its message.
    pub fin: bool,
    /// What the frame carries.
    pub opcode: OpCode,
    /// The payload, sharing the read buffer.
    pub payload: Bytes,
}

/// What [`decode`] found at the front of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole frame, taken off the buffer.
    Frame(Frame),
    /// At least this many more bytes are needed; the buffer is untouched.
    Need(usize),
}

/// Writes the header of a frame of `len` payload bytes into `out`; returns its length.
/// With `mask`, the header carries the key; the caller masks the payload.
pub fn encode_header(
    out: &mut [u8; MAX_HEADER],
    fin: bool,
    opcode: OpCode,
    len: usize,
    mask: Option<[u8; 4]>,
) -> usize {
    out[0] = (u8::from(fin) << 7) | opcode.to_u8();
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

/// XORs `buf` with the 4-byte `key`, in place (masking and unmasking are the same).
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let k = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().expect("8 bytes")) ^ k;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the key lines up again at 0.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Takes one frame off the front of `buf` when it is all there. `masked` is whether
/// frames in this direction must be masked (they reach a server); `max` bounds the
/// payload.
pub fn decode(buf: &mut BytesMut, masked: bool, max: usize) -> Result<Decoded, FrameError> {
    if buf.len() < 2 {
        return Ok(Decoded::Need(2 - buf.len()));
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from_u8(b0 & 0x0F).ok_or(FrameError::BadOpcode(b0 & 0x0F))?;
    if (b1 & 0x80 != 0) != masked {
        return Err(FrameError::Masking);
    }
    let short = b1 & 0x7F;
    let ext = match short {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let head = 2 + ext + if masked { 4 } else { 0 };
    if buf.len() < head {
        return Ok(Decoded::Need(head - buf.len()));
    }
    let len = match ext {
        0 => u64::from(short),
        2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
        _ => {
            let l = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if l >> 63 != 0 {
                return Err(FrameError::BadLength);
            }
            l
        }
    };
    if opcode.is_control() && (!fin || len > 125) {
        return Err(FrameError::BadControl);
    }
    if len > max as u64 {
        return Err(FrameError::TooLong(len));
    }
    let len = len as usize;
    if buf.len() < head + len {
        return Ok(Decoded::Need(head + len - buf.len()));
    }
    let key = masked.then(|| {
        let k = &buf[head - 4..head];
        [k[0], k[1], k[2], k[3]]
    });
    buf.advance(head);
    let mut payload = buf.split_to(len);
    if let Some(k) = key {
        apply_mask(&mut payload, k);
    }
    Ok(Decoded::Frame(Frame {
        fin,
        opcode,
        payload: payload.freeze(),
    }))
}

/// Writes `head` then `body` with as few vectored writes as the socket allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    head: &[u8],
    body: &[u8],
) -> io::Result<()> {
    let mut bufs = [IoSlice::new(head), IoSlice::new(body)];
    let mut slices: &mut [IoSlice<'_>] = &mut bufs;
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    w.flush().await
}

/// One end of a WebSocket connection after the handshake.
pub struct Link<S> {
    io: S,
    rbuf: BytesMut,
    client: bool,
    max: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    /// Takes over `io`; `client` masks what it sends and expects unmasked frames.
    pub fn new(io: S, client: bool, max: usize) -> Self {
        Link {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            client,
            max,
        }
    }

    /// Sends `payload` as one binary frame; a client masks it in place first.
    pub async fn send(&mut self, mut payload: BytesMut) -> io::Result<()> {
        let mask = self.client.then(rand::random::<[u8; 4]>);
        let mut head = [0u8; MAX_HEADER];
        let n = encode_header(&mut head, true, OpCode::Binary, payload.len(), mask);
        if let Some(k) = mask {
            apply_mask(&mut payload, k);
        }
        write_all_vectored(&mut self.io, &head[..n], &payload).await
    }

    /// The next binary message; `None` on close or end of stream.
    pub async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let d = decode(&mut self.rbuf, !self.client, self.max)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            match d {
                Decoded::Frame(f) => match f.opcode {
                    OpCode::Binary if f.fin => return Ok(Some(f.payload)),
                    OpCode::Close => return Ok(None),
                    OpCode::Ping | OpCode::Pong => {}
                    op => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("unexpected {op:?} frame (fin {})", f.fin),
                        ));
                    }
                },
                Decoded::Need(n) => {
                    self.rbuf.reserve(n.max(READ_CHUNK));
                    if self.io.read_buf(&mut self.rbuf).await? == 0 {
                        return Ok(None);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_length_class_both_directions() {
        for len in [0, 1, 125, 126, 65535, 65536, 200_000] {
            for masked in [false, true] {
                let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let mask = masked.then_some([1, 2, 3, 4]);
                let mut head = [0; MAX_HEADER];
                let n = encode_header(&mut head, true, OpCode::Binary, len, mask);
                let mut wire = BytesMut::from(&head[..n]);
                let mut p = body.clone();
                if let Some(k) = mask {
                    apply_mask(&mut p, k);
                }
                wire.extend_from_slice(&p);
                wire.extend_from_slice(&[0x82, 0]); // the next frame's start stays
                // Every prefix is "need more", never an error nor a frame.
                for cut in [0, 1, n - 1, n, n + len / 2] {
                    let mut part = BytesMut::from(&wire[..cut.min(n + len - 1)]);
                    assert!(matches!(
                        decode(&mut part, masked, 1 << 20),
                        Ok(Decoded::Need(_))
                    ));
                }
                let Decoded::Frame(f) = decode(&mut wire, masked, 1 << 20).unwrap() else {
                    panic!("whole frame not decoded");
                };
                assert_eq!(
                    (f.fin, f.opcode, &f.payload[..]),
                    (true, OpCode::Binary, &body[..])
                );
                assert_eq!(&wire[..], &[0x82, 0]);
            }
        }
    }

    /// A standard peer (tungstenite) on the other end: messages of every length class
    /// both ways, and its close ends our stream.
    #[tokio::test]
    async fn interoperates_with_tungstenite_both_roles() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::protocol::Role;
        for we_are_client in [true, false] {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let role = if we_are_client {
                Role::Server
            } else {
                Role::Client
            };
            let mut them = tokio_tungstenite::WebSocketStream::from_raw_socket(a, role, None).await;
            let mut us = Link::new(b, we_are_client, 1 << 20);
            for len in [0, 1, 125, 126, 1200, 65535, 65536, 300_000] {
                let body: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
                let (sent, got) = tokio::join!(us.send(BytesMut::from(&body[..])), them.next());
                sent.unwrap();
                assert_eq!(got.unwrap().unwrap(), Message::Binary(body.clone().into()));
                let (sent, got) =
                    tokio::join!(them.send(Message::Binary(body.clone().into())), us.recv());
                sent.unwrap();
                assert_eq!(got.unwrap().as_deref(), Some(&body[..]));
            }
            // Pings are skipped, a close ends the stream.
            them.send(Message::Ping(Bytes::from_static(b"p")))
                .await
                .unwrap();
            them.send(Message::Close(None)).await.unwrap();
            assert_eq!(us.recv().await.unwrap(), None);
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
    fn refuses_what_the_rfc_forbids() {
        let d = |b: &[u8], masked| decode(&mut BytesMut::from(b), masked, 1000);
        assert_eq!(d(&[0xC2, 0], false), Err(FrameError::ReservedBits));
        assert_eq!(d(&[0x83, 0], false), Err(FrameError::BadOpcode(3)));
        assert_eq!(d(&[0x82, 0], true), Err(FrameError::Masking));
        assert_eq!(
            d(&[0x82, 0x80, 0, 0, 0, 0], false),
            Err(FrameError::Masking)
        );
        assert_eq!(d(&[0x09, 0], false), Err(FrameError::BadControl));
        assert_eq!(d(&[0x89, 126, 0, 126], false), Err(FrameError::BadControl));
        assert_eq!(
            d(&[0x82, 126, 3, 233], false),
            Err(FrameError::TooLong(1001))
        );
        let mut big = vec![0x82, 127];
        big.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(d(&big, false), Err(FrameError::BadLength));
    }
}
