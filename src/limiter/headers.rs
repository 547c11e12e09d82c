//! The numbers an admitted or refused request's RateLimit headers carry,
//! from a store's reply for one rule: whole tokens, requests or slots left,
//! and the seconds until the rule is whole again.

use super::call::BucketReply;
use crate::policy::{ceil_secs, Limit};
use crate::rules::Rule;

/// The numbers of the RateLimit headers, for one rule.
#[derive(Debug, Clone)]
pub(crate) struct RateInfo<'r> {
    pub(crate) rule: &'r Rule,
    /// Whole tokens, requests or slots left.
    pub(crate) remaining: u64,
    /// Whole seconds until the bucket is full or the quota's period ends
    /// (0 for a concurrency cap, which has no reset).
    pub(crate) reset_s: u64,
}

/// The header numbers of one rule's reply (see [`BucketReply`]).
pub(crate) fn rate_info<'r>(rule: &'r Rule, b: &BucketReply) -> RateInfo<'r> {
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
