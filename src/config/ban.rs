//! `[ban]`, the allowlist and `[client_ip]`: who a client is, and when it
//! is banned or never limited, with the CIDR parsing they share (and the
//! admin API uses). Apart because these are about addresses, not requests.

use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::{at_most, Invalid, DAY};

/// `[ban]`: escalation for repeat offenders.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BanConfig {
    pub(crate) enabled: bool,
    pub(crate) after: u32,
    #[serde(with = "humantime_serde")]
    pub(crate) within: Duration,
    #[serde(with = "humantime_serde")]
    pub(crate) duration: Duration,
    pub(crate) factor: f64,
    #[serde(with = "humantime_serde")]
    pub(crate) max_duration: Duration,
    #[serde(with = "humantime_serde")]
    pub(crate) memory: Duration,
    pub(crate) status: u16,
    /// Length the audit stream is trimmed to (approximately, oldest first).
    pub(crate) audit_max_len: u64,
    /// How often each node re-reads bans and the allowlist from Redis.
    #[serde(with = "humantime_serde")]
    pub(crate) reconcile_interval: Duration,
    /// Same as the top-level `allowlist`: TOML puts a key written after
    /// `[ban]` inside it, so both places are read and merged.
    #[serde(deserialize_with = "de_cidrs")]
    pub(crate) allowlist: Vec<IpNet>,
    /// Operators cannot ban or allowlist an IPv4 network wider than this
    /// (without `force`).
    pub min_prefix_v4: u8,
    /// The same for IPv6.
    pub min_prefix_v6: u8,
}

impl Default for BanConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            after: 20,
            within: Duration::from_secs(10),
            duration: Duration::from_secs(60),
            factor: 2.0,
            max_duration: Duration::from_secs(24 * 3600),
            memory: Duration::from_secs(24 * 3600),
            status: 429,
            audit_max_len: 100_000,
            reconcile_interval: Duration::from_secs(10),
            allowlist: Vec::new(),
            min_prefix_v4: 8,
            min_prefix_v6: 32,
        }
    }
}

impl BanConfig {
    /// The widest networks operators may ban: prefix lengths that exist.
    /// Part of the hardening limits, checked right after `[server]`'s.
    pub(super) fn validate_prefixes(&self) -> Result<(), Invalid> {
        if self.min_prefix_v4 > 32 {
            return Err(Invalid::new("ban.min_prefix_v4", "must be from 0 to 32"));
        }
        if self.min_prefix_v6 > 128 {
            return Err(Invalid::new("ban.min_prefix_v6", "must be from 0 to 128"));
        }
        Ok(())
    }

    /// Upper bounds on the section's durations, enabled or not: they keep
    /// ban expiries (ms in u64/i64, Redis PEXPIRE, RFC 3339 dates) far from
    /// overflow.
    pub(super) fn validate_bounds(&self) -> Result<(), Invalid> {
        const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
        at_most("ban.within", self.within, TEN_YEARS)?;
        at_most("ban.duration", self.duration, TEN_YEARS)?;
        at_most("ban.max_duration", self.max_duration, TEN_YEARS)?;
        at_most("ban.memory", self.memory, TEN_YEARS)?;
        at_most("ban.reconcile_interval", self.reconcile_interval, DAY)
    }

    /// The escalation's numbers (when it is on), the status, the audit
    /// stream's length and the reconcile interval.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.enabled {
            if self.after == 0 {
                return Err(Invalid::new("ban.after", "must be at least 1"));
            }
            if self.within.is_zero() {
                return Err(Invalid::new("ban.within", "must be greater than 0"));
            }
            if self.duration.is_zero() {
                return Err(Invalid::new("ban.duration", "must be greater than 0"));
            }
            if !self.factor.is_finite() || self.factor < 1.0 {
                return Err(Invalid::new(
                    "ban.factor",
                    format!("must be at least 1.0, got {}", self.factor),
                ));
            }
            if self.max_duration < self.duration {
                return Err(Invalid::new(
                    "ban.max_duration",
                    "must be at least ban.duration",
                ));
            }
        }
        if self.status != 429 && self.status != 403 {
            return Err(Invalid::new(
                "ban.status",
                format!("must be 429 or 403, got {}", self.status),
            ));
        }
        if self.audit_max_len == 0 {
            return Err(Invalid::new("ban.audit_max_len", "must be at least 1"));
        }
        if self.reconcile_interval.is_zero() {
            return Err(Invalid::new(
                "ban.reconcile_interval",
                "must be greater than 0",
            ));
        }
        Ok(())
    }
}

/// `[client_ip]`: who is asking.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ClientIpConfig {
    #[serde(deserialize_with = "de_cidrs")]
    pub(crate) trusted_proxies: Vec<IpNet>,
    pub(crate) ipv6_prefix: u8,
}

impl Default for ClientIpConfig {
    fn default() -> Self {
        Self {
            trusted_proxies: vec![
                "127.0.0.1/32".parse().expect("literal CIDR"),
                "::1/128".parse().expect("literal CIDR"),
            ],
            ipv6_prefix: 64,
        }
    }
}

impl ClientIpConfig {
    /// The IPv6 prefix that makes one client is a real prefix length.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.ipv6_prefix == 0 || self.ipv6_prefix > 128 {
            return Err(Invalid::new(
                "client_ip.ipv6_prefix",
                "must be between 1 and 128",
            ));
        }
        Ok(())
    }
}

/// Reads a list of CIDRs or bare addresses, refusing the file at the first
/// one that is neither.
pub(super) fn de_cidrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let raw: Vec<String> = Vec::deserialize(d)?;
    raw.iter()
        .map(|s| parse_cidr(s).map_err(serde::de::Error::custom))
        .collect()
}

/// Parses `10.0.0.0/8`, or a bare address as a host route (`/32`, `/128`).
pub(crate) fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`{s}` is not an IP address or CIDR (e.g. 10.0.0.0/8)"))
}

#[cfg(test)]
mod tests {
    use super::parse_cidr;
    use crate::config::test_util::{parse, BASE};
    use crate::config::Config;

    #[test]
    fn bad_cidr_is_refused() {
        let e =
            Config::parse(&format!("allowlist = [\"10.0.0.0/33\"]\n{BASE}"), "t.toml").unwrap_err();
        assert!(e.message.contains("10.0.0.0/33"), "{e}");
        assert_eq!(e.key, "allowlist");
    }

    #[test]
    fn allowlist_after_ban_section_is_read_too() {
        let text =
            format!("allowlist = [\"10.0.0.0/8\"]\n{BASE}[ban]\nallowlist = [\"192.0.2.1\"]\n");
        let c = Config::parse(&text, "t.toml").unwrap();
        assert_eq!(c.allowlist.len(), 2);
    }

    #[test]
    fn prefix_limits_are_bounded_and_named() {
        assert_eq!(parse("").expect("valid").ban.min_prefix_v4, 8);
        let extra = "[ban]\nmin_prefix_v6 = 129\n";
        assert_eq!(parse(extra).unwrap_err().key, "ban.min_prefix_v6");
    }

    #[test]
    fn bare_address_is_a_host_route() {
        assert_eq!(parse_cidr("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
    }
}
