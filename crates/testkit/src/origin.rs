//! A test origin: a real HTTP/1.1 + h2c server on a loopback port.
//!
//! Endpoints:
//! - `GET /hello` → `hello from origin`
//! - `POST /echo` → the request body, streamed back as it arrives
//! - `GET /bytes/N` → N bytes of [`pattern`], streamed in 64 KiB chunks
//! - `POST /sink` → reads the body and answers `{"bytes": n, "sum": s}` (a checksum)
//! - `GET /headers` → the request line and headers as JSON
//! - `GET /sse` → one event at once, then a second after [`Origin::release_sse`]
//! - `GET /slow/MS` → answers after MS milliseconds
//! - `GET /ws` → WebSocket echo (text and binary), honours close
//! - `GET /abort/N` → announces a larger length, sends N bytes, then drops the connection
//!
//! Every request's head is recorded for assertions ([`Origin::seen`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot_like::Mutex;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

mod parking_lot_like {
    /// A std mutex that does not poison in practice for these short sections.
    pub struct Mutex<T>(std::sync::Mutex<T>);
    impl<T> Mutex<T> {
        pub fn new(v: T) -> Self {
            Mutex(std::sync::Mutex::new(v))
        }
        pub fn lock(&self) -> std::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

/// The deterministic byte at offset `i` of `/bytes/N` and of test uploads.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31) % 251) as u8
}

/// A chunk of the pattern starting at `offset`.
pub fn pattern_chunk(offset: u64, len: usize) -> Bytes {
    (0..len as u64)
        .map(|i| pattern(offset + i))
        .collect::<Vec<u8>>()
        .into()
}

/// A request head as the origin saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Headers (name, value).
    pub headers: Vec<(String, String)>,
}

impl Seen {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct State {
    seen: Mutex<Vec<Seen>>,
    sse_release: tokio::sync::Semaphore,
}

/// A running origin; stops when dropped.
pub struct Origin {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

impl Origin {
    /// Starts an origin on a free loopback port.
    pub async fn start() -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Origin::serve(listener)
    }

