//! The gateway's connection to Redis, standalone or Cluster.
//!
//! One multiplexed connection carries every request's script call, so
//! concurrent requests pipeline on one socket instead of each checking a
//! connection out of a pool. Standalone uses redis-rs' `ConnectionManager`
//! (reconnects by itself); Cluster uses the cluster-aware connection with
//! explicit connect/response timeouts and few retries, because its defaults
//! (no response timeout, 16 retries) would let a dead node hang requests.
//! Every call is bounded again by `redis.timeout` here, whatever the client
//! library does.
//!
//! Scripts are sent with EVALSHA; on `NOSCRIPT` (Redis restarted, failed
//! over, or `SCRIPT FLUSH`) the same call is re-sent as EVAL with the body,
//! routed by its first key, which also caches the script on that node. No
//! request fails because a script is missing, and no `SCRIPT LOAD` to every
//! cluster node (which fails while any node is down) is needed.
//!
//! On a Cluster, script calls (every request's decision) do not go through
//! the cluster client: they are routed here, by the slot of their first key,
//! over a connection to that slot's master alone, from a slot table read
//! with `CLUSTER SLOTS`. The cluster client stops *every* command while it
//! rebuilds its slot map, which it does at each redirect to a dead master;
//! during a failover that stalls the healthy shards' decisions past their
//! budget. Per-node connections keep a dead master's trouble to its own
//! subjects. `MOVED` and `ASK` are followed here (ASK on a connection of its
//! own, so no other call can come between `ASKING` and the script).
//!
//! A script call that fails for a reason a second try fixes (a redirect, a
//! slot being moved, a connection to a node that is gone, a cluster that is
//! electing a new master) is sent again within what is left of the same time
//! budget, after a short pause; the link also signals
//! [`RedisLink::topology_changed`] so the slot table is read again. Only a
//! call that still fails when the budget is spent counts as failed.
//!
//! The parts: this file holds the link, its connections and script calls;
//! `failure` says why a call failed and whether a retry helps; `nodes`
//! talks to single Cluster nodes (slot map, probes, `SCAN`, pub/sub);
//! `slots` is the Cluster's slot math and table; [`scripts`] is the
//! registry of the Lua scripts the binary carries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, FromRedisValue, ServerErrorKind, Value};

use crate::config::RedisConfig;

mod failure;
mod nodes;
pub mod scripts;
mod slots;

pub(crate) use failure::{is_noscript, RedisFailure};
pub(crate) use scripts::LuaScript;

pub use slots::slot_of;
use slots::SlotTable;
pub(crate) use slots::{key_slot, SlotRange};

/// The pause before the first retry of a transient failure; it doubles per
/// retry, up to [`RETRY_PAUSE_MAX`], and never passes the call's budget.
const RETRY_PAUSE: Duration = Duration::from_millis(2);
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(20);

thread_local! {
    /// Per-thread connections, by link (`None` while one is opening).
    static THREAD_CONNS: std::cell::RefCell<std::collections::HashMap<usize, Option<Conn>>> = Default::default();
    /// Per-thread connections to single Cluster nodes, by link and address.
    static NODE_CONNS: std::cell::RefCell<std::collections::HashMap<(usize, String), MultiplexedConnection>> = Default::default();
}

/// Where the next try of a script call goes on a Cluster.
enum Hop {
    /// The slot's master, from the slot table.
    Owner,
    /// A node a `MOVED` named.
    Moved(String),
    /// A node an `ASK` named: send `ASKING` first.
    Ask(String),
}

/// Redirects followed at once within one call; past them, a redirect is
/// treated like any transient failure (pause, then the slot table's owner).
const MAX_REDIRECTS: u32 = 5;

/// The connection settings for `url`, with `TCP_NODELAY`: the client's
/// default leaves Nagle's algorithm on, which holds back a small command
/// while an earlier one is unacknowledged and made pipelined decisions wait
/// on delayed ACKs (the worker idled at half load).
fn nodelay(info: redis::ConnectionInfo) -> redis::ConnectionInfo {
    info.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
}

/// [`nodelay`] settings for a URL.
fn connection_info(url: &str) -> redis::RedisResult<redis::ConnectionInfo> {
    redis::IntoConnectionInfo::into_connection_info(url).map(nodelay)
}

