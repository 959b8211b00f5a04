//! Control's REST API (JSON in and out). The contract is `docs/control.md`; the types
//! are in [`crate::api`] and the logic in [`crate::ops`], shared with gRPC.
//!
//! Every response that is not a success is `{"error": {"code", "message"}}`, including
//! malformed bodies, unknown paths and wrong methods, so a client needs one error path.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use std::net::SocketAddr;

use axum::Extension;
use axum::extract::{ConnectInfo, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{delete as delete_route, get, post};
use axum::{Json, Router};
use netbore_api::ErrorCode;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Control;
use crate::api::{
    ApiKey, CreateApiKeyRequest, CreateApiKeyResponse, CreateTunnelRequest, CreateTunnelResponse,
    DeleteTunnelRequest, DeleteTunnelResponse, EnrollRequest, EnrollResponse,
    IssueCredentialRequest, IssueTokenRequest, IssueTokenResponse, IssuedCredential,
    ListApiKeysResponse, ListCredentialsResponse, ListTunnelsQuery, ListTunnelsResponse, Tunnel,
    TunnelCredential,
};
use crate::ops::{self, ApiError};

/// Largest request body control reads.
pub const MAX_BODY: usize = 64 * 1024;

/// The REST router (no sockets: tests drive it with `oneshot`).
pub fn rest_router(control: Control) -> Router {
    Router::new()
        .route("/tunnels/create", post(create))
        .route("/tunnels/delete", post(delete))
        .route("/tunnels/list", get(list))
        .route("/auth/token", post(issue_token))
        .route("/v1/api-keys", post(create_api_key).get(list_api_keys))
        .route("/v1/api-keys/{id}", delete_route(revoke_api_key))
        .route(
            "/v1/tunnels/{tunnel}/credentials",
            post(issue_credential).get(list_credentials),
        )
        .route(
            "/v1/tunnels/{tunnel}/credentials/{credential}",
            delete_route(revoke_credential),
        )
        .route("/v1/enroll", post(enroll))
        .route("/v1/tunnels/{tunnel}/disable", post(disable))
        .route("/v1/tunnels/{tunnel}/enable", post(enable))
        .route("/v1/audit", get(audit_list))
        .route("/v1/tunnels/{tunnel}/status", get(tunnel_status))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "no such endpoint; see docs/control.md for the API",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotAllowed,
                "wrong method: /tunnels/create, /tunnels/delete and /auth/token take POST; /tunnels/list, /.well-known/jwks.json, /healthz and /readyz take GET; /v1/api-keys takes POST and GET, /v1/api-keys/{id} DELETE; /v1/tunnels/{tunnel}/credentials takes POST (issue) and GET (list), /v1/tunnels/{tunnel}/credentials/{credential} takes DELETE (revoke); /v1/enroll, /v1/tunnels/{tunnel}/disable and /v1/tunnels/{tunnel}/enable take POST; /v1/audit and /v1/tunnels/{tunnel}/status take GET",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            control.clone(),
            crate::audit::rest_layer,
        ))
        .layer(axum::middleware::map_response_with_state(
            control.clone(),
            crate::metrics::count_rest,
        ))
        .with_state(control)
}

/// Serves the REST API on `listener` until `shutdown` fires, then lets requests in
/// flight finish (the caller bounds how long it waits).
pub async fn serve_rest(
    listener: TcpListener,
    control: Control,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // The peer address reaches handlers (the anonymous creation limit counts by it).
    axum::serve(
        listener,
        rest_router(control).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    ops::bearer_value(headers.get(header::AUTHORIZATION)?.to_str().ok()?)
}

/// A JSON body, whatever the `Content-Type` says (so `curl -d '{...}'` works), where
/// an empty body means `{}`; refusals are [`ApiError`]s.
struct JsonBody<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        ErrorCode::BodyTooLarge,
                        format!("the request body is larger than {MAX_BODY} bytes"),
                    )
                } else {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::InvalidRequest,
                        format!("the request body could not be read: {e}"),
                    )
                }
            })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(bytes).map(JsonBody).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                format!("the request body is not the expected JSON: {e}; see docs/control.md"),
            )
        })
    }
}

