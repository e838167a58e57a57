//! Signature verification against the 68 checked vectors, re-signing round
//! trips, secret rotation and hostile header values.

use std::collections::BTreeMap;

use hookrelay_shared::signature::{
    detect, resign, verify, verify_detected, Provider, SecretSet, SignError, SignedRequest, Verdict,
};
use proptest::prelude::*;
use serde::Deserialize;

const VECTORS: &str = include_str!("data/signature-vectors.json");

/// Every header name that carries a signature (or GitLab's token).
const SIGNATURE_HEADERS: [&str; 11] = [
    "stripe-signature",
    "x-hub-signature-256",
    "x-hub-signature",
    "x-slack-signature",
    "x-shopify-hmac-sha256",
    "webhook-signature",
    "svix-signature",
    "x-twilio-signature",
    "twitch-eventsub-message-signature",
    "paddle-signature",
    "x-gitlab-token",
];

#[derive(Debug, Deserialize)]
struct Vector {
    id: String,
    provider: String,
    secret: String,
    url: Option<String>,
    headers: BTreeMap<String, String>,
    body: String,
    now_unix: i64,
    tolerance_s: Option<u64>,
    expect_valid: bool,
}

impl Vector {
    fn provider(&self) -> Provider {
        self.provider
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", self.id))
    }

    fn headers(&self) -> Vec<(String, Vec<u8>)> {
        self.headers
            .iter()
            .map(|(n, v)| (n.clone(), v.as_bytes().to_vec()))
            .collect()
    }

    fn has_signature_header(&self) -> bool {
        self.headers
            .keys()
            .any(|n| SIGNATURE_HEADERS.contains(&n.to_ascii_lowercase().as_str()))
    }

    fn verify_with(&self, headers: &[(String, Vec<u8>)], body: &[u8], now: i64) -> Verdict {
        let req = SignedRequest {
            headers,
            body,
            url: self.url.as_deref(),
        };
        verify(
            self.provider(),
            &[&self.secret],
            &req,
            now,
            self.tolerance_s,
        )
    }

    fn verdict(&self) -> Verdict {
        self.verify_with(&self.headers(), self.body.as_bytes(), self.now_unix)
    }
}

fn vectors() -> Vec<Vector> {
    serde_json::from_str(VECTORS).expect("signature-vectors.json parses")
}

fn first_valid(provider: Provider) -> Vector {
    vectors()
        .into_iter()
        .find(|v| v.expect_valid && v.provider() == provider && v.has_signature_header())
        .unwrap_or_else(|| panic!("a valid {provider} vector"))
}

