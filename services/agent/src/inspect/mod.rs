//! Seeing the traffic: every request the agent forwards, for the console and the local
//! inspector.
//!
//! The origin path ([`crate::origin`]) opens a [`Recording`] per request (when the
//! agent has an [`Observer`]); the recording copies up to [`InspectConfig::body_cap`]
//! bytes of each body *while* the bytes are forwarded ([`TeeBody`]: nothing is held
//! back, a stream stays a stream), and when it is dropped, however the request ended,
//! it files the request in the [`Store`] (a ring buffer bounded in count and bytes) and
//! tells the console. Secrets stay in the store as they were sent, so a replay sends
//! them again; every view of it ([`Store::summary`], [`Store::detail`], the console
//! line) redacts them unless the user asked to see them.

pub mod server;
pub mod ws;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body::Frame;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

/// Default inspector address; the next free port is taken when it is in use.
pub const DEFAULT_INSPECT_PORT: u16 = 4040;
/// Ports tried after [`DEFAULT_INSPECT_PORT`] before any free port is taken.
pub const INSPECT_PORT_TRIES: u16 = 10;
/// Bytes of each body kept (the rest is counted, not kept).
pub const DEFAULT_BODY_CAP: usize = 1 << 20;
/// Requests kept.
pub const DEFAULT_MAX_ENTRIES: usize = 500;
/// Bytes kept over all requests (bodies and heads).
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;
/// Console events queued for the printer; beyond this, lines are dropped (and
/// counted) rather than held in memory.
pub const CONSOLE_QUEUE: usize = 1024;
/// Bytes of a binary body shown as hex.
pub const HEX_PREVIEW: usize = 256;
/// Live-list updates queued per inspector page; a page that falls further behind
/// reloads the list.
pub const LIVE_QUEUE: usize = 256;
/// What a redacted value shows.
pub const REDACTED: &str = "[redacted]";

/// Headers whose values are secrets.
const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
];

/// Query (and form) parameters whose values are secrets, compared without case; `token`
/// is the edge's own portal parameter.
const SECRET_PARAMS: &[&str] = &[
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "api_key",
    "apikey",
    "key",
    "secret",
    "client_secret",
    "password",
    "passwd",
    "sig",
    "signature",
    "code",
];

/// The inspector's caps and choices.
#[derive(Debug, Clone)]
pub struct InspectConfig {
    /// Bytes of each body kept.
    pub body_cap: usize,
    /// Requests kept.
    pub max_entries: usize,
    /// Bytes kept over all requests.
    pub max_bytes: usize,
    /// Show secrets instead of redacting them.
    pub show_secrets: bool,
    /// WebSocket messages kept each way per session.
    pub ws_messages: usize,
    /// Bytes kept of each WebSocket message.
    pub ws_message_cap: usize,
}

impl Default for InspectConfig {
    fn default() -> Self {
        InspectConfig {
            body_cap: DEFAULT_BODY_CAP,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
            show_secrets: false,
            ws_messages: ws::DEFAULT_WS_MESSAGES,
            ws_message_cap: ws::DEFAULT_WS_MESSAGE_CAP,
        }
    }
}

/// Why the origin could not be reached, as the console names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCause {
    /// Nothing listens at the origin's address.
    ConnectionRefused,
    /// The origin did not answer in time.
    TimedOut,
    /// The origin's TLS certificate was refused.
    CertificateRefused,
    /// The origin's host could not be reached (name not found, no route).
    Unreachable,
    /// The origin answered, but not in HTTP we could use.
    ProtocolError,
}

impl FailureCause {
    /// Words for the console.
    pub fn label(self) -> &'static str {
        match self {
            FailureCause::ConnectionRefused => "connection refused",
            FailureCause::TimedOut => "timed out",
            FailureCause::CertificateRefused => "certificate refused",
            FailureCause::Unreachable => "unreachable",
            FailureCause::ProtocolError => "protocol error",
        }
    }
}

/// One request as the console shows it (and as `--json` prints it).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RequestLine {
    /// Inspector id.
    pub id: u64,
    /// When it started, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Method.
    pub method: String,
    /// Path and query, query secrets redacted.
    pub path: String,
    /// The origin's status; `None` when the origin never answered.
    pub status: Option<u16>,
    /// From the request's arrival to the response's last byte.
    pub duration_ms: u64,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
    /// The request this one replays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<u64>,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the console hears.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ConsoleEvent {
    /// A request finished.
    Request(RequestLine),
    /// The origin failed for a cause not reported since it last answered.
    OriginError {
        /// The cause, named.
        cause: FailureCause,
        /// What exactly happened.
        message: String,
        /// What to do about it.
        fix: String,
    },
    /// The origin answered again after failing.
    OriginHealthy,
}

