//! The Redis store: `lua/decide.lua` (and `lua/lease.lua` for the slots of
//! requests in flight) over the shared connection, one key per subject
//! apart from lease sets (see the script's header), with decisions going
//! through the worker's [`Coalescer`] on a standalone Redis.

use std::sync::Arc;

use arc_swap::ArcSwap;
use redis::Value;

use super::coalesce::{Coalescer, DecideCall};
use super::{
    BanParams, BucketReply, BucketState, DecisionStore, LeaseCall, Mode, Status, SubjectCall,
    SubjectReply,
};
use crate::keys;
use crate::policy::Limit;
use crate::redis_link::{scripts, RedisFailure, RedisLink};

/// Decides subjects with one EVALSHA each.
pub struct RedisStore {
    link: Arc<RedisLink>,
    prefix: String,
    /// Escalation settings with their script arguments; a reload replaces them.
    ban: ArcSwap<BanArgs>,
    /// Batches concurrent decisions (standalone Redis with `redis.coalesce`).
    coalescer: Option<Coalescer>,
}

/// Escalation settings and ARGV[5..10] of `decide.lua`, rendered once.
struct BanArgs {
    params: BanParams,
    argv: [String; 6],
}

impl BanArgs {
    fn new(ban: BanParams) -> BanArgs {
        BanArgs {
            params: ban,
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

impl RedisStore {
    pub fn new(link: Arc<RedisLink>, ban: BanParams) -> RedisStore {
        let prefix = link.config().key_prefix.clone();
        let coalescer =
            (link.config().coalesce && !link.is_cluster()).then(|| Coalescer::new(link.clone()));
        RedisStore {
            link,
            prefix,
            ban: ArcSwap::from_pointee(BanArgs::new(ban)),
            coalescer,
        }
    }

    /// Applies new escalation settings (a reload) to the calls after it.
    pub fn set_ban_params(&self, ban: BanParams) {
        self.ban.store(Arc::new(BanArgs::new(ban)));
    }

    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn ban_params(&self) -> BanParams {
        self.ban.load().params
    }

    /// One subject's keys and `decide.lua` arguments, rendered once so that
    /// the call can wait in a batch without borrowing from the request.
    fn render(&self, call: &SubjectCall<'_>) -> DecideCall {
        let mut keys = Vec::with_capacity(1);
        keys.push(keys::state(&self.prefix, call.tag));
        keys.extend(
            call.rules
                .iter()
                .filter(|r| r.is_concurrency())
                .map(|r| keys::lease(&self.prefix, call.tag, &r.name)),
        );
        let mut args = Vec::with_capacity(11 + call.rules.len() * 6);
        args.push(call.now_us.map(|t| t.to_string()).unwrap_or_default());
        args.push(match call.mode {
            Mode::Decide => "d".to_string(),
            Mode::Peek => "p".to_string(),
            Mode::Refund { rule } => format!("r:{rule}"),
        });
        args.push(call.ttl_ms.to_string());
        args.push(if call.bannable { "1" } else { "0" }.to_string());
        args.extend(self.ban.load().argv.iter().cloned());
        args.push(call.lease.to_string());
        for rule in call.rules {
            args.push(rule.name.to_string());
            let [kind, a, b, c] = match rule.limit {
                Limit::Rate(b) => [
                    "r".to_string(),
                    b.interval_us.to_string(),
                    b.burst.to_string(),
                    b.cost.to_string(),
                ],
                Limit::Quota(q) => [
                    "q".to_string(),
                    q.period.code().to_string(),
                    q.quota.to_string(),
                    q.cost.to_string(),
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

    async fn call(&self, call: &SubjectCall<'_>) -> Result<SubjectReply, RedisFailure> {
        let rendered = self.render(call);
        let value = match &self.coalescer {
            Some(c) => c.decide(rendered).await?,
            None => rendered.send(&self.link).await?,
        };
        parse_reply(&value).ok_or_else(|| {
            RedisFailure::Redis(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "decide.lua returned an unexpected reply",
            )))
        })
    }

    /// One call's budget (`redis.timeout`).
    pub fn timeout(&self) -> std::time::Duration {
        self.link.config().timeout
    }

    async fn lease_call(&self, call: &LeaseCall<'_>) -> Result<u32, RedisFailure> {
        let keys: Vec<String> = call
            .slots
            .iter()
            .map(|s| keys::lease(&self.prefix, call.tag, &s.rule))
            .collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let value = self
            .link
            .eval(
                &scripts::LEASE,
                &key_refs,
                |cmd| {
                    match call.now_us {
                        Some(t) => cmd.arg(t),
                        None => cmd.arg(""),
                    };
                    cmd.arg(if call.renew { "k" } else { "x" }).arg(call.lease);
                    for s in call.slots {
                        cmd.arg(s.lease_ms);
                    }
                },
                self.link.admin_timeout(),
            )
            .await?;
        Ok(int(&value).unwrap_or(0).max(0) as u32)
    }
}

impl DecisionStore for RedisStore {
    fn decide(
        &self,
        call: &SubjectCall<'_>,
    ) -> impl std::future::Future<Output = Result<SubjectReply, RedisFailure>> {
        self.call(call)
    }

    fn leases(
        &self,
        call: &LeaseCall<'_>,
    ) -> impl std::future::Future<Output = Result<u32, RedisFailure>> {
        self.lease_call(call)
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn parse_reply(v: &Value) -> Option<SubjectReply> {
    let Value::Array(items) = v else { return None };
    if items.len() < 4 || (items.len() - 4) % 3 != 0 {
        return None;
    }
    let status = match int(&items[0])? {
        0 => Status::Allowed,
        1 => Status::Limited,
        2 => Status::BannedBefore,
        3 => Status::BannedNow,
        _ => return None,
    };
    let mut buckets = Vec::with_capacity((items.len() - 4) / 3);
    for chunk in items[4..].chunks(3) {
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
        buckets,
    })
}
