//! Raw TCP tunnels and TLS passthrough by SNI (issue 17).
//!
//! A **TCP tunnel** has a public port control allocated from its `--tcp-ports` range;
//! every edge listens on the whole range (`--tcp-ports`, same range, on `--tcp-host`).
//! A connection accepted on port P goes to the tunnel registered under
//! [`tcp_key`]`(P)`: over a stream of a local agent link, or, when another edge holds
//! the link, to that edge's internal listener as an HTTP/1.1 upgrade to
//! [`TCP_UPGRADE`], whose bytes are then copied both ways.
//!
//! A **TLS passthrough tunnel** is registered under [`tls_key`]`(name)`. On the TLS
//! public listener the edge reads the ClientHello ([`read_client_hello`]) without
//! answering it; when its SNI names a passthrough tunnel the raw bytes, ClientHello
//! first, go to the agent, which hands them to an origin holding its own certificate.
//! Any other SNI is terminated here as before. The edge never holds the origin's key.
//!
//! On the agent link both are one stream kind ([`stream_head`]): a REQUEST_HEAD with
//! method [`CONNECT_METHOD`], answered by a 200 RESPONSE_HEAD once the agent reached its
//! origin, then a raw byte stream with half-close both ways (`docs/protocol.md`,
//! "Raw TCP streams").

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use netbore_protocol::{Header, RequestHead};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span};

use crate::Edge;
use crate::errors::{Body, error_response};
use crate::routes::Lookup;

/// The method of a raw TCP stream's REQUEST_HEAD.
pub const CONNECT_METHOD: &str = "CONNECT";
/// The target of a raw TCP stream's REQUEST_HEAD.
pub const CONNECT_TARGET: &str = "*";
/// The header naming the stream's kind (`tcp` or `tls`) on a raw TCP stream.
pub const KIND_HEADER: &str = "x-netbore-kind";
/// The `Upgrade` token of a raw TCP connection forwarded between edges.
pub const TCP_UPGRADE: &str = "netbore-tcp";
/// Largest ClientHello the edge reads to find the SNI: one TLS record.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024 + 5;
/// Longest wait for a forwarding target edge's answer to the upgrade.
pub const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest answer head read from a target edge.
const MAX_FORWARD_HEAD: usize = 8 * 1024;

/// The route key of the TCP tunnel on public port `port`.
pub fn tcp_key(port: u16) -> String {
    format!("tcp:{port}")
}

/// The route key of the TLS passthrough tunnel named `name`.
pub fn tls_key(name: &str) -> String {
    format!("tls:{name}")
}

/// The REQUEST_HEAD of a raw TCP stream for `client` (`kind` is `tcp` or `tls`).
pub fn stream_head(kind: &str, client: IpAddr) -> RequestHead {
    RequestHead {
        method: CONNECT_METHOD.into(),
        target: CONNECT_TARGET.into(),
        headers: vec![
            Header::new(KIND_HEADER, Bytes::copy_from_slice(kind.as_bytes())),
            Header::new(
                crate::proxy::CLIENT_IP_HEADER,
                Bytes::from(client.to_string()),
            ),
        ],
    }
}

fn kind_of(key: &str) -> &'static str {
    if key.starts_with("tls:") {
        netbore_tokens::KIND_TLS
    } else {
        netbore_tokens::KIND_TCP
    }
}

/// Accepts connections on one port of the TCP range until `stop` fires, each relayed
/// to the tunnel holding that port (closed at once when none does).
pub async fn serve_tcp(edge: Edge, listener: TcpListener, stop: CancellationToken) {
    let Ok(port) = listener.local_addr().map(|a| a.port()) else {
        return;
    };
    let key = tcp_key(port);
    while let Some((tcp, peer)) = crate::accept(&listener, &stop, "tcp").await {
        let Some(slot) = edge.public_conns().admit(peer.ip()) else {
            debug!(%peer, "connection refused: too many open from this address");
            edge.metrics().connection_refused();
            continue;
        };
        let (edge2, key) = (edge.clone(), key.clone());
        edge.tracker().spawn(
            async move {
                let _slot = slot;
                if !relay(&edge2, &key, tcp, peer.ip(), Vec::new()).await {
                    debug!("no tunnel holds this port; connection closed");
                }
            }
            .instrument(info_span!("tcp", %peer, port)),
        );
    }
}

