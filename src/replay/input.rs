//! The logs as one timeline: each file read line by line, the files merged
//! by time (logs of several nodes interleave), and lines written a little
//! out of order put back in order.
//!
//! Order: lines wait in a buffer until the newest time read is `reorder`
//! past theirs, and leave it oldest first (ties in the order read), so a
//! line up to `reorder` late takes its place. A line later than that is
//! decided at the time of the line before it (time never runs backwards
//! for the store) and counted. The buffer holds `reorder`'s worth of
//! traffic at most, whatever the length of the logs.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};

use super::parse::{self, Format, JsonFields};
use super::record::Record;

/// Malformed lines quoted in the report at most (all are counted).
const QUOTED: usize = 5;

/// A line that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Malformed {
    pub(crate) file: String,
    pub(crate) line: u64,
    pub(crate) error: String,
}

/// What reading the logs met, for the report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct InputStats {
    pub(crate) lines: u64,
    pub(crate) blank: u64,
    pub(crate) malformed: u64,
    /// The first few malformed lines.
    pub(crate) first_malformed: Vec<Malformed>,
    /// Lines recorded as answered before any limit (never charged).
    pub(crate) rejected: u64,
    /// Lines later than the reorder window, decided at the time before.
    pub(crate) late: u64,
    /// The largest step back in time among them (ms).
    pub(crate) latest_by_ms: u64,
    /// Read errors that ended a file early.
    pub(crate) read_errors: Vec<String>,
    pub(crate) first_us: Option<u64>,
    pub(crate) last_us: Option<u64>,
}

impl InputStats {
    fn malformed(&mut self, file: &str, line: u64, error: String) {
        self.malformed += 1;
        if self.first_malformed.len() < QUOTED {
            self.first_malformed.push(Malformed {
                file: file.to_string(),
                line,
                error,
            });
        }
    }
}

/// One log file (or standard input), read line by line.
pub(crate) struct LogFile {
    name: String,
    reader: Box<dyn BufRead>,
    format: Format,
    line_no: u64,
    buf: Vec<u8>,
    done: bool,
}

impl LogFile {
    /// Opens `name` (`-`: standard input); an error says why it cannot be
    /// read.
    pub(crate) fn open(name: &str, format: Format) -> Result<LogFile, String> {
        let reader: Box<dyn BufRead> = if name == "-" {
            Box::new(BufReader::with_capacity(1 << 16, std::io::stdin()))
        } else {
            let f = File::open(name).map_err(|e| format!("cannot read the log {name}: {e}"))?;
            if f.metadata().is_ok_and(|m| m.is_dir()) {
                return Err(format!("cannot read the log {name}: it is a directory"));
            }
            Box::new(BufReader::with_capacity(1 << 16, f))
        };
        Ok(LogFile::from_reader(name, reader, format))
    }

    pub(crate) fn from_reader(name: &str, reader: Box<dyn BufRead>, format: Format) -> LogFile {
        LogFile {
            name: name.to_string(),
            reader,
            format,
            line_no: 0,
            buf: Vec::with_capacity(1024),
            done: false,
        }
    }

    /// The next request of the file, skipping (and counting) what is not
    /// one; `None` at its end.
    fn next_record(&mut self, fields: &JsonFields, stats: &mut InputStats) -> Option<Record> {
        while !self.done {
            self.buf.clear();
            // Lines are capped at 1 MiB: a file with no newline cannot take
            // the memory.
            let read = (&mut self.reader)
                .take(1 << 20)
                .read_until(b'\n', &mut self.buf);
            match read {
                Ok(0) => self.done = true,
                Ok(_) => {
                    self.line_no += 1;
                    stats.lines += 1;
                    if let Some(r) = self.parse_line(fields, stats) {
                        return Some(r);
                    }
                }
                Err(e) => {
                    stats.read_errors.push(format!(
                        "{}: stopped at line {}: {e}",
                        self.name, self.line_no
                    ));
                    self.done = true;
                }
            }
        }
        None
    }

