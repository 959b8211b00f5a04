//! The config file as users meet it: `netbore start` (the real binary) runs several
//! tunnels of one `netbore.toml` against control and an edge in this process, and
//! `netbore config check` validates the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use netbore_testkit::origin::Origin;
use netbore_testkit::{Proc, Stack, Viewer, bin_path, eventually};

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("netbore.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// `netbore ARGS` to completion: exit code, stdout, stderr.
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(bin_path("netbore"));
    cmd.args(args).env_remove("NETBORE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("netbore runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `KEY: URL -> ORIGIN` lines of `netbore start`, by tunnel key, as viewer hosts.
async fn live_hosts(p: &mut Proc, n: usize) -> std::collections::BTreeMap<String, String> {
    let mut hosts = std::collections::BTreeMap::new();
    while hosts.len() < n {
        let line = p.line(Duration::from_secs(20)).await;
        let (key, rest) = line.split_once(": ").expect("KEY: URL -> ORIGIN");
        let url = rest.split_whitespace().next().unwrap();
        hosts.insert(
            key.to_string(),
            url.trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string(),
        );
    }
    hosts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_all_serves_every_tunnel_and_a_dead_origin_leaves_the_others_serving() {
    let stack = Stack::start().await;
    let (web, api, docs) = (
        Origin::start().await,
        Origin::start().await,
        Origin::start().await,
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            r#"# three local services of one pod
control_url = "{control}"
state_dir = "{state}"
connections = 1

[defaults]
origin_timeout = 5

[tunnels.web]
target = "{web}"
name = "pod-web"

[tunnels.api]
kind = "http"
target = "{api}"
name = "pod-api"
host_header = "rewrite"

[tunnels.docs]
target = "{docs}"
"#,
            control = stack.control_url(),
            state = dir.path().join("state").display(),
            web = web.url(),
            api = api.url(),
            docs = docs.url(),
        ),
    );
    let mut p = Proc::spawn(
        "netbore",
        &["start", "--all", "--config", cfg.to_str().unwrap()],
        &[("RUST_LOG", "warn")],
    );
    let hosts = live_hosts(&mut p, 3).await;
    assert!(hosts["web"].starts_with("pod-web."), "{hosts:?}");
    assert!(hosts["api"].starts_with("pod-api."), "{hosts:?}");
    let v = Viewer::new(stack.public());
    for (key, origin) in [("web", &web), ("api", &api), ("docs", &docs)] {
        let r = v.get(&hosts[key], "/hello").await;
        assert_eq!(r.status, 200, "{key}");
        assert_eq!(origin.seen().len(), 1, "{key} reached its own origin");
    }
    // host_header = "rewrite" reached the api origin as its own host:port.
    let api_host = api.url().trim_start_matches("http://").to_string();
    assert_eq!(api.seen()[0].header("host"), Some(api_host.as_str()));
    assert_eq!(web.seen()[0].header("host"), Some(hosts["web"].as_str()));

    // The api origin dies: its tunnel answers 502, the other two keep serving.
    api.stop();
    let down = eventually(Duration::from_secs(10), || {
        let (v, h) = (v.clone(), hosts["api"].clone());
        async move { (v.get(&h, "/hello").await.status == 502).then_some(()) }
    })
    .await;
    assert!(down.is_some(), "the dead origin's tunnel answers 502");
    for _ in 0..5 {
        assert_eq!(v.get(&hosts["web"], "/hello").await.status, 200);
        assert_eq!(v.get(&hosts["docs"], "/hello").await.status, 200);
    }
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "netbore start still runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_runs_only_the_named_tunnels_and_flags_beat_the_file() {
    let stack = Stack::start().await;
    let (a, b) = (Origin::start().await, Origin::start().await);
    let dir = tempfile::tempdir().unwrap();
    // The file's control URL is wrong; the flag's is right and wins.
    let cfg = write_config(
        dir.path(),
        &format!(
            "control_url = \"http://127.0.0.1:9\"\nconnections = 1\n[tunnels.a]\ntarget = \"{}\"\n[tunnels.b]\ntarget = \"{}\"\n",
            a.url(),
            b.url()
        ),
    );
    let control = stack.control_url();
    let mut p = Proc::spawn(
        "netbore",
        &[
            "start",
            "b",
            "--config",
            cfg.to_str().unwrap(),
            "--control",
            &control,
            "--state-dir",
            dir.path().to_str().unwrap(),
        ],
        &[("RUST_LOG", "warn")],
    );
    let hosts = live_hosts(&mut p, 1).await;
    assert_eq!(hosts.keys().collect::<Vec<_>>(), ["b"]);
    let v = Viewer::new(stack.public());
    assert_eq!(v.get(&hosts["b"], "/hello").await.status, 200);
    assert_eq!(b.seen().len(), 1);
    assert!(a.seen().is_empty());
}

#[test]
fn config_check_names_an_unknown_key_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "control_url = \"http://127.0.0.1:8080\"\n\n[tunnels.web]\ntarget = \"3000\"\norigin_timout = 5\n",
    );
    let (code, out, err) = run(&["config", "check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("origin_timout"), "names the key: {err}");
    assert!(err.contains("netbore.toml:5:"), "names the line: {err}");
    assert!(
        err.contains("origin_timeout"),
        "offers the known keys: {err}"
    );
}

#[test]
fn config_check_prints_effective_settings_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "nbm_file_secret_123\n").unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "control_url = \"http://file:1\"\ntoken_file = \"{}\"\n[tunnels.web]\ntarget = \"3000\"\ntunnel_token = \"nbt_tunnel_secret_456\"\n[tunnels.web.access]\nbasic_auth = [\"ann:pw_secret_789\"]\n[tunnels.web.limits]\nmax_body_bytes = 1000\n",
            token_file.display()
        ),
    );
    // NETBORE_* beats the file; a flag beats NETBORE_*.
    let (code, out, err) = run(
        &[
            "config",
            "check",
            "--config",
            cfg.to_str().unwrap(),
            "--connections",
            "3",
        ],
        &[
            ("NETBORE_CONTROL_URL", "http://env:2"),
            ("NETBORE_CONNECTIONS", "5"),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("control_url = \"http://env:2\""), "{out}");
    assert!(out.contains("connections = 3"), "{out}");
    assert!(out.contains("target = \"http://127.0.0.1:3000/\""), "{out}");
    assert!(out.contains("max_body_bytes"), "{out}");
    for secret in [
        "nbm_file_secret_123",
        "nbt_tunnel_secret_456",
        "pw_secret_789",
    ] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret} leaked: {out}{err}"
        );
    }
    assert!(out.contains("<redacted>"), "{out}");
}

