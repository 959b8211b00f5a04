//! Control's gRPC front end: `netbore.control.v1.ControlService` for operators,
//! `netbore.edge.v1.EdgeService` for edges, plus server reflection (v1 and v1alpha) and
//! `grpc.health.v1` (the overall service `""` and `readiness`), so `grpcurl` works with no
//! `.proto` file at hand.

use netbore_api::{ControlEvent, ErrorCode};
use std::pin::Pin;
use std::time::Duration;

use axum::http::StatusCode;
use futures_util::Stream;
use netbore_proto::control::v1 as pb;
use netbore_proto::control::v1::control_service_server::{ControlService, ControlServiceServer};
use netbore_proto::edge::v1 as epb;
use netbore_proto::edge::v1::edge_service_server::{EdgeService, EdgeServiceServer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::api::{
    ApiKey, CreateApiKeyRequest, CreateTunnelRequest, DeleteTunnelRequest, IssueCredentialRequest,
    IssueTokenRequest, IssuedCredential, ListTunnelsQuery, TunnelCredential,
};
use crate::ops::{self, ApiError};
use crate::store::TunnelRecord;
use crate::{Control, EdgeEntry, EdgeStatus};

/// The REST/token form of a gRPC access policy (empty strings are unset).
fn access_from_pb(p: pb::AccessPolicy) -> netbore_tokens::access::AccessPolicy {
    use netbore_tokens::access::{AccessPolicy, BasicUser, JwtPolicy};
    AccessPolicy {
        jwt: p.jwt.map(|j| JwtPolicy {
            alg: non_empty(j.alg),
            public_key_pem: non_empty(j.public_key_pem),
            secret: non_empty(j.secret).map(netbore_tokens::Secret::new),
            claims: j.claims.into_iter().collect(),
            audience: non_empty(j.audience),
            issuer: non_empty(j.issuer),
            forward_claims: j.forward_claims,
        }),
        basic_auth: p
            .basic_auth
            .into_iter()
            .map(|u| BasicUser {
                user: u.user,
                hash: u.hash,
            })
            .collect(),
        ip_allow: p.ip_allow,
        ip_deny: p.ip_deny,
        frame_ancestors: p.frame_ancestors,
        cors_origins: p.cors_origins,
    }
}

fn status(e: ApiError) -> Status {
    let code = match e.status {
        StatusCode::BAD_REQUEST => Code::InvalidArgument,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::NotFound,
        // The tunnel existed and was deleted: retrying the same call cannot succeed.
        StatusCode::GONE => Code::FailedPrecondition,
        StatusCode::CONFLICT => Code::AlreadyExists,
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        StatusCode::TOO_MANY_REQUESTS => Code::ResourceExhausted,
        // The same idempotency key with another request: retrying cannot succeed.
        StatusCode::UNPROCESSABLE_ENTITY => Code::FailedPrecondition,
        _ => Code::Internal,
    };
    let mut md = tonic::metadata::MetadataMap::new();
    if let Ok(v) = e.code.as_str().parse() {
        md.insert(ERROR_CODE_METADATA, v);
    }
    if let Some(s) = e.retry_after_secs
        && let Ok(v) = s.to_string().parse()
    {
        md.insert("retry-after", v);
    }
    Status::with_metadata(code, format!("{}: {}", e.code, e.message), md)
}

/// Trailer carrying the stable error code (`name_taken`, `token_expired`, ...), the
/// same code REST puts in `error.code`.
pub const ERROR_CODE_METADATA: &str = "netbore-error-code";

fn bearer<T>(r: &Request<T>) -> Option<String> {
    ops::bearer_value(r.metadata().get("authorization")?.to_str().ok()?)
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn tunnel(control: &Control, r: &TunnelRecord) -> pb::Tunnel {
    tunnel_pb(ops::tunnel_view(control, r))
}

fn tunnel_pb(t: crate::api::Tunnel) -> pb::Tunnel {
    let live = t.status.map(live_pb);
    let mut out = pb::Tunnel {
        tunnel_id: t.tunnel_id,
        name: t.name,
        public_hostname: t.public_hostname,
        created_at: t.created_at,
        expires_at: t.expires_at,
        owner: t.owner.unwrap_or_default(),
        disabled_at: t.disabled_at.unwrap_or_default(),
        ..Default::default()
    };
    if let Some(l) = live {
        out.state = l.state;
        out.reasons = l.reasons;
        out.links = l.links;
        out.last_seen = l.last_seen;
        out.origin = l.origin;
        out.requests_5m = l.requests_5m;
        out.errors_5m = l.errors_5m;
    }
    out
}

fn api_key(k: ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id,
        owner: k.owner,
        prefix: k.prefix,
        label: k.label,
        scopes: k.scopes,
        name_pattern: k.name_pattern.unwrap_or_default(),
        created_at: k.created_at,
        expires_at: k.expires_at.unwrap_or_default(),
        last_used_at: k.last_used_at.unwrap_or_default(),
        revoked_at: k.revoked_at.unwrap_or_default(),
    }
}

fn credential_pb(c: TunnelCredential) -> pb::TunnelCredential {
    pb::TunnelCredential {
        credential_id: c.credential_id,
        tunnel_id: c.tunnel_id,
        prefix: c.prefix,
        label: c.label,
        created_at: c.created_at,
        last_used_at: c.last_used_at.unwrap_or_default(),
        revoked_at: c.revoked_at.unwrap_or_default(),
    }
}

fn issued_pb(c: IssuedCredential) -> pb::IssueTunnelCredentialResponse {
    pb::IssueTunnelCredentialResponse {
        credential: Some(credential_pb(c.credential)),
        secret: c.secret,
    }
}

/// The tunnel a credential call names: its id, else its name.
fn tunnel_ref(tunnel_id: String, name: String) -> Result<String, Status> {
    non_empty(tunnel_id).or(non_empty(name)).ok_or_else(|| {
        status(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            "give tunnel_id or name",
        ))
    })
}

