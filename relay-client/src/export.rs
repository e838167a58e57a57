//! Exports of recorded exchanges: a curl command, HAR 1.2, or the full JSON
//! with bodies.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::history::{Exchange, History, HistoryError, Part};

/// A body as the API shows it: exact bytes in base64, plus text when UTF-8.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BodyView {
    /// Length in bytes.
    pub len: usize,
    /// Exact bytes.
    pub base64: String,
    /// The bytes as text, when they are valid UTF-8.
    pub text: Option<String>,
}

impl BodyView {
    /// Views `bytes`.
    pub fn new(bytes: &[u8]) -> Self {
        BodyView {
            len: bytes.len(),
            base64: base64::engine::general_purpose::STANDARD.encode(bytes),
            text: std::str::from_utf8(bytes).ok().map(str::to_owned),
        }
    }
}

/// An exchange with both bodies: `relay-client show --json` and `GET /api/exchanges/ID`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExchangeDetail {
    /// The recorded exchange.
    #[serde(flatten)]
    pub exchange: Exchange,
    /// The request body.
    pub request_body: BodyView,
    /// The response body, when the app answered.
    pub response_body: Option<BodyView>,
}

impl ExchangeDetail {
    /// Loads both bodies of `exchange`.
    ///
    /// # Errors
    /// A storage error.
    pub fn load(history: &History, exchange: Exchange) -> Result<Self, HistoryError> {
        let request = history.body(exchange.id, Part::Request)?;
        let response = match exchange.response {
            Some(_) => Some(BodyView::new(&history.body(exchange.id, Part::Response)?)),
            None => None,
        };
        Ok(ExchangeDetail {
            request_body: BodyView::new(&request),
            response_body: response,
            exchange,
        })
    }
}

/// Export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A shell command that sends the request again with curl.
    Curl,
    /// HTTP Archive 1.2, for browser dev tools and HAR viewers.
    Har,
    /// The full exchange with bodies, as `show --json` prints it.
    Json,
}

/// Headers whose values are credentials; exports show `[redacted]` instead
/// unless asked for them.
pub const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-gitlab-token",
    "cookie",
    "set-cookie",
    "x-api-key",
];

/// What exports show in place of a credential.
pub const REDACTED: &str = "[redacted]";

/// `detail` with the values of [`SECRET_HEADERS`] replaced.
pub fn redacted(detail: &ExchangeDetail) -> ExchangeDetail {
    let mut d = detail.clone();
    let scrub = |headers: &mut Vec<crate::history::Header>| {
        for h in headers.iter_mut() {
            if SECRET_HEADERS.contains(&h.name.to_ascii_lowercase().as_str()) {
                h.value = REDACTED.as_bytes().to_vec();
            }
        }
    };
    scrub(&mut d.exchange.request.headers);
    if let Some(r) = d.exchange.response.as_mut() {
        scrub(&mut r.headers);
    }
    d
}

/// Renders `detail` in `format`, credentials redacted unless `secrets`.
pub fn render(detail: &ExchangeDetail, format: Format, secrets: bool) -> String {
    if !secrets {
        return render(&redacted(detail), format, true);
    }
    match format {
        Format::Curl => curl(detail),
        Format::Har => {
            serde_json::to_string_pretty(&har(std::slice::from_ref(detail))).unwrap_or_default()
        }
        Format::Json => serde_json::to_string_pretty(detail).unwrap_or_default(),
    }
}

/// Headers curl would set by itself, or that describe the old connection.
const CURL_SKIP: &[&str] = &["content-length", "host"];

