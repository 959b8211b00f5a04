//! Strangers on the agent port: bad handshakes and malformed frames are refused or cut
//! off with a reason, and never disturb another tunnel.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use netbore_control::api::CreateTunnelRequest;
use netbore_control::client::ControlClient;
use netbore_protocol::PROTOCOL_VERSION;
use netbore_testkit::origin::Origin;
use netbore_testkit::{InProcAgent, Stack, Viewer};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(stack: &Stack) -> Ws {
    let url = format!("ws://{}/v1/connect", stack.dev.agents);
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// The edge's answer to what we sent: the refusal code, and that it then closed.
async fn refusal(ws: &mut Ws) -> String {
    let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("edge answers")
        .expect("a message")
        .expect("readable");
    let Message::Text(t) = msg else {
        panic!("expected a JSON refusal, got {msg:?}")
    };
    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
    assert_eq!(v["type"], "refused", "{v}");
    assert!(!v["message"].as_str().unwrap().is_empty());
    assert_closed(ws).await;
    v["code"].as_str().unwrap().to_string()
}

async fn assert_closed(ws: &mut Ws) {
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the edge closes the connection");
}

async fn honest(stack: &Stack, origin: &Origin) -> (InProcAgent, Viewer) {
    (
        stack.agent(&origin.url()).await,
        Viewer::new(stack.public()),
    )
}

async fn still_serving(v: &Viewer, a: &InProcAgent) {
    let r = v.get(&a.host(), "/hello").await;
    assert_eq!(r.status, 200, "the honest tunnel keeps working");
}

fn hello(token: &str, tunnel: &str, version: u32) -> String {
    serde_json::json!({"version": version, "token": token, "tunnel_id": tunnel, "capabilities": [], "agent": "hostile"}).to_string()
}

#[tokio::test]
async fn bad_handshakes_are_refused_with_a_code() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let (a, v) = honest(&stack, &origin).await;

    let mut ws = connect(&stack).await;
    ws.send(Message::text("{not json")).await.unwrap();
    assert_eq!(refusal(&mut ws).await, "malformed_hello");

    let mut ws = connect(&stack).await;
    ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(refusal(&mut ws).await, "malformed_hello");

    let mut ws = connect(&stack).await;
    ws.send(Message::text("x".repeat(20_000))).await.unwrap();
    assert_eq!(refusal(&mut ws).await, "malformed_hello");

    let mut ws = connect(&stack).await;
    ws.send(Message::text(hello("a.b.c", "tun_x", PROTOCOL_VERSION)))
        .await
        .unwrap();
    assert_eq!(refusal(&mut ws).await, "invalid_token");

    // A real token, but for another tunnel than claimed.
    let created = ControlClient::new(&stack.control_url())
        .create(&CreateTunnelRequest::default())
        .await
        .unwrap();
    let mut ws = connect(&stack).await;
    ws.send(Message::text(hello(
        &created.ephemeral_token,
        &a.tunnel_id,
        PROTOCOL_VERSION,
    )))
    .await
    .unwrap();
    assert_eq!(refusal(&mut ws).await, "tunnel_mismatch");

    let mut ws = connect(&stack).await;
    ws.send(Message::text(hello(
        &created.ephemeral_token,
        &created.tunnel_id,
        99,
    )))
    .await
    .unwrap();
    assert_eq!(refusal(&mut ws).await, "unsupported_version");

    // The recreate token is not a pass to an edge.
    let mut ws = connect(&stack).await;
    ws.send(Message::text(hello(
        &created.recreate_token,
        &created.tunnel_id,
        PROTOCOL_VERSION,
    )))
    .await
    .unwrap();
    assert_eq!(refusal(&mut ws).await, "invalid_token");

    still_serving(&v, &a).await;
}

#[tokio::test]
async fn a_wrong_path_gets_404_before_any_websocket() {
    let stack = Stack::start().await;
    let url = format!("ws://{}/elsewhere", stack.dev.agents);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected HTTP 404, got {other:?}"),
    }
}

