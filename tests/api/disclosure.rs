//! The one-path pipeline (issue 13): every audit event names every patient its response disclosed (search,
//! history, `$everything`, `_id`), purpose BTG wherever only a break-glass grant reached the data, every refused
//! request on every route leaves exactly one event, and AuditEvent search answers exactly from SQL.

use crate::both_backends_with;
use crate::helpers::{Session, TestApp};
use carevault::audit::{Agent, AuditEvent, AuditKind, Outcome, purpose};
use carevault::monitor::{self, AlertFilter, rules};
use carevault::role::Role;
use carevault::store::schema::{audit_events, audit_head};
use diesel::prelude::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration as StdDuration;
use time::Duration;
use uuid::Uuid;

const SMALL: &str = "[monitor]\nbulk_access_patients = 5\nbulk_access_window_secs = 600\n";

/// The newest audit event of a request (alerts the rule engine raises meanwhile are skipped).
/// Events recorded so far, leaving out the alerts the rule engine appends on its own schedule (a refused
/// break-glass request raises one).
fn request_events(app: &TestApp) -> i64 {
    let mut conn = app.state.db.conn().unwrap();
    audit_events::table.filter(audit_events::kind.ne("alert")).count().get_result(&mut conn).unwrap()
}

fn last_event(app: &TestApp) -> AuditEvent {
    let mut conn = app.state.db.conn().unwrap();
    let body: String = audit_events::table
        .filter(audit_events::kind.ne("alert"))
        .order(audit_events::seq.desc())
        .select(audit_events::body)
        .first(&mut conn)
        .unwrap();
    serde_json::from_str(&body).unwrap()
}

fn account_id(app: &TestApp, username: &str) -> String {
    let mut conn = app.state.db.conn().unwrap();
    carevault::auth::service::find_account(&mut conn, username).unwrap().unwrap().id
}

