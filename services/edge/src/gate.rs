//! What binds an agent's ephemeral token beyond its signature: the edge refuses a token
//! whose tunnel control reported deleted ([`Gate::revoke`]), caps the links one token
//! holds at once ([`MAX_LINKS_PER_TOKEN`]) and how fast it may handshake
//! ([`TOKEN_HANDSHAKE_BURST`], [`TOKEN_HANDSHAKE_REFILL`]), and derives each tunnel's
//! session-cookie key from the seeds control sends only to authenticated edges
//! ([`Gate::session_key`]).
//!
//! A token is known here only by its SHA-256 digest, so no token sits in memory longer
//! than its handshake and none can reach a log line from this table.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netbore_tokens::{Secret, SessionSeed};
use parking_lot::Mutex;

/// Most agent links one ephemeral token may hold open at once on this edge (and across
/// the cluster when edges share Redis). The agent mints a token for each of its
/// `--connections` links, so it needs one per token; the rest is margin for an agent
/// that shares one token over the default two links and reconnects while its old links
/// are still closing.
pub const MAX_LINKS_PER_TOKEN: usize = 4;

/// Handshakes one token may make back to back before [`TOKEN_HANDSHAKE_REFILL`] paces it.
pub const TOKEN_HANDSHAKE_BURST: u32 = 8;

/// One more handshake per token is allowed each interval once the burst is used (an
/// agent reconnecting with backoff needs far fewer).
pub const TOKEN_HANDSHAKE_REFILL: Duration = Duration::from_millis(500);

/// Most revoked tunnels remembered; beyond it the ones that lapse soonest go first.
pub const MAX_REVOCATIONS: usize = 100_000;

/// How a revoked credential is keyed in the revocations (tunnel ids start with `tun_`,
/// so the two never mix; both share [`MAX_REVOCATIONS`]).
const CREDENTIAL_KEY: &str = "cred:";

/// Most tokens tracked for link counts and handshake pacing; beyond it idle entries are
/// dropped first (a token's entry is tiny, but strangers can present many tokens).
pub const MAX_TRACKED_TOKENS: usize = 100_000;

/// The SHA-256 of a token: how the edge refers to it.
pub type TokenDigest = [u8; 32];

/// The digest of `token`.
pub fn digest(token: &str) -> TokenDigest {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Why [`Gate::admit`] refused a handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateRefusal {
    /// The token holds [`MAX_LINKS_PER_TOKEN`] links already.
    #[error(
        "this token already holds {0} links, the most one token may; the agent gets a token per link from control"
    )]
    TooManyLinks(usize),
    /// Handshakes with this token come faster than [`TOKEN_HANDSHAKE_REFILL`] allows.
    #[error("too many handshakes with this token; retry after a pause")]
    TooFast,
}

struct TokenState {
    links: usize,
    tokens: f64,
    at: Instant,
}

#[derive(Default)]
struct Inner {
    revoked: HashMap<String, u64>,
    tokens: HashMap<TokenDigest, TokenState>,
    /// Disabled tunnels: id → name.
    disabled: HashMap<String, String>,
    /// Names of disabled tunnels: what viewers are told is disabled.
    disabled_names: std::collections::HashSet<String>,
}

/// The edge's token bindings; cheap to share.
#[derive(Default)]
pub struct Gate {
    inner: Mutex<Inner>,
    seeds: arc_swap::ArcSwap<HashMap<String, SessionSeed>>,
}

/// One admitted link's place in its token's count; dropping it frees the place.
pub struct LinkSlot {
    gate: Arc<Gate>,
    digest: TokenDigest,
}

impl std::fmt::Debug for LinkSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkSlot")
    }
}

impl Drop for LinkSlot {
    fn drop(&mut self) {
        let mut g = self.gate.inner.lock();
        if let Some(t) = g.tokens.get_mut(&self.digest) {
            t.links = t.links.saturating_sub(1);
        }
    }
}

