//! Control replicas sharing one real `redis-server`: the store contract against both the
//! memory and the Redis store, replicas in this process (deletions and edge reports
//! across replicas), and real `netbore-control` processes (one winner of 1,000 racing
//! claims, create on one and delete on another, a Redis outage and its recovery).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use netbore_control::api::{CreateTunnelRequest, DeleteTunnelRequest};
use netbore_control::redis_store::RedisStore;
use netbore_control::store::{Claim, ControlStore, HELD_UNTIL_DELETED, MemoryStore, TunnelRecord};
use netbore_control::{Control, ControlConfig, EdgeEntry, EdgeStatus};
use netbore_testkit::origin::Origin;
use netbore_testkit::redis::RedisServer;
use netbore_testkit::{ControlProc, Proc, Viewer, eventually, free_port};
use netbore_tokens::{KeySet, now_unix};
use serde_json::{Value, json};

const BOOT: &str = "test-bootstrap-credential";
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// The store contract, against both stores. Times are offsets from the wall clock because
// Redis expires keys by it.

/// One test's stores: the memory store and a Redis store on its own redis-server.
async fn stores() -> (Vec<(&'static str, Box<dyn ControlStore>)>, RedisServer) {
    let redis = RedisServer::start();
    let r = RedisStore::open(&redis.url()).unwrap();
    assert!(r.wait_ready(WAIT).await, "the Redis store connects");
    (
        vec![
            (
                "memory",
                Box::new(MemoryStore::default()) as Box<dyn ControlStore>,
            ),
            ("redis", Box::new(r)),
        ],
        redis,
    )
}

async fn won(s: &dyn ControlStore, name: &str, id: &str, now: u64, exp: u64, force: bool) -> bool {
    matches!(
        s.claim(name, id, now, exp, force).await.unwrap(),
        Claim::Won(_)
    )
}

#[tokio::test]
async fn contract_claims_have_one_winner_extend_expire_and_yield_to_force() {
    let (stores, _redis) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        assert!(won(s, "a", "t1", b, b + 100, false).await, "{kind}");
        assert!(!won(s, "a", "t2", b + 1, b + 100, false).await, "{kind}");
        // The holder extends its hold, never shortens it.
        assert!(
            matches!(s.claim("a", "t1", b + 2, b + 200, false).await.unwrap(), Claim::Won(r) if r.expires_at == b + 200),
            "{kind}"
        );
        assert!(
            matches!(s.claim("a", "t1", b + 3, b + 150, false).await.unwrap(), Claim::Won(r) if r.expires_at == b + 200 && r.created_at == b),
            "{kind}"
        );
        // A refusal names the holder.
        assert!(
            matches!(s.claim("a", "t2", b + 3, b + 150, false).await.unwrap(), Claim::Taken(r) if r.tunnel_id == "t1"),
            "{kind}"
        );
        // After expiry, anyone.
        assert!(won(s, "a", "t2", b + 201, b + 300, false).await, "{kind}");
        // An administrator's claim takes it.
        assert!(won(s, "a", "t3", b + 202, b + 300, true).await, "{kind}");
        assert_eq!(
            s.by_name("a", b + 203).await.unwrap().unwrap().tunnel_id,
            "t3",
            "{kind}"
        );
        assert!(s.by_id("t2", b + 203).await.unwrap().is_none(), "{kind}");
        assert_eq!(
            s.by_id("t3", b + 203).await.unwrap().unwrap().name,
            "a",
            "{kind}"
        );
        // Expired records are not returned.
        assert!(s.by_name("a", b + 300).await.unwrap().is_none(), "{kind}");
        assert!(s.by_id("t3", b + 300).await.unwrap().is_none(), "{kind}");
    }
}

