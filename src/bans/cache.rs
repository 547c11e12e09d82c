//! Each node's in-memory view of bans and the allowlist.
//!
//! The per-request phases (allowlist, ban cache) read only this, under a read
//! lock or an atomic pointer load, so a banned or allowlisted client costs no
//! Redis round trip. It is separate from the service because it is the only
//! part of bans on the hot path, and because its change numbers (so that a
//! reconcile never undoes a newer change) are a small state machine of its own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ipnet::IpNet;

use super::BanTarget;
use crate::client_ip::ClientKey;

#[derive(Debug, Clone, Copy)]
struct Entry {
    until: Instant,
    /// The change number that wrote it (0: from a reconcile snapshot).
    gen: u64,
}

/// One node's in-memory view of bans and the allowlist: the per-request
/// checks read only this.
pub(crate) struct BanCache {
    keys: RwLock<HashMap<ClientKey, Entry>>,
    cidrs: RwLock<Vec<(IpNet, Entry)>>,
    /// The config file's allowlist; a reload replaces it.
    config_allow: ArcSwap<Vec<IpNet>>,
    runtime_allow: ArcSwap<Vec<IpNet>>,
    gauge: metrics::Gauge,
    /// Change numbers, so that a reconcile never undoes a newer change.
    gen: std::sync::atomic::AtomicU64,
    allow_gen: std::sync::atomic::AtomicU64,
    /// Bans lifted here, with their change number, until a reconcile that
    /// started after them has run.
    tombstones: Mutex<Vec<(BanTarget, u64)>>,
}

impl BanCache {
    pub(crate) fn new(config_allow: Vec<IpNet>, gauge: metrics::Gauge) -> BanCache {
        BanCache {
            keys: RwLock::new(HashMap::new()),
            cidrs: RwLock::new(Vec::new()),
            config_allow: ArcSwap::from_pointee(config_allow),
            runtime_allow: ArcSwap::from_pointee(Vec::new()),
            gauge,
            gen: std::sync::atomic::AtomicU64::new(0),
            allow_gen: std::sync::atomic::AtomicU64::new(0),
            tombstones: Mutex::new(Vec::new()),
        }
    }

    /// Whether `ip` is on the config or the runtime allowlist.
    pub(crate) fn is_allowlisted(&self, ip: IpAddr) -> bool {
        self.config_allow.load().iter().any(|n| n.contains(&ip))
            || self.runtime_allow.load().iter().any(|n| n.contains(&ip))
    }

    /// Whether one allowlist entry contains the whole of `net`.
    pub(crate) fn allowlist_covers(&self, net: &IpNet) -> bool {
        self.config_allow.load().iter().any(|n| n.contains(net))
            || self.runtime_allow.load().iter().any(|n| n.contains(net))
    }

    /// Time left of a ban on `ip` (its key or a CIDR holding it), if any.
    pub(crate) fn banned(&self, ip: IpAddr, key: &ClientKey) -> Option<Duration> {
        let now = Instant::now();
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = keys.get(key) {
            if e.until > now {
                return Some(e.until - now);
            }
        }
        drop(keys);
        let cidrs = self.cidrs.read().unwrap_or_else(|p| p.into_inner());
        cidrs
            .iter()
            .filter(|(n, e)| e.until > now && n.contains(&ip))
            .map(|(_, e)| e.until - now)
            .max()
    }

    /// A new change number (every mutation gets one; see [`Self::replace`]).
    fn next_gen(&self) -> u64 {
        self.gen.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1
    }

    /// The change number now: taken before a reconcile reads Redis.
    pub(crate) fn generation(&self) -> u64 {
        self.gen.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn insert_key(&self, key: ClientKey, remaining: Duration) {
        let until = Instant::now() + remaining;
        let gen = self.next_gen();
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Entry { until, gen });
        self.update_gauge();
    }

    pub(crate) fn remove_key(&self, key: &ClientKey) {
        let gen = self.next_gen();
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        self.tombstones
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((BanTarget::Key(*key), gen));
        self.update_gauge();
    }

    pub(crate) fn insert_cidr(&self, net: IpNet, remaining: Duration) {
        let until = Instant::now() + remaining;
        let gen = self.next_gen();
        let mut cidrs = self.cidrs.write().unwrap_or_else(|p| p.into_inner());
        cidrs.retain(|(n, _)| *n != net);
        cidrs.push((net, Entry { until, gen }));
        drop(cidrs);
        self.update_gauge();
    }

