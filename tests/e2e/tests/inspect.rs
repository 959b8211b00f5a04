//! Seeing the traffic with a real `netbore http`: its console (plain lines when not on a
//! terminal, a named cause for an origin whose certificate is refused), its inspector's
//! JSON API and page (in a real headless Chromium driven over the DevTools protocol),
//! replay and edited replay, redaction, and what capture costs in memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use netbore_testkit::browser::Browser;
use netbore_testkit::origin::Origin;
use netbore_testkit::{Proc, Stack, Viewer, collect, empty, free_port, full};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

fn host_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// A `netbore http` with `--json`, its inspector on a free port: the process, the
/// inspector's URL, and the tunnel's host.
async fn json_agent(
    stack: &Stack,
    origin: &str,
    state: &std::path::Path,
    extra: &[&str],
) -> (Proc, String, String) {
    let control = stack.control_url();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "http",
        origin,
        "--control",
        &control,
        "--state-dir",
        state.to_str().unwrap(),
        "--json",
        "--inspect-addr",
        &addr,
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn("netbore", &args, &[("RUST_LOG", "warn")]);
    let mut inspector = None;
    // Bounded: an agent that only ever reports `reconnecting` fails the test in 2 min.
    let deadline = Instant::now() + Duration::from_secs(120);
    let host = loop {
        assert!(
            Instant::now() < deadline,
            "the agent did not go live within 120 s"
        );
        let v: Value = serde_json::from_str(&p.line(WAIT).await).unwrap();
        match v["event"].as_str() {
            Some("inspector") => inspector = Some(v["url"].as_str().unwrap().to_string()),
            Some("live") => break host_of(v["url"].as_str().unwrap()),
            _ => {}
        }
    };
    let inspector =
        inspector.expect("the inspector's address is printed before the tunnel is live");
    assert_eq!(inspector, format!("http://{addr}"));
    (p, inspector, host)
}

