//! Prometheus metrics: names defined once, handles resolved once.
//!
//! The recorder is installed before anything else is built, so every handle
//! taken at start-up (per rule and decision) is live; the hot path then only
//! increments atomics instead of hashing label sets per request.

use std::collections::BTreeMap;

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
pub const CONFIG_RELOADS: &str = "floodgate_config_reloads_total";
pub(crate) const WEBSOCKET_CONNECTIONS: &str = "floodgate_websocket_connections";
pub(crate) const DENY_CACHE_HITS: &str = "floodgate_deny_cache_hits_total";
pub(crate) const LEASE_ERRORS: &str = "floodgate_lease_errors_total";
pub(crate) const UPSTREAM_FRESH_RETRIES: &str = "floodgate_upstream_fresh_retries_total";
pub const UPSTREAM_HEALTHY: &str = "floodgate_upstream_healthy";
pub(crate) const UPSTREAM_RETRIES: &str = "floodgate_upstream_retries_total";
pub const UPSTREAM_EJECTIONS: &str = "floodgate_upstream_ejections_total";
pub const UPSTREAM_EJECTIONS_HELD: &str = "floodgate_upstream_ejections_held_back_total";
pub(crate) const CLIENT_ERRORS: &str = "floodgate_client_errors_total";
pub const DECISIONS: &str = "floodgate_decisions_total";
pub const SHARD_DEGRADED: &str = "floodgate_redis_shard_degraded";
pub(crate) const REDIS_RETRIES: &str = "floodgate_redis_retries_total";
pub const DECISIONS_SHED: &str = "floodgate_redis_shed_total";
pub const LEASE_GRANTS: &str = "floodgate_lease_grants_total";
pub const LEASE_ADMISSIONS: &str = "floodgate_lease_admissions_total";
pub const LEASE_RETURNED: &str = "floodgate_lease_returned_total";
pub(crate) const ACCESS_LOG_DROPPED: &str = "floodgate_access_log_dropped_total";
pub const SETTLEMENTS: &str = "floodgate_settlements_total";
pub const SETTLE_ERRORS: &str = "floodgate_settle_errors_total";
pub(crate) const PROXY_PROTOCOL: &str = "floodgate_proxy_protocol_total";
pub(crate) const BLOCKLIST_HITS: &str = "floodgate_blocklist_hits_total";
pub(crate) const BLOCKLIST_ENTRIES: &str = "floodgate_blocklist_entries";
pub(crate) const BLOCKLIST_BAD_LINES: &str = "floodgate_blocklist_bad_lines";
pub const BLOCKLIST_STALE: &str = "floodgate_blocklist_stale";
pub(crate) const BLOCKLIST_READS: &str = "floodgate_blocklist_reads_total";
pub(crate) const JWT: &str = "floodgate_jwt_total";
pub(crate) const JWKS_KEYS: &str = "floodgate_jwks_keys";
pub(crate) const JWKS_REFRESH: &str = "floodgate_jwks_refresh_total";
pub const JWKS_STALE: &str = "floodgate_jwks_stale";
pub(crate) const CROWDSEC_HITS: &str = "floodgate_crowdsec_hits_total";
pub(crate) const CROWDSEC_DECISIONS: &str = "floodgate_crowdsec_decisions";
pub(crate) const CROWDSEC_PULLS: &str = "floodgate_crowdsec_pulls_total";
pub const CROWDSEC_UP: &str = "floodgate_crowdsec_up";
pub(crate) const CROWDSEC_SKIPPED: &str = "floodgate_crowdsec_skipped_total";

/// Label value for decisions that belong to no rule (bans, allowlist).
pub(crate) const NO_RULE: &str = "-";

