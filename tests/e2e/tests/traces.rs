//! Traces across the real binaries: a viewer's `traceparent` is continued by the edge,
//! then by the agent, and reaches the origin; spans go to an OTLP/gRPC receiver and the
//! last ones are flushed when the processes stop.

use std::time::Duration;

use netbore_testkit::origin::Origin;
use netbore_testkit::otlp::{Collector, ReceivedSpan};
use netbore_testkit::redis::RedisServer;
use netbore_testkit::{ControlProc, EdgeProc, Proc, Viewer, empty, eventually};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn host_of(url_line: &str) -> String {
    let url = url_line.split_whitespace().next().unwrap();
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

fn traceparent_parts(v: &str) -> (String, String) {
    let p: Vec<&str> = v.split('-').collect();
    assert_eq!(p.len(), 4, "traceparent '{v}'");
    (p[1].to_string(), p[2].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_shows_the_edge_and_the_agent_and_reaches_the_origin() {
    let collector = Collector::start().await;
    let otel = collector.url();
    // A long batch delay: the spans can only arrive through the flush on shutdown.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otel.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ("RUST_LOG", "warn"),
    ];
    let control = ControlProc::spawn(&[], &[]);
    control.wait_ready().await;
    let mut edge = EdgeProc::spawn_env("edge-t", &control, None, &[], &env);
    let origin = Origin::start().await;
    let target = origin.url();
    let control_url = format!("http://127.0.0.1:{}", control.rest);
    let mut agent = Proc::spawn(
        "netbore",
        &[
            "http",
            &target,
            "--control",
            &control_url,
            "--connections",
            "1",
        ],
        &env,
    );
    let host = host_of(&agent.line(Duration::from_secs(60)).await);
    let v = Viewer::new(([127, 0, 0, 1], edge.public).into());

    // A request that carries a trace context, with a secret in its query string.
    let mut req = v.request("GET", &host, "/hello?token=s3cret-value", empty());
    req.headers_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    req.headers_mut()
        .insert("tracestate", "vendor=opaque".parse().unwrap());
    let r = netbore_testkit::collect(v.send(req).await).await;
    assert_eq!(r.status, 200);
    // And one without: the edge starts a trace.
    assert_eq!(v.get(&host, "/hello").await.status, 200);

    let seen = origin.seen();
    let traced = seen
        .iter()
        .find(|s| s.target.contains("token="))
        .unwrap_or_else(|| panic!("the origin got the traced request: {seen:#?}"));
    let (origin_trace, origin_parent) = traceparent_parts(
        traced
            .header("traceparent")
            .expect("the origin receives a traceparent"),
    );
    assert_eq!(
        origin_trace, TRACE,
        "the origin's request is in the viewer's trace"
    );
    assert_eq!(traced.header("tracestate"), Some("vendor=opaque"));
    let untraced = seen
        .iter()
        .find(|s| s.target == "/hello")
        .unwrap_or_else(|| panic!("the origin got the untraced request: {seen:#?}"));
    let (new_trace, _) = traceparent_parts(untraced.header("traceparent").unwrap());
    assert_ne!(new_trace, TRACE);

    // Stop both: their spans are flushed on the way out.
    assert!(
        collector.spans().is_empty(),
        "nothing exported before shutdown"
    );
    agent.signal("TERM");
    edge.proc.signal("TERM");
    for p in [&mut agent.child, &mut edge.proc.child] {
        let st = tokio::time::timeout(Duration::from_secs(20), p.wait())
            .await
            .expect("exits within 20 s")
            .unwrap();
        assert!(st.success(), "{st}");
    }
    let spans = collector.spans();
    let find = |service: &str, trace: &str| -> ReceivedSpan {
        spans
            .iter()
            .find(|s| s.service == service && s.trace_id == trace)
            .unwrap_or_else(|| panic!("no {service} span in trace {trace}: {spans:#?}"))
            .clone()
    };
    let edge_span = find("netbore-edge", TRACE);
    assert_eq!(edge_span.name, "edge proxy");
    assert_eq!(
        edge_span.parent_span_id, CALLER_SPAN,
        "the edge's span is a child of the viewer's"
    );
    assert_eq!(edge_span.attr("http.response.status_code"), Some("200"));
    assert_eq!(edge_span.attr("url.path"), Some("/hello"));
    let agent_span = find("netbore", TRACE);
    assert_eq!(agent_span.name, "agent forward");
    assert_eq!(
        agent_span.parent_span_id, edge_span.span_id,
        "the agent's span is a child of the edge's"
    );
    assert_eq!(
        origin_parent, agent_span.span_id,
        "the origin's traceparent names the agent's span"
    );

    let new_edge = find("netbore-edge", &new_trace);
    assert!(
        new_edge.parent_span_id.is_empty(),
        "a new trace starts at the edge: {new_edge:#?}"
    );
    let new_agent = find("netbore", &new_trace);
    assert_eq!(new_agent.parent_span_id, new_edge.span_id);

    for s in &spans {
        for (k, v) in &s.attributes {
            assert!(
                !v.contains("s3cret"),
                "query string leaked into {} attribute {k}",
                s.name
            );
        }
    }
}

#[tokio::test]
async fn an_unusable_collector_url_stops_the_edge_with_the_fix() {
    let mut edge = Proc::spawn_logs(
        "netbore-edge",
        &[
            "--public-addr",
            "127.0.0.1:0",
            "--agent-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--control-grpc",
            "",
        ],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317")],
    );
    let st = tokio::time::timeout(Duration::from_secs(10), edge.child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(!st.success());
    let mut said = String::new();
    while let Ok(Some(l)) = tokio::time::timeout(Duration::from_secs(2), edge.stdout.recv()).await {
        said.push_str(&l);
        said.push('\n');
    }
    assert!(
        said.contains("OTEL_EXPORTER_OTLP_ENDPOINT") && said.contains("http://HOST:4317"),
        "the error names the variable and the fix: {said}"
    );
}

#[tokio::test]
async fn without_a_collector_the_viewers_traceparent_reaches_the_origin_untouched() {
    // The in-process stack installs no trace exporter.
    let stack = netbore_testkit::Stack::start().await;
    let origin = Origin::start().await;
    let agent = stack.agent(&origin.url()).await;
    let v = Viewer::new(stack.public());
    let sent = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let mut req = v.request("GET", &agent.host(), "/hello", empty());
    req.headers_mut()
        .insert("traceparent", sent.parse().unwrap());
    assert_eq!(v.send(req).await.status(), 200);
    let seen = origin.seen();
    assert_eq!(seen[0].header("traceparent"), Some(sent.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_forwarded_between_edges_stays_one_trace() {
    let collector = Collector::start().await;
    let otel = collector.url();
    let redis = RedisServer::start();
    let control = ControlProc::spawn(&[], &[]);
    control.wait_ready().await;
    let edge = |id: &'static str| {
        EdgeProc::spawn_env(
            id,
            &control,
            Some(&redis.url()),
            &["--registry-refresh-secs", "1"],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", otel.as_str()),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
                // Told apart in the collector by their service names.
                ("OTEL_SERVICE_NAME", id),
            ],
        )
    };
    let edges = [edge("edge-a"), edge("edge-b")];
    let origin = Origin::start().await;
    let control_url = format!("http://127.0.0.1:{}", control.rest);
    let mut agent = Proc::spawn(
        "netbore",
        &[
            "http",
            &origin.url(),
            "--control",
            &control_url,
            "--connections",
            "1",
            "--json",
        ],
        &[
            ("RUST_LOG", "warn"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otel.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    // The agent may start before the edges have linked to control, or reach an edge
    // before it listens: it reports `reconnecting` and retries. Its first `live` counts.
    let mut live = serde_json::Value::Null;
    for _ in 0..20 {
        live = serde_json::from_str(&agent.line(Duration::from_secs(60)).await).unwrap();
        if live["event"] == "live" {
            break;
        }
    }
    assert_eq!(live["event"], "live", "the agent links within 20 events");
    let holder = live["edge_id"].as_str().unwrap().to_string();
    let other = edges.iter().find(|e| e.id != holder).unwrap();
    let host = format!("{}.localhost", live["name"].as_str().unwrap());
    // The other edge may still be starting: wait until it listens.
    let v = other.viewer().await;
    // Until the holder's lease is in Redis the other edge does not know the tunnel.
    eventually(Duration::from_secs(20), || async {
        (v.get(&host, "/hello").await.status == 200).then_some(())
    })
    .await
    .expect("the other edge forwards within 20 s");

    let mut req = v.request("GET", &host, "/hello", empty());
    req.headers_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    assert_eq!(v.send(req).await.status(), 200);

    let span = |service: String| {
        collector.wait_for(Duration::from_secs(20), move |s| {
            s.service == service && s.trace_id == TRACE
        })
    };
    let first = span(other.id.clone())
        .await
        .expect("the edge the viewer reached exported its span");
    let second = span(holder.clone())
        .await
        .expect("the holding edge exported its span");
    let third = span("netbore".into())
        .await
        .expect("the agent exported its span");
    assert_eq!(first.parent_span_id, CALLER_SPAN);
    assert_eq!(
        second.parent_span_id, first.span_id,
        "the holder's span is a child of the forwarding edge's"
    );
    assert_eq!(third.parent_span_id, second.span_id);
    let seen = origin.seen();
    let (t, parent) = traceparent_parts(seen.last().unwrap().header("traceparent").unwrap());
    assert_eq!(
        (t.as_str(), parent.as_str()),
        (TRACE, third.span_id.as_str())
    );
}
