//! Monitoring (CONTRACT §8): each rule fires at its threshold and not below, alerts are listed and
//! acknowledged by admin and auditor only, delivered to a real webhook receiver with a valid signature through
//! an outage, `incident contain` cuts an account off and `incident report` lists exactly what was touched.
//! No canary value reaches an alert, the webhook body or the alert's audit record.

use crate::helpers::{Backend, TestApp};
use crate::{both_backends, both_backends_with};
use carevault::audit::{Agent, AuditEvent, AuditKind, Outcome, purpose};
use carevault::clock::Clock;
use carevault::monitor::{self, Subject, rules};
use carevault::role::Role;
use carevault::store::schema::{audit_events, break_glass, resources};
use diesel::prelude::*;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;
use time::Duration;
use uuid::Uuid;

const SMALL: &str = "[monitor]\nfailed_logins_threshold = 4\nbulk_access_patients = 5\nbulk_access_window_secs = 600\n";

fn account_id(app: &TestApp, username: &str) -> String {
    let mut conn = app.state.db.conn().unwrap();
    carevault::auth::service::find_account(&mut conn, username).unwrap().unwrap().id
}

fn append(app: &TestApp, events: &[AuditEvent]) {
    let mut conn = app.state.db.conn().unwrap();
    carevault::audit::store::append(&mut conn, app.state.audit.sealer(), events).unwrap();
}

fn access(account: &str, kind: AuditKind, patient: Uuid, at: time::OffsetDateTime) -> AuditEvent {
    let params = if kind == AuditKind::Search { vec!["patient", "code"] } else { vec![] };
    AuditEvent::new(kind, at, Outcome::Success, Agent::user(account, None, Some(Role::Clinician)))
        .with_patient(patient)
        .with_resource("Observation", None, None)
        .with_purpose(purpose::TREAT)
        .with_query_params(params, |_| true)
}

