//! The `floodgate` binary under test: a process with its own config file,
//! ports and key prefix, plus what tests read from it (logs, metrics,
//! memory, file descriptors) and the signals they send it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::http::{call, Resp};
use super::proc::{free_port, signal, Proc};
use super::redis::RedisServer;
use super::upstream::Upstream;

pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Path of the gateway binary built for these tests.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_floodgate"))
}

/// A unique Redis key prefix per test.
pub fn prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}-{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A `floodgate` process with its own config file and ports.
pub struct Gateway {
    pub port: u16,
    pub admin_port: u16,
    child: Proc,
    dir: tempfile::TempDir,
    config: String,
    env: Vec<(String, String)>,
}

/// Settings that vary between tests; the rest is [`Gateway::config`].
pub struct Setup<'a> {
    pub redis: Option<String>,
    pub upstream: &'a str,
    pub prefix: &'a str,
    pub rules: &'a str,
    /// Appended after the rules: more sections (a `[ban]` section replaces
    /// the default, which turns bans off).
    pub extra: &'a str,
}

impl Gateway {
    /// Renders a config with fresh ports around `setup`.
    pub fn config(port: u16, admin_port: u16, s: &Setup<'_>) -> String {
        let redis = match &s.redis {
            Some(r) if r.starts_with('[') => format!(
                "[redis]\ncluster = {r}\nkey_prefix = \"{}\"\ntimeout = \"200ms\"\n",
                s.prefix
            ),
            Some(r) => format!(
                "[redis]\nurl = \"{r}\"\nkey_prefix = \"{}\"\ntimeout = \"200ms\"\n",
                s.prefix
            ),
            None => String::new(),
        };
        let ban = if s.extra.contains("[ban]") {
            ""
        } else {
            "[ban]\nenabled = false\n"
        };
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nshutdown_timeout = \"5s\"\nworkers = 2\n\n{redis}\n[upstream]\nurls = [\"{up}\"]\ntimeout = \"2s\"\nconnect_timeout = \"500ms\"\n\n{rules}\n{extra}\n{ban}",
            extra = s.extra,
            up = s.upstream,
            rules = s.rules,
        )
    }

    /// A gateway on `redis` in front of `up`, with its own key prefix.
    pub fn on(redis: &RedisServer, up: &Upstream, rules: &str, extra: &str) -> Gateway {
        let p = prefix();
        Self::start(&Setup {
            redis: Some(redis.url()),
            upstream: &up.url(),
            prefix: &p,
            rules,
            extra,
        })
    }

    /// A gateway on `redis` in front of the upstream at `url`.
    pub fn on_url(redis: &RedisServer, url: &str, rules: &str, extra: &str) -> Gateway {
        let (port, admin_port, config) = Self::config_on(redis, url, rules, extra);
        Self::start_config(port, admin_port, config, &[])
    }

    /// Fresh ports and the config of a gateway on `redis` (a key prefix
    /// of its own) in front of the upstream at `url`, for a test that
    /// edits the text or sets environment before [`Gateway::start_config`].
    pub fn config_on(
        redis: &RedisServer,
        url: &str,
        rules: &str,
        extra: &str,
    ) -> (u16, u16, String) {
        let p = prefix();
        let (port, admin_port) = (free_port(), free_port());
        let setup = Setup {
            redis: Some(redis.url()),
            upstream: url,
            prefix: &p,
            rules,
            extra,
        };
        (port, admin_port, Self::config(port, admin_port, &setup))
    }

    pub fn start(setup: &Setup<'_>) -> Gateway {
        let (port, admin_port) = (free_port(), free_port());
        Self::start_config(port, admin_port, Self::config(port, admin_port, setup), &[])
    }

    /// Starts with an explicit config text and extra environment.
    pub fn start_config(
        port: u16,
        admin_port: u16,
        config: String,
        env: &[(&str, &str)],
    ) -> Gateway {
        let mut g = Gateway {
            port,
            admin_port,
            child: Proc::default(),
            dir: tempfile::tempdir().unwrap(),
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        g.spawn();
        g
    }

    fn spawn(&mut self) {
        let path = self.dir.path().join("floodgate.toml");
        std::fs::write(&path, &self.config).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new(binary());
        cmd.arg("--config")
            .arg(&path)
            .env("FLOODGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Proc(Some(cmd.spawn().unwrap()));
        let admin = self.admin_port;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if let Some(c) = self.child.0.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("gateway exited at start ({status}):\n{}", self.log());
                }
            }
            if ureq::get(&format!("http://127.0.0.1:{admin}/healthz"))
                .timeout(Duration::from_millis(500))
                .call()
                .is_ok()
            {
                return;
            }
            thread::sleep(Duration::from_millis(25));
        }
        panic!("gateway did not start:\n{}", self.log());
    }

    /// The config file the gateway was started with (and reloads).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("floodgate.toml")
    }

    /// Replaces the config file in one step (write, then rename), as an
    /// operator's deploy tool would; a restart reads it too.
    pub fn write_config(&mut self, text: &str) {
        let tmp = self.dir.path().join("floodgate.toml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
        self.config = text.to_string();
    }

    /// The config text last written.
    pub fn config_text(&self) -> &str {
        &self.config
    }

    /// `SIGHUP`: reload the config file.
    pub fn hangup(&self) {
        signal(self.pid(), "HUP");
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("stderr.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin_port, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn kill9(&mut self) {
        self.child.kill9();
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// SIGTERM, then the exit code (None: killed after `limit`).
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let mut c = self.child.0.take()?;
        signal(c.id(), "TERM");
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(s)) = c.try_wait() {
                return s.code();
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Resident memory now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// File descriptors the process has open (sockets included).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The sum of every `/metrics` series whose line starts with `series`
    /// (a name, a name with its first labels, or one whole series such as
    /// `floodgate_config_reloads_total{result="ok"}`); 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        let text = call("GET", &self.admin_url("/metrics"), &[], None).body;
        text.lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next())
            .filter_map(|v| v.parse::<f64>().ok())
            .sum()
    }

    /// An admin call with the right token.
    pub fn admin(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        call(
            method,
            &self.admin_url(path),
            &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
            body,
        )
    }

    /// `floodgate_decisions_total{store}`: decisions made on `store`.
    pub fn decisions(&self, store: &str) -> u64 {
        self.metric(&format!("floodgate_decisions_total{{store=\"{store}\"}}")) as u64
    }

    /// `floodgate_requests_total{rule,decision}` from /metrics.
    pub fn requests_metric(&self, rule: &str, decision: &str) -> u64 {
        let text = call("GET", &self.admin_url("/metrics"), &[], None).body;
        let want = format!("floodgate_requests_total{{rule=\"{rule}\",decision=\"{decision}\"}}");
        let alt = format!("floodgate_requests_total{{decision=\"{decision}\",rule=\"{rule}\"}}");
        text.lines()
            .find(|l| l.starts_with(&want) || l.starts_with(&alt))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or(0)
    }
}
