//! Repeat offenders: escalation, the per-node ban cache, bans across nodes,
//! the allowlist, the admin API and the audit log, against real Redis and
//! several gateway processes.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

const ONE_TOKEN_A_MINUTE: &str =
    "[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = 1\nper = \"60s\"\nburst = 1\n";

fn ban_section(after: u32, within: &str, duration: &str, factor: f64, max: &str) -> String {
    format!(
        "[ban]\nenabled = true\nafter = {after}\nwithin = \"{within}\"\nduration = \"{duration}\"\nfactor = {factor}\nmax_duration = \"{max}\"\nmemory = \"1h\"\nreconcile_interval = \"1h\"\n"
    )
}

fn start(redis: &RedisServer, up: &Upstream, extra: &str) -> Gateway {
    Gateway::on(redis, up, ONE_TOKEN_A_MINUTE, extra)
}

/// Sends requests as `ip` until one is banned; returns its Retry-After.
fn offend_until_banned(gw: &Gateway, ip: &str, most: usize) -> u64 {
    for _ in 0..most {
        let r = get_as(&gw.url("/"), ip);
        if r.status == 429 && r.json()["error"] == "banned" {
            return r.header("retry-after").unwrap().parse().unwrap();
        }
    }
    panic!("{ip} was not banned after {most} requests");
}

#[test]
fn bans_escalate_by_factor_up_to_the_cap() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &ban_section(3, "10s", "1s", 2.0, "3s"));
    let ip = "203.0.113.10";
    assert_eq!(get_as(&gw.url("/"), ip).status, 200);
    // Two refusals, then the third makes the first ban.
    for _ in 0..2 {
        assert_eq!(get_as(&gw.url("/"), ip).json()["error"], "rate_limited");
    }
    let r = get_as(&gw.url("/"), ip);
    assert_eq!(r.json()["error"], "banned");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(
        r.json()["type"],
        "https://iana.org/assignments/http-problem-types#abnormal-usage-detected"
    );
    assert_eq!(
        r.header("retry-after"),
        Some("1"),
        "first ban lasts duration"
    );
    let b = gw.admin("GET", &format!("/admin/bans/{ip}"), None).json();
    assert_eq!(b["strikes"], 1);
    assert_eq!(b["source"], "auto");
    assert_eq!(b["reason"], "rule per-ip");
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        offend_until_banned(&gw, ip, 3),
        2,
        "second ban lasts duration x factor"
    );
    thread::sleep(Duration::from_millis(2100));
    assert_eq!(
        offend_until_banned(&gw, ip, 3),
        3,
        "third ban is capped at max_duration"
    );
    let b = gw.admin("GET", &format!("/admin/bans/{ip}"), None).json();
    assert_eq!(b["strikes"], 3);
}

#[test]
fn violations_outside_the_window_do_not_add_up() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &ban_section(3, "400ms", "1m", 2.0, "1h"));
    let ip = "203.0.113.11";
    assert_eq!(get_as(&gw.url("/"), ip).status, 200);
    for _ in 0..2 {
        assert_eq!(get_as(&gw.url("/"), ip).json()["error"], "rate_limited");
    }
    thread::sleep(Duration::from_millis(500));
    for _ in 0..2 {
        assert_eq!(
            get_as(&gw.url("/"), ip).json()["error"],
            "rate_limited",
            "old violations counted"
        );
    }
    assert_eq!(get_as(&gw.url("/"), ip).json()["error"], "banned");
}

#[test]
fn an_allowed_request_does_not_cut_the_violation_window_short() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let rules = "[[rules]]\nname = \"quick\"\nkey = \"ip\"\nrate = 1\nper = \"250ms\"\nburst = 1\n";
    let extra = ban_section(3, "10s", "1m", 2.0, "1h");
    let gw = Gateway::on(&redis, &up, rules, &extra);
    let ip = "203.0.113.13";
    assert_eq!(get_as(&gw.url("/"), ip).status, 200);
    assert_eq!(get_as(&gw.url("/"), ip).json()["error"], "rate_limited");
    assert_eq!(get_as(&gw.url("/"), ip).json()["error"], "rate_limited");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(get_as(&gw.url("/"), ip).status, 200);
    // Idle for longer than the bucket's own lifetime, inside `within`.
    thread::sleep(Duration::from_millis(1600));
    assert_eq!(get_as(&gw.url("/"), ip).status, 200);
    assert_eq!(
        get_as(&gw.url("/"), ip).json()["error"],
        "banned",
        "the third violation within 10 s bans"
    );
}

