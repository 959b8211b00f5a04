//! The edge's link to control: a bidirectional gRPC stream on which the edge reports
//! its load and the tunnels linked to it every [`REPORT_INTERVAL`] (and at once when a
//! tunnel first links here), which keeps their names held at control, and control sends
//! commands (disconnect a deleted tunnel, close a revoked credential's links, drain,
//! session seeds). Every call carries the edge's credential (`authorization: Bearer
//! <token>`); control refuses a link without one. Reconnects with backoff; the edge
//! keeps serving while it is down.

use std::time::Duration;

use std::collections::VecDeque;

use netbore_proto::edge::v1::edge_command::Command;
use netbore_proto::edge::v1::edge_service_client::EdgeServiceClient;
use netbore_proto::edge::v1::{
    AgentLink, EdgeReport, LinkEvent, OriginHealth, TunnelTraffic, link_event,
};
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

/// Most link events in one report; more wait for the next.
pub const MAX_LINK_EVENTS_PER_REPORT: usize = 100;
/// Most link events an edge keeps while control has not acknowledged them (control
/// unreachable for long); past it the oldest are dropped, with a warning.
pub const MAX_PENDING_LINK_EVENTS: usize = 10_000;

/// Link opened/closed events waiting for control's acknowledgement. They go out in
/// every report until control names them in an `AckLinkEvents`, so none is lost
/// across a reconnect or a control restart; control writes each once (by id).
#[derive(Default)]
pub struct LinkEvents {
    pending: parking_lot::Mutex<VecDeque<LinkEvent>>,
    queued: tokio::sync::Notify,
}

impl LinkEvents {
    /// Queues an event for `route` (`linked`, or closed with `reason`).
    pub fn record(&self, route: &crate::routes::Route, linked: bool, reason: &str) {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let kind = if linked {
            link_event::Kind::Linked
        } else {
            link_event::Kind::Unlinked
        };
        let ev = LinkEvent {
            // Sorts by time like control's own audit ids.
            event_id: format!("aud_{nanos:020}_{:08x}", rand::random::<u32>()),
            kind: kind as i32,
            tunnel_id: route.tunnel_id.clone(),
            link_id: route.session_id.clone(),
            agent_addr: route.peer.clone(),
            at: crate::routes::unix_now(),
            agent_instance_id: route.instance_id.clone(),
            agent_version: route.agent.clone(),
            reason: reason.chars().take(200).collect(),
        };
        {
            let mut p = self.pending.lock();
            if p.len() >= MAX_PENDING_LINK_EVENTS {
                p.pop_front();
                warn!(
                    limit = MAX_PENDING_LINK_EVENTS,
                    "control has not taken this edge's link events for long; the oldest is dropped from the audit trail"
                );
            }
            p.push_back(ev);
        }
        self.queued.notify_one();
    }

    /// The oldest events not yet acknowledged, at most `max`.
    pub fn pending(&self, max: usize) -> Vec<LinkEvent> {
        self.pending.lock().iter().take(max).cloned().collect()
    }

    /// Forgets the events control acknowledged.
    pub fn ack(&self, ids: &[String]) {
        let ids: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
        self.pending
            .lock()
            .retain(|e| !ids.contains(e.event_id.as_str()));
    }

    /// Asks for a report now (a link's origin health changed).
    pub fn report_soon(&self) {
        self.queued.notify_one();
    }

    /// Resolves when an event was queued (or a report asked for) since the last call.
    pub async fn queued(&self) {
        self.queued.notified().await;
    }
}

/// The links of the tunnels in `ids`, as a report carries them.
fn agent_links(edge: &Edge, ids: &[String]) -> (Vec<AgentLink>, Vec<TunnelTraffic>) {
    let links = edge
        .routes()
        .links_of(ids)
        .into_iter()
        .map(|r| {
            let status = r.mux.agent_status();
            AgentLink {
                tunnel_id: r.tunnel_id.clone(),
                link_id: r.session_id.clone(),
                connected_at: r.connected_at,
                agent_version: r.agent.clone(),
                agent_instance_id: r.instance_id.clone(),
                agent_addr: r.peer.clone(),
                wanted_links: status
                    .as_ref()
                    .map_or(0, |(s, _)| u32::from(s.wanted_links)),
                origin: status.map(|(s, at)| OriginHealth {
                    healthy: s.origin.is_healthy(),
                    cause: s.origin.as_str().to_string(),
                    message: s.message,
                    reported_at: at,
                }),
            }
        })
        .collect();
    let traffic = ids
        .iter()
        .filter_map(|t| {
            let (requests_5m, errors_5m) = edge.routes().traffic(t);
            (requests_5m > 0).then(|| TunnelTraffic {
                tunnel_id: t.clone(),
                requests_5m,
                errors_5m,
            })
        })
        .collect();
    (links, traffic)
}

/// This edge's report: its load, and the tunnels linked to it (so control keeps their
/// names held) with their links and traffic, split into reports of at most
/// [`MAX_TUNNEL_IDS_PER_REPORT`] ids. The first carries the pending link events.
fn reports(edge: &Edge, id: &LinkIdentity) -> Vec<EdgeReport> {
    let base = report(edge, id);
    let ids = edge.routes().tunnel_ids();
    let events = edge.link_events().pending(MAX_LINK_EVENTS_PER_REPORT);
    if ids.is_empty() {
        return vec![EdgeReport {
            link_events: events,
            ..base
        }];
    }
    let mut events = Some(events);
    ids.chunks(MAX_TUNNEL_IDS_PER_REPORT)
        .map(|chunk| {
            let (links, traffic) = agent_links(edge, chunk);
            EdgeReport {
                linked_tunnel_ids: chunk.to_vec(),
                links,
                traffic,
                link_events: events.take().unwrap_or_default(),
                ..base.clone()
            }
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
        links: Vec::new(),
        traffic: Vec::new(),
        link_events: Vec::new(),
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
            // A link opened or closed: control hears it (and the tunnel's links) now.
            _ = edge.link_events().queued() => send_reports(&tx, edge, id).await?,
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
                    Some(Command::AckLinkEvents(a)) => edge.link_events().ack(&a.event_ids),
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
