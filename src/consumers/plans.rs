//! The compiled plans, and phase 4b of a request: which consumer is asking,
//! which plan it has, and its plan rules added to its subject's group.
//!
//! Separate from the runtime table because it is what the config file says
//! (it changes only with the configuration), while the table changes at run
//! time.

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::http::header::HeaderName;

use super::{key_hash, ConsumerTable};
use crate::client_ip::ClientKey;
use crate::config::{Config, UnknownKeys};
use crate::path_match::PathReadings;
use crate::policy::KeyKind;
use crate::rules::{
    KeyHeader, KeyHeaderTooLong, MatchError, RequestParts, Rule, RuleSet, Subject, SubjectGroup,
    MAX_KEY_HEADER_LEN,
};

/// One plan: its name and the rules it gives each consumer.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) name: Arc<str>,
    pub(crate) rules: Vec<Rule>,
}

/// Where a consumer's plan comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PlanSource {
    /// The admin API (kept in Redis).
    Runtime,
    /// `consumers.keys` in the config file.
    Config,
    /// `consumers.default_plan`.
    Default,
}

impl PlanSource {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PlanSource::Runtime => "runtime",
            PlanSource::Config => "config",
            PlanSource::Default => "default",
        }
    }
}

/// `[consumers]` and `[plans.*]`, compiled.
#[derive(Debug)]
pub(crate) struct Plans {
    header: HeaderName,
    plans: Vec<Plan>,
    default: Option<usize>,
    /// SHA-256 of a static key -> plan.
    static_keys: HashMap<String, usize>,
    unknown_keys: UnknownKeys,
    /// Idle TTL of a consumer's state: long enough for every bucket of the
    /// consumer's rules to refill and every quota period to end.
    ttl_ms: u64,
}

impl Plans {
    /// Compiles the plans of a validated config (`None` without
    /// `[consumers]`). Each plan rule carries its own metric handles, like
    /// every rule.
    pub(crate) fn compile(config: &Config, rules: &RuleSet) -> Option<Plans> {
        let c = config.consumers.as_ref()?;
        let KeyKind::Header(header) = KeyKind::parse(&c.key).ok()? else {
            return None;
        };
        let plans: Vec<Plan> = config
            .plans
            .iter()
            .map(|(name, p)| Plan {
                name: Arc::from(name.as_str()),
                rules: p
                    .rules
                    .iter()
                    .map(|r| Rule::compile(r, KeyKind::Header(header.clone())))
                    .collect(),
            })
            .collect();
        let find = |name: &str| plans.iter().position(|p| &*p.name == name);
        let default = c.default_plan.as_deref().and_then(find);
        let static_keys = c
            .keys
            .iter()
            .filter_map(|(key, plan)| Some((key_hash(key.as_bytes()), find(plan)?)))
            .collect();
        let longest_plan_rule = plans
            .iter()
            .flat_map(|p| p.rules.iter())
            .map(Rule::hold_us)
            .max()
            .unwrap_or(0);
        let ttl_ms = rules
            .ttl_ms(&KeyKind::Header(header.clone()))
            .max(longest_plan_rule.div_ceil(1000) + 1000);
        Some(Plans {
            header,
            plans,
            default,
            static_keys,
            unknown_keys: c.unknown_keys,
            ttl_ms,
        })
    }

    /// The header that carries a consumer's key.
    pub(crate) fn header(&self) -> &HeaderName {
        &self.header
    }

    pub(crate) fn plans(&self) -> &[Plan] {
        &self.plans
    }

