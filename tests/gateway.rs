//! The gateway core against real processes: token-bucket answers, atomicity,
//! a global limit across nodes, forwarding fidelity, client identity, NOSCRIPT
//! recovery, configuration errors and shutdown.

mod common;

use std::io::Read;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn rule(name: &str, key: &str, rate: u32, per: &str, burst: u32, cost: u32) -> String {
    format!("[[rules]]\nname = \"{name}\"\nkey = \"{key}\"\nrate = {rate}\nper = \"{per}\"\nburst = {burst}\ncost = {cost}\n")
}

fn start(redis: &RedisServer, up: &Upstream, rules: &str) -> Gateway {
    Gateway::on(redis, up, rules, "")
}

#[test]
fn allowed_then_limited_with_headers_and_retry_after() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &rule("per-ip", "ip", 1, "10s", 5, 1));
    for left in (0..5).rev() {
        let r = get(&gw.url("/a"), &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-upstream"), Some("yes"));
        assert_eq!(
            r.header("ratelimit-remaining"),
            Some(left.to_string().as_str())
        );
        assert_eq!(r.header("ratelimit-limit"), Some("5"));
        assert_eq!(r.header("ratelimit-policy"), Some("\"per-ip\";q=5;w=50"));
    }
    let r = get(&gw.url("/a"), &[]);
    assert_eq!(r.status, 429);
    // Five charges of 10 s each: the next token comes 10 s after the first.
    assert_eq!(r.header("retry-after"), Some("10"));
    assert_eq!(r.header("ratelimit"), Some("\"per-ip\";r=0;t=50"));
    // RFC 9457 problem details, keeping the gateway's own fields.
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let body = r.json();
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(body["status"], 429);
    assert_eq!(body["violated-policies"], serde_json::json!(["per-ip"]));
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["rule"], "per-ip");
    assert_eq!(body["retry_after"], 10);
    assert_eq!(up.hits(), 5, "a limited request is never forwarded");
}

#[test]
fn limited_request_charges_no_bucket_across_rules() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let rules = format!(
        "{}{}",
        rule("wide", "ip", 1, "60s", 10, 1),
        rule("narrow", "ip", 1, "60s", 3, 1)
    );
    let gw = start(&redis, &up, &rules);
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/"), &[]).status, 200);
    }
    for _ in 0..5 {
        let r = get(&gw.url("/"), &[]);
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["rule"], "narrow");
    }
    let wide = gw
        .admin("GET", "/admin/buckets/wide/127.0.0.1", None)
        .json();
    let tokens = wide["tokens"].as_f64().unwrap();
    assert!(
        (7.0..7.1).contains(&tokens),
        "refused requests charged the wide bucket: {tokens}"
    );
    // The most restrictive rule's numbers are the ones shown.
    let narrow = gw
        .admin("GET", "/admin/buckets/narrow/127.0.0.1", None)
        .json();
    assert!(narrow["tokens"].as_f64().unwrap() < 0.1);
}

#[test]
fn cost_above_one_takes_several_tokens() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &rule("heavy", "ip", 1, "60s", 5, 2));
    assert_eq!(
        get(&gw.url("/"), &[]).header("ratelimit-remaining"),
        Some("3")
    );
    assert_eq!(
        get(&gw.url("/"), &[]).header("ratelimit-remaining"),
        Some("1")
    );
    let r = get(&gw.url("/"), &[]);
    assert_eq!(r.status, 429, "one token left cannot pay a cost of two");
    assert_eq!(r.header("ratelimit-remaining"), Some("1"));
}

#[test]
fn sub_second_period_refills_continuously() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &rule("fast", "ip", 1, "250ms", 1, 1));
    assert_eq!(get(&gw.url("/"), &[]).status, 200);
    let r = get(&gw.url("/"), &[]);
    assert_eq!(r.status, 429);
    assert_eq!(
        r.header("retry-after"),
        Some("1"),
        "sub-second waits round up to 1"
    );
    thread::sleep(Duration::from_millis(120));
    let t = gw
        .admin("GET", "/admin/buckets/fast/127.0.0.1", None)
        .json()["tokens"]
        .as_f64()
        .unwrap();
    assert!(
        t > 0.3 && t < 0.9,
        "tokens refill continuously, not in steps: {t}"
    );
    thread::sleep(Duration::from_millis(200));
    assert_eq!(get(&gw.url("/"), &[]).status, 200);
}

