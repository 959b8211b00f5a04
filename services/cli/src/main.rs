//! `netbore`: the user's CLI. `netbore http 3000` exposes a local service through
//! Netbore; `netbore dev 3000` runs the whole system in this one process first.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use netbore_agent::inspect::{ConsoleEvent, InspectConfig, Observer, Store};
use netbore_agent::origin::{DEFAULT_ORIGIN_TIMEOUT, HostHeader, OriginConfig};
use netbore_agent::{AgentConfig, AgentError, AgentEvent};
use netbore_cli::console::Console;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Default viewer port of `netbore dev`.
const DEV_PUBLIC_PORT: u16 = 7070;

/// Help heading of the flags that say where control is and how to link to the edges.
const CONNECTION_HEADING: &str = "Control and connection";

#[derive(Parser)]
#[command(
    name = "netbore",
    version,
    about = "Expose a local HTTP service on a public hostname"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Expose a local HTTP service through a Netbore control and its edges.
    Http {
        #[command(flatten)]
        common: Common,
        /// Control's REST URL.
        #[arg(
            long,
            env = "NETBORE_CONTROL_URL",
            default_value = netbore_cli::config::DEFAULT_CONTROL_URL,
            help_heading = CONNECTION_HEADING
        )]
        control: String,
        /// Public name to claim (NAME.<domain>); random when not given.
        #[arg(long, env = "NETBORE_NAME", help_heading = CONNECTION_HEADING)]
        name: Option<String>,
        /// Management token: creates the tunnel or claims a name you hold no recreate
        /// token for. Needed only then: reconnects and restarts with the saved state use
        /// the tunnel's recreate token, so this token may expire.
        #[arg(
            long,
            env = "NETBORE_TOKEN",
            hide_env_values = true,
            help_heading = CONNECTION_HEADING
        )]
        token: Option<String>,
        /// Tunnel credential (nbt_…, issued by POST /v1/tunnels/{id}/credentials): runs
        /// that named tunnel with no other secret, indefinitely, until it is revoked.
        /// Nothing is saved but the agent's instance id.
        #[arg(
            long,
            env = "NETBORE_TUNNEL_TOKEN",
            hide_env_values = true,
            conflicts_with = "token",
            help_heading = CONNECTION_HEADING
        )]
        tunnel_token: Option<String>,
        /// Extra CA certificate (PEM) to trust for wss:// edges.
        #[arg(long, env = "NETBORE_EDGE_CA", help_heading = CONNECTION_HEADING)]
        edge_ca: Option<PathBuf>,
        /// Accept any edge certificate (development only).
        #[arg(long, help_heading = CONNECTION_HEADING)]
        edge_insecure: bool,
        /// Links to keep, each to a distinct edge, so losing one edge loses no traffic.
        #[arg(
            long,
            env = "NETBORE_CONNECTIONS",
            default_value_t = netbore_cli::config::DEFAULT_CONNECTIONS,
            value_parser = at_least_one,
            help_heading = CONNECTION_HEADING
        )]
        connections: usize,
        /// Keep a quick tunnel (no --name) when the agent exits: by default a clean exit
        /// (Ctrl-C, SIGTERM) deletes it and frees its name; with --keep its name stays
        /// held for control's name hold and a restart with the same --state-dir gets it
        /// back.
        #[arg(long, env = "NETBORE_KEEP")]
        keep: bool,
    },
    /// Expose a local TCP service (a database, SSH, a game server) on a public port
    /// of its own, the same on every edge and kept across restarts.
    Tcp {
        #[command(flatten)]
        raw: RawArgs,
        #[command(flatten)]
        link: LinkArgs,
    },
    /// Expose a local TLS service by its SNI name on the edges' TLS port, passed
    /// through untouched: the origin keeps its own certificate and key.
    Tls {
        #[command(flatten)]
        raw: RawArgs,
        #[command(flatten)]
        link: LinkArgs,
    },
    /// Run control, an edge and an agent in this process on loopback, and print a URL
    /// that curl and a browser can open.
    Dev {
        #[command(flatten)]
        common: Common,
        /// Viewer port on 127.0.0.1 (another free port is used if it is taken).
        #[arg(long, default_value_t = DEV_PUBLIC_PORT)]
        port: u16,
    },
    /// Hash a basic-auth password for an access policy (reads the password from stdin,
    /// prints `$argon2id$v=19$m=...,t=...,p=...$...`), for the REST API's `access.basic_auth[].hash`.
    HashPassword,
    /// Run the tunnels of the config file (netbore.toml) in this one process.
    Start(StartArgs),
    /// Work with the config file.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Print a shell completion script (e.g. `netbore completion bash > /etc/bash_completion.d/netbore`).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), of `netbore` or of one subcommand
    /// (`netbore man http | man -l -`).
    Man {
        /// A subcommand, e.g. `http`; the top-level page when not given.
        subcommand: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate the config file and print the effective settings (secrets redacted).
    Check {
        #[command(flatten)]
        file: FileArgs,
    },
}

