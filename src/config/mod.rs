//! The configuration file: serde types, defaults and validation.
//!
//! The file is read and validated once, at start-up. Every problem becomes a
//! [`ConfigError`] whose `Display` is one line naming the file, the key and
//! what is wrong, so `floodgate --check` can print it and exit 2. Nothing
//! later in the program re-validates: the rest of the gateway takes a
//! [`Config`] as proof that its values are sound.
//!
//! The upstream part (`[upstream]`, `[upstreams.NAME]`, `health`,
//! `[[routes]]`) and its checks live in `pools.rs`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

mod pools;

pub use crate::policy::{KeyKind, Period};
pub use pools::{HealthConfig, RouteConfig, RouteMatch, UpstreamConfig};
/// Headers actix-http parses at most: a request with more gets 400 before
/// floodgate sees it, so `server.max_headers` can only be lower.
pub const MAX_HEADERS_PARSED: usize = 96;
/// Bytes of request head actix-http buffers at most (431 past it).
pub const MAX_HEAD_PARSED: usize = 128 * 1024;

/// A configuration problem, rendered as one line for operators.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    /// The file that was read.
    pub file: String,
    /// The key (dotted path) at fault, or `-` when the whole file is.
    pub key: String,
    /// What is wrong and, where it helps, how to fix it.
    pub message: String,
}

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
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// `[[routes]]`: which pool a request goes to; first match wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub client_ip: ClientIpConfig,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    #[serde(default)]
    pub ban: BanConfig,
    /// CIDRs (or bare addresses) that are never limited nor banned.
    #[serde(default, deserialize_with = "de_cidrs")]
    pub allowlist: Vec<IpNet>,
    /// `[consumers]`: who a request's consumer is, and its plan.
    #[serde(default)]
    pub consumers: Option<ConsumersConfig>,
    /// `[plans.NAME]`: the rules each plan gives its consumers.
    #[serde(default)]
    pub plans: BTreeMap<String, PlanConfig>,
}

/// `[server]`: the listeners and the process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token_env: String,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Worker threads of the public listener; 0 = one per core.
    pub workers: usize,
    /// Name of this node in the audit log; default: host name and pid.
    pub node_id: Option<String>,
    /// A client that takes no response bytes for this long is disconnected
    /// (its upstream connection with it).
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// A client that sends nothing of its request body for this long gets
    /// 408.
    #[serde(with = "humantime_serde")]
    pub client_body_timeout: Duration,
    /// Largest request body in bytes, sized or chunked; 0 = no limit.
    pub max_body_size: u64,
    /// Response bytes buffered per client connection before the gateway
    /// stops reading from the upstream.
    pub response_buffer: usize,
    /// Most request headers (values) a request may carry.
    pub max_headers: usize,
    /// Most bytes in a request's header section (names, values, separators).
    pub max_header_bytes: usize,
    /// Identical warnings are written at most once per this; 0 = every one.
    #[serde(with = "humantime_serde")]
    pub log_throttle: Duration,
    /// `[server.tls]`: serve HTTPS (HTTP/2 and HTTP/1.1) instead of plain HTTP/1.1.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: the certificate the front door presents. Relative paths
/// are read from the config file's directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, RSA or EC; PKCS#1 and SEC1 are read too).
    pub key: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            admin_token_env: "FLOODGATE_ADMIN_TOKEN".into(),
            shutdown_timeout: Duration::from_secs(10),
            workers: 0,
            node_id: None,
            tls: None,
            send_timeout: Duration::from_secs(30),
            client_body_timeout: Duration::from_secs(30),
            max_body_size: 1 << 30,
            response_buffer: 8 * 1024,
            max_headers: 64,
            max_header_bytes: 32 * 1024,
            log_throttle: Duration::from_secs(10),
        }
    }
}

