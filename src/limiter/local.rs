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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::{
    BanParams, BucketReply, BucketState, LeaseCall, Mode, Status, SubjectCall, SubjectReply,
};
use crate::policy::Limit;

const SHARDS: usize = 32;

#[derive(Debug, Default)]
struct SubjectState {
    /// (rule name, TAT in µs)
    tats: Vec<(Arc<str>, u64)>,
    /// (rule name, period start in s, count): the quota counters.
    quotas: Vec<(Arc<str>, u64, u64)>,
    /// The lease sets of concurrency rules (their own keys in Redis).
    leases: Vec<LeaseSetState>,
    /// Violation window start (ms) and count.
    window: Option<(u64, u32)>,
    state_expires_ms: u64,
    ban_until_ms: u64,
    strikes: u32,
    reason: String,
    source: &'static str,
    ban_at_ms: u64,
    ban_dur_ms: u64,
    ban_expires_ms: u64,
}

/// One concurrency rule's lease set: lease id -> expiry (µs).
#[derive(Debug)]
struct LeaseSetState {
    rule: Arc<str>,
    members: Vec<(String, u64)>,
    expires_ms: u64,
}

impl LeaseSetState {
    /// Leases still running at `now` (ZCOUNT key (now +inf).
    fn live(&self, now: u64) -> u64 {
        self.members.iter().filter(|(_, e)| *e > now).count() as u64
    }
}

impl SubjectState {
    /// Applies the TTLs a Redis key would have.
    fn expire(&mut self, now_ms: u64) {
        if self.state_expires_ms < now_ms {
            self.tats.clear();
            self.quotas.clear();
            self.window = None;
        }
        if self.ban_expires_ms < now_ms {
            self.ban_until_ms = 0;
            self.strikes = 0;
        }
        self.leases.retain(|l| l.expires_ms >= now_ms);
    }

    fn is_idle(&self, now_ms: u64) -> bool {
        self.state_expires_ms < now_ms
            && self.ban_expires_ms < now_ms
            && self.leases.iter().all(|l| l.expires_ms < now_ms)
    }

    fn lease_set(&mut self, rule: &Arc<str>) -> &mut LeaseSetState {
        let at = match self.leases.iter().position(|l| l.rule == *rule) {
            Some(i) => i,
            None => {
                self.leases.push(LeaseSetState {
                    rule: rule.clone(),
                    members: Vec::new(),
                    expires_ms: 0,
                });
                self.leases.len() - 1
            }
        };
        &mut self.leases[at]
    }
}

/// A rule's new value, as the script would write it.
#[derive(Debug, Clone, Copy)]
enum Written {
    Tat(u64),
    Quota { start: u64, count: u64 },
    Lease { ms: u64 },
}

