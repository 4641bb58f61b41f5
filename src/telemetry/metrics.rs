//! The metric facade: one function per measurement, each with a fixed name and only bounded, non-identifying
//! labels (route templates, status codes, fixed reason codes). Instruments bind to the global meter provider on
//! first use, so [`super::init`] must run before the first call; without an OTLP endpoint every call is a no-op.
//!
//! Exported instruments (names follow the OpenTelemetry semantic conventions where one exists):
//! `http.server.request.duration` (s; `http.request.method`, `http.route`, `http.response.status_code`),
//! `carevault.auth.failures` (`reason`), `carevault.audit.append.duration` (s), `carevault.audit.append.batch_size`,
//! `carevault.crypto.decryptions`, `carevault.crypto.decrypt_failures`, `carevault.access.decisions` (`decision`), `carevault.alerts.raised` (`rule`),
//! `db.client.connection.count` (`db.client.connection.state` = `idle` | `used`), `db.client.connection.max`.

use crate::store::Db;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, ObservableCounter, ObservableGauge};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

struct Instruments {
    http_duration: Histogram<f64>,
    auth_failures: Counter<u64>,
    audit_duration: Histogram<f64>,
    audit_batch: Histogram<u64>,
    decisions: Counter<u64>,
    alerts: Counter<u64>,
}

fn meter() -> Meter {
    opentelemetry::global::meter("carevault")
}

static INSTRUMENTS: LazyLock<Instruments> = LazyLock::new(|| {
    let m = meter();
    Instruments {
        http_duration: m
            .f64_histogram("http.server.request.duration")
            .with_unit("s")
            .with_description("Duration of HTTP server requests")
            .with_boundaries(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            .build(),
        auth_failures: m.u64_counter("carevault.auth.failures").with_description("Failed authentications").build(),
        audit_duration: m
            .f64_histogram("carevault.audit.append.duration")
            .with_unit("s")
            .with_description("Time to append and commit one batch of audit events")
            .with_boundaries(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0])
            .build(),
        audit_batch: m
            .u64_histogram("carevault.audit.append.batch_size")
            .with_description("Audit events committed per transaction")
            .with_boundaries(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0])
            .build(),
        decisions: m.u64_counter("carevault.access.decisions").with_description("Access policy decisions").build(),
        alerts: m.u64_counter("carevault.alerts.raised").with_description("Security alerts raised").build(),
    }
});

/// Observable instruments registered by [`observe_process`] and [`observe_pool`], kept alive here.
static OBSERVERS: Mutex<Vec<Observer>> = Mutex::new(Vec::new());

enum Observer {
    Counter(#[allow(dead_code)] ObservableCounter<u64>),
    Gauge(#[allow(dead_code)] ObservableGauge<u64>),
}

fn keep(o: Observer) {
    if let Ok(mut all) = OBSERVERS.lock() {
        all.push(o);
    }
}

/// One finished HTTP request. `route` is the matched template (`None` when no route matched); `method` must be
/// one of the fixed names from [`super::method_name`].
pub fn http_request(method: &'static str, route: Option<&str>, status: u16, elapsed: Duration) {
    let mut attrs = Vec::with_capacity(3);
    attrs.push(KeyValue::new("http.request.method", method));
    if let Some(route) = route {
        attrs.push(KeyValue::new("http.route", route.to_owned()));
    }
    attrs.push(KeyValue::new("http.response.status_code", i64::from(status)));
    INSTRUMENTS.http_duration.record(elapsed.as_secs_f64(), &attrs);
}

/// A failed authentication; `reason` is a fixed code such as `invalid-credentials`, `invalid-client`,
/// `invalid-token`, `refresh-token-reuse`.
pub fn auth_failure(reason: &'static str) {
    INSTRUMENTS.auth_failures.add(1, &[KeyValue::new("reason", reason)]);
}

/// One committed audit batch of `batch` events that took `elapsed`.
pub fn audit_append(batch: usize, elapsed: Duration) {
    INSTRUMENTS.audit_duration.record(elapsed.as_secs_f64(), &[]);
    INSTRUMENTS.audit_batch.record(u64::try_from(batch).unwrap_or(u64::MAX), &[]);
}

/// One access-policy decision.
pub fn policy_decision(allowed: bool) {
    INSTRUMENTS.decisions.add(1, &[KeyValue::new("decision", if allowed { "allow" } else { "deny" })]);
}

/// One security alert raised by `rule` (a fixed rule name from the configuration schema).
pub fn alert_raised(rule: &'static str) {
    INSTRUMENTS.alerts.add(1, &[KeyValue::new("rule", rule)]);
}

/// Registers process-wide observed counters: field decryptions (read from [`crate::crypto::decryptions`]).
pub fn observe_process() {
    let counter = meter()
        .u64_observable_counter("carevault.crypto.decryptions")
        .with_description("Field decryptions since the process started")
        .with_callback(|o| o.observe(crate::crypto::decryptions(), &[]))
        .build();
    keep(Observer::Counter(counter));
    let failures = meter()
        .u64_observable_counter("carevault.crypto.decrypt_failures")
        .with_description("Field decryptions that failed (integrity) since the process started")
        .with_callback(|o| o.observe(crate::crypto::decrypt_failures(), &[]))
        .build();
    keep(Observer::Counter(failures));
}

/// Registers connection-pool gauges for `db` (call once, for the server's pool).
pub fn observe_pool(db: &Db) {
    let m = meter();
    let for_count = db.clone();
    let count = m
        .u64_observable_gauge("db.client.connection.count")
        .with_description("Connections in the pool, by state")
        .with_callback(move |o| {
            let (open, idle, _) = for_count.pool_state();
            o.observe(u64::from(idle), &[KeyValue::new("db.client.connection.state", "idle")]);
            o.observe(u64::from(open.saturating_sub(idle)), &[KeyValue::new("db.client.connection.state", "used")]);
        })
        .build();
    let for_max = db.clone();
    let max = m
        .u64_observable_gauge("db.client.connection.max")
        .with_description("Largest number of connections the pool opens")
        .with_callback(move |o| o.observe(u64::from(for_max.pool_state().2), &[]))
        .build();
    keep(Observer::Gauge(count));
    keep(Observer::Gauge(max));
}
