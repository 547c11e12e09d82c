//! How a request path is read for rule matching, so that a limit cannot be
//! spelled around.
//!
//! Upstream frameworks disagree on what a path means. Some decode `%2F` to a
//! slash, or `%5C` and `\` to one; some drop `;params` from each segment
//! (so `/x/..;/api` is `/api`) while others keep them (nginx: `/api/..;` is
//! under `/api`); a few decode twice (`%2561` is `a`); some resolve `.` and
//! `..` segments and some route on them as they are; many route without
//! regard to case. The gateway forwards the path exactly as received and
//! cannot know which of these the upstream does, so it reads the path every
//! one of these ways and requires the readings to agree. A reading is one
//! choice on each of four questions:
//!
//! - which escapes are decoded: none, those of unreserved characters, all
//!   of them once, or all of them twice;
//! - whether `\` is a slash;
//! - whether each segment's `;parameters` are dropped;
//! - whether `.` and `..` segments are resolved.
//!
//! Repeated slashes are merged in every reading. The *plain* reading
//! ([`normalize_path`]: unreserved escapes decoded, dots resolved, `\` and
//! `;` kept) is the one rules are written against; the others are computed
//! only for a path holding `%`, `\`, `;` or a dot segment, which few
//! requests do.
//!
//! A path whose readings select different rules is refused with 400 (see
//! `rules::MatchError`); otherwise the readings are equivalent for every
//! rule and the request goes on. So whatever an upstream makes of a path,
//! if that falls under a rule's prefix the rule applies or the request is
//! refused (`tests/properties.rs` checks exactly that against a model of
//! the readings). Case is folded at comparison time (ASCII, per rule:
//! `match.case_sensitive`). Kept apart from `rules` because it is about
//! paths alone and is tested as such.

use std::borrow::Cow;

/// The plain reading: escapes of unreserved characters (`A-Z a-z 0-9 - . _
/// ~`) decoded, repeated slashes merged, `.` and `..` segments resolved.
/// Other escapes, `\` and `;` are left as they are.
pub fn normalize_path(raw: &str) -> Cow<'_, str> {
    let simple = !raw.contains('%') && !raw.contains("//") && !raw.contains("/.");
    if simple {
        return Cow::Borrowed(raw);
    }
    let decoded = decode(raw.as_bytes(), unreserved);
    Cow::Owned(clean_segments(
        &String::from_utf8_lossy(&decoded),
        false,
        true,
    ))
}

/// Percent-decodes the escapes whose byte `keep` accepts; malformed escapes
/// stay as they are.
fn decode(raw: &[u8], keep: impl Fn(u8) -> bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            if let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                let c = h * 16 + l;
                if keep(c) {
                    out.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    out
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Merges slashes and, with `drop_params`, cuts each segment at its first
/// `;`; with `resolve_dots`, resolves `.` and `..` (never above the root).
/// The result starts with `/`, and ends with one when the path did.
fn clean_segments(path: &str, drop_params: bool, resolve_dots: bool) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut last = "";
    for seg in path.split('/') {
        let seg = if drop_params {
            seg.split(';').next().unwrap_or("")
        } else {
            seg
        };
        last = seg;
        match seg {
            "" => {}
            "." if resolve_dots => {}
            ".." if resolve_dots => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut cleaned = String::with_capacity(path.len());
    for seg in &out {
        cleaned.push('/');
        cleaned.push_str(seg);
    }
    let ends_in_dir = last.is_empty() || (resolve_dots && matches!(last, "." | ".."));
    if cleaned.is_empty() || (ends_in_dir && !cleaned.ends_with('/')) {
        cleaned.push('/');
    }
    cleaned
}

/// Which escapes a reading decodes.
#[derive(Clone, Copy)]
enum Decode {
    None,
    Unreserved,
    Once,
    Twice,
}

fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~".contains(&c)
}

/// One reading of `raw` (see the module's documentation).
fn reading(raw: &str, decoding: Decode, backslash: bool, params: bool, dots: bool) -> String {
    let bytes: Cow<'_, [u8]> = match decoding {
        Decode::None => Cow::Borrowed(raw.as_bytes()),
        Decode::Unreserved => Cow::Owned(decode(raw.as_bytes(), unreserved)),
        Decode::Once => Cow::Owned(decode(raw.as_bytes(), |_| true)),
        Decode::Twice => Cow::Owned(decode(&decode(raw.as_bytes(), |_| true), |_| true)),
    };
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if backslash {
        text = text.replace('\\', "/");
    }
    clean_segments(&text, params, dots)
}

/// True if `raw` holds a `.` or `..` segment (with `;parameters` or not).
fn has_dot_segment(raw: &str) -> bool {
    raw.split(['/', '\\'])
        .map(|s| s.split(';').next().unwrap_or(""))
        .any(|s| s == "." || s == "..")
}

/// Every reading of one request path that differs from the plain one.
#[derive(Debug)]
pub struct PathReadings<'a> {
    plain: Cow<'a, str>,
    others: Vec<String>,
}