#[test]
fn all_68_vectors_give_the_expected_verdict() {
    let vectors = vectors();
    assert_eq!(vectors.len(), 68);
    let failures: Vec<String> = vectors
        .iter()
        .filter_map(|v| {
            let verdict = v.verdict();
            (verdict.is_valid() != v.expect_valid).then(|| format!("{}: {verdict:?}", v.id))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "failing vectors:\n{}",
        failures.join("\n")
    );
}

#[test]
fn invalid_vectors_name_their_provider_and_never_the_secret() {
    for v in vectors().iter().filter(|v| !v.expect_valid) {
        let verdict = v.verdict();
        assert_eq!(verdict.provider(), Some(v.provider()), "{}", v.id);
        if let Verdict::Invalid { reason, .. } = &verdict {
            assert!(!reason.contains(&v.secret), "{}: {reason}", v.id);
        }
    }
}

#[test]
fn stale_vectors_are_reported_as_stale() {
    for v in vectors().iter().filter(|v| {
        v.id.contains("stale") || (v.id.contains("future") && v.provider() != Provider::Stripe)
    }) {
        assert!(
            matches!(v.verdict(), Verdict::Stale { .. }),
            "{}: {:?}",
            v.id,
            v.verdict()
        );
    }
}

#[test]
fn detect_finds_the_provider_of_every_signed_vector() {
    let vectors = vectors();
    let mut checked = 0;
    for v in &vectors {
        let detected = detect(&v.headers());
        if v.has_signature_header() {
            assert_eq!(detected, Some(v.provider()), "{}", v.id);
            checked += 1;
        } else {
            assert_eq!(detected, None, "{}", v.id);
        }
    }
    assert_eq!(checked, 63);
}

#[test]
fn verify_detected_uses_the_configured_secrets() {
    let v = first_valid(Provider::Github);
    let headers = v.headers();
    let req = SignedRequest {
        headers: &headers,
        body: v.body.as_bytes(),
        url: None,
    };
    let mut secrets = SecretSet::new();
    secrets
        .add(Provider::Stripe, "whsec_other".into())
        .expect("room");
    assert_eq!(
        verify_detected(&secrets, &req, v.now_unix),
        Verdict::NoSecret {
            provider: Provider::Github
        }
    );
    secrets
        .add(Provider::Github, v.secret.clone())
        .expect("room");
    assert_eq!(
        verify_detected(&secrets, &req, v.now_unix),
        Verdict::Valid {
            provider: Provider::Github
        }
    );
    let plain = vec![("Content-Type".to_owned(), b"text/plain".to_vec())];
    let req = SignedRequest {
        headers: &plain,
        body: b"hi",
        url: None,
    };
    assert_eq!(verify_detected(&secrets, &req, 0), Verdict::Unsigned);
}

#[test]
fn resign_round_trips_for_every_resignable_provider() {
    let resignable: Vec<Provider> = Provider::ALL
        .into_iter()
        .filter(|p| p.can_resign())
        .collect();
    assert_eq!(resignable.len(), 7);
    for provider in resignable {
        let v = first_valid(provider);
        let later = v.now_unix + 10_000;
        let old = v.headers();
        let body = v.body.as_bytes();

        let mut fresh = old.clone();
        resign(provider, &v.secret, &mut fresh, body, later).expect("resign");
        assert_eq!(
            v.verify_with(&fresh, body, later),
            Verdict::Valid { provider },
            "{provider} re-signed"
        );
        // Existing headers keep their name and position; nothing is duplicated.
        for (i, (name, _)) in old.iter().enumerate() {
            assert_eq!(&fresh[i].0, name, "{provider}: header {i} moved");
        }

        let old_at_later = v.verify_with(&old, body, later);
        if provider.default_tolerance_s().is_some() {
            assert!(
                matches!(old_at_later, Verdict::Stale { .. }),
                "{provider} old headers later: {old_at_later:?}"
            );
        } else {
            // No timestamp is signed: the fresh signature is the old one.
            assert_eq!(fresh, old, "{provider}");
        }

        let edited = [body, b" edited"].concat();
        let mut edited_headers = old.clone();
        resign(provider, &v.secret, &mut edited_headers, &edited, later).expect("resign");
        assert!(v.verify_with(&edited_headers, &edited, later).is_valid());
        assert!(!v.verify_with(&fresh, &edited, later).is_valid());
        assert!(!v.verify_with(&old, &edited, v.now_unix).is_valid());
    }
}

#[test]
fn resign_keeps_the_svix_header_family() {
    let v = vectors()
        .into_iter()
        .find(|v| v.id == "svix-valid-svix-prefixed-headers")
        .expect("svix vector");
    let mut headers = v.headers();
    resign(
        Provider::StandardWebhooks,
        &v.secret,
        &mut headers,
        v.body.as_bytes(),
        v.now_unix + 60,
    )
    .expect("resign");
    let mut names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["svix-id", "svix-signature", "svix-timestamp"]);
    assert!(v
        .verify_with(&headers, v.body.as_bytes(), v.now_unix + 60)
        .is_valid());
}

