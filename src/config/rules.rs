//! Rules: the serde form of a `[[rules]]` entry or of a plan's rule, the
//! kind of limit it is ([`LimitConfig`]), and the checks that make sure
//! exactly one kind's keys are given and sound. Apart because `[[rules]]`
//! and every `[plans.NAME]` share them.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;

use super::cost::{check_cost, CostConfig, CountConfig, SettleConfig};
use super::Invalid;
use crate::policy::{KeyKind, Period};

/// Which requests a rule applies to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MatchConfig {
    pub(crate) path_prefix: Option<String>,
    pub(crate) methods: Option<Vec<String>>,
    pub(crate) host: Option<String>,
    /// Compare `path_prefix` with regard to case (default: case folded).
    #[serde(default)]
    pub(crate) case_sensitive: bool,
}

/// One `[[rules]]` entry, or one rule of a plan. A rule is one of three
/// kinds: a token bucket (`rate`, `per`, `burst`), a calendar quota
/// (`quota`, `period`) or a concurrency cap (`concurrency`); validation
/// makes sure exactly one kind's keys are given ([`RuleConfig::limit`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub(crate) name: String,
    #[serde(rename = "match", default)]
    pub(crate) matcher: MatchConfig,
    /// Required in `[[rules]]`; never given in a plan (its subject is the
    /// consumer).
    #[serde(default)]
    pub(crate) key: Option<String>,
    #[serde(default)]
    pub(crate) rate: Option<f64>,
    #[serde(default, with = "humantime_serde::option")]
    pub(crate) per: Option<Duration>,
    #[serde(default)]
    pub(crate) burst: Option<u32>,
    /// A number, or `"header:<Name>"` (see [`CostConfig`]).
    #[serde(default)]
    pub(crate) cost: CostConfig,
    /// With a header cost: the most one request may reserve (required).
    #[serde(default)]
    pub(crate) max_cost: Option<u32>,
    /// With a header cost: what a request that names none is charged.
    #[serde(default)]
    pub(crate) default_cost: Option<u32>,
    /// The answer's header telling the real cost (see [`SettleConfig`]).
    #[serde(default)]
    pub(crate) settle: Option<SettleConfig>,
    /// The answers the rule is charged for (see [`CountConfig`]).
    #[serde(default)]
    pub(crate) count: Option<CountConfig>,
    #[serde(default)]
    pub(crate) quota: Option<u64>,
    #[serde(default)]
    pub(crate) period: Option<Period>,
    #[serde(default)]
    pub(crate) concurrency: Option<u32>,
    /// A concurrency rule: how long its slot outlives a node that died
    /// holding it (a duration). A token bucket or quota: `false` keeps its
    /// requests out of leased tokens (decided call by call).
    #[serde(default)]
    pub(crate) lease: Option<RuleLease>,
    #[serde(default)]
    pub(crate) shadow: bool,
}

/// The kind of limit a validated rule is, with its numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum LimitConfig {
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
    pub(crate) fn describe(&self) -> String {
        let shadow = if self.shadow { " (shadow)" } else { "" };
        match self.limit() {
            LimitConfig::Rate { rate, per, burst } => format!(
                "{rate} per {}, burst {burst}, cost {}{shadow}",
                humantime::format_duration(per),
                self.describe_cost()
            ),
            LimitConfig::Quota { quota, period } => format!(
                "quota {quota} per calendar {} (UTC), cost {}{shadow}",
                period.name(),
                self.describe_cost()
            ),
            LimitConfig::Concurrency { max, lease } => format!(
                "at most {max} in flight (lease {}){shadow}",
                humantime::format_duration(lease)
            ),
        }
    }
}

/// A concurrency slot's lease when the rule names none.
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// A rule's `lease`: a duration on a concurrency rule (how long its slot
/// outlives a node), or `true`/`false` on a token bucket or quota (whether
/// its requests may be admitted from leased tokens). One key, because both
/// are about what a node holds on a subject's behalf.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RuleLease {
    Leasing(bool),
    Slot(Duration),
}

