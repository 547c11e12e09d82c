//! The decision: may this request pass, and if not, why and for how long.
//!
//! A request's matching rules are grouped by subject (see [`crate::rules`]).
//! Each subject is decided by one call to a [`DecisionStore`]: Redis (the
//! shared, exact store) or the in-process [`LocalStore`]. The IP subject goes
//! first; if it refuses, no other subject is asked. If a later subject
//! refuses, the earlier ones are refunded, so a refused request costs no
//! tokens anywhere (Redis Cluster cannot run one script across slots, so
//! cross-subject atomicity is by compensation, not by one transaction).
//!
//! The [`Limiter`] owns the choice of store, subject by subject, in one
//! place ([`Limiter::route`]): Redis while the breaker of the subject's
//! shard is closed and the node is under `redis.max_decisions_per_second`,
//! otherwise `redis.on_failure` (local, allow, deny). A call that fails
//! after its retries sends that subject, and only that subject, to
//! `on_failure`; refunds and concurrency leases go back to the store that
//! charged. Every decision is counted by the store that made it
//! (`floodgate_decisions_total{store}`). In front of Redis sits the
//! [`DenyCache`]: a refusal whose end Redis told us is repeated from memory
//! until then.
//!
//! The parts: `call` (what a store call takes and answers), `decide` (the
//! request's decision over its subjects), `breaker` (one circuit breaker per
//! shard), `cap` (the per-node cap on decision calls), `deny_cache`,
//! `slots` (concurrency slots a request holds), `tokens` and `leasing`
//! (leased tokens: requests charged in Redis before they come, admitted
//! from memory), `local` (the in-process store) and `redis_store` (the
//! Redis one, with its scripts' contract and the per-worker batching of
//! calls).

mod breaker;
mod call;
mod cap;
mod decide;
mod deny_cache;
mod headers;
mod leasing;
mod local;
mod redis_store;
mod settle;
mod slots;
#[cfg(test)]
mod tests;
mod tokens;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

pub(crate) use breaker::{Breaker, Breakers};
pub(crate) use call::SharedStore;
pub use call::{
    BanParams, BucketReply, BucketState, DecisionStore, Mode, Status, SubjectCall, SubjectReply,
};
use cap::DecisionCap;
pub(crate) use decide::{BanMade, Decision};
pub(crate) use deny_cache::DenyCache;
pub(crate) use headers::{rate_info, RateInfo};
pub(crate) use local::wall_clock_us;
pub use local::LocalStore;
pub use redis_store::RedisStore;
pub(crate) use settle::Reservation;
pub(crate) use slots::LeaseSet;
pub use slots::{LeaseCall, LeaseSlot};

use crate::config::OnFailure;
use crate::metrics::GatewayMetrics;
use crate::redis_link::RedisFailure;
use crate::rules::Rule;

/// Subjects the deny cache holds at most (bounded memory).
const DENY_CACHE_SUBJECTS: usize = 100_000;
/// Subjects whose arrivals the lease table follows at most.
const LEASE_SUBJECTS: usize = 100_000;

/// How the limiter treats its shared store, from `[redis]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LimiterSettings {
    pub(crate) on_failure: OnFailure,
    /// `redis.max_decisions_per_second` (0: no cap).
    pub(crate) max_decisions_per_second: u32,
    /// `redis.lease`: how long a node admits from tokens it leased (0: no
    /// leases).
    pub(crate) lease: Duration,
}

