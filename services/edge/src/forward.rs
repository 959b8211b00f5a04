//! Edge to edge: advertising the tunnels this edge holds, and forwarding viewer
//! requests for tunnels held by another edge.
//!
//! With a registry configured ([`Cluster`]), every agent connection is registered as a
//! lease ([`netbore_registry`]) when it is accepted, refreshed every
//! [`crate::EdgeConfig::registry_refresh`], and removed when it closes. A viewer
//! request for a name with no connection here is looked up there and forwarded,
//! streamed, to a holder's *internal listener* over HTTP/2 (HTTP/1.1 for upgrades,
//! whose bytes are then copied both ways). The internal listener accepts only requests
//! carrying the shared internal credential, and trusts the forwarding edge's word on
//! the viewer's address, scheme and host.
//!
//! Lookups are cached for [`CACHE_FRESH`] and dropped early when the registry announces
//! a change; while the registry is unreachable, a cached answer up to [`CACHE_STALE_MAX`]
//! old is used, so tunnels keep working through other edges during a Redis restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use netbore_registry::{Holder, LiveRegistry, RegistryError};
use netbore_tokens::Secret;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Edge;
use crate::errors::{Body, ViewerError, error_response};
use crate::phases::{self, ProxyError};

/// The shared credential every forwarded request carries.
pub const AUTH_HEADER: &str = "x-netbore-internal-auth";
/// The viewer's host (HTTP/2 puts the holder's address in `:authority`).
pub const HOST_HEADER: &str = "x-netbore-fwd-host";
/// The viewer's address as the first edge determined it.
pub const CLIENT_HEADER: &str = "x-netbore-fwd-client";
/// The `X-Forwarded-For` chain as the first edge built it.
pub const FOR_HEADER: &str = "x-netbore-fwd-for";
/// The viewer's scheme.
pub const PROTO_HEADER: &str = "x-netbore-fwd-proto";
/// Edges the request passed, comma-separated (loop protection).
pub const VIA_HEADER: &str = "x-netbore-fwd-via";
/// Most edges one request may pass: the first, and one holder that moves it on once
/// (its own connection was going away).
pub const MAX_HOPS: usize = 2;
/// A lease lives this many refresh intervals, so one missed refresh is harmless.
pub const LEASE_REFRESHES: u32 = 3;
/// How long a lookup is used without asking the registry again.
pub const CACHE_FRESH: Duration = Duration::from_secs(2);
/// Oldest cached lookup used while the registry is unreachable.
pub const CACHE_STALE_MAX: Duration = Duration::from_secs(120);
/// Most names cached; the cache is emptied when it grows past this.
pub const CACHE_MAX_NAMES: usize = 100_000;
/// A holder that refused a connection is tried last for this long.
pub const BAD_HOLDER_PAUSE: Duration = Duration::from_secs(10);
/// Longest wait for a connection to another edge.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 keep-alive ping interval on the hop to another edge (idle or not). A frozen
/// holder (SIGSTOP, a hung process) still completes TCP handshakes from its kernel;
/// only an unanswered ping tells it apart from a slow origin.
pub const HOP_PING_INTERVAL: Duration = Duration::from_secs(1);
/// A hop whose ping is not answered in this time is closed, failing the requests on it
/// (and the holder is tried last for [`BAD_HOLDER_PAUSE`]): a frozen holder costs a
/// forwarded request at most about `HOP_PING_INTERVAL + HOP_PING_TIMEOUT`.
pub const HOP_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Added to the edge's `response_timeout` to bound the wait for a holder's response
/// head: the holder answers 504 itself at `response_timeout`, so past this margin the
/// holder is stuck, not its origin. (Upgrades travel over HTTP/1.1, which has no ping:
/// this is their only bound.)
pub const HOP_HEAD_MARGIN: Duration = Duration::from_secs(5);

