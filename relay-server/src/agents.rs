//! The QUIC side: accepts agent connections, runs the hello/welcome handshake,
//! and keeps each agent's tunnels routed for as long as its connection lives.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hookrelay_shared::{
    codec::{decode_payload, decode_prefix, read_frame, read_payload, write_frame},
    protocol::{close, HelloVersion},
    AgentToRelay, DeliveryMode, Hello, RejectReason, RelayToAgent, TunnelGrant, TunnelName,
    TunnelSettings, WhenOffline, PROTOCOL_VERSION,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::{
    auth::TokenStore,
    drain,
    guard::{AttemptGuard, Failure},
    metrics::RelayMetrics,
    policy::Policies,
    queue::Queue,
    routing::{AgentLink, ClaimError, Routes},
    tls::Certs,
};

/// Time an agent gets from connecting to finishing its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Most tunnels one agent connection may hold.
const MAX_TUNNELS_PER_AGENT: usize = 16;

/// How long to wait for a rejected agent to read the reason before closing.
const REJECT_LINGER: Duration = Duration::from_secs(2);

/// How long a departing agent may keep its connection open to finish the
/// deliveries in flight after saying goodbye.
const GOODBYE_GRACE: Duration = Duration::from_secs(30);

/// Shared state of the agent side.
pub(crate) struct Agents {
    pub routes: Arc<dyn Routes>,
    pub tokens: Arc<TokenStore>,
    pub urls: PublicUrls,
    pub queue: Arc<dyn Queue>,
    /// Whether the relay's config allows queueing at all.
    pub queue_enabled: bool,
    pub metrics: Arc<RelayMetrics>,
    /// Tunnel policies; agents' requests are recorded here.
    pub policies: Arc<Policies>,
    /// Failed hellos per source address; locked-out addresses are refused.
    guard: AttemptGuard,
    next_session: AtomicU64,
}

impl Agents {
    pub fn new(
        routes: Arc<dyn Routes>,
        tokens: Arc<TokenStore>,
        urls: PublicUrls,
        queue: Arc<dyn Queue>,
        queue_enabled: bool,
        metrics: Arc<RelayMetrics>,
        policies: Arc<Policies>,
    ) -> Self {
        Agents {
            routes,
            tokens,
            urls,
            queue,
            queue_enabled,
            metrics,
            policies,
            guard: AttemptGuard::default(),
            next_session: AtomicU64::new(1),
        }
    }

    /// Counts a failed hello from `ip`; warns once when that locks it out.
    fn count_failure(&self, ip: IpAddr) {
        if let Failure::LockedOut(lockout) = self.guard.failed(ip, Instant::now()) {
            warn!(
                %ip,
                max_failures = crate::guard::MAX_FAILURES,
                lockout_secs = lockout.as_secs(),
                "too many failed hellos; refusing this address for a while"
            );
        }
    }

    /// The agent's wishes, narrowed by the relay's config.
    fn effective(&self, wanted: TunnelSettings) -> TunnelSettings {
        if self.queue_enabled {
            wanted
        } else {
            TunnelSettings {
                mode: DeliveryMode::Sync,
                when_offline: WhenOffline::Reject,
            }
        }
    }
}

/// How public URLs are formed for a granted tunnel.
#[derive(Clone, Debug)]
pub(crate) struct PublicUrls {
    /// Explicit base for path-style URLs (`--public-url`).
    pub base: Option<String>,
    /// Subdomain root (`--domain`).
    pub domain: Option<String>,
    /// `https` when the HTTPS ingress is on (senders should use it), else `http`.
    pub scheme: &'static str,
    /// The bound address of that ingress.
    pub addr: SocketAddr,
}

