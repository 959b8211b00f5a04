//! Control's REST and gRPC APIs over real sockets, a real grpcurl, key rotation with
//! connected agents, and deleting a tunnel across real processes.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use netbore_proto::control::v1 as pb;
use netbore_proto::control::v1::control_service_client::ControlServiceClient;
use netbore_testkit::grpcurl;
use netbore_testkit::origin::Origin;
use netbore_testkit::{ControlProc, Proc, Stack, Viewer, eventually, free_port};
use serde_json::{Value, json};

const BOOT: &str = "test-bootstrap-credential";

async fn stack() -> Stack {
    Stack::start_with(|c| c.bootstrap_token = Some(netbore_tokens::Secret::new(BOOT))).await
}

/// A JSON call to control's REST API: (status, body).
async fn call(
    stack: &Stack,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", stack.control_url()))
        .header("content-type", "application/json");
    if let Some(b) = bearer {
        req = req.header("authorization", format!("Bearer {b}"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let resp = client
        .request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn admin_token(stack: &Stack, scopes: &[&str]) -> String {
    let (st, b) = call(
        stack,
        "POST",
        "/auth/token",
        Some(BOOT),
        Some(json!({"scopes": scopes})),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    b["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn create_list_and_delete_over_rest() {
    let s = stack().await;
    let (st, created) = call(&s, "POST", "/tunnels/create", None, Some(json!({}))).await;
    assert_eq!(st, 200, "{created}");
    let name = created["public_hostname"]
        .as_str()
        .unwrap()
        .split('.')
        .next()
        .unwrap()
        .to_string();
    assert!(name.split('-').count() == 3, "readable random name: {name}");
    assert!(!created["candidates"].as_array().unwrap().is_empty());
    assert!(
        created["candidates_expires_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );

    // Listing needs a management token with tunnels:read.
    let (st, b) = call(&s, "GET", "/tunnels/list", None, None).await;
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    // Admin: the tunnels here are anonymous, which only admin sees (docs/control.md, Owners).
    let admin = admin_token(&s, &["admin"]).await;
    let (st, b) = call(
        &s,
        "GET",
        &format!("/tunnels/list?prefix={name}"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(b["tunnels"][0]["tunnel_id"], created["tunnel_id"]);

    let (st, b) = call(
        &s,
        "POST",
        "/tunnels/delete",
        Some(&admin),
        Some(json!({"tunnel_id": created["tunnel_id"]})),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let (_, b) = call(
        &s,
        "GET",
        &format!("/tunnels/list?prefix={name}"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(b["tunnels"].as_array().unwrap().len(), 0);
    // The deleted tunnel's recreate token no longer brings it back.
    let (st, b) = call(
        &s,
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"recreate_token": created["recreate_token"]})),
    )
    .await;
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (410, Some("tunnel_deleted"))
    );
}

#[tokio::test]
async fn names_are_held_until_the_right_token_is_shown() {
    let s = stack().await;
    let (st, first) = call(
        &s,
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"requested_name": "demo-app"})),
    )
    .await;
    assert_eq!(st, 200, "{first}");
    assert_eq!(first["public_hostname"], "demo-app.localhost");

    let (st, b) = call(
        &s,
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"requested_name": "demo-app"})),
    )
    .await;
    assert_eq!((st, b["error"]["code"].as_str()), (409, Some("name_taken")));
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("recreate token")
    );

    // The recreate token alone gives back the same tunnel and name.
    let (st, again) = call(
        &s,
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"recreate_token": first["recreate_token"]})),
    )
    .await;
    assert_eq!(st, 200, "{again}");
    assert_eq!(again["tunnel_id"], first["tunnel_id"]);
    assert_eq!(again["public_hostname"], "demo-app.localhost");

    // A management token without names:claim cannot take it; one with it can.
    let plain = admin_token(&s, &["tunnels:write"]).await;
    let (st, _) = call(
        &s,
        "POST",
        "/tunnels/create",
        Some(&plain),
        Some(json!({"requested_name": "demo-app"})),
    )
    .await;
    assert_eq!(st, 409);
    let claim = admin_token(&s, &["names:claim"]).await;
    let (st, b) = call(
        &s,
        "POST",
        "/tunnels/create",
        Some(&claim),
        Some(json!({"requested_name": "demo-app"})),
    )
    .await;
    assert_eq!(st, 200, "{b}");
}