    pub(crate) fn remove_cidr(&self, net: &IpNet) {
        let gen = self.next_gen();
        self.cidrs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(n, _)| n != net);
        self.tombstones
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((BanTarget::Cidr(*net), gen));
        self.update_gauge();
    }

    /// `floodgate_bans_active`: the client and CIDR bans this node holds.
    fn update_gauge(&self) {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner()).len();
        let cidrs = self.cidrs.read().unwrap_or_else(|p| p.into_inner()).len();
        self.gauge.set((keys + cidrs) as f64);
    }

    /// CIDR bans active now, with time left.
    /// The client bans still running, with the time each has left.
    pub(crate) fn key_bans(&self) -> Vec<(ClientKey, Duration)> {
        let now = Instant::now();
        let map = self.keys.read().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|(_, e)| e.until > now)
            .map(|(k, e)| (*k, e.until - now))
            .collect()
    }

    pub(crate) fn cidr_bans(&self) -> Vec<(IpNet, Duration)> {
        let now = Instant::now();
        let cidrs = self.cidrs.read().unwrap_or_else(|p| p.into_inner());
        cidrs
            .iter()
            .filter(|(_, e)| e.until > now)
            .map(|(n, e)| (*n, e.until - now))
            .collect()
    }

    /// Replaces the ban view with a snapshot read from Redis since change
    /// number `since`. Changes this node applied meanwhile (events, admin
    /// calls, its own decisions) win over the older snapshot: a ban lifted
    /// while the snapshot was read stays lifted.
    pub(crate) fn replace(
        &self,
        keys: HashMap<ClientKey, Duration>,
        cidrs: Vec<(IpNet, Duration)>,
        since: u64,
    ) {
        let now = Instant::now();
        let mut tombstones = self.tombstones.lock().unwrap_or_else(|p| p.into_inner());
        let lifted: Vec<BanTarget> = tombstones
            .iter()
            .filter(|(_, g)| *g > since)
            .map(|(t, _)| *t)
            .collect();
        tombstones.retain(|(_, g)| *g > since);
        drop(tombstones);
        let fresh = |gen: u64| gen > since;
        {
            let mut current = self.keys.write().unwrap_or_else(|p| p.into_inner());
            let mut next: HashMap<ClientKey, Entry> = keys
                .into_iter()
                .map(|(k, d)| {
                    (
                        k,
                        Entry {
                            until: now + d,
                            gen: 0,
                        },
                    )
                })
                .collect();
            for (k, e) in current.iter().filter(|(_, e)| fresh(e.gen)) {
                next.insert(*k, *e);
            }
            for t in &lifted {
                if let BanTarget::Key(k) = t {
                    if next.get(k).is_some_and(|e| !fresh(e.gen)) {
                        next.remove(k);
                    }
                }
            }
            *current = next;
        }
        {
            let mut current = self.cidrs.write().unwrap_or_else(|p| p.into_inner());
            let mut next: Vec<(IpNet, Entry)> = cidrs
                .into_iter()
                .filter(|(n, _)| !current.iter().any(|(c, e)| c == n && fresh(e.gen)))
                .filter(|(n, _)| !lifted.contains(&BanTarget::Cidr(*n)))
                .map(|(n, d)| {
                    (
                        n,
                        Entry {
                            until: now + d,
                            gen: 0,
                        },
                    )
                })
                .collect();
            next.extend(current.iter().filter(|(_, e)| fresh(e.gen)).copied());
            *current = next;
        }
        self.update_gauge();
    }

    /// Sets the runtime allowlist from Redis unless it changed here since
    /// change number `since` (then the next reconcile brings it in).
    pub(crate) fn set_runtime_allowlist(&self, nets: Vec<IpNet>, since: u64) {
        if self.allow_gen.load(std::sync::atomic::Ordering::Acquire) > since {
            return;
        }
        self.runtime_allow.store(Arc::new(nets));
    }

    pub(crate) fn add_runtime_allow(&self, net: IpNet) {
        self.allow_gen
            .store(self.next_gen(), std::sync::atomic::Ordering::Release);
        let mut v = (**self.runtime_allow.load()).clone();
        if !v.contains(&net) {
            v.push(net);
        }
        self.runtime_allow.store(Arc::new(v));
    }

    pub(crate) fn remove_runtime_allow(&self, net: &IpNet) {
        self.allow_gen
            .store(self.next_gen(), std::sync::atomic::Ordering::Release);
        let v: Vec<IpNet> = self
            .runtime_allow
            .load()
            .iter()
            .filter(|n| *n != net)
            .copied()
            .collect();
        self.runtime_allow.store(Arc::new(v));
    }

    pub(crate) fn runtime_allowlist(&self) -> Vec<IpNet> {
        (**self.runtime_allow.load()).clone()
    }

    pub(crate) fn config_allowlist(&self) -> Arc<Vec<IpNet>> {
        self.config_allow.load_full()
    }

    /// Replaces the config file's allowlist (a reload); the runtime one stays.
    pub(crate) fn set_config_allowlist(&self, nets: Vec<IpNet>) {
        self.config_allow.store(Arc::new(nets));
    }

    /// Drops expired entries.
    pub(crate) fn purge(&self) {
        let now = Instant::now();
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, e| e.until > now);
        self.cidrs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(_, e)| e.until > now);
        self.update_gauge();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconcile_snapshot_never_undoes_newer_changes() {
        let cache = BanCache::new(Vec::new(), metrics::gauge!("test_bans_active"));
        let key = |s: &str| ClientKey::new(s.parse().unwrap(), 64);
        let (a, b, c) = (
            key("198.51.100.1"),
            key("198.51.100.2"),
            key("198.51.100.3"),
        );
        let minute = Duration::from_secs(60);
        cache.insert_key(a, minute);
        let since = cache.generation();
        // While the snapshot is being read: a is lifted, b is banned.
        cache.remove_key(&a);
        cache.insert_key(b, minute);
        // The snapshot still has a, lacks b, and has c (an event missed here).
        cache.replace(HashMap::from([(a, minute), (c, minute)]), Vec::new(), since);
        assert!(
            cache.banned(a.addr(), &a).is_none(),
            "a lifted ban came back"
        );
        assert!(
            cache.banned(b.addr(), &b).is_some(),
            "a newer ban was dropped"
        );
        assert!(
            cache.banned(c.addr(), &c).is_some(),
            "the missed ban was not learnt"
        );
        // A later snapshot is authoritative again.
        let since = cache.generation();
        cache.replace(HashMap::new(), Vec::new(), since);
        assert!(cache.banned(b.addr(), &b).is_none());
    }
}
