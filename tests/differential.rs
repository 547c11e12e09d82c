//! The two stores decide alike: the same request sequence, on the same
//! pinned clock, fed to the Redis script and to the in-process store gives
//! the same answer at every step (status, every bucket's tokens and waits,
//! ban lengths and strikes, quota counts and periods, concurrency slots
//! and their leases).

mod common;

use floodgate::config::Config;
use floodgate::limiter::{
    BanParams, DecisionStore, LeaseCall, LeaseSlot, LocalStore, Mode, RedisStore, Status,
    SubjectCall,
};
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
# Short enough that strikes are forgotten many times in the run, whatever
# traffic keeps the subject's state alive meanwhile.
memory = "20s"
"#;

/// Both stores over one config, against a Redis of their own: the
/// compiled rules, the in-process store, a runtime and the Redis store.
struct Stores {
    _redis: RedisServer,
    rules: RuleSet,
    local: LocalStore,
    rt: tokio::runtime::Runtime,
    remote: RedisStore,
}

/// `config` with a `[redis]` section for a fresh server put before `[ban]`
/// (or appended when it has none).
fn stores(config: &str) -> Stores {
    let redis = RedisServer::start();
    let section = format!("[redis]\nurl = \"{}\"\ntimeout = \"2s\"\n\n", redis.url());
    let text = if config.contains("[ban]") {
        config.replace("[ban]", &format!("{section}[ban]"))
    } else {
        format!("{config}\n{section}")
    };
    let config = Config::parse(&text, "differential").unwrap();
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
    Stores {
        _redis: redis,
        rules,
        local,
        rt,
        remote,
    }
}

#[test]
fn redis_and_local_stores_decide_identically() {
    let Stores {
        _redis,
        rules,
        local,
        rt,
        remote,
    } = stores(CONFIG);

    let all: Vec<&Rule> = rules.rules().iter().collect();
    let subsets: Vec<Vec<&Rule>> = vec![
        all.clone(),
        vec![all[0]],
        vec![all[1], all[2]],
        vec![all[0], all[1]],
    ];
    let tags = ["ip:203.0.113.1", "ip:203.0.113.2", "ip:2001:db8::/64"];
    // Calls ask for different idle TTLs (as requests whose rules differ
    // do), so a call that asks for less than the state needs is seen.
    let ttls = [rules.ttl_ms(&floodgate::policy::KeyKind::Ip), 1_000, 90_000];

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
        let ttl_ms = ttls[rng.below(ttls.len() as u64) as usize];
        let mode = match rng.below(12) {
            0 => Mode::Refund { rule: "elsewhere" },
            1 => Mode::TopUp,
            2 => Mode::Settle,
            _ => Mode::Decide,
        };
        // A quarter of the calls ask for a lease (a decision for up to 8
        // requests), or give back up to 8 requests' worth (a refund).
        let count = if mode != Mode::Settle && rng.below(4) == 0 {
            1 + rng.below(8) as u32
        } else {
            1
        };
        // A settlement's costs are signed differences; a decision or a
        // refund names its own costs a third of the time (a cost read from a header).
        let costs: Vec<i64> = match mode {
            Mode::Settle => subset.iter().map(|_| rng.below(7) as i64 - 3).collect(),
            // (Only single requests name costs: leases are never taken
            // for rules whose cost varies.)
            Mode::Decide | Mode::Refund { .. } if count == 1 && rng.below(3) == 0 => {
                subset.iter().map(|_| rng.below(4) as i64).collect()
            }
            _ => Vec::new(),
        };
        let call = SubjectCall {
            tag,
            rules: subset,
            ttl_ms,
            bannable: true,
            mode,
            now_us: Some(now_us),
            lease: "",
            count,
            costs: &costs,
        };
        let a = rt.block_on(DecisionStore::decide(&remote, &call)).unwrap();
        let b = local.decide(&call);
        assert_eq!(a, b, "step {step}: {call:?}");
        if mode == Mode::Settle {
            // A settlement never refuses and never counts a violation.
            assert!(
                matches!(a.status, Status::Allowed | Status::BannedBefore),
                "step {step}: a settlement refused: {a:?}"
            );
            *seen.entry("Settled".to_string()).or_insert(0) += 1;
        }
        if mode == Mode::TopUp {
            // A top-up never refuses: it grants what can be spared, or 0.
            assert!(
                matches!(a.status, Status::Allowed | Status::BannedBefore),
                "step {step}: a top-up refused: {a:?}"
            );
            let seen_as = if a.granted > 0 { "TopUp" } else { "TopUpNone" };
            *seen.entry(seen_as.to_string()).or_insert(0) += 1;
        } else if a.granted > 1 {
            *seen.entry("Leased".to_string()).or_insert(0) += 1;
        }
        // Both stores keep the state until the same moment (the script's
        // `#x`), so neither forgets a quota, a window or strikes before the
        // other.
        let kept: Option<u64> = _redis
            .cli(&["HGET", &format!("fg:{{{tag}}}:b"), "#x"])
            .trim()
            .parse()
            .ok();
        assert_eq!(kept, local.kept_until_ms(tag), "step {step}: kept until");
        *seen.entry(format!("{:?}", a.status)).or_insert(0) += 1;
    }
    // The sequence exercised every outcome.
    for status in [
        "Allowed",
        "Limited",
        "BannedBefore",
        "BannedNow",
        "Leased",
        "TopUp",
        "TopUpNone",
        "Settled",
    ] {
        assert!(
            seen.get(status).copied().unwrap_or(0) > 5,
            "{status} barely seen: {seen:?}"
        );
    }
}