async fn fail_login(app: &TestApp, username: &str) {
    let r = app
        .client
        .post(app.url("/auth/login"))
        .json(&json!({"username": username, "password": "wrong password, CANARY-PW"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

both_backends_with!(failed_logins_per_account_fire_at_the_threshold, SMALL, |app: TestApp| async move {
    app.add_user("dave", Role::Nurse, Some("6f1c1d7a-7a53-4d1e-9a51-7f3f0b7a0c11"), None);
    let dave = account_id(&app, "dave");
    for _ in 0..3 {
        fail_login(&app, "dave").await;
    }
    app.settle_monitor().await;
    assert!(app.alerts(rules::FAILED_LOGINS_ACCOUNT).is_empty(), "3 of 4: no alert");
    assert!(app.alerts(rules::FAILED_LOGINS_ADDRESS).is_empty());
    fail_login(&app, "dave").await;
    app.settle_monitor().await;
    let found = app.alerts(rules::FAILED_LOGINS_ACCOUNT);
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].subject.as_str(), found[0].count, found[0].severity.as_str()), (dave.as_str(), 4, "medium"));
    assert_eq!(found[0].window_secs, rules::FAILED_LOGIN_WINDOW_SECS);
    assert_eq!(found[0].delivery, "not-configured");
    let by_address = app.alerts(rules::FAILED_LOGINS_ADDRESS);
    assert_eq!((by_address.len(), by_address[0].subject.as_str()), (1, "127.0.0.1"));
    // One open alert per (rule, subject) per window: the fifth failure updates the count.
    fail_login(&app, "dave").await;
    app.settle_monitor().await;
    let found = app.alerts(rules::FAILED_LOGINS_ACCOUNT);
    assert_eq!((found.len(), found[0].count), (1, 5));
    // Every alert is audited, with the rule as the detail.
    let mut conn = app.state.db.conn().unwrap();
    let bodies: Vec<String> =
        audit_events::table.filter(audit_events::kind.eq("alert")).select(audit_events::body).load(&mut conn).unwrap();
    assert_eq!(bodies.len(), 2);
    assert!(bodies.iter().any(|b| b.contains("\"detail\":\"failed-logins-account\"")));
});

both_backends_with!(failed_logins_per_address_without_phi, SMALL, |app: TestApp| async move {
    // Four unknown names from one address: the address rule fires, no account rule (there is no account).
    for name in ["CANARY-Jane-Doe-1970", "x1", "x2"] {
        fail_login(&app, name).await;
    }
    app.settle_monitor().await;
    assert!(app.alerts(rules::FAILED_LOGINS_ADDRESS).is_empty());
    fail_login(&app, "x3").await;
    app.settle_monitor().await;
    let found = app.alerts(rules::FAILED_LOGINS_ADDRESS);
    assert_eq!((found.len(), found[0].subject.as_str(), found[0].count), (1, "127.0.0.1", 4));
    assert!(app.alerts(rules::FAILED_LOGINS_ACCOUNT).is_empty());
    // No canary in the alert as listed, its webhook payload or the audit trail of alerts.
    let admin = app.user("root", Role::Admin, None).await;
    let listed = app.client.get(app.url("/admin/alerts")).bearer_auth(&admin.access).send().await.unwrap();
    let text = listed.text().await.unwrap();
    assert!(text.contains("failed-logins-address") && !text.contains("CANARY"), "{text}");
    assert!(!found[0].payload().to_string().contains("CANARY"));
    let mut conn = app.state.db.conn().unwrap();
    let bodies: Vec<String> =
        audit_events::table.filter(audit_events::kind.eq("alert")).select(audit_events::body).load(&mut conn).unwrap();
    assert!(!bodies.is_empty() && bodies.iter().all(|b| !b.contains("CANARY")));
});

both_backends_with!(bulk_access_counts_distinct_patients_in_the_window, SMALL, |app: TestApp| async move {
    app.add_user("snoop", Role::Clinician, Some("6f1c1d7a-7a53-4d1e-9a51-7f3f0b7a0c12"), None);
    let snoop = account_id(&app, "snoop");
    let now = app.clock.now();
    // Three patients read 700 s ago: outside the 600 s window, they do not count.
    let old: Vec<AuditEvent> =
        (0..3).map(|_| access(&snoop, AuditKind::Read, Uuid::new_v4(), now - Duration::seconds(700))).collect();
    append(&app, &old);
    // Four distinct patients now, some of them many times.
    let patients: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let mut recent = Vec::new();
    for (i, p) in patients[..4].iter().enumerate() {
        for _ in 0..=i {
            recent.push(access(&snoop, AuditKind::Read, *p, now));
        }
    }
    append(&app, &recent);
    // Another user's patients never count for this one.
    append(&app, &[access("someone-else", AuditKind::Read, patients[4], now)]);
    app.settle_monitor().await;
    assert!(app.alerts(rules::BULK_ACCESS).is_empty(), "4 distinct of 5: no alert");
    app.clock.advance(Duration::seconds(10));
    append(&app, &[access(&snoop, AuditKind::Search, patients[4], app.clock.now())]);
    app.settle_monitor().await;
    let found = app.alerts(rules::BULK_ACCESS);
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].subject.as_str(), found[0].count, found[0].window_secs), (snoop.as_str(), 5, 600));
    assert_eq!(found[0].severity, "high");
});

both_backends!(break_glass_use_raises_one_alert, |app: TestApp| async move {
    let now = app.clock.now();
    let doc = Agent::user("acct-doc", None, Some(Role::Clinician));
    let other = Agent::user("acct-other", None, Some(Role::Clinician));
    let p = Uuid::new_v4();
    // A refused break-glass request and a normal read raise nothing.
    append(
        &app,
        &[
            AuditEvent::new(AuditKind::BreakGlass, now, Outcome::MinorFailure, other).with_patient(p),
            access("acct-doc", AuditKind::Read, p, now),
        ],
    );
    app.settle_monitor().await;
    assert!(app.alerts(rules::BREAK_GLASS).is_empty());
    append(
        &app,
        &[AuditEvent::new(AuditKind::BreakGlass, now, Outcome::Success, doc.clone())
            .with_patient(p)
            .with_purpose(purpose::BTG)],
    );
    app.settle_monitor().await;
    // Reads under the grant do not raise a second alert in the window.
    append(
        &app,
        &[AuditEvent::new(AuditKind::Read, now, Outcome::Success, doc).with_patient(p).with_purpose(purpose::BTG)],
    );
    app.settle_monitor().await;
    let found = app.alerts(rules::BREAK_GLASS);
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].subject.as_str(), found[0].window_secs), ("acct-doc", 3600));
});

