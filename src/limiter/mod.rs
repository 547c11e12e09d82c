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
//! The [`Limiter`] owns the choice of store, subject by subject: Redis
//! while the breaker of the subject's shard is closed and the node is under
//! `redis.max_decisions_per_second`, otherwise `redis.on_failure` (local,
//! allow, deny). A call that fails after its retries sends that subject,
//! and only that subject, to `on_failure`; refunds and concurrency leases go
//! back to the store that charged. Every decision is counted by the store
//! that made it (`floodgate_decisions_total{store}`). In front of Redis sits
//! the [`DenyCache`]: a refusal whose end Redis told us is repeated from
//! memory until then.

mod breaker;
mod cap;
mod coalesce;
pub mod deny_cache;
mod leases;
pub mod local;
mod redis_store;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use metrics::Counter;

pub use breaker::{Breaker, Breakers};
use cap::DecisionCap;
pub use deny_cache::DenyCache;
pub use leases::{HeldSlots, LeaseCall, LeaseSet, LeaseSlot};
pub use local::LocalStore;
pub use redis_store::RedisStore;

use crate::config::{BanConfig, OnFailure};
use crate::metrics::{DecisionCounters, GatewayMetrics};
use crate::policy::{ceil_secs, Limit};
use crate::redis_link::RedisFailure;
use crate::rules::{Rule, SubjectGroup};

/// The escalation settings both stores apply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BanParams {
    /// Denials within `within_ms` that make a ban; 0 = no automatic bans.
    pub after: u32,
    pub within_ms: u64,
    pub duration_ms: u64,
    pub factor: f64,
    pub max_ms: u64,
    pub memory_ms: u64,
}

impl BanParams {
    pub fn from_config(b: &BanConfig) -> BanParams {
        BanParams {
            after: if b.enabled { b.after } else { 0 },
            within_ms: b.within.as_millis() as u64,
            duration_ms: b.duration.as_millis() as u64,
            factor: b.factor,
            max_ms: b.max_duration.as_millis() as u64,
            memory_ms: b.memory.as_millis() as u64,
        }
    }

    /// The length of the `strikes`-th ban: `duration x factor^(strikes-1)`,
    /// capped at `max_duration` (the same formula as the script).
    pub fn duration_for(&self, strikes: u32) -> u64 {
        // powf, like Lua's `^` (C pow), so both stores floor the same value.
        let d = self.duration_ms as f64 * self.factor.powf(f64::from(strikes.saturating_sub(1)));
        d.min(self.max_ms as f64).floor() as u64
    }
}

/// Decide, give back the tokens of a request another subject refused, or
/// only look.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode<'a> {
    Decide,
    Refund {
        rule: &'a str,
    },
    /// Read every rule's state as a request of cost 0 would, writing
    /// nothing (the admin API's view of a consumer).
    Peek,
}

/// One store call: a subject and its matching rules.
#[derive(Debug, Clone)]
pub struct SubjectCall<'a> {
    pub tag: &'a str,
    pub rules: &'a [&'a Rule],
    pub ttl_ms: u64,
    pub bannable: bool,
    pub mode: Mode<'a>,
    /// Pins the clock (µs since the epoch); `None` = the store's own clock.
    pub now_us: Option<u64>,
    /// The request's lease id, held in the slots of its concurrency rules
    /// (`""` when it has none).
    pub lease: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Allowed,
    Limited,
    BannedBefore,
    BannedNow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketState {
    Charged,
    Refusing,
    /// Would refuse, but the rule is in shadow mode: not charged, not refused.
    ShadowRefusing,
}

/// One rule after the call. For a token bucket, `room_us / interval`
/// tokens are left, and `wait_us` is the time until it would pass
/// (refusing) or until it is full (otherwise). For a quota, `room_us` is the
/// requests left in the period and `wait_us` the time until the next
/// period. For a concurrency cap, `room_us` is the free slots, and `wait_us`
/// 1 s when refusing (a slot may free at any moment), else 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketReply {
    pub state: BucketState,
    pub room_us: i64,
    pub wait_us: i64,
}

/// A store's answer for one subject.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectReply {
    pub status: Status,
    pub ban_ms: u64,
    pub strikes: u32,
    pub until_ms: u64,
    pub buckets: Vec<BucketReply>,
}

/// Where subjects are decided: Redis, or this process.
pub trait DecisionStore {
    fn decide(
        &self,
        call: &SubjectCall<'_>,
    ) -> impl Future<Output = Result<SubjectReply, RedisFailure>>;

