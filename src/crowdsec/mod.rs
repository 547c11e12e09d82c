//! `[crowdsec]`: this node as a bouncer of a CrowdSec Local API. A thread
//! polls the decisions stream (`GET /v1/decisions/stream`, header
//! `X-Api-Key`): the whole set of active decisions first
//! (`startup=true`), then what changed since the last poll. Each `ban`
//! decision on an address or a range is enforced, for its own duration,
//! in phase 3 beside the ban cache: the client gets the ban answer with no
//! Redis call, on every node (each node is a bouncer of its own).
//!
//! The set is held behind an atomic pointer: the front door reads it with
//! no lock, the poller replaces it after each change. A poll that fails
//! (the Local API unreachable, a refused key, a document that is not a
//! stream) keeps the decisions in force (each still ends at its own time),
//! is counted, and is logged once per change of state; the next poll that
//! works asks for the whole set again, so nothing missed in between is
//! lost.
//!
//! Decisions are CrowdSec's: they are listed with the bans
//! (`source = "crowdsec:<origin>"`) but lifted in CrowdSec, and floodgate's
//! own bans are not sent back (see docs/operations.md).

mod stream;

use std::collections::HashMap;
use std::io::Read;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::http::StatusCode;
use arc_swap::ArcSwap;
use ipnet::IpNet;
use metrics::{Counter, Gauge};

use crate::bans::{rfc3339_ms, BanView};
use crate::config::CrowdsecConfig;

/// The largest stream answer read, in bytes (100 000 decisions are about
/// 20 MB).
const MAX_BODY_BYTES: u64 = 256 << 20;
/// How long one poll may take.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);

/// One decision in force.
#[derive(Debug, Clone)]
struct Entry {
    id: i64,
    until: SystemTime,
    origin: Arc<str>,
    scenario: Arc<str>,
}

/// The decisions in force, by network, with the prefix lengths present so
/// that a lookup is one hash probe per length (usually one or two).
#[derive(Debug, Default, Clone)]
struct Decisions {
    by_net: HashMap<IpNet, Vec<Entry>>,
    lens_v4: Vec<u8>,
    lens_v6: Vec<u8>,
    count: usize,
}

impl Decisions {
    /// The latest end of a decision covering `ip`, if one is in force.
    fn until(&self, ip: IpAddr, now: SystemTime) -> Option<SystemTime> {
        let lens = match ip {
            IpAddr::V4(_) => &self.lens_v4,
            IpAddr::V6(_) => &self.lens_v6,
        };
        lens.iter()
            .filter_map(|len| IpNet::new(ip, *len).ok().map(|n| n.trunc()))
            .filter_map(|net| self.by_net.get(&net))
            .flat_map(|entries| entries.iter().map(|e| e.until))
            .filter(|until| *until > now)
            .max()
    }

    fn insert(&mut self, net: IpNet, entry: Entry) {
        let entries = self.by_net.entry(net).or_default();
        entries.retain(|e| e.id != entry.id || entry.id == 0);
        entries.push(entry);
    }

    fn remove(&mut self, id: i64, net: &IpNet) {
        if let Some(entries) = self.by_net.get_mut(net) {
            entries.retain(|e| id != 0 && e.id != id);
            if entries.is_empty() {
                self.by_net.remove(net);
            }
        }
    }

    /// Drops ended decisions and recounts; whether anything changed.
    fn settle(&mut self, now: SystemTime) -> bool {
        let before = self.count;
        self.by_net.retain(|_, entries| {
            entries.retain(|e| e.until > now);
            !entries.is_empty()
        });
        let mut v4: Vec<u8> = Vec::new();
        let mut v6: Vec<u8> = Vec::new();
        for net in self.by_net.keys() {
            let lens = if net.addr().is_ipv4() {
                &mut v4
            } else {
                &mut v6
            };
            if !lens.contains(&net.prefix_len()) {
                lens.push(net.prefix_len());
            }
        }
        v4.sort_unstable_by(|a, b| b.cmp(a));
        v6.sort_unstable_by(|a, b| b.cmp(a));
        self.lens_v4 = v4;
        self.lens_v6 = v6;
        self.count = self.by_net.values().map(Vec::len).sum();
        self.count != before
    }
}

/// The bouncer: the decisions in force and how to answer them.
pub(crate) struct Crowdsec {
    decisions: ArcSwap<Decisions>,
    status: Option<StatusCode>,
    hits: Counter,
}

