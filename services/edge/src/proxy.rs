//! The public listener: viewer HTTP/1.1 and HTTP/2 (h2c prior knowledge) proxied
//! through tunnels.
//!
//! Each request is routed by its host (`NAME.<domain>`, port ignored, case-insensitive)
//! to the least busy agent connection of that tunnel and becomes one stream. Bodies
//! stream both ways under the protocol's credit windows and are never buffered whole;
//! response data is handed to hyper as it arrives, so a server-sent event reaches the
//! viewer while the origin keeps the response open. Trailers pass end to end (gRPC).
//! An HTTP/1.1 `Upgrade` (WebSocket) answered with 101 turns the stream into a raw
//! bidirectional byte stream.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use netbore_mux::Event;
use netbore_mux::body::{PumpEnd, StreamBody, pump_body};
use netbore_protocol::{Header, RequestHead, ResetCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span};

use crate::Edge;
use crate::access::{Admitted, Verdict};
use crate::config::HANDSHAKE_TIMEOUT;
use crate::errors::{Body, ViewerError, wants_json};
use crate::phases::{self, ProxyError, Routed};
use crate::routes::Lookup;

/// Header carrying the viewer's address to the origin. Whatever a viewer sends under
/// this name is dropped and replaced.
pub const CLIENT_IP_HEADER: &str = "x-netbore-client-ip";

/// HTTP/2 streams a viewer may reset before the edge accepts them (h2's default).
pub const MAX_PENDING_RESETS: usize = 20;
/// HTTP/2 streams the edge may reset for protocol errors on one connection.
pub const MAX_LOCAL_ERROR_RESETS: usize = 256;
/// HTTP/2 keep-alive ping interval for idle viewer connections.
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
/// HTTP/2 connections whose ping is not answered in this time are closed.
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Hop-by-hop headers (RFC 9110 §7.6.1 and the historical ones): never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Prefix of the headers the edge sets for the origin (client address, verified
/// identity); every viewer header with it is dropped.
pub const EDGE_HEADER_PREFIX: &str = "x-netbore-";

/// Headers the edge sets itself; viewers' copies are dropped.
const EDGE_SET: &[&str] = &[
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    CLIENT_IP_HEADER,
];

/// Accepts viewer connections until `stop` fires; open connections then finish their
/// current request and close.
pub async fn serve_public(edge: Edge, listener: TcpListener, stop: CancellationToken) {
    let cfg = edge.config();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        // Slowloris and idle keep-alive connections: the head must arrive in time.
        .header_read_timeout(cfg.header_read_timeout)
        .max_headers(cfg.max_headers)
        // hyper answers 431 when the head outgrows its buffer.
        .max_buf_size(cfg.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(cfg.h2_max_streams)
        .max_header_list_size(cfg.max_header_bytes as u32)
        // Rapid reset (CVE-2023-44487): streams reset before we accept them, and
        // streams we reset for errors, are capped; past the cap the connection gets
        // GOAWAY. CONTINUATION floods are bounded by the header list size above.
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    while let Some((tcp, peer)) = crate::accept(&listener, &stop, "public").await {
        // Counted per TCP peer, before any byte is read: the cap is what keeps one
        // client from holding every file descriptor.
        let Some(slot) = edge.public_conns().admit(peer.ip()) else {
            debug!(%peer, "connection refused: too many open from this address");
            edge.metrics().connection_refused();
            drop(tcp);
            continue;
        };
        let edge2 = edge.clone();
        let builder = builder.clone();
        let stop = stop.clone();
        edge.tracker().spawn(
            async move {
                let _slot = slot;
                match edge2
                    .tls()
                    .filter(|t| t.serves_public())
                    .map(|t| t.public_acceptor())
                {
                    None => serve_conn(edge2, builder, tcp, peer, stop).await,
                    Some(acceptor) => {
                        // The ClientHello is read first: an SNI naming a passthrough
                        // tunnel gets the raw bytes relayed, never terminated here.
                        let mut tcp = tcp;
                        let (hello, sni) = match tokio::time::timeout(
                            HANDSHAKE_TIMEOUT,
                            crate::tcp::read_client_hello(&mut tcp),
                        )
                        .await
                        {
                            Ok(Ok(h)) => h,
                            Ok(Err(e)) => return debug!(error = %e, "viewer TLS handshake failed"),
                            Err(_) => return debug!("viewer TLS handshake timed out"),
                        };
                        if let Some(sni) = sni
                            && let Some(key) = crate::tcp::passthrough_key(&edge2, &sni).await
                        {
                            let io = crate::tcp::Prefixed::new(hello, tcp);
                            crate::tcp::relay(&edge2, &key, io, peer.ip(), Vec::new()).await;
                            return;
                        }
                        let tcp = crate::tcp::Prefixed::new(hello, tcp);
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => serve_conn(edge2, builder, tls, peer, stop).await,
                            Ok(Err(e)) => debug!(error = %e, "viewer TLS handshake failed"),
                            Err(_) => debug!("viewer TLS handshake timed out"),
                        }
                    }
                }
            }
            .instrument(info_span!("viewer", %peer)),
        );
    }
}

/// Serves one viewer connection (plain or TLS) until it ends or `stop` fires, after
/// which the current request finishes and the connection closes.
async fn serve_conn<S>(
    edge: Edge,
    builder: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    io: S,
    peer: SocketAddr,
    stop: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let idle = edge.config().header_read_timeout;
    let activity = std::sync::Arc::new(crate::conns::Activity::default());
    let act = activity.clone();
    // A client refused for overload again and again is read at a pace (crate::pace);
    // never a trusted proxy's connection, which carries everyone behind it.
    let trusted = edge
        .config()
        .trusted_proxies
        .iter()
        .any(|c| c.contains(peer.ip()));
    let held = std::sync::Arc::new(crate::pace::Held::new(edge.pacer(), peer.ip(), !trusted));
    let account = held.clone();
    let held_reads = edge.metrics().paced_reads();
    let svc = service_fn(move |req| {
        let edge = edge.clone();
        // Held until the response is written (or abandoned): the connection is busy.
        let busy = act.begin();
        let account = account.clone();
        async move {
            let resp = handle(edge, req, peer).await;
            if let Some(crate::pace::Refused(cost)) = resp.extensions().get() {
                account.charge(*cost);
            }
            Ok::<_, Infallible>(resp.map(|inner| Busy { inner, _busy: busy }))
        }
    });
    let conn_stop = stop.child_token();
    let serve = crate::serve_http(
        &builder,
        crate::pace::Paced::new(crate::sniff::Sniff::new(io), held, held_reads),
        svc,
        &conn_stop,
        "public",
    );
    tokio::pin!(serve);
    // A connection with no request in flight for the idle timeout, from accept on, is
    // closed: silent sockets, partial HTTP/2 prefaces, idle keep-alives.
    tokio::select! {
        _ = &mut serve => return,
        _ = activity.idle_for(idle) => {}
    }
    debug!(?idle, "closing a connection with no request in flight");
    conn_stop.cancel();
    loop {
        tokio::select! {
            _ = &mut serve => return,
            _ = tokio::time::sleep(crate::conns::IDLE_CLOSE_GRACE) => {
                if !activity.busy() {
                    return; // dropped: closed
                }
            }
        }
    }
}

/// A response body that keeps its connection marked busy until it is done.
struct Busy {
    inner: Body,
    _busy: crate::conns::ActivityGuard,
}

impl http_body::Body for Busy {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Most labels of a tunnel name the edge looks up (control's `--max-name-labels`
/// allows at most this many); a longer host is not a tunnel.
pub const MAX_NAME_LABELS: usize = 4;

/// The tunnel name a host addresses, if it is `NAME.<domain>`; NAME may have several
/// labels (`localhost-8726.pod-myslug`) when control allows them (`--max-name-labels`),
/// and is looked up whole.
pub fn tunnel_name(host: &str, domain: &str) -> Option<String> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let name = host.strip_suffix(&domain)?.strip_suffix('.')?;
    if name.is_empty() || name.split('.').any(str::is_empty) {
        return None;
    }
    if name.split('.').count() > MAX_NAME_LABELS {
        return None;
    }
    Some(name.to_string())
}

/// Host without port: from the URI authority (HTTP/2, absolute-form) or `Host`.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.host().to_string());
    }
    let h = req.headers().get(header::HOST)?.to_str().ok()?;
    let auth: http::uri::Authority = h.parse().ok()?;
    Some(auth.host().to_string())
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers())
            .iter()
            .any(|t| t == "upgrade")
}

