//! The agent's local inspector: status API and web UI on a loopback address.
//!
//! Webhook content is attacker-controlled and this server can act on the
//! developer's machine, so it refuses any request whose `Host` or `Origin` is
//! not a loopback name: a DNS-rebinding page or a cross-site form cannot use it.

use std::{net::IpAddr, path::PathBuf, sync::Arc};

use axum::{
    extract::{
        ws::{Message, WebSocket, WebSocketUpgrade},
        Path, Query, Request, State,
    },
    http::{header, HeaderMap, HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use hookrelay_shared::{TunnelName, TunnelSettings};
use serde::Deserialize;
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{
    agent::Status,
    export::{self, ExchangeDetail, Format, Redaction},
    history::{ExchangeId, Filter, History, HistoryError},
    metrics::AgentMetrics,
    queued::Outbox,
    replay::{ReplayError, ReplayOptions, Replayer},
};

/// Strict policy: only our own scripts, styles and API.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Default page size of `GET /api/exchanges`.
const DEFAULT_PAGE: usize = 50;

/// What the inspector shows and acts on.
#[derive(Clone)]
pub(crate) struct InspectorState {
    pub status: watch::Receiver<Status>,
    pub tunnel: TunnelName,
    pub history: History,
    pub replayer: Replayer,
    pub data_dir: PathBuf,
    pub target: String,
    /// Queued webhooks waiting for the app.
    pub outbox: Outbox,
    /// The delivery settings the agent asked for.
    pub settings: TunnelSettings,
    /// Served at `/metrics`.
    pub metrics: Arc<AgentMetrics>,
    /// Headers exports redact besides the built-in credentials.
    pub redaction: Redaction,
}

/// Largest request body the API takes.
const MAX_API_BODY: usize = 64 * 1024 * 1024;

pub(crate) fn router(state: InspectorState) -> Router {
    Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/api/status", get(status))
        .route("/api/exchanges", get(list).delete(clear))
        .route("/api/exchanges/{id}", get(show).delete(delete))
        .route("/api/exchanges/{id}/replay", post(replay_one))
        .route("/api/exchanges/{id}/export", get(export_one))
        .route("/api/replay", post(replay_many))
        .route("/api/live", get(live))
        .fallback(asset)
        // Edited replays carry whole bodies (base64 in JSON): room for the
        // relay's 25 MiB limit and then some.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_API_BODY))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn(loopback_only))
        .with_state(state)
}

pub(crate) async fn serve(
    listener: TcpListener,
    state: InspectorState,
    shutdown: CancellationToken,
) {
    if let Err(err) = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = &err as &dyn std::error::Error, "inspector failed");
    }
}

fn status_json(state: &InspectorState) -> serde_json::Value {
    let status = state.status.borrow().clone();
    let mut body = serde_json::to_value(&status).unwrap_or_else(|_| json!({}));
    if let Some(obj) = body.as_object_mut() {
        obj.insert("tunnel".into(), json!(state.tunnel.as_str()));
        obj.insert("target".into(), json!(state.target));
        obj.insert(
            "data_dir".into(),
            json!(state.data_dir.display().to_string()),
        );
        obj.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
        obj.insert("mode".into(), json!(state.settings.mode.to_string()));
        obj.insert(
            "when_offline".into(),
            json!(state.settings.when_offline.to_string()),
        );
        obj.insert("queued_waiting".into(), json!(state.outbox.len()));
    }
    body
}