impl PublicUrls {
    /// URLs on the HTTPS ingress when it is on, else on the HTTP one.
    pub fn new(
        base: Option<String>,
        domain: Option<String>,
        http: Option<SocketAddr>,
        https: Option<SocketAddr>,
    ) -> Self {
        let (scheme, addr) = match (https, http) {
            (Some(addr), _) => ("https", addr),
            (None, Some(addr)) => ("http", addr),
            (None, None) => ("http", SocketAddr::from(([127, 0, 0, 1], 80))),
        };
        PublicUrls {
            base,
            domain,
            scheme,
            addr,
        }
    }

    /// Path-style URL first, then the subdomain one. Without an explicit base or
    /// domain, the host is the ingress's bind address, or the address the agent
    /// reached the relay at when the bind address is a wildcard.
    fn for_tunnel(&self, name: &TunnelName, local_ip: Option<IpAddr>) -> Vec<String> {
        let port = self.addr.port();
        let default_port = if self.scheme == "https" { 443 } else { 80 };
        let port_suffix = if port == default_port {
            String::new()
        } else {
            format!(":{port}")
        };
        let base = match (&self.base, &self.domain) {
            (Some(base), _) => base.trim_end_matches('/').to_owned(),
            (None, Some(domain)) => format!("{}://{domain}{port_suffix}", self.scheme),
            (None, None) => {
                let ip = if self.addr.ip().is_unspecified() {
                    local_ip.unwrap_or(IpAddr::from([127, 0, 0, 1]))
                } else {
                    self.addr.ip()
                };
                format!("{}://{}", self.scheme, SocketAddr::new(ip, port))
            }
        };
        let mut urls = vec![format!("{base}/t/{name}/")];
        if let Some(domain) = &self.domain {
            let scheme = base.split("://").next().unwrap_or(self.scheme);
            let suffix = if self.base.is_some() {
                String::new()
            } else {
                port_suffix
            };
            urls.push(format!("{scheme}://{name}.{domain}{suffix}/"));
        }
        urls
    }
}

/// Accepts agent connections until `shutdown`, each in its own tracked task.
///
/// `shutdown` stops accepting; `close_sessions` (fired later, once the ingress
/// has drained) closes the established agent connections.
pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    agents: Arc<Agents>,
    certs: Certs,
    shutdown: CancellationToken,
    close_sessions: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
        };
        let remote = incoming.remote_address();
        if !certs.is_ready() {
            // A handshake without a certificate fails with a TLS alert, which
            // agents take as fatal; a refusal they retry.
            debug!(%remote, "agent refused: the ACME certificate is not issued yet");
            incoming.refuse();
            continue;
        }
        // Address validation first (RFC 9000 §8.1): a client that has not
        // yet echoed a Retry token gets one, which costs the relay one small
        // packet and no state. Only a client that owns its source address
        // then gets a handshake (certificates, up to three times what it sent:
        // a reflector's gain with a spoofed source) and a connection's state.
        // Agents connect rarely and stay: the round trip it adds is paid once
        // per connection.
        let incoming = if !incoming.remote_address_validated() && incoming.may_retry() {
            match incoming.retry() {
                Ok(()) => {
                    agents.metrics.quic_retry();
                    continue;
                }
                Err(err) => err.into_incoming(),
            }
        } else {
            incoming
        };
        let agents = agents.clone();
        let shutdown = close_sessions.clone();
        tracker.spawn(
            async move {
                match session(incoming, agents.clone(), shutdown).await {
                    Err(SessionError::Rejected(reason)) => {
                        agents.metrics.auth_failure(reason_code(reason));
                    }
                    Err(err) => debug!(error = %err, "agent session ended"),
                    Ok(()) => {}
                }
            }
            .instrument(info_span!(
                "session",
                %remote,
                agent = tracing::field::Empty,
                tunnels = tracing::field::Empty
            )),
        );
    }
}

