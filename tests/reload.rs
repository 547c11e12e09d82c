//! Reloading the configuration of a running gateway: SIGHUP and
//! POST /admin/reload, under load, with broken files, with keys that need a
//! restart, and with the parts a reload changes (rules, upstreams,
//! allowlist, ban settings).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

fn rule(name: &str, path: &str, rate: u32, per: &str, burst: u32) -> String {
    format!(
        "[[rules]]\nname = \"{name}\"\nkey = \"ip\"\nrate = {rate}\nper = \"{per}\"\nburst = {burst}\nmatch = {{ path_prefix = \"{path}\" }}\n"
    )
}

/// A gateway on `redis` and `up` whose config the test can rewrite with the
/// same ports and key prefix.
struct Reloadable {
    gw: Gateway,
    redis: String,
    upstream: String,
    prefix: String,
}

impl Reloadable {
    fn start(redis: &RedisServer, up: &Upstream, rules: &str, extra: &str) -> Reloadable {
        let prefix = prefix();
        let gw = Gateway::start(&Setup {
            redis: Some(redis.url()),
            upstream: &up.url(),
            prefix: &prefix,
            rules,
            extra,
        });
        Reloadable {
            gw,
            redis: redis.url(),
            upstream: up.url(),
            prefix,
        }
    }

    /// The config text this gateway would have with `rules` and `extra`.
    fn text(&self, rules: &str, extra: &str) -> String {
        Gateway::config(
            self.gw.port,
            self.gw.admin_port,
            &Setup {
                redis: Some(self.redis.clone()),
                upstream: &self.upstream,
                prefix: &self.prefix,
                rules,
                extra,
            },
        )
    }

    /// Rewrites the config file with `rules` and `extra`.
    fn rewrite(&mut self, rules: &str, extra: &str) {
        let text = self.text(rules, extra);
        self.gw.write_config(&text);
    }

    fn reloads(&self) -> u64 {
        self.gw.admin("GET", "/admin/config", None).json()["reloads"]
            .as_u64()
            .unwrap()
    }
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn statuses(url: &str, ip: &str, n: usize) -> Vec<u16> {
    (0..n).map(|_| get_as(url, ip).status).collect()
}

/// What the load loop saw.
#[derive(Default)]
struct LoadResult {
    ok: u64,
    limited: u64,
    failed: Vec<String>,
}

/// Requests from one client, one at a time on a keep-alive connection,
/// until `stop` (at most `limit`).
fn load_loop(
    url: String,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> thread::JoinHandle<LoadResult> {
    thread::spawn(move || {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(10))
            .build();
        let mut r = LoadResult::default();
        let start = Instant::now();
        while !stop.load(Ordering::Relaxed) && start.elapsed() < limit {
            match agent
                .get(&url)
                .set("X-Forwarded-For", "198.51.100.7")
                .call()
            {
                Ok(resp) => {
                    let _ = resp.into_string();
                    r.ok += 1;
                }
                Err(ureq::Error::Status(429, resp)) => {
                    let _ = resp.into_string();
                    r.limited += 1;
                }
                Err(ureq::Error::Status(code, _)) => r.failed.push(format!("status {code}")),
                Err(e) => r.failed.push(e.to_string()),
            }
        }
        r
    })
}

#[test]
fn ten_reloads_under_load_fail_no_request_and_the_new_limit_holds_at_once() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let load_rule = |burst| rule("per-ip", "/load", 1000, "1s", burst);
    let mut r = Reloadable::start(&redis, &up, &load_rule(1000), "");
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..4)
        .map(|_| load_loop(r.gw.url("/load"), stop.clone(), Duration::from_secs(60)))
        .collect();
    thread::sleep(Duration::from_millis(200));

    for i in 1..=10u64 {
        // Rules come and go and change; the last file adds a tight limit.
        let mut rules = load_rule(1000 - i as u32 % 2);
        if i % 3 == 0 {
            rules.push_str(&rule(&format!("extra-{i}"), "/never", 5, "1s", 5));
        }
        if i == 10 {
            rules.push_str(&rule("tight", "/tight", 1, "60s", 3));
        }
        r.rewrite(&rules, "");
        r.gw.hangup();
        wait_until("the reload to be applied", Duration::from_secs(10), || {
            r.reloads() == i
        });
        thread::sleep(Duration::from_millis(100));
    }
    // Right after the last reload, its new rule holds.
    assert_eq!(
        statuses(&r.gw.url("/tight"), "198.51.100.99", 4),
        vec![200, 200, 200, 429]
    );

    stop.store(true, Ordering::Relaxed);
    let mut seen = LoadResult::default();
    for l in loops {
        let r = l.join().unwrap();
        seen.ok += r.ok;
        seen.limited += r.limited;
        seen.failed.extend(r.failed);
    }
    eprintln!(
        "10 reloads under load: {} requests ({} allowed, {} limited), {} failed",
        seen.ok + seen.limited + seen.failed.len() as u64,
        seen.ok,
        seen.limited,
        seen.failed.len()
    );
    assert!(
        seen.failed.is_empty(),
        "requests failed during reloads: {:?}",
        seen.failed
    );
    assert!(seen.ok > 100, "the load loop ran: {} requests", seen.ok);
    assert_eq!(
        r.gw.metric("floodgate_config_reloads_total{result=\"ok\"}"),
        10.0
    );
    assert_eq!(
        r.gw.log().matches("configuration reloaded from").count(),
        10
    );
}

