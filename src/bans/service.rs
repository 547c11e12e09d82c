//! Ban, unban, list and look up: the operations an operator or a decision
//! performs on one subject (a client key or a network).
//!
//! Client bans live in each subject's ban hash (written by `ban.lua` and
//! `decide.lua`), CIDR bans in one gateway-wide hash; without Redis both
//! live in this node's memory. Every change is mirrored in the cache,
//! published to the other nodes and audited.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::scripts::{self, BanWrite};
use super::{events::BanEvent, key_tag, BanError, BanTarget, BanView, Bans};
use crate::client_ip::ClientKey;
use crate::keys;
use crate::limiter::BanMade;
use crate::redis_link::{RedisFailure, RedisLink};

#[derive(Debug, Serialize, Deserialize)]
struct CidrBanRecord {
    until_ms: u64,
    reason: String,
    source: String,
    at_ms: u64,
    dur_ms: u64,
}

impl Bans {
    /// A decision found `key` banned: the one place a decision's ban
    /// reaches the ban service. The cache learns it at once, so the
    /// client's next requests cost no store call. For a ban this request
    /// made (`made`), the record is written, the fleet told and the audit
    /// log appended: before the client hears of it for a ban Redis made (so
    /// what the client was told is already listed and audited; a ban is
    /// rare, and the banned client is the one that waits), in the
    /// background for one the local fallback made (Redis is failing then,
    /// and the write-back brings it to Redis when it returns).
    pub(crate) async fn decided(
        self: &Arc<Self>,
        key: ClientKey,
        remaining_ms: u64,
        made: Option<BanMade>,
    ) {
        let Some(made) = made else {
            self.cache
                .insert_key(key, Duration::from_millis(remaining_ms));
            return;
        };
        self.cache
            .insert_key(key, Duration::from_millis(made.dur_ms));
        if made.by_redis {
            self.record_auto_ban(key, made).await;
        } else {
            let bans = self.clone();
            actix_web::rt::spawn(async move { bans.record_auto_ban(key, made).await });
        }
    }

    /// Writes an automatic ban's record (for a ban `decide.lua` made), tells
    /// the other nodes and appends to the audit log.
    async fn record_auto_ban(&self, key: ClientKey, made: BanMade) {
        crate::metrics::ban_made("auto");
        log::warn!(
            "banned {} for {}s (strike {}, {})",
            key,
            made.dur_ms / 1000,
            made.strikes,
            made.reason
        );
        let subject = key.to_string();
        // decide.lua enforces the ban from the subject's state hash (one key
        // per subject); the record the admin API lists and reconcile reads
        // is written here, which also tells the other nodes and the audit
        // log. A ban the local store made while Redis answers (a decision
        // past the cap, one failed call) is written now too, so the fleet
        // and the admin API see it at once; the write-back keeps the rest.
        if made.by_redis || made.redis_answers {
            match self
                .write_ban(
                    BanTarget::Key(key),
                    made.dur_ms,
                    &made.reason,
                    "auto",
                    made.strikes,
                    true,
                )
                .await
            {
                Ok(_) => {
                    if !made.by_redis {
                        self.local.forget_made_ban(&key_tag(&key));
                    }
                    return;
                }
                Err(e) => log::warn!(
                    "the ban of {subject} is enforced, but its record could not be written: {e}"
                ),
            }
        }
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

    /// Redis' clock in ms, so every node computes the same ban ends.
    pub(super) async fn redis_now_ms(link: &RedisLink) -> Result<u64, RedisFailure> {
        let (s, us): (u64, u64) = link
            .query_within(&redis::cmd("TIME"), link.admin_timeout())
            .await?;
        Ok(s * 1000 + us / 1000)
    }

    /// An operator's ban.
    pub(crate) async fn ban(
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

    pub(super) async fn write_ban(
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
                let ban = BanWrite {
                    dur_ms,
                    reason,
                    memory_ms: self.params.load().memory_ms,
                    source,
                    strikes,
                    keep_longer,
                };
                let w = scripts::write(link, &self.prefix, &key_tag(&key), &ban).await?;
                self.cache.insert_key(
                    key,
                    Duration::from_millis(w.until_ms.saturating_sub(w.now_ms)),
                );
                BanView::new(
                    subject.clone(),
                    w.until_ms,
                    w.now_ms,
                    reason.into(),
                    w.strikes,
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
                let now_ms = crate::limiter::wall_clock_us() / 1000;
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
    pub(crate) async fn unban(&self, target: BanTarget, reason: &str) -> Result<bool, BanError> {
        let subject = target.subject();
        let lifted = match (&self.link, target) {
            (Some(link), BanTarget::Key(key)) => {
                let tag = key_tag(&key);
                let lifted = scripts::lift(link, &self.prefix, &tag).await?;
                self.cache.remove_key(&key);
                self.local.unban(&tag);
                lifted
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

    pub(super) async fn cidr_bans_from_redis(
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
    pub(crate) async fn list(&self) -> Result<Vec<BanView>, BanError> {
        let Some(link) = &self.link else {
            let now_ms = crate::limiter::wall_clock_us() / 1000;
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

    /// The active ban of subject `tag` in Redis, if any.
    pub(super) async fn inspect_tag(
        &self,
        link: &RedisLink,
        tag: &str,
    ) -> Result<Option<BanView>, RedisFailure> {
        let i = scripts::inspect(link, &self.prefix, tag).await?;
        if i.until_ms <= i.now_ms {
            return Ok(None);
        }
        Ok(Some(BanView::new(
            tag.strip_prefix("ip:").unwrap_or(tag).to_string(),
            i.until_ms,
            i.now_ms,
            i.reason,
            i.strikes,
            i.source,
        )))
    }

    /// One subject's active ban.
    pub(crate) async fn get(&self, target: BanTarget) -> Result<Option<BanView>, BanError> {
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
}