async fn session(
    incoming: quinn::Incoming,
    agents: Arc<Agents>,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    // One deadline for the whole handshake, from the first packet to the hello.
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let remote_ip = incoming.remote_address().ip();
    let connection = tokio::time::timeout_at(deadline, incoming)
        .await
        .map_err(|_| SessionError::HelloTimeout)??;
    let (mut send, mut recv) = tokio::time::timeout_at(deadline, connection.accept_bi())
        .await
        .map_err(|_| SessionError::HelloTimeout)??;
    let payload = tokio::time::timeout_at(deadline, read_payload(&mut recv))
        .await
        .map_err(|_| SessionError::HelloTimeout)?
        .map_err(|_| SessionError::BadHello)?
        .ok_or(SessionError::BadHello)?;

    // A locked-out address is refused before its token is even looked at.
    if let Some(wait) = agents.guard.locked(remote_ip, Instant::now()) {
        return reject(
            &mut send,
            &connection,
            RejectReason::TooManyAttempts,
            format!(
                "too many failed attempts from {remote_ip}; retry in {} s",
                wait.as_secs().max(1)
            ),
        )
        .await;
    }

    let hello: Hello = match decode_payload(&payload) {
        Ok(hello) => hello,
        Err(_) => {
            return match decode_prefix::<HelloVersion>(&payload) {
                Ok(v) if v.version != PROTOCOL_VERSION => {
                    reject(
                        &mut send,
                        &connection,
                        RejectReason::VersionMismatch {
                            relay_version: PROTOCOL_VERSION,
                        },
                        version_message(v.version),
                    )
                    .await
                }
                _ => {
                    reject(
                        &mut send,
                        &connection,
                        RejectReason::InvalidHello,
                        "malformed hello".into(),
                    )
                    .await
                }
            };
        }
    };
    if hello.version != PROTOCOL_VERSION {
        return reject(
            &mut send,
            &connection,
            RejectReason::VersionMismatch {
                relay_version: PROTOCOL_VERSION,
            },
            version_message(hello.version),
        )
        .await;
    }
    if hello.tunnels.is_empty() || hello.tunnels.len() > MAX_TUNNELS_PER_AGENT {
        return reject(
            &mut send,
            &connection,
            RejectReason::InvalidHello,
            format!("ask for between 1 and {MAX_TUNNELS_PER_AGENT} tunnels"),
        )
        .await;
    }
    let record = match agents.tokens.authenticate(&hello.token) {
        Ok(Some(record)) => record,
        Ok(None) => {
            agents.count_failure(remote_ip);
            return reject(
                &mut send,
                &connection,
                RejectReason::BadToken,
                "the relay does not know this token (create one with `relay-server token create`)"
                    .into(),
            )
            .await;
        }
        Err(err) => {
            tracing::error!(
                error = &err as &dyn std::error::Error,
                "token store unreadable"
            );
            return reject(
                &mut send,
                &connection,
                RejectReason::BadToken,
                "the relay cannot check tokens right now".into(),
            )
            .await;
        }
    };
    if let Some(denied) = hello.tunnels.iter().find(|t| !record.grants(t)) {
        agents.count_failure(remote_ip);
        let granted: Vec<&str> = record.tunnels.iter().map(|p| p.as_str()).collect();
        return reject(
            &mut send,
            &connection,
            RejectReason::TunnelNotAllowed,
            format!(
                "token {:?} may not hold tunnel {denied}; it grants {}",
                record.name,
                granted.join(", ")
            ),
        )
        .await;
    }

    if let Err(message) = hello.policy.validate() {
        return reject(
            &mut send,
            &connection,
            RejectReason::InvalidHello,
            format!("invalid tunnel policy: {message}"),
        )
        .await;
    }

    let session_id = agents.next_session.fetch_add(1, Ordering::Relaxed);
    let span = tracing::Span::current();
    span.record("agent", hello.agent_id.as_str());
    span.record(
        "tunnels",
        tracing::field::display(
            hello
                .tunnels
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
    );
    let link = AgentLink {
        session_id,
        agent_id: hello.agent_id.clone(),
        connection: connection.clone(),
    };
    let settings = agents.effective(hello.settings);
    let replaced = match agents.routes.claim(&hello.tunnels, link, settings) {
        Ok(replaced) => replaced,
        Err(ClaimError::Taken(name)) => {
            return reject(
                &mut send,
                &connection,
                RejectReason::TunnelTaken,
                format!("tunnel {name} is held by another agent; pick another --tunnel"),
            )
            .await
        }
    };
    // Recorded only once the tunnels are this agent's: an agent cannot change
    // the policy of a tunnel someone else holds.
    if let Err(message) = agents.policies.request(&hello.tunnels, &hello.policy) {
        agents.routes.release(&hello.tunnels, session_id);
        warn!(error = %message, "cannot record the agent's tunnel policy");
        return reject(
            &mut send,
            &connection,
            RejectReason::InvalidHello,
            format!("the relay cannot apply the tunnel policy: {message}"),
        )
        .await;
    }
    for old in replaced {
        old.connection.close(
            close::REPLACED.into(),
            b"replaced by a newer connection of the same agent",
        );
    }

    let local_ip = connection.local_ip();
    let tunnels: Vec<TunnelGrant> = hello
        .tunnels
        .iter()
        .map(|name| TunnelGrant {
            name: name.clone(),
            public_urls: agents.urls.for_tunnel(name, local_ip),
            settings,
            queued: agents.queue.stats(name).count,
            policy: agents.policies.summary(name),
        })
        .collect();
    let names: Vec<String> = hello.tunnels.iter().map(|t| t.to_string()).collect();
    info!(token = %record.name, agent = %hello.agent_id, tunnels = %names.join(","), mode = %settings.mode, when_offline = %settings.when_offline, "agent connected");
    let welcome = RelayToAgent::Welcome {
        relay_version: PROTOCOL_VERSION,
        tunnels,
    };
    // The queue stream: queued deliveries go out from the welcome on, until
    // the session ends (or the agent says goodbye).
    let stop_drain = CancellationToken::new();
    let _stop_drain_on_exit = stop_drain.clone().drop_guard();
    tokio::spawn(
        {
            let (connection, queue, tunnels, stop, metrics) = (
                connection.clone(),
                agents.queue.clone(),
                hello.tunnels.clone(),
                stop_drain.clone(),
                agents.metrics.clone(),
            );
            async move {
                if let Err(err) = drain::serve(connection, queue, tunnels, stop, metrics).await {
                    debug!(error = %err, "queue stream ended");
                }
            }
        }
        .in_current_span(),
    );
    agents.metrics.agent_connected(1);
    let result = match write_frame(&mut send, &welcome).await {
        Ok(()) => {
            // Hold the tunnels until the agent leaves, the link dies or we shut down.
            tokio::select! {
                () = shutdown.cancelled() => {
                    connection.close(close::SHUTDOWN.into(), b"relay shutting down");
                    Ok(())
                }
                reason = connection.closed() => {
                    debug!(%reason, "agent connection closed");
                    Ok(())
                }
                msg = read_frame::<AgentToRelay, _>(&mut recv) => {
                    match msg {
                        Ok(Some(AgentToRelay::Goodbye)) | Ok(None) => {}
                        // A closed connection is the agent leaving (its goodbye may
                        // not have made it out first), not a protocol error.
                        Err(err) if connection.close_reason().is_some() => {
                            debug!(error = &err as &dyn std::error::Error, "control stream ended with the connection");
                        }
                        Err(err) => warn!(error = &err as &dyn std::error::Error, "bad control frame"),
                    }
                    // The agent is leaving: route nothing new to it, but let the
                    // deliveries in flight finish; the agent closes when done.
                    agents.routes.release(&hello.tunnels, session_id);
                    stop_drain.cancel();
                    if tokio::time::timeout(GOODBYE_GRACE, connection.closed()).await.is_err() {
                        connection.close(close::SHUTDOWN.into(), b"goodbye");
                    }
                    Ok(())
                }
            }
        }
        Err(_) => Err(SessionError::Closed),
    };
    agents.routes.release(&hello.tunnels, session_id);
    agents.metrics.agent_connected(-1);
    info!(agent = %hello.agent_id, tunnels = %names.join(","), "agent disconnected");
    result
}

/// Tells the agent why it was refused, lets it read that, then closes.
async fn reject(
    send: &mut quinn::SendStream,
    connection: &quinn::Connection,
    reason: RejectReason,
    message: String,
) -> Result<(), SessionError> {
    if reason == RejectReason::TooManyAttempts {
        // Warned once when the lockout began; every refusal would flood the log.
        debug!(?reason, %message, "agent refused");
    } else {
        warn!(?reason, %message, "agent refused");
    }
    let _ = write_frame(send, &RelayToAgent::Rejected { reason, message }).await;
    let _ = send.finish();
    // Let the agent read the reason; it closes the connection itself.
    let _ = tokio::time::timeout(REJECT_LINGER, connection.closed()).await;
    connection.close(close::REJECTED.into(), b"rejected");
    Err(SessionError::Rejected(reason))
}

/// The `reason` label of an authentication failure.
fn reason_code(reason: RejectReason) -> &'static str {
    match reason {
        RejectReason::BadToken => "bad_token",
        RejectReason::VersionMismatch { .. } => "version_mismatch",
        RejectReason::TunnelNotAllowed => "tunnel_not_allowed",
        RejectReason::TunnelTaken => "tunnel_taken",
        RejectReason::InvalidHello => "invalid_hello",
        RejectReason::TooManyAttempts => "too_many_attempts",
    }
}

