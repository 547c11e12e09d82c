//! Leased tokens in process: admissions from a lease never past what the
//! shared store charged, every token used near the limit, and leases that
//! end (by time, refusal, unban or reload) giving back what they held.

use std::time::Duration;

use super::*;

const HOT: &str = r#"
[[rules]]
name = "per-ip"
key = "ip"
rate = 1
per = "1h"
burst = 1000

[ban]
enabled = false
"#;

impl Bench {
    /// Another node takes `n` requests' worth of `rule` of `tag`.
    fn drain(&self, tag: &str, rule: &str, n: u64) {
        let rule = self.rules.by_name(rule).expect("a rule");
        for _ in 0..n {
            let call = SubjectCall {
                tag,
                rules: &[rule],
                ttl_ms: rule.subject_ttl_ms,
                bannable: true,
                mode: Mode::Decide,
                now_us: None,
                lease: "",
                count: 1,
                costs: &[],
            };
            self.shared().truth.decide(&call);
        }
        assert_eq!(self.tokens(tag, &rule.name), 0);
    }

    /// Calls the shared store has had.
    fn store_calls(&self) -> usize {
        self.shared().calls().len()
    }
}

#[test]
fn a_busy_subject_is_admitted_from_leases_never_past_what_redis_charged() {
    let b = bench_with_leases(HOT, OnFailure::Local, 3, Duration::from_millis(300));
    let tag = "ip:198.51.100.20";
    for admitted in 1..=300u64 {
        match b.request("198.51.100.20", "/", &[]) {
            Outcome::Allowed(applied) => {
                // Remaining as of the lease, less what this node admitted.
                assert_eq!(applied, vec![("per-ip".to_string(), 1000 - admitted)]);
            }
            other => panic!("request {admitted}: {other:?}"),
        }
        let charged = 1000 - b.tokens(tag, "per-ip");
        assert!(
            charged >= admitted,
            "request {admitted} was admitted before Redis charged it ({charged} charged)"
        );
    }
    assert!(
        b.store_calls() < 30,
        "{} store calls for 300 requests",
        b.store_calls()
    );
    // The lease runs out; what it held goes back, and Redis holds exactly
    // what was admitted.
    std::thread::sleep(Duration::from_millis(350));
    b.rt.block_on(b.limiter.return_leases());
    assert_eq!(b.tokens(tag, "per-ip"), 700);
}

#[test]
fn near_the_limit_every_token_is_used_and_no_more() {
    let b = bench_with_leases(
        &HOT.replace("burst = 1000", "burst = 10"),
        OnFailure::Local,
        3,
        Duration::from_secs(5),
    );
    let allowed = (0..15)
        .filter(|_| matches!(b.request("198.51.100.21", "/", &[]), Outcome::Allowed(_)))
        .count();
    assert_eq!(
        allowed, 10,
        "a lease never takes a token a request then lacks"
    );
    assert_eq!(b.tokens("ip:198.51.100.21", "per-ip"), 0);
}

#[test]
fn a_lease_whose_time_is_over_keeps_serving_a_subject_that_still_comes() {
    // A subject that holds a lease while Redis has nothing left (another
    // node took the rest), then comes a little slower than its lease: the
    // lease's time runs out between two of its requests, and the sweep runs
    // just before each request, its refunds in flight for a while. Every
    // token the node holds must still admit a request: none refused while
    // it is on its way back.
    let b = bench_with_leases(
        &HOT.replace("burst = 1000", "burst = 30"),
        OnFailure::Local,
        3,
        Duration::from_millis(100),
    );
    let (ip, tag) = ("198.51.100.24", "ip:198.51.100.24");
    for _ in 0..10 {
        assert!(matches!(b.request(ip, "/", &[]), Outcome::Allowed(_)));
    }
    // Another node takes everything Redis has left.
    let left = b.tokens(tag, "per-ip");
    b.drain(tag, "per-ip", left);
    let held = (30 - 10 - left) as usize;
    assert!(held >= 3, "the node holds a lease ({held})");
    b.shared().slow_refunds.set(Duration::from_millis(30));
    let mut seen = String::new();
    for _ in 0..held + 3 {
        std::thread::sleep(Duration::from_millis(40));
        let sweep = b.limiter.return_leases();
        let admitted = matches!(b.request_during(ip, "/", &[], sweep), Outcome::Allowed(_));
        seen.push(if admitted { 'A' } else { 'L' });
    }
    assert_eq!(
        seen,
        format!("{}LLL", "A".repeat(held)),
        "no request refused while the node held a token"
    );
}

