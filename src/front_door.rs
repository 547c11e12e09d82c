//! The front door: every public request, through named phases, cheapest
//! first, so that the common refusals cost the least:
//!
//! 0. screening - header limits, `CONNECT`, `OPTIONS *` ([`crate::screening`]);
//! 1. identity - peer address, trusted proxies, X-Forwarded-For;
//! 2. allowlist - in memory, then forward with no Redis call;
//! 3. ban cache - in memory, answer with no Redis call;
//! 4. rules - the matching rules and the consumer's plan rules, grouped by
//!    subject;
//! 5. decision - one store call per subject;
//! 6. answer - forward to the routed pool (plus RateLimit headers), 429,
//!    ban status, or 503.
//!
//! Each request reads one [`Snapshot`] of what a reload can change (rules,
//! trusted proxies, ban status, upstreams) when it starts, and uses it to
//! the end, so a reload never mixes two configurations within a request.
//!
//! It holds the per-request logic only; the listeners and background tasks
//! that serve it are wired up by the `server` module, and the answers' shapes
//! live in [`crate::responses`].

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use arc_swap::ArcSwap;

use crate::bans::{Bans, Breadth};
use crate::client_ip::{ClientIpResolver, ClientKey};
use crate::config::Config;
use crate::consumers::{ConsumerTable, Plans};
use crate::in_flight::{self, SlotGuard};
use crate::limiter::{BanMade, Decision, Limiter, RateInfo};
use crate::metrics::GatewayMetrics;
use crate::proxy::{websocket, ForwardError, Upstream};
use crate::responses;
use crate::rules::RuleSet;
use crate::screening::{self, HeaderLimits};
use crate::upload::BodyLimits;
use crate::upstreams::{Pool, PoolSet};

/// The parts of the configuration a reload replaces, as one immutable
/// value: a request reads it once, at its start.
pub struct Snapshot {
    pub resolver: ClientIpResolver,
    pub rules: RuleSet,
    pub ban_status: StatusCode,
    /// `[upstream]`, `[upstreams.*]` and `[[routes]]`. A pool whose settings
    /// a reload left alone is the same `Arc`, so the workers keep their
    /// connections to it; every URL keeps its health state.
    pub pools: PoolSet,
    /// `[consumers]` and `[plans.*]`, compiled (`None`: no consumers).
    pub plans: Option<Plans>,
    /// Phase 0's limits on request headers.
    pub header_limits: HeaderLimits,
    /// How wide a network an operator may ban or allowlist without `force`.
    pub breadth: Breadth,
}

impl Snapshot {
    /// Compiles `config`; `previous` lends its pools (and their health)
    /// where they stay.
    pub fn new(config: &Config, previous: Option<&Snapshot>) -> Snapshot {
        let pools = PoolSet::compile(config, previous.map(|p| &p.pools));
        let rules = RuleSet::compile(&config.rules);
        let plans = Plans::compile(config, &rules);
        Snapshot {
            resolver: ClientIpResolver::new(
                config.client_ip.trusted_proxies.clone(),
                config.client_ip.ipv6_prefix,
            ),
            rules,
            ban_status: StatusCode::from_u16(config.ban.status)
                .unwrap_or(StatusCode::TOO_MANY_REQUESTS),
            pools,
            plans,
            header_limits: HeaderLimits {
                max_headers: config.server.max_headers,
                max_header_bytes: config.server.max_header_bytes,
            },
            breadth: Breadth {
                min_prefix_v4: config.ban.min_prefix_v4,
                min_prefix_v6: config.ban.min_prefix_v6,
            },
        }
    }
}

/// Everything the front door needs, shared by all workers.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    /// The runtime plan assignments, cached on this node.
    pub consumers: Arc<ConsumerTable>,
    pub limiter: Arc<Limiter>,
    pub bans: Arc<Bans>,
    pub metrics: GatewayMetrics,
}

