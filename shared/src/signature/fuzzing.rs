//! Each provider's header parser on its own, for the fuzz targets in `fuzz/`.
//!
//! [`super::verify`] reaches these parsers only behind a header lookup and a
//! MAC, so a fuzzer learns more, faster, when it can call them directly. Not a
//! stable API: hidden from the docs and free to change with the parsers.
//! GitLab has no parser: its header is the bare token.

/// `Stripe-Signature: t=…,v1=…`: the timestamp and every hex `v1`.
pub fn stripe(value: &str) -> Option<(i64, Vec<Vec<u8>>)> {
    super::stripe::parse(value).ok()
}

/// `X-Hub-Signature-256: sha256=<hex>`: the MAC.
pub fn github(value: &[u8]) -> Option<Vec<u8>> {
    super::github::parse(value).ok()
}

/// `X-Slack-Signature: v0=<hex>`: the MAC.
pub fn slack(value: &[u8]) -> Option<Vec<u8>> {
    super::slack::parse(value).ok()
}

/// `X-Shopify-Hmac-Sha256: <base64>`: the MAC.
pub fn shopify(value: &str) -> Option<Vec<u8>> {
    super::shopify::parse(value).ok()
}

/// `webhook-signature: v1,<base64> …`: every `v1` MAC.
pub fn standard_webhooks(value: &str) -> Option<Vec<Vec<u8>>> {
    super::standard::parse(value).ok()
}

/// `X-Twilio-Signature: <base64>`: the MAC.
pub fn twilio(value: &str) -> Option<Vec<u8>> {
    super::twilio::parse(value).ok()
}

/// A Twilio form body (or query) as decoded `(name, value)` pairs.
pub fn twilio_form(data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    super::twilio::form_pairs(data)
}

/// A URL without its port, and with the scheme's default port, as Twilio signs.
pub fn twilio_urls(url: &str) -> (String, String) {
    super::twilio::url_variants(url)
}

/// `Twitch-Eventsub-Message-Signature: sha256=<hex>`: the MAC.
pub fn twitch(value: &[u8]) -> Option<Vec<u8>> {
    super::twitch::parse(value).ok()
}

/// `Twitch-Eventsub-Message-Timestamp` (RFC 3339) as unix seconds.
pub fn twitch_timestamp(value: &str) -> Option<i64> {
    super::twitch::parse_rfc3339(value)
}

/// Unix seconds as the RFC 3339 text a re-signed Twitch request carries.
pub fn twitch_format(unix: i64) -> String {
    super::twitch::format_rfc3339(unix)
}

/// `Paddle-Signature: ts=…;h1=…`: the timestamp and every hex `h1`.
pub fn paddle(value: &str) -> Option<(i64, Vec<Vec<u8>>)> {
    super::paddle::parse(value)
        .ok()
        .map(|(_, ts, signatures)| (ts, signatures))
}

/// The plain-digits unix timestamp of Slack and Standard Webhooks.
pub fn unix_seconds(value: &str) -> Option<i64> {
    super::util::parse_unix(value)
}
