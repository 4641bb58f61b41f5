//! OWASP API Security Top 10 (2023): the risks the other files did not cover yet, one test (or two) per risk.
//! The matrix naming every test per risk is in docs/security-testing.md.

use crate::both_backends;
use crate::helpers::TestApp;
use serde_json::{Value, json};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

fn b64(v: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

// API3 Broken Object Property Level Authorization: properties the server owns (id, meta.versionId,
// meta.lastUpdated) cannot be mass-assigned by a client, on create or update.
both_backends!(api3_server_owned_properties_cannot_be_mass_assigned, |app: TestApp| async move {
    let w = app.world().await;
    let body = json!({"resourceType": "Patient", "id": "attacker-chosen", "name": [{"family": "Mass"}],
        "meta": {"versionId": "42", "lastUpdated": "1999-01-01T00:00:00Z"}});
    let r = app.post(&w.front, "/fhir/Patient", &body).await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_ne!(id, "attacker-chosen");
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "the server assigns the id: {id}");
    assert_eq!(created["meta"]["versionId"], "1");
    assert!(created["meta"]["lastUpdated"].as_str().unwrap().starts_with("2026-03-01"), "{created}");
    let (status, _) = app.get_json(&w.front, "/fhir/Patient/attacker-chosen").await;
    assert_eq!(status, 404);
    // On update: the stored version decides, not the body's meta.
    let update = json!({"resourceType": "Patient", "id": id, "name": [{"family": "Mass2"}],
        "meta": {"versionId": "7", "lastUpdated": "1999-01-01T00:00:00Z"}});
    let r = app.put(&w.front, &format!("/fhir/Patient/{id}"), Some("1"), &update).await;
    assert_eq!(r.status(), 200);
    let updated: Value = r.json().await.unwrap();
    assert_eq!(updated["meta"]["versionId"], "2");
    assert!(updated["meta"]["lastUpdated"].as_str().unwrap().starts_with("2026-03-01"), "{updated}");
});

// API3 on writes, by role: a front-desk user may write demographics only; a clinical element smuggled into a
// Patient write, and an Encounter diagnosis (not a scheduling field), are never stored for them.
both_backends!(api3_a_role_cannot_write_properties_outside_its_write_mask, |app: TestApp| async move {
    let w = app.world().await;
    let (_, alice) = app.get_json(&w.front, &format!("/fhir/Patient/{}", w.alice)).await;
    let version = alice["meta"]["versionId"].as_str().unwrap().to_owned();
    let mut smuggled = alice.clone();
    smuggled["maritalStatus"] = json!({"text": "Smuggled"});
    smuggled["generalPractitioner"] = json!([{"reference": format!("Practitioner/{}", w.other_practitioner)}]);
    smuggled["deceasedBoolean"] = json!(true);
    let r = app.put(&w.front, &format!("/fhir/Patient/{}", w.alice), Some(&version), &smuggled).await;
    let status = r.status().as_u16();
    assert!(matches!(status, 200 | 400 | 403), "{status}");
    // The clinician on alice's care team sees every clinical Patient element: none of them was written.
    let (s, seen) = app.get_json(&w.doc, &format!("/fhir/Patient/{}", w.alice)).await;
    assert_eq!(s, 200);
    for element in ["maritalStatus", "generalPractitioner", "deceasedBoolean"] {
        assert!(seen.get(element).is_none(), "front desk wrote {element} (answer {status}): {seen}");
    }
    let enc = json!({"resourceType": "Encounter", "status": "planned",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": format!("Patient/{}", w.alice)},
        "reasonCode": [{"text": "Smuggled reason"}],
        "diagnosis": [{"condition": {"reference": "Condition/00000000-0000-4000-8000-000000000001"}}]});
    let r = app.post(&w.front, "/fhir/Encounter", &enc).await;
    let status = r.status().as_u16();
    if status == 201 {
        let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
        let (s, seen) = app.get_json(&w.doc, &format!("/fhir/Encounter/{id}")).await;
        assert_eq!(s, 200);
        assert!(
            seen.get("reasonCode").is_none() && seen.get("diagnosis").is_none(),
            "front desk wrote clinical fields: {seen}"
        );
    } else {
        assert!(matches!(status, 400 | 403), "{status}");
    }
});

