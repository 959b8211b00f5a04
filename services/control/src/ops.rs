//! Control's operations, shared by the REST and gRPC front ends.
//!
//! Each takes the caller's bearer credential (if any) and a request from [`crate::api`],
//! checks it, and returns a response or an [`ApiError`] whose code and message say what
//! to do. REST turns errors into `{"error": {"code", "message"}}` with the status;
//! gRPC into a status whose message is `code: message`.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use netbore_tokens::{EphemeralClaims, ManagementClaims, RecreateClaims, TokenError, now_unix};

use crate::api::{
    Candidate, CreateTunnelRequest, CreateTunnelResponse, DeleteTunnelRequest, ErrorBody,
    ErrorDetail, IssueTokenRequest, IssueTokenResponse, ListTunnelsQuery, ListTunnelsResponse,
    Tunnel,
};
use crate::metrics::Op;
use crate::names::{self, NameError};
use crate::store::{Claim, HELD_UNTIL_DELETED, StoreError, TunnelRecord};
use crate::{Control, EdgeEntry, MAX_CANDIDATES};
use std::sync::atomic::Ordering;

/// Page size of a list when the caller gives none.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// Largest page of a list.
pub const MAX_LIST_LIMIT: usize = 500;
/// Shortest recreate token lifetime: shorter would release the name while the agent is
/// still starting.
pub const MIN_RECREATE_TTL_SECS: u64 = 60;
/// Shortest management token lifetime.
pub const MIN_MANAGEMENT_TTL_SECS: u64 = 60;
/// Attempts at a free random name before giving up (each collides with odds of about
/// one in a million while fewer than a thousand names are held).
pub const RANDOM_NAME_ATTEMPTS: usize = 16;

/// Scopes a management token may carry. `admin` implies all others.
pub const SCOPES: &[&str] = &["tunnels:read", "tunnels:write", "names:claim", "admin"];
/// Scopes of a management token when the request names none.
pub const DEFAULT_SCOPES: &[&str] = &["tunnels:read", "tunnels:write"];

/// An API error: status, stable code, and a message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code.
    pub code: String,
    /// What happened and what to do.
    pub message: String,
    /// Seconds after which a retry can succeed (REST `Retry-After`, gRPC `retry-after`).
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    /// An error.
    pub fn new(
        status: StatusCode,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// 429 `rate_limited` for an anonymous creation past its address's allowance.
    fn rate_limited(why: crate::ratelimit::Refused) -> ApiError {
        let secs = why.retry_after_secs();
        let what = match why {
            crate::ratelimit::Refused::Wait(_) => {
                "too many tunnels were created from your address without a token"
            }
            crate::ratelimit::Refused::Crowded(_) => {
                "too many addresses are creating tunnels without a token right now"
            }
        };
        ApiError {
            retry_after_secs: Some(secs),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "{what}; wait {secs} s, or create it with a management token (Authorization: Bearer <token>, issued by POST /auth/token), which is not limited"
                ),
            )
        }
    }

    fn token(e: TokenError, what: &str) -> ApiError {
        let fix = match e {
            TokenError::Expired | TokenError::UnknownKid(_) => "obtain a new one",
            TokenError::NotYetValid => "check the clocks of control and this machine",
            _ => "pass the right token",
        };
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            e.code(),
            format!("the {what} was refused: {e}; {fix}"),
        )
    }

    fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("control failed: {e}; retry, and report it if it persists"),
        )
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        tracing::warn!(error = %e, "store operation failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("{e}; retry shortly"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = self
            .retry_after_secs
            .map(|s| [(header::RETRY_AFTER, s.to_string())]);
        (
            self.status,
            retry_after,
            Json(ErrorBody {
                error: ErrorDetail {
                    code: self.code,
                    message: self.message,
                },
            }),
        )
            .into_response()
    }
}

/// Unix seconds as RFC 3339.
pub fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|u| time::OffsetDateTime::from_unix_timestamp(u).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The token in an `Authorization: Bearer …` value (the scheme is case-insensitive).
pub fn bearer_value(v: &str) -> Option<String> {
    let (scheme, token) = v.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
}

