//! Control's Prometheus metrics, served at `/metrics` on the admin listener
//! (`--admin-addr`, off unless given; [`netbore_telemetry::admin`]), away from the REST
//! port agents and the internet reach. One struct of typed families in a
//! `prometheus-client` registry; handles taken once, so an increment is one atomic add.
//!
//! Every label set is bounded: token kinds, operation names, control's own error codes,
//! HTTP status classes and the 17 gRPC status codes. Nothing per tunnel or per caller.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use netbore_telemetry::admin::Admin;
use netbore_telemetry::prom::{self, Format, Registry, labelled, single};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

/// `kind`: a token kind, or `new`/`recreate` for tunnels created.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// `op` and `code`: a refused operation and control's error code, both from fixed sets.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    op: &'static str,
    code: String,
}

/// `class`: a status class, `1xx` to `5xx`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

/// `code`: one of [`GRPC_CODES`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

/// What control counts.
#[derive(Debug)]
pub struct ControlMetrics {
    registry: Registry,
    /// Tokens signed, by [`TOKEN_KINDS`].
    pub tokens_issued: [Counter; 3],
    /// Tunnels created: fresh (index 0) and recreated with a recreate token (index 1).
    pub tunnels_created: [Counter; 2],
    /// Tunnels deleted.
    pub tunnels_deleted: Counter,
    /// Refused operations by (operation, error code); series appear at the first refusal.
    refusals: Family<RefusalLabels, Counter>,
    /// REST responses by status class 1xx..5xx.
    pub rest: [Counter; 5],
    /// gRPC calls by final status code (see [`GRPC_CODES`]).
    pub grpc: [Counter; 17],
}

impl Default for ControlMetrics {
    fn default() -> ControlMetrics {
        let mut r = prom::new_registry("control", env!("CARGO_PKG_VERSION"));
        let tokens_issued = labelled(
            &mut r,
            "netbore_control_tokens_issued",
            "Tokens signed: ephemeral and recreate with each tunnel creation, management by /auth/token.",
            TOKEN_KINDS,
            |kind| KindLabel { kind },
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        prom::register(
            &mut r,
            "netbore_control_refusals",
            "Refused operations, by operation and control's error code (the reason).",
            refusals.clone(),
        );
        let tunnels_created = labelled(
            &mut r,
            "netbore_control_tunnels_created",
            "Tunnels created: fresh ones, and existing ones an agent recreated with its recreate token.",
            ["new", "recreate"],
            |kind| KindLabel { kind },
        );
        let tunnels_deleted = single(
            &mut r,
            "netbore_control_tunnels_deleted",
            "Tunnels deleted.",
        );
        let rest = labelled(
            &mut r,
            "netbore_control_rest_requests",
            "REST responses, by status class.",
            ["1xx", "2xx", "3xx", "4xx", "5xx"],
            |class| ClassLabel { class },
        );
        let grpc = labelled(
            &mut r,
            "netbore_control_grpc_requests",
            "Finished gRPC calls, by status code (edges' link streams count when they end).",
            GRPC_CODES,
            |code| CodeLabel { code },
        );
        ControlMetrics {
            registry: r,
            tokens_issued,
            tunnels_created,
            tunnels_deleted,
            refusals,
            rest,
            grpc,
        }
    }
}

impl ControlMetrics {
    /// Counts a refusal of `op` with control's error `code` (a rare path: it takes the
    /// family's lock).
    pub fn refused(&self, op: Op, code: &str) {
        self.refusals
            .get_or_create(&RefusalLabels {
                op: op.label(),
                code: code.to_string(),
            })
            .inc();
    }

    /// Counts a REST response.
    pub fn rest_response(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.rest[class].inc();
    }

    /// Counts a finished gRPC call (unknown numbers count as `UNKNOWN`).
    pub fn grpc_status(&self, code: u16) {
        let i = if (code as usize) < GRPC_CODES.len() {
            code as usize
        } else {
            2
        };
        self.grpc[i].inc();
    }

    /// The page served at `/metrics`, in `format`.
    pub fn render(&self, format: Format) -> String {
        prom::encode(&self.registry, format)
    }
}

/// What control's admin listener serves: `/metrics` and `/livez` (readiness is on the
/// REST port, `/readyz`, where load balancers look).
pub fn admin(control: Control) -> Admin {
    Admin::new(move |format| control.metrics().render(format))
}

/// Serves the admin listener on `listener` until `shutdown` fires.
pub async fn serve_admin(listener: TcpListener, control: Control, shutdown: CancellationToken) {
    admin(control).serve(listener, shutdown).await
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
