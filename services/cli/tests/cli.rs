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

/// The section of `--help` output under `heading` (up to the next heading).
fn section<'a>(help: &'a str, heading: &str) -> &'a str {
    let start = help
        .find(&format!("{heading}:"))
        .unwrap_or_else(|| panic!("no '{heading}' heading in:\n{help}"));
    let rest = &help[start + heading.len() + 1..];
    let end = rest.find("\n\n").unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn http_help_lists_connection_flags_under_their_own_heading() {
    let out = netbore(&["http", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let conn = section(&help, "Control and connection");
    let access = section(&help, "Access (who may reach the tunnel)");
    for flag in [
        "--control",
        "--name",
        "--token",
        "--tunnel-token",
        "--edge-ca",
        "--connections",
    ] {
        assert!(
            conn.contains(flag),
            "{flag} under Control and connection:\n{help}"
        );
        assert!(
            !access.contains(&format!("{flag} ")),
            "{flag} not under Access:\n{help}"
        );
    }
    assert!(access.contains("--jwt-key"), "{help}");
}

#[test]
fn completion_scripts_and_man_pages_are_printed() {
    let out = netbore(&["completion", "bash"]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("_netbore") && s.contains("start") && s.contains("--control"),
        "{s}"
    );
    for shell in ["zsh", "fish", "powershell", "elvish"] {
        let out = netbore(&["completion", shell]);
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
    let out = netbore(&["man"]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains(".TH netbore") && s.contains("start"), "{s}");
    let out = netbore(&["man", "http"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains(".TH netbore-http") && s.contains("connections"),
        "{s}"
    );
    let out = netbore(&["man", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("http"));
}

/// A first run without `--control` and no control on this machine: one hint naming
/// `--control` and `netbore dev`.
#[test]
fn no_control_at_the_default_address_prints_a_hint() {
    use std::process::Stdio;
    if std::net::TcpStream::connect("127.0.0.1:8080").is_ok() {
        eprintln!("skipped: something listens on 127.0.0.1:8080, the default control address");
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_netbore"))
        .args(["http", "3000"])
        .env(
            "NETBORE_STATE_DIR",
            std::env::temp_dir().join("netbore-cli-test"),
        )
        .env_remove("NETBORE_CONTROL_URL")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("netbore runs");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("hint:") {
                let _ = tx.send(line);
                break;
            }
        }
    });
    let hint = rx.recv_timeout(std::time::Duration::from_secs(20));
    child.kill().unwrap();
    child.wait().unwrap();
    let hint = hint.expect("a hint within 20 s");
    assert!(
        hint.contains("--control") && hint.contains("netbore dev"),
        "{hint}"
    );
}
