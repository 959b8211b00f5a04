//! Netbore control: the only component that mints tokens and allocates names.
//!
//! Agents and scripts use the REST API ([`rest`], types in [`api`], a client in
//! [`client`]); operators and edges use gRPC ([`grpc`]). Both call the same operations
//! ([`ops`]). What must last (tunnels, names, tombstones, a generated signing key) is in
//! SQL ([`sql_store`]: SQLite, or PostgreSQL shared by several replicas); what the
//! replicas share and edges can rebuild (edge reports, deletions) is in a
//! [`store::LiveState`] ([`redis_store`] for several replicas). See [`store`].
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use netbore_control::{Control, ControlConfig};
//! use tokio_util::sync::CancellationToken;
//! let control = Control::new(ControlConfig::default(), netbore_tokens::KeySet::generate());
//! let shutdown = CancellationToken::new();
//! let rest = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! tokio::spawn(netbore_control::serve_rest(rest, control.clone(), shutdown.clone()));
//! tokio::spawn(netbore_control::serve_grpc(grpc, control, shutdown.clone()));
//! # Ok(()) }
//! ```

pub mod accounts;
pub mod api_keys;
pub mod audit;
pub mod dashboard;
/// The REST client (from `netbore-api`).
pub use netbore_api::client;
/// The REST API's JSON types (from `netbore-api`, which clients link instead of control).
pub use netbore_api::types as api;
pub mod edge_auth;
pub mod grpc;
pub mod managed;
pub mod metrics;
pub mod names;
pub mod ops;
pub mod ratelimit;
pub mod redis_store;
pub mod rest;
mod shared;
pub mod sql_store;
pub mod status;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use netbore_tokens::{Jwks, KeySet, Secret, Verifier};
use parking_lot::RwLock;
use tokio::sync::broadcast;

pub use grpc::serve_grpc;
pub use rest::{rest_router, serve_rest};

/// Default lifetime of ephemeral tokens.
pub const DEFAULT_EPHEMERAL_TTL: Duration = Duration::from_secs(5 * 60);
/// Default lifetime of recreate tokens.
pub const DEFAULT_RECREATE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest recreate token lifetime a caller may ask for.
pub const DEFAULT_RECREATE_TTL_MAX: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default lifetime of management tokens.
pub const DEFAULT_MANAGEMENT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default time an anonymous tunnel's name stays held after its last link closed.
pub const DEFAULT_NAME_HOLD: Duration = Duration::from_secs(24 * 3600);
/// A tunnel an edge reports as linked is held at least this long past the report:
/// three report intervals (edges report every 5 s, and at once when a tunnel first links
/// to them), so a live name never lapses between reports or across one missed report.
pub const LIVE_LINK_HOLD: Duration = Duration::from_secs(15);
/// At most this many candidates are returned.
pub const MAX_CANDIDATES: usize = 3;

/// An edge agents may be sent to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EdgeEntry {
    /// Edge id.
    pub edge_id: String,
    /// ws:// or wss:// URL agents connect to.
    pub edge_url: String,
    /// Region label.
    pub region: String,
}

/// An edge's last report on its link to control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeStatus {
    /// Where agents reach it, and its region.
    pub entry: EdgeEntry,
    /// Tunnels it serves.
    pub tunnels: u64,
    /// Agent connections.
    pub connections: u64,
    /// Open streams.
    pub streams: u64,
    /// It is shutting down.
    pub draining: bool,
    /// Unix seconds of the last report.
    pub last_report: u64,
    /// Its link to this control is open.
    pub connected: bool,
}

