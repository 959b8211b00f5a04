//! The edge's request path as named phases, in the manner of pingora's `ProxyHttp`.
//!
//! A viewer's request goes through, in order:
//!
//! 1. **hygiene** — framing and host checks nothing is forwarded without
//!    (`proxy::hygiene`);
//! 2. **route** — the tunnel held here, or the edge holding it ([`route`]);
//! 3. **access** — the tunnel's access policy (`access::Policy::check`);
//! 4. **limits** — the client's share of the tunnel's slots, its head bytes, the body
//!    limit ([`body_limit`], [`request_body`]);
//! 5. **open stream** — a stream on the least busy agent connection, tried once more on
//!    another connection when the first closed before taking the head ([`open_error`]);
//! 6. **upstream request** — the head the origin gets (`proxy::request_head`);
//! 7. **response filters** — the origin's head for the viewer
//!    (`proxy::response_headers`, the policy's CORS and cookie);
//! 8. **logging** — one access line when the response ends (`proxy::AccessLogged`).
//!
//! The local path (`proxy.rs`) and the edge-to-edge path (`forward.rs`) share the
//! phases that apply to both: the body guard, the upgrade join and the error mapping.
//! Every refusal is a [`ProxyError`], which knows its source and whether a retry is
//! safe, and becomes a response in one place ([`ProxyError::response`]).

use std::time::Duration;

use http::Response;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use netbore_mux::MuxError;
use netbore_protocol::ResetCode;
use tracing::{Instrument, debug};

use crate::Edge;
use crate::errors::{Body, ErrorSource, ViewerError};
use crate::proxy::GuardedBody;
use crate::routes::{Lookup, Route};

/// Why a request was not proxied (or not to the end): the error the viewer sees, who
/// caused it and whether trying again elsewhere is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProxyError {
    /// What the viewer is told (status, code, message).
    pub(crate) error: ViewerError,
    /// True when nothing of the request left the edge, so another connection may be
    /// tried with it (pingora's retry flag).
    pub(crate) retry: bool,
}

impl ProxyError {
    /// A final error: the request is answered with it.
    pub(crate) fn fail(error: ViewerError) -> ProxyError {
        ProxyError {
            error,
            retry: false,
        }
    }

    /// An error before the request left the edge: another connection may take it.
    pub(crate) fn retryable(error: ViewerError) -> ProxyError {
        ProxyError { error, retry: true }
    }

    /// Who caused it.
    pub(crate) fn source(self) -> ErrorSource {
        self.error.source()
    }

    /// The one mapping from error to response: status, `netbore-error` code, the
    /// JSON or text body, and `Connection: close` after a framing error.
    pub(crate) fn response(self, json: bool) -> Response<Body> {
        if self.source() != ErrorSource::Viewer {
            debug!(code = self.error.code(), source = ?self.source(), "request failed");
        }
        self.error.response(json)
    }
}

impl From<ViewerError> for ProxyError {
    fn from(error: ViewerError) -> ProxyError {
        ProxyError::fail(error)
    }
}

/// Where the route phase sends a request.
pub(crate) enum Routed {
    /// To a connection of this edge.
    Local(Route),
    /// Not held here: to another edge, or `fallback` when none holds it.
    Elsewhere {
        /// What the viewer gets when no edge holds the tunnel.
        fallback: ViewerError,
    },
}

/// The route phase: the tunnel's connection here (under its in-flight cap), or where
/// to look next.
pub(crate) fn route(edge: &Edge, name: &str) -> Result<Routed, ProxyError> {
    if edge.gate().is_name_disabled(name) {
        return Err(ViewerError::TunnelDisabled.into());
    }
    routed(
        edge.routes().pick(name),
        edge.config().max_streams_per_tunnel,
    )
}

