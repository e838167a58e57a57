//! The relay's certificate, one for the HTTPS ingress and the QUIC endpoint:
//! PEM files (read again when they change on disk or on SIGHUP), a self-signed
//! one generated on first start and kept in the data directory so its
//! fingerprint stays stable, or one obtained and renewed over ACME.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, SystemTime},
};

use futures_util::StreamExt;
use hookrelay_shared::ALPN;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_acme::{caches::DirCache, AcmeConfig, AcmeState, EventOk, ResolvesServerCertAcme};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{AcmeSettings, TlsSource};

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

/// How often certificate files are checked for a renewal (certbot replaces
/// them 30 days ahead, so a minute late costs nothing; two `stat`s are cheap).
pub const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// ALPN protocol of an ACME TLS-ALPN-01 challenge (RFC 8737): a connection
/// that negotiates it is the CA validating, not a sender.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// ALPN protocols of the HTTPS ingress, most preferred first.
const HTTPS_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The relay's certificate, live: what the HTTPS ingress and the QUIC endpoint
/// present. Cheap to clone; clones share one certificate.
#[derive(Clone)]
pub struct Certs {
    source: Arc<Source>,
}

enum Source {
    /// PEM files, or the self-signed certificate's files in the data directory.
    Files(Arc<FileCert>),
    /// Issued and renewed over ACME.
    Acme(Box<AcmeCert>),
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.source {
            Source::Files(file) => f
                .debug_struct("Certs")
                .field("cert", &file.cert)
                .field("fingerprint", &file.fingerprint())
                .finish(),
            Source::Acme(acme) => f
                .debug_struct("Certs")
                .field("acme", &acme.names)
                .field("ready", &acme.ready.load(Ordering::Relaxed))
                .finish(),
        }
    }
}

impl Certs {
    /// Loads the configured certificate, or the self-signed one under
    /// `data_dir` (generating it on first use, for `names` and loopback), or
    /// prepares ACME (cache in `data_dir/acme`; nothing is ordered until
    /// [`Certs::maintain`] runs).
    ///
    /// # Errors
    /// When files are missing, unreadable, hold no certificate or key, or a key
    /// that does not match the certificate.
    pub fn open(source: &TlsSource, data_dir: &Path, names: &[String]) -> Result<Self, TlsError> {
        let source = match source {
            TlsSource::Files { cert, key } => {
                Source::Files(Arc::new(FileCert::open(cert.clone(), key.clone())?))
            }
            TlsSource::SelfSigned => {
                let dir = data_dir.join("tls");
                let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
                if !cert.exists() || !key.exists() {
                    generate(&dir, &cert, &key, names)?;
                }
                Source::Files(Arc::new(FileCert::open(cert, key)?))
            }
            TlsSource::Acme(settings) => {
                Source::Acme(Box::new(AcmeCert::new(settings, &data_dir.join("acme"))?))
            }
        };
        Ok(Certs {
            source: Arc::new(source),
        })
    }

    /// Lowercase hex SHA-256 of the leaf certificate (DER), what agents pin with
    /// `--relay-cert-sha256`. `None` for an ACME certificate: agents check it
    /// against public roots, and every renewal changes it.
    pub fn fingerprint(&self) -> Option<String> {
        match &*self.source {
            Source::Files(file) => Some(file.fingerprint()),
            Source::Acme(_) => None,
        }
    }

    /// Whether there is a certificate to present: always, except while the
    /// first ACME certificate is being issued.
    pub fn is_ready(&self) -> bool {
        match &*self.source {
            Source::Files(_) => true,
            Source::Acme(acme) => acme.ready.load(Ordering::Acquire),
        }
    }

    /// Whether the HTTPS listener must answer ACME TLS-ALPN-01 challenges.
    pub fn is_acme(&self) -> bool {
        matches!(&*self.source, Source::Acme(_))
    }

