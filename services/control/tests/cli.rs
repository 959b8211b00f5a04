//! The `netbore-control` binary refuses bad configuration with a readable error.

use std::process::Command;

#[test]
fn a_malformed_edge_flag_is_refused_with_the_expected_form() {
    let out = Command::new(env!("CARGO_BIN_EXE_netbore-control"))
        .args(["--rest-addr", "127.0.0.1:0", "--edge", "nonsense"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected id=ID,url="), "{err}");
}

/// The real binary: binds what it is told, logs each bound address, serves, and exits
/// cleanly on SIGTERM within its grace period.
#[tokio::test]
async fn the_binary_logs_its_addresses_serves_and_drains_on_sigterm() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_netbore-control"))
        .args([
            "--rest-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--log-json",
            "--edge",
            "id=e1,url=ws://127.0.0.1:9/v1/connect,region=local",
            // Its own database: the default path is shared by every run on the machine.
            "--database-url",
            "sqlite::memory:",
        ])
        .env("NETBORE_BOOTSTRAP_TOKEN", "boot-from-env")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut rest, mut grpc) = (None, None);
    let mut seen = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while rest.is_none() || grpc.is_none() {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("control exited early");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let addr = v["fields"]["addr"].as_str().map(str::to_string);
            match v["fields"]["message"].as_str() {
                Some("REST listening") => rest = addr,
                Some("gRPC listening") => grpc = addr,
                _ => {}
            }
            seen.push(line);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no listening lines: {seen:#?}"));
    let rest = rest.unwrap();
    assert!(
        !seen.iter().any(|l| l.contains("boot-from-env")),
        "secret logged"
    );

    // It serves, with the bootstrap credential from the environment.
    let client = netbore_control::client::ControlClient::new(&format!("http://{rest}"));
    let t = client
        .clone()
        .with_bearer("boot-from-env")
        .issue_token(&Default::default())
        .await
        .unwrap();
    assert!(!t.token.is_empty());
    let created = client.create(&Default::default()).await.unwrap();
    assert_eq!(created.candidates[0].edge_id, "e1");
    tokio::net::TcpStream::connect(grpc.unwrap()).await.unwrap();

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait())
        .await
        .expect("control exits within its grace period")
        .unwrap();
    assert!(status.success(), "{status}");
    let mut rest_of_log = Vec::new();
    while let Ok(Some(l)) = lines.next_line().await {
        rest_of_log.push(l);
    }
    assert!(
        rest_of_log.iter().any(|l| l.contains("SIGTERM")),
        "{rest_of_log:#?}"
    );
}

#[test]
fn an_impossible_configuration_is_refused_with_the_fix() {
    let out = Command::new(env!("CARGO_BIN_EXE_netbore-control"))
        .args([
            "--rest-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--public-url-template",
            "https://tunnels.example.com",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no {name}"), "{err}");
}
