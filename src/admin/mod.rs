//! The admin listener: ban and allowlist management, bucket inspection, the
//! audit log, consumers' plans (handled in [`consumers`]),
//! health and metrics.
//!
//! It is served only on `server.admin_listen`, never on the public port.
//! Every `/admin/*` call needs `Authorization: Bearer <token>`, compared in
//! constant time; with no token configured `/admin/*` answers 503 and says
//! how to set one. Request bodies are read whole (they are small and capped)
//! and parsed by hand so that every mistake gets a precise 400 message and
//! changes nothing. `POST /admin/reload` and `GET /admin/config` hand over
//! to [`crate::reload`].

// Handlers answer errors with a ready HttpResponse; boxing it would only add noise.
#![allow(clippy::result_large_err)]

mod consumers;

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::bans::{BanError, BanTarget};
use crate::config::{parse_cidr, Config};
use crate::gateway::Gateway;
use crate::limiter::Readiness;
use crate::policy::KeyKind;
use crate::redis_link::RedisFailure;
use crate::reload::Reloader;
use crate::responses::json_error;
use crate::rules::{encode_key_value, Subject};

/// Largest admin request body accepted.
const MAX_BODY: usize = 16 * 1024;
/// Longest ban an operator can set in one call.
const MAX_BAN: Duration = Duration::from_secs(366 * 24 * 3600);
/// Shortest: below a second a ban is over before every node has heard of
/// it, and `1ns` is a typo, not a ban.
const MIN_BAN: Duration = Duration::from_secs(1);
/// Longest ban reason, in bytes.
const MAX_REASON: usize = 512;

/// State of the admin listener.
pub(crate) struct AdminState {
    token: Option<String>,
    token_env: String,
    gateway: web::Data<Gateway>,
    prom: Option<metrics_exporter_prometheus::PrometheusHandle>,
    reloader: Arc<Reloader>,
}

impl AdminState {
    pub(crate) fn new(
        config: &Config,
        gateway: web::Data<Gateway>,
        prom: Option<metrics_exporter_prometheus::PrometheusHandle>,
        reloader: Arc<Reloader>,
    ) -> AdminState {
        let env = config.server.admin_token_env.clone();
        // Trimmed like the presented token: a secret file's trailing
        // newline must not make every call a 401.
        let token = std::env::var(&env)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        if token.is_none() {
            log::warn!("no admin token in ${env}: /admin/* answers 503 until one is set");
        }
        AdminState {
            token,
            token_env: env,
            gateway,
            prom,
            reloader,
        }
    }

    /// The gateway this listener administers.
    pub(crate) fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Checks the bearer token: `Err` is the answer to send instead.
    pub(crate) fn authorize(&self, req: &HttpRequest) -> Result<(), HttpResponse> {
        let Some(token) = &self.token else {
            return Err(json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "admin_disabled", "message": format!("no admin token is set: put one in the environment variable {} and restart floodgate", self.token_env)}),
            ));
        };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .unwrap_or("");
        if tokens_match(given.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            let mut r = json_error(
                StatusCode::UNAUTHORIZED,
                json!({"error": "unauthorized", "message": "missing or wrong bearer token"}),
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Err(r)
        }
    }
}

/// Compares in constant time, including the length: both sides are padded
/// to the same size before the byte comparison.
fn tokens_match(given: &[u8], token: &[u8]) -> bool {
    let n = given.len().max(token.len());
    let mut a = vec![0u8; n];
    let mut b = vec![0u8; n];
    a[..given.len()].copy_from_slice(given);
    b[..token.len()].copy_from_slice(token);
    let same_len = (given.len() as u64).ct_eq(&(token.len() as u64));
    bool::from(a.ct_eq(&b) & same_len)
}