impl Crowdsec {
    /// Starts polling `config`'s Local API (nothing without `[crowdsec]`).
    pub(crate) fn start(config: Option<&CrowdsecConfig>) -> Arc<Crowdsec> {
        let crowdsec = Arc::new(Crowdsec {
            decisions: ArcSwap::from_pointee(Decisions::default()),
            status: config
                .and_then(|c| c.status)
                .and_then(|s| StatusCode::from_u16(s).ok()),
            hits: metrics::counter!(crate::metrics::CROWDSEC_HITS),
        });
        let Some(config) = config else {
            return crowdsec;
        };
        let Some(key) = std::env::var(&config.api_key_env)
            .ok()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
        else {
            log::error!(
                "crowdsec.api_key_env: {} is not set: CrowdSec decisions are not enforced",
                config.api_key_env
            );
            metrics::gauge!(crate::metrics::CROWDSEC_UP).set(0.0);
            return crowdsec;
        };
        let poller = Poller::new(config, key, crowdsec.clone());
        if let Err(e) = std::thread::Builder::new()
            .name("crowdsec".into())
            .spawn(move || poller.run())
        {
            log::error!("cannot start the CrowdSec poller: decisions are not enforced: {e}");
        }
        crowdsec
    }

    /// How long `ip` is banned by a CrowdSec decision, and the status to
    /// answer with (`None`: `ban.status`).
    pub(crate) fn banned(&self, ip: IpAddr) -> Option<(Duration, Option<StatusCode>)> {
        let decisions = self.decisions.load();
        if decisions.count == 0 {
            return None;
        }
        let now = SystemTime::now();
        let until = decisions.until(ip, now)?;
        self.hits.increment(1);
        Some((until.duration_since(now).unwrap_or_default(), self.status))
    }

    /// The decisions in force, as the admin API lists bans.
    pub(crate) fn views(&self) -> Vec<BanView> {
        let decisions = self.decisions.load();
        let now = SystemTime::now();
        let now_ms = ms(now);
        decisions
            .by_net
            .iter()
            .filter_map(|(net, entries)| {
                let e = entries
                    .iter()
                    .filter(|e| e.until > now)
                    .max_by_key(|e| e.until)?;
                let until_ms = ms(e.until);
                let subject = if net.prefix_len() == net.max_prefix_len() {
                    net.addr().to_string()
                } else {
                    net.to_string()
                };
                Some(BanView {
                    subject,
                    until: rfc3339_ms(until_ms),
                    remaining: until_ms.saturating_sub(now_ms).div_ceil(1000),
                    reason: e.scenario.to_string(),
                    strikes: 0,
                    source: format!("crowdsec:{}", e.origin),
                })
            })
            .collect()
    }
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// The thread that polls the stream and keeps the master copy.
struct Poller {
    stream_url: String,
    key: String,
    poll: Duration,
    max: usize,
    agent: ureq::Agent,
    target: Arc<Crowdsec>,
    master: Decisions,
    up: Gauge,
    held: Gauge,
    pulls_ok: Counter,
    pulls_failed: Counter,
    skipped: Counter,
}

impl Poller {
    fn new(config: &CrowdsecConfig, key: String, target: Arc<Crowdsec>) -> Poller {
        use crate::metrics::{CROWDSEC_DECISIONS, CROWDSEC_PULLS, CROWDSEC_SKIPPED, CROWDSEC_UP};
        Poller {
            stream_url: format!("{}/v1/decisions/stream", config.url.trim_end_matches('/')),
            key,
            poll: config.poll,
            max: config.max_decisions,
            agent: ureq::AgentBuilder::new().timeout(POLL_TIMEOUT).build(),
            target,
            master: Decisions::default(),
            up: metrics::gauge!(CROWDSEC_UP),
            held: metrics::gauge!(CROWDSEC_DECISIONS),
            pulls_ok: metrics::counter!(CROWDSEC_PULLS, "result" => "ok"),
            pulls_failed: metrics::counter!(CROWDSEC_PULLS, "result" => "error"),
            skipped: metrics::counter!(CROWDSEC_SKIPPED),
        }
    }

