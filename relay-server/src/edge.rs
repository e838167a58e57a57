//! The public ingress's connection handling: an explicit accept loop with
//! connection caps, HTTP/1 and HTTP/2 limits, TLS for the HTTPS listener, and
//! graceful shutdown.
//!
//! What a hostile sender meets here, on HTTP and HTTPS alike (the
//! request-level checks live in [`crate::ingress`]):
//!
//! - more connections than `max_connections` in total or
//!   `max_connections_per_ip` from one address (counted across the HTTP and
//!   HTTPS listeners): the connection is accepted, answered with a bare `503`
//!   (`Retry-After: 1`, `Connection: close`; over TLS nothing) and closed at
//!   once, without reading from it;
//! - a connection that sends nothing (or, over TLS, does not finish its
//!   handshake, or only part of the HTTP/2 preface) within `header_timeout`:
//!   closed;
//! - an HTTP/1 request head not complete within `header_timeout` (counted
//!   again for every request on a kept-alive connection): closed by hyper;
//! - an HTTP/2 connection with no request in progress for `header_timeout`:
//!   closed (`GOAWAY`), as hyper does not time those out;
//! - an HTTP/1 request with both `Content-Length` and `Transfer-Encoding`:
//!   marked by [`crate::framing`] on its way in, refused with `400` by the
//!   ingress, and the connection closed;
//! - a request head over [`MAX_HEAD_BYTES`] or with more than [`MAX_HEADERS`]
//!   header lines: `431` from hyper, then closed;
//! - a sender that stops reading its answer (HTTP/1: its socket's buffers
//!   full) for `write_timeout`: the connection is closed, which stops the
//!   delivery's stream and frees the agent's connection to the local app;
//! - more than [`MAX_CONCURRENT_STREAMS`] HTTP/2 streams at once: the limit is
//!   advertised in SETTINGS; streams beyond it are refused (`REFUSED_STREAM`).

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{extract::ConnectInfo, Router};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use crate::{
    framing::{Ambiguity, AmbiguousFraming, Scanner},
    ingress::ServerName,
    tls::ACME_TLS_ALPN,
};

/// Largest HTTP/1 request head (request line and headers) and largest HTTP/2
/// header list, in bytes. For HTTP/1 it is also the most hyper buffers per
/// connection while a body streams in: at 64 KiB, 1,000 uploads in flight took
/// the relay to 190 MiB, at 16 KiB to 86 MiB (`hookrelay-bench memory`). 16 KiB
/// is Node.js's default limit too; webhook heads are 1-3 KiB.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Most header lines in one HTTP/1 request: hyper's default, which it answers
/// with `431` above (not set explicitly, see [`builder`]); the ingress applies
/// the same cap to HTTP/2 requests.
pub const MAX_HEADERS: usize = 100;

/// Most HTTP/2 streams open at once on one connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// Connections over a cap answered and closed gracefully at once (see
/// [`refuse`]); more are answered and closed at once, within the open-files
/// limit's reserve.
const MAX_LINGERING: usize = 64;

/// How long a connection over a cap may take to end after its `503`.
const OVER_CAP_LINGER: Duration = Duration::from_secs(1);

/// What of its request is read and dropped, at most, after the `503`: more
/// than a webhook's head and a small body.
const OVER_CAP_DRAIN: usize = 64 * 1024;

/// What a connection over a cap gets before it is closed.
const OVER_CAP_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// The HTTP/2 connection preface, to tell a slow preface from a slow request.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connection-level limits of the ingress.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EdgeLimits {
    pub header_timeout: Duration,
    /// Longest a write to the sender may stay blocked (the body timeout).
    pub write_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
}

/// Open connections, in total and per remote address.
struct Counts {
    limits: EdgeLimits,
    inner: Mutex<CountsInner>,
    /// Connections over a cap being closed by [`refuse`].
    lingering: AtomicUsize,
}

#[derive(Default)]
struct CountsInner {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl Counts {
    /// A slot for a connection from `ip`, or `None` over a cap.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let from_ip = inner.per_ip.get(&ip).copied().unwrap_or(0);
        if inner.total >= self.limits.max_connections
            || from_ip >= self.limits.max_connections_per_ip
        {
            return None;
        }
        inner.total += 1;
        inner.per_ip.insert(ip, from_ip + 1);
        Some(Slot {
            counts: self.clone(),
            ip,
        })
    }

    /// Room for one more connection over a cap to be closed gracefully.
    fn linger(self: &Arc<Self>) -> Option<Lingering> {
        self.lingering
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_LINGERING).then_some(n + 1)
            })
            .ok()
            .map(|_| Lingering(self.clone()))
    }
}

