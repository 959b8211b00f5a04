//! The agent's access flags: turns `--jwt-key`, `--basic-auth`, `--allow-ip`, ... (and
//! an optional `--access-file`) into the [`AccessPolicy`] sent to control at every
//! create. Passwords are hashed here, so only the hash leaves the machine.

use std::path::PathBuf;

use netbore_tokens::Secret;
use netbore_tokens::access::{AccessPolicy, BasicUser, JwtPolicy, TunnelLimits, hash_password};

/// The access-related flags as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct AccessFlags {
    /// A JSON file holding an access policy (the REST API's `access` object); the flags
    /// below add to it.
    pub access_file: Option<PathBuf>,
    /// PEM public key (Ed25519 or P-256) that verifies viewer tokens.
    pub jwt_key: Option<PathBuf>,
    /// File holding the HS256 secret that verifies viewer tokens.
    pub jwt_secret_file: Option<PathBuf>,
    /// `NAME=VALUE` claims viewer tokens must carry.
    pub jwt_claims: Vec<String>,
    /// Required `aud` of viewer tokens.
    pub jwt_audience: Option<String>,
    /// Required `iss` of viewer tokens.
    pub jwt_issuer: Option<String>,
    /// Claims passed to the origin as `X-Netbore-Claim-<name>`.
    pub jwt_forward_claims: Vec<String>,
    /// `USER:PASSWORD` pairs for basic auth.
    pub basic_auth: Vec<Secret>,
    /// CIDR ranges allowed.
    pub allow_ip: Vec<String>,
    /// CIDR ranges refused.
    pub deny_ip: Vec<String>,
    /// Origins allowed to frame the pages.
    pub frame_ancestors: Vec<String>,
    /// Origins allowed to call with CORS.
    pub cors_origins: Vec<String>,
    /// Largest request body viewers may send.
    pub max_body_bytes: Option<u64>,
}

impl AccessFlags {
    /// The policy and limits these flags describe; the error names the flag to fix.
    pub fn build(&self) -> Result<(AccessPolicy, TunnelLimits), String> {
        let mut p = match &self.access_file {
            None => AccessPolicy::default(),
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| format!("--access-file {}: cannot read it: {e}", f.display()))?;
                serde_json::from_str(&text).map_err(|e| {
                    format!(
                        "--access-file {}: not an access policy ({e}); see docs/access.md for the fields",
                        f.display()
                    )
                })?
            }
        };
        let wants_jwt = self.jwt_key.is_some()
            || self.jwt_secret_file.is_some()
            || !self.jwt_claims.is_empty()
            || self.jwt_audience.is_some()
            || self.jwt_issuer.is_some()
            || !self.jwt_forward_claims.is_empty();
        if wants_jwt {
            let j = p.jwt.get_or_insert_with(JwtPolicy::default);
            if let Some(k) = &self.jwt_key {
                j.public_key_pem = Some(
                    std::fs::read_to_string(k)
                        .map_err(|e| format!("--jwt-key {}: cannot read it: {e}", k.display()))?,
                );
            }
            if let Some(f) = &self.jwt_secret_file {
                let s = std::fs::read_to_string(f).map_err(|e| {
                    format!("--jwt-secret-file {}: cannot read it: {e}", f.display())
                })?;
                j.secret = Some(Secret::new(s.trim_end_matches(['\r', '\n'])));
            }
            for c in &self.jwt_claims {
                let (k, v) = c.split_once('=').ok_or_else(|| {
                    format!("--jwt-claim {c:?}: write it as NAME=VALUE, e.g. workshop_id=ws-42")
                })?;
                j.claims.insert(k.trim().to_string(), v.to_string());
            }
            if let Some(a) = &self.jwt_audience {
                j.audience = Some(a.clone());
            }
            if let Some(i) = &self.jwt_issuer {
                j.issuer = Some(i.clone());
            }
            j.forward_claims
                .extend(self.jwt_forward_claims.iter().cloned());
        }
        for pair in &self.basic_auth {
            let (user, pass) = pair.expose().split_once(':').ok_or(
                "--basic-auth: write it as USER:PASSWORD (the password is hashed before it leaves this machine)",
            )?;
            if pass.is_empty() {
                return Err(format!("--basic-auth: the password for {user:?} is empty"));
            }
            p.basic_auth.push(BasicUser {
                user: user.to_string(),
                hash: hash_password(pass),
            });
        }
        p.ip_allow.extend(self.allow_ip.iter().cloned());
        p.ip_deny.extend(self.deny_ip.iter().cloned());
        p.frame_ancestors
            .extend(self.frame_ancestors.iter().cloned());
        p.cors_origins.extend(self.cors_origins.iter().cloned());
        p.validate()?;
        if self.max_body_bytes == Some(0) {
            return Err("--max-body-bytes must be at least 1".into());
        }
        Ok((
            p,
            TunnelLimits {
                max_body_bytes: self.max_body_bytes,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_build_a_policy_and_passwords_leave_only_as_hashes() {
        let f = AccessFlags {
            basic_auth: vec![Secret::new("alice:s3cret")],
            allow_ip: vec!["10.0.0.0/8".into()],
            max_body_bytes: Some(1024),
            ..AccessFlags::default()
        };
        let (p, l) = f.build().unwrap();
        assert_eq!(p.basic_auth[0].user, "alice");
        assert!(!p.basic_auth[0].hash.contains("s3cret"));
        assert!(netbore_tokens::access::verify_password(
            &p.basic_auth[0].hash,
            "s3cret"
        ));
        assert_eq!(l.max_body_bytes, Some(1024));
        let bad = AccessFlags {
            jwt_claims: vec!["no-equals".into()],
            jwt_secret_file: None,
            ..AccessFlags::default()
        };
        assert!(bad.build().unwrap_err().contains("NAME=VALUE"));
    }
}
