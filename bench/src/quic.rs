//! Idle agents without agent processes: QUIC connections made by this
//! process that speak the real protocol (hello, welcome, queue stream) with
//! the transport settings of `relay-client`, then stay connected and idle.
//!
//! The relay's certificate is pinned by its SHA-256 fingerprint, as
//! `relay-client --relay-cert-sha256` does, and the handshake signature is
//! still checked against it.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use hookrelay_shared::{
    codec::{read_frame, write_frame},
    Hello, QueueOpen, RelayToAgent, ALPN, PROTOCOL_VERSION,
};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use sha2::{Digest, Sha256};

/// `relay-client`'s keep-alive interval (`session::KEEP_ALIVE_INTERVAL`).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// `relay-client`'s idle timeout (`session::IDLE_TIMEOUT`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams the relay may open towards `relay-client` at once.
const MAX_CONCURRENT_DELIVERIES: u32 = 1024;
/// `relay-client`'s queue window (`queued::QUEUE_WINDOW`).
const QUEUE_WINDOW: u32 = 64;
/// QUIC handshake plus hello and welcome, as `relay-client` allows.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client endpoint on 127.0.0.1 whose connections trust only the
/// certificate with SHA-256 `fingerprint` (hex, as `relay-server` prints it).
pub fn endpoint(fingerprint: &str) -> anyhow::Result<quinn::Endpoint> {
    let mut pinned = [0u8; 32];
    hex::decode_to_slice(fingerprint.trim(), &mut pinned)
        .with_context(|| format!("the relay's fingerprint {fingerprint:?} is not 64 hex digits"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("a TLS 1.3 client configuration")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { pinned, provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .context("a QUIC client configuration")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_concurrent_bidi_streams(MAX_CONCURRENT_DELIVERIES.into())
        .max_concurrent_uni_streams(0u32.into())
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .context("the idle timeout as a QUIC varint")?,
        ));
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("binding a QUIC client endpoint on 127.0.0.1")?;
    endpoint.set_default_client_config(config);
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
        .map_err(|_| anyhow::anyhow!("no welcome within {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("agent for tunnel {tunnel}"))
}

/// Accepts exactly the pinned certificate, and checks the handshake
/// signature against it (the relay must hold its key).
#[derive(Debug)]
struct Pinned {
    pinned: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.pinned {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
