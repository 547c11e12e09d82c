//! The Redis store: `lua/decide.lua` (and `lua/lease.lua` for the slots of
//! requests in flight) over the shared connection.

use std::sync::Arc;

use redis::Value;

use super::{
    BanParams, BucketReply, BucketState, DecisionStore, LeaseCall, Mode, Status, SubjectCall,
    SubjectReply,
};
use crate::keys;
use crate::redis_link::{scripts, RedisFailure, RedisLink};
use crate::rules::Limit;

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
        let ban = keys::ban(&self.prefix, call.tag);
        let leases: Vec<String> = call
            .rules
            .iter()
            .filter(|r| r.is_concurrency())
            .map(|r| keys::lease(&self.prefix, call.tag, &r.name))
            .collect();
        let mut key_list: Vec<&str> = Vec::with_capacity(2 + leases.len());
        key_list.push(&state);
        key_list.push(&ban);
        key_list.extend(leases.iter().map(String::as_str));
        let refund_mode;
        let mode = match call.mode {
            Mode::Decide => "d",
            Mode::Peek => "p",
            Mode::Refund { rule } => {
                refund_mode = format!("r:{rule}");
                refund_mode.as_str()
            }
        };
        let value = self
            .link
            .eval(
                &scripts::DECIDE,
                &key_list,
                |cmd| {
                    match call.now_us {
                        Some(t) => cmd.arg(t),
                        None => cmd.arg(""),
                    };
                    cmd.arg(mode)
                        .arg(call.ttl_ms)
                        .arg(if call.bannable { "1" } else { "0" })
                        .arg(&self.ban_args[..])
                        .arg(call.lease);
                    for rule in call.rules {
                        cmd.arg(&*rule.name);
                        match rule.limit {
                            Limit::Rate(b) => {
                                cmd.arg("r").arg(b.interval_us).arg(b.burst).arg(b.cost)
                            }
                            Limit::Quota(q) => {
                                cmd.arg("q").arg(q.period.code()).arg(q.quota).arg(q.cost)
                            }
                            Limit::Concurrency(c) => cmd.arg("c").arg(c.lease_ms).arg(c.max).arg(1),
                        };
                        cmd.arg(if rule.shadow { "1" } else { "0" });
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
