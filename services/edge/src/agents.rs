//! The agent listener: WebSocket upgrade, handshake, then a multiplexed tunnel link.
//!
//! A connection that does not complete the WebSocket upgrade and the hello within
//! [`HANDSHAKE_TIMEOUT`], sends an oversized or malformed hello, or presents a token
//! that does not verify is answered with a refusal (code and message) and closed;
//! nothing it sent touches any other tunnel.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use netbore_mux::{Mux, MuxConfig, Role, WsLink, ws_config};
use netbore_protocol::handshake::{MAX_HANDSHAKE_LEN, MAX_INSTANCE_ID_LEN, RefusalCode};
use netbore_protocol::ws::WsMessage;
use netbore_protocol::{AgentHello, EdgeReply, PROTOCOL_VERSION, Refusal, Welcome};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Edge;
use crate::config::{HANDSHAKE_TIMEOUT, MAX_AGENT_MESSAGE};
use crate::routes::Route;

/// The path agents connect to on the agent listener.
pub const AGENT_PATH: &str = "/v1/connect";

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Accepts agent connections until `stop` fires.
pub async fn serve_agents(edge: Edge, listener: TcpListener, stop: CancellationToken) {
    while let Some((tcp, peer)) = crate::accept(&listener, &stop, "agents").await {
        let Some(slot) = edge.agent_conns().admit(peer.ip()) else {
            debug!(%peer, "agent connection refused: too many open from this address");
            edge.metrics().connection_refused();
            continue;
        };
        let edge2 = edge.clone();
        let span = info_span!("agent_conn", %peer);
        edge.tracker().spawn(
            async move {
                let _slot = slot;
                if let Err(reason) = run_agent(&edge2, tcp, peer).await {
                    debug!(%reason, "agent connection ended");
                }
            }
            .instrument(span),
        );
    }
}

/// Runs one agent connection from the TLS handshake (if any) to its close.
///
/// The TLS handshake and the WebSocket handshake are boxed futures of their own, freed
/// once the link is up: a task's future is as large as its largest state, and theirs
/// (rustls's connection state, the upgrade, token verification, registry calls) is
/// several KiB that an idle link would otherwise hold for its whole life (issue 16
/// item 4). What stays is [`Linked`] and its wait for the link to close.
async fn run_agent(
    edge: &Edge,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) -> Result<(), String> {
    let linked = Box::pin(connect_agent(edge.clone(), tcp, peer)).await?;
    linked.serve(edge).await;
    Ok(())
}

/// TLS (when the agent listener has it), then the WebSocket handshake.
async fn connect_agent(
    edge: Edge,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) -> Result<Linked, String> {
    match edge.tls().map(|t| t.agent_acceptor()) {
        None => handshake(edge, tcp, peer).await,
        Some(acceptor) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => handshake(edge, tls, peer).await,
                Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
                Err(_) => Err("TLS handshake timed out".into()),
            }
        }
    }
}

/// What a link that passed its handshake holds until it closes.
struct Linked {
    mux: Mux,
    route: Route,
    route_key: String,
    conn_id: u64,
    name: String,
    lease: Option<(
        std::sync::Arc<crate::forward::Cluster>,
        netbore_registry::Holder,
    )>,
    /// The token's place in the per-token link count, given back on drop.
    _slot: crate::gate::LinkSlot,
    /// The token's place in the cluster-wide link count, given back on drop.
    _cluster_place: ClusterPlace,
}

impl Linked {
    /// Serves the link until it closes, then takes the route down.
    async fn serve(self, edge: &Edge) {
        let Linked {
            mux,
            route,
            route_key,
            conn_id,
            name,
            lease,
            ..
        } = &self;
        loop {
            tokio::select! {
                _ = mux.closed() => break,
                // The origin turned healthy or not: control hears it now, not at the next
                // report, so the tunnel's status follows within a probe interval or two.
                _ = mux.agent_status_changed() => edge.link_events().report_soon(),
            }
        }
        edge.routes().remove(route_key, *conn_id);
        edge.link_events().record(route, false, &mux.close_reason());
        if let Some((cluster, holder)) = lease {
            // Boxed: a registry call's state is not kept for the link's life.
            Box::pin(cluster.unregister(route_key, holder)).await;
        }
        edge.metrics().agent_disconnect();
        info!(tunnel = %route.tunnel_id, name = %name, session = %route.session_id, reason = %mux.close_reason(), "agent disconnected");
    }
}

