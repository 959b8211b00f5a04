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
    ErrorDetail, IssueCredentialRequest, IssueTokenRequest, IssueTokenResponse, IssuedCredential,
    ListCredentialsResponse, ListTunnelsQuery, ListTunnelsResponse, Tunnel, TunnelCredential,
};
use crate::api_keys;
use crate::metrics::Op;
use crate::names::{self, NameError};
use crate::store::{Claim, CredentialRecord, HELD_UNTIL_DELETED, StoreError, TunnelRecord};
use crate::{Control, EdgeEntry, MAX_CANDIDATES};
use netbore_api::{ControlEvent, ErrorCode};

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
    pub code: ErrorCode,
    /// What happened and what to do.
    pub message: String,
    /// Seconds after which a retry can succeed (REST `Retry-After`, gRPC `retry-after`).
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    /// An error.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
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
                ErrorCode::RateLimited,
                format!(
                    "{what}; wait {secs} s, or create it with a management token (Authorization: Bearer <token>, issued by POST /auth/token), which is not limited"
                ),
            )
        }
    }

    pub(crate) fn token(e: TokenError, what: &str) -> ApiError {
        let fix = match e {
            TokenError::Expired | TokenError::UnknownKid(_) => "obtain a new one",
            TokenError::NotYetValid => "check the clocks of control and this machine",
            _ => "pass the right token",
        };
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::parse(e.code()),
            format!("the {what} was refused: {e}; {fix}"),
        )
    }

    pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("control failed: {e}; retry, and report it if it persists"),
        )
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        tracing::warn!(error = %e, "store operation failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::StoreUnavailable,
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
        owner: r.owner.clone(),
        disabled_at: r.disabled_at.map(rfc3339),
        status: None,
    }
}

/// The caller's claims from its bearer: a management token (JWT), or an API key
/// (`nbk_…`, checked against the database, see [`crate::api_keys`]) acting with its
/// owner, scopes and name pattern. `None` without a bearer.
pub(crate) async fn management(
    control: &Control,
    token: Option<String>,
) -> Result<Option<ManagementClaims>, ApiError> {
    match token {
        None => Ok(None),
        Some(t) if is_credential(&t) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "a tunnel credential (nbt_…) only runs its own tunnel (POST /tunnels/create); this needs a management token or API key: send 'Authorization: Bearer <token>' (issue one with POST /auth/token)",
        )),
        Some(t) if api_keys::is_api_key(&t) => api_keys::bearer_claims(control, &t).await.map(Some),
        Some(t) => control
            .verifier()
            .verify_management(&t)
            .map(Some)
            .map_err(|e| ApiError::token(e, "management token")),
    }
    .inspect(|c| {
        if let Some(c) = c {
            crate::audit::note_subject(&c.sub);
        }
    })
}

/// Asks edge `edge_id` to drain, through whichever replica it is linked to. Needs
/// `admin`; 404 `edge_not_found` for an edge no replica has heard from.
pub async fn drain_edge(
    control: &Control,
    bearer: Option<String>,
    edge_id: &str,
) -> Result<(), ApiError> {
    require_scope(&management(control, bearer).await?, "admin")?;
    require_linked_edge(control, edge_id).await?;
    tracing::info!(edge = %edge_id, "drain requested");
    control
        .announce_everywhere(&ControlEvent::DrainEdge(edge_id.to_string()))
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
    require_scope(&management(control, bearer).await?, "admin")?;
    require_linked_edge(control, edge_id).await?;
    tracing::info!(edge = %edge_id, "undrain requested");
    control
        .announce_everywhere(&ControlEvent::UndrainEdge(edge_id.to_string()))
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
            ErrorCode::EdgeNotFound,
            format!(
                "no edge '{edge_id}' is linked to control; ListEdges shows the edges and whether they are connected"
            ),
        ));
    }
    Ok(())
}

/// Checks that `bearer` is a management token (or API key) with `tunnels:read`.
pub async fn require_read(control: &Control, bearer: Option<String>) -> Result<(), ApiError> {
    require_scope(&management(control, bearer).await?, "tunnels:read")
}

/// What a caller does to a tunnel, for [`authorize_tunnel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelAction {
    /// Get it, see it in a list (`tunnels:read`).
    Read,
    /// Delete it, or change it: credentials, settings (`tunnels:write`).
    Write,
}

impl TunnelAction {
    /// The scope the action needs.
    pub fn scope(self) -> &'static str {
        match self {
            TunnelAction::Read => "tunnels:read",
            TunnelAction::Write => "tunnels:write",
        }
    }
}

/// True when the claims carry `admin` (which acts on every owner's tunnels).
pub fn is_admin(claims: &ManagementClaims) -> bool {
    claims.scopes.iter().any(|s| s == "admin")
}

/// 404 `tunnel_not_found`: also what a caller gets for another owner's tunnel, so its
/// existence does not leak.
pub fn tunnel_not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::TunnelNotFound,
        "no such tunnel; list tunnels with GET /tunnels/list (or ListTunnels)",
    )
}

/// The one authorisation decision for acting on an existing tunnel with a management
/// token or API key: the action's scope (403 `forbidden`), then ownership (a tunnel of
/// another owner, or an anonymous one, is 404 `tunnel_not_found` unless the caller has
/// `admin`), then the token's name pattern (403 `name_not_allowed`, see
/// [`authorize_name`]). A tunnel's own recreate token or credential is checked by its
/// own path, not here.
pub fn authorize_tunnel(
    claims: &ManagementClaims,
    record: &TunnelRecord,
    action: TunnelAction,
) -> Result<(), ApiError> {
    if !claims.allows(action.scope()) {
        return Err(missing_scope(action.scope()));
    }
    if !is_admin(claims) && record.owner.as_deref() != Some(claims.sub.as_str()) {
        return Err(tunnel_not_found());
    }
    authorize_name(claims, &record.name)
}

