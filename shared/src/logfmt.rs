//! The text log's fields, written for less: [`PlainFields`] writes exactly what
//! tracing-subscriber's default field formatter writes, by a shorter road.
//!
//! The fmt subscriber formats a span's fields when the span is created, and
//! again when a field is recorded later, whether or not a line is ever logged
//! inside it: both binaries open a `delivery` span per webhook, so this runs on
//! every request. The default formatter writes each field as
//! `write!("{}{}{:?}", italic(name), dimmed("="), value)`, painting the name and
//! the `=` through `nu_ansi_term` even when colours are off. Here, with colours
//! off, a field is `name`, `=` and the value's `Debug` written straight out: the
//! relay's span went from 4,633 to 3,501 instructions per webhook (callgrind,
//! bench/MEASUREMENTS.md), the agent's from 3,344 to 2,783. Everything this
//! shortcut does not cover (colours on, the `message` field with its escaping
//! of terminal control characters, errors with their sources) goes to the
//! default visitor itself, so the bytes stay the default's; a test compares
//! both over every kind of field.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::{RecordFields, VisitOutput},
    fmt::{
        format::{DefaultFields, DefaultVisitor, Writer},
        FormatFields,
    },
};

/// A [`FormatFields`] for the text log, identical in output to
/// [`DefaultFields`].
#[derive(Debug, Default, Clone, Copy)]
pub struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return DefaultFields::new().format_fields(writer, fields);
        }
        let mut visitor = PlainVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Hands one field to the default visitor, which pads it as it would
    /// have.
    fn default_visitor(&mut self, visit: impl FnOnce(&mut DefaultVisitor<'_>)) {
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        visit(&mut visitor);
        self.result = visitor.finish();
        self.is_empty = false;
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        if field.name() == "message" {
            self.default_visitor(|v| v.record_str(field, value));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() {
            return;
        }
        self.default_visitor(|v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        if name == "message" {
            self.default_visitor(|v| v.record_debug(field, value));
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let w = &mut self.writer;
        self.result = if self.is_empty {
            self.is_empty = false;
            Ok(())
        } else {
            w.write_char(' ')
        }
        .and_then(|()| w.write_str(name))
        .and_then(|()| w.write_char('='))
        .and_then(|()| write!(w, "{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::subscriber::with_default;
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut out) = self.0.lock() {
                out.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Outer(Inner);
    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer failed\u{1b}[31m")
        }
    }
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("inner cause")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    impl std::error::Error for Inner {}

    /// Every kind of field, in spans created with fields, recorded later and
    /// nested, and in events.
    fn log_everything() {
        let id = "01JEXAMPLE0000000000000000";
        let span =
            tracing::info_span!("delivery", delivery_id = %id, tunnel = tracing::field::Empty);
        let _entered = span.enter();
        span.record("tunnel", "stripe \"live\"\n");
        let empty = tracing::info_span!("empty");
        let _also = empty.enter();
        tracing::info!("a plain message");
        tracing::info!(
            status = 200u16,
            ok = true,
            ratio = 0.5f64,
            delta = -3i64,
            "answered {}",
            "in time"
        );
        tracing::warn!(r#type = "push", path = ?"/a b", host = %"example.com", "with r# and quotes");
        tracing::warn!(message = "\u{1b}[2Jcleared\u{7}", other = "\u{1b}x");
        let err = Outer(Inner);
        tracing::error!(error = &err as &(dyn std::error::Error + 'static), "failed");
        tracing::error!(error = &Inner as &(dyn std::error::Error + 'static));
        tracing::info!(first = 1u8);
        let late =
            tracing::info_span!("late", a = tracing::field::Empty, b = tracing::field::Empty);
        late.record("b", 2u64);
        late.record("a", "x");
        late.in_scope(|| tracing::info!(after = "records"));
    }

    fn output<N>(fields: N, ansi: bool) -> String
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(ansi)
            .without_time()
            .fmt_fields(fields)
            .finish();
        with_default(subscriber, log_everything);
        let bytes = out.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn writes_what_the_default_formatter_writes() {
        for ansi in [false, true] {
            let ours = output(PlainFields, ansi);
            let default = output(DefaultFields::new(), ansi);
            assert_eq!(ours, default, "ansi {ansi}");
            // Not empty, and every field reached the output.
            for needle in [
                "delivery_id=01JEXAMPLE",
                "tunnel=\"stripe \\\"live\\\"\\n\"",
                "status=200",
                "type=\"push\"",
                "error.sources=[inner cause]",
                "late{b=2 a=\"x\"}",
            ] {
                assert!(ansi || ours.contains(needle), "{needle} missing in {ours}");
            }
        }
    }
}
