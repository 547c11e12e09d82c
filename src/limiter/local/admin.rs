//! The in-process store beyond decisions: operators' bans without Redis,
//! the bans made during an outage (to write back), concurrency-lease
//! renewals, and upkeep (sweeping idle subjects).

use super::{wall_clock_us, LocalStore};
use crate::limiter::slots::LeaseCall;

/// A ban the local store made or holds, as the admin API shows it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LocalBan {
    pub(crate) tag: String,
    pub(crate) until_ms: u64,
    pub(crate) strikes: u32,
    pub(crate) reason: String,
    pub(crate) source: &'static str,
    pub(crate) dur_ms: u64,
}

impl LocalStore {
    /// An operator's ban (no-Redis mode), keeping the strike count.
    pub(crate) fn ban(
        &self,
        tag: &str,
        dur_ms: u64,
        reason: &str,
        source: &'static str,
    ) -> LocalBan {
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

    /// Lifts a ban; true if one was active. The ban ends now: its strikes
    /// are remembered for `ban.memory` from now, as `unban.lua` leaves them.
    pub(crate) fn unban(&self, tag: &str) -> bool {
        // A lifted ban is never written back.
        self.forget_made_ban(tag);
        let memory_ms = self.ban.load().memory_ms;
        let now_ms = wall_clock_us() / 1000;
        let mut shard = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
        match shard.get_mut(tag) {
            Some(s) if s.ban_until_ms > now_ms => {
                s.ban_until_ms = now_ms;
                s.ban_expires_ms = now_ms + memory_ms;
                s.window = None;
                true
            }
            _ => false,
        }
    }

    /// Active bans, for the admin API in no-Redis mode.
    pub(crate) fn active_bans(&self) -> Vec<LocalBan> {
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

    /// The time (ms, on the clock the calls gave) until which the state of
    /// `tag` is kept: what `decide.lua` writes in the `#x` field. Compared
    /// by the differential test; `None` for a subject never decided.
    pub fn kept_until_ms(&self, tag: &str) -> Option<u64> {
        let shard = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
        shard
            .get(tag)
            .map(|s| s.state_expires_ms)
            .filter(|ms| *ms > 0)
    }

    /// Takes the bans made since the last call (for write-back to Redis).
    pub(crate) fn take_made_bans(&self) -> Vec<LocalBan> {
        std::mem::take(&mut *self.made.lock().unwrap_or_else(|p| p.into_inner())).into()
    }

    /// Drops the ban of `tag` from those waiting to be written back (it was
    /// written, or lifted).
    pub(crate) fn forget_made_ban(&self, tag: &str) {
        self.made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|b| b.tag != tag);
    }

    /// Puts back bans whose write-back failed, to try again later.
    pub(crate) fn return_made_bans(&self, bans: Vec<LocalBan>) {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        for b in bans.into_iter().rev() {
            made.push_front(b);
        }
    }

    /// Forgets idle subjects and returns memory; run periodically.
    pub(crate) fn sweep(&self) {
        self.sweep_at(wall_clock_us() / 1000);
    }

    /// [`LocalStore::sweep`] as of `now_ms` (the replay's recorded clock).
    pub(crate) fn sweep_at(&self, now_ms: u64) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, s| !s.is_idle(now_ms));
            if shard.capacity() > 64 && shard.capacity() > shard.len() * 4 {
                shard.shrink_to_fit();
            }
        }
    }

    /// Subjects tracked now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::limiter::call::{BanParams, Mode, Status, SubjectCall};
    use crate::limiter::local::SHARDS;
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
                count: 1,
                costs: &[],
            };
            assert_eq!(store.decide(&call).status, Status::Allowed);
        }
        assert!(store.len() <= SHARDS * 16, "{} subjects kept", store.len());
    }
}