/// Installs the global recorder; returns the handle `/metrics` renders.
/// A second call (tests in one process) returns `None`.
pub(crate) fn install() -> Option<PrometheusHandle> {
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
        CONFIG_RELOADS,
        "Configuration reloads, by result (ok or error)"
    );
    metrics::describe_gauge!(
        WEBSOCKET_CONNECTIONS,
        "WebSocket connections being relayed now"
    );
    metrics::describe_counter!(
        DENY_CACHE_HITS,
        "Refusals answered from the node's deny cache, with no Redis call"
    );
    metrics::describe_counter!(
        LEASE_ERRORS,
        "Concurrency lease renewals and releases that failed (the slot then ends with its lease)"
    );
    metrics::describe_counter!(
        UPSTREAM_FRESH_RETRIES,
        "Requests sent again on a fresh connection after a pooled one was found dead"
    );
    metrics::describe_gauge!(
        UPSTREAM_HEALTHY,
        "1 while this upstream URL takes traffic (probes healthy, not ejected), by pool and url"
    );
    metrics::describe_counter!(
        UPSTREAM_RETRIES,
        "Requests tried again on another URL of the pool, by pool"
    );
    metrics::describe_counter!(
        UPSTREAM_EJECTIONS,
        "Times an upstream URL was taken out of rotation after failures in a row, by pool and url"
    );
    metrics::describe_counter!(
        UPSTREAM_EJECTIONS_HELD,
        "Ejections not made because the pool had max_ejected_percent of its URLs out, or the URL was the last in rotation, by pool"
    );
    metrics::describe_counter!(
        CLIENT_ERRORS,
        "Requests refused for the client's own fault (bad or stalled body, bad target, too many headers), by kind"
    );
    metrics::describe_counter!(
        DECISIONS,
        "Subject decisions by where they were made: redis (leased tokens included), local, allow, deny"
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
        LEASE_GRANTS,
        "Redis decisions that leased tokens to this node (granted more than one request)"
    );
    metrics::describe_counter!(
        LEASE_ADMISSIONS,
        "Subject decisions admitted from this node's leased tokens, with no Redis call (also counted in floodgate_decisions_total{store=\"redis\"}: Redis charged them beforehand)"
    );
    metrics::describe_counter!(
        LEASE_RETURNED,
        "Requests' worth of leased tokens given back to Redis unused (a lease that expired, ended by a refund, an unban, a plan change or a reload)"
    );
    metrics::describe_counter!(
        DECISIONS_SHED,
        "Decisions past redis.max_decisions_per_second, sent to on_failure"
    );
    metrics::describe_counter!(
        SETTLEMENTS,
        "Rules' reservations put right once the answer was known: charged (the answer cost more), refunded (less, or a status the rule does not count)"
    );
    metrics::describe_counter!(
        SETTLE_ERRORS,
        "Reservations settled as they stood: the answer's cost was missing or invalid, or the store could not be told"
    );
    metrics::describe_counter!(
        ACCESS_LOG_DROPPED,
        "Access log lines dropped because the writer was behind (never waited for)"
    );
    metrics::describe_counter!(
        PROXY_PROTOCOL,
        "Public connections by what their PROXY protocol header did (server.proxy_protocol): v1, v2, unnamed, absent, untrusted, malformed, timeout"
    );
    metrics::describe_counter!(
        BLOCKLIST_HITS,
        "Requests refused because their client is in this [[blocklists]] list (also counted as banned), by list"
    );
    metrics::describe_gauge!(
        BLOCKLIST_ENTRIES,
        "Addresses and networks in force from this list, by list"
    );
    metrics::describe_gauge!(
        BLOCKLIST_BAD_LINES,
        "Lines of this list's file skipped at its last read (not an address or network), by list"
    );
    metrics::describe_gauge!(
        BLOCKLIST_STALE,
        "1 while this list's file cannot be read and its last good content is in force, by list"
    );
    metrics::describe_counter!(
        BLOCKLIST_READS,
        "Reads of a list's file, by list and result (ok, error)"
    );
    metrics::describe_counter!(
        JWT,
        "Bearer tokens by outcome ([jwt]): valid, absent, or why one was refused"
    );
    metrics::describe_gauge!(JWKS_KEYS, "Keys of the JWKS in force");
    metrics::describe_counter!(JWKS_REFRESH, "Fetches of the JWKS, by result (ok, error)");
    metrics::describe_gauge!(
        JWKS_STALE,
        "1 while the JWKS cannot be fetched and the keys fetched before stay in force"
    );
    metrics::describe_counter!(
        CROWDSEC_HITS,
        "Requests refused by a CrowdSec decision (also counted as banned)"
    );
    metrics::describe_gauge!(
        CROWDSEC_DECISIONS,
        "CrowdSec ban decisions in force on this node"
    );
    metrics::describe_counter!(
        CROWDSEC_PULLS,
        "Polls of the CrowdSec decisions stream, by result (ok, error)"
    );
    metrics::describe_gauge!(
        CROWDSEC_UP,
        "1 while the last poll of the CrowdSec Local API worked"
    );
    metrics::describe_counter!(
        CROWDSEC_SKIPPED,
        "CrowdSec decisions not enforced: not a ban, another scope, a bad value, or past crowdsec.max_decisions"
    );
    Some(handle)
}