/// An HTTP call to the inspector: (status, JSON body).
async fn api(method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut req = hyper::Request::builder().method(method).uri(url);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Polls the inspector's list until `pick` finds an entry.
async fn wait_entry(inspector: &str, pick: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, list) = api("GET", &format!("{inspector}/api/requests"), None).await;
        if let Some(e) = list["requests"]
            .as_array()
            .and_then(|a| a.iter().find(|e| pick(e)))
            && e["state"] != "in_progress"
        {
            return e.clone();
        }
        assert!(Instant::now() < deadline, "no such request in {list}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request through the tunnel carrying a bearer token and a token query parameter.
async fn send_secret_post(stack: &Stack, host: &str, path: &str, body: &str) -> String {
    let v = Viewer::new(stack.public());
    let mut req = v.request("POST", host, path, full(body.to_string()));
    req.headers_mut()
        .insert("authorization", "Bearer s3cret-header".parse().unwrap());
    req.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    let got = collect(v.send(req).await).await;
    assert_eq!(got.status, 200, "{}", got.text());
    got.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_shows_what_the_origin_got_redacts_secrets_and_replays_with_edits() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let (_agent, ins, host) = json_agent(&stack, &origin.url(), state.path(), &[]).await;

    let echoed = send_secret_post(
        &stack,
        &host,
        "/echo?token=s3cret-query&x=1",
        r#"{"order":42}"#,
    )
    .await;
    assert_eq!(echoed, r#"{"order":42}"#);
    let e = wait_entry(&ins, |e| e["path"].as_str().unwrap().starts_with("/echo")).await;
    assert_eq!(e["path"], "/echo?token=[redacted]&x=1");
    assert_eq!(e["status"], 200);
    let id = e["id"].as_u64().unwrap();

    let (status, d) = api("GET", &format!("{ins}/api/requests/{id}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(d["request"]["body"]["kind"], "json");
    assert_eq!(d["request"]["body"]["text"], "{\n  \"order\": 42\n}");
    assert_eq!(d["response"]["body"]["size"], 12);
    let shown = d.to_string();
    assert!(!shown.contains("s3cret"), "a secret is shown: {shown}");
    assert!(shown.contains("Bearer [redacted]"), "{shown}");

    // Replay as is: the origin gets the original, secrets included; a new entry.
    let before = origin.seen().len();
    let (status, r) = api(
        "POST",
        &format!("{ins}/api/requests/{id}/replay"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["replay_of"], id);
    assert_eq!(r["status"], 200);
    assert_eq!(r["response"]["body"]["text"], r#"{"order":42}"#);
    let seen = origin.seen();
    assert_eq!(seen.len(), before + 1);
    let last = seen.last().unwrap();
    assert_eq!(last.target, "/echo?token=s3cret-query&x=1");
    assert_eq!(last.header("authorization"), Some("Bearer s3cret-header"));

    // Edited: the edit reaches the origin; a redacted value sent back keeps the original.
    let (status, r) = api(
        "POST",
        &format!("{ins}/api/requests/{id}/replay"),
        Some(json!({
            "method": "PUT",
            "path": "/echo?token=[redacted]&edited=1",
            "headers": [["authorization", "Bearer [redacted]"], ["content-type", "application/json"], ["x-edit", "yes"]],
            "body": "{\"order\":43}",
        })),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["response"]["body"]["text"], r#"{"order":43}"#);
    let last = origin.seen().last().unwrap().clone();
    assert_eq!(last.method, "PUT");
    assert_eq!(last.target, "/echo?token=s3cret-query&edited=1");
    assert_eq!(last.header("x-edit"), Some("yes"));
    assert_eq!(last.header("authorization"), Some("Bearer s3cret-header"));

    // Bad input: named, JSON, and the inspector keeps serving.
    let (status, r) = api("GET", &format!("{ins}/api/requests/999999"), None).await;
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (404, Some("no_such_request"))
    );
    let (status, r) = api(
        "POST",
        &format!("{ins}/api/requests/{id}/replay"),
        Some(json!({"verb": "GET"})),
    )
    .await;
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (400, Some("bad_edit")),
        "{r}"
    );
    let (status, list) = api("GET", &format!("{ins}/api/requests?method=PUT"), None).await;
    assert_eq!(status, 200);
    assert_eq!(list["requests"].as_array().unwrap().len(), 1, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_show_only_with_inspect_show_secrets_and_no_inspect_serves_nothing() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let (_agent, ins, host) = json_agent(
        &stack,
        &origin.url(),
        state.path(),
        &["--inspect-show-secrets"],
    )
    .await;
    send_secret_post(&stack, &host, "/echo?token=s3cret-query", "{}").await;
    let e = wait_entry(&ins, |e| e["path"].as_str().unwrap().starts_with("/echo")).await;
    assert_eq!(e["path"], "/echo?token=s3cret-query");
    let (_, d) = api("GET", &format!("{ins}/api/requests/{}", e["id"]), None).await;
    assert!(d.to_string().contains("Bearer s3cret-header"), "{d}");

    // --no-inspect: nothing listens where the inspector would.
    let addr = format!("127.0.0.1:{}", free_port());
    let control = stack.control_url();
    let state2 = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(
        "netbore",
        &[
            "http",
            &origin.url(),
            "--control",
            &control,
            "--state-dir",
            state2.path().to_str().unwrap(),
            "--json",
            "--no-inspect",
            "--inspect-addr",
            &addr,
        ],
        &[("RUST_LOG", "warn")],
    );
    let v: Value = serde_json::from_str(&p.line(WAIT).await).unwrap();
    assert_eq!(
        v["event"], "live",
        "no inspector event with --no-inspect: {v}"
    );
    assert!(tokio::net::TcpStream::connect(&addr).await.is_err());
}

/// An https origin with a self-signed certificate (as in origin_tls.rs).
async fn self_signed_origin() -> String {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let chain = vec![CertificateDer::from(ck.cert.der().to_vec())];
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"secure")),
                    ))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    format!("https://localhost:{port}")
}

/// A text-mode `netbore http` (stdout a pipe): the first line and the process.
async fn text_agent(stack: &Stack, origin: &str, state: &std::path::Path) -> (Proc, String) {
    let control = stack.control_url();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut p = Proc::spawn(
        "netbore",
        &[
            "http",
            origin,
            "--control",
            &control,
            "--state-dir",
            state.to_str().unwrap(),
            "--inspect-addr",
            &addr,
        ],
        &[("RUST_LOG", "off")],
    );
    let first = p.line(WAIT).await;
    assert!(first.contains(" -> "), "the URL line comes first: {first}");
    (p, host_of(first.split_whitespace().next().unwrap()))
}

/// Lines the agent prints within `within` after the last one.
async fn lines_for(p: &mut Proc, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(WAIT, p.stdout.recv()).await {
            Ok(Some(l)) => out.push(l),
            _ => break,
        }
    }
    // Anything else printed soon after (there should be nothing).
    while let Ok(Some(l)) = tokio::time::timeout(Duration::from_millis(500), p.stdout.recv()).await
    {
        out.push(l);
    }
    out
}

/// The three requests whose console lines the console tests look for: a GET, a POST
/// with a body, and a GET with a token in its query (shown redacted).
async fn three_requests(v: &Viewer, host: &str) {
    assert_eq!(v.get(host, "/hello").await.status, 200);
    let echoed = collect(
        v.send(v.request("POST", host, "/echo", full("12345")))
            .await,
    )
    .await;
    assert_eq!(echoed.status, 200);
    assert_eq!(v.get(host, "/bytes/2048?token=abcdef").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_console_prints_a_line_per_request_and_names_a_refused_certificate() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let (mut good, host) = text_agent(&stack, &origin.url(), state.path()).await;
    let v = Viewer::new(stack.public());
    three_requests(&v, &host).await;
    let lines = lines_for(&mut good, 3).await;
    assert_eq!(lines.len(), 3, "one line per request: {lines:#?}");
    assert!(
        lines[0].contains("GET") && lines[0].contains("/hello 200 "),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("POST")
            && lines[1].contains("/echo 200 ")
            && lines[1].contains("in 5 B out 5 B"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains("/bytes/2048?token=[redacted] 200") && lines[2].contains("out 2.0 KiB"),
        "{}",
        lines[2]
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("abcdef") || l.contains('\x1b')),
        "{lines:#?}"
    );

    let bad_origin = self_signed_origin().await;
    let state = tempfile::tempdir().unwrap();
    let (mut bad, host) = text_agent(&stack, &bad_origin, state.path()).await;
    for _ in 0..3 {
        assert_eq!(v.get(&host, "/").await.status, 502);
    }
    let lines = lines_for(&mut bad, 4).await;
    let causes: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("origin error:"))
        .collect();
    assert_eq!(
        causes.len(),
        1,
        "the cause once, not per request: {lines:#?}"
    );
    let c = causes[0];
    assert!(
        c.contains("certificate refused") && c.contains("unknown authority"),
        "{c}"
    );
    assert!(
        c.contains("--origin-ca") && c.contains("--origin-insecure"),
        "{c}"
    );
    let requests = lines.iter().filter(|l| l.contains(" GET ")).count();
    assert_eq!(requests, 3, "{lines:#?}");
}

/// Resident set of a process, bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_keeps_its_caps_through_a_256_mib_upload_and_download() {
    const SIZE: u64 = 256 << 20;
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let (agent, ins, host) = json_agent(&stack, &origin.url(), state.path(), &[]).await;
    let pid = agent.child.id().unwrap();
    let v = Viewer::new(stack.public());
    // Warm: pools and buffers exist before the baseline.
    assert_eq!(v.get(&host, "/bytes/1048576").await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = rss(pid);
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(base));
    let sampling = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(rss(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    // Upload: a streamed body of SIZE bytes to the sink.
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>(4);
    let body =
        http_body_util::StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|f| (f, rx))
        }));
    let req = v.request("POST", &host, "/sink", http_body_util::BodyExt::boxed(body));
    let sender = tokio::spawn(async move {
        let chunk = bytes::Bytes::from(vec![7u8; 1 << 20]);
        for _ in 0..(SIZE >> 20) {
            if tx
                .send(Ok(http_body::Frame::data(chunk.clone())))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let up = collect(v.send(req).await).await;
    sender.await.unwrap();
    assert_eq!(up.status, 200, "{}", up.text());

    // Download: SIZE bytes, read as they come.
    let resp = v
        .send(v.request("GET", &host, &format!("/bytes/{SIZE}"), empty()))
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(f) = http_body_util::BodyExt::frame(&mut body).await {
        got += f.unwrap().into_data().map(|d| d.len() as u64).unwrap_or(0);
    }
    assert_eq!(got, SIZE);
    sampling.abort();
    let grew = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(base);

    // Both were seen whole, and kept only up to the cap.
    let up = wait_entry(&ins, |e| e["path"] == "/sink").await;
    assert_eq!(up["bytes_in"], SIZE);
    let down = wait_entry(&ins, |e| e["path"] == format!("/bytes/{SIZE}")).await;
    assert_eq!(down["bytes_out"], SIZE);
    assert_eq!(down["streamed"], true);
    let (_, d) = api("GET", &format!("{ins}/api/requests/{}", down["id"]), None).await;
    assert_eq!(d["response"]["body"]["captured"], 1 << 20);
    assert_eq!(d["response"]["body"]["truncated"], true);
    // The body cap (1 MiB per body, two bodies) plus 16 MiB.
    let limit = (2 << 20) + (16 << 20);
    eprintln!(
        "agent RSS grew by {} KiB (limit {} KiB)",
        grew / 1024,
        limit / 1024
    );
    assert!(
        grew < limit,
        "agent RSS grew by {grew} bytes, more than {limit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_chromium_requests_appear_live_show_their_bodies_and_replay() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let (_agent, ins, host) = json_agent(&stack, &origin.url(), state.path(), &[]).await;
    let mut b = Browser::launch().await;
    b.goto(&format!("{ins}/")).await;
    b.wait(
        "document.getElementById('live') && document.getElementById('live').textContent === 'live'",
    )
    .await;
    // Set on this page load: still there later means the page never reloaded.
    b.eval("window.__sameLoad = true").await;

    let v = Viewer::new(stack.public());
    assert_eq!(v.get(&host, "/hello").await.status, 200);
    send_secret_post(
        &stack,
        &host,
        "/echo?token=s3cret-query&x=1",
        r#"{"order":42,"items":["tea"]}"#,
    )
    .await;
    b.wait("[...document.querySelectorAll('td.path')].some(td => td.textContent.startsWith('/echo?token=[redacted]&x=1'))").await;
    assert_eq!(
        b.eval("window.__sameLoad === true").await,
        json!(true),
        "the page reloaded"
    );
    assert_eq!(
        b.eval("document.querySelectorAll('tr.row').length").await,
        json!(2)
    );

    // The detail shows the body the origin received (and echoed), pretty-printed.
    b.eval("[...document.querySelectorAll('tr.row')].find(tr => tr.textContent.includes('/echo')).click()").await;
    let req_body = b
        .wait("document.getElementById('request-body') && document.getElementById('request-body').innerText")
        .await;
    assert!(
        req_body.as_str().unwrap().contains("\"order\": 42"),
        "{req_body}"
    );
    let resp_body = b
        .eval("document.getElementById('response-body').innerText")
        .await;
    assert!(
        resp_body
            .as_str()
            .unwrap()
            .contains(r#"{"order":42,"items":["tea"]}"#),
        "{resp_body}"
    );
    let detail = b.eval("document.getElementById('detail').innerText").await;
    let detail = detail.as_str().unwrap();
    assert!(detail.contains("Bearer [redacted]"), "{detail}");
    assert!(detail.contains("token=[redacted]"), "{detail}");
    assert!(!detail.contains("s3cret"), "a secret shows: {detail}");
    b.screenshot("inspector-detail.png").await;

    // Replay: a new entry, marked as a replay, with the origin's answer.
    let seen = origin.seen().len();
    b.eval("document.getElementById('replay').click()").await;
    b.wait("[...document.querySelectorAll('tr.row')].some(tr => tr.textContent.includes('replay of #'))").await;
    b.wait("document.querySelector('#detail .meta') && document.querySelector('#detail .meta').textContent.includes('replay of #') && document.getElementById('response-body')").await;
    let replayed = b
        .eval("document.getElementById('response-body').innerText")
        .await;
    assert!(
        replayed
            .as_str()
            .unwrap()
            .contains(r#"{"order":42,"items":["tea"]}"#),
        "{replayed}"
    );
    assert_eq!(
        origin.seen().len(),
        seen + 1,
        "the replay reached the origin"
    );

    // Edit and replay: the edit reaches the origin.
    let orig = b
        .eval("(() => { const tr = [...document.querySelectorAll('tr.row')].find(tr => tr.textContent.includes('/echo') && !tr.textContent.includes('replay of')); tr.click(); return Number(tr.dataset.id); })()")
        .await;
    // The detail of that request, not the one shown before.
    b.wait(&format!("document.querySelector('#detail .meta') && document.querySelector('#detail .meta').textContent.startsWith('#{orig} ')")).await;
    b.eval(
        "document.getElementById('edit').click();
         document.getElementById('edit-body').value = '{\"order\":43}';
         document.getElementById('edit-path').value = '/echo?edited=yes';
         document.getElementById('send-edit').click(); true",
    )
    .await;
    b.wait("document.getElementById('response-body') && document.getElementById('response-body').innerText.includes('{\"order\":43}')").await;
    let last = origin.seen().last().unwrap().clone();
    assert_eq!(last.target, "/echo?edited=yes");
    assert_eq!(last.header("authorization"), Some("Bearer s3cret-header"));
    let meta = b
        .eval("document.querySelector('#detail .meta').textContent")
        .await;
    assert!(
        meta.as_str()
            .unwrap()
            .contains(&format!("replay of #{orig}")),
        "{meta}"
    );
    assert_eq!(
        b.eval("document.querySelectorAll('tr.row').length").await,
        json!(4)
    );
    b.screenshot("inspector-replay.png").await;
}

/// Waits for the viewer's side of a WebSocket close handshake to end (bounded).
async fn close_ws(ws: &mut netbore_testkit::Ws) {
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done here".into(),
    }))
    .await
    .unwrap();
    let closed = tokio::time::timeout(WAIT, async {
        while let Some(m) = ws.next().await {
            if matches!(m, Ok(Message::Close(_)) | Err(_)) {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the close handshake completes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_session_shows_its_messages_each_way_in_the_api_and_the_page() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let (_agent, ins, host) = json_agent(&stack, &origin.url(), state.path(), &[]).await;

    // A real WebSocket through the edge and the tunnel to the origin's echo.
    let (mut ws, status) = netbore_testkit::websocket(stack.public(), &host, "/ws", &[])
        .await
        .expect("upgrade through the tunnel");
    assert_eq!(status, 101);
    let sent = ["first message", "zweite Nachricht ✓", "third"];
    for m in sent {
        ws.send(Message::text(m)).await.unwrap();
        let echo = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the echo within the limit")
            .unwrap()
            .unwrap();
        assert_eq!(echo, Message::text(m), "the relayed bytes are intact");
    }
    // A binary message, to show as its size and hex.
    ws.send(Message::binary(vec![0u8, 1, 2, 0xfe, 0xff]))
        .await
        .unwrap();
    let echo = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert_eq!(
        echo.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 0xfe, 0xff])
    );
    close_ws(&mut ws).await;
    drop(ws);

    let e = wait_entry(&ins, |e| e["path"] == "/ws").await;
    assert_eq!(
        (e["status"].as_u64(), e["websocket"].as_bool()),
        (Some(101), Some(true))
    );
    let id = e["id"].as_u64().unwrap();
    let (status, d) = api("GET", &format!("{ins}/api/requests/{id}"), None).await;
    assert_eq!(status, 200, "{d}");
    let s = &d["websocket_session"];
    assert_eq!(s["capture_stopped"], Value::Null, "{s}");
    for (dir, who) in [("to_origin", "viewer"), ("from_origin", "origin")] {
        let x = &s[dir];
        assert_eq!(x["messages"], 4, "{who} sent 3 texts and 1 binary: {x}");
        let texts: Vec<&str> = x["first"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["text"].as_str())
            .collect();
        assert_eq!(texts, sent, "{who}'s messages, in order: {x}");
        let bin = &x["first"][3];
        assert_eq!(
            (bin["kind"].as_str(), bin["size"].as_u64()),
            (Some("binary"), Some(5))
        );
        assert!(
            bin["hex"].as_str().unwrap().contains("00 01 02 fe ff"),
            "{bin}"
        );
        let payload: usize = sent.iter().map(|m| m.len()).sum::<usize>() + 5;
        assert_eq!(x["payload_bytes"], payload as u64, "{x}");
        // Frames carry headers (and the viewer's masks): more on the wire than in messages.
        assert!(x["bytes"].as_u64().unwrap() > payload as u64, "{x}");
    }
    assert_eq!(
        s["to_origin"]["close"],
        json!({"code": 1000, "reason": "done here"}),
        "the viewer's close"
    );
    assert_eq!(
        s["from_origin"]["close"]["code"], 1000,
        "the origin's reply"
    );
    assert!(s["duration_ms"].is_u64(), "{s}");

    // The page's detail view shows the same.
    let mut b = Browser::launch().await;
    b.goto(&format!("{ins}/")).await;
    b.wait("document.querySelectorAll('tr.row').length > 0")
        .await;
    b.eval(&format!(
        "document.querySelector('tr.row[data-id=\"{id}\"]').click()"
    ))
    .await;
    let up = b
        .wait("document.getElementById('ws-to_origin') && document.getElementById('ws-to_origin').innerText")
        .await;
    let up = up.as_str().unwrap();
    assert!(up.contains("4 messages"), "{up}");
    for m in sent {
        assert!(up.contains(m), "{m} not shown: {up}");
    }
    assert!(up.contains("closed 1000 (done here)"), "{up}");
    let down = b
        .eval("document.getElementById('ws-from_origin').innerText")
        .await;
    let down = down.as_str().unwrap();
    assert!(
        down.contains("zweite Nachricht ✓") && down.contains("00 01 02 fe ff"),
        "{down}"
    );
    b.eval("document.getElementById('websocket').scrollIntoView(); true")
        .await;
    b.screenshot("inspector-websocket.png").await;
}

/// A `netbore http` whose stdout and stderr are a pseudo-terminal, as when a user runs
/// it in a terminal; the test reads what the terminal would show.
struct TtyAgent {
    _child: tokio::process::Child,
    chunks: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    /// Everything the agent wrote so far, escape codes and all.
    screen: String,
}

impl TtyAgent {
    fn spawn(
        stack: &Stack,
        origin: &str,
        state: &std::path::Path,
        env: &[(&str, &str)],
    ) -> TtyAgent {
        use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
        use std::os::unix::fs::OpenOptionsExt;
        let master =
            openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let terminal = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
            .open(name.to_str().unwrap())
            .unwrap();
        let control = stack.control_url();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = tokio::process::Command::new(netbore_testkit::bin_path("netbore"));
        cmd.args([
            "http",
            origin,
            "--control",
            &control,
            "--state-dir",
            state.to_str().unwrap(),
            "--inspect-addr",
            &addr,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(terminal.try_clone().unwrap())
        .stderr(terminal)
        // As a user's shell would have it: no log filter, no NO_COLOR unless given.
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .envs(env.iter().copied())
        .kill_on_drop(true);
        // The command holds the only copies of the terminal side: once the agent exits,
        // reading the controlling side ends.
        let child = cmd.spawn().expect("netbore starts");
        drop(cmd);
        let (tx, chunks) = tokio::sync::mpsc::unbounded_channel();
        let mut master = std::fs::File::from(master);
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            // Ends when the agent is gone (EIO) or the test is (send fails).
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        TtyAgent {
            _child: child,
            chunks,
            screen: String::new(),
        }
    }

    /// Reads until `done` holds for the output so far; panics after [`WAIT`].
    async fn until(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(&self.screen) {
            match tokio::time::timeout_at(deadline, self.chunks.recv()).await {
                Ok(Some(c)) => self.screen.push_str(&String::from_utf8_lossy(&c)),
                Ok(None) => panic!("the agent exited before {what}: {:?}", self.screen),
                Err(_) => panic!("no {what} within {WAIT:?}: {:?}", self.screen),
            }
        }
    }
}

/// The output with escape sequences removed, as lines.
fn plain_lines(raw: &str) -> Vec<String> {
    let mut out = String::new();
    let mut it = raw.chars();
    while let Some(c) = it.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        // CSI: parameters, then a final byte in @..~; ESC 7 and ESC 8 (save and
        // restore the cursor) are the next character alone.
        if it.next() == Some('[') {
            for c in it.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out.split(['\r', '\n'])
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The colour (SGR) sequences in the output: `ESC [ … m`.
fn colour_codes(raw: &str) -> Vec<String> {
    raw.match_indices("\x1b[")
        .filter_map(|(i, _)| {
            let rest = &raw[i + 2..];
            let end = rest.find(|c: char| ('@'..='~').contains(&c))?;
            (rest.as_bytes()[end] == b'm').then(|| format!("ESC[{}", &rest[..=end]))
        })
        .collect()
}

/// The public URL the status block shows, once it shows one.
fn block_url(raw: &str) -> Option<String> {
    plain_lines(raw)
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("  URL        "))
        .filter(|u| u.starts_with("http"))
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_the_console_draws_a_coloured_status_block_and_a_line_per_request() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    for no_color in [false, true] {
        let state = tempfile::tempdir().unwrap();
        let env: &[(&str, &str)] = if no_color { &[("NO_COLOR", "1")] } else { &[] };
        let mut tty = TtyAgent::spawn(&stack, &origin.url(), state.path(), env);
        tty.until("the public URL in the status block", |s| {
            block_url(s).is_some()
        })
        .await;
        let url = block_url(&tty.screen).unwrap();
        let host = host_of(&url);
        let v = Viewer::new(stack.public());
        three_requests(&v, &host).await;
        tty.until("a line per request and a redrawn rate", |s| {
            let lines = plain_lines(s);
            lines
                .iter()
                .any(|l| l.contains("/bytes/2048?token=[redacted] 200"))
                && lines
                    .iter()
                    .any(|l| l.starts_with("  Requests   ") && !l.ends_with(" 0.0/s"))
                && lines.iter().any(|l| l.contains("(answering)"))
        })
        .await;
        let raw = tty.screen.clone();
        let lines = plain_lines(&raw);

        // The status block, at the top of a cleared screen above a scroll region.
        assert!(raw.contains("\x1b[2J\x1b[8;r"), "{raw:?}");
        let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
        assert!(has("netbore"), "{lines:#?}");
        assert!(has(&format!("  URL        {url}")), "{lines:#?}");
        assert!(
            has(&format!(
                "  Origin     {}/  (answering)",
                origin.url().trim_end_matches('/')
            )),
            "{lines:#?}"
        );
        assert!(has("  Links      1: "), "{lines:#?}");
        assert!(has("  Inspector  http://127.0.0.1:"), "{lines:#?}");
        assert!(has("  Requests   "), "{lines:#?}");

        // One line per request, each printed once.
        for (what, count) in [
            ("GET     /hello 200 ", 1),
            ("POST    /echo 200 ", 1),
            ("GET     /bytes/2048?token=[redacted] 200 ", 1),
        ] {
            let n = lines.iter().filter(|l| l.contains(what)).count();
            assert_eq!(n, count, "{what:?} printed {n} times: {lines:#?}");
        }
        assert!(
            lines
                .iter()
                .any(|l| l.contains("/echo 200 ") && l.contains("in 5 B out 5 B")),
            "{lines:#?}"
        );
        assert!(!raw.contains("abcdef"), "a secret shows: {raw:?}");
        // Nothing but the block and the request lines: no log lines on the console.
        let stray: Vec<&String> = lines
            .iter()
            .filter(|l| {
                !(l.starts_with("netbore")
                    || l.starts_with("  ")
                    || l.starts_with('─')
                    || l.as_bytes().get(2) == Some(&b':') && l.as_bytes().get(5) == Some(&b':'))
            })
            .collect();
        assert!(stray.is_empty(), "stray output on the console: {stray:#?}");

        let colours = colour_codes(&raw);
        if no_color {
            assert!(
                colours.is_empty(),
                "colour codes with NO_COLOR=1: {colours:?}"
            );
        } else {
            assert!(raw.contains("\x1b[1mnetbore\x1b[0m"), "{raw:?}");
            assert!(raw.contains("(\x1b[32manswering\x1b[0m)"), "{raw:?}");
            assert!(raw.contains("/hello \x1b[32m200\x1b[0m "), "{raw:?}");
        }
    }
}
