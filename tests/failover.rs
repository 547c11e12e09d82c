//! When Redis fails: kill -9 and SIGSTOP under load, each `on_failure` mode,
//! recovery, starting without Redis, and a Redis that comes back empty.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const RULES: &str =
    "[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = 10\nper = \"1s\"\nburst = 10\n";
const TIMEOUT_MS: u64 = 100;

fn gateway(redis_url: &str, up: &Upstream, mode: &str, extra: &str) -> Gateway {
    let p = prefix();
    let setup = Setup {
        redis: Some(redis_url.to_string()),
        upstream: &up.url(),
        prefix: &p,
        rules: RULES,
        extra,
    };
    let (port, admin) = (free_port(), free_port());
    let config = Gateway::config(port, admin, &setup).replace(
        "timeout = \"200ms\"\n",
        &format!(
            "timeout = \"{TIMEOUT_MS}ms\"\non_failure = \"{mode}\"\nprobe_interval = \"200ms\"\n"
        ),
    );
    Gateway::start_config(port, admin, config, &[])
}

/// One answer seen by a load thread.
#[derive(Clone, Copy, Debug)]
struct Seen {
    at: Instant,
    status: u16,
    took: Duration,
}

/// Concurrent clients of one load: enough that decisions queue behind the
/// calls in flight and leave in batches, as under real load.
const CLIENTS: usize = 16;

