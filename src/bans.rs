//! Bans and the allowlist: each node's in-memory view, and the shared truth.
//!
//! The truth lives in Redis: a subject's ban hash (written by the decision
//! script or an operator), the CIDR-ban hash, the runtime allowlist set and
//! the audit stream. Every node mirrors bans and the allowlist in a
//! [`BanCache`] so that a banned or allowlisted client costs no Redis round
//! trip. The mirror learns of changes three ways: from its own decisions,
//! from pub/sub events (every node within a second), and from a periodic
//! reconcile that re-reads Redis, which also catches whatever pub/sub missed
//! while a node's subscription was down or the node was not running.
//!
//! Without Redis (`[redis]` absent) the same operations work on this node's
//! memory alone.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::client_ip::ClientKey;
use crate::keys;
use crate::limiter::{BanMade, BanParams, LocalStore};
use crate::redis_link::{scripts, RedisFailure, RedisLink};

/// What an operator can ban: one client key, or a whole network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanTarget {
    Key(ClientKey),
    Cidr(IpNet),
}

impl BanTarget {
    /// Parses an address or CIDR. An IPv6 address or a network narrower
    /// than `ipv6_prefix` means the client key that contains it.
    pub fn parse(s: &str, ipv6_prefix: u8) -> Result<BanTarget, String> {
        let s = s.trim();
        if s.contains('/') {
            let net: IpNet = s
                .parse()
                .map_err(|_| format!("`{s}` is not a valid CIDR (e.g. 203.0.113.0/24)"))?;
            return Ok(match net {
                IpNet::V4(n) if n.prefix_len() == 32 => {
                    BanTarget::Key(ClientKey::new(n.addr().into(), ipv6_prefix))
                }
                IpNet::V6(n) if n.prefix_len() >= ipv6_prefix => {
                    BanTarget::Key(ClientKey::new(n.addr().into(), ipv6_prefix))
                }
                n => BanTarget::Cidr(n.trunc()),
            });
        }
        s.parse::<IpAddr>()
            .map(|ip| BanTarget::Key(ClientKey::new(ip, ipv6_prefix)))
            .map_err(|_| format!("`{s}` is not an IP address or CIDR"))
    }

    /// `203.0.113.7`, `2001:db8::/64`, `203.0.113.0/24`.
    pub fn subject(&self) -> String {
        match self {
            BanTarget::Key(k) => k.to_string(),
            BanTarget::Cidr(n) => n.to_string(),
        }
    }
}

/// The Redis subject tag of a client key.
pub fn key_tag(key: &ClientKey) -> String {
    crate::rules::Subject::Ip(*key).tag()
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    until: Instant,
    /// The change number that wrote it (0: from a reconcile snapshot).
    gen: u64,
}

/// One node's in-memory view of bans and the allowlist: the per-request
/// checks read only this.
pub struct BanCache {
    keys: RwLock<HashMap<ClientKey, Entry>>,
    cidrs: RwLock<Vec<(IpNet, Entry)>>,
    config_allow: Vec<IpNet>,
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
    pub fn new(config_allow: Vec<IpNet>, gauge: metrics::Gauge) -> BanCache {
        BanCache {
            keys: RwLock::new(HashMap::new()),
            cidrs: RwLock::new(Vec::new()),
            config_allow,
            runtime_allow: ArcSwap::from_pointee(Vec::new()),
            gauge,
            gen: std::sync::atomic::AtomicU64::new(0),
            allow_gen: std::sync::atomic::AtomicU64::new(0),
            tombstones: Mutex::new(Vec::new()),
        }
    }

    /// Whether `ip` is on the config or the runtime allowlist.
    pub fn is_allowlisted(&self, ip: IpAddr) -> bool {
        self.config_allow.iter().any(|n| n.contains(&ip))
            || self.runtime_allow.load().iter().any(|n| n.contains(&ip))
    }

    /// Whether one allowlist entry contains the whole of `net`.
    pub fn allowlist_covers(&self, net: &IpNet) -> bool {
        self.config_allow.iter().any(|n| n.contains(net))
            || self.runtime_allow.load().iter().any(|n| n.contains(net))
    }

