//! The REST API's JSON types, shared by the server (`netbore_control::rest`) and the
//! client ([`crate::client`]). The contract, field by field, is `docs/control.md`.
//!
//! Requests refuse unknown fields, so a misspelt field is an error rather than a
//! silently ignored wish; optional fields are left out when unset.

use netbore_tokens::access::{AccessPolicy, TunnelLimits};
use serde::{Deserialize, Serialize};

/// `POST /tunnels/create` request. Every field is optional: `{}` creates a tunnel with a
/// random name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTunnelRequest {
    /// The name to claim (a DNS label). Without it, control picks a readable random
    /// name, or the recreate token's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_name: Option<String>,
    /// Transports the agent can use, preferred first (`"wss"`, `"ws"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_transports: Vec<String>,
    /// Region to prefer; its edges are listed first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_hint: Option<String>,
    /// Requested recreate token lifetime; clamped to control's maximum (the response's
    /// `note` says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recreate_token_ttl_seconds: Option<u64>,
    /// A management token (the `Authorization: Bearer` header works too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_token: Option<String>,
    /// A recreate token from an earlier create: gets the same tunnel and name back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recreate_token: Option<String>,
    /// Who may reach the tunnel (left out: public). Signed into the ephemeral token,
    /// so every edge enforces it; send it again with every create (the agent does).
    #[serde(default, skip_serializing_if = "AccessPolicy::is_public")]
    pub access: AccessPolicy,
    /// The tunnel's own limits, applied by edges on top of their own.
    #[serde(default, skip_serializing_if = "TunnelLimits::is_empty")]
    pub limits: TunnelLimits,
    /// A tunnel credential (`nbt_…`; the `Authorization: Bearer` header works too):
    /// gets its tunnel back, name included, with no other secret. The ephemeral token
    /// then names the credential, and no recreate token is issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_credential: Option<String>,
    /// With a management token (`tunnels:write`) and a requested name: also issue a
    /// tunnel credential, returned once in the response's `credential`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub issue_credential: bool,
    /// What the tunnel carries: left out (or `"http"`) for HTTP, `"tcp"` for raw TCP
    /// on a port control allocates (kept for the tunnel's life), `"tls"` for TLS
    /// passed through by SNI to an origin that holds its own certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// One edge an agent may connect to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Edge id.
    pub edge_id: String,
    /// `ws://` or `wss://` URL to connect to.
    pub edge_url: String,
    /// `wss` or `ws`.
    pub supported_transport: String,
    /// The edge's region.
    pub region: String,
    /// Why it is in this position (may be empty).
    #[serde(default)]
    pub note: String,
}

/// `POST /tunnels/create` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateTunnelResponse {
    /// Tunnel id (`sub` of both tokens).
    pub tunnel_id: String,
    /// `NAME.<domain>`.
    pub public_hostname: String,
    /// The URL viewers open.
    pub public_url: String,
    /// Edges to try, in order (1 to 3).
    pub candidates: Vec<Candidate>,
    /// Token for the agent's handshake at an edge (minutes long).
    pub ephemeral_token: String,
    /// Token to get this tunnel back later (days long).
    pub recreate_token: String,
    /// When the ephemeral token, and so this candidate list, expires (RFC 3339).
    pub candidates_expires_at: String,
    /// Anything the caller should know, such as a clamped lifetime.
    #[serde(default)]
    pub note: String,
    /// The credential issued with `issue_credential` (its secret shown this once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<IssuedCredential>,
    /// The public TCP port of a `tcp` tunnel (the same on every edge, kept while the
    /// tunnel exists); left out for other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_port: Option<u16>,
}

impl CreateTunnelResponse {
    /// The tunnel's public name (the first label of the hostname).
    pub fn name(&self) -> &str {
        self.public_hostname
            .split('.')
            .next()
            .unwrap_or(&self.public_hostname)
    }
}

/// `POST /tunnels/delete` request: the tunnel by id or name, and either a management
/// token (header) or the tunnel's own recreate token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteTunnelRequest {
    /// The tunnel to delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_id: Option<String>,
    /// Or its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The tunnel's recreate token, instead of a management token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recreate_token: Option<String>,
}

/// `POST /tunnels/delete` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteTunnelResponse {
    /// The deleted tunnel's id.
    pub deleted: String,
    /// The name it freed.
    pub name: String,
}

/// `GET /tunnels/list` query string.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListTunnelsQuery {
    /// Only names starting with this.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Page size (default `netbore_control::ops::DEFAULT_LIST_LIMIT`, at most
    /// `netbore_control::ops::MAX_LIST_LIMIT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// A tunnel as the list and get operations show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tunnel {
    /// Tunnel id.
    pub tunnel_id: String,
    /// Public name.
    pub name: String,
    /// `NAME.<domain>`.
    pub public_hostname: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When its name is released unless it is recreated (RFC 3339).
    pub expires_at: String,
    /// Who owns it: the subject of the token or API key that created it; `null` for
    /// an anonymous quick tunnel.
    #[serde(default)]
    pub owner: Option<String>,
    /// When its owner disabled it (RFC 3339); absent while enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<String>,
    /// Its live status (lists carry it; absent where an answer has none).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub status: Option<LiveStatus>,
}

