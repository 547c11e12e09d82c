//! The deny cache: a subject that Redis refused with a known wait is refused
//! again from this node's memory until that wait is over.
//!
//! Why it is exact: a GCRA bucket refills only with time. When Redis says
//! "rule R of subject S passes again in `wait`", no request of S that R
//! matches can pass before then, whichever node sends it: other requests can
//! only spend tokens, never add them. The one thing that gives tokens back is
//! a refund (another subject of a charged request refused it); a refund made
//! on this node forgets the subject's entries, and one made elsewhere can at
//! worst make this node refuse a little longer than needed, which errs
//! towards strictness like every other cross-subject effect (see
//! docs/architecture.md). An unban does not touch buckets, so it changes
//! nothing here.
//!
//! What it leaves to Redis: a refusal of a bannable subject while automatic
//! bans are on is a violation that must count fleet-wide, so such a subject
//! is never answered from here; once it is banned, the ban cache answers it
//! for free. Shadow rules never refuse, so they are never cached.
//!
//! Entries are keyed by subject tag and remember the rule's name and limit,
//! so a rule whose limits change on reload no longer matches its old
//! entries. Token buckets and calendar quotas are remembered (only time
//! refills them); concurrency caps never are (a slot frees when a request
//! ends). Memory is bounded: sharded maps with a per-shard cap; expired
//! entries are dropped on insert and by [`DenyCache::purge`], which the
//! node's 5-second sweep calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::BucketReply;
use crate::policy::Limit;
use crate::rules::{Rule, SubjectGroup};

const SHARDS: usize = 16;

/// One cached refusal of one rule.
#[derive(Debug, Clone)]
struct Denial {
    rule: Arc<str>,
    limit: Limit,
    /// When a request of this rule passes again.
    passes_at: Instant,
    /// When the bucket is full again (for `RateLimit-Reset`).
    full_at: Instant,
}

/// A refusal answered from the cache: the rule, and how long until it
/// passes and until its bucket is full.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CachedDenial<'r> {
    pub(crate) rule: &'r Rule,
    pub(crate) wait: Duration,
    pub(crate) to_full: Duration,
}

/// Per-node memory of refusals whose end is known.
pub(crate) struct DenyCache {
    shards: Vec<Mutex<HashMap<String, Vec<Denial>>>>,
    per_shard: usize,
    /// Subjects held, so that the common case (nobody refused) costs one
    /// atomic load and no lock.
    held: AtomicUsize,
}

