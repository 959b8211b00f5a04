//! The agent's config file (`netbore.toml`): the control URL, credentials, defaults and
//! named tunnels that `netbore start` runs in one process and `netbore config check`
//! validates (docs/configuration.md, "Config file").
//!
//! Where it is found: `--config`, then `NETBORE_CONFIG`, then
//! `$XDG_CONFIG_HOME/netbore/netbore.toml` (or `~/.config/netbore/netbore.toml`).
//!
//! Layering, lowest first: built-in defaults < the file < `NETBORE_*` variables < flags,
//! merged by figment. The file is parsed strictly by `toml` first, so an unknown or
//! misspelt key is refused with its line and column (figment alone reports the key but
//! not the line).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Serialized};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use netbore_agent::origin::{DEFAULT_ORIGIN_TIMEOUT, HostHeader, OriginConfig};
use netbore_tokens::Secret;
use serde::{Deserialize, Serialize};

/// The config file's name in the user's config directory.
pub const FILE_NAME: &str = "netbore.toml";

/// Control's default REST URL (the same as `netbore http --control`).
pub const DEFAULT_CONTROL_URL: &str = "http://127.0.0.1:8080";

/// Default number of links per tunnel (the same as `netbore http --connections`).
pub const DEFAULT_CONNECTIONS: usize = 2;

/// Largest config file read, so a wrong path (a log, a disk image) fails fast.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The `NETBORE_*` variables that override the file's top-level keys (the variable is
/// the key upper-cased after `NETBORE_`, e.g. `NETBORE_CONTROL_URL`).
pub const ENV_KEYS: &[&str] = &[
    "control_url",
    "token",
    "edge_ca",
    "connections",
    "state_dir",
    "admin_addr",
];

/// What a tunnel carries. Dispatched in exactly one place (`crate::start::run_tunnel`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// HTTP(S), as `netbore http`.
    #[default]
    Http,
    /// Raw TCP (issue 17 item 2).
    Tcp,
    /// TLS passed through by SNI (issue 17 item 3).
    Tls,
}

impl Kind {
    /// The word used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Tcp => "tcp",
            Kind::Tls => "tls",
        }
    }
}

/// The file as written: every key optional, unknown keys refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Control's REST URL (`--control`).
    pub control_url: Option<String>,
    /// Management token (`--token`).
    pub token: Option<Secret>,
    /// A file holding the management token (first line).
    pub token_file: Option<PathBuf>,
    /// Extra CA (PEM) for `wss://` edges (`--edge-ca`).
    pub edge_ca: Option<PathBuf>,
    /// Accept any edge certificate (`--edge-insecure`, development only).
    pub edge_insecure: Option<bool>,
    /// Links per tunnel, each to a distinct edge (`--connections`).
    pub connections: Option<usize>,
    /// Where recreate tokens are kept (`--state-dir`).
    pub state_dir: Option<PathBuf>,
    /// `/livez`, `/readyz`, `/metrics` for all tunnels (`--admin-addr`).
    pub admin_addr: Option<SocketAddr>,
    /// Settings every tunnel takes unless it sets its own.
    pub defaults: TunnelFile,
    /// The tunnels, by the name `netbore start NAME` uses.
    pub tunnels: BTreeMap<String, TunnelFile>,
}

/// One tunnel as written (or the `[defaults]` table). The keys mean what the flags of
/// `netbore http` with the same name (`_` for `-`) mean.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelFile {
    /// `http` (default), `tcp` or `tls`.
    pub kind: Option<Kind>,
    /// The local service: a port, host:port or an http(s):// URL.
    pub target: Option<String>,
    /// Public name to claim; random when not given.
    pub name: Option<String>,
    /// Tunnel credential (`nbt_…`) for this tunnel (`--tunnel-token`).
    pub tunnel_token: Option<Secret>,
    /// A file holding the tunnel credential (first line).
    pub tunnel_token_file: Option<PathBuf>,
    /// `preserve`, `rewrite` or a literal value (`--host-header`).
    pub host_header: Option<String>,
    /// Speak HTTP/2 to the origin (`--origin-http2`).
    pub origin_http2: Option<bool>,
    /// Extra CA (PEM) for an https:// origin (`--origin-ca`).
    pub origin_ca: Option<PathBuf>,
    /// Accept any origin certificate (`--origin-insecure`).
    pub origin_insecure: Option<bool>,
    /// Seconds to wait for the origin's response head (`--origin-timeout`).
    pub origin_timeout: Option<u64>,
    /// Links for this tunnel (overrides the top-level `connections`).
    pub connections: Option<usize>,
    /// Who may reach the tunnel (docs/access.md).
    pub access: Option<AccessFile>,
    /// The tunnel's own limits.
    pub limits: Option<LimitsFile>,
}

