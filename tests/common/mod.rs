//! The integration-test harness: real processes on free loopback ports.
//!
//! Every test starts what it needs itself: `redis-server` (standalone, or a
//! 3-master + 3-replica cluster), a small upstream (actix-web in a thread),
//! and one or more `floodgate` processes built from this crate. Each gets
//! its own ports and key prefix, so tests run in parallel and can kill,
//! freeze or restart their servers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    // Ports handed out by this process are never reused within it.
    static USED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut used = USED.lock().unwrap();
        // Cluster bus ports are port + 10000: keep both free.
        if port < 50000
            && !used.contains(&port)
            && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok()
        {
            used.push(port);
            return port;
        }
    }
}

pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return;
        }
        thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// A child process this harness started, killed when dropped.
#[derive(Default)]
pub struct Proc(Option<Child>);

impl Proc {
    /// Takes charge of a process the test spawned itself.
    pub fn new(child: Child) -> Proc {
        Proc(Some(child))
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn is_running(&self) -> bool {
        self.0.is_some()
    }

    /// `kill -9`, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            signal(c.id(), "CONT");
        }
        self.kill9();
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

// ---------------------------------------------------------------- Redis

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    child: Proc,
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

/// A Redis Cluster of 3 masters and 3 replicas on loopback.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                let port = free_port();
                RedisServer::start_with(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "500",
                        "--cluster-replica-validity-factor",
                        "0",
                        // A dead master stops only its own slots: the
                        // other shards keep answering (per-shard degrading).
                        "--cluster-require-full-coverage",
                        "no",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = RedisCluster { nodes };
        c.wait_ok();
        c.wait_in_sync();
        c
    }

    /// Waits until three nodes are replicas and every replica's link to
    /// its master is up.
    pub fn wait_in_sync(&self) {
        wait_until("every replica in sync", Duration::from_secs(30), || {
            self.nodes
                .iter()
                .filter(|n| n.cli(&["ROLE"]).starts_with("slave"))
                .count()
                == 3
                && self.nodes.iter().all(|n| {
                    let info = n.cli(&["INFO", "replication"]);
                    info.contains("role:master") || info.contains("master_link_status:up")
                })
        });
    }

    /// Starts node `i` again after a kill: it keeps its cluster identity
    /// (nodes.conf) and rejoins, as a replica once it was failed over.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
        self.wait_ok();
        self.wait_in_sync();
    }

    /// The node id of node `i`.
    pub fn id(&self, i: usize) -> String {
        self.nodes[i].cli(&["CLUSTER", "MYID"]).trim().to_string()
    }

    /// Starts moving `slot` from `source` to `target` as `redis-cli
    /// --cluster reshard` does: target IMPORTING, then source MIGRATING.
    pub fn begin_slot_move(&self, slot: u16, source: usize, target: usize) {
        let slot = slot.to_string();
        let ok = |out: String| assert_eq!(out.trim(), "OK", "SETSLOT {slot}");
        ok(self.nodes[target].cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &self.id(source)]));
        ok(self.nodes[source].cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &self.id(target)]));
    }

    /// MIGRATEs the keys of `slot` still on `source` that `pick` chooses
    /// to `target`; returns the keys moved.
    pub fn migrate_keys(
        &self,
        slot: u16,
        source: usize,
        target: usize,
        pick: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let listed =
            self.nodes[source].cli(&["CLUSTER", "GETKEYSINSLOT", &slot.to_string(), "1000"]);
        let keys: Vec<String> = listed
            .lines()
            .filter(|k| !k.is_empty() && pick(k))
            .map(str::to_string)
            .collect();
        if keys.is_empty() {
            return keys;
        }
        let port = self.nodes[target].port.to_string();
        let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        migrate.extend(keys.iter().map(String::as_str));
        assert_eq!(self.nodes[source].cli(&migrate).trim(), "OK", "{keys:?}");
        keys
    }

    /// Ends a slot move: every master learns that `target` owns `slot`.
    pub fn finish_slot_move(&self, slot: u16, target: usize) {
        let (slot, id) = (slot.to_string(), self.id(target));
        for n in self.nodes.iter().filter(|n| n.child.is_running()) {
            if n.cli(&["ROLE"]).starts_with("master") {
                n.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &id]);
            }
        }
    }

    /// Indices of the live masters that own slots.
    pub fn masters(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.child.is_running())
            .filter(|(_, n)| {
                n.cli(&["CLUSTER", "NODES"])
                    .lines()
                    .any(|l| l.contains("myself,master") && l.split_whitespace().count() > 8)
            })
            .map(|(i, _)| i)
            .collect()
    }

    pub fn wait_ok(&self) {
        wait_until(
            "cluster_state:ok on every live node",
            Duration::from_secs(30),
            || {
                self.nodes
                    .iter()
                    .filter(|n| n.child.is_running())
                    .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
            },
        );
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().take(3).map(|n| n.url()).collect()
    }

    /// Index of the node that is master for `key`'s slot now.
    pub fn master_of(&self, key: &str) -> usize {
        self.try_master_of(key)
            .unwrap_or_else(|| panic!("no master owns the slot of {key}"))
    }

    /// Like [`Self::master_of`], `None` while no live master owns the slot.
    pub fn try_master_of(&self, key: &str) -> Option<usize> {
        let live = self
            .nodes
            .iter()
            .find(|n| n.child.is_running())
            .expect("a live node");
        let slot: u16 = live
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        let nodes = live.cli(&["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let owns = f[8..].iter().any(|r| match r.split_once('-') {
                Some((a, b)) => {
                    a.parse::<u16>().is_ok_and(|a| a <= slot)
                        && b.parse::<u16>().is_ok_and(|b| slot <= b)
                }
                None => r.parse::<u16>() == Ok(slot),
            });
            if owns {
                let port: u16 = f[1]
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse().ok())?;
                return self.nodes.iter().position(|n| n.port == port);
            }
        }
        None
    }
}

