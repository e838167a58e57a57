//! Plain HTTP/1.1 client connections (hyper), one per sender, kept alive.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// How long one admin request may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

pub type Conn = SendRequest<Full<Bytes>>;

/// An HTTP/1.1 connection to `addr` with TCP_NODELAY.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    handshake(stream, addr).await
}

/// An HTTP/1.1 connection over `io` (TCP, or TLS over it) to `addr`, its
/// connection task spawned.
pub async fn handshake<I>(io: I, addr: SocketAddr) -> anyhow::Result<Conn>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .with_context(|| format!("HTTP handshake with {addr}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends `request` on `conn`; the status and the whole body.
pub async fn send(
    conn: &mut Conn,
    request: http::Request<Full<Bytes>>,
) -> anyhow::Result<(http::StatusCode, Bytes)> {
    let response = conn.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// `GET http://addr{path}`, expecting 2xx with JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let body = get(addr, path).await?;
    serde_json::from_slice(&body).with_context(|| format!("GET http://{addr}{path}: not JSON"))
}

/// `GET http://addr{path}`, expecting 2xx with text (a `/metrics` page).
pub async fn get_text(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let body = get(addr, path).await?;
    String::from_utf8(body.to_vec()).with_context(|| format!("GET http://{addr}{path}: not UTF-8"))
}

/// `GET http://addr{path}`, expecting 2xx; the body.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Bytes> {
    let fetch = async {
        let mut conn = connect(addr).await?;
        let request = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Full::new(Bytes::new()))?;
        send(&mut conn, request).await
    };
    let (status, body) = tokio::time::timeout(ADMIN_TIMEOUT, fetch)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {ADMIN_TIMEOUT:?}"))
        .and_then(|r| r)
        .with_context(|| format!("GET http://{addr}{path}"))?;
    anyhow::ensure!(
        status.is_success(),
        "GET http://{addr}{path}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok(body)
}
