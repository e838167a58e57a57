//! The admin listener: health and the store-and-forward queue, for operators.
//! Keep it on loopback or behind a firewall: it can purge queues.

use std::sync::Arc;

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use hookrelay_shared::TunnelName;
use serde::{Deserialize, Serialize};
use serde_json::json;

use tokio_util::sync::CancellationToken;

use crate::{
    metrics::RelayMetrics,
    now_ms,
    queue::{Queue, QueuedItem, TunnelStats},
    routing::Routes,
};

/// What the admin handlers read.
#[derive(Clone)]
pub(crate) struct AdminState {
    pub routes: Arc<dyn Routes>,
    pub queue: Arc<dyn Queue>,
    pub metrics: Arc<RelayMetrics>,
    /// Fired when the relay starts shutting down: `/readyz` turns 503.
    pub stopping: CancellationToken,
    /// Reported by `/healthz`, so that the queue commands know they reach the
    /// relay of the data directory they were given.
    pub data_dir: String,
}

/// `/healthz`, `/api/queue`, `/api/queue/{tunnel}` (GET lists, DELETE purges).
pub(crate) fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/queue", get(queue_list))
        .route("/api/queue/{tunnel}", get(queue_show).delete(queue_purge))
        .with_state(state)
}

async fn healthz(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let queued: u64 = state.queue.all_stats().iter().map(|s| s.count).sum();
    Json(json!({
        "status": "ok",
        "tunnels_online": state.routes.online(),
        "queued": queued,
        "data_dir": state.data_dir,
    }))
}

/// Ready for traffic: not shutting down, and the queue can be written.
async fn readyz(State(state): State<AdminState>) -> Response {
    if state.stopping.is_cancelled() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the relay is shutting down".into(),
        );
    }
    if let Err(e) = state.queue.sync().await {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_unavailable",
            e.to_string(),
        );
    }
    Json(json!({ "status": "ready" })).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let text = state.metrics.render();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// One tunnel's queue as the admin API and `relay-server queue list` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSummary {
    /// The tunnel.
    pub tunnel: String,
    /// Webhooks waiting.
    pub count: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// When the oldest one arrived (Unix ms).
    pub oldest_received_at_ms: Option<u64>,
    /// How long the oldest one has waited, in seconds.
    pub oldest_age_secs: Option<u64>,
    /// Whether the tunnel's agent is connected now.
    pub online: bool,
}

/// One queued webhook as `relay-server queue show` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    /// Position in the queue.
    pub seq: u64,
    /// The id the sender got with its `202`.
    pub delivery_id: String,
    /// Arrival (Unix ms).
    pub received_at_ms: u64,
    /// HTTP method.
    pub method: String,
    /// Path and query below the tunnel root.
    pub path: String,
    /// Body bytes.
    pub body_len: u64,
    /// The sender's address.
    pub remote_addr: String,
}

/// `stats` as shown to operators.
pub fn summary(stats: &TunnelStats, online: bool) -> QueueSummary {
    QueueSummary {
        tunnel: stats.tunnel.to_string(),
        count: stats.count,
        bytes: stats.bytes,
        oldest_received_at_ms: stats.oldest_received_at_ms,
        oldest_age_secs: stats
            .oldest_received_at_ms
            .map(|t| now_ms().saturating_sub(t) / 1000),
        online,
    }
}

/// `item` as shown to operators.
pub fn entry(item: &QueuedItem) -> QueueEntry {
    QueueEntry {
        seq: item.seq,
        delivery_id: item.head.delivery_id.to_string(),
        received_at_ms: item.head.received_at_ms,
        method: item.head.method.clone(),
        path: item.head.path.clone(),
        body_len: item.body_len,
        remote_addr: item.head.remote_addr.to_string(),
    }
}

async fn queue_list(State(state): State<AdminState>) -> Json<Vec<QueueSummary>> {
    Json(
        state
            .queue
            .all_stats()
            .iter()
            .map(|s| summary(s, state.routes.lookup(&s.tunnel).is_some()))
            .collect(),
    )
}

#[derive(Deserialize)]
struct ShowQuery {
    limit: Option<usize>,
}

/// Most entries one `show` returns.
const MAX_SHOW: usize = 1000;