/// Where the config file is, and the flags that override it (they beat the file and
/// `NETBORE_*`).
#[derive(Args)]
struct FileArgs {
    /// The config file (default: NETBORE_CONFIG, then ~/.config/netbore/netbore.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Control's REST URL (overrides `control_url`).
    #[arg(long, help_heading = CONNECTION_HEADING)]
    control: Option<String>,
    /// Management token (overrides `token`).
    #[arg(long, help_heading = CONNECTION_HEADING)]
    token: Option<String>,
    /// Extra CA certificate (PEM) to trust for wss:// edges (overrides `edge_ca`).
    #[arg(long, help_heading = CONNECTION_HEADING)]
    edge_ca: Option<PathBuf>,
    /// Accept any edge certificate (development only; overrides `edge_insecure`).
    #[arg(long, help_heading = CONNECTION_HEADING)]
    edge_insecure: bool,
    /// Links per tunnel (overrides `connections`).
    #[arg(long, value_parser = at_least_one, help_heading = CONNECTION_HEADING)]
    connections: Option<usize>,
    /// Where recreate tokens are kept (overrides `state_dir`).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Serve /livez, /readyz and /metrics here (overrides `admin_addr`).
    #[arg(long)]
    admin_addr: Option<std::net::SocketAddr>,
}

impl FileArgs {
    /// The file's settings with `NETBORE_*` and these flags over them.
    fn plan(&self) -> Result<netbore_cli::config::Plan, String> {
        use netbore_cli::config;
        let path = config::locate(self.config.as_deref()).map_err(|e| e.to_string())?;
        let overrides = config::Overrides {
            control_url: self.control.clone(),
            token: self.token.clone().map(netbore_tokens::Secret::new),
            edge_ca: self.edge_ca.clone(),
            edge_insecure: self.edge_insecure.then_some(true),
            connections: self.connections,
            state_dir: self.state_dir.clone(),
            admin_addr: self.admin_addr,
        };
        let cfg = config::load(&path, &overrides).map_err(|e| e.to_string())?;
        config::resolve(&path, &cfg).map_err(|e| e.to_string())
    }
}

#[derive(Args)]
struct StartArgs {
    /// The tunnels to run, by their key in [tunnels]; or --all.
    #[arg(value_name = "NAME", conflicts_with = "all")]
    names: Vec<String>,
    /// Run every tunnel of the file.
    #[arg(long)]
    all: bool,
    /// Print machine-readable JSON events on stdout (each with its "tunnel").
    #[arg(long)]
    json: bool,
    /// Log as JSON lines (stderr).
    #[arg(long)]
    log_json: bool,
    #[command(flatten)]
    file: FileArgs,
}

/// The origin and output of `netbore tcp` and `netbore tls`.
#[derive(Args)]
struct RawArgs {
    /// The local service: a port (5432, on 127.0.0.1) or HOST:PORT.
    target: String,
    /// Print machine-readable JSON events on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Also write the public address to this file once the tunnel is live.
    #[arg(long)]
    url_file: Option<PathBuf>,
    /// Seconds to wait for a connection to the origin.
    #[arg(long, default_value_t = DEFAULT_ORIGIN_TIMEOUT.as_secs())]
    origin_timeout: u64,
    /// Where the recreate token is kept so a restart keeps the name and the port.
    #[arg(long, env = "NETBORE_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Log as JSON lines (stderr).
    #[arg(long)]
    log_json: bool,
    /// Serve /livez, /readyz (ready while a link to an edge is up) and /metrics here.
    #[arg(long, env = "NETBORE_ADMIN_ADDR")]
    admin_addr: Option<std::net::SocketAddr>,
}

impl RawArgs {
    /// The same settings as [`Common`] (HTTP-only ones at their defaults).
    fn common(&self) -> Common {
        Common {
            target: self.target.clone(),
            json: self.json,
            url_file: self.url_file.clone(),
            origin_http2: false,
            origin_ca: None,
            origin_insecure: false,
            host_header: "preserve".into(),
            origin_timeout: self.origin_timeout,
            state_dir: self.state_dir.clone(),
            log_json: self.log_json,
            admin_addr: self.admin_addr,
            health_path: netbore_agent::DEFAULT_HEALTH_PATH.into(),
            health_interval: netbore_agent::DEFAULT_HEALTH_INTERVAL.as_secs(),
            // A raw tunnel carries no HTTP requests to show.
            inspect: InspectArgs {
                inspect_addr: ([127, 0, 0, 1], 4040).into(),
                no_inspect: true,
                inspect_show_secrets: false,
            },
            access: AccessArgs {
                access_file: None,
                jwt_key: None,
                jwt_secret_file: None,
                jwt_claims: Vec::new(),
                jwt_audience: None,
                jwt_issuer: None,
                jwt_forward_claims: Vec::new(),
                basic_auth: Vec::new(),
                allow_ip: Vec::new(),
                deny_ip: Vec::new(),
                frame_ancestors: Vec::new(),
                cors_origins: Vec::new(),
                max_body_bytes: None,
            },
        }
    }
}