// API4 Unrestricted Resource Consumption: the page size is capped, a deeply nested body and a long query are
// refused with 4xx (never a crash or a 5xx), and the server answers normally afterwards.
both_backends!(api4_page_size_nesting_and_query_length_are_bounded, |app: TestApp| async move {
    let w = app.world().await;
    for i in 0..105 {
        app.create(&w.front, json!({"resourceType": "Patient", "name": [{"family": format!("Many{i}")}]})).await;
    }
    let (s, bundle) = app.get_json(&w.front, "/fhir/Patient?_count=1000000").await;
    assert_eq!(s, 200);
    let entries = bundle["entry"].as_array().map_or(0, Vec::len);
    assert!(entries <= 100, "{entries} entries for _count=1000000");
    let deep = format!("{{\"resourceType\":\"Patient\",\"extension\":{}{}}}", "[".repeat(200_000), "]".repeat(200_000));
    let r = app
        .client
        .post(app.url("/fhir/Patient"))
        .bearer_auth(&w.front.access)
        .header("content-type", "application/fhir+json")
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a 400 KB nesting");
    let long = format!("/fhir/Patient?name={}", "a".repeat(16 * 1024));
    let started = std::time::Instant::now();
    let r = app.get(&w.front, &long).await;
    assert!(matches!(r.status().as_u16(), 200 | 400 | 414 | 431), "a 16 KiB query: {}", r.status());
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "a 16 KiB query took {:?}", started.elapsed());
    let (s, _) = app.get_json(&w.front, &format!("/fhir/Patient/{}", w.bob)).await;
    assert_eq!(s, 200, "the server still answers");
});

// API5 Broken Function Level Authorization: over HTTP, each role is refused the functions of another.
both_backends!(api5_functions_of_other_roles_are_refused, |app: TestApp| async move {
    let w = app.world().await;
    let alerts = |s: &crate::helpers::Session| {
        let (client, url, token) = (app.client.clone(), app.url("/admin/alerts"), s.access.clone());
        async move { client.get(url).bearer_auth(token).send().await.unwrap().status().as_u16() }
    };
    for s in [&w.front, &w.doc, &w.nurse, &w.billing, &w.alice_user] {
        assert_eq!(alerts(s).await, 403, "only admins and auditors read alerts");
    }
    assert_eq!(alerts(&w.admin).await, 200);
    assert_eq!(alerts(&w.auditor).await, 200);
    let ack = app
        .client
        .post(app.url("/admin/alerts/00000000-0000-4000-8000-000000000000/ack"))
        .bearer_auth(&w.alice_user.access)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(ack, 403);
    // Writes by read-only roles, PHI for admin, the audit trail for the front desk, care teams by clinicians.
    let patient = json!({"resourceType": "Patient", "name": [{"family": "Nope"}]});
    for s in [&w.billing, &w.alice_user, &w.auditor, &w.admin, &w.nurse] {
        assert_eq!(app.post(s, "/fhir/Patient", &patient).await.status(), 403);
    }
    assert_eq!(app.get(&w.admin, &format!("/fhir/Patient/{}", w.alice)).await.status(), 403);
    assert_eq!(app.get(&w.front, "/fhir/AuditEvent").await.status(), 403);
    let team = json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": format!("Patient/{}", w.bob)},
        "participant": [{"member": {"reference": format!("Practitioner/{}", w.doc_practitioner)}}]});
    assert_eq!(app.post(&w.doc, "/fhir/CareTeam", &team).await.status(), 403, "a clinician assigning themself");
    let del = app
        .client
        .delete(app.url(&format!("/fhir/Patient/{}", w.alice)))
        .bearer_auth(&w.doc.access)
        .send()
        .await
        .unwrap();
    assert!(matches!(del.status().as_u16(), 403 | 404), "{}", del.status());
});

// API6 Unrestricted Access to Sensitive Business Flows: there is no self-service account creation or password
// reset over HTTP (accounts come from `carevault users add` or the OIDC provider), and break-glass is refused
// to the roles without it. (Break-glass caps and rate limits: monitor::break_glass_is_coded_capped_….)
both_backends!(api6_no_self_service_account_flows_and_break_glass_only_for_care_roles, |app: TestApp| async move {
    let w = app.world().await;
    let signup = json!({"username": "mallory", "password": "correct horse battery staple 99", "role": "admin"});
    for path in [
        "/auth/register",
        "/auth/signup",
        "/auth/users",
        "/admin/users",
        "/admin/accounts",
        "/users",
        "/auth/password-reset",
        "/auth/reset",
        "/fhir/Account",
    ] {
        let r = app.client.post(app.url(path)).json(&signup).send().await.unwrap();
        assert!(matches!(r.status().as_u16(), 401 | 404 | 405), "{path}: {}", r.status());
        let r = app.client.post(app.url(path)).bearer_auth(&w.admin.access).json(&signup).send().await.unwrap();
        assert!(matches!(r.status().as_u16(), 403..=405), "{path} as admin: {}", r.status());
    }
    let r = app
        .client
        .post(app.url("/auth/login"))
        .json(&json!({"username": "mallory", "password": signup["password"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no account was created");
    let bg = json!({"patient": format!("Patient/{}", w.bob), "code": "emergency",
        "reason": "Unconscious patient in the emergency department"});
    for s in [&w.front, &w.billing, &w.admin, &w.auditor, &w.alice_user] {
        let r = app.client.post(app.url("/auth/break-glass")).bearer_auth(&s.access).json(&bg).send().await.unwrap();
        assert_eq!(r.status(), 403);
    }
});

/// A TCP listener on 127.0.0.1 that counts the connections it is offered.
fn listener() -> (u16, Arc<AtomicUsize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            h.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut s) = s {
                let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(200)));
                let _ = s.read(&mut [0u8; 1024]);
            }
        }
    });
    (port, hits)
}