fn connection_tokens(h: &HeaderMap) -> Vec<String> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Proxies one viewer request, counting the outcome and logging one access line when
/// the response ends.
pub async fn handle(edge: Edge, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let host = request_host(&req);
    let view = client_view(edge.config(), req.headers(), peer);
    handle_with(edge, req, host, view, Vec::new()).await
}

/// [`handle`] for a request whose host and viewer are known: from a viewer, or
/// forwarded by another edge (`via` lists the edges it passed).
pub(crate) async fn handle_with(
    edge: Edge,
    req: Request<Incoming>,
    host: Option<String>,
    view: ClientView,
    via: Vec<String>,
) -> Response<Body> {
    let started = std::time::Instant::now();
    // Parsed once here: the proxy routes by them and the access line names the tunnel.
    let name = host
        .as_deref()
        .and_then(|h| tunnel_name(h, &edge.config().domain));
    let tunnel = name.clone().unwrap_or_default();
    let method = req.method().clone();
    // The path only: query strings may carry tokens, which never reach a log.
    let path = req.uri().path().to_string();
    let client = view.client;
    // A viewer token in the URL must not leave in a Referer from whatever page answers,
    // refusals included (finding 9 of issue 12).
    let query_token = crate::access::has_query_token(req.uri());
    let span = crate::telemetry::request_span(&req, &tunnel);
    let h1_body = req.version() <= Version::HTTP_11
        && !http_body::Body::is_end_stream(req.body())
        && !is_upgrade(&req);
    // The request stays here until the proxy takes its body: an early answer leaves
    // it, and its unread body is settled below.
    let mut unread = Some(req);
    let mut resp = proxy(&edge, &mut unread, host, name, view, via)
        .instrument(span.clone())
        .await;
    match unread {
        Some(req) => settle_unread_body(req, &mut resp).await,
        // The edge answered with an error after taking the body (it may be unread in
        // part): this HTTP/1.1 connection cannot carry another request safely.
        None if h1_body && resp.headers().contains_key(crate::errors::ERROR_HEADER) => {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        None => {}
    }
    if query_token {
        resp.headers_mut().insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    span.record("http.response.status_code", resp.status().as_u16());
    let m = edge.metrics();
    m.response(resp.status().as_u16(), started.elapsed());
    let code = resp
        .headers()
        .get(crate::errors::ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(c) = &code {
        m.error(c);
    }
    let (parts, body) = resp.into_parts();
    let expected = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let logged = AccessLogged {
        inner: body,
        bytes: 0,
        expected,
        line: Some(AccessLine {
            tunnel,
            method,
            path,
            status: parts.status.as_u16(),
            code,
            client,
            started,
            _span: span,
        }),
    };
    Response::from_parts(parts, logged.boxed())
}

/// What the access log says about one request.
struct AccessLine {
    tunnel: String,
    method: http::Method,
    path: String,
    status: u16,
    code: Option<String>,
    client: std::net::IpAddr,
    started: std::time::Instant,
    /// The request's span, ended with the response.
    _span: tracing::Span,
}

/// The response body, counted; logs the access line when the body ends or is dropped
/// (a viewer that went away is logged too, with the bytes it got).
struct AccessLogged {
    inner: Body,
    bytes: u64,
    /// The declared length: hyper stops polling once it is delivered.
    expected: Option<u64>,
    line: Option<AccessLine>,
}

impl AccessLogged {
    fn log(&mut self, complete: bool) {
        if let Some(l) = self.line.take() {
            tracing::info!(
                target: "netbore::access",
                tunnel = %l.tunnel,
                method = %l.method,
                path = %l.path,
                status = l.status,
                error = l.code.as_deref().unwrap_or(""),
                bytes = self.bytes,
                complete,
                duration_ms = l.started.elapsed().as_millis() as u64,
                client_ip = %l.client,
                "request"
            );
        }
    }
}

impl http_body::Body for AccessLogged {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => this.log(true),
            Poll::Ready(Some(Err(_))) => this.log(false),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AccessLogged {
    fn drop(&mut self) {
        let complete =
            http_body::Body::is_end_stream(&self.inner) || self.expected == Some(self.bytes);
        self.log(complete);
    }
}

/// Most bytes of a request body the edge reads and discards after answering early
/// (unknown or offline name, refusals), so an HTTP/1.1 connection can carry the
/// viewer's next request; a larger body gets `Connection: close` instead.
pub const UNREAD_BODY_DRAIN_BYTES: u64 = 256 * 1024;
/// Longest the edge waits for such a body before answering with `Connection: close`.
pub const UNREAD_BODY_DRAIN_TIME: Duration = Duration::from_secs(1);

/// An HTTP/1.1 request answered before its body was read: reads up to
/// [`UNREAD_BODY_DRAIN_BYTES`] of it within [`UNREAD_BODY_DRAIN_TIME`], so the
/// connection stays usable, or marks the answer `Connection: close` (hyper closes the
/// connection once a body is left unread, and a client reusing it would see its next
/// request fail, whichever tunnel it was for).
async fn settle_unread_body(req: Request<Incoming>, resp: &mut Response<Body>) {
    if req.version() > Version::HTTP_11
        || is_upgrade(&req)
        || http_body::Body::is_end_stream(req.body())
    {
        return;
    }
    let h = req.headers();
    // A client waiting for `100 Continue` has not sent the body: reading would ask it to.
    let expects_continue = h
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let declared = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut drained = false;
    if !expects_continue && declared.is_none_or(|n| n <= UNREAD_BODY_DRAIN_BYTES) {
        let mut body = req.into_body();
        drained = tokio::time::timeout(UNREAD_BODY_DRAIN_TIME, async {
            let mut read = 0u64;
            while let Some(f) = body.frame().await {
                let Ok(f) = f else { return false };
                read += f.data_ref().map_or(0, |d| d.len() as u64);
                if read > UNREAD_BODY_DRAIN_BYTES {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false);
    }
    if !drained {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// Counts one request of a tunnel served by a local link when dropped.
struct CountRequest<'a> {
    edge: &'a Edge,
    tunnel_id: String,
    error: bool,
}

impl Drop for CountRequest<'_> {
    fn drop(&mut self) {
        self.edge
            .routes()
            .count_request(&self.tunnel_id, self.error);
    }
}

/// Routes and proxies the request in `pending`. The request is taken from it only
/// once its body goes somewhere (the agent, another edge); an early answer leaves it
/// there for [`settle_unread_body`]. Every refusal becomes a response in one place
/// ([`ProxyError::response`]).
async fn proxy(
    edge: &Edge,
    pending: &mut Option<Request<Incoming>>,
    host: Option<String>,
    name: Option<String>,
    view: ClientView,
    via: Vec<String>,
) -> Response<Body> {
    let json = pending.as_ref().is_some_and(|r| wants_json(r.headers()));
    match proxy_phases(edge, pending, host, name, view, via, json).await {
        Ok(resp) => resp,
        Err(e) => {
            let overload = matches!(
                e.error,
                ViewerError::ClientBusy | ViewerError::ClientOverloaded
            );
            let mut resp = e.response(json);
            // What the connection charges its client for this refusal (crate::pace);
            // measured only here, off the path of requests that are served.
            if overload && let Some(req) = pending.as_ref() {
                resp.extensions_mut()
                    .insert(crate::pace::Refused(crate::pace::head_cost(req)));
            }
            resp
        }
    }
}

/// The phases of [`proxy`] (see [`crate::phases`]), in order.
async fn proxy_phases(
    edge: &Edge,
    pending: &mut Option<Request<Incoming>>,
    host: Option<String>,
    name: Option<String>,
    view: ClientView,
    via: Vec<String>,
    json: bool,
) -> Result<Response<Body>, ProxyError> {
    let Some(req) = pending.as_mut() else {
        return Err(ViewerError::TunnelLost.into());
    };
    let cfg = edge.config();
    // Hygiene.
    hygiene(cfg, req)?;
    let host = host.ok_or(ViewerError::BadHost)?;
    let name = name.ok_or(ViewerError::TunnelNotFound)?;
    let upgrade = is_upgrade(req);
    // Route.
    let route = match phases::route(edge, &name)? {
        Routed::Local(r) => r,
        Routed::Elsewhere { fallback } => {
            let Some(cluster) = edge.cluster() else {
                return Err(fallback.into());
            };
            let f = crate::forward::Forwarded {
                host: &host,
                name: &name,
                client: view.client,
                xff: &view.xff,
                proto: &view.proto,
                via,
                upgrade,
            };
            return crate::forward::forward(edge, cluster, pending, f, fallback).await;
        }
    };
    // Access: the tunnel's policy decides before anything is forwarded.
    let access = route.access.clone();
    let admitted = match access
        .check(req, view.client, view.proto == "https", upgrade, json)
        .await
    {
        Verdict::Pass(a) => a,
        Verdict::Respond(r) => return Ok(r),
    };
    // Limits. One client address gets at most its share of the tunnel's slots, so a
    // flood of slow requests from one place leaves the rest to everyone else.
    let capacity = cfg
        .max_streams_per_tunnel
        .min(edge.routes().connections(&name).max(1) * cfg.limits.max_concurrent_streams as usize);
    let slot = edge
        .client_slots()
        .try_take(
            &name,
            view.client,
            crate::fair::client_cap(capacity, cfg.client_slot_share),
        )
        .ok_or(ViewerError::ClientBusy)?;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let max_body = phases::body_limit(cfg.max_body_bytes, access.max_body_bytes, declared)?;
    // Upstream request: the head the origin gets.
    let request_origin = req.headers().get(header::ORIGIN).cloned();
    let strip_session = !access.is_public();
    let build_head = |req: Parts<'_>| {
        let mut head = request_head(req, &host, &view, upgrade, &admitted, strip_session);
        crate::telemetry::forward_trace_context(&tracing::Span::current(), &mut head);
        head
    };
    let head = build_head(Parts::of(req));
    let body_empty = http_body::Body::is_end_stream(req.body());
    let end_stream = body_empty && !upgrade;
    // Held until the response head is here: what a flood of large heads could pile up.
    let _head_bytes = edge
        .head_budget()
        .take(view.client, head_len(&head))
        .ok_or(ViewerError::ClientOverloaded)?;
    let chunked = req.version() <= Version::HTTP_11
        && !upgrade
        && req.headers().contains_key(header::TRANSFER_ENCODING);
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut *req));
    let req = pending.take().ok_or(ViewerError::TunnelLost)?;
    // The head stays here without its body: the rare second open below rebuilds the
    // request head from it rather than every request cloning the one it sends.
    let (parts, incoming) = req.into_parts();
    let shell = Request::from_parts(parts, ());
    let mut body = phases::request_body(
        incoming,
        !upgrade && !end_stream,
        max_body,
        cfg.body_idle_timeout,
    );
    // A chunked body's framing is checked (sniff.rs) as it arrives: wait for its first
    // chunk, so a malformed one is refused before the head goes anywhere.
    let mut first_frame = None;
    if chunked && let Some(b) = body.as_mut() {
        match b.frame().await {
            None => {}
            Some(Ok(f)) => first_frame = Some(f),
            Some(Err(_)) => {
                return Err(b.failed.unwrap_or(ViewerError::BadChunkedEncoding).into());
            }
        }
    }

    // Open stream. A connection can close between the lookup and the open: a failure
    // that is safe to retry tries the next connection once.
    let mut opened = None;
    let mut first = Some(route);
    let mut head = Some(head);
    let mut last = ProxyError::from(ViewerError::TunnelLost);
    for _ in 0..2 {
        let route = match first.take() {
            Some(r) => r,
            None => match edge.routes().pick(&name) {
                Lookup::Found(r, _) => r,
                Lookup::Offline => return Err(ViewerError::TunnelOffline.into()),
                Lookup::Unknown => return Err(ViewerError::TunnelNotFound.into()),
            },
        };
        // Opened in the link's fair order between client addresses: a client with
        // nothing in flight goes at once, whatever another client has queued.
        let class = crate::fair::client_class(view.client);
        // Owned, not cloned: a failed open consumed the head, and the retry (a
        // connection that closed in between) builds it again.
        let head = head.take().unwrap_or_else(|| build_head(Parts::of(&shell)));
        match route.mux.open_fair(head, end_stream, class).await {
            Ok(s) => {
                opened = Some((s, route.tunnel_id.clone()));
                break;
            }
            Err(e) => {
                last = phases::open_error(&e);
                if !last.retry {
                    return Err(last);
                }
            }
        }
    }
    drop(shell);
    let Some(((tx, mut rx), tunnel_id)) = opened else {
        return Err(last);
    };
    // Counted for the tunnel's status (requests and errors over 5 minutes): an error
    // unless a response head below 500 arrives.
    let mut counted = CountRequest {
        edge,
        tunnel_id,
        error: true,
    };

    // The request half: pumped from the viewer's body, or kept for the upgrade.
    let mut tx = Some(tx);
    // The request body's own failures (too large, stalled) answer the viewer directly.
    let (body_fail_tx, mut body_fail) = tokio::sync::oneshot::channel::<ViewerError>();
    if let Some(body) = body {
        if let Some(mut tx) = tx.take() {
            // Under the edge's tracker, like every task a request spawns, so a drain
            // waits for it (within the grace) instead of the runtime dropping it.
            edge.tracker().spawn(
                async move {
                    let mut body = Prepended {
                        first: first_frame,
                        inner: body,
                    };
                    if let PumpEnd::BodyFailed(e) =
                        pump_body(&mut body, &mut tx, ResetCode::Cancel).await
                    {
                        debug!(error = %e, "the viewer's request body failed");
                        if let Some(v) = body.inner.failed {
                            let _ = body_fail_tx.send(v);
                        }
                    }
                }
                .in_current_span(),
            );
        }
    } else {
        drop(body_fail_tx);
    }

    let first = tokio::select! {
        biased;
        Ok(v) = &mut body_fail => return Err(v.into()),
        r = tokio::time::timeout(cfg.response_timeout, rx.recv()) => r,
    };
    let head = match first {
        Err(_) => {
            rx.reset(
                ResetCode::Cancel,
                "edge gave up waiting for the response head",
            );
            return Err(ViewerError::OriginTimeout.into());
        }
        Ok(Some(Event::Head(h))) => h,
        Ok(Some(Event::Reset(code, msg))) => {
            debug!(?code, %msg, "stream reset before the response head");
            // A reset we caused by failing the request body says why itself.
            if let Ok(v) = body_fail.try_recv() {
                return Err(v.into());
            }
            return Err(phases::reset_error(code));
        }
        Ok(other) => {
            debug!(?other, "unexpected first event");
            return Err(ViewerError::OriginError.into());
        }
    };

    // Response filters.
    counted.error = head.status >= 500;
    drop(counted);
    let mut resp = Response::new(http_body_util::Empty::new().map_err(|n| match n {}).boxed());
    *resp.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let switching = head.status == 101;
    *resp.headers_mut() = response_headers(head.headers, switching && upgrade);
    access.decorate(request_origin.as_ref(), resp.headers_mut());
    if let Some(c) = admitted.set_cookie {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }

    if switching {
        let (Some(on_upgrade), Some(tx)) = (on_upgrade, tx) else {
            rx.reset(ResetCode::Protocol, "101 without an upgrade request");
            return Err(ViewerError::OriginError.into());
        };
        // The upgraded stream holds the viewer's slot while it lasts.
        phases::join_upgrade(
            edge,
            on_upgrade,
            (slot, tx, rx),
            |up, (slot, tx, rx)| async move {
                let _slot = slot;
                netbore_mux::bridge(up, tx, rx).await;
            },
            |e, (_slot, mut tx, _rx)| {
                debug!(error = %e, "viewer upgrade failed");
                tx.reset(ResetCode::Cancel, "viewer upgrade failed");
            },
        );
        return Ok(resp);
    }
    if let Some(mut tx) = tx
        && upgrade
    {
        // The origin declined the upgrade: our request half ends here.
        let _ = tx.finish();
    }
    *resp.body_mut() = Holding {
        inner: StreamBody::new(rx),
        _slot: slot,
    }
    .boxed();
    Ok(resp)
}

/// A response body that holds the request's slot until it ends or is dropped.
struct Holding<B> {
    inner: B,
    _slot: crate::fair::SlotGuard,
}

impl<B: http_body::Body + Unpin> http_body::Body for Holding<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Refuses requests whose framing or host is ambiguous, before anything is forwarded.
/// hyper already refuses malformed chunk sizes, obsolete line folding and differing
/// duplicate `Content-Length`s; it does not refuse these.
fn hygiene(cfg: &crate::EdgeConfig, req: &Request<Incoming>) -> Result<(), ViewerError> {
    let h = req.headers();
    let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > cfg.max_url_bytes {
        return Err(ViewerError::UrlTooLong);
    }
    if req.version() <= Version::HTTP_11 {
        let hosts = h.get_all(header::HOST).iter().count();
        if hosts > 1 {
            return Err(ViewerError::DuplicateHost);
        }
        if hosts == 0 && req.version() == Version::HTTP_11 {
            return Err(ViewerError::MissingHost);
        }
        let te: Vec<_> = h.get_all(header::TRANSFER_ENCODING).iter().collect();
        let cl = h.get_all(header::CONTENT_LENGTH).iter().count();
        if (!te.is_empty() && cl > 0) || cl > 1 {
            return Err(ViewerError::AmbiguousLength);
        }
        if te.len() > 1
            || te
                .first()
                .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"chunked"))
        {
            return Err(ViewerError::BadTransferEncoding);
        }
        // Absolute-form targets must agree with Host.
        if let (Some(a), Some(host)) = (req.uri().authority(), h.get(header::HOST))
            && !same_host(a, host)
        {
            return Err(ViewerError::HostMismatch);
        }
    } else if let (Some(a), Some(host)) = (req.uri().authority(), h.get(header::HOST)) {
        // HTTP/2 routes by :authority; a Host naming another tunnel would reach this
        // tunnel's origin as if meant for it (finding 8 of issue 12).
        if h.get_all(header::HOST).iter().count() > 1 {
            return Err(ViewerError::DuplicateHost);
        }
        if !same_host(a, host) {
            return Err(ViewerError::AuthorityMismatch);
        }
    }
    let host_has_userinfo = req
        .uri()
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
        || h.get(header::HOST)
            .is_some_and(|v| v.as_bytes().contains(&b'@'));
    if host_has_userinfo {
        return Err(ViewerError::BadHost);
    }
    Ok(())
}

/// True when `host` (a `Host` value) names the same host as `authority`, compared as
/// routing compares them: port ignored, ASCII case ignored, a trailing dot ignored.
fn same_host(authority: &http::uri::Authority, host: &HeaderValue) -> bool {
    let norm = |h: &str| h.trim_end_matches('.').to_ascii_lowercase();
    host.to_str()
        .ok()
        .and_then(|v| v.parse::<http::uri::Authority>().ok())
        .is_some_and(|hv| norm(hv.host()) == norm(authority.host()))
}

/// Bytes a request head takes in the tunnel protocol (what it costs in the agent
/// connection's queue and at the agent).
fn head_len(head: &RequestHead) -> usize {
    1 + head.method.len()
        + 2
        + head.target.len()
        + 2
        + head
            .headers
            .iter()
            .map(|h| 4 + h.name.len() + h.value.len())
            .sum::<usize>()
}

/// A body with one frame already taken off its front (to check it) put back.
struct Prepended {
    first: Option<http_body::Frame<Bytes>>,
    inner: GuardedBody,
}

impl http_body::Body for Prepended {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if let Some(f) = self.first.take() {
            return std::task::Poll::Ready(Some(Ok(f)));
        }
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }
}

/// `body` under the limits [`GuardedBody`] enforces.
pub(crate) fn guard_body(body: Incoming, max: u64, idle: Duration) -> GuardedBody {
    GuardedBody {
        inner: body,
        seen: 0,
        max,
        idle,
        sleep: Box::pin(tokio::time::sleep(idle)),
        failed: None,
    }
}

/// A viewer's request body with the edge's limits: at most `max` bytes, and no pause
/// longer than `idle` between pieces. A breach ends the body with an error and records
/// which, so the viewer is answered 413 or 408.
pub(crate) struct GuardedBody {
    inner: Incoming,
    seen: u64,
    max: u64,
    idle: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    failed: Option<ViewerError>,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.seen += d.len() as u64;
                    if this.seen > this.max {
                        this.failed = Some(ViewerError::BodyTooLarge);
                        return Poll::Ready(Some(Err(std::io::Error::other(format!(
                            "request body over the {} byte limit",
                            this.max
                        )))));
                    }
                }
                let deadline = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(std::io::Error::other(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.sleep.as_mut().poll(cx).is_ready() {
                    this.failed = Some(ViewerError::BodyTimeout);
                    return Poll::Ready(Some(Err(std::io::Error::other(format!(
                        "request body paused for more than {:?}",
                        this.idle
                    )))));
                }
                Poll::Pending
            }
        }
    }

    // Delegated, so an empty body is known to be empty: an HTTP/2 client (the hop to
    // another edge) then ends the stream with the request's HEADERS.
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// How the edge sees the viewer: the address chain, the client, and the scheme.
pub(crate) struct ClientView {
    /// `X-Forwarded-For` for the origin.
    pub(crate) xff: String,
    /// The viewer's address.
    pub(crate) client: std::net::IpAddr,
    /// `http` or `https`.
    pub(crate) proto: String,
}

