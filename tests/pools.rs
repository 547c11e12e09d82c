//! Several upstream pools against a real gateway process: routes by host,
//! path and method; a pool member killed and restarted under load; one
//! answering 500s ejected and readmitted (passive ejection running out, and
//! active probes); a pool with nothing healthy; retries that never send a
//! plain POST twice; a reload that moves a route; config errors.
//!
//! The upstreams here count every POST by its `X-Request-Id` across the
//! whole test, so each test can check that no POST reached any upstream
//! twice.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;

/// POSTs seen by any upstream of one test, by `X-Request-Id`.
type Posts = Arc<Mutex<HashMap<String, u32>>>;

fn count_post(posts: &Posts, id: Option<&str>) {
    if let Some(id) = id {
        *posts.lock().unwrap().entry(id.to_string()).or_insert(0) += 1;
    }
}

/// How an [`Instance`] behaves, switchable while it runs.
#[derive(Default)]
struct Flags {
    /// Answer 503 to every request but the health check.
    fail: AtomicBool,
    /// Answer the health check with 503.
    sick: AtomicBool,
    /// Requests served (health checks not counted).
    hits: AtomicU64,
}

/// One upstream URL: a small HTTP server that names itself in every
/// answer, can fail on demand, and can be stopped and started again on the
/// same port.
struct Instance {
    name: &'static str,
    port: u16,
    flags: Arc<Flags>,
    posts: Posts,
    server: Option<(actix_web::dev::ServerHandle, thread::JoinHandle<()>)>,
}

impl Instance {
    fn start(name: &'static str, posts: &Posts) -> Instance {
        let mut i = Instance {
            name,
            port: free_port(),
            flags: Arc::new(Flags::default()),
            posts: posts.clone(),
            server: None,
        };
        i.run();
        i
    }

    fn run(&mut self) {
        use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
        let (name, port) = (self.name, self.port);
        let (flags, posts) = (self.flags.clone(), self.posts.clone());
        self.server = Some(serve_in_thread!(port, move || {
            HttpServer::new(move || {
                let (flags, posts) = (flags.clone(), posts.clone());
                App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                    let (flags, posts) = (flags.clone(), posts.clone());
                    async move {
                        if req.path() == "/healthz" {
                            return if flags.sick.load(Ordering::Relaxed) {
                                HttpResponse::ServiceUnavailable().body("sick")
                            } else {
                                HttpResponse::Ok().body("ok")
                            };
                        }
                        flags.hits.fetch_add(1, Ordering::Relaxed);
                        if req.method() == actix_web::http::Method::POST {
                            let id = req
                                .headers()
                                .get("x-request-id")
                                .and_then(|v| v.to_str().ok());
                            count_post(&posts, id);
                        }
                        let status = if flags.fail.load(Ordering::Relaxed) {
                            actix_web::http::StatusCode::SERVICE_UNAVAILABLE
                        } else if req.path() == "/boom" {
                            // A request this upstream cannot handle.
                            actix_web::http::StatusCode::INTERNAL_SERVER_ERROR
                        } else {
                            actix_web::http::StatusCode::OK
                        };
                        HttpResponse::build(status).json(serde_json::json!({
                            "name": name,
                            "path": req.path(),
                            "body_len": body.len(),
                        }))
                    }
                }))
            })
        }));
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn hits(&self) -> u64 {
        self.flags.hits.load(Ordering::Relaxed)
    }

    /// Stops at once: connections in flight are dropped, the port closes.
    fn kill(&mut self) {
        if let Some((handle, join)) = self.server.take() {
            drop(handle.stop(false));
            let _ = join.join();
        }
        let port = self.port;
        wait_until("the port to close", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        });
    }

    fn restart(&mut self) {
        self.run();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some((handle, _)) = self.server.take() {
            drop(handle.stop(false));
        }
    }
}

/// A gateway with no Redis and no rules whose upstream part is `pools`.
fn gateway(pools: &str) -> Gateway {
    let (port, admin) = (free_port(), free_port());
    Gateway::start_config(port, admin, config_text(port, admin, pools), &[])
}

fn config_text(port: u16, admin: u16, pools: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nshutdown_timeout = \"5s\"\nworkers = 2\n\n{pools}\n[ban]\nenabled = false\n"
    )
}

