//! Leased tokens: requests a node admits from memory, each charged in Redis
//! before it was admitted.
//!
//! When Redis allows a subject that has plenty left, the decision may charge
//! several requests at once (on every rule of the subject, all or nothing:
//! `decide.lua`'s grant) and this node admits that subject's next requests
//! from the lease, with no Redis call, until the lease is spent or
//! `redis.lease` has passed; what is left then goes back by refund. Every
//! admitted request was charged in Redis at or before the moment it was
//! admitted, so for every subject `allowed <= burst + rate x t` holds across
//! any number of nodes, exactly as without leases: a lease can only make a
//! node admit less than it could (tokens held by one node are not usable
//! by another until they come back), never more. Refusals are always
//! Redis's (or the deny cache's), so violations, bans and escalation stay
//! exact.
//!
//! How much to ask for follows the subject's arrivals on this node: a
//! subject seen once asks for one request (no lease); one seen again within
//! a lease time asks for two, and from then on for what its arrival rate
//! here, measured over the last lease, needs for one lease time, plus a
//! quarter. Redis grants no more than half of what every rule has left, so
//! near the limit the grant falls to one and the subject is decided call
//! by call. When a lease's time is over while the subject still comes,
//! the node keeps what the next lease time needs of what is left and gives
//! back the rest (those tokens were charged all the same); a subject that
//! stopped coming (not seen for half a lease time) gets everything back at
//! the next sweep, and no lease is held past two lease times. A request
//! Redis refuses while this node still holds tokens of its subject (in a
//! lease, or queued to go back) takes one of those instead.
//!
//! Leases are per node, keyed by subject and by the exact rules of the
//! request (their names and limits): a request with other rules is a
//! different lease. Groups with a concurrency cap, a shadow rule, or a rule
//! with `lease = false` are never leased.

mod ending;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::call::BucketReply;
use crate::policy::Limit;
use crate::rules::{Rule, SubjectGroup};

const SHARDS: usize = 16;
/// The most requests one lease asks for.
const MAX_WANT: u32 = 1 << 20;

/// One lease of one subject for one set of rules.
struct Lease {
    /// The signature of its rules (see [`signature`]).
    sig: u64,
    /// Requests still to admit from it.
    left: u32,
    /// Requests admitted since `started` (the one that took it included).
    served: u32,
    /// Requests granted into it since `started` (grants that joined it
    /// included): a quarter of it left is when the next lease is asked for.
    size: u32,
    /// When the current lease time began.
    started: Instant,
    /// When the headers' numbers (`replies`) were read from Redis.
    granted_at: Instant,
    expires: Instant,
    /// The rules' state right after the grant (room with the whole grant
    /// charged): the headers of admissions from the lease start from it.
    replies: Vec<BucketReply>,
    /// The rules as granted, for the refund of what is left.
    rules: Vec<Rule>,
    ttl_ms: u64,
}

/// What one subject's requests with one set of rules look like on this node.
struct Entry {
    sig: u64,
    lease: Option<Lease>,
    /// What the next call asks for.
    want: u32,
    last_seen: Instant,
    /// When a request of this subject went to ask for more (one at a time:
    /// the others go on taking what the lease holds).
    asking_since: Option<Instant>,
}

/// The index of `sig`'s entry in `entries`, added (wanting `want`, seen
/// `now`) when there is none.
fn entry_of(entries: &mut Vec<Entry>, sig: u64, want: u32, now: Instant) -> usize {
    if let Some(i) = entries.iter().position(|e| e.sig == sig) {
        return i;
    }
    entries.push(Entry {
        sig,
        lease: None,
        want,
        last_seen: now,
        asking_since: None,
    });
    entries.len() - 1
}

/// Requests' worth a lease gives back: refunded on the store that charged
/// them.
pub(crate) struct Returned {
    pub(crate) tag: String,
    pub(crate) sig: u64,
    pub(crate) rules: Vec<Rule>,
    pub(crate) ttl_ms: u64,
    pub(crate) count: u32,
}

/// An admission from a lease: the headers' numbers as of the lease, less
/// what this node has admitted from it since.
pub(crate) struct Admitted {
    pub(crate) buckets: Vec<BucketReply>,
}

