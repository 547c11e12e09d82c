//! The access log (`server.access_log`): one JSON line per public request,
//! written by a thread of its own so that the request path never waits on
//! a disk.
//!
//! A request hands its finished line to a bounded channel and goes on; the
//! writer thread drains the channel, writes through a buffer and flushes
//! whenever the channel is empty. When the writer falls behind and the
//! channel is full, lines are dropped, never waited for: each one is
//! counted in `floodgate_access_log_dropped_total`, and a spell of drops is
//! announced by one warning when it starts and one line when it ends.
//! A reload (`SIGHUP`) reopens the file, which is how a rotated log is let
//! go of.
//!
//! The line is written when the response ends (its last byte sent, or the
//! client gone), so it carries the bytes sent and the duration, but its
//! `time` is when the request arrived: what `floodgate replay` decides it
//! at. Header values that key a rule or a consumer are logged only as their
//! SHA-256: API keys never reach the log.
//!
//! The field names are [`field`]; the replay's JSON reader defaults to them.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::http::header::HeaderName;
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use serde::Serialize;

use crate::consumers::{key_hash, Plans};
use crate::metrics::ACCESS_LOG_DROPPED;
use crate::policy::KeyKind;
use crate::rules::RuleSet;

/// The names of the fields of a line, in one place: the writer's and the
/// replay reader's defaults.
pub(crate) mod field {
    pub(crate) const TIME: &str = "time";
    pub(crate) const CLIENT: &str = "client";
    pub(crate) const METHOD: &str = "method";
    pub(crate) const HOST: &str = "host";
    pub(crate) const PATH: &str = "path";
    pub(crate) const DECISION: &str = "decision";
    pub(crate) const DURATION_MS: &str = "duration_ms";
    pub(crate) const KEYS: &str = "keys";
}

/// Lines waiting for the writer at most; past that they are dropped.
const QUEUE: usize = 16 * 1024;
/// How long the writer waits for a line before it flushes anyway and looks
/// for a reopen request.
const IDLE: Duration = Duration::from_millis(250);

/// What the gateway did with a request, as the log names it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Let through: every matching rule allowed it, or none matched.
    #[default]
    Allowed,
    /// Refused by this rule (429).
    Limited(Arc<str>),
    /// Refused for a ban (`ban.status`).
    Banned,
    /// Forwarded without limits: the client is allowlisted.
    Allowlisted,
    /// Refused because Redis is unavailable and `on_failure = "deny"`.
    Unavailable,
    /// Answered before any limit applied (header limits, a key header too
    /// long, a path whose readings disagree): never charged.
    Rejected,
}

impl Verdict {
    /// The `decision` field's value.
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Limited(_) => "limited",
            Verdict::Banned => "banned",
            Verdict::Allowlisted => "allowlisted",
            Verdict::Unavailable => "unavailable",
            Verdict::Rejected => "rejected",
        }
    }
}

/// One request's line as it is gathered: what arrived, then who asked and
/// what was decided.
pub(crate) struct Entry {
    started: Instant,
    time: SystemTime,
    method: String,
    host: String,
    target: String,
    client: Option<IpAddr>,
    verdict: Verdict,
    /// (header, SHA-256 of its value) for every key header the request has.
    keys: BTreeMap<String, String>,
}

impl Entry {
    /// Starts the line of `req`, as it arrived.
    pub(crate) fn begin(req: &HttpRequest) -> Entry {
        Entry {
            started: Instant::now(),
            time: SystemTime::now(),
            method: req.method().as_str().to_string(),
            host: crate::rules::RequestParts::host(req)
                .unwrap_or("")
                .to_string(),
            target: req
                .uri()
                .path_and_query()
                .map_or_else(|| req.path().to_string(), |p| p.as_str().to_string()),
            client: None,
            verdict: Verdict::Rejected,
            keys: BTreeMap::new(),
        }
    }

    /// Who is asking (after trusted `X-Forwarded-For`), and the hashes of
    /// the headers that key one of `rules` or the consumers of `plans`.
    pub(crate) fn identified(
        &mut self,
        client: IpAddr,
        req: &HttpRequest,
        rules: &RuleSet,
        plans: Option<&Plans>,
    ) {
        self.client = Some(client);
        let rule_headers = rules.rules().iter().filter_map(|r| match &r.key {
            KeyKind::Header(h) => Some(h),
            _ => None,
        });
        let consumer = plans.and_then(|p| p.header());
        for name in rule_headers.chain(consumer) {
            self.hash_header(req, name);
        }
    }

    fn hash_header(&mut self, req: &HttpRequest, name: &HeaderName) {
        if self.keys.contains_key(name.as_str()) {
            return;
        }
        if let Some(v) = req.headers().get(name) {
            self.keys
                .insert(name.as_str().to_string(), key_hash(v.as_bytes()));
        }
    }