/// Hammers every gateway from its own thread for `run`; returns (allowed,
/// seconds between the first request and the last answer).
fn hammer(gws: &[&Gateway], run: Duration, ip: &str) -> (u64, f64) {
    let allowed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = gws
        .iter()
        .map(|g| {
            let (url, allowed, ip) = (g.url("/"), allowed.clone(), ip.to_string());
            thread::spawn(move || {
                while start.elapsed() < run {
                    let r = get_as(&url, &ip);
                    assert!(
                        r.status == 200 || r.status == 429,
                        "status {}: {}",
                        r.status,
                        r.body
                    );
                    if r.status == 200 {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    (
        allowed.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
    )
}

#[test]
fn three_gateways_keep_one_global_limit_even_with_a_skewed_clock() {
    // libfaketime preloaded into the gateway itself.
    let libfaketime = libfaketime();
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let p = prefix();
    let rules = rule("per-ip", "ip", 50, "1s", 20, 1);
    let setup = Setup {
        redis: Some(redis.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: &rules,
        extra: "",
    };
    let a = Gateway::start(&setup);
    let b = Gateway::start(&setup);
    // The third node's clock is two hours behind (libfaketime); decisions
    // use Redis' clock, so it must agree with the others.
    let (port, admin) = (free_port(), free_port());
    let c = Gateway::start_config(
        port,
        admin,
        Gateway::config(port, admin, &setup),
        &[
            ("LD_PRELOAD", libfaketime),
            ("FAKETIME", "-7200"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let log = c.log();
    let stamp = log
        .lines()
        .next()
        .and_then(|l| l.get(1..20))
        .unwrap_or("")
        .to_string();
    let skewed = std::time::SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            humantime::parse_rfc3339(&format!("{stamp}Z"))
                .unwrap()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        );
    let behind = std::time::SystemTime::now()
        .duration_since(skewed)
        .unwrap_or_default();
    assert!(
        behind > Duration::from_secs(3500),
        "the third gateway's clock is not skewed: {stamp}"
    );

    let (allowed, secs) = hammer(&[&a, &b, &c], Duration::from_secs(3), "198.51.100.7");
    let bound = 20.0 + 50.0 * secs + 1.0;
    assert!(
        (allowed as f64) <= bound,
        "allowed {allowed} > bound {bound:.1} over {secs:.2}s"
    );
    assert!(
        (allowed as f64) >= 0.95 * (bound - 1.0),
        "allowed {allowed} < 95% of {bound:.1} over {secs:.2}s"
    );
}

#[test]
fn forwarding_keeps_methods_queries_headers_and_statuses() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &rule("per-ip", "ip", 100, "1s", 100, 1));
    for method in ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let body = if method == "POST" || method == "PUT" {
            Some("{\"k\":1}")
        } else {
            None
        };
        let r = call(
            method,
            &gw.url("/echo/x?a=1&b=two&a=3"),
            &[("X-Custom", "v")],
            body,
        );
        assert_eq!(r.status, 200, "{method}: {}", r.body);
        let j = r.json();
        assert_eq!(j["method"], method);
        assert_eq!(j["path"], "/echo/x");
        assert_eq!(j["query"], "a=1&b=two&a=3");
        assert_eq!(j["body_len"], if body.is_some() { 7 } else { 0 });
    }
    // Hop-by-hop headers and those named in Connection.
    let mut req = ureq::get(&gw.url("/echo"));
    for (k, v) in [
        ("Connection", "x-drop-me"),
        ("X-Drop-Me", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "secret"),
        ("X-Forwarded-For", "203.0.113.9"),
    ] {
        req = req.set(k, v);
    }
    let resp = req.call().unwrap();
    let cookies: Vec<String> = resp
        .all("set-cookie")
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        cookies,
        vec!["a=1", "b=2"],
        "repeated response headers pass"
    );
    let mut text = String::new();
    resp.into_reader().read_to_string(&mut text).unwrap();
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    let headers: Vec<(String, String)> = serde_json::from_value(j["headers"].clone()).unwrap();
    let get_all = |n: &str| {
        headers
            .iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert!(
        get_all("x-drop-me").is_empty(),
        "a header named in Connection is dropped"
    );
    assert!(get_all("keep-alive").is_empty());
    assert!(get_all("proxy-authorization").is_empty());
    assert_eq!(
        get_all("x-forwarded-for"),
        vec!["203.0.113.9, 127.0.0.1"],
        "trusted peer: appended"
    );
    assert_eq!(get_all("x-forwarded-proto"), vec!["http"]);
    assert_eq!(
        get_all("x-forwarded-host"),
        vec![format!("127.0.0.1:{}", gw.port)]
    );
    for code in [201u16, 204, 301, 404, 500, 503] {
        let r = get(&gw.url(&format!("/status/{code}")), &[]);
        assert_eq!(r.status, code);
        assert!(r.header("ratelimit-remaining").is_some());
    }
}

#[test]
fn hop_by_hop_response_headers_are_dropped() {
    let redis = RedisServer::start();
    let port = canned_upstream(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\nok",
    );
    let p = prefix();
    let rules = rule("per-ip", "ip", 100, "1s", 100, 1);
    let up = format!("http://127.0.0.1:{port}");
    let gw = Gateway::start(&Setup {
        redis: Some(redis.url()),
        upstream: &up,
        prefix: &p,
        rules: &rules,
        extra: "",
    });
    let r = get(&gw.url("/"), &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "ok");
    assert_eq!(r.header("x-kept"), Some("yes"));
    assert!(
        r.header("x-hop").is_none(),
        "a header named in the upstream's Connection is dropped"
    );
    assert!(r.header("keep-alive").is_none());
}

#[test]
fn repeated_request_headers_all_reach_the_upstream() {
    use std::io::Write;
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &rule("per-ip", "ip", 100, "1s", 100, 1));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    write!(s, "GET /echo HTTP/1.1\r\nHost: x\r\nX-Multi: one\r\nX-Multi: two\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains("[\"x-multi\",\"one\"]") && out.contains("[\"x-multi\",\"two\"]"),
        "{out}"
    );
}

#[test]
fn fifty_megabytes_stream_both_ways_in_small_memory() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &rule("per-ip", "ip", 100, "1s", 100, 1));
    let before = gw.peak_rss_kib();
    let size: usize = 50 * 1024 * 1024;
    let reader = std::io::repeat(b'u').take(size as u64);
    let r = ureq::post(&gw.url("/upload"))
        .set("Content-Length", &size.to_string())
        .send(reader)
        .unwrap();
    let j: serde_json::Value = r.into_json().unwrap();
    assert_eq!(j["received"], size);
    let r = ureq::get(&gw.url(&format!("/bytes/{size}")))
        .call()
        .unwrap();
    let mut n = 0usize;
    let mut reader = r.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let k = reader.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        n += k;
    }
    assert_eq!(n, size);
    let grown = gw.peak_rss_kib().saturating_sub(before);
    assert!(
        grown < 20 * 1024,
        "peak memory grew by {grown} KiB moving 2 x 50 MiB"
    );
}

#[test]
fn untrusted_peer_cannot_choose_its_identity() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let p = prefix();
    let rules = rule("per-ip", "ip", 1, "60s", 3, 1);
    let extra = "";
    let setup = Setup {
        redis: Some(redis.url()),
        upstream: &up.url(),
        prefix: &p,
        rules: &rules,
        extra,
    };
    let (port, admin) = (free_port(), free_port());
    let config = Gateway::config(port, admin, &setup)
        + "\n[client_ip]\ntrusted_proxies = [\"10.9.9.9/32\"]\n";
    let gw = Gateway::start_config(port, admin, config, &[]);
    for i in 0..3 {
        assert_eq!(get_as(&gw.url("/"), &format!("203.0.113.{i}")).status, 200);
    }
    assert_eq!(
        get_as(&gw.url("/"), "203.0.113.99").status,
        429,
        "XFF from an untrusted peer must not change the identity"
    );
    assert_eq!(get(&gw.url("/"), &[]).status, 429);
}

#[test]
fn malformed_forwarded_for_never_causes_a_5xx() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &rule("per-ip", "ip", 1000, "1s", 1000, 1));
    let long = "1.".repeat(3000);
    for bad in [
        "",
        "garbage",
        "1.2.3.4, ,",
        "[::1",
        "999.1.1.1",
        ",,,,",
        "1.2.3.4:99999",
        "unknown, 10.0.0.1",
        long.as_str(),
        "\u{1}\u{7f}",
        "\u{ff}\u{fe}",
    ] {
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {bad}\r\nX-Forwarded-For: 1.2.3.4\r\nConnection: close\r\n\r\n");
        let status = raw_status(&raw_request(gw.port, req.as_bytes()));
        assert!(
            status > 0 && status < 500,
            "X-Forwarded-For {bad:?} gave {status}"
        );
    }
}

