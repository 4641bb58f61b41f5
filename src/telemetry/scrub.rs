//! Defence in depth for log lines and exported spans: replaces PHI-shaped substrings (US social security numbers,
//! e-mail addresses, phone numbers with separators or in E.164 form, ISO and US calendar dates) with `[redacted]`,
//! and names the only field and attribute keys whose values may be written at all.
//!
//! The first line of defence is that nothing PHI-bearing is ever put into a field; this catches mistakes. Dates are
//! redacted wherever they appear (a date of birth looks like any other date), so log times as numbers.

use regex::Regex;
use std::borrow::Cow;
use std::sync::LazyLock;

/// What a scrubbed substring is replaced with.
pub const REDACTED: &str = "[redacted]";

/// The value written for a field whose key is not allow-listed.
pub const WITHHELD: &str = "[withheld]";

static PHI_SHAPED: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(concat!(
        // SSN
        r"\b\d{3}-\d{2}-\d{4}\b",
        // e-mail
        r"|[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}",
        // phone: (555) 123-4567, 555-123-4567, 555.123.4567, +1 555 123 4567, +15551234567
        r"|(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{3}\)\s?|\b\d{3}[\s.\-])\d{3}[\s.\-]\d{4}\b",
        r"|\+\d{10,14}\b",
        // ISO date (also inside a date-time), US date
        r"|\b(?:1[89]|20)\d{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])",
        r"|\b(?:0?[1-9]|1[0-2])/(?:0?[1-9]|[12]\d|3[01])/(?:1[89]|20)\d{2}\b",
    ))
    .ok()
});

/// `text` with every PHI-shaped substring replaced by [`REDACTED`]. Fails closed: if the pattern could not be
/// built, the whole value is redacted.
pub fn scrub(text: &str) -> Cow<'_, str> {
    match PHI_SHAPED.as_ref() {
        Some(re) => re.replace_all(text, REDACTED),
        None => Cow::Borrowed(REDACTED),
    }
}

/// Keys whose values may appear in a log line or on an exported span (values are still scrubbed). Anything else is
/// written as [`WITHHELD`] in logs and dropped from spans. Add a key here only for values that can never carry
/// PHI, an identifier of a person or record, a credential, or text a client sent.
pub const ALLOWED_KEYS: &[&str] = &[
    // event text (static messages) and library log metadata
    "message",
    "log.target",
    "log.module_path",
    "log.file",
    "log.line",
    // the request log and the HTTP server span (HTTP semantic conventions)
    "request_id",
    "carevault.request_id",
    "http.method",
    "http.request.method",
    "http.route",
    "http.status",
    "http.response.status_code",
    "duration_ms",
    "error.type",
    "error.kind",
    "error.detail",
    // pipeline spans: timings and counts only
    "db.system.name",
    "carevault.count",
    "carevault.outcome",
    "audit.batch",
    "busy_ns",
    "idle_ns",
    // added by tracing-opentelemetry to spans and span events
    "code.file.path",
    "code.module.name",
    "code.line.number",
    "level",
    "target",
    // process-level events
    "panic.location",
    "listen",
    "process.signal",
    "metrics.listen",
    // key and audit maintenance: version and sequence numbers only
    "key.active",
    "key.index",
    "audit.checkpoint_seq",
];

/// True when values under `key` may be written (after scrubbing).
pub fn allowed(key: &str) -> bool {
    ALLOWED_KEYS.contains(&key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_each_phi_shape() {
        for (input, expected) in [
            ("ssn 123-45-6789 seen", "ssn [redacted] seen"),
            ("mail jane.doe+x@example.co.uk now", "mail [redacted] now"),
            ("call (555) 123-4567", "call [redacted]"),
            ("call 555-123-4567.", "call [redacted]."),
            ("call 555.123.4567", "call [redacted]"),
            ("call +1 555 123 4567", "call [redacted]"),
            ("call +15551234567", "call [redacted]"),
            ("born 1984-07-02", "born [redacted]"),
            ("at 2026-03-01T09:00:00Z", "at [redacted]T09:00:00Z"),
            ("born 7/2/1984", "born [redacted]"),
            ("a 123-45-6789 and b@c.org", "a [redacted] and [redacted]"),
        ] {
            assert_eq!(scrub(input), expected, "input: {input}");
        }
    }

    #[test]
    fn leaves_ordinary_values_alone() {
        for input in [
            "request",
            "550e8400-e29b-41d4-a716-446655440000",
            "/fhir/{type}/{id}",
            "GET /fhir/Patient",
            "duration 12.5 ms",
            "1772355600000000",
            "version 1.2.3",
            "127.0.0.1:8443",
            "src/audit/store.rs:96",
        ] {
            assert_eq!(scrub(input), input);
            assert!(matches!(scrub(input), Cow::Borrowed(_)), "no allocation for a clean value");
        }
    }

    #[test]
    fn allow_list_is_closed() {
        assert!(allowed("http.route"));
        assert!(!allowed("url.full"));
        assert!(!allowed("patient_id"));
        assert!(!allowed("http.request.header.authorization"));
    }
}
