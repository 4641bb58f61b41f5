//! The client-guide snippets (docs/client-guide.md) against a real server: fhirpy and fhirclient (Python, from a
//! virtualenv) and fhir-kit-client (npm), each exactly the file the guide shows. Each signs in as a service
//! client (`client_credentials`, HTTP Basic), creates, reads, searches, updates with `If-Match` (and is refused
//! a stale one), pages through a search and handles a 404 OperationOutcome; the test checks what the snippet
//! printed, what the server stored and what the audit trail recorded. Under `CI=true` a missing interpreter or
//! library fails the test; elsewhere it is skipped with a message.
//!
//! The Python libraries come from the virtualenv `CAREVAULT_TEST_CLIENTS_VENV` (default
//! `~/.cache/carevault-clients-venv`, made from `tests/clients/requirements.txt` by `.ci/run`); the npm one from
//! `tests/clients/node_modules` (`cd tests/clients && npm ci`).

use crate::both_backends;
use crate::helpers::TestApp;
use carevault::auth::service::{NewAccount, create_account, new_client_secret};
use carevault::role::Role;
use carevault::store::schema::audit_events;
use diesel::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

fn skip_or_fail<T>(why: &str) -> Option<T> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but a client-library test cannot run: {why}");
    }
    eprintln!("skipping a client-library test: {why}");
    None
}

/// The virtualenv with fhirpy and fhirclient.
fn venv() -> PathBuf {
    match std::env::var_os("CAREVAULT_TEST_CLIENTS_VENV") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/carevault-clients-venv"),
    }
}

/// The virtualenv's python when it can import `module`; `None` (skip) when not, outside CI.
fn python_with(module: &str) -> Option<PathBuf> {
    let python = venv().join("bin/python");
    let install = format!(
        "python3 -m venv {v} && {v}/bin/pip install -r tests/clients/requirements.txt (or set CAREVAULT_TEST_CLIENTS_VENV)",
        v = venv().display()
    );
    if !python.exists() {
        return skip_or_fail(&format!("no virtualenv at {}: {install}", venv().display()));
    }
    let imports = Command::new(&python).args(["-c", &format!("import {module}")]).output();
    match imports {
        Ok(o) if o.status.success() => Some(python),
        _ => skip_or_fail(&format!("{module} is not installed in {}: {install}", venv().display())),
    }
}

/// `node`, when tests/clients has its npm packages.
fn node_with_fhir_kit_client() -> Option<PathBuf> {
    if !clients_dir().join("node_modules/fhir-kit-client").is_dir() {
        return skip_or_fail("tests/clients/node_modules is missing (cd tests/clients && npm ci)");
    }
    match Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => Some(PathBuf::from("node")),
        _ => skip_or_fail("node is not installed"),
    }
}

/// A service client as `carevault users add --service --role front_desk` makes it (a registration feed):
/// its name and generated secret.
fn service_client(app: &TestApp, name: &str) -> (String, String) {
    let secret = new_client_secret();
    let mut conn = app.state.db.conn().unwrap();
    let new =
        NewAccount { username: name.into(), kind: "service", role: Role::FrontDesk, practitioner: None, patient: None };
    create_account(&mut conn, &new, &secrecy::SecretString::from(secret.clone()), crate::helpers::start_time())
        .unwrap();
    (name.to_owned(), secret)
}