#[test]
fn a_refusal_by_a_later_subject_ends_the_lease_and_gives_it_all_back() {
    let b = bench_with_leases(
        &IP_AND_GLOBAL
            .replace("burst = 5", "burst = 100")
            .replace("burst = 2", "burst = 60"),
        OnFailure::Local,
        3,
        Duration::from_secs(5),
    );
    let mut allowed = 0;
    for _ in 0..80 {
        if matches!(b.request("198.51.100.22", "/", &[]), Outcome::Allowed(_)) {
            allowed += 1;
        }
    }
    // The global bucket (60) refused the rest; each refusal ended the IP
    // subject's lease, whose tokens came back with the refused request's.
    assert_eq!(allowed, 60);
    b.rt.block_on(b.limiter.return_leases());
    assert_eq!(b.tokens("ip:198.51.100.22", "per-ip"), 100 - 60);
}

#[test]
fn an_ended_lease_gives_back_what_it_held() {
    let b = bench_with_leases(HOT, OnFailure::Local, 3, Duration::from_secs(5));
    for _ in 0..50 {
        b.request("198.51.100.23", "/", &[]);
    }
    assert!(
        b.tokens("ip:198.51.100.23", "per-ip") < 950,
        "the node holds leased tokens"
    );
    b.limiter.end_leases_of("ip:198.51.100.23");
    b.rt.block_on(b.limiter.return_leases());
    assert_eq!(b.tokens("ip:198.51.100.23", "per-ip"), 950);
    for _ in 0..50 {
        b.request("198.51.100.23", "/", &[]);
    }
    b.limiter.end_all_leases();
    b.rt.block_on(b.limiter.return_leases());
    assert_eq!(b.tokens("ip:198.51.100.23", "per-ip"), 900);
}

#[test]
fn asking_for_more_while_holding_tokens_never_counts_a_violation() {
    // Bans after two refusals. The node holds a lease when another node
    // takes everything Redis has left: each request admitted from the
    // lease's last quarter asks for more, and Redis has nothing to spare.
    // Those asks are not refusals: the subject is refused (and then
    // banned) only once the node's tokens are all used.
    let b = bench_with_leases(
        &HOT.replace("burst = 1000", "burst = 30").replace(
            "[ban]\nenabled = false",
            "[ban]\nafter = 2\nwithin = \"1m\"\nduration = \"1m\"",
        ),
        OnFailure::Local,
        3,
        Duration::from_secs(5),
    );
    let (ip, tag) = ("198.51.100.25", "ip:198.51.100.25");
    for _ in 0..10 {
        assert!(matches!(b.request(ip, "/", &[]), Outcome::Allowed(_)));
    }
    let left = b.tokens(tag, "per-ip");
    b.drain(tag, "per-ip", left);
    let held = (30 - 10 - left) as usize;
    assert!(held >= 3, "the node holds a lease ({held})");
    let mut seen = String::new();
    for _ in 0..held + 2 {
        seen.push(match b.request(ip, "/", &[]) {
            Outcome::Allowed(_) => 'A',
            Outcome::Limited(_) => 'L',
            Outcome::Banned { made: Some(_), .. } => 'B',
            other => panic!("{other:?}"),
        });
    }
    assert_eq!(seen, format!("{}LB", "A".repeat(held)));
}
