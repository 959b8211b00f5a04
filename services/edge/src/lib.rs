//! The Netbore edge: the public face of every tunnel.
//!
//! An edge runs two listeners. Agents connect to the *agent listener* over WebSocket,
//! prove with an ephemeral token which tunnel they serve ([`agents`]), and then carry
//! that tunnel's streams on a [`netbore_mux::Mux`]. Viewers connect to the *public
//! listener* with HTTP/1.1 or HTTP/2; each request is routed by its `Host` to a live
//! agent connection and proxied as one stream, bodies and upgrades streamed both ways
//! ([`proxy`]). The edge holds no signing keys and no state that matters beyond its
//! live connections.

pub mod access;
pub mod admin;
pub mod agents;
pub mod auth;
pub mod budget;
pub mod config;
pub mod conns;
pub mod control_link;
pub mod errors;
pub mod fair;
pub mod forward;
pub mod gate;
pub mod metrics;
pub mod pace;
pub mod phases;
pub mod proxy;
pub mod routes;
pub mod sniff;
pub mod tcp;
pub mod telemetry;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest a link of a revoked tunnel credential stays open after its go-away, for the
/// requests it is serving to finish (revocation must close it within 5 s on every
/// edge, control's relay included).
pub const CREDENTIAL_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

pub use auth::{AgentAuth, AgentGrant, AuthError, StaticKeyAuth};
pub use config::EdgeConfig;
pub use routes::Routes;

/// One edge: configuration, the live route table and the agent authenticator.
#[derive(Clone)]
pub struct Edge {
    inner: Arc<Inner>,
}

struct Inner {
    config: EdgeConfig,
    routes: Routes,
    /// Requests in flight per tunnel and client address (fair shares of slots).
    slots: Arc<fair::ClientSlots>,
    auth: Arc<dyn AgentAuth>,
    draining: AtomicBool,
    /// Set on SIGTERM: the drain is for good ([`Edge::undrain`] does nothing).
    stopping: AtomicBool,
    tls: Option<tls::Tls>,
    metrics: metrics::Metrics,
    /// Tracks per-connection tasks so shutdown can wait for them.
    tracker: TaskTracker,
    /// The registry and internal forwarding, when edges share one.
    cluster: std::sync::OnceLock<Arc<forward::Cluster>>,
    /// Revocations, per-token link caps and session seeds.
    gate: Arc<gate::Gate>,
    /// Request-head bytes in flight per client.
    head_budget: Arc<budget::ClientBudget>,
    /// Pacing of clients that keep being refused for overload.
    pacer: Arc<pace::Pacer>,
    /// Open connections per peer address, on the public and the agent listener.
    public_conns: Arc<conns::PerAddress>,
    agent_conns: Arc<conns::PerAddress>,
    /// Link events waiting for control's acknowledgement.
    link_events: control_link::LinkEvents,
    /// Listeners of the TCP port range ([`tcp`]), served by [`run_with_internal`].
    tcp_listeners: parking_lot::Mutex<Vec<tokio::net::TcpListener>>,
}

impl Edge {
    /// Builds an edge that verifies agents with `auth`.
    pub fn new(config: EdgeConfig, auth: Arc<dyn AgentAuth>) -> Edge {
        Edge::with_tls(config, auth, None)
    }

    /// Builds an edge that serves both listeners over TLS when `tls` is given.
    pub fn with_tls(config: EdgeConfig, auth: Arc<dyn AgentAuth>, tls: Option<tls::Tls>) -> Edge {
        Edge {
            inner: Arc::new(Inner {
                routes: Routes::default(),
                slots: Arc::default(),
                auth,
                draining: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                tls,
                metrics: metrics::Metrics::default(),
                tracker: TaskTracker::new(),
                cluster: std::sync::OnceLock::new(),
                gate: Arc::default(),
                head_budget: Default::default(),
                pacer: Arc::new(pace::Pacer::new(
                    config.refused_bytes_per_second,
                    config.refused_bytes_per_second.saturating_mul(4),
                )),
                public_conns: Arc::new(conns::PerAddress::new(config.max_connections_per_address)),
                agent_conns: Arc::new(conns::PerAddress::new(config.max_connections_per_address)),
                link_events: Default::default(),
                tcp_listeners: Default::default(),
                config,
            }),
        }
    }

    /// Joins a cluster of edges (a shared registry and internal forwarding). Call once,
    /// before serving; later calls are ignored.
    pub fn attach_cluster(&self, cluster: Arc<forward::Cluster>) {
        let _ = self.inner.cluster.set(cluster);
    }

