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
//! The [`Limiter`] owns the choice of store: Redis while its circuit breaker
//! is closed, otherwise `redis.on_failure` (local, allow, deny). In front of
//! Redis sits the [`DenyCache`]: a refusal whose end Redis told us is
//! repeated from memory until then.

mod breaker;
mod coalesce;
pub mod deny_cache;
pub mod local;
mod redis_store;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

pub use breaker::Breaker;
pub use deny_cache::DenyCache;
pub use local::LocalStore;
pub use redis_store::RedisStore;

use crate::config::{BanConfig, OnFailure};
use crate::metrics::GatewayMetrics;
use crate::redis_link::RedisFailure;
use crate::rules::{ceil_secs, Rule, SubjectGroup};

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

/// Decide, or give back the tokens of a request another subject refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode<'a> {
    Decide,
    Refund { rule: &'a str },
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

/// One bucket after the call: `room_us / interval` tokens left; `wait_us`
/// until it would pass (refusing) or until it is full (otherwise).
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
}

impl DecisionStore for LocalStore {
    fn decide(
        &self,
        call: &SubjectCall<'_>,
    ) -> impl Future<Output = Result<SubjectReply, RedisFailure>> {
        std::future::ready(Ok(LocalStore::decide(self, call)))
    }
}

/// The numbers of the RateLimit headers, for one rule.
#[derive(Debug, Clone)]
pub struct RateInfo<'r> {
    pub rule: &'r Rule,
    /// Whole tokens left.
    pub remaining: u64,
    /// Whole seconds until the bucket is full.
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
}

/// What happens to a request.
#[derive(Debug)]
pub enum Decision<'r> {
    /// Forward; `info` is the most restrictive matched rule, if any.
    Allowed { info: Option<RateInfo<'r>> },
    Limited {
        info: RateInfo<'r>,
        retry_after_s: u64,
    },
    Banned {
        remaining_ms: u64,
        made: Option<BanMade>,
    },
    /// Redis is unavailable and `on_failure = "deny"`.
    Unavailable,
}

/// Subjects the deny cache holds at most (bounded memory).
const DENY_CACHE_SUBJECTS: usize = 100_000;

/// The decision maker: stores, breaker and failure policy.
pub struct Limiter {
    redis: Option<RedisStore>,
    local: Arc<LocalStore>,
    breaker: Arc<Breaker>,
    on_failure: OnFailure,
    metrics: GatewayMetrics,
    deny: DenyCache,
}

impl Limiter {
    pub fn new(
        redis: Option<RedisStore>,
        local: Arc<LocalStore>,
        breaker: Arc<Breaker>,
        on_failure: OnFailure,
        metrics: GatewayMetrics,
    ) -> Limiter {
        Limiter {
            redis,
            local,
            breaker,
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

    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// Applies new escalation settings (a reload) to both stores.
    pub fn set_ban_params(&self, ban: BanParams) {
        if let Some(redis) = &self.redis {
            redis.set_ban_params(ban);
        }
        self.local.set_ban_params(ban);
    }

    /// Decides a request whose matching rules are `groups`, and counts the
    /// outcome per rule in the metrics.
    pub async fn decide<'r>(&self, groups: &[SubjectGroup<'r>]) -> Decision<'r> {
        let tags: Vec<String> = groups.iter().map(|g| g.subject.tag()).collect();
        if let Some(redis) = &self.redis {
            if self.breaker.is_closed() {
                let started = Instant::now();
                if let Some(d) = self.deny.refusal(groups, &tags, started) {
                    self.metrics.deny_cache_hits.increment(1);
                    d.rule.counters.limited.increment(1);
                    return Decision::Limited {
                        info: RateInfo {
                            rule: d.rule,
                            remaining: 0,
                            reset_s: ceil_secs(d.to_full.as_micros() as u64),
                        },
                        retry_after_s: ceil_secs(d.wait.as_micros() as u64).max(1),
                    };
                }
                let deny = DenyMemory {
                    cache: &self.deny,
                    bans_on: redis.ban_params().after > 0,
                    sent: started,
                };
                let result = run(redis, groups, &tags, &self.metrics, Some(deny)).await;
                self.metrics
                    .redis_seconds
                    .record(started.elapsed().as_secs_f64());
                match result {
                    Ok(d) => {
                        self.breaker.success();
                        return d;
                    }
                    Err(e) => {
                        self.metrics.redis_errors.increment(1);
                        self.breaker.failure(&e);
                    }
                }
            }
            match self.on_failure {
                OnFailure::Allow => {
                    for rule in groups.iter().flat_map(|g| g.rules.iter()) {
                        rule.counters.allowed.increment(1);
                    }
                    return Decision::Allowed { info: None };
                }
                OnFailure::Deny => {
                    self.metrics.unavailable.increment(1);
                    return Decision::Unavailable;
                }
                OnFailure::Local => {}
            }
        }
        run(self.local.as_ref(), groups, &tags, &self.metrics, None)
            .await
            .unwrap_or(Decision::Allowed { info: None })
    }
}

/// Where `run` records refusals for the deny cache (Redis decisions only).
struct DenyMemory<'a> {
    cache: &'a DenyCache,
    /// Automatic bans are on: refusals of bannable subjects must reach Redis.
    bans_on: bool,
    /// When the call was sent: Redis' clock read the wait at or after it, so
    /// `sent + wait` is never later than the moment the request passes.
    sent: Instant,
}