const PLAN_CONFIG: &str = r#"
[upstream]
urls = ["http://127.0.0.1:1"]

[[rules]]
name = "steady"
key = "ip"
rate = 5
per = "1s"
burst = 4

[[rules]]
name = "hourly"
key = "ip"
quota = 9
period = "hour"

[[rules]]
name = "daily"
key = "ip"
quota = 30
period = "day"
cost = 2

[[rules]]
name = "monthly"
key = "ip"
quota = 25
period = "month"
shadow = true

[[rules]]
name = "slots"
key = "ip"
concurrency = 3
lease = "2s"

[[rules]]
name = "few-slots"
key = "ip"
concurrency = 1
lease = "500ms"
shadow = true

[ban]
after = 4
within = "2s"
duration = "3s"
factor = 1.5
max_duration = "20s"
# Longer than the whole run: Redis forgets on its own clock, not the pinned one.
memory = "3650d"
"#;

#[test]
fn quotas_and_concurrency_decide_identically_in_both_stores() {
    let Stores {
        _redis,
        rules,
        local,
        rt,
        remote,
    } = stores(PLAN_CONFIG);

    let all: Vec<&Rule> = rules.rules().iter().collect();
    let subsets: Vec<Vec<&Rule>> = vec![
        all.clone(),
        vec![all[1], all[4]],
        vec![all[0], all[2], all[3]],
        vec![all[4], all[5]],
        vec![all[1], all[2], all[4]],
    ];
    let tags = ["ip:203.0.113.1", "ip:203.0.113.2"];
    let ttl_ms = rules.ttl_ms(&floodgate::policy::KeyKind::Ip);
    let slots = |rules: &[&Rule]| -> Vec<LeaseSlot> {
        rules
            .iter()
            .filter_map(|r| match r.limit {
                floodgate::policy::Limit::Concurrency(c) => Some(LeaseSlot {
                    rule: r.name.clone(),
                    lease_ms: c.lease_ms,
                }),
                _ => None,
            })
            .collect()
    };

    let mut rng = Rng(0x2545f4914f6cdd1d);
    // 2030-01-31 23:58:00 UTC: a month, a day and an hour end soon.
    let mut now_us: u64 = 1_896_134_280_000_000;
    // Leases handed out: (tag, subset index, lease id).
    let mut held: Vec<(usize, usize, String)> = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for step in 0..6000u64 {
        now_us += match rng.below(40) {
            0..=17 => rng.below(2_000),
            18..=31 => rng.below(400_000),
            32..=36 => rng.below(5_000_000),
            37 => rng.below(3_600_000_000),
            38 => rng.below(86_400_000_000),
            _ => rng.below(40 * 86_400_000_000),
        };
        let t = rng.below(tags.len() as u64) as usize;
        let op = rng.below(10);
        if op <= 1 && !held.is_empty() {
            // Renew or release a lease held.
            // The newest lease half of the time: most others have expired.
            let i = if rng.below(2) == 0 {
                held.len() - 1
            } else {
                rng.below(held.len() as u64) as usize
            };
            let renew = op == 0;
            let (ht, hs, id) = if renew {
                held[i].clone()
            } else {
                held.swap_remove(i)
            };
            let slots = slots(&subsets[hs]);
            let call = LeaseCall {
                tag: tags[ht],
                lease: &id,
                slots: &slots,
                renew,
                now_us: Some(now_us),
            };
            let a = rt.block_on(DecisionStore::leases(&remote, &call)).unwrap();
            let b = local.leases(&call);
            assert_eq!(a, b, "step {step}: {call:?}");
            *seen
                .entry(format!("lease renew={renew} held={}", a > 0))
                .or_insert(0) += 1;
            continue;
        }
        let s = rng.below(subsets.len() as u64) as usize;
        let id = format!("lease-{step}");
        let mode = match op {
            2 => Mode::Peek,
            3 => Mode::Refund { rule: "elsewhere" },
            4 if step % 2 == 0 => Mode::Settle,
            _ => Mode::Decide,
        };
        // A settlement moves quotas and buckets only (never a slot): its
        // rules are those of the subset that count (see `Rule::settle`).
        let rules_of: Vec<&Rule> = if mode == Mode::Settle {
            subsets[s]
                .iter()
                .copied()
                .filter(|r| !matches!(r.limit, floodgate::policy::Limit::Concurrency(_)))
                .collect()
        } else {
            subsets[s].clone()
        };
        let costs: Vec<i64> = match mode {
            Mode::Settle => rules_of.iter().map(|_| rng.below(9) as i64 - 3).collect(),
            _ => Vec::new(),
        };
        let lease = if op == 3 && !held.is_empty() {
            held[rng.below(held.len() as u64) as usize].2.clone()
        } else {
            id
        };
        let call = SubjectCall {
            tag: tags[t],
            rules: &rules_of,
            ttl_ms,
            bannable: true,
            mode,
            now_us: Some(now_us),
            lease: &lease,
            count: 1,
            costs: &costs,
        };
        let a = rt.block_on(DecisionStore::decide(&remote, &call)).unwrap();
        let b = local.decide(&call);
        assert_eq!(a, b, "step {step}: {call:?}");
        if mode == Mode::Decide && a.status == Status::Allowed {
            held.push((t, s, lease));
        }
        if mode == Mode::Settle {
            assert!(
                matches!(a.status, Status::Allowed | Status::BannedBefore),
                "step {step}: a settlement refused: {a:?}"
            );
            *seen.entry("Settled".to_string()).or_insert(0) += 1;
            continue;
        }
        for (rule, bucket) in subsets[s].iter().zip(&a.buckets) {
            *seen
                .entry(format!("{} {:?}", rule.name, bucket.state))
                .or_insert(0) += 1;
        }
        *seen.entry(format!("{:?}", a.status)).or_insert(0) += 1;
    }
    // The sequence exercised every outcome of every kind.
    for outcome in [
        "Allowed",
        "Limited",
        "BannedNow",
        "hourly Refusing",
        "daily Refusing",
        "monthly ShadowRefusing",
        "slots Refusing",
        "few-slots ShadowRefusing",
        "lease renew=true held=true",
        "lease renew=true held=false",
        "lease renew=false held=false",
        "Settled",
    ] {
        assert!(
            seen.get(outcome).copied().unwrap_or(0) > 3,
            "{outcome} barely seen: {seen:?}"
        );
    }
}

