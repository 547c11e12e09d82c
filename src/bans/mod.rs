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
//!
//! The parts, one file each:
//!
//! - [`cache`]: the per-node view the hot path reads;
//! - `service`: ban, unban, list and look up one subject;
//! - `allowlist`: the runtime allowlist;
//! - [`audit`]: the append-only audit stream;
//! - [`breadth`]: how wide a network an operator may ban or allowlist;
//! - [`events`]: pub/sub, heartbeats and reconcile;
//! - `restore`: what happens when Redis loses its data or goes away;
//! - `scripts`: the ban scripts' arguments and replies, typed.
//!
//! This file holds the shared types and the [`Bans`] service's state.

pub(crate) mod audit;
pub(crate) mod breadth;
pub(crate) mod cache;
pub(crate) mod events;

mod allowlist;
mod restore;
mod scripts;
mod service;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub(crate) use audit::AuditEvent;
pub(crate) use breadth::Breadth;
pub(crate) use cache::BanCache;
pub(crate) use events::{BanEvent, Follower};

use crate::client_ip::ClientKey;
use crate::limiter::{BanParams, LocalStore};
use crate::redis_link::{RedisFailure, RedisLink};

/// What an operator can ban: one client key, or a whole network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BanTarget {
    Key(ClientKey),
    Cidr(IpNet),
}

impl BanTarget {
    /// Parses an address or CIDR. An IPv6 address or a network narrower
    /// than `ipv6_prefix` means the client key that contains it.
    pub(crate) fn parse(s: &str, ipv6_prefix: u8) -> Result<BanTarget, String> {
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
    pub(crate) fn subject(&self) -> String {
        match self {
            BanTarget::Key(k) => k.to_string(),
            BanTarget::Cidr(n) => n.to_string(),
        }
    }
}

/// The Redis subject tag of a client key.
pub(crate) fn key_tag(key: &ClientKey) -> String {
    crate::rules::Subject::Ip(*key).tag()
}

/// A ban as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct BanView {
    pub(crate) subject: String,
    /// RFC 3339.
    pub(crate) until: String,
    /// Whole seconds left, rounded up.
    pub(crate) remaining: u64,
    pub(crate) reason: String,
    pub(crate) strikes: u32,
    pub(crate) source: String,
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
pub(crate) fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// What went wrong with an operator's request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BanError {
    #[error("Redis is unavailable: {0}")]
    Unavailable(#[from] RedisFailure),
}

/// The ban and allowlist service: shared truth plus this node's mirror.
pub(crate) struct Bans {
    cache: Arc<BanCache>,
    link: Option<Arc<RedisLink>>,
    local: Arc<LocalStore>,
    prefix: String,
    /// Escalation settings; a reload replaces them.
    params: arc_swap::ArcSwap<BanParams>,
    node: String,
    audit_max_len: u64,
    ipv6_prefix: u8,
    local_audit: Mutex<VecDeque<AuditEvent>>,
    local_seq: std::sync::atomic::AtomicU64,
    /// The Redis dataset marker last seen (see [`keys::epoch`]).
    epoch: Mutex<Option<String>>,
    /// Kept in step by the same events and reconciles (the consumer
    /// table, the limiter's leases).
    followers: Mutex<Vec<Arc<dyn events::Follower>>>,
}

impl Bans {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
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
            params: arc_swap::ArcSwap::from_pointee(params),
            node,
            audit_max_len,
            ipv6_prefix,
            local_audit: Mutex::new(VecDeque::new()),
            local_seq: std::sync::atomic::AtomicU64::new(0),
            epoch: Mutex::new(None),
            followers: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn cache(&self) -> &Arc<BanCache> {
        &self.cache
    }

    pub(crate) fn ipv6_prefix(&self) -> u8 {
        self.ipv6_prefix
    }

    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    /// Applies new escalation settings (a reload) to the bans made after it.
    pub(crate) fn set_params(&self, params: BanParams) {
        self.params.store(Arc::new(params));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