/// The access flags of `netbore http`, as a table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessFile {
    /// `--access-file`.
    pub access_file: Option<PathBuf>,
    /// `--jwt-key`.
    pub jwt_key: Option<PathBuf>,
    /// `--jwt-secret-file`.
    pub jwt_secret_file: Option<PathBuf>,
    /// `--jwt-claim NAME=VALUE`, as a table `{ NAME = "VALUE" }`.
    pub jwt_claims: BTreeMap<String, String>,
    /// `--jwt-audience`.
    pub jwt_audience: Option<String>,
    /// `--jwt-issuer`.
    pub jwt_issuer: Option<String>,
    /// `--jwt-forward-claim`.
    pub jwt_forward_claims: Vec<String>,
    /// `--basic-auth USER:PASSWORD` (hashed before it leaves this machine).
    pub basic_auth: Vec<Secret>,
    /// `--allow-ip`.
    pub allow_ip: Vec<String>,
    /// `--deny-ip`.
    pub deny_ip: Vec<String>,
    /// `--frame-ancestor`.
    pub frame_ancestors: Vec<String>,
    /// `--cors-origin`.
    pub cors_origins: Vec<String>,
}

/// The tunnel's limits.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsFile {
    /// `--max-body-bytes`.
    pub max_body_bytes: Option<u64>,
}

/// Flags of `netbore start` / `netbore config check` that override the file (the top
/// layer); `None` leaves the lower layers' value.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    /// `--control`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_url: Option<String>,
    /// `--token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// `--edge-ca`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge_ca: Option<PathBuf>,
    /// `--edge-insecure`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge_insecure: Option<bool>,
    /// `--connections`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
    /// `--state-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// `--admin-addr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_addr: Option<SocketAddr>,
}

/// A config problem, worded for the person who wrote the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(s: impl Into<String>) -> ConfigError {
    ConfigError(s.into())
}

/// Where the file is: `--config`, `NETBORE_CONFIG`, then the user's config directory.
/// The flag and the variable must name a file that exists; the directory's file is
/// looked for.
pub fn locate(flag: Option<&Path>) -> Result<PathBuf, ConfigError> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("NETBORE_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let dir = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .ok_or_else(|| {
            err("no config file given and no home directory to look in; pass --config FILE or set NETBORE_CONFIG")
        })?;
    Ok(dir.join("netbore").join(FILE_NAME))
}

/// The file's text, size-checked.
fn read(path: &Path) -> Result<String, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        err(format!(
            "cannot read the config file {}: {e}; write one (docs/configuration.md, \"Config file\") or pass --config FILE",
            path.display()
        ))
    })?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(err(format!(
            "{} is {} bytes, more than a config file's limit of {MAX_FILE_BYTES}; is it the right file?",
            path.display(),
            meta.len()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| {
        err(format!(
            "cannot read the config file {}: {e}",
            path.display()
        ))
    })
}

/// Parses the file strictly: a syntax error or an unknown key names its line.
pub fn parse_strict(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    let show = |e: toml::de::Error| {
        let mut msg = e.to_string();
        if let Some(span) = e.span() {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            msg = format!("{}:{line}: {}", path.display(), msg.trim_end());
        } else {
            msg = format!("{}: {}", path.display(), msg.trim_end());
        }
        err(msg)
    };
    // Typed first (unknown keys, wrong types), then kept as a table for the layering,
    // so a key is only in the merge if the file has it.
    toml::from_str::<FileConfig>(text).map_err(show)?;
    toml::from_str::<toml::Table>(text).map_err(show)
}

/// The file as a figment layer, named after its path in figment's errors.
struct FileLayer {
    path: PathBuf,
    table: toml::Table,
}

impl Provider for FileLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("config file {}", self.path.display())).source(self.path.as_path())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Serialized::defaults(&self.table).data()
    }
}

