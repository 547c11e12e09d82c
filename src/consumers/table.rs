//! Runtime plan assignments: the shared truth in Redis (one hash, field =
//! SHA-256 of the key, value = plan) and every node's cache of it.
//!
//! The front door reads only the cache, so finding a consumer's plan costs
//! no Redis round trip. The cache learns of changes from its own admin
//! calls, from the events every node publishes (the same channel as bans),
//! and from reconciles, which re-read the table only when its change
//! counter moved. Like the ban cache, a reconcile never undoes a change this
//! node applied while it was reading. It is separate from the plans because
//! it changes at run time, by operators, on any node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use futures_util::future::LocalBoxFuture;

use crate::bans::{BanEvent, Follower};
use crate::keys;
use crate::redis_link::{RedisFailure, RedisLink};

/// The field of the table that counts its changes.
const VERSION_FIELD: &str = "#v";

#[derive(Debug, Clone)]
struct Entry {
    plan: Arc<str>,
    /// The change number that wrote it (0: from a reconcile snapshot).
    gen: u64,
}

/// Every node's view of the runtime assignments.
pub(crate) struct ConsumerTable {
    link: Option<Arc<RedisLink>>,
    prefix: String,
    entries: RwLock<HashMap<String, Entry>>,
    gen: AtomicU64,
    /// Assignments removed here, with their change number, until a
    /// reconcile that started after them has run.
    tombstones: Mutex<Vec<(String, u64)>>,
    /// The table's change counter when it was last read whole.
    version: Mutex<Option<i64>>,
    /// The plans this configuration defines, and the unknown ones last
    /// reported (so that a runtime plan the config lacks is said once).
    known: RwLock<Vec<String>>,
    reported_unknown: Mutex<Vec<String>>,
}

impl ConsumerTable {
    pub(crate) fn new(
        link: Option<Arc<RedisLink>>,
        prefix: String,
        known: Vec<String>,
    ) -> ConsumerTable {
        ConsumerTable {
            link,
            prefix,
            entries: RwLock::new(HashMap::new()),
            gen: AtomicU64::new(0),
            tombstones: Mutex::new(Vec::new()),
            version: Mutex::new(None),
            known: RwLock::new(known),
            reported_unknown: Mutex::new(Vec::new()),
        }
    }