#[test]
fn a_full_global_bucket_bans_nobody() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let rules = "[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = 1\nper = \"60s\"\nburst = 100\n\n[[rules]]\nname = \"everyone\"\nkey = \"global\"\nrate = 1\nper = \"60s\"\nburst = 2\n";
    let extra = ban_section(2, "10s", "1m", 2.0, "1h");
    let gw = Gateway::on(&redis, &up, rules, &extra);
    let errors: Vec<String> = (0..8)
        .map(|_| {
            let r = get_as(&gw.url("/"), "203.0.113.14");
            if r.status == 200 {
                "allowed".to_string()
            } else {
                r.json()["error"].as_str().unwrap_or("").to_string()
            }
        })
        .collect();
    assert_eq!(&errors[..2], &["allowed", "allowed"]);
    assert!(
        errors[2..].iter().all(|e| e == "rate_limited"),
        "a shared bucket's refusals banned a client: {errors:?}"
    );
    // Its own bucket was refunded each time: 2 charged, not 8.
    let t = gw
        .admin("GET", "/admin/buckets/per-ip/203.0.113.14", None)
        .json()["tokens"]
        .as_f64()
        .unwrap();
    assert!((97.9..98.1).contains(&t), "{t}");
}

#[test]
fn a_banned_client_costs_no_redis_command_on_a_node_that_knows() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &ban_section(2, "10s", "1m", 2.0, "1h"));
    offend_until_banned(&gw, "203.0.113.12", 5);
    thread::sleep(Duration::from_millis(300));
    let before =
        redis.calls("evalsha") + redis.calls("eval") + redis.calls("hget") + redis.calls("hmget");
    for _ in 0..50 {
        let r = get_as(&gw.url("/"), "203.0.113.12");
        assert_eq!(r.json()["error"], "banned");
    }
    let after =
        redis.calls("evalsha") + redis.calls("eval") + redis.calls("hget") + redis.calls("hmget");
    assert_eq!(after, before, "banned requests reached Redis");
    assert!(gw.requests_metric("-", "banned") >= 50);
}

fn wait_status(gw: &Gateway, ip: &str, want: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let r = get_as(&gw.url("/"), ip);
        let got = if r.status == 200 {
            "allowed"
        } else {
            r.json()["error"].as_str().unwrap_or("").to_string().leak()
        };
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{ip} still {got} after {limit:?} (wanted {want})"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bans_and_unbans_reach_every_node_within_a_second() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let p = prefix();
    let rules =
        "[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = 1000\nper = \"1s\"\nburst = 1000\n";
    let extra = ban_section(2, "10s", "1m", 2.0, "1h");
    let setup = Setup {
        redis: Some(redis.url()),
        upstream: &up.url(),
        prefix: &p,
        rules,
        extra: &extra,
    };
    let (a, b, c) = (
        Gateway::start(&setup),
        Gateway::start(&setup),
        Gateway::start(&setup),
    );
    let ip = "198.51.100.20";
    for g in [&b, &c] {
        assert_eq!(get_as(&g.url("/"), ip).status, 200);
    }
    let r = a.admin(
        "POST",
        "/admin/bans",
        Some(&format!(
            "{{\"subject\":\"{ip}\",\"duration\":\"10m\",\"reason\":\"abuse\"}}"
        )),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    for g in [&b, &c] {
        wait_status(g, ip, "banned", Duration::from_secs(1));
    }
    assert_eq!(
        a.admin("DELETE", &format!("/admin/bans/{ip}"), None).status,
        204
    );
    for g in [&b, &c] {
        wait_status(g, ip, "allowed", Duration::from_secs(1));
    }
    // A node that starts later learns existing bans from Redis.
    a.admin(
        "POST",
        "/admin/bans",
        Some("{\"subject\":\"198.51.100.21\",\"duration\":\"10m\"}"),
    );
    let d = Gateway::start(&setup);
    assert_eq!(
        get_as(&d.url("/"), "198.51.100.21").json()["error"],
        "banned"
    );
}

#[test]
fn an_automatic_ban_on_one_node_reaches_the_others() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let p = prefix();
    let extra = ban_section(2, "10s", "1m", 2.0, "1h");
    let setup = Setup {
        redis: Some(redis.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: ONE_TOKEN_A_MINUTE,
        extra: &extra,
    };
    let (a, b) = (Gateway::start(&setup), Gateway::start(&setup));
    offend_until_banned(&a, "198.51.100.30", 5);
    thread::sleep(Duration::from_millis(300));
    let before = redis.calls("evalsha");
    assert_eq!(
        get_as(&b.url("/"), "198.51.100.30").json()["error"],
        "banned"
    );
    assert_eq!(
        redis.calls("evalsha"),
        before,
        "node B learnt the ban by pub/sub, not by asking"
    );
}

#[test]
fn a_restarted_node_still_refuses_a_banned_client() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let mut gw = start(&redis, &up, &ban_section(2, "10s", "1m", 2.0, "1h"));
    offend_until_banned(&gw, "198.51.100.40", 5);
    gw.restart();
    let r = get_as(&gw.url("/"), "198.51.100.40");
    assert_eq!(r.json()["error"], "banned");
    let left: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((55..=60).contains(&left), "{left}");
}

