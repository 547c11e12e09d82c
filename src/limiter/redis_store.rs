//! The Redis store: `lua/decide.lua` over the shared connection, through
//! the worker's [`Coalescer`] on a standalone Redis.

use std::sync::Arc;

use arc_swap::ArcSwap;
use redis::Value;

use super::coalesce::{Coalescer, DecideCall};
use super::{
    BanParams, BucketReply, BucketState, DecisionStore, Mode, Status, SubjectCall, SubjectReply,
};
use crate::keys;
use crate::redis_link::{RedisFailure, RedisLink};

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
        let mut args = Vec::with_capacity(10 + call.rules.len() * 5);
        args.push(call.now_us.map(|t| t.to_string()).unwrap_or_default());
        args.push(match call.mode {
            Mode::Decide => "d".to_string(),
            Mode::Refund { rule } => format!("r:{rule}"),
        });
        args.push(call.ttl_ms.to_string());
        args.push(if call.bannable { "1" } else { "0" }.to_string());
        args.extend(self.ban.load().argv.iter().cloned());
        for rule in call.rules {
            let b = rule.bucket;
            args.push(rule.name.to_string());
            args.push(b.interval_us.to_string());
            args.push(b.burst.to_string());
            args.push(b.cost.to_string());
            args.push(if rule.shadow { "1" } else { "0" }.to_string());
        }
        DecideCall {
            keys: vec![
                keys::state(&self.prefix, call.tag),
                keys::ban(&self.prefix, call.tag),
            ],
            args,
        }
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
}

impl DecisionStore for RedisStore {
    fn decide(
        &self,
        call: &SubjectCall<'_>,
    ) -> impl std::future::Future<Output = Result<SubjectReply, RedisFailure>> {
        self.call(call)
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