/// A cached lookup: the holders of a name and when they were read.
type CachedHolders = (Arc<[Holder]>, Instant);

/// This edge's part in a cluster of edges sharing a registry.
pub struct Cluster {
    registry: Arc<dyn LiveRegistry>,
    edge_id: String,
    /// The internal address other edges forward to.
    addr: String,
    secret: Secret,
    /// Holders per name, shared with the lookups that read them (never copied).
    cache: Mutex<HashMap<String, CachedHolders>>,
    bad: Mutex<HashMap<String, Instant>>,
    h2: Client<HttpConnector, Body>,
    h1: Client<HttpConnector, Body>,
    healthy: AtomicBool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("edge_id", &self.edge_id)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Joins `registry` as `edge_id`, reachable by other edges at `addr` (`host:port`)
    /// with `secret`.
    pub fn new(
        registry: Arc<dyn LiveRegistry>,
        edge_id: &str,
        addr: &str,
        secret: Secret,
    ) -> Arc<Cluster> {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .http2_adaptive_window(true)
            .timer(hyper_util::rt::TokioTimer::new())
            .http2_keep_alive_interval(Some(HOP_PING_INTERVAL))
            .http2_keep_alive_timeout(HOP_PING_TIMEOUT)
            .http2_keep_alive_while_idle(true)
            .build(conn.clone());
        let h1 = Client::builder(TokioExecutor::new()).build(conn);
        Arc::new(Cluster {
            registry,
            edge_id: edge_id.to_string(),
            addr: addr.to_string(),
            secret,
            cache: Mutex::new(HashMap::new()),
            bad: Mutex::new(HashMap::new()),
            h2,
            h1,
            healthy: AtomicBool::new(true),
        })
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<dyn LiveRegistry> {
        &self.registry
    }

    /// True while the last registry call succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    fn mark(&self, ok: bool) {
        let was = self.healthy.swap(ok, Ordering::AcqRel);
        match (was, ok) {
            (true, false) => {
                warn!("registry unreachable: serving held tunnels, refusing new agents")
            }
            (false, true) => info!("registry reachable again"),
            _ => {}
        }
    }

    /// The lease entry for one of this edge's connections.
    pub fn holder(&self, tunnel_id: &str, conn_id: u64) -> Holder {
        Holder {
            edge_id: self.edge_id.clone(),
            addr: self.addr.clone(),
            conn_id,
            tunnel_id: tunnel_id.to_string(),
        }
    }

    /// Registers one new connection (an agent's handshake waits for it).
    pub async fn register(
        &self,
        name: &str,
        holder: Holder,
        lease: Duration,
    ) -> Result<(), RegistryError> {
        let r = self
            .registry
            .register(&[(name.to_string(), holder)], lease)
            .await;
        self.mark(r.is_ok());
        r
    }

    /// Removes one connection's lease (best effort: it expires anyway).
    pub async fn unregister(&self, name: &str, holder: &Holder) {
        if let Err(e) = self.registry.unregister(name, holder).await {
            debug!(error = %e, "could not remove a lease; it expires by itself");
        }
    }

