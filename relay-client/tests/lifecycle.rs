//! The agent's link to the relay: registration, refusals that end the agent,
//! and reconnection after relay restarts and dead paths.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use hookrelay_shared::{
    codec::{read_frame, write_frame},
    Hello, RejectReason, RelayToAgent,
};
use http::StatusCode;
use relay_client::{session::ConnectError, Agent, AgentError, Status, Trust};
use relay_server::Relay;
use tokio::net::UdpSocket;

fn rejected(result: Result<Agent, AgentError>) -> RejectReason {
    match result {
        Err(AgentError::Connect(ConnectError::Rejected { reason, .. })) => reason,
        Err(other) => panic!("expected a rejection, got {other:?}"),
        Ok(_) => panic!("expected a rejection, the agent connected"),
    }
}

#[tokio::test]
async fn wrong_token_is_refused_and_ends_the_agent() -> anyhow::Result<()> {
    let relay = TestRelay::spawn().await?;
    let mut config = relay.agent_config(Some("alice"), "3000");
    config.token = relay_client::Secret::new("hkr_0000000000000000000000000000000000000000");
    let started = Instant::now();
    let result = tokio::time::timeout(WAIT, Agent::spawn(config)).await?;
    let err = result
        .as_ref()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(rejected(result), RejectReason::BadToken);
    assert!(
        err.contains("token"),
        "the message says what is wrong: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "no retry loop");
    Ok(())
}

#[tokio::test]
async fn token_grants_decide_which_tunnels_an_agent_may_hold() -> anyhow::Result<()> {
    let relay = TestRelay::spawn().await?;
    let alice = relay
        .relay
        .tokens()
        .create("alice", vec!["alice-*".parse()?])?;
    let mut config = relay.agent_config(Some("bob"), "3000");
    config.token = relay_client::Secret::new(alice.clone());
    assert_eq!(
        rejected(Agent::spawn(config).await),
        RejectReason::TunnelNotAllowed
    );

    let mut config = relay.agent_config(Some("alice-dev"), "3000");
    config.token = relay_client::Secret::new(alice);
    let agent = Agent::spawn(config).await?;
    let urls = tokio::time::timeout(WAIT, agent.connected()).await??;
    assert_eq!(urls, [format!("http://{}/t/alice-dev/", relay.http_addr())]);
    Ok(())
}

#[tokio::test]
async fn revoked_token_is_refused_on_the_next_connection() -> anyhow::Result<()> {
    let relay = TestRelay::spawn().await?;
    let carol = relay.relay.tokens().create("carol", vec!["*".parse()?])?;
    let mut config = relay.agent_config(Some("carol"), "3000");
    config.token = relay_client::Secret::new(carol);
    let agent = Agent::spawn(config.clone()).await?;
    agent.shutdown().await?;
    assert!(relay.relay.tokens().revoke("carol")?);
    assert_eq!(rejected(Agent::spawn(config).await), RejectReason::BadToken);
    Ok(())
}

#[tokio::test]
async fn held_tunnel_is_refused_to_a_second_agent() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let _first = relay.agent("shared", &app.target()).await?;
    let other_dir = relay.dir.path().join("second-agent");
    let result =
        Agent::spawn(relay.agent_config_in(&other_dir, Some("shared"), &app.target())).await;
    let message = result
        .as_ref()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(rejected(result), RejectReason::TunnelTaken);
    assert!(message.contains("shared"), "{message}");
    assert_eq!(
        post(&relay.url("shared", "/still-mine"), "{}").await?.0,
        StatusCode::OK
    );
    Ok(())
}

#[tokio::test]
async fn wrong_certificate_fingerprint_ends_the_agent() -> anyhow::Result<()> {
    let relay = TestRelay::spawn().await?;
    let mut config = relay.agent_config(Some("pinned"), "3000");
    config.trust = Trust::Pinned([7; 32]);
    match tokio::time::timeout(WAIT, Agent::spawn(config)).await? {
        Err(AgentError::Connect(ConnectError::Fingerprint { got })) => {
            assert_eq!(
                Some(got),
                relay.relay.cert_fingerprint(),
                "the message shows the real fingerprint"
            );
        }
        other => panic!("expected a fingerprint error, got {:?}", other.err()),
    }
    // Without a pin, a self-signed relay fails the public-roots check: fatal too.
    let mut config = relay.agent_config(Some("pinned"), "3000");
    config.trust = Trust::SystemRoots;
    let err = tokio::time::timeout(WAIT, Agent::spawn(config))
        .await?
        .err();
    assert!(
        matches!(
            err,
            Some(AgentError::Connect(ConnectError::Untrusted { .. }))
        ),
        "expected an untrusted-certificate error, got {err:?}"
    );
    assert!(err.is_some_and(|e| e.to_string().contains("--relay-cert-sha256")));
    Ok(())
}

