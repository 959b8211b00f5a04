//! What an agent's ephemeral token is bound to, attacked as issue 12 did against real
//! processes (a `redis-server`, `netbore-control`, two `netbore-edge`s, `netbore`
//! agents): a deleted tunnel's token is refused on every edge within 5 s while the
//! name's new owner keeps every request; a link never displaces another tunnel's live
//! link; one token holds at most `MAX_LINKS_PER_TOKEN` links; and nothing in a token
//! forges a viewer's session cookie, while a real cookie made on one edge works on the
//! other. (Edge authentication to control is in `services/control/tests/grpc.rs`.)

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use netbore_control::api::{CreateTunnelRequest, DeleteTunnelRequest};
use netbore_control::client::ControlClient;
use netbore_edge::gate::MAX_LINKS_PER_TOKEN;
use netbore_protocol::PROTOCOL_VERSION;
use netbore_testkit::origin::Origin;
use netbore_testkit::redis::RedisServer;
use netbore_testkit::{ControlProc, EdgeProc, Proc, eventually};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const BOOT: &str = "edge-trust-bootstrap-credential";
/// How soon a deletion must reach every edge.
const REVOCATION_DEADLINE: Duration = Duration::from_secs(5);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Platform {
    _redis: RedisServer,
    control: ControlProc,
    edges: Vec<EdgeProc>,
    /// Control's signing key, to make tokens an older tunnel generation would hold.
    keys: netbore_tokens::KeySet,
    _dir: tempfile::TempDir,
}

async fn platform() -> Platform {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("signing.pem");
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    std::fs::write(&key, pair.serialize_pem()).unwrap();
    let keys = netbore_tokens::KeySet::from_pem_files(std::slice::from_ref(&key)).unwrap();
    let control = ControlProc::spawn(
        &[
            "--redis-url",
            &redis.url(),
            "--signing-key",
            key.to_str().unwrap(),
        ],
        &[("NETBORE_BOOTSTRAP_TOKEN", BOOT)],
    );
    control.wait_ready().await;
    let edges: Vec<EdgeProc> = ["edge-a", "edge-b"]
        .iter()
        .map(|id| {
            EdgeProc::spawn(
                id,
                &control,
                Some(&redis.url()),
                &["--registry-refresh-secs", "1"],
            )
        })
        .collect();
    let p = Platform {
        _redis: redis,
        control,
        edges,
        keys,
        _dir: dir,
    };
    // Both edges authenticated and reporting: control offers both.
    let c = p.client();
    let both = eventually(Duration::from_secs(30), || {
        let c = c.clone();
        async move {
            let t = c.create(&CreateTunnelRequest::default()).await.ok()?;
            (t.candidates.len() == 2).then_some(())
        }
    })
    .await;
    assert!(both.is_some(), "control never offered both edges");
    p
}

impl Platform {
    fn client(&self) -> ControlClient {
        ControlClient::new(&self.control.url())
    }

    /// A valid ephemeral token for tunnel `tunnel_id` under `name`, signed by control's
    /// key: what an agent of another generation of the name holds when its tunnel's
    /// deletion has not reached an edge (a partition, a control link down).
    fn token_for(&self, tunnel_id: &str, name: &str) -> String {
        self.keys
            .sign_ephemeral(&netbore_tokens::EphemeralClaims::new(
                "netbore-control",
                tunnel_id,
                name,
                300,
            ))
            .unwrap()
    }
}

/// Opens a WebSocket to `edge`'s agent port and sends a hello with `token`: the welcome
/// (and the open link) or the refusal code.
async fn hello(edge: &EdgeProc, token: &str, tunnel_id: &str) -> Result<Ws, String> {
    let url = format!("ws://127.0.0.1:{}/v1/connect", edge.agents);
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let h = serde_json::json!({"version": PROTOCOL_VERSION, "token": token, "tunnel_id": tunnel_id, "capabilities": [], "agent": "edge-trust-test"});
    ws.send(Message::text(h.to_string())).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .map_err(|_| "no answer".to_string())?
        .ok_or("closed")?
        .map_err(|e| e.to_string())?;
    let Message::Text(t) = msg else {
        return Err(format!("not a JSON answer: {msg:?}"));
    };
    let v: Value = serde_json::from_str(t.as_str()).unwrap();
    match v["type"].as_str() {
        Some("welcome") => Ok(ws),
        _ => Err(v["code"].as_str().unwrap_or("?").to_string()),
    }
}