/// Checks `name` against the token's name pattern (from the API key it was minted
/// from): 403 `name_not_allowed` naming the pattern and the fix.
pub fn authorize_name(claims: &ManagementClaims, name: &str) -> Result<(), ApiError> {
    match &claims.name_pattern {
        Some(p) if !api_keys::name_matches(p, name) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::NameNotAllowed,
            format!(
                "this token is limited to names matching '{p}', and '{name}' is not one; use a name matching '{p}', or a token or API key without that limit"
            ),
        )),
        _ => Ok(()),
    }
}

fn missing_scope(scope: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        ErrorCode::Forbidden,
        format!(
            "the management token lacks the '{scope}' scope; issue one that has it (POST /auth/token)"
        ),
    )
}

fn require_scope(m: &Option<ManagementClaims>, scope: &str) -> Result<(), ApiError> {
    match m {
        Some(c) if c.allows(scope) => Ok(()),
        Some(_) => Err(missing_scope(scope)),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "this needs a management token: send 'Authorization: Bearer <token>' (issue one with POST /auth/token)",
        )),
    }
}

pub(crate) fn name_error(name: &str, e: NameError) -> ApiError {
    match e {
        NameError::Invalid(why) => ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::NameInvalid,
            format!("the name is not valid: {why}"),
        ),
        NameError::Reserved => ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::NameReserved,
            format!("the name '{name}' is reserved for the service itself; choose another"),
        ),
    }
}

pub(crate) fn name_taken(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        ErrorCode::NameTaken,
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
/// same tunnel id included; another owner's tunnel only with `admin`). A recreate token
/// alone gives back its tunnel id and name. A tunnel made with a management token or
/// API key is owned by its subject.
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
    create_idempotent(control, bearer, req, client, None).await
}

/// How long an idempotency key gives back the tunnel its first request made.
pub const IDEMPOTENCY_TTL_SECS: u64 = 24 * 3600;
/// Longest idempotency key (printable ASCII).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// How long a repeat waits for the first request with its key to finish creating.
pub const IDEMPOTENCY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often a waiting repeat looks again.
pub const IDEMPOTENCY_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// [`create_from`] with an idempotency key (REST `Idempotency-Key`, gRPC
/// `idempotency_key`): the same key from the same owner within
/// [`IDEMPOTENCY_TTL_SECS`] gives back the tunnel the first request made, on any
/// replica, and never makes a second; the same key with a different request is 422
/// `idempotency_key_reused`. Needs a management token or API key (its subject is the
/// owner the key belongs to).
pub async fn create_idempotent(
    control: &Control,
    bearer: Option<String>,
    req: CreateTunnelRequest,
    client: Option<std::net::IpAddr>,
    idempotency_key: Option<String>,
) -> Result<CreateTunnelResponse, ApiError> {
    counted(
        control,
        Op::CreateTunnel,
        create_inner(control, bearer, req, client, idempotency_key).await,
    )
}

/// Counts a refusal of `op` by its code; successes are counted where they happen.
fn counted<T>(control: &Control, op: Op, r: Result<T, ApiError>) -> Result<T, ApiError> {
    if let Err(e) = &r {
        control.metrics().refused(op, e.code.as_str());
    }
    r
}

/// The hash an idempotency key remembers its request by: the request as JSON (object
/// keys sorted), without the management token, which may differ between retries.
fn request_hash(req: &CreateTunnelRequest) -> String {
    let mut r = req.clone();
    r.management_token = None;
    let v = serde_json::to_value(&r).unwrap_or_default();
    api_keys::hash_key(&v.to_string())
}

/// The tunnel an earlier request with this idempotency key made (`None`: this request
/// is the first and must create it), waiting up to [`IDEMPOTENCY_WAIT`] for one still
/// creating.
async fn idempotency_take(
    control: &Control,
    owner: &str,
    key: &str,
    hash: &str,
) -> Result<Option<TunnelRecord>, ApiError> {
    use crate::accounts::Idempotency;
    let deadline = tokio::time::Instant::now() + IDEMPOTENCY_WAIT;
    loop {
        let now = now_unix();
        match control
            .store()
            .idempotency_begin(owner, key, hash, now, now + IDEMPOTENCY_TTL_SECS)
            .await?
        {
            Idempotency::First => return Ok(None),
            Idempotency::Seen {
                request_hash,
                tunnel_id,
            } => {
                if !request_hash.is_empty() && request_hash != hash {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        ErrorCode::IdempotencyKeyReused,
                        "this Idempotency-Key was used with a different request in the last 24 h; send the same request to get its tunnel back, or use a new key for a new tunnel",
                    ));
                }
                if !tunnel_id.is_empty() {
                    return match control.store().by_id(&tunnel_id, now).await? {
                        Some(r) => Ok(Some(r)),
                        None => Err(ApiError::new(
                            StatusCode::GONE,
                            ErrorCode::TunnelDeleted,
                            format!(
                                "the tunnel this Idempotency-Key created ({tunnel_id}) was deleted; use a new key to create another"
                            ),
                        )),
                    };
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(ApiError {
                        retry_after_secs: Some(1),
                        ..ApiError::new(
                            StatusCode::CONFLICT,
                            ErrorCode::IdempotencyKeyInUse,
                            "a request with this Idempotency-Key is still creating its tunnel; retry shortly with the same key",
                        )
                    });
                }
                tokio::time::sleep(IDEMPOTENCY_POLL).await;
            }
        }
    }
}