    /// What was decided.
    pub(crate) fn decided(&mut self, verdict: Verdict) {
        self.verdict = verdict;
    }
}

/// A line as written.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    client: Option<String>,
    method: &'a str,
    host: &'a str,
    path: &'a str,
    status: u16,
    decision: &'static str,
    rule: Option<&'a str>,
    bytes: u64,
    duration_ms: f64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    keys: &'a BTreeMap<String, String>,
}

impl Entry {
    fn render(&self, status: u16, bytes: u64) -> String {
        let rule = match &self.verdict {
            Verdict::Limited(r) => Some(&**r),
            _ => None,
        };
        let line = Line {
            time: humantime::format_rfc3339_millis(self.time).to_string(),
            client: self.client.map(|c| c.to_string()),
            method: &self.method,
            host: &self.host,
            path: &self.target,
            status,
            decision: self.verdict.as_str(),
            rule,
            bytes,
            // Whole microseconds, in milliseconds.
            duration_ms: self.started.elapsed().as_micros() as f64 / 1000.0,
            keys: &self.keys,
        };
        let mut text = serde_json::to_string(&line).unwrap_or_default();
        text.push('\n');
        text
    }
}

/// The gateway's handle on the access log: requests send their lines here.
pub(crate) struct AccessLog {
    lines: SyncSender<String>,
    shared: Arc<Shared>,
}

/// What the request side and the writer thread share.
struct Shared {
    /// Set by a reload; the writer reopens its file when it sees it.
    reopen: AtomicBool,
    /// True during a spell of dropped lines.
    dropping: AtomicBool,
    dropped_in_spell: AtomicU64,
}

/// Where lines go.
enum Sink {
    File { path: PathBuf, out: BufWriter<File> },
    Stdout(BufWriter<std::io::Stdout>),
}

impl Sink {
    fn open(target: &Target) -> std::io::Result<Sink> {
        Ok(match target {
            Target::Stdout => Sink::Stdout(BufWriter::new(std::io::stdout())),
            Target::File(path) => Sink::File {
                path: path.clone(),
                out: BufWriter::new(append(path)?),
            },
        })
    }

    fn out(&mut self) -> &mut dyn Write {
        match self {
            Sink::File { out, .. } => out,
            Sink::Stdout(out) => out,
        }
    }

    /// Opens the file again by its name (a rotated file is let go of).
    fn reopen(&mut self) {
        let Sink::File { path, out } = self else {
            return;
        };
        let _ = out.flush();
        match append(path) {
            Ok(f) => *out = BufWriter::new(f),
            Err(e) => log::error!(
                "cannot reopen the access log {} ({e}); still writing to the file opened before",
                path.display()
            ),
        }
    }
}

fn append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// `server.access_log`, resolved: standard output, or a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Stdout,
    File(PathBuf),
}

impl Target {
    /// `setting` (`"-"` or a path; a relative one is taken from the config
    /// file's directory, like the TLS files).
    pub(crate) fn resolve(config_path: &Path, setting: &str) -> Target {
        if setting == "-" {
            return Target::Stdout;
        }
        let path = Path::new(setting);
        match config_path.parent() {
            Some(dir) if path.is_relative() => Target::File(dir.join(path)),
            _ => Target::File(path.to_path_buf()),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Stdout => f.write_str("standard output"),
            Target::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl AccessLog {
    /// Opens `target` and starts the writer thread; an error names the file.
    pub(crate) fn start(target: &Target) -> std::io::Result<AccessLog> {
        let sink = Sink::open(target).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot open the access log {target} (server.access_log): {e}"),
            )
        })?;
        let (lines, rx) = sync_channel(QUEUE);
        let shared = Arc::new(Shared {
            reopen: AtomicBool::new(false),
            dropping: AtomicBool::new(false),
            dropped_in_spell: AtomicU64::new(0),
        });
        let for_writer = shared.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, sink, &for_writer))?;
        Ok(AccessLog { lines, shared })
    }

    /// Asks the writer to reopen its file (a reload, after a rotation).
    pub(crate) fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
    }

    /// Queues a line; drops it (counted) when the writer is behind.
    fn send(&self, line: String) {
        match self.lines.try_send(line) {
            Ok(()) => {
                if self.shared.dropping.load(Ordering::Relaxed)
                    && self.shared.dropping.swap(false, Ordering::AcqRel)
                {
                    let n = self.shared.dropped_in_spell.swap(0, Ordering::AcqRel);
                    log::info!(
                        "access log: writing again; {n} lines were dropped while it was behind"
                    );
                }
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics::counter!(ACCESS_LOG_DROPPED).increment(1);
                self.shared.dropped_in_spell.fetch_add(1, Ordering::AcqRel);
                if !self.shared.dropping.swap(true, Ordering::AcqRel) {
                    log::warn!(
                        "access log: the writer is behind; dropping lines until it catches up (counted in {ACCESS_LOG_DROPPED})"
                    );
                }
            }
        }
    }

    /// `resp`, whose line is written when its body ends or is dropped.
    pub(crate) fn finish(self: &Arc<Self>, entry: Entry, resp: HttpResponse) -> HttpResponse {
        let status = resp.status().as_u16();
        let log = self.clone();
        resp.map_body(move |_, body| {
            BoxBody::new(LoggedBody {
                inner: body,
                bytes: 0,
                pending: Some((entry, status, log)),
            })
        })
    }
}

