//! Public webhook ingress: an HTTP request in, one QUIC stream per delivery to
//! the agent holding the tunnel, the local app's response back out.
//!
//! Bodies stream both ways: request chunks go to the agent as they arrive, and
//! response chunks go back to the sender as the agent sends them. Nothing holds
//! a whole body.

use std::{
    borrow::Cow,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{ConnectInfo, Request, State},
    http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri},
    response::{IntoResponse, Response},
    Json, Router,
};
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use hookrelay_shared::{
    codec::{self, read_frame},
    http::{connection_tokens, is_hop_by_hop},
    protocol::reset,
    signature::{SignedRequest, Verdict},
    AgentReply, DeliveryId, DeliveryMode, FailureKind, RequestHead, RequestHeadRef, TunnelName,
    WhenOffline,
};
use http_body_util::BodyExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use crate::{
    config::OFFLINE_RETRY_AFTER,
    metrics::{self, RelayMetrics},
    policy::{Policies, Refusal},
    queue::{FullReason, Queue, QueueError},
    routing::Routes,
};

/// Extra time the relay grants the agent beyond the local-app timeout, so that
/// the agent's own, more precise timeout answer arrives first.
const REPLY_GRACE: Duration = Duration::from_secs(2);

/// Largest chunk read from a QUIC stream at once.
const MAX_CHUNK_BYTES: usize = 256 * 1024;

/// Body bytes gathered before one write to the queue: few writes per
/// webhook, little memory per upload.
const QUEUE_CHUNK_BYTES: usize = 64 * 1024;

/// Header that carries the full public URL to the local app (Twilio, for one,
/// signs the URL it posted to).
pub const ORIGINAL_URL_HEADER: &str = "x-hookrelay-original-url";

/// Header that carries the relay's delivery id, to the app and back to the sender.
pub const DELIVERY_ID_HEADER: &str = "x-hookrelay-delivery-id";

/// Ingress settings and shared state.
pub(crate) struct Ingress {
    pub routes: Arc<dyn Routes>,
    pub queue: Arc<dyn Queue>,
    pub metrics: Arc<RelayMetrics>,
    pub policies: Arc<Policies>,
    pub domain: Option<String>,
    pub body_limit_bytes: u64,
    pub timeout: Duration,
    /// How long a request body may go without a byte arriving.
    pub body_timeout: Duration,
    /// Slowest average a request body may arrive at once `body_timeout` has
    /// passed, in bytes per second; 0 turns the check off.
    pub min_body_rate: u64,
    /// `http` or `https`, for `X-Forwarded-Proto` and public URLs.
    pub scheme: &'static str,
}

/// The public ingress router: every path is a potential webhook.
pub(crate) fn router(ingress: Arc<Ingress>) -> Router {
    Router::new().fallback(handle).with_state(ingress)
}

async fn handle(
    State(ingress): State<Arc<Ingress>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let delivery_id = DeliveryId::new();
    // One span per delivery: every log line about it carries its id and tunnel.
    let span = tracing::info_span!("delivery", %delivery_id, tunnel = tracing::field::Empty);
    handle_in_span(ingress, remote, req, delivery_id)
        .instrument(span)
        .await
}

async fn handle_in_span(
    ingress: Arc<Ingress>,
    remote: SocketAddr,
    req: Request,
    delivery_id: DeliveryId,
) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let http1 = req.version() < http::Version::HTTP_2;
    let mut label = String::from(metrics::UNKNOWN);
    let (resp, outcome, queued) = match ingress.deliver(delivery_id, remote, req, &mut label).await
    {
        Ok(resp) => {
            let queued = resp.extensions().get::<QueuedMarker>().is_some();
            let outcome = if queued { "queued" } else { "delivered" };
            (resp, outcome, queued)
        }
        Err(err) => {
            debug!(%method, %uri, %remote, error = %err, "delivery failed");
            let outcome = err.code();
            let close = http1 && err.closes_connection();
            let mut resp = Failure { err, delivery_id }.into_response();
            if close {
                // The rest of the request is not to be trusted, or not read:
                // the connection ends with this answer.
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            (resp, outcome, false)
        }
    };
    ingress.metrics.request(
        &label,
        resp.status().as_u16(),
        outcome,
        queued,
        started.elapsed(),
    );
    resp
}

/// The server name (SNI) a TLS connection was opened for, on each of its
/// requests.
#[derive(Clone, Debug)]
pub(crate) struct ServerName(pub(crate) Arc<str>);

/// Marks a `202` of the queue, as opposed to an app's own `202`.
#[derive(Clone, Copy)]
struct QueuedMarker;

