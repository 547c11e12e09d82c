//! Concurrency slots a request holds while it is in flight.
//!
//! A request allowed by a concurrency rule holds one slot of it, named by a
//! lease id unique to the request, until its response ends. The slot lives
//! in the store that decided (Redis: a sorted set of lease ids per subject
//! and rule, scored by the lease's expiry), so a node that dies holding
//! slots frees them when their leases run out; a live request renews its
//! leases while it lasts. It is separate from the decision because it is
//! what happens after it, for as long as the response streams.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

/// One concurrency rule's slot: the rule and how long its lease lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSlot {
    pub rule: Arc<str>,
    pub lease_ms: u64,
}

/// The slots one request holds of one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeldSlots {
    pub(crate) tag: String,
    pub(crate) slots: Vec<LeaseSlot>,
    /// Granted by Redis (else by this node's store): renewals and the
    /// release go to the same place.
    pub(crate) on_redis: bool,
}

/// Every slot one request holds, and where: Redis, or this node's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseSet {
    pub(crate) id: String,
    pub(crate) subjects: Vec<HeldSlots>,
}

impl LeaseSet {
    /// How often the leases must be renewed: the shortest renewal interval
    /// of any slot (a third of its lease).
    pub(crate) fn renew_every(&self) -> std::time::Duration {
        let ms = self
            .subjects
            .iter()
            .flat_map(|s| s.slots.iter())
            .map(|s| s.lease_ms)
            .min()
            .unwrap_or(3000);
        std::time::Duration::from_millis((ms / 3).max(1))
    }
}

/// A renewal or release of one subject's slots.
#[derive(Debug, Clone)]
pub struct LeaseCall<'a> {
    pub tag: &'a str,
    pub lease: &'a str,
    pub slots: &'a [LeaseSlot],
    /// `true` renews the leases still held, `false` releases them.
    pub renew: bool,
    /// Pins the clock (µs since the epoch); `None` = the store's own clock.
    pub now_us: Option<u64>,
}

/// This process's part of every lease id: distinct across nodes (and
/// restarts), so two requests never share a lease.
static NODE_PART: LazyLock<String> = LazyLock::new(|| {
    let t = super::local::wall_clock_us();
    format!("{:x}{:x}", t, std::process::id())
});

/// A lease id no other request of any node holds.
pub(crate) fn new_lease_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{:x}", *NODE_PART, NEXT.fetch_add(1, Ordering::Relaxed))
}
