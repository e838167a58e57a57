//! Replay: re-sends a recorded request to the local app (or anywhere else),
//! optionally edited and re-signed, and records the result as a new exchange
//! linked to the original.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use base64::Engine as _;
use bytes::Bytes;
use hookrelay_shared::{
    http::is_hop_by_hop,
    signature::{self, SecretSet, SignedRequest},
};
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use serde::{Deserialize, Serialize};

use crate::{
    config::Target,
    forward::{error_chain, local_client},
    history::{
        self, Durations, Exchange, ExchangeId, Filter, Header, History, HistoryError, Outcome,
        Part, RequestRecord, ResponseRecord,
    },
    terminal::Terminal,
};

/// Most exchanges one bulk replay sends.
pub const MAX_BULK_REPLAY: usize = 500;

/// How long a replay waits for the app's whole answer (the relay's default
/// delivery timeout).
pub const REPLAY_TIMEOUT: Duration = Duration::from_secs(30);

/// Marks a replay for the app; replaces the relay's delivery id, which an app
/// that de-duplicates on it would otherwise use to drop the replay.
pub const REPLAY_OF_HEADER: &str = "x-hookrelay-replay-of";

/// Edits applied to a replay. Everything is optional; an empty set replays the
/// request exactly as it was recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplayOptions {
    /// Base URL to send to instead of the local app, e.g. `http://127.0.0.1:4000`.
    pub to: Option<String>,
    /// Replacement method.
    pub method: Option<String>,
    /// Replacement path and query (below the target's base path).
    pub path: Option<String>,
    /// Headers to set, as `Name: value`; each replaces every header of that name.
    pub set_headers: Vec<String>,
    /// Header names to remove.
    pub remove_headers: Vec<String>,
    /// Replacement body as text.
    pub body: Option<String>,
    /// Replacement body as base64 (for binary bodies); wins over `body`.
    pub body_base64: Option<String>,
    /// Refresh the timestamp and sign again with the configured secret.
    pub resign: bool,
}

/// Sends replays and records them.
#[derive(Clone)]
pub struct Replayer {
    history: History,
    client: Client<HttpConnector, Full<Bytes>>,
    target: Option<Target>,
    secrets: Arc<SecretSet>,
    /// Where a running agent prints its exchange lines.
    terminal: Option<Terminal>,
}

impl Replayer {
    /// Prints each replay on the agent's terminal, like its deliveries.
    pub(crate) fn with_terminal(mut self, terminal: Terminal) -> Self {
        self.terminal = Some(terminal);
        self
    }

    /// A replayer over `history`, sending to `target` by default (the running
    /// agent's app) or else to each exchange's recorded target.
    pub fn new(history: History, target: Option<Target>, secrets: Arc<SecretSet>) -> Self {
        Replayer {
            history,
            client: local_client(),
            terminal: None,
            target,
            secrets,
        }
    }

    /// Replays exchange `id` with `options`; returns the new exchange.
    ///
    /// # Errors
    /// Unknown id, invalid edits, or re-signing without a secret. A local app
    /// that fails is not an error: the new exchange records it.
    pub async fn replay(
        &self,
        id: ExchangeId,
        options: &ReplayOptions,
    ) -> Result<Exchange, ReplayError> {
        // A body of many MiB is a file read: on the blocking pool, not on the
        // agent's one worker thread.
        let (original, mut body) = self
            .history
            .off_runtime(move |h| Ok((h.get(id)?, h.body(id, Part::Request)?)))
            .await?;
        let edited = options.body_base64.is_some() || options.body.is_some();
        if !edited && body.len() as u64 != original.request.body_len {
            return Err(ReplayError::IncompleteBody {
                kept: body.len() as u64,
                received: original.request.body_len,
            });
        }
        if let Some(b64) = &options.body_base64 {
            body = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| ReplayError::Edit("body_base64 is not valid base64".into()))?;
        } else if let Some(text) = &options.body {
            body = text.clone().into_bytes();
        }
        let method = options
            .method
            .clone()
            .unwrap_or_else(|| original.method.clone());
        let method = Method::from_bytes(method.trim().to_ascii_uppercase().as_bytes())
            .map_err(|_| ReplayError::Edit(format!("invalid method {method:?}")))?;
        let path = match &options.path {
            Some(p) if p.starts_with('/') => p.clone(),
            Some(p) => format!("/{p}"),
            None => original.path.clone(),
        };