// API7 Server Side Request Forgery: URLs a client puts in resources, search parameters, break-glass requests,
// OIDC parameters and token headers (jku, x5u, an unknown issuer) are never fetched. The only outbound calls
// are to operator-configured URLs (OIDC issuer, alert and anchor webhooks).
both_backends!(api7_client_supplied_urls_are_never_fetched, |app: TestApp| async move {
    let w = app.world().await;
    let (port, hits) = listener();
    let url = format!("https://127.0.0.1:{port}");
    let patient = json!({"resourceType": "Patient", "name": [{"family": "Ssrf"}],
        "photo": [{"url": format!("{url}/photo.png")}],
        "extension": [{"url": format!("{url}/StructureDefinition/x"), "valueUri": format!("{url}/v")}],
        "managingOrganization": {"reference": format!("{url}/fhir/Organization/1")},
        "link": [{"other": {"reference": format!("{url}/fhir/Patient/1")}, "type": "seealso"}]});
    let r = app.post(&w.front, "/fhir/Patient", &patient).await;
    assert!(r.status().as_u16() < 500);
    for q in [
        format!("/fhir/Observation?patient={url}/fhir/Patient/1"),
        format!("/fhir/Patient?_include={url}"),
        format!("/fhir/Patient?identifier={url}|1"),
        format!("/auth/oidc/login?iss={url}&redirect_uri={url}"),
        format!("/auth/oidc/callback?code=x&state=y&iss={url}"),
    ] {
        let r = app.get(&w.doc, &q).await;
        assert!(r.status().as_u16() < 500, "{q}: {}", r.status());
    }
    let bg = json!({"patient": format!("{url}/fhir/Patient/{}", w.bob), "code": "emergency",
        "reason": "Unconscious patient in the emergency department"});
    let r = app.client.post(app.url("/auth/break-glass")).bearer_auth(&w.doc.access).json(&bg).send().await.unwrap();
    assert!(r.status().as_u16() < 500);
    for header in [
        json!({"alg": "RS256", "kid": "k1", "jku": format!("{url}/jwks.json")}),
        json!({"alg": "RS256", "kid": "k1", "x5u": format!("{url}/cert.pem")}),
        json!({"alg": "ES256", "kid": "k1", "jwk": {"kty": "EC"}, "x5c": []}),
    ] {
        let claims = json!({"iss": url, "sub": "mallory", "aud": "carevault", "exp": 4_000_000_000u64, "iat": 1});
        let token = format!("{}.{}.AAAA", b64(&header), b64(&claims));
        let r = app.client.get(app.url("/fhir/Patient")).bearer_auth(token).send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the server connected to a client-supplied URL");
});

fn assert_hardened(what: &str, r: &reqwest::Response) {
    let h = r.headers();
    assert_eq!(h.get("strict-transport-security").map(|v| v.to_str().unwrap()), Some("max-age=63072000"), "{what}");
    assert_eq!(h.get("x-content-type-options").map(|v| v.to_str().unwrap()), Some("nosniff"), "{what}");
    assert_eq!(h.get("cache-control").map(|v| v.to_str().unwrap()), Some("no-store"), "{what}");
    for banner in ["server", "x-powered-by", "x-aspnet-version", "via"] {
        assert!(h.get(banner).is_none(), "{what}: {banner} header");
    }
    assert!(h.get("access-control-allow-origin").is_none_or(|v| v != "*"), "{what}: a wildcard CORS origin");
}

// API8 Security Misconfiguration: every kind of answer (success, each error, the limiter's, the body limit's)
// carries HSTS, nosniff and no-store and no banner; TRACE is not served. (TLS: foundation::plain_http_and_old_tls_…,
// tests/faults/sslyze.sh; production refusals: foundation::production_…, ops::….)
both_backends!(api8_every_kind_of_answer_carries_the_security_headers, |app: TestApp| async move {
    let w = app.world().await;
    let c = &app.client;
    let cases: Vec<(&str, reqwest::Response)> = vec![
        ("200 metadata", c.get(app.url("/fhir/metadata")).send().await.unwrap()),
        ("200 read", app.get(&w.front, &format!("/fhir/Patient/{}", w.alice)).await),
        ("401", c.get(app.url("/fhir/Patient")).send().await.unwrap()),
        ("403", app.get(&w.admin, &format!("/fhir/Patient/{}", w.alice)).await),
        ("404", c.get(app.url("/nothing-here")).send().await.unwrap()),
        ("400", app.get(&w.front, "/fhir/Patient?no-such-param=1").await),
        ("405", c.request(reqwest::Method::PATCH, app.url("/fhir/metadata")).send().await.unwrap()),
        ("413", c.post(app.url("/auth/login")).body(vec![b'a'; 1_048_577]).send().await.unwrap()),
        (
            "415",
            c.post(app.url("/fhir/Patient"))
                .bearer_auth(&w.front.access)
                .header("content-type", "text/plain")
                .body("x")
                .send()
                .await
                .unwrap(),
        ),
        (
            "401 login",
            c.post(app.url("/auth/login")).json(&json!({"username": "x", "password": "y"})).send().await.unwrap(),
        ),
        ("jwks", c.get(app.url("/.well-known/jwks.json")).send().await.unwrap()),
    ];
    for (what, r) in &cases {
        assert_hardened(what, r);
    }
    let trace = c
        .request(reqwest::Method::TRACE, app.url("/fhir/metadata"))
        .header("x-trace-probe", "QZXTRACE")
        .send()
        .await
        .unwrap();
    assert!(matches!(trace.status().as_u16(), 404 | 405), "TRACE: {}", trace.status());
    assert_hardened("TRACE", &trace);
    assert!(!trace.text().await.unwrap().contains("QZXTRACE"), "TRACE echoed the request");
});

// API9 Improper Inventory Management: only the documented routes exist; the usual debug, metrics, admin-console and
// documentation paths are 404 on the public port (metrics are off unless `metrics.listen` names another address).
both_backends!(api9_only_documented_routes_exist, |app: TestApp| async move {
    let w = app.world().await;
    for path in [
        "/metrics",
        "/debug",
        "/debug/pprof",
        "/_debug",
        "/actuator",
        "/actuator/health",
        "/env",
        "/.env",
        "/config",
        "/admin",
        "/admin/",
        "/console",
        "/swagger",
        "/swagger-ui",
        "/api-docs",
        "/graphql",
        "/server-status",
        "/status",
        "/.git/config",
        "/fhir/_debug",
        "/fhir/$reindex",
        "/v1/fhir/Patient",
        "/fhir/r5/Patient",
        "/internal",
    ] {
        for token in [None, Some(&w.admin.access)] {
            let mut rb = app.client.get(app.url(path));
            if let Some(t) = token {
                rb = rb.bearer_auth(t);
            }
            let r = rb.send().await.unwrap();
            let status = r.status().as_u16();
            assert!(matches!(status, 401 | 404), "{path}: {status}");
            let body = r.text().await.unwrap();
            assert!(body.contains("OperationOutcome"), "{path}: {body}");
        }
    }
    // The CapabilityStatement names exactly what is served (fhir::metadata_lists_what_is_implemented checks the rest).
    let (s, cap) = app.get_json(&w.front, "/fhir/metadata").await;
    assert_eq!(s, 200);
    let types: Vec<&str> =
        cap["rest"][0]["resource"].as_array().unwrap().iter().map(|r| r["type"].as_str().unwrap()).collect();
    for t in &types {
        let r = app.get(&w.admin, &format!("/fhir/{t}?_count=1")).await;
        assert_ne!(r.status(), 404, "{t} is listed but not served");
    }
});

// Found by the fuzzer (`_id` holding a NUL answered 500 on PostgreSQL, whose text cannot store one): NUL characters
// are refused as invalid input on every path that would reach a query.
crate::both_backends!(nul_characters_are_refused_not_500, |app: TestApp| async move {
    app.add_user("nul-front", carevault::role::Role::FrontDesk, None, None);
    let s = app.login_as("nul-front").await;
    for path in ["/fhir/Patient?_id=%00", "/fhir/Patient?family=a%00b", "/fhir/Patient?na%00me=x"] {
        assert_eq!(app.get(&s, path).await.status(), 400, "{path}");
    }
    let body = serde_json::json!({"resourceType":"Patient","name":[{"family":"a\u{0}b"}]});
    assert_eq!(app.post(&s, "/fhir/Patient", &body).await.status(), 400);
    let login = app.client.post(app.url("/auth/login")).json(&serde_json::json!({"username":"a\u{0}","password":"x"}));
    assert_eq!(login.send().await.unwrap().status(), 401);
    let form = [("grant_type", "client_credentials"), ("client_id", "a\u{0}"), ("client_secret", "x")];
    assert_eq!(app.client.post(app.url("/auth/token")).form(&form).send().await.unwrap().status(), 400);
    let r = app.client.get(app.url("/auth/authorize?client_id=a%00&response_type=code")).send().await.unwrap();
    assert_eq!(r.status(), 400);
});
