//! The configuration file: serde types, defaults and validation.
//!
//! The file is read and validated once, at start-up. Every problem becomes a
//! [`ConfigError`] whose `Display` is one line naming the file, the key and
//! what is wrong, so `floodgate --check` can print it and exit 2. Nothing
//! later in the program re-validates: the rest of the gateway takes a
//! [`Config`] as proof that its values are sound.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use actix_web::http::header::HeaderName;
use ipnet::IpNet;
use serde::Deserialize;

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
    #[serde(default)]
    pub client_ip: ClientIpConfig,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    #[serde(default)]
    pub ban: BanConfig,
    /// CIDRs (or bare addresses) that are never limited nor banned.
    #[serde(default, deserialize_with = "de_cidrs")]
    pub allowlist: Vec<IpNet>,
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
#[derive(Debug, Clone, Deserialize)]
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
            max_decisions_per_second: 0,
        }
    }
}

/// `[upstream]`: where allowed traffic goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub urls: Vec<String>,
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Upstream connections one worker keeps at most (keep-alive pool).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_upstream_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_max_connections() -> usize {
    1024
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
}

/// What a rule's bucket is keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// The client's IP key (IPv6 grouped per prefix).
    Ip,
    /// The value of a request header; requests without it skip the rule.
    Header(HeaderName),
    /// One bucket for the whole gateway.
    Global,
}

impl KeyKind {
    /// Parses `ip`, `global` or `header:<Name>`.
    pub fn parse(s: &str) -> Result<KeyKind, String> {
        match s {
            "ip" => Ok(KeyKind::Ip),
            "global" => Ok(KeyKind::Global),
            _ => match s.strip_prefix("header:") {
                Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
                    .map(KeyKind::Header)
                    .map_err(|_| format!("`{name}` is not a valid header name")),
                None => Err(format!(
                    "`{s}` is not one of \"ip\", \"global\", \"header:<Name>\""
                )),
            },
        }
    }
}

/// One `[[rules]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: MatchConfig,
    pub key: String,
    pub rate: f64,
    #[serde(with = "humantime_serde")]
    pub per: Duration,
    pub burst: u32,
    #[serde(default = "one")]
    pub cost: u32,
    #[serde(default)]
    pub shadow: bool,
}

fn one() -> u32 {
    1
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
        let err = |k: &str, m: String| Err((k.to_string(), m));
        // Upper bounds keep every later conversion (ms in u64/i64, Redis
        // PEXPIRE, RFC 3339 dates) far from overflow.
        const DAY: Duration = Duration::from_secs(24 * 3600);
        const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
        let mut bounded: Vec<(&str, Duration, Duration)> = vec![
            ("server.shutdown_timeout", self.server.shutdown_timeout, DAY),
            ("upstream.timeout", self.upstream.timeout, DAY),
            (
                "upstream.connect_timeout",
                self.upstream.connect_timeout,
                DAY,
            ),
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
        if self.upstream.urls.is_empty() {
            return err("upstream.urls", "needs at least one URL".into());
        }
        for (i, u) in self.upstream.urls.iter().enumerate() {
            match u.parse::<actix_web::http::Uri>() {
                Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => {
                    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
                        return err(
                            &format!("upstream.urls[{i}]"),
                            format!("`{u}` has a path; give scheme, host and port only"),
                        );
                    }
                }
                Ok(uri) if uri.scheme_str() == Some("https") => {
                    return err(
                        &format!("upstream.urls[{i}]"),
                        "https upstreams are not supported yet; use http://".into(),
                    )
                }
                _ => {
                    return err(
                        &format!("upstream.urls[{i}]"),
                        format!("`{u}` is not an http URL like http://127.0.0.1:3000"),
                    )
                }
            }
        }
        if self.upstream.timeout.is_zero() {
            return err("upstream.timeout", "must be greater than 0".into());
        }
        if self.upstream.connect_timeout.is_zero() {
            return err("upstream.connect_timeout", "must be greater than 0".into());
        }
        if self.upstream.max_connections == 0 {
            return err("upstream.max_connections", "must be at least 1".into());
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
            let at = |k: &str| format!("rules[{i}].{k}");
            let n = &rule.name;
            if n.is_empty()
                || n.len() > 64
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return err(
                    &at("name"),
                    format!("`{n}`: use 1-64 characters of A-Z a-z 0-9 - _ ."),
                );
            }
            if !names.insert(n.clone()) {
                return err(
                    &at("name"),
                    format!("`{n}` is used by two rules; names must be unique"),
                );
            }
            if !rule.rate.is_finite() || rule.rate <= 0.0 {
                return err(
                    &at("rate"),
                    format!("must be greater than 0, got {}", rule.rate),
                );
            }
            if rule.per.is_zero() {
                return err(&at("per"), "must be greater than 0".into());
            }
            let interval_us = rule.per.as_secs_f64() * 1e6 / rule.rate;
            if interval_us < 1.0 {
                return err(
                    &at("rate"),
                    "refills faster than one token per microsecond; lower rate or raise per".into(),
                );
            }
            if interval_us * f64::from(rule.burst) > 1e13 {
                return err(
                    &at("burst"),
                    "an empty bucket would take more than ~115 days to refill (burst x per / rate)"
                        .into(),
                );
            }
            if rule.burst == 0 {
                return err(&at("burst"), "must be at least 1".into());
            }
            if rule.cost == 0 {
                return err(&at("cost"), "must be at least 1".into());
            }
            if rule.cost > rule.burst {
                return err(
                    &at("cost"),
                    format!(
                        "{} is larger than burst {}: no request could ever pass",
                        rule.cost, rule.burst
                    ),
                );
            }
            if let Err(m) = KeyKind::parse(&rule.key) {
                return err(&at("key"), m);
            }
            if let Some(p) = &rule.matcher.path_prefix {
                if !p.starts_with('/') {
                    return err(&at("match.path_prefix"), format!("`{p}` must start with /"));
                }
            }
            if let Some(ms) = &rule.matcher.methods {
                for m in ms {
                    if actix_web::http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .is_err()
                        || m.is_empty()
                    {
                        return err(&at("match.methods"), format!("`{m}` is not an HTTP method"));
                    }
                }
            }
        }
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

    /// A short human summary, printed by `--check`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "listen        {} (public)", self.server.listen);
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
        for r in &self.rules {
            let _ = writeln!(
                s,
                "rule          {}: key {}, {} per {}, burst {}, cost {}{}",
                r.name,
                r.key,
                r.rate,
                humantime::format_duration(r.per),
                r.burst,
                r.cost,
                if r.shadow { " (shadow)" } else { "" }
            );
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
    fn bare_address_is_a_host_route() {
        assert_eq!(parse_cidr("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
    }
}