/// [`route`] for a lookup already made.
fn routed(lookup: Lookup, max_in_flight: usize) -> Result<Routed, ProxyError> {
    match lookup {
        Lookup::Found(_, in_flight) if in_flight >= max_in_flight => {
            Err(ViewerError::TunnelOverloaded.into())
        }
        Lookup::Found(r, _) => Ok(Routed::Local(r)),
        // Not held here (or only by a connection going away): another edge may hold it.
        Lookup::Offline => Ok(Routed::Elsewhere {
            fallback: ViewerError::TunnelOffline,
        }),
        Lookup::Unknown => Ok(Routed::Elsewhere {
            fallback: ViewerError::TunnelNotFound,
        }),
    }
}

/// The limits phase for the body: the tunnel's limit within the edge's, and a declared
/// length over it refused before anything is forwarded.
pub(crate) fn body_limit(
    edge_max: u64,
    tunnel_max: Option<u64>,
    declared: Option<u64>,
) -> Result<u64, ProxyError> {
    let max = tunnel_max.map_or(edge_max, |t| t.min(edge_max));
    if declared.is_some_and(|n| n > max) {
        return Err(ViewerError::BodyTooLarge.into());
    }
    Ok(max)
}

/// The request body as it leaves the edge (to an agent or another edge), under the
/// size and pace limits; `None` when there is none to send.
pub(crate) fn request_body(
    body: Incoming,
    send: bool,
    max: u64,
    idle: Duration,
) -> Option<GuardedBody> {
    send.then(|| crate::proxy::guard_body(body, max, idle))
}

/// The open stream phase's error for a failed open: a connection that closed before
/// it took the head may be retried on another.
pub(crate) fn open_error(e: &MuxError) -> ProxyError {
    match e {
        MuxError::Refused(_) => ViewerError::TunnelBusy.into(),
        MuxError::TooLarge(why) => {
            debug!(%why, "request head too large for the tunnel");
            ViewerError::HeadTooLarge.into()
        }
        _ => ProxyError::retryable(ViewerError::TunnelLost),
    }
}

/// The error for a stream the agent reset before the response head.
pub(crate) fn reset_error(code: ResetCode) -> ProxyError {
    ProxyError::fail(match code {
        ResetCode::OriginUnreachable => ViewerError::OriginUnreachable,
        ResetCode::OriginTimeout => ViewerError::OriginTimeout,
        ResetCode::Refused => ViewerError::TunnelBusy,
        ResetCode::Cancel => ViewerError::TunnelLost,
        ResetCode::TooLarge => ViewerError::ResponseHeadTooLarge,
        _ => ViewerError::OriginError,
    })
}

