//! Stripe: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=…][,v0=…]`, HMAC-SHA256 over
//! `"<t>.<body>"` keyed by the whole `whsec_…` string (stripe-go `webhook/client.go`).

use super::{
    util::{self, Failure},
    SignedRequest,
};

const HEADER: &str = "Stripe-Signature";

/// Checks the header; one-sided window like stripe-go (`now - t > tolerance`).
pub(super) fn verify(
    secrets: &[&str],
    req: &SignedRequest<'_>,
    now: i64,
    tolerance_s: u64,
) -> Result<(), Failure> {
    let value = util::required_text(req.headers, HEADER)?;
    let (t, signatures) = parse(value)?;
    let ts = t.to_string();
    let matched = util::any_secret(secrets, |secret| {
        let mac = util::hmac_sha256(secret.as_bytes(), &[ts.as_bytes(), b".", req.body]);
        util::matches_any(&mac, &signatures)
    });
    if !matched {
        return Err(Failure::invalid("no v1 signature matches"));
    }
    util::check_window(t, now, tolerance_s, false)
}

/// Parses the header the way stripe-go does: every pair must split into exactly
/// two parts on `=`; only hex `v1` values count; other schemes are skipped.
pub(super) fn parse(value: &str) -> Result<(i64, Vec<Vec<u8>>), Failure> {
    let malformed = || Failure::invalid("malformed Stripe-Signature header");
    let mut t = None;
    let mut entries = 0;
    let mut signatures = Vec::new();
    for pair in value.split(',') {
        let mut parts = pair.split('=');
        let (Some(key), Some(val), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(malformed());
        };
        if key == "t" {
            if t.is_some() {
                return Err(Failure::invalid("Stripe-Signature has two timestamps"));
            }
            t = Some(util::parse_unix(val).ok_or_else(malformed)?);
            continue;
        }
        entries += 1;
        util::check_entry_count(entries)?;
        if key == "v1" {
            if let Ok(sig) = hex::decode(val) {
                signatures.push(sig);
            }
        }
    }
    let t = t.ok_or_else(|| Failure::invalid("Stripe-Signature has no timestamp"))?;
    if signatures.is_empty() {
        return Err(Failure::invalid("Stripe-Signature has no v1 signature"));
    }
    Ok((t, signatures))
}

/// The header value Stripe would send at `t`.
pub(super) fn sign(secret: &str, body: &[u8], t: i64) -> String {
    let ts = t.to_string();
    let mac = util::hmac_sha256(secret.as_bytes(), &[ts.as_bytes(), b".", body]);
    format!("t={ts},v1={}", hex::encode(mac))
}

/// Replaces the header with a single fresh `v1` signature at `now`.
pub(super) fn resign(secret: &str, headers: &mut Vec<(String, Vec<u8>)>, body: &[u8], now: i64) {
    util::set_header(headers, HEADER, sign(secret, body, now).into_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_grammar_follows_stripe_go() {
        assert!(parse("v1,t=1").is_err());
        assert!(parse("t=").is_err());
        assert!(parse("t=1,v0=aa").is_err());
        assert!(parse("t=1,t=2,v1=aa").is_err());
        assert!(parse("t=1,v1=a=b").is_err());
        let (t, sigs) = parse("t=12,v1=zz,v1=abcd,v9=00").expect("one hex v1");
        assert_eq!(t, 12);
        assert_eq!(sigs, [vec![0xab, 0xcd]]);
        let many = format!("t=1{}", ",v1=00".repeat(9));
        assert!(matches!(parse(&many), Err(Failure::Invalid(r)) if r.contains("too many")));
    }

    #[test]
    fn sign_matches_the_vector() {
        let body = b"{\n  \"id\": \"evt_test_webhook\",\n  \"object\": \"event\"\n}";
        assert_eq!(
            sign("whsec_test_secret", body, 1_700_000_000),
            "t=1700000000,v1=4f1cd7feda9826e746b7d482c4badebb657398df1099e1046364f6196a230150"
        );
    }
}