/// The writer thread: lines to the sink, a flush whenever none wait.
fn write_lines(rx: Receiver<String>, mut sink: Sink, shared: &Shared) {
    loop {
        match rx.recv_timeout(IDLE) {
            Ok(line) => {
                let _ = sink.out().write_all(line.as_bytes());
                while let Ok(line) = rx.try_recv() {
                    let _ = sink.out().write_all(line.as_bytes());
                }
                let _ = sink.out().flush();
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let _ = sink.out().flush();
                return;
            }
        }
        if shared.reopen.swap(false, Ordering::AcqRel) {
            sink.reopen();
        }
    }
}

/// A response body that counts the bytes it sends and writes the request's
/// line when it ends or is dropped.
struct LoggedBody {
    inner: BoxBody,
    bytes: u64,
    pending: Option<(Entry, u16, Arc<AccessLog>)>,
}

impl MessageBody for LoggedBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        let next = Pin::new(&mut this.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &next {
            this.bytes += chunk.len() as u64;
        }
        next
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some((entry, status, log)) = self.pending.take() {
            log.send(entry.render(status, self.bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_the_request_and_hashes_its_keys() {
        let req = actix_web::test::TestRequest::get()
            .uri("/v1/items?page=2")
            .insert_header(("host", "api.example.com"))
            .to_http_request();
        let mut e = Entry::begin(&req);
        e.client = Some("203.0.113.7".parse().expect("an address"));
        e.keys.insert("x-api-key".into(), key_hash(b"k-1"));
        e.decided(Verdict::Limited(Arc::from("per-key")));
        let line = e.render(429, 120);
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(v[field::PATH], "/v1/items?page=2");
        assert_eq!(v[field::HOST], "api.example.com");
        assert_eq!(v[field::CLIENT], "203.0.113.7");
        assert_eq!(v[field::METHOD], "GET");
        assert_eq!(v[field::DECISION], "limited");
        assert_eq!(v["rule"], "per-key");
        assert_eq!(v["status"], 429);
        assert_eq!(v["bytes"], 120);
        assert_eq!(v[field::KEYS]["x-api-key"], key_hash(b"k-1"));
        assert!(!line.contains("k-1\""), "the key itself is never written");
        let time = v[field::TIME].as_str().expect("a time");
        assert!(time.ends_with('Z') && time.len() == 24, "{time}");
    }

    #[test]
    fn lines_past_a_full_queue_are_dropped_and_the_spell_ends_when_one_fits() {
        let (lines, rx) = sync_channel(2);
        let log = AccessLog {
            lines,
            shared: Arc::new(Shared {
                reopen: AtomicBool::new(false),
                dropping: AtomicBool::new(false),
                dropped_in_spell: AtomicU64::new(0),
            }),
        };
        for i in 0..5 {
            log.send(format!("{i}\n"));
        }
        assert!(
            log.shared.dropping.load(Ordering::Acquire),
            "a spell of drops"
        );
        assert_eq!(log.shared.dropped_in_spell.load(Ordering::Acquire), 3);
        assert_eq!(
            rx.try_recv().as_deref(),
            Ok("0\n"),
            "never blocks, keeps the oldest"
        );
        log.send("5\n".into());
        assert!(
            !log.shared.dropping.load(Ordering::Acquire),
            "the spell is over"
        );
        assert_eq!(log.shared.dropped_in_spell.load(Ordering::Acquire), 0);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), ["1\n", "5\n"]);
    }

    #[test]
    fn relative_paths_are_read_from_the_config_directory() {
        let cfg = Path::new("/etc/floodgate/floodgate.toml");
        assert_eq!(Target::resolve(cfg, "-"), Target::Stdout);
        assert_eq!(
            Target::resolve(cfg, "access.log"),
            Target::File(PathBuf::from("/etc/floodgate/access.log"))
        );
        assert_eq!(
            Target::resolve(cfg, "/var/log/fg.log"),
            Target::File(PathBuf::from("/var/log/fg.log"))
        );
    }
}
