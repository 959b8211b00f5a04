//! The agent's side of control's REST contract (`POST /tunnels/create`).
//!
//! Kept to the JSON contract rather than control's Rust types, so an agent talks to
//! any control that honours `docs/control.md`.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

/// Time allowed for one call to control.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(15);

/// Largest response body read from control.
const MAX_CONTROL_RESPONSE: usize = 1024 * 1024;

/// `POST /tunnels/create` request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CreateRequest {
    /// A name to claim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_name: Option<String>,
    /// Transports the agent can use.
    pub preferred_transports: Vec<String>,
    /// Region preference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region_hint: Option<String>,
    /// A recreate token from an earlier run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recreate_token: Option<String>,
    /// A management token (to claim a chosen name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub management_token: Option<String>,
}

/// One candidate edge.
#[derive(Debug, Clone, Deserialize)]
pub struct Candidate {
    /// Edge id.
    pub edge_id: String,
    /// ws:// or wss:// URL.
    pub edge_url: String,
    /// Region.
    #[serde(default)]
    pub region: String,
}

/// `POST /tunnels/create` response (fields the agent uses).
#[derive(Debug, Clone, Deserialize)]
pub struct CreateResponse {
    /// Tunnel id.
    pub tunnel_id: String,
    /// `NAME.<domain>`.
    pub public_hostname: String,
    /// The URL viewers open.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Ordered candidate edges.
    pub candidates: Vec<Candidate>,
    /// Token for the edge handshake.
    pub ephemeral_token: String,
    /// Token to get the same tunnel back.
    pub recreate_token: String,
}

impl CreateResponse {
    /// The tunnel's public name (first label of the hostname).
    pub fn name(&self) -> &str {
        self.public_hostname
            .split('.')
            .next()
            .unwrap_or(&self.public_hostname)
    }

    /// The URL to print.
    pub fn url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.public_hostname))
    }
}

/// A failed call to control.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    /// Control answered with an error body.
    #[error("control refused: {message} [{code}]")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable code.
        code: String,
        /// Control's explanation.
        message: String,
    },
    /// Control could not be reached or answered nonsense.
    #[error("control at {url} is unreachable: {reason}")]
    Unreachable {
        /// Control URL.
        url: String,
        /// What failed.
        reason: String,
    },
}

impl ControlError {
    /// True when retrying cannot help without the user changing something (a taken
    /// or invalid name, a refused token).
    pub fn is_fatal(&self) -> bool {
        matches!(self, ControlError::Api { status, .. }
            if (400..500).contains(status) && *status != 408 && *status != 429)
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

/// A REST client for control.
#[derive(Clone)]
pub struct ControlClient {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl ControlClient {
    /// A client for control at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str) -> ControlClient {
        ControlClient {
            base: base.trim_end_matches('/').to_string(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Creates (or recreates) a tunnel.
    pub async fn create(&self, req: &CreateRequest) -> Result<CreateResponse, ControlError> {
        self.post(
            "/tunnels/create",
            serde_json::to_vec(req).expect("serializable"),
        )
        .await
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ControlError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |reason: String| ControlError::Unreachable {
            url: self.base.clone(),
            reason,
        };
        let req = Request::post(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = tokio::time::timeout(CONTROL_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| unreachable(format!("no answer within {CONTROL_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let bytes = http_body_util::Limited::new(resp.into_body(), MAX_CONTROL_RESPONSE)
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        if status == StatusCode::OK || status == StatusCode::CREATED {
            return serde_json::from_slice(&bytes)
                .map_err(|e| unreachable(format!("unexpected response: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => Err(ControlError::Api {
                status: status.as_u16(),
                code: b.error.code,
                message: b.error.message,
            }),
            Err(_) => Err(ControlError::Api {
                status: status.as_u16(),
                code: "http_error".into(),
                message: format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                ),
            }),
        }
    }
}
