//! The front door: every public request, through named phases, cheapest
//! first, so that the common refusals cost the least:
//!
//! 0. [`screen`] - header limits, `CONNECT`, `OPTIONS *` ([`crate::screening`]);
//! 1. [`Exchange::identify`] - peer address, trusted proxies, X-Forwarded-For;
//! 2. [`Exchange::allowlist`] - in memory, then forward with no Redis call;
//! 3. [`Exchange::ban_cache`] - in memory, answer with no Redis call;
//!    then [`Exchange::blocklists`], the `[[blocklists]]` files and
//!    CrowdSec's decisions, the same way;
//! 4. [`Exchange::token`] - the bearer token verified (`[jwt]`), then
//!    [`Exchange::rules`] - the matching rules and the consumer's plan
//!    rules, grouped by subject (keyed by verified claims only);
//! 5. [`Exchange::decide`] - one store call per subject;
//! 6. [`Exchange::forward`] - to the routed pool (plus RateLimit headers);
//!    refusals were answered by the phase that made them (429, ban status,
//!    503).
//!
//! A request carries one [`Exchange`] through the phases; each phase
//! returns "go on" (`Ok`) or an [`Exit`]: forward at once without limits,
//! or answer now. Each request reads one [`Snapshot`] of what a reload can
//! change when it starts, and uses it to the end, so a reload never mixes
//! two configurations within a request.
//!
//! The shared state it reads is [`crate::gateway`]; the answers' shapes
//! live in [`crate::responses`]; phase 6 is `forward`.

// A phase that stops hands back a ready answer; boxing it would add an
// allocation to every refusal (the path a flood takes) for no gain.
#![allow(clippy::result_large_err)]

mod forward;

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr};

use actix_web::{web, HttpRequest, HttpResponse};

use crate::access_log::{Entry, Verdict};
use crate::client_ip::ClientKey;
use crate::consumers::ConsumerError;
use crate::gateway::{Gateway, Snapshot, UpstreamClients};
use crate::identity::{Claims, Token, WithClaims};
use crate::in_flight::SlotGuard;
use crate::limiter::{Decision, RateInfo, Reservation};
use crate::responses;
use crate::rules::SubjectGroup;
use crate::screening;

/// One request on its way through the phases: what it is, the
/// configuration it was started under, and who is asking.
pub(crate) struct Exchange<'a> {
    req: HttpRequest,
    snap: &'a Snapshot,
    gw: &'a Gateway,
    clients: &'a UpstreamClients,
    /// The connection's peer, and whether it is a trusted proxy.
    peer: IpAddr,
    trusted: bool,
    /// The client (the peer, or what a trusted proxy says) and its key.
    ip: IpAddr,
    key: ClientKey,
    /// What the phases decided, for the access log.
    verdict: Cell<Verdict>,
}

/// Why the limiting phases stopped early.
pub(crate) enum Exit {
    /// Forward without limits or RateLimit headers (allowlisted, or no
    /// rule applies).
    Forward,
    /// Answer with this; nothing is forwarded.
    Answer(HttpResponse),
}

/// What an allowed request takes to phase 6: the RateLimit numbers of the
/// rules that applied, and the concurrency slots it holds until its
/// response ends.
#[derive(Default)]
pub(crate) struct Admitted<'a> {
    applied: Vec<RateInfo<'a>>,
    slots: Option<SlotGuard>,
    /// What rules that settle or count reserved (see `forward`).
    reservation: Reservation,
}

/// The front door: every public request comes here.
pub(crate) async fn front_door(
    req: HttpRequest,
    payload: web::Payload,
    gw: web::Data<Gateway>,
    clients: web::Data<UpstreamClients>,
) -> HttpResponse {
    let snap = gw.snapshot();
    let Some(access_log) = &gw.access_log else {
        return serve(req, payload, &snap, &gw, &clients, None).await;
    };
    let mut entry = Entry::begin(&req);
    let resp = serve(req, payload, &snap, &gw, &clients, Some(&mut entry)).await;
    access_log.finish(entry, resp)
}

