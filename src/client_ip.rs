//! Who is asking: the client address behind trusted proxies.
//!
//! `X-Forwarded-For` is a list each proxy appends to, so only its right end
//! is written by machines we trust. The resolver walks it from the right,
//! skipping addresses of trusted proxies, and takes the first untrusted one.
//! A peer that is not a trusted proxy is the client, whatever it sends, so a
//! client cannot choose its own identity. A malformed entry stops the walk at
//! the last address known good: bad input never errors, it only loses detail.
//!
//! IPv6 clients are grouped per prefix (`/64` by default): one host usually
//! owns a whole `/64`, and limiting single addresses would let it rotate.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use actix_web::http::header::{HeaderMap, HeaderName};
use ipnet::IpNet;

/// The `X-Forwarded-For` header, named once.
pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The identity rate limits and bans apply to: an IPv4 address or an IPv6
/// network of `ipv6_prefix` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ClientKey {
    V4(std::net::Ipv4Addr),
    V6 { net: Ipv6Addr, prefix: u8 },
}

impl ClientKey {
    /// Groups `ip` into its key (IPv6 masked to `prefix` bits).
    pub(crate) fn new(ip: IpAddr, ipv6_prefix: u8) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4),
                None => {
                    let prefix = ipv6_prefix.min(128);
                    let mask = if prefix == 0 {
                        0
                    } else {
                        u128::MAX << (128 - u32::from(prefix))
                    };
                    ClientKey::V6 {
                        net: Ipv6Addr::from(u128::from(v6) & mask),
                        prefix,
                    }
                }
            },
        }
    }

    /// The first address of the key, for allowlist checks.
    pub(crate) fn addr(&self) -> IpAddr {
        match *self {
            ClientKey::V4(a) => IpAddr::V4(a),
            ClientKey::V6 { net, .. } => IpAddr::V6(net),
        }
    }
}

impl fmt::Display for ClientKey {
    /// `203.0.113.7` or `2001:db8:1:2::/64`: the subject's name in Redis keys,
    /// the admin API and logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientKey::V4(a) => write!(f, "{a}"),
            ClientKey::V6 { net, prefix } => write!(f, "{net}/{prefix}"),
        }
    }
}

/// Resolves the client address of a request.
#[derive(Debug, Clone)]
pub struct ClientIpResolver {
    trusted: Vec<IpNet>,
    ipv6_prefix: u8,
}

impl ClientIpResolver {
    pub fn new(trusted: Vec<IpNet>, ipv6_prefix: u8) -> Self {
        Self {
            trusted,
            ipv6_prefix,
        }
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// The client address: `peer` itself unless it is a trusted proxy, in
    /// which case the right-most untrusted `X-Forwarded-For` entry.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        self.resolve_from(peer, self.is_trusted(peer), headers)
    }

    /// [`Self::resolve`] for a caller that already knows whether `peer` is
    /// a trusted proxy (the front door needs that answer again to forward).
    pub(crate) fn resolve_from(
        &self,
        peer: IpAddr,
        peer_trusted: bool,
        headers: &HeaderMap,
    ) -> IpAddr {
        let peer = canonical(peer);
        if !peer_trusted {
            return peer;
        }
        let mut client = peer;
        // Several X-Forwarded-For headers form one list, in order.
        let values: Vec<&[u8]> = headers
            .get_all(&X_FORWARDED_FOR)
            .map(|v| v.as_bytes())
            .collect();
        for value in values.iter().rev() {
            // Split the raw bytes: a client's junk (even invalid UTF-8) on the
            // left of a line a proxy appended to must not void the entries
            // the proxy wrote on the right.
            for entry in value.rsplit(|b| *b == b',') {
                let Some(ip) = std::str::from_utf8(entry).ok().and_then(parse_entry) else {
                    return client;
                };
                client = ip;
                if !self.is_trusted(ip) {
                    return ip;
                }
            }
        }
        client
    }

    /// The rate-limit / ban identity of `ip`.
    pub(crate) fn key(&self, ip: IpAddr) -> ClientKey {
        ClientKey::new(ip, self.ipv6_prefix)
    }
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) become plain IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// One X-Forwarded-For entry: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1` or
/// `[2001:db8::1]:80`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let e = entry.trim();
    if e.is_empty() || e.len() > 64 {
        return None;
    }
    if let Ok(ip) = e.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    e.parse::<std::net::SocketAddr>()
        .ok()
        .map(|s| canonical(s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    fn resolver() -> ClientIpResolver {
        ClientIpResolver::new(
            vec![
                "127.0.0.1/32".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ],
            64,
        )
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(X_FORWARDED_FOR.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let r = resolver();
        let peer: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(r.resolve(peer, &xff(&["1.2.3.4"])), peer);
    }

    #[test]
    fn rightmost_untrusted_entry_wins() {
        let r = resolver();
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let got = r.resolve(peer, &xff(&["6.6.6.6, 203.0.113.9", "10.1.1.1"]));
        assert_eq!(got, "203.0.113.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn malformed_entry_stops_at_last_good_address() {
        let r = resolver();
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            r.resolve(peer, &xff(&["garbage, 10.2.2.2"])),
            "10.2.2.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(r.resolve(peer, &xff(&[",,,"])), peer);
        assert_eq!(
            r.resolve(peer, &xff(&["[2001:db8::1]:443"])),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn invalid_utf8_on_the_left_does_not_hide_the_client() {
        let r = resolver();
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let mut h = HeaderMap::new();
        h.append(
            X_FORWARDED_FOR.clone(),
            HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.5").unwrap(),
        );
        assert_eq!(
            r.resolve(peer, &h),
            "203.0.113.5".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn ipv6_is_grouped_per_prefix() {
        let a = ClientKey::new("2001:db8:1:2:aaaa::1".parse().unwrap(), 64);
        let b = ClientKey::new("2001:db8:1:2:bbbb::2".parse().unwrap(), 64);
        let c = ClientKey::new("2001:db8:1:3::1".parse().unwrap(), 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_eq!(
            ClientKey::new("::ffff:1.2.3.4".parse().unwrap(), 64).to_string(),
            "1.2.3.4"
        );
    }
}
