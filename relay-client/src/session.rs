//! One QUIC connection to the relay: handshake, then serving delivery streams
//! until the link ends. [`crate::agent`] reconnects around it.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hookrelay_shared::{
    codec::{read_frame, write_frame},
    policy::PolicyRequest,
    protocol::close,
    AgentToRelay, Hello, RejectReason, RelayToAgent, TunnelGrant, TunnelName, TunnelSettings,
    PROTOCOL_VERSION,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    config::Secret,
    forward::Forwarder,
    queued::{self, Outbox},
    tls::{Refusal, RefusalSlot},
};

/// Keep-alive interval: frequent enough that NATs keep the mapping and that the
/// idle timeout below only fires on a dead link.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);

/// A link silent this long is dead; the agent reconnects.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time for the QUIC handshake plus hello/welcome.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for in-flight deliveries to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What a connection attempt needs.
pub(crate) struct Dialer {
    pub endpoint: quinn::Endpoint,
    pub client_config: quinn::ClientConfig,
    pub refusal: RefusalSlot,
    pub relay: String,
    /// Dialled instead of the address `relay`'s host resolves to.
    pub relay_ip: Option<IpAddr>,
    pub token: Secret,
    pub agent_id: String,
    pub tunnels: Vec<TunnelName>,
    pub settings: TunnelSettings,
    pub policy: PolicyRequest,
}

/// An established, welcomed connection.
pub(crate) struct Session {
    pub connection: quinn::Connection,
    pub tunnels: Vec<TunnelGrant>,
    control: (quinn::SendStream, quinn::RecvStream),
}

/// Transport settings for the agent's side of the link: the relay may have
/// `max_deliveries` deliveries in flight on it at once.
pub(crate) fn transport_config(max_deliveries: u32) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_concurrent_bidi_streams(max_deliveries.into())
        .max_concurrent_uni_streams(0u32.into());
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        transport.max_idle_timeout(Some(idle));
    }
    transport
}

impl Dialer {
    /// Connects, says hello and waits for the welcome.
    ///
    /// # Errors
    /// [`ConnectError`]; [`ConnectError::is_fatal`] tells whether retrying can help.
    pub async fn connect(&self) -> Result<Session, ConnectError> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.try_connect())
            .await
            .map_err(|_| ConnectError::Timeout)?
    }

    async fn try_connect(&self) -> Result<Session, ConnectError> {
        let addr = match self.relay_ip {
            Some(ip) => SocketAddr::new(ip, port_part(&self.relay)?),
            None => resolve(&self.relay).await?,
        };
        let server_name = host_part(&self.relay);
        *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), addr, server_name)
            .map_err(|e| ConnectError::Config(e.to_string()))?;
        // No `into_0rtt()`: the token must not travel in replayable early data.
        let connection = connecting.await.map_err(|e| self.classify(e))?;
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| self.classify(e))?;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            token: self.token.expose().to_owned(),
            agent_id: self.agent_id.clone(),
            tunnels: self.tunnels.clone(),
            settings: self.settings,
            policy: self.policy.clone(),
        };
        write_frame(&mut send, &hello)
            .await
            .map_err(|_| ConnectError::Lost("connection lost during hello".into()))?;
        match read_frame::<RelayToAgent, _>(&mut recv).await {
            Ok(Some(RelayToAgent::Welcome { tunnels, .. })) => Ok(Session {
                connection,
                tunnels,
                control: (send, recv),
            }),
            Ok(Some(RelayToAgent::Rejected { reason, message })) => {
                connection.close(close::REJECTED.into(), b"rejected");
                Err(ConnectError::Rejected { reason, message })
            }
            Ok(None) => Err(ConnectError::Lost(
                "relay closed the connection during hello".into(),
            )),
            Err(_) => match connection.close_reason() {
                Some(reason) => Err(self.classify(reason)),
                None => Err(ConnectError::Lost(
                    "relay sent a malformed answer to hello".into(),
                )),
            },
        }
    }

    fn classify(&self, err: quinn::ConnectionError) -> ConnectError {
        let refusal = self
            .refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match refusal {
            Some(Refusal::Fingerprint(got)) => return ConnectError::Fingerprint { got },
            Some(Refusal::Untrusted(problem)) => {
                return ConnectError::untrusted(host_part(&self.relay), &problem)
            }
            None => {}
        }
        match &err {
            quinn::ConnectionError::TransportError(e) if is_tls_alert(e.code) => {
                ConnectError::Tls(e.reason.clone())
            }
            quinn::ConnectionError::ConnectionClosed(c) if is_tls_alert(c.error_code) => {
                ConnectError::Tls(String::from_utf8_lossy(&c.reason).into_owned())
            }
            _ => ConnectError::Lost(err.to_string()),
        }
    }
}

