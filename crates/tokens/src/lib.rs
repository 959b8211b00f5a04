//! Netbore's tokens: who may do what, as signed JWTs.
//!
//! - **ephemeral** (`typ = "ephemeral"`, `aud = "netbore-edge"`): minutes long; lets an
//!   agent's handshake at an edge serve tunnel `sub` under public name `name`.
//! - **recreate** (`typ = "recreate"`, `aud = "netbore-control"`): days long; gets the
//!   same tunnel and name back from control, statelessly.
//! - **management** (`typ = "management"`, `aud = "netbore-control"`): scoped
//!   administrative access to control.
//!
//! Control signs with the active Ed25519 key of a [`KeySet`] and publishes every key
//! still valid as a JWKS; verifiers ([`Verifier`]) hold only public keys, pin `EdDSA`,
//! and require `exp`, `iat`, `nbf`, `aud`, `iss` and `typ`, with at most
//! [`LEEWAY_SECS`] of clock skew. Every token names its key with `kid`, so keys rotate
//! without downtime.

pub mod access;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Clock skew tolerated between the signer and a verifier, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// Audience of ephemeral tokens.
pub const AUD_EDGE: &str = "netbore-edge";
/// Audience of recreate and management tokens.
pub const AUD_CONTROL: &str = "netbore-control";

/// Token type claim values.
pub const TYP_EPHEMERAL: &str = "ephemeral";
/// See [`TYP_EPHEMERAL`].
pub const TYP_RECREATE: &str = "recreate";
/// See [`TYP_EPHEMERAL`].
pub const TYP_MANAGEMENT: &str = "management";

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A secret string whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself; call only where it is used, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why a token was refused or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Past `exp` (plus leeway).
    #[error("the token has expired")]
    Expired,
    /// Before `nbf` (minus leeway).
    #[error("the token is not valid yet (check the clocks)")]
    NotYetValid,
    /// Wrong `aud`.
    #[error("the token is for another audience")]
    WrongAudience,
    /// Wrong `iss`.
    #[error("the token was issued by someone else")]
    WrongIssuer,
    /// Wrong `typ` (e.g. a recreate token used as an ephemeral one).
    #[error("the token is a {found} token where a {expected} token is needed")]
    WrongType {
        /// What the token is.
        found: String,
        /// What was needed.
        expected: &'static str,
    },
    /// The `kid` names no key in the set (rotated away, or forged).
    #[error("the token is signed with an unknown key id {0:?}")]
    UnknownKid(String),
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    BadSignature,
    /// Not a JWT, or a claim is missing or of the wrong type.
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// The header names another algorithm than EdDSA (including `none`).
    #[error("the token's algorithm {0} is not allowed")]
    AlgorithmNotAllowed(String),
    /// A key could not be loaded or generated.
    #[error("key error: {0}")]
    Key(String),
}

impl TokenError {
    /// A stable snake_case code for APIs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::WrongAudience => "token_wrong_audience",
            TokenError::WrongIssuer => "token_wrong_issuer",
            TokenError::WrongType { .. } => "token_wrong_type",
            TokenError::UnknownKid(_) => "token_unknown_kid",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::Malformed(_) => "token_malformed",
            TokenError::AlgorithmNotAllowed(_) => "token_algorithm_not_allowed",
            TokenError::Key(_) => "key_error",
        }
    }
}

/// Claims of an ephemeral token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EphemeralClaims {
    /// Tunnel id.
    pub sub: String,
    /// Public name.
    pub name: String,
    /// Issuer.
    pub iss: String,
    /// Audience ([`AUD_EDGE`]).
    pub aud: String,
    /// Issued at.
    pub iat: u64,
    /// Not before.
    pub nbf: u64,
    /// Expires.
    pub exp: u64,
    /// [`TYP_EPHEMERAL`].
    pub typ: String,
    /// Who may reach the tunnel (absent: public). Edges enforce it.
    #[serde(default, skip_serializing_if = "access::AccessPolicy::is_public")]
    pub access: access::AccessPolicy,
    /// The tunnel's own limits, on top of the edge's.
    #[serde(default, skip_serializing_if = "access::TunnelLimits::is_empty")]
    pub limits: access::TunnelLimits,
    /// The tunnel credential (`nbt_…`) this token was issued for: its id (never the
    /// secret), so edges close that credential's links when it is revoked and refuse
    /// its tokens afterwards. Absent for tokens issued for a management or recreate
    /// token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cred: Option<String>,
    /// What the tunnel carries: absent for HTTP, [`KIND_TCP`] (raw TCP on
    /// [`EphemeralClaims::port`]) or [`KIND_TLS`] (TLS passed through by SNI). Edges
    /// that predate it ignore it (they would serve the tunnel as HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The public TCP port of a [`KIND_TCP`] tunnel, the same on every edge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    // No session-cookie key here: anyone holding the token (the agent, and any edge
    // the agent offers it to) could forge viewers' cookies with it. Edges derive the
    // key from a seed control sends only to authenticated edges ([`SessionSeed`]).
}

