//! The Redis store: `lua/decide.lua` over the shared connection, one key
//! per subject (see the script's header).

use std::sync::Arc;

use redis::Value;

use super::{
    BanParams, BucketReply, BucketState, DecisionStore, Mode, Status, SubjectCall, SubjectReply,
};
use crate::keys;
use crate::redis_link::{scripts, RedisFailure, RedisLink};

/// Decides subjects with one EVALSHA each.
pub struct RedisStore {
    link: Arc<RedisLink>,
    prefix: String,
    ban: BanParams,
    /// ARGV[5..10], rendered once.
    ban_args: [String; 6],
}

impl RedisStore {
    pub fn new(link: Arc<RedisLink>, ban: BanParams) -> RedisStore {
        let prefix = link.config().key_prefix.clone();
        let ban_args = [
            ban.after.to_string(),
            ban.within_ms.to_string(),
            ban.duration_ms.to_string(),
            ban.factor.to_string(),
            ban.max_ms.to_string(),
            ban.memory_ms.to_string(),
        ];
        RedisStore {
            link,
            prefix,
            ban,
            ban_args,
        }
    }

    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn ban_params(&self) -> &BanParams {
        &self.ban
    }

    async fn call(&self, call: &SubjectCall<'_>) -> Result<SubjectReply, RedisFailure> {
        let state = keys::state(&self.prefix, call.tag);
        let refund_mode;
        let mode = match call.mode {
            Mode::Decide => "d",
            Mode::Refund { rule } => {
                refund_mode = format!("r:{rule}");
                refund_mode.as_str()
            }
        };
        let value = self
            .link
            .eval(
                &scripts::DECIDE,
                &[&state],
                |cmd| {
                    match call.now_us {
                        Some(t) => cmd.arg(t),
                        None => cmd.arg(""),
                    };
                    cmd.arg(mode)
                        .arg(call.ttl_ms)
                        .arg(if call.bannable { "1" } else { "0" })
                        .arg(&self.ban_args[..]);
                    for rule in call.rules {
                        let b = rule.bucket;
                        cmd.arg(&*rule.name)
                            .arg(b.interval_us)
                            .arg(b.burst)
                            .arg(b.cost)
                            .arg(if rule.shadow { "1" } else { "0" });
                    }
                },
                self.link.config().timeout,
            )
            .await?;
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
