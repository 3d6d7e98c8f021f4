//! The fields of text log lines.
//!
//! A span's fields are shown once, as first recorded, without the
//! instructions to the OpenTelemetry layer and without the messaging
//! attributes that are the same on every message. Fields are written as
//! `tracing-subscriber`'s own visitor writes them; without colours the
//! common ones (plain strings, numbers, displayed values) are written here
//! directly, since the library paints every name and `=` through
//! `nu_ansi_term` even when there is no colour to paint. The rest (the
//! message, errors, strings that need escaping, coloured output) goes to
//! the library's visitor, so a line reads the same either way.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// Text lines show each span field once, as first recorded, and leave out
/// the [`HIDDEN`] fields. (The default formatter appends a field recorded
/// again, so it showed twice in every later line of the span.)
pub(super) struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        record_unshown(Plain::new(writer, true), "", fields)
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let shown = current.fields.clone();
        let visitor = Plain::new(current.as_writer(), shown.is_empty());
        record_unshown(visitor, &shown, fields)
    }
}

/// Records `fields` through `visitor`, leaving out those [`Unshown`]
/// drops.
fn record_unshown<V, R>(visitor: V, shown: &str, fields: R) -> fmt::Result
where
    V: Visit + VisitOutput<fmt::Result>,
    R: RecordFields,
{
    let mut visitor = Unshown {
        inner: visitor,
        shown,
    };
    fields.record(&mut visitor);
    visitor.inner.finish()
}

/// Span fields text lines leave out: instructions to the OpenTelemetry
/// layer, and the messaging conventions' attributes, the same on every
/// message of a worker (system, operation, subject, group, server) and
/// exported with its spans.
const HIDDEN: &[&str] = &["otel.", "messaging.", "server."];

/// Passes on the fields not yet in `shown` and not [`HIDDEN`].
struct Unshown<'a, V> {
    inner: V,
    shown: &'a str,
}

impl<V: Visit> Unshown<'_, V> {
    fn wanted(&self, field: &Field) -> bool {
        let name = field.name();
        !HIDDEN.iter().any(|prefix| name.starts_with(prefix)) && !shows(self.shown, name)
    }
}

/// Whether formatted fields (`a=1 b="x"`) hold the field `name`; called
/// for every field of every span line, so without allocating.
fn shows(shown: &str, name: &str) -> bool {
    !shown.is_empty()
        && shown.match_indices(name).any(|(at, _)| {
            (at == 0 || shown.as_bytes()[at - 1] == b' ')
                && shown.as_bytes().get(at + name.len()) == Some(&b'=')
        })
}

impl<V: Visit> Visit for Unshown<'_, V> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.wanted(field) {
            self.inner.record_str(field, value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.wanted(field) {
            self.inner.record_error(field, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.wanted(field) {
            self.inner.record_debug(field, value);
        }
    }
}

/// Writes fields as [`DefaultVisitor`] does: `name=value` separated by
/// spaces, values in their `Debug` form, the message bare. Without colours
/// it writes the common fields itself.
struct Plain<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl<'a> Plain<'a> {
    fn new(writer: Writer<'a>, is_empty: bool) -> Self {
        Self {
            writer,
            is_empty,
            result: Ok(()),
        }
    }

    /// The name a field is written under, or `None` when it is written by
    /// the library's visitor (with colours, the message) or not at all
    /// (`log.*`, the metadata of `log` records, which it skips too).
    fn own_name<'f>(&self, field: &'f Field) -> Option<&'f str> {
        let name = field.name();
        if self.writer.has_ansi_escapes() || name == "message" || name.starts_with("log.") {
            return None;
        }
        Some(name.strip_prefix("r#").unwrap_or(name))
    }

    fn pad(&mut self) -> fmt::Result {
        if self.is_empty {
            self.is_empty = false;
            Ok(())
        } else {
            self.writer.write_char(' ')
        }
    }

    /// Writes one field through the library's visitor, on the same writer.
    fn delegate(&mut self, field: &Field, visit: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if field.name().starts_with("log.") {
            return;
        }
        let mut inner = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        visit(&mut inner);
        self.result = inner.finish();
        self.is_empty = false;
    }
}

