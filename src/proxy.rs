//! Forwarding allowed requests to the upstream, streaming both ways.
//!
//! One [`Upstream`] per worker thread and upstream pool, each with its own
//! keep-alive connections ([`client`]: hyper's HTTP/1.1 client with a pool
//! of ours). Which URL of the pool takes a try, and whether it may, is
//! asked of [`crate::upstreams`]; `forward` decides whether a failed try
//! may be repeated (see there) and reports each outcome back for passive
//! ejection.
//!
//! The request body is never collected: it is handed to the upstream as a
//! stream (sized when the client gave a length). The answer comes back
//! read whole when it is small, or streamed at the client's pace
//! ([`response`] says which, and what protects whom).
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

mod body;
mod client;
mod response;
mod watch;
pub(crate) mod websocket;

pub(crate) use response::{set_buffer_total, AnswerLimits, UpstreamResponse};

use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};

use crate::client_ip::{ClientKey, X_FORWARDED_FOR};
use crate::config::UpstreamConfig;
use crate::upload::{BodyFault, BodyLimits, Upload};
use crate::upstreams::{Failure, Pick, Pool};

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
pub(crate) enum UpstreamFailure {
    /// No connection could be made: refused, unreachable, or none within
    /// `connect_timeout`.
    Unreachable,
    /// No response head within `timeout`.
    Timeout,
    /// The upstream broke the exchange (bad response, connection lost
    /// mid-request: after the one retry a dead pooled connection gets when
    /// the request is safe to repeat, at once when it is not).
    Broken,
    /// No URL of the pool takes traffic (probes or ejection hold them all
    /// out); the first may again in about this many seconds.
    NoHealthy(u64),
}

impl UpstreamFailure {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            UpstreamFailure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamFailure::NoHealthy(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    pub(crate) fn code(self) -> &'static str {
        match self {
            UpstreamFailure::Unreachable => "upstream_unreachable",
            UpstreamFailure::Timeout => "upstream_timeout",
            UpstreamFailure::Broken => "bad_gateway",
            UpstreamFailure::NoHealthy(_) => "no_healthy_upstream",
        }
    }

    /// The client's answer for this failure.
    pub(crate) fn answer(self) -> HttpResponse {
        match self {
            UpstreamFailure::NoHealthy(secs) => crate::responses::no_healthy_upstream(secs),
            f => crate::responses::upstream_failure(f.status(), f.code()),
        }
    }
}

/// Why a request was not forwarded: the upstream's fault or the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForwardError {
    Upstream(UpstreamFailure),
    Client(BodyFault),
    /// The client address already streams `upstream.max_streaming_per_client`
    /// large answers (see `response`): 503 with Retry-After.
    TooManyStreams,
}

/// Whole seconds of `d`, rounded up, at least 1 (for Retry-After).
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    (d.as_millis().div_ceil(1000) as u64).max(1)
}

/// Whether sending `req` twice has the effect of sending it once: an
/// idempotent method, or a client that said so with an `Idempotency-Key`
/// (the upstream then deduplicates). A POST or PATCH without one may take a
/// payment twice, so it is never repeated once it may have been written.
fn safe_to_repeat(req: &HttpRequest) -> bool {
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    ) || req.headers().contains_key(IDEMPOTENCY_KEY)
}

/// The header a client sets to make a non-idempotent request safe to repeat.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// How a failed try came about, for what to do next.
enum SendFailure {
    /// No connection was made (a connect() failed or timed out).
    Connect,
    /// A pooled connection failed before any response byte: typically one
    /// the upstream had closed while idle. The request may have been
    /// written and processed all the same, so only a request that is safe
    /// to repeat may try again on a fresh connection.
    DeadConnection,
    Timeout,
    Other,
}

fn classify(e: &hyper::Error, reused: bool) -> SendFailure {
    if e.is_timeout() {
        SendFailure::Timeout
    } else if reused && !e.is_parse() && !e.is_user() {
        SendFailure::DeadConnection
    } else {
        SendFailure::Other
    }
}

/// One worker's connections to the URLs of one pool.
pub(crate) struct Upstream {
    conns: Rc<client::Connections>,
    timeout: Duration,
    body_limits: BodyLimits,
    answers: AnswerLimits,
    fresh_retries: metrics::Counter,
}

impl Upstream {
    pub(crate) fn new(
        config: &UpstreamConfig,
        body_limits: BodyLimits,
        answers: AnswerLimits,
    ) -> Upstream {
        Upstream {
            conns: Rc::new(client::Connections::new(
                config.max_connections,
                config.connect_timeout,
                config.idle_timeout,
            )),
            timeout: config.timeout,
            body_limits,
            answers,
            fresh_retries: metrics::counter!(crate::metrics::UPSTREAM_FRESH_RETRIES),
        }
    }

