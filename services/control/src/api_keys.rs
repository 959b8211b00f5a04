//! API keys (`nbk_…`): long-lived opaque secrets that act for an owner, with scopes, an
//! optional expiry and an optional name pattern. Shown once at creation; control keeps
//! the SHA-256 of the key (the key is 256 random bits, so a fast hash is as strong as a
//! slow one; see docs/security.md). Used as the bearer of `POST /auth/token` (which
//! mints a short management token from it) or directly on the tunnel endpoints.
//!
//! A verified key is cached in this replica for [`API_KEY_CACHE_TTL`], so a busy
//! script does not hit the database on every call; a revocation through this replica
//! evicts it at once, and through another takes effect here within that time.

use netbore_api::ErrorCode;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use netbore_tokens::{ManagementClaims, now_unix};
use parking_lot::Mutex;

use crate::Control;
use crate::accounts::{ApiKeyRecord, new_id};
use crate::api::{ApiKey, CreateApiKeyRequest, CreateApiKeyResponse, ListApiKeysResponse};
use crate::ops::{self, ApiError, DEFAULT_SCOPES, SCOPES, rfc3339};

/// What every API key starts with.
pub const API_KEY_PREFIX: &str = "nbk_";
/// Characters of a key shown for display (`nbk_` and 8 more).
pub const DISPLAY_PREFIX_LEN: usize = 12;
/// Random bytes in a key (256 bits).
pub const SECRET_BYTES: usize = 32;
/// Longest bearer taken for an API key: a longer one is refused before it is hashed.
pub const MAX_API_KEY_LEN: usize = 128;
/// Longest label.
pub const MAX_LABEL_BYTES: usize = 200;
/// Longest name pattern (a DNS label and a `*`).
pub const MAX_PATTERN_LEN: usize = 64;
/// How long a verified key is trusted without asking the database again: the longest
/// a revocation through another replica takes to be seen here.
pub const API_KEY_CACHE_TTL: Duration = Duration::from_secs(2);
/// Most keys cached; past it the cache is emptied (only valid keys get in, so only a
/// very large installation reaches it).
pub const API_KEY_CACHE_MAX: usize = 10_000;

/// Keys verified recently, by the hash of the key.
#[derive(Default)]
pub struct KeyCache {
    map: Mutex<HashMap<String, (ApiKeyRecord, Instant)>>,
}

impl KeyCache {
    fn get(&self, hash: &str, now: Instant) -> Option<ApiKeyRecord> {
        let m = self.map.lock();
        m.get(hash)
            .filter(|(_, until)| *until > now)
            .map(|(r, _)| r.clone())
    }

    fn put(&self, hash: String, rec: ApiKeyRecord, now: Instant) {
        let mut m = self.map.lock();
        if m.len() >= API_KEY_CACHE_MAX {
            m.retain(|_, (_, until)| *until > now);
            if m.len() >= API_KEY_CACHE_MAX {
                m.clear();
            }
        }
        m.insert(hash, (rec, now + API_KEY_CACHE_TTL));
    }

    fn evict(&self, key_id: &str) {
        self.map.lock().retain(|_, (r, _)| r.id != key_id);
    }
}

/// True when a bearer is an API key (rather than a JWT or the bootstrap credential).
pub fn is_api_key(bearer: &str) -> bool {
    bearer.starts_with(API_KEY_PREFIX)
}

/// The stored form of a key: SHA-256, hex.
pub fn hash_key(key: &str) -> String {
    use std::fmt::Write;
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes());
    d.as_ref().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// True when `name` is one `pattern` allows: `prefix*` allows names starting with
/// `prefix`, anything else only itself.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// Checks a name pattern: lowercase letters, digits and `-`, with at most one `*`, at
/// the end.
pub fn validate_pattern(pattern: &str) -> Result<(), ApiError> {
    let body = pattern.strip_suffix('*').unwrap_or(pattern);
    let ok = !pattern.is_empty()
        && pattern.len() <= MAX_PATTERN_LEN
        && body
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidNamePattern,
            format!(
                "name_pattern '{}' is not a name or a name prefix followed by '*' (lowercase letters, digits and '-', at most {MAX_PATTERN_LEN} characters); e.g. ci-*",
                pattern.chars().take(MAX_PATTERN_LEN).collect::<String>()
            ),
        ))
    }
}

/// A key as the APIs show it.
pub fn view(r: &ApiKeyRecord) -> ApiKey {
    ApiKey {
        id: r.id.clone(),
        owner: r.owner.clone(),
        prefix: r.prefix.clone(),
        label: r.label.clone(),
        scopes: r.scopes.clone(),
        name_pattern: r.name_pattern.clone(),
        created_at: rfc3339(r.created_at),
        expires_at: r.expires_at.map(rfc3339),
        last_used_at: r.last_used_at.map(rfc3339),
        revoked_at: r.revoked_at.map(rfc3339),
    }
}

fn refused(code: ErrorCode, message: String) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

