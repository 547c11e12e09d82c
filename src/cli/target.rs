//! Which node the admin CLI talks to, and with which token.
//!
//! Separate from the HTTP client because it is where every "where is the
//! node, and what do I do about it" message is written: a missing file, a
//! bad URL, an unset token variable are all usage errors found before any
//! connection is tried.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use super::Failure;
use crate::config::Config;

/// The token variable when neither the configuration nor `--token-env` names one.
const DEFAULT_TOKEN_ENV: &str = "FLOODGATE_ADMIN_TOKEN";
/// The admin address when neither the configuration nor `--url` gives one.
const DEFAULT_URL: &str = "http://127.0.0.1:9090";

/// A node's admin API: its base URL, the token, and where both came from
/// (named in error messages).
#[derive(Debug)]
pub(super) struct Target {
    pub(crate) base: String,
    pub(crate) token: String,
    pub(crate) token_env: String,
    /// Where the address came from, such as "server.admin_listen in /etc/floodgate.toml".
    pub(crate) origin: String,
}

impl Target {
    /// Reads the configuration (if given), applies `--url` and
    /// `--token-env` over it, and reads the token from the environment.
    pub(super) fn resolve(
        config: Option<&Path>,
        url: Option<&str>,
        token_env: Option<&str>,
    ) -> Result<Target, Failure> {
        let loaded = match config {
            Some(path) => Some(
                Config::load(path)
                    .map_err(|e| Failure::Usage(format!("cannot use the configuration: {e}")))?,
            ),
            None => None,
        };
        let (base, origin) = match (url, &loaded, config) {
            (Some(u), _, _) => (base_url(u)?, "--url".to_string()),
            (None, Some(c), Some(path)) => (
                format!("http://{}", reachable(c.server.admin_listen)),
                format!("server.admin_listen in {}", path.display()),
            ),
            _ => (
                DEFAULT_URL.to_string(),
                "the default address (give --config or --url)".to_string(),
            ),
        };
        let token_env = token_env
            .map(str::to_string)
            .or_else(|| loaded.as_ref().map(|c| c.server.admin_token_env.clone()))
            .unwrap_or_else(|| DEFAULT_TOKEN_ENV.to_string());
        let token = token_from_env(&token_env)?;
        Ok(Target {
            base,
            token,
            token_env,
            origin,
        })
    }
}

/// Trimmed like the node trims its own copy, so a secret file's trailing
/// newline does not turn into a 401.
fn token_from_env(var: &str) -> Result<String, Failure> {
    match std::env::var(var) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => Err(Failure::Usage(format!(
            "no admin token: the environment variable {var} is empty. Set it to the token the node was started with (export {var}=...), or name another variable with --token-env"
        ))),
        Err(_) => Err(Failure::Usage(format!(
            "no admin token: the environment variable {var} is not set. Set it to the token the node was started with (export {var}=...), or name another variable with --token-env"
        ))),
    }
}

/// `--url` as a base URL: `http://` added when no scheme is given, no
/// trailing slash. The admin listener speaks plain HTTP only.
fn base_url(raw: &str) -> Result<String, Failure> {
    let raw = raw.trim();
    let rest = match raw.split_once("://") {
        None => raw,
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some(_) => {
            return Err(Failure::Usage(format!(
                "--url {raw}: the admin API speaks plain HTTP; give an http:// address such as http://127.0.0.1:9090"
            )))
        }
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err(Failure::Usage(format!(
            "--url {raw}: not an address; give one such as http://127.0.0.1:9090"
        )));
    }
    Ok(format!("http://{rest}"))
}

/// A listen address as a client reaches it: a wildcard bind (0.0.0.0,
/// [::]) is reached on the loopback address of the same family.
fn reachable(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listen_addresses_are_reached_on_loopback() {
        let r = |s: &str| reachable(s.parse().unwrap()).to_string();
        assert_eq!(r("0.0.0.0:9090"), "127.0.0.1:9090");
        assert_eq!(r("[::]:9090"), "[::1]:9090");
        assert_eq!(r("10.1.2.3:9090"), "10.1.2.3:9090");
    }

    #[test]
    fn urls_get_a_scheme_and_lose_the_trailing_slash() {
        assert_eq!(
            base_url("127.0.0.1:9090/").unwrap(),
            "http://127.0.0.1:9090"
        );
        assert_eq!(base_url("http://[::1]:9").unwrap(), "http://[::1]:9");
        assert!(matches!(
            base_url("https://a:1"),
            Err(Failure::Usage(m)) if m.contains("plain HTTP")
        ));
        assert!(matches!(base_url("http://"), Err(Failure::Usage(_))));
    }
}
