//! `GET /dashboard`: the operators' page on the admin listener.
//!
//! The page, its script and its style sheet are compiled into the binary,
//! so a node needs no files beside it and the page loads nothing from
//! anywhere else. The page holds no data: it asks for the admin token and
//! then reads and changes everything through the admin API, so serving it
//! needs no token. It is kept apart from `admin` because it is a client of
//! that API, not a part of it.
//!
//! Every answer carries a strict Content-Security-Policy: only this
//! listener's own script and style, no inline code, no framing, and
//! Trusted Types required, so even a slip that put API data into HTML
//! could not run it. The script itself shows every value with
//! `textContent` (a ban reason is text a client can influence).

use actix_web::http::header;
use actix_web::{web, HttpResponse};

const PAGE: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("dashboard.js");
const STYLE: &str = include_str!("dashboard.css");

/// The policy on the page and its assets.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'; \
    trusted-types 'none'";

/// Registers the page and its two assets (on the admin listener only).
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/dashboard", web::get().to(page))
        .route("/dashboard/dashboard.js", web::get().to(script))
        .route("/dashboard/dashboard.css", web::get().to(style));
}

fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(body)
}

async fn page() -> HttpResponse {
    asset("text/html; charset=utf-8", PAGE)
}

async fn script() -> HttpResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> HttpResponse {
    asset("text/css; charset=utf-8", STYLE)
}
