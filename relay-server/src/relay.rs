//! A running relay: its listeners, tasks and shutdown.

use std::{io, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn, Instrument};

use crate::{
    admin::{self, AdminState},
    agents::{self, Agents, PublicUrls},
    auth::{TokenError, TokenStore},
    config::Config,
    edge::{Edge, EdgeLimits},
    ingress::{self, Ingress},
    metrics::RelayMetrics,
    policy::Policies,
    queue::{Queue, QueueError, SledQueue},
    routing::{LocalRoutes, Routes},
    tls::{Certs, TlsError},
};

/// Handle to a running relay. Dropping it does not stop the relay; call
/// [`Relay::shutdown`].
pub struct Relay {
    http_addr: Option<SocketAddr>,
    https_addr: Option<SocketAddr>,
    quic_addr: SocketAddr,
    admin_addr: SocketAddr,
    certs: Certs,
    tokens: Arc<TokenStore>,
    queue: Arc<dyn Queue>,
    shutdown_grace: Duration,
    endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
    close_sessions: CancellationToken,
    /// The HTTP and HTTPS listeners' tasks, which end once their deliveries
    /// in flight have.
    ingress: TaskTracker,
    tracker: TaskTracker,
}

impl Relay {
    /// Opens the data directory, loads or creates the certificate, binds every
    /// listener and starts serving. Ready when it returns.
    ///
    /// # Errors
    /// When the data directory, certificate or any listener is unusable.
    pub async fn spawn(config: Config) -> Result<Relay, SpawnError> {
        if config.http.is_none() && config.https.is_none() {
            return Err(SpawnError::NoIngress);
        }
        let tokens = Arc::new(TokenStore::open(&config.data_dir)?);
        let names: Vec<String> = config
            .domain
            .iter()
            .flat_map(|d| [d.clone(), format!("*.{d}")])
            .collect();
        let certs = Certs::open(&config.tls, &config.data_dir, &names)?;
        let routes: Arc<dyn Routes> = Arc::new(LocalRoutes::open(Some(
            config.data_dir.join("tunnels.json"),
        )));
        let queue: Arc<dyn Queue> =
            Arc::new(SledQueue::open(&config.data_dir, config.queue_limits)?);
        let metrics = Arc::new(RelayMetrics::new(queue.clone()));
        let policies = Arc::new(Policies::open(
            config.policy.clone(),
            Some(config.data_dir.join("policies.json")),
        ));

        let bind_err = |what: &'static str, addr: SocketAddr| {
            move |source: io::Error| SpawnError::Bind { what, addr, source }
        };
        let listen = |what: &'static str, addr: Option<SocketAddr>| {
            let Some(addr) = addr else {
                return Ok(None);
            };
            let listener = bind_ingress(addr).map_err(bind_err(what, addr))?;
            let bound = listener.local_addr().map_err(bind_err(what, addr))?;
            Ok::<_, SpawnError>(Some((listener, bound)))
        };
        let http = listen("http", config.http)?;
        let https = listen("https", config.https)?;
        let admin = TcpListener::bind(config.admin)
            .await
            .map_err(bind_err("admin", config.admin))?;
        let (endpoint, quic_buffer) =
            crate::udp::quic_endpoint(config.quic, Some(certs.quic_server_config()?))
                .map_err(bind_err("quic", config.quic))?;
        let http_addr = http.as_ref().map(|(_, addr)| *addr);
        let https_addr = https.as_ref().map(|(_, addr)| *addr);
        let admin_addr = admin
            .local_addr()
            .map_err(bind_err("admin", config.admin))?;
        let quic_addr = endpoint
            .local_addr()
            .map_err(bind_err("quic", config.quic))?;
        metrics.quic_socket(quic_addr, quic_buffer);

        let shutdown = CancellationToken::new();
        let close_sessions = CancellationToken::new();
        let tracker = TaskTracker::new();

        // One router per scheme: what X-Forwarded-Proto and public URLs say.
        let app = |scheme: &'static str| {
            ingress::router(Arc::new(Ingress {
                routes: routes.clone(),
                queue: queue.clone(),
                metrics: metrics.clone(),
                policies: policies.clone(),
                domain: config
                    .domain
                    .clone()
                    .map(|d| d.trim_end_matches('.').to_ascii_lowercase()),
                body_limit_bytes: config.body_limit_bytes,
                timeout: config.timeout,
                body_timeout: config.body_timeout,
                min_body_rate: config.min_body_rate,
                scheme,
            }))
        };
        let edge = Edge::new(EdgeLimits {
            header_timeout: config.header_timeout,
            write_timeout: config.body_timeout,
            max_connections: config.max_connections,
            max_connections_per_ip: config.max_connections_per_ip,
        });
        let ingress = TaskTracker::new();
        if let Some((listener, _)) = http {
            ingress.spawn(
                edge.clone()
                    .serve(listener, app("http"), None, shutdown.clone())
                    .instrument(tracing::info_span!("ingress", scheme = "http")),
            );
        }
        if let Some((listener, _)) = https {
            let tls = tokio_rustls::TlsAcceptor::from(certs.https_server_config()?);
            ingress.spawn(
                edge.clone()
                    .serve(listener, app("https"), Some(tls), shutdown.clone())
                    .instrument(tracing::info_span!("ingress", scheme = "https")),
            );
        }
        ingress.close();
        tracker.spawn(
            certs
                .clone()
                .maintain(shutdown.clone())
                .instrument(tracing::info_span!("certificate")),
        );

        let admin_app = admin::router(AdminState {
            routes: routes.clone(),
            queue: queue.clone(),
            metrics: metrics.clone(),
            stopping: shutdown.clone(),
            data_dir: config
                .data_dir
                .canonicalize()
                .unwrap_or_else(|_| config.data_dir.clone())
                .display()
                .to_string(),
        });
        let stop = shutdown.clone();
        tracker.spawn(async move {
            if let Err(err) = axum::serve(admin, admin_app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
            {
                tracing::error!(
                    error = &err as &dyn std::error::Error,
                    "admin listener failed"
                );
            }
        });

        let agents = Arc::new(Agents::new(
            routes,
            tokens.clone(),
            PublicUrls::new(
                config.public_url.clone(),
                config.domain.clone(),
                http_addr,
                https_addr,
            ),
            queue.clone(),
            config.queue_enabled,
            metrics,
            policies,
        ));
        tracker.spawn(agents::accept_loop(
            endpoint.clone(),
            agents,
            certs.clone(),
            shutdown.clone(),
            close_sessions.clone(),
            tracker.clone(),
        ));

        info!(
            http_addr = http_addr.map(tracing::field::display),
            https_addr = https_addr.map(tracing::field::display),
            %quic_addr,
            %admin_addr,
            fingerprint = certs.fingerprint(),
            "relay listening"
        );
        Ok(Relay {
            http_addr,
            https_addr,
            quic_addr,
            admin_addr,
            certs,
            tokens,
            queue,
            shutdown_grace: config.shutdown_grace,
            endpoint,
            shutdown,
            close_sessions,
            ingress,
            tracker,
        })
    }

    /// Address of the public HTTP ingress, unless it is off.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Address of the public HTTPS ingress, when it is on.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// UDP address of the QUIC endpoint.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// Address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// SHA-256 fingerprint (hex) of the relay's certificate, for agents to
    /// pin; `None` with ACME, whose certificates agents check against public
    /// roots.
    pub fn cert_fingerprint(&self) -> Option<String> {
        self.certs.fingerprint()
    }

    /// Reads the certificate files again (on SIGHUP, after a renewal), for
    /// new HTTPS and QUIC connections; established ones keep theirs.
    /// `Ok(true)` when the certificate changed.
    ///
    /// # Errors
    /// When the files are unusable; the current certificate stays in use.
    pub fn reload_tls(&self) -> Result<bool, TlsError> {
        self.certs.reload()
    }

    /// The relay's token store.
    pub fn tokens(&self) -> &TokenStore {
        &self.tokens
    }

    /// The relay's store-and-forward queue.
    pub fn queue(&self) -> &Arc<dyn Queue> {
        &self.queue
    }

    /// Stops accepting webhooks and agents, lets the deliveries in flight finish
    /// (up to the configured grace period), then closes agent connections with a reason
    /// the agents print before they reconnect.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let drained = tokio::time::timeout(self.shutdown_grace, self.ingress.wait()).await;
        if drained.is_err() {
            warn!("deliveries still in flight after the shutdown grace period; cutting them");
        }
        self.close_sessions.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(2), self.tracker.wait())
            .await
            .is_err()
        {
            warn!("agent sessions did not close in time");
        }
        self.endpoint
            .close(agents_close_code(), b"relay shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        if let Err(err) = self.queue.sync().await {
            tracing::error!(
                error = &err as &dyn std::error::Error,
                "cannot flush the queue"
            );
        }
        info!("relay stopped");
    }
}

fn agents_close_code() -> quinn::VarInt {
    hookrelay_shared::protocol::close::SHUTDOWN.into()
}

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Tokens(#[from] TokenError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen for {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("neither http nor https is set: the relay would take no webhooks")]
    NoIngress,
    #[error("data directory {} is unusable", .0.display())]
    DataDir(PathBuf),
    #[error("cannot open the queue")]
    Queue(#[from] QueueError),
}

/// Connections the kernel completes and holds for a public listener until
/// the relay accepts them (Linux caps it at `net.core.somaxconn`, 4096 by
/// default). tokio's `TcpListener::bind` asks for 128, as the standard
/// library does: under a burst of senders connecting at once, the next ones'
/// handshakes were dropped and their SYNs sent again a second later, which
/// added a second (then three) to their webhooks.
const INGRESS_BACKLOG: u32 = 4096;

/// A public ingress listener on `addr` with [`INGRESS_BACKLOG`]; otherwise as
/// `TcpListener::bind` makes it (`SO_REUSEADDR`, as mio sets it).
fn bind_ingress(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(INGRESS_BACKLOG)
}
