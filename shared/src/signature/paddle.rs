//! Paddle Billing: `Paddle-Signature: ts=<unix>;h1=<hex>[;h1=…]`, HMAC-SHA256 over
//! `"<ts>:<body>"` keyed by the notification destination's secret.

use super::{
    util::{self, Failure},
    SignedRequest,
};

const HEADER: &str = "Paddle-Signature";

/// Checks the header. The window is one-sided, as in Paddle's SDKs: with a 5 s
/// tolerance, refusing future timestamps would turn small clock skew into
/// rejected deliveries.
pub(super) fn verify(
    secrets: &[&str],
    req: &SignedRequest<'_>,
    now: i64,
    tolerance_s: u64,
) -> Result<(), Failure> {
    let value = util::required_text(req.headers, HEADER)?;
    let (raw_ts, ts, signatures) = parse(value)?;
    let matched = util::any_secret(secrets, |secret| {
        util::matches_any(&mac(secret, raw_ts, req.body), &signatures)
    });
    if !matched {
        return Err(Failure::invalid("no h1 signature matches"));
    }
    util::check_window(ts, now, tolerance_s, false)
}

/// Splits `ts=…;h1=…` into the raw timestamp, its value and the decoded `h1`s.
/// Unknown keys and non-hex `h1` values are skipped.
pub(super) fn parse(value: &str) -> Result<(&str, i64, Vec<Vec<u8>>), Failure> {
    let mut ts = None;
    let mut entries = 0;
    let mut signatures = Vec::new();
    for part in value.split(';') {
        let (key, val) = part
            .split_once('=')
            .ok_or_else(|| Failure::invalid("malformed Paddle-Signature header"))?;
        if key == "ts" {
            if ts.is_some() {
                return Err(Failure::invalid("Paddle-Signature has two timestamps"));
            }
            let parsed = util::parse_unix(val)
                .ok_or_else(|| Failure::invalid("Paddle-Signature ts is not unix seconds"))?;
            ts = Some((val, parsed));
            continue;
        }
        entries += 1;
        util::check_entry_count(entries)?;
        if key == "h1" {
            if let Ok(sig) = hex::decode(val) {
                signatures.push(sig);
            }
        }
    }
    let (raw_ts, ts) = ts.ok_or_else(|| Failure::invalid("Paddle-Signature has no ts"))?;
    if signatures.is_empty() {
        return Err(Failure::invalid("Paddle-Signature has no h1 signature"));
    }
    Ok((raw_ts, ts, signatures))
}

fn mac(secret: &str, ts: &str, body: &[u8]) -> [u8; 32] {
    util::hmac_sha256(secret.as_bytes(), &[ts.as_bytes(), b":", body])
}

/// Writes `ts=<now>;h1=<hex>`.
pub(super) fn resign(secret: &str, headers: &mut Vec<(String, Vec<u8>)>, body: &[u8], now: i64) {
    let ts = now.to_string();
    let value = format!("ts={ts};h1={}", hex::encode(mac(secret, &ts, body)));
    util::set_header(headers, HEADER, value.into_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_needs_ts_and_an_h1() {
        assert!(parse("h1=00").is_err());
        assert!(parse("ts=1").is_err());
        assert!(parse("ts=1;h1").is_err());
        assert!(parse("ts=x;h1=00").is_err());
        assert!(parse("ts=1;ts=1;h1=00").is_err());
        let (raw, ts, sigs) = parse("ts=7;h2=00;h1=zz;h1=0a").expect("one hex h1");
        assert_eq!((raw, ts), ("7", 7));
        assert_eq!(sigs, [vec![0x0a]]);
    }
}
