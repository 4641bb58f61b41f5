//! OTLP export (http/protobuf) of traces and metrics, configured by the standard `OTEL_*` variables and enabled
//! only when an OTLP endpoint is set. Every span passes through [`AllowListExporter`] on its way out: attributes
//! whose keys are not allow-listed are dropped, string values are scrubbed, event and span names are scrubbed,
//! error descriptions are replaced by a fixed text and links are removed.

use super::scrub::{allowed, scrub};
use opentelemetry::trace::Status;
use opentelemetry::{KeyValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use std::time::Duration;

/// Which signals the environment asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Signals {
    pub traces: bool,
    pub metrics: bool,
}

impl Signals {
    /// Reads `OTEL_SDK_DISABLED`, `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT` and
    /// `OTEL_{TRACES,METRICS}_EXPORTER` (only `none` and `otlp` are understood; anything else turns a signal off).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Signals {
        let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Signals::default();
        }
        let exporter_on = |name: &str| var(name).is_none_or(|v| v.trim().is_empty() || v.trim() == "otlp");
        Signals {
            traces: exporter_on("OTEL_TRACES_EXPORTER")
                && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")),
            metrics: exporter_on("OTEL_METRICS_EXPORTER")
                && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")),
        }
    }
}

/// `service.name` (from `OTEL_SERVICE_NAME`, default `carevault`), `service.version`, `deployment.environment.name`
/// (and the older `deployment.environment`), plus `OTEL_RESOURCE_ATTRIBUTES`.
pub fn resource(environment: &'static str) -> Resource {
    let mut builder = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty()) {
        // The SDK's detector has read it already.
    } else {
        builder = builder.with_service_name("carevault");
    }
    builder
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("deployment.environment.name", environment),
            KeyValue::new("deployment.environment", environment),
        ])
        .build()
}

/// Builds the tracer provider (batch export over OTLP/HTTP).
pub fn tracer_provider(resource: Resource) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()
        .map_err(|e| format!("OTLP trace exporter: {e}"))?;
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(AllowListExporter { inner: exporter })
        .build())
}

/// Builds the meter provider: periodic export over OTLP/HTTP when `otlp` (`OTEL_METRIC_EXPORT_INTERVAL`, default
/// 60 s), and a pull reader feeding `registry` for `/metrics` when one is given.
pub fn meter_provider(
    resource: Resource,
    otlp: bool,
    registry: Option<prometheus::Registry>,
) -> Result<SdkMeterProvider, String> {
    let mut builder = SdkMeterProvider::builder().with_resource(resource);
    if otlp {
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()
            .map_err(|e| format!("OTLP metric exporter: {e}"))?;
        builder = builder.with_reader(PeriodicReader::builder(exporter).build());
    }
    if let Some(registry) = registry {
        let reader = opentelemetry_prometheus::exporter()
            .with_registry(registry)
            .without_scope_info()
            .build()
            .map_err(|e| format!("Prometheus exporter: {e}"))?;
        builder = builder.with_reader(reader);
    }
    Ok(builder.build())
}

/// A span exporter that lets only allow-listed, scrubbed attributes through to `inner`.
#[derive(Debug)]
pub struct AllowListExporter<E> {
    pub inner: E,
}

impl<E: SpanExporter> SpanExporter for AllowListExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.inner.export(batch.into_iter().map(redact_span).collect()).await
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The span as it may leave the process.
pub fn redact_span(mut span: SpanData) -> SpanData {
    span.name = scrub(&span.name).into_owned().into();
    let before = span.attributes.len();
    span.attributes = redact_attributes(std::mem::take(&mut span.attributes));
    span.dropped_attributes_count += u32::try_from(before - span.attributes.len()).unwrap_or(u32::MAX);
    for event in &mut span.events.events {
        event.name = scrub(&event.name).into_owned().into();
        event.attributes = redact_attributes(std::mem::take(&mut event.attributes));
    }
    span.links.dropped_count += u32::try_from(span.links.links.len()).unwrap_or(u32::MAX);
    span.links.links.clear();
    if let Status::Error { .. } = span.status {
        span.status = Status::error("error");
    }
    span
}

fn redact_attributes(attributes: Vec<KeyValue>) -> Vec<KeyValue> {
    attributes
        .into_iter()
        .filter(|kv| allowed(kv.key.as_str()))
        .filter_map(|kv| match kv.value {
            Value::String(s) => Some(KeyValue::new(kv.key, scrub(s.as_str()).into_owned())),
            Value::Bool(_) | Value::I64(_) | Value::F64(_) => Some(kv),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, SpanKind};
    use opentelemetry::{InstrumentationScope, trace::Event};
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn nothing_is_exported_unless_an_endpoint_is_set() {
        assert_eq!(Signals::from_env(env(&[])), Signals::default());
        assert_eq!(Signals::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])), Signals::default());
        assert_eq!(
            Signals::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")])),
            Signals { traces: true, metrics: true }
        );
        assert_eq!(
            Signals::from_env(env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4318/v1/traces")])),
            Signals { traces: true, metrics: false }
        );
        assert_eq!(
            Signals::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"), ("OTEL_METRICS_EXPORTER", "none")])),
            Signals { traces: true, metrics: false }
        );
        assert_eq!(
            Signals::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"), ("OTEL_SDK_DISABLED", "true")])),
            Signals::default()
        );
    }

    #[test]
    fn spans_keep_only_allow_listed_scrubbed_attributes() {
        let span = SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: "GET /fhir/{type}/{id}".into(),
            start_time: std::time::SystemTime::UNIX_EPOCH,
            end_time: std::time::SystemTime::UNIX_EPOCH,
            attributes: vec![
                KeyValue::new("http.route", "/fhir/{type}/{id}"),
                KeyValue::new("http.response.status_code", 500i64),
                KeyValue::new("url.full", "https://x/fhir/Patient/secret-id?name=Jane"),
                KeyValue::new("error.detail", "bad row for 123-45-6789"),
            ],
            dropped_attributes_count: 0,
            events: opentelemetry_sdk::trace::SpanEvents::default(),
            links: opentelemetry_sdk::trace::SpanLinks::default(),
            status: Status::error("row for Jane Doe"),
            instrumentation_scope: InstrumentationScope::builder("carevault").build(),
        };
        let mut span = span;
        span.events.events.push(Event::new(
            "failed for jane@example.org",
            std::time::SystemTime::UNIX_EPOCH,
            vec![KeyValue::new("patient", "Jane"), KeyValue::new("level", "ERROR")],
            0,
        ));
        let out = redact_span(span);
        let keys: Vec<&str> = out.attributes.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["http.route", "http.response.status_code", "error.detail"]);
        assert_eq!(out.attributes[2].value.as_str(), "bad row for [redacted]");
        assert_eq!(out.dropped_attributes_count, 1);
        assert_eq!(out.events.events[0].name, "failed for [redacted]");
        assert_eq!(out.events.events[0].attributes, vec![KeyValue::new("level", "ERROR")]);
        assert_eq!(out.status, Status::error("error"));
    }
}