impl Gateway {
    pub fn new(
        snapshot: Snapshot,
        consumers: Arc<ConsumerTable>,
        limiter: Arc<Limiter>,
        bans: Arc<Bans>,
        metrics: GatewayMetrics,
    ) -> Gateway {
        Gateway {
            snapshot: ArcSwap::from_pointee(snapshot),
            consumers,
            limiter,
            bans,
            metrics,
        }
    }

    /// The configuration in effect now; requests that start later may see
    /// a newer one.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Puts `next` in effect for every request that starts from now on.
    pub fn replace_snapshot(&self, next: Snapshot) {
        self.snapshot.store(Arc::new(next));
    }
}

/// One worker's upstream clients (awc clients are per thread), one per
/// pool, built on a pool's first request and dropped once no snapshot
/// holds that pool any more; requests in flight finish on the client they
/// started with.
pub struct UpstreamClients {
    current: RefCell<Vec<(Arc<Pool>, Rc<Upstream>)>>,
    /// Set at start-up (`server.client_body_timeout`, `max_body_size`,
    /// `response_buffer` need a restart).
    body_limits: BodyLimits,
    response_buffer: usize,
}

impl UpstreamClients {
    pub fn new(body_limits: BodyLimits, response_buffer: usize) -> UpstreamClients {
        UpstreamClients {
            current: RefCell::new(Vec::new()),
            body_limits,
            response_buffer,
        }
    }

    /// The client for `pool`, built on first use.
    fn for_pool(&self, pool: &Arc<Pool>) -> Rc<Upstream> {
        let mut current = self.current.borrow_mut();
        if let Some((_, up)) = current.iter().find(|(p, _)| Arc::ptr_eq(p, pool)) {
            return up.clone();
        }
        // Pools only this list still holds were replaced by a reload.
        current.retain(|(p, _)| Arc::strong_count(p) > 1);
        let up = Rc::new(Upstream::new(
            &pool.config,
            self.body_limits,
            self.response_buffer,
        ));
        current.push((pool.clone(), up.clone()));
        up
    }
}

