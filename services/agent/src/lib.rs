//! The Netbore agent: keeps a tunnel to a local service alive.
//!
//! [`run`] asks control for the tunnel (with the recreate token saved from an earlier
//! run, so the name stays the same), connects to the candidate edges in order, serves
//! every stream the edge opens against the origin, and when the link drops, reconnects
//! with exponential backoff and jitter, fetching a fresh ephemeral token each time. On
//! go-away it opens a new link at once and lets the old one finish its streams. On
//! shutdown it refuses new streams and finishes open ones within the grace period.
//!
//! Credentials: the management token (`--token`) creates the tunnel or claims its name;
//! once the tunnel exists every reconnect uses its recreate token alone, so a management
//! token that expires later never stops the agent. A refused recreate token never
//! deletes the saved state: with `--name` the agent then tries the management token and
//! otherwise stops with an error naming the fix; a quick tunnel takes a new name and
//! says so ([`AgentEvent::UrlChanged`]).
//!
//! With a tunnel credential (`--tunnel-token nbt_…`) the agent needs no other secret:
//! every create, the first and each reconnect's, shows the credential; nothing is saved
//! but the instance id ([`state::instance_id`]). A revoked credential stops the agent
//! with `credential_revoked` (no retry).

pub mod access;
pub mod inspect;
pub mod link;
pub mod metrics;
pub mod origin;
pub mod state;
pub mod tcp;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use netbore_mux::Mux;
use netbore_protocol::ResetCode;
use netbore_protocol::handshake::RefusalCode;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::link::LinkError;
use crate::metrics::AgentMetrics;
use crate::origin::{Origin, OriginConfig};
use crate::state::{Saved, StateStore};
use netbore_api::types::CreateTunnelRequest;
use netbore_api::{ControlClient, ControlError, ErrorCode};

/// First reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A link that lived this long resets the backoff.
pub const STABLE_LINK: Duration = Duration::from_secs(10);
/// Longest wait for queued frames to be written when the agent stops.
pub const FLUSH_ON_EXIT: Duration = Duration::from_secs(2);
/// Default grace period for open streams on shutdown.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Control's REST base URL.
    pub control_url: String,
    /// The origin.
    pub origin: OriginConfig,
    /// A name to claim.
    pub name: Option<String>,
    /// A management token: creates the tunnel (or claims its name); reconnects use the
    /// tunnel's recreate token instead.
    pub token: Option<String>,
    /// Where the recreate token is kept; `None` keeps nothing.
    pub state_dir: Option<std::path::PathBuf>,
    /// Extra CA (PEM) trusted for `wss://` edges.
    pub edge_ca_file: Option<std::path::PathBuf>,
    /// Accept any edge certificate (development only).
    pub edge_insecure: bool,
    /// Grace period for open streams on shutdown.
    pub drain_grace: Duration,
    /// Links to keep, each to a distinct edge.
    pub connections: usize,
    /// Who may reach the tunnel (default: public); enforced by the edges.
    pub access: netbore_tokens::access::AccessPolicy,
    /// The tunnel's own limits, on top of the edges'.
    pub limits: netbore_tokens::access::TunnelLimits,
    /// A tunnel credential (`nbt_…`): runs its tunnel with no other secret; every
    /// create shows it, and no recreate token is kept.
    pub tunnel_token: Option<String>,
    /// Delete the tunnel at control (with its recreate token) when the agent stops
    /// cleanly, and forget the saved state: what `netbore http` does for a quick tunnel
    /// (no `--name`) unless `--keep` is given.
    pub delete_on_exit: bool,
    /// The path the origin probe sends `HEAD` to (default `/`).
    pub health_path: String,
    /// How often the origin is probed (default [`DEFAULT_HEALTH_INTERVAL`]).
    pub health_interval: Duration,
}

/// Default interval between origin probes.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(10);
/// Default path of the origin probe.
pub const DEFAULT_HEALTH_PATH: &str = "/";