/// libfaketime, preloaded into a process to skew or pin its clock (the
/// `faketime` command would fork, leaving a process the harness cannot stop).
pub fn libfaketime() -> &'static str {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
        "/usr/local/lib/faketime/libfaketimeMT.so.1",
    ]
    .iter()
    .find(|p| Path::new(p).exists())
    .copied()
    .expect("libfaketime is needed for this test: apt-get install -y faketime")
}

// ---------------------------------------------------------------- upstream

/// A small upstream: echoes requests, streams bytes, counts what it served.
pub struct Upstream {
    pub port: u16,
    pub hits: Arc<AtomicU64>,
    stop: Option<actix_web::dev::ServerHandle>,
}

impl Upstream {
    pub fn start() -> Upstream {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Upstream {
        Self::start_with(port, None)
    }

    /// An upstream that closes idle keep-alive connections after `idle`.
    pub fn start_keep_alive(idle: Duration) -> Upstream {
        Self::start_with(free_port(), Some(idle))
    }

    fn start_with(port: u16, keep_alive: Option<Duration>) -> Upstream {
        use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
        use futures_util::StreamExt;
        let hits = Arc::new(AtomicU64::new(0));
        let h2 = hits.clone();
        let (handle, _) = serve_in_thread!(port, move || {
            HttpServer::new(move || {
                let h = h2.clone();
                App::new()
                        .app_data(web::Data::new(h))
                        .app_data(web::PayloadConfig::new(usize::MAX))
                        .route(
                            "/status/{code}",
                            web::to(|p: web::Path<u16>| async move {
                                HttpResponse::build(
                                    actix_web::http::StatusCode::from_u16(p.into_inner()).unwrap(),
                                )
                                .body("status")
                            }),
                        )
                        .route(
                            "/bytes/{n}",
                            web::to(|p: web::Path<usize>| async move {
                                let n = p.into_inner();
                                let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
                                let stream = futures_util::stream::unfold(n, move |left| {
                                    let chunk = chunk.clone();
                                    async move {
                                        if left == 0 {
                                            return None;
                                        }
                                        let take = left.min(chunk.len());
                                        Some((
                                            Ok::<_, std::io::Error>(chunk.slice(..take)),
                                            left - take,
                                        ))
                                    }
                                });
                                HttpResponse::Ok().streaming(stream)
                            }),
                        )
                        .route(
                            "/upload",
                            web::to(|mut body: web::Payload| async move {
                                let mut n = 0usize;
                                while let Some(chunk) = body.next().await {
                                    match chunk {
                                        Ok(c) => n += c.len(),
                                        Err(_) => break,
                                    }
                                }
                                HttpResponse::Ok().json(serde_json::json!({"received": n}))
                            }),
                        )
                        .route(
                            "/slow/{ms}",
                            web::to(|p: web::Path<u64>| async move {
                                actix_web::rt::time::sleep(Duration::from_millis(p.into_inner()))
                                    .await;
                                HttpResponse::Ok().body("slow")
                            }),
                        )
                        .default_service(web::to(
                            |req: HttpRequest,
                             body: web::Bytes,
                             hits: web::Data<Arc<AtomicU64>>| async move {
                                hits.fetch_add(1, Ordering::Relaxed);
                                let headers: Vec<(String, String)> = req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.to_string(),
                                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                        )
                                    })
                                    .collect();
                                HttpResponse::Ok()
                                    .insert_header(("x-upstream", "yes"))
                                    .append_header(("set-cookie", "a=1"))
                                    .append_header(("set-cookie", "b=2"))
                                    .insert_header(("connection", "close, x-hop"))
                                    .insert_header(("x-hop", "must-not-pass"))
                                    .insert_header(("keep-alive", "timeout=5"))
                                    .json(serde_json::json!({
                                        "method": req.method().as_str(),
                                        "path": req.path(),
                                        "query": req.query_string(),
                                        "headers": headers,
                                        "body_len": body.len(),
                                    }))
                            },
                        ))
            })
            .keep_alive(keep_alive.map_or(
                actix_web::http::KeepAlive::default(),
                actix_web::http::KeepAlive::Timeout,
            ))
        });
        Upstream {
            port,
            hits,
            stop: Some(handle),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(h) = self.stop.take() {
            let _ = futures_util::FutureExt::now_or_never(h.stop(false));
        }
    }
}