/// Opens a connection as `config` says, bounded by `connect_timeout`.
async fn open(c: &RedisConfig) -> Result<Conn, RedisFailure> {
    let limit = c.connect_timeout;
    if !c.cluster.is_empty() {
        // Each attempt is bounded by `redis.timeout`; the whole call is
        // bounded by floodgate's own timer, which also retries transient
        // failures the library gave up on (see `RedisLink::eval`).
        let seeds = c
            .cluster
            .iter()
            .map(|u| connection_info(u))
            .collect::<redis::RedisResult<Vec<_>>>()?;
        let client = redis::cluster::ClusterClientBuilder::new(seeds)
            .connection_timeout(c.connect_timeout)
            .response_timeout(c.timeout)
            .overall_response_timeout(None)
            .retries(2)
            .min_retry_wait(5)
            .max_retry_wait(25)
            .build()?;
        return match tokio::time::timeout(limit, client.get_async_connection()).await {
            Ok(r) => Ok(Conn::Cluster(r?)),
            Err(_) => Err(RedisFailure::Timeout(limit)),
        };
    }
    let client = redis::Client::open(connection_info(c.url.as_deref().unwrap_or_default())?)?;
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(c.connect_timeout))
        .set_response_timeout(Some(c.timeout.max(Duration::from_secs(1))))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(200));
    match tokio::time::timeout(limit, ConnectionManager::new_with_config(client, cfg)).await {
        Ok(r) => Ok(Conn::Standalone(r?)),
        Err(_) => Err(RedisFailure::Timeout(limit)),
    }
}

#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A connection to Redis that may not exist yet: the gateway starts (and
/// serves from its local store) even when Redis is down at start-up.
pub struct RedisLink {
    conn: ArcSwapOption<Conn>,
    config: RedisConfig,
    topology: Notify,
    retries: metrics::Counter,
    epoch: std::time::Instant,
    /// When NOSCRIPT was last logged, in ms since `epoch` (0 = never).
    noscript_logged_ms: AtomicU64,
    /// The Cluster's slot owners (empty on a standalone server).
    slots: arc_swap::ArcSwap<SlotTable>,
}

impl RedisLink {
    pub fn new(config: RedisConfig) -> Arc<RedisLink> {
        Arc::new(RedisLink {
            conn: ArcSwapOption::empty(),
            config,
            topology: Notify::new(),
            retries: metrics::counter!(crate::metrics::REDIS_RETRIES),
            epoch: std::time::Instant::now(),
            noscript_logged_ms: AtomicU64::new(0),
            slots: arc_swap::ArcSwap::from_pointee(SlotTable::default()),
        })
    }

    /// Resolves when a call met a sign that the cluster's topology changed
    /// (a redirect, a node gone, a slot moving): time to read the slot map.
    pub(crate) async fn topology_changed(&self) {
        self.topology.notified().await
    }

    pub(crate) fn is_cluster(&self) -> bool {
        !self.config.cluster.is_empty()
    }

    pub(crate) fn config(&self) -> &RedisConfig {
        &self.config
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.conn.load().is_some()
    }

    /// Establishes the shared connection, bounded by `redis.connect_timeout`,
    /// and loads the scripts so that the first requests find them cached.
    pub async fn connect(&self) -> Result<(), RedisFailure> {
        if self.is_connected() {
            return Ok(());
        }
        let conn = open(&self.config).await?;
        self.conn.store(Some(Arc::new(conn)));
        for script in scripts::all() {
            let load = redis::cmd("SCRIPT").arg("LOAD").arg(script.body).clone();
            // On a cluster this goes to every node and fails while one is
            // down; EVAL on NOSCRIPT covers whatever is missed.
            if let Err(e) = self.send(&load, self.admin_timeout()).await {
                log::debug!("SCRIPT LOAD: {e}");
            }
        }
        Ok(())
    }

    fn current(&self) -> Result<Conn, RedisFailure> {
        self.conn
            .load_full()
            .map(|c| (*c).clone())
            .ok_or(RedisFailure::NotConnected)
    }

    /// The connection for a call from this thread. Each actix worker thread
    /// gets a connection of its own, driven on that thread, so a request's
    /// Redis round trip never hops threads; until it is open (it opens in
    /// the background at the thread's first call) the shared one serves.
    fn for_this_thread(&self) -> Result<Conn, RedisFailure> {
        let id = self as *const RedisLink as usize;
        let mine = THREAD_CONNS.with(|m| m.borrow().get(&id).cloned());
        match mine {
            Some(Some(conn)) => return Ok(conn),
            Some(None) => {}
            None if actix_web::rt::System::try_current().is_some() && self.is_connected() => {
                THREAD_CONNS.with(|m| m.borrow_mut().insert(id, None));
                let config = self.config.clone();
                actix_web::rt::spawn(async move {
                    let opened = open(&config).await.ok();
                    THREAD_CONNS.with(|m| match opened {
                        Some(c) => m.borrow_mut().insert(id, Some(c)),
                        None => m.borrow_mut().remove(&id),
                    });
                });
            }
            None => {}
        }
        self.current()
    }

