//! Twilio: `X-Twilio-Signature: <base64>`, HMAC-SHA1 (or HMAC-SHA256 when a
//! Webhooks Rule says so) over the full public URL followed by every form
//! parameter as `name + value`, sorted. JSON bodies are instead covered by a
//! `bodySHA256` query parameter (twilio-python `request_validator.py`).

use sha2::{Digest, Sha256};

use super::{
    util::{self, Failure},
    SignedRequest,
};

const SIGNATURE: &str = "X-Twilio-Signature";
const SETTINGS: &str = "X-Twilio-Webhooks-Signature-Settings";
const FORM: &str = "application/x-www-form-urlencoded";

/// Decoded form parameters as `(name, value)` byte strings.
type Params = Vec<(Vec<u8>, Vec<u8>)>;

/// Checks the signature over the URL with the port removed and with the
/// scheme's default port added; Twilio's own validator tries both because its
/// signing side is inconsistent. No timestamp is signed.
pub(super) fn verify(secrets: &[&str], req: &SignedRequest<'_>) -> Result<(), Failure> {
    let value = util::required_text(req.headers, SIGNATURE)?;
    let url = req
        .url
        .ok_or_else(|| Failure::invalid("twilio verification needs the public request URL"))?;
    let signature = parse(value)?;
    let sha256 = uses_sha256(req)?;
    let params = signed_params(req, url)?;
    let (without_port, with_port) = url_variants(url);
    let matched = secrets.iter().fold(false, |acc, secret| {
        [&without_port, &with_port].iter().fold(acc, |acc, url| {
            let mut parts: Vec<&[u8]> = vec![url.as_bytes()];
            for (name, value) in &params {
                parts.push(name);
                parts.push(value);
            }
            let mac: Vec<u8> = if sha256 {
                util::hmac_sha256(secret.as_bytes(), &parts).to_vec()
            } else {
                util::hmac_sha1(secret.as_bytes(), &parts).to_vec()
            };
            acc | util::ct_eq(&mac, &signature)
        })
    });
    if !matched {
        return Err(Failure::invalid("signature does not match"));
    }
    Ok(())
}

/// Decodes the base64 MAC.
pub(super) fn parse(value: &str) -> Result<Vec<u8>, Failure> {
    util::b64_decode(value).ok_or_else(|| Failure::invalid(format!("{SIGNATURE} is not base64")))
}

/// `X-Twilio-Webhooks-Signature-Settings: key=…,algorithm=HMAC_SHA256` switches
/// the MAC; the signed string stays the same. Either MAC needs the secret, so
/// honouring this unsigned header cannot weaken the check.
fn uses_sha256(req: &SignedRequest<'_>) -> Result<bool, Failure> {
    let Some(value) = util::header(req.headers, SETTINGS)? else {
        return Ok(false);
    };
    Ok(value.split(|&b| b == b',').any(|item| {
        item.trim_ascii()
            .eq_ignore_ascii_case(b"algorithm=HMAC_SHA256")
    }))
}

/// The `(name, value)` pairs appended to the URL, sorted, duplicates dropped
/// (twilio-python sorts `set(params)` and `set(values)`).
///
/// A `bodySHA256` query parameter means the body is covered by its hash and no
/// parameters are appended. Otherwise a form body is decoded into parameters. Any
/// other non-empty body would be covered by nothing, so it is refused.
fn signed_params(req: &SignedRequest<'_>, url: &str) -> Result<Params, Failure> {
    let query = url
        .split_once('?')
        .map(|(_, q)| q.split_once('#').map_or(q, |(q, _)| q));
    let body_hash = query.and_then(|q| {
        form_pairs(q.as_bytes())
            .into_iter()
            .find(|(name, _)| name == b"bodySHA256")
            .map(|(_, value)| value)
    });
    if let Some(expected) = body_hash {
        let actual = hex::encode(Sha256::digest(req.body));
        if !util::ct_eq(actual.as_bytes(), &expected) {
            return Err(Failure::invalid("body does not match bodySHA256"));
        }
        return Ok(Vec::new());
    }
    if is_form(req)? {
        let mut params = form_pairs(req.body);
        params.sort();
        params.dedup();
        return Ok(params);
    }
    if req.body.is_empty() {
        return Ok(Vec::new());
    }
    Err(Failure::invalid(
        "body is neither form data nor covered by bodySHA256",
    ))
}