impl Gate {
    /// Refuses `tunnel_id`'s tokens until `until` (Unix seconds).
    pub fn revoke(&self, tunnel_id: &str, until: u64) {
        let now = netbore_tokens::now_unix();
        if until <= now {
            return;
        }
        let mut g = self.inner.lock();
        if g.revoked.len() >= MAX_REVOCATIONS {
            g.revoked.retain(|_, u| *u > now);
            if g.revoked.len() >= MAX_REVOCATIONS
                && let Some(k) = g
                    .revoked
                    .iter()
                    .min_by_key(|(_, u)| **u)
                    .map(|(k, _)| k.clone())
            {
                g.revoked.remove(&k);
            }
        }
        let e = g.revoked.entry(tunnel_id.to_string()).or_insert(until);
        *e = (*e).max(until);
    }

    /// Marks a tunnel disabled by its owner (its tokens refused, viewers of `name` told
    /// so) or enabled again. At most [`MAX_REVOCATIONS`] are remembered: past that a
    /// disable is still enforced on the links (closed) but not remembered.
    pub fn set_disabled(&self, tunnel_id: &str, name: &str, disabled: bool) {
        let mut g = self.inner.lock();
        if disabled {
            if g.disabled.len() >= MAX_REVOCATIONS && !g.disabled.contains_key(tunnel_id) {
                return;
            }
            if let Some(old) = g.disabled.insert(tunnel_id.to_string(), name.to_string()) {
                g.disabled_names.remove(&old);
            }
            g.disabled_names.insert(name.to_string());
        } else if let Some(old) = g.disabled.remove(tunnel_id) {
            g.disabled_names.remove(&old);
        }
    }

    /// True while `tunnel_id` is disabled.
    pub fn is_disabled(&self, tunnel_id: &str) -> bool {
        self.inner.lock().disabled.contains_key(tunnel_id)
    }

    /// True while the tunnel named `name` is disabled.
    pub fn is_name_disabled(&self, name: &str) -> bool {
        let g = self.inner.lock();
        !g.disabled_names.is_empty() && g.disabled_names.contains(name)
    }

    /// Refuses tokens issued for tunnel credential `credential_id` until `until`.
    pub fn revoke_credential(&self, credential_id: &str, until: u64) {
        self.revoke(&format!("{CREDENTIAL_KEY}{credential_id}"), until);
    }

    /// True while tunnel credential `credential_id` is revoked.
    pub fn is_credential_revoked(&self, credential_id: &str) -> bool {
        self.is_revoked(&format!("{CREDENTIAL_KEY}{credential_id}"))
    }

    /// True while `tunnel_id` is revoked.
    pub fn is_revoked(&self, tunnel_id: &str) -> bool {
        let now = netbore_tokens::now_unix();
        self.inner
            .lock()
            .revoked
            .get(tunnel_id)
            .is_some_and(|u| *u > now)
    }

    /// Takes a link place for the token with `digest`, pacing its handshakes.
    pub fn admit(self: &Arc<Self>, digest: TokenDigest) -> Result<LinkSlot, GateRefusal> {
        let now = Instant::now();
        let mut g = self.inner.lock();
        if g.tokens.len() >= MAX_TRACKED_TOKENS && !g.tokens.contains_key(&digest) {
            let idle = |t: &TokenState| {
                t.links == 0
                    && now.duration_since(t.at) > TOKEN_HANDSHAKE_REFILL * TOKEN_HANDSHAKE_BURST
            };
            g.tokens.retain(|_, t| !idle(t));
            if g.tokens.len() >= MAX_TRACKED_TOKENS {
                g.tokens.retain(|_, t| t.links > 0);
            }
        }
        let t = g.tokens.entry(digest).or_insert(TokenState {
            links: 0,
            tokens: f64::from(TOKEN_HANDSHAKE_BURST),
            at: now,
        });
        let refill = now.duration_since(t.at).as_secs_f64() / TOKEN_HANDSHAKE_REFILL.as_secs_f64();
        t.tokens = (t.tokens + refill).min(f64::from(TOKEN_HANDSHAKE_BURST));
        t.at = now;
        if t.tokens < 1.0 {
            return Err(GateRefusal::TooFast);
        }
        t.tokens -= 1.0;
        if t.links >= MAX_LINKS_PER_TOKEN {
            return Err(GateRefusal::TooManyLinks(t.links));
        }
        t.links += 1;
        Ok(LinkSlot {
            gate: self.clone(),
            digest,
        })
    }

