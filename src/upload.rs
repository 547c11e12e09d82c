//! The client's request body on its way upstream, and the faults that are
//! the client's, not the upstream's.
//!
//! A body that stalls (`server.client_body_timeout`), ends before its length
//! (the client closed or half-closed), is malformed (bad chunk framing), or
//! grows past `server.max_body_size` is the client's fault: it is answered
//! 408, 400 or 413 and never counted as an upstream error, whatever the
//! upstream made of the half-sent request.
//!
//! The body is read through a shared [`Upload`] so that a request whose
//! upstream connection turned out dead can be sent again: the first
//! [`REPLAY_LIMIT`] bytes taken from the client are kept (by reference,
//! not copied) until the upstream's answer starts, and a retry sends them
//! again before reading on. Past that limit the body is no longer
//! replayable and a failure is final. Kept apart from `proxy` because this
//! is about the client's side of the exchange.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::error::PayloadError;
use actix_web::http::StatusCode;
use actix_web::web;
use bytes::Bytes;
use futures_util::Stream;

/// Body bytes kept for a retry on a fresh upstream connection.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// A request failed because of the body the client sent (or did not send).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFault {
    /// Nothing of the body arrived for `server.client_body_timeout`.
    Timeout,
    /// The body ended before its announced length or final chunk.
    Incomplete,
    /// The body's framing (chunked encoding) is malformed.
    Malformed,
    /// The body is larger than `server.max_body_size`.
    TooLarge,
}

impl BodyFault {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            BodyFault::Timeout => StatusCode::REQUEST_TIMEOUT,
            BodyFault::Incomplete | BodyFault::Malformed => StatusCode::BAD_REQUEST,
            BodyFault::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// The `error` field of the answer and the metric's `kind` label.
    pub(crate) fn code(self) -> &'static str {
        match self {
            BodyFault::Timeout => "client_body_timeout",
            BodyFault::Incomplete => "incomplete_body",
            BodyFault::Malformed => "malformed_body",
            BodyFault::TooLarge => "body_too_large",
        }
    }

    pub(crate) fn message(self) -> &'static str {
        match self {
            BodyFault::Timeout => "the request body stopped arriving",
            BodyFault::Incomplete => "the request body ended before its announced end",
            BodyFault::Malformed => "the request body's chunked encoding is malformed",
            BodyFault::TooLarge => "the request body is larger than this gateway accepts",
        }
    }

    fn of(e: &PayloadError) -> BodyFault {
        match e {
            PayloadError::Incomplete(_) => BodyFault::Incomplete,
            PayloadError::Overflow => BodyFault::TooLarge,
            PayloadError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => BodyFault::Timeout,
            PayloadError::Io(_) => BodyFault::Incomplete,
            _ => BodyFault::Malformed,
        }
    }
}

/// Limits on request bodies (from `[server]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    /// Longest pause in a body.
    pub(crate) idle: Duration,
    /// Largest body; 0 = no limit.
    pub(crate) max_size: u64,
}

/// One request's body, shared by the attempts to forward it.
pub(crate) struct Upload {
    payload: RefCell<web::Payload>,
    /// Chunks taken from the client so far, while they fit the replay limit.
    kept: RefCell<Vec<Bytes>>,
    kept_len: Cell<usize>,
    /// False once more than [`REPLAY_LIMIT`] bytes were taken.
    replayable: Cell<bool>,
    received: Cell<u64>,
    fault: Cell<Option<BodyFault>>,
    /// Whether the current attempt has begun sending the body.
    started: Cell<bool>,
    finished: Cell<bool>,
    done: tokio::sync::Notify,
    limits: BodyLimits,
}

impl Upload {
    pub(crate) fn new(payload: web::Payload, limits: BodyLimits) -> Rc<Upload> {
        Rc::new(Upload {
            payload: RefCell::new(payload),
            kept: RefCell::new(Vec::new()),
            kept_len: Cell::new(0),
            replayable: Cell::new(true),
            received: Cell::new(0),
            fault: Cell::new(None),
            started: Cell::new(false),
            finished: Cell::new(false),
            done: tokio::sync::Notify::new(),
            limits,
        })
    }