#[tokio::test]
async fn reserved_invalid_and_clamped_requests_say_why() {
    let s = stack().await;
    for (name, code) in [
        ("www", "name_reserved"),
        ("admin", "name_reserved"),
        ("Bad_Name", "name_invalid"),
        ("-x", "name_invalid"),
        ("a.b", "name_invalid"),
    ] {
        let (st, b) = call(
            &s,
            "POST",
            "/tunnels/create",
            None,
            Some(json!({"requested_name": name})),
        )
        .await;
        assert_eq!(
            (st, b["error"]["code"].as_str()),
            (400, Some(code)),
            "{name}: {b}"
        );
    }
    let (st, b) = call(
        &s,
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"recreate_token_ttl_seconds": 999_999_999u64})),
    )
    .await;
    assert_eq!(st, 200);
    assert!(b["note"].as_str().unwrap().contains("clamped"), "{b}");
    let (st, b) = call(
        &s,
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"surprise": 1})),
    )
    .await;
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
}

#[tokio::test]
async fn tokens_of_the_wrong_kind_or_origin_are_refused_with_a_reason() {
    let s = stack().await;
    let (_, created) = call(&s, "POST", "/tunnels/create", None, Some(json!({}))).await;
    // An ephemeral token offered as a recreate token.
    let (st, b) = call(
        &s,
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"recreate_token": created["ephemeral_token"]})),
    )
    .await;
    assert_eq!(st, 401);
    assert!(
        b["error"]["code"].as_str().unwrap().starts_with("token_"),
        "{b}"
    );
    // A recreate token offered as a management token.
    let (st, b) = call(
        &s,
        "GET",
        "/tunnels/list",
        created["recreate_token"].as_str(),
        None,
    )
    .await;
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (401, Some("token_wrong_type"))
    );
    // The wrong bootstrap credential.
    let (st, _) = call(&s, "POST", "/auth/token", Some("guess"), Some(json!({}))).await;
    assert_eq!(st, 401);
    // A token from another control (another key).
    let other = Stack::start().await;
    let (_, foreign) = call(&other, "POST", "/tunnels/create", None, Some(json!({}))).await;
    let (st, b) = call(
        &s,
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"recreate_token": foreign["recreate_token"]})),
    )
    .await;
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (401, Some("token_unknown_kid"))
    );
}

