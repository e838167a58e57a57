//! Hands one delivery to the local app, streams its answer back, and records
//! the exchange in the history as it goes.
//!
//! The request body is read from the delivery stream as the relay sends it and
//! the response body is written back as the app produces it; neither is held
//! whole: each chunk is also appended to the history store as it passes. A reset
//! from the relay (the sender's body was cut) reaches the app as a broken body,
//! never as a short, complete one.

use std::{
    borrow::Cow,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::FutureExt;
use hookrelay_shared::{
    codec::{self, read_frame, write_frame},
    http::{connection_tokens, is_hop_by_hop},
    protocol::reset,
    signature::{self, SecretSet, SignedRequest},
    AgentReply, CodecError, FailureKind, RequestHead, ResponseHead,
};
use http::{HeaderName, HeaderValue, Method, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use tracing::{debug, warn};

use crate::{
    app_pool::{self, AppBody, AppPool, SendError},
    config::Target,
    dedupe,
    history::{
        self, Durations, Exchange, ExchangeId, History, Part, RequestRecord, ResponseRecord,
        INLINE_BODY_MAX,
    },
    queued::{QueuedOutcome, RetryPolicy},
    terminal::Terminal,
};

/// Time the relay gets to send a delivery's head after opening its stream.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest response body taken from the local app: relayed to the sender,
/// recorded, or read back for a replay. Above it the answer is cut off (the
/// sender sees the response break) and the exchange is a local app error.
/// The relay's default request body limit; webhook answers are a few bytes.
pub(crate) const MAX_RESPONSE_BYTES: u64 = 25 * 1024 * 1024;

/// Largest chunk read from a QUIC stream at once.
const MAX_CHUNK_BYTES: usize = 256 * 1024;

type StreamBoxed =
    Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Pieces>, io::Error>> + Send>>;

/// The keep-alive HTTP client used for the local app by replays
/// (deliveries use the forwarder's own connections, [`AppPool`]).
pub(crate) fn local_client<B>() -> Client<HttpConnector, B>
where
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(app_pool::MAX_IDLE)
        .pool_idle_timeout(app_pool::IDLE_TIMEOUT)
        .build(app_pool::connector())
}

/// Forwards deliveries to one local app over a keep-alive pool.
#[derive(Clone)]
pub(crate) struct Forwarder {
    pool: AppPool,
    target: Target,
    terminal: Terminal,
    history: History,
    secrets: Arc<SecretSet>,
    dedupe: bool,
    /// Provider events being delivered right now, so that a copy arriving
    /// meanwhile (Slack retries after 3 s, while the first may still run)
    /// waits for the first one's outcome instead of reaching the app too.
    in_flight: InFlightMap,
}

type InFlightMap =
    Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// Holds one provider event's in-flight slot until the exchange is recorded.
struct InFlight {
    key: String,
    map: InFlightMap,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight").field("key", &self.key).finish()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|slot| Arc::strong_count(slot) == 1)
        {
            map.remove(&self.key);
        }
    }
}

/// Header names and raw values, in order.
type RawHeaders = Vec<(String, Vec<u8>)>;

/// What the local app did with a request.
#[derive(Debug, Default)]
struct Forwarded {
    /// Status and headers of the app's answer, when it answered.
    response: Option<(u16, RawHeaders)>,
    app_ms: Option<u64>,
    /// The provider's event id, from a request whose signature verified.
    event_id: Option<String>,
    /// Answered from this earlier exchange instead of calling the app.
    duplicate_of: Option<ExchangeId>,
    /// This event's in-flight slot, released once the exchange is recorded.
    in_flight: Option<InFlight>,
    /// The signature verdict, when it was reached before forwarding.
    verdict: Option<signature::Verdict>,
    /// Attempt details of a queued webhook.
    queued: Option<history::QueuedAttempt>,
}

impl Forwarder {
    pub fn new(
        target: Target,
        terminal: Terminal,
        history: History,
        secrets: Arc<SecretSet>,
        dedupe: bool,
    ) -> Result<Self, String> {
        Ok(Forwarder {
            pool: AppPool::new(&target)?,
            target,
            terminal,
            history,
            secrets,
            dedupe,
            in_flight: Arc::default(),
        })
    }

