//! Hostile and unlucky traffic against the real gateway binary: stale
//! upstream connections, clients that stop reading, client faults, rule
//! spellings, admin foot-guns and log floods.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A gateway without Redis in front of `up`, with `extra` appended.
fn gateway(up: &str, rules: &str, extra: &str) -> Gateway {
    let p = prefix();
    Gateway::start(&Setup {
        redis: None,
        upstream: up,
        prefix: &p,
        rules,
        extra,
    })
}

/// A config with `server_extra` lines added to the harness' `[server]`
/// section, and `upstream_extra` lines in `[upstream]` (which must set
/// `timeout`).
fn gateway_with(up: &str, server_extra: &str, upstream_extra: &str, rest: &str) -> Gateway {
    let (port, admin_port) = (free_port(), free_port());
    let p = prefix();
    let config = Gateway::config(
        port,
        admin_port,
        &Setup {
            redis: None,
            upstream: up,
            prefix: &p,
            rules: rest,
            extra: "",
        },
    )
    .replace("workers = 2\n", &format!("workers = 2\n{server_extra}\n"))
    .replace(
        "timeout = \"2s\"\nconnect_timeout = \"500ms\"\n",
        &format!("connect_timeout = \"500ms\"\n{upstream_extra}\n"),
    );
    Gateway::start_config(port, admin_port, config, &[])
}

/// Sends `bytes`, lets `then` act on the connection, and returns the status
/// of the final answer (past any `100 Continue`) read within `limit`.
fn status_of(port: u16, bytes: &[u8], then: impl FnOnce(&mut TcpStream), limit: Duration) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(bytes).unwrap();
    then(&mut s);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        let last = text.rfind("HTTP/1.1 ").map(|i| &text[i..]);
        if let Some(head) = last {
            let status = raw_status(head);
            if status >= 200 && head.contains("\r\n\r\n") {
                return status;
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return last.map(raw_status).unwrap_or(0),
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

// ------------------------------------------------------------ 1. upstreams

#[test]
fn stale_keep_alive_connections_never_give_502() {
    // The upstream closes idle connections after 2 s; the gateway keeps its
    // own for up to 4 s (the default). Bursts come just before, at and just
    // after the upstream closes them.
    let up = Upstream::start_keep_alive(Duration::from_secs(2));
    let gw = gateway(&up.url(), "", "");
    let mut statuses = Vec::new();
    for pause_ms in [0, 1900, 1950, 2000, 2050, 2100] {
        thread::sleep(Duration::from_millis(pause_ms));
        let url = gw.url("/upload");
        let burst: Vec<_> = (0..40)
            .map(|i| {
                let url = url.clone();
                thread::spawn(move || {
                    if i % 4 == 0 {
                        // Safe to repeat: a POST without the key is never
                        // sent twice (see the test below).
                        let key = format!("k-{pause_ms}-{i}");
                        let headers = [("Idempotency-Key", key.as_str())];
                        call("POST", &url, &headers, Some("{\"small\":\"body\"}")).status
                    } else {
                        call("GET", &url, &[], None).status
                    }
                })
            })
            .collect();
        statuses.extend(burst.into_iter().map(|t| t.join().unwrap()));
    }
    let bad: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        bad.is_empty(),
        "{} of {} requests failed: {bad:?}\n{}",
        bad.len(),
        statuses.len(),
        gw.log()
    );
    assert_eq!(
        gw.metric("floodgate_upstream_errors_total"),
        0.0,
        "no upstream error was counted"
    );
}

/// How many times an upstream read each request, by its `X-Request-Id`.
type SeenIds = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>;

/// An upstream that answers the first request on each connection (keeping
/// it open) and drops the connection, unanswered, when a second request
/// arrives on it: what a pooled connection looks like when the upstream
/// closed it just as the gateway reused it (the request was read all the
/// same). Returns the port, the count of connections accepted and how many
/// times each request id was read.
fn closes_on_reuse() -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>, SeenIds) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(AtomicU64::new(0));
    let seen: SeenIds = Default::default();
    let count = accepted.clone();
    let ids = seen.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            count.fetch_add(1, Ordering::Relaxed);
            let ids = ids.clone();
            thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let Some(body_len) = read_request(&mut s, &ids) else {
                    return;
                };
                let answer = format!("{{\"received\":{body_len}}}");
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
                    answer.len()
                );
                // The next request on this connection is read and dropped.
                let _ = read_request(&mut s, &ids);
            });
        }
    });
    (port, accepted, seen)
}

