//! `netbore-control`: config, telemetry, bind, serve, drain on signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use netbore_control::{ControlConfig, EdgeEntry};
use netbore_tokens::{KeySet, Secret};
use tokio_util::sync::CancellationToken;

/// Time open requests get to finish after SIGTERM or SIGINT before control exits.
const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// How long control waits at start for its database to answer before it exits.
const DATABASE_START_WAIT: Duration = Duration::from_secs(60);
/// Pause between attempts to reach the database at start.
const DATABASE_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Netbore control: tokens, names and candidate edges.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// REST listen address.
    #[arg(long, env = "NETBORE_REST_ADDR", default_value = "0.0.0.0:8080")]
    rest_addr: SocketAddr,
    /// gRPC listen address (operators and edges).
    #[arg(long, env = "NETBORE_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    grpc_addr: SocketAddr,
    /// Tunnels are NAME.<domain>.
    #[arg(long, env = "NETBORE_DOMAIN", default_value = "localhost")]
    domain: String,
    /// Public URL of a tunnel; {name} is replaced.
    #[arg(
        long,
        env = "NETBORE_PUBLIC_URL_TEMPLATE",
        default_value = "http://{name}.localhost:8000"
    )]
    public_url_template: String,
    /// Token issuer.
    #[arg(long, env = "NETBORE_ISSUER", default_value = "netbore-control")]
    issuer: String,
    /// A candidate edge, as id=ID,url=ws://HOST:PORT/v1/connect,region=REGION (repeatable).
    #[arg(long = "edge", env = "NETBORE_EDGES", value_delimiter = ';')]
    edges: Vec<String>,
    /// File holding the bootstrap credential (NETBORE_BOOTSTRAP_TOKEN also works).
    #[arg(long, env = "NETBORE_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,
    /// Ed25519 PKCS#8 PEM signing keys; the first signs. When none is given, control
    /// signs with a key it generates once and keeps in its database.
    #[arg(
        long = "signing-key",
        env = "NETBORE_SIGNING_KEYS",
        value_delimiter = ','
    )]
    signing_keys: Vec<PathBuf>,
    /// Lifetime of ephemeral tokens (the agent's pass at an edge), in seconds.
    #[arg(long, env = "NETBORE_EPHEMERAL_TTL_SECS", default_value_t = netbore_control::DEFAULT_EPHEMERAL_TTL.as_secs())]
    ephemeral_ttl_secs: u64,
    /// Default lifetime of recreate tokens, in seconds.
    #[arg(long, env = "NETBORE_RECREATE_TTL_SECS", default_value_t = netbore_control::DEFAULT_RECREATE_TTL.as_secs())]
    recreate_ttl_secs: u64,
    /// Longest recreate token lifetime a caller may ask for, in seconds.
    #[arg(long, env = "NETBORE_RECREATE_TTL_MAX_SECS", default_value_t = netbore_control::DEFAULT_RECREATE_TTL_MAX.as_secs())]
    recreate_ttl_max_secs: u64,
    /// Lifetime (and maximum) of management tokens, in seconds.
    #[arg(long, env = "NETBORE_MANAGEMENT_TTL_SECS", default_value_t = netbore_control::DEFAULT_MANAGEMENT_TTL.as_secs())]
    management_ttl_secs: u64,
    /// How long an anonymous tunnel's name stays held after its last agent link closed,
    /// in seconds (a named tunnel keeps its name until it is deleted).
    #[arg(long, env = "NETBORE_NAME_HOLD_SECS", default_value_t = netbore_control::DEFAULT_NAME_HOLD.as_secs())]
    name_hold_secs: u64,
    /// Days the audit trail keeps events (older ones are pruned hourly); 0 keeps them
    /// forever.
    #[arg(long, env = "NETBORE_AUDIT_RETENTION_DAYS", default_value_t = netbore_control::DEFAULT_AUDIT_RETENTION_DAYS)]
    audit_retention_days: u64,
    /// A tunnel with no agent link for this many seconds is `offline` in its status
    /// (before that, `degraded` with reason no_link: the agent may be reconnecting).
    #[arg(long, env = "NETBORE_OFFLINE_AFTER_SECS", default_value_t = netbore_control::status::DEFAULT_OFFLINE_AFTER.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    offline_after_secs: u64,
    /// Most DNS labels a tunnel name may have, e.g. 2 allows
    /// `localhost-8726.pod-myslug.<domain>` (the edges' certificate must then cover
    /// every level: see docs/configuration.md).
    #[arg(long, env = "NETBORE_MAX_NAME_LABELS", default_value_t = netbore_control::names::DEFAULT_MAX_LABELS, value_parser = clap::value_parser!(u64).range(1..=netbore_control::names::MAX_LABELS as u64))]
    max_name_labels: u64,
    /// Require a management token to create a tunnel (an agent reconnecting with its
    /// own tunnel's recreate token needs none).
    #[arg(long, env = "NETBORE_REQUIRE_TOKEN")]
    require_token: bool,
    /// Anonymous creations (no management or recreate token) one client address may
    /// make at once before it must wait.
    #[arg(long, env = "NETBORE_ANONYMOUS_CREATE_BURST", default_value_t = netbore_control::ratelimit::DEFAULT_ANONYMOUS_CREATE_BURST)]
    anonymous_create_burst: u32,
    /// Anonymous creations one client address regains per minute (429 `rate_limited`
    /// beyond the burst); 0 removes the limit.
    #[arg(long, env = "NETBORE_ANONYMOUS_CREATE_PER_MINUTE", default_value_t = netbore_control::ratelimit::DEFAULT_ANONYMOUS_CREATE_PER_MINUTE)]
    anonymous_create_per_minute: u32,
    /// Load balancer ranges whose X-Forwarded-For names the client (comma-separated
    /// CIDRs); other peers are the client themselves.
    #[arg(long, env = "NETBORE_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<netbore_tokens::access::Cidr>,
    /// Ports TCP tunnels are given, LO-HI (e.g. 20000-20999): each TCP tunnel keeps one
    /// for its life. Give the edges the same range. Without it, no TCP tunnels.
    #[arg(long, env = "NETBORE_TCP_PORTS")]
    tcp_ports: Option<netbore_tokens::PortRange>,
    /// Redis shared by every control replica for live state: edge reports and
    /// deletions (redis://[:PASSWORD@]HOST:PORT[/DB]). Without it, live state is kept
    /// in this process and only one replica may run.
    #[arg(long, env = "NETBORE_REDIS_URL")]
    redis_url: Option<String>,
    /// The database of durable state (tunnels, names, tombstones, a generated signing
    /// key): sqlite:///PATH (one replica), sqlite::memory: (kept nowhere) or
    /// postgres://USER@HOST:PORT/DB (several replicas).
    #[arg(long, env = "NETBORE_DATABASE_URL", default_value = netbore_control::sql_store::DEFAULT_DATABASE_URL)]
    database_url: String,
    /// File holding the PostgreSQL password, when --database-url carries none
    /// (NETBORE_DATABASE_PASSWORD also works).
    #[arg(long, env = "NETBORE_DATABASE_PASSWORD_FILE")]
    database_password_file: Option<PathBuf>,
    /// Admin address serving /metrics (Prometheus text), /livez and, unless
    /// --dashboard-addr is given, the operator dashboard (/dashboard/); off unless given.
    /// Keep it off the network the REST port is exposed on.
    #[arg(long, env = "NETBORE_ADMIN_ADDR")]
    admin_addr: Option<SocketAddr>,
    /// Serve the operator dashboard (/dashboard/, log in with an API key that has
    /// tunnels:read) on this address instead of on the admin listener (--admin-addr).
    /// Without either, no dashboard.
    #[arg(long, env = "NETBORE_DASHBOARD_ADDR")]
    dashboard_addr: Option<SocketAddr>,
    /// An edge credential control accepts on EdgeService, as PATTERN=sha256:HEX: the
    /// SHA-256 of the edge's token, bound to an edge id, an id prefix ending in '*', or
    /// '*' (repeatable; ';'-separated in the environment). Without any, every edge call
    /// is refused.
    #[arg(
        long = "edge-credential",
        env = "NETBORE_EDGE_CREDENTIALS",
        value_delimiter = ';'
    )]
    edge_credentials: Vec<String>,
    /// File of edge credentials, one PATTERN=sha256:HEX per line (# comments), e.g.
    /// mounted from a Secret; read at start.
    #[arg(long, env = "NETBORE_EDGE_CREDENTIALS_FILE")]
    edge_credentials_file: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long, env = "NETBORE_LOG_JSON")]
    log_json: bool,
}

