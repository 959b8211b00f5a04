//! Control replicas sharing one real PostgreSQL (durable state) and one real
//! `redis-server` (live state): replicas in this process (deletions and edge reports
//! across replicas), and real `netbore-control` processes (one winner of 1,000 racing
//! claims, create on one and delete on another, a Redis outage and its recovery, a
//! Redis flush that loses nothing durable). The store contract itself is in
//! `control_store.rs`.

use std::time::{Duration, Instant};

use netbore_control::api::{CreateTunnelRequest, DeleteTunnelRequest};
use netbore_control::redis_store::RedisLive;
use netbore_control::sql_store::SqlStore;
use netbore_control::{Control, ControlConfig, EdgeEntry, EdgeStatus};
use netbore_testkit::origin::Origin;
use netbore_testkit::postgres::PostgresServer;
use netbore_testkit::redis::RedisServer;
use netbore_testkit::signing_key;
use netbore_testkit::{ControlProc, Proc, Viewer, eventually, free_port};
use netbore_testkit::{HttpClient, json_call as call, json_client as client};
use netbore_tokens::{KeySet, Secret, now_unix};
use serde_json::{Value, json};

const BOOT: &str = "test-bootstrap-credential";
const WAIT: Duration = Duration::from_secs(10);

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

/// A replica in this process: durable state in `pg`, live state in `redis`.
async fn replica(pg: &PostgresServer, redis: &RedisServer) -> Control {
    let live = RedisLive::open(&redis.url()).unwrap();
    assert!(live.wait_ready(WAIT).await);
    let db = SqlStore::open(&Secret::new(pg.url_with_password())).unwrap();
    db.migrate().await.unwrap();
    Control::with_stores(config(), KeySet::generate(), Box::new(db), Box::new(live))
}

#[tokio::test]
async fn a_deletion_reaches_every_replicas_edge_links_once() {
    let redis = RedisServer::start();
    let pg = PostgresServer::start();
    let (a, b) = (replica(&pg, &redis).await, replica(&pg, &redis).await);
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
    let pg = PostgresServer::start();
    let (a, b) = (replica(&pg, &redis).await, replica(&pg, &redis).await);
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
    let pg = PostgresServer::start();
    let (a, b) = (replica(&pg, &redis).await, replica(&pg, &redis).await);
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
    let live = RedisLive::open(&format!("redis://:hunter2@127.0.0.1:{port}")).unwrap();
    let c = Control::with_stores(
        config(),
        KeySet::generate(),
        Box::new(SqlStore::memory()),
        Box::new(live),
    );
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
    assert!(RedisLive::open("http://nope").is_err());
}

