//! An edge restarted (SIGTERM) while a client keeps sending through it: with the agent
//! linked to a second edge, no request fails. Real processes: control, two edges, the
//! agent; the client behaves like a load balancer and only uses edges whose /readyz
//! says ready.

use std::time::Duration;

use netbore_testkit::origin::Origin;
use netbore_testkit::{ControlProc, Proc, free_port};
use serde_json::Value;

struct EdgeProc {
    proc: Proc,
    public: u16,
    admin: u16,
}

fn edge(id: &str, rest: u16, grpc: u16) -> EdgeProc {
    let (public, agents, admin) = (free_port(), free_port(), free_port());
    let proc = Proc::spawn(
        "netbore-edge",
        &[
            "--edge-id",
            id,
            "--public-addr",
            &format!("127.0.0.1:{public}"),
            "--agent-addr",
            &format!("127.0.0.1:{agents}"),
            "--admin-addr",
            &format!("127.0.0.1:{admin}"),
            "--control-url",
            &format!("http://127.0.0.1:{rest}"),
            "--control-grpc",
            &format!("http://127.0.0.1:{grpc}"),
            "--drain-delay-secs",
            "1",
        ],
        &[("RUST_LOG", "warn")],
    );
    EdgeProc {
        proc,
        public,
        admin,
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    netbore_testkit::ReqBody,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// `GET http://127.0.0.1:port{path}` with `host`: the status, or None on any failure.
async fn get(c: &Client, port: u16, host: &str, path: &str) -> Option<u16> {
    let req = http::Request::get(format!("http://127.0.0.1:{port}{path}"))
        .header("host", host)
        .body(netbore_testkit::empty())
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), c.request(req)).await {
        Ok(Ok(r)) => {
            let status = r.status().as_u16();
            use http_body_util::BodyExt;
            r.into_body().collect().await.ok()?;
            Some(status)
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_an_edge_loses_no_request_when_the_agent_holds_another() {
    let control = ControlProc::spawn(&[], &[]);
    let (rest, grpc) = (control.rest, control.grpc);
    let mut e1 = edge("edge-a", rest, grpc);
    let e2 = edge("edge-b", rest, grpc);
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut agent = Proc::spawn(
        "netbore",
        &[
            "http",
            &origin.url(),
            "--control",
            &format!("http://127.0.0.1:{rest}"),
            "--state-dir",
            state.path().to_str().unwrap(),
            "--connections",
            "2",
            "--json",
        ],
        &[("RUST_LOG", "warn")],
    );
    // Wait for links to both edges.
    let mut name = String::new();
    let mut edges = std::collections::HashSet::new();
    while edges.len() < 2 {
        let v: Value = serde_json::from_str(&agent.line(Duration::from_secs(40)).await).unwrap();
        if v["event"] == "live" {
            name = v["name"].as_str().unwrap().to_string();
            edges.insert(v["edge_id"].as_str().unwrap().to_string());
        }
    }

    let c = client();
    let probe = client();
    let edges_ports = [(e1.public, e1.admin), (e2.public, e2.admin)];
    let (mut sent, mut failed, mut via_e1_after) = (0u32, Vec::new(), 0u32);
    let mut terminated = false;
    for i in 0..600u32 {
        if i == 150 {
            e1.proc.signal("TERM");
            terminated = true;
        }
        // Like a load balancer: alternate between edges, skipping one not ready.
        let mut pick = (i % 2) as usize;
        if get(&probe, edges_ports[pick].1, "admin", "/readyz").await != Some(200) {
            pick = 1 - pick;
        }
        let port = edges_ports[pick].0;
        let host = format!("{name}.localhost:{port}");
        sent += 1;
        match get(&c, port, &host, "/hello").await {
            Some(200) => {
                if pick == 0 && terminated {
                    via_e1_after += 1;
                }
            }
            other => failed.push(format!("#{i} via edge {pick}: {other:?}")),
        }
    }
    println!(
        "sent {sent} requests, {} failed, {via_e1_after} served by the draining edge after SIGTERM",
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let st = tokio::time::timeout(Duration::from_secs(30), e1.proc.child.wait())
        .await
        .expect("the drained edge exits")
        .unwrap();
    assert!(st.success(), "edge-a exits cleanly: {st}");
}