    /// Serves on an already-bound listener (to restart on the same port).
    pub fn serve(listener: tokio::net::TcpListener) -> Origin {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            seen: Mutex::new(Vec::new()),
            sse_release: tokio::sync::Semaphore::new(0),
        });
        let stop = CancellationToken::new();
        let st = state.clone();
        let stop2 = stop.clone();
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            loop {
                let (tcp, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stop2.cancelled() => return,
                };
                let _ = tcp.set_nodelay(true);
                let st = st.clone();
                let builder = builder.clone();
                let stop3 = stop2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(route(st, req).await) }
                    });
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop3.cancelled() => {}
                    }
                });
            }
        });
        Origin { addr, state, stop }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().clone()
    }

    /// Lets `/sse` send its second event and end.
    pub fn release_sse(&self) {
        self.state.sse_release.add_permits(1);
    }

    /// Stops serving (listener and open connections).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn text(status: StatusCode, s: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        http_body_util::Full::new(s.into())
            .map_err(|n| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

fn channel_body(rx: mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>) -> Body {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// True for the agent's health probes, which the test origins leave out of what they
/// record (tests count viewers' requests).
fn is_probe(user_agent: Option<&[u8]>) -> bool {
    user_agent.is_some_and(|u| u.starts_with(b"netbore-health/"))
}

async fn route(st: Arc<State>, mut req: Request<Incoming>) -> Response<Body> {
    if is_probe(req.headers().get("user-agent").map(|v| v.as_bytes())) {
        return text(StatusCode::OK, "");
    }
    st.seen.lock().push(Seen {
        method: req.method().to_string(),
        target: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    });
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let first = parts.next().unwrap_or("");
    let arg = parts.next().unwrap_or("");
    match first {
        "hello" => text(StatusCode::OK, "hello from origin"),
        "echo" => {
            let (tx, rx) = mpsc::channel(4);
            let mut body = req.into_body();
            tokio::spawn(async move {
                while let Some(f) = body.frame().await {
                    match f {
                        Ok(f) => {
                            if let Ok(d) = f.into_data()
                                && tx.send(Ok(Frame::data(d))).await.is_err()
                            {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(std::io::Error::other(e))).await;
                            return;
                        }
                    }
                }
            });
            Response::new(channel_body(rx))
        }
        "bytes" => {
            let n: u64 = arg.parse().unwrap_or(0);
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(async move {
                let mut off = 0;
                while off < n {
                    let len = (n - off).min(64 * 1024) as usize;
                    if tx
                        .send(Ok(Frame::data(pattern_chunk(off, len))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    off += len as u64;
                }
            });
            let mut r = Response::new(channel_body(rx));
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, n.to_string().parse().unwrap());
            r
        }
        "sink" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            let mut sum = 0u64;
            let mut ok = true;
            while let Some(f) = body.frame().await {
                match f {
                    Ok(f) => {
                        if let Ok(d) = f.into_data() {
                            for (i, b) in d.iter().enumerate() {
                                if *b != pattern(n + i as u64) {
                                    ok = false;
                                }
                                sum = sum.wrapping_add(*b as u64);
                            }
                            n += d.len() as u64;
                        }
                    }
                    Err(_) => return text(StatusCode::BAD_REQUEST, "body failed"),
                }
            }
            text(
                StatusCode::OK,
                serde_json::json!({"bytes": n, "sum": sum, "pattern_ok": ok}).to_string(),
            )
        }
        "headers" => {
            let seen = st.seen.lock().last().cloned().unwrap();
            text(
                StatusCode::OK,
                serde_json::json!({
                    "method": seen.method,
                    "target": seen.target,
                    "headers": seen.headers,
                })
                .to_string(),
            )
        }
        "sse" => {
            let (tx, rx) = mpsc::channel(2);
            let st2 = st.clone();
            tokio::spawn(async move {
                let released = st2.sse_release.acquire();
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"data: first\n\n"))))
                    .await;
                let _ = tokio::time::timeout(Duration::from_secs(20), released).await;
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"data: last\n\n"))))
                    .await;
            });
            let mut r = Response::new(channel_body(rx));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                "text/event-stream".parse().unwrap(),
            );
            r
        }
        "slow" => {
            let ms: u64 = arg.parse().unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(StatusCode::OK, "slow answer")
        }
        "abort" => {
            let n: u64 = arg.parse().unwrap_or(1024);
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(pattern_chunk(0, n as usize)))).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx
                    .send(Err(std::io::Error::other("origin aborts on purpose")))
                    .await;
            });
            let mut r = Response::new(channel_body(rx));
            r.headers_mut().insert(
                http::header::CONTENT_LENGTH,
                (n * 4).to_string().parse().unwrap(),
            );
            r
        }
        "ws" => {
            let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                return text(StatusCode::BAD_REQUEST, "not a websocket request");
            };
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on_upgrade.await else { return };
                let mut ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await;
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        // Sends the close reply tungstenite queued: the viewer's close
                        // handshake completes, as with a real server.
                        let _ = ws.flush().await;
                        break;
                    }
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            let mut r = text(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
            let h = r.headers_mut();
            h.insert("connection", "upgrade".parse().unwrap());
            h.insert("upgrade", "websocket".parse().unwrap());
            h.insert("sec-websocket-accept", accept.parse().unwrap());
            r
        }
        _ => text(StatusCode::NOT_FOUND, "no such test endpoint"),
    }
}

/// An origin that records every byte it receives, raw, and answers each request head it
/// sees with `200 ok` — for asserting exactly what an edge forwarded.
pub struct RawOrigin {
    /// Its address.
    pub addr: SocketAddr,
    bytes: Arc<Mutex<Vec<u8>>>,
    stop: CancellationToken,
}

impl RawOrigin {
    /// Starts on a free loopback port.
    pub async fn start() -> RawOrigin {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (b, s) = (bytes.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = s.cancelled() => return,
                };
                let b = b.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 16 * 1024];
                    let mut pending = Vec::new();
                    // Bytes are recorded once the first head shows this is not the
                    // agent's health probe (which has a connection of its own).
                    let mut record: Option<bool> = None;
                    loop {
                        let n = match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        pending.extend_from_slice(&buf[..n]);
                        match record {
                            Some(true) => b.lock().extend_from_slice(&buf[..n]),
                            Some(false) => {}
                            None => {
                                if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                                    let head =
                                        String::from_utf8_lossy(&pending[..i]).to_ascii_lowercase();
                                    let probe = head.contains("\r\nuser-agent: netbore-health/");
                                    record = Some(!probe);
                                    if !probe {
                                        b.lock().extend_from_slice(&pending);
                                    }
                                }
                            }
                        }
                        while let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..i + 4);
                            if tcp
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                });
            }
        });
        RawOrigin { addr, bytes, stop }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything received so far, as text (lossy).
    pub fn received(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock()).into_owned()
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
