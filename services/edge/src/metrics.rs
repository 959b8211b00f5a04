//! The edge's Prometheus metrics, served on the admin port at `/metrics`
//! ([`netbore_telemetry::admin`]).
//!
//! One struct of typed families in a `prometheus-client` registry. Counters on the
//! request path are handles taken once at start (one atomic add per increment, no
//! lock); gauges about open connections are read from the routes at each scrape. Every
//! label set is bounded: status classes, the edge's own error codes, handshake refusal
//! codes. Per tunnel figures are deliberately absent (their number is unbounded).

use std::time::Duration;

use netbore_telemetry::prom::{
    self, DurationHistogram, Format, Registry, SampledCounter, labelled, single,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

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

/// `class`: a status class, `1xx` to `5xx`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

/// `code`: one of [`ERROR_CODES`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

/// `result`: one of [`HANDSHAKE_RESULTS`] or `other`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// `direction`: `in` (from agents) or `out` (to agents).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// The status classes, in the order of the `responses` handles.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Every family the edge serves, and the handles the request path increments.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    responses: [Counter; 5],
    errors: [Counter; ERROR_CODES.len()],
    durations: DurationHistogram,
    /// By [`HANDSHAKE_RESULTS`], then `other`.
    handshakes: [Counter; HANDSHAKE_RESULTS.len() + 1],
    agent_disconnects: Counter,
    forwarded: Counter,
    registry_errors: Counter,
    connections_refused: Counter,
    paced_reads: Counter,
    // Read from the routes at each scrape.
    tunnels: Gauge,
    agent_connections: Gauge,
    streams_in_flight: Gauge,
    link_queued_bytes: Gauge,
    link_queued_bytes_peak: Gauge,
    link_head_bytes: Gauge,
    draining: Gauge,
    /// `in`, `out`.
    tunnel_bytes: [SampledCounter; 2],
    access_log_dropped: SampledCounter,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut r = prom::new_registry("edge", env!("CARGO_PKG_VERSION"));
        let tunnels = single(
            &mut r,
            "netbore_edge_tunnels",
            "Tunnels with at least one agent connection on this edge.",
        );
        let agent_connections = single(
            &mut r,
            "netbore_edge_agent_connections",
            "Agent connections open on this edge.",
        );
        let streams_in_flight = single(
            &mut r,
            "netbore_edge_streams_in_flight",
            "Requests in flight through this edge's agent connections.",
        );
        let link_queued_bytes = single(
            &mut r,
            "netbore_edge_link_queued_bytes",
            "Bytes queued for agents, not yet written, over all agent connections.",
        );
        let link_queued_bytes_peak = single(
            &mut r,
            "netbore_edge_link_queued_bytes_peak",
            "The most bytes ever queued for one open agent connection.",
        );
        let link_head_bytes = single(
            &mut r,
            "netbore_edge_link_head_bytes",
            "Bytes of request heads held by open streams, over all agent connections (at most MAX_LINK_HEAD_BYTES each).",
        );
        let draining = single(
            &mut r,
            "netbore_edge_draining",
            "1 while the edge drains for shutdown.",
        );
        let tunnel_bytes = labelled(
            &mut r,
            "netbore_edge_tunnel_bytes",
            "Payload bytes through agent connections since the edge started, closed ones included (to agents: out; from agents: in).",
            ["in", "out"],
            |direction| DirectionLabel { direction },
        );
        let responses = labelled(
            &mut r,
            "netbore_edge_responses",
            "Responses to viewers by status class.",
            CLASSES,
            |class| ClassLabel { class },
        );
        let errors = labelled(
            &mut r,
            "netbore_edge_errors",
            "Errors the edge answered itself, by netbore-error code.",
            ERROR_CODES,
            |code| CodeLabel { code },
        );
        let durations = DurationHistogram::new(&DURATION_BUCKETS);
        prom::register(
            &mut r,
            "netbore_edge_request_duration_seconds",
            "Time from request to response head.",
            durations.clone(),
        );
        let mut results = [""; HANDSHAKE_RESULTS.len() + 1];
        results[..HANDSHAKE_RESULTS.len()].copy_from_slice(&HANDSHAKE_RESULTS);
        results[HANDSHAKE_RESULTS.len()] = "other";
        let handshakes = labelled(
            &mut r,
            "netbore_edge_agent_handshakes",
            "Agent handshakes by result.",
            results,
            |result| ResultLabel { result },
        );
        let agent_disconnects = single(
            &mut r,
            "netbore_edge_agent_disconnects",
            "Agent connections closed.",
        );
        let forwarded = single(
            &mut r,
            "netbore_edge_forwarded",
            "Viewer requests forwarded to the edge holding the tunnel.",
        );
        let registry_errors = single(
            &mut r,
            "netbore_edge_registry_errors",
            "Registry (Redis) calls that failed.",
        );
        let connections_refused = single(
            &mut r,
            "netbore_edge_connections_refused",
            "Connections closed at accept because their address had --max-connections-per-address open.",
        );
        let paced_reads = single(
            &mut r,
            "netbore_edge_paced_reads",
            "Times a viewer connection's reading was held because its client address kept being refused for overload (--refused-bytes-per-second).",
        );
        let access_log_dropped = single(
            &mut r,
            "netbore_edge_access_log_dropped",
            "Access log lines dropped because the log writer was behind (never waited for on the request path).",
        );
        Metrics {
            access_log_dropped,
            registry: r,
            responses,
            errors,
            durations,
            handshakes,
            agent_disconnects,
            forwarded,
            registry_errors,
            connections_refused,
            paced_reads,
            tunnels,
            agent_connections,
            streams_in_flight,
            link_queued_bytes,
            link_queued_bytes_peak,
            link_head_bytes,
            draining,
            tunnel_bytes,
        }
    }
}

