//! WebSocket upgrades: the handshake forwarded, then the connection relayed
//! as bytes both ways.
//!
//! It is apart from plain forwarding because an upgraded connection is no
//! longer HTTP: once the upstream answers `101 Switching Protocols`, the
//! gateway only copies bytes until either side closes or neither sends
//! anything for `upstream.websocket_idle_timeout`. The upstream side is a
//! plain TCP connection on which the request head is written by hand (an
//! HTTP client library would insist on speaking WebSocket itself); the
//! client side is actix-web's raw payload of an upgrade request and a 101
//! response whose streamed body is written unframed. An upstream that
//! refuses the upgrade has its answer passed back as it is.
//!
//! Only HTTP/1.1 upgrades are relayed: WebSocket over HTTP/2 (RFC 8441,
//! extended CONNECT) is not offered, so HTTP/2 clients fall back to
//! HTTP/1.1 for WebSockets, as browsers do.

use std::cell::Cell;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode, Version};
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use bytes::{Bytes, BytesMut};
use futures_util::{Future, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::{
    connection_listed, copy_end_to_end, is_hop_by_hop, set_forwarded, UpstreamFailure,
    X_FORWARDED_HOST, X_FORWARDED_PROTO,
};
use crate::client_ip::X_FORWARDED_FOR;
use crate::upstreams::{Failure, Pick, Pool};

/// Largest upstream response head read.
const MAX_HEAD: usize = 16 * 1024;
/// Largest body of a refused upgrade passed back (they are short pages).
const MAX_ANSWER: usize = 1024 * 1024;
/// Bytes read from the upstream at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Whether `req` asks for a WebSocket: an HTTP/1.1 GET with
/// `Upgrade: websocket` and `Connection: upgrade`.
pub(crate) fn is_upgrade(req: &HttpRequest) -> bool {
    req.version() == Version::HTTP_11
        && req.method() == Method::GET
        && has_token(req.headers(), &header::UPGRADE, "websocket")
        && has_token(req.headers(), &header::CONNECTION, "upgrade")
}

fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The upstream's answer to an upgrade, ready for the RateLimit headers.
pub(crate) struct Relayed {
    pub(crate) builder: HttpResponseBuilder,
    body: RelayedBody,
}

enum RelayedBody {
    /// 101: the upgraded connection.
    Tunnel(Tunnel),
    /// Anything else: the upstream's refusal, whole.
    Answer(Bytes),
}

impl Relayed {
    pub(crate) fn into_response(mut self) -> HttpResponse {
        match self.body {
            RelayedBody::Tunnel(t) => self.builder.streaming(t),
            RelayedBody::Answer(b) => self.builder.body(b),
        }
    }
}

/// Forwards the upgrade request `req` to a URL of `pool` and, if it
/// switches protocols, relays the connection; `payload` is the client's
/// byte stream after the request head. A URL that refuses the connection
/// is counted towards its ejection and the next one is tried (nothing was
/// sent); once connected there is no second try.
pub(crate) async fn relay(
    req: &HttpRequest,
    payload: web::Payload,
    pool: &Pool,
    trusted_peer: bool,
    peer: IpAddr,
) -> Result<Relayed, UpstreamFailure> {
    let config = &*pool.config;
    let mut tried = 0u64;
    let (stream, base, authority) = loop {
        let i = match pool.pick(tried) {
            Pick::Url(i) => i,
            Pick::NoneHealthy(wait) => {
                return Err(UpstreamFailure::NoHealthy(super::retry_after_secs(wait)))
            }
            Pick::AllTried => return Err(UpstreamFailure::Unreachable),
        };
        if tried != 0 {
            pool.retried();
        }
        tried |= 1u64 << (i % 64);
        let target = pool.target(i);
        let (base, authority) = (target.base.as_str(), target.authority.clone());
        match tokio::time::timeout(
            config.connect_timeout,
            TcpStream::connect(authority.as_str()),
        )
        .await
        {
            Ok(Ok(s)) => {
                target.succeeded();
                break (s, base, authority);
            }
            Ok(Err(e)) => {
                log::warn!("upstream {base} unreachable for a WebSocket: {e}");
            }
            Err(_) => {
                log::warn!("upstream {base} did not accept a WebSocket connection in time");
            }
        }
        pool.failed(i, Failure::Unreachable, "connect failed");
    };
    let _ = stream.set_nodelay(true);
    let (mut read, mut write) = stream.into_split();

    let head = request_head(req, &authority, trusted_peer, peer);
    let exchange = async {
        write.write_all(&head).await?;
        read_head(&mut read).await
    };
    let (status, headers, rest) = match tokio::time::timeout(config.timeout, exchange).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            log::warn!("upstream {base} broke a WebSocket handshake: {e}");
            return Err(UpstreamFailure::Broken);
        }
        Err(_) => return Err(UpstreamFailure::Timeout),
    };

    let mut builder = HttpResponse::build(status);
    let listed = connection_listed(&headers);
    for (name, value) in headers.iter() {
        if is_hop_by_hop(name) || listed.contains(name) || name == header::CONTENT_LENGTH {
            continue;
        }
        builder.append_header((name.clone(), value.clone()));
    }

    if status != StatusCode::SWITCHING_PROTOCOLS {
        let body = match tokio::time::timeout(
            config.timeout,
            read_answer(&mut read, &headers, status, rest),
        )
        .await
        {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                log::warn!("upstream {base} refused a WebSocket with an unreadable answer: {e}");
                return Err(UpstreamFailure::Broken);
            }
            Err(_) => return Err(UpstreamFailure::Timeout),
        };
        return Ok(Relayed {
            builder,
            body: RelayedBody::Answer(body),
        });
    }

    let upgrade = headers
        .get(header::UPGRADE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("websocket"));
    builder.upgrade(upgrade);
    let last = Rc::new(Cell::new(Instant::now()));
    let idle = config.websocket_idle_timeout;
    let pump = actix_web::rt::spawn(pump(payload, write, last.clone(), idle));
    let gauge = crate::metrics::websocket_connections();
    gauge.increment(1.0);
    Ok(Relayed {
        builder,
        body: RelayedBody::Tunnel(Tunnel {
            read,
            pending: (!rest.is_empty()).then(|| rest.freeze()),
            last,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            pump,
            gauge,
        }),
    })
}

