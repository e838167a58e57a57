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

impl Format {
    /// The name used by `--format` and the inspector's `format=` parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Curl => "curl",
            Format::Har => "har",
            Format::Json => "json",
        }
    }
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

/// The headers whose values exports replace with [`REDACTED`]: the built-in
/// [`SECRET_HEADERS`] plus the names a user configured (`--redact-header`,
/// `redact_headers` in the agent's config file), such as an app's own API key
/// header. Names compare case-insensitively. Signature headers stay: they
/// prove a request, they do not grant access.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Redaction {
    /// Configured names, lowercased, sorted, without duplicates or built-ins.
    extra: Vec<String>,
}

impl Redaction {
    /// The built-in headers plus `names`, in any case.
    pub fn new<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Redaction::default().with(names)
    }

    /// These names as well.
    pub fn with<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for name in names {
            let name = name.as_ref().trim().to_ascii_lowercase();
            if !name.is_empty() && !SECRET_HEADERS.contains(&name.as_str()) {
                self.extra.push(name);
            }
        }
        self.extra.sort_unstable();
        self.extra.dedup();
        self
    }

    /// Whether exports hide the value of header `name`.
    pub fn covers(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        SECRET_HEADERS.contains(&name.as_str()) || self.extra.binary_search(&name).is_ok()
    }

    /// The configured names beyond [`SECRET_HEADERS`], lowercased.
    pub fn extra(&self) -> &[String] {
        &self.extra
    }
}

/// Checks a header name given to `--redact-header` or `redact_headers` and
/// lowercases it, so a typo such as a trailing colon fails loudly instead of
/// silently redacting nothing.
///
/// # Errors
/// A message naming the value when it is not an HTTP header name.
pub fn parse_header_name(s: &str) -> Result<String, String> {
    http::HeaderName::from_bytes(s.trim().as_bytes())
        .map(|name| name.as_str().to_owned())
        .map_err(|_| format!("{s:?} is not a header name (like X-Shopify-Access-Token)"))
}

/// `detail` with the values of the headers `redaction` covers replaced.
pub fn redacted(detail: &ExchangeDetail, redaction: &Redaction) -> ExchangeDetail {
    let mut d = detail.clone();
    let scrub = |headers: &mut Vec<crate::history::Header>| {
        for h in headers.iter_mut() {
            if redaction.covers(&h.name) {
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

/// Renders `detail` in `format`, with the headers `redaction` covers redacted
/// unless `secrets`.
pub fn render(
    detail: &ExchangeDetail,
    format: Format,
    secrets: bool,
    redaction: &Redaction,
) -> String {
    if !secrets {
        return render_as_is(&redacted(detail, redaction), format);
    }
    render_as_is(detail, format)
}

fn render_as_is(detail: &ExchangeDetail, format: Format) -> String {
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
    use crate::history::{Durations, ExchangeId, Header, Outcome, RequestRecord, ResponseRecord};

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

    fn header(name: &str, value: &str) -> Header {
        Header {
            name: name.into(),
            value: value.as_bytes().to_vec(),
        }
    }

    /// A recorded POST with the given request headers and an answer setting
    /// `X-Shop-Token` too.
    fn detail(request_headers: Vec<Header>) -> ExchangeDetail {
        let exchange = Exchange {
            id: ExchangeId::new(),
            delivery_id: None,
            tunnel: "t".into(),
            received_at_relay_ms: None,
            received_at_ms: 0,
            remote_addr: None,
            method: "POST".into(),
            url: "http://relay/t/t/hook".into(),
            path: "/hook".into(),
            target: "http://127.0.0.1:3000".into(),
            request: RequestRecord {
                headers: request_headers,
                body_len: 2,
            },
            response: Some(ResponseRecord {
                status: 200,
                headers: vec![header("x-shop-token", "resp-s3cret")],
                body_len: 0,
            }),
            outcome: Outcome::Ok,
            error: None,
            duration: Durations::default(),
            provider: None,
            signature: None,
            replay_of: None,
            event_id: None,
            duplicate_of: None,
            queued: None,
        };
        ExchangeDetail {
            exchange,
            request_body: BodyView::new(b"{}"),
            response_body: Some(BodyView::new(b"")),
        }
    }

    #[test]
    fn configured_headers_are_redacted_in_every_format_whatever_their_case() {
        let d = detail(vec![
            header("authorization", "Bearer builtin-s3cret"),
            header("x-shop-token", "req-s3cret"),
            header("stripe-signature", "t=1,v1=00"),
            header("x-visible", "shown"),
        ]);
        let redaction = Redaction::new(["X-Shop-TOKEN"]);
        for format in [Format::Curl, Format::Har, Format::Json] {
            let text = render(&d, format, false, &redaction);
            assert!(!text.contains("s3cret"), "{format:?}: {text}");
            assert!(text.contains(REDACTED), "{format:?}: {text}");
            // Signatures prove a request; they grant nothing, so they stay.
            assert!(text.contains("t=1,v1=00"), "{format:?}: {text}");
            assert!(text.contains("shown"), "{format:?}: {text}");

            let shown = render(&d, format, true, &redaction);
            // A curl command has no response to show.
            let values: &[&str] = match format {
                Format::Curl => &["builtin-s3cret", "req-s3cret"],
                Format::Har | Format::Json => &["builtin-s3cret", "req-s3cret", "resp-s3cret"],
            };
            for value in values {
                assert!(shown.contains(value), "{format:?} with secrets: {shown}");
            }

            // Without the configuration, only the built-in list applies.
            let builtin = render(&d, format, false, &Redaction::default());
            assert!(!builtin.contains("builtin-s3cret"), "{format:?}: {builtin}");
            assert!(builtin.contains("req-s3cret"), "{format:?}: {builtin}");
        }
    }

    #[test]
    fn redaction_lists_are_lowercased_merged_and_deduplicated() {
        let r = Redaction::new(["X-B", "x-a", "Authorization", " x-b "]).with(["X-A", "x-c"]);
        assert_eq!(r.extra(), ["x-a", "x-b", "x-c"]);
        assert!(r.covers("X-C") && r.covers("authorization") && r.covers("Cookie"));
        assert!(!r.covers("x-d") && !r.covers("stripe-signature"));
        assert_eq!(Redaction::new(Vec::<String>::new()), Redaction::default());
    }

    #[test]
    fn header_names_are_checked_and_lowercased() {
        assert_eq!(
            parse_header_name("X-Shopify-Access-Token"),
            Ok("x-shopify-access-token".to_owned())
        );
        assert_eq!(parse_header_name(" x-key "), Ok("x-key".to_owned()));
        for bad in ["", "X-Key:", "two words", "x\u{e9}"] {
            let err = parse_header_name(bad).expect_err(bad);
            assert!(err.contains("not a header name"), "{err}");
        }
    }
}
