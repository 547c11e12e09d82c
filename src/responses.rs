//! What the gateway answers by itself: JSON errors, the refusals (limited,
//! banned, unavailable: RFC 9457 problem details), upstream failures, and
//! the RateLimit headers.
//!
//! Every status, header name and body shape the gateway writes is defined
//! here once, so the front door and the admin API answer alike and neither
//! borrows from the other.

use std::fmt::Write;
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
pub(crate) fn json_error(status: StatusCode, body: serde_json::Value) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(body.to_string())
}

/// Adds the RateLimit headers: the structured fields list every policy in
/// `applied` (one item each), the older trio repeats the tightest (fewest
/// left). Nothing when `applied` is empty.
pub(crate) fn add_rate_headers(b: &mut HttpResponseBuilder, applied: &[RateInfo<'_>]) {
    let Some(tightest) = applied.iter().min_by_key(|i| i.remaining) else {
        return;
    };
    let mut policy: Vec<u8> = Vec::with_capacity(48 * applied.len());
    let mut state = String::with_capacity(32 * applied.len());
    for (n, info) in applied.iter().enumerate() {
        if n > 0 {
            policy.extend_from_slice(b", ");
            state.push_str(", ");
        }
        policy.extend_from_slice(info.rule.policy_header.as_bytes());
        let _ = write!(state, "\"{}\";r={}", info.rule.name, info.remaining);
        if !info.rule.is_concurrency() {
            let _ = write!(state, ";t={}", info.reset_s);
        }
    }
    if let Ok(v) = HeaderValue::from_bytes(&policy) {
        b.insert_header((RATELIMIT_POLICY.clone(), v));
    }
    if let Ok(v) = HeaderValue::from_str(&state) {
        b.insert_header((RATELIMIT.clone(), v));
    }
    b.insert_header((
        RATELIMIT_LIMIT.clone(),
        HeaderValue::from(tightest.rule.quota_units()),
    ));
    b.insert_header((
        RATELIMIT_REMAINING.clone(),
        HeaderValue::from(tightest.remaining),
    ));
    b.insert_header((RATELIMIT_RESET.clone(), HeaderValue::from(tightest.reset_s)));
}

/// The problem types of the RateLimit draft (RFC 9457 problem details).
const PROBLEM_TYPES: &str = "https://iana.org/assignments/http-problem-types#";

/// A refusal as `application/problem+json`: the draft's problem `kind`
/// with its title, `status`, the `violated-policies`, plus the gateway's own
/// fields (`error`, `retry_after`, ...), which clients already read.
fn problem(
    b: &mut HttpResponseBuilder,
    status: StatusCode,
    kind: &str,
    title: &str,
    violated: Vec<&str>,
    own: serde_json::Value,
) -> HttpResponse {
    let mut body = json!({
        "type": format!("{PROBLEM_TYPES}{kind}"),
        "title": title,
        "status": status.as_u16(),
        "violated-policies": violated,
    });
    if let (Some(body), serde_json::Value::Object(own)) = (body.as_object_mut(), own) {
        body.extend(own);
    }
    b.status(status)
        .content_type("application/problem+json")
        .body(body.to_string())
}

/// A banned client's answer: `ban.status`, seconds left of the ban.
pub(crate) fn banned(status: StatusCode, remaining: Duration) -> HttpResponse {
    let secs = remaining.as_millis().div_ceil(1000).max(1) as u64;
    let mut b = HttpResponse::build(status);
    b.insert_header((RETRY_AFTER, secs));
    problem(
        &mut b,
        status,
        "abnormal-usage-detected",
        "Request not satisfied due to detection of abnormal request pattern",
        Vec::new(),
        json!({"error": "banned", "retry_after": secs}),
    )
}

/// A refusal by rules: 429, Retry-After and the refusing rules' headers.
/// `violated[0]` is the rule named in the body (the longest wait).
pub(crate) fn limited(violated: &[RateInfo<'_>], retry_after_s: u64) -> HttpResponse {
    let mut b = HttpResponse::build(StatusCode::TOO_MANY_REQUESTS);
    add_rate_headers(&mut b, violated);
    b.insert_header((RETRY_AFTER, retry_after_s));
    let rule = violated.first().map(|i| &*i.rule.name).unwrap_or("");
    problem(
        &mut b,
        StatusCode::TOO_MANY_REQUESTS,
        "quota-exceeded",
        "Request cannot be satisfied as assigned quota has been exceeded",
        violated.iter().map(|i| &*i.rule.name).collect(),
        json!({"error": "rate_limited", "rule": rule, "retry_after": retry_after_s}),
    )
}

/// The store is unavailable and `on_failure = "deny"`.
pub(crate) fn unavailable() -> HttpResponse {
    let mut b = HttpResponse::build(StatusCode::SERVICE_UNAVAILABLE);
    problem(
        &mut b,
        StatusCode::SERVICE_UNAVAILABLE,
        "temporary-reduced-capacity",
        "Request cannot be satisfied due to temporary reduced capacity",
        Vec::new(),
        json!({"error": "unavailable", "message": "the rate-limit store is unavailable and on_failure is \"deny\""}),
    )
}

/// A consumer key no assignment names, with
/// `consumers.unknown_keys = "reject"`: 401 problem+json.
pub(crate) fn unknown_key(message: String) -> HttpResponse {
    let body = json!({
        "type": "about:blank",
        "title": "Unauthorized",
        "status": 401,
        "error": "unknown_key",
        "message": message,
    });
    HttpResponse::build(StatusCode::UNAUTHORIZED)
        .content_type("application/problem+json")
        .body(body.to_string())
}

/// A bearer token that does not verify, with `jwt.invalid = "reject"`:
/// 401 problem+json; `why` is the `floodgate_jwt_total` outcome.
pub(crate) fn invalid_token(why: &str) -> HttpResponse {
    let body = json!({
        "type": "about:blank",
        "title": "Unauthorized",
        "status": 401,
        "error": "invalid_token",
        "message": format!("the bearer token was refused: {why}"),
    });
    HttpResponse::build(StatusCode::UNAUTHORIZED)
        .insert_header((
            actix_web::http::header::WWW_AUTHENTICATE,
            "Bearer error=\"invalid_token\"",
        ))
        .content_type("application/problem+json")
        .body(body.to_string())
}

/// A request the gateway cannot decide on (e.g. an oversized key header).
pub(crate) fn bad_request(message: String) -> HttpResponse {
    json_error(
        StatusCode::BAD_REQUEST,
        json!({"error": "bad_request", "message": message}),
    )
}

/// The upstream failed: 502 or 504 with the failure's code.
pub(crate) fn upstream_failure(status: StatusCode, code: &str) -> HttpResponse {
    json_error(status, json!({"error": code}))
}

/// No URL of the request's pool takes traffic: 503, and Retry-After until
/// the first one may again.
pub(crate) fn no_healthy_upstream(retry_after_s: u64) -> HttpResponse {
    let secs = retry_after_s.max(1);
    let mut b = HttpResponse::build(StatusCode::SERVICE_UNAVAILABLE);
    b.insert_header((RETRY_AFTER, secs));
    b.content_type("application/json")
        .body(json!({"error": "no_healthy_upstream", "retry_after": secs}).to_string())
}

/// A client address already streaming `upstream.max_streaming_per_client`
/// large answers: 503, to come back when one of them has ended.
pub(crate) fn too_many_streams() -> HttpResponse {
    let mut b = HttpResponse::build(StatusCode::SERVICE_UNAVAILABLE);
    b.insert_header((RETRY_AFTER, 1));
    b.content_type("application/json").body(
        json!({
            "error": "too_many_streams",
            "message": "this client address is already receiving as many large answers as it may at once",
            "retry_after": 1
        })
        .to_string(),
    )
}

/// A WebSocket upgrade while `upstream.websocket = false`.
pub(crate) fn websocket_refused() -> HttpResponse {
    json_error(
        StatusCode::NOT_IMPLEMENTED,
        json!({"error": "websocket_disabled", "message": "WebSocket upgrades are turned off on this gateway (upstream.websocket = false)"}),
    )
}

/// Methods the gateway forwards (for `Allow`); anything but `CONNECT`.
const ALLOW: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// A request refused for what the client sent: 400, 405, 408, 413 or 431
/// with `{"error": code, "message": ...}`.
pub(crate) fn client_error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
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
pub(crate) fn server_options() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((actix_web::http::header::ALLOW, ALLOW))
        .finish()
}
