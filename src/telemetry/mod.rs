//! Telemetry: structured JSON logs on stdout, and traces and metrics over OTLP/HTTP when the standard `OTEL_*`
//! variables name an endpoint (nothing is exported otherwise). See `docs/telemetry.md`.
//!
//! Guarantees: routes are recorded as templates, never as raw paths; no query string, body, header value, resource
//! id or client-supplied text is put in a log field, span attribute or metric label. Defence in depth behind that:
//! only allow-listed keys are written ([`scrub::ALLOWED_KEYS`]), every string value is scrubbed of PHI-shaped text,
//! HTTP methods outside the standard set become `_OTHER`, and the panic hook prints no payload.

pub mod log;
pub mod metrics;
pub mod otel;
pub mod scrub;

use crate::config::Config;
use actix_web::Error;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::time::Instant;
use tracing::Instrument;
use tracing::field::Empty;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, filter};

/// Keeps the OTLP providers alive; dropping it flushes and shuts them down.
#[must_use = "dropping the guard stops the export"]
#[derive(Debug, Default)]
pub struct Guard {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    /// What `/metrics` serves (set when `metrics.listen` is).
    prometheus: Option<prometheus::Registry>,
}

impl Guard {
    /// The registry behind `/metrics`, when `metrics.listen` is set.
    pub fn prometheus(&self) -> Option<prometheus::Registry> {
        self.prometheus.clone()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter.take() {
            let _ = m.shutdown();
        }
    }
}

/// Installs the log subscriber, the OTLP exporters the environment asks for, and the panic hook; once per process
/// (later calls install nothing and return an empty guard). Keep the guard until the process ends.
pub fn init(config: &Config) -> Guard {
    install(
        config.profile.as_str(),
        otel::Signals::from_env(|k| std::env::var(k).ok()),
        config.metrics.listen.is_some(),
    )
}

/// Logs only (no export), for CLI commands.
pub fn init_logging() {
    drop(install("cli", otel::Signals::default(), false));
}

fn install(environment: &'static str, signals: otel::Signals, prometheus: bool) -> Guard {
    let resource = otel::resource(environment);
    let mut problems = Vec::new();
    let tracer = signals
        .traces
        .then(|| otel::tracer_provider(resource.clone()))
        .and_then(|r| r.map_err(|e| problems.push(e)).ok());
    let registry = prometheus.then(prometheus::Registry::new);
    let meter = (signals.metrics || prometheus)
        .then(|| otel::meter_provider(resource, signals.metrics, registry.clone()))
        .and_then(|r| r.map_err(|e| problems.push(e)).ok());
    let otel_layer = tracer.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("carevault"))
            .with_threads(false)
            .with_error_fields_to_exceptions(false)
            .with_error_events_to_exceptions(false)
            .with_filter(filter::Targets::new().with_target("carevault", tracing::Level::INFO))
    });
    // Human-readable lines for a person at a terminal, JSON for everything else (containers, files, pipes).
    let lines: Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync> =
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            Box::new(human_layer(std::io::stdout, env_filter()))
        } else {
            Box::new(log_layer(std::io::stdout, env_filter()))
        };
    let installed = tracing_subscriber::registry().with(lines).with(otel_layer).try_init();
    if installed.is_err() {
        return Guard::default();
    }
    if let Some(t) = &tracer {
        opentelemetry::global::set_tracer_provider(t.clone());
    }
    if let Some(m) = &meter {
        opentelemetry::global::set_meter_provider(m.clone());
        metrics::observe_process();
    }
    for problem in problems {
        tracing::warn!(error.detail = %problem, "telemetry export disabled");
    }
    install_panic_hook();
    Guard { tracer, meter, prometheus: registry }
}

/// The log filter (an `EnvFilter` directive): `CAREVAULT_LOG`, else the conventional `RUST_LOG`, else `info`.
fn env_filter() -> EnvFilter {
    filter_from(|k| std::env::var(k).ok())
}

fn filter_from(var: impl Fn(&str) -> Option<String>) -> EnvFilter {
    ["CAREVAULT_LOG", "RUST_LOG"]
        .iter()
        .filter_map(|k| var(k).filter(|v| !v.trim().is_empty()))
        .find_map(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new("info"))
}

