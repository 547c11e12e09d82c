//! `[redis]`: where the shared state lives and what the gateway does when
//! it cannot be asked, with its defaults and checks. Apart because the whole
//! section is optional: without it the gateway runs on its in-process store.

use std::time::Duration;

use serde::Deserialize;

use super::{at_most, Invalid, DAY};

/// What the gateway does while Redis cannot be asked (SPEC §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OnFailure {
    /// Enforce the same rules in-process, per node.
    Local,
    /// Forward everything (fail-open).
    Allow,
    /// Answer 503 to everything (fail-closed).
    Deny,
}

impl std::fmt::Display for OnFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnFailure::Local => "local",
            OnFailure::Allow => "allow",
            OnFailure::Deny => "deny",
        })
    }
}

/// `[redis]`: where the shared state lives.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub(crate) url: Option<String>,
    /// Seed nodes of a Redis Cluster; excludes `url`.
    pub(crate) cluster: Vec<String>,
    pub(crate) key_prefix: String,
    /// Bound on every Redis call; past it the call counts as failed.
    #[serde(with = "humantime_serde")]
    pub(crate) timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(crate) connect_timeout: Duration,
    pub(crate) on_failure: OnFailure,
    /// Consecutive failed calls that open the circuit breaker.
    pub(crate) breaker_failures: u32,
    /// How often Redis is probed while the breaker is open.
    #[serde(with = "humantime_serde")]
    pub(crate) probe_interval: Duration,
    /// Coalesce the decisions that arrive together on one worker into one
    /// script call (standalone Redis; a Cluster decides one call each).
    pub(crate) coalesce: bool,
    /// Per-node cap on Redis decision calls per second; past it a decision
    /// uses `on_failure`. 0 = no cap.
    pub(crate) max_decisions_per_second: u32,
    /// How long a node may admit requests from tokens it charged in Redis
    /// beforehand (leased tokens); 0 turns leases off.
    #[serde(with = "humantime_serde")]
    pub(crate) lease: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            cluster: Vec::new(),
            key_prefix: "fg:".into(),
            timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_millis(500),
            on_failure: OnFailure::Local,
            breaker_failures: 3,
            probe_interval: Duration::from_millis(500),
            coalesce: true,
            max_decisions_per_second: 0,
            lease: Duration::from_millis(100),
        }
    }
}

impl RedisConfig {
    /// The upper bounds on the section's durations.
    pub(super) fn validate_bounds(&self) -> Result<(), Invalid> {
        at_most("redis.timeout", self.timeout, DAY)?;
        at_most("redis.lease", self.lease, Duration::from_secs(60))?;
        at_most("redis.connect_timeout", self.connect_timeout, DAY)?;
        at_most("redis.probe_interval", self.probe_interval, DAY)
    }

    /// One way to reach Redis, by plain `redis://` URLs; a key prefix that
    /// SCAN MATCH and Cluster hash tags read literally; no zero timeouts.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        match (&self.url, self.cluster.is_empty()) {
            (Some(_), false) => {
                return Err(Invalid::new(
                    "redis.cluster",
                    "give either redis.url or redis.cluster, not both",
                ))
            }
            (None, true) => {
                return Err(Invalid::new(
                    "redis.url",
                    "give redis.url, redis.cluster, or leave out [redis] to run without Redis",
                ))
            }
            _ => {}
        }
        for (i, u) in self.url.iter().chain(self.cluster.iter()).enumerate() {
            let key = || {
                if self.url.is_some() {
                    "redis.url".to_string()
                } else {
                    format!("redis.cluster[{i}]")
                }
            };
            if u.starts_with("rediss://") {
                return Err(Invalid::new(
                    key(),
                    "TLS to Redis (rediss://) is not supported yet; use redis://",
                ));
            }
            if !u.starts_with("redis://") {
                return Err(Invalid::new(key(), format!("`{u}` is not a redis:// URL")));
            }
        }
        if self.key_prefix.contains(['*', '?', '[', ']', '\\']) {
            return Err(Invalid::new(
                "redis.key_prefix",
                "must not contain glob characters * ? [ ] \\ (keys are listed with SCAN MATCH)",
            ));
        }
        if self.key_prefix.contains(['{', '}']) {
            return Err(Invalid::new(
                "redis.key_prefix",
                "must not contain `{` or `}` (they mark hash tags)",
            ));
        }
        if self.timeout.is_zero() {
            return Err(Invalid::new("redis.timeout", "must be greater than 0"));
        }
        if self.connect_timeout.is_zero() {
            return Err(Invalid::new(
                "redis.connect_timeout",
                "must be greater than 0",
            ));
        }
        if self.breaker_failures == 0 {
            return Err(Invalid::new("redis.breaker_failures", "must be at least 1"));
        }
        if self.probe_interval.is_zero() {
            return Err(Invalid::new(
                "redis.probe_interval",
                "must be greater than 0",
            ));
        }
        Ok(())
    }
}
