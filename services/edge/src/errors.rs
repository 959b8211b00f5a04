//! The errors a viewer can get from the edge itself (not from the origin).
//!
//! Each has a stable code, sent in the `netbore-error` response header, and a short
//! page saying what happened and what to do, as JSON when the client asks for JSON.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

/// Response header carrying the error code.
pub const ERROR_HEADER: &str = "netbore-error";

/// The body type of every response the edge produces.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// An error the edge shows a viewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewerError {
    /// No tunnel has this name (404).
    TunnelNotFound,
    /// The tunnel exists but its agent is not connected (503).
    TunnelOffline,
    /// The agent could not reach the origin (502).
    OriginUnreachable,
    /// The origin did not answer in time (504).
    OriginTimeout,
    /// The origin broke the exchange (502).
    OriginError,
    /// The request had no usable Host (400).
    BadHost,
    /// The agent refused the stream: at its limit or moving (503).
    TunnelBusy,
    /// The agent connection failed while the request was in flight (502).
    TunnelLost,
    /// HTTP/1.1 request without `Host` (400).
    MissingHost,
    /// More than one `Host` (400).
    DuplicateHost,
    /// Both `Content-Length` and `Transfer-Encoding`, or several `Content-Length` (400):
    /// the framing is ambiguous (request smuggling).
    AmbiguousLength,
    /// A `Transfer-Encoding` other than exactly `chunked` (400).
    BadTransferEncoding,
    /// An absolute-form target naming another host than `Host` (400).
    HostMismatch,
    /// The request target is too long (414).
    UrlTooLong,
    /// The request body is larger than allowed (413).
    BodyTooLarge,
    /// The request body stalled (408).
    BodyTimeout,
    /// The tunnel has too many requests in flight (429).
    TunnelOverloaded,
    /// HTTP/2: `:authority` and `Host` name different hosts (400).
    AuthorityMismatch,
    /// This client address holds its whole share of the tunnel's request slots (429).
    ClientBusy,
    /// The agent sent a response head or trailers with more fields than the protocol
    /// allows (502).
    ResponseHeadTooLarge,
    /// This client has too many bytes of request heads in flight (429).
    ClientOverloaded,
    /// Malformed chunked encoding (400).
    BadChunkedEncoding,
    /// The tunnel is disabled by its owner (403).
    TunnelDisabled,
    /// The request head is too large for the tunnel's wire format or frame limit (431).
    HeadTooLarge,
    /// The registry that says which edge holds a tunnel is unreachable (503).
    RegistryUnavailable,
}

/// Who caused an error, in the manner of pingora's `ErrorSource`: it decides whose
/// fault the status says (4xx for the viewer's, 5xx for the rest) and what operators
/// look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The viewer's request (framing, host, size, pace, its share of the limits).
    Viewer,
    /// This edge (its limits for everyone, its registry, a tunnel switched off).
    Edge,
    /// The agent or the link to it (offline, busy, lost).
    Agent,
    /// The service behind the agent.
    Origin,
}

