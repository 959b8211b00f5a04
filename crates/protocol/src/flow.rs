//! Credit-based flow control, as plain numbers.
//!
//! Each direction of each stream, and each direction of the whole connection, has a
//! window: the bytes of `Data` payload the sender may still send before the receiver
//! grants more with a `WindowUpdate`. The receiver grants credit only for bytes it has
//! passed on (to the viewer or the origin), so neither side ever holds more than a
//! window's worth of a slow peer's data. Sending beyond the window is a
//! [`FlowError`]: the stream (or, for the connection window, the connection) is reset.

/// Default per-stream window: enough for bulk transfer over a fast link without
/// letting one slow viewer pin much memory.
pub const DEFAULT_STREAM_WINDOW: u32 = 1024 * 1024;

/// Default connection window: the sum of all streams' unconsumed data one agent link
/// may hold at once.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Largest window that may be granted (as in HTTP/2).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

/// A flow-control violation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// The peer sent more than it had credit for.
    #[error("peer sent {sent} bytes with only {available} bytes of credit")]
    Exceeded {
        /// Bytes in the offending frame.
        sent: u64,
        /// Credit that was left.
        available: i64,
    },
    /// A window update pushed the window past [`MAX_WINDOW`].
    #[error("window update overflows the window ({window} + {increment})")]
    Overflow {
        /// Window before the update.
        window: i64,
        /// The increment.
        increment: u32,
    },
}

/// `n` bytes as a signed credit amount. Counts beyond `i64::MAX` (no real buffer is
/// that large) saturate, so they are refused as exceeding the credit instead of
/// wrapping to a negative number that would add credit.
fn as_credit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The sender's view: how much it may still send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWindow {
    available: i64,
}

impl SendWindow {
    /// A window with `initial` bytes of credit.
    pub fn new(initial: u32) -> SendWindow {
        SendWindow {
            available: i64::from(initial),
        }
    }

    /// Credit left.
    pub fn available(&self) -> i64 {
        self.available
    }

    /// How many of `want` bytes may be sent now.
    pub fn allowance(&self, want: usize) -> usize {
        (self.available.max(0) as u64).min(want as u64) as usize
    }

    /// Records `n` bytes sent. Sending more than [`SendWindow::allowance`] is a bug in
    /// the caller, reported as an error rather than a panic.
    pub fn consume(&mut self, n: usize) -> Result<(), FlowError> {
        let n64 = as_credit(n);
        if n64 > self.available {
            return Err(FlowError::Exceeded {
                sent: n as u64,
                available: self.available,
            });
        }
        self.available -= n64;
        Ok(())
    }

    /// Applies a window update from the peer.
    pub fn grant(&mut self, increment: u32) -> Result<(), FlowError> {
        let next = self.available + i64::from(increment);
        if next > MAX_WINDOW {
            return Err(FlowError::Overflow {
                window: self.available,
                increment,
            });
        }
        self.available = next;
        Ok(())
    }
}

/// The receiver's view: how much the peer may still send, and how much consumed data
/// has not yet been returned as credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvWindow {
    initial: u32,
    available: i64,
    unacked: u64,
}

impl RecvWindow {
    /// A window that granted `initial` bytes.
    pub fn new(initial: u32) -> RecvWindow {
        RecvWindow {
            initial,
            available: i64::from(initial),
            unacked: 0,
        }
    }

    /// Credit the peer still has.
    pub fn available(&self) -> i64 {
        self.available
    }

    /// Bytes received and not yet consumed or acknowledged; never more than the window.
    pub fn buffered(&self) -> u64 {
        (i64::from(self.initial) - self.available).max(0) as u64 - self.unacked
    }

    /// Records `n` bytes received from the peer; an error when it exceeded its credit.
    pub fn on_data(&mut self, n: usize) -> Result<(), FlowError> {
        let n64 = as_credit(n);
        if n64 > self.available {
            return Err(FlowError::Exceeded {
                sent: n as u64,
                available: self.available,
            });
        }
        self.available -= n64;
        Ok(())
    }

    /// Records `n` bytes passed on. Returns the increment to send in a window update
    /// once at least half the window has been consumed, so updates are batched rather
    /// than sent per frame.
    ///
    /// Only bytes received and not yet consumed count: reporting more is a bug in the
    /// caller, and the excess is ignored so that the peer is never granted credit for
    /// bytes it did not send (which would let it overrun the window).
    pub fn on_consumed(&mut self, n: usize) -> Option<u32> {
        self.unacked += (n as u64).min(self.buffered());
        if self.unacked >= u64::from(self.initial / 2).max(1) {
            self.flush()
        } else {
            None
        }
    }

    /// Returns all unacknowledged credit now (used when a stream ends or is dropped).
    pub fn flush(&mut self) -> Option<u32> {
        if self.unacked == 0 {
            return None;
        }
        let inc = self.unacked.min(u64::from(u32::MAX)) as u32;
        self.unacked -= u64::from(inc);
        self.available += i64::from(inc);
        Some(inc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_cannot_exceed_credit() {
        let mut w = SendWindow::new(10);
        assert_eq!(w.allowance(100), 10);
        w.consume(10).unwrap();
        assert_eq!(w.allowance(1), 0);
        assert!(w.consume(1).is_err());
        w.grant(5).unwrap();
        assert_eq!(w.allowance(100), 5);
        assert!(w.grant(u32::MAX).is_err());
    }

    #[test]
    fn receiver_batches_updates_at_half_window() {
        let mut r = RecvWindow::new(100);
        r.on_data(60).unwrap();
        assert_eq!(r.on_consumed(30), None);
        assert_eq!(r.buffered(), 30);
        assert_eq!(r.on_consumed(30), Some(60));
        assert_eq!(r.available(), 100);
        assert!(r.on_data(101).is_err());
    }
}
