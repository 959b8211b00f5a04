//! Raw TCP and TLS passthrough tunnels (issue 17): `netbore tcp 5432`, `netbore tls 8443`.
//!
//! The tunnel is created with `kind` `tcp` (control gives it a public port, the same on
//! every edge and kept for the tunnel's life) or `tls` (edges route it by the SNI of
//! the ClientHello and never terminate it: the origin holds its own certificate). Each
//! connection a client opens arrives as one stream (a REQUEST_HEAD with method
//! `CONNECT`, see `docs/protocol.md`); the agent connects to the origin, answers 200
//! and carries the bytes both ways with the link's flow control, half-close included.
//!
//! [`run_tcp`] is the one entry point: the CLI's `tcp` and `tls` commands call it, and
//! so can a config file's `kind = "tcp"` tunnels.

use std::sync::Arc;

use http::Uri;
use netbore_mux::IncomingStream;
use netbore_protocol::{ResetCode, ResponseHead};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics::{AgentMetrics, OriginErrorKind};
use crate::{AgentConfig, AgentError, AgentEvent};

/// What a raw tunnel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpKind {
    /// Any TCP protocol, on a public port of its own.
    Tcp,
    /// TLS, routed by SNI on the edges' TLS port and passed through untouched.
    Tls,
}

impl TcpKind {
    /// The `kind` sent to control.
    pub fn as_str(self) -> &'static str {
        match self {
            TcpKind::Tcp => netbore_tokens::KIND_TCP,
            TcpKind::Tls => netbore_tokens::KIND_TLS,
        }
    }
}

/// Parses a raw tunnel's origin: `5432` (on 127.0.0.1) or `HOST:PORT`, as
/// `tcp://HOST:PORT`.
pub fn parse_target(s: &str) -> Result<Uri, String> {
    let hostport = if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        format!("127.0.0.1:{s}")
    } else if let Some((scheme, _)) = s.split_once("://") {
        return Err(format!(
            "'{s}' uses {scheme}://; a TCP or TLS tunnel's origin is a port like 5432 or HOST:PORT"
        ));
    } else {
        s.to_string()
    };
    let uri: Uri = format!("tcp://{hostport}")
        .parse()
        .map_err(|e| format!("'{s}' is not a port or HOST:PORT: {e}"))?;
    match uri.port_u16() {
        Some(p) if p > 0 && uri.host().is_some_and(|h| !h.is_empty()) => Ok(uri),
        _ => Err(format!(
            "'{s}' needs a port from 1 to 65535; give a port like 5432 or HOST:PORT like db:5432"
        )),
    }
}

/// Runs a TCP or TLS passthrough tunnel to the origin `cfg.origin.url` (`tcp://HOST:PORT`,
/// see [`parse_target`]) until `shutdown` fires or a fatal error, with the same links,
/// reconnects, saved state and events as [`crate::run`]. The public address is in the
/// [`AgentEvent::Live`] URL (`tcp://NAME.DOMAIN:PORT` for TCP).
pub async fn run_tcp(
    cfg: AgentConfig,
    kind: TcpKind,
    metrics: Arc<AgentMetrics>,
    events: mpsc::UnboundedSender<AgentEvent>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    crate::run_kind(cfg, Some(kind), metrics, None, events, shutdown).await
}

/// Serves one raw stream: connect to `origin` (within `timeout`), answer 200, bridge.
pub(crate) async fn serve(
    s: IncomingStream,
    origin: &Uri,
    timeout: std::time::Duration,
    metrics: &AgentMetrics,
) {
    let IncomingStream {
        head,
        mut sender,
        receiver,
        ..
    } = s;
    if head.method != "CONNECT" {
        sender.reset(
            ResetCode::Protocol,
            "this agent runs a TCP tunnel; it takes only CONNECT streams",
        );
        return;
    }
    let addr = format!(
        "{}:{}",
        origin.host().unwrap_or("127.0.0.1"),
        origin.port_u16().unwrap_or(0)
    );
    let tcp = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            debug!(origin = %addr, error = %e, "origin unreachable");
            metrics.origin_error(OriginErrorKind::Unreachable);
            sender.reset(ResetCode::OriginUnreachable, &format!("connect: {e}"));
            return;
        }
        Err(_) => {
            metrics.origin_error(OriginErrorKind::Timeout);
            sender.reset(ResetCode::OriginTimeout, "connect timed out");
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if sender
        .send_response(
            ResponseHead {
                status: 200,
                headers: Vec::new(),
            },
            false,
        )
        .is_err()
    {
        return;
    }
    netbore_mux::bridge(tcp, sender, receiver).await;
}