#[test]
fn resign_adds_missing_headers_to_a_bare_request() {
    let body = br#"{"synthetic":true}"#;
    let now = 1_800_000_000;
    for provider in [
        Provider::Stripe,
        Provider::Github,
        Provider::Slack,
        Provider::Shopify,
        Provider::Paddle,
    ] {
        let mut headers = Vec::new();
        resign(provider, "s3cret", &mut headers, body, now).expect("resign");
        assert_eq!(detect(&headers), Some(provider));
        let req = SignedRequest {
            headers: &headers,
            body,
            url: None,
        };
        assert!(verify(provider, &["s3cret"], &req, now, None).is_valid());
    }
    let mut headers = Vec::new();
    assert_eq!(
        resign(Provider::Twitch, "s3cret", &mut headers, body, now),
        Err(SignError::MissingId(Provider::Twitch))
    );
    assert_eq!(
        resign(
            Provider::StandardWebhooks,
            "whsec_AAAA",
            &mut headers,
            body,
            now
        ),
        Err(SignError::MissingId(Provider::StandardWebhooks))
    );
    assert!(matches!(
        resign(
            Provider::StandardWebhooks,
            "whsec_not base64!",
            &mut headers,
            body,
            now
        ),
        Err(SignError::BadSecret(_))
    ));
}

#[test]
fn resign_recomputes_the_legacy_github_sha1_header() {
    let v = vectors()
        .into_iter()
        .find(|v| v.id == "github-invalid-legacy-sha1-only")
        .expect("sha1 vector");
    let expected_sha1 = v.headers["X-Hub-Signature"].clone();
    let mut headers = vec![("X-Hub-Signature".to_owned(), b"sha1=stale".to_vec())];
    resign(
        Provider::Github,
        &v.secret,
        &mut headers,
        v.body.as_bytes(),
        0,
    )
    .expect("resign");
    assert_eq!(headers[0].1, expected_sha1.as_bytes());
    assert!(v.verify_with(&headers, v.body.as_bytes(), 0).is_valid());
}

#[test]
fn rotation_accepts_either_secret_and_empty_fails_closed() {
    for provider in [
        Provider::Stripe,
        Provider::Slack,
        Provider::Twitch,
        Provider::Paddle,
    ] {
        let v = first_valid(provider);
        let headers = v.headers();
        let req = SignedRequest {
            headers: &headers,
            body: v.body.as_bytes(),
            url: v.url.as_deref(),
        };
        let now = v.now_unix;
        let tol = v.tolerance_s;
        assert!(verify(provider, &["previous-secret", &v.secret], &req, now, tol).is_valid());
        assert!(verify(provider, &[&v.secret, "next-secret"], &req, now, tol).is_valid());
        assert!(!verify(provider, &["previous-secret", "next"], &req, now, tol).is_valid());
        assert!(!verify(provider, &[], &req, now, tol).is_valid());
        assert!(!verify(provider, &["", &v.secret], &req, now, tol).is_valid());
    }
    for v in vectors()
        .iter()
        .filter(|v| v.expect_valid && v.provider() != Provider::StandardWebhooks)
    {
        let headers = v.headers();
        let req = SignedRequest {
            headers: &headers,
            body: v.body.as_bytes(),
            url: v.url.as_deref(),
        };
        let verdict = verify(
            v.provider(),
            &["wrong-secret", &v.secret],
            &req,
            v.now_unix,
            v.tolerance_s,
        );
        assert!(verdict.is_valid(), "{}: {verdict:?}", v.id);
    }
}

#[test]
fn rotated_standard_webhooks_secret_is_accepted() {
    let v = first_valid(Provider::StandardWebhooks);
    let headers = v.headers();
    let req = SignedRequest {
        headers: &headers,
        body: v.body.as_bytes(),
        url: None,
    };
    let verdict = verify(
        Provider::StandardWebhooks,
        &["whsec_YW5vdGhlci0yNC1ieXRlLXNlY3JldCEh", &v.secret],
        &req,
        v.now_unix,
        None,
    );
    assert!(verdict.is_valid(), "{verdict:?}");
}

