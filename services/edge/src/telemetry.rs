//! Tracing of viewer requests. Logging, trace export and signal handling are set up by
//! the shared `netbore-telemetry` crate; this module makes the span each proxied
//! request runs in and hands its W3C trace context to the agent.

use netbore_protocol::{Header, RequestHead};
use netbore_telemetry::trace_context::{self, TRACEPARENT, TRACESTATE};

pub use netbore_telemetry::on_signal;

/// The span a viewer's request runs in, until its response ends. It continues the
/// viewer's `traceparent` (or starts a trace) rather than joining the connection span
/// around it. Its fields hold no secrets: the path without its query, no header values.
pub fn request_span(req: &http::Request<hyper::body::Incoming>, tunnel: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "proxy",
        otel.name = "edge proxy",
        otel.kind = "server",
        http.request.method = %req.method(),
        url.path = %req.uri().path(),
        netbore.tunnel = %tunnel,
        http.response.status_code = tracing::field::Empty,
    );
    let h = req.headers();
    trace_context::set_parent(&span, |name| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    span
}

/// Makes the request the agent receives carry `span`'s trace context, replacing what
/// the viewer sent; with trace export off the viewer's headers pass unchanged.
pub fn forward_trace_context(span: &tracing::Span, head: &mut RequestHead) {
    let ours = trace_context::headers_for(span);
    if ours.is_empty() {
        return;
    }
    head.headers
        .retain(|h| h.name != TRACEPARENT && h.name != TRACESTATE);
    head.headers
        .extend(ours.into_iter().map(|(k, v)| Header::new(k, v)));
}

/// The same for a request forwarded to the edge holding the tunnel: the holder's span
/// becomes a child of this edge's.
pub fn forward_trace_context_headers(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let ours = trace_context::headers_for(span);
    if ours.is_empty() {
        return;
    }
    headers.remove(TRACEPARENT);
    headers.remove(TRACESTATE);
    for (k, v) in ours {
        if let Ok(v) = http::HeaderValue::from_str(&v) {
            headers.insert(k, v);
        }
    }
}
