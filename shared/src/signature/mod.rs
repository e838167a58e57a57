//! Webhook signatures: detect the sender, verify its signature, re-sign for replay.
//!
//! Every scheme works on the raw body bytes and compares MACs in constant time
//! after decoding them (SECURITY.md §1.3). Nothing here reads a clock: callers
//! pass `now` as unix seconds, so tests and the relay's replay path agree.
//!
//! Timestamp windows follow each provider's own SDK: Stripe and Paddle reject
//! only old signatures (stripe-go, Paddle SDKs), while Slack, Standard Webhooks
//! and Twitch reject both old and future ones (`abs(now - ts) > tolerance`).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

#[doc(hidden)]
pub mod fuzzing;
mod github;
mod gitlab;
mod paddle;
mod shopify;
mod slack;
mod standard;
mod stripe;
mod twilio;
mod twitch;
mod util;

use util::Failure;

/// Longest signature-related header value we parse, in bytes. Real headers are
/// well under 1 KiB; the cap bounds the work an attacker can ask for.
pub const MAX_SIGNATURE_HEADER_LEN: usize = 4096;

/// Most signature entries accepted in one header (Stripe `v1`, Standard Webhooks
/// `v1,`, Paddle `h1`). Senders use two during secret rotation; every entry
/// costs a decode and a compare per configured secret.
pub const MAX_SIGNATURE_ENTRIES: usize = 8;

/// Most secrets kept per provider: the current one and the previous one, so a
/// rotation (Shopify takes up to an hour to switch) loses no deliveries.
pub const MAX_SECRETS_PER_PROVIDER: usize = 2;

/// Request headers as received: name (any case) and raw value bytes, in order.
pub type Headers = [(String, Vec<u8>)];

/// A webhook sender whose signature scheme we know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// `Stripe-Signature: t=…,v1=<hex>`, HMAC-SHA256 keyed by the whole `whsec_` string.
    Stripe,
    /// `X-Hub-Signature-256: sha256=<hex>` over the body.
    Github,
    /// `X-Slack-Signature: v0=<hex>` over `v0:<ts>:<body>`.
    Slack,
    /// `X-Shopify-Hmac-Sha256: <base64>` over the body.
    Shopify,
    /// Standard Webhooks and Svix: `webhook-signature: v1,<base64>` (or `svix-*`).
    StandardWebhooks,
    /// `X-Twilio-Signature: <base64>` HMAC-SHA1 over the public URL and form params.
    Twilio,
    /// `X-Gitlab-Token`: a shared token, not a signature.
    Gitlab,
    /// `Twitch-Eventsub-Message-Signature: sha256=<hex>` over id, timestamp and body.
    Twitch,
    /// Paddle Billing `Paddle-Signature: ts=…;h1=<hex>`.
    Paddle,
}

impl Provider {
    /// Every provider, in declaration order.
    pub const ALL: [Provider; 9] = [
        Provider::Stripe,
        Provider::Github,
        Provider::Slack,
        Provider::Shopify,
        Provider::StandardWebhooks,
        Provider::Twilio,
        Provider::Gitlab,
        Provider::Twitch,
        Provider::Paddle,
    ];