        let mut headers: Vec<(String, Vec<u8>)> = original
            .request
            .headers
            .iter()
            // Recomputed by the HTTP client for the (possibly edited) body.
            .filter(|h| h.name != "content-length" && !is_hop_by_hop(&h.name, &[]))
            .filter(|h| h.name != "x-hookrelay-delivery-id" && h.name != REPLAY_OF_HEADER)
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        headers.push((REPLAY_OF_HEADER.into(), id.to_string().into_bytes()));
        for name in &options.remove_headers {
            let name = name.trim().to_ascii_lowercase();
            headers.retain(|(n, _)| *n != name);
        }
        for spec in &options.set_headers {
            let (name, value) = spec.split_once(':').ok_or_else(|| {
                ReplayError::Edit(format!("{spec:?} is not a header (use 'Name: value')"))
            })?;
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim().as_bytes().to_vec();
            match headers.iter().position(|(n, _)| *n == name) {
                Some(first) => {
                    headers[first].1 = value;
                    let mut i = 0;
                    headers.retain(|(n, _)| {
                        i += 1;
                        *n != name || i - 1 == first
                    });
                }
                None => headers.push((name, value)),
            }
        }
        if options.resign {
            let provider = signature::detect(&headers).ok_or(ReplayError::NothingToResign)?;
            let secret = self
                .secrets
                .get(provider)
                .first()
                .map(|s| s.to_string())
                .ok_or(ReplayError::NoSecret(provider))?;
            let now = i64::try_from(history::now_ms() / 1000).unwrap_or(i64::MAX);
            signature::resign(provider, &secret, &mut headers, &body, now)
                .map_err(|e| ReplayError::Edit(format!("cannot re-sign: {e}")))?;
        }

        let target: Target = match (&options.to, &self.target) {
            (Some(to), _) => to.parse().map_err(ReplayError::Edit)?,
            (None, Some(t)) => t.clone(),
            (None, None) => original.target.parse().map_err(ReplayError::Edit)?,
        };
        let url = target.url(&path);
        let mut request = Request::builder()
            .method(method.clone())
            .uri(&url)
            .body(Full::new(Bytes::from(body.clone())))
            .map_err(|e| ReplayError::Edit(format!("cannot build the request: {e}")))?;
        for (name, value) in &headers {
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ReplayError::Edit(format!("invalid header name {name:?}")))?;
            let v = HeaderValue::from_bytes(value)
                .map_err(|_| ReplayError::Edit(format!("invalid value for header {name}")))?;
            request.headers_mut().append(n, v);
        }

        let id = ExchangeId::new();
        let received_at_ms = history::now_ms();
        let started = Instant::now();
        let provider = signature::detect(&headers);
        let verdict = provider.map(|_| {
            let req = SignedRequest {
                headers: &headers,
                body: &body,
                url: Some(&original.url),
            };
            let now = i64::try_from(received_at_ms / 1000).unwrap_or(i64::MAX);
            signature::verify_detected(&self.secrets, &req, now)
        });
        let answer = tokio::time::timeout(REPLAY_TIMEOUT, async {
            let resp = self.client.request(request).await?;
            let app_ms = started.elapsed().as_millis() as u64;
            let (parts, body) = resp.into_parts();
            let limited =
                http_body_util::Limited::new(body, crate::forward::MAX_RESPONSE_BYTES as usize);
            Ok::<_, hyper_util::client::legacy::Error>((parts, limited.collect().await, app_ms))
        })
        .await;
        let mut response_body = Bytes::new();
        let (response, outcome, error, app_ms) = match answer {
            Err(_) => (
                None,
                Outcome::LocalAppTimeout,
                Some(format!(
                    "{target} did not answer within {}s",
                    REPLAY_TIMEOUT.as_secs()
                )),
                None,
            ),
            Ok(Ok((parts, collected, app_ms))) => match collected {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    response_body = bytes.clone();
                    let headers = parts
                        .headers
                        .iter()
                        .map(|(n, v)| Header {
                            name: n.as_str().to_owned(),
                            value: v.as_bytes().to_vec(),
                        })
                        .collect();
                    let record = ResponseRecord {
                        status: parts.status.as_u16(),
                        headers,
                        body_len: bytes.len() as u64,
                    };
                    (Some(record), Outcome::Ok, None, Some(app_ms))
                }
                Err(e) => (
                    None,
                    Outcome::LocalAppError,
                    Some(crate::forward::answer_failure(&*e)),
                    Some(app_ms),
                ),
            },
            Ok(Err(e)) if e.is_connect() => (
                None,
                Outcome::LocalAppUnreachable,
                Some(format!("cannot connect to {target}")),
                None,
            ),
            Ok(Err(e)) => (None, Outcome::LocalAppError, Some(error_chain(&e)), None),
        };
        let exchange = Exchange {
            id,
            delivery_id: None,
            tunnel: original.tunnel.clone(),
            received_at_relay_ms: None,
            received_at_ms,
            remote_addr: None,
            method: method.to_string(),
            url,
            path,
            target: target.to_string(),
            request: RequestRecord {
                headers: history::headers_from(&headers),
                body_len: body.len() as u64,
            },
            response,
            outcome,
            error,
            duration: Durations {
                relay_to_agent_ms: None,
                local_app_ms: app_ms,
                total_ms: started.elapsed().as_millis() as u64,
            },
            provider,
            signature: verdict,
            replay_of: Some(original.id),
            event_id: None,
            duplicate_of: None,
            queued: None,
        };
        // Small bodies go inside the record, large ones to the segments.
        let request_body = self.history.keep_body(id, Part::Request, &body)?;
        let response_body = self.history.keep_body(id, Part::Response, &response_body)?;
        let bodies = [
            (Part::Request, request_body.as_body()),
            (Part::Response, response_body.as_body()),
        ];
        self.history.record(exchange.clone(), &bodies).await?;
        if let Some(terminal) = &self.terminal {
            terminal.exchange(&exchange);
        }
        Ok(exchange)
    }

    /// Replays, oldest first, every exchange that matches `filter` (at most
    /// [`MAX_BULK_REPLAY`]); replays of replays are skipped.
    ///
    /// # Errors
    /// Storage errors; per-exchange failures are in the results.
    pub async fn replay_matching(
        &self,
        filter: &Filter,
        options: &ReplayOptions,
    ) -> Result<Vec<Result<Exchange, ReplayError>>, ReplayError> {
        // A filter matching few exchanges may walk the whole history: on the
        // blocking pool, not on a thread deliveries are waiting for.
        let filter = filter.clone();
        let mut ids = self
            .history
            .off_runtime(move |store| {
                let mut ids = Vec::new();
                let mut before = None;
                loop {
                    let page = store.list(&filter, before, history::MAX_PAGE)?;
                    ids.extend(
                        page.exchanges
                            .iter()
                            .filter(|e| e.replay_of.is_none())
                            .map(|e| e.id),
                    );
                    match page.next_before {
                        Some(b) if ids.len() < MAX_BULK_REPLAY => before = Some(b),
                        _ => break,
                    }
                }
                Ok(ids)
            })
            .await?;
        ids.truncate(MAX_BULK_REPLAY);
        ids.reverse();
        let mut results = Vec::with_capacity(ids.len());
        for id in ids {
            results.push(self.replay(id, options).await);
        }
        Ok(results)
    }
}

