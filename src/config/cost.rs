//! What a rule charges a request: a fixed `cost`, or one the request names
//! in a header (`cost = "header:X-Cost"`, bounded by `max_cost`); a real
//! cost the answer tells (`settle = "header:X-Usage"`); and `count`, the
//! answer statuses a rule is charged for. Apart from `rules` because these
//! keys make a rule's charge depend on the request and its answer, and
//! their checks are many.

use serde::Deserialize;

use super::rules::{LimitConfig, RuleConfig};
use super::Invalid;

/// A rule's `cost`: a number, or `"header:<Name>"` (the request says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CostConfig {
    Fixed(u32),
    Header(String),
}

impl Default for CostConfig {
    fn default() -> CostConfig {
        CostConfig::Fixed(1)
    }
}

impl<'de> Deserialize<'de> for CostConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<CostConfig, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = CostConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a whole number of tokens, or \"header:<Name>\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<CostConfig, E> {
                u32::try_from(v)
                    .map(CostConfig::Fixed)
                    .map_err(|_| E::custom(format!("{v} is not a cost from 0 to 4294967295")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<CostConfig, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CostConfig, E> {
                header_of(v).map(CostConfig::Header).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The header name of `"header:<Name>"`.
fn header_of(v: &str) -> Result<String, String> {
    let name = v
        .strip_prefix("header:")
        .ok_or_else(|| format!("`{v}`: write a number or \"header:<Name>\""))?
        .trim();
    if actix_web::http::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(format!("`{name}` is not a header name"));
    }
    Ok(name.to_ascii_lowercase())
}

/// `settle = "header:<Name>"`: the answer's header (or trailer) telling
/// what the request really cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SettleConfig(pub(crate) String);

impl<'de> Deserialize<'de> for SettleConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SettleConfig, D::Error> {
        let v = String::deserialize(d)?;
        header_of(&v)
            .map(SettleConfig)
            .map_err(serde::de::Error::custom)
    }
}

/// `count = { status = [...] }`: the answers a rule is charged for.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct CountConfig {
    pub(crate) status: Vec<StatusPattern>,
}

/// One entry of `count.status`: a status (`401`), a class (`"5xx"`) or a
/// range (`"400-403"`), inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatusPattern {
    pub(crate) from: u16,
    pub(crate) to: u16,
}

impl StatusPattern {
    fn parse(v: &str) -> Result<StatusPattern, String> {
        let v = v.trim();
        let status = |s: &str| -> Result<u16, String> {
            match s.trim().parse::<u16>() {
                Ok(n) if (100..=599).contains(&n) => Ok(n),
                _ => Err(format!("`{s}` is not an HTTP status from 100 to 599")),
            }
        };
        let lower = v.to_ascii_lowercase();
        if let Some(class) = lower.strip_suffix("xx") {
            return match class.parse::<u16>() {
                Ok(c) if (1..=5).contains(&c) => Ok(StatusPattern {
                    from: c * 100,
                    to: c * 100 + 99,
                }),
                _ => Err(format!("`{v}` is not a status class (1xx to 5xx)")),
            };
        }
        if let Some((a, b)) = v.split_once('-') {
            let (from, to) = (status(a)?, status(b)?);
            if from > to {
                return Err(format!("`{v}`: the range ends before it starts"));
            }
            return Ok(StatusPattern { from, to });
        }
        let n = status(v)?;
        Ok(StatusPattern { from: n, to: n })
    }
}