fn urls(of: &[&Instance]) -> String {
    of.iter()
        .map(|i| format!("\"{}\"", i.url()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which instance answered (`-` when the gateway answered itself).
fn served_by(r: &Resp) -> String {
    serde_json::from_str::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["name"].as_str().map(str::to_string))
        .unwrap_or_else(|| "-".into())
}

/// A request with its own `Host` header, over its own connection:
/// (status, who answered, body).
fn with_host(port: u16, method: &str, host: &str, path: &str) -> (u16, String, String) {
    let raw = raw_request(
        port,
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    let name = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["name"].as_str().map(str::to_string))
        .unwrap_or_else(|| "-".into());
    (raw_status(&raw), name, body)
}

fn healthy_gauge(gw: &Gateway, pool: &str, url: &str) -> f64 {
    let text = call("GET", &gw.admin_url("/metrics"), &[], None).body;
    let series = |a: &str, b: &str| format!("floodgate_upstream_healthy{{{a},{b}}}");
    let (p, u) = (format!("pool=\"{pool}\""), format!("url=\"{url}\""));
    let (one, other) = (series(&p, &u), series(&u, &p));
    text.lines()
        .find(|l| l.starts_with(&one) || l.starts_with(&other))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

fn assert_no_post_twice(posts: &Posts) {
    let posts = posts.lock().unwrap();
    for (id, n) in posts.iter() {
        assert_eq!(*n, 1, "POST {id} reached the upstreams {n} times");
    }
}

#[test]
fn routes_pick_pools_by_host_path_and_method() {
    let posts: Posts = Posts::default();
    let (d, o, w) = (
        Instance::start("default", &posts),
        Instance::start("orders", &posts),
        Instance::start("writes", &posts),
    );
    let gw = gateway(&format!(
        "[upstream]\nurls = [{}]\n\n[upstreams.orders]\nurls = [{}]\n\n[upstreams.writes]\nurls = [{}]\n\n\
         [[routes]]\nmatch = {{ host = \"api.example.com\", path_prefix = \"/orders\" }}\nupstream = \"orders\"\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/things\", methods = [\"POST\", \"put\"] }}\nupstream = \"writes\"\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/v2\" }}\nupstream = \"orders\"\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/home\" }}\nupstream = \"default\"\n",
        urls(&[&d]),
        urls(&[&o]),
        urls(&[&w])
    ));
    let p = gw.port;
    let cases = [
        ("GET", "api.example.com", "/orders/7", "orders"),
        ("GET", "API.example.com:8080", "/ORDERS", "orders"),
        ("GET", "www.example.com", "/orders/7", "default"),
        ("POST", "x", "/things/1", "writes"),
        ("PUT", "x", "/things/1", "writes"),
        ("GET", "x", "/things/1", "default"),
        ("GET", "x", "/v2/items", "orders"),
        ("GET", "x", "/v20", "orders"),
        ("GET", "x", "/home", "default"),
        ("GET", "x", "/elsewhere", "default"),
    ];
    for (method, host, path, want) in cases {
        let (status, name, body) = with_host(p, method, host, path);
        assert_eq!(status, 200, "{method} {host}{path}: {body}");
        assert_eq!(name, want, "{method} {host}{path}");
    }
    // A path whose readings disagree on the route is refused, as for rules:
    // escaped slashes, and escaped plain letters (an upstream that decodes
    // nothing would route `/%76%32` elsewhere).
    for path in ["/x%2F..%2Fv2/items", "/%76%32/items"] {
        let (status, _, body) = with_host(p, "GET", "x", path);
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("bad_request"), "{body}");
    }
    assert!(
        gw.metric("floodgate_client_errors_total{kind=\"ambiguous_path\"}") >= 1.0,
        "the refusal is counted"
    );
    assert_eq!(gw.metric("floodgate_upstream_healthy{pool=\"orders\""), 1.0);
    assert_no_post_twice(&posts);
}

#[test]
fn a_killed_upstream_costs_idempotent_clients_nothing_and_no_post_runs_twice() {
    let posts: Posts = Posts::default();
    let a = Instance::start("a", &posts);
    let mut b = Instance::start("b", &posts);
    let c = Instance::start("c", &posts);
    let gw = gateway(&format!(
        "[upstream]\nurls = [{}]\ntimeout = \"5s\"\nconnect_timeout = \"500ms\"\neject_after = 2\neject_for = \"1s\"\nretries = 1\n",
        urls(&[&a, &b, &c])
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let url = gw.url("/load");
    let clients: Vec<_> = (0..4)
        .map(|n| {
            let (stop, seq, url) = (stop.clone(), seq.clone(), url.clone());
            thread::spawn(move || {
                let mut outcome: Vec<(String, u16, String)> = Vec::new();
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("c{n}-{}", seq.fetch_add(1, Ordering::Relaxed));
                    let headers = [("X-Request-Id", id.as_str())];
                    let r = match k % 3 {
                        0 => call("GET", &url, &headers, None),
                        1 => call("PUT", &url, &headers, Some("{\"put\":1}")),
                        _ => call("POST", &url, &headers, Some("{\"post\":1}")),
                    };
                    let kind = ["GET", "PUT", "POST"][(k % 3) as usize];
                    outcome.push((id, r.status, format!("{kind} {}", r.body)));
                    k += 1;
                }
                outcome
            })
        })
        .collect();
    let served = |i: &Instance| i.hits();
    wait_until("traffic on every upstream", Duration::from_secs(20), || {
        served(&a) > 20 && served(&b) > 20 && served(&c) > 20
    });
    b.kill();
    wait_until(
        "the dead upstream to be ejected",
        Duration::from_secs(20),
        || gw.metric("floodgate_upstream_ejections_total") >= 1.0,
    );
    let (a_before, c_before) = (a.hits(), c.hits());
    wait_until("traffic around the gap", Duration::from_secs(20), || {
        a.hits() > a_before + 20 && c.hits() > c_before + 20
    });
    b.restart();
    let b_back = b.hits();
    wait_until(
        "the restarted upstream to take traffic again",
        Duration::from_secs(30),
        || b.hits() > b_back + 20,
    );
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for t in clients {
        outcomes.extend(t.join().expect("a client thread failed"));
    }
    let mut refused_posts = 0;
    for (id, status, what) in &outcomes {
        if what.starts_with("POST") && *status == 502 {
            // Written to a connection that died: it may have been
            // processed, so it is never sent again.
            assert!(what.contains("bad_gateway"), "{id}: {what}");
            refused_posts += 1;
            continue;
        }
        assert_eq!(*status, 200, "{id}: {what}\n{}", gw.log());
    }
    assert!(outcomes.len() > 100, "only {} requests", outcomes.len());
    assert_no_post_twice(&posts);
    // Every POST answered 200 was seen exactly once.
    let seen = posts.lock().unwrap();
    for (id, status, what) in &outcomes {
        if what.starts_with("POST") && *status == 200 {
            assert_eq!(seen.get(id), Some(&1), "{id}");
        }
    }
    assert!(gw.metric("floodgate_upstream_retries_total{pool=\"default\"}") >= 1.0);
    assert_eq!(healthy_gauge(&gw, "default", &b.url()), 1.0, "readmitted");
    let log = gw.log();
    assert!(log.contains("ejected"), "{log}");
    assert!(log.contains("readmitted"), "{log}");
    eprintln!(
        "{} requests, {refused_posts} plain POSTs refused with 502",
        outcomes.len()
    );
}

#[test]
fn an_upstream_answering_503s_is_ejected_and_readmitted_when_its_ejection_ends() {
    let posts: Posts = Posts::default();
    let (a, b) = (Instance::start("a", &posts), Instance::start("b", &posts));
    let gw = gateway(&format!(
        "[upstream]\nurls = [{}]\neject_after = 3\neject_for = \"3s\"\n",
        urls(&[&a, &b])
    ));
    a.flags.fail.store(true, Ordering::Relaxed);
    let url = gw.url("/x");
    let mut saw_503 = false;
    wait_until("a to be ejected", Duration::from_secs(20), || {
        let r = get(&url, &[]);
        if r.status == 503 {
            // The upstream's own answer is passed on as it is.
            assert_eq!(served_by(&r), "a");
            saw_503 = true;
        }
        healthy_gauge(&gw, "default", &a.url()) == 0.0
    });
    assert!(saw_503);
    assert_eq!(
        gw.metric(&format!(
            "floodgate_upstream_ejections_total{{pool=\"default\",url=\"{}\"}}",
            a.url()
        )) + gw.metric(&format!(
            "floodgate_upstream_ejections_total{{url=\"{}\",pool=\"default\"}}",
            a.url()
        )),
        1.0
    );
    // Out of rotation: b takes everything.
    let a_hits = a.hits();
    for _ in 0..5 {
        let r = get(&url, &[]);
        assert_eq!((r.status, served_by(&r).as_str()), (200, "b"));
    }
    assert_eq!(a.hits(), a_hits, "an ejected upstream gets no requests");
    // Repaired; once the ejection runs out, a takes traffic again.
    a.flags.fail.store(false, Ordering::Relaxed);
    wait_until("a to be readmitted", Duration::from_secs(20), || {
        let r = get(&url, &[]);
        assert_eq!(r.status, 200);
        served_by(&r) == "a"
    });
    assert_eq!(healthy_gauge(&gw, "default", &a.url()), 1.0);
    assert!(gw.log().contains("readmitted"));
}

#[test]
fn active_probes_take_a_sick_upstream_out_and_bring_it_back() {
    let posts: Posts = Posts::default();
    let (a, b) = (Instance::start("a", &posts), Instance::start("b", &posts));
    let gw = gateway(&format!(
        "[upstream]\nurls = [\"http://127.0.0.1:9\"]\n\n[upstreams.api]\nurls = [{}]\neject_after = 0\n\
         health = {{ path = \"/healthz\", interval = \"100ms\", timeout = \"100ms\", unhealthy_after = 2, healthy_after = 2 }}\n\n\
         [[routes]]\nupstream = \"api\"\n",
        urls(&[&a, &b])
    ));
    let url = gw.url("/y");
    a.flags.sick.store(true, Ordering::Relaxed);
    wait_until("the probes to take a out", Duration::from_secs(20), || {
        healthy_gauge(&gw, "api", &a.url()) == 0.0
    });
    let a_hits = a.hits();
    for _ in 0..10 {
        let r = get(&url, &[]);
        assert_eq!((r.status, served_by(&r).as_str()), (200, "b"));
    }
    assert_eq!(a.hits(), a_hits, "an unhealthy upstream gets no requests");
    // Both sick: nothing healthy, 503 with a Retry-After of the interval.
    b.flags.sick.store(true, Ordering::Relaxed);
    wait_until("the probes to take b out", Duration::from_secs(20), || {
        healthy_gauge(&gw, "api", &b.url()) == 0.0
    });
    let r = get(&url, &[]);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"], "no_healthy_upstream");
    assert_eq!(r.header("retry-after"), Some("1"));
    a.flags.sick.store(false, Ordering::Relaxed);
    b.flags.sick.store(false, Ordering::Relaxed);
    wait_until("a to be back", Duration::from_secs(20), || {
        healthy_gauge(&gw, "api", &a.url()) == 1.0
    });
    wait_until("a to take traffic again", Duration::from_secs(20), || {
        served_by(&get(&url, &[])) == "a"
    });
    let log = gw.log();
    assert!(log.contains("is unhealthy, out of rotation"), "{log}");
    assert!(log.contains("is healthy again"), "{log}");
    assert_eq!(
        log.matches("is unhealthy, out of rotation").count(),
        2,
        "one line per change of state:\n{log}"
    );
}

#[test]
fn with_every_upstream_down_the_answer_is_503_no_healthy_upstream() {
    let dead: Vec<String> = (0..3)
        .map(|_| format!("\"http://127.0.0.1:{}\"", free_port()))
        .collect();
    let gw = gateway(&format!(
        "[upstream]\nurls = [{}]\nconnect_timeout = \"300ms\"\neject_after = 1\neject_for = \"30s\"\n",
        dead.join(", ")
    ));
    // The first request finds each one down (and is answered 502); after
    // that, nothing is left to try.
    let r = get(&gw.url("/"), &[]);
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.json()["error"], "upstream_unreachable");
    for method in ["GET", "POST"] {
        let r = call(method, &gw.url("/"), &[], Some("{}"));
        assert_eq!(r.status, 503, "{method}: {}", r.body);
        assert_eq!(r.json()["error"], "no_healthy_upstream");
        let after: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .expect("a Retry-After in whole seconds");
        assert!((1..=30).contains(&after), "Retry-After {after}");
    }
    assert_eq!(
        gw.metric("floodgate_upstream_healthy{pool=\"default\""),
        0.0
    );
    assert_eq!(gw.metric("floodgate_upstream_ejections_total"), 3.0);
    assert!(
        gw.metric("floodgate_upstream_errors_total{kind=\"no_healthy_upstream\"}") >= 2.0,
        "counted"
    );
}

/// An upstream that reads each request and closes the connection without
/// answering (as a process that crashes while handling it would), counting
/// the POSTs it read.
fn drops_every_request(posts: &Posts) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let posts = posts.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let posts = posts.clone();
            thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk) else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let head = &text[..end];
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() < end + 4 + len {
                        continue;
                    }
                    if head.starts_with("POST") {
                        let id = head.lines().find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("x-request-id:")
                                .map(|v| v.trim().to_string())
                        });
                        count_post(&posts, id.as_deref());
                    }
                    let _ = s.flush();
                    return; // closes without an answer
                }
            });
        }
    });
    port
}

