//! Provider duplicate suppression: senders retry, and a retry of a delivery
//! the app already accepted must not reach it twice.
//!
//! Each provider names its events (table in SECURITY.md §2.3): a header for
//! GitHub, Shopify, Standard Webhooks/Svix, Twitch and GitLab, a field of the
//! JSON body for Stripe, Slack and Paddle. An id counts only on a request
//! whose signature verified with a configured secret: ids are unsigned for
//! some providers, and a forged request must not be able to suppress a real
//! one.

use hookrelay_shared::signature::{Headers, Provider};

/// Bodies larger than this are not parsed for an event id.
const MAX_JSON_BODY: usize = 1024 * 1024;

/// Whether `provider` names its events at all.
pub fn has_event_ids(provider: Provider) -> bool {
    !matches!(provider, Provider::Twilio)
}

/// Whether the event id sits in the body (so the body must be read first).
pub fn id_in_body(provider: Provider) -> bool {
    matches!(
        provider,
        Provider::Stripe | Provider::Slack | Provider::Paddle
    )
}

/// The provider's id for the event this request carries, if it has one.
pub fn event_id(provider: Provider, headers: &Headers, body: &[u8]) -> Option<String> {
    let header = |names: &[&str]| {
        names.iter().find_map(|name| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.len() <= 256)
                .map(str::to_owned)
        })
    };
    let body_field = |field: &str, prefix: &str| {
        if body.len() > MAX_JSON_BODY {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(body).ok()?;
        json.get(field)?
            .as_str()
            .filter(|id| id.starts_with(prefix) && id.len() <= 256)
            .map(str::to_owned)
    };
    match provider {
        Provider::Github => header(&["x-github-delivery"]),
        Provider::Shopify => header(&["x-shopify-webhook-id", "x-shopify-event-id"]),
        Provider::StandardWebhooks => header(&["webhook-id", "svix-id"]),
        Provider::Twitch => header(&["twitch-eventsub-message-id"]),
        Provider::Gitlab => header(&["idempotency-key", "x-gitlab-event-uuid"]),
        Provider::Stripe => body_field("id", "evt_"),
        Provider::Slack => body_field("event_id", ""),
        Provider::Paddle => body_field("event_id", ""),
        Provider::Twilio => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn ids_come_from_each_providers_own_place() {
        let headers = h(&[("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958")]);
        assert_eq!(
            event_id(Provider::Github, &headers, b"").as_deref(),
            Some("72d3162e-cc78-11e3-81ab-4c9367dc0958")
        );
        assert_eq!(
            event_id(Provider::StandardWebhooks, &h(&[("svix-id", "msg_1")]), b"").as_deref(),
            Some("msg_1")
        );
        let stripe = br#"{"id":"evt_123","object":"event"}"#;
        assert_eq!(
            event_id(Provider::Stripe, &[], stripe).as_deref(),
            Some("evt_123")
        );
        assert_eq!(
            event_id(Provider::Stripe, &[], br#"{"id":"pi_1"}"#),
            None,
            "only event objects"
        );
        assert_eq!(
            event_id(
                Provider::Slack,
                &[],
                br#"{"event_id":"Ev1","type":"event_callback"}"#
            )
            .as_deref(),
            Some("Ev1")
        );
        assert_eq!(event_id(Provider::Stripe, &[], b"not json"), None);
        assert_eq!(
            event_id(Provider::Github, &h(&[("x-github-delivery", " ")]), b""),
            None
        );
        assert_eq!(event_id(Provider::Twilio, &headers, stripe), None);
        assert!(id_in_body(Provider::Stripe) && !id_in_body(Provider::Github));
    }
}
