//! What one store call takes and answers: a subject, its rules and the
//! mode ([`SubjectCall`]), and each rule's state after it
//! ([`SubjectReply`]). Both stores speak exactly this, the Redis one
//! through `lua/decide.lua`, the local one in process, so the decision
//! above them never knows which store it asked.

use std::future::Future;
use std::time::Duration;

use super::slots::LeaseCall;
use crate::config::BanConfig;
use crate::redis_link::RedisFailure;
use crate::rules::Rule;

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
    pub(crate) fn duration_for(&self, strikes: u32) -> u64 {
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
    /// nothing (the admin API's view of a consumer or a bucket).
    Peek,
    /// A request admitted from tokens this node holds asks for up to
    /// `count` more for its lease: charged like a decision when the
    /// subject can spare them (at most half of what every rule has left),
    /// otherwise a peek that grants 0. Never a refusal, so never a
    /// violation: the request itself was charged when its lease was.
    TopUp,
    /// An admitted request's answer told its real cost: each rule's cost
    /// in `costs` is the difference from what was charged, signed (a
    /// refund when negative, a charge when positive, even past the limit:
    /// a debt the subject's next requests wait out). Never a refusal.
    Settle,
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
    /// Requests this call is for. Deciding: at most this many (a lease of
    /// tokens; the store grants no more than half of what every rule has
    /// left, and 1 near the limit). Refunding: exactly this many.
    pub count: u32,
    /// Each rule's cost for this call, in the order of `rules` (a cost
    /// the request named, or a settlement's signed difference); empty:
    /// every rule's own `cost`.
    pub costs: &'a [i64],
}

impl SubjectCall<'_> {
    /// The cost of rule `i` in this call (see `costs`).
    pub(crate) fn cost_of(&self, i: usize, own: u32) -> i64 {
        self.costs.get(i).copied().unwrap_or(i64::from(own))
    }
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
    /// Requests charged by a decision (1 unless a lease was asked for and
    /// granted); 0 when nothing was decided.
    pub granted: u32,
    pub buckets: Vec<BucketReply>,
}

impl SubjectReply {
    /// A subject let through without asking any store
    /// (`on_failure = "allow"` or `"deny"`): nothing charged, no headers.
    pub(crate) fn undecided() -> SubjectReply {
        SubjectReply {
            status: Status::Allowed,
            ban_ms: 0,
            strikes: 0,
            until_ms: 0,
            granted: 0,
            buckets: Vec::new(),
        }
    }
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

/// The store every node shares (Redis), as the limiter needs it beyond
/// decisions. A trait so that the limiter's own logic (store choice,
/// refunds, escalation, the deny cache) is tested in process against a
/// scripted store.
pub(crate) trait SharedStore: DecisionStore {
    /// One call's budget (`redis.timeout`).
    fn call_timeout(&self) -> Duration;

    /// Whether the store answers now.
    fn ping(&self) -> impl Future<Output = Result<(), RedisFailure>>;

    /// Applies new escalation settings (a reload) to the calls after it.
    fn set_ban_params(&self, ban: BanParams);
}