    /// The snake_case name used in config, JSON and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Stripe => "stripe",
            Provider::Github => "github",
            Provider::Slack => "slack",
            Provider::Shopify => "shopify",
            Provider::StandardWebhooks => "standard_webhooks",
            Provider::Twilio => "twilio",
            Provider::Gitlab => "gitlab",
            Provider::Twitch => "twitch",
            Provider::Paddle => "paddle",
        }
    }

    /// The replay window the provider's own SDK applies, in seconds; `None` for
    /// schemes that sign no timestamp.
    pub fn default_tolerance_s(self) -> Option<u64> {
        match self {
            Provider::Stripe | Provider::Slack | Provider::StandardWebhooks => Some(300),
            Provider::Twitch => Some(600),
            Provider::Paddle => Some(5),
            Provider::Github | Provider::Shopify | Provider::Twilio | Provider::Gitlab => None,
        }
    }

    /// Whether [`resign`] can produce a fresh signature. Twilio signs the public
    /// URL, which a replay does not have, and GitLab sends a token, not a MAC.
    pub fn can_resign(self) -> bool {
        !matches!(self, Provider::Twilio | Provider::Gitlab)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl FromStr for Provider {
    type Err = ParseProviderError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        if let Some(p) = Provider::ALL.iter().find(|p| p.as_str() == lower) {
            return Ok(*p);
        }
        match lower.as_str() {
            "svix" | "standard-webhooks" | "standardwebhooks" => Ok(Provider::StandardWebhooks),
            _ => Err(ParseProviderError { name: s.to_owned() }),
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A provider name that [`Provider::from_str`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown provider `{name}`; expected one of {}", valid_names())]
pub struct ParseProviderError {
    /// The name as given.
    pub name: String,
}

fn valid_names() -> String {
    let names: Vec<&str> = Provider::ALL.iter().map(|p| p.as_str()).collect();
    format!("{} (or svix)", names.join(", "))
}

/// Signature headers in the order [`detect`] checks them. The order matters only
/// for requests carrying several schemes; each name belongs to one provider.
const DETECT_ORDER: [(&str, Provider); 11] = [
    ("stripe-signature", Provider::Stripe),
    ("x-hub-signature-256", Provider::Github),
    ("x-hub-signature", Provider::Github),
    ("x-slack-signature", Provider::Slack),
    ("x-shopify-hmac-sha256", Provider::Shopify),
    ("webhook-signature", Provider::StandardWebhooks),
    ("svix-signature", Provider::StandardWebhooks),
    ("x-twilio-signature", Provider::Twilio),
    ("twitch-eventsub-message-signature", Provider::Twitch),
    ("paddle-signature", Provider::Paddle),
    ("x-gitlab-token", Provider::Gitlab),
];

/// Detects the provider from its signature header (names compared
/// case-insensitively). `None` when no known signature header is present.
pub fn detect(headers: &Headers) -> Option<Provider> {
    DETECT_ORDER.iter().find_map(|(name, provider)| {
        headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
            .then_some(*provider)
    })
}

/// What verification concluded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// A configured secret produced the signature, within the time window.
    Valid {
        /// Whose scheme was checked.
        provider: Provider,
    },
    /// Missing, malformed or wrong signature. `reason` never contains a secret.
    Invalid {
        /// Whose scheme was checked.
        provider: Provider,
        /// Human-readable cause, safe to log and to show in the inspector.
        reason: String,
    },
    /// The signature matches but its timestamp is outside the tolerance.
    Stale {
        /// Whose scheme was checked.
        provider: Provider,
        /// `now - timestamp` in seconds; negative for a timestamp in the future.
        age_s: i64,
    },
    /// No known signature header was present.
    Unsigned,
    /// The provider was detected but no secret is configured for it.
    NoSecret {
        /// The detected provider.
        provider: Provider,
    },
}

impl Verdict {
    /// Whether the request is authentic and fresh.
    pub fn is_valid(&self) -> bool {
        matches!(self, Verdict::Valid { .. })
    }

    /// The provider the verdict is about; `None` for [`Verdict::Unsigned`].
    pub fn provider(&self) -> Option<Provider> {
        match self {
            Verdict::Valid { provider }
            | Verdict::Invalid { provider, .. }
            | Verdict::Stale { provider, .. }
            | Verdict::NoSecret { provider } => Some(*provider),
            Verdict::Unsigned => None,
        }
    }
}

/// The parts of a received request that signatures cover.
#[derive(Clone, Copy, Debug)]
pub struct SignedRequest<'a> {
    /// Headers as received, names in any case.
    pub headers: &'a Headers,
    /// The raw body bytes, exactly as received.
    pub body: &'a [u8],
    /// The full public URL the sender called (scheme, host, path, query). Only
    /// Twilio signs it; verification of Twilio requests fails without it.
    pub url: Option<&'a str>,
}

/// Verifies `req` against `provider`'s scheme with each of `secrets` (rotation:
/// valid if any matches). An empty list or an empty secret fails closed with
/// [`Verdict::Invalid`]. `tolerance_s` of `None` uses
/// [`Provider::default_tolerance_s`]; providers without timestamps ignore it.
pub fn verify(
    provider: Provider,
    secrets: &[&str],
    req: &SignedRequest<'_>,
    now: i64,
    tolerance_s: Option<u64>,
) -> Verdict {
    if secrets.is_empty() {
        return invalid(provider, "no secret configured");
    }
    if secrets.iter().any(|s| s.is_empty()) {
        return invalid(provider, "empty secret configured");
    }
    let tolerance = tolerance_s.or(provider.default_tolerance_s()).unwrap_or(0);
    let outcome = match provider {
        Provider::Stripe => stripe::verify(secrets, req, now, tolerance),
        Provider::Github => github::verify(secrets, req),
        Provider::Slack => slack::verify(secrets, req, now, tolerance),
        Provider::Shopify => shopify::verify(secrets, req),
        Provider::StandardWebhooks => standard::verify(secrets, req, now, tolerance),
        Provider::Twilio => twilio::verify(secrets, req),
        Provider::Gitlab => gitlab::verify(secrets, req),
        Provider::Twitch => twitch::verify(secrets, req, now, tolerance),
        Provider::Paddle => paddle::verify(secrets, req, now, tolerance),
    };
    match outcome {
        Ok(()) => Verdict::Valid { provider },
        Err(Failure::Invalid(reason)) => Verdict::Invalid { provider, reason },
        Err(Failure::Stale { age_s }) => Verdict::Stale { provider, age_s },
    }
}

fn invalid(provider: Provider, reason: &str) -> Verdict {
    Verdict::Invalid {
        provider,
        reason: reason.to_owned(),
    }
}

/// Detects the provider, then verifies with the secrets configured for it at the
/// provider's default tolerance. [`Verdict::Unsigned`] when nothing is detected,
/// [`Verdict::NoSecret`] when the provider has no secret in `secrets`.
pub fn verify_detected(secrets: &SecretSet, req: &SignedRequest<'_>, now: i64) -> Verdict {
    let Some(provider) = detect(req.headers) else {
        return Verdict::Unsigned;
    };
    let configured = secrets.get(provider);
    if configured.is_empty() {
        return Verdict::NoSecret { provider };
    }
    verify(provider, &configured, req, now, None)
}

/// Secrets per provider, at most [`MAX_SECRETS_PER_PROVIDER`] each (current and
/// previous). `Debug` masks every secret.
#[derive(Clone, Default)]
pub struct SecretSet {
    secrets: [Vec<String>; 9],
}

impl SecretSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a secret for `provider`, after any already present.
    ///
    /// # Errors
    ///
    /// [`SecretError::Empty`] for an empty secret (it would accept anything in a
    /// naive verifier), [`SecretError::TooMany`] beyond two per provider.
    pub fn add(&mut self, provider: Provider, secret: String) -> Result<(), SecretError> {
        if secret.is_empty() {
            return Err(SecretError::Empty(provider));
        }
        let list = &mut self.secrets[provider.index()];
        if list.len() >= MAX_SECRETS_PER_PROVIDER {
            return Err(SecretError::TooMany(provider));
        }
        list.push(secret);
        Ok(())
    }

    /// The secrets for `provider`, in the order added; empty if none.
    pub fn get(&self, provider: Provider) -> Vec<&str> {
        self.secrets[provider.index()]
            .iter()
            .map(String::as_str)
            .collect()
    }

    /// Providers with at least one secret, in [`Provider::ALL`] order.
    pub fn providers(&self) -> Vec<Provider> {
        Provider::ALL
            .into_iter()
            .filter(|p| !self.secrets[p.index()].is_empty())
            .collect()
    }

    /// Whether no provider has a secret.
    pub fn is_empty(&self) -> bool {
        self.secrets.iter().all(Vec::is_empty)
    }
}

impl fmt::Debug for SecretSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretSet ")?;
        let mut map = f.debug_map();
        for p in self.providers() {
            let masked = vec![Masked; self.secrets[p.index()].len()];
            map.entry(&format_args!("{p}"), &masked);
        }
        map.finish()
    }
}

