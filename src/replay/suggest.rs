//! `--suggest`: how fast each subject really went, and the smallest limits
//! that would have refused no more than a given share of subjects.
//!
//! Rates: each subject's peak is the most requests it made in one window
//! of the rule's `per`, counted in ten steps of `per / 10` (a window's
//! count is exact to within the requests of one step; memory is ten
//! counters per subject, whatever its rate). The percentiles are over the
//! subjects' peaks.
//!
//! Limits: a token bucket refuses a subject at least once exactly when, at
//! some request, the bucket it would hold if nothing were refused is
//! deeper than its burst: until the first refusal every request is charged
//! alike. So for a rate `r` the burst a subject needs is the deepest its
//! unlimited bucket gets (in the stores' own integer GCRA, one running
//! value per rate: `tat = max(tat, now) + cost x interval`), and the
//! smallest burst that refuses at most `k` subjects is the `(k+1)`-th
//! largest need. Rates are tried on a ladder of round numbers per `per`
//! (1, 2, 3, 5 per decade, from 0.1 to 500 000); the burst is exact for
//! each, and the suggestion is the pair with the smallest `rate + burst`
//! (the most a subject can send in one `per` from a full bucket), the
//! lower rate on a tie. A quota refuses a subject exactly when its count
//! in some period passes the quota, so the smallest quota is the
//! `(k+1)`-th largest per-period count. Each rule is judged alone: in a
//! replay, refusals by other rules and bans only take requests away from
//! it, so it refuses no more subjects than this says. Concurrency caps get
//! no suggestion.

use std::time::Duration;

use serde::Serialize;

use super::tally::IdMap;
use crate::policy::{BucketSpec, Limit, Period};
use crate::rules::Rule;

/// Steps per window for the peak rates.
const STEPS: u64 = 10;
/// Mantissas of the ladder of rates, per decade.
const MANTISSAS: [u32; 4] = [1, 2, 3, 5];
/// Decades of the ladder: 10^-1 to 10^5.
const DECADES: std::ops::RangeInclusive<i32> = -1..=5;
/// The longest an empty bucket may take to refill (the config's own
/// bound, `burst x per / rate`).
const MAX_CAPACITY_US: f64 = 1e13;

/// Parses `--refuse-at-most`: `0.1%`, or a fraction such as `0.001`.
pub(crate) fn parse_share(s: &str) -> Result<f64, String> {
    let (text, scale) = match s.trim().strip_suffix('%') {
        Some(p) => (p, 100.0),
        None => (s.trim(), 1.0),
    };
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 && v / scale <= 1.0 => Ok(v / scale),
        _ => Err(format!(
            "--refuse-at-most {s}: expected a share of subjects from 0 to 1 (0.001) or a percentage (0.1%)"
        )),
    }
}

/// The rates tried, each exact in decimal (`0.3`, not `0.30000000000000004`).
fn ladder(per: Duration) -> Vec<f64> {
    let per_us = per.as_secs_f64() * 1e6;
    DECADES
        .flat_map(|e| MANTISSAS.map(|m| format!("{m}e{e}").parse::<f64>().unwrap_or(1.0)))
        // The config refuses a bucket refilling faster than 1 token per µs.
        .filter(|r| per_us / r >= 1.0)
        .collect()
}

/// p50, p90, p99, p99.9 and the largest of a set, by nearest rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) p50: u64,
    pub(crate) p90: u64,
    pub(crate) p99: u64,
    #[serde(rename = "p99.9")]
    pub(crate) p99_9: u64,
    pub(crate) max: u64,
}

pub(crate) fn percentiles(values: &mut [u64]) -> Option<Percentiles> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let n = values.len();
    let at = |q: f64| values[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
    Some(Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        p99_9: at(0.999),
        max: values[n - 1],
    })
}

/// The smallest limit that leaves at most `allowed` of `needs` above it,
/// and at least `floor`: the `(allowed+1)`-th largest need.
pub(crate) fn smallest_limit(needs: &mut [u64], allowed: usize, floor: u64) -> u64 {
    if allowed >= needs.len() {
        return floor;
    }
    let at = needs.len() - 1 - allowed;
    let (_, nth, _) = needs.select_nth_unstable(at);
    (*nth).max(floor)
}