    /// Waits until no other delivery of this event is in flight, then holds
    /// its slot.
    async fn claim(&self, key: String) -> InFlight {
        let slot = {
            let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let guard = slot.lock_owned().await;
        InFlight {
            key,
            map: self.in_flight.clone(),
            guard: Some(guard),
        }
    }

    /// The verdict on `head` with `body`, as of the relay's arrival stamp:
    /// how long the agent took to get it must not make a fresh webhook stale.
    fn verdict(&self, head: &RequestHead, body: &[u8]) -> signature::Verdict {
        let req = SignedRequest {
            headers: &head.headers,
            body,
            url: Some(&head.public_url),
        };
        let now = i64::try_from(head.received_at_ms / 1000).unwrap_or(i64::MAX);
        signature::verify_detected(&self.secrets, &req, now)
    }

    /// For a signed request from a provider that names its events, reads
    /// the whole body (the signature covers it) and looks the event up.
    /// `Err` holds the earlier exchange that delivered it; `Ok` the body to
    /// forward, when it was read.
    async fn check_duplicate(
        &self,
        head: &RequestHead,
        recv: &SharedRecv,
        tee: &Tee,
        limit: Duration,
        forwarded: &mut Forwarded,
    ) -> Result<Option<Bytes>, Box<Exchange>> {
        let Some(provider) = signature::detect(&head.headers) else {
            return Ok(None);
        };
        let named = dedupe::id_in_body(provider)
            || dedupe::event_id(provider, &head.headers, b"").is_some();
        if !self.dedupe
            || !dedupe::has_event_ids(provider)
            || self.secrets.get(provider).is_empty()
            || !named
        {
            return Ok(None);
        }
        let Some(body) = read_whole(recv, tee, limit).await else {
            // Broke off: forward what arrived and let the app judge.
            return Ok(None);
        };
        let verdict = self.verdict(head, &body);
        let valid = verdict.is_valid();
        forwarded.verdict = Some(verdict);
        if valid {
            if let Some(event_id) = dedupe::event_id(provider, &head.headers, &body) {
                let key = format!("{}\0{provider}\0{event_id}", head.tunnel.as_str());
                forwarded.in_flight = Some(self.claim(key).await);
                if let Ok(Some(first)) =
                    self.history
                        .delivered(head.tunnel.as_str(), provider, &event_id)
                {
                    forwarded.event_id = Some(event_id);
                    return Err(Box::new(first));
                }
                forwarded.event_id = Some(event_id);
            }
        }
        Ok(Some(Bytes::from(body)))
    }

    /// Answers a provider's retry with the answer the app gave the first time.
    async fn answer_duplicate(
        &self,
        send: &mut quinn::SendStream,
        first: &Exchange,
        response_tee: &Tee,
        forwarded: &mut Forwarded,
    ) -> Outcome {
        let Some(body) = self.reuse_answer(first, forwarded) else {
            return fail(
                send,
                FailureKind::LocalAppError,
                "no recorded answer".into(),
            )
            .await;
        };
        let Some((status, headers)) = forwarded.response.clone() else {
            return Outcome::Cancelled;
        };
        let reply = AgentReply::Response(ResponseHead { status, headers });
        if write_frame(send, &reply).await.is_err() {
            return Outcome::Cancelled;
        }
        response_tee.append(&body);
        if !body.is_empty() && send.write_chunk(Bytes::from(body)).await.is_err() {
            return Outcome::Cancelled;
        }
        let _ = send.finish();
        Outcome::Responded
    }

    /// Serves one delivery stream opened by the relay.
    pub async fn handle(&self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let head = match tokio::time::timeout(HEAD_TIMEOUT, read_frame::<RequestHead, _>(&mut recv))
            .await
        {
            Ok(Ok(Some(head))) => head,
            Ok(Ok(None)) => return,
            Ok(Err(CodecError::Io(_) | CodecError::Truncated)) | Err(_) => {
                // The relay gave up on this delivery before its head arrived.
                debug!("delivery cancelled before its head arrived");
                let _ = send.reset(reset::CANCELLED.into());
                return;
            }
            Ok(Err(err)) => {
                warn!(
                    error = &err as &dyn std::error::Error,
                    "relay sent a bad delivery head"
                );
                let _ = send.reset(reset::CANCELLED.into());
                return;
            }
        };
        tracing::Span::current().record("delivery_id", tracing::field::display(head.delivery_id));
        let received_at_ms = history::now_ms();
        let started = Instant::now();
        let id = ExchangeId::new();
        let tee = Tee::new(self.history.clone(), id, Part::Request);
        let response_tee = Tee::new(self.history.clone(), id, Part::Response);
        let mut forwarded = Forwarded::default();
        let stopped = send.stopped();
        let outcome = tokio::select! {
            outcome = self.forward(&head, recv, &mut send, tee.clone(), response_tee.clone(), &mut forwarded) => outcome,
            // The relay gave up (sender gone, relay timeout): stop the local request too.
            _ = stopped => Outcome::Cancelled,
        };
        let took = started.elapsed();
        // The answer is with quinn, but its packets leave only when the
        // connection's driver task runs: recording comes after that.
        let_drivers_run().await;
        // Recorded (on disk) before the terminal line: whatever the developer
        // saw printed survives a kill -9.
        // The head is not needed after this: its strings and headers move
        // into the record instead of being copied.
        let exchange = self
            .record(
                Cow::Owned(head),
                id,
                received_at_ms,
                took,
                &outcome,
                forwarded,
                &tee,
                &response_tee,
                Durable::Lingering,
            )
            .await;
        self.terminal.exchange(&exchange);
    }

    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        head: Cow<'_, RequestHead>,
        id: ExchangeId,
        received_at_ms: u64,
        took: Duration,
        outcome: &Outcome,
        forwarded: Forwarded,
        request_tee: &Tee,
        response_tee: &Tee,
        durable: Durable,
    ) -> Arc<Exchange> {
        let (history_outcome, error) = match outcome {
            Outcome::Responded => (history::Outcome::Ok, None),
            Outcome::Failed(kind, message) => (outcome_of(*kind), Some(message.clone())),
            Outcome::Cancelled => (
                history::Outcome::Cancelled,
                Some("the relay or the sender gave up before the app finished".into()),
            ),
        };
        // A body the history could not keep whole (a full disk) is said so
        // on the exchange; replay refuses it (see `replay`).
        let error = [(request_tee, "request"), (response_tee, "response")]
            .into_iter()
            .filter_map(|(tee, which)| {
                tee.failure().map(|why| {
                    format!("the {which} body was not recorded whole (only the first part is kept): {why}")
                })
            })
            .chain(error)
            .reduce(|a, b| format!("{b}; {a}"));
        let provider = signature::detect(&head.headers);
        // With secrets configured, a request without any signature is worth
        // flagging ("unsigned"); without them, no verdict unless one is signed.
        let judge = provider.is_some() || !self.secrets.is_empty();
        let mut event_id = forwarded.event_id;
        let in_flight = forwarded.in_flight;
        // Judged already when the body was read whole for dedupe; otherwise
        // judge the recorded body now.
        let verdict = forwarded.verdict.or_else(|| {
            judge.then(|| {
                let body = request_tee.body();
                let verdict = self.verdict(&head, &body);
                if event_id.is_none() && verdict.is_valid() {
                    event_id = provider.and_then(|p| dedupe::event_id(p, &head.headers, &body));
                }
                verdict
            })
        });
        let relay_to_agent_ms = received_at_ms.checked_sub(head.received_at_ms);
        let RequestHead {
            delivery_id,
            tunnel,
            method,
            path,
            headers: request_headers,
            remote_addr,
            public_url,
            received_at_ms: received_at_relay_ms,
            ..
        } = head.into_owned();
        let exchange = Exchange {
            id,
            delivery_id: Some(delivery_id.to_string()),
            tunnel: tunnel.into(),
            received_at_relay_ms: Some(received_at_relay_ms),
            received_at_ms,
            remote_addr: Some(history::socket_addr_text(remote_addr)),
            method,
            url: public_url,
            path,
            target: self.target.text(),
            request: RequestRecord {
                headers: history::headers_into(request_headers),
                body_len: request_tee.len(),
            },
            response: forwarded.response.map(|(status, headers)| ResponseRecord {
                status,
                headers: history::headers_into(headers),
                body_len: response_tee.len(),
            }),
            outcome: history_outcome,
            error,
            duration: Durations {
                relay_to_agent_ms,
                local_app_ms: forwarded.app_ms,
                total_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            },
            provider,
            signature: verdict,
            replay_of: None,
            event_id,
            duplicate_of: forwarded.duplicate_of,
            queued: forwarded.queued,
        };
        let (request_body, response_body) = (
            request_tee.finish_for_record(),
            response_tee.finish_for_record(),
        );
        let bodies = [
            (Part::Request, request_body.as_body()),
            (Part::Response, response_body.as_body()),
        ];
        // Shared with the history's live feed, not copied for it.
        let exchange = Arc::new(exchange);
        let recorded = match durable {
            Durable::Now => self.history.record(exchange.clone(), &bodies).await,
            Durable::Lingering => {
                self.history
                    .record_lingering(exchange.clone(), &bodies)
                    .await
            }
            Durable::ByCaller => self.history.store(&exchange, &bodies),
        };
        if let Err(err) = recorded {
            tracing::error!(
                error = &err as &dyn std::error::Error,
                "cannot record the exchange"
            );
        }
        // Recorded: a copy of this event waiting in `claim` may look now.
        drop(in_flight);
        exchange
    }