/// Stands in for a secret in `Debug` output.
#[derive(Clone, Copy)]
struct Masked;

impl fmt::Debug for Masked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Parses one `provider=secret` spec, split at the first `=` (secrets may
/// contain `=`, as base64 often does). The provider name is trimmed and
/// case-insensitive; the secret is taken byte for byte.
///
/// # Errors
///
/// [`SecretError::MissingEquals`], [`SecretError::UnknownProvider`] or
/// [`SecretError::Empty`]. No error repeats the input, which may be all secret.
pub fn parse_secret_spec(s: &str) -> Result<(Provider, String), SecretError> {
    let (name, secret) = s.split_once('=').ok_or(SecretError::MissingEquals)?;
    let provider: Provider = name.parse().map_err(|_| SecretError::UnknownProvider)?;
    if secret.is_empty() {
        return Err(SecretError::Empty(provider));
    }
    Ok((provider, secret.to_owned()))
}

/// Why a secret could not be configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// An empty secret would make verification meaningless.
    #[error("empty secret for {0}")]
    Empty(Provider),
    /// A third secret for one provider.
    #[error("at most {MAX_SECRETS_PER_PROVIDER} secrets per provider (current and previous); {0} has them already")]
    TooMany(Provider),
    /// The spec has no `=` between provider and secret.
    #[error("secret spec must look like provider=secret")]
    MissingEquals,
    /// The part before `=` names no provider.
    #[error("unknown provider in secret spec; expected one of {}", valid_names())]
    UnknownProvider,
}

