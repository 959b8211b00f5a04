//! `netbore-bench`: the parts of `bench/run.sh` that standard tools do not cover.
//!
//! * `origin ADDR` — the origin every system under test forwards to: `GET /1k`, `/1m`,
//!   `/256m` (bodies generated in memory), `POST|PUT /upload` (a sink that answers with the
//!   byte count) and `GET /ws` (a WebSocket echo).
//! * `ws-echo URL HOST COUNT` — WebSocket round trips, one at a time, on one connection;
//!   prints p50 and p99 in microseconds.
//! * `first-byte URL HOST TIMEOUT_S -- CMD...` — starts CMD, polls `URL` (with `Host:
//!   HOST`) until it answers 200, prints the milliseconds from the start and CMD's pid,
//!   and leaves CMD running.
//! * `idle CONTROL_URL COUNT [EDGE_CA]` — creates COUNT tunnels at control and holds one
//!   idle agent link to the edge for each, as `netbore http` would; prints `ready N` and
//!   holds them until killed.
//! * `ws-layers [ROUNDS]` — the WebSocket layers the agent link could run on, compared on
//!   the link's traffic pattern over loopback (see [`wslayer`]); prints a Markdown table.
//!
//! Every loop here is bounded in count or time; it only ever talks to loopback.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

mod wsframe;
mod wslayer;

const USAGE: &str = "usage: netbore-bench origin ADDR | ws-echo URL HOST COUNT | \
first-byte URL HOST TIMEOUT_S -- CMD... | idle CONTROL_URL COUNT [EDGE_CA] | ws-layers [ROUNDS]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| anyhow!(USAGE))
    };
    match a(0)? {
        "origin" => origin(a(1)?).await,
        "ws-echo" => ws_echo(a(1)?, a(2)?, a(3)?.parse()?).await,
        "first-byte" => {
            let cmd = args
                .iter()
                .position(|s| s == "--")
                .map(|i| args[i + 1..].to_vec())
                .ok_or_else(|| anyhow!(USAGE))?;
            first_byte(a(1)?, a(2)?, a(3)?.parse()?, cmd).await
        }
        "idle" => idle(a(1)?, a(2)?.parse()?, args.get(3).cloned()).await,
        "ws-layers" => wslayer::ws_layers(args.get(1).map_or(Ok(5), |r| r.parse())?).await,
        _ => bail!(USAGE),
    }
}

// ---------------------------------------------------------------- origin

/// A body of `left` bytes made by repeating `chunk`; exact length, so Content-Length.
struct Repeat {
    chunk: Bytes,
    left: u64,
}

impl hyper::body::Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = (self.chunk.len() as u64).min(self.left) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

fn repeat(chunk: &Bytes, len: u64) -> Response<Repeat> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Repeat {
            chunk: chunk.clone(),
            left: len,
        })
        .expect("valid response")
}

fn text(status: StatusCode, s: String) -> Response<Repeat> {
    let len = s.len() as u64;
    let mut r = repeat(&Bytes::from(s), len);
    *r.status_mut() = status;
    r
}