/// What the agent reports as it runs (printed by the CLI, as text or JSON lines).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AgentEvent {
    /// The tunnel is live: viewers can use `url`.
    Live {
        /// Public URL.
        url: String,
        /// Tunnel id.
        tunnel_id: String,
        /// Public name.
        name: String,
        /// Edge serving it.
        edge_id: String,
        /// Origin forwarded to.
        origin: String,
        /// Links to edges now up (this one included).
        links: usize,
        /// The edges those links reach.
        edges: Vec<String>,
    },
    /// A link dropped (or could not be made); retrying after `retry_in_ms`.
    Reconnecting {
        /// Why.
        reason: String,
        /// Delay before the next attempt.
        retry_in_ms: u64,
        /// Links to edges still up.
        links: usize,
        /// The edges those links reach.
        edges: Vec<String>,
    },
    /// The public URL changed (a quick tunnel whose recreate token was refused got a
    /// new name); the next `Live` carries the new URL. Never happens with `--name`.
    UrlChanged {
        /// The URL announced before.
        old_url: String,
        /// The new URL.
        url: String,
        /// The new name.
        name: String,
        /// Why the old name could not be kept.
        reason: String,
    },
    /// Something the user should know; the tunnel keeps serving (e.g. an edge saw
    /// another agent instance linked with the same tunnel credential).
    Warning {
        /// What, and what to do about it.
        message: String,
    },
    /// The agent stopped.
    Stopped,
}

/// A reason the agent cannot go on without the user.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Control or the edge refused in a way retrying cannot fix.
    #[error("{message}")]
    Fatal {
        /// Stable code.
        code: String,
        /// What happened and what to do.
        message: String,
    },
}

struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
    /// The next delay: exponential, with up to 50 % random jitter so agents that lost
    /// the same edge do not return in lockstep.
    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        let jitter = rand::random::<f64>() * 0.5;
        base.mul_f64(1.0 + jitter).min(BACKOFF_MAX)
    }
}

/// What every link slot shares.
struct Ctx {
    cfg: AgentConfig,
    origin: Origin,
    tls: Arc<rustls::ClientConfig>,
    control: ControlClient,
    store: StateStore,
    tracker: TaskTracker,
    stopping: Arc<AtomicBool>,
    events: mpsc::UnboundedSender<AgentEvent>,
    /// Edge ids held by a slot, so each slot keeps a distinct edge.
    held: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// Live links now.
    links: std::sync::atomic::AtomicUsize,
    /// Every link opened, for the final flush.
    muxes: parking_lot::Mutex<Vec<Mux>>,
    /// Slot 0's recreate token, published once its link is live: the other slots
    /// serve the same tunnel with it.
    tunnel: tokio::sync::watch::Sender<Option<String>>,
    /// Slot 0's newest recreate token, set on every create (before the link is up).
    current: parking_lot::Mutex<Option<String>>,
    /// Slot 0's recreate token (this run's or the saved one) was refused: the next
    /// create goes without it (with the management token, if any).
    recreate_refused: AtomicBool,
    /// Why it was refused, for the messages that follow.
    refused_reason: parking_lot::Mutex<Option<String>>,
    /// The public URL last announced (this run's, or the saved state's).
    announced: parking_lot::Mutex<Option<String>>,
    /// Stops every slot (shutdown, or a fatal error).
    stop: CancellationToken,
    /// What the agent counts.
    metrics: Arc<AgentMetrics>,
    fatal: parking_lot::Mutex<Option<AgentError>>,
    /// This agent's instance id, sent in every hello.
    instance_id: String,
    /// Links whose edge takes AGENT_STATUS frames (its welcome lists the capability).
    status_links: parking_lot::Mutex<Vec<Mux>>,
}

fn fatal(code: &str, message: String) -> AgentError {
    AgentError::Fatal {
        code: code.into(),
        message,
    }
}

/// Runs the agent until `shutdown` fires or a fatal error. It keeps up to
/// `cfg.connections` links, each to a distinct edge; new streams arrive on whichever
/// link the edge a viewer reached holds.
pub async fn run(
    cfg: AgentConfig,
    events: mpsc::UnboundedSender<AgentEvent>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    run_with_metrics(cfg, Arc::default(), events, shutdown).await
}

/// Like [`run`], counting into `metrics` (served by the CLI at `/metrics`).
pub async fn run_with_metrics(
    cfg: AgentConfig,
    metrics: Arc<AgentMetrics>,
    events: mpsc::UnboundedSender<AgentEvent>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    run_kind(cfg, None, metrics, None, events, shutdown).await
}

/// Like [`run_with_metrics`], telling `observer` about every request (the console
/// and the inspector, [`inspect`]).
pub async fn run_observed(
    cfg: AgentConfig,
    metrics: Arc<AgentMetrics>,
    observer: Option<Arc<inspect::Observer>>,
    events: mpsc::UnboundedSender<AgentEvent>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    run_kind(cfg, None, metrics, observer, events, shutdown).await
}