// Break-glass needs a coded reason and a real justification, is capped per user and day (here 2), and every
// refused request is audited and raises the `break-glass-refused` alert.
both_backends_with!(
    break_glass_is_coded_capped_and_every_refusal_alerts,
    "break_glass_per_day = 2\n",
    |app: TestApp| async move {
        let w = app.world().await;
        let nurse = account_id(&app, "nurse");
        let bg = |body: Value| {
            let app = &app;
            let s = w.nurse.clone();
            async move {
                app.client.post(app.url("/auth/break-glass")).bearer_auth(&s.access).json(&body).send().await.unwrap()
            }
        };
        let bob = format!("Patient/{}", w.bob);
        let why = "patient unconscious in the emergency department";
        assert_eq!(bg(json!({"patient": bob, "reason": "need it"})).await.status(), 400, "too short");
        assert_eq!(bg(json!({"patient": bob, "code": "curiosity", "reason": why})).await.status(), 400, "unknown code");
        app.settle_monitor().await;
        let refused = app.alerts(rules::BREAK_GLASS_REFUSED);
        assert_eq!(refused.len(), 1, "one open alert per account and hour");
        assert_eq!(refused[0].subject.as_str(), nurse);
        assert_eq!(refused[0].count, 2, "both refusals, in the one alert");
        assert_eq!(bg(json!({"patient": bob, "code": "urgent-care", "reason": why})).await.status(), 201);
        assert_eq!(bg(json!({"patient": bob, "reason": why})).await.status(), 201, "the code defaults to emergency");
        let capped = bg(json!({"patient": bob, "code": "other", "reason": why})).await;
        assert_eq!(capped.status(), 429, "the third grant in a day is refused");
        assert!(capped.headers().get("retry-after").is_some());
        let bodies: Vec<String> = {
            let mut conn = app.state.db.conn().unwrap();
            audit_events::table
                .filter(audit_events::kind.eq("break-glass"))
                .order(audit_events::seq)
                .select(audit_events::body)
                .load(&mut conn)
                .unwrap()
        };
        assert_eq!(bodies.len(), 5, "every request, refused or granted, is one event");
        let granted: Vec<String> = bodies
            .iter()
            .filter_map(|b| serde_json::from_str::<Value>(b).unwrap()["detail"].as_str().map(str::to_owned))
            .filter(|d| d.starts_with("break-glass-granted"))
            .collect();
        assert_eq!(granted, ["break-glass-granted:urgent-care", "break-glass-granted:emergency"]);
        assert!(!bodies.iter().any(|b| b.contains("unconscious")), "the free text never enters the trail");
        // A day later the cap has room again.
        app.clock.advance(Duration::hours(25));
        let s = app.login_as("nurse").await;
        let r = app
            .client
            .post(app.url("/auth/break-glass"))
            .bearer_auth(&s.access)
            .json(&json!({"patient": bob, "reason": why}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
);

// The daily cap holds under concurrency: six simultaneous requests against a cap of two give exactly two grants.
both_backends_with!(
    break_glass_cap_holds_under_concurrent_requests,
    "break_glass_per_day = 2\n",
    |app: TestApp| async move {
        let w = app.world().await;
        let body = json!({"patient": format!("Patient/{}", w.bob), "reason": "patient unconscious in the emergency department"});
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let (client, url, token, body) =
                    (app.client.clone(), app.url("/auth/break-glass"), w.nurse.access.clone(), body.clone());
                tokio::spawn(
                    async move { client.post(url).bearer_auth(token).json(&body).send().await.unwrap().status() },
                )
            })
            .collect();
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap().as_u16());
        }
        statuses.sort_unstable();
        assert_eq!(statuses, [201, 201, 429, 429, 429, 429]);
    }
);

