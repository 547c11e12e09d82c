//! Reservations put right once the answer is known.
//!
//! A rule with `settle` or `count` charges an admitted request up front
//! like any other (its cost, or the cost the request named): that charge is
//! a reservation, so concurrent requests can never together pass more than
//! the limit before their answers come. When the answer's head arrives, a
//! `count` rule whose status does not match gives the reservation back;
//! a `settle` rule reads the real cost from the answer's header, or from
//! its trailers when the body ends, and the difference is charged (even
//! into debt: the subject's next requests wait it out) or refunded. One
//! store call per subject, on the store that decided it, before the client
//! sees the answer's end: its next request sees the settled state.
//!
//! A settle value that is missing or invalid leaves the reservation as it
//! stood (`floodgate_settle_errors_total`): a client gains nothing by
//! withholding it, since it reserved the most it may use.

use super::call::{Mode, SharedStore, SubjectCall};
use super::decide::Store;
use super::Limiter;
use crate::config::MAX_COST;
use crate::rules::Rule;

/// What an admitted request reserved on rules that settle or count, per
/// subject, until its answer is known.
#[derive(Debug, Default)]
pub(crate) struct Reservation {
    subjects: Vec<Reserved>,
    /// The clock the decision was pinned to (the replay's), if any.
    now_us: Option<u64>,
}

/// One subject's reserved rules.
#[derive(Debug)]
struct Reserved {
    tag: String,
    store: Store,
    ttl_ms: u64,
    rules: Vec<Pending>,
}

/// One rule's reservation and what the answer made of it.
#[derive(Debug)]
struct Pending {
    rule: Rule,
    /// What the decision charged.
    charged: i64,
    /// What the answer says it should have been, once known.
    owed: Option<i64>,
}

impl Reservation {
    pub(super) fn new(now_us: Option<u64>) -> Reservation {
        Reservation {
            subjects: Vec::new(),
            now_us,
        }
    }

    /// Adds the charged rules of one subject that settle or count.
    pub(super) fn add(&mut self, tag: &str, store: Store, ttl_ms: u64, rules: Vec<(&Rule, i64)>) {
        let rules: Vec<Pending> = rules
            .into_iter()
            .filter(|(r, _)| {
                r.adjust
                    .as_ref()
                    .is_some_and(|a| a.settle.is_some() || !a.count.is_empty())
            })
            .map(|(r, charged)| Pending {
                rule: r.clone(),
                charged,
                owed: None,
            })
            .collect();
        if !rules.is_empty() {
            self.subjects.push(Reserved {
                tag: tag.to_string(),
                store,
                ttl_ms,
                rules,
            });
        }
    }

    /// True when no rule reserved anything to put right.
    pub(crate) fn is_empty(&self) -> bool {
        self.subjects.is_empty()
    }

    fn pending(&mut self) -> impl Iterator<Item = &mut Pending> {
        self.subjects
            .iter_mut()
            .flat_map(|s| s.rules.iter_mut())
            .filter(|p| p.owed.is_none())
    }

    /// The answer's head is here: `count` rules learn whether they are
    /// charged, `settle` rules read `header` for the real cost. True when
    /// some rule still waits for the trailers.
    pub(crate) fn head(&mut self, status: u16, header: impl Fn(&str) -> Option<String>) -> bool {
        for p in self.pending() {
            let Some(adjust) = p.rule.adjust.clone() else {
                p.owed = Some(p.charged);
                continue;
            };
            if !adjust.counts(status) {
                p.owed = Some(0);
                continue;
            }
            match &adjust.settle {
                None => p.owed = Some(p.charged),
                Some(name) => {
                    if let Some(v) = header(name.as_str()) {
                        p.owed = Some(read_cost(&v, p.charged));
                    }
                }
            }
        }
        self.pending().next().is_some()
    }

    /// The answer's body ended with `trailer` (its trailers, if any): the
    /// rules still waiting read theirs; missing, they stand as reserved.
    pub(crate) fn end(&mut self, trailer: impl Fn(&str) -> Option<String>) {
        for p in self.pending() {
            let Some(name) = p.rule.adjust.as_ref().and_then(|a| a.settle.clone()) else {
                p.owed = Some(p.charged);
                continue;
            };
            p.owed = Some(match trailer(name.as_str()) {
                Some(v) => read_cost(&v, p.charged),
                None => {
                    crate::metrics::settle_error("missing");
                    p.charged
                }
            });
        }
    }
}

/// The real cost a settle header says, or `charged` (counted) when it is
/// not a whole number from 0 to `MAX_COST`.
fn read_cost(v: &str, charged: i64) -> i64 {
    match v.trim().parse::<u64>() {
        Ok(n) if n <= u64::from(MAX_COST) => n as i64,
        _ => {
            crate::metrics::settle_error("invalid");
            charged
        }
    }
}

impl<S: SharedStore> Limiter<S> {
    /// Puts right what `r`'s answered rules reserved: one call per subject
    /// with differences, on the store that decided it. A failed call is
    /// counted; the reservation then stands.
    pub(crate) async fn settle(&self, r: &mut Reservation) {
        let now_us = r.now_us;
        for s in &mut r.subjects {
            let mut rules: Vec<&Rule> = Vec::new();
            let mut diffs: Vec<i64> = Vec::new();
            for p in s.rules.iter_mut() {
                let Some(owed) = p.owed else { continue };
                let diff = owed - p.charged;
                // Settled: a later call must not apply it again.
                p.charged = owed;
                if diff != 0 {
                    crate::metrics::settled(if diff > 0 { "charged" } else { "refunded" });
                    rules.push(&p.rule);
                    diffs.push(diff);
                }
            }
            if rules.is_empty() || !matches!(s.store, Store::Redis | Store::Local | Store::Lease) {
                continue;
            }
            let call = SubjectCall {
                tag: &s.tag,
                rules: &rules,
                ttl_ms: s.ttl_ms,
                bannable: false,
                mode: Mode::Settle,
                now_us,
                lease: "",
                count: 1,
                costs: &diffs,
            };
            if diffs.iter().any(|d| *d < 0) {
                // Room came back: a refusal remembered no longer holds.
                self.deny.forget(&s.tag);
            }
            if let Err(e) = self.on_store(s.store, &call).await {
                crate::metrics::settle_error("store");
                // One line per kind of failure and log window (the
                // subject is left out: a Redis outage fails them all).
                log::warn!("could not settle reservations after their answers; they stand as reserved: {e}");
            }
        }
    }
}