/// Works out the viewer's address and scheme. Forwarding headers count only from a
/// trusted proxy (the load balancer); from anyone else they are replaced.
fn client_view(cfg: &crate::EdgeConfig, h: &HeaderMap, peer: SocketAddr) -> ClientView {
    let trusted = |ip: std::net::IpAddr| cfg.trusted_proxies.iter().any(|c| c.contains(ip));
    let peer_ip = peer.ip();
    if !trusted(peer_ip) {
        return ClientView {
            xff: peer_ip.to_string(),
            client: peer_ip,
            proto: cfg.public_scheme.clone(),
        };
    }
    // A trusted proxy speaks for the viewer: keep its chain and take the client as the
    // rightmost address that is not itself a trusted proxy.
    let chain: Vec<String> = h
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let client = chain
        .iter()
        .rev()
        .filter_map(|s| s.parse::<std::net::IpAddr>().ok())
        .find(|ip| !trusted(*ip))
        .unwrap_or(peer_ip);
    let mut xff = chain.join(", ");
    if !xff.is_empty() {
        xff.push_str(", ");
    }
    xff.push_str(&peer_ip.to_string());
    let proto = h
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .filter(|p| *p == "http" || *p == "https")
        .map(str::to_string)
        .unwrap_or_else(|| cfg.public_scheme.clone());
    ClientView { xff, client, proto }
}