both_backends!(refresh_token_reuse_raises_an_alert, |app: TestApp| async move {
    let s = app.user("carol", Role::FrontDesk, None).await;
    let carol = account_id(&app, "carol");
    let refresh = |token: String| {
        let app = &app;
        async move {
            app.client
                .post(app.url("/auth/token"))
                .form(&[("grant_type", "refresh_token"), ("refresh_token", token.as_str())])
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(refresh(s.refresh.clone()).await, 200);
    app.settle_monitor().await;
    assert!(app.alerts(rules::REFRESH_TOKEN_REUSE).is_empty(), "a normal rotation is no alert");
    assert_eq!(refresh(s.refresh.clone()).await, 400);
    app.settle_monitor().await;
    let found = app.alerts(rules::REFRESH_TOKEN_REUSE);
    assert_eq!((found.len(), found[0].subject.as_str(), found[0].severity.as_str()), (1, carol.as_str(), "high"));
});

both_backends!(alerts_api_roles_filters_and_ack, |app: TestApp| async move {
    let now = app.clock.now();
    let raise = |rule, subject| {
        monitor::raise(&app.state.db, app.state.audit.sealer_arc(), &app.state.config, rule, subject, 1, now)
    };
    let a = raise(rules::DECRYPT_FAILURE, Subject::System("field-cipher")).await.unwrap().unwrap();
    raise(rules::BREAK_GLASS, Subject::Account("acct-1".into())).await.unwrap().unwrap();
    assert!(raise(rules::DECRYPT_FAILURE, Subject::System("field-cipher")).await.unwrap().is_none(), "deduped");
    let admin = app.user("root", Role::Admin, None).await;
    let auditor = app.user("audrey", Role::Auditor, None).await;
    let clinician = app.user("cleo", Role::Clinician, Some("6f1c1d7a-7a53-4d1e-9a51-7f3f0b7a0c13")).await;
    let get = |path: &'static str, token: Option<String>| {
        let app = &app;
        async move {
            let mut r = app.client.get(app.url(path));
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            r.send().await.unwrap()
        }
    };
    assert_eq!(get("/admin/alerts", None).await.status(), 401);
    assert_eq!(get("/admin/alerts", Some(clinician.access.clone())).await.status(), 403);
    for token in [&admin.access, &auditor.access] {
        let r = get("/admin/alerts", Some(token.clone())).await;
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["alerts"].as_array().unwrap().len(), 2);
    }
    let body: Value = get("/admin/alerts?severity=critical", Some(admin.access.clone())).await.json().await.unwrap();
    eprintln!("DEBUG {body}");
    eprintln!("DEBUG2 {}", get("/admin/alerts", Some(admin.access.clone())).await.status());
    eprintln!("DEBUG3 {}", get("/admin/alerts?rule=break-glass", Some(admin.access.clone())).await.status());
    let list = body["alerts"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["rule"], "decrypt-failure");
    assert_eq!(list[0]["subject"], "field-cipher");
    let body: Value = get("/admin/alerts?rule=break-glass", Some(admin.access.clone())).await.json().await.unwrap();
    assert_eq!(body["alerts"][0]["subject"], "acct-1");
    let body: Value =
        get("/admin/alerts?since=2026-03-01T09:00:01Z", Some(admin.access.clone())).await.json().await.unwrap();
    assert!(body["alerts"].as_array().unwrap().is_empty(), "raised before `since`");
    let bad = get("/admin/alerts?rule=CANARY-rule", Some(admin.access.clone())).await;
    assert_eq!(bad.status(), 400);
    assert!(!bad.text().await.unwrap().contains("CANARY"));
    // Acknowledge with a note; the note is stored encrypted.
    let ack = |id: String, token: String, note: &'static str| {
        let app = &app;
        async move {
            app.client
                .post(app.url(&format!("/admin/alerts/{id}/ack")))
                .bearer_auth(token)
                .json(&json!({ "note": note }))
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(ack(a.id.clone(), clinician.access.clone(), "no").await.status(), 403);
    let r = ack(a.id.clone(), auditor.access.clone(), "checked key ring, NOTE-CANARY").await;
    assert_eq!(r.status(), 200);
    let acked: Value = r.json().await.unwrap();
    assert_eq!(acked["ack_note"], "checked key ring, NOTE-CANARY");
    assert!(acked["acknowledged_at"].is_string());
    assert_eq!(ack(a.id.clone(), admin.access.clone(), "again").await.status(), 409);
    assert_eq!(ack(Uuid::new_v4().to_string(), admin.access.clone(), "x").await.status(), 404);
    assert_eq!(ack("not-a-uuid".into(), admin.access.clone(), "x").await.status(), 404);
    let mut conn = app.state.db.conn().unwrap();
    let stored = monitor::find(&mut conn, &a.id).unwrap().unwrap();
    assert!(stored.ack_note.unwrap().starts_with("cv1:"), "note encrypted at rest");
    let acks: Vec<String> = audit_events::table
        .filter(audit_events::body.like("%alert-acknowledged%"))
        .select(audit_events::body)
        .load(&mut conn)
        .unwrap();
    let outcomes: Vec<Value> =
        acks.iter().map(|b| serde_json::from_str::<Value>(b).unwrap()["outcome"].clone()).collect();
    // One acknowledgement; the repeated one (409) and the two unknown ids (404) are audited as failures.
    assert_eq!(outcomes.iter().filter(|o| *o == "0").count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| *o == "4").count(), 3, "{outcomes:?}");
    // Acknowledged: the same failure raises a new alert.
    drop(conn);
    assert!(raise(rules::DECRYPT_FAILURE, Subject::System("field-cipher")).await.unwrap().is_some());
});

