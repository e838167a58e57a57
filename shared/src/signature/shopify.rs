//! Shopify: `X-Shopify-Hmac-Sha256: <base64>`, HMAC-SHA256 over the body keyed by
//! the app's client secret. Nothing time-related is signed.

use super::{
    util::{self, Failure},
    SignedRequest,
};

const HEADER: &str = "X-Shopify-Hmac-Sha256";

/// Checks the base64 MAC; hex or other encodings are refused.
pub(super) fn verify(secrets: &[&str], req: &SignedRequest<'_>) -> Result<(), Failure> {
    let value = util::required_text(req.headers, HEADER)?;
    let signature = parse(value)?;
    let matched = util::any_secret(secrets, |secret| {
        util::ct_eq(
            &util::hmac_sha256(secret.as_bytes(), &[req.body]),
            &signature,
        )
    });
    if !matched {
        return Err(Failure::invalid("signature does not match"));
    }
    Ok(())
}

/// Decodes the base64 MAC.
pub(super) fn parse(value: &str) -> Result<Vec<u8>, Failure> {
    util::b64_decode(value).ok_or_else(|| Failure::invalid(format!("{HEADER} is not base64")))
}

/// Writes a fresh `X-Shopify-Hmac-Sha256`.
pub(super) fn resign(secret: &str, headers: &mut Vec<(String, Vec<u8>)>, body: &[u8]) {
    let mac = util::hmac_sha256(secret.as_bytes(), &[body]);
    util::set_header(headers, HEADER, util::b64_encode(&mac).into_bytes());
}
