//! Leased tokens against real processes: several nodes on one Redis keep
//! every subject within its bound while admitting from memory, a node
//! killed holding leases costs only what it held, a reload, a ban and a
//! plan change give leased tokens back, and a busy subject costs almost no
//! Redis calls.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// `n` gateways on one Redis and one key prefix, in front of `up`.
fn nodes(n: usize, redis: &RedisServer, up: &Upstream, rules: &str, extra: &str) -> Vec<Gateway> {
    nodes_leasing(n, redis, up, rules, extra, "100ms")
}

/// The same with `redis.lease = lease`.
fn nodes_leasing(
    n: usize,
    redis: &RedisServer,
    up: &Upstream,
    rules: &str,
    extra: &str,
    lease: &str,
) -> Vec<Gateway> {
    let p = prefix();
    (0..n)
        .map(|_| {
            let setup = Setup {
                redis: Some(redis.url()),
                upstream: &up.url(),
                prefix: &p,
                rules,
                extra,
            };
            let (port, admin) = (free_port(), free_port());
            let config = Gateway::config(port, admin, &setup).replace(
                "timeout = \"200ms\"\n",
                &format!("timeout = \"200ms\"\nlease = \"{lease}\"\n"),
            );
            Gateway::start_config(port, admin, config, &[])
        })
        .collect()
}

/// What one paced client saw.
struct Paced {
    allowed: u64,
    sent: u64,
    /// From its first request to its last, in seconds.
    span_s: f64,
}

/// A client sending as `ip` at `rate` requests a second for `run`, round
/// robin over `urls`.
fn paced(urls: Vec<String>, ip: String, rate: f64, run: Duration) -> thread::JoinHandle<Paced> {
    thread::spawn(move || {
        let gap = Duration::from_secs_f64(1.0 / rate);
        let start = Instant::now();
        let (mut allowed, mut sent) = (0, 0);
        let mut last = start;
        while start.elapsed() < run {
            let due = start + gap * sent as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            last = Instant::now();
            let r = get_as(&urls[sent as usize % urls.len()], &ip);
            assert!(
                r.status == 200 || r.status == 429,
                "{}: {}",
                r.status,
                r.body
            );
            if r.status == 200 {
                allowed += 1;
            }
            sent += 1;
        }
        Paced {
            allowed,
            sent,
            span_s: last.duration_since(start).as_secs_f64(),
        }
    })
}

const RATE: f64 = 20.0;
const BURST: u64 = 20;

#[test]
fn three_nodes_keep_every_subject_within_its_bound() {
    let _shared = beside_others();
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let rule = format!(
        "[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = {RATE}\nper = \"1s\"\nburst = {BURST}\n"
    );
    let gws = nodes(3, &redis, &up, &rule, "");
    let urls: Vec<String> = gws.iter().map(|g| g.url("/")).collect();
    let run = Duration::from_secs(4);
    let clients: Vec<(f64, thread::JoinHandle<Paced>)> = [0.5, 1.0, 2.0, 4.0]
        .iter()
        .enumerate()
        .map(|(i, times)| {
            let rate = RATE * times;
            (
                *times,
                paced(urls.clone(), format!("198.51.100.{}", 30 + i), rate, run),
            )
        })
        .collect();
    for (times, client) in clients {
        let seen = client.join().unwrap();
        let bound = BURST as f64 + RATE * seen.span_s;
        eprintln!(
            "client at {times}x its rate: {} of {} allowed, bound {bound:.0}",
            seen.allowed, seen.sent
        );
        assert!(
            seen.allowed as f64 <= bound + 1.0,
            "client at {times}x: {} allowed, bound {bound:.1}",
            seen.allowed
        );
        if times >= 2.0 {
            assert!(
                seen.allowed as f64 >= 0.9 * bound,
                "client at {times}x got {} of its bound {bound:.1}",
                seen.allowed
            );
        } else {
            assert!(
                seen.allowed + 1 >= seen.sent,
                "a client under its rate was refused: {} of {}",
                seen.allowed,
                seen.sent
            );
        }
    }
    let leased: f64 = gws
        .iter()
        .map(|g| g.metric("floodgate_lease_admissions_total"))
        .sum();
    assert!(leased > 0.0, "no request was admitted from a lease");
}

