//! The configuration file: serde types, defaults and validation.
//!
//! The file is read and validated once, at start-up. Every problem becomes a
//! [`ConfigError`] whose `Display` is one line naming the file, the key and
//! what is wrong, so `floodgate --check` can print it and exit 2. Nothing
//! later in the program re-validates: the rest of the gateway takes a
//! [`Config`] as proof that its values are sound.
//!
//! This file holds [`Config`] as a whole, reading it and the order of the
//! checks. Each section's types, defaults and checks live in a file of its
//! own: `server.rs`, `redis.rs`, `pools.rs` (`[upstream]`, `[upstreams.NAME]`,
//! `[[routes]]`), `rules.rs`, `consumers.rs` (`[consumers]`, `[plans.NAME]`)
//! and `ban.rs` (`[ban]`, the allowlist, `[client_ip]`); `summary.rs` is the
//! `--check` output and `error.rs` the error types.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

mod ban;
mod blocklists;
mod consumers;
mod cost;
mod crowdsec;
mod error;
mod identity;
mod pools;
mod redis;
mod rules;
mod server;
mod summary;

pub(crate) use ban::{parse_cidr, BanConfig, ClientIpConfig};
pub(crate) use blocklists::BlocklistConfig;
pub(crate) use consumers::UnknownKeys;
pub(crate) use consumers::{check_consumer_key, ConsumersConfig, PlanConfig};
pub(crate) use cost::{CostConfig, MAX_COST};
pub(crate) use crowdsec::CrowdsecConfig;
pub(crate) use error::{ConfigError, Invalid};
pub(crate) use identity::{InvalidToken, JwtConfig};
pub(crate) use pools::{HealthConfig, RouteConfig, UpstreamConfig};
pub(crate) use redis::{OnFailure, RedisConfig};
pub(crate) use rules::{LimitConfig, RuleConfig};
pub(crate) use server::{ServerConfig, TlsConfig};

use ban::de_cidrs;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// `None` runs the gateway on its in-process store only (no Redis).
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    pub upstream: UpstreamConfig,
    /// `[upstreams.NAME]`: named pools that `[[routes]]` send requests to.
    #[serde(default)]
    pub(crate) upstreams: BTreeMap<String, UpstreamConfig>,
    /// `[[routes]]`: which pool a request goes to; first match wins.
    #[serde(default)]
    pub(crate) routes: Vec<RouteConfig>,
    #[serde(default)]
    pub(crate) client_ip: ClientIpConfig,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    #[serde(default)]
    pub ban: BanConfig,
    /// CIDRs (or bare addresses) that are never limited nor banned.
    #[serde(default, deserialize_with = "de_cidrs")]
    pub(crate) allowlist: Vec<IpNet>,
    /// `[consumers]`: who a request's consumer is, and its plan.
    #[serde(default)]
    pub(crate) consumers: Option<ConsumersConfig>,
    /// `[plans.NAME]`: the rules each plan gives its consumers.
    #[serde(default)]
    pub(crate) plans: BTreeMap<String, PlanConfig>,
    /// `[jwt]`: how bearer tokens are verified for `jwt:<claim>` keys.
    #[serde(default)]
    pub(crate) jwt: Option<JwtConfig>,
    /// `[crowdsec]`: the CrowdSec Local API this node is a bouncer of.
    #[serde(default)]
    pub(crate) crowdsec: Option<CrowdsecConfig>,
    /// `[[blocklists]]`: files of addresses whose clients are refused.
    #[serde(default)]
    pub(crate) blocklists: Vec<BlocklistConfig>,
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub(crate) fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "-".into(),
            message: format!("cannot read the file: {e}"),
        })?;
        Self::parse(&text, &file)
    }

    /// Parses and validates `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| ConfigError::from_toml(file, text, &e))?;
        let moved = std::mem::take(&mut config.ban.allowlist);
        config.allowlist.extend(moved);
        config.validate().map_err(|e| e.in_file(file))?;
        Ok(config)
    }

    /// Every section's checks. The first problem found is the one reported,
    /// so the order is part of the behaviour: the hardening limits, then
    /// the upper bounds on durations, then each section in full.
    fn validate(&self) -> Result<(), Invalid> {
        self.server.validate_hardening()?;
        self.ban.validate_prefixes()?;
        self.server.validate_bounds()?;
        self.ban.validate_bounds()?;
        if let Some(r) = &self.redis {
            r.validate_bounds()?;
        }
        pools::validate(self)?;
        self.server.validate()?;
        if let Some(r) = &self.redis {
            r.validate()?;
        }
        self.client_ip.validate()?;
        let mut names = HashSet::new();
        rules::validate(&self.rules, &mut names)?;
        consumers::validate_plans(self, &mut names)?;
        blocklists::validate(&self.blocklists)?;
        identity::validate(self)?;
        if let Some(c) = &self.crowdsec {
            crowdsec::validate(c)?;
        }
        self.ban.validate()
    }
}

/// A day: the bound on most timeouts and intervals.
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Refuses `value` at `key` when it is longer than `max`. Upper bounds keep
/// every later conversion (ms in u64/i64, Redis PEXPIRE, RFC 3339 dates) far
/// from overflow.
fn at_most(key: &str, value: Duration, max: Duration) -> Result<(), Invalid> {
    if value > max {
        return Err(Invalid::new(
            key,
            format!(
                "{} is longer than the most allowed, {}",
                humantime::format_duration(value),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}

/// What the sections' tests share: the smallest valid file, and parsing it
/// with more appended.
#[cfg(test)]
mod test_util {
    use super::{Config, ConfigError};

    /// The smallest valid file: the one section without defaults.
    pub(crate) const BASE: &str = "[upstream]\nurls = [\"http://127.0.0.1:3000\"]\n";

    /// Parses [`BASE`] with `extra` after it.
    pub(crate) fn parse(extra: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{BASE}{extra}"), "t.toml")
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::parse;

    #[test]
    fn minimal_file_gets_defaults() {
        let c = parse("").expect("valid");
        assert_eq!(c.server.listen.port(), 8080);
        assert_eq!(c.ban.after, 20);
        assert!(c.redis.is_none());
    }
}