/// Runs one snippet with the environment the guide documents; its JSON lines by `step`.
fn run_snippet(app: &TestApp, program: &Path, snippet: &str, client: &(String, String)) -> BTreeMap<String, Value> {
    let cert = app.cert_path();
    let mut cmd = Command::new(program);
    cmd.current_dir(clients_dir())
        .arg(snippet)
        .env("CAREVAULT_FHIR_BASE", app.state.records.base())
        .env("CAREVAULT_CLIENT_ID", &client.0)
        .env("CAREVAULT_CLIENT_SECRET", &client.1)
        .env("CAREVAULT_CA", &cert)
        .env("NODE_EXTRA_CA_CERTS", &cert)
        // The snippets name their CA themselves: a bundle requests would fail to open proves they never rely
        // on these (requests lets them override a session's `verify`, which fhirclient's snippet turns off).
        .env("REQUESTS_CA_BUNDLE", "/nonexistent/carevault-clients-test.pem")
        .env("CURL_CA_BUNDLE", "/nonexistent/carevault-clients-test.pem")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::block_in_place(|| {
        let mut child = cmd.spawn().expect("the snippet starts");
        let deadline = Instant::now() + Duration::from_secs(120);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{snippet} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    let mut steps = BTreeMap::new();
    for line in stdout.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{snippet}: {e}: {line}"));
        let step = v["step"].as_str().unwrap_or_else(|| panic!("{snippet}: no step in {line}")).to_owned();
        assert!(steps.insert(step.clone(), v).is_none(), "{snippet}: step {step} printed twice");
    }
    steps
}

/// What every snippet must have done, by its own report, on the server and in the audit trail.
async fn check_run(app: &TestApp, snippet: &str, service: &str, steps: &BTreeMap<String, Value>) {
    let step = |name: &str| steps.get(name).unwrap_or_else(|| panic!("{snippet}: no `{name}` step in {steps:#?}"));
    let id = step("create")["id"].as_str().unwrap().to_owned();
    let family = step("create")["family"].as_str().unwrap().to_owned();
    assert_eq!(step("create")["versionId"], "1", "{snippet}");
    assert_eq!(step("read")["id"], id.as_str(), "{snippet}");
    assert_eq!(step("read")["versionId"], "1", "{snippet}");
    assert_eq!(step("read")["family"], family.as_str(), "{snippet}");
    assert_eq!(step("search")["ids"], serde_json::json!([id]), "{snippet}: the search finds the created patient only");
    assert_eq!(step("update")["id"], id.as_str(), "{snippet}");
    assert_eq!(step("update")["versionId"], "2", "{snippet}");
    assert_eq!(step("stale-update")["status"], 412, "{snippet}: a stale If-Match is refused");
    assert_eq!(step("stale-update")["outcome"], "OperationOutcome", "{snippet}");
    // Three patients of that family, two per page: the library followed a `next` link to see the third.
    let paging = step("paging");
    assert_eq!(paging["count"], 2, "{snippet}");
    let mut paged: Vec<String> =
        paging["ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    assert_eq!(paged.len(), 3, "{snippet}: {paging}");
    assert!(paged.contains(&id), "{snippet}: {paging}");
    paged.sort();
    paged.dedup();
    assert_eq!(paged.len(), 3, "{snippet}: no patient twice: {paging}");
    if let Some(pages) = paging.get("pages") {
        assert_eq!(pages, 2, "{snippet}: {paging}");
    }
    let not_found = step("not-found");
    assert_eq!(not_found["status"], 404, "{snippet}: {not_found}");
    assert_eq!(not_found["resourceType"], "OperationOutcome", "{snippet}: {not_found}");
    assert_eq!(not_found["code"], "not-found", "{snippet}: {not_found}");

    // The server's side: the patient as updated (version 2, the new phone), and the family's three patients.
    let front = app.user(&format!("front-{service}"), Role::FrontDesk, None).await;
    let (status, stored) = app.get_json(&front, &format!("/fhir/Patient/{id}")).await;
    assert_eq!(status, 200, "{snippet}: {stored}");
    assert_eq!(stored["meta"]["versionId"], "2", "{snippet}");
    assert_eq!(stored["name"][0]["family"], family.as_str(), "{snippet}");
    assert_eq!(stored["telecom"][0]["value"], "555-0100", "{snippet}");
    let (status, bundle) = app.get_json(&front, &format!("/fhir/Patient?family={family}&_summary=count")).await;
    assert_eq!((status, &bundle["total"]), (200, &serde_json::json!(3)), "{snippet}: {bundle}");

    // The audit trail: the service client's sign-in and each interaction, by its account.
    let mine = events_of(app, snippet, service);
    let count = |kind: &str, outcome: &str, resource: Option<&str>| {
        mine.iter()
            .filter(|e| e["kind"] == kind && e["outcome"] == outcome)
            .filter(|e| resource.is_none_or(|r| e["resource_id"] == r))
            .count()
    };
    assert!(count("login", "0", None) >= 1, "{snippet}: client_credentials sign-in audited: {mine:#?}");
    assert_eq!(count("create", "0", None), 3, "{snippet}: {mine:#?}");
    assert!(count("read", "0", Some(&id)) >= 1, "{snippet}: {mine:#?}");
    assert_eq!(count("update", "0", Some(&id)), 1, "{snippet}: one update succeeded: {mine:#?}");
    let searches: Vec<&Value> = mine.iter().filter(|e| e["kind"] == "search" && e["outcome"] == "0").collect();
    assert!(searches.len() >= 3, "{snippet}: a search and two pages: {searches:#?}");
    assert!(
        // One disclosed patient is recorded as `patient`, several as `patients`.
        searches.iter().any(|e| e["patient"] == id.as_str()
            || e["patients"].as_array().is_some_and(|p| p.iter().any(|p| p == id.as_str()))),
        "{snippet}: the search names the patient it disclosed: {searches:#?}"
    );
    // Parameter names only: the family name (a search value) is nowhere in the trail.
    assert!(!serde_json::to_string(&mine).unwrap().contains(&family), "{snippet}: no search value in the audit trail");
}

/// The audit events (alerts aside) of the account the service client signed in as, oldest first: its login event
/// names it; its FHIR interactions carry the account id only.
fn events_of(app: &TestApp, snippet: &str, service: &str) -> Vec<Value> {
    let events: Vec<Value> = {
        let mut conn = app.state.db.conn().unwrap();
        let bodies: Vec<String> = audit_events::table
            .filter(audit_events::kind.ne("alert"))
            .order(audit_events::seq.asc())
            .select(audit_events::body)
            .load(&mut conn)
            .unwrap();
        bodies.iter().map(|b| serde_json::from_str(b).unwrap()).collect()
    };
    let account = events
        .iter()
        .find(|e| e["kind"] == "login" && e["agent"]["username"] == service)
        .map(|e| e["agent"]["user"].clone())
        .unwrap_or_else(|| panic!("{snippet}: no login of {service}"));
    events.into_iter().filter(|e| e["agent"]["user"] == account).collect()
}

both_backends!(fhirpy_snippet_works, |app: TestApp| async move {
    let Some(python) = python_with("fhirpy") else { return };
    let client = service_client(&app, "fhirpy-feed");
    let steps = run_snippet(&app, &python, "fhirpy_example.py", &client);
    check_run(&app, "fhirpy_example.py", &client.0, &steps).await;
});

both_backends!(fhirclient_snippet_works, |app: TestApp| async move {
    let Some(python) = python_with("fhirclient") else { return };
    let client = service_client(&app, "fhirclient-feed");
    let steps = run_snippet(&app, &python, "fhirclient_example.py", &client);
    assert_eq!(steps["token"]["ready"], true, "{steps:#?}");
    check_run(&app, "fhirclient_example.py", &client.0, &steps).await;
});

both_backends!(fhir_kit_client_snippet_works, |app: TestApp| async move {
    let Some(node) = node_with_fhir_kit_client() else { return };
    let client = service_client(&app, "fhir-kit-feed");
    let steps = run_snippet(&app, &node, "fhir_kit_client_example.mjs", &client);
    assert_eq!(steps["read"]["etag"], "W/\"1\"", "{steps:#?}");
    check_run(&app, "fhir_kit_client_example.mjs", &client.0, &steps).await;
});

/// `"201 Created"` (a Bundle entry's `response.status`) → 201.
fn status_code(v: &Value) -> u16 {
    let text = v.as_str().unwrap_or_else(|| panic!("a status is a string: {v}"));
    text.split_whitespace().next().and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("a status code: {text}"))
}

/// The id after `{rtype}/` in a Location (`Patient/ID/_history/1`, relative or absolute).
fn location_id(v: &Value, rtype: &str) -> String {
    let text = v.as_str().unwrap_or_else(|| panic!("a location is a string: {v}"));
    let mut parts = text.split('/');
    parts.find(|p| *p == rtype).unwrap_or_else(|| panic!("{text} names no {rtype}"));
    parts.next().filter(|id| !id.is_empty()).unwrap_or_else(|| panic!("{text} names no {rtype} id")).to_owned()
}

/// A search's total, as front desk sees it.
async fn total(app: &TestApp, front: &crate::helpers::Session, query: &str) -> Value {
    let (status, bundle) = app.get_json(front, &format!("/fhir/{query}&_summary=count")).await;
    assert_eq!(status, 200, "{query}: {bundle}");
    bundle["total"].clone()
}

const MRN: &str = "https://carevault.example/fhir/sid/mrn";

/// What each write snippet must have done (`fhirpy_writes.py`, `fhir_kit_client_writes.mjs`): its report, the
/// stored resources, and one audit event per interaction and per Bundle entry.
async fn check_writes(app: &TestApp, snippet: &str, service: &str, steps: &BTreeMap<String, Value>) {
    let step = |name: &str| steps.get(name).unwrap_or_else(|| panic!("{snippet}: no `{name}` step in {steps:#?}"));
    let front = app.user(&format!("front-{service}"), Role::FrontDesk, None).await;

    // Conditional create, twice: one patient.
    let goc = step("get-or-create");
    let family = goc["family"].as_str().unwrap().to_owned();
    let mrn = goc["mrn"].as_str().unwrap().to_owned();
    let id = goc["ids"][0].as_str().unwrap().to_owned();
    assert_eq!(goc["ids"][1], id.as_str(), "{snippet}: the second conditional create found the first: {goc}");
    assert_eq!(goc["created"], serde_json::json!([true, false]), "{snippet}: {goc}");
    assert_eq!(total(app, &front, &format!("Patient?identifier={MRN}|{mrn}")).await, 1, "{snippet}: no duplicate");

    // Update (v2), stale update refused, patch (v3): the patched element changed, the others kept.
    assert_eq!((&step("update")["id"], &step("update")["versionId"]), (&Value::from(id.as_str()), &Value::from("2")));
    assert_eq!(step("stale-update")["status"], 412, "{snippet}: a stale If-Match is refused");
    assert_eq!(step("stale-update")["outcome"], "OperationOutcome", "{snippet}");
    let patch = step("patch");
    assert_eq!((&patch["id"], &patch["versionId"]), (&Value::from(id.as_str()), &Value::from("3")), "{snippet}");
    assert_eq!(patch["phone"], "555-0199", "{snippet}: {patch}");
    if let Some(bare) = steps.get("unversioned-patch") {
        assert_eq!((&bare["status"], &bare["outcome"]), (&Value::from(428), &Value::from("OperationOutcome")));
    }
    if let Some(stale) = steps.get("stale-patch") {
        assert_eq!((&stale["status"], &stale["outcome"]), (&Value::from(412), &Value::from("OperationOutcome")));
    }
    // fhirpy's own patch() (a JSON object: a merge patch) after it: version 4, the JSON Patch's change kept.
    let merge = steps.get("merge-patch");
    if let Some(merge) = merge {
        assert_eq!((&merge["id"], &merge["versionId"]), (&Value::from(id.as_str()), &Value::from("4")), "{snippet}");
        assert_eq!(merge["phone"], "555-0199", "{snippet}: {merge}");
    }
    let (version, birth_date) = if merge.is_some() { ("4", "1990-04-02") } else { ("3", "1990-04-01") };
    let (status, stored) = app.get_json(&front, &format!("/fhir/Patient/{id}")).await;
    assert_eq!(status, 200, "{snippet}: {stored}");
    app.assert_valid(&stored);
    assert_eq!(stored["meta"]["versionId"], version, "{snippet}: nothing after the patches was stored: {stored}");
    assert_eq!(stored["telecom"][0]["value"], "555-0199", "{snippet}: {stored}");
    assert_eq!(stored["telecom"][0]["use"], "home", "{snippet}: the patch kept the rest of the element: {stored}");
    assert_eq!(stored["address"][0]["city"], "Springfield", "{snippet}: the update before it kept: {stored}");
    assert_eq!(stored["gender"], "female", "{snippet}: {stored}");
    assert_eq!(stored["birthDate"], birth_date, "{snippet}: {stored}");
    assert_eq!(stored["name"][0]["family"], family.as_str(), "{snippet}: {stored}");
    assert_eq!(stored["identifier"][0]["value"], mrn.as_str(), "{snippet}: {stored}");

    // Conditional update: created (201), then the same resource updated (200, v2); then conditionally deleted.
    let cu = step("conditional-update");
    let made = cu["ids"][0].as_str().unwrap().to_owned();
    assert_eq!(cu["ids"][1], made.as_str(), "{snippet}: the second conditional update found the first: {cu}");
    assert_eq!(cu["created"], serde_json::json!([true, false]), "{snippet}: {cu}");
    assert_eq!(cu["versionId"], "2", "{snippet}: {cu}");
    let cd = step("conditional-delete");
    assert_eq!((&cd["id"], &cd["gone"]), (&Value::from(made.as_str()), &Value::Bool(true)), "{snippet}: {cd}");
    if let Some(status) = cd.get("status") {
        assert!([200, 204].contains(&status.as_u64().unwrap()), "{snippet}: {cd}");
    }
    let r = app.get(&front, &format!("/fhir/Patient/{made}")).await;
    assert_eq!(r.status(), 410, "{snippet}: the conditionally deleted patient reads 410");
    let (status, v2) = app.get_json(&front, &format!("/fhir/Patient/{made}/_history/2")).await;
    assert_eq!(status, 200, "{snippet}: history is kept: {v2}");
    assert_eq!((&v2["gender"], &v2["name"][0]["given"][0]), (&Value::from("female"), &Value::from("Grace")));
    let other = cu["mrn"].as_str().unwrap();
    assert_eq!(total(app, &front, &format!("Patient?identifier={MRN}|{other}")).await, 0, "{snippet}");

    // The transaction: every entry created (fhirpy's also a Practitioner and a CareTeam), every urn:uuid reference
    // stored as the new resource's id.
    let tx = step("transaction");
    assert_eq!(tx["type"], "transaction-response", "{snippet}: {tx}");
    let created_in = |bundle: &Value, rtype: &str| -> Vec<String> {
        let locations = bundle["location"].as_array().unwrap();
        let of_type = locations.iter().filter(|l| l.as_str().is_some_and(|l| l.contains(&format!("{rtype}/"))));
        of_type.map(|l| location_id(l, rtype)).collect()
    };
    let entries = tx["status"].as_array().unwrap().len();
    let codes: Vec<u16> = tx["status"].as_array().unwrap().iter().map(status_code).collect();
    assert_eq!(codes, vec![201; entries], "{snippet}: {tx}");
    let [tx_patient] = &created_in(tx, "Patient")[..] else { panic!("{snippet}: one Patient: {tx}") };
    let tx_patient = tx_patient.clone();
    let mut encounters = created_in(tx, "Encounter");
    let practitioners = created_in(tx, "Practitioner");
    let care_teams = created_in(tx, "CareTeam");
    assert_eq!(encounters.len(), 1, "{snippet}: {tx}");
    assert_eq!(1 + encounters.len() + practitioners.len() + care_teams.len(), entries, "{snippet}: {tx}");
    for etag in tx["etag"].as_array().unwrap() {
        assert_eq!(etag, "W/\"1\"", "{snippet}: {tx}");
    }
    let tx_mrn = tx["mrn"].as_str().unwrap();
    if let Some(again) = steps.get("transaction-again") {
        // The same transaction again: its ifNoneExist entry found the patient (200) and the new Encounter links to it.
        let codes: Vec<u16> = again["status"].as_array().unwrap().iter().map(status_code).collect();
        assert_eq!(codes, [200, 201], "{snippet}: {again}");
        assert_eq!(created_in(again, "Patient"), std::slice::from_ref(&tx_patient), "{snippet}: {again}");
        encounters.extend(created_in(again, "Encounter"));
    }
    assert_eq!(total(app, &front, &format!("Patient?identifier={MRN}|{tx_mrn}")).await, 1, "{snippet}");
    let practitioner = practitioners.first().map(|p| format!("Practitioner/{p}"));
    for encounter in &encounters {
        let (status, stored) = app.get_json(&front, &format!("/fhir/Encounter/{encounter}")).await;
        assert_eq!(status, 200, "{snippet}: {stored}");
        app.assert_valid(&stored);
        assert_eq!(stored["subject"]["reference"], format!("Patient/{tx_patient}"), "{snippet}: {stored}");
        if let Some(practitioner) = &practitioner {
            assert_eq!(
                stored["participant"][0]["individual"]["reference"],
                practitioner.as_str(),
                "{snippet}: {stored}"
            );
        }
    }
    for care_team in &care_teams {
        let (status, stored) = app.get_json(&front, &format!("/fhir/CareTeam/{care_team}")).await;
        assert_eq!(status, 200, "{snippet}: {stored}");
        app.assert_valid(&stored);
        assert_eq!(stored["subject"]["reference"], format!("Patient/{tx_patient}"), "{snippet}: {stored}");
        assert_eq!(stored["participant"][0]["member"]["reference"], practitioner.as_deref().unwrap(), "{snippet}");
    }
    if let Some(practitioner) = &practitioner {
        let (status, stored) = app.get_json(&front, &format!("/fhir/{practitioner}")).await;
        assert_eq!((status, &stored["name"][0]["family"]), (200, &Value::from("Osler")), "{snippet}: {stored}");
    }

    // The batch: each entry on its own; the Observation refused, the others done.
    let batch = step("batch");
    assert_eq!(batch["type"], "batch-response", "{snippet}: {batch}");
    let codes: Vec<u16> = batch["status"].as_array().unwrap().iter().map(status_code).collect();
    assert_eq!(codes, [201, 200, 403], "{snippet}: {batch}");
    let batch_patient = location_id(&batch["location"][0], "Patient");
    // Ada, Edith and Mary; Grace is deleted. No duplicates anywhere.
    assert_eq!(total(app, &front, &format!("Patient?family={family}")).await, 3, "{snippet}");

    // The audit trail: one event per interaction and per entry, by the service client's account.
    let mine = events_of(app, snippet, service);
    let ids_of = |kind: &str| -> std::collections::BTreeSet<String> {
        mine.iter()
            .filter(|e| e["kind"] == kind && e["outcome"] == "0")
            .map(|e| e["resource_id"].as_str().unwrap_or_else(|| panic!("{snippet}: {kind} names its resource: {e}")))
            .map(str::to_owned)
            .collect()
    };
    let count = |kind: &str, outcome: &str, resource: Option<&str>| {
        mine.iter()
            .filter(|e| e["kind"] == kind && e["outcome"] == outcome)
            .filter(|e| resource.is_none_or(|r| e["resource_id"] == r))
            .count()
    };
    let mut created: std::collections::BTreeSet<String> =
        [&id, &made, &tx_patient, &batch_patient].into_iter().cloned().collect();
    created.extend(encounters.iter().chain(&practitioners).chain(&care_teams).cloned());
    let audited = ids_of("create");
    assert_eq!(
        audited,
        created,
        "{snippet}: every created resource, nothing else (not audited as created: {:?}; audited, not created: {:?}; \
         the patient {id}, the conditional update's {made}, the transaction's {tx_patient} and {encounters:?}, the \
         batch's {batch_patient}): {mine:#?}",
        created.difference(&audited).collect::<Vec<_>>(),
        audited.difference(&created).collect::<Vec<_>>(),
    );
    assert_eq!(count("update", "0", Some(&id)), 1, "{snippet}: {mine:#?}");
    assert_eq!(count("update", "0", Some(&made)), 1, "{snippet}: the conditional update that matched: {mine:#?}");
    assert_eq!(count("update", "0", None), 2, "{snippet}: {mine:#?}");
    assert!(count("update", "4", Some(&id)) >= 1, "{snippet}: the stale update is audited as failed: {mine:#?}");
    let patches: Vec<&Value> = mine.iter().filter(|e| e["kind"] == "patch" && e["outcome"] == "0").collect();
    let versions: Vec<Option<i64>> = patches.iter().map(|e| e["resource_version"].as_i64()).collect();
    let expected = if merge.is_some() { vec![Some(3), Some(4)] } else { vec![Some(3)] };
    assert_eq!(versions, expected, "{snippet}: one event per patch, naming the version it made: {patches:#?}");
    for patched in &patches {
        assert_eq!(
            (&patched["resource_id"], &patched["patient"]),
            (&Value::from(id.as_str()), &Value::from(id.as_str()))
        );
    }
    if steps.contains_key("stale-patch") {
        assert!(count("patch", "4", Some(&id)) >= 1, "{snippet}: the stale patch is audited as failed: {mine:#?}");
    }
    assert_eq!(count("delete", "0", None), 1, "{snippet}: {mine:#?}");
    assert_eq!(count("delete", "0", Some(&made)), 1, "{snippet}: {mine:#?}");
    assert_eq!(count("transaction", "0", None), encounters.len(), "{snippet}: one event per transaction: {mine:#?}");
    assert_eq!(count("batch", "0", None), 1, "{snippet}: {mine:#?}");
    let in_compartment = encounters.iter().map(|e| ("Encounter", e)).chain(care_teams.iter().map(|c| ("CareTeam", c)));
    for (rtype, rid) in in_compartment {
        let event = mine
            .iter()
            .find(|e| e["kind"] == "create" && e["resource_id"] == rid.as_str())
            .unwrap_or_else(|| panic!("{snippet}: no create event for {rtype}/{rid}"));
        assert_eq!(event["resource_type"], rtype, "{snippet}: {event}");
        assert_eq!(event["patient"], tx_patient.as_str(), "{snippet}: the entry's event names its patient: {event}");
    }
    assert!(count("read", "0", Some(&id)) >= 1, "{snippet}: the batch's read entry: {mine:#?}");
    let refused: Vec<&Value> =
        mine.iter().filter(|e| e["kind"] == "create" && e["resource_type"] == "Observation").collect();
    assert_eq!(refused.len(), 1, "{snippet}: the batch's refused entry is audited once: {mine:#?}");
    assert_eq!(refused[0]["outcome"], "4", "{snippet}: {:?}", refused[0]);
    let trail = serde_json::to_string(&mine).unwrap();
    for value in [family.as_str(), mrn.as_str(), tx_mrn, other] {
        assert!(!trail.contains(value), "{snippet}: no search or resource value in the audit trail");
    }
}

both_backends!(fhirpy_writes_work, |app: TestApp| async move {
    let Some(python) = python_with("fhirpy") else { return };
    let client = service_client(&app, "fhirpy-writes");
    let steps = run_snippet(&app, &python, "fhirpy_writes.py", &client);
    check_writes(&app, "fhirpy_writes.py", &client.0, &steps).await;
});

both_backends!(fhir_kit_client_writes_work, |app: TestApp| async move {
    let Some(node) = node_with_fhir_kit_client() else { return };
    let client = service_client(&app, "fhir-kit-writes");
    let steps = run_snippet(&app, &node, "fhir_kit_client_writes.mjs", &client);
    for step in ["transaction-again", "stale-patch", "unversioned-patch"] {
        assert!(steps.contains_key(step), "{step}: {steps:#?}");
    }
    check_writes(&app, "fhir_kit_client_writes.mjs", &client.0, &steps).await;
});

/// The snippet files the guide must show, each in a block marked `<!-- snippet: PATH -->`.
const SNIPPETS: &[&str] = &[
    "tests/clients/fhirpy_example.py",
    "tests/clients/fhirclient_example.py",
    "tests/clients/fhir_kit_client_example.mjs",
    "tests/clients/fhirpy_writes.py",
    "tests/clients/fhir_kit_client_writes.mjs",
];

/// Each `<!-- snippet: PATH -->` marker with the content of the fenced block that follows it.
fn marked_blocks(guide: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut lines = guide.lines();
    while let Some(line) = lines.next() {
        let Some(path) = line.trim().strip_prefix("<!-- snippet:").and_then(|r| r.strip_suffix("-->")) else {
            continue;
        };
        let fence = lines.next().unwrap_or_else(|| panic!("no code block after the marker for {path}"));
        assert!(fence.starts_with("```"), "the marker for {path} must be followed by a code block, not {fence:?}");
        let mut body = String::new();
        for l in lines.by_ref() {
            if l == "```" {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        blocks.push((path.trim().to_owned(), body));
    }
    blocks
}

#[test]
fn guide_code_blocks_are_the_tested_snippet_files() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(root.join("docs/client-guide.md")).unwrap();
    let blocks = marked_blocks(&guide);
    for (path, body) in &blocks {
        let file = std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            *body == file,
            "docs/client-guide.md's block for {path} differs from the file: copy the file into the guide \
             (the file is what tests/api/clients.rs runs)"
        );
    }
    for path in SNIPPETS {
        assert!(blocks.iter().any(|(p, _)| p == path), "docs/client-guide.md shows no block for {path}");
    }
    // The pins the guide names are the pins the tests install.
    let requirements = std::fs::read_to_string(root.join("tests/clients/requirements.txt")).unwrap();
    let package: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("tests/clients/package.json")).unwrap()).unwrap();
    let pins = [
        format!("fhirpy {}", pin(&requirements, "fhirpy")),
        format!("fhirclient {}", pin(&requirements, "fhirclient")),
        format!("fhir-kit-client {}", package["dependencies"]["fhir-kit-client"].as_str().unwrap()),
    ];
    for p in &pins {
        assert!(guide.contains(p.as_str()), "docs/client-guide.md names `{p}`");
    }
}

fn pin<'a>(requirements: &'a str, name: &str) -> &'a str {
    requirements
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}==")))
        .unwrap_or_else(|| panic!("tests/clients/requirements.txt pins no {name}"))
}

#[test]
fn the_marker_parser_sees_blocks_and_their_content() {
    let md =
        "x\n<!-- snippet: a.py -->\n```python\nprint(1)\n\nprint(2)\n```\ntext\n<!-- snippet: b.mjs -->\n```js\n```\n";
    assert_eq!(
        marked_blocks(md),
        vec![("a.py".to_owned(), "print(1)\n\nprint(2)\n".to_owned()), ("b.mjs".to_owned(), String::new())]
    );
}