    async fn forward(
        &self,
        head: &RequestHead,
        recv: quinn::RecvStream,
        send: &mut quinn::SendStream,
        request_tee: Tee,
        response_tee: Tee,
        forwarded: &mut Forwarded,
    ) -> Outcome {
        let timeout = Duration::from_millis(head.timeout_ms);
        // Shared with the request body, so that when the app fails before it
        // read the whole body, the rest is still read and recorded: history
        // (and any replay of this failure) must have the body the sender sent.
        let recv: SharedRecv = Arc::new(tokio::sync::Mutex::new(recv));
        let buffered = match self
            .check_duplicate(head, &recv, &request_tee, timeout, forwarded)
            .await
        {
            Ok(buffered) => buffered,
            Err(first) => {
                return self
                    .answer_duplicate(send, &first, &response_tee, forwarded)
                    .await
            }
        };
        let body = match buffered {
            Some(bytes) => RelayBody::buffered(bytes),
            None => RelayBody::new(recv.clone(), head.body_len, request_tee.clone()),
        };
        let request = match self.build_request(head, body) {
            Ok(r) => r,
            Err(message) => {
                drain(&recv, &request_tee, timeout).await;
                return fail(send, FailureKind::BadRequest, message).await;
            }
        };
        let response = match self.send_to_app(request, timeout, forwarded).await {
            Ok(response) => response,
            Err((kind, message)) => {
                drain(&recv, &request_tee, timeout).await;
                return fail(send, kind, message).await;
            }
        };
        take_end(&recv, head.body_len, &request_tee);

        let (parts, mut body) = response.into_parts();
        let connection: Vec<String> = parts
            .headers
            .get_all(http::header::CONNECTION)
            .iter()
            .flat_map(|v| connection_tokens(v.as_bytes()).collect::<Vec<_>>())
            .collect();
        let headers: Vec<(String, Vec<u8>)> = parts
            .headers
            .iter()
            .filter(|(n, _)| !is_hop_by_hop(n.as_str(), &connection))
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        let status = parts.status.as_u16();
        let reply = AgentReply::Response(ResponseHead { status, headers });
        // The head goes out with the first body chunk, and the stream's end
        // with it when that was all: a small answer is one QUIC packet to the
        // relay instead of three (each one a send, a receive and a wake-up on
        // both sides). A body not ready yet is not waited for.
        let framed = codec::frame(&reply);
        // Kept for the record, moved rather than copied before the send.
        if let AgentReply::Response(head) = reply {
            forwarded.response = Some((status, head.headers));
        }
        let mut first = match framed {
            Ok(frame) => vec![frame],
            Err(err) => {
                let _ = send.reset(reset::BODY_ABORTED.into());
                return Outcome::Failed(
                    FailureKind::LocalAppError,
                    format!("the local app's answer cannot be relayed: {err}"),
                );
            }
        };
        // The body's end or its breaking off, when polled here: the loop
        // below handles it as if it had polled it itself.
        let mut polled = None;
        // What is left of the time the app gets to produce its body (time
        // spent waiting on the sender is not the app's).
        let mut budget = timeout;
        while let Some(frame) = body.frame().now_or_never() {
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        response_tee.append(&data);
                        first.push(data);
                        break;
                    }
                }
                end_or_error => {
                    polled = Some(end_or_error);
                    break;
                }
            }
        }
        if send.write_all_chunks(&mut first).await.is_err() {
            return Outcome::Cancelled;
        }
        loop {
            let frame = match polled.take() {
                Some(frame) => frame,
                // Ready at once when the first chunk was all of it.
                None => {
                    let waiting = Instant::now();
                    match tokio::time::timeout(budget, body.frame()).await {
                        Ok(frame) => {
                            budget = budget.saturating_sub(waiting.elapsed());
                            frame
                        }
                        Err(_) => {
                            let _ = send.reset(reset::BODY_ABORTED.into());
                            return Outcome::Failed(
                                FailureKind::LocalAppTimeout,
                                format!(
                                    "the local app's response body did not end within {:.1}s; cut off",
                                    timeout.as_secs_f32()
                                ),
                            );
                        }
                    }
                }
            };
            match frame {
                None => {
                    let _ = send.finish();
                    return Outcome::Responded;
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        response_tee.append(&data);
                        if send.write_chunk(data).await.is_err() {
                            return Outcome::Cancelled;
                        }
                    }
                }
                Some(Err(err)) => {
                    debug!(error = %err, "local app response body broke");
                    let _ = send.reset(reset::BODY_ABORTED.into());
                    return Outcome::Failed(FailureKind::LocalAppError, answer_failure(&*err));
                }
            }
        }
    }

    /// One attempt at handing a queued webhook (already on the agent's disk)
    /// to the app. Stores the attempt in the history, except when the app
    /// could not even be connected to: nothing reached it then, and a long
    /// outage must not fill the history with identical failures. The record
    /// is written but not flushed: the caller's next flush covers it, then the
    /// caller passes it to [`Forwarder::announce`].
    pub(crate) async fn deliver_queued(
        &self,
        head: &RequestHead,
        body: Bytes,
        attempt: u32,
        policy: &RetryPolicy,
    ) -> (QueuedOutcome, Option<Arc<Exchange>>) {
        let received_at_ms = history::now_ms();
        let started = Instant::now();
        let id = ExchangeId::new();
        let request_tee = Tee::new(self.history.clone(), id, Part::Request);
        let response_tee = Tee::new(self.history.clone(), id, Part::Response);
        let mut forwarded = Forwarded::default();
        let (outcome, retry_after) = self
            .attempt_queued(head, body, &request_tee, &response_tee, &mut forwarded)
            .await;
        if matches!(
            outcome,
            Outcome::Failed(FailureKind::LocalAppUnreachable, _)
        ) {
            // Not recorded (see above): drop the request chunks written.
            let _ = self.history.delete(id);
            return (QueuedOutcome::Unreachable, None);
        }
        let status = forwarded.response.as_ref().map(|(s, _)| *s);
        let retryable = match (&outcome, status) {
            (_, Some(s)) => s == 429 || s >= 500,
            // Cannot be rebuilt as HTTP: no attempt will ever do better.
            (Outcome::Responded | Outcome::Failed(FailureKind::BadRequest, _), None) => false,
            (_, None) => true,
        };
        let next = if retryable && attempt < policy.attempts {
            let delay = policy
                .delay(attempt)
                .max(retry_after.unwrap_or_default().min(policy.max));
            Some(history::now_ms() + u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
        } else {
            None
        };
        let failed = retryable && next.is_none();
        forwarded.queued = Some(history::QueuedAttempt {
            attempt,
            max_attempts: policy.attempts,
            next_attempt_at_ms: next,
            failed,
            interrupted: false,
        });
        let exchange = self
            .record(
                Cow::Borrowed(head),
                id,
                received_at_ms,
                started.elapsed(),
                &outcome,
                forwarded,
                &request_tee,
                &response_tee,
                Durable::ByCaller,
            )
            .await;
        let outcome = match next {
            Some(at_ms) => QueuedOutcome::RetryAt(at_ms),
            None if failed => QueuedOutcome::Failed,
            None => QueuedOutcome::Done,
        };
        (outcome, Some(exchange))
    }

    /// Shows a stored and flushed exchange: live views, terminal, metrics.
    pub(crate) fn announce(&self, exchange: Arc<Exchange>) {
        self.terminal.exchange(&exchange);
        self.history.announce(exchange);
    }

    /// Records that the agent stopped while the app had this queued webhook.
    pub(crate) async fn record_interrupted(
        &self,
        head: &RequestHead,
        body: &[u8],
        attempt: u32,
        policy: &RetryPolicy,
    ) {
        let id = ExchangeId::new();
        let tee = Tee::new(self.history.clone(), id, Part::Request);
        tee.append(body);
        let forwarded = Forwarded {
            queued: Some(history::QueuedAttempt {
                attempt,
                max_attempts: policy.attempts,
                next_attempt_at_ms: None,
                failed: true,
                interrupted: true,
            }),
            ..Forwarded::default()
        };
        let outcome = Outcome::Failed(
            FailureKind::LocalAppError,
            "the agent stopped while the app was handling this webhook; it is not sent again \
             (at most once): replay it if the app did not get it"
                .into(),
        );
        let exchange = self
            .record(
                Cow::Borrowed(head),
                id,
                history::now_ms(),
                Duration::ZERO,
                &outcome,
                forwarded,
                &tee,
                &Tee::new(self.history.clone(), id, Part::Response),
                Durable::Now,
            )
            .await;
        self.terminal.exchange(&exchange);
    }

    async fn attempt_queued(
        &self,
        head: &RequestHead,
        body: Bytes,
        request_tee: &Tee,
        response_tee: &Tee,
        forwarded: &mut Forwarded,
    ) -> (Outcome, Option<Duration>) {
        request_tee.append(&body);
        let timeout = Duration::from_millis(head.timeout_ms);
        if let Some(first) = self.queued_duplicate(head, &body, forwarded).await {
            return match self.reuse_answer(&first, forwarded) {
                Some(answer) => {
                    response_tee.append(&answer);
                    (Outcome::Responded, None)
                }
                None => (
                    Outcome::Failed(FailureKind::LocalAppError, "no recorded answer".into()),
                    None,
                ),
            };
        }
        let request = match self.build_request(head, RelayBody::buffered(body)) {
            Ok(r) => r,
            Err(message) => return (Outcome::Failed(FailureKind::BadRequest, message), None),
        };
        let response = match self.send_to_app(request, timeout, forwarded).await {
            Ok(response) => response,
            Err((kind, message)) => return (Outcome::Failed(kind, message), None),
        };
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let (parts, mut body) = response.into_parts();
        let headers: RawHeaders = parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        forwarded.response = Some((parts.status.as_u16(), headers));
        let read = tokio::time::timeout(timeout, async {
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Ok(data) = frame.into_data() {
                            response_tee.append(&data);
                        }
                    }
                    Err(err) => return Err(answer_failure(&*err)),
                }
            }
            Ok(())
        })
        .await;
        match read {
            Ok(Ok(())) => (Outcome::Responded, retry_after),
            Ok(Err(message)) => (
                Outcome::Failed(FailureKind::LocalAppError, message),
                retry_after,
            ),
            Err(_) => (
                Outcome::Failed(
                    FailureKind::LocalAppTimeout,
                    format!(
                        "the local app's response body did not end within {:.1}s",
                        timeout.as_secs_f32()
                    ),
                ),
                retry_after,
            ),
        }
    }

    /// The earlier exchange that delivered this queued webhook's provider
    /// event, when its signature verified and the app accepted it already.
    async fn queued_duplicate(
        &self,
        head: &RequestHead,
        body: &[u8],
        forwarded: &mut Forwarded,
    ) -> Option<Exchange> {
        let provider = signature::detect(&head.headers)?;
        if !self.dedupe || !dedupe::has_event_ids(provider) || self.secrets.get(provider).is_empty()
        {
            return None;
        }
        let verdict = self.verdict(head, body);
        let valid = verdict.is_valid();
        forwarded.verdict = Some(verdict);
        if !valid {
            return None;
        }
        let event_id = dedupe::event_id(provider, &head.headers, body)?;
        let key = format!("{}\0{provider}\0{event_id}", head.tunnel.as_str());
        forwarded.in_flight = Some(self.claim(key).await);
        forwarded.event_id = Some(event_id.clone());
        self.history
            .delivered(head.tunnel.as_str(), provider, &event_id)
            .ok()
            .flatten()
    }

    /// Takes the answer of `first` as this exchange's own, without the app:
    /// its status and headers (plus `X-Hookrelay-Duplicate-Of`) go into
    /// `forwarded`, and its body is returned. `None` when `first` has no
    /// recorded answer.
    fn reuse_answer(&self, first: &Exchange, forwarded: &mut Forwarded) -> Option<Vec<u8>> {
        let response = first.response.as_ref()?;
        let body = self
            .history
            .body(first.id, Part::Response)
            .unwrap_or_default();
        let mut headers: RawHeaders = response
            .headers
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        headers.push((
            "x-hookrelay-duplicate-of".into(),
            first.id.to_string().into_bytes(),
        ));
        forwarded.response = Some((response.status, headers));
        forwarded.duplicate_of = Some(first.id);
        Some(body)
    }

    /// Sends `request` to the app and waits up to `timeout` for its response
    /// head, noting the app's time in `forwarded`. The answer's body fails
    /// past [`MAX_RESPONSE_BYTES`] (see [`answer_failure`]). A failure comes back as the
    /// kind the relay reports and a message naming the target.
    async fn send_to_app(
        &self,
        request: Request<RelayBody>,
        timeout: Duration,
        forwarded: &mut Forwarded,
    ) -> Result<http::Response<Limited<AppBody>>, (FailureKind, String)> {
        let sent_at = Instant::now();
        let response = match tokio::time::timeout(timeout, self.pool.send(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(SendError::Connect(err))) => {
                debug!(error = %error_chain(&*err), "cannot connect to the local app");
                return Err((
                    FailureKind::LocalAppUnreachable,
                    format!("cannot connect to {}", self.target),
                ));
            }
            Ok(Err(SendError::Http(err))) => {
                return Err((
                    FailureKind::LocalAppError,
                    format!("{} broke the exchange: {}", self.target, error_chain(&err)),
                ))
            }
            Err(_) => {
                return Err((
                    FailureKind::LocalAppTimeout,
                    format!(
                        "{} did not answer within {}s",
                        self.target,
                        timeout.as_secs_f32()
                    ),
                ))
            }
        };
        forwarded.app_ms = Some(u64::try_from(sent_at.elapsed().as_millis()).unwrap_or(u64::MAX));
        Ok(response.map(|body| Limited::new(body, MAX_RESPONSE_BYTES as usize)))
    }

    fn build_request(
        &self,
        head: &RequestHead,
        body: RelayBody,
    ) -> Result<Request<RelayBody>, String> {
        let method = Method::from_bytes(head.method.as_bytes())
            .map_err(|_| format!("invalid method {:?}", head.method))?;
        let mut request = Request::builder()
            .method(method)
            .uri(self.target.origin_form(&head.path))
            .body(body)
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

/// Lets the tasks already woken run before this one goes on. On the agent's
/// single-threaded runtime, data written to a QUIC stream leaves when the
/// connection's driver task runs, which is after the writing task returns
/// `Pending`; recording an exchange (its encoding and storing, about 25,000
/// instructions) between the answer's last write and that point kept the
/// answer from the relay. Measured with `perf record -e raw_syscalls:*` on the
/// agent through workload c: from the app's answer read to its packet sent,
/// median 33 -> 23 us. Waking itself puts this task at the back of the run
/// queue (first in, first out on this runtime), behind the driver woken by
/// the write; `tokio::task::yield_now` would defer it until the runtime has
/// run out of ready tasks, which on a busy agent (workload a) can be many
/// deliveries later, with this exchange held in memory meanwhile.
async fn let_drivers_run() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if std::mem::replace(&mut yielded, true) {
            return std::task::Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await;
}

/// Whether [`Forwarder::record`] flushes and announces the record itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Durable {
    /// Flushed and announced before `record` returns.
    Now,
    /// The same, sharing its fsync with the records of the next few
    /// milliseconds (the sender already has its answer).
    Lingering,
    /// Only written: the caller flushes, then announces.
    ByCaller,
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

fn outcome_of(kind: FailureKind) -> history::Outcome {
    match kind {
        FailureKind::LocalAppUnreachable => history::Outcome::LocalAppUnreachable,
        FailureKind::LocalAppTimeout => history::Outcome::LocalAppTimeout,
        FailureKind::LocalAppError => history::Outcome::LocalAppError,
        FailureKind::BadRequest => history::Outcome::BadRequest,
    }
}

/// Copies one body into the history as it streams past: kept in memory while
/// it is small (it then goes inside the exchange's record, one write for
/// all); once it outgrows [`INLINE_BODY_MAX`], written in pieces of about
/// [`History::piece_bytes`], however small the network's chunks (a QUIC read
/// is often one packet, and a write per packet made a 256 KiB upload cost
/// ~200 writes). Call [`Tee::finish`] before the exchange is recorded.
#[derive(Clone)]
struct Tee {
    history: History,
    id: ExchangeId,
    part: Part,
    state: Arc<Mutex<TeeState>>,
}

#[derive(Default)]
struct TeeState {
    /// The body so far while it is small enough to go inline; after that,
    /// what is not written yet.
    buf: Vec<u8>,
    /// Where the pieces written so far went; none while the body is inline.
    spilled: history::Spilled,
    len: u64,
    /// Why a piece could not be written: nothing more is, so the recorded
    /// body is a prefix of the real one, never one with a hole.
    failed: Option<String>,
}

impl TeeState {
    /// Whether the body is small enough, so far, to go inside the record.
    fn inline(&self) -> bool {
        self.spilled.pieces == 0 && self.len <= INLINE_BODY_MAX as u64
    }
}

/// A body at its end, as [`Tee::finish`] leaves it.
#[derive(Debug, PartialEq, Eq)]
enum Teed {
    /// Small: to go inside the record.
    Inline(Vec<u8>),
    /// Written to the history in pieces, which are here.
    Spilled(Vec<history::Extent>),
    /// Written in part (`written`, `pieces` of them); `rest` goes with the
    /// record, in the same write.
    Tail {
        written: Vec<history::Extent>,
        pieces: u32,
        rest: Vec<u8>,
    },
}

impl Teed {
    fn as_body(&self) -> history::Body<'_> {
        match self {
            Teed::Inline(bytes) => history::Body::Inline(bytes),
            Teed::Spilled(extents) => history::Body::Spilled(extents),
            Teed::Tail {
                written,
                pieces,
                rest,
            } => history::Body::Tail {
                written,
                pieces: *pieces,
                rest,
            },
        }
    }
}

