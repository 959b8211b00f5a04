//! The `own` candidate of `ws-layers`: the link's WebSocket framing. Frames are read by
//! the link's own reader (`netbore_mux::link::Reader`: unmasked in place, handed out as
//! `Bytes` sharing the read buffer). A frame goes out as header + payload in one
//! vectored write (the payload never copied; a client masks it in place): the benchmark
//! hands over a bare payload, where the link seals a batch built after room for the
//! header. Only what the benchmark needs: binary messages out; pings and pongs skipped, a
//! close ends the stream.

use std::io::{self, IoSlice};

use bytes::{Bytes, BytesMut};
use netbore_mux::link::{Reader, WsLink};
use netbore_protocol::ws::{MAX_HEADER_LEN, OpCode, WsMessage, apply_mask, encode_header};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

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
    reader: Reader,
    client: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    /// Takes over `io`; `client` masks what it sends and expects unmasked frames.
    pub fn new(io: S, client: bool, max: usize) -> Self {
        let link = if client {
            WsLink::client(io, max)
        } else {
            WsLink::server(io, max)
        };
        let (io, reader, _) = link.into_parts();
        Link { io, reader, client }
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
        loop {
            match self.reader.recv(&mut self.io).await? {
                Some(WsMessage::Binary(b)) => return Ok(Some(b)),
                Some(WsMessage::Close(_)) | None => return Ok(None),
                Some(WsMessage::Ping(_) | WsMessage::Pong(_)) => {}
                Some(WsMessage::Text(_)) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "text message"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A standard peer (tungstenite) reads what the vectored send writes, in both roles
    /// and every length class, and its close ends our stream. (Reading is the link's own
    /// `Reader`, tested in `netbore_mux::link`.)
    #[tokio::test]
    async fn tungstenite_reads_what_we_send_in_both_roles() {
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
                assert_eq!(got.unwrap().unwrap(), Message::Binary(body.into()));
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
