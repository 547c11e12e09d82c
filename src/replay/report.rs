//! What the replay prints: one [`Report`], as tables for people or as JSON
//! for scripts (`--json`). Subjects are printed as the stores name them
//! (`ip:203.0.113.7`, `consumer:<sha256>`, `hdr:x-api-key:<sha256>`): a key
//! header is never known by more than its hash.

use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use super::input::InputStats;
use super::suggest::{Proposal, Suggestion};
use super::tally::{top, Tally, Totals};
use crate::cli::render::{pairs, printable, table};

/// One subject and a count.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Count {
    pub(crate) subject: String,
    pub(crate) count: u64,
}

/// One rule's outcome.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RuleReport {
    pub(crate) rule: String,
    pub(crate) plan: Option<String>,
    pub(crate) matched: u64,
    pub(crate) subjects: usize,
    pub(crate) refused: u64,
    pub(crate) refused_subjects: usize,
    /// `refused_subjects / subjects` (0 when it matched nothing).
    pub(crate) refused_share: f64,
    pub(crate) bans: u64,
    pub(crate) top_refused: Vec<Count>,
}

/// A subject that was banned.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BanReport {
    pub(crate) subject: String,
    pub(crate) bans: u32,
    pub(crate) strikes: u32,
    pub(crate) longest_ms: u64,
    pub(crate) first_at: String,
}

/// Bans made over the whole replay.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BansReport {
    pub(crate) made: u64,
    pub(crate) subjects: usize,
    pub(crate) top: Vec<BanReport>,
}

/// Everything the replay says.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) logs: Vec<String>,
    /// What the logs lacked that the candidate reads.
    pub(crate) warnings: Vec<String>,
    pub(crate) input: InputStats,
    pub(crate) from: Option<String>,
    pub(crate) to: Option<String>,
    pub(crate) elapsed_s: f64,
    pub(crate) lines_per_s: f64,
    pub(crate) subjects: usize,
    pub(crate) totals: Totals,
    pub(crate) rules: Vec<RuleReport>,
    pub(crate) bans: BansReport,
    /// With `--suggest`: the share of subjects a proposal may refuse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) refuse_at_most: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) suggestions: Vec<Suggestion>,
}

/// A share as a percentage with the digits it needs (`0.012%`, `25%`).
fn percent(share: f64) -> String {
    let p = share * 100.0;
    if p == 0.0 || p >= 10.0 {
        format!("{p:.0}%")
    } else if p >= 1.0 {
        format!("{p:.1}%")
    } else {
        format!("{p:.3}%")
    }
}

fn rfc3339_ms(us: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_micros(us)).to_string()
}

impl Report {
    /// Gathers the counts; `n` subjects at most in each top list.
    pub(crate) fn new(
        logs: Vec<String>,
        input: InputStats,
        tally: &Tally,
        elapsed: Duration,
        n: usize,
    ) -> Report {
        let rules = tally
            .rules
            .iter()
            .map(|r| RuleReport {
                rule: r.name.to_string(),
                plan: r.plan.as_ref().map(|p| p.to_string()),
                matched: r.matched,
                subjects: r.subjects.len(),
                refused: r.refused,
                refused_subjects: r.refused_by_subject.len(),
                refused_share: if r.subjects.is_empty() {
                    0.0
                } else {
                    r.refused_by_subject.len() as f64 / r.subjects.len() as f64
                },
                bans: r.bans,
                top_refused: top(
                    r.refused_by_subject.iter().map(|(s, c)| (*s, *c)),
                    &tally.subjects,
                    n,
                )
                .into_iter()
                .map(|(subject, count)| Count {
                    subject: subject.to_string(),
                    count,
                })
                .collect(),
            })
            .collect();
        let mut banned: Vec<(&u32, &super::tally::SubjectBans)> = tally.bans.iter().collect();
        banned.sort_by(|a, b| {
            (b.1.bans, b.1.longest_ms)
                .cmp(&(a.1.bans, a.1.longest_ms))
                .then_with(|| tally.subjects.tag(*a.0).cmp(tally.subjects.tag(*b.0)))
        });
        let bans = BansReport {
            made: tally.bans.values().map(|b| u64::from(b.bans)).sum(),
            subjects: tally.bans.len(),
            top: banned
                .into_iter()
                .take(n)
                .map(|(s, b)| BanReport {
                    subject: tally.subjects.tag(*s).to_string(),
                    bans: b.bans,
                    strikes: b.strikes,
                    longest_ms: b.longest_ms,
                    first_at: rfc3339_ms(b.first_at_us),
                })
                .collect(),
        };
        let secs = elapsed.as_secs_f64();
        Report {
            logs,
            warnings: Vec::new(),
            from: input.first_us.map(rfc3339_ms),
            to: input.last_us.map(rfc3339_ms),
            elapsed_s: (secs * 1000.0).round() / 1000.0,
            lines_per_s: if secs > 0.0 {
                (input.lines as f64 / secs).round()
            } else {
                0.0
            },
            input,
            subjects: tally.subjects.len(),
            totals: tally.totals,
            rules,
            bans,
            refuse_at_most: None,
            suggestions: Vec::new(),
        }
    }

