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