/// The counters of one rule, one per decision. A compiled rule carries its
/// own, so a rule added by a reload counts from its first request, and a
/// rule that keeps its name keeps its series.
#[derive(Clone)]
pub(crate) struct RuleCounters {
    pub(crate) allowed: Counter,
    pub(crate) limited: Counter,
    pub(crate) shadow_limited: Counter,
}

impl RuleCounters {
    pub(crate) fn new(rule: &str) -> RuleCounters {
        let c = |d: &'static str| metrics::counter!(REQUESTS, "rule" => rule.to_string(), "decision" => d);
        RuleCounters {
            allowed: c("allowed"),
            limited: c("limited"),
            shadow_limited: c("shadow_limited"),
        }
    }
}

impl std::fmt::Debug for RuleCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RuleCounters")
    }
}

/// `floodgate_decisions_total`, one counter per store that decides.
#[derive(Clone)]
pub(crate) struct DecisionCounters {
    pub(crate) redis: Counter,
    pub(crate) local: Counter,
    pub(crate) allow: Counter,
    pub(crate) deny: Counter,
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
pub(crate) struct GatewayMetrics {
    pub(crate) allowed_unmatched: Counter,
    pub(crate) banned: Counter,
    pub(crate) allowlisted: Counter,
    pub(crate) unavailable: Counter,
    pub(crate) redis_seconds: Histogram,
    pub(crate) redis_errors: Counter,
    pub(crate) upstream_seconds: Histogram,
    pub(crate) degraded: Gauge,
    pub(crate) bans_active: Gauge,
    pub(crate) deny_cache_hits: Counter,
    pub(crate) lease_errors: Counter,
    pub(crate) decisions: DecisionCounters,
    /// Decisions that took a lease of tokens (granted more than one).
    pub(crate) lease_grants: Counter,
    /// Subjects admitted from this node's leased tokens (also counted as
    /// decided by Redis, which charged them).
    pub(crate) lease_admissions: Counter,
    /// Requests' worth of leased tokens given back unused.
    pub(crate) lease_returned: Counter,
}

impl GatewayMetrics {
    /// Resolves every handle once, after the recorder is installed.
    pub(crate) fn resolve() -> GatewayMetrics {
        let other =
            |d: &'static str| metrics::counter!(REQUESTS, "rule" => NO_RULE, "decision" => d);
        GatewayMetrics {
            allowed_unmatched: other("allowed"),
            banned: other("banned"),
            allowlisted: other("allowlisted"),
            unavailable: other("unavailable"),
            redis_seconds: metrics::histogram!(REDIS_SECONDS),
            redis_errors: metrics::counter!(REDIS_ERRORS),
            upstream_seconds: metrics::histogram!(UPSTREAM_SECONDS),
            degraded: metrics::gauge!(DEGRADED),
            bans_active: metrics::gauge!(BANS_ACTIVE),
            deny_cache_hits: metrics::counter!(DENY_CACHE_HITS),
            lease_errors: metrics::counter!(LEASE_ERRORS),
            decisions: DecisionCounters::new(),
            lease_grants: metrics::counter!(LEASE_GRANTS),
            lease_admissions: metrics::counter!(LEASE_ADMISSIONS),
            lease_returned: metrics::counter!(LEASE_RETURNED),
        }
    }
}

/// Counts an upstream failure of `kind` (`connect`, `timeout`, `other`).
pub(crate) fn upstream_error(kind: &'static str) {
    metrics::counter!(UPSTREAM_ERRORS, "kind" => kind).increment(1);
}

/// Counts one rule's reservation put right (`charged`, `refunded`).
pub(crate) fn settled(outcome: &'static str) {
    metrics::counter!(SETTLEMENTS, "outcome" => outcome).increment(1);
}

/// Counts one rule's reservation left as it stood, and why (`missing`,
/// `invalid`, `store`).
pub(crate) fn settle_error(reason: &'static str) {
    metrics::counter!(SETTLE_ERRORS, "reason" => reason).increment(1);
}

/// Counts a request refused for the client's own fault.
pub(crate) fn client_error(kind: &'static str) {
    client_error_n(kind, 1);
}

/// Counts `n` client errors of one kind at once.
pub(crate) fn client_error_n(kind: &'static str, n: u64) {
    metrics::counter!(CLIENT_ERRORS, "kind" => kind).increment(n);
}

/// Counts a ban made by `source` (`auto`, `manual`).
pub(crate) fn ban_made(source: &'static str) {
    metrics::counter!(BANS_TOTAL, "source" => source).increment(1);
}

/// Counts a reload by its result (`ok`, `error`).
pub(crate) fn config_reload(result: &'static str) {
    metrics::counter!(CONFIG_RELOADS, "result" => result).increment(1);
}

/// The gauge of WebSocket connections being relayed.
pub(crate) fn websocket_connections() -> Gauge {
    metrics::gauge!(WEBSOCKET_CONNECTIONS)
}

/// Totals of [`REQUESTS`] by `decision`, summed over rules, and the value of
/// [`BANS_ACTIVE`], read back from the exporter's own rendering: `metrics`
/// handles can be bumped but not read, and the rendering is exactly what
/// Prometheus scrapes, so the dashboard and Prometheus never disagree.
pub(crate) fn read_back(rendered: &str) -> (BTreeMap<String, u64>, u64) {
    let mut decisions = BTreeMap::new();
    let mut bans_active = 0;
    for line in rendered.lines() {
        let Some(s) = Sample::parse(line) else {
            continue;
        };
        if s.name == REQUESTS {
            if let Some((_, d)) = s.labels.into_iter().find(|(k, _)| k == "decision") {
                *decisions.entry(d).or_insert(0) += s.value as u64;
            }
        } else if s.name == BANS_ACTIVE {
            bans_active = s.value.max(0.0) as u64;
        }
    }
    (decisions, bans_active)
}

/// One sample line of the Prometheus text format.
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample<'_> {
    /// Comments and lines that do not parse give `None`.
    fn parse(line: &str) -> Option<Sample<'_>> {
        if line.starts_with('#') {
            return None;
        }
        let name_end = line.find(['{', ' '])?;
        let (name, mut rest) = line.split_at(name_end);
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            rest = inner;
            loop {
                rest = rest.trim_start_matches(',');
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let (key, after) = rest.split_once("=\"")?;
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next()? {
                        (i, '"') => break i,
                        (_, '\\') => match chars.next()?.1 {
                            'n' => value.push('\n'),
                            c => value.push(c),
                        },
                        (_, c) => value.push(c),
                    }
                };
                labels.push((key.to_string(), value));
                rest = &after[end + 1..];
            }
        }
        let value = rest.split_whitespace().next()?.parse().ok()?;
        Some(Sample {
            name,
            labels,
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_summed_over_rules_from_the_rendering() {
        let text = "# HELP floodgate_requests_total Requests\n\
            # TYPE floodgate_requests_total counter\n\
            floodgate_requests_total{rule=\"per-ip\",decision=\"allowed\"} 7\n\
            floodgate_requests_total{rule=\"per.key\",decision=\"allowed\"} 5\n\
            floodgate_requests_total{decision=\"limited\",rule=\"a\\\"b\"} 2\n\
            floodgate_requests_total{rule=\"-\",decision=\"banned\"} 0\n\
            floodgate_redis_seconds_bucket{le=\"0.001\"} 4\n\
            floodgate_bans_active 3\n";
        let (d, bans) = read_back(text);
        assert_eq!(d.get("allowed"), Some(&12));
        assert_eq!(d.get("limited"), Some(&2));
        assert_eq!(d.get("banned"), Some(&0));
        assert_eq!(d.len(), 3);
        assert_eq!(bans, 3);
    }

    #[test]
    fn broken_lines_are_skipped() {
        let (d, bans) = read_back(
            "floodgate_requests_total{decision=\"allowed\n\
             floodgate_requests_total{decision=\"allowed\"} x\n\
             floodgate_bans_active\n",
        );
        assert!(d.is_empty());
        assert_eq!(bans, 0);
    }
}