/// Sends requests as `ip` from [`CLIENTS`] clients at once until stopped,
/// recording every answer.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    handles: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, ip: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handles = (0..CLIENTS)
            .map(|_| {
                let (s, v, url) = (stop.clone(), seen.clone(), url.clone());
                thread::spawn(move || {
                    while !s.load(Ordering::Relaxed) {
                        let at = Instant::now();
                        let r = get_as(&url, ip);
                        v.lock().unwrap().push(Seen {
                            at,
                            status: r.status,
                            took: at.elapsed(),
                        });
                        thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Load {
            stop,
            seen,
            handles,
        }
    }

    fn between(&self, from: Instant, to: Instant) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .copied()
            .collect()
    }

    fn finish(mut self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            h.join().unwrap();
        }
        self.seen.lock().unwrap().clone()
    }
}

fn degraded(gw: &Gateway) -> bool {
    get(&gw.admin_url("/metrics"), &[])
        .body
        .lines()
        .any(|l| l == "floodgate_degraded 1")
}

fn assert_no_5xx_and_bounded(seen: &[Seen], allowed_5xx: Option<u16>) {
    for s in seen {
        if Some(s.status) != allowed_5xx {
            assert!(s.status < 500, "a {} during the outage", s.status);
        }
        assert!(
            s.took < Duration::from_millis(TIMEOUT_MS + 400),
            "an answer took {:?}",
            s.took
        );
    }
}

#[test]
fn redis_killed_under_load_local_mode_keeps_limits_and_bans_then_recovers() {
    let mut redis = RedisServer::start();
    let up = Upstream::start();
    let gw = gateway(&redis.url(), &up, "local", "");
    assert_eq!(
        gw.admin(
            "POST",
            "/admin/bans",
            Some("{\"subject\":\"198.51.100.66\",\"duration\":\"10m\"}")
        )
        .status,
        201
    );
    let load = Load::start(gw.url("/"), "203.0.113.1");
    thread::sleep(Duration::from_millis(500));

    let killed = Instant::now();
    redis.kill9();
    let mut detected = None;
    while killed.elapsed() < Duration::from_secs(5) {
        if degraded(&gw) {
            detected = Some(killed.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let detected = detected.expect("the gateway never noticed Redis was gone");
    thread::sleep(Duration::from_millis(2500));
    let outage_end = Instant::now();
    // Bans this node knew still apply; limits are enforced locally.
    assert_eq!(
        get_as(&gw.url("/"), "198.51.100.66").json()["error"],
        "banned"
    );
    assert_eq!(get(&gw.admin_url("/readyz"), &[]).status, 503);
    let during = load.between(killed + detected, outage_end);
    assert_no_5xx_and_bounded(&during, None);
    let allowed = during.iter().filter(|s| s.status == 200).count() as f64;
    let secs = outage_end.duration_since(killed + detected).as_secs_f64();
    assert!(
        allowed <= 10.0 + 10.0 * secs + 1.0,
        "local mode let {allowed} through in {secs:.1}s"
    );
    assert!(
        during.iter().any(|s| s.status == 429),
        "local mode enforced nothing"
    );

    redis.restart();
    let restarted = Instant::now();
    wait_until("decisions back on Redis", Duration::from_secs(5), || {
        !degraded(&gw) && redis.calls("evalsha") + redis.calls("eval") > 0
    });
    let recovered = restarted.elapsed();
    assert_eq!(get(&gw.admin_url("/readyz"), &[]).status, 200);
    let seen = load.finish();
    assert_no_5xx_and_bounded(&seen, None);
    // Redis came back empty: the node wrote back the ban it knew.
    wait_until(
        "the ban restored into Redis",
        Duration::from_secs(3),
        || gw.admin("GET", "/admin/bans/198.51.100.66", None).status == 200,
    );
    assert!(gw.log().contains("Redis lost its data"));
    let transitions = gw.log().matches("Redis unavailable after").count();
    assert_eq!(transitions, 1, "one log line per transition:\n{}", gw.log());
    eprintln!("outage detected after {detected:?}; back on Redis {recovered:?} after restart");
}

#[test]
fn allow_mode_forwards_everything_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let up = Upstream::start();
    let gw = gateway(&redis.url(), &up, "allow", "");
    redis.kill9();
    let start = Instant::now();
    for _ in 0..40 {
        let at = Instant::now();
        let r = get_as(&gw.url("/"), "203.0.113.2");
        assert_eq!(r.status, 200, "allow mode refused: {}", r.body);
        assert!(at.elapsed() < Duration::from_millis(TIMEOUT_MS + 400));
    }
    assert!(degraded(&gw));
    redis.restart();
    wait_until("back on Redis", Duration::from_secs(5), || !degraded(&gw));
    let statuses: Vec<u16> = (0..15)
        .map(|_| get_as(&gw.url("/"), "203.0.113.2").status)
        .collect();
    assert!(
        statuses.contains(&429),
        "limits apply again after recovery: {statuses:?} ({:?})",
        start.elapsed()
    );
}

#[test]
fn deny_mode_answers_503_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let up = Upstream::start();
    let gw = gateway(&redis.url(), &up, "deny", "");
    assert_eq!(get_as(&gw.url("/"), "203.0.113.3").status, 200);
    redis.kill9();
    for _ in 0..10 {
        let at = Instant::now();
        let r = get_as(&gw.url("/"), "203.0.113.3");
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(r.json()["error"], "unavailable");
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        assert_eq!(
            r.json()["type"],
            "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
        );
        assert!(at.elapsed() < Duration::from_millis(TIMEOUT_MS + 400));
    }
    redis.restart();
    wait_until("back on Redis", Duration::from_secs(5), || {
        get_as(&gw.url("/"), "203.0.113.3").status == 200
    });
}

#[test]
fn frozen_redis_never_hangs_a_request() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let gw = gateway(&redis.url(), &up, "local", "");
    let load = Load::start(gw.url("/"), "203.0.113.4");
    thread::sleep(Duration::from_millis(300));
    let frozen = Instant::now();
    redis.freeze();
    thread::sleep(Duration::from_secs(2));
    redis.thaw();
    let thawed = Instant::now();
    wait_until(
        "back on Redis after SIGCONT",
        Duration::from_secs(5),
        || !degraded(&gw),
    );
    let back = thawed.elapsed();
    let seen = load.finish();
    assert_no_5xx_and_bounded(&seen, None);
    let during = seen
        .iter()
        .filter(|s| s.at >= frozen && s.at < thawed)
        .count();
    assert!(
        during > 20,
        "requests stalled while Redis was frozen: {during}"
    );
    eprintln!("frozen Redis: {during} answers during 2 s; back on Redis {back:?} after SIGCONT");
}

#[test]
fn starts_and_serves_with_no_redis_at_all() {
    let up = Upstream::start();
    let dead = format!("redis://127.0.0.1:{}", free_port());
    let gw = gateway(&dead, &up, "local", "");
    let log = gw.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert!(log.contains("is unreachable"), "{log}");
    assert_eq!(
        warnings
            .iter()
            .filter(|l| l.contains("unreachable"))
            .count(),
        1
    );
    let statuses: Vec<u16> = (0..15)
        .map(|_| get_as(&gw.url("/"), "203.0.113.5").status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(get(&gw.admin_url("/readyz"), &[]).status, 503);

    // And with no [redis] section: in-process by design, ready.
    let p = prefix();
    let local = Gateway::start(&Setup {
        redis: None,
        upstream: &up.url(),
        prefix: &p,
        rules: RULES,
        extra: "",
    });
    let statuses: Vec<u16> = (0..15)
        .map(|_| get_as(&local.url("/"), "203.0.113.5").status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(get(&local.admin_url("/readyz"), &[]).status, 200);
    let r = local.admin(
        "POST",
        "/admin/bans",
        Some("{\"subject\":\"203.0.113.77\",\"duration\":\"1m\"}"),
    );
    assert_eq!(r.status, 201);
    assert_eq!(
        get_as(&local.url("/"), "203.0.113.77").json()["error"],
        "banned"
    );
    assert_eq!(
        local
            .admin("GET", "/admin/bans", None)
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn bans_made_during_an_outage_are_written_back() {
    let mut redis = RedisServer::start();
    let up = Upstream::start();
    let extra = "[ban]\nenabled = true\nafter = 2\nwithin = \"10s\"\nduration = \"5m\"\n";
    let gw = gateway(&redis.url(), &up, "local", extra);
    redis.kill9();
    wait_until("degraded", Duration::from_secs(5), || {
        get_as(&gw.url("/"), "203.0.113.9");
        degraded(&gw)
    });
    let mut banned = false;
    for _ in 0..30 {
        if get_as(&gw.url("/"), "203.0.113.8").json()["error"] == "banned" {
            banned = true;
            break;
        }
    }
    assert!(banned, "the local store did not ban during the outage");
    redis.restart();
    wait_until("back on Redis", Duration::from_secs(5), || !degraded(&gw));
    wait_until("the outage ban in Redis", Duration::from_secs(3), || {
        let r = gw.admin("GET", "/admin/bans/203.0.113.8", None);
        r.status == 200 && r.json()["reason"].as_str().unwrap_or("").contains("outage")
    });
}

/// `redis.max_decisions_per_second`: decisions past the node's cap use
/// `on_failure` (here the local store), are counted under the store that
/// made them, never reach Redis, and the spell is announced once.
#[test]
fn decisions_past_the_cap_use_on_failure_and_are_counted() {
    const CAP: u64 = 20;
    let redis = RedisServer::start();
    let up = Upstream::start();
    let p = prefix();
    let setup = Setup {
        redis: Some(redis.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: RULES,
        extra: "",
    };
    let (port, admin) = (free_port(), free_port());
    let config = Gateway::config(port, admin, &setup).replace(
        "timeout = \"200ms\"\n",
        &format!("timeout = \"200ms\"\nmax_decisions_per_second = {CAP}\n"),
    );
    let g = Gateway::start_config(port, admin, config, &[]);
    let calls_before = redis.calls("evalsha") + redis.calls("eval");
    let started = Instant::now();
    // Fresh clients only: each is allowed by either store, so the statuses
    // say nothing and the metrics say everything.
    for i in 0..200 {
        let r = get_as(&g.url("/"), &format!("10.77.{}.{}", i / 200, i % 200));
        assert_eq!(r.status, 200);
    }
    let bound = CAP + (CAP as f64 * started.elapsed().as_secs_f64()) as u64 + 1;
    let (on_redis, on_local) = (g.decisions("redis"), g.decisions("local"));
    assert_eq!(on_redis + on_local, 200);
    assert!(
        on_redis >= CAP && on_redis <= bound,
        "{on_redis} decisions on Redis, cap {bound}"
    );
    assert_eq!(g.metric("floodgate_redis_shed_total") as u64, on_local);
    assert_eq!(
        redis.calls("evalsha") + redis.calls("eval") - calls_before,
        on_redis,
        "decisions past the cap reached Redis"
    );
    assert_eq!(
        g.log().matches("max_decisions_per_second").count(),
        1,
        "{}",
        g.log()
    );
    assert_eq!(
        g.metric("floodgate_degraded"),
        0.0,
        "the cap is not an outage"
    );
}

/// A gateway on `redis` with `timeout` per Redis call, `on_failure = local`.
fn gateway_with_timeout(redis: &RedisServer, up: &Upstream, timeout_ms: u64) -> Gateway {
    let p = prefix();
    let setup = Setup {
        redis: Some(redis.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: "[[rules]]\nname = \"wide\"\nkey = \"ip\"\nrate = 100000\nper = \"1s\"\nburst = 100000\n",
        extra: "",
    };
    let (port, admin) = (free_port(), free_port());
    let config = Gateway::config(port, admin, &setup).replace(
        "timeout = \"200ms\"\n",
        &format!("timeout = \"{timeout_ms}ms\"\n"),
    );
    Gateway::start_config(port, admin, config, &[])
}

/// `clients` concurrent clients, each its own address, each recording the
/// time every answer took, until stopped.
struct ManyClients {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    handles: Vec<thread::JoinHandle<()>>,
}

impl ManyClients {
    fn start(url: String, clients: usize) -> ManyClients {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handles = (0..clients)
            .map(|c| {
                let (s, v, url) = (stop.clone(), seen.clone(), url.clone());
                let ip = format!("10.64.{}.{}", c / 250, c % 250 + 1);
                thread::spawn(move || {
                    while !s.load(Ordering::Relaxed) {
                        let at = Instant::now();
                        let status = get_as(&url, &ip).status;
                        v.lock().unwrap().push(Seen {
                            at,
                            status,
                            took: at.elapsed(),
                        });
                    }
                })
            })
            .collect();
        ManyClients {
            stop,
            seen,
            handles,
        }
    }

    fn finish(mut self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            h.join().unwrap();
        }
        self.seen.lock().unwrap().clone()
    }
}

/// A blip a little longer than `redis.timeout` fails every call then in
/// flight (on every worker, and every batch of waiting decisions) at once:
/// that is one failure, not one per waiting request, and opens no breaker.
#[test]
fn a_short_blip_under_concurrent_load_opens_no_breaker() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = gateway_with_timeout(&redis, &up, 50);
    let load = ManyClients::start(gw.url("/"), 64);
    thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        assert_eq!(redis.cli(&["DEBUG", "SLEEP", "0.08"]).trim(), "OK");
        thread::sleep(Duration::from_millis(300));
    }
    let seen = load.finish();
    assert!(seen.iter().all(|s| s.status == 200), "every request passed");
    assert!(
        !gw.log().contains("unavailable after"),
        "a blip of 80 ms opened the breaker:\n{}",
        gw.log()
    );
    assert_eq!(gw.metric("floodgate_redis_shard_degraded"), 0.0);
    assert!(
        gw.metric("floodgate_redis_errors_total") >= 1.0,
        "the blips did fail calls: the test saw what it is about"
    );
}

/// However long Redis stalls, a decision waits at most about one
/// `redis.timeout` (queue included) before it goes to `on_failure`.
#[test]
fn a_decision_waits_about_one_timeout_however_long_redis_stalls() {
    const TIMEOUT: u64 = 300;
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = gateway_with_timeout(&redis, &up, TIMEOUT);
    let load = ManyClients::start(gw.url("/"), 64);
    thread::sleep(Duration::from_millis(500));
    let stalled = Instant::now();
    assert_eq!(redis.cli(&["DEBUG", "SLEEP", "1"]).trim(), "OK");
    thread::sleep(Duration::from_millis(300));
    let seen = load.finish();
    let worst = seen
        .iter()
        .filter(|s| s.at >= stalled)
        .map(|s| s.took)
        .max()
        .unwrap();
    eprintln!(
        "worst answer during a 1 s stall with redis.timeout = {TIMEOUT} ms: {worst:?} ({} answers)",
        seen.len()
    );
    assert!(seen.iter().all(|s| s.status == 200));
    // Waiting for a call in flight and then for a call of its own would be
    // two timeouts (600 ms) and more.
    assert!(
        worst < Duration::from_millis(TIMEOUT + 250),
        "a decision waited {worst:?} with redis.timeout = {TIMEOUT} ms"
    );
}

/// Redis dies while every request is answered from the deny cache (no
/// decision needs Redis): the watch notices, and the breaker, the
/// degraded gauge and readiness agree.
#[test]
fn a_redis_that_dies_while_no_decision_needs_it_is_noticed() {
    let mut redis = RedisServer::start();
    let up = Upstream::start();
    let p = prefix();
    let gw = Gateway::start(&Setup {
        redis: Some(redis.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: "[[rules]]\nname = \"once\"\nkey = \"ip\"\nrate = 1\nper = \"1h\"\nburst = 1\n",
        extra: "",
    });
    assert_eq!(get(&gw.url("/"), &[]).status, 200);
    assert_eq!(get(&gw.url("/"), &[]).status, 429);
    assert!(gw.metric("floodgate_deny_cache_hits_total") == 0.0);
    assert_eq!(get(&gw.url("/"), &[]).status, 429);
    assert!(
        gw.metric("floodgate_deny_cache_hits_total") >= 1.0,
        "refusals come from the deny cache"
    );
    redis.kill9();
    let killed = Instant::now();
    wait_until(
        "the breaker opens with no decision failing",
        Duration::from_secs(3),
        || {
            assert_eq!(get(&gw.url("/"), &[]).status, 429);
            degraded(&gw)
        },
    );
    eprintln!("noticed {:?} after the kill", killed.elapsed());
    assert_eq!(get(&gw.admin_url("/readyz"), &[]).status, 503);
    assert_eq!(gw.metric("floodgate_redis_shard_degraded"), 1.0);
}

/// A decision whose answer is lost on the way back (the connection breaks
/// after Redis ran it) is not sent again: a refusal counts one violation,
/// never two.
#[test]
fn a_decision_whose_answer_was_lost_is_never_counted_twice() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let proxy = LossyProxy::start(redis.port);
    let p = prefix();
    let gw = Gateway::start(&Setup {
        redis: Some(proxy.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: "[[rules]]\nname = \"once\"\nkey = \"ip\"\nrate = 1\nper = \"1h\"\nburst = 1\n",
        extra: "[ban]\nafter = 2\nwithin = \"1m\"\nduration = \"1m\"\n",
    });
    let ip = "198.51.100.95";
    assert_eq!(get_as(&gw.url("/"), ip).status, 200);
    proxy.lose_reply_to(&format!("{{ip:{ip}}}"));
    // Refused in Redis (one violation); the answer is lost on the way.
    get_as(&gw.url("/"), ip);
    assert_eq!(proxy.lost(), 1, "the answer was lost");
    let state = format!("{p}{{ip:{ip}}}:b");
    assert_eq!(
        redis.cli(&["HGET", &state, "#vc"]).trim(),
        "1",
        "one refusal, one violation"
    );
    assert_eq!(
        redis.cli(&["HGET", &state, "#bu"]).trim(),
        "",
        "no ban from a violation counted twice"
    );
}

/// A gateway whose decisions past one a second go to the local store,
/// with automatic bans after 3 refusals and write-back every `reconcile`.
fn capped_gateway(redis: &RedisServer, up: &Upstream, reconcile: &str) -> Gateway {
    let p = prefix();
    let extra = format!(
        "[ban]\nafter = 3\nwithin = \"1m\"\nduration = \"10m\"\nreconcile_interval = \"{reconcile}\"\n"
    );
    let setup = Setup {
        redis: Some(redis.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: "[[rules]]\nname = \"once\"\nkey = \"ip\"\nrate = 1\nper = \"1h\"\nburst = 1\n",
        extra: &extra,
    };
    let (port, admin) = (free_port(), free_port());
    let config = Gateway::config(port, admin, &setup).replace(
        "timeout = \"200ms\"\n",
        "timeout = \"200ms\"\nmax_decisions_per_second = 1\n",
    );
    Gateway::start_config(port, admin, config, &[])
}

fn is_banned(gw: &Gateway, ip: &str) -> bool {
    get_as(&gw.url("/"), ip)
        .json()
        .get("error")
        .and_then(|e| e.as_str())
        == Some("banned")
}

/// Sends as `ip` until banned.
fn get_banned_past_the_cap(gw: &Gateway, ip: &str) {
    assert!((0..50).any(|_| is_banned(gw, ip)), "never banned");
    assert!(
        gw.decisions("local") > 0,
        "the cap sent decisions to the local store"
    );
}

/// A ban the local store makes while Redis answers (here: decisions past
/// `redis.max_decisions_per_second`) is written to Redis at once: the admin
/// API lists it like any ban, long before a write-back round.
#[test]
fn a_ban_made_past_the_cap_is_listed_at_once() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = capped_gateway(&redis, &up, "1h");
    let ip = "198.51.100.96";
    get_banned_past_the_cap(&gw, ip);
    wait_until(
        "the ban listed by the admin API",
        Duration::from_secs(2),
        || gw.admin("GET", &format!("/admin/bans/{ip}"), None).status == 200,
    );
}

/// Once an operator lifts such a ban, no write-back brings it back.
#[test]
fn a_lifted_ban_is_never_written_back() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = capped_gateway(&redis, &up, "300ms");
    let ip = "198.51.100.97";
    get_banned_past_the_cap(&gw, ip);
    wait_until("the ban listed", Duration::from_secs(2), || {
        gw.admin("GET", &format!("/admin/bans/{ip}"), None).status == 200
    });
    assert_eq!(
        gw.admin("DELETE", &format!("/admin/bans/{ip}"), None)
            .status,
        204
    );
    // Several write-back rounds later, still lifted.
    thread::sleep(Duration::from_millis(1_200));
    assert_eq!(
        gw.admin("GET", &format!("/admin/bans/{ip}"), None).status,
        404,
        "a lifted ban was written back"
    );
    assert!(!is_banned(&gw, ip));
}
