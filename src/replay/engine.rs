//! The replay's decision, one recorded request at a time: the front door's
//! phases 2 to 5 with the candidate's rules, plans and bans, on an
//! in-process store whose clock is the request's recorded time.
//!
//! Phase 2 is the config's allowlist; phase 3 the bans the replay itself
//! made (the gateway's ban cache learns a ban the same way, from the
//! decision that made it); phase 4 the same `RuleSet::groups` and
//! `Plans::apply` as the front door; phase 5 the same
//! `Limiter::decide_at` (IP subject first, refunds when a later subject
//! refuses, violations and escalating bans) on a `LocalStore`, pinned to
//! the recorded time. Concurrency slots are held for the request's
//! recorded duration (renewed every third of their lease, as the gateway
//! does), or released at once when the log has no durations.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::HeaderName;
use futures_util::FutureExt;
use ipnet::IpNet;

use super::record::Record;
use super::suggest::Suggest;
use super::tally::Tally;
use crate::client_ip::ClientKey;
use crate::config::{Config, LimitConfig, OnFailure};
use crate::consumers::{ConsumerError, ConsumerTable, Plans};
use crate::limiter::{
    BanParams, Breakers, Decision, LeaseCall, LeaseSet, Limiter, LimiterSettings, LocalStore,
    RedisStore,
};
use crate::metrics::GatewayMetrics;
use crate::rules::{RuleSet, Subject};

/// Subjects the replay's store holds at most, as a gateway's own store.
const STORE_SUBJECTS: usize = 1_000_000;
/// How often (recorded time) idle subjects leave the store, as the
/// gateway's housekeeping does.
const SWEEP_EVERY_US: u64 = 5_000_000;

/// What reload can change, compiled from the candidate: what matching
/// reads.
struct Policy {
    rules: RuleSet,
    plans: Option<Plans>,
    /// Runtime plan assignments live in Redis, not in a config file: the
    /// replay has none, so consumers get their static or default plan.
    table: ConsumerTable,
    ipv6_prefix: u8,
    allowlist: Vec<IpNet>,
}

/// Concurrency slots held until a recorded request's end.
struct Held {
    due_us: u64,
    seq: u64,
    end_us: u64,
    every_us: u64,
    set: LeaseSet,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.due_us, self.seq) == (o.due_us, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due_us, self.seq).cmp(&(o.due_us, o.seq))
    }
}

/// The candidate's decision, and what it counted.
pub(crate) struct Engine {
    policy: Policy,
    limiter: Limiter<RedisStore>,
    local: Arc<LocalStore>,
    /// Bans made so far: client key -> end (µs).
    bans: HashMap<ClientKey, u64>,
    held: BinaryHeap<Reverse<Held>>,
    seq: u64,
    next_sweep_us: u64,
    pub(crate) tally: Tally,
    pub(crate) suggest: Option<Suggest>,
    /// A decision that did not complete at once (never expected: every
    /// store call is in process).
    pub(crate) stalled: u64,
    /// What the logs lacked that the candidate's rules read.
    seen: Seen,
}

/// What the replayed lines carried, for the report's warnings.
#[derive(Default)]
struct Seen {
    no_host: u64,
    no_duration: u64,
    headers: HashSet<HeaderName>,
}

impl Engine {
    /// The candidate `config`'s decision; `suggest` also measures rates.
    pub(crate) fn new(config: &Config, suggest: bool) -> Engine {
        let rules = RuleSet::compile(&config.rules);
        let plans = Plans::compile(config, &rules);
        let params = BanParams::from_config(&config.ban);
        let local = Arc::new(LocalStore::new(params, STORE_SUBJECTS, false));
        let limiter = Limiter::<RedisStore>::new(
            None,
            local.clone(),
            Arc::new(Breakers::new(1, false, metrics::gauge!("replay_degraded"))),
            LimiterSettings {
                on_failure: OnFailure::Local,
                max_decisions_per_second: 0,
                // Every decision is made in process; a lease would only
                // blur which request a refusal fell on.
                lease: Duration::ZERO,
            },
            params,
            GatewayMetrics::resolve(),
        );
        // Every rule, with its plan and (for a token bucket) its `per`.
        let mut pers: HashMap<&str, Duration> = HashMap::new();
        let plan_rules = config.plans.values().flat_map(|p| p.rules.iter());
        for c in config.rules.iter().chain(plan_rules) {
            if let LimitConfig::Rate { per, .. } = c.limit() {
                pers.insert(&c.name, per);
            }
        }
        let mut all: Vec<(&crate::rules::Rule, Option<Arc<str>>)> =
            rules.rules().iter().map(|r| (r, None)).collect();
        if let Some(p) = &plans {
            for plan in p.plans() {
                all.extend(plan.rules.iter().map(|r| (r, Some(plan.name.clone()))));
            }
        }
        let tally = Tally::new(all.iter().map(|(r, p)| (*r, p.clone())));
        let suggest = suggest
            .then(|| Suggest::new(all.iter().map(|(r, _)| (*r, pers.get(&*r.name).copied()))));
        let table = ConsumerTable::new(None, String::new(), config.plans.keys().cloned().collect());
        Engine {
            policy: Policy {
                rules,
                plans,
                table,
                ipv6_prefix: config.client_ip.ipv6_prefix,
                allowlist: config.allowlist.clone(),
            },
            limiter,
            local,
            bans: HashMap::new(),
            held: BinaryHeap::new(),
            seq: 0,
            next_sweep_us: 0,
            tally,
            suggest,
            stalled: 0,
            seen: Seen::default(),
        }
    }