impl<'de> Deserialize<'de> for StatusPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StatusPattern, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = StatusPattern;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a status such as 401, a class such as \"5xx\" or a range such as \"400-403\"",
                )
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<StatusPattern, E> {
                StatusPattern::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<StatusPattern, E> {
                StatusPattern::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StatusPattern, E> {
                StatusPattern::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The largest `max_cost`: a cost is multiplied by a bucket's interval in
/// microseconds, which must stay far from overflow.
pub(crate) const MAX_COST: u32 = 1_000_000_000;

impl RuleConfig {
    /// What a request is charged when it says nothing (or the rule's fixed
    /// cost): the store's own cost of the rule.
    pub(crate) fn charge(&self) -> u32 {
        match &self.cost {
            CostConfig::Fixed(n) => *n,
            CostConfig::Header(_) => self.default_cost.unwrap_or(1),
        }
    }

    /// The most one request may be charged up front.
    pub(crate) fn most_charged(&self) -> u32 {
        match &self.cost {
            CostConfig::Fixed(n) => *n,
            CostConfig::Header(_) => self.max_cost.unwrap_or(0),
        }
    }

    /// Whether the rule's charge depends on the request or its answer (it
    /// is then never leased and its refusals are never repeated from
    /// memory).
    pub(crate) fn adjusts(&self) -> bool {
        matches!(self.cost, CostConfig::Header(_)) || self.settle.is_some() || self.count.is_some()
    }
}

/// The cost keys of one rule, checked (after the limit's own keys).
pub(super) fn check_cost(rule: &RuleConfig) -> Result<(), Invalid> {
    let limit = rule.limit();
    if let LimitConfig::Concurrency { .. } = limit {
        for (key, given) in [
            (".cost", rule.cost != CostConfig::Fixed(1)),
            (".max_cost", rule.max_cost.is_some()),
            (".default_cost", rule.default_cost.is_some()),
            (".settle", rule.settle.is_some()),
            (".count", rule.count.is_some()),
        ] {
            if given {
                return Err(Invalid::new(
                    key,
                    "a request takes one concurrency slot whatever it costs; leave it out",
                ));
            }
        }
        return Ok(());
    }
    let room: u64 = match limit {
        LimitConfig::Rate { burst, .. } => u64::from(burst),
        LimitConfig::Quota { quota, .. } => quota,
        LimitConfig::Concurrency { .. } => 0,
    };
    let bound = if matches!(limit, LimitConfig::Rate { .. }) {
        "burst"
    } else {
        "quota"
    };
    match &rule.cost {
        CostConfig::Fixed(n) => {
            if *n == 0 {
                return Err(Invalid::new(".cost", "must be at least 1"));
            }
            for (key, given) in [
                (".max_cost", rule.max_cost.is_some()),
                (".default_cost", rule.default_cost.is_some()),
            ] {
                if given {
                    return Err(Invalid::new(
                        key,
                        "belongs to a cost read from a request header (cost = \"header:<Name>\")",
                    ));
                }
            }
            if u64::from(*n) > room {
                return Err(Invalid::new(
                    ".cost",
                    format!("{n} is larger than {bound} {room}: no request could ever pass"),
                ));
            }
        }
        CostConfig::Header(name) => {
            let Some(max) = rule.max_cost else {
                return Err(Invalid::new(
                    ".max_cost",
                    format!("missing: a cost read from header {name} needs the most one request may reserve"),
                ));
            };
            if max == 0 || max > MAX_COST {
                return Err(Invalid::new(
                    ".max_cost",
                    format!("must be from 1 to {MAX_COST}, got {max}"),
                ));
            }
            if u64::from(max) > room {
                return Err(Invalid::new(
                    ".max_cost",
                    format!("{max} is larger than {bound} {room}: a request at max_cost could never pass"),
                ));
            }
            let default = rule.default_cost.unwrap_or(1);
            if default == 0 || default > max {
                return Err(Invalid::new(
                    ".default_cost",
                    format!("must be from 1 to max_cost ({max}), got {default}"),
                ));
            }
        }
    }
    if let Some(count) = &rule.count {
        if count.status.is_empty() {
            return Err(Invalid::new(
                ".count.status",
                "list the statuses the rule is charged for, such as [401, 403] or [\"5xx\"]",
            ));
        }
    }
    if rule.shadow && (rule.settle.is_some() || rule.count.is_some()) {
        return Err(Invalid::new(
            if rule.settle.is_some() {
                ".settle"
            } else {
                ".count"
            },
            "a shadow rule never charges, so there is nothing to settle or count; leave shadow out or this key",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::test_util::parse;

    const HEAD: &str = "[[rules]]\nname=\"a\"\nkey=\"ip\"\nquota=100\nperiod=\"day\"\n";

    /// `extra` is refused at the key ending in `key` (a value serde
    /// refuses is named without the rule's index, by its table, with its
    /// line).
    fn assert_key(extra: &str, key: &str) {
        let e = parse(&format!("{HEAD}{extra}")).unwrap_err();
        assert!(
            e.key == format!("rules[0].{key}") || format!("rules.{key}").starts_with(&e.key),
            "{extra}: {e:?}"
        );
    }

    #[test]
    fn a_header_cost_needs_a_max_within_the_quota() {
        assert_key("cost=\"header:X-Cost\"\n", "max_cost");
        assert_key("cost=\"header:X-Cost\"\nmax_cost=101\n", "max_cost");
        assert_key(
            "cost=\"header:X-Cost\"\nmax_cost=10\ndefault_cost=11\n",
            "default_cost",
        );
        assert_key("cost=\"X-Cost\"\n", "cost");
        assert_key("cost=-1\n", "cost");
        assert_key("cost=3\nmax_cost=5\n", "max_cost");
        parse(&format!(
            "{HEAD}cost=\"header:X-Cost\"\nmax_cost=100\ndefault_cost=5\n"
        ))
        .unwrap();
    }

    #[test]
    fn settle_and_count_are_checked() {
        assert_key("settle=\"X-Usage\"\n", "settle");
        assert_key("count={status=[]}\n", "count.status");
        assert_key("count={status=[600]}\n", "count.status");
        assert_key("count={status=[\"6xx\"]}\n", "count.status");
        assert_key("count={status=[\"500-400\"]}\n", "count.status");
        assert_key("settle=\"header:X-Usage\"\nshadow=true\n", "settle");
        let c = parse(&format!(
            "{HEAD}settle=\"header:X-Usage\"\ncount={{status=[401, \"5xx\", \"400-403\"]}}\n"
        ))
        .unwrap();
        let count = c.rules[0].count.as_ref().unwrap();
        assert_eq!(count.status.len(), 3);
        assert_eq!((count.status[1].from, count.status[1].to), (500, 599));
    }

    #[test]
    fn a_concurrency_cap_takes_no_cost_keys() {
        let e = parse("[[rules]]\nname=\"a\"\nkey=\"ip\"\nconcurrency=2\ncount={status=[500]}\n")
            .unwrap_err();
        assert_eq!(e.key, "rules[0].count");
    }
}
