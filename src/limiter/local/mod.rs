//! The in-process store: the same decision as `lua/decide.lua`, per node.
//!
//! Used when no Redis is configured, and as the fallback while Redis is
//! unavailable (`on_failure = "local"`). It is a line-by-line port of the
//! script (same GCRA integers, same violation window, same escalation), so
//! both stores decide identically on the same traffic; a differential test
//! holds them to it.
//!
//! Why not `governor`'s keyed limiter: it decides one rule per call and
//! cannot give tokens back, so it cannot decide a subject's rules
//! all-or-nothing, which SPEC §3 requires. The math here is governor's GCRA.
//!
//! Memory is bounded: subjects live in sharded maps, idle ones are swept
//! (like Redis TTLs), and each shard holds at most `max_subjects / shards`
//! entries; past that the eighth closest to expiry is evicted at once
//! (banned subjects last).

mod admin;
mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

pub(crate) use admin::LocalBan;
use state::{make_room, SubjectState, Written};

use super::call::{
    BanParams, BucketReply, BucketState, DecisionStore, Mode, Status, SubjectCall, SubjectReply,
};
use super::slots::LeaseCall;
use crate::policy::Limit;
use crate::redis_link::RedisFailure;

const SHARDS: usize = 32;

/// The in-process decision store.
pub struct LocalStore {
    shards: Vec<Mutex<HashMap<String, SubjectState>>>,
    /// Escalation settings; a reload replaces them.
    ban: ArcSwap<BanParams>,
    per_shard: usize,
    /// Bans made while Redis was unavailable, to write back when it returns
    /// (kept only when there is a Redis to write them to; capped).
    made: Mutex<std::collections::VecDeque<LocalBan>>,
    remember_bans: bool,
}

/// Bans remembered for write-back at most; older ones are dropped first.
const MAX_REMEMBERED_BANS: usize = 100_000;

impl LocalStore {
    /// `remember_bans`: keep the bans this store makes for
    /// [`LocalStore::take_made_bans`] (true when it stands in for Redis).
    pub fn new(ban: BanParams, max_subjects: usize, remember_bans: bool) -> LocalStore {
        LocalStore {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            ban: ArcSwap::from_pointee(ban),
            per_shard: (max_subjects / SHARDS).max(16),
            made: Mutex::new(std::collections::VecDeque::new()),
            remember_bans,
        }
    }

