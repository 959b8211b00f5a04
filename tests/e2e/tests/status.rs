//! Live tunnel status against real binaries (issue 15 item 2, and the link events of
//! item 4): a real `netbore-control`, `netbore-edge` and `netbore` agent, a real origin,
//! and for the shared cases a real PostgreSQL and `redis-server`.
//!
//! - agent up → `ready` with its link (edge id, instance id, version); the origin
//!   stopped → `degraded` with `origin_unreachable` within 2 probe intervals and the
//!   agent's `/readyz` 503 naming it; the agent killed → `offline`; a grpcurl
//!   `GetTunnelStatus` and the list say the same;
//! - two control replicas sharing Redis answer the same status, and the link events
//!   are in the audit table once each across a control restart.

use std::time::Duration;

use netbore_testkit::grpcurl;
use netbore_testkit::origin::Origin;
use netbore_testkit::postgres::PostgresServer;
use netbore_testkit::redis::RedisServer;
use netbore_testkit::signing_key;
use netbore_testkit::{ControlProc, EdgeProc, Proc, eventually, free_port, http_get};
use netbore_testkit::{HttpClient, json_call as call, json_client as client};
use serde_json::{Value, json};

const BOOT: &str = "test-bootstrap-credential";
/// The agents here probe their origin every second.
const PROBE: Duration = Duration::from_secs(1);

/// A management token with tunnels:read and tunnels:write, from the bootstrap credential.
async fn token(c: &HttpClient, base: &str) -> String {
    let (st, b) = call(c, base, "POST", "/auth/token", Some(BOOT), Some(json!({}))).await;
    assert_eq!(st, 200, "{b}");
    b["token"].as_str().unwrap().to_string()
}

/// A real agent for `name` on `origin`, probing every second, its probes on `admin`.
fn agent(
    control: &str,
    origin: &str,
    name: &str,
    token: &str,
    admin: u16,
    state: &std::path::Path,
) -> Proc {
    let admin = format!("127.0.0.1:{admin}");
    Proc::spawn(
        "netbore",
        &[
            "http",
            origin,
            "--control",
            control,
            "--name",
            name,
            "--token",
            token,
            "--health-interval",
            "1",
            "--connections",
            "1",
            "--admin-addr",
            &admin,
            "--state-dir",
            state.to_str().unwrap(),
        ],
        &[("RUST_LOG", "warn")],
    )
}

async fn status(c: &HttpClient, base: &str, tok: &str, name: &str) -> Value {
    let (st, b) = call(
        c,
        base,
        "GET",
        &format!("/v1/tunnels/{name}/status"),
        Some(tok),
        None,
    )
    .await;
    assert_eq!(st, 200, "{b}");
    b
}