impl DenyCache {
    /// A cache of at most `max_subjects` subjects.
    pub(crate) fn new(max_subjects: usize) -> DenyCache {
        DenyCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: (max_subjects / SHARDS).max(1),
            held: AtomicUsize::new(0),
        }
    }

    fn shard(&self, tag: &str) -> &Mutex<HashMap<String, Vec<Denial>>> {
        // FNV-1a: cheap, and tags are not attacker-chosen beyond their value.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in tag.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        &self.shards[(h as usize) % SHARDS]
    }

    /// The cached refusal with the longest wait among `groups`' non-shadow
    /// rules, if any is still running at `now`. Subjects for which
    /// `has_tokens` says the node holds leased tokens are passed over: the
    /// node admits their requests from what Redis charged it.
    pub(crate) fn refusal<'r>(
        &self,
        groups: &[SubjectGroup<'r>],
        tags: &[String],
        now: Instant,
        has_tokens: impl Fn(&str) -> bool,
    ) -> Option<CachedDenial<'r>> {
        if self.held.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut best: Option<CachedDenial<'r>> = None;
        for (g, tag) in groups.iter().zip(tags) {
            if has_tokens(tag) {
                continue;
            }
            let map = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
            let Some(denials) = map.get(tag.as_str()) else {
                continue;
            };
            for rule in g.rules.iter().filter(|r| !r.shadow) {
                let hit = denials
                    .iter()
                    .find(|d| d.passes_at > now && *d.rule == *rule.name && d.limit == rule.limit);
                if let Some(d) = hit {
                    let wait = d.passes_at - now;
                    if best.as_ref().is_none_or(|b| wait > b.wait) {
                        best = Some(CachedDenial {
                            rule,
                            wait,
                            to_full: d.full_at.saturating_duration_since(now),
                        });
                    }
                }
            }
        }
        best
    }

    /// Remembers the refusal `reply` of `rule` of `tag`, decided on a call
    /// sent at `now`. A concurrency cap is never remembered: a slot frees
    /// when a request ends, not with time.
    pub(crate) fn remember(&self, tag: &str, rule: &Rule, reply: &BucketReply, now: Instant) {
        let to_full_us = match rule.limit {
            Limit::Rate(b) => (b.capacity_us() as i64 - reply.room_us).max(0) as u64,
            // The quota's period end, when it is whole again.
            Limit::Quota(_) => reply.wait_us.max(0) as u64,
            Limit::Concurrency(_) => return,
        };
        let denial = Denial {
            rule: rule.name.clone(),
            limit: rule.limit,
            passes_at: now + Duration::from_micros(reply.wait_us.max(0) as u64),
            full_at: now + Duration::from_micros(to_full_us),
        };
        let mut map = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = map.get_mut(tag) {
            list.retain(|d| d.passes_at > now && *d.rule != *rule.name);
            list.push(denial);
            return;
        }
        if map.len() >= self.per_shard {
            let before = map.len();
            map.retain(|_, list| list.iter().any(|d| d.passes_at > now));
            self.held.fetch_sub(before - map.len(), Ordering::Relaxed);
            if map.len() >= self.per_shard {
                // Full of running refusals: Redis keeps answering the rest.
                return;
            }
        }
        map.insert(tag.to_string(), vec![denial]);
        self.held.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets every cached refusal of `tag` (its bucket got tokens back).
    pub(crate) fn forget(&self, tag: &str) {
        if self.held.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut map = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
        if map.remove(tag).is_some() {
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Drops the refusals that have run out by `now`.
    pub(crate) fn purge(&self, now: Instant) {
        for shard in &self.shards {
            let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
            let before = map.len();
            map.retain(|_, list| {
                list.retain(|d| d.passes_at > now);
                !list.is_empty()
            });
            self.held.fetch_sub(before - map.len(), Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    /// Subjects held now (tests and metrics).
    pub(crate) fn len(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client_ip::ClientKey;
    use crate::config::Config;
    use crate::rules::RuleSet;

    fn rules(burst: u32) -> RuleSet {
        let text = format!("[upstream]\nurls = [\"http://127.0.0.1:1\"]\n[[rules]]\nname = \"r\"\nkey = \"ip\"\nrate = 1\nper = \"1s\"\nburst = {burst}\n");
        RuleSet::compile(&Config::parse(&text, "t").unwrap().rules)
    }

    /// A refusal that passes in `wait_us` and is full in `to_full_us`
    /// (a 5-token, 1-per-second bucket).
    fn refusal(wait_us: i64, to_full_us: i64) -> BucketReply {
        BucketReply {
            state: crate::limiter::BucketState::Refusing,
            room_us: 5_000_000 - to_full_us,
            wait_us,
        }
    }

    fn groups(set: &RuleSet) -> Vec<SubjectGroup<'_>> {
        let key = ClientKey::new("198.51.100.7".parse().unwrap(), 64);
        let req = actix_web::test::TestRequest::get()
            .uri("/")
            .to_http_request();
        set.groups(&req, key).unwrap()
    }

    #[test]
    fn a_denial_holds_until_its_wait_and_no_longer() {
        let set = rules(5);
        let g = groups(&set);
        let tags: Vec<String> = g.iter().map(|g| g.subject.tag()).collect();
        let cache = DenyCache::new(1000);
        let now = Instant::now();
        assert!(cache.refusal(&g, &tags, now, |_| false).is_none());
        cache.remember(&tags[0], g[0].rules[0], &refusal(300_000, 5_000_000), now);
        let hit = cache.refusal(&g, &tags, now, |_| false).expect("cached");
        assert_eq!(hit.wait, Duration::from_millis(300));
        assert_eq!(hit.to_full, Duration::from_secs(5));
        assert!(cache
            .refusal(&g, &tags, now + Duration::from_millis(299), |_| false)
            .is_some());
        assert!(cache
            .refusal(&g, &tags, now + Duration::from_millis(300), |_| false)
            .is_none());
        cache.purge(now);
        assert_eq!(cache.len(), 1, "a running denial was purged");
        cache.purge(now + Duration::from_millis(300));
        assert!(cache.is_empty());
    }

    #[test]
    fn a_refund_or_changed_limits_drop_the_denial() {
        let (old, new) = (rules(5), rules(50));
        let (g_old, g_new) = (groups(&old), groups(&new));
        let tags: Vec<String> = g_old.iter().map(|g| g.subject.tag()).collect();
        let cache = DenyCache::new(1000);
        let now = Instant::now();
        cache.remember(
            &tags[0],
            g_old[0].rules[0],
            &refusal(60_000_000, 60_000_000),
            now,
        );
        // The same rule name with a new bucket (a reload) is decided anew.
        assert!(cache.refusal(&g_new, &tags, now, |_| false).is_none());
        assert!(cache.refusal(&g_old, &tags, now, |_| false).is_some());
        cache.forget(&tags[0]);
        assert!(cache.refusal(&g_old, &tags, now, |_| false).is_none());
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn memory_stays_bounded() {
        let set = rules(5);
        let g = groups(&set);
        let cache = DenyCache::new(SHARDS * 4);
        let now = Instant::now();
        for i in 0..10_000 {
            cache.remember(
                &format!("ip:{i}"),
                g[0].rules[0],
                &refusal(60_000_000, 0),
                now,
            );
        }
        assert!(cache.len() <= SHARDS * 4, "{} subjects", cache.len());
    }
}
