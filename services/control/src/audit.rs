//! The audit trail: who did what to which tunnel, when and from where.
//!
//! Every change an owner or operator makes (a tunnel created, claimed, enrolled,
//! deleted, disabled or enabled; a credential issued or revoked; an API key created or
//! revoked) is appended to `audit_events` with the actor (the token's subject), the API
//! key it came from when the bearer was one, the client address (as
//! [`crate::ratelimit::client_address`] finds it behind trusted proxies), the tunnel and
//! its owner. The request layers ([`AuditClientLayer`] for gRPC, [`rest_layer`] for
//! REST) put the caller's address in a task-local [`Context`] that [`record`] reads, so
//! the operations do not carry it through every signature.
//!
//! Listing (`GET /v1/audit`, gRPC `ListAuditEvents`) pages oldest first by event id
//! (ids sort by time); retention (`--audit-retention-days`) is pruned in the
//! background by [`prune_loop`].

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use netbore_api::ErrorCode;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::Control;
use crate::accounts::{AuditEvent, AuditFilter, AuditRow};
pub use crate::api::{AuditEventView, AuditPage, AuditQuery};
use crate::ops::{self, ApiError};

/// Most events one page returns.
pub const MAX_AUDIT_LIMIT: usize = 1000;
/// Events a page returns when no limit is asked.
pub const DEFAULT_AUDIT_LIMIT: usize = 100;
/// How often old events are pruned.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// What the request layers know about the caller.
#[derive(Debug, Default)]
pub struct Context {
    address: Option<IpAddr>,
    key_id: Mutex<Option<String>>,
    subject: Mutex<Option<String>>,
}

tokio::task_local! {
    static CONTEXT: Arc<Context>;
}

/// Runs `f` with `address` as the caller's address for the events it records.
pub async fn with_client<F: Future>(address: Option<IpAddr>, f: F) -> F::Output {
    CONTEXT
        .scope(
            Arc::new(Context {
                address,
                ..Context::default()
            }),
            f,
        )
        .await
}

/// Notes that the caller authenticated with API key `id` (recorded with its events).
pub fn note_api_key(id: &str) {
    let _ = CONTEXT.try_with(|c| *c.key_id.lock() = Some(id.to_string()));
}

/// Notes the subject the caller authenticated as (the actor of its events).
pub fn note_subject(sub: &str) {
    let _ = CONTEXT.try_with(|c| *c.subject.lock() = Some(sub.to_string()));
}

/// The subject the caller authenticated as in this request, or `anonymous`.
pub fn actor() -> String {
    CONTEXT
        .try_with(|c| c.subject.lock().clone())
        .ok()
        .flatten()
        .unwrap_or_else(|| "anonymous".to_string())
}

fn current() -> (Option<String>, Option<String>) {
    CONTEXT
        .try_with(|c| (c.address.map(|a| a.to_string()), c.key_id.lock().clone()))
        .unwrap_or_default()
}

/// Appends an event; a failure is logged, not returned (the change it records is
/// already made). `tunnel` is the tunnel it concerns (id, owner) when there is one;
/// `owner` otherwise says whose object it is (an API key's owner).
pub async fn record(
    control: &Control,
    actor: &str,
    action: &str,
    target: &str,
    tunnel: Option<(&str, Option<&str>)>,
    owner: Option<&str>,
    detail: serde_json::Value,
) {
    let (address, key_id) = current();
    let ev = AuditEvent {
        id: None,
        actor: actor.to_string(),
        action: action.to_string(),
        target: Some(target.to_string()),
        detail,
        address,
        key_id,
        tunnel_id: tunnel.map(|(t, _)| t.to_string()),
        owner: tunnel.and_then(|(_, o)| o).or(owner).map(str::to_string),
    };
    if let Err(e) = control.store().audit(&ev, netbore_tokens::now_unix()).await {
        tracing::warn!(action, target, error = %e, "could not write an audit event");
    }
}

/// The REST middleware that sets [`Context`] for each request.
pub async fn rest_layer(
    axum::extract::State(control): axum::extract::State<Control>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let client = crate::ratelimit::client_of(
        peer,
        req.headers()
            .get_all(crate::ratelimit::FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok()),
        &control.config().trusted_proxies,
    );
    with_client(client, next.run(req)).await
}