/// Reads one request (head and sized body), counting its `X-Request-Id` in
/// `seen`; its body length, or `None` at end of stream.
fn read_request(s: &mut TcpStream, seen: &SeenIds) -> Option<usize> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    if let Some(id) = head.lines().find_map(|l| l.strip_prefix("x-request-id:")) {
        *seen
            .lock()
            .unwrap()
            .entry(id.trim().to_string())
            .or_default() += 1;
    }
    Some(len)
}

#[test]
fn a_pooled_connection_found_dead_is_retried_on_a_fresh_one_only_when_safe() {
    let (port, accepted, seen) = closes_on_reuse();
    let gw = gateway(&format!("http://127.0.0.1:{port}"), "", "");
    let url = gw.url("/x");
    let mut refused_posts = 0;
    for i in 0..18 {
        let id = format!("req-{i}");
        let key = format!("key-{i}");
        let mut headers = vec![("X-Request-Id", id.as_str())];
        let r = match i % 3 {
            // A GET is safe to repeat: it always gets through.
            0 => get(&url, &headers),
            // A POST that says it is safe to repeat gets through as well.
            1 => {
                headers.push(("Idempotency-Key", key.as_str()));
                call("POST", &url, &headers, Some(&"b".repeat(1000)))
            }
            // A plain POST written to a dead connection may have been
            // processed: it is answered 502, never sent a second time.
            _ => {
                let r = call("POST", &url, &headers, Some(&"b".repeat(1000)));
                if r.status == 502 {
                    assert_eq!(r.json()["error"], "bad_gateway", "request {i}");
                    refused_posts += 1;
                    continue;
                }
                r
            }
        };
        assert_eq!(r.status, 200, "request {i}: {}\n{}", r.body, gw.log());
        if i % 3 != 0 {
            assert_eq!(r.json()["received"], 1000, "the body was sent whole");
        }
    }
    let seen = seen.lock().unwrap();
    for i in (2..18).step_by(3) {
        let n = seen.get(&format!("req-{i}")).copied().unwrap_or(0);
        assert_eq!(n, 1, "plain POST req-{i} was read {n} times");
    }
    assert!(
        (0..18)
            .filter(|i| i % 3 != 2)
            .any(|i| seen[&format!("req-{i}")] == 2),
        "some safe request was sent again on a fresh connection: {seen:?}"
    );
    assert!(gw.metric("floodgate_upstream_fresh_retries_total") >= 1.0);
    assert_eq!(
        gw.metric("floodgate_upstream_errors_total"),
        refused_posts as f64,
        "only the refused plain POSTs count as upstream errors"
    );
    assert!(accepted.load(std::sync::atomic::Ordering::Relaxed) >= 12);
}

#[test]
fn unreachable_means_a_connect_failed() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gw = gateway(&dead, "", "");
    let r = get(&gw.url("/x"), &[]);
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"], "upstream_unreachable");
}

// ------------------------------------------------------------ 2. slow readers

/// Opens `n` connections that each ask for `path` and never read, all
/// from 127.0.0.1.
fn stalled_clients(port: u16, n: usize, path: &str, within: Duration) -> Vec<TcpStream> {
    stalled_clients_as(port, n, path, within, false)
}

/// The same, each client `distinct` (an address of its own in
/// X-Forwarded-For, 127.0.0.1 being a trusted proxy) or not.
fn stalled_clients_as(
    port: u16,
    n: usize,
    path: &str,
    within: Duration,
    distinct: bool,
) -> Vec<TcpStream> {
    let started = Instant::now();
    let mut socks = Vec::with_capacity(n);
    while socks.len() < n && started.elapsed() < within {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let xff = if distinct {
            format!(
                "X-Forwarded-For: 10.77.{}.{}\r\n",
                socks.len() / 250,
                socks.len() % 250 + 1
            )
        } else {
            String::new()
        };
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{xff}\r\n").as_bytes())
            .unwrap();
        socks.push(s);
    }
    assert_eq!(socks.len(), n, "could not open {n} connections in time");
    socks
}

