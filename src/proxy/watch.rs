//! `server.send_timeout` for every response body, whatever carries it: a
//! body whose client has taken nothing for that long (its last piece is
//! still waiting to be written) is cut off, and what it held goes at once:
//! the upstream connection it streamed from, or its buffered answer.
//!
//! The kernel's `TCP_USER_TIMEOUT` (see `send_timeout`) closes a plain or
//! TLS connection whose client stopped reading, but not an HTTP/2 stream
//! whose client keeps the connection alive and never opens the stream's
//! window: the HTTP/2 server then simply stops asking the body for more.
//! This watch sees both the same way, from the body's side: when it was
//! last asked for bytes, and whether it still owes the client some.
//!
//! One registry per worker thread (bodies never change threads), walked by
//! a local task a few times per timeout.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

/// What the watch knows of one body, shared with it.
pub(crate) struct Watched {
    /// When the body was last asked for bytes.
    last_asked: Cell<Instant>,
    /// Whether its last answer was bytes (it waits for the client to take
    /// them), as opposed to a wait on the upstream.
    owes_client: Cell<bool>,
    /// Set by the watch: the body gives up on its next poll.
    cut: Cell<bool>,
    /// What is freed when the body is cut (an upstream connection, a
    /// buffered answer).
    held: RefCell<Option<Box<dyn std::any::Any>>>,
}

impl Watched {
    /// The body was asked for bytes; `gave` says whether it had some.
    pub(crate) fn asked(&self, gave: bool) {
        self.last_asked.set(Instant::now());
        self.owes_client.set(gave);
    }

    pub(crate) fn is_cut(&self) -> bool {
        self.cut.get()
    }

    /// Hands the watch what it frees when it cuts the body off.
    pub(crate) fn hold(&self, what: Box<dyn std::any::Any>) {
        *self.held.borrow_mut() = Some(what);
    }

    /// Takes back what the watch held (the body ended on its own).
    pub(crate) fn release(&self) -> Option<Box<dyn std::any::Any>> {
        self.held.borrow_mut().take()
    }
}

struct Registry {
    bodies: Vec<Weak<Watched>>,
    timeout: Duration,
    running: bool,
}

thread_local! {
    static REGISTRY: RefCell<Registry> = const {
        RefCell::new(Registry { bodies: Vec::new(), timeout: Duration::from_secs(30), running: false })
    };
}

/// Watches a new body under `timeout` (`server.send_timeout`).
pub(crate) fn watch(timeout: Duration) -> Rc<Watched> {
    let w = Rc::new(Watched {
        last_asked: Cell::new(Instant::now()),
        owes_client: Cell::new(true),
        cut: Cell::new(false),
        held: RefCell::new(None),
    });
    let start = REGISTRY.with(|r| {
        let mut r = r.borrow_mut();
        r.bodies.push(Rc::downgrade(&w));
        r.timeout = timeout;
        !std::mem::replace(&mut r.running, true)
    });
    if start {
        let tick = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        actix_web::rt::spawn(async move {
            let mut every = tokio::time::interval(tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                sweep();
            }
        });
    }
    w
}

/// Cuts off every body that owes its client bytes nobody asked for within
/// the timeout, and forgets the bodies that ended.
fn sweep() {
    let now = Instant::now();
    let cut: Vec<Rc<Watched>> = REGISTRY.with(|r| {
        let mut r = r.borrow_mut();
        let timeout = r.timeout;
        let mut cut = Vec::new();
        r.bodies.retain(|w| {
            let Some(w) = w.upgrade() else { return false };
            if w.owes_client.get()
                && !w.cut.get()
                && now.saturating_duration_since(w.last_asked.get()) >= timeout
            {
                cut.push(w);
                return false;
            }
            true
        });
        cut
    });
    if !cut.is_empty() {
        cut_off(cut);
    }
}

/// Cuts `cut` off: what each held is dropped at once.
fn cut_off(cut: Vec<Rc<Watched>>) {
    crate::metrics::client_error_n("response_stalled", cut.len() as u64);
    for w in cut {
        // One text: the logger writes it once, then a count per window.
        log::warn!(
            "a client took no response bytes within server.send_timeout; its response was cut off"
        );
        w.cut.set(true);
        // Dropped here, outside the registry's borrow: an upstream
        // connection closes, a buffered answer is freed.
        let held = w.held.borrow_mut().take();
        drop(held);
    }
}
