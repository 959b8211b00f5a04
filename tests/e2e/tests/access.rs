//! Viewer access policies as users meet them: control, an edge and agents in this
//! process over real loopback sockets, a real origin that records what reached it, and
//! viewer tokens minted the way a workshop backend or a portal would.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use netbore_testkit::origin::Origin;
use netbore_testkit::{Collected, InProcAgent, Stack, Viewer, Ws, collect, empty, full};
use netbore_tokens::access::{AccessPolicy, BasicUser, JwtPolicy, TunnelLimits, hash_password};
use netbore_tokens::now_unix;
use tokio_tungstenite::tungstenite::Message;

/// A key pair as the tunnel owner's backend holds it: the PEM public key goes into the
/// policy, the private key mints viewer tokens.
struct OwnerKey {
    public_pem: String,
    signing: EncodingKey,
    alg: Algorithm,
}

fn owner_key(alg: Algorithm) -> OwnerKey {
    let (kp, signing) = match alg {
        Algorithm::EdDSA => {
            let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let enc = EncodingKey::from_ed_der(&kp.serialize_der());
            (kp, enc)
        }
        Algorithm::ES256 => {
            let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let enc = EncodingKey::from_ec_der(&kp.serialize_der());
            (kp, enc)
        }
        other => panic!("no test key for {other:?}"),
    };
    OwnerKey {
        public_pem: kp.public_key_pem(),
        signing,
        alg,
    }
}

impl OwnerKey {
    fn mint(&self, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(self.alg), &claims, &self.signing).unwrap()
    }

    fn policy(&self, claims: &[(&str, &str)], forward: &[&str]) -> AccessPolicy {
        AccessPolicy {
            jwt: Some(JwtPolicy {
                public_key_pem: Some(self.public_pem.clone()),
                claims: claims
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
                forward_claims: forward.iter().map(|s| s.to_string()).collect(),
                ..JwtPolicy::default()
            }),
            ..AccessPolicy::default()
        }
    }
}

async fn agent_with_policy(
    stack: &Stack,
    origin: &Origin,
    name: Option<&str>,
    access: AccessPolicy,
) -> InProcAgent {
    stack
        .agent_with(&origin.url(), |c| {
            c.access = access;
            c.name = name.map(str::to_string);
        })
        .await
}

async fn get(v: &Viewer, host: &str, path: &str, headers: &[(&str, &str)]) -> Collected {
    let mut req = v.request("GET", host, path, empty());
    for (k, val) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(val).unwrap(),
        );
    }
    collect(v.send(req).await).await
}

/// Opens a WebSocket to `path` on tunnel `host` through the stack's edge.
async fn websocket(
    stack: &Stack,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, http::StatusCode), http::StatusCode> {
    netbore_testkit::websocket(stack.public(), host, path, headers).await
}

async fn echo_once(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::text(text));
}

/// The cookie `name=value` pair from a `Set-Cookie` header (attributes dropped).
fn cookie_pair(r: &Collected) -> String {
    let sc = r
        .headers
        .get("set-cookie")
        .expect("a Set-Cookie header")
        .to_str()
        .unwrap();
    sc.split(';').next().unwrap().trim().to_string()
}

/// Everything the origin received, as text, to search for leaked secrets.
fn origin_saw_text(origin: &Origin) -> String {
    origin
        .seen()
        .iter()
        .map(|s| format!("{} {} {:?}\n", s.method, s.target, s.headers))
        .collect()
}

// ---------------------------------------------------------------------------------
// The workshop case

