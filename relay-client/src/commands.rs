//! `history`, `show`, `replay` and `export`: through the running agent's
//! inspector API when one serves this data directory, else straight from the
//! sled store.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context};
use bytes::Bytes;
use hookrelay_shared::signature::SecretSet;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    export::{self, ExchangeDetail, Format, Redaction},
    history::{self, Exchange, ExchangeId, Filter, History, HistoryError, Page, Retention},
    replay::{ReplayOptions, Replayer},
};

/// How long to wait for a running agent's inspector before using the store.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Where history commands get their data.
#[allow(clippy::large_enum_variant)] // one per command run; boxing buys nothing
pub enum Backend {
    /// A running agent's inspector API.
    Api {
        /// `http://ADDR`.
        base: String,
        /// HTTP client.
        client: Client<HttpConnector, Full<Bytes>>,
    },
    /// The sled store itself (no agent running on this data directory).
    Direct {
        /// The store.
        history: History,
        /// Replays from the store.
        replayer: Replayer,
    },
}

impl Backend {
    /// Uses the agent at `inspect` if it serves `data_dir`, else opens the store.
    ///
    /// # Errors
    /// When neither works (e.g. an agent holds the store with its inspector off).
    pub async fn open(
        data_dir: &Path,
        inspect: Option<SocketAddr>,
        secrets: SecretSet,
    ) -> anyhow::Result<Backend> {
        if let Some(addr) = inspect {
            let client: Client<HttpConnector, Full<Bytes>> =
                Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
            let base = format!("http://{addr}");
            let probe = tokio::time::timeout(
                PROBE_TIMEOUT,
                get_json::<Value>(&client, &format!("{base}/api/status")),
            )
            .await;
            if let Ok(Ok(status)) = probe {
                let theirs = status
                    .get("data_dir")
                    .and_then(Value::as_str)
                    .map(PathBuf::from);
                if theirs.is_some_and(|t| same_dir(&t, data_dir)) {
                    return Ok(Backend::Api { base, client });
                }
            }
        }
        // Never prune here: the agent's own --max-exchanges/--max-history-bytes
        // may be larger than the defaults, and reading history must not delete
        // any of it. The agent applies its limits when it next starts.
        let keep_all = Retention {
            max_exchanges: u64::MAX,
            max_bytes: u64::MAX,
        };
        // A mistyped --data-dir must not look like an empty history.
        anyhow::ensure!(
            History::exists(data_dir),
            "no history in {}: no agent has run with this --data-dir",
            data_dir.display()
        );
        let history = History::open(data_dir, keep_all).map_err(|e| match e {
            HistoryError::Locked(dir) => locked(&dir, inspect),
            other => other.into(),
        })?;
        let replayer = Replayer::new(history.clone(), None, Arc::new(secrets));
        Ok(Backend::Direct { history, replayer })
    }

    /// Whether commands go through a running agent.
    pub fn is_api(&self) -> bool {
        matches!(self, Backend::Api { .. })
    }

    /// One page of history.
    ///
    /// # Errors
    /// API or storage errors.
    pub async fn list(
        &self,
        filter: &Filter,
        before: Option<ExchangeId>,
        limit: usize,
    ) -> anyhow::Result<Page> {
        match self {
            Backend::Direct { history, .. } => Ok(history.list(filter, before, limit)?),
            Backend::Api { base, client } => {
                let mut query = vec![("limit".to_owned(), limit.to_string())];
                if let Some(b) = before {
                    query.push(("before".into(), b.to_string()));
                }
                let mut add = |k: &str, v: &Option<String>| {
                    if let Some(v) = v {
                        query.push((k.into(), v.clone()));
                    }
                };
                add("method", &filter.method);
                add("path", &filter.path);
                add("status", &filter.status);
                add("q", &filter.q);
                add("header", &filter.header);
                add("tunnel", &filter.tunnel);
                add("since", &filter.since.map(|t| t.to_string()));
                add("until", &filter.until.map(|t| t.to_string()));
                let qs: Vec<String> = query
                    .iter()
                    .map(|(k, v)| format!("{k}={}", url_encode(v)))
                    .collect();
                get_json(client, &format!("{base}/api/exchanges?{}", qs.join("&"))).await
            }
        }
    }

    /// One exchange with its bodies.
    ///
    /// # Errors
    /// Unknown id, API or storage errors.
    pub async fn get(&self, id: ExchangeId) -> anyhow::Result<ExchangeDetail> {
        match self {
            Backend::Direct { history, .. } => Ok(ExchangeDetail::load(history, history.get(id)?)?),
            Backend::Api { base, client } => {
                get_json(client, &format!("{base}/api/exchanges/{id}")).await
            }
        }
    }

