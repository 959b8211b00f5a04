//! Glue between streams and `http` types, shared by edge and agent.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;
use netbore_protocol::{Header, ResetCode};

use crate::{Event, StreamReceiver, StreamSender};

/// A stream's incoming half as an `http_body::Body`: data as it arrives, trailers at
/// the end. A reset becomes a body error, so hyper aborts the message (HTTP/1.1 closes
/// without the final chunk, HTTP/2 sends RST_STREAM): a cut-off body never looks
/// complete.
pub struct StreamBody {
    rx: StreamReceiver,
    done: bool,
}

impl StreamBody {
    /// Wraps a receiver.
    pub fn new(rx: StreamReceiver) -> StreamBody {
        StreamBody { rx, done: false }
    }
}

impl http_body::Body for StreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            return match self.rx.poll_recv(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Event::Data(d))) => Poll::Ready(Some(Ok(Frame::data(d)))),
                Poll::Ready(Some(Event::Trailers(t))) => {
                    self.done = true;
                    Poll::Ready(Some(Ok(Frame::trailers(to_header_map(t)))))
                }
                Poll::Ready(Some(Event::End)) | Poll::Ready(None) => {
                    self.done = true;
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Event::Reset(code, msg))) => {
                    self.done = true;
                    Poll::Ready(Some(Err(std::io::Error::other(format!(
                        "tunnel stream reset ({code:?}): {msg}"
                    )))))
                }
                Poll::Ready(Some(Event::Head(_))) => continue,
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Protocol headers to a header map, skipping any that `http` rejects.
pub fn to_header_map(headers: Vec<Header>) -> HeaderMap {
    // Never sized by the peer's count alone: `HeaderMap` panics beyond 24,576 fields.
    let mut map = HeaderMap::with_capacity(headers.len().min(netbore_protocol::MAX_HEADER_FIELDS));
    for h in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_maybe_shared(h.value),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// A header map to protocol headers.
pub fn from_header_map(map: &HeaderMap) -> Vec<Header> {
    map.iter()
        .map(|(n, v)| Header::new(n.as_str(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

/// What ended a body pump.
#[derive(Debug)]
pub enum PumpEnd {
    /// The body ended and the stream half was finished.
    Done,
    /// The body failed; the stream was reset with the given code.
    BodyFailed(String),
    /// The stream went away first (peer reset, connection lost).
    StreamGone,
}

/// Streams an HTTP body into a stream half: data, then trailers or a clean end. A
/// body error resets the stream with `on_error`.
pub async fn pump_body<B>(mut body: B, tx: &mut StreamSender, on_error: ResetCode) -> PumpEnd
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    use std::future::poll_fn;
    loop {
        match poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => {
                return match tx.finish() {
                    Ok(()) => PumpEnd::Done,
                    Err(_) => PumpEnd::StreamGone,
                };
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if data.is_empty() {
                        continue;
                    }
                    // The last bytes of a body of known length carry the end of the
                    // stream with them: one frame, not two.
                    if http_body::Body::is_end_stream(&body) {
                        return match tx.send_data_and_finish(data).await {
                            Ok(()) => PumpEnd::Done,
                            Err(_) => PumpEnd::StreamGone,
                        };
                    }
                    if tx.send_data(data).await.is_err() {
                        return PumpEnd::StreamGone;
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        return match tx.send_trailers(from_header_map(&t)) {
                            Ok(()) => PumpEnd::Done,
                            Err(_) => PumpEnd::StreamGone,
                        };
                    }
                }
            },
            Some(Err(e)) => {
                let msg = e.to_string();
                tx.reset(on_error, &msg);
                return PumpEnd::BodyFailed(msg);
            }
        }
    }
}