impl Ingress {
    /// Routes and delivers (or queues) one request. `label` gets the tunnel's
    /// metrics label once the tunnel is known to exist.
    async fn deliver(
        &self,
        delivery_id: DeliveryId,
        remote: SocketAddr,
        req: Request,
        label: &mut String,
    ) -> Result<Response, IngressError> {
        let received_at_ms = crate::now_ms();
        let (parts, body) = req.into_parts();
        let body = RateGuarded::wrap(body, self.body_timeout, self.min_body_rate);
        check_head(&parts)?;
        let client = self.policies.client_ip(remote.ip(), &parts.headers);
        self.policies.admit_source(client)?;
        let host = host_of(&parts.headers, &parts.uri);
        if let (Some(ServerName(sni)), Some(host)) = (parts.extensions.get(), &host) {
            // Over TLS the certificate vouched for the name the client asked
            // for; a request for another host (an h2 connection reused across
            // a wildcard's names, or a fronting trick) must not be routed by
            // Host alone. 421 makes a client retry on a connection of its own.
            if normalise_host(host) != normalise_host(sni) {
                return Err(IngressError::Misdirected {
                    host: host.clone(),
                    sni: sni.to_string(),
                });
            }
        }
        let (tunnel, path) = self.route(host.as_deref(), &parts.uri)?;
        tracing::Span::current().record("tunnel", tunnel.as_str());
        let policy = self.policies.tunnel(&tunnel);
        if let Some(policy) = &policy {
            policy.admit(client)?;
        }

        let declared = content_length(&parts.headers)?;
        // Exact for Content-Length bodies and for bodiless requests (0); `None`
        // for chunked ones, which the agent forwards chunked.
        let body_len = http_body::Body::size_hint(&body).exact().or(declared);
        if let Some(declared) = body_len {
            self.within_limit(declared)?;
        }
        let link = self.routes.lookup(&tunnel);
        let settings = self.routes.settings(&tunnel);
        let queue_it = match (&link, settings) {
            (_, Some(s)) if s.mode == DeliveryMode::Queue => true,
            (Some(_), _) => false,
            (None, Some(s)) if s.when_offline == WhenOffline::Queue => true,
            (None, Some(_)) => return Err(IngressError::AgentOffline(tunnel)),
            (None, None) => return Err(IngressError::UnknownTunnel(tunnel)),
        };
        *label = self.metrics.tunnel_label(tunnel.as_str());

        // Behind a TLS-terminating proxy the sender used https: the proxy says so.
        let scheme = self
            .policies
            .forwarded_proto(remote.ip(), &parts.headers)
            .unwrap_or(self.scheme);
        let public_url = concat(&[
            scheme,
            "://",
            host.as_deref().unwrap_or("unknown"),
            parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/"),
        ]);
        let delivery_text = delivery_id.to_string();
        let headers = forward_headers(
            &parts.headers,
            remote,
            scheme,
            host.as_deref(),
            &public_url,
            &delivery_text,
        );
        // The sender as the app should see it: behind a trusted proxy, the
        // address it forwarded for (its port is unknown).
        let sender = if client == remote.ip() {
            remote
        } else {
            SocketAddr::new(client, 0)
        };
        // A tunnel that requires signatures gets the whole body checked before
        // a byte of it is forwarded or queued.
        let (body, body_len) = match policy.as_ref().filter(|p| p.verifies()) {
            Some(policy) => {
                let bytes = self.read_whole(body).await?;
                let signed: Vec<(String, Vec<u8>)> = parts
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                    .collect();
                let req = SignedRequest {
                    headers: &signed,
                    body: &bytes,
                    url: Some(&public_url),
                };
                policy.verify(
                    &req,
                    i64::try_from(crate::now_ms() / 1000).unwrap_or(i64::MAX),
                )?;
                let len = bytes.len() as u64;
                (Body::from(bytes), Some(len))
            }
            None => (body, body_len),
        };
        // Borrowed from the request: copied only if it is queued after all.
        let head = RequestHeadRef {
            delivery_id,
            tunnel: &tunnel,
            method: parts.method.as_str(),
            path: &path,
            headers: &headers,
            remote_addr: sender,
            public_url: &public_url,
            received_at_ms,
            timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
            body_len,
        };
        let link = match link {
            Some(link) if !queue_it => link,
            _ => return self.enqueue(head.to_owned_head(), body, label).await,
        };

        // A link that died a moment ago (the agent's goodbye still in flight)
        // has not touched the body yet: queue instead when the tunnel queues
        // while offline.
        let queue_if_lost = settings.is_some_and(|s| s.when_offline == WhenOffline::Queue);
        // The head goes out with the first body chunk, and the stream's end
        // with it when that was the whole body (most webhooks: hyper has read
        // it with the head): one QUIC packet, and no pump task. A body not
        // here yet is not waited for.
        let mut body = body;
        let mut counted_in = Counted::new(self.metrics.clone(), label.clone(), Direction::In);
        let (first, ended) = match body.frame().now_or_never() {
            None => (None, false),
            Some(None) => (None, true),
            Some(Some(Ok(frame))) => (
                frame.into_data().ok(),
                http_body::Body::is_end_stream(&body),
            ),
            Some(Some(Err(err))) => return Err(body_error(err, self.min_body_rate)),
        };
        let sent = first.as_ref().map_or(0, |data| data.len() as u64);
        self.within_limit(sent)?;
        // Not forwarded after all (agent gone): the queue gets the whole body.
        let unsent = |first: Option<Bytes>, body: Body| match first {
            None => body,
            Some(data) => Body::from_stream(
                futures_util::stream::iter([Ok::<_, axum::Error>(data)])
                    .chain(body.into_data_stream()),
            ),
        };
        // Started before the stream is opened: an agent with as many
        // deliveries in flight as it takes at once (its app's connections
        // and its open-files limit) makes this one wait for a free stream,
        // within the same time as for the app's answer.
        let deadline = tokio::time::sleep(self.timeout + REPLY_GRACE);
        tokio::pin!(deadline);
        let opened = tokio::select! {
            biased;
            opened = link.connection.open_bi() => opened,
            () = &mut deadline => {
                return Err(IngressError::LocalAppTimeout {
                    tunnel,
                    message: "the agent had as many deliveries in flight as it takes at once, \
                              and none ended in time"
                        .into(),
                });
            }
        };
        let (mut send, mut recv) = match opened {
            Ok(streams) => streams,
            Err(_) if queue_if_lost => {
                return self
                    .enqueue(head.to_owned_head(), unsent(first, body), label)
                    .await
            }
            Err(_) => return Err(IngressError::AgentOffline(tunnel)),
        };
        let mut chunks = match codec::frame(&head) {
            Ok(frame) => vec![frame],
            Err(_) => {
                let _ = send.reset(reset::CANCELLED.into());
                return Err(IngressError::AgentLost(tunnel));
            }
        };
        chunks.extend(first.clone());
        if send.write_all_chunks(&mut chunks).await.is_err() {
            if queue_if_lost {
                return self
                    .enqueue(head.to_owned_head(), unsent(first, body), label)
                    .await;
            }
            return Err(IngressError::AgentLost(tunnel));
        }
        counted_in.add(sent as usize);

        let cancel = CancellationToken::new();
        let mut pump = if ended {
            let _ = send.finish();
            None
        } else {
            Some(tokio::spawn(pump_body(
                body,
                send,
                Pumped {
                    sent,
                    limit: self.body_limit_bytes,
                    idle: self.body_timeout,
                },
                cancel.clone(),
                counted_in,
            )))
        };
        let _cancel_on_exit = cancel.clone().drop_guard();

        let reply = {
            let reading = read_frame::<AgentReply, _>(&mut recv);
            tokio::pin!(reading);
            loop {
                tokio::select! {
                    reply = &mut reading => break reply,
                    end = async {
                        match pump.as_mut() {
                            Some(pump) => pump.await,
                            None => std::future::pending().await,
                        }
                    }, if pump.is_some() => {
                        pump = None;
                        match end {
                            Ok(PumpEnd::TooLarge) => {
                                return Err(IngressError::BodyTooLarge { limit: self.body_limit_bytes });
                            }
                            Ok(PumpEnd::SenderAborted) => return Err(IngressError::SenderAborted),
                            Ok(PumpEnd::TooSlow) => {
                                return Err(IngressError::BodyTooSlow { rate: self.min_body_rate });
                            }
                            Ok(PumpEnd::BodyTimeout) => {
                                return Err(IngressError::BodyTimeout { after: self.body_timeout });
                            }
                            _ => {}
                        }
                    }
                    () = &mut deadline => {
                        return Err(IngressError::LocalAppTimeout {
                            tunnel: tunnel.clone(),
                            message: "no answer from the agent in time".into(),
                        });
                    }
                }
            }
        };

        match reply {
            Ok(Some(AgentReply::Response(head))) => {
                // The agent is now streaming the response body; the request body
                // pump may still be running and must not be cancelled.
                _cancel_on_exit.disarm();
                let status = StatusCode::from_u16(head.status)
                    .map_err(|_| IngressError::AgentLost(tunnel.clone()))?;
                let counted = Counted::new(self.metrics.clone(), label.clone(), Direction::Out);
                let mut resp = Response::new(Body::empty());
                *resp.status_mut() = status;
                let connection: Vec<String> = head
                    .headers
                    .iter()
                    .filter(|(n, _)| n == "connection")
                    .flat_map(|(_, v)| connection_tokens(v).collect::<Vec<_>>())
                    .collect();
                let out = resp.headers_mut();
                for (name, value) in head.headers {
                    if is_hop_by_hop(&name, &connection) {
                        continue;
                    }
                    // The value's bytes move into the header (checked, not copied).
                    if let (Ok(n), Ok(v)) = (
                        HeaderName::from_bytes(name.as_bytes()),
                        HeaderValue::from_maybe_shared(Bytes::from(value)),
                    ) {
                        out.append(n, v);
                    }
                }
                out.insert(DELIVERY_ID_HEADER, header_value(&delivery_text));
                let declared = content_length(out).ok().flatten();
                *resp.body_mut() = Body::from_stream(recv_stream(recv, declared, counted));
                debug!(%delivery_id, %tunnel, status = head.status, "delivered");
                Ok(resp)
            }
            Ok(Some(AgentReply::Failed { kind, message })) => Err(match kind {
                FailureKind::LocalAppUnreachable => {
                    IngressError::LocalAppUnreachable { tunnel, message }
                }
                FailureKind::LocalAppTimeout => IngressError::LocalAppTimeout { tunnel, message },
                FailureKind::LocalAppError | FailureKind::BadRequest => {
                    IngressError::LocalAppError { tunnel, message }
                }
            }),
            Ok(None) | Err(_) => Err(IngressError::AgentLost(tunnel)),
        }
    }