#[tokio::test]
async fn workshop_terminal_opens_with_a_query_token_and_the_origin_never_sees_it() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let key = owner_key(Algorithm::EdDSA);
    let agent = agent_with_policy(
        &stack,
        &origin,
        None,
        key.policy(&[("workshop_id", "ws-42"), ("seat", "7")], &["seat"]),
    )
    .await;
    // The workshop backend mints a 2-hour token for the seated student.
    let now = now_unix();
    let token = key.mint(serde_json::json!({
        "sub": "student-7", "workshop_id": "ws-42", "seat": 7,
        "iat": now, "exp": now + 2 * 3600,
    }));
    let (mut ws, status) = websocket(
        &stack,
        &agent.host(),
        &format!("/ws?token={token}&cols=80"),
        &[("x-netbore-user", "admin")],
    )
    .await
    .expect("the terminal opens with the token in the query");
    assert_eq!(status, 101);
    echo_once(&mut ws, "ls -la").await;

    let seen = origin.seen();
    let ws_req = seen.iter().find(|s| s.target.starts_with("/ws")).unwrap();
    assert_eq!(
        ws_req.target, "/ws?cols=80",
        "the token is cut from the target"
    );
    assert_eq!(ws_req.header("x-netbore-user"), Some("student-7"));
    assert_eq!(ws_req.header("x-netbore-claim-seat"), Some("7"));
    assert!(
        !origin_saw_text(&origin).contains(&token),
        "the token never reaches the origin"
    );
    assert!(
        !origin_saw_text(&origin).contains("admin"),
        "a viewer's own X-Netbore-User is dropped"
    );
}

#[tokio::test]
async fn wrong_workshop_expired_and_missing_tokens_get_401_with_the_reason() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let key = owner_key(Algorithm::EdDSA);
    let agent = agent_with_policy(
        &stack,
        &origin,
        None,
        key.policy(&[("workshop_id", "ws-42")], &[]),
    )
    .await;
    let v = Viewer::new(stack.public());
    let now = now_unix();
    let cases = [
        (
            key.mint(serde_json::json!({"sub": "s", "workshop_id": "ws-43", "exp": now + 7200})),
            "access_claim_mismatch",
        ),
        (
            key.mint(serde_json::json!({"sub": "s", "workshop_id": "ws-42", "exp": now - 3600})),
            "access_token_expired",
        ),
        (
            key.mint(serde_json::json!({"sub": "s", "exp": now + 7200})),
            "access_claim_missing",
        ),
        (
            owner_key(Algorithm::EdDSA)
                .mint(serde_json::json!({"sub": "s", "workshop_id": "ws-42", "exp": now + 7200})),
            "access_token_invalid",
        ),
    ];
    for (token, code) in &cases {
        let r = get(&v, &agent.host(), &format!("/hello?token={token}"), &[]).await;
        assert_eq!(r.status, 401, "{code}");
        assert_eq!(r.error_code(), Some(*code));
        let ws = websocket(&stack, &agent.host(), &format!("/ws?token={token}"), &[]).await;
        assert_eq!(
            ws.err(),
            Some(http::StatusCode::UNAUTHORIZED),
            "{code} on a WebSocket"
        );
    }
    let r = get(&v, &agent.host(), "/hello", &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), Some("access_token_missing"));
    assert!(
        origin.seen().is_empty(),
        "nothing refused reached the origin"
    );

    // The right token, as a bearer header, passes and is not forwarded.
    let good = key.mint(serde_json::json!({"sub": "s", "workshop_id": "ws-42", "exp": now + 60}));
    let r = get(
        &v,
        &agent.host(),
        "/hello",
        &[("authorization", &format!("Bearer {good}"))],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(origin.seen()[0].header("authorization"), None);
}

// ---------------------------------------------------------------------------------
// The pod-and-port (portal) case

#[tokio::test]
async fn portal_link_sets_a_cookie_and_redirects_then_requests_and_websockets_ride_on_it() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let key = owner_key(Algorithm::ES256);
    let agent =
        agent_with_policy(&stack, &origin, None, key.policy(&[("team", "blue")], &[])).await;
    let v = Viewer::new(stack.public());
    let now = now_unix();
    let token = key.mint(
        serde_json::json!({"sub": "dev@example.com", "team": ["red", "blue"], "exp": now + 600}),
    );

    let r = get(&v, &agent.host(), &format!("/?token={token}&tab=2"), &[]).await;
    assert_eq!(r.status, 303);
    assert_eq!(
        r.headers["location"], "/?tab=2",
        "same URL without the token"
    );
    let set_cookie = r.headers["set-cookie"].to_str().unwrap().to_string();
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age="] {
        assert!(set_cookie.contains(attr), "{attr} in {set_cookie}");
    }
    assert!(!set_cookie.contains("Domain"), "host-only: {set_cookie}");
    let max_age: u64 = set_cookie
        .split("Max-Age=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (590..=600).contains(&max_age),
        "expires with the token: {max_age}"
    );
    assert!(origin.seen().is_empty(), "the redirect is the edge's own");

    let cookie = cookie_pair(&r);
    let r = get(
        &v,
        &agent.host(),
        "/headers",
        &[("cookie", &format!("app=1; {cookie}; theme=dark"))],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = origin.seen();
    assert_eq!(seen[0].header("x-netbore-user"), Some("dev@example.com"));
    assert_eq!(
        seen[0].header("cookie"),
        Some("app=1; theme=dark"),
        "the session cookie is removed, the app's cookies kept"
    );

    let (mut ws, status) = websocket(&stack, &agent.host(), "/ws", &[("cookie", &cookie)])
        .await
        .expect("a WebSocket rides on the cookie");
    assert_eq!(status, 101);
    echo_once(&mut ws, "over the cookie").await;
    assert!(!origin_saw_text(&origin).contains(&token));
}

