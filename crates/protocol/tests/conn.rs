//! Two connection state machines driven against each other with a simulated clock:
//! requests and responses, the heartbeat deadline, go-away, window exhaustion and
//! recovery, resets both ways, the concurrency limit, and the violations that close
//! a connection or reset one stream.

mod support;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use netbore_protocol::conn::{ConnectionError, Event, MAX_QUEUED_FRAMES, OpError, Refusal};
use netbore_protocol::{Frame, FrameType, Limits, ResetCode, encode};
use support::{HEARTBEAT, Pair, get, ok, pattern};

fn limits(stream_window: u32, connection_window: u32, max_concurrent_streams: u32) -> Limits {
    Limits {
        max_frame_len: 256 * 1024,
        initial_stream_window: stream_window,
        connection_window,
        max_concurrent_streams,
    }
}

/// Everything the side's events carried as data on `stream_id`, consumed as it came.
fn data_of(events: &[Event], stream_id: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for ev in events {
        if let Event::Data {
            stream_id: id,
            data,
        } = ev
            && *id == stream_id
        {
            out.extend_from_slice(data);
        }
    }
    out
}

fn ended(events: &[Event], stream_id: u32) -> bool {
    events
        .iter()
        .any(|e| matches!(e, Event::End { stream_id: id } if *id == stream_id))
}

fn reset_of(events: &[Event], stream_id: u32) -> Option<ResetCode> {
    events.iter().find_map(|e| match e {
        Event::Reset {
            stream_id: id,
            code,
            ..
        } if *id == stream_id => Some(*code),
        _ => None,
    })
}

fn closed_with(events: &[Event]) -> Option<&ConnectionError> {
    events.iter().find_map(|e| match e {
        Event::Closed(e) => Some(e),
        _ => None,
    })
}

fn msg(frames: &[Frame]) -> Bytes {
    let mut buf = BytesMut::new();
    for f in frames {
        encode(f, &mut buf);
    }
    buf.freeze()
}

#[test]
fn a_request_and_its_response_arrive_whole_and_the_stream_is_forgotten() {
    let mut p = Pair::new(Limits::default());
    let now = p.now;
    let id = p.edge.conn.open(now, get("/hello"), true).unwrap();
    assert_eq!(id, 1);
    p.drive();
    let ev = p.agent.take_events();
    assert!(
        matches!(&ev[..], [Event::Opened { stream_id: 1, head, end_stream: true }, Event::End { stream_id: 1 }] if head.target == "/hello"),
        "{ev:?}"
    );
    let body = pattern(200_000);
    p.agent.conn.send_response(now, id, ok(), false).unwrap();
    let mut rest = body.clone();
    assert_eq!(
        p.agent.conn.send_data(now, id, &mut rest, true).unwrap(),
        body.len()
    );
    assert!(rest.is_empty());
    assert_eq!(
        p.agent.conn.open_streams(),
        0,
        "both halves done: forgotten"
    );
    p.drive();
    let ev = p.edge.take_events();
    assert!(matches!(&ev[0], Event::Head { stream_id: 1, head } if head.status == 200));
    assert_eq!(
        data_of(&ev, 1),
        body.to_vec(),
        "body bytes intact and in order"
    );
    assert!(ended(&ev, 1));
    assert_eq!(p.edge.conn.open_streams(), 0);
    assert_eq!(p.edge.conn.bytes().0, 200_000);
}

#[test]
fn an_idle_link_pings_and_stays_up() {
    let mut p = Pair::new(Limits::default());
    p.advance(HEARTBEAT * 20);
    assert!(!p.edge.conn.is_closed() && !p.agent.conn.is_closed());
    // One ping per quiet interval each way (plus its pong), nothing more.
    assert!(
        p.edge.messages_sent >= 19 && p.edge.messages_sent <= 42,
        "{}",
        p.edge.messages_sent
    );
    assert!(p.edge.conn.poll_timeout().unwrap() > p.now);
}

#[test]
fn a_silent_peer_is_declared_dead_after_three_intervals_not_before() {
    let mut p = Pair::new(Limits::default());
    let now = p.now;
    let id = p.edge.conn.open(now, get("/slow"), true).unwrap();
    p.advance(HEARTBEAT / 2);
    p.agent.conn.send_response(p.now, id, ok(), false).unwrap();
    p.drive();
    // The agent goes silent (its process hangs, the path drops its packets).
    p.agent.link_up = false;
    let last_heard = p.now;
    p.advance_to(last_heard + HEARTBEAT * 3 - Duration::from_millis(1));
    assert!(
        !p.edge.conn.is_closed(),
        "closed before three intervals of silence"
    );
    p.advance(Duration::from_millis(1));
    let ev = p.edge.take_events();
    assert!(
        matches!(closed_with(&ev), Some(ConnectionError::HeartbeatTimeout { silent }) if *silent == HEARTBEAT * 3),
        "{ev:?}"
    );
    assert_eq!(
        reset_of(&ev, id),
        Some(ResetCode::Cancel),
        "the open stream ends"
    );
    assert!(p.edge.conn.poll_timeout().is_none());
    assert!(matches!(
        p.edge.conn.open(p.now, get("/"), true),
        Err(OpError::Closed(_))
    ));
}

