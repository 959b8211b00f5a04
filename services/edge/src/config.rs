//! Edge configuration: one typed struct, defaults that work on one machine.

use std::time::Duration;

use netbore_protocol::Limits;

/// How long an agent has to complete the handshake after its TCP connection opens.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default heartbeat interval announced to agents.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);

/// Default time to wait for the origin's response head, as a backstop to the agent's
/// own origin timeout.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(100);

/// Default grace period for in-flight requests during a drain.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);

/// Largest WebSocket message accepted from an agent: a batch of frames
/// (`netbore_mux::MAX_BATCH_BYTES`) plus one frame of the largest size.
pub const MAX_AGENT_MESSAGE: usize = 1024 * 1024;

/// The edge's settings.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Identifies this edge to agents and in logs.
    pub edge_id: String,
    /// Tunnels are served at `NAME.<domain>`.
    pub domain: String,
    /// Scheme viewers use to reach the public listener (for `X-Forwarded-Proto`).
    pub public_scheme: String,
    /// Heartbeat interval announced to agents.
    pub heartbeat_interval: Duration,
    /// Limits announced to agents.
    pub limits: Limits,
    /// Time to wait for the origin's response head.
    pub response_timeout: Duration,
    /// Grace period for open requests during a drain.
    pub drain_grace: Duration,
}

impl Default for EdgeConfig {
    fn default() -> EdgeConfig {
        EdgeConfig {
            edge_id: "edge-1".into(),
            domain: "localhost".into(),
            public_scheme: "http".into(),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            limits: Limits::default(),
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            drain_grace: DEFAULT_DRAIN_GRACE,
        }
    }
}
