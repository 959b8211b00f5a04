//! `netbore-edge`: config, telemetry, bind, serve, drain on signal.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use netbore_edge::auth::JwksAuth;
use netbore_edge::{Edge, EdgeConfig};
use tokio_util::sync::CancellationToken;

/// The Netbore edge: serves viewers at NAME.<domain> through agents' tunnels.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address for viewer traffic (HTTP/1.1 and h2c).
    #[arg(long, env = "NETBORE_PUBLIC_ADDR", default_value = "0.0.0.0:8000")]
    public_addr: SocketAddr,
    /// Address agents connect to (WebSocket at /v1/connect).
    #[arg(long, env = "NETBORE_AGENT_ADDR", default_value = "0.0.0.0:8001")]
    agent_addr: SocketAddr,
    /// Admin address for /livez and /readyz.
    #[arg(long, env = "NETBORE_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    admin_addr: SocketAddr,
    /// Ports of TCP tunnels, LO-HI (e.g. 20000-20999): the edge listens on each and
    /// relays a connection to the tunnel control gave that port. Give control the same
    /// range. Without it, no TCP tunnels here.
    #[arg(long, env = "NETBORE_TCP_PORTS")]
    tcp_ports: Option<netbore_tokens::PortRange>,
    /// Address the TCP tunnel ports listen on.
    #[arg(long, env = "NETBORE_TCP_HOST", default_value = "0.0.0.0")]
    tcp_host: std::net::IpAddr,
    /// Load balancer ranges whose X-Forwarded-For / X-Forwarded-Proto are believed
    /// (comma-separated CIDRs); others' are replaced.
    #[arg(long, env = "NETBORE_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<netbore_edge::config::Cidr>,
    /// Share of a tunnel's request slots one client address may hold, in percent
    /// (1-100; 429 `client_busy` beyond), so one client cannot take them all.
    #[arg(long, env = "NETBORE_CLIENT_SLOT_SHARE", default_value_t = netbore_edge::fair::DEFAULT_CLIENT_SLOT_SHARE, value_parser = clap::value_parser!(u8).range(1..=100))]
    client_slot_share: u8,
    /// Most open connections from one client address (the TCP peer), on the public
    /// and, separately, the agent port; 0 for no limit. Raise it behind a load balancer.
    #[arg(long, env = "NETBORE_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = netbore_edge::config::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS)]
    max_connections_per_address: usize,
    /// Bytes of refused request heads (429 client_overloaded / client_busy) one client
    /// address may be charged per second, with 4 seconds' worth of tolerance, before the
    /// edge reads its connections only at that pace; 0 turns pacing off.
    #[arg(long, env = "NETBORE_REFUSED_BYTES_PER_SECOND", default_value_t = netbore_edge::pace::DEFAULT_RATE)]
    refused_bytes_per_second: u64,
    /// Seconds a write to an agent may make no progress before its link is closed
    /// (the agent stopped reading).
    #[arg(long, env = "NETBORE_AGENT_WRITE_TIMEOUT_SECS", default_value_t = netbore_mux::DEFAULT_WRITE_STALL_TIMEOUT.as_secs())]
    agent_write_timeout_secs: u64,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "NETBORE_MAX_BODY_BYTES", default_value_t = netbore_edge::config::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: u64,
    /// Grace period in seconds for open requests when draining on SIGTERM.
    #[arg(long, env = "NETBORE_DRAIN_GRACE_SECS", default_value_t = netbore_edge::config::DEFAULT_DRAIN_GRACE.as_secs())]
    drain_grace_secs: u64,
    /// TLS certificate chain (PEM) for both listeners, e.g. a wildcard for *.<domain>;
    /// re-read when it changes on disk.
    #[arg(long, env = "NETBORE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// TLS private key (PEM) matching --tls-cert.
    #[arg(long, env = "NETBORE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Serve TLS with a generated self-signed certificate (development).
    #[arg(long, env = "NETBORE_TLS_SELF_SIGNED", conflicts_with = "tls_cert")]
    tls_self_signed: bool,
    /// With --tls-self-signed: write the certificate here, for agents' --edge-ca.
    #[arg(long, env = "NETBORE_TLS_SELF_SIGNED_OUT")]
    tls_self_signed_out: Option<std::path::PathBuf>,
    /// Serve the TLS certificate (--tls-cert/--tls-key or --tls-self-signed) on the
    /// agent listener only: agents link over wss, viewers keep plain HTTP on the public
    /// listener (TLS terminated in front of the edge, or none).
    #[arg(long, env = "NETBORE_AGENT_TLS_ONLY")]
    agent_tls_only: bool,
    /// Seconds between turning not ready and closing the listeners on SIGTERM, for load
    /// balancers to notice (use 0 with a Kubernetes preStop sleep).
    #[arg(long, env = "NETBORE_DRAIN_DELAY_SECS", default_value_t = 0)]
    drain_delay_secs: u64,
    /// Tunnels are served at NAME.<domain>.
    #[arg(long, env = "NETBORE_DOMAIN", default_value = "localhost")]
    domain: String,
    /// This edge's id.
    #[arg(long, env = "NETBORE_EDGE_ID", default_value = "edge-1")]
    edge_id: String,
    /// Control's REST base URL, where the edge fetches the public keys agents' tokens are
    /// checked with.
    #[arg(
        long,
        env = "NETBORE_CONTROL_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    control_url: String,
    /// Control's gRPC URL, for the edge's report-and-command link (empty: no link).
    #[arg(
        long,
        env = "NETBORE_CONTROL_GRPC",
        default_value = "http://127.0.0.1:50051"
    )]
    control_grpc: String,
    /// File holding this edge's credential for control's gRPC link (NETBORE_EDGE_TOKEN
    /// also works); control refuses a link without a credential it knows.
    #[arg(long, env = "NETBORE_EDGE_TOKEN_FILE")]
    control_token_file: Option<std::path::PathBuf>,
    /// URL agents use to reach this edge, announced to control (default: ws://<agent-addr>/v1/connect).
    #[arg(long, env = "NETBORE_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// Region label announced to control.
    #[arg(long, env = "NETBORE_REGION", default_value = "default")]
    region: String,
    /// Token issuer to accept (control's configured issuer).
    #[arg(long, env = "NETBORE_ISSUER", default_value = "netbore-control")]
    issuer: String,
    /// Log as JSON lines.
    #[arg(long, env = "NETBORE_LOG_JSON")]
    log_json: bool,
    /// Redis shared by the edges (`redis://host:6379`): live tunnels are registered
    /// there and requests for tunnels held by another edge are forwarded to it. Without
    /// it the edge serves only the agents connected to it.
    #[arg(long, env = "NETBORE_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Address for other edges' forwarded requests (needs --redis-url).
    #[arg(long, env = "NETBORE_INTERNAL_ADDR", default_value = "0.0.0.0:8002")]
    internal_addr: SocketAddr,
    /// Address other edges reach the internal listener at (host:port, e.g. the pod IP);
    /// defaults to --internal-addr when that names a specific address.
    #[arg(long, env = "NETBORE_INTERNAL_ADVERTISE")]
    internal_advertise: Option<String>,
    /// Shared credential every edge presents on the internal listener (at least 16
    /// characters; the same on every edge). Prefer the environment variable.
    #[arg(long, env = "NETBORE_INTERNAL_SECRET", hide_env_values = true)]
    internal_secret: Option<String>,
    /// Seconds between refreshes of this edge's leases in Redis (a lease lives three).
    #[arg(long, env = "NETBORE_REGISTRY_REFRESH_SECS", default_value_t = netbore_edge::config::DEFAULT_REGISTRY_REFRESH.as_secs())]
    registry_refresh_secs: u64,
}