/// Subjects a share allows to be refused: `floor(share x subjects)`.
pub(crate) fn allowed_refusals(share: f64, subjects: usize) -> usize {
    (share * subjects as f64 + 1e-9).floor() as usize
}

/// One subject's state for a rate rule.
struct RateSubject {
    steps: [u32; STEPS as usize],
    step: u64,
    peak: u32,
    /// Per ladder rate: the unlimited bucket's TAT (µs) and the deepest
    /// it got (in tokens).
    tats: Box<[(u64, u64)]>,
}

/// One subject's state for a quota rule.
#[derive(Default)]
struct QuotaSubject {
    start: u64,
    count: u64,
    units: u64,
    peak: u64,
    peak_units: u64,
}

enum Tracker {
    Rate {
        per: Duration,
        step_us: u64,
        cost: u64,
        rates: Vec<(f64, u64)>,
        subjects: IdMap<RateSubject>,
    },
    Quota {
        period: Period,
        cost: u64,
        subjects: IdMap<QuotaSubject>,
    },
    None,
}

/// The limits proposed for one rule.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(crate) enum Proposal {
    Rate {
        rate: f64,
        #[serde(serialize_with = "humantime_ser")]
        per: Duration,
        burst: u64,
    },
    Quota {
        quota: u64,
        period: &'static str,
    },
}

fn humantime_ser<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// What `--suggest` says of one rule.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Suggestion {
    pub(crate) rule: String,
    pub(crate) subjects: usize,
    /// What the percentiles measure: requests per `per`, or per period.
    pub(crate) unit: String,
    pub(crate) peaks: Option<Percentiles>,
    pub(crate) proposal: Option<Proposal>,
    /// Subjects the proposal would have refused (at most the share asked).
    pub(crate) refused_subjects: usize,
    /// Why there is no proposal, when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) note: Option<String>,
}

/// Every rule's tracker, by the tally's rule index.
pub(crate) struct Suggest {
    trackers: Vec<Tracker>,
}

