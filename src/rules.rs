//! Which rules apply to a request, and on whose bucket.
//!
//! Rules are compiled once from the config. For each request the matching
//! rules are grouped by *subject* (the client's IP key, one header value, or
//! the whole gateway): a subject's rules are decided together in one atomic
//! store call, so a refused request charges none of them.

use std::sync::Arc;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::Method;
use actix_web::HttpRequest;

use crate::client_ip::ClientKey;
use crate::config::{CostConfig, LimitConfig, RuleConfig};
use crate::metrics::RuleCounters;
use crate::path_match::PathReadings;
use crate::policy::{ceil_secs, BucketSpec, ConcurrencySpec, KeyKind, Limit, QuotaSpec};

/// Header values longer than this cannot be a rate-limit key: the request is
/// refused with 400 rather than the key being truncated into collisions.
pub(crate) const MAX_KEY_HEADER_LEN: usize = 256;

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: Arc<str>,
    pub key: KeyKind,
    pub limit: Limit,
    pub shadow: bool,
    path_prefix: Option<String>,
    /// Compare `path_prefix` with regard to case.
    case_sensitive: bool,
    /// Upper-case method names; requests are compared without regard to
    /// case (`post` is `POST`).
    methods: Option<Vec<Method>>,
    host: Option<String>,
    /// `RateLimit-Policy` item, rendered once.
    pub(crate) policy_header: HeaderValue,
    /// Idle TTL of this rule's subject state (see [`RuleSet::ttl_ms`]).
    pub(crate) subject_ttl_ms: u64,
    /// `floodgate_requests_total` of this rule, one handle per decision.
    pub(crate) counters: RuleCounters,
    /// May its requests be admitted from leased tokens (`lease = false`
    /// says no, and so does a charge that depends on the request or its
    /// answer)?
    pub(crate) leasable: bool,
    /// How the request and its answer change the charge, when they do.
    pub(crate) adjust: Option<Arc<Adjust>>,
}

/// What makes a rule's charge depend on the request or on its answer
/// (`cost = "header:..."`, `settle`, `count`): the charge up front is a
/// reservation, put right once the answer is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Adjust {
    /// The request header naming the cost, and the most it may name.
    pub(crate) cost_header: Option<(HeaderName, u32)>,
    /// The answer's header (or trailer) telling the real cost.
    pub(crate) settle: Option<HeaderName>,
    /// The answer statuses the rule is charged for (inclusive ranges);
    /// empty: every answer.
    pub(crate) count: Vec<(u16, u16)>,
}

impl Adjust {
    fn of(c: &RuleConfig) -> Option<Adjust> {
        if !c.adjusts() {
            return None;
        }
        let name = |h: &str| HeaderName::from_bytes(h.as_bytes()).ok();
        Some(Adjust {
            cost_header: match &c.cost {
                CostConfig::Header(h) => name(h).map(|n| (n, c.most_charged())),
                CostConfig::Fixed(_) => None,
            },
            settle: c.settle.as_ref().and_then(|s| name(&s.0)),
            count: c
                .count
                .as_ref()
                .map(|k| k.status.iter().map(|p| (p.from, p.to)).collect())
                .unwrap_or_default(),
        })
    }

    /// Whether an answer with `status` is charged.
    pub(crate) fn counts(&self, status: u16) -> bool {
        self.count.is_empty() || self.count.iter().any(|(a, b)| (*a..=*b).contains(&status))
    }
}