/// Control and the links of `netbore tcp` and `netbore tls` (as for `netbore http`).
#[derive(Args)]
struct LinkArgs {
    /// Control's REST URL.
    #[arg(
        long,
        env = "NETBORE_CONTROL_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    control: String,
    /// Name to claim (NAME.<domain>; the SNI name of a TLS tunnel); random when not given.
    #[arg(long, env = "NETBORE_NAME")]
    name: Option<String>,
    /// Management token: creates the tunnel or claims a name you hold no recreate
    /// token for.
    #[arg(long, env = "NETBORE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Tunnel credential (nbt_…): runs that named tunnel with no other secret.
    #[arg(
        long,
        env = "NETBORE_TUNNEL_TOKEN",
        hide_env_values = true,
        conflicts_with = "token"
    )]
    tunnel_token: Option<String>,
    /// Extra CA certificate (PEM) to trust for wss:// edges.
    #[arg(long, env = "NETBORE_EDGE_CA")]
    edge_ca: Option<PathBuf>,
    /// Accept any edge certificate (development only).
    #[arg(long)]
    edge_insecure: bool,
    /// Links to keep, each to a distinct edge, so losing one edge loses no traffic.
    #[arg(long, env = "NETBORE_CONNECTIONS", default_value_t = 2, value_parser = at_least_one)]
    connections: usize,
}

/// Who may reach the tunnel (docs/access.md). Without any of these it is public.
#[derive(Args)]
#[command(next_help_heading = "Access (who may reach the tunnel)")]
struct AccessArgs {
    /// JSON access policy (the REST API's `access` object); the flags below add to it.
    #[arg(long, env = "NETBORE_ACCESS_FILE")]
    access_file: Option<PathBuf>,
    /// Viewers need a JWT verified by this PEM public key (Ed25519 or P-256).
    #[arg(long)]
    jwt_key: Option<PathBuf>,
    /// Viewers need a JWT signed with the HS256 secret in this file.
    #[arg(long)]
    jwt_secret_file: Option<PathBuf>,
    /// A claim viewer tokens must carry, NAME=VALUE (repeat for several).
    #[arg(long = "jwt-claim", value_name = "NAME=VALUE")]
    jwt_claims: Vec<String>,
    /// The `aud` viewer tokens must carry.
    #[arg(long)]
    jwt_audience: Option<String>,
    /// The `iss` viewer tokens must carry.
    #[arg(long)]
    jwt_issuer: Option<String>,
    /// Pass this claim to the origin as `X-Netbore-Claim-<NAME>` (repeat for several).
    #[arg(long = "jwt-forward-claim", value_name = "NAME")]
    jwt_forward_claims: Vec<String>,
    /// Viewers need these basic-auth credentials, USER:PASSWORD (repeat for several
    /// users; hashed before they leave this machine).
    #[arg(
        long = "basic-auth",
        value_name = "USER:PASSWORD",
        env = "NETBORE_BASIC_AUTH",
        hide_env_values = true
    )]
    basic_auth: Vec<String>,
    /// Serve only viewers from this CIDR range (repeat for several).
    #[arg(long = "allow-ip", value_name = "CIDR")]
    allow_ip: Vec<String>,
    /// Refuse viewers from this CIDR range (repeat for several).
    #[arg(long = "deny-ip", value_name = "CIDR")]
    deny_ip: Vec<String>,
    /// Only this origin may embed the pages in a frame ('self', 'none' or
    /// https://host; repeat for several).
    #[arg(long = "frame-ancestor", value_name = "ORIGIN")]
    frame_ancestors: Vec<String>,
    /// Allow browser pages from this origin to call the tunnel (CORS; repeat for several).
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// Largest request body a viewer may send (the edge's own limit still applies).
    #[arg(long)]
    max_body_bytes: Option<u64>,
}

impl AccessArgs {
    fn flags(&self) -> netbore_agent::access::AccessFlags {
        netbore_agent::access::AccessFlags {
            access_file: self.access_file.clone(),
            jwt_key: self.jwt_key.clone(),
            jwt_secret_file: self.jwt_secret_file.clone(),
            jwt_claims: self.jwt_claims.clone(),
            jwt_audience: self.jwt_audience.clone(),
            jwt_issuer: self.jwt_issuer.clone(),
            jwt_forward_claims: self.jwt_forward_claims.clone(),
            basic_auth: self
                .basic_auth
                .iter()
                .map(|s| netbore_tokens::Secret::new(s.as_str()))
                .collect(),
            allow_ip: self.allow_ip.clone(),
            deny_ip: self.deny_ip.clone(),
            frame_ancestors: self.frame_ancestors.clone(),
            cors_origins: self.cors_origins.clone(),
            max_body_bytes: self.max_body_bytes,
        }
    }
}

