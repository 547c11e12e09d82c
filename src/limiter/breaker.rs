//! The circuit breakers in front of Redis: one per shard.
//!
//! After `breaker_failures` failed calls in a row a shard's breaker opens:
//! its subjects stop asking Redis (they get `on_failure` at once, with zero
//! waiting) and a background prober pings the shard every `probe_interval`
//! until it answers, then closes the breaker. A standalone Redis is one
//! shard. On a Redis Cluster each master is one: a subject's shard is the
//! master that owns the slot of its hash tag, from the slot map read with
//! `CLUSTER SLOTS`, so a dead master sends only its own subjects to
//! `on_failure` and the other shards keep exact Redis decisions.
//!
//! Everything that changes state logs one line: a breaker opening or
//! closing, the first decision of a shard that fell back after a run of
//! Redis decisions, and the return to Redis after a quiet spell. Requests in
//! between are counted in metrics, never logged one by one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use metrics::Gauge;

use crate::metrics::SHARD_DEGRADED;
use crate::redis_link::{slot_of, RedisFailure, RedisLink, SlotRange};

/// How long a shard must decide on Redis without a fallback before its
/// fallback spell is over (and logged as over). Keeps a shard that
/// alternates between answers and failures to two lines, not one per call.
const QUIET: Duration = Duration::from_secs(1);

/// The name of the one breaker of a standalone Redis (and of a cluster
/// before its slot map is known).
const WHOLE: &str = "redis";

/// Slots of a Redis Cluster.
const SLOTS: usize = 16384;

/// How long a shard may go without an answer to any call before the
/// watch pings it (see [`Breakers::keep_watch`]).
const WATCH_EVERY: Duration = Duration::from_millis(500);
/// How soon the watch pings again a shard whose ping failed.
const RECHECK: Duration = Duration::from_millis(100);

/// A run of decisions that used `on_failure` instead of Redis, logged once
/// when it starts and once when it ends.
#[derive(Default)]
pub(super) struct FallbackSpell {
    on: AtomicBool,
    count: AtomicU64,
    /// Milliseconds since `epoch` of the latest fallback.
    last_ms: AtomicU64,
}

impl FallbackSpell {
    /// Counts a fallback; true when it starts a spell (log it).
    pub(super) fn fell_back(&self, epoch: Instant) -> bool {
        self.last_ms
            .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        !self.on.load(Ordering::Relaxed) && !self.on.swap(true, Ordering::AcqRel)
    }

    /// After a decision made as usual: `Some(fallbacks)` when this ends a
    /// spell (no fallback for [`QUIET`]; log it).
    pub(super) fn went_through(&self, epoch: Instant) -> Option<u64> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        let since = (epoch.elapsed().as_millis() as u64)
            .saturating_sub(self.last_ms.load(Ordering::Relaxed));
        if since < QUIET.as_millis() as u64 || !self.on.swap(false, Ordering::AcqRel) {
            return None;
        }
        Some(self.count.swap(0, Ordering::Relaxed))
    }
}

/// One shard's breaker: a standalone server, or one cluster master.
pub(crate) struct Breaker {
    /// The master's `host:port`, or `redis` for a standalone server.
    name: String,
    open: AtomicBool,
    failures: AtomicU32,
    /// When the last counted failure was seen (ms since the breakers'
    /// epoch, 0: never): a call sent before it overlapped that failure and
    /// is not a failure "in a row" of its own.
    last_failure_ms: AtomicU64,
    /// When a call on this shard last got an answer (ms since the epoch).
    last_answer_ms: AtomicU64,
    threshold: u32,
    gauge: Gauge,
    opened_at: Mutex<Option<Instant>>,
    spell: FallbackSpell,
}