impl EphemeralClaims {
    /// Claims valid from now ([`now_unix`]) for `ttl_secs`.
    pub fn new(issuer: &str, tunnel_id: &str, name: &str, ttl_secs: u64) -> EphemeralClaims {
        EphemeralClaims::new_at(now_unix(), issuer, tunnel_id, name, ttl_secs)
    }

    /// Claims valid from `now` (Unix seconds) for `ttl_secs`.
    pub fn new_at(
        now: u64,
        issuer: &str,
        tunnel_id: &str,
        name: &str,
        ttl_secs: u64,
    ) -> EphemeralClaims {
        EphemeralClaims {
            sub: tunnel_id.into(),
            name: name.into(),
            iss: issuer.into(),
            aud: AUD_EDGE.into(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(ttl_secs),
            typ: TYP_EPHEMERAL.into(),
            access: access::AccessPolicy::default(),
            limits: access::TunnelLimits::default(),
            cred: None,
            kind: None,
            port: None,
        }
    }
}

/// A range of TCP ports, `LO-HI` inclusive (or one port): where control allocates
/// TCP tunnels' public ports and where every edge accepts them (`--tcp-ports`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port (inclusive).
    pub hi: u16,
}

/// Most ports one range may span: every edge holds a listener per port.
pub const MAX_PORT_RANGE: u32 = 10_000;

impl PortRange {
    /// True when `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    /// The number of ports.
    pub fn len(&self) -> u32 {
        u32::from(self.hi) - u32::from(self.lo) + 1
    }

    /// Never true (a range holds at least one port); for clippy's `len` rule.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<PortRange, String> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("'{s}' is not a port range; give LO-HI with ports 1 to 65535, e.g. 20000-20999"))
        };
        let r = PortRange {
            lo: parse(a)?,
            hi: parse(b)?,
        };
        if r.lo > r.hi {
            return Err(format!(
                "'{s}' starts above where it ends; give LO-HI with LO <= HI, e.g. 20000-20999"
            ));
        }
        if r.len() > MAX_PORT_RANGE {
            return Err(format!(
                "'{s}' spans {} ports, over the {MAX_PORT_RANGE} an edge listens on; give a smaller range",
                r.len()
            ));
        }
        Ok(r)
    }
}

/// [`EphemeralClaims::kind`] of a raw TCP tunnel.
pub const KIND_TCP: &str = "tcp";
/// [`EphemeralClaims::kind`] of a TLS passthrough tunnel (routed by SNI, never
/// terminated at the edge).
pub const KIND_TLS: &str = "tls";

/// Claims of a recreate token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecreateClaims {
    /// Tunnel id.
    pub sub: String,
    /// Public name.
    pub name: String,
    /// Issuer.
    pub iss: String,
    /// Audience ([`AUD_CONTROL`]).
    pub aud: String,
    /// Issued at.
    pub iat: u64,
    /// Not before.
    pub nbf: u64,
    /// Expires.
    pub exp: u64,
    /// [`TYP_RECREATE`].
    pub typ: String,
}

impl RecreateClaims {
    /// Claims valid from now ([`now_unix`]) for `ttl_secs`.
    pub fn new(issuer: &str, tunnel_id: &str, name: &str, ttl_secs: u64) -> RecreateClaims {
        RecreateClaims::new_at(now_unix(), issuer, tunnel_id, name, ttl_secs)
    }