#[tokio::test]
async fn a_hung_redis_is_an_error_within_seconds_not_a_hang() {
    let redis = RedisServer::start();
    let pg = PostgresServer::start();
    let c = replica(&pg, &redis).await;
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

/// Two control processes on `pg` and `redis`, sharing a signing key and bootstrap
/// credential.
fn replicas(
    pg: &PostgresServer,
    redis: &RedisServer,
    key: &str,
    extra: &[&str],
) -> (ControlProc, ControlProc) {
    let mut args = vec![
        "--signing-key",
        key,
        "--edge",
        "id=e1,url=ws://127.0.0.1:9/v1/connect,region=local",
    ];
    args.extend_from_slice(extra);
    let env = [("NETBORE_BOOTSTRAP_TOKEN", BOOT)];
    (
        ControlProc::spawn_replica(&pg.url_with_password(), &redis.url(), &args, &env),
        ControlProc::spawn_replica(&pg.url_with_password(), &redis.url(), &args, &env),
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
    let pg = PostgresServer::start();
    let key = signing_key(dir.path());
    // A thousand anonymous creations from one address: the per-address limit (tested in
    // creation_limits.rs) is off, so the race for the name is what is measured.
    let (a, b) = replicas(&pg, &redis, &key, &["--anonymous-create-per-minute", "0"]);
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
    let pg = PostgresServer::start();
    let key = signing_key(dir.path());
    let (a, b) = replicas(&pg, &redis, &key, &[]);
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
    let pg = PostgresServer::start();
    let key = signing_key(dir.path());
    let (a, _b) = replicas(&pg, &redis, &key, &[]);
    let c = client();
    wait_ready(&c, &a.url()).await;
    let (st, before) = call(&c, &a.url(), "POST", "/tunnels/create", None, None).await;
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
    // Deleting is durable in the database, so it works while Redis is down (other
    // replicas' edges hear of it when their agents' tokens are next checked); so does
    // issuing a management token.
    let tok = admin(&c, &a.url()).await;
    let (st, d) = call(
        &c,
        &a.url(),
        "POST",
        "/tunnels/delete",
        Some(&tok),
        Some(json!({"tunnel_id": before["tunnel_id"]})),
    )
    .await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["deleted"], before["tunnel_id"]);
    let (st, e) = call(
        &c,
        &a.url(),
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"recreate_token": before["recreate_token"]})),
    )
    .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (410, Some("tunnel_deleted")),
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
    // gRPC readiness follows too: its health status is set by control's own readiness
    // check, a moment after REST's (the two are not one atomic switch).
    let mut last = String::new();
    let grpc_serving = eventually(WAIT, || {
        let out = std::process::Command::new("grpcurl")
            .args(["-plaintext", "-d", r#"{"service":"readiness"}"#])
            .arg(format!("127.0.0.1:{}", a.grpc))
            .arg("grpc.health.v1.Health/Check")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        last = out.clone();
        async move { (out.contains("SERVING") && !out.contains("NOT_SERVING")).then_some(()) }
    })
    .await;
    assert!(
        grpc_serving.is_some(),
        "gRPC readiness SERVING again: {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_through_one_replica_disconnects_an_agent_on_an_edge_linked_to_another() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let pg = PostgresServer::start();
    let key = signing_key(dir.path());
    let (public, agents) = (free_port(), free_port());
    let template = format!("http://{{name}}.localhost:{public}");
    let (a, b) = replicas(&pg, &redis, &key, &["--public-url-template", &template]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_flush_loses_no_name_and_recreate_still_works_on_two_replicas() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let pg = PostgresServer::start();
    let key = signing_key(dir.path());
    let (a, b) = replicas(&pg, &redis, &key, &[]);
    let c = client();
    wait_ready(&c, &a.url()).await;
    wait_ready(&c, &b.url()).await;
    let (st, t) = call(
        &c,
        &a.url(),
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"requested_name": "kept-name"})),
    )
    .await;
    assert_eq!(st, 200, "{t}");
    let (st, gone) = call(
        &c,
        &a.url(),
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"requested_name": "deleted-name"})),
    )
    .await;
    assert_eq!(st, 200, "{gone}");
    let (st, _) = call(
        &c,
        &b.url(),
        "POST",
        "/tunnels/delete",
        None,
        Some(json!({"recreate_token": gone["recreate_token"]})),
    )
    .await;
    assert_eq!(st, 200);

    assert_eq!(redis_cli(&redis, &["FLUSHALL"]), "OK");
    assert_eq!(redis_cli(&redis, &["DBSIZE"]), "0");

    // The name is still held, on both replicas.
    for base in [a.url(), b.url()] {
        let (st, e) = call(
            &c,
            &base,
            "POST",
            "/tunnels/create",
            None,
            Some(json!({"requested_name": "kept-name"})),
        )
        .await;
        assert_eq!(
            (st, e["error"]["code"].as_str()),
            (409, Some("name_taken")),
            "{e}"
        );
    }
    // Its recreate token still gets it back, same tunnel, through the other replica.
    let (st, r) = call(
        &c,
        &b.url(),
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"recreate_token": t["recreate_token"]})),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["tunnel_id"], t["tunnel_id"]);
    assert_eq!(r["public_hostname"], t["public_hostname"]);
    // The deleted tunnel stays deleted.
    let (st, e) = call(
        &c,
        &a.url(),
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"recreate_token": gone["recreate_token"]})),
    )
    .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (410, Some("tunnel_deleted")),
        "{e}"
    );
}

