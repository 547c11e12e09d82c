//! How leases end: by an event or a refund (`end_subject`), a reload
//! (`end_all`), or their time (`sweep`), and what they held queued to go
//! back; and room made in a full table.

use std::collections::HashMap;
use std::time::Instant;

use super::{next_want, Entry, Lease, Returned, TokenLeases};

impl TokenLeases {
    /// Ends every lease of `tag` (an unban, a plan change, a refund): what
    /// is left goes back. Returns what a lease of `sig` held, if one did
    /// (the caller gives it back itself, with its own refund).
    pub(crate) fn end_subject(&self, tag: &str, sig: Option<u64>) -> Option<Returned> {
        let mut shard = self.shard(tag).lock().unwrap_or_else(|p| p.into_inner());
        let entries = shard.remove(tag)?;
        let mut mine = None;
        for e in entries {
            let Some(lease) = e.lease else { continue };
            if Some(e.sig) == sig {
                mine = Some(Returned {
                    tag: tag.to_string(),
                    sig: lease.sig,
                    count: lease.left,
                    rules: lease.rules,
                    ttl_ms: lease.ttl_ms,
                });
            } else {
                self.give_back(tag, lease);
            }
        }
        mine
    }

    /// Ends every lease (a reload: rules may have changed).
    pub(crate) fn end_all(&self) {
        for shard in &self.shards {
            let drained: Vec<(String, Vec<Entry>)> = shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain()
                .collect();
            for (tag, entries) in drained {
                for lease in entries.into_iter().filter_map(|e| e.lease) {
                    self.give_back(&tag, lease);
                }
            }
        }
    }

    /// Everything waiting to be given back; with `scan`, first ends the
    /// leases whose time is over and forgets subjects not seen for a while
    /// (a walk of the whole table: done every half lease, while the queue
    /// of ended leases is emptied more often).
    pub(crate) fn sweep(&self, now: Instant, scan: bool) -> Vec<Returned> {
        let idle = self.lease_for * 10;
        for shard in self.shards.iter().filter(|_| scan) {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (tag, entries) in shard.iter_mut() {
                for e in entries.iter_mut() {
                    // A subject still coming gets its expired lease carried
                    // over by its next request (`take`), which keeps what
                    // it needs and gives back the rest; ending it here
                    // would race that request, which Redis would then refuse
                    // while the tokens are on their way back. A lease is
                    // held at most two lease times all the same.
                    let seen_lately =
                        now.saturating_duration_since(e.last_seen) < self.lease_for / 2;
                    if e.lease.as_ref().is_some_and(|l| {
                        now >= l.expires && (!seen_lately || now >= l.expires + self.lease_for)
                    }) {
                        if let Some(lease) = e.lease.take() {
                            e.want = next_want(&lease, now, self.lease_for);
                            self.give_back(tag, lease);
                        }
                    }
                }
                entries.retain(|e| {
                    e.lease.is_some() || now.saturating_duration_since(e.last_seen) < idle
                });
            }
            shard.retain(|_, entries| !entries.is_empty());
        }
        let mut returning = self.returning.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = std::mem::take(&mut *returning);
        // Some may have been taken back by refused requests.
        out.retain(|r| r.count > 0);
        out
    }

    /// Queues what `lease` has left for the sweep to give back.
    pub(super) fn give_back(&self, tag: &str, lease: Lease) {
        if lease.left == 0 {
            return;
        }
        self.returning
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Returned {
                tag: tag.to_string(),
                sig: lease.sig,
                count: lease.left,
                rules: lease.rules,
                ttl_ms: lease.ttl_ms,
            });
    }

    /// A full shard: forgets subjects without a lease, oldest first.
    pub(super) fn make_room(&self, shard: &mut HashMap<String, Vec<Entry>>, now: Instant) {
        let idle = self.lease_for * 10;
        shard.retain(|_, entries| {
            entries
                .iter()
                .any(|e| e.lease.is_some() || now.saturating_duration_since(e.last_seen) < idle)
        });
        if shard.len() >= self.per_shard {
            // Still full of recent subjects: drop those without a lease.
            shard.retain(|_, entries| entries.iter().any(|e| e.lease.is_some()));
        }
    }
}