    /// Claims valid from `now` (Unix seconds) for `ttl_secs`.
    pub fn new_at(
        now: u64,
        issuer: &str,
        tunnel_id: &str,
        name: &str,
        ttl_secs: u64,
    ) -> RecreateClaims {
        RecreateClaims {
            sub: tunnel_id.into(),
            name: name.into(),
            iss: issuer.into(),
            aud: AUD_CONTROL.into(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(ttl_secs),
            typ: TYP_RECREATE.into(),
        }
    }
}

/// Claims of a management token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagementClaims {
    /// Who it was issued to.
    pub sub: String,
    /// What it allows (`tunnels:write`, `tunnels:read`, `names:claim`, `admin`).
    pub scopes: Vec<String>,
    /// Issuer.
    pub iss: String,
    /// Audience ([`AUD_CONTROL`]).
    pub aud: String,
    /// Issued at.
    pub iat: u64,
    /// Not before.
    pub nbf: u64,
    /// Expires.
    pub exp: u64,
    /// [`TYP_MANAGEMENT`].
    pub typ: String,
    /// Names the token may create and act on (`ci-*`: a prefix and a trailing `*`, or
    /// one exact name); absent: any name. Copied from the API key it was minted from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_pattern: Option<String>,
}

impl ManagementClaims {
    /// Claims valid from now ([`now_unix`]) for `ttl_secs`.
    pub fn new(issuer: &str, sub: &str, scopes: Vec<String>, ttl_secs: u64) -> ManagementClaims {
        ManagementClaims::new_at(now_unix(), issuer, sub, scopes, ttl_secs)
    }

    /// Claims valid from `now` (Unix seconds) for `ttl_secs`.
    pub fn new_at(
        now: u64,
        issuer: &str,
        sub: &str,
        scopes: Vec<String>,
        ttl_secs: u64,
    ) -> ManagementClaims {
        ManagementClaims {
            sub: sub.into(),
            scopes,
            iss: issuer.into(),
            aud: AUD_CONTROL.into(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(ttl_secs),
            typ: TYP_MANAGEMENT.into(),
            name_pattern: None,
        }
    }

    /// True when the token carries `scope` or `admin`.
    pub fn allows(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope || s == "admin")
    }
}

/// One public key (RFC 8037 OKP/Ed25519 JWK).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Always `OKP`.
    pub kty: String,
    /// Always `Ed25519`.
    pub crv: String,
    /// Public key, base64url.
    pub x: String,
    /// Key id.
    pub kid: String,
    /// Always `EdDSA`.
    pub alg: String,
    /// Always `sig`.
    #[serde(rename = "use")]
    pub use_: String,
}

/// A published key set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Jwks {
    /// The keys.
    pub keys: Vec<Jwk>,
}

/// Length of a [`SessionSeed`] in bytes.
pub const SESSION_SEED_LEN: usize = 32;

/// One signing key's secret seed for tunnels' session-cookie keys. Only control and
/// authenticated edges hold it; it is never in a token. `Debug` prints no secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionSeed {
    /// The signing key id it belongs to (the `kid` of the agents' tokens).
    pub kid: String,
    seed: [u8; SESSION_SEED_LEN],
}

impl std::fmt::Debug for SessionSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSeed")
            .field("kid", &self.kid)
            .field("seed", &"<redacted>")
            .finish()
    }
}

impl SessionSeed {
    /// A seed from its bytes as they travel to edges; `None` unless exactly
    /// [`SESSION_SEED_LEN`] bytes.
    pub fn from_bytes(kid: &str, bytes: &[u8]) -> Option<SessionSeed> {
        Some(SessionSeed {
            kid: kid.to_string(),
            seed: bytes.try_into().ok()?,
        })
    }

    /// The seed's bytes, to send to an authenticated edge; never log them.
    pub fn expose(&self) -> &[u8] {
        &self.seed
    }

    /// The session-cookie key of `tunnel_id` (HMAC-SHA256 of the tunnel id).
    pub fn session_key(&self, tunnel_id: &str) -> Secret {
        access::derive_session_key(&self.seed, tunnel_id)
    }
}

#[derive(Clone)]
struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    public: Vec<u8>,
    /// Secret seed for per-tunnel session-cookie keys ([`SessionSeed`]).
    session_seed: [u8; 32],
}

/// Control's signing keys: the active one (last) signs, all are published.
#[derive(Clone)]
pub struct KeySet {
    keys: Vec<SigningKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field(
                "kids",
                &self.keys.iter().map(|k| &k.kid).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn key_from_pkcs8(der: &[u8]) -> Result<SigningKey, TokenError> {
    let pair = Ed25519KeyPair::from_pkcs8(der)
        .map_err(|e| TokenError::Key(format!("not an Ed25519 PKCS#8 key: {e}")))?;
    let public = pair.public_key().as_ref().to_vec();
    // The key id is derived from the public key, so every replica agrees on it.
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &public);
    let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..12]);
    Ok(SigningKey {
        kid,
        encoding: EncodingKey::from_ed_der(der),
        public,
        session_seed: access::session_seed(der),
    })
}

