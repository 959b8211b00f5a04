//! The real `netbore` binary as users run it: killed, restarted, stopped, and
//! `netbore dev` on its own.

use std::time::Duration;

use http_body_util::BodyExt;
use netbore_testkit::origin::Origin;
use netbore_testkit::{Proc, Stack, Viewer, empty, eventually};

fn host_of(url_line: &str) -> String {
    let url = url_line.split_whitespace().next().unwrap();
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

fn agent(stack: &Stack, origin: &Origin, state: &std::path::Path, extra: &[&str]) -> Proc {
    let control = stack.control_url();
    let target = origin.url();
    let mut args = vec![
        "http",
        target.as_str(),
        "--control",
        control.as_str(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proc::spawn("netbore", &args, &[("RUST_LOG", "warn")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_response_aborts_the_viewers_response() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut a = agent(&stack, &origin, state.path(), &[]);
    let line = a.line(Duration::from_secs(20)).await;
    let host = host_of(&line);
    let v = Viewer::new(stack.public());

    let resp = v
        .send(v.request("GET", &host, "/bytes/209715200", empty()))
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // Some bytes arrive, then the agent dies.
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    a.kill().await;
    let mut got = first.into_data().unwrap().len() as u64;
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(10), body.frame()).await {
            Err(_) => break "stalled",
            Ok(None) => break "complete",
            Ok(Some(Err(_))) => break "aborted",
            Ok(Some(Ok(f))) => got += f.into_data().map(|d| d.len() as u64).unwrap_or(0),
        }
    };
    assert_eq!(outcome, "aborted", "after {got} of 209715200 bytes");
    assert!(got < 209_715_200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_keeps_its_name_and_serves_again() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let v = Viewer::new(stack.public());

    let mut a = agent(&stack, &origin, state.path(), &[]);
    let first_url = a.line(Duration::from_secs(20)).await;
    let host = host_of(&first_url);
    assert_eq!(v.get(&host, "/hello").await.status, 200);

    a.kill().await;
    let offline = eventually(Duration::from_secs(5), || {
        let v = v.clone();
        let host = host.clone();
        async move {
            let r = v.get(&host, "/hello").await;
            (r.status == 503).then_some(r)
        }
    })
    .await
    .expect("503 while the agent is away");
    assert_eq!(offline.error_code(), Some("tunnel_offline"));

    let mut b = agent(&stack, &origin, state.path(), &[]);
    let second_url = b.line(Duration::from_secs(20)).await;
    assert_eq!(
        second_url.split_whitespace().next(),
        first_url.split_whitespace().next(),
        "the same URL after a restart"
    );
    let r = eventually(Duration::from_secs(5), || {
        let v = v.clone();
        let host = host.clone();
        async move {
            let r = v.get(&host, "/hello").await;
            (r.status == 200).then_some(r)
        }
    })
    .await
    .expect("served again");
    assert_eq!(r.text(), "hello from origin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut a = agent(&stack, &origin, state.path(), &[]);
    let host = host_of(&a.line(Duration::from_secs(20)).await);
    let v = Viewer::new(stack.public());
    let slow = {
        let v = v.clone();
        let host = host.clone();
        tokio::spawn(async move { v.get(&host, "/slow/1500").await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    a.signal("TERM");
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "in-flight request finished: {}", r.text());
    assert_eq!(r.text(), "slow answer");
    let st = tokio::time::timeout(Duration::from_secs(10), a.child.wait())
        .await
        .expect("agent exits after draining")
        .unwrap();
    assert!(st.success(), "clean exit: {st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_held_by_another_agent_is_refused_with_a_message() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let s1 = tempfile::tempdir().unwrap();
    let s2 = tempfile::tempdir().unwrap();
    let mut a = agent(&stack, &origin, s1.path(), &["--name", "shared-demo"]);
    let line = a.line(Duration::from_secs(20)).await;
    assert!(line.starts_with("http://shared-demo.localhost:"), "{line}");

    let mut b = agent(
        &stack,
        &origin,
        s2.path(),
        &["--name", "shared-demo", "--json"],
    );
    let st = tokio::time::timeout(Duration::from_secs(20), b.child.wait())
        .await
        .expect("second agent gives up")
        .unwrap();
    assert_eq!(st.code(), Some(2));
    let mut saw = String::new();
    while let Ok(Some(l)) = tokio::time::timeout(Duration::from_secs(1), b.stdout.recv()).await {
        saw.push_str(&l);
    }
    assert!(saw.contains("\"code\":\"name_taken\""), "{saw}");
    // The message names the fixes.
    assert!(
        saw.contains("--state-dir") && saw.contains("names:claim") && saw.contains("--name"),
        "{saw}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netbore_dev_prints_a_url_that_serves_the_origin() {
    let origin = Origin::start().await;
    let port = origin.addr.port().to_string();
    let mut dev = Proc::spawn(
        "netbore",
        &["dev", &port, "--port", "0"],
        &[("RUST_LOG", "warn")],
    );
    let line = dev.line(Duration::from_secs(20)).await;
    assert!(
        line.starts_with("http://") && line.contains(".localhost:"),
        "{line}"
    );
    let host = host_of(&line);
    let port: u16 = host.rsplit(':').next().unwrap().parse().unwrap();
    let v = Viewer::new(([127, 0, 0, 1], port).into());
    let r = v.get(&host, "/hello").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello from origin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_ready_only_while_linked_to_an_edge() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let port = netbore_testkit::free_port();
    let admin = format!("127.0.0.1:{port}");
    let mut a = agent(&stack, &origin, state.path(), &["--admin-addr", &admin]);
    a.line(Duration::from_secs(20)).await;
    let probes = Viewer::new(([127, 0, 0, 1], port).into());
    assert_eq!(probes.get("agent", "/livez").await.status, 200);
    assert_eq!(probes.get("agent", "/readyz").await.status, 200);
    // The edge goes away: not ready, still live.
    stack.stop();
    let not_ready = eventually(Duration::from_secs(10), || {
        let p = probes.clone();
        async move { (p.get("agent", "/readyz").await.status == 503).then_some(()) }
    })
    .await;
    assert!(
        not_ready.is_some(),
        "readyz turns 503 once the link is gone"
    );
    assert_eq!(probes.get("agent", "/livez").await.status, 200);
}

/// One edge and `--connections 2`: the spare link has no edge of its own. It waits,
/// says so in `/readyz`, and is no connect failure (the metric the docs say to alert on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_link_without_an_edge_of_its_own_waits_and_is_no_failure() {
    let stack = Stack::start().await;
    let origin = Origin::start().await;
    let state = tempfile::tempdir().unwrap();
    let port = netbore_testkit::free_port();
    let admin = format!("127.0.0.1:{port}");
    let mut a = agent(
        &stack,
        &origin,
        state.path(),
        &["--admin-addr", &admin, "--connections", "2"],
    );
    let host = host_of(&a.line(Duration::from_secs(20)).await);
    let probes = Viewer::new(([127, 0, 0, 1], port).into());
    let metrics = || {
        let p = probes.clone();
        async move { netbore_testkit::parse_metrics(&p.get("agent", "/metrics").await.text()) }
    };
    let waiting = eventually(Duration::from_secs(10), || {
        let m = metrics();
        async move {
            (m.await.get("netbore_agent_spare_links_waiting") == Some(&1.0)).then_some(())
        }
    })
    .await;
    assert!(waiting.is_some(), "the spare link reports that it waits");
    let m = metrics().await;
    assert_eq!(m.get("netbore_agent_connect_failures_total"), Some(&0.0));
    assert_eq!(m.get("netbore_agent_links_up"), Some(&1.0));
    let ready = probes.get("agent", "/readyz").await;
    assert_eq!(ready.status, 200);
    assert!(ready.text().contains("spare"), "{}", ready.text());
    let v = Viewer::new(stack.public());
    assert_eq!(v.get(&host, "/hello").await.status, 200);
}
