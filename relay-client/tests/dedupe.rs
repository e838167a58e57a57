//! Provider retries of an event the app already accepted are answered with
//! the first answer, recorded as duplicates, and never reach the app twice;
//! everything else is forwarded.

mod common;

use common::*;
use hookrelay_shared::signature::{self, Provider, SecretSet};
use http::{Request, StatusCode};
use relay_client::{history::Filter, Agent};

const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const STRIPE_SECRET: &str = "whsec_dedupe";

async fn agent(
    relay: &TestRelay,
    tunnel: &str,
    target: &str,
    dedupe: bool,
) -> anyhow::Result<Agent> {
    let mut config = relay.agent_config(Some(tunnel), target);
    let mut secrets = SecretSet::new();
    secrets.add(Provider::Github, GITHUB_SECRET.into())?;
    secrets.add(Provider::Stripe, STRIPE_SECRET.into())?;
    config.secrets = secrets;
    config.dedupe = dedupe;
    let agent = connected_agent(config).await?;
    Ok(agent)
}

fn now() -> i64 {
    i64::try_from(relay_client::history::now_ms() / 1000).unwrap_or(0)
}

/// A request signed the way `provider` signs, with extra headers.
fn signed(
    url: &str,
    provider: Provider,
    secret: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<Request<TestBody>> {
    let mut headers: Vec<(String, Vec<u8>)> = extra
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
    headers.push(("content-type".into(), b"application/json".to_vec()));
    signature::resign(provider, secret, &mut headers, body.as_bytes(), now())?;
    let mut req = Request::post(url);
    for (n, v) in &headers {
        req = req.header(n.as_str(), v.as_slice());
    }
    Ok(req.body(full(body.to_owned()))?)
}

async fn all(agent: &Agent) -> anyhow::Result<Vec<relay_client::history::Exchange>> {
    let page = agent
        .history()
        .list(&Filter::default(), None, 100)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(page.exchanges)
}

#[tokio::test]
async fn a_retried_github_delivery_reaches_the_app_once() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = agent(&relay, "gh", &app.target(), true).await?;
    let url = relay.url("gh", "/echo/github");
    let delivery = [("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958")];
    let (s1, h1, b1) = send(signed(
        &url,
        Provider::Github,
        GITHUB_SECRET,
        &delivery,
        r#"{"n":1}"#,
    )?)
    .await?;
    assert_eq!(s1, StatusCode::OK);
    assert!(h1.get("x-hookrelay-duplicate-of").is_none());
    // GitHub's redelivery: same delivery id, same body.
    let (s2, h2, b2) = send(signed(
        &url,
        Provider::Github,
        GITHUB_SECRET,
        &delivery,
        r#"{"n":1}"#,
    )?)
    .await?;
    assert_eq!(s2, StatusCode::OK);
    assert_eq!(b2, b1, "the retry gets the first answer");
    assert_eq!(app.received().len(), 1, "the app saw the event once");

    let exchanges = all(&agent).await?;
    assert_eq!(exchanges.len(), 2);
    let (dup, first) = (&exchanges[0], &exchanges[1]);
    assert_eq!(first.event_id.as_deref(), Some(delivery[0].1));
    assert_eq!(dup.duplicate_of, Some(first.id));
    assert_eq!(dup.response.as_ref().map(|r| r.status), Some(200));
    assert_eq!(
        h2.get("x-hookrelay-duplicate-of")
            .and_then(|v| v.to_str().ok()),
        Some(first.id.to_string().as_str())
    );

    // A different delivery id is a different event.
    let other = [("x-github-delivery", "0000-other")];
    send(signed(
        &url,
        Provider::Github,
        GITHUB_SECRET,
        &other,
        r#"{"n":1}"#,
    )?)
    .await?;
    assert_eq!(app.received().len(), 2);
    Ok(())
}

#[tokio::test]
async fn stripe_events_are_keyed_by_their_evt_id() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = agent(&relay, "st", &app.target(), true).await?;
    let url = relay.url("st", "/stripe");
    let body = r#"{"id":"evt_1","object":"event","type":"invoice.paid"}"#;
    send(signed(&url, Provider::Stripe, STRIPE_SECRET, &[], body)?).await?;
    // Stripe retries with a fresh signature and timestamp, same event.
    send(signed(&url, Provider::Stripe, STRIPE_SECRET, &[], body)?).await?;
    assert_eq!(app.received().len(), 1);
    let exchanges = all(&agent).await?;
    assert!(exchanges[0].duplicate_of.is_some());
    assert_eq!(exchanges[1].event_id.as_deref(), Some("evt_1"));
    Ok(())
}