/// A minimal HTTP receiver on 127.0.0.1: answers with the scripted statuses in turn (then 200) and records
/// each request's signature header and body.
/// Each request received: its signature header and its body.
type Seen = Arc<Mutex<Vec<(Option<String>, Vec<u8>)>>>;

struct Receiver {
    url: String,
    seen: Seen,
}

async fn receiver(script: Vec<u16>) -> Receiver {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        let mut script = script.into_iter();
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head_end, length) = loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break (None, 0);
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    break (Some(i + 4), len);
                }
            };
            let Some(start) = head_end else { continue };
            while buf.len() < start + length {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let head = String::from_utf8_lossy(&buf[..start]).to_string();
            let signature = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("x-carevault-signature").then(|| v.trim().to_owned())
            });
            record.lock().unwrap().push((signature, buf[start..start + length].to_vec()));
            let status = script.next().unwrap_or(200);
            let reply = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = sock.write_all(reply.as_bytes()).await;
            let _ = sock.shutdown().await;
        }
    });
    Receiver { url, seen }
}

async fn webhook_delivers_through_an_outage(backend: Backend) {
    let rx = receiver(vec![500]).await;
    let toml = format!("[alerts]\nwebhook_url = \"{}\"\nwebhook_secret = \"hook-secret-123\"\n", rx.url);
    let Some(app) = TestApp::spawn_with(backend, &toml).await else { return };
    // A refresh-token reuse (through the audit stream) raises the alert.
    let s = app.user("carol", Role::FrontDesk, None).await;
    for expected in [200, 400] {
        let r = app
            .client
            .post(app.url("/auth/token"))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", s.refresh.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), expected);
    }
    app.settle_monitor().await;
    let wait_for = |n: usize| {
        let (app, seen) = (&app, rx.seen.clone());
        async move {
            for _ in 0..200 {
                if seen.lock().unwrap().len() >= n {
                    return true;
                }
                app.state.monitor.poke();
                tokio::time::sleep(StdDuration::from_millis(50)).await;
            }
            false
        }
    };
    assert!(wait_for(1).await, "first attempt reaches the receiver");
    // The receiver failed: still pending, retried only after the backoff on the server's clock.
    let mut pending = app.alerts(rules::REFRESH_TOKEN_REUSE);
    for _ in 0..100 {
        if pending[0].attempts == 1 {
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(50)).await;
        pending = app.alerts(rules::REFRESH_TOKEN_REUSE);
    }
    assert_eq!((pending[0].delivery.as_str(), pending[0].attempts), ("pending", 1));
    tokio::time::sleep(StdDuration::from_millis(1500)).await;
    assert_eq!(rx.seen.lock().unwrap().len(), 1, "no retry before the backoff");
    app.clock.advance(Duration::seconds(6));
    assert!(wait_for(2).await, "retried after the backoff");
    let mut delivered = app.alerts(rules::REFRESH_TOKEN_REUSE);
    for _ in 0..100 {
        if delivered[0].delivery == "delivered" {
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(50)).await;
        delivered = app.alerts(rules::REFRESH_TOKEN_REUSE);
    }
    assert_eq!((delivered[0].delivery.as_str(), delivered[0].attempts), ("delivered", 2));
    let seen = rx.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "delivered once, no more");
    for (signature, body) in &seen {
        let signature = signature.as_deref().expect("signed");
        assert!(signature.starts_with("sha256="));
        assert!(monitor::sink::verify(b"hook-secret-123", body, signature), "valid HMAC-SHA256");
        assert!(!monitor::sink::verify(b"other-secret", body, signature));
        let json: Value = serde_json::from_slice(body).unwrap();
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["count", "id", "raised_at", "rule", "severity", "subject", "window_secs"]);
        assert_eq!(json["rule"], "refresh-token-reuse");
        assert_eq!(json["id"], delivered[0].id);
        assert!(!String::from_utf8_lossy(body).contains("carol"), "no username in the payload");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_delivers_through_an_outage_sqlite() {
    webhook_delivers_through_an_outage(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_delivers_through_an_outage_postgres() {
    webhook_delivers_through_an_outage(Backend::Postgres).await;
}

both_backends!(incident_contain_cuts_the_account_off, |app: TestApp| async move {
    let s = app.user("mallory", Role::Auditor, None).await;
    let bystander = app.user("bea", Role::Auditor, None).await;
    let mallory = account_id(&app, "mallory");
    let now = app.clock.now();
    {
        let mut conn = app.state.db.conn().unwrap();
        for (id, expires) in [("bg-live", now + Duration::minutes(30)), ("bg-old", now - Duration::minutes(1))] {
            diesel::insert_into(break_glass::table)
                .values((
                    break_glass::id.eq(id),
                    break_glass::account_id.eq(&mallory),
                    break_glass::patient_id.eq(Uuid::new_v4().to_string()),
                    break_glass::reason.eq("cv1:1:ciphertext"),
                    break_glass::created_at.eq(carevault::crypto::store::micros(now - Duration::hours(1))),
                    break_glass::expires_at.eq(carevault::crypto::store::micros(expires)),
                ))
                .execute(&mut conn)
                .unwrap();
        }
    }
    let status = |token: String| {
        let app = &app;
        async move { app.client.get(app.url("/admin/alerts")).bearer_auth(token).send().await.unwrap().status() }
    };
    assert_eq!(status(s.access.clone()).await, 200);
    let operator = Agent { user: Some("cli:test".into()), ..Agent::default() };
    let mut conn = app.state.db.conn().unwrap();
    let done =
        monitor::incident::contain(&mut conn, app.state.audit.sealer(), "mallory", operator.clone(), app.clock.now())
            .unwrap()
            .unwrap();
    assert_eq!((done.account.as_str(), done.sessions, done.break_glass_grants), (mallory.as_str(), 1, 1));
    assert!(
        monitor::incident::contain(&mut conn, app.state.audit.sealer(), "nobody", operator, app.clock.now())
            .unwrap()
            .is_none()
    );
    let revoked: Vec<(String, Option<i64>)> = break_glass::table
        .order(break_glass::id)
        .select((break_glass::id, break_glass::revoked_at))
        .load(&mut conn)
        .unwrap();
    assert!(revoked[0].1.is_some(), "live grant ended: {revoked:?}");
    assert!(revoked[1].1.is_none(), "expired grant left as it was");
    let audited: i64 = audit_events::table
        .filter(audit_events::body.like("%incident-contain%"))
        .count()
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(audited, 1);
    drop(conn);
    // Every replica refuses the token once its 5 s session cache has passed.
    app.clock.advance(Duration::seconds(6));
    assert_eq!(status(s.access.clone()).await, 401);
    assert_eq!(status(bystander.access.clone()).await, 200, "other accounts unaffected");
    let r = app
        .client
        .post(app.url("/auth/token"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", s.refresh.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "refresh token ended");
    // The disabled account's token still being presented raises an alert.
    app.settle_monitor().await;
    let found = app.alerts(rules::DISABLED_ACCOUNT_TOKEN);
    assert_eq!((found.len(), found[0].subject.as_str()), (1, mallory.as_str()));
    assert!(app.alerts(rules::FAILED_LOGINS_ACCOUNT).is_empty());
});

fn store_patient(app: &TestApp, id: Uuid, address: Value) {
    let id = id.to_string();
    let ct =
        app.state.cipher.encrypt_json(&carevault::crypto::FieldAad::new("Patient", &id, "address"), &address).unwrap();
    let content = json!({ "resourceType": "Patient", "id": id, "address": ct });
    let mut conn = app.state.db.conn().unwrap();
    diesel::insert_into(resources::table)
        .values((
            resources::resource_type.eq("Patient"),
            resources::id.eq(&id),
            resources::version_id.eq(1i64),
            resources::last_updated.eq(0i64),
            resources::deleted.eq(false),
            resources::patient_id.eq(Some(id.clone())),
            resources::key_version.eq(i32::try_from(app.state.cipher.active_version()).unwrap()),
            resources::content.eq(content.to_string()),
        ))
        .execute(&mut conn)
        .unwrap();
}

both_backends!(incident_report_lists_exactly_the_patients_touched, |app: TestApp| async move {
    app.add_user("snoop", Role::Clinician, Some("6f1c1d7a-7a53-4d1e-9a51-7f3f0b7a0c14"), None);
    let snoop = account_id(&app, "snoop");
    let t0 = app.clock.now();
    let (p1, p2, p3, p4, p5) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    store_patient(&app, p1, json!([{ "use": "home", "city": "CANARY-CITY", "state": "TX" }]));
    store_patient(&app, p2, json!([{ "use": "work", "state": "NY" }, { "use": "home", "state": "CA" }]));
    let mut events = vec![
        access(&snoop, AuditKind::Read, p1, t0 + Duration::minutes(1)),
        access(&snoop, AuditKind::Read, p1, t0 + Duration::minutes(2)),
        access(&snoop, AuditKind::Search, p1, t0 + Duration::minutes(3)),
        access(&snoop, AuditKind::Read, p2, t0 + Duration::minutes(4)),
        // Outside the window, refused, or someone else's: not in the report.
        access(&snoop, AuditKind::Read, p3, t0 - Duration::minutes(1)),
        access(&snoop, AuditKind::Read, p4, t0 + Duration::hours(2)),
        access("someone-else", AuditKind::Read, p5, t0 + Duration::minutes(5)),
    ];
    let mut denied = access(&snoop, AuditKind::Read, p5, t0 + Duration::minutes(5));
    denied.outcome = Outcome::MinorFailure;
    events.push(denied);
    append(&app, &events);
    let operator = Agent { user: Some("cli:test".into()), ..Agent::default() };
    let mut conn = app.state.db.conn().unwrap();
    let discovered = time::macros::date!(2026 - 03 - 02);
    let report =
        monitor::incident::report(&app.state, &mut conn, "snoop", t0, t0 + Duration::hours(1), discovered, operator)
            .unwrap()
            .unwrap();
    let mut expected = vec![(p1.to_string(), 3u64), (p2.to_string(), 1u64)];
    expected.sort();
    let got: Vec<(String, u64)> = report.patients.iter().map(|p| (p.patient.clone(), p.accesses)).collect();
    assert_eq!(got, expected);
    assert_eq!((report.total_patients, report.total_accesses), (2, 4));
    let first = report.patients.iter().find(|p| p.patient == p1.to_string()).unwrap();
    assert_eq!(first.interactions.get("read"), Some(&2));
    assert_eq!(first.interactions.get("search"), Some(&1));
    assert!(first.search_params.contains("code") && first.resource_types.contains("Observation"));
    assert_eq!(report.by_state.get("TX"), Some(&1));
    assert_eq!(report.by_state.get("CA"), Some(&1), "home address wins");
    assert_eq!(report.duties.individuals, 2);
    assert_eq!(report.duties.individuals_by, time::macros::date!(2026 - 05 - 01));
    assert!(matches!(report.duties.hhs, monitor::incident::HhsDuty::AnnualLog { .. }));
    assert!(report.duties.media_states.is_empty());
    let json = serde_json::to_string(&report).unwrap();
    assert!(!json.contains("CANARY"), "only the State leaves the decryption");
    assert!(report.summary().contains("2 patient(s)"));
    // Each address decryption is audited against its patient.
    let audited: Vec<Option<String>> = audit_events::table
        .filter(audit_events::kind.eq("export"))
        .select(audit_events::patient_id)
        .load(&mut conn)
        .unwrap();
    assert_eq!(audited.iter().filter(|p| p.is_some()).count(), 2);
    assert!(audited.contains(&Some(p1.to_string())) && audited.contains(&Some(p2.to_string())));
    assert!(
        monitor::incident::report(&app.state, &mut conn, "nobody", t0, t0, discovered, Agent::default())
            .unwrap()
            .is_none()
    );
});

/// Runs the `carevault` binary against this test's database and keys.
fn cli(app: &TestApp, args: &[&str]) -> std::process::Output {
    use secrecy::ExposeSecret;
    let url = match app.state.config.database().unwrap() {
        carevault::config::DatabaseTarget::Sqlite(path) => format!("sqlite://{}", path.display()),
        carevault::config::DatabaseTarget::Postgres(url) => url.0.expose_secret().to_owned(),
    };
    let config = app.dir.path().join("cli.toml");
    std::fs::write(&config, format!("database_url = \"{url}\"\n")).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_carevault"))
        .arg("--data-dir")
        .arg(app.dir.path())
        .arg("--config")
        .arg(&config)
        .args(args)
        .env_remove("CAREVAULT_LOG")
        .output()
        .unwrap()
}

both_backends!(incident_commands_from_the_cli, |app: TestApp| async move {
    app.add_user("snoop", Role::Clinician, Some("6f1c1d7a-7a53-4d1e-9a51-7f3f0b7a0c15"), None);
    let snoop = account_id(&app, "snoop");
    let p = Uuid::new_v4();
    // The CLI reads the wall clock: events in a fixed past window.
    let at = time::macros::datetime!(2026-01-10 12:00 UTC);
    append(&app, &[access(&snoop, AuditKind::Read, p, at), access(&snoop, AuditKind::Read, p, at)]);
    let out = cli(
        &app,
        &[
            "incident",
            "report",
            "--user",
            "snoop",
            "--since",
            "2026-01-10",
            "--until",
            "2026-01-11",
            "--discovered",
            "2026-01-12",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["total_patients"], 1);
    assert_eq!(report["patients"][0]["patient"], p.to_string());
    assert_eq!(report["patients"][0]["accesses"], 2);
    assert_eq!(report["by_state"]["unknown"], 1);
    assert_eq!(report["duties"]["individuals_by"], "2026-03-13");
    let human = cli(&app, &["incident", "report", "--user", "snoop", "--since", "2026-01-10", "--until", "2026-01-11"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("touched 1 patient(s), 2 access(es)"));
    let out = cli(&app, &["incident", "contain", "--user", "snoop", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["account"], snoop);
    let mut conn = app.state.db.conn().unwrap();
    assert!(carevault::auth::service::find_account(&mut conn, "snoop").unwrap().unwrap().disabled);
    let missing = cli(&app, &["incident", "contain", "--user", "nobody"]);
    assert!(!missing.status.success());
});
