//! Upstream pools and routes as the front door uses them: which pool a
//! request goes to (`[[routes]]`, first match wins, else `[upstream]`), and
//! which URL of that pool takes it (the healthy one with the fewest
//! requests in flight, see [`Pool::pick`]).
//!
//! A [`PoolSet`] is part of the reloadable snapshot. Compiling a new one
//! keeps the health state of every URL that stays in a pool of the same
//! name (and its prober, if the probe settings are unchanged), so a reload
//! never readmits a URL that was out, nor restarts its counts. A pool whose
//! settings did not change is kept whole, so the workers keep their
//! connections to it.
//!
//! Health itself (probes, ejection) lives in [`health`] and [`probe`];
//! forwarding and retries in `proxy`.

pub(crate) mod health;
mod probe;

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::Method;
use actix_web::HttpRequest;

use crate::config::{Config, RouteConfig, UpstreamConfig};
use crate::path_match::PathReadings;
use health::Target;

/// The name `[upstream]` goes by in metrics, logs and routes.
pub(crate) const DEFAULT_POOL: &str = "default";

/// One pool of upstream URLs with its settings.
pub(crate) struct Pool {
    pub(crate) name: Arc<str>,
    pub(crate) config: Arc<UpstreamConfig>,
    targets: Vec<Arc<Target>>,
    retries: metrics::Counter,
    /// Ejections held back by `max_ejected_percent` or the last URL.
    held_back: metrics::Counter,
}

thread_local! {
    /// Where this worker starts its next scan of a pool: ties go round in
    /// turn without a counter that every worker writes.
    static TURN: Cell<usize> = const { Cell::new(0) };
}

/// Why a try on a URL failed, for passive ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The connection was refused or never made: the URL is down.
    Unreachable,
    /// A 502, 503 or 504 answer, or no answer in time: the URL's trouble,
    /// but to a request some client chose.
    Answer,
}

/// What [`Pool::pick`] found.
pub(crate) enum Pick {
    /// This URL (an index into the pool).
    Url(usize),
    /// Every URL that takes traffic was tried already.
    AllTried,
    /// No URL takes traffic; the earliest may again in about this long.
    NoneHealthy(Duration),
}

impl Pool {
    fn new(name: &str, config: &UpstreamConfig, previous: Option<&Pool>) -> Pool {
        let name: Arc<str> = Arc::from(name);
        let probes_same = previous.is_some_and(|p| p.config.health == config.health);
        let targets = config
            .urls
            .iter()
            .map(|u| {
                let base = u.trim_end_matches('/');
                let kept = previous.and_then(|p| p.targets.iter().find(|t| t.base == base));
                match kept {
                    Some(t) => {
                        if !probes_same {
                            match &config.health {
                                Some(h) => probe::watch(t, h),
                                None => t.stop_probing(),
                            }
                        }
                        t.clone()
                    }
                    None => {
                        let t = Arc::new(Target::new(&name, u));
                        if let Some(h) = &config.health {
                            probe::watch(&t, h);
                        }
                        t
                    }
                }
            })
            .collect();
        Pool {
            retries: metrics::counter!(crate::metrics::UPSTREAM_RETRIES, "pool" => name.to_string()),
            held_back: metrics::counter!(crate::metrics::UPSTREAM_EJECTIONS_HELD, "pool" => name.to_string()),
            name,
            config: Arc::new(config.clone()),
            targets,
        }
    }

    /// The URL `i` (as returned by [`Pool::pick`]).
    pub(crate) fn target(&self, i: usize) -> &Arc<Target> {
        &self.targets[i]
    }

    /// Whether a URL's failures may eject it: a pool of one URL has nowhere
    /// else to send its traffic, so only its probes can take it out.
    pub(crate) fn ejects(&self) -> bool {
        self.targets.len() > 1 && self.config.eject_after > 0
    }

