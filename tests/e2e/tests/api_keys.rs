//! Owners, API keys and idempotent creation (issue 13 steps 2, 3, 7), against real
//! `netbore-control` processes: keys shown once, listed without secrets, refused once
//! revoked or expired (on `/auth/token` and as a bearer); owners isolated from each
//! other while `admin` sees all; a key's name pattern enforced; one idempotency key
//! across two replicas on one PostgreSQL makes one tunnel; grpcurl against the new
//! RPCs; no secret in the logs or the audit trail.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use netbore_testkit::grpcurl;
use netbore_testkit::postgres::PostgresServer;
use netbore_testkit::redis::RedisServer;
use netbore_testkit::{ControlProc, Proc, free_port};
use serde_json::{Value, json};

const BOOT: &str = "test-bootstrap-credential";
/// A configured edge: creation needs a candidate, nothing here connects to it.
const EDGE: &str = "id=e1,url=ws://127.0.0.1:9/v1/connect,region=local";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>()
}

/// A JSON call: (status, body).
async fn call(
    c: &HttpClient,
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let resp = c
        .request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned())),
    )
}

/// `Authorization: Bearer <t>`.
fn auth(t: &str) -> String {
    format!("Bearer {t}")
}

/// A control process whose logs (stderr, at `info`) the test reads.
fn control_with_logs(extra: &[&str]) -> ControlProc {
    let (rest, grpc) = (free_port(), free_port());
    let (ra, ga) = (format!("127.0.0.1:{rest}"), format!("127.0.0.1:{grpc}"));
    let mut args = vec![
        "--rest-addr",
        &ra,
        "--grpc-addr",
        &ga,
        "--database-url",
        "sqlite::memory:",
        "--edge",
        EDGE,
    ];
    args.extend_from_slice(extra);
    ControlProc {
        proc: Proc::spawn_logs(
            "netbore-control",
            &args,
            &[("NETBORE_BOOTSTRAP_TOKEN", BOOT), ("RUST_LOG", "info")],
        ),
        rest,
        grpc,
    }
}

fn control() -> ControlProc {
    ControlProc::spawn(&["--edge", EDGE], &[("NETBORE_BOOTSTRAP_TOKEN", BOOT)])
}