#[derive(Args)]
struct Common {
    /// The local service: a port (3000), host:port, or an http(s):// URL.
    target: String,
    /// Print machine-readable JSON events on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Also write the public URL to this file once the tunnel is live (rewritten if the
    /// URL changes).
    #[arg(long)]
    url_file: Option<PathBuf>,
    /// Speak HTTP/2 to the origin (h2c on http://). gRPC requests use HTTP/2 regardless.
    #[arg(long)]
    origin_http2: bool,
    /// Extra CA certificate (PEM) to trust for an https:// origin.
    #[arg(long)]
    origin_ca: Option<PathBuf>,
    /// Accept any certificate from an https:// origin (self-signed development servers).
    #[arg(long)]
    origin_insecure: bool,
    /// Host header the origin sees: preserve (the public hostname), rewrite (the
    /// origin's host:port), or a literal value.
    #[arg(long, default_value = "preserve")]
    host_header: String,
    /// Seconds to wait for the origin's response head.
    #[arg(long, default_value_t = DEFAULT_ORIGIN_TIMEOUT.as_secs())]
    origin_timeout: u64,
    /// Where the recreate token is kept so a restart keeps the name.
    #[arg(long, env = "NETBORE_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Log as JSON lines (stderr).
    #[arg(long)]
    log_json: bool,
    /// Path the agent probes its origin at (HEAD; healthy for any answer below 500).
    /// While the probe fails, /readyz answers 503 and control reports the tunnel
    /// degraded (origin_unreachable).
    #[arg(long, default_value = netbore_agent::DEFAULT_HEALTH_PATH, env = "NETBORE_HEALTH_PATH")]
    health_path: String,
    /// Seconds between probes of the origin (at least 1).
    #[arg(long, default_value_t = netbore_agent::DEFAULT_HEALTH_INTERVAL.as_secs(), value_parser = clap::value_parser!(u64).range(1..), env = "NETBORE_HEALTH_INTERVAL")]
    health_interval: u64,
    /// Serve /livez, /readyz (ready while a link to an edge is up and the origin
    /// answers its probe) and /metrics here, e.g. for a sidecar's probes.
    #[arg(long, env = "NETBORE_ADMIN_ADDR")]
    admin_addr: Option<std::net::SocketAddr>,
    #[command(flatten)]
    access: AccessArgs,
    #[command(flatten)]
    inspect: InspectArgs,
}

/// The local inspector (docs/inspect.md).
#[derive(Args)]
#[command(next_help_heading = "Inspector (see the traffic)")]
struct InspectArgs {
    /// Serve the inspector (a web page and JSON API of recent requests, with replay)
    /// here; the next free port is taken when this one is in use.
    #[arg(long, env = "NETBORE_INSPECT_ADDR", default_value = "127.0.0.1:4040")]
    inspect_addr: std::net::SocketAddr,
    /// No inspector: requests are printed, not kept.
    #[arg(long, env = "NETBORE_NO_INSPECT")]
    no_inspect: bool,
    /// Show secrets (Authorization, cookies, token query parameters) in the inspector
    /// and the console instead of redacting them.
    #[arg(long)]
    inspect_show_secrets: bool,
}

impl Common {
    fn origin_for(&self, raw: Option<netbore_agent::tcp::TcpKind>) -> Result<OriginConfig, String> {
        Ok(OriginConfig {
            url: match raw {
                None => OriginConfig::parse_target(&self.target)?,
                Some(_) => netbore_agent::tcp::parse_target(&self.target)?,
            },
            http2: self.origin_http2,
            ca_file: self.origin_ca.clone(),
            insecure: self.origin_insecure,
            host_header: match self.host_header.as_str() {
                "preserve" => HostHeader::Preserve,
                "rewrite" => HostHeader::Rewrite,
                v => HostHeader::Fixed(v.to_string()),
            },
            timeout: Duration::from_secs(self.origin_timeout),
        })
    }
}

/// `--connections`: a count of links, at least one (0 would never connect).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("0 links would never connect; give at least 1 (2, the default, survives an edge restart)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a number of links; give 1 or more")),
    }
}

