//! Control's operations, shared by the REST and gRPC front ends.
//!
//! Each takes the caller's bearer credential (if any) and a plain request, checks it,
//! and returns a plain response or an [`ApiError`] whose code and message say what to
//! do. REST turns errors into `{"error": {"code", "message"}}` with the right status;
//! gRPC into a status with the code in the message.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use netbore_tokens::{EphemeralClaims, ManagementClaims, RecreateClaims, TokenError, now_unix};
use serde::{Deserialize, Serialize};

use crate::names::{self, NameError};
use crate::store::{Claim, TunnelRecord};
use crate::{Control, EdgeEntry, MAX_CANDIDATES};

/// Largest page of `GET /tunnels/list`.
pub const MAX_LIST_LIMIT: usize = 500;

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: String,
    /// What happened and what to do.
    pub message: String,
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
        }
    }

    fn token(e: TokenError, what: &str) -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            e.code(),
            format!("the {what} was refused: {e}; obtain a new one"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

/// `POST /tunnels/create` request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// Name to claim.
    pub requested_name: Option<String>,
    /// Transports the agent can use (`wss`, `ws`).
    #[serde(default)]
    pub preferred_transports: Vec<String>,
    /// Region preference.
    pub region_hint: Option<String>,
    /// Requested recreate token lifetime (clamped).
    pub recreate_token_ttl_seconds: Option<u64>,
    /// Management token.
    pub management_token: Option<String>,
    /// Recreate token from an earlier create.
    pub recreate_token: Option<String>,
}

/// One candidate edge.
#[derive(Debug, Serialize)]
pub struct Candidate {
    /// Edge id.
    pub edge_id: String,
    /// URL to connect to.
    pub edge_url: String,
    /// `wss` or `ws`.
    pub supported_transport: String,
    /// Region.
    pub region: String,
    /// Why it is in this position.
    pub note: String,
}

/// `POST /tunnels/create` response.
#[derive(Debug, Serialize)]
pub struct CreateResponse {
    /// Tunnel id.
    pub tunnel_id: String,
    /// `NAME.<domain>`.
    pub public_hostname: String,
    /// The URL viewers open.
    pub public_url: String,
    /// Ordered candidate edges.
    pub candidates: Vec<Candidate>,
    /// Token for the edge handshake.
    pub ephemeral_token: String,
    /// Token to get this tunnel back.
    pub recreate_token: String,
    /// When the ephemeral token (and so the candidate list) expires, RFC 3339.
    pub candidates_expires_at: String,
    /// Notes (e.g. a clamped TTL).
    pub note: String,
}