/// Is the origin answering?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No request yet.
    Unknown,
    /// The last request got an answer.
    Healthy,
    /// The last request failed for this cause.
    Failing(FailureCause),
}

/// Everything that watches requests: the inspector's store (if on) and the console.
pub struct Observer {
    store: Option<Arc<Store>>,
    console: Option<mpsc::Sender<ConsoleEvent>>,
    health: Mutex<Health>,
    next_id: AtomicU64,
    dropped_lines: AtomicU64,
    show_secrets: bool,
}

impl Observer {
    /// An observer filing requests in `store` (when the inspector is on) and telling
    /// `console` (when someone prints them).
    pub fn new(
        store: Option<Arc<Store>>,
        console: Option<mpsc::Sender<ConsoleEvent>>,
        show_secrets: bool,
    ) -> Observer {
        Observer {
            store,
            console,
            health: Mutex::new(Health::Unknown),
            next_id: AtomicU64::new(1),
            dropped_lines: AtomicU64::new(0),
            show_secrets,
        }
    }

    /// The inspector's store, when it is on.
    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    /// Are requests kept (the inspector is on)? When not, [`Observer::begin`] needs no
    /// headers: the console line does not show them.
    pub fn capturing(&self) -> bool {
        self.store.is_some()
    }

    /// Is the origin answering?
    pub fn health(&self) -> Health {
        *self.health.lock()
    }