    fn shard(&self, tag: &str) -> &Mutex<HashMap<String, SubjectState>> {
        // FNV-1a: stable, cheap, and good enough to spread subjects.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in tag.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
        }
        &self.shards[(h % SHARDS as u64) as usize]
    }

    /// Applies new escalation settings (a reload) to the decisions after it.
    pub(crate) fn set_ban_params(&self, ban: BanParams) {
        self.ban.store(Arc::new(ban));
    }

    /// Decides one subject, exactly as `lua/decide.lua` does.
    pub fn decide(&self, call: &SubjectCall<'_>) -> SubjectReply {
        let ban = **self.ban.load();
        let mut shard = self
            .shard(call.tag)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Read the clock under the lock, so time never runs backwards for a
        // subject between two decisions.
        let now = call.now_us.unwrap_or_else(wall_clock_us);
        let now_ms = now / 1000;
        if !shard.contains_key(call.tag) && shard.len() >= self.per_shard {
            make_room(&mut shard, self.per_shard, now_ms);
        }
        let s = shard.entry(call.tag.to_string()).or_default();
        s.expire(now_ms);

        if call.bannable
            && matches!(call.mode, Mode::Decide | Mode::TopUp)
            && s.ban_until_ms > now_ms
        {
            return SubjectReply {
                status: Status::BannedBefore,
                ban_ms: s.ban_until_ms - now_ms,
                strikes: s.strikes,
                until_ms: s.ban_until_ms,
                granted: 0,
                buckets: Vec::new(),
            };
        }
        let now_s = now / 1_000_000;
        let units = granted_units(s, call, now, now_s);
        // A top-up is a decision for what it is granted, or a peek.
        let topped;
        let call = match call.mode {
            Mode::TopUp => {
                topped = SubjectCall {
                    mode: if units == 0 { Mode::Peek } else { Mode::Decide },
                    ..call.clone()
                };
                &topped
            }
            _ => call,
        };

        let mut buckets = Vec::with_capacity(call.rules.len());
        let mut written = Vec::with_capacity(call.rules.len());
        let mut refused: Option<&str> = None;
        // What the script's `#x` holds: the state lives at least as long as
        // it was to, this call's idle TTL, and the end of ban memory while
        // strikes are remembered; never brought forward.
        let mut keep = s.state_expires_ms.max(now_ms + call.ttl_ms);
        if s.ban_expires_ms > now_ms {
            keep = keep.max(s.ban_expires_ms);
        }
        let settle = call.mode == Mode::Settle;
        for (i, rule) in call.rules.iter().enumerate() {
            // A settlement's signed difference (see `Mode::Settle`).
            let delta = call.cost_of(i, rule.limit.cost());
            let cost_of = |own: u32| {
                if call.mode == Mode::Peek || settle {
                    0
                } else {
                    call.cost_of(i, own).max(0) as u64 * u64::from(units)
                }
            };
            let (pass, room, wait, value) = match rule.limit {
                Limit::Rate(b) => {
                    let t = b.interval_us;
                    let cap = t * u64::from(b.burst);
                    let cost = t * cost_of(b.cost);
                    let stored = s
                        .tats
                        .iter()
                        .find(|(n, _)| **n == *rule.name)
                        .map(|(_, v)| *v);
                    let mut tat = stored.unwrap_or(now).max(now);
                    let pass = match call.mode {
                        Mode::Settle => {
                            let moved = tat as i64 + delta * t as i64;
                            tat = (moved.max(now as i64)) as u64;
                            // A debt is kept until it is paid.
                            keep = keep.max(tat / 1000 + 1);
                            true
                        }
                        Mode::Refund { .. } => {
                            tat = tat.saturating_sub(cost).max(now);
                            true
                        }
                        _ if tat + cost - now <= cap => {
                            tat += cost;
                            true
                        }
                        _ => false,
                    };
                    let room = cap as i64 - (tat - now) as i64;
                    let wait = if pass {
                        (tat - now) as i64
                    } else {
                        (tat + cost) as i64 - cap as i64 - now as i64
                    };
                    (pass, room, wait, Written::Tat(tat))
                }
                Limit::Quota(q) => {
                    let (start, stop) = q.period.bounds(now_s);
                    let cost = cost_of(q.cost);
                    let mut count = s
                        .quotas
                        .iter()
                        .find(|(n, ..)| **n == *rule.name)
                        .filter(|(_, st, _)| *st == start)
                        .map(|(.., c)| *c)
                        .unwrap_or(0);
                    let pass = match call.mode {
                        Mode::Settle => {
                            count = (count as i64 + delta).max(0) as u64;
                            true
                        }
                        Mode::Refund { .. } => {
                            count = count.saturating_sub(cost);
                            true
                        }
                        _ if count + cost <= q.quota => {
                            count += cost;
                            true
                        }
                        _ => false,
                    };
                    // The counter lives at least until its period ends.
                    keep = keep.max(stop * 1000);
                    let wait = (stop * 1_000_000) as i64 - now as i64;
                    (
                        pass,
                        q.quota as i64 - count as i64,
                        wait,
                        Written::Quota { start, count },
                    )
                }
                Limit::Concurrency(c) => {
                    let cost = if call.mode == Mode::Peek { 0 } else { 1 };
                    let set = s.lease_set(&rule.name);
                    let mut count = set.live(now);
                    let pass = match call.mode {
                        Mode::Refund { .. } => {
                            if let Some(at) =
                                set.members.iter().position(|(id, _)| id == call.lease)
                            {
                                let (_, expiry) = set.members.swap_remove(at);
                                if expiry > now {
                                    count -= 1;
                                }
                            }
                            true
                        }
                        _ if count + cost <= u64::from(c.max) => {
                            count += cost;
                            true
                        }
                        _ => false,
                    };
                    let wait = if pass { 0 } else { 1_000_000 };
                    (
                        pass,
                        i64::from(c.max) - count as i64,
                        wait,
                        Written::Lease { ms: c.lease_ms },
                    )
                }
            };
            let state = if pass {
                BucketState::Charged
            } else if rule.shadow {
                BucketState::ShadowRefusing
            } else {
                if refused.is_none() {
                    refused = Some(&rule.name);
                }
                BucketState::Refusing
            };
            written.push(value);
            buckets.push(BucketReply {
                state,
                room_us: room,
                wait_us: wait,
            });
        }
        if call.mode == Mode::Peek {
            return SubjectReply {
                status: Status::Allowed,
                ban_ms: 0,
                strikes: 0,
                until_ms: 0,
                granted: units,
                buckets,
            };
        }
        let write = |s: &mut SubjectState, only_charged: bool| {
            let mut hash_written = false;
            for ((rule, reply), value) in call.rules.iter().zip(&buckets).zip(&written) {
                if only_charged && reply.state != BucketState::Charged {
                    continue;
                }
                match *value {
                    Written::Tat(tat) => {
                        hash_written = true;
                        match s.tats.iter_mut().find(|(n, _)| **n == *rule.name) {
                            Some(slot) => slot.1 = tat,
                            None => s.tats.push((rule.name.clone(), tat)),
                        }
                    }
                    Written::Quota { start, count } => {
                        hash_written = true;
                        match s.quotas.iter_mut().find(|(n, ..)| **n == *rule.name) {
                            Some(slot) => (slot.1, slot.2) = (start, count),
                            None => s.quotas.push((rule.name.clone(), start, count)),
                        }
                    }
                    // A refund released the lease while evaluating.
                    Written::Lease { .. } if !only_charged => {}
                    Written::Lease { ms } => {
                        let set = s.lease_set(&rule.name);
                        set.members.retain(|(id, e)| *e > now && id != call.lease);
                        set.members.push((call.lease.to_string(), now + ms * 1000));
                        set.expires_ms = now_ms + ms;
                    }
                }
            }
            if !hash_written {
                return;
            }
            // Never cut short an open violation window (as the script).
            let window_end = match s.window {
                Some((vs, _)) if call.bannable && ban.after > 0 && only_charged => {
                    vs + ban.within_ms
                }
                _ => 0,
            };
            s.state_expires_ms = keep.max(window_end);
        };

        let mut reply = SubjectReply {
            status: Status::Allowed,
            ban_ms: 0,
            strikes: 0,
            until_ms: 0,
            granted: units,
            buckets: Vec::new(),
        };
        let refused_rule = match call.mode {
            // (A top-up was made a decision or a peek above.)
            Mode::Decide | Mode::Peek | Mode::TopUp => match refused {
                None => {
                    write(s, true);
                    reply.buckets = buckets;
                    return reply;
                }
                Some(r) => r.to_string(),
            },
            Mode::Refund { rule } => {
                write(s, false);
                rule.to_string()
            }
            Mode::Settle => {
                write(s, false);
                reply.buckets = buckets;
                return reply;
            }
        };

        reply.status = Status::Limited;
        if !call.bannable || ban.after == 0 {
            reply.buckets = buckets;
            return reply;
        }
        let (mut vs, mut vc) = s.window.unwrap_or((now_ms, 0));
        if s.window.is_none() || now_ms.saturating_sub(vs) >= ban.within_ms {
            vs = now_ms;
            vc = 0;
        }
        vc += 1;
        if vc < ban.after {
            s.window = Some((vs, vc));
            s.state_expires_ms = keep.max(vs + ban.within_ms);
            reply.buckets = buckets;
            return reply;
        }
        s.strikes += 1;
        let dur = ban.duration_for(s.strikes);
        s.ban_until_ms = now_ms + dur;
        s.reason = format!("rule {refused_rule}");
        s.source = "auto";
        s.ban_at_ms = now_ms;
        s.ban_dur_ms = dur;
        s.ban_expires_ms = now_ms + dur + ban.memory_ms;
        s.state_expires_ms = keep.max(s.ban_expires_ms);
        s.window = None;
        if self.remember_bans {
            let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
            if made.len() >= MAX_REMEMBERED_BANS {
                made.pop_front();
            }
            made.push_back(LocalBan {
                tag: call.tag.to_string(),
                until_ms: s.ban_until_ms,
                strikes: s.strikes,
                reason: s.reason.clone(),
                source: "auto",
                dur_ms: dur,
            });
        }
        reply.status = Status::BannedNow;
        reply.ban_ms = dur;
        reply.strikes = s.strikes;
        reply.until_ms = s.ban_until_ms;
        reply.buckets = buckets;
        reply
    }
}