/// jemalloc rather than glibc's malloc: it gives memory freed after a burst back to the
/// OS (see `netbore_telemetry::memory` and docs/decisions.md).
#[global_allocator]
static ALLOCATOR: netbore_telemetry::memory::Jemalloc = netbore_telemetry::memory::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let raw_common;
    let (common, raw_kind) = match &cli.cmd {
        Cmd::Http { common, .. } | Cmd::Dev { common, .. } => (common, None),
        Cmd::Tcp { raw, .. } => {
            raw_common = raw.common();
            (&raw_common, Some(netbore_agent::tcp::TcpKind::Tcp))
        }
        Cmd::Tls { raw, .. } => {
            raw_common = raw.common();
            (&raw_common, Some(netbore_agent::tcp::TcpKind::Tls))
        }
        Cmd::HashPassword => return hash_password(),
        Cmd::Start(args) => return start(args).await,
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => return config_check(file),
        Cmd::Completion { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "netbore",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Cmd::Man { subcommand } => return man(subcommand.as_deref()),
    };
    let (access, limits) = match common.access.flags().build() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // On a terminal the console draws a status block; routine log lines written to the
    // same screen would tear through it, so there only errors are logged unless
    // RUST_LOG says otherwise (stderr sent elsewhere keeps the usual `info`).
    let console_on_terminal = {
        use std::io::IsTerminal;
        !common.json
            && !common.log_json
            && std::io::stdout().is_terminal()
            && std::io::stderr().is_terminal()
    };
    let log_default = if console_on_terminal {
        netbore_cli::console::TERMINAL_LOG_FILTER
    } else {
        netbore_telemetry::DEFAULT_LOG_FILTER
    };
    let telemetry =
        match netbore_telemetry::init_with_default("netbore", common.log_json, log_default) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
    if let Err(e) = netbore_telemetry::memory::return_freed_memory() {
        tracing::warn!(error = %e, "freed memory returns to the OS only while busy");
    }
    let origin = match common.origin_for(raw_kind) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(netbore_telemetry::on_signal(shutdown.clone()));
    let state_dir = common
        .state_dir
        .clone()
        .or_else(netbore_agent::state::default_dir);

    let mut cfg = AgentConfig {
        control_url: String::new(),
        origin,
        name: None,
        token: None,
        state_dir,
        edge_ca_file: None,
        edge_insecure: false,
        drain_grace: netbore_agent::DEFAULT_DRAIN_GRACE,
        connections: 1,
        access,
        limits,
        tunnel_token: None,
        delete_on_exit: false,
        health_path: common.health_path.clone(),
        health_interval: Duration::from_secs(common.health_interval),
    };
    match &cli.cmd {
        Cmd::Http {
            control,
            name,
            token,
            tunnel_token,
            edge_ca,
            edge_insecure,
            connections,
            keep,
            ..
        } => {
            cfg.connections = *connections;
            // A quick tunnel cleans up after itself, as cloudflared's do.
            cfg.delete_on_exit = name.is_none() && tunnel_token.is_none() && !*keep;
            cfg.control_url = control.clone();
            cfg.name = name.clone();
            cfg.token = token.clone();
            cfg.tunnel_token = tunnel_token.clone();
            cfg.edge_ca_file = edge_ca.clone();
            cfg.edge_insecure = *edge_insecure;
        }
        Cmd::Tcp { link, .. } | Cmd::Tls { link, .. } => {
            cfg.connections = link.connections;
            cfg.control_url = link.control.clone();
            cfg.name = link.name.clone();
            cfg.token = link.token.clone();
            cfg.tunnel_token = link.tunnel_token.clone();
            cfg.edge_ca_file = link.edge_ca.clone();
            cfg.edge_insecure = link.edge_insecure;
        }
        Cmd::Dev { port, .. } => {
            let public = match tokio::net::TcpListener::bind(("127.0.0.1", *port)).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!(
                        "note: port {port} is not available ({e}); using a free port instead"
                    );
                    match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("error: cannot bind a loopback port: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                }
            };
            let stack = match netbore_cli::dev::start(public, shutdown.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: starting the in-process control and edge failed: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            tracing::info!(public = %stack.public, control = %stack.control, agents = %stack.agents, "dev stack listening");
            cfg.control_url = stack.control_url();
            // A dev run is throwaway: do not reuse names across runs.
            cfg.state_dir = None;
        }
        Cmd::HashPassword
        | Cmd::Start(_)
        | Cmd::Config { .. }
        | Cmd::Completion { .. }
        | Cmd::Man { .. } => unreachable!("handled before start-up"),
    }

    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let metrics = std::sync::Arc::new(netbore_agent::metrics::AgentMetrics::default());
    if let Some(addr) = common.admin_addr {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                tracing::info!(admin = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "agent probes listening");
                let (r, m) = (ready.clone(), metrics.clone());
                let readiness: Readiness = std::sync::Arc::new(move || {
                    if !r.load(std::sync::atomic::Ordering::Acquire) {
                        return (false, "not ready: no edge connection\n".to_string());
                    }
                    match m.origin.lock().clone() {
                        Some((state, detail)) if !state.is_healthy() => (
                            false,
                            format!(
                                "not ready: origin unreachable ({}): {detail}; start the local service or fix the agent's target or --health-path\n",
                                state.as_str()
                            ),
                        ),
                        _ => (
                            true,
                            format!("ready: connected to an edge{}\n", spare_note(&m)),
                        ),
                    }
                });
                tokio::spawn(serve_probes(l, readiness, metrics.clone()));
            }
            Err(e) => {
                eprintln!("error: cannot listen for probes on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    // The console hears every request; the inspector keeps them (unless --no-inspect).
    let (console_tx, mut console_rx) =
        mpsc::channel::<ConsoleEvent>(netbore_agent::inspect::CONSOLE_QUEUE);
    let show_secrets = common.inspect.inspect_show_secrets;
    let store = (!common.inspect.no_inspect).then(|| {
        Arc::new(Store::new(InspectConfig {
            show_secrets,
            ..InspectConfig::default()
        }))
    });
    let observer = Arc::new(Observer::new(store.clone(), Some(console_tx), show_secrets));
    let mut inspector_url = None;
    if let Some(store) = &store {
        let listener = match netbore_agent::inspect::server::bind(common.inspect.inspect_addr).await
        {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "error: cannot serve the inspector on {}: {e}; give another --inspect-addr, or --no-inspect",
                    common.inspect.inspect_addr
                );
                return ExitCode::FAILURE;
            }
        };
        let addr = listener.local_addr().expect("bound");
        let replayer = match netbore_agent::origin::Origin::new(cfg.origin.clone()) {
            Ok(o) => o.with_observer(Some(observer.clone())),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        let ins = netbore_agent::inspect::server::Inspector::new(store.clone(), replayer, addr);
        tokio::spawn(netbore_agent::inspect::server::serve(
            listener,
            ins,
            shutdown.clone(),
        ));
        tracing::info!(inspector = %addr, "inspector listening");
        inspector_url = Some(format!("http://{addr}"));
    }
    let mut console = Console::new(cfg.origin.url.to_string(), inspector_url.clone());
    let (tx, mut rx) = mpsc::unbounded_channel::<AgentEvent>();
    let json = common.json;
    if let Some(u) = &inspector_url {
        if json {
            println!("{}", serde_json::json!({"event": "inspector", "url": u}));
        } else if !console.tty {
            eprintln!("inspector: {u}");
        }
    }
    let url_file = common.url_file.clone();
    let ready2 = ready.clone();
    let hint = (cfg.control_url == netbore_cli::config::DEFAULT_CONTROL_URL)
        .then(|| cfg.control_url.clone());
    let printer = tokio::spawn(async move {
        let mut hinted = false;
        // The URL last printed and written: a new one (a quick tunnel that lost its
        // name) is printed and written again, so neither keeps a dead URL.
        let mut shown: Option<String> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut burst = Vec::new();
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => ev,
                    None => break,
                },
                Some(c) = console_rx.recv() => {
                    // The lines queued now go out in one write (one redraw of the block on
                    // a terminal), then the printer lingers so the next burst gathers
                    // instead of each request waking it and writing alone.
                    burst.clear();
                    let mut next = Some(c);
                    let mut n = 0;
                    while let Some(c) = next {
                        if json {
                            let _ = writeln!(burst, "{}", serde_json::to_string(&c).expect("serializable"));
                        } else {
                            console.line(&c, &mut burst);
                        }
                        n += 1;
                        next = if n < netbore_cli::console::CONSOLE_BURST {
                            console_rx.try_recv().ok()
                        } else {
                            None
                        };
                    }
                    if console.tty && !json {
                        console.draw(&mut burst);
                    }
                    {
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(&burst);
                        let _ = out.flush();
                    }
                    tokio::time::sleep(netbore_cli::console::CONSOLE_LINGER).await;
                    continue;
                }
                _ = tick.tick(), if console.tty && !json => {
                    console.draw(&mut std::io::stdout().lock());
                    continue;
                }
            };
            let up = match &ev {
                AgentEvent::Live { links, .. } | AgentEvent::Reconnecting { links, .. } => {
                    Some(*links > 0)
                }
                AgentEvent::Stopped => Some(false),
                AgentEvent::UrlChanged { .. } | AgentEvent::Warning { .. } => None,
            };
            if let Some(up) = up {
                ready2.store(up, std::sync::atomic::Ordering::Release);
            }
            if let (AgentEvent::Reconnecting { reason, .. }, Some(url), None, false) =
                (&ev, &hint, &shown, hinted)
                && first_run_hint(url, reason)
            {
                hinted = true;
            }
            let new_url = match &ev {
                AgentEvent::Live { url, .. } if shown.as_ref() != Some(url) => Some(url.clone()),
                _ => None,
            };
            // The file first, so a script that sees the line can read the file.
            if let (Some(url), Some(f)) = (&new_url, &url_file)
                && let Err(e) = write_url_file(f, url)
            {
                eprintln!("warning: cannot write the URL to {}: {e}", f.display());
            }
            let mut out = std::io::stdout().lock();
            if json {
                let _ = writeln!(out, "{}", serde_json::to_string(&ev).expect("serializable"));
            } else if console.tty {
                console.agent_event(&ev, &mut out);
                match &ev {
                    AgentEvent::UrlChanged {
                        old_url,
                        url,
                        reason,
                        ..
                    } => eprintln!(
                        "warning: the public URL changed from {old_url} to {url} ({reason}); the old one no longer reaches this service"
                    ),
                    AgentEvent::Warning { message } => eprintln!("warning: {message}"),
                    _ => {}
                }
            } else {
                match &ev {
                    AgentEvent::Live { url, origin, .. } if new_url.is_some() => {
                        let _ = writeln!(out, "{url} -> {origin}");
                    }
                    AgentEvent::UrlChanged {
                        old_url,
                        url,
                        reason,
                        ..
                    } => {
                        eprintln!(
                            "warning: the public URL changed from {old_url} to {url} ({reason}); the old one no longer reaches this service"
                        );
                    }
                    AgentEvent::Warning { message } => eprintln!("warning: {message}"),
                    _ => {}
                }
            }
            let _ = out.flush();
            if new_url.is_some() {
                shown = new_url;
            }
        }
        console.finish(&mut std::io::stdout().lock());
    });
    let r = match raw_kind {
        None => {
            netbore_agent::run_observed(cfg, metrics, Some(observer), tx, shutdown.clone()).await
        }
        Some(kind) => netbore_agent::tcp::run_tcp(cfg, kind, metrics, tx, shutdown.clone()).await,
    };
    shutdown.cancel();
    let _ = printer.await;
    telemetry.shutdown().await;
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(AgentError::Fatal { code, message }) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "error", "code": code, "message": message})
                );
            }
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// Probe answers: (ready, the `/readyz` body).
type Readiness = std::sync::Arc<dyn Fn() -> (bool, String) + Send + Sync>;

