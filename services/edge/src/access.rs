//! Viewer access policies, enforced before a byte reaches the origin.
//!
//! Each agent connection carries its tunnel's [`AccessPolicy`] (signed by control into
//! the agent's ephemeral token), compiled here into a [`TunnelAccess`]. For every
//! viewer request the proxy asks [`TunnelAccess::check`] first, in this order:
//!
//! 1. the IP deny list, then the allow list (403), on the client address the edge
//!    believes (trusted proxies honoured);
//! 2. a CORS preflight from a listed origin is answered here (204), from any other
//!    origin refused (403), so preflights never need credentials;
//! 3. a JWT from the `token` query parameter, `Authorization: Bearer`, or the tunnel's
//!    session cookie; or basic-auth credentials (401 with a code saying why).
//!
//! A valid query token is exchanged for a session cookie bound to this tunnel, and a
//! `GET`/`HEAD` is redirected to the same URL without the token, so the token never
//! reaches the origin's logs, a `Referer` or the history. The token, the cookie and the
//! credentials are removed before forwarding; the verified subject and chosen claims
//! go to the origin as `X-Netbore-User` and `X-Netbore-Claim-<name>`, which the proxy
//! strips from whatever a viewer sends.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::LazyLock;

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use netbore_tokens::access::{
    AccessPolicy, BasicUser, Cidr, Session, SessionKey, ViewerIdentity, ViewerVerifier,
    verify_password,
};
use netbore_tokens::{Secret, now_unix};
use parking_lot::Mutex;

use crate::errors::{Body, error_response};

/// Session cookie name on HTTPS: `__Host-` makes browsers keep it to exactly this host,
/// with `Secure` and `Path=/`.
pub const SESSION_COOKIE_HTTPS: &str = "__Host-netbore_session";
/// Session cookie name on plain HTTP (development: `*.localhost`).
pub const SESSION_COOKIE_HTTP: &str = "netbore_session";
/// Query parameter carrying a viewer token.
pub const TOKEN_PARAM: &str = "token";
/// Header naming the verified subject to the origin.
pub const USER_HEADER: &str = "x-netbore-user";
/// Prefix of headers carrying forwarded claims to the origin.
pub const CLAIM_HEADER_PREFIX: &str = "x-netbore-claim-";
/// Preflight answers may be cached this long by browsers (seconds).
pub const CORS_MAX_AGE_SECS: u32 = 600;
/// Basic-auth password checks running at once for one tunnel (each costs PBKDF2 work);
/// further attempts on that tunnel wait their turn, so guesses against one tunnel never
/// queue in front of another tunnel's logins.
pub const MAX_PASSWORD_CHECKS_PER_TUNNEL: usize = 2;
/// Password checks running at once on the whole edge, per core: the ceiling that keeps
/// PBKDF2 work from taking every core when many tunnels are guessed at once. It is never
/// below twice the per-tunnel limit, so one tunnel alone never reaches it.
pub const PASSWORD_CHECKS_PER_CORE: usize = 2;
/// Verified basic-auth credentials remembered per tunnel, so a viewer's later requests
/// cost no hashing.
pub const BASIC_CACHE_ENTRIES: usize = 1024;

/// The edge-wide number of password checks that may run at once.
pub fn password_check_ceiling() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores * PASSWORD_CHECKS_PER_CORE).max(2 * MAX_PASSWORD_CHECKS_PER_TUNNEL)
}

/// The edge-wide ceiling. tokio's semaphore is fair (first come, first served), and a
/// tunnel holds at most [`MAX_PASSWORD_CHECKS_PER_TUNNEL`] places in its queue.
static PASSWORD_CHECKS: LazyLock<tokio::sync::Semaphore> =
    LazyLock::new(|| tokio::sync::Semaphore::new(password_check_ceiling()));

