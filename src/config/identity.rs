//! `[jwt]`: how the bearer tokens that `key = "jwt:<claim>"` (rules) and
//! `consumers.key = "jwt:<claim>"` read are verified. Apart because a
//! token's keys and checks are shared by rules and consumers, and their
//! sources (a JWKS file or URL, a secret's variable) need checks of their
//! own.

use std::time::Duration;

use serde::Deserialize;

use super::{Config, Invalid, DAY};

/// `[jwt]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JwtConfig {
    /// A JWKS document: an `https://` (or `http://`) URL, or a file
    /// (relative paths from the config file's directory). RS256, ES256 and
    /// EdDSA keys.
    #[serde(default)]
    pub(crate) jwks: Option<String>,
    /// How often the JWKS is fetched (or the file looked at) again.
    #[serde(default = "default_refresh", with = "humantime_serde")]
    pub(crate) jwks_refresh: Duration,
    /// The environment variable holding the HS256 secret.
    #[serde(default)]
    pub(crate) secret_env: Option<String>,
    /// Required `iss`, when set.
    #[serde(default)]
    pub(crate) issuer: Option<String>,
    /// Required `aud` (one of the token's), when set.
    #[serde(default)]
    pub(crate) audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub(crate) leeway: Duration,
    /// What a request with a bad token gets.
    #[serde(default)]
    pub(crate) invalid: InvalidToken,
    /// The longest `Authorization` header looked at; longer is a bad token.
    #[serde(default = "default_max_token_bytes")]
    pub(crate) max_token_bytes: usize,
}

/// `jwt.invalid`: a request whose token does not verify.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum InvalidToken {
    /// 401 problem+json.
    #[default]
    Reject,
    /// Decided as a request without a token (its claims key nothing).
    Anonymous,
}

fn default_refresh() -> Duration {
    Duration::from_secs(300)
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

fn default_max_token_bytes() -> usize {
    8 * 1024
}

/// The largest `jwt.max_token_bytes`: past the HTTP parser's own bound on
/// a request head there is nothing to look at.
const MAX_TOKEN_BYTES: usize = 64 * 1024;

/// `[jwt]` sound, and present wherever a `jwt:` key is used.
pub(super) fn validate(config: &Config) -> Result<(), Invalid> {
    let uses = config
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.key.as_deref().is_some_and(|k| k.starts_with("jwt:")))
        .map(|(i, _)| format!("rules[{i}].key"))
        .chain(
            config
                .consumers
                .as_ref()
                .filter(|c| c.key.starts_with("jwt:") || c.plan_claim.is_some())
                .map(|_| "consumers.key".to_string()),
        )
        .next();
    let Some(jwt) = &config.jwt else {
        return match uses {
            Some(key) => Err(Invalid::new(
                key,
                "a jwt:<claim> key needs a [jwt] section saying how tokens are verified",
            )),
            None => Ok(()),
        };
    };
    if jwt.jwks.is_none() && jwt.secret_env.is_none() {
        return Err(Invalid::new(
            "jwt",
            "give jwks (a JWKS file or URL) or secret_env (HS256), or both",
        ));
    }
    if let Some(jwks) = &jwt.jwks {
        if jwks.trim().is_empty() {
            return Err(Invalid::new(
                "jwt.jwks",
                "must be a file or an https:// URL",
            ));
        }
        if jwks.contains("://") && !jwks.starts_with("https://") && !jwks.starts_with("http://") {
            return Err(Invalid::new(
                "jwt.jwks",
                format!("`{jwks}`: a URL must be https:// (or http://)"),
            ));
        }
    }
    if jwt
        .secret_env
        .as_deref()
        .is_some_and(|e| e.trim().is_empty())
    {
        return Err(Invalid::new(
            "jwt.secret_env",
            "must name an environment variable",
        ));
    }
    if jwt.jwks_refresh < Duration::from_secs(10) || jwt.jwks_refresh > DAY {
        return Err(Invalid::new(
            "jwt.jwks_refresh",
            "must be from 10s to 1 day",
        ));
    }
    if jwt.leeway > Duration::from_secs(300) {
        return Err(Invalid::new("jwt.leeway", "must be at most 5m"));
    }
    if !(256..=MAX_TOKEN_BYTES).contains(&jwt.max_token_bytes) {
        return Err(Invalid::new(
            "jwt.max_token_bytes",
            format!(
                "must be from 256 to {MAX_TOKEN_BYTES}, got {}",
                jwt.max_token_bytes
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::test_util::parse;

    const RULE: &str =
        "[[rules]]\nname = \"r\"\nkey = \"jwt:sub\"\nrate = 1\nper = \"1s\"\nburst = 1\n";

    #[test]
    fn jwt_keys_need_a_sound_jwt_section() {
        assert_eq!(parse(RULE).unwrap_err().key, "rules[0].key");
        let ok = format!("{RULE}[jwt]\nsecret_env = \"S\"\n");
        assert!(parse(&ok).is_ok());
        for (extra, key) in [
            ("[jwt]\n", "jwt"),
            ("[jwt]\njwks = \"ftp://x\"\n", "jwt.jwks"),
            ("[jwt]\nsecret_env = \"S\"\nleeway = \"1h\"\n", "jwt.leeway"),
            (
                "[jwt]\nsecret_env = \"S\"\nmax_token_bytes = 10\n",
                "jwt.max_token_bytes",
            ),
            (
                "[jwt]\nsecret_env = \"S\"\ninvalid = \"maybe\"\n",
                "jwt.invalid",
            ),
        ] {
            assert_eq!(parse(extra).unwrap_err().key, key, "{extra}");
        }
        assert!(parse(
            "[[rules]]\nname = \"r\"\nkey = \"jwt:\"\nrate = 1\nper = \"1s\"\nburst = 1\n"
        )
        .is_err());
    }
}
