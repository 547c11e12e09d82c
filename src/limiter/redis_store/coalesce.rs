//! Coalescing: the decisions that arrive together on one worker go to Redis
//! as one script call.
//!
//! Each worker keeps at most [`MAX_IN_FLIGHT`] decision calls in flight. A
//! decision that finds a free slot goes out at once, alone, through
//! `decide.lua`: at light load nothing ever waits, and a request costs
//! exactly one call as before. A decision that finds every slot busy waits
//! in the worker's queue; when a call comes back, everything queued leaves
//! together as one `decide_batch.lua` call (each subject decided by the same
//! `decide.lua` code, on one reading of Redis' clock). Batches therefore
//! grow with the load by themselves, with no timer and no added latency
//! beyond the wait for a busy slot, and Redis and the gateway pay the
//! per-call cost (parsing, script lookup, the round trip, the future that
//! waits for it) once per batch.
//!
//! The queue is per worker thread: actix workers are single-threaded
//! runtimes, so it needs no lock and a batch never hops threads, like the
//! per-thread Redis connections it is sent on.
//!
//! Standalone Redis only: on a Cluster the subjects of one batch would live
//! in different slots, which one script call cannot touch.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use redis::Value;
use tokio::sync::oneshot;

use super::decide::{self, DecideCall};
use crate::redis_link::{RedisFailure, RedisLink};

/// Decision calls one worker keeps in flight before it starts to batch.
/// Two: a second request at light load never waits for the first.
const MAX_IN_FLIGHT: usize = 2;
/// Subjects in one batch at most (bounds one script run inside Redis).
const MAX_BATCH: usize = 128;

struct Waiting {
    call: DecideCall,
    reply: oneshot::Sender<Result<Value, RedisFailure>>,
}

/// One worker's calls in flight and decisions waiting.
#[derive(Default)]
struct WorkerQueue {
    in_flight: Cell<usize>,
    waiting: RefCell<Vec<Waiting>>,
}

thread_local! {
    /// Per-thread queues, by link.
    static QUEUES: RefCell<HashMap<usize, Rc<WorkerQueue>>> = Default::default();
}

/// Sends decisions to a standalone Redis, batching those that arrive while
/// the worker's calls are in flight.
pub(super) struct Coalescer {
    link: Arc<RedisLink>,
}

impl Coalescer {
    pub(super) fn new(link: Arc<RedisLink>) -> Coalescer {
        Coalescer { link }
    }

    fn queue(&self) -> Rc<WorkerQueue> {
        let id = Arc::as_ptr(&self.link) as usize;
        QUEUES.with(|m| m.borrow_mut().entry(id).or_default().clone())
    }

    /// Decides one subject: at once if a slot is free, else in the next
    /// batch. The reply is `decide.lua`'s, whichever way it went.
    pub(super) async fn decide(&self, call: DecideCall) -> Result<Value, RedisFailure> {
        let queue = self.queue();
        if queue.in_flight.get() < MAX_IN_FLIGHT {
            let _slot = Slot::take(queue, self.link.clone());
            return call.send(&self.link).await;
        }
        let (reply, answer) = oneshot::channel();
        queue.waiting.borrow_mut().push(Waiting { call, reply });
        // A dropped sender means the batch task was dropped with its worker.
        answer.await.unwrap_or(Err(RedisFailure::NotConnected))
    }
}

/// A call in flight. When it ends, or its request goes away, the slot is
/// given back and whatever waits leaves as a batch.
struct Slot {
    queue: Rc<WorkerQueue>,
    link: Arc<RedisLink>,
}

impl Slot {
    fn take(queue: Rc<WorkerQueue>, link: Arc<RedisLink>) -> Slot {
        queue.in_flight.set(queue.in_flight.get() + 1);
        Slot { queue, link }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.queue
            .in_flight
            .set(self.queue.in_flight.get().saturating_sub(1));
        send_waiting(&self.queue, &self.link);
    }
}

/// Sends what waits, in batches, while slots are free.
fn send_waiting(queue: &Rc<WorkerQueue>, link: &Arc<RedisLink>) {
    while queue.in_flight.get() < MAX_IN_FLIGHT {
        let batch: Vec<Waiting> = {
            let mut waiting = queue.waiting.borrow_mut();
            if waiting.is_empty() {
                return;
            }
            let n = waiting.len().min(MAX_BATCH);
            waiting.drain(..n).collect()
        };
        let slot = Slot::take(queue.clone(), link.clone());
        actix_web::rt::spawn(async move {
            send_batch(&slot.link, batch).await;
            drop(slot);
        });
    }
}

/// One call for the whole batch; every waiting decision gets its own reply.
async fn send_batch(link: &RedisLink, batch: Vec<Waiting>) {
    if batch.len() == 1 {
        if let Some(w) = batch.into_iter().next() {
            let reply = w.call.send(link).await;
            let _ = w.reply.send(reply);
        }
        return;
    }
    let calls: Vec<&DecideCall> = batch.iter().map(|w| &w.call).collect();
    match decide::send_batch(link, &calls).await {
        Ok(replies) => {
            for (w, v) in batch.into_iter().zip(replies) {
                let _ = w.reply.send(Ok(v));
            }
        }
        Err(e) => {
            for w in batch {
                let _ = w.reply.send(Err(copy_failure(&e)));
            }
        }
    }
}

/// The same failure for every decision of a failed batch.
fn copy_failure(e: &RedisFailure) -> RedisFailure {
    match e {
        RedisFailure::NotConnected => RedisFailure::NotConnected,
        RedisFailure::Timeout(d) => RedisFailure::Timeout(*d),
        RedisFailure::Redis(r) => RedisFailure::Redis(r.clone()),
        RedisFailure::Reply(p) => RedisFailure::Redis(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected reply",
            p.to_string(),
        ))),
    }
}
