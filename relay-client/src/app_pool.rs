//! Keep-alive HTTP/1.1 connections to the one local app a forwarder serves.
//!
//! hyper-util's pooled client keys its pool by scheme and authority (hashed
//! with SipHash three times per request), races each checkout against a new
//! connection and spawns a task per request to put the connection back. An
//! agent forwards to one app, so a stack of idle connections does the same
//! job with none of that. What the pooled client did is kept: connections
//! are made by hyper-util's `HttpConnector` (`TCP_NODELAY`, a 5 s connect
//! timeout, each address the name resolves to in turn), at most
//! [`MAX_IDLE`] idle ones are kept for [`IDLE_TIMEOUT`], the most recently
//! used first, a request without `Host` gets the app's, and a request that a
//! reused connection turned away unsent (the app had closed it) goes out
//! again on another one.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header::HOST, HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

use crate::{config::Target, forward::RelayBody};

/// Idle keep-alive connections kept to the local app.
pub(crate) const MAX_IDLE: usize = 64;

/// How long an idle connection is kept before it is closed.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long connecting to the app may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How connections to the app are made, for deliveries and replays alike.
pub(crate) fn connector() -> HttpConnector {
    let mut connector = HttpConnector::new();
    // Webhook bodies and answers are small writes: Nagle would delay them.
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector
}

/// Why a request did not get an answer from the app.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection could be made: nothing reached the app.
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The connection broke, or the app's answer was not HTTP.
    Http(hyper::Error),
}

/// The keep-alive connections to one app. Clones share them.
#[derive(Clone)]
pub(crate) struct AppPool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: HttpConnector,
    /// `http://host:port/`: what the connector resolves and connects to.
    uri: Uri,
    /// `Host` for requests that come without one.
    host: HeaderValue,
    /// Newest at the back.
    idle: Mutex<VecDeque<Idle>>,
}

struct Idle {
    sender: SendRequest<RelayBody>,
    since: Instant,
}

