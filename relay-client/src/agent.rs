//! A running agent: connects to the relay, keeps the tunnel up across relay
//! restarts and dropped paths, and forwards deliveries to the local app.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use hookrelay_shared::TunnelName;
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::{
    config::Config,
    forward::Forwarder,
    history::History,
    inspector,
    metrics::AgentMetrics,
    queued::{self, Outbox},
    replay::Replayer,
    session::{endpoint_for, with_transport, ConnectError, Dialer, LinkEnd, Session},
    terminal::Terminal,
    tls,
};

/// First wait before reconnecting; doubled per failed attempt up to
/// [`Config::max_backoff`], with jitter so a relay restart is not met by every
/// agent in the same millisecond.
const INITIAL_BACKOFF: Duration = Duration::from_millis(250);

/// Default cap on the wait between reconnection attempts.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the agent is doing now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Status {
    /// Holding the tunnel; deliveries flow.
    Connected {
        /// Where senders reach the tunnel.
        public_urls: Vec<String>,
    },
    /// The link is down; retrying with backoff.
    Reconnecting {
        /// Why the last attempt or link failed.
        last_error: String,
    },
    /// The agent has stopped (shutdown or a fatal error).
    Stopped,
}

/// Handle to a running agent.
pub struct Agent {
    tunnel: TunnelName,
    history: History,
    status: watch::Receiver<Status>,
    inspector_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), AgentError>>>,
    inspector: Option<JoinHandle<()>>,
    /// Hands queued webhooks to the app.
    worker: Option<JoinHandle<()>>,
    /// [`Outbox::sweep`] at the start and once a day.
    sweep: Option<JoinHandle<()>>,
}