async fn create_inner(
    control: &Control,
    bearer: Option<String>,
    req: CreateTunnelRequest,
    client: Option<std::net::IpAddr>,
    idempotency_key: Option<String>,
) -> Result<CreateTunnelResponse, ApiError> {
    let cfg = control.config();
    let kind = tunnel_kind(cfg, req.kind.as_deref())?;
    // A tunnel credential (the field, or the bearer): its own tunnel, and nothing else.
    let (bearer, bearer_credential) = match bearer {
        Some(b) if is_credential(&b) => (None, Some(b)),
        b => (b, None),
    };
    let credential = match req
        .tunnel_credential
        .as_deref()
        .or(bearer_credential.as_deref())
    {
        Some(secret) => {
            if bearer.is_some()
                || req.management_token.is_some()
                || req.recreate_token.is_some()
                || req.issue_credential
            {
                return Err(ApiError::bad_request(
                    "a tunnel credential runs its tunnel alone: leave out the management token (bearer or management_token), recreate_token and issue_credential",
                ));
            }
            let (c, t) = verify_credential(control, secret).await?;
            if let Some(n) = req.requested_name.as_ref().filter(|n| **n != t.name) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    ErrorCode::Forbidden,
                    format!(
                        "the tunnel credential runs the tunnel '{}', not '{n}'; drop the name (--name) or pass that tunnel's credential",
                        t.name
                    ),
                ));
            }
            Some((c, t))
        }
        None => None,
    };
    let mgmt_bearer = req.management_token.clone().or(bearer);
    let mgmt = management(control, mgmt_bearer.clone()).await?;
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
    let own_tunnel = credential.is_some()
        || recreate
            .as_ref()
            .is_some_and(|r| req.requested_name.as_ref().is_none_or(|n| *n == r.name));
    if cfg.require_token && !own_tunnel {
        require_scope(&mgmt, "tunnels:write")?;
    }
    // A token limited to a name pattern makes only names that match.
    if let Some(m) = &mgmt
        && !own_tunnel
    {
        match (&req.requested_name, &m.name_pattern) {
            (Some(n), _) => authorize_name(m, n)?,
            (None, Some(p)) => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    ErrorCode::NameNotAllowed,
                    format!(
                        "this token is limited to names matching '{p}', so it cannot make a random name; request a name matching '{p}'"
                    ),
                ));
            }
            (None, None) => {}
        }
    }
    let idem = match (idempotency_key, &mgmt) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "an Idempotency-Key belongs to an owner: send it with a management token or API key (Authorization: Bearer <token>), or leave it out",
            ));
        }
        (Some(k), Some(m)) => {
            if k.is_empty()
                || k.len() > MAX_IDEMPOTENCY_KEY_LEN
                || !k.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(ApiError::bad_request(format!(
                    "the Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters (a UUID is a good key)"
                )));
            }
            Some((m.sub.clone(), k))
        }
    };
    // Anonymous: no credential at all. Checked after the tokens, so a bad token is
    // refused for what it is, and before anything is stored.
    if mgmt.is_none()
        && recreate.is_none()
        && credential.is_none()
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
            ErrorCode::TunnelDeleted,
            format!(
                "the tunnel '{}' was deleted; start without its recreate token (remove the agent's saved state) to create a new one",
                r.name
            ),
        ));
    }
    if let Some(name) = &req.requested_name {
        names::validate_labels(name, control.config().max_name_labels)
            .map_err(|e| name_error(name, e))?;
    }
    req.access.validate().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::AccessInvalid,
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
            ErrorCode::NoEdges,
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

    if req.issue_credential {
        // A named tunnel: a requested name and a management token that may write.
        let named = req.requested_name.is_some()
            && mgmt.as_ref().is_some_and(|m| m.allows("tunnels:write"));
        if !named {
            return Err(ApiError::bad_request(
                "issue_credential needs a named tunnel: a requested_name and a management token with tunnels:write",
            ));
        }
        authorize_credentials(control, mgmt_bearer.clone(), None).await?;
    }

    let (record, replayed) = match &idem {
        // A credential's tunnel exists (named, held until deleted): nothing to claim.
        _ if credential.is_some() => (
            credential.as_ref().map(|(_, t)| t.clone()).expect("some"),
            false,
        ),
        None => (
            claim_record(control, &req, recreate.as_ref(), mgmt.as_ref(), now).await?,
            false,
        ),
        Some((owner, key)) => {
            let hash = request_hash(&req);
            match idempotency_take(control, owner, key, &hash).await? {
                Some(r) => (r, true),
                None => {
                    match claim_record(control, &req, recreate.as_ref(), mgmt.as_ref(), now).await {
                        Ok(r) => {
                            control
                                .store()
                                .idempotency_finish(owner, key, &r.tunnel_id)
                                .await?;
                            (r, false)
                        }
                        Err(e) => {
                            if let Err(e2) = control.store().idempotency_abandon(owner, key).await {
                                tracing::warn!(error = %e2, "could not free an idempotency key after a failed create");
                            }
                            return Err(e);
                        }
                    }
                }
            }
        }
    };

    if record.disabled_at.is_some() {
        return Err(crate::managed::tunnel_disabled(&record));
    }
    // An enrolled tunnel run with its credential gets the policy fixed at enrolment.
    let (access, limits) = match &credential {
        Some(_) => match control.store().enrolled_policy(&record.tunnel_id).await? {
            Some(p) => {
                let p: crate::managed::EnrolledPolicy =
                    serde_json::from_str(&p).unwrap_or_default();
                let sent_own = !req.access.is_public() || !req.limits.is_empty();
                if sent_own && (req.access != p.access || req.limits != p.limits) {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        ErrorCode::PolicyFixed,
                        format!(
                            "the tunnel '{}' was enrolled with its own access policy and limits, which the agent may not change; drop the agent's access flags (--access-*, --max-body), or enrol again with the new policy",
                            record.name
                        ),
                    ));
                }
                (p.access, p.limits)
            }
            None => (req.access, req.limits),
        },
        None => (req.access, req.limits),
    };
    // A TCP tunnel's port: the one it holds, or a free one it holds from now on.
    let tcp_port = match (kind, cfg.tcp_ports) {
        (Some(netbore_tokens::KIND_TCP), Some(range)) => Some(
            control
                .store()
                .tcp_port(&record.tunnel_id, range, now)
                .await?
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorCode::TcpPortsExhausted,
                        format!(
                            "every port of control's TCP range {range} is held by a tunnel; delete one, or widen --tcp-ports on control and the edges"
                        ),
                    )
                })?,
        ),
        _ => None,
    };
    let eph_ttl = cfg.ephemeral_ttl.as_secs();
    let (ephemeral, recreate_token) = {
        let keys = control.keys();
        let mut claims =
            EphemeralClaims::new_at(now, &cfg.issuer, &record.tunnel_id, &record.name, eph_ttl);
        // No session-cookie key in the token: edges derive it from the seed control
        // sends only to authenticated edges (docs/security.md, "The cookie key").
        claims.access = access;
        claims.limits = limits;
        claims.cred = credential.as_ref().map(|(c, _)| c.id.clone());
        claims.kind = kind.map(str::to_string);
        claims.port = tcp_port;
        let e = keys.sign_ephemeral(&claims).map_err(ApiError::internal)?;
        if e.len() > netbore_tokens::MAX_TOKEN_LEN {
            return Err(ApiError::bad_request(format!(
                "the access policy makes the agent's token {} bytes long, over the {} byte limit; use fewer or shorter entries",
                e.len(),
                netbore_tokens::MAX_TOKEN_LEN
            )));
        }
        // None with a credential: a recreate token would outlive the credential's
        // revocation.
        let r = if credential.is_some() {
            String::new()
        } else {
            keys.sign_recreate(&RecreateClaims::new_at(
                now,
                &cfg.issuer,
                &record.tunnel_id,
                &record.name,
                ttl,
            ))
            .map_err(ApiError::internal)?
        };
        (e, r)
    };
    notes.push(if credential.is_some() {
        "no recreate token with a tunnel credential: the credential gets the tunnel back until it is revoked".to_string()
    } else if record.expires_at == HELD_UNTIL_DELETED {
        format!("recreate token valid for {ttl} s; the name is held until the tunnel is deleted")
    } else {
        format!(
            "recreate token valid for {ttl} s; the name is held while an agent is linked and for {} s after",
            cfg.name_hold.as_secs()
        )
    });
    if replayed {
        notes.push("the tunnel this Idempotency-Key created before".into());
    }
    let issued = if req.issue_credential {
        Some(new_credential(control, &record, String::new()).await?)
    } else {
        None
    };
    let back = recreate.is_some() || credential.is_some();
    tracing::info!(tunnel = %record.tunnel_id, name = %record.name, owner = ?record.owner, recreated = back, replayed, credential = credential.as_ref().map(|(c, _)| c.id.as_str()), "tunnel created");
    let m = control.metrics();
    m.tokens_issued[0].inc();
    if credential.is_none() {
        m.tokens_issued[1].inc();
    }
    if !replayed {
        m.tunnels_created[usize::from(back)].inc();
    }
    if !back && !replayed {
        // A names:claim that took the name over from a tunnel of its own is a claim.
        let action = if req.requested_name.is_some()
            && record.created_at < now
            && mgmt.as_ref().is_some_and(|m| m.allows("names:claim"))
        {
            "tunnel.claim"
        } else {
            "tunnel.create"
        };
        crate::audit::record(
            control,
            mgmt.as_ref().map_or("anonymous", |m| m.sub.as_str()),
            action,
            &record.tunnel_id,
            Some((&record.tunnel_id, record.owner.as_deref())),
            None,
            serde_json::json!({"name": record.name, "owner": record.owner}),
        )
        .await;
    }
    let public_url = match (tcp_port, kind) {
        (Some(p), _) => format!("tcp://{}.{}:{p}", record.name, cfg.domain),
        // Passed through by SNI on the edges' TLS listener: always https.
        (None, Some(netbore_tokens::KIND_TLS)) => {
            let url = cfg.public_url_template.replace("{name}", &record.name);
            match url.strip_prefix("http://") {
                Some(rest) => format!("https://{rest}"),
                None => url,
            }
        }
        _ => cfg.public_url_template.replace("{name}", &record.name),
    };
    Ok(CreateTunnelResponse {
        public_hostname: format!("{}.{}", record.name, cfg.domain),
        public_url,
        tcp_port,
        tunnel_id: record.tunnel_id,
        candidates: cands,
        ephemeral_token: ephemeral,
        recreate_token,
        candidates_expires_at: rfc3339(now + eph_ttl),
        note: notes.join("; "),
        credential: issued,
    })
}