    /// One exchange rendered in `format`. Credentials are redacted unless
    /// `secrets`: the built-in headers, the agent's own `--redact-header`
    /// list (from the running agent, or the one it left in the store), and
    /// `extra`.
    ///
    /// # Errors
    /// Unknown id, API or storage errors.
    pub async fn export(
        &self,
        id: ExchangeId,
        format: Format,
        secrets: bool,
        extra: &Redaction,
    ) -> anyhow::Result<String> {
        match self {
            Backend::Direct { history, .. } => {
                let detail = ExchangeDetail::load(history, history.get(id)?)?;
                let redaction = extra.clone().with(history.redact_headers()?);
                Ok(export::render(&detail, format, secrets, &redaction))
            }
            Backend::Api { base, client } => {
                let mut url = format!(
                    "{base}/api/exchanges/{id}/export?format={}&secrets={secrets}",
                    format.as_str()
                );
                if !extra.extra().is_empty() {
                    url.push_str(&format!("&redact={}", url_encode(&extra.extra().join(","))));
                }
                let req = http::Request::get(url).body(Full::new(Bytes::new()))?;
                let body = send(client, req).await?;
                String::from_utf8(body.to_vec())
                    .context("the agent's inspector sent non-UTF-8 text")
            }
        }
    }

    /// Replays one exchange.
    ///
    /// # Errors
    /// Unknown id, invalid edits, API or storage errors.
    pub async fn replay(
        &self,
        id: ExchangeId,
        options: &ReplayOptions,
    ) -> anyhow::Result<Exchange> {
        match self {
            Backend::Direct { replayer, .. } => Ok(replayer.replay(id, options).await?),
            Backend::Api { base, client } => {
                post_json(
                    client,
                    &format!("{base}/api/exchanges/{id}/replay"),
                    serde_json::to_vec(options)?,
                )
                .await
            }
        }
    }

    /// Replays every exchange matching `filter`, oldest first.
    ///
    /// # Errors
    /// API or storage errors; per-exchange failures come back as `Err` items.
    pub async fn replay_matching(
        &self,
        filter: &Filter,
        options: &ReplayOptions,
    ) -> anyhow::Result<Vec<Result<Exchange, String>>> {
        match self {
            Backend::Direct { replayer, .. } => Ok(replayer
                .replay_matching(filter, options)
                .await?
                .into_iter()
                .map(|r| r.map_err(|e| e.to_string()))
                .collect()),
            Backend::Api { base, client } => {
                let body = serde_json::json!({ "filter": filter, "options": options });
                let out: Value = post_json(
                    client,
                    &format!("{base}/api/replay"),
                    serde_json::to_vec(&body)?,
                )
                .await?;
                let results = out
                    .get("results")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                Ok(results
                    .into_iter()
                    .map(|r| match r.get("exchange") {
                        Some(e) => serde_json::from_value(e.clone()).map_err(|e| e.to_string()),
                        None => Err(r
                            .get("error")
                            .and_then(Value::as_str)
                            .unwrap_or("replay failed")
                            .to_owned()),
                    })
                    .collect())
            }
        }
    }

    /// Closes the store (direct mode): its replays on disk and the retention
    /// index saved for the agent's next start.
    ///
    /// # Errors
    /// Storage errors.
    pub async fn close(self) -> anyhow::Result<()> {
        if let Backend::Direct { history, .. } = self {
            history.close().await?;
        }
        Ok(())
    }
}

fn locked(dir: &str, inspect: Option<SocketAddr>) -> anyhow::Error {
    anyhow::anyhow!(
        "the history in {dir} is held by a running agent{}; pass that agent's --inspect ADDR",
        inspect
            .map(|a| format!(" whose inspector is not at {a}"))
            .unwrap_or_default()
    )
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

async fn get_json<T: DeserializeOwned>(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
) -> anyhow::Result<T> {
    let req = http::Request::get(url).body(Full::new(Bytes::new()))?;
    call(client, req).await
}

async fn post_json<T: DeserializeOwned>(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    body: Vec<u8>,
) -> anyhow::Result<T> {
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    call(client, req).await
}

async fn call<T: DeserializeOwned>(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> anyhow::Result<T> {
    let body = send(client, req).await?;
    serde_json::from_slice(&body).context("the agent's inspector sent unexpected JSON")
}

/// Sends `req` to the inspector; a non-2xx answer becomes its JSON `message`.
async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> anyhow::Result<Bytes> {
    let resp = client
        .request(req)
        .await
        .context("cannot reach the agent's inspector")?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        let message = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("{message}");
    }
    Ok(body)
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Parses a time for filters: Unix seconds or milliseconds, an RFC 3339 UTC
/// time (`2026-11-28T17:00:00Z`), a date (`2026-11-28`), or an age (`15m`,
/// `2h`, `7d` ago). Returns Unix milliseconds.
///
/// # Errors
/// A message listing the accepted forms.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let err = || {
        format!("{s:?} is not a time (use 1700000000, 2026-11-28T17:00:00Z, 2026-11-28, or an age like 15m, 2h, 7d)")
    };
    if let Ok(n) = s.parse::<u64>() {
        return Ok(if n < 100_000_000_000 { n * 1000 } else { n });
    }
    if let Some((num, unit)) = s.find(|c: char| !c.is_ascii_digit()).map(|i| s.split_at(i)) {
        let mult_ms = match unit {
            "s" => Some(1_000),
            "m" => Some(60_000),
            "h" => Some(3_600_000),
            "d" => Some(86_400_000),
            _ => None,
        };
        if let (Ok(n), Some(mult)) = (num.parse::<u64>(), mult_ms) {
            return Ok(history::now_ms().saturating_sub(n.saturating_mul(mult)));
        }
    }
    let (date, time) = s.split_once('T').unwrap_or((s, "00:00:00Z"));
    let d: Vec<&str> = date.split('-').collect();
    let time = time
        .strip_suffix('Z')
        .or_else(|| time.strip_suffix("+00:00"))
        .ok_or_else(err)?;
    let t: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || t.len() != 3 {
        return Err(err());
    }
    let num = |x: &str| {
        x.split('.')
            .next()
            .unwrap_or("")
            .parse::<i64>()
            .map_err(|_| err())
    };
    let (y, mo, day) = (num(d[0])?, num(d[1])?, num(d[2])?);
    let (h, mi, sec) = (num(t[0])?, num(t[1])?, num(t[2])?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) || h > 23 || mi > 59 || sec > 60 {
        return Err(err());
    }
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec;
    u64::try_from(secs * 1000).map_err(|_| err())
}

