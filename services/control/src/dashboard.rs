//! The operator dashboard: server-rendered pages on control's admin listener
//! (`--admin-addr`, under `/dashboard/`) or on its own listener (`--dashboard-addr`).
//!
//! An operator logs in with an API key that has `tunnels:read` (or `admin`). The
//! browser never holds the key: control keeps a session in this process (a random id,
//! stored hashed, mapped to the key's *id*, a per-session CSRF token and an expiry) and
//! the cookie carries only the random id (`HttpOnly`, `SameSite=Strict`, `Secure` when a
//! trusted proxy says the request came over TLS). Every request reads the key again by
//! id, so a key revoked or expired since login ends the session at once; each page then
//! acts with a management token minted for that request from the key (its owner, scopes
//! and name pattern), through the same operations and authorisation as REST, so the
//! dashboard shows and changes no more than the key could over the API.
//!
//! Every POST (logout, disable, enable) carries the session's CSRF token in a hidden
//! field; the login form carries one bound to a short-lived login cookie. Every value a
//! user chose (names, owners, audit fields) is HTML-escaped ([`esc`]); the pages run no
//! script (a `Content-Security-Policy` forbids it) and refresh themselves with
//! `<meta http-equiv="refresh">` every [`REFRESH_SECS`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use netbore_api::types::{AuditEventView, AuditQuery, ListTunnelsQuery, Tunnel};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Control;
use crate::accounts::ApiKeyRecord;
use crate::ops::{self, ApiError};

/// The session cookie: a random id, never the key.
pub const SESSION_COOKIE: &str = "netbore_dashboard";
/// The cookie that binds the login form to the browser that loaded it (login CSRF).
pub const LOGIN_COOKIE: &str = "netbore_dashboard_login";
/// How long a session lasts after login (then: log in again).
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// How long a login form may be left open before it is submitted.
pub const LOGIN_FORM_TTL: Duration = Duration::from_secs(3600);
/// Most sessions held; past it the one that would end soonest goes.
pub const MAX_SESSIONS: usize = 10_000;
/// Largest form body read (the login form: a key of at most
/// [`crate::api_keys::MAX_API_KEY_LEN`] bytes and a token, URL-encoded).
pub const MAX_FORM_BODY: usize = 1024;
/// The pages reload themselves this often.
pub const REFRESH_SECS: u64 = 5;
/// Most tunnels the list shows (the rest: narrow with the filter).
pub const MAX_LISTED: usize = 1000;
/// Audit events shown on a tunnel's page (its most recent).
pub const RECENT_AUDIT: usize = 50;
/// Pages of [`crate::audit::MAX_AUDIT_LIMIT`] events read to find a tunnel's most
/// recent ones; a tunnel with more shows the most recent of the last day.
const MAX_AUDIT_PAGES: usize = 5;
/// Longest filter text taken.
pub const MAX_FILTER_LEN: usize = 100;
/// Lifetime of the management token minted for one dashboard request.
const REQUEST_TOKEN_TTL: u64 = 60;
/// Random bytes in a session id and in a CSRF token.
const TOKEN_BYTES: usize = 32;
const CSS: &str = include_str!("dashboard/style.css");
/// No script, no third party, no framing: the pages are plain HTML and one stylesheet.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// One logged-in browser.
#[derive(Clone)]
struct Session {
    key_id: String,
    csrf: String,
    expires: Instant,
}

/// Sessions of this process, by the SHA-256 of their id (a memory dump shows no
/// usable cookie). Lost on restart: operators log in again.
#[derive(Default)]
pub struct Sessions(Mutex<HashMap<String, Session>>);

impl Sessions {
    /// A new session for `key_id`: (cookie value, CSRF token).
    fn open(&self, key_id: &str, now: Instant) -> (String, String) {
        let id = random_token();
        let csrf = random_token();
        let mut m = self.0.lock();
        m.retain(|_, s| s.expires > now);
        if m.len() >= MAX_SESSIONS
            && let Some(k) = m
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            m.remove(&k);
        }
        m.insert(
            crate::api_keys::hash_key(&id),
            Session {
                key_id: key_id.to_string(),
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        (id, csrf)
    }

    /// The session behind cookie value `id`, if it has not ended.
    fn get(&self, id: &str, now: Instant) -> Option<Session> {
        let h = crate::api_keys::hash_key(id);
        let mut m = self.0.lock();
        match m.get(&h) {
            Some(s) if s.expires > now => Some(s.clone()),
            Some(_) => {
                m.remove(&h);
                None
            }
            None => None,
        }
    }

    fn close(&self, id: &str) {
        self.0.lock().remove(&crate::api_keys::hash_key(id));
    }

    /// Sessions held (expired ones included until the next login sweeps them).
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    /// True when none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn random_token() -> String {
    let b: [u8; TOKEN_BYTES] = rand::random();
    B64URL.encode(b)
}

/// Compares tokens in time independent of where they differ.
fn tokens_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

/// What the dashboard's handlers share.
#[derive(Clone)]
pub struct Dashboard {
    control: Control,
    sessions: Arc<Sessions>,
}

impl Dashboard {
    /// A dashboard with no sessions yet.
    pub fn new(control: Control) -> Dashboard {
        Dashboard {
            control,
            sessions: Arc::default(),
        }
    }

