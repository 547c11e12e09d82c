//! How a request path is read for rule matching, so that a limit cannot be
//! spelled around.
//!
//! Upstream frameworks disagree on what a path means. Some decode `%2F` to a
//! slash, or `%5C` and `\` to one; some drop `;params` from each segment
//! (so `/x/..;/api` is `/api`); a few decode twice (`%2561` is `a`); many
//! route without regard to case. The gateway forwards the path exactly as
//! received and cannot know which of these the upstream does, so it reads
//! the path every common way and requires the readings to agree:
//!
//! - the *plain* reading ([`normalize_path`]): escapes of unreserved
//!   characters decoded, repeated slashes merged, `.` and `..` resolved;
//! - the *decoded* reading: every escape decoded once, `\` taken as `/`,
//!   each segment's `;parameters` dropped, then the same clean-up;
//! - the *decoded-twice* reading, only when decoding once left escapes.
//!
//! A path whose readings select different rules is refused with 400 (see
//! `rules::MatchError`); otherwise the readings are equivalent for
//! every rule and the request goes on. Case is folded at comparison time
//! (ASCII, per rule: `match.case_sensitive`). Kept apart from `rules` because
//! it is about paths alone and is tested as such.

use std::borrow::Cow;

/// The plain reading: escapes of unreserved characters (`A-Z a-z 0-9 - . _
/// ~`) decoded, repeated slashes merged, `.` and `..` segments resolved.
/// Other escapes, `\` and `;` are left as they are.
pub fn normalize_path(raw: &str) -> Cow<'_, str> {
    let simple = !raw.contains('%') && !raw.contains("//") && !raw.contains("/.");
    if simple {
        return Cow::Borrowed(raw);
    }
    let decoded = decode(raw.as_bytes(), |c| {
        c.is_ascii_alphanumeric() || b"-._~".contains(&c)
    });
    Cow::Owned(clean_segments(&String::from_utf8_lossy(&decoded), false))
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

/// True if `bytes` still hold a well-formed escape.
fn has_escape(bytes: &[u8]) -> bool {
    bytes
        .windows(3)
        .any(|w| w[0] == b'%' && hex(w[1]).is_some() && hex(w[2]).is_some())
}

/// Merges slashes, resolves `.` and `..` (never above the root) and, with
/// `drop_params`, cuts each segment at its first `;`. The result starts
/// with `/`, and ends with one when the path did.
fn clean_segments(path: &str, drop_params: bool) -> String {
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
            "" | "." => {}
            ".." => {
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
    if cleaned.is_empty() || matches!(last, "" | "." | "..") {
        cleaned.push('/');
    }
    cleaned
}

/// The decoded reading of already-decoded bytes: `\` is `/`, parameters
/// dropped, segments cleaned.
fn lenient(decoded: &[u8]) -> String {
    let text = String::from_utf8_lossy(decoded).replace('\\', "/");
    clean_segments(&text, true)
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
        let mut others = Vec::new();
        if raw.bytes().any(|b| matches!(b, b'%' | b'\\' | b';')) {
            let once = decode(raw.as_bytes(), |_| true);
            let decoded = lenient(&once);
            if decoded != plain {
                others.push(decoded);
            }
            if has_escape(&once) {
                let twice = lenient(&decode(&once, |_| true));
                if twice != plain && !others.contains(&twice) {
                    others.push(twice);
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
    pub(crate) fn starts_with(
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
        assert_eq!(readings("/%61pi"), ["/api"]);
    }

    #[test]
    fn ambiguous_spellings_get_every_reading() {
        assert_eq!(readings("/x%2F..%2Fapi"), ["/x%2F..%2Fapi", "/api"]);
        assert_eq!(readings("/x%5C..%5Capi"), ["/x%5C..%5Capi", "/api"]);
        assert_eq!(readings("/x\\..\\api"), ["/x\\..\\api", "/api"]);
        assert_eq!(readings("/;x/api"), ["/;x/api", "/api"]);
        assert_eq!(readings("/x/..;/api"), ["/x/..;/api", "/api"]);
        assert_eq!(readings("/%2561pi"), ["/%2561pi", "/%61pi", "/api"]);
        assert_eq!(readings("/api;jsessionid=1"), ["/api;jsessionid=1", "/api"]);
    }

    #[test]
    fn prefixes_fold_case_unless_asked_not_to() {
        assert!(has_prefix("/API/x", "/api", false));
        assert!(!has_prefix("/API/x", "/api", true));
        assert!(!has_prefix("/ap", "/api", false));
    }
}
