//! TCP tunnels and TLS passthrough (issue 17) against the real binaries: `netbore tcp`
//! to an echo origin through one edge and through either of two edges, the port kept
//! across agent and edge restarts, and `netbore tls` passing a TLS session through by
//! SNI to an origin that holds its own certificate.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netbore_testkit::redis::RedisServer;
use netbore_testkit::{ControlProc, EdgeProc, Proc};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Concurrent client connections in the load test.
const CONNECTIONS: usize = 64;
/// Bytes each connection sends (and gets back): 64 × 4 MiB = 256 MiB each way in all,
/// a few seconds in the debug profile on two shared cores (docs/decisions.md).
const PER_CONNECTION: usize = 4 * 1024 * 1024;

/// An echo origin: echoes every byte; when the client half-closes, it writes
/// `bye <bytes received>` and closes its side too. So a client that sees the line
/// knows its FIN reached the origin, and its EOF after the line is the origin's FIN.
async fn echo_origin() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0usize;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            total += n;
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(format!("bye {total}").as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

/// `len` bytes, different for every `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) as u8
        })
        .collect()
}

/// One client: sends `len` bytes while reading the echo, half-closes, and checks the
/// echo is byte-exact, followed by the origin's `bye` line and then EOF.
async fn exchange(addr: SocketAddr, seed: u64, len: usize) -> Result<(), String> {
    let data = pattern(seed, len);
    let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut r, mut w) = s.into_split();
    let out = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in out.chunks(16 * 1024) {
            w.write_all(chunk).await?;
        }
        // Half-close: we send no more, but still read.
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut got = Vec::with_capacity(len + 16);
    r.read_to_end(&mut got).await.map_err(|e| e.to_string())?;
    let _w = writer.await.unwrap().map_err(|e| e.to_string())?;
    let tail = format!("bye {len}");
    if got.len() != len + tail.len() {
        return Err(format!(
            "connection {seed}: got {} bytes, wanted {} and the origin's '{tail}'",
            got.len(),
            len
        ));
    }
    if got[..len] != data[..] {
        return Err(format!("connection {seed}: the echo differs"));
    }
    if got[len..] != *tail.as_bytes() {
        return Err(format!(
            "connection {seed}: the origin did not see our half-close: {:?}",
            String::from_utf8_lossy(&got[len..])
        ));
    }
    Ok(())
}

