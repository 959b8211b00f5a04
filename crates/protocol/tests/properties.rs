//! Property tests for the wire protocol: codec round trips however the bytes arrive,
//! hostile bytes, the stream state machine against a model, credit windows under
//! well-behaved and hostile peers (two `conn::Connection`s driven against each other),
//! hostile frame sequences fed to one connection, and the handshake's JSON.
//!
//! Every property runs 256 cases so the suite stays fast; failures are shrunk and
//! persisted by proptest like any other test failure.

use bytes::{Bytes, BytesMut};
use netbore_protocol::conn::{Config as ConnConfig, Connection, Event as ConnEvent, Role};
use netbore_protocol::flow::MAX_WINDOW;
use netbore_protocol::frame::{DEFAULT_MAX_FRAME_LEN, FRAME_HEADER_LEN};
use netbore_protocol::handshake::RefusalCode;
use netbore_protocol::stream::Half;
use netbore_protocol::{
    AgentHello, AgentStatus, DecodeError, EdgeReply, FlowError, Frame, GoAway, Header, Limits,
    OriginState, RecvWindow, Refusal, RequestHead, ResetCode, ResponseHead, SendWindow,
    StreamError, StreamEvent, StreamState, Welcome, decode, encode,
};
use proptest::prelude::*;
use proptest::sample::Index;
use support::Pair;

mod support;

const CASES: u32 = 256;

// ---------------------------------------------------------------------------------
// Frame strategies: every field across the whole range the decoder accepts.
// ---------------------------------------------------------------------------------

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => Just("GET".to_string()),
        // RFC 9110 token characters.
        8 => "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}",
        // The wire allows up to 255 bytes.
        1 => "[A-Za-z0-9!#$%&'*+.^_`|~-]{255}",
    ]
}

fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "/[A-Za-z0-9/?=&%._~-]{0,60}",
        1 => Just("*".to_string()),
        // The decoder takes any UTF-8; validating the target is the agent's job.
        1 => ".{0,40}",
    ]
}

fn header() -> impl Strategy<Value = Header> {
    let value = proptest::collection::vec(
        any::<u8>().prop_filter("no CR, LF or NUL", |b| ![b'\r', b'\n', 0].contains(b)),
        0..64,
    );
    // Lowercase RFC 9110 token characters.
    ("[a-z0-9!#$%&'*+.^_`|~-]{1,24}", value).prop_map(|(n, v)| Header::new(n, Bytes::from(v)))
}

fn headers() -> impl Strategy<Value = Vec<Header>> {
    proptest::collection::vec(header(), 0..8)
}

fn stream_id() -> impl Strategy<Value = u32> {
    prop_oneof![1u32..16, 1..=u32::MAX]
}

fn data() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        1 => Just(Bytes::new()),
        4 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from),
        1 => proptest::collection::vec(any::<u8>(), 0..4096).prop_map(Bytes::from),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (stream_id(), method(), target(), headers(), any::<bool>()).prop_map(
            |(stream_id, method, target, headers, end_stream)| Frame::RequestHead {
                stream_id,
                head: RequestHead {
                    method,
                    target,
                    headers,
                },
                end_stream,
            }
        ),
        (stream_id(), 100u16..=999, headers(), any::<bool>()).prop_map(
            |(stream_id, status, headers, end_stream)| Frame::ResponseHead {
                stream_id,
                head: ResponseHead { status, headers },
                end_stream,
            }
        ),
        (stream_id(), data(), any::<bool>()).prop_map(|(stream_id, data, end_stream)| {
            Frame::Data {
                stream_id,
                data,
                end_stream,
            }
        }),
        (stream_id(), headers())
            .prop_map(|(stream_id, headers)| Frame::Trailers { stream_id, headers }),
        (stream_id(), prop_oneof![1u32..=9, any::<u32>()], ".{0,40}").prop_map(
            |(stream_id, c, message)| Frame::Reset {
                stream_id,
                // Through from_u32 so known codes get their named variant, as on the wire.
                code: ResetCode::from_u32(c),
                message,
            }
        ),
        (prop_oneof![Just(0u32), stream_id()], 1..=u32::MAX).prop_map(|(stream_id, increment)| {
            Frame::WindowUpdate {
                stream_id,
                increment,
            }
        }),
        any::<u64>().prop_map(|payload| Frame::Ping { payload }),
        any::<u64>().prop_map(|payload| Frame::Pong { payload }),
        (any::<u32>(), ".{0,40}").prop_map(|(last_stream_id, message)| Frame::GoAway(GoAway {
            last_stream_id,
            message,
        })),
        (any::<u8>(), any::<u16>(), ".{0,40}").prop_map(|(o, wanted_links, message)| {
            Frame::AgentStatus(AgentStatus {
                // Through from_u8 so known states get their named variant, as on the wire.
                origin: OriginState::from_u8(o),
                wanted_links,
                message,
            })
        }),
    ]
}

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut wire = BytesMut::new();
    for f in frames {
        encode(f, &mut wire);
    }
    wire
}

