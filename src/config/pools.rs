//! The upstream part of the configuration: `[upstream]` (the default pool),
//! `[upstreams.NAME]` (named pools, same keys), their health settings, and
//! `[[routes]]`, which send a request to a pool. Validation of all of it
//! lives here too, called from `Config::validate`. Apart because pools and
//! routes are a configuration of their own, read by `upstreams`.

use std::time::Duration;

use serde::Deserialize;

use super::{Config, Invalid, DAY};

/// Most URLs one pool may list (a request remembers the ones it tried in
/// one 64-bit word).
pub(crate) const MAX_POOL_URLS: usize = 64;

/// `[upstream]` or `[upstreams.NAME]`: one pool of upstream URLs and how to
/// talk to them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub(crate) urls: Vec<String>,
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub(crate) timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub(crate) connect_timeout: Duration,
    /// Upstream connections one worker keeps at most (keep-alive pool).
    #[serde(default = "default_max_connections")]
    pub(crate) max_connections: usize,
    /// Whether WebSocket upgrades are forwarded; `false` answers them 501.
    #[serde(default = "yes")]
    pub(crate) websocket: bool,
    /// A WebSocket connection with no byte either way for this long is closed.
    #[serde(default = "default_websocket_idle_timeout", with = "humantime_serde")]
    pub(crate) websocket_idle_timeout: Duration,
    /// How long an idle pooled connection is kept; below the upstream's own
    /// keep-alive timeout, so the gateway closes first.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Active health probes; without it only passive ejection applies.
    #[serde(default)]
    pub(crate) health: Option<HealthConfig>,
    /// Consecutive failures (a refused connection, no answer in time, or a
    /// 502, 503 or 504 answer) that take a URL out of rotation for
    /// `eject_for`; 0 turns passive ejection off.
    #[serde(default = "default_eject_after")]
    pub(crate) eject_after: u32,
    #[serde(default = "default_eject_for", with = "humantime_serde")]
    pub(crate) eject_for: Duration,
    /// The share of the pool's URLs that answers (as opposed to refused
    /// connections) may eject at once, in percent; never the last URL in
    /// rotation either way. Clients choose their requests, so what answers
    /// say must not be able to empty the pool.
    #[serde(default = "default_max_ejected_percent")]
    pub(crate) max_ejected_percent: u32,
    /// Further tries on another URL for a request that is safe to repeat.
    #[serde(default = "default_retries")]
    pub(crate) retries: u32,
    /// Answers of at most this many bytes (their length known) are read
    /// whole and their connection freed at once; 0 streams every answer.
    #[serde(default = "default_buffer_response")]
    pub(crate) buffer_response: usize,
    /// Larger answers one client address may stream at once (every worker
    /// together); default a quarter of `max_connections`; 0 = no cap.
    #[serde(default)]
    pub(crate) max_streaming_per_client: Option<usize>,
}

impl UpstreamConfig {
    /// `max_streaming_per_client`, its default worked out.
    pub(crate) fn streaming_cap(&self) -> usize {
        self.max_streaming_per_client
            .unwrap_or((self.max_connections / 4).max(1))
    }
}

/// `health = { ... }`: a GET of `path` on every URL every `interval`; a
/// URL is out after `unhealthy_after` failed probes in a row and back in
/// after `healthy_after` good ones (a 2xx or 3xx within `timeout`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthConfig {
    pub(crate) path: String,
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    pub(crate) interval: Duration,
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub(crate) timeout: Duration,
    #[serde(default = "default_unhealthy_after")]
    pub(crate) unhealthy_after: u32,
    #[serde(default = "default_healthy_after")]
    pub(crate) healthy_after: u32,
}

/// One `[[routes]]` entry: requests that fit `match` go to pool `upstream`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteConfig {
    #[serde(rename = "match", default)]
    pub(crate) matcher: RouteMatch,
    pub(crate) upstream: String,
}

/// Which requests a route takes; every given part must fit.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteMatch {
    pub(crate) host: Option<String>,
    pub(crate) path_prefix: Option<String>,
    pub(crate) methods: Option<Vec<String>>,
    /// Compare `path_prefix` with regard to case (default: case folded, as
    /// for rules).
    #[serde(default)]
    pub(crate) case_sensitive: bool,
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
fn default_websocket_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn yes() -> bool {
    true
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(4)
}
fn default_max_ejected_percent() -> u32 {
    50
}

fn default_buffer_response() -> usize {
    256 * 1024
}
fn default_eject_after() -> u32 {
    5
}
fn default_eject_for() -> Duration {
    Duration::from_secs(30)
}
fn default_retries() -> u32 {
    1
}
fn default_probe_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_unhealthy_after() -> u32 {
    3
}
fn default_healthy_after() -> u32 {
    2
}