impl ViewerError {
    /// Status code.
    pub fn status(self) -> StatusCode {
        match self {
            ViewerError::TunnelNotFound => StatusCode::NOT_FOUND,
            ViewerError::TunnelOffline | ViewerError::TunnelBusy => StatusCode::SERVICE_UNAVAILABLE,
            ViewerError::OriginUnreachable | ViewerError::OriginError | ViewerError::TunnelLost => {
                StatusCode::BAD_GATEWAY
            }
            ViewerError::OriginTimeout => StatusCode::GATEWAY_TIMEOUT,
            ViewerError::BadHost
            | ViewerError::MissingHost
            | ViewerError::DuplicateHost
            | ViewerError::AmbiguousLength
            | ViewerError::BadTransferEncoding
            | ViewerError::HostMismatch
            | ViewerError::AuthorityMismatch
            | ViewerError::BadChunkedEncoding => StatusCode::BAD_REQUEST,
            ViewerError::UrlTooLong => StatusCode::URI_TOO_LONG,
            ViewerError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ViewerError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ViewerError::TunnelOverloaded
            | ViewerError::ClientBusy
            | ViewerError::ClientOverloaded => StatusCode::TOO_MANY_REQUESTS,
            ViewerError::ResponseHeadTooLarge => StatusCode::BAD_GATEWAY,
            ViewerError::TunnelDisabled => StatusCode::FORBIDDEN,
            ViewerError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ViewerError::RegistryUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Who caused it.
    pub fn source(self) -> ErrorSource {
        match self {
            ViewerError::TunnelNotFound
            | ViewerError::BadHost
            | ViewerError::MissingHost
            | ViewerError::DuplicateHost
            | ViewerError::AmbiguousLength
            | ViewerError::BadTransferEncoding
            | ViewerError::HostMismatch
            | ViewerError::UrlTooLong
            | ViewerError::BodyTooLarge
            | ViewerError::BodyTimeout
            | ViewerError::AuthorityMismatch
            | ViewerError::ClientBusy
            | ViewerError::ClientOverloaded
            | ViewerError::BadChunkedEncoding
            | ViewerError::HeadTooLarge => ErrorSource::Viewer,
            ViewerError::TunnelOverloaded
            | ViewerError::TunnelDisabled
            | ViewerError::RegistryUnavailable => ErrorSource::Edge,
            ViewerError::TunnelOffline | ViewerError::TunnelBusy | ViewerError::TunnelLost => {
                ErrorSource::Agent
            }
            ViewerError::OriginUnreachable
            | ViewerError::OriginTimeout
            | ViewerError::OriginError
            | ViewerError::ResponseHeadTooLarge => ErrorSource::Origin,
        }
    }

    /// Stable code for the `netbore-error` header.
    pub fn code(self) -> &'static str {
        match self {
            ViewerError::TunnelNotFound => "tunnel_not_found",
            ViewerError::TunnelOffline => "tunnel_offline",
            ViewerError::OriginUnreachable => "origin_unreachable",
            ViewerError::OriginTimeout => "origin_timeout",
            ViewerError::OriginError => "origin_error",
            ViewerError::BadHost => "bad_host",
            ViewerError::TunnelBusy => "tunnel_busy",
            ViewerError::TunnelLost => "tunnel_lost",
            ViewerError::MissingHost => "missing_host",
            ViewerError::DuplicateHost => "duplicate_host",
            ViewerError::AmbiguousLength => "ambiguous_length",
            ViewerError::BadTransferEncoding => "bad_transfer_encoding",
            ViewerError::HostMismatch => "host_mismatch",
            ViewerError::UrlTooLong => "url_too_long",
            ViewerError::BodyTooLarge => "body_too_large",
            ViewerError::BodyTimeout => "body_timeout",
            ViewerError::TunnelOverloaded => "tunnel_overloaded",
            ViewerError::AuthorityMismatch => "authority_mismatch",
            ViewerError::ClientBusy => "client_busy",
            ViewerError::ResponseHeadTooLarge => "response_head_too_large",
            ViewerError::ClientOverloaded => "client_overloaded",
            ViewerError::BadChunkedEncoding => "bad_chunked_encoding",
            ViewerError::TunnelDisabled => "tunnel_disabled",
            ViewerError::HeadTooLarge => "head_too_large",
            ViewerError::RegistryUnavailable => "registry_unavailable",
        }
    }

    /// What happened and what to do, for a person.
    pub fn message(self) -> &'static str {
        match self {
            ViewerError::TunnelNotFound => {
                "No tunnel is serving this hostname. Check the URL, or start the agent that owns it."
            }
            ViewerError::TunnelOffline => {
                "The tunnel's agent is not connected right now. It is served again as soon as the agent reconnects; retry shortly."
            }
            ViewerError::OriginUnreachable => {
                "The agent is connected but could not reach the service behind it. Check that the local service is running on the address the agent forwards to."
            }
            ViewerError::OriginTimeout => {
                "The service behind the tunnel did not answer in time. Retry, or check why the local service is slow."
            }
            ViewerError::OriginError => {
                "The service behind the tunnel broke off the response. Check the local service's logs."
            }
            ViewerError::BadHost => {
                "The request has no usable Host header. Send the tunnel's hostname in Host."
            }
            ViewerError::TunnelBusy => {
                "The tunnel is at its limit of concurrent requests or is moving to another edge. Retry shortly."
            }
            ViewerError::TunnelLost => {
                "The connection to the tunnel's agent was lost during the request. Retry; the agent reconnects by itself."
            }
            ViewerError::MissingHost => "HTTP/1.1 requests need a Host header naming the tunnel.",
            ViewerError::DuplicateHost => {
                "The request has more than one Host header; send exactly one."
            }
            ViewerError::AmbiguousLength => {
                "The request's length is ambiguous (Content-Length with Transfer-Encoding, or several Content-Length headers); send one of them."
            }
            ViewerError::BadTransferEncoding => {
                "Only 'Transfer-Encoding: chunked' is accepted on requests."
            }
            ViewerError::HostMismatch => {
                "The absolute URL in the request line names another host than the Host header."
            }
            ViewerError::UrlTooLong => "The request URL is longer than this edge accepts.",
            ViewerError::BodyTooLarge => "The request body is larger than this edge accepts.",
            ViewerError::BodyTimeout => {
                "The request body stopped arriving; send it without long pauses."
            }
            ViewerError::TunnelOverloaded => {
                "The tunnel has too many requests in flight. Retry shortly."
            }
            ViewerError::AuthorityMismatch => {
                "The request's :authority and Host name different hosts; send the same host in both, or leave Host out."
            }
            ViewerError::ClientBusy => {
                "You have as many requests in flight on this tunnel as one client may; other viewers need the rest. Retry when some of yours have finished."
            }
            ViewerError::ResponseHeadTooLarge => {
                "The service behind the tunnel answered with more than 1024 header fields, more than the tunnel carries. Send fewer headers from the local service."
            }
            ViewerError::ClientOverloaded => {
                "Your address has too many large requests in flight on this edge. Wait for some to finish, or send smaller headers."
            }
            ViewerError::BadChunkedEncoding => {
                "The request's chunked body is malformed (a chunk size that is not 1-16 hex digits, or chunk data not followed by CRLF); fix it."
            }
            ViewerError::TunnelDisabled => {
                "This tunnel is disabled by its owner. It is served again once they enable it."
            }
            ViewerError::HeadTooLarge => {
                "The request's head is too large to forward; send fewer or smaller headers."
            }
            ViewerError::RegistryUnavailable => {
                "The edge cannot find which edge holds this tunnel right now (its registry is unreachable). Retry shortly."
            }
        }
    }

