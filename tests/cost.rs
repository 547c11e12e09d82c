//! Cost, settlement and counted statuses against real processes: a fake
//! LLM upstream that reports the tokens it used in an `X-Usage` header or
//! in a trailer after a streamed answer, two gateway nodes on one Redis
//! holding a consumer's daily token quota exactly, a client that goes away
//! before the trailer, a node killed between admission and settlement, bad
//! cost and settle values, and a login endpoint whose failures alone are
//! counted, refused past five and banned.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A fake LLM and login upstream on a raw socket (it can send trailers):
/// - `/v1/complete`: answers `X-Usage: <X-Use>` in its head;
/// - `/v1/stream`: a chunked answer whose trailer is `X-Usage: <X-Use>`,
///   sent `X-Trailer-Delay-Ms` after each of its two chunks;
/// - `/login`: 200 when `X-Password: right`, else 401.
///
/// `X-Use` absent: no usage at all. Counts requests served.
struct FakeApi {
    port: u16,
    hits: Arc<AtomicU64>,
}

impl FakeApi {
    fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(s) = stream else { continue };
                let h = h.clone();
                thread::spawn(move || serve(s, &h));
            }
        });
        FakeApi { port, hits }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

/// One keep-alive connection of the fake API.
fn serve(s: TcpStream, hits: &AtomicU64) {
    let mut out = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end().to_string();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let len: usize = get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        hits.fetch_add(1, Ordering::SeqCst);
        let usage = get("x-use");
        let written = if path.starts_with("/v1/stream") {
            let delay: u64 = get("x-trailer-delay-ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nTrailer: X-Usage\r\n\r\n5\r\nhello\r\n";
            out.write_all(head.as_bytes())
                .and_then(|_| out.flush())
                .ok();
            thread::sleep(Duration::from_millis(delay));
            let trailer = match &usage {
                Some(u) => format!("X-Usage: {u}\r\n"),
                None => String::new(),
            };
            // A second piece, then the end: a client gone meanwhile is
            // noticed by the gateway before the trailer comes.
            out.write_all(b"6\r\n world\r\n")
                .and_then(|_| out.flush())
                .ok();
            thread::sleep(Duration::from_millis(delay));
            out.write_all(format!("0\r\n{trailer}\r\n").as_bytes())
        } else if path.starts_with("/login") {
            let ok = get("x-password").as_deref() == Some("right");
            let (status, text) = if ok {
                ("200 OK", "welcome")
            } else {
                ("401 Unauthorized", "wrong password")
            };
            out.write_all(
                format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{text}",
                    text.len()
                )
                .as_bytes(),
            )
        } else {
            let usage = match &usage {
                Some(u) => format!("X-Usage: {u}\r\n"),
                None => String::new(),
            };
            out.write_all(
                format!("HTTP/1.1 200 OK\r\n{usage}Content-Length: 4\r\n\r\ndone").as_bytes(),
            )
        };
        if written.is_err() {
            return;
        }
    }
}

const QUOTA: u64 = 10_000;

/// A daily token quota per API key: reserves `X-Max-Tokens` (500 when
/// absent, at most 2000), settled by the answer's `X-Usage`.
fn llm_rules() -> String {
    format!(
        r#"
[[rules]]
name = "llm-tokens"
key = "header:X-Api-Key"
quota = {QUOTA}
period = "day"
cost = "header:X-Max-Tokens"
max_cost = 2000
default_cost = 500
settle = "header:X-Usage"
"#
    )
}

/// Two nodes on one Redis in front of `api`.
fn two_nodes(redis: &RedisServer, api: &FakeApi, rules: &str, extra: &str) -> (Gateway, Gateway) {
    let p = prefix();
    let setup = Setup {
        redis: Some(redis.url()),
        upstream: &api.url(),
        prefix: &p,
        rules,
        extra,
    };
    (Gateway::start(&setup), Gateway::start(&setup))
}

