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