/// The tunnel kind a create asks for: `None` for HTTP, else [`netbore_tokens::KIND_TCP`]
/// or [`netbore_tokens::KIND_TLS`]. Checked before anything is claimed.
fn tunnel_kind(
    cfg: &crate::ControlConfig,
    kind: Option<&str>,
) -> Result<Option<&'static str>, ApiError> {
    match kind {
        None | Some("http") => Ok(None),
        Some(netbore_tokens::KIND_TLS) => Ok(Some(netbore_tokens::KIND_TLS)),
        Some(netbore_tokens::KIND_TCP) if cfg.tcp_ports.is_some() => {
            Ok(Some(netbore_tokens::KIND_TCP))
        }
        Some(netbore_tokens::KIND_TCP) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::TcpDisabled,
            "this control makes no TCP tunnels: its operator must give it a port range (--tcp-ports 20000-20999) and the edges the same one",
        )),
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::TunnelKindInvalid,
            format!("'{other}' is not a tunnel kind; use \"http\", \"tcp\" or \"tls\""),
        )),
    }
}

/// Claims the tunnel's name in the store (the part of a create that holds anything).
async fn claim_record(
    control: &Control,
    req: &CreateTunnelRequest,
    recreate: Option<&RecreateClaims>,
    mgmt: Option<&ManagementClaims>,
    now: u64,
) -> Result<TunnelRecord, ApiError> {
    let cfg = control.config();
    let mut force = mgmt.is_some_and(|m| m.allows("names:claim"));
    // A named tunnel (a management token and a requested name) holds its name until it
    // is deleted; any other holds it for the name hold, which every edge report naming
    // the tunnel renews (see `Control::tunnels_held`).
    let named = req.requested_name.is_some() && mgmt.is_some_and(|m| m.allows("tunnels:write"));
    let hold_until = if named {
        HELD_UNTIL_DELETED
    } else {
        now.saturating_add(cfg.name_hold.as_secs())
    };
    // The owner of what a management token makes (and of what it takes over).
    let owner = mgmt.map(|m| m.sub.as_str());
    let store = control.store();

    let record: TunnelRecord = match (&req.requested_name, recreate) {
        (Some(name), Some(r)) if r.name == *name => {
            match store.claim(name, &r.sub, now, hold_until, force).await? {
                Claim::Won(rec) => rec,
                Claim::Taken(_) => return Err(name_taken(name)),
            }
        }
        (Some(name), _) => {
            let id = if force {
                match store.by_name(name, now).await? {
                    // names:claim takes over anonymous tunnels and the caller's own;
                    // another owner's only with admin (owners are isolated).
                    Some(h)
                        if h.owner.is_some()
                            && h.owner.as_deref() != owner
                            && !mgmt.is_some_and(is_admin) =>
                    {
                        force = false;
                        new_tunnel_id()
                    }
                    Some(h) => h.tunnel_id,
                    None => new_tunnel_id(),
                }
            } else {
                new_tunnel_id()
            };
            match store
                .claim_owned(name, &id, owner, now, hold_until, force)
                .await?
            {
                Claim::Won(rec) => rec,
                Claim::Taken(_) => return Err(name_taken(name)),
            }
        }
        (None, Some(r)) => match store.claim(&r.name, &r.sub, now, hold_until, false).await? {
            Claim::Won(rec) => rec,
            Claim::Taken(_) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    ErrorCode::NameTaken,
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
                    .claim_owned(&n, &new_tunnel_id(), owner, now, hold_until, false)
                    .await?
                {
                    won = Some(r);
                    break;
                }
            }
            won.ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::NamesExhausted,
                    "could not find a free random name; retry, or request a name",
                )
            })?
        }
    };
    Ok(record)
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
    let mut mgmt = None;
    let own = match &req.recreate_token {
        Some(t) => Some(
            control
                .verifier()
                .verify_recreate(t)
                .map_err(|e| ApiError::token(e, "recreate token"))?,
        ),
        None => {
            mgmt = management(control, bearer).await?;
            require_scope(&mgmt, "tunnels:write")?;
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
                ErrorCode::Forbidden,
                "the recreate token is for another tunnel; pass that tunnel's recreate token or a management token",
            ));
        }
        (Some(r), _) => {
            if let Some(m) = &mgmt {
                authorize_tunnel(m, &r, TunnelAction::Write)?;
            }
            r
        }
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
                owner: None,
                disabled_at: None,
            }
        }
        (None, _) => return Err(tunnel_not_found()),
    };
    // Revoke first, so a create racing this delete cannot bring the tunnel back.
    let until = now + control.config().recreate_ttl_max.as_secs();
    control.store().revoke(&record.tunnel_id, until).await?;
    control.store().remove(&record.tunnel_id).await?;
    control
        .announce_everywhere(&ControlEvent::TunnelDeleted(record.tunnel_id.clone()))
        .await;
    tracing::info!(tunnel = %record.tunnel_id, name = %record.name, "tunnel deleted");
    let (actor, via) = match &mgmt {
        Some(m) => (m.sub.as_str(), "management_token"),
        None => ("anonymous", "recreate_token"),
    };
    crate::audit::record(
        control,
        actor,
        "tunnel.delete",
        &record.tunnel_id,
        Some((&record.tunnel_id, record.owner.as_deref())),
        None,
        serde_json::json!({"name": record.name, "owner": record.owner, "via": via}),
    )
    .await;
    control.metrics().tunnels_deleted.inc();
    Ok(record)
}