    /// The cluster, when the edge is part of one.
    pub fn cluster(&self) -> Option<&Arc<forward::Cluster>> {
        self.inner.cluster.get()
    }

    /// The configuration.
    pub fn config(&self) -> &EdgeConfig {
        &self.inner.config
    }

    /// Link opened/closed events waiting for control.
    pub fn link_events(&self) -> &control_link::LinkEvents {
        &self.inner.link_events
    }

    /// The live route table.
    pub fn routes(&self) -> &Routes {
        &self.inner.routes
    }

    /// Requests in flight per tunnel and client address.
    pub fn client_slots(&self) -> &Arc<fair::ClientSlots> {
        &self.inner.slots
    }

    pub(crate) fn auth(&self) -> &Arc<dyn AgentAuth> {
        &self.inner.auth
    }

    /// The edge's counters.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.inner.metrics
    }

    pub(crate) fn tls(&self) -> Option<&tls::Tls> {
        self.inner.tls.as_ref()
    }

    pub(crate) fn head_budget(&self) -> &Arc<budget::ClientBudget> {
        &self.inner.head_budget
    }

    /// Pacing of clients that keep being refused for overload ([`pace`]).
    pub fn pacer(&self) -> &Arc<pace::Pacer> {
        &self.inner.pacer
    }

    /// Open connections per address on the public listener.
    pub fn public_conns(&self) -> &Arc<conns::PerAddress> {
        &self.inner.public_conns
    }

    /// Open connections per peer address on the agent listener.
    pub fn agent_conns(&self) -> &Arc<conns::PerAddress> {
        &self.inner.agent_conns
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }

    /// True once [`Edge::drain`] started.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Starts a graceful drain: new agents are refused and every connected agent is
    /// told to go away (so it moves to another edge); open streams continue.
    pub fn drain(&self) {
        self.mark_draining();
        self.inner.routes.go_away_all("edge is shutting down");
    }

    /// Reports not ready and refuses new agents, while still serving viewers through
    /// the agents already connected (the first step of a drain).
    pub fn mark_draining(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    /// Undoes a drain asked by an operator: ready again, agents accepted, leases
    /// refreshed. Agents that moved away stay where they are. Returns false (and does
    /// nothing) once the edge is shutting down.
    pub fn undrain(&self) -> bool {
        if self.inner.stopping.load(Ordering::Acquire) {
            return false;
        }
        self.inner.draining.store(false, Ordering::Release);
        // A SIGTERM that came meanwhile wins.
        if self.inner.stopping.load(Ordering::Acquire) {
            self.inner.draining.store(true, Ordering::Release);
            return false;
        }
        true
    }

    /// Waits until every proxied request and agent connection task has finished.
    pub async fn wait_idle(&self) {
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }

    /// Disconnects every agent connection serving `tunnel_id` (the tunnel was deleted).
    pub fn disconnect_tunnel(&self, tunnel_id: &str) -> usize {
        self.inner.routes.disconnect_tunnel(tunnel_id)
    }

    /// The tunnel was deleted: refuse its tokens until `until` (Unix seconds) and
    /// disconnect its agents. Returns how many connections were closed.
    pub fn revoke_tunnel(&self, tunnel_id: &str, until: u64) -> usize {
        // Revoke first, so an agent reconnecting as its link closes is refused.
        self.inner.gate.revoke(tunnel_id, until);
        self.inner.routes.forget_tunnel(tunnel_id);
        self.inner.routes.disconnect_tunnel(tunnel_id)
    }

    /// The tunnel was disabled by its owner (or enabled again): while disabled its tokens
    /// are refused, its links closed and viewers of `name` get `tunnel_disabled`.
    /// Returns how many connections were closed.
    pub fn set_tunnel_disabled(&self, tunnel_id: &str, name: &str, disabled: bool) -> usize {
        // Refuse first, so an agent reconnecting as its link closes is refused.
        self.inner.gate.set_disabled(tunnel_id, name, disabled);
        if disabled {
            self.inner.routes.disconnect_tunnel(tunnel_id)
        } else {
            0
        }
    }

    /// A tunnel credential was revoked: refuse tokens issued for it until `until` (Unix
    /// seconds) and close the links that used it. Each is first told to go away (so
    /// requests stop going to it while the tunnel's other links take them), then closed
    /// once its open streams finish or [`CREDENTIAL_CLOSE_GRACE`] passes, whichever is
    /// first: rotating a credential under load loses no request. Returns how many links.
    pub fn revoke_credential(&self, credential_id: &str, until: u64) -> usize {
        // Refuse first, so an agent reconnecting as its link closes is refused.
        self.inner.gate.revoke_credential(credential_id, until);
        let hit = self.inner.routes.by_credential(credential_id);
        for r in &hit {
            r.mux
                .go_away("credential_revoked: the tunnel credential was revoked");
            let mux = r.mux.clone();
            self.inner.tracker.spawn(async move {
                let _ = tokio::time::timeout(CREDENTIAL_CLOSE_GRACE, mux.idle()).await;
                mux.close("credential_revoked: the tunnel credential was revoked");
            });
        }
        hit.len()
    }

    /// Gives the edge the listeners of its TCP port range (see [`tcp::bind_range`]);
    /// [`run_with_internal`] serves them. Call before it.
    pub fn add_tcp_listeners(&self, listeners: Vec<tokio::net::TcpListener>) {
        self.inner.tcp_listeners.lock().extend(listeners);
    }

    /// Revocations, per-token link caps and session seeds.
    pub fn gate(&self) -> &Arc<gate::Gate> {
        &self.inner.gate
    }
}