/// Runs a server in a thread of its own (its own System, as actix needs:
/// `make` runs inside it). Returns its handle, to stop it, and the thread,
/// to wait for it. Use it through [`serve_in_thread!`].
pub fn run_in_thread(
    make: impl FnOnce() -> actix_web::dev::Server + Send + 'static,
) -> (actix_web::dev::ServerHandle, thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let join = thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = make();
            let _ = tx.send(server.handle());
            let _ = server.await;
        });
    });
    let handle = rx.recv().expect("the test server starts");
    (handle, join)
}

/// Serves the `HttpServer` that `$make` builds on `127.0.0.1:$port`, with
/// two workers and no signal handling, in a thread of its own; evaluates to
/// `(ServerHandle, JoinHandle<()>)`. A macro because `HttpServer`'s bounds
/// name types actix-web does not re-export.
macro_rules! serve_in_thread {
    ($port:expr, $make:expr) => {{
        let (port, make) = ($port, $make);
        $crate::common::run_in_thread(move || {
            make()
                .workers(2)
                .disable_signals()
                .bind(("127.0.0.1", port))
                .expect("the test server binds its port")
                .run()
        })
    }};
}
pub(crate) use serve_in_thread;

// ---------------------------------------------------------------- gateway

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

// ---------------------------------------------------------------- HTTP

/// A response, whatever its status.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, Vec<String>>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .and_then(|v| v.first())
            .map(|s| s.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn agent() -> ureq::Agent {
    thread_local! {
        static AGENT: ureq::Agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).max_idle_connections_per_host(64).build();
    }
    AGENT.with(|a| a.clone())
}

pub fn call(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
    let mut req = agent().request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let result = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    into_resp(resp)
}

fn into_resp(resp: ureq::Response) -> Resp {
    let status = resp.status();
    let mut headers: HashMap<String, Vec<String>> = HashMap::new();
    for name in resp.headers_names() {
        let all: Vec<String> = resp.all(&name).iter().map(|s| s.to_string()).collect();
        headers.insert(name.to_ascii_lowercase(), all);
    }
    let mut body = String::new();
    let _ = resp.into_reader().take(1 << 20).read_to_string(&mut body);
    Resp {
        status,
        headers,
        body,
    }
}

