//! Requests in flight that hold concurrency slots: the guard that renews
//! their leases while they last and releases them when they end, and the
//! response body that carries the guard to the end of the response.
//!
//! A slot must outlive the handler: a download holds it until its last
//! byte is sent, or until the client goes away (actix then drops the
//! response, and with it the guard). It is separate from the front door
//! because it is tied to a response's life, not to a phase of the request.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::HttpResponse;
use bytes::Bytes;

use crate::limiter::{LeaseSet, Limiter};

/// Holds a request's concurrency slots: renews their leases every third of
/// a lease, and releases them when dropped.
pub struct SlotGuard {
    limiter: Arc<Limiter>,
    set: Option<LeaseSet>,
    renewal: Option<tokio::task::JoinHandle<()>>,
}

impl SlotGuard {
    pub fn hold(limiter: Arc<Limiter>, set: LeaseSet) -> SlotGuard {
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
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
        let Some(set) = self.set.take() else { return };
        // Outside a worker (the process is stopping) the leases end by
        // themselves.
        if actix_rt::Arbiter::try_current().is_some() {
            let limiter = self.limiter.clone();
            actix_web::rt::spawn(async move {
                limiter.leases(&set, false).await;
            });
        }
    }
}

/// A response body that holds its request's slots until it is dropped.
struct HeldBody {
    inner: BoxBody,
    _slots: SlotGuard,
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
        Pin::new(&mut self.get_mut().inner).poll_next(cx)
    }
}

/// `resp` with `slots` held until its body has been sent or dropped.
pub fn carry(resp: HttpResponse, slots: SlotGuard) -> HttpResponse {
    resp.map_body(|_, inner| HeldBody {
        inner,
        _slots: slots,
    })
    .map_into_boxed_body()
}