/// Binds the plain-HTTP `/metrics` listener on `addr` (one worker; signals are handled by the caller, which
/// stops it with the API). Returns the running server and the bound address (port 0 picks one).
pub fn metrics_server(
    addr: std::net::SocketAddr,
    registry: prometheus::Registry,
) -> std::io::Result<(actix_web::dev::Server, std::net::SocketAddr)> {
    use actix_web::{App, HttpResponse, HttpServer, web};
    let listener = std::net::TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let data = web::Data::new(registry);
    let server = HttpServer::new(move || {
        App::new().app_data(data.clone()).route(
            "/metrics",
            web::get().to(|r: web::Data<prometheus::Registry>| async move {
                HttpResponse::Ok()
                    .content_type(prometheus::TEXT_FORMAT)
                    .insert_header(("cache-control", "no-store"))
                    .body(prometheus_text(&r))
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)?
    .run();
    Ok((server, bound))
}

/// Renders the Prometheus text exposition of `registry` (the body of `/metrics`).
pub fn prometheus_text(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    if prometheus::TextEncoder::new().encode(&registry.gather(), &mut out).is_err() {
        return String::new();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The JSON log layer writing to `writer`: events only (spans are never formatted), through the allow-list and the
/// scrubber. Public so tests can capture log lines in process.
pub fn log_layer<S, W>(writer: W, level: EnvFilter) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::filter::FilterExt;
    let events_only = filter::filter_fn(|meta| meta.is_event());
    tracing_subscriber::fmt::layer()
        .event_format(log::ScrubbedJson)
        .with_writer(writer)
        .with_filter(events_only.and(level))
}

/// The human-readable layer used when standard output is a terminal: one line per event (time, level, message,
/// fields), through the same allow-list and scrubber as the JSON lines.
pub fn human_layer<S, W>(writer: W, level: EnvFilter) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::filter::FilterExt;
    let events_only = filter::filter_fn(|meta| meta.is_event());
    tracing_subscriber::fmt::layer()
        .event_format(log::ScrubbedHuman)
        .with_writer(writer)
        .with_filter(events_only.and(level))
}

/// Replaces panic output with a line that carries no payload (a panic message may quote data).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        tracing::error!(panic.location = %location, "panic (payload withheld)");
    }));
}

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request id of the request being served (set by [`request_log`]).
#[derive(Debug, Clone, Copy)]
pub struct RequestId(pub uuid::Uuid);

/// The method as recorded: one of the standard names, or `_OTHER` (an extension method is client text).
pub fn method_name(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "_OTHER",
    }
}

/// Per request: an `http.server.request` span (kind server; method, route template, status, request id), the
/// request-duration metric, one log line, and the `X-Request-Id` response header.
pub async fn request_log(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let started = Instant::now();
    let id = uuid::Uuid::new_v4();
    actix_web::HttpMessage::extensions_mut(&req).insert(RequestId(id));
    let method = method_name(req.method());
    let route = req.match_pattern();
    let span = tracing::info_span!(
        target: "carevault::http",
        "http.server.request",
        otel.name = Empty,
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = method,
        http.route = Empty,
        http.response.status_code = Empty,
        error.type = Empty,
        carevault.request_id = %id,
    );
    if !span.is_disabled() {
        match &route {
            Some(r) => {
                span.record("otel.name", format!("{method} {r}"));
                span.record("http.route", r.as_str());
            }
            None => {
                span.record("otel.name", method);
            }
        }
    }
    let result = next.call(req).instrument(span.clone()).await;
    let status = match &result {
        Ok(res) => res.status(),
        Err(e) => e.as_response_error().status_code(),
    };
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
        span.record("error.type", status.as_str());
    }
    drop(span);
    let elapsed = started.elapsed();
    metrics::http_request(method, route.as_deref(), status.as_u16(), elapsed);
    tracing::info!(
        target: "carevault::http",
        request_id = %id,
        http.method = method,
        http.route = route.as_deref().unwrap_or("(unmatched)"),
        http.status = status.as_u16(),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    let mut res = result?;
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        res.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_methods_are_not_recorded() {
        assert_eq!(method_name(&Method::GET), "GET");
        assert_eq!(method_name(&Method::from_bytes(b"CANARY-123-45-6789").unwrap()), "_OTHER");
    }
}
