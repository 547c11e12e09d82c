//! `/admin/consumers/{key}`: read, set and remove a consumer's runtime
//! plan.
//!
//! The key comes percent-encoded in the path and is hashed at once; only
//! its SHA-256 is stored, published and audited. Every change is applied on
//! this node, published to the others (the ban event channel) and appended
//! to the audit log. Bad input (unknown plan, bad key, bad JSON) gets a 400
//! and changes nothing.

// Handlers answer errors with a ready HttpResponse; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::{bad_request, not_found, AdminState};
use crate::bans::BanEvent;
use crate::config::check_consumer_key;
use crate::consumers::key_hash;
use crate::gateway::{Gateway, Snapshot};
use crate::limiter::rate_info;
use crate::policy::Limit;
use crate::redis_link::RedisFailure;
use crate::responses::json_error;
use crate::rules::{Rule, Subject};

fn unavailable(e: RedisFailure) -> HttpResponse {
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "redis_unavailable", "message": e.to_string()}),
    )
}

/// Authorizes the call and finds the configuration in effect (which has
/// plans) and the key's hash in it.
fn prepare<'g>(
    req: &HttpRequest,
    state: &'g AdminState,
) -> Result<(&'g Gateway, Arc<Snapshot>, String), HttpResponse> {
    state.authorize(req)?;
    let gw = state.gateway();
    let snapshot = gw.snapshot();
    if snapshot.plans.is_none() {
        return Err(no_consumers());
    }
    let raw = req.match_info().get("key").unwrap_or("");
    let key: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    check_consumer_key(&key).map_err(bad_request)?;
    Ok((gw, snapshot, key_hash(&key)))
}

fn no_consumers() -> HttpResponse {
    not_found("no [consumers] section in the configuration: there are no consumers")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPlan {
    plan: String,
}

/// `PUT /admin/consumers/{key}` `{"plan":"pro"}`: 201 when the key had no
/// runtime plan, 200 when it replaces one.
pub(super) async fn put(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AdminState>,
) -> HttpResponse {
    let (gw, snapshot, hash) = match prepare(&req, &state) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(plans) = snapshot.plans.as_ref() else {
        return no_consumers();
    };
    let np: NewPlan = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid JSON body: {e}")),
    };
    if plans.find(&np.plan).is_none() {
        let names: Vec<&str> = plans.plans().iter().map(|p| &*p.name).collect();
        return bad_request(format!(
            "no plan named `{}`; the plans are: {}",
            np.plan,
            names.join(", ")
        ));
    }
    let previous = match gw.consumers.assign(&hash, &np.plan).await {
        Ok(p) => p,
        Err(e) => return unavailable(e),
    };
    log::info!(
        "consumer {} moved to plan {} by an operator",
        short(&hash),
        np.plan
    );
    gw.bans
        .publish(&BanEvent::Consumer {
            key: hash.clone(),
            plan: Some(np.plan.clone()),
        })
        .await;
    let reason = match &previous {
        Some(p) => format!("plan {} (was {p})", np.plan),
        None => format!("plan {}", np.plan),
    };
    gw.bans
        .audit(
            "assign",
            &format!("consumer:{hash}"),
            &reason,
            0,
            0,
            "manual",
        )
        .await;
    let status = if previous.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    HttpResponse::build(status)
        .json(json!({"key_sha256": hash, "plan": np.plan, "previous": previous}))
}

/// `DELETE /admin/consumers/{key}`: 204, or 404 when the key had no
/// runtime plan. The consumer falls back to its static or default plan.
pub(super) async fn delete(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    let (gw, _, hash) = match prepare(&req, &state) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let previous = match gw.consumers.unassign(&hash).await {
        Ok(Some(p)) => p,
        Ok(None) => return not_found("this key has no runtime plan"),
        Err(e) => return unavailable(e),
    };
    log::info!(
        "consumer {} removed from runtime plan {previous} by an operator",
        short(&hash)
    );
    gw.bans
        .publish(&BanEvent::Consumer {
            key: hash.clone(),
            plan: None,
        })
        .await;
    gw.bans
        .audit(
            "unassign",
            &format!("consumer:{hash}"),
            &format!("runtime plan {previous} removed"),
            0,
            0,
            "manual",
        )
        .await;
    HttpResponse::NoContent().finish()
}

/// `GET /admin/consumers/{key}`: the plan, where it comes from, and the
/// state of each of its rules (read without charging anything).
pub(super) async fn get(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    let (gw, snapshot, hash) = match prepare(&req, &state) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(plans) = snapshot.plans.as_ref() else {
        return no_consumers();
    };
    let Some((plan, source)) = plans.plan_of(&hash, &gw.consumers) else {
        return not_found("this key has no plan, and there is no default_plan");
    };
    let rules: Vec<&Rule> = plan.rules.iter().collect();
    let tag = Subject::Consumer { hash: hash.clone() }.tag();
    let reply = match gw.limiter.peek(&tag, &rules, plans.ttl_ms()).await {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    let states: Vec<serde_json::Value> = rules
        .iter()
        .zip(&reply.buckets)
        .map(|(rule, b)| {
            let info = rate_info(rule, b);
            let mut v = json!({
                "name": &*rule.name,
                "limit": rule.quota_units(),
                "remaining": info.remaining,
                "shadow": rule.shadow,
            });
            let extra = match rule.limit {
                Limit::Rate(_) => json!({"kind": "rate", "full_in_s": info.reset_s}),
                Limit::Quota(q) => json!({
                    "kind": "quota",
                    "period": q.period.name(),
                    // Past the quota when a settlement put the consumer
                    // in debt.
                    "used": (q.quota as i64).saturating_sub(b.room_us).max(0),
                    "resets_in_s": info.reset_s,
                }),
                Limit::Concurrency(c) => json!({
                    "kind": "concurrency",
                    "in_flight": u64::from(c.max).saturating_sub(info.remaining),
                }),
            };
            if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
                v.extend(extra);
            }
            v
        })
        .collect();
    HttpResponse::Ok().json(json!({
        "key_sha256": hash,
        "plan": &*plan.name,
        "source": source.as_str(),
        "rules": states,
    }))
}

/// The first characters of a key's hash: enough to tell consumers apart
/// in a log line.
fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}
