//! One request's decision over its subjects: the deny cache first, then one
//! store call per subject (IP first), refunds of the earlier subjects when
//! a later one refuses, and the outcome with its header numbers.

use std::time::{Duration, Instant};

use metrics::Counter;

use super::call::{
    BucketReply, BucketState, DecisionStore, Mode, SharedStore, Status, SubjectCall, SubjectReply,
};
use super::headers::{rate_info, RateInfo};
use super::settle::Reservation;
use super::slots::{new_lease_id, HeldSlots, LeaseSet, LeaseSlot};
use super::tokens::{as_of_lease, Take};
use super::{Limiter, Route};
use crate::config::OnFailure;
use crate::log_throttle::Verdict;
use crate::metrics::DecisionCounters;
use crate::policy::{ceil_secs, Limit};
use crate::redis_link::RedisFailure;
use crate::rules::{Rule, SubjectGroup};

/// A ban this request just made.
#[derive(Debug, Clone)]
pub(crate) struct BanMade {
    pub(crate) dur_ms: u64,
    pub(crate) strikes: u32,
    pub(crate) reason: String,
    /// Made by `decide.lua`: Redis enforces it, and its record (what the
    /// admin API lists) is still to be written. A ban made by the local
    /// store is written back when its shard answers again instead.
    pub(crate) by_redis: bool,
    /// Made by the local store while the subject's shard answers (the
    /// decision was past the cap, or one call failed): it can be written to
    /// Redis at once, so the fleet and the admin API see it now.
    pub(crate) redis_answers: bool,
}

/// What happens to a request.
#[derive(Debug)]
pub(crate) enum Decision<'r> {
    /// Forward, holding `leases` (the concurrency slots taken) until the
    /// response ends; `applied` is every non-shadow rule that applied.
    Allowed {
        applied: Vec<RateInfo<'r>>,
        leases: Option<LeaseSet>,
        /// What rules that settle or count reserved, to be put right
        /// once the answer is known (see `settle`).
        reservation: Reservation,
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
pub(crate) enum Store {
    /// Redis decided, exactly and for every node.
    Redis,
    /// Admitted from this node's leased tokens, charged in Redis before.
    Lease,
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
            // Leased tokens were charged in Redis.
            Store::Redis | Store::Lease => &c.redis,
            Store::Local => &c.local,
            Store::Allow => &c.allow,
            Store::Deny => &c.deny,
        }
    }
}

/// What the deny cache needs of one request decided on Redis.
struct DenyMemory {
    /// Automatic bans are on: refusals of bannable subjects must reach Redis.
    bans_on: bool,
    /// When the first call was sent: Redis' clock read each wait at or after
    /// it, so `sent + wait` is never later than the moment a request passes.
    sent: Instant,
}

/// One request's subjects as they are being decided.
pub(super) struct Pass<'g, 'r> {
    groups: &'g [SubjectGroup<'r>],
    tags: Vec<String>,
    /// The reply and store of each subject decided so far (allowed).
    pub(super) decided: Vec<(SubjectReply, Store)>,
    /// Each subject's lease signature, when its requests may be leased.
    pub(super) sigs: Vec<Option<u64>>,
    /// The request's lease id for concurrency slots (`""`: none needed).
    lease: String,
    /// The clock every call of this request is pinned to (`None`: the
    /// stores' own).
    now_us: Option<u64>,
}

