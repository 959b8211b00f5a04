//! The edge's link to control: a bidirectional gRPC stream on which the edge reports
//! its load and the tunnels linked to it every [`REPORT_INTERVAL`] (and at once when a
//! tunnel first links here), which keeps their names held at control, and control sends
//! commands (disconnect a deleted tunnel, close a revoked credential's links, drain,
//! session seeds). Every call carries the edge's credential (`authorization: Bearer
//! <token>`); control refuses a link without one. Reconnects with backoff; the edge
//! keeps serving while it is down.

use std::time::Duration;

use netbore_proto::edge::v1::EdgeReport;
use netbore_proto::edge::v1::edge_command::Command;
use netbore_proto::edge::v1::edge_service_client::EdgeServiceClient;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Edge;

/// How often the edge reports its load.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// Longest wait between reconnect attempts.
pub const LINK_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What the edge tells control about itself.
#[derive(Debug, Clone)]
pub struct LinkIdentity {
    /// URL agents use to reach this edge.
    pub agent_url: String,
    /// Region label.
    pub region: String,
    /// The credential control knows this edge by (`--control-token-file`,
    /// `NETBORE_EDGE_TOKEN`); `None` links without one, which control refuses.
    pub token: Option<netbore_tokens::Secret>,
}

/// Most tunnel ids in one report; an edge holding more sends several reports in a
/// row (about 40 KB each, far under gRPC's 4 MiB message limit).
pub const MAX_TUNNEL_IDS_PER_REPORT: usize = 1000;

/// This edge's report: its load, and the tunnels linked to it (so control keeps their
/// names held), split into reports of at most [`MAX_TUNNEL_IDS_PER_REPORT`] ids.
fn reports(edge: &Edge, id: &LinkIdentity) -> Vec<EdgeReport> {
    let base = report(edge, id);
    let ids = edge.routes().tunnel_ids();
    if ids.is_empty() {
        return vec![base];
    }
    ids.chunks(MAX_TUNNEL_IDS_PER_REPORT)
        .map(|chunk| EdgeReport {
            linked_tunnel_ids: chunk.to_vec(),
            ..base.clone()
        })
        .collect()
}

async fn send_reports(
    tx: &tokio::sync::mpsc::Sender<EdgeReport>,
    edge: &Edge,
    id: &LinkIdentity,
) -> Result<(), String> {
    for r in reports(edge, id) {
        tx.send(r)
            .await
            .map_err(|_| "report stream closed".to_string())?;
    }
    Ok(())
}

fn report(edge: &Edge, id: &LinkIdentity) -> EdgeReport {
    let (tunnels, connections, streams, bytes_in, bytes_out) = edge.routes().load();
    EdgeReport {
        edge_id: edge.config().edge_id.clone(),
        agent_url: id.agent_url.clone(),
        region: id.region.clone(),
        tunnels,
        connections,
        streams,
        bytes_in,
        bytes_out,
        draining: edge.is_draining(),
        linked_tunnel_ids: Vec::new(),
    }
}

/// Keeps the link to control at `url` (its gRPC address) until `shutdown`.
pub async fn run(edge: Edge, url: String, id: LinkIdentity, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        match link_once(&edge, &url, &id, &shutdown).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                warn!(control = %url, error = %e, "control link down; the edge keeps serving and retries")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(LINK_BACKOFF_MAX);
    }
}

async fn link_once(
    edge: &Edge,
    url: &str,
    id: &LinkIdentity,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let bearer = match &id.token {
        Some(t) => Some(
            tonic::metadata::MetadataValue::try_from(format!("Bearer {}", t.expose()))
                .map_err(|_| "the edge token holds characters a header cannot carry".to_string())?,
        ),
        None => None,
    };
    let mut client =
        EdgeServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            if let Some(b) = &bearer {
                req.metadata_mut().insert("authorization", b.clone());
            }
            Ok(req)
        });
    let (tx, rx) = tokio::sync::mpsc::channel::<EdgeReport>(4);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    // The first report introduces the edge; the tunnels follow once the link is up.
    tx.send(report(edge, id)).await.map_err(|e| e.to_string())?;
    let mut commands = client
        .link(outbound)
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    info!(control = %url, "linked to control");
    send_reports(&tx, edge, id).await?;
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => send_reports(&tx, edge, id).await?,
            // A tunnel new to this edge is reported at once, so its name is held from
            // its first link on, however short control's name hold.
            _ = edge.routes().first_link() => send_reports(&tx, edge, id).await?,
            m = commands.message() => match m {
                Ok(Some(cmd)) => match cmd.command {
                    Some(Command::DisconnectTunnel(d)) => {
                        let n = edge.revoke_tunnel(&d.tunnel_id, d.revoked_until);
                        if n > 0 {
                            info!(tunnel = %d.tunnel_id, connections = n, "tunnel deleted at control; agents disconnected");
                        }
                    }
                    Some(Command::SetTunnelState(t)) => {
                        let n = edge.set_tunnel_disabled(&t.tunnel_id, &t.name, t.disabled);
                        info!(tunnel = %t.tunnel_id, name = %t.name, disabled = t.disabled, connections = n, "tunnel disabled or enabled at control");
                    }
                    Some(Command::RevokeCredential(r)) => {
                        let n = edge.revoke_credential(&r.credential_id, r.revoked_until);
                        if n > 0 {
                            info!(credential = %r.credential_id, connections = n, "tunnel credential revoked at control; its links told to go and closed");
                        }
                    }
                    Some(Command::SessionKeys(k)) => {
                        let seeds: Vec<_> = k
                            .seeds
                            .iter()
                            .filter_map(|s| netbore_tokens::SessionSeed::from_bytes(&s.kid, &s.seed))
                            .collect();
                        info!(keys = seeds.len(), "session keys from control");
                        edge.gate().set_session_seeds(seeds);
                    }
                    Some(Command::Drain(_)) => {
                        info!("control asked this edge to drain");
                        edge.drain();
                        let _ = tx.send(report(edge, id)).await;
                    }
                    Some(Command::Undrain(_)) => {
                        if edge.undrain() {
                            info!("control asked this edge to take agents again");
                        } else {
                            info!("control asked this edge to take agents again; it is shutting down, so it stays draining");
                        }
                        let _ = tx.send(report(edge, id)).await;
                    }
                    None => {}
                },
                Ok(None) => return Err("control closed the link".into()),
                Err(e) if e.code() == tonic::Code::Unauthenticated || e.code() == tonic::Code::PermissionDenied => {
                    return Err(format!("control refused this edge's credential: {}; check --control-token-file / NETBORE_EDGE_TOKEN", e.message()));
                }
                Err(e) => return Err(e.to_string()),
            },
            _ = shutdown.cancelled() => {
                // Tell control we are draining before we go.
                let _ = tx.send(report(edge, id)).await;
                return Ok(());
            }
        }
    }
}
