//! Talking to single Cluster nodes, and walking the keyspace: the slot
//! map (`CLUSTER SLOTS`), per-node connections for routed script calls,
//! probes, the list of masters, `SCAN` on every master, and pub/sub.
//!
//! Separate from the link's request path because these are the calls that
//! know the Cluster's shape; a standalone server goes through them too
//! (with one node).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, ServerErrorKind, Value};

use super::slots::{parse_cluster_masters, parse_cluster_slots, slots_on_failed_master, SlotTable};
use super::{connection_info, Conn, RedisFailure, RedisLink, SlotRange, NODE_CONNS};

impl RedisLink {
    /// How to reach one node (`host:port`): the first seed's settings
    /// (credentials, database) with that address.
    fn node_info(&self, addr: &str) -> Result<redis::ConnectionInfo, RedisFailure> {
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| {
                RedisFailure::Reply(redis::ParsingError::from("a node address without a port"))
            })?;
        let seed = self
            .config
            .cluster
            .first()
            .cloned()
            .or_else(|| self.config.url.clone())
            .unwrap_or_default();
        let info = connection_info(seed.as_str())?;
        Ok(info.set_addr(redis::ConnectionAddr::Tcp(host, port)))
    }

    /// This thread's connection to one Cluster node, opened if needed.
    async fn node_conn(&self, addr: &str) -> Result<MultiplexedConnection, RedisFailure> {
        let key = (self as *const RedisLink as usize, addr.to_string());
        if let Some(c) = NODE_CONNS.with(|m| m.borrow().get(&key).cloned()) {
            return Ok(c);
        }
        let client = redis::Client::open(self.node_info(addr)?)?;
        let conn = client.get_multiplexed_async_connection().await?;
        NODE_CONNS.with(|m| m.borrow_mut().insert(key, conn.clone()));
        Ok(conn)
    }

    /// Sends one command to one Cluster node, bounded by `limit`; with
    /// `asking`, on a connection of its own, right after `ASKING`.
    pub(super) async fn send_to_node(
        &self,
        addr: &str,
        cmd: &Cmd,
        asking: bool,
        limit: Duration,
    ) -> Result<Value, RedisFailure> {
        let call = async {
            if asking {
                let client = redis::Client::open(self.node_info(addr)?)?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("ASKING").query_async::<()>(&mut conn).await?;
                return Ok(cmd.query_async::<Value>(&mut conn).await?);
            }
            let mut conn = self.node_conn(addr).await?;
            let r = cmd.query_async::<Value>(&mut conn).await;
            if let Err(e) = &r {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    let key = (self as *const RedisLink as usize, addr.to_string());
                    NODE_CONNS.with(|m| m.borrow_mut().remove(&key));
                }
            }
            Ok(r?)
        };
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r,
            Err(_) => Err(RedisFailure::Timeout(limit)),
        }
    }

    /// Who owns which slots now, from `CLUSTER SLOTS` (empty on a
    /// standalone server).
    pub(crate) async fn slot_ranges(&self) -> Result<Vec<SlotRange>, RedisFailure> {
        if !self.is_cluster() {
            return Ok(Vec::new());
        }
        // Ask the masters last known, then the seeds, each on its own
        // connection (the cluster client may be busy rebuilding its map).
        let mut candidates: Vec<String> = self.slots.load().masters.clone();
        for url in &self.config.cluster {
            if let Ok(info) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
                if let redis::ConnectionAddr::Tcp(host, port) = info.addr() {
                    candidates.push(format!("{host}:{port}"));
                }
            }
        }
        candidates.dedup();
        let cmd = redis::cmd("CLUSTER").arg("SLOTS").clone();
        let mut last = RedisFailure::NotConnected;
        for addr in candidates {
            let value = match self
                .send_to_node(&addr, &cmd, false, self.config.connect_timeout)
                .await
            {
                Ok(v) => v,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let ranges = parse_cluster_slots(&value).ok_or_else(|| {
                RedisFailure::Reply(redis::ParsingError::from("CLUSTER SLOTS: unexpected reply"))
            })?;
            self.slots.store(Arc::new(SlotTable::from_ranges(&ranges)));
            return Ok(ranges);
        }
        Err(last)
    }

    /// PINGs one node (`host:port`) over a connection of its own, bounded
    /// by `redis.connect_timeout`: probes a shard without going through the
    /// cluster client's routing.
    pub(crate) async fn ping_node(&self, addr: &str) -> Result<(), RedisFailure> {
        let client = redis::Client::open(self.node_info(addr)?)?;
        let limit = self.config.connect_timeout;
        let ping = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        match tokio::time::timeout(limit, ping).await {
            Ok(r) => r.map(|_| ()).map_err(RedisFailure::from),
            Err(_) => Err(RedisFailure::Timeout(limit)),
        }
    }

    /// PINGs one master (`host:port`) on this thread's connection to it,
    /// bounded by `redis.timeout`: the watch's cheap proof of life.
    pub(crate) async fn ping_master(&self, addr: &str) -> Result<(), RedisFailure> {
        let ping = redis::cmd("PING");
        self.send_to_node(addr, &ping, false, self.config.timeout)
            .await
            .map(|_| ())
    }

    /// The addresses (`host:port`) of every master, or of the one server.
    pub(crate) async fn masters(&self) -> Result<Vec<(String, u16)>, RedisFailure> {
        let conn = self.current()?;
        let Conn::Cluster(_) = conn else {
            return Ok(Vec::new());
        };
        let text: String = self
            .query_within(
                &redis::cmd("CLUSTER").arg("NODES").clone(),
                self.admin_timeout(),
            )
            .await?;
        if slots_on_failed_master(&text) {
            // A partial walk would look like "no bans" for those slots.
            return Err(RedisFailure::Redis(RedisError::from((
                ErrorKind::Server(ServerErrorKind::ClusterDown),
                "a failed master still owns slots; retry after the failover",
            ))));
        }
        Ok(parse_cluster_masters(&text))
    }

    /// All keys matching `pattern`, with SCAN on every master (never KEYS,
    /// which blocks Redis).
    pub(crate) async fn scan(&self, pattern: &str) -> Result<Vec<String>, RedisFailure> {
        let masters = self.masters().await?;
        let mut keys = Vec::new();
        let targets: Vec<Option<(String, u16)>> = if masters.is_empty() {
            vec![None]
        } else {
            masters.into_iter().map(Some).collect()
        };
        for target in targets {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, batch): (u64, Vec<String>) = match &target {
                    None => self.query_within(&cmd, self.admin_timeout()).await?,
                    Some((host, port)) => {
                        let Conn::Cluster(mut c) = self.current()? else {
                            return Err(RedisFailure::NotConnected);
                        };
                        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        });
                        let fut = c.route_command(cmd, routing);
                        let v = tokio::time::timeout(self.admin_timeout(), fut)
                            .await
                            .map_err(|_| RedisFailure::Timeout(self.admin_timeout()))??;
                        FromRedisValue::from_redis_value(v)?
                    }
                };
                keys.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// Opens a dedicated pub/sub connection. On a cluster any node will do:
    /// classic PUBLISH reaches every node's subscribers.
    pub(crate) async fn pubsub(&self, attempt: usize) -> Result<redis::aio::PubSub, RedisFailure> {
        let url = match &self.config.url {
            Some(u) => u.clone(),
            None => self.config.cluster[attempt % self.config.cluster.len()].clone(),
        };
        let client = redis::Client::open(connection_info(&url)?)?;
        match tokio::time::timeout(self.config.connect_timeout, client.get_async_pubsub()).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(RedisFailure::Timeout(self.config.connect_timeout)),
        }
    }
}
