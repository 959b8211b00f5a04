//! Who may reach a tunnel: the access policy a tunnel's owner sets at creation, and the
//! cryptography the edge needs to enforce it.
//!
//! The policy travels inside the agent's ephemeral token (claim `access`), so control
//! signs it once and every edge that accepts the agent enforces the same rules without
//! asking anyone. Enforcement (the request flow: cookies, redirects, headers) lives in
//! the edge; this module holds the parts that are pure functions of bytes:
//!
//! - [`AccessPolicy`] and [`TunnelLimits`]: the JSON shapes of the REST API and the
//!   token, with [`AccessPolicy::validate`] giving a message a person can act on;
//! - [`ViewerVerifier`]: a viewer's JWT checked against the owner's key and claims;
//! - [`hash_password`] / [`verify_password`]: basic-auth credentials, stored as
//!   argon2id hashes in PHC format naming their parameters (never the password);
//!   older PBKDF2-HMAC-SHA256 hashes still verify;
//! - [`SessionKey`]: the edge's session cookie, MAC'ed with a key that control derives
//!   per tunnel, so a cookie minted for one tunnel is refused by every other;
//! - [`Cidr`]: address ranges for the allow and deny lists.

use std::collections::BTreeMap;
use std::net::IpAddr;

use aws_lc_rs::{digest, hmac, pbkdf2};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::{LEEWAY_SECS, MAX_TOKEN_LEN, Secret};

/// Most basic-auth users per tunnel.
pub const MAX_BASIC_USERS: usize = 16;
/// Most entries in each of the IP allow and deny lists.
pub const MAX_CIDRS: usize = 256;
/// Most origins in the frame-ancestors and CORS lists.
pub const MAX_ORIGINS: usize = 32;
/// Most required claims, and most forwarded claims.
pub const MAX_CLAIMS: usize = 16;
/// Longest forwarded claim value (longer ones are not forwarded).
pub const MAX_FORWARDED_CLAIM_LEN: usize = 256;
/// Shortest HMAC secret accepted for `HS256` viewer tokens (RFC 7518 §3.2: at least
/// the hash size).
pub const MIN_HMAC_SECRET_LEN: usize = 32;
/// Memory in KiB of the argon2id hashes [`hash_password`] makes (7 MiB, with
/// [`ARGON2_T_COST`] passes: one of OWASP's equivalent argon2id settings, the one that
/// needs least memory per check, since an edge runs several checks at once).
pub const ARGON2_M_COST: u32 = 7 * 1024;
/// Passes over memory of the argon2id hashes [`hash_password`] makes.
pub const ARGON2_T_COST: u32 = 5;
/// Lanes of the argon2id hashes [`hash_password`] makes.
pub const ARGON2_P_COST: u32 = 1;
/// Most memory (KiB) a stored argon2id hash may name: bounds the edge's memory per
/// check (checks run at most 2 at once per tunnel).
pub const MAX_ARGON2_M_COST: u32 = 64 * 1024;
/// Most passes a stored argon2id hash may name: bounds the edge's CPU per check.
pub const MAX_ARGON2_T_COST: u32 = 16;
/// Most lanes a stored argon2id hash may name.
pub const MAX_ARGON2_P_COST: u32 = 4;
/// Fewest KiB a stored argon2id hash may name (weaker hashes are refused).
pub const MIN_ARGON2_M_COST: u32 = 4 * 1024;
/// PBKDF2 iterations of the hashes [`hash_password`] made before argon2id; such
/// hashes still verify.
pub const PBKDF2_ITERATIONS: u32 = 100_000;
/// Fewest PBKDF2 iterations a stored hash may name (weaker hashes are refused).
pub const MIN_PBKDF2_ITERATIONS: u32 = 10_000;
/// Most PBKDF2 iterations a stored hash may name (bounds the edge's work per attempt).
pub const MAX_PBKDF2_ITERATIONS: u32 = 2_000_000;
/// Largest session cookie value the edge reads.
pub const MAX_SESSION_COOKIE_LEN: usize = 3 * 1024;