/// An edge that has not reported for this long is not handed out as a candidate.
pub const EDGE_SILENT_AFTER: Duration = Duration::from_secs(15);
/// An edge whose link closed this long ago is forgotten.
pub const EDGE_FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Control's settings.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Tunnels are `NAME.<domain>`.
    pub domain: String,
    /// Public URL of a tunnel; `{name}` is replaced.
    pub public_url_template: String,
    /// `iss` of every token.
    pub issuer: String,
    /// Edges handed out as candidates.
    pub edges: Vec<EdgeEntry>,
    /// The bootstrap credential that issues management tokens.
    pub bootstrap_token: Option<Secret>,
    /// When true, creating any tunnel needs a management token.
    pub require_token: bool,
    /// Ephemeral token lifetime.
    pub ephemeral_ttl: Duration,
    /// Default recreate token lifetime.
    pub recreate_ttl_default: Duration,
    /// Longest recreate token lifetime.
    pub recreate_ttl_max: Duration,
    /// Management token lifetime.
    pub management_ttl: Duration,
    /// How long an anonymous tunnel's name stays held after its last link closed (a
    /// named tunnel's is held until it is deleted).
    pub name_hold: Duration,
    /// A tunnel with no agent link this long is `offline` ([`status`]).
    pub offline_after: Duration,
    /// `redis://…` of the Redis that replicas share for live state (edge reports,
    /// deletions); `None` keeps it in this process (one replica). A secret: the URL
    /// may carry a password.
    pub redis_url: Option<Secret>,
    /// The database of durable state (`sqlite:…` or `postgres://…`, see
    /// [`sql_store`]); [`sql_store::MEMORY_URL`] keeps it in memory. A secret: the URL
    /// may carry a password.
    pub database_url: Secret,
    /// Anonymous creations one client address may make at once ([`ratelimit`]).
    pub anonymous_create_burst: u32,
    /// Anonymous creations one client address regains per minute; 0: no limit.
    pub anonymous_create_per_minute: u32,
    /// Proxies (the load balancer) whose `X-Forwarded-For` names the client; everyone
    /// else is the client themselves.
    pub trusted_proxies: Vec<netbore_tokens::access::Cidr>,
    /// Credentials edges authenticate with on `EdgeService` (none: every edge call is
    /// refused, and only configured edges are candidates).
    pub edge_credentials: edge_auth::EdgeCredentials,
    /// Days audit events are kept ([`audit::prune_loop`]); 0 keeps them forever.
    pub audit_retention_days: u64,
    /// Most DNS labels a tunnel name may have (`localhost-8726.pod-myslug` has 2);
    /// 1 keeps names to one label, which a `*.<domain>` certificate covers.
    pub max_name_labels: usize,
    /// Ports TCP tunnels are given (`--tcp-ports`; the edges listen on the same
    /// range). `None`: no TCP tunnels (`tcp_disabled`).
    pub tcp_ports: Option<netbore_tokens::PortRange>,
}

/// Days audit events are kept by default.
pub const DEFAULT_AUDIT_RETENTION_DAYS: u64 = 90;

impl Default for ControlConfig {
    fn default() -> ControlConfig {
        ControlConfig {
            max_name_labels: names::DEFAULT_MAX_LABELS as usize,
            domain: "localhost".into(),
            public_url_template: "http://{name}.localhost:8000".into(),
            issuer: "netbore-control".into(),
            edges: Vec::new(),
            bootstrap_token: None,
            require_token: false,
            ephemeral_ttl: DEFAULT_EPHEMERAL_TTL,
            recreate_ttl_default: DEFAULT_RECREATE_TTL,
            recreate_ttl_max: DEFAULT_RECREATE_TTL_MAX,
            management_ttl: DEFAULT_MANAGEMENT_TTL,
            name_hold: DEFAULT_NAME_HOLD,
            offline_after: status::DEFAULT_OFFLINE_AFTER,
            redis_url: None,
            anonymous_create_burst: ratelimit::DEFAULT_ANONYMOUS_CREATE_BURST,
            anonymous_create_per_minute: ratelimit::DEFAULT_ANONYMOUS_CREATE_PER_MINUTE,
            trusted_proxies: Vec::new(),
            edge_credentials: edge_auth::EdgeCredentials::default(),
            audit_retention_days: DEFAULT_AUDIT_RETENTION_DAYS,
            database_url: Secret::new(sql_store::MEMORY_URL),
            tcp_ports: None,
        }
    }
}

/// Why [`Control::open`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// A setting is unusable; the message names the fix.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The database did not answer, or could not be migrated.
    #[error("{0}")]
    Store(#[from] store::StoreError),
}