/// Shortest internal secret accepted.
const MIN_INTERNAL_SECRET_LEN: usize = 16;

/// jemalloc rather than glibc's malloc: it gives memory freed after a burst back to the
/// OS (see `netbore_telemetry::memory` and docs/decisions.md).
#[global_allocator]
static ALLOCATOR: netbore_telemetry::memory::Jemalloc = netbore_telemetry::memory::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = netbore_telemetry::init("netbore-edge", args.log_json)?;
    if let Err(e) = netbore_telemetry::memory::return_freed_memory() {
        tracing::warn!(error = %e, "freed memory returns to the OS only while busy");
    }
    let cert_source = match (&args.tls_cert, &args.tls_key, args.tls_self_signed) {
        (Some(cert), Some(key), _) => Some(netbore_edge::tls::CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        }),
        (_, _, true) => Some(netbore_edge::tls::CertSource::SelfSigned {
            write_to: args.tls_self_signed_out.clone(),
        }),
        _ => None,
    };
    if args.agent_tls_only && cert_source.is_none() {
        anyhow::bail!(
            "--agent-tls-only needs a certificate for the agent listener: add --tls-cert and --tls-key, or --tls-self-signed"
        );
    }
    let tls = match &cert_source {
        Some(src) => {
            let tls = netbore_edge::tls::Tls::new(src, &args.domain)
                .map_err(|e| anyhow::anyhow!("TLS set-up failed: {e}"))?;
            Some(if args.agent_tls_only {
                tls.agents_only()
            } else {
                tls
            })
        }
        None => None,
    };
    let agent_tls = tls.is_some();
    let config = EdgeConfig {
        public_scheme: if tls.as_ref().is_some_and(|t| t.serves_public()) {
            "https".into()
        } else {
            "http".into()
        },
        edge_id: args.edge_id.clone(),
        domain: args.domain.clone(),
        trusted_proxies: args.trusted_proxies.clone(),
        max_body_bytes: args.max_body_bytes,
        client_slot_share: args.client_slot_share,
        max_connections_per_address: args.max_connections_per_address,
        refused_bytes_per_second: args.refused_bytes_per_second,
        agent_write_timeout: std::time::Duration::from_secs(args.agent_write_timeout_secs.max(1)),
        drain_grace: std::time::Duration::from_secs(args.drain_grace_secs),
        drain_delay: std::time::Duration::from_secs(args.drain_delay_secs),
        registry_refresh: std::time::Duration::from_secs(args.registry_refresh_secs.max(1)),
        ..EdgeConfig::default()
    };
    let auth = Arc::new(JwksAuth::new(&args.control_url, &args.issuer));
    if let Err(e) = auth.refresh().await {
        tracing::warn!(error = %e, "control's keys are not available yet; fetching on the first agent");
    }
    let edge = Edge::with_tls(config, auth, tls.clone());
    let public = tokio::net::TcpListener::bind(args.public_addr)
        .await
        .with_context(|| format!("binding the public listener on {}", args.public_addr))?;
    let agents = tokio::net::TcpListener::bind(args.agent_addr)
        .await
        .with_context(|| format!("binding the agent listener on {}", args.agent_addr))?;
    let admin = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin listener on {}", args.admin_addr))?;
    let internal = match &args.redis_url {
        None => None,
        Some(url) => {
            let secret = args
                .internal_secret
                .clone()
                .filter(|s| s.len() >= MIN_INTERNAL_SECRET_LEN)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--redis-url needs NETBORE_INTERNAL_SECRET (or --internal-secret): a shared secret of at least {MIN_INTERNAL_SECRET_LEN} characters, the same on every edge, e.g. from `openssl rand -hex 32`"
                    )
                })?;
            let listener = tokio::net::TcpListener::bind(args.internal_addr)
                .await
                .with_context(|| {
                    format!("binding the internal listener on {}", args.internal_addr)
                })?;
            let bound = listener.local_addr()?;
            let advertise = match &args.internal_advertise {
                Some(a) => a.clone(),
                None if !bound.ip().is_unspecified() => bound.to_string(),
                None => anyhow::bail!(
                    "--internal-addr {bound} listens on every interface, so other edges need to be told where to reach it: set --internal-advertise (NETBORE_INTERNAL_ADVERTISE) to this edge's host:port, e.g. $(POD_IP):{}",
                    bound.port()
                ),
            };
            let registry = netbore_registry::RedisRegistry::new(url)
                .map_err(|e| anyhow::anyhow!("--redis-url: {e}"))?;
            edge.attach_cluster(netbore_edge::forward::Cluster::new(
                registry,
                &args.edge_id,
                &advertise,
                netbore_tokens::Secret::new(secret),
            ));
            tracing::info!(internal = %bound, advertise = %advertise, redis = %netbore_registry::redact_url(url), "edge joins the registry");
            Some(listener)
        }
    };
    if let Some(range) = args.tcp_ports {
        let listeners = netbore_edge::tcp::bind_range(args.tcp_host, range)
            .await
            .with_context(|| {
                format!(
                    "binding the TCP tunnel ports {range} on {} (--tcp-ports, --tcp-host)",
                    args.tcp_host
                )
            })?;
        tracing::info!(tcp_ports = %range, tcp_host = %args.tcp_host, "TCP tunnel ports listening");
        edge.add_tcp_listeners(listeners);
    }
    tracing::info!(public = %public.local_addr()?, agents = %agents.local_addr()?, admin = %admin.local_addr()?, domain = %args.domain, edge_id = %args.edge_id, "edge listening");
    let shutdown = CancellationToken::new();
    tokio::spawn(netbore_edge::telemetry::on_signal(shutdown.clone()));
    if let (Some(tls), Some(src)) = (tls, cert_source) {
        tokio::spawn(tls.watch(src, shutdown.clone()));
    }
    if !args.control_grpc.is_empty() {
        let token = match (
            &args.control_token_file,
            std::env::var("NETBORE_EDGE_TOKEN"),
        ) {
            (Some(f), _) => Some(netbore_tokens::Secret::new(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading the edge credential from {}", f.display()))?
                    .trim(),
            )),
            (None, Ok(t)) if !t.trim().is_empty() => Some(netbore_tokens::Secret::new(t.trim())),
            _ => {
                tracing::warn!(
                    "no edge credential (--control-token-file, NETBORE_EDGE_TOKEN): control will refuse this edge's link, so agents are not sent here"
                );
                None
            }
        };
        let agent_url = args.advertise_url.clone().unwrap_or_else(|| {
            let scheme = if agent_tls { "wss" } else { "ws" };
            format!(
                "{scheme}://{}{}",
                agents.local_addr().expect("bound"),
                netbore_edge::agents::AGENT_PATH
            )
        });
        tokio::spawn(netbore_edge::control_link::run(
            edge.clone(),
            args.control_grpc.clone(),
            netbore_edge::control_link::LinkIdentity {
                agent_url,
                region: args.region.clone(),
                token,
            },
            shutdown.clone(),
        ));
    }
    // The admin port outlives the drain so probes see "draining" until the end.
    let admin_stop = CancellationToken::new();
    tokio::spawn(netbore_edge::admin::serve_admin(
        edge.clone(),
        admin,
        admin_stop.clone(),
    ));
    netbore_edge::run_with_internal(edge, public, agents, internal, shutdown).await?;
    admin_stop.cancel();
    tracing::info!("edge stopped");
    telemetry.shutdown().await;
    Ok(())
}