    /// The holders of `name` other than this edge (and those in `via`), usable ones
    /// first; `Err` when the registry is unreachable and nothing cached is recent.
    pub(crate) async fn holders(
        &self,
        name: &str,
        via: &[String],
    ) -> Result<Holders, RegistryError> {
        let cached = self.cache.lock().get(name).cloned();
        let list = match cached {
            Some((h, at)) if at.elapsed() < CACHE_FRESH => h,
            // While the registry is down, a recent answer serves at once; the lease
            // refresher finds out when Redis is back (each lookup would wait for it).
            Some((h, at)) if !self.is_healthy() && at.elapsed() < CACHE_STALE_MAX => h,
            _ => match self.registry.lookup(name).await {
                // Nobody registered, but holders were known a moment ago: Redis may
                // have restarted empty and not be refilled yet (within one refresh).
                // Ask those holders; they answer for their own connections.
                Ok(h)
                    if h.is_empty()
                        && cached.as_ref().is_some_and(|(c, at)| {
                            !c.is_empty() && at.elapsed() < CACHE_STALE_MAX
                        }) =>
                {
                    self.mark(true);
                    cached.map_or_else(|| Arc::from(Vec::new()), |(c, _)| c)
                }
                Ok(h) => {
                    self.mark(true);
                    let h: Arc<[Holder]> = h.into();
                    let mut c = self.cache.lock();
                    if c.len() >= CACHE_MAX_NAMES {
                        c.clear();
                    }
                    c.insert(name.to_string(), (h.clone(), Instant::now()));
                    h
                }
                Err(e) => {
                    self.mark(false);
                    match cached {
                        Some((h, at)) if at.elapsed() < CACHE_STALE_MAX => {
                            debug!(error = %e, "registry unreachable; using a cached lookup");
                            h
                        }
                        _ => return Err(e),
                    }
                }
            },
        };
        let mut v: Vec<usize> = (0..list.len())
            .filter(|&i| {
                let h = &list[i];
                h.edge_id != self.edge_id && !via.contains(&h.edge_id)
            })
            .collect();
        // Spread load over holders; known-bad ones last.
        let offset = rand::random::<u32>() as usize;
        if !v.is_empty() {
            let n = v.len();
            v.rotate_left(offset % n);
        }
        // Looked up under the lock (a handful of holders), never copied out: the map
        // is read on every forwarded request. Its pauses expire as they are read.
        let mut b = self.bad.lock();
        if !b.is_empty() {
            b.retain(|_, t| t.elapsed() < BAD_HOLDER_PAUSE);
            v.sort_by_key(|&i| b.contains_key(&list[i].addr));
        }
        drop(b);
        Ok(Holders { list, order: v })
    }

    /// Makes cached lookups of `name` ([`netbore_registry::ALL`]: of every name) stale:
    /// the next request asks the registry, and falls back on them only if the registry
    /// cannot answer (a change feed that ends because Redis went away must not take the
    /// fallback with it).
    fn forget(&self, name: &str) {
        let Some(stale) = Instant::now().checked_sub(CACHE_FRESH) else {
            return;
        };
        let mut c = self.cache.lock();
        if name == netbore_registry::ALL {
            for (_, at) in c.values_mut() {
                *at = (*at).min(stale);
            }
        } else if let Some((_, at)) = c.get_mut(name) {
            *at = (*at).min(stale);
        }
    }

    fn mark_bad(&self, h: &Holder) {
        self.bad.lock().insert(h.addr.clone(), Instant::now());
        // Its leases may outlive it: look again next time.
        self.forget(netbore_registry::ALL);
    }

    /// The internal credential, for a forwarded raw TCP connection's request head.
    pub(crate) fn secret_text(&self) -> &str {
        self.secret.expose()
    }

    /// True when `value` is the internal credential (compared in constant time).
    pub fn authorised(&self, value: Option<&HeaderValue>) -> bool {
        value.is_some_and(|v| {
            aws_lc_rs::constant_time::verify_slices_are_equal(
                v.as_bytes(),
                self.secret.expose().as_bytes(),
            )
            .is_ok()
        })
    }
}

/// The holders of a name in the order to try them: indexes into the cached list, so a
/// lookup copies no holder.
pub(crate) struct Holders {
    list: Arc<[Holder]>,
    order: Vec<usize>,
}

impl Holders {
    /// True when no other edge holds the name.
    pub(crate) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The holders, usable ones first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Holder> {
        self.order.iter().map(|&i| &self.list[i])
    }
}