    /// Counts a failure of URL `i` towards its passive ejection, and
    /// ejects it when it has failed `eject_after` times in a row. A URL that
    /// refused connections is down whatever its pool looks like; one whose
    /// failures were answers (or no answer in time) to requests that clients
    /// chose is ejected only while the pool keeps the rest: at most
    /// `max_ejected_percent` of its URLs out at once (at least one), and
    /// never the last one in rotation. An ejection held back is counted.
    pub(crate) fn failed(&self, i: usize, failure: Failure, why: &str) {
        if !self.ejects() || !self.targets[i].failed(self.config.eject_after) {
            return;
        }
        if failure == Failure::Answer && !self.may_eject_on_answers(i) {
            self.held_back.increment(1);
            log::debug!(
                "upstream {} of pool {} failed {} times in a row ({why}), kept in rotation: the pool has its share of URLs out",
                self.targets[i].base,
                self.name,
                self.config.eject_after
            );
            return;
        }
        self.targets[i].eject(self.config.eject_for, why);
    }

    /// Whether URL `i` may be ejected for what it answered: the pool stays
    /// within `max_ejected_percent` and keeps another URL in rotation.
    fn may_eject_on_answers(&self, i: usize) -> bool {
        let n = self.targets.len();
        let share = (n * self.config.max_ejected_percent as usize / 100).max(1);
        let ejected = self.targets.iter().filter(|t| t.is_ejected()).count();
        let others_up = self
            .targets
            .iter()
            .enumerate()
            .any(|(j, t)| j != i && t.available());
        self.config.max_ejected_percent > 0 && ejected < share && others_up
    }

    /// Counts one more try of a request on another URL.
    pub(crate) fn retried(&self) {
        self.retries.increment(1);
    }

    /// The URL for the next try: among those that take traffic and are not
    /// in `tried` (bit i = URL i), the one with the fewest requests in
    /// flight, ties going round in turn (per worker thread).
    pub(crate) fn pick(&self, tried: u64) -> Pick {
        let n = self.targets.len();
        if n == 1 {
            return match (tried & 1 == 0, self.targets[0].available()) {
                (true, true) => Pick::Url(0),
                (false, true) => Pick::AllTried,
                (_, false) => Pick::NoneHealthy(self.wait()),
            };
        }
        let start = TURN.with(|t| {
            let v = t.get();
            t.set(v.wrapping_add(1));
            v
        });
        let mut best: Option<(usize, usize)> = None;
        let mut any_available = false;
        for k in 0..n {
            let i = (start + k) % n;
            let t = &self.targets[i];
            if !t.available() {
                continue;
            }
            any_available = true;
            if tried & (1u64 << (i % 64)) != 0 {
                continue;
            }
            let load = t.outstanding();
            if best.is_none_or(|(_, b)| load < b) {
                best = Some((i, load));
            }
        }
        match best {
            Some((i, _)) => Pick::Url(i),
            None if any_available => Pick::AllTried,
            None => Pick::NoneHealthy(self.wait()),
        }
    }

    /// How long until the first URL of this pool may take traffic again.
    fn wait(&self) -> Duration {
        let interval = self.config.health.as_ref().map(|h| h.interval);
        self.targets
            .iter()
            .map(|t| t.wait(interval))
            .min()
            .unwrap_or(Duration::from_secs(1))
    }
}

/// One compiled `[[routes]]` entry.
struct Route {
    host: Option<String>,
    path_prefix: Option<String>,
    case_sensitive: bool,
    methods: Option<Vec<Method>>,
    pool: Arc<Pool>,
}

/// A request path whose readings (see [`crate::path_match`]) would pick
/// different pools; answered with 400 like the same doubt about a rule.
#[derive(Debug, thiserror::Error)]
#[error("the path `{plain}` also reads as `{other}`, which routes elsewhere; send it in one plain spelling")]
pub(crate) struct AmbiguousRoute {
    plain: String,
    other: String,
}