/// [`run_observed`] for an HTTP tunnel (`raw` `None`) or a raw one
/// ([`tcp::run_tcp`]).
pub(crate) async fn run_kind(
    cfg: AgentConfig,
    raw: Option<tcp::TcpKind>,
    metrics: Arc<AgentMetrics>,
    observer: Option<Arc<inspect::Observer>>,
    events: mpsc::UnboundedSender<AgentEvent>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let origin = Origin::new(cfg.origin.clone())
        .map_err(|e| fatal("origin_config", e))?
        .with_metrics(metrics.clone())
        .with_raw(raw)
        .with_observer(observer);
    let tls = Arc::new(
        tls::client_config(cfg.edge_ca_file.as_deref(), cfg.edge_insecure)
            .map_err(|e| fatal("tls_config", e))?,
    );
    let instance_id = state::instance_id(cfg.state_dir.as_deref());
    // With a credential nothing is saved: the credential gets the tunnel back.
    let store = StateStore::for_tunnel(
        cfg.state_dir.clone().filter(|_| cfg.tunnel_token.is_none()),
        &cfg.control_url,
        cfg.name.as_deref(),
        &origin.url().to_string(),
    );
    let announced = store
        .load()
        .filter(|s| cfg.name.as_ref().is_none_or(|n| *n == s.name))
        .and_then(|s| s.public_url);
    let ctx = Arc::new(Ctx {
        control: ControlClient::new(&cfg.control_url),
        store,
        current: Default::default(),
        recreate_refused: AtomicBool::new(false),
        refused_reason: Default::default(),
        announced: parking_lot::Mutex::new(announced),
        tracker: TaskTracker::new(),
        stopping: Arc::new(AtomicBool::new(false)),
        events,
        held: Default::default(),
        links: Default::default(),
        muxes: Default::default(),
        tunnel: tokio::sync::watch::Sender::new(None),
        stop: shutdown.child_token(),
        fatal: Default::default(),
        metrics,
        origin,
        tls,
        cfg,
        instance_id,
        status_links: Default::default(),
    });
    let probe = tokio::spawn(probe_origin(ctx.clone()).instrument(info_span!("origin_probe")));
    let mut slots = tokio::task::JoinSet::new();
    for i in 0..ctx.cfg.connections.max(1) {
        slots.spawn(slot(ctx.clone(), i).instrument(info_span!("slot", slot = i)));
    }
    ctx.stop.cancelled().await;

    // Drain: refuse new streams, let open ones finish within the grace period.
    ctx.stopping.store(true, Ordering::Release);
    ctx.tracker.close();
    if tokio::time::timeout(ctx.cfg.drain_grace, ctx.tracker.wait())
        .await
        .is_err()
    {
        warn!("drain grace period over; closing open streams");
    }
    slots.shutdown().await;
    probe.abort();
    let muxes: Vec<Mux> = ctx.muxes.lock().drain(..).collect();
    for m in muxes {
        // Let the last frames of finished streams reach the edge before we go.
        m.close_and_flush("agent stopped", FLUSH_ON_EXIT).await;
    }
    if ctx.cfg.delete_on_exit && ctx.fatal.lock().is_none() {
        delete_quick_tunnel(&ctx).await;
    }
    let _ = ctx.events.send(AgentEvent::Stopped);
    match ctx.fatal.lock().take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// How long a clean exit waits for control to delete a quick tunnel.
pub const DELETE_ON_EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Deletes the quick tunnel this agent ran (its recreate token authorises it) and
/// forgets the saved state, so its name is free at once. Best effort: if control cannot
/// be reached the name lapses after control's name hold as before.
async fn delete_quick_tunnel(ctx: &Ctx) {
    let Some(recreate_token) = ctx.current.lock().clone() else {
        return;
    };
    let req = netbore_api::types::DeleteTunnelRequest {
        tunnel_id: None,
        name: None,
        recreate_token: Some(recreate_token),
    };
    match tokio::time::timeout(DELETE_ON_EXIT_TIMEOUT, ctx.control.delete(&req)).await {
        Ok(Ok(r)) => {
            ctx.store.clear();
            info!(tunnel = %r.deleted, name = %r.name, "quick tunnel deleted on exit; its name is free (run with --keep, or --name, to keep a name across restarts)");
        }
        Ok(Err(e)) => {
            warn!(error = %e, "could not delete the quick tunnel on exit; its name is released after control's name hold");
        }
        Err(_) => warn!(
            "control did not answer the quick tunnel's deletion within {} s; its name is released after control's name hold",
            DELETE_ON_EXIT_TIMEOUT.as_secs()
        ),
    }
}

/// The AGENT_STATUS for the last origin probe (`None` before the first).
fn agent_status(ctx: &Ctx) -> Option<netbore_protocol::AgentStatus> {
    let (origin, message) = ctx.metrics.origin.lock().clone()?;
    Some(netbore_protocol::AgentStatus {
        origin,
        wanted_links: u16::try_from(ctx.cfg.connections.max(1)).unwrap_or(u16::MAX),
        message,
    })
}

/// Probes the origin every `health_interval` (the first at once), keeps the result for
/// `/readyz` and `/metrics`, and tells every edge that takes it.
async fn probe_origin(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(ctx.cfg.health_interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (state, message) = ctx.origin.probe(&ctx.cfg.health_path).await;
        let before = ctx
            .metrics
            .origin
            .lock()
            .replace((state, message.clone()))
            .map(|(s, _)| s);
        if before.is_none_or(|b| b.is_healthy() != state.is_healthy()) {
            if state.is_healthy() {
                info!(origin = %ctx.origin.url(), detail = %message, "origin healthy");
            } else {
                warn!(origin = %ctx.origin.url(), cause = state.as_str(), detail = %message, "origin unhealthy; viewers get errors until it answers");
            }
        }
        let Some(st) = agent_status(&ctx) else {
            continue;
        };
        let links: Vec<Mux> = {
            let mut sl = ctx.status_links.lock();
            sl.retain(|m| !m.is_closed());
            sl.clone()
        };
        for m in links {
            m.send_agent_status(st.clone());
        }
    }
}

impl Ctx {
    /// The edges held now, sorted.
    fn edges(&self) -> Vec<String> {
        let mut v: Vec<String> = self.held.lock().iter().cloned().collect();
        v.sort();
        v
    }
}

fn give_up(ctx: &Ctx, e: AgentError) {
    let mut f = ctx.fatal.lock();
    if f.is_none() {
        *f = Some(e);
    }
    ctx.stop.cancel();
}

/// How often a spare slot checks whether a link is up before it adds its own.
pub const SPARE_WAIT_POLL: Duration = Duration::from_millis(100);

/// First wait of a spare slot that found no edge of its own (every candidate is held
/// by another slot: fewer distinct edges than `--connections`).
pub const SPARE_SLOT_RETRY: Duration = Duration::from_secs(10);

/// Longest wait of such a slot: it doubles from [`SPARE_SLOT_RETRY`] up to this, so a
/// deployment with one edge costs control one create every few minutes, not every 10 s.
pub const SPARE_SLOT_RETRY_MAX: Duration = Duration::from_secs(300);

/// A spare slot counted in `spare_links_waiting` while it lives; uncounted on drop
/// (a link made, or the slot stopped).
struct SpareWaiting<'a>(&'a AgentMetrics, bool);

