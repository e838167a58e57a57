//! Idle agents without agent processes: QUIC connections made by this
//! process that speak the real protocol (hello, welcome, queue stream) with
//! the transport settings of `relay-client`, then stay connected and idle.
//!
//! The relay's certificate is pinned by its SHA-256 fingerprint, as
//! `relay-client --relay-cert-sha256` does, and the handshake signature is
//! still checked against it.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use hookrelay_shared::{
    codec::{read_frame, write_frame},
    Hello, QueueOpen, RelayToAgent, PROTOCOL_VERSION,
};
use relay_client::{
    config::{parse_fingerprint, Trust, DEFAULT_MAX_DELIVERIES},
    queued::QUEUE_WINDOW,
    session::with_transport,
    tls::client_config,
};

/// QUIC handshake plus hello and welcome, as `relay-client` allows.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client endpoint on 127.0.0.1 whose connections trust only the
/// certificate with SHA-256 `fingerprint` (hex, as `relay-server` prints it).
pub fn endpoint(fingerprint: &str) -> anyhow::Result<quinn::Endpoint> {
    let pinned = parse_fingerprint(fingerprint).map_err(anyhow::Error::msg)?;
    // The agent's own TLS and transport settings.
    let (config, _refusal) =
        client_config(&Trust::Pinned(pinned)).context("a QUIC client configuration")?;
    // The agent's socket buffers too: this one endpoint carries every idle
    // agent's handshake, a burst the kernel's default buffer would drop from.
    let (mut endpoint, _) =
        relay_server::udp::quic_endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), None)
            .context("binding a QUIC client endpoint on 127.0.0.1")?;
    endpoint.set_default_client_config(with_transport(config, DEFAULT_MAX_DELIVERIES));
    Ok(endpoint)
}

/// One connected agent, holding one tunnel; dropping it leaves the streams
/// open until the connection is closed.
pub struct IdleAgent {
    pub connection: quinn::Connection,
    _control: (quinn::SendStream, quinn::RecvStream),
    _queue: (quinn::SendStream, quinn::RecvStream),
}

/// Connects to the relay at `relay`, says hello with `token` for `tunnel`,
/// waits for the welcome granting it, and opens the queue stream, as
/// `relay-client` does.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    token: &str,
    tunnel: &str,
) -> anyhow::Result<IdleAgent> {
    let attempt = async {
        let connection = endpoint
            .connect(relay, "127.0.0.1")
            .context("starting a QUIC connection")?
            .await
            .context("QUIC handshake")?;
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .context("opening the control stream")?;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            token: token.to_owned(),
            agent_id: format!("bench-{tunnel}"),
            tunnels: vec![tunnel
                .parse()
                .with_context(|| format!("tunnel name {tunnel:?}"))?],
            settings: Default::default(),
            policy: Default::default(),
        };
        write_frame(&mut send, &hello)
            .await
            .context("sending the hello")?;
        match read_frame::<RelayToAgent, _>(&mut recv)
            .await
            .context("reading the answer to the hello")?
        {
            Some(RelayToAgent::Welcome { tunnels, .. })
                if tunnels.len() == 1 && tunnels[0].name.as_str() == tunnel => {}
            Some(RelayToAgent::Welcome { tunnels, .. }) => {
                anyhow::bail!("welcomed with other tunnels than {tunnel}: {tunnels:?}")
            }
            Some(RelayToAgent::Rejected { reason, message }) => {
                anyhow::bail!("refused ({reason:?}): {message}")
            }
            None => anyhow::bail!("the relay ended the control stream without an answer"),
        }
        let (mut queue_send, queue_recv) = connection
            .open_bi()
            .await
            .context("opening the queue stream")?;
        write_frame(
            &mut queue_send,
            &QueueOpen {
                window: QUEUE_WINDOW,
            },
        )
        .await
        .context("opening the queue")?;
        Ok(IdleAgent {
            connection,
            _control: (send, recv),
            _queue: (queue_send, queue_recv),
        })
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no welcome within {CONNECT_TIMEOUT:?}")))
        .with_context(|| format!("agent for tunnel {tunnel}"))
}
