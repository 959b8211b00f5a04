//! The life of one stream, as a state machine over the frames sent and received.
//!
//! Each direction ("half") of a stream moves from awaiting its head, to its body, to
//! closed (by `end_stream` on a head or data frame, or by trailers). A reset closes both
//! halves at once. The edge's half carries the request and the agent's half the
//! response; for an upgraded stream the "body" is the raw byte stream in each
//! direction. Any frame that does not fit the current state is a [`StreamError`], which
//! the receiver answers by resetting the stream with `ResetCode::Protocol`.

/// What happened on one half of a stream, stripped of payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvent {
    /// A request or response head.
    Head {
        /// The head also ends this half.
        end_stream: bool,
    },
    /// Body bytes.
    Data {
        /// The frame also ends this half.
        end_stream: bool,
    },
    /// Trailers (always end this half).
    Trailers,
    /// Reset (ends both halves).
    Reset,
}

/// Where one direction of a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// Nothing sent yet: the head must come first.
    AwaitHead,
    /// Head sent; data or trailers may follow.
    Body,
    /// Finished.
    Closed,
}

/// A frame that does not fit the stream's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Data or trailers before the head.
    #[error("{0:?} before the head")]
    BeforeHead(StreamEvent),
    /// A second head.
    #[error("second head on the stream")]
    DuplicateHead,
    /// Anything after this half ended.
    #[error("{0:?} after the end of the stream")]
    AfterEnd(StreamEvent),
}

/// Both halves of one stream: what we send (`local`) and what the peer sends (`remote`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamState {
    local: Half,
    remote: Half,
}

impl Default for StreamState {
    fn default() -> Self {
        StreamState::new()
    }
}

impl StreamState {
    /// A stream on which nothing has been sent or received.
    pub fn new() -> StreamState {
        StreamState {
            local: Half::AwaitHead,
            remote: Half::AwaitHead,
        }
    }

    /// Our half.
    pub fn local(&self) -> Half {
        self.local
    }

    /// The peer's half.
    pub fn remote(&self) -> Half {
        self.remote
    }

    /// Both halves are closed: the stream can be forgotten.
    pub fn is_closed(&self) -> bool {
        self.local == Half::Closed && self.remote == Half::Closed
    }

    /// Records a frame we are about to send; an error means the caller has a bug.
    pub fn on_send(&mut self, ev: StreamEvent) -> Result<(), StreamError> {
        Self::step(&mut self.local, &mut self.remote, ev)
    }

    /// Records a frame received from the peer; an error means the peer broke the
    /// protocol and the stream should be reset.
    pub fn on_recv(&mut self, ev: StreamEvent) -> Result<(), StreamError> {
        Self::step(&mut self.remote, &mut self.local, ev)
    }

    fn step(half: &mut Half, other: &mut Half, ev: StreamEvent) -> Result<(), StreamError> {
        match (ev, *half) {
            (StreamEvent::Reset, _) => {
                *half = Half::Closed;
                *other = Half::Closed;
                Ok(())
            }
            (_, Half::Closed) => Err(StreamError::AfterEnd(ev)),
            (StreamEvent::Head { end_stream }, Half::AwaitHead) => {
                *half = if end_stream { Half::Closed } else { Half::Body };
                Ok(())
            }
            (StreamEvent::Head { .. }, Half::Body) => Err(StreamError::DuplicateHead),
            (StreamEvent::Data { .. } | StreamEvent::Trailers, Half::AwaitHead) => {
                Err(StreamError::BeforeHead(ev))
            }
            (StreamEvent::Data { end_stream }, Half::Body) => {
                if end_stream {
                    *half = Half::Closed;
                }
                Ok(())
            }
            (StreamEvent::Trailers, Half::Body) => {
                *half = Half::Closed;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_response_lifecycle() {
        let mut s = StreamState::new();
        s.on_send(StreamEvent::Head { end_stream: false }).unwrap();
        s.on_send(StreamEvent::Data { end_stream: true }).unwrap();
        assert_eq!(s.local(), Half::Closed);
        s.on_recv(StreamEvent::Head { end_stream: false }).unwrap();
        s.on_recv(StreamEvent::Trailers).unwrap();
        assert!(s.is_closed());
    }

    #[test]
    fn protocol_violations_are_errors() {
        let mut s = StreamState::new();
        assert_eq!(
            s.on_recv(StreamEvent::Data { end_stream: false }),
            Err(StreamError::BeforeHead(StreamEvent::Data {
                end_stream: false
            }))
        );
        s.on_recv(StreamEvent::Head { end_stream: true }).unwrap();
        assert!(s.on_recv(StreamEvent::Data { end_stream: false }).is_err());
        s.on_send(StreamEvent::Head { end_stream: false }).unwrap();
        assert_eq!(
            s.on_send(StreamEvent::Head { end_stream: false }),
            Err(StreamError::DuplicateHead)
        );
        s.on_recv(StreamEvent::Reset).unwrap();
        assert!(s.is_closed());
    }
}