/// The key behind `key` if it is in force: 401 `bad_credential` for an unknown key,
/// `api_key_revoked` and `api_key_expired` for one that was. Records its use.
pub async fn verify(control: &Control, key: &str) -> Result<ApiKeyRecord, ApiError> {
    if key.len() > MAX_API_KEY_LEN {
        return Err(refused(
            ErrorCode::BadCredential,
            format!(
                "the API key is longer than {MAX_API_KEY_LEN} bytes, so it is not one control issued; pass the key shown when it was created"
            ),
        ));
    }
    let hash = hash_key(key);
    let now = now_unix();
    let cache = control.api_key_cache();
    if let Some(r) = cache.get(&hash, Instant::now())
        && r.expires_at.is_none_or(|e| e > now)
    {
        return Ok(r);
    }
    let Some(r) = control.store().api_key_by_hash(&hash).await? else {
        tracing::info!("an API key was refused: not known");
        return Err(refused(
            ErrorCode::BadCredential,
            "the API key is not known to control; pass the key shown when it was created, or create a new one (POST /v1/api-keys)".into(),
        ));
    };
    if r.revoked_at.is_some() {
        tracing::info!(key = %r.id, owner = %r.owner, "a revoked API key was refused");
        return Err(refused(
            ErrorCode::ApiKeyRevoked,
            format!(
                "the API key {} ({}) was revoked; ask its owner or an administrator for a new one (POST /v1/api-keys)",
                r.prefix, r.id
            ),
        ));
    }
    if let Some(e) = r.expires_at
        && e <= now
    {
        tracing::info!(key = %r.id, owner = %r.owner, "an expired API key was refused");
        return Err(refused(
            ErrorCode::ApiKeyExpired,
            format!(
                "the API key {} ({}) expired at {}; create a new one (POST /v1/api-keys)",
                r.prefix,
                r.id,
                rfc3339(e)
            ),
        ));
    }
    // Best effort: a key that verified is usable even if its use is not recorded.
    if let Err(e) = control.store().touch_api_key(&r.id, now).await {
        tracing::warn!(key = %r.id, error = %e, "could not record an API key's use");
    }
    cache.put(hash, r.clone(), Instant::now());
    Ok(r)
}

/// Management claims for a verified key, valid for `ttl` seconds at most and never
/// past the key's own expiry.
pub fn claims_of(
    control: &Control,
    key: &ApiKeyRecord,
    scopes: Vec<String>,
    ttl: u64,
) -> ManagementClaims {
    let now = now_unix();
    let ttl = match key.expires_at {
        Some(e) => ttl.min(e.saturating_sub(now)),
        None => ttl,
    };
    let mut c = ManagementClaims::new_at(now, &control.config().issuer, &key.owner, scopes, ttl);
    c.name_pattern = key.name_pattern.clone();
    c
}

/// The claims an API key bearer acts with on the tunnel endpoints: the key's owner,
/// scopes and name pattern.
pub async fn bearer_claims(control: &Control, key: &str) -> Result<ManagementClaims, ApiError> {
    let r = verify(control, key).await?;
    crate::audit::note_api_key(&r.id);
    let ttl = control.config().management_ttl.as_secs();
    Ok(claims_of(control, &r, r.scopes.clone(), ttl))
}

fn scope_list(scopes: Option<Vec<String>>) -> Result<Vec<String>, ApiError> {
    let scopes = scopes.unwrap_or_else(|| DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect());
    if scopes.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidScope,
            format!(
                "a key needs at least one scope; known scopes: {}",
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
    let mut v = scopes;
    v.dedup();
    Ok(v)
}

async fn caller(control: &Control, bearer: Option<String>) -> Result<ManagementClaims, ApiError> {
    ops::management(control, bearer).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "this needs a management token or an API key: send 'Authorization: Bearer <token>' (issue one with POST /auth/token)",
        )
    })
}

