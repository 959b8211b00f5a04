//! Strangers on the public port: every case sends raw bytes, then checks the status, that
//! the connection closed where it must, what reached the origin (its raw bytes), and
//! that an honest viewer on another connection is still served.

use std::time::Duration;

use netbore_testkit::origin::RawOrigin;
use netbore_testkit::{InProcAgent, Stack, Viewer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Env {
    stack: Stack,
    origin: RawOrigin,
    agent: InProcAgent,
}

async fn env() -> Env {
    let stack = Stack::start_with_edge(|c| {
        c.header_read_timeout = Duration::from_millis(800);
        c.body_idle_timeout = Duration::from_millis(800);
        c.max_body_bytes = 1024 * 1024;
    })
    .await;
    let origin = RawOrigin::start().await;
    let agent = stack.agent(&origin.url()).await;
    Env {
        stack,
        origin,
        agent,
    }
}

/// What a raw exchange produced.
struct Raw {
    response: String,
    closed: bool,
}

impl Raw {
    fn status(&self) -> u16 {
        self.response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

async fn raw(env: &Env, bytes: &[u8]) -> Raw {
    raw_to(env, bytes, Duration::from_secs(3)).await
}

async fn raw_to(env: &Env, bytes: &[u8], wait: Duration) -> Raw {
    let mut s = tokio::net::TcpStream::connect(env.stack.public())
        .await
        .unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    Raw {
        response: String::from_utf8_lossy(&out).into_owned(),
        closed,
    }
}

fn req(env: &Env, head_rest: &str) -> Vec<u8> {
    head_rest.replace("HOST", &env.agent.host()).into_bytes()
}

async fn honest_still_served(env: &Env) {
    let r = Viewer::new(env.stack.public())
        .get(&env.agent.host(), "/honest")
        .await;
    assert_eq!(r.status, 200, "an honest viewer is still served");
}

async fn refused(env: &Env, bytes: Vec<u8>, status: u16, code: Option<&str>) {
    let r = raw(env, &bytes).await;
    assert_eq!(r.status(), status, "response: {}", r.response);
    if let Some(c) = code {
        assert!(
            r.response.contains(&format!("netbore-error: {c}")),
            "{}",
            r.response
        );
    }
    assert!(r.closed, "the connection must close after {status}");
    honest_still_served(env).await;
}

fn origin_saw_no(env: &Env, needle: &str) {
    let got = env.origin.received();
    assert!(
        !got.contains(needle),
        "the origin received {needle:?}:\n{got}"
    );
}

#[tokio::test]
async fn cl_te_smuggling_is_refused_and_never_forwarded() {
    let e = env().await;
    let b = req(
        &e,
        "POST / HTTP/1.1\r\nHost: HOST\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: HOST\r\n\r\n",
    );
    refused(&e, b, 400, Some("ambiguous_length")).await;
    origin_saw_no(&e, "smuggled");
    origin_saw_no(&e, "POST /");
}

#[tokio::test]
async fn te_cl_smuggling_is_refused_and_never_forwarded() {
    let e = env().await;
    let b = req(
        &e,
        "POST / HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGET /smuggled HTTP/1.1\r\nHost: HOST\r\n\r\n0\r\n\r\n",
    );
    refused(&e, b, 400, Some("ambiguous_length")).await;
    origin_saw_no(&e, "smuggled");
}

#[tokio::test]
async fn te_te_odd_spellings_are_refused() {
    let e = env().await;
    for te in [
        "Transfer-Encoding: xchunked",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
        "Transfer-Encoding: chunked, identity",
        "Transfer-Encoding: gzip",
    ] {
        let b = req(
            &e,
            &format!(
                "POST / HTTP/1.1\r\nHost: HOST\r\n{te}\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: HOST\r\n\r\n"
            ),
        );
        let r = raw(&e, &b).await;
        assert!(matches!(r.status(), 400 | 501), "{te}: {}", r.response);
        assert!(r.closed, "{te}: connection must close");
    }
    origin_saw_no(&e, "smuggled");
    origin_saw_no(&e, "POST /");
    honest_still_served(&e).await;
}

#[tokio::test]
async fn duplicate_content_length_is_refused() {
    let e = env().await;
    let b = req(
        &e,
        "POST / HTTP/1.1\r\nHost: HOST\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
    );
    let r = raw(&e, &b).await;
    assert_eq!(r.status(), 400, "{}", r.response);
    assert!(r.closed);
    // Identical duplicates are just as ambiguous to some parsers: refused too.
    let b = req(
        &e,
        "POST / HTTP/1.1\r\nHost: HOST\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    );
    refused(&e, b, 400, None).await;
    origin_saw_no(&e, "POST /");
}

#[tokio::test]
async fn chunk_size_overflow_is_refused() {
    let e = env().await;
    let b = req(
        &e,
        "POST / HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nx\r\n0\r\n\r\n",
    );
    let r = raw(&e, &b).await;
    // hyper refuses the chunk size; the request may have reached the origin as a head
    // with a body that then failed, never as a complete request with a bogus body.
    assert!(
        r.status() == 400 || r.status() == 0 || r.status() >= 500,
        "{}",
        r.response
    );
    assert!(r.closed);
    honest_still_served(&e).await;
}

#[tokio::test]
async fn obsolete_line_folding_is_refused() {
    let e = env().await;
    let b = req(
        &e,
        "GET /folded HTTP/1.1\r\nHost: HOST\r\nX-A: 1\r\n  continued\r\n\r\n",
    );
    refused(&e, b, 400, None).await;
    origin_saw_no(&e, "/folded");
}

#[tokio::test]
async fn missing_host_is_refused() {
    let e = env().await;
    refused(
        &e,
        b"GET /x HTTP/1.1\r\n\r\n".to_vec(),
        400,
        Some("missing_host"),
    )
    .await;
}

#[tokio::test]
async fn duplicate_host_is_refused() {
    let e = env().await;
    let b = req(
        &e,
        "GET /dup HTTP/1.1\r\nHost: HOST\r\nHost: other.localhost\r\n\r\n",
    );
    refused(&e, b, 400, Some("duplicate_host")).await;
    origin_saw_no(&e, "/dup");
}

#[tokio::test]
async fn host_with_userinfo_is_refused() {
    let e = env().await;
    let b = req(&e, "GET /ui HTTP/1.1\r\nHost: evil@HOST\r\n\r\n");
    let r = raw(&e, &b).await;
    assert_eq!(r.status(), 400, "{}", r.response);
    origin_saw_no(&e, "/ui");
    honest_still_served(&e).await;
}

#[tokio::test]
async fn trailing_dot_and_uppercase_hosts_route_to_the_tunnel() {
    let e = env().await;
    let host = e.agent.host();
    let (name, port) = host.split_once(':').unwrap();
    for h in [
        format!("{name}.:{port}"),
        format!("{}:{port}", name.to_uppercase()),
    ] {
        let b = format!("GET /case HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n");
        let r = raw(&e, b.as_bytes()).await;
        assert_eq!(r.status(), 200, "{h}: {}", r.response);
    }
}

#[tokio::test]
async fn absolute_form_target_disagreeing_with_host_is_refused() {
    let e = env().await;
    let b = req(
        &e,
        "GET http://other.localhost/abs HTTP/1.1\r\nHost: HOST\r\n\r\n",
    );
    refused(&e, b, 400, Some("host_mismatch")).await;
    origin_saw_no(&e, "/abs");
    // Agreeing absolute form is fine.
    let b = format!(
        "GET http://{}/abs-ok HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        e.agent.host(),
        e.agent.host()
    );
    assert_eq!(raw(&e, b.as_bytes()).await.status(), 200);
}

#[tokio::test]
async fn a_name_that_extends_another_does_not_route_to_it() {
    let e = env().await;
    let host = e.agent.host();
    let (name, port) = host.split_once(':').unwrap();
    for h in [
        format!("{name}x.localhost:{port}"),
        format!("x{name}.localhost:{port}"),
        format!("a.{name}.localhost:{port}"),
    ] {
        let b = format!("GET /ext HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n");
        assert_eq!(raw(&e, b.as_bytes()).await.status(), 404, "{h}");
    }
    origin_saw_no(&e, "/ext");
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let e = env().await;
    let big = "a".repeat(70 * 1024);
    let b = req(
        &e,
        &format!("GET /big HTTP/1.1\r\nHost: HOST\r\nX-Big: {big}\r\n\r\n"),
    );
    let r = raw(&e, &b).await;
    assert_eq!(
        r.status(),
        431,
        "{}",
        &r.response[..r.response.len().min(200)]
    );
    assert!(r.closed);
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let b = req(
        &e,
        &format!("GET /many HTTP/1.1\r\nHost: HOST\r\n{many}\r\n"),
    );
    let r = raw(&e, &b).await;
    assert_eq!(r.status(), 431, "{}", r.response);
    origin_saw_no(&e, "/big");
    origin_saw_no(&e, "/many");
    honest_still_served(&e).await;
}

#[tokio::test]
async fn an_overlong_url_gets_414() {
    let e = env().await;
    let b = req(
        &e,
        &format!("GET /{} HTTP/1.1\r\nHost: HOST\r\n\r\n", "u".repeat(9000)),
    );
    refused(&e, b, 414, Some("url_too_long")).await;
    origin_saw_no(&e, "uuuu");
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let e = env().await;
    // Declared too large: refused before anything is forwarded.
    let b = req(
        &e,
        "POST /declared HTTP/1.1\r\nHost: HOST\r\nContent-Length: 2000000\r\n\r\n",
    );
    refused(&e, b, 413, Some("body_too_large")).await;
    origin_saw_no(&e, "/declared");
    // Chunked past the limit: the stream is cut and the viewer told why. (An origin
    // that reads the whole body first, so its answer cannot race the refusal.)
    let sink = netbore_testkit::origin::Origin::start().await;
    let sink_agent = e.stack.agent(&sink.url()).await;
    let mut b = format!(
        "POST /sink HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        sink_agent.host()
    )
    .into_bytes();
    for _ in 0..40 {
        b.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
        b.extend(std::iter::repeat_n(b'z', 64 * 1024));
        b.extend_from_slice(b"\r\n");
    }
    let r = raw(&e, &b).await;
    assert_eq!(
        r.status(),
        413,
        "{}",
        &r.response[..r.response.len().min(300)]
    );
    assert!(r.closed);
    honest_still_served(&e).await;
}

#[tokio::test]
async fn slowloris_headers_are_cut_off() {
    let e = env().await;
    let mut s = tokio::net::TcpStream::connect(e.stack.public())
        .await
        .unwrap();
    s.write_all(format!("GET /slow HTTP/1.1\r\nHost: {}\r\n", e.agent.host()).as_bytes())
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    // Trickle a header byte now and then, never finishing the head.
    let mut closed = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(5), s.read(&mut buf)).await {
            closed = n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408");
            if closed {
                break;
            }
        }
    }
    assert!(
        closed,
        "a head still unfinished after {:?} is cut off",
        started.elapsed()
    );
    origin_saw_no(&e, "/slow");
    honest_still_served(&e).await;
}

#[tokio::test]
async fn a_stalled_body_gets_408_and_closes() {
    let e = env().await;
    // An origin that reads the whole body before answering (the raw one answers at once).
    let sink = netbore_testkit::origin::Origin::start().await;
    let sink_agent = e.stack.agent(&sink.url()).await;
    let b = format!(
        "POST /sink HTTP/1.1\r\nHost: {}\r\nContent-Length: 100\r\n\r\n0123456789",
        sink_agent.host()
    );
    let r = raw_to(&e, b.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(r.status(), 408, "{}", r.response);
    assert!(r.response.contains("body_timeout"), "{}", r.response);
    assert!(r.closed);
    honest_still_served(&e).await;
}

#[tokio::test]
async fn hop_by_hop_injection_cannot_strip_the_edges_headers() {
    let e = env().await;
    let b = req(
        &e,
        "GET /hop HTTP/1.1\r\nHost: HOST\r\nConnection: close, X-Netbore-Client-IP, X-Forwarded-For\r\nX-Netbore-Client-IP: 6.6.6.6\r\nKeep-Alive: 5\r\n\r\n",
    );
    let r = raw(&e, &b).await;
    assert_eq!(r.status(), 200, "{}", r.response);
    let got = e.origin.received();
    let head = &got[got.find("GET /hop").expect("forwarded")..];
    let head = &head[..head.find("\r\n\r\n").unwrap()].to_ascii_lowercase();
    assert!(head.contains("x-netbore-client-ip: 127.0.0.1"), "{head}");
    assert!(head.contains("x-forwarded-for: 127.0.0.1"), "{head}");
    assert!(!head.contains("6.6.6.6"), "{head}");
    assert!(!head.contains("keep-alive"), "{head}");
}

#[tokio::test]
async fn spoofed_forwarded_for_is_replaced_unless_from_a_trusted_proxy() {
    let e = env().await;
    let b = req(
        &e,
        "GET /spoof HTTP/1.1\r\nHost: HOST\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nForwarded: for=1.2.3.4\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(raw(&e, &b).await.status(), 200);
    let got = e.origin.received().to_ascii_lowercase();
    assert!(!got.contains("1.2.3.4"), "{got}");
    assert!(got.contains("x-forwarded-proto: http\r\n"), "{got}");

    // Behind a trusted load balancer (127.0.0.1 here), its chain is kept and the viewer
    // is the rightmost untrusted address.
    let stack =
        Stack::start_with_edge(|c| c.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()]).await;
    let origin = RawOrigin::start().await;
    let agent = stack.agent(&origin.url()).await;
    let mut s = tokio::net::TcpStream::connect(stack.public())
        .await
        .unwrap();
    s.write_all(format!("GET /lb HTTP/1.1\r\nHost: {}\r\nX-Forwarded-For: 9.9.9.9, 1.2.3.4\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n", agent.host()).as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut out)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let got = origin.received().to_ascii_lowercase();
    assert!(
        got.contains("x-forwarded-for: 9.9.9.9, 1.2.3.4, 127.0.0.1"),
        "{got}"
    );
    assert!(got.contains("x-netbore-client-ip: 1.2.3.4"), "{got}");
    assert!(got.contains("x-forwarded-proto: https"), "{got}");
}

/// HTTP/2 frame helpers for the frame-level attacks.
fn h2_frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    let len = payload.len() as u32;
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(ty);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HPACK literal header without indexing, new name (0x00), short strings only.
fn hpack_literal(name: &str, value: &str) -> Vec<u8> {
    let mut v = vec![0x00, name.len() as u8];
    v.extend_from_slice(name.as_bytes());
    v.push(value.len() as u8);
    v.extend_from_slice(value.as_bytes());
    v
}

/// Reads frames until a GOAWAY arrives or the connection closes; true if either.
async fn goaway_or_close(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        let mut i = 0;
        while buf.len() >= i + 9 {
            let len = u32::from_be_bytes([0, buf[i], buf[i + 1], buf[i + 2]]) as usize;
            if buf[i + 3] == 0x7 {
                return true;
            }
            if buf.len() < i + 9 + len {
                break;
            }
            i += 9 + len;
        }
    }
}

#[tokio::test]
async fn h2_continuation_flood_is_cut_off() {
    let e = env().await;
    let mut s = tokio::net::TcpStream::connect(e.stack.public())
        .await
        .unwrap();
    let mut out = PREFACE.to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    // HEADERS without END_HEADERS, then endless CONTINUATION.
    let mut block = vec![0x82, 0x86, 0x84]; // :method GET, :scheme http, :path /
    block.extend(hpack_literal(":authority", &e.agent.host()));
    out.extend(h2_frame(0x1, 0x1, 1, &block));
    s.write_all(&out).await.unwrap();
    let filler = hpack_literal("x-flood", &"f".repeat(200));
    let mut cut = false;
    for _ in 0..2000 {
        if s.write_all(&h2_frame(0x9, 0, 1, &filler)).await.is_err() {
            cut = true;
            break;
        }
    }
    assert!(
        cut || goaway_or_close(&mut s, Duration::from_secs(5)).await,
        "the flood must be cut off"
    );
    honest_still_served(&e).await;
}

#[tokio::test]
async fn h2_rapid_reset_is_cut_off() {
    let e = env().await;
    let mut s = tokio::net::TcpStream::connect(e.stack.public())
        .await
        .unwrap();
    let mut out = PREFACE.to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    let mut block = vec![0x82, 0x86, 0x84];
    block.extend(hpack_literal(":authority", &e.agent.host()));
    // Open a stream and reset it at once, thousands of times.
    let mut cut = false;
    s.write_all(&out).await.unwrap();
    for i in 0..5000u32 {
        let id = 1 + 2 * i;
        let mut burst = h2_frame(0x1, 0x5, id, &block);
        burst.extend(h2_frame(0x3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
        if s.write_all(&burst).await.is_err() {
            cut = true;
            break;
        }
    }
    let closed = cut || goaway_or_close(&mut s, Duration::from_secs(5)).await;
    assert!(
        closed,
        "a rapid-reset flood must end in GOAWAY or a closed connection"
    );
    honest_still_served(&e).await;
}