/// A tunnel's policy, ready to check requests.
pub struct TunnelAccess {
    tunnel_id: String,
    name: String,
    public: bool,
    jwt: Option<ViewerVerifier>,
    session: Option<SessionKey>,
    basic: Vec<BasicUser>,
    basic_ok: Mutex<HashSet<[u8; 32]>>,
    /// This tunnel's password checks at once ([`MAX_PASSWORD_CHECKS_PER_TUNNEL`]).
    password_checks: tokio::sync::Semaphore,
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    frame_ancestors: Vec<String>,
    cors: Vec<String>,
    /// The tunnel's own request body limit.
    pub max_body_bytes: Option<u64>,
}

impl std::fmt::Debug for TunnelAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelAccess")
            .field("tunnel", &self.tunnel_id)
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// What the proxy must change in a request it may forward.
#[derive(Debug, Default)]
pub struct Admitted {
    /// Headers to add (identity for the origin).
    pub add: Vec<(String, String)>,
    /// Remove `Authorization` (it carried our credential).
    pub drop_authorization: bool,
    /// The request target with the token parameter removed, when it had one.
    pub target: Option<String>,
    /// A `Set-Cookie` value to add to the response.
    pub set_cookie: Option<HeaderValue>,
}

/// The outcome of [`TunnelAccess::check`].
pub enum Verdict {
    /// Forward, with these changes.
    Pass(Admitted),
    /// Answer the viewer with this instead (refusal, redirect, preflight).
    Respond(Response<Body>),
}

impl TunnelAccess {
    /// Compiles the policy of an agent's grant; an error names the bad part.
    pub fn new(
        tunnel_id: &str,
        name: &str,
        policy: &AccessPolicy,
        max_body_bytes: Option<u64>,
        session_key: Option<&Secret>,
    ) -> Result<TunnelAccess, String> {
        policy.validate()?;
        let jwt = policy.jwt.as_ref().map(ViewerVerifier::new).transpose()?;
        let session = match (&jwt, session_key) {
            (Some(_), Some(k)) => Some(SessionKey::from_secret(k)?),
            (Some(_), None) => {
                return Err("the JWT policy came without a session key from control".into());
            }
            _ => None,
        };
        let cidrs = |l: &[String]| {
            l.iter()
                .map(|c| c.parse())
                .collect::<Result<Vec<Cidr>, _>>()
        };
        Ok(TunnelAccess {
            tunnel_id: tunnel_id.to_string(),
            name: name.to_string(),
            public: policy.is_public(),
            jwt,
            session,
            basic: policy.basic_auth.clone(),
            basic_ok: Mutex::new(HashSet::new()),
            password_checks: tokio::sync::Semaphore::new(MAX_PASSWORD_CHECKS_PER_TUNNEL),
            allow: cidrs(&policy.ip_allow)?,
            deny: cidrs(&policy.ip_deny)?,
            frame_ancestors: policy.frame_ancestors.clone(),
            cors: policy.cors_origins.clone(),
            max_body_bytes,
        })
    }

    /// A public tunnel with no limits of its own.
    pub fn public(tunnel_id: &str, name: &str) -> TunnelAccess {
        TunnelAccess::new(tunnel_id, name, &AccessPolicy::default(), None, None)
            .expect("the public policy is valid")
    }

    /// True when requests pass unchanged.
    pub fn is_public(&self) -> bool {
        self.public
    }

    /// Decides whether `req` from `client` may reach the origin. `https` says which
    /// session cookie to set; `upgrade` requests are never redirected (WebSocket
    /// clients do not follow redirects).
    pub async fn check<B>(
        &self,
        req: &Request<B>,
        client: IpAddr,
        https: bool,
        upgrade: bool,
        json: bool,
    ) -> Verdict {
        if self.public {
            return Verdict::Pass(Admitted::default());
        }
        let refuse = |status: StatusCode, code: &str, msg: &str| {
            Verdict::Respond(error_response(status, code, msg, json))
        };
        if self.deny.iter().any(|c| c.contains(client)) {
            return refuse(
                StatusCode::FORBIDDEN,
                "ip_denied",
                "Your address is refused by this tunnel's access policy.",
            );
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(client)) {
            return refuse(
                StatusCode::FORBIDDEN,
                "ip_not_allowed",
                "Your address is not on this tunnel's allow list.",
            );
        }
        if let Some(v) = self.preflight(req) {
            return Verdict::Respond(v);
        }
        if let Some(verifier) = &self.jwt {
            return self.check_jwt(verifier, req, https, upgrade, json);
        }
        if !self.basic.is_empty() {
            return self.check_basic(req, json).await;
        }
        Verdict::Pass(Admitted::default())
    }