    /// Reads the certificate files again (SIGHUP after a renewal). `Ok(true)`
    /// when they held a different certificate, which new connections get from
    /// now on; `Ok(false)` when it is the same, and for ACME, which renews by
    /// itself.
    ///
    /// # Errors
    /// When the files are unusable; the current certificate stays in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        match &*self.source {
            Source::Files(file) => file.reload(),
            Source::Acme(_) => Ok(false),
        }
    }

    /// Keeps the certificate fresh until `stop`: reloads the files when they
    /// change on disk, or orders, caches and renews the ACME certificate.
    ///
    /// # Cancel safety
    /// Meant to run as its own task until `stop`; an ACME order in progress is
    /// abandoned and started again at the next start.
    pub async fn maintain(self, stop: CancellationToken) {
        match &*self.source {
            Source::Files(file) => loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(FILE_CHECK_INTERVAL) => {}
                }
                if file.changed_on_disk() {
                    match file.reload() {
                        Ok(true) => info!(fingerprint = %file.fingerprint(), "certificate files changed; new certificate in use"),
                        Ok(false) => {}
                        Err(err) => warn!(
                            error = &err as &dyn std::error::Error,
                            "certificate files changed but cannot be used; keeping the current certificate"
                        ),
                    }
                }
            },
            Source::Acme(acme) => acme.drive(stop).await,
        }
    }

    fn resolver(&self) -> Arc<dyn ResolvesServerCert> {
        match &*self.source {
            Source::Files(file) => file.clone(),
            Source::Acme(acme) => acme.resolver.clone(),
        }
    }

    /// TLS configuration of the HTTPS ingress: TLS 1.2 and 1.3, ALPN `h2` and
    /// `http/1.1`, and `acme-tls/1` when the certificate comes from ACME (the
    /// challenge gets its own certificate from the same resolver).
    ///
    /// # Errors
    /// When rustls refuses the protocol versions (never with the ring provider).
    pub fn https_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Rustls)?
            .with_no_client_auth()
            .with_cert_resolver(self.resolver());
        tls.alpn_protocols = HTTPS_ALPN.iter().map(|p| p.to_vec()).collect();
        if self.is_acme() {
            tls.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
        }
        Ok(Arc::new(tls))
    }

    /// QUIC server configuration: TLS 1.3, ALPN `hookrelay/1`, no 0-RTT (a token
    /// in early data could be replayed), and transport limits for agent links:
    /// no unidirectional streams (agents never open one), at most
    /// [`AGENT_OPENED_STREAMS`] agent-opened streams, bounded receive windows
    /// and the agent's idle timeout.
    ///
    /// # Errors
    /// When rustls or quinn refuse the configuration.
    pub fn quic_server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Rustls)?
            .with_no_client_auth()
            .with_cert_resolver(self.resolver());
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

/// A certificate and key read from PEM files; every handshake gets the one
/// loaded last, whatever name it asks for (one certificate, e.g. for `DOMAIN`
/// and `*.DOMAIN`, covers the relay).
#[derive(Debug)]
struct FileCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    certified: Arc<CertifiedKey>,
    fingerprint: String,
    stamp: Stamp,
}

/// Modification times of the certificate and key files: how a renewal shows.
type Stamp = Option<(SystemTime, SystemTime)>;

impl FileCert {
    fn open(cert: PathBuf, key: PathBuf) -> Result<Self, TlsError> {
        let loaded = load(&cert, &key)?;
        Ok(FileCert {
            cert,
            key,
            current: RwLock::new(loaded),
        })
    }

    fn fingerprint(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .fingerprint
            .clone()
    }

    fn changed_on_disk(&self) -> bool {
        let stamp = stamp(&self.cert, &self.key);
        stamp != self.current.read().unwrap_or_else(|e| e.into_inner()).stamp
    }

