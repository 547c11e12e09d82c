//! What a policy is: a token bucket, a calendar quota or a concurrency
//! cap ([`Limit`]), and who it is charged to ([`KeyKind`]), with their math.
//!
//! A token bucket is kept in the exact integer form both stores use
//! (GCRA, [`BucketSpec`]); a quota counts requests over whole calendar
//! periods in UTC (an hour, a day, a month) and refuses until the next
//! period starts; a concurrency cap counts requests in flight. All three
//! are decided by the same script call (`lua/decide.lua`), and the local
//! store ports the same math, so it is written down here once, in
//! integers, with the edge cases pinned by tests.
//!
//! It is the vocabulary every other part speaks (the config parses into
//! it, `rules` compiles matchers around it, `limiter` decides with it), so
//! it depends on nothing of floodgate's. The name follows the RateLimit
//! headers, whose items are *policies*.

use std::time::Duration;

use actix_web::http::header::HeaderName;
use serde::Deserialize;

/// What a rule's bucket is keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// The client's IP key (IPv6 grouped per prefix).
    Ip,
    /// The value of a request header; requests without it skip the rule.
    Header(HeaderName),
    /// A claim of the request's verified bearer token (`[jwt]`); requests
    /// without a verified token, or whose token lacks the claim, skip the
    /// rule. Never an unverified claim.
    Claim(String),
    /// One bucket for the whole gateway.
    Global,
}

impl KeyKind {
    /// Parses `ip`, `global`, `header:<Name>` or `jwt:<claim>`.
    pub(crate) fn parse(s: &str) -> Result<KeyKind, String> {
        if let Some(claim) = s.strip_prefix("jwt:") {
            let valid = !claim.is_empty()
                && claim.len() <= 64
                && claim
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.:/".contains(&b));
            return if valid {
                Ok(KeyKind::Claim(claim.to_string()))
            } else {
                Err(format!(
                    "`{claim}` is not a claim name (1 to 64 letters, digits, '_', '-', '.', ':' or '/')"
                ))
            };
        }
        match s {
            "ip" => Ok(KeyKind::Ip),
            "global" => Ok(KeyKind::Global),
            _ => match s.strip_prefix("header:") {
                Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
                    .map(KeyKind::Header)
                    .map_err(|_| format!("`{name}` is not a valid header name")),
                None => Err(format!(
                    "`{s}` is not one of \"ip\", \"global\", \"header:<Name>\", \"jwt:<claim>\""
                )),
            },
        }
    }
}

/// What a rule limits: a token bucket, a calendar quota, or the requests
/// in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    Rate(BucketSpec),
    Quota(QuotaSpec),
    Concurrency(ConcurrencySpec),
}

impl Limit {
    /// What one request takes by default (a slot, for a cap).
    pub fn cost(&self) -> u32 {
        match self {
            Limit::Rate(b) => b.cost,
            Limit::Quota(q) => q.cost,
            Limit::Concurrency(_) => 1,
        }
    }
}

/// A token bucket in the exact integer form both stores use (GCRA):
/// one token every `interval_us` microseconds, `burst` tokens at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BucketSpec {
    pub interval_us: u64,
    pub burst: u32,
    pub cost: u32,
}

impl BucketSpec {
    /// `rate` tokens per `per`, rounded to whole microseconds per token.
    pub(crate) fn new(rate: f64, per: Duration, burst: u32, cost: u32) -> BucketSpec {
        let interval_us = ((per.as_secs_f64() * 1e6) / rate).round().max(1.0) as u64;
        BucketSpec {
            interval_us,
            burst,
            cost,
        }
    }

    /// Time for an empty bucket to fill: `burst x interval`.
    pub(crate) fn capacity_us(&self) -> u64 {
        self.interval_us * u64::from(self.burst)
    }
}

/// Whole seconds, rounded up.
pub(crate) fn ceil_secs(us: u64) -> u64 {
    us.div_ceil(1_000_000)
}

/// A calendar period of a quota, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    Day,
    Month,
}

