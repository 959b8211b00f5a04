//! Tunnel credentials (issue 13 step 4, and step 6's two-instance report) against real
//! `netbore-control`, `netbore-edge` and `netbore` processes: an agent runs a named
//! tunnel with nothing but `--tunnel-token`, also under `--require-token` and across a
//! control restart on its SQLite file; revoking the credential closes its links on every
//! edge (two replicas on PostgreSQL and Redis, two edges) within 5 s and stops the agent
//! with `credential_revoked`; rotation under steady load loses no request; two agent
//! instances on one credential are reported; no secret reaches a list or a log.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use netbore_control::api::{CreateTunnelRequest, IssueCredentialRequest, IssueTokenRequest};
use netbore_control::client::ControlClient;
use netbore_testkit::origin::Origin;
use netbore_testkit::postgres::PostgresServer;
use netbore_testkit::redis::RedisServer;
use netbore_testkit::{
    ControlProc, EdgeProc, Proc, eventually, free_port, http_get, parse_metrics,
};
use serde_json::Value;

const BOOT: &str = "test-bootstrap-credential";
const WAIT: Duration = Duration::from_secs(30);
/// The issue's bound on revocation: every link that used the credential closed, on
/// every edge.
const REVOKED_WITHIN: Duration = Duration::from_secs(5);

/// `netbore http ORIGIN --control CONTROL --state-dir STATE --json EXTRA…`.
fn agent(control: &str, origin: &Origin, state: &Path, extra: &[&str]) -> Proc {
    netbore_testkit::json_agent(control, &origin.url(), state, extra)
}