/// Phase 6 for an allowed request: stream it upstream (or relay its
/// WebSocket) to the pool its route picks (from `snap`), add the RateLimit
/// headers of the rules that applied, and hold its concurrency `slots`
/// until the response (or the relayed connection) ends, whatever the
/// answer is.
#[allow(clippy::too_many_arguments)]
async fn forward(
    req: HttpRequest,
    payload: web::Payload,
    snap: &Snapshot,
    clients: &UpstreamClients,
    gw: &Gateway,
    peer: IpAddr,
    trusted: bool,
    applied: &[RateInfo<'_>],
    slots: Option<SlotGuard>,
) -> HttpResponse {
    let head = req.method() == actix_web::http::Method::HEAD;
    let resp = answer(req, payload, snap, clients, gw, peer, trusted, applied).await;
    match slots {
        Some(slots) => in_flight::carry(resp, slots, head).await,
        None => resp,
    }
}

/// [`forward`]'s answer, before the slots are attached to it.
#[allow(clippy::too_many_arguments)]
async fn answer(
    req: HttpRequest,
    payload: web::Payload,
    snap: &Snapshot,
    clients: &UpstreamClients,
    gw: &Gateway,
    peer: IpAddr,
    trusted: bool,
    applied: &[RateInfo<'_>],
) -> HttpResponse {
    let pool = match snap.pools.route(&req) {
        Ok(p) => p,
        Err(e) => {
            crate::metrics::client_error("ambiguous_path");
            return responses::bad_request(e.to_string());
        }
    };
    if websocket::is_upgrade(&req) {
        if !pool.config.websocket {
            return responses::websocket_refused();
        }
        return match websocket::relay(&req, payload, pool, trusted, peer).await {
            Ok(mut relayed) => {
                responses::add_rate_headers(&mut relayed.builder, applied);
                relayed.into_response()
            }
            Err(failure) => {
                crate::metrics::upstream_error(failure.code());
                failure.answer()
            }
        };
    }
    let up = clients.for_pool(pool);
    let started = std::time::Instant::now();
    let result = up.forward(pool, &req, payload, trusted, peer).await;
    gw.metrics
        .upstream_seconds
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(mut resp) => {
            responses::add_rate_headers(&mut resp.builder, applied);
            resp.into_response()
        }
        Err(ForwardError::Upstream(failure)) => {
            crate::metrics::upstream_error(failure.code());
            failure.answer()
        }
        Err(ForwardError::Client(fault)) => {
            crate::metrics::client_error(fault.code());
            responses::client_error(fault.status(), fault.code(), fault.message())
        }
    }
}

/// The front door: every public request comes here.
pub async fn front_door(
    req: HttpRequest,
    payload: web::Payload,
    gw: web::Data<Gateway>,
    clients: web::Data<UpstreamClients>,
) -> HttpResponse {
    let snap = gw.snapshot();
    // 0. requests that go no further
    if let Some(answer) = screening::screen(&req, snap.header_limits) {
        return answer;
    }
    // 1. identity
    let peer = req
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let trusted = snap.resolver.is_trusted(peer);
    let ip = snap.resolver.resolve_from(peer, trusted, req.headers());
    let key = snap.resolver.key(ip);

    // 2. allowlist
    if gw.bans.cache().is_allowlisted(ip) {
        gw.metrics.allowlisted.increment(1);
        return forward(req, payload, &snap, &clients, &gw, peer, trusted, &[], None).await;
    }
    // 3. ban cache
    if let Some(left) = gw.bans.cache().banned(ip, &key) {
        gw.metrics.banned.increment(1);
        return responses::banned(snap.ban_status, left);
    }
    // 4. rules, and the consumer's plan rules
    let mut groups = match snap.rules.groups(&req, key) {
        Ok(g) => g,
        Err(e) => {
            crate::metrics::client_error(e.kind());
            return responses::bad_request(e.to_string());
        }
    };
    if let Some(plans) = &snap.plans {
        if let Err(e) = plans.apply(&req, key, &gw.consumers, &mut groups) {
            return responses::bad_request(e.to_string());
        }
    }
    if groups.is_empty() {
        gw.metrics.allowed_unmatched.increment(1);
        return forward(req, payload, &snap, &clients, &gw, peer, trusted, &[], None).await;
    }
    // 5. decision, 6. answer
    match gw.limiter.decide(&groups).await {
        Decision::Allowed { applied, leases } => {
            let slots = leases.map(|set| SlotGuard::hold(gw.limiter.clone(), set));
            forward(
                req, payload, &snap, &clients, &gw, peer, trusted, &applied, slots,
            )
            .await
        }
        Decision::Limited {
            violated,
            retry_after_s,
        } => responses::limited(&violated, retry_after_s),
        Decision::Banned {
            remaining_ms, made, ..
        } => {
            note_ban(&gw, key, remaining_ms, made).await;
            responses::banned(snap.ban_status, Duration::from_millis(remaining_ms))
        }
        Decision::Unavailable => responses::unavailable(),
    }
}

/// A decision found the client banned: mirror it in the cache at once and,
/// for a ban this request made, write its record, tell the fleet and the
/// audit log. A ban Redis made is written before the client hears of it, so
/// what the client was told is already in the admin API and the audit log
/// (a ban is rare; the banned client is the one that waits). A ban the local
/// fallback made is written in the background: Redis is failing then, and
/// the restore path writes it back when Redis returns.
async fn note_ban(gw: &Gateway, key: ClientKey, remaining_ms: u64, made: Option<BanMade>) {
    let Some(made) = made else {
        gw.bans.learn(key, remaining_ms);
        return;
    };
    gw.bans.learn(key, made.dur_ms);
    if made.by_redis {
        gw.bans.on_auto_ban(key, made).await;
    } else {
        let bans = gw.bans.clone();
        actix_web::rt::spawn(async move { bans.on_auto_ban(key, made).await });
    }
}
