//! Phase 0 of the front door: requests refused or answered before anything
//! else, because they cannot or must not be forwarded, or would cost too
//! much to look at.
//!
//! - more headers than `server.max_headers`, or a header section larger
//!   than `server.max_header_bytes`: 431, before `X-Forwarded-For` is parsed;
//! - `CONNECT`: 405 (the gateway is no tunnel);
//! - `OPTIONS *`: answered by the gateway itself (there is no path to send);
//! - any other request target that is not a path: 400.
//!
//! Each refusal counts in `floodgate_client_errors_total{kind}`. Kept apart
//! from the front door's phases because none of this involves identity,
//! rules or the store.

use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse};

use crate::responses;

/// The limits phase 0 applies (from `[server]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeaderLimits {
    pub(crate) max_headers: usize,
    pub(crate) max_header_bytes: usize,
}

/// The answer to a request that goes no further, or `None`.
pub(crate) fn screen(req: &HttpRequest, limits: HeaderLimits) -> Option<HttpResponse> {
    let headers = req.headers();
    if headers.len() > limits.max_headers {
        return Some(refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_many_headers",
            "the request has more headers than this gateway accepts",
        ));
    }
    // Name, value, ": " and CRLF per line, as on the wire.
    let size: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if size > limits.max_header_bytes {
        return Some(refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            "the request's headers are larger than this gateway accepts",
        ));
    }
    if req.method() == Method::CONNECT {
        return Some(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "CONNECT is not forwarded",
        ));
    }
    let target = req.uri().path();
    if target == "*" && req.method() == Method::OPTIONS {
        return Some(responses::server_options());
    }
    if !target.starts_with('/') {
        return Some(refuse(
            StatusCode::BAD_REQUEST,
            "bad_target",
            "the request target must be a path",
        ));
    }
    None
}

fn refuse(status: StatusCode, kind: &'static str, message: &str) -> HttpResponse {
    crate::metrics::client_error(kind);
    responses::client_error(status, kind, message)
}