    /// Renews or releases one request's concurrency slots of one subject;
    /// returns how many of them still hold its lease.
    fn leases(&self, call: &LeaseCall<'_>) -> impl Future<Output = Result<u32, RedisFailure>>;
}

impl DecisionStore for LocalStore {
    fn decide(
        &self,
        call: &SubjectCall<'_>,
    ) -> impl Future<Output = Result<SubjectReply, RedisFailure>> {
        std::future::ready(Ok(LocalStore::decide(self, call)))
    }

    fn leases(&self, call: &LeaseCall<'_>) -> impl Future<Output = Result<u32, RedisFailure>> {
        std::future::ready(Ok(LocalStore::leases(self, call)))
    }
}

/// The numbers of the RateLimit headers, for one rule.
#[derive(Debug, Clone)]
pub struct RateInfo<'r> {
    pub rule: &'r Rule,
    /// Whole tokens, requests or slots left.
    pub remaining: u64,
    /// Whole seconds until the bucket is full or the quota's period ends
    /// (0 for a concurrency cap, which has no reset).
    pub reset_s: u64,
}

/// A ban this request just made.
#[derive(Debug, Clone)]
pub struct BanMade {
    pub tag: String,
    pub dur_ms: u64,
    pub strikes: u32,
    pub until_ms: u64,
    pub reason: String,
    /// Made by `decide.lua`: Redis enforces it, and its record (what the
    /// admin API lists) is still to be written. A ban made by the local
    /// store is written back when its shard answers again instead.
    pub by_redis: bool,
}

/// What happens to a request.
#[derive(Debug)]
pub enum Decision<'r> {
    /// Forward, holding `leases` (the concurrency slots taken) until the
    /// response ends; `applied` is every non-shadow rule that applied.
    Allowed {
        applied: Vec<RateInfo<'r>>,
        leases: Option<LeaseSet>,
    },
    /// Refused by `violated` (never empty), the one keeping the client
    /// waiting longest first.
    Limited {
        violated: Vec<RateInfo<'r>>,
        retry_after_s: u64,
    },
    Banned {
        remaining_ms: u64,
        made: Option<BanMade>,
    },
    /// Redis is unavailable and `on_failure = "deny"`.
    Unavailable,
}

/// Where one subject was decided: the `store` label of
/// `floodgate_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// Redis decided, exactly and for every node.
    Redis,
    /// This node's in-process store (`on_failure = "local"`, or no Redis).
    Local,
    /// Let through undecided (`on_failure = "allow"`).
    Allow,
    /// Refused undecided (`on_failure = "deny"`).
    Deny,
}

impl Store {
    fn counter(self, c: &DecisionCounters) -> &Counter {
        match self {
            Store::Redis => &c.redis,
            Store::Local => &c.local,
            Store::Allow => &c.allow,
            Store::Deny => &c.deny,
        }
    }
}

/// Subjects the deny cache holds at most (bounded memory).
const DENY_CACHE_SUBJECTS: usize = 100_000;

/// The decision maker: stores, breakers, the decision cap, the deny cache
/// and the failure policy.
pub struct Limiter {
    redis: Option<RedisStore>,
    local: Arc<LocalStore>,
    breakers: Arc<Breakers>,
    cap: DecisionCap,
    on_failure: OnFailure,
    metrics: GatewayMetrics,
    deny: DenyCache,
}

/// What the deny cache needs of one request decided on Redis.
struct DenyMemory {
    /// Automatic bans are on: refusals of bannable subjects must reach Redis.
    bans_on: bool,
    /// When the first call was sent: Redis' clock read each wait at or after
    /// it, so `sent + wait` is never later than the moment a request passes.
    sent: Instant,
}

impl Limiter {
    pub fn new(
        redis: Option<RedisStore>,
        local: Arc<LocalStore>,
        breakers: Arc<Breakers>,
        on_failure: OnFailure,
        metrics: GatewayMetrics,
    ) -> Limiter {
        let cap = DecisionCap::new(
            redis
                .as_ref()
                .map_or(0, |r| r.link().config().max_decisions_per_second),
        );
        Limiter {
            redis,
            local,
            breakers,
            cap,
            on_failure,
            metrics,
            deny: DenyCache::new(DENY_CACHE_SUBJECTS),
        }
    }

    /// The refusals this node repeats without asking Redis.
    pub fn deny_cache(&self) -> &DenyCache {
        &self.deny
    }

    pub fn local(&self) -> &Arc<LocalStore> {
        &self.local
    }