impl Breaker {
    fn new(name: String, threshold: u32, start_open: bool) -> Breaker {
        let gauge = metrics::gauge!(SHARD_DEGRADED, "shard" => name.clone());
        gauge.set(if start_open { 1.0 } else { 0.0 });
        Breaker {
            name,
            open: AtomicBool::new(start_open),
            failures: AtomicU32::new(0),
            last_failure_ms: AtomicU64::new(0),
            last_answer_ms: AtomicU64::new(0),
            threshold: threshold.max(1),
            gauge,
            opened_at: Mutex::new(start_open.then(Instant::now)),
            spell: FallbackSpell::default(),
        }
    }

    /// How logs name the shard: `Redis` for a standalone server (or a
    /// cluster whose slot map is not known yet), `Redis shard <host:port>`.
    fn label(&self) -> String {
        if self.name == WHOLE {
            "Redis".into()
        } else {
            format!("Redis shard {}", self.name)
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        !self.open.load(Ordering::Relaxed)
    }

    fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failed call sent at `sent_ms` and seen failing at `now_ms`;
    /// true when this opened the breaker. Calls that were in flight
    /// together fail together (one blip longer than the timeout fails every
    /// call then in flight, on every worker): only a failure of a call sent
    /// after the last counted one was seen counts, so `breaker_failures`
    /// failures in a row take that many rounds of calls, one after another.
    fn failure(&self, e: &RedisFailure, sent_ms: u64, now_ms: u64) -> bool {
        // Stored one-based, so that 0 means "never".
        let last = self.last_failure_ms.load(Ordering::Relaxed);
        if last != 0 && sent_ms + 1 < last {
            return false;
        }
        self.last_failure_ms.store(now_ms + 1, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.threshold && !self.open.swap(true, Ordering::AcqRel) {
            self.gauge.set(1.0);
            *self.opened_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            log::warn!(
                "{} unavailable after {n} failed calls ({e}); its subjects get on_failure until it answers again",
                self.label()
            );
            return true;
        }
        false
    }

    /// Closes the breaker after a successful probe; true if it was open.
    fn close(&self) -> bool {
        self.failures.store(0, Ordering::Relaxed);
        if !self.open.swap(false, Ordering::AcqRel) {
            return false;
        }
        self.gauge.set(0.0);
        let took = self
            .opened_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|t| format!(" after {:.1}s", t.elapsed().as_secs_f64()))
            .unwrap_or_default();
        log::warn!(
            "{} answers again{took}; its decisions go through Redis",
            self.label()
        );
        true
    }

    /// Retires the breaker of a master that no longer owns slots.
    fn retire(&self, now_owned_by: &str) {
        self.gauge.set(0.0);
        // The placeholder of a cluster whose slot map was not known yet is
        // replaced, not failed over: the slot-map line says enough.
        if !self.is_closed() && self.name != WHOLE {
            log::warn!(
                "Redis shard {} owns no slots any more (failed over or resharded); its subjects are decided on {now_owned_by}",
                self.name
            );
        }
    }
}

/// Which breaker each slot answers to.
struct ShardMap {
    /// Index into `shards` per slot; empty when every slot has shard 0
    /// (standalone, or a cluster whose slot map is not known yet).
    slots: Vec<u16>,
    shards: Vec<Arc<Breaker>>,
}

/// The breakers of every shard, and the slot map that picks one.
pub(crate) struct Breakers {
    map: ArcSwap<ShardMap>,
    threshold: u32,
    /// `floodgate_degraded`: 1 while any shard's breaker is open.
    degraded: Gauge,
    epoch: Instant,
    /// Serialises slot-map updates (reads are lock-free).
    updating: Mutex<()>,
}

impl Breakers {
    /// One breaker for the whole of Redis, open if Redis has not been
    /// reached yet. A cluster gets one per master at its first
    /// [`Breakers::refresh`].
    pub(crate) fn new(threshold: u32, start_open: bool, degraded: Gauge) -> Breakers {
        let breakers = Breakers {
            map: ArcSwap::from_pointee(ShardMap {
                slots: Vec::new(),
                shards: vec![Arc::new(Breaker::new(WHOLE.into(), threshold, start_open))],
            }),
            threshold,
            degraded,
            epoch: Instant::now(),
            updating: Mutex::new(()),
        };
        breakers.update_gauge();
        breakers
    }

