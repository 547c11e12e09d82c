//! Timestamps of log lines, to microseconds since the Unix epoch (UTC):
//! the common log format's `10/Oct/2026:13:55:36 -0700`, RFC 3339
//! (`2026-10-10T20:55:36.123Z`, any offset, any fraction), and numbers of
//! seconds since the epoch (`1791662136.123`, nginx's `$msec`).
//!
//! Written out rather than borrowed from a date crate: three small formats,
//! parsed for every line of a log of millions, with no allocation.

/// Days from 1970-01-01 to the given date (proleptic Gregorian), by Howard
/// Hinnant's `days_from_civil`, the inverse of
/// [`crate::policy::civil_from_days`]. `None` before 1970.
fn days_from_civil(y: i64, m: u32, d: u32) -> Option<u64> {
    // Four-digit years, as both formats write them: every time then fits
    // the stores' microsecond arithmetic with room to spare.
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || !(1970..=9999).contains(&y) {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    u64::try_from(era * 146_097 + doe - 719_468).ok()
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Seconds east of UTC of `+hhmm`, `-hh:mm` or `Z`.
fn offset_s(s: &str) -> Option<i64> {
    if s == "Z" || s == "z" {
        return Some(0);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let rest = rest.replace(':', "");
    if rest.len() != 4 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let h = i64::from(digits(&rest[..2])?);
    let m = i64::from(digits(&rest[2..])?);
    if h > 23 || m > 59 {
        return None;
    }
    Some(sign * (h * 3600 + m * 60))
}

/// Microseconds of a fraction's digits (`"123"` is 123 000 µs); extra
/// digits past the sixth are dropped.
fn fraction_us(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut us = 0u64;
    for (i, b) in s.bytes().take(6).enumerate() {
        us += u64::from(b - b'0') * 10u64.pow(5 - i as u32);
    }
    Some(us)
}

fn to_us(days: u64, h: u32, mi: u32, sec: u32, frac_us: u64, offset: i64) -> Option<u64> {
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let local = days * 86_400 + u64::from(h) * 3600 + u64::from(mi) * 60 + u64::from(sec);
    let utc = i64::try_from(local).ok()? - offset;
    u64::try_from(utc)
        .ok()?
        .checked_mul(1_000_000)?
        .checked_add(frac_us)
}

/// `10/Oct/2026:13:55:36 -0700` (the common log format's `$time_local`).
pub(crate) fn clf(s: &str) -> Option<u64> {
    let (stamp, zone) = s.split_once(' ')?;
    let mut dmy = stamp.splitn(3, '/');
    let d = digits(dmy.next()?)?;
    let m = match dmy.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let mut yhms = dmy.next()?.splitn(4, ':');
    let y = digits(yhms.next()?)?;
    let h = digits(yhms.next()?)?;
    let mi = digits(yhms.next()?)?;
    let sec = digits(yhms.next()?)?;
    to_us(
        days_from_civil(i64::from(y), m, d)?,
        h,
        mi,
        sec,
        0,
        offset_s(zone)?,
    )
}

/// RFC 3339: `2026-10-10T20:55:36Z`, with an optional fraction and any
/// offset (a space instead of the `T` is read too).
pub(crate) fn rfc3339(s: &str) -> Option<u64> {
    if s.len() < 20 || !s.is_char_boundary(10) || !s.is_char_boundary(19) {
        return None;
    }
    let (date, rest) = s.split_at(10);
    let mut ymd = date.splitn(3, '-');
    let y = digits(ymd.next()?)?;
    let m = digits(ymd.next()?)?;
    let d = digits(ymd.next()?)?;
    if !matches!(rest.as_bytes()[0], b'T' | b't' | b' ') {
        return None;
    }
    let (clock, mut tail) = rest[1..].split_at(8);
    let mut hms = clock.splitn(3, ':');
    let h = digits(hms.next()?)?;
    let mi = digits(hms.next()?)?;
    let sec = digits(hms.next()?)?;
    let mut frac = 0;
    if let Some(f) = tail.strip_prefix('.') {
        let end = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
        frac = fraction_us(&f[..end])?;
        tail = &f[end..];
    }
    to_us(
        days_from_civil(i64::from(y), m, d)?,
        h,
        mi,
        sec,
        frac,
        offset_s(tail)?,
    )
}

/// Seconds since the epoch, with a fraction (`$msec`): to microseconds.
pub(crate) fn epoch_seconds(secs: f64) -> Option<u64> {
    if !secs.is_finite() || !(0.0..=1e11).contains(&secs) {
        return None;
    }
    Some((secs * 1e6).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_log_format_times_are_read_with_their_offset() {
        // 2000-10-10T20:55:36Z
        assert_eq!(clf("10/Oct/2000:13:55:36 -0700"), Some(971_211_336_000_000));
        assert_eq!(clf("10/Oct/2000:20:55:36 +0000"), Some(971_211_336_000_000));
        assert_eq!(
            clf("29/Feb/2024:00:00:00 +0000"),
            Some(1_709_164_800_000_000)
        );
        for bad in [
            "10/Oct/2000:13:55:36",
            "10/Foo/2000:13:55:36 -0700",
            "32/Oct/2000:13:55:36 -0700",
            "10/Oct/2000:25:55:36 -0700",
            "10/Oct/2000:13:55 -0700",
            "",
            "10/Oct/2000:13:55:36 -07",
            "10/Oct/2000:13:55:36 +1é1",
            "10/Oct/99999999:13:55:36 +0000",
        ] {
            assert_eq!(clf(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_times_keep_their_fraction_and_offset() {
        assert_eq!(rfc3339("2000-10-10T20:55:36Z"), Some(971_211_336_000_000));
        assert_eq!(
            rfc3339("2000-10-10T20:55:36.123Z"),
            Some(971_211_336_123_000)
        );
        assert_eq!(
            rfc3339("2000-10-10T22:55:36.1234567+02:00"),
            Some(971_211_336_123_456)
        );
        assert_eq!(rfc3339("2000-10-10 20:55:36Z"), Some(971_211_336_000_000));
        assert_eq!(rfc3339("1970-01-01T00:00:00Z"), Some(0));
        for bad in [
            "2000-10-10T20:55:36",
            "2000-13-10T20:55:36Z",
            "2000-10-10X20:55:36Z",
            "1969-12-31T23:59:59Z",
            "2000-10-10T20:55:36.Z",
            "2000-10-10T20:55:36Zjunk",
            "ΩΩΩΩΩΩΩΩΩΩΩΩΩΩΩΩΩΩΩΩ",
            "2000-10-10T20:55:36+1é1",
            "2000-10-10T20:55:36é",
            "12345-10-10T20:55:36Z",
        ] {
            assert_eq!(rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn epoch_seconds_become_microseconds() {
        assert_eq!(epoch_seconds(971_211_336.123), Some(971_211_336_123_000));
        assert_eq!(epoch_seconds(-1.0), None);
        assert_eq!(epoch_seconds(f64::NAN), None);
    }
}
