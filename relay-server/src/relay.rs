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
    edge::{self, EdgeLimits},
    ingress::{self, Ingress},
    metrics::RelayMetrics,
    policy::Policies,
    queue::{Queue, QueueError, SledQueue},
    routing::{LocalRoutes, Routes},
    tls::{TlsError, TlsMaterial},
};

/// Handle to a running relay. Dropping it does not stop the relay; call
/// [`Relay::shutdown`].
pub struct Relay {
    http_addr: SocketAddr,
    quic_addr: SocketAddr,
    admin_addr: SocketAddr,
    fingerprint: String,
    tokens: Arc<TokenStore>,
    queue: Arc<dyn Queue>,
    shutdown_grace: Duration,
    endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
    close_sessions: CancellationToken,
    ingress: tokio::task::JoinHandle<()>,
    tracker: TaskTracker,
}

impl Relay {
    /// Opens the data directory, loads or creates the certificate, binds every
    /// listener and starts serving. Ready when it returns.
    ///
    /// # Errors
    /// When the data directory, certificate or any listener is unusable.
    pub async fn spawn(config: Config) -> Result<Relay, SpawnError> {
        let tokens = Arc::new(TokenStore::open(&config.data_dir)?);
        let names: Vec<String> = config
            .domain
            .iter()
            .flat_map(|d| [d.clone(), format!("*.{d}")])
            .collect();
        let tls = TlsMaterial::open(&config.tls, &config.data_dir, &names)?;
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
        let http = TcpListener::bind(config.http)
            .await
            .map_err(bind_err("http", config.http))?;
        let admin = TcpListener::bind(config.admin)
            .await
            .map_err(bind_err("admin", config.admin))?;
        let endpoint = quinn::Endpoint::server(tls.quic_server_config()?, config.quic)
            .map_err(bind_err("quic", config.quic))?;
        let http_addr = http.local_addr().map_err(bind_err("http", config.http))?;
        let admin_addr = admin
            .local_addr()
            .map_err(bind_err("admin", config.admin))?;
        let quic_addr = endpoint
            .local_addr()
            .map_err(bind_err("quic", config.quic))?;

        let shutdown = CancellationToken::new();
        let close_sessions = CancellationToken::new();
        let tracker = TaskTracker::new();

        let ingress = Arc::new(Ingress {
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
            scheme: "http",
        });
        let app = ingress::router(ingress);
        let limits = EdgeLimits {
            header_timeout: config.header_timeout,
            max_connections: config.max_connections,
            max_connections_per_ip: config.max_connections_per_ip,
        };
        let ingress = tokio::spawn(
            edge::serve(http, app, limits, shutdown.clone())
                .instrument(tracing::info_span!("ingress")),
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
            PublicUrls {
                base: config.public_url.clone(),
                domain: config.domain.clone(),
                http: http_addr,
            },
            queue.clone(),
            config.queue_enabled,
            metrics,
            policies,
        ));
        tracker.spawn(agents::accept_loop(
            endpoint.clone(),
            agents,
            shutdown.clone(),
            close_sessions.clone(),
            tracker.clone(),
        ));

        info!(%http_addr, %quic_addr, %admin_addr, fingerprint = tls.fingerprint(), "relay listening");
        Ok(Relay {
            http_addr,
            quic_addr,
            admin_addr,
            fingerprint: tls.fingerprint().to_owned(),
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

    /// Address of the public HTTP ingress.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// UDP address of the QUIC endpoint.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// Address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// SHA-256 fingerprint (hex) of the relay's certificate, for agents to pin.
    pub fn cert_fingerprint(&self) -> &str {
        &self.fingerprint
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
        let drained = tokio::time::timeout(self.shutdown_grace, self.ingress).await;
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
    #[error("data directory {} is unusable", .0.display())]
    DataDir(PathBuf),
    #[error("cannot open the queue")]
    Queue(#[from] QueueError),
}
