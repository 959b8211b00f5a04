//! Names that hold and agents that keep going (issue 13 steps 5 and 6, issue 18 item 4),
//! against real `netbore-control`, `netbore-edge` and `netbore` processes: a live name
//! cannot be taken when its hold runs out (one edge; two replicas and two edges on
//! Redis), an agent outlives its management token across an edge restart, a quick
//! tunnel whose name changes says so, and an agent keeps its name on another replica.

use std::path::Path;
use std::time::Duration;

use netbore_control::api::ListTunnelsQuery;
use netbore_control::client::ControlClient;
use netbore_testkit::origin::Origin;
use netbore_testkit::postgres::PostgresServer;
use netbore_testkit::redis::RedisServer;
use netbore_testkit::signing_key;
use netbore_testkit::{ControlProc, EdgeProc, Proc, eventually, free_port};
use netbore_tokens::{KeySet, LEEWAY_SECS, ManagementClaims, now_unix};

/// The name hold these tests give control: short, so a hold that lapsed while the
/// agent is linked would show within the test.
const SHORT_HOLD_SECS: &str = "2";
/// Long enough to wait out [`SHORT_HOLD_SECS`] (the point of those tests).
const PAST_THE_HOLD: Duration = Duration::from_secs(4);
const WAIT: Duration = Duration::from_secs(30);
/// The owner of a contested name: one link, so nothing but the edges' reports renews
/// its hold (a spare link's retries at control would recreate the tunnel too).
const OWNER_ARGS: [&str; 4] = ["--name", "hub-acme", "--connections", "1"];