/// Whether `{:?}` of `value` is `value` in quotes: printable ASCII without
/// a quote or a backslash.
fn debug_is_quoted(value: &str) -> bool {
    value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for Plain<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        match self.own_name(field) {
            Some(name) if debug_is_quoted(value) => {
                self.result = self
                    .pad()
                    .and_then(|()| write!(self.writer, "{name}=\"{value}\""));
            }
            _ => self.delegate(field, |v| v.record_str(field, value)),
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() {
            return;
        }
        self.delegate(field, |v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        match self.own_name(field) {
            Some(name) => {
                self.result = self
                    .pad()
                    .and_then(|()| write!(self.writer, "{name}={value:?}"));
            }
            None => self.delegate(field, |v| v.record_debug(field, value)),
        }
    }
}

impl VisitOutput<fmt::Result> for Plain<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn a_shown_field_is_found_by_its_whole_name() {
        let shown = r#"rotation.path="event" path=1 messaging.system="nats""#;
        assert!(shows(shown, "rotation.path"));
        assert!(shows(shown, "path"));
        assert!(shows(shown, "messaging.system"));
        assert!(!shows(shown, "system"));
        assert!(!shows(shown, "rotation"));
        assert!(!shows("", "path"));
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[derive(Debug)]
    struct Outer(io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("store \"down\"")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// Lines of every kind of field, in spans recorded more than once.
    fn emit() {
        let id = uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let span = tracing::info_span!(
            "process",
            otel.name = "process",
            messaging.system = "nats",
            rotation.path = "event",
            event_id = tracing::field::Empty,
            r#type = "rotated",
        );
        let _entered = span.enter();
        span.record("event_id", "e-1");
        span.record("event_id", "e-2");
        let inner = tracing::info_span!("transaction", size = 3u64, ratio = 0.5);
        let _inner = inner.enter();
        tracing::info!(
            path = "event", event_id = "e-1", %id, status = 200i64, attempt = 1i64,
            duration_ms = 0.123, changed = true, duplicate = false, empty = "",
            "rotation handled"
        );
        for odd in [
            "a\"b",
            "back\\slash",
            "tab\there",
            "new\nline",
            "café",
            "\u{1b}[31mred",
            "\u{9b}2J",
            "\u{7f}",
            "~ and space",
        ] {
            tracing::info!(event_id = odd, message = odd);
            tracing::warn!("with {odd} inside");
        }
        tracing::info!(
            big = u64::MAX,
            small = i64::MIN,
            wide = -1i128,
            nan = f64::NAN
        );
        tracing::info!(
            r#loop = 1,
            "r#quoted" = 2,
            log.target = "skipped",
            "raw names"
        );
        let e = Outer(io::Error::other("disk\u{1b} full"));
        tracing::error!(error = &e as &(dyn std::error::Error + 'static), "failed");
        tracing::error!(error = %e, shown = ?e, "failed again");
        tracing::info!("");
        tracing::info!(only = "fields");
    }

    fn lines<N>(fields: N, ansi: bool) -> String
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || out.clone())
            .with_ansi(ansi)
            .without_time()
            .fmt_fields(fields);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// The lines the worker writes for [`emit`]'s events, written out:
    /// every field but the hidden ones, the span's fields once, control
    /// characters of a value escaped.
    #[test]
    fn lines_read_as_written_out_here() {
        const SPANS: &str = "process{rotation.path=\"event\" type=\"rotated\" event_id=\"e-1\"}:\
            transaction{size=3 ratio=0.5}: rotation_worker::telemetry::text::tests: ";
        let expected: String = [
            (" INFO", "rotation handled path=\"event\" event_id=\"e-1\" id=01234567-89ab-cdef-0123-456789abcdef status=200 attempt=1 duration_ms=0.123 changed=true duplicate=false empty=\"\""),
            (" INFO", "event_id=\"a\\\"b\" a\"b"),
            (" WARN", "with a\"b inside"),
            (" INFO", "event_id=\"back\\\\slash\" back\\slash"),
            (" WARN", "with back\\slash inside"),
            (" INFO", "event_id=\"tab\\there\" tab\there"),
            (" WARN", "with tab\there inside"),
            (" INFO", "event_id=\"new\\nline\" new\nline"),
            (" WARN", "with new\nline inside"),
            (" INFO", "event_id=\"café\" café"),
            (" WARN", "with café inside"),
            (" INFO", "event_id=\"\\u{1b}[31mred\" \\x1b[31mred"),
            (" WARN", "with \\x1b[31mred inside"),
            (" INFO", "event_id=\"\\u{9b}2J\" \\u{9b}2J"),
            (" WARN", "with \\u{9b}2J inside"),
            (" INFO", "event_id=\"\\u{7f}\" \\x7f"),
            (" WARN", "with \\x7f inside"),
            (" INFO", "event_id=\"~ and space\" ~ and space"),
            (" WARN", "with ~ and space inside"),
            (" INFO", "big=18446744073709551615 small=-9223372036854775808 wide=-1 nan=NaN"),
            (" INFO", "raw names loop=1 quoted=2"),
            ("ERROR", "failed error=store \"down\" error.sources=[disk\\x1b full]"),
            ("ERROR", "failed again error=store \"down\" shown=Outer(Custom { kind: Other, error: \"disk\\u{1b} full\" })"),
            (" INFO", ""),
            (" INFO", "only=\"fields\""),
        ]
        .map(|(level, rest)| format!("{level} {SPANS}{rest}\n"))
        .concat();
        assert_eq!(lines(TextFields, false), expected);
        // With colours, the same fields between the library's escapes, and
        // a value's control characters still escaped.
        let coloured = lines(TextFields, true);
        assert_eq!(coloured.lines().count(), expected.lines().count());
        assert!(
            coloured.contains("\u{1b}[3mevent_id\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"\\u{1b}[31mred\"")
        );
        assert!(!coloured.contains("\u{1b}[31mred") && !coloured.contains("otel.name"));
    }
}