/// What a subject's next call on the shared store should be.
pub(crate) enum Take {
    /// Admitted from the node's lease.
    Admit(Admitted),
    /// Admitted from the node's lease, which runs low: ask the store for
    /// this many more (a top-up, which never refuses).
    TopUp(Admitted, u32),
    /// Ask the store, for this many requests.
    Ask(u32),
}

/// Every lease this node holds.
pub(crate) struct TokenLeases {
    lease_for: Duration,
    shards: Vec<Mutex<HashMap<String, Vec<Entry>>>>,
    per_shard: usize,
    /// Leases that ended with tokens left, to give back.
    returning: Mutex<Vec<Returned>>,
}

impl TokenLeases {
    /// Leases that last `lease_for` (zero: none are taken), for at most
    /// `max_subjects` subjects.
    pub(crate) fn new(lease_for: Duration, max_subjects: usize) -> TokenLeases {
        TokenLeases {
            lease_for,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: (max_subjects / SHARDS).max(16),
            returning: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.lease_for.is_zero()
    }

    /// How long a lease lasts.
    pub(crate) fn lease_for(&self) -> Duration {
        self.lease_for
    }

    /// Queues what a lease held for the next sweep to give back.
    pub(crate) fn give_back_returned(&self, r: Returned) {
        if r.count > 0 {
            self.returning
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(r);
        }
    }

    fn shard(&self, tag: &str) -> &Mutex<HashMap<String, Vec<Entry>>> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in tag.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        &self.shards[(h as usize) % SHARDS]
    }

    /// The request's next step for subject `tag` with `group`'s rules:
    /// admitted from this node's lease, or a call on the store asking for
    /// as many requests as the subject's arrivals here suggest.
    pub(crate) fn take(&self, tag: &str, sig: u64, now: Instant) -> Take {
        let mut shard = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
        if !shard.contains_key(tag) && shard.len() >= self.per_shard {
            self.make_room(&mut shard, now);
        }
        let entries = shard.entry(tag.to_string()).or_default();
        let at = match entries.iter().position(|e| e.sig == sig) {
            Some(i) => i,
            None => {
                entries.push(Entry {
                    sig,
                    lease: None,
                    want: 1,
                    last_seen: now,
                    asking_since: None,
                });
                return Take::Ask(1);
            }
        };
        let e = &mut entries[at];
        let recent = now.saturating_duration_since(e.last_seen) < self.lease_for;
        e.last_seen = now;
        let asking = e
            .asking_since
            .is_some_and(|t| now.saturating_duration_since(t) < self.lease_for);
        if let Some(lease) = e.lease.as_mut() {
            if lease.left > 0 && now < lease.expires {
                // Running low: one request asks for the next lease while
                // the others go on taking what this one holds, so a busy
                // subject makes one call per lease, not one per waiting
                // request when the lease runs dry.
                let low = !asking && lease.left <= (lease.size / 4).max(1);
                if low {
                    e.want = next_want(lease, now, self.lease_for);
                    e.asking_since = Some(now);
                }
                lease.left -= 1;
                lease.served += 1;
                let admitted = admission(lease, now);
                return if low {
                    Take::TopUp(admitted, e.want)
                } else {
                    Take::Admit(admitted)
                };
            }
            e.want = next_want(lease, now, self.lease_for);
            if now >= lease.expires && lease.left > 0 {
                // Its time is over and the subject still comes: keep what
                // the next lease time needs, give back the rest.
                let carry = lease.left.min(e.want);
                let surplus = lease.left - carry;
                lease.left = carry - 1;
                lease.served = 1;
                lease.size = carry;
                lease.started = now;
                lease.expires = now + self.lease_for;
                let admitted = admission(lease, now);
                if surplus > 0 {
                    let back = Returned {
                        tag: tag.to_string(),
                        sig,
                        count: surplus,
                        rules: lease.rules.clone(),
                        ttl_ms: lease.ttl_ms,
                    };
                    self.give_back_returned(back);
                }
                return Take::Admit(admitted);
            }
            // Spent: the next call asks for what the rate needs.
            e.lease = None;
        }
        if asking {
            // Another request is asking for this subject's next lease.
            return Take::Ask(1);
        }
        let want = if recent { e.want.max(2) } else { 1 };
        if want > 1 {
            e.asking_since = Some(now);
        }
        Take::Ask(want)
    }