/// Accepts the next connection, or `None` once `stop` fires. Accept errors (out of
/// file descriptors, say) are logged and retried after a short pause rather than spun
/// on.
pub(crate) async fn accept(
    listener: &tokio::net::TcpListener,
    stop: &CancellationToken,
    what: &'static str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => return None,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                return Some((tcp, peer));
            }
            Err(e) => {
                tracing::warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Serves one HTTP connection (HTTP/1.1 with upgrades, or HTTP/2) with `svc` until it
/// ends, or until `stop` fires, after which the current requests finish and the
/// connection closes. `what` names the listener in the log line of a failed connection.
pub(crate) async fn serve_http<I, S, B>(
    builder: &hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    io: I,
    svc: S,
    stop: &CancellationToken,
    what: &'static str,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, listener = what, "connection ended with an error");
    }
}

/// Pause after a failed accept.
pub const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Serves both listeners until `shutdown` fires, then drains within
/// `config.drain_grace`.
pub async fn run(
    edge: Edge,
    public: tokio::net::TcpListener,
    agents: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    run_with_internal(edge, public, agents, None, shutdown).await
}

/// Like [`run`], also serving other edges' forwarded requests on `internal` and keeping
/// this edge's leases fresh, when the edge is part of a cluster.
pub async fn run_with_internal(
    edge: Edge,
    public: tokio::net::TcpListener,
    agents: tokio::net::TcpListener,
    internal: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let accept_stop = CancellationToken::new();
    let maintain_stop = CancellationToken::new();
    let mut internal_task = None;
    if let Some(cluster) = edge.cluster().cloned() {
        tokio::spawn(forward::maintain(
            edge.clone(),
            cluster.clone(),
            maintain_stop.clone(),
        ));
        if let Some(l) = internal {
            internal_task = Some(tokio::spawn(forward::serve_internal(
                edge.clone(),
                cluster,
                l,
                accept_stop.clone(),
            )));
        }
    }
    let tcp_tasks: Vec<_> = std::mem::take(&mut *edge.inner.tcp_listeners.lock())
        .into_iter()
        .map(|l| tokio::spawn(tcp::serve_tcp(edge.clone(), l, accept_stop.clone())))
        .collect();
    let p = tokio::spawn(proxy::serve_public(
        edge.clone(),
        public,
        accept_stop.clone(),
    ));
    let a = tokio::spawn(agents::serve_agents(
        edge.clone(),
        agents,
        accept_stop.clone(),
    ));
    shutdown.cancelled().await;
    edge.inner.stopping.store(true, Ordering::Release);
    // Not ready first, still serving, so load balancers stop sending viewers here
    // before anything is refused; then agents move and the listeners close.
    edge.mark_draining();
    let delay = edge.config().drain_delay;
    if !delay.is_zero() {
        tracing::info!(
            ?delay,
            "draining: not ready, still serving while load balancers notice"
        );
        tokio::time::sleep(delay).await;
    }
    tracing::info!(grace = ?edge.config().drain_grace, "draining: go-away sent to agents, finishing open requests");
    // Other edges stop forwarding here as the agents move.
    if let Some(cluster) = edge.cluster() {
        forward::withdraw(&edge, cluster).await;
    }
    edge.drain();
    accept_stop.cancel();
    maintain_stop.cancel();
    let _ = p.await;
    let _ = a.await;
    for t in tcp_tasks {
        let _ = t.await;
    }
    if let Some(t) = internal_task {
        let _ = t.await;
    }
    if tokio::time::timeout(edge.config().drain_grace, edge.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!("drain grace period over; closing the remaining connections");
    }
    edge.routes().close_all("edge stopped");
    Ok(())
}