/// One tunnel by id or name. Needs `tunnels:read`, and the tunnel must be the
/// caller's ([`authorize_tunnel`]).
pub async fn get(
    control: &Control,
    bearer: Option<String>,
    tunnel_id: Option<&str>,
    name: Option<&str>,
) -> Result<TunnelRecord, ApiError> {
    let m = management(control, bearer).await?;
    require_scope(&m, "tunnels:read")?;
    let now = now_unix();
    let r = match (tunnel_id, name) {
        (Some(id), _) => control.store().by_id(id, now).await?,
        (None, Some(n)) => control.store().by_name(n, now).await?,
        (None, None) => return Err(ApiError::bad_request("give tunnel_id or name")),
    }
    .ok_or_else(tunnel_not_found)?;
    if let Some(m) = &m {
        authorize_tunnel(m, &r, TunnelAction::Read)?;
    }
    Ok(r)
}

/// A page of tunnels ordered by name. Needs `tunnels:read`; shows the caller's own
/// tunnels within its name pattern (every tunnel with `admin`).
pub async fn list(
    control: &Control,
    bearer: Option<String>,
    q: ListTunnelsQuery,
) -> Result<ListTunnelsResponse, ApiError> {
    let m = management(control, bearer).await?;
    require_scope(&m, "tunnels:read")?;
    let Some(m) = m else {
        return Err(ApiError::bad_request("a list needs a management token"));
    };
    let limit = q
        .limit
        .unwrap_or(DEFAULT_LIST_LIMIT)
        .clamp(1, MAX_LIST_LIMIT);
    // The name pattern narrows the prefix: `ci-*` lists names starting with `ci-`
    // (and the asked prefix); an exact pattern, that one name.
    let empty = ListTunnelsResponse {
        tunnels: Vec::new(),
        next_cursor: None,
    };
    let (prefix, exact) = match m.name_pattern.as_deref() {
        None => (q.prefix.clone(), None),
        Some(p) => {
            let (pp, exact) = match p.strip_suffix('*') {
                Some(pp) => (pp, None),
                None => (p, Some(p.to_string())),
            };
            if q.prefix.starts_with(pp) && exact.is_none() {
                (q.prefix.clone(), None)
            } else if pp.starts_with(&q.prefix) {
                (pp.to_string(), exact)
            } else {
                return Ok(empty);
            }
        }
    };
    let owner = (!is_admin(&m)).then_some(m.sub.as_str());
    let mut page = control
        .store()
        .list_owned(&prefix, q.cursor.as_deref(), limit + 1, now_unix(), owner)
        .await?;
    if let Some(x) = &exact {
        page.retain(|r| r.name == *x);
    }
    let next = (page.len() > limit).then(|| page[limit - 1].name.clone());
    page.truncate(limit);
    // Each with its live status; without it (live state unreachable) the list still
    // answers, and the tunnels carry no status fields.
    let live = match control.tunnel_status(&page).await {
        Ok(v) => v.into_iter().map(Some).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "tunnel list served without live status");
            vec![None; page.len()]
        }
    };
    Ok(ListTunnelsResponse {
        tunnels: page
            .iter()
            .zip(live)
            .map(|(r, status)| Tunnel {
                status,
                ..tunnel_view(control, r)
            })
            .collect(),
        next_cursor: next,
    })
}