#[test]
fn signature_headers_are_capped() {
    let v = first_valid(Provider::Stripe);
    let many = format!(
        "{},{}",
        v.headers["Stripe-Signature"],
        ["v1=00"; 9].join(",")
    );
    let headers = vec![("Stripe-Signature".to_owned(), many.into_bytes())];
    let verdict = v.verify_with(&headers, v.body.as_bytes(), v.now_unix);
    assert!(
        matches!(&verdict, Verdict::Invalid { reason, .. } if reason.contains("too many")),
        "{verdict:?}"
    );
    let long = format!("{},v0={}", v.headers["Stripe-Signature"], "0".repeat(5000));
    let headers = vec![("Stripe-Signature".to_owned(), long.into_bytes())];
    let verdict = v.verify_with(&headers, v.body.as_bytes(), v.now_unix);
    assert!(
        matches!(&verdict, Verdict::Invalid { reason, .. } if reason.contains("too long")),
        "{verdict:?}"
    );
}

#[test]
fn twilio_needs_the_url_and_a_covered_body() {
    let v = first_valid(Provider::Twilio);
    let headers = v.headers();
    let req = SignedRequest {
        headers: &headers,
        body: v.body.as_bytes(),
        url: None,
    };
    assert!(!verify(Provider::Twilio, &[&v.secret], &req, 0, None).is_valid());
    // The same signature with a JSON content type: the body is covered by nothing.
    let json_headers: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(n, val)| {
            if n.eq_ignore_ascii_case("content-type") {
                (n.clone(), b"application/json".to_vec())
            } else {
                (n.clone(), val.clone())
            }
        })
        .collect();
    let req = SignedRequest {
        headers: &json_headers,
        body: v.body.as_bytes(),
        url: v.url.as_deref(),
    };
    assert!(!verify(Provider::Twilio, &[&v.secret], &req, 0, None).is_valid());
}

/// Every header a provider reads, so proptest can fill any of them with noise.
fn provider_headers(provider: Provider) -> &'static [&'static str] {
    match provider {
        Provider::Stripe => &["Stripe-Signature"],
        Provider::Github => &["X-Hub-Signature-256", "X-Hub-Signature"],
        Provider::Slack => &["X-Slack-Signature", "X-Slack-Request-Timestamp"],
        Provider::Shopify => &["X-Shopify-Hmac-Sha256"],
        Provider::StandardWebhooks => &[
            "webhook-id",
            "webhook-timestamp",
            "webhook-signature",
            "svix-id",
            "svix-timestamp",
            "svix-signature",
        ],
        Provider::Twilio => &[
            "X-Twilio-Signature",
            "X-Twilio-Webhooks-Signature-Settings",
            "Content-Type",
        ],
        Provider::Gitlab => &["X-Gitlab-Token"],
        Provider::Twitch => &[
            "Twitch-Eventsub-Message-Id",
            "Twitch-Eventsub-Message-Timestamp",
            "Twitch-Eventsub-Message-Signature",
        ],
        Provider::Paddle => &["Paddle-Signature"],
    }
}

