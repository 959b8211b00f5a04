//! The agent's Prometheus metrics, served at `/metrics` on `--admin-addr` next to the
//! probes. Plain atomics; every label set is a fixed list (no per-request labels).

use std::sync::atomic::{AtomicU64, Ordering};

use netbore_telemetry::prom::Text;

/// Kinds of origin failure, in the order of [`AgentMetrics::origin_errors`].
pub const ORIGIN_ERROR_KINDS: [&str; 3] = ["unreachable", "timeout", "error"];

/// What the agent counts.
#[derive(Default, Debug)]
pub struct AgentMetrics {
    /// Links to edges up now (summed over every tunnel of the process).
    pub links_up: AtomicU64,
    /// Spare link slots waiting because fewer distinct edges exist than `--connections`
    /// asks; not failures.
    pub spare_links_waiting: AtomicU64,
    /// Links established after the slot's first one (after a loss or a go-away).
    pub reconnects: AtomicU64,
    /// Attempts to get a link that failed (control or every candidate edge).
    pub connect_failures: AtomicU64,
    /// Streams taken from edges and forwarded to the origin.
    pub streams: AtomicU64,
    /// Streams being forwarded now.
    pub streams_in_flight: AtomicU64,
    /// Streams refused because the agent is shutting down.
    pub streams_refused: AtomicU64,
    /// Origin responses by status class 1xx..5xx.
    pub responses: [AtomicU64; 5],
    /// Streams that failed at the origin, by [`ORIGIN_ERROR_KINDS`].
    pub origin_errors: [AtomicU64; 3],
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
        self.origin_errors[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a response head from the origin.
    pub fn response(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    /// The page served at `/metrics`.
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut t = Text::new();
        t.single(
            "netbore_agent_links_up",
            "gauge",
            "Links to edges up now.",
            get(&self.links_up),
        );
        t.single(
            "netbore_agent_spare_links_waiting",
            "gauge",
            "Spare links not made because fewer distinct edges exist than --connections asks (not a failure; they retry slowly).",
            get(&self.spare_links_waiting),
        );
        t.single(
            "netbore_agent_reconnects_total",
            "counter",
            "Links established again after a link was lost or its edge went away.",
            get(&self.reconnects),
        );
        t.single(
            "netbore_agent_connect_failures_total",
            "counter",
            "Attempts to get a link that failed (control unreachable or refusing, or no candidate edge took the link).",
            get(&self.connect_failures),
        );
        t.single(
            "netbore_agent_streams_total",
            "counter",
            "Streams (viewer requests) taken from edges and forwarded to the origin.",
            get(&self.streams),
        );
        t.single(
            "netbore_agent_streams_in_flight",
            "gauge",
            "Streams being forwarded now.",
            get(&self.streams_in_flight),
        );
        t.single(
            "netbore_agent_streams_refused_total",
            "counter",
            "Streams refused because the agent was shutting down.",
            get(&self.streams_refused),
        );
        t.family(
            "netbore_agent_origin_responses_total",
            "counter",
            "Response heads from the origin, by status class.",
        );
        for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            t.sample(
                "netbore_agent_origin_responses_total",
                &[("class", class)],
                get(&self.responses[i]),
            );
        }
        t.family(
            "netbore_agent_origin_errors_total",
            "counter",
            "Streams that failed at the origin: unreachable (connect failed), timeout (no response head in time), error (anything else).",
        );
        for (i, kind) in ORIGIN_ERROR_KINDS.iter().enumerate() {
            t.sample(
                "netbore_agent_origin_errors_total",
                &[("kind", kind)],
                get(&self.origin_errors[i]),
            );
        }
        t.build_info("agent", env!("CARGO_PKG_VERSION"));
        t.finish()
    }
}