/// Keeps this edge's leases fresh and its lookup cache honest until `stop`: refreshes
/// every connection's lease each interval (so an emptied Redis is refilled within one
/// interval), and drops cached lookups the registry announces as changed.
pub async fn maintain(edge: Edge, cluster: Arc<Cluster>, stop: CancellationToken) {
    let every = edge.config().registry_refresh;
    let lease = every * LEASE_REFRESHES;
    let mut changes = cluster.registry.changes();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                if edge.is_draining() {
                    continue;
                }
                let entries: Vec<(String, Holder)> = edge
                    .routes()
                    .registrations()
                    .into_iter()
                    .map(|(name, tunnel, conn)| (name, cluster.holder(&tunnel, conn)))
                    .collect();
                let r = cluster.registry.register(&entries, lease).await;
                if let Err(e) = &r {
                    debug!(error = %e, held = entries.len(), "lease refresh failed");
                    edge.metrics().registry_error();
                }
                cluster.mark(r.is_ok());
            }
            m = changes.recv() => match m {
                Ok(name) => cluster.forget(&name),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => cluster.forget(netbore_registry::ALL),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    changes = cluster.registry.changes();
                }
            },
        }
    }
}

/// Removes every lease this edge holds (at the start of a drain), so other edges stop
/// forwarding here while agents move.
pub async fn withdraw(edge: &Edge, cluster: &Cluster) {
    for (name, tunnel, conn) in edge.routes().registrations() {
        cluster
            .unregister(&name, &cluster.holder(&tunnel, conn))
            .await;
    }
}

/// What the first edge knows about a viewer, passed on to the holder.
pub struct Forwarded<'a> {
    /// The viewer's host.
    pub host: &'a str,
    /// The tunnel name.
    pub name: &'a str,
    /// The viewer's address.
    pub client: std::net::IpAddr,
    /// `X-Forwarded-For` as built so far.
    pub xff: &'a str,
    /// `http` or `https`.
    pub proto: &'a str,
    /// Edges already passed.
    pub via: Vec<String>,
    /// The request is an HTTP/1.1 upgrade.
    pub upgrade: bool,
}

