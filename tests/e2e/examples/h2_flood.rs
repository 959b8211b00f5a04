//! Measures the edge under finding 3's header flood (issue 12): RSS of the edge (and
//! agent) process before, at the peak of and one minute after a flood of HTTP/2
//! requests whose heads HPACK inflates from a few bytes to 56 KiB, and an honest
//! client's latency before and during it. Not a test: `scripts/memory-flood.sh` starts
//! the real binaries and runs this; figures go to docs/benchmarks.md.
//!
//! ```text
//! h2_flood origin ADDR
//! h2_flood attack PUBLIC HOST EDGE_PID AGENT_PID FLOOD_SECS AFTER_SECS
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// HTTP/2 connections the attacker opens, and streams it keeps in flight on each
/// (the edge allows 128).
const FLOOD_CONNS: usize = 8;
const STREAMS_PER_CONN: usize = 128;
/// Copies of one 4,000-byte header per request: 56 KiB decoded, under the 64 KiB limit.
const PAD_COPIES: usize = 14;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// One honest GET from 127.0.0.2 on a fresh connection: its latency, if answered 200.
async fn honest(public: SocketAddr, host: &str) -> Option<Duration> {
    let t = Instant::now();
    let sock = tokio::net::TcpSocket::new_v4().ok()?;
    sock.bind("127.0.0.2:0".parse().unwrap()).ok()?;
    let mut s = sock.connect(public).await.ok()?;
    let req = format!("GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    out.starts_with(b"HTTP/1.1 200").then(|| t.elapsed())
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn padded(host: &str) -> http::Request<Empty<Bytes>> {
    let mut b = http::Request::builder().uri(format!("http://{host}/hello"));
    let v = "v".repeat(4000);
    for _ in 0..PAD_COPIES {
        b = b.header("x-pad", v.as_str());
    }
    b.body(Empty::new()).unwrap()
}

async fn origin(addr: SocketAddr) {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    loop {
        let (tcp, _) = l.accept().await.unwrap();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    Bytes::from_static(b"ok"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("origin") {
        origin(args[2].parse().unwrap()).await;
        return;
    }
    let public: SocketAddr = args[2].parse().unwrap();
    let host = args[3].clone();
    let edge_pid: u32 = args[4].parse().unwrap();
    let agent_pid: u32 = args[5].parse().unwrap();
    let flood_secs: u64 = args[6].parse().unwrap();
    let after_secs: u64 = args[7].parse().unwrap();

    // The honest client runs on its own thread and runtime: sharing the attacker's runtime
    // would add the attacker's own scheduling delay (1,024 busy tasks) to every honest
    // request and blame it on the edge.
    let (to_honest, from_main) = std::sync::mpsc::channel::<Option<Duration>>();
    let (to_main, from_honest) = std::sync::mpsc::channel::<Option<Duration>>();
    let honest_host = host.clone();
    let honest_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Each command: run requests one after another for this long (None: stop).
        while let Ok(Some(budget)) = from_main.recv() {
            rt.block_on(async {
                let t = Instant::now();
                let mut n = 0;
                while t.elapsed() < budget || n == 0 {
                    let _ = to_main.send(Some(
                        honest(public, &honest_host).await.unwrap_or(Duration::MAX),
                    ));
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = to_main.send(None);
            });
        }
    });
    // Runs honest requests for `budget` on the honest thread while `during` polls.
    let honest_for = |budget: Duration, during: &mut dyn FnMut()| {
        to_honest.send(Some(budget)).unwrap();
        let mut ok = Vec::new();
        let mut failed = 0;
        loop {
            match from_honest.recv_timeout(Duration::from_millis(50)) {
                Ok(Some(d)) if d != Duration::MAX => ok.push(d),
                Ok(Some(_)) => failed += 1,
                Ok(None) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => during(),
                Err(_) => break,
            }
        }
        (ok, failed)
    };

    // Baseline: six seconds of honest requests (20 ms apart, as during the flood).
    let (mut base, _) = honest_for(Duration::from_secs(6), &mut || {});
    let (edge0, agent0) = (rss_kib(edge_pid), rss_kib(agent_pid));

    // Flood.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..FLOOD_CONNS {
        let tcp = tokio::net::TcpStream::connect(public).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        for _ in 0..STREAMS_PER_CONN {
            let mut send = send.clone();
            let (stop, sent, refused, host) =
                (stop.clone(), sent.clone(), refused.clone(), host.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match send.send_request(padded(&host)).await {
                        Ok(r) => {
                            sent.fetch_add(1, Ordering::Relaxed);
                            if r.status() != 200 {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                            let _ = r.into_body().collect().await;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            }));
        }
    }
    // Let the flood reach its pace, then measure the honest client while it runs.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut edge_peak, mut agent_peak) = (edge0, agent0);
    let (mut during, failed) = tokio::task::block_in_place(|| {
        honest_for(Duration::from_secs(flood_secs), &mut || {
            edge_peak = edge_peak.max(rss_kib(edge_pid));
            agent_peak = agent_peak.max(rss_kib(agent_pid));
        })
    });
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    let flood_reqs = sent.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(after_secs)).await;
    let (edge1, agent1) = (rss_kib(edge_pid), rss_kib(agent_pid));
    let (mut after, _) = honest_for(Duration::from_secs(2), &mut || {});
    drop(to_honest);
    let _ = honest_thread.join();

    let fds = |pid: u32| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "open file descriptors {after_secs} s after: edge {}, agent {}",
        fds(edge_pid),
        fds(agent_pid)
    );
    println!(
        "flood: {FLOOD_CONNS} h2 connections x {STREAMS_PER_CONN} streams, {PAD_COPIES} x 4000-byte header per request, {flood_secs} s"
    );
    println!(
        "flood requests answered: {flood_reqs} ({} refused: 429/431/503)",
        refused.load(Ordering::Relaxed)
    );
    println!(
        "edge RSS MiB: baseline {:.1}, peak {:.1}, {after_secs} s after {:.1} ({:+.0}% of baseline)",
        mib(edge0),
        mib(edge_peak),
        mib(edge1),
        (edge1 as f64 / edge0.max(1) as f64 - 1.0) * 100.0
    );
    println!(
        "agent RSS MiB: baseline {:.1}, peak {:.1}, {after_secs} s after {:.1} ({:+.0}% of baseline)",
        mib(agent0),
        mib(agent_peak),
        mib(agent1),
        (agent1 as f64 / agent0.max(1) as f64 - 1.0) * 100.0
    );
    let b99 = pct(&mut base, 0.99);
    let d99 = pct(&mut during, 0.99);
    println!(
        "honest GET (other address): baseline p50 {:?} p99 {:?} ({} ok); during flood p50 {:?} p99 {:?} ({} ok, {failed} failed) = {:.1}x baseline p99; after p99 {:?}",
        pct(&mut base, 0.5),
        b99,
        base.len(),
        pct(&mut during, 0.5),
        d99,
        during.len(),
        d99.as_secs_f64() / b99.as_secs_f64().max(1e-9),
        pct(&mut after, 0.99),
    );
}