/// Every pool and route of one configuration.
pub(crate) struct PoolSet {
    default: Arc<Pool>,
    named: Vec<Arc<Pool>>,
    routes: Vec<Route>,
}

impl PoolSet {
    /// Compiles the pools and routes of `config`, keeping the health state
    /// (and, when unchanged, the whole pool) from `previous`.
    pub(crate) fn compile(config: &Config, previous: Option<&PoolSet>) -> PoolSet {
        let build = |name: &str, c: &UpstreamConfig| -> Arc<Pool> {
            let old = previous.and_then(|p| p.by_name(name));
            match old {
                Some(p) if *p.config == *c => p.clone(),
                _ => Arc::new(Pool::new(name, c, old.map(|p| &**p))),
            }
        };
        let default = build(DEFAULT_POOL, &config.upstream);
        let named: Vec<Arc<Pool>> = config
            .upstreams
            .iter()
            .map(|(name, c)| build(name, c))
            .collect();
        let routes = config
            .routes
            .iter()
            .map(|r: &RouteConfig| Route {
                host: r.matcher.host.as_ref().map(|h| h.to_ascii_lowercase()),
                path_prefix: r.matcher.path_prefix.clone(),
                case_sensitive: r.matcher.case_sensitive,
                methods: r.matcher.methods.as_ref().map(|ms| {
                    ms.iter()
                        .filter_map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
                        .collect()
                }),
                pool: if r.upstream == DEFAULT_POOL {
                    default.clone()
                } else {
                    named
                        .iter()
                        .find(|p| *p.name == *r.upstream)
                        .cloned()
                        .unwrap_or_else(|| default.clone())
                },
            })
            .collect();
        PoolSet {
            default,
            named,
            routes,
        }
    }

    /// The pool called `name` (`default` is `[upstream]`).
    pub(crate) fn by_name(&self, name: &str) -> Option<&Arc<Pool>> {
        if name == DEFAULT_POOL {
            return Some(&self.default);
        }
        self.named.iter().find(|p| &*p.name == name)
    }

    #[cfg(test)]
    /// `[upstream]`.
    pub(crate) fn default_pool(&self) -> &Arc<Pool> {
        &self.default
    }

    /// The pool the first matching route names, else `[upstream]`.
    pub(crate) fn route(&self, req: &HttpRequest) -> Result<&Arc<Pool>, AmbiguousRoute> {
        if self.routes.is_empty() {
            return Ok(&self.default);
        }
        let path = PathReadings::of(req.path());
        for r in &self.routes {
            if let Some(ms) = &r.methods {
                if !ms
                    .iter()
                    .any(|m| m.as_str().eq_ignore_ascii_case(req.method().as_str()))
                {
                    continue;
                }
            }
            if let Some(h) = &r.host {
                if !crate::rules::host_is(req, h) {
                    continue;
                }
            }
            if let Some(p) = &r.path_prefix {
                match path.starts_with(p, r.case_sensitive) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err((plain, other)) => return Err(AmbiguousRoute { plain, other }),
                }
            }
            return Ok(&r.pool);
        }
        Ok(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(
            &format!("[upstream]\nurls = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\", \"http://127.0.0.1:3\"]\neject_after = 1\n{extra}"),
            "t.toml",
        )
        .expect("valid")
    }

    #[test]
    fn the_url_with_fewest_requests_in_flight_is_picked() {
        let set = PoolSet::compile(&config(""), None);
        let pool = set.default_pool();
        let _busy0 = pool.target(0).begin();
        let _busy2 = [pool.target(2).begin(), pool.target(2).begin()];
        for _ in 0..6 {
            assert!(matches!(pool.pick(0), Pick::Url(1)));
        }
        // Already tried: the next least busy.
        assert!(matches!(pool.pick(0b010), Pick::Url(0)));
        assert!(matches!(pool.pick(0b111), Pick::AllTried));
    }

