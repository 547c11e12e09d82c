//! Log lines into [`Record`]s: the combined format of nginx and Apache, and
//! JSON lines whose field names are configurable (by default those of
//! floodgate's own access log). A line that cannot be read is an error
//! naming what is wrong, never a panic: the replay counts it and goes on.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use actix_web::http::header::HeaderName;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use super::record::{split_target, Record};
use super::time;
use crate::access_log::field;

/// How the lines of a log are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Each file by its first line: JSON if it starts with `{`, else combined.
    Auto,
    /// `$remote_addr - $remote_user [$time_local] "$request" $status ...`.
    Combined,
    /// One JSON object per line (floodgate's access log by default).
    Json,
}

/// Where the JSON reader finds each part of a request.
#[derive(Debug, Clone)]
pub(crate) struct JsonFields {
    time: String,
    client: String,
    method: String,
    path: String,
    host: String,
    /// `"GET /path HTTP/1.1"` in one field, read when method or path is
    /// missing (nginx's `$request`).
    request: String,
    duration_ms: String,
    status: String,
    /// An object of header name to SHA-256, as floodgate writes it.
    keys: String,
    decision: String,
    /// A field holding the SHA-256 of one header's value.
    key_fields: Vec<(String, HeaderName)>,
}

impl Default for JsonFields {
    fn default() -> JsonFields {
        JsonFields {
            time: field::TIME.into(),
            client: field::CLIENT.into(),
            method: field::METHOD.into(),
            path: field::PATH.into(),
            host: field::HOST.into(),
            request: "request".into(),
            duration_ms: field::DURATION_MS.into(),
            status: "status".into(),
            keys: field::KEYS.into(),
            decision: field::DECISION.into(),
            key_fields: Vec::new(),
        }
    }
}

impl JsonFields {
    /// Applies one `--field PART=NAME` (`key:<header>=NAME` for a field
    /// holding a header's SHA-256).
    pub(crate) fn set(&mut self, spec: &str) -> Result<(), String> {
        let Some((part, name)) = spec.split_once('=') else {
            return Err(format!(
                "--field {spec}: expected PART=NAME, such as time=ts"
            ));
        };
        if name.is_empty() {
            return Err(format!("--field {spec}: the field name is empty"));
        }
        if let Some(header) = part.strip_prefix("key:") {
            let header = HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| format!("--field {spec}: `{header}` is not a header name"))?;
            self.key_fields.push((name.to_string(), header));
            return Ok(());
        }
        let slot = match part {
            "time" => &mut self.time,
            "client" => &mut self.client,
            "method" => &mut self.method,
            "path" => &mut self.path,
            "host" => &mut self.host,
            "request" => &mut self.request,
            "duration_ms" => &mut self.duration_ms,
            "status" => &mut self.status,
            "keys" => &mut self.keys,
            "decision" => &mut self.decision,
            _ => {
                return Err(format!(
                    "--field {spec}: `{part}` is not one of time, client, method, path, host, request, duration_ms, status, keys, decision, key:<header>"
                ))
            }
        };
        *slot = name.to_string();
        Ok(())
    }
}

fn client(s: &str) -> Result<IpAddr, String> {
    let bare = s.strip_prefix('[').and_then(|s| s.strip_suffix(']'));
    bare.unwrap_or(s)
        .parse()
        .map_err(|_| format!("the client `{}` is not an IP address", clip(s)))
}

/// At most 60 characters of `s`, for error messages.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(60).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out.escape_debug().to_string()
}

/// `METHOD TARGET [PROTOCOL]` into method, path and authority.
fn request_line(request: &str) -> Result<(String, String, Option<String>), String> {
    let mut parts = request.split(' ').filter(|p| !p.is_empty());
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(format!(
            "the request `{}` is not METHOD TARGET PROTOCOL",
            clip(request)
        ));
    };
    if !method.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-') {
        return Err(format!("the method `{}` is not a method", clip(method)));
    }
    let (path, authority) = split_target(target);
    Ok((
        method.to_string(),
        path.to_string(),
        authority.map(str::to_string),
    ))
}