/// A bucket no test empties, refilling slowly enough (one token in ten
/// seconds) that what Redis holds is what was charged.
const HOT: &str =
    "[[rules]]\nname = \"hot\"\nkey = \"ip\"\nrate = 1\nper = \"10s\"\nburst = 100000\n";

/// Sends as `ip` to `url` from `clients` threads until `run` is over;
/// returns the requests allowed and sent.
fn flood(url: &str, ip: &str, clients: usize, run: Duration) -> (u64, u64) {
    flood_until(url, ip, clients, run, |_, _| false)
}

/// The same, stopping early once `enough(allowed, sent)` says so.
fn flood_until(
    url: &str,
    ip: &str,
    clients: usize,
    run: Duration,
    enough: impl Fn(u64, u64) -> bool,
) -> (u64, u64) {
    let (allowed, sent) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (url, ip) = (url.to_string(), ip.to_string());
            let (allowed, sent, stop) = (allowed.clone(), sent.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let status = get_as(&url, &ip).status;
                    sent.fetch_add(1, Ordering::Relaxed);
                    if status == 200 {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let until = Instant::now() + run;
    while Instant::now() < until
        && !enough(
            allowed.load(Ordering::Relaxed),
            sent.load(Ordering::Relaxed),
        )
    {
        thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    (
        allowed.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed),
    )
}

/// The busy-subject test measures calls per request at full load: the
/// other tests of this file, which load the machine too, wait for it.
static ALONE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// What every other test of this file holds while it runs.
fn beside_others() -> std::sync::RwLockReadGuard<'static, ()> {
    ALONE.read().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn a_busy_subject_costs_almost_no_redis_calls() {
    let _alone = ALONE.write().unwrap_or_else(|e| e.into_inner());
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = &nodes(1, &redis, &up, HOT, "")[0];
    let before = redis.calls("evalsha") + redis.calls("eval");
    let started = Instant::now();
    let (allowed, sent) = flood(&gw.url("/"), "198.51.100.40", 16, Duration::from_secs(3));
    let elapsed = started.elapsed();
    let calls = redis.calls("evalsha") + redis.calls("eval") - before;
    let per_request = calls as f64 / sent as f64;
    // redis.lease is 100 ms by default.
    let lease_times = elapsed.as_secs_f64() / 0.1;
    eprintln!(
        "{calls} script calls for {sent} requests: {per_request:.4} a request, {:.2} a lease time",
        calls as f64 / lease_times
    );
    assert_eq!(allowed, sent, "nothing refused");
    // The calls follow the leases' pace (a grant, a top-up and a return
    // per lease time at most), not the requests': a debug build on a
    // shared machine sends a few thousand requests here, a release build
    // at full load tens of thousands (0.0003 calls a request in the
    // bench). Either way requests far outnumber calls.
    assert!(
        calls as f64 <= 4.0 * lease_times,
        "{calls} Redis calls in {elapsed:?} for one busy subject"
    );
    assert!(
        per_request <= 0.02,
        "{calls} Redis calls for {sent} requests of one busy subject"
    );
}

/// Tokens left in `rule`'s bucket of `subject` in Redis, per the admin API.
fn redis_tokens(gw: &Gateway, rule: &str, subject: &str) -> f64 {
    let r = gw.admin("GET", &format!("/admin/buckets/{rule}/{subject}"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["tokens"].as_f64().unwrap()
}

#[test]
fn a_node_killed_holding_leases_costs_only_what_it_held() {
    let _shared = beside_others();
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let rule = "[[rules]]\nname = \"hot\"\nkey = \"ip\"\nrate = 1\nper = \"30m\"\nburst = 3000\n";
    // Leases long enough that a still holds one when it is killed.
    let mut gws = nodes_leasing(2, &redis, &up, rule, "", "5s");
    let ip = "198.51.100.41";
    // a takes about a third of the bucket, then dies.
    let (on_a, _) = flood_until(&gws[0].url("/"), ip, 8, Duration::from_secs(10), |a, _| {
        a >= 1000
    });
    gws[0].kill9();
    // What Redis charged and a did not admit is what a held when it died.
    let held_by_a = (3000.0 - redis_tokens(&gws[1], "hot", ip) - on_a as f64).round();
    assert!(held_by_a >= 1.0, "node a held no lease when killed");
    // b goes on until the rest is spent.
    let (on_b, sent_b) = flood_until(&gws[1].url("/"), ip, 8, Duration::from_secs(20), |a, s| {
        s >= a + 100
    });
    eprintln!("a admitted {on_a} and held {held_by_a} when killed; b admitted {on_b} of {sent_b}");
    assert!(sent_b > on_b, "b never reached the limit");
    assert!(
        (on_a + on_b) as f64 <= 3000.0 + 1.0,
        "{} admitted over a bound of 3000",
        on_a + on_b
    );
    assert_eq!(
        (on_a + on_b) as f64 + held_by_a,
        3000.0,
        "everything not admitted was what the dead node held"
    );
}

#[test]
fn a_reload_gives_leased_tokens_back() {
    let _shared = beside_others();
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = &nodes_leasing(1, &redis, &up, HOT, "", "5s")[0];
    let ip = "198.51.100.42";
    let (admitted, _) = flood(&gw.url("/"), ip, 4, Duration::from_millis(500));
    assert!(
        redis_tokens(gw, "hot", ip) < 100_000.0 - admitted as f64,
        "the node holds a lease"
    );
    assert_eq!(gw.admin("POST", "/admin/reload", None).status, 200);
    wait_until("the lease given back", Duration::from_secs(2), || {
        redis_tokens(gw, "hot", ip).round() == 100_000.0 - admitted as f64
    });
    assert!(gw.metric("floodgate_lease_returned_total") >= 1.0);
}

#[test]
fn a_ban_gives_the_banned_clients_leased_tokens_back() {
    let _shared = beside_others();
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = &nodes_leasing(1, &redis, &up, HOT, "", "5s")[0];
    let ip = "198.51.100.43";
    let (admitted, _) = flood(&gw.url("/"), ip, 4, Duration::from_millis(500));
    let body = format!("{{\"subject\":\"{ip}\",\"duration\":\"1m\"}}");
    assert_eq!(gw.admin("POST", "/admin/bans", Some(&body)).status, 201);
    wait_until("the lease given back", Duration::from_secs(2), || {
        redis_tokens(gw, "hot", ip).round() == 100_000.0 - admitted as f64
    });
    assert_eq!(
        gw.admin("DELETE", &format!("/admin/bans/{ip}"), None)
            .status,
        204
    );
    assert_eq!(get_as(&gw.url("/"), ip).status, 200);
}

#[test]
fn a_plan_change_gives_the_consumers_leased_tokens_back() {
    let _shared = beside_others();
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let rule = "[[rules]]\nname = \"per-key\"\nkey = \"header:X-Api-Key\"\nrate = 1\nper = \"10s\"\nburst = 100000\n";
    let plans = "[consumers]\nkey = \"header:X-Api-Key\"\nkeys = { \"k-1\" = \"free\" }\n\n[plans.free]\n\n[plans.pro]\n";
    let gw = &nodes_leasing(1, &redis, &up, rule, plans, "5s")[0];
    let admitted = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (url, admitted) = (gw.url("/"), admitted.clone());
            thread::spawn(move || {
                let until = Instant::now() + Duration::from_millis(500);
                while Instant::now() < until {
                    if get(&url, &[("X-Api-Key", "k-1")]).status == 200 {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let admitted = admitted.load(Ordering::Relaxed) as f64;
    assert!(redis_tokens(gw, "per-key", "k-1") < 100_000.0 - admitted);
    let r = gw.admin("PUT", "/admin/consumers/k-1", Some(r#"{"plan":"pro"}"#));
    assert_eq!(r.status, 201, "{}", r.body);
    wait_until("the lease given back", Duration::from_secs(2), || {
        redis_tokens(gw, "per-key", "k-1").round() == 100_000.0 - admitted
    });
}