/// QUIC carries TLS alerts as transport error codes 0x100–0x1ff.
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

impl Session {
    /// Serves delivery streams until the link ends or `shutdown` fires. Returns
    /// why the link ended.
    pub async fn serve(
        self,
        forwarder: Forwarder,
        outbox: Outbox,
        shutdown: CancellationToken,
    ) -> LinkEnd {
        let tracker = TaskTracker::new();
        let Session {
            connection,
            control: (mut control_send, mut control_recv),
            ..
        } = self;
        let control_closed = read_frame::<RelayToAgent, _>(&mut control_recv);
        tokio::pin!(control_closed);
        // Webhooks the relay queued arrive on their own stream; when it breaks
        // the link is no good for them, so it is dropped and made again.
        let queue_stream = queued::receive(connection.clone(), outbox);
        tokio::pin!(queue_stream);
        let mut queue_done = false;
        let end = loop {
            tokio::select! {
                r = &mut queue_stream, if !queue_done => {
                    queue_done = true;
                    if let Err(err) = r {
                        if connection.close_reason().is_none() {
                            tracing::warn!("queue stream broke ({err}); reconnecting");
                            connection.close(close::PROTOCOL_ERROR.into(), b"queue stream broke");
                        }
                    }
                }
                () = shutdown.cancelled() => {
                    let _ = write_frame(&mut control_send, &AgentToRelay::Goodbye).await;
                    let _ = control_send.finish();
                    break LinkEnd::Shutdown;
                }
                stream = connection.accept_bi() => match stream {
                    Ok((send, recv)) => {
                        let forwarder = forwarder.clone();
                        // Boxed: the delivery's future is about 4 KiB, which the
                        // runtime otherwise copies at every move into and within
                        // its task (callgrind: ~4,000 instructions per delivery).
                        let delivery = Box::pin(async move { forwarder.handle(send, recv).await });
                        tracker.spawn(delivery.instrument(tracing::info_span!("delivery", delivery_id = tracing::field::Empty)));
                    }
                    Err(err) => break LinkEnd::from_close(err),
                },
                _ = &mut control_closed => {
                    // The relay ended the control stream: it is dropping us.
                    let reason = tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
                    break match reason {
                        Ok(err) => LinkEnd::from_close(err),
                        Err(_) => LinkEnd::Lost("relay closed the control stream".into()),
                    };
                }
            }
        };
        if matches!(end, LinkEnd::Shutdown) {
            // Give in-flight deliveries a moment, then say goodbye properly.
            tracker.close();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await;
            connection.close(close::SHUTDOWN.into(), b"agent shutting down");
        }
        end
    }
}

/// Why a welcomed link ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkEnd {
    /// We are shutting down.
    Shutdown,
    /// The relay is shutting down or restarting; reconnect.
    RelayShutdown(String),
    /// Another connection of this agent (same data directory) took over.
    Replaced,
    /// The path dropped or timed out; reconnect.
    Lost(String),
}

impl LinkEnd {
    fn from_close(err: quinn::ConnectionError) -> LinkEnd {
        match &err {
            quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code == close::REPLACED.into() =>
            {
                LinkEnd::Replaced
            }
            quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code == close::SHUTDOWN.into() =>
            {
                LinkEnd::RelayShutdown(String::from_utf8_lossy(&c.reason).into_owned())
            }
            quinn::ConnectionError::TimedOut => {
                LinkEnd::Lost("no answer from the relay (link timed out)".into())
            }
            _ => LinkEnd::Lost(err.to_string()),
        }
    }
}