    fn preflight<B>(&self, req: &Request<B>) -> Option<Response<Body>> {
        if self.cors.is_empty()
            || req.method() != Method::OPTIONS
            || !req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return None;
        }
        let origin = req.headers().get(header::ORIGIN)?;
        if !self.cors_allows(origin) {
            return Some(error_response(
                StatusCode::FORBIDDEN,
                "cors_origin_denied",
                "This origin may not call the tunnel from a browser; the tunnel's owner lists the allowed origins.",
                false,
            ));
        }
        let mut r = Response::new(Empty::new().map_err(|n| match n {}).boxed());
        *r.status_mut() = StatusCode::NO_CONTENT;
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        for (from, to) in [
            (
                header::ACCESS_CONTROL_REQUEST_METHOD,
                header::ACCESS_CONTROL_ALLOW_METHODS,
            ),
            (
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                header::ACCESS_CONTROL_ALLOW_HEADERS,
            ),
        ] {
            if let Some(v) = req.headers().get(from) {
                h.insert(to, v.clone());
            }
        }
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(CORS_MAX_AGE_SECS),
        );
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        Some(r)
    }

    fn cors_allows(&self, origin: &HeaderValue) -> bool {
        let o = origin.as_bytes();
        self.cors
            .iter()
            .any(|c| c.as_bytes().eq_ignore_ascii_case(o))
    }

    fn check_jwt<B>(
        &self,
        verifier: &ViewerVerifier,
        req: &Request<B>,
        https: bool,
        upgrade: bool,
        json: bool,
    ) -> Verdict {
        let now = now_unix();
        let refuse = |code: &str, msg: &str| {
            Verdict::Respond(error_response(StatusCode::UNAUTHORIZED, code, msg, json))
        };
        // 1. A token in the query string: exchanged for a cookie.
        if let Some((token, rest)) = split_token(req.uri()) {
            let id = match verifier.verify(&token, now) {
                Ok(id) => id,
                Err(e) => return refuse(e.code, &e.message),
            };
            let cookie = self.session_cookie(&id, https, now);
            let path = req.uri().path();
            let target = match rest {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            if !upgrade && (req.method() == Method::GET || req.method() == Method::HEAD) {
                return Verdict::Respond(redirect(&target, cookie));
            }
            return Verdict::Pass(Admitted {
                add: identity_headers(id.subject.as_deref(), &id.forwarded),
                drop_authorization: false,
                target: Some(target),
                set_cookie: cookie,
            });
        }
        // 2. Authorization: Bearer.
        let mut bearer_error = None;
        if let Some(t) = bearer(req.headers()) {
            match verifier.verify(t, now) {
                Ok(id) => {
                    return Verdict::Pass(Admitted {
                        add: identity_headers(id.subject.as_deref(), &id.forwarded),
                        drop_authorization: true,
                        ..Admitted::default()
                    });
                }
                // The header may be meant for the origin; a valid cookie still admits.
                Err(e) => bearer_error = Some(e),
            }
        }
        // 3. The session cookie.
        let mut saw_cookie = false;
        if let Some(key) = &self.session {
            for v in session_cookies(req.headers()) {
                saw_cookie = true;
                if let Some(s) = key.open(v, &self.tunnel_id, now) {
                    return Verdict::Pass(Admitted {
                        add: identity_headers(s.sub.as_deref(), &s.forwarded),
                        ..Admitted::default()
                    });
                }
            }
        }
        if let Some(e) = bearer_error {
            return refuse(e.code, &e.message);
        }
        if saw_cookie {
            return refuse(
                "access_session_invalid",
                "Your session for this tunnel has expired or belongs to another tunnel; open the link you were given again.",
            );
        }
        refuse(
            "access_token_missing",
            "This tunnel needs an access token: open it through the link you were given (?token=...), or send 'Authorization: Bearer <token>'.",
        )
    }

    fn session_cookie(&self, id: &ViewerIdentity, https: bool, now: u64) -> Option<HeaderValue> {
        let key = self.session.as_ref()?;
        let value = key.seal(&Session {
            tunnel_id: self.tunnel_id.clone(),
            exp: id.expires_at,
            sub: id.subject.clone(),
            forwarded: id.forwarded.clone(),
        });
        let max_age = id.expires_at.saturating_sub(now).max(1);
        let c = if https {
            format!(
                "{SESSION_COOKIE_HTTPS}={value}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite=Lax"
            )
        } else {
            format!(
                "{SESSION_COOKIE_HTTP}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax"
            )
        };
        HeaderValue::from_str(&c).ok()
    }

    async fn check_basic<B>(&self, req: &Request<B>, json: bool) -> Verdict {
        let challenge = |code: &str, msg: &str| {
            let mut r = error_response(StatusCode::UNAUTHORIZED, code, msg, json);
            let realm = format!("Basic realm=\"{}\", charset=\"UTF-8\"", self.name);
            if let Ok(v) = HeaderValue::from_str(&realm) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            Verdict::Respond(r)
        };
        let Some(raw) = basic_credentials(req.headers()) else {
            return challenge(
                "access_basic_required",
                "This tunnel needs a user name and password.",
            );
        };
        let digest = {
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, raw.as_bytes());
            let mut out = [0u8; 32];
            out.copy_from_slice(d.as_ref());
            out
        };
        let ok = self.basic_ok.lock().contains(&digest) || self.verify_basic(&raw).await;
        if !ok {
            return challenge(
                "access_basic_invalid",
                "The user name or password is wrong for this tunnel.",
            );
        }
        {
            let mut cache = self.basic_ok.lock();
            if cache.len() >= BASIC_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(digest);
        }
        let user = raw.split_once(':').map(|(u, _)| u.to_string());
        Verdict::Pass(Admitted {
            add: identity_headers(user.as_deref(), &[]),
            drop_authorization: true,
            ..Admitted::default()
        })
    }

    async fn verify_basic(&self, raw: &str) -> bool {
        let Some((user, pass)) = raw.split_once(':') else {
            return false;
        };
        let Some(u) = self.basic.iter().find(|u| u.user == user) else {
            return false;
        };
        // This tunnel's turn first, then a place under the edge's ceiling: a flood of
        // guesses waits on its own tunnel's semaphore, not in front of other tunnels.
        let Ok(_mine) = self.password_checks.acquire().await else {
            return false;
        };
        let Ok(_edge) = PASSWORD_CHECKS.acquire().await else {
            return false;
        };
        let (hash, pass) = (u.hash.clone(), pass.to_string());
        tokio::task::spawn_blocking(move || verify_password(&hash, &pass))
            .await
            .unwrap_or(false)
    }

    /// Applies the policy's response headers (framing, CORS) to a proxied response.
    pub fn decorate(&self, request_origin: Option<&HeaderValue>, h: &mut HeaderMap) {
        if self.public {
            return;
        }
        if !self.frame_ancestors.is_empty() {
            h.remove(header::X_FRAME_OPTIONS);
            let list = self.frame_ancestors.join(" ");
            if let Ok(v) = HeaderValue::from_str(&format!("frame-ancestors {list}")) {
                // A second CSP header: browsers enforce both, so the origin's own policy
                // still holds and ours adds the framing rule.
                h.append(header::CONTENT_SECURITY_POLICY, v);
            }
            match list.as_str() {
                "'none'" => {
                    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
                }
                "'self'" => {
                    h.insert(
                        header::X_FRAME_OPTIONS,
                        HeaderValue::from_static("SAMEORIGIN"),
                    );
                }
                _ => {}
            }
        }
        if !self.cors.is_empty() {
            h.remove(header::ACCESS_CONTROL_ALLOW_ORIGIN);
            h.remove(header::ACCESS_CONTROL_ALLOW_CREDENTIALS);
            if let Some(o) = request_origin.filter(|o| self.cors_allows(o)) {
                h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o.clone());
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
            h.append(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
}

fn redirect(target: &str, cookie: Option<HeaderValue>) -> Response<Body> {
    let mut r = Response::new(Empty::new().map_err(|n| match n {}).boxed());
    *r.status_mut() = StatusCode::SEE_OTHER;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(target) {
        h.insert(header::LOCATION, v);
    }
    if let Some(c) = cookie {
        h.insert(header::SET_COOKIE, c);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

fn identity_headers(sub: Option<&str>, claims: &[(String, String)]) -> Vec<(String, String)> {
    let mut v = Vec::with_capacity(claims.len() + 1);
    if let Some(s) = sub {
        v.push((USER_HEADER.to_string(), s.to_string()));
    }
    for (k, val) in claims {
        v.push((
            format!("{CLAIM_HEADER_PREFIX}{}", k.to_ascii_lowercase()),
            val.clone(),
        ));
    }
    v
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, t) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| t.trim())
}

fn basic_credentials(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    String::from_utf8(raw).ok()
}

/// Values of the session cookies in the request's `Cookie` headers.
pub fn session_cookies(h: &HeaderMap) -> impl Iterator<Item = &str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == SESSION_COOKIE_HTTPS || k == SESSION_COOKIE_HTTP).then_some(v)
        })
}