    fn run(mut self) {
        let mut startup = true;
        let mut failing: Option<bool> = None;
        loop {
            let mut changed = false;
            match self.pull(startup) {
                Ok(delta) => {
                    self.pulls_ok.increment(1);
                    self.up.set(1.0);
                    if failing != Some(false) {
                        log::info!(
                            "crowdsec: polling {} every {:?}",
                            self.stream_url,
                            self.poll
                        );
                    }
                    failing = Some(false);
                    changed = startup || !delta.new.is_empty() || !delta.deleted.is_empty();
                    self.apply(delta, startup);
                    startup = false;
                }
                Err(why) => {
                    self.pulls_failed.increment(1);
                    self.up.set(0.0);
                    if failing != Some(true) {
                        log::warn!(
                            "crowdsec: {}: {why}; the {} decisions in force stay until they end",
                            self.stream_url,
                            self.master.count
                        );
                    }
                    failing = Some(true);
                    // The whole set again once it answers: nothing missed.
                    startup = true;
                }
            }
            // Published only when it changed: a copy of a large set costs.
            if self.master.settle(SystemTime::now()) || changed {
                self.target.decisions.store(Arc::new(self.master.clone()));
                self.held.set(self.master.count as f64);
            }
            std::thread::sleep(self.poll);
        }
    }

    fn pull(&self, startup: bool) -> Result<stream::Delta, String> {
        let answer = self
            .agent
            .get(&self.stream_url)
            .query("startup", if startup { "true" } else { "false" })
            .set("X-Api-Key", &self.key)
            .call()
            .map_err(|e| match e {
                ureq::Error::Status(403, _) => {
                    "the Local API refused the bouncer key (403)".to_string()
                }
                e => format!("cannot poll it: {e}"),
            })?;
        let mut body = Vec::new();
        answer
            .into_reader()
            .take(MAX_BODY_BYTES + 1)
            .read_to_end(&mut body)
            .map_err(|e| format!("cannot read its answer: {e}"))?;
        if body.len() as u64 > MAX_BODY_BYTES {
            return Err(format!("its answer is larger than {MAX_BODY_BYTES} bytes"));
        }
        stream::parse(&body)
    }

    fn apply(&mut self, delta: stream::Delta, startup: bool) {
        let now = SystemTime::now();
        if startup {
            self.master = Decisions::default();
        }
        for (id, net) in &delta.deleted {
            self.master.remove(*id, net);
        }
        let mut skipped = delta.skipped;
        let mut full = 0;
        let mut held: usize = self.master.by_net.values().map(Vec::len).sum();
        for d in delta.new {
            if held >= self.max {
                full += 1;
                continue;
            }
            held += 1;
            self.master.insert(
                d.net,
                Entry {
                    id: d.id,
                    until: now + d.left,
                    origin: Arc::from(d.origin.as_str()),
                    scenario: Arc::from(d.scenario.as_str()),
                },
            );
        }
        if full > 0 {
            log::warn!(
                "crowdsec: {full} decisions not enforced: crowdsec.max_decisions ({}) are held",
                self.max
            );
        }
        skipped += full;
        if skipped > 0 {
            self.skipped.increment(skipped as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: i64, secs: u64) -> Entry {
        Entry {
            id,
            until: SystemTime::now() + Duration::from_secs(secs),
            origin: Arc::from("cscli"),
            scenario: Arc::from("manual"),
        }
    }

    #[test]
    fn addresses_and_ranges_are_found_and_end_by_id() {
        let mut d = Decisions::default();
        d.insert("127.0.0.9/32".parse().unwrap(), entry(1, 60));
        d.insert("10.1.0.0/16".parse().unwrap(), entry(2, 60));
        d.insert("10.1.0.0/16".parse().unwrap(), entry(3, 120));
        d.insert("2001:db8::/32".parse().unwrap(), entry(4, 60));
        assert!(d.settle(SystemTime::now()));
        let now = SystemTime::now();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(d.until(ip("127.0.0.9"), now).is_some());
        assert!(d.until(ip("127.0.0.10"), now).is_none());
        assert!(d.until(ip("10.1.200.3"), now).is_some());
        assert!(d.until(ip("2001:db8::1"), now).is_some());
        d.remove(3, &"10.1.0.0/16".parse().unwrap());
        assert!(d.until(ip("10.1.200.3"), now).is_some(), "decision 2 stays");
        d.remove(2, &"10.1.0.0/16".parse().unwrap());
        assert!(d.settle(now));
        assert!(d.until(ip("10.1.200.3"), now).is_none());
        assert_eq!(d.count, 2);
        assert!(d
            .until(ip("127.0.0.9"), now + Duration::from_secs(61))
            .is_none());
    }
}
