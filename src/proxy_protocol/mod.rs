//! `server.proxy_protocol`: the PROXY protocol (v1 text, v2 binary) on the
//! public listener, so that a TCP load balancer (HAProxy in TCP mode, an AWS
//! NLB, ...) can name the client it forwards. The address a header carries
//! becomes the connection's peer address: every rule, ban and log line sees
//! the client, never the balancer.
//!
//! A header is read, before TLS or HTTP, only from a peer in
//! `client_ip.trusted_proxies`: anyone else could name any client, so a
//! header from another peer closes the connection. A connection without a
//! header is served as it is, with its own peer address (a balancer's
//! health check, or an operator on a trusted host); it is counted, so a
//! balancer that stopped sending headers shows. A malformed header, or one
//! that does not arrive within [`HEADER_TIMEOUT`], closes the connection.
//!
//! The header is found with `peek` and then read exactly, so not one byte
//! of what follows it (a TLS `ClientHello`, an HTTP request) is taken from
//! the stream: the connection is handed on as a plain `TcpStream`.
//! Parsing is the `ppp` crate's.
//!
//! `listener` serves the public listener with this step in front of
//! actix-web's HTTP service (plain or TLS).

mod listener;

pub(crate) use listener::{serve, PublicListener};

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use actix_web::rt::net::TcpStream;
use metrics::Counter;
use ppp::v2;
use tokio::io::AsyncReadExt;

/// How long a connection may take to send its header: the same bound
/// actix-web gives a request head.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The v2 header's first 12 bytes.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 header's first 6 bytes.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The fixed part of a v2 header; its last two bytes are the length of
/// the rest.
const V2_FIXED: usize = 16;
/// How often a connection whose first bytes could still be a header is
/// looked at again until the rest arrives (rare: a header comes in one
/// segment).
const REPEEK_EVERY: Duration = Duration::from_millis(5);

/// What a connection's first bytes said about who the client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// A header named this client.
    Named(SocketAddr),
    /// A header that names no client (v2 `LOCAL`, v1 `UNKNOWN`, a UNIX or
    /// unspecified address family): the peer is the client.
    Unnamed,
    /// No header: the peer is the client.
    Direct,
}

/// Why a connection is closed before TLS or HTTP.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("a PROXY protocol header from {0}, which is not in client_ip.trusted_proxies")]
    Untrusted(IpAddr),
    #[error("a malformed PROXY protocol header from {peer}: {why}")]
    Malformed { peer: IpAddr, why: String },
    #[error("no complete PROXY protocol header from {0} within 5s")]
    Timeout(IpAddr),
    #[error("the connection from {peer} failed before its PROXY protocol header: {source}")]
    Io { peer: IpAddr, source: io::Error },
}

/// `floodgate_proxy_protocol_total{outcome}`, resolved once.
#[derive(Clone)]
pub(crate) struct Outcomes {
    v1: Counter,
    v2: Counter,
    unnamed: Counter,
    direct: Counter,
    untrusted: Counter,
    malformed: Counter,
    timeout: Counter,
}

impl Outcomes {
    pub(crate) fn resolve() -> Outcomes {
        let c = |outcome: &'static str| metrics::counter!(crate::metrics::PROXY_PROTOCOL, "outcome" => outcome);
        Outcomes {
            v1: c("v1"),
            v2: c("v2"),
            unnamed: c("unnamed"),
            direct: c("absent"),
            untrusted: c("untrusted"),
            malformed: c("malformed"),
            timeout: c("timeout"),
        }
    }

    fn arrival(&self, arrival: Arrival, v2: bool) {
        match arrival {
            Arrival::Named(_) if v2 => self.v2.increment(1),
            Arrival::Named(_) => self.v1.increment(1),
            Arrival::Unnamed => self.unnamed.increment(1),
            Arrival::Direct => self.direct.increment(1),
        }
    }

    fn refusal(&self, refusal: &Refusal) {
        match refusal {
            Refusal::Untrusted(_) => self.untrusted.increment(1),
            Refusal::Malformed { .. } => self.malformed.increment(1),
            Refusal::Timeout(_) => self.timeout.increment(1),
            Refusal::Io { .. } => {}
        }
    }
}

/// Reads the PROXY header at the start of `tcp`, if there is one, within
/// [`HEADER_TIMEOUT`], and counts the outcome. `trusted` says whether the
/// peer may send one.
pub(crate) async fn accept(
    tcp: &mut TcpStream,
    peer: IpAddr,
    trusted: bool,
    outcomes: &Outcomes,
) -> Result<Arrival, Refusal> {
    let seen = std::cell::Cell::new(false);
    let read = tokio::time::timeout(HEADER_TIMEOUT, read_header(tcp, peer, trusted, &seen));
    let result = match read.await {
        Ok(result) => result,
        // Part of a header, never finished.
        Err(_) if seen.get() => Err(Refusal::Timeout(peer)),
        // Nothing at all (a preconnect, an idle check): closed as HTTP
        // would close it, without a warning.
        Err(_) => Err(Refusal::Io {
            peer,
            source: io::ErrorKind::TimedOut.into(),
        }),
    };
    match &result {
        Ok((arrival, v2)) => outcomes.arrival(*arrival, *v2),
        Err(refusal) => outcomes.refusal(refusal),
    }
    result.map(|(arrival, _)| arrival)
}

