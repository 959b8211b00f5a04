//! Forwarding streams to the origin: the local service the tunnel exposes.
//!
//! One pooled hyper client per protocol: HTTP/1.1 by default, HTTP/2 (h2c prior
//! knowledge on `http://`, ALPN on `https://`) when the user says the origin speaks it or
//! when the request is gRPC, which needs HTTP/2 and trailers. `https://` origins are
//! verified against the system's web PKI roots, a CA file given by the user, or not at
//! all with the explicit insecure flag.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Uri, header};
use http_body_util::{BodyExt, Empty, combinators::BoxBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use netbore_mux::body::{PumpEnd, StreamBody, from_header_map, pump_body};
use netbore_mux::{IncomingStream, bridge};
use netbore_protocol::{OriginState, ResetCode, ResponseHead};
use tracing::{Instrument, debug};

use crate::inspect::ws::WsTap;
use crate::inspect::{Observer, Recording, TeeBody, classify, fix_for};
use crate::metrics::{AgentMetrics, OriginErrorKind};

type OriginBody = BoxBody<Bytes, std::io::Error>;
type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, OriginBody>;

/// Default time to wait for the origin's response head.
pub const DEFAULT_ORIGIN_TIMEOUT: Duration = Duration::from_secs(90);

/// Idle pooled connections to the origin are closed after this long.
pub const ORIGIN_POOL_IDLE: Duration = Duration::from_secs(60);

/// What `Host` the origin sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostHeader {
    /// The viewer's Host (the public hostname), as ngrok and cloudflared do by default.
    Preserve,
    /// The origin's own `host:port`, for dev servers that refuse unknown hosts.
    Rewrite,
    /// A fixed value.
    Fixed(String),
}

/// How to reach the origin.
#[derive(Debug, Clone)]
pub struct OriginConfig {
    /// Base URL, e.g. `http://127.0.0.1:3000`.
    pub url: Uri,
    /// Speak HTTP/2 to the origin for every request.
    pub http2: bool,
    /// Extra CA (PEM) trusted for `https://` origins.
    pub ca_file: Option<std::path::PathBuf>,
    /// Accept any certificate from an `https://` origin (self-signed development).
    pub insecure: bool,
    /// What Host the origin sees.
    pub host_header: HostHeader,
    /// Time to wait for the response head.
    pub timeout: Duration,
}

impl OriginConfig {
    /// Parses `3000`, `localhost:3000` or a full `http(s)://` URL.
    pub fn parse_target(s: &str) -> Result<Uri, String> {
        let url = if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
            match s.parse::<u16>() {
                Ok(p) if p > 0 => format!("http://127.0.0.1:{p}"),
                _ => {
                    return Err(format!(
                        "'{s}' is not a port (1 to 65535); give a port like 3000 or a URL like http://localhost:3000"
                    ));
                }
            }
        } else if s.starts_with("http://") || s.starts_with("https://") {
            s.to_string()
        } else if let Some((scheme, _)) = s.split_once("://") {
            return Err(format!(
                "'{s}' uses {scheme}://; the origin must be http:// or https:// (or a port like 3000)"
            ));
        } else {
            format!("http://{s}")
        };
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("'{s}' is not a port or URL: {e}"))?;
        if uri.authority().is_none() {
            return Err(format!(
                "'{s}' has no host; give a port like 3000 or a URL like http://localhost:3000"
            ));
        }
        if uri.port_u16() == Some(0) {
            return Err(format!(
                "'{s}' names port 0; give the port the origin listens on (1 to 65535)"
            ));
        }
        Ok(uri)
    }
}

/// Forwards streams to one origin.
#[derive(Clone)]
pub struct Origin {
    cfg: Arc<OriginConfig>,
    h1: HttpsClient,
    h2: HttpsClient,
    /// The health probe's own client: no pooled connections, so each probe opens a
    /// connection of its own and never shares one with viewers' requests.
    probe: HttpsClient,
    metrics: Arc<AgentMetrics>,
    /// A raw TCP or TLS passthrough tunnel's origin ([`crate::tcp`]), not HTTP.
    raw: Option<crate::tcp::TcpKind>,
    observer: Option<Arc<Observer>>,
}

