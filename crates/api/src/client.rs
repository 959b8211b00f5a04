//! A small REST client for control (plain `http://`; put TLS in front with a proxy or
//! use the gRPC API from elsewhere). Used by the CLI and tests; speaks the JSON of
//! [`crate::types`], and hands back control's own error code and message so a caller can
//! print them as they are.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::code::ErrorCode;
use crate::types::{
    ApiKey, AuditPage, AuditQuery, CreateApiKeyRequest, CreateApiKeyResponse, CreateTunnelRequest,
    CreateTunnelResponse, DeleteTunnelRequest, DeleteTunnelResponse, EnrollRequest, EnrollResponse,
    ErrorBody, IssueCredentialRequest, IssueTokenRequest, IssueTokenResponse, IssuedCredential,
    ListApiKeysResponse, ListCredentialsResponse, ListTunnelsQuery, ListTunnelsResponse, Tunnel,
    TunnelCredential,
};

/// Time allowed for one call, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest response body read from control.
pub const MAX_RESPONSE: usize = 1024 * 1024;

/// A failed call to control.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Control answered with an error: its code and message, as sent.
    #[error("{message} [{code}]")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable code (`name_taken`, `token_expired`, ...).
        code: ErrorCode,
        /// Control's explanation, which says what to do.
        message: String,
    },
    /// Control could not be reached, did not answer in time, or answered something
    /// that is not its API.
    #[error("control at {url} is unreachable: {reason}")]
    Unreachable {
        /// Control's base URL.
        url: String,
        /// What failed.
        reason: String,
    },
}

impl ControlError {
    /// The stable code of an API error.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            ControlError::Api { code, .. } => Some(code),
            ControlError::Unreachable { .. } => None,
        }
    }

    /// True when repeating the same call cannot succeed (a taken or invalid name, a
    /// refused token): a 4xx other than 408 and 429.
    pub fn is_permanent(&self) -> bool {
        matches!(self, ControlError::Api { status, .. }
            if (400..500).contains(status) && *status != 408 && *status != 429)
    }
}