/// A setting control cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ControlConfig {
    /// Checks the settings once, at start, with messages that name the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        if self.domain.is_empty() || self.domain.starts_with('.') || self.domain.contains('/') {
            return err(format!(
                "domain '{}' is not a DNS name; tunnels are NAME.<domain>, e.g. --domain tunnels.example.com",
                self.domain
            ));
        }
        if !self.public_url_template.contains("{name}") {
            return err(format!(
                "public URL template '{}' has no {{name}}; e.g. https://{{name}}.{}",
                self.public_url_template, self.domain
            ));
        }
        if self.issuer.is_empty() {
            return err(
                "the issuer is empty; edges check it, so give the same value to both".into(),
            );
        }
        let mut ids = std::collections::HashSet::new();
        for e in &self.edges {
            if e.edge_id.is_empty() || !ids.insert(e.edge_id.as_str()) {
                return err(format!(
                    "edge id '{}' is empty or given twice; every edge needs its own id",
                    e.edge_id
                ));
            }
            if !(e.edge_url.starts_with("ws://") || e.edge_url.starts_with("wss://")) {
                return err(format!(
                    "edge '{}' has URL '{}'; agents connect with ws:// or wss://",
                    e.edge_id, e.edge_url
                ));
            }
        }
        if self.ephemeral_ttl.as_secs() < 10 || self.management_ttl.as_secs() < 60 {
            return err("token lifetimes are too short: ephemeral needs at least 10 s, management at least 60 s".into());
        }
        if self.name_hold.is_zero() {
            return err("the name hold is 0 s; give --name-hold-secs at least 1 (the default is 86400, a day)".into());
        }
        if self.recreate_ttl_default > self.recreate_ttl_max {
            return err(format!(
                "the default recreate token lifetime ({} s) is longer than the maximum ({} s)",
                self.recreate_ttl_default.as_secs(),
                self.recreate_ttl_max.as_secs()
            ));
        }
        Ok(())
    }
}

/// The candidate order of [`Control::candidate_edges`], from the configured edges and
/// the edges' last reports (keyed by edge id).
pub(crate) fn order_candidates(
    configured: &[EdgeEntry],
    status: &std::collections::HashMap<String, EdgeStatus>,
    now: u64,
) -> Vec<EdgeEntry> {
    let silent = EDGE_SILENT_AFTER.as_secs();
    let usable =
        |s: &EdgeStatus| !s.draining && s.connected && now.saturating_sub(s.last_report) <= silent;
    let mut out: Vec<EdgeEntry> = configured
        .iter()
        .filter(|e| status.get(&e.edge_id).is_none_or(usable))
        .cloned()
        .collect();
    let mut reported: Vec<&EdgeStatus> = status
        .values()
        .filter(|s| usable(s) && !configured.iter().any(|e| e.edge_id == s.entry.edge_id))
        .collect();
    reported
        .sort_by(|a, b| (a.connections, &a.entry.edge_id).cmp(&(b.connections, &b.entry.edge_id)));
    out.extend(reported.into_iter().map(|s| s.entry.clone()));
    out
}

/// Control's state; cheap to clone.
#[derive(Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

struct Inner {
    config: ControlConfig,
    keys: RwLock<KeySet>,
    verifier: ArcSwap<Verifier>,
    edges: RwLock<Vec<EdgeEntry>>,
    edge_status: RwLock<std::collections::HashMap<String, EdgeStatus>>,
    store: Box<dyn store::ControlStore>,
    live: Box<dyn store::LiveState>,
    deletions: broadcast::Sender<String>,
    metrics: Arc<metrics::ControlMetrics>,
    /// Anonymous creations per client address; `None`: unlimited.
    create_limiter: Option<ratelimit::CreateLimiter>,
    /// Tunnels deleted recently → until when edges must refuse their tokens.
    revocations: parking_lot::Mutex<std::collections::HashMap<String, u64>>,
    /// The session seeds of the current key set, for edges' links.
    seeds: tokio::sync::watch::Sender<Vec<netbore_tokens::SessionSeed>>,
    /// API keys verified in the last seconds ([`api_keys::API_KEY_CACHE_TTL`]).
    api_key_cache: api_keys::KeyCache,
    /// Tunnels' live status when the live state is not shared ([`status`]).
    local_tunnels: status::LocalTunnels,
}

/// Most recent revocations control remembers for edges that link later; beyond it the
/// ones that lapse soonest are dropped (deleting needs a credential, so this is reached
/// only by a very busy installation, and those tunnels' agents were disconnected
/// already).
pub const MAX_RECENT_REVOCATIONS: usize = 100_000;

impl Control {
    /// Control with a fresh in-memory SQLite database and live state in this process
    /// (tests, `netbore dev`). Must be called inside a Tokio runtime.
    pub fn new(config: ControlConfig, keys: KeySet) -> Control {
        Control::with_stores(
            config,
            keys,
            Box::new(sql_store::SqlStore::memory()),
            Box::new(store::LocalLive),
        )
    }

