//! Who may call `netbore.edge.v1.EdgeService`: edges holding a credential control knows.
//!
//! An edge presents a bearer token (`authorization: Bearer <token>` gRPC metadata) on
//! every call. Control keeps only each token's SHA-256 digest, each bound to the edge
//! ids it may report as: an exact id (`edge-eu-1`) or a prefix ending in `*`
//! (`netbore-edge-*` for the pods of one StatefulSet, `*` for any id). A leaked
//! credential therefore speaks only for its own edges, and a file of digests reveals no
//! token. The presented token's digest is compared with every known digest in constant
//! time, so timing tells a caller nothing about which digest is near.

use std::path::Path;

use netbore_tokens::Secret;

/// Shortest edge token accepted (the chart and `openssl rand -hex 32` give 64).
pub const MIN_EDGE_TOKEN_LEN: usize = 32;

/// Prefix of a digest in configuration (`PATTERN=sha256:HEX`).
pub const DIGEST_PREFIX: &str = "sha256:";

/// One accepted credential: a token digest and the edge ids it may report as.
#[derive(Clone, PartialEq, Eq)]
pub struct EdgeCredential {
    /// Exact edge id, a prefix ending in `*`, or `*`.
    pub pattern: String,
    digest: [u8; 32],
}

impl std::fmt::Debug for EdgeCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeCredential")
            .field("pattern", &self.pattern)
            .finish_non_exhaustive()
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The SHA-256 digest of an edge token as configuration holds it (`sha256:<hex>`), what
/// an operator writes next to a pattern: `printf %s "$TOKEN" | sha256sum` gives the hex.
pub fn token_digest(token: &str) -> String {
    let hex: String = sha256(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{DIGEST_PREFIX}{hex}")
}

fn valid_pattern(p: &str) -> bool {
    let body = p.strip_suffix('*').unwrap_or(p);
    (!p.is_empty())
        && !body.contains('*')
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl EdgeCredential {
    /// A credential for `pattern` from the token itself (kept only as its digest).
    pub fn from_token(pattern: &str, token: &Secret) -> Result<EdgeCredential, String> {
        if token.expose().len() < MIN_EDGE_TOKEN_LEN {
            return Err(format!(
                "the edge token for '{pattern}' is shorter than {MIN_EDGE_TOKEN_LEN} characters; make one with `openssl rand -hex 32`"
            ));
        }
        EdgeCredential::new(pattern, sha256(token.expose().as_bytes()))
    }

    fn new(pattern: &str, digest: [u8; 32]) -> Result<EdgeCredential, String> {
        if !valid_pattern(pattern) {
            return Err(format!(
                "edge credential pattern '{pattern}' is not an edge id, a prefix ending in '*', or '*' (letters, digits, '-', '_', '.')"
            ));
        }
        Ok(EdgeCredential {
            pattern: pattern.to_string(),
            digest,
        })
    }

    /// Parses `PATTERN=sha256:HEX` (a flag value or a line of the credentials file).
    pub fn parse(s: &str) -> Result<EdgeCredential, String> {
        let fix = "expected PATTERN=sha256:HEX, e.g. netbore-edge-*=sha256:<the output of: printf %s \"$TOKEN\" | sha256sum>";
        let (pattern, digest) = s
            .trim()
            .split_once('=')
            .ok_or_else(|| format!("edge credential '{}': {fix}", redact_hex(s)))?;
        let hex = digest
            .trim()
            .strip_prefix(DIGEST_PREFIX)
            .ok_or_else(|| format!("edge credential for '{pattern}': {fix}"))?;
        let bytes = decode_hex(hex).filter(|b| b.len() == 32).ok_or_else(|| {
            format!("edge credential for '{pattern}': the digest is not 64 hex digits; {fix}")
        })?;
        let mut d = [0u8; 32];
        d.copy_from_slice(&bytes);
        EdgeCredential::new(pattern.trim(), d)
    }

    /// True when this credential may report as `edge_id`.
    pub fn allows(&self, edge_id: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => edge_id.len() > prefix.len() && edge_id.starts_with(prefix),
            None => edge_id == self.pattern,
        }
    }
}

/// Only the pattern part of a malformed entry goes into an error (the rest may be a
/// token pasted where its digest belongs).
fn redact_hex(s: &str) -> String {
    s.split_once('=')
        .map(|(p, _)| format!("{p}=…"))
        .unwrap_or_else(|| "…".into())
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Every credential control accepts. Empty (the default): every edge call is refused,
/// so an unconfigured control never hands agents an edge it has not authenticated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeCredentials(pub Vec<EdgeCredential>);

/// Why an edge call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EdgeAuthError {
    /// No `authorization: Bearer` metadata.
    #[error(
        "edge_unauthenticated: the call carries no edge credential; give the edge its token (--control-token-file or NETBORE_EDGE_TOKEN)"
    )]
    Missing,
    /// A token control does not know.
    #[error(
        "edge_unauthenticated: the edge credential is not one control accepts; check that the edge's token matches a digest in control's --edge-credential / --edge-credentials-file"
    )]
    Unknown,
    /// Control has no edge credentials at all.
    #[error(
        "edge_unauthenticated: control accepts no edge credentials yet; configure --edge-credential or --edge-credentials-file"
    )]
    NoneConfigured,
}