/// Loads the file at `path` and layers `NETBORE_*` and `flags` over it.
pub fn load(path: &Path, flags: &Overrides) -> Result<FileConfig, ConfigError> {
    let text = read(path)?;
    let table = parse_strict(path, &text)?;
    Figment::new()
        .merge(FileLayer {
            path: path.to_path_buf(),
            table,
        })
        .merge(Env::prefixed("NETBORE_").only(ENV_KEYS))
        .merge(Serialized::defaults(flags))
        .extract::<FileConfig>()
        .map_err(|e| {
            let e: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
            err(e.join("; "))
        })
}

/// One tunnel, resolved: every default applied and every file read, ready to start.
#[derive(Debug, Clone)]
pub struct TunnelPlan {
    /// Its key in `[tunnels]`.
    pub key: String,
    /// What it carries.
    pub kind: Kind,
    /// The agent's settings (for `http`; other kinds use the same fields).
    pub agent: netbore_agent::AgentConfig,
    /// The target as written, for messages.
    pub target: String,
}

/// The effective settings of the whole file.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The file they came from.
    pub path: PathBuf,
    /// `/livez`, `/readyz`, `/metrics` address, if any.
    pub admin_addr: Option<SocketAddr>,
    /// Whether a management token is set (`token` or `token_file`).
    pub has_token: bool,
    /// Every tunnel in the file, in key order.
    pub tunnels: Vec<TunnelPlan>,
}

fn first_line(path: &Path, what: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(format!("{what} {}: cannot read it: {e}", path.display())))?;
    let line = text.lines().next().unwrap_or("").trim().to_string();
    if line.is_empty() {
        return Err(err(format!("{what} {} is empty", path.display())));
    }
    Ok(line)
}

macro_rules! pick {
    ($t:expr, $d:expr, $f:ident) => {
        $t.$f.clone().or_else(|| $d.$f.clone())
    };
}