    /// Control with the given durable store and live state.
    pub fn with_stores(
        config: ControlConfig,
        keys: KeySet,
        store: Box<dyn store::ControlStore>,
        live: Box<dyn store::LiveState>,
    ) -> Control {
        let verifier = Verifier::new(&keys.jwks(), config.issuer.clone()).expect("own keys verify");
        let (deletions, _) = broadcast::channel(1024);
        live.attach_deletions(deletions.clone());
        let create_limiter = ratelimit::CreateLimiter::new(
            config.anonymous_create_burst,
            config.anonymous_create_per_minute,
        );
        let (seeds, _) = tokio::sync::watch::channel(keys.session_seeds());
        Control {
            inner: Arc::new(Inner {
                edges: RwLock::new(config.edges.clone()),
                edge_status: RwLock::new(Default::default()),
                config,
                keys: RwLock::new(keys),
                verifier: ArcSwap::from_pointee(verifier),
                store,
                live,
                deletions,
                metrics: Arc::default(),
                create_limiter,
                revocations: Default::default(),
                seeds,
                api_key_cache: Default::default(),
                local_tunnels: Default::default(),
            }),
        }
    }

    /// The per-address limit on anonymous creation, when there is one.
    pub fn create_limiter(&self) -> Option<&ratelimit::CreateLimiter> {
        self.inner.create_limiter.as_ref()
    }

    /// Control as its configuration says: the database at `database_url` (migrated
    /// now), live state in Redis when `redis_url` is set. Signs with `keys` when given;
    /// otherwise with the key it generated and stored in the database before (a fresh
    /// one on first start), so tokens survive a restart. Must be called inside a Tokio
    /// runtime.
    pub async fn open(config: ControlConfig, keys: Option<KeySet>) -> Result<Control, OpenError> {
        let db = sql_store::SqlStore::open(&config.database_url)?;
        db.migrate().await?;
        let keys = match keys {
            Some(k) => k,
            None => db.signing_keys(netbore_tokens::now_unix()).await?,
        };
        let live: Box<dyn store::LiveState> = match &config.redis_url {
            Some(url) => Box::new(redis_store::RedisLive::open(url.expose())?),
            None => Box::new(store::LocalLive),
        };
        Ok(Control::with_stores(config, keys, Box::new(db), live))
    }

    /// The configuration.
    pub fn config(&self) -> &ControlConfig {
        &self.inner.config
    }

    /// What control counts (served at `/metrics` on the admin listener).
    pub fn metrics(&self) -> &metrics::ControlMetrics {
        &self.inner.metrics
    }

    /// The counters, shared (for the gRPC counting layer).
    pub fn metrics_handle(&self) -> Arc<metrics::ControlMetrics> {
        self.inner.metrics.clone()
    }

    /// The published public keys.
    pub fn jwks(&self) -> Jwks {
        self.inner.keys.read().jwks()
    }

    /// Starts signing with a new key; tokens signed by older keys stay valid.
    pub fn rotate_keys(&self) {
        let (jwks, seeds) = {
            let mut k = self.inner.keys.write();
            k.rotate();
            (k.jwks(), k.session_seeds())
        };
        self.inner.seeds.send_replace(seeds);
        self.inner.verifier.store(Arc::new(
            Verifier::new(&jwks, self.inner.config.issuer.clone()).expect("own keys verify"),
        ));
    }

    /// Replaces the candidate edges.
    pub fn set_edges(&self, edges: Vec<EdgeEntry>) {
        *self.inner.edges.write() = edges;
    }

    /// The candidate edges.
    pub fn edges(&self) -> Vec<EdgeEntry> {
        self.inner.edges.read().clone()
    }

    /// Records an edge's report, and forgets edges whose link closed more than
    /// [`EDGE_FORGET_AFTER`] ago (replaced pods), so the table does not grow forever.
    pub fn edge_report(&self, status: EdgeStatus) {
        let now = status.last_report;
        let forget = EDGE_FORGET_AFTER.as_secs();
        let mut t = self.inner.edge_status.write();
        t.retain(|_, s| s.connected || now.saturating_sub(s.last_report) < forget);
        t.insert(status.entry.edge_id.clone(), status);
    }