/// The largest `buffer_response`: one answer held in memory at most.
const MAX_BUFFER_RESPONSE: usize = 64 * 1024 * 1024;

/// Checks `[upstream]`, every `[upstreams.NAME]` and every `[[routes]]`.
pub(super) fn validate(config: &Config) -> Result<(), Invalid> {
    validate_pool("upstream", &config.upstream)?;
    for (name, pool) in &config.upstreams {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Invalid::new(
                format!("upstreams.{name}"),
                "a pool name is letters, digits, - and _",
            ));
        }
        if name == "default" {
            return Err(Invalid::new(
                "upstreams.default",
                "`default` is the name of [upstream]; pick another",
            ));
        }
        validate_pool(&format!("upstreams.{name}"), pool)?;
    }
    for (i, route) in config.routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        if route.upstream != "default" && !config.upstreams.contains_key(&route.upstream) {
            return Err(Invalid::new(
                format!("{key}.upstream"),
                format!(
                    "`{}` is not a pool: define [upstreams.{}] or use \"default\" for [upstream]",
                    route.upstream, route.upstream
                ),
            ));
        }
        validate_match(&key, &route.matcher)?;
    }
    Ok(())
}

fn validate_pool(key: &str, pool: &UpstreamConfig) -> Result<(), Invalid> {
    if pool.urls.is_empty() {
        return Err(Invalid::new(
            format!("{key}.urls"),
            "needs at least one URL",
        ));
    }
    if pool.urls.len() > MAX_POOL_URLS {
        return Err(Invalid::new(
            format!("{key}.urls"),
            format!("at most {MAX_POOL_URLS} URLs per pool"),
        ));
    }
    for (i, u) in pool.urls.iter().enumerate() {
        let k = format!("{key}.urls[{i}]");
        match u.parse::<actix_web::http::Uri>() {
            Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => {
                if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
                    return Err(Invalid::new(
                        k,
                        format!("`{u}` has a path; give scheme, host and port only"),
                    ));
                }
            }
            Ok(uri) if uri.scheme_str() == Some("https") => {
                return Err(Invalid::new(
                    k,
                    "https upstreams are not supported yet; use http://",
                ))
            }
            _ => {
                return Err(Invalid::new(
                    k,
                    format!("`{u}` is not an http URL like http://127.0.0.1:3000"),
                ))
            }
        }
        let base = u.trim_end_matches('/');
        if pool.urls[..i]
            .iter()
            .any(|o| o.trim_end_matches('/') == base)
        {
            return Err(Invalid::new(k, format!("`{u}` is listed twice")));
        }
    }
    for (name, value) in [
        ("timeout", pool.timeout),
        ("connect_timeout", pool.connect_timeout),
        ("websocket_idle_timeout", pool.websocket_idle_timeout),
        ("idle_timeout", pool.idle_timeout),
    ] {
        if value.is_zero() || value > DAY {
            return Err(Invalid::new(
                format!("{key}.{name}"),
                "must be more than 0 and at most 1 day",
            ));
        }
    }
    if pool.max_connections == 0 {
        return Err(Invalid::new(
            format!("{key}.max_connections"),
            "must be at least 1",
        ));
    }
    if pool.buffer_response > MAX_BUFFER_RESPONSE {
        return Err(Invalid::new(
            format!("{key}.buffer_response"),
            format!(
                "must be at most {MAX_BUFFER_RESPONSE} bytes (64 MiB), got {}",
                pool.buffer_response
            ),
        ));
    }
    if pool.eject_after > 0 && (pool.eject_for.is_zero() || pool.eject_for > DAY) {
        return Err(Invalid::new(
            format!("{key}.eject_for"),
            "must be more than 0 and at most 1 day",
        ));
    }
    if pool.max_ejected_percent > 100 {
        return Err(Invalid::new(
            format!("{key}.max_ejected_percent"),
            format!("must be from 0 to 100, got {}", pool.max_ejected_percent),
        ));
    }
    if pool.retries as usize >= MAX_POOL_URLS {
        return Err(Invalid::new(
            format!("{key}.retries"),
            format!("must be below {MAX_POOL_URLS}"),
        ));
    }
    if let Some(h) = &pool.health {
        let hk = format!("{key}.health");
        if !h.path.starts_with('/') || h.path.contains(|c: char| c.is_ascii_control() || c == ' ') {
            return Err(Invalid::new(
                format!("{hk}.path"),
                format!("`{}` must be a path starting with /", h.path),
            ));
        }
        if h.interval < Duration::from_millis(10) || h.interval > DAY {
            return Err(Invalid::new(
                format!("{hk}.interval"),
                "must be from 10ms to 1 day",
            ));
        }
        if h.timeout.is_zero() || h.timeout > h.interval {
            return Err(Invalid::new(
                format!("{hk}.timeout"),
                "must be more than 0 and at most the interval",
            ));
        }
        for (name, n) in [
            ("unhealthy_after", h.unhealthy_after),
            ("healthy_after", h.healthy_after),
        ] {
            if !(1..=100).contains(&n) {
                return Err(Invalid::new(
                    format!("{hk}.{name}"),
                    "must be from 1 to 100",
                ));
            }
        }
    }
    Ok(())
}