impl AppPool {
    /// # Errors
    /// A message when the target's authority is not one a URI can hold.
    pub(crate) fn new(target: &Target) -> Result<Self, String> {
        let uri: Uri = ["http://", &target.authority, "/"]
            .concat()
            .parse()
            .map_err(|e| format!("{target} is not a URL hyper accepts: {e}"))?;
        let host = match (uri.host(), uri.port_u16()) {
            (Some(host), Some(port)) if port != 80 => {
                HeaderValue::try_from(format!("{host}:{port}"))
            }
            (Some(host), _) => HeaderValue::try_from(host),
            (None, _) => return Err(format!("{target} names no host")),
        }
        .map_err(|e| format!("{target}: {e}"))?;
        let shared = Arc::new(Shared {
            connector: connector(),
            uri,
            host,
            idle: Mutex::new(VecDeque::new()),
        });
        // Idle connections the app keeps open are closed once expired, also
        // when no request comes to find them so.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&shared)));
        }
        Ok(AppPool { shared })
    }

    /// Sends `request` (its URI in origin form: path and query) on an idle
    /// connection, or a new one when none is left.
    pub(crate) async fn send(
        &self,
        request: Request<RelayBody>,
    ) -> Result<Response<AppBody>, SendError> {
        let kept = self.checkout();
        self.send_on(kept, request).await
    }

    /// [`send`](Self::send), trying the kept connection `kept` first.
    async fn send_on(
        &self,
        mut kept: Option<SendRequest<RelayBody>>,
        mut request: Request<RelayBody>,
    ) -> Result<Response<AppBody>, SendError> {
        if !request.headers().contains_key(HOST) {
            request.headers_mut().insert(HOST, self.shared.host.clone());
        }
        loop {
            let (mut sender, reused) = match kept.take().or_else(|| self.checkout()) {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let pool = Arc::downgrade(&self.shared);
                    return Ok(response.map(|body| AppBody {
                        body,
                        release: Some(Release { sender, pool }),
                    }));
                }
                Err(mut err) => match err.take_message() {
                    // The app closed a kept connection as it was taken: the
                    // request was not written, so it may go on another.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Http(err.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<SendRequest<RelayBody>> {
        let mut idle = self.shared.lock();
        while let Some(Idle { sender, since }) = idle.pop_back() {
            if sender.is_ready() && since.elapsed() < IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<RelayBody>, SendError> {
        let mut connector = self.shared.connector.clone();
        let stream = connector
            .call(self.shared.uri.clone())
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(stream)
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            // Its end (the app closed it, or it broke) shows in the sender.
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// Connections kept idle now (for tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.shared.lock().len()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a connection that can take the next request.
    fn put(&self, sender: SendRequest<RelayBody>) {
        let now = Instant::now();
        let mut idle = self.lock();
        expire(&mut idle, now);
        if idle.len() >= MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back(Idle { sender, since: now });
    }
}

/// Drops the connections idle for [`IDLE_TIMEOUT`] (the oldest are in front).
fn expire(idle: &mut VecDeque<Idle>, now: Instant) {
    while idle
        .front()
        .is_some_and(|i| now.duration_since(i.since) >= IDLE_TIMEOUT)
    {
        idle.pop_front();
    }
}

async fn sweep(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(IDLE_TIMEOUT / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut idle = shared.lock();
        expire(&mut idle, Instant::now());
        // And those the app closed meanwhile.
        idle.retain(|i| !i.sender.is_closed());
    }
}

/// Puts a connection back once its answer has been read to the end.
struct Release {
    sender: SendRequest<RelayBody>,
    pool: Weak<Shared>,
}

impl Release {
    fn release(mut self) {
        if self.sender.is_closed() {
            return;
        }
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        if self.sender.is_ready() {
            pool.put(self.sender);
            return;
        }
        // Still writing the request (the app answered before reading all of
        // it) or about to close: kept once it can take another request.
        drop(pool);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if self.sender.ready().await.is_ok() {
                if let Some(pool) = self.pool.upgrade() {
                    pool.put(self.sender);
                }
            }
        });
    }
}

/// The app's answer body; its connection goes back to the pool when the
/// body has been read to its end. Dropped before that, the connection is
/// closed (HTTP/1.1 cannot skip the rest of an answer).
pub(crate) struct AppBody {
    body: Incoming,
    release: Option<Release>,
}

impl AppBody {
    /// Gives the connection back, once.
    fn release(&mut self) {
        if let Some(release) = self.release.take() {
            release.release();
        }
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        if frame.is_none() {
            self.release();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for AppBody {
    fn drop(&mut self) {
        // Read whole but not polled to its end (a reader that went by
        // `is_end_stream`): the connection is as good as released.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// What the test app does after each answer.
    #[derive(Clone, Copy, PartialEq)]
    enum After {
        KeepAlive,
        /// Answers with `Connection: close` and closes.
        Close,
        /// Answers keep-alive, then closes the connection without a word
        /// (an app whose idle timeout passed).
        CloseSilently,
        /// The same, 100 ms after its answer.
        CloseIdle,
    }

    /// An HTTP/1.1 app on loopback, written by hand so that the tests see
    /// its connections: how many were opened, and every request head.
    struct App {
        target: Target,
        connections: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
    }

    impl App {
        async fn spawn(after: After) -> anyhow::Result<App> {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let target: Target = listener
                .local_addr()?
                .port()
                .to_string()
                .parse()
                .map_err(anyhow::Error::msg)?;
            let connections = Arc::new(AtomicUsize::new(0));
            let heads = Arc::new(Mutex::new(Vec::new()));
            let (c, h) = (connections.clone(), heads.clone());
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    c.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve(stream, after, h.clone()));
                }
            });
            Ok(App {
                target,
                connections,
                heads,
            })
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }

        fn heads(&self) -> Vec<String> {
            self.heads.lock().map(|h| h.clone()).unwrap_or_default()
        }
    }

    async fn serve(mut stream: TcpStream, after: After, heads: Arc<Mutex<Vec<String>>>) {
        let mut buf = Vec::new();
        loop {
            // The head, then a Content-Length body.
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                if !read_more(&mut stream, &mut buf).await {
                    return;
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + len {
                if !read_more(&mut stream, &mut buf).await {
                    return;
                }
            }
            buf.drain(..end + len);
            if let Ok(mut h) = heads.lock() {
                h.push(head);
            }
            let answer: &[u8] = if after == After::Close {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            };
            if stream.write_all(answer).await.is_err() {
                return;
            }
            match after {
                After::KeepAlive => {}
                After::CloseIdle => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return;
                }
                After::Close | After::CloseSilently => return,
            }
        }
    }

    /// Appends what the stream has next to `buf`; false at its end.
    async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    fn request(target: &Target, path: &str) -> anyhow::Result<Request<RelayBody>> {
        Ok(Request::post(target.origin_form(path))
            .header("content-type", "application/json")
            .body(RelayBody::buffered(Bytes::from_static(b"{\"n\":1}")))?)
    }

    /// Sends a request and reads the answer to its end.
    async fn exchange(pool: &AppPool, req: Request<RelayBody>) -> anyhow::Result<Bytes> {
        let response = pool.send(req).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        anyhow::ensure!(response.status() == 200, "{}", response.status());
        Ok(response.into_body().collect().await?.to_bytes())
    }

    /// Waits for the pool's count of idle connections (a connection whose
    /// answer was read whole may still be finishing its request's write).
    async fn idle_becomes(pool: &AppPool, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.idle_count() != n {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} idle, not {n}",
                pool.idle_count()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() -> anyhow::Result<()> {
        let app = App::spawn(After::KeepAlive).await?;
        let pool = AppPool::new(&app.target).map_err(anyhow::Error::msg)?;
        for i in 0..20 {
            let body = exchange(&pool, request(&app.target, &format!("/hook/{i}"))?).await?;
            assert_eq!(&body[..], b"ok");
            idle_becomes(&pool, 1).await?;
        }
        assert_eq!(app.connections(), 1);
        let heads = app.heads();
        assert_eq!(heads.len(), 20);
        assert!(
            heads[7].starts_with("POST /hook/7 HTTP/1.1\r\n"),
            "{}",
            heads[7]
        );
        Ok(())
    }

    #[tokio::test]
    async fn host_is_the_apps_unless_the_request_names_one() -> anyhow::Result<()> {
        let app = App::spawn(After::KeepAlive).await?;
        let pool = AppPool::new(&app.target).map_err(anyhow::Error::msg)?;
        exchange(&pool, request(&app.target, "/a")?).await?;
        let mut named = request(&app.target, "/b")?;
        named
            .headers_mut()
            .insert(HOST, HeaderValue::from_static("hooks.example.com"));
        exchange(&pool, named).await?;
        let heads = app.heads();
        let host = |head: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix("host: "))
                .map(str::to_owned)
        };
        assert_eq!(host(&heads[0]), Some(app.target.authority.clone()));
        assert_eq!(host(&heads[1]).as_deref(), Some("hooks.example.com"));
        Ok(())
    }

    #[tokio::test]
    async fn a_connection_the_app_closes_is_not_used_again() -> anyhow::Result<()> {
        for after in [After::Close, After::CloseSilently] {
            let app = App::spawn(after).await?;
            let pool = AppPool::new(&app.target).map_err(anyhow::Error::msg)?;
            for i in 0..5 {
                exchange(&pool, request(&app.target, &format!("/{i}"))?).await?;
                // Let the close arrive (after `Connection: close`, or as an
                // idle timeout's would).
                tokio::time::sleep(Duration::from_millis(50)).await;
                if after == After::Close {
                    assert_eq!(pool.idle_count(), 0, "kept after Connection: close");
                } else {
                    // Kept until someone looks, but never handed out.
                    assert!(
                        pool.checkout().is_none(),
                        "a closed connection was handed out"
                    );
                }
            }
            assert_eq!(app.connections(), 5, "one connection per request");
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_request_a_kept_connection_turns_away_goes_out_on_another() -> anyhow::Result<()> {
        let app = App::spawn(After::CloseIdle).await?;
        let pool = AppPool::new(&app.target).map_err(anyhow::Error::msg)?;
        exchange(&pool, request(&app.target, "/first")?).await?;
        // A kept connection that the app has closed by the time it is used
        // (the race checkout's own check cannot close: the app may close it
        // right after).
        let deadline = Instant::now() + Duration::from_secs(10);
        let stale = loop {
            let kept = pool.shared.lock().pop_back().map(|i| i.sender);
            match kept {
                Some(sender) if sender.is_closed() => break sender,
                Some(sender) => pool.shared.put(sender),
                None => anyhow::bail!("the first connection was not kept"),
            }
            anyhow::ensure!(Instant::now() < deadline, "the app's close never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let response = pool
            .send_on(Some(stale), request(&app.target, "/again")?)
            .await
            .map_err(|e| anyhow::anyhow!("not sent again: {e:?}"))?;
        assert_eq!(response.status(), 200);
        assert_eq!(app.connections(), 2, "sent again on a new connection");
        assert!(app.heads()[1].starts_with("POST /again "));
        Ok(())
    }

    #[tokio::test]
    async fn a_body_dropped_unread_closes_its_connection() -> anyhow::Result<()> {
        let app = App::spawn(After::KeepAlive).await?;
        let pool = AppPool::new(&app.target).map_err(anyhow::Error::msg)?;
        let response = pool
            .send(request(&app.target, "/")?)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        drop(response);
        exchange(&pool, request(&app.target, "/")?).await?;
        assert_eq!(app.connections(), 2);
        Ok(())
    }

    #[tokio::test]
    async fn at_most_max_idle_connections_are_kept() -> anyhow::Result<()> {
        let app = App::spawn(After::KeepAlive).await?;
        let pool = AppPool::new(&app.target).map_err(anyhow::Error::msg)?;
        let n = MAX_IDLE + 6;
        // All in flight at once: each needs a connection of its own.
        let mut responses = Vec::new();
        for i in 0..n {
            responses.push(
                pool.send(request(&app.target, &format!("/{i}"))?)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?,
            );
        }
        assert_eq!(app.connections(), n);
        for response in responses {
            response.into_body().collect().await?;
        }
        idle_becomes(&pool, MAX_IDLE).await?;
        Ok(())
    }

    #[tokio::test]
    async fn a_dead_app_is_a_connect_error() -> anyhow::Result<()> {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            l.local_addr()?.port()
        };
        let target: Target = port.to_string().parse().map_err(anyhow::Error::msg)?;
        let pool = AppPool::new(&target).map_err(anyhow::Error::msg)?;
        match pool.send(request(&target, "/")?).await {
            Err(SendError::Connect(_)) => Ok(()),
            other => anyhow::bail!("{:?}", other.map(|r| r.status())),
        }
    }

    #[test]
    fn origin_form_starts_with_a_slash() -> anyhow::Result<()> {
        let bare: Target = "3000".parse().map_err(anyhow::Error::msg)?;
        let based: Target = "http://localhost:3000/api/"
            .parse()
            .map_err(anyhow::Error::msg)?;
        assert_eq!(bare.origin_form(""), "/");
        assert_eq!(bare.origin_form("?a=1"), "/?a=1");
        assert_eq!(bare.origin_form("/x?a=1"), "/x?a=1");
        assert_eq!(based.origin_form(""), "/api");
        assert_eq!(based.origin_form("/x"), "/api/x");
        // What the URL's path and query are, for every one of them.
        for (t, p) in [(&bare, ""), (&bare, "/x?y"), (&based, ""), (&based, "/x?y")] {
            let url: Uri = t.url(p).parse()?;
            let expected = url.path_and_query().map_or("/", |pq| pq.as_str());
            assert_eq!(t.origin_form(p), expected);
        }
        Ok(())
    }
}
