//! Standard Webhooks and Svix: `webhook-id`, `webhook-timestamp` and
//! `webhook-signature: v1,<base64> [v1,<base64> …]` (or the same with `svix-`),
//! HMAC-SHA256 over `"<id>.<timestamp>.<body>"` keyed by the base64-decoded secret.

use super::{
    util::{self, Failure},
    Provider, SignError, SignedRequest,
};

/// The prefix `whsec_` that serialised symmetric secrets carry.
const SECRET_PREFIX: &str = "whsec_";

/// Header names of one family: white-labelled `webhook-*` or Svix's `svix-*`.
struct Family {
    id: &'static str,
    timestamp: &'static str,
    signature: &'static str,
}

const WEBHOOK: Family = Family {
    id: "webhook-id",
    timestamp: "webhook-timestamp",
    signature: "webhook-signature",
};

const SVIX: Family = Family {
    id: "svix-id",
    timestamp: "svix-timestamp",
    signature: "svix-signature",
};

/// Checks the signature list; two-sided window like the reference libraries.
/// All three headers come from the family of the signature header, so a request
/// cannot mix a `svix-id` with a `webhook-signature`.
pub(super) fn verify(
    secrets: &[&str],
    req: &SignedRequest<'_>,
    now: i64,
    tolerance_s: u64,
) -> Result<(), Failure> {
    let family = if util::header(req.headers, WEBHOOK.signature)?.is_some() {
        WEBHOOK
    } else {
        SVIX
    };
    let value = util::required_text(req.headers, family.signature)?;
    let id = util::required(req.headers, family.id)?;
    let raw_ts = util::required_text(req.headers, family.timestamp)?;
    let ts = util::parse_unix(raw_ts)
        .ok_or_else(|| Failure::invalid(format!("{} is not unix seconds", family.timestamp)))?;
    let signatures = parse(value)?;
    let mut keys = Vec::with_capacity(secrets.len());
    for secret in secrets {
        keys.push(decode_secret(secret).map_err(|e| Failure::invalid(e.to_string()))?);
    }
    let matched = util::any_secret(&keys, |key| {
        util::matches_any(&mac(key, id, ts, req.body), &signatures)
    });
    if !matched {
        return Err(Failure::invalid("no v1 signature matches"));
    }
    util::check_window(ts, now, tolerance_s, true)
}

/// Decodes the space-separated `v1,<base64>` entries. Other versions (`v1a`
/// ed25519, unknown `v2`) and undecodable values are skipped.
pub(super) fn parse(value: &str) -> Result<Vec<Vec<u8>>, Failure> {
    let mut entries = 0;
    let mut signatures = Vec::new();
    for entry in value.split(' ').filter(|e| !e.is_empty()) {
        entries += 1;
        util::check_entry_count(entries)?;
        if let Some(("v1", b64)) = entry.split_once(',') {
            if let Some(sig) = util::b64_decode(b64).filter(|s| !s.is_empty()) {
                signatures.push(sig);
            }
        }
    }
    if signatures.is_empty() {
        return Err(Failure::invalid("no v1 signature in header"));
    }
    Ok(signatures)
}

/// The HMAC key: the secret without `whsec_`, base64-decoded. Bare base64 is
/// accepted too, as the reference libraries do.
fn decode_secret(secret: &str) -> Result<Vec<u8>, SignError> {
    let b64 = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    match util::b64_decode_secret(b64) {
        Some(key) if !key.is_empty() => Ok(key),
        Some(_) => Err(SignError::BadSecret("secret decodes to an empty key")),
        None => Err(SignError::BadSecret("secret is not whsec_<base64>")),
    }
}

/// The reference libraries sign the timestamp as the integer they parsed.
fn mac(key: &[u8], id: &[u8], ts: i64, body: &[u8]) -> [u8; 32] {
    let ts = ts.to_string();
    util::hmac_sha256(key, &[id, b".", ts.as_bytes(), b".", body])
}

/// Writes a fresh timestamp and a single `v1` signature, keeping the request's
/// header family and its message id.
pub(super) fn resign(
    secret: &str,
    headers: &mut Vec<(String, Vec<u8>)>,
    body: &[u8],
    now: i64,
) -> Result<(), SignError> {
    let key = decode_secret(secret)?;
    let uses_svix = [SVIX.id, SVIX.signature, SVIX.timestamp]
        .iter()
        .any(|name| util::first_value(headers, name).is_some());
    let uses_webhook = [WEBHOOK.id, WEBHOOK.signature, WEBHOOK.timestamp]
        .iter()
        .any(|name| util::first_value(headers, name).is_some());
    let family = if uses_svix && !uses_webhook {
        SVIX
    } else {
        WEBHOOK
    };
    let id = util::first_value(headers, family.id)
        .ok_or(SignError::MissingId(Provider::StandardWebhooks))?
        .to_vec();
    let signature = format!("v1,{}", util::b64_encode(&mac(&key, &id, now, body)));
    util::set_header(headers, family.timestamp, now.to_string().into_bytes());
    util::set_header(headers, family.signature, signature.into_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_vector_signs() {
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("base64");
        assert_eq!(key.len(), 24);
        let sig = mac(
            &key,
            b"msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            util::b64_encode(&sig),
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn bad_secrets_are_reported_without_their_value() {
        for bad in ["whsec_", "whsec_!!!", ""] {
            let err = decode_secret(bad).expect_err("not a key");
            assert!(matches!(err, SignError::BadSecret(_)));
        }
    }

    #[test]
    fn signature_list_skips_other_versions() {
        assert!(parse("v1,").is_err());
        assert!(parse("v2,AAAA v1a,AAAA").is_err());
        assert_eq!(parse("v2,AAAA  v1,AAAA").expect("one v1"), [vec![0, 0, 0]]);
        let many = "v1,AAAA ".repeat(9);
        assert!(parse(&many).is_err());
    }
}