fn validate_match(key: &str, m: &RouteMatch) -> Result<(), Invalid> {
    if let Some(h) = &m.host {
        if h.is_empty() || h.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(Invalid::new(
                format!("{key}.match.host"),
                format!("`{h}` is not a host name"),
            ));
        }
    }
    if let Some(p) = &m.path_prefix {
        if !p.starts_with('/') {
            return Err(Invalid::new(
                format!("{key}.match.path_prefix"),
                format!("`{p}` must start with /"),
            ));
        }
        if p.contains(['%', '\\', ';', '?', '#'])
            || crate::path_match::normalize_path(p) != p.as_str()
        {
            return Err(Invalid::new(
                format!("{key}.match.path_prefix"),
                format!("`{p}`: write the path as it reads decoded, without %-escapes, \\, ;, ?, #, repeated slashes or . and .. segments"),
            ));
        }
    }
    if let Some(ms) = &m.methods {
        if ms.is_empty() {
            return Err(Invalid::new(
                format!("{key}.match.methods"),
                "give at least one method, or leave methods out",
            ));
        }
        for meth in ms {
            if meth.is_empty()
                || actix_web::http::Method::from_bytes(meth.to_ascii_uppercase().as_bytes())
                    .is_err()
            {
                return Err(Invalid::new(
                    format!("{key}.match.methods"),
                    format!("`{meth}` is not an HTTP method"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::test_util::{parse, BASE};
    use crate::config::Config;

    fn key_of(extra: &str) -> String {
        match parse(extra) {
            Ok(_) => "ok".into(),
            Err(e) => e.key,
        }
    }

    #[test]
    fn pools_and_routes_parse() {
        let c = Config::parse(
            &format!(
                "{BASE}[upstreams.orders]\nurls = [\"http://127.0.0.1:3001\", \"http://127.0.0.1:3002\"]\nhealth = {{ path = \"/healthz\", interval = \"1s\", timeout = \"200ms\" }}\neject_after = 2\neject_for = \"5s\"\nretries = 2\n[[routes]]\nmatch = {{ host = \"api.example.com\", path_prefix = \"/orders\", methods = [\"get\"] }}\nupstream = \"orders\"\n"
            ),
            "t.toml",
        )
        .expect("valid");
        let orders = &c.upstreams["orders"];
        assert_eq!(orders.retries, 2);
        assert_eq!(orders.health.as_ref().map(|h| h.unhealthy_after), Some(3));
        assert_eq!(c.routes[0].upstream, "orders");
        assert_eq!(c.upstream.eject_after, 5, "the default pool has defaults");
        assert_eq!(c.upstream.idle_timeout, Duration::from_secs(4));
    }

    #[test]
    fn bad_pools_and_routes_name_their_key() {
        assert_eq!(
            key_of("[[routes]]\nupstream = \"nope\"\n"),
            "routes[0].upstream"
        );
        assert_eq!(
            key_of("[[routes]]\nupstream = \"default\"\nmatch = { path_prefix = \"x\" }\n"),
            "routes[0].match.path_prefix"
        );
        assert_eq!(
            key_of("[[routes]]\nupstream = \"default\"\nmatch = { methods = [\"G T\"] }\n"),
            "routes[0].match.methods"
        );
        assert_eq!(key_of("[upstreams.a]\nurls = []\n"), "upstreams.a.urls");
        assert_eq!(
            key_of("[upstreams.a]\nurls = [\"http://h:1\", \"http://h:1/\"]\n"),
            "upstreams.a.urls[1]"
        );
        assert_eq!(
            key_of("[upstreams.default]\nurls = [\"http://h:1\"]\n"),
            "upstreams.default"
        );
        assert_eq!(
            key_of("[upstreams.a]\nurls = [\"http://h:1\"]\nhealth = { path = \"/h\", interval = \"1s\", timeout = \"2s\" }\n"),
            "upstreams.a.health.timeout"
        );
        assert_eq!(
            key_of("[upstreams.a]\nurls = [\"http://h:1\"]\nhealth = { path = \"h\" }\n"),
            "upstreams.a.health.path"
        );
        assert_eq!(
            key_of("[upstreams.a]\nurls = [\"http://h:1\"]\neject_for = \"0s\"\n"),
            "upstreams.a.eject_for"
        );
        assert_eq!(
            key_of("[upstreams.a]\nurls = [\"http://h:1\"]\nweight = 2\n"),
            "upstreams.a.weight"
        );
    }
}