fn redis_cli(redis: &RedisServer, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli on PATH");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_restarted_on_its_sqlite_file_keeps_names_tombstones_keys_and_its_signing_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("state/control.db").display());
    let args = [
        "--database-url",
        db.as_str(),
        "--edge",
        "id=e1,url=ws://127.0.0.1:9/v1/connect,region=local",
    ];
    let env = [("NETBORE_BOOTSTRAP_TOKEN", BOOT)];
    let c = client();
    let first = ControlProc::spawn(&args, &env);
    wait_ready(&c, &first.url()).await;
    let (st, t) = call(
        &c,
        &first.url(),
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"requested_name": "survivor"})),
    )
    .await;
    assert_eq!(st, 200, "{t}");
    let (st, gone) = call(&c, &first.url(), "POST", "/tunnels/create", None, None).await;
    assert_eq!(st, 200);
    let (st, _) = call(
        &c,
        &first.url(),
        "POST",
        "/tunnels/delete",
        None,
        Some(json!({"recreate_token": gone["recreate_token"]})),
    )
    .await;
    assert_eq!(st, 200);
    let tok = admin(&c, &first.url()).await;
    // An API key made before the restart (kept hashed in the same file).
    let (st, k) = call(
        &c,
        &first.url(),
        "POST",
        "/v1/api-keys",
        Some(&tok),
        Some(json!({"subject": "ops", "scopes": ["tunnels:read"]})),
    )
    .await;
    assert_eq!(st, 200, "{k}");
    let key = k["key"].as_str().unwrap().to_string();
    let (_, jwks_before) = call(
        &c,
        &first.url(),
        "GET",
        "/.well-known/jwks.json",
        None,
        None,
    )
    .await;
    drop(first);

    // A new process on the same file (no --signing-key either time).
    let second = ControlProc::spawn(&args, &env);
    wait_ready(&c, &second.url()).await;
    let (_, jwks_after) = call(
        &c,
        &second.url(),
        "GET",
        "/.well-known/jwks.json",
        None,
        None,
    )
    .await;
    assert_eq!(
        jwks_before, jwks_after,
        "the generated key survived the restart"
    );
    // The name is held against others…
    let (st, e) = call(
        &c,
        &second.url(),
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"requested_name": "survivor"})),
    )
    .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("name_taken")),
        "{e}"
    );
    // …and the recreate token from before the restart gets it back, as an agent's would.
    let (st, r) = call(
        &c,
        &second.url(),
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"recreate_token": t["recreate_token"]})),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        (&r["tunnel_id"], &r["public_hostname"]),
        (&t["tunnel_id"], &t["public_hostname"])
    );
    // The deleted tunnel stays deleted; a management token from before still works.
    let (st, e) = call(
        &c,
        &second.url(),
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"recreate_token": gone["recreate_token"]})),
    )
    .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (410, Some("tunnel_deleted")),
        "{e}"
    );
    let (st, l) = call(&c, &second.url(), "GET", "/tunnels/list", Some(&tok), None).await;
    assert_eq!(st, 200, "{l}");
    assert_eq!(l["tunnels"].as_array().unwrap().len(), 1, "{l}");
    assert_eq!(l["tunnels"][0]["name"], "survivor");
    // The API key works after the restart, as the bearer and for /auth/token.
    let (st, l) = call(&c, &second.url(), "GET", "/tunnels/list", Some(&key), None).await;
    assert_eq!(st, 200, "{l}");
    let (st, t) = call(&c, &second.url(), "POST", "/auth/token", Some(&key), None).await;
    assert_eq!(st, 200, "{t}");
}

/// Issue 18 item 5: in subscribed mode Redis answers `PING` with `["pong", ""]`. The
/// deletion subscription's health check must take that as alive; it used to ask for a
/// `String`, failed on every ping, and rebuilt the subscription every 5 s with a WARN,
/// missing other replicas' deletions in between.
#[tokio::test]
async fn a_subscribed_connection_passes_the_health_ping() {
    let redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let (mut sink, _stream) = client.get_async_pubsub().await.unwrap().split();
    sink.subscribe("netbore:test").await.unwrap();
    for i in 0..3 {
        assert!(
            netbore_control::redis_store::ping_subscription(&mut sink).await,
            "ping {i} in subscribed mode"
        );
    }
}