/// The operators' service.
pub struct ControlGrpc(pub Control);

#[tonic::async_trait]
impl ControlService for ControlGrpc {
    async fn create_tunnel(
        &self,
        req: Request<pb::CreateTunnelRequest>,
    ) -> Result<Response<pb::CreateTunnelResponse>, Status> {
        let b = bearer(&req);
        let client = crate::ratelimit::client_of(
            req.remote_addr(),
            req.metadata()
                .get_all(crate::ratelimit::FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok()),
            &self.0.config().trusted_proxies,
        );
        let r = req.into_inner();
        let out = ops::create_idempotent(
            &self.0,
            b,
            CreateTunnelRequest {
                requested_name: non_empty(r.requested_name),
                preferred_transports: r.preferred_transports,
                region_hint: non_empty(r.region_hint),
                recreate_token_ttl_seconds: (r.recreate_token_ttl_seconds > 0)
                    .then_some(r.recreate_token_ttl_seconds),
                management_token: None,
                recreate_token: non_empty(r.recreate_token),
                access: r.access.map(access_from_pb).unwrap_or_default(),
                limits: netbore_tokens::access::TunnelLimits {
                    max_body_bytes: r.limits.map(|l| l.max_body_bytes).filter(|n| *n > 0),
                },
                tunnel_credential: non_empty(r.tunnel_credential),
                issue_credential: r.issue_credential,
                // gRPC creates HTTP tunnels only (no proto field yet; REST has `kind`).
                kind: None,
            },
            client,
            non_empty(r.idempotency_key),
        )
        .await
        .map_err(status)?;
        Ok(Response::new(pb::CreateTunnelResponse {
            tunnel_id: out.tunnel_id,
            public_hostname: out.public_hostname,
            public_url: out.public_url,
            candidates: out
                .candidates
                .into_iter()
                .map(|c| pb::Candidate {
                    edge_id: c.edge_id,
                    edge_url: c.edge_url,
                    supported_transport: c.supported_transport,
                    region: c.region,
                    note: c.note,
                })
                .collect(),
            ephemeral_token: out.ephemeral_token,
            recreate_token: out.recreate_token,
            candidates_expires_at: out.candidates_expires_at,
            note: out.note,
            credential: out.credential.map(issued_pb),
        }))
    }