    fn parse_line(&mut self, fields: &JsonFields, stats: &mut InputStats) -> Option<Record> {
        if self.buf.len() >= 1 << 20 && !self.buf.ends_with(b"\n") {
            // The rest of an over-long line is skipped with it.
            let mut rest = Vec::new();
            let _ = self.reader.read_until(b'\n', &mut rest);
            stats.malformed(&self.name, self.line_no, "longer than 1 MiB".into());
            return None;
        }
        // Valid UTF-8 is checked at once; only a line with bad bytes is
        // copied (with U+FFFD in their place).
        let text = match std::str::from_utf8(&self.buf) {
            Ok(t) => std::borrow::Cow::Borrowed(t),
            Err(_) => String::from_utf8_lossy(&self.buf),
        };
        let line = text.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            stats.blank += 1;
            return None;
        }
        if self.format == Format::Auto {
            self.format = if line.trim_start().starts_with('{') {
                Format::Json
            } else {
                Format::Combined
            };
        }
        let parsed = match self.format {
            Format::Json => parse::json(line, fields),
            _ => parse::combined(line),
        };
        match parsed {
            Ok(r) if r.rejected => {
                stats.rejected += 1;
                None
            }
            Ok(r) => Some(r),
            Err(e) => {
                stats.malformed(&self.name, self.line_no, e);
                None
            }
        }
    }
}

/// A record waiting in the reorder buffer, oldest first, then in the order
/// read.
struct Waiting {
    time_us: u64,
    seq: u64,
    /// Boxed: the heap moves its entries at every push and pop.
    record: Box<Record>,
}

impl PartialEq for Waiting {
    fn eq(&self, o: &Self) -> bool {
        (self.time_us, self.seq) == (o.time_us, o.seq)
    }
}
impl Eq for Waiting {}
impl PartialOrd for Waiting {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Waiting {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.time_us, self.seq).cmp(&(o.time_us, o.seq))
    }
}

/// Every file's requests as one stream in time order.
pub(crate) struct Timeline {
    files: Vec<(LogFile, Option<Record>)>,
    fields: JsonFields,
    waiting: BinaryHeap<Reverse<Waiting>>,
    reorder_us: u64,
    newest_us: u64,
    last_out_us: Option<u64>,
    seq: u64,
    pub(crate) stats: InputStats,
}

impl Timeline {
    pub(crate) fn new(files: Vec<LogFile>, fields: JsonFields, reorder_us: u64) -> Timeline {
        Timeline {
            files: files.into_iter().map(|f| (f, None)).collect(),
            fields,
            waiting: BinaryHeap::new(),
            reorder_us,
            newest_us: 0,
            last_out_us: None,
            seq: 0,
            stats: InputStats::default(),
        }
    }

