//! The upstream's answer on its way back: its end-to-end headers, and its
//! body either read whole first (the upstream connection goes back to the
//! pool at once and the client drains the answer from memory) or streamed
//! at the client's pace.
//!
//! Who is protected from whom:
//! - An answer of at most `upstream.buffer_response` bytes (its length
//!   known) is read whole while all buffered answers together stay under
//!   `server.response_buffer_total`: a client that reads slowly, or not at
//!   all, then holds memory we bounded, never an upstream connection.
//! - Any other answer is streamed from its upstream connection, read no
//!   faster than the client takes it (at most [`client::READ_BUFFER`] ahead),
//!   so it holds that connection while it lasts. One client address may
//!   hold at most `upstream.max_streaming_per_client` such answers at once
//!   (every worker together); past that its new requests are answered 503
//!   with Retry-After, so no single client, however many connections it
//!   opens, can take the pool from everyone else. Many users behind one NAT
//!   address share that allowance only for large answers still streaming.
//! - Either kind is cut off when its client takes nothing for
//!   `server.send_timeout` (see `watch`).

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use actix_web::body::SizedStream;
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, HttpResponseBuilder};
use bytes::{Bytes, BytesMut};
use http_body::Body;
use hyper::body::Incoming;

use super::body::{poll_frame_driven, Buffered, EndHook, Held, Paced, ResponseBody, Trailers};
use super::client::{self, Conn, Connections};
use super::watch::{self, Watched};
use super::{connection_listed, is_hop_by_hop};
use crate::client_ip::ClientKey;
use crate::upload::IdleDeadline;
use crate::upstreams::health::InFlight;

/// Answers smaller than this never enter the stall watch: the HTTP server
/// takes them into its own buffers whether the client reads or not.
const WATCH_FROM: u64 = 64 * 1024;

/// Bytes held by buffered answers, all workers together.
static BUFFERED: AtomicUsize = AtomicUsize::new(0);
/// `server.response_buffer_total`, set at start.
static BUFFERED_MAX: AtomicUsize = AtomicUsize::new(64 * 1024 * 1024);
/// Streamed answers in progress per client address.
static STREAMING: LazyLock<Mutex<HashMap<ClientKey, usize>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Sets `server.response_buffer_total` (at start; a restart changes it).
pub(crate) fn set_buffer_total(bytes: usize) {
    BUFFERED_MAX.store(bytes, Ordering::Relaxed);
}

/// Bytes of buffered answers reserved until dropped.
pub(super) struct Reserved(usize);

impl Reserved {
    fn take(n: usize) -> Option<Reserved> {
        let max = BUFFERED_MAX.load(Ordering::Relaxed);
        let mut cur = BUFFERED.load(Ordering::Relaxed);
        loop {
            if cur + n > max {
                return None;
            }
            match BUFFERED.compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(Reserved(n)),
                Err(now) => cur = now,
            }
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        BUFFERED.fetch_sub(self.0, Ordering::AcqRel);
    }
}

/// One streamed answer of a client address, counted until dropped.
pub(super) struct Streaming(ClientKey);

impl Streaming {
    fn take(client: ClientKey, cap: usize) -> Option<Streaming> {
        let mut map = STREAMING.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(client).or_insert(0);
        if cap > 0 && *n >= cap {
            return None;
        }
        *n += 1;
        Some(Streaming(client))
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let mut map = STREAMING.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.0) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.0);
            }
        }
    }
}

/// How answers of one pool come back.
#[derive(Clone, Copy)]
pub(crate) struct AnswerLimits {
    /// `upstream.buffer_response` (0: never read whole).
    pub(crate) buffer_response: usize,
    /// `upstream.max_streaming_per_client` (0: no cap).
    pub(crate) max_streaming_per_client: usize,
    /// `upstream.timeout`: the longest stall of the upstream's body.
    pub(crate) idle: Duration,
    /// `server.response_buffer`: the largest piece handed on at once.
    pub(crate) piece: usize,
    /// `server.send_timeout`.
    pub(crate) send_timeout: Duration,
}