/// Relays `io` to the tunnel routed by `key`: on a local agent link, else through an
/// edge holding one. Returns false (having dropped `io`) when no edge holds it.
pub(crate) async fn relay<IO>(
    edge: &Edge,
    key: &str,
    io: IO,
    client: IpAddr,
    via: Vec<String>,
) -> bool
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if let Lookup::Found(route, _) = edge.routes().pick(key)
        && let Ok((tx, rx)) = route.mux.open(stream_head(kind_of(key), client), false)
    {
        netbore_mux::bridge(io, tx, rx).await;
        return true;
    }
    let Some(cluster) = edge.cluster() else {
        return false;
    };
    if via.len() + 1 > crate::forward::MAX_HOPS {
        return false;
    }
    let holders = match cluster.holders(key, &via).await {
        Ok(h) => h,
        Err(e) => {
            debug!(error = %e, "cannot look up a TCP tunnel held elsewhere");
            return false;
        }
    };
    let mut via = via;
    via.push(edge.config().edge_id.clone());
    for h in holders.iter() {
        match open_forward(cluster, &h.addr, key, client, &via.join(",")).await {
            Ok((conn, early)) => {
                let mut io = io;
                let mut conn = conn;
                if !early.is_empty() && io.write_all(&early).await.is_err() {
                    return true;
                }
                let _ = tokio::io::copy_bidirectional(&mut io, &mut conn).await;
                return true;
            }
            Err(e) => debug!(holder = %h.edge_id, error = %e, "forwarding a TCP connection failed"),
        }
    }
    false
}

/// Opens the upgrade to `addr`'s internal listener; returns the connection and any
/// bytes that came after the 101 head.
async fn open_forward(
    cluster: &crate::forward::Cluster,
    addr: &str,
    key: &str,
    client: IpAddr,
    via: &str,
) -> Result<(TcpStream, Bytes), String> {
    let go = async {
        let mut conn = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let _ = conn.set_nodelay(true);
        let req = format!(
            "GET / HTTP/1.1\r\nhost: {addr}\r\nconnection: upgrade\r\nupgrade: {TCP_UPGRADE}\r\n{}: {}\r\n{}: {key}\r\n{}: {client}\r\n{}: {via}\r\n\r\n",
            crate::forward::AUTH_HEADER,
            cluster.secret_text(),
            crate::forward::HOST_HEADER,
            crate::forward::CLIENT_HEADER,
            crate::forward::VIA_HEADER,
        );
        conn.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                buf.advance(end + 4);
                if !head.starts_with("HTTP/1.1 101") {
                    return Err(format!(
                        "the holder answered {}",
                        head.lines().next().unwrap_or("")
                    ));
                }
                return Ok((conn, buf.freeze()));
            }
            if buf.len() > MAX_FORWARD_HEAD {
                return Err("the holder's answer head is too large".into());
            }
            if conn.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                return Err("the holder closed the connection".into());
            }
        }
    };
    tokio::time::timeout(FORWARD_TIMEOUT, go)
        .await
        .map_err(|_| "the holder did not answer in time".to_string())?
}

/// The internal listener's side of a forwarded raw TCP connection: `key` must be held
/// by a local agent link; the 101 answer turns the connection into the stream's bytes.
pub(crate) async fn internal(
    edge: Edge,
    mut req: Request<Incoming>,
    key: String,
    client: IpAddr,
) -> Response<Body> {
    let Lookup::Found(route, _) = edge.routes().pick(&key) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "tunnel_not_found",
            "No agent link for this TCP or TLS tunnel here.",
            true,
        );
    };
    let Ok((tx, rx)) = route.mux.open(stream_head(kind_of(&key), client), false) else {
        return error_response(
            StatusCode::BAD_GATEWAY,
            "tunnel_lost",
            "The agent link closed.",
            true,
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    edge.tracker().spawn(
        async move {
            match on_upgrade.await {
                Ok(up) => netbore_mux::bridge(TokioIo::new(up), tx, rx).await,
                Err(e) => debug!(error = %e, "a forwarded TCP upgrade failed"),
            }
        }
        .in_current_span(),
    );
    let mut resp = Response::new(http_body_util::Empty::new().map_err(|n| match n {}).boxed());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(TCP_UPGRADE));
    resp
}

/// True when `req` is another edge's forwarded raw TCP connection.
pub(crate) fn is_tcp_upgrade(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(TCP_UPGRADE.as_bytes()))
}

