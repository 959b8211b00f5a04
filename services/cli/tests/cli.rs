//! The `netbore` binary's command line: errors a person sees say what to do.

use std::process::Command;

fn netbore(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_netbore"))
        .args(args)
        .env(
            "NETBORE_STATE_DIR",
            std::env::temp_dir().join("netbore-cli-test"),
        )
        .output()
        .expect("netbore runs")
}

#[test]
fn a_bad_target_exits_2_with_a_readable_message() {
    let out = netbore(&["http", "not a url"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a port or URL"), "{err}");
}

#[test]
fn help_names_both_commands() {
    let out = netbore(&["--help"]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("http") && s.contains("dev"), "{s}");
}

#[test]
fn impossible_targets_and_counts_exit_2_naming_the_fix() {
    for (args, expect) in [
        (&["http", "99999"][..], "is not a port (1 to 65535)"),
        (&["http", "0"][..], "is not a port (1 to 65535)"),
        (&["http", "ftp://x:21"][..], "uses ftp://"),
        (
            &["http", "3000", "--connections", "0"][..],
            "give at least 1",
        ),
    ] {
        let out = netbore(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}

/// Logs written to a pipe or a file carry no colour codes (issue 17 item 5).
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    use std::process::Stdio;
    // Nothing listens on port 9: the agent logs a warning and retries.
    let mut child = Command::new(env!("CARGO_BIN_EXE_netbore"))
        .args(["http", "3000", "--control", "http://127.0.0.1:9"])
        .env(
            "NETBORE_STATE_DIR",
            std::env::temp_dir().join("netbore-cli-test"),
        )
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("netbore runs");
    let stderr = child.stderr.take().unwrap();
    // Reads the log until the first warning (or the end), bounded by the timeout below.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut log = Vec::new();
        let mut lines = std::io::BufReader::new(stderr);
        loop {
            let mut line = Vec::new();
            match lines.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let warn = String::from_utf8_lossy(&line).contains("WARN");
                    log.extend_from_slice(&line);
                    if warn {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(log);
    });
    let log = rx.recv_timeout(std::time::Duration::from_secs(20));
    child.kill().unwrap();
    child.wait().unwrap();
    let log = log.expect("a warning within 20 s");
    let text = String::from_utf8_lossy(&log);
    assert!(text.contains("WARN"), "no warning logged: {text}");
    assert!(
        !log.contains(&0x1b),
        "colour codes in a piped log: {text:?}"
    );
}