impl Agent {
    /// Starts the agent and makes the first connection attempt. Returns once the
    /// tunnel is registered, or once a retryable failure has started the
    /// reconnect loop (the relay may simply not be up yet).
    ///
    /// # Errors
    /// Fatal failures: a refused token or tunnel, a certificate that does not
    /// match, an incompatible relay, an unusable data directory or inspector address.
    pub async fn spawn(config: Config) -> Result<Agent, AgentError> {
        let identity = Identity::open(&config.data_dir)?;
        let history =
            History::open(&config.data_dir, config.retention).map_err(AgentError::History)?;
        // Kept with the history, so `export` without this agent redacts them too.
        history
            .set_redact_headers(config.redaction.extra())
            .map_err(AgentError::History)?;
        // Before connecting: it reads every waiting webhook (about half a
        // second for 100,000) on the runtime's one thread, which would
        // otherwise stall the fresh connection.
        let outbox = Outbox::open(&history).map_err(AgentError::History)?;
        let secrets = std::sync::Arc::new(config.secrets.clone());
        let tunnel = match &config.tunnel {
            Some(t) => t.clone(),
            None => identity.tunnel.clone(),
        };
        let (client_config, refusal) =
            tls::client_config(&config.trust).map_err(|e| AgentError::Tls(e.to_string()))?;
        let relay_is_v6 = match config.relay_ip {
            Some(ip) => ip.is_ipv6(),
            None => tokio::net::lookup_host(&config.relay)
                .await
                .ok()
                .and_then(|mut a| a.next())
                .is_some_and(|a| a.is_ipv6()),
        };
        let endpoint =
            endpoint_for(relay_is_v6).map_err(|e| AgentError::Endpoint(e.to_string()))?;
        let dialer = Dialer {
            endpoint,
            client_config: with_transport(client_config, config.max_deliveries),
            refusal,
            relay: config.relay.clone(),
            relay_ip: config.relay_ip,
            token: config.token.clone(),
            agent_id: identity.agent_id.clone(),
            tunnels: vec![tunnel.clone()],
            settings: config.settings,
            policy: config.policy.clone(),
        };

        let (status_tx, status) = watch::channel(Status::Reconnecting {
            last_error: "not connected yet".into(),
        });
        let first = match dialer.connect().await {
            Ok(session) => {
                let urls = public_urls(&session);
                info!(tunnel = %tunnel, public_urls = ?urls, relay = %config.relay, "connected to the relay");
                announce_grants(&session, &config.settings);
                status_tx.send_replace(Status::Connected { public_urls: urls });
                Some(session)
            }
            Err(err) if err.is_fatal() => return Err(AgentError::Connect(err)),
            Err(err) => {
                warn!(relay = %config.relay, "cannot reach the relay yet ({err}); retrying in the background");
                status_tx.send_replace(Status::Reconnecting {
                    last_error: err.to_string(),
                });
                None
            }
        };

        let shutdown = CancellationToken::new();
        let metrics = Arc::new(AgentMetrics::new());
        let terminal =
            Terminal::new(config.print_deliveries, config.log_format).with_metrics(metrics.clone());
        let (inspector_addr, inspector) = match config.inspect {
            Some(addr) if !addr.ip().is_loopback() => {
                return Err(AgentError::InspectorNotLoopback(addr))
            }
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| AgentError::Inspector { addr, source })?;
                let local = listener
                    .local_addr()
                    .map_err(|source| AgentError::Inspector { addr, source })?;
                let task = tokio::spawn(inspector::serve(
                    listener,
                    inspector::InspectorState {
                        status: status.clone(),
                        tunnel: tunnel.clone(),
                        history: history.clone(),
                        replayer: Replayer::new(
                            history.clone(),
                            Some(config.target.clone()),
                            secrets.clone(),
                        )
                        .with_terminal(terminal.clone()),
                        data_dir: config.data_dir.clone(),
                        target: config.target.to_string(),
                        outbox: outbox.clone(),
                        settings: config.settings,
                        metrics: metrics.clone(),
                        redaction: config.redaction.clone(),
                    },
                    shutdown.clone(),
                ));
                (Some(local), Some(task))
            }
            None => (None, None),
        };

        let forwarder = Forwarder::new(
            config.target.clone(),
            terminal,
            history.clone(),
            secrets,
            config.dedupe,
        )
        .map_err(AgentError::Target)?;
        let worker = tokio::spawn(
            queued::run_worker(
                outbox.clone(),
                forwarder.clone(),
                config.retry,
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("queued", tunnel = %tunnel)),
        );
        // Spawned last: an early return leaves nothing holding the store.
        let sweep = tokio::spawn(queued::sweep_periodically(
            outbox.clone(),
            shutdown.clone(),
            queued::SWEEP_EVERY,
        ));
        let run = run(
            dialer,
            first,
            Serving {
                forwarder,
                outbox,
                metrics,
            },
            status_tx,
            shutdown.clone(),
            config.max_backoff,
        );
        let task = tokio::spawn(run.instrument(tracing::info_span!("agent", tunnel = %tunnel)));
        Ok(Agent {
            tunnel,
            history,
            status,
            inspector_addr,
            shutdown,
            task: Some(task),
            inspector,
            worker: Some(worker),
            sweep: Some(sweep),
        })
    }

    /// The tunnel this agent holds (or is trying to hold).
    pub fn tunnel(&self) -> &TunnelName {
        &self.tunnel
    }

    /// Public URLs while connected; empty otherwise.
    pub fn public_urls(&self) -> Vec<String> {
        match &*self.status.borrow() {
            Status::Connected { public_urls } => public_urls.clone(),
            _ => Vec::new(),
        }
    }

    /// The exchange history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Live status updates.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Where the inspector listens, when enabled.
    pub fn inspector_addr(&self) -> Option<SocketAddr> {
        self.inspector_addr
    }

    /// Waits until the tunnel is held; returns its public URLs.
    ///
    /// # Errors
    /// [`AgentError::Stopped`] when the agent stops first.
    pub async fn connected(&self) -> Result<Vec<String>, AgentError> {
        let mut rx = self.status.clone();
        let status = rx
            .wait_for(|s| matches!(s, Status::Connected { .. } | Status::Stopped))
            .await
            .map_err(|_| AgentError::Stopped)?
            .clone();
        match status {
            Status::Connected { public_urls } => Ok(public_urls),
            _ => Err(AgentError::Stopped),
        }
    }

    /// Waits for the agent to stop by itself, which only a fatal error does.
    ///
    /// # Errors
    /// The fatal error.
    pub async fn closed(&mut self) -> Result<(), AgentError> {
        match self.task.as_mut() {
            Some(task) => {
                let result = task
                    .await
                    .unwrap_or_else(|e| Err(AgentError::Panicked(e.to_string())));
                self.task = None;
                result
            }
            None => Ok(()),
        }
    }

    /// Says goodbye to the relay, lets in-flight deliveries finish, and stops.
    ///
    /// # Errors
    /// A fatal error the agent had already stopped with.
    pub async fn shutdown(mut self) -> Result<(), AgentError> {
        self.shutdown.cancel();
        let result = self.closed().await;
        if let Some(inspector) = self.inspector.take() {
            let _ = inspector.await;
        }
        if let Some(worker) = self.worker.take() {
            // It stops between webhooks; one in the app's hands finishes first.
            let _ = tokio::time::timeout(Duration::from_secs(35), worker).await;
        }
        if let Some(sweep) = self.sweep.take() {
            // A sweep under way stops at its next key.
            let _ = sweep.await;
        }
        if let Err(err) = self.history.close().await {
            tracing::error!(
                error = &err as &dyn std::error::Error,
                "cannot flush history"
            );
        }
        result
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What each session serves deliveries with.
struct Serving {
    forwarder: Forwarder,
    outbox: Outbox,
    metrics: Arc<AgentMetrics>,
}

async fn run(
    dialer: Dialer,
    first: Option<Session>,
    serving: Serving,
    status: watch::Sender<Status>,
    shutdown: CancellationToken,
    max_backoff: Duration,
) -> Result<(), AgentError> {
    let result = run_inner(&dialer, first, &serving, &status, &shutdown, max_backoff).await;
    status.send_replace(Status::Stopped);
    dialer.endpoint.close(0u32.into(), b"agent stopped");
    result
}

async fn run_inner(
    dialer: &Dialer,
    mut session: Option<Session>,
    serving: &Serving,
    status: &watch::Sender<Status>,
    shutdown: &CancellationToken,
    max_backoff: Duration,
) -> Result<(), AgentError> {
    let mut attempt: u32 = 0;
    loop {
        if let Some(s) = session.take() {
            attempt = 0;
            let public_urls: Vec<String> = s
                .tunnels
                .iter()
                .flat_map(|t| t.public_urls.clone())
                .collect();
            status.send_replace(Status::Connected { public_urls });
            serving.metrics.set_link(Some((
                s.connection.clone(),
                dialer.endpoint.local_addr().ok(),
            )));
            let end = s
                .serve(
                    serving.forwarder.clone(),
                    serving.outbox.clone(),
                    shutdown.clone(),
                )
                .await;
            serving.metrics.set_link(None);
            let why = match end {
                LinkEnd::Shutdown => return Ok(()),
                LinkEnd::Replaced => return Err(AgentError::Replaced),
                LinkEnd::RelayShutdown(reason) => {
                    warn!("the relay is shutting down ({reason}); reconnecting");
                    format!("relay shut down: {reason}")
                }
                LinkEnd::Lost(reason) => {
                    warn!("lost the link to the relay ({reason}); reconnecting");
                    reason
                }
            };
            status.send_replace(Status::Reconnecting { last_error: why });
        }

        let delay = backoff(attempt, max_backoff);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
        let attempt_result = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = dialer.connect() => r,
        };
        match attempt_result {
            Ok(s) => {
                info!(attempt, "reconnected to the relay");
                announce_grants(&s, &dialer.settings);
                session = Some(s);
            }
            Err(err) if err.is_fatal() => return Err(AgentError::Connect(err)),
            Err(err) => {
                info!(
                    attempt,
                    next_in_ms = backoff(attempt, max_backoff).as_millis() as u64,
                    "relay unreachable: {err}"
                );
                status.send_replace(Status::Reconnecting {
                    last_error: err.to_string(),
                });
            }
        }
    }
}