/// A tunnel's access policy. The default is public.
///
/// A viewer must pass every part that is set: the IP lists, then either the JWT policy
/// or basic auth (a tunnel has at most one of the two).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessPolicy {
    /// Viewers must present a JWT signed by the owner's key with the required claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtPolicy>,
    /// Viewers must send one of these users' credentials (HTTP basic auth).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub basic_auth: Vec<BasicUser>,
    /// When not empty, only viewers from these ranges (CIDR) are served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_allow: Vec<String>,
    /// Viewers from these ranges are refused (checked before `ip_allow`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_deny: Vec<String>,
    /// Who may embed the tunnel's pages in a frame: origins such as
    /// `https://portal.example.com`, `'self'`, or `'none'`. Empty leaves the origin's
    /// own headers alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frame_ancestors: Vec<String>,
    /// Origins whose pages may call the tunnel with CORS (credentials included). Empty
    /// leaves CORS to the origin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cors_origins: Vec<String>,
}

/// Viewer JWTs: the owner's verification key and the claims a token must carry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtPolicy {
    /// `EdDSA` (Ed25519), `ES256` or `HS256`. Optional: guessed from the key when left
    /// out (a secret means `HS256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// The public key (PEM, `-----BEGIN PUBLIC KEY-----`) for `EdDSA` and `ES256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_pem: Option<String>,
    /// The shared secret for `HS256` (at least [`MIN_HMAC_SECRET_LEN`] bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// Claims a token must carry with these values (compared as text; a list claim
    /// matches when any element does).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, String>,
    /// Required `aud` (a token without it, or with another, is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Required `iss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Claims passed to the origin as `X-Netbore-Claim-<name>` headers (the token's
    /// `sub` always goes as `X-Netbore-User`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward_claims: Vec<String>,
}

/// One basic-auth user: the name and a [`hash_password`] hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicUser {
    /// User name (no `:`).
    pub user: String,
    /// `pbkdf2-sha256$<iterations>$<salt>$<hash>`, from `netbore hash-password` or
    /// the agent's `--basic-auth USER:PASSWORD` (hashed before it leaves the machine).
    pub hash: String,
}

/// Per-tunnel limits, applied by edges on top of their own (the smaller wins).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelLimits {
    /// Largest request body a viewer may send (413 beyond it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
}

impl TunnelLimits {
    /// True when no limit is set.
    pub fn is_empty(&self) -> bool {
        self.max_body_bytes.is_none()
    }
}

impl AccessPolicy {
    /// True for the default: anyone may reach the tunnel and no header is changed.
    pub fn is_public(&self) -> bool {
        *self == AccessPolicy::default()
    }

    /// True when viewers must authenticate (JWT or basic auth).
    pub fn needs_viewer_auth(&self) -> bool {
        self.jwt.is_some() || !self.basic_auth.is_empty()
    }

    /// Checks the policy; the error says which field is wrong and how to fix it.
    pub fn validate(&self) -> Result<(), String> {
        if self.jwt.is_some() && !self.basic_auth.is_empty() {
            return Err(
                "access: set either 'jwt' or 'basic_auth', not both (a viewer can present only one)"
                    .into(),
            );
        }
        if let Some(j) = &self.jwt {
            ViewerVerifier::new(j)?;
        }
        if self.basic_auth.len() > MAX_BASIC_USERS {
            return Err(format!(
                "access.basic_auth: at most {MAX_BASIC_USERS} users per tunnel"
            ));
        }
        for u in &self.basic_auth {
            if u.user.is_empty() || u.user.contains(':') || u.user.chars().any(char::is_control) {
                return Err(format!(
                    "access.basic_auth: user name {:?} must be non-empty, without ':' or control characters",
                    u.user
                ));
            }
            PasswordHash::parse(&u.hash)
                .map_err(|e| format!("access.basic_auth: the hash for user {:?} {e}", u.user))?;
        }
        for (field, list) in [("ip_allow", &self.ip_allow), ("ip_deny", &self.ip_deny)] {
            if list.len() > MAX_CIDRS {
                return Err(format!("access.{field}: at most {MAX_CIDRS} ranges"));
            }
            for c in list {
                c.parse::<Cidr>()
                    .map_err(|e| format!("access.{field}: {e}"))?;
            }
        }
        if self.frame_ancestors.len() > MAX_ORIGINS || self.cors_origins.len() > MAX_ORIGINS {
            return Err(format!(
                "access: at most {MAX_ORIGINS} origins in frame_ancestors and in cors_origins"
            ));
        }
        for a in &self.frame_ancestors {
            if a != "'self'" && a != "'none'" {
                check_origin(a).map_err(|e| format!("access.frame_ancestors: {e}"))?;
            }
        }
        if self.frame_ancestors.len() > 1 && self.frame_ancestors.iter().any(|a| a == "'none'") {
            return Err(
                "access.frame_ancestors: 'none' cannot be combined with other sources".into(),
            );
        }
        for o in &self.cors_origins {
            check_origin(o).map_err(|e| format!("access.cors_origins: {e}"))?;
        }
        Ok(())
    }
}

