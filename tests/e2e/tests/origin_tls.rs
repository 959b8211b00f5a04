//! An agent forwarding to an https origin with a self-signed certificate: refused
//! unless the user trusts it (--origin-ca) or says so (--origin-insecure); and the URL
//! written with --url-file.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use netbore_testkit::{Proc, Stack, Viewer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// An https origin on a free port; returns its URL and the certificate PEM.
async fn https_origin() -> (String, String) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let pem = ck.cert.pem();
    let chain = vec![CertificateDer::from(ck.cert.der().to_vec())];
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"secure origin",
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (format!("https://localhost:{port}"), pem)
}

async fn agent(
    stack: &Stack,
    origin: &str,
    extra: &[&str],
    dir: &std::path::Path,
) -> (Proc, String) {
    let control = stack.control_url();
    let url_file = dir.join("url.txt");
    let mut args = vec![
        "http",
        origin,
        "--control",
        &control,
        "--state-dir",
        dir.to_str().unwrap(),
        "--url-file",
        url_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn("netbore", &args, &[("RUST_LOG", "warn")]);
    let line = p.line(Duration::from_secs(20)).await;
    let url = line.split_whitespace().next().unwrap().to_string();
    let written = std::fs::read_to_string(&url_file).expect("--url-file written once live");
    assert_eq!(written.trim(), url);
    (p, url.trim_start_matches("http://").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_origins_need_a_trusted_ca_or_the_insecure_flag() {
    let stack = Stack::start().await;
    let (origin, pem) = https_origin().await;
    let v = Viewer::new(stack.public());
    let dir = tempfile::tempdir().unwrap();

    let (_a, host) = agent(&stack, &origin, &[], dir.path()).await;
    let r = v.get(&host, "/").await;
    assert_eq!(
        r.status,
        502,
        "an untrusted origin certificate is refused: {}",
        r.text()
    );
    assert_eq!(r.error_code(), Some("origin_unreachable"));

    let ca = dir.path().join("origin-ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let (_b, host) = agent(
        &stack,
        &origin,
        &["--origin-ca", ca.to_str().unwrap()],
        d2.path(),
    )
    .await;
    let r = v.get(&host, "/").await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "secure origin")
    );

    let d3 = tempfile::tempdir().unwrap();
    let (_c, host) = agent(&stack, &origin, &["--origin-insecure"], d3.path()).await;
    let r = v.get(&host, "/").await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "secure origin")
    );
}
