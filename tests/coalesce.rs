//! Coalesced decisions against real processes: at light load every decided
//! request is one script call; under concurrency several decisions share a
//! call, and every client still gets exactly its limit.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use common::*;

const PER_IP: &str =
    "[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = 1\nper = \"60s\"\nburst = 10\n";

#[test]
fn at_light_load_each_decision_is_one_call() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = Gateway::on(&redis, &up, PER_IP, "");
    let before = redis.calls("evalsha");
    for i in 0..20 {
        let ip = format!("198.51.100.{i}");
        assert_eq!(get_as(&gw.url("/"), &ip).status, 200);
    }
    assert_eq!(redis.calls("evalsha") - before, 20);
}

#[test]
fn concurrent_decisions_share_calls_and_stay_exact() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = Gateway::on(&redis, &up, PER_IP, "");
    let before = redis.calls("evalsha");
    // 64 clients at once, 12 requests each: every one of them may pass 10.
    let allowed: Vec<Arc<AtomicU64>> = (0..64).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let (url, count) = (gw.url("/"), allowed[i].clone());
            thread::spawn(move || {
                let ip = format!("203.0.113.{i}");
                for _ in 0..12 {
                    let r = get_as(&url, &ip);
                    assert!(
                        r.status == 200 || r.status == 429,
                        "status {}: {}",
                        r.status,
                        r.body
                    );
                    if r.status == 200 {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for (i, a) in allowed.iter().enumerate() {
        assert_eq!(
            a.load(Ordering::Relaxed),
            10,
            "client {i} was not held to its burst"
        );
    }
    // 768 requests: 640 allowed, 128 refused. Refusals of IP subjects with
    // bans off are answered from the deny cache after the first; every
    // allowed request was decided by Redis, several per call.
    let calls = redis.calls("evalsha") - before;
    assert!(
        calls < 640,
        "{calls} script calls for 640 Redis decisions: nothing was coalesced"
    );
    assert!(
        gw.log().lines().all(|l| !l.contains("ERROR")),
        "{}",
        gw.log()
    );
}

#[test]
fn one_hot_subject_in_many_batches_gets_exactly_its_burst() {
    // One client on 48 connections at once: its decisions share batches
    // with themselves, which Redis decides on one copy of its state.
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let rule = "[[rules]]\nname = \"hot\"\nkey = \"ip\"\nrate = 1\nper = \"60s\"\nburst = 150\n";
    let gw = Gateway::on(&redis, &up, rule, "");
    let before = redis.calls("evalsha");
    let allowed = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..48)
        .map(|_| {
            let (url, count) = (gw.url("/"), allowed.clone());
            thread::spawn(move || {
                for _ in 0..5 {
                    let r = get_as(&url, "192.0.2.77");
                    assert!(r.status == 200 || r.status == 429, "status {}", r.status);
                    if r.status == 200 {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(allowed.load(Ordering::Relaxed), 150);
    assert_eq!(up.hits(), 150);
    let calls = redis.calls("evalsha") - before;
    assert!(
        calls < 150,
        "{calls} script calls for 150 allowed: nothing was coalesced"
    );
    // The state Redis kept is the one a request at a time would leave: the
    // bucket is empty, so the next request is refused.
    assert_eq!(get_as(&gw.url("/"), "192.0.2.77").status, 429);
}