/// A tunnel's live status (`GET /v1/tunnels/{id}/status`, gRPC `GetTunnelStatus`),
/// authorised as [`get`]: `tunnels:read` on the caller's own tunnel.
pub async fn status(
    control: &Control,
    bearer: Option<String>,
    tunnel_id: Option<&str>,
    name: Option<&str>,
) -> Result<netbore_api::types::TunnelStatus, ApiError> {
    let r = get(control, bearer, tunnel_id, name).await?;
    let status = control
        .tunnel_status(std::slice::from_ref(&r))
        .await?
        .pop()
        .expect("one status per record");
    Ok(netbore_api::types::TunnelStatus {
        tunnel_id: r.tunnel_id,
        name: r.name,
        status,
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
    let r = match &bearer {
        Some(b) if api_keys::is_api_key(b) => issue_from_key(control, b, req).await,
        _ => issue_token_inner(control, bearer, req),
    };
    counted(control, Op::IssueToken, r)
}

/// A management token from an API key: the key's owner as subject, at most its scopes
/// (all of them by default), its name pattern, and never past its expiry.
async fn issue_from_key(
    control: &Control,
    key: &str,
    req: IssueTokenRequest,
) -> Result<IssueTokenResponse, ApiError> {
    let k = api_keys::verify(control, key).await?;
    let key_admin = k.scopes.iter().any(|s| s == "admin");
    let scopes = req.scopes.unwrap_or_else(|| k.scopes.clone());
    check_scopes(&scopes)?;
    if let Some(s) = scopes.iter().find(|s| !key_admin && !k.scopes.contains(s)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!(
                "the API key {} does not grant the scope '{s}' (it grants {}); ask for fewer scopes, or use a key that has it",
                k.prefix,
                k.scopes.join(", ")
            ),
        ));
    }
    if let Some(sub) = req.subject.as_deref()
        && sub != k.owner
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!(
                "a token minted from an API key is for the key's owner ('{}'); leave subject out",
                k.owner
            ),
        ));
    }
    let cfg = control.config();
    let max = cfg.management_ttl.as_secs().max(MIN_MANAGEMENT_TTL_SECS);
    let ttl = req
        .ttl_seconds
        .unwrap_or(max)
        .clamp(MIN_MANAGEMENT_TTL_SECS, max);
    let claims = api_keys::claims_of(control, &k, scopes.clone(), ttl);
    let token = control
        .keys()
        .sign_management(&claims)
        .map_err(ApiError::internal)?;
    tracing::info!(subject = %claims.sub, key = %k.id, scopes = ?scopes, ttl, "management token issued from an API key");
    control.metrics().tokens_issued[2].inc();
    Ok(IssueTokenResponse {
        token,
        scopes,
        expires_at: rfc3339(claims.exp),
    })
}