impl Origin {
    /// Builds the clients; fails on an unreadable CA file.
    pub fn new(cfg: OriginConfig) -> Result<Origin, String> {
        let tls = crate::tls::client_config(cfg.ca_file.as_deref(), cfg.insecure)?;
        let build = |h2: bool, pooled: bool| {
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            http.set_nodelay(true);
            let b = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http();
            let conn = if h2 {
                b.enable_http2().wrap_connector(http)
            } else {
                b.enable_http1().wrap_connector(http)
            };
            let mut cb = Client::builder(TokioExecutor::new());
            cb.pool_idle_timeout(ORIGIN_POOL_IDLE)
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .timer(hyper_util::rt::TokioTimer::new());
            if h2 {
                cb.http2_only(true);
            }
            if !pooled {
                cb.pool_max_idle_per_host(0);
            }
            cb.build(conn)
        };
        Ok(Origin {
            h1: build(false, true),
            h2: build(true, true),
            probe: build(cfg.http2, false),
            cfg: Arc::new(cfg),
            metrics: Arc::default(),
            raw: None,
            observer: None,
        })
    }

    /// Counts into `metrics` instead of a private set.
    pub fn with_metrics(mut self, metrics: Arc<AgentMetrics>) -> Origin {
        self.metrics = metrics;
        self
    }

    /// Makes this a raw TCP or TLS passthrough origin (`None`: HTTP).
    pub fn with_raw(mut self, raw: Option<crate::tcp::TcpKind>) -> Origin {
        self.raw = raw;
        self
    }

    /// The raw tunnel kind, `None` for HTTP.
    pub fn raw(&self) -> Option<crate::tcp::TcpKind> {
        self.raw
    }

    /// Tells `observer` about every request (the console, the inspector).
    pub fn with_observer(mut self, observer: Option<Arc<Observer>>) -> Origin {
        self.observer = observer;
        self
    }

    /// The origin's base URL.
    pub fn url(&self) -> &Uri {
        &self.cfg.url
    }