/// The decision maker: stores, breakers, the decision cap, the deny cache
/// and the failure policy. `S` is the shared store: Redis in the gateway,
/// a scripted double in the limiter's own tests.
pub(crate) struct Limiter<S = RedisStore> {
    shared: Option<S>,
    local: Arc<LocalStore>,
    breakers: Arc<Breakers>,
    cap: DecisionCap,
    on_failure: OnFailure,
    /// Escalation settings; a reload replaces them.
    ban: ArcSwap<BanParams>,
    metrics: GatewayMetrics,
    deny: DenyCache,
    /// Tokens this node leased (see `tokens`).
    tokens: tokens::TokenLeases,
    /// When the lease table was last walked for leases whose time is over.
    last_lease_scan: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Where a call on a subject goes: the shared store (with its shard's
/// breaker), or nowhere shared (no Redis, or its shard is down).
enum Route<'a, S> {
    Shared(&'a S, Arc<Breaker>),
    Fallback,
}

/// What the node can say about its shared store (`/readyz`).
#[derive(Debug)]
pub(crate) enum Readiness {
    /// No Redis configured: every decision is this node's.
    NoSharedStore,
    /// Redis answers and every shard's decisions go to it.
    Ready,
    /// Redis answers, but a breaker is still open (it closes at the next
    /// probe).
    Recovering,
    /// Redis does not answer.
    Down(RedisFailure),
}

impl<S: SharedStore> Limiter<S> {
    pub(crate) fn new(
        shared: Option<S>,
        local: Arc<LocalStore>,
        breakers: Arc<Breakers>,
        settings: LimiterSettings,
        ban: BanParams,
        metrics: GatewayMetrics,
    ) -> Limiter<S> {
        let cap = DecisionCap::new(if shared.is_some() {
            settings.max_decisions_per_second
        } else {
            0
        });
        let leasing = shared.is_some();
        Limiter {
            shared,
            local,
            breakers,
            cap,
            on_failure: settings.on_failure,
            ban: ArcSwap::from_pointee(ban),
            metrics,
            deny: DenyCache::new(DENY_CACHE_SUBJECTS),
            tokens: tokens::TokenLeases::new(
                if leasing {
                    settings.lease
                } else {
                    Duration::ZERO
                },
                LEASE_SUBJECTS,
            ),
            last_lease_scan: std::sync::Mutex::new(None),
        }
    }

    /// The refusals this node repeats without asking Redis.
    pub(crate) fn deny_cache(&self) -> &DenyCache {
        &self.deny
    }

    /// True when a shared store (Redis) is configured.
    pub(crate) fn has_shared_store(&self) -> bool {
        self.shared.is_some()
    }

    /// True while a shared store is configured and some shard of it is
    /// unavailable (its subjects get `on_failure`).
    pub(crate) fn is_degraded(&self) -> bool {
        self.shared.is_some() && !self.breakers.is_closed()
    }

    pub(crate) fn breakers(&self) -> &Arc<Breakers> {
        &self.breakers
    }

    /// Applies new escalation settings (a reload) to both stores.
    pub(crate) fn set_ban_params(&self, ban: BanParams) {
        self.ban.store(Arc::new(ban));
        if let Some(shared) = &self.shared {
            shared.set_ban_params(ban);
        }
        self.local.set_ban_params(ban);
    }

    /// The escalation settings in effect.
    pub(crate) fn ban_params(&self) -> BanParams {
        **self.ban.load()
    }

    /// The one place a subject's store is chosen: the shared store while
    /// the breaker of the shard holding `tag` is closed, else none.
    fn route(&self, tag: &str) -> Route<'_, S> {
        match &self.shared {
            Some(shared) => {
                let shard = self.breakers.for_tag(tag);
                if shard.is_closed() {
                    Route::Shared(shared, shard)
                } else {
                    Route::Fallback
                }
            }
            None => Route::Fallback,
        }
    }

    /// Reads a subject's state for `rules` without charging anything, from
    /// Redis while it is in use, else from this node.
    pub(crate) async fn peek(
        &self,
        tag: &str,
        rules: &[&Rule],
        ttl_ms: u64,
    ) -> Result<SubjectReply, RedisFailure> {
        let call = SubjectCall {
            tag,
            rules,
            ttl_ms,
            bannable: false,
            mode: Mode::Peek,
            now_us: None,
            lease: "",
            count: 1,
            costs: &[],
        };
        match self.route(tag) {
            Route::Shared(shared, _) => shared.decide(&call).await,
            Route::Fallback => Ok(self.local.decide(&call)),
        }
    }

    /// How long a response's end waits for its slots' release before it
    /// goes out anyway (the release goes on behind it): one Redis call's
    /// budget, so a failing Redis delays a response's end by no more than
    /// it delays a decision.
    pub(crate) fn release_wait(&self) -> Duration {
        match &self.shared {
            Some(s) => s.call_timeout(),
            None => Duration::from_secs(1),
        }
    }

    /// Renews (`renew`) or releases the slots of `set` in the store that
    /// granted them. A failure is counted: the slot then ends with its
    /// lease.
    pub(crate) async fn leases(&self, set: &LeaseSet, renew: bool) -> u32 {
        let mut held = 0;
        for s in &set.subjects {
            let call = LeaseCall {
                tag: &s.tag,
                lease: &set.id,
                slots: &s.slots,
                renew,
                now_us: None,
            };
            let result = match (&self.shared, s.on_redis) {
                (Some(shared), true) => shared.leases(&call).await,
                _ => Ok(self.local.leases(&call)),
            };
            match result {
                Ok(n) => held += n,
                Err(_) => self.metrics.lease_errors.increment(1),
            }
        }
        held
    }

    /// Whether the shared store answers now, and whether the node uses it.
    pub(crate) async fn readiness(&self) -> Readiness {
        let Some(shared) = &self.shared else {
            return Readiness::NoSharedStore;
        };
        match shared.ping().await {
            Ok(()) if self.breakers.is_closed() => Readiness::Ready,
            Ok(()) => Readiness::Recovering,
            Err(e) => Readiness::Down(e),
        }
    }
}