    /// The next data chunk of a request body (trailers are skipped: neither
    /// signed nor forwarded nor kept), within the body idle timeout; `None` at
    /// its end.
    async fn next_data(&self, body: &mut Body) -> Result<Option<Bytes>, IngressError> {
        loop {
            let frame = tokio::time::timeout(self.body_timeout, body.frame())
                .await
                .map_err(|_| IngressError::BodyTimeout {
                    after: self.body_timeout,
                })?;
            let Some(frame) = frame else {
                return Ok(None);
            };
            let frame = frame.map_err(|e| body_error(e, self.min_body_rate))?;
            if let Ok(data) = frame.into_data() {
                return Ok(Some(data));
            }
        }
    }

    /// The body limit's error when `bytes` would exceed it.
    fn within_limit(&self, bytes: u64) -> Result<(), IngressError> {
        if bytes > self.body_limit_bytes {
            return Err(IngressError::BodyTooLarge {
                limit: self.body_limit_bytes,
            });
        }
        Ok(())
    }

    /// Reads a whole request body, within the body limit and the body timeout.
    async fn read_whole(&self, mut body: Body) -> Result<Bytes, IngressError> {
        let mut buf = BytesMut::new();
        while let Some(data) = self.next_data(&mut body).await? {
            self.within_limit((buf.len() + data.len()) as u64)?;
            buf.extend_from_slice(&data);
        }
        Ok(buf.freeze())
    }