/// One connection over a cap being closed; counted until dropped.
struct Lingering(Arc<Counts>);

impl Drop for Lingering {
    fn drop(&mut self) {
        self.0.lingering.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Answers a connection over a cap with `503` and ends it gracefully: the
/// answer, then the end of this side, then what the sender writes is read
/// and dropped until it closes (at most [`OVER_CAP_DRAIN`] bytes and
/// [`OVER_CAP_LINGER`]). A sender writes its request without waiting for an
/// answer, and a socket closed with unread bytes ends in a reset, which the
/// sender's TCP may report instead of the `503` it carried.
async fn refuse(mut tcp: TcpStream, _lingering: Lingering) {
    // Never waiting: a fresh socket's send buffer is empty.
    let _ = tcp.try_write(OVER_CAP_RESPONSE);
    let _ = tokio::time::timeout(OVER_CAP_LINGER, async {
        let _ = tcp.shutdown().await;
        let mut sink = [0u8; 4096];
        let mut left = OVER_CAP_DRAIN;
        while left > 0 {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// One admitted connection; gives its slot back when dropped.
struct Slot {
    counts: Arc<Counts>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.counts.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.total = inner.total.saturating_sub(1);
        if let Some(n) = inner.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.per_ip.remove(&self.ip);
            }
        }
    }
}

fn builder(limits: EdgeLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Without a timer hyper silently ignores the header read timeout.
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    // hyper's own limit is MAX_HEADERS (100, `tests/hostile.rs` sends 101),
    // kept on stack arrays it leaves uninitialised; `.max_headers(100)` made it
    // fill two heap arrays of 100 before every parse (~1,700 instructions per
    // request in callgrind).
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEAD_BYTES as u32);
    builder
}

/// The ingress's connection handling, shared by its HTTP and HTTPS listeners:
/// one set of connection caps across both. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Edge {
    limits: EdgeLimits,
    counts: Arc<Counts>,
    builder: Arc<auto::Builder<TokioExecutor>>,
}

impl Edge {
    pub(crate) fn new(limits: EdgeLimits) -> Self {
        Edge {
            limits,
            counts: Arc::new(Counts {
                limits,
                inner: Mutex::default(),
                lingering: AtomicUsize::new(0),
            }),
            builder: Arc::new(builder(limits)),
        }
    }