impl Rule {
    /// Compiles `c`, charged to subjects of `key` (a plan's rules are
    /// charged to the consumer).
    pub(crate) fn compile(c: &RuleConfig, key: KeyKind) -> Rule {
        let (limit, policy) = match c.limit() {
            LimitConfig::Rate { rate, per, burst } => {
                let bucket = BucketSpec::new(rate, per, burst, c.charge());
                let window = ceil_secs(bucket.capacity_us()).max(1);
                (
                    Limit::Rate(bucket),
                    format!("\"{}\";q={};w={}", c.name, burst, window),
                )
            }
            LimitConfig::Quota { quota, period } => (
                Limit::Quota(QuotaSpec {
                    quota,
                    period,
                    cost: c.charge(),
                }),
                format!("\"{}\";q={};w={}", c.name, quota, period.window_s()),
            ),
            LimitConfig::Concurrency { max, lease } => (
                Limit::Concurrency(ConcurrencySpec {
                    max,
                    lease_ms: lease.as_millis() as u64,
                }),
                format!("\"{}\";q={};qu=\"concurrent-requests\"", c.name, max),
            ),
        };
        Rule {
            name: Arc::from(c.name.as_str()),
            key,
            limit,
            shadow: c.shadow,
            path_prefix: c.matcher.path_prefix.clone(),
            case_sensitive: c.matcher.case_sensitive,
            methods: c.matcher.methods.as_ref().map(|ms| {
                ms.iter()
                    .filter_map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
                    .collect()
            }),
            host: c.matcher.host.as_ref().map(|h| h.to_ascii_lowercase()),
            policy_header: HeaderValue::from_str(&policy)
                .unwrap_or_else(|_| HeaderValue::from_static("")),
            subject_ttl_ms: 0,
            counters: RuleCounters::new(&c.name),
            leasable: c.leasable() && !c.adjusts(),
            adjust: Adjust::of(c).map(Arc::new),
        }
    }

    /// The policy's quota `q`: burst, quota, or slots.
    pub(crate) fn quota_units(&self) -> u64 {
        match self.limit {
            Limit::Rate(b) => u64::from(b.burst),
            Limit::Quota(q) => q.quota,
            Limit::Concurrency(c) => u64::from(c.max),
        }
    }

    /// How long an idle subject's state must be kept for this rule: until
    /// its bucket is full again, or until its longest period has passed.
    /// Concurrency leases live in keys of their own, with their own TTL.
    pub(crate) fn hold_us(&self) -> u64 {
        match self.limit {
            Limit::Rate(b) => b.capacity_us(),
            Limit::Quota(q) => q.period.longest_s() * 1_000_000,
            Limit::Concurrency(_) => 0,
        }
    }

    /// The token bucket, for a rate rule.
    pub(crate) fn bucket(&self) -> Option<BucketSpec> {
        match self.limit {
            Limit::Rate(b) => Some(b),
            _ => None,
        }
    }

    pub(crate) fn is_concurrency(&self) -> bool {
        matches!(self.limit, Limit::Concurrency(_))
    }

    /// Whether the rule applies; an error when the path's readings
    /// disagree on it (see [`crate::path_match`]).
    pub(crate) fn matches<R: RequestParts + ?Sized>(
        &self,
        req: &R,
        path: &PathReadings<'_>,
    ) -> Result<bool, AmbiguousPath> {
        if let Some(ms) = &self.methods {
            let method = req.method();
            if !ms.iter().any(|m| m.as_str().eq_ignore_ascii_case(method)) {
                return Ok(false);
            }
        }
        if let Some(h) = &self.host {
            if !host_matches(req.host(), h) {
                return Ok(false);
            }
        }
        if let Some(p) = &self.path_prefix {
            return path
                .starts_with(p, self.case_sensitive)
                .map_err(|(plain, other)| AmbiguousPath {
                    plain,
                    other,
                    rule: self.name.to_string(),
                });
        }
        Ok(true)
    }
}