    pub(crate) fn find(&self, name: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| &*p.name == name)
    }

    /// The idle TTL of a consumer's state.
    pub(crate) fn ttl_ms(&self) -> u64 {
        self.ttl_ms
    }

    /// The plan of the consumer whose key hashes to `hash`, and why: a
    /// runtime assignment, else a static one, else the default plan. A
    /// runtime plan this config does not define is passed over.
    pub(crate) fn plan_of(&self, hash: &str, table: &ConsumerTable) -> Option<(&Plan, PlanSource)> {
        let runtime = table
            .get(hash)
            .and_then(|name| self.find(&name))
            .map(|p| (p, PlanSource::Runtime));
        runtime
            .or_else(|| {
                self.static_keys
                    .get(hash)
                    .map(|i| (&self.plans[*i], PlanSource::Config))
            })
            .or_else(|| self.default.map(|i| (&self.plans[i], PlanSource::Default)))
    }

    /// Part of phase 4: finds the consumer of `req` and adds its plan's
    /// matching rules to its subject's group. A request with a known key
    /// (one a runtime or static assignment names) is decided on the
    /// consumer's subject, which the `[[rules]]` keyed by the same header
    /// share, so one script call decides them all. A request without a key
    /// gets the default plan on its client address; so does one with a key
    /// no assignment names (its header rules do not apply either), unless
    /// `consumers.unknown_keys = "reject"`: made-up keys buy no fresh limits
    /// and create no state of their own. Generic over the request so that
    /// replay decides recorded requests with the same code.
    pub(crate) fn apply<'r, R: RequestParts + ?Sized>(
        &'r self,
        req: &R,
        client: ClientKey,
        table: &ConsumerTable,
        groups: &mut Vec<SubjectGroup<'r>>,
    ) -> Result<(), ConsumerError> {
        let known = match req.key_header(&self.header) {
            Some(v) => {
                let hash = match v {
                    KeyHeader::Raw(v) if v.len() > MAX_KEY_HEADER_LEN => {
                        return Err(
                            MatchError::from(KeyHeaderTooLong(self.header.to_string())).into()
                        );
                    }
                    KeyHeader::Raw(v) => key_hash(v),
                    KeyHeader::Hashed(hash) => hash.to_string(),
                };
                if table.get(&hash).is_some() || self.static_keys.contains_key(&hash) {
                    Some(hash)
                } else if self.unknown_keys == UnknownKeys::Reject {
                    return Err(ConsumerError::UnknownKey(self.header.to_string()));
                } else {
                    None
                }
            }
            None => None,
        };
        let (subject, plan) = match known {
            Some(hash) => {
                let plan = self.plan_of(&hash, table).map(|(p, _)| p);
                for g in groups.iter_mut() {
                    if self.is_key_group(g) {
                        g.subject = Subject::Consumer { hash: hash.clone() };
                        g.ttl_ms = g.ttl_ms.max(self.ttl_ms);
                    }
                }
                (Subject::Consumer { hash }, plan)
            }
            None => {
                // Decided like a request without the header: the rules keyed
                // by it do not apply.
                groups.retain(|g| !self.is_key_group(g));
                (Subject::Ip(client), self.default.map(|i| &self.plans[i]))
            }
        };
        let Some(plan) = plan else {
            return Ok(());
        };
        let path = PathReadings::of(req.path());
        let mut matching: Vec<&'r Rule> = Vec::new();
        for rule in &plan.rules {
            if rule.matches(req, &path).map_err(MatchError::from)? {
                matching.push(rule);
            }
        }
        if matching.is_empty() {
            return Ok(());
        }
        match groups.iter_mut().find(|g| g.subject == subject) {
            Some(g) => {
                g.rules.extend(matching);
                g.ttl_ms = g.ttl_ms.max(self.ttl_ms);
            }
            None => {
                let group = SubjectGroup {
                    subject,
                    rules: matching,
                    ttl_ms: self.ttl_ms,
                    costs: Vec::new(),
                };
                // The client's own subject goes first (see RuleSet::groups).
                if group.subject.bannable() {
                    groups.insert(0, group);
                } else {
                    groups.push(group);
                }
            }
        }
        Ok(())
    }

    /// A group of the `[[rules]]` keyed by the consumer header.
    fn is_key_group(&self, g: &SubjectGroup<'_>) -> bool {
        matches!(&g.subject, Subject::Header { name, .. } if *name == self.header)
    }
}

/// Why a request's consumer cannot be worked out.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConsumerError {
    /// Answered with 400, like any rule that cannot be matched.
    #[error(transparent)]
    Match(#[from] MatchError),
    /// A key no assignment names, with `consumers.unknown_keys = "reject"`:
    /// answered with 401.
    #[error("the key in {0} is not known to this gateway")]
    UnknownKey(String),
}