/// The upgrade and the hello: a [`Linked`] link, or the reason it was refused.
async fn handshake<S>(edge: Edge, io: S, peer: SocketAddr) -> Result<Linked, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // tungstenite fixes this callback's signature, large error type included.
    #[allow(clippy::result_large_err)]
    let check_path = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() == AGENT_PATH {
            Ok(resp)
        } else {
            let mut e = ErrorResponse::new(Some(format!(
                "agents connect to {AGENT_PATH} on this port\n"
            )));
            *e.status_mut() = http::StatusCode::NOT_FOUND;
            Err(e)
        }
    };
    let upgraded = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_hdr_async_with_config(
            io,
            check_path,
            Some(ws_config(MAX_AGENT_MESSAGE)),
        ),
    )
    .await
    .map_err(|_| "websocket upgrade timed out".to_string())?
    .map_err(|e| format!("websocket upgrade failed: {e}"))?;
    // From here on the link's own framing (netbore_mux::link): the agent sends its
    // hello only once it has the 101, so tungstenite holds nothing read past it.
    let mut ws = WsLink::after_upgrade(upgraded, false, MAX_AGENT_MESSAGE);

    let malformed =
        format!("the first message must be a JSON hello of at most {MAX_HANDSHAKE_LEN} bytes");
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, ws.recv()).await {
        Err(_) => {
            return refuse(
                &edge,
                &mut ws,
                RefusalCode::MalformedHello,
                "no hello within the handshake timeout",
                false,
            )
            .await;
        }
        Ok(Ok(None | Some(WsMessage::Close(_)))) => {
            return Err("agent left during the handshake".into());
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            return refuse(
                &edge,
                &mut ws,
                RefusalCode::MalformedHello,
                &format!("{malformed}; the WebSocket frame is not valid: {e}"),
                false,
            )
            .await;
        }
        Ok(Err(_)) => return Err("agent left during the handshake".into()),
        Ok(Ok(Some(WsMessage::Text(t)))) if t.len() <= MAX_HANDSHAKE_LEN => {
            match serde_json::from_slice::<AgentHello>(&t) {
                Ok(h) => h,
                Err(e) => {
                    return refuse(
                        &edge,
                        &mut ws,
                        RefusalCode::MalformedHello,
                        &format!("the hello is not valid: {e}"),
                        false,
                    )
                    .await;
                }
            }
        }
        Ok(Ok(Some(_))) => {
            return refuse(
                &edge,
                &mut ws,
                RefusalCode::MalformedHello,
                &malformed,
                false,
            )
            .await;
        }
    };
    if hello.version != PROTOCOL_VERSION {
        return refuse(&edge, &mut ws,
            RefusalCode::UnsupportedVersion,
            &format!(
                "this edge speaks protocol version {PROTOCOL_VERSION}, the agent sent {}; upgrade the agent",
                hello.version
            ),
            false,
        )
        .await;
    }
    if hello.instance_id.len() > MAX_INSTANCE_ID_LEN
        || hello.instance_id.chars().any(|c| c.is_control())
    {
        return refuse(
            &edge,
            &mut ws,
            RefusalCode::MalformedHello,
            &format!(
                "the instance_id is longer than {MAX_INSTANCE_ID_LEN} bytes or holds control characters; remove the agent's instance-id file to get a new one"
            ),
            false,
        )
        .await;
    }
    if edge.is_draining() {
        return refuse(
            &edge,
            &mut ws,
            RefusalCode::Draining,
            "this edge is shutting down; connect to another candidate edge",
            true,
        )
        .await;
    }
    let grant = match edge.auth().verify(&hello.token).await {
        Ok(g) => g,
        Err(e) => {
            warn!(code = %e.code, tunnel = %hello.tunnel_id, "agent token refused");
            let retry = e.code == "keys_unavailable";
            let code = if retry {
                RefusalCode::Unavailable
            } else {
                RefusalCode::InvalidToken
            };
            return refuse(
                &edge,
                &mut ws,
                code,
                &format!("{} [{}]", e.message, e.code),
                retry,
            )
            .await;
        }
    };
    if grant.tunnel_id != hello.tunnel_id {
        return refuse(
            &edge,
            &mut ws,
            RefusalCode::TunnelMismatch,
            "the token was issued for another tunnel than the one in the hello",
            false,
        )
        .await;
    }
    // The token verified; now what binds it beyond its signature. Refusals name the
    // tunnel, never the token.
    if edge.gate().is_revoked(&grant.tunnel_id) {
        warn!(tunnel = %grant.tunnel_id, name = %grant.name, "agent refused: the tunnel was deleted");
        return refuse(
            &edge,
            &mut ws,
            RefusalCode::TunnelDeleted,
            "the tunnel was deleted at control; its tokens are refused. Start the agent without its saved state to create a new tunnel",
            false,
        )
        .await;
    }
    if edge.gate().is_disabled(&grant.tunnel_id) {
        warn!(tunnel = %grant.tunnel_id, name = %grant.name, "agent refused: the tunnel is disabled");
        return refuse(
            &edge,
            &mut ws,
            RefusalCode::TunnelDisabled,
            "the tunnel is disabled by its owner; it is served again once enabled (POST /v1/tunnels/{id}/enable), and the agent retries by itself",
            true,
        )
        .await;
    }
    if let Some(cred) = &grant.credential
        && edge.gate().is_credential_revoked(cred)
    {
        warn!(tunnel = %grant.tunnel_id, credential = %cred, "agent refused: the tunnel credential was revoked");
        return refuse(
            &edge,
            &mut ws,
            RefusalCode::CredentialRevoked,
            &format!(
                "the tunnel credential {cred} was revoked at control; issue a new one (POST /v1/tunnels/{}/credentials) and run the agent with it [credential_revoked]",
                grant.tunnel_id
            ),
            false,
        )
        .await;
    }
    let _slot = match edge.gate().admit(crate::gate::digest(&hello.token)) {
        Ok(slot) => slot,
        Err(e) => {
            warn!(tunnel = %grant.tunnel_id, error = %e, "agent refused: per-token limit");
            return refuse(
                &edge,
                &mut ws,
                RefusalCode::LimitReached,
                &e.to_string(),
                true,
            )
            .await;
        }
    };
    // The same count across every edge sharing the registry, so one token cannot hold
    // the limit on each edge. Unreachable Redis is left to the registration below.
    let token_key = hex(&crate::gate::digest(&hello.token));
    let cluster_place = match edge.cluster() {
        Some(c) => {
            let ttl = std::time::Duration::from_secs(
                grant
                    .expires_at
                    .saturating_sub(netbore_tokens::now_unix())
                    .saturating_add(netbore_tokens::LEEWAY_SECS),
            );
            match c
                .registry()
                .acquire(&token_key, crate::gate::MAX_LINKS_PER_TOKEN as u64, ttl)
                .await
            {
                Ok(true) => Some(c.clone()),
                Ok(false) => {
                    warn!(tunnel = %grant.tunnel_id, "agent refused: per-token limit across the cluster");
                    return refuse(
                        &edge,
                        &mut ws,
                        RefusalCode::LimitReached,
                        &crate::gate::GateRefusal::TooManyLinks(crate::gate::MAX_LINKS_PER_TOKEN)
                            .to_string(),
                        true,
                    )
                    .await;
                }
                Err(_) => None,
            }
        }
        None => None,
    };
    let _cluster_place = ClusterPlace {
        cluster: cluster_place,
        key: token_key,
    };
    // HTTP tunnels are routed by name; TCP ones by port, TLS passthrough ones by SNI
    // ([`crate::tcp`]).
    let route_key = grant.route_key();
    if let Some(other) = name_held_elsewhere(&edge, &route_key, &grant.tunnel_id).await {
        warn!(tunnel = %grant.tunnel_id, name = %grant.name, holder = %other, "agent refused: another tunnel holds the name");
        return refuse(
            &edge,
            &mut ws,
            RefusalCode::NameInUse,
            &format!(
                "the name '{}' is held by another tunnel with a live link; a link never displaces another tunnel's. If this tunnel was deleted, start the agent without its saved state",
                grant.name
            ),
            true,
        )
        .await;
    }
    // The session-cookie key comes from control's seed for the token's signing key,
    // never from the token (anyone holding the token could forge cookies with it).
    let session_key = if grant.access.jwt.is_some() {
        let kid = netbore_tokens::kid_of(&hello.token).unwrap_or_default();
        match edge.gate().session_key(&kid, &grant.tunnel_id) {
            Some(k) => Some(k),
            None => {
                warn!(tunnel = %grant.tunnel_id, kid = %kid, "agent refused: no session seed from control for this key yet");
                return refuse(
                    &edge,
                    &mut ws,
                    RefusalCode::Unavailable,
                    "this edge has not received the session keys for this tunnel's signing key from control yet; retry shortly",
                    true,
                )
                .await;
            }
        }
    } else {
        None
    };
    let access = match crate::access::TunnelAccess::new(
        &grant.tunnel_id,
        &grant.name,
        &grant.access,
        grant.limits.max_body_bytes,
        session_key.as_ref(),
    ) {
        Ok(a) => std::sync::Arc::new(a),
        Err(e) => {
            warn!(tunnel = %grant.tunnel_id, error = %e, "agent token carries an unusable access policy");
            return refuse(
                &edge,
                &mut ws,
                RefusalCode::InvalidToken,
                &format!("the tunnel's access policy cannot be enforced: {e}; fix it in the agent's flags"),
                false,
            )
            .await;
        }
    };
    let conn_id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let session_id = format!("{}-{conn_id}", edge.config().edge_id);
    // Other edges must find the tunnel before its URL is announced; without the
    // registry a new agent is refused (the ones already here keep serving).
    let lease = edge
        .cluster()
        .map(|c| (c.clone(), c.holder(&grant.tunnel_id, conn_id)));
    if let Some((cluster, holder)) = &lease {
        let ttl = edge.config().registry_refresh * crate::forward::LEASE_REFRESHES;
        if let Err(e) = cluster.register(&route_key, holder.clone(), ttl).await {
            edge.metrics().registry_error();
            warn!(tunnel = %grant.tunnel_id, error = %e, "cannot register the tunnel");
            return refuse(
                &edge,
                &mut ws,
                RefusalCode::Unavailable,
                &format!("this edge cannot register the tunnel right now ({e}); the agent retries, and tunnels already connected keep serving"),
                true,
            )
            .await;
        }
    }
    let cfg = edge.config();
    // Two agents on one credential are allowed (a rotation runs two for a moment) but
    // reported: a credential copied onto a second machine shows up here.
    let mut warnings = Vec::new();
    if let Some(cred) = &grant.credential
        && !hello.instance_id.is_empty()
    {
        let others = edge.routes().other_instances(cred, &hello.instance_id);
        if !others.is_empty() {
            warn!(tunnel = %grant.tunnel_id, name = %grant.name, credential = %cred, instance = %hello.instance_id, others = %others.join(","), "two agent instances are linked with one tunnel credential");
            warnings.push(format!(
                "another agent instance ({}) is linked with this tunnel credential ({cred}) as well as this one ({}); both serve the tunnel. If that is not a rotation in progress, give each agent its own credential and revoke the shared one",
                others.join(", "),
                hello.instance_id
            ));
        }
    }
    let welcome = EdgeReply::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        session_id: session_id.clone(),
        edge_id: cfg.edge_id.clone(),
        heartbeat_interval_ms: cfg.heartbeat_interval.as_millis() as u64,
        limits: cfg.limits,
        warnings,
        capabilities: vec![netbore_protocol::handshake::CAP_AGENT_STATUS.into()],
    });
    // The route goes in before the welcome goes out: once the agent hears the welcome
    // it tells its user the URL, which must already work.
    let (mux, greeting) = Mux::start_with_greeting(
        ws,
        MuxConfig {
            role: Role::Edge,
            limits: cfg.limits,
            heartbeat_interval: cfg.heartbeat_interval,
            label: session_id.clone(),
            write_stall_timeout: cfg.agent_write_timeout,
        },
        CancellationToken::new(),
        serde_json::to_string(&welcome).expect("serializable"),
    );
    let route = Route {
        tunnel_id: grant.tunnel_id.clone(),
        conn_id,
        mux: mux.clone(),
        access,
        credential: grant.credential.clone(),
        instance_id: hello.instance_id.clone(),
        session_id: session_id.clone(),
        agent: hello.agent.chars().take(MAX_AGENT_DESCRIPTION).collect(),
        peer: peer.to_string(),
        connected_at: crate::routes::unix_now(),
    };
    if let Err(holder) = edge.routes().insert(&route_key, route.clone()) {
        // Another tunnel's agent took the name between the check above and now.
        warn!(tunnel = %grant.tunnel_id, name = %grant.name, holder = %holder, "agent refused: another tunnel holds the name");
        mux.close("the name is held by another tunnel with a live link");
        if let Some((cluster, holder)) = &lease {
            cluster.unregister(&route_key, holder).await;
        }
        return Err("name held by another tunnel".into());
    }
    greeting.release();
    edge.link_events().record(&route, true, "");
    edge.metrics().handshake("accepted");
    if edge.is_draining() {
        mux.go_away("edge is shutting down");
    }
    info!(tunnel = %grant.tunnel_id, name = %grant.name, session = %session_id, agent = %hello.agent, instance = %hello.instance_id, credential = grant.credential.as_deref().unwrap_or(""), "agent connected");
    Ok(Linked {
        mux,
        route,
        route_key,
        conn_id,
        name: grant.name,
        lease,
        _slot,
        _cluster_place,
    })
}