/// `POST /v1/enroll` request: a platform's machine (`external_id`) gets its tunnel,
/// the same one however often it asks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The platform's id for the machine (1 to 255 printable ASCII characters): one
    /// tunnel per (owner, external id).
    pub external_id: String,
    /// The name to give a new tunnel; without it control picks a random name. Ignored
    /// when the tunnel exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_name: Option<String>,
    /// Labels stored with the enrolment (at most 32; keys up to 63 characters of
    /// `a-z0-9._/-`, values up to 256).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Who may reach the tunnel: applied whenever an agent runs it with its credential
    /// (the agent's own `--access` flags are then refused).
    #[serde(default, skip_serializing_if = "AccessPolicy::is_public")]
    pub access: AccessPolicy,
    /// Per-request limits, applied the same way.
    #[serde(default, skip_serializing_if = "TunnelLimits::is_empty")]
    pub limits: TunnelLimits,
    /// Issue a new credential for an existing tunnel; the previous ones are revoked
    /// after `reissue_grace_seconds`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reissue_credential: bool,
    /// How long the previous credentials keep working after a reissue (default 0: at
    /// once; at most 7 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reissue_grace_seconds: Option<u64>,
}

/// `POST /v1/enroll` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// Tunnel id.
    pub tunnel_id: String,
    /// Public name.
    pub name: String,
    /// `NAME.<domain>`.
    pub hostname: String,
    /// The URL viewers open.
    pub public_url: String,
    /// The tunnel credential (`nbt_…`) to run the agent with: only when the tunnel was
    /// created by this call or `reissue_credential` was asked. Control keeps only its
    /// hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_token: Option<String>,
    /// The id of that credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    /// True when this call created the tunnel.
    pub created: bool,
    /// True while the tunnel is disabled.
    #[serde(default)]
    pub disabled: bool,
}

/// `GET /v1/tunnels/{id}/status` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelStatus {
    /// Tunnel id.
    pub tunnel_id: String,
    /// Public name.
    pub name: String,
    /// The live status.
    #[serde(flatten)]
    pub status: LiveStatus,
}

/// A tunnel's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelState {
    /// A link is live and the origin answers.
    Ready,
    /// Live but impaired; `reasons` say how and what to do.
    Degraded,
    /// No link for longer than control's offline threshold.
    Offline,
    /// Disabled by its owner: refused everywhere until enabled.
    Disabled,
}

impl TunnelState {
    /// The wire name (`ready`, `degraded`, `offline`, `disabled`).
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelState::Ready => "ready",
            TunnelState::Degraded => "degraded",
            TunnelState::Offline => "offline",
            TunnelState::Disabled => "disabled",
        }
    }
}

/// Why a tunnel is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusReasonCode {
    /// The agent's probe of its origin fails.
    OriginUnreachable,
    /// The agent holds links to fewer distinct edges than it asked for.
    FewerEdgesThanRequested,
    /// The agent is much older than this control plane and its edges.
    AgentOutdated,
    /// No agent link is live.
    NoLink,
}

/// A reason with a sentence naming the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReason {
    /// Stable code.
    pub code: StatusReasonCode,
    /// What is wrong and what to do.
    pub message: String,
}

/// One live agent link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The edge holding it.
    pub edge_id: String,
    /// The link's session id on that edge.
    pub link_id: String,
    /// When it opened (RFC 3339).
    pub connected_since: String,
    /// The agent's self-description (`netbore/0.1.0`).
    pub agent_version: String,
    /// The agent's instance id (empty for agents without one).
    pub agent_instance_id: String,
    /// The agent's address as the edge sees it.
    pub agent_addr: String,
}

/// The origin as the agent last probed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginStatus {
    /// The probe succeeded.
    pub healthy: bool,
    /// `healthy`, `connection_refused`, `timed_out`, `tls_refused`, `server_error`,
    /// `unreachable` or `unknown`.
    pub cause: String,
    /// What the probe saw.
    pub message: String,
    /// When the edge received the report (RFC 3339).
    pub checked_at: String,
}

/// The live part of a tunnel's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveStatus {
    /// `ready`, `degraded`, `offline` or `disabled`.
    pub state: TunnelState,
    /// Why it is not `ready` (empty when it is).
    pub reasons: Vec<StatusReason>,
    /// Live agent links.
    pub links: Vec<LinkStatus>,
    /// When a link was last live (RFC 3339); `null`: not within control's memory.
    pub last_seen: Option<String>,
    /// The origin's health as the agent last measured it; `null`: never reported.
    pub origin: Option<OriginStatus>,
    /// Requests over the last 5 minutes, over all edges.
    pub requests_5m: u64,
    /// Of which failed (5xx, reset, no answer in time).
    pub errors_5m: u64,
}

