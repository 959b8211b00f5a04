//! Tunnels' live status: what the edges report about each agent link, kept where the
//! replicas share it, and the state a caller sees (`GET /v1/tunnels/{id}/status`,
//! gRPC `GetTunnelStatus`, and every tunnel in `ListTunnels`).
//!
//! Each edge report carries the links of the tunnels it holds (tunnel, link id,
//! connected since, agent version, instance id and address, the origin's health as the
//! agent last reported it) and each tunnel's requests and errors over 5 minutes
//! (`proto/netbore/edge/v1/edge.proto`, fields 21-23). Control keeps them per tunnel
//! as fields of one record ([`crate::store::LiveState::put_tunnel_fields`]: a Redis
//! hash with several replicas, [`LocalTunnels`] in this process otherwise):
//!
//! | field | value |
//! | --- | --- |
//! | `link/{edge id}/{link id}` | a [`LinkEntry`] (JSON), stale [`LINK_STATE_TTL`] after its `seen_at` |
//! | `traffic/{edge id}` | a [`TrafficEntry`] (JSON), stale likewise |
//! | `last_seen` | Unix seconds a link was last reported or closed |
//!
//! An unlink event removes its link at once, so an agent that dies is out of the
//! status as soon as its edge notices, not a TTL later. Link events also go to the
//! audit trail (`agent.link`, `agent.unlink`), written once by the edge's event id.
//!
//! The state is a pure function of that record ([`compute`]).

use std::collections::HashMap;
use std::time::Duration;

use netbore_api::types::{
    LinkStatus, LiveStatus, OriginStatus, StatusReason, StatusReasonCode, TunnelState,
};
use netbore_proto::edge::v1 as epb;
use serde::{Deserialize, Serialize};

use crate::Control;
use crate::accounts::AuditEvent;
use crate::ops::rfc3339;
use crate::store::{StoreError, TunnelRecord};

/// A link (or a tunnel's traffic) not reported again within this long is stale: three
/// report intervals (edges report every 5 s).
pub const LINK_STATE_TTL: Duration = Duration::from_secs(15);
/// How long control remembers when a tunnel was last seen linked.
pub const LAST_SEEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default for [`crate::ControlConfig::offline_after`]: a tunnel with no link this long
/// is `offline`; before that it is `degraded` (`no_link`), as an agent reconnecting
/// after an edge restart takes a few seconds.
pub const DEFAULT_OFFLINE_AFTER: Duration = Duration::from_secs(30);
/// An agent whose minor version is more than this many behind control's (or whose major
/// is older) is `agent_outdated`.
pub const MAX_AGENT_MINOR_LAG: u64 = 2;
/// Most tunnels held in memory without Redis; past it, those seen longest ago go.
pub const MAX_LOCAL_TUNNELS: usize = 100_000;
/// Longest event id taken from an edge.
pub const MAX_EVENT_ID_LEN: usize = 64;

/// One agent link as an edge last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkEntry {
    /// The edge holding it.
    pub edge_id: String,
    /// Its session id on that edge.
    pub link_id: String,
    /// Unix seconds it opened.
    pub connected_at: u64,
    /// The agent's self-description.
    pub agent_version: String,
    /// The agent's instance id.
    pub agent_instance_id: String,
    /// The agent's address as the edge sees it.
    pub agent_addr: String,
    /// The agent's last origin report.
    pub origin: Option<OriginEntry>,
    /// Distinct edges the agent wants (0: unknown).
    pub wanted_links: u32,
    /// Unix seconds of the report.
    pub seen_at: u64,
}

/// The agent's last origin probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginEntry {
    /// It succeeded.
    pub healthy: bool,
    /// Its cause name.
    pub cause: String,
    /// What it saw.
    pub message: String,
    /// Unix seconds the edge received it.
    pub reported_at: u64,
}