fn parse_edge(s: &str) -> anyhow::Result<EdgeEntry> {
    let mut e = EdgeEntry {
        edge_id: String::new(),
        edge_url: String::new(),
        region: "default".into(),
    };
    for kv in s.split(',').filter(|kv| !kv.trim().is_empty()) {
        match kv.trim().split_once('=') {
            Some(("id", v)) => e.edge_id = v.into(),
            Some(("url", v)) => e.edge_url = v.into(),
            Some(("region", v)) => e.region = v.into(),
            _ => {
                anyhow::bail!("--edge '{s}': expected id=ID,url=ws://HOST:PORT/v1/connect,region=R")
            }
        }
    }
    anyhow::ensure!(
        !e.edge_id.is_empty()
            && (e.edge_url.starts_with("ws://") || e.edge_url.starts_with("wss://")),
        "--edge '{s}': id and a ws:// or wss:// url are required"
    );
    Ok(e)
}

/// jemalloc rather than glibc's malloc: it gives memory freed after a burst back to the
/// OS (see `netbore_telemetry::memory` and docs/decisions.md).
#[global_allocator]
static ALLOCATOR: netbore_telemetry::memory::Jemalloc = netbore_telemetry::memory::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = netbore_telemetry::init("netbore-control", args.log_json)?;
    if let Err(e) = netbore_telemetry::memory::return_freed_memory() {
        tracing::warn!(error = %e, "freed memory returns to the OS only while busy");
    }
    let mut signals = Signals::install()?;
    let edges = args
        .edges
        .iter()
        .map(|s| parse_edge(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bootstrap = match (
        &args.bootstrap_token_file,
        std::env::var("NETBORE_BOOTSTRAP_TOKEN"),
    ) {
        (Some(f), _) => Some(Secret::new(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the bootstrap credential from {}", f.display()))?
                .trim(),
        )),
        (None, Ok(t)) if !t.is_empty() => Some(Secret::new(t)),
        _ => None,
    };
    let keys = if args.signing_keys.is_empty() {
        None
    } else {
        Some(KeySet::from_pem_files(&args.signing_keys).context("loading signing keys")?)
    };
    let mut edge_credentials = match &args.edge_credentials_file {
        Some(f) => netbore_control::edge_auth::EdgeCredentials::from_file(f)
            .map_err(|e| anyhow::anyhow!("--edge-credentials-file: {e}"))?,
        None => Default::default(),
    };
    for c in args
        .edge_credentials
        .iter()
        .filter(|c| !c.trim().is_empty())
    {
        edge_credentials.0.push(
            netbore_control::edge_auth::EdgeCredential::parse(c)
                .map_err(|e| anyhow::anyhow!("--edge-credential: {e}"))?,
        );
    }
    if edge_credentials.is_empty() {
        tracing::warn!(
            "no edge credentials configured (--edge-credential, --edge-credentials-file): every edge link is refused and only --edge entries are candidates"
        );
    }
    let password = match (
        &args.database_password_file,
        std::env::var("NETBORE_DATABASE_PASSWORD"),
    ) {
        (Some(f), _) => Some(Secret::new(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the database password from {}", f.display()))?
                .trim(),
        )),
        (None, Ok(p)) if !p.is_empty() => Some(Secret::new(p)),
        _ => None,
    };
    let database_url = match &password {
        Some(p) => netbore_control::sql_store::with_password(&args.database_url, p)
            .context("invalid configuration")?,
        None => Secret::new(args.database_url.clone()),
    };
    let shown_db = netbore_control::sql_store::redact_url(&args.database_url);
    let config = ControlConfig {
        domain: args.domain.clone(),
        public_url_template: args.public_url_template.clone(),
        issuer: args.issuer.clone(),
        edges,
        bootstrap_token: bootstrap,
        require_token: args.require_token,
        ephemeral_ttl: Duration::from_secs(args.ephemeral_ttl_secs),
        recreate_ttl_default: Duration::from_secs(args.recreate_ttl_secs),
        recreate_ttl_max: Duration::from_secs(args.recreate_ttl_max_secs),
        management_ttl: Duration::from_secs(args.management_ttl_secs),
        name_hold: Duration::from_secs(args.name_hold_secs),
        audit_retention_days: args.audit_retention_days,
        offline_after: Duration::from_secs(args.offline_after_secs),
        max_name_labels: args.max_name_labels as usize,
        redis_url: args.redis_url.clone().map(Secret::new),
        anonymous_create_burst: args.anonymous_create_burst,
        anonymous_create_per_minute: args.anonymous_create_per_minute,
        trusted_proxies: args.trusted_proxies.clone(),
        tcp_ports: args.tcp_ports,
        edge_credentials,
        database_url,
    };
    config.validate().context("invalid configuration")?;
    let generated = keys.is_none();
    let control = open_control(config, keys, &shown_db).await?;
    if generated {
        tracing::info!(
            database = %shown_db,
            "no signing keys configured; signing with the key kept in the database (tokens survive a restart)"
        );
    }
    let rest = tokio::net::TcpListener::bind(args.rest_addr)
        .await
        .with_context(|| format!("binding REST on {}", args.rest_addr))?;
    tracing::info!(addr = %rest.local_addr()?, "REST listening");
    let grpc = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("binding gRPC on {}", args.grpc_addr))?;
    tracing::info!(addr = %grpc.local_addr()?, "gRPC listening");
    let admin = match args.admin_addr {
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the admin listener (--admin-addr) on {a}"))?;
            if args.dashboard_addr.is_none() {
                tracing::info!(addr = %l.local_addr()?, "admin (/metrics, /dashboard/) listening");
            } else {
                tracing::info!(addr = %l.local_addr()?, "admin (/metrics) listening");
            }
            Some(l)
        }
        None => None,
    };
    let dashboard = match args.dashboard_addr {
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a).await.with_context(|| {
                format!("binding the dashboard listener (--dashboard-addr) on {a}")
            })?;
            tracing::info!(addr = %l.local_addr()?, "dashboard (/dashboard/) listening");
            Some(l)
        }
        None => None,
    };
    tracing::info!(
        domain = %args.domain,
        edges = control.edges().len(),
        signing_kid = %control.jwks().keys.last().map(|k| k.kid.as_str()).unwrap_or(""),
        bootstrap = control.config().bootstrap_token.is_some(),
        edge_credentials = control.config().edge_credentials.0.len(),
        database = %shown_db,
        live_state = if control.config().redis_url.is_some() { "redis" } else { "in process" },
        "control ready"
    );

    let shutdown = CancellationToken::new();
    // The admin port outlives the drain, so the last counts can still be scraped.
    let admin_stop = CancellationToken::new();
    match (admin, dashboard) {
        (Some(l), None) => {
            tokio::spawn(netbore_control::dashboard::serve(
                l,
                netbore_control::dashboard::admin_router(control.clone()),
                admin_stop.clone(),
            ));
        }
        (admin, Some(d)) => {
            if let Some(l) = admin {
                tokio::spawn(netbore_control::metrics::serve_admin(
                    l,
                    control.clone(),
                    admin_stop.clone(),
                ));
            }
            tokio::spawn(netbore_control::dashboard::serve(
                d,
                netbore_control::dashboard::standalone_router(control.clone()),
                shutdown.clone(),
            ));
        }
        (None, None) => {}
    }
    let mut rest_task = tokio::spawn(netbore_control::serve_rest(
        rest,
        control.clone(),
        shutdown.clone(),
    ));
    let mut grpc_task = tokio::spawn(netbore_control::serve_grpc(grpc, control, shutdown.clone()));

    // Run until a signal, or until a server stops by itself (which is a failure).
    let failure: Option<anyhow::Error> = tokio::select! {
        sig = signals.wait() => {
            tracing::info!(signal = sig, grace = ?DRAIN_GRACE, "shutdown requested; draining");
            None
        }
        r = &mut rest_task => Some(anyhow::anyhow!("the REST server stopped: {}", outcome(r.map(|r| r.map_err(anyhow::Error::from))))),
        r = &mut grpc_task => Some(anyhow::anyhow!("the gRPC server stopped: {}", outcome(r))),
    };
    shutdown.cancel();
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        if !rest_task.is_finished() {
            let _ = (&mut rest_task).await;
        }
        if !grpc_task.is_finished() {
            let _ = (&mut grpc_task).await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?DRAIN_GRACE, "requests still open after the grace period; stopping anyway");
    }
    admin_stop.cancel();
    let r = match failure {
        Some(e) => Err(e),
        None => {
            tracing::info!("control stopped");
            Ok(())
        }
    };
    telemetry.shutdown().await;
    r
}