/// What the gateway does while Redis cannot be asked (SPEC §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
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
    pub url: Option<String>,
    /// Seed nodes of a Redis Cluster; excludes `url`.
    pub cluster: Vec<String>,
    pub key_prefix: String,
    /// Bound on every Redis call; past it the call counts as failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub on_failure: OnFailure,
    /// Consecutive failed calls that open the circuit breaker.
    pub breaker_failures: u32,
    /// How often Redis is probed while the breaker is open.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Coalesce the decisions that arrive together on one worker into one
    /// script call (standalone Redis; a Cluster decides one call each).
    pub coalesce: bool,
    /// Per-node cap on Redis decision calls per second; past it a decision
    /// uses `on_failure`. 0 = no cap.
    pub max_decisions_per_second: u32,
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
        }
    }
}

/// `[client_ip]`: who is asking.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientIpConfig {
    #[serde(deserialize_with = "de_cidrs")]
    pub trusted_proxies: Vec<IpNet>,
    pub ipv6_prefix: u8,
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

/// Which requests a rule applies to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    pub path_prefix: Option<String>,
    pub methods: Option<Vec<String>>,
    pub host: Option<String>,
    /// Compare `path_prefix` with regard to case (default: case folded).
    #[serde(default)]
    pub case_sensitive: bool,
}

/// One `[[rules]]` entry, or one rule of a plan. A rule is one of three
/// kinds: a token bucket (`rate`, `per`, `burst`), a calendar quota
/// (`quota`, `period`) or a concurrency cap (`concurrency`); validation
/// makes sure exactly one kind's keys are given ([`RuleConfig::limit`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: MatchConfig,
    /// Required in `[[rules]]`; never given in a plan (its subject is the
    /// consumer).
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub rate: Option<f64>,
    #[serde(default, with = "humantime_serde::option")]
    pub per: Option<Duration>,
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default = "one")]
    pub cost: u32,
    #[serde(default)]
    pub quota: Option<u64>,
    #[serde(default)]
    pub period: Option<Period>,
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// How long a concurrency slot outlives a node that died holding it.
    #[serde(default, with = "humantime_serde::option")]
    pub lease: Option<Duration>,
    #[serde(default)]
    pub shadow: bool,
}

/// The kind of limit a validated rule is, with its numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LimitConfig {
    Rate {
        rate: f64,
        per: Duration,
        burst: u32,
    },
    Quota {
        quota: u64,
        period: Period,
    },
    Concurrency {
        max: u32,
        lease: Duration,
    },
}

impl RuleConfig {
    /// The limit in words, for `--check`.
    pub fn describe(&self) -> String {
        let shadow = if self.shadow { " (shadow)" } else { "" };
        match self.limit() {
            LimitConfig::Rate { rate, per, burst } => format!(
                "{rate} per {}, burst {burst}, cost {}{shadow}",
                humantime::format_duration(per),
                self.cost
            ),
            LimitConfig::Quota { quota, period } => format!(
                "quota {quota} per calendar {} (UTC), cost {}{shadow}",
                period.name(),
                self.cost
            ),
            LimitConfig::Concurrency { max, lease } => format!(
                "at most {max} in flight (lease {}){shadow}",
                humantime::format_duration(lease)
            ),
        }
    }
}

/// A concurrency slot's lease when the rule names none.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

impl RuleConfig {
    /// The rule's limit. Only meaningful on a validated config (a rule
    /// missing its numbers reads as a rate of 1 per second).
    pub fn limit(&self) -> LimitConfig {
        if let Some(quota) = self.quota {
            return LimitConfig::Quota {
                quota,
                period: self.period.unwrap_or(Period::Day),
            };
        }
        if let Some(max) = self.concurrency {
            return LimitConfig::Concurrency {
                max,
                lease: self.lease.unwrap_or(DEFAULT_LEASE),
            };
        }
        LimitConfig::Rate {
            rate: self.rate.unwrap_or(1.0),
            per: self.per.unwrap_or(Duration::from_secs(1)),
            burst: self.burst.unwrap_or(1),
        }
    }
}

fn one() -> u32 {
    1
}

/// `[consumers]`: how a request's consumer (an API key) is found, and which
/// plan it gets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumersConfig {
    /// `header:<Name>`: the header carrying the consumer's key.
    pub key: String,
    /// The plan of requests with an unknown or missing key; none: such
    /// requests get no plan rules.
    #[serde(default)]
    pub default_plan: Option<String>,
    /// Static key -> plan assignments (runtime ones come from the admin API
    /// and win over these).
    #[serde(default)]
    pub keys: BTreeMap<String, String>,
}