    /// Console lines dropped because the printer fell behind.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped_lines.load(Ordering::Relaxed)
    }

    fn tell(&self, ev: ConsoleEvent) {
        if let Some(c) = &self.console
            && c.try_send(ev).is_err()
        {
            self.dropped_lines.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Opens the recording of one request.
    pub fn begin(
        self: &Arc<Self>,
        method: &str,
        target: &str,
        headers: Vec<(String, Bytes)>,
        replay_of: Option<u64>,
    ) -> Recording {
        let cap = self.store.as_ref().map(|s| s.cfg.body_cap).unwrap_or(0);
        Recording {
            obs: self.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            replay_of,
            started: Instant::now(),
            at_unix_ms: unix_ms(),
            method: method.to_string(),
            target: target.to_string(),
            req_headers: headers.into(),
            req_body: Arc::new(Mutex::new(Capture::new(cap))),
            status: None,
            resp_headers: Arc::new([]),
            resp_body: Arc::new(Mutex::new(Capture::new(cap))),
            error: None,
            websocket: false,
            ws: None,
            event_stream: false,
            slot: None,
        }
    }

    /// The origin answered: reports recovery once after a failure.
    fn answered(&self) {
        let was = std::mem::replace(&mut *self.health.lock(), Health::Healthy);
        if matches!(was, Health::Failing(_)) {
            self.tell(ConsoleEvent::OriginHealthy);
        }
    }

    /// The origin failed: reports the cause once until the origin answers again or
    /// fails for another cause.
    fn failed(&self, cause: FailureCause, message: &str, fix: &str) {
        let was = std::mem::replace(&mut *self.health.lock(), Health::Failing(cause));
        if was != Health::Failing(cause) {
            tracing::warn!(cause = cause.label(), error = %message, fix, "the origin failed");
            self.tell(ConsoleEvent::OriginError {
                cause,
                message: message.to_string(),
                fix: fix.to_string(),
            });
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The first bytes of a body, and how many there were.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    /// Up to the cap.
    pub data: Vec<u8>,
    /// Every byte seen, kept or not.
    pub size: u64,
    cap: usize,
}

impl Capture {
    fn new(cap: usize) -> Capture {
        Capture {
            data: Vec::new(),
            size: 0,
            cap,
        }
    }

    /// Counts `chunk` and keeps what fits under the cap; `rest` is how many bytes the
    /// body still has to come, when it says (a `Content-Length`).
    fn push(&mut self, chunk: &[u8], rest: Option<u64>) {
        self.size += chunk.len() as u64;
        let room = self.cap.saturating_sub(self.data.len());
        if room > 0 {
            let take = room.min(chunk.len());
            if self.data.capacity() == 0 {
                // One allocation of the right size for bodies that fit: the whole body
                // when its length is known, else a page to start with.
                let want = match rest {
                    Some(r) => chunk
                        .len()
                        .saturating_add(r.try_into().unwrap_or(usize::MAX)),
                    None => chunk.len().max(4096),
                };
                self.data.reserve_exact(self.cap.min(want));
            }
            self.data.extend_from_slice(&chunk[..take]);
        }
    }

    /// Some bytes were not kept.
    pub fn truncated(&self) -> bool {
        self.size > self.data.len() as u64
    }

    /// The kept bytes as a copy, the capture going on (an entry filed in progress).
    fn copy(&self) -> BodyCapture {
        BodyCapture {
            data: Bytes::copy_from_slice(&self.data),
            size: self.size,
        }
    }

    /// The kept bytes, moved out without a copy (the request has ended). The buffer is
    /// trimmed to what it holds first, so the store never keeps more than it counts.
    fn take(&mut self) -> BodyCapture {
        let mut data = std::mem::take(&mut self.data);
        data.shrink_to_fit();
        BodyCapture {
            data: Bytes::from(data),
            size: self.size,
        }
    }
}

/// Headers as kept: shared between the entry filed while the response streams and the
/// one filed when it ends, so neither copies them.
pub type Heads = Arc<[(String, Bytes)]>;

/// A body that copies what passes through it (up to the capture's cap) into a
/// [`Capture`], frame by frame, as it forwards: it never waits for more than the frame
/// in hand, so streaming stays streaming.
pub struct TeeBody<B> {
    inner: B,
    capture: Option<Arc<Mutex<Capture>>>,
}

impl<B> TeeBody<B> {
    /// Passes `inner` through, copying into `capture` when given.
    pub fn new(inner: B, capture: Option<Arc<Mutex<Capture>>>) -> TeeBody<B> {
        TeeBody { inner, capture }
    }
}

impl<B> http_body::Body for TeeBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(f))), Some(c)) = (&r, &self.capture)
            && let Some(d) = f.data_ref()
        {
            c.lock().push(d, self.inner.size_hint().exact());
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// One request being watched; filed in the store and told to the console when
/// dropped, however the request ended.
pub struct Recording {
    obs: Arc<Observer>,
    id: u64,
    replay_of: Option<u64>,
    started: Instant,
    at_unix_ms: u64,
    method: String,
    target: String,
    req_headers: Heads,
    req_body: Arc<Mutex<Capture>>,
    status: Option<u16>,
    resp_headers: Heads,
    resp_body: Arc<Mutex<Capture>>,
    error: Option<String>,
    websocket: bool,
    ws: Option<Arc<Mutex<ws::WsSession>>>,
    event_stream: bool,
    /// Where the store keeps it, once filed.
    slot: Option<u64>,
}

impl Recording {
    /// Its inspector id.
    pub fn id(&self) -> u64 {
        self.id
    }

    fn capturing(&self) -> bool {
        self.obs.store.is_some()
    }

    /// Wraps the request body so its first bytes are kept and all are counted.
    pub fn request_body<B>(&self, b: B) -> TeeBody<B> {
        TeeBody::new(b, Some(self.req_body.clone()))
    }

    /// The response body's capture, for a [`TeeBody`].
    pub fn response_capture(&self) -> Arc<Mutex<Capture>> {
        self.resp_body.clone()
    }

    /// Wraps the response body so its first bytes are kept and all are counted.
    pub fn response_body<B>(&self, b: B) -> TeeBody<B> {
        TeeBody::new(b, Some(self.resp_body.clone()))
    }

    /// The origin answered with this head; the request shows in the inspector as in
    /// progress until its body ends.
    pub fn response(&mut self, status: u16, headers: &http::HeaderMap) {
        self.obs.answered();
        self.status = Some(status);
        if self.capturing() {
            self.resp_headers = headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
                .collect();
        }
        self.event_stream = headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        self.websocket = status == 101;
        let upgrade_to_websocket = self.req_headers.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("upgrade") && v.eq_ignore_ascii_case(b"websocket")
        });
        if let (true, true, Some(s)) = (self.websocket, upgrade_to_websocket, &self.obs.store) {
            let extensions = headers
                .get_all(http::header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(", ");
            self.ws = Some(Arc::new(Mutex::new(ws::WsSession::new(
                s.cfg.ws_messages,
                s.cfg.ws_message_cap,
                Some(extensions.as_str()),
            ))));
        }
        if let Some(s) = self.obs.store.clone() {
            let e = self.entry(EntryState::InProgress, false);
            self.slot = Some(s.file(e, self.slot));
        }
    }

    /// The WebSocket session to tap ([`ws::WsTap`]), when the origin accepted an upgrade
    /// to WebSocket and the inspector is on.
    pub fn websocket_session(&self) -> Option<Arc<Mutex<ws::WsSession>>> {
        self.ws.clone()
    }

    /// The origin could not be used; `cause` is reported to the console once.
    pub fn failed(&mut self, cause: Option<FailureCause>, message: &str, fix: &str) {
        if let Some(c) = cause {
            self.obs.failed(c, message, fix);
        }
        self.error = Some(match cause {
            Some(c) => format!("{}: {message}", c.label()),
            None => message.to_string(),
        });
    }

    /// The entry to file: while the response streams, bodies so far as copies; at the
    /// end (`last`), the recording's strings and kept bytes moved into it.
    fn entry(&mut self, state: EntryState, last: bool) -> Entry {
        let body = |c: &Arc<Mutex<Capture>>| {
            let mut c = c.lock();
            if last { c.take() } else { c.copy() }
        };
        let (method, target, error) = if last {
            (
                std::mem::take(&mut self.method),
                std::mem::take(&mut self.target),
                self.error.take(),
            )
        } else {
            (self.method.clone(), self.target.clone(), self.error.clone())
        };
        Entry {
            id: self.id,
            replay_of: self.replay_of,
            at_unix_ms: self.at_unix_ms,
            duration_ms: self.started.elapsed().as_millis() as u64,
            method,
            target,
            req_headers: self.req_headers.clone(),
            req_body: body(&self.req_body),
            status: self.status,
            resp_headers: self.resp_headers.clone(),
            resp_body: body(&self.resp_body),
            error,
            state,
            websocket: self.websocket,
            ws: self.ws.as_ref().map(|w| {
                let w = w.lock();
                WsCapture {
                    view: w.view(),
                    weight: w.weight(),
                }
            }),
            event_stream: self.event_stream,
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        let state = if self.error.is_some() {
            EntryState::Failed
        } else if self.status.is_some() {
            EntryState::Complete
        } else {
            EntryState::Aborted
        };
        // The console's line first, from the recording as it is; then (inspector on)
        // the entry takes the recording's strings and bytes rather than copies.
        let line = RequestLine {
            id: self.id,
            at_unix_ms: self.at_unix_ms,
            method: self.method.clone(),
            path: redact_target(&self.target, self.obs.show_secrets),
            status: self.status,
            duration_ms: self.started.elapsed().as_millis() as u64,
            bytes_in: self.req_body.lock().size,
            bytes_out: self.resp_body.lock().size,
            replay_of: self.replay_of,
            error: self.error.clone(),
        };
        if let Some(s) = self.obs.store.clone() {
            let mut e = self.entry(state, true);
            e.duration_ms = line.duration_ms;
            s.file(e, self.slot);
        }
        self.obs.tell(ConsoleEvent::Request(line));
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    /// The response is still streaming.
    InProgress,
    /// The response ended.
    Complete,
    /// The origin could not be used.
    Failed,
    /// The viewer or the tunnel went away before the origin answered.
    Aborted,
}

/// A body as kept.
#[derive(Debug, Clone, Default)]
pub struct BodyCapture {
    /// The first bytes.
    pub data: Bytes,
    /// All bytes seen.
    pub size: u64,
}

impl BodyCapture {
    /// Some bytes were not kept.
    pub fn truncated(&self) -> bool {
        self.size > self.data.len() as u64
    }
}

/// A WebSocket session as kept: its view (see [`ws::WsSession::view`]) and the bytes
/// it weighs.
#[derive(Debug, Clone)]
pub struct WsCapture {
    /// What `/api/requests/{id}` shows as `websocket_session`.
    pub view: Value,
    /// The kept messages' bytes, with overhead.
    pub weight: usize,
}

/// One request as kept, secrets included (views redact).
#[derive(Debug, Clone)]
pub struct Entry {
    /// Id, increasing.
    pub id: u64,
    /// The request this one replays.
    pub replay_of: Option<u64>,
    /// Start, ms since the epoch.
    pub at_unix_ms: u64,
    /// Duration so far (or in all, once complete).
    pub duration_ms: u64,
    /// Method.
    pub method: String,
    /// Path and query as received.
    pub target: String,
    /// Request headers as received.
    pub req_headers: Heads,
    /// Request body.
    pub req_body: BodyCapture,
    /// Status.
    pub status: Option<u16>,
    /// Response headers.
    pub resp_headers: Heads,
    /// Response body.
    pub resp_body: BodyCapture,
    /// Why it failed.
    pub error: Option<String>,
    /// How it ended.
    pub state: EntryState,
    /// A WebSocket session (101 Switching Protocols).
    pub websocket: bool,
    /// What was captured of the WebSocket session, when it was one.
    pub ws: Option<WsCapture>,
    /// A server-sent event stream.
    pub event_stream: bool,
}

impl Entry {
    /// Bytes it holds, against the store's byte cap.
    fn weight(&self) -> usize {
        let heads: usize = self
            .req_headers
            .iter()
            .chain(self.resp_headers.iter())
            .map(|(k, v)| k.len() + v.len() + 32)
            .sum();
        256 + self.target.len()
            + heads
            + self.req_body.data.len()
            + self.resp_body.data.len()
            + self.ws.as_ref().map_or(0, |w| w.weight)
    }

    fn header(&self, name: &str, resp: bool) -> Option<&str> {
        let hs = if resp {
            &self.resp_headers
        } else {
            &self.req_headers
        };
        hs.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

#[derive(Default)]
struct Ring {
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Entries ever dropped from the front: the entry filed as the `n`th (its slot, see
    /// [`Store::file`]) sits at `n - dropped` while it is kept.
    dropped: u64,
}

/// The requests kept for the inspector: a ring buffer bounded in count and bytes.
pub struct Store {
    cfg: InspectConfig,
    ring: Mutex<Ring>,
    updates: broadcast::Sender<u64>,
}

impl Store {
    /// An empty store.
    pub fn new(cfg: InspectConfig) -> Store {
        Store {
            cfg,
            ring: Mutex::default(),
            updates: broadcast::channel(LIVE_QUEUE).0,
        }
    }

    /// Its settings.
    pub fn config(&self) -> &InspectConfig {
        &self.cfg
    }

    /// Ids of requests filed or updated from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<u64> {
        self.updates.subscribe()
    }

    /// Files an entry, or updates the one filed in `slot` (what an earlier call
    /// returned) if it is still kept; drops the oldest until both caps hold. Returns the
    /// entry's slot: finding it again costs nothing, where a search through the ring
    /// under its lock cost every request.
    fn file(&self, e: Entry, slot: Option<u64>) -> u64 {
        let id = e.id;
        let (slot, old) = {
            let mut r = self.ring.lock();
            let at = slot.and_then(|s| {
                let pos = usize::try_from(s.checked_sub(r.dropped)?).ok()?;
                r.entries
                    .get(pos)
                    .is_some_and(|x| x.id == id)
                    .then_some((s, pos))
            });
            let (slot, old) = match at {
                Some((s, pos)) => {
                    let w = e.weight();
                    let old = std::mem::replace(&mut r.entries[pos], e);
                    r.bytes = r.bytes - old.weight() + w;
                    (s, Some(old))
                }
                None => {
                    r.bytes += e.weight();
                    r.entries.push_back(e);
                    (r.dropped + r.entries.len() as u64 - 1, None)
                }
            };
            while r.entries.len() > self.cfg.max_entries
                || (r.bytes > self.cfg.max_bytes && r.entries.len() > 1)
            {
                if let Some(old) = r.entries.pop_front() {
                    r.bytes -= old.weight();
                    r.dropped += 1;
                }
            }
            (slot, old)
        };
        // The replaced entry is freed outside the lock.
        drop(old);
        let _ = self.updates.send(id);
        slot
    }

    /// One entry, secrets and all (for replay).
    pub fn get(&self, id: u64) -> Option<Entry> {
        self.ring
            .lock()
            .entries
            .iter()
            .find(|e| e.id == id)
            .cloned()
    }

    /// Requests kept and bytes they hold.
    pub fn usage(&self) -> (usize, usize) {
        let r = self.ring.lock();
        (r.entries.len(), r.bytes)
    }

    /// Summaries, newest first, of the entries the filter keeps.
    pub fn list(&self, filter: &Filter) -> Vec<Value> {
        let r = self.ring.lock();
        r.entries
            .iter()
            .rev()
            .filter(|e| filter.keeps(e))
            .map(|e| self.summary(e))
            .collect()
    }

    /// A summary for the list: no bodies, secrets redacted.
    pub fn summary(&self, e: &Entry) -> Value {
        let streamed = self.streamed(e);
        json!({
            "id": e.id,
            "replay_of": e.replay_of,
            "at_unix_ms": e.at_unix_ms,
            "duration_ms": e.duration_ms,
            "method": e.method,
            "path": redact_target(&e.target, self.cfg.show_secrets),
            "status": e.status,
            "state": e.state,
            "error": e.error,
            "bytes_in": e.req_body.size,
            "bytes_out": e.resp_body.size,
            "streamed": streamed,
            "websocket": e.websocket,
        })
    }

    fn streamed(&self, e: &Entry) -> bool {
        e.event_stream || e.websocket || e.resp_body.size > self.cfg.body_cap as u64
    }

    /// Everything shown about one entry, secrets redacted unless shown.
    pub fn detail(&self, e: &Entry) -> Value {
        let show = self.cfg.show_secrets;
        let mut v = self.summary(e);
        v["request"] = json!({
            "method": e.method,
            "path": redact_target(&e.target, show),
            "headers": headers_view(&e.req_headers, show),
            "body": body_view(&e.req_body, e.header("content-type", false), false, show),
        });
        if e.status.is_some() {
            v["response"] = json!({
                "status": e.status,
                "headers": headers_view(&e.resp_headers, show),
                "body": body_view(&e.resp_body, e.header("content-type", true), self.streamed(e), show),
            });
        }
        if let Some(w) = &e.ws {
            v["websocket_session"] = w.view.clone();
        }
        v
    }

    /// Drops every entry.
    pub fn clear(&self) {
        let mut r = self.ring.lock();
        r.dropped += r.entries.len() as u64;
        r.entries.clear();
        r.bytes = 0;
    }
}

/// What the list shows: status class or code, method, path substring.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// `2xx`, `4xx`, `404`, or `error` (no answer).
    pub status: Option<String>,
    /// Method, any case.
    pub method: Option<String>,
    /// A substring of the (redacted) path.
    pub path: Option<String>,
}

impl Filter {
    /// Parses `status=…&method=…&path=…`.
    pub fn from_query(q: Option<&str>) -> Filter {
        let mut f = Filter::default();
        for (k, v) in url::form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
            let v = Some(v.into_owned()).filter(|v| !v.is_empty());
            match k.as_ref() {
                "status" => f.status = v,
                "method" => f.method = v,
                "path" => f.path = v,
                _ => {}
            }
        }
        f
    }

    fn keeps(&self, e: &Entry) -> bool {
        if let Some(m) = &self.method
            && !e.method.eq_ignore_ascii_case(m)
        {
            return false;
        }
        if let Some(p) = &self.path
            && !e
                .target
                .split('?')
                .next()
                .unwrap_or("")
                .contains(p.as_str())
        {
            return false;
        }
        if let Some(s) = &self.status {
            let s = s.to_ascii_lowercase();
            let ok = match e.status {
                None => s == "error",
                Some(code) => {
                    let c = code.to_string();
                    if s.len() == 3 && s.ends_with("xx") {
                        c.starts_with(&s[..1])
                    } else {
                        c == s
                    }
                }
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

fn is_secret_param(name: &str) -> bool {
    SECRET_PARAMS.iter().any(|s| name.eq_ignore_ascii_case(s))
}

/// The path with the values of secret query parameters replaced by [`REDACTED`].
pub fn redact_target(target: &str, show: bool) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_string();
    };
    if show {
        return target.to_string();
    }
    let parts: Vec<String> = query
        .split('&')
        .map(|pair| {
            let (raw_name, _) = pair.split_once('=').unwrap_or((pair, ""));
            let name: String = url::form_urlencoded::parse(raw_name.as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            if pair.contains('=') && is_secret_param(&name) {
                format!("{raw_name}={REDACTED}")
            } else {
                pair.to_string()
            }
        })
        .collect();
    format!("{path}?{}", parts.join("&"))
}

/// A header value as shown: secrets redacted, keeping an `Authorization` scheme.
pub fn redact_header(name: &str, value: &[u8], show: bool) -> String {
    let v = String::from_utf8_lossy(value);
    if show || !SECRET_HEADERS.iter().any(|s| name.eq_ignore_ascii_case(s)) {
        return v.into_owned();
    }
    if (name.eq_ignore_ascii_case("authorization")
        || name.eq_ignore_ascii_case("proxy-authorization"))
        && let Some((scheme, _)) = v.split_once(' ')
    {
        return format!("{scheme} {REDACTED}");
    }
    REDACTED.to_string()
}

fn headers_view(hs: &[(String, Bytes)], show: bool) -> Value {
    Value::Array(
        hs.iter()
            .map(|(k, v)| json!([k, redact_header(k, v, show)]))
            .collect(),
    )
}

/// A body as shown: JSON pretty-printed, forms decoded (secret fields redacted), text
/// as text, anything else as its size and a hex preview.
pub fn body_view(b: &BodyCapture, content_type: Option<&str>, streamed: bool, show: bool) -> Value {
    let ct = content_type.unwrap_or("").to_ascii_lowercase();
    let mut v = json!({
        "size": b.size,
        "captured": b.data.len(),
        "truncated": b.truncated(),
        "streamed": streamed,
        "content_type": content_type,
    });
    if b.size == 0 {
        v["kind"] = json!("empty");
        return v;
    }
    if ct.contains("json")
        && !b.truncated()
        && let Ok(j) = serde_json::from_slice::<Value>(&b.data)
    {
        v["kind"] = json!("json");
        v["text"] = json!(serde_json::to_string_pretty(&j).unwrap_or_default());
        return v;
    }
    if ct.starts_with("application/x-www-form-urlencoded") {
        let form: Vec<Value> = url::form_urlencoded::parse(&b.data)
            .map(|(k, val)| {
                let shown = if !show && is_secret_param(&k) {
                    REDACTED.to_string()
                } else {
                    val.into_owned()
                };
                json!([k, shown])
            })
            .collect();
        v["kind"] = json!("form");
        v["form"] = Value::Array(form);
        if show {
            v["text"] = json!(String::from_utf8_lossy(&b.data));
        }
        return v;
    }
    match std::str::from_utf8(&b.data) {
        Ok(t) => {
            v["kind"] = json!("text");
            v["text"] = json!(t);
        }
        // A cut inside a multi-byte character is still text.
        Err(e) if b.truncated() && e.error_len().is_none() => {
            v["kind"] = json!("text");
            v["text"] = json!(String::from_utf8_lossy(&b.data[..e.valid_up_to()]));
        }
        Err(_) => {
            v["kind"] = json!("binary");
            v["hex"] = json!(hex_preview(&b.data[..b.data.len().min(HEX_PREVIEW)]));
        }
    }
    v
}

fn hex_preview(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 3);
    for (i, chunk) in b.chunks(16).enumerate() {
        use std::fmt::Write;
        let _ = write!(s, "{:08x} ", i * 16);
        for x in chunk {
            let _ = write!(s, " {x:02x}");
        }
        s.push('\n');
    }
    s
}

/// The cause of an origin failure, read from the error's chain.
pub fn classify(e: &(dyn std::error::Error + 'static)) -> (FailureCause, String) {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut connect = false;
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return rustls_cause(r);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return rustls_cause(r);
            }
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    return (FailureCause::ConnectionRefused, io.to_string());
                }
                std::io::ErrorKind::TimedOut => return (FailureCause::TimedOut, io.to_string()),
                _ => {}
            }
        }
        if let Some(h) = err.downcast_ref::<hyper_util::client::legacy::Error>() {
            connect |= h.is_connect();
        }
        cur = err.source();
    }
    let chain = crate::origin::error_chain(e);
    // The TLS error may sit inside an io::Error whose `source` skips it: read the text.
    if let Some(i) = chain.find("invalid peer certificate: ") {
        let rest = &chain[i + "invalid peer certificate: ".len()..];
        let why = if rest.starts_with("UnknownIssuer") {
            "signed by an unknown authority (self-signed or a private CA)".to_string()
        } else if rest.starts_with("Expired") {
            "expired".to_string()
        } else if rest.starts_with("NotValidForName") {
            "not valid for the origin's host name".to_string()
        } else {
            rest.to_string()
        };
        return (
            FailureCause::CertificateRefused,
            format!("the origin's certificate is not trusted: {why}"),
        );
    }
    if chain.to_ascii_lowercase().contains("connection refused") {
        return (FailureCause::ConnectionRefused, chain);
    }
    if chain.contains("dns error") || chain.contains("failed to lookup") {
        return (FailureCause::Unreachable, chain);
    }
    if connect && !chain.contains("tls") {
        return (FailureCause::Unreachable, chain);
    }
    (FailureCause::ProtocolError, chain)
}