/// What `/readyz` adds when spare links wait for an edge of their own.
fn spare_note(m: &netbore_agent::metrics::AgentMetrics) -> String {
    match m.spare_links_waiting.get() {
        n if n <= 0 => String::new(),
        n => format!(
            "; {n} spare link(s) waiting: fewer distinct edges than --connections asks (not a failure; retried every few minutes)"
        ),
    }
}

/// Prints, once, how to point the agent at a control when none answers at the default
/// address: a first run without `--control` usually means there is none yet.
fn first_run_hint(url: &str, reason: &str) -> bool {
    if !reason.starts_with(&format!("control at {url}")) {
        return false;
    }
    eprintln!(
        "hint: no control answers at {url} (the default). Pass --control URL (or set NETBORE_CONTROL_URL) to use your Netbore control, or run `netbore dev 3000` to try control, an edge and this agent on this machine."
    );
    true
}

/// `netbore config check`: the effective settings, secrets redacted, or what is wrong.
fn config_check(file: &FileArgs) -> ExitCode {
    let plan = match file.plan() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    for t in &plan.tunnels {
        if let Err(e) = netbore_cli::start::supported(t.kind) {
            eprintln!("error: tunnel '{}': {e}", t.key);
            return ExitCode::from(2);
        }
    }
    print!("{}", plan.redacted());
    eprintln!(
        "ok: {} is valid ({} tunnels)",
        plan.path.display(),
        plan.tunnels.len()
    );
    ExitCode::SUCCESS
}

