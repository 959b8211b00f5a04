//! The inspector's web server: the page (embedded in the binary), its live feed
//! (server-sent events), and the JSON API beside it.
//!
//! | route | |
//! | --- | --- |
//! | `GET /` | the page |
//! | `GET /api/requests?status=&method=&path=` | summaries, newest first |
//! | `GET /api/requests/{id}` | one request, heads and bodies |
//! | `POST /api/requests/{id}/replay` | send it to the origin again, as is or edited |
//! | `DELETE /api/requests` | forget every request |
//! | `GET /api/live` | server-sent events, one `request` event per update |
//!
//! It listens on loopback, and still refuses a `Host` that is not its own address (a
//! page elsewhere cannot reach it through DNS rebinding) and a replay that is not
//! `application/json` from its own page (a page elsewhere cannot post one).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{REDACTED, Store};
use crate::origin::Origin;

/// The page, served as is: no CDN, no build step.
const PAGE: &str = include_str!("page.html");

/// Largest replay request accepted: an edited body up to the capture cap, as JSON.
pub const MAX_REPLAY_BODY: usize = 4 << 20;

/// A comment sent on idle live feeds, so proxies and browsers keep them open.
pub const LIVE_KEEPALIVE: Duration = Duration::from_secs(15);

type Body = BoxBody<Bytes, Infallible>;

/// What the server needs.
#[derive(Clone)]
pub struct Inspector {
    store: Arc<Store>,
    origin: Origin,
    addr: SocketAddr,
}

impl Inspector {
    /// An inspector for `store`, replaying through `origin` (which must file into the
    /// same store), answering at `addr`.
    pub fn new(store: Arc<Store>, origin: Origin, addr: SocketAddr) -> Inspector {
        Inspector {
            store,
            origin,
            addr,
        }
    }
}

/// Binds the inspector: `addr`, or when its port is taken the next of
/// [`super::INSPECT_PORT_TRIES`] ports, or else any free port.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => return Ok(l),
        Err(e) if e.kind() != std::io::ErrorKind::AddrInUse || addr.port() == 0 => return Err(e),
        Err(_) => {}
    }
    for i in 1..=super::INSPECT_PORT_TRIES {
        let Some(port) = addr.port().checked_add(i) else {
            break;
        };
        if let Ok(l) = tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            return Ok(l);
        }
    }
    tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    inspector: Inspector,
    shutdown: CancellationToken,
) {
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    // Out of descriptors: back off rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let ins = inspector.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ins = ins.clone();
                async move { Ok::<_, Infallible>(handle(&ins, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_str(content_type).expect("valid content type"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    h.insert(
        "x-content-type-options",
        header::HeaderValue::from_static("nosniff"),
    );
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    full(
        status,
        "application/json",
        serde_json::to_vec_pretty(v).unwrap_or_default(),
    )
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

/// The request's Host names this server (loopback), so a rebound DNS name cannot reach it.
fn host_is_ours(ins: &Inspector, req: &Request<Incoming>) -> bool {
    let Some(host) = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    let port = ins.addr.port().to_string();
    let Some((name, p)) = host.rsplit_once(':') else {
        return false;
    };
    p == port
        && (name == "localhost"
            || name == "127.0.0.1"
            || name == "[::1]"
            || name == ins.addr.ip().to_string()
            || name == format!("[{}]", ins.addr.ip()))
}

async fn handle(ins: &Inspector, req: Request<Incoming>) -> Response<Body> {
    if !host_is_ours(ins, &req) {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            "wrong_host",
            &format!(
                "the inspector answers only as http://{}; open that address",
                ins.addr
            ),
        );
    }
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), parts.as_slice()) {
        (Method::GET, [""]) => {
            let mut r = full(StatusCode::OK, "text/html; charset=utf-8", PAGE);
            r.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                header::HeaderValue::from_static(
                    "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'",
                ),
            );
            r
        }
        (Method::GET, ["api", "requests"]) => {
            let f = super::Filter::from_query(req.uri().query());
            let list = ins.store.list(&f);
            json_response(StatusCode::OK, &json!({"requests": list}))
        }
        (Method::DELETE, ["api", "requests"]) => {
            if !same_origin_json(ins, &req) {
                return not_from_page(ins);
            }
            ins.store.clear();
            json_response(StatusCode::OK, &json!({"cleared": true}))
        }
        (Method::GET, ["api", "requests", id]) => {
            match id.parse::<u64>().ok().and_then(|i| ins.store.get(i)) {
                Some(e) => json_response(StatusCode::OK, &ins.store.detail(&e)),
                None => no_such(id),
            }
        }
        (Method::POST, ["api", "requests", id, "replay"]) => {
            if !same_origin_json(ins, &req) {
                return not_from_page(ins);
            }
            let Some(orig) = id.parse::<u64>().ok().and_then(|i| ins.store.get(i)) else {
                return no_such(id);
            };
            let body = match Limited::new(req.into_body(), MAX_REPLAY_BODY)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too_large",
                        &format!("a replay request is at most {MAX_REPLAY_BODY} bytes"),
                    );
                }
            };
            replay(ins, orig, &body).await
        }
        (Method::GET, ["api", "live"]) => live(ins),
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "inspector paths: / and /api/requests, /api/requests/{id}, /api/requests/{id}/replay, /api/live",
        ),
    }
}

