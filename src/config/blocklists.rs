//! `[[blocklists]]`: files of addresses and networks whose clients get the
//! ban answer. Apart from `[ban]` because a list is the operator's (or a
//! feed's) word, not the gateway's verdict: it has its own file, status and
//! refresh.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Invalid, DAY};

/// One `[[blocklists]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BlocklistConfig {
    /// The list's file: one address or network per line (relative paths
    /// from the config file's directory).
    pub(crate) path: PathBuf,
    /// Its name in metrics and logs; default: the file's name.
    #[serde(default)]
    pub(crate) name: Option<String>,
    /// The answer's status (429 or 403); default: `ban.status`.
    #[serde(default)]
    pub(crate) status: Option<u16>,
    /// The answer's `Retry-After`: a list has no end time of its own.
    #[serde(default = "default_retry_after", with = "humantime_serde")]
    pub(crate) retry_after: Duration,
    /// How often the file's modification time and size are looked at.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub(crate) poll: Duration,
}

fn default_retry_after() -> Duration {
    Duration::from_secs(3600)
}

fn default_poll() -> Duration {
    Duration::from_secs(5)
}

impl BlocklistConfig {
    /// The name metrics and logs know the list by.
    pub(crate) fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
    }
}

/// Names unique and usable as metric labels, statuses a ban may have,
/// durations within bounds.
pub(super) fn validate(lists: &[BlocklistConfig]) -> Result<(), Invalid> {
    let mut names = HashSet::new();
    for (i, list) in lists.iter().enumerate() {
        let key = |k: &str| format!("blocklists[{i}].{k}");
        if list.path.as_os_str().is_empty() {
            return Err(Invalid::new(key("path"), "must name a file"));
        }
        let name = list.name();
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(Invalid::new(
                key("name"),
                format!("`{name}`: must be 1 to 64 letters, digits, '-', '_' or '.' (set name = \"...\" when the file's name is not)"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(Invalid::new(
                key("name"),
                format!("`{name}` names two lists (set name = \"...\" on one of them)"),
            ));
        }
        if let Some(status) = list.status {
            if status != 429 && status != 403 {
                return Err(Invalid::new(
                    key("status"),
                    format!("must be 429 or 403, got {status}"),
                ));
            }
        }
        for (k, value) in [("retry_after", list.retry_after), ("poll", list.poll)] {
            if value < Duration::from_secs(1) || value > DAY {
                return Err(Invalid::new(key(k), "must be from 1s to 1 day"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::test_util::parse;

    #[test]
    fn a_list_needs_a_path_and_sound_settings() {
        let c = parse("[[blocklists]]\npath = \"drop.txt\"\n").expect("valid");
        assert_eq!(c.blocklists[0].name(), "drop.txt");
        assert_eq!(c.blocklists[0].status, None);
        for (extra, key) in [
            (
                "[[blocklists]]\npath = \"a\"\nstatus = 500\n",
                "blocklists[0].status",
            ),
            ("[[blocklists]]\npath = \"\"\n", "blocklists[0].path"),
            (
                "[[blocklists]]\npath = \"a\"\npoll = \"0s\"\n",
                "blocklists[0].poll",
            ),
            (
                "[[blocklists]]\npath = \"x/a\"\n[[blocklists]]\npath = \"y/a\"\n",
                "blocklists[1].name",
            ),
            ("[[blocklists]]\npath = \"a b\"\n", "blocklists[0].name"),
        ] {
            assert_eq!(parse(extra).unwrap_err().key, key, "{extra}");
        }
        assert!(parse("[[blocklists]]\nfile = \"a\"\n").is_err());
    }
}
