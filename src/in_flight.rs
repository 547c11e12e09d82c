//! Requests in flight that hold concurrency slots: the guard that renews
//! their leases while they last and releases them when they end, and the
//! response body that carries the guard to the end of the response.
//!
//! A slot must outlive the handler: a download holds it until its last
//! byte is sent, or until the client goes away (actix then drops the
//! response, and with it the guard). It is separate from the front door
//! because it is tied to a response's life, not to a phase of the request.
//!
//! A slot is free before the client can know its response ended: the body
//! holds back its end (the chunk that completes a known length, or the end
//! of a stream) until the release has reached the store. Otherwise a client
//! that sends its next request as soon as the last one ends could find its
//! own slot still taken and be refused for being in flight twice.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::HttpResponse;
use bytes::Bytes;

use crate::limiter::{LeaseSet, Limiter};

/// Holds a request's concurrency slots: renews their leases every third of
/// a lease, and releases them when dropped.
pub(crate) struct SlotGuard {
    limiter: Arc<Limiter>,
    set: Option<LeaseSet>,
    renewal: Option<tokio::task::JoinHandle<()>>,
}

impl SlotGuard {
    pub(crate) fn hold(limiter: Arc<Limiter>, set: LeaseSet) -> SlotGuard {
        let every = set.renew_every();
        let renewal = actix_rt::Arbiter::try_current().map(|_| {
            let (limiter, set) = (limiter.clone(), set.clone());
            actix_web::rt::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    limiter.leases(&set, true).await;
                }
            })
        });
        SlotGuard {
            limiter,
            set: Some(set),
            renewal,
        }
    }

    /// Stops renewing and gives back the slots; resolves once the store
    /// has them back, or the release failed (counted), or it took longer
    /// than [`Limiter::release_wait`] (it goes on in the background).
    pub(crate) fn release(mut self) -> Releasing {
        let wait = self.limiter.release_wait();
        let release = self.let_go();
        Box::pin(async move {
            if let Some(release) = release {
                let _ = tokio::time::timeout(wait, release).await;
            }
        })
    }

    /// Stops renewing and starts the release, if the slots are still held
    /// and there is a worker to run it (outside one, the process is
    /// stopping and the leases end by themselves).
    fn let_go(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
        let set = self.set.take()?;
        actix_rt::Arbiter::try_current()?;
        let limiter = self.limiter.clone();
        Some(actix_web::rt::spawn(async move {
            limiter.leases(&set, false).await;
        }))
    }
}

/// A release under way.
pub(crate) type Releasing = Pin<Box<dyn Future<Output = ()>>>;

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.let_go();
    }
}

/// A response body that holds its request's slots until its end, and
/// holds its end back until the slots are released.
struct HeldBody {
    inner: BoxBody,
    slots: Option<SlotGuard>,
    /// Bytes still to come, when the length is known: the chunk that
    /// completes it is the end the client sees.
    left: Option<u64>,
    releasing: Option<Releasing>,
    /// The chunk held back while the release is under way.
    last: Option<Bytes>,
}

impl HeldBody {
    fn start_release(&mut self) {
        if let Some(slots) = self.slots.take() {
            self.releasing = Some(slots.release());
        }
    }
}

impl MessageBody for HeldBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(releasing) = this.releasing.as_mut() {
                if releasing.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.releasing = None;
                // The held-back last chunk, or the end of a stream.
                return Poll::Ready(this.last.take().map(Ok));
            }
            let next = match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(next) => next,
                Poll::Pending => return Poll::Pending,
            };
            if this.slots.is_none() {
                return Poll::Ready(next);
            }
            match next {
                Some(Ok(chunk)) => {
                    if let Some(left) = this.left.as_mut() {
                        *left = left.saturating_sub(chunk.len() as u64);
                        if *left == 0 {
                            this.last = Some(chunk);
                            this.start_release();
                            continue;
                        }
                    }
                    return Poll::Ready(Some(Ok(chunk)));
                }
                None => {
                    this.start_release();
                    continue;
                }
                // The guard goes with the body when actix drops it.
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            }
        }
    }
}

/// `resp` with `slots` held until its body has been sent (the end of it
/// waiting for their release) or dropped. A response without a body, or
/// the answer to a `head` request (whose body is never sent, so nothing
/// would end it), gives them back before it is answered.
pub(crate) async fn carry(resp: HttpResponse, slots: SlotGuard, head: bool) -> HttpResponse {
    let left = match resp.body().size() {
        BodySize::Sized(n) if n > 0 && !head => Some(n),
        BodySize::Stream if !head => None,
        _ => {
            slots.release().await;
            return resp;
        }
    };
    resp.map_body(|_, inner| HeldBody {
        inner,
        slots: Some(slots),
        left,
        releasing: None,
        last: None,
    })
    .map_into_boxed_body()
}