/// The RateLimit-Remaining of rule `name` in `resp` (RFC 9651 list).
fn remaining(resp: &Resp, name: &str) -> Option<u64> {
    let value = resp.header("RateLimit")?;
    let list = sfv::Parser::parse_list(value.as_bytes()).ok()?;
    list.into_iter().find_map(|entry| match entry {
        sfv::ListEntry::Item(item) if item.bare_item.as_str() == Some(name) => item
            .params
            .iter()
            .find(|(k, _)| k.as_str() == "r")
            .and_then(|(_, v)| v.as_int())
            .map(|i| i as u64),
        _ => None,
    })
}

/// A request for `max` tokens (none named: the default) that will use
/// `used`, on `path`.
fn ask(gw: &Gateway, path: &str, key: &str, max: Option<u64>, used: Option<u64>) -> Resp {
    let max = max.map(|m| m.to_string());
    let used = used.map(|u| u.to_string());
    let mut headers = vec![("X-Api-Key", key)];
    if let Some(m) = &max {
        headers.push(("X-Max-Tokens", m));
    }
    if let Some(u) = &used {
        headers.push(("X-Use", u));
    }
    call("POST", &gw.url(path), &headers, Some("{}"))
}

/// Sequential requests alternate between nodes, each reserving what it
/// names and using more or less than that: every admission is exactly the
/// one a single counter of settled usage plus the request's reservation
/// gives, the header shows what was reserved, and the next request sees
/// the settled charge.
fn exact_across_nodes(path: &str) {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    let (a, b) = two_nodes(&redis, &api, &llm_rules(), "");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut used_total = 0u64;
    let (mut admitted, mut refused, mut over) = (0, 0, 0);
    for i in 0..60 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let max = if next(4) == 0 {
            None
        } else {
            Some(1 + next(2000))
        };
        let reserve = max.unwrap_or(500);
        // Mostly less than reserved; sometimes more (into debt).
        let used = if next(5) == 0 {
            reserve + next(300)
        } else {
            next(reserve + 1)
        };
        let resp = ask(gw, path, "k-1", max, Some(used));
        let fits = used_total + reserve <= QUOTA;
        if fits {
            assert_eq!(resp.status, 200, "request {i}: {resp:?}");
            assert_eq!(
                remaining(&resp, "llm-tokens"),
                Some(QUOTA - used_total - reserve),
                "request {i}: the header shows the reservation taken"
            );
            used_total += used;
            admitted += 1;
            if used > reserve {
                over += 1;
            }
        } else {
            assert_eq!(resp.status, 429, "request {i}: {resp:?}");
            refused += 1;
        }
    }
    assert!(
        admitted > 5 && refused > 5 && over > 0,
        "{admitted} {refused} {over}"
    );
    assert_eq!(api.hits(), admitted);
    // The settled usage is what Redis holds: a request of 1 token sees it.
    let resp = ask(&a, path, "k-2", Some(1), Some(1));
    assert_eq!(resp.status, 200);
    let settled = a.metric("floodgate_settlements_total{outcome=\"charged\"}")
        + b.metric("floodgate_settlements_total{outcome=\"charged\"}");
    assert!(settled >= over as f64, "charged settlements: {settled}");
}

#[test]
fn a_token_quota_settled_by_a_response_header_is_exact_across_two_nodes() {
    exact_across_nodes("/v1/complete");
}

#[test]
fn a_token_quota_settled_by_a_trailer_is_exact_across_two_nodes() {
    exact_across_nodes("/v1/stream");
}