/// Stalled readers in the memory test.
const STALLED: usize = 3000;

#[test]
fn clients_that_stop_reading_are_cut_off_and_free_their_memory() {
    let up = Upstream::start();
    // Answers read whole may hold 32 MiB in all.
    let gw = gateway_with(
        &up.url(),
        "send_timeout = \"2s\"\nresponse_buffer = 4096\nresponse_buffer_total = 33554432",
        "timeout = \"10s\"\nidle_timeout = \"1s\"",
        "",
    );
    for _ in 0..20 {
        assert_eq!(get(&gw.url("/bytes/1000"), &[]).status, 200);
    }
    let rss_before = gw.rss_kib();
    // Two waves of stalled readers, each cut off by the send timeout.
    let first = stall_wave(&gw);
    let second = stall_wave(&gw);
    eprintln!(
        "{STALLED} stalled readers, twice: RSS {rss_before} KiB before; {first:?} and {second:?} KiB (peak while stalled, after); peak {} KiB",
        gw.peak_rss_kib()
    );
    // Each stalled client costs the HTTP server's and client's own fixed
    // buffers, one upstream read buffer and a response piece, well under
    // 64 KiB, never its whole response; answers read whole hold at most
    // response_buffer_total in all.
    let bound = STALLED as u64 * 64 + 32 * 1024;
    for (peak, _) in [first, second] {
        assert!(
            peak < rss_before + bound,
            "RSS grew by {} KiB while {STALLED} clients stalled (bound {bound} KiB)",
            peak - rss_before
        );
    }
    // Once they are cut off, what they held is free: the allocator keeps
    // some of it for the next requests, and a second wave reuses it
    // rather than adding to it.
    assert!(
        second.1 < first.1 + 16 * 1024,
        "RSS after a second wave: {} KiB, after the first: {} KiB",
        second.1,
        first.1
    );
    assert_eq!(get(&gw.url("/bytes/1000"), &[]).status, 200);
}

/// `STALLED` clients that ask and never read, each from an address of its
/// own (no cap on one address' streams applies): half for an answer of
/// unknown length (streamed), half for one with a length (read whole
/// while the total allows). Returns the gateway's RSS while they stall and
/// once they have been cut off, KiB.
fn stall_wave(gw: &Gateway) -> (u64, u64) {
    let mut socks = stalled_clients_as(
        gw.port,
        STALLED / 2,
        "/bytes/262144",
        Duration::from_secs(30),
        true,
    );
    socks.extend(stalled_clients_as(
        gw.port,
        STALLED / 2,
        "/sized/262144",
        Duration::from_secs(30),
        true,
    ));
    // Everyone else is served as usual meanwhile.
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/bytes/1000"), &[]).status, 200);
    }
    let peak_during = gw.rss_kib();
    // Soon after the send timeout, every stalled client is disconnected.
    let stalled_at = Instant::now();
    wait_until(
        "the stalled connections to be closed",
        Duration::from_secs(15),
        || accepted_connections(gw.port) < 10,
    );
    eprintln!(
        "stalled clients disconnected after {:?}",
        stalled_at.elapsed()
    );
    // Their upstream connections went back to the pool or were closed;
    // once idle past upstream.idle_timeout, the next requests close them.
    thread::sleep(Duration::from_millis(1200));
    for _ in 0..10 {
        assert_eq!(get(&gw.url("/bytes/1000"), &[]).status, 200);
    }
    drop(socks);
    (peak_during, gw.rss_kib())
}