/// The upgrade request as the upstream gets it: the client's end-to-end
/// headers, the upstream's own `Host`, `X-Forwarded-*`, and the upgrade.
fn request_head(req: &HttpRequest, authority: &str, trusted_peer: bool, peer: IpAddr) -> Vec<u8> {
    let mut headers = HeaderMap::new();
    copy_end_to_end(
        req.headers(),
        &mut headers,
        &[
            &header::HOST,
            &header::CONTENT_LENGTH,
            &header::EXPECT,
            &X_FORWARDED_FOR,
            &X_FORWARDED_PROTO,
            &X_FORWARDED_HOST,
        ],
    );
    set_forwarded(req, &mut headers, trusted_peer, peer);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut head = Vec::with_capacity(1024);
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(authority.as_bytes());
    head.extend_from_slice(b"\r\nconnection: upgrade\r\nupgrade: ");
    match req.headers().get(header::UPGRADE) {
        Some(v) => head.extend_from_slice(v.as_bytes()),
        None => head.extend_from_slice(b"websocket"),
    }
    head.extend_from_slice(b"\r\n");
    for (name, value) in headers.iter() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

fn invalid(message: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.to_string())
}

/// Reads the upstream's response head; returns it and the bytes read
/// past it.
async fn read_head(read: &mut OwnedReadHalf) -> std::io::Result<(StatusCode, HeaderMap, BytesMut)> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if read.read_buf(&mut buf).await? == 0 {
            return Err(invalid("connection closed before a response head"));
        }
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut fields);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = parsed
                    .code
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| invalid("bad status code"))?;
                let mut headers = HeaderMap::new();
                for f in parsed.headers.iter() {
                    let name = HeaderName::from_bytes(f.name.as_bytes())
                        .map_err(|_| invalid("bad header name"))?;
                    let value = HeaderValue::from_bytes(f.value)
                        .map_err(|_| invalid("bad header value"))?;
                    headers.append(name, value);
                }
                let rest = buf.split_off(len);
                return Ok((status, headers, rest));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err(invalid("response head too large")),
            Err(e) => return Err(invalid(&format!("bad response head: {e}"))),
        }
    }
}