#[tokio::test]
async fn a_cookie_is_refused_by_another_tunnel_even_one_whose_name_extends_it() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let key = owner_key(Algorithm::ES256);
    // Two tunnels with the same key and claims: the same token opens both, but a
    // session cookie is bound to the tunnel it was made for.
    let a = agent_with_policy(&stack, &origin, Some("seat7"), key.policy(&[], &[])).await;
    let b = agent_with_policy(&stack, &origin, Some("seat7b"), key.policy(&[], &[])).await;
    let v = Viewer::new(stack.public());
    let token = key.mint(serde_json::json!({"sub": "x", "exp": now_unix() + 600}));
    let r = get(&v, &a.host(), &format!("/hello?token={token}"), &[]).await;
    assert_eq!(r.status, 303);
    let cookie = cookie_pair(&r);
    assert_eq!(
        get(&v, &a.host(), "/hello", &[("cookie", &cookie)])
            .await
            .status,
        200
    );
    let r = get(&v, &b.host(), "/hello", &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), Some("access_session_invalid"));
    let ws = websocket(&stack, &b.host(), "/ws", &[("cookie", &cookie)]).await;
    assert_eq!(ws.err(), Some(http::StatusCode::UNAUTHORIZED));
    // A forged cookie (payload edited) is refused by its own tunnel too.
    let (name, value) = cookie.split_once('=').unwrap();
    let forged = format!("{name}=x{value}");
    let r = get(&v, &a.host(), "/hello", &[("cookie", &forged)]).await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn a_new_token_replaces_the_cookie_without_a_redirect_loop() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let key = owner_key(Algorithm::EdDSA);
    let agent = agent_with_policy(&stack, &origin, None, key.policy(&[], &["role"])).await;
    let v = Viewer::new(stack.public());
    let now = now_unix();
    let first = key.mint(serde_json::json!({"sub": "u", "role": "viewer", "exp": now + 600}));
    let second = key.mint(serde_json::json!({"sub": "u", "role": "editor", "exp": now + 900}));
    let r = get(&v, &agent.host(), &format!("/headers?token={first}"), &[]).await;
    let old = cookie_pair(&r);
    // The portal sends the viewer back with a new token while the old cookie is set.
    let r = get(
        &v,
        &agent.host(),
        &format!("/headers?token={second}"),
        &[("cookie", &old)],
    )
    .await;
    assert_eq!(r.status, 303);
    let new = cookie_pair(&r);
    assert_ne!(new, old);
    // Following the redirect with the new cookie lands on the page: no second redirect.
    let r = get(&v, &agent.host(), "/headers", &[("cookie", &new)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        origin.seen().last().unwrap().header("x-netbore-claim-role"),
        Some("editor")
    );
}

#[tokio::test]
async fn behind_https_the_cookie_is_host_prefixed_and_secure() {
    // TLS ends at the load balancer (a trusted proxy) which says the viewer used https.
    let stack =
        Stack::start_with_edge(|e| e.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()]).await;
    let origin = Origin::start().await;
    let key = owner_key(Algorithm::EdDSA);
    let agent = agent_with_policy(&stack, &origin, None, key.policy(&[], &[])).await;
    let v = Viewer::new(stack.public());
    let token = key.mint(serde_json::json!({"exp": now_unix() + 600}));
    let r = get(
        &v,
        &agent.host(),
        &format!("/?token={token}"),
        &[("x-forwarded-proto", "https")],
    )
    .await;
    assert_eq!(r.status, 303);
    let sc = r.headers["set-cookie"].to_str().unwrap();
    assert!(sc.starts_with("__Host-netbore_session="), "{sc}");
    assert!(
        sc.contains("; Secure") && sc.contains("Path=/") && !sc.contains("Domain"),
        "{sc}"
    );
    let cookie = cookie_pair(&r);
    let r = get(
        &v,
        &agent.host(),
        "/hello",
        &[("cookie", &cookie), ("x-forwarded-proto", "https")],
    )
    .await;
    assert_eq!(r.status, 200);
}