async fn create(
    State(control): State<Control>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CreateTunnelRequest>,
) -> Result<Json<CreateTunnelResponse>, ApiError> {
    let client = crate::ratelimit::client_of(
        peer.map(|Extension(ConnectInfo(a))| a),
        headers
            .get_all(crate::ratelimit::FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok()),
        &control.config().trusted_proxies,
    );
    let idempotency_key = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::InvalidRequest,
                        "the Idempotency-Key header is not printable ASCII; use e.g. a UUID",
                    )
                })?
                .to_string(),
        ),
    };
    ops::create_idempotent(&control, bearer(&headers), req, client, idempotency_key)
        .await
        .map(Json)
}

/// The header that makes a create idempotent ([`ops::create_idempotent`]).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

async fn create_api_key(
    State(control): State<Control>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CreateApiKeyRequest>,
) -> Result<Json<CreateApiKeyResponse>, ApiError> {
    crate::api_keys::create(&control, bearer(&headers), req)
        .await
        .map(Json)
}

async fn list_api_keys(
    State(control): State<Control>,
    headers: HeaderMap,
) -> Result<Json<ListApiKeysResponse>, ApiError> {
    crate::api_keys::list(&control, bearer(&headers))
        .await
        .map(Json)
}

async fn revoke_api_key(
    State(control): State<Control>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    crate::api_keys::revoke(&control, bearer(&headers), &id)
        .await
        .map(Json)
}

async fn delete(
    State(control): State<Control>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<DeleteTunnelRequest>,
) -> Result<Json<DeleteTunnelResponse>, ApiError> {
    let r = ops::delete(&control, bearer(&headers), req).await?;
    Ok(Json(DeleteTunnelResponse {
        deleted: r.tunnel_id,
        name: r.name,
    }))
}

async fn list(
    State(control): State<Control>,
    headers: HeaderMap,
    q: Result<Query<ListTunnelsQuery>, QueryRejection>,
) -> Result<Json<ListTunnelsResponse>, ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            format!(
                "{}; the query takes prefix, limit and cursor",
                e.body_text()
            ),
        )
    })?;
    ops::list(&control, bearer(&headers), q).await.map(Json)
}

async fn issue_token(
    State(control): State<Control>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<IssueTokenRequest>,
) -> Result<Json<IssueTokenResponse>, ApiError> {
    ops::issue_token(&control, bearer(&headers), req)
        .await
        .map(Json)
}

async fn issue_credential(
    State(control): State<Control>,
    Path(tunnel): Path<String>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<IssueCredentialRequest>,
) -> Result<Json<IssuedCredential>, ApiError> {
    ops::issue_credential(&control, bearer(&headers), &tunnel, req)
        .await
        .map(Json)
}

async fn list_credentials(
    State(control): State<Control>,
    Path(tunnel): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ListCredentialsResponse>, ApiError> {
    ops::list_credentials(&control, bearer(&headers), &tunnel)
        .await
        .map(Json)
}

async fn revoke_credential(
    State(control): State<Control>,
    Path((tunnel, credential)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<TunnelCredential>, ApiError> {
    ops::revoke_credential(&control, bearer(&headers), &tunnel, &credential)
        .await
        .map(Json)
}

async fn enroll(
    State(control): State<Control>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    crate::managed::enroll(&control, bearer(&headers), req)
        .await
        .map(Json)
}

async fn disable(
    State(control): State<Control>,
    Path(tunnel): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Tunnel>, ApiError> {
    crate::managed::set_disabled(&control, bearer(&headers), &tunnel, true)
        .await
        .map(Json)
}

async fn enable(
    State(control): State<Control>,
    Path(tunnel): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Tunnel>, ApiError> {
    crate::managed::set_disabled(&control, bearer(&headers), &tunnel, false)
        .await
        .map(Json)
}

async fn audit_list(
    State(control): State<Control>,
    headers: HeaderMap,
    q: Result<Query<crate::audit::AuditQuery>, QueryRejection>,
) -> Result<Json<crate::audit::AuditPage>, ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            format!(
                "{}; the query takes tunnel, owner, action, since, limit and cursor",
                e.body_text()
            ),
        )
    })?;
    crate::audit::list(&control, bearer(&headers), q)
        .await
        .map(Json)
}

/// `GET /v1/tunnels/{tunnel}/status`: the tunnel by id (`tun_…`) or name.
async fn tunnel_status(
    State(control): State<Control>,
    Path(tunnel): Path<String>,
    headers: HeaderMap,
) -> Result<Json<netbore_api::types::TunnelStatus>, ApiError> {
    let (id, name) = if tunnel.starts_with("tun_") {
        (Some(tunnel.as_str()), None)
    } else {
        (None, Some(tunnel.as_str()))
    };
    ops::status(&control, bearer(&headers), id, name)
        .await
        .map(Json)
}

/// 200 while control can serve; 503 `store_unavailable` naming the store otherwise.
async fn readyz(State(control): State<Control>) -> Result<&'static str, ApiError> {
    control.ready().await?;
    Ok("ready\n")
}