/// A tunnel record as the APIs show it.
pub fn tunnel_view(control: &Control, r: &TunnelRecord) -> Tunnel {
    Tunnel {
        tunnel_id: r.tunnel_id.clone(),
        name: r.name.clone(),
        public_hostname: format!("{}.{}", r.name, control.config().domain),
        created_at: rfc3339(r.created_at),
        expires_at: rfc3339(r.expires_at),
    }
}

fn management(
    control: &Control,
    token: Option<String>,
) -> Result<Option<ManagementClaims>, ApiError> {
    match token {
        None => Ok(None),
        Some(t) => control
            .verifier()
            .verify_management(&t)
            .map(Some)
            .map_err(|e| ApiError::token(e, "management token")),
    }
}

/// Prefix of a message on the deletion feed that asks edge `<rest>` to drain (tunnel
/// ids start with `tun_`, so the two never mix).
pub const DRAIN_PREFIX: &str = "drain:";

/// Prefix of a message on the deletion feed that asks edge `<rest>` to take agents
/// again after a drain.
pub const UNDRAIN_PREFIX: &str = "undrain:";

/// Asks edge `edge_id` to drain, through whichever replica it is linked to. Needs
/// `admin`; 404 `edge_not_found` for an edge no replica has heard from.
pub async fn drain_edge(
    control: &Control,
    bearer: Option<String>,
    edge_id: &str,
) -> Result<(), ApiError> {
    require_scope(&management(control, bearer)?, "admin")?;
    require_linked_edge(control, edge_id).await?;
    tracing::info!(edge = %edge_id, "drain requested");
    control
        .announce_deletion_everywhere(&format!("{DRAIN_PREFIX}{edge_id}"))
        .await;
    Ok(())
}

/// Asks edge `edge_id` to take agents again after [`drain_edge`], through whichever
/// replica it is linked to. Needs `admin`; 404 `edge_not_found` as for a drain.
pub async fn undrain_edge(
    control: &Control,
    bearer: Option<String>,
    edge_id: &str,
) -> Result<(), ApiError> {
    require_scope(&management(control, bearer)?, "admin")?;
    require_linked_edge(control, edge_id).await?;
    tracing::info!(edge = %edge_id, "undrain requested");
    control
        .announce_deletion_everywhere(&format!("{UNDRAIN_PREFIX}{edge_id}"))
        .await;
    Ok(())
}

async fn require_linked_edge(control: &Control, edge_id: &str) -> Result<(), ApiError> {
    let known = control
        .edge_statuses_now()
        .await?
        .iter()
        .any(|(e, s)| e.edge_id == edge_id && s.as_ref().is_some_and(|s| s.connected));
    if !known {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "edge_not_found",
            format!(
                "no edge '{edge_id}' is linked to control; ListEdges shows the edges and whether they are connected"
            ),
        ));
    }
    Ok(())
}

/// Checks that `bearer` is a management token with `tunnels:read`.
pub fn require_read(control: &Control, bearer: Option<String>) -> Result<(), ApiError> {
    require_scope(&management(control, bearer)?, "tunnels:read")
}

fn require_scope(m: &Option<ManagementClaims>, scope: &str) -> Result<(), ApiError> {
    match m {
        Some(c) if c.allows(scope) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "the management token lacks the '{scope}' scope; issue one that has it (POST /auth/token)"
            ),
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this needs a management token: send 'Authorization: Bearer <token>' (issue one with POST /auth/token)",
        )),
    }
}

fn name_error(name: &str, e: NameError) -> ApiError {
    match e {
        NameError::Invalid(why) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "name_invalid",
            format!("the name is not a valid DNS label: {why}"),
        ),
        NameError::Reserved => ApiError::new(
            StatusCode::BAD_REQUEST,
            "name_reserved",
            format!("the name '{name}' is reserved for the service itself; choose another"),
        ),
    }
}

fn name_taken(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "name_taken",
        format!(
            "the name '{name}' is held by another tunnel; pass its recreate token or a management token with the names:claim scope, or choose another name"
        ),
    )
}

/// A fresh tunnel id: `tun_` and 26 hex digits (104 random bits).
pub fn new_tunnel_id() -> String {
    let r: u128 = rand::random();
    format!("tun_{:026x}", r & ((1u128 << 104) - 1))
}