/// `Cookie` header values with the session cookies taken out (`None` when nothing is
/// left), so the origin never sees them.
pub fn strip_session_cookies(value: &[u8]) -> Option<Bytes> {
    let s = std::str::from_utf8(value).ok()?;
    let kept: Vec<&str> = s
        .split(';')
        .map(str::trim)
        .filter(|p| {
            let k = p.split_once('=').map_or(*p, |(k, _)| k);
            !p.is_empty() && k != SESSION_COOKIE_HTTPS && k != SESSION_COOKIE_HTTP
        })
        .collect();
    (!kept.is_empty()).then(|| Bytes::from(kept.join("; ")))
}

/// True when a raw query parameter name is the token parameter in any spelling:
/// percent-encoded (`%74oken`) or in another case (`Token`), as an origin's framework
/// may decode it.
pub fn is_token_name(raw: &str) -> bool {
    // Longer than every encoding of "token" (each byte as %XX): cannot be it.
    raw.len() <= 3 * TOKEN_PARAM.len() && percent_decode(raw).eq_ignore_ascii_case(TOKEN_PARAM)
}

/// True when the request target's query carries the token parameter.
pub fn has_query_token(uri: &http::Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|p| is_token_name(p.split_once('=').map_or(p, |(k, _)| k)))
    })
}

