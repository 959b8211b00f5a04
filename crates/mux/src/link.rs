//! One end of an agent link after the WebSocket upgrade: RFC 6455 framing of our own
//! (`netbore_protocol::ws`, sans-I/O) over the raw socket.
//!
//! tokio-tungstenite still does the HTTP upgrade; right after the 101 the socket is taken
//! back ([`WsLink::after_upgrade`]) and everything after it, the hello and the reply
//! included, goes through this framing. Why (issue 16 item 3, `bench/ws-layers.sh`): a
//! batch goes out as header + payload in one write, the payload never copied (a client
//! masks it in place), and frames come in unmasked in place in the read buffer, sharing
//! it as `Bytes`; tungstenite copied every payload into its write buffer and read
//! through a zero-filled buffer, twice the CPU per MB.
//!
//! The read buffer scales with traffic: a link whose last read left room reads into
//! [`READ_COLD`] bytes; one whose read filled what it was offered (more is probably
//! waiting) reads [`READ_HOT`] at a time; a frame announced larger is read whole.

use std::io;

use bytes::{Buf, BytesMut};
use netbore_protocol::ws::{
    MAX_HEADER_LEN, OpCode, Reassembly, WsError, WsMessage, apply_mask, decode, encode_header,
    needed,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Spare bytes a read is offered while traffic is light (heartbeats, small requests).
pub const READ_COLD: usize = 2 * 1024;

/// Spare bytes a read is offered after a read that filled what it was offered.
pub const READ_HOT: usize = 64 * 1024;

/// Spare bytes a read is offered on a link that has been quiet for a heartbeat
/// interval ([`Reader::shrink_idle`]), until a read fills them: heartbeats fit, and an
/// idle link holds this much rather than [`READ_COLD`]. The first burst after the quiet
/// costs one extra read.
pub const READ_IDLE: usize = 256;

/// The read half of a link: the buffer, the fragment reassembly and the limits.
#[derive(Debug)]
pub struct Reader {
    buf: BytesMut,
    joined: Reassembly,
    /// Frames from the peer are masked (this end is the server, the edge).
    masked: bool,
    /// Largest message accepted.
    max: usize,
    /// The last read filled all it was offered.
    hot: bool,
    /// Quiet since the last [`Reader::shrink_idle`]: reads are offered [`READ_IDLE`].
    idle: bool,
}

impl Reader {
    fn new(masked: bool, max: usize) -> Self {
        Reader {
            buf: BytesMut::new(),
            joined: Reassembly::default(),
            masked,
            max,
            hot: false,
            idle: false,
        }
    }

    /// The next message from `io`; `Ok(None)` at the end of the stream.
    /// Cancel-safe: a whole frame is taken off the buffer or nothing is, and a read
    /// appends to the buffer only when it completes.
    pub async fn recv<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
    ) -> io::Result<Option<WsMessage>> {
        loop {
            if let Some(m) = self.next_buffered()? {
                return Ok(Some(m));
            }
            let want = needed(&self.buf, self.masked, self.max);
            let offer = want.max(if self.hot {
                READ_HOT
            } else if self.idle {
                READ_IDLE
            } else {
                READ_COLD
            });
            self.buf.reserve(offer);
            let spare = self.buf.capacity() - self.buf.len();
            let n = io.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Ok(None);
            }
            self.hot = n == spare;
            self.idle &= !self.hot;
        }
    }

    /// A message already in the buffer, if a whole one is there.
    fn next_buffered(&mut self) -> io::Result<Option<WsMessage>> {
        let bad = |e: WsError| io::Error::new(io::ErrorKind::InvalidData, e);
        while let Some(frame) = decode(&mut self.buf, self.masked, self.max).map_err(bad)? {
            if let Some(m) = self.joined.push(frame, self.max).map_err(bad)? {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// Gives the buffer's memory back when nothing is in it (an idle link); reads are
    /// then offered [`READ_IDLE`] until one fills it.
    pub fn shrink_idle(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
            self.hot = false;
            self.idle = true;
        }
    }

    /// Bytes of read buffer held now.
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }
}