/// `GET /tunnels/list` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListTunnelsResponse {
    /// One page, ordered by name.
    pub tunnels: Vec<Tunnel>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    pub next_cursor: Option<String>,
}

/// `POST /auth/token` request (the body may be empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueTokenRequest {
    /// Scopes (default `tunnels:read`, `tunnels:write`); see `netbore_control::ops::SCOPES`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// Lifetime in seconds (default and maximum: control's management token lifetime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Who the token is for (its `sub`, shown in logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// `POST /auth/token` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueTokenResponse {
    /// The management token.
    pub token: String,
    /// Its scopes.
    pub scopes: Vec<String>,
    /// Its expiry (RFC 3339).
    pub expires_at: String,
}

/// `POST /v1/api-keys` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    /// What to call it (shown in lists; at most
    /// [`crate::api_keys::MAX_LABEL_BYTES`] bytes).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    /// Scopes it grants (default `tunnels:read`, `tunnels:write`); the caller must
    /// hold each unless it has `admin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// Lifetime in seconds; left out: it never expires (revoke it instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
    /// Limits it to names matching this (`ci-*`: a prefix and `*`, or one exact name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_pattern: Option<String>,
    /// Whose key it is (default: the caller's own subject; another needs `admin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// An API key as lists show it: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// `key_…`: what `DELETE /v1/api-keys/{id}` takes.
    pub id: String,
    /// Its owner's subject.
    pub owner: String,
    /// Its first characters (`nbk_` and 8 more), to recognise it.
    pub prefix: String,
    /// Its label.
    pub label: String,
    /// Scopes it grants.
    pub scopes: Vec<String>,
    /// Names it is limited to, if any.
    pub name_pattern: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339; `null`: never.
    pub expires_at: Option<String>,
    /// RFC 3339 (to within a few seconds); `null`: never used.
    pub last_used_at: Option<String>,
    /// RFC 3339; `null`: in force.
    pub revoked_at: Option<String>,
}

/// `POST /v1/api-keys` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateApiKeyResponse {
    /// The key itself (`nbk_…`). Shown this once: control keeps only its hash.
    pub key: String,
    /// What lists show of it.
    pub api_key: ApiKey,
}

/// `GET /v1/api-keys` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListApiKeysResponse {
    /// The caller's keys (every owner's for `admin`), newest first.
    pub api_keys: Vec<ApiKey>,
}

/// A tunnel credential as the APIs show it: never its secret, only the secret's first
/// characters (`prefix`) to tell credentials apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelCredential {
    /// Credential id (`tcr_…`), for revoking it.
    pub credential_id: String,
    /// The tunnel it runs.
    pub tunnel_id: String,
    /// The secret's first characters (`nbt_` and 12 more), for display.
    pub prefix: String,
    /// The label given at issue (may be empty).
    #[serde(default)]
    pub label: String,
    /// When it was issued (RFC 3339).
    pub created_at: String,
    /// When an agent last got a token with it (RFC 3339), if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<String>,
    /// When it was revoked (RFC 3339), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// `POST /v1/tunnels/{id}/credentials` request (the body may be empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueCredentialRequest {
    /// A label to tell credentials apart (e.g. `prod-sidecar`; at most
    /// [`crate::ops::MAX_CREDENTIAL_LABEL`] bytes).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
}

/// A credential just issued: the only time its secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCredential {
    /// The credential.
    #[serde(flatten)]
    pub credential: TunnelCredential,
    /// The secret (`nbt_…`): pass it to the agent (`--tunnel-token`,
    /// `NETBORE_TUNNEL_TOKEN`). Control keeps only its SHA-256.
    pub secret: String,
}

/// `GET /v1/tunnels/{id}/credentials` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListCredentialsResponse {
    /// The tunnel's credentials, revoked ones included, oldest first.
    pub credentials: Vec<TunnelCredential>,
}

/// Every error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error inside an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable snake_case code (`name_taken`, `token_expired`, ...).
    pub code: crate::ErrorCode,
    /// What happened and what to do about it.
    pub message: String,
}

/// `GET /v1/audit` query.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only events about this tunnel (id `tun_…`).
    pub tunnel: Option<String>,
    /// Only events about this owner's objects (a subject).
    pub owner: Option<String>,
    /// Only this action (`tunnel.create`, …).
    pub action: Option<String>,
    /// Only events at or after this time (RFC 3339 or Unix seconds).
    pub since: Option<String>,
    /// Most events (default 100, at most 1000).
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One event as the APIs show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEventView {
    /// Event id (sorts by time).
    pub id: String,
    /// When (RFC 3339).
    pub at: String,
    /// Who acted: a subject, `anonymous`, or `edge:<id>` for link events.
    pub actor: String,
    /// The API key the actor used, when the bearer was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The client address the request came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// What was done.
    pub action: String,
    /// What it was done to (a tunnel, credential or key id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The tunnel it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel_id: Option<String>,
    /// Whose object it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Details (never a secret).
    pub detail: serde_json::Value,
}

/// A page of events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPage {
    /// Oldest first.
    pub events: Vec<AuditEventView>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}