impl Tee {
    fn new(history: History, id: ExchangeId, part: Part) -> Self {
        Tee {
            history,
            id,
            part,
            state: Arc::default(),
        }
    }

    fn append(&self, chunk: &[u8]) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.len += chunk.len() as u64;
        state.buf.extend_from_slice(chunk);
        if !state.inline() && state.buf.len() >= self.history.piece_bytes() {
            self.spill(&mut state);
        }
    }

    /// Writes what is buffered as the next chunk.
    fn spill(&self, state: &mut TeeState) {
        if state.buf.is_empty() || state.failed.is_some() {
            state.buf.clear();
            return;
        }
        let TeeState { buf, spilled, .. } = state;
        if let Err(err) = self.history.append_body(self.id, self.part, spilled, buf) {
            tracing::error!(
                error = &err as &dyn std::error::Error,
                "cannot record a body chunk"
            );
            state.failed = Some(err.to_string());
        }
        state.buf.clear();
    }

    /// Why the body could not be recorded whole, if it could not.
    fn failure(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed
            .clone()
    }

    fn len(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).len
    }

    /// Ends the body: returns it when it is small enough to go inside the
    /// record, else writes the rest of it to the history and returns where
    /// it went. The segment it went to is held until the last clone of this
    /// tee is dropped, so record it before.
    fn finish(&self) -> Teed {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.inline() {
            return Teed::Inline(state.buf.clone());
        }
        self.spill(&mut state);
        Teed::Spilled(state.spilled.extents().to_vec())
    }

    /// Ends the body for its record, which the caller stores next: as
    /// [`Tee::finish`], but what is still buffered of a body too large to go
    /// inside the record is left to the record's own append (written with
    /// it; a webhook of a few KiB has nothing else to write).
    ///
    /// The record is the tee's last use: what is buffered moves into it
    /// rather than being copied ([`Tee::body`] and [`Tee::len`] are read before).
    fn finish_for_record(&self) -> Teed {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.inline() {
            return Teed::Inline(std::mem::take(&mut state.buf));
        }
        if state.failed.is_none() && !state.buf.is_empty() {
            return Teed::Tail {
                written: state.spilled.extents().to_vec(),
                pieces: state.spilled.pieces,
                rest: std::mem::take(&mut state.buf),
            };
        }
        drop(state);
        self.finish()
    }

    /// The whole body as recorded so far: the pieces written, then what is
    /// still buffered (left there for the record's write), unless a piece
    /// could not be written (then only the pieces before it).
    fn body(&self) -> Vec<u8> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.inline() {
            return state.buf.clone();
        }
        let mut body = self
            .history
            .spilled_body(self.id, self.part, &state.spilled)
            .unwrap_or_default();
        if state.failed.is_none() {
            body.extend_from_slice(&state.buf);
        }
        body
    }
}

