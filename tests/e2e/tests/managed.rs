//! Managed tunnels for platforms (issue 15) against real `netbore-control`,
//! `netbore-edge` and `netbore` processes: enrolment is idempotent per external id,
//! also with 100 concurrent calls over two replicas on PostgreSQL; a disabled tunnel
//! answers viewers `tunnel_disabled`, refuses its agent and keeps its name, and comes
//! back when enabled without restarting the agent; the audit trail of a scripted
//! session reads back in order, with actor, key and address, after a control restart;
//! a quick tunnel is deleted when its agent exits cleanly; grpcurl calls the new rpcs.

use std::path::Path;
use std::time::Duration;

use netbore_control::api::{
    AuditQuery, CreateApiKeyRequest, CreateTunnelRequest, EnrollRequest, IssueTokenRequest,
};
use netbore_control::client::ControlClient;
use netbore_testkit::grpcurl;
use netbore_testkit::origin::Origin;
use netbore_testkit::postgres::PostgresServer;
use netbore_testkit::redis::RedisServer;
use netbore_testkit::{ControlProc, EdgeProc, Proc, Stack, Viewer, eventually, free_port};
use serde_json::Value;

const BOOT: &str = "test-bootstrap-credential";
const WAIT: Duration = Duration::from_secs(30);
/// A configured edge, for controls that hand out candidates without a live edge.
const EDGE: &str = "id=e1,url=ws://127.0.0.1:9/v1/connect,region=local";