    /// A decision on the store granted `granted` requests to this one:
    /// the node admits the next `granted - 1` from memory. Joins a lease
    /// still running (concurrent requests of a busy subject each bring a
    /// grant): tokens a node holds are never parked where its own requests
    /// cannot use them. Returns how many requests the node now holds.
    pub(crate) fn granted(
        &self,
        tag: &str,
        sig: u64,
        group: &SubjectGroup<'_>,
        granted: u32,
        replies: &[BucketReply],
        now: Instant,
    ) -> u32 {
        if granted < 2 {
            return 0;
        }
        let mut shard = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
        let entries = shard.entry(tag.to_string()).or_default();
        let fresh = Lease {
            sig,
            left: granted - 1,
            served: 1,
            size: granted,
            started: now,
            granted_at: now,
            expires: now + self.lease_for,
            replies: replies.to_vec(),
            rules: group.rules.iter().map(|r| (*r).clone()).collect(),
            ttl_ms: group.ttl_ms,
        };
        let at = entry_of(entries, sig, granted, now);
        let e = &mut entries[at];
        match e.lease.as_mut() {
            Some(running) if now < running.expires => {
                running.left += fresh.left;
                running.served += 1;
                running.size += fresh.size;
                // The newer reading of the rules, and a full lease time.
                running.replies = fresh.replies;
                running.granted_at = now;
                running.expires = fresh.expires;
                running.left
            }
            _ => {
                let left = fresh.left;
                if let Some(old) = e.lease.replace(fresh) {
                    self.give_back(tag, old);
                }
                left
            }
        }
    }

    /// A top-up of the lease `sig` of `tag` granted `granted` more: they
    /// join the lease (a new one if it ended meanwhile), with a full lease
    /// time; `replies` is the rules' state with them charged.
    pub(crate) fn topped_up(
        &self,
        tag: &str,
        sig: u64,
        group: &SubjectGroup<'_>,
        granted: u32,
        replies: &[BucketReply],
        now: Instant,
    ) {
        let mut shard = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
        let entries = shard.entry(tag.to_string()).or_default();
        let at = entry_of(entries, sig, granted, now);
        let lease = entries[at].lease.get_or_insert_with(|| Lease {
            sig,
            left: 0,
            served: 0,
            size: 0,
            started: now,
            granted_at: now,
            expires: now,
            replies: replies.to_vec(),
            rules: group.rules.iter().map(|r| (*r).clone()).collect(),
            ttl_ms: group.ttl_ms,
        });
        lease.left += granted;
        lease.size += granted;
        lease.replies = replies.to_vec();
        lease.granted_at = now;
        lease.expires = now + self.lease_for;
    }

    /// A call on the store for `sig` of `tag` came back (granted, refused or
    /// failed): another request may ask for the next lease.
    pub(crate) fn answered(&self, tag: &str, sig: u64) {
        let mut shard = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = shard
            .get_mut(tag)
            .and_then(|entries| entries.iter_mut().find(|e| e.sig == sig))
        {
            e.asking_since = None;
        }
    }

    /// An admission from the lease `sig` of `tag` if it still holds a
    /// request (a refusal came back while the node held tokens); never asks
    /// for anything. `replies` is the refusal's reading of the rules, newer
    /// than the lease's.
    pub(crate) fn take_held(
        &self,
        tag: &str,
        sig: u64,
        replies: &[BucketReply],
    ) -> Option<Admitted> {
        let now = Instant::now();
        {
            let mut shard = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
            let lease = shard
                .get_mut(tag)
                .and_then(|entries| entries.iter_mut().find(|e| e.sig == sig))
                .and_then(|e| e.lease.as_mut())
                // An expired lease not yet given back still holds tokens
                // charged for this node.
                .filter(|l| l.left > 0);
            if let Some(lease) = lease {
                lease.left -= 1;
                lease.served += 1;
                lease.read(replies);
                return Some(admission(lease, now));
            }
        }
        // Tokens of an ended lease on their way back are still this node's:
        // the request takes one rather than be refused for want of it.
        let mut returning = self.returning.lock().unwrap_or_else(|p| p.into_inner());
        let r = returning
            .iter_mut()
            .find(|r| r.sig == sig && r.tag == tag && r.count > 0)?;
        r.count -= 1;
        Some(Admitted {
            buckets: r
                .rules
                .iter()
                .zip(replies)
                .map(|(rule, b)| as_of_lease(rule, b, r.count, Duration::ZERO))
                .collect(),
        })
    }