    fn reload(&self) -> Result<bool, TlsError> {
        let loaded = match load(&self.cert, &self.key) {
            Ok(loaded) => loaded,
            Err(err) => {
                // Remember the broken files' times, so they are reported once
                // and the next change is picked up.
                self.current
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .stamp = stamp(&self.cert, &self.key);
                return Err(err);
            }
        };
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let changed = loaded.fingerprint != current.fingerprint;
        *current = loaded;
        Ok(changed)
    }
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .certified
                .clone(),
        )
    }
}

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((modified(cert)?, modified(key)?))
}

fn load(cert: &Path, key: &Path) -> Result<Loaded, TlsError> {
    // Taken first: a change while reading shows at the next check.
    let stamp = stamp(cert, key);
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    let Some(leaf) = certs.first() else {
        return Err(TlsError::Pem {
            path: cert.to_owned(),
            reason: "no certificate in file".into(),
        });
    };
    let fingerprint = fingerprint(leaf);
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| TlsError::Pem {
            path: key.to_owned(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|_| TlsError::KeyMismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
    })?;
    Ok(Loaded {
        certified: Arc::new(certified),
        fingerprint,
        stamp,
    })
}

/// The ACME side: rustls-acme's resolver (which also answers TLS-ALPN-01
/// challenges) and its ordering state machine.
struct AcmeCert {
    resolver: Arc<ResolvesServerCertAcme>,
    ready: AtomicBool,
    /// Orders, caches and renews; taken by [`Certs::maintain`].
    state: Mutex<Option<AcmeState<io::Error>>>,
    names: Vec<String>,
    directory: String,
}

impl AcmeCert {
    fn new(settings: &AcmeSettings, cache: &Path) -> Result<Self, TlsError> {
        // The cache holds the account key and the certificate's private key.
        let mut dir = fs::DirBuilder::new();
        dir.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            dir.mode(0o700);
        }
        dir.create(cache).map_err(|source| TlsError::Io {
            path: cache.to_owned(),
            source,
        })?;
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = &settings.ca_root {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsError::Pem {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::Pem {
                    path: path.clone(),
                    reason: "no usable CA certificate in file".into(),
                });
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Rustls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let state = AcmeConfig::new_with_client_config(&settings.names, Arc::new(client))
            .directory(&settings.directory)
            .contact(settings.email.iter().map(|e| format!("mailto:{e}")))
            .cache(DirCache::new(cache.to_owned()))
            .state();
        Ok(AcmeCert {
            resolver: state.resolver(),
            ready: AtomicBool::new(false),
            state: Mutex::new(Some(state)),
            names: settings.names.clone(),
            directory: settings.directory.clone(),
        })
    }

    async fn drive(&self, stop: CancellationToken) {
        let taken = self.state.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut state) = taken else { return };
        info!(names = ?self.names, directory = %self.directory, "getting the certificate over ACME (from the cache, or by ordering it)");
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                event = state.next() => event,
            };
            match event {
                // The state machine never ends; this is for completeness.
                None => return,
                Some(Ok(EventOk::DeployedNewCert)) => {
                    self.ready.store(true, Ordering::Release);
                    info!(names = ?self.names, "certificate issued over ACME and in use");
                }
                Some(Ok(EventOk::DeployedCachedCert)) => {
                    self.ready.store(true, Ordering::Release);
                    info!(names = ?self.names, "ACME certificate loaded from the cache and in use");
                }
                Some(Ok(event)) => debug!(?event, "ACME cache updated"),
                Some(Err(err)) => error!(
                    error = %err,
                    names = ?self.names,
                    directory = %self.directory,
                    "cannot get a certificate over ACME (retrying with backoff): check that the names resolve to this relay and that its https listener is reachable on port 443"
                ),
            }
        }
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
    #[error("the key in {} does not belong to the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS configuration refused by rustls")]
    Rustls(#[source] rustls::Error),
    #[error("cannot build the QUIC configuration: {0}")]
    Quic(String),
}
