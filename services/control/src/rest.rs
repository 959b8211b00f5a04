//! Control's REST API (JSON in and out). The contract is `docs/control.md`; the logic
//! is in [`crate::ops`], shared with gRPC.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Control;
use crate::ops::{
    self, ApiError, CreateRequest, CreateResponse, DeleteRequest, IssuedToken, ListQuery,
    TokenRequest,
};

/// Largest request body control reads.
pub const MAX_BODY: usize = 64 * 1024;

/// The REST router.
pub fn rest_router(control: Control) -> Router {
    Router::new()
        .route("/tunnels/create", post(create))
        .route("/tunnels/delete", post(delete))
        .route("/tunnels/list", get(list))
        .route("/auth/token", post(issue_token))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see docs/control.md for the API",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(control)
}

/// Serves the REST API on `listener` until `shutdown` fires.
pub async fn serve_rest(
    listener: TcpListener,
    control: Control,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, rest_router(control))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    ops::bearer_value(headers.get(header::AUTHORIZATION)?.to_str().ok()?)
}

fn body<T>(b: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("the request body is not valid: {e}"),
        )
    })
}

async fn create(
    State(control): State<Control>,
    headers: HeaderMap,
    b: Result<Json<CreateRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<CreateResponse>, ApiError> {
    ops::create(&control, bearer(&headers), body(b)?).map(Json)
}

async fn delete(
    State(control): State<Control>,
    headers: HeaderMap,
    b: Result<Json<DeleteRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let r = ops::delete(&control, bearer(&headers), body(b)?)?;
    Ok(Json(
        serde_json::json!({"deleted": r.tunnel_id, "name": r.name}),
    ))
}

async fn list(
    State(control): State<Control>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (page, next) = ops::list(&control, bearer(&headers), q)?;
    let tunnels: Vec<_> = page.iter().map(|r| ops::record_json(&control, r)).collect();
    Ok(Json(
        serde_json::json!({"tunnels": tunnels, "next_cursor": next}),
    ))
}

async fn issue_token(
    State(control): State<Control>,
    headers: HeaderMap,
    b: Option<Json<TokenRequest>>,
) -> Result<Json<IssuedToken>, ApiError> {
    let req = b.map(|Json(v)| v).unwrap_or_default();
    ops::issue_token(&control, bearer(&headers), req).map(Json)
}

async fn jwks(State(control): State<Control>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "max-age=60")],
        Json(control.jwks()),
    )
}