    /// Runs one command, bounded by `redis.timeout`.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, RedisFailure> {
        self.query_within(cmd, self.config.timeout).await
    }

    /// Runs one command, bounded by `limit` (admin calls may take longer
    /// than the per-request budget).
    pub(crate) async fn query_within<T: FromRedisValue>(
        &self,
        cmd: &Cmd,
        limit: Duration,
    ) -> Result<T, RedisFailure> {
        let value = self.send(cmd, limit).await?;
        Ok(T::from_redis_value(value)?)
    }

    async fn send(&self, cmd: &Cmd, limit: Duration) -> Result<Value, RedisFailure> {
        let mut conn = self.for_this_thread()?;
        let fut = async move {
            match &mut conn {
                Conn::Standalone(c) => cmd.query_async::<Value>(c).await,
                Conn::Cluster(c) => cmd.query_async::<Value>(c).await,
            }
        };
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(RedisFailure::Timeout(limit)),
        }
    }

    /// Runs a script (EVALSHA, falling back to EVAL on NOSCRIPT), bounded by
    /// `limit` as a whole, sending it again after any transient failure: for
    /// scripts that give the same result however often they run (reads,
    /// lease renewals, an operator's ban).
    pub(crate) async fn eval(
        &self,
        script: &LuaScript,
        keys: &[&str],
        args: impl Fn(&mut Cmd),
        limit: Duration,
    ) -> Result<Value, RedisFailure> {
        self.eval_with(script, keys, args, limit, true).await
    }

    /// Runs a script that must run at most once (a decision, which charges
    /// tokens and counts violations): sent again only after failures that
    /// prove it did not run (a redirect, a slot being moved, a cluster
    /// electing a master, a refused connection), never after one that may
    /// have let it run (a connection lost after the command was written).
    pub(crate) async fn eval_at_most_once(
        &self,
        script: &LuaScript,
        keys: &[&str],
        args: impl Fn(&mut Cmd),
        limit: Duration,
    ) -> Result<Value, RedisFailure> {
        self.eval_with(script, keys, args, limit, false).await
    }

    async fn eval_with(
        &self,
        script: &LuaScript,
        keys: &[&str],
        args: impl Fn(&mut Cmd),
        limit: Duration,
        idempotent: bool,
    ) -> Result<Value, RedisFailure> {
        let call = |evalsha: bool| {
            let mut cmd = redis::cmd(if evalsha { "EVALSHA" } else { "EVAL" });
            cmd.arg(if evalsha {
                script.sha.as_str()
            } else {
                script.body
            })
            .arg(keys.len())
            .arg(keys);
            args(&mut cmd);
            cmd
        };
        let deadline = tokio::time::Instant::now() + limit;
        let mut evalsha = true;
        let mut pause = RETRY_PAUSE;
        // On a Cluster whose slot table is known, route by the first key.
        let slot = keys.first().map(|k| key_slot(k));
        let mut hop = Hop::Owner;
        let mut redirects = 0;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(RedisFailure::Timeout(limit));
            }
            let node = match (&hop, slot) {
                (Hop::Moved(addr), _) => Some((addr.clone(), false)),
                (Hop::Ask(addr), _) => Some((addr.clone(), true)),
                (Hop::Owner, Some(slot)) => self
                    .slots
                    .load()
                    .master_of(slot)
                    .map(|m| (m.to_string(), false)),
                (Hop::Owner, None) => None,
            };
            let result = match &node {
                Some((addr, asking)) => {
                    self.send_to_node(addr, &call(evalsha), *asking, left).await
                }
                None => self.send(&call(evalsha), left).await,
            };
            let failure = match result {
                Err(RedisFailure::Redis(e)) if evalsha && is_noscript(&e) => {
                    self.note_noscript();
                    evalsha = false;
                    continue;
                }
                Err(RedisFailure::Redis(e))
                    if node.is_some()
                        && e.redirect_node().is_some()
                        && redirects < MAX_REDIRECTS =>
                {
                    redirects += 1;
                    let to = e
                        .redirect_node()
                        .map(|(a, _)| a.to_string())
                        .unwrap_or_default();
                    hop = if matches!(e.kind(), ErrorKind::Server(ServerErrorKind::Ask)) {
                        Hop::Ask(to)
                    } else {
                        self.topology.notify_one();
                        Hop::Moved(to)
                    };
                    continue;
                }
                Err(f) if f.is_transient() && (idempotent || !f.may_have_run()) => f,
                // Report the call's budget, not the part left for this try.
                Err(RedisFailure::Timeout(_)) => return Err(RedisFailure::Timeout(limit)),
                other => return other,
            };
            self.topology.notify_one();
            // Retry only while a pause and another attempt still fit.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left <= pause * 2 {
                return Err(failure);
            }
            log::debug!("retrying a script call after a transient failure: {failure}");
            self.retries.increment(1);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_PAUSE_MAX);
            hop = Hop::Owner;
        }
    }

    /// Logs a lost script cache once, not once per call that meets it
    /// (every call in flight does, and on a cluster every node's).
    fn note_noscript(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.noscript_logged_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 1000)
            && self
                .noscript_logged_ms
                .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            log::info!("Redis lost the script cache (NOSCRIPT); sending the script body");
        }
    }

    /// A bound for admin and background calls: they may walk many keys.
    pub(crate) fn admin_timeout(&self) -> Duration {
        (self.config.timeout * 20).max(Duration::from_secs(2))
    }
}