/// An origin as browsers send it: `scheme://host[:port]`, nothing else.
fn check_origin(o: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{o:?} is not an origin; write it as scheme://host[:port], such as https://portal.example.com"
        )
    };
    let (scheme, rest) = o.split_once("://").ok_or_else(bad)?;
    if !(scheme == "https" || scheme == "http") || rest.is_empty() {
        return Err(bad());
    }
    let ok = rest
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !ok || rest.starts_with(':') {
        return Err(bad());
    }
    Ok(())
}

/// An IPv4 or IPv6 network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("'{s}' is not an address or CIDR range like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("'{s}' has a prefix length outside 0..={max}"))?
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// True when `ip` is inside the range (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------------
// Viewer JWTs

/// Why a viewer's token was refused: a stable code and a message for the viewer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ViewerTokenError {
    /// `access_token_invalid`, `access_token_expired`, `access_claim_mismatch`, ...
    pub code: &'static str,
    /// What happened and what to do (names a claim, never its expected value).
    pub message: String,
}

fn refused(code: &'static str, message: impl Into<String>) -> ViewerTokenError {
    ViewerTokenError {
        code,
        message: message.into(),
    }
}

/// What a valid viewer token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewerIdentity {
    /// The token's `sub`, when it has one.
    pub subject: Option<String>,
    /// The token's `exp` (Unix seconds).
    pub expires_at: u64,
    /// The claims to forward, by name, as text.
    pub forwarded: Vec<(String, String)>,
}

/// A [`JwtPolicy`] ready to check tokens.
pub struct ViewerVerifier {
    key: DecodingKey,
    validation: Validation,
    claims: BTreeMap<String, String>,
    forward: Vec<String>,
}

