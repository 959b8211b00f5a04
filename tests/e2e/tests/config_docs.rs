//! `docs/configuration.md` against the binaries: every flag, environment variable and
//! default in its tables matches `--help`, every flag `--help` lists is documented, and
//! every example command line parses. Fails when the docs drift from the code.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use netbore_testkit::bin_path;

/// One documented (or listed) flag: its variable and default.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Flag {
    env: Option<String>,
    default: Option<String>,
}

fn doc() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The text of the `## {title}` section.
fn section<'a>(doc: &'a str, title: &str) -> &'a str {
    let start = doc
        .find(&format!("\n## {title}"))
        .unwrap_or_else(|| panic!("docs/configuration.md has no '## {title}' section"));
    let rest = &doc[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    &rest[..end]
}

fn ticked(cell: &str) -> Option<String> {
    let cell = cell.trim();
    (cell.starts_with('`') && cell.ends_with('`') && cell.len() > 1)
        .then(|| cell.trim_matches('`').to_string())
}

/// Flags documented in a section's table: `| `--flag` | `ENV` or — | default | what |`.
fn documented(section: &str) -> BTreeMap<String, Flag> {
    let mut out = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').collect();
        if cells.len() < 5 {
            continue;
        }
        let Some(flag) = ticked(cells[1]).filter(|f| f.starts_with("--")) else {
            continue;
        };
        out.insert(
            flag,
            Flag {
                env: ticked(cells[2]),
                default: ticked(cells[3]),
            },
        );
    }
    out
}

/// Flags in `--help` output, with the `[env: …]` and `[default: …]` clap prints.
fn listed(help: &str) -> BTreeMap<String, Flag> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, Flag)> = None;
    for line in help.lines() {
        let t = line.trim_start();
        if t.starts_with('-') && line.starts_with("  ") && t.contains("--") {
            if let Some((k, v)) = current.take() {
                out.insert(k, v);
            }
            let name = t[t.find("--").unwrap()..]
                .split([' ', ','])
                .next()
                .unwrap()
                .to_string();
            current = Some((
                name,
                Flag {
                    env: None,
                    default: None,
                },
            ));
        }
        if let Some((_, f)) = current.as_mut() {
            if let Some(i) = t.find("[env: ") {
                let v = &t[i + 6..];
                let end = v.find(['=', ']']).unwrap();
                f.env = Some(v[..end].to_string());
            }
            if let Some(i) = t.find("[default: ") {
                let v = &t[i + 10..];
                f.default = Some(v[..v.find(']').unwrap()].to_string());
            }
        }
    }
    if let Some((k, v)) = current {
        out.insert(k, v);
    }
    out.remove("--help");
    out.remove("--version");
    out
}

/// Runs a binary with a clean environment (clap shows the values of set variables).
fn run(bin: &str, args: &[&str], env: &[(String, String)]) -> std::process::Output {
    let mut c = Command::new(bin_path(bin));
    c.args(args).env_clear();
    if let Some(p) = std::env::var_os("PATH") {
        c.env("PATH", p);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn help(bin: &str, sub: &[&str]) -> String {
    let mut args = sub.to_vec();
    args.push("--help");
    let out = run(bin, &args, &[]);
    assert!(out.status.success(), "{bin} {args:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Splits a shell line: plain words and '…' quoted ones.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in line.chars() {
        match ch {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// The `sh` example lines of a section.
fn examples(section: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in section.lines() {
        if line.starts_with("```") {
            inside = line == "```sh";
            continue;
        }
        if inside && !line.trim().is_empty() {
            out.push(line.to_string());
        }
    }
    out
}

fn check(title: &str, bin: &str, sub: &[&str], known_env: &[String]) {
    let doc = doc();
    let s = section(&doc, title);
    let documented = documented(s);
    let listed = listed(&help(bin, sub));
    assert!(!listed.is_empty(), "no flags parsed from {bin} --help");
    for (flag, l) in &listed {
        let d = documented.get(flag).unwrap_or_else(|| {
            panic!("{bin} {sub:?} has {flag}, which '## {title}' does not document")
        });
        assert_eq!(d.env, l.env, "{title} {flag}: environment variable");
        if let Some(default) = &l.default {
            assert_eq!(d.default.as_ref(), Some(default), "{title} {flag}: default");
        }
    }
    for flag in documented.keys() {
        assert!(
            listed.contains_key(flag),
            "'## {title}' documents {flag}, which {bin} {sub:?} does not have"
        );
    }
    let ex = examples(s);
    assert!(!ex.is_empty(), "'## {title}' has no examples");
    for line in ex {
        let mut w = words(&line).into_iter().peekable();
        let mut env = Vec::new();
        while let Some(kv) = w.next_if(|x| x.contains('=') && !x.starts_with('-')) {
            let (k, v) = kv.split_once('=').unwrap();
            assert!(
                known_env.iter().any(|e| e == k),
                "example '{line}' sets {k}, which the docs do not describe"
            );
            env.push((k.to_string(), v.to_string()));
        }
        assert_eq!(w.next().as_deref(), Some(bin), "example '{line}'");
        let mut args: Vec<String> = w.collect();
        // Parsed up to here, then help: unknown flags and bad values fail first.
        args.push("--help".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(bin, &args, &env);
        assert!(
            out.status.success(),
            "example '{line}' does not parse: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every variable the document names in backticks.
fn all_env() -> Vec<String> {
    let doc = doc();
    doc.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| {
            !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
                && w.contains('_')
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn control_flags_match_the_docs() {
    check("netbore-control", "netbore-control", &[], &all_env());
}

#[test]
fn edge_flags_match_the_docs() {
    check("netbore-edge", "netbore-edge", &[], &all_env());
}

#[test]
fn agent_http_flags_match_the_docs() {
    check("netbore http", "netbore", &["http"], &all_env());
}

#[test]
fn agent_tcp_and_tls_flags_match_the_docs() {
    check(
        "netbore tcp and netbore tls",
        "netbore",
        &["tcp"],
        &all_env(),
    );
    check(
        "netbore tcp and netbore tls",
        "netbore",
        &["tls"],
        &all_env(),
    );
}

#[test]
fn agent_dev_flags_match_the_docs() {
    check("netbore dev", "netbore", &["dev"], &all_env());
}

#[test]
fn agent_start_flags_match_the_docs() {
    check("netbore start", "netbore", &["start"], &all_env());
}

#[test]
fn agent_config_check_flags_match_the_docs() {
    check(
        "netbore config check",
        "netbore",
        &["config", "check"],
        &all_env(),
    );
}

#[test]
fn the_shared_variables_are_the_ones_the_code_reads() {
    let doc = doc();
    let s = section(&doc, "Shared by all three");
    for v in [
        netbore_telemetry::OTLP_ENDPOINT_ENV,
        netbore_telemetry::OTLP_TRACES_ENDPOINT_ENV,
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_SERVICE_NAME",
        "RUST_LOG",
    ] {
        assert!(s.contains(&format!("`{v}`")), "{v} is not documented");
    }
}
