//! Abuse of the QUIC side, spoken by hand with a raw quinn client: token
//! guessing is locked out per address, and an authenticated agent cannot open
//! streams beyond the relay's limit. Legitimate agents are unaffected by both.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::*;
use hookrelay_shared::{
    codec::{read_frame, write_frame},
    Hello, RejectReason, RelayToAgent,
};
use http::StatusCode;
use relay_client::Trust;

/// Wrong tokens one address may present per minute before it is locked out
/// (the relay's limit, documented in the README).
const MAX_FAILURES: usize = 10;

/// A raw QUIC client endpoint on `bind`, trusting `relay`'s certificate.
fn endpoint(relay: &TestRelay, bind: &str) -> anyhow::Result<quinn::Endpoint> {
    let (client_config, _) = relay_client::tls::client_config(&Trust::Pinned(relay.fingerprint()))?;
    let mut endpoint = quinn::Endpoint::client(bind.parse::<SocketAddr>()?)?;
    endpoint.set_default_client_config(client_config);
    Ok(endpoint)
}

/// Connects, sends a hello with `token` for `tunnel` and returns the relay's
/// answer and the connection (with its control stream).
async fn hello(
    endpoint: &quinn::Endpoint,
    relay: &TestRelay,
    token: &str,
    tunnel: &str,
) -> anyhow::Result<(
    RelayToAgent,
    quinn::Connection,
    (quinn::SendStream, quinn::RecvStream),
)> {
    let conn = endpoint
        .connect(relay.relay.quic_addr(), "localhost")?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Hello {
        version: hookrelay_shared::PROTOCOL_VERSION,
        token: token.to_owned(),
        agent_id: format!("raw-{tunnel}"),
        tunnels: vec![tunnel.parse()?],
        settings: Default::default(),
        policy: Default::default(),
    };
    write_frame(&mut send, &hello).await?;
    let answer = tokio::time::timeout(WAIT, read_frame::<RelayToAgent, _>(&mut recv))
        .await??
        .ok_or_else(|| anyhow::anyhow!("the relay closed the control stream silently"))?;
    Ok((answer, conn, (send, recv)))
}

/// The relay's value of the counter `name{reason="reason"}`.
async fn auth_failures(relay: &TestRelay, reason: &str) -> anyhow::Result<f64> {
    metric(
        relay,
        &format!("hookrelay_relay_auth_failures_total{{reason=\"{reason}\"}}"),
    )
    .await
}