fn transport_of(url: &str) -> &'static str {
    if url.starts_with("wss://") {
        "wss"
    } else {
        "ws"
    }
}

/// Orders candidates: edges of the hinted region first, then the order of `edges`
/// (configured edges in configured order, then edges known only from their reports).
/// Edges offering none of the preferred transports are left out, unless that would
/// leave none (then the note says so, and the agent tries what there is).
pub fn candidates(
    edges: &[EdgeEntry],
    region_hint: Option<&str>,
    transports: &[String],
) -> (Vec<Candidate>, Option<String>) {
    let mut v: Vec<&EdgeEntry> = edges.iter().collect();
    if let Some(r) = region_hint {
        v.sort_by_key(|e| e.region != r);
    }
    let wanted = |e: &&EdgeEntry| {
        transports.is_empty()
            || transports
                .iter()
                .any(|t| t.eq_ignore_ascii_case(transport_of(&e.edge_url)))
    };
    let mut note = None;
    if !v.iter().any(wanted) && !v.is_empty() {
        note = Some(format!(
            "no edge offers the preferred transports ({}); these offer {}",
            transports.join(", "),
            transport_of(&v[0].edge_url)
        ));
    } else {
        v.retain(wanted);
    }
    let hint_matched = region_hint.is_some_and(|r| v.iter().any(|e| e.region == r));
    let list = v
        .into_iter()
        .take(MAX_CANDIDATES)
        .enumerate()
        .map(|(i, e)| {
            let in_region = region_hint.is_some_and(|r| r == e.region);
            Candidate {
                edge_id: e.edge_id.clone(),
                edge_url: e.edge_url.clone(),
                supported_transport: transport_of(&e.edge_url).into(),
                region: e.region.clone(),
                note: match (in_region, region_hint, i) {
                    (true, _, _) => "in the requested region".into(),
                    (false, Some(r), 0) if !hint_matched => {
                        format!("no edge in region '{r}'; nearest configured")
                    }
                    (false, _, 0) => "primary".into(),
                    _ => "fallback".into(),
                },
            }
        })
        .collect();
    (list, note)
}

/// Creates a tunnel, or gets one back with a recreate token.
///
/// A requested name is given when it is free, when the caller shows a recreate token
/// for it, or with a management token holding `names:claim` (which takes it over, the
/// same tunnel id included). A recreate token alone gives back its tunnel id and name.
pub async fn create(
    control: &Control,
    bearer: Option<String>,
    req: CreateTunnelRequest,
) -> Result<CreateTunnelResponse, ApiError> {
    create_from(control, bearer, req, None).await
}

/// [`create`] for a request from `client` (the REST or gRPC caller's address, see
/// [`crate::ratelimit::client_address`]): a creation without a management or recreate
/// token counts against that address's allowance (`None`: an in-process caller, not
/// counted).
pub async fn create_from(
    control: &Control,
    bearer: Option<String>,
    req: CreateTunnelRequest,
    client: Option<std::net::IpAddr>,
) -> Result<CreateTunnelResponse, ApiError> {
    counted(
        control,
        Op::CreateTunnel,
        create_inner(control, bearer, req, client).await,
    )
}

/// Counts a refusal of `op` by its code; successes are counted where they happen.
fn counted<T>(control: &Control, op: Op, r: Result<T, ApiError>) -> Result<T, ApiError> {
    if let Err(e) = &r {
        control.metrics().refused(op, &e.code);
    }
    r
}

