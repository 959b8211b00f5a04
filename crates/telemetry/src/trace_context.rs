//! W3C trace context (`traceparent`, `tracestate`) in and out of HTTP heads.
//!
//! A component that receives a request makes a span, gives it the caller's context as
//! parent with [`set_parent`] (or makes it the root of a new trace when the request
//! carries none), and forwards [`headers_for`] that span so the next hop's span is its
//! child. With trace export off the span has no context: callers then forward the
//! incoming headers untouched, so a Netbore hop without a collector is transparent.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header naming the caller's trace and span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header carrying vendor trace state along the trace.
pub const TRACESTATE: &str = "tracestate";

struct Pair {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Extractor for Pair {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => self.traceparent.as_deref(),
            TRACESTATE => self.tracestate.as_deref(),
            _ => None,
        }
    }
    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

#[derive(Default)]
struct Out(Vec<(&'static str, String)>);

impl Injector for Out {
    fn set(&mut self, key: &str, value: String) {
        let key = match key {
            TRACEPARENT => TRACEPARENT,
            TRACESTATE => TRACESTATE,
            _ => return,
        };
        self.0.push((key, value));
    }
}

/// Makes `span` continue the trace named by the `traceparent` (and `tracestate`)
/// that `header` returns, or start a new trace when there is none or it is malformed
/// (instead of joining whatever span is current). `header` is given lower-case names.
/// Call it before the span is first entered.
pub fn set_parent(span: &tracing::Span, header: impl Fn(&str) -> Option<String>) {
    let carrier = Pair {
        traceparent: header(TRACEPARENT),
        tracestate: header(TRACESTATE),
    };
    // From an empty context, not the current one: `extract` falls back to its base
    // when the headers are absent, and the current context is the connection's span.
    let cx = TraceContextPropagator::new()
        .extract_with_context(&opentelemetry::Context::new(), &carrier);
    // An empty context makes the span a root: a viewer's request is its own trace, not
    // part of the long-lived connection span around it.
    let _ = span.set_parent(cx);
}

/// The `traceparent` (and `tracestate`, if any) naming `span`, to send to the next
/// hop; empty when `span` has no trace context (trace export is off).
pub fn headers_for(span: &tracing::Span) -> Vec<(&'static str, String)> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut out = Out::default();
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.0
}

/// The trace id in a `traceparent` value (32 hex digits), if it is well formed.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
    (trace.len() == 32 && span.len() == 16 && trace.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_exporter_nothing_is_forwarded_and_nothing_breaks() {
        let span = tracing::info_span!("x");
        set_parent(&span, |_| {
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into())
        });
        assert!(headers_for(&span).is_empty());
    }

    #[test]
    fn trace_ids_are_read_from_well_formed_values_only() {
        assert_eq!(
            trace_id_of("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(trace_id_of("00-abc-def-01"), None);
    }
}
