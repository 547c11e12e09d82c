//! The circuit breaker in front of Redis.
//!
//! After `breaker_failures` failed calls in a row the breaker opens: requests
//! stop asking Redis (they get `on_failure` at once, with zero waiting) and a
//! background prober pings Redis every `probe_interval` until it answers,
//! then closes the breaker. Transitions log one line and move the
//! `floodgate_degraded` gauge; individual requests log nothing.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Instant;

use metrics::Gauge;

use crate::redis_link::RedisFailure;

pub struct Breaker {
    open: AtomicBool,
    failures: AtomicU32,
    threshold: u32,
    degraded: Gauge,
    opened_at: std::sync::Mutex<Option<Instant>>,
}

impl Breaker {
    /// A breaker that starts open when Redis has not been reached yet.
    pub fn new(threshold: u32, start_open: bool, degraded: Gauge) -> Breaker {
        degraded.set(if start_open { 1.0 } else { 0.0 });
        Breaker {
            open: AtomicBool::new(start_open),
            failures: AtomicU32::new(0),
            threshold: threshold.max(1),
            degraded,
            opened_at: std::sync::Mutex::new(start_open.then(Instant::now)),
        }
    }

    pub fn is_closed(&self) -> bool {
        !self.open.load(Ordering::Relaxed)
    }

    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failed call; opens the breaker at the threshold.
    pub fn failure(&self, e: &RedisFailure) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.threshold && !self.open.swap(true, Ordering::AcqRel) {
            self.degraded.set(1.0);
            *self.opened_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            log::warn!("Redis unavailable after {n} failed calls ({e}); serving with on_failure until it answers again");
        }
    }

    /// Closes the breaker after a successful probe.
    pub fn close(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open.swap(false, Ordering::AcqRel) {
            self.degraded.set(0.0);
            let since = self
                .opened_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            let took = since
                .map(|t| format!(" after {:.1}s", t.elapsed().as_secs_f64()))
                .unwrap_or_default();
            log::warn!("Redis answers again{took}; decisions go through Redis");
        }
    }
}