impl std::fmt::Debug for ViewerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewerVerifier")
            .field("algorithms", &self.validation.algorithms)
            .field("claims", &self.claims.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ViewerVerifier {
    /// Compiles a policy; the error says what is wrong with it.
    pub fn new(p: &JwtPolicy) -> Result<ViewerVerifier, String> {
        let alg = match (p.alg.as_deref(), &p.secret, &p.public_key_pem) {
            (Some("EdDSA"), _, _) => Algorithm::EdDSA,
            (Some("ES256"), _, _) => Algorithm::ES256,
            (Some("HS256"), _, _) => Algorithm::HS256,
            (Some(other), _, _) => {
                return Err(format!(
                    "access.jwt.alg: {other:?} is not supported; use EdDSA, ES256 or HS256"
                ));
            }
            (None, Some(_), None) => Algorithm::HS256,
            (None, None, Some(pem)) => {
                if DecodingKey::from_ed_pem(pem.as_bytes()).is_ok() {
                    Algorithm::EdDSA
                } else {
                    Algorithm::ES256
                }
            }
            (None, None, None) => {
                return Err(
                    "access.jwt: give the key that signs viewer tokens: 'public_key_pem' (EdDSA, ES256) or 'secret' (HS256)"
                        .into(),
                );
            }
            (None, Some(_), Some(_)) => {
                return Err(
                    "access.jwt: give either 'public_key_pem' or 'secret', not both".into(),
                );
            }
        };
        let key = match alg {
            Algorithm::HS256 => {
                let s = p.secret.as_ref().ok_or(
                    "access.jwt: HS256 needs 'secret' (the shared secret that signs viewer tokens)",
                )?;
                if s.expose().len() < MIN_HMAC_SECRET_LEN {
                    return Err(format!(
                        "access.jwt.secret: at least {MIN_HMAC_SECRET_LEN} bytes are needed for HS256 (use a random secret)"
                    ));
                }
                if p.public_key_pem.is_some() {
                    return Err("access.jwt: HS256 takes 'secret', not 'public_key_pem'".into());
                }
                DecodingKey::from_secret(s.expose().as_bytes())
            }
            _ => {
                let pem = p.public_key_pem.as_ref().ok_or(
                    "access.jwt: EdDSA and ES256 need 'public_key_pem' (the public key that verifies viewer tokens)",
                )?;
                if p.secret.is_some() {
                    return Err(
                        "access.jwt: EdDSA and ES256 take 'public_key_pem', not 'secret'".into(),
                    );
                }
                let parsed = if alg == Algorithm::EdDSA {
                    DecodingKey::from_ed_pem(pem.as_bytes())
                } else {
                    DecodingKey::from_ec_pem(pem.as_bytes())
                };
                parsed.map_err(|e| {
                    format!(
                        "access.jwt.public_key_pem: not a {alg:?} public key in PEM form ({e}); export it with `openssl pkey -pubout`"
                    )
                })?
            }
        };
        if p.claims.len() > MAX_CLAIMS || p.forward_claims.len() > MAX_CLAIMS {
            return Err(format!(
                "access.jwt: at most {MAX_CLAIMS} required claims and {MAX_CLAIMS} forwarded claims"
            ));
        }
        for name in &p.forward_claims {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(format!(
                    "access.jwt.forward_claims: {name:?} must be 1 to 64 letters, digits, '_' or '-' (it becomes a header name)"
                ));
            }
        }
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY_SECS;
        v.validate_exp = true;
        v.validate_nbf = true;
        match &p.audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        if let Some(i) = &p.issuer {
            v.set_issuer(&[i]);
        }
        v.set_required_spec_claims(&["exp"]);
        Ok(ViewerVerifier {
            key,
            validation: v,
            claims: p.claims.clone(),
            forward: p.forward_claims.clone(),
        })
    }

    /// Checks a viewer's token at time `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<ViewerIdentity, ViewerTokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(refused(
                "access_token_invalid",
                format!("The access token is longer than {MAX_TOKEN_LEN} bytes."),
            ));
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &self.key, &self.validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::ExpiredSignature => refused(
                        "access_token_expired",
                        "The access token has expired; get a new link or token from the site that sent you here.",
                    ),
                    K::ImmatureSignature => refused(
                        "access_token_not_yet_valid",
                        "The access token is not valid yet; check the clock of the machine that issued it.",
                    ),
                    K::InvalidAudience => refused(
                        "access_token_wrong_audience",
                        "The access token is for another audience than this tunnel.",
                    ),
                    K::InvalidIssuer => refused(
                        "access_token_wrong_issuer",
                        "The access token was issued by someone this tunnel does not trust.",
                    ),
                    K::MissingRequiredClaim(c) => refused(
                        "access_token_invalid",
                        format!("The access token has no '{c}' claim; tokens must expire."),
                    ),
                    _ => refused(
                        "access_token_invalid",
                        "The access token is not valid for this tunnel (bad signature, algorithm or format).",
                    ),
                }
            })?;
        let claims = data.claims;
        // jsonwebtoken checks exp with leeway against its own clock; check ours too so a
        // caller's clock (tests, replays) decides.
        let exp = claims.get("exp").and_then(|e| e.as_u64()).unwrap_or(0);
        if exp + LEEWAY_SECS < now {
            return Err(refused(
                "access_token_expired",
                "The access token has expired; get a new link or token from the site that sent you here.",
            ));
        }
        for (name, want) in &self.claims {
            match claims.get(name) {
                None | Some(serde_json::Value::Null) => {
                    return Err(refused(
                        "access_claim_missing",
                        format!(
                            "The access token has no '{name}' claim, which this tunnel requires."
                        ),
                    ));
                }
                Some(v) if claim_matches(v, want) => {}
                Some(_) => {
                    return Err(refused(
                        "access_claim_mismatch",
                        format!("The access token's '{name}' claim does not match this tunnel."),
                    ));
                }
            }
        }
        let forwarded = self
            .forward
            .iter()
            .filter_map(|n| {
                let text = claim_text(claims.get(n)?)?;
                (text.len() <= MAX_FORWARDED_CLAIM_LEN
                    && text.bytes().all(|b| (0x20..0x7f).contains(&b)))
                .then(|| (n.clone(), text))
            })
            .collect();
        let subject = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .filter(|s| {
                s.len() <= MAX_FORWARDED_CLAIM_LEN && s.bytes().all(|b| (0x20..0x7f).contains(&b))
            })
            .map(str::to_string);
        Ok(ViewerIdentity {
            subject,
            expires_at: exp,
            forwarded,
        })
    }
}