#[test]
fn ipv6_clients_are_grouped_per_64() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &rule("per-ip", "ip", 1, "60s", 2, 1));
    assert_eq!(get_as(&gw.url("/"), "2001:db8:1:2::1").status, 200);
    assert_eq!(get_as(&gw.url("/"), "2001:db8:1:2:ffff::9").status, 200);
    assert_eq!(
        get_as(&gw.url("/"), "2001:db8:1:2::77").status,
        429,
        "same /64 shares a bucket"
    );
    assert_eq!(
        get_as(&gw.url("/"), "2001:db8:1:3::1").status,
        200,
        "another /64 has its own"
    );
    let t = gw
        .admin("GET", "/admin/buckets/per-ip/2001:db8:1:2::5", None)
        .json();
    assert!(t["tokens"].as_f64().unwrap() < 0.1);
}

#[test]
fn header_and_global_keys_and_shadow_rules() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let rules = format!(
        "{}{}[[rules]]\nname = \"watch\"\nkey = \"ip\"\nrate = 1\nper = \"60s\"\nburst = 1\nshadow = true\n",
        rule("per-key", "header:X-Api-Key", 1, "60s", 2, 1),
        rule("everyone", "global", 1, "60s", 6, 1)
    );
    let gw = start(&redis, &up, &rules);
    // Two keys, each with its own bucket of 2; no key: only the global rule.
    for key in ["alpha", "beta"] {
        assert_eq!(get(&gw.url("/"), &[("X-Api-Key", key)]).status, 200);
        assert_eq!(get(&gw.url("/"), &[("X-Api-Key", key)]).status, 200);
        let r = get(&gw.url("/"), &[("X-Api-Key", key)]);
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["rule"], "per-key");
    }
    assert_eq!(get(&gw.url("/"), &[]).status, 200);
    assert_eq!(get(&gw.url("/"), &[]).status, 200);
    // Global bucket: 4 + 2 used; refusals by per-key charged nothing.
    let r = get(&gw.url("/"), &[]);
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["rule"], "everyone");
    // The shadow rule would have refused all but the first request.
    assert!(gw.requests_metric("watch", "shadow_limited") >= 5);
    assert_eq!(
        gw.requests_metric("watch", "allowed"),
        1,
        "a shadow refusal is not also counted as allowed"
    );
    assert!(gw.log().contains("shadow rule watch would limit"));
    // A key header too long to be a key is a client error, not a 5xx.
    let long = "k".repeat(300);
    assert_eq!(get(&gw.url("/"), &[("X-Api-Key", &long)]).status, 400);
}