    /// Its sessions (tests look at their count).
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }
}

/// The dashboard's routes, under `/dashboard/` (no sockets: tests drive it with
/// `oneshot`).
pub fn router(dashboard: Dashboard) -> Router {
    let control = dashboard.control.clone();
    Router::new()
        .route(
            "/dashboard",
            get(|| async { redirect("/dashboard/", None) }),
        )
        .route("/dashboard/", get(tunnels_page))
        .route("/dashboard/login", get(login_page).post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/edges", get(edges_page))
        .route("/dashboard/tunnels/{tunnel}", get(tunnel_page))
        .route("/dashboard/tunnels/{tunnel}/disable", post(disable))
        .route("/dashboard/tunnels/{tunnel}/enable", post(enable))
        .route(
            "/dashboard/style.css",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/css; charset=utf-8"),
                        (header::CACHE_CONTROL, "max-age=300"),
                    ],
                    CSS,
                )
            }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM_BODY))
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::middleware::from_fn_with_state(
            control,
            crate::audit::rest_layer,
        ))
        .with_state(dashboard)
}

/// The dashboard alone (`--dashboard-addr`): its routes, `/` sending to them, and a 404
/// page for anything else.
pub fn standalone_router(control: Control) -> Router {
    router(Dashboard::new(control))
        .route("/", get(|| async { redirect("/dashboard/", None) }))
        .fallback(|| async {
            html(
                StatusCode::NOT_FOUND,
                &page(
                    "Not found",
                    None,
                    false,
                    "<h1>Not found</h1><p>The dashboard is at <a href=\"/dashboard/\">/dashboard/</a>.</p>",
                ),
            )
        })
}

/// The admin listener with the dashboard: `/dashboard/…` here, `/metrics` and `/livez`
/// as [`crate::metrics::admin`] serves them.
pub fn admin_router(control: Control) -> Router {
    let admin = crate::metrics::admin(control.clone());
    router(Dashboard::new(control)).fallback(move |req: axum::extract::Request| {
        let r = admin.answer(&req);
        async move { r.map(axum::body::Body::new) }
    })
}