    /// Decides one recorded request at its recorded time.
    pub(crate) fn replay(&mut self, r: &Record) {
        let now = r.time_us;
        self.upkeep(now);
        self.tally.totals.requests += 1;
        self.seen.no_host += u64::from(r.host.is_none());
        self.seen.no_duration += u64::from(r.duration_us.is_none());
        for (name, _) in &r.keys {
            if !self.seen.headers.contains(name) {
                self.seen.headers.insert(name.clone());
            }
        }
        // Phase 2: the allowlist.
        if allowlisted(&self.policy.allowlist, r.client) {
            self.tally.totals.allowlisted += 1;
            return;
        }
        let key = ClientKey::new(r.client, self.policy.ipv6_prefix);
        // Phase 4's matching first, so that --suggest sees every request
        // the rules match, banned or not.
        let matched = self
            .policy
            .rules
            .groups(r, key)
            .map_err(ConsumerError::from);
        let matched = matched.and_then(|mut groups| {
            if let Some(plans) = &self.policy.plans {
                plans.apply(r, key, &self.policy.table, &mut groups)?;
            }
            Ok(groups)
        });
        if let (Ok(groups), Some(suggest)) = (&matched, self.suggest.as_mut()) {
            for g in groups {
                let subject = self.tally.subjects.id(&g.subject);
                for rule in &g.rules {
                    if let Some(i) = self.tally.index(&rule.name) {
                        suggest.observe(i, subject, now);
                    }
                }
            }
        }
        // Phase 3: the bans made so far.
        if self.bans.get(&key).is_some_and(|until| *until > now) {
            self.tally.totals.banned += 1;
            return;
        }
        let groups = match matched {
            Ok(groups) => groups,
            Err(ConsumerError::UnknownKey(_)) => {
                self.tally.totals.unknown_key += 1;
                return;
            }
            Err(ConsumerError::Match(_)) => {
                self.tally.totals.bad_request += 1;
                return;
            }
        };
        if groups.is_empty() {
            self.tally.totals.allowed += 1;
            self.tally.totals.unmatched += 1;
            return;
        }
        let mut ids = Vec::with_capacity(groups.len());
        for g in &groups {
            let subject = self.tally.subjects.id(&g.subject);
            ids.push(subject);
            for rule in &g.rules {
                if let Some(i) = self.tally.index(&rule.name) {
                    self.tally.matched(i, subject);
                }
            }
        }
        // Phase 5: every store call is in process and answers at once.
        let Some(decision) = self.limiter.decide_at(&groups, Some(now)).now_or_never() else {
            self.stalled += 1;
            return;
        };
        match decision {
            Decision::Allowed {
                leases,
                mut reservation,
                ..
            } => {
                self.tally.totals.allowed += 1;
                // Put right as the gateway did: a rule counting some
                // statuses gives back what others cost; a settled cost is
                // not in the log, so the reservation stands.
                if !reservation.is_empty() {
                    if let Some(status) = r.status {
                        reservation.head(status, |_| None);
                    }
                    reservation.end(|_| None);
                    if self
                        .limiter
                        .settle(&mut reservation)
                        .now_or_never()
                        .is_none()
                    {
                        self.stalled += 1;
                    }
                }
                if let Some(set) = leases {
                    let end = now.saturating_add(r.duration_us.unwrap_or(0));
                    self.hold(set, now, end);
                }
            }
            Decision::Limited { violated, .. } => {
                self.tally.totals.limited += 1;
                if let Some(v) = violated.first() {
                    let at = groups
                        .iter()
                        .position(|g| g.rules.iter().any(|x| x.name == v.rule.name));
                    if let (Some(i), Some(at)) = (self.tally.index(&v.rule.name), at) {
                        self.tally.refused(i, ids[at]);
                    }
                }
            }
            Decision::Banned { remaining_ms, made } => {
                self.tally.totals.banned += 1;
                let until = now.saturating_add(remaining_ms.saturating_mul(1000));
                let known = self.bans.entry(key).or_insert(until);
                *known = (*known).max(until);
                if let Some(made) = made {
                    let rule = made
                        .reason
                        .strip_prefix("rule ")
                        .and_then(|name| self.tally.index(name));
                    let subject = self.tally.subjects.id(&Subject::Ip(key));
                    self.tally
                        .banned(subject, rule, now, made.dur_ms, made.strikes);
                }
            }
            Decision::Unavailable => self.tally.totals.limited += 1,
        }
    }