async fn resolve(relay: &str) -> Result<SocketAddr, ConnectError> {
    let mut addrs = tokio::net::lookup_host(relay)
        .await
        .map_err(|e| ConnectError::Resolve(format!("cannot resolve {relay}: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| ConnectError::Resolve(format!("{relay} resolves to no address")))
}

/// `4443` of `relay.example.com:4443`.
fn port_part(relay: &str) -> Result<u16, ConnectError> {
    relay
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .ok_or_else(|| ConnectError::Config(format!("{relay} has no port (expected HOST:PORT)")))
}

/// `relay.example.com` of `relay.example.com:4443`, `::1` of `[::1]:4443`.
fn host_part(relay: &str) -> &str {
    if let Some(rest) = relay.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    relay.rsplit_once(':').map(|(h, _)| h).unwrap_or(relay)
}

/// What to do about a relay certificate no trusted CA vouches for.
const SELF_SIGNED_ADVICE: &str = "for a self-signed relay pass --relay-cert-sha256 with the \
     fingerprint relay-server prints at start; for a private CA point SSL_CERT_FILE at the \
     CA's certificate (PEM)";

/// Why a connection attempt failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("the relay refused this agent: {message}")]
    Rejected {
        reason: RejectReason,
        message: String,
    },
    #[error(
        "the relay's certificate does not match --relay-cert-sha256 (it presented {got}); \
         check the fingerprint relay-server printed at start"
    )]
    Fingerprint { got: String },
    #[error("the certificate of the relay {relay} {problem}; {advice}")]
    Untrusted {
        relay: String,
        problem: String,
        advice: &'static str,
    },
    #[error(
        "TLS handshake with the relay failed ({0}); for a self-signed relay pass \
         --relay-cert-sha256 with the fingerprint relay-server printed at start"
    )]
    Tls(String),
    #[error("{0}")]
    Resolve(String),
    #[error("invalid connection settings: {0}")]
    Config(String),
    #[error("no answer from the relay within {}s", CONNECT_TIMEOUT.as_secs())]
    Timeout,
    #[error("{0}")]
    Lost(String),
}

impl ConnectError {
    /// The relay's certificate failed the check against trusted roots: what is
    /// wrong with it, and what the user can do.
    fn untrusted(relay: &str, problem: &rustls::CertificateError) -> ConnectError {
        use rustls::CertificateError as E;
        let (problem, advice) = match problem {
            E::UnknownIssuer => (
                "is not signed by a CA this machine trusts".to_owned(),
                SELF_SIGNED_ADVICE,
            ),
            E::NotValidForName | E::NotValidForNameContext { .. } => (
                format!("is not valid for the name {relay}"),
                "set --relay to a name the certificate is for (the relay's --domain), \
                 with --relay-ip if that name does not resolve to the relay from here",
            ),
            E::Expired | E::ExpiredContext { .. } => (
                "has expired".to_owned(),
                "the relay's operator must renew it (with --acme the relay renews by itself: \
                 check its log)",
            ),
            E::NotValidYet | E::NotValidYetContext { .. } => {
                ("is not valid yet".to_owned(), "check this machine's clock")
            }
            other => (format!("was refused ({other:?})"), SELF_SIGNED_ADVICE),
        };
        ConnectError::Untrusted {
            relay: relay.to_owned(),
            problem,
            advice,
        }
    }

    /// Whether the same attempt can never succeed: the agent should stop with
    /// this message instead of retrying forever.
    pub fn is_fatal(&self) -> bool {
        match self {
            ConnectError::Rejected { reason, .. } => reason.is_fatal(),
            ConnectError::Fingerprint { .. }
            | ConnectError::Untrusted { .. }
            | ConnectError::Tls(_)
            | ConnectError::Config(_) => true,
            ConnectError::Resolve(_) | ConnectError::Timeout | ConnectError::Lost(_) => false,
        }
    }
}

/// Creates the agent's UDP endpoint, on the address family of `relay`.
pub(crate) fn endpoint_for(relay_is_v6: bool) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if relay_is_v6 {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    relay_server::udp::quic_endpoint(bind, None).map(|(endpoint, _)| endpoint)
}

/// The client configuration with the agent's transport settings
/// ([`Config::max_deliveries`](crate::config::Config::max_deliveries) for
/// `max_deliveries`).
pub fn with_transport(mut config: quinn::ClientConfig, max_deliveries: u32) -> quinn::ClientConfig {
    config.transport_config(Arc::new(transport_config(max_deliveries)));
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_part_strips_port_and_brackets() {
        assert_eq!(host_part("relay.example.com:4443"), "relay.example.com");
        assert_eq!(host_part("[::1]:4443"), "::1");
        assert_eq!(host_part("127.0.0.1:4443"), "127.0.0.1");
        assert_eq!(port_part("relay.example.com:4443").ok(), Some(4443));
        assert!(port_part("relay.example.com").is_err());
    }

    #[test]
    fn untrusted_certificates_say_what_to_do() {
        let err = ConnectError::untrusted(
            "relay.example.com",
            &rustls::CertificateError::UnknownIssuer,
        );
        let text = err.to_string();
        assert!(
            text.contains("relay.example.com")
                && text.contains("SSL_CERT_FILE")
                && text.contains("--relay-cert-sha256"),
            "{text}"
        );
        assert!(err.is_fatal());
        let text = ConnectError::untrusted("10.0.0.1", &rustls::CertificateError::NotValidForName)
            .to_string();
        assert!(
            text.contains("not valid for the name 10.0.0.1") && text.contains("--relay-ip"),
            "{text}"
        );
    }
}