/// Speaks the wire protocol by hand: an agent from the future is refused with
/// a reason it can act on, and garbage is refused without harm.
#[tokio::test]
async fn incompatible_or_malformed_hello_is_refused() -> anyhow::Result<()> {
    let relay = TestRelay::spawn().await?;
    let (client_config, _) = relay_client::tls::client_config(&Trust::Pinned(relay.fingerprint()))?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;

    let conn = endpoint
        .connect_with(client_config.clone(), relay.relay.quic_addr(), "localhost")?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Hello {
        version: 999,
        token: relay.token.clone(),
        agent_id: "future".into(),
        tunnels: vec!["future".parse()?],
        settings: Default::default(),
        policy: Default::default(),
    };
    write_frame(&mut send, &hello).await?;
    match tokio::time::timeout(WAIT, read_frame::<RelayToAgent, _>(&mut recv)).await?? {
        Some(RelayToAgent::Rejected { reason, message }) => {
            assert_eq!(
                reason,
                RejectReason::VersionMismatch {
                    relay_version: hookrelay_shared::PROTOCOL_VERSION
                }
            );
            assert!(
                message.contains("999") && message.contains("upgrade the relay"),
                "{message}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    conn.close(0u32.into(), b"");

    let conn = endpoint
        .connect_with(client_config, relay.relay.quic_addr(), "localhost")?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    tokio::io::AsyncWriteExt::write_all(&mut send, &[0, 0, 0, 5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb])
        .await?;
    match tokio::time::timeout(WAIT, read_frame::<RelayToAgent, _>(&mut recv)).await?? {
        Some(RelayToAgent::Rejected { reason, .. }) => {
            assert_eq!(reason, RejectReason::InvalidHello)
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // The relay is unharmed.
    let app = TestApp::spawn().await?;
    let _agent = relay.agent("after-garbage", &app.target()).await?;
    assert_eq!(
        post(&relay.url("after-garbage", "/"), "{}").await?.0,
        StatusCode::OK
    );
    Ok(())
}

#[tokio::test]
async fn generated_tunnel_name_survives_agent_restarts() -> anyhow::Result<()> {
    let relay = TestRelay::spawn().await?;
    let dir = relay.dir.path().join("generated");
    let first = Agent::spawn(relay.agent_config_in(&dir, None, "3000")).await?;
    let urls = tokio::time::timeout(WAIT, first.connected()).await??;
    let name = first.tunnel().clone();
    assert!(name.as_str().starts_with("hook-"), "{name}");
    first.shutdown().await?;
    let second = Agent::spawn(relay.agent_config_in(&dir, None, "3000")).await?;
    assert_eq!(second.tunnel(), &name);
    assert_eq!(tokio::time::timeout(WAIT, second.connected()).await??, urls);
    Ok(())
}

async fn respawn(data_dir: &std::path::Path, quic: SocketAddr) -> anyhow::Result<Relay> {
    let mut config = relay_server::Config::loopback(data_dir);
    config.quic = quic;
    // The old endpoint may take a moment to release its UDP port.
    let deadline = Instant::now() + WAIT;
    loop {
        match Relay::spawn(config.clone()).await {
            Ok(r) => return Ok(r),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[tokio::test]
async fn agent_reconnects_after_relay_restart() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = relay.agent("phoenix", &app.target()).await?;
    assert_eq!(
        post(&relay.url("phoenix", "/before"), "{}").await?.0,
        StatusCode::OK
    );

    let TestRelay {
        relay: old, dir, ..
    } = relay;
    let quic = old.quic_addr();
    let mut status = agent.status();
    old.shutdown().await;
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| matches!(s, Status::Reconnecting { .. })),
    )
    .await??;

    // Same data directory: same certificate, same tokens.
    let restarted = respawn(&dir.path().join("relay"), quic).await?;
    let urls = tokio::time::timeout(WAIT, agent.connected()).await??;
    let url = format!(
        "http://{}/t/phoenix/",
        restarted.http_addr().expect("http on")
    );
    assert_eq!(urls, std::slice::from_ref(&url));
    assert_eq!(post(&format!("{url}after"), "{}").await?.0, StatusCode::OK);
    let uris: Vec<String> = app.received().into_iter().map(|r| r.uri).collect();
    assert_eq!(uris, ["/before", "/after"]);
    Ok(())
}

/// A UDP relay between agent and relay that can silently drop every packet,
/// like a laptop whose Wi-Fi went away without a word.
struct Blackhole {
    addr: SocketAddr,
    dropping: Arc<AtomicBool>,
}

impl Blackhole {
    async fn spawn(upstream: SocketAddr) -> anyhow::Result<Blackhole> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        back.connect(upstream).await?;
        let addr = front.local_addr()?;
        let dropping = Arc::new(AtomicBool::new(false));
        let peer: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
        let (f, b, d, p) = (front.clone(), back.clone(), dropping.clone(), peer.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                *p.lock().expect("lock") = Some(from);
                if !d.load(Ordering::SeqCst) {
                    let _ = b.send(&buf[..n]).await;
                }
            }
        });
        let (f, b, d) = (front, back, dropping.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = b.recv(&mut buf).await {
                let to = *peer.lock().expect("lock");
                if let (false, Some(to)) = (d.load(Ordering::SeqCst), to) {
                    let _ = f.send_to(&buf[..n], to).await;
                }
            }
        });
        Ok(Blackhole { addr, dropping })
    }
}

#[tokio::test]
async fn dead_path_is_noticed_within_seconds_and_the_tunnel_comes_back() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let hole = Blackhole::spawn(relay.relay.quic_addr()).await?;
    let mut config = relay.agent_config(Some("wifi"), &app.target());
    config.relay = hole.addr.to_string();
    let agent = connected_agent(config).await?;
    assert_eq!(
        post(&relay.url("wifi", "/up"), "{}").await?.0,
        StatusCode::OK
    );

    hole.dropping.store(true, Ordering::SeqCst);
    let cut = Instant::now();
    let mut status = agent.status();
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| matches!(s, Status::Reconnecting { .. })),
    )
    .await??;
    let noticed = cut.elapsed();
    assert!(
        noticed < Duration::from_secs(20),
        "dead link noticed after {noticed:?}"
    );
    // The relay notices too and frees the tunnel; senders then hear "offline".
    let healthz = format!("http://{}/healthz", relay.relay.admin_addr());
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, _, body) = send(http::Request::get(&healthz).body(full(""))?).await?;
        let health: serde_json::Value = serde_json::from_slice(&body)?;
        if health["tunnels_online"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay never noticed the dead link"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Queued meanwhile (the default), and delivered once the link is back.
    let (status_code, _, body) = post(&relay.url("wifi", "/down"), "{}").await?;
    assert_eq!(
        status_code,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&body)
    );

    hole.dropping.store(false, Ordering::SeqCst);
    tokio::time::timeout(WAIT, agent.connected()).await??;
    until_app_has(&app, "/down").await?;
    assert_eq!(
        post(&relay.url("wifi", "/back"), "{}").await?.0,
        StatusCode::OK
    );
    Ok(())
}

