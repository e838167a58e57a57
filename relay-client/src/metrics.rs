//! The agent's Prometheus metrics, served by the inspector at `/metrics`
//! (OpenMetrics text format). Every recorded exchange is counted once, when
//! it is reported (see [`crate::terminal::Terminal::exchange`]).
//!
//! Label values come from closed sets (kinds, status classes, outcomes,
//! providers, verdicts): nothing a sender controls becomes a label.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use relay_server::metrics::{encode_text, latency_histogram, status_class};

use hookrelay_shared::signature::Verdict;

use crate::history::{Exchange, Outcome};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    kind: &'static str,
    class: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    provider: &'static str,
    verdict: &'static str,
}

/// Everything the agent counts.
pub struct AgentMetrics {
    registry: Registry,
    deliveries: Family<DeliveryLabels, Counter>,
    app_duration: Histogram,
    request_bytes: Counter,
    response_bytes: Counter,
    attempts: Counter,
    retries: Counter,
    failures: Counter,
    verdicts: Family<VerdictLabels, Counter>,
    duplicates: Counter,
    queued_repeats: Counter,
    connected: Gauge,
    queued_waiting: Gauge,
    history_exchanges: Gauge,
    history_disk_bytes: Gauge,
    disk_bytes: Gauge,
    link: Link,
}