/// Re-signs a request in place for `now`: refreshes the timestamp header(s) and
/// replaces the signature header(s) with one fresh signature over `body`.
/// Existing headers keep their name, case and position; missing ones are
/// appended. Duplicates of a rewritten header are dropped.
///
/// # Errors
///
/// [`SignError::Unsupported`] for Twilio and GitLab, [`SignError::EmptySecret`],
/// [`SignError::BadSecret`] for a Standard Webhooks secret that is not base64,
/// [`SignError::MissingId`] when Standard Webhooks or Twitch lack the message id
/// that is part of the signed content.
pub fn resign(
    provider: Provider,
    secret: &str,
    headers: &mut Vec<(String, Vec<u8>)>,
    body: &[u8],
    now: i64,
) -> Result<(), SignError> {
    if !provider.can_resign() {
        return Err(SignError::Unsupported(provider));
    }
    if secret.is_empty() {
        return Err(SignError::EmptySecret);
    }
    match provider {
        Provider::Stripe => stripe::resign(secret, headers, body, now),
        Provider::Github => github::resign(secret, headers, body),
        Provider::Slack => slack::resign(secret, headers, body, now),
        Provider::Shopify => shopify::resign(secret, headers, body),
        Provider::StandardWebhooks => standard::resign(secret, headers, body, now)?,
        Provider::Twitch => twitch::resign(secret, headers, body, now)?,
        Provider::Paddle => paddle::resign(secret, headers, body, now),
        Provider::Twilio | Provider::Gitlab => return Err(SignError::Unsupported(provider)),
    }
    Ok(())
}

