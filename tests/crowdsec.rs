//! `[crowdsec]`: the gateway as a bouncer of a real CrowdSec Local API
//! (`crowdsec -no-cs` on its own configuration and SQLite file, a bouncer
//! key from `cscli bouncers add`): decisions made with `cscli decisions
//! add` are enforced within a poll, listed with their origin, lifted by
//! `cscli decisions delete`, and kept while the Local API is down. A fake
//! Local API serves what a real one will not: a malformed stream and
//! 100 000 decisions at once.
//!
//! CrowdSec must be installed (Debian `crowdsec`): these tests fail
//! without it.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const KEY: &str = "floodgate-test-bouncer-key";

/// A CrowdSec Local API of its own: configuration, database and port.
struct Lapi {
    proc: Proc,
    dir: tempfile::TempDir,
    port: u16,
}

impl Lapi {
    fn start() -> Lapi {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path().display();
        write_file(dir.path(), "simulation.yaml", "simulation: off\n");
        write_file(
            dir.path(),
            "profiles.yaml",
            "name: default_ip_remediation\nfilters:\n - Alert.Remediation == true && Alert.GetScope() == \"Ip\"\ndecisions:\n - type: ban\n   duration: 4h\non_success: break\n",
        );
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::create_dir_all(dir.path().join("hub")).unwrap();
        write_file(
            dir.path(),
            "config.yaml",
            &format!(
                "common:\n  daemonize: false\n  log_media: stdout\n  log_level: info\n  working_dir: .\n\
                 config_paths:\n  config_dir: {d}/\n  data_dir: {d}/data/\n  simulation_path: {d}/simulation.yaml\n  hub_dir: {d}/hub/\n  index_path: {d}/hub/.index.json\n  notification_dir: {d}/notifications/\n  plugin_dir: /usr/lib/crowdsec/plugins/\n\
                 db_config:\n  type: sqlite\n  db_path: {d}/data/crowdsec.db\n  use_wal: false\n\
                 api:\n  client:\n    credentials_path: {d}/local_api_credentials.yaml\n  server:\n    log_level: info\n    listen_uri: 127.0.0.1:{port}\n    profiles_path: {d}/profiles.yaml\n    trusted_ips:\n      - 127.0.0.1\n\
                 prometheus:\n  enabled: false\n"
            ),
        );
        let mut lapi = Lapi {
            proc: Proc::default(),
            dir,
            port,
        };
        lapi.spawn();
        lapi.cscli(&[
            "machines",
            "add",
            "tester",
            "--auto",
            "-f",
            lapi.dir
                .path()
                .join("local_api_credentials.yaml")
                .to_str()
                .unwrap(),
        ]);
        lapi.cscli(&["bouncers", "add", "floodgate", "-k", KEY]);
        lapi
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("crowdsec.log")).unwrap();
        let child = Command::new("crowdsec")
            .arg("-c")
            .arg(self.config())
            .arg("-no-cs")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("crowdsec must be installed (Debian package crowdsec)");
        self.proc = Proc::new(child);
        let port = self.port;
        wait_until("the CrowdSec Local API", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    fn cscli(&self, args: &[&str]) -> String {
        let out = Command::new("cscli")
            .arg("-c")
            .arg(self.config())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cscli must be installed (Debian package crowdsec)");
        assert!(
            out.status.success(),
            "cscli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn bouncer(redis: &RedisServer, up: &Upstream, url: &str) -> Gateway {
    let (port, admin_port, config) = Gateway::config_on(
        redis,
        &up.url(),
        "",
        &format!("[crowdsec]\nurl = \"{url}\"\napi_key_env = \"FG_CROWDSEC_KEY\"\npoll = \"1s\"\n"),
    );
    Gateway::start_config(port, admin_port, config, &[("FG_CROWDSEC_KEY", KEY)])
}

fn refused(gw: &Gateway, ip: &str) -> bool {
    get_as(&gw.url("/"), ip).status != 200
}

fn admin_cli(gw: &Gateway, args: &[&str]) -> String {
    let out = Command::new(binary())
        .args(["admin", "--config", gw.config_path().to_str().unwrap()])
        .args(args)
        .env("FLOODGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cscli_decisions_are_enforced_within_a_poll_listed_and_lifted() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let mut lapi = Lapi::start();
    let gw = bouncer(&redis, &up, &lapi.url());
    wait_until("the first poll", Duration::from_secs(5), || {
        gw.metric("floodgate_crowdsec_up") == 1.0
    });
    assert!(!refused(&gw, "127.0.0.9"));

    lapi.cscli(&["decisions", "add", "--ip", "127.0.0.9", "--duration", "1h"]);
    lapi.cscli(&[
        "decisions",
        "add",
        "--range",
        "10.1.0.0/16",
        "--duration",
        "30m",
    ]);
    let started = Instant::now();
    // Both within a poll of their making (1 s, the time to ask, and room
    // for a loaded machine).
    wait_until("the decisions enforced", Duration::from_secs(5), || {
        refused(&gw, "127.0.0.9") && refused(&gw, "10.1.200.3")
    });
    assert!(started.elapsed() < Duration::from_millis(3000));
    let r = get_as(&gw.url("/"), "127.0.0.9");
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "banned");
    let left: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((3500..=3600).contains(&left), "{left}");
    assert!(refused(&gw, "10.1.200.3"));
    assert!(!refused(&gw, "10.2.0.1"));

    // Listed with their origin, in the admin API and the CLI.
    let list = gw.admin("GET", "/admin/bans", None).json();
    let find = |subject: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|b| b["subject"] == subject)
            .cloned()
            .unwrap_or_else(|| panic!("{subject} not in {list}"))
    };
    assert_eq!(find("127.0.0.9")["source"], "crowdsec:cscli");
    assert_eq!(find("10.1.0.0/16")["source"], "crowdsec:cscli");
    let table = admin_cli(&gw, &["bans", "list"]);
    assert!(
        table.contains("127.0.0.9") && table.contains("crowdsec:cscli"),
        "{table}"
    );

    // Lifted in CrowdSec: lifted here within a poll.
    lapi.cscli(&["decisions", "delete", "--ip", "127.0.0.9"]);
    wait_until("the decision lifted", Duration::from_secs(5), || {
        !refused(&gw, "127.0.0.9")
    });
    assert!(refused(&gw, "10.1.200.3"));

    // The Local API down: decisions in force stay, counted and logged once.
    lapi.proc.kill9();
    wait_until("the failure seen", Duration::from_secs(10), || {
        gw.metric("floodgate_crowdsec_up") == 0.0
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert!(refused(&gw, "10.1.200.3"));
    assert_eq!(
        gw.log().matches("stay until they end").count(),
        1,
        "{}",
        gw.log()
    );
    assert!(gw.metric("floodgate_crowdsec_pulls_total{result=\"error\"}") >= 2.0);
    // Back: the whole set is read again, a decision made meanwhile too.
    lapi.spawn();
    lapi.cscli(&["decisions", "add", "--ip", "127.0.0.11", "--duration", "1h"]);
    wait_until("the Local API back", Duration::from_secs(10), || {
        refused(&gw, "127.0.0.11")
    });
    assert!(refused(&gw, "10.1.200.3"));
    assert!(gw.metric("floodgate_crowdsec_hits_total") >= 5.0);
}

#[test]
fn a_refused_key_is_counted_and_logged() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let lapi = Lapi::start();
    let (port, admin_port, config) = Gateway::config_on(
        &redis,
        &up.url(),
        "",
        &format!(
            "[crowdsec]\nurl = \"{}\"\napi_key_env = \"FG_CROWDSEC_KEY\"\npoll = \"1s\"\n",
            lapi.url()
        ),
    );
    let gw = Gateway::start_config(port, admin_port, config, &[("FG_CROWDSEC_KEY", "wrong")]);
    wait_until("a poll", Duration::from_secs(5), || {
        gw.metric("floodgate_crowdsec_pulls_total{result=\"error\"}") >= 1.0
    });
    assert_eq!(gw.metric("floodgate_crowdsec_up"), 0.0);
    assert!(
        gw.log().contains("refused the bouncer key (403)"),
        "{}",
        gw.log()
    );
    assert!(!refused(&gw, "127.0.0.9"));
}

/// A Local API of the test's own: answers `startup=true` with `full`, and
/// later polls with nothing new.
fn fake_lapi(full: Arc<Mutex<String>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            let body = if head.contains("startup=true") {
                full.lock().unwrap().clone()
            } else {
                "{\"new\":null,\"deleted\":null}".to_string()
            };
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(body.as_bytes());
        }
    });
    format!("http://127.0.0.1:{port}")
}