/// Decides every group on `store`, refunding earlier subjects when a later
/// one refuses; counts the outcome in `metrics`, and remembers refusals in
/// `deny` when given.
async fn run<'r, S: DecisionStore>(
    store: &S,
    groups: &[SubjectGroup<'r>],
    tags: &[String],
    metrics: &GatewayMetrics,
    deny: Option<DenyMemory<'_>>,
) -> Result<Decision<'r>, RedisFailure> {
    let mut replies: Vec<SubjectReply> = Vec::with_capacity(groups.len());
    for (i, g) in groups.iter().enumerate() {
        let call = SubjectCall {
            tag: &tags[i],
            rules: &g.rules,
            ttl_ms: g.ttl_ms,
            bannable: g.subject.bannable(),
            mode: Mode::Decide,
            now_us: None,
        };
        let reply = store.decide(&call).await?;
        match reply.status {
            Status::Allowed => replies.push(reply),
            Status::BannedBefore | Status::BannedNow => {
                let made = (reply.status == Status::BannedNow).then(|| BanMade {
                    tag: tags[i].clone(),
                    dur_ms: reply.ban_ms,
                    strikes: reply.strikes,
                    until_ms: reply.until_ms,
                    reason: refusing_reason(g, &reply),
                });
                refund(store, &groups[..i], tags, &replies, None).await;
                if let Some(deny) = &deny {
                    for t in &tags[..i] {
                        deny.cache.forget(t);
                    }
                }
                metrics.banned.increment(1);
                return Ok(Decision::Banned {
                    remaining_ms: reply.ban_ms,
                    made,
                });
            }
            Status::Limited => {
                let refusing = g
                    .rules
                    .iter()
                    .zip(&reply.buckets)
                    .filter(|(_, b)| b.state == BucketState::Refusing);
                let Some((rule, bucket)) = refusing
                    .max_by_key(|(_, b)| b.wait_us)
                    .map(|(r, b)| (*r, *b))
                else {
                    return Err(RedisFailure::Reply(redis::ParsingError::from(
                        "a refusal without a refusing bucket",
                    )));
                };
                rule.counters.limited.increment(1);
                if let Some(deny) = &deny {
                    if !(deny.bans_on && g.subject.bannable()) {
                        let cap = rule.bucket.capacity_us() as i64;
                        deny.cache.remember(
                            &tags[i],
                            rule,
                            bucket.wait_us.max(0) as u64,
                            (cap - bucket.room_us).max(0) as u64,
                            deny.sent,
                        );
                    }
                    // The earlier subjects get their tokens back just below.
                    for t in &tags[..i] {
                        deny.cache.forget(t);
                    }
                }
                // Only a refusal by the client's own (IP-keyed) rules counts
                // towards its ban: a full global or shared-key bucket is not
                // this client's offence.
                let violation = g.subject.bannable().then_some(&*rule.name);
                if let Some(made) = refund(store, &groups[..i], tags, &replies, violation).await {
                    metrics.banned.increment(1);
                    return Ok(Decision::Banned {
                        remaining_ms: made.dur_ms,
                        made: Some(made),
                    });
                }
                let retry_after_s = ceil_secs(bucket.wait_us.max(1) as u64).max(1);
                return Ok(Decision::Limited {
                    info: rate_info(rule, &bucket),
                    retry_after_s,
                });
            }
        }
    }
    // Allowed: the most restrictive non-shadow rule gives the headers.
    let mut best: Option<RateInfo<'r>> = None;
    for ((g, reply), tag) in groups.iter().zip(&replies).zip(tags) {
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
            let info = rate_info(rule, b);
            if best.as_ref().is_none_or(|x| info.remaining < x.remaining) {
                best = Some(info);
            }
        }
    }
    Ok(Decision::Allowed { info: best })
}

/// Gives the subjects decided before a refusal back exactly the tokens they
/// were charged; with `rule`, the first bannable one also counts a
/// violation (which may ban: returned).
async fn refund<S: DecisionStore>(
    store: &S,
    earlier: &[SubjectGroup<'_>],
    tags: &[String],
    replies: &[SubjectReply],
    rule: Option<&str>,
) -> Option<BanMade> {
    let mut ban = None;
    for (j, (g, reply)) in earlier.iter().zip(replies).enumerate() {
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
            };
            if let Err(e) = store.decide(&call).await {
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
        };
        match store.decide(&call).await {
            Ok(r) if r.status == Status::BannedNow => {
                ban = Some(BanMade {
                    tag: tags[j].clone(),
                    dur_ms: r.ban_ms,
                    strikes: r.strikes,
                    until_ms: r.until_ms,
                    reason: format!("rule {rule}"),
                });
            }
            Ok(_) => {}
            Err(e) => log::warn!("could not refund {} after a refusal: {e}", tags[j]),
        }
    }
    ban
}
fn refusing_reason(g: &SubjectGroup<'_>, reply: &SubjectReply) -> String {
    g.rules
        .iter()
        .zip(&reply.buckets)
        .find(|(_, b)| b.state == BucketState::Refusing)
        .map(|(r, _)| format!("rule {}", r.name))
        .unwrap_or_else(|| "repeated refusals".into())
}

fn rate_info<'r>(rule: &'r Rule, b: &BucketReply) -> RateInfo<'r> {
    let interval = rule.bucket.interval_us.max(1) as i64;
    let cap = rule.bucket.capacity_us() as i64;
    RateInfo {
        rule,
        remaining: (b.room_us.max(0) / interval) as u64,
        reset_s: ceil_secs((cap - b.room_us).max(0) as u64),
    }
}