    /// The runtime plan of the consumer whose key hashes to `hash`.
    pub(crate) fn get(&self, hash: &str) -> Option<Arc<str>> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(hash)
            .map(|e| e.plan.clone())
    }

    fn next_gen(&self) -> u64 {
        self.gen.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Applies a change this node made or heard of.
    fn learn(&self, hash: &str, plan: Option<&str>) {
        let gen = self.next_gen();
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        match plan {
            Some(plan) => {
                entries.insert(
                    hash.to_string(),
                    Entry {
                        plan: Arc::from(plan),
                        gen,
                    },
                );
            }
            None => {
                entries.remove(hash);
                self.tombstones
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((hash.to_string(), gen));
            }
        }
    }

    /// Assigns `plan` to the consumer `hash`, in Redis and here; returns the
    /// runtime plan it had before.
    pub(crate) async fn assign(
        &self,
        hash: &str,
        plan: &str,
    ) -> Result<Option<String>, RedisFailure> {
        self.change(hash, Some(plan)).await
    }

    /// Removes the runtime plan of `hash`; returns it (`None`: there was
    /// none, nothing changed).
    pub(crate) async fn unassign(&self, hash: &str) -> Result<Option<String>, RedisFailure> {
        self.change(hash, None).await
    }

    /// Sets (`Some`) or removes (`None`) the runtime plan of `hash`, in
    /// Redis and here; returns the one it had before.
    async fn change(&self, hash: &str, plan: Option<&str>) -> Result<Option<String>, RedisFailure> {
        let previous = match &self.link {
            Some(link) => {
                let key = keys::consumers(&self.prefix);
                let t = link.admin_timeout();
                let previous: Option<String> = link
                    .query_within(&redis::cmd("HGET").arg(&key).arg(hash).clone(), t)
                    .await?;
                let write = match plan {
                    Some(plan) => Some(redis::cmd("HSET").arg(&key).arg(hash).arg(plan).clone()),
                    None if previous.is_some() => {
                        Some(redis::cmd("HDEL").arg(&key).arg(hash).clone())
                    }
                    None => None,
                };
                if let Some(write) = write {
                    link.query_within::<i64>(&write, t).await?;
                    self.bump(link).await;
                }
                previous
            }
            None => self.get(hash).map(|p| p.to_string()),
        };
        if plan.is_some() || previous.is_some() {
            self.learn(hash, plan);
        }
        Ok(previous)
    }

    /// Counts a change, so every reconcile reads the table again.
    async fn bump(&self, link: &RedisLink) {
        let cmd = redis::cmd("HINCRBY")
            .arg(keys::consumers(&self.prefix))
            .arg(VERSION_FIELD)
            .arg(1)
            .clone();
        if let Err(e) = link.query_within::<i64>(&cmd, link.admin_timeout()).await {
            log::warn!(
                "could not count a consumer change (nodes that miss its event learn it later): {e}"
            );
        }
    }

    /// Re-reads the table when its change counter moved (or `lost`: Redis
    /// lost its data, and this node writes back what it knows first).
    pub(crate) async fn reload(&self, lost: bool) -> Result<(), RedisFailure> {
        let Some(link) = &self.link else {
            return Ok(());
        };
        let key = keys::consumers(&self.prefix);
        let t = link.admin_timeout();
        if lost {
            self.write_back(link).await?;
        }
        let version: Option<i64> = link
            .query_within(&redis::cmd("HGET").arg(&key).arg(VERSION_FIELD).clone(), t)
            .await?;
        if !lost && version == *self.version.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(());
        }
        let since = self.gen.load(Ordering::Acquire);
        let mut snapshot = HashMap::new();
        let mut cursor: u64 = 0;
        loop {
            let cmd = redis::cmd("HSCAN")
                .arg(&key)
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .clone();
            let (next, pairs): (u64, Vec<(String, String)>) = link.query_within(&cmd, t).await?;
            for (hash, plan) in pairs {
                if hash != VERSION_FIELD {
                    snapshot.insert(hash, Arc::<str>::from(plan.as_str()));
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        self.replace(snapshot, since);
        *self.version.lock().unwrap_or_else(|p| p.into_inner()) = version;
        self.report_unknown();
        Ok(())
    }

    /// Writes every runtime assignment this node knows back to a Redis that
    /// lost its data.
    async fn write_back(&self, link: &RedisLink) -> Result<(), RedisFailure> {
        let all: Vec<(String, Arc<str>)> = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(h, e)| (h.clone(), e.plan.clone()))
            .collect();
        if all.is_empty() {
            return Ok(());
        }
        log::warn!(
            "Redis lost its data; writing back {} consumer plans known to this node",
            all.len()
        );
        for chunk in all.chunks(500) {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(keys::consumers(&self.prefix));
            for (hash, plan) in chunk {
                cmd.arg(hash).arg(&**plan);
            }
            link.query_within::<i64>(&cmd, link.admin_timeout()).await?;
        }
        self.bump(link).await;
        Ok(())
    }

    /// Replaces the view with a snapshot read since change number `since`;
    /// changes applied here meanwhile win over it.
    fn replace(&self, snapshot: HashMap<String, Arc<str>>, since: u64) {
        let mut tombstones = self.tombstones.lock().unwrap_or_else(|p| p.into_inner());
        let removed: Vec<String> = tombstones
            .iter()
            .filter(|(_, g)| *g > since)
            .map(|(h, _)| h.clone())
            .collect();
        tombstones.retain(|(_, g)| *g > since);
        drop(tombstones);
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let mut next: HashMap<String, Entry> = snapshot
            .into_iter()
            .map(|(h, plan)| (h, Entry { plan, gen: 0 }))
            .collect();
        for (h, e) in entries.iter().filter(|(_, e)| e.gen > since) {
            next.insert(h.clone(), e.clone());
        }
        for h in &removed {
            if next.get(h).is_some_and(|e| e.gen <= since) {
                next.remove(h);
            }
        }
        *entries = next;
    }

    /// A reload changed the plans this configuration defines.
    pub(crate) fn set_known_plans(&self, known: Vec<String>) {
        *self.known.write().unwrap_or_else(|p| p.into_inner()) = known;
        self.report_unknown();
    }

    /// Says once (per change of the set) which runtime plans this
    /// configuration does not define: those consumers get their static or
    /// default plan.
    fn report_unknown(&self) {
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        let mut unknown: Vec<String> = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|e| !known.iter().any(|k| **k == *e.plan))
            .map(|e| e.plan.to_string())
            .collect();
        unknown.sort();
        unknown.dedup();
        let mut reported = self
            .reported_unknown
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *reported != unknown {
            if !unknown.is_empty() {
                log::warn!(
                    "runtime consumer plans name plans this configuration does not define ({}); those consumers get their configured or default plan",
                    unknown.join(", ")
                );
            }
            *reported = unknown;
        }
    }
}

impl Follower for ConsumerTable {
    fn apply(&self, event: &BanEvent) {
        if let BanEvent::Consumer { key, plan } = event {
            self.learn(key, plan.as_deref());
        }
    }

    fn reconcile(&self, lost: bool) -> LocalBoxFuture<'_, Result<(), RedisFailure>> {
        Box::pin(self.reload(lost))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconcile_snapshot_never_undoes_newer_changes() {
        let table = ConsumerTable::new(None, String::new(), vec!["free".into(), "pro".into()]);
        table.learn("a", Some("pro"));
        let since = table.gen.load(Ordering::Acquire);
        // While the snapshot is read: a is removed, b is assigned.
        table.learn("a", None);
        table.learn("b", Some("pro"));
        // The snapshot still has a, lacks b, and has c.
        table.replace(
            HashMap::from([
                ("a".to_string(), Arc::from("pro")),
                ("c".to_string(), Arc::from("free")),
            ]),
            since,
        );
        assert_eq!(table.get("a"), None, "a removal came back");
        assert_eq!(
            table.get("b").as_deref(),
            Some("pro"),
            "a newer assignment was dropped"
        );
        assert_eq!(table.get("c").as_deref(), Some("free"));
        // A later snapshot is authoritative again.
        let since = table.gen.load(Ordering::Acquire);
        table.replace(HashMap::new(), since);
        assert_eq!((table.get("b"), table.get("c")), (None, None));
    }
}
