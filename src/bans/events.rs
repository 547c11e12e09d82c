//! Keeping every node's cache in step: pub/sub events, heartbeats, and the
//! reconcile that re-reads Redis after every (re)subscription and
//! periodically, catching whatever pub/sub missed.
//!
//! It is separate because it is the fleet-wide half of bans: what one node
//! tells the others, and how a node that missed something catches up. The
//! consumer table rides along as a [`Follower`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{key_tag, BanError, BanTarget, Bans};
use crate::keys;
use crate::redis_link::RedisFailure;

/// A change every node must apply to its [`BanCache`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum BanEvent {
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
    /// A consumer's runtime plan changed (`None`: removed); `key` is the
    /// SHA-256 of the consumer's key, never the key. Applied by the
    /// [`Follower`].
    Consumer {
        key: String,
        plan: Option<String>,
    },
}

/// Another part of each node's view that the same events and reconciles
/// keep in step (the consumer table): bans carry it along without knowing
/// what it holds.
pub(crate) trait Follower: Send + Sync {
    /// Applies an event (every kind comes; each follower takes what is
    /// its own).
    fn apply(&self, event: &BanEvent);
    /// Re-reads its state from Redis; `lost`: Redis lost its data, so write
    /// back what this node knows first.
    fn reconcile(&self, lost: bool) -> LocalBoxFuture<'_, Result<(), RedisFailure>>;
}

impl Bans {
    /// Tells every node (this one applies its own changes itself).
    pub(crate) async fn publish(&self, event: &BanEvent) {
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

    /// Re-reads every ban and the allowlist from Redis into the cache (after
    /// restoring them first if Redis lost its data).
    pub(crate) async fn reconcile(&self) -> Result<(), BanError> {
        let Some(link) = &self.link else {
            self.cache.purge();
            return Ok(());
        };
        let (lost, marker) = self.redis_lost_data(link).await?;
        if lost {
            // Remember the new marker only once the restore went through: a
            // failed restore is retried at the next reconcile.
            self.restore().await?;
            for f in self.followers() {
                f.reconcile(true).await?;
            }
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
        for f in self.followers() {
            f.reconcile(false).await?;
        }
        Ok(())
    }

    /// Has `follower` kept in step by the same events and reconciles.
    pub(crate) fn follow_with(&self, follower: Arc<dyn Follower>) {
        self.followers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(follower);
    }

    fn followers(&self) -> Vec<Arc<dyn Follower>> {
        self.followers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies an event from another node (or this one) to the cache, and
    /// hands it to every follower.
    pub(crate) fn apply(&self, event: BanEvent) {
        for f in self.followers() {
            f.apply(&event);
        }
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
            BanEvent::Heartbeat { .. } | BanEvent::Consumer { .. } => {}
        }
    }

    /// Keeps a pub/sub subscription open for as long as the process runs;
    /// after every (re)subscription, reconciles from Redis.
    /// A subscription silent for `idle` (every node publishes a heartbeat
    /// each reconcile interval) is taken as dead and opened again.
    pub(crate) async fn run_subscriber(self: Arc<Self>, idle: Duration) {
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
    pub(crate) async fn heartbeat(&self) {
        self.publish(&BanEvent::Heartbeat {
            node: self.node.clone(),
        })
        .await;
    }
}