async fn jwks(State(control): State<Control>) -> impl IntoResponse {
    // Short caching: verifiers refresh on an unknown kid anyway.
    (
        [(header::CACHE_CONTROL, "max-age=60")],
        Json(control.jwks()),
    )
}

#[cfg(test)]
mod tests {
    //! Handlers through `oneshot`, without sockets.

    use super::*;
    use crate::{ControlConfig, EdgeEntry};
    use axum::body::Body;
    use http_body_util::BodyExt;
    use netbore_tokens::KeySet;
    use tower::ServiceExt;

    fn app() -> Router {
        let control = Control::new(
            ControlConfig {
                edges: vec![EdgeEntry {
                    edge_id: "e1".into(),
                    edge_url: "ws://127.0.0.1:1/v1/connect".into(),
                    region: "local".into(),
                }],
                ..ControlConfig::default()
            },
            KeySet::generate(),
        );
        rest_router(control)
    }

    async fn call(
        app: Router,
        method: &str,
        uri: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn create_takes_json_whatever_the_content_type_and_an_empty_body() {
        let (st, b) = call(
            app(),
            "POST",
            "/tunnels/create",
            r#"{"requested_name":"x1"}"#,
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{b}");
        assert_eq!(b["public_hostname"], "x1.localhost");
        let (st, b) = call(app(), "POST", "/tunnels/create", "").await;
        assert_eq!(st, StatusCode::OK, "{b}");
    }

    #[tokio::test]
    async fn every_refusal_is_a_json_error() {
        for (method, uri, body, status, code) in [
            ("POST", "/tunnels/create", "{", 400, "invalid_request"),
            (
                "POST",
                "/tunnels/create",
                r#"{"nmae":"x"}"#,
                400,
                "invalid_request",
            ),
            ("GET", "/tunnels/create", "", 405, "method_not_allowed"),
            ("GET", "/nope", "", 404, "not_found"),
            ("GET", "/tunnels/list?limit=x", "", 400, "invalid_request"),
            ("GET", "/tunnels/list", "", 401, "unauthorized"),
            ("POST", "/auth/token", "", 403, "bootstrap_disabled"),
        ] {
            let (st, b) = call(app(), method, uri, body).await;
            assert_eq!(st.as_u16(), status, "{method} {uri}: {b}");
            assert_eq!(b["error"]["code"], code, "{method} {uri}: {b}");
            assert!(
                !b["error"]["message"].as_str().unwrap().is_empty(),
                "{method} {uri}"
            );
        }
        let big = format!(r#"{{"requested_name":"{}"}}"#, "a".repeat(MAX_BODY));
        let (st, b) = call(app(), "POST", "/tunnels/create", &big).await;
        assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
        assert_eq!(b["error"]["code"], "body_too_large");
    }

    #[tokio::test]
    async fn probes_and_jwks_answer() {
        let (st, _) = call(app(), "GET", "/healthz", "").await;
        assert_eq!(st, StatusCode::OK);
        let (st, _) = call(app(), "GET", "/readyz", "").await;
        assert_eq!(st, StatusCode::OK);
        let (st, b) = call(app(), "GET", "/.well-known/jwks.json", "").await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(b["keys"][0]["kty"], "OKP");
    }
}
