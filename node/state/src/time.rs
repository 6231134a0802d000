//! Times as the OpenStack APIs write and read them. Every record keeps seconds since the epoch
//! or one of these strings; one civil-date conversion serves all of them.

pub use shoal_consensus::join::now_secs;

/// The civil date and time of day of `secs` (Howard Hinnant's days-to-civil algorithm).
fn civil(secs: u64) -> (i64, i64, i64, u64, u64, u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `YYYY-MM-DDTHH:MM:SSZ`, as Nova writes `created` and `updated`.
pub fn rfc3339(secs: u64) -> String {
    let (y, m, d, h, min, s) = civil(secs);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}Z")
}

/// [`rfc3339`] of now.
pub fn now_rfc3339() -> String {
    rfc3339(now_secs())
}

/// `YYYY-MM-DDTHH:MM:SS.000000Z`, as Keystone writes token expiry and Nova some timestamps.
pub fn iso8601(secs: u64) -> String {
    let (y, m, d, h, min, s) = civil(secs);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.000000Z")
}

/// Seconds since the epoch of an ISO 8601 time as Nova's `changes-since` takes it:
/// `YYYY-MM-DD`, or `YYYY-MM-DDTHH:MM[:SS[.fraction]]` with `Z`, `±HH:MM` or no offset (UTC).
pub fn parse_iso8601(text: &str) -> Option<i64> {
    let num = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (date, time) = match text.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let mut d = date.splitn(3, '-');
    let (y, m, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || date.len() != 10 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut secs = days * 86_400;
    if let Some(t) = time {
        let (clock, offset) = if let Some(c) = t.strip_suffix('Z') {
            (c, 0)
        } else if let Some(at) = t.rfind(['+', '-']) {
            let (c, o) = t.split_at(at);
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let (oh, om) = o[1..].split_once(':').unwrap_or((&o[1..], "0"));
            (c, sign * (num(oh)? * 3600 + num(om)? * 60))
        } else {
            (t, 0)
        };
        let clock = clock.split_once('.').map_or(
            clock,
            |(c, frac)| {
                if num(frac).is_some() {
                    c
                } else {
                    ""
                }
            },
        );
        let mut parts = clock.split(':');
        let h = num(parts.next()?)?;
        let min = num(parts.next()?)?;
        let sec = parts.next().map_or(Some(0), num)?;
        if parts.next().is_some() || h > 23 || min > 59 || sec > 60 {
            return None;
        }
        secs += h * 3600 + min * 60 + sec - offset;
    }
    Some(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_known_instants() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00.000000Z");
        assert_eq!(iso8601(1_795_000_000), "2026-11-18T11:06:40.000000Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339(1_796_468_400), "2026-12-05T11:00:00Z");
    }

    #[test]
    fn iso8601_times_parse_like_nova_reads_them() {
        assert_eq!(parse_iso8601("1970-01-01"), Some(0));
        assert_eq!(parse_iso8601("2026-12-05T11:00:00Z"), Some(1_796_468_400));
        assert_eq!(parse_iso8601(&rfc3339(1_796_468_400)), Some(1_796_468_400));
        assert_eq!(
            parse_iso8601("2026-12-05T12:00:00+01:00"),
            Some(1_796_468_400)
        );
        assert_eq!(
            parse_iso8601("2026-12-05T11:00:00.123456"),
            Some(1_796_468_400)
        );
        for bad in [
            "2011/01/01",
            "asdf",
            "2026-13-01",
            "2026-12-05T25:00:00Z",
            "",
            "2026-1-5",
        ] {
            assert_eq!(parse_iso8601(bad), None, "{bad}");
        }
    }
}
