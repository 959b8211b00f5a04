//! Netbore control: the only component that mints tokens and allocates names.
//!
//! Agents and scripts use the REST API ([`rest`]); operators and edges use gRPC. All
//! state lives in a [`store::ControlStore`], so several replicas behave as one when
//! they share it.

pub mod grpc;
pub mod names;
pub mod ops;
pub mod rest;
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
/// Default lifetime of recreate tokens (and of an idle name reservation).
pub const DEFAULT_RECREATE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest recreate token lifetime a caller may ask for.
pub const DEFAULT_RECREATE_TTL_MAX: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default lifetime of management tokens.
pub const DEFAULT_MANAGEMENT_TTL: Duration = Duration::from_secs(24 * 3600);
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
}

impl Default for ControlConfig {
    fn default() -> ControlConfig {
        ControlConfig {
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
        }
    }
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
    deletions: broadcast::Sender<String>,
}

impl Control {
    /// Control with the in-memory store.
    pub fn new(config: ControlConfig, keys: KeySet) -> Control {
        Control::with_store(config, keys, Box::new(store::MemoryStore::default()))
    }

    /// Control with the given store.
    pub fn with_store(
        config: ControlConfig,
        keys: KeySet,
        store: Box<dyn store::ControlStore>,
    ) -> Control {
        let verifier = Verifier::new(&keys.jwks(), config.issuer.clone()).expect("own keys verify");
        let (deletions, _) = broadcast::channel(1024);
        Control {
            inner: Arc::new(Inner {
                edges: RwLock::new(config.edges.clone()),
                edge_status: RwLock::new(Default::default()),
                config,
                keys: RwLock::new(keys),
                verifier: ArcSwap::from_pointee(verifier),
                store,
                deletions,
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ControlConfig {
        &self.inner.config
    }

    /// The published public keys.
    pub fn jwks(&self) -> Jwks {
        self.inner.keys.read().jwks()
    }

    /// Starts signing with a new key; tokens signed by older keys stay valid.
    pub fn rotate_keys(&self) {
        let jwks = {
            let mut k = self.inner.keys.write();
            k.rotate();
            k.jwks()
        };
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

    /// Records an edge's report.
    pub fn edge_report(&self, status: EdgeStatus) {
        self.inner
            .edge_status
            .write()
            .insert(status.entry.edge_id.clone(), status);
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

    /// Edges to hand out, least loaded first: configured edges unless their reports say
    /// they are draining, and reporting edges that are neither draining nor silent.
    pub fn candidate_edges(&self) -> Vec<EdgeEntry> {
        let now = netbore_tokens::now_unix();
        let silent = EDGE_SILENT_AFTER.as_secs();
        let mut v: Vec<(u64, usize, EdgeEntry)> = self
            .edge_statuses()
            .into_iter()
            .enumerate()
            .filter_map(|(i, (e, s))| match s {
                None => Some((0, i, e)),
                Some(s) if s.draining => None,
                Some(s) if !s.connected || now.saturating_sub(s.last_report) > silent => None,
                Some(s) => Some((s.connections, i, s.entry)),
            })
            .collect();
        v.sort_by_key(|(load, i, _)| (*load, *i));
        v.into_iter().map(|(_, _, e)| e).collect()
    }

    /// Tunnel ids as they are deleted (edges disconnect their agents).
    pub fn subscribe_deletions(&self) -> broadcast::Receiver<String> {
        self.inner.deletions.subscribe()
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

    pub(crate) fn announce_deletion(&self, tunnel_id: &str) {
        let _ = self.inner.deletions.send(tunnel_id.to_string());
    }
}