/// Who ran which interaction, per the auditor's view of one patient's `$access-report`.
async fn report_entries(app: &TestApp, auditor: &Session, patient: &str) -> Vec<(String, String)> {
    let (status, report) = app.get_json(auditor, &format!("/fhir/Patient/{patient}/$access-report")).await;
    assert_eq!(status, 200, "{report}");
    report["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "access")
        .map(|p| {
            let part = |name: &str| p["part"].as_array().unwrap().iter().find(|x| x["name"] == name).cloned();
            let who = part("who").map(|w| w["valueString"].as_str().unwrap().to_owned()).unwrap_or_default();
            let how = part("interaction").map(|w| w["valueCoding"]["code"].as_str().unwrap().to_owned()).unwrap();
            (who, how)
        })
        .collect()
}

fn ids_in(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|e| e.iter().map(|x| x["resource"]["id"].as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

both_backends_with!(a_search_names_every_patient_it_disclosed, SMALL, |app: TestApp| async move {
    let w = app.world().await;
    for i in 0..6 {
        app.create(&w.front, json!({"resourceType":"Patient","name":[{"family":format!("Extra{i}")}]})).await;
    }
    // Billing pages through every patient in one search (SSNs included in its view).
    let (status, bundle) = app.get_json(&w.billing, "/fhir/Patient?_count=100").await;
    assert_eq!(status, 200);
    let returned = ids_in(&bundle);
    assert_eq!(returned.len(), 8, "alice, bob and six more");
    let event = last_event(&app);
    assert_eq!(event.kind, AuditKind::Search);
    let named: BTreeSet<String> = event.disclosed().iter().map(Uuid::to_string).collect();
    assert_eq!(named, returned.iter().cloned().collect::<BTreeSet<_>>(), "the event names every returned patient");

    // The incident report for billing lists every one of them.
    let billing = account_id(&app, "billing");
    let mut conn = app.state.db.conn().unwrap();
    let now = app.state.clock.now();
    let report = monitor::incident::report(
        &app.state,
        &mut conn,
        "billing",
        now - Duration::hours(1),
        now + Duration::hours(1),
        now.date(),
        Agent { user: Some("cli:test".into()), ..Agent::default() },
    )
    .unwrap()
    .unwrap();
    let in_report: BTreeSet<String> = report.patients.iter().map(|p| p.patient.clone()).collect();
    assert_eq!(in_report, returned.iter().cloned().collect::<BTreeSet<_>>());
    drop(conn);

    // The bulk-access rule (threshold 5 distinct patients) fires on the one search.
    let head: i64 = {
        let mut conn = app.state.db.conn().unwrap();
        audit_head::table.select(audit_head::seq).first(&mut conn).unwrap()
    };
    assert!(app.state.monitor.wait_processed(head, StdDuration::from_secs(20)).await);
    let alerts = {
        let mut conn = app.state.db.conn().unwrap();
        monitor::list(&mut conn, &AlertFilter { rule: Some(rules::BULK_ACCESS), limit: 100, ..AlertFilter::default() })
            .unwrap()
    };
    assert!(
        alerts.iter().any(|a| a.payload().to_string().contains(&billing)),
        "bulk-access alert for billing: {alerts:?}"
    );

    // Each returned patient's access report lists billing's search.
    for id in &returned {
        let entries = report_entries(&app, &w.auditor, id).await;
        assert!(entries.contains(&("billing".into(), "search".into())), "{id}: {entries:?}");
    }

    // `_id` searches, history and $everything name their patient too.
    let (status, _) = app.get_json(&w.front, &format!("/fhir/Patient?_id={}", w.bob)).await;
    assert_eq!(status, 200);
    assert_eq!(last_event(&app).disclosed(), [Uuid::parse_str(&w.bob).unwrap()]);
    let (status, _) = app.get_json(&w.front, &format!("/fhir/Patient/{}/_history", w.alice)).await;
    assert_eq!(status, 200);
    let (status, _) = app.get_json(&w.doc, &format!("/fhir/Patient/{}/$everything", w.alice)).await;
    assert_eq!(status, 200);
    let bob = report_entries(&app, &w.auditor, &w.bob).await;
    assert!(bob.contains(&("front".into(), "search".into())), "{bob:?}");
    let alice = report_entries(&app, &w.auditor, &w.alice).await;
    assert!(alice.contains(&("front".into(), "history".into())), "{alice:?}");
    assert!(alice.contains(&("doc".into(), "everything".into())), "{alice:?}");
    // A search that returns nobody names nobody.
    let (status, _) = app.get_json(&w.billing, "/fhir/Patient?family=Nobody-Here").await;
    assert_eq!(status, 200);
    assert!(last_event(&app).disclosed().is_empty());
});

both_backends_with!(break_glass_access_is_btg_on_every_interaction, "", |app: TestApp| async move {
    let w = app.world().await;
    let r = app
        .post(
            &w.other_doc,
            "/auth/break-glass",
            &json!({"patient":format!("Patient/{}", w.alice),"reason":"unconscious in the ED"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let alice = Uuid::parse_str(&w.alice).unwrap();
    for path in [
        format!("/fhir/Patient?_id={}", w.alice),
        format!("/fhir/Patient/{}", w.alice),
        format!("/fhir/Patient/{}/_history", w.alice),
        format!("/fhir/Patient/{}/$everything", w.alice),
        format!("/fhir/CareTeam?patient={}", w.alice),
    ] {
        let (status, body) = app.get_json(&w.other_doc, &path).await;
        assert_eq!(status, 200, "{path}: {body}");
        let e = last_event(&app);
        assert_eq!(e.purpose_of_use.as_deref(), Some(purpose::BTG), "{path}");
        assert_eq!(e.disclosed(), [alice], "{path}");
    }
    // The care-team clinician reading the same patient is TREAT.
    let (status, _) = app.get_json(&w.doc, &format!("/fhir/Patient?_id={}", w.alice)).await;
    assert_eq!(status, 200);
    assert_eq!(last_event(&app).purpose_of_use.as_deref(), Some(purpose::TREAT));
});

/// Who asks, how, where, with which body; the status and the audit kind expected.
type Refusal<'a> = (&'a Session, reqwest::Method, String, Option<Value>, u16, AuditKind);

both_backends_with!(every_refusal_on_every_route_leaves_exactly_one_event, "", |app: TestApp| async move {
    let w = app.world().await;
    let some_event = last_event(&app).id;
    let refusals: Vec<Refusal<'_>> = vec![
        (
            &w.front,
            reqwest::Method::POST,
            "/auth/break-glass".into(),
            Some(json!({"patient":format!("Patient/{}", w.alice),"reason":"I would like to look"})),
            403,
            AuditKind::BreakGlass,
        ),
        (
            &w.doc,
            reqwest::Method::GET,
            format!("/fhir/Patient/{}/$access-report", w.alice),
            None,
            403,
            AuditKind::AccessReport,
        ),
        (&w.nurse, reqwest::Method::GET, "/admin/alerts".into(), None, 403, AuditKind::Admin),
        (
            &w.nurse,
            reqwest::Method::POST,
            format!("/admin/alerts/{}/ack", Uuid::new_v4()),
            Some(json!({"note":"x"})),
            403,
            AuditKind::Admin,
        ),
        (&w.billing, reqwest::Method::GET, "/fhir/AuditEvent".into(), None, 403, AuditKind::Search),
        (&w.billing, reqwest::Method::GET, format!("/fhir/AuditEvent/{some_event}"), None, 403, AuditKind::Read),
        (
            &w.front,
            reqwest::Method::GET,
            format!("/fhir/Observation?patient={}", w.alice),
            None,
            403,
            AuditKind::Search,
        ),
        (&w.other_doc, reqwest::Method::GET, format!("/fhir/Patient/{}", w.alice), None, 404, AuditKind::Read),
        (&w.admin, reqwest::Method::GET, "/admin/alerts?severity=nonsense".into(), None, 400, AuditKind::Admin),
    ];
    for (who, method, path, body, status, kind) in refusals {
        let before = request_events(&app);
        let mut rb = app.client.request(method.clone(), app.url(&path)).bearer_auth(&who.access);
        if let Some(b) = body {
            rb = rb.header("content-type", "application/json").body(b.to_string());
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        assert_eq!(request_events(&app) - before, 1, "{method} {path}: exactly one event");
        let e = last_event(&app);
        assert_eq!((e.kind, e.outcome), (kind, Outcome::MinorFailure), "{method} {path}");
        assert!(e.disclosed().is_empty(), "a refusal discloses nobody");
    }
    // A revocation of a token nobody holds is not a user's success: nothing is recorded.
    let before = app.audit_count().await;
    for _ in 0..5 {
        let r = app
            .client
            .post(app.url("/auth/revoke"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("token=garbage-token-value")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(app.audit_count().await, before, "garbage revocations leave no event");
    // A real revocation is recorded once.
    let r = app
        .client
        .post(app.url("/auth/revoke"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", w.nurse.refresh))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(app.audit_count().await, before + 1);
    assert_eq!(last_event(&app).kind, AuditKind::Logout);
});

/// The account id of the seeded events.
const SEEDED: &str = "00000000-0000-0000-0000-00000000004d";

/// Seeds `n` events over `n` seconds from `t0`, alternating read / search / create kinds and two patients.
fn seed_trail(app: &TestApp, n: usize, t0: time::OffsetDateTime) {
    let (p1, p2) = (Uuid::from_u128(1), Uuid::from_u128(2));
    let mut conn = app.state.db.conn().unwrap();
    let mut batch = Vec::with_capacity(5000);
    for i in 0..n {
        let kind = [AuditKind::Read, AuditKind::Search, AuditKind::Create][i % 3];
        let at = t0 + Duration::seconds(i64::try_from(i).unwrap());
        let agent = Agent::user(SEEDED, None, Some(Role::Clinician));
        let e = AuditEvent::new(kind, at, Outcome::Success, agent)
            .with_patient(if i % 2 == 0 { p1 } else { p2 })
            .with_purpose(purpose::TREAT);
        batch.push(e);
        if batch.len() == 5000 {
            carevault::audit::store::append(&mut conn, app.state.audit.sealer(), &batch).unwrap();
            batch.clear();
        }
    }
    carevault::audit::store::append(&mut conn, app.state.audit.sealer(), &batch).unwrap();
}

async fn count(app: &TestApp, s: &Session, query: &str) -> u64 {
    let (status, b) = app.get_json(s, &format!("/fhir/AuditEvent?{query}&_summary=count")).await;
    assert_eq!(status, 200, "{query}: {b}");
    b["total"].as_u64().unwrap()
}

both_backends_with!(audit_event_search_is_exact_on_200k_events, "", |app: TestApp| async move {
    let auditor = app.user("auditor", Role::Auditor, None).await;
    let t0 = time::macros::datetime!(2025-01-01 00:00:00 UTC);
    const N: usize = 200_000;
    seed_trail(&app, N, t0);
    let cut = t0 + Duration::seconds(150_000);
    let at = |t: time::OffsetDateTime| t.format(&time::format_description::well_known::Rfc3339).unwrap();
    let enc = |s: String| s.replace('+', "%2B");
    // Strictly before the cut: events 0..150_000.
    assert_eq!(count(&app, &auditor, &format!("date=lt{}", enc(at(cut)))).await, 150_000);
    assert_eq!(count(&app, &auditor, &format!("date=ge{}&agent={SEEDED}", enc(at(cut)))).await, (N - 150_000) as u64);
    assert_eq!(
        count(&app, &auditor, &format!("date=ge{}&date=lt{}", enc(at(cut)), enc(at(t0 + Duration::days(365))))).await,
        (N - 150_000) as u64
    );
    let day2 = t0 + Duration::days(1);
    assert_eq!(count(&app, &auditor, &format!("date={}", day2.date())).await, 86_400);
    // Reads and searches are action R / E; creates C: a third each (event kinds alternate).
    assert_eq!(count(&app, &auditor, &format!("action=C&agent={SEEDED}")).await, (N / 3) as u64);
    assert_eq!(
        count(&app, &auditor, &format!("action=C&date=lt{}&agent={SEEDED}", enc(at(t0 + Duration::seconds(300)))))
            .await,
        100
    );
    assert_eq!(count(&app, &auditor, &format!("patient={}&agent={SEEDED}", Uuid::from_u128(2))).await, (N / 2) as u64);
    // A page: newest first, exactly _count entries, a next link that continues below it.
    let (status, page) =
        app.get_json(&auditor, &format!("/fhir/AuditEvent?agent={SEEDED}&date=lt{}&_count=5", enc(at(cut)))).await;
    assert_eq!(status, 200);
    let entries = page["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 5);
    let recorded: Vec<&str> = entries.iter().map(|e| e["resource"]["recorded"].as_str().unwrap()).collect();
    assert_eq!(recorded[0], at(cut - Duration::seconds(1)).replace("+00:00", "Z"));
    let next = page["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next").unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = next.split_once("/fhir/").map(|(_, p)| format!("/fhir/{p}")).unwrap();
    let (status, page2) = app.get_json(&auditor, &path).await;
    assert_eq!(status, 200);
    let first2 = page2["entry"][0]["resource"]["recorded"].as_str().unwrap().to_owned();
    assert_eq!(first2, at(cut - Duration::seconds(6)).replace("+00:00", "Z"));
});
