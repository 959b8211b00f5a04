//! The edge's Prometheus metrics, served as text on the admin port at `/metrics`.
//!
//! Counters are plain atomics updated on the request path (no locks). Every label set is
//! bounded: status classes, the edge's own error codes, handshake refusal codes. Per
//! tunnel figures are deliberately absent (their number is unbounded).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::Edge;

/// Upper bounds (seconds) of the request duration histogram, to the response head.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The edge's own error codes, in the order of the `errors` counters.
pub const ERROR_CODES: [&str; 41] = [
    "tunnel_not_found",
    "tunnel_offline",
    "origin_unreachable",
    "origin_timeout",
    "origin_error",
    "bad_host",
    "tunnel_busy",
    "tunnel_lost",
    "missing_host",
    "duplicate_host",
    "ambiguous_length",
    "bad_transfer_encoding",
    "host_mismatch",
    "url_too_long",
    "body_too_large",
    "body_timeout",
    "tunnel_overloaded",
    "response_head_too_large",
    "client_overloaded",
    "bad_chunked_encoding",
    "head_too_large",
    "registry_unavailable",
    "internal_forbidden",
    "internal_bad_request",
    // Access policies (docs/access.md).
    "access_token_missing",
    "access_token_invalid",
    "access_token_expired",
    "access_token_not_yet_valid",
    "access_token_wrong_audience",
    "access_token_wrong_issuer",
    "access_claim_missing",
    "access_claim_mismatch",
    "access_session_invalid",
    "access_basic_required",
    "access_basic_invalid",
    "ip_denied",
    "ip_not_allowed",
    "cors_origin_denied",
    "authority_mismatch",
    "client_busy",
    "tunnel_disabled",
];

/// Handshake outcomes, in the order of the `handshakes` counters.
pub const HANDSHAKE_RESULTS: [&str; 6] = [
    "accepted",
    "malformed_hello",
    "unsupported_version",
    "invalid_token",
    "tunnel_mismatch",
    "draining",
];