fn claim_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn claim_matches(v: &serde_json::Value, want: &str) -> bool {
    match v {
        serde_json::Value::Array(a) => a.iter().any(|e| claim_text(e).is_some_and(|t| t == want)),
        other => claim_text(other).is_some_and(|t| t == want),
    }
}

// ---------------------------------------------------------------------------------
// Basic-auth passwords

/// A stored basic-auth hash: argon2id in PHC format (current), or the earlier
/// `pbkdf2-sha256$ITERATIONS$SALT$HASH`.
enum PasswordHash {
    Argon2id {
        m: u32,
        t: u32,
        p: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

/// PHC strings encode salt and hash in standard base64 without padding.
const PHC_B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD_NO_PAD;

impl PasswordHash {
    fn parse(s: &str) -> Result<PasswordHash, String> {
        if s.starts_with('$') {
            return PasswordHash::parse_argon2(s);
        }
        let wrong = "is not a Netbore password hash ($argon2id$v=19$m=M,t=T,p=P$SALT$HASH); make one with `netbore hash-password`";
        let mut parts = s.split('$');
        if parts.next() != Some("pbkdf2-sha256") {
            return Err(wrong.into());
        }
        let (Some(i), Some(salt), Some(hash), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(wrong.into());
        };
        let iterations: u32 = i.parse().map_err(|_| wrong.to_string())?;
        if !(MIN_PBKDF2_ITERATIONS..=MAX_PBKDF2_ITERATIONS).contains(&iterations) {
            return Err(format!(
                "names {iterations} iterations; {MIN_PBKDF2_ITERATIONS} to {MAX_PBKDF2_ITERATIONS} are accepted"
            ));
        }
        let salt = URL_SAFE_NO_PAD
            .decode(salt)
            .map_err(|_| wrong.to_string())?;
        let hash = URL_SAFE_NO_PAD
            .decode(hash)
            .map_err(|_| wrong.to_string())?;
        if salt.len() < 8 || hash.len() != 32 {
            return Err(wrong.into());
        }
        Ok(PasswordHash::Pbkdf2 {
            iterations,
            salt,
            hash,
        })
    }

    fn parse_argon2(s: &str) -> Result<PasswordHash, String> {
        let wrong = "is not an argon2id hash in PHC format ($argon2id$v=19$m=M,t=T,p=P$SALT$HASH); make one with `netbore hash-password`";
        let parts: Vec<&str> = s.split('$').collect();
        let ["", "argon2id", "v=19", params, salt, hash] = parts.as_slice() else {
            return Err(wrong.into());
        };
        let (mut m, mut t, mut p) = (None, None, None);
        for kv in params.split(',') {
            let (k, v) = kv.split_once('=').ok_or_else(|| wrong.to_string())?;
            let v: u32 = v.parse().map_err(|_| wrong.to_string())?;
            match k {
                "m" if m.is_none() => m = Some(v),
                "t" if t.is_none() => t = Some(v),
                "p" if p.is_none() => p = Some(v),
                _ => return Err(wrong.into()),
            }
        }
        let (Some(m), Some(t), Some(p)) = (m, t, p) else {
            return Err(wrong.into());
        };
        if !(MIN_ARGON2_M_COST..=MAX_ARGON2_M_COST).contains(&m)
            || !(1..=MAX_ARGON2_T_COST).contains(&t)
            || !(1..=MAX_ARGON2_P_COST).contains(&p)
        {
            return Err(format!(
                "names m={m},t={t},p={p}; accepted are m {MIN_ARGON2_M_COST} to {MAX_ARGON2_M_COST} KiB, t 1 to {MAX_ARGON2_T_COST}, p 1 to {MAX_ARGON2_P_COST}"
            ));
        }
        let salt = PHC_B64.decode(salt).map_err(|_| wrong.to_string())?;
        let hash = PHC_B64.decode(hash).map_err(|_| wrong.to_string())?;
        if salt.len() < 8 || !(16..=64).contains(&hash.len()) {
            return Err(wrong.into());
        }
        Ok(PasswordHash::Argon2id {
            m,
            t,
            p,
            salt,
            hash,
        })
    }
}

fn argon2id(m: u32, t: u32, p: u32, len: usize) -> Option<argon2::Argon2<'static>> {
    let params = argon2::Params::new(m, t, p, Some(len)).ok()?;
    Some(argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        params,
    ))
}

