//! The JSON log line: one object per event with `timestamp`, `level`, `target` and the event's fields, flattened.
//! Field values pass through the allow-list and the scrubber ([`super::scrub`]) before they are written: a key that
//! is not allow-listed is written with the value `[withheld]`, and PHI-shaped substrings become `[redacted]`.

use super::scrub::{WITHHELD, allowed, scrub};
use serde_json::{Map, Value};
use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter used for every log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScrubbedJson;

impl<S, N> FormatEvent<S, N> for ScrubbedJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let (timestamp, mut fields) = recorded(event)?;
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert("timestamp".into(), Value::String(timestamp));
        line.insert("level".into(), Value::String(meta.level().as_str().to_owned()));
        line.insert("target".into(), Value::String(scrub(meta.target()).into_owned()));
        line.append(&mut fields.0);
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// The event formatter for a terminal: `TIME LEVEL target: message key=value …`, with the same allow-list and
/// scrubbing as [`ScrubbedJson`] (only the layout differs).
#[derive(Debug, Default, Clone, Copy)]
pub struct ScrubbedHuman;

impl<S, N> FormatEvent<S, N> for ScrubbedHuman
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let (timestamp, mut fields) = recorded(event)?;
        let meta = event.metadata();
        let message = match fields.0.remove("message") {
            Some(Value::String(m)) => m,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        write!(writer, "{timestamp} {:>5} {}: {message}", meta.level().as_str(), scrub(meta.target()))?;
        for (k, v) in &fields.0 {
            match v {
                Value::String(text) => write!(writer, " {k}={text}")?,
                other => write!(writer, " {k}={other}")?,
            }
        }
        writeln!(writer)
    }
}

/// The time of an event and its fields, allow-listed and scrubbed: what both layouts write.
fn recorded(event: &Event<'_>) -> Result<(String, Fields), fmt::Error> {
    let mut timestamp = String::new();
    SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
    let mut fields = Fields(Map::new(), event.metadata().target().starts_with("opentelemetry"));
    event.record(&mut fields);
    Ok((timestamp, fields))
}

/// The event's fields; the flag marks the OpenTelemetry SDK's own diagnostics (export failures), whose `name`,
/// `error` and `reason` fields say what failed (an endpoint, a status) and are kept, scrubbed like any value.
struct Fields(Map<String, Value>, bool);

/// Fields of the OpenTelemetry SDK's own events that are written (after scrubbing).
const OTEL_DIAGNOSTIC_KEYS: &[&str] = &["name", "error", "reason", "status", "message"];

impl Fields {
    fn put(&mut self, field: &Field, value: impl FnOnce() -> Value) {
        let keep = allowed(field.name()) || (self.1 && OTEL_DIAGNOSTIC_KEYS.contains(&field.name()));
        let value = if keep { value() } else { Value::String(WITHHELD.to_owned()) };
        self.0.insert(field.name().to_owned(), value);
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, || Value::String(scrub(value).into_owned()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, || Value::String(scrub(&format!("{value:?}")).into_owned()));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, || Value::String(scrub(&value.to_string()).into_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, || Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, || Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, || Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, || Value::from(value));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::ErrorKind::Other)?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let out = Capture::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::registry()
            .with(super::super::log_layer(move || sink.clone(), tracing_subscriber::EnvFilter::new("trace")));
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn lines_are_json_with_scrubbed_allowed_fields_and_withheld_others() {
        let lines = capture(|| {
            tracing::warn!(
                error.detail = "row for jane@example.org born 1984-07-02 not found",
                patient_name = "Jane Doe",
                http.route = "/fhir/{type}/{id}",
                http.response.status_code = 404u16,
                mrn = 123456u64,
                "lookup failed for 123-45-6789"
            );
        });
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["error.detail"], "row for [redacted] born [redacted] not found");
        assert_eq!(line["message"], "lookup failed for [redacted]");
        assert_eq!(line["patient_name"], "[withheld]");
        assert_eq!(line["mrn"], "[withheld]");
        assert_eq!(line["http.route"], "/fhir/{type}/{id}");
        assert_eq!(line["http.response.status_code"], 404);
        assert!(line["timestamp"].as_str().is_some_and(|t| t.len() >= 20), "the log's own timestamp stays readable");
    }

    #[test]
    fn display_and_error_values_are_scrubbed() {
        let err = std::io::Error::other("cannot reach +15551234567");
        let lines = capture(|| {
            tracing::error!(error.kind = %"ssn 123-45-6789", error.type = ?"x@y.io", error.detail = &err as &dyn std::error::Error, "e");
        });
        assert_eq!(lines[0]["error.kind"], "ssn [redacted]");
        assert_eq!(lines[0]["error.type"], "\"[redacted]\"");
        assert_eq!(lines[0]["error.detail"], "cannot reach [redacted]");
    }

    #[test]
    fn opentelemetry_export_failures_say_what_failed_and_others_stay_withheld() {
        let lines = capture(|| {
            tracing::warn!(target: "opentelemetry_sdk", name = "BatchSpanProcessor.Export.Error", error = "connection refused for jane@example.org", "export failed");
            tracing::warn!(target: "carevault::api", name = "Jane Doe", "other");
        });
        assert_eq!(lines[0]["name"], "BatchSpanProcessor.Export.Error");
        assert_eq!(lines[0]["error"], "connection refused for [redacted]");
        assert_eq!(lines[1]["name"], "[withheld]");
    }
}