/// Registers every admin route.
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(MAX_BODY))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .route("/admin/bans", web::get().to(list_bans))
        .route("/admin/bans", web::post().to(add_ban))
        .route("/admin/bans/{subject}", web::get().to(get_ban))
        .route("/admin/bans/{subject}", web::delete().to(delete_ban))
        .route("/admin/allowlist", web::get().to(list_allow))
        .route("/admin/allowlist", web::post().to(add_allow))
        .route("/admin/allowlist/{cidr}", web::delete().to(delete_allow))
        .route("/admin/buckets/{rule}/{subject}", web::get().to(bucket))
        .route("/admin/audit", web::get().to(audit))
        .route("/admin/stats", web::get().to(stats))
        .configure(crate::dashboard::routes)
        .route("/admin/reload", web::post().to(reload))
        .route("/admin/config", web::get().to(config_status))
        .route("/admin/consumers/{key}", web::get().to(consumers::get))
        .route("/admin/consumers/{key}", web::put().to(consumers::put))
        .route(
            "/admin/consumers/{key}",
            web::delete().to(consumers::delete),
        )
        .default_service(web::to(|| async {
            json_error(StatusCode::NOT_FOUND, json!({"error": "not_found"}))
        }));
}

fn bad_request(message: impl Into<String>) -> HttpResponse {
    json_error(
        StatusCode::BAD_REQUEST,
        json!({"error": "bad_request", "message": message.into()}),
    )
}

fn not_found(message: impl Into<String>) -> HttpResponse {
    json_error(
        StatusCode::NOT_FOUND,
        json!({"error": "not_found", "message": message.into()}),
    )
}

fn failed(e: BanError) -> HttpResponse {
    match e {
        BanError::Unavailable(e) => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "redis_unavailable", "message": e.to_string()}),
        ),
    }
}

/// A path segment, percent-decoded (so a CIDR's `/` may come as `%2F`).
fn segment(req: &HttpRequest, name: &str) -> String {
    let raw = req.match_info().get(name).unwrap_or("");
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, HttpResponse> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn readyz(state: web::Data<AdminState>) -> HttpResponse {
    let text = |status: StatusCode, body: String| {
        HttpResponse::build(status)
            .content_type("text/plain")
            .body(body)
    };
    match state.gateway.limiter.readiness().await {
        Readiness::NoSharedStore => text(
            StatusCode::OK,
            "ready: no Redis configured; in-process store\n".into(),
        ),
        Readiness::Ready => text(StatusCode::OK, "ready: Redis answers\n".into()),
        Readiness::Recovering => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: Redis answers again; the gateway returns to it within a probe interval\n"
                .into(),
        ),
        Readiness::Down(e) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {e}; serving with on_failure\n"),
        ),
    }
}

async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    match &state.prom {
        Some(p) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4")
            .body(p.render()),
        None => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "metrics_unavailable"}),
        ),
    }
}

async fn list_bans(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(r) = state.authorize(&req) {
        return r;
    }
    match state.gateway.bans.list().await {
        Ok(mut list) => {
            // CrowdSec's decisions, listed with their origin.
            list.extend(state.gateway.crowdsec.views());
            HttpResponse::Ok().json(list)
        }
        Err(e) => failed(e),
    }
}

fn target(state: &AdminState, raw: &str) -> Result<BanTarget, HttpResponse> {
    BanTarget::parse(raw, state.gateway.bans.ipv6_prefix()).map_err(bad_request)
}

