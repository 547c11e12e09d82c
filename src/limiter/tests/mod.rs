//! The limiter's own logic, in process, against a scripted shared store:
//! the order of subjects, all-or-nothing across subjects by refunds, the
//! violations that escalate to a ban, the choice of store when a call
//! fails, and the deny cache. The scripted store decides with a real
//! [`LocalStore`] (the same math as `decide.lua`, which the differential
//! test holds to the script), records every call, and fails on demand.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::client_ip::ClientKey;
use crate::config::Config;
use crate::rules::RuleSet;

/// One call the limiter made on the shared store.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    tag: String,
    /// `d`, `p`, or `r:<rule>`.
    mode: String,
    rules: Vec<String>,
    bannable: bool,
}

/// A shared store that decides with an in-process store, records each call
/// and fails the next `fail` calls.
struct Scripted {
    truth: LocalStore,
    seen: RefCell<Vec<Seen>>,
    /// Fail this many of the next calls.
    fail: Cell<u32>,
    /// Fail every call on this subject.
    fail_on: RefCell<Option<String>>,
    /// How long a refund is on its way before it lands.
    slow_refunds: Cell<Duration>,
}

impl Scripted {
    fn calls(&self) -> Vec<Seen> {
        self.seen.borrow().clone()
    }
}

impl DecisionStore for Scripted {
    async fn decide(&self, call: &SubjectCall<'_>) -> Result<SubjectReply, RedisFailure> {
        self.seen.borrow_mut().push(Seen {
            tag: call.tag.to_string(),
            mode: match call.mode {
                Mode::Decide => "d".into(),
                Mode::Peek => "p".into(),
                Mode::TopUp => "t".into(),
                Mode::Settle => "s".into(),
                Mode::Refund { rule } => format!("r:{rule}"),
            },
            rules: call.rules.iter().map(|r| r.name.to_string()).collect(),
            bannable: call.bannable,
        });
        let failing_tag = self.fail_on.borrow().as_deref() == Some(call.tag);
        if self.fail.get() > 0 || failing_tag {
            self.fail.set(self.fail.get().saturating_sub(1));
            return Err(RedisFailure::Timeout(Duration::from_millis(50)));
        }
        if matches!(call.mode, Mode::Refund { .. }) && !self.slow_refunds.get().is_zero() {
            tokio::time::sleep(self.slow_refunds.get()).await;
        }
        Ok(self.truth.decide(call))
    }

    async fn leases(&self, call: &LeaseCall<'_>) -> Result<u32, RedisFailure> {
        Ok(self.truth.leases(call))
    }
}

impl SharedStore for Scripted {
    fn call_timeout(&self) -> Duration {
        Duration::from_millis(50)
    }

    async fn ping(&self) -> Result<(), RedisFailure> {
        Ok(())
    }

    fn set_ban_params(&self, ban: BanParams) {
        self.truth.set_ban_params(ban);
    }
}

/// The rules of `rules_toml` (with a `[ban]` section if given), a limiter
/// over a scripted store, and a runtime to drive it.
struct Bench {
    rules: RuleSet,
    limiter: Limiter<Scripted>,
    rt: tokio::runtime::Runtime,
}

fn bench(rules_toml: &str, on_failure: OnFailure, breaker_failures: u32) -> Bench {
    bench_with_leases(rules_toml, on_failure, breaker_failures, Duration::ZERO)
}