fn no_such(id: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "no_such_request",
        &format!(
            "no request {id} is kept (the inspector keeps the most recent ones); list them at /api/requests"
        ),
    )
}

/// A state-changing call must be `application/json` (which a page elsewhere cannot
/// send without a CORS preflight this server never grants) and, when the browser says
/// where it comes from, come from this server's own page.
fn same_origin_json(ins: &Inspector, req: &Request<Incoming>) -> bool {
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let origin_ok = match req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    {
        None => true,
        Some(o) => {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            o == format!("http://{host}") || o == format!("http://{}", ins.addr)
        }
    };
    json && origin_ok
}

fn not_from_page(ins: &Inspector) -> Response<Body> {
    error(
        StatusCode::FORBIDDEN,
        "not_from_inspector",
        &format!(
            "send this with Content-Type: application/json from the inspector's page (http://{}) or a script without an Origin header",
            ins.addr
        ),
    )
}

/// An edit: any field left out keeps the original's.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Edit {
    method: Option<String>,
    path: Option<String>,
    headers: Option<Vec<(String, String)>>,
    body: Option<String>,
}

async fn replay(ins: &Inspector, orig: super::Entry, body: &[u8]) -> Response<Body> {
    let edit: Edit = if body.iter().all(u8::is_ascii_whitespace) {
        Edit::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(e) => e,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_edit",
                    &format!(
                        "the edit is not valid: {e}; send {{\"method\", \"path\", \"headers\": [[name, value]], \"body\"}}, each optional"
                    ),
                );
            }
        }
    };
    let method = edit.method.unwrap_or_else(|| orig.method.clone());
    if http::Method::from_bytes(method.as_bytes()).is_err() {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_edit",
            &format!("'{method}' is not an HTTP method"),
        );
    }
    let target = match edit.path {
        Some(p) => unredact_target(&p, &orig.target),
        None => orig.target.clone(),
    };
    // A header shown redacted and sent back unchanged keeps the original's value.
    let headers = match edit.headers {
        None => orig.req_headers.to_vec(),
        Some(hs) => hs
            .into_iter()
            .map(|(k, v)| {
                let original = orig
                    .req_headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(&k))
                    .map(|(_, v)| v.clone());
                let value = match original {
                    Some(o) if v.contains(REDACTED) => o,
                    _ => Bytes::from(v),
                };
                (k, value)
            })
            .collect(),
    };
    let body = match edit.body {
        Some(b) => Bytes::from(b),
        None if orig.req_body.truncated() => {
            return error(
                StatusCode::CONFLICT,
                "body_not_kept",
                &format!(
                    "the original body was {} bytes, more than the {} kept, so it cannot be sent again as is; send an edited \"body\"",
                    orig.req_body.size,
                    orig.req_body.data.len()
                ),
            );
        }
        None => orig.req_body.data.clone(),
    };
    match ins
        .origin
        .replay(orig.id, &method, &target, headers, body)
        .await
    {
        Ok(id) => match ins.store.get(id) {
            Some(e) => json_response(StatusCode::OK, &ins.store.detail(&e)),
            None => json_response(StatusCode::OK, &json!({"id": id})),
        },
        Err(e) => error(StatusCode::BAD_REQUEST, "bad_edit", &e),
    }
}

/// A path whose query parameters were shown redacted and sent back unchanged gets
/// the original's values for them.
fn unredact_target(edited: &str, original: &str) -> String {
    let Some((path, query)) = edited.split_once('?') else {
        return edited.to_string();
    };
    let orig_query = original.split_once('?').map(|(_, q)| q).unwrap_or("");
    let parts: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, v)) if v == REDACTED || v == "%5Bredacted%5D" => orig_query
                .split('&')
                .find(|p| p.split_once('=').is_some_and(|(n, _)| n == name))
                .map(str::to_string)
                .unwrap_or_else(|| pair.to_string()),
            _ => pair.to_string(),
        })
        .collect();
    format!("{path}?{}", parts.join("&"))
}

/// Server-sent events: a `request` event with each new or updated request's summary;
/// a `reload` event when this feed fell behind (the page then fetches the list).
fn live(ins: &Inspector) -> Response<Body> {
    use futures_util::StreamExt;
    let rx = ins.store.subscribe();
    let store = ins.store.clone();
    let first = futures_util::stream::once(async {
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b": live\n\n")))
    });
    let updates = futures_util::stream::unfold((rx, store), |(mut rx, store)| async move {
        let chunk = match tokio::time::timeout(LIVE_KEEPALIVE, rx.recv()).await {
            Err(_) => Bytes::from_static(b": keepalive\n\n"),
            Ok(Ok(id)) => match store.get(id) {
                Some(e) => Bytes::from(format!("event: request\ndata: {}\n\n", store.summary(&e))),
                None => Bytes::from_static(b": gone\n\n"),
            },
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                Bytes::from_static(b"event: reload\ndata: {}\n\n")
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return None,
        };
        Some((
            Ok::<_, Infallible>(http_body::Frame::data(chunk)),
            (rx, store),
        ))
    });
    let body = http_body_util::StreamBody::new(first.chain(updates));
    let mut r = Response::new(BodyExt::boxed(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}