/// Why an answer the upstream gave is not passed on.
#[derive(Debug)]
pub(crate) enum AnswerError {
    /// The client address already streams as many answers as it may.
    TooManyStreams,
    /// The upstream broke off or stalled while its answer was being read
    /// whole (the client has had nothing yet).
    Broken(String),
}

/// The upstream's answer `resp` on `conn`, for `client`: read whole or set
/// up to stream (see the module's text); `head` when the request was a
/// HEAD. `flight` counts the request to its URL until the upstream's part
/// is over.
#[allow(clippy::too_many_arguments)]
pub(super) async fn build(
    resp: http::Response<Incoming>,
    conn: Conn,
    pool: &Rc<Connections>,
    head: bool,
    client: ClientKey,
    limits: AnswerLimits,
    flight: InFlight,
) -> Result<UpstreamResponse, AnswerError> {
    let (parts, mut body) = resp.into_parts();
    let mut conn = conn;
    let status = StatusCode::from_u16(parts.status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            headers.append(n, v);
        }
    }
    let size: Option<u64> = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let mut builder = HttpResponse::build(status);
    let listed = connection_listed(&headers);
    for (name, value) in headers.iter() {
        if is_hop_by_hop(name) || listed.contains(name) || name == CONTENT_LENGTH {
            continue;
        }
        builder.append_header((name.clone(), value.clone()));
    }
    let bodyless = head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || body.is_end_stream();
    // An answer of unknown length: what has already come, up to one read
    // buffer's worth (no more than a streamed answer holds anyway); if that
    // is all of it, it is buffered like a sized one.
    let mut prefix = Bytes::new();
    let trailers = Trailers::default();
    if size.is_none() && !bodyless && limits.buffer_response > 0 {
        let max = limits.buffer_response.min(client::READ_BUFFER);
        let (got, ended) = read_available(&mut body, &mut conn, max, &trailers).await?;
        if ended {
            let got_len = got.len();
            drop(flight);
            pool.put_back(conn);
            let held = Held::Buffered(Buffered {
                _reserved: Reserved::take(got.len()),
                rest: got,
            });
            let len = Some(got_len as u64);
            let body = ResponseBody::new(held, None, limits.piece, trailers);
            return Ok(respond(builder, body, headers, status, len));
        }
        prefix = got;
    }
    let kind = if bodyless {
        drop(flight);
        pool.put_back(conn);
        Held::Nothing
    } else if let Some(reserved) = size
        .filter(|n| *n <= limits.buffer_response as u64)
        .and_then(|n| Reserved::take(n as usize))
    {
        let whole = read_whole(&mut body, &mut conn, reserved.0, limits.idle).await?;
        drop(flight);
        pool.put_back(conn);
        Held::Buffered(Buffered {
            rest: whole,
            _reserved: Some(reserved),
        })
    } else {
        // A small answer is read to its end at once whatever the client
        // does (the HTTP server takes it into its own buffers): it is not
        // one of the client's streams.
        let cap = if size.is_some_and(|n| n < WATCH_FROM) {
            0
        } else {
            limits.max_streaming_per_client
        };
        let Some(streaming) = Streaming::take(client, cap) else {
            return Err(AnswerError::TooManyStreams);
        };
        Held::Paced(Paced {
            body,
            conn: Some(conn),
            pool: pool.clone(),
            idle: IdleDeadline::new(limits.idle),
            rest: prefix,
            trailers: trailers.clone(),
            _streaming: streaming,
            _flight: flight,
        })
    };
    let watched = match &kind {
        Held::Buffered(_) | Held::Paced(_) if size.is_none_or(|n| n >= WATCH_FROM) => {
            Some(watch::watch(limits.send_timeout))
        }
        _ => None,
    };
    let body = ResponseBody::new(kind, watched, limits.piece, trailers);
    Ok(respond(builder, body, headers, status, size))
}

/// The answer around `body`.
fn respond(
    builder: HttpResponseBuilder,
    body: ResponseBody,
    headers: HeaderMap,
    status: StatusCode,
    size: Option<u64>,
) -> UpstreamResponse {
    UpstreamResponse {
        builder,
        body,
        headers,
        size,
        status,
    }
}