/// Hashes a basic-auth password for an [`AccessPolicy`]: argon2id with
/// [`ARGON2_M_COST`] KiB, [`ARGON2_T_COST`] passes and [`ARGON2_P_COST`] lane, a random
/// 16-byte salt and a 32-byte hash, as a PHC string that names its parameters
/// (`$argon2id$v=19$m=7168,t=5,p=1$SALT$HASH`), so they can rise later.
pub fn hash_password(password: &str) -> String {
    let salt: [u8; 16] = rand::random();
    let mut out = [0u8; 32];
    argon2id(ARGON2_M_COST, ARGON2_T_COST, ARGON2_P_COST, out.len())
        .expect("the built-in parameters are valid")
        .hash_password_into(password.as_bytes(), &salt, &mut out)
        .expect("a 16-byte salt and a 32-byte output are valid");
    format!(
        "$argon2id$v=19$m={ARGON2_M_COST},t={ARGON2_T_COST},p={ARGON2_P_COST}${}${}",
        PHC_B64.encode(salt),
        PHC_B64.encode(out)
    )
}

/// True when `password` matches `hash` (constant time; a malformed hash never matches).
/// Costs the hash's parameters of CPU and memory: callers bound how often strangers
/// can ask. Accepts argon2id PHC strings and the earlier `pbkdf2-sha256$…` hashes.
pub fn verify_password(hash: &str, password: &str) -> bool {
    match PasswordHash::parse(hash) {
        Ok(PasswordHash::Argon2id {
            m,
            t,
            p,
            salt,
            hash,
        }) => {
            let Some(a) = argon2id(m, t, p, hash.len()) else {
                return false;
            };
            let mut out = vec![0u8; hash.len()];
            if a.hash_password_into(password.as_bytes(), &salt, &mut out)
                .is_err()
            {
                return false;
            }
            aws_lc_rs::constant_time::verify_slices_are_equal(&out, &hash).is_ok()
        }
        Ok(PasswordHash::Pbkdf2 {
            iterations,
            salt,
            hash,
        }) => {
            let Some(iterations) = std::num::NonZeroU32::new(iterations) else {
                return false;
            };
            pbkdf2::verify(
                pbkdf2::PBKDF2_HMAC_SHA256,
                iterations,
                &salt,
                password.as_bytes(),
                &hash,
            )
            .is_ok()
        }
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------
// Session cookies

/// What a session cookie carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The tunnel it was minted for.
    #[serde(rename = "t")]
    pub tunnel_id: String,
    /// When it expires (the viewer token's `exp`).
    pub exp: u64,
    /// The viewer token's `sub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Forwarded claims.
    #[serde(default, rename = "f", skip_serializing_if = "Vec::is_empty")]
    pub forwarded: Vec<(String, String)>,
}

/// A tunnel's session-cookie key (32 bytes, from control).
pub struct SessionKey(hmac::Key);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

const SESSION_MAC_CONTEXT: &[u8] = b"netbore-session-v1.";

impl SessionKey {
    /// The key from its base64url form (as it travels in the ephemeral token).
    pub fn from_secret(s: &Secret) -> Result<SessionKey, String> {
        let raw = URL_SAFE_NO_PAD
            .decode(s.expose())
            .map_err(|_| "the session key is not base64url".to_string())?;
        if raw.len() < 32 {
            return Err("the session key is shorter than 32 bytes".into());
        }
        Ok(SessionKey(hmac::Key::new(hmac::HMAC_SHA256, &raw)))
    }

    fn mac(&self, payload: &str) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(SESSION_MAC_CONTEXT);
        ctx.update(payload.as_bytes());
        ctx.sign()
    }

    /// The cookie value for `s`: `payload.mac`, both base64url.
    pub fn seal(&self, s: &Session) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(s).expect("serialisable"));
        let tag = self.mac(&payload);
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The session in `value` if it was sealed with this key for `tunnel_id` and has
    /// not expired at `now`.
    pub fn open(&self, value: &str, tunnel_id: &str, now: u64) -> Option<Session> {
        if value.len() > MAX_SESSION_COOKIE_LEN {
            return None;
        }
        let (payload, tag) = value.split_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let mut ctx_input = Vec::with_capacity(SESSION_MAC_CONTEXT.len() + payload.len());
        ctx_input.extend_from_slice(SESSION_MAC_CONTEXT);
        ctx_input.extend_from_slice(payload.as_bytes());
        hmac::verify(&self.0, &ctx_input, &tag).ok()?;
        let s: Session = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        (s.tunnel_id == tunnel_id && s.exp >= now).then_some(s)
    }
}