#[test]
fn one_address_cannot_pin_the_pool_with_answers_it_does_not_read() {
    let up = Upstream::start();
    let gw = gateway_with(
        &up.url(),
        "send_timeout = \"30s\"",
        "timeout = \"5s\"\nmax_connections = 16",
        "",
    );
    // 40 connections from one address fetch a 50 MB answer each and read
    // nothing, for longer than the test lasts; the pool has 2 x 16
    // upstream connections. The address may stream 4 large answers at
    // once (a quarter of max_connections); the rest are refused, 503.
    let socks = stalled_clients(gw.port, 40, "/bytes/52428800", Duration::from_secs(10));
    thread::sleep(Duration::from_millis(500));
    // Everyone else, and that address's small requests, are served at once.
    let others: Vec<_> = (0..8)
        .map(|i| {
            let url = gw.url(if i % 2 == 0 {
                "/bytes/1000"
            } else {
                "/sized/100000"
            });
            thread::spawn(move || {
                let started = Instant::now();
                let status = if i < 4 {
                    get_as(&url, &format!("10.78.0.{}", i + 1)).status
                } else {
                    get(&url, &[]).status
                };
                (status, started.elapsed())
            })
        })
        .collect();
    for t in others {
        let (status, took) = t.join().unwrap();
        assert_eq!(status, 200, "{}", gw.log());
        assert!(took < Duration::from_secs(1), "served in {took:?}");
    }
    let refused = gw.metric("floodgate_client_errors_total{kind=\"too_many_streams\"}");
    assert!(
        (30.0..=36.0).contains(&refused),
        "{refused} refused: 36 expected past the 4 streams the address may hold"
    );
    drop(socks);
}

#[test]
fn an_upload_waits_for_a_pooled_connection_no_longer_than_the_timeout() {
    let up = Upstream::start();
    let gw = gateway_with(
        &up.url(),
        "send_timeout = \"30s\"",
        "timeout = \"1s\"\nmax_connections = 1",
        "",
    );
    // Stalled readers (each an address of its own, so none is held back
    // by the cap on one address' streams) hold the one connection each
    // worker may open.
    let socks = stalled_clients_as(gw.port, 8, "/bytes/16777216", Duration::from_secs(10), true);
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let r = call("POST", &gw.url("/upload"), &[], Some("{\"a\":1}"));
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(socks);
}

// ------------------------------------------------------------ 3. client faults

