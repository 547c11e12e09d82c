//! The upstream's response on its way back: its end-to-end headers, and its
//! body streamed in pieces no larger than `server.response_buffer`, cut off
//! if it stalls, and carrying the count of requests in flight to its URL
//! until it ends (for least-outstanding picking).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::SizedStream;
use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, HttpResponseBuilder};
use bytes::Bytes;
use futures_util::Stream;

use super::{connection_listed, is_hop_by_hop};
use crate::upload::IdleDeadline;
use crate::upstreams::health::InFlight;

/// The upstream's answer with its end-to-end headers and its body, streamed
/// with `idle` as the stall limit and handed on in pieces of at most
/// `piece` bytes; `flight` counts the request to its URL until the body
/// ends.
pub(super) fn build<S>(
    resp: awc::ClientResponse<S>,
    idle: Duration,
    piece: usize,
    flight: InFlight,
) -> UpstreamResponse
where
    S: Stream<Item = Result<Bytes, awc::error::PayloadError>> + Unpin + 'static,
{
    let mut builder = HttpResponse::build(resp.status());
    let listed = connection_listed(resp.headers());
    for (name, value) in resp.headers().iter() {
        if is_hop_by_hop(name) || listed.contains(name) || name == header::CONTENT_LENGTH {
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
        idle: IdleDeadline::new(idle),
        size,
        rest: Bytes::new(),
        piece,
        _flight: flight,
    };
    UpstreamResponse {
        builder,
        body,
        status,
    }
}

type BoxedBody = Pin<Box<dyn Stream<Item = Result<Bytes, awc::error::PayloadError>>>>;

/// The upstream's response body, streamed, aborted if the upstream sends
/// nothing for `upstream.timeout` (a stalled upstream never pins a
/// connection forever; a slow large download still completes).
pub(crate) struct ResponseBody {
    inner: BoxedBody,
    idle: IdleDeadline,
    /// The upstream's Content-Length, kept so the client gets it too.
    size: Option<u64>,
    /// What is left of the last chunk read: handed on in pieces of at most
    /// `piece` bytes, so the connection's write buffer never holds more than
    /// about twice `server.response_buffer`.
    rest: Bytes,
    piece: usize,
    /// Counts the request as in flight to its URL until the body ends.
    _flight: InFlight,
}

impl Stream for ResponseBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if !this.rest.is_empty() {
            let n = this.rest.len().min(this.piece);
            return Poll::Ready(Some(Ok(this.rest.split_to(n))));
        }
        match this.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(mut b))) => {
                this.idle.progress();
                if b.len() > this.piece {
                    this.rest = b.split_off(this.piece);
                }
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(Some(Err(e))) => {
                Poll::Ready(Some(Err(std::io::Error::other(e.to_string()))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending if this.idle.expired(cx) => {
                log::warn!(
                    "upstream body stalled for {:?}; closing the response",
                    this.idle.limit()
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
pub(crate) struct UpstreamResponse {
    pub(crate) builder: HttpResponseBuilder,
    body: ResponseBody,
    status: StatusCode,
}

impl UpstreamResponse {
    /// Streams the body back: sized when the upstream gave its length.
    pub(crate) fn into_response(mut self) -> HttpResponse {
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
