//! The limiter's side of leased tokens (see `tokens` for the leases
//! themselves): admissions from a lease, the top-up a running-low lease
//! asks for, and the return of what ended leases held.

use std::time::{Duration, Instant};

use super::call::{Mode, SharedStore, Status, SubjectCall, SubjectReply};
use super::decide::{Pass, Store};
use super::tokens::{leasable, signature, Admitted};
use super::{Limiter, Route};
use crate::rules::{Rule, SubjectGroup};

impl<S: SharedStore> Limiter<S> {
    /// Records the current subject as admitted from this node's lease (its
    /// decision already counted).
    pub(super) fn admit_from_lease(&self, pass: &mut Pass<'_, '_>, sig: u64, admitted: Admitted) {
        self.metrics.lease_admissions.increment(1);
        pass.decided.push((
            SubjectReply {
                granted: 1,
                buckets: admitted.buckets,
                ..SubjectReply::undecided()
            },
            Store::Lease,
        ));
        pass.sigs.push(Some(sig));
    }

    /// The lease signature of `g`'s rules when its requests may be admitted
    /// from leased tokens: leases on, the group leasable, its shard up.
    pub(super) fn lease_signature(&self, tag: &str, g: &SubjectGroup<'_>) -> Option<u64> {
        if !self.tokens.enabled() || !leasable(g) {
            return None;
        }
        matches!(self.route(tag), Route::Shared(..)).then(|| signature(g))
    }

    /// A request admitted from the last quarter of its subject's lease
    /// asks Redis for `want` more: what the subject can spare joins the
    /// lease. A top-up never refuses (the request was charged with its
    /// lease), so it never counts a violation; a subject Redis says is
    /// banned (by another node) has its leases ended. A failed call is
    /// counted like any other (errors, the shard's breaker) and leaves the
    /// lease as it is.
    pub(super) async fn top_up(
        &self,
        tag: &str,
        sig: u64,
        g: &SubjectGroup<'_>,
        want: u32,
        now_us: Option<u64>,
    ) {
        let Route::Shared(shared, shard) = self.route(tag) else {
            self.tokens.answered(tag, sig);
            return;
        };
        let call = SubjectCall {
            tag,
            rules: &g.rules,
            ttl_ms: g.ttl_ms,
            bannable: g.subject.bannable(),
            mode: Mode::TopUp,
            now_us,
            lease: "",
            count: want,
            costs: &[],
        };
        let started = Instant::now();
        let result = shared.decide(&call).await;
        self.metrics
            .redis_seconds
            .record(started.elapsed().as_secs_f64());
        self.tokens.answered(tag, sig);
        match &result {
            Ok(_) => self.breakers.success(&shard),
            Err(e) if e.is_a_failed_call() => {
                self.metrics.redis_errors.increment(1);
                self.breakers.failure(&shard, e, started);
            }
            Err(_) => {}
        }
        match result {
            Ok(SubjectReply {
                status: Status::BannedBefore,
                ..
            }) => self.end_leases_of(tag),
            Ok(reply) if reply.granted > 0 => {
                self.metrics.lease_grants.increment(1);
                self.tokens
                    .topped_up(tag, sig, g, reply.granted, &reply.buckets, Instant::now());
            }
            Ok(reply) => {
                self.tokens.held(tag, sig, &reply.buckets, Instant::now());
            }
            Err(_) => {}
        }
    }

    /// Ends this node's leases of subject `tag` (an unban, a plan change):
    /// what they held goes back at the next [`Limiter::return_leases`].
    pub(crate) fn end_leases_of(&self, tag: &str) {
        if let Some(held) = self.tokens.end_subject(tag, None) {
            self.tokens.give_back_returned(held);
        }
    }

    /// Ends every lease of this node (a reload: rules may have changed).
    pub(crate) fn end_all_leases(&self) {
        self.tokens.end_all();
    }

    /// How often [`Limiter::return_leases`] should run (`None`: leases are
    /// off): often enough that an ended lease's tokens are back within a
    /// few tens of milliseconds.
    pub(crate) fn lease_sweep_every(&self) -> Option<Duration> {
        self.tokens.enabled().then(|| {
            (self.tokens.lease_for() / 2)
                .min(Duration::from_millis(25))
                .max(Duration::from_millis(5))
        })
    }

    /// Gives back every unused token waiting to go back (leases ended by an
    /// event, a refund or a reload, or whose time is over: those are looked
    /// for every half lease), each to the store that leased it, in one
    /// refund call per subject and rule set. Run periodically.
    pub(crate) async fn return_leases(&self) {
        let now = std::time::Instant::now();
        let scan = {
            let mut last = self
                .last_lease_scan
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let due = last
                .is_none_or(|t| now.saturating_duration_since(t) >= self.tokens.lease_for() / 2);
            if due {
                *last = Some(now);
            }
            due
        };
        for r in self.tokens.sweep(now, scan) {
            let rules: Vec<&Rule> = r.rules.iter().collect();
            let call = SubjectCall {
                tag: &r.tag,
                rules: &rules,
                ttl_ms: r.ttl_ms,
                bannable: false,
                mode: Mode::Refund { rule: "" },
                now_us: None,
                lease: "",
                count: r.count,
                costs: &[],
            };
            let result = match self.route(&r.tag) {
                Route::Shared(shared, _) => shared.decide(&call).await.map(|_| ()),
                // Its shard is down: the tokens stay spent (never too many
                // admitted), and come back with time.
                Route::Fallback => Ok(()),
            };
            match result {
                Ok(()) => {
                    self.metrics.lease_returned.increment(u64::from(r.count));
                    // A refusal remembered while these were away no longer
                    // holds.
                    self.deny.forget(&r.tag);
                }
                Err(e) => log::warn!(
                    "could not give back {} leased requests of {}: {e}",
                    r.count,
                    r.tag
                ),
            }
        }
    }
}