/// Resolves a loaded file into plans; every problem names the tunnel and the key.
pub fn resolve(path: &Path, cfg: &FileConfig) -> Result<Plan, ConfigError> {
    if cfg.tunnels.is_empty() {
        return Err(err(format!(
            "{} defines no tunnels; add one, e.g.\n\n[tunnels.web]\ntarget = \"3000\"\n",
            path.display()
        )));
    }
    let token = match (&cfg.token, &cfg.token_file) {
        (Some(_), Some(_)) => {
            return Err(err(
                "both token and token_file are set; keep one (token_file keeps the secret out of the file)",
            ));
        }
        (Some(t), None) => Some(t.expose().to_string()),
        (None, Some(f)) => Some(first_line(f, "token_file")?),
        (None, None) => None,
    };
    let control_url = cfg
        .control_url
        .clone()
        .unwrap_or_else(|| DEFAULT_CONTROL_URL.to_string());
    let state_dir = cfg
        .state_dir
        .clone()
        .or_else(netbore_agent::state::default_dir);
    let d = &cfg.defaults;
    if d.target.is_some() || d.name.is_some() || d.tunnel_token.is_some() {
        return Err(err(
            "[defaults] cannot set target, name or tunnel_token: they belong to one tunnel",
        ));
    }
    let mut tunnels = Vec::new();
    let mut names = std::collections::HashSet::new();
    // Quick tunnels (no name) keep their state by origin: two with one origin would
    // overwrite each other's recreate token.
    let mut quick_origins = std::collections::HashMap::new();
    for (key, t) in &cfg.tunnels {
        let at = |e: String| err(format!("tunnel '{key}': {e}"));
        let kind = pick!(t, d, kind).unwrap_or_default();
        let target = t.target.clone().ok_or_else(|| {
            at("no target; add target = \"3000\" (a port, host:port or URL)".into())
        })?;
        if let Some(n) = &t.name
            && !names.insert(n.clone())
        {
            return Err(at(format!(
                "the name '{n}' is also claimed by another tunnel in this file; give each its own"
            )));
        }
        let url = match kind {
            Kind::Http => OriginConfig::parse_target(&target),
            // A raw tunnel's origin is HOST:PORT, as `netbore tcp` / `netbore tls` take it.
            Kind::Tcp | Kind::Tls => netbore_agent::tcp::parse_target(&target),
        }
        .map_err(|e| at(format!("target: {e}")))?;
        if t.name.is_none()
            && let Some(other) = quick_origins.insert(url.to_string(), key.clone())
        {
            return Err(at(format!(
                "tunnel '{other}' has the same target {url} and no name either; give one of them a name so each keeps its own URL"
            )));
        }
        let host_header = match pick!(t, d, host_header).as_deref() {
            None | Some("preserve") => HostHeader::Preserve,
            Some("rewrite") => HostHeader::Rewrite,
            Some(v) => HostHeader::Fixed(v.to_string()),
        };
        let connections = t
            .connections
            .or(d.connections)
            .or(cfg.connections)
            .unwrap_or(DEFAULT_CONNECTIONS);
        if connections == 0 {
            return Err(at(
                "connections = 0 would never connect; give at least 1 (2 survives an edge restart)"
                    .into(),
            ));
        }
        let tunnel_token = match (&t.tunnel_token, &t.tunnel_token_file) {
            (Some(_), Some(_)) => {
                return Err(at(
                    "both tunnel_token and tunnel_token_file are set; keep one".into(),
                ));
            }
            (Some(s), None) => Some(s.expose().to_string()),
            (None, Some(f)) => Some(first_line(f, "tunnel_token_file").map_err(|e| at(e.0))?),
            (None, None) => None,
        };
        let access = t
            .access
            .clone()
            .or_else(|| d.access.clone())
            .unwrap_or_default();
        let limits = t
            .limits
            .clone()
            .or_else(|| d.limits.clone())
            .unwrap_or_default();
        let flags = netbore_agent::access::AccessFlags {
            access_file: access.access_file,
            jwt_key: access.jwt_key,
            jwt_secret_file: access.jwt_secret_file,
            jwt_claims: access
                .jwt_claims
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            jwt_audience: access.jwt_audience,
            jwt_issuer: access.jwt_issuer,
            jwt_forward_claims: access.jwt_forward_claims,
            basic_auth: access.basic_auth,
            allow_ip: access.allow_ip,
            deny_ip: access.deny_ip,
            frame_ancestors: access.frame_ancestors,
            cors_origins: access.cors_origins,
            max_body_bytes: limits.max_body_bytes,
        };
        // The access code names flags (--jwt-key); in the file they are keys.
        let (access, limits) = flags.build().map_err(|e| at(flags_to_keys(&e)))?;
        let agent = netbore_agent::AgentConfig {
            control_url: control_url.clone(),
            origin: OriginConfig {
                url,
                http2: pick!(t, d, origin_http2).unwrap_or(false),
                ca_file: pick!(t, d, origin_ca),
                insecure: pick!(t, d, origin_insecure).unwrap_or(false),
                host_header,
                timeout: Duration::from_secs(
                    pick!(t, d, origin_timeout).unwrap_or(DEFAULT_ORIGIN_TIMEOUT.as_secs()),
                ),
            },
            name: t.name.clone(),
            token: if tunnel_token.is_some() {
                None
            } else {
                token.clone()
            },
            state_dir: state_dir.clone(),
            edge_ca_file: cfg.edge_ca.clone(),
            edge_insecure: cfg.edge_insecure.unwrap_or(false),
            drain_grace: netbore_agent::DEFAULT_DRAIN_GRACE,
            connections,
            access,
            limits,
            tunnel_token,
            // A tunnel declared in a file is meant to be run again: kept on exit.
            delete_on_exit: false,
            health_path: netbore_agent::DEFAULT_HEALTH_PATH.into(),
            health_interval: netbore_agent::DEFAULT_HEALTH_INTERVAL,
        };
        tunnels.push(TunnelPlan {
            key: key.clone(),
            kind,
            agent,
            target,
        });
    }
    Ok(Plan {
        path: path.to_path_buf(),
        admin_addr: cfg.admin_addr,
        has_token: token.is_some(),
        tunnels,
    })
}

impl Plan {
    /// The tunnels `netbore start` runs: all of them, or the named ones (each must exist).
    pub fn select(&self, names: &[String], all: bool) -> Result<Vec<TunnelPlan>, ConfigError> {
        if all || names.is_empty() {
            if !all && names.is_empty() {
                return Err(err(format!(
                    "name the tunnels to start (netbore start web api) or pass --all; {} defines: {}",
                    self.path.display(),
                    self.keys().join(", ")
                )));
            }
            return Ok(self.tunnels.clone());
        }
        names
            .iter()
            .map(|n| {
                self.tunnels
                    .iter()
                    .find(|t| &t.key == n)
                    .cloned()
                    .ok_or_else(|| {
                        err(format!(
                            "no tunnel '{n}' in {}; it defines: {}",
                            self.path.display(),
                            self.keys().join(", ")
                        ))
                    })
            })
            .collect()
    }

