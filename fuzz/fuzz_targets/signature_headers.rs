//! Arbitrary headers and body into provider detection, verification and
//! re-signing for every provider, and each header value into every provider's
//! parser on its own.
//!
//! Input, shaped like an HTTP request so that seeds stay readable:
//!
//! ```text
//! NOW            unix seconds, digits (anything else: 1700000000)
//! SECRET         used for every provider (empty: verification fails closed)
//! URL            the public URL Twilio signs (empty: none)
//! Name: value    headers, one per line, up to an empty line
//!
//! BODY           everything after the empty line
//! ```

#![no_main]

use hookrelay_shared::signature::{
    self, detect, fuzzing, resign, verify, verify_detected, Provider, SecretSet, SignedRequest,
    Verdict, MAX_SIGNATURE_ENTRIES, MAX_SIGNATURE_HEADER_LEN,
};
use libfuzzer_sys::fuzz_target;

/// Used when the first line is not a timestamp.
const DEFAULT_NOW: i64 = 1_700_000_000;

/// First and last second with a four-digit RFC 3339 year (Twitch):
/// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z.
const RFC3339_SECONDS: std::ops::RangeInclusive<i64> = -62_167_219_200..=253_402_300_799;

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let req = SignedRequest {
        headers: &input.headers,
        body: input.body,
        url: input.url.as_deref(),
    };
    let secrets: &[&str] = &[&input.secret];

    // Detection, then verification as the agent does it.
    let detected = detect(&input.headers);
    let mut set = SecretSet::new();
    for p in Provider::ALL {
        let _ = set.add(p, input.secret.clone());
    }
    let verdict = verify_detected(&set, &req, input.now);
    assert_eq!(verdict.provider(), detected, "verdict for another provider");
    assert_eq!(detected.is_none(), verdict == Verdict::Unsigned);

    for provider in Provider::ALL {
        // Every scheme, whatever was detected, with and without a tolerance.
        let verdict = verify(provider, secrets, &req, input.now, None);
        assert_eq!(verdict.provider(), Some(provider));
        let _ = verify(provider, secrets, &req, input.now, Some(0));
        let _ = verify(provider, secrets, &req, input.now, Some(u64::MAX));
        let _ = verify(
            provider,
            &[secrets[0], "x"],
            &req,
            input.now.wrapping_neg(),
            None,
        );
        resign_round_trip(provider, &input);
    }

    for (_, value) in &input.headers {
        parsers(value);
    }
    parsers(input.body);
});

/// A re-signed request verifies at the time it was signed, whatever other
/// headers and body it carries.
fn resign_round_trip(provider: Provider, input: &Input<'_>) {
    // Real signing times only: signed timestamps are unsigned digits, and
    // Twitch's RFC 3339 has four-digit years.
    let now = input.now.clamp(0, *RFC3339_SECONDS.end());
    // Verification refuses repeated or oversized headers; resign only
    // rewrites the signature and timestamp, not the message id it signs.
    let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, value) in &input.headers {
        if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            let mut value = value.clone();
            value.truncate(MAX_SIGNATURE_HEADER_LEN);
            headers.push((name.clone(), value));
        }
    }
    if resign(provider, &input.secret, &mut headers, input.body, now).is_err() {
        return;
    }
    assert!(detect(&headers).is_some(), "{provider}: nothing to detect");
    let req = SignedRequest {
        headers: &headers,
        body: input.body,
        url: input.url.as_deref(),
    };
    let verdict = verify(provider, &[&input.secret], &req, now, None);
    assert!(
        verdict.is_valid(),
        "{provider}: re-signed request is {verdict:?}"
    );
    let mut tampered = input.body.to_vec();
    tampered.push(b'!');
    let req = SignedRequest {
        body: &tampered,
        ..req
    };
    assert!(
        !verify(provider, &[&input.secret], &req, now, None).is_valid(),
        "{provider}: a longer body still verifies"
    );
}

/// Every parser on one value, with the invariants each promises.
fn parsers(value: &[u8]) {
    let github = fuzzing::github(value);
    let twitch = fuzzing::twitch(value);
    assert_eq!(github, twitch, "the same sha256=<hex> grammar");
    let _ = fuzzing::slack(value);
    let _ = fuzzing::twilio_form(value);
    let Ok(text) = std::str::from_utf8(value) else {
        return;
    };
    if let Some((ts, signatures)) = fuzzing::stripe(text) {
        assert!(ts >= 0 && !signatures.is_empty());
        assert!(signatures.len() <= MAX_SIGNATURE_ENTRIES);
    }
    if let Some((ts, signatures)) = fuzzing::paddle(text) {
        assert!(ts >= 0 && !signatures.is_empty());
        assert!(signatures.len() <= MAX_SIGNATURE_ENTRIES);
    }
    if let Some(signatures) = fuzzing::standard_webhooks(text) {
        assert!(!signatures.is_empty() && signatures.len() <= MAX_SIGNATURE_ENTRIES);
        assert!(signatures.iter().all(|s| !s.is_empty()));
    }
    assert_eq!(fuzzing::shopify(text), fuzzing::twilio(text), "both base64");
    if let Some(unix) = fuzzing::unix_seconds(text) {
        assert!(unix >= 0);
        assert_eq!(
            text.trim_start_matches('0').parse::<i64>().unwrap_or(0),
            unix
        );
    }
    if let Some(unix) = fuzzing::twitch_timestamp(text).filter(|t| RFC3339_SECONDS.contains(t)) {
        // Formatting drops the fraction and the offset, never the instant
        // (an offset can move it out of the four-digit years).
        let formatted = fuzzing::twitch_format(unix);
        assert_eq!(
            fuzzing::twitch_timestamp(&formatted),
            Some(unix),
            "{text} -> {formatted}"
        );
    }
    let (without, with) = fuzzing::twilio_urls(text);
    if !text.contains("://") {
        assert_eq!((without.as_str(), with.as_str()), (text, text));
    }
    let _ = signature::parse_secret_spec(text);
    let _ = text.parse::<Provider>();
}

/// The fuzzer's bytes as a request; see the module docs.
struct Input<'a> {
    now: i64,
    secret: String,
    url: Option<String>,
    headers: Vec<(String, Vec<u8>)>,
    body: &'a [u8],
}

impl<'a> Input<'a> {
    fn parse(data: &'a [u8]) -> Self {
        let mut rest = data;
        let now = std::str::from_utf8(next_line(&mut rest))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(DEFAULT_NOW);
        let secret = String::from_utf8_lossy(next_line(&mut rest)).into_owned();
        let url = String::from_utf8_lossy(next_line(&mut rest)).into_owned();
        let mut headers = Vec::new();
        loop {
            let l = next_line(&mut rest);
            if l.is_empty() {
                break;
            }
            let colon = l.iter().position(|&b| b == b':').unwrap_or(l.len());
            let name = String::from_utf8_lossy(&l[..colon]).trim().to_owned();
            let value = l.get(colon + 1..).unwrap_or_default();
            let value = value.strip_prefix(b" ").unwrap_or(value);
            headers.push((name, value.to_vec()));
        }
        Input {
            now,
            secret,
            url: (!url.is_empty()).then_some(url),
            headers,
            body: rest,
        }
    }
}

/// The bytes up to the next newline (or the end); `rest` moves past it.
fn next_line<'a>(rest: &mut &'a [u8]) -> &'a [u8] {
    let current: &'a [u8] = rest;
    let end = current
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(current.len());
    let (line, after) = current.split_at(end);
    *rest = after.get(1..).unwrap_or_default();
    line
}
