//! The admin listener ([`netbore_telemetry::admin`]): `/livez` (the process serves),
//! `/readyz` (take traffic: not draining) for Kubernetes probes, and `/metrics`
//! (Prometheus). Kept off the public port so viewers cannot reach it.

use netbore_telemetry::admin::Admin;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Edge;

/// What the edge's admin listener serves.
pub fn admin(edge: Edge) -> Admin {
    let e = edge.clone();
    Admin::new(move |format| crate::metrics::render(&e, format)).with_readiness(move || {
        if edge.is_draining() {
            return Err("draining: this edge is shutting down".into());
        }
        let (tunnels, conns) = edge.routes().counts();
        Ok(format!(
            "ready: {tunnels} tunnels, {conns} agent connections"
        ))
    })
}

/// Serves the admin endpoints until `stop` fires.
pub async fn serve_admin(edge: Edge, listener: TcpListener, stop: CancellationToken) {
    admin(edge).serve(listener, stop).await
}
