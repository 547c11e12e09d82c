//! A Redis Cluster (3 masters, 3 replicas) built from [`RedisServer`]s, for
//! the gateway's cluster mode: failover, slot moves and per-shard degrading.

use std::process::{Command, Stdio};
use std::time::Duration;

use super::proc::{free_port, wait_until};
use super::redis::RedisServer;

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
