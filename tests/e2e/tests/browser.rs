//! Access policies in a real browser (headless Chromium): the portal link's redirect and
//! session cookie, and framing allowed only from the listed origin. `.ci/run` installs
//! Debian's `chromium`; without it these tests fail and say how to install it.

use std::convert::Infallible;
use std::process::Command;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{EncodingKey, Header};
use netbore_testkit::Stack;
use netbore_testkit::origin::Origin;
use netbore_tokens::Secret;
use netbore_tokens::access::{AccessPolicy, JwtPolicy};

const SECRET: &str = "portal-secret-that-is-at-least-32-bytes";

fn chromium() -> &'static str {
    for c in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if std::path::Path::new(c).exists() {
            return c;
        }
    }
    panic!("no Chromium found: install it (Debian: apt-get install chromium); .ci/run does")
}

/// The DOM of `url` after Chromium loaded it (and its frames) and ran its scripts.
async fn dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let url = url.to_string();
        let profile = profile.path().to_path_buf();
        move || {
            Command::new(chromium())
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--virtual-time-budget=5000",
                    "--timeout=20000",
                    &format!("--user-data-dir={}", profile.display()),
                    "--dump-dom",
                    &url,
                ])
                .output()
                .expect("chromium runs")
        }
    })
    .await
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tiny site on `l` serving `html` for every request (a portal page, or a page to
/// frame).
fn serve(l: tokio::net::TcpListener, html: String) {
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            let html = html.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let html = html.clone();
                    async move {
                        let mut r = hyper::Response::new(Full::new(Bytes::from(html)));
                        r.headers_mut()
                            .insert("content-type", "text/html; charset=utf-8".parse().unwrap());
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_follows_the_portal_link_and_rides_the_session_cookie() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let agent = stack
        .agent_with(&origin.url(), |c| {
            c.access = AccessPolicy {
                jwt: Some(JwtPolicy {
                    secret: Some(Secret::new(SECRET)),
                    ..JwtPolicy::default()
                }),
                ..AccessPolicy::default()
            };
        })
        .await;
    let base = format!(
        "http://{}:{}",
        agent.name.clone() + ".localhost",
        stack.public().port()
    );

    // Without a token the browser gets the edge's 401 page.
    let page = dom(&format!("{base}/hello")).await;
    assert!(page.contains("access_token_missing"), "{page}");
    assert!(origin.seen().is_empty());

    let token = jsonwebtoken::encode(
        &Header::default(),
        &serde_json::json!({"sub": "viewer@example.com", "exp": netbore_tokens::now_unix() + 600}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    // The link: redirected to /hello without the token; the second request carries
    // the cookie the browser was given, or the page would be a 401.
    let page = dom(&format!("{base}/hello?token={token}")).await;
    assert!(page.contains("hello from origin"), "{page}");
    // The browser may also ask for /favicon.ico, on the cookie too.
    let seen = origin.seen();
    let pages: Vec<_> = seen
        .iter()
        .filter(|s| s.target.starts_with("/hello"))
        .collect();
    assert_eq!(
        pages.len(),
        1,
        "only the redirected request reached the origin: {seen:?}"
    );
    assert_eq!(pages[0].target, "/hello");
    for s in &seen {
        assert!(
            !s.target.contains("token="),
            "no token reaches the origin: {s:?}"
        );
        assert_eq!(
            s.header("x-netbore-user"),
            Some("viewer@example.com"),
            "{s:?}"
        );
        assert!(
            s.header("cookie").is_none(),
            "the session cookie is not forwarded"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_renders_the_tunnel_in_a_frame_only_on_the_listed_portal() {
    let stack = Stack::start().await;
    // The tunnel's page tells whoever frames it that it loaded.
    let page = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let framed = page.local_addr().unwrap();
    serve(
        page,
        "<html><body>tunnel page<script>parent.postMessage('loaded', '*')</script></body></html>"
            .into(),
    );
    let portal = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let portal_port = portal.local_addr().unwrap().port();
    let agent = stack
        .agent_with(&format!("http://{framed}"), |c| {
            c.access = AccessPolicy {
                frame_ancestors: vec![format!("http://portal.localhost:{portal_port}")],
                ..AccessPolicy::default()
            };
        })
        .await;
    let tunnel_url = format!("http://{}.localhost:{}/", agent.name, stack.public().port());
    // One portal page for every host: it frames the tunnel and shows what it heard.
    serve(
        portal,
        format!(
            "<html><body><div id=\"r\">waiting</div><iframe src=\"{tunnel_url}\"></iframe><script>\
             window.addEventListener('message', e => {{ document.getElementById('r').textContent = 'framed:' + e.data; }});\
             </script></body></html>"
        ),
    );

    let listed = dom(&format!("http://portal.localhost:{portal_port}/")).await;
    assert!(
        listed.contains("framed:loaded"),
        "the listed portal frames the tunnel: {listed}"
    );
    let other = dom(&format!("http://evil.localhost:{portal_port}/")).await;
    assert!(
        other.contains("waiting") && !other.contains("framed:loaded"),
        "another origin cannot frame it: {other}"
    );
}