/// Headers curl sends unless told not to (content-type only with a body).
const CURL_DEFAULTS: &[&str] = &["user-agent", "accept", "content-type"];

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `curl -X POST 'URL' -H 'name: value' --data-binary …`: text bodies inline,
/// binary bodies through `base64 -d`, so the bytes are exact either way.
pub fn curl(detail: &ExchangeDetail) -> String {
    let e = &detail.exchange;
    let mut parts = vec![format!("curl -X {} {}", e.method, shell_quote(&e.url))];
    for h in &e.request.headers {
        if CURL_SKIP.contains(&h.name.as_str()) {
            continue;
        }
        let value = String::from_utf8_lossy(&h.value);
        parts.push(format!(
            "-H {}",
            shell_quote(&format!("{}: {value}", h.name))
        ));
    }
    // curl adds these on its own when they are not given; `-H 'Name:'` stops
    // it, so the app sees the same headers the sender sent and no others.
    for name in CURL_DEFAULTS {
        let sent = e.request.headers.iter().any(|h| h.name == *name);
        let added = *name != "content-type" || detail.request_body.len > 0;
        if !sent && added {
            parts.push(format!("-H {}", shell_quote(&format!("{name}:"))));
        }
    }
    let body = &detail.request_body;
    if body.len == 0 {
        return parts.join(" \\\n  ");
    }
    match &body.text {
        Some(text) => {
            parts.push(format!("--data-binary {}", shell_quote(text)));
            parts.join(" \\\n  ")
        }
        None => {
            parts.push("--data-binary @-".into());
            format!(
                "printf %s {} | base64 -d | {}",
                shell_quote(&body.base64),
                parts.join(" \\\n  ")
            )
        }
    }
}

/// HAR 1.2 for the given exchanges.
pub fn har(details: &[ExchangeDetail]) -> Value {
    let entries: Vec<Value> = details.iter().map(har_entry).collect();
    json!({
        "log": {
            "version": "1.2",
            "creator": { "name": "hookrelay", "version": env!("CARGO_PKG_VERSION") },
            "entries": entries,
        }
    })
}

fn har_headers(headers: &[crate::history::Header]) -> Vec<Value> {
    headers
        .iter()
        .map(|h| json!({ "name": h.name, "value": String::from_utf8_lossy(&h.value) }))
        .collect()
}

fn header<'a>(
    headers: &'a [crate::history::Header],
    name: &str,
) -> Option<std::borrow::Cow<'a, str>> {
    headers
        .iter()
        .find(|h| h.name == name)
        .map(|h| String::from_utf8_lossy(&h.value))
}

fn har_entry(d: &ExchangeDetail) -> Value {
    let e = &d.exchange;
    let query: Vec<Value> = e
        .url
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            json!({ "name": n, "value": v })
        })
        .collect();
    let mut request = json!({
        "method": e.method,
        "url": e.url,
        "httpVersion": "HTTP/1.1",
        "cookies": [],
        "headers": har_headers(&e.request.headers),
        "queryString": query,
        "headersSize": -1,
        "bodySize": d.request_body.len,
    });
    if d.request_body.len > 0 {
        let mime = header(&e.request.headers, "content-type")
            .unwrap_or_default()
            .into_owned();
        request["postData"] = match &d.request_body.text {
            Some(text) => json!({ "mimeType": mime, "text": text }),
            None => {
                json!({ "mimeType": mime, "text": d.request_body.base64, "encoding": "base64" })
            }
        };
    }
    let response = match (&e.response, &d.response_body) {
        (Some(r), Some(body)) => {
            let mime = header(&r.headers, "content-type")
                .unwrap_or_default()
                .into_owned();
            let mut content = json!({ "size": body.len, "mimeType": mime });
            match &body.text {
                Some(text) => content["text"] = json!(text),
                None => {
                    content["text"] = json!(body.base64);
                    content["encoding"] = json!("base64");
                }
            }
            json!({
                "status": r.status,
                "statusText": http::StatusCode::from_u16(r.status).ok().and_then(|s| s.canonical_reason()).unwrap_or(""),
                "httpVersion": "HTTP/1.1",
                "cookies": [],
                "headers": har_headers(&r.headers),
                "content": content,
                "redirectURL": "",
                "headersSize": -1,
                "bodySize": body.len,
            })
        }
        _ => json!({
            "status": 0,
            "statusText": e.error.clone().unwrap_or_default(),
            "httpVersion": "HTTP/1.1",
            "cookies": [],
            "headers": [],
            "content": { "size": 0, "mimeType": "" },
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": -1,
        }),
    };
    let wait = e.duration.local_app_ms.unwrap_or(e.duration.total_ms);
    json!({
        "startedDateTime": iso8601(e.received_at_ms),
        "time": e.duration.total_ms,
        "request": request,
        "response": response,
        "cache": {},
        "timings": { "send": 0, "wait": wait, "receive": e.duration.total_ms.saturating_sub(wait) },
        "comment": format!("hookrelay exchange {}", e.id),
    })
}

/// `2026-11-28T17:52:45.123Z` from Unix milliseconds.
pub fn iso8601(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_matches_known_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn shell_quoting_survives_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