#[test]
fn a_rule_that_keeps_its_name_keeps_its_bucket() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let per_ip = rule("per-ip", "/", 1, "60s", 5);
    let mut r = Reloadable::start(&redis, &up, &per_ip, "");
    let url = r.gw.url("/a");
    for _ in 0..3 {
        assert_eq!(get_as(&url, "203.0.113.20").status, 200);
    }
    // Another rule arrives; per-ip stays as it was.
    r.rewrite(
        &format!("{per_ip}{}", rule("other", "/other", 1, "1s", 1)),
        "",
    );
    let done = r.gw.admin("POST", "/admin/reload", Some("{}"));
    assert_eq!(done.status, 200, "{}", done.body);
    let resp = get_as(&url, "203.0.113.20");
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("ratelimit-remaining"),
        Some("1"),
        "the bucket went on from where it was"
    );
    // A renamed rule is a new bucket.
    r.rewrite(&rule("per-ip-v2", "/", 1, "60s", 5), "");
    assert_eq!(r.gw.admin("POST", "/admin/reload", None).status, 200);
    let resp = get_as(&url, "203.0.113.20");
    assert_eq!(resp.header("ratelimit-remaining"), Some("4"));
    assert_eq!(r.gw.requests_metric("per-ip-v2", "allowed"), 1);
}

#[test]
fn a_broken_file_changes_nothing_and_says_why() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let mut r = Reloadable::start(&redis, &up, &rule("per-ip", "/", 1, "60s", 2), "");
    let original = sha256_hex(r.gw.config_text());
    let path = r.gw.config_path().display().to_string();

    // A file that parses but is wrong: the endpoint answers 400 and why.
    r.rewrite(&rule("per-ip", "/", 0, "60s", 100), "");
    let resp = r.gw.admin("POST", "/admin/reload", None);
    assert_eq!(resp.status, 400, "{}", resp.body);
    let body = resp.json();
    assert_eq!(body["error"], "invalid_config");
    assert_eq!(body["key"], "rules[0].rate");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(&path) && message.contains("rules[0].rate"),
        "{message}"
    );

    // A file that does not parse, by SIGHUP: one log line says why.
    r.gw.write_config("[upstream\nurls = [");
    r.gw.hangup();
    wait_until(
        "the failed reload to be counted",
        Duration::from_secs(10),
        || {
            r.gw.metric("floodgate_config_reloads_total{result=\"error\"}") == 2.0
        },
    );
    let log = r.gw.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reload refused"))
        .collect();
    assert_eq!(refusals.len(), 2, "{log}");
    assert!(
        refusals[0].contains(&path) && refusals[0].contains("rules[0].rate"),
        "{}",
        refusals[0]
    );
    assert!(refusals[1].contains(&path) && refusals[1].contains("upstream"));

    // The old configuration is still the one in effect.
    let status = r.gw.admin("GET", "/admin/config", None).json();
    assert_eq!(status["reloads"], 0);
    assert_eq!(status["sha256"], original.as_str());
    assert_eq!(
        statuses(&r.gw.url("/x"), "203.0.113.30", 3),
        vec![200, 200, 429],
        "the old limit holds"
    );
    assert_eq!(
        r.gw.metric("floodgate_config_reloads_total{result=\"ok\"}"),
        0.0
    );
}