/// A ban the local store made or holds, as the admin API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalBan {
    pub tag: String,
    pub until_ms: u64,
    pub strikes: u32,
    pub reason: String,
    pub source: &'static str,
    pub dur_ms: u64,
}

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
    pub fn set_ban_params(&self, ban: BanParams) {
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
            // Full: drop idle subjects, then, if still full, an eighth of the
            // shard (those that would expire first), so that the cost of
            // making room is paid once per many new subjects, not per
            // request. Banned subjects are evicted last.
            shard.retain(|_, s| !s.is_idle(now_ms));
            if shard.len() >= self.per_shard * 7 / 8 {
                let mut by_expiry: Vec<(u64, String)> = shard
                    .iter()
                    .map(|(k, s)| {
                        let banned = if s.ban_until_ms > now_ms {
                            u64::MAX / 2
                        } else {
                            0
                        };
                        (
                            s.state_expires_ms
                                .max(s.ban_expires_ms)
                                .saturating_add(banned),
                            k.clone(),
                        )
                    })
                    .collect();
                let drop = (self.per_shard / 8).max(1).min(by_expiry.len() - 1);
                by_expiry.select_nth_unstable_by_key(drop, |(t, _)| *t);
                for (_, k) in by_expiry.into_iter().take(drop) {
                    shard.remove(&k);
                }
            }
        }
        let s = shard.entry(call.tag.to_string()).or_default();
        s.expire(now_ms);

        if call.bannable && matches!(call.mode, Mode::Decide) && s.ban_until_ms > now_ms {
            return SubjectReply {
                status: Status::BannedBefore,
                ban_ms: s.ban_until_ms - now_ms,
                strikes: s.strikes,
                until_ms: s.ban_until_ms,
                buckets: Vec::new(),
            };
        }

        let mut buckets = Vec::with_capacity(call.rules.len());
        let mut written = Vec::with_capacity(call.rules.len());
        let mut refused: Option<&str> = None;
        let mut ttl = call.ttl_ms;
        let now_s = now / 1_000_000;
        for rule in call.rules {
            let cost_of = |c: u64| if call.mode == Mode::Peek { 0 } else { c };
            let (pass, room, wait, value) = match rule.limit {
                Limit::Rate(b) => {
                    let t = b.interval_us;
                    let cap = t * u64::from(b.burst);
                    let cost = t * cost_of(u64::from(b.cost));
                    let stored = s
                        .tats
                        .iter()
                        .find(|(n, _)| **n == *rule.name)
                        .map(|(_, v)| *v);
                    let mut tat = stored.unwrap_or(now).max(now);
                    let pass = match call.mode {
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
                    let cost = cost_of(u64::from(q.cost));
                    let mut count = s
                        .quotas
                        .iter()
                        .find(|(n, ..)| **n == *rule.name)
                        .filter(|(_, st, _)| *st == start)
                        .map(|(.., c)| *c)
                        .unwrap_or(0);
                    let pass = match call.mode {
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
                    ttl = ttl.max((stop - now_s) * 1000);
                    let wait = (stop * 1_000_000) as i64 - now as i64;
                    (
                        pass,
                        q.quota as i64 - count as i64,
                        wait,
                        Written::Quota { start, count },
                    )
                }
                Limit::Concurrency(c) => {
                    let cost = cost_of(1);
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
            s.state_expires_ms = (now_ms + ttl).max(window_end);
        };

        let mut reply = SubjectReply {
            status: Status::Allowed,
            ban_ms: 0,
            strikes: 0,
            until_ms: 0,
            buckets: Vec::new(),
        };
        let refused_rule = match call.mode {
            Mode::Decide | Mode::Peek => match refused {
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
            let keep = (vs + ban.within_ms).saturating_sub(now_ms).max(ttl);
            s.state_expires_ms = now_ms + keep;
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

    /// An operator's ban (no-Redis mode), keeping the strike count.
    pub fn ban(&self, tag: &str, dur_ms: u64, reason: &str, source: &'static str) -> LocalBan {
        let ban = **self.ban.load();
        let now_ms = wall_clock_us() / 1000;
        let mut shard = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
        let s = shard.entry(tag.to_string()).or_default();
        s.expire(now_ms);
        s.ban_until_ms = now_ms + dur_ms;
        s.reason = reason.to_string();
        s.source = source;
        s.ban_at_ms = now_ms;
        s.ban_dur_ms = dur_ms;
        s.ban_expires_ms = now_ms + dur_ms + ban.memory_ms;
        LocalBan {
            tag: tag.to_string(),
            until_ms: s.ban_until_ms,
            strikes: s.strikes,
            reason: s.reason.clone(),
            source,
            dur_ms,
        }
    }

    /// Lifts a ban; true if one was active.
    pub fn unban(&self, tag: &str) -> bool {
        let now_ms = wall_clock_us() / 1000;
        let mut shard = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
        match shard.get_mut(tag) {
            Some(s) if s.ban_until_ms > now_ms => {
                s.ban_until_ms = 0;
                s.window = None;
                true
            }
            _ => false,
        }
    }

    /// Active bans, for the admin API in no-Redis mode.
    pub fn active_bans(&self) -> Vec<LocalBan> {
        let now_ms = wall_clock_us() / 1000;
        let mut out = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (tag, s) in shard.iter() {
                if s.ban_until_ms > now_ms && s.ban_expires_ms > now_ms {
                    out.push(LocalBan {
                        tag: tag.clone(),
                        until_ms: s.ban_until_ms,
                        strikes: s.strikes,
                        reason: s.reason.clone(),
                        source: s.source,
                        dur_ms: s.ban_dur_ms,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.tag.cmp(&b.tag));
        out
    }

    /// Renews or releases one request's leases of one subject, exactly as
    /// `lua/lease.lua` does; returns how many sets still hold it.
    pub fn leases(&self, call: &LeaseCall<'_>) -> u32 {
        let mut shard = self
            .shard(call.tag)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = call.now_us.unwrap_or_else(wall_clock_us);
        let now_ms = now / 1000;
        let Some(s) = shard.get_mut(call.tag) else {
            return 0;
        };
        s.expire(now_ms);
        let mut held = 0;
        for slot in call.slots {
            let Some(set) = s.leases.iter_mut().find(|l| l.rule == slot.rule) else {
                continue;
            };
            if !call.renew {
                set.members.retain(|(id, _)| id != call.lease);
                continue;
            }
            if let Some(m) = set
                .members
                .iter_mut()
                .find(|(id, e)| id == call.lease && *e > now)
            {
                m.1 = now + slot.lease_ms * 1000;
                set.expires_ms = now_ms + slot.lease_ms;
                held += 1;
            }
        }
        held
    }

    /// Tokens left in a rule's bucket without charging it: (room µs, µs to full).
    pub fn peek(
        &self,
        tag: &str,
        rule: &crate::rules::Rule,
        bucket: crate::policy::BucketSpec,
    ) -> (u64, u64) {
        let now = wall_clock_us();
        let shard = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
        let cap = bucket.capacity_us();
        let tat = shard
            .get(tag)
            .filter(|s| s.state_expires_ms > now / 1000)
            .and_then(|s| {
                s.tats
                    .iter()
                    .find(|(n, _)| **n == *rule.name)
                    .map(|(_, t)| *t)
            })
            .unwrap_or(now)
            .max(now);
        (cap.saturating_sub(tat - now), tat - now)
    }

    /// Takes the bans made since the last call (for write-back to Redis).
    pub fn take_made_bans(&self) -> Vec<LocalBan> {
        std::mem::take(&mut *self.made.lock().unwrap_or_else(|p| p.into_inner())).into()
    }

    /// Puts back bans whose write-back failed, to try again later.
    pub fn return_made_bans(&self, bans: Vec<LocalBan>) {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        for b in bans.into_iter().rev() {
            made.push_front(b);
        }
    }

    /// Forgets idle subjects and returns memory; run periodically.
    pub fn sweep(&self) {
        let now_ms = wall_clock_us() / 1000;
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, s| !s.is_idle(now_ms));
            if shard.capacity() > 64 && shard.capacity() > shard.len() * 4 {
                shard.shrink_to_fit();
            }
        }
    }

    /// Subjects tracked now (for tests and metrics).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Microseconds since the Unix epoch, from this machine's clock.
pub fn wall_clock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::rules::{Rule, RuleSet};

    #[test]
    fn memory_stays_bounded_with_many_subjects() {
        let text = "[upstream]\nurls = [\"http://127.0.0.1:1\"]\n[[rules]]\nname = \"r\"\nkey = \"ip\"\nrate = 1\nper = \"1h\"\nburst = 5\n";
        let config = Config::parse(text, "t").unwrap();
        let rules = RuleSet::compile(&config.rules);
        let rule: Vec<&Rule> = rules.rules().iter().collect();
        let store = LocalStore::new(BanParams::from_config(&config.ban), SHARDS * 16, false);
        for i in 0..20_000u32 {
            let tag = format!("ip:10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
            let call = SubjectCall {
                tag: &tag,
                rules: &rule,
                ttl_ms: 3_600_000,
                bannable: true,
                mode: Mode::Decide,
                now_us: None,
                lease: "",
            };
            assert_eq!(store.decide(&call).status, Status::Allowed);
        }
        assert!(store.len() <= SHARDS * 16, "{} subjects kept", store.len());
    }
}
