//! TLS for the public and agent listeners (rustls, aws-lc-rs).
//!
//! Certificates come from PEM files (a wildcard `*.domain` certificate, as cert-manager
//! mounts it in Kubernetes) and are re-read when the files change, so a renewed
//! certificate is served on the next handshake without a restart. Without files, a
//! self-signed certificate for `*.domain`, `domain`, `localhost` and `127.0.0.1` is
//! generated for development, and its PEM can be written out for agents and browsers
//! to trust. ALPN offers `h2` and `http/1.1` on the public port, `http/1.1` on the agent
//! port (WebSocket). With `--agent-tls-only` only the agent port serves TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often the certificate files are checked for changes.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// PEM certificate chain and private key files.
    Files {
        /// Certificate chain (leaf first).
        cert: PathBuf,
        /// Private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// A generated self-signed certificate; its PEM is written to `write_to` if given.
    SelfSigned {
        /// Where to write the certificate PEM for clients to trust.
        write_to: Option<PathBuf>,
    },
}

/// Server configs for both listeners, swapped atomically on reload.
#[derive(Clone)]
pub struct Tls {
    public: Arc<ArcSwap<ServerConfig>>,
    agents: Arc<ArcSwap<ServerConfig>>,
    /// False with `--agent-tls-only`: the public listener stays plain HTTP.
    serves_public: bool,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn configs(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(ServerConfig, ServerConfig), String> {
    let build = |alpn: Vec<Vec<u8>>| -> Result<ServerConfig, String> {
        let mut c = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("the certificate and key do not form a usable pair: {e}"))?;
        c.alpn_protocols = alpn;
        Ok(c)
    };
    Ok((
        build(vec![b"h2".to_vec(), b"http/1.1".to_vec()])?,
        build(vec![b"http/1.1".to_vec()])?,
    ))
}

fn load_files(cert: &Path, key: &Path) -> Result<(ServerConfig, ServerConfig), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read the certificate {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read the private key {}: {e}", key.display()))?;
    configs(chain, key)
}

/// A self-signed certificate for `domain`: (certificate PEM, chain, key).
pub fn self_signed(
    domain: &str,
) -> Result<(String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let names = vec![
        format!("*.{domain}"),
        domain.to_string(),
        "localhost".into(),
        "*.localhost".into(),
        "127.0.0.1".into(),
    ];
    let ck = rcgen::generate_simple_self_signed(names).map_err(|e| e.to_string())?;
    let pem = ck.cert.pem();
    let der = ck.cert.der().clone();
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).map_err(|e| e.to_string())?;
    Ok((pem, vec![der], key))
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl Tls {
    /// Loads (or generates) the certificate. Reloading starts with [`Tls::watch`].
    pub fn new(source: &CertSource, domain: &str) -> Result<Tls, String> {
        let (public, agents) = match source {
            CertSource::Files { cert, key } => load_files(cert, key)?,
            CertSource::SelfSigned { write_to } => {
                let (pem, chain, key) = self_signed(domain)?;
                if let Some(p) = write_to {
                    std::fs::write(p, &pem).map_err(|e| {
                        format!("cannot write the certificate to {}: {e}", p.display())
                    })?;
                    info!(path = %p.display(), "self-signed certificate written; give it to agents with --edge-ca");
                }
                configs(chain, key)?
            }
        };
        Ok(Tls {
            public: Arc::new(ArcSwap::from_pointee(public)),
            agents: Arc::new(ArcSwap::from_pointee(agents)),
            serves_public: true,
        })
    }

    /// The same certificate for the agent listener only (`--agent-tls-only`): agents
    /// link over wss while viewers keep plain HTTP, e.g. behind a load balancer that
    /// terminates their TLS, or to measure a wss link without viewer TLS.
    pub fn agents_only(mut self) -> Tls {
        self.serves_public = false;
        self
    }

    /// True when the public listener serves TLS (false with [`Tls::agents_only`]).
    pub fn serves_public(&self) -> bool {
        self.serves_public
    }

    /// The acceptor for the public port, with the current certificate.
    pub fn public_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.public.load_full())
    }

    /// The acceptor for the agent port, with the current certificate.
    pub fn agent_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.agents.load_full())
    }

    /// Re-reads the files whenever they change, until `stop`. A broken new file is
    /// logged and the current certificate kept.
    pub async fn watch(self, source: CertSource, stop: CancellationToken) {
        let CertSource::Files { cert, key } = source else {
            return;
        };
        let mut seen = (mtime(&cert), mtime(&key));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RELOAD_CHECK_INTERVAL) => {}
                _ = stop.cancelled() => return,
            }
            let now = (mtime(&cert), mtime(&key));
            if now == seen {
                continue;
            }
            match load_files(&cert, &key) {
                Ok((p, a)) => {
                    self.public.store(Arc::new(p));
                    self.agents.store(Arc::new(a));
                    seen = now;
                    info!(cert = %cert.display(), "certificate reloaded");
                }
                Err(e) => {
                    warn!(error = %e, "certificate changed on disk but cannot be used; keeping the current one")
                }
            }
        }
    }
}