#[test]
fn restart_only_keys_are_reported_and_the_rest_applies() {
    let (redis, up, up2) = (RedisServer::start(), Upstream::start(), Upstream::start());
    let mut r = Reloadable::start(&redis, &up, &rule("per-ip", "/", 1, "60s", 2), "");
    let old_port = r.gw.port;
    let new_port = free_port();

    // New listen address and workers (restart only); new upstream,
    // allowlist and rules (reloadable).
    let text = format!(
        "allowlist = [\"198.51.100.0/24\"]\n{}",
        r.text(&rule("per-ip", "/", 1, "60s", 3), "")
    )
    .replace(
        &format!("listen = \"127.0.0.1:{old_port}\""),
        &format!("listen = \"127.0.0.1:{new_port}\""),
    )
    .replace("workers = 2", "workers = 3")
    .replace(&up.url(), &up2.url());
    r.gw.write_config(&text);

    let anonymous = call("POST", &r.gw.admin_url("/admin/reload"), &[], None);
    assert_eq!(anonymous.status, 401, "the token is required");
    let resp = r.gw.admin("POST", "/admin/reload", None);
    assert_eq!(resp.status, 200, "{}", resp.body);
    let body = resp.json();
    assert_eq!(
        body["restart_needed"],
        serde_json::json!(["server.listen", "server.workers"])
    );
    assert_eq!(body["sha256"], sha256_hex(&text).as_str());
    assert!(r
        .gw
        .log()
        .contains("keep their old value until a restart: server.listen, server.workers"));

    // Still on the old port; not on the new one.
    assert!(std::net::TcpStream::connect(("127.0.0.1", new_port)).is_err());
    // The new upstream, the new burst, the new allowlist.
    let before = (up.hits(), up2.hits());
    assert_eq!(
        statuses(&r.gw.url("/x"), "203.0.113.40", 4),
        vec![200, 200, 200, 429]
    );
    assert_eq!((up.hits(), up2.hits()), (before.0, before.1 + 3));
    let allowed = statuses(&r.gw.url("/x"), "198.51.100.5", 5);
    assert_eq!(allowed, vec![200; 5], "allowlisted by the reload");

    let status = r.gw.admin("GET", "/admin/config", None).json();
    assert_eq!(status["reloads"], 1);
    assert_eq!(status["sha256"], sha256_hex(&text).as_str());
    let loaded_at = status["loaded_at"].as_str().unwrap();
    assert!(
        humantime::parse_rfc3339(loaded_at).is_ok(),
        "RFC 3339: {loaded_at}"
    );
    assert_eq!(
        r.gw.admin("GET", "/admin/allowlist", None).json()["config"],
        serde_json::json!(["198.51.100.0/24"])
    );
}

#[test]
fn ban_settings_follow_a_reload() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let ban = "[ban]\nafter = 2\nwithin = \"10s\"\nduration = \"1m\"\nstatus = 429\n";
    let per_ip = rule("per-ip", "/", 1, "60s", 1);
    let mut r = Reloadable::start(&redis, &up, &per_ip, ban);
    let url = r.gw.url("/x");
    assert_eq!(statuses(&url, "203.0.113.50", 3), vec![200, 429, 429]);
    let banned = get_as(&url, "203.0.113.50");
    assert_eq!(banned.json()["error"], "banned");
    assert_eq!(banned.status, 429);

    r.rewrite(&per_ip, &ban.replace("status = 429", "status = 403"));
    assert_eq!(r.gw.admin("POST", "/admin/reload", None).status, 200);
    let banned = get_as(&url, "203.0.113.50");
    assert_eq!(
        (banned.status, banned.json()["error"].as_str()),
        (403, Some("banned"))
    );
}