    /// Serves one stream end to end. Never panics on bad input: every failure becomes
    /// a reset with a code the edge turns into a status for the viewer.
    ///
    /// The stream runs in a span that continues the edge's `traceparent` (or starts a
    /// trace), and the origin gets a `traceparent` naming that span.
    pub async fn serve(&self, s: IncomingStream) {
        let m = &self.metrics;
        m.streams.inc();
        m.streams_in_flight.inc();
        // Decremented however the stream ends, a dropped future included.
        struct InFlight<'a>(&'a AgentMetrics);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.streams_in_flight.dec();
            }
        }
        let _in_flight = InFlight(m);
        if self.raw.is_some() {
            let span = tracing::info_span!("tcp", stream = s.sender.id());
            return crate::tcp::serve(s, &self.cfg.url, self.cfg.timeout, m)
                .instrument(span)
                .await;
        }
        let span = request_span(&s.head);
        self.forward(s).instrument(span).await;
    }

    async fn forward(&self, s: IncomingStream) {
        let IncomingStream {
            head,
            end_stream,
            mut sender,
            receiver,
        } = s;
        let mut rec = self.observer.as_ref().map(|o| {
            // Headers only for the inspector: the console line shows none.
            let hs = if o.capturing() {
                head.headers
                    .iter()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect()
            } else {
                Vec::new()
            };
            o.begin(&head.method, &head.target, hs, None)
        });
        let upgrade = head.headers.iter().any(|h| h.name == "upgrade");
        let grpc = head
            .headers
            .iter()
            .any(|h| h.name == "content-type" && h.value.starts_with(b"application/grpc"));
        let base = &self.cfg.url;
        let path = if head.target.starts_with('/') {
            head.target.clone()
        } else {
            format!("/{}", head.target)
        };
        let base_path = base.path().trim_end_matches('/');
        let uri = format!(
            "{}://{}{}{}",
            base.scheme_str().unwrap_or("http"),
            base.authority().map(|a| a.as_str()).unwrap_or(""),
            base_path,
            path
        );
        let mut builder = Request::builder().method(head.method.as_str()).uri(uri);
        let use_h2 = (self.cfg.http2 || grpc) && !upgrade;
        for h in &head.headers {
            // HTTP/2 carries the host as :authority, taken from the URI; with a rewrite
            // or a fixed value Host is set below.
            if h.name == "host" && (use_h2 || self.cfg.host_header != HostHeader::Preserve) {
                continue;
            }
            builder = builder.header(h.name.as_str(), h.value.as_ref());
        }
        match &self.cfg.host_header {
            HostHeader::Preserve => {}
            HostHeader::Rewrite => {
                if !use_h2 && let Some(a) = base.authority() {
                    builder = builder.header(header::HOST, a.as_str());
                }
            }
            HostHeader::Fixed(v) => {
                if let Ok(v) = HeaderValue::from_str(v) {
                    builder = builder.header(header::HOST, v);
                }
            }
        }
        if let Some(hm) = builder.headers_mut() {
            forward_trace_context(hm);
        }
        if use_h2 && let Some(hm) = builder.headers_mut() {
            // Connection-specific headers are illegal in HTTP/2 (te: trailers excepted).
            hm.remove(header::CONNECTION);
            hm.remove(header::UPGRADE);
            if hm.get(header::TE).is_some_and(|v| v != "trailers") {
                hm.remove(header::TE);
            }
        }
        // An upgrade keeps the request half for the raw bytes after the 101.
        let (body, keep_rx): (OriginBody, _) = if end_stream || upgrade {
            (Empty::new().map_err(|n| match n {}).boxed(), Some(receiver))
        } else {
            let b = StreamBody::new(receiver);
            match &rec {
                Some(r) => (r.request_body(b).boxed(), None),
                None => (b.boxed(), None),
            }
        };
        let req = match builder.body(body) {
            Ok(r) => r,
            Err(e) => {
                sender.reset(
                    ResetCode::Protocol,
                    &format!("request not valid for the origin: {e}"),
                );
                return;
            }
        };
        let client = if use_h2 { &self.h2 } else { &self.h1 };
        let resp = match tokio::time::timeout(self.cfg.timeout, client.request(req)).await {
            Err(_) => {
                self.metrics.origin_error(OriginErrorKind::Timeout);
                self.record_failure(
                    rec.as_mut(),
                    crate::inspect::FailureCause::TimedOut,
                    format!("no response head within {:?}", self.cfg.timeout),
                );
                sender.reset(
                    ResetCode::OriginTimeout,
                    &format!("the origin did not answer within {:?}", self.cfg.timeout),
                );
                return;
            }
            Ok(Err(e)) => {
                let code = if e.is_connect() {
                    self.metrics.origin_error(OriginErrorKind::Unreachable);
                    ResetCode::OriginUnreachable
                } else {
                    self.metrics.origin_error(OriginErrorKind::Error);
                    ResetCode::OriginError
                };
                debug!(error = ?e, "origin request failed");
                let (cause, message) = classify(&e);
                self.record_failure(rec.as_mut(), cause, message);
                sender.reset(
                    code,
                    &format!("origin {}: {}", self.cfg.url, error_chain(&e)),
                );
                return;
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        if let Some(r) = rec.as_mut() {
            r.response(status, resp.headers());
        }
        self.metrics.response(status);
        tracing::Span::current().record("http.response.status_code", status);
        if status == 101 && upgrade {
            let headers = from_header_map(resp.headers());
            if sender
                .send_response(ResponseHead { status, headers }, false)
                .is_err()
            {
                return;
            }
            match hyper::upgrade::on(resp).await {
                Ok(up) => {
                    let io = TokioIo::new(up);
                    match (keep_rx, rec.as_ref().and_then(|r| r.websocket_session())) {
                        // The inspector reads a copy of each direction's frames.
                        (Some(rx), Some(session)) => {
                            bridge(WsTap::new(io, session), sender, rx).await
                        }
                        (Some(rx), None) => bridge(io, sender, rx).await,
                        (None, _) => {}
                    }
                }
                Err(e) => {
                    self.metrics.origin_error(OriginErrorKind::Error);
                    sender.reset(
                        ResetCode::OriginError,
                        &format!("origin upgrade failed: {e}"),
                    )
                }
            }
            return;
        }
        drop(keep_rx);
        let headers = from_header_map(resp.headers());
        let body = TeeBody::new(resp.into_body(), rec.as_ref().map(|r| r.response_capture()));
        let end = http_body::Body::is_end_stream(&body);
        match sender.send_response(ResponseHead { status, headers }, end) {
            Err(netbore_mux::MuxError::TooLarge(why)) => {
                sender.reset(
                    ResetCode::OriginError,
                    &format!("the origin's response head is too large to forward: {why}"),
                );
                return;
            }
            Err(_) => return,
            Ok(()) if end => return,
            Ok(()) => {}
        }
        if let PumpEnd::BodyFailed(e) = pump_body(body, &mut sender, ResetCode::OriginError).await {
            self.metrics.origin_error(OriginErrorKind::Error);
            debug!(error = %e, "origin response body failed");
            if let Some(r) = rec.as_mut() {
                r.failed(None, &format!("the origin's response body failed: {e}"), "");
            }
        }
    }

    fn record_failure(
        &self,
        rec: Option<&mut Recording>,
        cause: crate::inspect::FailureCause,
        message: String,
    ) {
        if let Some(r) = rec {
            let fix = fix_for(cause, &self.cfg.url.to_string(), self.cfg.timeout);
            r.failed(Some(cause), &message, &fix);
        }
    }

    /// Sends a request captured by the inspector (possibly edited) to the origin again,
    /// directly (not through the tunnel), and files it as a replay of `of`. Returns the
    /// new request's id once its response has ended.
    pub async fn replay(
        &self,
        of: u64,
        method: &str,
        target: &str,
        headers: Vec<(String, Bytes)>,
        body: Bytes,
    ) -> Result<u64, String> {
        use http_body_util::Full;
        let Some(obs) = &self.observer else {
            return Err("the inspector is off".into());
        };
        if !target.starts_with('/') {
            return Err(format!("the path '{target}' must start with '/'"));
        }
        // The body is sent whole: its length is set by hyper, never a stale one.
        let headers: Vec<(String, Bytes)> = headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .filter(|(k, _)| k != "content-length" && k != "transfer-encoding")
            .collect();
        let mut rec = obs.begin(method, target, headers.clone(), Some(of));
        let base = &self.cfg.url;
        let uri = format!(
            "{}://{}{}{}",
            base.scheme_str().unwrap_or("http"),
            base.authority().map(|a| a.as_str()).unwrap_or(""),
            base.path().trim_end_matches('/'),
            target
        );
        let mut builder = Request::builder().method(method).uri(uri);
        let use_h2 = self.cfg.http2;
        for (k, v) in &headers {
            if k == "host" && (use_h2 || self.cfg.host_header != HostHeader::Preserve) {
                continue;
            }
            builder = builder.header(k.as_str(), v.as_ref());
        }
        match &self.cfg.host_header {
            HostHeader::Preserve => {}
            HostHeader::Rewrite => {
                if !use_h2 && let Some(a) = base.authority() {
                    builder = builder.header(header::HOST, a.as_str());
                }
            }
            HostHeader::Fixed(v) => {
                if let Ok(v) = HeaderValue::from_str(v) {
                    builder = builder.header(header::HOST, v);
                }
            }
        }
        let body: OriginBody = rec
            .request_body(Full::new(body).map_err(|n| match n {}))
            .boxed();
        let req = builder.body(body).map_err(|e| {
            let m = format!("the edited request is not valid: {e}");
            rec.failed(None, &m, "");
            m
        })?;
        let client = if use_h2 { &self.h2 } else { &self.h1 };
        let resp = match tokio::time::timeout(self.cfg.timeout, client.request(req)).await {
            Err(_) => {
                let m = format!("no response head within {:?}", self.cfg.timeout);
                self.record_failure(
                    Some(&mut rec),
                    crate::inspect::FailureCause::TimedOut,
                    m.clone(),
                );
                return Ok(rec.id());
            }
            Ok(Err(e)) => {
                let (cause, message) = classify(&e);
                self.record_failure(Some(&mut rec), cause, message);
                return Ok(rec.id());
            }
            Ok(Ok(r)) => r,
        };
        rec.response(resp.status().as_u16(), resp.headers());
        let mut body = rec.response_body(resp.into_body());
        loop {
            match tokio::time::timeout(self.cfg.timeout, body.frame()).await {
                Ok(Some(Ok(_))) => {}
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    rec.failed(None, &format!("the origin's response body failed: {e}"), "");
                    break;
                }
                Err(_) => {
                    rec.failed(None, "the origin's response body stalled", "");
                    break;
                }
            }
        }
        Ok(rec.id())
    }
}

