//! The agent's live terminal view: one line per delivery, like ngrok's.

use std::{
    io::{IsTerminal, Write},
    time::Duration,
};

use hookrelay_shared::{FailureKind, RequestHead};

use crate::forward::Outcome;

/// Prints deliveries to stdout (or nowhere).
#[derive(Clone, Debug)]
pub(crate) struct Terminal {
    enabled: bool,
    color: bool,
}

impl Terminal {
    pub fn new(enabled: bool) -> Self {
        Terminal {
            enabled,
            color: enabled
                && std::io::stdout().is_terminal()
                && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    /// `12:04:05  POST /github/events  200 OK  12 ms`
    pub fn delivery(&self, head: &RequestHead, outcome: &Outcome, took: Duration) {
        match outcome {
            Outcome::Failed(kind, message) => {
                tracing::warn!(delivery_id = %head.delivery_id, method = %head.method, path = %head.path, "{message}");
                let _ = kind;
            }
            Outcome::Cancelled => {
                tracing::debug!(delivery_id = %head.delivery_id, "delivery cancelled by the relay");
            }
            Outcome::Responded(status) => {
                tracing::debug!(delivery_id = %head.delivery_id, status, "delivered");
            }
        }
        if !self.enabled {
            return;
        }
        let (status, class) = match outcome {
            Outcome::Responded(s) => (s.to_string(), s / 100),
            Outcome::Failed(FailureKind::LocalAppTimeout, _) => ("504 timeout".into(), 5),
            Outcome::Failed(FailureKind::LocalAppUnreachable, _) => {
                ("502 app unreachable".into(), 5)
            }
            Outcome::Failed(_, _) => ("502 app error".into(), 5),
            Outcome::Cancelled => ("--- cancelled".into(), 0),
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
        let time = format_time(head.received_at_ms);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "{time}  {:<7} {:<40} {status} {:>6} ms",
            head.method,
            truncate(&head.path, 40),
            took.as_millis()
        );
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