/// One edge's count of a tunnel's requests over 5 minutes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficEntry {
    /// Requests.
    pub requests_5m: u64,
    /// Failed requests.
    pub errors_5m: u64,
    /// Unix seconds of the report.
    pub seen_at: u64,
}

/// What control knows live about one tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelLive {
    /// Its links (fresh ones only).
    pub links: Vec<LinkEntry>,
    /// Its traffic per edge (fresh ones only).
    pub traffic: Vec<TrafficEntry>,
    /// When a link was last seen.
    pub last_seen: Option<u64>,
}

impl TunnelLive {
    /// Reads a tunnel's fields, dropping stale and unreadable ones.
    pub fn from_fields(fields: &[(String, String)], now: u64) -> TunnelLive {
        let fresh = |seen: u64| now.saturating_sub(seen) <= LINK_STATE_TTL.as_secs();
        let mut t = TunnelLive::default();
        for (k, v) in fields {
            if k.starts_with("link/") {
                if let Ok(l) = serde_json::from_str::<LinkEntry>(v)
                    && fresh(l.seen_at)
                {
                    t.links.push(l);
                }
            } else if k.starts_with("traffic/") {
                if let Ok(x) = serde_json::from_str::<TrafficEntry>(v)
                    && fresh(x.seen_at)
                {
                    t.traffic.push(x);
                }
            } else if k == "last_seen" {
                t.last_seen = v.parse().ok();
            }
        }
        t.links
            .sort_by(|a, b| (a.connected_at, &a.edge_id).cmp(&(b.connected_at, &b.edge_id)));
        t
    }
}