/// Reads from `io` until the first TLS record (the ClientHello) is complete, at most
/// [`MAX_CLIENT_HELLO`] bytes. Returns the bytes read (to replay) and the SNI host
/// name when the record is a ClientHello carrying one. Stops early on bytes that are
/// not a TLS handshake record (the TLS acceptor then refuses them as before).
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    io: &mut S,
) -> std::io::Result<(BytesMut, Option<String>)> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if buf.len() >= 5 {
            if buf[0] != 0x16 {
                return Ok((buf, None));
            }
            let need = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
            if need > MAX_CLIENT_HELLO {
                return Ok((buf, None));
            }
            if buf.len() >= need {
                let sni = sni_of(&buf[5..need]);
                return Ok((buf, sni));
            }
        }
        if io.read_buf(&mut buf).await? == 0 {
            return Ok((buf, None));
        }
    }
}

/// The SNI host name of a ClientHello handshake message (the first record's payload),
/// or `None` when it is not one or carries none. Never panics on any input.
pub fn sni_of(hs: &[u8]) -> Option<String> {
    let mut p = Reader(hs);
    if p.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = p.u24()?;
    let mut p = Reader(p.take(len)?);
    p.take(2 + 32)?; // version, random
    let sid = p.u8()? as usize;
    p.take(sid)?;
    let suites = p.u16()? as usize;
    p.take(suites)?;
    let comp = p.u8()? as usize;
    p.take(comp)?;
    let ext_len = p.u16()? as usize;
    let mut exts = Reader(p.take(ext_len)?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let len = exts.u16()? as usize;
        let body = exts.take(len)?;
        if ty != 0 {
            continue;
        }
        let mut b = Reader(body);
        let list = b.u16()? as usize;
        let mut l = Reader(b.take(list)?);
        while !l.0.is_empty() {
            let name_type = l.u8()?;
            let n = l.u16()? as usize;
            let name = l.take(n)?;
            if name_type == 0 {
                let s = std::str::from_utf8(name).ok()?;
                return Some(s.to_ascii_lowercase());
            }
        }
        return None;
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

/// The passthrough tunnel an SNI names, when one is live here or at another edge.
pub(crate) async fn passthrough_key(edge: &Edge, sni: &str) -> Option<String> {
    let name = crate::proxy::tunnel_name(sni, &edge.config().domain)?;
    let key = tls_key(&name);
    if let Lookup::Found(..) = edge.routes().pick(&key) {
        return Some(key);
    }
    let cluster = edge.cluster()?;
    match cluster.holders(&key, &[]).await {
        Ok(h) if !h.is_empty() => Some(key),
        _ => None,
    }
}

/// A connection whose first bytes were already read: they are read again first.
pub struct Prefixed<S> {
    head: BytesMut,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `head` is read before anything from `inner`.
    pub fn new(head: BytesMut, inner: S) -> Prefixed<S> {
        Prefixed { head, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            buf.put_slice(&self.head[..n]);
            self.head.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Binds every port of `range` on `host`: the listeners [`serve_tcp`] takes.
pub async fn bind_range(
    host: IpAddr,
    range: netbore_tokens::PortRange,
) -> std::io::Result<Vec<TcpListener>> {
    let mut v = Vec::with_capacity(range.len() as usize);
    for port in range.lo..=range.hi {
        let l = TcpListener::bind(SocketAddr::new(host, port))
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("port {port}: {e}")))?;
        v.push(l);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls writes it, for `name`.
    async fn hello_for(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(cfg),
            rustls::pki_types::ServerName::try_from(name.to_string()).unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn the_sni_of_a_real_client_hello_is_found_and_the_bytes_kept() {
        let hello = hello_for("db.tunnels.example").await;
        let mut src = &hello[..];
        let (buf, sni) = read_client_hello(&mut src).await.unwrap();
        assert_eq!(sni.as_deref(), Some("db.tunnels.example"));
        assert_eq!(&buf[..], &hello[..], "every byte read is kept for replay");
    }

    #[tokio::test]
    async fn plain_http_and_truncated_hellos_have_no_sni() {
        let mut src = &b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"[..];
        assert_eq!(read_client_hello(&mut src).await.unwrap().1, None);
        let hello = hello_for("a.example").await;
        for cut in [0, 3, 5, 40, hello.len() - 1] {
            let mut src = &hello[..cut];
            let (buf, sni) = read_client_hello(&mut src).await.unwrap();
            assert_eq!(sni, None);
            assert_eq!(buf.len(), cut);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_sni_parser() {
        let mut x: u32 = 17;
        for len in 0..600 {
            let v: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let _ = sni_of(&v);
        }
    }
}
