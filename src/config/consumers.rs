//! `[consumers]` and `[plans.NAME]`: how a request's consumer (an API key)
//! is found, which plan it has, and the rules each plan gives. Apart because
//! the consumer key's rules are shared with the admin API, and a plan's
//! checks cross into `[[rules]]` (rule names are unique across both).

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;

use super::rules::{check_rule, valid_name, RuleConfig};
use super::{Config, Invalid};
use crate::policy::KeyKind;

/// `[consumers]`: how a request's consumer (an API key) is found, and which
/// plan it gets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConsumersConfig {
    /// `header:<Name>`: the header carrying the consumer's key; or
    /// `jwt:<claim>`: the claim of the verified bearer token that does.
    pub(crate) key: String,
    /// With a `jwt:` key: the claim naming the consumer's plan (used when
    /// no assignment names one, before `default_plan`).
    #[serde(default)]
    pub(crate) plan_claim: Option<String>,
    /// The plan of requests with an unknown or missing key; none: such
    /// requests get no plan rules.
    #[serde(default)]
    pub(crate) default_plan: Option<String>,
    /// Static key -> plan assignments (runtime ones come from the admin API
    /// and win over these).
    #[serde(default)]
    pub(crate) keys: BTreeMap<String, String>,
    /// What a key that no assignment (runtime or static) names gets.
    #[serde(default)]
    pub(crate) unknown_keys: UnknownKeys,
}

/// `consumers.unknown_keys`: how a request is decided when it carries a key
/// that no assignment names. Made-up keys must not buy a client fresh
/// limits (nor one Redis key each), so by default such a request is decided
/// exactly like one without a key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum UnknownKeys {
    /// The default plan on the client's address, like a missing key.
    #[default]
    Default,
    /// 401 problem+json.
    Reject,
}

/// `[plans.NAME]`: the rules a plan gives each of its consumers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlanConfig {
    #[serde(default)]
    pub(crate) rules: Vec<RuleConfig>,
}

/// The longest consumer key accepted (config, header or admin API): a
/// longer header is refused with 400, never truncated into collisions.
pub(crate) const MAX_CONSUMER_KEY_LEN: usize = 256;

/// Whether `key` can be a consumer key: 1 to 256 bytes that can travel in a
/// header value, with no space at either end (HTTP strips it).
pub(crate) fn check_consumer_key(key: &[u8]) -> Result<(), String> {
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

/// `[consumers]` and `[plans.*]`: every plan named exists, every rule
/// is sound, rule names are unique across `[[rules]]` (already in `names`)
/// and all plans.
pub(super) fn validate_plans(config: &Config, names: &mut HashSet<String>) -> Result<(), Invalid> {
    let Some(c) = &config.consumers else {
        if let Some(name) = config.plans.keys().next() {
            return Err(Invalid::new(
                format!("plans.{name}"),
                "plans need a [consumers] section saying which header carries the consumer's key",
            ));
        }
        return Ok(());
    };
    match KeyKind::parse(&c.key) {
        Ok(KeyKind::Header(_)) => {
            if c.plan_claim.is_some() {
                return Err(Invalid::new(
                    "consumers.plan_claim",
                    "needs consumers.key = \"jwt:<claim>\": only a verified token's claims name a plan",
                ));
            }
        }
        Ok(KeyKind::Claim(_)) => {
            if let Some(p) = &c.plan_claim {
                if !matches!(KeyKind::parse(&format!("jwt:{p}")), Ok(KeyKind::Claim(_))) {
                    return Err(Invalid::new(
                        "consumers.plan_claim",
                        format!("`{p}` is not a claim name"),
                    ));
                }
            }
        }
        _ => {
            return Err(Invalid::new(
                "consumers.key",
                format!(
                    "`{}`: give \"header:<Name>\", the header carrying the consumer's key, or \"jwt:<claim>\", the token claim that does",
                    c.key
                ),
            ))
        }
    }
    for (name, plan) in &config.plans {
        if !valid_name(name) {
            return Err(Invalid::new(
                format!("plans.{name}"),
                "a plan name is 1-64 characters of A-Z a-z 0-9 - _ .",
            ));
        }
        for (i, rule) in plan.rules.iter().enumerate() {
            let at = format!("plans.{name}.rules[{i}]");
            check_rule(rule, true).map_err(|e| e.under(&at))?;
            if !names.insert(rule.name.clone()) {
                return Err(Invalid::new(
                    format!("{at}.name"),
                    format!(
                        "`{}` is used by two rules; names must be unique across [[rules]] and every plan",
                        rule.name
                    ),
                ));
            }
        }
    }
    if let Some(d) = &c.default_plan {
        if !config.plans.contains_key(d) {
            return Err(Invalid::new(
                "consumers.default_plan",
                format!("`{d}` is not defined: add a [plans.{d}] section"),
            ));
        }
    }
    for (key, plan) in &c.keys {
        if let Err(m) = check_consumer_key(key.as_bytes()) {
            return Err(Invalid::new("consumers.keys", m));
        }
        if !config.plans.contains_key(plan) {
            return Err(Invalid::new(
                "consumers.keys",
                format!(
                    "`{key}` is assigned to plan `{plan}`, which no [plans.{plan}] section defines"
                ),
            ));
        }
    }
    Ok(())
}
