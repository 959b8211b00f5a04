//! What one control replica tells the others and its edges, as one type.
//!
//! Replicas share these over Redis pub/sub and each replica's edge links turn them into
//! `EdgeCommand`s. On the wire (the pub/sub payload) each is one string: a deleted
//! tunnel is its id (`tun_…`, the only form earlier versions sent), the others carry a
//! prefix (`cred:`, `drain:`, `undrain:`), so replicas of mixed versions still agree on
//! deletions.

/// One event on control's feed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ControlEvent {
    /// The tunnel was deleted: its links close and its tokens are refused.
    TunnelDeleted(String),
    /// The tunnel credential (its id, `tcr_…`) was revoked: the links that used it
    /// close and its tokens are refused.
    CredentialRevoked(String),
    /// The edge (its id) should drain.
    DrainEdge(String),
    /// The edge (its id) should take agents again.
    UndrainEdge(String),
    /// The tunnel was disabled by its owner: its links close, its tokens are refused
    /// and viewers of its name are told so, until it is enabled.
    TunnelDisabled {
        /// Tunnel id.
        tunnel_id: String,
        /// Its name (what viewers ask for).
        name: String,
    },
    /// The tunnel was enabled again.
    TunnelEnabled {
        /// Tunnel id.
        tunnel_id: String,
        /// Its name.
        name: String,
    },
}

const CREDENTIAL: &str = "cred:";
const DRAIN: &str = "drain:";
const UNDRAIN: &str = "undrain:";
const DISABLE: &str = "disable:";
const ENABLE: &str = "enable:";

impl ControlEvent {
    /// The event as it travels between replicas.
    pub fn encode(&self) -> String {
        match self {
            ControlEvent::TunnelDeleted(id) => id.clone(),
            ControlEvent::CredentialRevoked(id) => format!("{CREDENTIAL}{id}"),
            ControlEvent::DrainEdge(id) => format!("{DRAIN}{id}"),
            ControlEvent::UndrainEdge(id) => format!("{UNDRAIN}{id}"),
            ControlEvent::TunnelDisabled { tunnel_id, name } => {
                format!("{DISABLE}{tunnel_id}:{name}")
            }
            ControlEvent::TunnelEnabled { tunnel_id, name } => {
                format!("{ENABLE}{tunnel_id}:{name}")
            }
        }
    }

    /// Reads an event as [`ControlEvent::encode`] writes it. Anything without a known
    /// prefix is a deleted tunnel's id (what earlier versions sent).
    pub fn decode(s: &str) -> ControlEvent {
        if let Some(id) = s.strip_prefix(CREDENTIAL) {
            ControlEvent::CredentialRevoked(id.to_string())
        } else if let Some(id) = s.strip_prefix(UNDRAIN) {
            ControlEvent::UndrainEdge(id.to_string())
        } else if let Some((tunnel_id, name)) =
            s.strip_prefix(DISABLE).and_then(|r| r.split_once(':'))
        {
            ControlEvent::TunnelDisabled {
                tunnel_id: tunnel_id.to_string(),
                name: name.to_string(),
            }
        } else if let Some((tunnel_id, name)) =
            s.strip_prefix(ENABLE).and_then(|r| r.split_once(':'))
        {
            ControlEvent::TunnelEnabled {
                tunnel_id: tunnel_id.to_string(),
                name: name.to_string(),
            }
        } else if let Some(id) = s.strip_prefix(DRAIN) {
            ControlEvent::DrainEdge(id.to_string())
        } else {
            ControlEvent::TunnelDeleted(s.to_string())
        }
    }

    /// True for the events edges must remember and refuse tokens for (a deletion, a
    /// revoked credential), which control replays to edges that link later.
    pub fn is_revocation(&self) -> bool {
        matches!(
            self,
            ControlEvent::TunnelDeleted(_) | ControlEvent::CredentialRevoked(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_round_trips_and_a_bare_id_is_a_deletion() {
        for e in [
            ControlEvent::TunnelDeleted("tun_0123".into()),
            ControlEvent::CredentialRevoked("tcr_42".into()),
            ControlEvent::DrainEdge("edge-1".into()),
            ControlEvent::UndrainEdge("edge-1".into()),
            ControlEvent::TunnelDisabled {
                tunnel_id: "tun_1".into(),
                name: "hub-7.pod".into(),
            },
            ControlEvent::TunnelEnabled {
                tunnel_id: "tun_1".into(),
                name: "hub".into(),
            },
        ] {
            assert_eq!(ControlEvent::decode(&e.encode()), e);
        }
        assert_eq!(
            ControlEvent::decode("tun_abc"),
            ControlEvent::TunnelDeleted("tun_abc".into())
        );
        // "undrain:" must not read as a drain of "un…", nor as a deletion.
        assert_eq!(
            ControlEvent::decode("undrain:e"),
            ControlEvent::UndrainEdge("e".into())
        );
        assert!(!ControlEvent::UndrainEdge("e".into()).is_revocation());
        assert!(!ControlEvent::DrainEdge("e".into()).is_revocation());
        assert!(ControlEvent::CredentialRevoked("c".into()).is_revocation());
    }
}