#[test]
fn the_config_file_is_found_through_netbore_config_and_the_config_dir() {
    let dir = tempfile::tempdir().unwrap();
    let xdg = dir.path().join("xdg");
    std::fs::create_dir_all(xdg.join("netbore")).unwrap();
    write_config(
        &xdg.join("netbore"),
        "[tunnels.from-dir]\ntarget = \"3000\"\n",
    );
    let env_file = write_config(dir.path(), "[tunnels.from-env]\ntarget = \"3000\"\n");
    let xdg_s = xdg.to_str().unwrap();
    let (code, out, err) = run(&["config", "check"], &[("XDG_CONFIG_HOME", xdg_s)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[tunnels.\"from-dir\"]"), "{out}");
    let (code, out, err) = run(
        &["config", "check"],
        &[
            ("XDG_CONFIG_HOME", xdg_s),
            ("NETBORE_CONFIG", env_file.to_str().unwrap()),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[tunnels.\"from-env\"]"), "{out}");
    // No file anywhere: the error says where it looked and how to give one.
    let empty = dir.path().join("empty");
    let (code, _, err) = run(
        &["config", "check"],
        &[("XDG_CONFIG_HOME", empty.to_str().unwrap())],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("netbore.toml") && err.contains("--config"),
        "{err}"
    );
}