impl Period {
    /// The code the decision script takes (`h`, `d`, `m`).
    pub(crate) fn code(self) -> &'static str {
        match self {
            Period::Hour => "h",
            Period::Day => "d",
            Period::Month => "m",
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// The policy's window `w` in the RateLimit-Policy header: the period's
    /// nominal length (a month counts as 30 days).
    pub(crate) fn window_s(self) -> u64 {
        match self {
            Period::Hour => 3600,
            Period::Day => 86_400,
            Period::Month => 30 * 86_400,
        }
    }

    /// The longest the period can be: how long a subject's counter must be
    /// kept at least.
    pub(crate) fn longest_s(self) -> u64 {
        match self {
            Period::Hour => 3600,
            Period::Day => 86_400,
            Period::Month => 31 * 86_400,
        }
    }

    /// The period holding `now_s` (seconds since the Unix epoch): its start
    /// and the start of the next one, both in seconds. The same steps as
    /// `period_bounds` in `lua/decide.lua`.
    pub(crate) fn bounds(self, now_s: u64) -> (u64, u64) {
        match self {
            Period::Hour => {
                let s = now_s - now_s % 3600;
                (s, s + 3600)
            }
            Period::Day => {
                let s = now_s - now_s % 86_400;
                (s, s + 86_400)
            }
            Period::Month => {
                let days = now_s / 86_400;
                let (y, m, d) = civil_from_days(days);
                let start = (days - (d - 1)) * 86_400;
                (start, start + days_in_month(y, m) * 86_400)
            }
        }
    }
}

/// The date (year, month 1-12, day 1-31) of a day counted from 1970-01-01,
/// by Howard Hinnant's `civil_from_days` (exact for every date after 1970).
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// A quota: at most `quota` units (each request costs `cost`) per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuotaSpec {
    pub quota: u64,
    pub period: Period,
    pub cost: u32,
}

/// A concurrency cap: at most `max` requests of a subject in flight across
/// every node. Each holds a lease that ends after `lease_ms` unless renewed,
/// so the slots of a node that died come back by themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConcurrencySpec {
    pub max: u32,
    pub lease_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seconds since the epoch of a UTC date and time.
    fn at(y: u64, m: u64, d: u64, hh: u64, mm: u64, ss: u64) -> u64 {
        // Count the days by walking months: slow but obviously right.
        let mut days = 0;
        for year in 1970..y {
            days += if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 {
                366
            } else {
                365
            };
        }
        for month in 1..m {
            days += days_in_month(y, month);
        }
        days += d - 1;
        days * 86_400 + hh * 3600 + mm * 60 + ss
    }

    #[test]
    fn sub_second_periods_keep_their_rate() {
        let b = BucketSpec::new(1.0, Duration::from_millis(250), 1, 1);
        assert_eq!(b.interval_us, 250_000);
        let b = BucketSpec::new(3.0, Duration::from_secs(1), 3, 1);
        assert_eq!(b.interval_us, 333_333);
    }

    #[test]
    fn key_kinds_parse() {
        assert_eq!(KeyKind::parse("ip").unwrap(), KeyKind::Ip);
        assert!(matches!(
            KeyKind::parse("header:X-Api-Key").unwrap(),
            KeyKind::Header(_)
        ));
        assert!(KeyKind::parse("cookie:x").is_err());
        assert!(KeyKind::parse("header:bad name").is_err());
    }

    #[test]
    fn civil_dates_round_trip_for_every_day_of_two_centuries() {
        let (mut y, mut m, mut d) = (1970, 1, 1);
        for days in 0..(200 * 366) {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            d += 1;
            if d > days_in_month(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn months_end_on_their_last_second() {
        let feb_leap = at(2028, 2, 29, 23, 59, 59);
        assert_eq!(
            Period::Month.bounds(feb_leap),
            (at(2028, 2, 1, 0, 0, 0), at(2028, 3, 1, 0, 0, 0))
        );
        let feb = at(2027, 2, 14, 12, 0, 0);
        assert_eq!(
            Period::Month.bounds(feb).1 - Period::Month.bounds(feb).0,
            28 * 86_400
        );
        let dec = at(2030, 12, 31, 23, 59, 59);
        assert_eq!(Period::Month.bounds(dec).1, at(2031, 1, 1, 0, 0, 0));
        let first = at(2030, 7, 1, 0, 0, 0);
        assert_eq!(
            Period::Month.bounds(first).0,
            first,
            "a period starts on its first second"
        );
        // 2100 is not a leap year.
        assert_eq!(
            Period::Month.bounds(at(2100, 2, 10, 0, 0, 0)).1,
            at(2100, 3, 1, 0, 0, 0)
        );
    }

    #[test]
    fn hours_and_days_are_utc_calendar_periods() {
        let t = at(2030, 1, 1, 23, 59, 59);
        assert_eq!(
            Period::Day.bounds(t),
            (at(2030, 1, 1, 0, 0, 0), at(2030, 1, 2, 0, 0, 0))
        );
        assert_eq!(
            Period::Hour.bounds(t),
            (at(2030, 1, 1, 23, 0, 0), at(2030, 1, 2, 0, 0, 0))
        );
        assert_eq!(Period::Day.bounds(t + 1).0, t + 1);
    }
}
