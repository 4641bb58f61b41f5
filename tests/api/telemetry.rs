//! Telemetry end to end: the real binary exports traces and metrics over OTLP/HTTP to a receiver in this test
//! (decoded with the official protobuf types), and no client-supplied value (canaries in paths, query strings,
//! headers, bodies, methods; raw and base64) reaches a log line, a span, a metric or an error body.

use crate::helpers::client_trusting;
use actix_web::{App, HttpResponse, HttpServer, web};
use base64::Engine;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use prost::Message;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An OTLP/HTTP receiver on 127.0.0.1:0 that keeps every request body.
#[derive(Clone, Default)]
pub struct Receiver {
    pub traces: Arc<Mutex<Vec<Vec<u8>>>>,
    pub metrics: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Receiver {
    /// Starts the receiver; returns it with its base URL (`http://127.0.0.1:PORT`).
    pub fn start() -> (Receiver, String, actix_web::dev::ServerHandle) {
        let receiver = Receiver::default();
        let data = web::Data::new(receiver.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
                .route(
                    "/v1/traces",
                    web::post().to(|r: web::Data<Receiver>, body: web::Bytes| async move {
                        r.traces.lock().unwrap().push(body.to_vec());
                        HttpResponse::Ok().content_type("application/x-protobuf").finish()
                    }),
                )
                .route(
                    "/v1/metrics",
                    web::post().to(|r: web::Data<Receiver>, body: web::Bytes| async move {
                        r.metrics.lock().unwrap().push(body.to_vec());
                        HttpResponse::Ok().content_type("application/x-protobuf").finish()
                    }),
                )
        })
        .workers(1)
        .bind("127.0.0.1:0")
        .unwrap();
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        (receiver, format!("http://127.0.0.1:{port}"), handle)
    }

    pub fn spans(&self) -> Vec<(Vec<KeyValue>, Span)> {
        let mut out = Vec::new();
        for body in self.traces.lock().unwrap().iter() {
            let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP trace protobuf");
            for rs in req.resource_spans {
                let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        out.push((resource.clone(), span));
                    }
                }
            }
        }
        out
    }

    pub fn metrics(&self) -> Vec<ExportMetricsServiceRequest> {
        self.metrics
            .lock()
            .unwrap()
            .iter()
            .map(|b| ExportMetricsServiceRequest::decode(b.as_slice()).expect("OTLP metrics protobuf"))
            .collect()
    }

    fn all_bytes(&self) -> Vec<Vec<u8>> {
        let mut all = self.traces.lock().unwrap().clone();
        all.extend(self.metrics.lock().unwrap().iter().cloned());
        all
    }
}

pub fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).and_then(|v| v.value.as_ref())
}