/// One line of the combined log format.
pub(crate) fn combined(line: &str) -> Result<Record, String> {
    let (addr, rest) = line
        .split_once(' ')
        .ok_or("not the combined format: no fields")?;
    let client = client(addr)?;
    let open = rest.find('[').ok_or("no [time] field")?;
    let close = rest[open..]
        .find(']')
        .ok_or("the [time] field is not closed")?
        + open;
    let time_us = time::clf(&rest[open + 1..close]).ok_or_else(|| {
        format!(
            "the time `{}` is not dd/Mon/yyyy:hh:mm:ss +zzzz",
            clip(&rest[open + 1..close])
        )
    })?;
    let after = rest[close + 1..].trim_start();
    let quoted = after
        .strip_prefix('"')
        .ok_or("no quoted \"request\" after the time")?;
    let end = closing_quote(quoted).ok_or("the \"request\" field is not closed")?;
    let (method, path, host) = request_line(&quoted[..end])?;
    let status = quoted[end + 1..].split_whitespace().next().unwrap_or("");
    if status.len() != 3 || !status.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "the status `{}` is not a three-digit code",
            clip(status)
        ));
    }
    Ok(Record {
        time_us,
        client,
        method,
        path,
        host,
        keys: Vec::new(),
        duration_us: None,
        status: status.parse().ok(),
        rejected: false,
    })
}

/// The index of the first `"` not escaped by a backslash (Apache writes
/// `\"`; nginx writes `\x22`, which has no quote).
fn closing_quote(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// A time field: a string or a number of seconds.
enum Scalar {
    Str(String),
    Num(f64),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Num(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Num(v as f64))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Num(v as f64))
            }
        }
        d.deserialize_any(V)
    }
}

/// What a JSON line holds of the parts the replay reads.
#[derive(Default)]
struct Parts {
    time: Option<Scalar>,
    client: Option<String>,
    method: Option<String>,
    path: Option<String>,
    host: Option<String>,
    request: Option<String>,
    duration_ms: Option<f64>,
    status: Option<u16>,
    keys: Vec<(HeaderName, String)>,
    decision: Option<String>,
}

/// A field name of a JSON object, borrowed from the line when it can be.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Reads a JSON object keeping only the fields `JsonFields` names; the
/// others (user agents, referrers) are skipped without being kept.
struct Pick<'f>(&'f JsonFields);

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = Parts;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Parts, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Pick<'_> {
    type Value = Parts;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parts, A::Error> {
        let f = self.0;
        let mut p = Parts::default();
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            let k = &*k;
            if k == f.time {
                p.time = map.next_value()?;
            } else if k == f.client {
                p.client = map.next_value()?;
            } else if k == f.method {
                p.method = map.next_value()?;
            } else if k == f.path {
                p.path = map.next_value()?;
            } else if k == f.host {
                p.host = map.next_value()?;
            } else if k == f.request {
                p.request = map.next_value()?;
            } else if k == f.duration_ms {
                p.duration_ms = map.next_value()?;
            } else if k == f.status {
                p.status = map.next_value()?;
            } else if k == f.decision {
                p.decision = map.next_value()?;
            } else if k == f.keys {
                let keys: Option<BTreeMap<String, String>> = map.next_value()?;
                for (name, hash) in keys.unwrap_or_default() {
                    let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                        de::Error::custom(format!("`{}` is not a header name", clip(&name)))
                    })?;
                    p.keys.push((name, hash));
                }
            } else if let Some((_, header)) = f.key_fields.iter().find(|(n, _)| n == k) {
                if let Some(hash) = map.next_value::<Option<String>>()? {
                    p.keys.push((header.clone(), hash));
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(p)
    }
}