#[tokio::test]
async fn contract_removal_is_compare_and_delete() {
    let (stores, _redis) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        assert!(won(s, "n", "old", b, b + 100, false).await);
        assert!(won(s, "n", "new", b + 1, b + 100, true).await);
        // The stale tunnel's removal leaves the newer holder alone.
        assert!(s.remove("old").await.unwrap().is_none(), "{kind}");
        assert_eq!(
            s.by_name("n", b + 2).await.unwrap().unwrap().tunnel_id,
            "new",
            "{kind}"
        );
        let r = s.remove("new").await.unwrap().unwrap();
        assert_eq!(
            (r.name.as_str(), r.tunnel_id.as_str()),
            ("n", "new"),
            "{kind}"
        );
        assert!(s.by_name("n", b + 2).await.unwrap().is_none(), "{kind}");
        assert!(s.remove("new").await.unwrap().is_none(), "{kind}");
        // A freed name is free.
        assert!(won(s, "n", "third", b + 3, b + 100, false).await, "{kind}");
    }
}

#[tokio::test]
async fn contract_a_tunnel_holds_one_name() {
    let (stores, _redis) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        assert!(won(s, "first", "t", b, b + 100, false).await);
        assert!(won(s, "second", "t", b, b + 100, false).await);
        assert!(s.by_name("first", b).await.unwrap().is_none(), "{kind}");
        assert_eq!(
            s.by_id("t", b).await.unwrap().unwrap().name,
            "second",
            "{kind}"
        );
        let names: Vec<String> = s
            .list("", None, 10, b)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["second"], "{kind}");
    }
}

#[tokio::test]
async fn contract_concurrent_claims_of_one_name_have_exactly_one_winner() {
    let (stores, _redis) = stores().await;
    let b = now_unix();
    for (kind, s) in stores {
        let s: Arc<dyn ControlStore> = Arc::from(s);
        let mut tasks = Vec::new();
        for i in 0..64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                won(s.as_ref(), "contested", &format!("t{i}"), b, b + 100, false).await
            }));
        }
        let mut winners = 0;
        for t in tasks {
            winners += usize::from(t.await.unwrap());
        }
        assert_eq!(winners, 1, "{kind}");
    }
}

#[tokio::test]
async fn contract_list_pages_by_name_within_the_prefix_and_skips_expired() {
    let (stores, _redis) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        for n in ["b", "a", "c", "ab", "ba"] {
            s.claim(n, &format!("t-{n}"), b, b + 100, false)
                .await
                .unwrap();
        }
        s.claim("aa", "t-short", b, b + 10, false).await.unwrap();
        let names = |v: Vec<TunnelRecord>| v.into_iter().map(|r| r.name).collect::<Vec<_>>();
        assert_eq!(
            names(s.list("", None, 2, b + 1).await.unwrap()),
            ["a", "aa"],
            "{kind}"
        );
        assert_eq!(
            names(s.list("", None, 2, b + 20).await.unwrap()),
            ["a", "ab"],
            "{kind}"
        );
        assert_eq!(
            names(s.list("", Some("ab"), 2, b + 20).await.unwrap()),
            ["b", "ba"],
            "{kind}"
        );
        assert_eq!(
            names(s.list("a", None, 10, b + 20).await.unwrap()),
            ["a", "ab"],
            "{kind}"
        );
        assert_eq!(
            names(s.list("b", Some("b"), 10, b + 20).await.unwrap()),
            ["ba"],
            "{kind}"
        );
        // A cursor before the prefix starts at the prefix.
        assert_eq!(
            names(s.list("b", Some("a"), 10, b + 20).await.unwrap()),
            ["b", "ba"],
            "{kind}"
        );
        assert!(
            s.list("", None, 10, b + 100).await.unwrap().is_empty(),
            "{kind}"
        );
    }
}

#[tokio::test]
async fn contract_list_walks_many_names_with_a_cursor() {
    let (stores, _redis) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        for i in 0..450 {
            s.claim(&format!("p-{i:04}"), &format!("t{i}"), b, b + 100, false)
                .await
                .unwrap();
            // Every other name of a second prefix has expired (by `now`).
            s.claim(
                &format!("q-{i:04}"),
                &format!("u{i}"),
                b,
                b + 10 + 100 * (i % 2),
                false,
            )
            .await
            .unwrap();
        }
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = s.list("p-", after.as_deref(), 100, b + 20).await.unwrap();
            if page.is_empty() {
                break;
            }
            after = Some(page.last().unwrap().name.clone());
            seen.extend(page.into_iter().map(|r| r.name));
        }
        assert_eq!(seen.len(), 450, "{kind}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{kind}: ordered");
        let live_q = s.list("q-", None, 500, b + 20).await.unwrap();
        assert_eq!(live_q.len(), 225, "{kind}");
    }
}