#[test]
fn traffic_keeps_a_link_alive_without_pings() {
    let mut p = Pair::new(Limits::default());
    let now = p.now;
    let id = p.edge.conn.open(now, get("/stream"), false).unwrap();
    p.drive();
    p.agent.conn.send_response(p.now, id, ok(), false).unwrap();
    for _ in 0..10 {
        p.advance(HEARTBEAT / 2);
        let t = p.now;
        p.agent
            .conn
            .send_data(t, id, &mut Bytes::from_static(b"tick"), false)
            .unwrap();
        p.edge
            .conn
            .send_data(t, id, &mut Bytes::from_static(b"tock"), false)
            .unwrap();
        p.drive();
    }
    assert!(!p.edge.conn.is_closed() && !p.agent.conn.is_closed());
    assert_eq!(data_of(&p.edge.events, id).len(), 40);
}

#[test]
fn go_away_stops_new_streams_and_lets_open_ones_finish() {
    let mut p = Pair::new(Limits::default());
    let now = p.now;
    let a = p.edge.conn.open(now, get("/a"), true).unwrap();
    let b = p.edge.conn.open(now, get("/b"), true).unwrap();
    p.edge.conn.go_away(now, "draining");
    assert_eq!(
        p.edge.conn.open(now, get("/c"), true),
        Err(OpError::Refused(Refusal::GoingAway))
    );
    p.drive();
    let ev = p.agent.take_events();
    assert!(
        ev.iter().any(
            |e| matches!(e, Event::GoAway(g) if g.last_stream_id == 2 && g.message == "draining")
        ),
        "{ev:?}"
    );
    assert!(p.agent.conn.is_going_away());
    for id in [a, b] {
        p.agent.conn.send_response(p.now, id, ok(), false).unwrap();
        p.agent
            .conn
            .send_data(p.now, id, &mut Bytes::from_static(b"done"), true)
            .unwrap();
    }
    p.drive();
    let ev = p.edge.take_events();
    for id in [a, b] {
        assert_eq!(data_of(&ev, id), b"done");
        assert!(ended(&ev, id));
    }
    assert_eq!(p.edge.conn.open_streams(), 0);
    assert!(!p.edge.conn.is_closed());
}

#[test]
fn the_agent_may_not_send_go_away() {
    let mut p = Pair::new(Limits::default());
    p.agent.conn.go_away(p.now, "no"); // not the agent's to send: nothing queued
    assert_eq!(p.agent.conn.queued_frames(), 0);
    let frame = Frame::GoAway(netbore_protocol::GoAway {
        last_stream_id: 0,
        message: "hostile".into(),
    });
    let err = p
        .edge
        .conn
        .handle_message(p.now, msg(&[frame]))
        .unwrap_err();
    assert_eq!(
        err,
        ConnectionError::WrongSender {
            frame: FrameType::GoAway,
            sender: netbore_protocol::conn::Role::Agent
        }
    );
    assert!(err.to_string().contains("the agent sent GoAway"), "{err}");
}

#[test]
fn an_exhausted_stream_window_holds_the_sender_until_the_receiver_consumes() {
    let window = 10_000;
    let mut p = Pair::new(limits(window, 1 << 20, 16));
    let now = p.now;
    let id = p.edge.conn.open(now, get("/big"), true).unwrap();
    p.drive();
    p.agent.conn.send_response(now, id, ok(), false).unwrap();
    let body = pattern(35_000);
    let mut rest = body.clone();
    let sent = p.agent.conn.send_data(now, id, &mut rest, true).unwrap();
    assert_eq!(sent, window as usize, "exactly the window, no more");
    assert_eq!(p.agent.conn.send_credit(id), 0);
    p.drive();
    let mut received = Vec::new();
    let mut rounds = 0;
    loop {
        let ev = p.edge.take_events();
        let got = data_of(&ev, id);
        assert!(
            got.len() <= window as usize,
            "the receiver never holds more than its window"
        );
        received.extend_from_slice(&got);
        if ended(&ev, id) {
            break;
        }
        // The viewer takes what arrived; its credit goes back; the agent resumes.
        p.edge.conn.consumed(p.now, id, got.len());
        p.drive();
        let agent_ev = p.agent.take_events();
        if !rest.is_empty() {
            assert!(
                agent_ev.contains(&Event::Writable { stream_id: id }),
                "credit came back: {agent_ev:?}"
            );
            p.agent.conn.send_data(p.now, id, &mut rest, true).unwrap();
            p.drive();
        }
        rounds += 1;
        assert!(rounds < 20, "no progress");
    }
    assert_eq!(received, body.to_vec());
    assert!(
        rounds >= 3,
        "the window really limited the sender ({rounds} rounds)"
    );
}

