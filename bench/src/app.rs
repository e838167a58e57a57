//! The local app the agent forwards to: reads each request's body as it
//! arrives, answers 200 `{"ok":true}` once it is complete, and counts requests
//! and body bytes.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::Instant,
};

use anyhow::Context;
use axum::{
    body::Body, extract::DefaultBodyLimit, extract::State, response::IntoResponse,
    serve::ListenerExt,
};
use http_body_util::BodyExt;
use tokio::task::JoinHandle;

struct Counts {
    /// Requests whose head arrived.
    started: AtomicU64,
    /// Body bytes received, of every request.
    body_bytes: AtomicU64,
    /// Requests answered.
    requests: AtomicU64,
    /// The request count whose arrival time is recorded in `reached_at`.
    target: u64,
    first_at: OnceLock<Instant>,
    reached_at: OnceLock<Instant>,
}

/// A counting app on 127.0.0.1; stops when dropped.
pub struct App {
    addr: SocketAddr,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

async fn answer(State(counts): State<Arc<Counts>>, mut body: Body) -> impl IntoResponse {
    counts.started.fetch_add(1, Ordering::SeqCst);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    counts
                        .body_bytes
                        .fetch_add(data.len() as u64, Ordering::SeqCst);
                }
            }
            // A body cut short: not answered, not counted.
            Err(_) => return http::StatusCode::BAD_REQUEST.into_response(),
        }
    }
    let n = counts.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let now = Instant::now();
    if n == 1 {
        let _ = counts.first_at.set(now);
    }
    if n == counts.target {
        let _ = counts.reached_at.set(now);
    }
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        r#"{"ok":true}"#,
    )
        .into_response()
}

impl App {
    /// Starts the app; it notes when its first and its `target`-th request
    /// arrive.
    pub async fn spawn(target: u64) -> anyhow::Result<App> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the local app")?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts {
            started: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            target,
            first_at: OnceLock::new(),
            reached_at: OnceLock::new(),
        });
        let router = axum::Router::new()
            .fallback(answer)
            .layer(DefaultBodyLimit::disable())
            .with_state(counts.clone());
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("the local app stopped: {e}");
            }
        });
        Ok(App { addr, counts, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn requests(&self) -> u64 {
        self.counts.requests.load(Ordering::SeqCst)
    }

    /// Requests whose head arrived, answered or not.
    pub fn started(&self) -> u64 {
        self.counts.started.load(Ordering::SeqCst)
    }

    /// Body bytes received so far, over all requests.
    pub fn body_bytes(&self) -> u64 {
        self.counts.body_bytes.load(Ordering::SeqCst)
    }

    pub fn first_at(&self) -> Option<Instant> {
        self.counts.first_at.get().copied()
    }

    pub fn reached_at(&self) -> Option<Instant> {
        self.counts.reached_at.get().copied()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}