/// Why a replay could not be sent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("{0}")]
    Edit(String),
    #[error(
        "the history kept {kept} of the {received} bytes of this request's body; replay it with an edited body instead"
    )]
    IncompleteBody { kept: u64, received: u64 },
    #[error("nothing to re-sign: the request carries no known signature header")]
    NothingToResign,
    #[error("no secret configured for {0}; pass --verify {0}=SECRET to the agent (or to replay)")]
    NoSecret(signature::Provider),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{tests::exchange, Body, Retention};

    /// A request body the history could not keep whole (a full disk) is not
    /// replayed as if it were; an edited body still is.
    #[tokio::test]
    async fn a_body_not_recorded_whole_is_not_replayed_unless_edited() {
        let history = History::temporary(Retention::default()).expect("history");
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr");
        let mut e = exchange("POST", "/hook", Some(200));
        e.target = format!("http://{dead}");
        e.request.body_len = 10;
        let id = e.id;
        history
            .record(e, &[(Part::Request, Body::Inline(b"12345"))])
            .await
            .expect("record");
        let replayer = Replayer::new(history, None, Arc::default());
        let err = replayer
            .replay(id, &ReplayOptions::default())
            .await
            .expect_err("incomplete");
        assert!(
            matches!(
                err,
                ReplayError::IncompleteBody {
                    kept: 5,
                    received: 10
                }
            ),
            "{err}"
        );
        let edited = ReplayOptions {
            body: Some("whole".into()),
            ..ReplayOptions::default()
        };
        let replayed = replayer.replay(id, &edited).await.expect("replayed");
        assert_eq!(replayed.request.body_len, 5);
        assert_eq!(replayed.outcome, history::Outcome::LocalAppUnreachable);
    }
}