#[tokio::test]
async fn grpc_create_and_list_with_a_bearer_token() {
    let s = stack().await;
    // Admin: the tunnels here are anonymous, which only admin sees (docs/control.md, Owners).
    let admin = admin_token(&s, &["admin"]).await;
    let mut c = ControlServiceClient::connect(format!("http://{}", s.dev.grpc))
        .await
        .unwrap();
    let created = c
        .create_tunnel(pb::CreateTunnelRequest {
            requested_name: "grpc-made".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.public_hostname, "grpc-made.localhost");

    let err = c
        .list_tunnels(pb::ListTunnelsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let mut req = tonic::Request::new(pb::ListTunnelsRequest {
        prefix: "grpc-".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {admin}").parse().unwrap());
    let list = c.list_tunnels(req).await.unwrap().into_inner();
    assert_eq!(list.tunnels.len(), 1);
    assert_eq!(list.tunnels[0].tunnel_id, created.tunnel_id);

    // Deleted through gRPC, gone through REST.
    let mut req = tonic::Request::new(pb::DeleteTunnelRequest {
        name: "grpc-made".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {admin}").parse().unwrap());
    c.delete_tunnel(req).await.unwrap();
    let (_, b) = call(&s, "GET", "/tunnels/list?prefix=grpc-", Some(&admin), None).await;
    assert_eq!(b["tunnels"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_calls_without_proto_files() {
    let s = stack().await;
    let addr = s.dev.grpc.to_string();
    // Admin: the tunnels here are anonymous, which only admin sees (docs/control.md, Owners).
    let admin = admin_token(&s, &["admin"]).await;
    let (_, _) = call(
        &s,
        "POST",
        "/tunnels/create",
        None,
        Some(json!({"requested_name": "seen-by-grpcurl"})),
    )
    .await;
    let auth = format!("authorization: Bearer {admin}");
    let (addr2, auth2) = (addr.clone(), auth.clone());
    let (list, describe, call_out, health, ready) = tokio::task::spawn_blocking(move || {
        (
            grpcurl(&["-plaintext", &addr2, "list"]),
            grpcurl(&[
                "-plaintext",
                &addr2,
                "describe",
                "netbore.control.v1.ControlService",
            ]),
            grpcurl(&[
                "-plaintext",
                "-H",
                &auth2,
                "-d",
                r#"{"prefix":"seen-"}"#,
                &addr2,
                "netbore.control.v1.ControlService/ListTunnels",
            ]),
            grpcurl(&["-plaintext", &addr2, "grpc.health.v1.Health/Check"]),
            grpcurl(&[
                "-plaintext",
                "-d",
                r#"{"service":"readiness"}"#,
                &addr2,
                "grpc.health.v1.Health/Check",
            ]),
        )
    })
    .await
    .unwrap();
    assert!(list.0, "{}", list.1);
    for svc in [
        "netbore.control.v1.ControlService",
        "netbore.edge.v1.EdgeService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(list.1.contains(svc), "{svc} missing from:\n{}", list.1);
    }
    assert!(
        describe.0 && describe.1.contains("rpc ListTunnels"),
        "{}",
        describe.1
    );
    assert!(
        call_out.0 && call_out.1.contains("seen-by-grpcurl"),
        "{}",
        call_out.1
    );
    assert!(health.0 && health.1.contains("SERVING"), "{}", health.1);
    assert!(ready.0 && ready.1.contains("SERVING"), "{}", ready.1);
    // Without the token: a clear refusal.
    let denied = tokio::task::spawn_blocking(move || {
        grpcurl(&[
            "-plaintext",
            "-d",
            "{}",
            &addr,
            "netbore.control.v1.ControlService/ListTunnels",
        ])
    })
    .await
    .unwrap();
    assert!(
        !denied.0 && denied.1.contains("Unauthenticated"),
        "{}",
        denied.1
    );
}

#[tokio::test]
async fn a_key_rotation_keeps_connected_agents_and_admits_new_ones() {
    let s = Stack::start().await;
    let origin = Origin::start().await;
    let v = Viewer::new(s.public());
    let before = s.agent(&origin.url()).await;
    assert_eq!(v.get(&before.host(), "/hello").await.status, 200);

    s.dev.control_state.rotate_keys();
    assert_eq!(s.dev.control_state.jwks().keys.len(), 2);

    // The connected agent keeps serving; a new one, whose token has the new key id,
    // is admitted once the edge has fetched the new key set.
    assert_eq!(v.get(&before.host(), "/hello").await.status, 200);
    let after = s.agent(&origin.url()).await;
    assert_eq!(v.get(&after.host(), "/hello").await.status, 200);
    assert_eq!(v.get(&before.host(), "/hello").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_tunnel_disconnects_its_agent_across_processes() {
    let (public, agents, admin) = (free_port(), free_port(), free_port());
    let template = format!("http://{{name}}.localhost:{public}");
    let control = ControlProc::spawn(
        &["--public-url-template", &template],
        &[("NETBORE_BOOTSTRAP_TOKEN", BOOT)],
    );
    let (rest, grpc) = (control.rest, control.grpc);
    let _edge = Proc::spawn(
        "netbore-edge",
        &[
            "--public-addr",
            &format!("127.0.0.1:{public}"),
            "--agent-addr",
            &format!("127.0.0.1:{agents}"),
            // Not the default 0.0.0.0:9090, which another edge on the machine may hold.
            "--admin-addr",
            &format!("127.0.0.1:{admin}"),
            "--control-url",
            &format!("http://127.0.0.1:{rest}"),
            "--control-grpc",
            &format!("http://127.0.0.1:{grpc}"),
        ],
        &[("RUST_LOG", "warn")],
    );
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let control_url = format!("http://127.0.0.1:{rest}");
    // The agent retries until the edge has linked to control and is handed out.
    let mut agent = Proc::spawn(
        "netbore",
        &[
            "http",
            &origin.url(),
            "--control",
            &control_url,
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
    let url = live["url"].as_str().unwrap();
    let host = url.trim_start_matches("http://").to_string();
    let v = Viewer::new(([127, 0, 0, 1], public).into());
    assert_eq!(v.get(&host, "/hello").await.status, 200);

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let tok_req = http::Request::post(format!("{control_url}/auth/token"))
        .header("authorization", format!("Bearer {BOOT}"))
        .body(Full::new(Bytes::from(r#"{"scopes": ["admin"]}"#)))
        .unwrap();
    let tok: Value = serde_json::from_slice(
        &client
            .request(tok_req)
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes(),
    )
    .unwrap();
    let del = http::Request::post(format!("{control_url}/tunnels/delete"))
        .header(
            "authorization",
            format!("Bearer {}", tok["token"].as_str().unwrap()),
        )
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"tunnel_id": live["tunnel_id"]}).to_string(),
        )))
        .unwrap();
    assert_eq!(client.request(del).await.unwrap().status(), 200);

    let exit = tokio::time::timeout(Duration::from_secs(10), agent.child.wait())
        .await
        .expect("the agent of a deleted tunnel stops within seconds")
        .unwrap();
    assert_eq!(exit.code(), Some(2));
    let gone = eventually(Duration::from_secs(5), || {
        let v = v.clone();
        let host = host.clone();
        async move {
            let r = v.get(&host, "/hello").await;
            (r.status != 200).then_some(r.status)
        }
    })
    .await;
    assert!(gone.is_some(), "the tunnel stops serving");
}