/// Forwards the request in `pending` to an edge holding the tunnel; `fallback` is what
/// the viewer gets when no edge holds it (the request then stays in `pending`).
pub(crate) async fn forward(
    edge: &Edge,
    cluster: &Cluster,
    pending: &mut Option<Request<Incoming>>,
    f: Forwarded<'_>,
    fallback: ViewerError,
) -> Result<Response<Body>, ProxyError> {
    if f.via.len() + 1 > MAX_HOPS {
        return Err(fallback.into());
    }
    let holders = match cluster.holders(f.name, &f.via).await {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %e, tunnel = %f.name, "cannot look up a tunnel held elsewhere");
            return Err(ViewerError::RegistryUnavailable.into());
        }
    };
    if holders.is_empty() {
        // Registered lately but held nowhere now: offline, the answer a holder edge
        // gives too, wherever the viewer landed.
        if fallback == ViewerError::TunnelNotFound
            && cluster.registry.known(f.name).await.unwrap_or(false)
        {
            return Err(ViewerError::TunnelOffline.into());
        }
        return Err(fallback.into());
    }
    // Taken only now: until here the caller may still read an unread body away.
    let Some(mut req) = pending.take() else {
        return Err(fallback.into());
    };
    let mut via = f.via.clone();
    via.push(cluster.edge_id.clone());
    let via = via.join(",");
    let on_upgrade = f.upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let cfg = edge.config();
    let body_empty = http_body::Body::is_end_stream(&body);
    // The holder applies the tunnel's own limit; the edge's bounds the hop.
    let mut body: Option<Body> = Some(
        match phases::request_body(body, !body_empty, cfg.max_body_bytes, cfg.body_idle_timeout) {
            Some(b) => b.boxed(),
            None => http_body_util::Empty::new().map_err(|n| match n {}).boxed(),
        },
    );

    for h in holders.iter() {
        let Some(b) = body.take() else { break };
        let mut out = Request::builder().method(parts.method.clone()).uri(format!(
            "http://{}{}",
            h.addr,
            parts.uri.path_and_query().map_or("/", |p| p.as_str())
        ));
        if let Some(hm) = out.headers_mut() {
            for (k, v) in &parts.headers {
                // Own copies of these are set below; hop-by-hop headers are dropped by
                // the holder (upgrade ones are needed for an upgrade).
                if k.as_str().starts_with(crate::proxy::EDGE_HEADER_PREFIX)
                    || (!f.upgrade && (k == header::HOST || k == header::CONNECTION))
                {
                    continue;
                }
                hm.append(k.clone(), v.clone());
            }
            let mut set = |n: &'static str, v: &str| {
                if let Ok(v) = HeaderValue::from_str(v) {
                    hm.insert(HeaderName::from_static(n), v);
                }
            };
            set(AUTH_HEADER, cluster.secret.expose());
            set(HOST_HEADER, f.host);
            set(CLIENT_HEADER, &f.client.to_string());
            set(FOR_HEADER, f.xff);
            set(PROTO_HEADER, f.proto);
            set(VIA_HEADER, &via);
            crate::telemetry::forward_trace_context_headers(&tracing::Span::current(), hm);
        }
        let out = match out.body(b) {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "cannot build the forwarded request");
                return Err(ViewerError::BadHost.into());
            }
        };
        let client = if f.upgrade { &cluster.h1 } else { &cluster.h2 };
        let head_within = cfg.response_timeout + HOP_HEAD_MARGIN;
        let answer = match tokio::time::timeout(head_within, client.request(out)).await {
            Ok(r) => r,
            Err(_) => {
                warn!(holder = %h.edge_id, ?head_within, "holder sent no response head in time; trying others first for a while");
                cluster.mark_bad(h);
                return Err(ViewerError::OriginTimeout.into());
            }
        };
        match answer {
            Ok(resp) => {
                edge.metrics().forwarded();
                return Ok(relay(edge, resp, on_upgrade));
            }
            Err(e) if stalled(&e) => {
                warn!(holder = %h.edge_id, "holder stopped answering pings; trying others first for a while");
                cluster.mark_bad(h);
                return Err(ViewerError::TunnelLost.into());
            }
            Err(e) if e.is_connect() && body_empty => {
                debug!(error = %e, holder = %h.edge_id, "holder unreachable; trying the next");
                cluster.mark_bad(h);
                body = Some(http_body_util::Empty::new().map_err(|n| match n {}).boxed());
            }
            Err(e) => {
                debug!(error = %e, holder = %h.edge_id, "forwarding failed");
                if e.is_connect() {
                    cluster.mark_bad(h);
                }
                return Err(ViewerError::TunnelLost.into());
            }
        }
    }
    Err(ViewerError::TunnelLost.into())
}

/// True when a hop failed because the holder stopped answering (its HTTP/2 keep-alive
/// ping timed out), rather than for the request's own sake.
fn stalled(e: &hyper_util::client::legacy::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if s.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_timeout() || h.to_string().contains("keep-alive"))
        {
            return true;
        }
        if s.to_string().contains("keep-alive timed out") {
            return true;
        }
        src = s.source();
    }
    false
}

/// The holder's response for the viewer; a 101 joins the two upgraded connections,
/// under the edge's task tracker, so a drain of this (forwarding) edge waits for the
/// session within its grace as it does for one through a local agent.
fn relay(
    edge: &Edge,
    resp: Response<Incoming>,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(viewer) = on_upgrade
    {
        let (parts, body) = resp.into_parts();
        let inner = hyper::upgrade::on(Response::from_parts(parts.clone(), body));
        phases::join_upgrade(
            edge,
            viewer,
            inner,
            |mut v, inner| async move {
                let Ok(i) = inner.await else {
                    debug!("an upgrade through another edge failed");
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut v, &mut TokioIo::new(i)).await;
            },
            |_, _| debug!("an upgrade through another edge failed"),
        );
        let mut out = Response::new(http_body_util::Empty::new().map_err(|n| match n {}).boxed());
        *out.status_mut() = parts.status;
        *out.headers_mut() = parts.headers;
        return out;
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Relayed(Some(body)).boxed())
}

