//! TLS on the real edge binary: a self-signed development certificate that agents
//! trust with --edge-ca (wss) and viewers over https with ALPN h2; a certificate
//! replaced on disk is served on the next handshake without a restart; with
//! --agent-tls-only, agents link over wss while viewers keep plain HTTP.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use netbore_testkit::origin::Origin;
use netbore_testkit::{Proc, empty, free_port, json_agent};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;

/// Two labels: certificate verifiers refuse a wildcard directly under one label
/// (`*.localhost`).
const DOMAIN: &str = "tunnels.test";

fn client_config(ca_pem: &[u8], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

/// TLS to 127.0.0.1:port presenting `sni`.
async fn tls_connect(
    port: u16,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

struct Net {
    rest: u16,
    grpc: u16,
    public: u16,
    agents: u16,
}

impl Net {
    /// Four free loopback ports: control's REST and gRPC, the edge's public and agent ports.
    fn free() -> Net {
        Net {
            rest: free_port(),
            grpc: free_port(),
            public: free_port(),
            agents: free_port(),
        }
    }
}

fn start_control_and_edge(net: &Net, edge_tls: &[&str]) -> (Proc, Proc) {
    start_control_and_edge_serving(net, edge_tls, "https")
}

/// Control announcing tunnels at `public_scheme`://NAME.<domain>, and the edge.
fn start_control_and_edge_serving(
    net: &Net,
    edge_tls: &[&str],
    public_scheme: &str,
) -> (Proc, Proc) {
    let template = format!("{public_scheme}://{{name}}.{DOMAIN}:{}", net.public);
    let control = Proc::spawn(
        "netbore-control",
        &[
            "--rest-addr",
            &format!("127.0.0.1:{}", net.rest),
            "--grpc-addr",
            &format!("127.0.0.1:{}", net.grpc),
            "--public-url-template",
            &template,
            "--domain",
            DOMAIN,
        ],
        &[("RUST_LOG", "warn")],
    );
    let mut args = vec![
        "--public-addr".to_string(),
        format!("127.0.0.1:{}", net.public),
        "--agent-addr".to_string(),
        format!("127.0.0.1:{}", net.agents),
        "--admin-addr".to_string(),
        "127.0.0.1:0".to_string(),
        "--domain".to_string(),
        DOMAIN.to_string(),
        "--control-url".to_string(),
        format!("http://127.0.0.1:{}", net.rest),
        "--control-grpc".to_string(),
        format!("http://127.0.0.1:{}", net.grpc),
    ];
    args.extend(edge_tls.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let edge = Proc::spawn("netbore-edge", &a, &[("RUST_LOG", "warn")]);
    (control, edge)
}

async fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_agents_and_https_h2_viewers_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("edge-ca.pem");
    let net = Net::free();
    let (_c, _e) = start_control_and_edge(
        &net,
        &[
            "--tls-self-signed",
            "--tls-self-signed-out",
            ca.to_str().unwrap(),
        ],
    );
    wait_for_port(net.public).await;

    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut agent = json_agent(
        &format!("http://127.0.0.1:{}", net.rest),
        &origin.url(),
        state.path(),
        &["--edge-ca", ca.to_str().unwrap()],
    );
    let live = agent.next_event("live").await;
    let url = live["url"].as_str().unwrap();
    assert!(url.starts_with("https://"), "{url}");
    let host = url.trim_start_matches("https://");
    let name = host.split(':').next().unwrap();

    // A viewer over TLS, offered h2 and http/1.1: the edge picks h2.
    let pem = std::fs::read(&ca).unwrap();
    let tls = tls_connect(net.public, name, client_config(&pem, &[b"h2", b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("https://{host}/headers"))
        .body(empty())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen: Value = serde_json::from_slice(&body).unwrap();
    let proto = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "x-forwarded-proto")
        .unwrap();
    assert_eq!(proto[1], "https");

    // Without the CA the certificate is not trusted.
    let other = rcgen::generate_simple_self_signed(vec!["x".into()])
        .unwrap()
        .cert
        .pem();
    let err = tls_connect(
        net.public,
        name,
        client_config(other.as_bytes(), &[b"http/1.1"]),
    )
    .await;
    assert!(
        err.is_err(),
        "an untrusted certificate must fail the handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_tls_only_links_agents_over_wss_and_serves_viewers_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("edge-ca.pem");
    let net = Net::free();
    let (_c, _e) = start_control_and_edge_serving(
        &net,
        &[
            "--tls-self-signed",
            "--tls-self-signed-out",
            ca.to_str().unwrap(),
            "--agent-tls-only",
        ],
        "http",
    );
    wait_for_port(net.public).await;
    let pem = std::fs::read(&ca).unwrap();

    // The agent port speaks TLS (the agent is told wss://) ...
    let agent_port =
        tls_connect(net.agents, "localhost", client_config(&pem, &[b"http/1.1"])).await;
    assert!(
        agent_port.is_ok(),
        "the agent listener must serve TLS: {agent_port:?}"
    );
    // ... and the public port does not.
    let public_tls =
        tls_connect(net.public, "localhost", client_config(&pem, &[b"http/1.1"])).await;
    assert!(
        public_tls.is_err(),
        "the public listener must stay plain HTTP"
    );

    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut agent = json_agent(
        &format!("http://127.0.0.1:{}", net.rest),
        &origin.url(),
        state.path(),
        &["--edge-ca", ca.to_str().unwrap()],
    );
    let live = agent.next_event("live").await;
    let url = live["url"].as_str().unwrap();
    assert!(url.starts_with("http://"), "{url}");
    let host = url.trim_start_matches("http://");

    // A plain HTTP/1.1 viewer reaches the origin through the wss link.
    let viewer = netbore_testkit::Viewer::new(([127, 0, 0, 1], net.public).into());
    let got = viewer.get(host, "/headers").await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let seen: Value = serde_json::from_slice(&got.body).unwrap();
    let proto = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "x-forwarded-proto")
        .unwrap();
    assert_eq!(proto[1], "http");
}

#[test]
fn agent_tls_only_without_a_certificate_is_refused_with_the_fix() {
    let out = std::process::Command::new(netbore_testkit::bin_path("netbore-edge"))
        .args([
            "--agent-tls-only",
            "--public-addr",
            "127.0.0.1:0",
            "--agent-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--control-grpc",
            "",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-self-signed"), "{err}");
}

fn write_cert(dir: &std::path::Path, cn: &str) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::new(vec![format!("*.{DOMAIN}")]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    // Write the key first and the certificate last, as a renewal would.
    std::fs::write(dir.join("tls.key.tmp"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("tls.crt.tmp"), cert.pem()).unwrap();
    std::fs::rename(dir.join("tls.key.tmp"), dir.join("tls.key")).unwrap();
    std::fs::rename(dir.join("tls.crt.tmp"), dir.join("tls.crt")).unwrap();
    cert.der().to_vec()
}

async fn served_cert(port: u16, trust: &[u8]) -> Vec<u8> {
    let s = tls_connect(
        port,
        "app.tunnels.test",
        client_config(trust, &[b"http/1.1"]),
    )
    .await
    .unwrap();
    s.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_cert(dir.path(), "first");
    let net = Net::free();
    let (_c, mut edge) = start_control_and_edge(
        &net,
        &[
            "--tls-cert",
            dir.path().join("tls.crt").to_str().unwrap(),
            "--tls-key",
            dir.path().join("tls.key").to_str().unwrap(),
        ],
    );
    wait_for_port(net.public).await;
    let pem1 = std::fs::read(dir.path().join("tls.crt")).unwrap();
    assert_eq!(served_cert(net.public, &pem1).await, first);

    // Renew: new files with a different certificate (same file mtime granularity safe).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = write_cert(dir.path(), "second");
    assert_ne!(first, second);
    let pem2 = std::fs::read(dir.path().join("tls.crt")).unwrap();
    let mut served = Vec::new();
    for _ in 0..100 {
        if let Ok(s) = tls_connect(
            net.public,
            "app.tunnels.test",
            client_config(&pem2, &[b"http/1.1"]),
        )
        .await
        {
            served = s.get_ref().1.peer_certificates().unwrap()[0]
                .as_ref()
                .to_vec();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        served, second,
        "the new certificate is served on a new handshake"
    );
    // Same process throughout.
    assert!(
        edge.child.try_wait().unwrap().is_none(),
        "the edge was not restarted"
    );
}
