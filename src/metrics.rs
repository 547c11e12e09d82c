//! Prometheus metrics: names defined once, handles resolved once.
//!
//! The recorder is installed before anything else is built, so every handle
//! taken at start-up (per rule and decision) is live; the hot path then only
//! increments atomics instead of hashing label sets per request.

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "floodgate_requests_total";
pub const REDIS_SECONDS: &str = "floodgate_redis_seconds";
pub const UPSTREAM_SECONDS: &str = "floodgate_upstream_seconds";
pub const REDIS_ERRORS: &str = "floodgate_redis_errors_total";
pub const BANS_ACTIVE: &str = "floodgate_bans_active";
pub const DEGRADED: &str = "floodgate_degraded";
pub const BANS_TOTAL: &str = "floodgate_bans_total";
pub const UPSTREAM_ERRORS: &str = "floodgate_upstream_errors_total";
pub const DECISIONS: &str = "floodgate_decisions_total";
pub const SHARD_DEGRADED: &str = "floodgate_redis_shard_degraded";
pub const REDIS_RETRIES: &str = "floodgate_redis_retries_total";
pub const DECISIONS_SHED: &str = "floodgate_redis_shed_total";

/// Label value for decisions that belong to no rule (bans, allowlist).
pub const NO_RULE: &str = "-";

/// Installs the global recorder; returns the handle `/metrics` renders.
/// A second call (tests in one process) returns `None`.
pub fn install() -> Option<PrometheusHandle> {
    let latency = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REDIS_SECONDS.into()), &latency)
        .ok()?
        .set_buckets_for_metric(Matcher::Full(UPSTREAM_SECONDS.into()), &latency)
        .ok()?
        .install_recorder()
        .ok()?;
    metrics::describe_counter!(REQUESTS, "Requests by rule and decision");
    metrics::describe_histogram!(REDIS_SECONDS, "Time of one Redis decision call");
    metrics::describe_histogram!(UPSTREAM_SECONDS, "Time until the upstream's response head");
    metrics::describe_counter!(REDIS_ERRORS, "Redis calls that failed or timed out");
    metrics::describe_gauge!(BANS_ACTIVE, "Bans this node knows to be active");
    metrics::describe_gauge!(
        DEGRADED,
        "1 while Redis is unavailable and on_failure applies"
    );
    metrics::describe_counter!(BANS_TOTAL, "Bans made, by source");
    metrics::describe_counter!(UPSTREAM_ERRORS, "Upstream failures, by kind");
    metrics::describe_counter!(
        DECISIONS,
        "Subject decisions by where they were made: redis, local, allow, deny"
    );
    metrics::describe_gauge!(
        SHARD_DEGRADED,
        "1 while this Redis shard's breaker is open and its subjects get on_failure"
    );
    metrics::describe_counter!(
        REDIS_RETRIES,
        "Script calls sent again within their budget after a transient failure"
    );
    metrics::describe_counter!(
        DECISIONS_SHED,
        "Decisions past redis.max_decisions_per_second, sent to on_failure"
    );
    Some(handle)
}

/// The counters of one rule, one per decision.
#[derive(Clone)]
pub struct RuleCounters {
    pub allowed: Counter,
    pub limited: Counter,
    pub shadow_limited: Counter,
}

impl RuleCounters {
    pub fn new(rule: &str) -> RuleCounters {
        let c = |d: &'static str| metrics::counter!(REQUESTS, "rule" => rule.to_string(), "decision" => d);
        RuleCounters {
            allowed: c("allowed"),
            limited: c("limited"),
            shadow_limited: c("shadow_limited"),
        }
    }
}

/// `floodgate_decisions_total`, one counter per store that decides.
#[derive(Clone)]
pub struct DecisionCounters {
    pub redis: Counter,
    pub local: Counter,
    pub allow: Counter,
    pub deny: Counter,
}

impl DecisionCounters {
    fn new() -> DecisionCounters {
        let c = |store: &'static str| metrics::counter!(DECISIONS, "store" => store);
        DecisionCounters {
            redis: c("redis"),
            local: c("local"),
            allow: c("allow"),
            deny: c("deny"),
        }
    }
}

/// Handles the hot path uses, resolved once.
#[derive(Clone)]
pub struct GatewayMetrics {
    pub rules: Vec<RuleCounters>,
    pub allowed_unmatched: Counter,
    pub banned: Counter,
    pub allowlisted: Counter,
    pub unavailable: Counter,
    pub redis_seconds: Histogram,
    pub redis_errors: Counter,
    pub upstream_seconds: Histogram,
    pub degraded: Gauge,
    pub bans_active: Gauge,
    pub decisions: DecisionCounters,
}

impl GatewayMetrics {
    pub fn new(rule_names: &[&str]) -> GatewayMetrics {
        let other =
            |d: &'static str| metrics::counter!(REQUESTS, "rule" => NO_RULE, "decision" => d);
        GatewayMetrics {
            rules: rule_names.iter().map(|n| RuleCounters::new(n)).collect(),
            allowed_unmatched: other("allowed"),
            banned: other("banned"),
            allowlisted: other("allowlisted"),
            unavailable: other("unavailable"),
            redis_seconds: metrics::histogram!(REDIS_SECONDS),
            redis_errors: metrics::counter!(REDIS_ERRORS),
            upstream_seconds: metrics::histogram!(UPSTREAM_SECONDS),
            degraded: metrics::gauge!(DEGRADED),
            bans_active: metrics::gauge!(BANS_ACTIVE),
            decisions: DecisionCounters::new(),
        }
    }
}

/// Counts an upstream failure of `kind` (`connect`, `timeout`, `other`).
pub fn upstream_error(kind: &'static str) {
    metrics::counter!(UPSTREAM_ERRORS, "kind" => kind).increment(1);
}

/// Counts a ban made by `source` (`auto`, `manual`).
pub fn ban_made(source: &'static str) {
    metrics::counter!(BANS_TOTAL, "source" => source).increment(1);
}