/// What matching reads of a request: its method, path, host and the
/// headers rules are keyed by. A trait because two callers supply it: the
/// front door from the live request, and the replay from a recorded log
/// line, whose key headers are known only by their hash (an access log
/// never holds an API key).
pub(crate) trait RequestParts {
    fn method(&self) -> &str;
    /// The path as sent (still percent-encoded), without the query.
    fn path(&self) -> &str;
    /// The Host header, or HTTP/2's `:authority`.
    fn host(&self) -> Option<&str>;
    /// The value of header `name`, if the request has it.
    fn key_header(&self, name: &HeaderName) -> Option<KeyHeader<'_>>;
    /// The value of claim `name` of the request's bearer token, only once
    /// the token is verified (`crate::identity`); `None` otherwise, so an
    /// unverified claim never keys a subject.
    fn claim(&self, _name: &str) -> Option<&str> {
        None
    }
}

/// A key header's value as a request source knows it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyHeader<'a> {
    /// The bytes the client sent.
    Raw(&'a [u8]),
    /// Only the SHA-256 of the value (lower-case hex), as the access log
    /// records it: it names the same subject, one to one.
    Hashed(&'a str),
}

impl RequestParts for HttpRequest {
    fn method(&self) -> &str {
        HttpRequest::method(self).as_str()
    }

    fn path(&self) -> &str {
        HttpRequest::path(self)
    }

    /// The Host header itself (or HTTP/2's `:authority`): X-Forwarded-Host
    /// is client-controlled.
    fn host(&self) -> Option<&str> {
        self.headers()
            .get(actix_web::http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| self.uri().host())
    }

    fn key_header(&self, name: &HeaderName) -> Option<KeyHeader<'_>> {
        self.headers()
            .get(name)
            .map(|v| KeyHeader::Raw(v.as_bytes()))
    }
}

/// Whether `req` is for host `h` (with or without its port). Routes match
/// hosts the same way.
pub(crate) fn host_is(req: &HttpRequest, h: &str) -> bool {
    host_matches(RequestParts::host(req), h)
}

/// Whether `host` (a Host header, port or not) is `h`.
fn host_matches(host: Option<&str>, h: &str) -> bool {
    let host = host.unwrap_or("");
    let bare = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    bare.eq_ignore_ascii_case(h) || host.eq_ignore_ascii_case(h)
}

/// Who a group of rules is charged to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Subject {
    Ip(ClientKey),
    Header {
        name: HeaderName,
        value: String,
    },
    /// A consumer of `[consumers]`, by the SHA-256 of its key (hex): the
    /// key itself is never written to Redis.
    Consumer {
        hash: String,
    },
    /// A verified token's claim (`key = "jwt:<claim>"`).
    Claim {
        claim: String,
        value: String,
    },
    Global,
}

impl Subject {
    /// The subject's name inside Redis hash tags: `ip:203.0.113.7`,
    /// `hdr:x-api-key:abc`, `global`. Never contains `{` or `}`.
    pub(crate) fn tag(&self) -> String {
        match self {
            Subject::Ip(k) => format!("ip:{k}"),
            Subject::Header { name, value } => format!("hdr:{}:{value}", name.as_str()),
            Subject::Consumer { hash } => format!("consumer:{hash}"),
            Subject::Claim { claim, value } => format!("jwt:{claim}:{value}"),
            Subject::Global => "global".to_string(),
        }
    }

    /// Only client addresses are banned; a header value or the gateway
    /// itself cannot be.
    pub(crate) fn bannable(&self) -> bool {
        matches!(self, Subject::Ip(_))
    }
}