impl SpareWaiting<'_> {
    fn set(&mut self, waiting: bool) {
        if waiting != self.1 {
            if waiting {
                self.0.spare_links_waiting.inc();
            } else {
                self.0.spare_links_waiting.dec();
            }
            self.1 = waiting;
        }
    }
}

impl Drop for SpareWaiting<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// One link slot: create (or recreate) the tunnel at control, connect to a candidate
/// edge no other slot holds, serve, repeat.
async fn slot(ctx: Arc<Ctx>, index: usize) {
    let mut backoff = Backoff::new();
    // The wait of a spare slot with no distinct edge, doubling while none appears.
    let mut spare_wait = SPARE_SLOT_RETRY;
    let mut waiting = SpareWaiting(&ctx.metrics, false);
    // Every link after this slot's first is a reconnect.
    let mut linked_before = false;
    let stop = ctx.stop.clone();
    let cfg = &ctx.cfg;
    loop {
        if stop.is_cancelled() {
            return;
        }
        // Slots other than the first serve the tunnel the first one established.
        let shared_token = if index == 0 {
            None
        } else {
            let mut rx = ctx.tunnel.subscribe();
            let t = tokio::select! {
                r = rx.wait_for(|t| t.is_some()) => r.ok().and_then(|t| t.clone()),
                _ = stop.cancelled() => return,
            };
            t
        };
        // A spare slot adds redundancy next to a live link; while none is up it waits,
        // so it never races the first slot onto the same edge.
        while index > 0 && ctx.links.load(Ordering::Acquire) == 0 {
            if sleep_or_stop(SPARE_WAIT_POLL, &stop).await {
                return;
            }
        }
        let saved = if index == 0 {
            ctx.store
                .load()
                .filter(|s| cfg.name.as_ref().is_none_or(|n| *n == s.name))
        } else {
            None
        };
        // The tunnel's recreate token when there is one (this run's newest first), so
        // reconnects never need the management token; without one, or once it was
        // refused, the management token (if any) creates the tunnel or claims its name.
        let recreate_token = if index == 0 {
            ctx.current
                .lock()
                .clone()
                .or_else(|| saved.as_ref().map(|s| s.recreate_token.clone()))
                .filter(|_| !ctx.recreate_refused.load(Ordering::Acquire))
        } else {
            shared_token
        };
        // With a credential, it alone, from every slot, every time.
        let recreate_token = recreate_token.filter(|_| cfg.tunnel_token.is_none());
        let req = CreateTunnelRequest {
            requested_name: if index == 0 { cfg.name.clone() } else { None },
            preferred_transports: vec!["wss".into(), "ws".into()],
            region_hint: None,
            management_token: if recreate_token.is_some() || cfg.tunnel_token.is_some() {
                None
            } else {
                cfg.token.clone()
            },
            recreate_token: recreate_token.clone(),
            recreate_token_ttl_seconds: None,
            access: cfg.access.clone(),
            limits: cfg.limits.clone(),
            tunnel_credential: cfg.tunnel_token.clone(),
            issue_credential: false,
            kind: ctx.origin.raw().map(|k| k.as_str().to_string()),
        };
        let created = match ctx.control.create(&req).await {
            Ok(c) => c,
            Err(ControlError::Api { code, message, .. }) if code == ErrorCode::TunnelDeleted => {
                // Deleted on purpose: the state is of no further use.
                ctx.store.clear();
                return give_up(&ctx, fatal(code.as_str(), format!("{message} [{code}]")));
            }
            Err(ControlError::Api { code, message, .. })
                if matches!(
                    code,
                    ErrorCode::CredentialInvalid | ErrorCode::CredentialRevoked
                ) =>
            {
                // Revoked or unknown: only a new credential helps, never a retry.
                return give_up(
                    &ctx,
                    fatal(
                        code.as_str(),
                        format!(
                            "control refused the tunnel credential (--tunnel-token, NETBORE_TUNNEL_TOKEN): {message} [{code}]"
                        ),
                    ),
                );
            }
            Err(e) if e.is_permanent() && index > 0 => {
                // A spare slot's token was refused: slot 0 gets the tunnel back (or a
                // new one) and publishes its token; wait for that.
                debug!(error = %e, "spare slot's recreate token refused; waiting for the first slot");
                if sleep_or_stop(backoff.next().min(SPARE_SLOT_RETRY), &stop).await {
                    return;
                }
                continue;
            }
            Err(e) if recreate_token.is_some() && refuses_recreate(&e) => {
                // Expired, or signed by keys control no longer has. The saved state is
                // kept (a fixed control may take it again); try without it.
                warn!(error = %e, state = %ctx.store.path().map(|p| p.display().to_string()).unwrap_or_default(), "the recreate token was refused; the saved state is kept; trying without it");
                ctx.recreate_refused.store(true, Ordering::Release);
                *ctx.refused_reason.lock() = Some(e.to_string());
                continue;
            }
            Err(ControlError::Api { code, message, .. }) if code.is_permanent() => {
                let refused = ctx
                    .refused_reason
                    .lock()
                    .clone()
                    .map(|r| format!(" (its recreate token was refused: {r})"))
                    .unwrap_or_default();
                let message = match (&code, &cfg.name) {
                    (ErrorCode::NameTaken, Some(n)) => format!(
                        "the name '{n}' is held by another tunnel{refused}; to keep it, run with the state directory holding its recreate token (--state-dir), or pass a management token with the names:claim scope (--token); or choose another --name [name_taken]"
                    ),
                    _ if !refused.is_empty() && cfg.token.is_none() => format!(
                        "control refused the tunnel{refused}, then without it: {message}; pass a management token (--token) to create or claim it again [{code}]"
                    ),
                    _ => format!("control refused the tunnel{refused}: {message} [{code}]"),
                };
                return give_up(&ctx, fatal(code.as_str(), message));
            }
            Err(e) => {
                ctx.metrics.connect_failures.inc();
                let delay = backoff.next();
                warn!(error = %e, "creating the tunnel failed; retrying");
                let _ = ctx.events.send(AgentEvent::Reconnecting {
                    reason: e.to_string(),
                    retry_in_ms: delay.as_millis() as u64,
                    links: ctx.links.load(Ordering::Acquire),
                    edges: ctx.edges(),
                });
                if sleep_or_stop(delay, &stop).await {
                    return;
                }
                continue;
            }
        };
        if index == 0 && cfg.tunnel_token.is_none() {
            *ctx.current.lock() = Some(created.recreate_token.clone());
            ctx.recreate_refused.store(false, Ordering::Release);
            let reason = ctx.refused_reason.lock().take();
            let old = ctx.announced.lock().replace(created.public_url.clone());
            if let Some(old) = old
                && old != created.public_url
            {
                // Only a quick tunnel gets here: with --name control gives that name
                // or refuses.
                let reason = reason.unwrap_or_else(|| "control gave this tunnel a new name".into());
                warn!(old = %old, new = %created.public_url, reason = %reason, "the tunnel's public URL changed");
                let _ = ctx.events.send(AgentEvent::UrlChanged {
                    old_url: old,
                    url: created.public_url.clone(),
                    name: created.name().to_string(),
                    reason,
                });
            }
            if let Err(e) = ctx.store.save(&Saved {
                tunnel_id: created.tunnel_id.clone(),
                name: created.name().to_string(),
                recreate_token: created.recreate_token.clone(),
                public_url: Some(created.public_url.clone()),
            }) {
                warn!(error = %e, "could not save the recreate token; the name may change after a restart");
            }
        }

        let mut linked = None;
        let mut last_err = String::from("control returned no candidate edges");
        // A candidate that failed (rather than being another slot's edge): only then is
        // a slot's miss a connect failure.
        let mut failed = created.candidates.is_empty();
        for c in &created.candidates {
            if ctx.held.lock().contains(&c.edge_id) {
                continue;
            }
            match link::connect(
                &c.edge_url,
                &created.ephemeral_token,
                &created.tunnel_id,
                &ctx.instance_id,
                ctx.tls.clone(),
                CancellationToken::new(),
            )
            .await
            {
                Ok(l) => {
                    // Behind a shared address the edge may be one we already hold.
                    if !ctx.held.lock().insert(l.welcome.edge_id.clone()) {
                        // Not a failure: the edge is up, and already ours.
                        l.mux.close("already linked to this edge");
                        last_err = format!("reached {} again", l.welcome.edge_id);
                        continue;
                    }
                    linked = Some(l);
                    break;
                }
                Err(LinkError::Refused {
                    code: RefusalCode::TunnelMismatch | RefusalCode::UnsupportedVersion,
                    message,
                    ..
                }) => {
                    return give_up(&ctx, fatal("edge_refused", message));
                }
                Err(LinkError::Refused {
                    code: RefusalCode::CredentialRevoked,
                    message,
                    ..
                }) => {
                    return give_up(&ctx, fatal("credential_revoked", message));
                }
                Err(e) => {
                    warn!(edge = %c.edge_id, error = %e, "edge candidate failed");
                    last_err = e.to_string();
                    failed = true;
                }
            }
        }
        let Some(l) = linked else {
            if index > 0 && !failed {
                // Every edge there is already holds one of our links: fewer distinct
                // edges than asked. Not a failure; wait longer each time, quietly.
                waiting.set(true);
                debug!(
                    wait_s = spare_wait.as_secs(),
                    "no further distinct edge for this spare link; waiting"
                );
                let delay = spare_wait;
                spare_wait = (spare_wait * 2).min(SPARE_SLOT_RETRY_MAX);
                if sleep_or_stop(delay, &stop).await {
                    return;
                }
                continue;
            }
            ctx.metrics.connect_failures.inc();
            if index > 0 {
                // A spare slot whose candidates failed: look again later, quietly.
                debug!(reason = %last_err, "no further distinct edge for this slot yet");
                let delay = backoff.next().min(SPARE_SLOT_RETRY);
                if sleep_or_stop(delay, &stop).await {
                    return;
                }
                continue;
            }
            let delay = backoff.next();
            let _ = ctx.events.send(AgentEvent::Reconnecting {
                reason: last_err,
                retry_in_ms: delay.as_millis() as u64,
                links: ctx.links.load(Ordering::Acquire),
                edges: ctx.edges(),
            });
            if sleep_or_stop(delay, &stop).await {
                return;
            }
            continue;
        };
        let mux = l.mux.clone();
        let edge_id = l.welcome.edge_id.clone();
        for w in &l.welcome.warnings {
            warn!(edge = %edge_id, warning = %w, "the edge warns");
            let _ = ctx.events.send(AgentEvent::Warning {
                message: format!("edge {edge_id}: {w}"),
            });
        }
        ctx.muxes.lock().push(mux.clone());
        if l.welcome
            .capabilities
            .iter()
            .any(|c| c == netbore_protocol::handshake::CAP_AGENT_STATUS)
        {
            // The edge hears the origin's state from the link's first moment.
            if let Some(st) = agent_status(&ctx) {
                mux.send_agent_status(st);
            }
            let mut sl = ctx.status_links.lock();
            sl.retain(|m| !m.is_closed());
            sl.push(mux.clone());
        }
        if index == 0 {
            // Spare slots start once this link is live, so they see its edge as held
            // and never race it onto the same edge (a duplicate closed right after
            // the edge began routing to it would cut requests).
            ctx.tunnel
                .send_replace(Some(created.recreate_token.clone()));
        }
        waiting.set(false);
        spare_wait = SPARE_SLOT_RETRY;
        let links = ctx.links.fetch_add(1, Ordering::AcqRel) + 1;
        ctx.metrics.links_up.inc();
        if linked_before {
            ctx.metrics.reconnects.inc();
        }
        linked_before = true;
        info!(edge = %edge_id, session = %l.welcome.session_id, url = %created.public_url, links, "tunnel live");
        let _ = ctx.events.send(AgentEvent::Live {
            url: created.public_url.clone(),
            tunnel_id: created.tunnel_id.clone(),
            name: created.name().to_string(),
            edge_id: edge_id.clone(),
            origin: ctx.origin.url().to_string(),
            links,
            edges: ctx.edges(),
        });
        let span = info_span!("link", session = %l.welcome.session_id, tunnel = %created.tunnel_id);
        tokio::spawn(
            serve_link(
                l.incoming,
                ctx.origin.clone(),
                ctx.tracker.clone(),
                ctx.stopping.clone(),
                ctx.metrics.clone(),
            )
            .instrument(span),
        );
        let linked_at = Instant::now();
        let outcome = loop {
            // Slot 0 renews the recreate token while the link lasts, so a link that
            // outlives the token's lifetime still reconnects with a valid one.
            let renew = if index == 0 {
                ctx.current
                    .lock()
                    .as_deref()
                    .and_then(|t| renew_in(t, netbore_tokens::now_unix()))
            } else {
                None
            };
            tokio::select! {
                _ = mux.closed() => break "closed",
                _ = async { mux.going_away().await; if mux.is_closed() { std::future::pending::<()>().await } } => break "going_away",
                _ = stop.cancelled() => break "stop",
                _ = async { match renew { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => {
                    renew_recreate(&ctx).await;
                }
            }
        };
        if outcome == "stop" {
            ctx.metrics.links_up.dec();
            return;
        }
        ctx.held.lock().remove(&edge_id);
        let links = ctx.links.fetch_sub(1, Ordering::AcqRel) - 1;
        ctx.metrics.links_up.dec();
        ctx.muxes.lock().retain(|m| !m.is_closed());
        if outcome == "going_away" {
            info!(edge = %edge_id, "edge is going away; moving to another edge");
            backoff.reset();
            let old = mux.clone();
            tokio::spawn(async move {
                old.idle().await;
                old.close("moved to another edge");
            });
            let _ = ctx.events.send(AgentEvent::Reconnecting {
                reason: format!("edge {edge_id} is going away"),
                retry_in_ms: 0,
                links,
                edges: ctx.edges(),
            });
            continue;
        }
        if linked_at.elapsed() >= STABLE_LINK {
            backoff.reset();
        }
        let delay = backoff.next();
        warn!(edge = %edge_id, reason = %mux.close_reason(), "link to the edge lost");
        let _ = ctx.events.send(AgentEvent::Reconnecting {
            reason: mux.close_reason(),
            retry_in_ms: delay.as_millis() as u64,
            links,
            edges: ctx.edges(),
        });
        if sleep_or_stop(delay, &stop).await {
            return;
        }
    }
}

/// Shortest wait before renewing the recreate token, and between failed renewals.
pub const RENEW_MIN_DELAY: Duration = Duration::from_secs(30);

/// When to renew a recreate token: once half its lifetime has passed (read from the
/// token's own `iat` and `exp`, unverified: it only schedules the renewal, control
/// verifies), but not sooner than [`RENEW_MIN_DELAY`]. `None` when the token does not
/// say.
fn renew_in(token: &str, now: u64) -> Option<Duration> {
    use base64::Engine;
    #[derive(serde::Deserialize)]
    struct Window {
        iat: u64,
        exp: u64,
    }
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let w: Window = serde_json::from_slice(&bytes).ok()?;
    let at = w.iat + w.exp.saturating_sub(w.iat) / 2;
    Some(Duration::from_secs(at.saturating_sub(now)).max(RENEW_MIN_DELAY))
}

/// Gets a fresh recreate token for the live tunnel and saves it; a failure is logged
/// and retried after [`RENEW_MIN_DELAY`] (the link is not touched either way).
async fn renew_recreate(ctx: &Ctx) {
    let Some(token) = ctx.current.lock().clone() else {
        return;
    };
    let req = CreateTunnelRequest {
        requested_name: ctx.cfg.name.clone(),
        preferred_transports: vec!["wss".into(), "ws".into()],
        recreate_token: Some(token),
        access: ctx.cfg.access.clone(),
        limits: ctx.cfg.limits.clone(),
        kind: ctx.origin.raw().map(|k| k.as_str().to_string()),
        ..Default::default()
    };
    match ctx.control.create(&req).await {
        Ok(created) => {
            *ctx.current.lock() = Some(created.recreate_token.clone());
            ctx.tunnel
                .send_replace(Some(created.recreate_token.clone()));
            if let Err(e) = ctx.store.save(&Saved {
                tunnel_id: created.tunnel_id.clone(),
                name: created.name().to_string(),
                recreate_token: created.recreate_token,
                public_url: Some(created.public_url),
            }) {
                warn!(error = %e, "could not save the renewed recreate token");
            }
            debug!("recreate token renewed");
        }
        Err(e) => warn!(error = %e, "renewing the recreate token failed; retrying later"),
    }
}

/// Control refused the recreate token itself (expired, unknown key, another tunnel's,
/// or its name now held by another tunnel), so trying without it may still work.
fn refuses_recreate(e: &ControlError) -> bool {
    e.is_permanent()
        && e.code().is_some_and(|c| {
            matches!(c, ErrorCode::NameTaken | ErrorCode::Forbidden)
                || (c.is_credential() && c.as_str().starts_with("token_"))
        })
}

async fn sleep_or_stop(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.cancelled() => true,
    }
}

async fn serve_link(
    mut incoming: netbore_mux::Incoming,
    origin: Origin,
    tracker: TaskTracker,
    stopping: Arc<AtomicBool>,
    metrics: Arc<AgentMetrics>,
) {
    while let Some(mut s) = incoming.accept().await {
        if stopping.load(Ordering::Acquire) {
            metrics.streams_refused.inc();
            s.sender
                .reset(ResetCode::Refused, "the agent is shutting down");
            continue;
        }
        let origin = origin.clone();
        tracker.spawn(async move { origin.serve(s).await }.in_current_span());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(iat: u64, exp: u64) -> String {
        use base64::Engine;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            e.encode(br#"{"alg":"EdDSA"}"#),
            e.encode(format!(r#"{{"sub":"tun_1","iat":{iat},"exp":{exp}}}"#))
        )
    }

    #[test]
    fn the_recreate_token_is_renewed_at_half_its_life() {
        let day = 24 * 3600;
        assert_eq!(
            renew_in(&jwt(1000, 1000 + 7 * day), 1000),
            Some(Duration::from_secs(7 * day / 2))
        );
        assert_eq!(
            renew_in(&jwt(1000, 1000 + 7 * day), 1000 + 3 * day),
            Some(Duration::from_secs(day / 2))
        );
        // Past half-life (or a short token): soon, but never in a tight loop.
        assert_eq!(renew_in(&jwt(1000, 1060), 1050), Some(RENEW_MIN_DELAY));
        assert_eq!(renew_in("not-a-jwt", 0), None);
    }
}
