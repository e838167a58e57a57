//! The agent's live terminal view: one line per exchange, like ngrok's
//! console, or one JSON object per line for machines (`--log-format json`).

use std::{
    io::{IsTerminal, Write},
    sync::Arc,
};

use serde_json::json;

use crate::{
    config::LogFormat,
    export::iso8601,
    history::{Exchange, Outcome},
    metrics::AgentMetrics,
};

/// Reports each finished exchange: a line on stdout (or nowhere), and the
/// agent's metrics.
#[derive(Clone, Debug)]
pub(crate) struct Terminal {
    enabled: bool,
    format: LogFormat,
    color: bool,
    metrics: Option<Arc<AgentMetrics>>,
}

impl Terminal {
    pub fn new(enabled: bool, format: LogFormat) -> Self {
        Terminal {
            enabled,
            format,
            color: enabled
                && format == LogFormat::Text
                && std::io::stdout().is_terminal()
                && std::env::var_os("NO_COLOR").is_none(),
            metrics: None,
        }
    }

    /// Counts every reported exchange in `metrics` too.
    pub fn with_metrics(mut self, metrics: Arc<AgentMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Prints one finished exchange: `12:04:05  POST /github/events  200  12 ms`.
    pub fn exchange(&self, e: &Exchange) {
        if let Some(metrics) = &self.metrics {
            metrics.exchange(e);
        }
        match (e.outcome, &e.error) {
            (Outcome::Ok, _) => {
                tracing::debug!(delivery_id = e.delivery_id.as_deref().unwrap_or("-"), status = ?e.status(), "delivered");
            }
            (Outcome::Cancelled, _) => {
                tracing::debug!(
                    delivery_id = e.delivery_id.as_deref().unwrap_or("-"),
                    "delivery cancelled by the relay"
                );
            }
            (_, error) => {
                tracing::warn!(
                    delivery_id = e.delivery_id.as_deref().unwrap_or("-"),
                    method = %e.method,
                    path = %e.path,
                    "{}",
                    error.as_deref().unwrap_or("delivery failed")
                );
            }
        }
        if !self.enabled {
            return;
        }
        let line = match self.format {
            LogFormat::Json => json_line(e),
            LogFormat::Text => self.text_line(e),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    fn text_line(&self, e: &Exchange) -> String {
        let (status, class) = match (e.status(), e.outcome) {
            (Some(s), _) => (s.to_string(), s / 100),
            (None, Outcome::LocalAppTimeout) => ("504 timeout".into(), 5),
            (None, Outcome::LocalAppUnreachable) => ("502 app unreachable".into(), 5),
            (None, Outcome::Cancelled) => ("--- cancelled".into(), 0),
            (None, _) => ("502 app error".into(), 5),
        };
        let status = if self.color {
            let code = match class {
                2 => "32",
                3 => "36",
                4 => "33",
                5 => "31",
                _ => "90",
            };
            format!("\x1b[{code}m{status:<8}\x1b[0m")
        } else {
            format!("{status:<8}")
        };
        let replay = match (&e.queued, e.replay_of.is_some(), e.duplicate_of.is_some()) {
            (_, true, _) => "  (replay)".to_owned(),
            (_, _, true) => "  (duplicate)".to_owned(),
            (Some(q), ..) if q.interrupted => {
                "  (queued, interrupted: replay if needed)".to_owned()
            }
            (Some(q), ..) if q.failed => {
                format!("  (queued, failed after {} attempts)", q.attempt)
            }
            (Some(q), ..) if q.next_attempt_at_ms.is_some() => format!(
                "  (queued, attempt {}/{}, retrying)",
                q.attempt, q.max_attempts
            ),
            (Some(q), ..) if q.attempt > 1 => format!("  (queued, attempt {})", q.attempt),
            (Some(_), ..) => "  (queued)".to_owned(),
            (None, ..) => String::new(),
        };
        format!(
            "{}  {:<7} {:<40} {status} {:>6} ms{replay}",
            format_time(e.received_at_ms),
            e.method,
            truncate(&e.path, 40),
            e.duration.total_ms,
        )
    }
}

/// The `--log-format json` line: a stable, flat summary (the whole record is
/// one `relay-client show ID --json` away).
fn json_line(e: &Exchange) -> String {
    json!({
        "type": "exchange",
        "time": iso8601(e.received_at_ms),
        "id": e.id,
        "delivery_id": e.delivery_id,
        "tunnel": e.tunnel,
        "method": e.method,
        "path": e.path,
        "status": e.status(),
        "outcome": e.outcome,
        "error": e.error,
        "duration_ms": e.duration.total_ms,
        "provider": e.provider,
        "signature": e.signature,
        "replay_of": e.replay_of,
        "duplicate_of": e.duplicate_of,
        "queued": e.queued,
    })
    .to_string()
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

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds.
fn format_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}