/// Percent-encodes a header value for use in a key: printable ASCII stays,
/// `{`, `}`, `%` and everything else are escaped.
pub fn encode_key_value(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for &b in raw {
        if (0x21..0x7f).contains(&b) && b != b'{' && b != b'}' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The rules of one subject that match a request.
#[derive(Debug)]
pub(crate) struct SubjectGroup<'r> {
    pub(crate) subject: Subject,
    pub(crate) rules: Vec<&'r Rule>,
    /// How long the subject's state may live in the store once idle: long
    /// enough for every bucket of this subject kind to refill.
    pub(crate) ttl_ms: u64,
    /// What this request costs on each rule, in the order of `rules`, when
    /// a rule takes its cost from the request (see [`Rule::cost_header`]);
    /// empty: every rule's own cost.
    pub(crate) costs: Vec<i64>,
}

impl SubjectGroup<'_> {
    /// Reads the costs the request names for rules that take theirs from
    /// a header (`costs`); a rule whose header is absent costs its
    /// `default_cost`. A value that is not a whole number from 1 to the
    /// rule's `max_cost` is refused: nothing is charged.
    pub(crate) fn price<R: RequestParts + ?Sized>(&mut self, req: &R) -> Result<(), BadCost> {
        fn named(r: &Rule) -> Option<&(HeaderName, u32)> {
            r.adjust.as_deref().and_then(|a| a.cost_header.as_ref())
        }
        if !self.rules.iter().any(|r| named(r).is_some()) {
            return Ok(());
        }
        let mut costs = Vec::with_capacity(self.rules.len());
        for r in &self.rules {
            let own = i64::from(r.limit.cost());
            let cost = match named(r) {
                None => own,
                // (The replay knows key headers only by their hash: it
                // charges the default.)
                Some(&(ref name, max)) => match req.key_header(name) {
                    Some(KeyHeader::Raw(v)) => {
                        let bad = |problem: String| BadCost {
                            header: name.to_string(),
                            problem,
                        };
                        let text = std::str::from_utf8(v)
                            .map_err(|_| bad("is not a number".into()))?
                            .trim();
                        match text.parse::<u64>() {
                            Ok(n) if n >= 1 && n <= u64::from(max) => n as i64,
                            Ok(n) => {
                                return Err(bad(format!("{n} is not from 1 to {max}")));
                            }
                            Err(_) => {
                                return Err(bad(format!(
                                    "`{}` is not a whole number from 1 to {max}",
                                    text.chars().take(32).collect::<String>()
                                )))
                            }
                        }
                    }
                    _ => own,
                },
            };
            costs.push(cost);
        }
        self.costs = costs;
        Ok(())
    }

    /// What this request costs on rule `i`.
    pub(crate) fn cost_of(&self, i: usize) -> i64 {
        self.costs
            .get(i)
            .copied()
            .unwrap_or_else(|| self.rules.get(i).map_or(1, |r| i64::from(r.limit.cost())))
    }
}

/// A cost a request names that cannot be charged.
#[derive(Debug, thiserror::Error)]
#[error("header {header} names the request's cost: {problem}")]
pub(crate) struct BadCost {
    header: String,
    problem: String,
}

/// A request header that cannot serve as a rate-limit key.
#[derive(Debug, thiserror::Error)]
#[error("header {0} is longer than {MAX_KEY_HEADER_LEN} bytes and cannot be a rate-limit key")]
pub(crate) struct KeyHeaderTooLong(pub String);

/// A path whose readings select different rules (see
/// [`crate::path_match`]): refused rather than guessed at.
#[derive(Debug, thiserror::Error)]
#[error("the path reads as `{plain}` or as `{other}` depending on how it is decoded, and rule {rule} applies to only one of them; send it without encoded slashes or backslashes, `;` parameters or double encoding")]
pub(crate) struct AmbiguousPath {
    plain: String,
    other: String,
    rule: String,
}

/// Why a request's rules cannot be worked out; answered with 400.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MatchError {
    #[error(transparent)]
    KeyHeader(#[from] KeyHeaderTooLong),
    #[error(transparent)]
    AmbiguousPath(#[from] AmbiguousPath),
}

impl MatchError {
    /// The `kind` label of `floodgate_client_errors_total`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            MatchError::KeyHeader(_) => "key_header_too_long",
            MatchError::AmbiguousPath(_) => "ambiguous_path",
        }
    }
}

