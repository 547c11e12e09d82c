//! What the gateway answers by itself: JSON errors, the refusals (limited,
//! banned, unavailable, upstream failures) and the RateLimit headers.
//!
//! Every status, header name and body shape the gateway writes is defined
//! here once, so the front door and the admin API answer alike and neither
//! borrows from the other.

use std::time::Duration;

use actix_web::http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, HttpResponseBuilder};
use serde_json::json;

use crate::limiter::RateInfo;

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// JSON error answer, the one shape every refusal of the gateway uses.
pub fn json_error(status: StatusCode, body: serde_json::Value) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(body.to_string())
}

/// Adds the RateLimit headers (both the structured fields and the older
/// trio) of the tightest rule.
pub fn add_rate_headers(b: &mut HttpResponseBuilder, info: &RateInfo<'_>) {
    let r = info.rule;
    b.insert_header((RATELIMIT_POLICY.clone(), r.policy_header.clone()));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "\"{}\";r={};t={}",
        r.name, info.remaining, info.reset_s
    )) {
        b.insert_header((RATELIMIT.clone(), v));
    }
    b.insert_header((RATELIMIT_LIMIT.clone(), HeaderValue::from(r.bucket.burst)));
    b.insert_header((
        RATELIMIT_REMAINING.clone(),
        HeaderValue::from(info.remaining),
    ));
    b.insert_header((RATELIMIT_RESET.clone(), HeaderValue::from(info.reset_s)));
}

/// A banned client's answer: `ban.status`, seconds left of the ban.
pub fn banned(status: StatusCode, remaining: Duration) -> HttpResponse {
    let secs = remaining.as_millis().div_ceil(1000).max(1) as u64;
    HttpResponse::build(status)
        .insert_header((RETRY_AFTER, secs))
        .content_type("application/json")
        .body(json!({"error": "banned", "retry_after": secs}).to_string())
}

/// A refusal by a rule: 429, Retry-After and the refusing rule's headers.
pub fn limited(info: &RateInfo<'_>, retry_after_s: u64) -> HttpResponse {
    let mut b = HttpResponse::build(StatusCode::TOO_MANY_REQUESTS);
    add_rate_headers(&mut b, info);
    b.insert_header((RETRY_AFTER, retry_after_s))
        .content_type("application/json")
        .body(
            json!({"error": "rate_limited", "rule": &*info.rule.name, "retry_after": retry_after_s})
                .to_string(),
        )
}

/// The store is unavailable and `on_failure = "deny"`.
pub fn unavailable() -> HttpResponse {
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "unavailable", "message": "the rate-limit store is unavailable and on_failure is \"deny\""}),
    )
}

/// A request the gateway cannot decide on (e.g. an oversized key header).
pub fn bad_request(message: String) -> HttpResponse {
    json_error(
        StatusCode::BAD_REQUEST,
        json!({"error": "bad_request", "message": message}),
    )
}

/// The upstream failed: 502 or 504 with the failure's code.
pub fn upstream_failure(status: StatusCode, code: &str) -> HttpResponse {
    json_error(status, json!({"error": code}))
}

/// Methods the gateway forwards (for `Allow`); anything but `CONNECT`.
const ALLOW: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// A request refused for what the client sent: 400, 405, 408, 413 or 431
/// with `{"error": code, "message": ...}`.
pub fn client_error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    let mut r = json_error(status, json!({"error": code, "message": message}));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        r.headers_mut().insert(
            actix_web::http::header::ALLOW,
            HeaderValue::from_static(ALLOW),
        );
    }
    r
}

/// `OPTIONS *`: the gateway's own capabilities (RFC 9110 §9.3.7); there is
/// no path to forward.
pub fn server_options() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((actix_web::http::header::ALLOW, ALLOW))
        .finish()
}