    /// Stores the request in the tunnel's queue, durably, and answers `202`
    /// with its delivery id. The body goes to disk as it arrives, in chunks of
    /// up to [`QUEUE_CHUNK_BYTES`]; nothing holds it whole.
    async fn enqueue(
        &self,
        head: RequestHead,
        mut body: Body,
        label: &str,
    ) -> Result<Response, IngressError> {
        let tunnel = head.tunnel.clone();
        let delivery_id = head.delivery_id;
        let mut upload = self.queue.begin(&tunnel, head.body_len)?;
        let mut pending = BytesMut::new();
        let streamed: Result<(), IngressError> = async {
            while let Some(data) = self.next_data(&mut body).await? {
                self.within_limit(upload.written() + (pending.len() + data.len()) as u64)?;
                pending.extend_from_slice(&data);
                if pending.len() >= QUEUE_CHUNK_BYTES {
                    self.queue.append(&mut upload, &pending.split())?;
                }
            }
            if !pending.is_empty() {
                self.queue.append(&mut upload, &pending)?;
            }
            Ok(())
        }
        .await;
        if let Err(err) = streamed {
            self.queue.abort(upload);
            return Err(err);
        }
        self.metrics.request_bytes(label, upload.written());
        let item = if upload.commit_blocks() {
            // A large body's file is synced by the commit: not on a worker.
            let queue = self.queue.clone();
            tokio::task::spawn_blocking(move || queue.commit(upload, head))
                .await
                .map_err(|e| QueueError::Storage(format!("the commit's task failed: {e}")))??
        } else {
            self.queue.commit(upload, head)?
        };
        // On disk before the sender hears "accepted": a crash after this
        // answer loses nothing.
        self.queue.sync().await?;
        let queued = self.queue.stats(&tunnel).count;
        debug!(%delivery_id, %tunnel, seq = item.seq, bytes = item.body_len, queued, "queued");
        let body = Queued {
            status: "queued",
            delivery_id: delivery_id.to_string(),
            tunnel: tunnel.to_string(),
            queued,
        };
        let mut resp = (StatusCode::ACCEPTED, Json(body)).into_response();
        resp.headers_mut()
            .insert(DELIVERY_ID_HEADER, header_value(&delivery_id.to_string()));
        resp.extensions_mut().insert(QueuedMarker);
        Ok(resp)
    }

    /// Finds the tunnel a request is for: the subdomain of the configured domain,
    /// or the path form `/t/NAME/rest`. Returns the tunnel and the path and query
    /// below its root.
    fn route(&self, host: Option<&str>, uri: &Uri) -> Result<(TunnelName, String), IngressError> {
        let query = uri.query().map_or_else(String::new, |q| concat(&["?", q]));
        if let (Some(domain), Some(host)) = (&self.domain, host) {
            let host = normalise_host(host);
            if let Some(label) = host
                .strip_suffix(domain.as_str())
                .and_then(|h| h.strip_suffix('.'))
            {
                let tunnel = label
                    .parse::<TunnelName>()
                    .map_err(|_| IngressError::UnknownTunnel(unknown_name(label)))?;
                return Ok((tunnel, concat(&[uri.path(), &query])));
            }
        }
        let rest = uri
            .path()
            .strip_prefix("/t/")
            .ok_or(IngressError::NoRoute)?;
        let (name, below) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let tunnel = name
            .parse::<TunnelName>()
            .map_err(|_| IngressError::UnknownTunnel(unknown_name(name)))?;
        Ok((tunnel, concat(&[below, &query])))
    }
}

/// The pieces joined, in one allocation: `format!` through `core::fmt` was a
/// measurable share of the relay's instructions per webhook (callgrind).
fn concat(pieces: &[&str]) -> String {
    let mut out = String::with_capacity(pieces.iter().map(|p| p.len()).sum());
    for piece in pieces {
        out.push_str(piece);
    }
    out
}

/// Appends `ip` in its usual text form; an IPv4 address (nearly every
/// sender) without `core::fmt`, whose `Ipv4Addr` formatting (it pads) cost
/// about 1,600 instructions per webhook.
fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        std::net::IpAddr::V6(_) => out.extend_from_slice(ip.to_string().as_bytes()),
    }
}

/// The `202` body of a queued webhook.
#[derive(Serialize)]
struct Queued {
    status: &'static str,
    delivery_id: String,
    tunnel: String,
    /// Deliveries now waiting for this tunnel, this one included.
    queued: u64,
}

/// What ended the request-body pump.
#[derive(Debug)]
enum PumpEnd {
    Finished,
    TooLarge,
    SenderAborted,
    /// No body byte arrived for the body timeout.
    BodyTimeout,
    /// The body arrived slower than the minimum rate.
    TooSlow,
    AgentStopped,
    Cancelled,
}

/// A request body that must keep up a minimum average rate once a grace
/// period has passed since the request arrived: a sender trickling a byte every
/// few seconds never trips the idle timeout, and would hold its connection and
/// an agent stream for as long as its body limit allows.
struct RateGuarded {
    inner: Body,
    started: Instant,
    grace: Duration,
    min_rate: u64,
    received: u64,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

/// The error a [`RateGuarded`] body ends with.
#[derive(Debug, thiserror::Error)]
#[error("request body too slow")]
struct TooSlow;

impl RateGuarded {
    /// `body`, guarded; unchanged when `min_rate` is 0.
    fn wrap(body: Body, grace: Duration, min_rate: u64) -> Body {
        if min_rate == 0 {
            return body;
        }
        let started = Instant::now();
        Body::new(RateGuarded {
            inner: body,
            started,
            grace,
            min_rate,
            received: 0,
            deadline: Box::pin(tokio::time::sleep_until((started + grace).into())),
        })
    }