/// Header values shaped like the real thing, plus raw noise.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        "[tv0-9hsa=,; .:+/Z-]{0,120}".prop_map(String::into_bytes),
        "(t=[0-9]{0,12},)?(v1=[0-9a-f]{0,64},?){0,10}".prop_map(String::into_bytes),
        "(ts=[0-9]{0,12};)?(h1=[0-9a-f]{0,64};?){0,10}".prop_map(String::into_bytes),
        "(v1,[A-Za-z0-9+/=]{0,44} ?){0,10}".prop_map(String::into_bytes),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{0,20}[Z+-]?[0-9:]{0,6}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #[test]
    fn random_headers_never_panic(
        provider_index in 0..Provider::ALL.len(),
        values in proptest::collection::vec((0usize..8, header_value()), 0..6),
        body in proptest::collection::vec(any::<u8>(), 0..64),
        now in any::<i64>(),
        tolerance in proptest::option::of(any::<u64>()),
        url in proptest::option::of("(https?://)?[a-z.:0-9@\\[\\]]{0,20}(/[a-z?&=%+]{0,20})?"),
    ) {
        let provider = Provider::ALL[provider_index];
        let names = provider_headers(provider);
        let headers: Vec<(String, Vec<u8>)> = values
            .into_iter()
            .map(|(i, v)| (names[i % names.len()].to_owned(), v))
            .collect();
        let req = SignedRequest { headers: &headers, body: &body, url: url.as_deref() };
        let verdict = verify(provider, &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"], &req, now, tolerance);
        prop_assert!(!verdict.is_valid(), "{verdict:?}");
        let _ = detect(&headers);
        let mut resigned = headers.clone();
        let _ = resign(provider, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", &mut resigned, &body, now);
    }

    #[test]
    fn garbage_timestamps_are_invalid(
        provider in prop_oneof![
            Just(Provider::Slack),
            Just(Provider::StandardWebhooks),
            Just(Provider::Twitch),
            Just(Provider::Stripe),
            Just(Provider::Paddle),
        ],
        garbage in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let v = first_valid(provider);
        let mut headers = v.headers();
        let replaced = match provider {
            Provider::Slack => set(&mut headers, "x-slack-request-timestamp", garbage.clone()),
            Provider::StandardWebhooks => set(&mut headers, "webhook-timestamp", garbage.clone()),
            Provider::Twitch => set(&mut headers, "twitch-eventsub-message-timestamp", garbage.clone()),
            Provider::Stripe | Provider::Paddle => {
                // Swap the timestamp inside the signature header for the garbage.
                let name = if provider == Provider::Stripe { "stripe-signature" } else { "paddle-signature" };
                let (sep, key) = if provider == Provider::Stripe { (',', "t=") } else { (';', "ts=") };
                let value = headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()).unwrap_or_default();
                let text = String::from_utf8(value).unwrap_or_default();
                let sigs: String = text.split(sep).filter(|p| !p.starts_with(key)).map(|p| format!("{sep}{p}")).collect();
                let mut new = key.as_bytes().to_vec();
                new.extend_from_slice(&garbage);
                new.extend_from_slice(sigs.as_bytes());
                set(&mut headers, name, new)
            }
            _ => unreachable!("timestamped providers only"),
        };
        prop_assume!(replaced);
        let verdict = v.verify_with(&headers, v.body.as_bytes(), v.now_unix);
        prop_assert!(matches!(verdict, Verdict::Invalid { .. }), "{verdict:?}");
    }
}

fn set(headers: &mut [(String, Vec<u8>)], name: &str, value: Vec<u8>) -> bool {
    match headers
        .iter_mut()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
    {
        Some((_, v)) => {
            *v = value;
            true
        }
        None => false,
    }
}

/// The header each provider's signature (or GitLab's token) travels in.
fn signature_header(provider: Provider) -> &'static str {
    match provider {
        Provider::Stripe => "Stripe-Signature",
        Provider::Github => "X-Hub-Signature-256",
        Provider::Slack => "X-Slack-Signature",
        Provider::Shopify => "X-Shopify-Hmac-Sha256",
        Provider::StandardWebhooks => "webhook-signature",
        Provider::Twilio => "X-Twilio-Signature",
        Provider::Gitlab => "X-Gitlab-Token",
        Provider::Twitch => "Twitch-Eventsub-Message-Signature",
        Provider::Paddle => "Paddle-Signature",
    }
}

/// A request as `provider` would send it: `resign` for the seven schemes that
/// can, by hand for the other two. Twilio signs the URL, so the body is
/// covered through a `bodySHA256` query parameter; GitLab sends the token.
struct Signed {
    headers: Vec<(String, Vec<u8>)>,
    url: Option<String>,
}

