//! The development demo and synthetic data: seeding in-process on both backends, and the real binary
//! (`serve --demo` twice, `seed --patients 5`, production refusing `--demo`).

use crate::both_backends;
use crate::helpers::{Session, TestApp, client_trusting};
use carevault::demo::{self, ACCOUNTS, CREDENTIALS_FILE, DemoOutcome};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// One line of the credentials file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cred {
    role: String,
    password: String,
    link: String,
}

fn read_credentials(path: &Path) -> BTreeMap<String, Cred> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(path).unwrap().permissions().mode() & 0o777, 0o600, "credentials file mode");
    }
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "username role password link");
            (f[0].to_owned(), Cred { role: f[1].to_owned(), password: f[2].to_owned(), link: f[3].to_owned() })
        })
        .collect()
}

async fn login(client: &reqwest::Client, base: &str, username: &str, password: &str) -> Session {
    let r = client
        .post(format!("{base}/auth/login"))
        .json(&json!({ "username": username, "password": password }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "login of {username}");
    let body: Value = r.json().await.unwrap();
    Session {
        access: body["access_token"].as_str().unwrap().to_owned(),
        refresh: body["refresh_token"].as_str().unwrap().to_owned(),
    }
}

fn ids(bundle: &Value) -> BTreeSet<String> {
    bundle["entry"].as_array().unwrap().iter().map(|e| e["resource"]["id"].as_str().unwrap().to_owned()).collect()
}

both_backends!(demo_seeds_once_through_the_records_service, |app: TestApp| async move {
    let before = app.audit_count().await;
    let outcome = demo::seed_demo(&app.state, 8).await.unwrap();
    let path = app.dir.path().join(CREDENTIALS_FILE);
    assert_eq!(outcome, DemoOutcome::Seeded { credentials: path.clone(), patients: 8 });
    let creds = read_credentials(&path);
    assert_eq!(creds.len(), ACCOUNTS.len());
    let mut s = BTreeMap::new();
    for (username, role) in ACCOUNTS {
        let c = &creds[username];
        assert_eq!(c.role, role.as_str());
        s.insert(username, login(&app.client, &app.base, username, &c.password).await);
    }
    // Every create was audited (8 patients × at least patient, care team, encounter, 3 vitals).
    assert!(app.audit_count().await >= before + 8 * 6 + 8);

    // Care-team isolation: the two clinicians see disjoint halves; the nurse sees the first clinician's half.
    let (_, all) = app.get_json(&s["demo-front-desk"], "/fhir/Patient?_count=100").await;
    let (_, mine) = app.get_json(&s["demo-clinician"], "/fhir/Patient?_count=100").await;
    let (_, theirs) = app.get_json(&s["demo-clinician-2"], "/fhir/Patient?_count=100").await;
    let (_, nurse) = app.get_json(&s["demo-nurse"], "/fhir/Patient?_count=100").await;
    let (all, mine, theirs) = (ids(&all), ids(&mine), ids(&theirs));
    assert_eq!((all.len(), mine.len(), theirs.len()), (8, 4, 4));
    assert!(mine.is_disjoint(&theirs));
    assert_eq!(ids(&nurse), mine);
    let practitioner = creds["demo-clinician"].link.clone();
    assert!(practitioner.starts_with("Practitioner/"));
    let (_, teams) = app.get_json(&s["demo-clinician"], "/fhir/CareTeam?_count=100").await;
    for t in teams["entry"].as_array().unwrap() {
        let members: Vec<&str> = t["resource"]["participant"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["member"]["reference"].as_str().unwrap())
            .collect();
        assert!(members.contains(&practitioner.as_str()));
    }
    // The patient account is one of the first clinician's patients.
    let patient = creds["demo-patient"].link.strip_prefix("Patient/").unwrap().to_owned();
    assert!(mine.contains(&patient));

    // Data round-trips and validates, for the clinician and the patient themself.
    for id in &mine {
        let (status, everything) = app.get_json(&s["demo-clinician"], &format!("/fhir/Patient/{id}/$everything")).await;
        assert_eq!(status, 200);
        app.assert_valid(&everything);
        let types: BTreeSet<&str> = everything["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["resourceType"].as_str().unwrap())
            .collect();
        for t in ["Patient", "CareTeam", "Encounter", "Observation"] {
            assert!(types.contains(t), "{t} missing for a demo patient");
        }
    }
    let (status, own) = app.get_json(&s["demo-patient"], &format!("/fhir/Patient/{patient}")).await;
    assert_eq!(status, 200);
    app.assert_valid(&own);
    assert!(own["name"][0]["family"].as_str().unwrap().starts_with("Demo-"));
    let (status, _) = app.get_json(&s["demo-clinician-2"], &format!("/fhir/Patient/{patient}")).await;
    assert_eq!(status, 404);
    let (_, conditions) = app.get_json(&s["demo-billing"], "/fhir/Condition?_count=100").await;
    app.assert_valid(&conditions);

    // Stored encrypted: no synthetic name in plaintext anywhere in the resource tables.
    {
        use carevault::store::schema::resources;
        use diesel::prelude::*;
        let mut conn = app.state.db.conn().unwrap();
        let contents: Vec<String> = resources::table.select(resources::content).load(&mut conn).unwrap();
        assert!(contents.len() > 8 * 6);
        assert!(contents.iter().all(|c| !c.contains("Demo-") && !c.contains("Example Street")));
    }

    // A second start changes nothing.
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(demo::seed_demo(&app.state, 8).await.unwrap(), DemoOutcome::AlreadySeeded { credentials: path.clone() });
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    login(&app.client, &app.base, "demo-admin", &creds["demo-admin"].password).await;

    // `seed` adds patients on the same database, on a care team of their own.
    let report = demo::seed_synthetic(&app.state, 5, || {}).await.unwrap();
    assert_eq!(report.patients.len(), 5);
    let (_, count) = app.get_json(&s["demo-front-desk"], "/fhir/Patient?_summary=count").await;
    assert_eq!(count["total"], 13);
    let (_, count) = app.get_json(&s["demo-clinician"], "/fhir/Patient?_summary=count").await;
    assert_eq!(count["total"], 4);
});

both_backends!(interrupted_demo_seed_is_refused, |app: TestApp| async move {
    app.add_user("demo-billing", carevault::role::Role::Billing, None, None);
    let err = demo::seed_demo(&app.state, 2).await.unwrap_err();
    assert!(matches!(err, demo::SeedError::Interrupted), "{err}");
    assert!(!app.dir.path().join(CREDENTIALS_FILE).exists());
});

// ---- the real binary -------------------------------------------------------------------------------------

/// A private copy of this worktree's binary: the shared target directory's copy may be replaced by another
/// build at any time, so wait until it is ours (it knows `seed`), then copy it.
fn binary(dir: &Path) -> PathBuf {
    let copy = dir.join("carevault-under-test");
    for _ in 0..60 {
        if std::fs::copy(env!("CARGO_BIN_EXE_carevault"), &copy).is_ok() {
            let ours = Command::new(&copy).args(["seed", "--help"]).output().is_ok_and(|o| o.status.success());
            if ours {
                return copy;
            }
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    panic!("the carevault binary in the target directory is not this worktree's build (no `seed` subcommand)");
}

fn command(bin: &Path, data: &Path) -> Command {
    let mut c = Command::new(bin);
    c.current_dir(env!("CARGO_MANIFEST_DIR")).arg("--data-dir").arg(data);
    for (k, _) in std::env::vars() {
        if k.starts_with("CAREVAULT_") || k.starts_with("OTEL_") {
            c.env_remove(k);
        }
    }
    c
}

/// Starts `serve --demo` on a free port; returns the child, its standard output up to "serving", and the port.
fn serve_demo(bin: &Path, data: &Path) -> (Child, String, u16) {
    serve_demo_with(bin, data, &[])
}

fn serve_demo_with(bin: &Path, data: &Path, env: &[(&str, &Path)]) -> (Child, String, u16) {
    let mut cmd = command(bin, data);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .args(["serve", "--demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("server exited before serving; output:\n{out}");
        };
        out.push_str(&line);
        out.push('\n');
        if let Some(addr) = line.strip_prefix("carevault is serving on https://127.0.0.1:") {
            break addr.trim().parse().unwrap();
        }
    };
    // Keep draining standard output so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, out, port)
}

fn stop(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_demo_start_restart_and_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = binary(tmp.path());
    let data = tmp.path().join("data");

    let (child, out, port) = serve_demo(&bin, &data);
    let path = data.join(CREDENTIALS_FILE);
    let creds = read_credentials(&path);
    assert_eq!(creds.len(), ACCOUNTS.len());
    assert!(out.contains("Demo data seeded: 8 accounts, 25 synthetic patients."), "{out}");
    assert!(out.contains(&path.display().to_string()), "{out}");
    for c in creds.values() {
        assert!(!out.contains(&c.password), "a password was printed");
    }
    let client = client_trusting(&std::fs::read(data.join("tls/cert.pem")).unwrap());
    let base = format!("https://localhost:{port}");
    for (username, c) in &creds {
        login(&client, &base, username, &c.password).await;
    }
    // The printed command works as printed (its password comes from the file).
    let commands: Vec<&str> =
        out.lines().skip_while(|l| !l.starts_with("Sign in")).skip(1).take(2).map(str::trim).collect();
    assert!(commands[0].starts_with("PASSWORD=") && commands[1].starts_with("curl "), "{out}");
    let curl = Command::new("sh").arg("-c").arg(format!("{}; {}", commands[0], commands[1])).output().unwrap();
    let reply: Value = serde_json::from_slice(&curl.stdout).unwrap();
    assert_eq!(reply["token_type"], "Bearer");
    stop(child);

    let seeded = command(&bin, &data).args(["seed", "--patients", "5"]).output().unwrap();
    assert!(seeded.status.success());
    assert!(String::from_utf8_lossy(&seeded.stdout).contains("5 synthetic patient(s) added"));

    let (child, out, port) = serve_demo(&bin, &data);
    assert!(out.contains("Demo data already seeded."), "{out}");
    assert_eq!(read_credentials(&path), creds, "a restart changed the credentials");
    let base = format!("https://localhost:{port}");
    let front = login(&client, &base, "demo-front-desk", &creds["demo-front-desk"].password).await;
    let r = client.get(format!("{base}/fhir/Patient?_summary=count")).bearer_auth(&front.access).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["total"], 30);
    stop(child);
}

/// The compose demo: `deploy init` makes and prints carevault's demo logins (`docker compose logs init`), and the
/// api's demo seeding gives the accounts exactly those passwords (`demo_passwords_file`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_demo_accounts_get_the_passwords_deploy_init_printed() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = binary(tmp.path());
    let secrets = tmp.path().join("secrets");
    let init =
        command(&bin, &tmp.path().join("unused")).args(["deploy", "init", "--dir"]).arg(&secrets).output().unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let printed = String::from_utf8_lossy(&init.stdout).to_string();
    let logins: BTreeMap<String, String> = printed
        .lines()
        .skip_while(|l| !l.starts_with("carevault demo accounts"))
        .skip(1)
        .filter_map(|l| l.split_once(char::is_whitespace).map(|_| l.trim()))
        .filter_map(|l| l.split_whitespace().collect::<Vec<_>>().try_into().ok())
        .map(|[u, p]: [&str; 2]| (u.to_owned(), p.to_owned()))
        .collect();
    assert_eq!(logins.len(), ACCOUNTS.len(), "{printed}");
    let data = tmp.path().join("data");
    let file = secrets.join("api/demo_passwords");
    let (child, out, port) = serve_demo_with(&bin, &data, &[("CAREVAULT_DEMO_PASSWORDS_FILE", &file)]);
    assert!(out.contains("Demo data seeded: 8 accounts"), "{out}");
    let client = client_trusting(&std::fs::read(data.join("tls/cert.pem")).unwrap());
    let base = format!("https://localhost:{port}");
    for (username, password) in &logins {
        login(&client, &base, username, password).await;
    }
    let creds = read_credentials(&data.join(CREDENTIALS_FILE));
    assert!(logins.iter().all(|(u, p)| creds[u].password == *p), "the credentials file holds the same passwords");
    stop(child);
}

#[tokio::test]
async fn binary_production_refuses_demo_and_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = binary(tmp.path());
    let data = tmp.path().join("data");
    for (args, says) in [(&["serve", "--demo"][..], "--demo"), (&["seed", "--patients", "1"], "production")] {
        let out = command(&bin, &data).env("CAREVAULT_PROFILE", "production").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} ran in production");
        assert!(String::from_utf8_lossy(&out.stderr).contains(says), "{args:?}");
        assert!(!data.join(CREDENTIALS_FILE).exists());
    }
}