/// The parts of a request its forwarded head is built from, whatever its body.
#[derive(Clone, Copy)]
struct Parts<'a> {
    method: &'a http::Method,
    uri: &'a http::Uri,
    headers: &'a HeaderMap,
}

impl<'a> Parts<'a> {
    fn of<B>(req: &'a Request<B>) -> Parts<'a> {
        Parts {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
        }
    }
}

fn request_head(
    req: Parts<'_>,
    host: &str,
    view: &ClientView,
    upgrade: bool,
    admitted: &Admitted,
    strip_session: bool,
) -> RequestHead {
    let h = req.headers;
    let nominated = connection_tokens(h);
    let mut headers = Vec::with_capacity(h.len() + 6 + admitted.add.len());
    for (name, value) in h {
        let n = name.as_str();
        if n == "te" {
            // Only "trailers" survives (gRPC needs it end to end).
            if value.as_bytes().eq_ignore_ascii_case(b"trailers") {
                headers.push(Header::new("te", Bytes::from_static(b"trailers")));
            }
            continue;
        }
        if HOP_BY_HOP.contains(&n)
            || EDGE_SET.contains(&n)
            // X-Netbore-* headers are the edge's word to the origin: never a viewer's.
            || n.starts_with(EDGE_HEADER_PREFIX)
            || nominated.iter().any(|t| t == n)
            || (admitted.drop_authorization && name == header::AUTHORIZATION)
        {
            continue;
        }
        if name == header::REFERER
            && let Some(v) =
                crate::access::strip_token_from_url(&String::from_utf8_lossy(value.as_bytes()))
        {
            // A page opened with ?token= sends it on in Referer: never to the origin.
            headers.push(Header::new("referer", Bytes::from(v)));
            continue;
        }
        if strip_session && name == header::COOKIE {
            if let Some(v) = crate::access::strip_session_cookies(value.as_bytes()) {
                headers.push(Header::new("cookie", v));
            }
            continue;
        }
        headers.push(Header::new(n, Bytes::copy_from_slice(value.as_bytes())));
    }
    if !h.contains_key(header::HOST) {
        // HTTP/2 carries the host in :authority; origins speaking HTTP/1.1 need Host.
        if let Some(a) = req.uri.authority() {
            headers.push(Header::new(
                "host",
                Bytes::copy_from_slice(a.as_str().as_bytes()),
            ));
        }
    }
    if upgrade && let Some(u) = h.get(header::UPGRADE) {
        headers.push(Header::new("connection", Bytes::from_static(b"upgrade")));
        headers.push(Header::new("upgrade", Bytes::copy_from_slice(u.as_bytes())));
    }
    let fwd_host = h
        .get(header::HOST)
        .map(|v| Bytes::copy_from_slice(v.as_bytes()))
        .unwrap_or_else(|| Bytes::from(host.to_string()));
    headers.push(Header::new(
        "x-forwarded-for",
        Bytes::from(view.xff.clone()),
    ));
    headers.push(Header::new(
        "x-forwarded-proto",
        Bytes::from(view.proto.clone()),
    ));
    headers.push(Header::new("x-forwarded-host", fwd_host));
    headers.push(Header::new(
        CLIENT_IP_HEADER,
        Bytes::from(view.client.to_string()),
    ));
    for (k, v) in &admitted.add {
        headers.push(Header::new(k.as_str(), Bytes::from(v.clone())));
    }
    let target = admitted.target.clone().unwrap_or_else(|| {
        req.uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into())
    });
    RequestHead {
        method: req.method.as_str().to_string(),
        target,
        headers,
    }
}

