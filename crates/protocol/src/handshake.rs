//! The JSON handshake that opens every agent connection.
//!
//! The agent sends one text WebSocket message holding an [`AgentHello`]; the edge
//! answers with one text message holding an [`EdgeReply`]: either a [`Welcome`] with
//! the session id, the heartbeat interval and the [`Limits`] both sides then obey, or a
//! [`Refusal`] with a stable code and a message saying what to do, after which the edge
//! closes the connection. Only then do binary frames flow.

use serde::{Deserialize, Serialize};

/// Largest handshake message either side accepts, in bytes.
pub const MAX_HANDSHAKE_LEN: usize = 16 * 1024;

/// Capability: the agent can speak HTTP/2 to its origin (needed for gRPC and trailers).
pub const CAP_H2: &str = "h2";
/// Capability: the agent can carry upgraded (WebSocket) streams.
pub const CAP_UPGRADE: &str = "upgrade";

/// Capability an edge lists in its [`Welcome`]: it takes AGENT_STATUS frames (origin
/// health). An agent sends them only to an edge that lists it, so older edges, which
/// treat an unknown frame type as a connection error, never see one.
pub const CAP_AGENT_STATUS: &str = "agent_status";

/// Agent → edge, first message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentHello {
    /// Protocol version the agent speaks ([`crate::PROTOCOL_VERSION`]).
    pub version: u32,
    /// The ephemeral token control issued for this tunnel.
    pub token: String,
    /// The tunnel the agent serves; must equal the token's subject.
    pub tunnel_id: String,
    /// Optional features the agent supports (see the `CAP_*` constants).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Free-form agent identification for logs, e.g. `netbore/0.1.0`.
    #[serde(default)]
    pub agent: String,
    /// The agent process's instance id (random, kept in its state directory), so an
    /// edge can tell two agents running on one tunnel credential apart and report it
    /// ([`Welcome::warnings`]). Left out by agents that have none; at most
    /// [`MAX_INSTANCE_ID_LEN`] bytes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance_id: String,
}

/// Longest instance id an edge takes (longer ones are refused as a malformed hello).
pub const MAX_INSTANCE_ID_LEN: usize = 64;

impl std::fmt::Display for AgentHello {
    // Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "hello v{} tunnel={} agent={} caps={:?}",
            self.version, self.tunnel_id, self.agent, self.capabilities
        )
    }
}

/// Numbers both sides obey for the rest of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest frame payload either side may send.
    pub max_frame_len: u32,
    /// Send credit each new stream starts with, in each direction.
    pub initial_stream_window: u32,
    /// Send credit the connection starts with, in each direction.
    pub connection_window: u32,
    /// Streams the edge will have open at once on this connection.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_frame_len: crate::frame::DEFAULT_MAX_FRAME_LEN as u32,
            initial_stream_window: crate::flow::DEFAULT_STREAM_WINDOW,
            connection_window: crate::flow::DEFAULT_CONNECTION_WINDOW,
            max_concurrent_streams: 1024,
        }
    }
}

/// Edge → agent when the hello is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Protocol version the edge will speak.
    pub version: u32,
    /// Identifies this connection in both sides' logs.
    pub session_id: String,
    /// The edge's id, for logs and to tell distinct edges apart.
    pub edge_id: String,
    /// How often each side sends a ping when the link is otherwise quiet.
    pub heartbeat_interval_ms: u64,
    /// Limits for the connection.
    pub limits: Limits,
    /// Things the agent's user should know, each a sentence naming the fix (e.g. two
    /// instances running on one tunnel credential). The agent prints each as a
    /// warning; the link is accepted all the same. Left out when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Optional features the edge takes (see the `CAP_*` constants), so the agent sends
    /// nothing an older edge would refuse. Left out when empty; older agents ignore it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

/// Stable reasons for refusing a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// The hello was not valid JSON of the expected shape.
    MalformedHello,
    /// The agent speaks a protocol version the edge does not.
    UnsupportedVersion,
    /// The token failed verification (expired, wrong key, wrong audience, ...).
    InvalidToken,
    /// The token is for another tunnel than the one named.
    TunnelMismatch,
    /// The edge is draining and takes no new agents; try another candidate.
    Draining,
    /// The edge cannot register the tunnel right now (registry unreachable); retry.
    Unavailable,
    /// Too many connections for this tunnel or this edge, or too many links or
    /// handshakes with one token; retry later.
    LimitReached,
    /// The token's tunnel was deleted; control will not issue another for it.
    TunnelDeleted,
    /// Another tunnel (a newer owner of the name) holds the name with a live link; an
    /// older tunnel never displaces it. Retry: once the other tunnel is gone (its
    /// deletion reaches the edge), the link is taken.
    NameInUse,
    /// The tunnel credential the token was issued for was revoked; control refuses it
    /// too. Not retryable: run the agent with a new credential.
    CredentialRevoked,
    /// The tunnel is disabled by its owner. Retryable: control refuses it too
    /// (`tunnel_disabled`) until the owner enables it; the agent backs off and retries.
    TunnelDisabled,
}

/// Edge → agent when the hello is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Stable machine-readable reason.
    pub code: RefusalCode,
    /// What happened and what to do about it.
    pub message: String,
    /// True when the same hello may succeed later or elsewhere (draining, unavailable).
    pub retryable: bool,
}

/// Edge → agent, the handshake answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EdgeReply {
    /// Accepted.
    Welcome(Welcome),
    /// Refused; the edge closes the connection after sending this.
    Refused(Refusal),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_display_never_shows_the_token() {
        let h = AgentHello {
            version: 1,
            token: "secret.jwt.value".into(),
            tunnel_id: "t1".into(),
            capabilities: vec![],
            agent: "netbore/test".into(),
            instance_id: String::new(),
        };
        assert!(!h.to_string().contains("secret"));
    }

    #[test]
    fn unknown_hello_fields_are_rejected() {
        let r: Result<AgentHello, _> =
            serde_json::from_str(r#"{"version":1,"token":"t","tunnel_id":"x","evil":true}"#);
        assert!(r.is_err());
    }

    #[test]
    fn reply_is_tagged() {
        let r = EdgeReply::Refused(Refusal {
            code: RefusalCode::InvalidToken,
            message: "m".into(),
            retryable: false,
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains(r#""type":"refused""#), "{s}");
        assert!(s.contains(r#""code":"invalid_token""#), "{s}");
        assert_eq!(serde_json::from_str::<EdgeReply>(&s).unwrap(), r);
    }
}