    /// Slots whose request ended (or whose lease needs renewing) by `now`,
    /// and the periodic sweep of idle subjects.
    fn upkeep(&mut self, now: u64) {
        while self.held.peek().is_some_and(|Reverse(h)| h.due_us <= now) {
            let Some(Reverse(mut h)) = self.held.pop() else {
                break;
            };
            if h.due_us >= h.end_us {
                self.leases(&h.set, false, h.end_us);
                continue;
            }
            self.leases(&h.set, true, h.due_us);
            h.due_us = h.due_us.saturating_add(h.every_us).min(h.end_us);
            self.held.push(Reverse(h));
        }
        if now >= self.next_sweep_us {
            self.local.sweep_at(now / 1000);
            self.next_sweep_us = now.saturating_add(SWEEP_EVERY_US);
        }
    }

    /// Holds `set` from `now` until `end` (renewed as the gateway does).
    fn hold(&mut self, set: LeaseSet, now: u64, end: u64) {
        if end <= now {
            self.leases(&set, false, now);
            return;
        }
        let every = set.renew_every().as_micros() as u64;
        self.seq += 1;
        self.held.push(Reverse(Held {
            due_us: now.saturating_add(every).min(end),
            seq: self.seq,
            end_us: end,
            every_us: every.max(1),
            set,
        }));
    }

    /// Renews or releases the slots of `set` at `at_us`, on the store that
    /// granted them (the replay's only store).
    fn leases(&self, set: &LeaseSet, renew: bool, at_us: u64) {
        for s in &set.subjects {
            self.local.leases(&LeaseCall {
                tag: &s.tag,
                lease: &set.id,
                slots: &s.slots,
                renew,
                now_us: Some(at_us),
            });
        }
    }

    /// Releases every slot still held (the end of the logs).
    pub(crate) fn finish(&mut self) {
        while let Some(Reverse(h)) = self.held.pop() {
            self.leases(&h.set, false, h.end_us);
        }
    }
}

impl Engine {
    /// What the candidate reads that the logs did not carry: rules that
    /// could not apply as they would live.
    pub(crate) fn warnings(&self, config: &Config) -> Vec<String> {
        let mut out = Vec::new();
        let requests = self.tally.totals.requests;
        let plan_rules = config.plans.values().flat_map(|p| p.rules.iter());
        for c in config.rules.iter().chain(plan_rules.clone()) {
            if c.matcher.host.is_some() && self.seen.no_host > 0 {
                out.push(format!(
                    "rule {} matches a host, and {} of {requests} lines carry none (it cannot match them)",
                    c.name, self.seen.no_host
                ));
            }
            if matches!(c.limit(), LimitConfig::Concurrency { .. }) && self.seen.no_duration > 0 {
                out.push(format!(
                    "rule {} caps requests in flight, and {} of {requests} lines carry no duration (their slots were given back at once)",
                    c.name, self.seen.no_duration
                ));
            }
        }
        let consumer = config.consumers.as_ref().map(|c| c.key.as_str());
        let keyed = config.rules.iter().filter_map(|c| c.key.as_deref());
        for key in keyed.chain(consumer) {
            let Some(Ok(name)) = key
                .strip_prefix("header:")
                .map(|h| HeaderName::from_bytes(h.trim().as_bytes()))
            else {
                continue;
            };
            if !self.seen.headers.contains(&name) && requests > 0 {
                let line = format!(
                    "{key} is never in the logs: the requests that carried it are replayed without it (floodgate logs the SHA-256 of the headers its own config keys on)"
                );
                if !out.contains(&line) {
                    out.push(line);
                }
            }
        }
        out
    }
}

fn allowlisted(allowlist: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    allowlist.iter().any(|n| n.contains(&ip))
}