/// Says what the relay granted when it differs from what was asked, and how
/// many webhooks it kept while the agent was away.
fn announce_grants(session: &Session, wanted: &hookrelay_shared::TunnelSettings) {
    for grant in &session.tunnels {
        if grant.settings != *wanted {
            warn!(
                tunnel = %grant.name,
                "the relay does not allow queueing: mode {}, when offline {}",
                grant.settings.mode,
                grant.settings.when_offline
            );
        }
        if !grant.policy.is_empty() {
            info!(tunnel = %grant.name, "the relay enforces: {}", grant.policy);
        }
        if grant.queued > 0 {
            info!(tunnel = %grant.name, queued = grant.queued, "the relay kept webhooks while this agent was away; delivering them in order");
        }
    }
}

fn public_urls(session: &Session) -> Vec<String> {
    session
        .tunnels
        .iter()
        .flat_map(|t| t.public_urls.clone())
        .collect()
}

/// Exponential backoff with "equal jitter": half the step is fixed, half random.
fn backoff(attempt: u32, max: Duration) -> Duration {
    let step = INITIAL_BACKOFF
        .saturating_mul(1u32 << attempt.min(16))
        .min(max);
    let half = step / 2;
    half + half.mul_f64(fastrand::f64())
}

/// The agent's identity, kept in its data directory so the tunnel name (and
/// with it the public URL) survives restarts.
#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    agent_id: String,
    /// Generated on first start, used when no `--tunnel` is given.
    tunnel: TunnelName,
}

