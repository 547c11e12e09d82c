//! Forwarding allowed requests to the upstream, streaming both ways.
//!
//! One [`Upstream`] per worker thread (awc clients are not `Send`), each with
//! its own keep-alive pool. Bodies are never collected: the request body is
//! handed to the upstream as a stream (sized when the client gave a length),
//! and the upstream's body flows back the same way, so memory per request
//! stays at a few buffers whatever the size.
//!
//! Header handling follows RFC 9110 §7.6.1: hop-by-hop headers and every
//! header named in `Connection` are dropped in both directions;
//! `X-Forwarded-For/Proto/Host` are set, trusting the client's own values
//! only when the peer is a trusted proxy.
//!
//! An HTTP/2 request is forwarded as HTTP/1.1: its `:authority` becomes
//! `X-Forwarded-Host` (the upstream gets its own `Host`), split `cookie`
//! fields are joined again (RFC 9113 §8.2.3), and a body without a length
//! goes upstream chunked. WebSocket upgrades are relayed by [`websocket`].

pub mod websocket;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::SizedStream;
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use awc::error::{ConnectError, SendRequestError};
use bytes::Bytes;
use futures_util::Stream;

use crate::client_ip::X_FORWARDED_FOR;
use crate::config::UpstreamConfig;

static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 §7.6.1), plus `Expect` (the front door has
/// already answered it) and `Host` (the upstream gets its own).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == KEEP_ALIVE
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == PROXY_CONNECTION
        || name.as_str().starts_with("proxy-")
}

/// Headers the `Connection` header names are hop-by-hop too.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

