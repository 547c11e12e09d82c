//! The contract of `lua/lease.lua`: renew or release one request's
//! concurrency slots of one subject.

use redis::Value;

use super::decide::int;
use crate::keys;
use crate::limiter::slots::LeaseCall;
use crate::redis_link::{scripts, RedisFailure, RedisLink};

/// KEYS: the subject's lease sets, one per slot. ARGV: now (or `''` for
/// Redis' clock), `k` (keep) or `x` (release), the lease id, then each
/// set's lease length in ms. Returns how many sets still hold the lease.
pub(super) async fn send(
    link: &RedisLink,
    prefix: &str,
    call: &LeaseCall<'_>,
) -> Result<u32, RedisFailure> {
    let keys: Vec<String> = call
        .slots
        .iter()
        .map(|s| keys::lease(prefix, call.tag, &s.rule))
        .collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let value: Value = link
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
            link.admin_timeout(),
        )
        .await?;
    Ok(int(&value).unwrap_or(0).max(0) as u32)
}
