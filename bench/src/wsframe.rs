//! The `own` candidate of `ws-layers`: the link's WebSocket framing
//! (`netbore_protocol::ws`, sans-I/O) driven over a socket. A frame goes out as header +
//! payload in one vectored write (the payload never copied; a client masks it in place);
//! frames come in unmasked in place in the read buffer and leave as `Bytes` sharing it.
//! Only what the benchmark needs: binary messages out; pings and pongs skipped, a close
//! ends the stream.

use std::io::{self, IoSlice};

use bytes::{Bytes, BytesMut};
use netbore_protocol::ws::{
    MAX_HEADER_LEN, OpCode, Reassembly, WsMessage, apply_mask, decode, encode_header, needed,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The read buffer grows by at least this much per read.
const READ_CHUNK: usize = 32 * 1024;

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
    joined: Reassembly,
    client: bool,
    max: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    /// Takes over `io`; `client` masks what it sends and expects unmasked frames.
    pub fn new(io: S, client: bool, max: usize) -> Self {
        Link {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            joined: Reassembly::default(),
            client,
            max,
        }
    }

    /// Sends `payload` as one binary frame; a client masks it in place first.
    pub async fn send(&mut self, mut payload: BytesMut) -> io::Result<()> {
        let mask = self.client.then(rand::random::<[u8; 4]>);
        let mut head = [0u8; MAX_HEADER_LEN];
        let n = encode_header(&mut head, true, OpCode::Binary, payload.len(), mask);
        if let Some(k) = mask {
            apply_mask(&mut payload, k);
        }
        write_all_vectored(&mut self.io, &head[..n], &payload).await
    }

    /// The next binary message; `None` on close or end of stream.
    pub async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        let bad = |e: netbore_protocol::ws::WsError| io::Error::new(io::ErrorKind::InvalidData, e);
        loop {
            match decode(&mut self.rbuf, !self.client, self.max).map_err(bad)? {
                Some(f) => match self.joined.push(f, self.max).map_err(bad)? {
                    Some(WsMessage::Binary(b)) => return Ok(Some(b)),
                    Some(WsMessage::Close(_)) => return Ok(None),
                    Some(WsMessage::Ping(_) | WsMessage::Pong(_)) | None => {}
                    Some(WsMessage::Text(_)) => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "text message"));
                    }
                },
                None => {
                    let n = needed(&self.rbuf, !self.client, self.max);
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
}