impl<S: SharedStore> Limiter<S> {
    /// Decides a request whose matching rules are `groups`, one subject at
    /// a time (IP first), refunding earlier subjects when a later one
    /// refuses; counts the outcome per rule in the metrics.
    pub(crate) async fn decide<'r>(&self, groups: &[SubjectGroup<'r>]) -> Decision<'r> {
        self.decide_at(groups, None).await
    }

    /// [`Limiter::decide`] with the stores' clock pinned to `now_us` (µs
    /// since the epoch) for every call it makes, refunds included; `None`
    /// is the stores' own clock. The replay decides recorded requests at
    /// their recorded time this way, through the same steps.
    pub(crate) async fn decide_at<'r>(
        &self,
        groups: &[SubjectGroup<'r>],
        now_us: Option<u64>,
    ) -> Decision<'r> {
        let tags: Vec<String> = groups.iter().map(|g| g.subject.tag()).collect();
        let sent = Instant::now();
        let deny = match &self.shared {
            Some(_) => {
                if let Some(refused) = self.cached_refusal(groups, &tags, sent) {
                    return refused;
                }
                Some(DenyMemory {
                    bans_on: self.ban_params().after > 0,
                    sent,
                })
            }
            None => None,
        };
        let needs_lease = groups
            .iter()
            .any(|g| g.rules.iter().any(|r| r.is_concurrency()));
        let mut pass = Pass {
            groups,
            tags,
            decided: Vec::with_capacity(groups.len()),
            sigs: Vec::with_capacity(groups.len()),
            lease: if needs_lease {
                new_lease_id()
            } else {
                String::new()
            },
            now_us,
        };
        for (i, g) in groups.iter().enumerate() {
            // Leased tokens: admitted from this node's lease, or a call that
            // may take one (see `tokens`).
            let sig = self.lease_signature(&pass.tags[i], g);
            let mut count = 1;
            if let Some(sig) = sig {
                match self.tokens.take(&pass.tags[i], sig, Instant::now()) {
                    Take::Admit(admitted) => {
                        self.metrics.decisions.redis.increment(1);
                        self.admit_from_lease(&mut pass, sig, admitted);
                        continue;
                    }
                    Take::TopUp(admitted, want) => {
                        self.metrics.decisions.redis.increment(1);
                        self.top_up(&pass.tags[i], sig, g, want, now_us).await;
                        self.admit_from_lease(&mut pass, sig, admitted);
                        continue;
                    }
                    Take::Ask(n) => count = n,
                }
            }
            let call = SubjectCall {
                tag: &pass.tags[i],
                rules: &g.rules,
                ttl_ms: g.ttl_ms,
                bannable: g.subject.bannable(),
                mode: Mode::Decide,
                now_us,
                lease: &pass.lease,
                count,
                costs: &g.costs,
            };
            let (mut reply, store) = self.decide_subject(&call).await;
            store.counter(&self.metrics.decisions).increment(1);
            if let Some(sig) = sig {
                self.tokens.answered(&pass.tags[i], sig);
            }
            if let (Some(sig), Store::Redis, Status::Limited) = (sig, store, reply.status) {
                // Refused while the node holds tokens Redis charged for
                // this subject (a lease, or one on its way back): used
                // rather than refuse.
                let held = self.tokens.take_held(&pass.tags[i], sig, &reply.buckets);
                if let Some(admitted) = held {
                    self.admit_from_lease(&mut pass, sig, admitted);
                    continue;
                }
            }
            if let (Some(sig), Store::Redis, Status::Allowed) = (sig, store, reply.status) {
                let held = if reply.granted > 1 {
                    // The node holds tokens of this subject now: what it
                    // remembered of its refusals no longer holds.
                    self.deny.forget(&pass.tags[i]);
                    self.metrics.lease_grants.increment(1);
                    self.tokens.granted(
                        &pass.tags[i],
                        sig,
                        g,
                        reply.granted,
                        &reply.buckets,
                        Instant::now(),
                    )
                } else {
                    self.tokens
                        .held(&pass.tags[i], sig, &reply.buckets, Instant::now())
                };
                // This request's headers count the tokens the node holds
                // as the subject's own.
                if held > 0 {
                    for (rule, b) in g.rules.iter().zip(reply.buckets.iter_mut()) {
                        *b = as_of_lease(rule, b, held, Duration::ZERO);
                    }
                }
            }
            pass.sigs.push(sig);
            if store == Store::Deny {
                self.refund(&pass, None).await;
                self.metrics.unavailable.increment(1);
                return Decision::Unavailable;
            }
            match reply.status {
                Status::Allowed => pass.decided.push((reply, store)),
                // (`pass.sigs` has one more entry than `pass.decided` from
                // here on: only the refusing subject's, never read.)
                Status::BannedBefore | Status::BannedNow => {
                    let made = (reply.status == Status::BannedNow).then(|| BanMade {
                        dur_ms: reply.ban_ms,
                        strikes: reply.strikes,
                        reason: refusing_reason(g, &reply),
                        by_redis: store == Store::Redis,
                        redis_answers: self.redis_answers(&pass.tags[i]),
                    });
                    self.refund(&pass, None).await;
                    self.metrics.banned.increment(1);
                    return Decision::Banned {
                        remaining_ms: reply.ban_ms,
                        made,
                    };
                }
                Status::Limited => {
                    if let Some(refused) =
                        self.limited(&pass, i, &reply, store, deny.as_ref()).await
                    {
                        return refused;
                    }
                    // Not a reply either store gives (a refusal without a
                    // refusing rule): charge nothing more and let the other
                    // subjects decide.
                    log::debug!("a refusal of {} without a refusing bucket", pass.tags[i]);
                    pass.decided.push((reply, store));
                }
            }
        }
        self.allowed(pass)
    }

    /// A request the deny cache refuses, with no store call.
    fn cached_refusal<'r>(
        &self,
        groups: &[SubjectGroup<'r>],
        tags: &[String],
        now: Instant,
    ) -> Option<Decision<'r>> {
        let d = self
            .deny
            .refusal(groups, tags, now, |tag| self.tokens.holds(tag))?;
        self.metrics.deny_cache_hits.increment(1);
        d.rule.counters.limited.increment(1);
        Some(Decision::Limited {
            violated: vec![RateInfo {
                rule: d.rule,
                remaining: 0,
                reset_s: ceil_secs(d.to_full.as_micros() as u64),
            }],
            retry_after_s: ceil_secs(d.wait.as_micros() as u64).max(1),
        })
    }

    /// Subject `i` refused: remember the refusal where the deny cache may,
    /// refund the subjects before it (counting a violation for a refusal
    /// of the client's own rules), and answer. `None` when the reply names
    /// no refusing rule.
    async fn limited<'r>(
        &self,
        pass: &Pass<'_, 'r>,
        i: usize,
        reply: &SubjectReply,
        store: Store,
        deny: Option<&DenyMemory>,
    ) -> Option<Decision<'r>> {
        let g = &pass.groups[i];
        let mut refusing: Vec<(&'r Rule, BucketReply)> = g
            .rules
            .iter()
            .zip(&reply.buckets)
            .filter(|(_, b)| b.state == BucketState::Refusing)
            .map(|(r, b)| (*r, *b))
            .collect();
        // The longest wait first: it is the one the client sees.
        refusing.sort_by_key(|(_, b)| std::cmp::Reverse(b.wait_us));
        let &(rule, bucket) = refusing.first()?;
        rule.counters.limited.increment(1);
        if let (Some(deny), Store::Redis) = (deny, store) {
            if !(deny.bans_on && g.subject.bannable()) {
                // A rule whose charge the request or its answer changes
                // is never repeated from memory: another request's cost,
                // or a settlement, moves it.
                for (r, b) in refusing.iter().filter(|(r, _)| r.adjust.is_none()) {
                    self.deny.remember(&pass.tags[i], r, b, deny.sent);
                }
            }
        }
        // Only a refusal by the client's own (IP-keyed) rules counts
        // towards its ban: a full global or shared-key bucket is not this
        // client's offence.
        let violation = g.subject.bannable().then_some(&*rule.name);
        if let Some(made) = self.refund(pass, violation).await {
            self.metrics.banned.increment(1);
            return Some(Decision::Banned {
                remaining_ms: made.dur_ms,
                made: Some(made),
            });
        }
        let retry_after_s = ceil_secs(bucket.wait_us.max(1) as u64).max(1);
        Some(Decision::Limited {
            violated: refusing.iter().map(|(r, b)| rate_info(r, b)).collect(),
            retry_after_s,
        })
    }

    /// Every subject allowed: every non-shadow rule gives its headers; the
    /// concurrency slots taken are held until the response ends.
    fn allowed<'r>(&self, pass: Pass<'_, 'r>) -> Decision<'r> {
        let mut applied: Vec<RateInfo<'r>> = Vec::new();
        let mut held = Vec::new();
        let mut reservation = Reservation::new(pass.now_us);
        for ((g, (reply, store)), tag) in pass.groups.iter().zip(&pass.decided).zip(&pass.tags) {
            if *store == Store::Allow {
                for rule in &g.rules {
                    rule.counters.allowed.increment(1);
                }
                continue;
            }
            if g.rules.iter().any(|r| r.adjust.is_some()) {
                reservation.add(tag, *store, g.ttl_ms, charged(g, reply));
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
                    note_shadow_refusal(rule, tag);
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
            id: pass.lease,
            subjects: held,
        });
        Decision::Allowed {
            applied,
            leases,
            reservation,
        }
    }

    /// Decides one subject: on Redis if its shard's breaker is closed and
    /// the cap admits the call, otherwise (or if the call fails after its
    /// retries) as `on_failure` says.
    async fn decide_subject(&self, call: &SubjectCall<'_>) -> (SubjectReply, Store) {
        if self.shared.is_none() {
            return (self.local.decide(call), Store::Local);
        }
        match self.route(call.tag) {
            Route::Fallback => {
                let shard = self.breakers.for_tag(call.tag);
                self.breakers.fell_back(&shard, &"its breaker is open");
            }
            Route::Shared(shared, shard) => {
                if self.cap.admit() {
                    let started = Instant::now();
                    let result = shared.decide(call).await;
                    self.metrics
                        .redis_seconds
                        .record(started.elapsed().as_secs_f64());
                    match result {
                        Ok(reply) => {
                            self.breakers.success(&shard);
                            return (reply, Store::Redis);
                        }
                        Err(e) => {
                            if e.is_a_failed_call() {
                                self.metrics.redis_errors.increment(1);
                                self.breakers.failure(&shard, &e, started);
                            }
                            self.breakers.fell_back(&shard, &e);
                        }
                    }
                }
            }
        }
        match self.on_failure {
            OnFailure::Allow => (SubjectReply::undecided(), Store::Allow),
            OnFailure::Deny => (SubjectReply::undecided(), Store::Deny),
            OnFailure::Local => (self.local.decide(call), Store::Local),
        }
    }

    /// Whether the shard holding `tag` answers now (its breaker is closed).
    fn redis_answers(&self, tag: &str) -> bool {
        matches!(self.route(tag), Route::Shared(..))
    }

    /// Sends a call to the store that decided the subject.
    pub(super) async fn on_store(
        &self,
        store: Store,
        call: &SubjectCall<'_>,
    ) -> Result<SubjectReply, RedisFailure> {
        match (store, &self.shared) {
            (Store::Redis | Store::Lease, Some(shared)) => shared.decide(call).await,
            _ => DecisionStore::decide(self.local.as_ref(), call).await,
        }
    }

    /// Gives the subjects decided before a refusal back exactly the tokens
    /// they were charged, each on the store that charged it; with `rule`,
    /// the first bannable one also counts a violation (which may ban:
    /// returned).
    async fn refund(&self, pass: &Pass<'_, '_>, rule: Option<&str>) -> Option<BanMade> {
        let mut ban = None;
        // These subjects get tokens back: what this node remembers of their
        // refusals no longer holds.
        for t in &pass.tags[..pass.decided.len()] {
            self.deny.forget(t);
        }
        for (j, (g, (reply, store))) in pass.groups.iter().zip(&pass.decided).enumerate() {
            if !matches!(store, Store::Redis | Store::Local | Store::Lease) {
                continue; // let through undecided: nothing was charged
            }
            // A refund ends the node's leases of the subject: what the lease
            // of these rules still held goes back with this request's share.
            let held = match pass.sigs[j] {
                Some(sig) => self
                    .tokens
                    .end_subject(&pass.tags[j], Some(sig))
                    .map_or(0, |r| r.count),
                None => 0,
            };
            let (charged, costs): (Vec<&Rule>, Vec<i64>) = charged(g, reply).into_iter().unzip();
            // Banned by a later subject: nothing to count, only give back.
            if rule.is_none() && charged.is_empty() {
                continue;
            }
            let call = SubjectCall {
                tag: &pass.tags[j],
                rules: &charged,
                ttl_ms: g.ttl_ms,
                bannable: rule.is_some() && g.subject.bannable(),
                mode: Mode::Refund {
                    rule: rule.unwrap_or(""),
                },
                now_us: pass.now_us,
                lease: &pass.lease,
                count: 1 + held,
                costs: if g.costs.is_empty() { &[] } else { &costs },
            };
            match self.on_store(*store, &call).await {
                Ok(r) if r.status == Status::BannedNow => {
                    ban = Some(BanMade {
                        dur_ms: r.ban_ms,
                        strikes: r.strikes,
                        reason: format!("rule {}", rule.unwrap_or("")),
                        by_redis: matches!(store, Store::Redis | Store::Lease),
                        redis_answers: self.redis_answers(&pass.tags[j]),
                    });
                }
                Ok(_) => {}
                Err(e) => log::warn!("could not refund {} after a refusal: {e}", pass.tags[j]),
            }
        }
        ban
    }
}