/// The delivery stream's receiving half, shared by the request body handed to
/// the app and [`drain`]. Chunks are recorded while the lock is held, so the
/// history keeps them in order whoever reads them.
type SharedRecv = Arc<tokio::sync::Mutex<quinn::RecvStream>>;

/// Why reading the app's answer, limited to [`MAX_RESPONSE_BYTES`], failed.
pub(crate) fn answer_failure(err: &(dyn std::error::Error + Send + Sync + 'static)) -> String {
    if err.is::<LengthLimitError>() {
        format!(
            "the local app's response body is over {} MiB; cut off",
            MAX_RESPONSE_BYTES >> 20
        )
    } else {
        format!("the local app's response body broke off: {err}")
    }
}

/// Reads and records the whole request body, within `limit`; `None` when it
/// broke off or took too long.
async fn read_whole(recv: &SharedRecv, tee: &Tee, limit: Duration) -> Option<Vec<u8>> {
    tokio::time::timeout(limit, async {
        let mut recv = recv.lock().await;
        let mut body = Vec::new();
        loop {
            match recv.read_chunk(MAX_CHUNK_BYTES, true).await {
                Ok(Some(chunk)) => {
                    tee.append(&chunk.bytes);
                    body.extend_from_slice(&chunk.bytes);
                }
                Ok(None) => return Some(body),
                Err(_) => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Takes the end of the request stream once the declared body has been read
/// whole. hyper stops polling a body when its declared length is through, and
/// a stream dropped before its end was read makes quinn send the relay a
/// STOP_SENDING, which the relay answers: measured, 4 packets per small
/// delivery instead of 2 (each a send, a receive and wake-ups on both sides).
/// The end travels with the last body bytes, so it is there by now.
fn take_end(recv: &SharedRecv, declared: Option<u64>, tee: &Tee) {
    if declared != Some(tee.len()) {
        return; // a body of unknown length is read to its end anyway
    }
    if let Ok(mut recv) = recv.try_lock() {
        if let Some(Ok(Some(extra))) = recv.read_chunk(MAX_CHUNK_BYTES, true).now_or_never() {
            tee.append(&extra.bytes); // beyond the declared length: the relay never sends it
        }
    }
}

/// Reads and records whatever of the request body the app did not take,
/// for at most `limit`.
async fn drain(recv: &SharedRecv, tee: &Tee, limit: Duration) {
    let _ = tokio::time::timeout(limit, async {
        let mut recv = recv.lock().await;
        while let Ok(Some(chunk)) = recv.read_chunk(MAX_CHUNK_BYTES, true).await {
            tee.append(&chunk.bytes);
        }
    })
    .await;
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

pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// How a delivery ended (the status is in [`Forwarded`]).
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// The app answered and its whole response went back.
    Responded,
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
    fn new(recv: SharedRecv, len: Option<u64>, tee: Tee) -> Self {
        let stream = futures_util::stream::unfold(Reading::Open(recv), move |state| {
            let tee = tee.clone();
            async move {
                let shared = match state {
                    Reading::Open(shared) => shared,
                    Reading::Failed(err) => return Some((Err(err), Reading::Ended)),
                    Reading::Ended => return None,
                };
                let mut recv = shared.lock().await;
                let first = match recv.read_chunk(MAX_CHUNK_BYTES, true).await {
                    Ok(Some(chunk)) => chunk.bytes,
                    Ok(None) => return None,
                    Err(e) => return Some((Err(io::Error::other(e)), Reading::Ended)),
                };
                let (pieces, ended) = gather(&mut recv, first, &tee);
                drop(recv);
                Some((
                    Ok(Frame::data(pieces)),
                    ended.unwrap_or(Reading::Open(shared)),
                ))
            }
        });
        RelayBody {
            stream: Box::pin(stream),
            len,
        }
    }

    /// A body already read (and recorded) whole.
    pub(crate) fn buffered(bytes: Bytes) -> Self {
        let len = Some(bytes.len() as u64);
        let stream =
            futures_util::stream::once(async move { Ok(Frame::data(Pieces::from(bytes))) });
        RelayBody {
            stream: Box::pin(stream),
            len,
        }
    }
}

/// Where reading a request body from its delivery stream stands.
enum Reading {
    Open(SharedRecv),
    /// The stream broke after data that was handed on: the error is next.
    Failed(io::Error),
    Ended,
}

/// Most bytes of a request body handed to the app at once.
const GATHER_BYTES: usize = 64 * 1024;

/// `first` and the chunks already received after it, up to [`GATHER_BYTES`],
/// each recorded by `tee` (`first` too): quinn hands a large body out one QUIC packet
/// (about 1.4 KiB) at a time, and hyper wrote each piece it was handed to the
/// app's socket on its own (35 `writev` per 256 KiB body, `strace`), each a
/// read in the app. Handed over together, they go in one `writev`, without
/// being copied together. Nothing is waited for. The second value is what
/// reading found after the data, when it found the stream's end or its
/// breaking off.
fn gather(recv: &mut quinn::RecvStream, first: Bytes, tee: &Tee) -> (Pieces, Option<Reading>) {
    tee.append(&first);
    let mut pieces = Pieces::from(first);
    let mut ended = None;
    while pieces.remaining < GATHER_BYTES {
        match recv
            .read_chunk(GATHER_BYTES - pieces.remaining, true)
            .now_or_never()
        {
            Some(Ok(Some(chunk))) => {
                tee.append(&chunk.bytes);
                pieces.push(chunk.bytes);
            }
            Some(Ok(None)) => {
                ended = Some(Reading::Ended);
                break;
            }
            Some(Err(e)) => {
                ended = Some(Reading::Failed(io::Error::other(e)));
                break;
            }
            None => break,
        }
    }
    (pieces, ended)
}

/// A request body's chunks handed to hyper as one piece of data: written
/// with one `writev` of all of them.
#[derive(Debug, Default)]
pub(crate) struct Pieces {
    chunks: std::collections::VecDeque<Bytes>,
    remaining: usize,
}

impl Pieces {
    fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.remaining += chunk.len();
            self.chunks.push_back(chunk);
        }
    }
}

impl From<Bytes> for Pieces {
    fn from(chunk: Bytes) -> Self {
        let mut pieces = Pieces::default();
        pieces.push(chunk);
        pieces
    }
}

impl bytes::Buf for Pieces {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| c)
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of the pieces");
        self.remaining -= cnt;
        while cnt > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.chunks.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, chunk) in dst.iter_mut().zip(&self.chunks) {
            *slot = io::IoSlice::new(chunk);
            n += 1;
        }
        n
    }
}

impl Body for RelayBody {
    type Data = Pieces;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Pieces>, io::Error>>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Retention;

    fn chunks(history: &History) -> usize {
        history
            .tree("bodies")
            .map(|t| t.len())
            .unwrap_or(usize::MAX)
    }

    /// A body still buffered when its exchange is recorded goes to the
    /// segments in the record's own write; one partly written already keeps
    /// its pieces and adds the rest; an in-memory store keeps the rest as
    /// the body's next piece. Each reads back whole, also through the tee
    /// before the record is stored.
    #[tokio::test]
    async fn a_buffered_body_goes_with_its_record_in_one_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let on_disk = History::open(dir.path(), Retention::default()).expect("history");
        let in_memory = History::temporary(Retention::default()).expect("history");
        for history in [&on_disk, &in_memory] {
            for len in [1024, history.piece_bytes() + 5000] {
                let mut e = crate::history::tests::exchange("POST", "/x", Some(200));
                let sent: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                e.request.body_len = sent.len() as u64;
                let tee = Tee::new(history.clone(), e.id, Part::Request);
                for chunk in sent.chunks(1200) {
                    tee.append(chunk);
                }
                assert_eq!(tee.body(), sent, "read through the tee first");
                let teed = tee.finish_for_record();
                let Teed::Tail { pieces, rest, .. } = &teed else {
                    panic!("{len} bytes, partly buffered: {teed:?}");
                };
                assert_eq!(
                    *pieces == 0,
                    len == 1024,
                    "{len} bytes: {pieces} pieces written"
                );
                assert!(!rest.is_empty() && (rest.len() == len) == (*pieces == 0));
                let id = e.id;
                history
                    .record(e, &[(Part::Request, teed.as_body())])
                    .await
                    .expect("record");
                drop(tee);
                assert_eq!(history.body(id, Part::Request).expect("body"), sent);
            }
        }
        // Read back after a reopen too (the extents are in the record).
        let ids: Vec<_> = on_disk
            .list(&crate::history::Filter::default(), None, 10)
            .expect("list")
            .exchanges
            .into_iter()
            .map(|e| (e.id, e.request.body_len))
            .collect();
        drop(on_disk);
        let reopened = History::open(dir.path(), Retention::default()).expect("reopen");
        for (id, len) in ids {
            let body = reopened.body(id, Part::Request).expect("body");
            assert_eq!(body.len() as u64, len);
            assert!(body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        }
    }

    #[test]
    fn small_bodies_stay_inline_and_large_ones_are_written_in_few_pieces() {
        let history = History::temporary(Retention::default()).expect("history");
        let small = Tee::new(history.clone(), ExchangeId::new(), Part::Request);
        for _ in 0..INLINE_BODY_MAX / 64 {
            small.append(&[b'a'; 64]);
        }
        assert_eq!(small.finish(), Teed::Inline(vec![b'a'; INLINE_BODY_MAX]));
        assert_eq!(
            chunks(&history),
            0,
            "an inline body writes nothing of its own"
        );

        // 256 KiB arriving a QUIC packet at a time.
        let id = ExchangeId::new();
        let large = Tee::new(history.clone(), id, Part::Response);
        let mut sent = Vec::new();
        for i in 0..220u32 {
            let packet = vec![u8::try_from(i % 251).expect("byte"); 1200];
            large.append(&packet);
            sent.extend_from_slice(&packet);
        }
        assert_eq!(large.finish(), Teed::Spilled(Vec::new()));
        assert_eq!(large.len(), sent.len() as u64);
        assert!(
            chunks(&history) <= sent.len() / history.piece_bytes() + 1,
            "{} writes for {} bytes",
            chunks(&history),
            sent.len()
        );
        assert_eq!(history.body(id, Part::Response).expect("body"), sent);
        assert_eq!(large.body(), sent, "finishing twice changes nothing");
    }

    /// A piece that cannot be written (here: the directory is gone) stops
    /// the recording of that body, so what is kept is a prefix, never a body
    /// with a hole, and the tee says why.
    #[test]
    fn a_body_piece_that_cannot_be_written_ends_that_body_recording() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = History::open(dir.path(), Retention::default()).expect("history");
        let bodies = dir.path().join("history-bodies");
        std::fs::remove_dir_all(&bodies).expect("remove");
        let tee = Tee::new(history.clone(), ExchangeId::new(), Part::Request);
        tee.append(&vec![b'a'; INLINE_BODY_MAX + history.piece_bytes()]);
        let why = tee.failure().expect("the write failed");
        assert!(why.contains("No such file"), "{why}");
        // The disk is back: nothing more of this body is written.
        std::fs::create_dir_all(&bodies).expect("mkdir");
        tee.append(&vec![b'b'; history.piece_bytes()]);
        assert_eq!(tee.finish(), Teed::Spilled(Vec::new()));
        assert_eq!(
            tee.len(),
            (INLINE_BODY_MAX + 2 * history.piece_bytes()) as u64
        );
        assert_eq!(std::fs::read_dir(&bodies).expect("dir").count(), 0);
    }

    #[test]
    fn large_bodies_on_disk_go_to_the_segments_and_read_back_before_their_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = History::open(dir.path(), Retention::default()).expect("history");
        let id = ExchangeId::new();
        let large = Tee::new(history.clone(), id, Part::Request);
        let other = Tee::new(history.clone(), ExchangeId::new(), Part::Request);
        let mut sent = Vec::new();
        for i in 0..440u32 {
            let packet = vec![u8::try_from(i % 251).expect("byte"); 1200];
            large.append(&packet);
            // Another upload's pieces go between this one's.
            other.append(&packet);
            sent.extend_from_slice(&packet);
        }
        let Teed::Spilled(extents) = large.finish() else {
            panic!("a 512 KiB body is not inline");
        };
        assert!(
            (2..=sent.len() / history.piece_bytes() + 1).contains(&extents.len()),
            "{} pieces for {} bytes",
            extents.len(),
            sent.len()
        );
        // Read back while the exchange is not recorded yet (to judge its
        // signature), through the tee: the store has no record naming the
        // pieces yet.
        assert_eq!(large.body(), sent);
        assert_eq!(
            history.body(id, Part::Request).expect("body"),
            sent.as_slice()[..0]
        );
        let files = std::fs::read_dir(dir.path().join("history-bodies"))
            .expect("dir")
            .count();
        assert_eq!(files, 1, "one segment, not a file per body");
    }

    /// A QUIC connection on loopback: (the sender's side, the receiver's).
    async fn quic_pair() -> anyhow::Result<(quinn::Connection, quinn::Connection, quinn::Endpoint)>
    {
        use anyhow::Context as _;
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)?;
        tls.alpn_protocols = vec![hookrelay_shared::ALPN.to_vec()];
        let server_config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
        ));
        let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
        let (client_config, _) =
            crate::tls::client_config(&crate::config::Trust::InsecureSkipVerify)?;
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        client.set_default_client_config(client_config);
        let connecting = client.connect(server.local_addr()?, "localhost")?;
        let accepted = server.accept().await.context("no connection")?;
        let (sender, receiver) = tokio::try_join!(connecting, accepted)?;
        Ok((sender, receiver, server))
    }

    /// A body that arrived whole reaches the app in pieces of up to
    /// [`GATHER_BYTES`] (quinn hands it out a packet at a time), with every
    /// byte in order; a reset one as what came before it and then an error.
    #[tokio::test]
    async fn a_large_body_reaches_the_app_in_few_pieces() -> anyhow::Result<()> {
        let (sender, receiver, _server) = quic_pair().await?;
        let body: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        for broken in [false, true] {
            let (mut send, _) = sender.open_bi().await?;
            send.write_all(&body).await?;
            if broken {
                send.reset(7u32.into())?;
            } else {
                send.finish()?;
                // Everything on the agent's side first, as after a burst:
                // the relay's side has had all of it acknowledged.
                let acked = tokio::time::timeout(Duration::from_secs(20), send.stopped()).await;
                anyhow::ensure!(matches!(acked, Ok(Ok(None))), "not acknowledged: {acked:?}");
            }
            let (_, recv) = receiver.accept_bi().await?;
            let history = History::temporary(Retention::default())?;
            let tee = Tee::new(history, ExchangeId::new(), Part::Request);
            let recv: SharedRecv = Arc::new(tokio::sync::Mutex::new(recv));
            let mut relay_body = RelayBody::new(recv, Some(body.len() as u64), tee.clone());
            let (mut pieces, mut got, mut error) = (0, Vec::new(), None);
            while let Some(frame) = relay_body.frame().await {
                match frame {
                    Ok(frame) => {
                        let mut data = frame
                            .into_data()
                            .map_err(|_| anyhow::anyhow!("a trailer"))?;
                        let n = bytes::Buf::remaining(&data);
                        assert!(n <= GATHER_BYTES, "{n} bytes at once");
                        got.extend_from_slice(&bytes::Buf::copy_to_bytes(&mut data, n));
                        pieces += 1;
                    }
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            if broken {
                // A reset may discard what was not read yet: a prefix, then
                // the error, never a short body that looks whole.
                assert!(error.is_some(), "a reset stream ended without an error");
                assert_eq!(got[..], body[..got.len()]);
            } else {
                assert!(error.is_none(), "{error:?}");
                assert_eq!(got, body);
                // About 190 packets, all there: 4 pieces of up to 64 KiB.
                assert!(pieces <= 5, "{pieces} pieces for 256 KiB");
                assert_eq!(tee.len(), body.len() as u64, "recorded whole");
            }
        }
        Ok(())
    }

    #[test]
    fn pieces_read_as_one_buffer() {
        use bytes::Buf;
        let mut pieces = Pieces::from(Bytes::from_static(b"ab"));
        pieces.push(Bytes::new());
        pieces.push(Bytes::from_static(b"cde"));
        pieces.push(Bytes::from_static(b"f"));
        assert_eq!(pieces.remaining(), 6);
        let mut slices = [io::IoSlice::new(&[]); 8];
        assert_eq!(
            pieces.chunks_vectored(&mut slices),
            3,
            "the empty chunk is not kept"
        );
        assert_eq!(&*slices[1], b"cde");
        // Fewer slots than chunks: as many as fit.
        let mut two = [io::IoSlice::new(&[]); 2];
        assert_eq!(pieces.chunks_vectored(&mut two), 2);
        pieces.advance(3);
        assert_eq!(pieces.chunk(), b"de");
        assert_eq!(pieces.remaining(), 3);
        assert_eq!(&pieces.copy_to_bytes(3)[..], b"def");
        assert_eq!(pieces.remaining(), 0);
        assert_eq!(pieces.chunk(), b"");
        let mut after = [io::IoSlice::new(&[]); 8];
        assert_eq!(pieces.chunks_vectored(&mut after), 0);
    }
}