/// All compiled rules.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    pub fn compile(configs: &[RuleConfig]) -> RuleSet {
        let mut set = RuleSet {
            rules: configs
                .iter()
                .map(|c| {
                    let key =
                        KeyKind::parse(c.key.as_deref().unwrap_or("ip")).unwrap_or(KeyKind::Ip);
                    Rule::compile(c, key)
                })
                .collect(),
        };
        // Each rule carries its subject kind's idle TTL, so requests never
        // recompute it.
        let ttls: Vec<u64> = set.rules.iter().map(|r| set.ttl_ms(&r.key)).collect();
        for (rule, ttl) in set.rules.iter_mut().zip(ttls) {
            rule.subject_ttl_ms = ttl;
        }
        set
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub(crate) fn by_name(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| &*r.name == name)
    }

    /// Idle lifetime of a subject of the same kind as `key`.
    pub fn ttl_ms(&self, key: &KeyKind) -> u64 {
        let us = self
            .rules
            .iter()
            .filter(|r| same_subject_kind(&r.key, key))
            .map(Rule::hold_us)
            .max()
            .unwrap_or(0);
        us.div_ceil(1000) + 1000
    }

    /// The matching rules of `req`, grouped by subject; the IP group (if
    /// any) comes first so that a refusal there saves the other calls.
    pub(crate) fn groups<'r, R: RequestParts + ?Sized>(
        &'r self,
        req: &R,
        client: ClientKey,
    ) -> Result<Vec<SubjectGroup<'r>>, MatchError> {
        let mut groups: Vec<SubjectGroup<'r>> = Vec::new();
        let path = PathReadings::of(req.path());
        for rule in &self.rules {
            if !rule.matches(req, &path)? {
                continue;
            }
            let subject = match &rule.key {
                KeyKind::Ip => Subject::Ip(client),
                KeyKind::Global => Subject::Global,
                KeyKind::Header(name) => {
                    let value = match req.key_header(name) {
                        None => continue,
                        Some(KeyHeader::Raw(v)) => {
                            if v.len() > MAX_KEY_HEADER_LEN {
                                return Err(KeyHeaderTooLong(name.to_string()).into());
                            }
                            encode_key_value(v)
                        }
                        Some(KeyHeader::Hashed(hash)) => hash.to_string(),
                    };
                    Subject::Header {
                        name: name.clone(),
                        value,
                    }
                }
                KeyKind::Claim(claim) => match req.claim(claim) {
                    None => continue,
                    Some(v) => Subject::Claim {
                        claim: claim.clone(),
                        value: claim_key_value(v),
                    },
                },
            };
            match groups.iter_mut().find(|g| g.subject == subject) {
                Some(g) => g.rules.push(rule),
                None => groups.push(SubjectGroup {
                    ttl_ms: rule.subject_ttl_ms,
                    subject,
                    rules: vec![rule],
                    costs: Vec::new(),
                }),
            }
        }
        groups.sort_by_key(|g| !g.subject.bannable());
        Ok(groups)
    }
}

/// A verified claim's value as a subject name: as it is (encoded) when
/// short, its SHA-256 past [`MAX_KEY_HEADER_LEN`] (the issuer vouches for
/// it, so a long value is not refused, only kept short).
pub(crate) fn claim_key_value(v: &str) -> String {
    if v.len() > MAX_KEY_HEADER_LEN {
        use sha2::Digest;
        sha2::Sha256::digest(v.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    } else {
        encode_key_value(v.as_bytes())
    }
}

fn same_subject_kind(a: &KeyKind, b: &KeyKind) -> bool {
    match (a, b) {
        (KeyKind::Header(x), KeyKind::Header(y)) => x == y,
        (KeyKind::Claim(x), KeyKind::Claim(y)) => x == y,
        _ => std::mem::discriminant(a) == std::mem::discriminant(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_never_break_hash_tags() {
        assert_eq!(encode_key_value(b"a{b}c%d e"), "a%7Bb%7Dc%25d%20e");
    }
}