    /// Forwards `req` with its body to a URL of `pool` (trying others when
    /// that is safe, see below); `peer` is who asked, `trusted_peer`
    /// whether it is a trusted proxy (its X-Forwarded-* are kept), and
    /// `client` the address rules see (it bounds the answers it streams).
    pub(crate) async fn forward(
        &self,
        pool: &Pool,
        req: &HttpRequest,
        payload: web::Payload,
        trusted_peer: bool,
        peer: IpAddr,
        client: ClientKey,
    ) -> Result<UpstreamResponse, ForwardError> {
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
        let max = self.body_limits.max_size;
        if max > 0 && !chunked && length.is_some_and(|l| l > max) {
            return Err(ForwardError::Client(BodyFault::TooLarge));
        }
        let upload = Upload::new(payload, self.body_limits);
        let method = http::Method::from_bytes(req.method().as_str().as_bytes())
            .map_err(|_| ForwardError::Client(BodyFault::Malformed))?;
        let head = req.method() == Method::HEAD;
        // The request's head as the upstream gets it, less `Host`.
        let mut out = HeaderMap::new();
        copy_end_to_end(
            headers,
            &mut out,
            &[
                &header::HOST,
                &header::CONTENT_LENGTH,
                &header::EXPECT,
                &X_FORWARDED_FOR,
                &X_FORWARDED_PROTO,
                &X_FORWARDED_HOST,
            ],
        );
        set_forwarded(req, &mut out, trusted_peer, peer);
        if req.version() == actix_web::http::Version::HTTP_2 {
            join_cookies(&mut out);
        }
        let mut out = to_http_headers(&out);
        match length {
            Some(len) if !chunked && len > 0 => {
                out.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
            }
            _ if has_body => {
                out.insert(
                    http::header::TRANSFER_ENCODING,
                    http::HeaderValue::from_static("chunked"),
                );
            }
            _ => {}
        }

        // A connect failure moves on to another URL, whatever the method:
        // the upstream cannot have seen the request. A dead pooled
        // connection is retried once on a fresh one, but only for a request
        // that is safe to repeat: the upstream may have processed it before
        // the connection died. Any other failure (a broken exchange, no
        // answer in time) moves a request that is safe to repeat to another
        // URL, at most `retries` times. All of it only while the whole body
        // can still be sent again and the request's `timeout` has time left.
        let repeatable = safe_to_repeat(req);
        let deadline = Instant::now() + self.timeout;
        let mut retries_left = pool.config.retries;
        let mut tried: u64 = 0;
        let mut fresh_retry = false;
        let mut i = match pool.pick(0) {
            Pick::Url(i) => i,
            Pick::NoneHealthy(wait) => {
                return Err(ForwardError::Upstream(UpstreamFailure::NoHealthy(
                    retry_after_secs(wait),
                )))
            }
            Pick::AllTried => return Err(ForwardError::Upstream(UpstreamFailure::NoHealthy(1))),
        };
        let mut first = true;
        loop {
            let target = pool.target(i);
            let flight = target.begin();
            let mut headers = out.clone();
            if let Ok(host) = http::HeaderValue::from_str(target.host()) {
                headers.insert(http::header::HOST, host);
            }
            let body = if has_body {
                client::OutBody::Upload(upload.body())
            } else {
                client::OutBody::Empty
            };
            let mut creq = http::Request::new(body);
            *creq.method_mut() = method.clone();
            *creq.uri_mut() =
                http::Uri::try_from(path).unwrap_or_else(|_| http::Uri::from_static("/"));
            *creq.headers_mut() = headers;
            // `upstream.timeout` bounds the wait for the response head,
            // waiting for a pooled connection (or a connect) included. With
            // a body, that wait starts when the upload ends: a large upload
            // may take as long as it keeps moving (a stalled client is cut
            // after `server.client_body_timeout` without a byte). A further
            // try has what is left of the first one's time.
            let limit = if first {
                self.timeout
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            first = false;
            let conn_by = Instant::now() + limit;
            let exchange = async {
                let mut conn = self
                    .conns
                    .checkout(&target.authority, fresh_retry, conn_by)
                    .await
                    .map_err(|e| match e {
                        client::ConnectError::Failed(why) => (SendFailure::Connect, why),
                        client::ConnectError::Timeout => (
                            SendFailure::Timeout,
                            "no upstream connection free in time".to_string(),
                        ),
                    })?;
                let reused = conn.reused;
                match conn.send(creq).await {
                    Ok(resp) => Ok((conn, resp)),
                    Err(e) => Err((classify(&e, reused), e.to_string())),
                }
            };
            let sent = if has_body {
                let head_deadline = async {
                    let waiting = async {
                        tokio::time::sleep(limit).await;
                        if upload.started() {
                            std::future::pending::<()>().await;
                        }
                    };
                    let uploaded = async {
                        upload.finished().await;
                        tokio::time::sleep(limit).await;
                    };
                    tokio::pin!(waiting, uploaded);
                    futures_util::future::select(waiting, uploaded).await;
                };
                // The client's body failing ends the exchange at once,
                // whatever the upstream makes of the half-sent request.
                let head_deadline = async {
                    let faulted = upload.faulted();
                    tokio::pin!(faulted, head_deadline);
                    futures_util::future::select(faulted, head_deadline).await;
                };
                tokio::pin!(head_deadline, exchange);
                match futures_util::future::select(exchange, head_deadline).await {
                    futures_util::future::Either::Left((r, _)) => r,
                    futures_util::future::Either::Right(_) => {
                        Err((SendFailure::Timeout, "no answer in time".to_string()))
                    }
                }
            } else {
                match tokio::time::timeout(limit, exchange).await {
                    Ok(r) => r,
                    Err(_) => Err((SendFailure::Timeout, "no answer in time".to_string())),
                }
            };
            let (kind, e) = match sent {
                Ok((conn, resp)) => {
                    upload.release();
                    // 502, 503 and 504 say the URL is in trouble; any other
                    // answer (a 500 included: it may be this request's fault)
                    // says it is alive.
                    match resp.status().as_u16() {
                        502..=504 => pool.failed(i, Failure::Answer, "a 502, 503 or 504 answer"),
                        _ => target.succeeded(),
                    }
                    let built = response::build(
                        resp,
                        conn,
                        &self.conns,
                        head,
                        client,
                        self.answers,
                        flight,
                    )
                    .await;
                    return match built {
                        Ok(r) => Ok(r),
                        Err(response::AnswerError::TooManyStreams) => {
                            Err(ForwardError::TooManyStreams)
                        }
                        Err(response::AnswerError::Broken(why)) => {
                            log::warn!("upstream {} failed: {why}", target.base);
                            Err(ForwardError::Upstream(UpstreamFailure::Broken))
                        }
                    };
                }
                Err(failure) => failure,
            };
            drop(flight);
            if let Some(fault) = upload.fault() {
                return Err(ForwardError::Client(fault));
            }
            let may_go_on = upload.replayable() && deadline > Instant::now();
            let failure = match kind {
                SendFailure::Connect => {
                    log::warn!("upstream {} unreachable: {e}", target.base);
                    pool.failed(i, Failure::Unreachable, "connect failed");
                    UpstreamFailure::Unreachable
                }
                SendFailure::DeadConnection
                    if !fresh_retry && repeatable && upload.replayable() =>
                {
                    log::debug!(
                        "connection to {} lost before an answer ({e}); retrying on a fresh one",
                        target.base
                    );
                    self.fresh_retries.increment(1);
                    fresh_retry = true;
                    continue;
                }
                SendFailure::Timeout => {
                    pool.failed(i, Failure::Answer, "no answer within upstream.timeout");
                    UpstreamFailure::Timeout
                }
                SendFailure::DeadConnection | SendFailure::Other => {
                    log::warn!("upstream {} failed: {e}", target.base);
                    UpstreamFailure::Broken
                }
            };
            // Nothing was sent after a connect failure; anything else may
            // have reached the upstream.
            let nothing_sent = failure == UpstreamFailure::Unreachable;
            if may_go_on && (nothing_sent || (repeatable && retries_left > 0)) {
                tried |= 1u64 << (i % 64);
                if let Pick::Url(next) = pool.pick(tried) {
                    if !nothing_sent {
                        retries_left -= 1;
                    }
                    pool.retried();
                    i = next;
                    fresh_retry = false;
                    continue;
                }
            }
            return Err(ForwardError::Upstream(failure));
        }
    }
}

/// The same headers as the HTTP client's types.
fn to_http_headers(from: &HeaderMap) -> http::HeaderMap {
    let mut out = http::HeaderMap::with_capacity(from.len() + 2);
    for (name, value) in from.iter() {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_str().as_bytes()),
            http::HeaderValue::from_bytes(value.as_bytes()),
        ) {
            out.append(n, v);
        }
    }
    out
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