// ---------------------------------------------------------------------------------
// Basic auth, IP lists, embedding and CORS, body limits

#[tokio::test]
async fn basic_auth_admits_the_right_password_and_hides_it_from_the_origin() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let policy = AccessPolicy {
        basic_auth: vec![BasicUser {
            user: "alice".into(),
            hash: hash_password("wonderland"),
        }],
        ..AccessPolicy::default()
    };
    let agent = agent_with_policy(&stack, &origin, None, policy).await;
    let v = Viewer::new(stack.public());
    let basic = |u: &str, p: &str| {
        use base64_lite::encode;
        format!("Basic {}", encode(format!("{u}:{p}").as_bytes()))
    };
    let r = get(&v, &agent.host(), "/hello", &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), Some("access_basic_required"));
    assert!(
        r.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic realm="),
        "browsers get a login prompt"
    );
    let r = get(
        &v,
        &agent.host(),
        "/hello",
        &[("authorization", &basic("alice", "rabbit"))],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), Some("access_basic_invalid"));
    let r = get(
        &v,
        &agent.host(),
        "/hello",
        &[("authorization", &basic("mallory", "wonderland"))],
    )
    .await;
    assert_eq!(r.status, 401);
    for _ in 0..2 {
        let r = get(
            &v,
            &agent.host(),
            "/headers",
            &[("authorization", &basic("alice", "wonderland"))],
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let seen = origin.seen();
    assert_eq!(
        seen.len(),
        2,
        "only the admitted requests reached the origin"
    );
    assert_eq!(seen[0].header("x-netbore-user"), Some("alice"));
    assert_eq!(seen[0].header("authorization"), None);
    assert!(!origin_saw_text(&origin).contains("wonderland"));
}

/// Base64 for basic-auth headers, so the test does not lean on the edge's own code.
mod base64_lite {
    pub fn encode(input: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

#[tokio::test]
async fn ip_lists_judge_the_client_the_trusted_proxy_names_and_ignore_spoofing() {
    let policy = AccessPolicy {
        ip_allow: vec!["203.0.113.0/24".into()],
        ip_deny: vec!["203.0.113.66/32".into()],
        ..AccessPolicy::default()
    };
    let behind_lb =
        Stack::start_with_edge(|e| e.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()]).await;
    let origin = Origin::start().await;
    let agent = agent_with_policy(&behind_lb, &origin, None, policy.clone()).await;
    let v = Viewer::new(behind_lb.public());
    let via = |ip: &'static str| [("x-forwarded-for", ip)];
    assert_eq!(
        get(&v, &agent.host(), "/hello", &via("203.0.113.7"))
            .await
            .status,
        200
    );
    let r = get(&v, &agent.host(), "/hello", &via("198.51.100.1")).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (403, Some("ip_not_allowed"))
    );
    let r = get(&v, &agent.host(), "/hello", &via("203.0.113.66")).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (403, Some("ip_denied"))
    );
    assert_eq!(origin.seen().len(), 1);

    // Without a trusted proxy the same header is a viewer's claim and counts for nothing.
    let direct = Stack::start().await;
    let origin2 = Origin::start().await;
    let agent2 = agent_with_policy(&direct, &origin2, None, policy).await;
    let v2 = Viewer::new(direct.public());
    let r = get(&v2, &agent2.host(), "/hello", &via("203.0.113.7")).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (403, Some("ip_not_allowed"))
    );
    assert!(origin2.seen().is_empty());
}