#[test]
fn the_connection_window_is_shared_by_all_streams() {
    let mut p = Pair::new(limits(100_000, 30_000, 16));
    let now = p.now;
    let a = p.edge.conn.open(now, get("/a"), false).unwrap();
    let b = p.edge.conn.open(now, get("/b"), false).unwrap();
    let mut da = pattern(25_000);
    let mut db = pattern(25_000);
    assert_eq!(
        p.edge.conn.send_data(now, a, &mut da, true).unwrap(),
        25_000
    );
    assert_eq!(
        p.edge.conn.send_data(now, b, &mut db, true).unwrap(),
        5_000,
        "the connection's credit is spent"
    );
    assert_eq!(p.edge.conn.connection_credit(), 0);
    p.drive();
    // The origin reads stream a; the connection credit (not b's own) comes back.
    let agent_ev = p.agent.take_events();
    assert_eq!(data_of(&agent_ev, a).len(), 25_000);
    p.agent.conn.consumed(p.now, a, 25_000);
    p.drive();
    assert!(
        p.edge
            .take_events()
            .contains(&Event::Writable { stream_id: b })
    );
    assert_eq!(
        p.edge.conn.send_data(p.now, b, &mut db, true).unwrap(),
        20_000
    );
    p.drive();
    let ev = p.agent.take_events();
    assert_eq!(data_of(&agent_ev, b).len() + data_of(&ev, b).len(), 25_000);
    assert!(ended(&ev, b));
}

#[test]
fn data_beyond_a_streams_credit_resets_that_stream_only() {
    let mut p = Pair::new(limits(1_000, 1 << 20, 16));
    let now = p.now;
    let a = p.edge.conn.open(now, get("/a"), false).unwrap();
    let b = p.edge.conn.open(now, get("/b"), false).unwrap();
    p.drive();
    p.agent.take_events();
    // A hostile edge ignores the window.
    let over = Frame::Data {
        stream_id: a,
        data: pattern(1_001),
        end_stream: false,
    };
    p.agent.conn.handle_message(p.now, msg(&[over])).unwrap();
    let ev = p.agent.take_events();
    assert_eq!(reset_of(&ev, a), Some(ResetCode::FlowControl));
    assert!(p.agent.conn.is_open(b) && !p.agent.conn.is_open(a));
    assert!(
        matches!(p.agent.conn.poll_transmit(), Some(Frame::Reset { stream_id, code: ResetCode::FlowControl, .. }) if stream_id == a)
    );
    // The connection and the other stream are unharmed: b takes its whole window.
    let full = Frame::Data {
        stream_id: b,
        data: pattern(1_000),
        end_stream: false,
    };
    p.agent.conn.handle_message(p.now, msg(&[full])).unwrap();
    assert_eq!(data_of(&p.agent.take_events(), b).len(), 1_000);
}

#[test]
fn data_beyond_the_connections_credit_closes_the_connection() {
    let mut p = Pair::new(limits(100_000, 1_000, 16));
    let a = p.edge.conn.open(p.now, get("/a"), false).unwrap();
    p.drive();
    let over = Frame::Data {
        stream_id: a,
        data: pattern(1_001),
        end_stream: false,
    };
    let err = p
        .agent
        .conn
        .handle_message(p.now, msg(&[over]))
        .unwrap_err();
    assert!(matches!(err, ConnectionError::Flow(_)), "{err}");
    assert!(
        err.to_string()
            .contains("flow control error on the connection"),
        "{err}"
    );
    let ev = p.agent.take_events();
    assert_eq!(reset_of(&ev, a), Some(ResetCode::Cancel));
    assert!(closed_with(&ev).is_some());
}