/// What the first bytes seen so far are.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// Not a header: the connection's own protocol.
    Other,
    /// Too few bytes to tell.
    Unsure,
    V1,
    V2,
}

fn classify(bytes: &[u8]) -> Start {
    let matches = |sig: &[u8]| {
        let n = bytes.len().min(sig.len());
        bytes[..n] == sig[..n]
    };
    if matches(V2_SIGNATURE) {
        if bytes.len() >= V2_SIGNATURE.len() {
            Start::V2
        } else {
            Start::Unsure
        }
    } else if matches(V1_PREFIX) {
        if bytes.len() >= V1_PREFIX.len() {
            Start::V1
        } else {
            Start::Unsure
        }
    } else {
        Start::Other
    }
}

/// The header's arrival and whether it was v2; the stream is left at the
/// first byte after the header.
async fn read_header(
    tcp: &mut TcpStream,
    peer: IpAddr,
    trusted: bool,
    seen: &std::cell::Cell<bool>,
) -> Result<(Arrival, bool), Refusal> {
    let io = |source| Refusal::Io { peer, source };
    let malformed = |why: String| Refusal::Malformed { peer, why };
    let mut buf = [0u8; V1_MAX];
    loop {
        let n = tcp.peek(&mut buf).await.map_err(io)?;
        if n == 0 {
            return Err(io(io::ErrorKind::UnexpectedEof.into()));
        }
        seen.set(true);
        let seen = &buf[..n];
        let start = classify(seen);
        if start == Start::Other {
            return Ok((Arrival::Direct, false));
        }
        if start != Start::Unsure && !trusted {
            return Err(Refusal::Untrusted(peer));
        }
        match start {
            Start::V2 if n >= V2_FIXED => {
                let len = usize::from(u16::from_be_bytes([seen[14], seen[15]]));
                let mut header = vec![0u8; V2_FIXED + len];
                tcp.read_exact(&mut header).await.map_err(io)?;
                let parsed = v2::Header::try_from(header.as_slice())
                    .map_err(|e| malformed(format!("v2: {e}")))?;
                return Ok((v2_arrival(&parsed), true));
            }
            Start::V1 => {
                if let Some(end) = seen.windows(2).position(|w| w == b"\r\n") {
                    let mut header = vec![0u8; end + 2];
                    tcp.read_exact(&mut header).await.map_err(io)?;
                    let parsed = ppp::v1::Header::try_from(header.as_slice())
                        .map_err(|e| malformed(format!("v1: {e}")))?;
                    return Ok((v1_arrival(&parsed), false));
                }
                if n >= V1_MAX {
                    return Err(malformed(format!("v1: no CRLF within {V1_MAX} bytes")));
                }
            }
            _ => {}
        }
        // Part of a header so far: look again when more has come.
        tokio::time::sleep(REPEEK_EVERY).await;
    }
}

fn v2_arrival(header: &v2::Header<'_>) -> Arrival {
    if header.command == v2::Command::Local {
        return Arrival::Unnamed;
    }
    match header.addresses {
        v2::Addresses::IPv4(a) => {
            Arrival::Named(SocketAddr::from((a.source_address, a.source_port)))
        }
        v2::Addresses::IPv6(a) => {
            Arrival::Named(SocketAddr::from((a.source_address, a.source_port)))
        }
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => Arrival::Unnamed,
    }
}

fn v1_arrival(header: &ppp::v1::Header<'_>) -> Arrival {
    match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => {
            Arrival::Named(SocketAddr::from((a.source_address, a.source_port)))
        }
        ppp::v1::Addresses::Tcp6(a) => {
            Arrival::Named(SocketAddr::from((a.source_address, a.source_port)))
        }
        ppp::v1::Addresses::Unknown => Arrival::Unnamed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_are_classified_without_guessing() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Start::Other);
        assert_eq!(classify(b"\x16\x03\x01"), Start::Other);
        assert_eq!(classify(b"PRO"), Start::Unsure);
        assert_eq!(classify(b"POST"), Start::Other);
        assert_eq!(classify(b"PROXY TCP4"), Start::V1);
        assert_eq!(classify(b"\r\n\r\n"), Start::Unsure);
        assert_eq!(classify(V2_SIGNATURE), Start::V2);
    }

    #[test]
    fn addresses_come_from_the_source_field() {
        let header = v2::Builder::with_addresses(
            0x21,
            v2::Protocol::Stream,
            (
                "203.0.113.7:4711".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:443".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        let parsed = v2::Header::try_from(header.as_slice()).unwrap();
        assert_eq!(
            v2_arrival(&parsed),
            Arrival::Named("203.0.113.7:4711".parse().unwrap())
        );
        let local =
            v2::Builder::with_addresses(0x20, v2::Protocol::Stream, v2::Addresses::Unspecified)
                .build()
                .unwrap();
        let parsed = v2::Header::try_from(local.as_slice()).unwrap();
        assert_eq!(v2_arrival(&parsed), Arrival::Unnamed);
        let v1 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4711 443\r\n";
        let parsed = ppp::v1::Header::try_from(&v1[..]).unwrap();
        assert_eq!(
            v1_arrival(&parsed),
            Arrival::Named("[2001:db8::7]:4711".parse().unwrap())
        );
    }
}