/// `url` (a `Referer`: absolute URL or path) without the token parameter in its query;
/// `None` when it had none (leave it as it is).
pub fn strip_token_from_url(url: &str) -> Option<String> {
    let (before_fragment, fragment) = match url.find('#') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    };
    let (base, query) = before_fragment.split_once('?')?;
    let mut found = false;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| {
            let token = is_token_name(p.split_once('=').map_or(*p, |(k, _)| k));
            found |= token;
            !token && !p.is_empty()
        })
        .collect();
    if !found {
        return None;
    }
    let mut out = base.to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    out.push_str(fragment);
    Some(out)
}

/// An origin's `Set-Cookie` made safe to pass on: `None` when it sets the edge's session
/// cookie (an origin must never plant or replace that), otherwise the value without
/// its `Domain` attributes, so the cookie stays with this tunnel's host and never
/// reaches other tunnels under the same domain.
pub fn origin_set_cookie(value: &[u8]) -> Option<Bytes> {
    let mut parts = value.split(|b| *b == b';');
    let pair = parts.next().unwrap_or_default();
    // RFC 6265bis: a pair without `=` is a nameless cookie whose value browsers send as
    // is, and `=name=v` is a nameless cookie sent as `name=v`: both can pose as `name`.
    let name_of = |p: &[u8]| -> Vec<u8> {
        let p = p.trim_ascii();
        match p.iter().position(|b| *b == b'=') {
            Some(0) => {
                let rest = &p[1..];
                let end = rest.iter().position(|b| *b == b'=').unwrap_or(rest.len());
                rest[..end].trim_ascii().to_vec()
            }
            Some(i) => p[..i].trim_ascii().to_vec(),
            None => p.to_vec(),
        }
    };
    let name = name_of(pair);
    if [SESSION_COOKIE_HTTP, SESSION_COOKIE_HTTPS]
        .iter()
        .any(|s| s.as_bytes().eq_ignore_ascii_case(&name))
    {
        return None;
    }
    let mut out = pair.to_vec();
    for attr in parts {
        let key = attr
            .split(|b| *b == b'=')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if key.eq_ignore_ascii_case(b"domain") {
            continue;
        }
        out.push(b';');
        out.extend_from_slice(attr);
    }
    Some(Bytes::from(out))
}