#[tokio::test]
async fn pages_may_be_framed_and_called_only_from_the_listed_origin() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let portal = "https://portal.example.com";
    let policy = AccessPolicy {
        frame_ancestors: vec![portal.into()],
        cors_origins: vec![portal.into()],
        ..AccessPolicy::default()
    };
    let agent = agent_with_policy(&stack, &origin, None, policy).await;
    let v = Viewer::new(stack.public());

    let r = get(&v, &agent.host(), "/hello", &[("origin", portal)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["content-security-policy"],
        "frame-ancestors https://portal.example.com"
    );
    assert_eq!(r.headers["access-control-allow-origin"], portal);
    assert_eq!(r.headers["access-control-allow-credentials"], "true");

    let r = get(
        &v,
        &agent.host(),
        "/hello",
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(!r.headers.contains_key("access-control-allow-origin"));
    assert!(r.headers.contains_key("content-security-policy"));

    let preflight = |o: &'static str| {
        let mut req = v.request("OPTIONS", &agent.host(), "/api", empty());
        let h = req.headers_mut();
        h.insert("origin", o.parse().unwrap());
        h.insert("access-control-request-method", "PUT".parse().unwrap());
        h.insert(
            "access-control-request-headers",
            "x-custom".parse().unwrap(),
        );
        req
    };
    let r = collect(v.send(preflight(portal)).await).await;
    assert_eq!(r.status, 204);
    assert_eq!(r.headers["access-control-allow-origin"], portal);
    assert_eq!(r.headers["access-control-allow-methods"], "PUT");
    assert_eq!(r.headers["access-control-allow-headers"], "x-custom");
    let r = collect(v.send(preflight("https://evil.example")).await).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code(), Some("cors_origin_denied"));
    assert!(
        origin.seen().iter().all(|s| s.method != "OPTIONS"),
        "preflights are answered at the edge"
    );
}

#[tokio::test]
async fn a_tunnels_own_body_limit_answers_413_below_the_edges() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let agent = stack
        .agent_with(&origin.url(), |c| {
            c.limits = TunnelLimits {
                max_body_bytes: Some(1000),
            }
        })
        .await;
    let v = Viewer::new(stack.public());
    let r = collect(
        v.send(v.request("POST", &agent.host(), "/echo", full(vec![7u8; 1000])))
            .await,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 1000);
    let r = collect(
        v.send(v.request("POST", &agent.host(), "/echo", full(vec![7u8; 1001])))
            .await,
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.error_code(), Some("body_too_large"));
    // A chunked body that grows past the limit is cut off the same way.
    let chunks = futures_util::stream::iter((0..4).map(|_| {
        Ok::<_, std::io::Error>(http_body::Frame::data(bytes::Bytes::from(vec![1u8; 400])))
    }));
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(chunks));
    let r = collect(
        v.send(v.request("POST", &agent.host(), "/echo", body))
            .await,
    )
    .await;
    assert_eq!(r.status, 413);
}

#[tokio::test]
async fn control_refuses_an_unusable_policy_with_the_field_to_fix() {
    let stack = Stack::start().await;
    let client = netbore_control::client::ControlClient::new(&stack.control_url());
    let bad = [
        (
            AccessPolicy {
                cors_origins: vec!["https://a.example; script-src *".into()],
                ..AccessPolicy::default()
            },
            "cors_origins",
        ),
        (
            AccessPolicy {
                jwt: Some(JwtPolicy {
                    public_key_pem: Some("not a key".into()),
                    ..JwtPolicy::default()
                }),
                ..AccessPolicy::default()
            },
            "public_key_pem",
        ),
        (
            AccessPolicy {
                basic_auth: vec![BasicUser {
                    user: "bob".into(),
                    hash: "hunter2".into(),
                }],
                ..AccessPolicy::default()
            },
            "basic_auth",
        ),
    ];
    for (access, field) in bad {
        let err = client
            .create(&netbore_control::api::CreateTunnelRequest {
                access,
                ..Default::default()
            })
            .await
            .expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("access_invalid") || text.contains(field),
            "{text}"
        );
        assert!(text.contains(field), "names the field: {text}");
    }
}

// ---------------------------------------------------------------------------------
// The real `netbore` binary's flags

fn agent_proc(stack: &Stack, origin: &Origin, extra: &[&str]) -> netbore_testkit::Proc {
    let control = stack.control_url();
    let target = origin.url();
    let mut args = vec![
        "http",
        target.as_str(),
        "--control",
        control.as_str(),
        "--connections",
        "1",
    ];
    args.extend_from_slice(extra);
    netbore_testkit::Proc::spawn("netbore", &args, &[("RUST_LOG", "warn")])
}