    /// The file whose next record is the oldest, after topping up every
    /// file's next record; `None` when every file is read.
    fn oldest_file(&mut self) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for (i, (file, head)) in self.files.iter_mut().enumerate() {
            if head.is_none() {
                *head = file.next_record(&self.fields, &mut self.stats);
            }
            if let Some(r) = head {
                if best.is_none_or(|(t, _)| r.time_us < t) {
                    best = Some((r.time_us, i));
                }
            }
        }
        best.map(|(_, i)| i)
    }

    /// The next request in time order, its time never before the one
    /// before it.
    pub(crate) fn next_record(&mut self) -> Option<Record> {
        loop {
            let ripe = self.waiting.peek().is_some_and(|Reverse(w)| {
                w.time_us.saturating_add(self.reorder_us) <= self.newest_us
            });
            if !ripe {
                if let Some(i) = self.oldest_file() {
                    if let Some(record) = self.files[i].1.take() {
                        self.newest_us = self.newest_us.max(record.time_us);
                        self.seq += 1;
                        self.waiting.push(Reverse(Waiting {
                            time_us: record.time_us,
                            seq: self.seq,
                            record: Box::new(record),
                        }));
                    }
                    continue;
                }
            }
            let Reverse(w) = self.waiting.pop()?;
            let mut record = *w.record;
            if let Some(last) = self.last_out_us {
                if record.time_us < last {
                    self.stats.late += 1;
                    self.stats.latest_by_ms =
                        self.stats.latest_by_ms.max((last - record.time_us) / 1000);
                    record.time_us = last;
                }
            }
            self.last_out_us = Some(record.time_us);
            self.stats.first_us.get_or_insert(record.time_us);
            self.stats.last_us = Some(record.time_us);
            return Some(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(t: &str, ip: &str) -> String {
        format!("{{\"time\":\"2026-05-01T12:00:{t}Z\",\"client\":\"{ip}\",\"method\":\"GET\",\"path\":\"/\"}}\n")
    }

    fn file(name: &str, text: String) -> LogFile {
        LogFile::from_reader(
            name,
            Box::new(std::io::Cursor::new(text.into_bytes())),
            Format::Auto,
        )
    }

    fn drain(mut t: Timeline) -> (Vec<(u64, String)>, InputStats) {
        let mut out = Vec::new();
        let base = crate::replay::time::rfc3339("2026-05-01T12:00:00Z").expect("a time");
        while let Some(r) = t.next_record() {
            out.push(((r.time_us - base) / 1000, r.client.to_string()));
        }
        (out, t.stats)
    }

    #[test]
    fn lines_a_little_out_of_order_are_put_back_in_order() {
        let text = [
            line("00.000", "10.0.0.1"),
            line("00.500", "10.0.0.2"),
            line("00.200", "10.0.0.3"),
            line("03.000", "10.0.0.4"),
            line("00.100", "10.0.0.5"),
        ]
        .concat();
        let (out, stats) = drain(Timeline::new(
            vec![file("a", text)],
            JsonFields::default(),
            1_000_000,
        ));
        let ips: Vec<&str> = out.iter().map(|(_, ip)| ip.as_str()).collect();
        // 0.2 s late within a 1 s window: back in its place. The 0.1 s line
        // comes after one at 3 s, past the window: it is decided at once,
        // at the time of the line before it (0.5 s).
        assert_eq!(
            ips,
            ["10.0.0.1", "10.0.0.3", "10.0.0.2", "10.0.0.5", "10.0.0.4"]
        );
        assert_eq!(out[3].0, 500);
        assert_eq!((stats.late, stats.latest_by_ms), (1, 400));
    }

    #[test]
    fn files_are_merged_by_time_and_ties_keep_their_order() {
        let a = [line("00.000", "10.0.0.1"), line("02.000", "10.0.0.1")].concat();
        let b = [line("01.000", "10.0.0.2"), line("02.000", "10.0.0.2")].concat();
        let (out, stats) = drain(Timeline::new(
            vec![file("a", a), file("b", b)],
            JsonFields::default(),
            0,
        ));
        assert_eq!(
            out,
            vec![
                (0, "10.0.0.1".into()),
                (1000, "10.0.0.2".into()),
                (2000, "10.0.0.1".into()),
                (2000, "10.0.0.2".into()),
            ]
        );
        assert_eq!(stats.late, 0);
    }

    #[test]
    fn malformed_lines_are_counted_with_their_line_numbers() {
        let text = format!(
            "{}not json\n\n{}{{\"time\":\"2026-05-01T12:00:09Z\",\"client\":\"10.0.0.9\",\"method\":\"GET\",\"path\":\"/\",\"decision\":\"rejected\"}}\n",
            line("00.000", "10.0.0.1"),
            line("01.000", "10.0.0.2")
        );
        let (out, stats) = drain(Timeline::new(
            vec![file("x.log", text)],
            JsonFields::default(),
            0,
        ));
        assert_eq!(out.len(), 2);
        assert_eq!(
            (stats.lines, stats.blank, stats.malformed, stats.rejected),
            (5, 1, 1, 1)
        );
        assert_eq!(stats.first_malformed[0].file, "x.log");
        assert_eq!(stats.first_malformed[0].line, 2);
    }
}