fn version_message(agent_version: u16) -> String {
    format!(
        "protocol version mismatch: agent speaks {agent_version}, relay speaks {PROTOCOL_VERSION}; \
         upgrade the {} side",
        if agent_version < PROTOCOL_VERSION { "agent" } else { "relay" }
    )
}

/// How an agent session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("agent did not say hello in time")]
    HelloTimeout,
    #[error("agent sent a malformed hello")]
    BadHello,
    #[error("agent refused: {0:?}")]
    Rejected(RejectReason),
    #[error("connection closed during the handshake")]
    Closed,
    #[error("connection failed")]
    Connection(#[from] quinn::ConnectionError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_urls_follow_domain_and_bind_address() {
        let name: TunnelName = "alice".parse().expect("name");
        let plain = PublicUrls::new(
            None,
            None,
            Some("0.0.0.0:8080".parse().expect("addr")),
            None,
        );
        assert_eq!(
            plain.for_tunnel(&name, Some("203.0.113.9".parse().expect("ip"))),
            ["http://203.0.113.9:8080/t/alice/"]
        );
        let domain = PublicUrls::new(
            None,
            Some("relay.example.com".into()),
            Some("0.0.0.0:80".parse().expect("addr")),
            None,
        );
        assert_eq!(
            domain.for_tunnel(&name, None),
            [
                "http://relay.example.com/t/alice/",
                "http://alice.relay.example.com/"
            ]
        );
        let base = PublicUrls {
            base: Some("https://hooks.example.com/".into()),
            ..domain.clone()
        };
        assert_eq!(
            base.for_tunnel(&name, None),
            [
                "https://hooks.example.com/t/alice/",
                "https://alice.relay.example.com/"
            ]
        );
        // With HTTPS on, URLs say https (no port on 443) even when HTTP is on too.
        let https = PublicUrls::new(
            None,
            Some("relay.example.com".into()),
            Some("0.0.0.0:80".parse().expect("addr")),
            Some("0.0.0.0:443".parse().expect("addr")),
        );
        assert_eq!(
            https.for_tunnel(&name, None),
            [
                "https://relay.example.com/t/alice/",
                "https://alice.relay.example.com/"
            ]
        );
        let https_only = PublicUrls::new(
            None,
            None,
            None,
            Some("127.0.0.1:8443".parse().expect("addr")),
        );
        assert_eq!(
            https_only.for_tunnel(&name, None),
            ["https://127.0.0.1:8443/t/alice/"]
        );
    }
}
