//! The Local API's decisions stream, read as outside input:
//! `{"new":[...],"deleted":[...]}` (either may be `null`), each decision
//! with `value`, `scope` (`Ip` or `Range`), `type`, `duration` (Go's
//! notation: `3h59m12.3s`, `-9.8ms`), `origin`, `scenario` and `id`.
//! A decision floodgate cannot enforce (another scope or type, a bad value
//! or duration) is skipped and counted, never fatal; a document that is not
//! a stream is refused whole.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

#[derive(Deserialize)]
struct Stream {
    #[serde(default)]
    new: Option<Vec<Raw>>,
    #[serde(default)]
    deleted: Option<Vec<Raw>>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    id: i64,
    #[serde(default)]
    value: String,
    #[serde(default)]
    scope: String,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    duration: String,
    #[serde(default)]
    origin: String,
    #[serde(default)]
    scenario: String,
}

/// One ban decision floodgate enforces.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decision {
    pub(crate) id: i64,
    pub(crate) net: IpNet,
    /// Time left when the stream was read.
    pub(crate) left: Duration,
    pub(crate) origin: String,
    pub(crate) scenario: String,
}

/// What one answer of the stream says.
#[derive(Debug, Default)]
pub(crate) struct Delta {
    pub(crate) new: Vec<Decision>,
    /// `(id, network)` of decisions that ended.
    pub(crate) deleted: Vec<(i64, IpNet)>,
    /// Decisions skipped: not a ban, another scope, a bad value.
    pub(crate) skipped: usize,
}

/// Reads one answer of the stream.
pub(crate) fn parse(bytes: &[u8]) -> Result<Delta, String> {
    let stream: Stream =
        serde_json::from_slice(bytes).map_err(|e| format!("not a decisions stream: {e}"))?;
    let mut delta = Delta::default();
    for raw in stream.new.unwrap_or_default() {
        match decision(&raw) {
            Some(d) if raw.kind.eq_ignore_ascii_case("ban") => delta.new.push(d),
            _ => delta.skipped += 1,
        }
    }
    for raw in stream.deleted.unwrap_or_default() {
        match network(&raw) {
            Some(net) => delta.deleted.push((raw.id, net)),
            None => delta.skipped += 1,
        }
    }
    Ok(delta)
}

fn network(raw: &Raw) -> Option<IpNet> {
    let value = raw.value.trim();
    if raw.scope.eq_ignore_ascii_case("ip") {
        value
            .parse::<IpAddr>()
            .ok()
            .map(|ip| IpNet::from(canonical(ip)))
    } else if raw.scope.eq_ignore_ascii_case("range") {
        value.parse::<IpNet>().ok().map(|n| n.trunc())
    } else {
        None
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn decision(raw: &Raw) -> Option<Decision> {
    let net = network(raw)?;
    let left = go_duration(&raw.duration)?;
    Some(Decision {
        id: raw.id,
        net,
        left,
        origin: clip(&raw.origin),
        scenario: clip(&raw.scenario),
    })
}

/// Text from outside, kept short for listings.
fn clip(s: &str) -> String {
    s.chars().take(128).collect()
}

/// A Go duration (`1h2m3.5s`, `250ms`, `1.5us`); a negative one is zero
/// (already over). `None` when it is not one.
pub(crate) fn go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (negative, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest.is_empty() || rest.len() > 64 {
        return None;
    }
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    if negative {
        return Some(Duration::ZERO);
    }
    // Bounded: no decision outlives ten years here.
    Duration::try_from_secs_f64(total.min(10.0 * 365.0 * 86400.0)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_are_read() {
        assert_eq!(
            go_duration("3h59m12.5s"),
            Some(Duration::from_millis(
                (3 * 3600 + 59 * 60 + 12) * 1000 + 500
            ))
        );
        assert_eq!(go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(go_duration("-9.837733ms"), Some(Duration::ZERO));
        assert_eq!(go_duration("1.5µs"), Some(Duration::from_nanos(1500)));
        for bad in ["", "5", "5x", "h", "1h-2m", "1..2s"] {
            assert_eq!(go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_ban_decisions_on_addresses_and_ranges_are_kept() {
        let delta = parse(
            br#"{"new":[
              {"id":1,"value":"127.0.0.9","scope":"Ip","type":"ban","duration":"1h","origin":"cscli","scenario":"manual"},
              {"id":2,"value":"10.1.0.0/16","scope":"Range","type":"ban","duration":"30m","origin":"CAPI"},
              {"id":3,"value":"1.2.3.4","scope":"Ip","type":"captcha","duration":"1h"},
              {"id":4,"value":"FR","scope":"Country","type":"ban","duration":"1h"},
              {"id":5,"value":"nonsense","scope":"Ip","type":"ban","duration":"1h"},
              {"id":6,"value":"1.2.3.4","scope":"Ip","type":"ban","duration":"soon"}
            ],"deleted":[{"id":7,"value":"::ffff:1.2.3.4","scope":"Ip","type":"ban","duration":"-1s"}]}"#,
        )
        .unwrap();
        assert_eq!(delta.new.len(), 2);
        assert_eq!(delta.skipped, 4);
        assert_eq!(delta.new[1].net.to_string(), "10.1.0.0/16");
        assert_eq!(delta.deleted, vec![(7, "1.2.3.4/32".parse().unwrap())]);
        let empty = parse(br#"{"new":null,"deleted":null}"#).unwrap();
        assert!(empty.new.is_empty() && empty.deleted.is_empty());
        assert!(parse(b"{\"new\":3}").is_err());
        assert!(parse(b"<html>").is_err());
    }
}