/// `[plans.NAME]`: the rules a plan gives each of its consumers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// The longest consumer key accepted (config, header or admin API): a
/// longer header is refused with 400, never truncated into collisions.
pub const MAX_CONSUMER_KEY_LEN: usize = 256;

/// Whether `key` can be a consumer key: 1 to 256 bytes that can travel in a
/// header value, with no space at either end (HTTP strips it).
pub fn check_consumer_key(key: &[u8]) -> Result<(), String> {
    if key.is_empty() {
        return Err("a consumer key cannot be empty".into());
    }
    if key.len() > MAX_CONSUMER_KEY_LEN {
        return Err(format!(
            "a consumer key is at most {MAX_CONSUMER_KEY_LEN} bytes, this one has {}",
            key.len()
        ));
    }
    if actix_web::http::header::HeaderValue::from_bytes(key).is_err()
        || key.iter().any(|b| b.is_ascii_control())
        || key.first().is_some_and(|b| *b == b' ' || *b == b'\t')
        || key.last().is_some_and(|b| *b == b' ' || *b == b'\t')
    {
        return Err("a consumer key must be printable and have no space at either end".into());
    }
    Ok(())
}

/// Plan and rule names: what headers, metrics and Redis fields can carry.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Checks one rule; on error returns the key below the rule (`.rate`, or
/// `""` for the rule as a whole) and the message.
fn check_rule(rule: &RuleConfig, in_plan: bool) -> Result<(), (String, String)> {
    let err = |k: &str, m: String| Err((k.to_string(), m));
    let n = &rule.name;
    if !valid_name(n) {
        return err(
            ".name",
            format!("`{n}`: use 1-64 characters of A-Z a-z 0-9 - _ ."),
        );
    }
    let rate_keys = [
        ("rate", rule.rate.is_some()),
        ("per", rule.per.is_some()),
        ("burst", rule.burst.is_some()),
    ];
    let quota_keys = [
        ("quota", rule.quota.is_some()),
        ("period", rule.period.is_some()),
    ];
    let conc_keys = [
        ("concurrency", rule.concurrency.is_some()),
        ("lease", rule.lease.is_some()),
    ];
    let given: Vec<&str> = [&rate_keys[..], &quota_keys[..], &conc_keys[..]]
        .iter()
        .filter_map(|kind| kind.iter().find(|(_, set)| *set).map(|(k, _)| *k))
        .collect();
    match given.as_slice() {
        [] => {
            return err(
                ".rate",
                "missing: a rule needs rate, per and burst (a token bucket), quota and period (a calendar quota), or concurrency".into(),
            )
        }
        [a, b, ..] => {
            return err(
                "",
                format!(
                    "has both `{a}` and `{b}`: a rule is one of rate (with per and burst), quota (with period) or concurrency"
                ),
            )
        }
        _ => {}
    }
    if rule.cost == 0 {
        return err(".cost", "must be at least 1".into());
    }
    match rule.limit() {
        LimitConfig::Rate { .. } => {
            let (Some(rate), Some(per), Some(burst)) = (rule.rate, rule.per, rule.burst) else {
                let missing = rate_keys.iter().find(|(_, set)| !set).map(|(k, _)| *k);
                return err(
                    &format!(".{}", missing.unwrap_or("rate")),
                    "missing: a token bucket needs rate, per and burst".into(),
                );
            };
            if !rate.is_finite() || rate <= 0.0 {
                return err(".rate", format!("must be greater than 0, got {rate}"));
            }
            if per.is_zero() {
                return err(".per", "must be greater than 0".into());
            }
            let interval_us = per.as_secs_f64() * 1e6 / rate;
            if interval_us < 1.0 {
                return err(
                    ".rate",
                    "refills faster than one token per microsecond; lower rate or raise per".into(),
                );
            }
            if interval_us * f64::from(burst) > 1e13 {
                return err(
                    ".burst",
                    "an empty bucket would take more than ~115 days to refill (burst x per / rate)"
                        .into(),
                );
            }
            if burst == 0 {
                return err(".burst", "must be at least 1".into());
            }
            if rule.cost > burst {
                return err(
                    ".cost",
                    format!(
                        "{} is larger than burst {burst}: no request could ever pass",
                        rule.cost
                    ),
                );
            }
        }
        LimitConfig::Quota { quota, .. } => {
            if rule.quota.is_none() || rule.period.is_none() {
                return err(
                    if rule.quota.is_none() { ".quota" } else { ".period" },
                    "missing: a quota needs quota (requests) and period (\"hour\", \"day\" or \"month\")".into(),
                );
            }
            if quota == 0 || quota > 1_000_000_000_000 {
                return err(".quota", format!("must be from 1 to 10^12, got {quota}"));
            }
            if u64::from(rule.cost) > quota {
                return err(
                    ".cost",
                    format!(
                        "{} is larger than quota {quota}: no request could ever pass",
                        rule.cost
                    ),
                );
            }
        }
        LimitConfig::Concurrency { max, lease } => {
            if rule.concurrency.is_none() {
                return err(
                    ".concurrency",
                    "missing: `lease` belongs to a concurrency rule".into(),
                );
            }
            if max == 0 || max > 1_000_000 {
                return err(
                    ".concurrency",
                    format!("must be from 1 to 1000000, got {max}"),
                );
            }
            if rule.cost != 1 {
                return err(
                    ".cost",
                    "a request takes one concurrency slot; leave cost out".into(),
                );
            }
            if lease < Duration::from_millis(100) || lease > Duration::from_secs(3600) {
                return err(".lease", "must be from 100ms to 1h".into());
            }
        }
    }
    match (&rule.key, in_plan) {
        (Some(_), true) => {
            return err(
                ".key",
                "a plan's rules are keyed by the consumer ([consumers] key); leave key out".into(),
            )
        }
        (None, false) => {
            return err(
                ".key",
                "missing: give \"ip\", \"global\" or \"header:<Name>\"".into(),
            )
        }
        (Some(k), false) => {
            if let Err(m) = KeyKind::parse(k) {
                return err(".key", m);
            }
        }
        (None, true) => {}
    }
    if let Some(p) = &rule.matcher.path_prefix {
        if !p.starts_with('/') {
            return err(".match.path_prefix", format!("`{p}` must start with /"));
        }
        if p.contains(['%', '\\', ';', '?', '#'])
            || crate::path_match::normalize_path(p) != p.as_str()
        {
            return err(
                ".match.path_prefix",
                format!("`{p}`: write the path as it reads decoded, without %-escapes, \\, ;, ?, #, repeated slashes or . and .. segments"),
            );
        }
    }
    if let Some(ms) = &rule.matcher.methods {
        for m in ms {
            if actix_web::http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()).is_err()
                || m.is_empty()
            {
                return err(".match.methods", format!("`{m}` is not an HTTP method"));
            }
        }
    }
    Ok(())
}