    /// When the bytes so far stop being enough: the grace, plus the time
    /// they buy at the minimum rate.
    fn next_deadline(&self) -> Instant {
        let bought = Duration::from_secs_f64(self.received as f64 / self.min_rate as f64);
        self.started + self.grace + bought.min(Duration::from_secs(365 * 24 * 3600))
    }
}

impl http_body::Body for RateGuarded {
    type Data = Bytes;
    // Boxed, so that `Body::new` wraps it in one `axum::Error` (not two) and
    // `is_too_slow` finds `TooSlow` right inside.
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::{future::Future, task::Poll};
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    let next = this.next_deadline();
                    this.deadline.as_mut().reset(next.into());
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into_inner()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(TooSlow)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn is_too_slow(err: axum::Error) -> bool {
    err.into_inner().downcast_ref::<TooSlow>().is_some()
}

/// A body read error as the sender's failure: too slow, or gone.
fn body_error(err: axum::Error, min_rate: u64) -> IngressError {
    if is_too_slow(err) {
        IngressError::BodyTooSlow { rate: min_rate }
    } else {
        IngressError::SenderAborted
    }
}

/// Where [`pump_body`] starts: bytes already sent with the head, the body
/// limit, and the idle timeout between body frames.
struct Pumped {
    sent: u64,
    limit: u64,
    idle: Duration,
}

/// Copies the sender's body to the delivery stream chunk by chunk, enforcing the
/// body limit on what actually arrives (chunked bodies declare no length) and
/// the idle timeout between body frames. An early end is signalled with a
/// stream reset, so the agent never mistakes a cut body for a complete one.
async fn pump_body(
    mut body: Body,
    mut send: quinn::SendStream,
    pumped: Pumped,
    cancel: CancellationToken,
    mut counted: Counted,
) -> PumpEnd {
    let Pumped {
        mut sent,
        limit,
        idle,
    } = pumped;
    loop {
        let frame = tokio::select! {
            () = cancel.cancelled() => {
                let _ = send.reset(reset::CANCELLED.into());
                return PumpEnd::Cancelled;
            }
            frame = tokio::time::timeout(idle, body.frame()) => match frame {
                Ok(frame) => frame,
                Err(_) => {
                    let _ = send.reset(reset::BODY_ABORTED.into());
                    return PumpEnd::BodyTimeout;
                }
            },
        };
        let data = match frame {
            None => {
                let _ = send.finish();
                return PumpEnd::Finished;
            }
            Some(Err(e)) => {
                let _ = send.reset(reset::BODY_ABORTED.into());
                return if is_too_slow(e) {
                    PumpEnd::TooSlow
                } else {
                    PumpEnd::SenderAborted
                };
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers: not forwarded
            },
        };
        sent += data.len() as u64;
        counted.add(data.len());
        if sent > limit {
            let _ = send.reset(reset::BODY_ABORTED.into());
            return PumpEnd::TooLarge;
        }
        tokio::select! {
            () = cancel.cancelled() => {
                let _ = send.reset(reset::CANCELLED.into());
                return PumpEnd::Cancelled;
            }
            written = send.write_chunk(data) => if written.is_err() {
                return PumpEnd::AgentStopped;
            },
        }
    }
}

/// The rest of a delivery stream as a body stream; a reset becomes an error, so
/// the sender sees a cut connection rather than a short, "complete" body.
///
/// hyper stops polling a body once its `declared` length is through, and a
/// stream dropped before its end was read makes quinn send the agent a
/// STOP_SENDING: a packet more per delivery each way (measured, 4 packets per
/// small delivery instead of 2). The end travels with the last bytes, so it
/// is taken then when it is already there.
fn recv_stream(
    recv: quinn::RecvStream,
    declared: Option<u64>,
    counted: Counted,
) -> impl futures_util::Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
    futures_util::stream::unfold(Some((recv, counted)), move |state| async move {
        let (mut recv, mut counted) = state?;
        match recv.read_chunk(MAX_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => {
                counted.add(chunk.bytes.len());
                if declared == Some(counted.bytes) {
                    // Anything past the declared length is not sent on anyway.
                    let _ = recv.read_chunk(MAX_CHUNK_BYTES, true).now_or_never();
                }
                Some((Ok(chunk.bytes), Some((recv, counted))))
            }
            Ok(None) => None,
            Err(e) => Some((Err(io::Error::other(e)), None)),
        }
    })
}

/// Which way body bytes go, for the byte counters.
#[derive(Clone, Copy)]
enum Direction {
    In,
    Out,
}

/// Counts body bytes as they pass and adds them to the metrics once, when
/// dropped (one counter update per body, not per chunk).
struct Counted {
    metrics: Arc<RelayMetrics>,
    label: String,
    direction: Direction,
    bytes: u64,
}

impl Counted {
    fn new(metrics: Arc<RelayMetrics>, label: String, direction: Direction) -> Self {
        Counted {
            metrics,
            label,
            direction,
            bytes: 0,
        }
    }

    fn add(&mut self, n: usize) {
        self.bytes += n as u64;
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        match self.direction {
            Direction::In => self.metrics.request_bytes(&self.label, self.bytes),
            Direction::Out => self.metrics.response_bytes(&self.label, self.bytes),
        }
    }
}

/// The headers the local app receives: the sender's, in order and byte for byte,
/// minus hop-by-hop ones, plus the proxy headers. Borrowed from the request
/// (only `X-Forwarded-For`, which appends the sender, is built).
fn forward_headers<'a>(
    headers: &'a HeaderMap,
    remote: SocketAddr,
    scheme: &'a str,
    host: Option<&'a str>,
    public_url: &'a str,
    delivery_id: &'a str,
) -> Vec<(&'a str, Cow<'a, [u8]>)> {
    let connection: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| connection_tokens(v.as_bytes()).collect::<Vec<_>>())
        .collect();
    let mut out: Vec<(&str, Cow<'_, [u8]>)> = Vec::with_capacity(headers.len() + 6);
    // An HTTP/2 request names its host in `:authority`, not in `Host`; the app
    // gets HTTP/1.1, which needs `Host`, so it is made from the authority
    // (RFC 9113, 8.3.1), ahead of the sender's headers as on a request line.
    if let (false, Some(host)) = (headers.contains_key(header::HOST), host) {
        out.push(("host", Cow::Borrowed(host.as_bytes())));
    }
    let mut forwarded_for: Option<Vec<u8>> = None;
    for (name, value) in headers {
        let name = name.as_str();
        if is_hop_by_hop(name, &connection) {
            continue;
        }
        match name {
            "x-forwarded-for" => {
                let v = forwarded_for.get_or_insert_with(Vec::new);
                if !v.is_empty() {
                    v.extend_from_slice(b", ");
                }
                v.extend_from_slice(value.as_bytes());
            }
            "x-forwarded-proto" | "x-forwarded-host" | ORIGINAL_URL_HEADER | DELIVERY_ID_HEADER => {
            }
            _ => out.push((name, Cow::Borrowed(value.as_bytes()))),
        }
    }
    let mut xff = forwarded_for.unwrap_or_default();
    if !xff.is_empty() {
        xff.extend_from_slice(b", ");
    }
    push_ip(&mut xff, remote.ip());
    out.push(("x-forwarded-for", Cow::Owned(xff)));
    out.push(("x-forwarded-proto", Cow::Borrowed(scheme.as_bytes())));
    if let Some(host) = host {
        out.push(("x-forwarded-host", Cow::Borrowed(host.as_bytes())));
    }
    out.push((ORIGINAL_URL_HEADER, Cow::Borrowed(public_url.as_bytes())));
    out.push((DELIVERY_ID_HEADER, Cow::Borrowed(delivery_id.as_bytes())));
    out
}