fn is_form(req: &SignedRequest<'_>) -> Result<bool, Failure> {
    let Some(value) = util::header(req.headers, "Content-Type")? else {
        return Ok(false);
    };
    let media_type = value.split(|&b| b == b';').next().unwrap_or_default();
    Ok(media_type
        .trim_ascii()
        .eq_ignore_ascii_case(FORM.as_bytes()))
}

/// Splits `a=1&b=2` into decoded pairs. A name without `=` has an empty value,
/// and blank values are kept: Twilio signs every parameter it sends.
pub(super) fn form_pairs(data: &[u8]) -> Params {
    data.split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.iter().position(|&b| b == b'=') {
            Some(i) => (form_decode(&pair[..i]), form_decode(&pair[i + 1..])),
            None => (form_decode(pair), Vec::new()),
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space and `%XX` a
/// byte; a `%` not followed by two hex digits stays as it is.
fn form_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = input.get(i + 1).and_then(|&c| hex_value(c));
                let lo = input.get(i + 2).and_then(|&c| hex_value(c));
                if let (Some(hi), Some(lo)) = (hi, lo) {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            other => out.push(other),
        }
        i += 1;
    }
    out
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The URL without its port and with the scheme's default port (443 for https,
/// 80 otherwise) when it has none, like twilio-python's `remove_port` and
/// `add_port`. A URL that does not parse is used unchanged for both.
pub(super) fn url_variants(url: &str) -> (String, String) {
    let Some(scheme_end) = url.find("://") else {
        return (url.to_owned(), url.to_owned());
    };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    let host_start = authority.rfind('@').map_or(0, |i| i + 1);
    let host_port = &authority[host_start..];
    let port_start = host_port
        .rfind(':')
        .filter(|&i| {
            let port = &host_port[i + 1..];
            !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && !host_port[i..].contains(']')
        })
        .map(|i| authority_start + host_start + i);
    match port_start {
        Some(colon) => {
            let without = format!("{}{}", &url[..colon], &url[authority_end..]);
            (without, url.to_owned())
        }
        None => {
            let default = if url[..scheme_end].eq_ignore_ascii_case("https") {
                ":443"
            } else {
                ":80"
            };
            let with = format!(
                "{}{default}{}",
                &url[..authority_end],
                &url[authority_end..]
            );
            (url.to_owned(), with)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_handles_plus_percent_and_garbage() {
        assert_eq!(form_decode(b"a+b%2Bc%20d"), b"a b+c d");
        assert_eq!(form_decode(b"100%"), b"100%");
        assert_eq!(form_decode(b"%zz%4"), b"%zz%4");
        assert_eq!(form_decode(b"%e2%98%95"), "☕".as_bytes());
        assert_eq!(
            form_pairs(b"a=1&&b&c=x=y"),
            [
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), Vec::new()),
                (b"c".to_vec(), b"x=y".to_vec()),
            ]
        );
    }

    #[test]
    fn url_variants_add_and_remove_ports() {
        assert_eq!(
            url_variants("https://mycompany.com/myapp.php?foo=1&bar=2"),
            (
                "https://mycompany.com/myapp.php?foo=1&bar=2".to_owned(),
                "https://mycompany.com:443/myapp.php?foo=1&bar=2".to_owned()
            )
        );
        assert_eq!(
            url_variants("http://mycompany.com:1234/x"),
            (
                "http://mycompany.com/x".to_owned(),
                "http://mycompany.com:1234/x".to_owned()
            )
        );
        assert_eq!(
            url_variants("http://u:p@host?q=1"),
            (
                "http://u:p@host?q=1".to_owned(),
                "http://u:p@host:80?q=1".to_owned()
            )
        );
        assert_eq!(
            url_variants("https://[::1]:8443/a"),
            (
                "https://[::1]/a".to_owned(),
                "https://[::1]:8443/a".to_owned()
            )
        );
        assert_eq!(
            url_variants("https://[::1]/a"),
            (
                "https://[::1]/a".to_owned(),
                "https://[::1]:443/a".to_owned()
            )
        );
        assert_eq!(url_variants("nonsense").0, "nonsense");
    }
}