#[tokio::test]
async fn contract_tombstones_last_until_their_time_and_never_shorten() {
    let (stores, _redis) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        assert!(!s.is_revoked("t", b).await.unwrap(), "{kind}");
        s.revoke("t", b + 100).await.unwrap();
        s.revoke("t", b + 50).await.unwrap();
        assert!(s.is_revoked("t", b + 99).await.unwrap(), "{kind}");
        assert!(!s.is_revoked("t", b + 100).await.unwrap(), "{kind}");
        assert!(!s.is_revoked("other", b).await.unwrap(), "{kind}");
    }
}

#[tokio::test]
async fn contract_refresh_extends_live_holds_only_and_a_named_hold_never_lapses() {
    let (stores, redis) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        let p = |x: &str| format!("{kind}-{x}");
        assert!(
            won(s, &p("live"), &p("t1"), b, b + 10, false).await,
            "{kind}"
        );
        assert!(
            won(s, &p("lapsed"), &p("t2"), b, b + 5, false).await,
            "{kind}"
        );
        assert!(
            won(s, &p("named"), &p("t3"), b, HELD_UNTIL_DELETED, false).await,
            "{kind}"
        );
        let ids = [p("t1"), p("t2"), p("t3"), p("t-unknown")];
        s.refresh(&ids, b + 6, b + 100).await.unwrap();
        let exp = |r: Option<TunnelRecord>| r.map(|r| r.expires_at);
        assert_eq!(
            exp(s.by_id(&p("t1"), b + 6).await.unwrap()),
            Some(b + 100),
            "{kind}"
        );
        // A late report does not bring back a name that lapsed.
        assert_eq!(exp(s.by_id(&p("t2"), b + 6).await.unwrap()), None, "{kind}");
        // Nor shortens a hold.
        s.refresh(&ids, b + 7, b + 50).await.unwrap();
        assert_eq!(
            exp(s.by_id(&p("t1"), b + 7).await.unwrap()),
            Some(b + 100),
            "{kind}"
        );
        // A named hold stays exact through refreshes and reclaims, and never lapses.
        assert!(
            won(s, &p("named"), &p("t3"), b + 8, b + 60, false).await,
            "{kind}"
        );
        assert_eq!(
            exp(s.by_name(&p("named"), u64::MAX / 4).await.unwrap()),
            Some(HELD_UNTIL_DELETED),
            "{kind}"
        );
        assert!(
            !won(s, &p("named"), &p("t4"), b + 9, b + 60, false).await,
            "{kind}"
        );
    }
    // In Redis the named hold is kept without an expiry, the refreshed one with it.
    assert_eq!(
        redis_cli(&redis, &["TTL", "netbore:control:name:redis-named"]),
        "-1"
    );
    assert_eq!(
        redis_cli(&redis, &["TTL", "netbore:control:tunnel:redis-t3"]),
        "-1"
    );
    let ttl: u64 = redis_cli(&redis, &["TTL", "netbore:control:name:redis-live"])
        .parse()
        .unwrap();
    assert!((90..=100).contains(&ttl), "refreshed TTL {ttl}");
}

fn redis_cli(redis: &RedisServer, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli on PATH");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn redis_keys_carry_the_prefix_and_expire_with_the_record() {
    let redis = RedisServer::start();
    let s = RedisStore::open(&redis.url()).unwrap();
    assert!(s.wait_ready(WAIT).await);
    let b = now_unix();
    s.claim("ttl", "t1", b, b + 1000, false).await.unwrap();
    s.revoke("gone", b + 500).await.unwrap();
    let ttl: u64 = redis_cli(&redis, &["TTL", "netbore:control:name:ttl"])
        .parse()
        .unwrap();
    assert!((990..=1000).contains(&ttl), "name TTL {ttl}");
    let ttl: u64 = redis_cli(&redis, &["TTL", "netbore:control:tunnel:t1"])
        .parse()
        .unwrap();
    assert!((990..=1000).contains(&ttl), "tunnel TTL {ttl}");
    let ttl: u64 = redis_cli(&redis, &["TTL", "netbore:control:revoked:gone"])
        .parse()
        .unwrap();
    assert!((490..=500).contains(&ttl), "tombstone TTL {ttl}");
    let keys = redis_cli(&redis, &["KEYS", "*"]);
    assert!(
        keys.lines().all(|k| k.starts_with("netbore:control:")),
        "{keys}"
    );
}

