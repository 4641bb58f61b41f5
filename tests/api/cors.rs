//! CORS (CONTRACT §5b) over HTTP, and in a real browser: a SMART app on another origin (npm `fhirclient` in
//! headless Chromium, driven by `tests/smart/launch.mjs`) completes a standalone launch with PKCE, consent and a
//! patient pick, then reads the patient; a page on an origin not allowed cannot read a response.

use crate::helpers::{PASSWORD, TestApp, free_port};
use crate::world::{World, observation};
use crate::{both_backends, both_backends_with};
use carevault::auth::service::{AppKind, NewApp, register_app};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

const ORIGIN: &str = "https://app.example";

async fn preflight(app: &TestApp, origin: &str) -> reqwest::Response {
    app.client
        .request(reqwest::Method::OPTIONS, app.url("/fhir/Patient"))
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization, if-none-match")
        .send()
        .await
        .unwrap()
}

both_backends_with!(
    allowed_origins_get_cors_headers_others_none,
    "[cors]\nallowed_origins = [\"https://app.example\"]\n",
    |app: TestApp| async move {
        let r = preflight(&app, ORIGIN).await;
        assert!(r.status().is_success(), "{}", r.status());
        let h = r.headers();
        assert_eq!(h["access-control-allow-origin"], ORIGIN);
        let allowed = h["access-control-allow-headers"].to_str().unwrap().to_lowercase();
        assert!(allowed.contains("authorization") && allowed.contains("if-none-match"), "{allowed}");
        assert!(h.get("access-control-allow-credentials").is_none(), "credentials stay off");
        assert!(h["access-control-max-age"].to_str().unwrap().parse::<u32>().unwrap() > 0);
        // An actual request: allowed origin, headers the client may read exposed, errors too.
        let r = app.client.get(app.url("/fhir/Patient")).header("origin", ORIGIN).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["access-control-allow-origin"], ORIGIN);
        let exposed = r.headers()["access-control-expose-headers"].to_str().unwrap().to_lowercase();
        for name in ["etag", "location", "retry-after", "www-authenticate"] {
            assert!(exposed.contains(name), "{name} in {exposed}");
        }
        // Another origin, a look-alike, and a scheme change: no CORS headers at all.
        for other in ["https://evil.example", "https://app.example.evil.example", "http://app.example"] {
            let r = preflight(&app, other).await;
            assert!(r.headers().get("access-control-allow-origin").is_none(), "{other}");
            let r = app.client.get(app.url("/fhir/metadata")).header("origin", other).send().await.unwrap();
            assert_eq!(r.status(), 200, "a non-browser client is unaffected");
            assert!(r.headers().get("access-control-allow-origin").is_none(), "{other}");
        }
    }
);

both_backends!(no_origins_by_default, |app: TestApp| async move {
    let r = preflight(&app, ORIGIN).await;
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = app.client.get(app.url("/fhir/metadata")).header("origin", ORIGIN).send().await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
});

#[test]
fn origins_are_checked_when_the_configuration_loads() {
    use carevault::config::{Config, Overrides};
    let dir = tempfile::tempdir().unwrap();
    let over = Overrides { data_dir: dir.path().to_path_buf(), ..Default::default() };
    for bad in ["*", "https://app.example/", "https://app.example/path", "ftp://x.example", "app.example"] {
        let toml = format!("[cors]\nallowed_origins = [\"{bad}\"]\n");
        let e = Config::from_toml(&toml, &over).expect_err(bad).to_string();
        assert!(e.contains("cors.allowed_origins") && !e.contains(bad.trim_start_matches("https://")), "{e}");
    }
    assert!(Config::from_toml("[cors]\nallowed_origins = [\"http://127.0.0.1:8123\"]\n", &over).is_ok());
}

/// `tests/smart`, with node, its npm packages and Chromium; `None` (skip) when missing outside CI.
fn browser_kit() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/smart");
    let missing = if !dir.join("node_modules/playwright-core").is_dir() || !dir.join("node_modules/fhirclient").is_dir()
    {
        Some("tests/smart/node_modules is missing (cd tests/smart && npm ci)")
    } else if !std::path::Path::new(&std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())).exists()
    {
        Some("chromium is not installed (apt-get install chromium)")
    } else if Command::new("node").arg("--version").output().is_err() {
        Some("node is not installed")
    } else {
        None
    };
    match missing {
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => panic!("browser test cannot run: {why}"),
        Some(why) => {
            eprintln!("skipping a browser test: {why}");
            None
        }
        None => Some(dir),
    }
}

