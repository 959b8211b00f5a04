//! The admin listener: `/livez` (the process serves), `/readyz` (take traffic: not
//! draining) for Kubernetes probes, and `/metrics` (Prometheus text). Kept off the public port so viewers cannot reach it.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Edge;

fn answer(edge: &Edge, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/livez" => (StatusCode::OK, "ok\n".to_string()),
        "/readyz" if edge.is_draining() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: this edge is shutting down\n".to_string(),
        ),
        "/readyz" => {
            let (tunnels, conns) = edge.routes().counts();
            (
                StatusCode::OK,
                format!("ready: {tunnels} tunnels, {conns} agent connections\n"),
            )
        }
        "/metrics" => (StatusCode::OK, crate::metrics::render(edge)),
        _ => (
            StatusCode::NOT_FOUND,
            "admin paths: /livez /readyz /metrics\n".to_string(),
        ),
    };
    let metrics = req.uri().path() == "/metrics";
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    // Prometheus 3 refuses a scrape without a Content-Type it knows.
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(if metrics {
            netbore_telemetry::prom::CONTENT_TYPE
        } else {
            "text/plain; charset=utf-8"
        }),
    );
    r
}

/// Serves the admin endpoints until `stop` fires.
pub async fn serve_admin(edge: Edge, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = stop.cancelled() => return,
        };
        let edge = edge.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let r = answer(&edge, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
