//! A subject's state lives as long as something in it needs it, and no
//! longer: an unrelated request never cuts a quota short, and strikes are
//! forgotten `ban.memory` after the ban ends however busy the client stays.
//! Against a real gateway and Redis, on real time.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// An anonymous client's default plan: 3 searches a day. A generous
/// `[[rules]]` rule covers every path with a short idle TTL.
const PLAN_AND_RULE: &str = r#"
[[rules]]
name = "per-ip"
key = "ip"
rate = 100
per = "1s"
burst = 100
"#;

const SEARCH_PLAN: &str = r#"
[consumers]
key = "header:X-Api-Key"
default_plan = "free"

[plans.free]
rules = [
  { name = "free-search", quota = 3, period = "day", match = { path_prefix = "/search" } },
]
"#;

#[test]
fn an_unrelated_request_never_cuts_a_quota_short() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let p = prefix();
    let gw = Gateway::start(&Setup {
        redis: Some(redis.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: PLAN_AND_RULE,
        extra: SEARCH_PLAN,
    });
    let ip = "198.51.100.90";
    let as_ip = [("X-Forwarded-For", ip)];
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/search"), &as_ip).status, 200);
    }
    assert_eq!(get(&gw.url("/search"), &as_ip).status, 429);
    // A request no plan rule matches writes the per-ip bucket, whose own
    // idle TTL is about two seconds.
    assert_eq!(get(&gw.url("/"), &as_ip).status, 200);
    let key = format!("{p}{{ip:{ip}}}:b");
    let ttl_ms: i64 = redis.cli(&["PTTL", &key]).trim().parse().unwrap();
    assert!(
        ttl_ms > 3_600_000,
        "the day quota's counter keeps the state alive: PTTL {ttl_ms} ms"
    );
    thread::sleep(Duration::from_millis(2_500));
    assert_eq!(
        get(&gw.url("/search"), &as_ip).status,
        429,
        "the day's quota is still spent after the short TTL has passed"
    );
}

/// Two refusals of the tight rule ban for a second, then twice as long; a
/// strike is remembered for two seconds after its ban ends.
const TIGHT: &str = r#"
[[rules]]
name = "tight"
key = "ip"
rate = 1
per = "1h"
burst = 1
match = { path_prefix = "/tight" }

[[rules]]
name = "open"
key = "ip"
rate = 1000
per = "1s"
burst = 1000
"#;

const SHORT_MEMORY: &str = r#"
[ban]
after = 2
within = "10s"
duration = "1s"
factor = 4.0
max_duration = "1h"
memory = "2s"
"#;

/// Sends `/tight` until the client is banned; returns the ban's strikes
/// as the admin API lists them.
fn get_banned(gw: &Gateway, ip: &str) -> u64 {
    let as_ip = [("X-Forwarded-For", ip)];
    let started = Instant::now();
    loop {
        let r = get(&gw.url("/tight"), &as_ip);
        if r.status == 429 && r.json()["error"] == "banned" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never banned");
    }
    let ban = gw.admin("GET", &format!("/admin/bans/{ip}"), None);
    assert_eq!(ban.status, 200, "{}", ban.body);
    ban.json()["strikes"].as_u64().unwrap()
}

fn strikes_are_forgotten_while_the_client_stays_busy(redis: Option<&RedisServer>) {
    let up = Upstream::start();
    let p = prefix();
    let gw = Gateway::start(&Setup {
        redis: redis.map(|r| r.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: TIGHT,
        extra: SHORT_MEMORY,
    });
    let ip = "198.51.100.91";
    assert_eq!(get_banned(&gw, ip), 1);
    // Busy through the ban (refused) and well past its memory (allowed):
    // every allowed request writes the subject's state.
    let busy_until = Instant::now() + Duration::from_millis(3_600);
    while Instant::now() < busy_until {
        get(&gw.url("/"), &[("X-Forwarded-For", ip)]);
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        get(&gw.url("/"), &[("X-Forwarded-For", ip)]).status,
        200,
        "the first ban is over"
    );
    assert_eq!(
        get_banned(&gw, ip),
        1,
        "the first strike was forgotten two seconds after its ban ended"
    );
}

#[test]
fn strikes_are_forgotten_after_ban_memory_in_redis() {
    let redis = RedisServer::start();
    strikes_are_forgotten_while_the_client_stays_busy(Some(&redis));
}

#[test]
fn strikes_are_forgotten_after_ban_memory_in_the_local_store() {
    strikes_are_forgotten_while_the_client_stays_busy(None);
}

#[test]
fn a_strike_within_memory_escalates_the_next_ban() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = Gateway::on(&redis, &up, TIGHT, SHORT_MEMORY);
    let ip = "198.51.100.92";
    assert_eq!(get_banned(&gw, ip), 1);
    thread::sleep(Duration::from_millis(1_100));
    let ban = {
        let strikes = get_banned(&gw, ip);
        (
            strikes,
            gw.admin("GET", &format!("/admin/bans/{ip}"), None).json(),
        )
    };
    assert_eq!(ban.0, 2, "a ban within memory is the second strike");
    assert!(
        ban.1["remaining"].as_u64().unwrap() >= 3,
        "the second ban lasts factor times longer: {}",
        ban.1
    );
}