/// Longest agent self-description (the hello's `agent`) kept for reports.
pub const MAX_AGENT_DESCRIPTION: usize = 64;

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A place in a token's cluster-wide link count, given back when the link ends.
struct ClusterPlace {
    cluster: Option<std::sync::Arc<crate::forward::Cluster>>,
    key: String,
}

impl Drop for ClusterPlace {
    fn drop(&mut self) {
        if let Some(c) = self.cluster.take() {
            let key = std::mem::take(&mut self.key);
            tokio::spawn(async move {
                let _ = c.registry().release(&key).await;
            });
        }
    }
}

/// The tunnel id of a live link for `name` of another tunnel than `tunnel_id`, on this
/// edge or (with a registry) on any other, ignoring tunnels known to be deleted.
async fn name_held_elsewhere(edge: &Edge, name: &str, tunnel_id: &str) -> Option<String> {
    if let Some(other) = edge.routes().live_other_tunnel(name, tunnel_id) {
        return Some(other);
    }
    let cluster = edge.cluster()?;
    // An unreachable registry is handled by the registration that follows.
    let holders = cluster.registry().lookup(name).await.ok()?;
    holders
        .into_iter()
        .find(|h| h.tunnel_id != tunnel_id && !edge.gate().is_revoked(&h.tunnel_id))
        .map(|h| h.tunnel_id)
}

async fn refuse<S, T>(
    edge: &Edge,
    ws: &mut WsLink<S>,
    code: RefusalCode,
    message: &str,
    retryable: bool,
) -> Result<T, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    edge.metrics().handshake(&name);
    let reply = EdgeReply::Refused(Refusal {
        code,
        message: message.to_string(),
        retryable,
    });
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        ws.send_text(&serde_json::to_string(&reply).expect("serializable"))
            .await?;
        ws.close(1000).await
    })
    .await;
    Err(format!("refused ({code:?}): {message}"))
}
