//! The front door: every public request, through named phases, cheapest
//! first, so that the common refusals cost the least:
//!
//! 0. screening - header limits, `CONNECT`, `OPTIONS *` ([`crate::screening`]);
//! 1. identity - peer address, trusted proxies, X-Forwarded-For;
//! 2. allowlist - in memory, then forward with no Redis call;
//! 3. ban cache - in memory, answer with no Redis call;
//! 4. rules - the matching rules, grouped by subject;
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
use crate::limiter::{BanMade, Decision, Limiter, RateInfo};
use crate::metrics::GatewayMetrics;
use crate::proxy::{ForwardError, Upstream};
use crate::responses;
use crate::rules::RuleSet;
use crate::screening::{self, HeaderLimits};

/// Everything the front door needs, shared by all workers.
pub struct Gateway {
    pub resolver: ClientIpResolver,
    pub rules: RuleSet,
    pub limiter: Arc<Limiter>,
    pub bans: Arc<Bans>,
    pub metrics: GatewayMetrics,
    pub ban_status: StatusCode,
    /// Phase 0's limits on request headers.
    pub header_limits: HeaderLimits,
}

/// Phase 6 for an allowed request: stream it upstream and add the
/// RateLimit headers of the tightest rule to the answer.
async fn forward(
    req: HttpRequest,
    payload: web::Payload,
    up: &Upstream,
    gw: &Gateway,
    peer: IpAddr,
    trusted: bool,
    info: Option<RateInfo<'_>>,
) -> HttpResponse {
    let started = std::time::Instant::now();
    let result = up.forward(&req, payload, trusted, peer).await;
    gw.metrics
        .upstream_seconds
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(mut resp) => {
            if let Some(info) = &info {
                responses::add_rate_headers(&mut resp.builder, info);
            }
            resp.into_response()
        }
        Err(ForwardError::Upstream(failure)) => {
            crate::metrics::upstream_error(failure.code());
            responses::upstream_failure(failure.status(), failure.code())
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
    up: web::Data<Upstream>,
) -> HttpResponse {
    // 0. requests that go no further
    if let Some(answer) = screening::screen(&req, gw.header_limits) {
        return answer;
    }
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
        return forward(req, payload, &up, &gw, peer, trusted, None).await;
    }
    // 3. ban cache
    if let Some(left) = gw.bans.cache().banned(ip, &key) {
        gw.metrics.banned.increment(1);
        return responses::banned(gw.ban_status, left);
    }
    // 4. rules
    let groups = match gw.rules.groups(&req, key) {
        Ok(g) => g,
        Err(e) => {
            crate::metrics::client_error(e.kind());
            return responses::bad_request(e.to_string());
        }
    };
    if groups.is_empty() {
        gw.metrics.allowed_unmatched.increment(1);
        return forward(req, payload, &up, &gw, peer, trusted, None).await;
    }
    // 5. decision, 6. answer
    match gw.limiter.decide(&groups).await {
        Decision::Allowed { info } => forward(req, payload, &up, &gw, peer, trusted, info).await,
        Decision::Limited {
            info,
            retry_after_s,
        } => responses::limited(&info, retry_after_s),
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
