//! GitHub: `X-Hub-Signature-256: sha256=<hex>`, HMAC-SHA256 over the body. The
//! legacy SHA-1 `X-Hub-Signature` alone is refused (downgrade).

use super::{
    util::{self, Failure},
    SignedRequest,
};

const HEADER_256: &str = "X-Hub-Signature-256";
const HEADER_SHA1: &str = "X-Hub-Signature";

/// Checks `X-Hub-Signature-256`; no timestamp is signed, so no window applies.
pub(super) fn verify(secrets: &[&str], req: &SignedRequest<'_>) -> Result<(), Failure> {
    let Some(value) = util::header(req.headers, HEADER_256)? else {
        if util::header(req.headers, HEADER_SHA1)?.is_some() {
            return Err(Failure::invalid(
                "sha1-only signatures are refused: downgrade",
            ));
        }
        return Err(Failure::invalid(format!("missing {HEADER_256} header")));
    };
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

/// Decodes `sha256=<hex>`.
pub(super) fn parse(value: &[u8]) -> Result<Vec<u8>, Failure> {
    value
        .strip_prefix(b"sha256=")
        .and_then(|hex_sig| hex::decode(hex_sig).ok())
        .ok_or_else(|| Failure::invalid(format!("{HEADER_256} is not sha256=<hex>")))
}

/// Writes a fresh `X-Hub-Signature-256`, and `X-Hub-Signature` too when the
/// request already carried the legacy header.
pub(super) fn resign(secret: &str, headers: &mut Vec<(String, Vec<u8>)>, body: &[u8]) {
    let sha256 = util::hmac_sha256(secret.as_bytes(), &[body]);
    let value = format!("sha256={}", hex::encode(sha256));
    util::set_header(headers, HEADER_256, value.into_bytes());
    if util::first_value(headers, HEADER_SHA1).is_some() {
        let sha1 = util::hmac_sha1(secret.as_bytes(), &[body]);
        let value = format!("sha1={}", hex::encode(sha1));
        util::set_header(headers, HEADER_SHA1, value.into_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resign_reproduces_the_official_vector_and_legacy_header() {
        let mut headers = vec![("x-hub-signature".to_owned(), b"sha1=00".to_vec())];
        resign("It's a Secret to Everybody", &mut headers, b"Hello, World!");
        assert_eq!(
            headers,
            [
                (
                    "x-hub-signature".to_owned(),
                    b"sha1=01dc10d0c83e72ed246219cdd91669667fe2ca59".to_vec()
                ),
                (
                    "X-Hub-Signature-256".to_owned(),
                    b"sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
                        .to_vec()
                ),
            ]
        );
    }
}