/// Ready while the tunnel is held at the relay: a supervisor or load check
/// sees a disconnected agent as not ready (503).
async fn readyz(State(state): State<InspectorState>) -> Response {
    let connected = matches!(*state.status.borrow(), Status::Connected { .. });
    let body = Json(status_json(&state));
    if connected {
        body.into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(state): State<InspectorState>) -> Response {
    let connected = matches!(*state.status.borrow(), Status::Connected { .. });
    // A few stat calls: off the agent's one thread like other store reads.
    let outbox = state.outbox.clone();
    let (history, outbox_bytes) = state
        .history
        .off_runtime(move |h| Ok((h.figures(), outbox.file_bytes())))
        .await
        .unwrap_or_default();
    let text = state.metrics.render(
        connected,
        state.outbox.len(),
        state.outbox.repeats(),
        history,
        outbox_bytes,
    );
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn status(State(state): State<InspectorState>) -> Json<serde_json::Value> {
    Json(status_json(&state))
}

/// Query string of `GET /api/exchanges`: the filters plus paging.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ListQuery {
    limit: Option<usize>,
    before: Option<String>,
    method: Option<String>,
    path: Option<String>,
    status: Option<String>,
    q: Option<String>,
    header: Option<String>,
    since: Option<String>,
    until: Option<String>,
    tunnel: Option<String>,
}

impl ListQuery {
    fn filter(&self) -> Result<Filter, ApiError> {
        let time = |v: &Option<String>, name: &str| -> Result<Option<u64>, ApiError> {
            v.as_deref()
                .filter(|s| !s.is_empty())
                .map(|s| {
                    crate::commands::parse_time(s)
                        .map_err(|e| ApiError::bad(format!("{name}: {e}")))
                })
                .transpose()
        };
        let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        Ok(Filter {
            method: nonempty(&self.method),
            path: nonempty(&self.path),
            status: nonempty(&self.status),
            q: nonempty(&self.q),
            header: nonempty(&self.header),
            since: time(&self.since, "since")?,
            until: time(&self.until, "until")?,
            tunnel: nonempty(&self.tunnel),
        })
    }
}

fn parse_id(id: &str) -> Result<ExchangeId, ApiError> {
    id.parse().map_err(ApiError::from)
}

async fn list(
    State(state): State<InspectorState>,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let filter = query.filter()?;
    let before = query
        .before
        .as_deref()
        .filter(|b| !b.is_empty())
        .map(parse_id)
        .transpose()?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    let page = state
        .history
        .off_runtime(move |h| h.list(&filter, before, limit))
        .await?;
    Ok(Json(page).into_response())
}

async fn show(
    State(state): State<InspectorState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let detail = state
        .history
        .off_runtime(move |h| ExchangeDetail::load(h, h.get(id)?))
        .await?;
    Ok(Json(detail).into_response())
}

async fn delete(
    State(state): State<InspectorState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    if !state.history.off_runtime(move |h| h.delete(id)).await? {
        return Err(HistoryError::NotFound(id).into());
    }
    // Gone from the disk too (its body zeroed) once this answers.
    state.history.flush().await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn clear(State(state): State<InspectorState>) -> Result<Response, ApiError> {
    state.history.off_runtime(|h| h.clear()).await?;
    // The body segments go too before this answers.
    state.history.flush_and_delete().await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn replay_one(
    State(state): State<InspectorState>,
    Path(id): Path<String>,
    body: Option<Json<ReplayOptions>>,
) -> Result<Response, ApiError> {
    let options = body.map(|Json(o)| o).unwrap_or_default();
    let exchange = state.replayer.replay(parse_id(&id)?, &options).await?;
    Ok((StatusCode::CREATED, Json(exchange)).into_response())
}

/// Body of `POST /api/replay`: which exchanges (ids, or a filter) and how.
/// The filter takes the list's query parameters (times as Unix seconds or
/// milliseconds, RFC 3339, a date or an age such as `2h`).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct BulkReplay {
    ids: Vec<String>,
    filter: Option<BulkFilter>,
    options: ReplayOptions,
}

/// [`ListQuery`]'s filters in JSON, where times may also be numbers.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct BulkFilter {
    method: Option<String>,
    path: Option<String>,
    status: Option<String>,
    q: Option<String>,
    header: Option<String>,
    since: Option<TimeArg>,
    until: Option<TimeArg>,
    tunnel: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum TimeArg {
    Number(u64),
    Text(String),
}

impl BulkFilter {
    fn filter(self) -> Result<Filter, ApiError> {
        let text = |t: Option<TimeArg>| {
            t.map(|t| match t {
                TimeArg::Number(n) => n.to_string(),
                TimeArg::Text(s) => s,
            })
        };
        let query = ListQuery {
            method: self.method,
            path: self.path,
            status: self.status,
            q: self.q,
            header: self.header,
            since: text(self.since),
            until: text(self.until),
            tunnel: self.tunnel,
            ..ListQuery::default()
        };
        let filter = query.filter()?;
        if filter == Filter::default() {
            return Err(ApiError::bad(
                "an empty filter would replay everything; give at least one filter or `ids`".into(),
            ));
        }
        Ok(filter)
    }
}

async fn replay_many(
    State(state): State<InspectorState>,
    Json(bulk): Json<BulkReplay>,
) -> Result<Response, ApiError> {
    let results = match (bulk.filter, bulk.ids.is_empty()) {
        (Some(filter), true) => {
            state
                .replayer
                .replay_matching(&filter.filter()?, &bulk.options)
                .await?
        }
        (None, false) => {
            let mut out = Vec::new();
            for id in &bulk.ids {
                out.push(match parse_id(id) {
                    Ok(id) => state.replayer.replay(id, &bulk.options).await,
                    Err(_) => Err(ReplayError::History(HistoryError::BadId(id.clone()))),
                });
            }
            out
        }
        _ => return Err(ApiError::bad("give either `ids` or `filter`".into())),
    };
    let results: Vec<serde_json::Value> = results
        .into_iter()
        .map(|r| match r {
            Ok(e) => json!({ "ok": true, "exchange": e }),
            Err(e) => json!({ "ok": false, "error": e.to_string() }),
        })
        .collect();
    Ok(Json(json!({ "results": results })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExportQuery {
    format: Format,
    /// Keep credentials instead of `[redacted]`.
    #[serde(default)]
    secrets: bool,
    /// More header names to redact, comma-separated, on top of the agent's.
    #[serde(default)]
    redact: Option<String>,
}

async fn export_one(
    State(state): State<InspectorState>,
    Path(id): Path<String>,
    Query(query): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let extra = query
        .redact
        .iter()
        .flat_map(|names| names.split(','))
        .filter(|name| !name.trim().is_empty())
        .map(export::parse_header_name)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::bad)?;
    let redaction = state.redaction.clone().with(extra);
    let exchange_id = parse_id(&id)?;
    let detail = state
        .history
        .off_runtime(move |h| ExchangeDetail::load(h, h.get(exchange_id)?))
        .await?;
    let (content_type, disposition) = match query.format {
        Format::Curl => ("text/plain; charset=utf-8", None),
        Format::Har => (
            "application/json",
            Some(format!("attachment; filename=\"{id}.har\"")),
        ),
        Format::Json => ("application/json", None),
    };
    let mut resp = export::render(&detail, query.format, query.secrets, &redaction).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(d) = disposition.and_then(|d| HeaderValue::from_str(&d).ok()) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, d);
    }
    Ok(resp)
}

/// `GET /api/live`: a WebSocket that pushes `{"type":"status",…}` now and on
/// every change, and `{"type":"exchange","exchange":…}` as each completes.
async fn live(State(state): State<InspectorState>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| live_session(socket, state))
}

async fn live_session(mut socket: WebSocket, state: InspectorState) {
    // Subscribe first, so nothing falls between the snapshot and the feed.
    let mut events = state.history.subscribe();
    let mut status = state.status.clone();
    // The snapshot below is this version: only later changes are news.
    status.mark_unchanged();
    let hello = json!({ "type": "status", "status": status_json(&state) });
    if socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    loop {
        let msg = tokio::select! {
            event = events.recv() => match event {
                Ok(event) => serde_json::to_value(&event).unwrap_or_default(),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => json!({ "type": "lagged", "missed": n }),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            changed = status.changed() => match changed {
                Ok(()) => json!({ "type": "status", "status": status_json(&state) }),
                Err(_) => break,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => continue,
            },
        };
        if socket
            .send(Message::Text(msg.to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
}

/// An API failure as JSON.
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn bad(message: String) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message,
        }
    }
}

impl From<HistoryError> for ApiError {
    fn from(e: HistoryError) -> Self {
        let (status, code) = match &e {
            HistoryError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            HistoryError::BadId(_) => (StatusCode::BAD_REQUEST, "bad_id"),
            HistoryError::Locked(_) | HistoryError::Storage(_) | HistoryError::TooNew { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "storage")
            }
        };
        ApiError {
            status,
            code,
            message: e.to_string(),
        }
    }
}

impl From<ReplayError> for ApiError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::History(h) => h.into(),
            other => ApiError::bad(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": self.code, "message": self.message })),
        )
            .into_response()
    }
}