    /// Replaces the session seeds (control sent a new set).
    pub fn set_session_seeds(&self, seeds: Vec<SessionSeed>) {
        self.seeds.store(Arc::new(
            seeds.into_iter().map(|s| (s.kid.clone(), s)).collect(),
        ));
    }

    /// True once control has sent seeds.
    pub fn has_session_seeds(&self) -> bool {
        !self.seeds.load().is_empty()
    }

    /// The session-cookie key of `tunnel_id` for a token signed by key `kid`; `None`
    /// while control has not sent that key's seed.
    pub fn session_key(&self, kid: &str, tunnel_id: &str) -> Option<Secret> {
        self.seeds.load().get(kid).map(|s| s.session_key(tunnel_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_per_token_are_capped_and_freed_on_drop() {
        let g = Arc::new(Gate::default());
        let d = digest("t");
        let slots: Vec<LinkSlot> = (0..MAX_LINKS_PER_TOKEN)
            .map(|_| g.admit(d).unwrap())
            .collect();
        assert!(matches!(g.admit(d), Err(GateRefusal::TooManyLinks(_))));
        // Another token is not affected.
        assert!(g.admit(digest("u")).is_ok());
        drop(slots);
        assert!(g.admit(d).is_ok());
    }

    #[test]
    fn handshakes_per_token_are_paced() {
        let g = Arc::new(Gate::default());
        let d = digest("t");
        let mut ok = 0;
        for _ in 0..50 {
            if let Ok(s) = g.admit(d) {
                ok += 1;
                drop(s);
            }
        }
        assert_eq!(ok, TOKEN_HANDSHAKE_BURST);
    }

    #[test]
    fn revocations_last_until_their_time() {
        let g = Gate::default();
        let now = netbore_tokens::now_unix();
        g.revoke("tun_a", now + 60);
        g.revoke("tun_old", now.saturating_sub(1));
        assert!(g.is_revoked("tun_a"));
        assert!(!g.is_revoked("tun_old"));
        assert!(!g.is_revoked("tun_b"));
        g.revoke_credential("tcr_a", now + 60);
        assert!(g.is_credential_revoked("tcr_a"));
        assert!(!g.is_credential_revoked("tcr_b"));
        assert!(!g.is_revoked("tcr_a"), "a credential is not a tunnel");
    }

    #[test]
    fn a_disabled_tunnel_is_refused_by_id_and_by_name_until_enabled() {
        let g = Gate::default();
        assert!(!g.is_name_disabled("hub"));
        g.set_disabled("tun_a", "hub", true);
        assert!(g.is_disabled("tun_a"));
        assert!(g.is_name_disabled("hub"));
        assert!(!g.is_disabled("tun_b"));
        assert!(!g.is_name_disabled("hub-2"));
        // Disabled twice, then renamed: only the newest name is disabled.
        g.set_disabled("tun_a", "hub", true);
        g.set_disabled("tun_a", "hub-new", true);
        assert!(!g.is_name_disabled("hub"));
        assert!(g.is_name_disabled("hub-new"));
        g.set_disabled("tun_a", "hub-new", false);
        assert!(!g.is_disabled("tun_a"));
        assert!(!g.is_name_disabled("hub-new"));
        // Enabling an unknown tunnel is harmless.
        g.set_disabled("tun_x", "x", false);
    }
}