/// The upgrade phase shared by both paths: once the viewer's connection is handed
/// over, `join` runs with it and `state` under the edge's task tracker (a drain waits
/// for it within its grace). When the hand-over fails, `failed` gets `state` instead.
pub(crate) fn join_upgrade<S, J, F, Fut>(
    edge: &Edge,
    viewer: hyper::upgrade::OnUpgrade,
    state: S,
    join: J,
    failed: F,
) where
    S: Send + 'static,
    J: FnOnce(TokioIo<hyper::upgrade::Upgraded>, S) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
    F: FnOnce(hyper::Error, S) + Send + 'static,
{
    edge.tracker().spawn(
        async move {
            match viewer.await {
                Ok(up) => join(TokioIo::new(up), state).await,
                Err(e) => failed(e, state),
            }
        }
        .in_current_span(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn every_error_maps_to_one_status_code_and_body() {
        let e = ProxyError::from(ViewerError::HeadTooLarge);
        let r = e.response(true);
        assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(r.headers()["netbore-error"], "head_too_large");
        assert_eq!(r.headers()["content-type"], "application/json");
        let r = ProxyError::from(ViewerError::RegistryUnavailable).response(false);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["netbore-error"], "registry_unavailable");
        // A framing error closes the connection; an origin's does not.
        let r = ProxyError::from(ViewerError::AmbiguousLength).response(false);
        assert_eq!(r.headers()["connection"], "close");
        let r = ProxyError::from(ViewerError::OriginTimeout).response(false);
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(r.headers().get("connection").is_none());
    }

    #[test]
    fn sources_decide_whose_fault_the_status_says() {
        for (e, source) in [
            (ViewerError::AmbiguousLength, ErrorSource::Viewer),
            (ViewerError::ClientBusy, ErrorSource::Viewer),
            (ViewerError::TunnelOverloaded, ErrorSource::Edge),
            (ViewerError::TunnelLost, ErrorSource::Agent),
            (ViewerError::OriginUnreachable, ErrorSource::Origin),
        ] {
            assert_eq!(e.source(), source, "{e:?}");
        }
        // The viewer's faults are 4xx; everyone else's are 5xx or 429 for limits.
        let all = [
            ViewerError::TunnelNotFound,
            ViewerError::BadHost,
            ViewerError::MissingHost,
            ViewerError::DuplicateHost,
            ViewerError::AmbiguousLength,
            ViewerError::BadTransferEncoding,
            ViewerError::HostMismatch,
            ViewerError::UrlTooLong,
            ViewerError::BodyTooLarge,
            ViewerError::BodyTimeout,
            ViewerError::AuthorityMismatch,
            ViewerError::ClientBusy,
            ViewerError::ClientOverloaded,
            ViewerError::BadChunkedEncoding,
            ViewerError::HeadTooLarge,
            ViewerError::TunnelOffline,
            ViewerError::TunnelBusy,
            ViewerError::TunnelLost,
            ViewerError::OriginUnreachable,
            ViewerError::OriginTimeout,
            ViewerError::OriginError,
            ViewerError::ResponseHeadTooLarge,
        ];
        for e in all {
            let s = e.status().as_u16();
            match e.source() {
                ErrorSource::Viewer => assert!((400..500).contains(&s), "{e:?} {s}"),
                ErrorSource::Agent | ErrorSource::Origin => {
                    assert!((500..600).contains(&s), "{e:?} {s}")
                }
                ErrorSource::Edge => {}
            }
        }
    }

    #[test]
    fn only_a_connection_closed_before_the_head_is_retried() {
        let closed = open_error(&MuxError::Closed("gone".into()));
        assert!(closed.retry);
        assert_eq!(closed.error, ViewerError::TunnelLost);
        let refused = open_error(&MuxError::Refused("full"));
        assert!(!refused.retry);
        assert_eq!(refused.error, ViewerError::TunnelBusy);
        let large = open_error(&MuxError::TooLarge("huge".into()));
        assert!(!large.retry);
        assert_eq!(large.error, ViewerError::HeadTooLarge);
    }

    #[test]
    fn resets_before_the_head_name_the_origin_or_the_agent() {
        assert_eq!(
            reset_error(ResetCode::OriginUnreachable).error,
            ViewerError::OriginUnreachable
        );
        assert_eq!(
            reset_error(ResetCode::OriginTimeout).source(),
            ErrorSource::Origin
        );
        assert_eq!(reset_error(ResetCode::Cancel).source(), ErrorSource::Agent);
        assert_eq!(
            reset_error(ResetCode::TooLarge).error,
            ViewerError::ResponseHeadTooLarge
        );
        assert!(!reset_error(ResetCode::Refused).retry);
    }

    #[test]
    fn the_body_limit_is_the_smaller_and_a_declared_excess_is_refused() {
        assert_eq!(body_limit(100, None, None), Ok(100));
        assert_eq!(body_limit(100, Some(10), Some(10)), Ok(10));
        assert_eq!(body_limit(100, Some(1000), Some(100)), Ok(100));
        assert_eq!(
            body_limit(100, Some(10), Some(11)),
            Err(ProxyError::fail(ViewerError::BodyTooLarge))
        );
        assert_eq!(
            body_limit(100, None, Some(101)).map_err(|e| e.source()),
            Err(ErrorSource::Viewer)
        );
    }

    #[test]
    fn a_missing_tunnel_is_looked_for_elsewhere_and_a_full_one_refused() {
        assert!(matches!(
            routed(Lookup::Unknown, 10),
            Ok(Routed::Elsewhere {
                fallback: ViewerError::TunnelNotFound
            })
        ));
        assert!(matches!(
            routed(Lookup::Offline, 10),
            Ok(Routed::Elsewhere {
                fallback: ViewerError::TunnelOffline
            })
        ));
    }
}