    fn keys(&self) -> Vec<String> {
        self.tunnels.iter().map(|t| t.key.clone()).collect()
    }

    /// The effective settings as TOML, every secret shown as `<redacted>`.
    pub fn redacted(&self) -> String {
        let mut out = format!("# effective settings from {}\n", self.path.display());
        let first = self.tunnels.first().map(|t| &t.agent);
        if let Some(a) = first {
            out.push_str(&format!("control_url = {}\n", quote(&a.control_url)));
            out.push_str(&format!(
                "token = {}\n",
                if self.has_token {
                    "\"<redacted>\""
                } else {
                    "\"\" # none"
                }
            ));
            if let Some(p) = &a.edge_ca_file {
                out.push_str(&format!("edge_ca = {}\n", quote(&p.display().to_string())));
            }
            out.push_str(&format!("edge_insecure = {}\n", a.edge_insecure));
            if let Some(p) = &a.state_dir {
                out.push_str(&format!(
                    "state_dir = {}\n",
                    quote(&p.display().to_string())
                ));
            }
        }
        if let Some(a) = self.admin_addr {
            out.push_str(&format!("admin_addr = \"{a}\"\n"));
        }
        for t in &self.tunnels {
            let a = &t.agent;
            out.push_str(&format!("\n[tunnels.{}]\n", quote(&t.key)));
            out.push_str(&format!("kind = \"{}\"\n", t.kind.as_str()));
            out.push_str(&format!("target = {}\n", quote(&a.origin.url.to_string())));
            out.push_str(&format!(
                "name = {}\n",
                a.name
                    .as_deref()
                    .map(quote)
                    .unwrap_or_else(|| "\"\" # random".into())
            ));
            if a.tunnel_token.is_some() {
                out.push_str("tunnel_token = \"<redacted>\"\n");
            }
            out.push_str(&format!("connections = {}\n", a.connections));
            let hh = match &a.origin.host_header {
                HostHeader::Preserve => "preserve".to_string(),
                HostHeader::Rewrite => "rewrite".to_string(),
                HostHeader::Fixed(v) => v.clone(),
            };
            out.push_str(&format!("host_header = {}\n", quote(&hh)));
            out.push_str(&format!("origin_http2 = {}\n", a.origin.http2));
            if let Some(p) = &a.origin.ca_file {
                out.push_str(&format!(
                    "origin_ca = {}\n",
                    quote(&p.display().to_string())
                ));
            }
            out.push_str(&format!("origin_insecure = {}\n", a.origin.insecure));
            out.push_str(&format!(
                "origin_timeout = {}\n",
                a.origin.timeout.as_secs()
            ));
            // The policy as control receives it: passwords are already hashes, and
            // secrets are wrapped so they serialize redacted below.
            let mut access = serde_json::to_value(&a.access).unwrap_or_default();
            redact_json(&mut access);
            out.push_str(&format!("access = {}\n", inline(access)));
            let limits = serde_json::to_value(&a.limits).unwrap_or_default();
            out.push_str(&format!("limits = {}\n", inline(limits)));
        }
        out
    }
}

/// An access error worded for the file: `--jwt-key` becomes `access.jwt_key`.
fn flags_to_keys(e: &str) -> String {
    const KEYS: &[(&str, &str)] = &[
        ("--access-file", "access.access_file"),
        ("--jwt-key", "access.jwt_key"),
        ("--jwt-secret-file", "access.jwt_secret_file"),
        ("--jwt-claim", "access.jwt_claims"),
        ("--jwt-audience", "access.jwt_audience"),
        ("--jwt-issuer", "access.jwt_issuer"),
        ("--jwt-forward-claim", "access.jwt_forward_claims"),
        ("--basic-auth", "access.basic_auth"),
        ("--allow-ip", "access.allow_ip"),
        ("--deny-ip", "access.deny_ip"),
        ("--frame-ancestor", "access.frame_ancestors"),
        ("--cors-origin", "access.cors_origins"),
        ("--max-body-bytes", "limits.max_body_bytes"),
    ];
    let mut e = e.to_string();
    // Longest first, so --jwt-claim does not eat part of another flag.
    let mut keys = KEYS.to_vec();
    keys.sort_by_key(|(f, _)| std::cmp::Reverse(f.len()));
    for (flag, key) in keys {
        e = e.replace(flag, key);
    }
    e
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A JSON value as a TOML inline value (nulls, which TOML lacks, left out).
fn inline(mut v: serde_json::Value) -> String {
    fn drop_nulls(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.retain(|_, x| !x.is_null());
                m.values_mut().for_each(drop_nulls);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(drop_nulls),
            _ => {}
        }
    }
    drop_nulls(&mut v);
    toml::Value::try_from(&v)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| v.to_string())
}