/// Longest a relayed response body is read on after the viewer's side stopped polling.
pub const DRAIN_ON_DROP: Duration = Duration::from_secs(1);
/// Most bytes read on after the viewer's side stopped polling.
pub const DRAIN_ON_DROP_BYTES: usize = 64 * 1024;

/// A holder's response body on its way to the viewer. hyper stops polling a body once
/// the declared `Content-Length` is delivered; dropping an HTTP/2 stream whose
/// END_STREAM has not arrived yet resets it, and h2 closes a connection after 1,024
/// such resets (failing the requests in flight on it: 2 in 1,000 under load before
/// this). So a body dropped early is read to its end in the background, briefly.
struct Relayed(Option<Incoming>);

impl http_body::Body for Relayed {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
        match self.0.as_mut() {
            Some(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map_err(std::io::Error::other),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0
            .as_ref()
            .map(http_body::Body::size_hint)
            .unwrap_or_default()
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        let Some(mut body) = self.0.take() else {
            return;
        };
        if http_body::Body::is_end_stream(&body) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let _ = tokio::time::timeout(DRAIN_ON_DROP, async {
                let mut read = 0;
                while let Some(Ok(f)) = body.frame().await {
                    read += f.data_ref().map_or(0, |d| d.len());
                    if read > DRAIN_ON_DROP_BYTES {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

/// Accepts other edges' forwarded requests until `stop` fires.
pub async fn serve_internal(
    edge: Edge,
    cluster: Arc<Cluster>,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    while let Some((tcp, peer)) = crate::accept(&listener, &stop, "internal").await {
        let (edge2, cluster, builder, stop) =
            (edge.clone(), cluster.clone(), builder.clone(), stop.clone());
        edge.tracker().spawn(
            async move {
                let svc = hyper::service::service_fn(move |req| {
                    let (edge, cluster) = (edge2.clone(), cluster.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(internal(edge, cluster, req).await)
                    }
                });
                crate::serve_http(&builder, tcp, svc, &stop, "internal").await;
            }
            .instrument(info_span!("internal", %peer)),
        );
    }
}

async fn internal(edge: Edge, cluster: Arc<Cluster>, req: Request<Incoming>) -> Response<Body> {
    if !cluster.authorised(req.headers().get(AUTH_HEADER)) {
        edge.metrics().error("internal_forbidden");
        return error_response(
            StatusCode::FORBIDDEN,
            "internal_forbidden",
            "This listener is for other edges only; they must present the shared internal credential.",
            true,
        );
    }
    let text = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (Some(host), Some(client)) = (
        text(HOST_HEADER),
        text(CLIENT_HEADER).and_then(|c| c.parse::<std::net::IpAddr>().ok()),
    ) else {
        edge.metrics().error("internal_bad_request");
        return error_response(
            StatusCode::BAD_REQUEST,
            "internal_bad_request",
            "A forwarded request needs the viewer's host and address.",
            true,
        );
    };
    let view = crate::proxy::ClientView {
        xff: text(FOR_HEADER).unwrap_or_else(|| client.to_string()),
        client,
        proto: text(PROTO_HEADER)
            .filter(|p| p == "http" || p == "https")
            .unwrap_or_else(|| edge.config().public_scheme.clone()),
    };
    let via: Vec<String> = text(VIA_HEADER)
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    if crate::tcp::is_tcp_upgrade(&req) {
        // A raw TCP or TLS passthrough connection: `host` is its route key.
        return crate::tcp::internal(edge, req, host, client).await;
    }
    crate::proxy::handle_with(edge, req, Some(host), view, via).await
}