/// `http://NAME.localhost:PORT` → `NAME.localhost:PORT`.
fn host_of(url: &Value) -> String {
    url.as_str()
        .unwrap()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// Waits for `p` to exit; its exit code and every line it wrote after the last read.
async fn exit_of(p: &mut Proc, within: Duration) -> (Option<i32>, String) {
    let st = tokio::time::timeout(within, p.child.wait())
        .await
        .expect("the agent exits")
        .unwrap();
    let mut out = String::new();
    while let Ok(Some(l)) = tokio::time::timeout(Duration::from_secs(1), p.stdout.recv()).await {
        out.push_str(&l);
        out.push('\n');
    }
    (st.code(), out)
}

/// A management token with `tunnels:write` from control's bootstrap credential.
async fn manager(control: &str) -> ControlClient {
    let t = ControlClient::new(control)
        .with_bearer(BOOT)
        .issue_token(&IssueTokenRequest::default())
        .await
        .unwrap();
    ControlClient::new(control).with_bearer(t.token)
}

/// Creates the named tunnel `name` and a credential for it: (tunnel id, credential id,
/// secret).
async fn named_with_credential(control: &str, name: &str) -> (String, String, String) {
    let m = manager(control).await;
    let req = CreateTunnelRequest {
        requested_name: Some(name.into()),
        issue_credential: true,
        ..Default::default()
    };
    let created = until_edges(|| m.create(&req)).await;
    let c = created.credential.expect("issue_credential returns one");
    assert!(c.secret.starts_with("nbt_"), "{}", c.secret);
    assert_eq!(c.credential.tunnel_id, created.tunnel_id);
    (created.tunnel_id, c.credential.credential_id, c.secret)
}

/// `call`'s answer once control has an edge to hand out (edges link to control a
/// moment after they start; until then a create is `503 no_edges`).
async fn until_edges<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, netbore_control::client::ControlError>>,
{
    for _ in 0..150 {
        match call().await {
            Ok(v) => return v,
            Err(e) if e.code().is_some_and(|c| *c == "no_edges") => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("control had no edge to hand out within 30 s");
}

/// Every line `p` (spawned with its logs captured) has written so far.
fn drain_lines(p: &mut Proc) -> String {
    let mut out = String::new();
    while let Ok(l) = p.stdout.try_recv() {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// Logs detailed enough that a leaked secret would show.
const VERBOSE: &str = "info,netbore_control=debug,netbore_edge=debug";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_runs_on_its_credential_alone_across_a_control_restart_and_no_secret_is_shown() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("control.db").display());
    let (rest, grpc) = (free_port(), free_port());
    let args = ["--database-url", db.as_str(), "--require-token"];
    let env = [("NETBORE_BOOTSTRAP_TOKEN", BOOT), ("RUST_LOG", VERBOSE)];
    let mut control = ControlProc::spawn_at_logs(rest, grpc, &args, &env);
    control.wait_ready().await;
    let mut edge = EdgeProc::spawn_logs("e1", &control, None, &[], &[("RUST_LOG", VERBOSE)]);
    let (tunnel_id, cred_id, secret) = named_with_credential(&control.url(), "sidecar").await;

    // Only the credential: no --token, and control requires one for anything else.
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut a = agent(
        &control.url(),
        &origin,
        state.path(),
        &["--tunnel-token", &secret, "--connections", "1"],
    );
    let live = a.next_event("live").await;
    assert_eq!(live["name"], "sidecar");
    assert_eq!(live["tunnel_id"], tunnel_id.as_str());
    let host = host_of(&live["url"]);
    let v = edge.viewer().await;
    assert!(v.serves(&host, WAIT).await);
    for i in 0..5 {
        let r = v.get(&host, "/hello").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    // Nothing secret was saved: only the instance id.
    let saved: Vec<String> = std::fs::read_dir(state.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(saved, ["instance-id"], "the state dir holds {saved:?}");

    // The list shows the credential, its prefix and its last use, never the secret.
    let m = manager(&control.url()).await;
    let list = m.list_credentials(&tunnel_id).await.unwrap();
    let shown = serde_json::to_string(&list).unwrap();
    assert!(!shown.contains(&secret), "{shown}");
    assert_eq!(list.credentials.len(), 1, "{shown}");
    assert_eq!(list.credentials[0].credential_id, cred_id);
    assert!(secret.starts_with(&list.credentials[0].prefix), "{shown}");
    assert!(list.credentials[0].last_used_at.is_some(), "{shown}");
    assert!(list.credentials[0].revoked_at.is_none(), "{shown}");

    // Control restarts on the same file (no --signing-key: the generated key is kept
    // there too); the agent gets back on the same name with the credential, and a new
    // agent with it works as well.
    let mut logs = drain_lines(&mut control.proc);
    drop(control);
    let mut control = ControlProc::spawn_at_logs(rest, grpc, &args, &env);
    control.wait_ready().await;
    let with_cred = ControlClient::new(&control.url()).with_bearer(&secret);
    let again = CreateTunnelRequest::default();
    let created = until_edges(|| with_cred.create(&again)).await;
    assert_eq!(created.tunnel_id, tunnel_id);
    assert_eq!(created.name(), "sidecar");
    assert!(
        created.recreate_token.is_empty(),
        "no recreate token for a credential"
    );
    let origin2 = Origin::start().await;
    let state2 = tempfile::tempdir().unwrap();
    let mut b = agent(
        &control.url(),
        &origin2,
        state2.path(),
        &["--tunnel-token", &secret, "--connections", "1"],
    );
    assert_eq!(b.next_event("live").await["name"], "sidecar");
    assert!(v.serves(&host, WAIT).await);
    assert!(
        a.child.try_wait().unwrap().is_none(),
        "the first agent runs"
    );

    logs.push_str(&drain_lines(&mut control.proc));
    logs.push_str(&drain_lines(&mut edge.proc));
    assert!(
        logs.contains("tunnel credential issued"),
        "the logs were captured: {logs}"
    );
    assert!(!logs.contains(&secret), "a log line holds the secret");
    assert!(!logs.contains(&secret[4..]), "a log line holds the secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoking_a_credential_closes_its_links_on_every_edge_within_5s_and_stops_the_agent() {
    let redis = RedisServer::start();
    let pg = PostgresServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = netbore_testkit::signing_key(dir.path());
    let args = ["--signing-key", key.as_str()];
    let env = [("NETBORE_BOOTSTRAP_TOKEN", BOOT)];
    let a = ControlProc::spawn_replica(&pg.url_with_password(), &redis.url(), &args, &env);
    let b = ControlProc::spawn_replica(&pg.url_with_password(), &redis.url(), &args, &env);
    a.wait_ready().await;
    b.wait_ready().await;
    // Each edge links to its own replica; the revocation goes through A only.
    let e1 = EdgeProc::spawn("e1", &a, Some(&redis.url()), &[]);
    let e2 = EdgeProc::spawn("e2", &b, Some(&redis.url()), &[]);
    let (tunnel_id, cred_id, secret) = named_with_credential(&a.url(), "hub").await;

    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    // Through B, with a link to each edge.
    let mut agent = Proc::spawn(
        "netbore",
        &[
            "http",
            &origin.url(),
            "--control",
            &b.url(),
            "--state-dir",
            state.path().to_str().unwrap(),
            "--json",
            "--connections",
            "2",
        ],
        &[("RUST_LOG", "warn"), ("NETBORE_TUNNEL_TOKEN", &secret)],
    );
    let live = agent.next_event("live").await;
    let host = host_of(&live["url"]);
    let mut edges_linked = vec![live["edge_id"].as_str().unwrap().to_string()];
    let second = agent.next_event("live").await;
    edges_linked.push(second["edge_id"].as_str().unwrap().to_string());
    edges_linked.sort();
    assert_eq!(edges_linked, ["e1", "e2"], "a link on each edge");
    let (v1, v2) = (e1.viewer().await, e2.viewer().await);
    assert!(v1.serves(&host, WAIT).await);
    assert!(v2.serves(&host, WAIT).await);

    let revoked_at = Instant::now();
    let r = manager(&a.url())
        .await
        .revoke_credential(&tunnel_id, &cred_id)
        .await
        .unwrap();
    assert_eq!(r.credential_id, cred_id);
    assert!(r.revoked_at.is_some());
    // Every edge answers the tunnel as offline: no link of the credential is left.
    let offline = eventually(REVOKED_WITHIN, || {
        let (v1, v2, host) = (v1.clone(), v2.clone(), host.clone());
        async move {
            let (r1, r2) = (v1.get(&host, "/hello").await, v2.get(&host, "/hello").await);
            (r1.status == 503
                && r1.error_code() == Some("tunnel_offline")
                && r2.status == 503
                && r2.error_code() == Some("tunnel_offline"))
            .then_some(())
        }
    })
    .await;
    assert!(
        offline.is_some(),
        "links still served {:?} after the revocation",
        revoked_at.elapsed()
    );
    eprintln!(
        "both edges answered tunnel_offline {:?} after the revocation",
        revoked_at.elapsed()
    );
    // And the links themselves are closed on both edges (not only passed over).
    let closed = eventually(REVOKED_WITHIN.saturating_sub(revoked_at.elapsed()), || {
        let admins = [e1.admin, e2.admin];
        async move {
            for port in admins {
                let (status, body) = http_get(([127, 0, 0, 1], port).into(), "/metrics").await?;
                let m = parse_metrics(&body);
                (status == 200 && m.get("netbore_edge_agent_connections") == Some(&0.0))
                    .then_some(())?;
            }
            Some(())
        }
    })
    .await;
    assert!(
        closed.is_some(),
        "an edge still held a link of the revoked credential {:?} after the revocation",
        revoked_at.elapsed()
    );
    eprintln!(
        "both edges held no agent link {:?} after the revocation",
        revoked_at.elapsed()
    );
    // The agent is told why and stops: exit 2, the code printed, no retry loop.
    let (code, out) = exit_of(&mut agent, Duration::from_secs(10)).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("\"code\":\"credential_revoked\""), "{out}");
    assert!(
        revoked_at.elapsed() < Duration::from_secs(10),
        "the agent took {:?} to stop",
        revoked_at.elapsed()
    );
    // Control refuses the credential through either replica, and the tunnel stays
    // offline.
    for c in [&a, &b] {
        let e = ControlClient::new(&c.url())
            .with_bearer(&secret)
            .create(&CreateTunnelRequest::default())
            .await
            .unwrap_err();
        assert_eq!(
            e.code().map(|c| c.as_str()),
            Some("credential_revoked"),
            "{e}"
        );
        assert!(e.to_string().contains("issue a new one"), "{e}");
    }
    let r = v1.get(&host, "/hello").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code(), Some("tunnel_offline"));
}

/// Requests `/hello` on `host` through `edge` one after another until `stop`; counts
/// answers that are not 200 (and failed connections) in `failed`.
async fn steady_load(
    edge: std::net::SocketAddr,
    host: String,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<parking_lot_free::Log>,
) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    while !stop.load(Ordering::Acquire) {
        let req = http::Request::builder()
            .uri(format!("http://{edge}/hello"))
            .header("host", &host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        })
        .await;
        match r {
            Ok(Ok((s, _))) if s == 200 => {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok((s, body))) => {
                failed.fetch_add(1, Ordering::Relaxed);
                errors.push(format!("{s}: {}", String::from_utf8_lossy(&body)));
            }
            Ok(Err(e)) => {
                failed.fetch_add(1, Ordering::Relaxed);
                errors.push(e);
            }
            Err(_) => {
                failed.fetch_add(1, Ordering::Relaxed);
                errors.push("no answer within 10 s".into());
            }
        }
    }
}

/// A small shared log of failures (std only).
mod parking_lot_free {
    /// Failure descriptions, first ones kept.
    #[derive(Default)]
    pub struct Log(std::sync::Mutex<Vec<String>>);

    impl Log {
        pub fn push(&self, s: String) {
            let mut v = self.0.lock().unwrap();
            if v.len() < 20 {
                v.push(s);
            }
        }
        pub fn all(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotating_a_credential_under_steady_load_loses_no_request() {
    let control = ControlProc::spawn(&[], &[("NETBORE_BOOTSTRAP_TOKEN", BOOT)]);
    control.wait_ready().await;
    let edge = EdgeProc::spawn("e1", &control, None, &[]);
    let (tunnel_id, old_id, old_secret) = named_with_credential(&control.url(), "rotating").await;
    let origin = Origin::start().await;
    let (s1, s2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut old = agent(
        &control.url(),
        &origin,
        s1.path(),
        &["--tunnel-token", &old_secret, "--connections", "1"],
    );
    let host = host_of(&old.next_event("live").await["url"]);
    let v = edge.viewer().await;
    assert!(v.serves(&host, WAIT).await);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let errors = Arc::new(parking_lot_free::Log::default());
    let edge_addr: std::net::SocketAddr = ([127, 0, 0, 1], edge.public).into();
    let loops: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(steady_load(
                edge_addr,
                host.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                errors.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Rotate: a new credential, its agent links (both serve), the old one is revoked.
    let m = manager(&control.url()).await;
    let new = m
        .issue_credential(
            &tunnel_id,
            &IssueCredentialRequest {
                label: "rotated".into(),
            },
        )
        .await
        .unwrap();
    let mut fresh = agent(
        &control.url(),
        &origin,
        s2.path(),
        &["--tunnel-token", &new.secret, "--connections", "1"],
    );
    fresh.next_event("live").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    m.revoke_credential(&tunnel_id, &old_id).await.unwrap();
    let (code, out) = exit_of(&mut old, Duration::from_secs(15)).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("credential_revoked"), "{out}");
    // Load goes on through the new agent alone for a while.
    let before = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Release);
    for l in loops {
        l.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("rotation under load: {ok} requests answered 200, {failed} failed");
    assert_eq!(failed, 0, "{ok} ok; failures: {:?}", errors.all());
    assert!(ok > before, "the new agent served after the rotation");
    assert!(ok >= 50, "only {ok} requests: not a steady load");
    assert!(
        fresh.child.try_wait().unwrap().is_none(),
        "the new agent runs"
    );
    let list = m.list_credentials(&tunnel_id).await.unwrap();
    let mut revoked: Vec<_> = list
        .credentials
        .iter()
        .map(|c| (c.label.as_str(), c.revoked_at.is_some()))
        .collect();
    revoked.sort();
    assert_eq!(revoked, [("", true), ("rotated", false)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agent_instances_on_one_credential_are_reported_and_neither_is_refused() {
    let control = ControlProc::spawn(&[], &[("NETBORE_BOOTSTRAP_TOKEN", BOOT)]);
    control.wait_ready().await;
    let mut edge = EdgeProc::spawn_logs("e1", &control, None, &[], &[]);
    let (_, _, secret) = named_with_credential(&control.url(), "shared").await;
    let (o1, o2) = (Origin::start().await, Origin::start().await);
    let (s1, s2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = ["--tunnel-token", secret.as_str(), "--connections", "1"];
    let mut first = agent(&control.url(), &o1, s1.path(), &args);
    let host = host_of(&first.next_event("live").await["url"]);
    let mut second = agent(&control.url(), &o2, s2.path(), &args);
    let warning = second.next_event("warning").await;
    second.next_event("live").await;
    let id = |d: &Path| {
        std::fs::read_to_string(d.join("instance-id"))
            .unwrap()
            .trim()
            .to_string()
    };
    let (i1, i2) = (id(s1.path()), id(s2.path()));
    assert_ne!(i1, i2);
    let msg = warning["message"].as_str().unwrap();
    assert!(msg.contains(&i1) && msg.contains(&i2), "{msg}");

    // The edge logged a WARN naming both.
    let logged = eventually(Duration::from_secs(5), || {
        let line = edge.proc.stdout.try_recv().ok();
        async move { line.filter(|l| l.contains("WARN") && l.contains("two agent instances")) }
    })
    .await
    .expect("the edge warns about two instances");
    assert!(logged.contains(&i1) && logged.contains(&i2), "{logged}");

    // Not refused: the second was welcomed (live above), both run, the tunnel serves.
    let v = edge.viewer().await;
    assert!(v.serves(&host, WAIT).await);
    assert!(first.child.try_wait().unwrap().is_none());
    assert!(second.child.try_wait().unwrap().is_none());
}