/// The write side's framing: masks (a client) and prefixes the header in place.
#[derive(Debug, Clone, Copy)]
pub struct Framer {
    /// Frames we send are masked (this end is the client, the agent).
    mask: bool,
}

impl Framer {
    /// A buffer ready for [`Framer::seal`]: room for the longest header, then the payload
    /// is appended after it.
    pub fn start(buf: &mut BytesMut) {
        debug_assert!(buf.is_empty());
        buf.extend_from_slice(&[0u8; MAX_HEADER_LEN]);
    }

    /// Turns a buffer begun with [`Framer::start`] and filled with the payload into one
    /// whole frame, in place: the header goes just before the payload, which a client
    /// masks where it lies.
    pub fn seal(self, opcode: OpCode, buf: &mut BytesMut) {
        let len = buf.len() - MAX_HEADER_LEN;
        let key = self.mask.then(rand::random::<[u8; 4]>);
        let mut head = [0u8; MAX_HEADER_LEN];
        let n = encode_header(&mut head, true, opcode, len, key);
        if let Some(k) = key {
            apply_mask(&mut buf[MAX_HEADER_LEN..], k);
        }
        buf[MAX_HEADER_LEN - n..MAX_HEADER_LEN].copy_from_slice(&head[..n]);
        buf.advance(MAX_HEADER_LEN - n);
    }

    /// One whole frame carrying `payload` (a copy: for the handshake and control frames).
    pub fn frame(self, opcode: OpCode, payload: &[u8]) -> BytesMut {
        let mut buf = BytesMut::with_capacity(MAX_HEADER_LEN + payload.len());
        Framer::start(&mut buf);
        buf.extend_from_slice(payload);
        self.seal(opcode, &mut buf);
        buf
    }

    /// A close frame with status `code` (1000 normal, 1002 protocol error, …).
    pub fn close(self, code: u16) -> BytesMut {
        self.frame(OpCode::Close, &code.to_be_bytes())
    }
}

/// A WebSocket connection after the upgrade, as the link runs it.
#[derive(Debug)]
pub struct WsLink<S> {
    io: S,
    reader: Reader,
    framer: Framer,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsLink<S> {
    /// The server end (the edge): frames in are masked, frames out are not.
    pub fn server(io: S, max_message: usize) -> Self {
        WsLink {
            io,
            reader: Reader::new(true, max_message),
            framer: Framer { mask: false },
        }
    }

    /// The client end (the agent): frames out are masked, frames in are not.
    pub fn client(io: S, max_message: usize) -> Self {
        WsLink {
            io,
            reader: Reader::new(false, max_message),
            framer: Framer { mask: true },
        }
    }

    /// Takes the socket back from tungstenite right after the upgrade. Nothing can be
    /// buffered in it then: the agent sends nothing before it has the 101, the edge
    /// nothing before the hello.
    pub fn after_upgrade(
        ws: tokio_tungstenite::WebSocketStream<S>,
        client: bool,
        max_message: usize,
    ) -> Self {
        let io = ws.into_inner();
        if client {
            WsLink::client(io, max_message)
        } else {
            WsLink::server(io, max_message)
        }
    }

    /// The next message; `Ok(None)` when the peer closed the socket. Pings are answered
    /// here (the handshake phase; the mux answers its own).
    pub async fn recv(&mut self) -> io::Result<Option<WsMessage>> {
        loop {
            match self.reader.recv(&mut self.io).await? {
                Some(WsMessage::Ping(p)) => {
                    let pong = self.framer.frame(OpCode::Pong, &p);
                    self.write(&pong).await?;
                }
                other => return Ok(other),
            }
        }
    }

    /// Sends one text message.
    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        let f = self.framer.frame(OpCode::Text, text.as_bytes());
        self.write(&f).await
    }

    /// Sends a close frame with `code` and shuts the write side.
    pub async fn close(&mut self, code: u16) -> io::Result<()> {
        let f = self.framer.close(code);
        self.write(&f).await?;
        self.io.shutdown().await
    }

    async fn write(&mut self, frame: &[u8]) -> io::Result<()> {
        self.io.write_all(frame).await?;
        self.io.flush().await
    }