async fn origin(addr: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .context("binding the origin")?;
    let chunk = Bytes::from(vec![b'x'; 256 * 1024]);
    eprintln!("origin listening on {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let chunk = chunk.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, chunk.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades()
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>, chunk: Bytes) -> Result<Response<Repeat>, Infallible> {
    let path = req.uri().path().to_string();
    Ok(match path.as_str() {
        "/1k" => repeat(&chunk, 1024),
        "/1m" => repeat(&chunk, 1024 * 1024),
        "/256m" => repeat(&chunk, 256 * 1024 * 1024),
        "/upload" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(f) = body.frame().await {
                match f {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(e) => return Ok(text(StatusCode::BAD_REQUEST, format!("{e}\n"))),
                }
            }
            text(StatusCode::OK, format!("{n}\n"))
        }
        "/ws" => match req.headers().get("sec-websocket-key") {
            None => text(StatusCode::BAD_REQUEST, "not a websocket\n".into()),
            Some(key) => {
                let accept = derive_accept_key(key.as_bytes());
                tokio::spawn(async move {
                    if let Ok(up) = hyper::upgrade::on(req).await {
                        let ws =
                            WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None)
                                .await;
                        echo(ws).await;
                    }
                });
                let mut r = text(StatusCode::SWITCHING_PROTOCOLS, String::new());
                let h = r.headers_mut();
                h.insert(header::CONNECTION, "upgrade".parse().expect("valid"));
                h.insert(header::UPGRADE, "websocket".parse().expect("valid"));
                h.insert(
                    header::SEC_WEBSOCKET_ACCEPT,
                    accept.parse().expect("valid header"),
                );
                h.remove(header::CONTENT_TYPE);
                r
            }
        },
        _ => text(StatusCode::NOT_FOUND, "no such file\n".into()),
    })
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut ws: WebSocketStream<S>) {
    while let Some(Ok(m)) = ws.next().await {
        let reply = match m {
            Message::Binary(_) | Message::Text(_) => m,
            Message::Close(_) => break,
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

// ---------------------------------------------------------------- ws-echo

fn insecure_tls() -> anyhow::Result<Arc<rustls::ClientConfig>> {
    Ok(Arc::new(
        netbore_agent::tls::client_config(None, true).map_err(|e| anyhow!(e))?,
    ))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn ws_echo(url: &str, host: &str, count: usize) -> anyhow::Result<()> {
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(header::HOST, host.parse()?);
    let connector = tokio_tungstenite::Connector::Rustls(insecure_tls()?);
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_tls_with_config(req, None, true, Some(connector)),
    )
    .await
    .context("websocket connect timed out")??;
    let payload = Bytes::from(vec![b'e'; 32]);
    let warmup = 200;
    let mut samples = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..warmup + count {
        if Instant::now() > deadline {
            bail!("ws-echo ran out of time after {i} round trips");
        }
        let t = Instant::now();
        ws.send(Message::Binary(payload.clone())).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Err(_) => bail!("no echo within 5 s"),
                Ok(None) => bail!("connection closed"),
                Ok(Some(m)) => match m? {
                    Message::Binary(b) if b.len() == payload.len() => break,
                    Message::Ping(_) | Message::Pong(_) => continue,
                    other => bail!("unexpected message {other:?}"),
                },
            }
        }
        if i >= warmup {
            samples.push(t.elapsed());
        }
    }
    let _ = ws.close(None).await;
    samples.sort();
    println!(
        "p50_us={:.0} p99_us={:.0}",
        percentile(&samples, 0.50).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6
    );
    Ok(())
}

// ---------------------------------------------------------------- first-byte

/// One GET; true when the answer starts with a 200 status line.
async fn get_ok(url: &http::Uri, host: &str, tls: &Arc<rustls::ClientConfig>) -> bool {
    let port = url.port_u16().unwrap_or(80);
    let addr = format!("{}:{port}", url.host().unwrap_or("127.0.0.1"));
    let Ok(Ok(tcp)) =
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(&addr)).await
    else {
        return false;
    };
    let _ = tcp.set_nodelay(true);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        url.path()
    );
    let fut = async {
        if url.scheme_str() == Some("https") {
            let conn = tokio_rustls::TlsConnector::from(tls.clone());
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("valid");
            let mut s = conn.connect(name, tcp).await.ok()?;
            s.write_all(req.as_bytes()).await.ok()?;
            read_status(&mut s).await
        } else {
            let mut s = tcp;
            s.write_all(req.as_bytes()).await.ok()?;
            read_status(&mut s).await
        }
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
        .is_some_and(|ok| ok)
}

async fn read_status<S: AsyncRead + Unpin>(s: &mut S) -> Option<bool> {
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).await.ok()?;
    Some(&buf == b"HTTP/1.1 200")
}

async fn first_byte(url: &str, host: &str, timeout_s: u64, cmd: Vec<String>) -> anyhow::Result<()> {
    let uri: http::Uri = url.parse()?;
    let tls = insecure_tls()?;
    let (prog, rest) = cmd.split_first().ok_or_else(|| anyhow!(USAGE))?;
    let start = Instant::now();
    let child = std::process::Command::new(prog)
        .args(rest)
        .stdin(std::process::Stdio::null())
        // Not our stdout: the caller reads it to its end, which must not wait for CMD.
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {prog}"))?;
    let deadline = start + Duration::from_secs(timeout_s);
    loop {
        if get_ok(&uri, host, &tls).await {
            let ms = start.elapsed().as_secs_f64() * 1e3;
            println!("ms={ms:.1} pid={}", child.id());
            return Ok(());
        }
        if Instant::now() > deadline {
            println!("ms=timeout pid={}", child.id());
            bail!("no 200 from {url} within {timeout_s} s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---------------------------------------------------------------- idle

async fn idle(control: &str, count: usize, edge_ca: Option<String>) -> anyhow::Result<()> {
    use netbore_control::api::CreateTunnelRequest;
    let client = netbore_control::client::ControlClient::new(control);
    let tls = Arc::new(
        netbore_agent::tls::client_config(edge_ca.as_deref().map(std::path::Path::new), false)
            .map_err(|e| anyhow!(e))?,
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let permit = sem.clone().acquire_owned().await?;
        let (client, tls, cancel) = (client.clone(), tls.clone(), cancel.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let t = client
                .create(&CreateTunnelRequest::default())
                .await
                .map_err(|e| anyhow!("create: {e}"))?;
            let url = &t.candidates.first().context("no candidate edge")?.edge_url;
            // One agent instance per idle tunnel, as 10,000 separate agents would be.
            let instance = format!("bench-idle-{}", t.tunnel_id);
            let link = netbore_agent::link::connect(
                url,
                &t.ephemeral_token,
                &t.tunnel_id,
                &instance,
                tls,
                cancel,
            )
            .await
            .map_err(|e| anyhow!("connect: {e}"))?;
            anyhow::Ok(link)
        });
    }
    let mut links = Vec::with_capacity(count);
    while let Some(r) = tasks.join_next().await {
        links.push(r??);
    }
    println!(
        "ready {} in {:.1}s",
        links.len(),
        started.elapsed().as_secs_f64()
    );
    // Hold the links (heartbeats keep them up) until killed, at most an hour.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    drop(links);
    Ok(())
}