/// All counters.
pub struct Metrics {
    /// Responses by status class 1xx..5xx (index 0..=4).
    pub responses: [AtomicU64; 5],
    /// Edge-generated errors by code (see [`ERROR_CODES`]).
    pub errors: [AtomicU64; ERROR_CODES.len()],
    /// Duration histogram buckets (cumulative at render time) and the +Inf count.
    durations: [AtomicU64; DURATION_BUCKETS.len() + 1],
    /// Sum of durations in microseconds.
    duration_sum_us: AtomicU64,
    /// Agent handshakes by result (see [`HANDSHAKE_RESULTS`]); others count as `other`.
    pub handshakes: [AtomicU64; HANDSHAKE_RESULTS.len() + 1],
    /// Agent connections closed.
    pub agent_disconnects: AtomicU64,
    /// Viewer requests forwarded to another edge.
    pub forwarded: AtomicU64,
    /// Registry calls that failed (lease refreshes and lookups).
    pub registry_errors: AtomicU64,
    /// Connections closed at accept: their address had too many open.
    pub connections_refused: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            responses: Default::default(),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            durations: Default::default(),
            duration_sum_us: AtomicU64::new(0),
            handshakes: Default::default(),
            agent_disconnects: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            registry_errors: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Records a response sent to a viewer.
    pub fn response(&self, status: u16, took: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let i = DURATION_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.durations[i].fetch_add(1, Ordering::Relaxed);
        self.duration_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Records an error the edge answered itself.
    pub fn error(&self, code: &str) {
        if let Some(i) = ERROR_CODES.iter().position(|c| *c == code) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a request forwarded to another edge.
    pub fn forwarded(&self) {
        self.forwarded.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a connection closed at accept for its address's cap.
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a failed registry call.
    pub fn registry_error(&self) {
        self.registry_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Records an agent handshake's result.
    pub fn handshake(&self, result: &str) {
        let i = HANDSHAKE_RESULTS
            .iter()
            .position(|c| *c == result)
            .unwrap_or(HANDSHAKE_RESULTS.len());
        self.handshakes[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Renders the Prometheus text exposition.
pub fn render(edge: &Edge) -> String {
    let m = edge.metrics();
    let (tunnels, conns, streams, bytes_in, bytes_out) = edge.routes().load();
    let mut s = String::with_capacity(4096);
    let g = |s: &mut String, name: &str, help: &str, v: u64| {
        let _ = write!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n");
    };
    g(
        &mut s,
        "netbore_edge_tunnels",
        "Tunnels with at least one agent connection on this edge.",
        tunnels,
    );
    g(
        &mut s,
        "netbore_edge_agent_connections",
        "Agent connections open on this edge.",
        conns,
    );
    g(
        &mut s,
        "netbore_edge_streams_in_flight",
        "Requests in flight through this edge's agent connections.",
        streams,
    );
    let (queued, queued_peak, head_bytes) = edge.routes().queue_load();
    g(
        &mut s,
        "netbore_edge_link_queued_bytes",
        "Bytes queued for agents, not yet written, over all agent connections.",
        queued,
    );
    g(
        &mut s,
        "netbore_edge_link_queued_bytes_peak",
        "The most bytes ever queued for one open agent connection.",
        queued_peak,
    );
    g(
        &mut s,
        "netbore_edge_link_head_bytes",
        "Bytes of request heads held by open streams, over all agent connections (at most MAX_LINK_HEAD_BYTES each).",
        head_bytes,
    );
    g(
        &mut s,
        "netbore_edge_draining",
        "1 while the edge drains for shutdown.",
        u64::from(edge.is_draining()),
    );
    let _ = write!(
        s,
        "# HELP netbore_edge_tunnel_bytes_total Payload bytes through agent connections since the edge started, closed ones included (to agents: out; from agents: in).\n# TYPE netbore_edge_tunnel_bytes_total counter\nnetbore_edge_tunnel_bytes_total{{direction=\"in\"}} {bytes_in}\nnetbore_edge_tunnel_bytes_total{{direction=\"out\"}} {bytes_out}\n"
    );
    let _ = writeln!(
        s,
        "# HELP netbore_edge_responses_total Responses to viewers by status class.\n# TYPE netbore_edge_responses_total counter"
    );
    for (i, c) in m.responses.iter().enumerate() {
        let _ = writeln!(
            s,
            "netbore_edge_responses_total{{class=\"{}xx\"}} {}",
            i + 1,
            c.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        s,
        "# HELP netbore_edge_errors_total Errors the edge answered itself, by netbore-error code.\n# TYPE netbore_edge_errors_total counter"
    );
    for (code, c) in ERROR_CODES.iter().zip(&m.errors) {
        let _ = writeln!(
            s,
            "netbore_edge_errors_total{{code=\"{code}\"}} {}",
            c.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        s,
        "# HELP netbore_edge_request_duration_seconds Time from request to response head.\n# TYPE netbore_edge_request_duration_seconds histogram"
    );
    let mut cum = 0;
    for (i, b) in DURATION_BUCKETS.iter().enumerate() {
        cum += m.durations[i].load(Ordering::Relaxed);
        let _ = writeln!(
            s,
            "netbore_edge_request_duration_seconds_bucket{{le=\"{b}\"}} {cum}"
        );
    }
    cum += m.durations[DURATION_BUCKETS.len()].load(Ordering::Relaxed);
    let _ = writeln!(
        s,
        "netbore_edge_request_duration_seconds_bucket{{le=\"+Inf\"}} {cum}"
    );
    let _ = writeln!(
        s,
        "netbore_edge_request_duration_seconds_sum {}\nnetbore_edge_request_duration_seconds_count {cum}",
        m.duration_sum_us.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(
        s,
        "# HELP netbore_edge_agent_handshakes_total Agent handshakes by result.\n# TYPE netbore_edge_agent_handshakes_total counter"
    );
    for (i, c) in m.handshakes.iter().enumerate() {
        let name = HANDSHAKE_RESULTS.get(i).copied().unwrap_or("other");
        let _ = writeln!(
            s,
            "netbore_edge_agent_handshakes_total{{result=\"{name}\"}} {}",
            c.load(Ordering::Relaxed)
        );
    }
    let _ = write!(
        s,
        "# HELP netbore_edge_agent_disconnects_total Agent connections closed.\n# TYPE netbore_edge_agent_disconnects_total counter\nnetbore_edge_agent_disconnects_total {}\n",
        m.agent_disconnects.load(Ordering::Relaxed)
    );
    let _ = write!(
        s,
        "# HELP netbore_edge_forwarded_total Viewer requests forwarded to the edge holding the tunnel.\n# TYPE netbore_edge_forwarded_total counter\nnetbore_edge_forwarded_total {}\n",
        m.forwarded.load(Ordering::Relaxed)
    );
    let _ = write!(
        s,
        "# HELP netbore_edge_registry_errors_total Registry (Redis) calls that failed.\n# TYPE netbore_edge_registry_errors_total counter\nnetbore_edge_registry_errors_total {}\n",
        m.registry_errors.load(Ordering::Relaxed)
    );
    let _ = write!(
        s,
        "# HELP netbore_edge_connections_refused_total Connections closed at accept because their address had --max-connections-per-address open.\n# TYPE netbore_edge_connections_refused_total counter\nnetbore_edge_connections_refused_total {}\n",
        m.connections_refused.load(Ordering::Relaxed)
    );
    let mut info = netbore_telemetry::prom::Text::new();
    info.build_info("edge", env!("CARGO_PKG_VERSION"));
    s.push_str(&info.finish());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_viewer_errors() {
        use crate::errors::ViewerError as V;
        let all = [
            V::TunnelNotFound,
            V::TunnelOffline,
            V::OriginUnreachable,
            V::OriginTimeout,
            V::OriginError,
            V::BadHost,
            V::TunnelBusy,
            V::TunnelLost,
            V::MissingHost,
            V::DuplicateHost,
            V::AmbiguousLength,
            V::BadTransferEncoding,
            V::HostMismatch,
            V::UrlTooLong,
            V::BodyTooLarge,
            V::BodyTimeout,
            V::TunnelOverloaded,
            V::AuthorityMismatch,
            V::ClientBusy,
            V::ResponseHeadTooLarge,
            V::ClientOverloaded,
            V::BadChunkedEncoding,
            V::TunnelDisabled,
        ];
        for v in all {
            assert!(
                ERROR_CODES.contains(&v.code()),
                "{} missing from ERROR_CODES",
                v.code()
            );
        }
        // The rest are codes of access policies, forwarding and oversized heads.
        assert_eq!(all.len() + 18, ERROR_CODES.len());
    }
}