    /// The breaker of the shard that holds `tag`'s keys.
    pub(crate) fn for_tag(&self, tag: &str) -> Arc<Breaker> {
        let map = self.map.load();
        let i = if map.slots.is_empty() {
            0
        } else {
            map.slots[usize::from(slot_of(tag))] as usize
        };
        map.shards[i].clone()
    }

    /// True while every shard's breaker is closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.map.load().shards.iter().all(|b| b.is_closed())
    }

    /// The shards whose breakers are open.
    pub(crate) fn open_shards(&self) -> Vec<Arc<Breaker>> {
        self.map
            .load()
            .shards
            .iter()
            .filter(|b| !b.is_closed())
            .cloned()
            .collect()
    }

    /// A decision on `b`'s shard went through Redis.
    pub(crate) fn success(&self, b: &Breaker) {
        b.last_answer_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        b.success();
        if let Some(n) = b.spell.went_through(self.epoch) {
            log::info!(
                "{}: decisions go through Redis again ({n} used on_failure meanwhile)",
                b.label()
            );
        }
    }

    /// A call on `b`'s shard, sent at `sent`, failed (after its retries).
    pub(crate) fn failure(&self, b: &Breaker, e: &RedisFailure, sent: Instant) {
        let ms = |t: Instant| t.saturating_duration_since(self.epoch).as_millis() as u64;
        if b.failure(e, ms(sent), ms(Instant::now())) {
            self.update_gauge();
        }
    }

    /// A subject of `b`'s shard was decided by `on_failure`.
    pub(crate) fn fell_back(&self, b: &Breaker, why: &dyn std::fmt::Display) {
        if b.spell.fell_back(self.epoch) {
            log::warn!(
                "Redis shard {}: decisions fall back to on_failure ({why})",
                b.name
            );
        }
    }

    /// Closes `b` after a successful probe; true if it was open.
    pub(crate) fn close(&self, b: &Breaker) -> bool {
        let closed = b.close();
        if closed {
            self.update_gauge();
        }
        closed
    }

    /// Closes every breaker (standalone recovery: Redis answered a probe).
    pub(crate) fn close_all(&self) -> bool {
        let mut any = false;
        for b in self.map.load().shards.iter() {
            any |= b.close();
        }
        self.update_gauge();
        any
    }

    /// Reads the cluster's slot map and gives each master a breaker,
    /// keeping the state of masters already known. Masters that own no
    /// slots any more (a failed master after its replica took over) are
    /// dropped with their breakers. A no-op on a standalone server.
    pub(crate) async fn refresh(&self, link: &RedisLink) -> Result<(), RedisFailure> {
        let ranges = link.slot_ranges().await?;
        if ranges.is_empty() {
            return Ok(());
        }
        self.install(&ranges);
        Ok(())
    }

    /// One round of the prober: reads the slot map again (a failed-over
    /// master's slots now belong to a closed breaker), then PINGs each
    /// shard still open and closes those that answer. True when a breaker
    /// closed or an open one was retired.
    pub(crate) async fn probe(&self, link: &RedisLink) -> bool {
        let open_before = self.open_shards().len();
        if open_before == 0 || link.connect().await.is_err() {
            return false;
        }
        if !link.is_cluster() {
            return link.query::<String>(&redis::cmd("PING")).await.is_ok() && self.close_all();
        }
        if let Err(e) = self.refresh(link).await {
            log::debug!("could not read the Redis Cluster slot map: {e}");
        }
        for b in self.open_shards() {
            if self.map.load().slots.is_empty() {
                break; // no slot map yet: the shards are not known
            }
            if link.ping_node(&b.name).await.is_ok() {
                self.close(&b);
            }
        }
        self.open_shards().len() < open_before
    }

