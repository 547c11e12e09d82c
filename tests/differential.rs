//! The two stores decide alike: the same request sequence, on the same
//! pinned clock, fed to the Redis script and to the in-process store gives
//! the same answer at every step (status, every bucket's tokens and waits,
//! ban lengths and strikes).

mod common;

use floodgate::config::Config;
use floodgate::limiter::{BanParams, DecisionStore, LocalStore, Mode, RedisStore, SubjectCall};
use floodgate::redis_link::RedisLink;
use floodgate::rules::{Rule, RuleSet};

use common::*;

/// A small deterministic generator (xorshift), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const CONFIG: &str = r#"
[upstream]
urls = ["http://127.0.0.1:1"]

[[rules]]
name = "steady"
key = "ip"
rate = 5
per = "1s"
burst = 4

[[rules]]
name = "costly"
key = "ip"
rate = 3
per = "700ms"
burst = 9
cost = 2

[[rules]]
name = "quarter"
key = "ip"
rate = 1
per = "250ms"
burst = 2
shadow = true

[ban]
after = 4
within = "2s"
duration = "3s"
factor = 1.5
max_duration = "20s"
memory = "1h"
"#;

#[test]
fn redis_and_local_stores_decide_identically() {
    let redis = RedisServer::start();
    let config = Config::parse(
        &CONFIG.replace(
            "[ban]",
            &format!(
                "[redis]\nurl = \"{}\"\ntimeout = \"2s\"\n\n[ban]",
                redis.url()
            ),
        ),
        "differential",
    )
    .unwrap();
    let rules = RuleSet::compile(&config.rules);
    let params = BanParams::from_config(&config.ban);
    let local = LocalStore::new(params, 10_000, true);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let link = RedisLink::new(config.redis.clone().unwrap());
    rt.block_on(link.connect()).unwrap();
    let remote = RedisStore::new(link, params);

    let all: Vec<&Rule> = rules.rules().iter().collect();
    let subsets: Vec<Vec<&Rule>> = vec![
        all.clone(),
        vec![all[0]],
        vec![all[1], all[2]],
        vec![all[0], all[1]],
    ];
    let tags = ["ip:203.0.113.1", "ip:203.0.113.2", "ip:2001:db8::/64"];
    let ttl_ms = rules.ttl_ms(&floodgate::rules::KeyKind::Ip);

    let mut rng = Rng(0x9e3779b97f4a7c15);
    // Start on a whole second far from any real clock: the stores must only
    // depend on the clock they are given.
    let mut now_us: u64 = 1_900_000_000_000_000;
    let mut seen = std::collections::HashMap::new();
    for step in 0..3000 {
        now_us += match rng.below(20) {
            0..=7 => rng.below(1_000),
            8..=15 => rng.below(60_000),
            16..=18 => rng.below(900_000),
            _ => rng.below(6_000_000),
        };
        let tag = tags[rng.below(tags.len() as u64) as usize];
        let subset = &subsets[rng.below(subsets.len() as u64) as usize];
        let mode = if rng.below(12) == 0 {
            Mode::Refund { rule: "elsewhere" }
        } else {
            Mode::Decide
        };
        let call = SubjectCall {
            tag,
            rules: subset,
            ttl_ms,
            bannable: true,
            mode,
            now_us: Some(now_us),
            lease: "",
        };
        let a = rt.block_on(DecisionStore::decide(&remote, &call)).unwrap();
        let b = local.decide(&call);
        assert_eq!(a, b, "step {step}: {call:?}");
        *seen.entry(format!("{:?}", a.status)).or_insert(0) += 1;
    }
    // The sequence exercised every outcome.
    for status in ["Allowed", "Limited", "BannedBefore", "BannedNow"] {
        assert!(
            seen.get(status).copied().unwrap_or(0) > 5,
            "{status} barely seen: {seen:?}"
        );
    }
}