fn check_scopes(scopes: &[String]) -> Result<(), ApiError> {
    if scopes.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidScope,
            format!(
                "a token needs at least one scope; known scopes: {}",
                SCOPES.join(", ")
            ),
        ));
    }
    if let Some(bad) = scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidScope,
            format!("unknown scope '{bad}'; known scopes: {}", SCOPES.join(", ")),
        ));
    }
    Ok(())
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
            ErrorCode::BootstrapDisabled,
            "no bootstrap credential is configured; set NETBORE_BOOTSTRAP_TOKEN (or --bootstrap-token-file) on control",
        ));
    };
    let Some(given) = bearer else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "send the bootstrap credential as 'Authorization: Bearer <credential>'",
        ));
    };
    if !secrets_equal(&given, boot.expose()) {
        tracing::warn!("a management token was refused: wrong bootstrap credential");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::BadCredential,
            "the bootstrap credential is wrong; use the value control was started with (NETBORE_BOOTSTRAP_TOKEN)",
        ));
    }
    let scopes = req
        .scopes
        .unwrap_or_else(|| DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect());
    check_scopes(&scopes)?;
    if req.subject.as_deref() == Some("") {
        return Err(ApiError::bad_request(
            "subject is empty; leave it out (the token is then for 'bootstrap') or name who it is for",
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
    control.metrics().tokens_issued[2].inc();
    Ok(IssueTokenResponse {
        token,
        scopes,
        expires_at: rfc3339(claims.exp),
    })
}

// ---- Tunnel credentials (`nbt_…`) ----

/// Every tunnel credential's secret starts with this, so it is told apart from a JWT.
pub const CREDENTIAL_SECRET_PREFIX: &str = "nbt_";
/// Random bytes in a credential's secret (hex after [`CREDENTIAL_SECRET_PREFIX`]).
pub const CREDENTIAL_SECRET_BYTES: usize = 32;
/// Characters of the secret kept (as `prefix`) for display and lookup:
/// [`CREDENTIAL_SECRET_PREFIX`] and 12 hex digits (48 of its 256 bits).
pub const CREDENTIAL_PREFIX_LEN: usize = CREDENTIAL_SECRET_PREFIX.len() + 12;
/// Longest credential label, in bytes.
pub const MAX_CREDENTIAL_LABEL: usize = 128;
/// Most unrevoked credentials one tunnel may have (rotation needs two).
pub const MAX_CREDENTIALS_PER_TUNNEL: usize = 20;

/// Whether `bearer` looks like a tunnel credential rather than a token.
pub fn is_credential(bearer: &str) -> bool {
    bearer.starts_with(CREDENTIAL_SECRET_PREFIX)
}

fn sha256_hex(s: &str) -> String {
    use aws_lc_rs::digest::{SHA256, digest};
    digest(&SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tunnel credential as the APIs show it.
pub fn credential_view(r: &CredentialRecord) -> TunnelCredential {
    TunnelCredential {
        credential_id: r.id.clone(),
        tunnel_id: r.tunnel_id.clone(),
        prefix: r.prefix.clone(),
        label: r.label.clone(),
        created_at: rfc3339(r.created_at),
        last_used_at: r.last_used_at.map(rfc3339),
        revoked_at: r.revoked_at.map(rfc3339),
    }
}

/// Who may manage a tunnel's credentials (issue, list, revoke): a management token or
/// API key with `tunnels:write` for its own tunnel ([`authorize_tunnel`]: another
/// owner's tunnel is `tunnel_not_found`), or `admin` for any. `tunnel` is `None` when
/// no such tunnel exists (the caller is checked first, so a stranger learns nothing).
pub async fn authorize_credentials(
    control: &Control,
    bearer: Option<String>,
    tunnel: Option<&TunnelRecord>,
) -> Result<(), ApiError> {
    let m = management(control, bearer).await?;
    require_scope(&m, "tunnels:write")?;
    match (m, tunnel) {
        (Some(m), Some(t)) => authorize_tunnel(&m, t, TunnelAction::Write),
        _ => Ok(()),
    }
}

/// The named tunnel `tunnel` (an id `tun_…`, or a name) whose credentials the caller
/// may manage.
async fn credential_tunnel(
    control: &Control,
    bearer: Option<String>,
    tunnel: &str,
) -> Result<TunnelRecord, ApiError> {
    let now = now_unix();
    let found = if tunnel.starts_with("tun_") {
        control.store().by_id(tunnel, now).await?
    } else {
        control.store().by_name(tunnel, now).await?
    };
    authorize_credentials(control, bearer, found.as_ref()).await?;
    let t = found.ok_or_else(tunnel_not_found)?;
    if t.expires_at != HELD_UNTIL_DELETED {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::TunnelNotNamed,
            format!(
                "the tunnel '{}' is a quick tunnel; credentials are for named tunnels, which hold their name until deleted: create one with a management token and a name (POST /tunnels/create with requested_name)",
                t.name
            ),
        ));
    }
    Ok(t)
}

/// Issues a credential for `tunnel` (a named tunnel's id or name): the secret is in
/// the answer and nowhere else. Authorised by [`authorize_credentials`].
pub async fn issue_credential(
    control: &Control,
    bearer: Option<String>,
    tunnel: &str,
    req: IssueCredentialRequest,
) -> Result<IssuedCredential, ApiError> {
    let t = credential_tunnel(control, bearer, tunnel).await?;
    new_credential(control, &t, req.label).await
}

pub(crate) async fn new_credential(
    control: &Control,
    t: &TunnelRecord,
    label: String,
) -> Result<IssuedCredential, ApiError> {
    if label.len() > MAX_CREDENTIAL_LABEL || label.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "the label is longer than {MAX_CREDENTIAL_LABEL} bytes or holds control characters; give a short one such as 'prod-sidecar'"
        )));
    }
    let active = control
        .store()
        .credentials_of(&t.tunnel_id)
        .await?
        .iter()
        .filter(|c| c.revoked_at.is_none())
        .count();
    if active >= MAX_CREDENTIALS_PER_TUNNEL {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::TooManyCredentials,
            format!(
                "the tunnel '{}' has {active} unrevoked credentials, the most one may have; revoke unused ones (DELETE /v1/tunnels/{}/credentials/<id>)",
                t.name, t.tunnel_id
            ),
        ));
    }
    let now = now_unix();
    let bytes: [u8; CREDENTIAL_SECRET_BYTES] = rand::random();
    let secret = format!(
        "{CREDENTIAL_SECRET_PREFIX}{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let id: u128 = rand::random();
    let rec = CredentialRecord {
        id: format!("tcr_{:026x}", id & ((1u128 << 104) - 1)),
        tunnel_id: t.tunnel_id.clone(),
        prefix: secret[..CREDENTIAL_PREFIX_LEN].to_string(),
        label,
        created_at: now,
        last_used_at: None,
        revoked_at: None,
    };
    control
        .store()
        .insert_credential(&rec, &sha256_hex(&secret))
        .await?;
    tracing::info!(tunnel = %t.tunnel_id, credential = %rec.id, "tunnel credential issued");
    crate::audit::record(
        control,
        &crate::audit::actor(),
        "credential.issue",
        &rec.id,
        Some((&t.tunnel_id, t.owner.as_deref())),
        None,
        serde_json::json!({"prefix": rec.prefix, "label": rec.label}),
    )
    .await;
    Ok(IssuedCredential {
        credential: credential_view(&rec),
        secret,
    })
}

/// The credentials of `tunnel`, revoked ones included; never a secret.
pub async fn list_credentials(
    control: &Control,
    bearer: Option<String>,
    tunnel: &str,
) -> Result<ListCredentialsResponse, ApiError> {
    let t = credential_tunnel(control, bearer, tunnel).await?;
    let list = control.store().credentials_of(&t.tunnel_id).await?;
    Ok(ListCredentialsResponse {
        credentials: list.iter().map(credential_view).collect(),
    })
}

