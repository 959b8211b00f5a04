//! Control's and the agent's /metrics, scraped over HTTP from the real binaries before
//! and after known traffic: every counter moves by exactly what was sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use netbore_control::api::{CreateTunnelRequest, DeleteTunnelRequest, IssueTokenRequest};
use netbore_control::client::ControlClient;
use netbore_proto::control::v1 as pb;
use netbore_proto::control::v1::control_service_client::ControlServiceClient;
use netbore_testkit::origin::Origin;
use netbore_testkit::{
    ControlProc, EdgeProc, Proc, Viewer, eventually, free_port, http_get, parse_metrics,
};

type Metrics = HashMap<String, f64>;

/// An agent's metrics once its streams have ended: the viewer has its response before
/// the agent's stream task ends and lowers the in-flight gauge, so wait (bounded) for
/// the gauge to settle; the caller still asserts it reached 0.
async fn settled(addr: SocketAddr) -> Metrics {
    let mut m = scrape(addr).await;
    for _ in 0..50 {
        if m["netbore_agent_streams_in_flight"] == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        m = scrape(addr).await;
    }
    m
}

async fn scrape(addr: SocketAddr) -> Metrics {
    let (status, body) = eventually(Duration::from_secs(10), || http_get(addr, "/metrics"))
        .await
        .unwrap_or_else(|| panic!("no /metrics at {addr}"));
    assert_eq!(status, 200);
    parse_metrics(&body)
}

/// `after - before` for `series`, which must be on the page.
fn delta(before: &Metrics, after: &Metrics, series: &str) -> f64 {
    after
        .get(series)
        .copied()
        .unwrap_or_else(|| panic!("{series} missing from {after:#?}"))
        - before.get(series).copied().unwrap_or(0.0)
}