/// Replaces secret-bearing fields (the HS256 secret, password hashes) by `<redacted>`.
fn redact_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                if matches!(k.as_str(), "secret" | "hash" | "password") && !val.is_null() {
                    *val = serde_json::Value::String("<redacted>".into());
                } else {
                    redact_json(val);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact_json),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("netbore.toml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_name_and_line() {
        let (_d, p) = write(
            "control_url = \"http://c:8080\"\n\n[tunnels.web]\ntarget = \"3000\"\nhost_heder = \"rewrite\"\n",
        );
        let e = load(&p, &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("host_heder"), "{e}");
        assert!(e.contains("netbore.toml:5:"), "{e}");
    }

    #[test]
    fn flags_beat_the_file_and_defaults_fill_tunnels() {
        let (_d, p) = write(
            "control_url = \"http://file:1\"\ntoken = \"nbm_secret\"\n[defaults]\nhost_header = \"rewrite\"\n[tunnels.a]\ntarget = \"3000\"\nname = \"aa\"\n[tunnels.b]\ntarget = \"4000\"\nhost_header = \"preserve\"\nconnections = 1\n[tunnels.b.access]\nbasic_auth = [\"u:pw\"]\n",
        );
        let cfg = load(
            &p,
            &Overrides {
                control_url: Some("http://flag:2".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let plan = resolve(&p, &cfg).unwrap();
        assert_eq!(plan.tunnels.len(), 2);
        let a = &plan.tunnels[0].agent;
        assert_eq!(a.control_url, "http://flag:2");
        assert_eq!(a.origin.host_header, HostHeader::Rewrite);
        assert_eq!(a.connections, DEFAULT_CONNECTIONS);
        assert_eq!(a.token.as_deref(), Some("nbm_secret"));
        let b = &plan.tunnels[1].agent;
        assert_eq!(b.origin.host_header, HostHeader::Preserve);
        assert_eq!(b.connections, 1);
        let shown = plan.redacted();
        assert!(!shown.contains("nbm_secret"), "{shown}");
        assert!(!shown.contains("pw\""), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn two_quick_tunnels_of_one_origin_are_refused() {
        let (_d, p) =
            write("[tunnels.a]\ntarget = \"3000\"\n[tunnels.b]\ntarget = \"127.0.0.1:3000\"\n");
        let e = resolve(&p, &load(&p, &Overrides::default()).unwrap()).unwrap_err();
        assert!(
            e.0.contains("tunnel 'b'") && e.0.contains("'a'") && e.0.contains("name"),
            "{e}"
        );
        let (_d, p) = write(
            "[tunnels.a]\ntarget = \"3000\"\n[tunnels.b]\ntarget = \"3000\"\nname = \"bee\"\n",
        );
        assert!(resolve(&p, &load(&p, &Overrides::default()).unwrap()).is_ok());
    }

    #[test]
    fn tcp_and_tls_kinds_parse() {
        let (_d, p) = write("[tunnels.db]\nkind = \"tcp\"\ntarget = \"5432\"\n");
        let plan = resolve(&p, &load(&p, &Overrides::default()).unwrap()).unwrap();
        assert_eq!(plan.tunnels[0].kind, Kind::Tcp);
        let (_d, p) = write("[tunnels.db]\nkind = \"udp\"\ntarget = \"5432\"\n");
        let e = load(&p, &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("udp") && e.contains(":2:"), "{e}");
    }

    #[test]
    fn start_needs_names_or_all_and_names_must_exist() {
        let (_d, p) = write("[tunnels.web]\ntarget = \"3000\"\n");
        let plan = resolve(&p, &load(&p, &Overrides::default()).unwrap()).unwrap();
        assert!(plan.select(&[], false).unwrap_err().0.contains("--all"));
        assert!(
            plan.select(&["api".into()], false)
                .unwrap_err()
                .0
                .contains("web")
        );
        assert_eq!(plan.select(&[], true).unwrap().len(), 1);
    }
}