/// Creates an API key. Needs `admin`, or a caller that holds every scope it grants,
/// for its own subject, within its own name pattern.
pub async fn create(
    control: &Control,
    bearer: Option<String>,
    req: CreateApiKeyRequest,
) -> Result<CreateApiKeyResponse, ApiError> {
    let who = caller(control, bearer).await?;
    let admin = who.scopes.iter().any(|s| s == "admin");
    let scopes = scope_list(req.scopes)?;
    let subject = req.subject.unwrap_or_else(|| who.sub.clone());
    if subject.is_empty() || subject.len() > MAX_LABEL_BYTES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            format!("subject must be 1 to {MAX_LABEL_BYTES} bytes"),
        ));
    }
    if req.label.len() > MAX_LABEL_BYTES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            format!("label is longer than {MAX_LABEL_BYTES} bytes; shorten it"),
        ));
    }
    if let Some(p) = &req.name_pattern {
        validate_pattern(p)?;
    }
    let name_pattern = req.name_pattern.or_else(|| who.name_pattern.clone());
    if !admin {
        let forbidden = |m: String| ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, m);
        if subject != who.sub {
            return Err(forbidden(format!(
                "only 'admin' creates keys for another subject ('{subject}'); leave subject out to create one for yourself ('{}')",
                who.sub
            )));
        }
        if let Some(s) = scopes.iter().find(|s| !who.scopes.contains(s)) {
            return Err(forbidden(format!(
                "a key cannot grant the scope '{s}', which your token lacks; ask for fewer scopes or use a token that has it"
            )));
        }
        if who.name_pattern.is_some() && name_pattern != who.name_pattern {
            return Err(forbidden(format!(
                "your token is limited to names matching '{}'; a key you create must be limited to the same pattern (leave name_pattern out)",
                who.name_pattern.as_deref().unwrap_or_default()
            )));
        }
    }
    let now = now_unix();
    let secret: [u8; SECRET_BYTES] = rand::random();
    let key = format!("{API_KEY_PREFIX}{}", B64URL.encode(secret));
    let rec = ApiKeyRecord {
        id: new_id("key"),
        owner: subject,
        prefix: key[..DISPLAY_PREFIX_LEN].to_string(),
        label: req.label,
        scopes,
        name_pattern,
        created_at: now,
        expires_at: req.expires_in_seconds.map(|s| now.saturating_add(s.max(1))),
        last_used_at: None,
        revoked_at: None,
    };
    if !control
        .store()
        .create_api_key(&rec, &hash_key(&key))
        .await?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::TooManyApiKeys,
            format!(
                "'{}' already holds {} API keys; revoke unused ones (DELETE /v1/api-keys/{{id}}) — revoked keys count until an administrator deletes them",
                rec.owner,
                crate::accounts::MAX_API_KEYS_PER_OWNER
            ),
        ));
    }
    tracing::info!(key = %rec.id, prefix = %rec.prefix, owner = %rec.owner, scopes = ?rec.scopes, "API key created");
    crate::audit::record(
        control,
        &who.sub,
        "api_key.create",
        &rec.id,
        None,
        Some(&rec.owner),
        serde_json::json!({
            "owner": rec.owner, "prefix": rec.prefix, "label": rec.label,
            "scopes": rec.scopes, "name_pattern": rec.name_pattern,
            "expires_at": rec.expires_at,
        }),
    )
    .await;
    Ok(CreateApiKeyResponse {
        key,
        api_key: view(&rec),
    })
}

/// The caller's keys (every owner's for `admin`), never their secrets.
pub async fn list(
    control: &Control,
    bearer: Option<String>,
) -> Result<ListApiKeysResponse, ApiError> {
    let who = caller(control, bearer).await?;
    let admin = who.scopes.iter().any(|s| s == "admin");
    let keys = control
        .store()
        .list_api_keys((!admin).then_some(who.sub.as_str()))
        .await?;
    Ok(ListApiKeysResponse {
        api_keys: keys.iter().map(view).collect(),
    })
}

/// Revokes a key: from now on it is refused (`api_key_revoked`) on every replica within
/// [`API_KEY_CACHE_TTL`], at once on this one. The caller's own keys, or any with
/// `admin`; another owner's key is 404 `api_key_not_found`.
pub async fn revoke(
    control: &Control,
    bearer: Option<String>,
    id: &str,
) -> Result<ApiKey, ApiError> {
    let who = caller(control, bearer).await?;
    let admin = who.scopes.iter().any(|s| s == "admin");
    let found = control
        .store()
        .api_key(id)
        .await?
        .filter(|k| admin || k.owner == who.sub);
    let Some(mut rec) = found else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::ApiKeyNotFound,
            format!(
                "no API key '{}' of yours; list your keys with GET /v1/api-keys",
                id.chars().take(64).collect::<String>()
            ),
        ));
    };
    let now = now_unix();
    control.store().revoke_api_key(&rec.id, now).await?;
    control.api_key_cache().evict(&rec.id);
    rec.revoked_at = rec.revoked_at.or(Some(now));
    tracing::info!(key = %rec.id, prefix = %rec.prefix, owner = %rec.owner, by = %who.sub, "API key revoked");
    crate::audit::record(
        control,
        &who.sub,
        "api_key.revoke",
        &rec.id,
        None,
        Some(&rec.owner),
        serde_json::json!({"owner": rec.owner, "prefix": rec.prefix}),
    )
    .await;
    Ok(view(&rec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_a_prefix_or_one_name() {
        assert!(name_matches("ci-*", "ci-1"));
        assert!(name_matches("ci-*", "ci-"));
        assert!(!name_matches("ci-*", "prod"));
        assert!(name_matches("hub", "hub"));
        assert!(!name_matches("hub", "hub2"));
        assert!(name_matches("*", "anything"));
        assert!(validate_pattern("ci-*").is_ok());
        assert!(validate_pattern("hub").is_ok());
        for bad in ["", "a*b", "A*", "ci-**", &"a".repeat(65)] {
            assert_eq!(
                validate_pattern(bad).unwrap_err().code,
                "invalid_name_pattern",
                "{bad}"
            );
        }
    }

    #[test]
    fn keys_hash_to_hex_sha256() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_api_key("nbk_x"));
        assert!(!is_api_key("eyJ"));
    }
}
