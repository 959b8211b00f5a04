//! Netbore as a platform: a real `redis-server`, two control replicas and three edges
//! sharing it, an agent holding links to two edges, and a client that sends requests to
//! any edge, as a load balancer would. Each scenario prints how many requests it
//! sent and how many failed.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use netbore_testkit::origin::Origin;
use netbore_testkit::postgres::PostgresServer;
use netbore_testkit::redis::RedisServer;
use netbore_testkit::{ControlProc, EdgeProc, Proc, eventually};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// The control replicas' bootstrap credential.
const BOOT: &str = "scale-out-bootstrap-credential";

/// Lease refresh interval the edges run with here (the "heartbeat" of the registry).
const REFRESH_SECS: u64 = 1;

struct Platform {
    redis: RedisServer,
    _postgres: PostgresServer,
    _controls: Vec<ControlProc>,
    edges: Vec<EdgeProc>,
    _origin: Origin,
    agent: Proc,
    name: String,
    /// Edge ids the agent is linked to.
    linked: HashSet<String>,
    client: Client,
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    netbore_testkit::ReqBody,
>;

async fn platform() -> Platform {
    let redis = RedisServer::start();
    let postgres = PostgresServer::start();
    // Replicas share their signing key, as they do from one Kubernetes Secret.
    let keys = tempfile::tempdir().unwrap().keep();
    let key = keys.join("signing.pem");
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    std::fs::write(&key, pair.serialize_pem()).unwrap();
    let key_flag = ["--signing-key", key.to_str().unwrap()];
    let boot = [("NETBORE_BOOTSTRAP_TOKEN", BOOT)];
    let controls = vec![
        ControlProc::spawn_replica(
            &postgres.url_with_password(),
            &redis.url(),
            &key_flag,
            &boot,
        ),
        ControlProc::spawn_replica(
            &postgres.url_with_password(),
            &redis.url(),
            &key_flag,
            &boot,
        ),
    ];
    let refresh = REFRESH_SECS.to_string();
    // Edges link to either replica; the agent creates its tunnel through the other.
    let edges: Vec<EdgeProc> = ["edge-a", "edge-b", "edge-c"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            EdgeProc::spawn(
                id,
                &controls[i % 2],
                Some(&redis.url()),
                &[
                    "--registry-refresh-secs",
                    &refresh,
                    "--drain-delay-secs",
                    "1",
                ],
            )
        })
        .collect();
    let origin = Origin::start().await;
    // Edges announce themselves to control; wait until control lists all three, so
    // the agent has distinct candidates.
    let rest = format!("http://127.0.0.1:{}", controls[1].rest);
    let state = tempfile::tempdir().unwrap().keep();
    let mut agent = Proc::spawn(
        "netbore",
        &[
            "http",
            &origin.url(),
            "--control",
            &rest,
            "--state-dir",
            state.to_str().unwrap(),
            "--connections",
            "2",
            "--json",
        ],
        &[("RUST_LOG", "warn")],
    );
    let mut name = String::new();
    let mut linked = HashSet::new();
    while linked.len() < 2 {
        let v: Value = serde_json::from_str(&agent.line(Duration::from_secs(40)).await).unwrap();
        if v["event"] == "live" {
            name = v["name"].as_str().unwrap().to_string();
            linked.insert(v["edge_id"].as_str().unwrap().to_string());
        }
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    Platform {
        redis,
        _postgres: postgres,
        _controls: controls,
        edges,
        _origin: origin,
        agent,
        name,
        linked,
        client,
    }
}

impl Platform {
    fn edge(&self, id: &str) -> &EdgeProc {
        self.edges.iter().find(|e| e.id == id).unwrap()
    }

    /// The edge the agent is not linked to: every request there is forwarded.
    fn unlinked(&self) -> &EdgeProc {
        self.edges
            .iter()
            .find(|e| !self.linked.contains(&e.id))
            .unwrap()
    }

    fn host(&self) -> String {
        format!("{}.localhost", self.name)
    }

    /// `GET path` through edge port `port`: the status, or None on any failure.
    async fn get(&self, port: u16, path: &str) -> Option<u16> {
        let req = http::Request::get(format!("http://127.0.0.1:{port}{path}"))
            .header("host", self.host())
            .body(netbore_testkit::empty())
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(10), self.client.request(req)).await {
            Ok(Ok(r)) => {
                let status = r.status().as_u16();
                let body = r.into_body().collect().await.ok()?.to_bytes();
                (status != 200 || body == "hello from origin").then_some(status)
            }
            _ => None,
        }
    }

