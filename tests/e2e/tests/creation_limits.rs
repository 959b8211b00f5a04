//! Anonymous tunnel creation is limited per client address (issue 12, finding 6): the
//! real `netbore-control` binary over loopback, REST and gRPC, callers on two client
//! addresses (127.0.0.1 and 127.0.0.2).

use std::net::IpAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use netbore_proto::control::v1 as pb;
use netbore_proto::control::v1::control_service_client::ControlServiceClient;
use netbore_testkit::ControlProc;
use serde_json::{Value, json};

const BOOT: &str = "test-bootstrap-credential";
const EDGE: &str = "id=e1,url=ws://127.0.0.1:9/v1/connect,region=local";
/// The burst the tests configure (smaller than the default, so the test is quick).
const BURST: usize = 10;

/// A REST call from `source`: (status, `Retry-After`, body).
async fn call(
    control: &ControlProc,
    source: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (u16, Option<u64>, Value) {
    let mut conn = HttpConnector::new();
    conn.set_local_address(Some(source.parse::<IpAddr>().unwrap()));
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(conn);
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("{}{path}", control.url()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        retry,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn management_token(control: &ControlProc) -> String {
    let auth = format!("Bearer {BOOT}");
    let (st, _, b) = call(
        control,
        "127.0.0.1",
        "/auth/token",
        &[("authorization", &auth)],
        json!({"scopes": ["tunnels:write"]}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    b["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_creations_past_the_burst_get_429_while_tokens_and_other_addresses_create() {
    let burst = BURST.to_string();
    let control = ControlProc::spawn(
        &[
            "--edge",
            EDGE,
            "--anonymous-create-burst",
            &burst,
            "--anonymous-create-per-minute",
            "1",
        ],
        &[("NETBORE_BOOTSTRAP_TOKEN", BOOT)],
    );
    control.wait_ready().await;

    // 100 anonymous creations from one address: the burst is served, the rest refused
    // with the code, the wait and the fix.
    let (mut created, mut limited) = (0, 0);
    let mut recreate = None;
    for _ in 0..100 {
        let (st, retry, b) = call(&control, "127.0.0.1", "/tunnels/create", &[], json!({})).await;
        match st {
            200 => {
                created += 1;
                recreate = b["recreate_token"].as_str().map(str::to_string);
            }
            429 => {
                limited += 1;
                assert_eq!(b["error"]["code"], "rate_limited", "{b}");
                let msg = b["error"]["message"].as_str().unwrap();
                assert!(
                    msg.contains("management token") && msg.contains("wait"),
                    "{msg}"
                );
                let retry = retry.expect("Retry-After on a 429");
                assert!((1..=60).contains(&retry), "Retry-After {retry}");
            }
            other => panic!("unexpected {other}: {b}"),
        }
    }
    assert_eq!((created, limited), (BURST, 100 - BURST));

    // Spoofing X-Forwarded-For does not help: control does not trust this peer.
    let (st, _, b) = call(
        &control,
        "127.0.0.1",
        "/tunnels/create",
        &[("x-forwarded-for", "198.51.100.9")],
        json!({}),
    )
    .await;
    assert_eq!(st, 429, "{b}");

    // A management token still creates, and so does a recreate token (a running agent
    // refreshing its pass).
    let token = management_token(&control).await;
    let (st, _, b) = call(
        &control,
        "127.0.0.1",
        "/tunnels/create",
        &[("authorization", &format!("Bearer {token}"))],
        json!({}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let (st, _, b) = call(
        &control,
        "127.0.0.1",
        "/tunnels/create",
        &[],
        json!({"recreate_token": recreate.unwrap()}),
    )
    .await;
    assert_eq!(st, 200, "{b}");

    // Another address has its own allowance.
    let (st, _, b) = call(&control, "127.0.0.2", "/tunnels/create", &[], json!({})).await;
    assert_eq!(st, 200, "{b}");

    // gRPC counts against the same allowance and says RESOURCE_EXHAUSTED.
    let mut grpc = ControlServiceClient::connect(format!("http://127.0.0.1:{}", control.grpc))
        .await
        .unwrap();
    let e = grpc
        .create_tunnel(pb::CreateTunnelRequest::default())
        .await
        .expect_err("the address used its burst");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().starts_with("rate_limited: "), "{}", e.message());
    assert_eq!(
        e.metadata().get("netbore-error-code").unwrap(),
        "rate_limited"
    );
    assert!(e.metadata().get("retry-after").is_some());
    let mut req = tonic::Request::new(pb::CreateTunnelRequest::default());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    grpc.create_tunnel(req)
        .await
        .expect("a management token creates over gRPC");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_allowance() {
    let burst = BURST.to_string();
    let control = ControlProc::spawn(
        &[
            "--edge",
            EDGE,
            "--anonymous-create-burst",
            &burst,
            "--anonymous-create-per-minute",
            "1",
            "--trusted-proxies",
            "127.0.0.1/32",
        ],
        &[],
    );
    control.wait_ready().await;
    let from = |client: &'static str| [("x-forwarded-for", client)];
    let mut statuses = Vec::new();
    for _ in 0..=BURST {
        let (st, _, _) = call(
            &control,
            "127.0.0.1",
            "/tunnels/create",
            &from("198.51.100.1"),
            json!({}),
        )
        .await;
        statuses.push(st);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), BURST);
    assert_eq!(statuses.last(), Some(&429));
    // The proxy itself is not the client: another client behind it still creates.
    let (st, _, b) = call(
        &control,
        "127.0.0.1",
        "/tunnels/create",
        &from("198.51.100.2"),
        json!({}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_token_turns_anonymous_creation_off() {
    let control = ControlProc::spawn(
        &["--edge", EDGE, "--require-token"],
        &[("NETBORE_BOOTSTRAP_TOKEN", BOOT)],
    );
    control.wait_ready().await;
    let (st, _, b) = call(&control, "127.0.0.1", "/tunnels/create", &[], json!({})).await;
    assert_eq!(st, 401, "{b}");
    let token = management_token(&control).await;
    let (st, _, b) = call(
        &control,
        "127.0.0.1",
        "/tunnels/create",
        &[("authorization", &format!("Bearer {token}"))],
        json!({}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
}