impl ResponseBody {
    /// The body around `kind`, which `watched` holds when there is one.
    fn new(
        kind: Held,
        watched: Option<Rc<Watched>>,
        piece: usize,
        trailers: Trailers,
    ) -> ResponseBody {
        let held = match (&watched, kind) {
            (Some(w), Held::Buffered(b)) => {
                w.hold(Box::new(b));
                Held::Watched
            }
            (Some(w), Held::Paced(p)) => {
                w.hold(Box::new(p));
                Held::Watched
            }
            (_, kind) => kind,
        };
        ResponseBody {
            held,
            watched,
            piece,
            trailers,
            on_end: None,
            ending: None,
        }
    }
}

/// What of `body` is there already (the connection's task may run twice
/// to deliver it), up to `max` bytes, and whether that is all of it.
async fn read_available(
    body: &mut Incoming,
    conn: &mut Conn,
    max: usize,
    trailers: &Trailers,
) -> Result<(Bytes, bool), AnswerError> {
    use futures_util::FutureExt;
    let mut got = BytesMut::with_capacity(max);
    let mut waits = 0;
    loop {
        let next = std::future::poll_fn(|cx| poll_frame_driven(body, conn, cx));
        match next.now_or_never() {
            Some(None) => return Ok((got.freeze(), true)),
            Some(Some(Err(e))) => return Err(AnswerError::Broken(e.to_string())),
            Some(Some(Ok(frame))) => {
                waits = 0;
                match frame.into_data() {
                    Ok(data) => {
                        got.extend_from_slice(&data);
                        if got.len() >= max {
                            return Ok((got.freeze(), false));
                        }
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            *trailers.borrow_mut() = Some(t);
                        }
                    }
                }
            }
            None if waits >= 2 => return Ok((got.freeze(), false)),
            None => {
                waits += 1;
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Reads `body` whole (its length `len`, known), failing if it stalls for
/// `idle` or breaks off.
async fn read_whole(
    body: &mut Incoming,
    conn: &mut Conn,
    len: usize,
    idle: Duration,
) -> Result<Bytes, AnswerError> {
    let mut whole = BytesMut::with_capacity(len);
    loop {
        let next = std::future::poll_fn(|cx| poll_frame_driven(body, conn, cx));
        let frame = match tokio::time::timeout(idle, next).await {
            Err(_) => return Err(AnswerError::Broken(format!("body stalled for {idle:?}"))),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(AnswerError::Broken(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            if whole.len() + data.len() > len {
                return Err(AnswerError::Broken("body longer than its length".into()));
            }
            whole.extend_from_slice(&data);
        }
    }
    Ok(whole.freeze())
}

/// The upstream's answer, ready to be decorated and sent to the client.
pub(crate) struct UpstreamResponse {
    pub(crate) builder: HttpResponseBuilder,
    body: ResponseBody,
    /// The upstream's headers as they came (hop-by-hop ones included).
    headers: HeaderMap,
    size: Option<u64>,
    status: StatusCode,
}

impl UpstreamResponse {
    /// The upstream's status.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The upstream's header `name`, as text.
    pub(crate) fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Runs `hook` with the answer's trailers when its body ends, before
    /// the client sees the end (see [`EndHook`]).
    pub(crate) fn on_end(&mut self, hook: EndHook) {
        self.body.on_end = Some(hook);
    }

    /// Streams the body back: sized when the upstream gave its length.
    pub(crate) fn into_response(mut self) -> HttpResponse {
        let s = self.status;
        if s.is_informational() || s == StatusCode::NO_CONTENT || s == StatusCode::NOT_MODIFIED {
            return self.builder.finish();
        }
        if let Some(whole) = self.body.take_whole() {
            return self.builder.body(whole);
        }
        match self.size {
            // A settlement waits for the body's end: with a length, the
            // client would have the whole answer (and could ask again)
            // before it is done; unframed, it waits for the end itself.
            Some(_) if self.body.on_end.is_some() => self.builder.streaming(self.body),
            Some(n) => self.builder.body(SizedStream::new(n, self.body)),
            None => self.builder.streaming(self.body),
        }
    }
}
