//! The admin CLI's HTTP side: one call, and what its answer means.
//!
//! Every answer is judged in one place ([`judge`]) so that each verb gets
//! the same exit codes and the same advice for the same trouble: 401 means
//! the token variable holds the wrong token, a 404 without a message means
//! the node has no such endpoint (an older node), a 404 with one means the
//! thing asked for does not exist.

use std::io::Read;
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;

use super::target::Target;
use super::Failure;

/// Characters escaped in a path segment: everything but RFC 3986's
/// unreserved set, so a CIDR's `/` travels as `%2F`.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Largest answer read; the ban list of a busy fleet fits easily.
const MAX_ANSWER: u64 = 64 * 1024 * 1024;

/// A path segment, percent-encoded.
pub(super) fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// An answer from the node, whatever its status.
#[derive(Debug)]
pub(super) struct Reply {
    pub(crate) status: u16,
    /// The body as JSON, or `Value::Null` if it was empty or not JSON.
    pub(crate) json: Value,
    pub(crate) text: String,
}

/// A blocking client for one node's admin API.
pub(super) struct AdminClient {
    target: Target,
    agent: ureq::Agent,
}

impl AdminClient {
    pub(super) fn new(target: Target) -> AdminClient {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            // Listing bans scans Redis; give it time, but never hang.
            .timeout(Duration::from_secs(60))
            .redirects(0)
            .build();
        AdminClient { target, agent }
    }

    pub(super) fn base(&self) -> &str {
        &self.target.base
    }

    /// An authenticated call whose answer must be a success; anything else
    /// becomes the [`Failure`] that says what to do.
    pub(super) fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, Failure> {
        let reply = self.send(method, path, body, true)?;
        judge(method, path, reply, &self.target.token_env)
    }

    /// An authenticated call that returns any answer the node gave, except
    /// that an unreachable node, a refused token or a node without a token
    /// still fail.
    pub(super) fn call_any(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, Failure> {
        let reply = self.send(method, path, body, true)?;
        let disabled = reply.json.get("error").and_then(Value::as_str) == Some("admin_disabled");
        if reply.status == 401 || disabled {
            return judge(method, path, reply, &self.target.token_env);
        }
        Ok(reply)
    }

    /// A call without the token (`/readyz`), any answer.
    pub(super) fn call_public(&self, path: &str) -> Result<Reply, Failure> {
        self.send("GET", path, None, false)
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        authenticated: bool,
    ) -> Result<Reply, Failure> {
        let url = format!("{}{}", self.target.base, path);
        let mut req = self.agent.request(method, &url);
        if authenticated {
            req = req.set("Authorization", &format!("Bearer {}", self.target.token));
        }
        let result = match body {
            Some(b) => req
                .set("Content-Type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => {
                return Err(Failure::Refused(format!(
                    "cannot reach the admin API at {} ({}): is floodgate running, and is that its admin address? (it came from {})",
                    self.target.base,
                    transport_cause(&t),
                    self.target.origin
                )))
            }
        };
        let status = resp.status();
        let mut text = String::new();
        if let Err(e) = resp
            .into_reader()
            .take(MAX_ANSWER)
            .read_to_string(&mut text)
        {
            return Err(Failure::Refused(format!(
                "the admin API at {} broke off its answer to {method} {path}: {e}",
                self.target.base
            )));
        }
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Reply { status, json, text })
    }
}

/// What an answer means for the operator. Success passes through; each
/// refusal becomes the failure with its exit code and advice.
pub(super) fn judge(
    method: &str,
    path: &str,
    reply: Reply,
    token_env: &str,
) -> Result<Reply, Failure> {
    let message = reply
        .json
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string);
    let error = reply
        .json
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("");
    let said = || {
        message
            .clone()
            .unwrap_or_else(|| first_line(&reply.text).to_string())
    };
    match reply.status {
        200..=299 => Ok(reply),
        401 => Err(Failure::Refused(format!(
            "the node refused the token (401 unauthorized): {token_env} does not hold the token this node was started with"
        ))),
        404 if message.is_none() => Err(Failure::Refused(format!(
            "{method} {path} is not available on this node (it answered 404): its floodgate version does not offer it"
        ))),
        404 => Err(Failure::NotFound(said())),
        400 | 409 | 422 => Err(Failure::Usage(said())),
        503 if error == "admin_disabled" => Err(Failure::Refused(said())),
        503 => Err(Failure::Refused(format!(
            "the node cannot do this now (503): {}",
            said()
        ))),
        s => Err(Failure::Refused(format!(
            "unexpected answer {s} to {method} {path}: {}",
            said()
        ))),
    }
}

/// The deepest cause of a transport failure ("Connection refused (os error
/// 111)"), which tells the operator more than ureq's own summary does.
fn transport_cause(t: &ureq::Transport) -> String {
    let mut cause: &dyn std::error::Error = t;
    while let Some(next) = cause.source() {
        cause = next;
    }
    if std::ptr::addr_eq(cause, t) {
        t.message().unwrap_or("").to_string()
    } else {
        cause.to_string()
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("").trim()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply(status: u16, json: Value) -> Reply {
        Reply {
            status,
            text: json.to_string(),
            json,
        }
    }

    fn judged(status: u16, body: Value) -> Result<u16, Failure> {
        judge("GET", "/admin/x", reply(status, body), "FG_TOKEN").map(|r| r.status)
    }

    #[test]
    fn answers_map_to_the_exit_codes_of_the_contract() {
        assert_eq!(judged(204, Value::Null), Ok(204));
        let code = |s, b| judged(s, b).unwrap_err().code();
        assert_eq!(
            code(
                404,
                json!({"error":"not_found","message":"x is not banned"})
            ),
            1
        );
        assert_eq!(code(400, json!({"error":"bad_request","message":"bad"})), 2);
        assert_eq!(
            code(
                409,
                json!({"error":"allowlisted","message":"on the allowlist"})
            ),
            2
        );
        assert_eq!(code(401, json!({"error":"unauthorized"})), 3);
        assert_eq!(
            code(503, json!({"error":"redis_unavailable","message":"down"})),
            3
        );
        assert_eq!(code(404, json!({"error":"not_found"})), 3);
        assert_eq!(code(500, Value::Null), 3);
    }

    #[test]
    fn a_404_without_a_message_is_an_endpoint_this_node_lacks() {
        let e = judge(
            "POST",
            "/admin/reload",
            reply(404, json!({"error":"not_found"})),
            "T",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("POST /admin/reload is not available on this node"),
            "{e}"
        );
    }

    #[test]
    fn a_401_names_the_token_variable() {
        let e = judged(401, json!({"error":"unauthorized"})).unwrap_err();
        assert!(e.to_string().contains("FG_TOKEN"), "{e}");
    }

    #[test]
    fn segments_escape_the_cidr_slash() {
        assert_eq!(segment("198.51.100.0/24"), "198.51.100.0%2F24");
        assert_eq!(segment("2001:db8::/48"), "2001%3Adb8%3A%3A%2F48");
        assert_eq!(segment("k-7f3a_x~"), "k-7f3a_x~");
    }
}