    pub fn redis(&self) -> Option<&RedisStore> {
        self.redis.as_ref()
    }

    pub fn breakers(&self) -> &Arc<Breakers> {
        &self.breakers
    }

    /// Applies new escalation settings (a reload) to both stores.
    pub fn set_ban_params(&self, ban: BanParams) {
        if let Some(redis) = &self.redis {
            redis.set_ban_params(ban);
        }
        self.local.set_ban_params(ban);
    }

    /// Decides a request whose matching rules are `groups`, one subject at
    /// a time (IP first), refunding earlier subjects when a later one
    /// refuses; counts the outcome per rule in the metrics.
    pub async fn decide<'r>(&self, groups: &[SubjectGroup<'r>]) -> Decision<'r> {
        let tags: Vec<String> = groups.iter().map(|g| g.subject.tag()).collect();
        let metrics = &self.metrics;
        let sent = Instant::now();
        let deny = match &self.redis {
            Some(redis) => {
                if let Some(d) = self.deny.refusal(groups, &tags, sent) {
                    metrics.deny_cache_hits.increment(1);
                    d.rule.counters.limited.increment(1);
                    return Decision::Limited {
                        violated: vec![RateInfo {
                            rule: d.rule,
                            remaining: 0,
                            reset_s: ceil_secs(d.to_full.as_micros() as u64),
                        }],
                        retry_after_s: ceil_secs(d.wait.as_micros() as u64).max(1),
                    };
                }
                Some(DenyMemory {
                    bans_on: redis.ban_params().after > 0,
                    sent,
                })
            }
            None => None,
        };
        let needs_lease = groups
            .iter()
            .any(|g| g.rules.iter().any(|r| r.is_concurrency()));
        let lease = if needs_lease {
            leases::new_lease_id()
        } else {
            String::new()
        };
        let mut decided: Vec<(SubjectReply, Store)> = Vec::with_capacity(groups.len());
        for (i, g) in groups.iter().enumerate() {
            let call = SubjectCall {
                tag: &tags[i],
                rules: &g.rules,
                ttl_ms: g.ttl_ms,
                bannable: g.subject.bannable(),
                mode: Mode::Decide,
                now_us: None,
                lease: &lease,
            };
            let (reply, store) = self.decide_subject(&call).await;
            store.counter(&metrics.decisions).increment(1);
            if store == Store::Deny {
                self.refund(&groups[..i], &tags, &decided, &lease, None)
                    .await;
                metrics.unavailable.increment(1);
                return Decision::Unavailable;
            }
            match reply.status {
                Status::Allowed => decided.push((reply, store)),
                Status::BannedBefore | Status::BannedNow => {
                    let made = (reply.status == Status::BannedNow).then(|| BanMade {
                        tag: tags[i].clone(),
                        dur_ms: reply.ban_ms,
                        strikes: reply.strikes,
                        until_ms: reply.until_ms,
                        reason: refusing_reason(g, &reply),
                        by_redis: store == Store::Redis,
                    });
                    self.refund(&groups[..i], &tags, &decided, &lease, None)
                        .await;
                    metrics.banned.increment(1);
                    return Decision::Banned {
                        remaining_ms: reply.ban_ms,
                        made,
                    };
                }
                Status::Limited => {
                    let mut refusing: Vec<(&'r Rule, BucketReply)> = g
                        .rules
                        .iter()
                        .zip(&reply.buckets)
                        .filter(|(_, b)| b.state == BucketState::Refusing)
                        .map(|(r, b)| (*r, *b))
                        .collect();
                    // The longest wait first: it is the one the client sees.
                    refusing.sort_by_key(|(_, b)| std::cmp::Reverse(b.wait_us));
                    let Some(&(rule, bucket)) = refusing.first() else {
                        // Not a reply either store gives; charge nothing
                        // more and let the other subjects decide.
                        log::debug!("a refusal of {} without a refusing bucket", tags[i]);
                        decided.push((reply, store));
                        continue;
                    };
                    rule.counters.limited.increment(1);
                    if let (Some(deny), Store::Redis) = (&deny, store) {
                        if !(deny.bans_on && g.subject.bannable()) {
                            for (r, b) in &refusing {
                                self.deny.remember(&tags[i], r, b, deny.sent);
                            }
                        }
                    }
                    // Only a refusal by the client's own (IP-keyed) rules
                    // counts towards its ban: a full global or shared-key
                    // bucket is not this client's offence.
                    let violation = g.subject.bannable().then_some(&*rule.name);
                    if let Some(made) = self
                        .refund(&groups[..i], &tags, &decided, &lease, violation)
                        .await
                    {
                        metrics.banned.increment(1);
                        return Decision::Banned {
                            remaining_ms: made.dur_ms,
                            made: Some(made),
                        };
                    }
                    let retry_after_s = ceil_secs(bucket.wait_us.max(1) as u64).max(1);
                    return Decision::Limited {
                        violated: refusing.iter().map(|(r, b)| rate_info(r, b)).collect(),
                        retry_after_s,
                    };
                }
            }
        }
        // Allowed: every non-shadow rule gives its headers; the concurrency
        // slots taken are held until the response ends.
        let mut applied: Vec<RateInfo<'r>> = Vec::new();
        let mut held = Vec::new();
        for ((g, (reply, store)), tag) in groups.iter().zip(&decided).zip(&tags) {
            if *store == Store::Allow {
                for rule in &g.rules {
                    rule.counters.allowed.increment(1);
                }
                continue;
            }
            let slots: Vec<LeaseSlot> = g
                .rules
                .iter()
                .zip(&reply.buckets)
                .filter_map(|(rule, b)| match rule.limit {
                    Limit::Concurrency(c) if b.state == BucketState::Charged => Some(LeaseSlot {
                        rule: rule.name.clone(),
                        lease_ms: c.lease_ms,
                    }),
                    _ => None,
                })
                .collect();
            if !slots.is_empty() {
                held.push(HeldSlots {
                    tag: tag.clone(),
                    slots,
                    on_redis: *store == Store::Redis,
                });
            }
            for (rule, b) in g.rules.iter().zip(&reply.buckets) {
                if b.state == BucketState::ShadowRefusing {
                    rule.counters.shadow_limited.increment(1);
                    log::info!("shadow rule {} would limit {}", rule.name, tag);
                } else {
                    rule.counters.allowed.increment(1);
                }
                if rule.shadow {
                    continue;
                }
                applied.push(rate_info(rule, b));
            }
        }
        let leases = (!held.is_empty()).then_some(LeaseSet {
            id: lease,
            subjects: held,
        });
        Decision::Allowed { applied, leases }
    }

    /// Decides one subject: on Redis if its shard's breaker is closed and
    /// the cap admits the call, otherwise (or if the call fails after its
    /// retries) as `on_failure` says.
    async fn decide_subject(&self, call: &SubjectCall<'_>) -> (SubjectReply, Store) {
        if let Some(redis) = &self.redis {
            let shard = self.breakers.for_tag(call.tag);
            if !shard.is_closed() {
                self.breakers.fell_back(&shard, &"its breaker is open");
            } else if self.cap.admit() {
                let started = Instant::now();
                let result = redis.decide(call).await;
                self.metrics
                    .redis_seconds
                    .record(started.elapsed().as_secs_f64());
                match result {
                    Ok(reply) => {
                        self.breakers.success(&shard);
                        return (reply, Store::Redis);
                    }
                    Err(e) => {
                        self.metrics.redis_errors.increment(1);
                        self.breakers.failure(&shard, &e);
                        self.breakers.fell_back(&shard, &e);
                    }
                }
            }
            let undecided = SubjectReply {
                status: Status::Allowed,
                ban_ms: 0,
                strikes: 0,
                until_ms: 0,
                buckets: Vec::new(),
            };
            match self.on_failure {
                OnFailure::Allow => return (undecided, Store::Allow),
                OnFailure::Deny => return (undecided, Store::Deny),
                OnFailure::Local => {}
            }
        }
        (LocalStore::decide(&self.local, call), Store::Local)
    }

    /// Sends a call to the store that decided the subject.
    async fn on_store(
        &self,
        store: Store,
        call: &SubjectCall<'_>,
    ) -> Result<SubjectReply, RedisFailure> {
        match (store, &self.redis) {
            (Store::Redis, Some(redis)) => redis.decide(call).await,
            _ => DecisionStore::decide(self.local.as_ref(), call).await,
        }
    }

    /// Gives the subjects decided before a refusal back exactly the tokens
    /// they were charged, each on the store that charged it; with `rule`,
    /// the first bannable one also counts a violation (which may ban:
    /// returned).
    async fn refund(
        &self,
        earlier: &[SubjectGroup<'_>],
        tags: &[String],
        decided: &[(SubjectReply, Store)],
        lease: &str,
        rule: Option<&str>,
    ) -> Option<BanMade> {
        let mut ban = None;
        // These subjects get tokens back: what this node remembers of their
        // refusals no longer holds.
        for t in &tags[..decided.len()] {
            self.deny.forget(t);
        }
        for (j, (g, (reply, store))) in earlier.iter().zip(decided).enumerate() {
            if !matches!(store, Store::Redis | Store::Local) {
                continue; // let through undecided: nothing was charged
            }
            let charged: Vec<&Rule> = g
                .rules
                .iter()
                .zip(&reply.buckets)
                .filter(|(_, b)| b.state == BucketState::Charged)
                .map(|(r, _)| *r)
                .collect();
            let Some(rule) = rule else {
                // Banned by a later subject: nothing to count, only give back.
                if charged.is_empty() {
                    continue;
                }
                let call = SubjectCall {
                    tag: &tags[j],
                    rules: &charged,
                    ttl_ms: g.ttl_ms,
                    bannable: false,
                    mode: Mode::Refund { rule: "" },
                    now_us: None,
                    lease,
                };
                if let Err(e) = self.on_store(*store, &call).await {
                    log::warn!("could not refund {} after a refusal: {e}", tags[j]);
                }
                continue;
            };
            let call = SubjectCall {
                tag: &tags[j],
                rules: &charged,
                ttl_ms: g.ttl_ms,
                bannable: g.subject.bannable(),
                mode: Mode::Refund { rule },
                now_us: None,
                lease,
            };
            match self.on_store(*store, &call).await {
                Ok(r) if r.status == Status::BannedNow => {
                    ban = Some(BanMade {
                        tag: tags[j].clone(),
                        dur_ms: r.ban_ms,
                        strikes: r.strikes,
                        until_ms: r.until_ms,
                        reason: format!("rule {rule}"),
                        by_redis: *store == Store::Redis,
                    });
                }
                Ok(_) => {}
                Err(e) => log::warn!("could not refund {} after a refusal: {e}", tags[j]),
            }
        }
        ban
    }

    /// Reads a subject's state for `rules` without charging anything, from
    /// Redis while it is in use, else from this node.
    pub async fn peek(
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
        };
        match &self.redis {
            Some(redis) if self.breakers.for_tag(tag).is_closed() => redis.decide(&call).await,
            _ => Ok(self.local.decide(&call)),
        }
    }

    /// How long a response's end waits for its slots' release before it
    /// goes out anyway (the release goes on behind it): one Redis call's
    /// budget, so a failing Redis delays a response's end by no more than
    /// it delays a decision.
    pub fn release_wait(&self) -> std::time::Duration {
        match &self.redis {
            Some(r) => r.timeout(),
            None => std::time::Duration::from_secs(1),
        }
    }

    /// Renews (`renew`) or releases the slots of `set` in the store that
    /// granted them. A failure is counted: the slot then ends with its
    /// lease.
    pub async fn leases(&self, set: &LeaseSet, renew: bool) -> u32 {
        let mut held = 0;
        for s in &set.subjects {
            let call = LeaseCall {
                tag: &s.tag,
                lease: &set.id,
                slots: &s.slots,
                renew,
                now_us: None,
            };
            let result = match (&self.redis, s.on_redis) {
                (Some(redis), true) => redis.leases(&call).await,
                _ => Ok(self.local.leases(&call)),
            };
            match result {
                Ok(n) => held += n,
                Err(_) => self.metrics.lease_errors.increment(1),
            }
        }
        held
    }
}

fn refusing_reason(g: &SubjectGroup<'_>, reply: &SubjectReply) -> String {
    g.rules
        .iter()
        .zip(&reply.buckets)
        .find(|(_, b)| b.state == BucketState::Refusing)
        .map(|(r, _)| format!("rule {}", r.name))
        .unwrap_or_else(|| "repeated refusals".into())
}

/// The header numbers of one rule's reply (see [`BucketReply`]).
pub fn rate_info<'r>(rule: &'r Rule, b: &BucketReply) -> RateInfo<'r> {
    match rule.limit {
        Limit::Rate(bucket) => {
            let interval = bucket.interval_us.max(1) as i64;
            let cap = bucket.capacity_us() as i64;
            RateInfo {
                rule,
                remaining: (b.room_us.max(0) / interval) as u64,
                reset_s: ceil_secs((cap - b.room_us).max(0) as u64),
            }
        }
        Limit::Quota(_) => RateInfo {
            rule,
            remaining: b.room_us.max(0) as u64,
            reset_s: ceil_secs(b.wait_us.max(0) as u64),
        },
        Limit::Concurrency(_) => RateInfo {
            rule,
            remaining: b.room_us.max(0) as u64,
            reset_s: 0,
        },
    }
}
