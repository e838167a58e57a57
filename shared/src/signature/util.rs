//! Helpers the provider modules share: header lookup, MACs, constant-time
//! comparison, timestamp windows.

use base64::{
    alphabet,
    engine::{general_purpose::STANDARD, DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
    Engine as _,
};
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{Headers, MAX_SIGNATURE_ENTRIES, MAX_SIGNATURE_HEADER_LEN};

/// Why a provider check did not pass; `mod.rs` turns it into a `Verdict`.
#[derive(Debug)]
pub(super) enum Failure {
    /// Missing, malformed or wrong signature.
    Invalid(String),
    /// Signature matches, timestamp outside the window.
    Stale { age_s: i64 },
}

impl Failure {
    pub(super) fn invalid(reason: impl Into<String>) -> Self {
        Failure::Invalid(reason.into())
    }
}

/// The value of header `name` (case-insensitive). A repeated signature header is
/// refused rather than guessed at: the relay and the local app might pick
/// different copies.
pub(super) fn header<'a>(headers: &'a Headers, name: &str) -> Result<Option<&'a [u8]>, Failure> {
    let mut found = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice());
    let Some(first) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() {
        return Err(Failure::invalid(format!("duplicate {name} header")));
    }
    if first.len() > MAX_SIGNATURE_HEADER_LEN {
        return Err(Failure::invalid(format!(
            "signature header too long: {name}"
        )));
    }
    Ok(Some(first))
}

/// Like [`header`], but a missing header is a failure.
pub(super) fn required<'a>(headers: &'a Headers, name: &str) -> Result<&'a [u8], Failure> {
    header(headers, name)?.ok_or_else(|| Failure::invalid(format!("missing {name} header")))
}

/// The header value as text; signature headers are ASCII by construction.
pub(super) fn text<'a>(value: &'a [u8], name: &str) -> Result<&'a str, Failure> {
    std::str::from_utf8(value)
        .map_err(|_| Failure::invalid(format!("{name} header is not valid UTF-8")))
}

/// The header value as text, required to be present.
pub(super) fn required_text<'a>(headers: &'a Headers, name: &str) -> Result<&'a str, Failure> {
    text(required(headers, name)?, name)
}

/// Refuses a header with more than [`MAX_SIGNATURE_ENTRIES`] signatures.
pub(super) fn check_entry_count(count: usize) -> Result<(), Failure> {
    if count > MAX_SIGNATURE_ENTRIES {
        return Err(Failure::invalid("signature header has too many entries"));
    }
    Ok(())
}