/// The span a stream is forwarded in: a child of the edge's span named by the
/// request's `traceparent`, or the root of a new trace. No secrets in its fields: the
/// path without its query, no header values.
fn request_span(head: &netbore_protocol::RequestHead) -> tracing::Span {
    let path = head.target.split('?').next().unwrap_or("");
    let span = tracing::info_span!(
        "origin",
        otel.name = "agent forward",
        otel.kind = "client",
        http.request.method = %head.method,
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
    );
    netbore_telemetry::trace_context::set_parent(&span, |name| {
        head.headers
            .iter()
            .find(|h| h.name == name)
            .and_then(|h| std::str::from_utf8(&h.value).ok())
            .map(str::to_string)
    });
    span
}

/// Gives the origin a `traceparent` naming the current span (the agent's), in place
/// of the edge's; with trace export off the edge's headers pass unchanged.
fn forward_trace_context(headers: &mut http::HeaderMap) {
    use netbore_telemetry::trace_context::{TRACEPARENT, TRACESTATE, headers_for};
    let ours = headers_for(&tracing::Span::current());
    if ours.is_empty() {
        return;
    }
    headers.remove(TRACEPARENT);
    headers.remove(TRACESTATE);
    for (k, v) in ours {
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.insert(k, v);
        }
    }
}

