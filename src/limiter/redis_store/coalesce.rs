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
//! A decision's budget is one `redis.timeout` in all, waiting included:
//! a decision still queued when its budget is spent is answered at once
//! (and goes to `on_failure`), never sent late; a batch is sent with the
//! most any of its decisions has left, and each decision stops waiting for
//! it when its own budget ends. A failed batch is one failed call, counted
//! once: the first decision gets the failure, the others a copy marked as
//! shared ([`RedisFailure::Batch`]), so a short blip under load never
//! counts as many failures as there were waiting decisions.
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

use tokio::time::Instant;

use redis::Value;
use tokio::sync::oneshot;

use super::decide::{self, DecideCall};
use crate::redis_link::{RedisFailure, RedisLink};

/// Decision calls one worker keeps in flight before it starts to batch.
/// Four: at light load a request never waits for another's call, and under
/// load a batch leaves while Redis still works on the ones before it (with
/// two, the many-subjects benchmark left a tenth of the throughput idle,
/// every decision waiting a whole round trip for a slot).
const MAX_IN_FLIGHT: usize = 4;
/// Subjects in one batch at most (bounds one script run inside Redis).
const MAX_BATCH: usize = 128;

struct Waiting {
    call: DecideCall,
    /// When the decision's budget ends.
    deadline: Instant,
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
        let budget = self.link.config().timeout;
        if queue.in_flight.get() < MAX_IN_FLIGHT {
            let _slot = Slot::take(queue, self.link.clone());
            return call.send(&self.link, budget).await;
        }
        let deadline = Instant::now() + budget;
        let (reply, answer) = oneshot::channel();
        queue.waiting.borrow_mut().push(Waiting {
            call,
            deadline,
            reply,
        });
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(reply)) => reply,
            // The batch task was dropped with its worker.
            Ok(Err(_)) => Err(RedisFailure::NotConnected),
            // Its batch is late: the budget is spent either way.
            Err(_) => Err(RedisFailure::Timeout(budget)),
        }
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

/// Sends what waits, in batches, while slots are free. Decisions whose
/// budget is spent are answered without being sent.
fn send_waiting(queue: &Rc<WorkerQueue>, link: &Arc<RedisLink>) {
    while queue.in_flight.get() < MAX_IN_FLIGHT {
        let batch: Vec<Waiting> = {
            let mut waiting = queue.waiting.borrow_mut();
            let now = Instant::now();
            let budget = link.config().timeout;
            if waiting.iter().any(|w| w.deadline <= now) {
                let (late, on_time): (Vec<Waiting>, Vec<Waiting>) =
                    waiting.drain(..).partition(|w| w.deadline <= now);
                *waiting = on_time;
                for w in late {
                    let _ = w.reply.send(Err(RedisFailure::Queued(budget)));
                }
            }
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

/// One call for the whole batch, within the most any of its decisions has
/// left; every waiting decision gets its own reply.
async fn send_batch(link: &RedisLink, batch: Vec<Waiting>) {
    let now = Instant::now();
    let limit = batch
        .iter()
        .map(|w| w.deadline.saturating_duration_since(now))
        .max()
        .unwrap_or_default();
    if batch.len() == 1 {
        if let Some(w) = batch.into_iter().next() {
            let reply = w.call.send(link, limit).await;
            let _ = w.reply.send(reply);
        }
        return;
    }
    let calls: Vec<&DecideCall> = batch.iter().map(|w| &w.call).collect();
    match decide::send_batch(link, &calls, limit).await {
        Ok(replies) => {
            for (w, v) in batch.into_iter().zip(replies) {
                let _ = w.reply.send(Ok(v));
            }
        }
        Err(e) => {
            let shared = e.to_string();
            let mut first = Some(e);
            for w in batch {
                let failure = first
                    .take()
                    .unwrap_or_else(|| RedisFailure::Batch(shared.clone()));
                let _ = w.reply.send(Err(failure));
            }
        }
    }
}
