//! The agent's local inspector: status API and web UI on a loopback address.
//!
//! Webhook content is attacker-controlled and this server can act on the
//! developer's machine, so it refuses any request whose `Host` or `Origin` is
//! not a loopback name: a DNS-rebinding page or a cross-site form cannot use it.

use std::net::IpAddr;

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use hookrelay_shared::TunnelName;
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::agent::Status;

/// Strict policy: only our own scripts, styles and API.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What the inspector shows.
#[derive(Clone)]
pub(crate) struct InspectorState {
    pub status: watch::Receiver<Status>,
    pub tunnel: TunnelName,
}

pub(crate) fn router(state: InspectorState) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/api/status", get(status))
        .fallback(asset)
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

async fn status(State(state): State<InspectorState>) -> Json<serde_json::Value> {
    let status = state.status.borrow().clone();
    let mut body = serde_json::to_value(&status).unwrap_or_else(|_| json!({}));
    if let Some(obj) = body.as_object_mut() {
        obj.insert("tunnel".into(), json!(state.tunnel.as_str()));
    }
    Json(body)
}

async fn asset(req: Request) -> Response {
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
        None => (StatusCode::NOT_FOUND, Json(json!({ "error": "not_found" }))).into_response(),
    }
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
