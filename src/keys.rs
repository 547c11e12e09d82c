//! Every Redis key and channel name, defined in one place.
//!
//! A subject's keys share the hash tag `{<subject>}` so one script call on
//! them is single-slot on Redis Cluster: `fg:{ip:203.0.113.7}:b` (buckets
//! and violation window) and `fg:{ip:203.0.113.7}:ban` (ban and strikes),
//! and `fg:{consumer:<sha256>}:c:<rule>` (concurrency leases).
//! Gateway-wide keys (allowlist, CIDR bans, audit stream) are touched only by
//! admin calls and reconciliation, never by a per-request script.

/// The state hash of a subject: bucket TATs and the violation window.
pub(crate) fn state(prefix: &str, tag: &str) -> String {
    format!("{prefix}{{{tag}}}:b")
}

/// The ban hash of a subject: until, strikes, reason, source.
pub(crate) fn ban(prefix: &str, tag: &str) -> String {
    format!("{prefix}{{{tag}}}:ban")
}

/// The concurrency slots of one of a subject's rules: a sorted set of lease
/// ids, each scored by its expiry (µs).
pub(crate) fn lease(prefix: &str, tag: &str, rule: &str) -> String {
    format!("{prefix}{{{tag}}}:c:{rule}")
}

/// Runtime consumer plans: field = SHA-256 of the key (hex), value = plan;
/// field `#v` counts the changes, so reconcile skips an unchanged table.
pub(crate) fn consumers(prefix: &str) -> String {
    format!("{prefix}consumers")
}

/// SCAN pattern matching every IP subject's ban hash.
pub(crate) fn ban_pattern(prefix: &str) -> String {
    format!("{prefix}{{ip:*}}:ban")
}

/// The subject tag inside a ban key, if `key` is one.
pub(crate) fn tag_of_ban_key<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
    key.strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix("}:ban")
}

/// Hash of CIDR bans: field = CIDR, value = JSON record.
pub(crate) fn cidr_bans(prefix: &str) -> String {
    format!("{prefix}cidr-bans")
}

/// Set of runtime allowlist CIDRs.
pub(crate) fn allowlist(prefix: &str) -> String {
    format!("{prefix}allowlist")
}

/// The audit stream of ban and unban events.
pub(crate) fn audit(prefix: &str) -> String {
    format!("{prefix}audit")
}

/// A marker written once per Redis dataset: if it vanishes, Redis lost its
/// data (restarted without persistence) and nodes restore what they know.
pub(crate) fn epoch(prefix: &str) -> String {
    format!("{prefix}epoch")
}

/// The pub/sub channel of ban, unban and allowlist events.
pub(crate) fn events(prefix: &str) -> String {
    format!("{prefix}events")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ban_keys_round_trip() {
        let k = super::ban("fg:", "ip:2001:db8::/64");
        assert_eq!(k, "fg:{ip:2001:db8::/64}:ban");
        assert_eq!(super::tag_of_ban_key("fg:", &k), Some("ip:2001:db8::/64"));
    }
}