    /// Requests the lease `sig` of `tag` holds now (0: none, or over).
    /// `replies` is a newer reading of its rules (a call that took no
    /// lease): the headers of the lease's next admissions start from it.
    pub(crate) fn held(&self, tag: &str, sig: u64, replies: &[BucketReply], now: Instant) -> u32 {
        let mut shard = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
        let Some(lease) = shard
            .get_mut(tag)
            .and_then(|entries| entries.iter_mut().find(|e| e.sig == sig))
            .and_then(|e| e.lease.as_mut())
            .filter(|l| now < l.expires)
        else {
            return 0;
        };
        lease.read(replies);
        lease.left
    }

    /// Whether this node holds leased requests of `tag` (any rules), in a
    /// lease or on their way back.
    pub(crate) fn holds(&self, tag: &str) -> bool {
        let held = {
            let shard = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
            shard.get(tag).is_some_and(|entries| {
                entries
                    .iter()
                    .any(|e| e.lease.as_ref().is_some_and(|l| l.left > 0))
            })
        };
        held || self
            .returning
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|r| r.tag == tag && r.count > 0)
    }
}

impl Lease {
    /// A newer reading of the rules from Redis: what the headers of the
    /// next admissions start from (the old one would count tokens other
    /// calls took since as still there).
    /// Only the room is taken: a refusal's other numbers mean something
    /// else (the wait for the next token, not for a full bucket).
    fn read(&mut self, replies: &[BucketReply]) {
        if replies.len() == self.replies.len() {
            for (mine, newer) in self.replies.iter_mut().zip(replies) {
                mine.room_us = newer.room_us;
            }
        }
    }
}

/// The headers' numbers of an admission from `lease` (its `left` already
/// counted down).
fn admission(lease: &Lease, now: Instant) -> Admitted {
    let age = now.saturating_duration_since(lease.granted_at);
    Admitted {
        buckets: lease
            .rules
            .iter()
            .zip(&lease.replies)
            .map(|(rule, b)| as_of_lease(rule, b, lease.left, age))
            .collect(),
    }
}

/// How much the next lease of a subject asks for: the requests one lease
/// time needs at the rate the last lease served them, plus a quarter.
fn next_want(lease: &Lease, now: Instant, lease_for: Duration) -> u32 {
    let elapsed = now
        .saturating_duration_since(lease.started)
        .max(Duration::from_millis(1))
        .min(lease_for.max(Duration::from_millis(1)));
    let per_lease = f64::from(lease.served) * lease_for.as_secs_f64() / elapsed.as_secs_f64();
    (per_lease * 1.25).ceil().clamp(2.0, f64::from(MAX_WANT)) as u32
}

/// A rule's headers for an admission from a lease: room as the grant left
/// it plus the `left` requests this node still holds; a quota's reset
/// counted down by the lease's `age`.
pub(crate) fn as_of_lease(rule: &Rule, b: &BucketReply, left: u32, age: Duration) -> BucketReply {
    let held = i64::from(left);
    match rule.limit {
        Limit::Rate(bucket) => BucketReply {
            room_us: b.room_us + held * (bucket.interval_us * u64::from(bucket.cost)) as i64,
            ..*b
        },
        Limit::Quota(q) => BucketReply {
            room_us: b.room_us + held * i64::from(q.cost),
            wait_us: (b.wait_us - age.as_micros() as i64).max(0),
            ..*b
        },
        Limit::Concurrency(_) => *b,
    }
}

/// Whether a group's requests may be admitted from a lease: only token
/// buckets and quotas, none in shadow mode, none that opted out.
pub(crate) fn leasable(group: &SubjectGroup<'_>) -> bool {
    group
        .rules
        .iter()
        .all(|r| !r.shadow && r.leasable && !r.is_concurrency())
}

/// The identity of a group's rules: their names and limits, in order.
pub(crate) fn signature(group: &SubjectGroup<'_>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for r in &group.rules {
        r.name.hash(&mut h);
        r.limit.hash(&mut h);
    }
    h.finish()
}