/// An authenticated caller: the credentials its token matched.
#[derive(Debug, Clone)]
pub struct EdgeIdentity {
    patterns: Vec<String>,
}

impl EdgeIdentity {
    /// True when the caller may report as `edge_id`.
    pub fn may_report_as(&self, edge_id: &str) -> bool {
        self.patterns.iter().any(|p| {
            EdgeCredential {
                pattern: p.clone(),
                digest: [0; 32],
            }
            .allows(edge_id)
        })
    }

    /// The patterns, for log lines.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

impl EdgeCredentials {
    /// Reads a credentials file: one `PATTERN=sha256:HEX` per line, `#` comments and
    /// blank lines ignored.
    pub fn from_file(path: &Path) -> Result<EdgeCredentials, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read edge credentials {}: {e}", path.display()))?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(
                EdgeCredential::parse(line)
                    .map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?,
            );
        }
        Ok(EdgeCredentials(out))
    }

    /// True when no credential is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks the `authorization` metadata value of a call.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<EdgeIdentity, EdgeAuthError> {
        if self.0.is_empty() {
            return Err(EdgeAuthError::NoneConfigured);
        }
        let token = authorization
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(EdgeAuthError::Missing)?;
        let digest = sha256(token.as_bytes());
        // Every entry is compared, matched or not, so the time taken does not depend
        // on where (or whether) the match is.
        let mut patterns = Vec::new();
        for c in &self.0 {
            if aws_lc_rs::constant_time::verify_slices_are_equal(&c.digest, &digest).is_ok() {
                patterns.push(c.pattern.clone());
            }
        }
        if patterns.is_empty() {
            return Err(EdgeAuthError::Unknown);
        }
        Ok(EdgeIdentity { patterns })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef-edge";

    #[test]
    fn a_digest_entry_admits_its_token_for_its_ids_only() {
        let c = EdgeCredentials(vec![
            EdgeCredential::parse(&format!("edge-a={}", token_digest(TOKEN))).unwrap(),
            EdgeCredential::parse(&format!("pool-*={}", token_digest(&TOKEN.repeat(2)))).unwrap(),
        ]);
        let a = c.authenticate(Some(&format!("Bearer {TOKEN}"))).unwrap();
        assert!(a.may_report_as("edge-a"));
        assert!(!a.may_report_as("edge-b"));
        assert!(!a.may_report_as("edge-a2"));
        let p = c
            .authenticate(Some(&format!("Bearer {}", TOKEN.repeat(2))))
            .unwrap();
        assert!(p.may_report_as("pool-0") && p.may_report_as("pool-17"));
        assert!(!p.may_report_as("pool-") && !p.may_report_as("edge-a"));
        assert_eq!(
            c.authenticate(Some("Bearer wrong")).unwrap_err(),
            EdgeAuthError::Unknown
        );
        assert_eq!(c.authenticate(None).unwrap_err(), EdgeAuthError::Missing);
        assert_eq!(
            c.authenticate(Some(TOKEN)).unwrap_err(),
            EdgeAuthError::Missing
        );
        assert_eq!(
            EdgeCredentials::default()
                .authenticate(Some(&format!("Bearer {TOKEN}")))
                .unwrap_err(),
            EdgeAuthError::NoneConfigured
        );
    }

    #[test]
    fn malformed_entries_say_what_to_write_without_echoing_a_token() {
        let e = EdgeCredential::parse(&format!("edge-a={TOKEN}")).unwrap_err();
        assert!(e.contains("sha256:"), "{e}");
        assert!(!e.contains(TOKEN), "{e}");
        let e = EdgeCredential::parse(TOKEN).unwrap_err();
        assert!(!e.contains(TOKEN), "{e}");
        assert!(EdgeCredential::parse("edge-a=sha256:abcd").is_err());
        assert!(
            EdgeCredential::parse(&format!("a*b={}", token_digest(TOKEN)))
                .unwrap_err()
                .contains("pattern")
        );
        assert!(EdgeCredential::from_token("*", &Secret::new("short")).is_err());
        let c = EdgeCredential::from_token("*", &Secret::new(TOKEN)).unwrap();
        assert!(c.allows("anything"));
        assert!(!format!("{c:?}").contains("digest"));
    }
}