async fn create_inner(
    control: &Control,
    bearer: Option<String>,
    req: CreateTunnelRequest,
    client: Option<std::net::IpAddr>,
) -> Result<CreateTunnelResponse, ApiError> {
    let cfg = control.config();
    let mgmt = management(control, req.management_token.clone().or(bearer))?;
    let recreate = match &req.recreate_token {
        Some(t) => Some(
            control
                .verifier()
                .verify_recreate(t)
                .map_err(|e| ApiError::token(e, "recreate token"))?,
        ),
        None => None,
    };
    // A valid recreate token for its own tunnel is a credential too: an agent whose
    // tunnel exists reconnects with it alone, long after any management token expired.
    let own_tunnel = recreate
        .as_ref()
        .is_some_and(|r| req.requested_name.as_ref().is_none_or(|n| *n == r.name));
    if cfg.require_token && !own_tunnel {
        require_scope(&mgmt, "tunnels:write")?;
    }
    // Anonymous: no credential at all. Checked after the tokens, so a bad token is
    // refused for what it is, and before anything is stored.
    if mgmt.is_none()
        && recreate.is_none()
        && let (Some(limiter), Some(client)) = (control.create_limiter(), client)
        && let Err(why) = limiter.take(client, std::time::Instant::now())
    {
        tracing::info!(%client, "anonymous creation refused: rate limited");
        return Err(ApiError::rate_limited(why));
    }
    let now = now_unix();
    if let Some(r) = &recreate
        && control.store().is_revoked(&r.sub, now).await?
    {
        return Err(ApiError::new(
            StatusCode::GONE,
            "tunnel_deleted",
            format!(
                "the tunnel '{}' was deleted; start without its recreate token (remove the agent's saved state) to create a new one",
                r.name
            ),
        ));
    }
    if let Some(name) = &req.requested_name {
        names::validate(name).map_err(|e| name_error(name, e))?;
    }
    req.access.validate().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "access_invalid",
            format!("{e} (see docs/access.md)"),
        )
    })?;
    if req.limits.max_body_bytes == Some(0) {
        return Err(ApiError::bad_request(
            "limits.max_body_bytes must be at least 1; leave it out for the edges' own limit",
        ));
    }

    // Candidates before the name: a name is never held for a caller who gets nothing.
    let (cands, cand_note) = candidates(
        &control.candidates_now().await?,
        req.region_hint.as_deref(),
        &req.preferred_transports,
    );
    if cands.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_edges",
            "no edge is available; retry shortly, and check that edges are running and linked to control",
        ));
    }

    let mut notes: Vec<String> = cand_note.into_iter().collect();
    let max = cfg.recreate_ttl_max.as_secs().max(MIN_RECREATE_TTL_SECS);
    let ttl = match req.recreate_token_ttl_seconds {
        None | Some(0) => cfg
            .recreate_ttl_default
            .as_secs()
            .clamp(MIN_RECREATE_TTL_SECS, max),
        Some(t) if t > max => {
            notes.push(format!(
                "recreate_token_ttl_seconds clamped from {t} to the maximum {max}"
            ));
            max
        }
        Some(t) if t < MIN_RECREATE_TTL_SECS => {
            notes.push(format!(
                "recreate_token_ttl_seconds raised from {t} to the minimum {MIN_RECREATE_TTL_SECS}"
            ));
            MIN_RECREATE_TTL_SECS
        }
        Some(t) => t,
    };
    let force = mgmt.as_ref().is_some_and(|m| m.allows("names:claim"));
    // A named tunnel (a management token and a requested name) holds its name until it
    // is deleted; any other holds it for the name hold, which every edge report naming
    // the tunnel renews (see `Control::tunnels_held`).
    let named =
        req.requested_name.is_some() && mgmt.as_ref().is_some_and(|m| m.allows("tunnels:write"));
    let hold_until = if named {
        HELD_UNTIL_DELETED
    } else {
        now.saturating_add(cfg.name_hold.as_secs())
    };
    let store = control.store();

    let record: TunnelRecord = match (&req.requested_name, &recreate) {
        (Some(name), Some(r)) if r.name == *name => {
            match store.claim(name, &r.sub, now, hold_until, force).await? {
                Claim::Won(rec) => rec,
                Claim::Taken(_) => return Err(name_taken(name)),
            }
        }
        (Some(name), _) => {
            let id = if force {
                store
                    .by_name(name, now)
                    .await?
                    .map(|r| r.tunnel_id)
                    .unwrap_or_else(new_tunnel_id)
            } else {
                new_tunnel_id()
            };
            match store.claim(name, &id, now, hold_until, force).await? {
                Claim::Won(rec) => rec,
                Claim::Taken(_) => return Err(name_taken(name)),
            }
        }
        (None, Some(r)) => match store.claim(&r.name, &r.sub, now, hold_until, false).await? {
            Claim::Won(rec) => rec,
            Claim::Taken(_) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "name_taken",
                    format!(
                        "the name '{}' was released and is now held by another tunnel; start without the recreate token to get a new name",
                        r.name
                    ),
                ));
            }
        },
        (None, None) => {
            let mut won = None;
            for _ in 0..RANDOM_NAME_ATTEMPTS {
                let n = names::random();
                if let Claim::Won(r) = store
                    .claim(&n, &new_tunnel_id(), now, hold_until, false)
                    .await?
                {
                    won = Some(r);
                    break;
                }
            }
            won.ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "names_exhausted",
                    "could not find a free random name; retry, or request a name",
                )
            })?
        }
    };

    let eph_ttl = cfg.ephemeral_ttl.as_secs();
    let (ephemeral, recreate_token) = {
        let keys = control.keys();
        let mut claims =
            EphemeralClaims::new_at(now, &cfg.issuer, &record.tunnel_id, &record.name, eph_ttl);
        // No session-cookie key in the token: edges derive it from the seed control
        // sends only to authenticated edges (docs/security.md, "The cookie key").
        claims.access = req.access;
        claims.limits = req.limits;
        let e = keys.sign_ephemeral(&claims).map_err(ApiError::internal)?;
        if e.len() > netbore_tokens::MAX_TOKEN_LEN {
            return Err(ApiError::bad_request(format!(
                "the access policy makes the agent's token {} bytes long, over the {} byte limit; use fewer or shorter entries",
                e.len(),
                netbore_tokens::MAX_TOKEN_LEN
            )));
        }
        let r = keys
            .sign_recreate(&RecreateClaims::new_at(
                now,
                &cfg.issuer,
                &record.tunnel_id,
                &record.name,
                ttl,
            ))
            .map_err(ApiError::internal)?;
        (e, r)
    };
    notes.push(if record.expires_at == HELD_UNTIL_DELETED {
        format!("recreate token valid for {ttl} s; the name is held until the tunnel is deleted")
    } else {
        format!(
            "recreate token valid for {ttl} s; the name is held while an agent is linked and for {} s after",
            cfg.name_hold.as_secs()
        )
    });
    tracing::info!(tunnel = %record.tunnel_id, name = %record.name, recreated = recreate.is_some(), "tunnel created");
    let m = control.metrics();
    m.tokens_issued[0].fetch_add(1, Ordering::Relaxed);
    m.tokens_issued[1].fetch_add(1, Ordering::Relaxed);
    m.tunnels_created[usize::from(recreate.is_some())].fetch_add(1, Ordering::Relaxed);
    Ok(CreateTunnelResponse {
        public_hostname: format!("{}.{}", record.name, cfg.domain),
        public_url: cfg.public_url_template.replace("{name}", &record.name),
        tunnel_id: record.tunnel_id,
        candidates: cands,
        ephemeral_token: ephemeral,
        recreate_token,
        candidates_expires_at: rfc3339(now + eph_ttl),
        note: notes.join("; "),
    })
}

