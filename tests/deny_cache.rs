//! The deny cache against real processes: a subject Redis refused with a
//! known wait is refused again from the node's memory, with no Redis call,
//! exactly until that wait is over; refusals that must count towards a ban
//! still reach Redis.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn rule(name: &str, key: &str, rate: u32, per: &str, burst: u32) -> String {
    format!("[[rules]]\nname = \"{name}\"\nkey = \"{key}\"\nrate = {rate}\nper = \"{per}\"\nburst = {burst}\n")
}

fn deny_cache_hits(gw: &Gateway) -> u64 {
    let text = call("GET", &gw.admin_url("/metrics"), &[], None).body;
    text.lines()
        .find(|l| l.starts_with("floodgate_deny_cache_hits_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

#[test]
fn a_refused_key_is_refused_from_memory_until_its_wait_ends() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    // One token every 800 ms, two in the bucket; header keys are never banned.
    let gw = Gateway::on(
        &redis,
        &up,
        &rule("per-key", "header:X-Api-Key", 5, "4s", 2),
        "",
    );
    let key = [("X-Api-Key", "abuser")];
    assert_eq!(get(&gw.url("/"), &key).status, 200);
    assert_eq!(get(&gw.url("/"), &key).status, 200);
    let refused_at = Instant::now();
    let first = get(&gw.url("/"), &key);
    assert_eq!(first.status, 429, "{}", first.body);
    let calls = redis.calls("evalsha");
    let mut refused = 0;
    while refused_at.elapsed() < Duration::from_millis(500) {
        let r = get(&gw.url("/"), &key);
        assert_eq!(r.status, 429, "passed before the bucket had a token");
        assert_eq!(r.json()["rule"], "per-key");
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.header("ratelimit-remaining"), Some("0"));
        refused += 1;
    }
    assert!(refused >= 10, "only {refused} requests in 500 ms");
    assert_eq!(
        redis.calls("evalsha"),
        calls,
        "a refusal with a known end cost a Redis call"
    );
    assert_eq!(deny_cache_hits(&gw), refused);
    assert_eq!(gw.requests_metric("per-key", "limited"), refused + 1);
    // Another key is decided by Redis as usual.
    assert_eq!(get(&gw.url("/"), &[("X-Api-Key", "other")]).status, 200);
    // The token comes 800 ms after the first charge: once it is due, Redis
    // decides again and the request passes (the cache never holds longer).
    while refused_at.elapsed() < Duration::from_millis(850) {
        thread::sleep(Duration::from_millis(10));
    }
    let r = get(&gw.url("/"), &key);
    assert_eq!(r.status, 200, "still refused after the wait: {}", r.body);
    assert_eq!(up.hits(), 4);
}

#[test]
fn refusals_that_count_towards_a_ban_still_reach_redis() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = Gateway::on(
        &redis,
        &up,
        &rule("per-ip", "ip", 1, "60s", 2),
        "[ban]\nenabled = true\nafter = 3\nwithin = \"10s\"\nduration = \"1m\"\n",
    );
    assert_eq!(get(&gw.url("/"), &[]).status, 200);
    assert_eq!(get(&gw.url("/"), &[]).status, 200);
    let decided = gw.decisions("redis");
    assert_eq!(get(&gw.url("/"), &[]).status, 429);
    assert_eq!(get(&gw.url("/"), &[]).status, 429);
    // The third violation bans: every one of them was decided by Redis.
    let r = get(&gw.url("/"), &[]);
    assert_eq!(r.json()["error"], "banned", "{}", r.body);
    assert_eq!(gw.decisions("redis"), decided + 3);
    assert_eq!(deny_cache_hits(&gw), 0);
}

#[test]
fn a_refusal_by_a_later_subject_gives_earlier_ones_their_tokens_back() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let rules = format!(
        "{}{}",
        rule("per-ip", "ip", 1, "60s", 3),
        rule("everyone", "global", 1, "60s", 1)
    );
    let gw = Gateway::on(&redis, &up, &rules, "");
    assert_eq!(get(&gw.url("/"), &[]).status, 200);
    // The global bucket is empty: refused (and cached) without charging the
    // client's own bucket, which still has 2 tokens.
    for _ in 0..5 {
        let r = get(&gw.url("/"), &[]);
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["rule"], "everyone");
    }
    let t = gw
        .admin("GET", "/admin/buckets/per-ip/127.0.0.1", None)
        .json();
    let tokens = t["tokens"].as_f64().unwrap();
    assert!(
        (1.99..2.05).contains(&tokens),
        "the client's bucket has {tokens} tokens, expected 2"
    );
}
