//! The edge binary's access log: one line per proxied request with tunnel, status,
//! bytes, duration and client address, and never a token from the URL.

use std::time::Duration;

use netbore_testkit::origin::Origin;
use netbore_testkit::{ControlProc, InProcAgent, Proc, Viewer, free_port};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_json_line_per_request_without_tokens() {
    let (public, agents) = (free_port(), free_port());
    let control = ControlProc::spawn(&[], &[]);
    let (rest, grpc) = (control.rest, control.grpc);
    let mut edge = Proc::spawn_logs(
        "netbore-edge",
        &[
            "--public-addr",
            &format!("127.0.0.1:{public}"),
            "--agent-addr",
            &format!("127.0.0.1:{agents}"),
            "--admin-addr",
            "127.0.0.1:0",
            "--control-url",
            &format!("http://127.0.0.1:{rest}"),
            "--control-grpc",
            &format!("http://127.0.0.1:{grpc}"),
            "--log-json",
        ],
        &[("RUST_LOG", "info")],
    );
    let origin = Origin::start().await;
    let mut cfg = netbore_testkit::Stack::agent_config(&origin.url());
    cfg.control_url = format!("http://127.0.0.1:{rest}");
    let agent = InProcAgent::start(cfg).await;
    let host = format!("{}.localhost:{public}", agent.name);
    let v = Viewer::new(([127, 0, 0, 1], public).into());
    let r = v.get(&host, "/bytes/1234?token=SECRET-TOKEN-VALUE").await;
    assert_eq!(r.status, 200);

    let line = loop {
        let l = edge.line(Duration::from_secs(10)).await;
        assert!(
            !l.contains("SECRET-TOKEN-VALUE"),
            "a token reached the log: {l}"
        );
        let j: Value = serde_json::from_str(&l).unwrap_or(Value::Null);
        if j["target"] == "netbore::access" {
            break j;
        }
    };
    let f = &line["fields"];
    assert_eq!(f["tunnel"], agent.name.as_str());
    assert_eq!(f["status"], 200);
    assert_eq!(f["bytes"], 1234);
    assert_eq!(f["path"], "/bytes/1234");
    assert_eq!(f["client_ip"], "127.0.0.1");
    assert_eq!(f["complete"], true);
    assert!(f["duration_ms"].is_u64());
}