#[test]
fn client_faults_are_answered_4xx_and_not_counted_as_upstream_errors() {
    let up = Upstream::start();
    let gw = gateway_with(
        &up.url(),
        "client_body_timeout = \"1s\"\nmax_body_size = 4096\nmax_headers = 20\nmax_header_bytes = 2048",
        "timeout = \"10s\"",
        "",
    );
    let limit = Duration::from_secs(5);
    let post = |len: &str| {
        format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n").into_bytes()
    };
    // A body that stalls: 408 after client_body_timeout, not the upstream's.
    let started = Instant::now();
    let stalled = status_of(
        gw.port,
        &post("10"),
        |s| s.write_all(b"abc").unwrap(),
        limit,
    );
    assert_eq!(stalled, 408);
    assert!(started.elapsed() < Duration::from_millis(1900));
    // A body that ends early (the client half-closes once the request is
    // under way): 400.
    let short = status_of(
        gw.port,
        &post("10"),
        |s| {
            s.write_all(b"abc").unwrap();
            thread::sleep(Duration::from_millis(200));
            s.shutdown(Shutdown::Write).unwrap();
        },
        limit,
    );
    assert_eq!(short, 400);
    // Expect: 100-continue, then no body: 408.
    let expect = status_of(
        gw.port,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
        |_| {},
        limit,
    );
    assert_eq!(expect, 408);
    // Malformed chunk framing once the request is under way: 400.
    let chunked = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let malformed = status_of(
        gw.port,
        chunked,
        |s| {
            thread::sleep(Duration::from_millis(200));
            s.write_all(b"3\r\nabcXX\r\n").unwrap();
        },
        limit,
    );
    assert_eq!(malformed, 400, "{}", gw.log());
    // A chunk of 2^64-1 bytes is cut at max_body_size: 413.
    let huge = status_of(
        gw.port,
        chunked,
        |s| {
            s.write_all(b"FFFFFFFFFFFFFFFF\r\n").unwrap();
            let _ = s.write_all(&[b'x'; 8192]);
        },
        limit,
    );
    assert_eq!(huge, 413);
    // A sized body past the limit is refused before the upstream is asked.
    let hits = up.hits();
    assert_eq!(status_of(gw.port, &post("5000"), |_| {}, limit), 413);
    // Requests that cannot be forwarded.
    let options = raw_request(
        gw.port,
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(raw_status(&options), 200, "{options}");
    assert!(
        options.to_ascii_lowercase().contains("allow: get"),
        "{options}"
    );
    let connect = raw_request(
        gw.port,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(raw_status(&connect), 405, "{connect}");
    let many: String = (0..25).map(|i| format!("X-H{i}: v\r\n")).collect();
    let too_many = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n");
    assert_eq!(raw_status(&raw_request(gw.port, too_many.as_bytes())), 431);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "v".repeat(3000)
    );
    assert_eq!(raw_status(&raw_request(gw.port, big.as_bytes())), 431);
    assert_eq!(up.hits(), hits, "none of these reached the upstream");

    assert_eq!(gw.metric("floodgate_upstream_errors_total"), 0.0);
    for kind in [
        "client_body_timeout",
        "incomplete_body",
        "body_too_large",
        "method_not_allowed",
        "too_many_headers",
        "headers_too_large",
    ] {
        assert!(
            gw.metric(&format!("floodgate_client_errors_total{{kind=\"{kind}\"}}")) >= 1.0,
            "{kind} not counted"
        );
    }
    assert!(!gw.log().contains("unreachable"), "{}", gw.log());
}

// ------------------------------------------------------------ 4. spellings

#[test]
fn spellings_cannot_escape_a_rule() {
    let up = Upstream::start();
    let rules = "[[rules]]\nname = \"api\"\nkey = \"ip\"\nrate = 1\nper = \"1h\"\nburst = 1\nmatch = { path_prefix = \"/api\" }\n\n\
                 [[rules]]\nname = \"submit\"\nkey = \"ip\"\nrate = 1\nper = \"1h\"\nburst = 1\nmatch = { path_prefix = \"/submit\", methods = [\"POST\"] }\n\n\
                 [[rules]]\nname = \"exact-case\"\nkey = \"ip\"\nrate = 1\nper = \"1h\"\nburst = 1\nmatch = { path_prefix = \"/Exact\", case_sensitive = true }\n";
    let gw = gateway(&up.url(), rules, "");
    let send = |method: &str, path: &str| {
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        raw_status(&raw_request(gw.port, req.as_bytes()))
    };
    assert_eq!(send("GET", "/api/items"), 200);
    let hits = up.hits();
    for path in ["/API/items", "/Api/items"] {
        assert_eq!(send("GET", path), 429, "{path} escaped the rule");
    }
    for path in [
        "/%2561pi/items",
        "/%2Fapi/items",
        "/x%2F..%2Fapi/items",
        "/;x/api/items",
        "/x/..;/api/items",
        "/x/..\\api/items",
        "/x/..%5capi/items",
        "/x/..%5Capi/items",
        // Escapes decoded, dots resolved, `;` kept (nginx): `/api/..;`.
        "/b%2F..%2Fapi/..;",
        // An upstream that decodes nothing routes `/%41PI`, one that does
        // `/API`: the readings disagree on the rule.
        "/%41PI/items",
    ] {
        assert_eq!(
            send("GET", path),
            400,
            "{path} is read as /api by some upstreams"
        );
    }
    assert_eq!(up.hits(), hits, "no spelling reached the upstream");
    assert_eq!(
        gw.metric("floodgate_client_errors_total{kind=\"ambiguous_path\"}"),
        10.0
    );

    assert_eq!(send("POST", "/submit"), 200);
    assert_eq!(send("post", "/submit"), 429, "methods match without case");
    assert_eq!(send("Post", "/submit"), 429);

    assert_eq!(send("GET", "/Exact/1"), 200);
    assert_eq!(send("GET", "/Exact/2"), 429);
    assert_eq!(
        send("GET", "/exact/3"),
        200,
        "case_sensitive = true keeps case"
    );

    // Spellings that mean the same under every reading pass as usual.
    assert_eq!(send("GET", "/other%2Fpath"), 200);
    assert_eq!(send("GET", "/files;v=2/x"), 200);
    assert_eq!(send("GET", "/api;jsessionid=1"), 429);
}

// ------------------------------------------------------------ 5. admin

#[test]
fn admin_refuses_whole_internet_bans_and_instant_bans() {
    let up = Upstream::start();
    let gw = gateway(&up.url(), "", "");
    let post = |path: &str, body: &str| gw.admin("POST", path, Some(body));
    for (path, body) in [
        (
            "/admin/bans",
            "{\"subject\":\"0.0.0.0/0\",\"duration\":\"1m\"}",
        ),
        ("/admin/bans", "{\"subject\":\"::/0\",\"duration\":\"1m\"}"),
        (
            "/admin/bans",
            "{\"subject\":\"10.0.0.0/7\",\"duration\":\"1m\"}",
        ),
        (
            "/admin/bans",
            "{\"subject\":\"2001:db8::/31\",\"duration\":\"1m\"}",
        ),
        ("/admin/allowlist", "{\"cidr\":\"0.0.0.0/0\"}"),
        ("/admin/allowlist", "{\"cidr\":\"::/0\"}"),
    ] {
        let r = post(path, body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(r.body.contains("force"), "{}", r.body);
    }
    assert_eq!(get(&gw.url("/"), &[]).status, 200, "nobody was banned");
    for duration in ["1ns", "999ms", "0s"] {
        let r = post(
            "/admin/bans",
            &format!("{{\"subject\":\"192.0.2.1\",\"duration\":\"{duration}\"}}"),
        );
        assert_eq!(r.status, 400, "{duration}: {}", r.body);
    }
    let r = post(
        "/admin/bans",
        &format!(
            "{{\"subject\":\"192.0.2.1\",\"duration\":\"1m\",\"reason\":\"{}\"}}",
            "x".repeat(513)
        ),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        post(
            "/admin/bans",
            "{\"subject\":\"10.0.0.0/8\",\"duration\":\"1m\"}"
        )
        .status,
        201,
        "/8 is allowed"
    );
    assert_eq!(
        post(
            "/admin/bans",
            "{\"subject\":\"198.18.0.0/7\",\"duration\":\"1m\",\"force\":true}"
        )
        .status,
        201,
        "force lets an operator insist"
    );
    let r = post(
        "/admin/bans",
        "{\"subject\":\"192.0.2.9\",\"duration\":\"1m\",\"reason\":\"a\\nFORGED line\\u001b[31m\"}",
    );
    assert_eq!(r.status, 201);
    let log = gw.log();
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a reason wrote its own log line:\n{log}"
    );
    assert!(log.contains("a\\nFORGED line\\u{1b}[31m"), "{log}");
}

// ------------------------------------------------------------ 6. logs

#[test]
fn floods_of_identical_failures_write_a_line_then_a_count() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gw = gateway_with(&dead, "log_throttle = \"5s\"", "timeout = \"2s\"", "");
    // As many failures as fit well inside one window, however slow the
    // machine: all but the first of each kind are held back.
    let start = Instant::now();
    let mut sent = 0;
    while sent < 100 && start.elapsed() < Duration::from_millis(2500) {
        raw_request(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n");
        assert_eq!(get(&gw.url("/"), &[]).status, 502);
        sent += 1;
    }
    assert!(sent >= 10, "only {sent} requests in 2.5 s");
    let count = |needle: &str| gw.log().lines().filter(|l| l.contains(needle)).count();
    assert_eq!(count("request parse error"), 1, "{}", gw.log());
    assert_eq!(count("unreachable"), 1, "{}", gw.log());
    // Once the window has passed, the next one writes the count held back.
    while start.elapsed() < Duration::from_millis(5200) {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(&gw.url("/"), &[]).status, 502);
    let log = gw.log();
    let held = format!("{} more like this", sent - 1);
    assert!(
        log.lines()
            .any(|l| l.contains("unreachable") && l.contains(&held)),
        "no line says `{held}`:\n{log}"
    );
}
