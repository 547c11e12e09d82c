//! What goes wrong with a configuration file, and where: [`ConfigError`],
//! the one line an operator reads; [`Invalid`], what a section's check
//! returns before the file name is known; and finding the dotted key and
//! line of a TOML parse error, which knows only a byte span. Apart from the
//! sections because every one of them uses it.

/// A configuration problem, rendered as one line for operators.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    /// The file that was read.
    pub file: String,
    /// The key (dotted path) at fault, or `-` when the whole file is.
    pub key: String,
    /// What is wrong and, where it helps, how to fix it.
    pub message: String,
}

impl ConfigError {
    /// A TOML or serde error in `text`, named by the key at its span (serde
    /// itself knows only the byte offsets).
    pub(super) fn from_toml(file: &str, text: &str, e: &toml::de::Error) -> ConfigError {
        let (key, line) = e
            .span()
            .map(|span| locate(text, span.start))
            .unwrap_or_else(|| ("-".into(), 0));
        let message = e.message().replace('\n', " ");
        let message = if line > 0 {
            format!("{message} (line {line})")
        } else {
            message
        };
        ConfigError {
            file: file.to_string(),
            key,
            message,
        }
    }
}

/// One problem found by validation: the dotted key at fault and what is
/// wrong. The checks do not know the file's name; [`Invalid::in_file`] adds
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invalid {
    /// The dotted key at fault (`ban.after`, `rules[3].rate`).
    pub(crate) key: String,
    /// What is wrong and, where it helps, how to fix it.
    pub(crate) message: String,
}

impl Invalid {
    /// The problem `message` at `key`.
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The same problem with `prefix` put before its key: a check of one
    /// entry names keys below the entry (`.rate`, or `""` for the entry as a
    /// whole), its caller says which entry (`rules[3]`).
    pub(crate) fn under(self, prefix: &str) -> Invalid {
        Invalid {
            key: format!("{prefix}{}", self.key),
            message: self.message,
        }
    }

    /// The operator's error for this problem in `file`.
    pub(crate) fn in_file(self, file: &str) -> ConfigError {
        ConfigError {
            file: file.to_string(),
            key: self.key,
            message: self.message,
        }
    }
}

/// Finds the dotted key and the 1-based line at byte `offset` of a TOML
/// text, so a serde error (which knows only a span) names its key.
fn locate(text: &str, offset: usize) -> (String, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_no = before.matches('\n').count() + 1;
    let mut section = String::new();
    for l in before.lines() {
        let t = l.trim();
        if t.starts_with('[') {
            section = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
    }
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    let key = if line.starts_with('[') {
        line.trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string()
    } else {
        let k = line.split('=').next().unwrap_or("").trim();
        match (section.is_empty(), k.is_empty()) {
            (true, true) => "-".to_string(),
            (true, false) => k.to_string(),
            (false, true) => section,
            (false, false) => format!("{section}.{k}"),
        }
    };
    (key, line_no)
}

#[cfg(test)]
mod tests {
    use super::Invalid;
    use crate::config::test_util::parse;

    #[test]
    fn unknown_key_names_section_and_key() {
        let e = parse("[server]\nlisten = \"0.0.0.0:1\"\nbogus = 1\n").unwrap_err();
        assert_eq!(e.key, "server.bogus");
        assert!(
            e.to_string()
                .starts_with("t.toml: server.bogus: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn bad_duration_names_key() {
        let e = parse("[redis]\nurl = \"redis://x\"\ntimeout = \"fast\"\n").unwrap_err();
        assert_eq!(e.key, "redis.timeout");
    }

    #[test]
    fn under_prefixes_the_key() {
        let e = Invalid::new(".rate", "m").under("rules[3]");
        assert_eq!(e, Invalid::new("rules[3].rate", "m"));
        assert_eq!(Invalid::new("", "m").under("rules[0]").key, "rules[0]");
    }
}
