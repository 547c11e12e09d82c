//! How the admin CLI prints: aligned tables for people, the API's JSON for
//! scripts. `floodgate replay` prints its tables the same way.
//!
//! Values shown here come from the network and partly from clients (a ban
//! reason, a header-keyed subject), so every cell goes through
//! [`printable`]: control characters are escaped and cannot move the
//! cursor, recolour or retitle the operator's terminal.

use std::time::Duration;

use comfy_table::{presets, Table};
use serde_json::Value;

/// A table with a header row and no borders, columns aligned.
pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t.set_header(header.iter().map(|h| h.to_string()));
    for row in rows {
        t.add_row(row.into_iter().map(|c| printable(&c)));
    }
    trim_lines(&t.to_string())
}

/// Name/value lines, the names aligned.
pub(crate) fn pairs(rows: Vec<(&str, String)>) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), printable(&v)]);
    }
    trim_lines(&t.to_string())
}

/// The preset pads every cell by one space; drop the margin it leaves.
fn trim_lines(s: &str) -> String {
    s.lines()
        .map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `s` with control characters escaped (`\u{1b}`), everything else as is.
pub(crate) fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Whole seconds as "9m 58s".
pub(super) fn seconds(n: u64) -> String {
    humantime::format_duration(Duration::from_secs(n)).to_string()
}

/// A JSON field as a cell: strings bare, numbers as written, null empty,
/// anything else as compact JSON.
pub(super) fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v @ Value::Array(items)) => {
            if items.iter().all(|i| !i.is_object() && !i.is_array()) {
                items
                    .iter()
                    .map(|i| cell(Some(i)))
                    .collect::<Vec<_>>()
                    .join(", ")
            } else {
                v.to_string()
            }
        }
        Some(v) => v.to_string(),
    }
}

/// Any JSON answer for people, when its shape is not fixed here (the
/// consumer and reload endpoints): an object's plain fields as name/value
/// lines, each list of objects as a table under its name.
pub(super) fn generic(v: &Value) -> String {
    let Value::Object(map) = v else {
        return printable(&cell(Some(v)));
    };
    let mut out = Vec::new();
    let plain: Vec<(&str, String)> = map
        .iter()
        .filter(|(_, v)| !is_table(v))
        .map(|(k, v)| (k.as_str(), cell(Some(v))))
        .collect();
    if !plain.is_empty() {
        out.push(pairs(plain));
    }
    for (k, v) in map.iter().filter(|(_, v)| is_table(v)) {
        let rows = v.as_array().map(Vec::as_slice).unwrap_or(&[]);
        let mut columns: Vec<&str> = Vec::new();
        for row in rows {
            for key in row.as_object().into_iter().flat_map(|o| o.keys()) {
                if !columns.contains(&key.as_str()) {
                    columns.push(key);
                }
            }
        }
        let body = rows
            .iter()
            .map(|r| columns.iter().map(|c| cell(r.get(*c))).collect())
            .collect();
        out.push(format!("\n{}:\n{}", printable(k), table(&columns, body)));
    }
    out.join("\n")
}

fn is_table(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_object))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn control_characters_cannot_reach_the_terminal() {
        let shown = printable("rule\u{1b}[2J\r\nx");
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.contains("\\u{1b}[2J"), "{shown}");
        assert_eq!(printable("<script>é"), "<script>é");
    }

    #[test]
    fn tables_align_their_columns() {
        let t = table(
            &["SUBJECT", "REASON"],
            vec![
                vec!["203.0.113.7".into(), "rule per-ip".into()],
                vec!["10.0.0.0/8".into(), "x".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        let col = lines[0].find("REASON").unwrap();
        assert_eq!(lines[1].find("rule"), Some(col), "{t}");
        assert_eq!(lines[2].find('x'), Some(col), "{t}");
    }

    #[test]
    fn unknown_shapes_print_fields_then_tables() {
        let v = json!({"plan": "pro", "rules": [{"name": "pro-rate", "tokens": 3}, {"name": "pro-daily", "used": 7}]});
        let s = generic(&v);
        assert!(s.starts_with("plan  pro"), "{s}");
        assert!(s.contains("rules:"), "{s}");
        assert!(
            s.contains("name") && s.contains("tokens") && s.contains("used"),
            "{s}"
        );
        assert!(s.contains("pro-daily"), "{s}");
    }

    #[test]
    fn seconds_read_like_durations() {
        assert_eq!(seconds(598), "9m 58s");
        assert_eq!(seconds(0), "0s");
    }
}