/// Deletes a tunnel: refuses its recreate tokens from now on, frees its name and tells
/// every subscriber ([`Control::subscribe_deletions`]) so its agents are disconnected.
/// Needs `tunnels:write`, or the tunnel's own recreate token.
pub async fn delete(
    control: &Control,
    bearer: Option<String>,
    req: DeleteTunnelRequest,
) -> Result<TunnelRecord, ApiError> {
    counted(
        control,
        Op::DeleteTunnel,
        delete_inner(control, bearer, req).await,
    )
}

async fn delete_inner(
    control: &Control,
    bearer: Option<String>,
    req: DeleteTunnelRequest,
) -> Result<TunnelRecord, ApiError> {
    let now = now_unix();
    let own = match &req.recreate_token {
        Some(t) => Some(
            control
                .verifier()
                .verify_recreate(t)
                .map_err(|e| ApiError::token(e, "recreate token"))?,
        ),
        None => {
            require_scope(&management(control, bearer)?, "tunnels:write")?;
            None
        }
    };
    let found = match (req.tunnel_id.as_deref(), req.name.as_deref(), &own) {
        (Some(id), _, _) => control.store().by_id(id, now).await?,
        (None, Some(n), _) => control.store().by_name(n, now).await?,
        (None, None, Some(c)) => control.store().by_id(&c.sub, now).await?,
        (None, None, None) => {
            return Err(ApiError::bad_request(
                "give tunnel_id or name (or the tunnel's recreate_token)",
            ));
        }
    };
    let record = match (found, &own) {
        (Some(r), Some(c)) if r.tunnel_id != c.sub => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the recreate token is for another tunnel; pass that tunnel's recreate token or a management token",
            ));
        }
        (Some(r), _) => r,
        // The name has lapsed but the token could still bring the tunnel back: revoke it.
        (None, Some(c))
            if req.tunnel_id.as_deref().is_none_or(|id| id == c.sub)
                && req.name.as_deref().is_none_or(|n| n == c.name) =>
        {
            TunnelRecord {
                tunnel_id: c.sub.clone(),
                name: c.name.clone(),
                created_at: c.iat,
                expires_at: now,
            }
        }
        (None, _) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "tunnel_not_found",
                "no such tunnel; list tunnels with GET /tunnels/list (or ListTunnels)",
            ));
        }
    };
    // Revoke first, so a create racing this delete cannot bring the tunnel back.
    let until = now + control.config().recreate_ttl_max.as_secs();
    control.store().revoke(&record.tunnel_id, until).await?;
    control.store().remove(&record.tunnel_id).await?;
    control
        .announce_deletion_everywhere(&record.tunnel_id)
        .await;
    tracing::info!(tunnel = %record.tunnel_id, name = %record.name, "tunnel deleted");
    control
        .metrics()
        .tunnels_deleted
        .fetch_add(1, Ordering::Relaxed);
    Ok(record)
}