/// A REST client for control at one base URL.
#[derive(Clone, Debug)]
pub struct ControlClient {
    base: String,
    bearer: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl ControlClient {
    /// A client for control at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str) -> ControlClient {
        ControlClient {
            base: base.trim_end_matches('/').to_string(),
            bearer: None,
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The same client, sending `token` as `Authorization: Bearer` (a management token
    /// or an API key, or the bootstrap credential or an API key for
    /// [`ControlClient::issue_token`]).
    pub fn with_bearer(mut self, token: impl Into<String>) -> ControlClient {
        self.bearer = Some(token.into());
        self
    }

    /// `POST /tunnels/create`.
    pub async fn create(
        &self,
        req: &CreateTunnelRequest,
    ) -> Result<CreateTunnelResponse, ControlError> {
        self.call(Method::POST, "/tunnels/create", Some(req)).await
    }

    /// `POST /tunnels/create` with an `Idempotency-Key`: the same key (and request)
    /// gives back the same tunnel for 24 h, however often it is retried.
    pub async fn create_idempotent(
        &self,
        req: &CreateTunnelRequest,
        idempotency_key: &str,
    ) -> Result<CreateTunnelResponse, ControlError> {
        self.call_with(
            Method::POST,
            "/tunnels/create",
            Some(req),
            Some(("idempotency-key", idempotency_key)),
        )
        .await
    }

    /// `POST /v1/api-keys`: the response holds the key itself, this once.
    pub async fn create_api_key(
        &self,
        req: &CreateApiKeyRequest,
    ) -> Result<CreateApiKeyResponse, ControlError> {
        self.call(Method::POST, "/v1/api-keys", Some(req)).await
    }

    /// `GET /v1/api-keys`.
    pub async fn list_api_keys(&self) -> Result<ListApiKeysResponse, ControlError> {
        self.call::<(), _>(Method::GET, "/v1/api-keys", None).await
    }

    /// `DELETE /v1/api-keys/{id}`.
    pub async fn revoke_api_key(&self, id: &str) -> Result<ApiKey, ControlError> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/v1/api-keys/{}", percent_encode(id)),
            None,
        )
        .await
    }

    /// `POST /tunnels/delete`.
    pub async fn delete(
        &self,
        req: &DeleteTunnelRequest,
    ) -> Result<DeleteTunnelResponse, ControlError> {
        self.call(Method::POST, "/tunnels/delete", Some(req)).await
    }

    /// `GET /tunnels/list`.
    pub async fn list(&self, q: &ListTunnelsQuery) -> Result<ListTunnelsResponse, ControlError> {
        let mut path = String::from("/tunnels/list");
        let mut sep = '?';
        let mut push = |k: &str, v: &str| {
            path.push(sep);
            path.push_str(k);
            path.push('=');
            path.push_str(&percent_encode(v));
            sep = '&';
        };
        if !q.prefix.is_empty() {
            push("prefix", &q.prefix);
        }
        if let Some(l) = q.limit {
            push("limit", &l.to_string());
        }
        if let Some(c) = &q.cursor {
            push("cursor", c);
        }
        self.call::<(), _>(Method::GET, &path, None).await
    }

    /// `POST /auth/token` (the bearer must be the bootstrap credential or an API key).
    pub async fn issue_token(
        &self,
        req: &IssueTokenRequest,
    ) -> Result<IssueTokenResponse, ControlError> {
        self.call(Method::POST, "/auth/token", Some(req)).await
    }

    /// `POST /v1/tunnels/{tunnel}/credentials` (`tunnel`: its id or name): a new tunnel
    /// credential, its secret shown this once.
    pub async fn issue_credential(
        &self,
        tunnel: &str,
        req: &IssueCredentialRequest,
    ) -> Result<IssuedCredential, ControlError> {
        let path = format!("/v1/tunnels/{}/credentials", percent_encode(tunnel));
        self.call(Method::POST, &path, Some(req)).await
    }

    /// `GET /v1/tunnels/{tunnel}/credentials`.
    pub async fn list_credentials(
        &self,
        tunnel: &str,
    ) -> Result<ListCredentialsResponse, ControlError> {
        let path = format!("/v1/tunnels/{}/credentials", percent_encode(tunnel));
        self.call::<(), _>(Method::GET, &path, None).await
    }

    /// `DELETE /v1/tunnels/{tunnel}/credentials/{credential_id}`.
    pub async fn revoke_credential(
        &self,
        tunnel: &str,
        credential_id: &str,
    ) -> Result<TunnelCredential, ControlError> {
        let path = format!(
            "/v1/tunnels/{}/credentials/{}",
            percent_encode(tunnel),
            percent_encode(credential_id)
        );
        self.call::<(), _>(Method::DELETE, &path, None).await
    }

    /// `POST /v1/enroll`: the tunnel of `req.external_id`, made on the first call.
    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, ControlError> {
        self.call(Method::POST, "/v1/enroll", Some(req)).await
    }

    /// `POST /v1/tunnels/{tunnel}/disable` (`disable`) or `/enable`.
    pub async fn set_disabled(&self, tunnel: &str, disable: bool) -> Result<Tunnel, ControlError> {
        let verb = if disable { "disable" } else { "enable" };
        let path = format!("/v1/tunnels/{}/{verb}", percent_encode(tunnel));
        self.call::<(), _>(Method::POST, &path, None).await
    }

    /// `GET /v1/audit`.
    pub async fn audit(&self, q: &AuditQuery) -> Result<AuditPage, ControlError> {
        let mut path = String::from("/v1/audit");
        let mut sep = '?';
        let mut push = |k: &str, v: &str| {
            path.push(sep);
            path.push_str(k);
            path.push('=');
            path.push_str(&percent_encode(v));
            sep = '&';
        };
        for (k, v) in [
            ("tunnel", &q.tunnel),
            ("owner", &q.owner),
            ("action", &q.action),
            ("since", &q.since),
            ("cursor", &q.cursor),
        ] {
            if let Some(v) = v {
                push(k, v);
            }
        }
        if let Some(l) = q.limit {
            push("limit", &l.to_string());
        }
        self.call::<(), _>(Method::GET, &path, None).await
    }

    /// `GET /.well-known/jwks.json`.
    pub async fn jwks(&self) -> Result<netbore_tokens::Jwks, ControlError> {
        self.call::<(), _>(Method::GET, "/.well-known/jwks.json", None)
            .await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ControlError> {
        self.call_with(method, path, body, None).await
    }

    async fn call_with<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        extra_header: Option<(&str, &str)>,
    ) -> Result<T, ControlError> {
        let unreachable = |reason: String| ControlError::Unreachable {
            url: self.base.clone(),
            reason,
        };
        let body = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).map_err(|e| unreachable(e.to_string()))?),
            None => Bytes::new(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::ACCEPT, "application/json");
        if !body.is_empty() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(t) = &self.bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some((k, v)) = extra_header {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| unreachable(format!("bad URL: {e}")))?;
        let (status, bytes) = tokio::time::timeout(CALL_TIMEOUT, async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| unreachable(error_chain(&e)))?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the response: {e}")))?
                .to_bytes();
            Ok::<_, ControlError>((status, bytes))
        })
        .await
        .map_err(|_| unreachable(format!("no answer within {CALL_TIMEOUT:?}")))??;
        if status == StatusCode::OK {
            return serde_json::from_slice(&bytes)
                .map_err(|e| unreachable(format!("unexpected response: {e}")));
        }
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => ControlError::Api {
                status: status.as_u16(),
                code: b.error.code,
                message: b.error.message,
            },
            Err(_) => ControlError::Api {
                status: status.as_u16(),
                code: ErrorCode::HttpError,
                message: format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                ),
            },
        })
    }
}

/// The error and its causes, so "connection refused" is not hidden behind "client error".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
fn percent_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(percent_encode("abc-1_~."), "abc-1_~.");
        assert_eq!(percent_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    #[tokio::test]
    async fn an_unreachable_control_says_where_and_why() {
        // A port nothing listens on: bind, learn it, close it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let c = ControlClient::new(&format!("http://{addr}/"));
        let e = c.create(&CreateTunnelRequest::default()).await.unwrap_err();
        assert!(matches!(e, ControlError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
        assert!(!e.is_permanent());
    }
}
