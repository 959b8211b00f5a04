//! The data plane as a viewer sees it: requests through control, an edge and an agent
//! (all in this process, over real loopback sockets) to a real origin.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use netbore_testkit::origin::{Origin, pattern, pattern_chunk};
use netbore_testkit::{Stack, Viewer, collect, empty, full};
use tokio_tungstenite::tungstenite::Message;

async fn setup() -> (Stack, Origin, netbore_testkit::InProcAgent, Viewer) {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let agent = stack.agent(&origin.url()).await;
    let viewer = Viewer::new(stack.public());
    (stack, origin, agent, viewer)
}

#[tokio::test]
async fn get_and_post_arrive_byte_exact() {
    let (_s, _o, agent, v) = setup().await;
    let r = v.get(&agent.host(), "/hello").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello from origin");

    let body: Bytes = (0..1_000_003u32)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<_>>()
        .into();
    let r = collect(
        v.send(v.request("POST", &agent.host(), "/echo", full(body.clone())))
            .await,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.body == body,
        "echoed body differs ({} vs {} bytes)",
        r.body.len(),
        body.len()
    );
}

#[tokio::test]
async fn http2_viewers_are_served() {
    let (_s, _o, agent, v) = setup().await;
    let resp = v
        .send_h2(v.request("GET", &agent.host(), "/hello", empty()))
        .await;
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let r = collect(resp).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello from origin");
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Samples this process's resident memory every 10 ms; returns the peak on drop.
fn sample_peak_rss() -> (
    tokio::task::JoinHandle<u64>,
    tokio_util::sync::CancellationToken,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let h = tokio::spawn(async move {
        let mut peak = 0;
        while !s.is_cancelled() {
            peak = peak.max(rss_kib());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        peak
    });
    (h, stop)
}

const BIG: u64 = 256 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_download_and_upload_stream_without_buffering_the_body() {
    let (_s, _o, agent, v) = setup().await;
    // Warm up so allocator pools exist before the baseline.
    let _ = v.get(&agent.host(), "/bytes/1048576").await;
    let base = rss_kib();
    let (sampler, stop) = sample_peak_rss();

    let resp = v
        .send(v.request("GET", &agent.host(), &format!("/bytes/{BIG}"), empty()))
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut off = 0u64;
    while let Some(f) = body.frame().await {
        let f = f.expect("download intact");
        if let Ok(d) = f.into_data() {
            for (i, b) in d.iter().enumerate() {
                assert_eq!(
                    *b,
                    pattern(off + i as u64),
                    "byte {} differs",
                    off + i as u64
                );
            }
            off += d.len() as u64;
        }
    }
    assert_eq!(off, BIG);

    // Upload: a generated stream, checked by the origin.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(2);
    tokio::spawn(async move {
        let mut off = 0u64;
        while off < BIG {
            let len = (BIG - off).min(256 * 1024) as usize;
            if tx
                .send(Ok(http_body::Frame::data(pattern_chunk(off, len))))
                .await
                .is_err()
            {
                return;
            }
            off += len as u64;
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    let body = BodyExt::boxed(http_body_util::StreamBody::new(stream));
    let r = collect(
        v.send(v.request("POST", &agent.host(), "/sink", body))
            .await,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(j["bytes"], BIG);
    assert_eq!(j["pattern_ok"], true);

    stop.cancel();
    let peak = sampler.await.unwrap();
    let extra_mib = peak.saturating_sub(base) as f64 / 1024.0;
    println!(
        "peak extra resident memory (edge + agent + origin + client in one process) during 2 x 256 MiB: {extra_mib:.1} MiB"
    );
    // The edge and agent hold at most a connection window (16 MiB) each of one stream;
    // the whole body would be 256 MiB.
    assert!(
        extra_mib < 96.0,
        "memory grew by {extra_mib:.1} MiB: a body is being buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_on_one_tunnel_all_complete() {
    let (_s, _o, agent, v) = setup().await;
    let host = agent.host();
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let v = v.clone();
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let n = 1000 + i * 517;
                let r = v.get(&host, &format!("/bytes/{n}")).await;
                assert_eq!(r.status, 200);
                assert!(
                    r.body == pattern_chunk(0, n as usize),
                    "request {i} body differs"
                );
            } else {
                let body = pattern_chunk(i, 20_000 + i as usize);
                let r = collect(
                    v.send(v.request("POST", &host, "/echo", full(body.clone())))
                        .await,
                )
                .await;
                assert_eq!(r.status, 200);
                assert!(r.body == body, "request {i} echo differs");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn websocket_echo_with_text_binary_and_close() {
    let (s, _o, agent, _v) = setup().await;
    let (mut ws, status) = netbore_testkit::websocket(s.public(), &agent.host(), "/ws", &[])
        .await
        .expect("upgrade through the tunnel");
    assert_eq!(status, 101);
    ws.send(Message::text("hello over the tunnel"))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("hello over the tunnel")
    );
    let bin: Vec<u8> = (0..70_000u32).map(|i| (i % 256) as u8).collect();
    ws.send(Message::binary(bin.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(bin));
    ws.close(None).await.unwrap();
    let closing = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(m) = ws.next().await {
            if matches!(m, Ok(Message::Close(_)) | Err(_)) {
                return true;
            }
        }
        true
    })
    .await;
    assert_eq!(closing, Ok(true), "close handshake completes");
}

#[tokio::test]
async fn the_first_sse_event_arrives_while_the_origin_holds_the_response_open() {
    let (_s, origin, agent, v) = setup().await;
    let resp = v
        .send(v.request("GET", &agent.host(), "/sse", empty()))
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first event before the response ends")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(first, Bytes::from_static(b"data: first\n\n"));
    origin.release_sse();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, Bytes::from_static(b"data: last\n\n"));
}

#[tokio::test]
async fn forwarding_headers_are_set_and_hop_by_hop_and_spoofed_ones_removed() {
    let (_s, origin, agent, v) = setup().await;
    let mut req = v.request("GET", &agent.host(), "/headers?x=1", empty());
    let h = req.headers_mut();
    h.insert("connection", "keep-alive, x-drop-me".parse().unwrap());
    h.insert("x-drop-me", "secret".parse().unwrap());
    h.insert("x-netbore-client-ip", "6.6.6.6".parse().unwrap());
    h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
    h.insert("x-keep-me", "yes".parse().unwrap());
    let r = collect(v.send(req).await).await;
    assert_eq!(r.status, 200);
    let seen = origin.seen().pop().unwrap();
    assert_eq!(seen.target, "/headers?x=1");
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-netbore-client-ip"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some(agent.host().as_str()));
    assert_eq!(seen.header("host"), Some(agent.host().as_str()));
    assert_eq!(seen.header("x-keep-me"), Some("yes"));
    assert_eq!(seen.header("x-drop-me"), None);
    assert!(!seen.headers.iter().any(|(_, v)| v.contains("6.6.6.6")));
}

#[tokio::test]
async fn unknown_tunnels_get_404_with_a_code_and_json_on_request() {
    let (_s, _o, _agent, v) = setup().await;
    let r = v.get("nosuchname.localhost", "/").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), Some("tunnel_not_found"));
    let mut req = v.request("GET", "nosuchname.localhost", "/", empty());
    req.headers_mut()
        .insert("accept", "application/json".parse().unwrap());
    let r = collect(v.send(req).await).await;
    let j: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(j["error"]["code"], "tunnel_not_found");
    // A name that extends a live one is another tunnel, not this one.
    let longer = format!("{}x.localhost", _agent.name);
    assert_eq!(v.get(&longer, "/hello").await.status, 404);
}

#[tokio::test]
async fn a_dead_origin_gives_502_origin_unreachable() {
    let stack = Stack::start().await;
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent = stack.agent(&port.to_string()).await;
    let v = Viewer::new(stack.public());
    let r = v.get(&agent.host(), "/").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), Some("origin_unreachable"));
}

#[tokio::test]
async fn a_slow_origin_gives_504_origin_timeout() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let agent = stack
        .agent_with(&origin.url(), |c| {
            c.origin.timeout = Duration::from_millis(300)
        })
        .await;
    let v = Viewer::new(stack.public());
    let r = v.get(&agent.host(), "/slow/3000").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.error_code(), Some("origin_timeout"));
}

