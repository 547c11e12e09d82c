//! One recorded request, as every log format reads into it, and how rules
//! match it: through the same [`RequestParts`] as a live request.

use std::net::IpAddr;

use actix_web::http::header::HeaderName;

use crate::rules::{KeyHeader, RequestParts};

/// A request read from a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// When it arrived, µs since the Unix epoch (UTC).
    pub(crate) time_us: u64,
    /// The client's address as the gateway resolved it.
    pub(crate) client: IpAddr,
    pub(crate) method: String,
    /// The path as sent, without the query.
    pub(crate) path: String,
    pub(crate) host: Option<String>,
    /// (header, SHA-256 of its value) of the key headers the line carries.
    pub(crate) keys: Vec<(HeaderName, String)>,
    /// How long the request was in flight, when the log says (concurrency
    /// rules hold their slot this long).
    pub(crate) duration_us: Option<u64>,
    /// The answer's status, when the log says (rules that `count` some
    /// statuses only are charged for those).
    pub(crate) status: Option<u16>,
    /// floodgate answered it before any limit applied (`decision` =
    /// `rejected`): it was never charged, so it is not replayed.
    pub(crate) rejected: bool,
}

impl RequestParts for Record {
    fn method(&self) -> &str {
        &self.method
    }

    fn path(&self) -> &str {
        &self.path
    }

    fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    fn key_header(&self, name: &HeaderName) -> Option<KeyHeader<'_>> {
        self.keys
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, hash)| KeyHeader::Hashed(hash))
    }
}

/// A request target split as the gateway's router sees it: the path
/// without the query, and the authority of an absolute-form target
/// (`GET http://host/path`).
pub(crate) fn split_target(target: &str) -> (&str, Option<&str>) {
    let (target, authority) = match target.split_once("://") {
        Some((scheme, rest)) if scheme.bytes().all(|b| b.is_ascii_alphabetic()) => {
            match rest.find('/') {
                Some(at) => (&rest[at..], Some(&rest[..at])),
                None => ("/", Some(rest)),
            }
        }
        _ => (target, None),
    };
    let end = target.find(['?', '#']).unwrap_or(target.len());
    (&target[..end], authority.filter(|a| !a.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_lose_their_query_and_keep_their_authority() {
        assert_eq!(split_target("/a/b?x=1"), ("/a/b", None));
        assert_eq!(split_target("/a#frag"), ("/a", None));
        assert_eq!(
            split_target("http://api.example.com/v1?q"),
            ("/v1", Some("api.example.com"))
        );
        assert_eq!(
            split_target("https://api.example.com"),
            ("/", Some("api.example.com"))
        );
        assert_eq!(split_target("*"), ("*", None));
    }
}
