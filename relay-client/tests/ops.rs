//! Operations: both `/metrics` endpoints are scraped, parsed as the
//! exposition format, and the right series move as webhooks flow; `/readyz`
//! follows the link; label cardinality stays bounded.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use http::StatusCode;
use relay_client::Agent;

/// One scrape: `series{labels}` → value, checked for well-formedness.
#[derive(Debug)]
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    async fn of(url: &str) -> anyhow::Result<Scrape> {
        let (status, headers, body) = send(http::Request::get(url).body(full(""))?).await?;
        anyhow::ensure!(status == StatusCode::OK, "{url}: {status}");
        let ct = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        anyhow::ensure!(ct.starts_with("application/openmetrics-text"), "{ct}");
        Scrape::parse(std::str::from_utf8(&body)?)
    }

    /// Parses the text format strictly enough to catch a broken exposition:
    /// every sample belongs to a family declared by `# TYPE`, label sets are
    /// well formed, values are numbers, and the text ends with `# EOF`.
    fn parse(text: &str) -> anyhow::Result<Scrape> {
        let mut families: BTreeSet<String> = BTreeSet::new();
        let mut samples = BTreeMap::new();
        anyhow::ensure!(text.ends_with("# EOF\n"), "no # EOF terminator");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split_whitespace().next().unwrap_or_default();
                families.insert(name.to_owned());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .ok_or_else(|| anyhow::anyhow!("no value: {line}"))?;
            let value: f64 = value
                .parse()
                .map_err(|_| anyhow::anyhow!("bad value: {line}"))?;
            let name = series.split('{').next().unwrap_or_default();
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    anyhow::ensure!(
                        labels.starts_with('{') && labels.ends_with('}'),
                        "bad labels: {line}"
                    );
                    for pair in labels[1..labels.len() - 1].split("\",") {
                        let (k, v) = pair
                            .split_once("=\"")
                            .ok_or_else(|| anyhow::anyhow!("bad label: {line}"))?;
                        anyhow::ensure!(
                            k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                            "bad label name: {line}"
                        );
                        anyhow::ensure!(!v.contains('\n'), "bad label value: {line}");
                    }
                }
            }
            let family = ["_total", "_bucket", "_sum", "_count", "_created"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(*f)))
                .unwrap_or(name);
            anyhow::ensure!(families.contains(family), "sample without # TYPE: {line}");
            samples.insert(series.to_owned(), value);
        }
        Ok(Scrape(samples))
    }

    fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// Sum over every series of `name` whose labels contain all of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .filter(|(series, _)| {
                labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }

    fn names(&self, name: &str) -> usize {
        self.0
            .keys()
            .filter(|s| s.split('{').next() == Some(name))
            .count()
    }
}

fn inspector(agent: &Agent, path: &str) -> anyhow::Result<String> {
    let addr = agent
        .inspector_addr()
        .ok_or_else(|| anyhow::anyhow!("inspector off"))?;
    Ok(format!("http://{addr}{path}"))
}