#[test]
fn the_script_ends_a_day_quota_at_midnight_utc_and_a_month_quota_on_the_first() {
    let Stores {
        _redis,
        rules,
        rt,
        remote: store,
        ..
    } = stores(
        "[upstream]\nurls = [\"http://127.0.0.1:1\"]\n\
         [[rules]]\nname = \"daily\"\nkey = \"ip\"\nquota = 2\nperiod = \"day\"\n\
         [[rules]]\nname = \"monthly\"\nkey = \"ip\"\nquota = 3\nperiod = \"month\"\n",
    );
    let all: Vec<&Rule> = rules.rules().iter().collect();
    let decide = |now_us: u64| {
        let call = SubjectCall {
            tag: "ip:203.0.113.9",
            rules: &all,
            ttl_ms: rules.ttl_ms(&floodgate::policy::KeyKind::Ip),
            bannable: false,
            mode: Mode::Decide,
            now_us: Some(now_us),
            lease: "",
            count: 1,
            costs: &[],
        };
        rt.block_on(DecisionStore::decide(&store, &call)).unwrap()
    };
    // 2028-02-29T23:59:58.5Z: the last day of a leap February.
    let midnight: u64 = 1_835_481_600_000_000; // 2028-03-01T00:00:00Z
    let t = midnight - 1_500_000;
    for left in [1, 0] {
        let r = decide(t);
        assert_eq!(r.status, Status::Allowed);
        assert_eq!(r.buckets[0].room_us, left, "daily left");
        assert_eq!(r.buckets[0].wait_us, 1_500_000, "daily resets at midnight");
        assert_eq!(
            r.buckets[1].wait_us, 1_500_000,
            "monthly resets on March 1st"
        );
    }
    let r = decide(midnight - 1);
    assert_eq!(r.status, Status::Limited);
    assert_eq!(
        r.buckets[0].state,
        floodgate::limiter::BucketState::Refusing
    );
    assert_eq!(r.buckets[0].wait_us, 1, "refused until the next period");
    // One microsecond later it is March: both quotas start afresh.
    let r = decide(midnight);
    assert_eq!(r.status, Status::Allowed);
    assert_eq!(r.buckets[0].room_us, 1);
    assert_eq!(r.buckets[0].wait_us, 86_400_000_000);
    assert_eq!(r.buckets[1].room_us, 2);
    assert_eq!(
        r.buckets[1].wait_us,
        31 * 86_400_000_000,
        "March has 31 days"
    );
}
