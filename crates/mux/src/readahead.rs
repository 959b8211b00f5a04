//! A read buffer that exists only while data flows.
//!
//! tungstenite allocates its read buffer (`read_buffer_size`) per connection up front and
//! zero-fills all of it before the first read, so every idle link kept 32 KiB resident.
//! With a small WebSocket read buffer ([`WS_READ_BUFFER`](crate::WS_READ_BUFFER)) and a
//! [`ReadAhead`] under it, an idle link holds only the small one; under bulk load the
//! socket is still read [`READ_AHEAD`] bytes per syscall:
//!
//! - a read that does not fill the caller's buffer (small messages, the usual idle
//!   traffic) went straight into it: nothing is copied and nothing is held;
//! - after a read that filled the caller's buffer (more is probably waiting), the next
//!   reads go through a [`READ_AHEAD`]-byte buffer, allocated then, from which the
//!   caller's small reads are served;
//! - when the socket has nothing more (a read would block) the buffer is freed and reads
//!   go straight to the caller again.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes one read from the socket takes while data flows (tungstenite's former read
/// buffer size, so bulk transfers make as many read syscalls as before).
pub const READ_AHEAD: usize = 32 * 1024;

/// An [`AsyncRead`] + [`AsyncWrite`] that reads ahead only while data flows; writes pass
/// through.
#[derive(Debug)]
pub struct ReadAhead<S> {
    io: S,
    /// Bytes read from `io` and not yet given out; no capacity while idle.
    buf: BytesMut,
    /// The last read from `io` filled what it was offered: read ahead next time.
    hot: bool,
}

impl<S> ReadAhead<S> {
    /// Wraps `io`.
    pub fn new(io: S) -> Self {
        ReadAhead {
            io,
            buf: BytesMut::new(),
            hot: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Bytes of read-ahead memory held now (0 while idle).
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if !this.buf.is_empty() {
            let n = out.remaining().min(this.buf.len());
            out.put_slice(&this.buf[..n]);
            this.buf.advance(n);
            return Poll::Ready(Ok(()));
        }
        if !this.hot || out.remaining() >= READ_AHEAD {
            ready!(Pin::new(&mut this.io).poll_read(cx, out))?;
            this.hot = out.remaining() == 0;
            return Poll::Ready(Ok(()));
        }
        this.buf.clear();
        this.buf.reserve(READ_AHEAD);
        match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
            Poll::Pending => {
                // The socket is drained: give the memory back until data flows again.
                this.buf = BytesMut::new();
                this.hot = false;
                Poll::Pending
            }
            Poll::Ready(Err(e)) => {
                this.buf = BytesMut::new();
                Poll::Ready(Err(e))
            }
            Poll::Ready(Ok(_)) => {
                let n = out.remaining().min(this.buf.len());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                if this.buf.is_empty() {
                    // End of stream, or a read that found less than `out` could take.
                    this.buf = BytesMut::new();
                    this.hot = false;
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_hold_no_buffer_and_bulk_arrives_whole() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut r = ReadAhead::new(a);
        // Idle traffic: a small message read into a larger buffer holds nothing.
        b.write_all(b"hello").await.unwrap();
        let mut small = [0u8; 64];
        let n = r.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"hello");
        assert_eq!(r.held(), 0);

        // Bulk: 300 KB read 1 KiB at a time arrives in order; the read-ahead buffer
        // exists while bytes wait and is gone once the socket is drained.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        b.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        let mut held_while_flowing = 0;
        while got.len() < data.len() {
            let n = r.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
            held_while_flowing = held_while_flowing.max(r.held());
        }
        assert_eq!(got, data);
        assert!(held_while_flowing > READ_AHEAD / 2);
        // Nothing more to read: the next read would block and frees the buffer.
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(20), r.read(&mut chunk)).await;
        assert!(pending.is_err());
        assert_eq!(r.held(), 0);

        // End of stream after buffered bytes: the bytes, then 0.
        b.write_all(&data[..5000]).await.unwrap();
        drop(b);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, &data[..5000]);
    }
}