    /// The socket, the read state and the framing, for the mux's driver.
    pub fn into_parts(self) -> (S, Reader, Framer) {
        (self.io, self.reader, self.framer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// tungstenite at the other end, in both roles: messages of every length class both
    /// ways, its pings answered, its close seen.
    #[tokio::test]
    async fn interoperates_with_tungstenite_in_both_roles() {
        for we_are_client in [true, false] {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let role = if we_are_client {
                Role::Server
            } else {
                Role::Client
            };
            let mut them = tokio_tungstenite::WebSocketStream::from_raw_socket(a, role, None).await;
            let mut us = if we_are_client {
                WsLink::client(b, 1 << 20)
            } else {
                WsLink::server(b, 1 << 20)
            };
            for len in [0usize, 1, 125, 126, 1200, 65535, 65536, 300_000] {
                let text: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
                let (sent, got) = tokio::join!(us.send_text(&text), them.next());
                sent.unwrap();
                assert_eq!(got.unwrap().unwrap(), Message::text(text.clone()));
                let body: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
                let (sent, got) =
                    tokio::join!(them.send(Message::Binary(body.clone().into())), us.recv());
                sent.unwrap();
                assert_eq!(got.unwrap(), Some(WsMessage::Binary(body.into())));
            }
            // A ping is answered with its payload; a close is seen with its code.
            them.send(Message::Ping(Bytes::from_static(b"p1")))
                .await
                .unwrap();
            them.send(Message::Close(None)).await.unwrap();
            let (got_close, pong) = tokio::join!(us.recv(), them.next());
            assert!(matches!(got_close.unwrap(), Some(WsMessage::Close(_))));
            assert_eq!(
                pong.unwrap().unwrap(),
                Message::Pong(Bytes::from_static(b"p1"))
            );
        }
    }

    /// A sealed batch is one frame a standard peer reads, the header right before the
    /// payload whatever the payload's length class.
    #[tokio::test]
    async fn a_sealed_batch_is_one_frame() {
        for client in [true, false] {
            for len in [0usize, 10, 200, 70_000] {
                let (a, mut b) = tokio::io::duplex(1 << 20);
                let role = if client { Role::Server } else { Role::Client };
                let mut them =
                    tokio_tungstenite::WebSocketStream::from_raw_socket(a, role, None).await;
                let mut buf = BytesMut::new();
                Framer::start(&mut buf);
                let body: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
                buf.extend_from_slice(&body);
                Framer { mask: client }.seal(OpCode::Binary, &mut buf);
                b.write_all(&buf).await.unwrap();
                assert_eq!(
                    them.next().await.unwrap().unwrap(),
                    Message::Binary(body.into())
                );
            }
        }
    }

    /// `them` sends `len` bytes of `fill` as one binary message; `us` reads it whole.
    async fn pass<S: AsyncRead + AsyncWrite + Unpin>(
        them: &mut tokio_tungstenite::WebSocketStream<tokio::io::DuplexStream>,
        us: &mut WsLink<S>,
        fill: u8,
        len: usize,
    ) {
        them.send(Message::Binary(vec![fill; len].into()))
            .await
            .unwrap();
        assert_eq!(
            us.recv().await.unwrap(),
            Some(WsMessage::Binary(vec![fill; len].into()))
        );
    }

    /// The read buffer grows for bulk and is given back when idle.
    #[tokio::test]
    async fn the_read_buffer_follows_the_traffic() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut them =
            tokio_tungstenite::WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let mut us = WsLink::server(b, 1 << 20);
        pass(&mut them, &mut us, 1, 10).await;
        assert!(us.reader.held() <= 2 * READ_COLD, "{}", us.reader.held());
        pass(&mut them, &mut us, 1, 500_000).await;
        us.reader.shrink_idle();
        assert_eq!(us.reader.held(), 0);
        // Quiet: a heartbeat-sized message is read into READ_IDLE bytes, and stays so.
        for _ in 0..3 {
            pass(&mut them, &mut us, 2, 20).await;
            assert!(us.reader.held() <= READ_IDLE, "{}", us.reader.held());
        }
        // A burst after the quiet is read whole (the filled read turns the link hot).
        pass(&mut them, &mut us, 3, 5000).await;
        assert!(us.reader.hot || us.reader.held() >= 5000);
    }
}
