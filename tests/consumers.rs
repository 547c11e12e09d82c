//! Consumers and plans against real processes: plans moved at runtime and
//! seen by another node within a second, keys kept in Redis only as
//! hashes, a day quota that ends at midnight UTC (the deciding clock
//! pinned by libfaketime), concurrency slots shared by nodes, released when a
//! response ends or its client goes away, and freed after their lease when
//! the node holding them is killed. Headers are read with an RFC 9651
//! parser.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const KEY: &str = "X-Api-Key";

const PLANS: &str = r#"
[consumers]
key = "header:X-Api-Key"
default_plan = "free"
keys = { "k-static-pro" = "pro" }

[plans.free]
rules = [
  { name = "free-rate", rate = 1, per = "60s", burst = 3 },
  { name = "free-daily", quota = 1000, period = "day" },
]

[plans.pro]
rules = [
  { name = "pro-rate", rate = 10, per = "1s", burst = 20 },
  { name = "pro-monthly", quota = 100000, period = "month" },
  { name = "pro-inflight", concurrency = 2, lease = "1s" },
]
"#;

/// A `[[rules]]` rule keyed by the consumer header: decided in the same
/// call as the plan's rules.
const PER_KEY: &str =
    "[[rules]]\nname = \"per-key\"\nkey = \"header:X-Api-Key\"\nrate = 1\nper = \"60s\"\nburst = 50\n";

/// A structured-field List (RFC 9651) of policies: each item's name and
/// parameters (integers and strings as text).
fn sf_list(value: Option<&str>) -> Vec<(String, HashMap<String, String>)> {
    let value = value.expect("header present");
    let list = sfv::Parser::parse_list(value.as_bytes())
        .unwrap_or_else(|e| panic!("not an RFC 9651 list ({e}): {value}"));
    list.into_iter()
        .map(|entry| match entry {
            sfv::ListEntry::Item(item) => {
                let name = item
                    .bare_item
                    .as_str()
                    .unwrap_or_else(|| panic!("item name is not a string: {value}"))
                    .to_string();
                let params = item
                    .params
                    .iter()
                    .map(|(k, v)| {
                        let text = v
                            .as_int()
                            .map(|i| i.to_string())
                            .or_else(|| v.as_str().map(str::to_string))
                            .unwrap_or_else(|| panic!("{k} is neither integer nor string"));
                        (k.clone(), text)
                    })
                    .collect();
                (name, params)
            }
            sfv::ListEntry::InnerList(_) => panic!("inner list in {value}"),
        })
        .collect()
}

fn names(list: &[(String, HashMap<String, String>)]) -> Vec<&str> {
    list.iter().map(|(n, _)| n.as_str()).collect()
}

fn param<'l>(
    list: &'l [(String, HashMap<String, String>)],
    name: &str,
    p: &str,
) -> Option<&'l str> {
    list.iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, ps)| ps.get(p))
        .map(String::as_str)
}

fn get_key(gw: &Gateway, path: &str, key: &str) -> Resp {
    get(&gw.url(path), &[(KEY, key)])
}

/// The plan a response's policies come from (`free`, `pro`).
fn plan_seen(r: &Resp) -> String {
    let policies = sf_list(r.header("ratelimit-policy"));
    let plan = names(&policies).into_iter().find_map(|n| {
        ["free", "pro"]
            .into_iter()
            .find(|p| n.starts_with(&format!("{p}-")))
    });
    plan.unwrap_or("").to_string()
}

