//! Starts control on loopback ports of the system's choosing (REST and gRPC), with
//! signing keys from PEM files the test can also sign with (to forge tokens), and
//! stops it on drop.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use netbore_control::api::{CreateTunnelRequest, IssueTokenRequest};
use netbore_control::client::{ControlClient, ControlError};
use netbore_control::{Control, ControlConfig, EdgeEntry};
use netbore_tokens::{KeySet, Secret};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The bootstrap credential every test control is started with.
pub const BOOT: &str = "test-bootstrap-credential";
/// The edge credential the harness's control accepts for any edge id.
#[allow(dead_code)]
pub const EDGE_TOKEN: &str = "harness-edge-token-0123456789abcdef0123";
/// How long a test waits for anything before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// Control on real sockets.
pub struct Harness {
    /// The state, for in-process checks (deletions, rotation).
    pub control: Control,
    /// REST address.
    pub rest: SocketAddr,
    /// gRPC address.
    pub grpc: SocketAddr,
    /// A second copy of control's keys, for forging tokens with its real key.
    pub keys: KeySet,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// Three edges in two regions, in this configured order.
pub fn edges() -> Vec<EdgeEntry> {
    [
        ("edge-us-1", "wss://edge-us-1.example.com/v1/connect", "us"),
        ("edge-eu-1", "wss://edge-eu-1.example.com/v1/connect", "eu"),
        ("edge-us-2", "ws://edge-us-2.example.com/v1/connect", "us"),
    ]
    .into_iter()
    .map(|(id, url, region)| EdgeEntry {
        edge_id: id.into(),
        edge_url: url.into(),
        region: region.into(),
    })
    .collect()
}

/// Writes a fresh Ed25519 PKCS#8 PEM file.
pub fn write_pem(dir: &std::path::Path, name: &str) -> PathBuf {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(doc.as_ref());
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"),
    )
    .unwrap();
    path
}

impl Harness {
    /// Control with [`edges`], the [`BOOT`] credential, and [`EDGE_TOKEN`] accepted
    /// from any edge.
    pub async fn start() -> Harness {
        Harness::start_with(|_| {}).await
    }

    /// Control with adjusted settings.
    pub async fn start_with(adjust: impl FnOnce(&mut ControlConfig)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let pem = write_pem(dir.path(), "signing.pem");
        let mut config = ControlConfig {
            domain: "tunnels.test".into(),
            public_url_template: "https://{name}.tunnels.test".into(),
            edges: edges(),
            bootstrap_token: Some(Secret::new(BOOT)),
            edge_credentials: netbore_control::edge_auth::EdgeCredentials(vec![
                netbore_control::edge_auth::EdgeCredential::from_token(
                    "*",
                    &Secret::new(EDGE_TOKEN),
                )
                .unwrap(),
            ]),
            ..ControlConfig::default()
        };
        adjust(&mut config);
        let control = Control::new(
            config,
            KeySet::from_pem_files(std::slice::from_ref(&pem)).unwrap(),
        );
        let keys = KeySet::from_pem_files(&[pem]).unwrap();
        let shutdown = CancellationToken::new();
        let rest_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (rest, grpc) = (rest_l.local_addr().unwrap(), grpc_l.local_addr().unwrap());
        let r = tokio::spawn(netbore_control::serve_rest(
            rest_l,
            control.clone(),
            shutdown.clone(),
        ));
        let g = tokio::spawn(netbore_control::serve_grpc(
            grpc_l,
            control.clone(),
            shutdown.clone(),
        ));
        Harness {
            control,
            rest,
            grpc,
            keys,
            shutdown,
            tasks: vec![
                tokio::spawn(async move {
                    r.await.unwrap().unwrap();
                }),
                tokio::spawn(async move {
                    g.await.unwrap().unwrap();
                }),
            ],
            _dir: dir,
        }
    }

    /// A REST client without credentials.
    pub fn client(&self) -> ControlClient {
        ControlClient::new(&format!("http://{}", self.rest))
    }

    /// A management token with `scopes`, from the bootstrap credential.
    pub async fn management_token(&self, scopes: &[&str]) -> String {
        self.client()
            .with_bearer(BOOT)
            .issue_token(&IssueTokenRequest {
                scopes: Some(scopes.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            })
            .await
            .unwrap()
            .token
    }

    /// A REST client carrying a management token with `scopes`.
    pub async fn admin(&self, scopes: &[&str]) -> ControlClient {
        self.client()
            .with_bearer(self.management_token(scopes).await)
    }

    /// Stops both servers and checks they stop within [`WAIT`].
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("control stops promptly on shutdown")
                .unwrap();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A create request for `name`.
pub fn named(name: &str) -> CreateTunnelRequest {
    CreateTunnelRequest {
        requested_name: Some(name.into()),
        ..Default::default()
    }
}

/// The API error's status and code.
pub fn api_err(e: ControlError) -> (u16, String, String) {
    match e {
        ControlError::Api {
            status,
            code,
            message,
        } => (status, code.to_string(), message),
        other => panic!("expected an API error, got {other}"),
    }
}
