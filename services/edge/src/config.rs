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

/// Default total size of a request's head (request line and headers). Envoy allows
/// 60 KiB, nginx 4 × 8 KiB, Cloudflare about 32 KiB; 64 KiB keeps large cookies working.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;

/// Default most header fields in one request (Envoy's and hyper's default).
pub const DEFAULT_MAX_HEADERS: usize = 100;

/// Default longest request target (nginx's buffer is 8 KiB; Cloudflare 16 KiB).
pub const DEFAULT_MAX_URL_BYTES: usize = 8 * 1024;

/// Default largest request body, per request (Cloudflare's plans start at 100 MB; a
/// tunnel often carries uploads, so 1 GiB).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024 * 1024;

/// Default time a viewer has to send a request's head, and the longest an idle
/// keep-alive connection stays open (slowloris). nginx uses 60 s; 15 s is plenty.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);

/// Default longest pause between two pieces of a request body (slow bodies).
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default concurrent HTTP/2 streams per viewer connection (Envoy allows 100, nginx 128).
pub const DEFAULT_H2_MAX_STREAMS: u32 = 128;

/// Default in-flight requests per tunnel across its connections; beyond it viewers get
/// 429 `tunnel_overloaded`.
pub const DEFAULT_MAX_STREAMS_PER_TUNNEL: usize = 2000;

/// Default most open connections from one TCP peer address, per listener. nginx and
/// Envoy set none by default (nginx's `limit_conn` is opt-in; its documentation's
/// examples use 1–100 per address), and many viewers share an address behind NAT or a
/// corporate proxy: browsers open up to 6 HTTP/1.1 connections per host, so 256 leaves
/// room for about 40 browsers behind one address while one client can no longer take
/// the edge's file descriptors (the attack held 20,106). Behind a load balancer every
/// connection comes from the balancer's addresses: raise it there (or set 0 for none).
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 256;

pub use netbore_tokens::access::Cidr;

/// Default lease refresh interval: the same as the agent heartbeat, so a restarted Redis
/// holds every tunnel again within one heartbeat.
pub const DEFAULT_REGISTRY_REFRESH: Duration = Duration::from_secs(5);

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
    /// Time between turning not ready and stopping to accept, for load balancers to
    /// notice (0 when a Kubernetes preStop sleep does this).
    pub drain_delay: Duration,
    /// How often this edge refreshes its leases in the registry (a lease lives
    /// [`crate::forward::LEASE_REFRESHES`] intervals); also the most time a restarted,
    /// empty Redis misses a tunnel.
    pub registry_refresh: Duration,
    /// Largest request head in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Most header fields per request (431 beyond).
    pub max_headers: usize,
    /// Longest request target in bytes (414 beyond).
    pub max_url_bytes: usize,
    /// Largest request body in bytes (413 beyond).
    pub max_body_bytes: u64,
    /// Time to receive a request head; also the keep-alive idle limit.
    pub header_read_timeout: Duration,
    /// Longest pause inside a request body (408 beyond).
    pub body_idle_timeout: Duration,
    /// HTTP/2 concurrent streams per viewer connection.
    pub h2_max_streams: u32,
    /// In-flight requests per tunnel (429 beyond).
    pub max_streams_per_tunnel: usize,
    /// Share of a tunnel's request slots one client address may hold, in percent
    /// (429 `client_busy` beyond; see [`crate::fair`]).
    pub client_slot_share: u8,
    /// A write to an agent that makes no progress for this long closes its connection
    /// (the agent stopped reading).
    pub agent_write_timeout: Duration,
    /// Most open connections from one TCP peer address on the public port (and,
    /// separately, on the agent port); further ones are closed at accept.
    pub max_connections_per_address: usize,
    /// Bytes of refused request heads (429 `client_overloaded` / `client_busy`) one
    /// client address may be charged per second, 4 seconds' worth ahead, before its
    /// connections are read at that pace (see [`crate::pace`]); 0 turns pacing off.
    pub refused_bytes_per_second: u64,
    /// Peers whose `X-Forwarded-For` / `X-Forwarded-Proto` / `Forwarded` are believed
    /// (the load balancer); everyone else's are replaced.
    pub trusted_proxies: Vec<Cidr>,
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
            drain_delay: Duration::ZERO,
            registry_refresh: DEFAULT_REGISTRY_REFRESH,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_url_bytes: DEFAULT_MAX_URL_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            h2_max_streams: DEFAULT_H2_MAX_STREAMS,
            max_streams_per_tunnel: DEFAULT_MAX_STREAMS_PER_TUNNEL,
            client_slot_share: crate::fair::DEFAULT_CLIENT_SLOT_SHARE,
            trusted_proxies: Vec::new(),
            agent_write_timeout: netbore_mux::DEFAULT_WRITE_STALL_TIMEOUT,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            refused_bytes_per_second: crate::pace::DEFAULT_RATE,
        }
    }
}