/// True when `ws` was closed by the edge within `within`.
async fn closed_within(ws: &mut Ws, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await
    .is_ok()
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    netbore_testkit::ReqBody,
>;

fn http_client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// `GET path` on edge `port` for `host` with `headers`: status, headers and body.
async fn get(
    c: &Client,
    port: u16,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, String) {
    let mut req = http::Request::get(format!("http://127.0.0.1:{port}{path}")).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.request(req.body(netbore_testkit::empty()).unwrap()),
    )
    .await
    .expect("answered within 10 s")
    .expect("a response");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn agent(p: &Platform, origin: &Origin, state: &std::path::Path, extra: &[&str]) -> Proc {
    let url = p.control.url();
    let target = origin.url();
    let mut args = vec![
        "http",
        &target,
        "--control",
        &url,
        "--state-dir",
        state.to_str().unwrap(),
        "--connections",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    Proc::spawn("netbore", &args, &[("RUST_LOG", "warn")])
}

/// Waits for the agent's `live` event with two links; returns the tunnel's name.
async fn live_on_two_edges(a: &mut Proc) -> String {
    loop {
        let v: Value = serde_json::from_str(&a.line(Duration::from_secs(40)).await).unwrap();
        if v["event"] == "live" && v["links"].as_u64() == Some(2) {
            return v["name"].as_str().unwrap().to_string();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_tunnels_token_is_refused_everywhere_and_the_names_new_owner_keeps_every_request()
{
    let p = platform().await;
    let name = format!("shop{}", std::process::id());
    let old = p
        .client()
        .create(&CreateTunnelRequest {
            requested_name: Some(name.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    // The old owner's link, live before the deletion.
    let mut old_link = hello(&p.edges[0], &old.ephemeral_token, &old.tunnel_id)
        .await
        .expect("the token links before the deletion");
    p.client()
        .delete(&DeleteTunnelRequest {
            recreate_token: Some(old.recreate_token.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let deleted_at = Instant::now();
    assert!(
        closed_within(&mut old_link, REVOCATION_DEADLINE).await,
        "the deleted tunnel's link stays open"
    );
    // Every edge refuses the old token within the deadline.
    for e in &p.edges {
        let refused = eventually(REVOCATION_DEADLINE, || async {
            match hello(e, &old.ephemeral_token, &old.tunnel_id).await {
                Err(code) if code == "tunnel_deleted" => Some(()),
                _ => None,
            }
        })
        .await;
        assert!(
            refused.is_some(),
            "{} still takes the deleted tunnel's token",
            e.id
        );
    }
    let took = deleted_at.elapsed();
    println!("old token refused on both edges {took:?} after the deletion");
    assert!(took <= REVOCATION_DEADLINE + Duration::from_secs(1));

    // The name goes to a new tunnel, whose agent links to both edges.
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut a = agent(&p, &origin, state.path(), &["--name", &name]);
    assert_eq!(live_on_two_edges(&mut a).await, name);

    // The old token tries again on both edges (the attack): refused, nothing displaced.
    for e in &p.edges {
        assert_eq!(
            hello(e, &old.ephemeral_token, &old.tunnel_id)
                .await
                .err()
                .as_deref(),
            Some("tunnel_deleted")
        );
    }
    let c = http_client();
    let host = format!("{name}.localhost");
    let mut ok = 0;
    for i in 0..40 {
        let e = &p.edges[i % 2];
        let (status, _, body) = get(&c, e.public, &host, "/hello", &[]).await;
        if status == 200 && body == "hello from origin" {
            ok += 1;
        }
    }
    assert_eq!(ok, 40, "the new owner receives every request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_never_displaces_another_tunnels_live_link_for_the_name() {
    let p = platform().await;
    let name = format!("held{}", std::process::id());
    let first = p
        .client()
        .create(&CreateTunnelRequest {
            requested_name: Some(name.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut first_link = hello(&p.edges[0], &first.ephemeral_token, &first.tunnel_id)
        .await
        .unwrap();
    // A valid token of another tunnel for the same name, never revoked at the edges
    // (the newest link used to win): refused on both edges, on edge-b through the
    // registry, and the live link stays.
    let other_id = "tun_othergeneration0001";
    let other = p.token_for(other_id, &name);
    for e in &p.edges {
        let code = eventually(Duration::from_secs(5), || async {
            match hello(e, &other, other_id).await {
                Err(code) if code == "name_in_use" => Some(code),
                _ => None,
            }
        })
        .await;
        assert_eq!(code.as_deref(), Some("name_in_use"), "on {}", e.id);
    }
    assert!(
        !closed_within(&mut first_link, Duration::from_secs(1)).await,
        "the live link was displaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_links_with_one_token_over_two_edges_are_capped() {
    let p = platform().await;
    let t = p
        .client()
        .create(&CreateTunnelRequest::default())
        .await
        .unwrap();
    // Spread over both edges: the cap holds across the cluster (counted in Redis).
    let attempts = futures_util::future::join_all(
        (0..50).map(|i| hello(&p.edges[i % 2], &t.ephemeral_token, &t.tunnel_id)),
    )
    .await;
    let mut welcomed = Vec::new();
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for a in attempts {
        match a {
            Ok(ws) => welcomed.push(ws),
            Err(code) => *codes.entry(code).or_default() += 1,
        }
    }
    println!(
        "50 links with one token: {} welcomed, refused {codes:?}",
        welcomed.len()
    );
    assert_eq!(welcomed.len(), MAX_LINKS_PER_TOKEN);
    assert_eq!(
        codes.get("limit_reached"),
        Some(&(50 - MAX_LINKS_PER_TOKEN))
    );
    // Closing one link frees its place (after the pacing allows a new handshake).
    let mut one = welcomed.pop().unwrap();
    one.close(None).await.unwrap();
    let again = eventually(Duration::from_secs(10), || async {
        hello(&p.edges[0], &t.ephemeral_token, &t.tunnel_id)
            .await
            .ok()
    })
    .await;
    assert!(again.is_some(), "a freed place is not given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_in_the_token_forges_a_cookie_and_a_real_cookie_works_on_both_edges() {
    let p = platform().await;
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "workshop-secret-0123456789abcdef0123";
    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), secret).unwrap();
    let mut a = agent(
        &p,
        &origin,
        dir.path(),
        &[
            "--jwt-secret-file",
            secret_file.path().to_str().unwrap(),
            "--jwt-claim",
            "team=blue",
        ],
    );
    let name = live_on_two_edges(&mut a).await;
    let host = format!("{name}.localhost");
    let c = http_client();

    // A real viewer: its token on edge-a gives a cookie that edge-b accepts.
    let viewer = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "alice", "team": "blue", "exp": netbore_tokens::now_unix() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let (status, headers, _) = get(
        &c,
        p.edges[0].public,
        &host,
        &format!("/hello?token={viewer}"),
        &[],
    )
    .await;
    assert_eq!(status, 303);
    let cookie = headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let (cookie_name, _) = cookie.split_once('=').unwrap();
    for e in &p.edges {
        let (status, _, body) = get(&c, e.public, &host, "/hello", &[("cookie", &cookie)]).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "hello from origin"),
            "on {}",
            e.id
        );
    }

    // The attacker holds what a fake edge candidate received: an agent's token for
    // this tunnel (here from control, with the agent's saved recreate token).
    let tunnel_token = {
        let saved: Value = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
            .find_map(|t| serde_json::from_str::<Value>(&t).ok())
            .expect("the agent's saved state");
        p.client()
            .create(&CreateTunnelRequest {
                recreate_token: saved["recreate_token"].as_str().map(str::to_string),
                access: netbore_tokens::access::AccessPolicy {
                    jwt: Some(netbore_tokens::access::JwtPolicy {
                        secret: Some(netbore_tokens::Secret::new(secret)),
                        claims: [("team".to_string(), "blue".to_string())].into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            })
            .await
            .unwrap()
    };
    assert_eq!(tunnel_token.name(), name);
    let token = &tunnel_token.ephemeral_token;
    let mut candidates: Vec<String> = token.split('.').map(str::to_string).collect();
    candidates.push(URL_SAFE_NO_PAD.encode(token.as_bytes()));
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    // It carries no cookie key any more ...
    assert!(claims.get("session_key").is_none(), "{claims}");
    // ... and no key made from any part of it seals a cookie either edge accepts.
    for v in claims.as_object().unwrap().values() {
        candidates.push(URL_SAFE_NO_PAD.encode(v.to_string().as_bytes()));
    }
    let session = netbore_tokens::access::Session {
        tunnel_id: tunnel_token.tunnel_id.clone(),
        exp: netbore_tokens::now_unix() + 600,
        sub: Some("mallory".into()),
        forwarded: vec![],
    };
    let mut tried = 0;
    for k in &candidates {
        let Ok(key) = netbore_tokens::access::SessionKey::from_secret(
            &netbore_tokens::Secret::new(k.clone()),
        ) else {
            continue;
        };
        tried += 1;
        let forged = format!("{cookie_name}={}", key.seal(&session));
        for e in &p.edges {
            let (status, _, _) = get(&c, e.public, &host, "/hello", &[("cookie", &forged)]).await;
            assert_eq!(
                status, 401,
                "a cookie forged from the token passed on {}",
                e.id
            );
        }
    }
    assert!(tried >= 3, "only {tried} keys could be made from the token");
    assert!(
        origin
            .seen()
            .iter()
            .all(|s| s.header("x-netbore-user") != Some("mallory")),
        "mallory reached the origin"
    );
}
