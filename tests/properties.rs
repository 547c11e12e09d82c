//! Property tests of the parsers that take outside input: the config
//! loader, `X-Forwarded-For`, path readings and rate-limit key encoding.
//! Each runs a bounded number of cases so the whole file stays quick; each
//! asserts "no panic" plus the invariant its module documents.

use std::net::{IpAddr, Ipv4Addr};

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use floodgate::client_ip::ClientIpResolver;
use floodgate::config::Config;
use floodgate::path_match::{has_prefix, normalize_path, PathReadings};
use floodgate::rules::encode_key_value;
use proptest::prelude::*;

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const BASE: &str = "[upstream]\nurls = [\"http://127.0.0.1:3000\"]\n";

/// Lines a config might have, right or wrong, for the loader to combine.
fn config_line() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "listen",
        "send_timeout",
        "client_body_timeout",
        "max_body_size",
        "response_buffer",
        "max_headers",
        "max_header_bytes",
        "log_throttle",
        "workers",
        "idle_timeout",
        "timeout",
        "max_connections",
        "min_prefix_v4",
        "min_prefix_v6",
        "bogus",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        "[0-9]{1,6}(ms|s|m|h|d|ns)".prop_map(|d| format!("\"{d}\"")),
        "\"[ -~]{0,12}\"",
        Just("true".to_string()),
        Just("[]".to_string()),
    ];
    (key, value).prop_map(|(k, v)| format!("{k} = {v}"))
}

fn section() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "[server]",
        "[upstream]",
        "[ban]",
        "[client_ip]",
        "[redis]",
    ])
    .prop_map(str::to_string)
}

proptest! {
    #![proptest_config(cases(400))]

    #[test]
    fn config_loader_never_panics_and_errors_are_one_line(text in "\\PC{0,200}") {
        if let Err(e) = Config::parse(&text, "f.toml") {
            let shown = e.to_string();
            prop_assert!(shown.starts_with("f.toml: "), "{}", shown);
            prop_assert!(!shown.contains('\n'), "{}", shown);
            prop_assert!(!e.key.is_empty());
        }
    }

    #[test]
    fn config_sections_are_validated_or_refused_with_their_key(
        blocks in prop::collection::vec((section(), prop::collection::vec(config_line(), 0..4)), 0..4)
    ) {
        let mut text = String::new();
        let mut has_upstream = false;
        for (name, lines) in &blocks {
            has_upstream |= name == "[upstream]";
            text.push_str(name);
            text.push('\n');
            if name == "[upstream]" {
                text.push_str("urls = [\"http://127.0.0.1:3000\"]\n");
            }
            for l in lines {
                text.push_str(l);
                text.push('\n');
            }
        }
        if !has_upstream {
            text.push_str(BASE);
        }
        match Config::parse(&text, "f.toml") {
            Ok(c) => {
                // A config that loads keeps every hardening value in bounds.
                prop_assert!(!c.server.send_timeout.is_zero());
                prop_assert!(!c.server.client_body_timeout.is_zero());
                prop_assert!(!c.upstream.idle_timeout.is_zero());
                prop_assert!((1024..=1024 * 1024).contains(&c.server.response_buffer));
                prop_assert!((1..=96).contains(&c.server.max_headers));
                prop_assert!(c.ban.min_prefix_v4 <= 32 && c.ban.min_prefix_v6 <= 128);
            }
            Err(e) => prop_assert!(!e.to_string().contains('\n')),
        }
    }
}

fn xff(bytes: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(bytes) {
        h.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    h
}

fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    // Anything a header value can hold: tab, visible ASCII, and bytes that
    // are not text at all.
    let byte = prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff];
    prop::collection::vec(byte, 0..80)
}

proptest! {
    #![proptest_config(cases(500))]

    #[test]
    fn forwarded_for_from_an_untrusted_peer_is_ignored(bytes in header_bytes(), last in any::<u8>()) {
        let r = ClientIpResolver::new(vec!["127.0.0.1/32".parse().unwrap()], 64);
        let peer = IpAddr::V4(Ipv4Addr::new(198, 51, 100, last));
        prop_assert_eq!(r.resolve(peer, &xff(&bytes)), peer);
    }

    #[test]
    fn junk_on_the_left_never_hides_what_a_trusted_proxy_appended(
        junk in header_bytes(),
        client in any::<[u8; 4]>(),
    ) {
        let r = ClientIpResolver::new(vec!["127.0.0.1/32".parse().unwrap()], 64);
        let client = IpAddr::V4(Ipv4Addr::from(client));
        prop_assume!(!r.is_trusted(client));
        let mut value = junk.clone();
        value.extend_from_slice(format!(", {client}").as_bytes());
        let headers = xff(&value);
        let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
        prop_assert_eq!(r.resolve(peer, &headers), client);
    }
}

/// Printable ASCII without the hash-tag braces.
fn tag_safe(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x21..0x7f).contains(&b) && !matches!(b, b'{' | b'}'))
}

fn path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_string()),
        Just("//".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just(";".to_string()),
        Just("\\".to_string()),
        Just("%2F".to_string()),
        Just("%2f".to_string()),
        Just("%5C".to_string()),
        Just("%25".to_string()),
        Just("%2e".to_string()),
        Just("%".to_string()),
        "%[0-9a-fA-F]{2}",
        "[a-zA-Z0-9]{1,4}",
        "\\PC",
    ];
    prop::collection::vec(piece, 0..12).prop_map(|p| format!("/{}", p.concat()))
}

