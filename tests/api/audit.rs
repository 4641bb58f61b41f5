//! The audit trail (CONTRACT §7): one event per interaction with who/what/outcome and no PHI, one valid chain
//! under concurrent writers, the trail as FHIR for auditors only, access reports, and durability across a crash
//! of the real binary (every response that came back has its event).

use crate::both_backends;
use crate::helpers::{PASSWORD, Session, TestApp, client_trusting, free_port};
use crate::world::observation;
use carevault::store::schema::audit_events;
use diesel::prelude::*;
use serde_json::{Value, json};

/// Audit rows written by requests: alerts are appended by the monitor in the background, so they are left out.
fn request_events(app: &TestApp) -> Vec<Value> {
    let mut conn = app.state.db.conn().unwrap();
    let bodies: Vec<String> = audit_events::table
        .filter(audit_events::kind.ne("alert"))
        .order(audit_events::seq.asc())
        .select(audit_events::body)
        .load(&mut conn)
        .unwrap();
    bodies.iter().map(|b| serde_json::from_str(b).unwrap()).collect()
}

fn all_bodies(app: &TestApp) -> String {
    let mut conn = app.state.db.conn().unwrap();
    let bodies: Vec<String> = audit_events::table.select(audit_events::body).load(&mut conn).unwrap();
    bodies.join("\n")
}

fn account_id(app: &TestApp, username: &str) -> String {
    let mut conn = app.state.db.conn().unwrap();
    carevault::auth::service::find_account(&mut conn, username).unwrap().unwrap().id
}

/// Counts request events before an interaction and returns the single one it added.
struct Probe(usize);

impl Probe {
    fn start(app: &TestApp) -> Self {
        Self(request_events(app).len())
    }

    fn one(self, app: &TestApp, what: &str) -> Value {
        let events = request_events(app);
        let new = &events[self.0..];
        assert_eq!(new.len(), 1, "{what}: exactly one event, got {new:#?}");
        new[0].clone()
    }
}

/// Asserts the fields every event about `who` doing `kind` must carry.
fn check(e: &Value, kind: &str, action: &str, outcome: &str, user: &str, role: &str) {
    assert_eq!(e["kind"], kind, "{e}");
    assert_eq!(e["action"], action, "{e}");
    assert_eq!(e["outcome"], outcome, "{e}");
    assert_eq!(e["agent"]["user"], user, "{e}");
    assert_eq!(e["agent"]["role"], role, "{e}");
    assert_eq!(e["agent"]["address"], "127.0.0.1", "{e}");
}

fn check_resource(e: &Value, rtype: &str, id: Option<&str>, version: Option<i64>, patient: Option<&str>) {
    assert_eq!(e["resource_type"], rtype, "{e}");
    assert_eq!(e["resource_id"], json!(id), "{e}");
    assert_eq!(e["resource_version"], json!(version), "{e}");
    assert_eq!(e["patient"], json!(patient), "{e}");
}

async fn form(app: &TestApp, path: &str, fields: &[(&str, &str)], bearer: Option<&str>) -> reqwest::Response {
    let mut rb = app.client.post(app.url(path)).form(fields);
    if let Some(b) = bearer {
        rb = rb.bearer_auth(b);
    }
    rb.send().await.unwrap()
}

const CANARIES: &[&str] = &[
    "Qwyzzlebrook",
    "Ottoline-Canary",
    "987-65-4329",
    "CANARY-CODE-77",
    "CanaryParamName",
    "CANARY-REASON-unconscious",
    "canary-login-name",
    "canary-wrong-password",
];