/// `[ban]`: escalation for repeat offenders.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BanConfig {
    pub enabled: bool,
    pub after: u32,
    #[serde(with = "humantime_serde")]
    pub within: Duration,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    pub factor: f64,
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
    #[serde(with = "humantime_serde")]
    pub memory: Duration,
    pub status: u16,
    /// Length the audit stream is trimmed to (approximately, oldest first).
    pub audit_max_len: u64,
    /// How often each node re-reads bans and the allowlist from Redis.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// Same as the top-level `allowlist`: TOML puts a key written after
    /// `[ban]` inside it, so both places are read and merged.
    #[serde(deserialize_with = "de_cidrs")]
    pub allowlist: Vec<IpNet>,
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

fn de_cidrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let raw: Vec<String> = Vec::deserialize(d)?;
    raw.iter()
        .map(|s| parse_cidr(s).map_err(serde::de::Error::custom))
        .collect()
}

/// Parses `10.0.0.0/8`, or a bare address as a host route (`/32`, `/128`).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`{s}` is not an IP address or CIDR (e.g. 10.0.0.0/8)"))
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
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
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let (key, line) = e
                .span()
                .map(|span| locate(text, span.start))
                .unwrap_or_else(|| ("-".into(), 0));
            let message = e.message().replace('\n', " ");
            let message = if line > 0 {
                format!("{message} (line {line})")
            } else {
                message
            };
            ConfigError {
                file: file.to_string(),
                key,
                message,
            }
        })?;
        let moved = std::mem::take(&mut config.ban.allowlist);
        config.allowlist.extend(moved);
        config.validate().map_err(|(key, message)| ConfigError {
            file: file.to_string(),
            key,
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        self.validate_hardening()?;
        let err = |k: &str, m: String| Err((k.to_string(), m));
        // Upper bounds keep every later conversion (ms in u64/i64, Redis
        // PEXPIRE, RFC 3339 dates) far from overflow.
        const DAY: Duration = Duration::from_secs(24 * 3600);
        const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
        let mut bounded: Vec<(&str, Duration, Duration)> = vec![
            ("server.shutdown_timeout", self.server.shutdown_timeout, DAY),
            ("ban.within", self.ban.within, TEN_YEARS),
            ("ban.duration", self.ban.duration, TEN_YEARS),
            ("ban.max_duration", self.ban.max_duration, TEN_YEARS),
            ("ban.memory", self.ban.memory, TEN_YEARS),
            ("ban.reconcile_interval", self.ban.reconcile_interval, DAY),
        ];
        if let Some(r) = &self.redis {
            bounded.push(("redis.timeout", r.timeout, DAY));
            bounded.push(("redis.connect_timeout", r.connect_timeout, DAY));
            bounded.push(("redis.probe_interval", r.probe_interval, DAY));
        }
        for (key, value, max) in bounded {
            if value > max {
                return err(
                    key,
                    format!(
                        "{} is longer than the most allowed, {}",
                        humantime::format_duration(value),
                        humantime::format_duration(max)
                    ),
                );
            }
        }
        pools::validate(self)?;
        if let Some(tls) = &self.server.tls {
            if tls.cert.as_os_str().is_empty() {
                return err("server.tls.cert", "must name a PEM certificate file".into());
            }
            if tls.key.as_os_str().is_empty() {
                return err("server.tls.key", "must name a PEM private key file".into());
            }
        }
        if self.server.admin_token_env.trim().is_empty() {
            return err(
                "server.admin_token_env",
                "must name an environment variable".into(),
            );
        }
        if self.server.listen == self.server.admin_listen {
            return err(
                "server.admin_listen",
                "must differ from server.listen: the admin API is never on the public listener"
                    .into(),
            );
        }
        if let Some(r) = &self.redis {
            match (&r.url, r.cluster.is_empty()) {
                (Some(_), false) => {
                    return err(
                        "redis.cluster",
                        "give either redis.url or redis.cluster, not both".into(),
                    )
                }
                (None, true) => {
                    return err(
                        "redis.url",
                        "give redis.url, redis.cluster, or leave out [redis] to run without Redis"
                            .into(),
                    )
                }
                _ => {}
            }
            for (i, u) in r.url.iter().chain(r.cluster.iter()).enumerate() {
                if u.starts_with("rediss://") {
                    let key = if r.url.is_some() {
                        "redis.url".to_string()
                    } else {
                        format!("redis.cluster[{i}]")
                    };
                    return err(
                        &key,
                        "TLS to Redis (rediss://) is not supported yet; use redis://".into(),
                    );
                }
                if !u.starts_with("redis://") {
                    let key = if r.url.is_some() {
                        "redis.url".to_string()
                    } else {
                        format!("redis.cluster[{i}]")
                    };
                    return err(&key, format!("`{u}` is not a redis:// URL"));
                }
            }
            if r.key_prefix.contains(['*', '?', '[', ']', '\\']) {
                return err(
                    "redis.key_prefix",
                    "must not contain glob characters * ? [ ] \\ (keys are listed with SCAN MATCH)"
                        .into(),
                );
            }
            if r.key_prefix.contains(['{', '}']) {
                return err(
                    "redis.key_prefix",
                    "must not contain `{` or `}` (they mark hash tags)".into(),
                );
            }
            if r.timeout.is_zero() {
                return err("redis.timeout", "must be greater than 0".into());
            }
            if r.connect_timeout.is_zero() {
                return err("redis.connect_timeout", "must be greater than 0".into());
            }
            if r.breaker_failures == 0 {
                return err("redis.breaker_failures", "must be at least 1".into());
            }
            if r.probe_interval.is_zero() {
                return err("redis.probe_interval", "must be greater than 0".into());
            }
        }
        if self.client_ip.ipv6_prefix == 0 || self.client_ip.ipv6_prefix > 128 {
            return err("client_ip.ipv6_prefix", "must be between 1 and 128".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            check_rule(rule, false).map_err(|(k, m)| (format!("{at}{k}"), m))?;
            if !names.insert(rule.name.clone()) {
                return err(
                    &format!("{at}.name"),
                    format!("`{}` is used by two rules; names must be unique", rule.name),
                );
            }
        }
        self.validate_plans(&mut names)?;
        let b = &self.ban;
        if b.enabled {
            if b.after == 0 {
                return err("ban.after", "must be at least 1".into());
            }
            if b.within.is_zero() {
                return err("ban.within", "must be greater than 0".into());
            }
            if b.duration.is_zero() {
                return err("ban.duration", "must be greater than 0".into());
            }
            if !b.factor.is_finite() || b.factor < 1.0 {
                return err(
                    "ban.factor",
                    format!("must be at least 1.0, got {}", b.factor),
                );
            }
            if b.max_duration < b.duration {
                return err("ban.max_duration", "must be at least ban.duration".into());
            }
        }
        if b.status != 429 && b.status != 403 {
            return err(
                "ban.status",
                format!("must be 429 or 403, got {}", b.status),
            );
        }
        if b.audit_max_len == 0 {
            return err("ban.audit_max_len", "must be at least 1".into());
        }
        if b.reconcile_interval.is_zero() {
            return err("ban.reconcile_interval", "must be greater than 0".into());
        }
        Ok(())
    }

    /// `[consumers]` and `[plans.*]`: every plan named exists, every rule
    /// is sound, rule names are unique across `[[rules]]` and all plans.
    fn validate_plans(
        &self,
        names: &mut std::collections::HashSet<String>,
    ) -> Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        let Some(c) = &self.consumers else {
            if let Some(name) = self.plans.keys().next() {
                return err(
                    &format!("plans.{name}"),
                    "plans need a [consumers] section saying which header carries the consumer's key".into(),
                );
            }
            return Ok(());
        };
        match KeyKind::parse(&c.key) {
            Ok(KeyKind::Header(_)) => {}
            _ => {
                return err(
                    "consumers.key",
                    format!(
                        "`{}`: give \"header:<Name>\", the header carrying the consumer's key",
                        c.key
                    ),
                )
            }
        }
        for (name, plan) in &self.plans {
            if !valid_name(name) {
                return err(
                    &format!("plans.{name}"),
                    "a plan name is 1-64 characters of A-Z a-z 0-9 - _ .".into(),
                );
            }
            for (i, rule) in plan.rules.iter().enumerate() {
                let at = format!("plans.{name}.rules[{i}]");
                check_rule(rule, true).map_err(|(k, m)| (format!("{at}{k}"), m))?;
                if !names.insert(rule.name.clone()) {
                    return err(
                        &format!("{at}.name"),
                        format!(
                            "`{}` is used by two rules; names must be unique across [[rules]] and every plan",
                            rule.name
                        ),
                    );
                }
            }
        }
        if let Some(d) = &c.default_plan {
            if !self.plans.contains_key(d) {
                return err(
                    "consumers.default_plan",
                    format!("`{d}` is not defined: add a [plans.{d}] section"),
                );
            }
        }
        for (key, plan) in &c.keys {
            if let Err(m) = check_consumer_key(key.as_bytes()) {
                return err("consumers.keys", m);
            }
            if !self.plans.contains_key(plan) {
                return err(
                    "consumers.keys",
                    format!("`{key}` is assigned to plan `{plan}`, which no [plans.{plan}] section defines"),
                );
            }
        }
        Ok(())
    }

    /// The limits and timeouts that protect the gateway from hostile or
    /// unlucky traffic (docs/operations.md, "Hardening").
    fn validate_hardening(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        const DAY: Duration = Duration::from_secs(24 * 3600);
        let s = &self.server;
        for (key, value) in [
            ("server.send_timeout", s.send_timeout),
            ("server.client_body_timeout", s.client_body_timeout),
        ] {
            if value.is_zero() || value > DAY {
                return err(key, "must be more than 0 and at most 1 day".into());
            }
        }
        if s.log_throttle > DAY {
            return err("server.log_throttle", "must be at most 1 day".into());
        }
        if !(1024..=1024 * 1024).contains(&s.response_buffer) {
            return err(
                "server.response_buffer",
                format!(
                    "must be from 1024 to 1048576 bytes, got {}",
                    s.response_buffer
                ),
            );
        }
        if !(1..=MAX_HEADERS_PARSED).contains(&s.max_headers) {
            return err(
                "server.max_headers",
                format!(
                    "must be from 1 to {MAX_HEADERS_PARSED} (the HTTP parser's own limit), got {}",
                    s.max_headers
                ),
            );
        }
        if !(1024..=MAX_HEAD_PARSED).contains(&s.max_header_bytes) {
            return err(
                "server.max_header_bytes",
                format!(
                    "must be from 1024 to {MAX_HEAD_PARSED} bytes (the HTTP parser's own limit), got {}",
                    s.max_header_bytes
                ),
            );
        }
        if self.ban.min_prefix_v4 > 32 {
            return err("ban.min_prefix_v4", "must be from 0 to 32".into());
        }
        if self.ban.min_prefix_v6 > 128 {
            return err("ban.min_prefix_v6", "must be from 0 to 128".into());
        }
        Ok(())
    }

    /// A short human summary, printed by `--check`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let scheme = match &self.server.tls {
            Some(tls) => format!(
                "HTTPS, HTTP/2 and HTTP/1.1, certificate {}",
                tls.cert.display()
            ),
            None => "HTTP/1.1".to_string(),
        };
        let _ = writeln!(s, "listen        {} ({scheme})", self.server.listen);
        let _ = writeln!(
            s,
            "admin_listen  {} (admin API, /metrics, health)",
            self.server.admin_listen
        );
        let store = match &self.redis {
            None => "in-process only (no [redis] section)".to_string(),
            Some(r) if !r.cluster.is_empty() => format!(
                "Redis Cluster {} (timeout {}, on_failure {})",
                r.cluster.join(", "),
                humantime::format_duration(r.timeout),
                r.on_failure
            ),
            Some(r) => format!(
                "Redis {} (timeout {}, on_failure {})",
                r.url.as_deref().unwrap_or("-"),
                humantime::format_duration(r.timeout),
                r.on_failure
            ),
        };
        let _ = writeln!(s, "store         {store}");
        let _ = writeln!(s, "upstream      {}", self.upstream.urls.join(", "));
        for (name, pool) in &self.upstreams {
            let _ = writeln!(s, "pool          {name}: {}", pool.urls.join(", "));
        }
        for r in &self.routes {
            let m = &r.matcher;
            let _ = writeln!(
                s,
                "route         host {} path {} methods {} -> {}",
                m.host.as_deref().unwrap_or("*"),
                m.path_prefix.as_deref().unwrap_or("*"),
                m.methods
                    .as_ref()
                    .map_or("*".to_string(), |ms| ms.join(",")),
                r.upstream
            );
        }
        let _ = writeln!(
            s,
            "websocket     {}",
            if self.upstream.websocket {
                format!(
                    "forwarded, idle timeout {}",
                    humantime::format_duration(self.upstream.websocket_idle_timeout)
                )
            } else {
                "refused with 501".to_string()
            }
        );
        for r in &self.rules {
            let _ = writeln!(
                s,
                "rule          {}: key {}, {}",
                r.name,
                r.key.as_deref().unwrap_or("-"),
                r.describe()
            );
        }
        if let Some(c) = &self.consumers {
            let _ = writeln!(
                s,
                "consumers     key {}, default plan {}, {} static keys",
                c.key,
                c.default_plan.as_deref().unwrap_or("none"),
                c.keys.len()
            );
        }
        for (name, plan) in &self.plans {
            let _ = writeln!(s, "plan          {name}: {} rules", plan.rules.len());
            for r in &plan.rules {
                let _ = writeln!(s, "  rule        {}: {}", r.name, r.describe());
            }
        }
        if self.ban.enabled {
            let _ = writeln!(
                s,
                "ban           after {} denials within {}: {} x{} up to {}",
                self.ban.after,
                humantime::format_duration(self.ban.within),
                humantime::format_duration(self.ban.duration),
                self.ban.factor,
                humantime::format_duration(self.ban.max_duration)
            );
        } else {
            let _ = writeln!(s, "ban           off");
        }
        let _ = writeln!(s, "allowlist     {} entries", self.allowlist.len());
        s
    }
}