#[test]
fn script_flush_mid_run_costs_no_request() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &rule("per-ip", "ip", 100000, "1s", 100000, 1));
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4u32)
        .map(|w| {
            let (url, stop, bad, ok) = (gw.url("/"), stop.clone(), bad.clone(), ok.clone());
            thread::spawn(move || {
                // A new client each time: every request is a script call
                // (a subject seen before would be admitted from a lease).
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let ip = format!("10.{w}.{}.{}", (n >> 8) & 255, n & 255);
                    if get_as(&url, &ip).status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for _ in 0..10 {
        thread::sleep(Duration::from_millis(100));
        assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "requests failed after SCRIPT FLUSH"
    );
    assert!(ok.load(Ordering::Relaxed) > 50);
    assert!(gw.log().contains("NOSCRIPT"));
    assert!(
        redis.calls("eval") >= 10,
        "the script body was re-sent after each flush"
    );
    // Every decision was Redis's: none fell back to the local store (whose
    // huge bucket would have hidden a failure), and no call failed.
    assert_eq!(gw.decisions("local"), 0, "a decision fell back");
    assert_eq!(gw.metric("floodgate_redis_errors_total"), 0.0);
    assert!(gw.decisions("redis") >= ok.load(Ordering::Relaxed));
}

#[test]
fn upstream_down_is_502_and_too_slow_is_504() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let p = prefix();
    let rules = rule("per-ip", "ip", 100, "1s", 100, 1);
    let gw = Gateway::start(&Setup {
        redis: Some(redis.url()),
        upstream: &dead,
        prefix: &p,
        rules: &rules,
        extra: "",
    });
    let r = get(&gw.url("/"), &[]);
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"], "upstream_unreachable");
    let gw2 = start(&redis, &up, &rules);
    let started = Instant::now();
    let r = get(&gw2.url("/slow/5000"), &[]);
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"], "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[test]
fn several_upstreams_are_used_in_turn() {
    let redis = RedisServer::start();
    let (a, b) = (Upstream::start(), Upstream::start());
    let p = prefix();
    let rules = rule("per-ip", "ip", 100, "1s", 100, 1);
    let urls = format!("{}\", \"{}", a.url(), b.url());
    let gw = Gateway::start(&Setup {
        redis: Some(redis.url()),
        upstream: &urls,
        prefix: &p,
        rules: &rules,
        extra: "",
    });
    for _ in 0..10 {
        assert_eq!(get(&gw.url("/"), &[]).status, 200);
    }
    assert_eq!(a.hits() + b.hits(), 10);
    assert!(
        a.hits() >= 4 && b.hits() >= 4,
        "{} / {}",
        a.hits(),
        b.hits()
    );
}

#[test]
fn sigterm_finishes_requests_in_flight_and_exits_zero() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let mut gw = start(&redis, &up, &rule("per-ip", "ip", 100, "1s", 100, 1));
    let url = gw.url("/slow/1000");
    let slow = thread::spawn(move || get(&url, &[]).status);
    thread::sleep(Duration::from_millis(300));
    let code = gw.terminate(Duration::from_secs(8));
    assert_eq!(slow.join().unwrap(), 200, "the request in flight was cut");
    assert_eq!(code, Some(0));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", gw.port)).is_err(),
        "still accepting after exit"
    );
}

#[test]
fn admin_api_is_never_on_the_public_listener() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &rule("per-ip", "ip", 100, "1s", 100, 1));
    let r = get(
        &gw.url("/admin/bans"),
        &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
    );
    assert_eq!(
        r.header("x-upstream"),
        Some("yes"),
        "the public port forwards /admin/* to the upstream"
    );
    assert_eq!(get(&gw.admin_url("/healthz"), &[]).status, 200);
    assert_eq!(get(&gw.admin_url("/readyz"), &[]).status, 200);
}