async fn asset(req: Request) -> Response {
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        let mut resp = (
            StatusCode::METHOD_NOT_ALLOWED,
            Json(json!({ "error": "method_not_allowed", "message": "the page is read-only" })),
        )
            .into_response();
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match hookrelay_web_ui::asset(req.uri().path()) {
        Some(a) => {
            let mut resp = a.bytes.into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(a.content_type),
            );
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            );
            h.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            resp
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "not_found", "message": format!("nothing at {}", req.uri().path()) })),
        )
            .into_response(),
    }
}

/// Gives every error the API's JSON shape, including those axum produces
/// itself (bad query strings, malformed or mistyped JSON, wrong methods).
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let allow = resp.headers().get(header::ALLOW).cloned();
    let body = axum::body::to_bytes(resp.into_body(), 16 * 1024)
        .await
        .unwrap_or_default();
    let mut message = String::from_utf8_lossy(&body).trim().to_owned();
    if message.is_empty() {
        message = status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_owned();
    }
    let mut out = (status, Json(json!({ "error": code, "message": message }))).into_response();
    if let Some(allow) = allow {
        out.headers_mut().insert(header::ALLOW, allow);
    }
    out
}

async fn loopback_only(req: Request, next: Next) -> Response {
    if !host_is_loopback(req.headers()) || !origin_is_loopback(req.headers()) {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({
                "error": "forbidden_host",
                "message": "the inspector only answers requests addressed to localhost"
            })),
        )
            .into_response();
    }
    next.run(req).await
}

