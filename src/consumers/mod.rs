//! Consumers and plans: API keys with limits of their own.
//!
//! A consumer is whoever presents a key in the `[consumers]` header. Its
//! plan comes from a runtime assignment (admin API, kept in Redis), else a
//! static one (`consumers.keys`), else `default_plan`; the plan's rules are
//! then decided for the consumer's subject in the same atomic call as the
//! `[[rules]]` keyed by that header. Keys are never kept in clear outside
//! the config file: Redis holds their SHA-256 only, as subject tags and as
//! fields of the assignment table.
//!
//! The parts, one file each:
//!
//! - `plans`: the compiled plans, and the phase that adds a request's plan
//!   rules to its subject groups;
//! - `table`: the runtime assignments, cached on every node and kept in
//!   step by the ban events and reconciles;
//! - [`admin`]: the `/admin/consumers/{key}` handlers.
//!
//! It is a room of its own because plans are a policy over the limiter, not
//! a part of it: the decision only ever sees rules grouped by subject.

mod plans;
mod table;

pub(crate) use plans::ConsumerError;
pub(crate) use plans::Plans;
pub(crate) use table::ConsumerTable;

use sha2::{Digest, Sha256};

/// The SHA-256 of a consumer key, in lower-case hex: how the key is named
/// in Redis (subject tags, the assignment table, the audit log).
pub fn key_hash(key: &[u8]) -> String {
    let digest = Sha256::digest(key);
    let mut hex = String::with_capacity(64);
    for b in digest {
        use std::fmt::Write;
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_hash_to_their_sha256() {
        assert_eq!(
            super::key_hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