fn host_of(url_line: &str) -> String {
    let url = url_line.split_whitespace().next().unwrap();
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

fn agent(control: &ControlProc, target: &str, admin: u16) -> Proc {
    let control_url = format!("http://127.0.0.1:{}", control.rest);
    Proc::spawn(
        "netbore",
        &[
            "http",
            target,
            "--control",
            &control_url,
            "--connections",
            "1",
            "--admin-addr",
            &format!("127.0.0.1:{admin}"),
        ],
        &[("RUST_LOG", "warn")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_and_agent_counters_move_by_exactly_the_traffic_sent() {
    let control_admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let control = ControlProc::spawn(
        &["--admin-addr", &control_admin.to_string()],
        &[("NETBORE_BOOTSTRAP_TOKEN", "boot-credential")],
    );
    control.wait_ready().await;
    let edge = EdgeProc::spawn("edge-m", &control, None, &[]);
    let origin = Origin::start().await;
    let (good_admin, dead_admin) = (free_port(), free_port());
    let mut good = agent(&control, &origin.url(), good_admin);
    // An agent whose origin is down: nothing listens on this port.
    let dead_port = free_port().to_string();
    let mut dead = agent(&control, &dead_port, dead_admin);
    let good_host = host_of(&good.line(Duration::from_secs(60)).await);
    let dead_host = host_of(&dead.line(Duration::from_secs(60)).await);
    let good_admin: SocketAddr = ([127, 0, 0, 1], good_admin).into();
    let dead_admin: SocketAddr = ([127, 0, 0, 1], dead_admin).into();

    // Both agents are live, so control knows the edge and nothing else is in flight.
    let c0 = scrape(control_admin).await;
    let g0 = scrape(good_admin).await;
    let d0 = scrape(dead_admin).await;
    assert_eq!(g0["netbore_agent_links_up"], 1.0);

    // Control: two REST refusals, four REST successes, two gRPC calls.
    let base = format!("http://127.0.0.1:{}", control.rest);
    let rest = ControlClient::new(&base);
    let mgmt = rest
        .clone()
        .with_bearer("boot-credential")
        // Admin: the tunnel deleted below is anonymous, which only admin acts on.
        .issue_token(&IssueTokenRequest {
            scopes: Some(vec!["admin".into()]),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = rest
        .clone()
        .with_bearer("wrong")
        .issue_token(&IssueTokenRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.as_str()), Some("bad_credential"));
    let created = rest.create(&CreateTunnelRequest::default()).await.unwrap();
    rest.create(&CreateTunnelRequest {
        recreate_token: Some(created.recreate_token.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = rest
        .create(&CreateTunnelRequest {
            requested_name: Some("-no-".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.as_str()), Some("name_invalid"));
    rest.clone()
        .with_bearer(mgmt.token.clone())
        .delete(&DeleteTunnelRequest {
            tunnel_id: Some(created.tunnel_id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut grpc = ControlServiceClient::connect(format!("http://127.0.0.1:{}", control.grpc))
        .await
        .unwrap();
    let err = grpc
        .list_tunnels(pb::ListTunnelsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::ListTunnelsRequest::default());
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", mgmt.token).parse().unwrap(),
    );
    grpc.list_tunnels(req).await.unwrap();

    // Agents: three good requests, one the origin answers 404, two to a dead origin.
    let v = Viewer::new(([127, 0, 0, 1], edge.public).into());
    for _ in 0..3 {
        assert_eq!(v.get(&good_host, "/hello").await.status, 200);
    }
    assert_eq!(v.get(&good_host, "/no-such-page").await.status, 404);
    for _ in 0..2 {
        assert_eq!(v.get(&dead_host, "/").await.status, 502);
    }

    let c1 = scrape(control_admin).await;
    let d = |s: &str| delta(&c0, &c1, s);
    assert_eq!(
        d("netbore_control_tokens_issued_total{kind=\"management\"}"),
        1.0
    );
    assert_eq!(
        d("netbore_control_tokens_issued_total{kind=\"ephemeral\"}"),
        2.0
    );
    assert_eq!(
        d("netbore_control_tokens_issued_total{kind=\"recreate\"}"),
        2.0
    );
    assert_eq!(
        d("netbore_control_tunnels_created_total{kind=\"new\"}"),
        1.0
    );
    assert_eq!(
        d("netbore_control_tunnels_created_total{kind=\"recreate\"}"),
        1.0
    );
    assert_eq!(d("netbore_control_tunnels_deleted_total"), 1.0);
    assert_eq!(
        d("netbore_control_refusals_total{op=\"issue_token\",code=\"bad_credential\"}"),
        1.0
    );
    assert_eq!(
        d("netbore_control_refusals_total{op=\"create_tunnel\",code=\"name_invalid\"}"),
        1.0
    );
    assert_eq!(d("netbore_control_rest_requests_total{class=\"2xx\"}"), 4.0);
    assert_eq!(d("netbore_control_rest_requests_total{class=\"4xx\"}"), 2.0);
    assert_eq!(d("netbore_control_rest_requests_total{class=\"5xx\"}"), 0.0);
    assert_eq!(d("netbore_control_grpc_requests_total{code=\"OK\"}"), 1.0);
    assert_eq!(
        d("netbore_control_grpc_requests_total{code=\"UNAUTHENTICATED\"}"),
        1.0
    );
    // The two agents' creations happened before the first scrape.
    assert_eq!(
        c0["netbore_control_tunnels_created_total{kind=\"new\"}"],
        2.0
    );

    let g1 = settled(good_admin).await;
    let g = |s: &str| delta(&g0, &g1, s);
    assert_eq!(g("netbore_agent_streams_total"), 4.0);
    assert_eq!(
        g("netbore_agent_origin_responses_total{class=\"2xx\"}"),
        3.0
    );
    assert_eq!(
        g("netbore_agent_origin_responses_total{class=\"4xx\"}"),
        1.0
    );
    assert_eq!(
        g("netbore_agent_origin_errors_total{kind=\"unreachable\"}"),
        0.0
    );
    assert_eq!(g("netbore_agent_reconnects_total"), 0.0);
    assert_eq!(g1["netbore_agent_links_up"], 1.0);
    assert_eq!(g1["netbore_agent_streams_in_flight"], 0.0);

    let d1 = settled(dead_admin).await;
    let dd = |s: &str| delta(&d0, &d1, s);
    assert_eq!(dd("netbore_agent_streams_total"), 2.0);
    assert_eq!(
        dd("netbore_agent_origin_errors_total{kind=\"unreachable\"}"),
        2.0
    );
    assert_eq!(
        dd("netbore_agent_origin_responses_total{class=\"2xx\"}"),
        0.0
    );
    assert_eq!(d1["netbore_agent_streams_in_flight"], 0.0);
}

#[tokio::test]
async fn a_lost_edge_counts_one_reconnect_at_the_agent() {
    let control = ControlProc::spawn(&[], &[]);
    control.wait_ready().await;
    let mut edge = EdgeProc::spawn("edge-r", &control, None, &[]);
    let origin = Origin::start().await;
    let admin = free_port();
    let mut a = agent(&control, &origin.url(), admin);
    a.line(Duration::from_secs(60)).await;
    let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
    let m0 = scrape(admin).await;
    assert_eq!(m0["netbore_agent_reconnects_total"], 0.0);

    // The edge dies and comes back on the same ports: the agent links again, once.
    edge.proc.kill().await;
    let public = edge.public;
    let respawned = {
        let (agents, adm) = (edge.agents, edge.admin);
        netbore_testkit::Proc::spawn(
            "netbore-edge",
            &[
                "--edge-id",
                "edge-r",
                "--public-addr",
                &format!("127.0.0.1:{public}"),
                "--agent-addr",
                &format!("127.0.0.1:{agents}"),
                "--admin-addr",
                &format!("127.0.0.1:{adm}"),
                "--control-url",
                &format!("http://127.0.0.1:{}", control.rest),
                "--control-grpc",
                &format!("http://127.0.0.1:{}", control.grpc),
            ],
            &[("RUST_LOG", "warn")],
        )
    };
    let relinked = eventually(Duration::from_secs(60), || async {
        let m = scrape(admin).await;
        (m["netbore_agent_links_up"] == 1.0 && m["netbore_agent_reconnects_total"] >= 1.0)
            .then_some(m)
    })
    .await
    .expect("the agent links to the restarted edge within 60 s");
    assert_eq!(relinked["netbore_agent_reconnects_total"], 1.0);
    drop(respawned);
}

/// `GET /metrics` on `addr`: status, Content-Type and body.
async fn scrape_raw(addr: SocketAddr) -> (u16, String, String) {
    scrape_accept(addr, None).await
}

/// `GET /metrics` on `addr` with `accept` as the `Accept` header: status, Content-Type
/// and body.
async fn scrape_accept(addr: SocketAddr, accept: Option<&str>) -> (u16, String, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get("/metrics").header("host", "metrics");
    if let Some(a) = accept {
        req = req.header(http::header::ACCEPT, a);
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, ct, String::from_utf8(body.to_vec()).unwrap())
}

/// Issue 18 item 7: all three `/metrics` pages say what they are (Prometheus 3 refuses a
/// scrape without a Content-Type it knows), carry `netbore_build_info`, and the edge's
/// byte counter does not fall when the agent that carried the bytes disconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metrics_page_is_typed_and_the_edge_byte_counter_survives_a_disconnect() {
    let control_admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let control = ControlProc::spawn(&["--admin-addr", &control_admin.to_string()], &[]);
    control.wait_ready().await;
    let edge = EdgeProc::spawn("edge-t", &control, None, &[]);
    let edge_admin: SocketAddr = ([127, 0, 0, 1], edge.admin).into();
    let origin = Origin::start().await;
    let agent_admin = free_port();
    let mut a = agent(&control, &origin.url(), agent_admin);
    let host = host_of(&a.line(Duration::from_secs(60)).await);
    let agent_admin: SocketAddr = ([127, 0, 0, 1], agent_admin).into();

    for (what, addr, component) in [
        ("control", control_admin, "control"),
        ("edge", edge_admin, "edge"),
        ("agent", agent_admin, "agent"),
    ] {
        let (status, ct, body) = eventually(Duration::from_secs(10), || async {
            Some(scrape_raw(addr).await)
        })
        .await
        .unwrap();
        assert_eq!(status, 200, "{what}");
        assert_eq!(
            ct, "text/plain; version=0.0.4; charset=utf-8",
            "{what}'s /metrics Content-Type"
        );
        assert!(
            body.contains(&format!(
                "netbore_build_info{{component=\"{component}\",version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{what}: {body}"
        );
    }

    // Bytes through the tunnel, then the agent leaves: the counter keeps them.
    let v = Viewer::new(([127, 0, 0, 1], edge.public).into());
    for _ in 0..5 {
        assert_eq!(v.get(&host, "/bytes/65536").await.status, 200);
    }
    let before = scrape(edge_admin).await;
    let out_before = before["netbore_edge_tunnel_bytes_total{direction=\"out\"}"]
        + before["netbore_edge_tunnel_bytes_total{direction=\"in\"}"];
    assert!(out_before >= 5.0 * 65536.0, "{before:?}");
    a.signal("KILL");
    let mut after = scrape(edge_admin).await;
    for _ in 0..100 {
        if after["netbore_edge_agent_connections"] == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = scrape(edge_admin).await;
    }
    assert_eq!(after["netbore_edge_agent_connections"], 0.0, "{after:?}");
    let out_after = after["netbore_edge_tunnel_bytes_total{direction=\"out\"}"]
        + after["netbore_edge_tunnel_bytes_total{direction=\"in\"}"];
    assert!(
        out_after >= out_before,
        "the byte counter fell from {out_before} to {out_after} when the agent left"
    );
}

/// What Prometheus 3 sends by default (`scrape_protocols`, text formats only).
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1";

/// Parses a page with the Prometheus project's own Python parsers (PyPI
/// `prometheus-client`, installed by scripts/test.sh): `openmetrics` is the strict
/// OpenMetrics parser, anything else the classic text parser. Prints the families as JSON.
const PARSE_PY: &str = r#"
import json, sys
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({"name": f.name, "type": f.type,
                "samples": [[s.name, sorted(s.labels.items()), s.value] for s in f.samples]})
json.dump(out, sys.stdout)
"#;

/// One parsed family: name and type as the parser saw them.
#[derive(Debug, Clone)]
struct Family {
    name: String,
    kind: String,
    /// `name{k="v",...}` -> value.
    samples: Vec<(String, f64)>,
}

/// `page` parsed by the real parser for `format` (`classic` or `openmetrics`); the test
/// fails with the parser's own message if the page does not parse.
fn parse_with_prometheus(page: &str, format: &str, what: &str) -> Vec<Family> {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args(["-c", PARSE_PY, format])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("No module named 'prometheus_client'"),
        "the Python package prometheus-client is missing: run scripts/test.sh, or pip install prometheus-client"
    );
    assert!(
        out.status.success(),
        "{what}'s {format} page does not parse: {err}\n{page}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| Family {
            name: f["name"].as_str().unwrap().to_string(),
            kind: f["type"].as_str().unwrap().to_string(),
            samples: f["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    let labels: Vec<String> = s[1]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|kv| {
                            format!(
                                "{}=\"{}\"",
                                kv[0].as_str().unwrap(),
                                kv[1].as_str().unwrap()
                            )
                        })
                        .collect();
                    let key = if labels.is_empty() {
                        s[0].as_str().unwrap().to_string()
                    } else {
                        format!("{}{{{}}}", s[0].as_str().unwrap(), labels.join(","))
                    };
                    (key, s[2].as_f64().unwrap())
                })
                .collect(),
        })
        .collect()
}

/// Scrapes `addr` in both formats, checks each one's Content-Type and that both parse,
/// carry the same series and the `process_*` and build-info families; returns the
/// counter samples of the classic page.
async fn scrape_both(what: &str, addr: SocketAddr) -> HashMap<String, f64> {
    let (status, ct, classic) = scrape_accept(addr, None).await;
    assert_eq!(status, 200, "{what}");
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8", "{what}");
    let (status, ct, om) = scrape_accept(addr, Some(PROMETHEUS_ACCEPT)).await;
    assert_eq!(status, 200, "{what}");
    assert_eq!(
        ct, "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "{what}: Prometheus asked for OpenMetrics first"
    );
    assert!(om.ends_with("# EOF\n"), "{what}: {om}");
    assert!(!classic.contains("# EOF"), "{what}: {classic}");
    let c = parse_with_prometheus(&classic, "classic", what);
    let o = parse_with_prometheus(&om, "openmetrics", what);

    // Every family typed: a TYPE line that does not name its samples leaves them untyped.
    for f in &c {
        assert!(
            ["counter", "gauge", "histogram"].contains(&f.kind.as_str()),
            "{what}: classic family {} is {}",
            f.name,
            f.kind
        );
    }
    let kind = |fams: &[Family], name: &str| {
        fams.iter()
            .find(|f| f.name == name)
            .map(|f| f.kind.clone())
            .unwrap_or_else(|| panic!("{what}: {name} missing from {fams:#?}"))
    };
    for (name, k) in [
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert_eq!(kind(&c, name), k, "{what}: {name} (classic)");
        assert_eq!(kind(&o, name), k, "{what}: {name} (OpenMetrics)");
    }
    assert_eq!(kind(&c, "netbore_build_info"), "gauge", "{what}");
    assert_eq!(kind(&o, "netbore_build"), "info", "{what}");
    let rss = c
        .iter()
        .find(|f| f.name == "process_resident_memory_bytes")
        .unwrap()
        .samples[0]
        .1;
    assert!(rss > 1e6, "{what}: resident memory {rss} bytes");
    // jemalloc's view of the heap: live allocations within the pages holding them,
    // within all the resident pages it maps (an upper bound, so not held to RSS).
    let heap = |name: &str| {
        assert_eq!(kind(&c, name), "gauge", "{what}: {name}");
        c.iter().find(|f| f.name == name).unwrap().samples[0].1
    };
    let allocated = heap("netbore_heap_allocated_bytes");
    let active = heap("netbore_heap_active_bytes");
    let resident = heap("netbore_heap_resident_bytes");
    assert!(heap("netbore_heap_metadata_bytes") > 0.0, "{what}");
    assert!(
        allocated > 1e5 && allocated <= active && active <= resident,
        "{what}: heap allocated {allocated}, active {active}, resident {resident}"
    );

    // The same series in both formats, with the same names and labels.
    let keys = |fams: &[Family]| {
        let mut k: Vec<String> = fams
            .iter()
            .flat_map(|f| f.samples.iter().map(|(s, _)| s.clone()))
            .collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&c),
        keys(&o),
        "{what}: the two formats carry different series"
    );

    c.iter()
        .filter(|f| f.kind == "counter")
        .flat_map(|f| f.samples.clone())
        .collect()
}

/// Every counter sample of `before` is on `after` and not lower.
fn no_counter_fell(what: &str, before: &HashMap<String, f64>, after: &HashMap<String, f64>) {
    for (k, v) in before {
        let now = after
            .get(k)
            .unwrap_or_else(|| panic!("{what}: counter {k} vanished"));
        assert!(now >= v, "{what}: counter {k} fell from {v} to {now}");
    }
}

/// Issue 18 item 7: all three /metrics pages parse with Prometheus's own parsers in both
/// formats (OpenMetrics when the scraper asks for it, as Prometheus does), carry the
/// `process_*` families, and no counter falls when an agent reconnects (the agent's own
/// and control's, across an edge restart) or leaves (the edge's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_three_pages_parse_in_both_formats_and_counters_never_fall() {
    let control_admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let control = ControlProc::spawn(&["--admin-addr", &control_admin.to_string()], &[]);
    control.wait_ready().await;
    let mut edge = EdgeProc::spawn("edge-p", &control, None, &[]);
    let origin = Origin::start().await;
    let agent_admin_port = free_port();
    let mut a = agent(&control, &origin.url(), agent_admin_port);
    let host = host_of(&a.line(Duration::from_secs(60)).await);
    let agent_admin: SocketAddr = ([127, 0, 0, 1], agent_admin_port).into();
    let edge_admin: SocketAddr = ([127, 0, 0, 1], edge.admin).into();
    let v = Viewer::new(([127, 0, 0, 1], edge.public).into());
    for _ in 0..3 {
        assert_eq!(v.get(&host, "/bytes/4096").await.status, 200);
    }

    let control_before = scrape_both("control", control_admin).await;
    let agent_before = scrape_both("agent", agent_admin).await;
    scrape_both("edge", edge_admin).await;
    assert!(
        agent_before["netbore_agent_streams_total"] >= 3.0,
        "{agent_before:?}"
    );

    // The edge dies and comes back on the same ports: the agent reconnects.
    edge.proc.kill().await;
    let (public, agents, adm) = (edge.public, edge.agents, edge.admin);
    let _respawned = Proc::spawn(
        "netbore-edge",
        &[
            "--edge-id",
            "edge-p",
            "--public-addr",
            &format!("127.0.0.1:{public}"),
            "--agent-addr",
            &format!("127.0.0.1:{agents}"),
            "--admin-addr",
            &format!("127.0.0.1:{adm}"),
            "--control-url",
            &format!("http://127.0.0.1:{}", control.rest),
            "--control-grpc",
            &format!("http://127.0.0.1:{}", control.grpc),
        ],
        &[("RUST_LOG", "warn")],
    );
    eventually(Duration::from_secs(60), || async {
        let m = scrape(agent_admin).await;
        (m["netbore_agent_links_up"] == 1.0 && m["netbore_agent_reconnects_total"] >= 1.0)
            .then_some(())
    })
    .await
    .expect("the agent links to the restarted edge within 60 s");
    eventually(Duration::from_secs(30), || async {
        (v.get(&host, "/bytes/4096").await.status == 200).then_some(())
    })
    .await
    .expect("the tunnel serves again through the restarted edge");
    let agent_after = scrape_both("agent", agent_admin).await;
    no_counter_fell("agent", &agent_before, &agent_after);
    assert!(
        agent_after["netbore_agent_reconnects_total"]
            > agent_before["netbore_agent_reconnects_total"],
        "{agent_after:?}"
    );
    no_counter_fell(
        "control",
        &control_before,
        &scrape_both("control", control_admin).await,
    );

    // The agent leaves: the edge's counters, its byte counter included, keep their counts.
    let edge_before = scrape_both("edge", edge_admin).await;
    assert!(
        edge_before["netbore_edge_tunnel_bytes_total{direction=\"in\"}"] >= 4096.0,
        "{edge_before:?}"
    );
    a.signal("KILL");
    eventually(Duration::from_secs(10), || async {
        (scrape(edge_admin).await["netbore_edge_agent_connections"] == 0.0).then_some(())
    })
    .await
    .expect("the edge sees the agent leave within 10 s");
    let edge_after = scrape_both("edge", edge_admin).await;
    no_counter_fell("edge", &edge_before, &edge_after);
    assert!(
        edge_after["netbore_edge_agent_disconnects_total"]
            > edge_before["netbore_edge_agent_disconnects_total"],
        "{edge_after:?}"
    );
}