impl DecisionStore for LocalStore {
    fn decide(
        &self,
        call: &SubjectCall<'_>,
    ) -> impl std::future::Future<Output = Result<SubjectReply, RedisFailure>> {
        std::future::ready(Ok(LocalStore::decide(self, call)))
    }

    fn leases(
        &self,
        call: &LeaseCall<'_>,
    ) -> impl std::future::Future<Output = Result<u32, RedisFailure>> {
        std::future::ready(Ok(LocalStore::leases(self, call)))
    }
}

/// Microseconds since the Unix epoch, from this machine's clock.
pub(crate) fn wall_clock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The requests a call is for, as `decide.lua` works them out: a decision
/// asking for `count` > 1 (a lease) gets at most half of what every rule
/// has left, at least 1; shadow rules and concurrency caps are never
/// leased; a refund gives back exactly `count`; a peek is for one.
fn granted_units(s: &SubjectState, call: &SubjectCall<'_>, now: u64, now_s: u64) -> u32 {
    match call.mode {
        Mode::Refund { .. } => return call.count.max(1),
        Mode::Settle => return 1,
        Mode::Peek => return 1,
        Mode::Decide if call.count <= 1 => return 1,
        Mode::Decide | Mode::TopUp => {}
    }
    let mut units = u64::from(call.count);
    for rule in call.rules {
        let fits = match rule.limit {
            _ if rule.shadow => 1,
            Limit::Rate(b) if b.cost >= 1 => {
                let t = b.interval_us;
                let tat = s
                    .tats
                    .iter()
                    .find(|(n, _)| **n == *rule.name)
                    .map_or(now, |(_, v)| *v)
                    .max(now);
                (t * u64::from(b.burst)).saturating_sub(tat - now) / (t * u64::from(b.cost))
            }
            Limit::Quota(q) if q.cost >= 1 => {
                let (start, _) = q.period.bounds(now_s);
                let count = s
                    .quotas
                    .iter()
                    .find(|(n, ..)| **n == *rule.name)
                    .filter(|(_, st, _)| *st == start)
                    .map_or(0, |(.., c)| *c);
                q.quota.saturating_sub(count) / u64::from(q.cost)
            }
            _ => 1,
        };
        units = units.min(fits / 2);
    }
    if call.mode == Mode::TopUp {
        // Nothing to spare is nothing granted.
        return units as u32;
    }
    units.max(1) as u32
}