both_backends!(every_interaction_yields_exactly_one_event, |app: TestApp| async move {
    let w = app.world().await;
    let doc = account_id(&app, "doc");
    let front = account_id(&app, "front");
    let patient_user = account_id(&app, "alice");
    let other = account_id(&app, "otherdoc");
    let alice = w.alice.as_str();
    let canary_patient = app
        .create(
            &w.front,
            json!({"resourceType":"Patient","name":[{"family":"Qwyzzlebrook","given":["Ottoline-Canary"]}],
                   "identifier":[{"system":"urn:mrn","value":"987-65-4329"}]}),
        )
        .await;

    // create
    let p = Probe::start(&app);
    let mut obs_body = observation(alice, "8480-6", 120.0, "2024-05-01T10:00:00Z");
    obs_body["code"]["text"] = json!("CANARY-CODE-77");
    let obs = app.create(&w.doc, obs_body).await;
    let e = p.one(&app, "create");
    check(&e, "create", "C", "0", &doc, "clinician");
    check_resource(&e, "Observation", Some(&obs), Some(1), Some(alice));
    assert_eq!(e["purpose_of_use"], "TREAT");
    let path = format!("/fhir/Observation/{obs}");

    // read
    let p = Probe::start(&app);
    let (status, mut o) = app.get_json(&w.doc, &path).await;
    assert_eq!(status, 200);
    let e = p.one(&app, "read");
    check(&e, "read", "R", "0", &doc, "clinician");
    assert_eq!(e["agent"]["username"], "doc", "request events name the account too");
    check_resource(&e, "Observation", Some(&obs), Some(1), Some(alice));

    // update
    let p = Probe::start(&app);
    o["status"] = json!("amended");
    assert_eq!(app.put(&w.doc, &path, Some("1"), &o).await.status(), 200);
    let e = p.one(&app, "update");
    check(&e, "update", "U", "0", &doc, "clinician");
    check_resource(&e, "Observation", Some(&obs), Some(2), Some(alice));

    // vread
    let p = Probe::start(&app);
    assert_eq!(app.get(&w.doc, &format!("{path}/_history/1")).await.status(), 200);
    let e = p.one(&app, "vread");
    check(&e, "vread", "R", "0", &doc, "clinician");
    check_resource(&e, "Observation", Some(&obs), Some(1), Some(alice));

    // history
    let p = Probe::start(&app);
    assert_eq!(app.get(&w.doc, &format!("{path}/_history")).await.status(), 200);
    let e = p.one(&app, "history");
    check(&e, "history", "R", "0", &doc, "clinician");
    check_resource(&e, "Observation", Some(&obs), Some(2), Some(alice));

    // search: parameter names only, never values
    let p = Probe::start(&app);
    let q =
        format!("/fhir/Observation?patient={alice}&code=http://loinc.org|CANARY-CODE-77&date=ge2024-01-01&_count=5");
    let (status, _) = app.get_json(&w.doc, &q).await;
    assert_eq!(status, 200);
    let e = p.one(&app, "search");
    check(&e, "search", "E", "0", &doc, "clinician");
    check_resource(&e, "Observation", None, None, Some(alice));
    let params: Vec<&str> = e["query_params"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(params.contains(&"patient") && params.contains(&"date") && params.contains(&"_count"), "{params:?}");
    assert!(params.contains(&"code"), "{params:?}");

    // a search by PHI values, and one by a name the server does not know (lenient): neither is recorded
    let p = Probe::start(&app);
    let (status, b) = app.get_json(&w.front, "/fhir/Patient?family=Qwyzzlebrook&given=Ottoline-Canary").await;
    assert_eq!((status, b["entry"].as_array().map(Vec::len)), (200, Some(1)));
    let e = p.one(&app, "search by name");
    check(&e, "search", "E", "0", &front, "front_desk");
    assert_eq!(e["agent"]["username"], "front");
    assert_eq!(e["query_params"], json!(["family", "given"]));
    let p = Probe::start(&app);
    let lenient = app
        .client
        .get(app.url("/fhir/Patient?CanaryParamName=Qwyzzlebrook"))
        .bearer_auth(&w.front.access)
        .header("prefer", "handling=lenient")
        .send()
        .await
        .unwrap();
    assert_eq!(lenient.status(), 200);
    assert_eq!(p.one(&app, "lenient search")["query_params"], json!(["(unrecognised)"]));

    // $everything
    let p = Probe::start(&app);
    assert_eq!(app.get(&w.doc, &format!("/fhir/Patient/{alice}/$everything")).await.status(), 200);
    let e = p.one(&app, "$everything");
    check(&e, "everything", "E", "0", &doc, "clinician");
    check_resource(&e, "Patient", Some(alice), None, Some(alice));

    // delete
    let p = Probe::start(&app);
    let del = app.client.delete(app.url(&path)).bearer_auth(&w.doc.access).send().await.unwrap();
    assert_eq!(del.status(), 204);
    let e = p.one(&app, "delete");
    check(&e, "delete", "D", "0", &doc, "clinician");
    assert_eq!(e["agent"]["username"], "doc");
    check_resource(&e, "Observation", Some(&obs), Some(3), Some(alice));

    // $access-report (the patient's own)
    let p = Probe::start(&app);
    assert_eq!(app.get(&w.alice_user, &format!("/fhir/Patient/{alice}/$access-report")).await.status(), 200);
    let e = p.one(&app, "$access-report");
    check(&e, "access-report", "E", "0", &patient_user, "patient");
    assert_eq!(e["agent"]["username"], "alice");
    check_resource(&e, "Patient", Some(alice), None, Some(alice));
    assert_eq!(e["purpose_of_use"], "PATRQT");

    // login
    let p = Probe::start(&app);
    let fresh = app.login_as("doc").await;
    let e = p.one(&app, "login");
    check(&e, "login", "E", "0", &doc, "clinician");
    assert_eq!(e["agent"]["username"], "doc");
    assert_eq!(e["patient"], Value::Null);

    // login failure: a known account with a wrong password, then an unknown name (neither text recorded)
    for (username, password, user) in
        [("doc", "canary-wrong-password", json!(doc)), ("canary-login-name", PASSWORD, Value::Null)]
    {
        let p = Probe::start(&app);
        let r = app
            .client
            .post(app.url("/auth/login"))
            .json(&json!({"username": username, "password": password}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let e = p.one(&app, "login failure");
        assert_eq!((&e["kind"], &e["action"], &e["outcome"]), (&json!("login-failure"), &json!("E"), &json!("4")));
        assert_eq!(e["agent"]["user"], user);
        assert_eq!(e["agent"]["address"], "127.0.0.1");
    }

    // refresh
    let p = Probe::start(&app);
    let r =
        form(&app, "/auth/token", &[("grant_type", "refresh_token"), ("refresh_token", &fresh.refresh)], None).await;
    assert_eq!(r.status(), 200);
    let e = p.one(&app, "refresh");
    check(&e, "refresh", "E", "0", &doc, "clinician");
    let refreshed: Value = r.json().await.unwrap();
    let refreshed = Session {
        access: refreshed["access_token"].as_str().unwrap().to_owned(),
        refresh: refreshed["refresh_token"].as_str().unwrap().to_owned(),
    };

    // logout
    let p = Probe::start(&app);
    let r = app.client.post(app.url("/auth/logout")).bearer_auth(&refreshed.access).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let e = p.one(&app, "logout");
    check(&e, "logout", "E", "0", &doc, "clinician");

    // break-glass: the reason is free text and stays out of the trail
    let p = Probe::start(&app);
    let r = app
        .client
        .post(app.url("/auth/break-glass"))
        .bearer_auth(&w.other_doc.access)
        .json(&json!({"patient": format!("Patient/{alice}"), "reason": "CANARY-REASON-unconscious"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let e = p.one(&app, "break-glass");
    check(&e, "break-glass", "E", "0", &other, "clinician");
    check_resource(&e, "Patient", Some(alice), None, Some(alice));
    assert_eq!(e["purpose_of_use"], "BTG");
    // What the grant opens is recorded as break-glass access.
    let p = Probe::start(&app);
    assert_eq!(app.get(&w.other_doc, &format!("/fhir/Patient/{alice}")).await.status(), 200);
    let e = p.one(&app, "read under break-glass");
    assert_eq!((&e["kind"], &e["purpose_of_use"]), (&json!("read"), &json!("BTG")));

    // The canary patient was reached by search only; its id is recorded where it was read.
    let p = Probe::start(&app);
    assert_eq!(app.get(&w.front, &format!("/fhir/Patient/{canary_patient}")).await.status(), 200);
    check_resource(&p.one(&app, "read canary"), "Patient", Some(&canary_patient), Some(1), Some(&canary_patient));

    let trail = all_bodies(&app);
    for canary in CANARIES.iter().chain(["Zoë-Lindqvist", "123-45-6789", "555-0100", "Springfield"].iter()) {
        assert!(!trail.contains(canary), "{canary} reached the audit trail");
    }
});

both_backends!(concurrent_writers_make_one_valid_chain, |app: TestApp| async move {
    let w = app.world().await;
    let mut tasks = Vec::new();
    let app = std::sync::Arc::new(app);
    for t in 0..8 {
        let (app, doc, alice) = (app.clone(), w.doc.clone(), w.alice.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..4 {
                let id = app.create(&doc, observation(&alice, "8480-6", f64::from(t * 10 + i), "2024-05-01")).await;
                assert_eq!(app.get(&doc, &format!("/fhir/Observation/{id}")).await.status(), 200);
                let (s, _) = app.get_json(&doc, &format!("/fhir/Observation?patient={alice}&_count=2")).await;
                assert_eq!(s, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = app.audit_count().await;
    let mut conn = app.state.db.conn().unwrap();
    let verified = carevault::audit::store::verify(&mut conn, |_| {}).unwrap().expect("one valid chain");
    assert_eq!(i64::try_from(verified).unwrap(), total);
    // 8 × 4 × (create, read, search) on top of the world.
    let kinds: Vec<String> = audit_events::table.select(audit_events::kind).load(&mut conn).unwrap();
    assert_eq!(kinds.iter().filter(|k| *k == "create").count(), 32 + 6);
    assert_eq!(kinds.iter().filter(|k| *k == "search").count(), 32);
    // Sequence numbers are dense: no gap, no duplicate.
    let seqs: Vec<i64> =
        audit_events::table.order(audit_events::seq.asc()).select(audit_events::seq).load(&mut conn).unwrap();
    assert!(seqs.iter().enumerate().all(|(i, s)| *s == i64::try_from(i).unwrap() + 1));
});

fn entries(b: &Value) -> Vec<Value> {
    b["entry"].as_array().cloned().unwrap_or_default().into_iter().map(|e| e["resource"].clone()).collect()
}

both_backends!(auditors_search_the_trail_others_cannot, |app: TestApp| async move {
    let w = app.world().await;
    let doc = account_id(&app, "doc");
    let alice = w.alice.clone();
    let obs = app.create(&w.doc, observation(&alice, "8480-6", 120.0, "2024-05-01T10:00:00Z")).await;
    assert_eq!(app.get(&w.doc, &format!("/fhir/Observation/{obs}")).await.status(), 200);
    assert_eq!(app.get(&w.front, &format!("/fhir/Patient/{}", w.bob)).await.status(), 200);

    let (s, all) = app.get_json(&w.auditor, "/fhir/AuditEvent?_count=500").await;
    assert_eq!(s, 200, "{all}");
    app.assert_valid(&all);
    assert!(entries(&all).len() >= 10);

    // by patient: only events about Alice
    let (s, b) = app.get_json(&w.auditor, &format!("/fhir/AuditEvent?patient=Patient/{alice}&_count=500")).await;
    assert_eq!(s, 200, "{b}");
    app.assert_valid(&b);
    let about_alice = entries(&b);
    assert!(about_alice.len() >= 3, "{b}");
    for e in &about_alice {
        let entities = e["entity"].as_array().unwrap();
        assert!(entities.iter().any(|x| x["what"]["reference"] == format!("Patient/{alice}")), "{e}");
    }
    // An event about Bob alone is not about Alice (one that disclosed both names both, and is).
    for e in &about_alice {
        let patients: Vec<&Value> =
            e["entity"].as_array().unwrap().iter().filter(|x| x["role"]["code"] == "1").collect();
        assert!(!(patients.len() == 1 && patients[0]["what"]["reference"] == format!("Patient/{}", w.bob)), "{e}");
    }
    // by agent: only the clinician's events
    let (s, b) = app.get_json(&w.auditor, &format!("/fhir/AuditEvent?agent={doc}&_count=500")).await;
    assert_eq!(s, 200, "{b}");
    app.assert_valid(&b);
    let by_doc = entries(&b);
    assert!(by_doc.len() >= 3, "login, create, read: {b}");
    assert!(by_doc.iter().all(|e| e["agent"][0]["who"]["identifier"]["value"] == doc), "{b}");
    // by action
    let (s, b) = app.get_json(&w.auditor, "/fhir/AuditEvent?action=C&_count=500").await;
    assert_eq!(s, 200, "{b}");
    app.assert_valid(&b);
    let creates = entries(&b);
    assert_eq!(creates.len(), 7, "six in the world and one observation");
    assert!(creates.iter().all(|e| e["action"] == "C"));
    // by date (the clock stands at 2026-03-01 09:00)
    let (_, b) = app.get_json(&w.auditor, "/fhir/AuditEvent?date=ge2026-03-01&_count=500").await;
    app.assert_valid(&b);
    assert!(entries(&b).len() >= 10);
    let (_, b) = app.get_json(&w.auditor, "/fhir/AuditEvent?date=lt2026-03-01").await;
    assert_eq!(entries(&b).len(), 0, "{b}");
    let (_, b) = app.get_json(&w.auditor, "/fhir/AuditEvent?date=ge2026-03-02").await;
    assert_eq!(entries(&b).len(), 0, "{b}");
    let (_, b) = app.get_json(&w.auditor, "/fhir/AuditEvent?date=2026-03-01&action=R&_count=500").await;
    app.assert_valid(&b);
    let reads = entries(&b);
    assert!(reads.len() >= 2 && reads.iter().all(|e| e["action"] == "R"), "{b}");
    // one event read back by id
    let id = reads[0]["id"].as_str().unwrap();
    let (s, one) = app.get_json(&w.auditor, &format!("/fhir/AuditEvent/{id}")).await;
    assert_eq!(s, 200);
    app.assert_valid(&one);

    // Reading the trail is audited too, by parameter names only (an unknown name is not recorded either).
    let p = Probe::start(&app);
    let lenient = app
        .client
        .get(app.url(&format!("/fhir/AuditEvent?patient=Patient/{alice}&_CanaryAuditParam=Qwyzzle&CanaryOther=1")))
        .bearer_auth(&w.auditor.access)
        .header("prefer", "handling=lenient")
        .send()
        .await
        .unwrap();
    assert_eq!(lenient.status(), 200);
    let e = p.one(&app, "AuditEvent search");
    check(&e, "search", "E", "0", &account_id(&app, "auditor"), "auditor");
    assert_eq!(e["resource_type"], "AuditEvent");
    assert_eq!(e["query_params"], json!(["(unrecognised)", "patient"]), "{e}");
    assert_eq!(e["purpose_of_use"], "HCOMPL");
    let trail = all_bodies(&app);
    assert!(!trail.contains("Canary") && !trail.contains("Qwyzzle"), "client text reached the trail");

    // every other role: 403
    for s in [&w.front, &w.billing, &w.admin, &w.doc, &w.other_doc, &w.nurse, &w.alice_user] {
        assert_eq!(app.get(s, "/fhir/AuditEvent").await.status(), 403);
        assert_eq!(app.get(s, &format!("/fhir/AuditEvent?patient=Patient/{alice}")).await.status(), 403);
        assert_eq!(app.get(s, &format!("/fhir/AuditEvent/{id}")).await.status(), 403);
    }
});

fn accesses(report: &Value) -> Vec<Value> {
    report["parameter"].as_array().unwrap().iter().filter(|p| p["name"] == "access").cloned().collect()
}

fn part<'a>(access: &'a Value, name: &str) -> Option<&'a Value> {
    access["part"].as_array().unwrap().iter().find(|p| p["name"] == name)
}

both_backends!(access_reports_for_the_patient_and_auditors_only, |app: TestApp| async move {
    let w = app.world().await;
    let alice = w.alice.clone();
    assert_eq!(app.get(&w.doc, &format!("/fhir/Patient/{alice}")).await.status(), 200);
    assert_eq!(app.get(&w.nurse, &format!("/fhir/Patient/{alice}/$everything")).await.status(), 200);
    let path = format!("/fhir/Patient/{alice}/$access-report");
    let (s, report) = app.get_json(&w.alice_user, &path).await;
    assert_eq!(s, 200, "{report}");
    app.assert_valid(&report);
    assert_eq!(report["resourceType"], "Parameters");
    let list = accesses(&report);
    let find = |who: &str, interaction: &str| {
        list.iter().find(|a| {
            part(a, "who").unwrap()["valueString"] == who
                && part(a, "interaction").unwrap()["valueCoding"]["code"] == interaction
        })
    };
    let read = find("doc", "read").expect("the clinician's read is listed by name");
    assert_eq!(part(read, "role").unwrap()["valueCoding"]["code"], "clinician");
    assert_eq!(part(read, "why").unwrap()["valueCoding"]["code"], "TREAT");
    let everything = find("nurse", "everything").expect("the nurse's $everything is listed");
    assert_eq!(part(everything, "role").unwrap()["valueCoding"]["code"], "nurse");
    assert!(find("front", "create").is_some(), "the registration is listed");
    assert!(!report.to_string().contains("127.0.0.1"), "no internals");
    // Someone else's report: 404, exactly like a missing patient.
    let other = app.get(&w.alice_user, &format!("/fhir/Patient/{}/$access-report", w.bob)).await;
    assert_eq!(other.status(), 404);
    let missing = app.get(&w.alice_user, "/fhir/Patient/00000000-0000-4000-8000-000000000001/$access-report").await;
    assert_eq!(missing.status(), 404);
    assert_eq!(other.text().await.unwrap(), missing.text().await.unwrap());
    // The auditor gets any patient's, including that the patient looked at their own.
    for p in [&alice, &w.bob] {
        let (s, r) = app.get_json(&w.auditor, &format!("/fhir/Patient/{p}/$access-report")).await;
        assert_eq!(s, 200);
        app.assert_valid(&r);
    }
    let (_, r) = app.get_json(&w.auditor, &path).await;
    assert!(accesses(&r).iter().any(|a| part(a, "who").unwrap()["valueString"] == "alice"
        && part(a, "interaction").unwrap()["valueCoding"]["code"] == "access-report"));
    // Other roles may not ask.
    for s in [&w.front, &w.doc, &w.billing] {
        let status = app.get(s, &path).await.status().as_u16();
        assert!(status == 403 || status == 404, "{status}");
    }
});

/// The real binary on a SQLite data directory; killed with SIGKILL mid-load, restarted on the same directory.
mod crash {
    use super::*;
    use std::io::{BufRead, Write};
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    fn command(dir: &std::path::Path) -> Command {
        let bin = std::env::var("CAREVAULT_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_carevault").to_owned());
        let mut cmd = Command::new(bin);
        cmd.arg("--data-dir").arg(dir).arg("--config").arg(dir.join("carevault.toml"));
        for (k, _) in std::env::vars() {
            if k.starts_with("CAREVAULT_") || k.starts_with("OTEL_") {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    /// Starts `serve` and waits until it answers.
    fn serve(dir: &std::path::Path) -> (Child, String) {
        for _ in 0..5 {
            let port = free_port();
            let mut child = command(dir)
                .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let lines = Arc::new(Mutex::new(Vec::new()));
            for stream in [
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
                Box::new(child.stderr.take().unwrap()),
            ] {
                let lines = lines.clone();
                std::thread::spawn(move || {
                    for l in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                        lines.lock().unwrap().push(l);
                    }
                });
            }
            let started = Instant::now();
            loop {
                if lines.lock().unwrap().iter().any(|l| l.contains("carevault is serving")) {
                    return (child, format!("https://localhost:{port}"));
                }
                if child.try_wait().unwrap().is_some() {
                    let out = lines.lock().unwrap().join("\n");
                    assert!(out.contains("cannot listen"), "server did not start: {out}");
                    break; // the port was taken in between: try another
                }
                assert!(started.elapsed() < Duration::from_secs(60), "server did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("no free port");
    }

    #[derive(Debug, Default)]
    struct Acked {
        created: Vec<String>,
        read: Vec<String>,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_acknowledged_response_survives_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("carevault.db");
        std::fs::write(
            dir.path().join("carevault.toml"),
            format!(
                "database_url = \"sqlite://{}\"\n[access]\npolicy_dir = \"{}\"\n",
                db_path.display(),
                crate::helpers::policy_dir().display()
            ),
        )
        .unwrap();
        // The server first: it creates the database and keys, which `users add` (a maintenance command) then
        // finds; on an empty data directory it would refuse.
        let (mut child, base) = serve(dir.path());
        let mut add = command(dir.path())
            .args(["users", "add", "--username", "desk", "--role", "front_desk", "--password-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        add.stdin.take().unwrap().write_all(format!("{PASSWORD}\n").as_bytes()).unwrap();
        let out = tokio::task::block_in_place(|| add.wait_with_output().unwrap());
        assert!(out.status.success(), "users add: {}", String::from_utf8_lossy(&out.stderr));

        let client = client_trusting(&std::fs::read(dir.path().join("tls/cert.pem")).unwrap());
        let login: Value = client
            .post(format!("{base}/auth/login"))
            .json(&json!({"username": "desk", "password": PASSWORD}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = login["access_token"].as_str().unwrap().to_owned();

        let acked = Arc::new(Mutex::new(Acked::default()));
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = Vec::new();
        for w in 0..6 {
            let (client, base, token, acked, done) =
                (client.clone(), base.clone(), token.clone(), acked.clone(), done.clone());
            workers.push(tokio::spawn(async move {
                for i in 0.. {
                    let body = json!({"resourceType":"Patient","name":[{"family":format!("Crash{w}x{i}")}]});
                    let Ok(r) = client
                        .post(format!("{base}/fhir/Patient"))
                        .bearer_auth(&token)
                        .header("content-type", "application/fhir+json")
                        .body(body.to_string())
                        .send()
                        .await
                    else {
                        return;
                    };
                    if !r.status().is_success() {
                        return;
                    }
                    let Ok(created) = r.json::<Value>().await else { return };
                    let id = created["id"].as_str().unwrap().to_owned();
                    acked.lock().unwrap().created.push(id.clone());
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Ok(r) = client.get(format!("{base}/fhir/Patient/{id}")).bearer_auth(&token).send().await else {
                        return;
                    };
                    if r.status().is_success() && r.bytes().await.is_ok() {
                        acked.lock().unwrap().read.push(id);
                        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            }));
        }
        let started = Instant::now();
        while done.load(std::sync::atomic::Ordering::SeqCst) < 60 {
            assert!(started.elapsed() < Duration::from_secs(120), "load did not progress");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().unwrap(); // SIGKILL, mid-load
        child.wait().unwrap();
        for w in workers {
            w.await.unwrap();
        }
        let acked = std::mem::take(&mut *acked.lock().unwrap());
        assert!(acked.created.len() >= 20 && acked.read.len() >= 20, "{acked:?}");

        // Restart on the same directory: it comes up, and every acknowledged response has its event.
        let (mut child, base) = serve(dir.path());
        let relogin = client
            .post(format!("{base}/auth/login"))
            .json(&json!({"username": "desk", "password": PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(relogin.status(), 200);
        let db = carevault::store::Db::connect(&carevault::config::DatabaseTarget::Sqlite(db_path), 1).unwrap();
        let mut conn = db.conn().unwrap();
        let rows: Vec<(String, String)> =
            audit_events::table.select((audit_events::kind, audit_events::body)).load(&mut conn).unwrap();
        let ids_of = |kind: &str| -> std::collections::HashSet<String> {
            rows.iter()
                .filter(|(k, _)| k == kind)
                .filter_map(|(_, b)| {
                    serde_json::from_str::<Value>(b).unwrap()["resource_id"].as_str().map(str::to_owned)
                })
                .collect()
        };
        let (created, read) = (ids_of("create"), ids_of("read"));
        for id in &acked.created {
            assert!(created.contains(id), "create of {id} was answered 201 but is not in the trail");
        }
        for id in &acked.read {
            assert!(read.contains(id), "read of {id} was answered 200 but is not in the trail");
        }
        let n = carevault::audit::store::verify(&mut conn, |_| {}).unwrap().expect("the chain is intact");
        assert!(n >= u64::try_from(acked.created.len() + acked.read.len()).unwrap());
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