/// Polls the status until `pred` holds (at most `within`); the last status either way.
async fn status_until(
    c: &HttpClient,
    base: &str,
    tok: &str,
    name: &str,
    within: Duration,
    pred: impl Fn(&Value) -> bool,
) -> (bool, Value) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let s = status(c, base, tok, name).await;
        if pred(&s) {
            return (true, s);
        }
        if tokio::time::Instant::now() >= deadline {
            return (false, s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn reasons(s: &Value) -> Vec<String> {
    s["reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["code"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_the_agent_and_its_origin() {
    let ctl = ControlProc::spawn(
        &["--offline-after-secs", "2"],
        &[("NETBORE_BOOTSTRAP_TOKEN", BOOT)],
    );
    ctl.wait_ready().await;
    let edge = EdgeProc::spawn("edge-status", &ctl, None, &[]);
    let _ = edge.viewer().await;
    let c = client();
    let base = ctl.url();
    let tok = token(&c, &base).await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let admin = free_port();
    let mut a = agent(&base, &origin.url(), "watched", &tok, admin, state.path());
    let url_line = a.line(Duration::from_secs(30)).await;
    let host = url_line
        .split_whitespace()
        .next()
        .unwrap()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();

    // Up: ready, with its link as the edge saw it.
    let (ok, s) = status_until(&c, &base, &tok, "watched", Duration::from_secs(15), |s| {
        s["state"] == "ready" && s["origin"]["healthy"] == true
    })
    .await;
    assert!(ok, "ready with a healthy origin: {s}");
    let links = s["links"].as_array().unwrap();
    assert_eq!(links.len(), 1, "{s}");
    assert_eq!(links[0]["edge_id"], "edge-status", "{s}");
    assert!(
        links[0]["agent_version"]
            .as_str()
            .unwrap()
            .starts_with("netbore/"),
        "{s}"
    );
    let instance = std::fs::read_to_string(state.path().join("instance-id")).unwrap();
    assert_eq!(links[0]["agent_instance_id"], instance.trim(), "{s}");
    assert!(
        links[0]["agent_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{s}"
    );
    assert!(s["reasons"].as_array().unwrap().is_empty(), "{s}");
    assert!(s["last_seen"].is_string(), "{s}");
    let tunnel_id = s["tunnel_id"].as_str().unwrap().to_string();

    // Traffic through the edge counts in the 5-minute figures.
    let v = edge.viewer().await;
    for _ in 0..3 {
        assert_eq!(v.get(&host, "/hello").await.status, 200);
    }
    let (ok, s) = status_until(&c, &base, &tok, "watched", Duration::from_secs(10), |s| {
        s["requests_5m"].as_u64() >= Some(3)
    })
    .await;
    assert!(ok, "three requests counted: {s}");

    // The list says the same.
    let (st, list) = call(&c, &base, "GET", "/tunnels/list", Some(&tok), None).await;
    assert_eq!(st, 200, "{list}");
    let t = list["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "watched")
        .unwrap_or_else(|| panic!("listed: {list}"))
        .clone();
    assert_eq!(t["state"], "ready", "{t}");
    assert_eq!(t["links"][0]["edge_id"], "edge-status", "{t}");

    // gRPC, as an operator runs it.
    let grpc = format!("127.0.0.1:{}", ctl.grpc);
    let h = format!("authorization: Bearer {tok}");
    let body = json!({ "tunnel_id": tunnel_id }).to_string();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        grpcurl(&[
            "-plaintext",
            "-H",
            &h,
            "-d",
            &body,
            &grpc,
            "netbore.control.v1.ControlService/GetTunnelStatus",
        ])
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    let g: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(g["state"], "ready", "{out}");
    assert_eq!(g["links"][0]["edgeId"], "edge-status", "{out}");
    assert_eq!(g["origin"]["healthy"], true, "{out}");

    // Agent /readyz is 200 while all is well.
    let admin_addr: std::net::SocketAddr = ([127, 0, 0, 1], admin).into();
    let (code, _) = http_get(admin_addr, "/readyz").await.unwrap();
    assert_eq!(code, 200);

    // The origin stops: degraded with origin_unreachable within 2 probe intervals
    // (plus one report's way), and the agent's /readyz says why.
    origin.stop();
    let started = tokio::time::Instant::now();
    let (ok, s) = status_until(
        &c,
        &base,
        &tok,
        "watched",
        2 * PROBE + Duration::from_secs(1),
        |s| s["state"] == "degraded" && reasons(s).contains(&"origin_unreachable".to_string()),
    )
    .await;
    assert!(
        ok,
        "degraded within 2 probe intervals ({:?}): {s}",
        started.elapsed()
    );
    assert_eq!(s["origin"]["healthy"], false, "{s}");
    assert_eq!(s["origin"]["cause"], "connection_refused", "{s}");
    let msg = s["reasons"][0]["message"].as_str().unwrap();
    assert!(
        msg.contains("start the local service"),
        "the reason names the fix: {msg}"
    );
    let ready = eventually(2 * PROBE, || async move {
        http_get(admin_addr, "/readyz")
            .await
            .filter(|(c, _)| *c == 503)
    })
    .await;
    let (_, body) = ready.expect("agent /readyz turns 503");
    assert!(body.contains("origin unreachable"), "{body}");
    assert!(body.contains("connection_refused"), "{body}");

    // The agent dies: its link goes at once (the edge reports the unlink), and after
    // control's offline threshold (2 s here) the tunnel is offline.
    a.kill().await;
    let (ok, s) = status_until(&c, &base, &tok, "watched", Duration::from_secs(10), |s| {
        s["state"] == "offline"
    })
    .await;
    assert!(ok, "offline after the agent was killed: {s}");
    assert!(s["links"].as_array().unwrap().is_empty(), "{s}");
    assert_eq!(reasons(&s), vec!["no_link".to_string()], "{s}");
    assert!(s["last_seen"].is_string(), "last seen is kept: {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_another_owners_tunnel_is_not_found_and_unknown_is_404() {
    // A configured edge nobody runs, so a tunnel can be created.
    let ctl = ControlProc::spawn(
        &[
            "--edge",
            "id=e1,url=ws://127.0.0.1:9/v1/connect,region=local",
        ],
        &[("NETBORE_BOOTSTRAP_TOKEN", BOOT)],
    );
    ctl.wait_ready().await;
    let c = client();
    let base = ctl.url();
    let tok = token(&c, &base).await;
    let (st, b) = call(
        &c,
        &base,
        "GET",
        "/v1/tunnels/nosuch/status",
        Some(&tok),
        None,
    )
    .await;
    assert_eq!(st, 404, "{b}");
    assert_eq!(b["error"]["code"], "tunnel_not_found", "{b}");
    // A named tunnel nobody runs: offline, no_link naming how to start an agent.
    let (st, b) = call(
        &c,
        &base,
        "POST",
        "/tunnels/create",
        Some(&tok),
        Some(json!({"requested_name": "idle"})),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let s = status(&c, &base, &tok, "idle").await;
    assert_eq!(s["state"], "offline", "{s}");
    assert_eq!(reasons(&s), vec!["no_link".to_string()], "{s}");
    assert!(s["last_seen"].is_null(), "{s}");
    // Another owner's token sees nothing.
    let (st, other) = call(
        &c,
        &base,
        "POST",
        "/auth/token",
        Some(BOOT),
        Some(json!({"subject": "someone-else"})),
    )
    .await;
    assert_eq!(st, 200, "{other}");
    let other = other["token"].as_str().unwrap();
    let (st, b) = call(
        &c,
        &base,
        "GET",
        "/v1/tunnels/idle/status",
        Some(other),
        None,
    )
    .await;
    assert_eq!(st, 404, "{b}");
}

fn audit_count(pg: &PostgresServer, tunnel_id: &str, action: &str) -> u64 {
    pg.psql(&format!(
        "SELECT count(*) FROM audit_events WHERE target = '{tunnel_id}' AND action = '{action}'"
    ))
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_status_and_link_events_are_audited_once_across_a_restart() {
    let redis = RedisServer::start();
    let pg = PostgresServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = signing_key(dir.path());
    let env = [("NETBORE_BOOTSTRAP_TOKEN", BOOT)];
    let args = ["--signing-key", key.as_str(), "--offline-after-secs", "2"];
    let (ra, ga) = (free_port(), free_port());
    let replica_args = |extra: &[&str]| {
        let mut v = vec![
            "--database-url".to_string(),
            pg.url_with_password(),
            "--redis-url".to_string(),
            redis.url(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let a_args = replica_args(&args);
    let a_ref: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let a = ControlProc::spawn_at(ra, ga, &a_ref, &env);
    let b = ControlProc::spawn(&a_ref, &env);
    a.wait_ready().await;
    b.wait_ready().await;
    // The edge reports to A; the agent and the status calls go to B as well.
    let edge = EdgeProc::spawn("edge-shared", &a, Some(&redis.url()), &[]);
    let _ = edge.viewer().await;
    let c = client();
    let tok = token(&c, &a.url()).await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut agent_proc = agent(
        &b.url(),
        &origin.url(),
        "shared",
        &tok,
        free_port(),
        state.path(),
    );
    let _url = agent_proc.line(Duration::from_secs(30)).await;

    let (ok, sa) = status_until(&c, &a.url(), &tok, "shared", Duration::from_secs(15), |s| {
        s["state"] == "ready"
    })
    .await;
    assert!(ok, "ready at A: {sa}");
    let (ok, sb) = status_until(&c, &b.url(), &tok, "shared", Duration::from_secs(5), |s| {
        s["state"] == "ready"
    })
    .await;
    assert!(ok, "ready at B too: {sb}");
    assert_eq!(sa["links"], sb["links"], "both replicas see the same links");
    assert_eq!(sb["links"][0]["edge_id"], "edge-shared", "{sb}");
    let tunnel_id = sa["tunnel_id"].as_str().unwrap().to_string();

    // The link event reached the audit trail once.
    let linked = eventually(Duration::from_secs(10), || {
        let n = audit_count(&pg, &tunnel_id, "agent.link");
        async move { (n > 0).then_some(n) }
    })
    .await;
    assert_eq!(linked, Some(1), "one agent.link row");
    let detail = pg.psql(&format!(
        "SELECT actor || ' ' || detail FROM audit_events WHERE target = '{tunnel_id}' AND action = 'agent.link'"
    ));
    assert!(detail.starts_with("edge:edge-shared "), "{detail}");
    assert!(detail.contains("\"agent_addr\":\"127.0.0.1:"), "{detail}");

    // Control A (the edge's) stops; the agent dies meanwhile, so its unlink event
    // waits at the edge until A is back.
    let mut a = a;
    a.proc.kill().await;
    drop(a);
    agent_proc.kill().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        audit_count(&pg, &tunnel_id, "agent.unlink"),
        0,
        "A is down: not written yet"
    );
    let a = ControlProc::spawn_at(ra, ga, &a_ref, &env);
    a.wait_ready().await;
    let unlinked = eventually(Duration::from_secs(30), || {
        let n = audit_count(&pg, &tunnel_id, "agent.unlink");
        async move { (n > 0).then_some(n) }
    })
    .await;
    assert_eq!(
        unlinked,
        Some(1),
        "the unlink event arrives after the restart"
    );
    // Several more reports go by (every 5 s, and the edge resends until acknowledged):
    // nothing is doubled.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(audit_count(&pg, &tunnel_id, "agent.link"), 1);
    assert_eq!(audit_count(&pg, &tunnel_id, "agent.unlink"), 1);
    // And both replicas agree it is offline.
    for base in [a.url(), b.url()] {
        let (ok, s) = status_until(&c, &base, &tok, "shared", Duration::from_secs(10), |s| {
            s["state"] == "offline"
        })
        .await;
        assert!(ok, "offline at {base}: {s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_link_event_is_written_once() {
    use netbore_proto::edge::v1 as epb;
    let pg = PostgresServer::start();
    let db = netbore_control::sql_store::SqlStore::open(&netbore_tokens::Secret::new(
        pg.url_with_password(),
    ))
    .unwrap();
    db.migrate().await.unwrap();
    let control = netbore_control::Control::with_stores(
        netbore_control::ControlConfig::default(),
        netbore_tokens::KeySet::generate(),
        Box::new(db),
        Box::new(netbore_control::store::LocalLive),
    );
    let ev = epb::LinkEvent {
        event_id: "aud_00000001700000000000_0a0b0c0d".into(),
        kind: epb::link_event::Kind::Linked as i32,
        tunnel_id: "tun_resent".into(),
        link_id: "e1-1".into(),
        agent_addr: "127.0.0.1:4000".into(),
        at: 1_700_000_000,
        agent_instance_id: "inst".into(),
        agent_version: "netbore/0.1.0".into(),
        reason: String::new(),
    };
    // Sent twice in one report, then again (the acknowledgement was lost).
    let acked = control
        .record_link_events("e1", &[ev.clone(), ev.clone()])
        .await;
    assert_eq!(acked.len(), 2, "both acknowledged");
    let acked = control
        .record_link_events("e1", std::slice::from_ref(&ev))
        .await;
    assert_eq!(acked, vec![ev.event_id.clone()]);
    assert_eq!(audit_count(&pg, "tun_resent", "agent.link"), 1);
    // A malformed id is acknowledged (dropped), never written.
    let bad = epb::LinkEvent {
        event_id: "'; drop table audit_events; --".into(),
        ..ev
    };
    assert_eq!(control.record_link_events("e1", &[bad]).await.len(), 1);
    assert_eq!(audit_count(&pg, "tun_resent", "agent.link"), 1);
}