/// The relay's `/metrics` text.
async fn metrics_text(relay: &TestRelay) -> anyhow::Result<String> {
    let url = format!("http://{}/metrics", relay.relay.admin_addr());
    let (status, _, body) = send(http::Request::get(url).body(full(""))?).await?;
    assert_eq!(status, StatusCode::OK);
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The relay's value of the metric line starting with `name` (0 when absent).
async fn metric(relay: &TestRelay, name: &str) -> anyhow::Result<f64> {
    let text = metrics_text(relay).await?;
    let prefix = format!("{name} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// QUIC amplification (SECURITY.md §3.3): a new connection is answered with a
/// Retry before any handshake, so only a client that receives at its source
/// address gets the relay's certificates or any connection state; a real
/// agent follows the Retry and is served.
#[tokio::test]
async fn new_connections_prove_their_address_before_the_handshake() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    assert_eq!(
        metric(&relay, "hookrelay_relay_quic_retries_total").await?,
        0.0
    );
    let _agent = relay.agent("alice", &app.target()).await?;
    assert!(metric(&relay, "hookrelay_relay_quic_retries_total").await? >= 1.0);
    let (status, _, _) = post(&relay.url("alice", "/after-retry"), "{}").await?;
    assert_eq!(status, StatusCode::OK);
    // A raw client too: the Retry is part of every new connection.
    let before = metric(&relay, "hookrelay_relay_quic_retries_total").await?;
    let endpoint = endpoint(&relay, "127.0.0.1:0")?;
    let (answer, _conn, _control) = hello(&endpoint, &relay, "not-a-token", "bob").await?;
    assert!(
        matches!(answer, RelayToAgent::Rejected { .. }),
        "{answer:?}"
    );
    assert!(metric(&relay, "hookrelay_relay_quic_retries_total").await? > before);
    Ok(())
}

/// A burst of connecting agents (every agent after a relay restart) must not
/// overflow the QUIC socket's receive buffer: each dropped Initial costs its
/// agent a retransmission timeout of a second or more. The relay asks for
/// `QUIC_BUFFER_BYTES`, the kernel grants at most `net.core.rmem_max`; the
/// default it would otherwise keep (`rmem_default`, 208 KiB) lost 300–550
/// datagrams per burst of 200 agents.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_quic_socket_has_room_for_a_burst_of_handshakes() -> anyhow::Result<()> {
    use relay_server::udp::QUIC_BUFFER_BYTES;
    let relay = TestRelay::spawn().await?;
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")?
        .trim()
        .parse()?;
    let granted = metric(&relay, "hookrelay_relay_quic_receive_buffer_bytes").await?;
    assert!(
        granted >= QUIC_BUFFER_BYTES.min(rmem_max) as f64,
        "receive buffer {granted} B (asked {QUIC_BUFFER_BYTES}, rmem_max {rmem_max})"
    );
    // The kernel's drop count for this socket is exposed (0 on a quiet relay).
    let text = metrics_text(&relay).await?;
    assert!(
        text.lines()
            .any(|l| l == "hookrelay_relay_quic_receive_drops_total 0"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn wrong_tokens_lock_out_their_address_and_no_other() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    // Linux routes all of 127/8 over loopback: the attacker is 127.0.0.2, the
    // legitimate agent 127.0.0.1.
    let attacker = endpoint(&relay, "127.0.0.2:0")?;
    let started = Instant::now();

    let guessing = async {
        let mut reasons = Vec::new();
        for i in 0..200 {
            let wrong = format!("hkr_{i:040}");
            match hello(&attacker, &relay, &wrong, "victim").await? {
                (RelayToAgent::Rejected { reason, message }, conn, _) => {
                    if reason == RejectReason::TooManyAttempts {
                        assert!(message.contains("retry in"), "{message}");
                    }
                    conn.close(0u32.into(), b"");
                    reasons.push(reason);
                }
                (other, _, _) => panic!("a wrong token got {other:?}"),
            }
        }
        anyhow::Ok(reasons)
    };
    let legitimate = async {
        // Connects and delivers while the guessing goes on.
        let agent = relay.agent("good", &app.target()).await?;
        assert_eq!(
            post(&relay.url("good", "/during"), "{}").await?.0,
            StatusCode::OK
        );
        anyhow::Ok(agent)
    };
    let (reasons, _agent) = tokio::try_join!(guessing, legitimate)?;

    assert!(
        reasons[..MAX_FAILURES]
            .iter()
            .all(|r| *r == RejectReason::BadToken),
        "the first {MAX_FAILURES} are told the token is wrong: {reasons:?}"
    );
    assert!(
        reasons[MAX_FAILURES..]
            .iter()
            .all(|r| *r == RejectReason::TooManyAttempts),
        "then the address is locked out: {reasons:?}"
    );

    // Locked out means the token is not even checked: a valid one is refused too.
    match hello(&attacker, &relay, &relay.token, "victim").await? {
        (RelayToAgent::Rejected { reason, .. }, conn, _) => {
            assert_eq!(reason, RejectReason::TooManyAttempts);
            conn.close(0u32.into(), b"");
        }
        (other, _, _) => panic!("a locked-out address got {other:?}"),
    }

    // Another address still connects and delivers during the lockout.
    let late = TestApp::spawn().await?;
    let _late_agent = relay.agent("late", &late.target()).await?;
    assert_eq!(
        post(&relay.url("late", "/after"), "{}").await?.0,
        StatusCode::OK
    );
    assert_eq!(
        post(&relay.url("good", "/after"), "{}").await?.0,
        StatusCode::OK
    );
    assert_eq!(app.received().len(), 2);
    assert_eq!(late.received().len(), 1);

    // Counted by reason (the relay counts once the refused agent has left).
    let deadline = Instant::now() + WAIT;
    let locked_out = (200 - MAX_FAILURES + 1) as f64;
    loop {
        let bad = auth_failures(&relay, "bad_token").await?;
        let locked = auth_failures(&relay, "too_many_attempts").await?;
        if bad == MAX_FAILURES as f64 && locked == locked_out {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics: bad_token {bad}, too_many_attempts {locked}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn stream_flood_is_held_to_the_limit_and_others_are_served() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let raw = endpoint(&relay, "127.0.0.1:0")?;
    let (answer, conn, _control) = hello(&raw, &relay, &relay.token, "flood").await?;
    assert!(
        matches!(answer, RelayToAgent::Welcome { .. }),
        "the flooder is a valid agent: {answer:?}"
    );

    // Try to open 1,000 streams, each with a byte so the relay sees it, giving
    // up once opening has been blocked for a while.
    let limit = relay_server::tls::AGENT_OPENED_STREAMS as usize;
    let started = Instant::now();
    let mut held = Vec::new();
    let mut blocked = false;
    for _ in 0..1_000 {
        match tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await {
            Ok(Ok((mut send, recv))) => {
                send.write_all(b"x").await?;
                held.push((send, recv));
            }
            Ok(Err(e)) => panic!("the relay dropped the flooder instead: {e}"),
            Err(_) => {
                blocked = true;
                break;
            }
        }
    }
    assert!(blocked, "opening streams never blocked");
    // The control stream is one of the agent's streams.
    assert!(
        held.len() < limit,
        "{} streams open beside the control stream, limit {limit}",
        held.len()
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // Meanwhile the relay serves a legitimate agent as usual.
    let _agent = relay.agent("legit", &app.target()).await?;
    for i in 0..5 {
        let (status, _, _) = post(&relay.url("legit", &format!("/n{i}")), "{}").await?;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(app.received().len(), 5);

    // The flooder is still blocked, and still connected.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), conn.open_bi())
            .await
            .is_err(),
        "a stream opened beyond the limit"
    );
    assert!(conn.close_reason().is_none());
    Ok(())
}
