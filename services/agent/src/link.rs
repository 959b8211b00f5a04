//! One agent → edge connection: WebSocket, hello, welcome, then a multiplexer.

use std::sync::Arc;
use std::time::Duration;

use netbore_mux::{Incoming, Mux, MuxConfig, Role, WsLink, ws_config};
use netbore_protocol::handshake::{CAP_H2, CAP_UPGRADE, MAX_HANDSHAKE_LEN, RefusalCode};
use netbore_protocol::ws::WsMessage;
use netbore_protocol::{AgentHello, EdgeReply, PROTOCOL_VERSION, Welcome};
use tokio_tungstenite::Connector;
use tokio_util::sync::CancellationToken;

/// Time allowed for TCP, TLS, the WebSocket upgrade and the hello/welcome exchange.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent pings its edge at least this often, whatever interval the edge announces,
/// and takes the link for dead after [`netbore_mux::HEARTBEAT_MISSES`] such intervals
/// of silence: a frozen or partitioned edge is left within 15-20 s (it was 45-60 s
/// with the edge's 15 s interval), for a ping of a few bytes every 5 s per link.
pub const AGENT_HEARTBEAT_MAX: Duration = Duration::from_secs(5);

/// Largest WebSocket message accepted from an edge (a batch of frames plus one frame).
pub const MAX_EDGE_MESSAGE: usize = 1024 * 1024;

/// Why connecting to an edge failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Network, TLS or WebSocket failure; try the next candidate.
    #[error("could not connect to {url}: {reason}")]
    Connect {
        /// Edge URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The edge refused the hello.
    #[error("edge {url} refused the tunnel ({code:?}): {message}")]
    Refused {
        /// Edge URL.
        url: String,
        /// Refusal code.
        code: RefusalCode,
        /// The edge's explanation.
        message: String,
        /// Whether retrying may help.
        retryable: bool,
    },
}

/// A live link.
pub struct Link {
    /// The multiplexer.
    pub mux: Mux,
    /// Streams the edge opens.
    pub incoming: Incoming,
    /// The edge's welcome.
    pub welcome: Welcome,
}

/// Connects to `url` (ws:// or wss://) and completes the handshake.
pub async fn connect(
    url: &str,
    token: &str,
    tunnel_id: &str,
    instance_id: &str,
    tls: Arc<rustls::ClientConfig>,
    cancel: CancellationToken,
) -> Result<Link, LinkError> {
    let fail = |reason: String| LinkError::Connect {
        url: url.to_string(),
        reason,
    };
    let fut = async {
        let (upgraded, _) = tokio_tungstenite::connect_async_tls_with_config(
            url,
            Some(ws_config(MAX_EDGE_MESSAGE)),
            true,
            Some(Connector::Rustls(tls)),
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
        // From here on the link's own framing (netbore_mux::link): the edge sends
        // nothing before our hello, so tungstenite holds nothing read past the 101.
        let mut ws = WsLink::after_upgrade(upgraded, true, MAX_EDGE_MESSAGE);
        let hello = AgentHello {
            version: PROTOCOL_VERSION,
            token: token.to_string(),
            tunnel_id: tunnel_id.to_string(),
            capabilities: vec![CAP_H2.into(), CAP_UPGRADE.into()],
            agent: format!("netbore/{}", env!("CARGO_PKG_VERSION")),
            instance_id: instance_id.to_string(),
        };
        ws.send_text(&serde_json::to_string(&hello).expect("serializable"))
            .await
            .map_err(|e| fail(format!("sending hello: {e}")))?;
        let reply = loop {
            match ws.recv().await {
                Ok(Some(WsMessage::Text(t))) if t.len() <= MAX_HANDSHAKE_LEN => {
                    break serde_json::from_slice::<EdgeReply>(&t)
                        .map_err(|e| fail(format!("edge sent an invalid handshake reply: {e}")))?;
                }
                Ok(Some(WsMessage::Pong(_))) => continue,
                Ok(Some(WsMessage::Close(_)) | None) => {
                    return Err(fail("edge closed during the handshake".into()));
                }
                Ok(Some(other)) => {
                    return Err(fail(format!(
                        "edge sent {} instead of a welcome",
                        match other {
                            WsMessage::Text(t) => format!("a text message of {} bytes", t.len()),
                            WsMessage::Binary(b) =>
                                format!("a binary message of {} bytes", b.len()),
                            _ => "a control frame".to_string(),
                        }
                    )));
                }
                Err(e) => return Err(fail(format!("reading the welcome: {e}"))),
            }
        };
        match reply {
            EdgeReply::Refused(r) => Err(LinkError::Refused {
                url: url.to_string(),
                code: r.code,
                message: r.message,
                retryable: r.retryable,
            }),
            EdgeReply::Welcome(w) => {
                let (mux, incoming) = Mux::start(
                    ws,
                    MuxConfig {
                        role: Role::Agent,
                        limits: w.limits,
                        heartbeat_interval: Duration::from_millis(w.heartbeat_interval_ms.max(100))
                            .min(AGENT_HEARTBEAT_MAX),
                        label: w.session_id.clone(),
                        write_stall_timeout: netbore_mux::DEFAULT_WRITE_STALL_TIMEOUT,
                    },
                    cancel,
                );
                Ok(Link {
                    mux,
                    incoming: incoming.expect("agent role yields incoming streams"),
                    welcome: w,
                })
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fut)
        .await
        .map_err(|_| fail(format!("no welcome within {CONNECT_TIMEOUT:?}")))?
}