/// A management token from the bootstrap credential for `subject` with `scopes`.
async fn token(c: &HttpClient, base: &str, subject: &str, scopes: &[&str]) -> String {
    let a = auth(BOOT);
    let (st, b) = call(
        c,
        base,
        "POST",
        "/auth/token",
        &[("authorization", &a)],
        Some(json!({"subject": subject, "scopes": scopes})),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    b["token"].as_str().unwrap().to_string()
}

/// Creates an API key with `bearer`; (key, its id).
async fn new_key(c: &HttpClient, base: &str, bearer: &str, body: Value) -> (String, String) {
    let a = auth(bearer);
    let (st, b) = call(
        c,
        base,
        "POST",
        "/v1/api-keys",
        &[("authorization", &a)],
        Some(body),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    (
        b["key"].as_str().unwrap().to_string(),
        b["api_key"]["id"].as_str().unwrap().to_string(),
    )
}

async fn create(c: &HttpClient, base: &str, bearer: Option<&str>, body: Value) -> (u16, Value) {
    let a = bearer.map(auth);
    let h: Vec<(&str, &str)> = a.iter().map(|a| ("authorization", a.as_str())).collect();
    call(c, base, "POST", "/tunnels/create", &h, Some(body)).await
}

fn names(list: &Value) -> Vec<String> {
    list["tunnels"]
        .as_array()
        .unwrap_or_else(|| panic!("a list: {list}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

fn code(b: &Value) -> &str {
    b["error"]["code"].as_str().unwrap_or_default()
}

/// Every log line `p` wrote so far.
async fn drain_logs(p: &mut Proc) -> String {
    let mut out = String::new();
    while let Ok(Some(l)) = tokio::time::timeout(Duration::from_millis(300), p.stdout.recv()).await
    {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_shown_once_listed_without_secrets_and_refused_once_revoked_or_expired() {
    let mut ctl = control_with_logs(&[]);
    ctl.wait_ready().await;
    let (c, base) = (client(), ctl.url());
    let admin = token(&c, &base, "ops", &["admin"]).await;

    let a = auth(&admin);
    let (st, made) = call(
        &c,
        &base,
        "POST",
        "/v1/api-keys",
        &[("authorization", &a)],
        Some(json!({"subject": "alice", "label": "alice laptop", "scopes": ["tunnels:read", "tunnels:write"]})),
    )
    .await;
    assert_eq!(st, 200, "{made}");
    let key = made["key"].as_str().unwrap().to_string();
    let id = made["api_key"]["id"].as_str().unwrap().to_string();
    assert!(key.starts_with("nbk_") && key.len() >= 40, "{key}");
    assert_eq!(made["api_key"]["prefix"], key[..12]);
    assert_eq!(made["api_key"]["owner"], "alice");
    assert!(made["api_key"]["last_used_at"].is_null());

    // The key mints a management token for its owner, at most its scopes.
    let k = auth(&key);
    let (st, t) = call(
        &c,
        &base,
        "POST",
        "/auth/token",
        &[("authorization", &k)],
        None,
    )
    .await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["scopes"], json!(["tunnels:read", "tunnels:write"]));
    let alice = t["token"].as_str().unwrap().to_string();
    let (st, b) = call(
        &c,
        &base,
        "POST",
        "/auth/token",
        &[("authorization", &k)],
        Some(json!({"scopes": ["admin"]})),
    )
    .await;
    assert_eq!((st, code(&b)), (403, "forbidden"), "{b}");
    let (st, b) = create(
        &c,
        &base,
        Some(&alice),
        json!({"requested_name": "alice-1"}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    // And works as the bearer itself.
    let (st, b) = create(&c, &base, Some(&key), json!({"requested_name": "alice-2"})).await;
    assert_eq!(st, 200, "{b}");
    let (st, list) = call(
        &c,
        &base,
        "GET",
        "/tunnels/list",
        &[("authorization", &k)],
        None,
    )
    .await;
    assert_eq!(st, 200, "{list}");
    assert_eq!(names(&list), ["alice-1", "alice-2"]);
    assert!(
        list["tunnels"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["owner"] == "alice"),
        "{list}"
    );

    // Listed with its prefix and last use, never the secret.
    let (st, keys) = call(
        &c,
        &base,
        "GET",
        "/v1/api-keys",
        &[("authorization", &a)],
        None,
    )
    .await;
    assert_eq!(st, 200, "{keys}");
    let text = keys.to_string();
    assert!(!text.contains(&key[4..]), "the secret is listed: {text}");
    let listed = keys["api_keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} listed: {text}"))
        .clone();
    assert_eq!(listed["label"], "alice laptop");
    assert!(
        listed["last_used_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{listed}"
    );
    // Alice sees her own keys; another subject sees none of them.
    let (_, mine) = call(
        &c,
        &base,
        "GET",
        "/v1/api-keys",
        &[("authorization", &k)],
        None,
    )
    .await;
    assert_eq!(mine["api_keys"].as_array().unwrap().len(), 1, "{mine}");
    let bob = token(&c, &base, "bob", &["tunnels:read", "tunnels:write"]).await;
    let bb = auth(&bob);
    let (_, theirs) = call(
        &c,
        &base,
        "GET",
        "/v1/api-keys",
        &[("authorization", &bb)],
        None,
    )
    .await;
    assert_eq!(theirs["api_keys"], json!([]), "{theirs}");
    let (st, b) = call(
        &c,
        &base,
        "DELETE",
        &format!("/v1/api-keys/{id}"),
        &[("authorization", &bb)],
        None,
    )
    .await;
    assert_eq!((st, code(&b)), (404, "api_key_not_found"), "{b}");

    // Revoked: refused on /auth/token and as a bearer, with its own code and the fix.
    let (st, b) = call(
        &c,
        &base,
        "DELETE",
        &format!("/v1/api-keys/{id}"),
        &[("authorization", &a)],
        None,
    )
    .await;
    assert_eq!(st, 200, "{b}");
    assert!(b["revoked_at"].as_str().is_some(), "{b}");
    let (st, b) = call(
        &c,
        &base,
        "POST",
        "/auth/token",
        &[("authorization", &k)],
        None,
    )
    .await;
    assert_eq!((st, code(&b)), (401, "api_key_revoked"), "{b}");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("new one"),
        "{b}"
    );
    let (st, b) = call(
        &c,
        &base,
        "GET",
        "/tunnels/list",
        &[("authorization", &k)],
        None,
    )
    .await;
    assert_eq!((st, code(&b)), (401, "api_key_revoked"), "{b}");
    let (st, b) = create(&c, &base, Some(&key), json!({"requested_name": "alice-3"})).await;
    assert_eq!((st, code(&b)), (401, "api_key_revoked"), "{b}");

    // Expired: its own code. Unknown: bad_credential.
    let (short, _) = new_key(
        &c,
        &base,
        &admin,
        json!({"subject": "alice", "expires_in_seconds": 1}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let s = auth(&short);
    let (st, b) = call(
        &c,
        &base,
        "POST",
        "/auth/token",
        &[("authorization", &s)],
        None,
    )
    .await;
    assert_eq!((st, code(&b)), (401, "api_key_expired"), "{b}");
    let (st, b) = call(
        &c,
        &base,
        "GET",
        "/tunnels/list",
        &[("authorization", &s)],
        None,
    )
    .await;
    assert_eq!((st, code(&b)), (401, "api_key_expired"), "{b}");
    let fake = auth("nbk_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let (st, b) = call(
        &c,
        &base,
        "POST",
        "/auth/token",
        &[("authorization", &fake)],
        None,
    )
    .await;
    assert_eq!((st, code(&b)), (401, "bad_credential"), "{b}");

    // The process keeps serving, and no secret reached its logs.
    let (st, _) = call(&c, &base, "GET", "/healthz", &[], None).await;
    assert_eq!(st, 200);
    let logs = drain_logs(&mut ctl.proc).await;
    assert!(logs.contains("API key created"), "logs captured:\n{logs}");
    assert!(logs.contains("API key revoked"), "logs captured:\n{logs}");
    for secret in [&key[4..], &short[4..], BOOT] {
        assert!(!logs.contains(secret), "a secret in the logs:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_see_get_and_delete_only_their_own_tunnels_while_admin_acts_on_all() {
    let ctl = control();
    ctl.wait_ready().await;
    let (c, base) = (client(), ctl.url());
    let rw = ["tunnels:read", "tunnels:write"];
    let alice = token(&c, &base, "alice", &rw).await;
    let bob = token(&c, &base, "bob", &rw).await;
    let admin = token(&c, &base, "ops", &["admin"]).await;
    let (st, a) = create(
        &c,
        &base,
        Some(&alice),
        json!({"requested_name": "alice-app"}),
    )
    .await;
    assert_eq!(st, 200, "{a}");
    let (st, _) = create(&c, &base, Some(&bob), json!({"requested_name": "bob-app"})).await;
    assert_eq!(st, 200);
    let (st, _) = create(&c, &base, None, json!({"requested_name": "anon-app"})).await;
    assert_eq!(st, 200);

    let (ab, bb, admb) = (auth(&alice), auth(&bob), auth(&admin));
    let list = |h: String| {
        let (c, base) = (c.clone(), base.clone());
        async move {
            let (st, b) = call(
                &c,
                &base,
                "GET",
                "/tunnels/list",
                &[("authorization", &h)],
                None,
            )
            .await;
            assert_eq!(st, 200, "{b}");
            b
        }
    };
    assert_eq!(names(&list(bb.clone()).await), ["bob-app"]);
    assert_eq!(names(&list(ab.clone()).await), ["alice-app"]);
    let all = list(admb.clone()).await;
    assert_eq!(names(&all), ["alice-app", "anon-app", "bob-app"]);
    let owners: Vec<&Value> = all["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["owner"])
        .collect();
    assert_eq!(owners, [&json!("alice"), &Value::Null, &json!("bob")]);

    // Bob cannot get or delete Alice's tunnel (nor learn that it exists); she can.
    let alice_id = a["tunnel_id"].as_str().unwrap();
    for body in [
        json!({"tunnel_id": alice_id}),
        json!({"name": "alice-app"}),
        json!({"name": "anon-app"}),
    ] {
        let (st, b) = call(
            &c,
            &base,
            "POST",
            "/tunnels/delete",
            &[("authorization", &bb)],
            Some(body.clone()),
        )
        .await;
        assert_eq!((st, code(&b)), (404, "tunnel_not_found"), "{body}: {b}");
    }
    let (st, b) = call(
        &c,
        &base,
        "POST",
        "/tunnels/delete",
        &[("authorization", &bb)],
        Some(json!({"name": "no-such"})),
    )
    .await;
    assert_eq!((st, code(&b)), (404, "tunnel_not_found"), "{b}");
    assert_eq!(
        names(&list(admb.clone()).await).len(),
        3,
        "nothing was deleted"
    );

    // gRPC GetTunnel: the same rule, and the owner in the view.
    let mut g = netbore_proto::control::v1::control_service_client::ControlServiceClient::connect(
        format!("http://127.0.0.1:{}", ctl.grpc),
    )
    .await
    .unwrap();
    let get = |bearer: &str| {
        let mut r = tonic::Request::new(netbore_proto::control::v1::GetTunnelRequest {
            name: "alice-app".into(),
            ..Default::default()
        });
        r.metadata_mut()
            .insert("authorization", auth(bearer).parse().unwrap());
        r
    };
    let e = g.get_tunnel(get(&bob)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let t = g.get_tunnel(get(&alice)).await.unwrap().into_inner();
    assert_eq!((t.name.as_str(), t.owner.as_str()), ("alice-app", "alice"));

    // Admin acts on every owner's tunnel.
    let (st, b) = call(
        &c,
        &base,
        "POST",
        "/tunnels/delete",
        &[("authorization", &admb)],
        Some(json!({"name": "alice-app"})),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let (st, b) = call(
        &c,
        &base,
        "POST",
        "/tunnels/delete",
        &[("authorization", &admb)],
        Some(json!({"name": "anon-app"})),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(names(&list(admb).await), ["bob-app"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_limited_to_a_name_pattern_makes_and_acts_on_matching_names_only() {
    let ctl = control();
    ctl.wait_ready().await;
    let (c, base) = (client(), ctl.url());
    let admin = token(&c, &base, "ops", &["admin"]).await;
    let (key, _) = new_key(
        &c,
        &base,
        &admin,
        json!({"subject": "ci", "name_pattern": "ci-*", "scopes": ["tunnels:read", "tunnels:write"]}),
    )
    .await;
    let (st, b) = create(
        &c,
        &base,
        Some(&key),
        json!({"requested_name": "ci-build-1"}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    for body in [json!({"requested_name": "prod"}), json!({})] {
        let (st, b) = create(&c, &base, Some(&key), body.clone()).await;
        assert_eq!((st, code(&b)), (403, "name_not_allowed"), "{body}: {b}");
        assert!(
            b["error"]["message"].as_str().unwrap().contains("ci-*"),
            "{b}"
        );
    }
    // A token minted from the key carries the pattern.
    let k = auth(&key);
    let (st, t) = call(
        &c,
        &base,
        "POST",
        "/auth/token",
        &[("authorization", &k)],
        None,
    )
    .await;
    assert_eq!(st, 200, "{t}");
    let minted = t["token"].as_str().unwrap();
    let (st, b) = create(&c, &base, Some(minted), json!({"requested_name": "prod"})).await;
    assert_eq!((st, code(&b)), (403, "name_not_allowed"), "{b}");
    let (st, b) = create(
        &c,
        &base,
        Some(minted),
        json!({"requested_name": "ci-build-2"}),
    )
    .await;
    assert_eq!(st, 200, "{b}");

    // The same owner's tunnel outside the pattern: not listed, and refused by name.
    let ci = token(&c, &base, "ci", &["tunnels:read", "tunnels:write"]).await;
    let (st, _) = create(&c, &base, Some(&ci), json!({"requested_name": "legacy"})).await;
    assert_eq!(st, 200);
    let (_, list) = call(
        &c,
        &base,
        "GET",
        "/tunnels/list",
        &[("authorization", &k)],
        None,
    )
    .await;
    assert_eq!(names(&list), ["ci-build-1", "ci-build-2"]);
    let (st, b) = call(
        &c,
        &base,
        "POST",
        "/tunnels/delete",
        &[("authorization", &k)],
        Some(json!({"name": "legacy"})),
    )
    .await;
    assert_eq!((st, code(&b)), (403, "name_not_allowed"), "{b}");

    // A key's maker holds what it grants, for itself only.
    let cb = auth(&ci);
    for (body, want) in [
        (json!({"scopes": ["names:claim"]}), "forbidden"),
        (json!({"subject": "someone-else"}), "forbidden"),
        (
            json!({"name_pattern": "Bad*Pattern"}),
            "invalid_name_pattern",
        ),
    ] {
        let (st, b) = call(
            &c,
            &base,
            "POST",
            "/v1/api-keys",
            &[("authorization", &cb)],
            Some(body.clone()),
        )
        .await;
        assert_eq!(code(&b), want, "{body}: {b}");
        assert!(st == 403 || st == 400, "{body}: {st} {b}");
    }
    let (st, b) = call(
        &c,
        &base,
        "POST",
        "/v1/api-keys",
        &[("authorization", &cb)],
        Some(json!({"label": "own"})),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["api_key"]["owner"], "ci");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_idempotency_key_across_two_replicas_makes_one_tunnel() {
    let pg = PostgresServer::start();
    let redis = RedisServer::start();
    let args = ["--edge", EDGE];
    let env = [("NETBORE_BOOTSTRAP_TOKEN", BOOT)];
    let a = ControlProc::spawn_replica(&pg.url_with_password(), &redis.url(), &args, &env);
    let b = ControlProc::spawn_replica(&pg.url_with_password(), &redis.url(), &args, &env);
    a.wait_ready().await;
    b.wait_ready().await;
    let c = client();
    let admin = token(&c, &a.url(), "ops", &["admin"]).await;
    let (key, key_id) = new_key(&c, &a.url(), &admin, json!({"subject": "deployer"})).await;

    // 100 concurrent creations, half on each replica, one key, one body.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let base = if i % 2 == 0 { a.url() } else { b.url() };
        let (c, k) = (c.clone(), auth(&key));
        tasks.push(tokio::spawn(async move {
            call(
                &c,
                &base,
                "POST",
                "/tunnels/create",
                &[("authorization", &k), ("idempotency-key", "deploy-42")],
                Some(json!({"region_hint": "local"})),
            )
            .await
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        let (st, body) = t.await.unwrap();
        assert_eq!(st, 200, "{body}");
        ids.insert(body["tunnel_id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1, "one tunnel for one idempotency key: {ids:?}");
    let (_, list) = call(
        &c,
        &b.url(),
        "GET",
        "/tunnels/list",
        &[("authorization", &auth(&key))],
        None,
    )
    .await;
    assert_eq!(list["tunnels"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["tunnels"][0]["owner"], "deployer");

    // Another body with the key: 422; another key: another tunnel.
    let k = auth(&key);
    let (st, body) = call(
        &c,
        &b.url(),
        "POST",
        "/tunnels/create",
        &[("authorization", &k), ("idempotency-key", "deploy-42")],
        Some(json!({"requested_name": "something-else"})),
    )
    .await;
    assert_eq!((st, code(&body)), (422, "idempotency_key_reused"), "{body}");
    let (st, body) = call(
        &c,
        &a.url(),
        "POST",
        "/tunnels/create",
        &[("authorization", &k), ("idempotency-key", "deploy-43")],
        Some(json!({"region_hint": "local"})),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert!(!ids.contains(body["tunnel_id"].as_str().unwrap()));
    // Without a token a key has no owner to belong to.
    let (st, body) = call(
        &c,
        &a.url(),
        "POST",
        "/tunnels/create",
        &[("idempotency-key", "deploy-44")],
        Some(json!({})),
    )
    .await;
    assert_eq!((st, code(&body)), (401, "unauthorized"), "{body}");

    // Revoked on one replica: refused on the other within the cache's lifetime.
    let (st, _) = call(
        &c,
        &a.url(),
        "DELETE",
        &format!("/v1/api-keys/{key_id}"),
        &[("authorization", &auth(&admin))],
        None,
    )
    .await;
    assert_eq!(st, 200);
    tokio::time::sleep(netbore_control::api_keys::API_KEY_CACHE_TTL + Duration::from_millis(200))
        .await;
    let (st, body) = call(
        &c,
        &b.url(),
        "GET",
        "/tunnels/list",
        &[("authorization", &k)],
        None,
    )
    .await;
    assert_eq!((st, code(&body)), (401, "api_key_revoked"), "{body}");

    // The audit trail: one tunnel.create per tunnel, the key's life, no secret.
    let audit = pg.psql("SELECT actor, action, target, detail FROM audit_events ORDER BY id");
    let count = |action: &str| audit.lines().filter(|l| l.contains(action)).count();
    assert_eq!(count("tunnel.create"), 2, "{audit}");
    assert_eq!(count("api_key.create"), 1, "{audit}");
    assert_eq!(count("api_key.revoke"), 1, "{audit}");
    assert!(audit.contains("deployer"), "{audit}");
    assert!(
        !audit.contains(&key[4..]),
        "a secret in the audit trail: {audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_creates_lists_and_revokes_api_keys() {
    let ctl = control();
    ctl.wait_ready().await;
    let (c, base) = (client(), ctl.url());
    let admin = token(&c, &base, "ops", &["admin"]).await;
    let addr = format!("127.0.0.1:{}", ctl.grpc);
    let h = format!("authorization: Bearer {admin}");
    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            grpcurl(&a)
        })
        .await
        .unwrap()
    };
    let rpc = |m: &str| format!("netbore.control.v1.ControlService/{m}");
    let (ok, out) = run(vec![
        "-plaintext".into(),
        "-H".into(),
        h.clone(),
        "-d".into(),
        r#"{"subject":"grpc-user","label":"from grpcurl","scopes":["tunnels:read"]}"#.into(),
        addr.clone(),
        rpc("CreateApiKey"),
    ])
    .await;
    assert!(ok, "{out}");
    let made: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let key = made["key"].as_str().unwrap().to_string();
    let id = made["apiKey"]["id"].as_str().unwrap().to_string();
    assert!(key.starts_with("nbk_"), "{out}");

    let (ok, out) = run(vec![
        "-plaintext".into(),
        "-H".into(),
        h.clone(),
        addr.clone(),
        rpc("ListApiKeys"),
    ])
    .await;
    assert!(
        ok && out.contains(&id) && out.contains("from grpcurl"),
        "{out}"
    );
    assert!(!out.contains(&key[4..]), "the secret is listed: {out}");

    // The key itself authenticates gRPC calls, until it is revoked.
    let hk = format!("authorization: Bearer {key}");
    let (ok, out) = run(vec![
        "-plaintext".into(),
        "-H".into(),
        hk.clone(),
        addr.clone(),
        rpc("ListTunnels"),
    ])
    .await;
    assert!(ok, "{out}");
    let (ok, out) = run(vec![
        "-plaintext".into(),
        "-H".into(),
        h.clone(),
        "-d".into(),
        format!(r#"{{"id":"{id}"}}"#),
        addr.clone(),
        rpc("RevokeApiKey"),
    ])
    .await;
    assert!(ok && out.contains("revokedAt"), "{out}");
    let (ok, out) = run(vec![
        "-plaintext".into(),
        "-H".into(),
        hk,
        addr.clone(),
        rpc("ListTunnels"),
    ])
    .await;
    assert!(!ok && out.contains("api_key_revoked"), "{out}");
}
