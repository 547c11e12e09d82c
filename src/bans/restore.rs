//! When Redis forgets: restoring bans into a Redis that lost its data, and
//! writing back the bans the local store made during an outage.
//!
//! Both run from reconcile or breaker recovery, never per request. They are
//! separate because they are the answer to one question an operator asks
//! ("what happens when Redis loses its data or goes away?"), and each step
//! must be safe to repeat on several nodes at once.

use ipnet::IpNet;

use super::{key_tag, BanError, BanTarget, Bans};
use crate::keys;
use crate::redis_link::{RedisFailure, RedisLink};

impl Bans {
    /// True when Redis lost its data since this node last looked (the
    /// dataset marker changed or vanished); sets the marker if missing.
    /// Returns the marker to remember once whatever it calls for is done
    /// (`None` when nothing changed).
    pub(super) async fn redis_lost_data(
        &self,
        link: &RedisLink,
    ) -> Result<(bool, Option<String>), RedisFailure> {
        let key = keys::epoch(&self.prefix);
        let fresh = format!(
            "{:x}-{}",
            crate::limiter::wall_clock_us(),
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
    pub(super) async fn restore(&self) -> Result<(), BanError> {
        // Bans made by the local store go first, with their own reason and
        // strikes; what is left of the cache is restored after them.
        self.write_back_local_bans().await;
        let keys = self.cache.key_bans();
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

    /// Writes bans made by the local store during an outage back to Redis,
    /// so they hold on every node and survive restarts.
    pub(crate) async fn write_back_local_bans(&self) {
        let now_ms = crate::limiter::wall_clock_us() / 1000;
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