/// A management token for `subject` with `scopes`, from the bootstrap credential.
async fn token(control: &str, subject: &str, scopes: &[&str]) -> String {
    ControlClient::new(control)
        .with_bearer(BOOT)
        .issue_token(&IssueTokenRequest {
            subject: Some(subject.into()),
            scopes: Some(scopes.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        })
        .await
        .unwrap()
        .token
}

/// An API key of `subject` with tunnels:read and tunnels:write: (key, key id).
async fn platform_key(control: &str, subject: &str) -> (String, String) {
    let admin = token(control, subject, &["tunnels:read", "tunnels:write"]).await;
    let k = ControlClient::new(control)
        .with_bearer(admin)
        .create_api_key(&CreateApiKeyRequest {
            label: "platform".into(),
            scopes: Some(vec!["tunnels:read".into(), "tunnels:write".into()]),
            ..Default::default()
        })
        .await
        .unwrap();
    (k.key, k.api_key.id)
}

fn enrol(external_id: &str, name: Option<&str>) -> EnrollRequest {
    EnrollRequest {
        external_id: external_id.into(),
        requested_name: name.map(str::to_string),
        ..Default::default()
    }
}

/// `netbore http ORIGIN --control CONTROL --state-dir STATE --json --connections 1 EXTRA…`.
fn agent(control: &str, origin: &Origin, state: &Path, extra: &[&str]) -> Proc {
    let mut args = vec!["--connections", "1"];
    args.extend_from_slice(extra);
    netbore_testkit::json_agent(control, &origin.url(), state, &args)
}

fn host_of(url: &Value) -> String {
    url.as_str()
        .unwrap()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// The status and error code `v` gets for `host` once `pred` holds (within `within`).
async fn answer_becomes(
    v: &Viewer,
    host: &str,
    within: Duration,
    pred: impl Fn(u16, Option<&str>) -> bool,
) -> Option<(u16, Option<String>)> {
    eventually(within, || {
        let v = v.clone();
        let host = host.to_string();
        let pred = &pred;
        async move {
            let r = v.get(&host, "/hello").await;
            let st = r.status.as_u16();
            pred(st, r.error_code()).then(|| (st, r.error_code().map(str::to_string)))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_enrolments_over_two_replicas_make_one_tunnel() {
    let redis = RedisServer::start();
    let pg = PostgresServer::start();
    let db = pg.url_with_password();
    let env = [("NETBORE_BOOTSTRAP_TOKEN", BOOT)];
    let a = ControlProc::spawn_replica(&db, &redis.url(), &["--edge", EDGE], &env);
    a.wait_ready().await;
    let b = ControlProc::spawn_replica(&db, &redis.url(), &["--edge", EDGE], &env);
    b.wait_ready().await;
    let (key, _) = platform_key(&a.url(), "workshops").await;

    let mut calls = Vec::new();
    for i in 0..100 {
        let url = if i % 2 == 0 { a.url() } else { b.url() };
        let key = key.clone();
        calls.push(tokio::spawn(async move {
            ControlClient::new(&url)
                .with_bearer(key)
                .enroll(&enrol("seat-17", None))
                .await
        }));
    }
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap().expect("every enrolment succeeds"));
    }
    let first = &answers[0];
    assert!(
        answers.iter().all(|r| r.tunnel_id == first.tunnel_id),
        "one tunnel for one external id"
    );
    assert_eq!(answers.iter().filter(|r| r.created).count(), 1);
    let tokens: Vec<_> = answers
        .iter()
        .filter_map(|r| r.tunnel_token.clone())
        .collect();
    assert_eq!(
        tokens.len(),
        1,
        "the credential is given once, to the creator"
    );
    assert!(tokens[0].starts_with("nbt_"));

    // The owner sees exactly one tunnel; another external id makes another.
    let c = ControlClient::new(&b.url()).with_bearer(key.clone());
    let list = c.list(&Default::default()).await.unwrap();
    assert_eq!(list.tunnels.len(), 1, "{list:?}");
    assert_eq!(list.tunnels[0].name, first.name);
    let other = c.enroll(&enrol("seat-18", Some("seat-18"))).await.unwrap();
    assert!(other.created);
    assert_eq!(other.name, "seat-18");

    // Again: the same tunnel, no credential; a reissue gives a new one and revokes the
    // old one at once.
    let again = c.enroll(&enrol("seat-17", None)).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.tunnel_id, first.tunnel_id);
    assert!(again.tunnel_token.is_none());
    let re = c
        .enroll(&EnrollRequest {
            reissue_credential: true,
            ..enrol("seat-17", None)
        })
        .await
        .unwrap();
    let new_token = re.tunnel_token.expect("a reissue returns the credential");
    assert_ne!(new_token, tokens[0]);
    let creds = c.list_credentials(&first.tunnel_id).await.unwrap();
    let live: Vec<_> = creds
        .credentials
        .iter()
        .filter(|c| c.revoked_at.is_none())
        .collect();
    assert_eq!(live.len(), 1, "{creds:?}");
    assert_eq!(Some(live[0].credential_id.clone()), re.credential_id);
    let old = ControlClient::new(&a.url()).with_bearer(tokens[0].clone());
    let refused = old
        .create(&CreateTunnelRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        refused.code().map(|c| c.as_str()),
        Some("credential_revoked"),
        "{refused}"
    );

    // Bad input is refused with the fix.
    let e = c.enroll(&enrol("has space", None)).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.as_str()), Some("invalid_request"), "{e}");
    assert!(e.to_string().contains("external_id"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disabled_tunnel_refuses_viewers_and_its_agent_keeps_its_name_and_comes_back() {
    let control = ControlProc::spawn(&[], &[("NETBORE_BOOTSTRAP_TOKEN", BOOT)]);
    control.wait_ready().await;
    let edge = EdgeProc::spawn("e1", &control, None, &[]);
    let (key, _) = platform_key(&control.url(), "hub-host").await;
    let c = ControlClient::new(&control.url()).with_bearer(key);
    let en = c.enroll(&enrol("hub-9", Some("hub-9"))).await.unwrap();
    let cred = en.tunnel_token.clone().unwrap();

    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut a = agent(
        &control.url(),
        &origin,
        state.path(),
        &["--tunnel-token", &cred],
    );
    let live = a.next_event("live").await;
    assert_eq!(live["name"], "hub-9");
    let host = host_of(&live["url"]);
    let v = edge.viewer().await;
    assert!(v.serves(&host, WAIT).await);

    let t = c.set_disabled("hub-9", true).await.unwrap();
    assert!(t.disabled_at.is_some());
    // Viewers are told, on the edge, within seconds; the JSON form for API clients.
    let (st, code) = answer_becomes(&v, &host, Duration::from_secs(5), |s, _| s == 403)
        .await
        .expect("403 within 5 s of the disable");
    assert_eq!((st, code.as_deref()), (403, Some("tunnel_disabled")));
    let mut req = v.request("GET", &host, "/hello", netbore_testkit::empty());
    req.headers_mut()
        .insert("accept", "application/json".parse().unwrap());
    let r = v.send(req).await;
    assert_eq!(r.status(), 403);
    let body = netbore_testkit::collect(r).await;
    let j: Value = serde_json::from_str(&body.text()).expect("JSON for an API client");
    assert_eq!(j["error"]["code"], "tunnel_disabled", "{j}");
    // Nothing reaches the origin while disabled, and the agent's credential is refused.
    let refused = ControlClient::new(&control.url())
        .with_bearer(cred.clone())
        .create(&CreateTunnelRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        refused.code().map(|c| c.as_str()),
        Some("tunnel_disabled"),
        "{refused}"
    );
    // The name stays the tunnel's: nobody else may claim it.
    let other = token(
        &control.url(),
        "stranger",
        &["tunnels:write", "names:claim"],
    )
    .await;
    let taken = ControlClient::new(&control.url())
        .with_bearer(other)
        .create(&CreateTunnelRequest {
            requested_name: Some("hub-9".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        taken.code().map(|c| c.as_str()),
        Some("name_taken"),
        "{taken}"
    );
    // It stays refused while the agent keeps trying: no answer in a 3 s window is
    // anything but 403 (bounded: about 15 requests).
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        assert_eq!(v.get(&host, "/hello").await.status, 403);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Enabled: the same agent process links again by itself (its backoff is at most
    // 30 s) and serves.
    let t = c.set_disabled(&en.tunnel_id, false).await.unwrap();
    assert!(t.disabled_at.is_none());
    let (st, _) = answer_becomes(&v, &host, Duration::from_secs(45), |s, _| s == 200)
        .await
        .expect("served again after the enable, without restarting the agent");
    assert_eq!(st, 200);
    assert!(
        a.child.try_wait().unwrap().is_none(),
        "the agent never exited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_of_a_session_reads_back_in_order_after_a_control_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("control.db").display());
    let (rest, grpc) = (free_port(), free_port());
    let args = ["--database-url", db.as_str(), "--edge", EDGE];
    let env = [("NETBORE_BOOTSTRAP_TOKEN", BOOT)];
    let control = ControlProc::spawn_at(rest, grpc, &args, &env);
    control.wait_ready().await;
    let (key, key_id) = platform_key(&control.url(), "acme").await;
    let c = ControlClient::new(&control.url()).with_bearer(key.clone());

    let en = c.enroll(&enrol("vm-1", Some("vm-1"))).await.unwrap();
    let tid = en.tunnel_id.clone();
    let re = c
        .enroll(&EnrollRequest {
            reissue_credential: true,
            ..enrol("vm-1", None)
        })
        .await
        .unwrap();
    let secrets = [en.tunnel_token.clone().unwrap(), re.tunnel_token.unwrap()];
    c.set_disabled(&tid, true).await.unwrap();
    c.set_disabled(&tid, false).await.unwrap();
    c.delete(&netbore_control::api::DeleteTunnelRequest {
        tunnel_id: Some(tid.clone()),
        ..Default::default()
    })
    .await
    .unwrap();

    drop(control);
    let control = ControlProc::spawn_at(rest, grpc, &args, &env);
    control.wait_ready().await;
    let c = ControlClient::new(&control.url()).with_bearer(key);
    let q = AuditQuery {
        tunnel: Some(tid.clone()),
        ..Default::default()
    };
    let page = c.audit(&q).await.unwrap();
    let actions: Vec<&str> = page.events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "tunnel.enroll",
            "credential.issue",
            "credential.issue",
            "credential.revoke",
            "tunnel.disable",
            "tunnel.enable",
            "tunnel.delete",
        ],
        "{page:?}"
    );
    for e in &page.events {
        assert_eq!(e.actor, "acme", "{e:?}");
        assert_eq!(e.key_id.as_deref(), Some(key_id.as_str()), "{e:?}");
        assert_eq!(e.address.as_deref(), Some("127.0.0.1"), "{e:?}");
        assert_eq!(e.tunnel_id.as_deref(), Some(tid.as_str()), "{e:?}");
        assert_eq!(e.owner.as_deref(), Some("acme"), "{e:?}");
        for secret in &secrets {
            assert!(
                !e.detail.to_string().contains(&secret[4..]),
                "a secret: {e:?}"
            );
        }
    }
    // Pages follow each other without a gap or a repeat.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let p = c
            .audit(&AuditQuery {
                limit: Some(3),
                cursor: cursor.clone(),
                ..q.clone()
            })
            .await
            .unwrap();
        seen.extend(p.events.into_iter().map(|e| e.id));
        match p.next_cursor {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    let ids: Vec<String> = page.events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(seen, ids);
    // Another owner reads none of it, and may not ask for acme's.
    let other = token(&control.url(), "mallory", &["tunnels:read"]).await;
    let m = ControlClient::new(&control.url()).with_bearer(other);
    assert!(m.audit(&q).await.unwrap().events.is_empty());
    let e = m
        .audit(&AuditQuery {
            owner: Some("acme".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.as_str()), Some("forbidden"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_tunnel_is_deleted_when_its_agent_exits_cleanly_unless_kept() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let v = Viewer::new(stack.public());
    for (keep, expect) in [
        (false, (404, "tunnel_not_found")),
        (true, (503, "tunnel_offline")),
    ] {
        let state = tempfile::tempdir().unwrap();
        let extra: &[&str] = if keep { &["--keep"] } else { &[] };
        let mut a = agent(&stack.control_url(), &origin, state.path(), extra);
        let host = host_of(&a.next_event("live").await["url"]);
        assert!(v.serves(&host, WAIT).await);
        a.signal("TERM");
        let st = tokio::time::timeout(WAIT, a.child.wait())
            .await
            .expect("the agent exits")
            .unwrap();
        assert!(st.success(), "clean exit: {st}");
        let r = v.get(&host, "/hello").await;
        assert_eq!(
            (r.status.as_u16(), r.error_code()),
            (expect.0, Some(expect.1)),
            "keep={keep}: {}",
            r.text()
        );
        let files: Vec<String> = std::fs::read_dir(state.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f != "instance-id")
            .collect();
        assert_eq!(files.is_empty(), !keep, "keep={keep}: state {files:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_enrols_disables_enables_and_reads_the_audit_trail() {
    let control = ControlProc::spawn(&["--edge", EDGE], &[("NETBORE_BOOTSTRAP_TOKEN", BOOT)]);
    control.wait_ready().await;
    let (key, _) = platform_key(&control.url(), "pods").await;
    let addr = format!("127.0.0.1:{}", control.grpc);
    let auth = format!("authorization: Bearer {key}");
    let out = tokio::task::spawn_blocking(move || {
        let call = |method: &str, body: &str| {
            grpcurl(&[
                "-plaintext",
                "-H",
                &auth,
                "-d",
                body,
                &addr,
                &format!("netbore.control.v1.ControlService/{method}"),
            ])
        };
        [
            call(
                "Enroll",
                r#"{"external_id": "pod-3", "requested_name": "pod-3"}"#,
            ),
            call("Enroll", r#"{"external_id": "pod-3"}"#),
            call("DisableTunnel", r#"{"tunnel": "pod-3"}"#),
            call("EnableTunnel", r#"{"tunnel": "pod-3"}"#),
            call("ListAuditEvents", r#"{"action": "tunnel.disable"}"#),
            call("Enroll", r#"{"external_id": ""}"#),
        ]
    })
    .await
    .unwrap();
    let json = |i: usize| -> Value {
        assert!(out[i].0, "call {i}: {}", out[i].1);
        serde_json::from_str(&out[i].1).unwrap_or_else(|e| panic!("call {i}: {e}: {}", out[i].1))
    };
    let first = json(0);
    assert_eq!(first["name"], "pod-3");
    assert_eq!(first["created"], true);
    assert!(first["tunnelToken"].as_str().unwrap().starts_with("nbt_"));
    let second = json(1);
    assert_eq!(second["tunnelId"], first["tunnelId"]);
    assert!(second.get("tunnelToken").is_none(), "{second}");
    assert!(json(2)["disabledAt"].as_str().is_some());
    assert!(json(3).get("disabledAt").is_none());
    let audit = json(4);
    let events = audit["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{audit}");
    assert_eq!(events[0]["actor"], "pods");
    assert_eq!(events[0]["tunnelId"], first["tunnelId"]);
    assert!(!out[5].0, "an empty external_id is refused");
    assert!(out[5].1.contains("InvalidArgument"), "{}", out[5].1);
    assert!(out[5].1.contains("external_id"), "{}", out[5].1);
}
