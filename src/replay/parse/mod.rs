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
mod tests;
