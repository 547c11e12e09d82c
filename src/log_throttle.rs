//! Log lines that hostile traffic cannot multiply: repeated identical
//! warnings and errors are written once, then as one count per window, and
//! control characters in any message are escaped.
//!
//! It is a `log::Log` wrapper around the formatter (`env_logger`), so every
//! line of the process goes through it: floodgate's own warnings (an
//! unreachable upstream answers each request with a 502) and those of the
//! libraries under it (actix-http logs every malformed request at `error`).
//! A line is "identical" when its call site and its text are the same. The
//! first one is written; the repeats within [`Throttle`]'s window are only
//! counted, and the first repeat after the window is written with that count,
//! so a steady flood costs one line per window and nothing is hidden.
//! `info` and below pass untouched: they are state changes or off by default.
//!
//! Separate from `main` so that any module (and any test) can use
//! [`Throttle`] directly for messages that are not log lines.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// Distinct messages tracked at once; past it, old entries are dropped
/// first and, if all are recent, new messages are written unthrottled.
const MAX_TRACKED: usize = 4096;

/// What to do with one occurrence of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Write it; `repeats` identical ones were suppressed since the last
    /// line written (0 for the first).
    Write { repeats: u64 },
    /// Suppress it (counted for the next line).
    Suppress,
}

struct Seen {
    window_start: Instant,
    suppressed: u64,
}

/// Counts repeats of keyed messages and says which ones to write: the first,
/// then at most one per window, carrying the count of those suppressed.
pub(crate) struct Throttle {
    window_ms: AtomicU64,
    seen: Mutex<HashMap<u64, Seen>>,
}

impl Throttle {
    pub(crate) fn new(window: Duration) -> Throttle {
        Throttle {
            window_ms: AtomicU64::new(window.as_millis() as u64),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Changes the window (read from the configuration after logging
    /// started).
    pub(crate) fn set_window(&self, window: Duration) {
        self.window_ms
            .store(window.as_millis() as u64, Ordering::Relaxed);
    }

    pub(crate) fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms.load(Ordering::Relaxed))
    }

    /// One occurrence of the message `key` at `now`.
    pub(crate) fn admit(&self, key: u64, now: Instant) -> Verdict {
        let window = self.window();
        if window.is_zero() {
            return Verdict::Write { repeats: 0 };
        }
        let Ok(mut seen) = self.seen.lock() else {
            return Verdict::Write { repeats: 0 };
        };
        if let Some(s) = seen.get_mut(&key) {
            if now.duration_since(s.window_start) < window {
                s.suppressed += 1;
                return Verdict::Suppress;
            }
            let repeats = s.suppressed;
            s.window_start = now;
            s.suppressed = 0;
            return Verdict::Write { repeats };
        }
        if seen.len() >= MAX_TRACKED {
            seen.retain(|_, s| now.duration_since(s.window_start) < window);
            if seen.len() >= MAX_TRACKED {
                return Verdict::Write { repeats: 0 };
            }
        }
        seen.insert(
            key,
            Seen {
                window_start: now,
                suppressed: 0,
            },
        );
        Verdict::Write { repeats: 0 }
    }
}

/// The process-wide throttle the logger uses; its window is
/// `server.log_throttle` once the configuration is read.
pub(crate) static LOG: LazyLock<Throttle> =
    LazyLock::new(|| Throttle::new(Duration::from_secs(10)));

/// Makes `inner` (with its level filter `max`) the process logger, behind
/// [`LOG`].
pub fn install<L: log::Log + 'static>(
    inner: L,
    max: log::LevelFilter,
) -> Result<(), log::SetLoggerError> {
    log::set_boxed_logger(Box::new(ThrottledLogger::new(inner, &LOG)))?;
    log::set_max_level(max);
    Ok(())
}

/// Escapes control characters (a newline in a client-chosen reason or path
/// must not forge a second log line).
pub(crate) fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The process logger: `inner` writes, this decides what reaches it.
pub(crate) struct ThrottledLogger<L> {
    inner: L,
    throttle: &'static Throttle,
}

impl<L: log::Log> ThrottledLogger<L> {
    pub(crate) fn new(inner: L, throttle: &'static Throttle) -> ThrottledLogger<L> {
        ThrottledLogger { inner, throttle }
    }
}

impl<L: log::Log> log::Log for ThrottledLogger<L> {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        let mut text = String::new();
        let _ = write!(text, "{}", record.args());
        let mut text = escape_controls(&text).into_owned();
        if record.level() <= log::Level::Warn {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            record.target().hash(&mut h);
            record.line().hash(&mut h);
            text.hash(&mut h);
            match self.throttle.admit(h.finish(), Instant::now()) {
                Verdict::Suppress => return,
                Verdict::Write { repeats: 0 } => {}
                Verdict::Write { repeats } => {
                    let _ = write!(
                        text,
                        " ({repeats} more like this in the last {})",
                        humantime::format_duration(self.throttle.window())
                    );
                }
            }
        }
        self.inner.log(
            &log::Record::builder()
                .args(format_args!("{text}"))
                .level(record.level())
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_is_written_repeats_are_counted_once_per_window() {
        let t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.admit(1, t0), Verdict::Write { repeats: 0 });
        for i in 1..=5 {
            assert_eq!(t.admit(1, t0 + Duration::from_secs(i)), Verdict::Suppress);
        }
        assert_eq!(
            t.admit(2, t0 + Duration::from_secs(1)),
            Verdict::Write { repeats: 0 },
            "another message is not held back"
        );
        assert_eq!(
            t.admit(1, t0 + Duration::from_secs(11)),
            Verdict::Write { repeats: 5 }
        );
        assert_eq!(t.admit(1, t0 + Duration::from_secs(12)), Verdict::Suppress);
    }

    #[test]
    fn a_zero_window_writes_everything() {
        let t = Throttle::new(Duration::ZERO);
        let now = Instant::now();
        assert_eq!(t.admit(1, now), Verdict::Write { repeats: 0 });
        assert_eq!(t.admit(1, now), Verdict::Write { repeats: 0 });
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_controls("plain"), "plain");
        assert_eq!(escape_controls("a\nb\u{1b}[31mc\r"), "a\\nb\\u{1b}[31mc\\r");
    }
}