/// The QUIC connection to the relay while there is one, and gauges read off
/// its statistics at each scrape: a slow or lossy path shows here.
struct Link {
    /// The connection, and the local address of its UDP socket.
    connection: std::sync::Mutex<Option<(quinn::Connection, Option<std::net::SocketAddr>)>>,
    rtt: Gauge<f64, std::sync::atomic::AtomicU64>,
    sent: Gauge,
    received: Gauge,
    lost: Gauge,
    mtu: Gauge,
    drops: Gauge,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut r = Registry::default();
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        r.register(
            "hookrelay_agent_deliveries",
            "Exchanges with the local app by kind (sync, queued, replay), status class and outcome",
            deliveries.clone(),
        );
        let app_duration = latency_histogram();
        r.register(
            "hookrelay_agent_app_duration_seconds",
            "From sending a request to the local app until its response head",
            app_duration.clone(),
        );
        let request_bytes = Counter::default();
        r.register(
            "hookrelay_agent_request_bytes",
            "Request body bytes handed to the local app",
            request_bytes.clone(),
        );
        let response_bytes = Counter::default();
        r.register(
            "hookrelay_agent_response_bytes",
            "Response body bytes from the local app",
            response_bytes.clone(),
        );
        let attempts = Counter::default();
        r.register(
            "hookrelay_agent_delivery_attempts",
            "Attempts at queued webhooks",
            attempts.clone(),
        );
        let retries = Counter::default();
        r.register(
            "hookrelay_agent_delivery_retries",
            "Attempts at queued webhooks after the first",
            retries.clone(),
        );
        let failures = Counter::default();
        r.register(
            "hookrelay_agent_delivery_failures",
            "Queued webhooks marked failed (last attempt failed, or interrupted)",
            failures.clone(),
        );
        let verdicts = Family::<VerdictLabels, Counter>::default();
        r.register(
            "hookrelay_agent_signature_verdicts",
            "Signature verdicts by provider",
            verdicts.clone(),
        );
        let duplicates = Counter::default();
        r.register(
            "hookrelay_agent_duplicates",
            "Provider retries answered without calling the app",
            duplicates.clone(),
        );
        let queued_repeats = Counter::default();
        r.register(
            "hookrelay_agent_queued_repeats",
            "Queued webhooks the relay sent again that the outbox already had (acknowledged by the agent, not yet removed on the relay's disk when the relay stopped or the link broke); the app does not get them twice",
            queued_repeats.clone(),
        );
        let connected = Gauge::default();
        r.register(
            "hookrelay_agent_connected",
            "1 while the agent holds its tunnel at the relay",
            connected.clone(),
        );
        let queued_waiting = Gauge::default();
        r.register(
            "hookrelay_agent_queued_waiting",
            "Queued webhooks in the agent's outbox, waiting for the app",
            queued_waiting.clone(),
        );
        let history_exchanges = Gauge::default();
        r.register(
            "hookrelay_agent_history_exchanges",
            "Exchanges kept in the history (retention: --max-exchanges, --max-history-bytes)",
            history_exchanges.clone(),
        );
        let history_disk_bytes = Gauge::default();
        r.register(
            "hookrelay_agent_history_disk_bytes",
            "Bytes the history takes on disk: its sled store and its body segments",
            history_disk_bytes.clone(),
        );
        let disk_bytes = Gauge::default();
        r.register(
            "hookrelay_agent_disk_bytes",
            "Bytes the agent keeps on disk: its sled store (history and outbox), the history's body segments and the outbox's body files",
            disk_bytes.clone(),
        );
        let link = Link {
            connection: std::sync::Mutex::new(None),
            rtt: Gauge::default(),
            sent: Gauge::default(),
            received: Gauge::default(),
            lost: Gauge::default(),
            mtu: Gauge::default(),
            drops: Gauge::default(),
        };
        r.register(
            "hookrelay_agent_link_rtt_seconds",
            "Round-trip time to the relay, as QUIC estimates it (0 while disconnected)",
            link.rtt.clone(),
        );
        for (name, help, gauge) in [
            (
                "hookrelay_agent_link_sent_packets",
                "UDP datagrams sent to the relay on the current link",
                &link.sent,
            ),
            (
                "hookrelay_agent_link_received_packets",
                "UDP datagrams received from the relay on the current link",
                &link.received,
            ),
            (
                "hookrelay_agent_link_lost_packets",
                "Packets to the relay QUIC declared lost on the current link",
                &link.lost,
            ),
            (
                "hookrelay_agent_link_mtu_bytes",
                "Largest UDP payload the current link carries, as path MTU discovery found it",
                &link.mtu,
            ),
            (
                "hookrelay_agent_link_receive_drops",
                "Datagrams the kernel dropped from the current link's full UDP receive buffer (Linux; raise net.core.rmem_max)",
                &link.drops,
            ),
        ] {
            r.register(name, help, gauge.clone());
        }
        AgentMetrics {
            registry: r,
            deliveries,
            app_duration,
            request_bytes,
            response_bytes,
            attempts,
            retries,
            failures,
            verdicts,
            duplicates,
            queued_repeats,
            connected,
            queued_waiting,
            history_exchanges,
            history_disk_bytes,
            disk_bytes,
            link,
        }
    }

    /// The link to the relay the `hookrelay_agent_link_*` gauges describe,
    /// with the local address of its UDP socket, or none while disconnected.
    pub fn set_link(&self, link: Option<(quinn::Connection, Option<std::net::SocketAddr>)>) {
        *self
            .link
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = link;
    }

    /// Counts one recorded exchange.
    pub fn exchange(&self, e: &Exchange) {
        let kind = if e.replay_of.is_some() {
            "replay"
        } else if e.queued.is_some() {
            "queued"
        } else {
            "sync"
        };
        self.deliveries
            .get_or_create(&DeliveryLabels {
                kind,
                class: e.status().map(status_class).unwrap_or("none"),
                outcome: outcome(e.outcome),
            })
            .inc();
        if let Some(ms) = e.duration.local_app_ms {
            self.app_duration.observe(ms as f64 / 1000.0);
        }
        self.request_bytes.inc_by(e.request.body_len);
        if let Some(r) = &e.response {
            self.response_bytes.inc_by(r.body_len);
        }
        if let Some(q) = &e.queued {
            if !q.interrupted {
                self.attempts.inc();
            }
            if q.attempt > 1 {
                self.retries.inc();
            }
            if q.failed {
                self.failures.inc();
            }
        }
        if let Some(v) = &e.signature {
            let (provider, verdict) = match v {
                Verdict::Valid { provider } => (provider.as_str(), "valid"),
                Verdict::Invalid { provider, .. } => (provider.as_str(), "invalid"),
                Verdict::Stale { provider, .. } => (provider.as_str(), "stale"),
                Verdict::NoSecret { provider } => (provider.as_str(), "no_secret"),
                Verdict::Unsigned => ("none", "unsigned"),
            };
            self.verdicts
                .get_or_create(&VerdictLabels { provider, verdict })
                .inc();
        }
        if e.duplicate_of.is_some() {
            self.duplicates.inc();
        }
    }

    /// The exposition text, with the gauges as of now.
    pub fn render(
        &self,
        connected: bool,
        queued_waiting: usize,
        queued_repeats: u64,
        history: crate::history::Figures,
        outbox_file_bytes: u64,
    ) -> String {
        self.connected.set(i64::from(connected));
        self.history_exchanges
            .set(i64::try_from(history.exchanges).unwrap_or(i64::MAX));
        self.history_disk_bytes
            .set(i64::try_from(history.disk_bytes).unwrap_or(i64::MAX));
        self.disk_bytes.set(
            i64::try_from(history.disk_bytes.saturating_add(outbox_file_bytes)).unwrap_or(i64::MAX),
        );
        relay_server::metrics::follow(&self.queued_repeats, queued_repeats);
        self.queued_waiting
            .set(i64::try_from(queued_waiting).unwrap_or(i64::MAX));
        let (stats, socket) = self
            .link
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or((None, None), |(c, socket)| (Some(c.stats()), *socket));
        let drops = socket.and_then(relay_server::udp::receive_drops);
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let link = &self.link;
        link.rtt
            .set(stats.as_ref().map_or(0.0, |s| s.path.rtt.as_secs_f64()));
        link.sent
            .set(stats.as_ref().map_or(0, |s| count(s.udp_tx.datagrams)));
        link.received
            .set(stats.as_ref().map_or(0, |s| count(s.udp_rx.datagrams)));
        link.lost
            .set(stats.as_ref().map_or(0, |s| count(s.path.lost_packets)));
        link.mtu
            .set(stats.as_ref().map_or(0, |s| i64::from(s.path.current_mtu)));
        link.drops.set(drops.map_or(0, count));
        encode_text(&self.registry)
    }
}

fn outcome(o: Outcome) -> &'static str {
    match o {
        Outcome::Ok => "ok",
        Outcome::LocalAppUnreachable => "local_app_unreachable",
        Outcome::LocalAppTimeout => "local_app_timeout",
        Outcome::LocalAppError => "local_app_error",
        Outcome::BadRequest => "bad_request",
        Outcome::Cancelled => "cancelled",
    }
}
