//! The relay's certificate: PEM files, or a self-signed one generated on first
//! start and kept in the data directory so its fingerprint stays stable.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use hookrelay_shared::ALPN;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::config::TlsSource;

/// How long an agent link may stay silent before it counts as dead. Agents send
/// keep-alives far more often, so only a real outage gets this far.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Keep-alive interval from the relay's side, so a link stays alive (and NAT
/// mappings open) even when an agent's own keep-alives are delayed.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(3);

/// Bidirectional streams an agent may have open at once. It opens two (the
/// control stream and the queue stream); the rest is slack for a reconnect
/// overlap. QUIC flow control holds an agent that tries to open more.
pub const AGENT_OPENED_STREAMS: u32 = 4;

/// Bytes an agent may have in flight, unread by the relay, on one stream (a
/// response body on a delivery stream). 1 MiB keeps a 100 ms path at ~10 MiB/s
/// per delivery; on loopback 25 MiB streams in well under a second.
pub const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// Bytes an agent may have in flight, unread, across its whole connection:
/// the most one agent connection can make the relay buffer. Response bodies
/// wait here while their senders read slowly, and a full window stalls every
/// stream of the connection (control and queue too): 64 MiB takes 64 senders
/// that stop reading 1 MiB responses, rather than 8, to stall an agent.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 64 * 1024 * 1024;

/// Certificate chain and key, and the leaf's fingerprint for pinning.
pub struct TlsMaterial {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    fingerprint: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Loads the configured certificate, or the self-signed one under `data_dir`
    /// (generating it on first use, for `names` and loopback).
    ///
    /// # Errors
    /// When files are missing, unreadable or hold no certificate or key.
    pub fn open(source: &TlsSource, data_dir: &Path, names: &[String]) -> Result<Self, TlsError> {
        let (cert, key) = match source {
            TlsSource::Files { cert, key } => (cert.clone(), key.clone()),
            TlsSource::SelfSigned => {
                let dir = data_dir.join("tls");
                let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
                if !cert.exists() || !key.exists() {
                    generate(&dir, &cert, &key, names)?;
                }
                (cert, key)
            }
        };
        let certs = CertificateDer::pem_file_iter(&cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError::Pem {
                path: cert.clone(),
                reason: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::Pem {
                path: cert,
                reason: "no certificate in file".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| TlsError::Pem {
            path: key.clone(),
            reason: e.to_string(),
        })?;
        let fingerprint = fingerprint(&certs[0]);
        Ok(TlsMaterial {
            certs,
            key,
            fingerprint,
        })
    }

    /// Lowercase hex SHA-256 of the leaf certificate (DER), what agents pin with
    /// `--relay-cert-sha256`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// QUIC server configuration: TLS 1.3, ALPN `hookrelay/1`, no 0-RTT (a token
    /// in early data could be replayed), and transport limits for agent links:
    /// no unidirectional streams (agents never open one), at most
    /// [`AGENT_OPENED_STREAMS`] agent-opened streams, bounded receive windows
    /// and the agent's idle timeout.
    ///
    /// # Errors
    /// When rustls refuses the key.
    pub fn quic_server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Rustls)?
            .with_no_client_auth()
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .map_err(TlsError::Rustls)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.max_early_data_size = 0;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(AGENT_OPENED_STREAMS.into())
            .max_concurrent_uni_streams(0u32.into())
            .stream_receive_window(STREAM_RECEIVE_WINDOW.into())
            .receive_window(CONNECTION_RECEIVE_WINDOW.into())
            .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
            .max_idle_timeout(Some(
                IDLE_TIMEOUT
                    .try_into()
                    .map_err(|_| TlsError::Quic("idle timeout out of range".into()))?,
            ));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

/// Lowercase hex SHA-256 of a DER certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

fn generate(dir: &Path, cert: &Path, key: &Path, names: &[String]) -> Result<(), TlsError> {
    let mut sans = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    sans.extend(names.iter().cloned());
    let certified =
        rcgen::generate_simple_self_signed(sans).map_err(|e| TlsError::Generate(e.to_string()))?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    crate::auth::write_private(key, certified.signing_key.serialize_pem().as_bytes())
        .map_err(io(key))?;
    fs::write(cert, certified.cert.pem()).map_err(io(cert))?;
    Ok(())
}

/// Why the relay has no usable certificate.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("cannot write {}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("certificate or key refused by rustls")]
    Rustls(#[source] rustls::Error),
    #[error("cannot build the QUIC configuration: {0}")]
    Quic(String),
}