fn node(dir: &PathBuf, script: &str, args: &[String]) -> (bool, Value) {
    let out = tokio::task::block_in_place(|| Command::new("node").current_dir(dir).arg(script).args(args).output())
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or("null");
    let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
    if !out.status.success() {
        eprintln!("{script} stderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), v)
}

/// One test per backend, each with its own app origin (the port must be known before the server starts).
macro_rules! browser_test {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            async fn run(backend: crate::helpers::Backend) {
                let Some(kit) = browser_kit() else { return };
                let port = free_port();
                let toml = format!("[cors]\nallowed_origins = [\"http://127.0.0.1:{port}\"]\n");
                let Some(app) = TestApp::spawn_with(backend, &toml).await else { return };
                ($body)(app, kit, port).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                run(crate::helpers::Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                run(crate::helpers::Backend::Postgres).await;
            }
        }
    };
}

browser_test!(
    fhirclient_completes_a_standalone_launch_in_chromium,
    |app: TestApp, kit: PathBuf, port: u16| async move {
        let w: World = app.world().await;
        app.create(&w.doc, observation(&w.alice, "8480-6", 120.0, "2026-02-01")).await;
        let client = {
            let mut conn = app.state.db.conn().unwrap();
            let new = NewApp {
                name: "Growth chart".into(),
                kind: AppKind::Public,
                redirect_uris: vec![format!("http://127.0.0.1:{port}/index.html")],
                scopes: "launch/patient openid fhirUser offline_access patient/*.rs".into(),
                jwks: None,
                jwks_url: None,
                role: None,
            };
            register_app(&mut conn, new, crate::helpers::start_time()).unwrap().0.client_id
        };
        let shots = std::env::var("CAREVAULT_SCREENSHOTS")
            .unwrap_or_else(|_| app.dir.path().join("shots").display().to_string());
        let args: Vec<String> = [
            "--fhir",
            app.state.records.base(),
            "--app-port",
            &port.to_string(),
            "--client-id",
            &client,
            "--scope",
            "launch/patient openid fhirUser offline_access patient/Patient.rs patient/Observation.rs",
            "--username",
            "doc",
            "--password",
            PASSWORD,
            "--patient",
            &w.alice,
            "--refresh",
            "--screenshots",
            &shots,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (ok, out) = node(&kit, "launch.mjs", &args);
        assert!(ok && out["ok"] == true, "{out:#}");
        assert_eq!(out["patientId"], Value::String(w.alice.clone()));
        assert_eq!(out["patient"]["resourceType"], "Patient");
        assert_eq!(out["patient"]["name"][0]["family"], "Zoë-Lindqvist");
        assert!(out["observations"].as_u64().unwrap() >= 1, "{out}");
        assert!(out["scope"].as_str().unwrap().contains("patient/Observation.rs"));
        assert_eq!(
            out["idTokenClaims"]["fhirUser"],
            Value::String(format!("{}/Practitioner/{}", app.state.records.base(), w.doc_practitioner))
        );
        let consent = out["consentScopes"].as_array().unwrap();
        assert!(consent.iter().any(|s| s.as_str().unwrap().contains("Observation records of the selected patient")));
        let options: Vec<String> =
            out["patientOptions"].as_array().map(|a| a.iter().map(|o| o.to_string()).collect()).unwrap_or_default();
        assert!(options.iter().all(|o| !o.contains(&w.bob)), "the picker never offers bob: {options:?}");
        // Every response the app read from the API carried the app's origin.
        let reqs = out["requests"].as_array().unwrap();
        assert!(reqs.len() >= 3, "{reqs:?}");
        // (Page navigations to the authorize pages are not CORS requests.)
        for r in reqs.iter().filter(|r| r["status"].as_u64().is_some_and(|s| s > 0) && r["resourceType"] != "document")
        {
            assert_eq!(r["acao"], Value::String(format!("http://127.0.0.1:{port}")), "{r}");
        }
        // The app refreshed once (offline_access) and read again.
        assert_eq!(out["refresh"]["newAccessToken"], true, "{}", out["refresh"]);
        assert_eq!(out["refresh"]["patientReadAfterRefresh"], Value::String(w.alice.clone()), "{}", out["refresh"]);
    }
);

browser_test!(a_page_on_another_origin_cannot_read_the_api, |app: TestApp, kit: PathBuf, port: u16| async move {
    let args: Vec<String> =
        ["--fhir", app.state.records.base(), "--app-port", &port.to_string()].iter().map(|s| s.to_string()).collect();
    let (ok, out) = node(&kit, "cors.mjs", &args);
    assert!(ok, "{out:#}");
    assert_eq!(out["allowed"]["ok"], true, "{out}");
    assert_eq!(out["allowed"]["status"], 200);
    assert_eq!(out["forbidden"]["ok"], false, "{out}");
    assert!(out["forbidden"]["error"].as_str().unwrap().contains("Failed to fetch"), "{out}");
});
