//! `[[blocklists]]`: files of addresses and networks (a feed such as
//! Spamhaus DROP or a FireHOL netset, or the operator's own) whose clients
//! get the ban answer, on every node, with no Redis call.
//!
//! Each list's content is a [`NetTable`] behind an atomic pointer: the
//! front door reads it without a lock, and a new read of the file replaces
//! it whole. One background thread looks at each file's modification time,
//! size and inode every `poll`, and reads it again when they change; a
//! reload re-reads every list within a second. A file that cannot be read
//! (missing, unreadable, past the size or entry bounds) leaves the last
//! good content in force: counted, and logged once when it starts failing
//! and once when it reads again. Bad lines are skipped, counted, and
//! reported in one log line per read with their line numbers.
//!
//! A list is consulted after the allowlist and the ban cache (phase 3), so
//! an allowlisted client is never refused by a list.

mod table;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use actix_web::http::StatusCode;
use arc_swap::ArcSwap;
use metrics::{Counter, Gauge};

use crate::config::BlocklistConfig;
use table::NetTable;

/// The largest list file read, in bytes.
pub(crate) const MAX_FILE_BYTES: u64 = 256 << 20;
/// The most networks one list may hold.
pub(crate) const MAX_ENTRIES: usize = 5_000_000;
/// How often the watcher wakes to see which lists are due.
const TICK: Duration = Duration::from_secs(1);

/// A request's client found in a list: how to answer it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Listed {
    /// `None`: `ban.status`.
    pub(crate) status: Option<StatusCode>,
    pub(crate) retry_after: Duration,
}

/// Every configured list.
pub(crate) struct Blocklists {
    lists: ArcSwap<Vec<Arc<List>>>,
}

/// One list: its settings, its content, and what its file looked like
/// when last read.
struct List {
    name: String,
    path: PathBuf,
    listed: Listed,
    poll: Duration,
    table: ArcSwap<NetTable>,
    watch: Mutex<Watch>,
    hits: Counter,
    entries: Gauge,
    bad_lines: Gauge,
    stale: Gauge,
    reads_ok: Counter,
    reads_failed: Counter,
}

/// What the file looked like, to see a change without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

struct Watch {
    seen: Option<Stamp>,
    next_check: Instant,
    failing: bool,
}

impl Blocklists {
    /// Reads every list of `configs` (paths relative to `config_file`'s
    /// directory) before returning, so a node serves no request before it
    /// knows its lists, and starts the thread that keeps them fresh.
    pub(crate) fn start(config_file: &Path, configs: &[BlocklistConfig]) -> Arc<Blocklists> {
        let lists = Arc::new(Blocklists {
            lists: ArcSwap::from_pointee(Vec::new()),
        });
        lists.configure(config_file, configs);
        lists.refresh(true);
        let watched = lists.clone();
        let spawned = std::thread::Builder::new()
            .name("blocklists".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                watched.refresh(false);
            });
        if let Err(e) = spawned {
            log::error!("cannot start the blocklist watcher: lists are not refreshed: {e}");
        }
        lists
    }

    /// Puts `configs` in effect (start-up and reload). A list whose file
    /// stays keeps its content until it has been read again, which the
    /// watcher does within a second.
    pub(crate) fn configure(&self, config_file: &Path, configs: &[BlocklistConfig]) {
        let base = config_file.parent().unwrap_or(Path::new("."));
        let old = self.lists.load_full();
        let next = configs
            .iter()
            .map(|c| {
                let path = base.join(&c.path);
                let name = c.name();
                let list = List::new(name, path, c);
                if let Some(before) = old.iter().find(|l| l.path == list.path) {
                    list.table.store(before.table.load_full());
                }
                Arc::new(list)
            })
            .collect();
        self.lists.store(Arc::new(next));
    }

    /// The list that holds `ip`, if any (the first in configuration order).
    pub(crate) fn listed(&self, ip: IpAddr) -> Option<Listed> {
        let lists = self.lists.load();
        lists.iter().find_map(|list| {
            list.table.load().contains(ip).then(|| {
                list.hits.increment(1);
                list.listed
            })
        })
    }

    /// Reads the lists that are due and whose file changed (`all`: every
    /// list, due or not).
    fn refresh(&self, all: bool) {
        let lists = self.lists.load_full();
        let now = Instant::now();
        for list in lists.iter() {
            list.refresh(now, all);
        }
    }
}

