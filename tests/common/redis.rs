//! A standalone `redis-server` on a free port, for the gateway to keep its
//! counters in; tests kill, freeze and restart it to see the gateway cope.

use std::process::{Command, Stdio};
use std::time::Duration;

use super::proc::{free_port, signal, wait_until, Proc};

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    pub(super) child: Proc,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(free_port(), &[])
    }

    pub fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        Self::start_env(port, extra, &[])
    }

    /// Starts with extra environment (e.g. libfaketime, to pin Redis' clock).
    pub fn start_env(port: u16, extra: &[&str], env: &[(&str, &str)]) -> RedisServer {
        let mut r = RedisServer {
            port,
            child: Proc::default(),
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                // DEBUG SLEEP stalls Redis on purpose (from loopback only).
                "--enable-debug-command",
                "local",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install -y redis-server)");
        self.child = Proc(Some(child));
        let port = self.port;
        wait_until("redis-server to answer", Duration::from_secs(10), || {
            redis_cli(port, &["PING"]).trim() == "PONG"
        });
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// `kill -9`: the server vanishes mid-whatever.
    pub fn kill9(&mut self) {
        self.child.kill9();
    }

    /// Starts again on the same port (empty: no persistence).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn freeze(&self) {
        signal(self.pid(), "STOP");
    }

    pub fn thaw(&self) {
        signal(self.pid(), "CONT");
    }

    /// Calls of `command` (e.g. "evalsha") so far, from INFO commandstats.
    pub fn calls(&self, command: &str) -> u64 {
        command_calls(&self.cli(&["INFO", "commandstats"]), command)
    }
}

pub fn command_calls(info: &str, command: &str) -> u64 {
    let needle = format!("cmdstat_{}:calls=", command.to_lowercase());
    info.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
