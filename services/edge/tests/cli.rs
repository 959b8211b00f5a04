//! The `netbore-edge` binary starts, serves, and stops on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_edge_answers_unknown_tunnels_with_404_and_stops_on_sigterm() {
    let (public, agents) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_netbore-edge"))
        .args([
            "--public-addr",
            &format!("127.0.0.1:{public}"),
            "--agent-addr",
            &format!("127.0.0.1:{agents}"),
            "--admin-addr",
            "127.0.0.1:0",
            // Nothing listens here: the edge must still start and serve viewers.
            "--control-url",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = lines.next().expect("edge logs").unwrap();
        if l.contains("edge listening") {
            break;
        }
        assert!(Instant::now() < deadline, "edge did not start");
    }
    let mut s = std::net::TcpStream::connect(("127.0.0.1", public)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: nope.localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    assert!(resp.contains("netbore-error: tunnel_not_found"), "{resp}");

    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "edge exits cleanly on SIGTERM: {st}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "edge did not stop within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