/// The `User-Agent` of health probes, so an origin can tell them from viewers (and
/// leave them out of its access log).
pub const PROBE_USER_AGENT: &str = concat!("netbore-health/", env!("CARGO_PKG_VERSION"));

/// Longest wait for the origin's answer to a health probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl Origin {
    /// Probes the origin: a `HEAD` of `path` (e.g. `/`), healthy for any answer below
    /// 500. Waits at most [`PROBE_TIMEOUT`] (or the origin timeout, when shorter). The
    /// result names the cause of a failure for people (never a secret).
    pub async fn probe(&self, path: &str) -> (OriginState, String) {
        let base = &self.cfg.url;
        // A TCP or TLS passthrough origin speaks no HTTP: a connection that opens is
        // healthy.
        if self.raw.is_some() {
            let addr = base
                .authority()
                .map(|a| a.as_str())
                .unwrap_or("")
                .to_string();
            let within = PROBE_TIMEOUT.min(self.cfg.timeout);
            return match tokio::time::timeout(within, tokio::net::TcpStream::connect(&addr)).await {
                Err(_) => (
                    OriginState::TimedOut,
                    format!("connecting to {addr} got no answer within {within:?}"),
                ),
                Ok(Ok(_)) => (OriginState::Healthy, format!("{addr} accepts connections")),
                Ok(Err(e)) => (
                    if e.kind() == std::io::ErrorKind::ConnectionRefused {
                        OriginState::ConnectionRefused
                    } else {
                        OriginState::Unreachable
                    },
                    format!("connecting to {addr}: {e}"),
                ),
            };
        }
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let uri = format!(
            "{}://{}{}{}",
            base.scheme_str().unwrap_or("http"),
            base.authority().map(|a| a.as_str()).unwrap_or(""),
            base.path().trim_end_matches('/'),
            path
        );
        let mut builder = Request::builder()
            .method(http::Method::HEAD)
            .uri(&uri)
            .header(header::USER_AGENT, PROBE_USER_AGENT);
        if let HostHeader::Fixed(v) = &self.cfg.host_header
            && let Ok(v) = HeaderValue::from_str(v)
        {
            builder = builder.header(header::HOST, v);
        }
        let req = match builder.body(Empty::new().map_err(|n| match n {}).boxed()) {
            Ok(r) => r,
            Err(e) => {
                return (
                    OriginState::Unreachable,
                    format!("the health path '{path}' makes no valid URL ({e}); fix --health-path"),
                );
            }
        };
        let client = &self.probe;
        let within = PROBE_TIMEOUT.min(self.cfg.timeout);
        match tokio::time::timeout(within, client.request(req)).await {
            Err(_) => (
                OriginState::TimedOut,
                format!("HEAD {uri} got no answer within {within:?}"),
            ),
            Ok(Ok(r)) if r.status().as_u16() >= 500 => (
                OriginState::ServerError,
                format!("HEAD {uri} answered {}", r.status()),
            ),
            Ok(Ok(r)) => (
                OriginState::Healthy,
                format!("HEAD {uri} answered {}", r.status()),
            ),
            Ok(Err(e)) => {
                let chain = error_chain(&e);
                (
                    probe_state(&chain, e.is_connect()),
                    format!("HEAD {uri}: {chain}"),
                )
            }
        }
    }
}