fn sign(provider: Provider, secret: &str, body: &[u8], ts: i64) -> Signed {
    use base64::Engine as _;
    use hmac::Mac as _;
    use sha2::Digest as _;
    let mut headers = vec![("Content-Type".to_owned(), b"application/json".to_vec())];
    let mut url = None;
    match provider {
        Provider::Twilio => {
            let u = format!(
                "https://example.com/twilio?bodySHA256={}",
                hex::encode(sha2::Sha256::digest(body))
            );
            let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes())
                .expect("HMAC takes any key");
            mac.update(u.as_bytes());
            let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            headers.push((signature_header(provider).to_owned(), sig.into_bytes()));
            url = Some(u);
        }
        Provider::Gitlab => {
            headers.push((
                signature_header(provider).to_owned(),
                secret.as_bytes().to_vec(),
            ));
        }
        _ => {
            // The message ids that Standard Webhooks and Twitch sign.
            headers.push((
                "webhook-id".to_owned(),
                b"msg_2KWPBgLlAfxdpx2AI54pPJ85f4W".to_vec(),
            ));
            headers.push((
                "Twitch-Eventsub-Message-Id".to_owned(),
                b"befa7b53-d79d-478f-86b9-120f112b044e".to_vec(),
            ));
            resign(provider, secret, &mut headers, body, ts).expect("resign");
        }
    }
    Signed { headers, url }
}

impl Signed {
    fn verify(&self, provider: Provider, secrets: &[&str], body: &[u8], now: i64) -> Verdict {
        let req = SignedRequest {
            headers: &self.headers,
            body,
            url: self.url.as_deref(),
        };
        verify(provider, secrets, &req, now, None)
    }
}

fn any_provider() -> impl Strategy<Value = Provider> {
    proptest::sample::select(Provider::ALL.to_vec())
}

/// A secret in the provider's format: `whsec_<base64>` for Standard Webhooks,
/// any printable text for the others.
fn secret_for(provider: Provider) -> BoxedStrategy<String> {
    use base64::Engine as _;
    match provider {
        Provider::StandardWebhooks => proptest::collection::vec(any::<u8>(), 1..40)
            .prop_map(|key| {
                format!(
                    "whsec_{}",
                    base64::engine::general_purpose::STANDARD.encode(key)
                )
            })
            .boxed(),
        _ => "[!-~]{1,40}".boxed(),
    }
}

/// A provider with two different secrets in its format.
fn provider_and_secrets() -> impl Strategy<Value = (Provider, String, String)> {
    any_provider().prop_flat_map(|p| {
        (Just(p), secret_for(p), secret_for(p))
            .prop_filter("two different secrets", |(_, a, b)| a != b)
    })
}

/// Unix seconds from 1970 to 2100.
fn timestamp() -> impl Strategy<Value = i64> {
    0i64..4_102_444_800
}