#[tokio::test]
async fn agent_started_before_the_relay_connects_when_it_comes_up() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let hole = Blackhole::spawn(relay.relay.quic_addr()).await?;
    hole.dropping.store(true, Ordering::SeqCst);
    let mut config = relay.agent_config(Some("early"), &app.target());
    config.relay = hole.addr.to_string();
    let agent = tokio::time::timeout(WAIT, Agent::spawn(config)).await??;
    assert!(matches!(
        *agent.status().borrow(),
        Status::Reconnecting { .. }
    ));
    hole.dropping.store(false, Ordering::SeqCst);
    tokio::time::timeout(WAIT, agent.connected()).await??;
    assert_eq!(
        post(&relay.url("early", "/"), "{}").await?.0,
        StatusCode::OK
    );
    Ok(())
}

async fn until_app_has(app: &TestApp, uri: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !app.received().iter().any(|r| r.uri == uri) {
        anyhow::ensure!(Instant::now() < deadline, "the app never got {uri}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn relay_shutdown_lets_deliveries_in_flight_finish() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = relay.agent("graceful", &app.target()).await?;
    let url = relay.url("graceful", "/slow");
    let in_flight = tokio::spawn(async move { post(&url, "{}").await });
    until_app_has(&app, "/slow").await?;
    let mut status = agent.status();
    let TestRelay { relay, .. } = relay;
    relay.shutdown().await;
    let (code, _, _) = in_flight.await??;
    assert_eq!(
        code,
        StatusCode::OK,
        "the slow delivery completed during shutdown"
    );
    // Then the agent is told, and starts reconnecting.
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| matches!(s, Status::Reconnecting { .. })),
    )
    .await??;
    Ok(())
}

#[tokio::test]
async fn agent_shutdown_lets_deliveries_in_flight_finish() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = relay.agent("leaving", &app.target()).await?;
    let url = relay.url("leaving", "/slow");
    let in_flight = tokio::spawn(async move { post(&url, "{}").await });
    until_app_has(&app, "/slow").await?;
    let stopping = tokio::spawn(agent.shutdown());
    // While the agent drains, new webhooks are queued for its return, not
    // lost in it.
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, _, body) = post(&relay.url("leaving", "/new"), "{}").await?;
        if code == StatusCode::ACCEPTED {
            let queued: serde_json::Value = serde_json::from_slice(&body)?;
            assert_eq!(queued["status"], "queued");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay kept routing to a departing agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, _, _) = in_flight.await??;
    assert_eq!(
        code,
        StatusCode::OK,
        "the slow delivery completed during shutdown"
    );
    stopping.await??;
    Ok(())
}