    async fn get_tunnel(
        &self,
        req: Request<pb::GetTunnelRequest>,
    ) -> Result<Response<pb::Tunnel>, Status> {
        let b = bearer(&req);
        let r = req.into_inner();
        let rec = ops::get(
            &self.0,
            b,
            non_empty(r.tunnel_id).as_deref(),
            non_empty(r.name).as_deref(),
        )
        .await
        .map_err(status)?;
        Ok(Response::new(tunnel(&self.0, &rec)))
    }

    async fn list_tunnels(
        &self,
        req: Request<pb::ListTunnelsRequest>,
    ) -> Result<Response<pb::ListTunnelsResponse>, Status> {
        let b = bearer(&req);
        let r = req.into_inner();
        let page = ops::list(
            &self.0,
            b,
            ListTunnelsQuery {
                prefix: r.prefix,
                limit: (r.limit > 0).then_some(r.limit as usize),
                cursor: non_empty(r.cursor),
            },
        )
        .await
        .map_err(status)?;
        Ok(Response::new(pb::ListTunnelsResponse {
            tunnels: page.tunnels.into_iter().map(tunnel_pb).collect(),
            next_cursor: page.next_cursor.unwrap_or_default(),
        }))
    }

    async fn get_tunnel_status(
        &self,
        req: Request<pb::GetTunnelRequest>,
    ) -> Result<Response<pb::TunnelStatus>, Status> {
        let b = bearer(&req);
        let r = req.into_inner();
        let st = ops::status(
            &self.0,
            b,
            non_empty(r.tunnel_id).as_deref(),
            non_empty(r.name).as_deref(),
        )
        .await
        .map_err(status)?;
        let mut out = live_pb(st.status);
        out.tunnel_id = st.tunnel_id;
        out.name = st.name;
        Ok(Response::new(out))
    }

    async fn delete_tunnel(
        &self,
        req: Request<pb::DeleteTunnelRequest>,
    ) -> Result<Response<pb::DeleteTunnelResponse>, Status> {
        let b = bearer(&req);
        let r = req.into_inner();
        let rec = ops::delete(
            &self.0,
            b,
            DeleteTunnelRequest {
                tunnel_id: non_empty(r.tunnel_id),
                name: non_empty(r.name),
                recreate_token: non_empty(r.recreate_token),
            },
        )
        .await
        .map_err(status)?;
        Ok(Response::new(pb::DeleteTunnelResponse {
            tunnel_id: rec.tunnel_id,
            name: rec.name,
        }))
    }

