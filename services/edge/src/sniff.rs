//! Catches request-smuggling framing that hyper resolves silently.
//!
//! hyper drops `Content-Length` when `Transfer-Encoding` is present (RFC 9112 §6.3 lets
//! a server prefer chunked and close afterwards) and merges identical duplicate
//! `Content-Length`s, so the request the edge sees no longer shows the ambiguity. We
//! refuse such requests outright: [`Sniff`] sits between the socket and hyper, follows
//! the HTTP/1.1 framing of every request on the connection (heads, `Content-Length` and
//! chunked bodies), and when a head carries both headers, or two `Content-Length`s, it
//! writes `400` with `netbore-error: ambiguous_length` and fails the read, so hyper
//! never parses (and the edge never forwards) that request.
//!
//! Malformed chunked encoding is refused the same way, with `netbore-error:
//! bad_chunked_encoding`: a chunk size that is not 1 to 16 hex digits (an impossible
//! size such as `FFFFFFFFFFFFFFFFFFFF` included), a chunk-size line longer than
//! [`MAX_CHUNK_LINE`], or chunk data not followed by CRLF. The proxy waits for a
//! chunked request's first chunk before it forwards the head (`proxy.rs`), so such a
//! request never reaches the agent.
//!
//! It stops inspecting (passes bytes through) on HTTP/2, after an `Upgrade` or
//! `CONNECT`, and on anything it cannot follow; hyper's own checks still apply there.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest line the sniffer follows before giving up (hyper refuses longer heads).
const MAX_LINE: usize = 64 * 1024;

/// Longest chunk-size line (size and extensions) accepted; a longer one is refused.
/// hyper allows 16 KiB of extensions over a whole body; nobody sends them in practice.
pub const MAX_CHUNK_LINE: usize = 4096;

/// Hex digits in a chunk size: 16 make the largest 64-bit size.
const MAX_CHUNK_SIZE_DIGITS: usize = 16;

const REFUSAL: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\nnetbore-error: ambiguous_length\r\nconnection: close\r\ncontent-length: 140\r\n\r\nThe request's length is ambiguous (Content-Length with Transfer-Encoding, or several Content-Length headers); send one of them.            \n";

const CHUNK_REFUSAL: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\nnetbore-error: bad_chunked_encoding\r\nconnection: close\r\ncontent-length: 128\r\n\r\nThe request's chunked body is malformed (a chunk size that is not 1-16 hex digits, or chunk data not followed by CRLF); fix it.\n";

/// Why the framing follower refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Content-Length with Transfer-Encoding, or several Content-Length.
    AmbiguousLength,
    /// Malformed chunked encoding.
    BadChunk,
}

impl Refusal {
    fn response(self) -> &'static [u8] {
        match self {
            Refusal::AmbiguousLength => REFUSAL,
            Refusal::BadChunk => CHUNK_REFUSAL,
        }
    }
}

#[derive(Debug)]
enum State {
    /// Reading a request head, line by line.
    Head {
        first: bool,
        cl: u32,
        te: u32,
        cl_val: Option<u64>,
        chunked: bool,
        stop_after: bool,
    },
    /// Skipping a body of known length.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping chunk data.
    ChunkData(u64),
    /// Reading the CRLF that must follow chunk data.
    ChunkEnd,
    /// Reading trailer lines until the blank one.
    Trailers,
    /// No longer inspecting.
    Off,
}

/// A stream whose incoming HTTP/1.1 framing is checked.
pub struct Sniff<S> {
    inner: S,
    framing: Framing,
    refused: bool,
}

/// The framing follower, without a socket.
#[derive(Debug)]
pub struct Framing {
    state: State,
    line: Vec<u8>,
    refusal: Option<Refusal>,
}

impl Default for Framing {
    fn default() -> Framing {
        Framing {
            state: new_head(),
            line: Vec::new(),
            refusal: None,
        }
    }
}