fn is_loopback_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(&host);
    host == "localhost"
        || host.ends_with(".localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn split_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.split_inclusive(']').next().unwrap_or(authority);
    }
    authority
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(authority)
}

fn host_is_loopback(headers: &HeaderMap) -> bool {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| is_loopback_name(split_port(h)))
}

fn origin_is_loopback(headers: &HeaderMap) -> bool {
    match headers.get(header::ORIGIN).map(|o| o.to_str()) {
        None => true,
        Some(Ok(origin)) => origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|rest| is_loopback_name(split_port(rest.trim_end_matches('/')))),
        Some(Err(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).expect("valid"));
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).expect("valid"));
        }
        h
    }

    #[test]
    fn only_loopback_hosts_and_origins_pass() {
        for ok in [
            "127.0.0.1:4040",
            "localhost:4040",
            "[::1]:4040",
            "localhost",
            "app.localhost:1",
        ] {
            assert!(host_is_loopback(&headers(ok, None)), "{ok}");
        }
        for bad in [
            "evil.example:4040",
            "127.0.0.1.evil.example",
            "10.0.0.1:4040",
            "localhost.evil.com",
        ] {
            assert!(!host_is_loopback(&headers(bad, None)), "{bad}");
        }
        assert!(origin_is_loopback(&headers(
            "x",
            Some("http://127.0.0.1:4040")
        )));
        assert!(!origin_is_loopback(&headers(
            "x",
            Some("http://evil.example")
        )));
        assert!(!origin_is_loopback(&headers("x", Some("null"))));
    }
}
