//! The contracts of the ban scripts, typed, in one place: `lua/ban.lua`
//! (an operator's ban, or the record of an automatic one), `lua/unban.lua`
//! and `lua/inspect.lua` (a subject's ban, read without writing). Each
//! takes the subject's ban record and state hash, which share a hash tag.

use redis::FromRedisValue;

use crate::keys;
use crate::redis_link::{scripts, RedisFailure, RedisLink};

/// What `ban.lua` writes.
pub(super) struct BanWrite<'a> {
    pub(crate) dur_ms: u64,
    pub(crate) reason: &'a str,
    /// `ban.memory`: how long the strikes outlive the ban.
    pub(crate) memory_ms: u64,
    /// `manual`, or `auto` for an automatic ban's record or a write-back.
    pub(crate) source: &'a str,
    /// The least strike count the subject has (0 for a manual ban).
    pub(crate) strikes: u32,
    /// Leave a longer ban already in place untouched (write-back, restore).
    pub(crate) keep_longer: bool,
}

/// What `ban.lua` answers: the ban's end and strikes, and Redis' clock.
pub(super) struct BanWritten {
    pub(crate) until_ms: u64,
    pub(crate) strikes: u32,
    pub(crate) now_ms: u64,
}

/// A subject's ban as `inspect.lua` reads it (record and state hash
/// together; the later end and higher strikes win).
pub(super) struct Inspected {
    pub(crate) now_ms: u64,
    /// 0 when the subject has no ban.
    pub(crate) until_ms: u64,
    pub(crate) strikes: u32,
    pub(crate) reason: String,
    pub(crate) source: String,
}

fn subject_keys(prefix: &str, tag: &str) -> [String; 2] {
    [keys::ban(prefix, tag), keys::state(prefix, tag)]
}

/// Runs `ban.lua` for the subject `tag`.
pub(super) async fn write(
    link: &RedisLink,
    prefix: &str,
    tag: &str,
    ban: &BanWrite<'_>,
) -> Result<BanWritten, RedisFailure> {
    let [k1, k2] = subject_keys(prefix, tag);
    let v = link
        .eval(
            &scripts::BAN,
            &[&k1, &k2],
            |c| {
                c.arg(ban.dur_ms)
                    .arg(ban.reason)
                    .arg(ban.memory_ms)
                    .arg(ban.source)
                    .arg(ban.strikes)
                    .arg(if ban.keep_longer { "1" } else { "0" });
            },
            link.admin_timeout(),
        )
        .await?;
    let (until_ms, strikes, now_ms): (u64, u32, u64) = FromRedisValue::from_redis_value(v)?;
    Ok(BanWritten {
        until_ms,
        strikes,
        now_ms,
    })
}

/// Runs `unban.lua` for the subject `tag`: true if a ban was lifted.
pub(super) async fn lift(link: &RedisLink, prefix: &str, tag: &str) -> Result<bool, RedisFailure> {
    let [k1, k2] = subject_keys(prefix, tag);
    let v = link
        .eval(&scripts::UNBAN, &[&k1, &k2], |_| {}, link.admin_timeout())
        .await?;
    let n: i64 = FromRedisValue::from_redis_value(v)?;
    Ok(n == 1)
}

/// Runs `inspect.lua` for the subject `tag`. Its reply is
/// `{now_us, until_ms, strikes, reason, source, at_ms, dur_ms}` as strings,
/// `''` where absent.
pub(super) async fn inspect(
    link: &RedisLink,
    prefix: &str,
    tag: &str,
) -> Result<Inspected, RedisFailure> {
    let [k1, k2] = subject_keys(prefix, tag);
    let v = link
        .eval(&scripts::INSPECT, &[&k1, &k2], |_| {}, link.admin_timeout())
        .await?;
    let f: Vec<String> = FromRedisValue::from_redis_value(v)?;
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    Ok(Inspected {
        now_ms: num(0).unwrap_or(0) / 1000,
        until_ms: num(1).unwrap_or(0),
        strikes: num(2).unwrap_or(0) as u32,
        reason: f.get(3).cloned().unwrap_or_default(),
        source: f.get(4).cloned().unwrap_or_default(),
    })
}