fn new_head() -> State {
    State::Head {
        first: true,
        cl: 0,
        te: 0,
        cl_val: None,
        chunked: false,
        stop_after: false,
    }
}

impl<S> Sniff<S> {
    /// Wraps a freshly accepted connection (plain or after TLS).
    pub fn new(inner: S) -> Sniff<S> {
        Sniff {
            inner,
            framing: Framing::default(),
            refused: false,
        }
    }
}

impl Framing {
    /// Why the last [`Framing::feed`] that returned false refused.
    pub fn refusal(&self) -> Option<Refusal> {
        self.refusal
    }

    fn refuse(&mut self, why: Refusal) -> bool {
        self.refusal = Some(why);
        false
    }

    /// Feeds bytes hyper is about to read. Returns false when the request must be
    /// refused ([`Framing::refusal`] says why).
    pub fn feed(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return true,
                State::Body(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.state = new_head();
                    }
                }
                State::ChunkData(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.state = State::ChunkEnd;
                    }
                }
                State::Head { .. } | State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    let chunk_line = matches!(self.state, State::ChunkSize | State::ChunkEnd);
                    let Some(i) = data.iter().position(|b| *b == b'\n') else {
                        self.line.extend_from_slice(data);
                        if chunk_line && self.line.len() > MAX_CHUNK_LINE {
                            return self.refuse(Refusal::BadChunk);
                        }
                        if self.line.len() > MAX_LINE {
                            self.state = State::Off;
                        }
                        return true;
                    };
                    self.line.extend_from_slice(&data[..i]);
                    data = &data[i + 1..];
                    let mut line = std::mem::take(&mut self.line);
                    let crlf = line.last() == Some(&b'\r');
                    if crlf {
                        line.pop();
                    }
                    if chunk_line && (!crlf || line.len() > MAX_CHUNK_LINE) {
                        return self.refuse(Refusal::BadChunk);
                    }
                    if !self.on_line(&line) {
                        return false;
                    }
                }
            }
        }
        true
    }

    fn on_line(&mut self, line: &[u8]) -> bool {
        match &mut self.state {
            State::Head {
                first,
                cl,
                te,
                cl_val,
                chunked,
                stop_after,
            } => {
                if *first {
                    if line.is_empty() {
                        return true; // tolerated blank lines between requests
                    }
                    *first = false;
                    if line.starts_with(b"PRI * HTTP/2") || line.starts_with(b"CONNECT ") {
                        self.state = State::Off;
                    }
                    return true;
                }
                if line.is_empty() {
                    if (*cl > 0 && *te > 0) || *cl > 1 {
                        self.refusal = Some(Refusal::AmbiguousLength);
                        return false;
                    }
                    self.state = if *stop_after {
                        State::Off
                    } else if *te > 0 {
                        if *chunked {
                            State::ChunkSize
                        } else {
                            State::Off
                        }
                    } else {
                        match cl_val {
                            Some(n) if *n > 0 => State::Body(*n),
                            _ => new_head(),
                        }
                    };
                    return true;
                }
                let Some(colon) = line.iter().position(|b| *b == b':') else {
                    return true; // hyper will refuse it
                };
                let name = line[..colon].to_ascii_lowercase();
                let value = String::from_utf8_lossy(&line[colon + 1..])
                    .trim()
                    .to_ascii_lowercase();
                match name.as_slice() {
                    b"content-length" => {
                        *cl += 1;
                        *cl_val = value.parse().ok();
                    }
                    b"transfer-encoding" => {
                        *te += 1;
                        *chunked = value.rsplit(',').next().map(str::trim) == Some("chunked");
                    }
                    b"upgrade" => *stop_after = true,
                    _ => {}
                }
                true
            }
            State::ChunkSize => {
                let hex = line.split(|b| *b == b';').next().unwrap_or(&[]);
                // Whitespace may precede an extension (RFC 9112 §7.1.1, BWS).
                let hex = hex.trim_ascii_end();
                if hex.is_empty()
                    || hex.len() > MAX_CHUNK_SIZE_DIGITS
                    || !hex.iter().all(u8::is_ascii_hexdigit)
                {
                    return self.refuse(Refusal::BadChunk);
                }
                let size = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u64::from_str_radix(h, 16).ok());
                self.state = match size {
                    Some(0) => State::Trailers,
                    Some(n) => State::ChunkData(n),
                    None => return self.refuse(Refusal::BadChunk),
                };
                true
            }
            State::ChunkEnd => {
                if !line.is_empty() {
                    return self.refuse(Refusal::BadChunk);
                }
                self.state = State::ChunkSize;
                true
            }
            State::Trailers => {
                if line.is_empty() {
                    self.state = new_head();
                }
                true
            }
            _ => true,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Sniff<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.refused {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request refused for its framing",
            )));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let fresh = buf.filled()[before..].to_vec();
            if !this.framing.feed(&fresh) {
                this.refused = true;
                // Take the bytes back so hyper never sees the request, answer, and fail.
                buf.set_filled(before);
                // Best effort: the refusal is small enough for the socket (or TLS)
                // buffer; the connection closes right after either way.
                let why = this.framing.refusal().unwrap_or(Refusal::AmbiguousLength);
                if let Poll::Ready(Ok(_)) = Pin::new(&mut this.inner).poll_write(cx, why.response())
                {
                    let _ = Pin::new(&mut this.inner).poll_flush(cx);
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    match why {
                        Refusal::AmbiguousLength => {
                            "ambiguous request length (request smuggling); refused"
                        }
                        Refusal::BadChunk => "malformed chunked encoding; refused",
                    },
                )));
            }
        }
        r
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Sniff<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> bool {
        let mut f = Framing::default();
        // Fed in awkward pieces to exercise line joining across reads.
        bytes.chunks(3).all(|c| f.feed(c))
    }

    #[test]
    fn honest_keep_alive_traffic_passes() {
        assert!(run(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\nPOST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /d HTTP/1.1\r\nHost: x\r\n\r\n"));
    }

    #[test]
    fn ambiguous_framing_is_caught_in_any_request() {
        assert!(!run(
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!run(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        ));
        assert!(!run(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
        ));
        // The second request on a keep-alive connection.
        assert!(!run(b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\nContent-Length: 1\r\ntransfer-encoding: chunked\r\n\r\n"));
        // After a chunked body, the next head is inspected too.
        assert!(!run(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"));
        // Body bytes that look like headers are not headers.
        assert!(run(b"POST /a HTTP/1.1\r\nContent-Length: 40\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n"));
    }

    #[test]
    fn malformed_chunked_encoding_is_refused() {
        let bad: &[&[u8]] = &[
            // Impossible sizes: more than 16 hex digits, or not hex at all.
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\nx\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nx\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
            // Chunk data not followed by CRLF.
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX\r\n0\r\n\r\n",
            // A bare LF after the size.
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
        ];
        for b in bad {
            let mut f = Framing::default();
            assert!(
                !b.chunks(3).all(|c| f.feed(c)),
                "{}",
                String::from_utf8_lossy(b)
            );
            assert_eq!(f.refusal(), Some(Refusal::BadChunk));
        }
        // An endless chunk-size line is refused before the line limit of heads.
        let mut f = Framing::default();
        assert!(f.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"));
        assert!(!f.feed(&[b'0'; MAX_CHUNK_LINE + 1]));
        // Extensions, whitespace before them, and 16 digits are fine.
        assert!(run(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3 ;ext=1\r\nabc\r\n000000000000000A\r\n0123456789\r\n0\r\n\r\n"));
    }

    #[test]
    fn http2_and_upgrades_are_passed_through() {
        assert!(run(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
        ));
        assert!(run(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"));
    }
}