/// Many clients at once on two nodes, each using no more than it reserved:
/// the tokens used by admitted requests never exceed the quota, and Redis
/// ends holding exactly the settled usage.
#[test]
fn concurrent_clients_never_use_more_than_the_quota() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    let (a, b) = two_nodes(&redis, &api, &llm_rules(), "");
    let used_total = Arc::new(AtomicU64::new(0));
    let urls = [a.url("/v1/stream"), b.url("/v1/stream")];
    let mut threads = Vec::new();
    for t in 0..16u64 {
        let used_total = used_total.clone();
        let url = urls[(t % 2) as usize].clone();
        threads.push(thread::spawn(move || {
            for i in 0..12u64 {
                let max = 200 + (t * 37 + i * 91) % 800;
                let used = max / 2 + (t + i) % (max / 2);
                let (m, u) = (max.to_string(), used.to_string());
                let resp = call(
                    "POST",
                    &url,
                    &[("X-Api-Key", "shared"), ("X-Max-Tokens", &m), ("X-Use", &u)],
                    Some("{}"),
                );
                if resp.status == 200 {
                    used_total.fetch_add(used, Ordering::SeqCst);
                } else {
                    assert_eq!(resp.status, 429, "{resp:?}");
                }
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let used = used_total.load(Ordering::SeqCst);
    assert!(used <= QUOTA, "used {used} of {QUOTA}");
    assert!(used > QUOTA / 2, "the quota was barely used: {used}");
    let resp = ask(&a, "/v1/complete", "shared", Some(1), Some(0));
    if resp.status == 200 {
        assert_eq!(remaining(&resp, "llm-tokens"), Some(QUOTA - used - 1));
    } else {
        assert!(QUOTA - used < 1, "{resp:?}");
    }
}

/// Reads a response's head from a raw connection, then closes it.
fn head_then_leave(port: u16, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the head");
        got.extend_from_slice(&buf[..n]);
    }
    // Gone at once (a reset, as a client that crashed or timed out).
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

/// A client that reserves 100 tokens, uses 1500 and goes away before the
/// trailer that says so is still charged 1500: the gateway reads the rest
/// of the answer behind it.
#[test]
fn a_client_gone_before_the_trailer_is_still_charged_what_it_used() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    let gw = Gateway::on_url(&redis, &api.url(), &llm_rules(), "");
    let head = head_then_leave(
        gw.port,
        "POST /v1/stream HTTP/1.1\r\nHost: x\r\nX-Api-Key: k\r\nX-Max-Tokens: 100\r\nX-Use: 1500\r\nX-Trailer-Delay-Ms: 400\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    thread::sleep(Duration::from_millis(900));
    let resp = ask(&gw, "/v1/complete", "k", Some(1), Some(1));
    assert_eq!(resp.status, 200);
    assert_eq!(remaining(&resp, "llm-tokens"), Some(QUOTA - 1500 - 1));
}

/// A node killed after admitting a request and before its settlement: the
/// reservation stands in Redis, so the other node admits no more than the
/// quota less it.
#[test]
fn a_reservation_stands_when_its_node_dies_before_settling() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    let (mut a, b) = two_nodes(&redis, &api, &llm_rules(), "");
    let port = a.port;
    let pending = thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let req = "POST /v1/stream HTTP/1.1\r\nHost: x\r\nX-Api-Key: k\r\nX-Max-Tokens: 2000\r\nX-Use: 10\r\nX-Trailer-Delay-Ms: 1500\r\nContent-Length: 0\r\n\r\n";
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
    });
    let start = Instant::now();
    while api.hits() == 0 && start.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(api.hits(), 1);
    a.kill9();
    pending.join().unwrap();
    // 2000 reserved stand: 8000 are left, no more.
    let resp = ask(&b, "/v1/complete", "k", Some(1), Some(1));
    assert_eq!(remaining(&resp, "llm-tokens"), Some(QUOTA - 2000 - 1));
    for _ in 0..3 {
        assert_eq!(
            ask(&b, "/v1/complete", "k", Some(2000), Some(2000)).status,
            200
        );
    }
    assert_eq!(
        ask(&b, "/v1/complete", "k", Some(2000), Some(1)).status,
        429,
        "only 1999 tokens are left"
    );
}

/// A cost that is not a whole number from 1 to max_cost is answered 400
/// and charges nothing; a settle value that is missing or not a number
/// leaves the reservation as it stood, counted.
#[test]
fn bad_costs_are_refused_and_bad_settle_values_stand_at_the_reservation() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    let gw = Gateway::on_url(&redis, &api.url(), &llm_rules(), "");
    for bad in ["-5", "abc", "2001", "0", "1.5", "99999999999999999999"] {
        let resp = call(
            "POST",
            &gw.url("/v1/complete"),
            &[("X-Api-Key", "k"), ("X-Max-Tokens", bad), ("X-Use", "1")],
            Some("{}"),
        );
        assert_eq!(resp.status, 400, "cost {bad}: {resp:?}");
        assert!(resp.body.contains("X-Max-Tokens") || resp.body.contains("x-max-tokens"));
    }
    assert_eq!(api.hits(), 0, "a bad cost reaches no upstream");
    // Nothing was charged by them.
    let resp = ask(&gw, "/v1/complete", "k", Some(10), Some(10));
    assert_eq!(remaining(&resp, "llm-tokens"), Some(QUOTA - 10));
    // A usage that is not a number, or none at all: the reservation stands.
    let resp = call(
        "POST",
        &gw.url("/v1/stream"),
        &[
            ("X-Api-Key", "k"),
            ("X-Max-Tokens", "300"),
            ("X-Use", "lots"),
        ],
        Some("{}"),
    );
    assert_eq!(resp.status, 200);
    let resp = ask(&gw, "/v1/complete", "k", Some(200), None);
    assert_eq!(resp.status, 200);
    let resp = ask(&gw, "/v1/complete", "k", Some(1), Some(1));
    assert_eq!(
        remaining(&resp, "llm-tokens"),
        Some(QUOTA - 10 - 300 - 200 - 1)
    );
    assert_eq!(
        gw.metric("floodgate_settle_errors_total{reason=\"invalid\"}"),
        1.0
    );
    assert_eq!(
        gw.metric("floodgate_settle_errors_total{reason=\"missing\"}"),
        1.0
    );
}