fn host_of(url_line: &str) -> String {
    let url = url_line.split_whitespace().next().unwrap();
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_flags_set_the_policy_the_edge_enforces() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = owner_key(Algorithm::EdDSA);
    let key_file = dir.path().join("owner.pub");
    std::fs::write(&key_file, &key.public_pem).unwrap();
    // Two state directories: with one, the second agent would get the first's tunnel
    // back (same control, same origin) and replace its policy.
    let state = dir.path().join("state");
    let state2 = dir.path().join("state2");
    let mut jwt_agent = agent_proc(
        &stack,
        &origin,
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--jwt-key",
            key_file.to_str().unwrap(),
            "--jwt-claim",
            "workshop_id=ws-42",
            "--jwt-forward-claim",
            "seat",
            "--max-body-bytes",
            "100",
        ],
    );
    let jwt_host = host_of(&jwt_agent.line(Duration::from_secs(20)).await);
    let mut basic_agent = agent_proc(
        &stack,
        &origin,
        &[
            "--state-dir",
            state2.to_str().unwrap(),
            "--basic-auth",
            "alice:wonderland",
        ],
    );
    let basic_host = host_of(&basic_agent.line(Duration::from_secs(20)).await);
    let v = Viewer::new(stack.public());

    assert_eq!(get(&v, &jwt_host, "/hello", &[]).await.status, 401);
    let token =
        key.mint(serde_json::json!({"workshop_id": "ws-42", "seat": "3", "exp": now_unix() + 60}));
    let bearer = format!("Bearer {token}");
    let r = get(&v, &jwt_host, "/hello", &[("authorization", &bearer)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        origin.seen().last().unwrap().header("x-netbore-claim-seat"),
        Some("3")
    );
    let mut post = v.request("POST", &jwt_host, "/echo", full(vec![0u8; 101]));
    post.headers_mut()
        .insert("authorization", bearer.parse().unwrap());
    assert_eq!(collect(v.send(post).await).await.status, 413);

    let r = get(&v, &basic_host, "/hello", &[]).await;
    assert_eq!(r.error_code(), Some("access_basic_required"));
    let creds = format!("Basic {}", base64_lite::encode(b"alice:wonderland"));
    assert_eq!(
        get(&v, &basic_host, "/hello", &[("authorization", &creds)])
            .await
            .status,
        200
    );
    // Only the hash left the agent's machine: the saved state holds no password.
    for entry in std::fs::read_dir(&state2).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        assert!(!text.contains("wonderland"));
    }
}

#[tokio::test]
async fn a_bad_access_flag_stops_the_agent_with_the_flag_named() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    for (flags, expect) in [
        (&["--cors-origin", "portal.example.com"][..], "cors_origins"),
        (&["--allow-ip", "10.0.0.0/40"][..], "ip_allow"),
        (&["--jwt-claim", "seat"][..], "--jwt-claim"),
        (&["--basic-auth", "alice"][..], "--basic-auth"),
    ] {
        let control = stack.control_url();
        let target = origin.url();
        let mut args = vec!["http", target.as_str(), "--control", control.as_str()];
        args.extend_from_slice(flags);
        let mut p = netbore_testkit::Proc::spawn_logs("netbore", &args, &[]);
        let status = tokio::time::timeout(Duration::from_secs(20), p.child.wait())
            .await
            .expect("exits at once")
            .unwrap();
        assert_eq!(status.code(), Some(2), "{flags:?}");
        let mut err = String::new();
        while let Ok(Some(l)) = tokio::time::timeout(Duration::from_secs(2), p.stdout.recv()).await
        {
            err.push_str(&l);
        }
        assert!(err.contains(expect), "{flags:?}: {err}");
    }
}