fn agent(control: &str, origin: &Origin, state: &Path, extra: &[&str]) -> Proc {
    let target = origin.url();
    let mut args = vec![
        "http",
        target.as_str(),
        "--control",
        control,
        "--state-dir",
        state.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proc::spawn("netbore", &args, &[("RUST_LOG", "warn")])
}

/// `http://NAME.localhost:8000 -> origin` → `NAME.localhost:8000`.
fn host_of(line: &str) -> String {
    let url = line.split_whitespace().next().unwrap();
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// Waits for `p` to exit; its exit code and every stdout line it wrote.
async fn exit_of(p: &mut Proc) -> (Option<i32>, String) {
    let st = tokio::time::timeout(WAIT, p.child.wait())
        .await
        .expect("the agent exits (one still running after 30 s was not refused)")
        .unwrap();
    let mut out = String::new();
    while let Ok(Some(l)) = tokio::time::timeout(Duration::from_secs(1), p.stdout.recv()).await {
        out.push_str(&l);
        out.push('\n');
    }
    (st.code(), out)
}

/// A stranger runs `netbore http --name NAME` with no token against `control` while the
/// owner's agent is linked: refused with `name_taken`, and nothing reaches its origin.
async fn stranger_is_refused(control: &str, name: &str) {
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut s = agent(control, &origin, state.path(), &["--name", name, "--json"]);
    let (code, out) = exit_of(&mut s).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("\"code\":\"name_taken\""), "{out}");
    assert!(
        origin.seen().is_empty(),
        "the stranger's origin got requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_name_outlives_its_hold_and_cannot_be_taken_on_one_edge() {
    let control = ControlProc::spawn(&["--name-hold-secs", SHORT_HOLD_SECS], &[]);
    control.wait_ready().await;
    let edge = EdgeProc::spawn("e1", &control, None, &[]);
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut owner = agent(&control.url(), &origin, state.path(), &OWNER_ARGS);
    let host = host_of(&owner.line(WAIT).await);
    let v = edge.viewer().await;
    assert!(v.serves(&host, WAIT).await);

    // The name's own hold runs out; the live link keeps it.
    tokio::time::sleep(PAST_THE_HOLD).await;
    stranger_is_refused(&control.url(), "hub-acme").await;

    for i in 0..10 {
        let r = v.get(&host, "/hello").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    assert!(
        owner.child.try_wait().unwrap().is_none(),
        "the owner still runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_linked_name_cannot_be_taken_through_two_replicas_and_two_edges_on_redis() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = signing_key(dir.path());
    let args = ["--signing-key", &key, "--name-hold-secs", SHORT_HOLD_SECS];
    // Names live in the database the replicas share; Redis carries live state.
    let pg = PostgresServer::start();
    let a = ControlProc::spawn_replica(&pg.url_with_password(), &redis.url(), &args, &[]);
    let b = ControlProc::spawn_replica(&pg.url_with_password(), &redis.url(), &args, &[]);
    a.wait_ready().await;
    b.wait_ready().await;
    let e1 = EdgeProc::spawn("e1", &a, Some(&redis.url()), &[]);
    let e2 = EdgeProc::spawn("e2", &b, Some(&redis.url()), &[]);
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut owner = agent(&a.url(), &origin, state.path(), &OWNER_ARGS);
    let host = host_of(&owner.line(WAIT).await);
    let (v1, v2) = (e1.viewer().await, e2.viewer().await);
    assert!(v1.serves(&host, WAIT).await);
    assert!(v2.serves(&host, WAIT).await);

    tokio::time::sleep(PAST_THE_HOLD).await;
    // Through the replica the owner did not use, and through the first.
    stranger_is_refused(&b.url(), "hub-acme").await;
    stranger_is_refused(&a.url(), "hub-acme").await;

    for i in 0..12 {
        let v = if i % 2 == 0 { &v1 } else { &v2 };
        let r = v.get(&host, "/hello").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    assert!(
        owner.child.try_wait().unwrap().is_none(),
        "the owner still runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_outlives_its_management_token_across_an_edge_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = signing_key(dir.path());
    let control = ControlProc::spawn(&["--signing-key", &key, "--require-token"], &[]);
    control.wait_ready().await;
    // A management token that expires (leeway included) a few seconds from now, signed
    // with control's own key: control cannot issue one shorter than a minute.
    let keys = KeySet::from_pem_files(&[key.clone().into()]).unwrap();
    let lived = 100;
    let claims = ManagementClaims::new_at(
        now_unix() - lived,
        "netbore-control",
        "sidecar",
        vec!["tunnels:read".into(), "tunnels:write".into()],
        lived - LEEWAY_SECS + 4,
    );
    let token = keys.sign_management(&claims).unwrap();

    let e1 = EdgeProc::spawn("e1", &control, None, &[]);
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut a = agent(
        &control.url(),
        &origin,
        state.path(),
        &["--name", "sidecar-app", "--token", &token],
    );
    let host = host_of(&a.line(WAIT).await);
    assert!(e1.viewer().await.serves(&host, WAIT).await);
    let state_file = state.path().join("name-sidecar-app.json");
    let before: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();

    // Wait until control refuses the token.
    let c = ControlClient::new(&control.url()).with_bearer(&token);
    let expired = eventually(Duration::from_secs(20), || {
        let c = c.clone();
        async move {
            match c.list(&ListTunnelsQuery::default()).await {
                Err(e) if e.code().is_some_and(|c| *c == "token_expired") => Some(()),
                _ => None,
            }
        }
    })
    .await;
    assert!(expired.is_some(), "the management token expires");

    // The edge restarts (a new pod): the agent reconnects with its recreate token.
    drop(e1);
    let e2 = EdgeProc::spawn("e2", &control, None, &[]);
    assert!(
        e2.viewer()
            .await
            .serves(&host, Duration::from_secs(45))
            .await,
        "served through the new edge"
    );
    assert!(
        a.child.try_wait().unwrap().is_none(),
        "the agent still runs"
    );
    let after: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    assert_eq!(after["tunnel_id"], before["tunnel_id"], "state dir intact");
    assert_eq!(after["name"], "sidecar-app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_tunnel_whose_name_changes_prints_and_writes_the_new_url() {
    let (rest, grpc) = (free_port(), free_port());
    // No --signing-key: a restarted control has a new key and refuses old tokens.
    let control = ControlProc::spawn_at(rest, grpc, &[], &[]);
    control.wait_ready().await;
    let e1 = EdgeProc::spawn("e1", &control, None, &[]);
    let (o1, o2) = (Origin::start().await, Origin::start().await);
    let (s1, s2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let url_file = s1.path().join("url.txt");
    let mut text = agent(
        &control.url(),
        &o1,
        s1.path(),
        &["--url-file", url_file.to_str().unwrap()],
    );
    let mut json = agent(&control.url(), &o2, s2.path(), &["--json"]);
    let first = text.line(WAIT).await;
    let old_url = first.split_whitespace().next().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(&url_file).unwrap().trim(), old_url);
    let live = json.next_event("live").await;

    drop(control);
    let control = ControlProc::spawn_at(rest, grpc, &[], &[]);
    control.wait_ready().await;
    drop(e1);
    let e2 = EdgeProc::spawn("e2", &control, None, &[]);

    // Text: the new URL line, and the file rewritten.
    let second = text.line(Duration::from_secs(45)).await;
    let new_url = second.split_whitespace().next().unwrap().to_string();
    assert_ne!(new_url, old_url, "{second}");
    assert!(second.contains(" -> http://127.0.0.1:"), "{second}");
    assert_eq!(std::fs::read_to_string(&url_file).unwrap().trim(), new_url);
    assert!(e2.viewer().await.serves(&host_of(&second), WAIT).await);

    // JSON: a url_changed event naming both URLs, then live with the new one.
    let changed = json.next_event("url_changed").await;
    assert_eq!(changed["old_url"], live["url"]);
    assert_ne!(changed["url"], live["url"]);
    assert!(!changed["reason"].as_str().unwrap().is_empty());
    assert_eq!(json.next_event("live").await["url"], changed["url"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_keeps_its_name_on_the_other_replica() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = signing_key(dir.path());
    let args = ["--signing-key", key.as_str()];
    // Names live in the database the replicas share; Redis carries live state.
    let pg = PostgresServer::start();
    let a = ControlProc::spawn_replica(&pg.url_with_password(), &redis.url(), &args, &[]);
    let b = ControlProc::spawn_replica(&pg.url_with_password(), &redis.url(), &args, &[]);
    a.wait_ready().await;
    b.wait_ready().await;
    let e1 = EdgeProc::spawn("e1", &a, Some(&redis.url()), &[]);
    let _e2 = EdgeProc::spawn("e2", &b, Some(&redis.url()), &[]);
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();

    let mut first = agent(&a.url(), &origin, state.path(), &["--name", "roaming"]);
    let line = first.line(WAIT).await;
    first.kill().await;
    let mut second = agent(&b.url(), &origin, state.path(), &["--name", "roaming"]);
    let again = tokio::time::timeout(WAIT, second.stdout.recv())
        .await
        .expect("the agent prints its URL")
        .unwrap_or_else(|| panic!("the agent exited instead of keeping its name"));
    assert_eq!(again, line, "the same URL through the other replica");
    assert!(e1.viewer().await.serves(&host_of(&again), WAIT).await);
}