impl List {
    fn new(name: String, path: PathBuf, c: &BlocklistConfig) -> List {
        let label = |metric: &'static str| (metric, name.clone());
        let counter = |metric: &'static str| {
            let (m, n) = label(metric);
            metrics::counter!(m, "list" => n)
        };
        let gauge = |metric: &'static str| {
            let (m, n) = label(metric);
            metrics::gauge!(m, "list" => n)
        };
        use crate::metrics::{
            BLOCKLIST_BAD_LINES, BLOCKLIST_ENTRIES, BLOCKLIST_HITS, BLOCKLIST_READS,
            BLOCKLIST_STALE,
        };
        let reads = |result: &'static str| metrics::counter!(BLOCKLIST_READS, "list" => name.clone(), "result" => result);
        List {
            listed: Listed {
                status: c.status.and_then(|s| StatusCode::from_u16(s).ok()),
                retry_after: c.retry_after,
            },
            poll: c.poll,
            table: ArcSwap::from_pointee(NetTable::default()),
            // A new list (or one a reload touched) is read at once.
            watch: Mutex::new(Watch {
                seen: None,
                next_check: Instant::now(),
                failing: false,
            }),
            hits: counter(BLOCKLIST_HITS),
            entries: gauge(BLOCKLIST_ENTRIES),
            bad_lines: gauge(BLOCKLIST_BAD_LINES),
            stale: gauge(BLOCKLIST_STALE),
            reads_ok: reads("ok"),
            reads_failed: reads("error"),
            name,
            path,
        }
    }

    fn refresh(&self, now: Instant, all: bool) {
        let mut watch = self.watch.lock().unwrap_or_else(|p| p.into_inner());
        if !all && now < watch.next_check {
            return;
        }
        watch.next_check = now + self.poll;
        let stamp = match stamp(&self.path) {
            Ok(s) => s,
            Err(e) => return self.failed(&mut watch, &format!("cannot read it: {e}")),
        };
        if watch.seen == Some(stamp) && !watch.failing {
            return;
        }
        let started = Instant::now();
        match self.read(stamp) {
            Ok((table, bad)) => {
                if watch.failing {
                    log::info!(
                        "blocklist {}: {} read again",
                        self.name,
                        self.path.display()
                    );
                }
                watch.failing = false;
                watch.seen = Some(stamp);
                let entries = table.entries();
                // In force before it is counted as read.
                self.table.store(Arc::new(table));
                self.stale.set(0.0);
                self.reads_ok.increment(1);
                self.entries.set(entries as f64);
                self.bad_lines.set(bad.count as f64);
                let took = started.elapsed();
                if bad.count > 0 {
                    let lines: Vec<String> = bad.first.iter().map(|n| n.to_string()).collect();
                    log::warn!(
                        "blocklist {}: {} entries from {} in {} ms; {} lines skipped as not an address or network (lines {}{})",
                        self.name,
                        entries,
                        self.path.display(),
                        took.as_millis(),
                        bad.count,
                        lines.join(", "),
                        if bad.count > lines.len() { ", ..." } else { "" }
                    );
                } else {
                    log::info!(
                        "blocklist {}: {} entries from {} in {} ms",
                        self.name,
                        entries,
                        self.path.display(),
                        took.as_millis()
                    );
                }
            }
            Err(why) => self.failed(&mut watch, &why),
        }
    }

    fn read(&self, stamp: Stamp) -> Result<(NetTable, table::BadLines), String> {
        if stamp.len > MAX_FILE_BYTES {
            return Err(format!(
                "it has {} bytes, more than the {MAX_FILE_BYTES} a list may have",
                stamp.len
            ));
        }
        let file = std::fs::File::open(&self.path).map_err(|e| format!("cannot read it: {e}"))?;
        // Read no further than the bound, whatever the file grew to since.
        let input =
            std::io::BufReader::with_capacity(64 * 1024, std::io::Read::take(file, MAX_FILE_BYTES));
        NetTable::read(input, MAX_ENTRIES).map_err(|e| format!("cannot read it: {e}"))
    }

    /// Keeps the last good content; logs only when the list starts failing.
    fn failed(&self, watch: &mut Watch, why: &str) {
        self.reads_failed.increment(1);
        self.stale.set(1.0);
        if !watch.failing {
            log::warn!(
                "blocklist {}: {}: {why}; keeping its last good content ({} entries)",
                self.name,
                self.path.display(),
                self.table.load().entries()
            );
        }
        watch.failing = true;
        watch.seen = None;
    }
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a file"));
    }
    Ok(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

/// Checks that every list's file can be opened (`--check`, start-up and
/// reload), so a wrong path is a configuration error naming its key.
pub(crate) fn check_files(
    config_file: &Path,
    configs: &[BlocklistConfig],
) -> Result<(), crate::config::ConfigError> {
    let base = config_file.parent().unwrap_or(Path::new("."));
    for (i, c) in configs.iter().enumerate() {
        let path = base.join(&c.path);
        if let Err(e) = std::fs::File::open(&path).and_then(|f| {
            if f.metadata()?.is_file() {
                Ok(())
            } else {
                Err(std::io::Error::other("not a file"))
            }
        }) {
            return Err(crate::config::ConfigError {
                file: config_file.display().to_string(),
                key: format!("blocklists[{i}].path"),
                message: format!("cannot read {}: {e}", path.display()),
            });
        }
    }
    Ok(())
}