impl<'a> PathReadings<'a> {
    /// Reads `raw` (the path as received, without its query).
    pub fn of(raw: &'a str) -> PathReadings<'a> {
        let plain = normalize_path(raw);
        let mut others: Vec<String> = Vec::new();
        let special = raw.bytes().any(|b| matches!(b, b'%' | b'\\' | b';')) || has_dot_segment(raw);
        if special {
            let escapes = raw.contains('%');
            for decoding in [
                Decode::None,
                Decode::Unreserved,
                Decode::Once,
                Decode::Twice,
            ] {
                if !escapes && !matches!(decoding, Decode::None) {
                    continue;
                }
                for backslash in [false, true] {
                    for params in [false, true] {
                        for dots in [true, false] {
                            let r = reading(raw, decoding, backslash, params, dots);
                            if r != plain && !others.contains(&r) {
                                others.push(r);
                            }
                        }
                    }
                }
            }
        }
        PathReadings { plain, others }
    }

    /// The plain reading.
    pub fn plain(&self) -> &str {
        &self.plain
    }

    /// The readings that differ from the plain one (none for most paths).
    pub fn others(&self) -> &[String] {
        &self.others
    }

    /// Whether the path starts with `prefix`, when every reading agrees.
    /// When they do not, the plain reading and one that disagrees (each
    /// cut to 200 characters, for the log): a path that would match under
    /// one reading and not another is refused rather than guessed, by rules
    /// and routes alike.
    pub fn starts_with(
        &self,
        prefix: &str,
        case_sensitive: bool,
    ) -> Result<bool, (String, String)> {
        let plain = has_prefix(self.plain(), prefix, case_sensitive);
        match self
            .others
            .iter()
            .find(|o| has_prefix(o, prefix, case_sensitive) != plain)
        {
            Some(other) => Err((
                self.plain().chars().take(200).collect(),
                other.chars().take(200).collect(),
            )),
            None => Ok(plain),
        }
    }
}

/// Whether `path` starts with `prefix`; without `case_sensitive`, ASCII
/// letters match either case.
pub fn has_prefix(path: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        return path.starts_with(prefix);
    }
    path.len() >= prefix.len()
        && path.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readings(raw: &str) -> Vec<String> {
        let r = PathReadings::of(raw);
        let mut all = vec![r.plain().to_string()];
        all.extend(r.others().iter().cloned());
        all
    }

    #[test]
    fn plain_reading_decodes_unreserved_and_resolves_dots() {
        assert_eq!(normalize_path("/api/login"), "/api/login");
        assert_eq!(normalize_path("/%61pi/login"), "/api/login");
        assert_eq!(normalize_path("//api//login"), "/api/login");
        assert_eq!(normalize_path("/x/../api/./login"), "/api/login");
        assert_eq!(normalize_path("/../../api"), "/api");
        assert_eq!(normalize_path("/api/"), "/api/");
        assert_eq!(normalize_path("/a%2Fb"), "/a%2Fb");
        assert_eq!(normalize_path("/bad%zz%"), "/bad%zz%");
        assert_eq!(normalize_path("/é/%C3%A9"), "/é/%C3%A9");
    }

    #[test]
    fn plain_paths_have_one_reading() {
        assert_eq!(readings("/api/login"), ["/api/login"]);
        assert_eq!(readings("/api/v1.2/log-in_~x"), ["/api/v1.2/log-in_~x"]);
        // An escaped unreserved character is read both ways: an upstream
        // that decodes nothing would not see `/api`.
        assert_eq!(readings("/%61pi"), ["/api", "/%61pi"]);
    }

    #[test]
    fn ambiguous_spellings_get_every_reading() {
        let has = |raw: &str, want: &str| {
            let all = readings(raw);
            assert!(all.iter().any(|r| r == want), "{raw}: {all:?} lacks {want}");
        };
        has("/x%2F..%2Fapi", "/x%2F..%2Fapi");
        has("/x%2F..%2Fapi", "/api");
        has("/x%5C..%5Capi", "/api");
        has("/x\\..\\api", "/api");
        has("/;x/api", "/api");
        has("/x/..;/api", "/api");
        has("/%2561pi", "/%61pi");
        has("/%2561pi", "/api");
        has("/api;jsessionid=1", "/api");
        // nginx: escapes decoded, dots resolved, parameters kept.
        has("/b%2F..%2Fapi/..;", "/api/..;");
        // A server that routes on dot segments as they are.
        has("/api/../admin", "/api/../admin");
    }

    #[test]
    fn prefixes_fold_case_unless_asked_not_to() {
        assert!(has_prefix("/API/x", "/api", false));
        assert!(!has_prefix("/API/x", "/api", true));
        assert!(!has_prefix("/ap", "/api", false));
    }
}
