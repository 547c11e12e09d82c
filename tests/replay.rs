//! `floodgate replay` as operators run it: the binary on log files, its
//! report, its exit codes; `--suggest`'s proposals confirmed by replaying
//! with them; and the same recorded traffic through a live gateway (with
//! Redis) and through the replay, refused alike.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use common::*;

const UPSTREAM: &str = "[upstream]\nurls = [\"http://127.0.0.1:9\"]\n";

/// Runs `floodgate replay ARGS`; returns (exit code, stdout, stderr).
fn replay(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .arg("replay")
        .args(args)
        .output()
        .expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a replay with `--json` and returns its report.
fn replay_json(config: &Path, extra: &[&str], logs: &[&Path]) -> Value {
    let mut args = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(logs.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = replay(&args);
    assert_eq!(code, 0, "replay failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// One rule's entry of a report.
fn rule<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["rules"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["rule"] == name))
        .unwrap_or_else(|| panic!("no rule {name} in {report}"))
}

/// A floodgate access-log line.
fn line(ms: u64, ip: &str, method: &str, path: &str, key: Option<&str>) -> String {
    let time = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(1_777_636_800_000 + ms),
    );
    let keys = key.map_or(String::new(), |k| {
        format!(",\"keys\":{{\"x-api-key\":\"{k}\"}}")
    });
    format!("{{\"time\":\"{time}\",\"client\":\"{ip}\",\"method\":\"{method}\",\"host\":\"api.example.com\",\"path\":\"{path}\",\"status\":200,\"decision\":\"allowed\",\"rule\":null,\"bytes\":0,\"duration_ms\":1.0{keys}}}\n")
}

#[test]
fn a_recorded_burst_is_refused_then_banned_and_malformed_lines_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "candidate.toml",
        &format!("{UPSTREAM}[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = 1\nper = \"1h\"\nburst = 5\n\n[ban]\nafter = 2\nwithin = \"1m\"\nduration = \"10m\"\n"),
    );
    // 203.0.113.7 sends eight requests within a second: five pass, the
    // sixth is refused, the seventh is refused again and bans, the eighth
    // meets the ban. 198.51.100.1 sends two, both pass.
    let mut json = String::new();
    for i in 0..8 {
        json.push_str(&line(i * 100, "203.0.113.7", "GET", "/a", None));
        if i == 1 {
            json.push_str("{\"time\": \"not a time\"}\n");
        }
    }
    let a = write_file(dir.path(), "node-a.log", &json);
    // Another node's log, in the combined format, merged by time.
    let combined = "198.51.100.1 - - [01/May/2026:12:00:00 +0000] \"GET /a?x=1 HTTP/1.1\" 200 5 \"-\" \"curl\"\n\
                    this line is garbage\n\
                    198.51.100.1 - - [01/May/2026:12:00:01 +0000] \"GET /b HTTP/1.1\" 200 5 \"-\" \"curl\"\n";
    let b = write_file(dir.path(), "node-b.log", combined);

    // No reorder window: only the merge of the two files keeps time in
    // order.
    let r = replay_json(&config, &["--reorder", "0s"], &[&a, &b]);
    let t = &r["totals"];
    assert_eq!(t["requests"], 10, "{r}");
    assert_eq!(
        r["input"]["late"], 0,
        "two nodes' logs are merged by time: {r}"
    );
    assert_eq!(
        (
            t["allowed"].as_u64(),
            t["limited"].as_u64(),
            t["banned"].as_u64()
        ),
        (Some(7), Some(1), Some(2)),
        "{r}"
    );
    let per_ip = rule(&r, "per-ip");
    assert_eq!(
        per_ip["matched"], 9,
        "the banned request never reaches the rules: {r}"
    );
    assert_eq!(per_ip["refused"], 1);
    assert_eq!(per_ip["subjects"], 2);
    assert_eq!(per_ip["refused_subjects"], 1);
    assert_eq!(per_ip["bans"], 1);
    assert_eq!(per_ip["top_refused"][0]["subject"], "ip:203.0.113.7");
    assert_eq!(r["bans"]["made"], 1);
    assert_eq!(r["bans"]["top"][0]["subject"], "ip:203.0.113.7");
    assert_eq!(r["bans"]["top"][0]["longest_ms"], 600_000);
    // Malformed lines are counted and named by file and line, never fatal.
    assert_eq!(r["input"]["malformed"], 2);
    let named: Vec<(String, u64)> = r["input"]["first_malformed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["file"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string(),
                m["line"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(named.contains(&("node-a.log".into(), 3)), "{named:?}");
    assert!(named.contains(&("node-b.log".into(), 2)), "{named:?}");

    // The same for people.
    let (code, out, _) = replay(&[
        "--config",
        config.to_str().unwrap(),
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("per-ip") && out.contains("ip:203.0.113.7"),
        "{out}"
    );
    assert!(out.contains("node-a.log:3:"), "{out}");
}

#[test]
fn usage_config_and_log_errors_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_file(dir.path(), "ok.toml", UPSTREAM);
    let bad = write_file(
        dir.path(),
        "bad.toml",
        &format!("{UPSTREAM}[[rules]]\nname = \"r\"\nrate = -1\nper = \"1s\"\nburst = 1\n"),
    );
    let log = write_file(
        dir.path(),
        "a.log",
        &line(0, "203.0.113.7", "GET", "/", None),
    );
    let (g, b, l) = (
        good.to_str().unwrap(),
        bad.to_str().unwrap(),
        log.to_str().unwrap(),
    );
    let missing = dir.path().join("missing.log");
    let m = missing.to_str().unwrap();
    for (args, says) in [
        (vec![l], "--config"),
        (vec!["--config", b, l], "invalid configuration"),
        (vec!["--config", g, m], "cannot read the log"),
        (
            vec!["--config", g, "--field", "when=ts", l],
            "--field when=ts",
        ),
        (
            vec!["--config", g, "--refuse-at-most", "1%", l],
            "goes with --suggest",
        ),
        (
            vec!["--config", g, "--suggest", "--refuse-at-most", "150%", l],
            "--refuse-at-most",
        ),
        (vec!["--config", g, "--reorder", "soon", l], "--reorder"),
        (vec!["--config", g, "--format", "xml", l], "xml"),
    ] {
        let (code, out, err) = replay(&args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, _, err) = replay(&["--config", g, l]);
    assert_eq!(code, 0, "{err}");
}

/// A small xorshift generator: the same traffic on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Ten minutes of traffic from 400 clients, a few of them bursty, a few
/// of them with API keys.
fn traffic(rng: &mut Rng) -> String {
    let mut out = String::new();
    let mut ms = 0;
    for _ in 0..20_000 {
        ms += rng.below(60);
        let client = match rng.below(10) {
            0 => rng.below(5),
            1..=3 => 5 + rng.below(40),
            _ => 45 + rng.below(355),
        };
        let ip = format!("10.7.{}.{}", client / 256, client % 256);
        let key = (client % 7 == 0).then(|| format!("{:064x}", client % 21));
        let path = if rng.below(20) == 0 { "/login" } else { "/api" };
        out.push_str(&line(ms, &ip, "GET", path, key.as_deref()));
        // Bursts: some clients send a few at once.
        if client < 5 && rng.below(3) == 0 {
            for _ in 0..rng.below(8) {
                out.push_str(&line(ms, &ip, "GET", "/api", key.as_deref()));
            }
        }
    }
    out
}

/// The proposal of `rule` in a `--suggest` report, as config keys.
fn proposal(report: &Value, name: &str) -> (String, u64) {
    let s = report["suggestions"]
        .as_array()
        .and_then(|ss| ss.iter().find(|s| s["rule"] == name))
        .unwrap_or_else(|| panic!("no suggestion for {name}: {report}"));
    let p = &s["proposal"];
    let keys = match p["kind"].as_str() {
        Some("rate") => format!(
            "rate = {}\nper = \"{}\"\nburst = {}\n",
            p["rate"],
            p["per"].as_str().unwrap(),
            p["burst"]
        ),
        Some("quota") => format!(
            "quota = {}\nperiod = \"{}\"\n",
            p["quota"],
            p["period"].as_str().unwrap()
        ),
        _ => panic!("no proposal for {name}: {s}"),
    };
    (keys, s["refused_subjects"].as_u64().unwrap())
}

fn rules_with(per_ip: &str, login: &str, per_key: &str) -> String {
    format!(
        "{UPSTREAM}[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\n{per_ip}\n[[rules]]\nname = \"login\"\nkey = \"ip\"\nmatch = {{ path_prefix = \"/login\" }}\n{login}\n[[rules]]\nname = \"per-key\"\nkey = \"header:X-Api-Key\"\n{per_key}\n[ban]\nafter = 5\nwithin = \"1m\"\nduration = \"1m\"\n"
    )
}

#[test]
fn suggested_limits_refuse_no_more_than_the_asked_share_when_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let log = write_file(dir.path(), "traffic.log", &traffic(&mut Rng(0x5eed)));
    let first = write_file(
        dir.path(),
        "first.toml",
        &rules_with(
            "rate = 1\nper = \"1s\"\nburst = 1\n",
            "quota = 1\nperiod = \"hour\"\n",
            "rate = 1\nper = \"1s\"\nburst = 1\n",
        ),
    );
    for share in ["2%", "0.5%", "0"] {
        let asked = if share == "0" {
            0.0
        } else {
            share.trim_end_matches('%').parse::<f64>().unwrap() / 100.0
        };
        let suggested = replay_json(&first, &["--suggest", "--refuse-at-most", share], &[&log]);
        let (ip, ip_refused) = proposal(&suggested, "per-ip");
        let (login, _) = proposal(&suggested, "login");
        let (key, _) = proposal(&suggested, "per-key");
        let percentiles = &suggested["suggestions"][0]["peaks"];
        assert!(
            percentiles["max"].as_u64() >= percentiles["p50"].as_u64(),
            "{percentiles}"
        );

        // All three rules together, bans on: no rule refuses more subjects
        // than its proposal said, nor more than the share allows.
        let candidate = write_file(dir.path(), "candidate.toml", &rules_with(&ip, &login, &key));
        let confirmed = replay_json(&candidate, &[], &[&log]);
        for name in ["per-ip", "login", "per-key"] {
            let r = rule(&confirmed, name);
            let subjects = r["subjects"].as_u64().unwrap();
            let refused = r["refused_subjects"].as_u64().unwrap();
            assert!(subjects > 0, "{name}: {r}");
            assert!(
                refused as f64 <= (asked * subjects as f64).floor(),
                "{name} with {share}: {refused} of {subjects} refused: {r}"
            );
        }

        // The rate rule alone, bans off: exactly as many refused as the
        // proposal said, and one less burst refuses more than the share.
        let alone = |per_ip: &str| {
            format!("{UPSTREAM}[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\n{per_ip}\n[ban]\nenabled = false\n")
        };
        let exact = write_file(dir.path(), "alone.toml", &alone(&ip));
        let r = replay_json(&exact, &[], &[&log]);
        let per_ip = rule(&r, "per-ip");
        assert_eq!(
            per_ip["refused_subjects"].as_u64(),
            Some(ip_refused),
            "{share}: {ip} {per_ip}"
        );
        let burst: u64 = ip
            .lines()
            .find_map(|l| l.strip_prefix("burst = "))
            .unwrap()
            .parse()
            .unwrap();
        if burst > 1 {
            let tighter = ip.replace(
                &format!("burst = {burst}"),
                &format!("burst = {}", burst - 1),
            );
            let tight = write_file(dir.path(), "tight.toml", &alone(&tighter));
            let r = replay_json(&tight, &[], &[&log]);
            let per_ip = rule(&r, "per-ip");
            let subjects = per_ip["subjects"].as_u64().unwrap();
            assert!(
                per_ip["refused_subjects"].as_u64().unwrap() as f64
                    > (asked * subjects as f64).floor(),
                "{share}: burst {} refuses no more: {per_ip}",
                burst - 1
            );
        }
    }
}

/// The subject a refusal of `rule` falls on, from a recorded line.
fn subject_of(rule: &str, line: &Value) -> String {
    match rule {
        "per-ip" | "failures" => format!("ip:{}", line["client"].as_str().unwrap()),
        "global-cap" => "global".into(),
        _ => format!("consumer:{}", line["keys"]["x-api-key"].as_str().unwrap()),
    }
}

#[test]
fn a_live_gateway_and_the_replay_of_its_log_refuse_alike() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let log_path: PathBuf = dir.path().join("access.log");
    // Rates so slow that the few milliseconds between the gateway's clock
    // and Redis' cannot matter: every refusal is about counts and order.
    let rules = "[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = 1\nper = \"1h\"\nburst = 6\n\n\
                 [[rules]]\nname = \"per-key\"\nkey = \"header:X-Api-Key\"\nrate = 1\nper = \"1h\"\nburst = 5\n\n\
                 [[rules]]\nname = \"global-cap\"\nkey = \"global\"\nmatch = { path_prefix = \"/busy\" }\nrate = 1\nper = \"1h\"\nburst = 12\n\n\
                 [[rules]]\nname = \"failures\"\nkey = \"ip\"\nmatch = { path_prefix = \"/status\" }\nrate = 1\nper = \"1h\"\nburst = 3\ncount = { status = [401] }\n";
    let extra = "[consumers]\nkey = \"header:X-Api-Key\"\nkeys = { \"k-pro\" = \"pro\" }\n\n[plans.pro]\nrules = [ { name = \"pro-quota\", quota = 3, period = \"day\" } ]\n\n\
         [ban]\nafter = 3\nwithin = \"1m\"\nduration = \"1m\"\n";
    let (port, admin_port, config) = Gateway::config_on(&redis, &up.url(), rules, extra);
    let config = config.replacen(
        "[server]\n",
        &format!("[server]\naccess_log = \"{}\"\n", log_path.display()),
        1,
    );
    let gw = Gateway::start_config(port, admin_port, config.clone(), &[]);

    // A recorded sequence, each client's requests in order, the clients
    // interleaved at random. 10.9.0.1-3 run out of their own tokens (two of
    // them are banned); 10.9.0.4's key runs out while its address still
    // has tokens (the address is refunded, and spends them later);
    // 10.9.0.5's plan quota runs out; fourteen requests from seven
    // addresses share the global cap on /busy. No request meets both a
    // refusal of its own address and a refusal a node may repeat from
    // memory (the deny cache), which would name another rule.
    let mut scripts: Vec<Vec<(String, &str, Option<&str>)>> = Vec::new();
    for (ip, n) in [("10.9.0.1", 10), ("10.9.0.2", 8), ("10.9.0.3", 9)] {
        scripts.push((0..n).map(|_| (ip.to_string(), "/a", None)).collect());
    }
    let mut keyed: Vec<(String, &str, Option<&str>)> = (0..7)
        .map(|_| ("10.9.0.4".to_string(), "/a", Some("k-a")))
        .collect();
    keyed.push(("10.9.0.4".into(), "/a", None));
    scripts.push(keyed);
    scripts.push(
        (0..4)
            .map(|_| ("10.9.0.5".to_string(), "/a", Some("k-pro")))
            .collect(),
    );
    for i in 0..7 {
        scripts.push(
            (0..2)
                .map(|_| (format!("10.9.1.{i}"), "/busy", None))
                .collect(),
        );
    }
    // Only answers 401 count on `failures`: the third 401 spends its
    // last token, and the 200 after it is refused (as the replay must
    // know from the statuses the log recorded).
    scripts.push(
        [
            "/status/401",
            "/status/200",
            "/status/200",
            "/status/401",
            "/status/401",
            "/status/200",
        ]
        .into_iter()
        .map(|p| ("10.9.2.1".to_string(), p, None))
        .collect(),
    );
    let mut rng = Rng(0xfeed);
    let mut sent = 0;
    while scripts.iter().any(|s| !s.is_empty()) {
        let live: Vec<usize> = (0..scripts.len())
            .filter(|i| !scripts[*i].is_empty())
            .collect();
        let pick = live[rng.below(live.len() as u64) as usize];
        let (ip, path, key) = scripts[pick].remove(0);
        let mut headers = vec![("X-Forwarded-For", ip.as_str())];
        if let Some(k) = key {
            headers.push(("X-Api-Key", k));
        }
        get(&gw.url(path), &headers);
        sent += 1;
        // Distinct milliseconds: the log's order is the arrival order.
        std::thread::sleep(Duration::from_millis(3));
    }
    wait_until(
        "every request is in the access log",
        Duration::from_secs(10),
        || std::fs::read_to_string(&log_path).map_or(0, |t| t.lines().count()) >= sent,
    );
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        !text.contains("k-pro") && !text.contains("k-a\""),
        "keys never reach the log"
    );
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    // What the live gateway did, per decision and per (rule, subject).
    let mut live_decisions: BTreeMap<String, u64> = BTreeMap::new();
    let mut live_refused: BTreeMap<(String, String), u64> = BTreeMap::new();
    for l in &lines {
        *live_decisions
            .entry(l["decision"].as_str().unwrap().to_string())
            .or_default() += 1;
        if l["decision"] == "limited" {
            let rule = l["rule"].as_str().unwrap().to_string();
            let subject = subject_of(&rule, l);
            *live_refused.entry((rule, subject)).or_default() += 1;
        }
    }
    for d in ["allowed", "limited", "banned"] {
        assert!(
            live_decisions.get(d).copied().unwrap_or(0) > 0,
            "the sequence should meet every decision: {live_decisions:?}"
        );
    }
    let live_banned: Vec<String> = {
        let bans = gw.admin("GET", "/admin/bans", None).json();
        let mut s: Vec<String> = bans
            .as_array()
            .unwrap()
            .iter()
            .map(|b| format!("ip:{}", b["subject"].as_str().unwrap()))
            .collect();
        s.sort();
        s
    };
    assert!(!live_banned.is_empty(), "someone is banned");

    // The same log through the replay, with the same file.
    let candidate = write_file(dir.path(), "candidate.toml", &config);
    let r = replay_json(&candidate, &["--top", "1000"], &[&log_path]);
    let t = &r["totals"];
    assert_eq!(t["requests"].as_u64(), Some(sent as u64), "{r}");
    assert_eq!(
        t["allowed"].as_u64(),
        live_decisions.get("allowed").copied(),
        "{r}"
    );
    assert_eq!(
        t["limited"].as_u64(),
        live_decisions.get("limited").copied(),
        "{r}"
    );
    assert_eq!(
        t["banned"].as_u64(),
        live_decisions.get("banned").copied(),
        "{r}"
    );
    let mut replay_refused: BTreeMap<(String, String), u64> = BTreeMap::new();
    for rule in r["rules"].as_array().unwrap() {
        for c in rule["top_refused"].as_array().unwrap() {
            replay_refused.insert(
                (
                    rule["rule"].as_str().unwrap().to_string(),
                    c["subject"].as_str().unwrap().to_string(),
                ),
                c["count"].as_u64().unwrap(),
            );
        }
    }
    assert_eq!(replay_refused, live_refused);
    let mut replay_banned: Vec<String> = r["bans"]["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["subject"].as_str().unwrap().to_string())
        .collect();
    replay_banned.sort();
    assert_eq!(replay_banned, live_banned);
}

