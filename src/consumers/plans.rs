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
    /// `consumers.plan_claim` of the request's verified token.
    Claim,
    /// `consumers.default_plan`.
    Default,
}

impl PlanSource {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PlanSource::Runtime => "runtime",
            PlanSource::Config => "config",
            PlanSource::Claim => "claim",
            PlanSource::Default => "default",
        }
    }
}

/// What carries a consumer's key: a header (an API key), or a claim of
/// the request's verified bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConsumerKey {
    Header(HeaderName),
    Claim(String),
}

impl ConsumerKey {
    fn kind(&self) -> KeyKind {
        match self {
            ConsumerKey::Header(h) => KeyKind::Header(h.clone()),
            ConsumerKey::Claim(c) => KeyKind::Claim(c.clone()),
        }
    }
}

/// `[consumers]` and `[plans.*]`, compiled.
#[derive(Debug)]
pub(crate) struct Plans {
    key: ConsumerKey,
    /// `consumers.plan_claim`: a verified claim naming the plan.
    plan_claim: Option<String>,
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
        let key = match KeyKind::parse(&c.key).ok()? {
            KeyKind::Header(h) => ConsumerKey::Header(h),
            KeyKind::Claim(c) => ConsumerKey::Claim(c),
            _ => return None,
        };
        let plans: Vec<Plan> = config
            .plans
            .iter()
            .map(|(name, p)| Plan {
                name: Arc::from(name.as_str()),
                rules: p
                    .rules
                    .iter()
                    .map(|r| Rule::compile(r, key.kind()))
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
            .ttl_ms(&key.kind())
            .max(longest_plan_rule.div_ceil(1000) + 1000);
        Some(Plans {
            plan_claim: c.plan_claim.clone(),
            key,
            plans,
            default,
            static_keys,
            unknown_keys: c.unknown_keys,
            ttl_ms,
        })
    }

    /// The header that carries a consumer's key, if a header does.
    pub(crate) fn header(&self) -> Option<&HeaderName> {
        match &self.key {
            ConsumerKey::Header(h) => Some(h),
            ConsumerKey::Claim(_) => None,
        }
    }

    /// The token claim that carries a consumer's key, if a claim does.
    pub(crate) fn claim(&self) -> Option<&str> {
        match &self.key {
            ConsumerKey::Claim(c) => Some(c),
            ConsumerKey::Header(_) => None,
        }
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
        self.plan_for(hash, table, None)
    }

    /// [`Self::plan_of`], with the plan a verified token's
    /// `consumers.plan_claim` names (if this config defines it) between the
    /// static assignments and the default plan.
    fn plan_for(
        &self,
        hash: &str,
        table: &ConsumerTable,
        claimed: Option<&str>,
    ) -> Option<(&Plan, PlanSource)> {
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
            .or_else(|| {
                claimed
                    .and_then(|name| self.find(name))
                    .map(|p| (p, PlanSource::Claim))
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
        let header = match &self.key {
            ConsumerKey::Header(h) => h,
            ConsumerKey::Claim(claim) => {
                // A verified token's consumer is always known: its issuer
                // vouches for it. No verified token: no consumer.
                let known = req.claim(claim).map(|v| key_hash(v.as_bytes()));
                let claimed = self.plan_claim.as_deref().and_then(|c| req.claim(c));
                return self.add_plan_rules(req, client, table, groups, known, claimed);
            }
        };
        let known = match req.key_header(header) {
            Some(v) => {
                let hash = match v {
                    KeyHeader::Raw(v) if v.len() > MAX_KEY_HEADER_LEN => {
                        return Err(MatchError::from(KeyHeaderTooLong(header.to_string())).into());
                    }
                    KeyHeader::Raw(v) => key_hash(v),
                    KeyHeader::Hashed(hash) => hash.to_string(),
                };
                if table.get(&hash).is_some() || self.static_keys.contains_key(&hash) {
                    Some(hash)
                } else if self.unknown_keys == UnknownKeys::Reject {
                    return Err(ConsumerError::UnknownKey(header.to_string()));
                } else {
                    None
                }
            }
            None => None,
        };
        self.add_plan_rules(req, client, table, groups, known, None)
    }

    /// The rest of [`Self::apply`] once the consumer is known (`known`: the
    /// hash of its key) or not: its subject and its plan's rules.
    fn add_plan_rules<'r, R: RequestParts + ?Sized>(
        &'r self,
        req: &R,
        client: ClientKey,
        table: &ConsumerTable,
        groups: &mut Vec<SubjectGroup<'r>>,
        known: Option<String>,
        claimed: Option<&str>,
    ) -> Result<(), ConsumerError> {
        let (subject, plan) = match known {
            Some(hash) => {
                let plan = self.plan_for(&hash, table, claimed).map(|(p, _)| p);
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
        match &self.key {
            ConsumerKey::Header(h) => {
                matches!(&g.subject, Subject::Header { name, .. } if name == h)
            }
            ConsumerKey::Claim(c) => {
                matches!(&g.subject, Subject::Claim { claim, .. } if claim == c)
            }
        }
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
