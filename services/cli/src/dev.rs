//! One process, one machine: control and an edge in-process with the in-memory state,
//! bound to loopback, for `netbore dev` and for tests.

use std::net::SocketAddr;
use std::sync::Arc;

use netbore_control::{Control, ControlConfig, EdgeEntry};
use netbore_edge::auth::JwksAuth;
use netbore_edge::{Edge, EdgeConfig};
use netbore_tokens::KeySet;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Addresses of a running in-process stack.
#[derive(Clone)]
pub struct DevStack {
    /// Control's REST address.
    pub control: SocketAddr,
    /// Control's gRPC address.
    pub grpc: SocketAddr,
    /// The edge's public (viewer) address.
    pub public: SocketAddr,
    /// The edge's agent address.
    pub agents: SocketAddr,
    /// The edge's admin address (/livez, /readyz, /metrics).
    pub admin: SocketAddr,
    /// The control instance (for tests: rotate keys, inspect).
    pub control_state: Control,
    /// The edge.
    pub edge: Edge,
}

impl DevStack {
    /// Control's base URL.
    pub fn control_url(&self) -> String {
        format!("http://{}", self.control)
    }
}

/// Starts control and one edge on `public` (viewer listener, already bound) plus
/// loopback ports of the system's choosing, all stopped by `shutdown`.
pub async fn start(public: TcpListener, shutdown: CancellationToken) -> anyhow::Result<DevStack> {
    start_with(public, shutdown, |_| {}, |_| {}).await
}

/// Like [`start`], with a chance to adjust control's configuration.
pub async fn start_with(
    public: TcpListener,
    shutdown: CancellationToken,
    adjust: impl FnOnce(&mut ControlConfig),
    adjust_edge: impl FnOnce(&mut EdgeConfig),
) -> anyhow::Result<DevStack> {
    let public_addr = public.local_addr()?;
    let control_l = TcpListener::bind("127.0.0.1:0").await?;
    let grpc_l = TcpListener::bind("127.0.0.1:0").await?;
    let admin_l = TcpListener::bind("127.0.0.1:0").await?;
    let admin_addr = admin_l.local_addr()?;
    let grpc_addr = grpc_l.local_addr()?;
    let agents_l = TcpListener::bind("127.0.0.1:0").await?;
    let control_addr = control_l.local_addr()?;
    let agents_addr = agents_l.local_addr()?;
    let mut config = ControlConfig {
        domain: "localhost".into(),
        public_url_template: format!("http://{{name}}.localhost:{}", public_addr.port()),
        edges: vec![EdgeEntry {
            edge_id: "edge-1".into(),
            edge_url: format!("ws://{agents_addr}{}", netbore_edge::agents::AGENT_PATH),
            region: "local".into(),
        }],
        ..ControlConfig::default()
    };
    // The in-process edge links to control like a separate edge, with a credential made
    // for this run only.
    let edge_token = netbore_tokens::Secret::new(
        (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect::<String>(),
    );
    config.edge_credentials = netbore_control::edge_auth::EdgeCredentials(vec![
        netbore_control::edge_auth::EdgeCredential::from_token("edge-1", &edge_token)
            .expect("a 64-character token is long enough"),
    ]);
    adjust(&mut config);
    let issuer = config.issuer.clone();
    let control = Control::new(config, KeySet::generate());
    // The edge verifies agents exactly as a separate edge does: with the key set it
    // fetches from control's JWKS endpoint, again whenever a token names a new key.
    let auth = Arc::new(JwksAuth::new(&format!("http://{control_addr}"), &issuer));
    let mut edge_config = EdgeConfig {
        domain: "localhost".into(),
        ..EdgeConfig::default()
    };
    adjust_edge(&mut edge_config);
    let edge = Edge::new(edge_config, auth.clone());
    // What a separate edge learns on its authenticated link to control, handed over in
    // process: deleted tunnels lose their agents and their tokens are refused, and the
    // session seeds (cookie keys) follow key rotations.
    let mut deletions = control.subscribe_deletions();
    let edge2 = edge.clone();
    let control2 = control.clone();
    tokio::spawn(async move {
        while let Ok(msg) = deletions.recv().await {
            let now = netbore_tokens::now_unix();
            match netbore_api::ControlEvent::decode(&msg) {
                netbore_api::ControlEvent::TunnelDeleted(id) => {
                    let until = control2.record_revocation(&msg, now);
                    edge2.revoke_tunnel(&id, until);
                }
                netbore_api::ControlEvent::CredentialRevoked(id) => {
                    let until = control2.record_revocation(&msg, now);
                    edge2.revoke_credential(&id, until);
                }
                netbore_api::ControlEvent::DrainEdge(_) => edge2.drain(),
                netbore_api::ControlEvent::UndrainEdge(_) => {
                    edge2.undrain();
                }
                netbore_api::ControlEvent::TunnelDisabled { tunnel_id, name } => {
                    edge2.set_tunnel_disabled(&tunnel_id, &name, true);
                }
                netbore_api::ControlEvent::TunnelEnabled { tunnel_id, name } => {
                    edge2.set_tunnel_disabled(&tunnel_id, &name, false);
                }
            }
        }
    });
    let mut seeds = control.subscribe_session_seeds();
    edge.gate()
        .set_session_seeds(seeds.borrow_and_update().clone());
    let edge3 = edge.clone();
    tokio::spawn(async move {
        while seeds.changed().await.is_ok() {
            let s = seeds.borrow_and_update().clone();
            edge3.gate().set_session_seeds(s);
        }
    });
    tokio::spawn(netbore_control::serve_rest(
        control_l,
        control.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(netbore_control::serve_grpc(
        grpc_l,
        control.clone(),
        shutdown.clone(),
    ));
    // The edge reports to control as a separate edge does, so the names of tunnels
    // linked to it stay held (control's name hold is renewed by these reports).
    tokio::spawn(netbore_edge::control_link::run(
        edge.clone(),
        format!("http://{grpc_addr}"),
        netbore_edge::control_link::LinkIdentity {
            agent_url: format!("ws://{agents_addr}{}", netbore_edge::agents::AGENT_PATH),
            region: "local".into(),
            token: Some(edge_token),
        },
        shutdown.clone(),
    ));
    tokio::spawn(netbore_edge::admin::serve_admin(
        edge.clone(),
        admin_l,
        shutdown.clone(),
    ));
    tokio::spawn(netbore_edge::run(
        edge.clone(),
        public,
        agents_l,
        shutdown.clone(),
    ));
    Ok(DevStack {
        control: control_addr,
        grpc: grpc_addr,
        public: public_addr,
        agents: agents_addr,
        admin: admin_addr,
        control_state: control,
        edge,
    })
}