    /// Marks an edge's link closed.
    pub fn edge_disconnected(&self, edge_id: &str) {
        if let Some(s) = self.inner.edge_status.write().get_mut(edge_id) {
            s.connected = false;
        }
    }

    /// Every edge known: configured ones and those that reported, with their status.
    pub fn edge_statuses(&self) -> Vec<(EdgeEntry, Option<EdgeStatus>)> {
        let status = self.inner.edge_status.read().clone();
        let mut out: Vec<(EdgeEntry, Option<EdgeStatus>)> = self
            .edges()
            .into_iter()
            .map(|e| {
                let s = status.get(&e.edge_id).cloned();
                (e, s)
            })
            .collect();
        for (id, s) in status {
            if !out.iter().any(|(e, _)| e.edge_id == id) {
                out.push((s.entry.clone(), Some(s)));
            }
        }
        out
    }

    /// Edges to hand out, in order: configured edges in the configured order, then
    /// edges known only from their reports, least loaded first. An edge whose report
    /// says it is draining, or whose link is closed or silent for
    /// [`EDGE_SILENT_AFTER`], is left out; a configured edge that never reported is
    /// kept (edges need not link to control). This is this replica's own view; creates
    /// use [`Control::candidates_now`], which with Redis sees every replica's reports.
    pub fn candidate_edges(&self) -> Vec<EdgeEntry> {
        let status = self.inner.edge_status.read().clone();
        order_candidates(&self.edges(), &status, netbore_tokens::now_unix())
    }

    /// Tunnel ids as they are deleted, through this replica or (with Redis) any other
    /// (edges disconnect their agents).
    pub fn subscribe_deletions(&self) -> broadcast::Receiver<String> {
        self.inner.deletions.subscribe()
    }

    /// The session seeds edges derive cookie keys from, as they change (key rotation).
    /// Only for authenticated edges: anyone holding one can forge viewers' cookies.
    pub fn subscribe_session_seeds(
        &self,
    ) -> tokio::sync::watch::Receiver<Vec<netbore_tokens::SessionSeed>> {
        self.inner.seeds.subscribe()
    }

    /// How long after a deletion edges must refuse the tunnel's ephemeral tokens: the
    /// longest such a token lives, plus the verifiers' clock leeway.
    pub fn revocation_window(&self) -> u64 {
        self.inner.config.ephemeral_ttl.as_secs() + netbore_tokens::LEEWAY_SECS
    }

    /// Remembers that `tunnel_id` was deleted at `now`, for edges that link later.
    /// Returns until when its tokens must be refused.
    pub fn record_revocation(&self, tunnel_id: &str, now: u64) -> u64 {
        let until = now + self.revocation_window();
        let mut r = self.inner.revocations.lock();
        r.retain(|_, u| *u > now);
        if r.len() >= MAX_RECENT_REVOCATIONS
            && let Some(k) = r.iter().min_by_key(|(_, u)| **u).map(|(k, _)| k.clone())
        {
            r.remove(&k);
        }
        let e = r.entry(tunnel_id.to_string()).or_insert(until);
        *e = (*e).max(until);
        *e
    }

    /// The revocations still in force at `now`: (tunnel id, refused until).
    pub fn recent_revocations(&self, now: u64) -> Vec<(String, u64)> {
        let mut r = self.inner.revocations.lock();
        r.retain(|_, u| *u > now);
        r.iter().map(|(k, u)| (k.clone(), *u)).collect()
    }

    pub(crate) fn keys(&self) -> parking_lot::RwLockReadGuard<'_, KeySet> {
        self.inner.keys.read()
    }

    pub(crate) fn verifier(&self) -> arc_swap::Guard<Arc<Verifier>> {
        self.inner.verifier.load()
    }

    pub(crate) fn store(&self) -> &dyn store::ControlStore {
        &*self.inner.store
    }

    pub(crate) fn api_key_cache(&self) -> &api_keys::KeyCache {
        &self.inner.api_key_cache
    }

    pub(crate) fn local_tunnels(&self) -> &status::LocalTunnels {
        &self.inner.local_tunnels
    }

    pub(crate) fn live(&self) -> &dyn store::LiveState {
        &*self.inner.live
    }

    pub(crate) fn announce_deletion(&self, tunnel_id: &str) {
        let _ = self.inner.deletions.send(tunnel_id.to_string());
    }
}