    async fn drain_edge(
        &self,
        req: Request<pb::DrainEdgeRequest>,
    ) -> Result<Response<pb::DrainEdgeResponse>, Status> {
        let b = bearer(&req);
        let edge_id = req.into_inner().edge_id;
        ops::drain_edge(&self.0, b, &edge_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DrainEdgeResponse { edge_id }))
    }

    async fn undrain_edge(
        &self,
        req: Request<pb::UndrainEdgeRequest>,
    ) -> Result<Response<pb::UndrainEdgeResponse>, Status> {
        let b = bearer(&req);
        let edge_id = req.into_inner().edge_id;
        ops::undrain_edge(&self.0, b, &edge_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UndrainEdgeResponse { edge_id }))
    }

    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let b = bearer(&req);
        let r = req.into_inner();
        let out = crate::managed::enroll(
            &self.0,
            b,
            crate::api::EnrollRequest {
                external_id: r.external_id,
                requested_name: non_empty(r.requested_name),
                labels: r.labels.into_iter().collect(),
                access: r.access.map(access_from_pb).unwrap_or_default(),
                limits: netbore_tokens::access::TunnelLimits {
                    max_body_bytes: r.limits.map(|l| l.max_body_bytes).filter(|n| *n > 0),
                },
                reissue_credential: r.reissue_credential,
                reissue_grace_seconds: (r.reissue_grace_seconds > 0)
                    .then_some(r.reissue_grace_seconds),
            },
        )
        .await
        .map_err(status)?;
        Ok(Response::new(pb::EnrollResponse {
            tunnel_id: out.tunnel_id,
            name: out.name,
            hostname: out.hostname,
            public_url: out.public_url,
            tunnel_token: out.tunnel_token.unwrap_or_default(),
            credential_id: out.credential_id.unwrap_or_default(),
            created: out.created,
            disabled: out.disabled,
        }))
    }

    async fn disable_tunnel(
        &self,
        req: Request<pb::SetTunnelStateRequest>,
    ) -> Result<Response<pb::Tunnel>, Status> {
        let b = bearer(&req);
        let t = req.into_inner().tunnel;
        crate::managed::set_disabled(&self.0, b, &t, true)
            .await
            .map(|t| Response::new(tunnel_pb(t)))
            .map_err(status)
    }

    async fn enable_tunnel(
        &self,
        req: Request<pb::SetTunnelStateRequest>,
    ) -> Result<Response<pb::Tunnel>, Status> {
        let b = bearer(&req);
        let t = req.into_inner().tunnel;
        crate::managed::set_disabled(&self.0, b, &t, false)
            .await
            .map(|t| Response::new(tunnel_pb(t)))
            .map_err(status)
    }

    async fn list_audit_events(
        &self,
        req: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let b = bearer(&req);
        let r = req.into_inner();
        let page = crate::audit::list(
            &self.0,
            b,
            crate::audit::AuditQuery {
                tunnel: non_empty(r.tunnel),
                owner: non_empty(r.owner),
                action: non_empty(r.action),
                since: non_empty(r.since),
                limit: (r.limit > 0).then_some(r.limit as usize),
                cursor: non_empty(r.cursor),
            },
        )
        .await
        .map_err(status)?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: page
                .events
                .into_iter()
                .map(|e| pb::AuditEvent {
                    id: e.id,
                    at: e.at,
                    actor: e.actor,
                    key_id: e.key_id.unwrap_or_default(),
                    address: e.address.unwrap_or_default(),
                    action: e.action,
                    target: e.target.unwrap_or_default(),
                    tunnel_id: e.tunnel_id.unwrap_or_default(),
                    owner: e.owner.unwrap_or_default(),
                    detail: e.detail.to_string(),
                })
                .collect(),
            next_cursor: page.next_cursor.unwrap_or_default(),
        }))
    }

    async fn list_edges(
        &self,
        req: Request<pb::ListEdgesRequest>,
    ) -> Result<Response<pb::ListEdgesResponse>, Status> {
        ops::require_read(&self.0, bearer(&req))
            .await
            .map_err(status)?;
        let edges = self
            .0
            .edge_statuses_now()
            .await
            .map_err(|e| status(e.into()))?
            .into_iter()
            .map(|(e, s)| {
                let s = s.unwrap_or(EdgeStatus {
                    entry: e.clone(),
                    tunnels: 0,
                    connections: 0,
                    streams: 0,
                    draining: false,
                    last_report: 0,
                    connected: false,
                });
                pb::Edge {
                    edge_id: e.edge_id,
                    edge_url: e.edge_url,
                    region: e.region,
                    tunnels: s.tunnels,
                    connections: s.connections,
                    streams: s.streams,
                    draining: s.draining,
                    last_report_at: if s.last_report > 0 {
                        ops::rfc3339(s.last_report)
                    } else {
                        String::new()
                    },
                    connected: s.connected,
                }
            })
            .collect();
        Ok(Response::new(pb::ListEdgesResponse { edges }))
    }

    async fn issue_tunnel_credential(
        &self,
        req: Request<pb::IssueTunnelCredentialRequest>,
    ) -> Result<Response<pb::IssueTunnelCredentialResponse>, Status> {
        let b = bearer(&req);
        let r = req.into_inner();
        let tunnel = tunnel_ref(r.tunnel_id, r.name)?;
        let c = ops::issue_credential(
            &self.0,
            b,
            &tunnel,
            IssueCredentialRequest { label: r.label },
        )
        .await
        .map_err(status)?;
        Ok(Response::new(issued_pb(c)))
    }

    async fn list_tunnel_credentials(
        &self,
        req: Request<pb::ListTunnelCredentialsRequest>,
    ) -> Result<Response<pb::ListTunnelCredentialsResponse>, Status> {
        let b = bearer(&req);
        let r = req.into_inner();
        let tunnel = tunnel_ref(r.tunnel_id, r.name)?;
        let list = ops::list_credentials(&self.0, b, &tunnel)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListTunnelCredentialsResponse {
            credentials: list.credentials.into_iter().map(credential_pb).collect(),
        }))
    }

    async fn revoke_tunnel_credential(
        &self,
        req: Request<pb::RevokeTunnelCredentialRequest>,
    ) -> Result<Response<pb::TunnelCredential>, Status> {
        let b = bearer(&req);
        let r = req.into_inner();
        let tunnel = tunnel_ref(r.tunnel_id, r.name)?;
        let c = ops::revoke_credential(&self.0, b, &tunnel, &r.credential_id)
            .await
            .map_err(status)?;
        Ok(Response::new(credential_pb(c)))
    }

    async fn issue_token(
        &self,
        req: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        let b = bearer(&req);
        let r = req.into_inner();
        let t = ops::issue_token(
            &self.0,
            b,
            IssueTokenRequest {
                scopes: (!r.scopes.is_empty()).then_some(r.scopes),
                ttl_seconds: (r.ttl_seconds > 0).then_some(r.ttl_seconds),
                subject: non_empty(r.subject),
            },
        )
        .await
        .map_err(status)?;
        Ok(Response::new(pb::IssueTokenResponse {
            token: t.token,
            scopes: t.scopes,
            expires_at: t.expires_at,
        }))
    }

    async fn create_api_key(
        &self,
        req: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let b = bearer(&req);
        let r = req.into_inner();
        let out = crate::api_keys::create(
            &self.0,
            b,
            CreateApiKeyRequest {
                label: r.label,
                scopes: (!r.scopes.is_empty()).then_some(r.scopes),
                expires_in_seconds: (r.expires_in_seconds > 0).then_some(r.expires_in_seconds),
                name_pattern: non_empty(r.name_pattern),
                subject: non_empty(r.subject),
            },
        )
        .await
        .map_err(status)?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            key: out.key,
            api_key: Some(api_key(out.api_key)),
        }))
    }

    async fn list_api_keys(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let out = crate::api_keys::list(&self.0, bearer(&req))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: out.api_keys.into_iter().map(api_key).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        req: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let b = bearer(&req);
        let id = req.into_inner().id;
        let k = crate::api_keys::revoke(&self.0, b, &id)
            .await
            .map_err(status)?;
        Ok(Response::new(api_key(k)))
    }
}

