//! The operator dashboard (issue 14 item 3) against real `netbore-control`,
//! `netbore-edge` and `netbore http` processes, in a real headless Chromium: an
//! operator logs in with a `tunnels:read` key, sees a live tunnel ready and then offline
//! after its agent is killed (through the page's own refresh), with its owner shown
//! escaped; disable needs `tunnels:write` and then viewers get 403 `tunnel_disabled`;
//! over plain HTTP, wrong and scopeless keys are refused with the reason, the cookie is
//! `HttpOnly` and `SameSite=Strict` and holds no key, a form without the session's
//! CSRF token is refused, and a revoked key's session ends.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use netbore_control::api::{CreateApiKeyRequest, EnrollRequest, IssueTokenRequest};
use netbore_control::client::ControlClient;
use netbore_testkit::browser::Browser;
use netbore_testkit::origin::Origin;
use netbore_testkit::{ControlProc, EdgeProc, HttpClient, Proc, Viewer, eventually, free_port};
use serde_json::{Value, json};

const BOOT: &str = "test-bootstrap-credential";
const WAIT: Duration = Duration::from_secs(30);

/// A management token for `subject` with `scopes`, from the bootstrap credential.
async fn token(control: &str, subject: &str, scopes: &[&str]) -> String {
    ControlClient::new(control)
        .with_bearer(BOOT)
        .issue_token(&IssueTokenRequest {
            subject: Some(subject.into()),
            scopes: Some(scopes.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        })
        .await
        .unwrap()
        .token
}

/// An API key of `subject` with `scopes`: (key, key id).
async fn key(control: &str, subject: &str, scopes: &[&str]) -> (String, String) {
    let t = token(control, subject, scopes).await;
    let k = ControlClient::new(control)
        .with_bearer(t)
        .create_api_key(&CreateApiKeyRequest {
            label: "dashboard test".into(),
            scopes: Some(scopes.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        })
        .await
        .unwrap();
    (k.key, k.api_key.id)
}

/// Control with its admin listener (which serves the dashboard) and a fast offline
/// threshold, and one edge linked to it.
struct Setup {
    control: ControlProc,
    edge: EdgeProc,
    admin: String,
}

async fn setup() -> Setup {
    let admin_port = free_port();
    let admin_addr = format!("127.0.0.1:{admin_port}");
    let control = ControlProc::spawn(
        &["--admin-addr", &admin_addr, "--offline-after-secs", "1"],
        &[("NETBORE_BOOTSTRAP_TOKEN", BOOT)],
    );
    control.wait_ready().await;
    let edge = EdgeProc::spawn("e1", &control, None, &[]);
    Setup {
        control,
        edge,
        admin: format!("http://{admin_addr}"),
    }
}

/// Enrols `name` with `key` and runs it with a real `netbore http` on its credential:
/// the agent and the tunnel's host, once a viewer is served.
async fn live_tunnel(
    s: &Setup,
    key: &str,
    name: &str,
    origin: &Origin,
    state: &std::path::Path,
) -> (Proc, String) {
    let en = ControlClient::new(&s.control.url())
        .with_bearer(key)
        .enroll(&EnrollRequest {
            external_id: format!("vm-{name}"),
            requested_name: Some(name.into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let cred = en.tunnel_token.unwrap();
    let mut a = netbore_testkit::json_agent(
        &s.control.url(),
        &origin.url(),
        state,
        &["--connections", "1", "--tunnel-token", &cred],
    );
    let live = a.next_event("live").await;
    let host = live["url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    assert!(s.edge.viewer().await.serves(&host, WAIT).await);
    (a, host)
}

/// Waits until `done` (a JS expression) is truthy, its value; meanwhile runs `action`
/// at most once per page load (the pages reload themselves, and a click's page may
/// come before or after a reload).
async fn act(b: &mut Browser, done: &str, action: &str) -> Value {
    b.wait(&format!(
        "(() => {{ try {{ const d = ({done}); if (d) return d; }} catch (e) {{}} if (!window.__acted) {{ try {{ {action}; window.__acted = true; }} catch (e) {{}} }} return null; }})()"
    ))
    .await
}

/// Logs in through the page's form.
async fn browser_login(b: &mut Browser, admin: &str, key: &str) {
    b.goto(&format!("{admin}/dashboard/")).await;
    act(
        b,
        "document.getElementById('tunnels') !== null",
        &format!(
            "document.getElementById('key').value = {}; document.getElementById('login').click()",
            json!(key)
        ),
    )
    .await;
}

/// What the tunnel list shows of `name` once its state is `state`.
async fn row_once(b: &mut Browser, name: &str, state: &str) -> Value {
    b.wait(&format!(
        "(() => {{ const r = document.querySelector('tr.tunnel[data-name=\"{name}\"]'); if (!r || r.querySelector('td.state').textContent !== '{state}') return null; return {{owner: r.querySelector('td.owner').textContent, links: r.querySelector('td.links').textContent, edges: r.querySelector('td.edges').textContent, markup: document.querySelectorAll('#tunnels script, #tunnels b').length, xss: window.__xss === undefined, cookie: document.cookie}}; }})()"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_chromium_an_operator_sees_a_live_tunnel_go_offline_with_its_owner_escaped() {
    let s = setup().await;
    // Owners are free text (a key's subject): this one is markup that would run.
    let owner = "ops<script>window.__xss=1</script><b>bold</b>";
    let (k, _) = key(&s.control.url(), owner, &["tunnels:read", "tunnels:write"]).await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let (mut agent, _host) = live_tunnel(&s, &k, "dash-web", &origin, state.path()).await;

    let mut b = Browser::launch().await;
    browser_login(&mut b, &s.admin, &k).await;
    let row = row_once(&mut b, "dash-web", "ready").await;
    assert_eq!(
        row["owner"],
        json!(owner),
        "the owner is shown as the text it is"
    );
    assert_eq!(
        row["markup"],
        json!(0),
        "markup from an owner became elements"
    );
    assert_eq!(row["xss"], json!(true), "markup from an owner ran");
    assert_eq!(row["links"], json!("1"));
    assert_eq!(row["edges"], json!("e1"));
    // The session is a cookie the page's script cannot read (HttpOnly).
    assert_eq!(row["cookie"], json!(""));
    b.screenshot("dashboard-tunnels.png").await;

    // The tunnel's page: no reason (it is ready), its link, its audit events.
    let page = act(
        &mut b,
        "document.getElementById('audit') && document.getElementById('links') && {audit: document.getElementById('audit').innerText, reasons: document.getElementById('reasons').innerText, markup: document.querySelectorAll('#audit script, #audit b, #owner b').length}",
        "document.querySelector('tr.tunnel[data-name=\"dash-web\"] td.name a').click()",
    )
    .await;
    let audit = page["audit"].as_str().unwrap();
    assert!(audit.contains("tunnel.enroll"), "{audit}");
    assert!(audit.contains(owner), "the actor is shown as text: {audit}");
    assert_eq!(page["markup"], json!(0));
    assert!(
        page["reasons"].as_str().unwrap().contains("ready"),
        "{page}"
    );
    b.screenshot("dashboard-tunnel.png").await;

    // The edges and their load: e1 holds the one agent link.
    b.goto(&format!("{}/dashboard/edges", s.admin)).await;
    b.wait("(() => { const c = document.querySelector('tr.edge[data-edge=\"e1\"] td.connections'); return c && c.textContent === '1'; })()")
        .await;
    b.screenshot("dashboard-edges.png").await;

    // Killed: the list shows it offline by its own refresh, with no reload from here.
    b.goto(&format!("{}/dashboard/", s.admin)).await;
    row_once(&mut b, "dash-web", "ready").await;
    agent.kill().await;
    let row = row_once(&mut b, "dash-web", "offline").await;
    assert_eq!(row["links"], json!("0"));
    // And its page says why, with the fix.
    b.goto(&format!("{}/dashboard/tunnels/dash-web", s.admin))
        .await;
    let reasons = b
        .wait("document.getElementById('reasons') && document.getElementById('reasons').innerText")
        .await;
    assert!(reasons.as_str().unwrap().contains("no_link"), "{reasons}");
    // The filter narrows by name or owner.
    b.goto(&format!("{}/dashboard/?q=nothing-like-it", s.admin))
        .await;
    b.wait("document.getElementById('empty') !== null").await;
    b.goto(&format!("{}/dashboard/?q=OPS%3Cscript", s.admin))
        .await;
    row_once(&mut b, "dash-web", "offline").await;
}

/// The status and error code a viewer gets for `host` once `pred` holds.
async fn answer_becomes(
    v: &Viewer,
    host: &str,
    within: Duration,
    pred: impl Fn(u16) -> bool,
) -> Option<(u16, Option<String>)> {
    eventually(within, || {
        let v = v.clone();
        let host = host.to_string();
        let pred = &pred;
        async move {
            let r = v.get(&host, "/hello").await;
            let st = r.status.as_u16();
            pred(st).then(|| (st, r.error_code().map(str::to_string)))
        }
    })
    .await
}

const NOTICE: &str =
    "document.getElementById('notice') && document.getElementById('notice').innerText";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_chromium_disable_needs_tunnels_write_and_then_viewers_get_tunnel_disabled() {
    let s = setup().await;
    let (writer, _) = key(
        &s.control.url(),
        "ops-team",
        &["tunnels:read", "tunnels:write"],
    )
    .await;
    let (reader, _) = key(&s.control.url(), "ops-team", &["tunnels:read"]).await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let (_agent, host) = live_tunnel(&s, &writer, "dash-hub", &origin, state.path()).await;
    let v = s.edge.viewer().await;

    // A read-only key sees the tunnel; its disable is refused, with the scope named.
    let mut b = Browser::launch().await;
    browser_login(&mut b, &s.admin, &reader).await;
    b.goto(&format!("{}/dashboard/tunnels/dash-hub", s.admin))
        .await;
    let notice = act(&mut b, NOTICE, "document.getElementById('disable').click()").await;
    let notice = notice.as_str().unwrap();
    assert!(
        notice.contains("forbidden") && notice.contains("tunnels:write"),
        "{notice}"
    );
    assert_eq!(v.get(&host, "/hello").await.status, 200, "still served");

    // Log out; the writer logs in and disables it from the page.
    act(
        &mut b,
        "document.getElementById('key') !== null",
        "document.getElementById('logout').click()",
    )
    .await;
    browser_login(&mut b, &s.admin, &writer).await;
    b.goto(&format!("{}/dashboard/tunnels/dash-hub", s.admin))
        .await;
    act(
        &mut b,
        &format!(
            "({NOTICE} || '').startsWith('Disabled') && document.getElementById('enable') !== null"
        ),
        "document.getElementById('disable').click()",
    )
    .await;
    let (st, code) = answer_becomes(&v, &host, Duration::from_secs(5), |s| s == 403)
        .await
        .expect("403 within 5 s of the disable");
    assert_eq!((st, code.as_deref()), (403, Some("tunnel_disabled")));
    // Enabled from the page: the agent links again by itself and viewers are served.
    act(
        &mut b,
        &format!("({NOTICE} || '').startsWith('Enabled')"),
        "document.getElementById('enable').click()",
    )
    .await;
    answer_becomes(&v, &host, Duration::from_secs(45), |s| s == 200)
        .await
        .expect("served again after the enable");
}

/// A plain HTTP call: (status, headers, body).
async fn call(
    c: &HttpClient,
    method: &str,
    url: &str,
    cookies: &[&str],
    form: Option<String>,
) -> (u16, http::HeaderMap, String) {
    let mut req = http::Request::builder().method(method).uri(url);
    if !cookies.is_empty() {
        req = req.header("cookie", cookies.join("; "));
    }
    if form.is_some() {
        req = req.header("content-type", "application/x-www-form-urlencoded");
    }
    let r = c
        .request(
            req.body(Full::new(Bytes::from(form.unwrap_or_default())))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// The `name=value` of the cookie `name` a response sets, and its whole header.
fn set_cookie(h: &http::HeaderMap, name: &str) -> Option<(String, String)> {
    h.get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| (v.split(';').next().unwrap().to_string(), v.to_string()))
}

/// The hidden CSRF token in a page's form.
fn csrf_of(body: &str) -> String {
    let at = body
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    body[at..].split('"').next().unwrap().to_string()
}

fn form(fields: &[(&str, &str)]) -> String {
    let mut f = String::new();
    for (k, v) in fields {
        if !f.is_empty() {
            f.push('&');
        }
        f.push_str(k);
        f.push('=');
        f.extend(v.bytes().map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        }));
    }
    f
}

/// Loads the login form and posts `key` with its token: the answer.
async fn login(c: &HttpClient, base: &str, key: &str) -> (u16, http::HeaderMap, String) {
    let (st, h, body) = call(c, "GET", &format!("{base}/dashboard/login"), &[], None).await;
    assert_eq!(st, 200, "{body}");
    let (login_cookie, _) = set_cookie(&h, "netbore_dashboard_login").expect("a login cookie");
    let csrf = csrf_of(&body);
    call(
        c,
        "POST",
        &format!("{base}/dashboard/login"),
        &[&login_cookie],
        Some(form(&[("csrf", &csrf), ("key", key)])),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_names_what_is_wrong_and_a_revoked_keys_session_ends() {
    let (dash_port, admin_port) = (free_port(), free_port());
    let dash = format!("http://127.0.0.1:{dash_port}");
    let control = ControlProc::spawn(
        &[
            "--dashboard-addr",
            &format!("127.0.0.1:{dash_port}"),
            "--admin-addr",
            &format!("127.0.0.1:{admin_port}"),
        ],
        &[("NETBORE_BOOTSTRAP_TOKEN", BOOT)],
    );
    control.wait_ready().await;
    let c = netbore_testkit::json_client();
    let (reader, reader_id) = key(&control.url(), "ops", &["tunnels:read"]).await;
    let (writer_only, _) = key(&control.url(), "ops", &["tunnels:write"]).await;

    // The dashboard is on its own listener; the admin listener keeps /metrics only.
    let (st, h, _) = call(&c, "GET", &format!("{dash}/"), &[], None).await;
    assert_eq!((st, h["location"].to_str().unwrap()), (303, "/dashboard/"));
    let admin = format!("http://127.0.0.1:{admin_port}");
    assert_eq!(
        call(&c, "GET", &format!("{admin}/metrics"), &[], None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(&c, "GET", &format!("{admin}/dashboard/"), &[], None)
            .await
            .0,
        404
    );

    // No session: the login form.
    let (st, _, body) = call(&c, "GET", &format!("{dash}/dashboard/"), &[], None).await;
    assert_eq!(st, 401);
    assert!(body.contains("id=\"key\""), "{body}");

    // Wrong key, a key without tunnels:read, not a key at all: refused, each named.
    let (st, _, body) = login(&c, &dash, "nbk_this-is-not-a-key-control-issued").await;
    assert_eq!(st, 401);
    assert!(body.contains("not known to control"), "{body}");
    let (st, _, body) = login(&c, &dash, &writer_only).await;
    assert_eq!(st, 403);
    assert!(body.contains("lacks the tunnels:read scope"), "{body}");
    let (st, _, body) = login(&c, &dash, "eyJhbGciOi.not.akey").await;
    assert_eq!(st, 401);
    assert!(body.contains("start with nbk_"), "{body}");
    // A login form without its token (posted from elsewhere) is refused.
    let (st, _, body) = call(
        &c,
        "POST",
        &format!("{dash}/dashboard/login"),
        &[],
        Some(form(&[("key", &reader)])),
    )
    .await;
    assert_eq!(st, 403);
    assert!(body.contains("CSRF"), "{body}");
    // The login body has a byte limit.
    let big = form(&[("key", &"a".repeat(4096))]);
    let (st, _, body) = call(
        &c,
        "POST",
        &format!("{dash}/dashboard/login"),
        &[],
        Some(big),
    )
    .await;
    assert_eq!(st, 413);
    assert!(body.contains("larger than 1024 bytes"), "{body}");

    // The right key: a session cookie that holds no key, HttpOnly, SameSite=Strict,
    // not Secure over plain HTTP.
    let (st, h, _) = login(&c, &dash, &reader).await;
    assert_eq!((st, h["location"].to_str().unwrap()), (303, "/dashboard/"));
    let (session, whole) = set_cookie(&h, "netbore_dashboard").expect("a session cookie");
    assert!(whole.contains("HttpOnly"), "{whole}");
    assert!(whole.contains("SameSite=Strict"), "{whole}");
    assert!(!whole.contains("Secure"), "{whole}");
    assert!(
        !whole.contains("nbk_") && !whole.contains(&reader[4..]),
        "{whole}"
    );
    let (st, _, page) = call(&c, "GET", &format!("{dash}/dashboard/"), &[&session], None).await;
    assert_eq!(st, 200, "{page}");
    assert!(page.contains("<h1>Tunnels</h1>"), "{page}");
    assert!(!page.contains(&reader), "the page shows the key");
    let (st, _, _) = call(
        &c,
        "GET",
        &format!("{dash}/dashboard/edges"),
        &[&session],
        None,
    )
    .await;
    assert_eq!(st, 200);

    // A POST without the session's CSRF token is refused, even with the cookie.
    let (st, _, body) = call(
        &c,
        "POST",
        &format!("{dash}/dashboard/logout"),
        &[&session],
        Some(form(&[("csrf", "forged")])),
    )
    .await;
    assert_eq!(st, 403);
    assert!(body.contains("CSRF"), "{body}");
    // A forged cookie: the login page, saying the session is not valid.
    let (st, _, body) = call(
        &c,
        "GET",
        &format!("{dash}/dashboard/"),
        &["netbore_dashboard=forged"],
        None,
    )
    .await;
    assert_eq!(st, 401);
    assert!(body.contains("session is not valid"), "{body}");

    // Revoked over REST: the session stops working at its next request.
    let revoked = ControlClient::new(&control.url())
        .with_bearer(reader.clone())
        .revoke_api_key(&reader_id)
        .await
        .unwrap();
    assert!(revoked.revoked_at.is_some());
    let (st, _, body) = call(&c, "GET", &format!("{dash}/dashboard/"), &[&session], None).await;
    assert_eq!(st, 401);
    assert!(body.contains("was revoked"), "{body}");
    assert!(body.contains("id=\"key\""), "the login form again: {body}");

    // Log out ends a session.
    let (second, _) = key(&control.url(), "ops", &["tunnels:read"]).await;
    let (_, h, _) = login(&c, &dash, &second).await;
    let (session, _) = set_cookie(&h, "netbore_dashboard").unwrap();
    let (_, _, page) = call(&c, "GET", &format!("{dash}/dashboard/"), &[&session], None).await;
    let csrf = csrf_of(&page);
    let (st, h, _) = call(
        &c,
        "POST",
        &format!("{dash}/dashboard/logout"),
        &[&session],
        Some(form(&[("csrf", &csrf)])),
    )
    .await;
    assert_eq!(
        (st, h["location"].to_str().unwrap()),
        (303, "/dashboard/login")
    );
    let (st, _, _) = call(&c, "GET", &format!("{dash}/dashboard/"), &[&session], None).await;
    assert_eq!(st, 401);
}