/// Retries a small exchange until it works (the tunnel is reachable there) or
/// `within` passes.
async fn reachable(addr: SocketAddr, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut seed = 1_000;
    loop {
        seed += 1;
        match tokio::time::timeout(Duration::from_secs(5), exchange(addr, seed, 1000)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if Instant::now() > deadline => return Err(e),
            Err(_) if Instant::now() > deadline => return Err("timed out".into()),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Two adjacent ports free on 127.0.0.1 and 127.0.0.2, held for this test (no later
/// `free_port` gives one to control or an edge): a TCP range of two.
fn free_pair() -> u16 {
    netbore_testkit::free_ports(2, &["127.0.0.1", "127.0.0.2"])
}

fn tcp_agent(control: &ControlProc, origin: u16, state: &std::path::Path, kind: &str) -> Proc {
    Proc::spawn(
        "netbore",
        &[
            kind,
            &origin.to_string(),
            "--control",
            &control.url(),
            "--state-dir",
            state.to_str().unwrap(),
            "--connections",
            "1",
            "--json",
        ],
        &[("RUST_LOG", "warn")],
    )
}

/// The agent's next `live` event.
async fn live(agent: &mut Proc) -> Value {
    agent.next_event("live").await
}

/// The public port in a `tcp://NAME.DOMAIN:PORT` URL.
fn port_of(live: &Value) -> u16 {
    let url = live["url"].as_str().unwrap();
    assert!(url.starts_with("tcp://"), "a TCP tunnel's URL: {url}");
    url.rsplit(':').next().unwrap().parse().unwrap()
}

fn at(host: &str, port: u16) -> SocketAddr {
    SocketAddr::new(host.parse::<IpAddr>().unwrap(), port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_connections_are_byte_exact_both_ways_with_half_close() {
    let lo = free_pair();
    let range = format!("{lo}-{}", lo + 1);
    let control = ControlProc::spawn(&["--tcp-ports", &range], &[]);
    control.wait_ready().await;
    let _edge = EdgeProc::spawn(
        "edge-1",
        &control,
        None,
        &["--tcp-ports", &range, "--tcp-host", "127.0.0.1"],
    );
    let origin = echo_origin().await;
    let state = tempfile::tempdir().unwrap();
    let mut agent = tcp_agent(&control, origin, state.path(), "tcp");
    let port = port_of(&live(&mut agent).await);
    assert!((lo..=lo + 1).contains(&port), "port {port} outside {range}");
    let addr = at("127.0.0.1", port);
    reachable(addr, Duration::from_secs(20)).await.unwrap();

    let started = Instant::now();
    let runs: Vec<_> = (0..CONNECTIONS)
        .map(|i| tokio::spawn(exchange(addr, i as u64, PER_CONNECTION)))
        .collect();
    for r in runs {
        tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("every connection finishes within 60 s")
            .unwrap()
            .unwrap();
    }
    let took = started.elapsed();
    let mib = (CONNECTIONS * PER_CONNECTION) as f64 / (1024.0 * 1024.0);
    println!(
        "{CONNECTIONS} connections, {mib:.0} MiB each way, in {:.2} s ({:.1} MiB/s each way)",
        took.as_secs_f64(),
        mib / took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_is_kept_across_agent_and_edge_restarts() {
    let lo = free_pair();
    let range = format!("{lo}-{}", lo + 1);
    let edge_flags = ["--tcp-ports", range.as_str(), "--tcp-host", "127.0.0.1"];
    let control = ControlProc::spawn(&["--tcp-ports", &range], &[]);
    control.wait_ready().await;
    let mut edge = EdgeProc::spawn("edge-1", &control, None, &edge_flags);
    let origin = echo_origin().await;
    let state = tempfile::tempdir().unwrap();
    let mut agent = tcp_agent(&control, origin, state.path(), "tcp");
    let first = live(&mut agent).await;
    let port = port_of(&first);
    reachable(at("127.0.0.1", port), Duration::from_secs(20))
        .await
        .unwrap();

    // Agent restart: while it is down another TCP tunnel is made, which must get the
    // other port of the range; the restarted agent gets its own port back.
    agent.kill().await;
    let other_state = tempfile::tempdir().unwrap();
    let mut other = tcp_agent(&control, origin, other_state.path(), "tcp");
    let other_port = port_of(&live(&mut other).await);
    assert_ne!(other_port, port, "a second tunnel never gets a held port");
    let mut agent = tcp_agent(&control, origin, state.path(), "tcp");
    let again = live(&mut agent).await;
    assert_eq!(again["name"], first["name"], "the name is kept");
    assert_eq!(
        port_of(&again),
        port,
        "the port is kept after an agent restart"
    );
    reachable(at("127.0.0.1", port), Duration::from_secs(20))
        .await
        .unwrap();
    drop(other);

    // Edge restart: a new edge process, same range; the agent relinks and the port
    // serves again.
    edge.proc.kill().await;
    drop(edge);
    let _edge = EdgeProc::spawn("edge-2", &control, None, &edge_flags);
    let relinked = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let v = live(&mut agent).await;
            if v["edge_id"] == "edge-2" {
                return v;
            }
        }
    })
    .await
    .expect("the agent links to the restarted edge within 60 s");
    assert_eq!(
        port_of(&relinked),
        port,
        "the port is kept after an edge restart"
    );
    reachable(at("127.0.0.1", port), Duration::from_secs(60))
        .await
        .expect("the same port serves after an edge restart");
    exchange(at("127.0.0.1", port), 7, 256 * 1024)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_tunnel_is_reached_through_either_of_two_edges() {
    let redis = RedisServer::start();
    let lo = free_pair();
    let range = format!("{lo}-{}", lo + 1);
    let control = ControlProc::spawn(&["--tcp-ports", &range], &[]);
    control.wait_ready().await;
    // Two edges on one machine: the same ports, on two loopback addresses.
    let _a = EdgeProc::spawn(
        "edge-a",
        &control,
        Some(&redis.url()),
        &["--tcp-ports", &range, "--tcp-host", "127.0.0.1"],
    );
    let _b = EdgeProc::spawn(
        "edge-b",
        &control,
        Some(&redis.url()),
        &["--tcp-ports", &range, "--tcp-host", "127.0.0.2"],
    );
    let origin = echo_origin().await;
    let state = tempfile::tempdir().unwrap();
    let mut agent = tcp_agent(&control, origin, state.path(), "tcp");
    let v = live(&mut agent).await;
    let port = port_of(&v);
    println!("agent linked to {}", v["edge_id"]);
    for host in ["127.0.0.1", "127.0.0.2"] {
        reachable(at(host, port), Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("through {host}: {e}"));
        let runs: Vec<_> = (0..8)
            .map(|i| tokio::spawn(exchange(at(host, port), 100 + i, 256 * 1024)))
            .collect();
        for r in runs {
            r.await
                .unwrap()
                .unwrap_or_else(|e| panic!("through {host}: {e}"));
        }
    }
}

/// A TLS origin for `name` with a certificate from its own CA; returns its port and
/// the CA certificate (DER), which is all the client trusts.
async fn tls_echo_origin(name: &str) -> (u16, rustls::pki_types::CertificateDer<'static>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(leaf.der().to_vec())],
        PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut reply = b"origin says: ".to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    if tls.write_all(&reply).await.is_err() {
                        return;
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, CertificateDer::from(ca.der().to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passes_through_by_sni_to_the_origins_own_certificate() {
    let name = "secure";
    let host = format!("{name}.localhost");
    let control = ControlProc::spawn(&[], &[]);
    control.wait_ready().await;
    let dir = tempfile::tempdir().unwrap();
    let edge_ca = dir.path().join("edge-ca.pem");
    let edge = EdgeProc::spawn(
        "edge-1",
        &control,
        None,
        &[
            "--tls-self-signed",
            "--tls-self-signed-out",
            edge_ca.to_str().unwrap(),
        ],
    );
    // The agent reads the edge's CA at start: wait until the edge has written it.
    let ca = edge_ca.clone();
    netbore_testkit::eventually(Duration::from_secs(30), || {
        let ca = ca.clone();
        async move { ca.exists().then_some(()) }
    })
    .await
    .expect("the edge writes its self-signed CA within 30 s");
    let (origin, origin_ca) = tls_echo_origin(&host).await;
    let state = tempfile::tempdir().unwrap();
    let mut agent = Proc::spawn(
        "netbore",
        &[
            "tls",
            &origin.to_string(),
            "--control",
            &control.url(),
            "--name",
            name,
            "--edge-ca",
            edge_ca.to_str().unwrap(),
            "--state-dir",
            state.path().to_str().unwrap(),
            "--connections",
            "1",
            "--json",
        ],
        &[("RUST_LOG", "warn")],
    );
    let v = live(&mut agent).await;
    assert_eq!(v["name"], name);

    // The client trusts only the origin's CA: the handshake succeeds only if the
    // origin itself answered (the edge's own certificate would be refused).
    let mut roots = rustls::RootCertStore::empty();
    roots.add(origin_ca).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let server_name = rustls::pki_types::ServerName::try_from(host.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tls = loop {
        let tcp = TcpStream::connect(at("127.0.0.1", edge.public)).await;
        let r = match tcp {
            Ok(tcp) => connector
                .connect(server_name.clone(), tcp)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(t) => break t,
            Err(e) if Instant::now() > deadline => {
                panic!("no TLS session with the origin through the edge: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    tls.write_all(b"hello").await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = tls.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"origin says: hello");

    // Any other name is still terminated by the edge with its own certificate (the
    // bare domain: webpki matches no wildcard directly under `localhost`).
    let pem = std::fs::read(&edge_ca).unwrap();
    let mut edge_roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        edge_roots.add(c.unwrap()).unwrap();
    }
    let edge_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(edge_roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(at("127.0.0.1", edge.public))
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(edge_cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("another name is terminated by the edge as before");
}

/// `netbore start --all` with a config file of two HTTP tunnels and one TCP tunnel: all
/// three serve from one process (issue 17's "Done when").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_start_serves_two_http_tunnels_and_a_tcp_tunnel_from_a_config_file() {
    let lo = free_pair();
    let range = format!("{lo}-{}", lo + 1);
    let control = ControlProc::spawn(&["--tcp-ports", &range], &[]);
    control.wait_ready().await;
    let edge = EdgeProc::spawn(
        "edge-1",
        &control,
        None,
        &["--tcp-ports", &range, "--tcp-host", "127.0.0.1"],
    );
    let (a, b) = (
        netbore_testkit::origin::Origin::start().await,
        netbore_testkit::origin::Origin::start().await,
    );
    let echo = echo_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("netbore.toml");
    std::fs::write(
        &cfg,
        format!(
            "control_url = \"{}\"\nconnections = 1\nstate_dir = \"{}\"\n\n\
             [tunnels.web]\ntarget = \"{}\"\nname = \"web-a\"\n\n\
             [tunnels.api]\ntarget = \"{}\"\nname = \"api-b\"\n\n\
             [tunnels.db]\nkind = \"tcp\"\ntarget = \"{echo}\"\n",
            control.url(),
            dir.path().join("state").display(),
            a.url(),
            b.url(),
        ),
    )
    .unwrap();
    let mut p = Proc::spawn(
        "netbore",
        &[
            "start",
            "--all",
            "--json",
            "--config",
            cfg.to_str().unwrap(),
        ],
        &[("RUST_LOG", "warn")],
    );
    let mut lives = std::collections::HashMap::new();
    while lives.len() < 3 {
        let v = live(&mut p).await;
        lives.insert(v["tunnel"].as_str().unwrap().to_string(), v);
    }
    let v = edge.viewer().await;
    for (key, name) in [("web", "web-a"), ("api", "api-b")] {
        assert_eq!(lives[key]["name"], name, "{:?}", lives[key]);
        let host = format!("{name}.localhost");
        assert!(
            v.serves(&host, Duration::from_secs(30)).await,
            "{key} serves"
        );
    }
    let addr = at("127.0.0.1", port_of(&lives["db"]));
    reachable(addr, Duration::from_secs(20)).await.unwrap();
    exchange(addr, 7, 256 * 1024).await.unwrap();
}