const LOGIN: &str = r#"
[[rules]]
name = "login-failures"
key = "ip"
rate = 5
per = "10m"
burst = 5
match = { path_prefix = "/login", methods = ["POST"] }
count = { status = [401, 403] }
"#;

fn login(gw: &Gateway, ip: &str, password: &str) -> Resp {
    call(
        "POST",
        &gw.url("/login"),
        &[("X-Forwarded-For", ip), ("X-Password", password)],
        Some("{}"),
    )
}

/// Five failed logins in ten minutes, then 429 (the upstream is not asked
/// again), then a ban for repeat offenders; successful logins, however
/// many, are never counted.
#[test]
fn only_failed_logins_count_and_repeat_offenders_are_banned() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    let ban = "[ban]\nafter = 3\nwithin = \"10s\"\nduration = \"30s\"\nstatus = 403\n";
    let gw = Gateway::on_url(&redis, &api.url(), LOGIN, ban);
    for _ in 0..20 {
        assert_eq!(login(&gw, "198.51.100.1", "right").status, 200);
    }
    for i in 0..5 {
        let resp = login(&gw, "198.51.100.2", "guess");
        assert_eq!(resp.status, 401, "failure {i}");
    }
    let hits = api.hits();
    let resp = login(&gw, "198.51.100.2", "guess");
    assert_eq!(resp.status, 429, "the 6th failure is refused up front");
    assert!(resp.header("Retry-After").is_some());
    // Even the right password waits now: the subject has nothing left.
    assert_eq!(login(&gw, "198.51.100.2", "right").status, 429);
    assert_eq!(api.hits(), hits, "refusals reach no upstream");
    // Refusals count toward a ban.
    let mut banned = false;
    for _ in 0..5 {
        if login(&gw, "198.51.100.2", "guess").status == 403 {
            banned = true;
            break;
        }
    }
    assert!(banned, "a repeat offender is banned");
    assert_eq!(get_as(&gw.url("/v1/complete"), "198.51.100.2").status, 403);
    // The client that logs in fine still does.
    for _ in 0..5 {
        assert_eq!(login(&gw, "198.51.100.1", "right").status, 200);
    }
}

