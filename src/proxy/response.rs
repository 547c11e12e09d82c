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
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::SizedStream;
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, HttpResponseBuilder};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use http_body::Body;
use hyper::body::Incoming;

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
struct Reserved(usize);

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
struct Streaming(ClientKey);

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
    if size.is_none() && !bodyless && limits.buffer_response > 0 {
        let max = limits.buffer_response.min(client::READ_BUFFER);
        let (got, ended) = read_available(&mut body, &mut conn, max).await?;
        if ended {
            let got_len = got.len();
            drop(flight);
            pool.put_back(conn);
            let held = Held::Buffered(Buffered {
                _reserved: Reserved::take(got.len()),
                rest: got,
            });
            let len = Some(got_len as u64);
            return Ok(respond(builder, held, None, status, len, limits.piece));
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
    Ok(respond(builder, kind, watched, status, size, limits.piece))
}

/// The response around `kind`, which `watched` holds when there is one.
fn respond(
    builder: HttpResponseBuilder,
    kind: Held,
    watched: Option<Rc<Watched>>,
    status: StatusCode,
    size: Option<u64>,
    piece: usize,
) -> UpstreamResponse {
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
    UpstreamResponse {
        builder,
        body: ResponseBody {
            held,
            watched,
            piece,
        },
        size,
        status,
    }
}

/// What of `body` is there already (the connection's task may run twice
/// to deliver it), up to `max` bytes, and whether that is all of it.
async fn read_available(
    body: &mut Incoming,
    conn: &mut Conn,
    max: usize,
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
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                    if got.len() >= max {
                        return Ok((got.freeze(), false));
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

/// The next frame of `body`, the connection driven as needed: the body is
/// asked first (so that the connection knows it is wanted), then the
/// connection reads, then the body is asked again.
fn poll_frame_driven(
    body: &mut Incoming,
    conn: &mut Conn,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
    if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
        return Poll::Ready(frame);
    }
    if conn.drive(cx).is_ready() && body.is_end_stream() {
        return Poll::Ready(None);
    }
    Pin::new(body).poll_frame(cx)
}

/// A buffered answer: what the client has not taken yet.
struct Buffered {
    rest: Bytes,
    /// Counted in `server.response_buffer_total` (an answer of unknown
    /// length is read whole only up to a read buffer's worth, and kept
    /// even when the total is spent: no more than a streamed one holds).
    _reserved: Option<Reserved>,
}

/// A streamed answer: its upstream body and connection.
struct Paced {
    body: Incoming,
    /// Back to the pool when the body has been read to its end.
    conn: Option<Conn>,
    pool: Rc<Connections>,
    idle: IdleDeadline,
    /// What is left of the last chunk read, handed on in pieces.
    rest: Bytes,
    _streaming: Streaming,
    _flight: InFlight,
}

/// Where a response body's bytes are.
enum Held {
    Nothing,
    Buffered(Buffered),
    Paced(Paced),
    /// In the watch, which may free them (see [`Watched::hold`]).
    Watched,
}

/// The response body handed to the client's connection.
pub(crate) struct ResponseBody {
    held: Held,
    watched: Option<Rc<Watched>>,
    piece: usize,
}

impl Stream for ResponseBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let piece = this.piece;
        let Some(w) = this.watched.clone() else {
            return poll_held(&mut this.held, piece, cx);
        };
        if w.is_cut() {
            return Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took no bytes within server.send_timeout",
            ))));
        }
        let mut slot = w.release();
        let polled = match slot.as_mut() {
            None => Poll::Ready(None),
            Some(any) => {
                if let Some(b) = any.downcast_mut::<Buffered>() {
                    poll_buffered(b, piece)
                } else if let Some(p) = any.downcast_mut::<Paced>() {
                    poll_paced(p, piece, cx)
                } else {
                    Poll::Ready(None)
                }
            }
        };
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                w.asked(true);
                if let Some(s) = slot {
                    w.hold(s);
                }
            }
            Poll::Pending => {
                w.asked(false);
                if let Some(s) = slot {
                    w.hold(s);
                }
            }
            // Over: what it held is dropped here.
            _ => w.asked(false),
        }
        polled
    }
}

fn poll_held(
    held: &mut Held,
    piece: usize,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Bytes, std::io::Error>>> {
    let polled = match held {
        Held::Nothing | Held::Watched => return Poll::Ready(None),
        Held::Buffered(b) => poll_buffered(b, piece),
        Held::Paced(p) => poll_paced(p, piece, cx),
    };
    if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
        *held = Held::Nothing;
    }
    polled
}

fn poll_buffered(b: &mut Buffered, piece: usize) -> Poll<Option<Result<Bytes, std::io::Error>>> {
    if b.rest.is_empty() {
        return Poll::Ready(None);
    }
    let n = b.rest.len().min(piece);
    Poll::Ready(Some(Ok(b.rest.split_to(n))))
}

fn poll_paced(
    p: &mut Paced,
    piece: usize,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Bytes, std::io::Error>>> {
    if !p.rest.is_empty() {
        let n = p.rest.len().min(piece);
        return Poll::Ready(Some(Ok(p.rest.split_to(n))));
    }
    loop {
        let polled = match p.conn.as_mut() {
            Some(conn) => poll_frame_driven(&mut p.body, conn, cx),
            None => Pin::new(&mut p.body).poll_frame(cx),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                p.idle.progress();
                let Ok(mut data) = frame.into_data() else {
                    continue; // trailers: not passed on
                };
                if data.is_empty() {
                    continue;
                }
                if data.len() > piece {
                    p.rest = data.split_off(piece);
                }
                return Poll::Ready(Some(Ok(data)));
            }
            Poll::Ready(Some(Err(e))) => {
                return Poll::Ready(Some(Err(std::io::Error::other(e.to_string()))))
            }
            Poll::Ready(None) => {
                if let Some(conn) = p.conn.take() {
                    p.pool.put_back(conn);
                }
                return Poll::Ready(None);
            }
            Poll::Pending if p.idle.expired(cx) => {
                log::warn!(
                    "upstream body stalled for {:?}; closing the response",
                    p.idle.limit()
                );
                return Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "upstream body stalled",
                ))));
            }
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// The upstream's answer, ready to be decorated and sent to the client.
pub(crate) struct UpstreamResponse {
    pub(crate) builder: HttpResponseBuilder,
    body: ResponseBody,
    size: Option<u64>,
    status: StatusCode,
}

impl UpstreamResponse {
    /// Streams the body back: sized when the upstream gave its length.
    pub(crate) fn into_response(mut self) -> HttpResponse {
        let s = self.status;
        if s.is_informational() || s == StatusCode::NO_CONTENT || s == StatusCode::NOT_MODIFIED {
            return self.builder.finish();
        }
        match self.size {
            Some(n) => self.builder.body(SizedStream::new(n, self.body)),
            None => self.builder.streaming(self.body),
        }
    }
}
