//! Control's Prometheus metrics, served as text at `/metrics` on the admin listener
//! (`--admin-addr`, off unless given), away from the REST port agents and the internet
//! reach.
//!
//! Every label set is bounded: token kinds, operation names, control's own error codes,
//! HTTP status classes and the 17 gRPC status codes. Nothing per tunnel or per caller.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use netbore_telemetry::prom::{CONTENT_TYPE, Text};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Control;

/// Kinds of token control signs, in the order of [`ControlMetrics::tokens_issued`].
pub const TOKEN_KINDS: [&str; 3] = ["ephemeral", "recreate", "management"];

/// gRPC status code names by number (0..=16), as the `code` label.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Operations whose refusals are counted, as the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// Create (or recreate) a tunnel: issues an ephemeral and a recreate token.
    CreateTunnel,
    /// Delete a tunnel.
    DeleteTunnel,
    /// Issue a management token.
    IssueToken,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::CreateTunnel => "create_tunnel",
            Op::DeleteTunnel => "delete_tunnel",
            Op::IssueToken => "issue_token",
        }
    }
}

/// What control counts.
#[derive(Default, Debug)]
pub struct ControlMetrics {
    /// Tokens signed, by [`TOKEN_KINDS`].
    pub tokens_issued: [AtomicU64; 3],
    /// Tunnels created: fresh (index 0) and recreated with a recreate token (index 1).
    pub tunnels_created: [AtomicU64; 2],
    /// Tunnels deleted.
    pub tunnels_deleted: AtomicU64,
    /// Refused operations by (operation, error code); both sets are fixed in the code.
    refusals: Mutex<BTreeMap<(Op, String), u64>>,
    /// REST responses by status class 1xx..5xx.
    pub rest: [AtomicU64; 5],
    /// gRPC calls by final status code (see [`GRPC_CODES`]).
    pub grpc: [AtomicU64; 17],
}

impl ControlMetrics {
    /// Counts a refusal of `op` with control's error `code`.
    pub fn refused(&self, op: Op, code: &str) {
        *self
            .refusals
            .lock()
            .entry((op, code.to_string()))
            .or_default() += 1;
    }

    /// Counts a REST response.
    pub fn rest_response(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.rest[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a finished gRPC call (unknown numbers count as `UNKNOWN`).
    pub fn grpc_status(&self, code: u16) {
        let i = if (code as usize) < GRPC_CODES.len() {
            code as usize
        } else {
            2
        };
        self.grpc[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The page served at `/metrics`.
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut t = Text::new();
        t.family(
            "netbore_control_tokens_issued_total",
            "counter",
            "Tokens signed: ephemeral and recreate with each tunnel creation, management by /auth/token.",
        );
        for (i, kind) in TOKEN_KINDS.iter().enumerate() {
            t.sample(
                "netbore_control_tokens_issued_total",
                &[("kind", kind)],
                get(&self.tokens_issued[i]),
            );
        }
        t.family(
            "netbore_control_refusals_total",
            "counter",
            "Refused operations, by operation and control's error code (the reason).",
        );
        for ((op, code), n) in self.refusals.lock().iter() {
            t.sample(
                "netbore_control_refusals_total",
                &[("op", op.label()), ("code", code)],
                n,
            );
        }
        t.family(
            "netbore_control_tunnels_created_total",
            "counter",
            "Tunnels created: fresh ones, and existing ones an agent recreated with its recreate token.",
        );
        for (i, kind) in ["new", "recreate"].iter().enumerate() {
            t.sample(
                "netbore_control_tunnels_created_total",
                &[("kind", kind)],
                get(&self.tunnels_created[i]),
            );
        }
        t.single(
            "netbore_control_tunnels_deleted_total",
            "counter",
            "Tunnels deleted.",
            get(&self.tunnels_deleted),
        );
        t.family(
            "netbore_control_rest_requests_total",
            "counter",
            "REST responses, by status class.",
        );
        for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            t.sample(
                "netbore_control_rest_requests_total",
                &[("class", class)],
                get(&self.rest[i]),
            );
        }
        t.family(
            "netbore_control_grpc_requests_total",
            "counter",
            "Finished gRPC calls, by status code (edges' link streams count when they end).",
        );
        for (i, code) in GRPC_CODES.iter().enumerate() {
            t.sample(
                "netbore_control_grpc_requests_total",
                &[("code", code)],
                get(&self.grpc[i]),
            );
        }
        t.build_info("control", env!("CARGO_PKG_VERSION"));
        t.finish()
    }
}

/// The admin router: `/metrics` and `/livez`.
pub fn admin_router(control: Control) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(
                |axum::extract::State(c): axum::extract::State<Control>| async move {
                    (
                        [(http::header::CONTENT_TYPE, CONTENT_TYPE)],
                        c.metrics().render(),
                    )
                },
            ),
        )
        .route("/livez", get(|| async { "ok\n" }))
        .fallback(|| async {
            (
                http::StatusCode::NOT_FOUND,
                "admin paths: /metrics /livez\n",
            )
        })
        .with_state(control)
}

/// Serves the admin router on `listener` until `shutdown` fires.
pub async fn serve_admin(
    listener: TcpListener,
    control: Control,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, admin_router(control))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Counts REST responses by status class (an axum `map_response` step).
pub(crate) async fn count_rest(
    axum::extract::State(control): axum::extract::State<Control>,
    resp: axum::response::Response,
) -> axum::response::Response {
    control.metrics().rest_response(resp.status().as_u16());
    resp
}

/// A tower layer that counts every gRPC call by its final status: from the response
/// headers (an error answered at once) or from the trailers when the body ends. A call
/// whose body is dropped before its trailers counts as `CANCELLED`.
#[derive(Clone)]
pub struct GrpcCountLayer(pub Arc<ControlMetrics>);

impl<S> tower::Layer<S> for GrpcCountLayer {
    type Service = GrpcCount<S>;
    fn layer(&self, inner: S) -> GrpcCount<S> {
        GrpcCount {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// See [`GrpcCountLayer`].
#[derive(Clone)]
pub struct GrpcCount<S> {
    inner: S,
    metrics: Arc<ControlMetrics>,
}

fn grpc_status_of(h: &http::HeaderMap) -> Option<u16> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcCount<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let resp = fut.await?;
            let pending = match grpc_status_of(resp.headers()) {
                Some(code) => {
                    metrics.grpc_status(code);
                    None
                }
                None => Some(metrics),
            };
            Ok(resp.map(|inner| CountedBody { inner, pending }))
        })
    }
}

/// A gRPC response body that counts the call's status when its trailers pass.
pub struct CountedBody<B> {
    inner: B,
    /// Set until the status is counted.
    pending: Option<Arc<ControlMetrics>>,
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(t) = f.trailers_ref()
                    && let Some(m) = this.pending.take()
                {
                    m.grpc_status(grpc_status_of(t).unwrap_or(2));
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(m) = this.pending.take() {
                    m.grpc_status(2);
                }
            }
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

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        if let Some(m) = self.pending.take() {
            m.grpc_status(1);
        }
    }
}
