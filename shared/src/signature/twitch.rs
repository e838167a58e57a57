//! Twitch EventSub: `Twitch-Eventsub-Message-Signature: sha256=<hex>`, HMAC-SHA256
//! over `message_id + timestamp + body` with no separators; the timestamp is
//! RFC 3339 with nanoseconds, parsed here by hand.

use super::{
    util::{self, Failure},
    Provider, SignError, SignedRequest,
};

const ID: &str = "Twitch-Eventsub-Message-Id";
const TIMESTAMP: &str = "Twitch-Eventsub-Message-Timestamp";
const SIGNATURE: &str = "Twitch-Eventsub-Message-Signature";

const SECONDS_PER_DAY: i64 = 86_400;

/// Checks the signature; the window is two-sided, since a timestamp far in the
/// future would stretch the replay window just as an old one does.
pub(super) fn verify(
    secrets: &[&str],
    req: &SignedRequest<'_>,
    now: i64,
    tolerance_s: u64,
) -> Result<(), Failure> {
    let value = util::required(req.headers, SIGNATURE)?;
    let id = util::required(req.headers, ID)?;
    let raw_ts = util::required_text(req.headers, TIMESTAMP)?;
    let ts = parse_rfc3339(raw_ts)
        .ok_or_else(|| Failure::invalid(format!("{TIMESTAMP} is not an RFC 3339 time")))?;
    let signature = parse(value)?;
    let matched = util::any_secret(secrets, |secret| {
        util::ct_eq(&mac(secret, id, raw_ts, req.body), &signature)
    });
    if !matched {
        return Err(Failure::invalid("signature does not match"));
    }
    util::check_window(ts, now, tolerance_s, true)
}

/// Decodes `sha256=<hex>`.
pub(super) fn parse(value: &[u8]) -> Result<Vec<u8>, Failure> {
    value
        .strip_prefix(b"sha256=")
        .and_then(|hex_sig| hex::decode(hex_sig).ok())
        .ok_or_else(|| Failure::invalid(format!("{SIGNATURE} is not sha256=<hex>")))
}

fn mac(secret: &str, id: &[u8], ts: &str, body: &[u8]) -> [u8; 32] {
    util::hmac_sha256(secret.as_bytes(), &[id, ts.as_bytes(), body])
}

/// Writes a fresh timestamp and signature, keeping the message id (Twitch keeps
/// it across resends, and receivers dedupe on it).
pub(super) fn resign(
    secret: &str,
    headers: &mut Vec<(String, Vec<u8>)>,
    body: &[u8],
    now: i64,
) -> Result<(), SignError> {
    let id = util::first_value(headers, ID)
        .ok_or(SignError::MissingId(Provider::Twitch))?
        .to_vec();
    let ts = format_rfc3339(now);
    let value = format!("sha256={}", hex::encode(mac(secret, &id, &ts, body)));
    util::set_header(headers, TIMESTAMP, ts.into_bytes());
    util::set_header(headers, SIGNATURE, value.into_bytes());
    Ok(())
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` to unix seconds, rounding
/// the fraction down. `None` for anything else, including impossible dates.
pub(super) fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(range)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(digits.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let sep = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &b[19..];
    if let Some(fraction) = rest.strip_prefix(b".") {
        let digits = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if !(1..=9).contains(&digits) {
            return None;
        }
        rest = &fraction[digits..];
    }
    let offset = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let [h1, h2, m1, m2] = digits.map(|d| i64::from(d - b'0'));
            let (h, m) = (h1 * 10 + h2, m1 * 10 + m2);
            if h > 23 || m > 59 {
                return None;
            }
            let offset = h * 3600 + m * 60;
            if *sign == b'-' {
                -offset
            } else {
                offset
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    Some(days * SECONDS_PER_DAY + hour * 3600 + minute * 60 + second - offset)
}

/// Formats unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub(super) fn format_rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(SECONDS_PER_DAY);
    let secs = unix.rem_euclid(SECONDS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 for a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc3339_with_nanoseconds_and_offsets() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2019-11-16T10:11:12.634234626Z"),
            Some(1_573_899_072)
        );
        assert_eq!(
            parse_rfc3339("2019-11-16T11:11:12.5+01:00"),
            Some(1_573_899_072)
        );
        assert_eq!(
            parse_rfc3339("2019-11-16t05:41:12-04:30"),
            Some(1_573_899_072)
        );
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400));
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), Some(-1));
    }

    #[test]
    fn rejects_malformed_times() {
        for bad in [
            "",
            "2019-11-16",
            "2019-11-16T10:11:12",
            "2019-11-16 10:11:12Z",
            "2019-13-16T10:11:12Z",
            "2019-02-29T10:11:12Z",
            "2019-11-16T24:11:12Z",
            "2019-11-16T10:11:12.Z",
            "2019-11-16T10:11:12.1234567890Z",
            "2019-11-16T10:11:12+1:00",
            "2019-11-16T10:11:12+01:00Z",
            "+019-11-16T10:11:12Z",
            "2019-11-16T10:11:12ZZ",
            "２０19-11-16T10:11:12Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn format_round_trips() {
        for unix in [
            0,
            -1,
            951_782_400,
            1_573_899_072,
            4_102_444_800,
            -62_135_596_800,
        ] {
            let s = format_rfc3339(unix);
            assert_eq!(parse_rfc3339(&s), Some(unix), "{s}");
        }
        assert_eq!(format_rfc3339(1_573_899_072), "2019-11-16T10:11:12Z");
        // Extreme inputs must not panic, even if the year is out of range.
        let _ = format_rfc3339(i64::MAX);
        let _ = format_rfc3339(i64::MIN);
    }
}