pub fn attr_str<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attrs, key) {
        Some(any_value::Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

pub fn attr_int(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key) {
        Some(any_value::Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

/// The real `carevault serve` in a child process, its stdout and stderr collected line by line.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub client: reqwest::Client,
    pub output: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts the binary on a fresh SQLite database with `env` added; `setup` runs on the migrated database first.
    pub fn start(env: &[(&str, &str)], setup: impl FnOnce(&mut carevault::store::AnyConnection)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("carevault.db");
        let config = dir.path().join("carevault.toml");
        std::fs::write(
            &config,
            format!(
                "database_url = \"sqlite://{}\"\nlisten = \"127.0.0.1:0\"\n[access]\npolicy_dir = \"{}\"\n",
                db_path.display(),
                crate::helpers::policy_dir().display()
            ),
        )
        .unwrap();
        let target = carevault::config::DatabaseTarget::Sqlite(db_path);
        let db = carevault::store::Db::connect(&target, 1).unwrap();
        db.migrate().unwrap();
        setup(&mut db.conn().unwrap());
        drop(db);
        // `CAREVAULT_TEST_BIN` overrides the binary (a target directory shared by several worktrees uplifts
        // whichever `carevault` was built last).
        let bin = std::env::var("CAREVAULT_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_carevault").to_owned());
        let mut cmd = Command::new(bin);
        cmd.arg("--data-dir").arg(dir.path()).arg("--config").arg(&config).arg("serve");
        for (k, _) in std::env::vars() {
            if k.starts_with("OTEL_") || k.starts_with("CAREVAULT_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("CAREVAULT_LOG", "info").envs(env.iter().copied());
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                    output.lock().unwrap().push(line);
                }
            });
        }
        let started = Instant::now();
        let port = loop {
            let found = output.lock().unwrap().iter().find_map(|l| {
                l.strip_prefix("carevault is serving on https://127.0.0.1:").map(|p| p.trim().parse::<u16>().unwrap())
            });
            if let Some(port) = found {
                break port;
            }
            if started.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
                panic!("server did not start: {:#?}", output.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let cert = std::fs::read(dir.path().join("tls/cert.pem")).unwrap();
        Server { child, base: format!("https://localhost:{port}"), client: client_trusting(&cert), output, _dir: dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// SIGINT (graceful stop, which flushes the exporters) and wait for the exit.
    pub fn stop(&mut self) {
        let status = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
        let started = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(started.elapsed() < Duration::from_secs(30), "server did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.output.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fast_export(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300".to_owned()),
    ]
}

const USER: &str = "telemetry.clinician";
const PASSWORD: &str = "correct horse battery staple 42";

fn add_user(conn: &mut carevault::store::AnyConnection) {
    use carevault::auth::service::{NewAccount, create_account};
    let new = NewAccount {
        username: USER.to_owned(),
        kind: "user",
        role: carevault::role::Role::Clinician,
        practitioner: Some(uuid::Uuid::new_v4()),
        patient: None,
    };
    let now = carevault::clock::system().now();
    create_account(conn, &new, &secrecy::SecretString::from(PASSWORD.to_owned()), now).unwrap();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_are_exported_with_templates_and_no_client_values() {
    let (receiver, endpoint, collector) = Receiver::start();
    let mut env = fast_export(&endpoint);
    // The Prometheus endpoint too, scraped below: the same canaries must not reach it.
    let metrics_addr = format!("127.0.0.1:{}", crate::helpers::free_port());
    env.push(("CAREVAULT_METRICS__LISTEN", metrics_addr.clone()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut server = Server::start(&env, add_user);
    let c = &server.client;

    let canary = format!("cnry{}", uuid::Uuid::new_v4().simple());
    let canary64 = base64::engine::general_purpose::STANDARD.encode(&canary);
    let canary64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&canary);
    let mut bodies = Vec::new();

    // A plain request whose span and metric we look for.
    let live = c.get(server.url("/health/live")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    let live_id = live.headers()["x-request-id"].to_str().unwrap().to_owned();

    // A real sign-in, then authenticated requests carrying canaries.
    let resp = c
        .post(server.url("/auth/login"))
        .json(&serde_json::json!({"username": USER, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let token = resp.json::<serde_json::Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned();

    let mut requests = vec![
        c.get(server.url(&format!("/fhir/Patient/{canary}"))).bearer_auth(&token),
        c.get(server.url(&format!("/fhir/Patient/{canary64url}/_history/{canary}"))).bearer_auth(&token),
        c.get(server.url(&format!("/fhir/Patient?name={canary}&identifier={canary64}&birthdate=1984-07-02")))
            .bearer_auth(&token),
        c.get(server.url(&format!("/fhir/Observation?subject=Patient/{canary}&_count={canary}"))).bearer_auth(&token),
        c.post(server.url("/fhir/Patient"))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json")
            .body(format!(r#"{{"resourceType":"Patient","name":[{{"family":"{canary}"}}],"birthDate":"{canary}"}}"#)),
        c.post(server.url("/fhir/Patient"))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json")
            .body(format!(r#"{{"resourceType":"{canary}","id":"{canary64}"}}"#)),
        c.put(server.url(&format!("/fhir/Patient/{canary}")))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json")
            .body(format!(r#"{{"resourceType":"Patient","id":"{canary}"}}"#)),
        c.get(server.url(&format!("/fhir/Patient/{canary}"))).bearer_auth(&canary),
        c.get(server.url("/fhir/metadata")).header("authorization", format!("Basic {canary64}")),
        c.get(server.url(&format!("/health/live?{canary}={canary64}")))
            .header("x-request-id", &canary)
            .header("cookie", format!("session={canary}"))
            .header("user-agent", &canary)
            .header("x-forwarded-for", &canary)
            .header("traceparent", &canary),
        c.post(server.url("/auth/login")).json(&serde_json::json!({"username": canary, "password": canary64})),
        c.post(server.url("/auth/login")).json(&serde_json::json!({"username": USER, "password": canary})),
        c.post(server.url("/auth/login"))
            .json(&serde_json::json!({"username": canary, "password": canary, "extra": canary})),
        c.post(server.url("/auth/login")).body(format!("{{not json {canary}")),
        c.post(server.url("/auth/token")).form(&[("grant_type", "refresh_token"), ("refresh_token", canary.as_str())]),
        c.post(server.url("/auth/token")).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", canary.as_str()),
            ("client_secret", canary64.as_str()),
        ]),
        c.post(server.url("/auth/token"))
            .basic_auth(&canary, Some(&canary64))
            .form(&[("grant_type", "client_credentials")]),
        c.post(server.url("/auth/token")).form(&[("grant_type", canary.as_str())]),
        c.post(server.url("/auth/revoke")).form(&[("token", canary.as_str())]),
        c.post(server.url("/auth/logout")).bearer_auth(&canary64),
        c.post(server.url(&format!("/auth/login/{canary}"))).body(canary.clone()),
        c.request(reqwest::Method::from_bytes(canary.to_uppercase().as_bytes()).unwrap(), server.url("/health/live")),
    ];
    requests.push(c.get(server.url(&format!("/{canary}/{canary64}?q={canary}"))));
    for r in requests {
        let resp = r.send().await.unwrap();
        let status = resp.status();
        assert!(status.is_client_error() || status.is_success(), "{status}");
        for (name, value) in resp.headers() {
            bodies.push(format!("{name}: {}", value.to_str().unwrap_or("")));
        }
        // Every body, success or error, must be free of the canary: search Bundles' self/next links carry a sealed
        // cursor, not the searched values.
        bodies.push(resp.text().await.unwrap());
    }

    // `/metrics` (Prometheus text on `metrics.listen`): the instruments by route template, no client values.
    let scrape = reqwest::get(format!("http://{metrics_addr}/metrics")).await.unwrap();
    assert_eq!(scrape.status(), 200);
    assert!(scrape.headers()["content-type"].to_str().unwrap().starts_with("text/plain"), "{:?}", scrape.headers());
    let prom = scrape.text().await.unwrap();
    for needle in [canary.as_str(), canary64.as_str(), canary64url.as_str(), canary.to_uppercase().as_str()] {
        assert!(!prom.contains(needle), "canary in /metrics");
    }
    for family in [
        "http_server_request_duration_seconds_bucket",
        "carevault_audit_append_duration_seconds_bucket",
        "carevault_audit_append_batch_size_bucket",
        "carevault_crypto_decryptions_total",
        "carevault_crypto_decrypt_failures_total",
        "carevault_auth_failures_total",
        "db_client_connection_count",
        "db_client_connection_max",
    ] {
        assert!(prom.lines().any(|l| l.starts_with(family)), "{family} missing from /metrics:\n{prom}");
    }
    assert!(
        prom.lines().any(|l| l.starts_with("http_server_request_duration_seconds_count")
            && l.contains(r#"http_route="/health/live""#)
            && l.contains(r#"http_response_status_code="200""#)),
        "the /health/live requests by route template:\n{prom}"
    );
    // Every label value is a route template, a fixed code or a number: no path segment from a request.
    for line in prom.lines().filter(|l| l.contains("http_route=")) {
        let route = line.split("http_route=\"").nth(1).and_then(|r| r.split('"').next()).unwrap();
        assert!(route.starts_with('/') && !route.contains("cnry"), "{line}");
    }

    // Give the exporters a few intervals, then stop gracefully (which flushes).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    server.stop();
    collector.stop(true).await;

    // No canary anywhere: logs, exports (raw protobuf bytes), response headers and bodies.
    let lines = server.log_lines();
    for needle in [canary.as_str(), canary64.as_str(), canary64url.as_str(), canary.to_uppercase().as_str()] {
        for line in &lines {
            assert!(!line.contains(needle), "canary in the log: {line}");
        }
        for body in receiver.all_bytes() {
            assert!(!contains(&body, needle.as_bytes()), "canary in an OTLP export");
        }
        for body in &bodies {
            assert!(!body.contains(needle), "canary in a response: {body}");
        }
    }

    // Traces.
    let spans = receiver.spans();
    assert!(!spans.is_empty(), "no spans exported");
    let (resource, live_span) = spans
        .iter()
        .find(|(_, s)| attr_str(&s.attributes, "carevault.request_id") == Some(live_id.as_str()))
        .expect("the /health/live span");
    assert_eq!(attr_str(resource, "service.name"), Some("carevault"));
    assert_eq!(attr_str(resource, "service.version"), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(attr_str(resource, "deployment.environment.name"), Some("development"));
    assert_eq!(live_span.name, "GET /health/live");
    assert_eq!(live_span.kind, SpanKind::Server as i32);
    assert_eq!(attr_str(&live_span.attributes, "http.route"), Some("/health/live"));
    assert_eq!(attr_str(&live_span.attributes, "http.request.method"), Some("GET"));
    assert_eq!(attr_int(&live_span.attributes, "http.response.status_code"), Some(200), "{:?}", live_span.attributes);
    assert!(live_span.end_time_unix_nano > live_span.start_time_unix_nano);
    let server_spans: Vec<&Span> = spans.iter().map(|(_, s)| s).filter(|s| s.kind == SpanKind::Server as i32).collect();
    assert!(server_spans.len() >= 20, "one server span per request, got {}", server_spans.len());
    assert!(
        server_spans.iter().any(|s| attr_str(&s.attributes, "http.request.method") == Some("_OTHER")),
        "an extension method is recorded as _OTHER"
    );
    for s in &server_spans {
        for kv in &s.attributes {
            assert!(
                [
                    "http.request.method",
                    "http.route",
                    "http.response.status_code",
                    "carevault.request_id",
                    "error.type",
                    "busy_ns",
                    "idle_ns",
                    "code.file.path",
                    "code.module.name",
                    "code.line.number",
                    "level",
                    "target"
                ]
                .contains(&kv.key.as_str()),
                "unexpected attribute {}",
                kv.key
            );
        }
    }
    let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    for pipeline in ["authenticate", "store", "audit"] {
        assert!(names.contains(&pipeline), "pipeline span {pipeline} missing from {names:?}");
    }
    let authenticate = spans.iter().map(|(_, s)| s).find(|s| s.name == "authenticate").unwrap();
    assert!(
        server_spans.iter().any(|s| s.span_id == authenticate.parent_span_id),
        "authenticate is a child of a server span"
    );

    // Metrics.
    let exports = receiver.metrics();
    assert!(!exports.is_empty(), "no metrics exported");
    let mut seen = std::collections::HashMap::<String, u64>::new();
    let mut live_count = 0u64;
    for req in &exports {
        for rm in &req.resource_metrics {
            for sm in &rm.scope_metrics {
                for m in &sm.metrics {
                    *seen.entry(m.name.clone()).or_default() += 1;
                    if m.name == "http.server.request.duration"
                        && let Some(Data::Histogram(h)) = &m.data
                    {
                        for p in &h.data_points {
                            if attr_str(&p.attributes, "http.route") == Some("/health/live")
                                && attr_int(&p.attributes, "http.response.status_code") == Some(200)
                            {
                                live_count = live_count.max(p.count);
                            }
                        }
                    }
                    if m.name == "carevault.auth.failures"
                        && let Some(Data::Sum(s)) = &m.data
                    {
                        let reasons: Vec<&str> =
                            s.data_points.iter().filter_map(|p| attr_str(&p.attributes, "reason")).collect();
                        assert!(
                            reasons.iter().all(|r| [
                                "invalid-credentials",
                                "invalid-client",
                                "invalid-grant",
                                "invalid-token",
                                "missing-token",
                                "account-disabled",
                                "refresh-token-reuse"
                            ]
                            .contains(r)),
                            "{reasons:?}"
                        );
                    }
                }
            }
        }
    }
    assert!(live_count >= 2, "request count for /health/live 200: {live_count}");
    for name in [
        "http.server.request.duration",
        "carevault.auth.failures",
        "carevault.audit.append.duration",
        "carevault.audit.append.batch_size",
        "carevault.crypto.decryptions",
        "db.client.connection.count",
        "db.client.connection.max",
    ] {
        assert!(seen.contains_key(name), "metric {name} missing from {:?}", seen.keys());
    }

    // Logs: JSON, with the request line by template.
    let json_lines: Vec<serde_json::Value> = lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        json_lines
            .iter()
            .any(|l| l["message"] == "request" && l["http.route"] == "/health/live" && l["request_id"] == live_id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_exported_when_the_exporters_are_off() {
    let (receiver, endpoint, collector) = Receiver::start();
    let mut env = fast_export(&endpoint);
    env.push(("OTEL_SDK_DISABLED", "true".to_owned()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut server = Server::start(&env, |_| {});
    for _ in 0..5 {
        assert_eq!(server.client.get(server.url("/health/live")).send().await.unwrap().status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    server.stop();
    collector.stop(true).await;
    assert!(receiver.all_bytes().is_empty(), "exported although OTEL_SDK_DISABLED=true");
    assert!(server.log_lines().iter().any(|l| l.contains("\"http.route\":\"/health/live\"")), "logs still written");
}

/// Throughput of `GET /health/ready` (one pooled database round trip, a `store` span) with export off and on.
/// Prints requests per second; run with `cargo test --release --test api throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn throughput_with_export_on_and_off() {
    let (_receiver, endpoint, collector) = Receiver::start();
    let on = fast_export(&endpoint);
    for (label, env) in [("off", Vec::new()), ("on", on.iter().map(|(k, v)| (*k, v.as_str())).collect())] {
        let mut server = Server::start(&env, |_| {});
        let url = server.url("/health/ready");
        let run = |n: usize| {
            let tasks: Vec<_> = (0..16)
                .map(|_| {
                    let (c, url) = (server.client.clone(), url.clone());
                    tokio::spawn(async move {
                        for _ in 0..n {
                            assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
                        }
                    })
                })
                .collect();
            futures_util::future::join_all(tasks)
        };
        run(50).await;
        let started = Instant::now();
        run(500).await;
        let rate = 16.0 * 500.0 / started.elapsed().as_secs_f64();
        println!("export {label}: {rate:.0} requests/s");
        server.stop();
    }
    collector.stop(true).await;
}