#[tokio::test]
async fn both_metrics_endpoints_move_with_the_traffic() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let relay_metrics = format!("http://{}/metrics", relay.relay.admin_addr());
    let agent = relay.inspected_agent("ops", &app.target()).await?;
    let agent_metrics = inspector(&agent, "/metrics")?;

    let r0 = Scrape::of(&relay_metrics).await?;
    let a0 = Scrape::of(&agent_metrics).await?;
    assert_eq!(r0.get("hookrelay_relay_agents_connected"), 1.0);
    assert_eq!(a0.get("hookrelay_agent_connected"), 1.0);

    // Two answered 2xx (bodies of 11 and 4 bytes), one 500, one for a tunnel
    // nobody holds.
    assert_eq!(
        post(&relay.url("ops", "/a"), "{\"n\":12345}").await?.0,
        StatusCode::OK
    );
    assert_eq!(
        post(&relay.url("ops", "/b"), "abcd").await?.0,
        StatusCode::OK
    );
    assert_eq!(
        post(&relay.url("ops", "/status/500"), "").await?.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        post(&relay.url("nobody", "/x"), "").await?.0,
        StatusCode::NOT_FOUND
    );
    // A wrong token.
    let mut bad = relay.agent_config(Some("ops-bad"), &app.target());
    bad.token = relay_client::Secret::new("hkr_wrong");
    assert!(Agent::spawn(bad).await.is_err());

    let r1 = Scrape::of(&relay_metrics).await?;
    let delta = |name: &str, labels: &[(&str, &str)]| r1.sum(name, labels) - r0.sum(name, labels);
    assert_eq!(
        delta(
            "hookrelay_relay_requests_total",
            &[
                ("tunnel", "ops"),
                ("class", "2xx"),
                ("outcome", "delivered")
            ]
        ),
        2.0,
        "{r1:?}"
    );
    assert_eq!(
        delta(
            "hookrelay_relay_requests_total",
            &[
                ("tunnel", "ops"),
                ("class", "5xx"),
                ("outcome", "delivered")
            ]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "hookrelay_relay_requests_total",
            &[
                ("tunnel", "_unknown"),
                ("class", "4xx"),
                ("outcome", "unknown_tunnel")
            ]
        ),
        1.0
    );
    assert_eq!(
        delta("hookrelay_relay_request_bytes_total", &[("tunnel", "ops")]),
        15.0
    );
    assert!(delta("hookrelay_relay_response_bytes_total", &[("tunnel", "ops")]) > 0.0);
    assert_eq!(
        delta(
            "hookrelay_relay_request_duration_seconds_count",
            &[("kind", "sync")]
        ),
        4.0
    );
    assert_eq!(
        delta(
            "hookrelay_relay_auth_failures_total",
            &[("reason", "bad_token")]
        ),
        1.0
    );

    // The agent counts a delivery once its record is on disk, which shares an
    // fsync with the next few milliseconds of records: wait for all three.
    let deadline = tokio::time::Instant::now() + WAIT;
    let a1 = loop {
        let scrape = Scrape::of(&agent_metrics).await?;
        let counted = scrape.sum("hookrelay_agent_deliveries_total", &[])
            - a0.sum("hookrelay_agent_deliveries_total", &[]);
        if counted >= 3.0 || tokio::time::Instant::now() > deadline {
            break scrape;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let adelta = |name: &str, labels: &[(&str, &str)]| a1.sum(name, labels) - a0.sum(name, labels);
    assert_eq!(
        adelta(
            "hookrelay_agent_deliveries_total",
            &[("kind", "sync"), ("class", "2xx"), ("outcome", "ok")]
        ),
        2.0,
        "{a1:?}"
    );
    assert_eq!(
        adelta("hookrelay_agent_deliveries_total", &[("class", "5xx")]),
        1.0
    );
    assert_eq!(adelta("hookrelay_agent_request_bytes_total", &[]), 15.0);
    assert_eq!(adelta("hookrelay_agent_history_exchanges", &[]), 3.0);
    assert!(
        a1.sum("hookrelay_agent_history_disk_bytes", &[]) > 0.0,
        "{a1:?}"
    );
    // The history and the outbox's files: at least the history.
    assert!(
        a1.sum("hookrelay_agent_disk_bytes", &[])
            >= a1.sum("hookrelay_agent_history_disk_bytes", &[]),
        "{a1:?}"
    );
    assert_eq!(
        adelta("hookrelay_agent_app_duration_seconds_count", &[]),
        3.0
    );

    // Queued while the agent is away: depth, then delivery and acknowledgement.
    agent.shutdown().await?;
    assert_eq!(
        post(&relay.url("ops", "/later"), "{}").await?.0,
        StatusCode::ACCEPTED
    );
    let r2 = Scrape::of(&relay_metrics).await?;
    assert_eq!(r2.get("hookrelay_relay_queue_depth{tunnel=\"ops\"}"), 1.0);
    assert_eq!(r2.get("hookrelay_relay_queue_bytes{tunnel=\"ops\"}"), 2.0);
    assert!(r2
        .0
        .contains_key("hookrelay_relay_queue_oldest_age_seconds{tunnel=\"ops\"}"));
    assert_eq!(r2.get("hookrelay_relay_agents_connected"), 0.0);
    assert_eq!(
        r2.sum(
            "hookrelay_relay_requests_total",
            &[("outcome", "queued"), ("class", "2xx")]
        ),
        1.0
    );
    assert_eq!(
        r2.sum(
            "hookrelay_relay_request_duration_seconds_count",
            &[("kind", "queued")]
        ),
        1.0
    );

    let agent = relay.inspected_agent("ops", &app.target()).await?;
    let agent_metrics = inspector(&agent, "/metrics")?;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r3 = Scrape::of(&relay_metrics).await?;
        let a3 = Scrape::of(&agent_metrics).await?;
        if r3.get("hookrelay_relay_queue_delivered_total{tunnel=\"ops\"}") == 1.0
            && a3.sum("hookrelay_agent_deliveries_total", &[("kind", "queued")]) == 1.0
        {
            assert_eq!(r3.names("hookrelay_relay_queue_depth"), 0, "drained");
            assert_eq!(a3.get("hookrelay_agent_delivery_attempts_total"), 1.0);
            assert_eq!(a3.get("hookrelay_agent_queued_waiting"), 0.0);
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "queued delivery never counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    agent.shutdown().await?;
    Ok(())
}

/// A small delivery costs one packet each way on the link: the request with
/// its stream's end, then the answer with its end and the ACK. Each side reads
/// the other's stream to its end even when hyper stops at the declared length,
/// so neither drops a stream early and sends a STOP_SENDING the other must
/// answer (it was two packets each way, every packet a send, a receive and
/// wake-ups on both sides). Also: the link gauges describe a live link.
#[tokio::test]
async fn a_small_delivery_is_one_packet_each_way() -> anyhow::Result<()> {
    const N: usize = 100;
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = relay.inspected_agent("packets", &app.target()).await?;
    let metrics = inspector(&agent, "/metrics")?;
    let body: &'static str = "x".repeat(1024).leak();
    assert_eq!(
        post(&relay.url("packets", "/"), body).await?.0,
        StatusCode::OK
    );
    let before = Scrape::of(&metrics).await?;
    for _ in 0..N {
        assert_eq!(
            post(&relay.url("packets", "/"), body).await?.0,
            StatusCode::OK
        );
    }
    let after = Scrape::of(&metrics).await?;
    let delta = |name: &str| after.get(name) - before.get(name);
    let sent = delta("hookrelay_agent_link_sent_packets");
    let received = delta("hookrelay_agent_link_received_packets");
    // Delayed ACKs that miss the next packet (a stall of 25 ms) add a few.
    let most = 1.5 * N as f64;
    assert!(
        (N as f64..=most).contains(&sent) && (N as f64..=most).contains(&received),
        "{N} deliveries: {sent} packets sent, {received} received (at most {most} each)"
    );
    assert!(after.get("hookrelay_agent_link_rtt_seconds") > 0.0);
    assert!(after.get("hookrelay_agent_link_mtu_bytes") >= 1200.0);
    // Read off the link socket's row in /proc/net/udp: none dropped here.
    #[cfg(target_os = "linux")]
    assert_eq!(
        after.0.get("hookrelay_agent_link_receive_drops"),
        Some(&0.0)
    );
    assert_eq!(after.get("hookrelay_agent_connected"), 1.0);
    agent.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn tunnel_labels_stay_bounded_whatever_names_senders_use() -> anyhow::Result<()> {
    let relay = TestRelay::spawn().await?;
    for i in 0..300 {
        let (status, _, _) = post(&relay.url(&format!("made-up-{i}"), "/"), "").await?;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let scrape = Scrape::of(&format!("http://{}/metrics", relay.relay.admin_addr())).await?;
    assert_eq!(
        scrape.names("hookrelay_relay_requests_total"),
        1,
        "one _unknown series for 300 names: {scrape:?}"
    );
    assert_eq!(
        scrape.get("hookrelay_relay_requests_total{tunnel=\"_unknown\",class=\"4xx\",outcome=\"unknown_tunnel\"}"),
        300.0
    );
    Ok(())
}

#[tokio::test]
async fn readyz_follows_the_link_and_shutdown() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = relay.inspected_agent("ready", &app.target()).await?;
    let relay_ready = format!("http://{}/readyz", relay.relay.admin_addr());
    let agent_ready = inspector(&agent, "/readyz")?;
    let get = |url: String| async move {
        anyhow::Ok(send(http::Request::get(url).body(full(""))?).await?.0)
    };
    assert_eq!(get(relay_ready.clone()).await?, StatusCode::OK);
    assert_eq!(get(agent_ready.clone()).await?, StatusCode::OK);
    assert_eq!(get(inspector(&agent, "/healthz")?).await?, StatusCode::OK);

    let TestRelay { relay, .. } = relay;
    relay.shutdown().await;
    let mut status = agent.status();
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| !matches!(s, relay_client::Status::Connected { .. })),
    )
    .await??;
    assert_eq!(get(agent_ready).await?, StatusCode::SERVICE_UNAVAILABLE);
    // The agent is alive, just not ready.
    assert_eq!(get(inspector(&agent, "/healthz")?).await?, StatusCode::OK);
    agent.shutdown().await?;
    Ok(())
}