/// The edges' link service. Every call must carry an edge credential
/// ([`crate::edge_auth`]); links end when `shutdown` fires, so a draining control does
/// not wait on streams that never end by themselves.
pub struct EdgeGrpc {
    /// Control.
    pub control: Control,
    /// Ends every link.
    pub shutdown: CancellationToken,
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<epb::EdgeCommand, Status>> + Send>>;

/// How long control waits for a link's first report (which names the edge) before it
/// closes the link.
pub const FIRST_REPORT_TIMEOUT: Duration = Duration::from_secs(10);

fn disconnect(tunnel_id: String, revoked_until: u64) -> epb::EdgeCommand {
    epb::EdgeCommand {
        command: Some(epb::edge_command::Command::DisconnectTunnel(
            epb::DisconnectTunnel {
                tunnel_id,
                revoked_until,
            },
        )),
    }
}

fn revoke_credential(credential_id: String, revoked_until: u64) -> epb::EdgeCommand {
    epb::EdgeCommand {
        command: Some(epb::edge_command::Command::RevokeCredential(
            epb::RevokeCredential {
                credential_id,
                revoked_until,
            },
        )),
    }
}

/// The command for a revocation control remembers ([`Control::recent_revocations`]):
/// a credential's (`cred:<id>`) or a deleted tunnel's.
fn revocation(key: String, until: u64) -> epb::EdgeCommand {
    match ControlEvent::decode(&key) {
        ControlEvent::CredentialRevoked(id) => revoke_credential(id, until),
        _ => disconnect(key, until),
    }
}

/// A live status in gRPC form (`tunnel_id` and `name` left for the caller).
fn live_pb(s: netbore_api::types::LiveStatus) -> pb::TunnelStatus {
    pb::TunnelStatus {
        tunnel_id: String::new(),
        name: String::new(),
        state: s.state.as_str().to_string(),
        reasons: s
            .reasons
            .into_iter()
            .map(|r| pb::StatusReason {
                code: serde_json::to_value(r.code)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                message: r.message,
            })
            .collect(),
        links: s
            .links
            .into_iter()
            .map(|l| pb::TunnelLink {
                edge_id: l.edge_id,
                link_id: l.link_id,
                connected_since: l.connected_since,
                agent_version: l.agent_version,
                agent_instance_id: l.agent_instance_id,
                agent_addr: l.agent_addr,
            })
            .collect(),
        last_seen: s.last_seen.unwrap_or_default(),
        origin: s.origin.map(|o| pb::OriginStatus {
            healthy: o.healthy,
            cause: o.cause,
            message: o.message,
            checked_at: o.checked_at,
        }),
        requests_5m: s.requests_5m,
        errors_5m: s.errors_5m,
    }
}

fn ack_link_events(event_ids: Vec<String>) -> epb::EdgeCommand {
    epb::EdgeCommand {
        command: Some(epb::edge_command::Command::AckLinkEvents(
            epb::AckLinkEvents { event_ids },
        )),
    }
}

fn session_keys(seeds: &[netbore_tokens::SessionSeed]) -> epb::EdgeCommand {
    epb::EdgeCommand {
        command: Some(epb::edge_command::Command::SessionKeys(epb::SessionKeys {
            seeds: seeds
                .iter()
                .map(|s| epb::SessionSeed {
                    kid: s.kid.clone(),
                    seed: s.expose().to_vec(),
                })
                .collect(),
        })),
    }
}

/// Most disabled tunnels sent to an edge when it links (the rest are still refused by
/// control when their agents ask for tokens).
const MAX_DISABLED_SENT: usize = 100_000;

fn tunnel_state(tunnel_id: String, name: String, disabled: bool) -> epb::EdgeCommand {
    epb::EdgeCommand {
        command: Some(epb::edge_command::Command::SetTunnelState(
            epb::SetTunnelState {
                tunnel_id,
                name,
                disabled,
            },
        )),
    }
}

fn edge_status(rep: epb::EdgeReport) -> EdgeStatus {
    EdgeStatus {
        entry: EdgeEntry {
            edge_id: rep.edge_id,
            edge_url: rep.agent_url,
            region: rep.region,
        },
        tunnels: rep.tunnels,
        connections: rep.connections,
        streams: rep.streams,
        draining: rep.draining,
        last_report: netbore_tokens::now_unix(),
        connected: true,
    }
}

#[tonic::async_trait]
impl EdgeService for EdgeGrpc {
    type LinkStream = CommandStream;

