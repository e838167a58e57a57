//! Tunnel policies at the relay, end to end: signatures enforced before
//! anything is forwarded or queued (401), allow-lists with trusted proxies
//! (403), rate limits per tunnel and per source (429 with Retry-After, or 503).
//! Real relay, real agents over QUIC, real HTTP senders bound to distinct
//! loopback addresses (127.0.0.1–3), so "another source" is a real socket.

mod common;

use std::{net::IpAddr, time::Duration};

use bytes::Bytes;
use common::*;
use hookrelay_shared::{
    policy::{parse_cidr, PolicyRequest},
    signature::{self, Provider, Verdict},
};
use http::{HeaderMap, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use relay_client::history::Filter;
use relay_server::{
    policy::{LimitStatus, PolicyConfig, TunnelPolicyConfig},
    Relay,
};

const STRIPE_SECRET: &str = "whsec_policy_test_secret";
const GITHUB_SECRET: &str = "gh_policy_test_secret";

/// Request headers as the signing helpers produce them.
type Headers = Vec<(String, Vec<u8>)>;

fn now() -> i64 {
    i64::try_from(relay_client::history::now_ms() / 1000).unwrap_or(0)
}

/// Headers for `body` signed by `provider` with `secret` at time `at`.
fn signed(provider: Provider, secret: &str, body: &str, at: i64) -> Headers {
    let mut headers = Vec::new();
    signature::resign(provider, secret, &mut headers, body.as_bytes(), at)
        .expect("the provider can sign");
    headers
}

/// A sender whose connections come from `ip`.
fn client_from(ip: &str) -> Client<HttpConnector, TestBody> {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(ip.parse::<IpAddr>().expect("loopback ip")));
    Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector)
}

