//! `netbore start`: the config file's tunnels in one process, each with its own agent
//! (its own links, state and origin), so a tunnel whose origin fails, or that control
//! refuses, leaves the others serving.

use std::sync::Arc;

use netbore_agent::metrics::AgentMetrics;
use netbore_agent::{AgentError, AgentEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Kind, TunnelPlan};

/// An event of one tunnel of the file.
#[derive(Debug, Clone)]
pub struct TunnelEvent {
    /// The tunnel's key in the file.
    pub tunnel: String,
    /// What happened.
    pub event: AgentEvent,
}

/// Runs one tunnel until `shutdown` or a fatal error. THE one place that dispatches on
/// the kind: a runner for another kind is wired here.
pub async fn run_tunnel(
    plan: TunnelPlan,
    metrics: Arc<AgentMetrics>,
    events: mpsc::UnboundedSender<AgentEvent>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    use netbore_agent::tcp::{TcpKind, run_tcp};
    match plan.kind {
        Kind::Http => netbore_agent::run_with_metrics(plan.agent, metrics, events, shutdown).await,
        Kind::Tcp => run_tcp(plan.agent, TcpKind::Tcp, metrics, events, shutdown).await,
        Kind::Tls => run_tcp(plan.agent, TcpKind::Tls, metrics, events, shutdown).await,
    }
}

/// Whether this build can run `kind`; `config check` and `start` refuse before
/// anything starts.
pub fn supported(kind: Kind) -> Result<(), AgentError> {
    match kind {
        Kind::Http | Kind::Tcp | Kind::Tls => Ok(()),
    }
}

/// How one tunnel ended.
#[derive(Debug)]
pub struct Outcome {
    /// The tunnel's key.
    pub tunnel: String,
    /// Its result.
    pub result: Result<(), AgentError>,
}

/// Runs every plan at once; events of all of them arrive on `events`, tagged with the
/// tunnel. A tunnel that stops with an error is reported on `events` and the others go
/// on; this returns once all have stopped (on `shutdown`, or each by its own error).
pub async fn run_all(
    plans: Vec<TunnelPlan>,
    metrics: Arc<AgentMetrics>,
    events: mpsc::UnboundedSender<TunnelEvent>,
    shutdown: CancellationToken,
) -> Vec<Outcome> {
    let mut set = tokio::task::JoinSet::new();
    for plan in plans {
        let key = plan.key.clone();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let out = events.clone();
        let k = key.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let _ = out.send(TunnelEvent {
                    tunnel: k.clone(),
                    event,
                });
            }
        });
        let metrics = metrics.clone();
        let shutdown = shutdown.child_token();
        let span = tracing::info_span!("tunnel", tunnel = %key);
        set.spawn(tracing::Instrument::instrument(
            async move {
                let result = run_tunnel(plan, metrics, tx, shutdown).await;
                if let Err(e) = &result {
                    tracing::error!(error = %e, "this tunnel stopped; the others keep serving");
                }
                Outcome {
                    tunnel: key,
                    result,
                }
            },
            span,
        ));
    }
    let mut outcomes = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(o) = r {
            outcomes.push(o);
        }
    }
    outcomes
}