    async fn link(
        &self,
        req: Request<Streaming<epb::EdgeReport>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        let peer = req.remote_addr();
        // Nothing of an unauthenticated call is read, stored or answered.
        let auth = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let identity = match self.control.config().edge_credentials.authenticate(auth) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(peer = ?peer, error = %e, "edge link refused");
                return Err(Status::unauthenticated(e.to_string()));
            }
        };
        let mut reports = req.into_inner();
        // The first report names the edge; it must be one this credential speaks for.
        let first = match tokio::time::timeout(FIRST_REPORT_TIMEOUT, reports.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) | Ok(Err(_)) => {
                return Err(Status::invalid_argument(
                    "the link ended before the edge's first report",
                ));
            }
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no first report within {} s",
                    FIRST_REPORT_TIMEOUT.as_secs()
                )));
            }
        };
        if !identity.may_report_as(&first.edge_id) {
            tracing::warn!(peer = ?peer, edge = %first.edge_id, allowed = ?identity.patterns(), "edge link refused: credential not bound to this edge id");
            return Err(Status::permission_denied(format!(
                "edge_id_not_allowed: this edge credential may not report as '{}'; give each edge the credential bound to its id",
                first.edge_id
            )));
        }
        let edge_id = first.edge_id.clone();
        let control = self.control.clone();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<epb::EdgeCommand, Status>>(64);
        // Subscribe before taking the snapshots, so nothing falls between them.
        let mut deletions = control.subscribe_deletions();
        let mut seeds = control.subscribe_session_seeds();
        let initial_seeds = seeds.borrow_and_update().clone();
        let recent = control.recent_revocations(netbore_tokens::now_unix());
        tracing::info!(edge = %edge_id, url = %first.agent_url, revocations = recent.len(), "edge linked");
        control.record_edge_report(edge_status(first)).await;
        tokio::spawn(async move {
            // What an edge that linked late or reconnected must know before it takes
            // agents: the cookie seeds and the tunnels deleted while it was away.
            if tx.send(Ok(session_keys(&initial_seeds))).await.is_err() {
                control.edge_link_closed(&edge_id).await;
                return;
            }
            for (t, until) in recent {
                if tx.send(Ok(revocation(t, until))).await.is_err() {
                    break;
                }
            }
            // And the tunnels disabled now (their names answer `tunnel_disabled`).
            match control.store().disabled_tunnels(MAX_DISABLED_SENT).await {
                Ok(list) => {
                    for (tunnel_id, name) in list {
                        if tx.send(Ok(tunnel_state(tunnel_id, name, true))).await.is_err() {
                            break;
                        }
                    }
                }
                Err(e) => tracing::warn!(edge = %edge_id, error = %e, "could not send the disabled tunnels to a new edge link"),
            }
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = reports.message() => match r {
                        Ok(Some(rep)) => {
                            if rep.edge_id != edge_id {
                                tracing::warn!(edge = %edge_id, named = %rep.edge_id, "edge link closed: a report named another edge");
                                let _ = tx.send(Err(Status::permission_denied(
                                    "edge_id_not_allowed: every report on a link must name the edge that opened it",
                                ))).await;
                                break;
                            }
                            control.tunnels_held(&edge_id, &rep.linked_tunnel_ids).await;
                            control.record_links(&edge_id, &rep).await;
                            if !rep.link_events.is_empty() {
                                let acked = control.record_link_events(&edge_id, &rep.link_events).await;
                                if !acked.is_empty() && tx.send(Ok(ack_link_events(acked))).await.is_err() {
                                    break;
                                }
                            }
                            control.record_edge_report(edge_status(rep)).await;
                        }
                        _ => break,
                    },
                    c = seeds.changed() => {
                        if c.is_err() {
                            break;
                        }
                        let s = seeds.borrow_and_update().clone();
                        if tx.send(Ok(session_keys(&s))).await.is_err() {
                            break;
                        }
                    }
                    d = deletions.recv() => match d {
                        Ok(msg) => {
                            let cmd = match ControlEvent::decode(&msg) {
                                // A drain or undrain for another edge: not ours to pass on.
                                ControlEvent::DrainEdge(target) | ControlEvent::UndrainEdge(target)
                                    if target != edge_id =>
                                {
                                    continue;
                                }
                                ControlEvent::DrainEdge(_) => epb::EdgeCommand {
                                    command: Some(epb::edge_command::Command::Drain(epb::Drain {})),
                                },
                                ControlEvent::UndrainEdge(_) => epb::EdgeCommand {
                                    command: Some(epb::edge_command::Command::Undrain(epb::Undrain {})),
                                },
                                ControlEvent::TunnelDisabled { tunnel_id, name } => {
                                    tunnel_state(tunnel_id, name, true)
                                }
                                ControlEvent::TunnelEnabled { tunnel_id, name } => {
                                    tunnel_state(tunnel_id, name, false)
                                }
                                // A deleted tunnel, or a revoked credential.
                                ControlEvent::TunnelDeleted(_) | ControlEvent::CredentialRevoked(_) => {
                                    let until = control.record_revocation(&msg, netbore_tokens::now_unix());
                                    revocation(msg, until)
                                }
                            };
                            if tx.send(Ok(cmd)).await.is_err() {
                                break;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(edge = %edge_id, missed = n, "edge link fell behind on deletions");
                        }
                        Err(_) => break,
                    },
                }
            }
            tracing::info!(edge = %edge_id, "edge link closed");
            control.edge_link_closed(&edge_id).await;
        }.instrument(tracing::info_span!("edge_link", peer = ?peer)));
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
            );
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Remembers every deletion (this replica's and, through the store, the others') for
/// edges that link later, until `shutdown`.
async fn record_revocations(control: Control, shutdown: CancellationToken) {
    let mut deletions = control.subscribe_deletions();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            d = deletions.recv() => match d {
                Ok(msg) if ControlEvent::decode(&msg).is_revocation() => {
                    control.record_revocation(&msg, netbore_tokens::now_unix());
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "revocation recorder fell behind on deletions");
                }
                Err(_) => return,
            },
        }
    }
}