const IDENTITY_FILE: &str = "agent.json";

impl Identity {
    fn open(dir: &Path) -> Result<Identity, AgentError> {
        let path = dir.join(IDENTITY_FILE);
        let io = |source| AgentError::DataDir {
            path: path.clone(),
            source,
        };
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| AgentError::Identity {
                path: path.clone(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(io)?;
                let identity = Identity {
                    agent_id: ulid::Ulid::new().to_string().to_ascii_lowercase(),
                    tunnel: generate_tunnel_name(),
                };
                let text =
                    serde_json::to_string_pretty(&identity).map_err(|e| AgentError::Identity {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                let tmp = path.with_extension("json.tmp");
                fs::write(&tmp, text).map_err(io)?;
                fs::rename(&tmp, &path).map_err(io)?;
                Ok(identity)
            }
            Err(e) => Err(io(e)),
        }
    }
}

/// `hook-` and ten random lowercase letters and digits: 50 bits, enough that
/// two agents never pick the same name by chance.
fn generate_tunnel_name() -> TunnelName {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let suffix: String = (0..10)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect();
    format!("hook-{suffix}")
        .parse()
        .expect("generated names use only valid characters")
}

/// `~/.local/share/hookrelay/agent` on Linux, the platform's equivalent elsewhere.
pub fn default_data_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "hookrelay")
        .map(|d| d.data_dir().join("agent"))
        .unwrap_or_else(|| PathBuf::from("hookrelay-agent"))
}

/// Why the agent stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("another agent with the same data directory took over the tunnel")]
    Replaced,
    #[error("cannot use the data directory: {}", path.display())]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is damaged ({reason}); delete it to start with a new identity", path.display())]
    Identity { path: PathBuf, reason: String },
    #[error("cannot build the TLS configuration: {0}")]
    Tls(String),
    #[error("cannot forward to the local app: {0}")]
    Target(String),
    #[error("cannot open a UDP socket: {0}")]
    Endpoint(String),
    #[error(
        "the inspector shows every webhook's contents and must listen on loopback \
         (127.0.0.1 or [::1]), not {0}"
    )]
    InspectorNotLoopback(SocketAddr),
    #[error("cannot start the inspector on {addr} (use --inspect ADDR or --no-inspect)")]
    Inspector {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    History(crate::history::HistoryError),
    #[error("the agent has stopped")]
    Stopped,
    #[error("the agent crashed: {0}")]
    Panicked(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let max = Duration::from_secs(30);
        for attempt in 0..40 {
            let d = backoff(attempt, max);
            let step = INITIAL_BACKOFF
                .saturating_mul(1u32 << attempt.min(16))
                .min(max);
            assert!(d >= step / 2 && d <= step, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(30, max) >= Duration::from_secs(15));
    }

    #[test]
    fn identity_is_created_once_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Identity::open(dir.path()).expect("create");
        let again = Identity::open(dir.path()).expect("reopen");
        assert_eq!(first.agent_id, again.agent_id);
        assert_eq!(first.tunnel, again.tunnel);
        fs::write(dir.path().join(IDENTITY_FILE), "garbage").expect("write");
        assert!(matches!(
            Identity::open(dir.path()),
            Err(AgentError::Identity { .. })
        ));
    }
}