#[tokio::test]
async fn hash_password_prints_a_hash_the_policy_accepts() {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(netbore_testkit::bin_path("netbore"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"wonderland\n")
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2id$v=19$m=7168,t=5,p=1$"), "{hash}");
    assert!(netbore_tokens::access::verify_password(&hash, "wonderland"));
    assert!(!netbore_tokens::access::verify_password(
        &hash,
        "Wonderland"
    ));
}

#[tokio::test]
async fn a_policy_set_over_grpc_is_signed_into_the_agents_token() {
    use netbore_proto::control::v1 as pb;
    let stack = Stack::start().await;
    let mut c = pb::control_service_client::ControlServiceClient::connect(format!(
        "http://{}",
        stack.dev.grpc
    ))
    .await
    .unwrap();
    let created = c
        .create_tunnel(pb::CreateTunnelRequest {
            access: Some(pb::AccessPolicy {
                ip_deny: vec!["192.0.2.0/24".into()],
                jwt: Some(pb::JwtPolicy {
                    secret: "s".repeat(32),
                    claims: [("seat".to_string(), "7".to_string())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            limits: Some(pb::TunnelLimits {
                max_body_bytes: 4096,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // What an edge reads from the token: the policy and the limit, but no session key
    // (edges derive it from control's seed; anyone holding the token could forge
    // cookies with a key carried in it).
    let payload = created.ephemeral_token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&base64_url_decode(payload)).unwrap();
    assert_eq!(claims["access"]["ip_deny"][0], "192.0.2.0/24");
    assert_eq!(claims["access"]["jwt"]["claims"]["seat"], "7");
    assert_eq!(claims["limits"]["max_body_bytes"], 4096);
    assert!(claims.get("session_key").is_none(), "{claims}");

    let err = c
        .create_tunnel(pb::CreateTunnelRequest {
            access: Some(pb::AccessPolicy {
                jwt: Some(pb::JwtPolicy {
                    secret: "short".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("access_invalid:"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("32 bytes"), "{}", err.message());
}

fn base64_url_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => panic!("not base64url"),
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for &c in s.as_bytes() {
        acc = (acc << 6) | u32::from(val(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Names of several labels (issue 17 item 4)

#[tokio::test]
async fn a_name_of_two_labels_routes_and_its_cookie_opens_only_that_tunnel() {
    let stack = Stack::start_with(|c| c.max_name_labels = 2).await;
    let origin = Origin::start().await;
    let key = owner_key(Algorithm::EdDSA);
    let pod = agent_with_policy(
        &stack,
        &origin,
        Some("localhost-8726.pod-myslug"),
        key.policy(&[], &[]),
    )
    .await;
    assert!(
        pod.host()
            .starts_with("localhost-8726.pod-myslug.localhost:"),
        "{}",
        pod.host()
    );
    // The one-label tunnel the two-label name sits under, with the same key.
    let parent = agent_with_policy(&stack, &origin, Some("pod-myslug"), key.policy(&[], &[])).await;
    let v = Viewer::new(stack.public());

    let r = get(&v, &pod.host(), "/hello", &[]).await;
    assert_eq!(r.status, 401, "the policy holds for the two-label name");
    let token = key.mint(serde_json::json!({"sub": "pod-user", "exp": now_unix() + 600}));
    let r = get(&v, &pod.host(), &format!("/hello?token={token}"), &[]).await;
    assert_eq!(r.status, 303);
    assert_eq!(r.headers["location"], "/hello");
    let cookie = cookie_pair(&r);
    let r = get(&v, &pod.host(), "/hello", &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        origin.seen().last().unwrap().header("x-netbore-user"),
        Some("pod-user")
    );
    let (mut ws, status) = websocket(&stack, &pod.host(), "/ws", &[("cookie", &cookie)])
        .await
        .expect("a WebSocket rides on the cookie");
    assert_eq!(status, 101);
    echo_once(&mut ws, "two labels").await;

    // The cookie is bound to the two-label tunnel: the parent name refuses it.
    let r = get(&v, &parent.host(), "/hello", &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), Some("access_session_invalid"));
    // A third label nobody holds is no tunnel.
    let other = format!("x.{}", pod.host());
    assert_eq!(get(&v, &other, "/hello", &[]).await.status, 404);
}

#[tokio::test]
async fn control_refuses_a_dotted_name_by_default_and_names_the_setting() {
    let stack = Stack::start().await;
    let client = netbore_control::client::ControlClient::new(&stack.control_url());
    let e = client
        .create(&netbore_control::api::CreateTunnelRequest {
            requested_name: Some("localhost-8726.pod-myslug".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.as_str()), Some("name_invalid"));
    assert!(e.to_string().contains("--max-name-labels"), "{e}");
}