/// The `token` parameter of a URI's query (percent-decoded; the name in any spelling,
/// see [`is_token_name`]), and the rest of the query without it (`None` when nothing
/// is left).
fn split_token(uri: &http::Uri) -> Option<(String, Option<String>)> {
    let q = uri.query()?;
    let mut token = None;
    let mut rest = Vec::new();
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if is_token_name(k) {
            token.get_or_insert_with(|| percent_decode(v));
        } else if !pair.is_empty() {
            rest.push(pair);
        }
    }
    let token = token?;
    Some((token, (!rest.is_empty()).then(|| rest.join("&"))))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_parameter_is_split_from_the_rest_of_the_query() {
        let u: http::Uri = "/t?a=1&token=abc%2Ed&b=2".parse().unwrap();
        assert_eq!(
            split_token(&u),
            Some(("abc.d".to_string(), Some("a=1&b=2".to_string())))
        );
        let u: http::Uri = "/t?token=x".parse().unwrap();
        assert_eq!(split_token(&u), Some(("x".to_string(), None)));
        let u: http::Uri = "/t?tokens=x".parse().unwrap();
        assert_eq!(split_token(&u), None);
        for spelling in ["%74oken", "%74%6F%6b%65%6E", "Token", "TOKEN"] {
            let u: http::Uri = format!("/t?{spelling}=x&a=1").parse().unwrap();
            assert_eq!(
                split_token(&u),
                Some(("x".to_string(), Some("a=1".to_string()))),
                "{spelling}"
            );
            assert!(has_query_token(&u), "{spelling}");
        }
    }

    #[test]
    fn the_token_is_taken_out_of_a_referer() {
        assert_eq!(
            strip_token_from_url("https://a.example/p?x=1&%74oken=abc&y=2#f").as_deref(),
            Some("https://a.example/p?x=1&y=2#f")
        );
        assert_eq!(
            strip_token_from_url("https://a.example/p?token=abc").as_deref(),
            Some("https://a.example/p")
        );
        assert_eq!(strip_token_from_url("https://a.example/p?x=1"), None);
        assert_eq!(strip_token_from_url("https://a.example/p"), None);
    }

    #[test]
    fn origin_cookies_lose_domain_and_cannot_be_the_session() {
        assert_eq!(
            origin_set_cookie(b"a=1; Path=/; Domain=.localhost; HttpOnly; domain = x").as_deref(),
            Some(&b"a=1; Path=/; HttpOnly"[..])
        );
        assert_eq!(origin_set_cookie(b"a=1").as_deref(), Some(&b"a=1"[..]));
        for bad in [
            &b"netbore_session=x; Path=/"[..],
            b"__Host-netbore_session=x; Secure; Path=/",
            b" NETBORE_SESSION =x",
            b"=netbore_session=x",
        ] {
            assert_eq!(
                origin_set_cookie(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn session_cookies_are_removed_and_others_kept() {
        assert_eq!(
            strip_session_cookies(b"a=1; netbore_session=xyz; __Host-netbore_session=q; b=2"),
            Some(Bytes::from("a=1; b=2"))
        );
        assert_eq!(strip_session_cookies(b"netbore_session=xyz"), None);
    }
}
