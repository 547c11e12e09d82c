//! What the replay counts: per rule, the requests it matched and refused
//! and whom it refused; the bans made; the totals by decision. Subjects are
//! interned once (a number each), so what is kept per subject is a few
//! integers, and memory grows with the distinct subjects, not the lines.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::rules::{Rule, Subject};

/// A hasher for maps keyed by subject numbers: they are dense and given
/// out by [`Subjects`], never chosen by a client, so one multiplication
/// spreads them (SipHash cost a tenth of the replay's time).
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by subject number.
pub(crate) type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;
/// A set of subject numbers.
pub(crate) type IdSet = HashSet<u32, BuildHasherDefault<IdHasher>>;

/// Every distinct subject seen, by number.
#[derive(Default)]
pub(crate) struct Subjects {
    ids: HashMap<Subject, u32>,
    tags: Vec<String>,
}

impl Subjects {
    /// The number of `s`, given on first sight.
    pub(crate) fn id(&mut self, s: &Subject) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = self.tags.len() as u32;
        self.tags.push(s.tag());
        self.ids.insert(s.clone(), id);
        id
    }

    /// The subject's name (`ip:203.0.113.7`, `consumer:<sha256>`).
    pub(crate) fn tag(&self, id: u32) -> &str {
        self.tags.get(id as usize).map_or("", String::as_str)
    }

    pub(crate) fn len(&self) -> usize {
        self.tags.len()
    }
}

/// One rule's counts.
pub(crate) struct RuleTally {
    pub(crate) name: Arc<str>,
    /// The plan it belongs to (`None`: `[[rules]]`).
    pub(crate) plan: Option<Arc<str>>,
    pub(crate) matched: u64,
    pub(crate) subjects: IdSet,
    /// Requests this rule refused (it was the rule the client was told).
    pub(crate) refused: u64,
    pub(crate) refused_by_subject: IdMap<u64>,
    /// Bans made by this rule's refusals.
    pub(crate) bans: u64,
}

/// Bans of one subject.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SubjectBans {
    pub(crate) bans: u32,
    pub(crate) strikes: u32,
    pub(crate) longest_ms: u64,
    pub(crate) first_at_us: u64,
}

/// Requests by what was decided.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub(crate) struct Totals {
    pub(crate) requests: u64,
    pub(crate) allowed: u64,
    /// Allowed because no rule matched.
    pub(crate) unmatched: u64,
    pub(crate) limited: u64,
    pub(crate) banned: u64,
    pub(crate) allowlisted: u64,
    /// Answered 400 by matching (a path whose readings disagree).
    pub(crate) bad_request: u64,
    /// Answered 401: a key no assignment names, with
    /// `consumers.unknown_keys = "reject"`.
    pub(crate) unknown_key: u64,
}

/// Everything counted.
pub(crate) struct Tally {
    pub(crate) rules: Vec<RuleTally>,
    index: HashMap<Arc<str>, usize>,
    pub(crate) subjects: Subjects,
    pub(crate) totals: Totals,
    pub(crate) bans: IdMap<SubjectBans>,
}

impl Tally {
    /// Counts for `rules` (each with its plan), in that order.
    pub(crate) fn new<'a>(rules: impl Iterator<Item = (&'a Rule, Option<Arc<str>>)>) -> Tally {
        let mut t = Tally {
            rules: Vec::new(),
            index: HashMap::new(),
            subjects: Subjects::default(),
            totals: Totals::default(),
            bans: IdMap::default(),
        };
        for (rule, plan) in rules {
            t.index.insert(rule.name.clone(), t.rules.len());
            t.rules.push(RuleTally {
                name: rule.name.clone(),
                plan,
                matched: 0,
                subjects: IdSet::default(),
                refused: 0,
                refused_by_subject: IdMap::default(),
                bans: 0,
            });
        }
        t
    }

    /// The index of the rule named `name` (names are unique across rules
    /// and plans).
    pub(crate) fn index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// A request matched `rule` on `subject`.
    pub(crate) fn matched(&mut self, rule: usize, subject: u32) {
        if let Some(r) = self.rules.get_mut(rule) {
            r.matched += 1;
            r.subjects.insert(subject);
        }
    }

    /// `rule` refused a request of `subject`.
    pub(crate) fn refused(&mut self, rule: usize, subject: u32) {
        if let Some(r) = self.rules.get_mut(rule) {
            r.refused += 1;
            *r.refused_by_subject.entry(subject).or_default() += 1;
        }
    }

    /// A ban was made on `subject` at `at_us`, for `dur_ms`, by `rule`.
    pub(crate) fn banned(
        &mut self,
        subject: u32,
        rule: Option<usize>,
        at_us: u64,
        dur_ms: u64,
        strikes: u32,
    ) {
        if let Some(r) = rule.and_then(|r| self.rules.get_mut(r)) {
            r.bans += 1;
        }
        let b = self.bans.entry(subject).or_insert(SubjectBans {
            first_at_us: at_us,
            ..SubjectBans::default()
        });
        b.bans += 1;
        b.strikes = b.strikes.max(strikes);
        b.longest_ms = b.longest_ms.max(dur_ms);
    }
}

/// The `n` largest of `counts`, largest first (ties by subject name).
pub(crate) fn top(
    counts: impl Iterator<Item = (u32, u64)>,
    subjects: &Subjects,
    n: usize,
) -> Vec<(&str, u64)> {
    let mut all: Vec<(u32, u64)> = counts.collect();
    all.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then_with(|| subjects.tag(a.0).cmp(subjects.tag(b.0)))
    });
    all.into_iter()
        .take(n)
        .map(|(id, c)| (subjects.tag(id), c))
        .collect()
}