/// The gRPC layer that sets [`Context`] for each call.
#[derive(Clone)]
pub struct AuditClientLayer(pub Control);

impl<S> tower::Layer<S> for AuditClientLayer {
    type Service = AuditClient<S>;
    fn layer(&self, inner: S) -> AuditClient<S> {
        AuditClient {
            inner,
            control: self.0.clone(),
        }
    }
}

/// See [`AuditClientLayer`].
#[derive(Clone)]
pub struct AuditClient<S> {
    inner: S,
    control: Control,
}

impl<S, B> tower::Service<http::Request<B>> for AuditClient<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|c| c.remote_addr());
        let client = crate::ratelimit::client_of(
            peer,
            req.headers()
                .get_all(crate::ratelimit::FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok()),
            &self.control.config().trusted_proxies,
        );
        let fut = self.inner.call(req);
        Box::pin(with_client(client, fut))
    }
}

/// The view of a stored row.
pub fn view(r: &AuditRow) -> AuditEventView {
    AuditEventView {
        id: r.id.clone(),
        at: ops::rfc3339(r.at),
        actor: r.event.actor.clone(),
        key_id: r.event.key_id.clone(),
        address: r.event.address.clone(),
        action: r.event.action.clone(),
        target: r.event.target.clone(),
        tunnel_id: r.event.tunnel_id.clone(),
        owner: r.event.owner.clone(),
        detail: r.event.detail.clone(),
    }
}

fn parse_since(s: &str) -> Result<u64, ApiError> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp().max(0) as u64)
        .map_err(|_| {
            ApiError::bad_request(format!(
                "since '{}' is neither RFC 3339 (2026-12-01T00:00:00Z) nor Unix seconds",
                s.chars().take(64).collect::<String>()
            ))
        })
}

/// A page of the audit trail. Needs `tunnels:read`; a caller without `admin` sees the
/// events about its own objects only (asking for another owner's is 403).
pub async fn list(
    control: &Control,
    bearer: Option<String>,
    q: AuditQuery,
) -> Result<AuditPage, ApiError> {
    let m = ops::management(control, bearer).await?;
    let Some(m) = m else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "the audit trail needs a management token or API key with tunnels:read: send 'Authorization: Bearer <token>'",
        ));
    };
    if !m.allows("tunnels:read") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "the audit trail needs the tunnels:read scope; issue a token or key that has it",
        ));
    }
    let owner = if ops::is_admin(&m) {
        q.owner.clone()
    } else {
        match &q.owner {
            Some(o) if *o != m.sub => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    ErrorCode::Forbidden,
                    "only admin may read another owner's audit trail; leave out owner to read your own",
                ));
            }
            _ => Some(m.sub.clone()),
        }
    };
    for (what, v) in [
        ("tunnel", &q.tunnel),
        ("action", &q.action),
        ("cursor", &q.cursor),
    ] {
        if v.as_ref().is_some_and(|v| v.len() > 255) {
            return Err(ApiError::bad_request(format!(
                "{what} is longer than 255 characters"
            )));
        }
    }
    let since = q.since.as_deref().map(parse_since).transpose()?;
    let limit = q
        .limit
        .unwrap_or(DEFAULT_AUDIT_LIMIT)
        .clamp(1, MAX_AUDIT_LIMIT);
    let filter = AuditFilter {
        tunnel_id: q.tunnel,
        owner,
        action: q.action,
        since,
        after_id: q.cursor,
        limit: limit + 1,
    };
    let mut rows = control.store().list_audit(&filter).await?;
    let next = (rows.len() > limit).then(|| rows[limit - 1].id.clone());
    rows.truncate(limit);
    Ok(AuditPage {
        events: rows.iter().map(view).collect(),
        next_cursor: next,
    })
}

/// Deletes events older than the retention, every [`PRUNE_INTERVAL`], until
/// `shutdown`. A retention of 0 days keeps every event.
pub async fn prune_loop(control: Control, days: u64, shutdown: CancellationToken) {
    if days == 0 {
        return;
    }
    loop {
        let before = netbore_tokens::now_unix().saturating_sub(days.saturating_mul(86_400));
        match control.store().prune_audit(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, days, "pruned audit events past the retention"),
            Err(e) => tracing::warn!(error = %e, "could not prune the audit trail; retrying later"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
        }
    }
}