/// Finds the dotted key and the 1-based line at byte `offset` of a TOML
/// text, so a serde error (which knows only a span) names its key.
fn locate(text: &str, offset: usize) -> (String, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_no = before.matches('\n').count() + 1;
    let mut section = String::new();
    for l in before.lines() {
        let t = l.trim();
        if t.starts_with('[') {
            section = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
    }
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    let key = if line.starts_with('[') {
        line.trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string()
    } else {
        let k = line.split('=').next().unwrap_or("").trim();
        match (section.is_empty(), k.is_empty()) {
            (true, true) => "-".to_string(),
            (true, false) => k.to_string(),
            (false, true) => section,
            (false, false) => format!("{section}.{k}"),
        }
    };
    (key, line_no)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[upstream]\nurls = [\"http://127.0.0.1:3000\"]\n";

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{BASE}{extra}"), "t.toml")
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = parse("").expect("valid");
        assert_eq!(c.server.listen.port(), 8080);
        assert_eq!(c.ban.after, 20);
        assert!(c.redis.is_none());
    }

    #[test]
    fn unknown_key_names_section_and_key() {
        let e = parse("[server]\nlisten = \"0.0.0.0:1\"\nbogus = 1\n").unwrap_err();
        assert_eq!(e.key, "server.bogus");
        assert!(
            e.to_string()
                .starts_with("t.toml: server.bogus: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn bad_duration_names_key() {
        let e = parse("[redis]\nurl = \"redis://x\"\ntimeout = \"fast\"\n").unwrap_err();
        assert_eq!(e.key, "redis.timeout");
    }

    #[test]
    fn cost_above_burst_is_refused() {
        let e = parse("[[rules]]\nname=\"a\"\nkey=\"ip\"\nrate=1\nper=\"1s\"\nburst=2\ncost=3\n")
            .unwrap_err();
        assert_eq!(e.key, "rules[0].cost");
    }

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
    fn hardening_limits_are_bounded_and_named() {
        let c = parse("").expect("valid");
        assert_eq!(c.upstream.idle_timeout, Duration::from_secs(4));
        assert_eq!(c.ban.min_prefix_v4, 8);
        for (extra, key) in [
            ("[server]\nsend_timeout = \"0s\"\n", "server.send_timeout"),
            ("[server]\nresponse_buffer = 10\n", "server.response_buffer"),
            ("[server]\nmax_headers = 97\n", "server.max_headers"),
            (
                "[server]\nmax_header_bytes = 200000\n",
                "server.max_header_bytes",
            ),
            ("[ban]\nmin_prefix_v6 = 129\n", "ban.min_prefix_v6"),
        ] {
            assert_eq!(parse(extra).unwrap_err().key, key, "{extra}");
        }
        let e = parse("[[rules]]\nname=\"a\"\nkey=\"ip\"\nrate=1\nper=\"1s\"\nburst=1\nmatch = { path_prefix = \"/a%2Fb\" }\n")
            .unwrap_err();
        assert_eq!(e.key, "rules[0].match.path_prefix");
    }

    #[test]
    fn bare_address_is_a_host_route() {
        assert_eq!(parse_cidr("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
    }
}
