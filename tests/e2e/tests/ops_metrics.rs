//! Control's and the agent's /metrics, scraped over HTTP from the real binaries before
//! and after known traffic: every counter moves by exactly what was sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use netbore_control::api::{CreateTunnelRequest, DeleteTunnelRequest, IssueTokenRequest};
use netbore_control::client::ControlClient;
use netbore_proto::control::v1 as pb;
use netbore_proto::control::v1::control_service_client::ControlServiceClient;
use netbore_testkit::origin::Origin;
use netbore_testkit::{
    ControlProc, EdgeProc, Proc, Viewer, eventually, free_port, http_get, parse_metrics,
};

type Metrics = HashMap<String, f64>;

/// An agent's metrics once its streams have ended: the viewer has its response before
/// the agent's stream task ends and lowers the in-flight gauge, so wait (bounded) for
/// the gauge to settle; the caller still asserts it reached 0.
async fn settled(addr: SocketAddr) -> Metrics {
    let mut m = scrape(addr).await;
    for _ in 0..50 {
        if m["netbore_agent_streams_in_flight"] == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        m = scrape(addr).await;
    }
    m
}

async fn scrape(addr: SocketAddr) -> Metrics {
    let (status, body) = eventually(Duration::from_secs(10), || http_get(addr, "/metrics"))
        .await
        .unwrap_or_else(|| panic!("no /metrics at {addr}"));
    assert_eq!(status, 200);
    parse_metrics(&body)
}

/// `after - before` for `series`, which must be on the page.
fn delta(before: &Metrics, after: &Metrics, series: &str) -> f64 {
    after
        .get(series)
        .copied()
        .unwrap_or_else(|| panic!("{series} missing from {after:#?}"))
        - before.get(series).copied().unwrap_or(0.0)
}

