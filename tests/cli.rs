//! `floodgate admin <verb>` against a running gateway: what it prints, what
//! it changes, and its exit codes (0 done, 1 not found, 2 usage or
//! configuration error, 3 admin API unreachable or refused).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const RULES: &str =
    "[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = 1\nper = \"60s\"\nburst = 1\n";
const BAN: &str = "[ban]\nenabled = true\nafter = 2\nwithin = \"10s\"\nduration = \"1m\"\nreconcile_interval = \"1h\"\n";

/// A gateway and the configuration file it runs with.
struct Node {
    gw: Gateway,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

fn node(redis: &RedisServer, up: &Upstream) -> Node {
    let (port, admin_port) = (free_port(), free_port());
    let p = prefix();
    let text = Gateway::config(
        port,
        admin_port,
        &Setup {
            redis: Some(redis.url()),
            upstream: &up.url(),
            prefix: &p,
            rules: RULES,
            extra: BAN,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(dir.path(), "floodgate.toml", &text);
    let gw = Gateway::start_config(port, admin_port, text, &[]);
    Node {
        gw,
        config,
        _dir: dir,
    }
}

/// What one run of the CLI gave.
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.out, self.err))
    }
}

/// `floodgate <args>` with `env` (and no token unless `env` gives one).
fn floodgate(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env_remove("FLOODGATE_ADMIN_TOKEN")
        .env_remove("FLOODGATE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `floodgate admin --config <node's file> <args>` with the right token.
fn admin(config: &Path, args: &[&str]) -> Run {
    let mut all = vec!["admin", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    floodgate(&all, &[("FLOODGATE_ADMIN_TOKEN", ADMIN_TOKEN)])
}

fn assert_code(run: &Run, code: i32, what: &str) {
    assert_eq!(
        run.code, code,
        "{what}: exit {} (wanted {code})\nstdout: {}\nstderr: {}",
        run.code, run.out, run.err
    );
}

#[test]
fn bans_are_listed_added_shown_and_lifted() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let n = node(&redis, &up);

    let none = admin(&n.config, &["bans", "list"]);
    assert_code(&none, 0, "empty list");
    assert_eq!(none.out.trim(), "no active bans");

    let added = admin(
        &n.config,
        &[
            "bans",
            "add",
            "198.51.100.0/24",
            "--duration",
            "10m",
            "--reason",
            "scraper",
        ],
    );
    assert_code(&added, 0, "ban a network");
    assert!(
        added.out.starts_with("banned 198.51.100.0/24 until "),
        "{}",
        added.out
    );
    // It is a real ban: a client inside the network is refused.
    assert_eq!(
        get_as(&n.gw.url("/"), "198.51.100.9").json()["error"],
        "banned"
    );

    // The limiter's own ban shows up too.
    get_as(&n.gw.url("/"), "203.0.113.5");
    get_as(&n.gw.url("/"), "203.0.113.5");
    assert_eq!(
        get_as(&n.gw.url("/"), "203.0.113.5").json()["error"],
        "banned"
    );

    let table = admin(&n.config, &["bans", "list"]);
    assert_code(&table, 0, "list");
    let lines: Vec<&str> = table.out.lines().collect();
    assert!(
        lines[0].starts_with("SUBJECT") && lines[0].contains("REASON"),
        "{}",
        table.out
    );
    assert!(
        lines.iter().any(|l| l.starts_with("198.51.100.0/24")
            && l.contains("manual")
            && l.ends_with("scraper")),
        "{}",
        table.out
    );
    assert!(
        lines.iter().any(|l| l.starts_with("203.0.113.5")
            && l.contains("auto")
            && l.ends_with("rule per-ip")),
        "{}",
        table.out
    );

    let json = admin(&n.config, &["bans", "list", "--json"]).json();
    let subjects: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["subject"].as_str().unwrap())
        .collect();
    assert_eq!(subjects, ["198.51.100.0/24", "203.0.113.5"]);

    let one = admin(&n.config, &["bans", "get", "203.0.113.5", "--json"]).json();
    assert_eq!(
        (one["strikes"].as_u64(), one["source"].as_str()),
        (Some(1), Some("auto"))
    );
    let shown = admin(&n.config, &["bans", "get", "198.51.100.0/24"]);
    assert_code(&shown, 0, "get");
    assert!(
        shown.out.lines().any(|l| l == "reason     scraper"),
        "{}",
        shown.out
    );

    let missing = admin(&n.config, &["bans", "get", "192.0.2.1"]);
    assert_code(&missing, 1, "get an unbanned subject");
    assert!(
        missing.err.contains("192.0.2.1 is not banned"),
        "{}",
        missing.err
    );

    let bad = admin(&n.config, &["bans", "add", "not-an-ip", "--duration", "1m"]);
    assert_code(&bad, 2, "bad subject");
    assert!(
        bad.err.contains("`not-an-ip` is not an IP address or CIDR"),
        "{}",
        bad.err
    );
    let bad = admin(
        &n.config,
        &["bans", "add", "192.0.2.1", "--duration", "forever"],
    );
    assert_code(&bad, 2, "bad duration");
    assert_eq!(
        admin(&n.config, &["bans", "list", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let lifted = admin(&n.config, &["bans", "rm", "198.51.100.0/24"]);
    assert_code(&lifted, 0, "unban a network");
    assert_eq!(lifted.out.trim(), "lifted the ban on 198.51.100.0/24");
    assert_eq!(get_as(&n.gw.url("/"), "198.51.100.9").status, 200);
    assert_code(
        &admin(&n.config, &["bans", "rm", "198.51.100.0/24"]),
        1,
        "unban twice",
    );
}

#[test]
fn the_allowlist_and_the_audit_log() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let n = node(&redis, &up);
    assert_code(
        &admin(&n.config, &["bans", "add", "192.0.2.7", "--duration", "1h"]),
        0,
        "ban",
    );

    let added = admin(&n.config, &["allow", "add", "192.0.2.0/24"]);
    assert_code(&added, 0, "allow");
    assert_eq!(
        added.out.trim(),
        "added 192.0.2.0/24 to the runtime allowlist; lifted the bans on 192.0.2.7"
    );
    let list = admin(&n.config, &["allow", "list"]);
    assert_eq!(
        list.out
            .lines()
            .nth(1)
            .map(str::split_whitespace)
            .map(Iterator::collect::<Vec<_>>),
        Some(vec!["192.0.2.0/24", "runtime"]),
        "{}",
        list.out
    );
    let json = admin(&n.config, &["allow", "list", "--json"]).json();
    assert_eq!(json["runtime"], serde_json::json!(["192.0.2.0/24"]));

    assert_code(
        &admin(&n.config, &["allow", "rm", "192.0.2.0/24"]),
        0,
        "unallow",
    );
    let again = admin(&n.config, &["allow", "rm", "192.0.2.0/24"]);
    assert_code(&again, 1, "unallow twice");
    assert!(
        again.err.contains("not on the runtime allowlist"),
        "{}",
        again.err
    );
    assert_code(
        &admin(&n.config, &["allow", "add", "300.0.0.0/8"]),
        2,
        "bad CIDR",
    );
    assert_eq!(
        admin(&n.config, &["allow", "list"]).out.trim(),
        "the allowlist is empty"
    );

    let events = admin(&n.config, &["audit", "--count", "3", "--json"]).json();
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["unallow", "unban", "allow"], "newest first");
    let table = admin(&n.config, &["audit"]);
    assert_code(&table, 0, "audit");
    assert_eq!(
        table.out.lines().count(),
        5,
        "header and four events:\n{}",
        table.out
    );
    assert!(
        table.out.lines().last().unwrap().contains("ban ") && table.out.contains("1h"),
        "{}",
        table.out
    );
    assert_code(
        &admin(&n.config, &["audit", "--count", "0"]),
        2,
        "count out of range",
    );
}

#[test]
fn status_reports_readiness_degraded_state_and_version() {
    let (mut redis, up) = (RedisServer::start(), Upstream::start());
    let n = node(&redis, &up);

    let human = admin(&n.config, &["status"]);
    assert_code(&human, 0, "status");
    assert!(
        human.out.contains("ready          yes (Redis answers)"),
        "{}",
        human.out
    );
    assert!(human.out.contains("degraded       no"), "{}", human.out);
    let s = admin(&n.config, &["status", "--json"]).json();
    assert_eq!(s["ready"], true);
    assert_eq!(s["degraded"], false);
    assert_eq!(s["store"], "redis");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["url"], n.gw.admin_url(""));
    // Nodes without GET /admin/config report the hash as unknown.
    match s["config_sha256"].as_str() {
        None => assert!(
            human.out.contains("config sha256  unknown"),
            "{}",
            human.out
        ),
        Some(sha) => {
            let sum = Command::new("sha256sum").arg(&n.config).output().unwrap();
            assert!(String::from_utf8_lossy(&sum.stdout).starts_with(sha));
        }
    }

    redis.kill9();
    for i in 0..5 {
        get_as(&n.gw.url("/"), &format!("192.0.2.{i}"));
    }
    wait_until(
        "the node to report degraded",
        Duration::from_secs(10),
        || admin(&n.config, &["status", "--json"]).json()["degraded"] == true,
    );
    let s = admin(&n.config, &["status", "--json"]).json();
    assert_eq!(s["ready"], false);
    assert!(
        s["readiness"].as_str().unwrap().starts_with("not ready"),
        "{s}"
    );
    // What needs Redis now fails as refused, with the node's reason.
    let list = admin(&n.config, &["bans", "list"]);
    assert_code(&list, 3, "bans list while Redis is down");
    assert!(list.err.contains("503"), "{}", list.err);
}

#[test]
fn it_says_what_to_do_when_it_cannot_talk_to_the_node() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let n = node(&redis, &up);
    let config = n.config.to_str().unwrap();

    let no_token = floodgate(&["admin", "--config", config, "bans", "list"], &[]);
    assert_code(&no_token, 2, "no token");
    assert!(
        no_token.err.contains("FLOODGATE_ADMIN_TOKEN is not set"),
        "{}",
        no_token.err
    );

    let wrong = floodgate(
        &["admin", "--config", config, "bans", "list"],
        &[("FLOODGATE_ADMIN_TOKEN", "wrong")],
    );
    assert_code(&wrong, 3, "wrong token");
    assert!(wrong.err.contains("401"), "{}", wrong.err);

    let down = format!("http://127.0.0.1:{}", free_port());
    let unreachable = floodgate(
        &["admin", "--url", &down, "status"],
        &[("FLOODGATE_ADMIN_TOKEN", ADMIN_TOKEN)],
    );
    assert_code(&unreachable, 3, "nothing listening");
    assert!(
        unreachable.err.contains("cannot reach the admin API at"),
        "{}",
        unreachable.err
    );

    // --url and --token-env instead of a configuration file; the flags
    // may follow the verb.
    let by_url = floodgate(
        &[
            "admin",
            "bans",
            "list",
            "--url",
            &n.gw.admin_url(""),
            "--token-env",
            "MY_TOKEN",
        ],
        &[("MY_TOKEN", ADMIN_TOKEN)],
    );
    assert_code(&by_url, 0, "--url and --token-env");
    // The top-level --config (or FLOODGATE_CONFIG) serves `admin` too.
    let top = floodgate(
        &["--config", config, "admin", "status"],
        &[("FLOODGATE_ADMIN_TOKEN", ADMIN_TOKEN)],
    );
    assert_code(&top, 0, "top-level --config");
    let env = floodgate(
        &["admin", "audit"],
        &[
            ("FLOODGATE_ADMIN_TOKEN", ADMIN_TOKEN),
            ("FLOODGATE_CONFIG", config),
        ],
    );
    assert_code(&env, 0, "FLOODGATE_CONFIG");

    let dir = tempfile::tempdir().unwrap();
    let bad = write_file(dir.path(), "bad.toml", "[server]\nlisten = 1\n");
    let bad_config = floodgate(
        &["admin", "--config", bad.to_str().unwrap(), "status"],
        &[("FLOODGATE_ADMIN_TOKEN", ADMIN_TOKEN)],
    );
    assert_code(&bad_config, 2, "bad configuration");
    assert!(bad_config.err.contains("bad.toml"), "{}", bad_config.err);

    assert_code(&floodgate(&["admin", "bans"], &[]), 2, "missing action");
    assert_code(
        &floodgate(&["admin", "bans", "add", "192.0.2.1"], &[]),
        2,
        "missing --duration",
    );
    assert_code(&floodgate(&["admin", "nonsense"], &[]), 2, "unknown verb");
    let https = floodgate(
        &["admin", "--url", "https://127.0.0.1:1", "status"],
        &[("FLOODGATE_ADMIN_TOKEN", ADMIN_TOKEN)],
    );
    assert_code(&https, 2, "https URL");
}