#[tokio::test]
async fn failures_forgeries_and_no_dedupe_are_always_forwarded() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent_on = agent(&relay, "on", &app.target(), true).await?;

    // The first attempt failed (5xx): the retry must reach the app.
    let failing = relay.url("on", "/status/500");
    let d = [("x-github-delivery", "fails-first")];
    let (s, _, _) = send(signed(&failing, Provider::Github, GITHUB_SECRET, &d, "{}")?).await?;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    send(signed(&failing, Provider::Github, GITHUB_SECRET, &d, "{}")?).await?;
    assert_eq!(
        app.received().len(),
        2,
        "a failed delivery is retried, not suppressed"
    );

    // A forged signature never suppresses anything, nor is it remembered.
    let url = relay.url("on", "/ok");
    let d = [("x-github-delivery", "forged")];
    send(signed(&url, Provider::Github, "wrong secret", &d, "{}")?).await?;
    send(signed(&url, Provider::Github, GITHUB_SECRET, &d, "{}")?).await?;
    send(signed(&url, Provider::Github, "wrong secret", &d, "{}")?).await?;
    assert_eq!(app.received().len(), 5);
    let exchanges = all(&agent_on).await?;
    assert!(exchanges.iter().all(|e| e.duplicate_of.is_none()));

    // With dedupe off, a true retry is forwarded too.
    let agent_off = agent(&relay, "off", &app.target(), false).await?;
    let url = relay.url("off", "/ok");
    let d = [("x-github-delivery", "twice")];
    send(signed(&url, Provider::Github, GITHUB_SECRET, &d, "{}")?).await?;
    send(signed(&url, Provider::Github, GITHUB_SECRET, &d, "{}")?).await?;
    assert_eq!(app.received().len(), 7);
    let exchanges = all(&agent_off).await?;
    assert!(exchanges.iter().all(|e| e.duplicate_of.is_none()));
    assert_eq!(exchanges[0].event_id.as_deref(), Some("twice"));
    Ok(())
}

#[tokio::test]
async fn the_first_delivery_is_remembered_across_restarts_until_evicted() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let dir = tempfile::tempdir()?;
    let url = relay.url("keep", "/ok");
    let d = [("x-github-delivery", "persisted")];
    let spawn = |max: u64| {
        let mut config = relay.agent_config_in(dir.path(), Some("keep"), &app.target());
        let mut secrets = SecretSet::new();
        let _ = secrets.add(Provider::Github, GITHUB_SECRET.into());
        config.secrets = secrets;
        config.retention.max_exchanges = max;
        Agent::spawn(config)
    };
    let agent = spawn(100).await?;
    tokio::time::timeout(WAIT, agent.connected()).await??;
    send(signed(&url, Provider::Github, GITHUB_SECRET, &d, "{}")?).await?;
    agent.shutdown().await?;

    let agent = spawn(100).await?;
    tokio::time::timeout(WAIT, agent.connected()).await??;
    send(signed(&url, Provider::Github, GITHUB_SECRET, &d, "{}")?).await?;
    assert_eq!(app.received().len(), 1, "still a duplicate after a restart");
    // Once the first delivery has left the history, the event is new again.
    agent
        .history()
        .clear()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    send(signed(&url, Provider::Github, GITHUB_SECRET, &d, "{}")?).await?;
    assert_eq!(app.received().len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_copy_arriving_while_the_first_is_still_running_waits_for_it() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = agent(&relay, "slow", &app.target(), true).await?;
    // The app takes 3 s; the sender gives up waiting and retries meanwhile,
    // as Slack does after 3 s.
    let url = relay.url("slow", "/slow");
    let d = [("x-github-delivery", "still-running")];
    let first = tokio::spawn(send(signed(
        &url,
        Provider::Github,
        GITHUB_SECRET,
        &d,
        "{}",
    )?));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (status, headers, _) =
        send(signed(&url, Provider::Github, GITHUB_SECRET, &d, "{}")?).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("x-hookrelay-duplicate-of").is_some());
    let (status, _, _) = first.await??;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.received().len(), 1, "the app ran the event once");
    let exchanges = all(&agent).await?;
    assert_eq!(
        exchanges
            .iter()
            .filter(|e| e.duplicate_of.is_some())
            .count(),
        1
    );
    Ok(())
}