/// One tunnel by id or name. Needs `tunnels:read`.
pub async fn get(
    control: &Control,
    bearer: Option<String>,
    tunnel_id: Option<&str>,
    name: Option<&str>,
) -> Result<TunnelRecord, ApiError> {
    require_read(control, bearer)?;
    let now = now_unix();
    match (tunnel_id, name) {
        (Some(id), _) => control.store().by_id(id, now).await?,
        (None, Some(n)) => control.store().by_name(n, now).await?,
        (None, None) => return Err(ApiError::bad_request("give tunnel_id or name")),
    }
    .ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "tunnel_not_found",
            "no such tunnel; list tunnels with GET /tunnels/list (or ListTunnels)",
        )
    })
}

/// A page of tunnels ordered by name. Needs `tunnels:read`.
pub async fn list(
    control: &Control,
    bearer: Option<String>,
    q: ListTunnelsQuery,
) -> Result<ListTunnelsResponse, ApiError> {
    require_read(control, bearer)?;
    let limit = q
        .limit
        .unwrap_or(DEFAULT_LIST_LIMIT)
        .clamp(1, MAX_LIST_LIMIT);
    let mut page = control
        .store()
        .list(&q.prefix, q.cursor.as_deref(), limit + 1, now_unix())
        .await?;
    let next = (page.len() > limit).then(|| page[limit - 1].name.clone());
    page.truncate(limit);
    Ok(ListTunnelsResponse {
        tunnels: page.iter().map(|r| tunnel_view(control, r)).collect(),
        next_cursor: next,
    })
}

/// Compares secrets in time independent of where they differ (and, by hashing first,
/// of their lengths).
fn secrets_equal(a: &str, b: &str) -> bool {
    use aws_lc_rs::digest::{SHA256, digest};
    let (a, b) = (digest(&SHA256, a.as_bytes()), digest(&SHA256, b.as_bytes()));
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_ref(), b.as_ref()).is_ok()
}

/// A management token, for the bootstrap credential (the bearer).
pub async fn issue_token(
    control: &Control,
    bearer: Option<String>,
    req: IssueTokenRequest,
) -> Result<IssueTokenResponse, ApiError> {
    counted(
        control,
        Op::IssueToken,
        issue_token_inner(control, bearer, req),
    )
}