async fn welcomed(stack: &Stack) -> Ws {
    let created = ControlClient::new(&stack.control_url())
        .create(&CreateTunnelRequest::default())
        .await
        .unwrap();
    let mut ws = connect(stack).await;
    ws.send(Message::text(hello(
        &created.ephemeral_token,
        &created.tunnel_id,
        PROTOCOL_VERSION,
    )))
    .await
    .unwrap();
    let Some(Ok(Message::Text(t))) = ws.next().await else {
        panic!("welcome expected")
    };
    assert!(t.as_str().contains("\"welcome\""), "{t}");
    ws
}

#[tokio::test]
async fn malformed_frames_close_only_the_offending_connection() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let (a, v) = honest(&stack, &origin).await;

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown frame type", vec![0xee, 0, 0, 0, 0, 1, 0, 0, 0, 0]),
        (
            "length beyond the maximum",
            vec![3, 0, 0, 0, 0, 1, 0x7f, 0xff, 0xff, 0xff],
        ),
        ("truncated frame", vec![3, 0, 0, 0, 0, 1, 0, 0, 0, 9, 1, 2]),
        ("data on stream 0", vec![3, 0, 0, 0, 0, 0, 0, 0, 0, 1, 7]),
        (
            "request head from an agent",
            vec![
                1, 0, 0, 0, 0, 1, 0, 0, 0, 9, 3, b'G', b'E', b'T', 0, 1, b'/', 0, 0,
            ],
        ),
        ("text after the handshake", b"hello".to_vec()),
    ];
    for (what, bytes) in cases {
        let mut ws = welcomed(&stack).await;
        let msg = if what.starts_with("text") {
            Message::text(String::from_utf8(bytes).unwrap())
        } else {
            Message::binary(bytes)
        };
        ws.send(msg).await.unwrap();
        assert_closed(&mut ws).await;
        still_serving(&v, &a).await;
    }

    // Frames for streams that do not exist are ignored, not fatal.
    let mut ws = welcomed(&stack).await;
    ws.send(Message::binary(vec![
        5, 0, 0, 0, 0, 42, 0, 0, 0, 4, 0, 0, 0, 5,
    ]))
    .await
    .unwrap();
    ws.send(Message::binary(vec![
        7, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1,
    ]))
    .await
    .unwrap();
    // The edge answers the ping with a pong: the connection is alive.
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Binary(b) = m
                && b.first() == Some(&8)
            {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(pong, Ok(true));
    still_serving(&v, &a).await;
}

#[tokio::test]
async fn an_oversized_websocket_message_closes_only_that_link() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let (a, v) = honest(&stack, &origin).await;
    let mut ws = welcomed(&stack).await;
    // Over the 1 MiB message limit of the agent link.
    let _ = ws.send(Message::binary(vec![0u8; 2 * 1024 * 1024])).await;
    assert_closed(&mut ws).await;
    still_serving(&v, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_pings_without_reading_is_cut_off() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let (a, v) = honest(&stack, &origin).await;
    let ws = welcomed(&stack).await;
    // Never read; send pings in big batches until the edge gives up on us.
    let (mut sink, _stream_kept_unread) = ws.split();
    let mut batch = Vec::with_capacity(18 * 10_000);
    for i in 0..10_000u64 {
        batch.extend_from_slice(&[7, 0, 0, 0, 0, 0, 0, 0, 0, 8]);
        batch.extend_from_slice(&i.to_be_bytes());
    }
    let mut cut = false;
    for _ in 0..200 {
        let sent = tokio::time::timeout(
            Duration::from_secs(2),
            sink.send(Message::binary(batch.clone())),
        )
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                cut = true;
                break;
            }
            Err(_) => panic!("the edge stopped reading instead of closing the link"),
        }
    }
    assert!(cut, "2,000,000 unanswered pings must end the link");
    still_serving(&v, &a).await;
}