/// Whether changing `from` to `to` keeps a hex digit's value (`a` and `A`).
fn same_hex_digit(from: u8, to: u8) -> bool {
    from.is_ascii_hexdigit() && from.is_ascii_alphabetic() && from.eq_ignore_ascii_case(&to)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_provider_verifies_what_it_signed(
        (provider, secret, _) in provider_and_secrets(),
        body in proptest::collection::vec(any::<u8>(), 0..256),
        ts in timestamp(),
    ) {
        let signed = sign(provider, &secret, &body, ts);
        let verdict = signed.verify(provider, &[&secret], &body, ts);
        prop_assert_eq!(verdict, Verdict::Valid { provider });
        // And as the agent checks it: detected, then verified.
        let mut set = SecretSet::new();
        set.add(provider, secret.clone()).expect("room for a secret");
        let req = SignedRequest { headers: &signed.headers, body: &body, url: signed.url.as_deref() };
        prop_assert_eq!(verify_detected(&set, &req, ts), Verdict::Valid { provider });
    }

    #[test]
    fn flipping_any_body_byte_invalidates(
        (provider, secret, _) in provider_and_secrets(),
        body in proptest::collection::vec(any::<u8>(), 1..256),
        ts in timestamp(),
        at in any::<proptest::sample::Index>(),
        mask in 1u8..,
    ) {
        let signed = sign(provider, &secret, &body, ts);
        let mut flipped = body.clone();
        flipped[at.index(body.len())] ^= mask;
        let verdict = signed.verify(provider, &[&secret], &flipped, ts);
        if provider == Provider::Gitlab {
            // A bearer token covers no byte of the body.
            prop_assert!(verdict.is_valid(), "{:?}", verdict);
        } else {
            prop_assert!(matches!(verdict, Verdict::Invalid { .. }), "{:?}", verdict);
        }
    }

    #[test]
    fn flipping_any_signature_byte_invalidates(
        (provider, secret, _) in provider_and_secrets(),
        body in proptest::collection::vec(any::<u8>(), 0..64),
        ts in timestamp(),
        at in any::<proptest::sample::Index>(),
        mask in 1u8..,
    ) {
        let mut signed = sign(provider, &secret, &body, ts);
        let name = signature_header(provider);
        let value = signed
            .headers
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .expect("the signature header");
        let i = at.index(value.len());
        let from = value[i];
        value[i] ^= mask;
        // Hex decoding ignores case, so `…ab…` and `…AB…` are one signature.
        prop_assume!(!same_hex_digit(from, value[i]));
        let verdict = signed.verify(provider, &[&secret], &body, ts);
        prop_assert!(matches!(verdict, Verdict::Invalid { .. }), "{:?}", verdict);
    }

    #[test]
    fn rotation_accepts_either_secret(
        (provider, current, previous) in provider_and_secrets(),
        body in proptest::collection::vec(any::<u8>(), 0..128),
        ts in timestamp(),
        with_previous in any::<bool>(),
    ) {
        let (used, other) = if with_previous { (&previous, &current) } else { (&current, &previous) };
        let signed = sign(provider, used, &body, ts);
        for secrets in [[current.as_str(), previous.as_str()], [previous.as_str(), current.as_str()]] {
            prop_assert!(signed.verify(provider, &secrets, &body, ts).is_valid());
        }
        let verdict = signed.verify(provider, &[other], &body, ts);
        prop_assert!(matches!(verdict, Verdict::Invalid { .. }), "{:?}", verdict);
        let mut set = SecretSet::new();
        set.add(provider, current.clone()).expect("room for the current secret");
        set.add(provider, previous.clone()).expect("room for the previous secret");
        let req = SignedRequest { headers: &signed.headers, body: &body, url: signed.url.as_deref() };
        prop_assert!(verify_detected(&set, &req, ts).is_valid());
    }

    #[test]
    fn arbitrary_headers_never_panic_nor_verify(
        headers in proptest::collection::vec(
            (
                prop_oneof![
                    proptest::sample::select(SIGNATURE_HEADERS.to_vec()).prop_map(str::to_owned),
                    proptest::sample::select(
                        Provider::ALL.iter().flat_map(|p| provider_headers(*p).iter().copied()).collect::<Vec<_>>()
                    ).prop_map(str::to_owned),
                    ".{0,24}",
                ],
                header_value(),
            ),
            0..8,
        ),
        body in proptest::collection::vec(any::<u8>(), 0..64),
        now in any::<i64>(),
        url in proptest::option::of(".{0,40}"),
    ) {
        let mut set = SecretSet::new();
        for p in Provider::ALL {
            set.add(p, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()).expect("room");
        }
        let req = SignedRequest { headers: &headers, body: &body, url: url.as_deref() };
        let verdict = verify_detected(&set, &req, now);
        prop_assert!(!verdict.is_valid(), "{:?}", verdict);
        prop_assert_eq!(verdict.provider(), detect(&headers));
        for p in Provider::ALL {
            let v = verify(p, &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "second"], &req, now, None);
            prop_assert!(!v.is_valid(), "{:?}", v);
        }
    }
}