/// One line per exchange, newest first.
pub fn print_table(page: &Page) {
    if page.exchanges.is_empty() {
        println!("no exchanges recorded yet");
        return;
    }
    println!(
        "{:<26}  {:<19}  {:<7} {:<36} {:>6} {:>7}  NOTE",
        "ID", "TIME (UTC)", "METHOD", "PATH", "STATUS", "MS"
    );
    for e in &page.exchanges {
        let status = e
            .status()
            .map(|s| s.to_string())
            .unwrap_or_else(|| "---".into());
        let mut note = Vec::new();
        if let Some(of) = e.replay_of {
            note.push(format!("replay of {of}"));
        }
        if e.outcome.is_failure() {
            note.push(
                serde_json::to_value(e.outcome)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            );
        }
        if let Some(v) = &e.signature {
            note.push(verdict_label(v));
        }
        let time = export::iso8601(e.received_at_ms);
        println!(
            "{:<26}  {:<19}  {:<7} {:<36} {:>6} {:>7}  {}",
            e.id,
            &time[..19].replace('T', " "),
            e.method,
            truncate(&e.path, 36),
            status,
            e.duration.total_ms,
            note.join("; ")
        );
    }
    if let Some(next) = page.next_before {
        println!("… more: --before {next}");
    }
}

fn verdict_label(v: &hookrelay_shared::signature::Verdict) -> String {
    use hookrelay_shared::signature::Verdict;
    match v {
        Verdict::Valid { provider } => format!("{provider} signature valid"),
        Verdict::Invalid { provider, reason } => format!("{provider} signature INVALID: {reason}"),
        Verdict::Stale { provider, age_s } => format!("{provider} signature stale ({age_s}s old)"),
        Verdict::Unsigned => "unsigned".into(),
        Verdict::NoSecret { provider } => format!("{provider} signature not checked (no secret)"),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// A readable view of one exchange.
pub fn print_detail(d: &ExchangeDetail) {
    let e = &d.exchange;
    println!("exchange   {}", e.id);
    if let Some(of) = e.replay_of {
        println!("replay of  {of}");
    }
    if let Some(id) = &e.delivery_id {
        println!("delivery   {id}");
    }
    println!(
        "received   {}  from {}",
        export::iso8601(e.received_at_ms),
        e.remote_addr.as_deref().unwrap_or("-")
    );
    println!("tunnel     {}  ->  {}", e.tunnel, e.target);
    if let Some(v) = &e.signature {
        println!("signature  {}", verdict_label(v));
    }
    println!("\n{} {}", e.method, e.url);
    for h in &e.request.headers {
        println!("{}: {}", h.name, String::from_utf8_lossy(&h.value));
    }
    print_body(&d.request_body);
    match (&e.response, &d.response_body) {
        (Some(r), Some(body)) => {
            println!("\nHTTP {}  ({} ms)", r.status, e.duration.total_ms);
            for h in &r.headers {
                println!("{}: {}", h.name, String::from_utf8_lossy(&h.value));
            }
            print_body(body);
        }
        _ => println!("\nno response: {}", e.error.as_deref().unwrap_or("unknown")),
    }
}

fn print_body(b: &export::BodyView) {
    match (&b.text, b.len) {
        (_, 0) => {}
        (Some(text), _) => {
            println!();
            match serde_json::from_str::<Value>(text) {
                Ok(v) => println!(
                    "{}",
                    serde_json::to_string_pretty(&v).unwrap_or_else(|_| text.clone())
                ),
                Err(_) => println!("{text}"),
            }
        }
        (None, n) => println!("\n<{n} bytes of binary data; see --json or export>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_every_documented_form() {
        assert_eq!(parse_time("1700000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_time("1700000000123"), Ok(1_700_000_000_123));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(parse_time("2000-02-29"), Ok(951_782_400_000));
        let hour_ago = parse_time("1h").expect("age");
        let expected = history::now_ms() - 3_600_000;
        assert!(hour_ago.abs_diff(expected) < 5_000);
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2023-13-01").is_err());
    }
}