/// The cause of a failed probe, from its error chain.
fn probe_state(chain: &str, connect: bool) -> OriginState {
    let lower = chain.to_ascii_lowercase();
    if lower.contains("connection refused") {
        OriginState::ConnectionRefused
    } else if lower.contains("tls")
        || lower.contains("certificate")
        || lower.contains("handshake")
        || lower.contains("invalid peer")
    {
        OriginState::TlsRefused
    } else if lower.contains("timed out") {
        OriginState::TimedOut
    } else if connect {
        OriginState::Unreachable
    } else {
        // The connection opened (the exchange broke after: not HTTP, a reset): the
        // issue counts any connection that opens as healthy.
        OriginState::Healthy
    }
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::OriginConfig;

    #[test]
    fn targets_are_ports_hosts_or_http_urls_and_nothing_else() {
        let ok = |s: &str| OriginConfig::parse_target(s).unwrap().to_string();
        assert_eq!(ok("3000"), "http://127.0.0.1:3000/");
        assert_eq!(ok("localhost:8080"), "http://localhost:8080/");
        assert_eq!(
            ok("https://app.internal:8443"),
            "https://app.internal:8443/"
        );
        let err = |s: &str| OriginConfig::parse_target(s).unwrap_err();
        for bad in ["0", "99999", "65536"] {
            assert!(
                err(bad).contains("is not a port (1 to 65535)"),
                "{bad}: {}",
                err(bad)
            );
        }
        let e = err("ftp://x:21");
        assert!(e.contains("uses ftp://") && e.contains("http://"), "{e}");
        assert!(
            err("localhost:0").contains("port 0"),
            "{}",
            err("localhost:0")
        );
        assert!(err("not a url").contains("not a port or URL"));
    }
}
