//! The relay's Prometheus metrics, served on the admin listener at `/metrics`
//! (OpenMetrics text format).
//!
//! Tunnel names are chosen by users, so they are never used as label values
//! unchecked: only tunnels that an agent has held become labels, at most
//! [`MAX_TUNNEL_LABELS`] of them; the rest share `_other`, and requests for
//! tunnels nobody holds are counted under `_unknown`.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::queue::Queue;

/// Most distinct tunnel label values.
pub const MAX_TUNNEL_LABELS: usize = 200;

/// Label value for tunnels past [`MAX_TUNNEL_LABELS`].
const OTHER: &str = "_other";

/// Label value for tunnels nobody ever held (or names that are not tunnels).
pub const UNKNOWN: &str = "_unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    tunnel: String,
    class: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabel {
    tunnel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Everything the relay counts. Cheap to share (`Arc`).
pub struct RelayMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<KindLabel, Histogram>,
    request_bytes: Family<TunnelLabel, Counter>,
    response_bytes: Family<TunnelLabel, Counter>,
    agents_connected: Gauge,
    auth_failures: Family<ReasonLabel, Counter>,
    quic_retries: Counter,
    quic_receive_buffer: Gauge,
    /// Follows the kernel's own count, read at each scrape.
    quic_receive_drops: Counter,
    /// Local address of the QUIC socket, once it is bound.
    quic_addr: std::sync::OnceLock<std::net::SocketAddr>,
    queue_depth: Family<TunnelLabel, Gauge>,
    queue_bytes: Family<TunnelLabel, Gauge>,
    queue_oldest: Family<TunnelLabel, Gauge>,
    queue_delivered: Family<TunnelLabel, Counter>,
    labelled: Mutex<HashSet<String>>,
    queue: Arc<dyn Queue>,
}

impl std::fmt::Debug for RelayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayMetrics").finish_non_exhaustive()
    }
}