/// Revokes credential `credential_id` of `tunnel`: control refuses it from now on
/// (401 `credential_revoked`), and every edge, through every replica, closes the links
/// that used it and refuses its ephemeral tokens ([`ControlEvent::CredentialRevoked`]). Revoking
/// twice is harmless (the first time is kept; the edges are told again).
pub async fn revoke_credential(
    control: &Control,
    bearer: Option<String>,
    tunnel: &str,
    credential_id: &str,
) -> Result<TunnelCredential, ApiError> {
    let t = credential_tunnel(control, bearer, tunnel).await?;
    let rec = control
        .store()
        .revoke_credential(&t.tunnel_id, credential_id, now_unix())
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::CredentialNotFound,
                format!(
                    "the tunnel '{}' has no credential '{credential_id}'; list them with GET /v1/tunnels/{}/credentials",
                    t.name, t.tunnel_id
                ),
            )
        })?;
    control
        .announce_everywhere(&ControlEvent::CredentialRevoked(rec.id.clone()))
        .await;
    tracing::info!(tunnel = %t.tunnel_id, credential = %rec.id, "tunnel credential revoked");
    crate::audit::record(
        control,
        &crate::audit::actor(),
        "credential.revoke",
        &rec.id,
        Some((&t.tunnel_id, t.owner.as_deref())),
        None,
        serde_json::json!({"prefix": rec.prefix}),
    )
    .await;
    Ok(credential_view(&rec))
}

/// Revokes credential `credential_id` of tunnel `t` as of `at` (Unix seconds): at once
/// when `at` is now or past, else control refuses it from `at` on and the edges are
/// told then (by this replica; if it restarts before, the links that used it last
/// until their agent next asks control for a token).
pub(crate) async fn revoke_credential_at(
    control: &Control,
    t: &TunnelRecord,
    credential_id: &str,
    at: u64,
) -> Result<(), ApiError> {
    let Some(rec) = control
        .store()
        .revoke_credential(&t.tunnel_id, credential_id, at)
        .await?
    else {
        return Ok(());
    };
    let event = ControlEvent::CredentialRevoked(rec.id.clone());
    let now = now_unix();
    if at <= now {
        control.announce_everywhere(&event).await;
    } else {
        let control = control.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(at - now)).await;
            control.announce_everywhere(&event).await;
        });
    }
    crate::audit::record(
        control,
        &crate::audit::actor(),
        "credential.revoke",
        &rec.id,
        Some((&t.tunnel_id, t.owner.as_deref())),
        None,
        serde_json::json!({"prefix": rec.prefix, "effective_at": rfc3339(at)}),
    )
    .await;
    Ok(())
}

fn credential_invalid(why: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        ErrorCode::CredentialInvalid,
        format!(
            "the tunnel credential was refused: {why}; pass the whole nbt_… secret as issued, or issue a new one (POST /v1/tunnels/<tunnel>/credentials)"
        ),
    )
}

/// The credential `secret` names and its tunnel, or why it is refused.
async fn verify_credential(
    control: &Control,
    secret: &str,
) -> Result<(CredentialRecord, TunnelRecord), ApiError> {
    let well_formed = secret.len() == CREDENTIAL_SECRET_PREFIX.len() + 2 * CREDENTIAL_SECRET_BYTES
        && is_credential(secret)
        && secret[CREDENTIAL_SECRET_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit());
    if !well_formed {
        return Err(credential_invalid("it is not a tunnel credential"));
    }
    let Some((rec, hash)) = control
        .store()
        .credential_by_prefix(&secret[..CREDENTIAL_PREFIX_LEN])
        .await?
    else {
        return Err(credential_invalid(
            "no such credential (its tunnel may have been deleted)",
        ));
    };
    if !secrets_equal(&sha256_hex(secret), &hash) {
        return Err(credential_invalid("no such credential"));
    }
    if let Some(at) = rec.revoked_at.filter(|at| *at <= now_unix()) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::CredentialRevoked,
            format!(
                "the tunnel credential {} was revoked at {}; issue a new one (POST /v1/tunnels/{}/credentials) and run the agent with it",
                rec.id,
                rfc3339(at),
                rec.tunnel_id
            ),
        ));
    }
    let now = now_unix();
    let Some(t) = control.store().by_id(&rec.tunnel_id, now).await? else {
        return Err(credential_invalid("its tunnel was deleted"));
    };
    if let Err(e) = control.store().touch_credential(&rec.id, now).await {
        tracing::debug!(credential = %rec.id, error = %e, "last use of a credential not recorded");
    }
    Ok((rec, t))
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
    fn authorize_tunnel_checks_scope_then_owner_then_name_pattern() {
        let claims = |sub: &str, scopes: &[&str], pattern: Option<&str>| {
            let mut c = ManagementClaims::new_at(
                0,
                "iss",
                sub,
                scopes.iter().map(|s| s.to_string()).collect(),
                60,
            );
            c.name_pattern = pattern.map(str::to_string);
            c
        };
        let rec = |name: &str, owner: Option<&str>| TunnelRecord {
            tunnel_id: "tun_1".into(),
            name: name.into(),
            created_at: 0,
            expires_at: 1,
            owner: owner.map(str::to_string),
            disabled_at: None,
        };
        let code = |r: Result<(), ApiError>| r.err().map(|e| e.code);
        let (read, write) = (TunnelAction::Read, TunnelAction::Write);
        let alice = claims("alice", &["tunnels:read", "tunnels:write"], None);
        assert_eq!(
            code(authorize_tunnel(&alice, &rec("a", Some("alice")), write)),
            None
        );
        for other in [Some("bob"), None] {
            assert_eq!(
                code(authorize_tunnel(&alice, &rec("a", other), read)),
                Some(ErrorCode::TunnelNotFound)
            );
        }
        let ro = claims("alice", &["tunnels:read"], None);
        assert_eq!(
            code(authorize_tunnel(&ro, &rec("a", Some("alice")), write)),
            Some(ErrorCode::Forbidden)
        );
        let admin = claims("ops", &["admin"], None);
        assert_eq!(code(authorize_tunnel(&admin, &rec("a", None), write)), None);
        let ci = claims("ci", &["tunnels:read"], Some("ci-*"));
        assert_eq!(
            code(authorize_tunnel(&ci, &rec("ci-1", Some("ci")), read)),
            None
        );
        assert_eq!(
            code(authorize_tunnel(&ci, &rec("prod", Some("ci")), read)),
            Some(ErrorCode::NameNotAllowed)
        );
    }

    #[test]
    fn times_format_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(u64::MAX), "");
    }
}
