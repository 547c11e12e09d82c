//! The client side: HTTP calls that return any status as a [`Resp`], raw
//! request bytes for what clients refuse to send, and a look at the
//! kernel's table of accepted connections.

use std::collections::HashMap;
use std::io::Read;
use std::time::Duration;

/// A response, whatever its status.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, Vec<String>>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .and_then(|v| v.first())
            .map(|s| s.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn agent() -> ureq::Agent {
    thread_local! {
        static AGENT: ureq::Agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).max_idle_connections_per_host(64).build();
    }
    AGENT.with(|a| a.clone())
}

pub fn call(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
    let mut req = agent().request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let result = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    into_resp(resp)
}

fn into_resp(resp: ureq::Response) -> Resp {
    let status = resp.status();
    let mut headers: HashMap<String, Vec<String>> = HashMap::new();
    for name in resp.headers_names() {
        let all: Vec<String> = resp.all(&name).iter().map(|s| s.to_string()).collect();
        headers.insert(name.to_ascii_lowercase(), all);
    }
    let mut body = String::new();
    let _ = resp.into_reader().take(1 << 20).read_to_string(&mut body);
    Resp {
        status,
        headers,
        body,
    }
}

pub fn get(url: &str, headers: &[(&str, &str)]) -> Resp {
    call("GET", url, headers, None)
}

/// GET as client `ip` (via X-Forwarded-For from the trusted loopback peer).
pub fn get_as(url: &str, ip: &str) -> Resp {
    get(url, &[("X-Forwarded-For", ip)])
}

/// Sends raw request bytes (for what HTTP clients refuse to send) and
/// returns the raw response text.
pub fn raw_request(port: u16, request: &[u8]) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Established TCP connections (IPv4) whose local end is `port` on this
/// machine: the connections a listener on `port` has accepted and not yet
/// closed.
pub fn accepted_connections(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local) && f[3] == "01"
        })
        .count()
}

/// Status code of a raw response text.
pub fn raw_status(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