    #[test]
    fn ties_go_round_and_ejected_urls_are_skipped() {
        let set = PoolSet::compile(&config(""), None);
        let pool = set.default_pool();
        let mut seen = [0; 3];
        for _ in 0..30 {
            if let Pick::Url(i) = pool.pick(0) {
                seen[i] += 1;
            }
        }
        assert_eq!(seen, [10, 10, 10]);
        pool.failed(1, Failure::Unreachable, "test");
        for _ in 0..10 {
            assert!(!matches!(pool.pick(0), Pick::Url(1)));
        }
        pool.failed(0, Failure::Unreachable, "test");
        pool.failed(2, Failure::Unreachable, "test");
        match pool.pick(0) {
            Pick::NoneHealthy(wait) => assert!(wait <= Duration::from_secs(30)),
            _ => panic!("every URL is ejected"),
        }
    }

    #[test]
    fn answers_eject_at_most_the_pools_share_and_never_the_last_url() {
        let set = PoolSet::compile(&config(""), None);
        let pool = set.default_pool();
        // Three URLs at 50 %: answers may keep one out at a time.
        pool.failed(0, Failure::Answer, "test");
        pool.failed(1, Failure::Answer, "test");
        let picked: Vec<usize> = (0..12)
            .filter_map(|_| match pool.pick(0) {
                Pick::Url(i) => Some(i),
                _ => None,
            })
            .collect();
        assert!(!picked.contains(&0), "URL 0 was ejected");
        assert!(picked.contains(&1), "URL 1 was held back: the share is out");
        // A refused connection is no answer: URL 1 goes out anyway.
        pool.failed(1, Failure::Unreachable, "test");
        // The last URL in rotation stays, whatever it answers.
        pool.failed(2, Failure::Answer, "test");
        for _ in 0..5 {
            assert!(matches!(pool.pick(0), Pick::Url(2)));
        }
    }

    #[test]
    fn no_answer_ejects_anything_at_zero_percent() {
        let set = PoolSet::compile(&config("max_ejected_percent = 0\n"), None);
        let pool = set.default_pool();
        pool.failed(0, Failure::Answer, "test");
        let picked: Vec<usize> = (0..12)
            .filter_map(|_| match pool.pick(0) {
                Pick::Url(i) => Some(i),
                _ => None,
            })
            .collect();
        assert!(picked.contains(&0));
    }

    #[test]
    fn a_pool_of_one_url_is_not_ejected_by_its_failures() {
        let c = Config::parse(
            "[upstream]\nurls = [\"http://127.0.0.1:1\"]\neject_after = 1\n",
            "t.toml",
        )
        .expect("valid");
        let set = PoolSet::compile(&c, None);
        set.default_pool().failed(0, Failure::Unreachable, "test");
        assert!(matches!(set.default_pool().pick(0), Pick::Url(0)));
    }

    #[test]
    fn a_reload_keeps_pools_and_health_of_urls_that_stay() {
        let first = PoolSet::compile(
            &config("[upstreams.b]\nurls = [\"http://127.0.0.1:4\"]\n"),
            None,
        );
        first.default_pool().failed(1, Failure::Unreachable, "test");
        // Same settings: the very same pool.
        let same = PoolSet::compile(
            &config("[upstreams.b]\nurls = [\"http://127.0.0.1:4\"]\n"),
            Some(&first),
        );
        assert!(Arc::ptr_eq(same.default_pool(), first.default_pool()));
        // Changed settings: a new pool, but URL 2 stays ejected.
        let changed = PoolSet::compile(&config("timeout = \"9s\"\n"), Some(&first));
        assert!(!Arc::ptr_eq(changed.default_pool(), first.default_pool()));
        assert!(Arc::ptr_eq(
            changed.default_pool().target(1),
            first.default_pool().target(1)
        ));
        assert!(!changed.default_pool().target(1).available());
        assert!(changed.by_name("b").is_none());
        assert!(changed.by_name("default").is_some());
    }
}