impl Suggest {
    /// Trackers for `rules`, each with its `per` (a rate rule's window).
    pub(crate) fn new<'a>(rules: impl Iterator<Item = (&'a Rule, Option<Duration>)>) -> Suggest {
        let trackers = rules
            .map(|(rule, per)| match (rule.limit, per) {
                (Limit::Rate(b), Some(per)) => {
                    let rates = ladder(per)
                        .into_iter()
                        .map(|r| (r, BucketSpec::new(r, per, 1, b.cost).interval_us))
                        .collect();
                    Tracker::Rate {
                        per,
                        step_us: (per.as_micros() as u64 / STEPS).max(1),
                        cost: u64::from(b.cost),
                        rates,
                        subjects: IdMap::default(),
                    }
                }
                (Limit::Quota(q), _) => Tracker::Quota {
                    period: q.period,
                    cost: u64::from(q.cost),
                    subjects: IdMap::default(),
                },
                _ => Tracker::None,
            })
            .collect();
        Suggest { trackers }
    }

    /// A request of `subject` matched rule `rule` at `now_us`.
    pub(crate) fn observe(&mut self, rule: usize, subject: u32, now_us: u64) {
        match self.trackers.get_mut(rule) {
            Some(Tracker::Rate {
                step_us,
                cost,
                rates,
                subjects,
                ..
            }) => {
                let s = subjects.entry(subject).or_insert_with(|| RateSubject {
                    steps: [0; STEPS as usize],
                    step: now_us / *step_us,
                    peak: 0,
                    tats: vec![(0, 0); rates.len()].into_boxed_slice(),
                });
                let step = now_us / *step_us;
                if step > s.step {
                    for k in (s.step + 1)..=step.min(s.step + STEPS) {
                        s.steps[(k % STEPS) as usize] = 0;
                    }
                    s.step = step;
                }
                let slot = &mut s.steps[(s.step % STEPS) as usize];
                *slot = slot.saturating_add(1);
                s.peak = s
                    .peak
                    .max(s.steps.iter().fold(0u32, |a, c| a.saturating_add(*c)));
                for ((_, interval), (tat, need)) in rates.iter().zip(s.tats.iter_mut()) {
                    // The stores' own steps: tat = max(tat, now) + cost x T,
                    // passing while tat - now <= burst x T.
                    *tat = (*tat)
                        .max(now_us)
                        .saturating_add(cost.saturating_mul(*interval));
                    *need = (*need).max((*tat - now_us).div_ceil(*interval));
                }
            }
            Some(Tracker::Quota {
                period,
                cost,
                subjects,
            }) => {
                let s = subjects.entry(subject).or_default();
                let (start, _) = period.bounds(now_us / 1_000_000);
                if start != s.start {
                    (s.start, s.count, s.units) = (start, 0, 0);
                }
                s.count += 1;
                s.units += *cost;
                s.peak = s.peak.max(s.count);
                s.peak_units = s.peak_units.max(s.units);
            }
            _ => {}
        }
    }

    /// The suggestion for rule `rule` named `name`, refusing at most
    /// `share` of its subjects.
    pub(crate) fn suggest(&self, rule: usize, name: &str, share: f64) -> Suggestion {
        let mut out = Suggestion {
            rule: name.to_string(),
            subjects: 0,
            unit: String::new(),
            peaks: None,
            proposal: None,
            refused_subjects: 0,
            note: None,
        };
        match self.trackers.get(rule) {
            Some(Tracker::Rate {
                per,
                cost,
                rates,
                subjects,
                ..
            }) => {
                out.subjects = subjects.len();
                out.unit = format!("requests per {}", humantime::format_duration(*per));
                let mut peaks: Vec<u64> = subjects.values().map(|s| u64::from(s.peak)).collect();
                out.peaks = percentiles(&mut peaks);
                let allowed = allowed_refusals(share, subjects.len());
                let mut best: Option<(f64, u64, u64, usize)> = None;
                let mut needs: Vec<u64> = Vec::with_capacity(subjects.len());
                for (i, (rate, interval)) in rates.iter().enumerate() {
                    needs.clear();
                    needs.extend(subjects.values().map(|s| s.tats[i].1));
                    let burst = smallest_limit(&mut needs, allowed, (*cost).max(1));
                    if burst > u64::from(u32::MAX) || (burst * interval) as f64 > MAX_CAPACITY_US {
                        continue;
                    }
                    let score = rate + burst as f64;
                    if best.is_none_or(|(r, b, _, _)| score < r + b as f64) {
                        let refused = needs.iter().filter(|n| **n > burst).count();
                        best = Some((*rate, burst, *interval, refused));
                    }
                }
                match best {
                    Some((rate, burst, _, refused)) if !subjects.is_empty() => {
                        out.proposal = Some(Proposal::Rate {
                            rate,
                            per: *per,
                            burst,
                        });
                        out.refused_subjects = refused;
                    }
                    _ => out.note = Some("no requests matched it".into()),
                }
            }
            Some(Tracker::Quota {
                period,
                cost,
                subjects,
            }) => {
                out.subjects = subjects.len();
                out.unit = format!("requests per {}", period.name());
                let mut peaks: Vec<u64> = subjects.values().map(|s| s.peak).collect();
                out.peaks = percentiles(&mut peaks);
                if subjects.is_empty() {
                    out.note = Some("no requests matched it".into());
                    return out;
                }
                let allowed = allowed_refusals(share, subjects.len());
                let mut units: Vec<u64> = subjects.values().map(|s| s.peak_units).collect();
                let quota = smallest_limit(&mut units, allowed, (*cost).max(1));
                out.refused_subjects = units.iter().filter(|u| **u > quota).count();
                out.proposal = Some(Proposal::Quota {
                    quota,
                    period: period.name(),
                });
            }
            _ => {
                out.note = Some(
                    "a concurrency cap: no suggestion (it depends on durations, not rates)".into(),
                )
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_fractions_or_percentages() {
        assert_eq!(parse_share("0.1%"), Ok(0.001));
        assert_eq!(parse_share("0.001"), Ok(0.001));
        assert_eq!(parse_share("0"), Ok(0.0));
        assert_eq!(parse_share("100%"), Ok(1.0));
        for bad in ["", "x", "-1%", "101%", "2", "NaN"] {
            assert!(parse_share(bad).is_err(), "{bad}");
        }
        assert_eq!(allowed_refusals(0.001, 999), 0);
        assert_eq!(allowed_refusals(0.001, 1000), 1);
        assert_eq!(allowed_refusals(0.1, 30), 3);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u64> = (1..=1000).rev().collect();
        let p = percentiles(&mut v).expect("values");
        assert_eq!(
            (p.p50, p.p90, p.p99, p.p99_9, p.max),
            (500, 900, 990, 999, 1000)
        );
        assert_eq!(percentiles(&mut [7]).map(|p| (p.p50, p.max)), Some((7, 7)));
        assert_eq!(percentiles(&mut []), None);
    }

    #[test]
    fn the_smallest_limit_leaves_the_allowed_number_above_it() {
        let mut needs = vec![5, 1, 9, 3, 7];
        assert_eq!(smallest_limit(&mut needs, 0, 1), 9);
        assert_eq!(smallest_limit(&mut needs, 1, 1), 7);
        assert_eq!(smallest_limit(&mut needs, 2, 1), 5);
        assert_eq!(smallest_limit(&mut needs, 5, 2), 2);
        assert_eq!(
            smallest_limit(&mut [1, 1], 0, 3),
            3,
            "never below the floor"
        );
    }

    #[test]
    fn the_ladder_is_round_and_within_the_configs_bounds() {
        let l = ladder(Duration::from_secs(1));
        assert_eq!(&l[..6], &[0.1, 0.2, 0.3, 0.5, 1.0, 2.0]);
        assert_eq!(l.last(), Some(&500_000.0));
        assert_eq!(l[2].to_string(), "0.3");
        // 1 ms: at most one token per µs.
        assert_eq!(ladder(Duration::from_millis(1)).last(), Some(&1000.0));
    }

    fn bucket_rule() -> crate::rules::RuleSet {
        let text = "[upstream]\nurls = [\"http://127.0.0.1:1\"]\n[[rules]]\nname = \"r\"\nkey = \"ip\"\nrate = 1\nper = \"1s\"\nburst = 1\n";
        let config = crate::config::Config::parse(text, "t.toml").expect("a valid config");
        crate::rules::RuleSet::compile(&config.rules)
    }

    #[test]
    fn the_proposal_is_the_smallest_rate_plus_burst_within_the_share() {
        let rules = bucket_rule();
        let rule = &rules.rules()[0];
        let mut s = Suggest::new(std::iter::once((rule, Some(Duration::from_secs(1)))));
        let t0 = 1_777_636_800_000_000;
        // Subject 0: ten requests at once. Subject 1: one a second for 20 s.
        for _ in 0..10 {
            s.observe(0, 0, t0);
        }
        for k in 0..20 {
            s.observe(0, 1, t0 + k * 1_000_000);
        }
        // Nobody refused: 1 per second absorbs subject 1, a burst of 10
        // subject 0 (score 11; 0.5 per second would need a burst of 11).
        let none = s.suggest(0, "r", 0.0);
        assert!(
            matches!(none.proposal, Some(Proposal::Rate { rate, burst: 10, .. }) if rate == 1.0),
            "{none:?}"
        );
        assert_eq!(none.refused_subjects, 0);
        let peaks = none.peaks.expect("peaks");
        assert_eq!((peaks.p50, peaks.max), (1, 10));
        // One of two may be refused: 1 per second with a burst of 1 refuses
        // only the burst of subject 0 (score 2; 0.1 per second with a burst
        // of 10, refusing subject 1 instead, scores 10.1).
        let half = s.suggest(0, "r", 0.5);
        assert!(
            matches!(half.proposal, Some(Proposal::Rate { rate, burst: 1, .. }) if rate == 1.0),
            "{half:?}"
        );
        assert_eq!(half.refused_subjects, 1);
    }
}