fn bench_with_leases(
    rules_toml: &str,
    on_failure: OnFailure,
    breaker_failures: u32,
    lease: Duration,
) -> Bench {
    let text = format!("[upstream]\nurls = [\"http://127.0.0.1:1\"]\n{rules_toml}");
    let config = Config::parse(&text, "limiter-test").expect("a valid config");
    let rules = RuleSet::compile(&config.rules);
    let params = BanParams::from_config(&config.ban);
    let scripted = Scripted {
        truth: LocalStore::new(params, 10_000, false),
        seen: RefCell::new(Vec::new()),
        fail: Cell::new(0),
        fail_on: RefCell::new(None),
        slow_refunds: Cell::new(Duration::ZERO),
    };
    let limiter = Limiter::new(
        Some(scripted),
        Arc::new(LocalStore::new(params, 10_000, false)),
        Arc::new(Breakers::new(
            breaker_failures,
            false,
            metrics::gauge!("limiter_test_degraded"),
        )),
        LimiterSettings {
            on_failure,
            max_decisions_per_second: 0,
            lease,
        },
        params,
        GatewayMetrics::resolve(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    Bench { rules, limiter, rt }
}

impl Bench {
    fn shared(&self) -> &Scripted {
        self.limiter.shared.as_ref().expect("a shared store")
    }

    /// Decides one request from `ip` to `path` (with headers), and reduces
    /// the decision to what the tests compare.
    fn request(&self, ip: &str, path: &str, headers: &[(&str, &str)]) -> Outcome {
        self.request_during(ip, path, headers, async {})
    }

    /// [`Bench::request`] with `first` polled first and run alongside.
    fn request_during(
        &self,
        ip: &str,
        path: &str,
        headers: &[(&str, &str)],
        first: impl std::future::Future<Output = ()>,
    ) -> Outcome {
        let mut req = actix_web::test::TestRequest::get().uri(path);
        for (n, v) in headers {
            req = req.insert_header((*n, *v));
        }
        let req = req.to_http_request();
        let key = ClientKey::new(ip.parse().expect("an address"), 64);
        let groups = self.rules.groups(&req, key).expect("rules that match");
        let (_, decision) = self
            .rt
            .block_on(async { tokio::join!(first, self.limiter.decide(&groups)) });
        match decision {
            Decision::Allowed { applied, .. } => Outcome::Allowed(
                applied
                    .iter()
                    .map(|a| (a.rule.name.to_string(), a.remaining))
                    .collect(),
            ),
            Decision::Limited { violated, .. } => {
                Outcome::Limited(violated[0].rule.name.to_string())
            }
            Decision::Banned { made, remaining_ms } => Outcome::Banned {
                made: made.map(|m| (m.strikes, m.dur_ms, m.by_redis)),
                remaining_ms,
            },
            Decision::Unavailable => Outcome::Unavailable,
        }
    }

    /// Tokens left in `rule`'s bucket of `tag`, read from the shared
    /// store's truth without charging.
    fn tokens(&self, tag: &str, rule: &str) -> u64 {
        let rule = self.rules.by_name(rule).expect("a rule");
        let call = SubjectCall {
            tag,
            rules: &[rule],
            ttl_ms: rule.subject_ttl_ms,
            bannable: false,
            mode: Mode::Peek,
            now_us: None,
            lease: "",
            count: 1,
            costs: &[],
        };
        let reply = self.shared().truth.decide(&call);
        rate_info(rule, &reply.buckets[0]).remaining
    }
}

#[derive(Debug, PartialEq)]
enum Outcome {
    /// Each applied rule's name and tokens left.
    Allowed(Vec<(String, u64)>),
    /// The refusing rule.
    Limited(String),
    Banned {
        /// (strikes, duration ms, made by the shared store) of a ban this
        /// request made.
        made: Option<(u32, u64, bool)>,
        remaining_ms: u64,
    },
    Unavailable,
}

const IP_AND_GLOBAL: &str = r#"
[[rules]]
name = "per-ip"
key = "ip"
rate = 1
per = "1h"
burst = 5

[[rules]]
name = "everyone"
key = "global"
rate = 1
per = "1h"
burst = 2

[ban]
enabled = false
"#;

#[test]
fn a_refusal_by_a_later_subject_gives_the_earlier_ones_their_tokens_back() {
    let b = bench(IP_AND_GLOBAL, OnFailure::Local, 3);
    for _ in 0..2 {
        assert!(matches!(
            b.request("198.51.100.1", "/", &[]),
            Outcome::Allowed(_)
        ));
    }
    assert_eq!(b.tokens("ip:198.51.100.1", "per-ip"), 3);
    // The global bucket is empty: the IP subject is charged, then refunded.
    for _ in 0..3 {
        assert_eq!(
            b.request("198.51.100.1", "/", &[]),
            Outcome::Limited("everyone".into())
        );
    }
    assert_eq!(
        b.tokens("ip:198.51.100.1", "per-ip"),
        3,
        "a refused request must leave no token charged"
    );
    let calls = b.shared().calls();
    let last: Vec<&Seen> = calls.iter().rev().take(3).collect();
    assert_eq!(
        *last[0],
        Seen {
            tag: "ip:198.51.100.1".into(),
            mode: "r:".into(),
            rules: vec!["per-ip".into()],
            bannable: false,
        },
        "the IP subject is refunded, with no violation (a full global bucket is not its offence)"
    );
    assert_eq!(last[1].tag, "global");
    assert_eq!(last[2].tag, "ip:198.51.100.1");
}

#[test]
fn the_clients_own_subject_is_decided_first_and_a_refusal_there_asks_nothing_else() {
    let b = bench(
        &IP_AND_GLOBAL.replace("burst = 2", "burst = 100"),
        OnFailure::Local,
        3,
    );
    for _ in 0..5 {
        assert!(matches!(
            b.request("198.51.100.2", "/", &[]),
            Outcome::Allowed(_)
        ));
    }
    let before = b.shared().calls().len();
    assert_eq!(
        b.request("198.51.100.2", "/", &[]),
        Outcome::Limited("per-ip".into())
    );
    let calls = b.shared().calls();
    assert_eq!(calls.len(), before + 1, "one call, on the IP subject only");
    assert_eq!(calls[before].tag, "ip:198.51.100.2");
    assert!(calls[before].bannable);
}

const ONE_SUBJECT_TWO_RULES: &str = r#"
[[rules]]
name = "wide"
key = "ip"
rate = 1
per = "1h"
burst = 10

[[rules]]
name = "narrow"
key = "ip"
rate = 1
per = "1h"
burst = 1
match = { path_prefix = "/narrow" }

[ban]
enabled = false
"#;

#[test]
fn a_subjects_rules_are_charged_all_or_nothing() {
    let b = bench(ONE_SUBJECT_TWO_RULES, OnFailure::Local, 3);
    assert!(matches!(
        b.request("198.51.100.3", "/narrow", &[]),
        Outcome::Allowed(_)
    ));
    assert_eq!(b.tokens("ip:198.51.100.3", "wide"), 9);
    assert_eq!(
        b.request("198.51.100.3", "/narrow", &[]),
        Outcome::Limited("narrow".into())
    );
    assert_eq!(
        b.tokens("ip:198.51.100.3", "wide"),
        9,
        "the rule that passed is not charged when its sibling refuses"
    );
    match b.request("198.51.100.3", "/other", &[]) {
        Outcome::Allowed(applied) => assert_eq!(applied, vec![("wide".to_string(), 8)]),
        other => panic!("expected allowed, got {other:?}"),
    }
}

const BANS: &str = r#"
[[rules]]
name = "per-ip"
key = "ip"
rate = 1
per = "1h"
burst = 1

[ban]
after = 3
within = "10s"
duration = "150ms"
factor = 2.0
max_duration = "1s"
memory = "1h"
"#;

#[test]
fn refusals_of_the_clients_own_rules_escalate_to_longer_bans() {
    let b = bench(BANS, OnFailure::Local, 3);
    assert!(matches!(
        b.request("198.51.100.4", "/", &[]),
        Outcome::Allowed(_)
    ));
    for _ in 0..2 {
        assert_eq!(
            b.request("198.51.100.4", "/", &[]),
            Outcome::Limited("per-ip".into())
        );
    }
    assert_eq!(
        b.request("198.51.100.4", "/", &[]),
        Outcome::Banned {
            made: Some((1, 150, true)),
            remaining_ms: 150,
        },
        "the third violation bans, by the shared store"
    );
    match b.request("198.51.100.4", "/", &[]) {
        Outcome::Banned { made: None, .. } => {}
        other => panic!("a banned client is told so, no new ban: {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..2 {
        assert_eq!(
            b.request("198.51.100.4", "/", &[]),
            Outcome::Limited("per-ip".into())
        );
    }
    assert_eq!(
        b.request("198.51.100.4", "/", &[]),
        Outcome::Banned {
            made: Some((2, 300, true)),
            remaining_ms: 300,
        },
        "the second ban lasts factor times longer"
    );
}

#[test]
fn refusals_are_never_cached_while_they_count_towards_a_ban() {
    let b = bench(BANS, OnFailure::Local, 3);
    b.request("198.51.100.5", "/", &[]);
    let before = b.shared().calls().len();
    b.request("198.51.100.5", "/", &[]);
    b.request("198.51.100.5", "/", &[]);
    assert_eq!(
        b.shared().calls().len(),
        before + 2,
        "each refusal of a bannable subject reaches the store"
    );
}

#[test]
fn a_known_refusal_is_repeated_from_memory_with_no_store_call() {
    let b = bench(IP_AND_GLOBAL, OnFailure::Local, 3);
    for _ in 0..5 {
        b.request("198.51.100.6", "/", &[("x", "y")]);
        b.request("198.51.100.7", "/", &[]);
    }
    // Both buckets are spent; the bans are off, so the refusal is cached.
    assert!(matches!(
        b.request("198.51.100.8", "/", &[]),
        Outcome::Limited(_)
    ));
    let before = b.shared().calls().len();
    assert_eq!(
        b.request("198.51.100.8", "/", &[]),
        Outcome::Limited("everyone".into())
    );
    assert!(
        b.shared().calls().len() <= before + 2,
        "the global refusal comes from the deny cache"
    );
    let global_calls = b.shared().calls()[before..]
        .iter()
        .filter(|c| c.tag == "global")
        .count();
    assert_eq!(global_calls, 0, "no call on the refused subject");
}

#[test]
fn a_failed_call_sends_only_that_request_to_on_failure() {
    let b = bench(IP_AND_GLOBAL, OnFailure::Local, 2);
    b.shared().fail.set(1);
    assert!(matches!(
        b.request("198.51.100.9", "/", &[]),
        Outcome::Allowed(_)
    ));
    assert_eq!(
        b.limiter.local.len(),
        1,
        "the failed subject was decided by this node's store"
    );
    assert!(!b.limiter.is_degraded(), "one failure opens no breaker");
    let before = b.shared().calls().len();
    assert!(matches!(
        b.request("198.51.100.9", "/", &[]),
        Outcome::Allowed(_)
    ));
    assert_eq!(
        b.shared().calls().len(),
        before + 2,
        "the next request goes to the shared store again"
    );
    b.shared().fail.set(2);
    b.request("198.51.100.10", "/", &[]);
    b.request("198.51.100.10", "/", &[]);
    assert!(b.limiter.is_degraded(), "two failures in a row open it");
    let before = b.shared().calls().len();
    b.request("198.51.100.11", "/", &[]);
    assert_eq!(
        b.shared().calls().len(),
        before,
        "an open breaker sends nothing to the shared store"
    );
}

#[test]
fn deny_on_failure_refunds_what_earlier_subjects_were_charged() {
    let b = bench(IP_AND_GLOBAL, OnFailure::Deny, 5);
    assert!(matches!(
        b.request("198.51.100.12", "/", &[]),
        Outcome::Allowed(_)
    ));
    assert_eq!(b.tokens("ip:198.51.100.12", "per-ip"), 4);
    // The IP subject passes on the shared store; the global one's call
    // fails: the request is refused, and the IP subject gets its token back.
    *b.shared().fail_on.borrow_mut() = Some("global".into());
    assert_eq!(b.request("198.51.100.12", "/", &[]), Outcome::Unavailable);
    assert_eq!(
        b.tokens("ip:198.51.100.12", "per-ip"),
        4,
        "the token the IP subject was charged came back"
    );
    let calls = b.shared().calls();
    let refund = calls.last().expect("calls");
    assert_eq!(
        (refund.tag.as_str(), refund.mode.as_str()),
        ("ip:198.51.100.12", "r:")
    );
}

mod leases;