/// `netbore man [SUBCOMMAND]`: the roff page on stdout.
fn man(sub: Option<&str>) -> ExitCode {
    let mut cmd = Cli::command();
    cmd.build();
    let page = match sub {
        None => cmd,
        Some(name) => match cmd.find_subcommand(name) {
            // A one-shot command: the page's name lives until the process exits.
            Some(c) => c
                .clone()
                .name(&*Box::leak(format!("netbore-{name}").into_boxed_str())),
            None => {
                let names: Vec<_> = cmd
                    .get_subcommands()
                    .map(|c| c.get_name().to_string())
                    .collect();
                eprintln!(
                    "error: no subcommand '{name}'; pages exist for: {}",
                    names.join(", ")
                );
                return ExitCode::from(2);
            }
        },
    };
    let mut out = std::io::stdout().lock();
    match clap_mangen::Man::new(page).render(&mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the man page: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `netbore start`: the file's tunnels (the named ones, or `--all`) in this process.
async fn start(args: &StartArgs) -> ExitCode {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (plans, admin) = match args.file.plan().and_then(|p| {
        p.select(&args.names, args.all)
            .map(|t| (t, p.admin_addr))
            .map_err(|e| e.to_string())
    }) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    for t in &plans {
        if let Err(e) = netbore_cli::start::supported(t.kind) {
            eprintln!("error: tunnel '{}': {e}", t.key);
            return ExitCode::from(2);
        }
    }
    let telemetry = match netbore_telemetry::init("netbore", args.log_json) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = netbore_telemetry::memory::return_freed_memory() {
        tracing::warn!(error = %e, "freed memory returns to the OS only while busy");
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(netbore_telemetry::on_signal(shutdown.clone()));
    let metrics = Arc::new(netbore_agent::metrics::AgentMetrics::default());
    // Links up per tunnel, in plan order.
    let keys: Vec<String> = plans.iter().map(|p| p.key.clone()).collect();
    let up: Arc<Vec<AtomicUsize>> = Arc::new(keys.iter().map(|_| AtomicUsize::new(0)).collect());
    if let Some(addr) = admin {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                tracing::info!(admin = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "agent probes listening");
                let (u, k, m) = (up.clone(), keys.clone(), metrics.clone());
                let readiness: Readiness = Arc::new(move || {
                    let down: Vec<&str> = k
                        .iter()
                        .zip(u.iter())
                        .filter(|(_, n)| n.load(Ordering::Acquire) == 0)
                        .map(|(k, _)| k.as_str())
                        .collect();
                    if down.is_empty() {
                        (
                            true,
                            format!(
                                "ready: every tunnel is connected to an edge{}\n",
                                spare_note(&m)
                            ),
                        )
                    } else {
                        (
                            false,
                            format!("not ready: no edge connection for {}\n", down.join(", ")),
                        )
                    }
                });
                tokio::spawn(serve_probes(l, readiness, metrics.clone()));
            }
            Err(e) => {
                eprintln!("error: cannot listen for probes on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let hint = plans
        .iter()
        .any(|p| p.agent.control_url == netbore_cli::config::DEFAULT_CONTROL_URL)
        .then(|| netbore_cli::config::DEFAULT_CONTROL_URL.to_string());
    let (tx, mut rx) = mpsc::unbounded_channel::<netbore_cli::start::TunnelEvent>();
    let json = args.json;
    let (u, k) = (up.clone(), keys.clone());
    let printer = tokio::spawn(async move {
        let mut hinted = false;
        let mut shown: std::collections::HashMap<String, String> = Default::default();
        while let Some(te) = rx.recv().await {
            let i = k.iter().position(|k| *k == te.tunnel);
            match (&te.event, i) {
                (
                    AgentEvent::Live { links, .. } | AgentEvent::Reconnecting { links, .. },
                    Some(i),
                ) => u[i].store(*links, Ordering::Release),
                (AgentEvent::Stopped, Some(i)) => u[i].store(0, Ordering::Release),
                _ => {}
            }
            if let (AgentEvent::Reconnecting { reason, .. }, Some(url), false) =
                (&te.event, &hint, hinted)
                && shown.is_empty()
                && first_run_hint(url, reason)
            {
                hinted = true;
            }
            let mut out = std::io::stdout().lock();
            if json {
                let mut v = serde_json::to_value(&te.event).expect("serializable");
                v["tunnel"] = serde_json::Value::String(te.tunnel.clone());
                let _ = writeln!(out, "{v}");
            } else {
                match &te.event {
                    AgentEvent::Live { url, origin, .. } if shown.get(&te.tunnel) != Some(url) => {
                        let _ = writeln!(out, "{}: {url} -> {origin}", te.tunnel);
                        shown.insert(te.tunnel.clone(), url.clone());
                    }
                    AgentEvent::UrlChanged {
                        old_url,
                        url,
                        reason,
                        ..
                    } => eprintln!(
                        "warning: {}: the public URL changed from {old_url} to {url} ({reason}); the old one no longer reaches this service",
                        te.tunnel
                    ),
                    AgentEvent::Warning { message } => {
                        eprintln!("warning: {}: {message}", te.tunnel)
                    }
                    _ => {}
                }
            }
            let _ = out.flush();
        }
    });
    let outcomes = netbore_cli::start::run_all(plans, metrics, tx, shutdown.clone()).await;
    shutdown.cancel();
    let _ = printer.await;
    telemetry.shutdown().await;
    let mut failed = false;
    for o in outcomes {
        if let Err(AgentError::Fatal { code, message }) = o.result {
            failed = true;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "error", "tunnel": o.tunnel, "code": code, "message": message})
                );
            }
            eprintln!("error: tunnel '{}': {message}", o.tunnel);
        }
    }
    if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// Replaces the URL file whole (write, then rename), so a reader never sees half a URL.
fn write_url_file(path: &std::path::Path, url: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{url}\n"))?;
    std::fs::rename(&tmp, path)
}

/// `netbore hash-password`: one line from stdin in, its hash out.
fn hash_password() -> ExitCode {
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() {
        eprintln!("error: cannot read the password from stdin");
        return ExitCode::from(2);
    }
    let pw = line.trim_end_matches(['\r', '\n']);
    if pw.is_empty() {
        eprintln!(
            "error: the password is empty; type it on stdin, e.g. `echo -n 'pw' | netbore hash-password`"
        );
        return ExitCode::from(2);
    }
    println!("{}", netbore_tokens::access::hash_password(pw));
    ExitCode::SUCCESS
}

/// `/livez` (the process runs), `/readyz` (a link to an edge is up) and `/metrics`
/// (Prometheus), through the admin listener the three binaries share.
async fn serve_probes(
    listener: tokio::net::TcpListener,
    ready: Readiness,
    metrics: std::sync::Arc<netbore_agent::metrics::AgentMetrics>,
) {
    netbore_telemetry::admin::Admin::new(move |format| metrics.render(format))
        .with_readiness(move || match ready() {
            (true, detail) => Ok(detail.trim_end().to_string()),
            (false, detail) => Err(detail.trim_end().to_string()),
        })
        // The probes answer until the process exits.
        .serve(listener, tokio_util::sync::CancellationToken::new())
        .await
}