    /// The report for people.
    pub(crate) fn human(&self) -> String {
        let mut out = Vec::new();
        let i = &self.input;
        let t = &self.totals;
        out.push(format!(
            "replayed {} requests of {} lines from {} in {:.1} s ({} lines/s), {} to {}",
            t.requests,
            i.lines,
            printable(&self.logs.join(", ")),
            self.elapsed_s,
            self.lines_per_s,
            self.from.as_deref().unwrap_or("-"),
            self.to.as_deref().unwrap_or("-"),
        ));
        out.push(pairs(vec![
            (
                "allowed",
                format!("{} ({} matched no rule)", t.allowed, t.unmatched),
            ),
            ("limited", t.limited.to_string()),
            ("banned", t.banned.to_string()),
            ("allowlisted", t.allowlisted.to_string()),
            ("bad request", t.bad_request.to_string()),
            ("unknown key", t.unknown_key.to_string()),
            ("subjects", self.subjects.to_string()),
            (
                "skipped lines",
                format!(
                    "{} malformed, {} blank, {} recorded as rejected",
                    i.malformed, i.blank, i.rejected
                ),
            ),
            (
                "late lines",
                format!(
                    "{} (decided at the time before them; the latest {} ms late)",
                    i.late, i.latest_by_ms
                ),
            ),
        ]));
        for m in &i.first_malformed {
            out.push(printable(&format!(
                "malformed: {}:{}: {}",
                m.file, m.line, m.error
            )));
        }
        for e in &i.read_errors {
            out.push(printable(&format!("read error: {e}")));
        }
        for w in &self.warnings {
            out.push(printable(&format!("warning: {w}")));
        }
        out.push(String::new());
        out.push(table(
            &[
                "RULE",
                "PLAN",
                "MATCHED",
                "SUBJECTS",
                "REFUSED",
                "REFUSED SUBJECTS",
                "BANS",
            ],
            self.rules
                .iter()
                .map(|r| {
                    vec![
                        r.rule.clone(),
                        r.plan.clone().unwrap_or_else(|| "-".into()),
                        r.matched.to_string(),
                        r.subjects.to_string(),
                        r.refused.to_string(),
                        format!("{} ({})", r.refused_subjects, percent(r.refused_share)),
                        r.bans.to_string(),
                    ]
                })
                .collect(),
        ));
        for r in self.rules.iter().filter(|r| !r.top_refused.is_empty()) {
            out.push(String::new());
            out.push(format!("most refused by {}:", printable(&r.rule)));
            out.push(table(
                &["SUBJECT", "REFUSED"],
                r.top_refused
                    .iter()
                    .map(|c| vec![c.subject.clone(), c.count.to_string()])
                    .collect(),
            ));
        }
        out.push(String::new());
        out.push(format!(
            "bans: {} made on {} subjects",
            self.bans.made, self.bans.subjects
        ));
        if !self.bans.top.is_empty() {
            out.push(table(
                &["SUBJECT", "BANS", "STRIKES", "LONGEST", "FIRST"],
                self.bans
                    .top
                    .iter()
                    .map(|b| {
                        vec![
                            b.subject.clone(),
                            b.bans.to_string(),
                            b.strikes.to_string(),
                            humantime::format_duration(Duration::from_millis(b.longest_ms))
                                .to_string(),
                            b.first_at.clone(),
                        ]
                    })
                    .collect(),
            ));
        }
        if let Some(share) = self.refuse_at_most {
            out.push(String::new());
            out.push(self.suggestions_human(share));
        }
        let mut text = out.join("\n");
        text.push('\n');
        text
    }

    fn suggestions_human(&self, share: f64) -> String {
        let mut rows = Vec::new();
        for s in &self.suggestions {
            let p = |f: fn(&super::suggest::Percentiles) -> u64| {
                s.peaks.as_ref().map_or("-".into(), |p| f(p).to_string())
            };
            let proposal = match &s.proposal {
                Some(Proposal::Rate { rate, per, burst }) => format!(
                    "rate = {rate}, per = \"{}\", burst = {burst}",
                    humantime::format_duration(*per)
                ),
                Some(Proposal::Quota { quota, period }) => {
                    format!("quota = {quota}, period = \"{period}\"")
                }
                None => s.note.clone().unwrap_or_default(),
            };
            rows.push(vec![
                s.rule.clone(),
                s.unit.trim_start_matches("requests per ").to_string(),
                s.subjects.to_string(),
                p(|p| p.p50),
                p(|p| p.p90),
                p(|p| p.p99),
                p(|p| p.p99_9),
                p(|p| p.max),
                proposal,
                if s.proposal.is_some() {
                    s.refused_subjects.to_string()
                } else {
                    "-".into()
                },
            ]);
        }
        format!(
            "suggested limits, refusing at most {} of each rule's subjects\n(P50..MAX: each subject's most requests in one WINDOW, over its subjects):\n{}",
            percent(share),
            table(
                &[
                    "RULE", "WINDOW", "SUBJECTS", "P50", "P90", "P99", "P99.9", "MAX", "SUGGESTED",
                    "REFUSES",
                ],
                rows,
            )
        )
    }
}