/// Why a request could not be re-signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The scheme cannot be reproduced from the stored request.
    #[error("{0} requests cannot be re-signed")]
    Unsupported(Provider),
    /// The configured secret is empty.
    #[error("cannot sign with an empty secret")]
    EmptySecret,
    /// The secret is not in the provider's format.
    #[error("bad secret: {0}")]
    BadSecret(&'static str),
    /// The request lacks the message id header that the signature covers.
    #[error("{0} request has no message id header to sign")]
    MissingId(Provider),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn provider_names_round_trip() {
        for p in Provider::ALL {
            assert_eq!(p.as_str().parse::<Provider>(), Ok(p));
            assert_eq!(p.to_string(), p.as_str());
            assert_eq!(p.as_str().to_uppercase().parse::<Provider>(), Ok(p));
        }
        for alias in ["svix", "Standard-Webhooks", "standardwebhooks"] {
            assert_eq!(alias.parse::<Provider>(), Ok(Provider::StandardWebhooks));
        }
        let err = "bitbucket"
            .parse::<Provider>()
            .expect_err("unknown name")
            .to_string();
        assert!(
            err.contains("bitbucket") && err.contains("standard_webhooks"),
            "{err}"
        );
    }

    #[test]
    fn provider_serde_uses_snake_case() {
        let json = serde_json::to_string(&Provider::StandardWebhooks).expect("serialize");
        assert_eq!(json, "\"standard_webhooks\"");
    }

    #[test]
    fn only_twilio_and_gitlab_cannot_resign() {
        let cannot: Vec<Provider> = Provider::ALL
            .into_iter()
            .filter(|p| !p.can_resign())
            .collect();
        assert_eq!(cannot, [Provider::Twilio, Provider::Gitlab]);
    }

    #[test]
    fn detect_prefers_earlier_schemes_and_ignores_case() {
        assert_eq!(detect(&hdrs(&[("content-type", "x")])), None);
        assert_eq!(
            detect(&hdrs(&[
                ("X-GITLAB-TOKEN", "t"),
                ("Stripe-Signature", "t=1")
            ])),
            Some(Provider::Stripe)
        );
        assert_eq!(
            detect(&hdrs(&[("Svix-Signature", "v1,x")])),
            Some(Provider::StandardWebhooks)
        );
        assert_eq!(
            detect(&hdrs(&[("x-hub-signature", "sha1=00")])),
            Some(Provider::Github)
        );
    }

    #[test]
    fn verdict_serializes_with_a_tag() {
        let v = Verdict::Stale {
            provider: Provider::Slack,
            age_s: 301,
        };
        let json = serde_json::to_value(&v).expect("serialize");
        assert_eq!(
            json,
            serde_json::json!({"verdict": "stale", "provider": "slack", "age_s": 301})
        );
        let back: Verdict = serde_json::from_value(json).expect("deserialize");
        assert_eq!(back, v);
        assert_eq!(
            serde_json::to_value(Verdict::Unsigned).expect("serialize"),
            serde_json::json!({"verdict": "unsigned"})
        );
        assert_eq!(Verdict::Unsigned.provider(), None);
        assert!(!v.is_valid());
    }

    #[test]
    fn secret_set_limits_and_masks() {
        let mut set = SecretSet::new();
        assert!(set.is_empty());
        set.add(Provider::Stripe, "whsec_one".into())
            .expect("room for a secret");
        set.add(Provider::Stripe, "whsec_two".into())
            .expect("room for a secret");
        assert_eq!(
            set.add(Provider::Stripe, "whsec_three".into()),
            Err(SecretError::TooMany(Provider::Stripe))
        );
        assert_eq!(
            set.add(Provider::Github, String::new()),
            Err(SecretError::Empty(Provider::Github))
        );
        set.add(Provider::Github, "gh".into())
            .expect("room for a secret");
        assert_eq!(set.get(Provider::Stripe), ["whsec_one", "whsec_two"]);
        assert!(set.get(Provider::Slack).is_empty());
        assert_eq!(set.providers(), [Provider::Stripe, Provider::Github]);
        let debug = format!("{set:?}");
        assert_eq!(debug, "SecretSet {stripe: [***, ***], github: [***]}");
    }

    #[test]
    fn secret_spec_splits_at_first_equals() {
        assert_eq!(
            parse_secret_spec("svix=whsec_abc=="),
            Ok((Provider::StandardWebhooks, "whsec_abc==".to_owned()))
        );
        assert_eq!(
            parse_secret_spec(" GitHub =s"),
            Ok((Provider::Github, "s".to_owned()))
        );
        assert_eq!(
            parse_secret_spec("nosecret"),
            Err(SecretError::MissingEquals)
        );
        assert_eq!(
            parse_secret_spec("stripe="),
            Err(SecretError::Empty(Provider::Stripe))
        );
        let err = parse_secret_spec("hunter2=x").expect_err("unknown name");
        assert_eq!(err, SecretError::UnknownProvider);
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn empty_secrets_fail_closed() {
        let headers = hdrs(&[("X-Gitlab-Token", "")]);
        let req = SignedRequest {
            headers: &headers,
            body: b"",
            url: None,
        };
        for secrets in [&[][..], &[""][..], &["", "x"][..]] {
            let v = verify(Provider::Gitlab, secrets, &req, 0, None);
            assert!(matches!(v, Verdict::Invalid { .. }), "{v:?}");
        }
    }

    #[test]
    fn resign_refuses_unsupported_and_empty() {
        let mut h = Vec::new();
        assert_eq!(
            resign(Provider::Twilio, "s", &mut h, b"", 0),
            Err(SignError::Unsupported(Provider::Twilio))
        );
        assert_eq!(
            resign(Provider::Gitlab, "s", &mut h, b"", 0),
            Err(SignError::Unsupported(Provider::Gitlab))
        );
        assert_eq!(
            resign(Provider::Stripe, "", &mut h, b"", 0),
            Err(SignError::EmptySecret)
        );
        assert!(h.is_empty());
    }
}
