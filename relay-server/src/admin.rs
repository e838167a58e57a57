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
    let purged = match state.queue.purge(&tunnel) {
        Ok(n) => n,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
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
