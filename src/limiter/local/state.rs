//! What the in-process store keeps of one subject: the same fields as the
//! subject's keys in Redis (its state hash, ban fields and lease sets),
//! with the TTLs those keys would have, and how a full shard makes room.

use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Default)]
pub(super) struct SubjectState {
    /// (rule name, TAT in µs)
    pub(super) tats: Vec<(Arc<str>, u64)>,
    /// (rule name, period start in s, count): the quota counters.
    pub(super) quotas: Vec<(Arc<str>, u64, u64)>,
    /// The lease sets of concurrency rules (their own keys in Redis).
    pub(super) leases: Vec<LeaseSetState>,
    /// Violation window start (ms) and count.
    pub(super) window: Option<(u64, u32)>,
    pub(super) state_expires_ms: u64,
    pub(super) ban_until_ms: u64,
    pub(super) strikes: u32,
    pub(super) reason: String,
    pub(super) source: &'static str,
    pub(super) ban_at_ms: u64,
    pub(super) ban_dur_ms: u64,
    pub(super) ban_expires_ms: u64,
}

/// One concurrency rule's lease set: lease id -> expiry (µs).
#[derive(Debug)]
pub(super) struct LeaseSetState {
    pub(super) rule: Arc<str>,
    pub(super) members: Vec<(String, u64)>,
    pub(super) expires_ms: u64,
}

impl LeaseSetState {
    /// Leases still running at `now` (ZCOUNT key (now +inf).
    pub(super) fn live(&self, now: u64) -> u64 {
        self.members.iter().filter(|(_, e)| *e > now).count() as u64
    }
}

impl SubjectState {
    /// Applies the TTLs a Redis key would have.
    pub(super) fn expire(&mut self, now_ms: u64) {
        if self.state_expires_ms < now_ms {
            self.tats.clear();
            self.quotas.clear();
            self.window = None;
        }
        // Strikes are remembered while the ban's end plus `ban.memory` is
        // ahead, as `decide.lua` reads them.
        if self.ban_expires_ms <= now_ms {
            self.ban_until_ms = 0;
            self.strikes = 0;
        }
        self.leases.retain(|l| l.expires_ms >= now_ms);
    }

    pub(super) fn is_idle(&self, now_ms: u64) -> bool {
        self.state_expires_ms < now_ms
            && self.ban_expires_ms < now_ms
            && self.leases.iter().all(|l| l.expires_ms < now_ms)
    }

    pub(super) fn lease_set(&mut self, rule: &Arc<str>) -> &mut LeaseSetState {
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
pub(super) enum Written {
    Tat(u64),
    Quota { start: u64, count: u64 },
    Lease { ms: u64 },
}

/// Makes room in a full shard: drops idle subjects, then, if still nearly
/// full, an eighth of the shard (those that would expire first), so that
/// the cost of making room is paid once per many new subjects, not per
/// request. Banned subjects are evicted last.
pub(super) fn make_room(shard: &mut HashMap<String, SubjectState>, per_shard: usize, now_ms: u64) {
    shard.retain(|_, s| !s.is_idle(now_ms));
    if shard.len() < per_shard * 7 / 8 {
        return;
    }
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
    let drop = (per_shard / 8).max(1).min(by_expiry.len() - 1);
    by_expiry.select_nth_unstable_by_key(drop, |(t, _)| *t);
    for (_, k) in by_expiry.into_iter().take(drop) {
        shard.remove(&k);
    }
}
