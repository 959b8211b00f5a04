//! The admin listener the three binaries share: `/livez` (the process serves),
//! `/readyz` (take traffic; only where the binary says what ready means) and
//! `/metrics` (Prometheus, in the format the scraper's `Accept` asks for). Kept off the
//! public ports: nothing here authenticates.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::prom::Format;

/// Renders the metrics page in a format.
type MetricsFn = dyn Fn(Format) -> String + Send + Sync;
/// Says whether the process should take traffic, with a line for the probe's log.
type ReadyFn = dyn Fn() -> Result<String, String> + Send + Sync;

/// What one binary's admin listener serves.
#[derive(Clone)]
pub struct Admin {
    metrics: Arc<MetricsFn>,
    ready: Option<Arc<ReadyFn>>,
}

impl Admin {
    /// `/livez` and `/metrics`, the page rendered by `metrics` at each scrape.
    pub fn new(metrics: impl Fn(Format) -> String + Send + Sync + 'static) -> Admin {
        Admin {
            metrics: Arc::new(metrics),
            ready: None,
        }
    }

    /// Adds `/readyz`: 200 with the `Ok` line, 503 with the `Err` line.
    pub fn with_readiness(
        mut self,
        ready: impl Fn() -> Result<String, String> + Send + Sync + 'static,
    ) -> Admin {
        self.ready = Some(Arc::new(ready));
        self
    }

    /// The answer to one request (no socket: tests call it directly).
    pub fn answer<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let text = "text/plain; charset=utf-8";
        let (status, ctype, body) = match (req.uri().path(), &self.ready) {
            ("/livez", _) => (StatusCode::OK, text, "ok\n".to_string()),
            ("/readyz", Some(ready)) => match ready() {
                Ok(line) => (StatusCode::OK, text, format!("{line}\n")),
                Err(line) => (StatusCode::SERVICE_UNAVAILABLE, text, format!("{line}\n")),
            },
            ("/metrics", _) => {
                let accept = req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let format = Format::negotiate(accept);
                // Prometheus 3 refuses a scrape without a Content-Type it knows.
                (
                    StatusCode::OK,
                    format.content_type(),
                    (self.metrics)(format),
                )
            }
            (_, ready) => (
                StatusCode::NOT_FOUND,
                text,
                if ready.is_some() {
                    "admin paths: /livez /readyz /metrics\n"
                } else {
                    "admin paths: /livez /metrics\n"
                }
                .to_string(),
            ),
        };
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(ctype),
        );
        r
    }

    /// Serves on `listener` (HTTP/1.1 and HTTP/2) until `stop` fires.
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        loop {
            let tcp = tokio::select! {
                r = listener.accept() => match r {
                    Ok((tcp, _)) => tcp,
                    // Out of descriptors or the like: try again shortly.
                    Err(_) => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let admin = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let r = admin.answer(&req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                tokio::select! {
                    _ = builder.serve_connection(TokioIo::new(tcp), svc) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(admin: &Admin, path: &str, accept: Option<&str>) -> (u16, String, String) {
        let mut req = Request::get(path);
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        let r = admin.answer(&req.body(()).unwrap());
        let ct = r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_string();
        let status = r.status().as_u16();
        let body = futures_body(r);
        (status, ct, body)
    }

    fn futures_body(r: Response<Full<Bytes>>) -> String {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let b = rt.block_on(r.into_body().collect()).unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn paths_and_formats() {
        let admin = Admin::new(|f| format!("{f:?}\n"));
        assert_eq!(get(&admin, "/livez", None).0, 200);
        let (st, _, body) = get(&admin, "/readyz", None);
        assert_eq!((st, body.as_str()), (404, "admin paths: /livez /metrics\n"));
        let (st, ct, body) = get(&admin, "/metrics", None);
        assert_eq!(
            (st, ct.as_str(), body.as_str()),
            (200, crate::prom::CONTENT_TYPE, "Classic\n")
        );
        let (_, ct, body) = get(&admin, "/metrics", Some("application/openmetrics-text"));
        assert_eq!(
            (ct.as_str(), body.as_str()),
            (crate::prom::OPENMETRICS_CONTENT_TYPE, "OpenMetrics\n")
        );

        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let u = up.clone();
        let admin = admin.with_readiness(move || {
            if u.load(std::sync::atomic::Ordering::Relaxed) {
                Ok("ready".into())
            } else {
                Err("not ready: no link".into())
            }
        });
        assert_eq!(
            get(&admin, "/readyz", None),
            (
                503,
                "text/plain; charset=utf-8".into(),
                "not ready: no link\n".into()
            )
        );
        up.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(get(&admin, "/readyz", None).0, 200);
        assert_eq!(
            get(&admin, "/nope", None).2,
            "admin paths: /livez /readyz /metrics\n"
        );
    }
}
