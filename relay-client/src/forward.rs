//! Hands one delivery to the local app and streams its answer back.
//!
//! The request body is read from the delivery stream as the relay sends it and
//! the response body is written back as the app produces it; neither is held
//! whole. A reset from the relay (the sender's body was cut) reaches the app as
//! a broken body, never as a short, complete one.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hookrelay_shared::{
    codec::{read_frame, write_frame},
    http::{connection_tokens, is_hop_by_hop},
    protocol::reset,
    AgentReply, FailureKind, RequestHead, ResponseHead,
};
use http::{HeaderName, HeaderValue, Method, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use tracing::{debug, warn};

use crate::{config::Target, terminal::Terminal};

/// Time the relay gets to send a delivery's head after opening its stream.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest chunk read from a QUIC stream at once.
const MAX_CHUNK_BYTES: usize = 256 * 1024;

/// Idle keep-alive connections kept to the local app.
const POOL_IDLE_PER_HOST: usize = 64;

type StreamBoxed =
    Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, io::Error>> + Send>>;

/// Forwards deliveries to one local app over a keep-alive pool.
#[derive(Clone)]
pub(crate) struct Forwarder {
    client: Client<HttpConnector, RelayBody>,
    target: Target,
    terminal: Terminal,
}

impl Forwarder {
    pub fn new(target: Target, terminal: Terminal) -> Self {
        let mut connector = HttpConnector::new();
        // Webhook bodies and answers are small writes: Nagle would delay them.
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Forwarder {
            client,
            target,
            terminal,
        }
    }

    /// Serves one delivery stream opened by the relay.
    pub async fn handle(&self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let head = match tokio::time::timeout(HEAD_TIMEOUT, read_frame::<RequestHead, _>(&mut recv))
            .await
        {
            Ok(Ok(Some(head))) => head,
            Ok(Ok(None)) => return,
            Ok(Err(err)) => {
                warn!(
                    error = &err as &dyn std::error::Error,
                    "relay sent a bad delivery head"
                );
                let _ = send.reset(reset::CANCELLED.into());
                return;
            }
            Err(_) => {
                let _ = send.reset(reset::CANCELLED.into());
                return;
            }
        };
        let started = Instant::now();
        let stopped = send.stopped();
        let outcome = tokio::select! {
            outcome = self.forward(&head, recv, &mut send) => outcome,
            // The relay gave up (sender gone, relay timeout): stop the local request too.
            _ = stopped => Outcome::Cancelled,
        };
        self.terminal.delivery(&head, &outcome, started.elapsed());
    }

    async fn forward(
        &self,
        head: &RequestHead,
        recv: quinn::RecvStream,
        send: &mut quinn::SendStream,
    ) -> Outcome {
        let timeout = Duration::from_millis(head.timeout_ms);
        let request = match self.build_request(head, recv) {
            Ok(r) => r,
            Err(message) => return fail(send, FailureKind::BadRequest, message).await,
        };
        let response = match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => {
                let kind = if err.is_connect() {
                    FailureKind::LocalAppUnreachable
                } else {
                    FailureKind::LocalAppError
                };
                let message = match kind {
                    FailureKind::LocalAppUnreachable => {
                        format!("cannot connect to {}", self.target)
                    }
                    _ => format!("{} broke the exchange: {}", self.target, error_chain(&err)),
                };
                return fail(send, kind, message).await;
            }
            Err(_) => {
                let message = format!(
                    "{} did not answer within {}s",
                    self.target,
                    timeout.as_secs_f32()
                );
                return fail(send, FailureKind::LocalAppTimeout, message).await;
            }
        };

        let (parts, mut body) = response.into_parts();
        let connection: Vec<String> = parts
            .headers
            .get_all(http::header::CONNECTION)
            .iter()
            .flat_map(|v| connection_tokens(v.as_bytes()).collect::<Vec<_>>())
            .collect();
        let headers = parts
            .headers
            .iter()
            .filter(|(n, _)| !is_hop_by_hop(n.as_str(), &connection))
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        let status = parts.status.as_u16();
        let reply = AgentReply::Response(ResponseHead { status, headers });
        if write_frame(send, &reply).await.is_err() {
            return Outcome::Cancelled;
        }
        loop {
            match body.frame().await {
                None => {
                    let _ = send.finish();
                    return Outcome::Responded(status);
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if send.write_chunk(data).await.is_err() {
                            return Outcome::Cancelled;
                        }
                    }
                }
                Some(Err(err)) => {
                    debug!(error = %err, "local app response body broke");
                    let _ = send.reset(reset::BODY_ABORTED.into());
                    return Outcome::Failed(
                        FailureKind::LocalAppError,
                        "the local app's response body broke off".into(),
                    );
                }
            }
        }
    }

    fn build_request(
        &self,
        head: &RequestHead,
        recv: quinn::RecvStream,
    ) -> Result<Request<RelayBody>, String> {
        let method = Method::from_bytes(head.method.as_bytes())
            .map_err(|_| format!("invalid method {:?}", head.method))?;
        let mut request = Request::builder()
            .method(method)
            .uri(self.target.url(&head.path))
            .body(RelayBody::new(recv, head.body_len))
            .map_err(|e| format!("cannot build a request for {:?}: {e}", head.path))?;
        let headers = request.headers_mut();
        for (name, value) in &head.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("invalid header name {name:?}"))?;
            let value = HeaderValue::from_bytes(value)
                .map_err(|_| format!("invalid value for header {name}"))?;
            headers.append(name, value);
        }
        Ok(request)
    }
}

async fn fail(send: &mut quinn::SendStream, kind: FailureKind, message: String) -> Outcome {
    let reply = AgentReply::Failed {
        kind,
        message: message.clone(),
    };
    if write_frame(send, &reply).await.is_ok() {
        let _ = send.finish();
    }
    Outcome::Failed(kind, message)
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// How a delivery ended, for the terminal line.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// The app answered with this status.
    Responded(u16),
    /// The app could not be reached or failed.
    Failed(FailureKind, String),
    /// The relay or the sender gave up first.
    Cancelled,
}

/// The request body as it arrives on the delivery stream. Its size hint is exact
/// when the sender declared a length (so the app gets `Content-Length`, and a
/// bodiless request stays bodiless); otherwise the app gets a chunked body.
pub(crate) struct RelayBody {
    stream: StreamBoxed,
    len: Option<u64>,
}

impl RelayBody {
    fn new(recv: quinn::RecvStream, len: Option<u64>) -> Self {
        let stream = futures_util::stream::unfold(Some(recv), |state| async move {
            let mut recv = state?;
            match recv.read_chunk(MAX_CHUNK_BYTES, true).await {
                Ok(Some(chunk)) => Some((Ok(Frame::data(chunk.bytes)), Some(recv))),
                Ok(None) => None,
                Err(e) => Some((Err(io::Error::other(e)), None)),
            }
        });
        RelayBody {
            stream: Box::pin(stream),
            len,
        }
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.len == Some(0) {
            return Poll::Ready(None);
        }
        self.stream.as_mut().poll_next(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.len == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.len {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