// ------------------------------------------------------------ configuration

fn check(config: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "f.toml", config);
    let out = Command::new(binary())
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configs_exit_2_naming_file_and_key() {
    let base = "[upstream]\nurls = [\"http://127.0.0.1:3000\"]\n";
    let cases = [
        (
            format!("{base}[server]\nlisten = \"0.0.0.0:1\"\nlisten_backlog = 5\n"),
            "server.listen_backlog",
        ),
        (
            format!("{base}[redis]\nurl = \"redis://127.0.0.1\"\ntimeout = \"soon\"\n"),
            "redis.timeout",
        ),
        (
            format!("allowlist = [\"10.0.0.0/99\"]\n{base}"),
            "allowlist",
        ),
        (
            format!("{base}[client_ip]\ntrusted_proxies = [\"not-a-cidr\"]\n"),
            "client_ip.trusted_proxies",
        ),
        (
            format!("{base}{}", rule("a", "ip", 0, "1s", 1, 1)),
            "rules[0].rate",
        ),
        (
            format!("{base}{}", rule("a", "ip", 1, "1s", 2, 3)),
            "rules[0].cost",
        ),
        (
            format!("{base}{}", rule("a", "ip", 1, "1s", 0, 1)),
            "rules[0].burst",
        ),
        (
            format!(
                "{base}{}{}",
                rule("a", "ip", 1, "1s", 2, 1),
                rule("a", "ip", 1, "1s", 2, 1)
            ),
            "rules[1].name",
        ),
        (
            format!("{base}{}", rule("a", "cookie:x", 1, "1s", 2, 1)),
            "rules[0].key",
        ),
        (format!("{base}[ban]\nstatus = 500\n"), "ban.status"),
        ("[upstream]\nurls = []\n".to_string(), "upstream.urls"),
        (
            format!("{base}[redis]\nurl = \"rediss://127.0.0.1\"\n"),
            "redis.url",
        ),
        ("[upstream\n".to_string(), "upstream"),
        (
            format!("{base}[consumers]\nkey = \"header:X-Api-Key\"\n[plans.free]\nrules = [{{ name = \"f\", rate = 1, per = \"1s\", burst = 1 }}, {{ name = \"g\", rate = 1, per = \"1s\", burst = 1, quota = 5, period = \"day\" }}]\n"),
            "plans.free.rules[1]",
        ),
        (
            format!("{base}[consumers]\nkey = \"header:X-Api-Key\"\ndefault_plan = \"gold\"\n[plans.free]\nrules = []\n"),
            "consumers.default_plan",
        ),
        (
            format!("{base}[consumers]\nkey = \"ip\"\n"),
            "consumers.key",
        ),
        (
            format!("{base}[plans.free]\nrules = []\n"),
            "plans.free",
        ),
        (
            format!("{base}[consumers]\nkey = \"header:X-Api-Key\"\n[plans.free]\nrules = [{{ name = \"q\", quota = 5, period = \"week\" }}]\n"),
            "plans.free",
        ),
        (
            format!("{base}[consumers]\nkey = \"header:X-Api-Key\"\n[plans.free]\nrules = [{{ name = \"c\", concurrency = 0 }}]\n"),
            "plans.free.rules[0].concurrency",
        ),
    ];
    for (config, key) in cases {
        let (code, _, err) = check(&config);
        assert_eq!(code, 2, "{config}\n{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line, got: {err}");
        assert!(
            err.contains("f.toml") && err.contains(key),
            "expected key {key}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = Command::new(binary())
        .args(["--config", "/nonexistent/floodgate.toml", "--check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/floodgate.toml"));
}

#[test]
fn check_prints_a_summary_and_version_works() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/floodgate.toml")).unwrap();
    let (code, out, err) = check(&text);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("rule          per-ip") && out.contains("configuration OK"),
        "{out}"
    );
    let v = Command::new(binary()).arg("--version").output().unwrap();
    assert!(v.status.success());
    assert!(String::from_utf8_lossy(&v.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn rules_match_the_normalised_path() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let rules = "[[rules]]\nname = \"login\"\nkey = \"ip\"\nrate = 1\nper = \"60s\"\nburst = 1\nmatch = { path_prefix = \"/api/login\" }\n";
    let gw = start(&redis, &up, rules);
    assert_eq!(get(&gw.url("/api/login"), &[]).status, 200);
    // Refused by the rule, or (where some upstream reads the spelling
    // elsewhere: one that decodes nothing, or resolves no dot segment) as
    // ambiguous; never let through.
    for (sneaky, want) in [
        ("/%61pi/login", 400),
        ("//api//login", 429),
        ("/x/../api/login", 400),
        ("/api/./login", 400),
    ] {
        let req = format!("GET {sneaky} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert_eq!(
            raw_status(&raw_request(gw.port, req.as_bytes())),
            want,
            "{sneaky} slipped past the rule"
        );
    }
    assert_eq!(get(&gw.url("/api/other"), &[]).status, 200);
}

#[test]
fn a_slow_upload_longer_than_the_upstream_timeout_still_goes_through() {
    use std::io::Write;
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &rule("per-ip", "ip", 100, "1s", 100, 1));
    // upstream.timeout is 2 s in these tests; the upload takes about 3 s.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    write!(
        s,
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    for _ in 0..3 {
        thread::sleep(Duration::from_millis(1000));
        s.write_all(b"0123456789").unwrap();
    }
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"received\":30"), "{out}");
}