#[test]
fn a_request_that_may_have_been_processed_is_retried_elsewhere_only_when_safe() {
    let posts: Posts = Posts::default();
    let dropper = drops_every_request(&posts);
    let good = Instance::start("good", &posts);
    let gw = gateway(&format!(
        "[upstream]\nurls = [\"http://127.0.0.1:{dropper}\", \"{}\"]\nretries = 1\neject_after = 0\n",
        good.url()
    ));
    let url = gw.url("/pay");
    let mut refused = 0;
    for i in 0..30 {
        let id = format!("req-{i}");
        let key = format!("key-{i}");
        let mut headers = vec![("X-Request-Id", id.as_str())];
        match i % 3 {
            0 => {
                let r = get(&url, &headers);
                assert_eq!((r.status, served_by(&r).as_str()), (200, "good"), "{i}");
            }
            1 => {
                headers.push(("Idempotency-Key", key.as_str()));
                let r = call("POST", &url, &headers, Some("{\"amount\":5}"));
                assert_eq!((r.status, served_by(&r).as_str()), (200, "good"), "{i}");
            }
            _ => {
                let r = call("POST", &url, &headers, Some("{\"amount\":5}"));
                match r.status {
                    200 => assert_eq!(served_by(&r), "good"),
                    502 => {
                        assert_eq!(r.json()["error"], "bad_gateway");
                        refused += 1;
                    }
                    s => panic!("{i}: {s} {}", r.body),
                }
                assert_eq!(
                    posts.lock().unwrap().get(&id),
                    Some(&1),
                    "a plain POST reaches exactly one upstream once"
                );
            }
        }
    }
    assert!(refused >= 1, "some plain POST met the dropping upstream");
    assert!(gw.metric("floodgate_upstream_retries_total{pool=\"default\"}") >= 1.0);
    // Only the plain POSTs are in question here; a POST with an
    // Idempotency-Key may be read twice (the upstream deduplicates).
    let posts = posts.lock().unwrap();
    for (id, n) in posts.iter() {
        let i: usize = id.trim_start_matches("req-").parse().unwrap();
        if i % 3 == 2 {
            assert_eq!(*n, 1, "{id}");
        }
    }
}