/// `(major, minor)` of an agent self-description like `netbore/0.3.1`.
fn version_of(agent: &str) -> Option<(u64, u64)> {
    let v = agent.rsplit('/').next()?;
    let mut parts = v.split(['.', '-', '+']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// True when `agent` is much older than `ours` (see [`MAX_AGENT_MINOR_LAG`]); an
/// agent that does not say its version is not judged.
pub fn is_outdated(agent: &str, ours: &str) -> bool {
    match (version_of(agent), version_of(ours)) {
        (Some((am, an)), Some((om, on))) => am < om || (am == om && on > an + MAX_AGENT_MINOR_LAG),
        _ => false,
    }
}

/// A tunnel's status from what control knows live about it at `now`.
/// `disabled`: the tunnel record says so.
pub fn compute(
    live: &TunnelLive,
    disabled: bool,
    now: u64,
    offline_after: Duration,
    own_version: &str,
) -> LiveStatus {
    let links: Vec<LinkStatus> = live
        .links
        .iter()
        .map(|l| LinkStatus {
            edge_id: l.edge_id.clone(),
            link_id: l.link_id.clone(),
            connected_since: rfc3339(l.connected_at),
            agent_version: l.agent_version.clone(),
            agent_instance_id: l.agent_instance_id.clone(),
            agent_addr: l.agent_addr.clone(),
        })
        .collect();
    // The newest origin report of any link.
    let origin = live
        .links
        .iter()
        .filter_map(|l| l.origin.as_ref())
        .max_by_key(|o| o.reported_at);
    let last_seen = if live.links.is_empty() {
        live.last_seen
    } else {
        Some(now)
    };
    let mut reasons = Vec::new();
    if live.links.is_empty() {
        let ago = last_seen.map(|t| now.saturating_sub(t));
        reasons.push(StatusReason {
            code: StatusReasonCode::NoLink,
            message: match ago {
                Some(a) => format!(
                    "no agent is linked (last seen {a} s ago); the agent may be reconnecting: check that it runs and can reach the edges (its log and /readyz say why not)"
                ),
                None => "no agent has linked recently; start one for this tunnel (netbore http <port> --tunnel-token nbt_… or --name NAME)".to_string(),
            },
        });
    } else {
        if let Some(o) = origin.filter(|o| !o.healthy) {
            reasons.push(StatusReason {
                code: StatusReasonCode::OriginUnreachable,
                message: format!(
                    "the agent cannot reach its origin ({}: {}); start the local service, or fix the agent's target or --health-path",
                    o.cause, o.message
                ),
            });
        }
        let wanted = live.links.iter().map(|l| l.wanted_links).max().unwrap_or(0);
        let mut edges: Vec<&str> = live.links.iter().map(|l| l.edge_id.as_str()).collect();
        edges.sort_unstable();
        edges.dedup();
        if (edges.len() as u32) < wanted {
            reasons.push(StatusReason {
                code: StatusReasonCode::FewerEdgesThanRequested,
                message: format!(
                    "the agent asked for links to {wanted} distinct edges and holds {}; run more edges, let the agent reach each (per-pod addresses), or lower its --connections",
                    edges.len()
                ),
            });
        }
        if let Some(old) = live
            .links
            .iter()
            .find(|l| is_outdated(&l.agent_version, own_version))
        {
            reasons.push(StatusReason {
                code: StatusReasonCode::AgentOutdated,
                message: format!(
                    "the agent ({}) is much older than the edges and control (netbore/{own_version}); upgrade it",
                    old.agent_version
                ),
            });
        }
    }
    let state = if disabled {
        TunnelState::Disabled
    } else if live.links.is_empty() {
        match last_seen {
            Some(t) if now.saturating_sub(t) < offline_after.as_secs() => TunnelState::Degraded,
            _ => TunnelState::Offline,
        }
    } else if reasons.is_empty() {
        TunnelState::Ready
    } else {
        TunnelState::Degraded
    };
    let (requests_5m, errors_5m) = live
        .traffic
        .iter()
        .fold((0, 0), |(r, e), t| (r + t.requests_5m, e + t.errors_5m));
    LiveStatus {
        state,
        reasons,
        links,
        last_seen: last_seen.map(rfc3339),
        origin: origin.map(|o| OriginStatus {
            healthy: o.healthy,
            cause: o.cause.clone(),
            message: o.message.clone(),
            checked_at: rfc3339(o.reported_at),
        }),
        requests_5m,
        errors_5m,
    }
}

/// Whether a tunnel record is disabled (by its owner, `POST /v1/tunnels/{id}/disable`).
pub fn is_disabled(record: &TunnelRecord) -> bool {
    record.disabled_at.is_some()
}

/// Tunnels' live status in this process (no Redis): tunnel id → field → value.
#[derive(Default)]
pub struct LocalTunnels(parking_lot::Mutex<HashMap<String, HashMap<String, String>>>);

impl LocalTunnels {
    fn put(&self, fields: &[(String, String, String)], now: u64) {
        let mut m = self.0.lock();
        for (t, k, v) in fields {
            m.entry(t.clone()).or_default().insert(k.clone(), v.clone());
        }
        if m.len() > MAX_LOCAL_TUNNELS {
            let seen = |f: &HashMap<String, String>| {
                f.get("last_seen")
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            m.retain(|_, f| now.saturating_sub(seen(f)) < LAST_SEEN_TTL.as_secs());
            while m.len() > MAX_LOCAL_TUNNELS {
                let Some(k) = m
                    .iter()
                    .min_by_key(|(_, f)| seen(f))
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                m.remove(&k);
            }
        }
    }

    fn del(&self, fields: &[(String, String)]) {
        let mut m = self.0.lock();
        for (t, k) in fields {
            if let Some(f) = m.get_mut(t) {
                f.remove(k);
            }
        }
    }

    fn get(&self, tunnel_ids: &[String]) -> Vec<Vec<(String, String)>> {
        let m = self.0.lock();
        tunnel_ids
            .iter()
            .map(|t| {
                m.get(t)
                    .map(|f| f.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// An event id an edge may give: `aud_` then letters, digits and `_`, at most
/// [`MAX_EVENT_ID_LEN`] bytes (it becomes an audit row's primary key).
fn valid_event_id(id: &str) -> bool {
    id.len() <= MAX_EVENT_ID_LEN
        && id.starts_with("aud_")
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn link_field(edge_id: &str, link_id: &str) -> String {
    format!("link/{edge_id}/{link_id}")
}

impl Control {
    async fn put_tunnel_fields(&self, fields: &[(String, String, String)], now: u64) {
        if fields.is_empty() {
            return;
        }
        match self.live().put_tunnel_fields(fields).await {
            Ok(true) => {}
            Ok(false) => self.local_tunnels().put(fields, now),
            Err(e) => {
                tracing::warn!(error = %e, "tunnel status not shared; the next report retries")
            }
        }
    }

    /// Records the links and traffic in an edge's report for the tunnels' status.
    pub async fn record_links(&self, edge_id: &str, rep: &epb::EdgeReport) {
        let now = netbore_tokens::now_unix();
        let mut fields = Vec::with_capacity(rep.links.len() + rep.linked_tunnel_ids.len());
        for l in &rep.links {
            let e = LinkEntry {
                edge_id: edge_id.to_string(),
                link_id: l.link_id.clone(),
                connected_at: l.connected_at,
                agent_version: l.agent_version.clone(),
                agent_instance_id: l.agent_instance_id.clone(),
                agent_addr: l.agent_addr.clone(),
                origin: l.origin.as_ref().map(|o| OriginEntry {
                    healthy: o.healthy,
                    cause: o.cause.clone(),
                    message: o.message.chars().take(512).collect(),
                    reported_at: o.reported_at,
                }),
                wanted_links: l.wanted_links,
                seen_at: now,
            };
            fields.push((
                l.tunnel_id.clone(),
                link_field(edge_id, &l.link_id),
                serde_json::to_string(&e).expect("serializable"),
            ));
        }
        for t in &rep.traffic {
            let e = TrafficEntry {
                requests_5m: t.requests_5m,
                errors_5m: t.errors_5m,
                seen_at: now,
            };
            fields.push((
                t.tunnel_id.clone(),
                format!("traffic/{edge_id}"),
                serde_json::to_string(&e).expect("serializable"),
            ));
        }
        for t in &rep.linked_tunnel_ids {
            fields.push((t.clone(), "last_seen".into(), now.to_string()));
        }
        self.put_tunnel_fields(&fields, now).await;
    }

    /// Writes an edge's link events to the audit trail (each once, by its id) and
    /// takes closed links out of the status. Returns the ids to acknowledge: those
    /// written, and malformed ones (dropped, with a warning); a store failure leaves an
    /// event unacknowledged, so the edge sends it again.
    pub async fn record_link_events(
        &self,
        edge_id: &str,
        events: &[epb::LinkEvent],
    ) -> Vec<String> {
        let mut acked = Vec::with_capacity(events.len());
        for ev in events {
            let kind = epb::link_event::Kind::try_from(ev.kind).ok();
            let action = match kind {
                Some(epb::link_event::Kind::Linked) => "agent.link",
                Some(epb::link_event::Kind::Unlinked) => "agent.unlink",
                _ => "",
            };
            if !valid_event_id(&ev.event_id) || action.is_empty() || ev.tunnel_id.len() > 128 {
                tracing::warn!(edge = %edge_id, event = %ev.event_id.chars().take(80).collect::<String>(), "malformed link event from an edge dropped");
                acked.push(ev.event_id.clone());
                continue;
            }
            // The tunnel's owner, so owners read their tunnels' link events too
            // (a deleted tunnel's events have none: only admin reads them).
            let owner = match self
                .store()
                .by_id(&ev.tunnel_id, netbore_tokens::now_unix())
                .await
            {
                Ok(t) => t.and_then(|t| t.owner),
                Err(e) => {
                    tracing::warn!(edge = %edge_id, event = %ev.event_id, error = %e, "link event not written; the edge sends it again");
                    continue;
                }
            };
            let audit = AuditEvent {
                id: None,
                actor: format!("edge:{edge_id}"),
                action: action.to_string(),
                target: Some(ev.tunnel_id.clone()),
                address: (!ev.agent_addr.is_empty()).then(|| ev.agent_addr.clone()),
                key_id: None,
                tunnel_id: Some(ev.tunnel_id.clone()),
                owner,
                detail: serde_json::json!({
                    "edge_id": edge_id,
                    "link_id": ev.link_id,
                    "agent_addr": ev.agent_addr,
                    "agent_instance_id": ev.agent_instance_id,
                    "agent_version": ev.agent_version,
                    "reason": ev.reason,
                }),
            };
            if let Err(e) = self.store().audit_once(&ev.event_id, &audit, ev.at).await {
                tracing::warn!(edge = %edge_id, event = %ev.event_id, error = %e, "link event not written; the edge sends it again");
                continue;
            }
            if kind == Some(epb::link_event::Kind::Unlinked) {
                let del = [(ev.tunnel_id.clone(), link_field(edge_id, &ev.link_id))];
                match self.live().del_tunnel_fields(&del).await {
                    Ok(true) => {}
                    Ok(false) => self.local_tunnels().del(&del),
                    Err(e) => {
                        tracing::warn!(error = %e, "closed link stays in the status until it goes stale")
                    }
                }
                let now = netbore_tokens::now_unix();
                self.put_tunnel_fields(
                    &[(
                        ev.tunnel_id.clone(),
                        "last_seen".into(),
                        ev.at.min(now).to_string(),
                    )],
                    now,
                )
                .await;
            }
            acked.push(ev.event_id.clone());
        }
        acked
    }

    /// The live status of each record, in order.
    pub async fn tunnel_status(
        &self,
        records: &[TunnelRecord],
    ) -> Result<Vec<LiveStatus>, StoreError> {
        let ids: Vec<String> = records.iter().map(|r| r.tunnel_id.clone()).collect();
        let fields = match self.live().tunnel_fields(&ids).await? {
            Some(f) => f,
            None => self.local_tunnels().get(&ids),
        };
        let now = netbore_tokens::now_unix();
        Ok(records
            .iter()
            .zip(fields)
            .map(|(r, f)| {
                compute(
                    &TunnelLive::from_fields(&f, now),
                    is_disabled(r),
                    now,
                    self.config().offline_after,
                    env!("CARGO_PKG_VERSION"),
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn link(edge: &str, healthy: Option<bool>, wanted: u32, version: &str) -> LinkEntry {
        LinkEntry {
            edge_id: edge.into(),
            link_id: format!("{edge}-1"),
            connected_at: NOW - 100,
            agent_version: version.into(),
            agent_instance_id: "inst".into(),
            agent_addr: "127.0.0.1:5000".into(),
            origin: healthy.map(|h| OriginEntry {
                healthy: h,
                cause: if h { "healthy" } else { "connection_refused" }.into(),
                message: "HEAD /".into(),
                reported_at: NOW - 1,
            }),
            wanted_links: wanted,
            seen_at: NOW,
        }
    }

    fn state(live: &TunnelLive) -> (TunnelState, Vec<StatusReasonCode>) {
        let s = compute(live, false, NOW, DEFAULT_OFFLINE_AFTER, "0.5.0");
        (s.state, s.reasons.iter().map(|r| r.code).collect())
    }

    #[test]
    fn states_follow_links_origin_edges_and_versions() {
        let mut live = TunnelLive {
            links: vec![link("e1", Some(true), 1, "netbore/0.5.0")],
            ..Default::default()
        };
        assert_eq!(state(&live), (TunnelState::Ready, vec![]));
        live.links[0].origin.as_mut().unwrap().healthy = false;
        assert_eq!(
            state(&live),
            (
                TunnelState::Degraded,
                vec![StatusReasonCode::OriginUnreachable]
            )
        );
        let live = TunnelLive {
            links: vec![link("e1", None, 2, "netbore/0.2.9")],
            ..Default::default()
        };
        assert_eq!(
            state(&live),
            (
                TunnelState::Degraded,
                vec![
                    StatusReasonCode::FewerEdgesThanRequested,
                    StatusReasonCode::AgentOutdated
                ]
            )
        );
        // Two links to one edge do not make two edges.
        let mut a = link("e1", None, 2, "netbore/0.5.0");
        a.link_id = "e1-2".into();
        let live = TunnelLive {
            links: vec![link("e1", None, 2, "netbore/0.5.0"), a],
            ..Default::default()
        };
        assert_eq!(
            state(&live).1,
            vec![StatusReasonCode::FewerEdgesThanRequested]
        );
    }

    #[test]
    fn no_link_is_degraded_then_offline_and_disabled_wins() {
        let recent = TunnelLive {
            last_seen: Some(NOW - 5),
            ..Default::default()
        };
        assert_eq!(
            state(&recent),
            (TunnelState::Degraded, vec![StatusReasonCode::NoLink])
        );
        let old = TunnelLive {
            last_seen: Some(NOW - DEFAULT_OFFLINE_AFTER.as_secs()),
            ..Default::default()
        };
        assert_eq!(
            state(&old),
            (TunnelState::Offline, vec![StatusReasonCode::NoLink])
        );
        assert_eq!(state(&TunnelLive::default()).0, TunnelState::Offline);
        let s = compute(&recent, true, NOW, DEFAULT_OFFLINE_AFTER, "0.5.0");
        assert_eq!(s.state, TunnelState::Disabled);
    }

    #[test]
    fn stale_fields_are_ignored_and_traffic_sums_over_edges() {
        let fresh = link("e1", Some(true), 1, "netbore/0.5.0");
        let mut stale = link("e2", Some(false), 1, "netbore/0.5.0");
        stale.seen_at = NOW - LINK_STATE_TTL.as_secs() - 1;
        let t = |r: u64, e: u64| {
            serde_json::to_string(&TrafficEntry {
                requests_5m: r,
                errors_5m: e,
                seen_at: NOW,
            })
            .unwrap()
        };
        let fields = vec![
            (
                "link/e1/a".to_string(),
                serde_json::to_string(&fresh).unwrap(),
            ),
            (
                "link/e2/b".to_string(),
                serde_json::to_string(&stale).unwrap(),
            ),
            ("traffic/e1".to_string(), t(10, 2)),
            ("traffic/e2".to_string(), t(5, 1)),
            ("last_seen".to_string(), (NOW - 3).to_string()),
            ("link/e3/c".to_string(), "not json".to_string()),
        ];
        let live = TunnelLive::from_fields(&fields, NOW);
        assert_eq!(live.links, vec![fresh]);
        let s = compute(&live, false, NOW, DEFAULT_OFFLINE_AFTER, "0.5.0");
        assert_eq!(
            (s.state, s.requests_5m, s.errors_5m),
            (TunnelState::Ready, 15, 3)
        );
        assert_eq!(s.links[0].edge_id, "e1");
        assert!(s.origin.unwrap().healthy);
    }

    #[test]
    fn versions_compare_by_major_and_minor() {
        assert!(!is_outdated("netbore/0.5.0", "0.5.0"));
        assert!(!is_outdated("netbore/0.3.7", "0.5.0"));
        assert!(is_outdated("netbore/0.2.0", "0.5.0"));
        assert!(is_outdated("netbore/1.9.0", "2.0.0"));
        assert!(!is_outdated("curl", "0.5.0"));
        assert!(valid_event_id("aud_00000000000000000001_0a0b0c0d"));
        assert!(!valid_event_id("aud_'; drop table"));
        assert!(!valid_event_id("tun_1"));
    }
}