    /// Serves `app` on `listener` until `stop` is cancelled, then lets every
    /// open connection finish its requests in flight (idle ones close at once)
    /// and returns when the last one is gone. With `tls`, every connection
    /// starts with a TLS handshake (inside the header timeout); one that
    /// negotiates `acme-tls/1` is an ACME challenge and is closed after the
    /// handshake.
    pub(crate) async fn serve(
        self,
        listener: TcpListener,
        app: Router,
        tls: Option<TlsAcceptor>,
        stop: CancellationToken,
    ) {
        let connections = TaskTracker::new();
        loop {
            let (tcp, remote) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        accept_error(err).await;
                        continue;
                    }
                },
            };
            let Some(slot) = self.counts.admit(remote.ip()) else {
                debug!(%remote, "connection over the cap; refused");
                if tls.is_none() {
                    if let Some(lingering) = self.counts.linger() {
                        tokio::spawn(refuse(tcp, lingering));
                        continue;
                    }
                    // Best effort and never waiting: a fresh socket's send
                    // buffer is empty. (A TLS client could not read it.)
                    // What has arrived is read first (see [`refuse`]).
                    let mut sink = [0u8; 4096];
                    for _ in 0..OVER_CAP_DRAIN / sink.len() {
                        if !matches!(tcp.try_read(&mut sink), Ok(n) if n > 0) {
                            break;
                        }
                    }
                    let _ = tcp.try_write(OVER_CAP_RESPONSE);
                }
                drop(tcp);
                continue;
            };
            // Webhook responses are small writes; Nagle would hold them back.
            let _ = tcp.set_nodelay(true);
            connections.spawn(connection(
                tcp,
                remote,
                app.clone(),
                self.builder.clone(),
                self.limits,
                tls.clone(),
                stop.clone(),
                slot,
            ));
        }
        drop(listener);
        connections.close();
        connections.wait().await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    tcp: TcpStream,
    remote: SocketAddr,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: EdgeLimits,
    tls: Option<TlsAcceptor>,
    stop: CancellationToken,
    _slot: Slot,
) {
    let header_timeout = limits.header_timeout;
    let Some(tls) = tls else {
        // hyper's header timeout starts once it knows the protocol; until then
        // (nothing sent, or a partial HTTP/2 preface) this one applies.
        let started = tokio::select! {
            () = stop.cancelled() => return,
            started = tokio::time::timeout(header_timeout, protocol_known(&tcp)) => started,
        };
        if !matches!(started, Ok(true)) {
            debug!(%remote, "connection closed before its first request");
            return;
        }
        serve_http(tcp, remote, None, app, &builder, limits, stop).await;
        return;
    };
    // The handshake and the first bytes of HTTP share the header timeout, so a
    // slow handshake holds a connection slot no longer than a slow head.
    let opened = tokio::select! {
        () = stop.cancelled() => return,
        opened = tokio::time::timeout(header_timeout, open_tls(tls, tcp)) => opened,
    };
    match opened {
        Ok(Ok(Opened::Http(stream))) => {
            let sni = stream.inner.get_ref().1.server_name().map(Arc::from);
            serve_http(stream, remote, sni, app, &builder, limits, stop).await;
        }
        Ok(Ok(Opened::AcmeChallenge)) => debug!(%remote, "answered an ACME TLS-ALPN-01 challenge"),
        Ok(Err(err)) => {
            debug!(%remote, error = %err, "TLS connection closed before its first request")
        }
        Err(_) => debug!(%remote, "TLS handshake or first request too slow; closed"),
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_http<S>(
    stream: S,
    remote: SocketAddr,
    sni: Option<Arc<str>>,
    app: Router,
    builder: &auto::Builder<TokioExecutor>,
    limits: EdgeLimits,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ambiguity = Arc::new(Ambiguity::default());
    let io = TokioIo::new(Guarded {
        inner: stream,
        scanner: Scanner::new(ambiguity.clone()),
        write_limit: limits.write_timeout,
        blocked: None,
    });
    let idle = Arc::new(Idle::new());
    let in_service = idle.clone();
    let service = TowerToHyperService::new(app);
    let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(remote));
        if let Some(sni) = &sni {
            req.extensions_mut().insert(ServerName(sni.clone()));
        }
        if req.version() < http::Version::HTTP_2 && ambiguity.next_request_is_ambiguous() {
            req.extensions_mut().insert(AmbiguousFraming);
        }
        // Open from here until hyper drops the answer's body (sent or not).
        let open = in_service.open();
        let answered = hyper::service::Service::call(&service, req);
        async move {
            let resp = answered.await?;
            Ok::<_, std::convert::Infallible>(resp.map(|body| Held { body, _open: open }))
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let served = tokio::select! {
        served = conn.as_mut() => served,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        // HTTP/1 connections idle between requests are closed by hyper's
        // header timeout; HTTP/2 ones have no such limit of their own and
        // would hold a connection slot for ever.
        () = idle.for_longer_than(limits.header_timeout) => {
            debug!(%remote, "connection idle for the header timeout; closed");
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = served {
        debug!(%remote, error = %err, "connection ended with an error");
    }
}

/// A connection's requests in progress, and since when it has had none.
struct Idle {
    started: std::time::Instant,
    open: std::sync::atomic::AtomicUsize,
    /// When the last request ended, in ms after `started`.
    quiet_since_ms: std::sync::atomic::AtomicU64,
}

impl Idle {
    fn new() -> Self {
        Idle {
            started: std::time::Instant::now(),
            open: 0.into(),
            quiet_since_ms: 0.into(),
        }
    }

    fn open(self: &Arc<Self>) -> Open {
        self.open.fetch_add(1, Ordering::AcqRel);
        Open(self.clone())
    }

    /// Returns once the connection has had no request in progress for `limit`.
    async fn for_longer_than(&self, limit: Duration) {
        loop {
            let wait = if self.open.load(Ordering::Acquire) > 0 {
                limit
            } else {
                let since = Duration::from_millis(self.quiet_since_ms.load(Ordering::Acquire));
                let quiet = self.started.elapsed().saturating_sub(since);
                match limit.checked_sub(quiet) {
                    Some(left) if !left.is_zero() => left,
                    _ => return,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// One request in progress on a connection.
struct Open(Arc<Idle>);

impl Drop for Open {
    fn drop(&mut self) {
        let now = self.0.started.elapsed().as_millis() as u64;
        self.0.quiet_since_ms.store(now, Ordering::Release);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body that keeps its request counted as open.
struct Held<B> {
    body: B,
    _open: Open,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// What a TLS connection turned out to be.
enum Opened {
    /// A sender's: HTTP follows, its first bytes already read.
    Http(Box<Prefixed<TlsStream<TcpStream>>>),
    /// The CA validating a TLS-ALPN-01 challenge: the handshake was the answer.
    AcmeChallenge,
}

/// Completes the TLS handshake, then reads until the peer has sent enough to
/// tell HTTP/1 from HTTP/2 (what [`protocol_known`] does with a peek on plain
/// TCP), and hands hyper those bytes again.
async fn open_tls(tls: TlsAcceptor, tcp: TcpStream) -> io::Result<Opened> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tls.accept(tcp).await?;
    if stream.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
        let _ = stream.shutdown().await;
        return Ok(Opened::AcmeChallenge);
    }
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        len += n;
        if len == buf.len() || buf[..len] != H2_PREFACE[..len] {
            break;
        }
    }
    Ok(Opened::Http(Box::new(Prefixed {
        prefix: buf,
        len,
        pos: 0,
        inner: stream,
    })))
}

/// A stream whose first `len` bytes were already read into `prefix`: reads
/// return those first, then the stream's own.
struct Prefixed<S> {
    prefix: [u8; H2_PREFACE.len()],
    len: usize,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.len {
            let n = (self.len - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection as hyper sees it: what it reads also goes through the
/// framing [`Scanner`], and its writes may stay blocked for `write_limit` at
/// most (a sender that does not read its answer); then they fail, and hyper
/// drops the connection with the answer's body, whose stream to the agent
/// stops.
struct Guarded<S> {
    inner: S,
    scanner: Scanner,
    write_limit: Duration,
    /// Since when writes have been blocked (allocated only then).
    blocked: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Guarded<S> {
    /// Passes `polled` on, and keeps count of how long writes are blocked.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        use std::future::Future;
        if polled.is_ready() {
            self.blocked = None;
            return polled;
        }
        let limit = self.write_limit;
        let sleep = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if sleep.as_mut().poll(cx).is_ready() {
            self.blocked = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the sender read nothing of its answer for the write timeout",
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.scanner.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

/// Waits until the peer has sent enough to tell HTTP/1 from HTTP/2: one byte
/// that is not the start of the HTTP/2 preface, or the whole preface. `false`
/// when the peer closes first.
async fn protocol_known(tcp: &TcpStream) -> bool {
    let mut buf = [0u8; 24];
    loop {
        let n = match tcp.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        if n >= H2_PREFACE.len() || buf[..n] != H2_PREFACE[..n] {
            return true;
        }
        // A partial preface: peek returns at once while nothing new arrives.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Per-connection accept errors are skipped; others (out of file descriptors)
/// are logged and waited out briefly rather than spun on.
async fn accept_error(err: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    warn!(
        error = &err as &dyn std::error::Error,
        "ingress cannot accept"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_ip_and_in_total() {
        let counts = Arc::new(Counts {
            limits: EdgeLimits {
                header_timeout: Duration::from_secs(1),
                write_timeout: Duration::from_secs(1),
                max_connections: 3,
                max_connections_per_ip: 2,
            },
            inner: Mutex::default(),
            lingering: AtomicUsize::new(0),
        });
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let a1 = counts.admit(a).expect("first from a");
        let _a2 = counts.admit(a).expect("second from a");
        assert!(counts.admit(a).is_none(), "per-ip cap");
        let _b1 = counts.admit(b).expect("first from b");
        assert!(counts.admit(b).is_none(), "total cap");
        drop(a1);
        assert!(counts.admit(b).is_some(), "slot given back");

        let lingering: Vec<Lingering> = (0..MAX_LINGERING)
            .map(|_| counts.linger().expect("room to linger"))
            .collect();
        assert!(counts.linger().is_none(), "lingering cap");
        drop(lingering);
        assert!(counts.linger().is_some(), "lingering counted down");
    }

    #[tokio::test]
    async fn prefixed_stream_reads_the_prefix_then_the_rest() {
        use tokio::io::AsyncWriteExt;
        let (mut far, near) = tokio::io::duplex(64);
        let mut prefix = [0u8; H2_PREFACE.len()];
        prefix[..3].copy_from_slice(b"POS");
        let mut stream = Prefixed {
            prefix,
            len: 3,
            pos: 0,
            inner: near,
        };
        far.write_all(b"T / HTTP/1.1\r\n").await.expect("write");
        drop(far);
        let mut read = String::new();
        stream.read_to_string(&mut read).await.expect("read");
        assert_eq!(read, "POST / HTTP/1.1\r\n");
    }
}