/// Reads the body of a refused upgrade, as its head frames it (length,
/// chunked, or until the upstream closes), up to [`MAX_ANSWER`] bytes.
async fn read_answer(
    read: &mut OwnedReadHalf,
    headers: &HeaderMap,
    status: StatusCode,
    mut buf: BytesMut,
) -> std::io::Result<Bytes> {
    let too_large = || invalid("answer larger than 1 MiB");
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Bytes::new());
    }
    let chunked = has_token(headers, &header::TRANSFER_ENCODING, "chunked");
    let length: Option<usize> = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    if chunked {
        let mut body = BytesMut::new();
        loop {
            match httparse::parse_chunk_size(&buf) {
                Ok(httparse::Status::Complete((used, 0))) => {
                    let _ = buf.split_to(used);
                    return Ok(body.freeze());
                }
                Ok(httparse::Status::Complete((used, size))) => {
                    let size = usize::try_from(size).map_err(|_| too_large())?;
                    if body.len() + size > MAX_ANSWER {
                        return Err(too_large());
                    }
                    while buf.len() < used + size + 2 {
                        if read.read_buf(&mut buf).await? == 0 {
                            return Err(invalid("connection closed inside a chunk"));
                        }
                    }
                    let _ = buf.split_to(used);
                    body.extend_from_slice(&buf.split_to(size));
                    let _ = buf.split_to(2);
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() > MAX_HEAD {
                        return Err(invalid("bad chunk size line"));
                    }
                    if read.read_buf(&mut buf).await? == 0 {
                        return Err(invalid("connection closed inside a chunked body"));
                    }
                }
                Err(_) => return Err(invalid("bad chunk size")),
            }
        }
    }
    match length {
        Some(n) if n > MAX_ANSWER => Err(too_large()),
        Some(n) => {
            while buf.len() < n {
                if read.read_buf(&mut buf).await? == 0 {
                    return Err(invalid("connection closed inside the body"));
                }
            }
            buf.truncate(n);
            Ok(buf.freeze())
        }
        None => {
            while read.read_buf(&mut buf).await? > 0 {
                if buf.len() > MAX_ANSWER {
                    return Err(too_large());
                }
            }
            Ok(buf.freeze())
        }
    }
}

/// Copies the client's bytes to the upstream until the client closes, the
/// connection has been idle for `idle`, or the upstream stops taking them;
/// then closes the upstream's write side.
async fn pump(
    mut payload: web::Payload,
    mut write: OwnedWriteHalf,
    last: Rc<Cell<Instant>>,
    idle: Duration,
) {
    loop {
        let deadline = tokio::time::Instant::from_std(last.get() + idle);
        match tokio::time::timeout_at(deadline, payload.next()).await {
            Ok(Some(Ok(bytes))) => {
                last.set(Instant::now());
                match tokio::time::timeout(idle, write.write_all(&bytes)).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
            Ok(Some(Err(_))) | Ok(None) => break,
            // The other direction may have kept the connection alive.
            Err(_) if last.get().elapsed() < idle => {}
            Err(_) => break,
        }
    }
    let _ = write.shutdown().await;
}

/// The upstream's side of an upgraded connection, as the 101 response's
/// body; ends when the upstream closes or the connection is idle for
/// `idle` (both directions count).
struct Tunnel {
    read: OwnedReadHalf,
    /// Bytes the upstream sent right after its 101 head.
    pending: Option<Bytes>,
    last: Rc<Cell<Instant>>,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    pump: tokio::task::JoinHandle<()>,
    gauge: metrics::Gauge,
}

impl Stream for Tunnel {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(b) = this.pending.take() {
            this.last.set(Instant::now());
            return Poll::Ready(Some(Ok(b)));
        }
        let mut chunk = [0u8; READ_CHUNK];
        let mut rb = ReadBuf::new(&mut chunk);
        match Pin::new(&mut this.read).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(None),
            Poll::Ready(Ok(())) => {
                this.last.set(Instant::now());
                return Poll::Ready(Some(Ok(Bytes::copy_from_slice(rb.filled()))));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
            Poll::Pending => {}
        }
        // Nothing from the upstream: wait until the connection has been
        // idle (in both directions) for `idle`.
        loop {
            let deadline = tokio::time::Instant::from_std(this.last.get() + this.idle);
            if this.sleep.deadline() != deadline {
                this.sleep.as_mut().reset(deadline);
            }
            match this.sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if this.last.get().elapsed() >= this.idle => {
                    log::debug!(
                        "closing a WebSocket idle for {}",
                        humantime::format_duration(this.idle)
                    );
                    return Poll::Ready(None);
                }
                Poll::Ready(()) => {}
            }
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.pump.abort();
        self.gauge.decrement(1.0);
    }
}
