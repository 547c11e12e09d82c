//! The front door: every public request, through named phases, cheapest
//! first, so that the common refusals cost the least:
//!
//! 1. identity - peer address, trusted proxies, X-Forwarded-For;
//! 2. allowlist - in memory, then forward with no Redis call;
//! 3. ban cache - in memory, answer with no Redis call;
//! 4. rules - the matching rules and the consumer's plan rules, grouped by
//!    subject;
//! 5. decision - one store call per subject;
//! 6. answer - forward (plus RateLimit headers), 429, ban status, or 503.
//!
//! It holds the per-request logic only; the listeners and background tasks
//! that serve it are wired up by the `server` module, and the answers' shapes
//! live in [`crate::responses`].

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};

use crate::bans::Bans;
use crate::client_ip::{ClientIpResolver, ClientKey};
use crate::consumers::{ConsumerTable, Plans};
use crate::in_flight::{self, SlotGuard};
use crate::limiter::{BanMade, Decision, Limiter, RateInfo};
use crate::metrics::GatewayMetrics;
use crate::proxy::Upstream;
use crate::responses;
use crate::rules::RuleSet;

/// Everything the front door needs, shared by all workers.
pub struct Gateway {
    pub resolver: ClientIpResolver,
    pub rules: RuleSet,
    /// `[consumers]` and `[plans.*]`, compiled (`None`: no consumers).
    pub plans: Option<Plans>,
    /// The runtime plan assignments, cached on this node.
    pub consumers: Arc<ConsumerTable>,
    pub limiter: Arc<Limiter>,
    pub bans: Arc<Bans>,
    pub metrics: GatewayMetrics,
    pub ban_status: StatusCode,
}

/// Phase 6 for an allowed request: stream it upstream, add the RateLimit
/// headers of the rules that applied, and hold its concurrency `slots`
/// until the response ends.
#[allow(clippy::too_many_arguments)]
async fn forward(
    req: HttpRequest,
    payload: web::Payload,
    up: &Upstream,
    gw: &Gateway,
    peer: IpAddr,
    trusted: bool,
    applied: &[RateInfo<'_>],
    slots: Option<SlotGuard>,
) -> HttpResponse {
    let started = std::time::Instant::now();
    let result = up.forward(&req, payload, trusted, peer).await;
    gw.metrics
        .upstream_seconds
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(mut resp) => {
            responses::add_rate_headers(&mut resp.builder, applied);
            match slots {
                Some(slots) => in_flight::carry(resp.into_response(), slots),
                None => resp.into_response(),
            }
        }
        Err(failure) => {
            crate::metrics::upstream_error(failure.code());
            responses::upstream_failure(failure.status(), failure.code())
        }
    }
}

/// The front door: every public request comes here.
pub async fn front_door(
    req: HttpRequest,
    payload: web::Payload,
    gw: web::Data<Gateway>,
    up: web::Data<Upstream>,
) -> HttpResponse {
    // 1. identity
    let peer = req
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let trusted = gw.resolver.is_trusted(peer);
    let ip = gw.resolver.resolve_from(peer, trusted, req.headers());
    let key = gw.resolver.key(ip);

    // 2. allowlist
    if gw.bans.cache().is_allowlisted(ip) {
        gw.metrics.allowlisted.increment(1);
        return forward(req, payload, &up, &gw, peer, trusted, &[], None).await;
    }
    // 3. ban cache
    if let Some(left) = gw.bans.cache().banned(ip, &key) {
        gw.metrics.banned.increment(1);
        return responses::banned(gw.ban_status, left);
    }
    // 4. rules, and the consumer's plan rules
    let mut groups = match gw.rules.groups(&req, key) {
        Ok(g) => g,
        Err(e) => return responses::bad_request(e.to_string()),
    };
    if let Some(plans) = &gw.plans {
        if let Err(e) = plans.apply(&req, key, &gw.consumers, &mut groups) {
            return responses::bad_request(e.to_string());
        }
    }
    if groups.is_empty() {
        gw.metrics.allowed_unmatched.increment(1);
        return forward(req, payload, &up, &gw, peer, trusted, &[], None).await;
    }
    // 5. decision, 6. answer
    match gw.limiter.decide(&groups).await {
        Decision::Allowed { applied, leases } => {
            let slots = leases.map(|set| SlotGuard::hold(gw.limiter.clone(), set));
            forward(req, payload, &up, &gw, peer, trusted, &applied, slots).await
        }
        Decision::Limited {
            violated,
            retry_after_s,
        } => responses::limited(&violated, retry_after_s),
        Decision::Banned {
            remaining_ms, made, ..
        } => {
            note_ban(&gw, key, remaining_ms, made);
            responses::banned(gw.ban_status, Duration::from_millis(remaining_ms))
        }
        Decision::Unavailable => responses::unavailable(),
    }
}

/// A decision found the client banned: mirror it in the cache at once and,
/// for a ban this request made, tell the fleet and the audit log.
fn note_ban(gw: &Gateway, key: ClientKey, remaining_ms: u64, made: Option<BanMade>) {
    match made {
        Some(made) => {
            gw.bans.learn(key, made.dur_ms);
            let bans = gw.bans.clone();
            actix_web::rt::spawn(async move { bans.on_auto_ban(key, made).await });
        }
        None => gw.bans.learn(key, remaining_ms),
    }
}