async fn get_ban(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(r) = state.authorize(&req) {
        return r;
    }
    let t = match target(&state, &segment(&req, "subject")) {
        Ok(t) => t,
        Err(r) => return r,
    };
    match state.gateway.bans.get(t).await {
        Ok(Some(b)) => HttpResponse::Ok().json(b),
        Ok(None) => not_found(format!("{} is not banned", t.subject())),
        Err(e) => failed(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBan {
    subject: String,
    duration: String,
    #[serde(default)]
    reason: Option<String>,
    /// Accept a network wider than `ban.min_prefix_v4/v6`.
    #[serde(default)]
    force: bool,
}

async fn add_ban(req: HttpRequest, body: web::Bytes, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(r) = state.authorize(&req) {
        return r;
    }
    let nb: NewBan = match parse_json(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let t = match target(&state, &nb.subject) {
        Ok(t) => t,
        Err(r) => return r,
    };
    if let BanTarget::Cidr(net) = t {
        if let Err(m) = state.gateway.snapshot().breadth.check(&net, nb.force) {
            return bad_request(m);
        }
    }
    let duration = match humantime::parse_duration(nb.duration.trim()) {
        Ok(d) if (MIN_BAN..=MAX_BAN).contains(&d) => d,
        Ok(_) => {
            return bad_request(format!(
                "duration `{}` must be more than 0: at least 1s, and at most 366 days",
                nb.duration
            ))
        }
        Err(_) => {
            return bad_request(format!(
                "duration `{}` is not a duration like \"10m\" or \"24h\"",
                nb.duration
            ))
        }
    };
    let reason = nb.reason.unwrap_or_else(|| "manual".into());
    if reason.len() > MAX_REASON {
        return bad_request(format!("reason is longer than {MAX_REASON} bytes"));
    }
    let covered = match t {
        BanTarget::Key(k) => state.gateway.bans.cache().is_allowlisted(k.addr()),
        BanTarget::Cidr(n) => state.gateway.bans.cache().allowlist_covers(&n),
    };
    if covered {
        return json_error(
            StatusCode::CONFLICT,
            json!({"error": "allowlisted", "message": format!("{} is on the allowlist; remove it there first", t.subject())}),
        );
    }
    match state.gateway.bans.ban(t, duration, &reason).await {
        Ok(view) => HttpResponse::Created().json(view),
        Err(e) => failed(e),
    }
}

async fn delete_ban(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(r) = state.authorize(&req) {
        return r;
    }
    let t = match target(&state, &segment(&req, "subject")) {
        Ok(t) => t,
        Err(r) => return r,
    };
    match state.gateway.bans.unban(t, "lifted by an operator").await {
        Ok(true) => HttpResponse::NoContent().finish(),
        Ok(false) => not_found(format!("{} is not banned", t.subject())),
        Err(e) => failed(e),
    }
}

async fn list_allow(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(r) = state.authorize(&req) {
        return r;
    }
    match state.gateway.bans.allowlist().await {
        Ok(runtime) => {
            let config: Vec<String> = state
                .gateway
                .bans
                .cache()
                .config_allowlist()
                .iter()
                .map(|n| n.to_string())
                .collect();
            let runtime: Vec<String> = runtime.iter().map(|n| n.to_string()).collect();
            HttpResponse::Ok().json(json!({"config": config, "runtime": runtime}))
        }
        Err(e) => failed(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAllow {
    cidr: String,
    /// Accept a network wider than `ban.min_prefix_v4/v6`.
    #[serde(default)]
    force: bool,
}

async fn add_allow(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AdminState>,
) -> HttpResponse {
    if let Err(r) = state.authorize(&req) {
        return r;
    }
    let na: NewAllow = match parse_json(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let net: IpNet = match parse_cidr(&na.cidr) {
        Ok(n) => n,
        Err(m) => return bad_request(m),
    };
    if let Err(m) = state.gateway.snapshot().breadth.check(&net, na.force) {
        return bad_request(m);
    }
    match state.gateway.bans.allow(net).await {
        Ok(lifted) => {
            HttpResponse::Created().json(json!({"cidr": net.to_string(), "lifted": lifted}))
        }
        Err(e) => failed(e),
    }
}

async fn delete_allow(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(r) = state.authorize(&req) {
        return r;
    }
    let net = match parse_cidr(&segment(&req, "cidr")) {
        Ok(n) => n,
        Err(m) => return bad_request(m),
    };
    match state.gateway.bans.unallow(net).await {
        Ok(true) => HttpResponse::NoContent().finish(),
        Ok(false) => not_found(format!("{net} is not on the runtime allowlist")),
        Err(e) => failed(e),
    }
}

async fn bucket(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(r) = state.authorize(&req) {
        return r;
    }
    let rule_name = segment(&req, "rule");
    let raw_subject = segment(&req, "subject");
    let gw = &state.gateway;
    let snapshot = gw.snapshot();
    let Some(rule) = snapshot.rules.by_name(&rule_name) else {
        return not_found(format!("no rule named `{rule_name}`"));
    };
    let Some(spec) = rule.bucket() else {
        return bad_request(format!(
            "rule {rule_name} is a quota or concurrency rule, not a token bucket"
        ));
    };
    let subject = match &rule.key {
        KeyKind::Ip => match BanTarget::parse(&raw_subject, gw.bans.ipv6_prefix()) {
            Ok(BanTarget::Key(k)) => Subject::Ip(k),
            _ => {
                return bad_request(format!(
                    "`{raw_subject}` is not an IP address (rule {rule_name} is keyed by ip)"
                ))
            }
        },
        // The consumer header's rules are charged to the consumer.
        KeyKind::Header(name)
            if snapshot
                .plans
                .as_ref()
                .is_some_and(|p| p.header() == Some(name)) =>
        {
            Subject::Consumer {
                hash: crate::consumers::key_hash(raw_subject.as_bytes()),
            }
        }
        KeyKind::Header(name) => Subject::Header {
            name: name.clone(),
            value: encode_key_value(raw_subject.as_bytes()),
        },
        KeyKind::Claim(claim)
            if snapshot
                .plans
                .as_ref()
                .is_some_and(|p| p.claim() == Some(claim.as_str())) =>
        {
            Subject::Consumer {
                hash: crate::consumers::key_hash(raw_subject.as_bytes()),
            }
        }
        KeyKind::Claim(claim) => Subject::Claim {
            claim: claim.clone(),
            value: crate::rules::claim_key_value(&raw_subject),
        },
        KeyKind::Global => Subject::Global,
    };
    let tag = subject.tag();
    // A look at cost 0: nothing is charged, and the store is the one that
    // decides this subject now.
    let reply = match gw.limiter.peek(&tag, &[rule], rule.subject_ttl_ms).await {
        Ok(r) => r,
        Err(e) => return failed(BanError::Unavailable(e)),
    };
    let Some(b) = reply.buckets.first() else {
        return failed(BanError::Unavailable(RedisFailure::NotConnected));
    };
    let (room_us, full_in_us) = (b.room_us.max(0) as u64, b.wait_us.max(0) as u64);
    HttpResponse::Ok().json(json!({
        "rule": &*rule.name,
        "subject": raw_subject,
        "tokens": room_us as f64 / spec.interval_us as f64,
        "burst": spec.burst,
        "full_in_ms": full_in_us / 1000,
    }))
}

#[derive(Deserialize)]
struct AuditQuery {
    count: Option<String>,
}

async fn audit(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(r) = state.authorize(&req) {
        return r;
    }
    let q = match web::Query::<AuditQuery>::from_query(req.query_string()) {
        Ok(q) => q.into_inner(),
        Err(e) => return bad_request(format!("bad query: {e}")),
    };
    let count = match q.count.as_deref().map(str::parse::<usize>) {
        None => 100,
        Some(Ok(n)) if (1..=10_000).contains(&n) => n,
        _ => return bad_request("count must be a whole number from 1 to 10000"),
    };
    match state.gateway.bans.audit_log(count).await {
        Ok(events) => HttpResponse::Ok().json(events),
        Err(e) => failed(e),
    }
}

/// `GET /admin/stats`: request totals by decision and whether the node is
/// degraded, for the dashboard's live chart and `floodgate admin status`.
async fn stats(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(r) = state.authorize(&req) {
        return r;
    }
    let rendered = state.prom.as_ref().map(|p| p.render()).unwrap_or_default();
    let (decisions, bans_active) = crate::metrics::read_back(&rendered);
    let limiter = &state.gateway.limiter;
    HttpResponse::Ok().json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "node": state.gateway.bans.node(),
        "store": if limiter.has_shared_store() { "redis" } else { "local" },
        "degraded": limiter.is_degraded(),
        "bans_active": bans_active,
        "decisions": decisions,
    }))
}

/// Re-reads the config file: 200 with what needs a restart, or 400 with
/// the one-line problem (and nothing changed).
async fn reload(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(r) = state.authorize(&req) {
        return r;
    }
    match state.reloader.reload() {
        Ok(done) => {
            // The leases the reload ended are back in Redis before the
            // answer: a request after it sees every token it had.
            state.gateway.limiter.return_leases().await;
            HttpResponse::Ok().json(json!({
            "reloaded": true,
            "sha256": done.sha256,
            "restart_needed": done.restart_needed,
            }))
        }
        Err(e) => json_error(
            StatusCode::BAD_REQUEST,
            json!({
                "error": "invalid_config",
                "message": e.to_string(),
                "file": e.file,
                "key": e.key,
            }),
        ),
    }
}

async fn config_status(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(r) = state.authorize(&req) {
        return r;
    }
    HttpResponse::Ok().json(state.reloader.status())
}