    /// A stream of the whole body for one attempt: the kept chunks first,
    /// then the rest from the client.
    pub(crate) fn body(self: &Rc<Self>) -> UploadBody {
        self.started.set(false);
        UploadBody {
            upload: self.clone(),
            replay_next: 0,
            idle: IdleDeadline::new(self.limits.idle),
        }
    }

    /// Whether the current attempt's connection is up and asking for the
    /// body (false while it waits for a connection).
    pub(crate) fn started(&self) -> bool {
        self.started.get()
    }

    /// The client's fault, if the body failed because of it.
    pub(crate) fn fault(&self) -> Option<BodyFault> {
        self.fault.get()
    }

    /// Whether another attempt can still send the whole body.
    pub(crate) fn replayable(&self) -> bool {
        self.replayable.get() && self.fault.get().is_none()
    }

    /// Resolves once the client's body has been read in full.
    pub(crate) async fn finished(&self) {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.finished.get() {
                return;
            }
            notified.await;
        }
    }

    /// Resolves once the client's body has failed (its fault is set).
    pub(crate) async fn faulted(&self) {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.fault.get().is_some() {
                return;
            }
            notified.await;
        }
    }

    /// The answer has started: nothing will be replayed any more.
    pub(crate) fn release(&self) {
        self.replayable.set(false);
        self.kept.borrow_mut().clear();
    }

    fn take(&self, chunk: &Bytes) -> Result<(), BodyFault> {
        let total = self.received.get() + chunk.len() as u64;
        self.received.set(total);
        if self.limits.max_size > 0 && total > self.limits.max_size {
            return Err(BodyFault::TooLarge);
        }
        if self.replayable.get() {
            let kept = self.kept_len.get() + chunk.len();
            if kept <= REPLAY_LIMIT {
                self.kept.borrow_mut().push(chunk.clone());
                self.kept_len.set(kept);
            } else {
                self.release();
            }
        }
        Ok(())
    }

    fn fail(&self, fault: BodyFault) -> PayloadError {
        self.fault.set(Some(fault));
        self.done.notify_waiters();
        let e = std::io::Error::other(fault.message());
        PayloadError::Io(e)
    }
}

/// One attempt's view of the body (see [`Upload::body`]).
pub(crate) struct UploadBody {
    upload: Rc<Upload>,
    replay_next: usize,
    idle: IdleDeadline,
}

impl Stream for UploadBody {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let up = &this.upload;
        up.started.set(true);
        if let Some(fault) = up.fault.get() {
            return Poll::Ready(Some(Err(up.fail(fault))));
        }
        if let Some(chunk) = up.kept.borrow().get(this.replay_next) {
            this.replay_next += 1;
            return Poll::Ready(Some(Ok(chunk.clone())));
        }
        if up.finished.get() {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut *up.payload.borrow_mut()).poll_next(cx);
        match polled {
            Poll::Ready(Some(Ok(chunk))) => {
                this.idle.progress();
                if let Err(fault) = up.take(&chunk) {
                    return Poll::Ready(Some(Err(up.fail(fault))));
                }
                // A kept chunk is not sent twice by the same attempt.
                this.replay_next = up.kept.borrow().len();
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                let fault = BodyFault::of(&e);
                Poll::Ready(Some(Err(up.fail(fault))))
            }
            Poll::Ready(None) => {
                up.finished.set(true);
                up.done.notify_waiters();
                Poll::Ready(None)
            }
            Poll::Pending if this.idle.expired(cx) => {
                Poll::Ready(Some(Err(up.fail(BodyFault::Timeout))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Fails a body stream that makes no progress for a while: armed when the
/// inner stream is pending, cleared by every chunk.
pub(crate) struct IdleDeadline {
    idle: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl IdleDeadline {
    pub(crate) fn new(idle: Duration) -> IdleDeadline {
        IdleDeadline { idle, sleep: None }
    }

    /// How long a stall may last.
    pub(crate) fn limit(&self) -> Duration {
        self.idle
    }

    pub(crate) fn progress(&mut self) {
        self.sleep = None;
    }

    /// True once `idle` has passed since the last progress.
    pub(crate) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let idle = self.idle;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        sleep.as_mut().poll(cx).is_ready()
    }
}
