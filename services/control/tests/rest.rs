//! Control's REST API over real sockets, as agents, scripts and edges use it.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{BOOT, Harness, WAIT, api_err, named};
use netbore_control::api::{
    CreateTunnelRequest, DeleteTunnelRequest, IssueTokenRequest, ListTunnelsQuery,
};
use netbore_tokens::{
    AUD_EDGE, EphemeralClaims, KeySet, ManagementClaims, RecreateClaims, Verifier, kid_of, now_unix,
};

const ISS: &str = "netbore-control";

#[tokio::test]
async fn create_list_and_delete_over_a_real_socket() {
    let h = Harness::start().await;
    // Admin: the tunnels below are anonymous, which only admin sees.
    let admin = h.admin(&["admin"]).await;

    // A random name, readable: adjective-noun-suffix.
    let random = h
        .client()
        .create(&CreateTunnelRequest::default())
        .await
        .unwrap();
    let name = random.name().to_string();
    assert_eq!(name.split('-').count(), 3, "{name}");
    assert_eq!(random.public_hostname, format!("{name}.tunnels.test"));
    assert_eq!(random.public_url, format!("https://{name}.tunnels.test"));
    assert!(random.tunnel_id.starts_with("tun_"));
    assert!((1..=3).contains(&random.candidates.len()));
    let expires = time::OffsetDateTime::parse(
        &random.candidates_expires_at,
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let in_secs = expires.unix_timestamp() - now_unix() as i64;
    assert!((250..=300).contains(&in_secs), "{in_secs}");

    // An edge verifies the ephemeral token with the published keys alone.
    let jwks = h.client().jwks().await.unwrap();
    let claims = Verifier::new(&jwks, ISS)
        .unwrap()
        .verify_ephemeral(&random.ephemeral_token)
        .unwrap();
    assert_eq!(claims.sub, random.tunnel_id);
    assert_eq!(claims.name, name);
    assert_eq!(claims.aud, AUD_EDGE);

    let demo = h.client().create(&named("demo-app")).await.unwrap();
    assert_eq!(demo.public_hostname, "demo-app.tunnels.test");

    // List, by prefix and page by page.
    let all = admin.list(&ListTunnelsQuery::default()).await.unwrap();
    assert_eq!(all.tunnels.len(), 2);
    assert!(all.next_cursor.is_none());
    let only = admin
        .list(&ListTunnelsQuery {
            prefix: "demo".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(only.tunnels.len(), 1);
    assert_eq!(only.tunnels[0].tunnel_id, demo.tunnel_id);
    let p1 = admin
        .list(&ListTunnelsQuery {
            limit: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(p1.tunnels.len(), 1);
    let p2 = admin
        .list(&ListTunnelsQuery {
            limit: Some(1),
            cursor: p1.next_cursor.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(p2.tunnels.len(), 1);
    assert!(p2.next_cursor.is_none());
    assert_ne!(p1.tunnels[0].name, p2.tunnels[0].name);

    // Delete by name: gone from the list, its recreate token refused, its name free.
    let mut deletions = h.control.subscribe_deletions();
    let d = admin
        .delete(&DeleteTunnelRequest {
            name: Some("demo-app".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(d.deleted, demo.tunnel_id);
    let announced = tokio::time::timeout(WAIT, deletions.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(announced, demo.tunnel_id);
    let after = admin.list(&ListTunnelsQuery::default()).await.unwrap();
    assert_eq!(after.tunnels.len(), 1);
    let (st, code, _) = api_err(
        h.client()
            .create(&CreateTunnelRequest {
                recreate_token: Some(demo.recreate_token.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (410, "tunnel_deleted"));
    let again = h.client().create(&named("demo-app")).await.unwrap();
    assert_ne!(again.tunnel_id, demo.tunnel_id);

    // Deleting with the tunnel's own recreate token, which alone identifies it.
    let d = h
        .client()
        .delete(&DeleteTunnelRequest {
            recreate_token: Some(random.recreate_token.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(d.name, name);
    // ...but not another tunnel's.
    let (st, code, _) = api_err(
        h.client()
            .delete(&DeleteTunnelRequest {
                tunnel_id: Some(again.tunnel_id.clone()),
                recreate_token: Some(random.recreate_token.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (403, "forbidden"));
    // Without any credential.
    let (st, code, _) = api_err(
        h.client()
            .delete(&DeleteTunnelRequest {
                tunnel_id: Some(again.tunnel_id.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (401, "unauthorized"));
    h.stop().await;
}

#[tokio::test]
async fn a_held_name_needs_its_recreate_token_or_a_claiming_management_token() {
    let h = Harness::start().await;
    let first = h.client().create(&named("demo")).await.unwrap();

    // Someone else cannot have it, and is told what would work.
    let (st, code, msg) = api_err(h.client().create(&named("demo")).await.unwrap_err());
    assert_eq!((st, code.as_str()), (409, "name_taken"));
    assert!(
        msg.contains("'demo'") && msg.contains("recreate token"),
        "{msg}"
    );

    // Another tunnel's recreate token does not prove anything about this name.
    let other = h.client().create(&named("other")).await.unwrap();
    let (st, code, _) = api_err(
        h.client()
            .create(&CreateTunnelRequest {
                requested_name: Some("demo".into()),
                recreate_token: Some(other.recreate_token),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (409, "name_taken"));

    // The name's recreate token, with the name or alone, gives the same tunnel back.
    for req in [
        CreateTunnelRequest {
            requested_name: Some("demo".into()),
            recreate_token: Some(first.recreate_token.clone()),
            ..Default::default()
        },
        CreateTunnelRequest {
            recreate_token: Some(first.recreate_token.clone()),
            ..Default::default()
        },
    ] {
        let again = h.client().create(&req).await.unwrap();
        assert_eq!(again.tunnel_id, first.tunnel_id);
        assert_eq!(again.public_hostname, "demo.tunnels.test");
        assert_ne!(again.ephemeral_token, "");
    }

    // A management token without names:claim is not enough; with it, it is (in the
    // body or as the bearer), and the tunnel is the same one.
    let plain = h.management_token(&["tunnels:write"]).await;
    let (st, code, _) = api_err(
        h.client()
            .create(&CreateTunnelRequest {
                requested_name: Some("demo".into()),
                management_token: Some(plain),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (409, "name_taken"));
    let claim = h.management_token(&["names:claim"]).await;
    let taken = h
        .client()
        .create(&CreateTunnelRequest {
            requested_name: Some("demo".into()),
            management_token: Some(claim.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(taken.tunnel_id, first.tunnel_id);
    let taken = h
        .client()
        .with_bearer(claim)
        .create(&named("demo"))
        .await
        .unwrap();
    assert_eq!(taken.tunnel_id, first.tunnel_id);
    h.stop().await;
}

#[tokio::test]
async fn concurrent_claims_of_one_name_have_one_winner() {
    let h = Harness::start().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = h.client();
        tasks.push(tokio::spawn(
            async move { c.create(&named("contested")).await },
        ));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => won += 1,
            Err(e) => assert_eq!(e.code().map(|c| c.as_str()), Some("name_taken"), "{e}"),
        }
    }
    assert_eq!(won, 1);
    h.stop().await;
}

#[tokio::test]
async fn reserved_and_invalid_names_are_refused_with_a_reason() {
    let h = Harness::start().await;
    for name in ["www", "api", "admin", "control", "edge"] {
        let (st, code, msg) = api_err(h.client().create(&named(name)).await.unwrap_err());
        assert_eq!((st, code.as_str()), (400, "name_reserved"), "{name}");
        assert!(msg.contains("reserved") && msg.contains(name), "{msg}");
    }
    let long = "a".repeat(64);
    for (name, why) in [
        ("My-App", "'M'"),
        ("under_score", "'_'"),
        ("dot.ted", "'.'"),
        ("-leading", "hyphen"),
        ("trailing-", "hyphen"),
        ("", "1 to 63"),
        (long.as_str(), "1 to 63"),
        ("xn--punycode", "--"),
    ] {
        let (st, code, msg) = api_err(h.client().create(&named(name)).await.unwrap_err());
        assert_eq!((st, code.as_str()), (400, "name_invalid"), "{name:?}");
        assert!(msg.contains(why), "{name:?}: {msg}");
    }
    // 63 characters is fine.
    h.client().create(&named(&"a".repeat(63))).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn bootstrap_credential_issues_scoped_management_tokens() {
    let h = Harness::start().await;
    let req = IssueTokenRequest::default();
    let (st, code, _) = api_err(h.client().issue_token(&req).await.unwrap_err());
    assert_eq!((st, code.as_str()), (401, "unauthorized"));
    let (st, code, _) = api_err(
        h.client()
            .with_bearer("wrong")
            .issue_token(&req)
            .await
            .unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (401, "bad_credential"));
    let (st, code, msg) = api_err(
        h.client()
            .with_bearer(BOOT)
            .issue_token(&IssueTokenRequest {
                scopes: Some(vec!["root".into()]),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (400, "invalid_scope"));
    assert!(msg.contains("tunnels:read"), "{msg}");

    // Default: read and write, 24 h.
    let t = h
        .client()
        .with_bearer(BOOT)
        .issue_token(&req)
        .await
        .unwrap();
    assert_eq!(t.scopes, ["tunnels:read", "tunnels:write"]);
    let jwks = h.client().jwks().await.unwrap();
    let c = Verifier::new(&jwks, ISS)
        .unwrap()
        .verify_management(&t.token)
        .unwrap();
    assert_eq!(c.exp - c.iat, 24 * 3600);
    let admin = h.client().with_bearer(&t.token);
    admin.create(&named("listed")).await.unwrap();
    let page = admin.list(&ListTunnelsQuery::default()).await.unwrap();
    assert_eq!(page.tunnels[0].name, "listed");

    // A read-only token reads but does not delete.
    let ro = h.admin(&["tunnels:read"]).await;
    ro.list(&ListTunnelsQuery::default()).await.unwrap();
    let (st, code, msg) = api_err(
        ro.delete(&DeleteTunnelRequest {
            name: Some("listed".into()),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (403, "forbidden"));
    assert!(msg.contains("tunnels:write"), "{msg}");

    // No bootstrap credential configured: says how to configure one.
    let off = Harness::start_with(|c| c.bootstrap_token = None).await;
    let (st, code, msg) = api_err(
        off.client()
            .with_bearer(BOOT)
            .issue_token(&req)
            .await
            .unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (403, "bootstrap_disabled"));
    assert!(msg.contains("NETBORE_BOOTSTRAP_TOKEN"), "{msg}");
    off.stop().await;
    h.stop().await;
}

#[tokio::test]
async fn tokens_signed_before_a_rotation_still_verify() {
    let h = Harness::start().await;
    let before = h.client().create(&named("rotating")).await.unwrap();
    let admin_before = h.management_token(&["tunnels:read"]).await;
    let old_kid = kid_of(&before.ephemeral_token).unwrap();

    h.control.rotate_keys();

    let jwks = h.client().jwks().await.unwrap();
    assert_eq!(jwks.keys.len(), 2);
    let v = Verifier::new(&jwks, ISS).unwrap();
    v.verify_ephemeral(&before.ephemeral_token).unwrap();
    // Old recreate and management tokens still work at control.
    let again = h
        .client()
        .create(&CreateTunnelRequest {
            recreate_token: Some(before.recreate_token.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(again.tunnel_id, before.tunnel_id);
    h.client()
        .with_bearer(admin_before)
        .list(&ListTunnelsQuery::default())
        .await
        .unwrap();
    // New tokens are signed with the new key, which the new JWKS has.
    let new_kid = kid_of(&again.ephemeral_token).unwrap();
    assert_ne!(new_kid, old_kid);
    assert!(jwks.keys.iter().any(|k| k.kid == new_kid));
    v.verify_ephemeral(&again.ephemeral_token).unwrap();
    // A verifier holding only the old set does not know the new kid: that is its cue
    // to refetch the JWKS.
    let stale = Verifier::new(
        &netbore_tokens::Jwks {
            keys: vec![jwks.keys[0].clone()],
        },
        ISS,
    )
    .unwrap();
    assert_eq!(
        stale
            .verify_ephemeral(&again.ephemeral_token)
            .unwrap_err()
            .code(),
        "token_unknown_kid"
    );
    h.stop().await;
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

/// Every way of forging or misusing a management token, as a bearer to list.
#[tokio::test]
async fn each_token_attack_is_refused_with_its_code() {
    let h = Harness::start().await;
    let now = now_unix();
    let good = ManagementClaims::new(ISS, "ops", vec!["admin".into()], 3600);
    let kid = h.keys.active_kid().to_string();
    let sign = |c: &ManagementClaims| h.keys.sign_management(c).unwrap();
    let with = |f: &dyn Fn(&mut ManagementClaims)| {
        let mut c = good.clone();
        f(&mut c);
        sign(&c)
    };
    let jwks = h.client().jwks().await.unwrap();
    let public = URL_SAFE_NO_PAD.decode(&jwks.keys[0].x).unwrap();
    let mut hs = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs.kid = Some(kid.clone());
    let hs256 =
        jsonwebtoken::encode(&hs, &good, &jsonwebtoken::EncodingKey::from_secret(&public)).unwrap();
    let none = format!(
        "{}.{}.",
        b64(&serde_json::json!({"alg": "none", "typ": "JWT", "kid": kid})),
        b64(&serde_json::to_value(&good).unwrap())
    );
    let genuine = sign(&good);
    let parts: Vec<&str> = genuine.split('.').collect();
    let mut widened = good.clone();
    widened.sub = "attacker".into();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(&serde_json::to_value(&widened).unwrap()),
        parts[2]
    );
    let recreate = h
        .keys
        .sign_recreate(&RecreateClaims::new(ISS, "tun_x", "x", 3600))
        .unwrap();
    let ephemeral = h
        .keys
        .sign_ephemeral(&EphemeralClaims::new(ISS, "tun_x", "x", 300))
        .unwrap();

    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", none, "token_algorithm_not_allowed"),
        (
            "HS256 keyed with the public key",
            hs256,
            "token_algorithm_not_allowed",
        ),
        (
            "another key",
            KeySet::generate().sign_management(&good).unwrap(),
            "token_unknown_kid",
        ),
        (
            "expired",
            with(&|c| {
                c.iat = now - 7200;
                c.nbf = now - 7200;
                c.exp = now - 3600;
            }),
            "token_expired",
        ),
        (
            "not valid yet",
            with(&|c| c.nbf = now + 3600),
            "token_not_yet_valid",
        ),
        (
            "wrong audience",
            with(&|c| c.aud = AUD_EDGE.into()),
            "token_wrong_audience",
        ),
        (
            "wrong issuer",
            with(&|c| c.iss = "someone-else".into()),
            "token_wrong_issuer",
        ),
        ("a recreate token", recreate.clone(), "token_wrong_type"),
        (
            "an ephemeral token",
            ephemeral.clone(),
            "token_wrong_audience",
        ),
        ("tampered payload", tampered, "token_bad_signature"),
        ("garbage", "not.a.jwt".into(), "token_malformed"),
    ];
    for (what, token, want) in cases {
        let (st, code, msg) = api_err(
            h.client()
                .with_bearer(&token)
                .list(&ListTunnelsQuery::default())
                .await
                .unwrap_err(),
        );
        assert_eq!((st, code.as_str()), (401, want), "{what}: {msg}");
        assert!(msg.contains("management token"), "{what}: {msg}");
    }
    // The genuine one works.
    h.client()
        .with_bearer(genuine)
        .list(&ListTunnelsQuery::default())
        .await
        .unwrap();

    // An ephemeral or management token where a recreate token is expected.
    let mgmt_as_recreate = sign(&good);
    for (token, want) in [
        (ephemeral, "token_wrong_audience"),
        (mgmt_as_recreate, "token_wrong_type"),
    ] {
        let (st, code, _) = api_err(
            h.client()
                .create(&CreateTunnelRequest {
                    recreate_token: Some(token),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        );
        assert_eq!((st, code.as_str()), (401, want));
    }
    // A recreate token whose audience is forged to the edge's is still not ephemeral:
    // that is the edge's check, shown here with the published keys.
    let mut r = RecreateClaims::new(ISS, "tun_x", "x", 3600);
    r.aud = AUD_EDGE.into();
    let forged = h.keys.sign_recreate(&r).unwrap();
    let v = Verifier::new(&jwks, ISS).unwrap();
    assert_eq!(
        v.verify_ephemeral(&forged).unwrap_err().code(),
        "token_wrong_type"
    );
    assert_eq!(
        v.verify_ephemeral(&recreate).unwrap_err().code(),
        "token_wrong_audience"
    );
    h.stop().await;
}

#[tokio::test]
async fn candidates_follow_the_region_hint_then_the_configured_order() {
    let h = Harness::start().await;
    let ids = |r: &netbore_control::api::CreateTunnelResponse| {
        r.candidates
            .iter()
            .map(|c| c.edge_id.clone())
            .collect::<Vec<_>>()
    };
    let r = h
        .client()
        .create(&CreateTunnelRequest::default())
        .await
        .unwrap();
    assert_eq!(ids(&r), ["edge-us-1", "edge-eu-1", "edge-us-2"]);
    assert_eq!(r.candidates[0].supported_transport, "wss");
    assert_eq!(r.candidates[2].supported_transport, "ws");
    let r = h
        .client()
        .create(&CreateTunnelRequest {
            region_hint: Some("eu".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(&r), ["edge-eu-1", "edge-us-1", "edge-us-2"]);
    assert_eq!(r.candidates[0].note, "in the requested region");
    let r = h
        .client()
        .create(&CreateTunnelRequest {
            preferred_transports: vec!["wss".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(&r), ["edge-us-1", "edge-eu-1"]);

    // Edges can be replaced at run time; with none, creation says so.
    h.control.set_edges(Vec::new());
    let (st, code, _) = api_err(
        h.client()
            .create(&CreateTunnelRequest::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (503, "no_edges"));
    h.stop().await;
}

#[tokio::test]
async fn a_requested_recreate_lifetime_is_clamped_and_the_note_says_so() {
    let h = Harness::start().await;
    let r = h
        .client()
        .create(&CreateTunnelRequest {
            recreate_token_ttl_seconds: Some(365 * 24 * 3600),
            ..Default::default()
        })
        .await
        .unwrap();
    let max = 30 * 24 * 3600;
    assert!(
        r.note.contains(&format!(
            "clamped from {} to the maximum {max}",
            365 * 24 * 3600
        )),
        "{}",
        r.note
    );
    let jwks = h.client().jwks().await.unwrap();
    let c = Verifier::new(&jwks, ISS)
        .unwrap()
        .verify_recreate(&r.recreate_token)
        .unwrap();
    assert_eq!(c.exp - c.iat, max);
    h.stop().await;
}

#[tokio::test]
async fn require_token_mode_refuses_anonymous_creation() {
    let h = Harness::start_with(|c| c.require_token = true).await;
    let (st, code, _) = api_err(
        h.client()
            .create(&CreateTunnelRequest::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (401, "unauthorized"));
    h.admin(&["tunnels:write"])
        .await
        .create(&CreateTunnelRequest::default())
        .await
        .unwrap();
    h.stop().await;
}
