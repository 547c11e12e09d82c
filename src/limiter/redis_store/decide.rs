//! The contract of `lua/decide.lua` and `lua/decide_batch.lua`, in one
//! place: the keys and arguments of one subject's call (see the script's
//! header), the framing of several subjects into one batch call, and the
//! reply read back into a [`SubjectReply`].

use std::time::Duration;

use redis::Value;

use crate::keys;
use crate::limiter::call::{
    BanParams, BucketReply, BucketState, Mode, Status, SubjectCall, SubjectReply,
};
use crate::policy::Limit;
use crate::redis_link::{scripts, RedisFailure, RedisLink};

/// Escalation settings and ARGV[5..10] of `decide.lua`, rendered once.
pub(super) struct BanArgs {
    argv: [String; 6],
}

impl BanArgs {
    pub(super) fn new(ban: BanParams) -> BanArgs {
        BanArgs {
            argv: [
                ban.after.to_string(),
                ban.within_ms.to_string(),
                ban.duration_ms.to_string(),
                ban.factor.to_string(),
                ban.max_ms.to_string(),
                ban.memory_ms.to_string(),
            ],
        }
    }
}

/// One subject's `decide.lua` call: its keys and arguments, rendered once
/// so that the call can wait in a batch without borrowing from the request.
#[derive(Debug, Clone)]
pub(super) struct DecideCall {
    keys: Vec<String>,
    args: Vec<String>,
}

impl DecideCall {
    /// KEYS: the state hash, then one lease set per concurrency rule.
    /// ARGV: now, mode, idle TTL, bannable, the six escalation settings,
    /// the lease id, the requests the call is for, then six per rule.
    pub(super) fn render(prefix: &str, call: &SubjectCall<'_>, ban: &BanArgs) -> DecideCall {
        let mut keys = Vec::with_capacity(1);
        keys.push(keys::state(prefix, call.tag));
        keys.extend(
            call.rules
                .iter()
                .filter(|r| r.is_concurrency())
                .map(|r| keys::lease(prefix, call.tag, &r.name)),
        );
        let mut args = Vec::with_capacity(12 + call.rules.len() * 6);
        args.push(call.now_us.map(|t| t.to_string()).unwrap_or_default());
        // One request whose rules are all token buckets, none in shadow
        // mode: the script's shorter path (the same decision).
        let lean = call.count <= 1
            && call.costs.is_empty()
            && call
                .rules
                .iter()
                .all(|r| matches!(r.limit, Limit::Rate(_)) && !r.shadow);
        args.push(match call.mode {
            Mode::Decide if lean => "b".to_string(),
            Mode::Decide => "d".to_string(),
            Mode::Peek => "p".to_string(),
            Mode::TopUp => "t".to_string(),
            Mode::Settle => "s".to_string(),
            Mode::Refund { rule } => format!("r:{rule}"),
        });
        args.push(call.ttl_ms.to_string());
        args.push(if call.bannable { "1" } else { "0" }.to_string());
        args.extend(ban.argv.iter().cloned());
        args.push(call.lease.to_string());
        args.push(call.count.max(1).to_string());
        for (i, rule) in call.rules.iter().enumerate() {
            args.push(rule.name.to_string());
            let [kind, a, b, c] = match rule.limit {
                Limit::Rate(b) => [
                    "r".to_string(),
                    b.interval_us.to_string(),
                    b.burst.to_string(),
                    call.cost_of(i, b.cost).to_string(),
                ],
                Limit::Quota(q) => [
                    "q".to_string(),
                    q.period.code().to_string(),
                    q.quota.to_string(),
                    call.cost_of(i, q.cost).to_string(),
                ],
                Limit::Concurrency(c) => [
                    "c".to_string(),
                    c.lease_ms.to_string(),
                    c.max.to_string(),
                    "1".to_string(),
                ],
            };
            args.extend([kind, a, b, c]);
            args.push(if rule.shadow { "1" } else { "0" }.to_string());
        }
        DecideCall { keys, args }
    }

    /// Sends this call alone (EVALSHA of `decide.lua`), within `limit`.
    pub(super) async fn send(
        &self,
        link: &RedisLink,
        limit: Duration,
    ) -> Result<Value, RedisFailure> {
        let keys: Vec<&str> = self.keys.iter().map(String::as_str).collect();
        link.eval_at_most_once(
            &scripts::DECIDE,
            &keys,
            |cmd| {
                cmd.arg(&self.args[..]);
            },
            limit,
        )
        .await
    }
}

/// Sends several subjects' calls as one `decide_batch.lua` call: KEYS are
/// every subject's keys in turn; ARGV is the number of subjects, then per
/// subject its number of keys, its number of arguments and its arguments.
/// The reply is one `decide.lua` reply per subject, in order.
pub(super) async fn send_batch(
    link: &RedisLink,
    calls: &[&DecideCall],
    limit: Duration,
) -> Result<Vec<Value>, RedisFailure> {
    let mut keys: Vec<&str> = Vec::new();
    for c in calls {
        keys.extend(c.keys.iter().map(String::as_str));
    }
    let value = link
        .eval_at_most_once(
            &scripts::DECIDE_BATCH,
            &keys,
            |cmd| {
                cmd.arg(calls.len());
                for c in calls {
                    cmd.arg(c.keys.len()).arg(c.args.len()).arg(&c.args[..]);
                }
            },
            limit,
        )
        .await?;
    match value {
        Value::Array(replies) if replies.len() == calls.len() => Ok(replies),
        _ => Err(unexpected("decide_batch.lua returned an unexpected reply")),
    }
}

/// A reply no version of the script gives.
pub(super) fn unexpected(what: &'static str) -> RedisFailure {
    RedisFailure::Redis(redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        what,
    )))
}

/// Reads `decide.lua`'s reply: `{status, ban_ms, strikes, until_ms,
/// granted}` and three numbers per rule (state, room, wait).
pub(super) fn parse_reply(v: &Value) -> Option<SubjectReply> {
    let Value::Array(items) = v else { return None };
    if items.len() < 5 || (items.len() - 5) % 3 != 0 {
        return None;
    }
    let status = match int(&items[0])? {
        0 => Status::Allowed,
        1 => Status::Limited,
        2 => Status::BannedBefore,
        3 => Status::BannedNow,
        _ => return None,
    };
    let mut buckets = Vec::with_capacity((items.len() - 5) / 3);
    for chunk in items[5..].chunks(3) {
        let state = match int(&chunk[0])? {
            0 => BucketState::Charged,
            1 => BucketState::Refusing,
            _ => BucketState::ShadowRefusing,
        };
        buckets.push(BucketReply {
            state,
            room_us: int(&chunk[1])?,
            wait_us: int(&chunk[2])?,
        });
    }
    Some(SubjectReply {
        status,
        ban_ms: int(&items[1])?.max(0) as u64,
        strikes: int(&items[2])?.max(0) as u32,
        until_ms: int(&items[3])?.max(0) as u64,
        granted: int(&items[4])?.max(0) as u32,
        buckets,
    })
}

/// An integer reply, or a whole number sent as a string.
pub(super) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}