/// Decodes everything decodable from `buf`, checking on the way that "need more
/// bytes" and errors leave the buffer untouched and that each frame consumes exactly
/// its encoded length.
fn drain(buf: &mut BytesMut, max: usize) -> Result<Vec<Frame>, TestCaseError> {
    let mut got = Vec::new();
    loop {
        let before = buf.clone();
        match decode(buf, max) {
            Ok(Some(f)) => {
                prop_assert_eq!(before.len() - buf.len(), f.encoded_len());
                got.push(f);
            }
            Ok(None) => {
                prop_assert_eq!(&*buf, &before, "need-more-bytes consumed input");
                return Ok(got);
            }
            Err(e) => {
                prop_assert_eq!(&*buf, &before, "a decode error consumed input");
                return Err(TestCaseError::fail(format!("valid frames failed: {e}")));
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Codec
// ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// One frame: encodes to `encoded_len` bytes, decodes to itself, also when the
    /// maximum is exactly its payload length, and is refused (consuming nothing) when
    /// the maximum is one byte less.
    #[test]
    fn every_frame_round_trips_and_respects_the_length_limit(f in frame()) {
        let wire = encode_all(std::slice::from_ref(&f));
        prop_assert_eq!(wire.len(), f.encoded_len());
        let payload = wire.len() - FRAME_HEADER_LEN;

        let mut buf = wire.clone();
        prop_assert_eq!(decode(&mut buf, payload), Ok(Some(f.clone())));
        prop_assert!(buf.is_empty());
        let mut message = wire.clone().freeze();
        prop_assert_eq!(decode(&mut message, payload), Ok(Some(f.clone())));
        prop_assert!(message.is_empty());

        if payload > 0 {
            let mut buf = wire.clone();
            prop_assert_eq!(
                decode(&mut buf, payload - 1),
                Err(DecodeError::TooLarge { len: payload, max: payload - 1 })
            );
            prop_assert_eq!(buf, wire.clone());
        }

        // Fed one byte at a time: nothing until the last byte, then the frame.
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let got = drain(&mut buf, DEFAULT_MAX_FRAME_LEN)?;
            if i + 1 < wire.len() {
                prop_assert!(got.is_empty());
                prop_assert_eq!(buf.len(), i + 1);
            } else {
                prop_assert_eq!(got, vec![f.clone()]);
                prop_assert!(buf.is_empty());
            }
        }
    }

    /// Several frames back to back, fed in chunks split at arbitrary points: after each
    /// chunk exactly the frames wholly received so far come out, in order, and a
    /// partial frame stays in the buffer untouched.
    #[test]
    fn concatenated_frames_decode_in_order_whatever_the_split(
        frames in proptest::collection::vec(frame(), 1..8),
        cuts in proptest::collection::vec(any::<Index>(), 0..8),
    ) {
        let wire = encode_all(&frames).freeze();

        // All at once.
        let mut buf = BytesMut::from(&wire[..]);
        prop_assert_eq!(&drain(&mut buf, DEFAULT_MAX_FRAME_LEN)?, &frames);
        prop_assert!(buf.is_empty());

        // Where each frame ends in the stream of bytes.
        let ends: Vec<usize> = frames
            .iter()
            .scan(0, |at, f| {
                *at += f.encoded_len();
                Some(*at)
            })
            .collect();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();

        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut fed = 0;
        for p in points {
            buf.extend_from_slice(&wire[fed..p]);
            fed = p;
            got.extend(drain(&mut buf, DEFAULT_MAX_FRAME_LEN)?);
            let complete = ends.iter().filter(|e| **e <= fed).count();
            prop_assert_eq!(got.len(), complete, "frames out after {} bytes", fed);
            let last_end = if complete == 0 { 0 } else { ends[complete - 1] };
            prop_assert_eq!(buf.len(), fed - last_end, "partial frame left in the buffer");
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, frames);
    }

    /// Arbitrary bytes (and plausible headers over random payloads) never panic the
    /// decoder, with small and default maximums. A decoded frame consumes exactly its
    /// own bytes and re-encodes to them; "need more bytes" and errors consume nothing.
    #[test]
    fn hostile_bytes_never_panic_and_failures_consume_nothing(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            // A header whose type is mostly valid and whose length matches the payload,
            // so the payload parsers see random input too.
            (prop_oneof![1u8..=9, any::<u8>()], 0u8..4, any::<u32>(),
             proptest::collection::vec(any::<u8>(), 0..256))
                .prop_map(|(ty, flags, id, payload)| {
                    let mut v = vec![ty, flags];
                    v.extend_from_slice(&id.to_be_bytes());
                    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                    v.extend_from_slice(&payload);
                    v
                }),
        ],
        max in prop_oneof![Just(0usize), Just(16), Just(300), Just(DEFAULT_MAX_FRAME_LEN)],
    ) {
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            let before = buf.clone();
            match decode(&mut buf, max) {
                Ok(Some(f)) => {
                    let used = before.len() - buf.len();
                    prop_assert_eq!(used, f.encoded_len());
                    prop_assert!(used - FRAME_HEADER_LEN <= max);
                    let mut re = BytesMut::new();
                    encode(&f, &mut re);
                    prop_assert_eq!(&re[..], &before[..used]);
                }
                Ok(None) => {
                    prop_assert_eq!(&buf, &before);
                    break;
                }
                Err(e) => {
                    prop_assert_eq!(&buf, &before);
                    if let DecodeError::TooLarge { len, max: m } = e {
                        prop_assert!(len > m && m == max);
                    }
                    break;
                }
            }
        }
    }

    /// Valid frames with a few bytes overwritten either still decode (to a frame that
    /// re-encodes to exactly the bytes consumed) or fail without consuming anything.
    #[test]
    fn mutated_valid_frames_decode_or_fail_cleanly(
        f in frame(),
        flips in proptest::collection::vec((any::<Index>(), any::<u8>()), 1..4),
    ) {
        let mut wire = encode_all(&[f]);
        for (i, b) in flips {
            let at = i.index(wire.len());
            wire[at] = b;
        }
        let before = wire.clone();
        match decode(&mut wire, DEFAULT_MAX_FRAME_LEN) {
            Ok(Some(g)) => {
                let used = before.len() - wire.len();
                let mut re = BytesMut::new();
                encode(&g, &mut re);
                prop_assert_eq!(&re[..], &before[..used]);
            }
            Ok(None) | Err(_) => prop_assert_eq!(wire, before),
        }
    }
}

