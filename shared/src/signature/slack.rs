//! Slack: `X-Slack-Signature: v0=<hex>` and `X-Slack-Request-Timestamp`,
//! HMAC-SHA256 over `"v0:<ts>:<body>"` (slack_sdk `signature/__init__.py`).

use super::{
    util::{self, Failure},
    SignedRequest,
};

const SIGNATURE: &str = "X-Slack-Signature";
const TIMESTAMP: &str = "X-Slack-Request-Timestamp";

/// Checks the signature; two-sided window like slack_sdk (`abs(now - ts)`).
pub(super) fn verify(
    secrets: &[&str],
    req: &SignedRequest<'_>,
    now: i64,
    tolerance_s: u64,
) -> Result<(), Failure> {
    let value = util::required(req.headers, SIGNATURE)?;
    let raw_ts = util::required_text(req.headers, TIMESTAMP)?;
    let ts = util::parse_unix(raw_ts)
        .ok_or_else(|| Failure::invalid(format!("{TIMESTAMP} is not unix seconds")))?;
    let signature = parse(value)?;
    let matched = util::any_secret(secrets, |secret| {
        util::ct_eq(&mac(secret, raw_ts, req.body), &signature)
    });
    if !matched {
        return Err(Failure::invalid("signature does not match"));
    }
    util::check_window(ts, now, tolerance_s, true)
}

/// Decodes `v0=<hex>`.
pub(super) fn parse(value: &[u8]) -> Result<Vec<u8>, Failure> {
    value
        .strip_prefix(b"v0=")
        .and_then(|hex_sig| hex::decode(hex_sig).ok())
        .ok_or_else(|| Failure::invalid(format!("{SIGNATURE} is not v0=<hex>")))
}

fn mac(secret: &str, ts: &str, body: &[u8]) -> [u8; 32] {
    util::hmac_sha256(secret.as_bytes(), &[b"v0:", ts.as_bytes(), b":", body])
}

/// Writes a fresh timestamp and `v0` signature.
pub(super) fn resign(secret: &str, headers: &mut Vec<(String, Vec<u8>)>, body: &[u8], now: i64) {
    let ts = now.to_string();
    let value = format!("v0={}", hex::encode(mac(secret, &ts, body)));
    util::set_header(headers, TIMESTAMP, ts.into_bytes());
    util::set_header(headers, SIGNATURE, value.into_bytes());
}