fn generate_key() -> SigningKey {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let doc = Ed25519KeyPair::generate_pkcs8(&rng).expect("the system RNG works");
    key_from_pkcs8(doc.as_ref()).expect("a generated key parses")
}

impl KeySet {
    /// A set with one fresh key.
    pub fn generate() -> KeySet {
        KeySet {
            keys: vec![generate_key()],
        }
    }

    /// Loads PKCS#8 PEM files (`openssl genpkey -algorithm ed25519`); the first file's
    /// key signs, the others stay published for tokens they signed.
    pub fn from_pem_files(paths: &[PathBuf]) -> Result<KeySet, TokenError> {
        if paths.is_empty() {
            return Err(TokenError::Key("no signing key files given".into()));
        }
        let mut keys = Vec::new();
        for p in paths.iter().rev() {
            let text = std::fs::read_to_string(p)
                .map_err(|e| TokenError::Key(format!("cannot read {}: {e}", p.display())))?;
            let der = pem_body(&text, "PRIVATE KEY").ok_or_else(|| {
                TokenError::Key(format!(
                    "{} holds no '-----BEGIN PRIVATE KEY-----' block",
                    p.display()
                ))
            })?;
            keys.push(
                key_from_pkcs8(&der)
                    .map_err(|e| TokenError::Key(format!("{}: {e}", p.display())))?,
            );
        }
        Ok(KeySet { keys })
    }

    /// A fresh Ed25519 key as PKCS#8 DER, for a caller that keeps its keys itself
    /// (control stores the one it generates in its database).
    pub fn generate_pkcs8() -> Vec<u8> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).expect("the system RNG works");
        doc.as_ref().to_vec()
    }

    /// A set from Ed25519 PKCS#8 DER keys, oldest first: the last signs, all are
    /// published.
    pub fn from_pkcs8_ders(ders: &[Vec<u8>]) -> Result<KeySet, TokenError> {
        if ders.is_empty() {
            return Err(TokenError::Key("no signing keys given".into()));
        }
        let keys = ders
            .iter()
            .map(|d| key_from_pkcs8(d))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KeySet { keys })
    }

    /// Adds a fresh active key; old ones stay published.
    pub fn rotate(&mut self) {
        self.keys.push(generate_key());
    }

    /// Drops all but the newest `keep` keys (after old tokens have expired).
    pub fn retire(&mut self, keep: usize) {
        let n = self.keys.len();
        if n > keep.max(1) {
            self.keys.drain(..n - keep.max(1));
        }
    }

    /// The session seeds of every key in the set (control sends them to authenticated
    /// edges; a tunnel's cookie key is [`SessionSeed::session_key`] of the seed whose
    /// `kid` signed the agent's token, so every edge derives the same key, and a key
    /// rotation gives new ones: viewers then present their token again).
    pub fn session_seeds(&self) -> Vec<SessionSeed> {
        self.keys
            .iter()
            .map(|k| SessionSeed {
                kid: k.kid.clone(),
                seed: k.session_seed,
            })
            .collect()
    }

    /// The active key's id.
    pub fn active_kid(&self) -> &str {
        &self.keys.last().expect("a key set has a key").kid
    }

    /// The public keys.
    pub fn jwks(&self) -> Jwks {
        Jwks {
            keys: self
                .keys
                .iter()
                .map(|k| Jwk {
                    kty: "OKP".into(),
                    crv: "Ed25519".into(),
                    x: URL_SAFE_NO_PAD.encode(&k.public),
                    kid: k.kid.clone(),
                    alg: "EdDSA".into(),
                    use_: "sig".into(),
                })
                .collect(),
        }
    }

    fn sign<T: Serialize>(&self, claims: &T) -> Result<String, TokenError> {
        let k = self.keys.last().expect("a key set has a key");
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(k.kid.clone());
        h.typ = Some("JWT".into());
        jsonwebtoken::encode(&h, claims, &k.encoding).map_err(|e| TokenError::Key(e.to_string()))
    }

    /// Signs an ephemeral token.
    pub fn sign_ephemeral(&self, c: &EphemeralClaims) -> Result<String, TokenError> {
        self.sign(c)
    }

    /// Signs a recreate token.
    pub fn sign_recreate(&self, c: &RecreateClaims) -> Result<String, TokenError> {
        self.sign(c)
    }

    /// Signs a management token.
    pub fn sign_management(&self, c: &ManagementClaims) -> Result<String, TokenError> {
        self.sign(c)
    }
}