/// Unix seconds written as plain ASCII digits (no sign, no spaces).
pub(super) fn parse_unix(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Checks `ts` against `now`. One-sided windows only refuse old timestamps;
/// two-sided ones also refuse timestamps more than `tolerance_s` in the future.
pub(super) fn check_window(
    ts: i64,
    now: i64,
    tolerance_s: u64,
    two_sided: bool,
) -> Result<(), Failure> {
    let age_s = now.saturating_sub(ts);
    let outside = age_s.unsigned_abs() > tolerance_s;
    if outside && (age_s > 0 || two_sided) {
        return Err(Failure::Stale { age_s });
    }
    Ok(())
}

/// HMAC-SHA256 over the concatenation of `parts`.
pub(super) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// HMAC-SHA1 over the concatenation of `parts` (GitHub legacy, Twilio).
pub(super) fn hmac_sha1(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    let mut mac = Hmac::<Sha1>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time equality; slices of different lengths are unequal.
pub(super) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Whether `check` passes for any of `secrets`. Every secret is tried (no
/// early exit), so the time taken does not reveal which one matched.
pub(super) fn any_secret<T>(secrets: &[T], check: impl Fn(&T) -> bool) -> bool {
    secrets
        .iter()
        .fold(false, |acc, secret| acc | check(secret))
}

/// Whether `expected` equals any candidate. Every candidate is compared, so the
/// time taken does not depend on which one matched.
pub(super) fn matches_any(expected: &[u8], candidates: &[Vec<u8>]) -> bool {
    candidates
        .iter()
        .fold(false, |acc, c| acc | ct_eq(expected, c))
}

/// Standard base64 with padding, as Shopify, Twilio and Standard Webhooks send.
pub(super) fn b64_decode(s: &str) -> Option<Vec<u8>> {
    STANDARD.decode(s).ok()
}

/// Standard base64 encoding with padding.
pub(super) fn b64_encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Lenient base64 for secrets typed by people: padding optional, as the
/// reference libraries' decoders allow.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Decodes a base64 secret, padding optional.
pub(super) fn b64_decode_secret(s: &str) -> Option<Vec<u8>> {
    LENIENT.decode(s).ok()
}

/// Sets header `name` to `value`: the first header of that name (any case)
/// keeps its name and position, later duplicates are dropped, and the header is
/// appended when missing.
pub(super) fn set_header(headers: &mut Vec<(String, Vec<u8>)>, name: &str, value: Vec<u8>) {
    match headers
        .iter()
        .position(|(n, _)| n.eq_ignore_ascii_case(name))
    {
        Some(first) => {
            headers[first].1 = value;
            let mut index = 0;
            headers.retain(|(n, _)| {
                let keep = index <= first || !n.eq_ignore_ascii_case(name);
                index += 1;
                keep
            });
        }
        None => headers.push((name.to_owned(), value)),
    }
}

/// The first value of header `name` (any case), for re-signing.
pub(super) fn first_value<'a>(headers: &'a Headers, name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn duplicate_and_oversized_headers_are_refused() {
        let h = hdrs(&[("A", "1"), ("a", "2")]);
        assert!(matches!(header(&h, "a"), Err(Failure::Invalid(_))));
        let long = "x".repeat(MAX_SIGNATURE_HEADER_LEN + 1);
        let h = hdrs(&[("A", &long)]);
        assert!(matches!(header(&h, "a"), Err(Failure::Invalid(r)) if r.contains("too long")));
        assert!(matches!(header(&h, "b"), Ok(None)));
    }

    #[test]
    fn unix_timestamps_are_plain_digits() {
        assert_eq!(parse_unix("1700000000"), Some(1_700_000_000));
        for bad in ["", "+1", "-1", " 1", "1.0", "99999999999999999999"] {
            assert_eq!(parse_unix(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn windows_are_one_or_two_sided() {
        assert!(check_window(100, 400, 300, false).is_ok());
        assert!(matches!(
            check_window(100, 401, 300, false),
            Err(Failure::Stale { age_s: 301 })
        ));
        assert!(check_window(1000, 0, 300, false).is_ok());
        assert!(matches!(
            check_window(1000, 0, 300, true),
            Err(Failure::Stale { age_s: -1000 })
        ));
        assert!(matches!(
            check_window(i64::MAX, i64::MIN, 300, true),
            Err(Failure::Stale { .. })
        ));
    }

    #[test]
    fn set_header_keeps_first_position_and_drops_duplicates() {
        let mut h = hdrs(&[("X-A", "1"), ("Sig", "old"), ("x-b", "2"), ("SIG", "dup")]);
        set_header(&mut h, "sig", b"new".to_vec());
        assert_eq!(h, hdrs(&[("X-A", "1"), ("Sig", "new"), ("x-b", "2")]));
        set_header(&mut h, "New-Header", b"v".to_vec());
        assert_eq!(h.last(), Some(&("New-Header".to_owned(), b"v".to_vec())));
    }

    #[test]
    fn secrets_decode_with_or_without_padding() {
        assert_eq!(b64_decode_secret("YWI="), Some(b"ab".to_vec()));
        assert_eq!(b64_decode_secret("YWI"), Some(b"ab".to_vec()));
        assert_eq!(b64_decode_secret("not base64!"), None);
        assert_eq!(b64_decode("YWI"), None);
    }
}