fn issue_token_inner(
    control: &Control,
    bearer: Option<String>,
    req: IssueTokenRequest,
) -> Result<IssueTokenResponse, ApiError> {
    let cfg = control.config();
    let Some(boot) = &cfg.bootstrap_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "bootstrap_disabled",
            "no bootstrap credential is configured; set NETBORE_BOOTSTRAP_TOKEN (or --bootstrap-token-file) on control",
        ));
    };
    let Some(given) = bearer else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the bootstrap credential as 'Authorization: Bearer <credential>'",
        ));
    };
    if !secrets_equal(&given, boot.expose()) {
        tracing::warn!("a management token was refused: wrong bootstrap credential");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "bad_credential",
            "the bootstrap credential is wrong; use the value control was started with (NETBORE_BOOTSTRAP_TOKEN)",
        ));
    }
    let scopes = req
        .scopes
        .unwrap_or_else(|| DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect());
    if scopes.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!(
                "a token needs at least one scope; known scopes: {}",
                SCOPES.join(", ")
            ),
        ));
    }
    if let Some(bad) = scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!("unknown scope '{bad}'; known scopes: {}", SCOPES.join(", ")),
        ));
    }
    let max = cfg.management_ttl.as_secs().max(MIN_MANAGEMENT_TTL_SECS);
    let ttl = req
        .ttl_seconds
        .unwrap_or(max)
        .clamp(MIN_MANAGEMENT_TTL_SECS, max);
    let subject = req.subject.unwrap_or_else(|| "bootstrap".into());
    let claims = ManagementClaims::new(&cfg.issuer, &subject, scopes.clone(), ttl);
    let token = control
        .keys()
        .sign_management(&claims)
        .map_err(ApiError::internal)?;
    tracing::info!(subject = %subject, scopes = ?scopes, ttl, "management token issued");
    control.metrics().tokens_issued[2].fetch_add(1, Ordering::Relaxed);
    Ok(IssueTokenResponse {
        token,
        scopes,
        expires_at: rfc3339(claims.exp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(id: &str, url: &str, region: &str) -> EdgeEntry {
        EdgeEntry {
            edge_id: id.into(),
            edge_url: url.into(),
            region: region.into(),
        }
    }

    fn ids(c: &[Candidate]) -> Vec<&str> {
        c.iter().map(|c| c.edge_id.as_str()).collect()
    }

    #[test]
    fn candidates_put_the_hinted_region_first_then_keep_the_configured_order() {
        let edges = [
            edge("a", "wss://a/v1/connect", "us"),
            edge("b", "wss://b/v1/connect", "eu"),
            edge("c", "wss://c/v1/connect", "us"),
            edge("d", "wss://d/v1/connect", "eu"),
        ];
        let (c, note) = candidates(&edges, None, &[]);
        assert_eq!(ids(&c), ["a", "b", "c"]);
        assert!(note.is_none());
        let (c, _) = candidates(&edges, Some("eu"), &[]);
        assert_eq!(ids(&c), ["b", "d", "a"]);
        assert_eq!(c[0].note, "in the requested region");
        assert_eq!(c[2].note, "fallback");
        let (c, _) = candidates(&edges, Some("mars"), &[]);
        assert_eq!(ids(&c), ["a", "b", "c"]);
        assert!(c[0].note.contains("mars"), "{}", c[0].note);
    }

    #[test]
    fn candidates_prefer_the_requested_transport_but_never_come_back_empty() {
        let edges = [
            edge("plain", "ws://p/v1/connect", "x"),
            edge("tls", "wss://t/v1/connect", "x"),
        ];
        let (c, _) = candidates(&edges, None, &["wss".into()]);
        assert_eq!(ids(&c), ["tls"]);
        assert_eq!(c[0].supported_transport, "wss");
        let (c, note) = candidates(&edges[..1], None, &["wss".into()]);
        assert_eq!(ids(&c), ["plain"]);
        assert!(note.unwrap().contains("preferred transports"));
        assert!(candidates(&[], None, &[]).0.is_empty());
    }

    #[test]
    fn bearer_values_are_parsed_leniently() {
        assert_eq!(bearer_value("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(bearer_value("bearer  abc ").as_deref(), Some("abc"));
        assert_eq!(bearer_value("BEARER abc").as_deref(), Some("abc"));
        assert_eq!(bearer_value("Basic abc"), None);
        assert_eq!(bearer_value("Bearer "), None);
        assert_eq!(bearer_value("abc"), None);
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(secrets_equal("s3cret", "s3cret"));
        assert!(!secrets_equal("s3cret", "s3cre"));
        assert!(!secrets_equal("s3cret", "S3cret"));
    }

    #[test]
    fn times_format_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(u64::MAX), "");
    }
}