#[test]
fn a_window_update_that_overflows_resets_the_stream() {
    let mut p = Pair::new(limits(1_000, 1_000, 16));
    let a = p.edge.conn.open(p.now, get("/a"), false).unwrap();
    let upd = Frame::WindowUpdate {
        stream_id: a,
        increment: u32::MAX,
    };
    p.edge.conn.poll_transmit();
    p.edge.conn.handle_message(p.now, msg(&[upd])).unwrap();
    assert_eq!(
        reset_of(&p.edge.conn.poll().into_iter().collect::<Vec<_>>(), a),
        Some(ResetCode::FlowControl)
    );
    let upd = Frame::WindowUpdate {
        stream_id: 0,
        increment: u32::MAX,
    };
    let err = p.edge.conn.handle_message(p.now, msg(&[upd])).unwrap_err();
    assert!(matches!(err, ConnectionError::Flow(_)));
}

#[test]
fn the_edge_resets_and_the_agent_hears_it() {
    let mut p = Pair::new(Limits::default());
    let id = p.edge.conn.open(p.now, get("/a"), false).unwrap();
    p.drive();
    p.edge
        .conn
        .reset(p.now, id, ResetCode::Cancel, "viewer went away");
    assert!(!p.edge.conn.is_open(id));
    p.drive();
    let ev = p.agent.take_events();
    assert!(
        ev.iter().any(|e| matches!(e, Event::Reset { stream_id, code: ResetCode::Cancel, message } if *stream_id == id && message == "viewer went away")),
        "{ev:?}"
    );
    assert_eq!(p.agent.conn.open_streams(), 0);
    // Frames the agent had in flight for it are ignored, their credit returned.
    let mut late = Bytes::from_static(b"late");
    assert!(matches!(
        p.agent.conn.send_data(p.now, id, &mut late, true),
        Err(OpError::UnknownStream(_))
    ));
}

#[test]
fn the_agent_resets_and_the_edge_hears_it() {
    let mut p = Pair::new(Limits::default());
    let id = p.edge.conn.open(p.now, get("/a"), true).unwrap();
    p.drive();
    p.agent.conn.reset(
        p.now,
        id,
        ResetCode::OriginUnreachable,
        "connection refused",
    );
    p.drive();
    let ev = p.edge.take_events();
    assert_eq!(reset_of(&ev, id), Some(ResetCode::OriginUnreachable));
    assert_eq!(
        (p.edge.conn.open_streams(), p.agent.conn.open_streams()),
        (0, 0)
    );
}

#[test]
fn a_stream_reset_before_its_head_left_is_never_heard_of_and_gives_its_credit_back() {
    let mut p = Pair::new(limits(100_000, 50_000, 16));
    let id = p.edge.conn.open(p.now, get("/upload"), false).unwrap();
    let mut body = pattern(40_000);
    p.edge.conn.send_data(p.now, id, &mut body, false).unwrap();
    assert_eq!(p.edge.conn.connection_credit(), 10_000);
    p.edge
        .conn
        .reset(p.now, id, ResetCode::Cancel, "viewer went away");
    assert_eq!(p.edge.conn.connection_credit(), 50_000);
    assert_eq!(p.edge.conn.queued_frames(), 0, "no head, no data, no reset");
    p.drive();
    assert!(p.agent.take_events().is_empty());
    // The next stream still works, with the next id.
    assert_eq!(p.edge.conn.open(p.now, get("/next"), true), Ok(id + 1));
}

#[test]
fn the_edge_opens_no_more_than_the_limit_and_reopens_when_one_ends() {
    let mut p = Pair::new(limits(1 << 20, 1 << 24, 2));
    let a = p.edge.conn.open(p.now, get("/a"), true).unwrap();
    let _b = p.edge.conn.open(p.now, get("/b"), true).unwrap();
    assert_eq!(
        p.edge.conn.open(p.now, get("/c"), true),
        Err(OpError::Refused(Refusal::TooManyStreams(2)))
    );
    p.drive();
    p.agent.conn.send_response(p.now, a, ok(), true).unwrap();
    p.drive();
    assert_eq!(p.edge.conn.open_streams(), 1);
    assert_eq!(p.edge.conn.open(p.now, get("/c"), true), Ok(3));
}

#[test]
fn an_agent_at_its_limit_refuses_the_extra_stream_and_the_edge_may_retry() {
    // The edge believes it may open 3; the agent takes 2.
    let mut p = Pair::with(
        limits(1 << 20, 1 << 24, 3),
        limits(1 << 20, 1 << 24, 2),
        HEARTBEAT,
    );
    let ids: Vec<u32> = (0..3)
        .map(|i| {
            p.edge
                .conn
                .open(p.now, get(&format!("/{i}")), true)
                .unwrap()
        })
        .collect();
    p.drive();
    let ev = p.edge.take_events();
    assert_eq!(reset_of(&ev, ids[2]), Some(ResetCode::Refused), "{ev:?}");
    assert_eq!(p.agent.conn.open_streams(), 2);
    assert_eq!(
        p.agent
            .take_events()
            .iter()
            .filter(|e| matches!(e, Event::Opened { .. }))
            .count(),
        2
    );
}

