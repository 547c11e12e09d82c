//! One upstream URL's health as every worker sees it: the active probes'
//! verdict, passive ejection after consecutive failures, and the requests
//! in flight to it (for least-outstanding picking). All of it is atomics,
//! shared by the workers and the prober thread, so reading it costs a few
//! loads per request.
//!
//! A URL takes traffic when its probes say healthy (always, without
//! probes) and it is not ejected. An ejection ends by itself after
//! `eject_for`: the first request that looks at the URL after that readmits
//! it. Every change of state is one log line and moves the
//! `floodgate_upstream_healthy{pool,url}` gauge.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Milliseconds since the first call in this process, plus one (0 means
/// "not ejected").
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// One URL of one pool.
pub(crate) struct Target {
    /// `http://host:port`, without a trailing slash.
    pub(crate) base: String,
    /// `host:port` to connect to (port 80 when the URL gives none).
    pub(crate) authority: String,
    pool: Arc<str>,
    outstanding: AtomicUsize,
    /// The active probes' verdict; true while the pool has no probes.
    probe_ok: AtomicBool,
    /// Consecutive passive failures (connect failures, 5xx answers).
    failures: AtomicU32,
    /// When the current ejection ends ([`now_ms`]); 0 when not ejected.
    ejected_until: AtomicU64,
    /// Bumped when the probe settings change: a prober of an older epoch
    /// stops.
    pub(crate) probe_epoch: AtomicU64,
    healthy: metrics::Gauge,
    ejections: metrics::Counter,
}

impl Target {
    pub(crate) fn new(pool: &Arc<str>, url: &str) -> Target {
        let base = url.trim_end_matches('/').to_string();
        // Validation made sure of an http URL with a host.
        let authority = base
            .parse::<actix_web::http::Uri>()
            .ok()
            .and_then(|u| Some(format!("{}:{}", u.host()?, u.port_u16().unwrap_or(80))))
            .unwrap_or_else(|| base.trim_start_matches("http://").to_string());
        let labels = [("pool", pool.to_string()), ("url", base.clone())];
        let t = Target {
            healthy: metrics::gauge!(crate::metrics::UPSTREAM_HEALTHY, &labels),
            ejections: metrics::counter!(crate::metrics::UPSTREAM_EJECTIONS, &labels),
            base,
            authority,
            pool: pool.clone(),
            outstanding: AtomicUsize::new(0),
            probe_ok: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            probe_epoch: AtomicU64::new(0),
        };
        t.healthy.set(1.0);
        t
    }

    /// Requests to this URL whose response has not ended yet.
    /// `host[:port]` as the URL gives it: the `Host` of forwarded requests.
    pub(crate) fn host(&self) -> &str {
        self.base
            .split_once("://")
            .map_or(self.base.as_str(), |(_, rest)| rest)
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Whether the URL takes traffic now; readmits it if its ejection has
    /// run out.
    pub(crate) fn available(&self) -> bool {
        if !self.probe_ok.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if now_ms() < until {
            return false;
        }
        if self
            .ejected_until
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.failures.store(0, Ordering::Relaxed);
            log::info!(
                "upstream {} of pool {} readmitted: its ejection ended",
                self.base,
                self.pool
            );
            self.show();
        }
        true
    }

    /// How long until this URL may take traffic again, as far as is known
    /// now: the rest of its ejection, or `probe_interval` when the probes
    /// hold it out.
    pub(crate) fn wait(&self, probe_interval: Option<Duration>) -> Duration {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let ejected = Duration::from_millis(until.saturating_sub(now_ms()));
        if self.probe_ok.load(Ordering::Relaxed) {
            ejected
        } else {
            ejected.max(probe_interval.unwrap_or(Duration::from_secs(1)))
        }
    }

    /// Counts one more request in flight until the guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// A request got an answer that was not a failure.
    pub(crate) fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts one more failure in a row; true once `eject_after` of them
    /// came (0: never).
    pub(crate) fn failed(&self, eject_after: u32) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        eject_after != 0 && n >= eject_after
    }

    /// Whether the URL is out of rotation by ejection now.
    pub(crate) fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// Takes the URL out of rotation for `eject_for` (one log line, counted).
    pub(crate) fn eject(&self, eject_for: Duration, why: &str) {
        let n = self.failures.load(Ordering::Relaxed);
        let until = now_ms() + eject_for.as_millis() as u64;
        if self
            .ejected_until
            .compare_exchange(0, until, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.ejections.increment(1);
            log::warn!(
                "upstream {} of pool {} ejected for {} after {n} failures in a row (last: {why})",
                self.base,
                self.pool,
                humantime::format_duration(eject_for)
            );
            self.show();
        }
    }

    /// Records a probe verdict that held for long enough to count.
    pub(crate) fn set_probed(&self, ok: bool, detail: &str) {
        if self.probe_ok.swap(ok, Ordering::AcqRel) != ok {
            if ok {
                log::info!(
                    "upstream {} of pool {} is healthy again: {detail}",
                    self.base,
                    self.pool
                );
            } else {
                log::warn!(
                    "upstream {} of pool {} is unhealthy, out of rotation: {detail}",
                    self.base,
                    self.pool
                );
            }
            self.show();
        }
    }

    pub(crate) fn probed_ok(&self) -> bool {
        self.probe_ok.load(Ordering::Relaxed)
    }

    /// Probes were turned off: only passive ejection decides from now on.
    pub(crate) fn stop_probing(&self) {
        self.probe_epoch.fetch_add(1, Ordering::AcqRel);
        self.set_probed(true, "active probes turned off");
    }

    fn show(&self) {
        let up = self.probe_ok.load(Ordering::Relaxed)
            && self.ejected_until.load(Ordering::Relaxed) == 0;
        self.healthy.set(if up { 1.0 } else { 0.0 });
    }
}

impl Drop for Target {
    /// A URL a reload removed takes no traffic any more.
    fn drop(&mut self) {
        self.healthy.set(0.0);
    }
}

/// A request in flight to one URL (see [`Target::begin`]).
pub(crate) struct InFlight(Arc<Target>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_follows_consecutive_failures_and_ends_by_itself() {
        let t = Target::new(&Arc::from("p"), "http://127.0.0.1:1/");
        assert_eq!(t.base, "http://127.0.0.1:1");
        assert_eq!(t.authority, "127.0.0.1:1");
        let default_port = Target::new(&Arc::from("p"), "http://upstream.internal/");
        assert_eq!(default_port.authority, "upstream.internal:80");
        assert!(!t.failed(2));
        t.succeeded();
        assert!(!t.failed(2), "a success in between resets the count");
        assert!(t.failed(2));
        t.eject(Duration::from_millis(30), "x");
        assert!(!t.available());
        assert!(t.wait(None) <= Duration::from_millis(30));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !t.available() {
            assert!(Instant::now() < deadline, "never readmitted");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!t.failed(2), "readmission starts the count again");
    }

    #[test]
    fn probes_hold_a_url_out_and_in_flight_is_counted() {
        let t = Arc::new(Target::new(&Arc::from("p"), "http://127.0.0.1:1"));
        t.set_probed(false, "test");
        assert!(!t.available());
        assert_eq!(t.wait(Some(Duration::from_secs(3))), Duration::from_secs(3));
        t.stop_probing();
        assert!(t.available());
        let a = t.begin();
        let b = t.begin();
        assert_eq!(t.outstanding(), 2);
        drop((a, b));
        assert_eq!(t.outstanding(), 0);
    }
}