/// Unix seconds as RFC 3339.
pub fn rfc3339(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The token in an `Authorization: Bearer …` value.
pub fn bearer_value(v: &str) -> Option<String> {
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?;
    Some(t.trim().to_string())
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

/// Checks that `bearer` is a management token with `tunnels:read`.
pub fn require_read(control: &Control, bearer: Option<String>) -> Result<(), ApiError> {
    let m = management(control, bearer)?;
    require_scope(&m, "tunnels:read")
}

fn require_scope(m: &Option<ManagementClaims>, scope: &str) -> Result<(), ApiError> {
    match m {
        Some(c) if c.allows(scope) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the management token lacks the '{scope}' scope; issue one that has it"),
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
            format!("the name '{name}' is reserved; choose another"),
        ),
    }
}

fn new_tunnel_id() -> String {
    let r: u128 = rand::random();
    format!("tun_{:026x}", r & ((1u128 << 104) - 1))
}

/// Orders candidates: the region hint first, then the configured order.
fn candidates(
    edges: &[EdgeEntry],
    region_hint: Option<&str>,
    transports: &[String],
) -> Vec<Candidate> {
    let mut v: Vec<&EdgeEntry> = edges.iter().collect();
    if let Some(r) = region_hint {
        v.sort_by_key(|e| e.region != r);
    }
    v.into_iter()
        .filter(|e| {
            let t = if e.edge_url.starts_with("wss://") {
                "wss"
            } else {
                "ws"
            };
            transports.is_empty() || transports.iter().any(|p| p == t)
        })
        .take(MAX_CANDIDATES)
        .map(|e| {
            let in_region = region_hint.is_some_and(|r| r == e.region);
            Candidate {
                edge_id: e.edge_id.clone(),
                edge_url: e.edge_url.clone(),
                supported_transport: if e.edge_url.starts_with("wss://") {
                    "wss"
                } else {
                    "ws"
                }
                .into(),
                region: e.region.clone(),
                note: if in_region {
                    "in the requested region".into()
                } else {
                    String::new()
                },
            }
        })
        .collect()
}

/// Creates a tunnel, or gets one back with a recreate token.
pub fn create(
    control: &Control,
    bearer: Option<String>,
    req: CreateRequest,
) -> Result<CreateResponse, ApiError> {
    let cfg = control.config();
    let mgmt = management(control, req.management_token.clone().or(bearer))?;
    if cfg.require_token {
        require_scope(&mgmt, "tunnels:write")?;
    }
    let recreate = match &req.recreate_token {
        Some(t) => Some(
            control
                .verifier()
                .verify_recreate(t)
                .map_err(|e| ApiError::token(e, "recreate token"))?,
        ),
        None => None,
    };
    if let Some(r) = &recreate
        && control.store().is_revoked(&r.sub, now_unix())
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
    let mut notes = Vec::new();
    let max = cfg.recreate_ttl_max.as_secs();
    let ttl = match req.recreate_token_ttl_seconds {
        Some(0) | None => cfg.recreate_ttl_default.as_secs().min(max),
        Some(t) if t > max => {
            notes.push(format!(
                "recreate_token_ttl_seconds clamped from {t} to {max}"
            ));
            max
        }
        Some(t) => t,
    };
    let now = now_unix();
    let force = mgmt.as_ref().is_some_and(|m| m.allows("names:claim"));

    let record: TunnelRecord = match (&req.requested_name, &recreate) {
        (Some(name), _) => {
            names::validate(name).map_err(|e| name_error(name, e))?;
            let id = match &recreate {
                Some(r) if r.name == *name => r.sub.clone(),
                _ => control
                    .store()
                    .by_name(name, now)
                    .filter(|_| force)
                    .map(|r| r.tunnel_id)
                    .unwrap_or_else(new_tunnel_id),
            };
            match control.store().claim(name, &id, now, now + ttl, force) {
                Claim::Won(r) => r,
                Claim::Taken(_) => {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "name_taken",
                        format!(
                            "the name '{name}' is held by another tunnel; pass its recreate token or a management token with the names:claim scope, or choose another name"
                        ),
                    ));
                }
            }
        }
        (None, Some(r)) => match control
            .store()
            .claim(&r.name, &r.sub, now, now + ttl, false)
        {
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
            for _ in 0..16 {
                let n = names::random();
                if let Claim::Won(r) =
                    control
                        .store()
                        .claim(&n, &new_tunnel_id(), now, now + ttl, false)
                {
                    won = Some(r);
                    break;
                }
            }
            won.ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "names_exhausted",
                    "could not find a free random name; retry",
                )
            })?
        }
    };

    let keys = control.keys();
    let eph_ttl = cfg.ephemeral_ttl.as_secs();
    let sign_err = |e: TokenError| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "signing_failed",
            e.to_string(),
        )
    };
    let ephemeral = keys
        .sign_ephemeral(&EphemeralClaims::new(
            &cfg.issuer,
            &record.tunnel_id,
            &record.name,
            eph_ttl,
        ))
        .map_err(sign_err)?;
    let recreate_token = keys
        .sign_recreate(&RecreateClaims::new(
            &cfg.issuer,
            &record.tunnel_id,
            &record.name,
            ttl,
        ))
        .map_err(sign_err)?;
    drop(keys);
    let cands = candidates(
        &control.candidate_edges(),
        req.region_hint.as_deref(),
        &req.preferred_transports,
    );
    if cands.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_edges",
            "no edge is available for the requested transports; retry shortly, or check that edges are running",
        ));
    }
    notes.push(format!("recreate token valid for {ttl} s"));
    Ok(CreateResponse {
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

/// `POST /tunnels/delete` request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRequest {
    /// Tunnel to delete.
    pub tunnel_id: Option<String>,
    /// Or by name.
    pub name: Option<String>,
    /// The tunnel's recreate token (instead of a management token).
    pub recreate_token: Option<String>,
}

/// Deletes a tunnel: frees its name, refuses its recreate token from now on and
/// disconnects its agents.
pub fn delete(
    control: &Control,
    bearer: Option<String>,
    req: DeleteRequest,
) -> Result<TunnelRecord, ApiError> {
    let now = now_unix();
    let record = find(control, req.tunnel_id.as_deref(), req.name.as_deref(), now)?;
    let allowed = match &req.recreate_token {
        Some(t) => {
            let c = control
                .verifier()
                .verify_recreate(t)
                .map_err(|e| ApiError::token(e, "recreate token"))?;
            c.sub == record.tunnel_id
        }
        None => {
            let m = management(control, bearer)?;
            require_scope(&m, "tunnels:write")?;
            true
        }
    };
    if !allowed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the recreate token is for another tunnel",
        ));
    }
    control.store().remove(&record.tunnel_id);
    // Recreate tokens for it stay refused until the longest of them would expire.
    control.store().revoke(
        &record.tunnel_id,
        now + control.config().recreate_ttl_max.as_secs(),
    );
    control.announce_deletion(&record.tunnel_id);
    tracing::info!(tunnel = %record.tunnel_id, name = %record.name, "tunnel deleted");
    Ok(record)
}