fn host_of(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.as_str().to_owned()))
}

/// Lowercase, without port and trailing dot: `Alice.Relay.Example.com.:443` and
/// `alice.relay.example.com` are the same host.
fn normalise_host(host: &str) -> String {
    let without_port = if host.starts_with('[') {
        host.split(']')
            .next()
            .map(|h| format!("{h}]"))
            .unwrap_or_default()
    } else {
        host.rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(host)
            .to_owned()
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

/// Refuses, before routing, what a well-formed webhook never carries and what
/// could confuse the app behind the tunnel: an HTTP/1 head with both
/// `Content-Length` and `Transfer-Encoding` (marked by the edge's framing
/// scanner), a `Transfer-Encoding` other than a single plain `chunked`, more
/// header lines than HTTP/1 allows (HTTP/2 has no such cap of its own), and
/// paths that climb (`..` segments, also when percent-encoded, double-encoded
/// or hidden behind an encoded `/` or `\`) or carry NUL.
fn check_head(parts: &http::request::Parts) -> Result<(), IngressError> {
    let (headers, uri) = (&parts.headers, &parts.uri);
    if parts
        .extensions
        .get::<crate::framing::AmbiguousFraming>()
        .is_some()
    {
        return Err(IngressError::BadRequest(
            "both Content-Length and Transfer-Encoding (ambiguous framing)",
        ));
    }
    if headers.len() > crate::edge::MAX_HEADERS {
        return Err(IngressError::TooManyHeaders);
    }
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = te.next() {
        let plain = first
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked");
        if !plain || te.next().is_some() {
            return Err(IngressError::BadRequest(
                "unsupported Transfer-Encoding (only a single `chunked` is accepted)",
            ));
        }
    }
    if path_is_hostile(uri.path()) {
        return Err(IngressError::BadRequest(
            "the path has `.` or `..` segments (once decoded), double-encoded characters or NUL",
        ));
    }
    Ok(())
}

/// Whether `path`, percent-decoded once, has a `.` or `..` segment (with `/`
/// or `\` as separators), NUL, or a still-encoded `.`, `/`, `\` or NUL (a
/// double encoding meant for a second decoder).
fn path_is_hostile(path: &str) -> bool {
    let decoded = percent_decode(path.as_bytes());
    if decoded.contains(&0) {
        return true;
    }
    if decoded
        .split(|b| *b == b'/' || *b == b'\\')
        .any(|seg| seg == b".." || seg == b".")
    {
        return true;
    }
    let lower = decoded.to_ascii_lowercase();
    [b"%2e", b"%2f", b"%5c", b"%00"]
        .iter()
        .any(|needle| lower.windows(3).any(|w| w == *needle))
}

/// One round of percent-decoding; a `%` not followed by two hex digits stays.
fn percent_decode(input: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            if let (Some(h), Some(l)) = (hex(input[i + 1]), hex(input[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    out
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, IngressError> {
    let mut found: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let n = value
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or(IngressError::BadRequest("invalid Content-Length"))?;
        if found.is_some_and(|f| f != n) {
            return Err(IngressError::BadRequest(
                "conflicting Content-Length headers",
            ));
        }
        found = Some(n);
    }
    Ok(found)
}

/// A placeholder for a name that failed validation, for the error message only.
fn unknown_name(raw: &str) -> TunnelName {
    let cleaned: String = raw
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(63)
        .collect();
    cleaned.trim_matches('-').parse().unwrap_or_else(|_| {
        "invalid"
            .parse()
            .expect("\"invalid\" is a valid tunnel name")
    })
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Why the relay could not hand a webhook to the local app. Variant names say
/// which side failed: the sender, the relay's routing, the agent or the local app.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("no tunnel here: webhook URLs look like /t/NAME/path")]
    NoRoute,
    #[error("no tunnel named {0}")]
    UnknownTunnel(TunnelName),
    #[error("the agent for tunnel {0} is offline")]
    AgentOffline(TunnelName),
    #[error("the agent for tunnel {0} dropped the delivery")]
    AgentLost(TunnelName),
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("the sender aborted the request body")]
    SenderAborted,
    #[error("no request body bytes arrived for {}s", .after.as_secs_f64())]
    BodyTimeout { after: Duration },
    #[error("more than 100 header lines")]
    TooManyHeaders,
    #[error("the Host header ({host}) names another host than the TLS connection was opened for ({sni})")]
    Misdirected { host: String, sni: String },
    #[error("the request body arrived slower than {rate} bytes/s on average")]
    BodyTooSlow { rate: u64 },
    #[error("the local app behind tunnel {tunnel} is unreachable: {message}")]
    LocalAppUnreachable { tunnel: TunnelName, message: String },
    #[error("the local app behind tunnel {tunnel} did not answer in time: {message}")]
    LocalAppTimeout { tunnel: TunnelName, message: String },
    #[error("the local app behind tunnel {tunnel} failed: {message}")]
    LocalAppError { tunnel: TunnelName, message: String },
    #[error("the queue of tunnel {tunnel} is full ({}); retry later", full_reason(*.reason))]
    QueueFull {
        tunnel: TunnelName,
        reason: FullReason,
        retry_after: Duration,
    },
    #[error("the relay cannot store this webhook right now")]
    QueueStorage(String),
    #[error("requests from {0} are not allowed on this tunnel")]
    SourceNotAllowed(IpAddr),
    #[error("rate limit of this {scope} reached; retry in {}s", retry_secs(*.retry_after))]
    RateLimited {
        scope: &'static str,
        retry_after: Duration,
        status: StatusCode,
    },
    #[error("{message}")]
    Signature { code: &'static str, message: String },
}

/// Whole seconds to wait, rounded up, at least 1 (for `Retry-After`).
fn retry_secs(after: Duration) -> u64 {
    after.as_secs() + u64::from(after.subsec_nanos() > 0 || after.is_zero())
}

impl From<Refusal> for IngressError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::NotAllowed(ip) => IngressError::SourceNotAllowed(ip),
            Refusal::RateLimited {
                scope,
                retry_after,
                status,
            } => IngressError::RateLimited {
                scope,
                retry_after,
                status,
            },
            Refusal::Signature(verdict) => {
                let (code, message) = match &verdict {
                    Verdict::Invalid { provider, reason } => (
                        "signature_invalid",
                        format!("{provider} signature invalid: {reason}"),
                    ),
                    Verdict::Stale { provider, age_s } if *age_s < 0 => (
                        "signature_stale",
                        format!(
                            "{provider} signature timestamp is {}s in the future",
                            age_s.unsigned_abs()
                        ),
                    ),
                    Verdict::Stale { provider, age_s } => (
                        "signature_stale",
                        format!("{provider} signature is {age_s}s old, outside the replay window"),
                    ),
                    Verdict::Unsigned => (
                        "signature_missing",
                        "this tunnel requires a signed webhook; the request carries no known signature header".to_owned(),
                    ),
                    Verdict::NoSecret { provider } => (
                        "signature_unexpected",
                        format!("{provider} signatures are not accepted on this tunnel"),
                    ),
                    Verdict::Valid { .. } => ("signature_invalid", "signature invalid".to_owned()),
                };
                tracing::info!(code, reason = %message, "webhook refused by signature check");
                IngressError::Signature { code, message }
            }
        }
    }
}

fn full_reason(reason: FullReason) -> &'static str {
    match reason {
        FullReason::Count => "too many webhooks waiting",
        FullReason::Bytes => "too many bytes waiting",
        FullReason::Age => "its oldest webhook waited too long; the agent has not collected them",
    }
}

impl From<QueueError> for IngressError {
    fn from(err: QueueError) -> Self {
        match err {
            QueueError::Full {
                tunnel,
                reason,
                retry_after,
            } => IngressError::QueueFull {
                tunnel,
                reason,
                retry_after,
            },
            other => {
                tracing::error!(
                    error = &other as &dyn std::error::Error,
                    "queue write failed"
                );
                IngressError::QueueStorage(other.to_string())
            }
        }
    }
}

impl IngressError {
    /// Stable, documented error code for the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            IngressError::NoRoute => "not_found",
            IngressError::UnknownTunnel(_) => "unknown_tunnel",
            IngressError::AgentOffline(_) => "agent_offline",
            IngressError::AgentLost(_) => "agent_error",
            IngressError::BodyTooLarge { .. } => "body_too_large",
            IngressError::BadRequest(_) => "bad_request",
            IngressError::SenderAborted => "request_aborted",
            IngressError::BodyTimeout { .. } | IngressError::BodyTooSlow { .. } => {
                "request_timeout"
            }
            IngressError::TooManyHeaders => "headers_too_large",
            IngressError::Misdirected { .. } => "misdirected_request",
            IngressError::LocalAppUnreachable { .. } => "local_app_unreachable",
            IngressError::LocalAppTimeout { .. } => "local_app_timeout",
            IngressError::LocalAppError { .. } => "local_app_error",
            IngressError::QueueFull { .. } => "queue_full",
            IngressError::QueueStorage(_) => "queue_unavailable",
            IngressError::SourceNotAllowed(_) => "source_not_allowed",
            IngressError::RateLimited { .. } => "rate_limited",
            IngressError::Signature { code, .. } => code,
        }
    }

    /// The status the sender gets. Transient conditions are never 4xx: some
    /// senders (GitLab) disable a hook for good on a 4xx.
    pub fn status(&self) -> StatusCode {
        match self {
            IngressError::NoRoute | IngressError::UnknownTunnel(_) => StatusCode::NOT_FOUND,
            IngressError::AgentOffline(_)
            | IngressError::QueueFull { .. }
            | IngressError::QueueStorage(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngressError::AgentLost(_)
            | IngressError::LocalAppUnreachable { .. }
            | IngressError::LocalAppError { .. } => StatusCode::BAD_GATEWAY,
            IngressError::LocalAppTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            IngressError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngressError::BadRequest(_) | IngressError::SenderAborted => StatusCode::BAD_REQUEST,
            IngressError::BodyTimeout { .. } | IngressError::BodyTooSlow { .. } => {
                StatusCode::REQUEST_TIMEOUT
            }
            IngressError::TooManyHeaders => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            IngressError::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            IngressError::SourceNotAllowed(_) => StatusCode::FORBIDDEN,
            IngressError::RateLimited { status, .. } => *status,
            IngressError::Signature { .. } => StatusCode::UNAUTHORIZED,
        }
    }

    /// Whether an HTTP/1 connection must end with this answer: the request was
    /// malformed, or its body is unread or broken.
    fn closes_connection(&self) -> bool {
        matches!(
            self,
            IngressError::BadRequest(_)
                | IngressError::SenderAborted
                | IngressError::BodyTimeout { .. }
                | IngressError::BodyTooSlow { .. }
                | IngressError::BodyTooLarge { .. }
                | IngressError::TooManyHeaders
                | IngressError::Misdirected { .. }
        )
    }
}