async fn queue_show(
    State(state): State<AdminState>,
    Path(tunnel): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Response {
    let tunnel = match tunnel.parse::<TunnelName>() {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_tunnel", e.to_string()),
    };
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_SHOW);
    match state.queue.after(&tunnel, None, limit) {
        Ok(items) => {
            let stats = state.queue.stats(&tunnel);
            Json(json!({
                "summary": summary(&stats, state.routes.lookup(&tunnel).is_some()),
                "entries": items.iter().map(entry).collect::<Vec<_>>(),
            }))
            .into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
    }
}

async fn queue_purge(State(state): State<AdminState>, Path(tunnel): Path<String>) -> Response {
    let tunnel = match tunnel.parse::<TunnelName>() {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_tunnel", e.to_string()),
    };
    // Off the runtime: a purge walks the whole queue (about 6 s for 100,000
    // webhooks), and the relay's one runtime thread serves every tunnel.
    let purging = {
        let (queue, tunnel) = (state.queue.clone(), tunnel.clone());
        tokio::task::spawn_blocking(move || queue.purge(&tunnel))
    };
    let purged = match purging.await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    if let Err(e) = state.queue.sync().await {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string());
    }
    tracing::warn!(%tunnel, purged, "queue purged by an operator");
    Json(json!({ "tunnel": tunnel.to_string(), "purged": purged })).into_response()
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicBool, Ordering},
            mpsc, Mutex,
        },
        time::Duration,
    };

    use bytes::Bytes;
    use futures_util::future::BoxFuture;
    use hookrelay_shared::{protocol::RequestHead, tunnel_name::TunnelName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{
        queue::{QueueError, QueueLimits, SledQueue, Upload},
        routing::LocalRoutes,
    };

    /// A real queue whose purge waits at a gate, so that the test can ask
    /// for something else while one is under way.
    struct GatedPurge {
        inner: SledQueue,
        entered: mpsc::SyncSender<()>,
        gate: Mutex<mpsc::Receiver<()>>,
    }

    impl Queue for GatedPurge {
        fn begin(&self, t: &TunnelName, len: Option<u64>) -> Result<Upload, QueueError> {
            self.inner.begin(t, len)
        }
        fn append(&self, upload: &mut Upload, chunk: &[u8]) -> Result<(), QueueError> {
            self.inner.append(upload, chunk)
        }
        fn commit(&self, upload: Upload, head: RequestHead) -> Result<QueuedItem, QueueError> {
            self.inner.commit(upload, head)
        }
        fn abort(&self, upload: Upload) {
            self.inner.abort(upload);
        }
        fn sync(&self) -> BoxFuture<'_, Result<(), QueueError>> {
            self.inner.sync()
        }
        fn after(
            &self,
            t: &TunnelName,
            after: Option<u64>,
            limit: usize,
        ) -> Result<Vec<QueuedItem>, QueueError> {
            self.inner.after(t, after, limit)
        }
        fn body(
            &self,
            item: &QueuedItem,
        ) -> Box<dyn Iterator<Item = Result<Bytes, QueueError>> + Send> {
            self.inner.body(item)
        }
        fn remove(&self, t: &TunnelName, seq: u64) -> Result<bool, QueueError> {
            self.inner.remove(t, seq)
        }
        fn purge(&self, t: &TunnelName) -> Result<u64, QueueError> {
            let _ = self.entered.send(());
            let _ = self
                .gate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .recv();
            self.inner.purge(t)
        }
        fn stats(&self, t: &TunnelName) -> TunnelStats {
            self.inner.stats(t)
        }
        fn all_stats(&self) -> Vec<TunnelStats> {
            self.inner.all_stats()
        }
        fn changed(&self) -> Arc<tokio::sync::Notify> {
            self.inner.changed()
        }
        fn limits(&self) -> QueueLimits {
            self.inner.limits()
        }
    }

    async fn request(addr: std::net::SocketAddr, method: &str, path: &str) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let head = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        conn.write_all(head.as_bytes()).await.expect("write");
        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.expect("read");
        answer
    }

    /// The relay runs on one thread: a purge done on it stopped every
    /// tunnel and the admin API until it finished. `/healthz` must answer
    /// while a purge is under way (the test's runtime has one thread too).
    #[tokio::test]
    async fn the_relay_answers_while_a_purge_is_under_way() {
        let (entered_tx, entered) = mpsc::sync_channel(1);
        let (release, gate) = mpsc::sync_channel::<()>(1);
        let queue = Arc::new(GatedPurge {
            inner: SledQueue::temporary(QueueLimits::default()).expect("queue"),
            entered: entered_tx,
            gate: Mutex::new(gate),
        });
        let tunnel: TunnelName = "purged".parse().expect("tunnel");
        let mut upload = queue.begin(&tunnel, Some(2)).expect("begin");
        queue.append(&mut upload, b"{}").expect("append");
        queue
            .commit(upload, crate::queue::tests::head(&tunnel, now_ms()))
            .expect("commit");

        let queue: Arc<dyn Queue> = queue;
        let app = router(AdminState {
            routes: Arc::new(LocalRoutes::open(None)),
            metrics: Arc::new(RelayMetrics::new(queue.clone())),
            queue,
            stopping: CancellationToken::new(),
            data_dir: "test".into(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });

        // Whatever happens, the gate opens after 10 s, so that a purge
        // blocking this thread cannot hang the test; it then fails below.
        let (answered, answered_rx) = mpsc::channel::<()>();
        let timed_out = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let timed_out = timed_out.clone();
            let release = release.clone();
            std::thread::spawn(move || {
                if answered_rx.recv_timeout(Duration::from_secs(10)).is_err() {
                    timed_out.store(true, Ordering::SeqCst);
                    let _ = release.send(());
                }
            })
        };
        let purge = tokio::spawn(request(addr, "DELETE", "/api/queue/purged"));
        tokio::task::spawn_blocking(move || entered.recv())
            .await
            .expect("join")
            .expect("the purge started");
        let health = request(addr, "GET", "/healthz").await;
        let _ = answered.send(());
        assert!(
            !timed_out.load(Ordering::SeqCst),
            "/healthz answered only once the purge was let go"
        );
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let _ = release.send(());
        let purged = purge.await.expect("join");
        assert!(purged.starts_with("HTTP/1.1 200"), "{purged}");
        assert!(purged.contains(r#""purged":1"#), "{purged}");
        watchdog.join().expect("watchdog");
    }
}