/// Copies end-to-end headers from `from` to `to`, skipping `extra` too.
fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap, extra: &[&HeaderName]) {
    let listed = connection_listed(from);
    for (name, value) in from.iter() {
        if is_hop_by_hop(name) || listed.contains(name) || extra.contains(&name) {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

/// The outcome of forwarding that is not the upstream's own response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Refused, unreachable, or no connection within `connect_timeout`.
    Unreachable,
    /// No response head within `timeout`.
    Timeout,
    /// The upstream broke the exchange (bad response, reset mid-request).
    Broken,
}

impl UpstreamFailure {
    pub fn status(self) -> StatusCode {
        match self {
            UpstreamFailure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            UpstreamFailure::Unreachable => "upstream_unreachable",
            UpstreamFailure::Timeout => "upstream_timeout",
            UpstreamFailure::Broken => "bad_gateway",
        }
    }
}

/// One worker's connection to the upstreams.
pub struct Upstream {
    client: awc::Client,
    bases: Vec<String>,
    next: AtomicUsize,
    idle_timeout: Duration,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Upstream {
        let connector = awc::Connector::new()
            .timeout(config.connect_timeout)
            .limit(config.max_connections)
            .conn_keep_alive(Duration::from_secs(30));
        let client = awc::Client::builder()
            .connector(connector)
            .timeout(config.timeout)
            .disable_redirects()
            .no_default_headers()
            .finish();
        Upstream {
            client,
            bases: config
                .urls
                .iter()
                .map(|u| u.trim_end_matches('/').to_string())
                .collect(),
            next: AtomicUsize::new(0),
            idle_timeout: config.timeout,
        }
    }

    /// The next upstream base URL in turn (`http://host:port`).
    fn next_base(&self) -> &str {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.bases.len();
        &self.bases[i]
    }

    /// Forwards `req` with its body; `client_ip` is who asked, `trusted`
    /// whether the peer is a trusted proxy (its X-Forwarded-* are kept).
    pub async fn forward(
        &self,
        req: &HttpRequest,
        payload: web::Payload,
        trusted_peer: bool,
        peer: IpAddr,
    ) -> Result<UpstreamResponse, UpstreamFailure> {
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let headers = req.headers();
        let length: Option<u64> = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        // HTTP/2 frames a body without Content-Length or Transfer-Encoding:
        // a request that may carry one is streamed upstream chunked.
        let h2_body = req.version() == actix_web::http::Version::HTTP_2
            && length.is_none()
            && !matches!(
                *req.method(),
                Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE | Method::TRACE
            );
        let chunked = headers.get(header::TRANSFER_ENCODING).is_some() || h2_body;
        let has_body = chunked || length.is_some_and(|l| l > 0);

        // Only a bodiless request can be tried on the next upstream: a body
        // stream cannot be replayed.
        let attempts = if has_body { 1 } else { self.bases.len() };
        let mut payload = Some(payload);
        let mut last = UpstreamFailure::Unreachable;
        for _ in 0..attempts {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.bases.len();
            let mut creq = self
                .client
                .request(req.method().clone(), format!("{}{}", self.bases[i], path))
                .no_decompress();
            let out = creq.headers_mut();
            copy_end_to_end(
                headers,
                out,
                &[
                    &header::HOST,
                    &header::CONTENT_LENGTH,
                    &header::EXPECT,
                    &X_FORWARDED_FOR,
                    &X_FORWARDED_PROTO,
                    &X_FORWARDED_HOST,
                ],
            );
            set_forwarded(req, out, trusted_peer, peer);
            if req.version() == actix_web::http::Version::HTTP_2 {
                join_cookies(out);
            }
            // `upstream.timeout` bounds the wait for the response head. With
            // a body, that wait starts when the upload ends: a large upload
            // may take as long as it keeps moving (a stalled client is cut
            // after `upstream.timeout` without a byte).
            let sent = match (length, chunked, payload.take()) {
                (length, chunked, Some(p)) if chunked || length.is_some_and(|l| l > 0) => {
                    let done = std::rc::Rc::new(tokio::sync::Notify::new());
                    let body = UploadBody {
                        inner: p,
                        idle: IdleDeadline::new(self.idle_timeout),
                        done: done.clone(),
                    };
                    let creq = creq.timeout(UNBOUNDED_UPLOAD);
                    let send = match length {
                        Some(len) if !chunked => creq.send_body(SizedStream::new(len, body)),
                        _ => creq.send_stream(body),
                    };
                    let head_deadline = async {
                        done.notified().await;
                        tokio::time::sleep(self.idle_timeout).await;
                    };
                    tokio::pin!(head_deadline);
                    match futures_util::future::select(send, head_deadline).await {
                        futures_util::future::Either::Left((r, _)) => r,
                        futures_util::future::Either::Right(_) => Err(SendRequestError::Timeout),
                    }
                }
                _ => creq.send().await,
            };
            match sent {
                Ok(resp) => {
                    let mut builder = HttpResponse::build(resp.status());
                    let listed = connection_listed(resp.headers());
                    for (name, value) in resp.headers().iter() {
                        if is_hop_by_hop(name)
                            || listed.contains(name)
                            || name == header::CONTENT_LENGTH
                        {
                            continue;
                        }
                        builder.append_header((name.clone(), value.clone()));
                    }
                    let size: Option<u64> = resp
                        .headers()
                        .get(header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok());
                    let status = resp.status();
                    let body = ResponseBody {
                        inner: Box::pin(resp),
                        idle: IdleDeadline::new(self.idle_timeout),
                        size,
                    };
                    return Ok(UpstreamResponse {
                        builder,
                        body,
                        status,
                    });
                }
                Err(SendRequestError::Timeout) => return Err(UpstreamFailure::Timeout),
                Err(SendRequestError::Connect(ConnectError::Timeout))
                | Err(SendRequestError::Connect(_)) => {
                    last = UpstreamFailure::Unreachable;
                    log::warn!("upstream {} unreachable", self.bases[i]);
                }
                Err(e) => {
                    log::warn!("upstream {} failed: {e}", self.bases[i]);
                    return Err(UpstreamFailure::Broken);
                }
            }
        }
        Err(last)
    }
}

/// HTTP/2 may split `cookie` into several fields; an HTTP/1.1 upstream
/// expects one, joined with `; `.
fn join_cookies(out: &mut HeaderMap) {
    if out.get_all(header::COOKIE).count() < 2 {
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for v in out.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        out.insert(header::COOKIE, v);
    }
}

/// Sets `X-Forwarded-For/Proto/Host` on `out` for the request `req`.
fn set_forwarded(req: &HttpRequest, out: &mut HeaderMap, trusted_peer: bool, peer: IpAddr) {
    let incoming = req.headers();
    // Raw bytes: a trusted chain is passed on as it came, even where a
    // client wrote bytes that are not text on its left.
    let mut xff: Vec<u8> = Vec::new();
    if trusted_peer {
        for v in incoming.get_all(&X_FORWARDED_FOR) {
            xff.extend_from_slice(v.as_bytes());
            xff.extend_from_slice(b", ");
        }
    }
    xff.extend_from_slice(peer.to_string().as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&xff) {
        out.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !trusted_peer {
        // Other headers naming the client are only believable from a
        // trusted proxy.
        out.remove(header::FORWARDED);
        out.remove(&X_REAL_IP);
    }
    let keep = |name: &HeaderName| {
        if trusted_peer {
            incoming.get(name).cloned()
        } else {
            None
        }
    };
    let scheme = if req.app_config().secure() {
        "https"
    } else {
        "http"
    };
    out.insert(
        X_FORWARDED_PROTO.clone(),
        keep(&X_FORWARDED_PROTO).unwrap_or_else(|| HeaderValue::from_static(scheme)),
    );
    // HTTP/2 names the host in `:authority`, which actix keeps in the URI.
    let host = keep(&X_FORWARDED_HOST)
        .or_else(|| incoming.get(header::HOST).cloned())
        .or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
    if let Some(host) = host {
        out.insert(X_FORWARDED_HOST.clone(), host);
    }
}

/// A per-request bound for uploads that effectively turns awc's own one
/// off; [`UploadBody`] and the head deadline bound them instead.
const UNBOUNDED_UPLOAD: Duration = Duration::from_secs(365 * 24 * 3600);

/// The client's request body on its way upstream: fails when the client
/// sends nothing for `idle`, and signals `done` when it has all been read.
struct UploadBody {
    inner: web::Payload,
    idle: IdleDeadline,
    done: std::rc::Rc<tokio::sync::Notify>,
}

/// Fails a body stream that makes no progress for a while: armed when the
/// inner stream is pending, cleared by every chunk.
struct IdleDeadline {
    idle: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl IdleDeadline {
    fn new(idle: Duration) -> IdleDeadline {
        IdleDeadline { idle, sleep: None }
    }

    fn progress(&mut self) {
        self.sleep = None;
    }

    /// True once `idle` has passed since the last progress.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let idle = self.idle;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        sleep.as_mut().poll(cx).is_ready()
    }
}

impl Stream for UploadBody {
    type Item = Result<Bytes, actix_web::error::PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(item)) => {
                this.idle.progress();
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => {
                this.done.notify_one();
                Poll::Ready(None)
            }
            Poll::Pending if this.idle.expired(cx) => {
                let e = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client stopped sending the request body",
                );
                Poll::Ready(Some(Err(actix_web::error::PayloadError::Io(e))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

type BoxedBody = Pin<Box<dyn Stream<Item = Result<Bytes, awc::error::PayloadError>>>>;

/// The upstream's response body, streamed, aborted if the upstream sends
/// nothing for `upstream.timeout` (a stalled upstream never pins a
/// connection forever; a slow large download still completes).
pub struct ResponseBody {
    inner: BoxedBody,
    idle: IdleDeadline,
    /// The upstream's Content-Length, kept so the client gets it too.
    size: Option<u64>,
}

impl Stream for ResponseBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(b))) => {
                this.idle.progress();
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(Some(Err(e))) => {
                Poll::Ready(Some(Err(std::io::Error::other(e.to_string()))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending if this.idle.expired(cx) => {
                log::warn!(
                    "upstream body stalled for {:?}; closing the response",
                    this.idle.idle
                );
                Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "upstream body stalled",
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The upstream's answer, ready to be decorated and sent to the client.
pub struct UpstreamResponse {
    pub builder: HttpResponseBuilder,
    body: ResponseBody,
    status: StatusCode,
}

impl UpstreamResponse {
    /// Streams the body back: sized when the upstream gave its length.
    pub fn into_response(mut self) -> HttpResponse {
        let s = self.status;
        if s.is_informational() || s == StatusCode::NO_CONTENT || s == StatusCode::NOT_MODIFIED {
            return self.builder.finish();
        }
        match self.body.size {
            Some(n) => self.builder.body(SizedStream::new(n, self.body)),
            None => self.builder.streaming(self.body),
        }
    }
}