#[test]
fn the_access_log_is_opened_again_on_reload_after_a_rotation() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let (port, admin_port) = (free_port(), free_port());
    let config = Gateway::config(
        port,
        admin_port,
        &Setup {
            redis: None,
            upstream: &up.url(),
            prefix: "",
            rules: "[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = 100\nper = \"1s\"\nburst = 100\n",
            extra: "",
        },
    )
    .replacen("[server]\n", &format!("[server]\naccess_log = \"{}\"\n", log.display()), 1);
    let gw = Gateway::start_config(port, admin_port, config, &[]);
    let lines = |p: &Path| std::fs::read_to_string(p).map_or(0, |t| t.lines().count());

    assert_eq!(get(&gw.url("/before"), &[]).status, 200);
    wait_until("the first line", Duration::from_secs(10), || {
        lines(&log) == 1
    });
    std::fs::rename(&log, &rotated).unwrap();
    gw.hangup();
    let mut sent = 1;
    wait_until(
        "a new file after the reload",
        Duration::from_secs(10),
        || {
            assert_eq!(get(&gw.url("/after"), &[]).status, 200);
            sent += 1;
            std::thread::sleep(Duration::from_millis(50));
            lines(&log) > 0
        },
    );
    // Every line is in one file or the other, none lost.
    wait_until("every line written", Duration::from_secs(10), || {
        lines(&log) + lines(&rotated) == sent
    });
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("\"path\":\"/before\""), "{old}");
    let new = std::fs::read_to_string(&log).unwrap();
    assert!(!new.contains("/before") && new.contains("/after"), "{new}");
}