/// A shadow rule would have refused: one log line the first time, then at
/// most one per `server.log_throttle` window per rule with the count since
/// (a flood against a rule on trial must not flood the log; every one is in
/// `floodgate_requests_total{decision="shadow_limited"}`).
fn note_shadow_refusal(rule: &Rule, tag: &str) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ("shadow", &*rule.name).hash(&mut h);
    match crate::log_throttle::LOG.admit(h.finish(), Instant::now()) {
        Verdict::Write { repeats: 0 } => {
            log::info!("shadow rule {} would limit {tag}", rule.name)
        }
        Verdict::Write { repeats } => log::info!(
            "shadow rule {} would limit {tag} (and {repeats} more would-be refusals since the last line)",
            rule.name
        ),
        Verdict::Suppress => {}
    }
}

/// The rules of `g` that `reply` charged, with what each was charged.
fn charged<'r>(g: &SubjectGroup<'r>, reply: &SubjectReply) -> Vec<(&'r Rule, i64)> {
    g.rules
        .iter()
        .enumerate()
        .zip(&reply.buckets)
        .filter(|(_, b)| b.state == BucketState::Charged)
        .map(|((i, r), _)| (*r, g.cost_of(i)))
        .collect()
}

fn refusing_reason(g: &SubjectGroup<'_>, reply: &SubjectReply) -> String {
    g.rules
        .iter()
        .zip(&reply.buckets)
        .find(|(_, b)| b.state == BucketState::Refusing)
        .map(|(r, _)| format!("rule {}", r.name))
        .unwrap_or_else(|| "repeated refusals".into())
}