#[test]
fn a_reload_that_moves_a_route_takes_effect_and_keeps_health() {
    let posts: Posts = Posts::default();
    let (d, o, n) = (
        Instance::start("default", &posts),
        Instance::start("orders", &posts),
        Instance::start("new", &posts),
    );
    let (port, admin) = (free_port(), free_port());
    let pools = |target: &str| {
        format!(
            "[upstream]\nurls = [{}]\n\n[upstreams.orders]\nurls = [{}]\n\n[upstreams.new]\nurls = [{}]\n\n\
             [[routes]]\nmatch = {{ path_prefix = \"/orders\" }}\nupstream = \"{target}\"\n",
            urls(&[&d]),
            urls(&[&o]),
            urls(&[&n])
        )
    };
    let mut gw =
        Gateway::start_config(port, admin, config_text(port, admin, &pools("orders")), &[]);
    assert_eq!(served_by(&get(&gw.url("/orders/1"), &[])), "orders");

    // SIGHUP with the route moved.
    gw.write_config(&config_text(port, admin, &pools("new")));
    gw.hangup();
    wait_until("the route to move", Duration::from_secs(10), || {
        served_by(&get(&gw.url("/orders/1"), &[])) == "new"
    });
    assert_eq!(served_by(&get(&gw.url("/other"), &[])), "default");

    // A route naming a pool that does not exist changes nothing.
    gw.write_config(&config_text(port, admin, &pools("missing")));
    let r = gw.admin("POST", "/admin/reload", None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("routes[0].upstream"), "{}", r.body);
    assert_eq!(served_by(&get(&gw.url("/orders/1"), &[])), "new");

    // Back by the admin API.
    gw.write_config(&config_text(port, admin, &pools("orders")));
    let r = gw.admin("POST", "/admin/reload", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(served_by(&get(&gw.url("/orders/1"), &[])), "orders");
    assert_eq!(
        gw.metric("floodgate_config_reloads_total{result=\"ok\"}"),
        2.0
    );
    assert_eq!(healthy_gauge(&gw, "new", &n.url()), 1.0);
    assert_no_post_twice(&posts);
}

#[test]
fn a_reload_keeps_an_ejected_url_out() {
    let posts: Posts = Posts::default();
    let (a, b) = (Instance::start("a", &posts), Instance::start("b", &posts));
    let (port, admin) = (free_port(), free_port());
    let text = |timeout: &str| {
        config_text(
            port,
            admin,
            &format!(
                "[upstream]\nurls = [{}]\ntimeout = \"{timeout}\"\neject_after = 2\neject_for = \"1h\"\n",
                urls(&[&a, &b])
            ),
        )
    };
    let mut gw = Gateway::start_config(port, admin, text("5s"), &[]);
    a.flags.fail.store(true, Ordering::Relaxed);
    wait_until("a to be ejected", Duration::from_secs(20), || {
        get(&gw.url("/"), &[]);
        healthy_gauge(&gw, "default", &a.url()) == 0.0
    });
    a.flags.fail.store(false, Ordering::Relaxed);
    // A reload that changes the pool's settings keeps what it knows of a.
    gw.write_config(&text("6s"));
    let r = gw.admin("POST", "/admin/reload", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let a_hits = a.hits();
    for _ in 0..6 {
        assert_eq!(served_by(&get(&gw.url("/"), &[])), "b");
    }
    assert_eq!(a.hits(), a_hits);
    assert_eq!(healthy_gauge(&gw, "default", &a.url()), 0.0);
}

#[test]
fn pool_and_route_config_errors_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[upstream]\nurls = [\"http://127.0.0.1:3000\"]\n";
    let cases = [
        ("[[routes]]\nupstream = \"nope\"\n", "routes[0].upstream"),
        (
            "[upstreams.a]\nurls = [\"http://127.0.0.1:1\"]\n[upstreams.a]\nurls = [\"http://127.0.0.1:2\"]\n",
            "upstreams.a",
        ),
        (
            "[upstreams.a]\nurls = [\"http://127.0.0.1:1\", \"http://127.0.0.1:1\"]\n",
            "upstreams.a.urls[1]",
        ),
        (
            "[upstreams.a]\nurls = [\"http://127.0.0.1:1\"]\nhealth = { path = \"/h\", interval = \"1s\", timeout = \"5s\" }\n",
            "upstreams.a.health.timeout",
        ),
        (
            "[upstreams.a]\nurls = [\"http://127.0.0.1:1\"]\nhealth = { path = \"/h\", unhealthy_after = 0 }\n",
            "upstreams.a.health.unhealthy_after",
        ),
        (
            "[upstreams.a]\nurls = [\"http://127.0.0.1:1\"]\neject_for = \"0s\"\n",
            "upstreams.a.eject_for",
        ),
        (
            "[[routes]]\nupstream = \"default\"\nmatch = { path_prefix = \"/a/../b\" }\n",
            "routes[0].match.path_prefix",
        ),
        (
            "[[routes]]\nupstream = \"default\"\nmatch = { methods = [] }\n",
            "routes[0].match.methods",
        ),
        (
            "[[routes]]\nupstream = \"default\"\nmatch = { path = \"/a\" }\n",
            "routes",
        ),
        ("[upstreams.\"b c\"]\nurls = [\"http://127.0.0.1:1\"]\n", "upstreams.b c"),
    ];
    for (i, (extra, key)) in cases.iter().enumerate() {
        let path = write_file(dir.path(), &format!("c{i}.toml"), &format!("{base}{extra}"));
        for check in [true, false] {
            let mut cmd = std::process::Command::new(binary());
            cmd.arg("--config").arg(&path);
            if check {
                cmd.arg("--check");
            }
            let out = cmd.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "case {i} ({key}): {err}");
            assert!(err.contains(key), "case {i}: `{key}` not named in: {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
}

/// An upstream that accepts WebSockets, says `hello`, then echoes text.
fn websocket_echo() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            thread::spawn(move || {
                let Ok(mut ws) = tungstenite::accept(stream) else {
                    return;
                };
                if ws.send(tungstenite::Message::text("hello")).is_err() {
                    return;
                }
                while let Ok(tungstenite::Message::Text(t)) = ws.read() {
                    let reply = tungstenite::Message::text(format!("echo: {}", t.as_str()));
                    if ws.send(reply).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn a_websocket_upgrade_goes_to_its_routed_pool_and_past_a_dead_member() {
    let posts: Posts = Posts::default();
    let http_only = Instance::start("default", &posts);
    let echo = websocket_echo();
    let dead = free_port();
    let gw = gateway(&format!(
        "[upstream]\nurls = [{}]\n\n[upstreams.live]\nurls = [\"http://127.0.0.1:{dead}\", \"http://127.0.0.1:{echo}\"]\neject_after = 0\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/ws\" }}\nupstream = \"live\"\n",
        urls(&[&http_only])
    ));
    // Upgrades meet the dead member first in turn; none may fail.
    for i in 0..4 {
        let (mut ws, resp) = tungstenite::connect(format!("ws://127.0.0.1:{}/ws/chat", gw.port))
            .unwrap_or_else(|e| {
                panic!("upgrade {i}: {e}\n{}", gw.log());
            });
        assert_eq!(resp.status().as_u16(), 101);
        assert_eq!(ws.read().unwrap().into_text().unwrap().as_str(), "hello");
        ws.send(tungstenite::Message::text(format!("m{i}")))
            .unwrap();
        assert_eq!(
            ws.read().unwrap().into_text().unwrap().as_str(),
            format!("echo: m{i}")
        );
        let _ = ws.close(None);
    }
    assert!(gw.metric("floodgate_upstream_retries_total{pool=\"live\"}") >= 1.0);
    assert_eq!(http_only.hits(), 0, "no upgrade went to the default pool");
}

/// A client that sends requests the upstream answers with 500 (its own
/// request's fault) ejects nothing, and one whose every URL answers 503
/// still leaves the pool its last URL: a client cannot empty a pool.
#[test]
fn no_client_can_empty_a_pool_with_what_the_upstream_answers() {
    let posts: Posts = Posts::default();
    let (a, b) = (Instance::start("a", &posts), Instance::start("b", &posts));
    let gw = gateway(&format!(
        "[upstream]\nurls = [{}]\neject_after = 5\neject_for = \"30s\"\n",
        urls(&[&a, &b])
    ));
    for _ in 0..20 {
        assert_eq!(get(&gw.url("/boom"), &[]).status, 500);
    }
    assert_eq!(gw.metric("floodgate_upstream_ejections_total"), 0.0);
    let r = get(&gw.url("/"), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    // Both answer 503 to everything: one may go out, never both.
    a.flags.fail.store(true, Ordering::Relaxed);
    b.flags.fail.store(true, Ordering::Relaxed);
    for _ in 0..30 {
        let r = get(&gw.url("/x"), &[]);
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(
            !r.body.contains("no_healthy_upstream"),
            "the pool was emptied"
        );
    }
    assert_eq!(gw.metric("floodgate_upstream_ejections_total"), 1.0);
    assert!(gw.metric("floodgate_upstream_ejections_held_back_total") >= 1.0);
    a.flags.fail.store(false, Ordering::Relaxed);
    b.flags.fail.store(false, Ordering::Relaxed);
    assert_eq!(get(&gw.url("/"), &[]).status, 200);
}