#[test]
fn cidr_bans_and_allowlists_interplay() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let extra = ban_section(2, "10s", "1m", 2.0, "1h") + "allowlist = [\"192.0.2.0/24\"]\n";
    let gw = start(&redis, &up, &extra);
    // Config allowlist: never limited, never banned.
    for _ in 0..10 {
        assert_eq!(get_as(&gw.url("/"), "192.0.2.5").status, 200);
    }
    let r = gw.admin(
        "POST",
        "/admin/bans",
        Some("{\"subject\":\"192.0.2.5\",\"duration\":\"1m\"}"),
    );
    assert_eq!(
        r.status, 409,
        "an allowlisted address cannot be banned: {}",
        r.body
    );
    let r = gw.admin(
        "POST",
        "/admin/bans",
        Some("{\"subject\":\"192.0.2.0/25\",\"duration\":\"1m\"}"),
    );
    assert_eq!(
        r.status, 409,
        "nor a network inside the allowlist: {}",
        r.body
    );
    // A CIDR ban covers its network only.
    let r = gw.admin(
        "POST",
        "/admin/bans",
        Some("{\"subject\":\"203.0.113.0/24\",\"duration\":\"10m\",\"reason\":\"scanner\"}"),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["subject"], "203.0.113.0/24");
    assert_eq!(
        get_as(&gw.url("/"), "203.0.113.5").json()["error"],
        "banned"
    );
    assert_eq!(get_as(&gw.url("/"), "203.0.114.5").status, 200);
    gw.admin(
        "POST",
        "/admin/bans",
        Some("{\"subject\":\"198.51.100.7\",\"duration\":\"10m\"}"),
    );
    let list = gw.admin("GET", "/admin/bans", None).json();
    let subjects: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["subject"].as_str().unwrap())
        .collect();
    assert_eq!(subjects, vec!["198.51.100.7", "203.0.113.0/24"]);
    // A runtime allowlist entry lifts the bans inside it; the wider CIDR
    // ban stays but no longer applies to the allowlisted part.
    let r = gw.admin(
        "POST",
        "/admin/allowlist",
        Some("{\"cidr\":\"198.51.100.0/24\"}"),
    );
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["lifted"], serde_json::json!(["198.51.100.7"]));
    let r = gw.admin(
        "POST",
        "/admin/allowlist",
        Some("{\"cidr\":\"203.0.113.0/25\"}"),
    );
    assert_eq!(r.status, 201);
    assert_eq!(get_as(&gw.url("/"), "203.0.113.5").status, 200);
    assert_eq!(
        get_as(&gw.url("/"), "203.0.113.200").json()["error"],
        "banned"
    );
    let allow = gw.admin("GET", "/admin/allowlist", None).json();
    assert_eq!(allow["config"], serde_json::json!(["192.0.2.0/24"]));
    assert_eq!(
        allow["runtime"],
        serde_json::json!(["198.51.100.0/24", "203.0.113.0/25"])
    );
    assert_eq!(
        gw.admin("DELETE", "/admin/allowlist/203.0.113.0%2F25", None)
            .status,
        204
    );
    assert_eq!(
        gw.admin("DELETE", "/admin/allowlist/203.0.113.0%2F25", None)
            .status,
        404
    );
    assert_eq!(
        get_as(&gw.url("/"), "203.0.113.5").json()["error"],
        "banned"
    );
    assert_eq!(
        gw.admin("DELETE", "/admin/bans/203.0.113.0%2F24", None)
            .status,
        204
    );
    assert_eq!(get_as(&gw.url("/"), "203.0.113.5").status, 200);
    // Everything is in Redis: a new node sees the same allowlist.
    drop(gw);
}