/// Opens the database (migrating it) and Redis, retrying a database that does not
/// answer yet for [`DATABASE_START_WAIT`] (PostgreSQL starting beside control); a bad
/// setting fails at once.
async fn open_control(
    config: ControlConfig,
    keys: Option<KeySet>,
    shown_db: &str,
) -> anyhow::Result<netbore_control::Control> {
    let deadline = tokio::time::Instant::now() + DATABASE_START_WAIT;
    let mut warned = false;
    loop {
        match netbore_control::Control::open(config.clone(), keys.clone()).await {
            Ok(c) => return Ok(c),
            Err(netbore_control::OpenError::Config(e)) => {
                return Err(anyhow::Error::new(e).context("invalid configuration"));
            }
            Err(netbore_control::OpenError::Store(e)) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(anyhow::Error::new(e).context(format!(
                        "the database {shown_db} did not answer within {} s",
                        DATABASE_START_WAIT.as_secs()
                    )));
                }
                if !warned {
                    tracing::warn!(error = %e, "the database is not usable yet; retrying");
                    warned = true;
                }
                tokio::time::sleep(DATABASE_RETRY_INTERVAL).await;
            }
        }
    }
}

fn outcome(r: Result<anyhow::Result<()>, tokio::task::JoinError>) -> String {
    match r {
        Ok(Ok(())) => "it returned".into(),
        Ok(Err(e)) => format!("{e:#}"),
        Err(e) => format!("it panicked: {e}"),
    }
}

/// SIGTERM (Kubernetes) and SIGINT (Ctrl-C), installed before anything is bound so a
/// signal that arrives early still drains instead of killing the process.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Waits for either and says which.
    async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