fn rustls_cause(r: &rustls::Error) -> (FailureCause, String) {
    match r {
        rustls::Error::InvalidCertificate(c) => (
            FailureCause::CertificateRefused,
            format!(
                "the origin's certificate is not trusted: {}",
                cert_reason(c)
            ),
        ),
        other => (FailureCause::ProtocolError, format!("TLS: {other}")),
    }
}

fn cert_reason(c: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match c {
        C::UnknownIssuer => "signed by an unknown authority (self-signed or a private CA)".into(),
        C::Expired | C::ExpiredContext { .. } => "expired".into(),
        C::NotValidYet | C::NotValidYetContext { .. } => "not valid yet".into(),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "not valid for the origin's host name".into()
        }
        C::Revoked => "revoked".into(),
        other => format!("{other:?}"),
    }
}

/// What to do about a failure cause.
pub fn fix_for(cause: FailureCause, origin: &str, timeout: Duration) -> String {
    match cause {
        FailureCause::ConnectionRefused => format!(
            "nothing listens at {origin}: start the service, or give netbore the port it listens on"
        ),
        FailureCause::TimedOut => format!(
            "the origin gave no answer within {}s: check the service, or raise --origin-timeout",
            timeout.as_secs()
        ),
        FailureCause::CertificateRefused => "trust the origin's CA with --origin-ca FILE, or for a self-signed development server pass --origin-insecure".into(),
        FailureCause::Unreachable => format!(
            "check the host name in {origin} and that this machine can reach it"
        ),
        FailureCause::ProtocolError => format!(
            "check that {origin} speaks HTTP with that scheme (http:// or https://); pass --origin-http2 if it speaks only HTTP/2"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, body: usize) -> Entry {
        Entry {
            id,
            replay_of: None,
            at_unix_ms: 0,
            duration_ms: 0,
            method: "GET".into(),
            target: "/".into(),
            req_headers: Arc::new([]),
            req_body: BodyCapture {
                data: Bytes::from(vec![b'x'; body]),
                size: body as u64,
            },
            status: Some(200),
            resp_headers: Arc::new([]),
            resp_body: BodyCapture::default(),
            error: None,
            state: EntryState::Complete,
            websocket: false,
            ws: None,
            event_stream: false,
        }
    }

    #[test]
    fn the_ring_keeps_its_count_and_byte_caps() {
        let s = Store::new(InspectConfig {
            body_cap: 1000,
            max_entries: 3,
            // Two 1000-byte entries weigh 2 × (1000 + 257) = 2514 with their overhead.
            max_bytes: 2600,
            show_secrets: false,
            ..InspectConfig::default()
        });
        for i in 1..=5 {
            s.file(entry(i, 10), None);
        }
        assert_eq!(s.usage().0, 3);
        assert!(s.get(2).is_none() && s.get(3).is_some());
        for i in 6..=9 {
            s.file(entry(i, 1000), None);
        }
        let (n, bytes) = s.usage();
        assert!(bytes <= 2600, "{bytes}");
        assert_eq!(n, 2);
        assert!(s.get(9).is_some());
    }

    #[test]
    fn an_entry_filed_again_by_its_slot_is_updated_in_place_unless_dropped() {
        let s = Store::new(InspectConfig {
            max_entries: 3,
            ..InspectConfig::default()
        });
        let one = s.file(entry(1, 10), None);
        let two = s.file(entry(2, 10), None);
        let mut done = entry(1, 20);
        done.duration_ms = 7;
        assert_eq!(s.file(done, Some(one)), one);
        assert_eq!(s.usage().0, 2);
        assert_eq!(s.get(1).map(|e| e.duration_ms), Some(7));
        assert_eq!(s.get(1).map(|e| e.req_body.size), Some(20));
        // 3 and 4 push 1 out; filing 2 by its slot still finds it.
        s.file(entry(3, 10), None);
        s.file(entry(4, 10), None);
        assert!(s.get(1).is_none());
        assert_eq!(s.file(entry(2, 30), Some(two)), two);
        assert_eq!(s.usage().0, 3);
        // An entry dropped meanwhile (evicted, or cleared) comes back as a new one.
        let late = s.file(entry(1, 10), Some(one));
        assert_ne!(late, one);
        assert!(s.get(1).is_some() && s.get(2).is_none());
        s.clear();
        s.file(entry(5, 10), Some(late));
        assert_eq!(s.usage().0, 1);
        assert!(s.get(5).is_some());
    }

    #[test]
    fn capture_keeps_the_cap_and_counts_everything() {
        let mut c = Capture::new(5);
        c.push(b"abc", None);
        c.push(b"defgh", None);
        assert_eq!(c.data, b"abcde");
        assert_eq!(c.size, 8);
        assert!(c.truncated());
    }

    #[test]
    fn secrets_are_redacted_unless_shown() {
        assert_eq!(
            redact_target("/cb?code=abc&state=1&Token=x&tok=y", false),
            "/cb?code=[redacted]&state=1&Token=[redacted]&tok=y"
        );
        assert_eq!(redact_target("/a?token=x", true), "/a?token=x");
        assert_eq!(
            redact_header("Authorization", b"Bearer abc", false),
            "Bearer [redacted]"
        );
        assert_eq!(redact_header("cookie", b"a=b", false), REDACTED);
        assert_eq!(redact_header("accept", b"*/*", false), "*/*");
    }

    #[test]
    fn bodies_show_as_json_form_text_or_hex() {
        let b = |d: &[u8]| BodyCapture {
            data: Bytes::copy_from_slice(d),
            size: d.len() as u64,
        };
        let v = body_view(&b(br#"{"a":1}"#), Some("application/json"), false, false);
        assert_eq!(v["kind"], "json");
        assert_eq!(v["text"], "{\n  \"a\": 1\n}");
        let v = body_view(
            &b(b"user=me&password=hunter2"),
            Some("application/x-www-form-urlencoded"),
            false,
            false,
        );
        assert_eq!(v["form"], json!([["user", "me"], ["password", REDACTED]]));
        let v = body_view(&b(&[0, 159, 146, 150]), None, false, false);
        assert_eq!(v["kind"], "binary");
        assert!(v["hex"].as_str().unwrap().contains("00 9f 92 96"));
    }

    #[test]
    fn filters_match_status_class_method_and_path() {
        let e = entry(1, 0);
        let f = |q: &str| Filter::from_query(Some(q)).keeps(&e);
        assert!(f("status=2xx&method=get&path=/"));
        assert!(f("status=200"));
        assert!(!f("status=4xx"));
        assert!(!f("method=POST"));
        assert!(!f("path=/api"));
    }
}
