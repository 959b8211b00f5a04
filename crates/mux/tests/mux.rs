//! Two multiplexers joined by an in-memory pipe: streams, flow control, resets.

use std::time::Duration;

use bytes::Bytes;
use netbore_mux::{Event, Mux, MuxConfig, Role, WsLink};
use netbore_protocol::{Header, Limits, RequestHead, ResetCode, ResponseHead};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_util::sync::CancellationToken;

async fn pair(limits: Limits) -> (Mux, Mux, netbore_mux::Incoming) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let edge_ws = WsLink::server(a, 1 << 20);
    let agent_ws = WsLink::client(b, 1 << 20);
    let cfg = |role| MuxConfig {
        role,
        limits,
        heartbeat_interval: Duration::from_secs(5),
        label: format!("{role:?}"),
        write_stall_timeout: netbore_mux::DEFAULT_WRITE_STALL_TIMEOUT,
    };
    let (edge, _) = Mux::start(edge_ws, cfg(Role::Edge), CancellationToken::new());
    let (agent, incoming) = Mux::start(agent_ws, cfg(Role::Agent), CancellationToken::new());
    (edge, agent, incoming.unwrap())
}

fn small_windows() -> Limits {
    Limits {
        initial_stream_window: 64 * 1024,
        connection_window: 256 * 1024,
        ..Limits::default()
    }
}

fn head(target: &str) -> RequestHead {
    RequestHead {
        method: "POST".into(),
        target: target.into(),
        headers: vec![Header::new("host", "x.localhost")],
    }
}

/// Echoes each request body back with a trailer.
fn spawn_echo_agent(mut incoming: netbore_mux::Incoming) {
    tokio::spawn(async move {
        while let Some(mut s) = incoming.accept().await {
            tokio::spawn(async move {
                s.sender
                    .send_response(
                        ResponseHead {
                            status: 200,
                            headers: vec![],
                        },
                        false,
                    )
                    .unwrap();
                let mut n = 0u64;
                while let Some(ev) = s.receiver.recv().await {
                    match ev {
                        Event::Data(d) => {
                            n += d.len() as u64;
                            s.sender.send_data(d).await.unwrap();
                        }
                        Event::End => break,
                        other => panic!("unexpected {other:?}"),
                    }
                }
                s.sender
                    .send_trailers(vec![Header::new("x-bytes", n.to_string())])
                    .unwrap();
            });
        }
    });
}