pub fn get(url: &str, headers: &[(&str, &str)]) -> Resp {
    call("GET", url, headers, None)
}

/// GET as client `ip` (via X-Forwarded-For from the trusted loopback peer).
pub fn get_as(url: &str, ip: &str) -> Resp {
    get(url, &[("X-Forwarded-For", ip)])
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Sends raw request bytes (for what HTTP clients refuse to send) and
/// returns the raw response text.
pub fn raw_request(port: u16, request: &[u8]) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Established TCP connections (IPv4) whose local end is `port` on this
/// machine: the connections a listener on `port` has accepted and not yet
/// closed.
pub fn accepted_connections(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local) && f[3] == "01"
        })
        .count()
}

/// Status code of a raw response text.
pub fn raw_status(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// An upstream that answers every connection with `response` verbatim.
pub fn canned_upstream(response: &'static str) -> u16 {
    use std::io::Write;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf);
                let _ = s.write_all(response.as_bytes());
            });
        }
    });
    port
}

// ---------------------------------------------------------------- certificates

/// A certificate authority made for one test, and the server certificates
/// it issues (for `localhost` and `127.0.0.1`).
pub struct TestCa {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    /// The CA certificate, PEM: what clients trust.
    pub pem: String,
}

/// A server certificate and its key, PEM, plus the certificate's DER (what
/// a client sees in the handshake).
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "floodgate test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa { params, key, pem }
    }

    /// A server certificate with common name `name` and serial `serial`.
    pub fn issue(&self, name: &str, serial: u64) -> Issued {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

// ---------------------------------------------------------------- load

/// What one subject got from a [`SubjectLoad`].
#[derive(Debug, Clone, Default)]
pub struct SubjectTally {
    pub allowed: u64,
    pub limited: u64,
    pub fivexx: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

impl SubjectTally {
    /// Seconds between the first request's start and the last answer.
    pub fn span_s(&self) -> f64 {
        match (self.first, self.last) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        }
    }

    /// The most a token bucket of `burst` refilled at `rate` per second can
    /// have allowed over this subject's span (plus one for clock edges).
    pub fn bound(&self, burst: u64, rate: f64) -> u64 {
        burst + (rate * self.span_s()).floor() as u64 + 1
    }
}

/// Requests from many client addresses at once, spread over `threads`
/// threads and over the gateways' URLs in turn, each subject tallied. Every
/// thread stops when told or after `limit`.
pub struct SubjectLoad {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tallies: Arc<std::sync::Mutex<HashMap<String, SubjectTally>>>,
    handles: Vec<thread::JoinHandle<()>>,
}

impl SubjectLoad {
    pub fn start(
        urls: Vec<String>,
        subjects: Vec<String>,
        threads: usize,
        limit: Duration,
    ) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tallies = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let started = Instant::now();
        let handles = (0..threads)
            .map(|t| {
                let mine: Vec<String> = subjects.iter().skip(t).step_by(threads).cloned().collect();
                let (urls, stop, tallies) = (urls.clone(), stop.clone(), tallies.clone());
                thread::spawn(move || {
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed)
                        && started.elapsed() < limit
                        && !mine.is_empty()
                    {
                        let ip = &mine[n % mine.len()];
                        let url = &urls[n % urls.len()];
                        n += 1;
                        let at = Instant::now();
                        let r = get_as(url, ip);
                        let done = Instant::now();
                        let mut all = tallies.lock().unwrap();
                        let t: &mut SubjectTally = all.entry(ip.clone()).or_default();
                        match r.status {
                            200 => t.allowed += 1,
                            429 => t.limited += 1,
                            s if s >= 500 => t.fivexx += 1,
                            _ => {}
                        }
                        t.first.get_or_insert(at);
                        t.last = Some(done);
                    }
                })
            })
            .collect();
        SubjectLoad {
            stop,
            tallies,
            handles,
        }
    }

    /// Stops every thread and returns the tallies by subject.
    pub fn finish(mut self) -> HashMap<String, SubjectTally> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        std::mem::take(&mut *self.tallies.lock().unwrap())
    }
}
