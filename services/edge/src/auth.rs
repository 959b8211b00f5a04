//! How the edge decides which tunnel an agent may serve.
//!
//! The agent's hello carries an ephemeral token minted by control. The edge verifies
//! it with control's public keys only ([`StaticKeyAuth`] for a key set handed over in
//! process, [`JwksAuth`] for one fetched from control's JWKS endpoint and refreshed on
//! an unknown `kid`) and learns the tunnel id and public name from its claims.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use netbore_tokens::{Jwks, TokenError, Verifier};

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentGrant {
    /// The tunnel the agent serves.
    pub tunnel_id: String,
    /// The tunnel's public name (the `NAME` in `NAME.<domain>`).
    pub name: String,
    /// Who may reach the tunnel.
    pub access: netbore_tokens::access::AccessPolicy,
    /// The tunnel's own limits.
    pub limits: netbore_tokens::access::TunnelLimits,
    /// When the token expires (Unix seconds).
    pub expires_at: u64,
    /// The tunnel credential the token was issued for (its id, the `cred` claim), if
    /// any: revoking it closes this link.
    pub credential: Option<String>,
    /// What the tunnel carries (the `kind` claim): `None` for HTTP, `tcp` or `tls`.
    pub kind: Option<String>,
    /// The public port of a `tcp` tunnel (the `port` claim).
    pub port: Option<u16>,
}

impl AgentGrant {
    /// The key the tunnel is routed by, here and in the registry: its name for HTTP,
    /// [`crate::tcp::tcp_key`] of its port for TCP, [`crate::tcp::tls_key`] of its name
    /// for TLS passthrough. The keys cannot collide: names hold no `:`.
    pub fn route_key(&self) -> String {
        match (self.kind.as_deref(), self.port) {
            (Some(netbore_tokens::KIND_TCP), Some(port)) => crate::tcp::tcp_key(port),
            (Some(netbore_tokens::KIND_TLS), _) => crate::tcp::tls_key(&self.name),
            _ => self.name.clone(),
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct AuthError {
    /// Stable code (from the token library).
    pub code: String,
    /// What happened and what to do.
    pub message: String,
}

/// Verifies agent tokens.
pub trait AgentAuth: Send + Sync + 'static {
    /// Checks `token` and returns what it grants.
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<AgentGrant, AuthError>> + Send + 'a>>;
}

fn refusal(e: TokenError) -> AuthError {
    AuthError {
        code: e.code().to_string(),
        message: format!(
            "the agent's token was refused ({e}); the agent fetches a fresh one from control when it reconnects"
        ),
    }
}

fn grant(c: netbore_tokens::EphemeralClaims) -> AgentGrant {
    AgentGrant {
        tunnel_id: c.sub,
        name: c.name,
        access: c.access,
        limits: c.limits,
        expires_at: c.exp,
        credential: c.cred,
        kind: c.kind,
        port: c.port,
    }
}

/// Verifies with a key set given in process (one-process mode and tests). The key
/// set can be replaced at any time, e.g. after a rotation.
pub struct StaticKeyAuth {
    verifier: ArcSwap<Verifier>,
    issuer: String,
}

impl StaticKeyAuth {
    /// A verifier for tokens from `issuer` signed by a key in `jwks`.
    pub fn new(jwks: &Jwks, issuer: &str) -> Result<StaticKeyAuth, TokenError> {
        Ok(StaticKeyAuth {
            verifier: ArcSwap::from_pointee(Verifier::new(jwks, issuer)?),
            issuer: issuer.to_string(),
        })
    }

    /// Replaces the key set.
    pub fn set_keys(&self, jwks: &Jwks) -> Result<(), TokenError> {
        self.verifier
            .store(Arc::new(Verifier::new(jwks, self.issuer.clone())?));
        Ok(())
    }
}

impl AgentAuth for StaticKeyAuth {
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<AgentGrant, AuthError>> + Send + 'a>> {
        let r = self.verifier.load().verify_ephemeral(token);
        Box::pin(async move { r.map(grant).map_err(refusal) })
    }
}

/// Least time between two JWKS fetches triggered by unknown key ids, so a stranger
/// sending made-up `kid`s makes the edge fetch at most once per interval. A lookup that
/// falls inside the interval waits for its end rather than failing, so a key rotated
/// just after a fetch is still picked up within the handshake.
pub const JWKS_REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Verifies with the key set published by control at `<control>/.well-known/jwks.json`,
/// fetched at start and again when a token names a key id the edge has not seen.
pub struct JwksAuth {
    url: String,
    issuer: String,
    verifier: ArcSwap<Option<Verifier>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl JwksAuth {
    /// A verifier fetching keys from control's REST base URL (`http://control:8080`).
    pub fn new(control_url: &str, issuer: &str) -> JwksAuth {
        JwksAuth {
            url: format!(
                "{}/.well-known/jwks.json",
                control_url.trim_end_matches('/')
            ),
            issuer: issuer.to_string(),
            verifier: ArcSwap::from_pointee(None),
            last_fetch: tokio::sync::Mutex::new(None),
        }
    }

    /// Fetches the key set now.
    pub async fn refresh(&self) -> Result<(), AuthError> {
        let unavailable = |m: String| AuthError {
            code: "keys_unavailable".into(),
            message: m,
        };
        let jwks: Jwks = crate::proxy::http_get_json(&self.url).await.map_err(|e| {
            unavailable(format!(
                "could not fetch control's public keys from {}: {e}; check that control is reachable from the edge",
                self.url
            ))
        })?;
        let v = Verifier::new(&jwks, self.issuer.clone())
            .map_err(|e| unavailable(format!("control's key set is unusable: {e}")))?;
        self.verifier.store(Arc::new(Some(v)));
        Ok(())
    }

    async fn refresh_rate_limited(&self) -> Result<(), AuthError> {
        let asked = Instant::now();
        // One fetch at a time; callers queued behind a fetch that started after they
        // asked use its result.
        let mut last = self.last_fetch.lock().await;
        if let Some(t) = *last {
            if t >= asked {
                return Ok(());
            }
            let since = t.elapsed();
            if since < JWKS_REFRESH_MIN_INTERVAL {
                tokio::time::sleep(JWKS_REFRESH_MIN_INTERVAL - since).await;
            }
        }
        *last = Some(Instant::now());
        self.refresh().await
    }
}

impl AgentAuth for JwksAuth {
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<AgentGrant, AuthError>> + Send + 'a>> {
        Box::pin(async move {
            let first = match &**self.verifier.load() {
                Some(v) => v.verify_ephemeral(token),
                None => Err(TokenError::UnknownKid(String::new())),
            };
            match first {
                Err(TokenError::UnknownKid(_)) => {}
                other => return other.map(grant).map_err(refusal),
            }
            // A key we have not seen: control may have rotated. Fetch and try again.
            self.refresh_rate_limited().await?;
            match &**self.verifier.load() {
                Some(v) => v.verify_ephemeral(token).map(grant).map_err(refusal),
                None => Err(AuthError {
                    code: "keys_unavailable".into(),
                    message: "the edge has not been able to fetch control's public keys yet; retry shortly".into(),
                }),
            }
        })
    }
}