    /// True for errors about the request's framing, after which the connection must
    /// close: the rest of the bytes cannot be trusted to start a new request.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            ViewerError::MissingHost
                | ViewerError::DuplicateHost
                | ViewerError::AmbiguousLength
                | ViewerError::BadTransferEncoding
                | ViewerError::BadChunkedEncoding
                | ViewerError::HostMismatch
                | ViewerError::BadHost
                | ViewerError::BodyTooLarge
                | ViewerError::BodyTimeout
                | ViewerError::UrlTooLong
        )
    }

    /// The response, JSON when `json` (the viewer's `Accept` asked for it).
    pub fn response(self, json: bool) -> Response<Body> {
        let mut r = error_response(self.status(), self.code(), self.message(), json);
        if self.closes_connection() {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// Builds an error page with the `netbore-error` header.
pub fn error_response(status: StatusCode, code: &str, message: &str, json: bool) -> Response<Body> {
    let (ctype, body) = if json {
        (
            "application/json",
            serde_json::json!({"error": {"code": code, "message": message}}).to_string(),
        )
    } else {
        (
            "text/plain; charset=utf-8",
            format!(
                "{} {}\n\n{message}\n\nnetbore-error: {code}\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ),
        )
    };
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(code) {
        h.insert(ERROR_HEADER, v);
    }
    resp
}

/// True when the `Accept` header prefers JSON.
pub fn wants_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json") && !v.contains("text/html"))
}
