//! What control does through its live state so that replicas sharing one (Redis)
//! behave as one: candidates from every replica's edge reports, deletions announced to
//! every replica's edge links, and readiness that follows the database and the live
//! state. With live state in this process these fall back to this replica's own view.

use std::collections::HashMap;
use std::time::Duration;

use netbore_tokens::now_unix;
use tokio_util::sync::CancellationToken;

use crate::store::StoreError;
use crate::{Control, EdgeEntry, EdgeStatus, order_candidates};

/// How often the gRPC `readiness` status is brought in line with the store.
pub const READINESS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl Control {
    /// Edges to hand out now, in the order of [`Control::candidate_edges`], from the
    /// reports every replica shares through the store (or this replica's own).
    pub async fn candidates_now(&self) -> Result<Vec<EdgeEntry>, StoreError> {
        let now = now_unix();
        match self.live().edges(now).await? {
            None => Ok(self.candidate_edges()),
            Some(v) => {
                let status: HashMap<String, EdgeStatus> = v
                    .into_iter()
                    .map(|s| (s.entry.edge_id.clone(), s))
                    .collect();
                Ok(order_candidates(&self.edges(), &status, now))
            }
        }
    }

    /// Every edge known to any replica, with its last report (configured edges first).
    pub async fn edge_statuses_now(
        &self,
    ) -> Result<Vec<(EdgeEntry, Option<EdgeStatus>)>, StoreError> {
        let Some(shared) = self.live().edges(now_unix()).await? else {
            return Ok(self.edge_statuses());
        };
        let mut out: Vec<(EdgeEntry, Option<EdgeStatus>)> = self
            .edges()
            .into_iter()
            .map(|e| {
                let s = shared
                    .iter()
                    .find(|s| s.entry.edge_id == e.edge_id)
                    .cloned();
                (e, s)
            })
            .collect();
        let mut rest: Vec<EdgeStatus> = shared
            .into_iter()
            .filter(|s| !out.iter().any(|(e, _)| e.edge_id == s.entry.edge_id))
            .collect();
        rest.sort_by(|a, b| a.entry.edge_id.cmp(&b.entry.edge_id));
        out.extend(rest.into_iter().map(|s| (s.entry.clone(), Some(s))));
        Ok(out)
    }

    /// Records an edge's report here and shares it with the other replicas. A store
    /// failure is logged, not returned: the link stays up and the next report retries.
    pub async fn record_edge_report(&self, status: EdgeStatus) {
        self.edge_report(status.clone());
        if let Err(e) = self.live().put_edge(&status).await {
            tracing::warn!(edge = %status.entry.edge_id, error = %e, "edge report not shared");
        }
    }

    /// Holds the names of tunnels an edge reports as linked: each live record's hold
    /// reaches at least [`crate::LIVE_LINK_HOLD`] and the configured name hold past now,
    /// so a name is never free while any edge holds a link to its tunnel, and an
    /// anonymous one stays held for the name hold after the last report naming it. A
    /// store failure is logged, not returned: the next report retries.
    pub async fn tunnels_held(&self, edge_id: &str, tunnel_ids: &[String]) {
        if tunnel_ids.is_empty() {
            return;
        }
        let now = now_unix();
        let hold = self.config().name_hold.max(crate::LIVE_LINK_HOLD).as_secs();
        if let Err(e) = self
            .store()
            .refresh(tunnel_ids, now, now.saturating_add(hold))
            .await
        {
            tracing::warn!(edge = %edge_id, tunnels = tunnel_ids.len(), error = %e, "holds of linked tunnels not refreshed; the next report retries");
        }
    }

    /// Marks an edge's link to this replica closed, here and in the shared store.
    pub async fn edge_link_closed(&self, edge_id: &str) {
        self.edge_disconnected(edge_id);
        if let Err(e) = self.live().edge_closed(edge_id).await {
            tracing::warn!(edge = %edge_id, error = %e, "edge link closure not shared");
        }
    }

    /// Ok while control can serve: its database and its live state both answer.
    pub async fn ready(&self) -> Result<(), StoreError> {
        self.store().ping().await?;
        self.live().ping().await
    }

    /// Announces an event (a deletion, a revoked credential, a drain) to this
    /// replica's edge links and, through the live state, to every other replica's.
    pub(crate) async fn announce_everywhere(&self, event: &netbore_api::ControlEvent) {
        let msg = event.encode();
        self.announce_deletion(&msg);
        if let Err(e) = self.live().publish_deletion(&msg).await {
            tracing::warn!(
                event = ?event, error = %e,
                "deletion not announced to other replicas; agents on edges linked to them stay until their tokens expire"
            );
        }
    }
}

/// Keeps the gRPC health service's `readiness` status in line with [`Control::ready`]
/// until `shutdown` fires.
pub(crate) async fn watch_readiness(
    control: Control,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut was_ready = true;
    let mut tick = tokio::time::interval(READINESS_CHECK_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ready = match control.ready().await {
            Ok(()) => true,
            Err(e) => {
                if was_ready {
                    tracing::warn!(error = %e, "control is not ready");
                }
                false
            }
        };
        if ready != was_ready {
            if ready {
                tracing::info!("control is ready again");
            }
            let status = if ready {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            health.set_service_status("readiness", status).await;
            was_ready = ready;
        }
    }
}