    /// Notices a Redis that went away while no decision needed it (every
    /// request answered from the ban cache or the deny cache, or no
    /// traffic at all): each closed shard that no call has answered for
    /// half a second is pinged, and a failed ping counts as a failed call
    /// (a shard whose ping failed is pinged again a tenth of a second
    /// later). So the breaker, `floodgate_degraded` and `/readyz` agree
    /// within about a second. Busy shards cost nothing: their
    /// decisions are the proof of life. Runs for the life of the process.
    pub(crate) async fn keep_watch(&self, link: &RedisLink) {
        let mut pause = WATCH_EVERY;
        loop {
            tokio::time::sleep(pause).await;
            pause = WATCH_EVERY;
            let now = self.epoch.elapsed().as_millis() as u64;
            let quiet: Vec<Arc<Breaker>> = self
                .map
                .load()
                .shards
                .iter()
                .filter(|b| b.is_closed())
                .filter(|b| {
                    now.saturating_sub(b.last_answer_ms.load(Ordering::Relaxed))
                        >= WATCH_EVERY.as_millis() as u64
                })
                .cloned()
                .collect();
            for b in quiet {
                let sent = Instant::now();
                let answer = if b.name == WHOLE {
                    link.query::<String>(&redis::cmd("PING")).await.map(|_| ())
                } else {
                    link.ping_master(&b.name).await
                };
                match answer {
                    Ok(()) => self.success(&b),
                    Err(e) => {
                        self.failure(&b, &e, sent);
                        // Look again soon: a dead shard is out of the request
                        // path within a few short rounds, not half-seconds.
                        pause = RECHECK;
                    }
                }
            }
        }
    }

    /// Keeps the slot map current on a Redis Cluster: reads it again when a
    /// call met a redirect or a lost node (at most every 50 ms), and every
    /// 5 s anyway, so a failover or a reshard that caused no error is
    /// noticed too. Runs for the life of the process.
    pub(crate) async fn watch(&self, link: &RedisLink) {
        const EVERY: Duration = Duration::from_secs(5);
        const AT_MOST: Duration = Duration::from_millis(50);
        loop {
            let _ = tokio::time::timeout(EVERY, link.topology_changed()).await;
            if let Err(e) = self.refresh(link).await {
                log::debug!("could not read the Redis Cluster slot map: {e}");
            }
            tokio::time::sleep(AT_MOST).await;
        }
    }

    fn install(&self, ranges: &[SlotRange]) {
        let _guard = self.updating.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.map.load_full();
        let by_name: HashMap<&str, &Arc<Breaker>> =
            old.shards.iter().map(|b| (b.name.as_str(), b)).collect();
        let mut shards: Vec<Arc<Breaker>> = Vec::new();
        let mut index: HashMap<&str, u16> = HashMap::new();
        let mut slots = vec![u16::MAX; SLOTS];
        for r in ranges {
            let i = *index.entry(r.master.as_str()).or_insert_with(|| {
                let b = by_name
                    .get(r.master.as_str())
                    .map(|b| Arc::clone(b))
                    .unwrap_or_else(|| {
                        Arc::new(Breaker::new(r.master.clone(), self.threshold, false))
                    });
                shards.push(b);
                (shards.len() - 1) as u16
            });
            for s in r.first..=r.last.min(SLOTS as u16 - 1) {
                slots[usize::from(s)] = i;
            }
        }
        // Slots nobody serves (a cluster mid-change): keep the old owner's
        // breaker, or the first shard's.
        for (s, owner) in slots.iter_mut().enumerate() {
            if *owner != u16::MAX {
                continue;
            }
            let before = if old.slots.is_empty() {
                &old.shards[0]
            } else {
                &old.shards[old.slots[s] as usize]
            };
            *owner = match shards.iter().position(|b| Arc::ptr_eq(b, before)) {
                Some(i) => i as u16,
                None => {
                    shards.push(before.clone());
                    (shards.len() - 1) as u16
                }
            };
        }
        let unchanged = old.shards.len() == shards.len()
            && old
                .shards
                .iter()
                .zip(&shards)
                .all(|(a, b)| Arc::ptr_eq(a, b))
            && old.slots == slots;
        if unchanged {
            return;
        }
        for b in &old.shards {
            if !shards.iter().any(|n| Arc::ptr_eq(n, b)) {
                b.retire(
                    &shards
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                );
            }
        }
        let names: Vec<&str> = shards.iter().map(|s| s.name.as_str()).collect();
        log::info!(
            "Redis Cluster slot map: {} masters ({})",
            shards.len(),
            names.join(", ")
        );
        self.map.store(Arc::new(ShardMap { slots, shards }));
        self.update_gauge();
    }