#[test]
fn a_malformed_stream_changes_nothing_and_100k_decisions_are_held() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let full = Arc::new(Mutex::new("{\"new\": [ {\"value\": ".to_string()));
    let url = fake_lapi(full.clone());
    let gw = bouncer(&redis, &up, &url);
    wait_until("a failed poll", Duration::from_secs(5), || {
        gw.metric("floodgate_crowdsec_pulls_total{result=\"error\"}") >= 1.0
    });
    assert!(gw.log().contains("not a decisions stream"), "{}", gw.log());
    assert!(!refused(&gw, "100.64.0.1"));

    let rss_before = gw.rss_kib();
    let decisions: Vec<String> = (0u32..100_000)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0x6440_0000u32 + i);
            format!(
                "{{\"id\":{i},\"value\":\"{ip}\",\"scope\":\"Ip\",\"type\":\"ban\",\"duration\":\"3h59m12.3s\",\"origin\":\"CAPI\",\"scenario\":\"crowdsecurity/ssh-bf\"}}"
            )
        })
        .collect();
    let body = format!("{{\"new\":[{}],\"deleted\":null}}", decisions.join(","));
    let bytes = body.len();
    *full.lock().unwrap() = body;
    let started = Instant::now();
    wait_until("100 000 decisions held", Duration::from_secs(30), || {
        gw.metric("floodgate_crowdsec_decisions") == 100_000.0
    });
    let took = started.elapsed();
    assert!(refused(&gw, "100.64.0.1"));
    assert!(refused(&gw, "100.65.134.159"));
    assert!(!refused(&gw, "100.65.134.160"));
    let grown = gw.rss_kib().saturating_sub(rss_before) / 1024;
    eprintln!("100 000 decisions ({bytes} bytes): held within {took:?}, resident +{grown} MiB");
    assert!(grown < 200, "+{grown} MiB");
}