    /// The agent's next `live` event with `links` links, within `within`.
    async fn wait_links(&mut self, links: u64, within: Duration) -> Option<Value> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let left = deadline - Instant::now();
            let Ok(Some(l)) = tokio::time::timeout(left, self.agent.stdout.recv()).await else {
                return None;
            };
            let v: Value = serde_json::from_str(&l).unwrap();
            if v["event"] == "live" && v["links"].as_u64() == Some(links) {
                return Some(v);
            }
        }
        None
    }
}

async fn metric(admin: u16, name: &str) -> u64 {
    let c: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = http::Request::get(format!("http://127.0.0.1:{admin}/metrics"))
        .body(netbore_testkit::empty())
        .unwrap();
    let body = c
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let text = String::from_utf8(body.to_bytes().to_vec()).unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_to_each_of_three_edges_all_reach_the_tunnel() {
    let p = platform().await;
    let mut sent = 0;
    let mut failed = Vec::new();
    for e in &p.edges {
        for i in 0..30 {
            sent += 1;
            let st = p.get(e.public, "/hello").await;
            if st != Some(200) {
                failed.push(format!("{} #{i}: {st:?}", e.id));
            }
        }
    }
    println!(
        "sent {sent} requests across 3 edges, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    let via = p.unlinked();
    // Many requests over the one pooled HTTP/2 connection between two edges: no stream
    // may be left to a reset (h2 refuses new streams after 1,024 of those).
    // 64 viewers at once, as a load balancer would send them.
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (client, host, port) = (p.client.clone(), p.host(), via.public);
            tokio::spawn(async move {
                let mut failed = 0;
                for _ in 0..40 {
                    let req = http::Request::get(format!("http://127.0.0.1:{port}/hello"))
                        .header("host", &host)
                        .body(netbore_testkit::empty())
                        .unwrap();
                    let ok = match client.request(req).await {
                        Ok(r) => r.status() == 200 && r.into_body().collect().await.is_ok(),
                        Err(_) => false,
                    };
                    failed += u32::from(!ok);
                }
                failed
            })
        })
        .collect();
    let mut hop_failed = 0;
    for t in tasks {
        hop_failed += t.await.unwrap();
    }
    println!(
        "sent 2560 requests from 64 concurrent viewers through the forwarding edge, {hop_failed} failed"
    );
    assert_eq!(hop_failed, 0);
    assert!(
        metric(via.admin, "netbore_edge_forwarded_total").await >= 30,
        "the unlinked edge forwarded its requests"
    );

    // Bodies stream through the extra hop byte for byte, both ways.
    let body: Vec<u8> = (0..3_000_017u32).map(|i| (i % 251) as u8).collect();
    let req = http::Request::post(format!("http://127.0.0.1:{}/echo", via.public))
        .header("host", p.host())
        .body(netbore_testkit::full(body.clone()))
        .unwrap();
    let r = p.client.request(req).await.unwrap();
    assert_eq!(r.status(), 200);
    let got = r.into_body().collect().await.unwrap().to_bytes();
    assert!(
        got == body,
        "echo through forwarding differs ({} bytes)",
        got.len()
    );

    // gRPC (HTTP/2 with trailers) through whichever edge: a second agent in front of
    // a gRPC health service, called through each of the three edges.
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("demo", tonic_health::ServingStatus::Serving)
        .await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(futures_util::stream::unfold(l, |l| async move {
                Some((l.accept().await.map(|(s, _)| s), l))
            })),
    );
    let state = tempfile::tempdir().unwrap();
    let mut grpc_agent = Proc::spawn(
        "netbore",
        &[
            "http",
            &format!("http://{grpc_addr}"),
            "--control",
            &format!("http://127.0.0.1:{}", p._controls[0].rest),
            "--state-dir",
            state.path().to_str().unwrap(),
            "--connections",
            "1",
        ],
        &[("RUST_LOG", "warn")],
    );
    let line = grpc_agent.line(Duration::from_secs(30)).await;
    let grpc_host = line
        .split_whitespace()
        .next()
        .unwrap()
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap()
        .to_string();
    for e in &p.edges {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", e.public))
                .unwrap()
                .origin(format!("http://{grpc_host}").parse().unwrap())
                .connect()
                .await
                .unwrap();
        let mut hc = tonic_health::pb::health_client::HealthClient::new(channel);
        let ok = hc
            .check(tonic_health::pb::HealthCheckRequest {
                service: "demo".into(),
            })
            .await
            .unwrap_or_else(|e2| panic!("gRPC through {}: {e2}", e.id));
        assert_eq!(ok.into_inner().status, 1, "SERVING through {}", e.id);
        // The error status travels in trailers.
        let err = hc
            .check(tonic_health::pb::HealthCheckRequest {
                service: "nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::NotFound,
            "trailers through {}",
            e.id
        );
    }

    // A WebSocket through the unlinked edge.
    let (mut ws, status) =
        netbore_testkit::websocket(([127, 0, 0, 1], via.public).into(), &p.host(), "/ws", &[])
            .await
            .unwrap();
    assert_eq!(status, 101);
    for i in 0..20 {
        let m = Message::text(format!("ping {i} across edges"));
        ws.send(m.clone()).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), m);
    }

    // The internal listener refuses anyone without the shared secret.
    let req = http::Request::get(format!("http://127.0.0.1:{}/hello", via.internal))
        .header("x-netbore-fwd-host", p.host())
        .header("x-netbore-fwd-client", "203.0.113.9")
        .body(netbore_testkit::empty())
        .unwrap();
    assert_eq!(p.client.request(req).await.unwrap().status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_mid_traffic_costs_at_most_the_requests_in_flight() {
    let mut p = platform().await;
    let mut linked: Vec<String> = p.linked.iter().cloned().collect();
    linked.sort();
    let victim = linked[0].clone();
    let survivor = linked[1].clone();
    let targets = [p.edge(&survivor).public, p.unlinked().public];
    let (mut sent, mut failed_after) = (0u32, Vec::new());
    let mut killed_at = None;
    for i in 0..400u32 {
        if i == 100 {
            let e = p.edges.iter_mut().find(|e| e.id == victim).unwrap();
            e.proc.kill().await;
            killed_at = Some(Instant::now());
        }
        let port = targets[(i % 2) as usize];
        sent += 1;
        let st = p.get(port, "/hello").await;
        if st != Some(200) && killed_at.is_some() {
            failed_after.push(format!("#{i} via port {port}: {st:?}"));
        }
    }
    // The client sends one request at a time: at most one was in flight at the kill.
    println!(
        "sent {sent} requests, {} failed after SIGKILL of {victim}",
        failed_after.len()
    );
    assert!(failed_after.len() <= 1, "{failed_after:?}");
    // The agent replaces the lost link from the candidates.
    let back = p.wait_links(2, Duration::from_secs(30)).await;
    let took = killed_at.unwrap().elapsed();
    println!("agent back to 2 links {took:?} after the kill");
    let back = back.expect("two links again within 30 s");
    assert_ne!(back["edge_id"], victim.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_stopped_with_sigterm_mid_traffic_costs_nothing() {
    let mut p = platform().await;
    let mut linked: Vec<String> = p.linked.iter().cloned().collect();
    linked.sort();
    let victim = linked[0].clone();
    let probe: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let ports: Vec<(String, u16, u16)> = p
        .edges
        .iter()
        .map(|e| (e.id.clone(), e.public, e.admin))
        .collect();
    let (mut sent, mut failed) = (0u32, Vec::new());
    for i in 0..600u32 {
        if i == 150 {
            p.edges
                .iter()
                .find(|e| e.id == victim)
                .unwrap()
                .proc
                .signal("TERM");
        }
        // Like a load balancer: round robin over the edges whose /readyz says ready.
        let mut pick = None;
        for k in 0..ports.len() {
            let (_, public, admin) = &ports[(i as usize + k) % ports.len()];
            let req = http::Request::get(format!("http://127.0.0.1:{admin}/readyz"))
                .body(netbore_testkit::empty())
                .unwrap();
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(2), probe.request(req)).await
                && r.status() == 200
            {
                pick = Some(*public);
                break;
            }
        }
        let port = pick.expect("some edge is ready");
        sent += 1;
        let st = p.get(port, "/hello").await;
        if st != Some(200) {
            failed.push(format!("#{i} via port {port}: {st:?}"));
        }
    }
    println!(
        "sent {sent} requests, {} failed, SIGTERM to {victim} at #150",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    let e = p.edges.iter_mut().find(|e| e.id == victim).unwrap();
    let st = tokio::time::timeout(Duration::from_secs(40), e.proc.child.wait())
        .await
        .expect("the drained edge exits")
        .unwrap();
    assert!(st.success(), "{victim} exits cleanly: {st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_tunnels_keep_serving_and_return_within_a_heartbeat() {
    let mut p = platform().await;
    let key = format!("netbore:live:tunnel:{}", p.name);
    let ports: Vec<u16> = p.edges.iter().map(|e| e.public).collect();
    // Warm every edge's view of the tunnel, as steady traffic does.
    for port in &ports {
        assert_eq!(p.get(*port, "/hello").await, Some(200));
    }
    let (mut sent, mut failed) = (0u32, Vec::new());
    let mut watcher = None;
    for i in 0..300u32 {
        if i == 60 {
            p.redis.stop();
        }
        if i == 180 {
            p.redis.restart();
            // From the restart, time how long until both links' leases are back.
            let client = redis::Client::open(p.redis.url()).unwrap();
            let key = key.clone();
            watcher = Some(tokio::spawn(async move {
                let started = Instant::now();
                eventually(Duration::from_secs(10), || {
                    let (client, key) = (client.clone(), key.clone());
                    async move {
                        let mut c = client.get_multiplexed_async_connection().await.ok()?;
                        let n: u64 = redis::cmd("ZCARD")
                            .arg(&key)
                            .query_async(&mut c)
                            .await
                            .ok()?;
                        (n >= 2).then_some(())
                    }
                })
                .await
                .map(|()| started.elapsed())
            }));
        }
        let port = ports[(i as usize) % ports.len()];
        sent += 1;
        let st = p.get(port, "/hello").await;
        if st != Some(200) {
            failed.push(format!("#{i} via port {port}: {st:?}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "sent {sent} requests across a Redis stop and an empty restart, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    let took = watcher.unwrap().await.unwrap();
    println!("leases back in Redis {took:?} after the restart (refresh every {REFRESH_SECS} s)");
    let took = took.expect("the tunnel's leases are back in Redis within 10 s");
    // One refresh interval, plus the reconnect to the new server.
    assert!(
        took <= Duration::from_secs(REFRESH_SECS + 2),
        "back within one refresh interval (+2 s to reconnect): {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_drains_an_edge_through_the_other_control_replica() {
    use netbore_proto::control::v1 as pb;
    let mut p = platform().await;
    // The edge to drain, and a replica it is not linked to (edges link to replica i % 2).
    let mut linked: Vec<String> = p.linked.iter().cloned().collect();
    linked.sort();
    let victim = linked[0].clone();
    let index = p.edges.iter().position(|e| e.id == victim).unwrap();
    let other = &p._controls[(index + 1) % 2];
    let (rest, grpc) = (other.rest, other.grpc);

    let req = http::Request::post(format!("http://127.0.0.1:{rest}/auth/token"))
        .header("authorization", format!("Bearer {BOOT}"))
        .header("content-type", "application/json")
        .body(netbore_testkit::full(r#"{"scopes": ["admin"]}"#))
        .unwrap();
    let body = p
        .client
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let token: Value = serde_json::from_slice(&body.to_bytes()).unwrap();
    let token = token["token"].as_str().expect("an admin token").to_string();
    let mut c = pb::control_service_client::ControlServiceClient::connect(format!(
        "http://127.0.0.1:{grpc}"
    ))
    .await
    .unwrap();
    let call = |edge: &str, auth: Option<&str>| {
        let mut r = tonic::Request::new(pb::DrainEdgeRequest {
            edge_id: edge.to_string(),
        });
        if let Some(t) = auth {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    };
    let err = c.drain_edge(call(&victim, None)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = c
        .drain_edge(call("edge-nope", Some(&token)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{}", err.message());
    c.drain_edge(call(&victim, Some(&token))).await.unwrap();

    // The edge, linked to the other replica, turns not ready ...
    let admin = p.edge(&victim).admin;
    let probe = p.client.clone();
    let unready = eventually(Duration::from_secs(10), || {
        let probe = probe.clone();
        async move {
            let req = http::Request::get(format!("http://127.0.0.1:{admin}/readyz"))
                .body(netbore_testkit::empty())
                .unwrap();
            let st = probe.request(req).await.ok()?.status();
            (st == 503).then_some(())
        }
    })
    .await;
    assert!(
        unready.is_some(),
        "{victim} reports not ready after the drain"
    );
    // ... its agent moves to the edges left, and the tunnel keeps serving everywhere.
    let moved = p
        .wait_links(2, Duration::from_secs(20))
        .await
        .expect("two links again");
    assert_ne!(moved["edge_id"], victim.as_str());
    let gone = eventually(Duration::from_secs(20), || async move {
        (metric(admin, "netbore_edge_agent_connections").await == 0).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the agent's link left {victim}");
    let mut failed = Vec::new();
    for e in &p.edges {
        for _ in 0..10 {
            let st = p.get(e.public, "/hello").await;
            if st != Some(200) {
                failed.push(format!("{}: {st:?}", e.id));
            }
        }
    }
    println!(
        "drained {victim} via the other replica; 30 requests after, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
}