/// The live tunnel with `tunnel_id`, or else with `name`.
fn find(
    control: &Control,
    tunnel_id: Option<&str>,
    name: Option<&str>,
    now: u64,
) -> Result<TunnelRecord, ApiError> {
    match (tunnel_id, name) {
        (Some(id), _) => control.store().by_id(id, now),
        (None, Some(n)) => control.store().by_name(n, now),
        (None, None) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "give tunnel_id or name",
            ));
        }
    }
    .ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "tunnel_not_found",
            "no such tunnel; list tunnels (GET /tunnels/list or ListTunnels)",
        )
    })
}

/// One tunnel by id or name.
pub fn get(
    control: &Control,
    bearer: Option<String>,
    tunnel_id: Option<&str>,
    name: Option<&str>,
) -> Result<TunnelRecord, ApiError> {
    require_read(control, bearer)?;
    find(control, tunnel_id, name, now_unix())
}

/// `GET /tunnels/list` query.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// Only names starting with this.
    #[serde(default)]
    pub prefix: String,
    /// Page size (default 100, at most 500).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of tunnels, and the cursor of the next page.
pub fn list(
    control: &Control,
    bearer: Option<String>,
    q: ListQuery,
) -> Result<(Vec<TunnelRecord>, Option<String>), ApiError> {
    let m = management(control, bearer)?;
    require_scope(&m, "tunnels:read")?;
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_LIST_LIMIT);
    let mut page = control
        .store()
        .list(&q.prefix, q.cursor.as_deref(), limit + 1, now_unix());
    let next = (page.len() > limit).then(|| page[limit - 1].name.clone());
    page.truncate(limit);
    Ok((page, next))
}

/// `POST /auth/token` request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Scopes (default: tunnels:read, tunnels:write).
    pub scopes: Option<Vec<String>>,
    /// Lifetime (default 24 h, at most the default).
    pub ttl_seconds: Option<u64>,
    /// Who the token is for (logs).
    pub subject: Option<String>,
}

/// Scopes a management token may carry.
pub const SCOPES: &[&str] = &["tunnels:read", "tunnels:write", "names:claim", "admin"];

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A management token, for the bootstrap credential.
pub fn issue_token(
    control: &Control,
    bearer: Option<String>,
    req: TokenRequest,
) -> Result<IssuedToken, ApiError> {
    let cfg = control.config();
    let Some(boot) = &cfg.bootstrap_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "bootstrap_disabled",
            "no bootstrap credential is configured; set NETBORE_BOOTSTRAP_TOKEN (or its file) on control",
        ));
    };
    let given = bearer.unwrap_or_default();
    if !constant_time_eq(given.as_bytes(), boot.expose().as_bytes()) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the bootstrap credential as 'Authorization: Bearer <credential>'",
        ));
    }
    let scopes = req
        .scopes
        .unwrap_or_else(|| vec!["tunnels:read".into(), "tunnels:write".into()]);
    if let Some(bad) = scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!("unknown scope '{bad}'; known scopes: {}", SCOPES.join(", ")),
        ));
    }
    let ttl = req
        .ttl_seconds
        .unwrap_or(cfg.management_ttl.as_secs())
        .clamp(60, cfg.management_ttl.as_secs());
    let claims = ManagementClaims::new(
        &cfg.issuer,
        req.subject.as_deref().unwrap_or("bootstrap"),
        scopes.clone(),
        ttl,
    );
    let token = control.keys().sign_management(&claims).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "signing_failed",
            e.to_string(),
        )
    })?;
    Ok(IssuedToken {
        token,
        scopes,
        expires_at: rfc3339(claims.exp),
    })
}

/// A management token as issued.
#[derive(Debug, Serialize)]
pub struct IssuedToken {
    /// The token.
    pub token: String,
    /// Its scopes.
    pub scopes: Vec<String>,
    /// Its expiry, RFC 3339.
    pub expires_at: String,
}

/// A tunnel record as JSON for APIs.
pub fn record_json(control: &Control, r: &TunnelRecord) -> serde_json::Value {
    serde_json::json!({
        "tunnel_id": r.tunnel_id,
        "name": r.name,
        "public_hostname": format!("{}.{}", r.name, control.config().domain),
        "created_at": rfc3339(r.created_at),
        "expires_at": rfc3339(r.expires_at),
    })
}