#[test]
fn plans_move_at_runtime_and_every_node_follows_within_a_second() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let p = prefix();
    let setup = Setup {
        redis: Some(redis.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: PER_KEY,
        extra: PLANS,
    };
    let (a, b) = (Gateway::start(&setup), Gateway::start(&setup));

    // A key no assignment names is decided like a request without one: the
    // default plan on the client's address, and no rule keyed by it.
    let r = get_key(&b, "/", "k-made-up");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        names(&sf_list(r.header("ratelimit-policy"))),
        ["free-rate", "free-daily"]
    );

    // A key assigned the default plan is a consumer: every policy is listed.
    let r = a.admin("PUT", "/admin/consumers/k-1", Some(r#"{"plan":"free"}"#));
    assert_eq!(r.status, 201, "{}", r.body);
    wait_until("node b knows k-1", Duration::from_secs(1), || {
        names(&sf_list(
            get_key(&b, "/x", "k-1").header("ratelimit-policy"),
        ))
        .first()
        .is_some_and(|n| *n == "per-key")
    });
    let r = get_key(&b, "/", "k-1");
    assert_eq!(r.status, 200, "{}", r.body);
    let policy = sf_list(r.header("ratelimit-policy"));
    assert_eq!(names(&policy), ["per-key", "free-rate", "free-daily"]);
    assert_eq!(param(&policy, "free-rate", "q"), Some("3"));
    assert_eq!(param(&policy, "free-rate", "w"), Some("180"));
    assert_eq!(param(&policy, "free-daily", "q"), Some("1000"));
    assert_eq!(param(&policy, "free-daily", "w"), Some("86400"));
    let state = sf_list(r.header("ratelimit"));
    assert_eq!(names(&state), ["per-key", "free-rate", "free-daily"]);
    assert_eq!(param(&state, "free-rate", "r"), Some("1"));
    assert_eq!(param(&state, "free-rate", "t"), Some("120"));
    assert_eq!(param(&state, "free-daily", "r"), Some("998"));
    let t: u64 = param(&state, "free-daily", "t").unwrap().parse().unwrap();
    assert!(
        (1..=86_400).contains(&t),
        "t = seconds to midnight UTC: {t}"
    );
    // The older trio keeps the tightest policy.
    assert_eq!(r.header("ratelimit-limit"), Some("3"));
    assert_eq!(r.header("ratelimit-remaining"), Some("1"));

    // A static key gets its plan; a concurrency policy says what it counts.
    let r = get_key(&a, "/", "k-static-pro");
    let policy = sf_list(r.header("ratelimit-policy"));
    assert_eq!(
        names(&policy),
        ["per-key", "pro-rate", "pro-monthly", "pro-inflight"]
    );
    assert_eq!(param(&policy, "pro-monthly", "w"), Some("2592000"));
    assert_eq!(param(&policy, "pro-inflight", "q"), Some("2"));
    assert_eq!(
        param(&policy, "pro-inflight", "qu"),
        Some("concurrent-requests")
    );
    assert_eq!(param(&policy, "pro-inflight", "w"), None);
    let state = sf_list(r.header("ratelimit"));
    assert_eq!(
        param(&state, "pro-inflight", "r"),
        Some("1"),
        "this request holds one slot"
    );

    // Moved to pro on one node, seen on the other within a second.
    let r = a.admin("PUT", "/admin/consumers/k-1", Some(r#"{"plan":"pro"}"#));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["plan"], "pro");
    assert_eq!(r.json()["previous"], "free");
    let moved = Instant::now();
    wait_until(
        "node b applies the new plan",
        Duration::from_secs(1),
        || plan_seen(&get_key(&b, "/", "k-1")) == "pro",
    );
    let seen_after = moved.elapsed();
    assert!(seen_after < Duration::from_secs(1), "{seen_after:?}");
    // The consumer header's own rule shares the consumer's subject (one
    // atomic call): its bucket kept counting across the plan change.
    let r = get_key(&b, "/", "k-1");
    let state = sf_list(r.header("ratelimit"));
    let per_key_left: u64 = param(&state, "per-key", "r")
        .unwrap_or_else(|| panic!("{r:?}"))
        .parse()
        .unwrap();
    assert!(per_key_left <= 47, "per-key restarted: {per_key_left}");

    let r = a.admin("PUT", "/admin/consumers/k-1", Some(r#"{"plan":"pro"}"#));
    assert_eq!(r.status, 200, "replacing answers 200: {}", r.body);
    assert_eq!(r.json()["previous"], "pro");
    let view = b.admin("GET", "/admin/consumers/k-1", None);
    assert_eq!(view.status, 200, "{}", view.body);
    let view = view.json();
    assert_eq!(view["plan"], "pro");
    assert_eq!(view["source"], "runtime");
    let rules = view["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 3);
    assert_eq!(rules[0]["name"], "pro-rate");
    assert_eq!(rules[1]["kind"], "quota");
    assert!(rules[1]["used"].as_u64().unwrap() >= 2, "{view}");
    assert_eq!(rules[2]["kind"], "concurrency");
    assert_eq!(rules[2]["in_flight"], 0);

    // Bad input changes nothing.
    let r = a.admin("PUT", "/admin/consumers/k-1", Some(r#"{"plan":"gold"}"#));
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].as_str().unwrap().contains("gold"));
    assert_eq!(
        a.admin("PUT", "/admin/consumers/k-1", Some("{plan")).status,
        400
    );
    assert_eq!(
        a.admin(
            "PUT",
            "/admin/consumers/k-1",
            Some(r#"{"plan":"free","x":1}"#)
        )
        .status,
        400
    );
    let long = "k".repeat(300);
    assert_eq!(
        a.admin(
            "PUT",
            &format!("/admin/consumers/{long}"),
            Some(r#"{"plan":"free"}"#)
        )
        .status,
        400
    );
    assert_eq!(
        b.admin("GET", "/admin/consumers/k-1", None).json()["plan"],
        "pro"
    );
    assert_eq!(
        call(
            "PUT",
            &a.admin_url("/admin/consumers/k-1"),
            &[],
            Some(r#"{"plan":"free"}"#)
        )
        .status,
        401
    );

    // Keys never reach Redis in clear: the table, the subject keys and the
    // audit log name the key's SHA-256.
    let hash = view["key_sha256"].as_str().unwrap().to_string();
    assert_eq!(hash.len(), 64);
    let prefix = &p;
    let table = redis.cli(&["HGETALL", &format!("{prefix}consumers")]);
    assert!(table.contains(&hash), "{table}");
    let mut everything = redis.cli(&["--scan", "--pattern", &format!("{prefix}*")]);
    everything.push_str(&table);
    everything.push_str(&redis.cli(&["XRANGE", &format!("{prefix}audit"), "-", "+"]));
    for clear in ["k-1", "k-static-pro"] {
        assert!(
            !everything.contains(clear),
            "`{clear}` in Redis:\n{everything}"
        );
    }
    // Plan and per-key rule live in the consumer's one state hash.
    let state_key = format!("{prefix}{{consumer:{hash}}}:b");
    let fields = redis.cli(&["HKEYS", &state_key]);
    assert!(
        fields.contains("per-key") && fields.contains("pro-rate"),
        "{fields}"
    );
    let audit = a.admin("GET", "/admin/audit?count=10", None).json();
    let events: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject"] == format!("consumer:{hash}"))
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["assign", "assign", "assign"], "{audit}");

    // Removed: back to the default plan everywhere; a second removal is 404.
    assert_eq!(b.admin("DELETE", "/admin/consumers/k-1", None).status, 204);
    wait_until(
        "node a drops the runtime plan",
        Duration::from_secs(1),
        || plan_seen(&get_key(&a, "/", "k-1")) == "free",
    );
    assert_eq!(a.admin("DELETE", "/admin/consumers/k-1", None).status, 404);
    assert_eq!(
        a.admin("GET", "/admin/consumers/k-1", None).json()["source"],
        "default"
    );
    // A static key can be moved too, and falls back to its static plan.
    assert_eq!(
        a.admin(
            "PUT",
            "/admin/consumers/k-static-pro",
            Some(r#"{"plan":"free"}"#)
        )
        .status,
        201
    );
    wait_until(
        "node b moves the static key",
        Duration::from_secs(1),
        || plan_seen(&get_key(&b, "/", "k-static-pro")) == "free",
    );
    assert_eq!(
        a.admin("DELETE", "/admin/consumers/k-static-pro", None)
            .status,
        204
    );
    assert_eq!(
        b.admin("GET", "/admin/consumers/k-static-pro", None).json()["source"],
        "config"
    );

    // A node started later reads the runtime plans before serving.
    a.admin("PUT", "/admin/consumers/k-2", Some(r#"{"plan":"pro"}"#));
    let c = Gateway::start(&setup);
    assert_eq!(plan_seen(&get_key(&c, "/", "k-2")), "pro");
}

#[test]
fn keyless_requests_get_the_default_plan_per_address_and_refusals_are_problems() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = Gateway::on(&redis, &up, "", PLANS);
    let ip = "198.51.100.40";
    for left in (0..3).rev() {
        let r = get_as(&gw.url("/"), ip);
        assert_eq!(r.status, 200);
        assert_eq!(
            param(&sf_list(r.header("ratelimit")), "free-rate", "r"),
            Some(left.to_string().as_str())
        );
    }
    let r = get_as(&gw.url("/"), ip);
    assert_eq!(r.status, 429);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let body = r.json();
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(body["status"], 429);
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(body["violated-policies"], serde_json::json!(["free-rate"]));
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["rule"], "free-rate");
    assert_eq!(body["retry_after"], 60);
    assert_eq!(r.header("retry-after"), Some("60"));
    assert_eq!(names(&sf_list(r.header("ratelimit-policy"))), ["free-rate"]);
    // Another address is another anonymous consumer.
    assert_eq!(get_as(&gw.url("/"), "198.51.100.41").status, 200);
    // A key header too long to be a key is refused, not truncated.
    let long = "k".repeat(300);
    assert_eq!(get(&gw.url("/"), &[(KEY, &long)]).status, 400);
    assert!(gw.requests_metric("free-rate", "limited") >= 1);
    assert!(gw.requests_metric("free-daily", "allowed") >= 4);
}

#[test]
fn a_day_quota_ends_at_midnight_utc() {
    // The deciding clock starts 6 s before midnight UTC. libfaketime cannot
    // be preloaded into redis-server (its allocator reads the clock while
    // libfaketime starts), so the clock pinned is the gateway's, deciding
    // on its in-process store: the line-by-line port of the script, which
    // the differential test holds to the script across day and month ends.
    let up = Upstream::start();
    let plans = PLANS
        .replace(
            r#"{ name = "free-daily", quota = 1000, period = "day" }"#,
            r#"{ name = "free-daily", quota = 3, period = "day" }"#,
        )
        .replace(
            "rate = 1, per = \"60s\", burst = 3",
            "rate = 100, per = \"1s\", burst = 100",
        );
    let setup = Setup {
        redis: None,
        upstream: &up.url(),
        prefix: "",
        rules: "",
        extra: &plans,
    };
    let (port, admin) = (free_port(), free_port());
    let gw = Gateway::start_config(
        port,
        admin,
        Gateway::config(port, admin, &setup),
        &[
            ("LD_PRELOAD", libfaketime()),
            ("FAKETIME", "@2030-03-31 23:59:54"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let mut to_midnight = u64::MAX;
    for left in (0..3).rev() {
        let r = get_key(&gw, "/", "k-day");
        assert_eq!(r.status, 200, "{}", r.body);
        let state = sf_list(r.header("ratelimit"));
        assert_eq!(
            param(&state, "free-daily", "r"),
            Some(left.to_string().as_str())
        );
        let t: u64 = param(&state, "free-daily", "t").unwrap().parse().unwrap();
        assert!((1..=6).contains(&t), "t = seconds to midnight: {t}");
        assert!(t <= to_midnight, "t grew: {t}");
        to_midnight = t;
    }
    let r = get_key(&gw, "/", "k-day");
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(
        r.json()["violated-policies"],
        serde_json::json!(["free-daily"])
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=to_midnight).contains(&retry),
        "Retry-After {retry}, t was {to_midnight}"
    );
    let refused_at = Instant::now();
    // The next day starts at midnight UTC with a fresh quota.
    let mut r = get_key(&gw, "/", "k-day");
    while r.status == 429 && refused_at.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(50));
        r = get_key(&gw, "/", "k-day");
    }
    assert_eq!(r.status, 200, "{}", r.body);
    let waited = refused_at.elapsed();
    assert!(
        waited + Duration::from_millis(1100) >= Duration::from_secs(retry),
        "allowed after {waited:?}, before Retry-After {retry}s"
    );
    let state = sf_list(r.header("ratelimit"));
    assert_eq!(param(&state, "free-daily", "r"), Some("2"));
    let t: u64 = param(&state, "free-daily", "t").unwrap().parse().unwrap();
    assert!(t > 86_390, "a whole day to go: {t}");
}

/// A GET with the pro key that may take long and may fail (its node may be
/// killed): the status, or 0 when the exchange broke.
fn slow_get(url: String) -> thread::JoinHandle<u16> {
    thread::spawn(move || {
        match ureq::get(&url)
            .set(KEY, "k-static-pro")
            .timeout(Duration::from_secs(15))
            .call()
        {
            Ok(r) => {
                let _ = r.into_string();
                200
            }
            Err(ureq::Error::Status(s, _)) => s,
            Err(_) => 0,
        }
    })
}

fn in_flight(gw: &Gateway) -> u64 {
    let v = gw
        .admin("GET", "/admin/consumers/k-static-pro", None)
        .json();
    v["rules"][2]["in_flight"].as_u64().unwrap()
}

#[test]
fn concurrency_slots_are_shared_released_and_outlive_no_dead_node() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let p = prefix();
    let setup = Setup {
        redis: Some(redis.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: "",
        extra: PLANS,
    };
    let start = |setup: &Setup<'_>| {
        let (port, admin) = (free_port(), free_port());
        // Slow responses outlast the upstream timeout the harness sets.
        let config =
            Gateway::config(port, admin, setup).replace("timeout = \"2s\"", "timeout = \"10s\"");
        Gateway::start_config(port, admin, config, &[])
    };
    let (a, b) = (start(&setup), start(&setup));

    // Two slow requests, one through each node, take both slots; they last
    // longer than a lease, so their leases must be renewed.
    let began = Instant::now();
    let slow = [slow_get(a.url("/slow/2500")), slow_get(b.url("/slow/2500"))];
    wait_until("both slots taken", Duration::from_secs(2), || {
        in_flight(&a) == 2
    });
    let r = get_key(&b, "/", "k-static-pro");
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(
        r.json()["violated-policies"],
        serde_json::json!(["pro-inflight"])
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    let state = sf_list(r.header("ratelimit"));
    assert_eq!(names(&state), ["pro-inflight"]);
    assert_eq!(param(&state, "pro-inflight", "r"), Some("0"));
    assert_eq!(param(&state, "pro-inflight", "t"), None);
    thread::sleep(Duration::from_millis(1600).saturating_sub(began.elapsed()));
    assert_eq!(
        get_key(&a, "/", "k-static-pro").status,
        429,
        "a slot was lost although its request is still in flight"
    );
    for s in slow {
        assert_eq!(s.join().unwrap(), 200);
    }
    // Released before the responses ended, well before their leases would
    // end.
    assert_eq!(in_flight(&b), 0, "slots still held after their responses");
    assert_eq!(get_key(&a, "/", "k-static-pro").status, 200);

    // A client that goes away mid-download frees its slot.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", a.port)).unwrap();
    s.write_all(b"GET /bytes/200000000 HTTP/1.1\r\nHost: x\r\nX-Api-Key: k-static-pro\r\n\r\n")
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let _ = s.read(&mut buf).unwrap();
    wait_until("the download holds a slot", Duration::from_secs(1), || {
        in_flight(&b) == 1
    });
    drop(s);
    wait_until(
        "the slot comes back after the client left",
        Duration::from_millis(800),
        || in_flight(&b) == 0,
    );

    // A node killed while holding slots: they come back after their lease.
    let mut c = start(&setup);
    let doomed = [slow_get(c.url("/slow/8000")), slow_get(c.url("/slow/8000"))];
    wait_until("node c holds both slots", Duration::from_secs(2), || {
        in_flight(&a) == 2
    });
    c.kill9();
    let killed = Instant::now();
    assert_eq!(
        get_key(&a, "/", "k-static-pro").status,
        429,
        "the dead node's slots are still leased"
    );
    wait_until(
        "the dead node's slots expire",
        Duration::from_secs(3),
        || get_key(&a, "/", "k-static-pro").status == 200,
    );
    assert!(
        killed.elapsed() >= Duration::from_millis(300),
        "{:?}",
        killed.elapsed()
    );
    for d in doomed {
        assert_eq!(d.join().unwrap(), 0, "the killed node answered");
    }
}

/// One slot, leased for longer than the test: only a release frees it.
const ONE_SLOT: &str = r#"
[consumers]
key = "header:X-Api-Key"
keys = { "k-one" = "single" }

[plans.single]
rules = [{ name = "single-inflight", concurrency = 1, lease = "30s" }]
"#;

const ROUNDS: usize = 40;

#[test]
fn a_client_that_waits_for_each_answer_is_never_refused_for_being_in_flight() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let p = prefix();
    let setup = Setup {
        redis: Some(redis.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: "",
        extra: ONE_SLOT,
    };
    let (a, b) = (Gateway::start(&setup), Gateway::start(&setup));
    // Other clients keep both nodes busy, so that work queued on a worker
    // (as a release sent after the answer would be) is late.
    let stop = Arc::new(AtomicBool::new(false));
    let noise: Vec<_> = (0..6)
        .map(|i| {
            let (stop, url) = (stop.clone(), [&a, &b][i % 2].url("/bytes/20000"));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(r) = ureq::get(&url).call() {
                        let _ = r.into_string();
                    }
                }
            })
        })
        .collect();
    // A sized body, a stream without a length, no body at all, and a HEAD
    // (a length but no body), each through both nodes in turn: the next
    // request goes out the moment the last answer is complete.
    for round in 0..ROUNDS {
        for (method, path, want) in [
            ("GET", "/", 200),
            ("GET", "/bytes/100000", 200),
            ("GET", "/status/204", 204),
            ("HEAD", "/", 200),
        ] {
            let gw = [&a, &b][round % 2];
            let r = call(method, &gw.url(path), &[(KEY, "k-one")], None);
            assert_eq!(
                r.status, want,
                "{method} {path} in round {round}: {}",
                r.body
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for n in noise {
        n.join().unwrap();
    }
    // The slot really is one: a request in flight shuts out the next.
    let slow = {
        let url = a.url("/slow/1500");
        thread::spawn(move || call("GET", &url, &[(KEY, "k-one")], None).status)
    };
    wait_until(
        "the slow request holds the slot",
        Duration::from_secs(2),
        || {
            let v = b.admin("GET", "/admin/consumers/k-one", None).json();
            v["rules"][0]["in_flight"] == 1
        },
    );
    let r = call("GET", &b.url("/"), &[(KEY, "k-one")], None);
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(slow.join().unwrap(), 200);
    assert_eq!(
        call("GET", &b.url("/"), &[(KEY, "k-one")], None).status,
        200
    );
}

/// A free plan whose only rule is a day quota of 3 searches, a `[[rules]]`
/// rule keyed by the consumer header, and one static key.
const SEARCH_QUOTA: &str = r#"
[consumers]
key = "header:X-Api-Key"
default_plan = "free"
keys = { "k-known" = "free" }

[plans.free]
rules = [
  { name = "free-search", quota = 3, period = "day", match = { path_prefix = "/search" } },
]
"#;

/// Keys of this test's prefix in `redis`.
fn keys_of(redis: &RedisServer, prefix: &str) -> Vec<String> {
    let out = redis.cli(&["--scan", "--pattern", &format!("{prefix}*")]);
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn made_up_keys_get_the_default_plan_on_the_address_and_create_no_state() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let p = prefix();
    let gw = Gateway::start(&Setup {
        redis: Some(redis.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: PER_KEY,
        extra: SEARCH_QUOTA,
    });
    let ip = "198.51.100.77";
    let mut allowed = 0;
    for i in 0..1000 {
        let r = get(
            &gw.url("/search?q=x"),
            &[("X-Forwarded-For", ip), (KEY, &format!("rnd-{i}"))],
        );
        match r.status {
            200 => allowed += 1,
            429 => {}
            s => panic!("made-up key {i}: {s} {}", r.body),
        }
    }
    assert_eq!(
        allowed, 3,
        "made-up keys share the address's default-plan quota"
    );
    let subjects: Vec<String> = keys_of(&redis, &p)
        .into_iter()
        .filter(|k| k.contains('{'))
        .collect();
    assert_eq!(
        subjects,
        vec![format!("{p}{{ip:{ip}}}:b")],
        "one subject's state, the address's; none per made-up key"
    );
    // A known key is a consumer of its own.
    let r = get(
        &gw.url("/search"),
        &[("X-Forwarded-For", ip), (KEY, "k-known")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn unknown_keys_can_be_refused_with_401() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = Gateway::on(
        &redis,
        &up,
        "",
        &SEARCH_QUOTA.replace(
            "keys = { \"k-known\" = \"free\" }",
            "keys = { \"k-known\" = \"free\" }\nunknown_keys = \"reject\"",
        ),
    );
    let r = get_key(&gw, "/search", "rnd-1");
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.json()["error"], "unknown_key");
    assert_eq!(up.hits(), 0, "nothing was forwarded");
    assert_eq!(get_key(&gw, "/search", "k-known").status, 200);
    // Without a key the request is anonymous, as before.
    assert_eq!(get(&gw.url("/search"), &[]).status, 200);
}