async fn send_from(
    ip: &str,
    url: &str,
    headers: &[(String, Vec<u8>)],
    body: &'static str,
) -> anyhow::Result<(StatusCode, HeaderMap, Bytes)> {
    let mut req = Request::post(url);
    for (name, value) in headers {
        req = req.header(name.as_str(), value.as_slice());
    }
    let resp = tokio::time::timeout(WAIT, client_from(ip).request(req.body(full(body))?)).await??;
    let (parts, body) = resp.into_parts();
    let body = http_body_util::BodyExt::collect(body).await?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

fn enforcing(relay: &TestRelay, tunnel: &str, target: &str) -> relay_client::Config {
    let mut config = relay.agent_config(Some(tunnel), target);
    config.secrets = relay_client::cli::secret_set(&[(Provider::Stripe, STRIPE_SECRET.into())]);
    config.policy = PolicyRequest {
        verify: vec![(Provider::Stripe, STRIPE_SECRET.into())],
        ..PolicyRequest::default()
    };
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enforced_signatures_refuse_forgeries_with_401_before_forwarding() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = connected_agent(enforcing(&relay, "pay", &app.target())).await?;
    let url = relay.url("pay", "/stripe");
    let body = r#"{"id":"evt_1","type":"charge.succeeded"}"#;

    let good = signed(Provider::Stripe, STRIPE_SECRET, body, now());
    let (status, _, _) = send_from("127.0.0.1", &url, &good, body).await?;
    assert_eq!(status, StatusCode::OK, "a valid signature passes");

    let cases: Vec<(&str, Headers)> = vec![
        (
            "signature_invalid",
            signed(Provider::Stripe, "whsec_someone_else", body, now()),
        ),
        (
            "signature_stale",
            signed(Provider::Stripe, STRIPE_SECRET, body, now() - 1200),
        ),
        ("signature_missing", Vec::new()),
        (
            "signature_unexpected",
            signed(Provider::Github, GITHUB_SECRET, body, now()),
        ),
    ];
    for (code, headers) in &cases {
        let (status, resp_headers, resp_body) = send_from("127.0.0.1", &url, headers, body).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{code}");
        assert_eq!(error_code(&resp_body), *code);
        assert!(resp_headers.contains_key("x-hookrelay-delivery-id"));
        let text = String::from_utf8_lossy(&resp_body);
        assert!(!text.contains(STRIPE_SECRET), "no secret in the answer");
    }
    // A tampered body with the right signature header.
    let (status, _, resp_body) = send_from(
        "127.0.0.1",
        &url,
        &good,
        r#"{"id":"evt_1","type":"refund"}"#,
    )
    .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&resp_body), "signature_invalid");

    // A chunked body is read whole, checked, and forwarded whole. (Another
    // event: the agent would answer a repeat of evt_1 without the app.)
    let body = r#"{"id":"evt_2","type":"charge.succeeded"}"#;
    let (tx, chunked) = channel_body();
    let good2 = signed(Provider::Stripe, STRIPE_SECRET, body, now());
    let mut req = Request::post(&url);
    for (n, v) in &good2 {
        req = req.header(n.as_str(), v.as_slice());
    }
    let sending = tokio::spawn(async move {
        for piece in [&body[..10], &body[10..]] {
            tx.send(Bytes::copy_from_slice(piece.as_bytes())).await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(())
    });
    let (status, _, _) = send(req.body(chunked)?).await?;
    sending.await??;
    assert_eq!(status, StatusCode::OK, "chunked and valid");

    let received = app.received();
    assert_eq!(
        received.len(),
        2,
        "only the two valid webhooks reached the app"
    );
    assert!(received
        .iter()
        .all(|r| r.body.starts_with(b"{\"id\":\"evt_")));
    assert_eq!(
        received[1].body,
        body.as_bytes(),
        "the chunked body arrived whole"
    );
    // The agent's own verdict agrees.
    recorded(&agent, 2).await?;
    let page = agent.history().list(&Filter::default(), None, 10)?;
    assert_eq!(page.exchanges.len(), 2);
    for e in &page.exchanges {
        assert_eq!(
            e.signature,
            Some(Verdict::Valid {
                provider: Provider::Stripe
            })
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enforcement_holds_while_the_agent_is_offline_and_across_relay_restarts(
) -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let TestRelay { relay, token, dir } = TestRelay::spawn().await?;
    let relay = TestRelay { relay, token, dir };
    let agent = connected_agent(enforcing(&relay, "offline", &app.target())).await?;
    agent.shutdown().await?;
    let body = r#"{"id":"evt_2","type":"invoice.paid"}"#;
    let forged = signed(Provider::Stripe, "whsec_forger", body, now());

    // Offline: a forgery is refused, not queued; a valid webhook is queued.
    let url = relay.url("offline", "/hook");
    let (status, _, b) = send_from("127.0.0.1", &url, &forged, body).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{b:?}");
    let good = signed(Provider::Stripe, STRIPE_SECRET, body, now());
    let (status, _, _) = send_from("127.0.0.1", &url, &good, body).await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    let tunnel = "offline".parse()?;
    assert_eq!(relay.relay.queue().stats(&tunnel).count, 1);

    // The relay restarts: the agent's request is still in force.
    let TestRelay {
        relay: old,
        token,
        dir,
    } = relay;
    old.shutdown().await;
    let restarted = Relay::spawn(relay_server::Config::loopback(dir.path().join("relay"))).await?;
    let relay = TestRelay {
        relay: restarted,
        token,
        dir,
    };
    let url = relay.url("offline", "/hook");
    let (status, _, b) = send_from("127.0.0.1", &url, &forged, body).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{b:?}");
    assert_eq!(error_code(&b), "signature_invalid");
    let unsigned: Headers = Vec::new();
    let (status, _, b) = send_from("127.0.0.1", &url, &unsigned, body).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&b), "signature_missing");
    let body2 = r#"{"id":"evt_3","type":"invoice.paid"}"#;
    let good = signed(Provider::Stripe, STRIPE_SECRET, body2, now());
    let (status, _, _) = send_from("127.0.0.1", &url, &good, body2).await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(relay.relay.queue().stats(&tunnel).count, 2);

    // Back online: exactly the two valid webhooks arrive.
    let _agent = connected_agent(enforcing(&relay, "offline", &app.target())).await?;
    until(WAIT, "the queued webhooks at the app", || {
        app.received().len() >= 2
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.received().len(), 2);

    // An agent that stops asking lifts the enforcement it asked for.
    _agent.shutdown().await?;
    let _plain = relay.agent("offline", &app.target()).await?;
    let (status, _, _) = send_from("127.0.0.1", &url, &unsigned, body).await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allow_lists_decide_by_the_real_source_and_trust_only_configured_proxies(
) -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn_with(|c| {
        c.policy.trusted_proxies = vec![parse_cidr("127.0.0.3").expect("cidr")];
        c.policy.tunnels.insert(
            "shop".parse().expect("name"),
            TunnelPolicyConfig {
                allow: Some(vec![
                    parse_cidr("127.0.0.2").expect("cidr"),
                    parse_cidr("203.0.113.0/24").expect("cidr"),
                ]),
                ..TunnelPolicyConfig::default()
            },
        );
    })
    .await?;
    // The agent asks for everything; the relay's config wins.
    let mut config = relay.agent_config(Some("shop"), &app.target());
    config.policy.allow = vec!["0.0.0.0/0".into()];
    let agent = connected_agent(config).await?;
    let url = relay.url("shop", "/orders");
    let xff = |v: &str| vec![("x-forwarded-for".to_owned(), v.as_bytes().to_vec())];

    let (status, _, b) = send_from("127.0.0.1", &url, &[], "{}").await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&b), "source_not_allowed");
    // A sender cannot talk its way in with a header.
    let (status, _, _) = send_from("127.0.0.1", &url, &xff("203.0.113.5"), "{}").await?;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "spoofed X-Forwarded-For ignored"
    );
    let (status, _, _) = send_from("127.0.0.2", &url, &[], "{}").await?;
    assert_eq!(status, StatusCode::OK, "allowed address");
    // Through the trusted proxy, the forwarded address decides.
    let (status, _, _) = send_from("127.0.0.3", &url, &xff("203.0.113.5"), "{}").await?;
    assert_eq!(status, StatusCode::OK, "allowed sender behind the proxy");
    let (status, _, _) =
        send_from("127.0.0.3", &url, &xff("203.0.113.5, 198.51.100.1"), "{}").await?;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the rightmost untrusted hop is the sender, not a spoofable leftmost one"
    );
    let forwarded = vec![(
        "forwarded".to_owned(),
        b"for=\"[2001:db8::1]:443\"".to_vec(),
    )];
    let (status, _, _) = send_from("127.0.0.3", &url, &forwarded, "{}").await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "RFC 7239 form read too");

    let received = app.received();
    assert_eq!(received.len(), 2, "refused requests never reached the app");
    recorded(&agent, 2).await?;
    let page = agent.history().list(&Filter::default(), None, 10)?;
    let sources: Vec<String> = page
        .exchanges
        .iter()
        .filter_map(|e| e.remote_addr.clone())
        .collect();
    assert!(
        sources.iter().any(|s| s.starts_with("203.0.113.5")),
        "the history shows the real sender behind the proxy: {sources:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_answer_429_with_retry_after_while_other_sources_are_served(
) -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let mut config = relay.agent_config(Some("burst"), &app.target());
    config.policy.rate_limit_per_source = Some("3/min".into());
    config.policy.rate_limit = Some("8/min".into());
    let _agent = connected_agent(config).await?;
    let url = relay.url("burst", "/event");

    // One noisy source: three pass, the rest of a bounded burst is refused.
    let mut limited = 0;
    for i in 0..20 {
        let (status, headers, b) = send_from("127.0.0.2", &url, &[], "{}").await?;
        if i < 3 {
            assert_eq!(status, StatusCode::OK, "request {i}");
            continue;
        }
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "request {i}");
        assert_eq!(error_code(&b), "rate_limited");
        let retry: u64 = headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("Retry-After in whole seconds");
        assert!((1..=60).contains(&retry), "retry after {retry}s");
        limited += 1;
        // Meanwhile a well-behaved source is served.
        if i == 10 {
            let (status, _, _) = send_from("127.0.0.1", &url, &[], "{}").await?;
            assert_eq!(status, StatusCode::OK, "another source is unaffected");
        }
    }
    assert_eq!(limited, 17);
    // The tunnel's total: 8 per minute whatever the source (3 + 1 spent).
    let mut served = 0;
    for ip in [
        "127.0.0.1",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.0.5",
        "127.0.0.6",
    ] {
        for _ in 0..2 {
            let (status, _, _) = send_from(ip, &url, &[], "{}").await?;
            if status == StatusCode::OK {
                served += 1;
            } else {
                assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            }
        }
    }
    assert_eq!(served, 4, "8 per minute in all");
    assert_eq!(app.received().len(), 8);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_wide_source_limit_can_answer_503() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn_with(|c| {
        c.policy = PolicyConfig {
            rate_limit_per_source: Some("2/min".parse().expect("rate")),
            limit_status: LimitStatus::ServiceUnavailable,
            ..PolicyConfig::default()
        };
    })
    .await?;
    let _agent = relay.agent("wide", &app.target()).await?;
    let url = relay.url("wide", "/x");
    for _ in 0..2 {
        let (status, _, _) = send_from("127.0.0.2", &url, &[], "{}").await?;
        assert_eq!(status, StatusCode::OK);
    }
    // Also counted on paths to tunnels that do not exist.
    let (status, headers, b) = send_from("127.0.0.2", &relay.url("nope", "/"), &[], "{}").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&b), "rate_limited");
    assert!(headers.contains_key("retry-after"));
    let (status, _, _) = send_from("127.0.0.1", &url, &[], "{}").await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}
