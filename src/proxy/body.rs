//! A streamed answer's body on its way to the client: the bytes read
//! whole or still on the upstream connection, handed on in pieces; its
//! trailers kept for the settlement that waits for them; and, when a
//! settlement waits, the end of the body held back until it is done (the
//! client's next request then sees it), or, when the client goes away
//! first, the upstream's body read to its end behind it so that the real
//! cost is still known.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::Stream;
use http_body::Body;
use hyper::body::Incoming;

use super::client::{Conn, Connections};
use super::response::{Reserved, Streaming};
use super::watch::Watched;
use crate::upload::IdleDeadline;
use crate::upstreams::health::InFlight;

/// The most of an answer read after its client went away, for the
/// trailers that settle its cost: past it the reservation stands.
const DRAIN_MAX: usize = 64 * 1024 * 1024;

/// What runs once the answer's body has ended, given its trailers (none
/// when it had none or never ended).
pub(crate) type EndHook = Box<dyn FnOnce(Option<http::HeaderMap>) -> LocalBoxFuture<'static, ()>>;

/// Where an answer's trailers land when they come.
pub(super) type Trailers = Rc<RefCell<Option<http::HeaderMap>>>;

/// The next frame of `body`, the connection driven as needed: the body is
/// asked first (so that the connection knows it is wanted), then the
/// connection reads, then the body is asked again.
pub(super) fn poll_frame_driven(
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
pub(super) struct Buffered {
    pub(super) rest: Bytes,
    /// Counted in `server.response_buffer_total` (an answer of unknown
    /// length is read whole only up to a read buffer's worth, and kept
    /// even when the total is spent: no more than a streamed one holds).
    pub(super) _reserved: Option<Reserved>,
}

/// A streamed answer: its upstream body and connection.
pub(super) struct Paced {
    pub(super) body: Incoming,
    /// Back to the pool when the body has been read to its end.
    pub(super) conn: Option<Conn>,
    pub(super) pool: Rc<Connections>,
    pub(super) idle: IdleDeadline,
    /// What is left of the last chunk read, handed on in pieces.
    pub(super) rest: Bytes,
    /// Where the trailers go.
    pub(super) trailers: Trailers,
    pub(super) _streaming: Streaming,
    pub(super) _flight: InFlight,
}

/// Where a response body's bytes are.
pub(super) enum Held {
    Nothing,
    Buffered(Buffered),
    Paced(Paced),
    /// In the watch, which may free them (see [`Watched::hold`]).
    Watched,
}

/// The response body handed to the client's connection.
pub(crate) struct ResponseBody {
    pub(super) held: Held,
    pub(super) watched: Option<Rc<Watched>>,
    pub(super) piece: usize,
    /// The answer's trailers, once read.
    pub(super) trailers: Trailers,
    /// What runs when the body ends (a settlement waiting for trailers).
    pub(super) on_end: Option<EndHook>,
    /// That hook, running: the body's end waits for it.
    pub(super) ending: Option<LocalBoxFuture<'static, ()>>,
}

impl ResponseBody {
    /// The whole of a buffered answer the HTTP server may take at once
    /// (one too small to be watched, with nothing to run at its end), so
    /// that it goes out with its head in one write.
    pub(super) fn take_whole(&mut self) -> Option<Bytes> {
        if self.watched.is_some() || self.on_end.is_some() {
            return None;
        }
        match std::mem::replace(&mut self.held, Held::Nothing) {
            Held::Buffered(b) => Some(b.rest),
            other => {
                self.held = other;
                None
            }
        }
    }

    /// The next piece of the body; its end once `on_end` has run.
    fn poll_pieces(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        if let Some(f) = self.ending.as_mut() {
            return match f.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.ending = None;
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            };
        }
        let polled = self.poll_data(cx);
        if let Poll::Ready(None) = polled {
            if let Some(hook) = self.on_end.take() {
                self.ending = Some(hook(self.trailers.borrow_mut().take()));
                return self.poll_pieces(cx);
            }
        }
        polled
    }

    /// The body's own bytes.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        let this = self;
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

impl Stream for ResponseBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_pieces(cx)
    }
}

impl Drop for ResponseBody {
    /// A body dropped before its end with a hook waiting (the client went
    /// away, or the upstream broke off): what is left of the upstream's
    /// body is read behind it, up to [`DRAIN_MAX`], for its trailers, and
    /// the hook runs then.
    fn drop(&mut self) {
        if let Some(ending) = self.ending.take() {
            // Cut off while its hook ran: the hook still runs to its end.
            actix_web::rt::spawn(ending);
            return;
        }
        let Some(hook) = self.on_end.take() else {
            return;
        };
        let held = std::mem::replace(&mut self.held, Held::Nothing);
        let paced = match (held, &self.watched) {
            (Held::Paced(p), _) => Some(p),
            (Held::Watched, Some(w)) => w
                .release()
                .and_then(|any| any.downcast::<Paced>().ok())
                .map(|b| *b),
            _ => None,
        };
        let trailers = self.trailers.clone();
        let piece = self.piece;
        actix_web::rt::spawn(async move {
            if let Some(mut p) = paced {
                let mut read = 0usize;
                while let Some(Ok(data)) =
                    std::future::poll_fn(|cx| poll_paced(&mut p, piece, cx)).await
                {
                    read += data.len();
                    if read > DRAIN_MAX {
                        break;
                    }
                }
            }
            let t = trailers.borrow_mut().take();
            hook(t).await;
        });
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
                let mut data = match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        // Trailers: kept for a settlement, not passed on.
                        if let Ok(t) = frame.into_trailers() {
                            *p.trailers.borrow_mut() = Some(t);
                        }
                        continue;
                    }
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