fn host_of(url_line: &str) -> String {
    let url = url_line.split_whitespace().next().unwrap();
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

fn agent(control: &ControlProc, target: &str, admin: u16) -> Proc {
    let control_url = format!("http://127.0.0.1:{}", control.rest);
    Proc::spawn(
        "netbore",
        &[
            "http",
            target,
            "--control",
            &control_url,
            "--connections",
            "1",
            "--admin-addr",
            &format!("127.0.0.1:{admin}"),
        ],
        &[("RUST_LOG", "warn")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_and_agent_counters_move_by_exactly_the_traffic_sent() {
    let control_admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let control = ControlProc::spawn(
        &["--admin-addr", &control_admin.to_string()],
        &[("NETBORE_BOOTSTRAP_TOKEN", "boot-credential")],
    );
    control.wait_ready().await;
    let edge = EdgeProc::spawn("edge-m", &control, None, &[]);
    let origin = Origin::start().await;
    let (good_admin, dead_admin) = (free_port(), free_port());
    let mut good = agent(&control, &origin.url(), good_admin);
    // An agent whose origin is down: nothing listens on this port.
    let dead_port = free_port().to_string();
    let mut dead = agent(&control, &dead_port, dead_admin);
    let good_host = host_of(&good.line(Duration::from_secs(60)).await);
    let dead_host = host_of(&dead.line(Duration::from_secs(60)).await);
    let good_admin: SocketAddr = ([127, 0, 0, 1], good_admin).into();
    let dead_admin: SocketAddr = ([127, 0, 0, 1], dead_admin).into();

    // Both agents are live, so control knows the edge and nothing else is in flight.
    let c0 = scrape(control_admin).await;
    let g0 = scrape(good_admin).await;
    let d0 = scrape(dead_admin).await;
    assert_eq!(g0["netbore_agent_links_up"], 1.0);

    // Control: two REST refusals, four REST successes, two gRPC calls.
    let base = format!("http://127.0.0.1:{}", control.rest);
    let rest = ControlClient::new(&base);
    let mgmt = rest
        .clone()
        .with_bearer("boot-credential")
        // Admin: the tunnel deleted below is anonymous, which only admin acts on.
        .issue_token(&IssueTokenRequest {
            scopes: Some(vec!["admin".into()]),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = rest
        .clone()
        .with_bearer("wrong")
        .issue_token(&IssueTokenRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.as_str()), Some("bad_credential"));
    let created = rest.create(&CreateTunnelRequest::default()).await.unwrap();
    rest.create(&CreateTunnelRequest {
        recreate_token: Some(created.recreate_token.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = rest
        .create(&CreateTunnelRequest {
            requested_name: Some("-no-".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.as_str()), Some("name_invalid"));
    rest.clone()
        .with_bearer(mgmt.token.clone())
        .delete(&DeleteTunnelRequest {
            tunnel_id: Some(created.tunnel_id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut grpc = ControlServiceClient::connect(format!("http://127.0.0.1:{}", control.grpc))
        .await
        .unwrap();
    let err = grpc
        .list_tunnels(pb::ListTunnelsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::ListTunnelsRequest::default());
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", mgmt.token).parse().unwrap(),
    );
    grpc.list_tunnels(req).await.unwrap();

    // Agents: three good requests, one the origin answers 404, two to a dead origin.
    let v = Viewer::new(([127, 0, 0, 1], edge.public).into());
    for _ in 0..3 {
        assert_eq!(v.get(&good_host, "/hello").await.status, 200);
    }
    assert_eq!(v.get(&good_host, "/no-such-page").await.status, 404);
    for _ in 0..2 {
        assert_eq!(v.get(&dead_host, "/").await.status, 502);
    }

    let c1 = scrape(control_admin).await;
    let d = |s: &str| delta(&c0, &c1, s);
    assert_eq!(
        d("netbore_control_tokens_issued_total{kind=\"management\"}"),
        1.0
    );
    assert_eq!(
        d("netbore_control_tokens_issued_total{kind=\"ephemeral\"}"),
        2.0
    );
    assert_eq!(
        d("netbore_control_tokens_issued_total{kind=\"recreate\"}"),
        2.0
    );
    assert_eq!(
        d("netbore_control_tunnels_created_total{kind=\"new\"}"),
        1.0
    );
    assert_eq!(
        d("netbore_control_tunnels_created_total{kind=\"recreate\"}"),
        1.0
    );
    assert_eq!(d("netbore_control_tunnels_deleted_total"), 1.0);
    assert_eq!(
        d("netbore_control_refusals_total{op=\"issue_token\",code=\"bad_credential\"}"),
        1.0
    );
    assert_eq!(
        d("netbore_control_refusals_total{op=\"create_tunnel\",code=\"name_invalid\"}"),
        1.0
    );
    assert_eq!(d("netbore_control_rest_requests_total{class=\"2xx\"}"), 4.0);
    assert_eq!(d("netbore_control_rest_requests_total{class=\"4xx\"}"), 2.0);
    assert_eq!(d("netbore_control_rest_requests_total{class=\"5xx\"}"), 0.0);
    assert_eq!(d("netbore_control_grpc_requests_total{code=\"OK\"}"), 1.0);
    assert_eq!(
        d("netbore_control_grpc_requests_total{code=\"UNAUTHENTICATED\"}"),
        1.0
    );
    // The two agents' creations happened before the first scrape.
    assert_eq!(
        c0["netbore_control_tunnels_created_total{kind=\"new\"}"],
        2.0
    );

    let g1 = settled(good_admin).await;
    let g = |s: &str| delta(&g0, &g1, s);
    assert_eq!(g("netbore_agent_streams_total"), 4.0);
    assert_eq!(
        g("netbore_agent_origin_responses_total{class=\"2xx\"}"),
        3.0
    );
    assert_eq!(
        g("netbore_agent_origin_responses_total{class=\"4xx\"}"),
        1.0
    );
    assert_eq!(
        g("netbore_agent_origin_errors_total{kind=\"unreachable\"}"),
        0.0
    );
    assert_eq!(g("netbore_agent_reconnects_total"), 0.0);
    assert_eq!(g1["netbore_agent_links_up"], 1.0);
    assert_eq!(g1["netbore_agent_streams_in_flight"], 0.0);

    let d1 = settled(dead_admin).await;
    let dd = |s: &str| delta(&d0, &d1, s);
    assert_eq!(dd("netbore_agent_streams_total"), 2.0);
    assert_eq!(
        dd("netbore_agent_origin_errors_total{kind=\"unreachable\"}"),
        2.0
    );
    assert_eq!(
        dd("netbore_agent_origin_responses_total{class=\"2xx\"}"),
        0.0
    );
    assert_eq!(d1["netbore_agent_streams_in_flight"], 0.0);
}

#[tokio::test]
async fn a_lost_edge_counts_one_reconnect_at_the_agent() {
    let control = ControlProc::spawn(&[], &[]);
    control.wait_ready().await;
    let mut edge = EdgeProc::spawn("edge-r", &control, None, &[]);
    let origin = Origin::start().await;
    let admin = free_port();
    let mut a = agent(&control, &origin.url(), admin);
    a.line(Duration::from_secs(60)).await;
    let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
    let m0 = scrape(admin).await;
    assert_eq!(m0["netbore_agent_reconnects_total"], 0.0);

    // The edge dies and comes back on the same ports: the agent links again, once.
    edge.proc.kill().await;
    let public = edge.public;
    let respawned = {
        let (agents, adm) = (edge.agents, edge.admin);
        netbore_testkit::Proc::spawn(
            "netbore-edge",
            &[
                "--edge-id",
                "edge-r",
                "--public-addr",
                &format!("127.0.0.1:{public}"),
                "--agent-addr",
                &format!("127.0.0.1:{agents}"),
                "--admin-addr",
                &format!("127.0.0.1:{adm}"),
                "--control-url",
                &format!("http://127.0.0.1:{}", control.rest),
                "--control-grpc",
                &format!("http://127.0.0.1:{}", control.grpc),
            ],
            &[("RUST_LOG", "warn")],
        )
    };
    let relinked = eventually(Duration::from_secs(60), || async {
        let m = scrape(admin).await;
        (m["netbore_agent_links_up"] == 1.0 && m["netbore_agent_reconnects_total"] >= 1.0)
            .then_some(m)
    })
    .await
    .expect("the agent links to the restarted edge within 60 s");
    assert_eq!(relinked["netbore_agent_reconnects_total"], 1.0);
    drop(respawned);
}

/// `GET /metrics` on `addr`: status, Content-Type and body.
async fn scrape_raw(addr: SocketAddr) -> (u16, String, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header("host", "metrics")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, ct, String::from_utf8(body.to_vec()).unwrap())
}

/// Issue 18 item 7: all three `/metrics` pages say what they are (Prometheus 3 refuses a
/// scrape without a Content-Type it knows), carry `netbore_build_info`, and the edge's
/// byte counter does not fall when the agent that carried the bytes disconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metrics_page_is_typed_and_the_edge_byte_counter_survives_a_disconnect() {
    let control_admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let control = ControlProc::spawn(&["--admin-addr", &control_admin.to_string()], &[]);
    control.wait_ready().await;
    let edge = EdgeProc::spawn("edge-t", &control, None, &[]);
    let edge_admin: SocketAddr = ([127, 0, 0, 1], edge.admin).into();
    let origin = Origin::start().await;
    let agent_admin = free_port();
    let mut a = agent(&control, &origin.url(), agent_admin);
    let host = host_of(&a.line(Duration::from_secs(60)).await);
    let agent_admin: SocketAddr = ([127, 0, 0, 1], agent_admin).into();

    for (what, addr, component) in [
        ("control", control_admin, "control"),
        ("edge", edge_admin, "edge"),
        ("agent", agent_admin, "agent"),
    ] {
        let (status, ct, body) = eventually(Duration::from_secs(10), || async {
            Some(scrape_raw(addr).await)
        })
        .await
        .unwrap();
        assert_eq!(status, 200, "{what}");
        assert_eq!(
            ct, "text/plain; version=0.0.4; charset=utf-8",
            "{what}'s /metrics Content-Type"
        );
        assert!(
            body.contains(&format!(
                "netbore_build_info{{component=\"{component}\",version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{what}: {body}"
        );
    }

    // Bytes through the tunnel, then the agent leaves: the counter keeps them.
    let v = Viewer::new(([127, 0, 0, 1], edge.public).into());
    for _ in 0..5 {
        assert_eq!(v.get(&host, "/bytes/65536").await.status, 200);
    }
    let before = scrape(edge_admin).await;
    let out_before = before["netbore_edge_tunnel_bytes_total{direction=\"out\"}"]
        + before["netbore_edge_tunnel_bytes_total{direction=\"in\"}"];
    assert!(out_before >= 5.0 * 65536.0, "{before:?}");
    a.signal("KILL");
    let mut after = scrape(edge_admin).await;
    for _ in 0..100 {
        if after["netbore_edge_agent_connections"] == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = scrape(edge_admin).await;
    }
    assert_eq!(after["netbore_edge_agent_connections"], 0.0, "{after:?}");
    let out_after = after["netbore_edge_tunnel_bytes_total{direction=\"out\"}"]
        + after["netbore_edge_tunnel_bytes_total{direction=\"in\"}"];
    assert!(
        out_after >= out_before,
        "the byte counter fell from {out_before} to {out_after} when the agent left"
    );
}