/// Concurrent failed logins: never more than five reach the upstream.
#[test]
fn concurrent_failed_logins_never_pass_more_than_the_burst() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    let gw = Gateway::on_url(&redis, &api.url(), LOGIN, "");
    let url = gw.url("/login");
    let threads: Vec<_> = (0..24)
        .map(|_| {
            let url = url.clone();
            thread::spawn(move || {
                call(
                    "POST",
                    &url,
                    &[("X-Forwarded-For", "203.0.113.9"), ("X-Password", "guess")],
                    Some("{}"),
                )
                .status
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let failed = statuses.iter().filter(|s| **s == 401).count();
    assert_eq!(failed, 5, "{statuses:?}");
    assert_eq!(api.hits(), 5);
}

/// A plan's token budget: `floodgate admin consumers get` (the admin API
/// under it) shows the settled usage, debt included.
#[test]
fn the_admin_api_shows_a_consumers_settled_usage() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    let plans = r#"
[consumers]
key = "header:X-Api-Key"
keys = { "k-llm" = "pro" }

[plans.pro]
rules = [
  { name = "llm-tokens", quota = 5000, period = "day",
    cost = "header:X-Max-Tokens", max_cost = 4000, default_cost = 1000,
    settle = "header:X-Usage" },
]
"#;
    let gw = Gateway::on_url(&redis, &api.url(), "", plans);
    let used = |gw: &Gateway| {
        let v = gw.admin("GET", "/admin/consumers/k-llm", None).json();
        let rule = v["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "llm-tokens")
            .cloned()
            .unwrap_or_else(|| panic!("{v}"));
        (rule["used"].as_u64(), rule["remaining"].as_u64())
    };
    let first = ask(&gw, "/v1/complete", "k-llm", Some(4000), Some(300));
    assert_eq!(remaining(&first, "llm-tokens"), Some(1000), "{first:?}");
    assert_eq!(used(&gw), (Some(300), Some(4700)));
    // 4000 reserved, 6000 used: in debt past the quota.
    assert_eq!(
        ask(&gw, "/v1/stream", "k-llm", Some(4000), Some(6000)).status,
        200
    );
    assert_eq!(used(&gw), (Some(6300), Some(0)));
    let resp = ask(&gw, "/v1/complete", "k-llm", Some(1), Some(1));
    assert_eq!(resp.status, 429, "in debt until the next day");
    assert!(resp.header("Retry-After").is_some());
}

/// Settlement on a token bucket: the real cost moves the bucket, and a
/// debt past the burst keeps the subject waiting until refill pays it.
#[test]
fn a_token_bucket_settles_into_debt_and_is_refilled_out_of_it() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    // 1000 tokens, one back every 10 ms.
    let rules = r#"
[[rules]]
name = "llm-tokens"
key = "header:X-Api-Key"
rate = 100
per = "1s"
burst = 1000
cost = "header:X-Max-Tokens"
max_cost = 1000
default_cost = 100
settle = "header:X-Usage"
"#;
    let gw = Gateway::on_url(&redis, &api.url(), rules, "");
    let resp = ask(&gw, "/v1/complete", "k", Some(100), Some(400));
    assert_eq!(remaining(&resp, "llm-tokens"), Some(900), "the reservation");
    let resp = ask(&gw, "/v1/complete", "k", Some(1), Some(0));
    let left = remaining(&resp, "llm-tokens").unwrap();
    // 400 used, then 1 reserved (settled to 0 after this answer); a
    // little refilled meanwhile.
    assert!((599..=620).contains(&left), "{left} left");
    // 1000 reserved at most, 2500 used: 1500 past an empty bucket.
    let resp = ask(&gw, "/v1/stream", "k", Some(600), Some(2500));
    assert_eq!(resp.status, 200);
    let refused = ask(&gw, "/v1/complete", "k", Some(1), Some(1));
    assert_eq!(refused.status, 429, "in debt");
    let wait: u64 = refused.header("Retry-After").unwrap().parse().unwrap();
    // About 1900 tokens short of one (at 100 a second): some 19 s.
    assert!((17..=21).contains(&wait), "Retry-After {wait}");
}
