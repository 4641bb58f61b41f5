//! The foundation: HTTPS, security headers, health, errors as OperationOutcome, body limit, migrations.

use crate::both_backends;
use crate::helpers::{Backend, PgDatabase, TestApp};
use carevault::config::{DatabaseTarget, parse_database_url};
use carevault::store::{Db, revert_all, run_migrations};
use std::process::Command;

fn assert_security_headers(resp: &reqwest::Response) {
    let h = resp.headers();
    assert_eq!(h["strict-transport-security"], "max-age=63072000");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["cache-control"], "no-store");
    assert!(h.get("server").is_none(), "no server banner");
}

both_backends!(health_over_https, |app: TestApp| async move {
    let live = app.client.get(app.url("/health/live")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    assert_security_headers(&live);
    let ready = app.client.get(app.url("/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<serde_json::Value>().await.unwrap()["status"], "ready");
});

both_backends!(unknown_route_is_an_operation_outcome_without_echo, |app: TestApp| async move {
    let resp = app.client.get(app.url("/no/such/route-CANARY7731?ssn=123-45-6789")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_security_headers(&resp);
    assert_eq!(resp.headers()["content-type"], "application/fhir+json");
    let body = resp.text().await.unwrap();
    assert!(body.contains("OperationOutcome"));
    assert!(!body.contains("CANARY7731") && !body.contains("123-45-6789"), "{body}");
});

both_backends!(oversized_body_is_413, |app: TestApp| async move {
    let big = vec![b'a'; 1_048_577];
    let resp = app.client.post(app.url("/health/live")).body(big).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    assert!(resp.text().await.unwrap().contains("OperationOutcome"));
});

// `limits.max_body_bytes` (1 MiB by default) is the limit on every route, not actix's own 256 KiB: a 300 KiB
// login body reaches the handler (401 for a wrong password), a 300 KiB FHIR body reaches the validator (400).
both_backends!(bodies_up_to_max_body_bytes_reach_the_handlers, |app: TestApp| async move {
    let pad = "x".repeat(300 * 1024);
    let login = serde_json::json!({"username": "nobody", "password": pad});
    let r = app.client.post(app.url("/auth/login")).json(&login).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let w = app.world().await;
    let patient = serde_json::json!({"resourceType": "Patient", "padding": pad});
    assert_eq!(app.post(&w.front, "/fhir/Patient", &patient).await.status(), 400);
});

/// The SQLite database and its WAL are the owner's alone (0600), like the keys beside them.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let app = TestApp::spawn(Backend::Sqlite).await.unwrap();
    let w = app.world().await;
    assert_eq!(app.get(&w.front, &format!("/fhir/Patient/{}", w.alice)).await.status(), 200);
    for name in ["carevault.db", "carevault.db-wal"] {
        let path = app.dir.path().join(name);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_and_old_tls_fail_and_the_server_stays_up() {
    let app = TestApp::spawn(Backend::Sqlite).await.unwrap();
    // Plain HTTP to the TLS port: no HTTP answer.
    let plain = reqwest::Client::new().get(format!("http://127.0.0.1:{}/health/live", app.port)).send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    let port = app.port.to_string();
    let cert = app.cert_path();
    let s_client = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-CAfile"])
            .arg(&cert)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is installed");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        out.status.success() && text.contains("Verify return code: 0 (ok)")
    };
    for bad in [
        &["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"][..],
        &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"][..],
        &["-tls1_2", "-cipher", "AES128-SHA"][..], // RSA key exchange, CBC
        &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"][..], // CBC
        &["-tls1_2", "-cipher", "AES128-GCM-SHA256"][..], // RSA key exchange
    ] {
        assert!(!s_client(bad), "handshake must fail: {bad:?}");
    }
    assert!(s_client(&["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"]), "TLS 1.2 ECDHE+AEAD works");
    assert!(s_client(&["-tls1_3"]), "TLS 1.3 works");
    let live = app.client.get(app.url("/health/live")).send().await.unwrap();
    assert_eq!(live.status(), 200, "the server is still up");
}

#[test]
fn database_urls_of_other_schemes_are_refused() {
    assert!(parse_database_url("mysql://x").is_err());
    assert!(parse_database_url("carevault.db").is_err());
    assert!(matches!(parse_database_url("sqlite:///tmp/x.db").unwrap(), DatabaseTarget::Sqlite(_)));
}

fn migrations_up_down_up(target: DatabaseTarget) {
    let db = Db::connect(&target, 1).unwrap();
    let mut conn = db.conn().unwrap();
    let up = run_migrations(&mut conn).unwrap();
    assert!(up > 0);
    assert_eq!(revert_all(&mut conn).unwrap(), up, "every migration goes down");
    assert_eq!(run_migrations(&mut conn).unwrap(), up, "and up again");
    drop(conn);
    assert!(db.ready());
}

#[test]
fn every_migration_goes_up_down_and_up_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    migrations_up_down_up(DatabaseTarget::Sqlite(dir.path().join("m.db")));
}

#[test]
fn every_migration_goes_up_down_and_up_on_postgres() {
    let Some(pg) = PgDatabase::create() else { return };
    migrations_up_down_up(parse_database_url(&pg.url).unwrap());
}

#[test]
fn production_without_certificate_refuses_to_start_and_names_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_carevault"))
        .args(["--data-dir"])
        .arg(dir.path())
        .arg("serve")
        .env("CAREVAULT_PROFILE", "production")
        .env("CAREVAULT_DATABASE_URL", "postgres://127.0.0.1:1/none")
        .env_remove("CAREVAULT_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls.cert_file"), "{err}");
    assert!(!dir.path().join("tls").exists(), "nothing half-started");
}

#[test]
fn unknown_configuration_key_is_refused_by_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_carevault"))
        .args(["migrate", "--data-dir"])
        .arg(dir.path())
        .env("CAREVAULT_LISTEN_ADDRESS", "x")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key `listen_address`"));
}

#[test]
fn port_in_use_is_one_clear_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_carevault"))
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen") && err.contains("`listen`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_rate_limited_per_address() {
    let app = TestApp::spawn_with(Backend::Sqlite, "[limits]\nrequests_per_second = 1\nburst = 3\n").await.unwrap();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = app.client.get(app.url("/health/live")).send().await.unwrap();
        statuses.push((r.status().as_u16(), r.headers().get("retry-after").is_some()));
    }
    assert_eq!(&statuses[..3], &[(200, false); 3]);
    assert_eq!(statuses[4], (429, true));
}