// ---------------------------------------------------------------------------------------
// Two replicas in this process on one Redis.

fn config() -> ControlConfig {
    ControlConfig {
        edges: vec![EdgeEntry {
            edge_id: "configured".into(),
            edge_url: "ws://127.0.0.1:9/v1/connect".into(),
            region: "local".into(),
        }],
        ..ControlConfig::default()
    }
}

async fn replica(redis: &RedisServer) -> Control {
    let store = RedisStore::open(&redis.url()).unwrap();
    assert!(store.wait_ready(WAIT).await);
    Control::with_store(config(), KeySet::generate(), Box::new(store))
}

#[tokio::test]
async fn a_deletion_reaches_every_replicas_edge_links_once() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis).await, replica(&redis).await);
    let mut on_a = a.subscribe_deletions();
    let mut on_b = b.subscribe_deletions();
    let t = netbore_control::ops::create(&a, None, CreateTunnelRequest::default())
        .await
        .unwrap();
    netbore_control::ops::delete(
        &a,
        None,
        DeleteTunnelRequest {
            recreate_token: Some(t.recreate_token.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let got = tokio::time::timeout(WAIT, on_b.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, t.tunnel_id, "replica B forwards A's deletion");
    let got = tokio::time::timeout(WAIT, on_a.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, t.tunnel_id);
    // A does not hear its own deletion a second time through Redis.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), on_a.recv())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn deletions_flow_again_after_redis_comes_back() {
    let mut redis = RedisServer::start();
    let (a, b) = (replica(&redis).await, replica(&redis).await);
    let mut on_b = b.subscribe_deletions();
    redis.restart();
    // Both replicas reconnect and resubscribe by themselves (the restarted server starts
    // with no subscribers, so it counts only new subscriptions).
    let resubscribed = eventually(WAIT, || async {
        (redis_cli(&redis, &["PUBSUB", "NUMSUB", "netbore:control:deleted"]).ends_with('2'))
            .then_some(())
    })
    .await;
    assert!(resubscribed.is_some(), "both replicas resubscribe");
    for c in [&a, &b] {
        let back = eventually(WAIT, || async { c.ready().await.ok() }).await;
        assert!(back.is_some(), "ready again after Redis returns");
    }
    let t = netbore_control::ops::create(&a, None, CreateTunnelRequest::default())
        .await
        .unwrap();
    netbore_control::ops::delete(
        &a,
        None,
        DeleteTunnelRequest {
            recreate_token: Some(t.recreate_token.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let got = tokio::time::timeout(WAIT, on_b.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, t.tunnel_id);
}

fn report(id: &str, connections: u64, draining: bool) -> EdgeStatus {
    EdgeStatus {
        entry: EdgeEntry {
            edge_id: id.into(),
            edge_url: format!("ws://{id}.test/v1/connect"),
            region: "eu".into(),
        },
        tunnels: 1,
        connections,
        streams: 0,
        draining,
        last_report: now_unix(),
        connected: true,
    }
}

fn ids(v: &[EdgeEntry]) -> Vec<&str> {
    v.iter().map(|e| e.edge_id.as_str()).collect()
}

#[tokio::test]
async fn every_replica_hands_out_edges_linked_to_any_replica() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis).await, replica(&redis).await);
    a.record_edge_report(report("busy", 50, false)).await;
    b.record_edge_report(report("idle", 2, false)).await;
    // Configured first, then least loaded, whichever replica the edge reports to.
    for c in [&a, &b] {
        assert_eq!(
            ids(&c.candidates_now().await.unwrap()),
            ["configured", "idle", "busy"]
        );
        assert_eq!(c.edge_statuses_now().await.unwrap().len(), 3);
    }
    // A draining edge leaves every replica's candidates.
    a.record_edge_report(report("busy", 50, true)).await;
    assert_eq!(
        ids(&b.candidates_now().await.unwrap()),
        ["configured", "idle"]
    );
    // A replica the edge is not linked to cannot mark its link closed.
    a.edge_link_closed("idle").await;
    assert!(ids(&a.candidates_now().await.unwrap()).contains(&"idle"));
    b.edge_link_closed("idle").await;
    assert_eq!(ids(&a.candidates_now().await.unwrap()), ["configured"]);
    // The region hint still comes first.
    a.record_edge_report(report("idle", 2, false)).await;
    let t = netbore_control::ops::create(
        &b,
        None,
        CreateTunnelRequest {
            region_hint: Some("eu".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(t.candidates[0].edge_id, "idle");
}

#[tokio::test]
async fn control_starts_not_ready_while_redis_is_down_and_says_why() {
    let port = free_port();
    let store = RedisStore::open(&format!("redis://:hunter2@127.0.0.1:{port}")).unwrap();
    let c = Control::with_store(config(), KeySet::generate(), Box::new(store));
    let e = c.ready().await.unwrap_err().to_string();
    assert!(e.contains("Redis") && e.contains("unreachable"), "{e}");
    assert!(!e.contains("hunter2"), "the password never shows: {e}");
    let e = netbore_control::ops::create(&c, None, CreateTunnelRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (e.status.as_u16(), e.code.as_str()),
        (503, "store_unavailable")
    );
    assert!(e.message.contains("retry"), "{}", e.message);
    assert!(RedisStore::open("http://nope").is_err());
}

#[tokio::test]
async fn a_hung_redis_is_an_error_within_seconds_not_a_hang() {
    let redis = RedisServer::start();
    let c = replica(&redis).await;
    redis.pause();
    let start = Instant::now();
    let e = c.ready().await.unwrap_err().to_string();
    assert!(e.contains("Redis") && e.contains("unreachable"), "{e}");
    let e = netbore_control::ops::create(&c, None, CreateTunnelRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code, "store_unavailable");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(6), "two calls took {took:?}");
    redis.resume();
    let back = eventually(WAIT, || async { c.ready().await.ok() }).await;
    assert!(back.is_some(), "ready again once Redis answers");
    netbore_control::ops::create(&c, None, CreateTunnelRequest::default())
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// Real control processes.

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>()
}

async fn call(
    c: &HttpClient,
    base: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("content-type", "application/json");
    if let Some(b) = bearer {
        req = req.header("authorization", format!("Bearer {b}"));
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

/// A signing key both replicas load, as replicas of one deployment do.
fn signing_key(dir: &std::path::Path) -> String {
    let path = dir.join("signing.pem");
    let st = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&path)
        .status()
        .expect("openssl on PATH");
    assert!(st.success());
    path.to_str().unwrap().to_string()
}

/// Two control processes on `redis`, sharing a signing key and bootstrap credential.
fn replicas(redis: &RedisServer, key: &str, extra: &[&str]) -> (ControlProc, ControlProc) {
    let mut args = vec![
        "--signing-key",
        key,
        "--edge",
        "id=e1,url=ws://127.0.0.1:9/v1/connect,region=local",
    ];
    args.extend_from_slice(extra);
    let env = [("NETBORE_BOOTSTRAP_TOKEN", BOOT)];
    (
        ControlProc::spawn_with_redis(&redis.url(), &args, &env),
        ControlProc::spawn_with_redis(&redis.url(), &args, &env),
    )
}

async fn wait_ready(c: &HttpClient, base: &str) {
    let ok = eventually(WAIT, || async {
        let r = c
            .get(format!("{base}/readyz").parse().unwrap())
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(ok.is_some(), "{base} becomes ready");
}

async fn admin(c: &HttpClient, base: &str) -> String {
    let (st, b) = call(
        c,
        base,
        "POST",
        "/auth/token",
        Some(BOOT),
        Some(json!({"scopes": ["admin"]})),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    b["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_claims_across_two_replicas_have_one_winner() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = signing_key(dir.path());
    // A thousand anonymous creations from one address: the per-address limit (tested in
    // creation_limits.rs) is off, so the race for the name is what is measured.
    let (a, b) = replicas(&redis, &key, &["--anonymous-create-per-minute", "0"]);
    let c = client();
    wait_ready(&c, &a.url()).await;
    wait_ready(&c, &b.url()).await;

    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let base = if i % 2 == 0 { a.url() } else { b.url() };
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            call(
                &c,
                &base,
                "POST",
                "/tunnels/create",
                None,
                Some(json!({"requested_name": "contested"})),
            )
            .await
        }));
    }
    let (mut won, mut taken, mut other) = (Vec::new(), 0, Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            (200, b) => won.push(b),
            (409, b) if b["error"]["code"] == "name_taken" => taken += 1,
            x => other.push(x),
        }
    }
    let took = start.elapsed();
    eprintln!(
        "1000 claims over 2 replicas: {} winner, {taken} name_taken, {} other, took {took:?}",
        won.len(),
        other.len()
    );
    assert!(other.is_empty(), "{other:?}");
    assert_eq!((won.len(), taken), (1, 999));
    // Both replicas agree on the holder.
    let tok = admin(&c, &a.url()).await;
    for base in [a.url(), b.url()] {
        let (st, l) = call(
            &c,
            &base,
            "GET",
            "/tunnels/list?prefix=contested",
            Some(&tok),
            None,
        )
        .await;
        assert_eq!(st, 200, "{l}");
        assert_eq!(l["tunnels"].as_array().unwrap().len(), 1);
        assert_eq!(l["tunnels"][0]["tunnel_id"], won[0]["tunnel_id"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_created_on_one_replica_is_listed_and_deleted_on_another() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = signing_key(dir.path());
    let (a, b) = replicas(&redis, &key, &[]);
    let c = client();
    wait_ready(&c, &a.url()).await;
    wait_ready(&c, &b.url()).await;

    let (st, t) = call(
        &c,
        &a.url(),
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"requested_name": "shared-demo"})),
    )
    .await;
    assert_eq!(st, 200, "{t}");
    let tok = admin(&c, &b.url()).await;
    let (st, l) = call(
        &c,
        &b.url(),
        "GET",
        "/tunnels/list?prefix=shared",
        Some(&tok),
        None,
    )
    .await;
    assert_eq!(st, 200, "{l}");
    assert_eq!(l["tunnels"][0]["name"], "shared-demo");
    assert_eq!(l["tunnels"][0]["tunnel_id"], t["tunnel_id"]);
    // B refuses the name to others, as A would.
    let (st, e) = call(
        &c,
        &b.url(),
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"requested_name": "shared-demo"})),
    )
    .await;
    assert_eq!((st, e["error"]["code"].as_str()), (409, Some("name_taken")));

    let (st, d) = call(
        &c,
        &b.url(),
        "POST",
        "/tunnels/delete",
        Some(&tok),
        Some(json!({"name": "shared-demo"})),
    )
    .await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["deleted"], t["tunnel_id"]);
    let (st, e) = call(
        &c,
        &a.url(),
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"recreate_token": t["recreate_token"]})),
    )
    .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (410, Some("tunnel_deleted")),
        "{e}"
    );
    let (_, l) = call(
        &c,
        &a.url(),
        "GET",
        "/tunnels/list?prefix=shared",
        Some(&tok),
        None,
    )
    .await;
    assert!(l["tunnels"].as_array().unwrap().is_empty(), "{l}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_makes_control_unready_and_it_recovers_by_itself() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = signing_key(dir.path());
    let (a, _b) = replicas(&redis, &key, &[]);
    let c = client();
    wait_ready(&c, &a.url()).await;
    let (st, _) = call(&c, &a.url(), "POST", "/tunnels/create", None, None).await;
    assert_eq!(st, 200);

    redis.stop();
    let start = Instant::now();
    let unready = eventually(WAIT, || async {
        let (st, b) = call(&c, &a.url(), "GET", "/readyz", None, None).await;
        (st == 503).then_some(b)
    })
    .await
    .expect("/readyz turns 503");
    let msg = unready["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("Redis") && msg.contains("unreachable"),
        "{msg}"
    );
    let (st, e) = call(&c, &a.url(), "POST", "/tunnels/create", None, None).await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (503, Some("store_unavailable")),
        "{e}"
    );
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("Redis") && msg.contains("unreachable") && msg.contains("retry"),
        "{msg}"
    );
    let noticed = start.elapsed();
    assert!(noticed < Duration::from_secs(5), "took {noticed:?}");
    // Deleting needs Redis too; issuing a management token does not.
    let tok = admin(&c, &a.url()).await;
    let (st, e) = call(
        &c,
        &a.url(),
        "POST",
        "/tunnels/delete",
        Some(&tok),
        Some(json!({"name": "anything"})),
    )
    .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (503, Some("store_unavailable")),
        "{e}"
    );
    // gRPC readiness follows.
    let grpc_not_serving = eventually(WAIT, || async {
        let out = std::process::Command::new("grpcurl")
            .args(["-plaintext", "-d", r#"{"service":"readiness"}"#])
            .arg(format!("127.0.0.1:{}", a.grpc))
            .arg("grpc.health.v1.Health/Check")
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains("NOT_SERVING")
            .then_some(())
    })
    .await;
    assert!(grpc_not_serving.is_some(), "gRPC readiness NOT_SERVING");

    redis.restart();
    let start = Instant::now();
    wait_ready(&c, &a.url()).await;
    let (st, t) = call(&c, &a.url(), "POST", "/tunnels/create", None, None).await;
    assert_eq!(st, 200, "{t}");
    eprintln!(
        "Redis down: 503 within {noticed:?}; back: ready and creating within {:?}",
        start.elapsed()
    );
    let out = std::process::Command::new("grpcurl")
        .args(["-plaintext", "-d", r#"{"service":"readiness"}"#])
        .arg(format!("127.0.0.1:{}", a.grpc))
        .arg("grpc.health.v1.Health/Check")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.contains("SERVING") && !out.contains("NOT_SERVING"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_through_one_replica_disconnects_an_agent_on_an_edge_linked_to_another() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = signing_key(dir.path());
    let (public, agents) = (free_port(), free_port());
    let template = format!("http://{{name}}.localhost:{public}");
    let (a, b) = replicas(&redis, &key, &["--public-url-template", &template]);
    let c = client();
    wait_ready(&c, &a.url()).await;
    wait_ready(&c, &b.url()).await;
    // The edge links to B only.
    let _edge = Proc::spawn(
        "netbore-edge",
        &[
            "--public-addr",
            &format!("127.0.0.1:{public}"),
            "--agent-addr",
            &format!("127.0.0.1:{agents}"),
            "--control-url",
            &b.url(),
            "--control-grpc",
            &format!("http://127.0.0.1:{}", b.grpc),
        ],
        &[("RUST_LOG", "warn")],
    );
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    // The agent creates its tunnel through A, which hands out the edge B reported.
    let mut agent = Proc::spawn(
        "netbore",
        &[
            "http",
            &origin.url(),
            "--control",
            &a.url(),
            "--state-dir",
            state.path().to_str().unwrap(),
            "--json",
        ],
        &[("RUST_LOG", "warn")],
    );
    let live = loop {
        let l = agent.line(Duration::from_secs(30)).await;
        let v: Value = serde_json::from_str(&l).unwrap();
        if v["event"] == "live" {
            break v;
        }
    };
    let host = live["url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    let v = Viewer::new(([127, 0, 0, 1], public).into());
    assert_eq!(v.get(&host, "/hello").await.status, 200);

    let tok = admin(&c, &a.url()).await;
    let (st, d) = call(
        &c,
        &a.url(),
        "POST",
        "/tunnels/delete",
        Some(&tok),
        Some(json!({"tunnel_id": live["tunnel_id"]})),
    )
    .await;
    assert_eq!(st, 200, "{d}");
    let exit = tokio::time::timeout(WAIT, agent.child.wait())
        .await
        .expect("the agent of a deleted tunnel stops within seconds")
        .unwrap();
    assert_eq!(exit.code(), Some(2));
}