impl RelayMetrics {
    /// Registers every metric; queue gauges are read from `queue` at scrape time.
    pub fn new(queue: Arc<dyn Queue>) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "hookrelay_relay_requests",
            "Webhook requests by tunnel, status class and outcome",
            requests.clone(),
        );
        let duration = Family::<KindLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "hookrelay_relay_request_duration_seconds",
            "From a request's arrival to its response head (kind: sync or queued)",
            duration.clone(),
        );
        let request_bytes = Family::<TunnelLabel, Counter>::default();
        registry.register(
            "hookrelay_relay_request_bytes",
            "Request body bytes received",
            request_bytes.clone(),
        );
        let response_bytes = Family::<TunnelLabel, Counter>::default();
        registry.register(
            "hookrelay_relay_response_bytes",
            "Response body bytes sent back to senders",
            response_bytes.clone(),
        );
        let agents_connected = Gauge::default();
        registry.register(
            "hookrelay_relay_agents_connected",
            "Agent connections holding tunnels",
            agents_connected.clone(),
        );
        let auth_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "hookrelay_relay_auth_failures",
            "Agents refused, by reason",
            auth_failures.clone(),
        );
        let quic_retries = Counter::default();
        registry.register(
            "hookrelay_relay_quic_retries",
            "New agent connections asked to prove their address (QUIC Retry)",
            quic_retries.clone(),
        );
        let quic_receive_buffer = Gauge::default();
        registry.register(
            "hookrelay_relay_quic_receive_buffer_bytes",
            "Receive buffer the kernel granted the QUIC socket, as it reports it (Linux: twice the granted size)",
            quic_receive_buffer.clone(),
        );
        let quic_receive_drops = Counter::default();
        registry.register(
            "hookrelay_relay_quic_receive_drops",
            "Datagrams the kernel dropped from the QUIC socket's full receive buffer since it was bound (Linux)",
            quic_receive_drops.clone(),
        );
        let queue_depth = Family::<TunnelLabel, Gauge>::default();
        registry.register(
            "hookrelay_relay_queue_depth",
            "Webhooks queued per tunnel",
            queue_depth.clone(),
        );
        let queue_bytes = Family::<TunnelLabel, Gauge>::default();
        registry.register(
            "hookrelay_relay_queue_bytes",
            "Body bytes queued per tunnel",
            queue_bytes.clone(),
        );
        let queue_oldest = Family::<TunnelLabel, Gauge>::default();
        registry.register(
            "hookrelay_relay_queue_oldest_age_seconds",
            "Age of the oldest queued webhook per tunnel",
            queue_oldest.clone(),
        );
        let queue_delivered = Family::<TunnelLabel, Counter>::default();
        registry.register(
            "hookrelay_relay_queue_delivered",
            "Queued webhooks the agent acknowledged",
            queue_delivered.clone(),
        );
        RelayMetrics {
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
            agents_connected,
            auth_failures,
            quic_retries,
            quic_receive_buffer,
            quic_receive_drops,
            quic_addr: std::sync::OnceLock::new(),
            queue_depth,
            queue_bytes,
            queue_oldest,
            queue_delivered,
            labelled: Mutex::default(),
            queue,
        }
    }

    /// The label value for a tunnel an agent holds or held: its name while
    /// there is room, else `_other`.
    pub fn tunnel_label(&self, tunnel: &str) -> String {
        let mut labelled = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        if labelled.contains(tunnel) {
            return tunnel.to_owned();
        }
        if labelled.len() < MAX_TUNNEL_LABELS {
            labelled.insert(tunnel.to_owned());
            return tunnel.to_owned();
        }
        OTHER.to_owned()
    }

    /// One answered request. `tunnel` is a label from [`Self::tunnel_label`]
    /// or [`UNKNOWN`]; `outcome` a stable code (`delivered`, `queued`, or an
    /// error code of the sender's JSON body).
    pub fn request(
        &self,
        tunnel: &str,
        status: u16,
        outcome: &'static str,
        queued: bool,
        took: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                tunnel: tunnel.to_owned(),
                class: status_class(status),
                outcome,
            })
            .inc();
        self.duration
            .get_or_create(&KindLabel {
                kind: if queued { "queued" } else { "sync" },
            })
            .observe(took.as_secs_f64());
    }

    /// Request body bytes received for `tunnel` (a label).
    pub fn request_bytes(&self, tunnel: &str, n: u64) {
        self.request_bytes
            .get_or_create(&TunnelLabel {
                tunnel: tunnel.to_owned(),
            })
            .inc_by(n);
    }

    /// Response body bytes sent for `tunnel` (a label).
    pub fn response_bytes(&self, tunnel: &str, n: u64) {
        self.response_bytes
            .get_or_create(&TunnelLabel {
                tunnel: tunnel.to_owned(),
            })
            .inc_by(n);
    }

    /// An agent connection was welcomed (+1) or ended (-1).
    pub fn agent_connected(&self, delta: i64) {
        self.agents_connected.inc_by(delta);
    }

    /// An agent was refused.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A new agent connection was answered with a QUIC Retry.
    pub fn quic_retry(&self) {
        self.quic_retries.inc();
    }

    /// A queued webhook of `tunnel` was acknowledged by its agent.
    pub fn queue_delivered(&self, tunnel: &str) {
        let tunnel = self.tunnel_label(tunnel);
        self.queue_delivered
            .get_or_create(&TunnelLabel { tunnel })
            .inc();
    }

    /// The QUIC socket is bound to `local` with `receive_buffer` bytes of
    /// receive buffer; its drops are read at each scrape.
    pub fn quic_socket(&self, local: std::net::SocketAddr, receive_buffer: usize) {
        self.quic_receive_buffer
            .set(i64::try_from(receive_buffer).unwrap_or(i64::MAX));
        let _ = self.quic_addr.set(local);
    }

    /// The exposition text, with the queue gauges and the QUIC socket's
    /// drops read now.
    pub fn render(&self) -> String {
        if let Some(&local) = self.quic_addr.get() {
            if let Some(drops) = crate::udp::receive_drops(local) {
                follow(&self.quic_receive_drops, drops);
            }
        }
        self.queue_depth.clear();
        self.queue_bytes.clear();
        self.queue_oldest.clear();
        let now_ms = crate::now_ms();
        for stats in self.queue.all_stats() {
            let label = TunnelLabel {
                tunnel: self.tunnel_label(stats.tunnel.as_str()),
            };
            let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            // Tunnels sharing `_other` add up.
            self.queue_depth
                .get_or_create(&label)
                .inc_by(to_i64(stats.count));
            self.queue_bytes
                .get_or_create(&label)
                .inc_by(to_i64(stats.bytes));
            let age = stats
                .oldest_received_at_ms
                .map(|t| now_ms.saturating_sub(t) / 1000)
                .unwrap_or(0);
            let oldest = self.queue_oldest.get_or_create(&label);
            if to_i64(age) > oldest.get() {
                oldest.set(to_i64(age));
            }
        }
        encode_text(&self.registry)
    }
}

/// A latency histogram in seconds: 0.5 ms to about a minute, doubling.
/// Relay and agent use the same buckets, so their figures line up.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// `registry` in the OpenMetrics text format (errors are logged; what was
/// encoded is returned).
pub fn encode_text(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(err) = encode(&mut out, registry) {
        tracing::error!(error = %err, "cannot encode metrics");
    }
    out
}

/// `2xx`, `4xx`… of a status code.
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

/// Moves `counter` up to `total`, a running count kept elsewhere (the
/// kernel's, a component's own) and read at each scrape; never down.
pub fn follow(counter: &Counter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{QueueLimits, SledQueue};

    #[test]
    fn tunnel_labels_are_bounded() {
        let queue: Arc<dyn Queue> =
            Arc::new(SledQueue::temporary(QueueLimits::default()).expect("queue"));
        let m = RelayMetrics::new(queue);
        for i in 0..MAX_TUNNEL_LABELS {
            assert_eq!(m.tunnel_label(&format!("t{i}")), format!("t{i}"));
        }
        assert_eq!(m.tunnel_label("one-too-many"), OTHER);
        assert_eq!(m.tunnel_label("t0"), "t0", "known labels stay");
        m.request(
            &m.tunnel_label("t1"),
            200,
            "delivered",
            false,
            Duration::from_millis(3),
        );
        let text = m.render();
        assert!(text.contains(
            "hookrelay_relay_requests_total{tunnel=\"t1\",class=\"2xx\",outcome=\"delivered\"} 1"
        ), "{text}");
        assert!(
            text.contains(
                "hookrelay_relay_request_duration_seconds_bucket{le=\"0.002\",kind=\"sync\"} 0\n\
                 hookrelay_relay_request_duration_seconds_bucket{le=\"0.004\",kind=\"sync\"} 1"
            ),
            "{text}"
        );
    }
}