/// How often control pings each gRPC connection.
pub const GRPC_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is closed.
pub const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves gRPC on `listener` until `shutdown` fires, then lets unary calls in flight
/// finish and ends every edge link (the caller bounds how long it waits).
pub async fn serve_grpc(
    listener: TcpListener,
    control: Control,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    health
        .set_service_status("readiness", tonic_health::ServingStatus::Serving)
        .await;
    health
        .set_serving::<ControlServiceServer<ControlGrpc>>()
        .await;
    tokio::spawn(record_revocations(control.clone(), shutdown.clone()));
    tokio::spawn(crate::audit::prune_loop(
        control.clone(),
        control.config().audit_retention_days,
        shutdown.clone(),
    ));
    tokio::spawn(crate::shared::watch_readiness(
        control.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(netbore_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = reflection().build_v1()?;
    let v1alpha = reflection().build_v1alpha()?;
    tonic::transport::Server::builder()
        // Pings find edges that vanished without closing their link (power loss, a
        // partitioned node), so they stop being handed out as candidates.
        .http2_keepalive_interval(Some(GRPC_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(GRPC_KEEPALIVE_TIMEOUT))
        .layer(crate::metrics::GrpcCountLayer(control.metrics_handle()))
        .layer(crate::audit::AuditClientLayer(control.clone()))
        .add_service(health_service)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(ControlServiceServer::new(ControlGrpc(control.clone())))
        .add_service(EdgeServiceServer::new(EdgeGrpc {
            control,
            shutdown: shutdown.clone(),
        }))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled(),
        )
        .await?;
    Ok(())
}