impl Metrics {
    /// Records a response sent to a viewer.
    pub fn response(&self, status: u16, took: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.responses[class].inc();
        self.durations.observe(took);
    }

    /// Records an error the edge answered itself.
    pub fn error(&self, code: &str) {
        if let Some(i) = ERROR_CODES.iter().position(|c| *c == code) {
            self.errors[i].inc();
        }
    }

    /// Records a request forwarded to another edge.
    pub fn forwarded(&self) {
        self.forwarded.inc();
    }

    /// Records a connection closed at accept for its address's cap.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// The count of viewer connections' reads held by [`crate::pace`].
    pub fn paced_reads(&self) -> Counter {
        self.paced_reads.clone()
    }

    /// Records a failed registry call.
    pub fn registry_error(&self) {
        self.registry_errors.inc();
    }

    /// Records a closed agent connection.
    pub fn agent_disconnect(&self) {
        self.agent_disconnects.inc();
    }

    /// Records an agent handshake's result.
    pub fn handshake(&self, result: &str) {
        let i = HANDSHAKE_RESULTS
            .iter()
            .position(|c| *c == result)
            .unwrap_or(HANDSHAKE_RESULTS.len());
        self.handshakes[i].inc();
    }
}

/// The `/metrics` page in `format`, gauges read from the routes now.
pub fn render(edge: &Edge, format: Format) -> String {
    let m = edge.metrics();
    let (tunnels, conns, streams, bytes_in, bytes_out) = edge.routes().load();
    let (queued, queued_peak, head_bytes) = edge.routes().queue_load();
    let set = |g: &Gauge, v: u64| {
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
    };
    set(&m.tunnels, tunnels);
    set(&m.agent_connections, conns);
    set(&m.streams_in_flight, streams);
    set(&m.link_queued_bytes, queued);
    set(&m.link_queued_bytes_peak, queued_peak);
    set(&m.link_head_bytes, head_bytes);
    set(&m.draining, u64::from(edge.is_draining()));
    m.tunnel_bytes[0].observe(bytes_in);
    m.tunnel_bytes[1].observe(bytes_out);
    m.access_log_dropped
        .observe(netbore_telemetry::log_queue::dropped());
    prom::encode(&m.registry, format)
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
            V::HeadTooLarge,
            V::RegistryUnavailable,
        ];
        for v in all {
            assert!(
                ERROR_CODES.contains(&v.code()),
                "{} missing from ERROR_CODES",
                v.code()
            );
        }
        // The rest are codes of access policies and of the internal listener.
        assert_eq!(all.len() + 16, ERROR_CODES.len());
    }
}