impl<'de> Deserialize<'de> for RuleLease {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RuleLease, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RuleLease;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as \"10s\" (concurrency rules) or true/false")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RuleLease, E> {
                Ok(RuleLease::Leasing(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RuleLease, E> {
                humantime::parse_duration(v.trim())
                    .map(RuleLease::Slot)
                    .map_err(|e| E::custom(format!("`{v}` is not a duration: {e}")))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl RuleConfig {
    /// Whether the rule's requests may be admitted from leased tokens.
    pub(crate) fn leasable(&self) -> bool {
        !matches!(self.lease, Some(RuleLease::Leasing(false)))
    }

    /// The rule's limit. Only meaningful on a validated config (a rule
    /// missing its numbers reads as a rate of 1 per second).
    pub(crate) fn limit(&self) -> LimitConfig {
        if let Some(quota) = self.quota {
            return LimitConfig::Quota {
                quota,
                period: self.period.unwrap_or(Period::Day),
            };
        }
        if let Some(max) = self.concurrency {
            let lease = match self.lease {
                Some(RuleLease::Slot(d)) => d,
                _ => DEFAULT_LEASE,
            };
            return LimitConfig::Concurrency { max, lease };
        }
        LimitConfig::Rate {
            rate: self.rate.unwrap_or(1.0),
            per: self.per.unwrap_or(Duration::from_secs(1)),
            burst: self.burst.unwrap_or(1),
        }
    }
}

impl RuleConfig {
    /// The cost keys in words, for `--check`.
    fn describe_cost(&self) -> String {
        let mut out = match &self.cost {
            CostConfig::Fixed(n) => n.to_string(),
            CostConfig::Header(h) => format!(
                "from header {h} (at most {}, {} when absent)",
                self.most_charged(),
                self.charge()
            ),
        };
        if let Some(SettleConfig(h)) = &self.settle {
            out.push_str(&format!(", settled by the answer's {h}"));
        }
        if let Some(c) = &self.count {
            let list: Vec<String> = c
                .status
                .iter()
                .map(|p| {
                    if p.from == p.to {
                        p.from.to_string()
                    } else {
                        format!("{}-{}", p.from, p.to)
                    }
                })
                .collect();
            out.push_str(&format!(", counted for answers {}", list.join(", ")));
        }
        out
    }
}

/// Plan and rule names: what headers, metrics and Redis fields can carry.
pub(super) fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Checks one rule; an error names the key below the rule (`.rate`, or
/// `""` for the rule as a whole): [`Invalid::under`] puts the rule's own
/// key before it.
pub(super) fn check_rule(rule: &RuleConfig, in_plan: bool) -> Result<(), Invalid> {
    let n = &rule.name;
    if !valid_name(n) {
        return Err(Invalid::new(
            ".name",
            format!("`{n}`: use 1-64 characters of A-Z a-z 0-9 - _ ."),
        ));
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
        ("lease", matches!(rule.lease, Some(RuleLease::Slot(_)))),
    ];
    let given: Vec<&str> = [&rate_keys[..], &quota_keys[..], &conc_keys[..]]
        .iter()
        .filter_map(|kind| kind.iter().find(|(_, set)| *set).map(|(k, _)| *k))
        .collect();
    match given.as_slice() {
        [] => {
            return Err(Invalid::new(
                ".rate",
                "missing: a rule needs rate, per and burst (a token bucket), quota and period (a calendar quota), or concurrency",
            ))
        }
        [a, b, ..] => {
            return Err(Invalid::new(
                "",
                format!(
                    "has both `{a}` and `{b}`: a rule is one of rate (with per and burst), quota (with period) or concurrency"
                ),
            ))
        }
        _ => {}
    }
    match rule.limit() {
        LimitConfig::Rate { .. } => {
            let (Some(rate), Some(per), Some(burst)) = (rule.rate, rule.per, rule.burst) else {
                let missing = rate_keys.iter().find(|(_, set)| !set).map(|(k, _)| *k);
                return Err(Invalid::new(
                    format!(".{}", missing.unwrap_or("rate")),
                    "missing: a token bucket needs rate, per and burst",
                ));
            };
            if !rate.is_finite() || rate <= 0.0 {
                return Err(Invalid::new(
                    ".rate",
                    format!("must be greater than 0, got {rate}"),
                ));
            }
            if per.is_zero() {
                return Err(Invalid::new(".per", "must be greater than 0"));
            }
            let interval_us = per.as_secs_f64() * 1e6 / rate;
            if interval_us < 1.0 {
                return Err(Invalid::new(
                    ".rate",
                    "refills faster than one token per microsecond; lower rate or raise per",
                ));
            }
            if interval_us * f64::from(burst) > 1e13 {
                return Err(Invalid::new(
                    ".burst",
                    "an empty bucket would take more than ~115 days to refill (burst x per / rate)",
                ));
            }
            if burst == 0 {
                return Err(Invalid::new(".burst", "must be at least 1"));
            }
        }
        LimitConfig::Quota { quota, .. } => {
            if rule.quota.is_none() || rule.period.is_none() {
                return Err(Invalid::new(
                    if rule.quota.is_none() { ".quota" } else { ".period" },
                    "missing: a quota needs quota (requests) and period (\"hour\", \"day\" or \"month\")",
                ));
            }
            if quota == 0 || quota > 1_000_000_000_000 {
                return Err(Invalid::new(
                    ".quota",
                    format!("must be from 1 to 10^12, got {quota}"),
                ));
            }
        }
        LimitConfig::Concurrency { max, lease } => {
            if rule.concurrency.is_none() {
                return Err(Invalid::new(
                    ".concurrency",
                    "missing: `lease` belongs to a concurrency rule",
                ));
            }
            if max == 0 || max > 1_000_000 {
                return Err(Invalid::new(
                    ".concurrency",
                    format!("must be from 1 to 1000000, got {max}"),
                ));
            }
            if lease < Duration::from_millis(100) || lease > Duration::from_secs(3600) {
                return Err(Invalid::new(".lease", "must be from 100ms to 1h"));
            }
            if let Some(RuleLease::Leasing(_)) = rule.lease {
                return Err(Invalid::new(
                    ".lease",
                    "a concurrency cap is never leased; its `lease` is how long a slot outlives a node that died holding it (a duration such as \"10s\")",
                ));
            }
        }
    }
    check_cost(rule)?;
    match (&rule.key, in_plan) {
        (Some(_), true) => {
            return Err(Invalid::new(
                ".key",
                "a plan's rules are keyed by the consumer ([consumers] key); leave key out",
            ))
        }
        (None, false) => {
            return Err(Invalid::new(
                ".key",
                "missing: give \"ip\", \"global\" or \"header:<Name>\"",
            ))
        }
        (Some(k), false) => {
            if let Err(m) = KeyKind::parse(k) {
                return Err(Invalid::new(".key", m));
            }
        }
        (None, true) => {}
    }
    if let Some(p) = &rule.matcher.path_prefix {
        if !p.starts_with('/') {
            return Err(Invalid::new(
                ".match.path_prefix",
                format!("`{p}` must start with /"),
            ));
        }
        if p.contains(['%', '\\', ';', '?', '#'])
            || crate::path_match::normalize_path(p) != p.as_str()
        {
            return Err(Invalid::new(
                ".match.path_prefix",
                format!("`{p}`: write the path as it reads decoded, without %-escapes, \\, ;, ?, #, repeated slashes or . and .. segments"),
            ));
        }
    }
    if let Some(ms) = &rule.matcher.methods {
        for m in ms {
            if actix_web::http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()).is_err()
                || m.is_empty()
            {
                return Err(Invalid::new(
                    ".match.methods",
                    format!("`{m}` is not an HTTP method"),
                ));
            }
        }
    }
    Ok(())
}

/// `[[rules]]`: every rule sound and its name not taken; `names` collects
/// them, for the plans' rules to be unique against.
pub(super) fn validate(rules: &[RuleConfig], names: &mut HashSet<String>) -> Result<(), Invalid> {
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("rules[{i}]");
        check_rule(rule, false).map_err(|e| e.under(&at))?;
        if !names.insert(rule.name.clone()) {
            return Err(Invalid::new(
                format!("{at}.name"),
                format!("`{}` is used by two rules; names must be unique", rule.name),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::test_util::parse;

    #[test]
    fn cost_above_burst_is_refused() {
        let e = parse("[[rules]]\nname=\"a\"\nkey=\"ip\"\nrate=1\nper=\"1s\"\nburst=2\ncost=3\n")
            .unwrap_err();
        assert_eq!(e.key, "rules[0].cost");
    }

    #[test]
    fn encoded_path_prefix_is_refused() {
        let e = parse("[[rules]]\nname=\"a\"\nkey=\"ip\"\nrate=1\nper=\"1s\"\nburst=1\nmatch = { path_prefix = \"/a%2Fb\" }\n")
            .unwrap_err();
        assert_eq!(e.key, "rules[0].match.path_prefix");
    }
}