#[test]
fn admin_calls_need_the_token_and_valid_input() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &ban_section(2, "10s", "1m", 2.0, "1h"));
    let endpoints = [
        ("GET", "/admin/bans", None),
        ("GET", "/admin/bans/1.2.3.4", None),
        (
            "POST",
            "/admin/bans",
            Some("{\"subject\":\"1.2.3.4\",\"duration\":\"1m\"}"),
        ),
        ("DELETE", "/admin/bans/1.2.3.4", None),
        ("GET", "/admin/allowlist", None),
        (
            "POST",
            "/admin/allowlist",
            Some("{\"cidr\":\"10.0.0.0/8\"}"),
        ),
        ("DELETE", "/admin/allowlist/10.0.0.0%2F8", None),
        ("GET", "/admin/buckets/per-ip/1.2.3.4", None),
        ("GET", "/admin/audit?count=5", None),
    ];
    for (method, path, body) in endpoints {
        let url = gw.admin_url(path);
        let r = call(method, &url, &[], body);
        assert_eq!(r.status, 401, "{method} {path} without a token");
        let r = call(method, &url, &[("Authorization", "Bearer wrong")], body);
        assert_eq!(r.status, 401, "{method} {path} with a wrong token");
        let r = call(
            method,
            &url,
            &[("Authorization", &format!("Bearer {ADMIN_TOKEN}x"))],
            body,
        );
        assert_eq!(r.status, 401, "{method} {path} with a longer token");
    }
    // Nothing above changed anything.
    assert_eq!(
        gw.admin("GET", "/admin/bans", None).json(),
        serde_json::json!([])
    );
    assert_eq!(
        gw.admin("GET", "/admin/audit", None).json(),
        serde_json::json!([])
    );

    for (body, word) in [
        ("{not json", "invalid JSON"),
        ("{\"subject\":\"1.2.3.4\"}", "duration"),
        (
            "{\"subject\":\"1.2.3.4\",\"duration\":\"1m\",\"extra\":1}",
            "extra",
        ),
        (
            "{\"subject\":\"1.2.3.999\",\"duration\":\"1m\"}",
            "1.2.3.999",
        ),
        ("{\"subject\":\"1.2.3.4\",\"duration\":\"soon\"}", "soon"),
        (
            "{\"subject\":\"1.2.3.4\",\"duration\":\"0s\"}",
            "more than 0",
        ),
        ("[]", "invalid JSON"),
    ] {
        let r = gw.admin("POST", "/admin/bans", Some(body));
        assert_eq!(r.status, 400, "{body}");
        assert!(
            r.json()["message"].as_str().unwrap().contains(word),
            "{body}: {}",
            r.body
        );
    }
    let r = gw.admin(
        "POST",
        "/admin/allowlist",
        Some("{\"cidr\":\"10.0.0.0/64\"}"),
    );
    assert_eq!(r.status, 400);
    assert_eq!(gw.admin("GET", "/admin/bans/not-an-ip", None).status, 400);
    assert_eq!(
        gw.admin("DELETE", "/admin/bans/not-an-ip", None).status,
        400
    );
    assert_eq!(gw.admin("GET", "/admin/bans/1.2.3.4", None).status, 404);
    assert_eq!(gw.admin("DELETE", "/admin/bans/1.2.3.4", None).status, 404);
    assert_eq!(
        gw.admin("GET", "/admin/buckets/no-such-rule/1.2.3.4", None)
            .status,
        404
    );
    assert_eq!(
        gw.admin("GET", "/admin/buckets/per-ip/nope", None).status,
        400
    );
    assert_eq!(gw.admin("GET", "/admin/audit?count=zero", None).status, 400);
    let huge = format!(
        "{{\"subject\":\"1.2.3.4\",\"duration\":\"1m\",\"reason\":\"{}\"}}",
        "x".repeat(20_000)
    );
    assert_eq!(gw.admin("POST", "/admin/bans", Some(&huge)).status, 413);
    assert_eq!(
        gw.admin("GET", "/admin/bans", None).json(),
        serde_json::json!([]),
        "bad input changed nothing"
    );

    // Percent-encoded CIDR subjects, and a ban's full shape.
    let r = gw.admin(
        "POST",
        "/admin/bans",
        Some("{\"subject\":\"2001:db8:5::/48\",\"duration\":\"90s\",\"reason\":\"ops\"}"),
    );
    assert_eq!(r.status, 201);
    let b = gw
        .admin("GET", "/admin/bans/2001:db8:5::%2F48", None)
        .json();
    assert_eq!(b["subject"], "2001:db8:5::/48");
    assert_eq!(b["reason"], "ops");
    assert_eq!(b["source"], "manual");
    assert!(b["remaining"].as_u64().unwrap() <= 90 && b["remaining"].as_u64().unwrap() >= 88);
    assert!(
        humantime::parse_rfc3339(b["until"].as_str().unwrap()).is_ok(),
        "until is RFC 3339"
    );
    assert_eq!(
        gw.admin("DELETE", "/admin/bans/2001:db8:5::%2F48", None)
            .status,
        204
    );
}

