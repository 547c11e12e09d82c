//! The runtime allowlist: networks added by operators on top of the
//! config's, kept in a Redis set and mirrored in every node's cache.
//!
//! Adding a network lifts the bans inside it, so it lives apart from plain
//! ban and unban: it is a policy over many subjects at once.

use ipnet::IpNet;

use super::{events::BanEvent, BanError, BanTarget, Bans};
use crate::keys;
use crate::redis_link::{RedisFailure, RedisLink};

impl Bans {
    /// Adds a runtime allowlist entry and lifts the bans inside it.
    pub(crate) async fn allow(&self, net: IpNet) -> Result<Vec<String>, BanError> {
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
    pub(crate) async fn unallow(&self, net: IpNet) -> Result<bool, BanError> {
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
    pub(crate) async fn allowlist(&self) -> Result<Vec<IpNet>, BanError> {
        match &self.link {
            Some(link) => Ok(self.allowlist_from_redis(link).await?),
            None => Ok(self.cache.runtime_allowlist()),
        }
    }

    pub(super) async fn allowlist_from_redis(
        &self,
        link: &RedisLink,
    ) -> Result<Vec<IpNet>, RedisFailure> {
        let cmd = redis::cmd("SMEMBERS")
            .arg(keys::allowlist(&self.prefix))
            .clone();
        let raw: Vec<String> = link.query_within(&cmd, link.admin_timeout()).await?;
        let mut nets: Vec<IpNet> = raw.iter().filter_map(|s| s.parse().ok()).collect();
        nets.sort();
        Ok(nets)
    }
}