fn pem_body(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = text[start..].find(&end)? + start;
    let b64: String = text[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// Largest token accepted, so a hostile caller cannot make a verifier decode megabytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The JOSE header fields verification looks at, read before anything else so that
/// `alg: none` and HMAC headers are named as such (jsonwebtoken's own header parser
/// rejects algorithms it does not know as a generic parse error).
#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
}

fn raw_header(token: &str) -> Result<RawHeader, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed(format!(
            "the token is longer than {MAX_TOKEN_LEN} bytes"
        )));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "a JWT has three dot-separated parts".into(),
        ));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|e| TokenError::Malformed(format!("the header is not base64url: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| TokenError::Malformed(format!("the header is not a JSON object: {e}")))
}

/// The header's `kid` once the header is known to name EdDSA.
fn checked_kid(token: &str) -> Result<String, TokenError> {
    let h = raw_header(token)?;
    match h.alg.as_deref() {
        Some("EdDSA") => {}
        Some(other) => return Err(TokenError::AlgorithmNotAllowed(other.to_string())),
        None => return Err(TokenError::Malformed("no alg in the header".into())),
    }
    h.kid
        .ok_or_else(|| TokenError::Malformed("no kid in the header".into()))
}

/// The key id in a token's header, without verifying anything: a verifier that meets
/// an unknown kid refreshes its key set before refusing the token.
pub fn kid_of(token: &str) -> Option<String> {
    raw_header(token).ok()?.kid
}

/// Verifies tokens against a published key set.
pub struct Verifier {
    keys: HashMap<String, DecodingKey>,
    issuer: String,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl Verifier {
    /// A verifier for tokens from `issuer` signed by a key of `jwks`. Keys of other
    /// types than Ed25519 are ignored.
    pub fn new(jwks: &Jwks, issuer: impl Into<String>) -> Result<Verifier, TokenError> {
        let mut keys = HashMap::new();
        for k in &jwks.keys {
            if k.kty != "OKP" || k.crv != "Ed25519" {
                continue;
            }
            let dk = DecodingKey::from_ed_components(&k.x)
                .map_err(|e| TokenError::Key(format!("key {}: {e}", k.kid)))?;
            keys.insert(k.kid.clone(), dk);
        }
        Ok(Verifier {
            keys,
            issuer: issuer.into(),
        })
    }

    /// True when the set holds key `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    fn verify<T: DeserializeOwned + Typed>(
        &self,
        token: &str,
        aud: &str,
        expected: &'static str,
    ) -> Result<T, TokenError> {
        let kid = checked_kid(token)?;
        let key = self.keys.get(&kid).ok_or(TokenError::UnknownKid(kid))?;
        let mut v = Validation::new(Algorithm::EdDSA);
        v.leeway = LEEWAY_SECS;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_audience(&[aud]);
        v.set_issuer(&[&self.issuer]);
        v.set_required_spec_claims(&["exp", "iat", "nbf", "aud", "iss", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => TokenError::Expired,
                K::ImmatureSignature => TokenError::NotYetValid,
                K::InvalidAudience => TokenError::WrongAudience,
                K::InvalidIssuer => TokenError::WrongIssuer,
                K::InvalidSignature => TokenError::BadSignature,
                K::InvalidAlgorithm => TokenError::AlgorithmNotAllowed("mismatch".into()),
                _ => TokenError::Malformed(e.to_string()),
            }
        })?;
        // The type first, so a token of another kind says so rather than "malformed".
        let typ = data
            .claims
            .get("typ")
            .and_then(|t| t.as_str())
            .unwrap_or("untyped");
        if typ != expected {
            return Err(TokenError::WrongType {
                found: typ.to_string(),
                expected,
            });
        }
        let claims: T = serde_json::from_value(data.claims)
            .map_err(|e| TokenError::Malformed(e.to_string()))?;
        // iat far in the future is as suspicious as nbf in the future.
        if claims.iat() > now_unix() + LEEWAY_SECS {
            return Err(TokenError::NotYetValid);
        }
        Ok(claims)
    }

    /// Verifies an ephemeral token (edges).
    pub fn verify_ephemeral(&self, token: &str) -> Result<EphemeralClaims, TokenError> {
        self.verify(token, AUD_EDGE, TYP_EPHEMERAL)
    }

    /// Verifies a recreate token (control).
    pub fn verify_recreate(&self, token: &str) -> Result<RecreateClaims, TokenError> {
        self.verify(token, AUD_CONTROL, TYP_RECREATE)
    }

    /// Verifies a management token (control).
    pub fn verify_management(&self, token: &str) -> Result<ManagementClaims, TokenError> {
        self.verify(token, AUD_CONTROL, TYP_MANAGEMENT)
    }
}

