//! The operator's kit, on the real binary (issue 17): graceful stop on SIGTERM, the data-dir refusal of
//! maintenance commands, the built-in policy from any working directory, config error positions, the
//! healthcheck command and `deploy init`.

use crate::helpers::{PASSWORD, PgDatabase, client_trusting};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn bin() -> String {
    std::env::var("CAREVAULT_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_carevault").to_owned())
}

/// `carevault --data-dir DATA …` run from `cwd`, with no `CAREVAULT_*` or `OTEL_*` variable of the test's own
/// environment (so no policy directory either: the built-in policy).
fn carevault(cwd: &Path, data: &Path) -> Command {
    let mut c = Command::new(bin());
    c.current_dir(cwd).arg("--data-dir").arg(data).env("USER", "tester");
    for (k, _) in std::env::vars() {
        if k.starts_with("CAREVAULT_") || k.starts_with("OTEL_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(c: &mut Command) -> Output {
    tokio::task::block_in_place(|| c.output().unwrap())
}

/// The server as a child process, its output collected line by line.
struct Served {
    child: Child,
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Served {
    fn start(mut cmd: Command) -> Served {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let started = Instant::now();
        let port = loop {
            let found = lines.lock().unwrap().iter().find_map(|l| {
                l.strip_prefix("carevault is serving on https://127.0.0.1:").map(|p| p.trim().parse::<u16>().unwrap())
            });
            if let Some(port) = found {
                break port;
            }
            if started.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                panic!("server did not start: {:#?}", lines.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Served { child, port, lines }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
    }

    fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < within, "the server did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn add_user(cwd: &Path, data: &Path, username: &str, role: &str) {
    let mut child = carevault(cwd, data)
        .args(["users", "add", "--username", username, "--role", role, "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(PASSWORD.as_bytes()).unwrap();
    let out = tokio::task::block_in_place(|| child.wait_with_output().unwrap());
    assert!(out.status.success(), "users add: {}", text(&out.stderr));
}

async fn login(client: &reqwest::Client, base: &str, username: &str) -> String {
    let r = client
        .post(format!("{base}/auth/login"))
        .json(&serde_json::json!({"username": username, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned()
}

/// SIGTERM while a request is in flight: the server stops accepting, the request completes (201), its audit
/// event is committed, and the process exits 0. Run from an empty working directory with no policy directory
/// configured: the built-in policy decides. The healthcheck command answers while the server runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_request_in_flight_keeps_its_audit_event_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let (cwd, data) = (tmp.path().join("elsewhere"), tmp.path().join("data"));
    std::fs::create_dir_all(&cwd).unwrap();
    let mut cmd = carevault(&cwd, &data);
    cmd.args(["serve", "--listen", "127.0.0.1:0"]);
    let mut server = Served::start(cmd);
    let base = format!("https://localhost:{}", server.port);
    let client = client_trusting(&std::fs::read(data.join("tls/cert.pem")).unwrap());

    // The healthcheck command, from yet another directory, trusting the generated certificate.
    let url = format!("https://127.0.0.1:{}/health/ready", server.port);
    let health = run(carevault(tmp.path(), &data).args(["healthcheck", "--url", &url]));
    assert!(health.status.success(), "healthcheck: {}", text(&health.stderr));
    assert!(text(&health.stdout).starts_with("ok: "), "{}", text(&health.stdout));
    let closed = format!("https://127.0.0.1:{}/health/ready", crate::helpers::free_port());
    let down = run(carevault(tmp.path(), &data).args(["healthcheck", "--url", &closed, "--timeout-secs", "2"]));
    assert_eq!(down.status.code(), Some(1), "a healthcheck on a closed port fails");
    assert!(text(&down.stderr).contains("no answer from"), "{}", text(&down.stderr));

    add_user(&cwd, &data, "drain.front", "front_desk");
    let token = login(&client, &base, "drain.front").await;

    // A create whose body arrives in two parts; SIGTERM comes between them.
    let body = br#"{"resourceType":"Patient","name":[{"family":"Drain","given":["Sig"]}],"gender":"female"}"#;
    let (first, rest) = body.split_at(20);
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let chunks = futures_util::stream::unfold((0u8, Some(released)), move |(step, wait)| async move {
        match step {
            0 => Some((Ok::<_, std::io::Error>(bytes::Bytes::from_static(first)), (1, wait))),
            1 => {
                if let Some(w) = wait {
                    let _ = w.await;
                }
                Some((Ok(bytes::Bytes::from_static(rest)), (2, None)))
            }
            _ => None,
        }
    });
    let in_flight = tokio::spawn(
        client
            .post(format!("{base}/fhir/Patient"))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json")
            .header("content-length", body.len().to_string())
            .body(reqwest::Body::wrap_stream(chunks))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let signalled = Instant::now();
    server.signal("TERM");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(server.child.try_wait().unwrap().is_none(), "the server exited with a request in flight");
    release.send(()).unwrap();
    let created = in_flight.await.unwrap().unwrap();
    assert_eq!(created.status(), 201, "the request in flight completed");
    let id = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let status = server.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status:?}\n{:#?}", server.output());
    assert!(signalled.elapsed() < Duration::from_secs(10), "drain took {:?}", signalled.elapsed());
    let out = server.output();
    assert!(out.iter().any(|l| l.contains("shutdown requested") && l.contains("SIGTERM")), "{out:#?}");
    assert!(out.iter().any(|l| l == "carevault stopped"), "{out:#?}");

    // The create's audit event is durable: in the database after the exit, and the chain verifies.
    let target = carevault::config::DatabaseTarget::Sqlite(data.join("carevault.db"));
    let db = carevault::store::Db::connect(&target, 1).unwrap();
    let bodies: Vec<String> = {
        use carevault::store::schema::audit_events;
        use diesel::prelude::*;
        audit_events::table.select(audit_events::body).load(&mut db.conn().unwrap()).unwrap()
    };
    assert!(bodies.iter().any(|b| b.contains(&id)), "no audit event names the created Patient/{id}");
    drop(db);
    let verify = run(carevault(&cwd, &data).args(["audit", "verify"]));
    assert!(verify.status.success(), "audit verify: {}{}", text(&verify.stdout), text(&verify.stderr));
}

/// SIGINT (Ctrl-C) drains the same way and also exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_gracefully_with_exit_0() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut cmd = carevault(tmp.path(), &data);
    cmd.args(["serve", "--listen", "127.0.0.1:0"]);
    let mut server = Served::start(cmd);
    server.signal("INT");
    let status = server.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{:#?}", server.output());
}

/// `keys`, `audit`, `users` and `incident` on a data directory that holds nothing: refused, naming the path and
/// the `--data-dir` setting, and nothing is created. On PostgreSQL, an empty database is refused and stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_commands_refuse_a_data_dir_without_carevault_data() {
    let tmp = tempfile::tempdir().unwrap();
    let typo = tmp.path().join("dta");
    let commands: [&[&str]; 6] = [
        &["keys", "status"],
        &["keys", "rotate-master", "--new-master-key-file", "/nonexistent/new.key"],
        &["audit", "verify"],
        &["users", "list"],
        &["incident", "report", "--user", "someone", "--since", "2026-01-01"],
        &["incident", "contain", "--user", "someone"],
    ];
    for args in commands {
        let out = run(carevault(tmp.path(), &typo).args(args));
        assert!(!out.status.success(), "{args:?} succeeded on an empty data dir");
        let err = text(&out.stderr);
        assert!(err.contains("no carevault database at") && err.contains("--data-dir"), "{args:?}: {err}");
        assert!(!typo.exists(), "{args:?} created {}", typo.display());
    }
    // A real data directory works (the server made it): the refusal is about the data, not the command.
    let data = tmp.path().join("data");
    let mut cmd = carevault(tmp.path(), &data);
    cmd.args(["serve", "--listen", "127.0.0.1:0"]);
    let mut server = Served::start(cmd);
    let ok = run(carevault(tmp.path(), &data).args(["keys", "status"]));
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    server.signal("TERM");
    assert_eq!(server.wait(Duration::from_secs(10)).code(), Some(0));

    let Some(pg) = PgDatabase::create() else { return };
    let out = run(carevault(tmp.path(), &typo).env("CAREVAULT_DATABASE_URL", &pg.url).args(["users", "list"]));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("the database holds no carevault data"), "{}", text(&out.stderr));
    let target = carevault::config::parse_database_url(&pg.url).unwrap();
    let db = carevault::store::Db::connect(&target, 1).unwrap();
    assert!(!db.holds_carevault_schema().unwrap(), "the refusal migrated the empty database");
}

/// `policy explain` from a directory without `policies/`: the built-in policy answers. In production a policy
/// directory the service user can write is refused, naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builtin_policy_answers_from_any_directory_and_production_refuses_a_writable_policy_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let explain = ["policy", "explain", "--role", "clinician", "--type", "Observation", "--action", "read"];
    let out = run(carevault(tmp.path(), &data).args(explain));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(": ALLOWED"), "{}", text(&out.stdout));
    let denied = ["policy", "explain", "--role", "billing", "--type", "Observation", "--action", "read"];
    let out = run(carevault(tmp.path(), &data).args(denied));
    assert!(text(&out.stdout).contains(": DENIED"), "{}", text(&out.stdout));

    let dir = tmp.path().join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.conf", "policy.csv", "fields.toml"] {
        std::fs::copy(crate::helpers::policy_dir().join(f), dir.join(f)).unwrap();
    }
    let keys = tempfile::tempdir().unwrap();
    let production = |c: &mut Command| {
        c.env("CAREVAULT_PROFILE", "production")
            .env("CAREVAULT_DATABASE_URL", "postgres://db.invalid/carevault")
            .env("CAREVAULT_TLS__CERT_FILE", "/nonexistent/cert.pem")
            .env("CAREVAULT_TLS__KEY_FILE", "/nonexistent/key.pem")
            .env("CAREVAULT_KEYS__MASTER_KEY_FILE", keys.path().join("master.key"))
            .env("CAREVAULT_AUDIT__ANCHOR_DIR", keys.path().join("anchors"))
            .env("CAREVAULT_ACCESS__POLICY_DIR", &dir);
    };
    let mut c = carevault(tmp.path(), &data);
    production(&mut c);
    // The test runs as the files' owner (often root), so the directory is writable by "the service user".
    let out = run(c.args(explain));
    assert!(!out.status.success(), "production accepted a policy directory it can write");
    assert!(text(&out.stderr).contains("production profile refuses `access.policy_dir`"), "{}", text(&out.stderr));
    // The same directory in development is fine.
    let out = run(carevault(tmp.path(), &data).env("CAREVAULT_ACCESS__POLICY_DIR", &dir).args(explain));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A configuration error names the file, the line and the column, and never quotes the text around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_name_file_line_and_column_without_echoing_values() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let file = tmp.path().join("carevault.toml");
    let explain = ["policy", "explain", "--role", "clinician", "--type", "Patient", "--action", "read"];
    let cases: [(&str, &str); 3] = [
        // A syntax error: an unterminated string holding a secret.
        ("listen = \"127.0.0.1:0\"\n\n[keys]\nmaster_key = \"c2VjcmV0LWNhbmFyeQ\n", "line 4, column 33"),
        // An unknown key.
        ("listen = \"127.0.0.1:0\"\n[auth]\naccess_token_ttl_secs = 300\n  refresh_ttl = 5\n", "line 4, column 3"),
        // A value of the wrong type.
        ("[limits]\nmax_body_bytes = \"c2VjcmV0LWNhbmFyeQ\"\n", "line 2, column 1"),
    ];
    for (toml, at) in cases {
        std::fs::write(&file, toml).unwrap();
        let out = run(carevault(tmp.path(), &data).arg("--config").arg(&file).args(explain));
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains(&format!("{} {at}", file.display())), "want {at}: {err}");
        assert!(!err.contains("c2VjcmV0"), "the error quotes the file: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}

/// `deploy init` makes the CA, both certificates, every secret and the realm; a second run keeps all of them;
/// secrets are owner-only; the API certificate verifies against the CA for `localhost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_init_makes_every_secret_once_with_private_modes() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("secrets");
    let realm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/keycloak/carevault-realm.json");
    let init = || {
        run(carevault(tmp.path(), &tmp.path().join("unused"))
            .args(["deploy", "init", "--dir"])
            .arg(&dir)
            .arg("--realm-template")
            .arg(&realm))
    };
    let first = init();
    assert!(first.status.success(), "{}", text(&first.stderr));
    let files = [
        "ca.pem",
        "ca-key.pem",
        "api/tls_cert.pem",
        "api/tls_key.pem",
        "api/master_key",
        "api/database_url",
        "api/oidc_client_secret",
        "api/webhook_secret",
        "keycloak/tls_cert.pem",
        "keycloak/tls_key.pem",
        "keycloak/admin_password",
        "keycloak/oidc_client_secret",
        "keycloak/import/carevault-realm.json",
        "postgres/password",
        "api/demo_passwords",
    ];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect();
    for f in files.iter().filter(|f| !f.ends_with("ca.pem")) {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{f} has mode {mode:o}");
    }
    for d in ["api", "keycloak", "postgres"] {
        assert_eq!(std::fs::metadata(dir.join(d)).unwrap().permissions().mode() & 0o777, 0o700, "{d}/");
    }
    let realm_json: Value = serde_json::from_slice(&before[12]).unwrap();
    let secret = std::fs::read_to_string(dir.join("api/oidc_client_secret")).unwrap();
    assert_eq!(realm_json["clients"][0]["secret"], secret.trim());
    assert!(!text(&before[12]).contains("${CAREVAULT_"), "a placeholder is left in the realm");
    let users = realm_json["users"].as_array().unwrap();
    assert_eq!(users.len(), 7, "one Keycloak user per role");
    let stdout = text(&first.stdout);
    for u in users {
        let name = u["username"].as_str().unwrap();
        let password = u["credentials"][0]["value"].as_str().unwrap();
        assert!(stdout.contains(name) && stdout.contains(password), "init prints the demo login of {name}");
    }
    // carevault's own demo accounts too: every one, with the password the demo seeding will give it.
    let passwords = carevault::demo::read_passwords(&dir.join("api/demo_passwords")).expect("a valid passwords file");
    for ((name, _), password) in carevault::demo::ACCOUNTS.iter().zip(&passwords) {
        use secrecy::ExposeSecret;
        let line = format!("{name:<18} {}", password.expose_secret());
        assert!(stdout.contains(&line), "init prints the carevault login of {name}: {stdout}");
    }

    let second = init();
    assert!(second.status.success());
    assert!(text(&second.stdout).starts_with("deploy init: 0 file(s) made"), "{}", text(&second.stdout));
    let after: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect();
    assert_eq!(before, after, "a second run changed a file");

    // The certificate chain verifies against the CA: serve a TLS listener with it and connect trusting ca.pem.
    let key = dir.join("api/tls_key.pem");
    let cfg =
        carevault::tls::server_config(&dir.join("api/tls_cert.pem"), &key, carevault::config::Profile::Production)
            .expect("the generated certificate and key load in the production profile");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server =
        actix_web::HttpServer::new(|| actix_web::App::new().route("/", actix_web::web::get().to(|| async { "ok" })))
            .workers(1)
            .listen_rustls_0_23(listener, cfg)
            .unwrap()
            .run();
    let handle = server.handle();
    tokio::spawn(server);
    let client = client_trusting(&std::fs::read(dir.join("ca.pem")).unwrap());
    let r = client.get(format!("https://localhost:{port}/")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    handle.stop(false).await;
}