#[tokio::test]
async fn bodies_larger_than_every_window_round_trip_byte_exact() {
    let (edge, _agent, incoming) = pair(small_windows()).await;
    spawn_echo_agent(incoming);
    let body: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let mut handles = Vec::new();
    for i in 0..4 {
        let (mut tx, mut rx) = edge.open(head(&format!("/{i}")), false).unwrap();
        let body = body.clone();
        handles.push(tokio::spawn(async move {
            let send = async {
                for c in body.chunks(100_000) {
                    tx.send_data(Bytes::copy_from_slice(c)).await.unwrap();
                }
                tx.finish().unwrap();
            };
            let recv = async {
                let mut got = Vec::new();
                let mut trailers = None;
                while let Some(ev) = rx.recv().await {
                    match ev {
                        Event::Head(h) => assert_eq!(h.status, 200),
                        Event::Data(d) => got.extend_from_slice(&d),
                        Event::Trailers(t) => trailers = Some(t),
                        Event::End => {}
                        Event::Reset(c, m) => panic!("reset {c:?} {m}"),
                    }
                }
                (got, trailers)
            };
            let ((), (got, trailers)) = tokio::join!(send, recv);
            assert!(got == body, "echoed body differs");
            assert_eq!(
                trailers.unwrap()[0].value,
                Bytes::from(body.len().to_string())
            );
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(edge.open_streams(), 0, "finished streams are forgotten");
}

#[tokio::test]
async fn a_slow_reader_stops_the_sender_at_the_window() {
    let limits = small_windows();
    let (edge, agent, mut incoming) = pair(limits).await;
    let (_tx, mut rx) = edge.open(head("/big"), true).unwrap();
    let mut s = incoming.accept().await.unwrap();
    s.sender
        .send_response(
            ResponseHead {
                status: 200,
                headers: vec![],
            },
            false,
        )
        .unwrap();
    let sender = tokio::spawn(async move {
        for _ in 0..64 {
            s.sender
                .send_data(Bytes::from(vec![1u8; 16 * 1024]))
                .await
                .unwrap();
        }
        s.sender.finish().unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, sent) = agent.bytes();
    assert_eq!(
        sent,
        u64::from(limits.initial_stream_window),
        "sender must stop at exactly one stream window while nobody reads"
    );
    // Reading releases credit and the whole 1 MiB arrives.
    let mut total = 0;
    while let Some(ev) = rx.recv().await {
        if let Event::Data(d) = ev {
            total += d.len();
        }
    }
    assert_eq!(total, 64 * 16 * 1024);
    sender.await.unwrap();
}

#[tokio::test]
async fn dropping_the_reader_resets_the_stream_for_the_peer() {
    let (edge, _agent, mut incoming) = pair(small_windows()).await;
    let (tx, rx) = edge.open(head("/x"), false).unwrap();
    let mut s = incoming.accept().await.unwrap();
    drop(rx);
    drop(tx);
    // The agent's view: the request body is reset, the response cannot be sent.
    match tokio::time::timeout(Duration::from_secs(2), s.receiver.recv()).await {
        Ok(Some(Event::Reset(ResetCode::Cancel, _))) => {}
        other => panic!("expected a cancel reset, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        s.sender
            .send_response(
                ResponseHead {
                    status: 200,
                    headers: vec![]
                },
                true
            )
            .is_err()
    );
}

#[tokio::test]
async fn closing_the_connection_fails_open_streams() {
    let (edge, agent, mut incoming) = pair(small_windows()).await;
    let (_tx, mut rx) = edge.open(head("/x"), true).unwrap();
    let _s = incoming.accept().await.unwrap();
    agent.close("test");
    match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        Ok(Some(Event::Reset(..))) => {}
        other => panic!("expected a reset, got {other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(2), edge.closed())
        .await
        .expect("edge notices the closed link");
    assert!(edge.open(head("/y"), true).is_err());
}

#[tokio::test]
async fn go_away_reaches_the_agent_and_refuses_new_streams() {
    let (edge, agent, _incoming) = pair(small_windows()).await;
    edge.go_away("draining");
    tokio::time::timeout(Duration::from_secs(2), agent.going_away())
        .await
        .unwrap();
    assert!(agent.is_going_away());
    assert!(edge.open(head("/z"), true).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_reach_the_agent_in_id_order() {
    let (edge, agent, incoming) = pair(Limits::default()).await;
    spawn_echo_agent(incoming);
    let mut tasks = Vec::new();
    for t in 0..32 {
        let edge = edge.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                let (mut tx, mut rx) = edge.open(head(&format!("/{t}/{i}")), false).unwrap();
                tx.send_data(Bytes::from_static(b"x")).await.unwrap();
                tx.finish().unwrap();
                while let Some(ev) = rx.recv().await {
                    if let Event::Reset(c, m) = ev {
                        panic!("stream reset {c:?}: {m}");
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        !agent.is_closed(),
        "no protocol error closed the link: {}",
        agent.close_reason()
    );
}

/// Finding 5 of issue 12, at the agent end: a request head announcing more fields than
/// `MAX_HEADER_FIELDS` refuses that stream alone (reset `TOO_LARGE`); the next stream on
/// the same connection is accepted.
#[tokio::test]
async fn a_head_with_too_many_fields_refuses_only_its_stream() {
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut edge_ws = WebSocketStream::from_raw_socket(a, WsRole::Server, None).await;
    // tungstenite plays the edge: the link's own framing interoperates with it.
    let agent_ws = WsLink::client(b, 1 << 20);
    let cfg = MuxConfig {
        role: Role::Agent,
        limits: Limits::default(),
        heartbeat_interval: Duration::from_secs(5),
        label: "agent".into(),
        write_stall_timeout: netbore_mux::DEFAULT_WRITE_STALL_TIMEOUT,
    };
    let (_agent, incoming) = Mux::start(agent_ws, cfg, CancellationToken::new());
    let mut incoming = incoming.unwrap();
    let head = |id: u32, fields: u16| {
        let mut p = vec![3, b'G', b'E', b'T', 0, 1, b'/'];
        p.extend_from_slice(&fields.to_be_bytes());
        for _ in 0..fields {
            p.extend_from_slice(&[0, 1, b'a', 0, 0]);
        }
        let mut f = vec![1, 1];
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(&(p.len() as u32).to_be_bytes());
        f.extend_from_slice(&p);
        f
    };
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let too_many = (netbore_protocol::MAX_HEADER_FIELDS + 1) as u16;
    edge_ws
        .send(Message::binary(head(1, too_many)))
        .await
        .unwrap();
    let reset = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = edge_ws.next().await {
            if let Message::Binary(mut b) = m {
                while let Ok(Some(f)) = netbore_protocol::decode(&mut b, 1 << 20) {
                    if let netbore_protocol::Frame::Reset {
                        stream_id,
                        code,
                        message,
                    } = f
                    {
                        return (stream_id, code, message);
                    }
                }
            }
        }
        panic!("link closed")
    })
    .await
    .expect("a reset arrives");
    assert_eq!(reset.0, 1);
    assert_eq!(reset.1, netbore_protocol::ResetCode::TooLarge);
    assert!(reset.2.contains("1024"), "{}", reset.2);
    edge_ws.send(Message::binary(head(3, 2))).await.unwrap();
    let s = tokio::time::timeout(Duration::from_secs(5), incoming.accept())
        .await
        .unwrap()
        .expect("the next stream is accepted");
    assert_eq!(s.head.headers.len(), 2);
    assert_eq!(s.sender.id(), 3);
}

/// Issue 12's header flood on one link: one client (class 1) keeps twenty 60 KiB heads
/// queued; another client's request must not wait behind them.
#[tokio::test]
async fn a_client_with_nothing_in_flight_is_not_queued_behind_another_clients_heads() {
    use futures_util::FutureExt;
    let (edge, _agent, mut incoming) = pair(Limits::default()).await;
    let big = |i: usize| RequestHead {
        method: "GET".into(),
        target: format!("/flood/{i}"),
        headers: vec![
            Header::new("host", "x.localhost"),
            Header::new("x-pad", "v".repeat(60 * 1024)),
        ],
    };
    let flood: Vec<_> = (0..20)
        .map(|i| {
            let edge = edge.clone();
            let h = big(i);
            tokio::spawn(async move { edge.open_fair(h, true, 1).await })
        })
        .collect();
    // The pipe (256 KiB) takes four of them; the other sixteen wait their turn.
    for _ in 0..1000 {
        if edge.waiting_heads() == 16 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(edge.waiting_heads(), 16);
    assert!(
        edge.open_fair(big(99), true, 1).now_or_never().is_none(),
        "the flooding client's next head queues"
    );
    let (_tx, _rx) = edge
        .open_fair(head("/honest"), true, 2)
        .now_or_never()
        .expect("a client with nothing in flight goes at once")
        .unwrap();
    // At the agent, the honest head comes right after the heads already admitted.
    let mut before = 0;
    let mut held = Vec::new();
    loop {
        let s = tokio::time::timeout(Duration::from_secs(10), incoming.accept())
            .await
            .expect("the agent gets the honest head")
            .unwrap();
        if s.head.target == "/honest" {
            break;
        }
        before += 1;
        held.push(s);
    }
    assert!(before <= 8, "{before} flood heads went first");
    // Answering lets the rest of the flood through, in turn.
    let answer = |s: &mut netbore_mux::IncomingStream| {
        s.sender
            .send_response(
                ResponseHead {
                    status: 200,
                    headers: vec![],
                },
                true,
            )
            .unwrap();
    };
    for s in &mut held {
        answer(s);
    }
    for _ in before..20 {
        let mut s = tokio::time::timeout(Duration::from_secs(10), incoming.accept())
            .await
            .expect("every flood head reaches the agent in the end")
            .unwrap();
        assert!(s.head.target.starts_with("/flood/"));
        answer(&mut s);
        held.push(s);
    }
    for f in flood {
        assert!(f.await.unwrap().is_ok());
    }
    assert_eq!(edge.waiting_heads(), 0);
}
