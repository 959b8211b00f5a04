//! Tunnel credentials at control over real sockets: issue, list, revoke over REST and
//! gRPC; a create with the credential alone (also under `--require-token`) gets the
//! tunnel back with a token naming the credential and no recreate token; every refusal
//! is JSON with a code; a revocation reaches edge links as `RevokeCredential`, also a
//! link opened after it.

mod common;

use common::{Harness, WAIT, api_err, named};
use netbore_control::api::{CreateTunnelRequest, IssueCredentialRequest, IssuedCredential};
use netbore_control::grpc::ERROR_CODE_METADATA;
use netbore_proto::control::v1 as pb;
use netbore_proto::control::v1::control_service_client::ControlServiceClient;
use netbore_proto::edge::v1 as epb;
use netbore_proto::edge::v1::edge_service_client::EdgeServiceClient;
use netbore_tokens::Verifier;
use tonic::Request;

const ISS: &str = "netbore-control";

/// Control with `--require-token`, a named tunnel `app` and one credential for it.
async fn with_credential() -> (Harness, String, IssuedCredential) {
    let h = Harness::start_with(|c| c.require_token = true).await;
    let admin = h.admin(&["tunnels:write"]).await;
    let created = admin
        .create(&CreateTunnelRequest {
            requested_name: Some("myapp".into()),
            issue_credential: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let cred = created.credential.expect("issue_credential returns one");
    (h, created.tunnel_id, cred)
}

#[tokio::test]
async fn a_credential_alone_gets_its_tunnel_back_until_it_is_revoked() {
    let (h, tunnel_id, cred) = with_credential().await;
    assert!(cred.secret.starts_with("nbt_") && cred.secret.len() == 68);
    assert!(cred.credential.credential_id.starts_with("tcr_"));
    assert!(cred.secret.starts_with(&cred.credential.prefix));

    // As the bearer and as the field, under --require-token, with no other secret.
    let by_bearer = h
        .client()
        .with_bearer(&cred.secret)
        .create(&CreateTunnelRequest::default())
        .await
        .unwrap();
    let by_field = h
        .client()
        .create(&CreateTunnelRequest {
            requested_name: Some("myapp".into()),
            tunnel_credential: Some(cred.secret.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    for c in [&by_bearer, &by_field] {
        assert_eq!(c.tunnel_id, tunnel_id);
        assert_eq!(c.name(), "myapp");
        assert!(c.recreate_token.is_empty(), "no recreate token: {c:?}");
        let claims = Verifier::new(&h.client().jwks().await.unwrap(), ISS)
            .unwrap()
            .verify_ephemeral(&c.ephemeral_token)
            .unwrap();
        assert_eq!(
            claims.cred.as_deref(),
            Some(cred.credential.credential_id.as_str())
        );
        assert_eq!(claims.sub, tunnel_id);
    }

    // Listed with its prefix and last use; never the secret.
    let admin = h.admin(&["tunnels:write"]).await;
    let second = admin
        .issue_credential(
            "myapp",
            &IssueCredentialRequest {
                label: "second".into(),
            },
        )
        .await
        .unwrap();
    let list = admin.list_credentials(&tunnel_id).await.unwrap();
    let text = serde_json::to_string(&list).unwrap();
    assert!(
        !text.contains(&cred.secret) && !text.contains(&second.secret),
        "{text}"
    );
    assert!(!text.contains("secret"), "{text}");
    // Oldest first by the second; these two were issued within one, so by id.
    let used: std::collections::BTreeMap<_, _> = list
        .credentials
        .iter()
        .map(|c| (c.credential_id.as_str(), c.last_used_at.is_some()))
        .collect();
    let expected: std::collections::BTreeMap<_, _> = [
        (cred.credential.credential_id.as_str(), true),
        (second.credential.credential_id.as_str(), false),
    ]
    .into();
    assert_eq!(used, expected);

    // Revoked: refused at once with its own code; the other credential still works.
    let mut deletions = h.control.subscribe_deletions();
    let r = admin
        .revoke_credential("myapp", &cred.credential.credential_id)
        .await
        .unwrap();
    assert!(r.revoked_at.is_some());
    let announced = tokio::time::timeout(WAIT, deletions.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(announced, format!("cred:{}", cred.credential.credential_id));
    let e = h
        .client()
        .with_bearer(&cred.secret)
        .create(&CreateTunnelRequest::default())
        .await
        .unwrap_err();
    let (status, code, message) = api_err(e);
    assert_eq!((status, code.as_str()), (401, "credential_revoked"));
    assert!(message.contains("issue a new one"), "{message}");
    h.client()
        .with_bearer(&second.secret)
        .create(&CreateTunnelRequest::default())
        .await
        .unwrap();
    // Revoking again keeps the first time.
    let again = admin
        .revoke_credential(&tunnel_id, &cred.credential.credential_id)
        .await
        .unwrap();
    assert_eq!(again.revoked_at, r.revoked_at);
    h.stop().await;
}

#[tokio::test]
async fn every_credential_refusal_is_a_json_error_with_its_code() {
    let (h, tunnel_id, cred) = with_credential().await;
    let admin = h.admin(&["tunnels:write"]).await;
    let reader = h.admin(&["tunnels:read"]).await;
    let quick = admin.create(&CreateTunnelRequest::default()).await.unwrap();

    let forged = format!("nbt_{}", "0".repeat(64));
    let other_half = format!("{}{}", &cred.secret[..16], "f".repeat(52));
    let cases: Vec<(u16, &str, netbore_control::client::ControlError)> = vec![
        (
            401,
            "unauthorized",
            h.client().list_credentials("myapp").await.unwrap_err(),
        ),
        (
            403,
            "forbidden",
            reader.list_credentials("myapp").await.unwrap_err(),
        ),
        (
            401,
            "unauthorized",
            h.client()
                .with_bearer(&cred.secret)
                .list_credentials("myapp")
                .await
                .unwrap_err(),
        ),
        (
            404,
            "tunnel_not_found",
            admin.list_credentials("nope").await.unwrap_err(),
        ),
        (
            409,
            "tunnel_not_named",
            admin
                .issue_credential(&quick.tunnel_id, &IssueCredentialRequest::default())
                .await
                .unwrap_err(),
        ),
        (
            404,
            "credential_not_found",
            admin
                .revoke_credential(&tunnel_id, "tcr_nope")
                .await
                .unwrap_err(),
        ),
        (
            400,
            "invalid_request",
            admin
                .issue_credential(
                    "myapp",
                    &IssueCredentialRequest {
                        label: "x".repeat(129),
                    },
                )
                .await
                .unwrap_err(),
        ),
        (
            401,
            "credential_invalid",
            h.client()
                .with_bearer("nbt_short")
                .create(&CreateTunnelRequest::default())
                .await
                .unwrap_err(),
        ),
        (
            401,
            "credential_invalid",
            h.client()
                .with_bearer(&forged)
                .create(&CreateTunnelRequest::default())
                .await
                .unwrap_err(),
        ),
        (
            401,
            "credential_invalid",
            h.client()
                .with_bearer(&other_half)
                .create(&CreateTunnelRequest::default())
                .await
                .unwrap_err(),
        ),
        (
            403,
            "forbidden",
            h.client()
                .with_bearer(&cred.secret)
                .create(&named("another"))
                .await
                .unwrap_err(),
        ),
        (
            400,
            "invalid_request",
            admin
                .create(&CreateTunnelRequest {
                    tunnel_credential: Some(cred.secret.clone()),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
        (
            400,
            "invalid_request",
            admin
                .create(&CreateTunnelRequest {
                    issue_credential: true,
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
    ];
    for (i, (status, code, e)) in cases.into_iter().enumerate() {
        let (s, c, m) = api_err(e);
        assert_eq!((s, c.as_str()), (status, code), "case {i}: {m}");
        assert!(!m.is_empty(), "case {i}");
        assert!(!m.contains(&cred.secret), "case {i} shows the secret: {m}");
    }

    // At most MAX_CREDENTIALS_PER_TUNNEL unrevoked credentials.
    let max = netbore_control::ops::MAX_CREDENTIALS_PER_TUNNEL;
    for _ in 1..max {
        admin
            .issue_credential("myapp", &IssueCredentialRequest::default())
            .await
            .unwrap();
    }
    let (s, c, _) = api_err(
        admin
            .issue_credential("myapp", &IssueCredentialRequest::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((s, c.as_str()), (409, "too_many_credentials"));
    admin
        .revoke_credential("myapp", &cred.credential.credential_id)
        .await
        .unwrap();
    let fresh = admin
        .issue_credential("myapp", &IssueCredentialRequest::default())
        .await
        .expect("a revoked credential frees its place");

    // Deleting the tunnel deletes its credentials.
    admin
        .delete(&netbore_control::api::DeleteTunnelRequest {
            name: Some("myapp".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let (s, c, _) = api_err(
        h.client()
            .with_bearer(&fresh.secret)
            .create(&CreateTunnelRequest::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((s, c.as_str()), (401, "credential_invalid"));
    let (s, c, _) = api_err(admin.list_credentials(&tunnel_id).await.unwrap_err());
    assert_eq!((s, c.as_str()), (404, "tunnel_not_found"));
    h.stop().await;
}

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test]
async fn grpc_issues_lists_and_revokes_credentials_and_edges_hear_of_it() {
    let h = Harness::start().await;
    let mgmt = h.management_token(&["tunnels:write"]).await;
    let mut c = ControlServiceClient::connect(format!("http://{}", h.grpc))
        .await
        .unwrap();
    let t = c
        .create_tunnel(authed(
            pb::CreateTunnelRequest {
                requested_name: "grpc-app".into(),
                ..Default::default()
            },
            &mgmt,
        ))
        .await
        .unwrap()
        .into_inner();
    let issued = c
        .issue_tunnel_credential(authed(
            pb::IssueTunnelCredentialRequest {
                name: "grpc-app".into(),
                label: "ci".into(),
                ..Default::default()
            },
            &mgmt,
        ))
        .await
        .unwrap()
        .into_inner();
    let cred = issued.credential.unwrap();
    assert!(issued.secret.starts_with("nbt_"));
    assert_eq!(cred.tunnel_id, t.tunnel_id);
    assert_eq!(cred.label, "ci");

    // CreateTunnel with the credential alone.
    let back = c
        .create_tunnel(pb::CreateTunnelRequest {
            tunnel_credential: issued.secret.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.tunnel_id, t.tunnel_id);
    assert!(back.recreate_token.is_empty());

    let listed = c
        .list_tunnel_credentials(authed(
            pb::ListTunnelCredentialsRequest {
                tunnel_id: t.tunnel_id.clone(),
                ..Default::default()
            },
            &mgmt,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.credentials.len(), 1);
    assert!(!format!("{listed:?}").contains(&issued.secret));
    assert!(!listed.credentials[0].last_used_at.is_empty());

    // An edge linked now hears the revocation; a bearer-less call is refused first.
    let (_tx, mut commands) = edge_link(&h, "edge-now").await;
    let denied = c
        .revoke_tunnel_credential(pb::RevokeTunnelCredentialRequest {
            name: "grpc-app".into(),
            credential_id: cred.credential_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        denied.metadata().get(ERROR_CODE_METADATA).unwrap(),
        "unauthorized"
    );
    let revoked = c
        .revoke_tunnel_credential(authed(
            pb::RevokeTunnelCredentialRequest {
                name: "grpc-app".into(),
                credential_id: cred.credential_id.clone(),
                ..Default::default()
            },
            &mgmt,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!revoked.revoked_at.is_empty());
    assert!(
        revocation_heard(&mut commands, &cred.credential_id).await,
        "the linked edge was told"
    );
    // An edge that links afterwards is told too (replayed like deletions).
    let (_tx2, mut late) = edge_link(&h, "edge-late").await;
    assert!(
        revocation_heard(&mut late, &cred.credential_id).await,
        "a late edge was told"
    );
    let e = c
        .create_tunnel(pb::CreateTunnelRequest {
            tunnel_credential: issued.secret.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        e.metadata().get(ERROR_CODE_METADATA).unwrap(),
        "credential_revoked"
    );
    h.stop().await;
}

/// An authenticated edge link reporting as `edge_id`.
async fn edge_link(
    h: &Harness,
    edge_id: &str,
) -> (
    tokio::sync::mpsc::Sender<epb::EdgeReport>,
    tonic::Streaming<epb::EdgeCommand>,
) {
    let mut ec = EdgeServiceClient::connect(format!("http://{}", h.grpc))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<epb::EdgeReport>(4);
    tx.send(epb::EdgeReport {
        edge_id: edge_id.into(),
        agent_url: format!("ws://{edge_id}.test/v1/connect"),
        region: "default".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let reports =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut req = Request::new(reports);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", common::EDGE_TOKEN).parse().unwrap(),
    );
    (tx, ec.link(req).await.unwrap().into_inner())
}

/// True once `commands` carries `RevokeCredential` for `credential_id` with a
/// `revoked_until` in the future (other commands are skipped; at most 10).
async fn revocation_heard(
    commands: &mut tonic::Streaming<epb::EdgeCommand>,
    credential_id: &str,
) -> bool {
    for _ in 0..10 {
        match tokio::time::timeout(WAIT, commands.message()).await {
            Ok(Ok(Some(epb::EdgeCommand {
                command: Some(epb::edge_command::Command::RevokeCredential(r)),
            }))) if r.credential_id == credential_id => {
                return r.revoked_until > netbore_tokens::now_unix();
            }
            Ok(Ok(Some(_))) => continue,
            _ => return false,
        }
    }
    false
}