#[tokio::test]
async fn an_origin_that_aborts_mid_body_gives_the_viewer_an_aborted_response() {
    let (_s, _o, agent, v) = setup().await;
    let resp = v
        .send(v.request("GET", &agent.host(), "/abort/5000", empty()))
        .await;
    assert_eq!(resp.status(), 200);
    let r = resp.into_body().collect().await;
    assert!(r.is_err(), "a cut-off body must not look complete");
}

#[tokio::test]
async fn a_grpc_unary_and_server_streaming_call_through_the_tunnel() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let stack = Stack::start().await;
    // A real tonic server (the standard health service) as the origin.
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("demo", tonic_health::ServingStatus::Serving)
        .await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream_from(l)),
    );
    let agent = stack.agent(&format!("http://{addr}")).await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", stack.public()))
        .unwrap()
        .origin(format!("http://{}", agent.host()).parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let resp = client
        .check(HealthCheckRequest {
            service: "demo".into(),
        })
        .await
        .expect("unary call through the tunnel");
    assert_eq!(resp.into_inner().status, ServingStatus::Serving as i32);

    // Status carried in trailers.
    let err = client
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Server streaming: the first message, then a change pushed later.
    let mut stream = client
        .watch(HealthCheckRequest {
            service: "demo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    reporter
        .set_service_status("demo", tonic_health::ServingStatus::NotServing)
        .await;
    let second = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.status, ServingStatus::NotServing as i32);
}

fn tokio_stream_from(
    l: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures_util::stream::unfold(l, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_url_works_the_moment_the_agent_announces_it() {
    // Forty quick tunnels from one address: past the anonymous creation limit, which
    // has its own tests (creation_limits.rs); here it is off.
    let stack = Stack::start_with(|c| c.anonymous_create_per_minute = 0).await;
    let origin = Origin::start().await;
    let v = Viewer::new(stack.public());
    for i in 0..40 {
        let agent = stack.agent(&origin.url()).await;
        let r = v.get(&agent.host(), "/hello").await;
        assert_eq!(
            r.status,
            200,
            "agent {i}: {:?} {}",
            r.error_code(),
            r.text()
        );
    }
}