#[test]
fn admin_without_a_configured_token_answers_503_saying_how() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let p = prefix();
    let setup = Setup {
        redis: Some(redis.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: ONE_TOKEN_A_MINUTE,
        extra: "",
    };
    let (port, admin) = (free_port(), free_port());
    let config = Gateway::config(port, admin, &setup).replace(
        "[server]\n",
        "[server]\nadmin_token_env = \"FLOODGATE_TEST_UNSET_TOKEN\"\n",
    );
    let gw = Gateway::start_config(port, admin, config, &[]);
    let r = get(
        &gw.admin_url("/admin/bans"),
        &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
    );
    assert_eq!(r.status, 503);
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("FLOODGATE_TEST_UNSET_TOKEN"));
    assert_eq!(get(&gw.admin_url("/healthz"), &[]).status, 200);
}

#[test]
fn audit_log_keeps_every_ban_and_unban_in_order() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &ban_section(2, "10s", "1m", 2.0, "1h"));
    gw.admin(
        "POST",
        "/admin/bans",
        Some("{\"subject\":\"198.51.100.1\",\"duration\":\"5m\",\"reason\":\"first\"}"),
    );
    gw.admin(
        "POST",
        "/admin/bans",
        Some("{\"subject\":\"198.51.100.0/28\",\"duration\":\"1m\",\"reason\":\"second\"}"),
    );
    gw.admin("DELETE", "/admin/bans/198.51.100.1", None);
    offend_until_banned(&gw, "203.0.113.50", 5);
    let events = wait_for_audit(&gw, 4);
    let summary: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().into(),
                e["subject"].as_str().unwrap().into(),
                e["source"].as_str().unwrap().into(),
            )
        })
        .collect();
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        summary,
        vec![
            s("ban", "203.0.113.50", "auto"),
            s("unban", "198.51.100.1", "manual"),
            s("ban", "198.51.100.0/28", "manual"),
            s("ban", "198.51.100.1", "manual")
        ],
        "newest first"
    );
    assert_eq!(events[3]["reason"], "first");
    assert_eq!(events[3]["duration_ms"], 300_000);
    assert_eq!(events[0]["strikes"], 1);
    assert!(!events[0]["node"].as_str().unwrap().is_empty());
    assert_eq!(
        gw.admin("GET", "/admin/audit?count=2", None)
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // The stream lives in Redis: it survives the gateway.
    assert_eq!(
        redis
            .cli(&["XLEN", &format!("{}audit", gw_prefix(&gw))])
            .trim(),
        "4"
    );
}

fn gw_prefix(gw: &Gateway) -> String {
    let cfg = std::fs::read_to_string(gw.log_path().with_file_name("floodgate.toml")).unwrap();
    cfg.lines()
        .find_map(|l| l.strip_prefix("key_prefix = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string()
}

fn wait_for_audit(gw: &Gateway, n: usize) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        let events = gw
            .admin("GET", "/admin/audit?count=10", None)
            .json()
            .as_array()
            .unwrap()
            .clone();
        if events.len() >= n || start.elapsed() > Duration::from_secs(3) {
            return events;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_are_labelled_by_rule_and_decision() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &ban_section(2, "10s", "1m", 2.0, "1h"));
    offend_until_banned(&gw, "203.0.113.60", 5);
    get_as(&gw.url("/"), "203.0.113.60");
    assert_eq!(gw.requests_metric("per-ip", "allowed"), 1);
    assert_eq!(gw.requests_metric("per-ip", "limited"), 1);
    assert_eq!(gw.requests_metric("-", "banned"), 2);
    let text = get(&gw.admin_url("/metrics"), &[]).body;
    for name in [
        "floodgate_redis_seconds_bucket",
        "floodgate_upstream_seconds_bucket",
        "floodgate_bans_active 1",
        "floodgate_degraded 0",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}