    fn update_gauge(&self) {
        self.degraded.set(if self.is_closed() { 0.0 } else { 1.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u16, last: u16, master: &str) -> SlotRange {
        SlotRange {
            first,
            last,
            master: master.into(),
        }
    }

    fn e() -> RedisFailure {
        RedisFailure::Timeout(Duration::from_millis(1))
    }

    #[test]
    fn a_dead_master_opens_only_its_own_breaker() {
        let b = Breakers::new(2, false, metrics::gauge!("t1"));
        b.install(&[range(0, 8191, "a:1"), range(8192, 16383, "b:1")]);
        let (dead, healthy) = (b.for_tag_slot(0), b.for_tag_slot(9000));
        assert_eq!((dead.name.as_str(), healthy.name.as_str()), ("a:1", "b:1"));
        b.failure(&dead, &e(), Instant::now());
        assert!(dead.is_closed(), "one failure must not open the breaker");
        b.failure(&dead, &e(), Instant::now());
        assert!(!dead.is_closed() && healthy.is_closed());
        assert!(!b.is_closed());
        let open: Vec<String> = b.open_shards().iter().map(|s| s.name.clone()).collect();
        assert_eq!(open, vec!["a:1".to_string()]);
        let tag = (0..)
            .map(|i| format!("ip:10.0.0.{i}"))
            .find(|t| slot_of(t) >= 8192)
            .unwrap();
        assert!(Arc::ptr_eq(&b.for_tag(&tag), &healthy));
    }

    #[test]
    fn a_failover_hands_the_slots_to_a_fresh_breaker_and_keeps_the_others() {
        let b = Breakers::new(1, false, metrics::gauge!("t2"));
        b.install(&[range(0, 8191, "a:1"), range(8192, 16383, "b:1")]);
        let a = b.for_tag_slot(0);
        let kept = b.for_tag_slot(9000);
        b.failure(&a, &e(), Instant::now());
        assert!(!b.is_closed());
        b.install(&[range(0, 8191, "c:1"), range(8192, 16383, "b:1")]);
        assert_eq!(b.for_tag_slot(0).name, "c:1");
        assert!(b.is_closed(), "the retired breaker no longer counts");
        assert!(Arc::ptr_eq(&kept, &b.for_tag_slot(9000)));
    }

    #[test]
    fn unserved_slots_keep_their_old_breaker() {
        let b = Breakers::new(1, false, metrics::gauge!("t3"));
        b.install(&[range(0, 8191, "a:1"), range(8192, 16383, "b:1")]);
        let a = b.for_tag_slot(10);
        b.install(&[range(8192, 16383, "b:1")]);
        assert!(Arc::ptr_eq(&a, &b.for_tag_slot(10)));
    }

    #[test]
    fn a_fallback_spell_is_announced_once_and_ends_after_a_quiet_second() {
        let s = FallbackSpell::default();
        let epoch = Instant::now() - Duration::from_secs(10);
        assert!(s.fell_back(epoch));
        assert!(!s.fell_back(epoch));
        assert_eq!(s.went_through(epoch), None, "not quiet yet");
        s.last_ms.store(0, Ordering::Relaxed);
        assert_eq!(s.went_through(epoch), Some(2));
        assert_eq!(s.went_through(epoch), None);
        assert!(s.fell_back(epoch));
    }

    impl Breakers {
        fn for_tag_slot(&self, slot: usize) -> Arc<Breaker> {
            let map = self.map.load();
            map.shards[map.slots[slot] as usize].clone()
        }
    }
}