/// An [`IngressError`] with the delivery it ended, as the sender sees it.
struct Failure {
    err: IngressError,
    delivery_id: DeliveryId,
}

#[derive(Serialize)]
struct FailureBody {
    error: &'static str,
    message: String,
    delivery_id: String,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = FailureBody {
            error: self.err.code(),
            message: self.err.to_string(),
            delivery_id: self.delivery_id.to_string(),
        };
        let mut resp = (self.err.status(), Json(body)).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            DELIVERY_ID_HEADER,
            header_value(&self.delivery_id.to_string()),
        );
        let retry_after = match &self.err {
            IngressError::AgentOffline(_) | IngressError::QueueStorage(_) => {
                Some(OFFLINE_RETRY_AFTER)
            }
            IngressError::QueueFull { retry_after, .. }
            | IngressError::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        };
        if let Some(after) = retry_after {
            headers.insert(
                header::RETRY_AFTER,
                header_value(&retry_secs(after).to_string()),
            );
        }
        if matches!(self.err, IngressError::AgentLost(_)) {
            warn!(delivery_id = %self.delivery_id, error = %self.err, "agent dropped a delivery");
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_addresses_are_written_as_display_writes_them() {
        let edges = [0u8, 1, 9, 10, 11, 99, 100, 101, 199, 200, 255];
        for a in edges {
            for b in edges {
                let ip = std::net::IpAddr::from([a, b, 255 - a, 9]);
                let mut out = b"x, ".to_vec();
                push_ip(&mut out, ip);
                assert_eq!(out, format!("x, {ip}").into_bytes());
            }
        }
        let v6: std::net::IpAddr = "2001:db8::1".parse().expect("ip");
        let mut out = Vec::new();
        push_ip(&mut out, v6);
        assert_eq!(out, b"2001:db8::1");
        assert_eq!(concat(&["http", "://", "h", "/p?q"]), "http://h/p?q");
    }

    #[test]
    fn hosts_normalise() {
        assert_eq!(
            normalise_host("Alice.Relay.Example.COM.:8080"),
            "alice.relay.example.com"
        );
        assert_eq!(normalise_host("[::1]:8080"), "[::1]");
        assert_eq!(normalise_host("relay"), "relay");
    }

    #[test]
    fn climbing_paths_are_hostile() {
        for path in [
            "/t/x/../y",
            "/t/x/%2e%2e/y",
            "/t/x/%2E%2E",
            "/t/x/%252e%252e",
            "/t/x/..%2f..%2fetc",
            "/t/x/..%5cwin",
            "/t/x/a%00b",
            "/t/x/%2500",
            "/t/x/./y",
        ] {
            assert!(path_is_hostile(path), "{path}");
        }
        for path in [
            "/t/x/",
            "/t/x/a.b/c..d",
            "/t/x/a%20b",
            "/t/x/a%2Fb",
            "/t/x/%",
            "/t/x/%zz",
        ] {
            assert!(!path_is_hostile(path), "{path}");
        }
    }

    #[test]
    fn only_plain_chunked_transfer_encoding_passes() {
        let te = |values: &[&'static str]| {
            let (mut parts, ()) = http::Request::builder()
                .uri("/t/x/")
                .body(())
                .expect("request")
                .into_parts();
            for v in values {
                parts
                    .headers
                    .append(header::TRANSFER_ENCODING, HeaderValue::from_static(v));
            }
            check_head(&parts).is_ok()
        };
        assert!(te(&[]));
        assert!(te(&["chunked"]));
        assert!(te(&["Chunked "]));
        assert!(!te(&["gzip, chunked"]));
        assert!(!te(&["chunked", "chunked"]));
        assert!(!te(&["identity"]));
    }

    #[test]
    fn proxy_headers_are_added_and_hop_by_hop_removed() {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.append("x-private", HeaderValue::from_static("secret"));
        h.append("keep-alive", HeaderValue::from_static("timeout=5"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append(
            "x-a",
            HeaderValue::from_bytes(&[0xfe, b'b']).expect("opaque bytes are valid"),
        );
        let id = DeliveryId::new().to_string();
        let out = forward_headers(
            &h,
            "192.0.2.7:1234".parse().expect("addr"),
            "http",
            Some("relay:8080"),
            "http://relay:8080/t/x/",
            &id,
        );
        let names: Vec<&str> = out.iter().map(|(n, _)| *n).collect();
        // No `Host` (an HTTP/2 request): made from the authority, first.
        assert_eq!(&names[..3], ["host", "x-a", "x-a"]);
        assert_eq!(&out[0].1[..], b"relay:8080");
        assert_eq!(&out[2].1[..], [0xfe, b'b']);
        assert!(
            !names.contains(&"connection")
                && !names.contains(&"x-private")
                && !names.contains(&"keep-alive")
        );
        let xff = out
            .iter()
            .find(|(n, _)| *n == "x-forwarded-for")
            .expect("xff");
        assert_eq!(&xff.1[..], b"10.0.0.1, 192.0.2.7");
        let added: Vec<(&str, &[u8])> = out[out.len() - 5..]
            .iter()
            .map(|(n, v)| (*n, &v[..]))
            .collect();
        assert_eq!(
            added,
            [
                ("x-forwarded-for", &b"10.0.0.1, 192.0.2.7"[..]),
                ("x-forwarded-proto", b"http"),
                ("x-forwarded-host", b"relay:8080"),
                (ORIGINAL_URL_HEADER, b"http://relay:8080/t/x/"),
                (DELIVERY_ID_HEADER, id.as_bytes()),
            ]
        );
    }

    #[test]
    fn a_senders_host_is_kept_once_where_it_was() {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("host", HeaderValue::from_static("Relay.Example:8080"));
        let out = forward_headers(
            &h,
            "192.0.2.7:1234".parse().expect("addr"),
            "https",
            Some("Relay.Example:8080"),
            "https://Relay.Example:8080/t/x/",
            "01J0000000000000000000000",
        );
        let hosts: Vec<(usize, &[u8])> = out
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| *n == "host")
            .map(|(i, (_, v))| (i, &v[..]))
            .collect();
        assert_eq!(hosts, [(1, &b"Relay.Example:8080"[..])]);
    }
}
