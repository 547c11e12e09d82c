//! A list's content: the lines of its file read into sorted, merged address
//! ranges, searched by binary search. A million networks take 8 bytes each
//! (IPv4) or 32 (IPv6), and a lookup is some twenty comparisons, with no
//! allocation and no lock.
//!
//! The formats read are the common feeds': one address or network per line,
//! comments after `#` or `;` (FireHOL's netsets, Spamhaus DROP's
//! `1.2.3.0/24 ; SBL123`), blank lines, and anything after the first word
//! ignored. A line that is not an address or a network is skipped and
//! counted, never fatal.

use std::io::BufRead;
use std::net::IpAddr;

use ipnet::IpNet;

/// Bytes a line may have; longer ones are skipped as bad.
const MAX_LINE: usize = 4096;
/// Line numbers of bad lines kept for the log line.
const BAD_LINES_SHOWN: usize = 5;

/// Sorted, non-overlapping inclusive ranges of each family.
#[derive(Debug, Default)]
pub(crate) struct NetTable {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
    /// Networks read (before merging).
    entries: usize,
}

/// What reading a file found besides its networks.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct BadLines {
    pub(crate) count: usize,
    /// The first few, 1-based.
    pub(crate) first: Vec<usize>,
}

/// Why a file's content was not taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("more than {0} entries")]
    TooMany(usize),
}

impl NetTable {
    /// Reads `input` line by line; at most `max_entries` networks.
    pub(crate) fn read(
        mut input: impl BufRead,
        max_entries: usize,
    ) -> Result<(NetTable, BadLines), ReadError> {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        let mut bad = BadLines::default();
        let mut line = Vec::new();
        let mut number = 0;
        loop {
            line.clear();
            // Past MAX_LINE the rest of the line is read but not kept.
            let n = std::io::Read::take(&mut input, MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            number += 1;
            let too_long = line.len() > MAX_LINE && !line.ends_with(b"\n");
            if too_long {
                skip_rest_of_line(&mut input)?;
            }
            match parse_line(&line).filter(|_| !too_long) {
                Some(Entry::Blank) => {}
                Some(Entry::Net(IpNet::V4(net))) => {
                    v4.push((u32::from(net.network()), u32::from(net.broadcast())));
                }
                Some(Entry::Net(IpNet::V6(net))) => {
                    v6.push((u128::from(net.network()), u128::from(net.broadcast())));
                }
                None => {
                    bad.count += 1;
                    if bad.first.len() < BAD_LINES_SHOWN {
                        bad.first.push(number);
                    }
                }
            }
            if v4.len() + v6.len() > max_entries {
                return Err(ReadError::TooMany(max_entries));
            }
        }
        let entries = v4.len() + v6.len();
        Ok((
            NetTable {
                v4: merge(v4, |x| x.checked_add(1)),
                v6: merge(v6, |x| x.checked_add(1)),
                entries,
            },
            bad,
        ))
    }

    /// Whether `ip` is in one of the networks.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => find(&self.v4, u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => find(&self.v4, u32::from(v4)),
                None => find(&self.v6, u128::from(a)),
            },
        }
    }

    /// Networks read from the file.
    pub(crate) fn entries(&self) -> usize {
        self.entries
    }
}

fn skip_rest_of_line(input: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            input.consume(end + 1);
            return Ok(());
        }
        let n = buf.len();
        input.consume(n);
    }
}

enum Entry {
    Blank,
    Net(IpNet),
}

/// One line: blank (or a comment), a network, or `None` when bad.
fn parse_line(line: &[u8]) -> Option<Entry> {
    let text = std::str::from_utf8(line).ok()?;
    let content = text.split(['#', ';']).next().unwrap_or_default();
    let Some(word) = content.split_whitespace().next() else {
        return Some(Entry::Blank);
    };
    if let Ok(net) = word.parse::<IpNet>() {
        return Some(Entry::Net(net.trunc()));
    }
    word.parse::<IpAddr>().ok().map(|ip| Entry::Net(ip.into()))
}

/// Sorts the ranges and merges those that overlap or touch.
fn merge<T: Ord + Copy>(mut ranges: Vec<(T, T)>, next: impl Fn(T) -> Option<T>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        if let Some(last) = out.last_mut() {
            let touches = next(last.1).is_none_or(|after| start <= after);
            if touches {
                last.1 = last.1.max(end);
                continue;
            }
        }
        out.push((start, end));
    }
    out.shrink_to_fit();
    out
}

fn find<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    let i = ranges.partition_point(|r| r.0 <= x);
    i > 0 && ranges[i - 1].1 >= x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> (NetTable, BadLines) {
        NetTable::read(text.as_bytes(), 1000).unwrap()
    }

    fn has(t: &NetTable, ip: &str) -> bool {
        t.contains(ip.parse().unwrap())
    }

    #[test]
    fn feeds_formats_are_read_and_bad_lines_counted() {
        let (t, bad) = table(
            "; Spamhaus DROP List\n1.10.16.0/20 ; SBL256894\n# FireHOL\n203.0.113.7\n\n\
             not-an-address\n2001:db8::/32 # doc\n10.0.0.1/33\n  198.51.100.0/24   extra words\n",
        );
        assert_eq!(t.entries(), 4);
        assert_eq!(
            bad,
            BadLines {
                count: 2,
                first: vec![6, 8]
            }
        );
        assert!(has(&t, "1.10.16.0") && has(&t, "1.10.31.255"));
        assert!(!has(&t, "1.10.32.0") && !has(&t, "1.10.15.255"));
        assert!(has(&t, "203.0.113.7") && !has(&t, "203.0.113.8"));
        assert!(has(&t, "2001:db8:ffff::1") && !has(&t, "2001:db9::1"));
        assert!(has(&t, "::ffff:198.51.100.9"));
    }

    #[test]
    fn overlapping_and_adjacent_networks_merge() {
        let (t, _) = table("10.0.0.0/24\n10.0.1.0/24\n10.0.0.128/25\n10.0.3.0/24\n0.0.0.0/0\n");
        assert_eq!(t.v4, vec![(0, u32::MAX)]);
        let (t, _) = table("10.0.0.0/24\n10.0.1.0/24\n10.0.3.5\n");
        assert_eq!(t.v4.len(), 2);
        assert!(has(&t, "10.0.1.255") && !has(&t, "10.0.2.0") && has(&t, "10.0.3.5"));
    }

    #[test]
    fn long_lines_and_too_many_entries_are_bounded() {
        let long = format!("{}\n1.2.3.4\n", "9".repeat(10_000));
        let (t, bad) = table(&long);
        assert_eq!((t.entries(), bad.count), (1, 1));
        let many = "1.2.3.4\n".repeat(1001);
        assert!(matches!(
            NetTable::read(many.as_bytes(), 1000),
            Err(ReadError::TooMany(1000))
        ));
        let (t, bad) = table("\u{ff}\u{fe}\n\0\n");
        assert_eq!((t.entries(), bad.count), (0, 2));
    }
}