    /// Time left of a ban on `ip` (its key or a CIDR holding it), if any.
    pub fn banned(&self, ip: IpAddr, key: &ClientKey) -> Option<Duration> {
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
    pub fn generation(&self) -> u64 {
        self.gen.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn insert_key(&self, key: ClientKey, remaining: Duration) {
        let until = Instant::now() + remaining;
        let gen = self.next_gen();
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Entry { until, gen });
        self.update_gauge();
    }

    pub fn remove_key(&self, key: &ClientKey) {
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

    pub fn insert_cidr(&self, net: IpNet, remaining: Duration) {
        let until = Instant::now() + remaining;
        let gen = self.next_gen();
        let mut cidrs = self.cidrs.write().unwrap_or_else(|p| p.into_inner());
        cidrs.retain(|(n, _)| *n != net);
        cidrs.push((net, Entry { until, gen }));
        drop(cidrs);
        self.update_gauge();
    }

    pub fn remove_cidr(&self, net: &IpNet) {
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
    pub fn cidr_bans(&self) -> Vec<(IpNet, Duration)> {
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
    pub fn replace(
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
    pub fn set_runtime_allowlist(&self, nets: Vec<IpNet>, since: u64) {
        if self.allow_gen.load(std::sync::atomic::Ordering::Acquire) > since {
            return;
        }
        self.runtime_allow.store(Arc::new(nets));
    }

    pub fn add_runtime_allow(&self, net: IpNet) {
        self.allow_gen
            .store(self.next_gen(), std::sync::atomic::Ordering::Release);
        let mut v = (**self.runtime_allow.load()).clone();
        if !v.contains(&net) {
            v.push(net);
        }
        self.runtime_allow.store(Arc::new(v));
    }

    pub fn remove_runtime_allow(&self, net: &IpNet) {
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

    pub fn runtime_allowlist(&self) -> Vec<IpNet> {
        (**self.runtime_allow.load()).clone()
    }

    pub fn config_allowlist(&self) -> &[IpNet] {
        &self.config_allow
    }

    /// Drops expired entries.
    pub fn purge(&self) {
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

/// A ban as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BanView {
    pub subject: String,
    /// RFC 3339.
    pub until: String,
    /// Whole seconds left, rounded up.
    pub remaining: u64,
    pub reason: String,
    pub strikes: u32,
    pub source: String,
}

impl BanView {
    fn new(
        subject: String,
        until_ms: u64,
        now_ms: u64,
        reason: String,
        strikes: u32,
        source: String,
    ) -> BanView {
        BanView {
            subject,
            until: rfc3339_ms(until_ms),
            remaining: until_ms.saturating_sub(now_ms).div_ceil(1000),
            reason,
            strikes,
            source,
        }
    }
}

/// RFC 3339 text of a time in ms since the epoch.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// One audit-log event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEvent {
    /// Stream entry id (`<ms>-<seq>`); ordered.
    pub id: String,
    pub time: String,
    pub event: String,
    pub subject: String,
    pub reason: String,
    pub duration_ms: u64,
    pub strikes: u32,
    pub source: String,
    pub node: String,
}

/// A change every node must apply to its [`BanCache`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum BanEvent {
    Ban {
        subject: String,
        remaining_ms: u64,
    },
    Unban {
        subject: String,
    },
    Allow {
        cidr: String,
    },
    Unallow {
        cidr: String,
    },
    /// A node is alive: keeps subscriptions from looking dead when quiet.
    Heartbeat {
        node: String,
    },
}

/// What went wrong with an operator's request.
#[derive(Debug, thiserror::Error)]
pub enum BanError {
    #[error("{0}")]
    BadInput(String),
    #[error("Redis is unavailable: {0}")]
    Unavailable(#[from] RedisFailure),
}

#[derive(Debug, Serialize, Deserialize)]
struct CidrBanRecord {
    until_ms: u64,
    reason: String,
    source: String,
    at_ms: u64,
    dur_ms: u64,
}

/// The ban and allowlist service: shared truth plus this node's mirror.
pub struct Bans {
    cache: Arc<BanCache>,
    link: Option<Arc<RedisLink>>,
    local: Arc<LocalStore>,
    prefix: String,
    params: BanParams,
    node: String,
    audit_max_len: u64,
    ipv6_prefix: u8,
    local_audit: Mutex<VecDeque<AuditEvent>>,
    local_seq: std::sync::atomic::AtomicU64,
    /// The Redis dataset marker last seen (see [`keys::epoch`]).
    epoch: Mutex<Option<String>>,
}

impl Bans {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cache: Arc<BanCache>,
        link: Option<Arc<RedisLink>>,
        local: Arc<LocalStore>,
        prefix: String,
        params: BanParams,
        node: String,
        audit_max_len: u64,
        ipv6_prefix: u8,
    ) -> Bans {
        Bans {
            cache,
            link,
            local,
            prefix,
            params,
            node,
            audit_max_len,
            ipv6_prefix,
            local_audit: Mutex::new(VecDeque::new()),
            local_seq: std::sync::atomic::AtomicU64::new(0),
            epoch: Mutex::new(None),
        }
    }

    pub fn cache(&self) -> &Arc<BanCache> {
        &self.cache
    }

    pub fn ipv6_prefix(&self) -> u8 {
        self.ipv6_prefix
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Records that a decision found `key` banned (made elsewhere).
    pub fn learn(&self, key: ClientKey, remaining_ms: u64) {
        self.cache
            .insert_key(key, Duration::from_millis(remaining_ms));
    }

    /// A decision just banned `key`: mirror it here at once, then tell the
    /// other nodes and append to the audit log.
    pub async fn on_auto_ban(&self, key: ClientKey, made: BanMade) {
        self.cache
            .insert_key(key, Duration::from_millis(made.dur_ms));
        crate::metrics::ban_made("auto");
        log::warn!(
            "banned {} for {}s (strike {}, {})",
            key,
            made.dur_ms / 1000,
            made.strikes,
            made.reason
        );
        let subject = key.to_string();
        self.publish(&BanEvent::Ban {
            subject: subject.clone(),
            remaining_ms: made.dur_ms,
        })
        .await;
        self.audit(
            "ban",
            &subject,
            &made.reason,
            made.dur_ms,
            made.strikes,
            "auto",
        )
        .await;
    }

    async fn publish(&self, event: &BanEvent) {
        let Some(link) = &self.link else { return };
        let Ok(payload) = serde_json::to_string(event) else {
            return;
        };
        let cmd = redis::cmd("PUBLISH")
            .arg(keys::events(&self.prefix))
            .arg(payload)
            .clone();
        if let Err(e) = link.query_within::<i64>(&cmd, link.admin_timeout()).await {
            log::warn!(
                "could not publish a ban event (other nodes learn it at the next reconcile): {e}"
            );
        }
    }

    async fn audit(
        &self,
        event: &str,
        subject: &str,
        reason: &str,
        duration_ms: u64,
        strikes: u32,
        source: &str,
    ) {
        match &self.link {
            Some(link) => {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(keys::audit(&self.prefix))
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(self.audit_max_len)
                    .arg("*")
                    .arg("event")
                    .arg(event)
                    .arg("subject")
                    .arg(subject)
                    .arg("reason")
                    .arg(reason)
                    .arg("duration_ms")
                    .arg(duration_ms)
                    .arg("strikes")
                    .arg(strikes)
                    .arg("source")
                    .arg(source)
                    .arg("node")
                    .arg(&self.node);
                if let Err(e) = link
                    .query_within::<String>(&cmd, link.admin_timeout())
                    .await
                {
                    log::error!("could not append to the audit log: {event} {subject}: {e}");
                }
            }
            None => {
                let ms = crate::limiter::local::wall_clock_us() / 1000;
                let seq = self
                    .local_seq
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut log = self.local_audit.lock().unwrap_or_else(|p| p.into_inner());
                log.push_back(AuditEvent {
                    id: format!("{ms}-{seq}"),
                    time: rfc3339_ms(ms),
                    event: event.into(),
                    subject: subject.into(),
                    reason: reason.into(),
                    duration_ms,
                    strikes,
                    source: source.into(),
                    node: self.node.clone(),
                });
                while log.len() as u64 > self.audit_max_len {
                    log.pop_front();
                }
            }
        }
    }

    /// Redis' clock in ms, so every node computes the same ban ends.
    async fn redis_now_ms(link: &RedisLink) -> Result<u64, RedisFailure> {
        let (s, us): (u64, u64) = link
            .query_within(&redis::cmd("TIME"), link.admin_timeout())
            .await?;
        Ok(s * 1000 + us / 1000)
    }

    /// An operator's ban.
    pub async fn ban(
        &self,
        target: BanTarget,
        duration: Duration,
        reason: &str,
    ) -> Result<BanView, BanError> {
        let dur_ms = duration.as_millis() as u64;
        let view = self
            .write_ban(target, dur_ms, reason, "manual", 0, false)
            .await?;
        crate::metrics::ban_made("manual");
        log::warn!(
            "banned {} for {} by an operator: {reason}",
            view.subject,
            humantime::format_duration(duration)
        );
        Ok(view)
    }

    async fn write_ban(
        &self,
        target: BanTarget,
        dur_ms: u64,
        reason: &str,
        source: &'static str,
        strikes: u32,
        keep_longer: bool,
    ) -> Result<BanView, BanError> {
        let subject = target.subject();
        let view = match (&self.link, target) {
            (Some(link), BanTarget::Key(key)) => {
                let tag = key_tag(&key);
                let v = link
                    .eval(
                        &scripts::BAN,
                        &[&keys::ban(&self.prefix, &tag)],
                        |c| {
                            c.arg(dur_ms)
                                .arg(reason)
                                .arg(self.params.memory_ms)
                                .arg(source)
                                .arg(strikes)
                                .arg(if keep_longer { "1" } else { "0" });
                        },
                        link.admin_timeout(),
                    )
                    .await?;
                let (until_ms, strikes, now_ms): (u64, u32, u64) =
                    redis::FromRedisValue::from_redis_value(v).map_err(RedisFailure::from)?;
                self.cache
                    .insert_key(key, Duration::from_millis(until_ms.saturating_sub(now_ms)));
                BanView::new(
                    subject.clone(),
                    until_ms,
                    now_ms,
                    reason.into(),
                    strikes,
                    source.into(),
                )
            }
            (Some(link), BanTarget::Cidr(net)) => {
                let now_ms = Self::redis_now_ms(link).await?;
                let rec = CidrBanRecord {
                    until_ms: now_ms + dur_ms,
                    reason: reason.into(),
                    source: source.into(),
                    at_ms: now_ms,
                    dur_ms,
                };
                let json = serde_json::to_string(&rec).unwrap_or_default();
                let cmd = redis::cmd("HSET")
                    .arg(keys::cidr_bans(&self.prefix))
                    .arg(net.to_string())
                    .arg(json)
                    .clone();
                link.query_within::<i64>(&cmd, link.admin_timeout()).await?;
                self.cache.insert_cidr(net, Duration::from_millis(dur_ms));
                BanView::new(
                    subject.clone(),
                    rec.until_ms,
                    now_ms,
                    reason.into(),
                    0,
                    source.into(),
                )
            }
            (None, BanTarget::Key(key)) => {
                let b = self.local.ban(&key_tag(&key), dur_ms, reason, source);
                self.cache.insert_key(key, Duration::from_millis(dur_ms));
                BanView::new(
                    subject.clone(),
                    b.until_ms,
                    b.until_ms - dur_ms,
                    reason.into(),
                    b.strikes,
                    source.into(),
                )
            }
            (None, BanTarget::Cidr(net)) => {
                self.cache.insert_cidr(net, Duration::from_millis(dur_ms));
                let now_ms = crate::limiter::local::wall_clock_us() / 1000;
                BanView::new(
                    subject.clone(),
                    now_ms + dur_ms,
                    now_ms,
                    reason.into(),
                    0,
                    source.into(),
                )
            }
        };
        self.publish(&BanEvent::Ban {
            subject: subject.clone(),
            remaining_ms: dur_ms,
        })
        .await;
        self.audit("ban", &subject, reason, dur_ms, view.strikes, source)
            .await;
        Ok(view)
    }

    /// Lifts a ban; `Ok(false)` if there was none.
    pub async fn unban(&self, target: BanTarget, reason: &str) -> Result<bool, BanError> {
        let subject = target.subject();
        let lifted = match (&self.link, target) {
            (Some(link), BanTarget::Key(key)) => {
                let tag = key_tag(&key);
                let v = link
                    .eval(
                        &scripts::UNBAN,
                        &[
                            &keys::ban(&self.prefix, &tag),
                            &keys::state(&self.prefix, &tag),
                        ],
                        |_| {},
                        link.admin_timeout(),
                    )
                    .await?;
                let n: i64 =
                    redis::FromRedisValue::from_redis_value(v).map_err(RedisFailure::from)?;
                self.cache.remove_key(&key);
                self.local.unban(&tag);
                n == 1
            }
            (Some(link), BanTarget::Cidr(net)) => {
                let active = self
                    .cidr_bans_from_redis(link)
                    .await?
                    .iter()
                    .any(|(n, _)| *n == net);
                let cmd = redis::cmd("HDEL")
                    .arg(keys::cidr_bans(&self.prefix))
                    .arg(net.to_string())
                    .clone();
                link.query_within::<i64>(&cmd, link.admin_timeout()).await?;
                self.cache.remove_cidr(&net);
                active
            }
            (None, BanTarget::Key(key)) => {
                self.cache.remove_key(&key);
                self.local.unban(&key_tag(&key))
            }
            (None, BanTarget::Cidr(net)) => {
                let active = self.cache.cidr_bans().iter().any(|(n, _)| *n == net);
                self.cache.remove_cidr(&net);
                active
            }
        };
        if lifted {
            log::warn!("unbanned {subject}: {reason}");
            self.publish(&BanEvent::Unban {
                subject: subject.clone(),
            })
            .await;
            self.audit("unban", &subject, reason, 0, 0, "manual").await;
        }
        Ok(lifted)
    }

    async fn cidr_bans_from_redis(
        &self,
        link: &RedisLink,
    ) -> Result<Vec<(IpNet, BanView)>, RedisFailure> {
        let now_ms = Self::redis_now_ms(link).await?;
        let cmd = redis::cmd("HGETALL")
            .arg(keys::cidr_bans(&self.prefix))
            .clone();
        let all: HashMap<String, String> = link.query_within(&cmd, link.admin_timeout()).await?;
        let mut out = Vec::new();
        let mut expired = Vec::new();
        for (cidr, json) in all {
            let (Ok(net), Ok(rec)) = (
                cidr.parse::<IpNet>(),
                serde_json::from_str::<CidrBanRecord>(&json),
            ) else {
                expired.push(cidr);
                continue;
            };
            if rec.until_ms > now_ms {
                out.push((
                    net,
                    BanView::new(cidr, rec.until_ms, now_ms, rec.reason, 0, rec.source),
                ));
            } else {
                expired.push(cidr);
            }
        }
        if !expired.is_empty() {
            let cmd = redis::cmd("HDEL")
                .arg(keys::cidr_bans(&self.prefix))
                .arg(&expired)
                .clone();
            let _ = link.query_within::<i64>(&cmd, link.admin_timeout()).await;
        }
        Ok(out)
    }

    /// Every active ban, keys and CIDRs, sorted by subject.
    pub async fn list(&self) -> Result<Vec<BanView>, BanError> {
        let Some(link) = &self.link else {
            let now_ms = crate::limiter::local::wall_clock_us() / 1000;
            let mut out: Vec<BanView> = self
                .local
                .active_bans()
                .into_iter()
                .map(|b| {
                    let subject = b.tag.strip_prefix("ip:").unwrap_or(&b.tag).to_string();
                    BanView::new(
                        subject,
                        b.until_ms,
                        now_ms,
                        b.reason,
                        b.strikes,
                        b.source.into(),
                    )
                })
                .collect();
            out.extend(self.cache.cidr_bans().into_iter().map(|(n, left)| {
                BanView::new(
                    n.to_string(),
                    now_ms + left.as_millis() as u64,
                    now_ms,
                    String::new(),
                    0,
                    "manual".into(),
                )
            }));
            return Ok(out);
        };
        let mut out = Vec::new();
        for key in link.scan(&keys::ban_pattern(&self.prefix)).await? {
            let Some(tag) = keys::tag_of_ban_key(&self.prefix, &key) else {
                continue;
            };
            if let Some(v) = self.inspect_tag(link, tag).await? {
                out.push(v);
            }
        }
        out.extend(
            self.cidr_bans_from_redis(link)
                .await?
                .into_iter()
                .map(|(_, v)| v),
        );
        out.sort_by(|a, b| a.subject.cmp(&b.subject));
        Ok(out)
    }

    async fn inspect_tag(
        &self,
        link: &RedisLink,
        tag: &str,
    ) -> Result<Option<BanView>, RedisFailure> {
        let v = link
            .eval(
                &scripts::INSPECT,
                &[
                    &keys::ban(&self.prefix, tag),
                    &keys::state(&self.prefix, tag),
                ],
                |c| {
                    c.arg("");
                },
                link.admin_timeout(),
            )
            .await?;
        let f: Vec<String> = redis::FromRedisValue::from_redis_value(v)?;
        let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
        let now_ms = num(0).unwrap_or(0) / 1000;
        match num(1) {
            Some(until) if until > now_ms => Ok(Some(BanView::new(
                tag.strip_prefix("ip:").unwrap_or(tag).to_string(),
                until,
                now_ms,
                f.get(3).cloned().unwrap_or_default(),
                num(2).unwrap_or(0) as u32,
                f.get(4).cloned().unwrap_or_default(),
            ))),
            _ => Ok(None),
        }
    }

    /// One subject's active ban.
    pub async fn get(&self, target: BanTarget) -> Result<Option<BanView>, BanError> {
        match (&self.link, target) {
            (Some(link), BanTarget::Key(key)) => Ok(self.inspect_tag(link, &key_tag(&key)).await?),
            _ => {
                let subject = target.subject();
                Ok(self
                    .list()
                    .await?
                    .into_iter()
                    .find(|b| b.subject == subject))
            }
        }
    }

    /// Adds a runtime allowlist entry and lifts the bans inside it.
    pub async fn allow(&self, net: IpNet) -> Result<Vec<String>, BanError> {
        if let Some(link) = &self.link {
            let cmd = redis::cmd("SADD")
                .arg(keys::allowlist(&self.prefix))
                .arg(net.to_string())
                .clone();
            link.query_within::<i64>(&cmd, link.admin_timeout()).await?;
        }
        self.cache.add_runtime_allow(net);
        self.publish(&BanEvent::Allow {
            cidr: net.to_string(),
        })
        .await;
        self.audit("allow", &net.to_string(), "allowlisted", 0, 0, "manual")
            .await;
        let mut lifted = Vec::new();
        for ban in self.list().await? {
            let Ok(target) = BanTarget::parse(&ban.subject, self.ipv6_prefix) else {
                continue;
            };
            let inside = match target {
                BanTarget::Key(k) => net.contains(&k.addr()),
                BanTarget::Cidr(n) => net.contains(&n),
            };
            if inside
                && self
                    .unban(target, &format!("inside allowlisted {net}"))
                    .await?
            {
                lifted.push(ban.subject);
            }
        }
        Ok(lifted)
    }

    /// Removes a runtime allowlist entry; `Ok(false)` if it was not there.
    pub async fn unallow(&self, net: IpNet) -> Result<bool, BanError> {
        let present = match &self.link {
            Some(link) => {
                let cmd = redis::cmd("SREM")
                    .arg(keys::allowlist(&self.prefix))
                    .arg(net.to_string())
                    .clone();
                link.query_within::<i64>(&cmd, link.admin_timeout()).await? == 1
            }
            None => self.cache.runtime_allowlist().contains(&net),
        };
        self.cache.remove_runtime_allow(&net);
        if present {
            self.publish(&BanEvent::Unallow {
                cidr: net.to_string(),
            })
            .await;
            self.audit(
                "unallow",
                &net.to_string(),
                "removed from allowlist",
                0,
                0,
                "manual",
            )
            .await;
        }
        Ok(present)
    }

    /// The runtime allowlist (from Redis when it answers).
    pub async fn allowlist(&self) -> Result<Vec<IpNet>, BanError> {
        match &self.link {
            Some(link) => Ok(self.allowlist_from_redis(link).await?),
            None => Ok(self.cache.runtime_allowlist()),
        }
    }

    async fn allowlist_from_redis(&self, link: &RedisLink) -> Result<Vec<IpNet>, RedisFailure> {
        let cmd = redis::cmd("SMEMBERS")
            .arg(keys::allowlist(&self.prefix))
            .clone();
        let raw: Vec<String> = link.query_within(&cmd, link.admin_timeout()).await?;
        let mut nets: Vec<IpNet> = raw.iter().filter_map(|s| s.parse().ok()).collect();
        nets.sort();
        Ok(nets)
    }

    /// The newest `count` audit events, newest first.
    pub async fn audit_log(&self, count: usize) -> Result<Vec<AuditEvent>, BanError> {
        let Some(link) = &self.link else {
            let log = self.local_audit.lock().unwrap_or_else(|p| p.into_inner());
            return Ok(log.iter().rev().take(count).cloned().collect());
        };
        let cmd = redis::cmd("XREVRANGE")
            .arg(keys::audit(&self.prefix))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count)
            .clone();
        let entries: Vec<(String, HashMap<String, String>)> =
            link.query_within(&cmd, link.admin_timeout()).await?;
        Ok(entries
            .into_iter()
            .map(|(id, f)| {
                let ms = id
                    .split('-')
                    .next()
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(0);
                let s = |k: &str| f.get(k).cloned().unwrap_or_default();
                AuditEvent {
                    time: rfc3339_ms(ms),
                    id,
                    event: s("event"),
                    subject: s("subject"),
                    reason: s("reason"),
                    duration_ms: s("duration_ms").parse().unwrap_or(0),
                    strikes: s("strikes").parse().unwrap_or(0),
                    source: s("source"),
                    node: s("node"),
                }
            })
            .collect())
    }

    /// True when Redis lost its data since this node last looked (the
    /// dataset marker changed or vanished); sets the marker if missing.
    /// Returns the marker to remember once whatever it calls for is done
    /// (`None` when nothing changed).
    async fn redis_lost_data(
        &self,
        link: &RedisLink,
    ) -> Result<(bool, Option<String>), RedisFailure> {
        let key = keys::epoch(&self.prefix);
        let fresh = format!(
            "{:x}-{}",
            crate::limiter::local::wall_clock_us(),
            std::process::id()
        );
        let set = redis::cmd("SET").arg(&key).arg(&fresh).arg("NX").clone();
        link.query_within::<Option<String>>(&set, link.admin_timeout())
            .await?;
        let current: Option<String> = link
            .query_within(&redis::cmd("GET").arg(&key).clone(), link.admin_timeout())
            .await?;
        let seen = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
        let lost = seen.is_some() && *seen != current;
        Ok((lost, current))
    }

    /// Writes this node's view of bans and the runtime allowlist back to a
    /// Redis that lost its data, so a Redis restart does not lift bans.
    async fn restore(&self) -> Result<(), BanError> {
        // Bans made by the local store go first, with their own reason and
        // strikes; what is left of the cache is restored after them.
        self.write_back_local_bans().await;
        let now = Instant::now();
        let keys: Vec<(ClientKey, Duration)> = {
            let map = self.cache.keys.read().unwrap_or_else(|p| p.into_inner());
            map.iter()
                .filter(|(_, e)| e.until > now)
                .map(|(k, e)| (*k, e.until - now))
                .collect()
        };
        let cidrs = self.cache.cidr_bans();
        log::warn!(
            "Redis lost its data; writing back {} bans and {} CIDR bans known to this node",
            keys.len(),
            cidrs.len()
        );
        let reason = "restored after Redis lost its data";
        let Some(link) = &self.link else {
            return Ok(());
        };
        // Skip what Redis already holds again (e.g. written back just now).
        for (k, left) in keys {
            if self.inspect_tag(link, &key_tag(&k)).await?.is_none() {
                self.write_ban(
                    BanTarget::Key(k),
                    left.as_millis() as u64,
                    reason,
                    "auto",
                    0,
                    true,
                )
                .await?;
            }
        }
        let present: Vec<IpNet> = self
            .cidr_bans_from_redis(link)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for (n, left) in cidrs {
            if !present.contains(&n) {
                self.write_ban(
                    BanTarget::Cidr(n),
                    left.as_millis() as u64,
                    reason,
                    "manual",
                    0,
                    true,
                )
                .await?;
            }
        }
        {
            for net in self.cache.runtime_allowlist() {
                let cmd = redis::cmd("SADD")
                    .arg(keys::allowlist(&self.prefix))
                    .arg(net.to_string())
                    .clone();
                link.query_within::<i64>(&cmd, link.admin_timeout()).await?;
            }
        }
        Ok(())
    }

    /// Re-reads every ban and the allowlist from Redis into the cache (after
    /// restoring them first if Redis lost its data).
    pub async fn reconcile(&self) -> Result<(), BanError> {
        let Some(link) = &self.link else {
            self.cache.purge();
            return Ok(());
        };
        let (lost, marker) = self.redis_lost_data(link).await?;
        if lost {
            // Remember the new marker only once the restore went through: a
            // failed restore is retried at the next reconcile.
            self.restore().await?;
        }
        *self.epoch.lock().unwrap_or_else(|p| p.into_inner()) = marker;
        let since = self.cache.generation();
        let mut keys_map = HashMap::new();
        for key in link.scan(&keys::ban_pattern(&self.prefix)).await? {
            let Some(tag) = keys::tag_of_ban_key(&self.prefix, &key) else {
                continue;
            };
            if let Some(v) = self.inspect_tag(link, tag).await? {
                if let Ok(BanTarget::Key(k)) = BanTarget::parse(&v.subject, self.ipv6_prefix) {
                    keys_map.insert(k, Duration::from_secs(v.remaining));
                }
            }
        }
        let cidrs = self
            .cidr_bans_from_redis(link)
            .await?
            .into_iter()
            .map(|(n, v)| (n, Duration::from_secs(v.remaining)))
            .collect();
        let allow = self.allowlist_from_redis(link).await?;
        self.cache.replace(keys_map, cidrs, since);
        self.cache.set_runtime_allowlist(allow, since);
        Ok(())
    }

    /// Applies an event from another node (or this one) to the cache.
    pub fn apply(&self, event: BanEvent) {
        match event {
            BanEvent::Ban {
                subject,
                remaining_ms,
            } => match BanTarget::parse(&subject, self.ipv6_prefix) {
                Ok(BanTarget::Key(k)) => self
                    .cache
                    .insert_key(k, Duration::from_millis(remaining_ms)),
                Ok(BanTarget::Cidr(n)) => self
                    .cache
                    .insert_cidr(n, Duration::from_millis(remaining_ms)),
                Err(_) => {}
            },
            BanEvent::Unban { subject } => match BanTarget::parse(&subject, self.ipv6_prefix) {
                Ok(BanTarget::Key(k)) => {
                    self.cache.remove_key(&k);
                    self.local.unban(&key_tag(&k));
                }
                Ok(BanTarget::Cidr(n)) => self.cache.remove_cidr(&n),
                Err(_) => {}
            },
            BanEvent::Allow { cidr } => {
                if let Ok(n) = cidr.parse() {
                    self.cache.add_runtime_allow(n);
                }
            }
            BanEvent::Unallow { cidr } => {
                if let Ok(n) = cidr.parse() {
                    self.cache.remove_runtime_allow(&n);
                }
            }
            BanEvent::Heartbeat { .. } => {}
        }
    }

    /// Keeps a pub/sub subscription open for as long as the process runs;
    /// after every (re)subscription, reconciles from Redis.
    /// A subscription silent for `idle` (every node publishes a heartbeat
    /// each reconcile interval) is taken as dead and opened again.
    pub async fn run_subscriber(self: Arc<Self>, idle: Duration) {
        let Some(link) = self.link.clone() else {
            return;
        };
        let channel = keys::events(&self.prefix);
        let mut attempt = 0usize;
        loop {
            match link.pubsub(attempt).await {
                Ok(mut ps) => match tokio::time::timeout(idle, ps.subscribe(&channel)).await {
                    Ok(Ok(())) => {
                        if let Err(e) = self.reconcile().await {
                            log::debug!("reconcile after subscribing failed: {e}");
                        }
                        let mut stream = ps.into_on_message();
                        loop {
                            let msg = match tokio::time::timeout(idle, stream.next()).await {
                                Ok(Some(msg)) => msg,
                                Ok(None) => break,
                                Err(_) => {
                                    log::warn!("no ban events for {idle:?}, not even heartbeats; subscribing again");
                                    break;
                                }
                            };
                            let Ok(payload) = msg.get_payload::<String>() else {
                                continue;
                            };
                            match serde_json::from_str::<BanEvent>(&payload) {
                                Ok(ev) => self.apply(ev),
                                Err(e) => log::warn!("ignoring a malformed ban event: {e}"),
                            }
                        }
                        log::debug!("ban event subscription lost; reconnecting");
                    }
                    Ok(Err(e)) => log::debug!("could not subscribe to ban events: {e}"),
                    Err(_) => log::debug!("subscribing to ban events timed out"),
                },
                Err(e) => log::debug!("could not open the ban event subscription: {e}"),
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Tells the other nodes' subscriptions that this one is alive.
    pub async fn heartbeat(&self) {
        self.publish(&BanEvent::Heartbeat {
            node: self.node.clone(),
        })
        .await;
    }

    /// Writes bans made by the local store during an outage back to Redis,
    /// so they hold on every node and survive restarts.
    pub async fn write_back_local_bans(&self) {
        let now_ms = crate::limiter::local::wall_clock_us() / 1000;
        let mut failed = Vec::new();
        for b in self.local.take_made_bans() {
            let left = b.until_ms.saturating_sub(now_ms);
            if left == 0 {
                continue;
            }
            let Some(subject) = b.tag.strip_prefix("ip:") else {
                continue;
            };
            let Ok(target) = BanTarget::parse(subject, self.ipv6_prefix) else {
                continue;
            };
            match self
                .write_ban(
                    target,
                    left,
                    &format!("{} (during Redis outage)", b.reason),
                    "auto",
                    b.strikes,
                    true,
                )
                .await
            {
                Ok(_) => log::info!("wrote back the ban of {subject} made during the Redis outage"),
                Err(e) => {
                    log::warn!("could not write back the ban of {subject} (will retry): {e}");
                    failed.push(b.clone());
                }
            }
        }
        if !failed.is_empty() {
            self.local.return_made_bans(failed);
        }
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

    #[test]
    fn targets_parse_to_keys_or_networks() {
        assert_eq!(
            BanTarget::parse("203.0.113.7", 64).unwrap().subject(),
            "203.0.113.7"
        );
        assert_eq!(
            BanTarget::parse("203.0.113.7/32", 64).unwrap().subject(),
            "203.0.113.7"
        );
        assert!(matches!(
            BanTarget::parse("203.0.113.0/24", 64).unwrap(),
            BanTarget::Cidr(_)
        ));
        assert_eq!(
            BanTarget::parse("2001:db8::1", 64).unwrap().subject(),
            "2001:db8::/64"
        );
        assert_eq!(
            BanTarget::parse("2001:db8::/64", 64).unwrap().subject(),
            "2001:db8::/64"
        );
        assert!(matches!(
            BanTarget::parse("2001:db8::/48", 64).unwrap(),
            BanTarget::Cidr(_)
        ));
        assert!(BanTarget::parse("not-an-ip", 64).is_err());
        assert!(BanTarget::parse("10.0.0.0/40", 64).is_err());
    }
}
