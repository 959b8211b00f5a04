//! The agent's Prometheus metrics, served at `/metrics` on `--admin-addr` next to the
//! probes ([`netbore_telemetry::admin`]). One struct of typed families in a
//! `prometheus-client` registry; handles taken once, so an increment is one atomic add.
//! Every label set is a fixed list (no per-request labels).

use netbore_telemetry::prom::{self, Format, Registry, labelled, single};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Kinds of origin failure, in the order of [`AgentMetrics::origin_errors`].
pub const ORIGIN_ERROR_KINDS: [&str; 3] = ["unreachable", "timeout", "error"];

/// `class`: a status class, `1xx` to `5xx`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

/// `kind`: one of [`ORIGIN_ERROR_KINDS`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// What the agent counts.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    /// Links to edges up now (summed over every tunnel of the process).
    pub links_up: Gauge,
    /// Spare link slots waiting because fewer distinct edges exist than `--connections`
    /// asks; not failures.
    pub spare_links_waiting: Gauge,
    /// Links established after the slot's first one (after a loss or a go-away).
    pub reconnects: Counter,
    /// Attempts to get a link that failed (control or every candidate edge).
    pub connect_failures: Counter,
    /// Streams taken from edges and forwarded to the origin.
    pub streams: Counter,
    /// Streams being forwarded now.
    pub streams_in_flight: Gauge,
    /// Streams refused because the agent is shutting down.
    pub streams_refused: Counter,
    /// Origin responses by status class 1xx..5xx.
    pub responses: [Counter; 5],
    /// Streams that failed at the origin, by [`ORIGIN_ERROR_KINDS`].
    pub origin_errors: [Counter; 3],
    /// 1 when the last origin probe succeeded (set from `origin` at each scrape; 0
    /// before the first probe).
    origin_healthy: Gauge,
    /// The last origin probe: its result and a sentence saying what happened (`None`
    /// before the first). `/readyz` answers 503 with the sentence while unhealthy.
    pub origin: parking_lot::Mutex<Option<(netbore_protocol::OriginState, String)>>,
}

impl Default for AgentMetrics {
    fn default() -> AgentMetrics {
        let mut r = prom::new_registry("agent", env!("CARGO_PKG_VERSION"));
        AgentMetrics {
            links_up: single(&mut r, "netbore_agent_links_up", "Links to edges up now."),
            spare_links_waiting: single(
                &mut r,
                "netbore_agent_spare_links_waiting",
                "Spare links not made because fewer distinct edges exist than --connections asks (not a failure; they retry slowly).",
            ),
            reconnects: single(
                &mut r,
                "netbore_agent_reconnects",
                "Links established again after a link was lost or its edge went away.",
            ),
            connect_failures: single(
                &mut r,
                "netbore_agent_connect_failures",
                "Attempts to get a link that failed (control unreachable or refusing, or no candidate edge took the link).",
            ),
            streams: single(
                &mut r,
                "netbore_agent_streams",
                "Streams (viewer requests) taken from edges and forwarded to the origin.",
            ),
            streams_in_flight: single(
                &mut r,
                "netbore_agent_streams_in_flight",
                "Streams being forwarded now.",
            ),
            streams_refused: single(
                &mut r,
                "netbore_agent_streams_refused",
                "Streams refused because the agent was shutting down.",
            ),
            responses: labelled(
                &mut r,
                "netbore_agent_origin_responses",
                "Response heads from the origin, by status class.",
                ["1xx", "2xx", "3xx", "4xx", "5xx"],
                |class| ClassLabel { class },
            ),
            origin_errors: labelled(
                &mut r,
                "netbore_agent_origin_errors",
                "Streams that failed at the origin: unreachable (connect failed), timeout (no response head in time), error (anything else).",
                ORIGIN_ERROR_KINDS,
                |kind| KindLabel { kind },
            ),
            origin_healthy: single(
                &mut r,
                "netbore_agent_origin_healthy",
                "1 when the last probe of the origin (--health-path) succeeded, else 0 (also before the first probe).",
            ),
            origin: parking_lot::Mutex::new(None),
            registry: r,
        }
    }
}

/// A kind of origin failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginErrorKind {
    /// Connecting failed.
    Unreachable,
    /// No response head in time.
    Timeout,
    /// Anything else: a bad response, a broken body, a failed upgrade.
    Error,
}

impl AgentMetrics {
    /// Counts an origin failure.
    pub fn origin_error(&self, kind: OriginErrorKind) {
        let i = match kind {
            OriginErrorKind::Unreachable => 0,
            OriginErrorKind::Timeout => 1,
            OriginErrorKind::Error => 2,
        };
        self.origin_errors[i].inc();
    }

    /// Counts a response head from the origin.
    pub fn response(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.responses[class].inc();
    }

    /// The page served at `/metrics`, in `format`.
    pub fn render(&self, format: Format) -> String {
        let healthy = self
            .origin
            .lock()
            .as_ref()
            .is_some_and(|(s, _)| s.is_healthy());
        self.origin_healthy.set(i64::from(healthy));
        prom::encode(&self.registry, format)
    }
}