/// One JSON line, its fields found where `fields` says.
pub(crate) fn json(line: &str, fields: &JsonFields) -> Result<Record, String> {
    let mut de = serde_json::Deserializer::from_str(line);
    let p = Pick(fields)
        .deserialize(&mut de)
        .and_then(|p| de.end().map(|()| p))
        .map_err(|e| format!("not a JSON object of the expected fields: {e}"))?;
    if p.decision.as_deref() == Some("rejected") {
        // Answered before identity or limits (it may name no client):
        // skipped, whatever else it holds.
        return Ok(Record {
            time_us: 0,
            client: IpAddr::from([0, 0, 0, 0]),
            method: String::new(),
            path: String::new(),
            host: None,
            keys: Vec::new(),
            duration_us: None,
            status: None,
            rejected: true,
        });
    }
    let time_us = match &p.time {
        Some(Scalar::Str(s)) => time::rfc3339(s)
            .or_else(|| time::clf(s))
            .ok_or_else(|| format!("the time `{}` is not RFC 3339", clip(s)))?,
        Some(Scalar::Num(n)) => time::epoch_seconds(*n)
            .ok_or_else(|| format!("the time {n} is not seconds since 1970"))?,
        None => return Err(format!("no `{}` field", fields.time)),
    };
    let client = client(
        p.client
            .as_deref()
            .ok_or_else(|| format!("no `{}` field", fields.client))?,
    )?;
    let (method, path, authority) = match (p.method, p.path) {
        (Some(m), Some(target)) => {
            let (path, authority) = split_target(&target);
            (m, path.to_string(), authority.map(str::to_string))
        }
        _ => match &p.request {
            Some(r) => request_line(r)?,
            None => {
                return Err(format!(
                    "no `{}` and `{}` fields, nor a `{}` field",
                    fields.method, fields.path, fields.request
                ))
            }
        },
    };
    let host = p.host.filter(|h| !h.is_empty() && h != "-").or(authority);
    let duration_us = match p.duration_ms {
        Some(ms) if ms.is_finite() && ms >= 0.0 => Some((ms * 1000.0).round() as u64),
        Some(ms) => return Err(format!("the duration {ms} is not a number of milliseconds")),
        None => None,
    };
    Ok(Record {
        time_us,
        client,
        method,
        path,
        host,
        keys: p.keys,
        duration_us,
        status: p.status,
        rejected: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const APACHE: &str = r#"203.0.113.7 - frank [10/Oct/2000:13:55:36 -0700] "GET /apache_pb.gif?x=1 HTTP/1.0" 200 2326 "http://www.example.com/start.html" "Mozilla/4.08 [en] (Win98; I ;Nav)""#;

    #[test]
    fn combined_lines_give_client_time_method_and_path() {
        let r = combined(APACHE).expect("a combined line");
        assert_eq!(r.client, "203.0.113.7".parse::<IpAddr>().expect("ip"));
        assert_eq!(r.time_us, 971_211_336_000_000);
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/apache_pb.gif");
        assert_eq!(r.host, None);
        let v6 = r#"2001:db8::1 - - [10/Oct/2000:13:55:36 -0700] "POST http://api.example.com/login HTTP/1.1" 401 0 "-" "curl/8""#;
        let r = combined(v6).expect("an IPv6 line");
        assert_eq!(r.path, "/login");
        assert_eq!(r.host.as_deref(), Some("api.example.com"));
        let quoted =
            r#"198.51.100.1 - - [10/Oct/2000:13:55:36 -0700] "GET /a\"b HTTP/1.1" 200 1 "-" "-""#;
        assert_eq!(combined(quoted).expect("escaped quote").path, r#"/a\"b"#);
    }

    #[test]
    fn malformed_combined_lines_say_what_is_wrong() {
        for (line, says) in [
            ("", "no fields"),
            ("garbage", "no fields"),
            (
                "example.com - - [10/Oct/2000:13:55:36 -0700] \"GET / HTTP/1.1\" 200 1",
                "not an IP address",
            ),
            (
                "203.0.113.7 - - 10/Oct/2000:13:55:36 -0700 \"GET / HTTP/1.1\" 200 1",
                "no [time]",
            ),
            (
                "203.0.113.7 - - [10/Oct/2000:13:55:36 -0700 \"GET / HTTP/1.1\" 200 1",
                "not closed",
            ),
            (
                "203.0.113.7 - - [yesterday] \"GET / HTTP/1.1\" 200 1",
                "is not dd/Mon",
            ),
            (
                "203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] GET / HTTP/1.1 200 1",
                "no quoted",
            ),
            (
                "203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] \"GET / HTTP/1.1",
                "not closed",
            ),
            (
                "203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] \"-\" 400 0",
                "not METHOD TARGET",
            ),
            (
                "203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] \"\\x16\\x03 / x\" 400 0",
                "not a method",
            ),
            (
                "203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] \"GET / HTTP/1.1\" ok 1",
                "three-digit",
            ),
            (
                "203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] \"GET / HTTP/1.1\"",
                "three-digit",
            ),
        ] {
            let e = combined(line).expect_err(line);
            assert!(e.contains(says), "{line}: {e}");
        }
    }

    #[test]
    fn json_lines_default_to_floodgates_own_fields() {
        let line = r#"{"time":"2026-05-01T12:00:00.250Z","client":"203.0.113.7","method":"GET","host":"api.example.com","path":"/v1/a?b=1","status":200,"decision":"allowed","rule":null,"bytes":3,"duration_ms":12.5,"keys":{"x-api-key":"abc"}}"#;
        let r = json(line, &JsonFields::default()).expect("a floodgate line");
        assert_eq!(r.time_us, 1_777_636_800_250_000);
        assert_eq!(r.path, "/v1/a");
        assert_eq!(r.host.as_deref(), Some("api.example.com"));
        assert_eq!(r.duration_us, Some(12_500));
        assert_eq!(
            r.keys,
            vec![(HeaderName::from_static("x-api-key"), "abc".into())]
        );
        assert!(!r.rejected);
        let rejected = line.replace("\"allowed\"", "\"rejected\"");
        assert!(
            json(&rejected, &JsonFields::default())
                .expect("a line")
                .rejected
        );
        // Screened before identity: no client, and still only skipped.
        let screened = r#"{"time":"2026-05-01T12:00:00.250Z","client":null,"method":"CONNECT","host":"","path":"x:443","status":405,"decision":"rejected"}"#;
        assert!(
            json(screened, &JsonFields::default())
                .expect("a line")
                .rejected
        );
    }

    #[test]
    fn json_field_names_are_configurable() {
        let mut f = JsonFields::default();
        for spec in [
            "time=ts",
            "client=remote_addr",
            "request=req",
            "key:x-api-key=key_sha",
        ] {
            f.set(spec).expect(spec);
        }
        let line = r#"{"ts":1777636800.25,"remote_addr":"2001:db8::7","req":"POST /login HTTP/2.0","key_sha":"h","ua":{"deep":[1,2]}}"#;
        let r = json(line, &f).expect("an nginx json line");
        assert_eq!(r.time_us, 1_777_636_800_250_000);
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/login");
        assert_eq!(
            r.keys,
            vec![(HeaderName::from_static("x-api-key"), "h".into())]
        );
        for bad in ["time", "when=ts", "time=", "key:bad header=x"] {
            assert!(f.set(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn malformed_json_lines_say_what_is_wrong() {
        let f = JsonFields::default();
        for (line, says) in [
            ("{", "not a JSON object"),
            ("[1,2]", "not a JSON object"),
            ("{} trailing", "not a JSON object"),
            (
                r#"{"client":"203.0.113.7","method":"GET","path":"/"}"#,
                "no `time`",
            ),
            (
                r#"{"time":"2026-05-01T12:00:00Z","method":"GET","path":"/"}"#,
                "no `client`",
            ),
            (
                r#"{"time":"yesterday","client":"203.0.113.7","method":"GET","path":"/"}"#,
                "not RFC 3339",
            ),
            (
                r#"{"time":-5,"client":"203.0.113.7","method":"GET","path":"/"}"#,
                "seconds since 1970",
            ),
            (
                r#"{"time":"2026-05-01T12:00:00Z","client":"nobody","method":"GET","path":"/"}"#,
                "not an IP",
            ),
            (
                r#"{"time":"2026-05-01T12:00:00Z","client":"203.0.113.7"}"#,
                "nor a `request`",
            ),
            (
                r#"{"time":"2026-05-01T12:00:00Z","client":7,"method":"GET","path":"/"}"#,
                "not a JSON object",
            ),
            (
                r#"{"time":"2026-05-01T12:00:00Z","client":"203.0.113.7","method":"GET","path":"/","keys":{"bad name":"h"}}"#,
                "not a header name",
            ),
            (
                r#"{"time":"2026-05-01T12:00:00Z","client":"203.0.113.7","method":"GET","path":"/","duration_ms":-1}"#,
                "milliseconds",
            ),
        ] {
            let e = json(line, &f).expect_err(line);
            assert!(e.contains(says), "{line}: {e}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// No line panics a reader: anything, or a real line with bytes
        /// cut out or put in anywhere.
        #[test]
        fn no_line_panics(
            junk in ".{0,200}",
            at in 0usize..400,
            cut in 0usize..40,
            insert in ".{0,8}",
        ) {
            let f = JsonFields::default();
            let _ = combined(&junk);
            let _ = json(&junk, &f);
            let _ = time::rfc3339(&junk);
            let _ = time::clf(&junk);
            let real = [APACHE.to_string(), r#"{"time":"2026-05-01T12:00:00.250+02:00","client":"2001:db8::1","method":"GET","path":"/a","keys":{"x":"h"},"duration_ms":1}"#.to_string()];
            for line in real {
                let mut chars: Vec<char> = line.chars().collect();
                let at = at.min(chars.len());
                let end = (at + cut).min(chars.len());
                chars.splice(at..end, insert.chars());
                let mutated: String = chars.into_iter().collect();
                let _ = combined(&mutated);
                let _ = json(&mutated, &f);
            }
        }
    }
}
