//! The edge's /metrics, scraped over HTTP before and after known traffic: every counter
//! moves by exactly what was sent.

use std::collections::HashMap;

use futures_util::{SinkExt, StreamExt};
use netbore_testkit::origin::Origin;
use netbore_testkit::{Stack, Viewer};
use tokio_tungstenite::tungstenite::Message;

async fn scrape(stack: &Stack) -> HashMap<String, f64> {
    let v = Viewer::new(stack.dev.admin);
    let r = v.get("admin", "/metrics").await;
    assert_eq!(r.status, 200);
    r.text()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn delta(a: &HashMap<String, f64>, b: &HashMap<String, f64>, k: &str) -> f64 {
    b.get(k).copied().unwrap_or_else(|| panic!("{k} missing")) - a.get(k).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn counters_move_by_exactly_the_traffic_sent() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let agent = stack.agent(&origin.url()).await;
    let v = Viewer::new(stack.public());
    let before = scrape(&stack).await;
    assert_eq!(before["netbore_edge_tunnels"], 1.0);
    assert_eq!(before["netbore_edge_agent_connections"], 1.0);

    for _ in 0..3 {
        assert_eq!(v.get(&agent.host(), "/hello").await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(v.get("nobody.localhost", "/").await.status, 404);
    }
    // One refused handshake.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/connect", stack.dev.agents))
            .await
            .unwrap();
    ws.send(Message::text("{}")).await.unwrap();
    while ws.next().await.is_some_and(|m| m.is_ok()) {}

    let after = scrape(&stack).await;
    assert_eq!(
        delta(
            &before,
            &after,
            "netbore_edge_responses_total{class=\"2xx\"}"
        ),
        3.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "netbore_edge_responses_total{class=\"4xx\"}"
        ),
        2.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "netbore_edge_errors_total{code=\"tunnel_not_found\"}"
        ),
        2.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "netbore_edge_request_duration_seconds_count"
        ),
        5.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "netbore_edge_agent_handshakes_total{result=\"malformed_hello\"}"
        ),
        1.0
    );
    assert_eq!(
        after["netbore_edge_agent_handshakes_total{result=\"accepted\"}"],
        1.0
    );
    assert!(
        delta(
            &before,
            &after,
            "netbore_edge_tunnel_bytes_total{direction=\"in\"}"
        ) >= 3.0 * 17.0,
        "response bodies counted"
    );
    assert_eq!(after["netbore_edge_streams_in_flight"], 0.0);
}