/// Serves `router` on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a path segment (tunnel ids and names are URL-safe already; this
/// keeps a stray one from breaking a link).
fn seg(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn html(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

fn redirect(to: &str, cookies: Option<Vec<String>>) -> Response {
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response();
    for c in cookies.unwrap_or_default() {
        if let Ok(v) = HeaderValue::from_str(&c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    r
}

/// Who is looking, for the page header.
struct Chrome<'a> {
    owner: &'a str,
    prefix: &'a str,
    csrf: &'a str,
}

fn page(title: &str, who: Option<&Chrome>, refresh: bool, main: &str) -> String {
    let mut s = String::from("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    if refresh {
        let _ = write!(
            s,
            "<meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">"
        );
    }
    let _ = write!(
        s,
        "<meta name=\"viewport\" content=\"width=device-width\"><title>{} · Netbore</title><link rel=\"stylesheet\" href=\"/dashboard/style.css\"></head><body>",
        esc(title)
    );
    s.push_str("<header><span class=\"brand\">Netbore</span>");
    if let Some(w) = who {
        let _ = write!(
            s,
            "<a href=\"/dashboard/\">Tunnels</a><a href=\"/dashboard/edges\">Edges</a><span class=\"who\">{} · key {}</span><form method=\"post\" action=\"/dashboard/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\" id=\"logout\">Log out</button></form>",
            esc(w.owner),
            esc(w.prefix),
            esc(w.csrf)
        );
    }
    s.push_str("</header><main>");
    s.push_str(main);
    s.push_str("</main></body></html>\n");
    s
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// True when a trusted proxy (`--trusted-proxies`) says the browser reached it over
/// TLS: the cookies then get `Secure`. Control's own listeners are plain HTTP.
fn over_tls(control: &Control, peer: Option<SocketAddr>, headers: &HeaderMap) -> bool {
    let trusted = peer.is_some_and(|p| {
        control
            .config()
            .trusted_proxies
            .iter()
            .any(|c| c.contains(p.ip()))
    });
    trusted
        && headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

fn set_cookie(name: &str, value: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/dashboard; Max-Age={}; HttpOnly; SameSite=Strict{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

fn clear_cookie(name: &str, secure: bool) -> String {
    set_cookie(name, "", Duration::ZERO, secure)
}

/// The request's facts every handler needs.
struct Req {
    secure: bool,
    headers: HeaderMap,
}

impl Req {
    fn new(
        control: &Control,
        peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
        headers: HeaderMap,
    ) -> Req {
        let peer = peer.map(|axum::Extension(ConnectInfo(a))| a);
        Req {
            secure: over_tls(control, peer, &headers),
            headers,
        }
    }
}

/// The login page, with `message` (what went wrong) when there is one, at `status`;
/// sets a fresh login cookie and clears the session cookie when `clear` says so.
fn login_form(status: StatusCode, message: Option<&str>, secure: bool, clear: bool) -> Response {
    let token = random_token();
    let mut main = String::from(
        "<div class=\"login\"><h1>Operator dashboard</h1><p class=\"muted\">Log in with an API key (<code>nbk_…</code>) that has the <code>tunnels:read</code> scope. The key is checked and then forgotten by this page: the browser keeps only a session cookie.</p>",
    );
    if let Some(m) = message {
        let _ = write!(
            main,
            "<p class=\"notice error\" id=\"error\">{}</p>",
            esc(m)
        );
    }
    let _ = write!(
        main,
        "<form method=\"post\" action=\"/dashboard/login\"><input type=\"hidden\" name=\"csrf\" value=\"{token}\"><label for=\"key\">API key</label><input type=\"password\" id=\"key\" name=\"key\" autocomplete=\"off\" maxlength=\"{}\" required autofocus><button class=\"primary\" type=\"submit\" id=\"login\">Log in</button></form></div>",
        crate::api_keys::MAX_API_KEY_LEN
    );
    let mut r = html(status, &page("Log in", None, false, &main));
    let mut cookies = vec![set_cookie(LOGIN_COOKIE, &token, LOGIN_FORM_TTL, secure)];
    if clear {
        cookies.push(clear_cookie(SESSION_COOKIE, secure));
    }
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(&c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    r
}

/// A logged-in caller: the key (read again this request) and a management token
/// minted from it for this request.
struct Caller {
    key: ApiKeyRecord,
    bearer: String,
    csrf: String,
    session: String,
}

impl Caller {
    fn chrome(&self) -> Chrome<'_> {
        Chrome {
            owner: &self.key.owner,
            prefix: &self.key.prefix,
            csrf: &self.csrf,
        }
    }
}

/// The caller behind the session cookie, or the login page saying why not.
async fn caller(d: &Dashboard, req: &Req) -> Result<Caller, Response> {
    let Some(id) = cookie(&req.headers, SESSION_COOKIE).filter(|c| !c.is_empty()) else {
        return Err(login_form(
            StatusCode::UNAUTHORIZED,
            None,
            req.secure,
            false,
        ));
    };
    let Some(s) = d.sessions.get(&id, Instant::now()) else {
        return Err(login_form(
            StatusCode::UNAUTHORIZED,
            Some(&format!(
                "Your session is not valid (it ended after {} h, you logged out, or control restarted); log in again.",
                SESSION_TTL.as_secs() / 3600
            )),
            req.secure,
            true,
        ));
    };
    let end = |m: String| {
        d.sessions.close(&id);
        login_form(StatusCode::UNAUTHORIZED, Some(&m), req.secure, true)
    };
    let key = match d.control.store().api_key(&s.key_id).await {
        Ok(Some(k)) => k,
        Ok(None) => {
            return Err(end(format!(
                "The API key {} this session was opened with no longer exists; log in with another key.",
                s.key_id
            )));
        }
        Err(e) => {
            let e = ApiError::from(e);
            return Err(error_page(None, &e));
        }
    };
    let now = netbore_tokens::now_unix();
    if key.revoked_at.is_some() {
        return Err(end(format!(
            "The API key {} ({}) was revoked, which ended this session; log in with a key in force.",
            key.prefix, key.id
        )));
    }
    if key.expires_at.is_some_and(|e| e <= now) {
        return Err(end(format!(
            "The API key {} ({}) expired, which ended this session; log in with a key in force.",
            key.prefix, key.id
        )));
    }
    crate::audit::note_api_key(&key.id);
    let claims =
        crate::api_keys::claims_of(&d.control, &key, key.scopes.clone(), REQUEST_TOKEN_TTL);
    let bearer = match d.control.keys().sign_management(&claims) {
        Ok(t) => t,
        Err(e) => return Err(error_page(None, &ApiError::internal(e))),
    };
    Ok(Caller {
        key,
        bearer,
        csrf: s.csrf,
        session: id,
    })
}

/// A page for a refusal from an operation: its status, code and message.
fn error_page(who: Option<&Chrome>, e: &ApiError) -> Response {
    let main = format!(
        "<h1>Refused</h1><p class=\"notice error\" id=\"error\"><code>{}</code> {}</p><p><a href=\"/dashboard/\">Back to the tunnels</a></p>",
        esc(e.code.as_str()),
        esc(&e.message)
    );
    html(e.status, &page("Refused", who, false, &main))
}

fn form_fields(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

fn query_fields(q: Option<String>) -> HashMap<String, String> {
    form_fields(q.unwrap_or_default().as_bytes())
}

async fn login_page(
    State(d): State<Dashboard>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Response {
    let req = Req::new(&d.control, peer, headers);
    // Already logged in: straight to the tunnels.
    if cookie(&req.headers, SESSION_COOKIE)
        .is_some_and(|id| d.sessions.get(&id, Instant::now()).is_some())
    {
        return redirect("/dashboard/", None);
    }
    login_form(StatusCode::OK, None, req.secure, false)
}

async fn login(
    State(d): State<Dashboard>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req = Req::new(&d.control, peer, headers);
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return login_form(
                StatusCode::PAYLOAD_TOO_LARGE,
                Some(&format!(
                    "The login form is larger than {MAX_FORM_BODY} bytes; paste only the API key."
                )),
                req.secure,
                false,
            );
        }
        Err(_) => {
            return login_form(
                StatusCode::BAD_REQUEST,
                Some("The login form could not be read; try again."),
                req.secure,
                false,
            );
        }
    };
    let f = form_fields(&body);
    let expected = cookie(&req.headers, LOGIN_COOKIE).unwrap_or_default();
    let given = f.get("csrf").map(String::as_str).unwrap_or_default();
    if expected.is_empty() || !tokens_equal(&expected, given) {
        return login_form(
            StatusCode::FORBIDDEN,
            Some(
                "This login form expired or was not loaded from this dashboard (its CSRF token does not match); log in again from this page.",
            ),
            req.secure,
            false,
        );
    }
    let key = f.get("key").map(|k| k.trim()).unwrap_or_default();
    if key.is_empty() {
        return login_form(
            StatusCode::BAD_REQUEST,
            Some("Paste an API key (nbk_…) to log in."),
            req.secure,
            false,
        );
    }
    if !crate::api_keys::is_api_key(key) {
        return login_form(
            StatusCode::UNAUTHORIZED,
            Some(
                "That is not an API key: keys start with nbk_ (management tokens and tunnel credentials do not log in here). Create one with POST /v1/api-keys.",
            ),
            req.secure,
            false,
        );
    }
    let rec = match crate::api_keys::verify(&d.control, key).await {
        Ok(r) => r,
        Err(e) => {
            return login_form(e.status, Some(&e.message), req.secure, false);
        }
    };
    if !rec
        .scopes
        .iter()
        .any(|s| s == "tunnels:read" || s == "admin")
    {
        tracing::info!(key = %rec.id, owner = %rec.owner, "dashboard login refused: the key lacks tunnels:read");
        return login_form(
            StatusCode::FORBIDDEN,
            Some(&format!(
                "The API key {} ({}) lacks the tunnels:read scope (it has: {}); log in with a key that has it, e.g. one created with POST /v1/api-keys {{\"scopes\":[\"tunnels:read\"]}}.",
                rec.prefix,
                rec.id,
                rec.scopes.join(", ")
            )),
            req.secure,
            false,
        );
    }
    let (id, _) = d.sessions.open(&rec.id, Instant::now());
    tracing::info!(key = %rec.id, owner = %rec.owner, "dashboard login");
    redirect(
        "/dashboard/",
        Some(vec![
            set_cookie(SESSION_COOKIE, &id, SESSION_TTL, req.secure),
            clear_cookie(LOGIN_COOKIE, req.secure),
        ]),
    )
}

/// Checks a POST's CSRF token against the session's: `None` when it matches, else
/// the page saying why.
fn check_csrf(c: &Caller, body: &Result<Bytes, BytesRejection>) -> Option<Response> {
    let refuse = |m: &str| {
        let e = ApiError::new(
            StatusCode::FORBIDDEN,
            netbore_api::ErrorCode::Forbidden,
            m.to_string(),
        );
        error_page(Some(&c.chrome()), &e)
    };
    let Ok(body) = body else {
        return Some(refuse(&format!(
            "the form is larger than {MAX_FORM_BODY} bytes or unreadable; reload the page and retry"
        )));
    };
    let f = form_fields(body);
    match f.get("csrf") {
        Some(t) if tokens_equal(t, &c.csrf) => None,
        _ => Some(refuse(
            "the form's CSRF token is missing or not this session's (a stale page, or a form from another site); reload the page and retry",
        )),
    }
}

async fn logout(
    State(d): State<Dashboard>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req = Req::new(&d.control, peer, headers);
    let c = match caller(&d, &req).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Some(r) = check_csrf(&c, &body) {
        return r;
    }
    d.sessions.close(&c.session);
    tracing::info!(key = %c.key.id, owner = %c.key.owner, "dashboard logout");
    redirect(
        "/dashboard/login",
        Some(vec![clear_cookie(SESSION_COOKIE, req.secure)]),
    )
}

fn state_badge(t: &Tunnel) -> String {
    let s = match &t.status {
        Some(s) => s.state.as_str(),
        None if t.disabled_at.is_some() => "disabled",
        None => "unknown",
    };
    format!("<span class=\"state state-{s}\">{s}</span>")
}

fn distinct_edges(t: &Tunnel) -> Vec<String> {
    let mut v: Vec<String> = t
        .status
        .iter()
        .flat_map(|s| s.links.iter().map(|l| l.edge_id.clone()))
        .collect();
    v.sort();
    v.dedup();
    v
}

async fn tunnels_page(
    State(d): State<Dashboard>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let req = Req::new(&d.control, peer, headers);
    let c = match caller(&d, &req).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let filter: String = query_fields(q)
        .remove("q")
        .unwrap_or_default()
        .trim()
        .chars()
        .take(MAX_FILTER_LEN)
        .collect();
    let needle = filter.to_lowercase();
    let mut tunnels = Vec::new();
    let mut cursor = None;
    let mut more = false;
    loop {
        let page = match ops::list(
            &d.control,
            Some(c.bearer.clone()),
            ListTunnelsQuery {
                prefix: String::new(),
                limit: Some(ops::MAX_LIST_LIMIT),
                cursor,
            },
        )
        .await
        {
            Ok(p) => p,
            Err(e) => return error_page(Some(&c.chrome()), &e),
        };
        tunnels.extend(page.tunnels.into_iter().filter(|t| {
            needle.is_empty()
                || t.name.to_lowercase().contains(&needle)
                || t.owner
                    .as_deref()
                    .is_some_and(|o| o.to_lowercase().contains(&needle))
        }));
        cursor = page.next_cursor;
        if tunnels.len() >= MAX_LISTED {
            more = cursor.is_some() || tunnels.len() > MAX_LISTED;
            tunnels.truncate(MAX_LISTED);
            break;
        }
        if cursor.is_none() {
            break;
        }
    }
    let mut main = String::from("<h1>Tunnels</h1>");
    let _ = write!(
        main,
        "<form class=\"filter\" method=\"get\" action=\"/dashboard/\"><input type=\"text\" name=\"q\" id=\"filter\" placeholder=\"name or owner contains…\" value=\"{}\" maxlength=\"{MAX_FILTER_LEN}\"><button class=\"primary\" type=\"submit\">Filter</button></form>",
        esc(&filter)
    );
    main.push_str("<table id=\"tunnels\"><thead><tr><th>Name</th><th>Owner</th><th>State</th><th>Links</th><th>Edges</th><th>Requests (5 min)</th><th>Errors (5 min)</th></tr></thead><tbody>");
    for t in &tunnels {
        let links = t.status.as_ref().map_or(0, |s| s.links.len());
        let (req5, err5) = t
            .status
            .as_ref()
            .map_or((0, 0), |s| (s.requests_5m, s.errors_5m));
        let _ = write!(
            main,
            "<tr class=\"tunnel\" data-name=\"{name}\"><td class=\"name\"><a href=\"/dashboard/tunnels/{id}\">{name}</a></td><td class=\"owner\">{owner}</td><td class=\"state\">{state}</td><td class=\"num links\">{links}</td><td class=\"edges mono\">{edges}</td><td class=\"num\">{req5}</td><td class=\"num\">{err5}</td></tr>",
            name = esc(&t.name),
            id = seg(&t.tunnel_id),
            owner = esc(t.owner.as_deref().unwrap_or("(anonymous)")),
            state = state_badge(t),
            edges = esc(&distinct_edges(t).join(", ")),
        );
    }
    main.push_str("</tbody></table>");
    if tunnels.is_empty() {
        main.push_str(if filter.is_empty() {
            "<p class=\"muted\" id=\"empty\">No tunnels this key can see.</p>"
        } else {
            "<p class=\"muted\" id=\"empty\">No tunnel's name or owner contains that.</p>"
        });
    }
    if more {
        let _ = write!(
            main,
            "<p class=\"muted\">Only the first {MAX_LISTED} are shown; narrow the list with the filter.</p>"
        );
    }
    let _ = write!(
        main,
        "<p class=\"muted\">{} shown · refreshes every {REFRESH_SECS} s</p>",
        tunnels.len()
    );
    html(
        StatusCode::OK,
        &page("Tunnels", Some(&c.chrome()), true, &main),
    )
}

/// A tunnel's most recent audit events, newest first.
async fn recent_audit(
    control: &Control,
    bearer: &str,
    tunnel_id: &str,
) -> Result<Vec<AuditEventView>, ApiError> {
    let mut recent: std::collections::VecDeque<AuditEventView> = Default::default();
    let mut cursor = None;
    let mut since = None;
    for i in 0.. {
        if i == MAX_AUDIT_PAGES {
            // A very busy tunnel: start again from a day ago.
            since = Some((netbore_tokens::now_unix().saturating_sub(86_400)).to_string());
            cursor = None;
            recent.clear();
        }
        let page = crate::audit::list(
            control,
            Some(bearer.to_string()),
            AuditQuery {
                tunnel: Some(tunnel_id.to_string()),
                since: since.clone(),
                limit: Some(crate::audit::MAX_AUDIT_LIMIT),
                cursor,
                ..Default::default()
            },
        )
        .await?;
        for e in page.events {
            if recent.len() == RECENT_AUDIT {
                recent.pop_front();
            }
            recent.push_back(e);
        }
        cursor = page.next_cursor;
        if cursor.is_none() || i >= MAX_AUDIT_PAGES * 2 {
            break;
        }
    }
    Ok(recent.into_iter().rev().collect())
}

/// A tunnel by id (`tun_…`) or name, with its status reasons and recent audit events;
/// `notice` on top (the outcome of a disable or enable).
async fn render_tunnel(
    d: &Dashboard,
    c: &Caller,
    tunnel: &str,
    notice: Option<(StatusCode, String, bool)>,
) -> Response {
    let (id, name) = if tunnel.starts_with("tun_") {
        (Some(tunnel), None)
    } else {
        (None, Some(tunnel))
    };
    let r = match ops::get(&d.control, Some(c.bearer.clone()), id, name).await {
        Ok(r) => r,
        Err(e) => return error_page(Some(&c.chrome()), &e),
    };
    let mut t = ops::tunnel_view(&d.control, &r);
    match d.control.tunnel_status(std::slice::from_ref(&r)).await {
        Ok(mut v) => t.status = v.pop(),
        Err(e) => tracing::warn!(error = %e, "dashboard tunnel page without live status"),
    }
    let audit = recent_audit(&d.control, &c.bearer, &r.tunnel_id).await;
    let mut main = String::new();
    let status = match &notice {
        Some((st, m, ok)) => {
            let _ = write!(
                main,
                "<p class=\"notice {}\" id=\"notice\">{}</p>",
                if *ok { "ok" } else { "error" },
                esc(m)
            );
            *st
        }
        None => StatusCode::OK,
    };
    let _ = write!(
        main,
        "<h1>{} {}</h1><dl class=\"facts\"><dt>Id</dt><dd class=\"mono\">{}</dd><dt>Hostname</dt><dd class=\"mono\">{}</dd><dt>Owner</dt><dd id=\"owner\">{}</dd><dt>Created</dt><dd>{}</dd>",
        esc(&t.name),
        state_badge(&t),
        esc(&t.tunnel_id),
        esc(&t.public_hostname),
        esc(t.owner.as_deref().unwrap_or("(anonymous)")),
        esc(&t.created_at),
    );
    if let Some(at) = &t.disabled_at {
        let _ = write!(main, "<dt>Disabled</dt><dd>{}</dd>", esc(at));
    }
    if let Some(s) = &t.status {
        let _ = write!(
            main,
            "<dt>Last seen</dt><dd>{}</dd><dt>Requests (5 min)</dt><dd>{} ({} failed)</dd>",
            esc(s.last_seen.as_deref().unwrap_or("never")),
            s.requests_5m,
            s.errors_5m
        );
        if let Some(o) = &s.origin {
            let _ = write!(
                main,
                "<dt>Origin</dt><dd>{} · {} {} (checked {})</dd>",
                if o.healthy { "healthy" } else { "failing" },
                esc(&o.cause),
                esc(&o.message),
                esc(&o.checked_at)
            );
        }
    }
    main.push_str("</dl>");
    // Disable / enable: the operation checks tunnels:write and says so when missing.
    let (action, label, class) = if t.disabled_at.is_some() {
        ("enable", "Enable", "primary")
    } else {
        ("disable", "Disable", "danger")
    };
    let _ = write!(
        main,
        "<form method=\"post\" action=\"/dashboard/tunnels/{}/{action}\" style=\"margin-top:1em\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button class=\"{class}\" type=\"submit\" id=\"{action}\">{label}</button> <span class=\"muted\">needs an API key with tunnels:write</span></form>",
        seg(&t.tunnel_id),
        esc(&c.csrf)
    );
    main.push_str("<h2>Status reasons</h2>");
    match &t.status {
        Some(s) if !s.reasons.is_empty() => {
            main.push_str("<ul class=\"reasons\" id=\"reasons\">");
            for r in &s.reasons {
                let code = serde_json::to_value(r.code)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                let _ = write!(
                    main,
                    "<li><code>{}</code> {}</li>",
                    esc(&code),
                    esc(&r.message)
                );
            }
            main.push_str("</ul>");
        }
        Some(_) => main.push_str("<p class=\"muted\" id=\"reasons\">None: it is ready.</p>"),
        None => main.push_str(
            "<p class=\"muted\" id=\"reasons\">Live status unavailable (control cannot read its live state right now).</p>",
        ),
    }
    main.push_str("<h2>Links</h2>");
    match &t.status {
        Some(s) if !s.links.is_empty() => {
            main.push_str("<table id=\"links\"><thead><tr><th>Edge</th><th>Link</th><th>Since</th><th>Agent</th><th>Address</th></tr></thead><tbody>");
            for l in &s.links {
                let _ = write!(
                    main,
                    "<tr><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td class=\"mono\">{}</td></tr>",
                    esc(&l.edge_id),
                    esc(&l.link_id),
                    esc(&l.connected_since),
                    esc(&l.agent_version),
                    esc(&l.agent_addr)
                );
            }
            main.push_str("</tbody></table>");
        }
        _ => main.push_str("<p class=\"muted\">No agent is linked.</p>"),
    }
    let _ = write!(
        main,
        "<h2>Recent audit events</h2><p class=\"muted\">The {RECENT_AUDIT} most recent, newest first.</p>"
    );
    match audit {
        Ok(events) => {
            main.push_str("<table id=\"audit\"><thead><tr><th>When</th><th>Action</th><th>Actor</th><th>Key</th><th>Address</th><th>Detail</th></tr></thead><tbody>");
            for e in &events {
                let _ = write!(
                    main,
                    "<tr class=\"event\"><td>{}</td><td class=\"action mono\">{}</td><td class=\"actor\">{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td><pre class=\"detail\">{}</pre></td></tr>",
                    esc(&e.at),
                    esc(&e.action),
                    esc(&e.actor),
                    esc(e.key_id.as_deref().unwrap_or("")),
                    esc(e.address.as_deref().unwrap_or("")),
                    esc(&e.detail.to_string())
                );
            }
            main.push_str("</tbody></table>");
        }
        Err(e) => {
            let _ = write!(
                main,
                "<p class=\"notice error\">The audit trail could not be read: <code>{}</code> {}</p>",
                esc(e.code.as_str()),
                esc(&e.message)
            );
        }
    }
    // No refresh on a refusal: the notice stays until the operator moves on.
    let refresh = notice.is_none();
    html(status, &page(&t.name, Some(&c.chrome()), refresh, &main))
}

async fn tunnel_page(
    State(d): State<Dashboard>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Path(tunnel): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let req = Req::new(&d.control, peer, headers);
    let c = match caller(&d, &req).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let notice = match query_fields(q).get("done").map(String::as_str) {
        Some("disabled") => Some((
            StatusCode::OK,
            "Disabled: its links are closed and viewers get 403 tunnel_disabled until it is enabled.".to_string(),
            true,
        )),
        Some("enabled") => Some((
            StatusCode::OK,
            "Enabled: its agent links again by itself.".to_string(),
            true,
        )),
        _ => None,
    };
    render_tunnel(&d, &c, &tunnel, notice).await
}

async fn set_disabled(
    d: Dashboard,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    tunnel: String,
    body: Result<Bytes, BytesRejection>,
    disable: bool,
) -> Response {
    let req = Req::new(&d.control, peer, headers);
    let c = match caller(&d, &req).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Some(r) = check_csrf(&c, &body) {
        return r;
    }
    match crate::managed::set_disabled(&d.control, Some(c.bearer.clone()), &tunnel, disable).await {
        Ok(t) => redirect(
            &format!(
                "/dashboard/tunnels/{}?done={}",
                seg(&t.tunnel_id),
                if disable { "disabled" } else { "enabled" }
            ),
            None,
        ),
        Err(e) => {
            let what = if disable { "disable" } else { "enable" };
            let notice = (
                e.status,
                format!(
                    "Refused to {what} this tunnel ({}): {}",
                    e.code.as_str(),
                    e.message
                ),
                false,
            );
            render_tunnel(&d, &c, &tunnel, Some(notice)).await
        }
    }
}

async fn disable(
    State(d): State<Dashboard>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Path(tunnel): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    set_disabled(d, peer, headers, tunnel, body, true).await
}

async fn enable(
    State(d): State<Dashboard>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Path(tunnel): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    set_disabled(d, peer, headers, tunnel, body, false).await
}

async fn edges_page(
    State(d): State<Dashboard>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Response {
    let req = Req::new(&d.control, peer, headers);
    let c = match caller(&d, &req).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Err(e) = ops::require_read(&d.control, Some(c.bearer.clone())).await {
        return error_page(Some(&c.chrome()), &e);
    }
    let edges = match d.control.edge_statuses_now().await {
        Ok(e) => e,
        Err(e) => return error_page(Some(&c.chrome()), &ApiError::from(e)),
    };
    let now = netbore_tokens::now_unix();
    let mut main = String::from(
        "<h1>Edges</h1><table id=\"edges\"><thead><tr><th>Edge</th><th>Region</th><th>Agent URL</th><th>Link to control</th><th>Draining</th><th>Tunnels</th><th>Agent links</th><th>Open streams</th><th>Last report</th></tr></thead><tbody>",
    );
    for (e, s) in &edges {
        let (link, draining, tunnels, conns, streams, last) = match s {
            Some(s) => (
                if s.connected { "connected" } else { "closed" },
                if s.draining { "yes" } else { "no" },
                s.tunnels.to_string(),
                s.connections.to_string(),
                s.streams.to_string(),
                format!(
                    "{} ({} s ago)",
                    ops::rfc3339(s.last_report),
                    now.saturating_sub(s.last_report)
                ),
            ),
            None => (
                "never reported",
                "",
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ),
        };
        let _ = write!(
            main,
            "<tr class=\"edge\" data-edge=\"{id}\"><td class=\"mono\">{id}</td><td>{}</td><td class=\"mono\">{}</td><td>{link}</td><td class=\"draining\">{draining}</td><td class=\"num tunnels\">{tunnels}</td><td class=\"num connections\">{conns}</td><td class=\"num streams\">{streams}</td><td>{}</td></tr>",
            esc(&e.region),
            esc(&e.edge_url),
            esc(&last),
            id = esc(&e.edge_id),
        );
    }
    main.push_str("</tbody></table>");
    if edges.is_empty() {
        main.push_str("<p class=\"muted\">No edge is configured or has reported.</p>");
    }
    let _ = write!(
        main,
        "<p class=\"muted\">What the edges last reported to control · refreshes every {REFRESH_SECS} s</p>"
    );
    html(
        StatusCode::OK,
        &page("Edges", Some(&c.chrome()), true, &main),
    )
}

#[cfg(test)]
mod tests {
    //! The dashboard through `oneshot`, without sockets.

    use super::*;
    use crate::ControlConfig;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert('x')</script>&"q""#),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;q&quot;"
        );
    }

    #[test]
    fn sessions_end_after_their_lifetime() {
        // The clock is a parameter: no waiting.
        let t0 = Instant::now();
        let s = Sessions::default();
        let (id, csrf) = s.open("key_1", t0);
        assert_ne!(id, csrf);
        assert_eq!(s.get(&id, t0).unwrap().key_id, "key_1");
        assert!(s.get("forged", t0).is_none());
        assert!(
            s.get(&id, t0 + SESSION_TTL - Duration::from_secs(1))
                .is_some()
        );
        assert!(s.get(&id, t0 + SESSION_TTL).is_none());
        assert!(s.is_empty(), "an ended session is dropped");
        s.open("key_2", t0);
        s.close(&s.open("key_3", t0).0);
        assert_eq!(s.len(), 1, "a closed session is gone");
    }

    async fn get(app: Router, uri: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap) {
        let mut req = axum::http::Request::get(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let st = r.status();
        let h = r.headers().clone();
        let _ = r.into_body().collect().await;
        (st, h)
    }

    fn set_cookies(h: &HeaderMap) -> Vec<String> {
        h.get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    #[tokio::test]
    async fn cookies_are_secure_only_behind_a_trusted_tls_proxy() {
        let control = Control::new(
            ControlConfig {
                trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
                ..ControlConfig::default()
            },
            netbore_tokens::KeySet::generate(),
        );
        let app = || {
            router(Dashboard::new(control.clone())).layer(axum::Extension(ConnectInfo(
                SocketAddr::from(([10, 1, 2, 3], 4000)),
            )))
        };
        let (st, h) = get(app(), "/dashboard/login", &[]).await;
        assert_eq!(st, StatusCode::OK);
        let c = set_cookies(&h);
        assert!(c[0].contains("HttpOnly") && c[0].contains("SameSite=Strict"));
        assert!(!c[0].contains("Secure"), "{c:?}");
        assert!(
            h[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("default-src 'none'")
        );
        let (_, h) = get(app(), "/dashboard/login", &[("x-forwarded-proto", "https")]).await;
        assert!(
            set_cookies(&h)[0].ends_with("; Secure"),
            "{:?}",
            set_cookies(&h)
        );
        // The same header from a peer that is not a trusted proxy is ignored.
        let untrusted = router(Dashboard::new(control.clone())).layer(axum::Extension(
            ConnectInfo(SocketAddr::from(([192, 0, 2, 1], 4000))),
        ));
        let (_, h) = get(
            untrusted,
            "/dashboard/login",
            &[("x-forwarded-proto", "https")],
        )
        .await;
        assert!(!set_cookies(&h)[0].contains("Secure"));
        // No session: the login form, 401.
        let (st, _) = get(
            app(),
            "/dashboard/",
            &[("cookie", "netbore_dashboard=forged")],
        )
        .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }
}