/// Phases 0 to 6; `entry`, when there is an access log, learns who asked
/// and what was decided.
async fn serve(
    req: HttpRequest,
    payload: web::Payload,
    snap: &Snapshot,
    gw: &Gateway,
    clients: &UpstreamClients,
    entry: Option<&mut Entry>,
) -> HttpResponse {
    if let Err(answer) = screen(&req, snap) {
        return answer;
    }
    let ex = Exchange::identify(req, snap, gw, clients);
    let result = ex.limit().await;
    if let Some(entry) = entry {
        entry.identified(ex.ip, &ex.req, &snap.rules, snap.plans.as_ref());
        entry.decided(ex.verdict.take());
    }
    match result {
        Ok(admitted) => ex.forward(payload, admitted).await,
        Err(Exit::Forward) => ex.forward(payload, Admitted::default()).await,
        Err(Exit::Answer(answer)) => answer,
    }
}

/// Phase 0: requests that go no further, whoever sends them.
fn screen(req: &HttpRequest, snap: &Snapshot) -> Result<(), HttpResponse> {
    match screening::screen(req, snap.header_limits) {
        Some(answer) => Err(answer),
        None => Ok(()),
    }
}

impl<'a> Exchange<'a> {
    /// Phase 1: who is asking. The peer address, or the client a trusted
    /// proxy names in X-Forwarded-For, and its key (IPv6 grouped).
    fn identify(
        req: HttpRequest,
        snap: &'a Snapshot,
        gw: &'a Gateway,
        clients: &'a UpstreamClients,
    ) -> Exchange<'a> {
        let peer = req
            .peer_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let trusted = snap.resolver.is_trusted(peer);
        let ip = snap.resolver.resolve_from(peer, trusted, req.headers());
        let key = snap.resolver.key(ip);
        Exchange {
            req,
            snap,
            gw,
            clients,
            peer,
            trusted,
            ip,
            key,
            verdict: Cell::new(Verdict::Rejected),
        }
    }

    /// Phases 2 to 5: whether the request may pass, and with what.
    async fn limit(&self) -> Result<Admitted<'a>, Exit> {
        self.allowlist()?;
        self.ban_cache()?;
        self.blocklists()?;
        let claims = self.token()?;
        let groups = self.rules(claims.as_ref())?;
        self.decide(&groups).await
    }

    /// Phase 2: an allowlisted client is forwarded with no Redis call and
    /// no RateLimit headers.
    fn allowlist(&self) -> Result<(), Exit> {
        if self.gw.bans.cache().is_allowlisted(self.ip) {
            self.gw.metrics.allowlisted.increment(1);
            self.verdict.set(Verdict::Allowlisted);
            return Err(Exit::Forward);
        }
        Ok(())
    }

    /// Phase 3: a client this node knows to be banned is answered at once.
    fn ban_cache(&self) -> Result<(), Exit> {
        match self.gw.bans.cache().banned(self.ip, &self.key) {
            Some(left) => {
                self.gw.metrics.banned.increment(1);
                self.verdict.set(Verdict::Banned);
                Err(Exit::Answer(responses::banned(self.snap.ban_status, left)))
            }
            None => Ok(()),
        }
    }

    /// Phase 3, continued: a client in a `[[blocklists]]` list gets the ban
    /// answer (the list's status, or `ban.status`), counted as banned.
    /// A client CrowdSec banned gets the same answer, for the time its
    /// decision has left.
    fn blocklists(&self) -> Result<(), Exit> {
        let listed = self
            .gw
            .blocklists
            .listed(self.ip)
            .map(|l| (l.retry_after, l.status))
            .or_else(|| self.gw.crowdsec.banned(self.ip));
        match listed {
            Some((left, status)) => {
                self.gw.metrics.banned.increment(1);
                self.verdict.set(Verdict::Banned);
                Err(Exit::Answer(responses::banned(
                    status.unwrap_or(self.snap.ban_status),
                    left,
                )))
            }
            None => Ok(()),
        }
    }

    /// Phase 4, first: the bearer token. Its claims when it verifies; a
    /// bad one is answered 401, or decided as no token at all with
    /// `jwt.invalid = "anonymous"`.
    fn token(&self) -> Result<Option<Claims>, Exit> {
        match self.gw.identity.token(self.req.headers()) {
            Token::None => Ok(None),
            Token::Verified(claims) => Ok(Some(claims)),
            Token::Invalid { why, reject: true } => {
                Err(Exit::Answer(responses::invalid_token(why)))
            }
            Token::Invalid { reject: false, .. } => Ok(None),
        }
    }

    /// Phase 4: the rules that match, with the consumer's plan rules,
    /// grouped by subject. A key header too long or a path whose readings
    /// disagree is refused with 400; no rule at all forwards.
    fn rules(&self, claims: Option<&Claims>) -> Result<Vec<SubjectGroup<'a>>, Exit> {
        let req = WithClaims {
            req: &self.req,
            claims,
        };
        let bad_request = |kind: &'static str, message: String| {
            crate::metrics::client_error(kind);
            Exit::Answer(responses::bad_request(message))
        };
        let mut groups = self
            .snap
            .rules
            .groups(&req, self.key)
            .map_err(|e| bad_request(e.kind(), e.to_string()))?;
        if let Some(plans) = &self.snap.plans {
            plans
                .apply(&req, self.key, &self.gw.consumers, &mut groups)
                .map_err(|e| match e {
                    ConsumerError::Match(e) => Exit::Answer(responses::bad_request(e.to_string())),
                    ConsumerError::UnknownKey(_) => {
                        crate::metrics::client_error("unknown_key");
                        Exit::Answer(responses::unknown_key(e.to_string()))
                    }
                })?;
        }
        for g in &mut groups {
            g.price(&self.req)
                .map_err(|e| bad_request("bad_cost", e.to_string()))?;
        }
        if groups.is_empty() {
            self.gw.metrics.allowed_unmatched.increment(1);
            self.verdict.set(Verdict::Allowed);
            return Err(Exit::Forward);
        }
        Ok(groups)
    }

    /// Phase 5: one store call per subject. A refusal is answered here; a
    /// ban this request made or met is handed to the ban service.
    async fn decide(&self, groups: &[SubjectGroup<'a>]) -> Result<Admitted<'a>, Exit> {
        let decision = self.gw.limiter.decide(groups).await;
        self.verdict.set(match &decision {
            Decision::Allowed { .. } => Verdict::Allowed,
            Decision::Limited { violated, .. } => Verdict::Limited(
                violated
                    .first()
                    .map_or_else(|| "-".into(), |v| v.rule.name.clone()),
            ),
            Decision::Banned { .. } => Verdict::Banned,
            Decision::Unavailable => Verdict::Unavailable,
        });
        match decision {
            Decision::Allowed {
                applied,
                leases,
                reservation,
            } => Ok(Admitted {
                applied,
                slots: leases.map(|set| SlotGuard::hold(self.gw.limiter.clone(), set)),
                reservation,
            }),
            Decision::Limited {
                violated,
                retry_after_s,
            } => Err(Exit::Answer(responses::limited(&violated, retry_after_s))),
            Decision::Banned { remaining_ms, made } => {
                self.gw.bans.decided(self.key, remaining_ms, made).await;
                Err(Exit::Answer(responses::banned(
                    self.snap.ban_status,
                    std::time::Duration::from_millis(remaining_ms),
                )))
            }
            Decision::Unavailable => Err(Exit::Answer(responses::unavailable())),
        }
    }
}