/// Paths built to land on `/api` under some reading: the prefix spelled
/// with escapes, case and double encoding, behind or ahead of dot
/// segments (plain or escaped), `;parameters`, backslashes and encoded
/// slashes.
fn api_path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("api".to_string()),
        Just("API".to_string()),
        Just("%61pi".to_string()),
        Just("%2561pi".to_string()),
        Just("x".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2e%2e".to_string()),
        Just(".%2E".to_string()),
        Just("..;".to_string()),
        Just(";p=1".to_string()),
        Just("/".to_string()),
        Just("\\".to_string()),
        Just("%2F".to_string()),
        Just("%5c".to_string()),
        Just("%252F".to_string()),
    ];
    prop::collection::vec(piece, 1..8).prop_map(|p| format!("/{}", p.concat()))
}

/// A model of what upstreams make of a path, written apart from the
/// gateway's: each choice of decoding (none, unreserved only, once, twice),
/// backslash as slash or not, `;parameters` dropped or kept, dot segments
/// resolved or not, with slashes merged.
fn upstream_readings(raw: &str) -> Vec<String> {
    let once = |s: &str| -> String {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let unreserved_only = |s: &str| -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                if let Ok(v) = u8::from_str_radix(hex, 16) {
                    if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let decodings = [
        raw.to_string(),
        unreserved_only(raw),
        once(raw),
        once(&once(raw)),
    ];
    let mut out = Vec::new();
    for d in &decodings {
        for backslash in [false, true] {
            let text = if backslash {
                d.replace('\\', "/")
            } else {
                d.clone()
            };
            for params in [false, true] {
                let segments: Vec<String> = text
                    .split('/')
                    .map(|s| {
                        if params {
                            s.split(';').next().unwrap_or("").to_string()
                        } else {
                            s.to_string()
                        }
                    })
                    .filter(|s| !s.is_empty())
                    .collect();
                for dots in [false, true] {
                    let mut stack: Vec<&str> = Vec::new();
                    for s in &segments {
                        match s.as_str() {
                            "." if dots => {}
                            ".." if dots => {
                                stack.pop();
                            }
                            other => stack.push(other),
                        }
                    }
                    out.push(format!("/{}", stack.join("/")));
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(cases(1000))]

    #[test]
    fn every_reading_is_an_absolute_path_with_single_slashes(raw in path()) {
        let r = PathReadings::of(&raw);
        prop_assert!(r.plain().starts_with('/'), "{:?}", r.plain());
        prop_assert!(!r.plain().contains("//"), "{:?}", r.plain());
        for other in r.others() {
            prop_assert!(other.starts_with('/'));
            prop_assert!(!other.contains("//"), "{:?}", other);
            prop_assert_ne!(other.as_str(), r.plain(), "others differ from the plain reading");
        }
    }

    /// The security property: if any way an upstream may read the path
    /// puts it under a rule's prefix, the gateway applies the rule or
    /// refuses the request (400); it never lets it through unlimited.
    #[test]
    fn a_path_any_upstream_reads_under_a_prefix_gets_its_rule_or_a_400(raw in api_path()) {
        let under = upstream_readings(&raw)
            .iter()
            .any(|r| r.to_ascii_lowercase().starts_with("/api"));
        if under {
            let verdict = PathReadings::of(&raw).starts_with("/api", false);
            prop_assert!(
                !matches!(verdict, Ok(false)),
                "{:?} reads as /api upstream, yet the rule would not apply", raw
            );
        }
    }

    #[test]
    fn the_same_holds_for_any_path(raw in path()) {
        for prefix in ["/a", "/x", "/"] {
            let under = upstream_readings(&raw)
                .iter()
                .any(|r| r.to_ascii_lowercase().starts_with(prefix));
            if under {
                let verdict = PathReadings::of(&raw).starts_with(prefix, false);
                prop_assert!(!matches!(verdict, Ok(false)), "{:?} under {}", raw, prefix);
            }
        }
    }

    #[test]
    fn plain_characters_have_a_single_reading(raw in "(/[a-zA-Z0-9_~-][a-zA-Z0-9._~-]{0,7}){0,6}") {
        let r = PathReadings::of(&raw);
        prop_assert!(r.others().is_empty());
        prop_assert_eq!(r.plain(), normalize_path(&raw));
    }

    #[test]
    fn case_folding_is_ascii_only_and_symmetric(p in "/[a-zA-Z]{0,6}", q in "/[a-zA-Z]{0,6}") {
        let folded = has_prefix(&p, &q, false);
        prop_assert_eq!(folded, p.to_ascii_lowercase().starts_with(&q.to_ascii_lowercase()));
        prop_assert_eq!(has_prefix(&p, &q, true), p.starts_with(&q));
    }

    #[test]
    fn key_values_are_safe_in_hash_tags_and_never_collide(raw in prop::collection::vec(any::<u8>(), 0..64)) {
        let encoded = encode_key_value(&raw);
        prop_assert!(tag_safe(&encoded), "{:?}", encoded);
        let back: Vec<u8> = percent_encoding::percent_decode_str(&encoded).collect();
        prop_assert_eq!(back, raw, "the encoding is reversible, so two values never share a key");
    }
}
