//! The per-node cap on Redis decision calls (`redis.max_decisions_per_second`).
//!
//! A flood of new clients must not become a flood of script calls that
//! slows Redis for every node. Past the cap, a decision uses
//! `redis.on_failure` for that request, exactly as if its shard were down.
//! The cap is `governor`'s direct (un-keyed) limiter: one GCRA cell for the
//! whole node, lock-free. Decisions past it are counted
//! (`floodgate_redis_shed_total`, and `floodgate_decisions_total` under the
//! store that decided them) and a spell of shedding is logged when it
//! starts and when it ends.

use std::num::NonZeroU32;
use std::time::Instant;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use metrics::Counter;

use super::breaker::FallbackSpell;
use crate::metrics::DECISIONS_SHED;

pub(super) struct DecisionCap {
    limiter: Option<DefaultDirectRateLimiter>,
    per_second: u32,
    spell: FallbackSpell,
    epoch: Instant,
    shed: Counter,
}

impl DecisionCap {
    /// A cap of `per_second` decision calls, with a burst of one second's
    /// worth; 0 = no cap.
    pub(super) fn new(per_second: u32) -> DecisionCap {
        DecisionCap {
            limiter: NonZeroU32::new(per_second).map(|n| RateLimiter::direct(Quota::per_second(n))),
            per_second,
            spell: FallbackSpell::default(),
            epoch: Instant::now(),
            shed: metrics::counter!(DECISIONS_SHED),
        }
    }

    /// True if this decision may be sent to Redis; false (counted, and
    /// logged at the start of a spell) if it is past the cap.
    pub(super) fn admit(&self) -> bool {
        let Some(limiter) = &self.limiter else {
            return true;
        };
        if limiter.check().is_ok() {
            if let Some(n) = self.spell.went_through(self.epoch) {
                log::info!(
                    "decisions are back under redis.max_decisions_per_second = {} ({n} used on_failure meanwhile)",
                    self.per_second
                );
            }
            return true;
        }
        self.shed.increment(1);
        if self.spell.fell_back(self.epoch) {
            log::warn!(
                "more than redis.max_decisions_per_second = {} decisions; those past it use on_failure",
                self.per_second
            );
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_cap_admits_everything() {
        let cap = DecisionCap::new(0);
        assert!((0..10_000).all(|_| cap.admit()));
    }

    #[test]
    fn a_cap_admits_its_burst_then_sheds() {
        let cap = DecisionCap::new(5);
        let admitted = (0..20).filter(|_| cap.admit()).count();
        assert_eq!(admitted, 5);
    }
}