/// Converts the origin's headers for the viewer, dropping hop-by-hop ones (kept for a
/// 101 answer to an upgrade, which needs `Connection` and `Upgrade`).
pub fn response_headers(headers: Vec<Header>, keep_upgrade: bool) -> HeaderMap {
    // Never sized by the peer's count alone: `HeaderMap` panics beyond 24,576 fields
    // (the decoder refuses more than MAX_HEADER_FIELDS; this holds even without it).
    let mut map = HeaderMap::with_capacity(headers.len().min(netbore_protocol::MAX_HEADER_FIELDS));
    let nominated: Vec<String> = headers
        .iter()
        .filter(|h| h.name == "connection")
        .filter_map(|h| std::str::from_utf8(&h.value).ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for h in headers {
        let n = h.name.as_str();
        let hop = HOP_BY_HOP.contains(&n) || nominated.iter().any(|t| t == n);
        if hop && !(keep_upgrade && (n == "connection" || n == "upgrade")) {
            continue;
        }
        let value = if n.eq_ignore_ascii_case("set-cookie") {
            // Host-only cookies, and never the edge's session cookie (finding 10).
            match crate::access::origin_set_cookie(&h.value) {
                Some(v) => v,
                None => continue,
            }
        } else {
            h.value
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_maybe_shared(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// Fetches `url` (plain HTTP) and parses its JSON body. Used for control's key set.
pub async fn http_get_json<T: serde::de::DeserializeOwned>(url: &str) -> Result<T, String> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), 1024 * 1024)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_labels_under_the_domain() {
        assert_eq!(
            tunnel_name("App.LocalHost", "localhost").as_deref(),
            Some("app")
        );
        assert_eq!(
            tunnel_name("app.localhost.", "localhost").as_deref(),
            Some("app")
        );
        assert_eq!(
            tunnel_name("Port-1.Pod-X.localhost", "localhost").as_deref(),
            Some("port-1.pod-x")
        );
        assert_eq!(tunnel_name("a..b.localhost", "localhost"), None);
        assert_eq!(tunnel_name(".b.localhost", "localhost"), None);
        assert_eq!(tunnel_name("a.b.c.d.e.localhost", "localhost"), None);
        assert_eq!(tunnel_name("localhost", "localhost"), None);
        assert_eq!(tunnel_name("applocalhost", "localhost"), None);
        assert_eq!(tunnel_name("app.example.com", "localhost"), None);
    }

    use proptest::prelude::*;

    /// A head or trailer frame as an agent (or a hostile one) might send it: the
    /// announced field count and the fields actually present may disagree.
    fn head_frame(ty: u8, status: u16, announced: u16, fields: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut p = Vec::new();
        match ty {
            1 => {
                p.push(3);
                p.extend_from_slice(b"GET");
                p.extend_from_slice(&1u16.to_be_bytes());
                p.push(b'/');
            }
            2 => p.extend_from_slice(&status.to_be_bytes()),
            _ => {}
        }
        p.extend_from_slice(&announced.to_be_bytes());
        for (n, v) in fields {
            let name = vec![b'a' + n % 26; 1 + usize::from(n % 3)];
            p.extend_from_slice(&(name.len() as u16).to_be_bytes());
            p.extend_from_slice(&name);
            p.extend_from_slice(&(v.len() as u16).to_be_bytes());
            p.extend_from_slice(v);
        }
        let mut f = vec![ty, 0, 0, 0, 0, 1];
        f.extend_from_slice(&(p.len() as u32).to_be_bytes());
        f.extend_from_slice(&p);
        f
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever head or trailer block arrives, decoding it and turning it into the
        /// viewer's header map never panics, and never yields more than
        /// MAX_HEADER_FIELDS fields (the `HeaderMap::with_capacity` panic of finding 5
        /// needed more than 24,576).
        #[test]
        fn random_heads_never_panic(
            ty in prop_oneof![Just(1u8), Just(2u8), Just(4u8)],
            status in 0u16..1200,
            actual in prop_oneof![0usize..64, 1000usize..1100, 24_000usize..40_000],
            announce_exact in any::<bool>(),
            announced in any::<u16>(),
            value in proptest::collection::vec(any::<u8>(), 0..4),
            seed in any::<u8>(),
        ) {
            let fields: Vec<(u8, Vec<u8>)> = (0..actual)
                .map(|i| (seed.wrapping_add(i as u8), value.clone()))
                .collect();
            let count = if announce_exact { actual.min(65535) as u16 } else { announced };
            let bytes = head_frame(ty, status, count, &fields);
            let mut buf = bytes::Bytes::from(bytes);
            match netbore_protocol::decode(&mut buf, 1 << 20) {
                Ok(Some(netbore_protocol::Frame::ResponseHead { head, .. })) => {
                    prop_assert!(head.headers.len() <= netbore_protocol::MAX_HEADER_FIELDS);
                    let _ = response_headers(head.headers.clone(), false);
                    let _ = netbore_mux::body::to_header_map(head.headers);
                }
                Ok(Some(netbore_protocol::Frame::Trailers { headers, .. })) => {
                    prop_assert!(headers.len() <= netbore_protocol::MAX_HEADER_FIELDS);
                    let _ = netbore_mux::body::to_header_map(headers);
                }
                Ok(Some(netbore_protocol::Frame::RequestHead { head, .. })) => {
                    prop_assert!(head.headers.len() <= netbore_protocol::MAX_HEADER_FIELDS);
                }
                Ok(_) => {}
                Err(netbore_protocol::DecodeError::TooManyHeaders { count, max, .. }) => {
                    prop_assert!(count > max);
                }
                Err(_) => {}
            }
        }
    }

    #[test]
    fn even_an_undecoded_field_list_cannot_panic_the_header_map() {
        // 30,000 fields built directly (not through the decoder), past HeaderMap's
        // 24,576 limit on capacity: the conversion must not panic on its size hint.
        let many: Vec<Header> = (0..30_000)
            .map(|i| Header::new(if i % 2 == 0 { "a" } else { "b" }, ""))
            .collect();
        let _ = netbore_mux::body::to_header_map(many[..1000].to_vec());
        let _ = response_headers(many[..1000].to_vec(), false);
    }

    #[test]
    fn hop_by_hop_and_nominated_headers_are_dropped_from_responses() {
        let h = response_headers(
            vec![
                Header::new("connection", "close, x-secret"),
                Header::new("x-secret", "1"),
                Header::new("keep-alive", "timeout=5"),
                Header::new("content-type", "text/plain"),
            ],
            false,
        );
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }
}