#[test]
fn head_chunked_uploads_and_expect_continue_are_forwarded() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start(&redis, &up, &rule("per-ip", "ip", 100, "1s", 100, 1));
    let head = raw_request(
        gw.port,
        b"HEAD /bytes/1000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(raw_status(&head), 200, "{head}");
    assert!(
        head.ends_with("\r\n\r\n"),
        "a HEAD answer has no body: {head:?}"
    );
    let chunked = raw_request(
        gw.port,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    assert!(chunked.contains("\"received\":11"), "{chunked}");
    let expect = raw_request(
        gw.port,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\nConnection: close\r\n\r\nabcd",
    );
    assert!(expect.contains("\"received\":4"), "{expect}");
}

#[test]
fn a_flood_against_a_shadow_rule_costs_one_log_line() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let rules =
        "[[rules]]\nname = \"trial\"\nkey = \"ip\"\nrate = 1\nper = \"1h\"\nburst = 1\nshadow = true\n";
    let gw = start(&redis, &up, rules);
    for _ in 0..200 {
        assert_eq!(
            get(&gw.url("/"), &[]).status,
            200,
            "a shadow rule refuses nothing"
        );
    }
    assert_eq!(gw.requests_metric("trial", "shadow_limited"), 199);
    let lines = gw.log().matches("shadow rule trial would limit").count();
    assert_eq!(lines, 1, "one line per log_throttle window:\n{}", gw.log());
}