trait Typed {
    fn iat(&self) -> u64;
}

macro_rules! typed {
    ($($t:ty),*) => {$(
        impl Typed for $t {
            fn iat(&self) -> u64 { self.iat }
        }
    )*};
}
typed!(EphemeralClaims, RecreateClaims, ManagementClaims);

#[cfg(test)]
mod tests {
    //! One test per way a token can be forged or misused.

    use super::*;

    const ISS: &str = "netbore-control";

    fn setup() -> (KeySet, Verifier) {
        let ks = KeySet::generate();
        let v = Verifier::new(&ks.jwks(), ISS).unwrap();
        (ks, v)
    }

    fn b64(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    fn eph() -> EphemeralClaims {
        EphemeralClaims::new(ISS, "t1", "app", 300)
    }

    #[test]
    fn a_valid_ephemeral_token_verifies() {
        let (ks, v) = setup();
        let c = eph();
        let t = ks.sign_ephemeral(&c).unwrap();
        assert_eq!(kid_of(&t).as_deref(), Some(ks.active_kid()));
        assert_eq!(v.verify_ephemeral(&t).unwrap(), c);
    }

    #[test]
    fn alg_none_is_refused() {
        let (ks, v) = setup();
        let h = serde_json::json!({"alg": "none", "typ": "JWT", "kid": ks.active_kid()});
        let t = format!(
            "{}.{}.",
            b64(&h),
            b64(&serde_json::to_value(eph()).unwrap())
        );
        assert_eq!(
            v.verify_ephemeral(&t),
            Err(TokenError::AlgorithmNotAllowed("none".into()))
        );
        assert_eq!(
            v.verify_ephemeral(&t).unwrap_err().code(),
            "token_algorithm_not_allowed"
        );
    }

    #[test]
    fn a_token_signed_by_another_key_is_refused() {
        let (ks, v) = setup();
        let other = KeySet::generate();
        let c = eph();
        // Signed by a key the verifier does not know, under its own kid.
        let bad = other.sign_ephemeral(&c).unwrap();
        assert!(matches!(
            v.verify_ephemeral(&bad),
            Err(TokenError::UnknownKid(_))
        ));
        // The same signature presented under our kid.
        let good = ks.sign_ephemeral(&c).unwrap();
        let forged = format!(
            "{}.{}",
            good.rsplit_once('.').unwrap().0,
            bad.rsplit('.').next().unwrap()
        );
        assert_eq!(v.verify_ephemeral(&forged), Err(TokenError::BadSignature));
    }

    #[test]
    fn hs256_signed_with_the_public_key_is_refused() {
        let (ks, v) = setup();
        let public = URL_SAFE_NO_PAD.decode(&ks.jwks().keys[0].x).unwrap();
        for secret in [public.clone(), ks.jwks().keys[0].x.clone().into_bytes()] {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some(ks.active_kid().into());
            let t = jsonwebtoken::encode(&h, &eph(), &EncodingKey::from_secret(&secret)).unwrap();
            assert_eq!(
                v.verify_ephemeral(&t),
                Err(TokenError::AlgorithmNotAllowed("HS256".into()))
            );
        }
    }

    #[test]
    fn an_expired_token_is_refused() {
        let (ks, v) = setup();
        let now = now_unix();
        let c = EphemeralClaims::new_at(now - 600, ISS, "t1", "app", 600 - LEEWAY_SECS - 5);
        assert_eq!(
            v.verify_ephemeral(&ks.sign_ephemeral(&c).unwrap()),
            Err(TokenError::Expired)
        );
        // Expired by less than the leeway is still accepted.
        let c = EphemeralClaims::new_at(now - 600, ISS, "t1", "app", 595);
        assert!(v.verify_ephemeral(&ks.sign_ephemeral(&c).unwrap()).is_ok());
    }

    #[test]
    fn a_token_not_valid_yet_is_refused() {
        let (ks, v) = setup();
        let mut c = eph();
        c.nbf = now_unix() + LEEWAY_SECS + 60;
        assert_eq!(
            v.verify_ephemeral(&ks.sign_ephemeral(&c).unwrap()),
            Err(TokenError::NotYetValid)
        );
        // Issued in the future (beyond the leeway) is refused the same way.
        let c = EphemeralClaims::new_at(now_unix() + 3600, ISS, "t1", "app", 300);
        assert_eq!(
            v.verify_ephemeral(&ks.sign_ephemeral(&c).unwrap()),
            Err(TokenError::NotYetValid)
        );
    }

    #[test]
    fn a_wrong_audience_is_refused() {
        let (ks, v) = setup();
        let mut c = eph();
        c.aud = "someone-else".into();
        assert_eq!(
            v.verify_ephemeral(&ks.sign_ephemeral(&c).unwrap()),
            Err(TokenError::WrongAudience)
        );
    }

    #[test]
    fn a_wrong_issuer_is_refused() {
        let (ks, v) = setup();
        let c = EphemeralClaims::new("evil", "t1", "app", 300);
        assert_eq!(
            v.verify_ephemeral(&ks.sign_ephemeral(&c).unwrap()),
            Err(TokenError::WrongIssuer)
        );
    }

    #[test]
    fn an_unknown_kid_is_refused() {
        let (ks, v) = setup();
        // A genuine signature by our key, but the header names a kid we never published.
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some("not-a-kid".into());
        let t = jsonwebtoken::encode(&h, &eph(), &ks.keys[0].encoding).unwrap();
        assert_eq!(
            v.verify_ephemeral(&t),
            Err(TokenError::UnknownKid("not-a-kid".into()))
        );
        assert_eq!(kid_of(&t).as_deref(), Some("not-a-kid"));
        // No kid at all.
        let t = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &eph(), &ks.keys[0].encoding)
            .unwrap();
        assert!(matches!(
            v.verify_ephemeral(&t),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn a_recreate_token_is_not_an_ephemeral_token() {
        let (ks, v) = setup();
        let r = ks
            .sign_recreate(&RecreateClaims::new(ISS, "t1", "app", 3600))
            .unwrap();
        // Different audience, so refused before the type is even looked at.
        assert_eq!(v.verify_ephemeral(&r), Err(TokenError::WrongAudience));
        // Even with the edge's audience, the type gives it away.
        let mut c = RecreateClaims::new(ISS, "t1", "app", 3600);
        c.aud = AUD_EDGE.into();
        let r = ks.sign_recreate(&c).unwrap();
        assert!(matches!(
            v.verify_ephemeral(&r),
            Err(TokenError::WrongType { .. })
        ));
    }

    #[test]
    fn an_ephemeral_token_is_not_a_recreate_token() {
        let (ks, v) = setup();
        let e = ks.sign_ephemeral(&eph()).unwrap();
        assert_eq!(v.verify_recreate(&e), Err(TokenError::WrongAudience));
        let mut c = eph();
        c.aud = AUD_CONTROL.into();
        let e = ks.sign_ephemeral(&c).unwrap();
        let err = v.verify_recreate(&e).unwrap_err();
        assert_eq!(err.code(), "token_wrong_type");
        assert!(err.to_string().contains("ephemeral"), "{err}");
    }

    #[test]
    fn management_and_recreate_tokens_are_not_interchangeable() {
        let (ks, v) = setup();
        let m = ks
            .sign_management(&ManagementClaims::new(
                ISS,
                "ops",
                vec!["admin".into()],
                3600,
            ))
            .unwrap();
        assert!(matches!(
            v.verify_recreate(&m),
            Err(TokenError::WrongType { .. })
        ));
        assert!(v.verify_management(&m).unwrap().allows("tunnels:write"));
        let r = ks
            .sign_recreate(&RecreateClaims::new(ISS, "t1", "app", 3600))
            .unwrap();
        assert!(matches!(
            v.verify_management(&r),
            Err(TokenError::WrongType { .. })
        ));
    }

    #[test]
    fn an_untyped_token_is_refused() {
        let (ks, v) = setup();
        let mut c = serde_json::to_value(eph()).unwrap();
        c.as_object_mut().unwrap().remove("typ");
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(ks.active_kid().into());
        let t = jsonwebtoken::encode(&h, &c, &ks.keys[0].encoding).unwrap();
        assert!(matches!(
            v.verify_ephemeral(&t),
            Err(TokenError::WrongType { .. })
        ));
    }

    #[test]
    fn a_tampered_payload_is_refused() {
        let (ks, v) = setup();
        let t = ks.sign_ephemeral(&eph()).unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        let c = EphemeralClaims::new(ISS, "t1", "admin", 300);
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(&serde_json::to_value(&c).unwrap()),
            parts[2]
        );
        assert_eq!(v.verify_ephemeral(&forged), Err(TokenError::BadSignature));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let (_, v) = setup();
        for t in [
            "",
            "a",
            "a.b",
            "a.b.c",
            "a.b.c.d",
            "....",
            &"x".repeat(20_000),
        ] {
            assert!(
                matches!(v.verify_ephemeral(t), Err(TokenError::Malformed(_))),
                "{t:.20}"
            );
            assert_eq!(kid_of(t), None);
        }
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_until_retired() {
        let mut ks = KeySet::generate();
        let old = ks.sign_ephemeral(&eph()).unwrap();
        ks.rotate();
        let new = ks.sign_ephemeral(&eph()).unwrap();
        assert_ne!(kid_of(&old), kid_of(&new));
        assert_eq!(kid_of(&new).as_deref(), Some(ks.active_kid()));
        let v = Verifier::new(&ks.jwks(), ISS).unwrap();
        assert!(v.verify_ephemeral(&old).is_ok());
        assert!(v.verify_ephemeral(&new).is_ok());
        ks.retire(1);
        let v = Verifier::new(&ks.jwks(), ISS).unwrap();
        assert!(matches!(
            v.verify_ephemeral(&old),
            Err(TokenError::UnknownKid(_))
        ));
        assert!(v.verify_ephemeral(&new).is_ok());
    }

    #[test]
    fn the_jwks_is_rfc_7517_json_with_public_keys_only() {
        let ks = KeySet::generate();
        let j = serde_json::to_value(ks.jwks()).unwrap();
        let k = &j["keys"][0];
        assert_eq!(k["kty"], "OKP");
        assert_eq!(k["crv"], "Ed25519");
        assert_eq!(k["alg"], "EdDSA");
        assert_eq!(k["use"], "sig");
        assert_eq!(k["kid"], ks.active_kid());
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(k["x"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );
        assert!(k.get("d").is_none());
        // And it reads back.
        let back: Jwks = serde_json::from_value(j).unwrap();
        assert_eq!(back, ks.jwks());
    }

    #[test]
    fn keys_load_from_pem_files_and_the_first_signs() {
        let dir = tempfile::tempdir().unwrap();
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let mut paths = Vec::new();
        for i in 0..2 {
            let doc = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
            let b64 = base64::engine::general_purpose::STANDARD.encode(doc.as_ref());
            let pem = format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n");
            let p = dir.path().join(format!("k{i}.pem"));
            std::fs::write(&p, pem).unwrap();
            paths.push(p);
        }
        let ks = KeySet::from_pem_files(&paths).unwrap();
        assert_eq!(ks.jwks().keys.len(), 2);
        let again = KeySet::from_pem_files(&paths[..1]).unwrap();
        // Key ids derive from the public key, so every replica agrees on them.
        assert_eq!(again.active_kid(), ks.active_kid());
        let t = ks.sign_ephemeral(&eph()).unwrap();
        let v = Verifier::new(&again.jwks(), ISS).unwrap();
        assert!(v.verify_ephemeral(&t).is_ok());
        // Not a key: a readable error naming the file.
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let err = KeySet::from_pem_files(&[junk]).unwrap_err().to_string();
        assert!(err.contains("junk.pem"), "{err}");
    }

    #[test]
    fn session_seeds_are_per_key_and_never_in_a_token() {
        let mut ks = KeySet::generate();
        let t = ks.sign_ephemeral(&eph()).unwrap();
        let payload = URL_SAFE_NO_PAD
            .decode(t.split('.').nth(1).unwrap())
            .unwrap();
        assert!(!String::from_utf8(payload).unwrap().contains("session"));
        let before = ks.session_seeds();
        ks.rotate();
        let after = ks.session_seeds();
        assert_eq!(after.len(), 2);
        // The old key's seed is unchanged (its tunnels' cookies keep working) and the
        // new key's gives other cookie keys.
        assert_eq!(after[0], before[0]);
        assert_ne!(
            after[0].session_key("t1").expose(),
            after[1].session_key("t1").expose()
        );
        assert_ne!(
            after[1].session_key("t1").expose(),
            after[1].session_key("t2").expose()
        );
        let again = SessionSeed::from_bytes(&after[1].kid, after[1].expose()).unwrap();
        assert_eq!(again, after[1]);
        assert!(SessionSeed::from_bytes("k", &[0; 16]).is_none());
        assert!(!format!("{again:?}").contains(&format!("{:?}", after[1].expose())));
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "hunter2");
    }
}