/// Derives the session-cookie key of `tunnel_id` from a signing key's secret seed.
pub(crate) fn derive_session_key(seed: &[u8], tunnel_id: &str) -> Secret {
    let key = hmac::Key::new(hmac::HMAC_SHA256, seed);
    let tag = hmac::sign(
        &key,
        format!("netbore-session-key-v1|{tunnel_id}").as_bytes(),
    );
    Secret::new(URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// A seed for [`derive_session_key`] from a private key's DER bytes.
pub(crate) fn session_seed(der: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"netbore-session-seed-v1|");
    ctx.update(der);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_ranges_match_what_they_say() {
        let r: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(r.contains("10.1.2.3".parse().unwrap()));
        assert!(r.contains("10.200.1.1".parse().unwrap()));
        assert!(!r.contains("11.0.0.1".parse().unwrap()));
        assert!(r.contains("::ffff:10.1.2.3".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }

    #[test]
    fn passwords_verify_only_with_the_right_password() {
        let h = hash_password("correct horse");
        assert!(verify_password(&h, "correct horse"));
        assert!(!verify_password(&h, "correct horsf"));
        assert!(!verify_password("pbkdf2-sha256$1$AAAAAAAAAAA$AAAA", "x"));
        assert!(!verify_password("plain", "plain"));
    }

    #[test]
    fn new_hashes_are_argon2id_in_phc_format_naming_their_parameters() {
        let started = std::time::Instant::now();
        let h = hash_password("pw");
        println!("one argon2id hash took {:?}", started.elapsed());
        let prefix =
            format!("$argon2id$v=19$m={ARGON2_M_COST},t={ARGON2_T_COST},p={ARGON2_P_COST}$");
        assert!(h.starts_with(&prefix), "{h}");
        assert!(PasswordHash::parse(&h).is_ok());
        // Parameters beyond the edge's bounds are refused, with the reason.
        let greedy = h.replace("m=7168", "m=1048576");
        assert!(!verify_password(&greedy, "pw"));
        let err = PasswordHash::parse(&greedy).err().unwrap();
        assert!(err.contains("m=1048576"), "{err}");
        // Raising the parameters later: a hash made with others still verifies.
        let a = argon2id(8 * 1024, 2, 1, 32).unwrap();
        let mut out = [0u8; 32];
        a.hash_password_into(b"pw", b"saltsaltsalt", &mut out)
            .unwrap();
        let other = format!(
            "$argon2id$v=19$m=8192,t=2,p=1${}${}",
            PHC_B64.encode(b"saltsaltsalt"),
            PHC_B64.encode(out)
        );
        assert!(verify_password(&other, "pw"));
        assert!(!verify_password(&other, "pW"));
    }

    #[test]
    fn earlier_pbkdf2_hashes_still_verify() {
        // As `hash_password` made them before argon2id.
        let salt = [7u8; 16];
        let mut out = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(PBKDF2_ITERATIONS).unwrap(),
            &salt,
            b"old secret",
            &mut out,
        );
        let old = format!(
            "pbkdf2-sha256${PBKDF2_ITERATIONS}${}${}",
            URL_SAFE_NO_PAD.encode(salt),
            URL_SAFE_NO_PAD.encode(out)
        );
        assert!(verify_password(&old, "old secret"));
        assert!(!verify_password(&old, "old secreT"));
    }

    #[test]
    fn a_session_opens_only_for_its_tunnel_key_and_time() {
        let k1 = SessionKey::from_secret(&derive_session_key(&[1; 32], "tun_a")).unwrap();
        let k2 = SessionKey::from_secret(&derive_session_key(&[1; 32], "tun_b")).unwrap();
        let s = Session {
            tunnel_id: "tun_a".into(),
            exp: 1000,
            sub: Some("alice".into()),
            forwarded: vec![("seat".into(), "7".into())],
        };
        let v = k1.seal(&s);
        assert_eq!(k1.open(&v, "tun_a", 999), Some(s.clone()));
        assert_eq!(k1.open(&v, "tun_a", 1001), None, "expired");
        assert_eq!(k1.open(&v, "tun_b", 999), None, "other tunnel");
        assert_eq!(k2.open(&v, "tun_a", 999), None, "other key");
        let mut forged = v.clone();
        forged.insert(3, 'x');
        assert_eq!(k1.open(&forged, "tun_a", 999), None, "tampered");
    }

    #[test]
    fn policies_are_validated_with_a_reason() {
        let mut p = AccessPolicy::default();
        assert!(p.validate().is_ok() && p.is_public());
        p.cors_origins = vec!["https://portal.example.com".into()];
        assert!(p.validate().is_ok());
        p.cors_origins = vec!["https://x.example.com; script-src *".into()];
        assert!(p.validate().unwrap_err().contains("cors_origins"));
        p.cors_origins.clear();
        p.ip_allow = vec!["10.0.0.0/99".into()];
        assert!(p.validate().unwrap_err().contains("ip_allow"));
        p.ip_allow.clear();
        p.jwt = Some(JwtPolicy {
            secret: Some(Secret::new("short")),
            ..JwtPolicy::default()
        });
        assert!(p.validate().unwrap_err().contains("32 bytes"));
        p.jwt = Some(JwtPolicy {
            secret: Some(Secret::new("x".repeat(32))),
            ..JwtPolicy::default()
        });
        p.basic_auth = vec![BasicUser {
            user: "a".into(),
            hash: hash_password("b"),
        }];
        assert!(p.validate().unwrap_err().contains("not both"));
    }

    #[test]
    fn viewer_tokens_need_the_key_the_claims_and_time() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let secret = "s".repeat(32);
        let mut claims = BTreeMap::new();
        claims.insert("workshop_id".to_string(), "ws-42".to_string());
        claims.insert("seat".to_string(), "7".to_string());
        let v = ViewerVerifier::new(&JwtPolicy {
            secret: Some(Secret::new(secret.clone())),
            claims,
            forward_claims: vec!["seat".into()],
            ..JwtPolicy::default()
        })
        .unwrap();
        let now = crate::now_unix();
        let sign = |c: serde_json::Value, key: &str| {
            encode(
                &Header::new(Algorithm::HS256),
                &c,
                &EncodingKey::from_secret(key.as_bytes()),
            )
            .unwrap()
        };
        let good =
            serde_json::json!({"sub": "alice", "exp": now + 60, "workshop_id": "ws-42", "seat": 7});
        let id = v.verify(&sign(good.clone(), &secret), now).unwrap();
        assert_eq!(id.subject.as_deref(), Some("alice"));
        assert_eq!(id.forwarded, vec![("seat".to_string(), "7".to_string())]);
        let code = |c: serde_json::Value, key: &str| v.verify(&sign(c, key), now).unwrap_err().code;
        assert_eq!(code(good.clone(), &"t".repeat(32)), "access_token_invalid");
        let mut wrong = good.clone();
        wrong["workshop_id"] = "ws-43".into();
        assert_eq!(code(wrong, &secret), "access_claim_mismatch");
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("seat");
        assert_eq!(code(missing, &secret), "access_claim_missing");
        let mut expired = good.clone();
        expired["exp"] = (now - 3600).into();
        assert_eq!(code(expired, &secret), "access_token_expired");
        let mut no_exp = good;
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(code(no_exp, &secret), "access_token_invalid");
    }
}
