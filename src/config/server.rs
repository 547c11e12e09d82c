//! `[server]` and `[server.tls]`: the listeners and the process, their
//! defaults, and their checks, among them the hardening limits that keep
//! hostile or unlucky traffic from hurting the gateway. Apart from the other
//! sections because it is the one every node reads before anything else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{at_most, Invalid, DAY};

/// Headers actix-http parses at most: a request with more gets 400 before
/// floodgate sees it, so `server.max_headers` can only be lower.
pub(crate) const MAX_HEADERS_PARSED: usize = 96;
/// Bytes of request head actix-http buffers at most (431 past it).
pub(crate) const MAX_HEAD_PARSED: usize = 128 * 1024;

/// `[server]`: the listeners and the process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) admin_listen: SocketAddr,
    pub(crate) admin_token_env: String,
    #[serde(with = "humantime_serde")]
    pub(crate) shutdown_timeout: Duration,
    /// Worker threads of the public listener; 0 = one per core.
    pub(crate) workers: usize,
    /// Name of this node in the audit log; default: host name and pid.
    pub(crate) node_id: Option<String>,
    /// A client that takes no response bytes for this long is disconnected
    /// (its upstream connection with it).
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// A client that sends nothing of its request body for this long gets
    /// 408.
    #[serde(with = "humantime_serde")]
    pub client_body_timeout: Duration,
    /// Largest request body in bytes, sized or chunked; 0 = no limit.
    pub(crate) max_body_size: u64,
    /// Response bytes buffered per client connection before the gateway
    /// stops reading from the upstream.
    pub response_buffer: usize,
    /// Memory all answers read whole may hold at once (see
    /// `upstream.buffer_response`); past it, answers are streamed.
    pub(crate) response_buffer_total: usize,
    /// Most request headers (values) a request may carry.
    pub max_headers: usize,
    /// Most bytes in a request's header section (names, values, separators).
    pub(crate) max_header_bytes: usize,
    /// Identical warnings are written at most once per this; 0 = every one.
    #[serde(with = "humantime_serde")]
    pub(crate) log_throttle: Duration,
    /// `[server.tls]`: serve HTTPS (HTTP/2 and HTTP/1.1) instead of plain HTTP/1.1.
    pub(crate) tls: Option<TlsConfig>,
    /// The access log: a file (relative paths from the config file's
    /// directory) or `"-"` for standard output; `None`: no access log.
    pub(crate) access_log: Option<String>,
    /// Read a PROXY protocol header (v1 or v2) from trusted proxies on the
    /// public listener: the client it names is the client.
    pub(crate) proxy_protocol: bool,
}

/// `[server.tls]`: the certificate the front door presents. Relative paths
/// are read from the config file's directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub(crate) cert: PathBuf,
    /// PEM private key (PKCS#8, RSA or EC; PKCS#1 and SEC1 are read too).
    pub(crate) key: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            admin_token_env: "FLOODGATE_ADMIN_TOKEN".into(),
            shutdown_timeout: Duration::from_secs(10),
            workers: 0,
            node_id: None,
            tls: None,
            send_timeout: Duration::from_secs(30),
            client_body_timeout: Duration::from_secs(30),
            max_body_size: 1 << 30,
            response_buffer: 8 * 1024,
            response_buffer_total: 64 * 1024 * 1024,
            max_headers: 64,
            max_header_bytes: 32 * 1024,
            log_throttle: Duration::from_secs(10),
            access_log: None,
            proxy_protocol: false,
        }
    }
}

impl ServerConfig {
    /// The limits and timeouts that protect the gateway from hostile or
    /// unlucky traffic (docs/operations.md, "Hardening"); `[ban]`'s prefix
    /// limits are the rest of them.
    pub(super) fn validate_hardening(&self) -> Result<(), Invalid> {
        for (key, value) in [
            ("server.send_timeout", self.send_timeout),
            ("server.client_body_timeout", self.client_body_timeout),
        ] {
            if value.is_zero() || value > DAY {
                return Err(Invalid::new(key, "must be more than 0 and at most 1 day"));
            }
        }
        if self.log_throttle > DAY {
            return Err(Invalid::new("server.log_throttle", "must be at most 1 day"));
        }
        if !(1024..=1024 * 1024).contains(&self.response_buffer) {
            return Err(Invalid::new(
                "server.response_buffer",
                format!(
                    "must be from 1024 to 1048576 bytes, got {}",
                    self.response_buffer
                ),
            ));
        }
        if self.response_buffer_total > 1 << 40 {
            return Err(Invalid::new(
                "server.response_buffer_total",
                format!("must be at most 1 TiB, got {}", self.response_buffer_total),
            ));
        }
        if !(1..=MAX_HEADERS_PARSED).contains(&self.max_headers) {
            return Err(Invalid::new(
                "server.max_headers",
                format!(
                    "must be from 1 to {MAX_HEADERS_PARSED} (the HTTP parser's own limit), got {}",
                    self.max_headers
                ),
            ));
        }
        if !(1024..=MAX_HEAD_PARSED).contains(&self.max_header_bytes) {
            return Err(Invalid::new(
                "server.max_header_bytes",
                format!(
                    "must be from 1024 to {MAX_HEAD_PARSED} bytes (the HTTP parser's own limit), got {}",
                    self.max_header_bytes
                ),
            ));
        }
        Ok(())
    }

    /// The upper bound on `shutdown_timeout`.
    pub(super) fn validate_bounds(&self) -> Result<(), Invalid> {
        at_most("server.shutdown_timeout", self.shutdown_timeout, DAY)
    }

    /// The TLS file names, the admin token's variable, and the two
    /// listeners kept apart.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if let Some(tls) = &self.tls {
            if tls.cert.as_os_str().is_empty() {
                return Err(Invalid::new(
                    "server.tls.cert",
                    "must name a PEM certificate file",
                ));
            }
            if tls.key.as_os_str().is_empty() {
                return Err(Invalid::new(
                    "server.tls.key",
                    "must name a PEM private key file",
                ));
            }
        }
        if self
            .access_log
            .as_deref()
            .is_some_and(|p| p.trim().is_empty() || p.contains('\0'))
        {
            return Err(Invalid::new(
                "server.access_log",
                "must be a file path, or \"-\" for standard output (leave it out for no access log)",
            ));
        }
        if self.admin_token_env.trim().is_empty() {
            return Err(Invalid::new(
                "server.admin_token_env",
                "must name an environment variable",
            ));
        }
        if self.listen == self.admin_listen {
            return Err(Invalid::new(
                "server.admin_listen",
                "must differ from server.listen: the admin API is never on the public listener",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_util::parse;

    #[test]
    fn hardening_limits_are_bounded_and_named() {
        for (extra, key) in [
            ("[server]\nsend_timeout = \"0s\"\n", "server.send_timeout"),
            ("[server]\nresponse_buffer = 10\n", "server.response_buffer"),
            ("[server]\nmax_headers = 97\n", "server.max_headers"),
            (
                "[server]\nmax_header_bytes = 200000\n",
                "server.max_header_bytes",
            ),
        ] {
            assert_eq!(parse(extra).unwrap_err().key, key, "{extra}");
        }
    }

    #[test]
    fn the_access_log_is_a_path_or_a_dash() {
        assert_eq!(
            parse("[server]\naccess_log = \"\"\n").unwrap_err().key,
            "server.access_log"
        );
        let c = parse("[server]\naccess_log = \"-\"\n").expect("valid");
        assert_eq!(c.server.access_log.as_deref(), Some("-"));
        assert!(parse("").expect("valid").server.access_log.is_none());
    }
}