// ---------------------------------------------------------------------------------
// Stream state machine
// ---------------------------------------------------------------------------------

fn stream_event() -> impl Strategy<Value = StreamEvent> {
    prop_oneof![
        3 => any::<bool>().prop_map(|end_stream| StreamEvent::Head { end_stream }),
        4 => any::<bool>().prop_map(|end_stream| StreamEvent::Data { end_stream }),
        2 => Just(StreamEvent::Trailers),
        1 => Just(StreamEvent::Reset),
    ]
}

/// The rules of `docs/protocol.md` ("Streams"), written independently of the code:
/// the expected result of `ev` on a half, and the half afterwards.
fn model(half: Half, ev: StreamEvent) -> (Result<(), StreamError>, Half) {
    use StreamEvent::*;
    match (half, ev) {
        (_, Reset) => (Ok(()), Half::Closed),
        (Half::Closed, ev) => (Err(StreamError::AfterEnd(ev)), Half::Closed),
        (Half::AwaitHead, Head { end_stream: true }) => (Ok(()), Half::Closed),
        (Half::AwaitHead, Head { end_stream: false }) => (Ok(()), Half::Body),
        (Half::AwaitHead, ev @ (Data { .. } | Trailers)) => {
            (Err(StreamError::BeforeHead(ev)), Half::AwaitHead)
        }
        (Half::Body, Head { .. }) => (Err(StreamError::DuplicateHead), Half::Body),
        (Half::Body, Data { end_stream: false }) => (Ok(()), Half::Body),
        (Half::Body, Data { end_stream: true } | Trailers) => (Ok(()), Half::Closed),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Arbitrary sends and receives: the state machine agrees with the model, refused
    /// events change nothing, closed halves stay closed, a reset closes both halves,
    /// and `is_closed` holds exactly when both halves are closed.
    #[test]
    fn stream_state_follows_the_rules(
        events in proptest::collection::vec((any::<bool>(), stream_event()), 0..24),
    ) {
        let mut s = StreamState::new();
        for (local, ev) in events {
            let before = s;
            let half = if local { before.local() } else { before.remote() };
            let r = if local { s.on_send(ev) } else { s.on_recv(ev) };
            let (want, next) = model(half, ev);
            prop_assert_eq!(&r, &want, "{:?} on {:?} (local: {})", ev, half, local);
            prop_assert_eq!(if local { s.local() } else { s.remote() }, next);
            if r.is_err() {
                prop_assert_eq!(s, before, "a refused event changed the state");
            }
            if ev == StreamEvent::Reset {
                prop_assert_eq!((s.local(), s.remote()), (Half::Closed, Half::Closed));
            } else if local {
                prop_assert_eq!(s.remote(), before.remote(), "sending moved the peer's half");
            } else {
                prop_assert_eq!(s.local(), before.local(), "receiving moved our half");
            }
            for (was, is) in [(before.local(), s.local()), (before.remote(), s.remote())] {
                prop_assert!(was != Half::Closed || is == Half::Closed, "a closed half reopened");
            }
            prop_assert_eq!(s.is_closed(), s.local() == Half::Closed && s.remote() == Half::Closed);
        }
    }

    /// Two peers over an in-order link: whatever one side is allowed to send, the other
    /// accepts, and both always agree on the state of each half. So an error on receipt
    /// can only mean a broken peer.
    #[test]
    fn peers_that_follow_the_rules_never_see_a_protocol_error(
        events in proptest::collection::vec((any::<bool>(), stream_event()), 0..24),
    ) {
        let (mut edge, mut agent) = (StreamState::new(), StreamState::new());
        for (from_edge, ev) in events {
            let (tx, rx) = if from_edge { (&mut edge, &mut agent) } else { (&mut agent, &mut edge) };
            if tx.on_send(ev).is_ok() {
                prop_assert_eq!(rx.on_recv(ev), Ok(()), "{:?} accepted by the sender only", ev);
            }
            prop_assert_eq!(edge.local(), agent.remote());
            prop_assert_eq!(edge.remote(), agent.local());
        }
    }
}

// ---------------------------------------------------------------------------------
// Flow control
// ---------------------------------------------------------------------------------

/// One stream of the pair, from the test's point of view: what the agent (the sender
/// here) still has to send, and what the edge received and passed on.
struct Flow {
    id: u32,
    sent: Vec<u8>,
    pending: Bytes,
    finished: bool,
    received: Vec<u8>,
    consumed: usize,
    ended: bool,
}

/// Sends what `f` has pending as far as the credit allows (as the mux does on
/// `Writable`), ending the stream with the last byte once `finish` was asked.
fn push(p: &mut Pair, f: &mut Flow) -> Result<(), TestCaseError> {
    if f.pending.is_empty() && !f.finished {
        return Ok(());
    }
    let before = f.pending.len();
    let credit = p.agent.conn.send_credit(f.id);
    let now = p.now;
    let sent = p
        .agent
        .conn
        .send_data(now, f.id, &mut f.pending, f.finished);
    let sent = sent.map_err(|e| TestCaseError::fail(format!("send_data: {e}")))?;
    prop_assert_eq!(
        sent,
        before.min(credit),
        "sends exactly what the credit allows"
    );
    Ok(())
}

/// Takes the edge's events: data lands in its flow, anything unexpected fails.
fn deliver(p: &mut Pair, flows: &mut [Flow]) -> Result<(), TestCaseError> {
    for ev in p.edge.take_events() {
        match ev {
            ConnEvent::Data { stream_id, data } => {
                let f = flows.iter_mut().find(|f| f.id == stream_id).unwrap();
                f.received.extend_from_slice(&data);
            }
            ConnEvent::End { stream_id } => {
                flows.iter_mut().find(|f| f.id == stream_id).unwrap().ended = true;
            }
            ConnEvent::Head { .. } | ConnEvent::Writable { .. } => {}
            other => return Err(TestCaseError::fail(format!("edge saw {other:?}"))),
        }
    }
    for ev in p.agent.take_events() {
        prop_assert!(
            matches!(
                ev,
                ConnEvent::Writable { .. } | ConnEvent::Opened { .. } | ConnEvent::End { .. }
            ),
            "agent saw {:?}",
            ev
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Several streams sharing a connection window, run by two `Connection`s (the code
    /// the mux runs) through the real codec with a simulated clock: an agent that
    /// sends what its credit allows and a viewer that reads at its own pace never
    /// make either side see a flow-control violation; the edge never holds more than
    /// a stream's window of one stream's unread data, nor more than the connection
    /// window over all; and once everything is read, every byte arrived in order and
    /// the credit came back (all but less than half a window, the batching).
    #[test]
    fn well_behaved_peers_never_violate_flow_control(
        stream_window in 1u32..200_000,
        conn_window in 1u32..400_000,
        n_streams in 1usize..4,
        steps in proptest::collection::vec((0u8..5, any::<Index>(), 0usize..150_000), 0..80),
    ) {
        let limits = Limits {
            max_frame_len: DEFAULT_MAX_FRAME_LEN as u32,
            initial_stream_window: stream_window,
            connection_window: conn_window,
            max_concurrent_streams: 16,
        };
        let mut p = Pair::new(limits);
        let mut flows = Vec::new();
        for i in 0..n_streams {
            let now = p.now;
            let id = p.edge.conn.open(now, support::get(&format!("/{i}")), true).unwrap();
            flows.push(Flow { id, sent: Vec::new(), pending: Bytes::new(), finished: false, received: Vec::new(), consumed: 0, ended: false });
        }
        p.drive();
        for f in &flows {
            let now = p.now;
            p.agent.conn.send_response(now, f.id, support::ok(), false).unwrap();
        }
        let mut offset = 0usize;
        for (op, which, n) in steps {
            let k = which.index(n_streams);
            match op {
                0 => {
                    // The origin produces more bytes (at most a few windows' worth, so
                    // the run ends in a bounded number of rounds); the agent sends
                    // what it may.
                    let n = n % (8 * stream_window.min(conn_window) as usize + 1);
                    let f = &mut flows[k];
                    let more: Vec<u8> = (offset..offset + n).map(|i| (i % 251) as u8).collect();
                    offset += n;
                    f.sent.extend_from_slice(&more);
                    let mut all = BytesMut::from(&f.pending[..]);
                    all.extend_from_slice(&more);
                    f.pending = all.freeze();
                    push(&mut p, &mut flows[k])?;
                }
                1 => {
                    // The viewer reads some of what arrived.
                    let f = &mut flows[k];
                    let take = n.min(f.received.len() - f.consumed);
                    f.consumed += take;
                    let now = p.now;
                    p.edge.conn.consumed(now, f.id, take);
                }
                2 => p.advance(std::time::Duration::from_millis(n as u64 % 40_000)),
                3 => {
                    for f in flows.iter_mut() {
                        push(&mut p, f)?;
                    }
                }
                _ => {
                    p.drive();
                }
            }
            p.drive();
            deliver(&mut p, &mut flows)?;
            let mut unread = 0;
            for f in &flows {
                let held = f.received.len() - f.consumed;
                prop_assert!(held <= stream_window as usize, "stream holds {} > window {}", held, stream_window);
                unread += held;
            }
            prop_assert!(unread <= conn_window as usize, "link holds {} > window {}", unread, conn_window);
            prop_assert!(!p.edge.conn.is_closed() && !p.agent.conn.is_closed());
        }
        // Finish: the agent ends each stream, the viewer reads everything.
        for f in flows.iter_mut() {
            f.finished = true;
        }
        for _ in 0..10_000 {
            if flows.iter().all(|f| f.ended && f.consumed == f.received.len()) {
                break;
            }
            for f in flows.iter_mut() {
                if !f.ended {
                    push(&mut p, f)?;
                }
                if f.pending.is_empty() {
                    // Sent whole: nothing more to push (the end went with it).
                    f.finished = false;
                }
            }
            p.drive();
            deliver(&mut p, &mut flows)?;
            for f in flows.iter_mut() {
                let take = f.received.len() - f.consumed;
                f.consumed += take;
                let now = p.now;
                p.edge.conn.consumed(now, f.id, take);
            }
            p.drive();
            deliver(&mut p, &mut flows)?;
        }
        for f in &flows {
            prop_assert!(f.ended, "stream {} never ended", f.id);
            prop_assert_eq!(&f.received, &f.sent, "bytes intact and in order");
        }
        prop_assert_eq!(p.edge.conn.open_streams() + p.agent.conn.open_streams(), 0);
        let credit = p.agent.conn.connection_credit();
        prop_assert!(credit <= i64::from(conn_window) && credit > i64::from(conn_window) - i64::from(conn_window / 2).max(1),
            "credit {} of {}", credit, conn_window);
    }

    /// Arbitrary frame sequences (valid frames, in any order, for any stream) fed to
    /// either side never panic; the stream table stays within the concurrency limit
    /// and the head budget; and a violation closes the connection with a reason
    /// (after which nothing more is taken).
    #[test]
    fn hostile_frame_sequences_never_panic_and_stay_bounded(
        agent in any::<bool>(),
        frames in proptest::collection::vec(frame(), 0..40),
    ) {
        let limits = Limits { max_concurrent_streams: 4, ..Limits::default() };
        let role = if agent { Role::Agent } else { Role::Edge };
        let mut c = Connection::new(ConnConfig::new(role, limits, std::time::Duration::from_secs(1)), std::time::Duration::ZERO);
        for (i, f) in frames.into_iter().enumerate() {
            let now = std::time::Duration::from_millis(i as u64 * 100);
            c.handle_timeout(now);
            let mut buf = BytesMut::new();
            encode(&f, &mut buf);
            let r = c.handle_message(now, buf.freeze());
            if let Err(e) = &r {
                prop_assert!(!e.to_string().is_empty());
                prop_assert!(c.is_closed());
            }
            prop_assert!(c.open_streams() <= 4);
            prop_assert!(c.head_bytes() <= netbore_protocol::conn::MAX_LINK_HEAD_BYTES);
            while c.poll_transmit().is_some() {}
            while let Some(ev) = c.poll() {
                if let ConnEvent::Data { stream_id, data } = ev {
                    c.consumed(now, stream_id, data.len());
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// A receiver driven by an arbitrary (hostile or buggy) peer and consumer: data
    /// beyond the credit is an error that changes nothing; it never buffers more than
    /// its window, never offers more credit than the window, and never grants credit
    /// for bytes it did not receive.
    #[test]
    fn receiver_stays_bounded_whatever_it_is_fed(
        window in 1u32..100_000,
        steps in proptest::collection::vec(
            (0u8..3, prop_oneof![0usize..150_000, any::<usize>()]),
            0..60,
        ),
    ) {
        let mut r = RecvWindow::new(window);
        let (mut received, mut granted) = (0u64, 0u64);
        for (op, n) in steps {
            let before = r;
            match op {
                0 => match r.on_data(n) {
                    Ok(()) => {
                        prop_assert!(n as u128 <= before.available().max(0) as u128);
                        received += n as u64;
                    }
                    Err(FlowError::Exceeded { sent, available }) => {
                        prop_assert_eq!((sent, available), (n as u64, before.available()));
                        prop_assert_eq!(r, before, "a refused frame changed the window");
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
                },
                1 => granted += u64::from(r.on_consumed(n).unwrap_or(0)),
                _ => granted += u64::from(r.flush().unwrap_or(0)),
            }
            prop_assert!(r.buffered() <= u64::from(window));
            prop_assert!(r.available() <= i64::from(window));
            prop_assert!(granted <= received, "granted credit for bytes never received");
        }
    }

    /// The sender's window: `allowance` never exceeds the wish or the credit, sending
    /// it always succeeds, sending more than the credit (however much more) is an error
    /// that changes nothing, and no update can push the window past `MAX_WINDOW`.
    #[test]
    fn sender_never_exceeds_its_credit(
        initial in any::<u32>(),
        steps in proptest::collection::vec(
            (0u8..3, prop_oneof![0usize..1 << 20, any::<usize>()], any::<u32>()),
            0..60,
        ),
    ) {
        let mut w = SendWindow::new(initial);
        for (op, n, inc) in steps {
            let before = w;
            match op {
                0 => {
                    let k = w.allowance(n);
                    prop_assert!(k <= n && k as i64 <= before.available());
                    prop_assert_eq!(w.consume(k), Ok(()));
                    prop_assert_eq!(w.available(), before.available() - k as i64);
                }
                1 => {
                    let over = before.available().max(0) as usize + 1 + n % 1000;
                    let huge = n.max(over);
                    for n in [over, huge] {
                        prop_assert!(w.consume(n).is_err(), "consume({}) with {} credit", n, before.available());
                        prop_assert_eq!(w, before);
                    }
                }
                _ => match w.grant(inc) {
                    Ok(()) => prop_assert_eq!(w.available(), before.available() + i64::from(inc)),
                    Err(FlowError::Overflow { .. }) => {
                        prop_assert!(before.available() + i64::from(inc) > MAX_WINDOW);
                        prop_assert_eq!(w, before);
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
                },
            }
            prop_assert!(w.available() >= 0 && w.available() <= MAX_WINDOW.max(i64::from(initial)));
        }
    }
}

// ---------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------

fn refusal_code() -> impl Strategy<Value = RefusalCode> {
    prop::sample::select(vec![
        RefusalCode::MalformedHello,
        RefusalCode::UnsupportedVersion,
        RefusalCode::InvalidToken,
        RefusalCode::TunnelMismatch,
        RefusalCode::Draining,
        RefusalCode::Unavailable,
        RefusalCode::LimitReached,
        RefusalCode::CredentialRevoked,
    ])
}

fn edge_reply() -> impl Strategy<Value = EdgeReply> {
    prop_oneof![
        (
            any::<u32>(),
            ".{0,20}",
            ".{0,20}",
            any::<u64>(),
            any::<[u32; 4]>()
        )
            .prop_map(|(version, session_id, edge_id, hb, l)| {
                EdgeReply::Welcome(Welcome {
                    version,
                    session_id,
                    edge_id,
                    heartbeat_interval_ms: hb,
                    limits: Limits {
                        max_frame_len: l[0],
                        initial_stream_window: l[1],
                        connection_window: l[2],
                        max_concurrent_streams: l[3],
                    },
                    warnings: Vec::new(),
                    capabilities: Vec::new(),
                })
            }),
        (refusal_code(), ".{0,40}", any::<bool>()).prop_map(|(code, message, retryable)| {
            EdgeReply::Refused(Refusal {
                code,
                message,
                retryable,
            })
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Hellos and replies survive JSON both ways, and replies carry their `type` tag.
    #[test]
    fn handshake_messages_round_trip_through_json(
        hello in (any::<u32>(), "[a-z0-9]{16,32}", ".{0,20}", proptest::collection::vec(".{0,8}", 0..4), ".{0,20}", "[a-z0-9]{0,16}")
            .prop_map(|(version, secret, tunnel_id, capabilities, agent, instance_id)| AgentHello {
                version, token: format!("jwt.{secret}"), tunnel_id, capabilities, agent, instance_id,
            }),
        reply in edge_reply(),
    ) {
        let s = serde_json::to_string(&hello).unwrap();
        prop_assert_eq!(serde_json::from_str::<AgentHello>(&s).unwrap(), hello.clone());
        prop_assert!(!hello.to_string().contains(&hello.token), "Display shows the token");

        let s = serde_json::to_string(&reply).unwrap();
        let tag = match reply { EdgeReply::Welcome(_) => r#""type":"welcome""#, EdgeReply::Refused(_) => r#""type":"refused""# };
        prop_assert!(s.contains(tag), "{}", s);
        prop_assert_eq!(serde_json::from_str::<EdgeReply>(&s).unwrap(), reply);
    }

    /// Arbitrary text never panics the handshake parsers.
    #[test]
    fn arbitrary_text_never_panics_the_handshake_parsers(s in ".{0,200}", b in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = serde_json::from_str::<AgentHello>(&s);
        let _ = serde_json::from_str::<EdgeReply>(&s);
        let _ = serde_json::from_slice::<AgentHello>(&b);
        let _ = serde_json::from_slice::<EdgeReply>(&b);
    }
}

/// Each refusal code has the stable wire name the spec lists.
#[test]
fn refusal_codes_have_stable_names() {
    let names = [
        (RefusalCode::MalformedHello, "malformed_hello"),
        (RefusalCode::UnsupportedVersion, "unsupported_version"),
        (RefusalCode::InvalidToken, "invalid_token"),
        (RefusalCode::TunnelMismatch, "tunnel_mismatch"),
        (RefusalCode::Draining, "draining"),
        (RefusalCode::Unavailable, "unavailable"),
        (RefusalCode::LimitReached, "limit_reached"),
        (RefusalCode::CredentialRevoked, "credential_revoked"),
    ];
    for (code, name) in names {
        assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{name}\""));
    }
}

/// Reset codes have the wire values the spec lists, and unknown ones survive.
#[test]
fn reset_codes_have_stable_values() {
    let codes = [
        (ResetCode::Protocol, 1),
        (ResetCode::Internal, 2),
        (ResetCode::FlowControl, 3),
        (ResetCode::Refused, 4),
        (ResetCode::Cancel, 5),
        (ResetCode::OriginUnreachable, 6),
        (ResetCode::OriginTimeout, 7),
        (ResetCode::OriginError, 8),
    ];
    for (code, v) in codes {
        assert_eq!(code.to_u32(), v);
        assert_eq!(ResetCode::from_u32(v), code);
    }
    assert_eq!(ResetCode::from_u32(0), ResetCode::Other(0));
    assert_eq!(ResetCode::from_u32(9).to_u32(), 9);
}
