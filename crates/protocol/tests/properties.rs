//! Property tests: codec round trips, hostile bytes, stream states, credit windows.

use bytes::{Bytes, BytesMut};
use netbore_protocol::frame::DEFAULT_MAX_FRAME_LEN;
use netbore_protocol::stream::Half;
use netbore_protocol::{
    Frame, GoAway, Header, RecvWindow, RequestHead, ResetCode, ResponseHead, SendWindow,
    StreamEvent, StreamState, decode, encode,
};
use proptest::prelude::*;

fn token() -> impl Strategy<Value = String> {
    "[A-Z]{1,10}"
}

fn header() -> impl Strategy<Value = Header> {
    (
        "[a-z][a-z0-9-]{0,20}",
        proptest::collection::vec(
            any::<u8>().prop_filter("no CR/LF/NUL", |b| ![b'\r', b'\n', 0].contains(b)),
            0..40,
        ),
    )
        .prop_map(|(n, v)| Header::new(n, Bytes::from(v)))
}

fn headers() -> impl Strategy<Value = Vec<Header>> {
    proptest::collection::vec(header(), 0..8)
}

fn stream_id() -> impl Strategy<Value = u32> {
    1..=u32::MAX
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            stream_id(),
            token(),
            "/[a-z0-9/?=&]{0,40}",
            headers(),
            any::<bool>()
        )
            .prop_map(|(stream_id, method, target, headers, end_stream)| {
                Frame::RequestHead {
                    stream_id,
                    head: RequestHead {
                        method,
                        target,
                        headers,
                    },
                    end_stream,
                }
            }),
        (stream_id(), 100u16..=999, headers(), any::<bool>()).prop_map(
            |(stream_id, status, headers, end_stream)| {
                Frame::ResponseHead {
                    stream_id,
                    head: ResponseHead { status, headers },
                    end_stream,
                }
            }
        ),
        (
            stream_id(),
            proptest::collection::vec(any::<u8>(), 0..2000),
            any::<bool>()
        )
            .prop_map(|(stream_id, d, end_stream)| Frame::Data {
                stream_id,
                data: Bytes::from(d),
                end_stream
            }),
        (stream_id(), headers())
            .prop_map(|(stream_id, headers)| Frame::Trailers { stream_id, headers }),
        (stream_id(), any::<u32>(), ".{0,40}").prop_map(|(stream_id, c, message)| Frame::Reset {
            stream_id,
            code: ResetCode::from_u32(c),
            message,
        }),
        (any::<u32>(), 1..=u32::MAX).prop_map(|(stream_id, increment)| Frame::WindowUpdate {
            stream_id,
            increment
        }),
        any::<u64>().prop_map(|payload| Frame::Ping { payload }),
        any::<u64>().prop_map(|payload| Frame::Pong { payload }),
        (any::<u32>(), ".{0,40}").prop_map(|(last_stream_id, message)| Frame::GoAway(GoAway {
            last_stream_id,
            message
        })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frames_round_trip_alone_together_and_split_anywhere(
        frames in proptest::collection::vec(frame(), 1..6),
        cut_seed in any::<prop::sample::Index>(),
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            encode(f, &mut wire);
        }
        let whole = wire.clone().freeze();

        // Back to back in one buffer.
        let mut got = Vec::new();
        while let Some(f) = decode(&mut wire, DEFAULT_MAX_FRAME_LEN).unwrap() {
            got.push(f);
        }
        prop_assert!(wire.is_empty());
        prop_assert_eq!(&got, &frames);

        // Fed in two pieces split anywhere: nothing is consumed until a frame is whole.
        let cut = cut_seed.index(whole.len() + 1);
        let mut buf = BytesMut::from(&whole[..cut]);
        let mut got = Vec::new();
        loop {
            let before = buf.len();
            match decode(&mut buf, DEFAULT_MAX_FRAME_LEN).unwrap() {
                Some(f) => got.push(f),
                None => { prop_assert_eq!(buf.len(), before); break; }
            }
        }
        buf.extend_from_slice(&whole[cut..]);
        while let Some(f) = decode(&mut buf, DEFAULT_MAX_FRAME_LEN).unwrap() {
            got.push(f);
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_failures_consume_nothing(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        max in prop_oneof![Just(16usize), Just(300), Just(DEFAULT_MAX_FRAME_LEN)],
    ) {
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            let before = buf.len();
            match decode(&mut buf, max) {
                Ok(Some(f)) => prop_assert!(buf.len() < before && f.encoded_len() <= before),
                Ok(None) | Err(_) => { prop_assert_eq!(buf.len(), before); break; }
            }
        }
    }

    #[test]
    fn mutated_valid_frames_decode_or_fail_cleanly(
        f in frame(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut wire = BytesMut::new();
        encode(&f, &mut wire);
        for (i, b) in flips {
            let at = i.index(wire.len());
            wire[at] = b;
        }
        let before = wire.clone();
        match decode(&mut wire, DEFAULT_MAX_FRAME_LEN) {
            Ok(Some(g)) => {
                // Whatever decodes re-encodes to exactly the bytes it consumed.
                let used = before.len() - wire.len();
                let mut re = BytesMut::new();
                encode(&g, &mut re);
                prop_assert_eq!(&re[..], &before[..used]);
            }
            Ok(None) | Err(_) => prop_assert_eq!(wire, before),
        }
    }

    #[test]
    fn stream_states_keep_their_invariants(events in proptest::collection::vec((any::<bool>(), 0u8..5), 0..20)) {
        let mut s = StreamState::new();
        for (local, kind) in events {
            let ev = match kind {
                0 => StreamEvent::Head { end_stream: false },
                1 => StreamEvent::Head { end_stream: true },
                2 => StreamEvent::Data { end_stream: false },
                3 => StreamEvent::Data { end_stream: true },
                _ => StreamEvent::Trailers,
            };
            let before = s;
            let half = if local { before.local() } else { before.remote() };
            let r = if local { s.on_send(ev) } else { s.on_recv(ev) };
            match (half, ev) {
                (Half::Closed, _) => prop_assert!(r.is_err()),
                (Half::AwaitHead, StreamEvent::Data { .. } | StreamEvent::Trailers) => prop_assert!(r.is_err()),
                (Half::Body, StreamEvent::Head { .. }) => prop_assert!(r.is_err()),
                _ => prop_assert!(r.is_ok()),
            }
            if r.is_err() {
                prop_assert_eq!(s, before, "a refused event changes nothing");
            }
            // The other half never moves.
            if local { prop_assert_eq!(s.remote(), before.remote()); } else { prop_assert_eq!(s.local(), before.local()); }
            prop_assert_eq!(s.is_closed(), s.local() == Half::Closed && s.remote() == Half::Closed);
        }
        s.on_recv(StreamEvent::Reset).unwrap();
        prop_assert!(s.is_closed());
    }

    #[test]
    fn credit_bounds_buffering_and_returns_what_was_consumed(
        window in 1u32..100_000,
        steps in proptest::collection::vec((0u8..3, 0usize..50_000), 0..60),
    ) {
        let mut send = SendWindow::new(window);
        let mut recv = RecvWindow::new(window);
        let mut in_flight: u64 = 0;   // sent, not yet consumed
        let (mut consumed, mut granted) = (0u64, 0u64);
        for (op, n) in steps {
            match op {
                0 => {
                    let k = send.allowance(n);
                    send.consume(k).unwrap();
                    recv.on_data(k).unwrap();
                    in_flight += k as u64;
                }
                1 => {
                    let k = (n as u64).min(in_flight);
                    in_flight -= k;
                    consumed += k;
                    if let Some(inc) = recv.on_consumed(k as usize) {
                        granted += u64::from(inc);
                        send.grant(inc).unwrap();
                    }
                }
                _ => {
                    if let Some(inc) = recv.flush() {
                        granted += u64::from(inc);
                        send.grant(inc).unwrap();
                    }
                }
            }
            prop_assert!(recv.buffered() <= u64::from(window));
            prop_assert_eq!(recv.buffered(), in_flight);
            prop_assert_eq!(send.available(), recv.available());
        }
        if let Some(inc) = recv.flush() {
            granted += u64::from(inc);
        }
        prop_assert_eq!(granted, consumed);
        // Sending past the credit is refused.
        let over = send.available() as usize + 1;
        prop_assert!(send.clone().consume(over).is_err());
    }
}
