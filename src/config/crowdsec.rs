//! `[crowdsec]`: the CrowdSec Local API this node polls as a bouncer.
//! Apart because it names an outside service and the secret to reach it.

use std::time::Duration;

use serde::Deserialize;

use super::{Invalid, DAY};

/// `[crowdsec]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CrowdsecConfig {
    /// The Local API, e.g. `http://127.0.0.1:8080`.
    pub(crate) url: String,
    /// The environment variable holding this node's bouncer key.
    pub(crate) api_key_env: String,
    /// How often the decisions stream is polled.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub(crate) poll: Duration,
    /// The status of a banned client's requests; default: `ban.status`.
    #[serde(default)]
    pub(crate) status: Option<u16>,
    /// The most decisions held at once; more are skipped and counted.
    #[serde(default = "default_max_decisions")]
    pub(crate) max_decisions: usize,
}

fn default_poll() -> Duration {
    Duration::from_secs(10)
}

fn default_max_decisions() -> usize {
    1_000_000
}

pub(super) fn validate(c: &CrowdsecConfig) -> Result<(), Invalid> {
    if !(c.url.starts_with("http://") || c.url.starts_with("https://")) {
        return Err(Invalid::new(
            "crowdsec.url",
            format!(
                "`{}`: must be the Local API's http:// or https:// URL",
                c.url
            ),
        ));
    }
    if c.api_key_env.trim().is_empty() {
        return Err(Invalid::new(
            "crowdsec.api_key_env",
            "must name an environment variable",
        ));
    }
    if c.poll < Duration::from_secs(1) || c.poll > DAY {
        return Err(Invalid::new("crowdsec.poll", "must be from 1s to 1 day"));
    }
    if let Some(s) = c.status {
        if s != 429 && s != 403 {
            return Err(Invalid::new(
                "crowdsec.status",
                format!("must be 429 or 403, got {s}"),
            ));
        }
    }
    if !(1..=10_000_000).contains(&c.max_decisions) {
        return Err(Invalid::new(
            "crowdsec.max_decisions",
            "must be from 1 to 10000000",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::test_util::parse;

    #[test]
    fn the_local_api_needs_a_url_and_a_key_variable() {
        let ok = "[crowdsec]\nurl = \"http://127.0.0.1:8080\"\napi_key_env = \"K\"\n";
        assert_eq!(parse(ok).unwrap().crowdsec.unwrap().poll.as_secs(), 10);
        for (extra, key) in [
            (
                "[crowdsec]\nurl = \"127.0.0.1:8080\"\napi_key_env = \"K\"\n",
                "crowdsec.url",
            ),
            (
                "[crowdsec]\nurl = \"http://x\"\napi_key_env = \"\"\n",
                "crowdsec.api_key_env",
            ),
            (
                "[crowdsec]\nurl = \"http://x\"\napi_key_env = \"K\"\npoll = \"0s\"\n",
                "crowdsec.poll",
            ),
            (
                "[crowdsec]\nurl = \"http://x\"\napi_key_env = \"K\"\nstatus = 200\n",
                "crowdsec.status",
            ),
        ] {
            assert_eq!(parse(extra).unwrap_err().key, key, "{extra}");
        }
        assert!(parse("[crowdsec]\nurl = \"http://x\"\n").is_err());
    }
}