#[test]
fn stream_ids_must_increase() {
    let mut p = Pair::new(Limits::default());
    let head = |id| Frame::RequestHead {
        stream_id: id,
        head: get("/"),
        end_stream: true,
    };
    p.agent.conn.handle_message(p.now, msg(&[head(5)])).unwrap();
    let err = p
        .agent
        .conn
        .handle_message(p.now, msg(&[head(5)]))
        .unwrap_err();
    assert_eq!(
        err,
        ConnectionError::StreamIdNotIncreasing {
            stream_id: 5,
            last: 5
        }
    );
    assert!(p.agent.conn.is_closed());
}

#[test]
fn the_agent_may_not_open_streams() {
    let mut p = Pair::new(Limits::default());
    assert!(matches!(
        p.agent.conn.open(p.now, get("/"), true),
        Err(OpError::WrongRole { .. })
    ));
    let head = Frame::RequestHead {
        stream_id: 1,
        head: get("/"),
        end_stream: true,
    };
    let err = p.edge.conn.handle_message(p.now, msg(&[head])).unwrap_err();
    assert!(
        err.to_string().contains("the agent sent RequestHead"),
        "{err}"
    );
}

#[test]
fn a_frame_against_the_stream_rules_resets_it_with_protocol() {
    let mut p = Pair::new(Limits::default());
    let id = p.edge.conn.open(p.now, get("/"), true).unwrap();
    p.drive();
    // Data before the response head.
    let bad = Frame::Data {
        stream_id: id,
        data: Bytes::from_static(b"x"),
        end_stream: false,
    };
    p.edge.conn.handle_message(p.now, msg(&[bad])).unwrap();
    let ev: Vec<Event> = std::iter::from_fn(|| p.edge.conn.poll()).collect();
    assert_eq!(reset_of(&ev, id), Some(ResetCode::Protocol));
    assert!(!p.edge.conn.is_closed());
}

#[test]
fn a_partial_frame_at_the_end_of_a_message_closes_the_connection() {
    let mut p = Pair::new(Limits::default());
    let mut m = msg(&[Frame::Ping { payload: 1 }]).to_vec();
    m.truncate(m.len() - 1);
    let err = p.agent.conn.handle_message(p.now, m.into()).unwrap_err();
    assert_eq!(err, ConnectionError::PartialFrame { len: 17 });
}

#[test]
fn a_peer_that_pings_without_reading_is_cut_off() {
    let mut p = Pair::new(Limits::default());
    let pings: Vec<Frame> = (0..1024).map(|i| Frame::Ping { payload: i }).collect();
    let m = msg(&pings);
    let mut closed = None;
    for _ in 0..(MAX_QUEUED_FRAMES / 1024 + 2) {
        if let Err(e) = p.agent.conn.handle_message(p.now, m.clone()) {
            closed = Some(e);
            break;
        }
    }
    assert!(
        matches!(closed, Some(ConnectionError::PeerNotReading { .. })),
        "{closed:?}"
    );
    assert!(p.agent.conn.queued_frames() <= MAX_QUEUED_FRAMES);
}

#[test]
fn a_receiver_that_stops_reading_returns_credit_and_resets_once_it_has_answered() {
    let mut p = Pair::new(limits(1 << 20, 100_000, 16));
    let id = p.edge.conn.open(p.now, get("/upload"), false).unwrap();
    p.drive();
    p.agent.conn.stop_reading(p.now, id);
    let mut body = pattern(90_000);
    p.edge.conn.send_data(p.now, id, &mut body, false).unwrap();
    p.drive();
    assert!(
        data_of(&p.agent.take_events(), id).is_empty(),
        "nobody reads it"
    );
    // Its connection credit came back (batched per half window, as for read data).
    assert!(
        p.edge.conn.connection_credit() >= 50_000,
        "{}",
        p.edge.conn.connection_credit()
    );
    p.agent.conn.send_response(p.now, id, ok(), true).unwrap();
    p.drive();
    assert_eq!(reset_of(&p.edge.take_events(), id), Some(ResetCode::Cancel));
    assert_eq!(
        (p.edge.conn.open_streams(), p.agent.conn.open_streams()),
        (0, 0)
    );
}
