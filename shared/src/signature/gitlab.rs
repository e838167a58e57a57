//! GitLab: `X-Gitlab-Token` carries the configured token verbatim. It is a bearer
//! secret, not a signature: it authenticates neither the body nor the time.

use sha2::{Digest, Sha256};

use super::{
    util::{self, Failure},
    SignedRequest,
};

const HEADER: &str = "X-Gitlab-Token";

/// Compares the token with each secret, byte for byte and case-sensitively.
/// Both sides are hashed first so the comparison time does not reveal the
/// secret's length either.
pub(super) fn verify(secrets: &[&str], req: &SignedRequest<'_>) -> Result<(), Failure> {
    let token = util::required(req.headers, HEADER)?;
    if token.is_empty() {
        return Err(Failure::invalid(format!("empty {HEADER} header")));
    }
    let token_hash = Sha256::digest(token);
    let matched = util::any_secret(secrets, |secret| {
        util::ct_eq(&Sha256::digest(secret.as_bytes()), &token_hash)
    });
    if !matched {
        return Err(Failure::invalid("token does not match"));
    }
    Ok(())
}
