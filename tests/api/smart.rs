//! SMART App Launch 2.0 (CONTRACT §5b): discovery, the authorization-code flow with PKCE driven over HTTP as a
//! browser would (sign-in page, consent page, redirect), scopes that only narrow (role × scope tables), patient
//! context confinement on every route, granular scopes, backend services with signed assertions,
//! introspection, and `carevault apps`.

use crate::helpers::TestApp;
use crate::world::{SSN_SYSTEM, World, observation};
use crate::{both_backends, both_backends_with};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use carevault::auth::service::{AppKind, NewApp, register_app};
use carevault::role::Role;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const REDIRECT: &str = "http://127.0.0.1:9/callback";
const VERIFIER: &str = "dBjftJeZ4CVP-mJ92K1hqvqLY0ZA3JnxDoS2yVx6RkWk4nDtlvv7mQaZ2FdLqQbB0cY9";

pub fn register(app: &TestApp, kind: AppKind, scopes: &str) -> (String, Option<String>) {
    let mut conn = app.state.db.conn().unwrap();
    let new = NewApp {
        name: "Growth <Chart> & Co".into(),
        kind,
        redirect_uris: vec![REDIRECT.into()],
        scopes: scopes.into(),
        jwks: None,
        jwks_url: None,
        role: None,
    };
    let (a, secret) = register_app(&mut conn, new, crate::helpers::start_time()).unwrap();
    (a.client_id, secret)
}

fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// The value of the hidden form field `name` on a page.
pub fn hidden(html: &str, name: &str) -> Option<String> {
    let at = html.find(&format!("name=\"{name}\" value=\""))?;
    let rest = &html[at + name.len() + 15..];
    Some(rest[..rest.find('"')?].to_owned())
}

fn query_param(url: &str, name: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    serde_urlencoded::from_str::<Vec<(String, String)>>(q).ok()?.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

fn authorize_url(app: &TestApp, client_id: &str, scope: &str, extra: &[(&str, &str)]) -> String {
    let aud = app.state.records.base().to_owned();
    let ch = challenge(VERIFIER);
    let mut q = vec![
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", REDIRECT),
        ("scope", scope),
        ("state", "st-42"),
        ("aud", aud.as_str()),
        ("code_challenge", ch.as_str()),
        ("code_challenge_method", "S256"),
    ];
    for (k, v) in extra {
        q.retain(|(qk, _)| qk != k);
        if !v.is_empty() {
            q.push((k, v));
        }
    }
    app.url(&format!("/auth/authorize?{}", serde_urlencoded::to_string(&q).unwrap()))
}

/// Where a flow ended: the consent page (its HTML), or a redirect.
pub async fn sign_in(app: &TestApp, client_id: &str, scope: &str, user: &str) -> String {
    let page = app.client.get(authorize_url(app, client_id, scope, &[])).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("default-src 'none'") && !csp.contains("script-src"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains("form id=\"login\""), "{html}");
    assert!(html.contains("Growth &lt;Chart&gt; &amp; Co"), "app name escaped");
    let flow = hidden(&html, "flow").expect("flow");
    let resp = app
        .client
        .post(app.url("/auth/authorize/login"))
        .form(&[("flow", flow.as_str()), ("username", user), ("password", crate::helpers::PASSWORD), ("totp", "")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

pub async fn consent(app: &TestApp, html: &str, decision: &str, patient: Option<&str>) -> reqwest::Response {
    let mut form = vec![
        ("flow", hidden(html, "flow").expect("flow")),
        ("consent", hidden(html, "consent").expect("consent token")),
        ("decision", decision.to_owned()),
    ];
    if let Some(p) = patient {
        form.push(("patient", p.to_owned()));
    }
    app.client.post(app.url("/auth/authorize/consent")).form(&form).send().await.unwrap()
}

async fn exchange(app: &TestApp, client_id: &str, code: &str, verifier: &str) -> (u16, Value) {
    let r = app
        .client
        .post(app.url("/auth/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("client_id", client_id),
            ("code_verifier", verifier),
        ])
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// A whole standalone launch: the token response.
pub async fn launch(app: &TestApp, client_id: &str, scope: &str, user: &str, patient: Option<&str>) -> Value {
    let html = sign_in(app, client_id, scope, user).await;
    assert!(html.contains("form id=\"consent\""), "{html}");
    let resp = consent(app, &html, "approve", patient).await;
    assert_eq!(resp.status(), 303, "{:?}", resp.text().await);
    let to = resp.headers()["location"].to_str().unwrap().to_owned();
    assert!(to.starts_with(REDIRECT));
    assert_eq!(query_param(&to, "state").as_deref(), Some("st-42"));
    let code = query_param(&to, "code").expect("code");
    let (status, tokens) = exchange(app, client_id, &code, VERIFIER).await;
    assert_eq!(status, 200, "{tokens}");
    tokens
}

fn session_of(tokens: &Value) -> crate::helpers::Session {
    crate::helpers::Session {
        access: tokens["access_token"].as_str().unwrap().to_owned(),
        refresh: tokens["refresh_token"].as_str().unwrap_or_default().to_owned(),
    }
}

fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

both_backends!(discovery_documents_name_every_endpoint, |app: TestApp| async move {
    for path in ["/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let c: Value = r.json().await.unwrap();
        for k in
            ["authorization_endpoint", "token_endpoint", "introspection_endpoint", "revocation_endpoint", "jwks_uri"]
        {
            assert!(c[k].as_str().is_some_and(|u| u.starts_with("https://")), "{path} {k}");
        }
        assert_eq!(c["code_challenge_methods_supported"], json!(["S256"]));
        let caps: Vec<&str> = c["capabilities"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        for cap in ["launch-standalone", "client-public", "context-standalone-patient", "permission-v2"] {
            assert!(caps.contains(&cap), "{cap}");
        }
    }
    let meta: Value = app.client.get(app.url("/fhir/metadata")).send().await.unwrap().json().await.unwrap();
    let sec = &meta["rest"][0]["security"];
    assert_eq!(sec["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let uris = &sec["extension"][0];
    assert_eq!(uris["url"], "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris");
    let names: Vec<&str> = uris["extension"].as_array().unwrap().iter().filter_map(|e| e["url"].as_str()).collect();
    assert_eq!(names, ["authorize", "token", "introspect", "revoke"]);
});

both_backends!(standalone_launch_confines_a_clinician_to_the_chosen_patient, |app: TestApp| async move {
    let w: World = app.world().await;
    let obs_alice = app.create(&w.doc, observation(&w.alice, "8480-6", 120.0, "2026-02-01")).await;
    let scope = "launch/patient openid fhirUser offline_access patient/Patient.rs patient/Observation.rs";
    let (client, _) = register(&app, AppKind::Public, "launch/patient openid fhirUser offline_access patient/*.rs");
    let html = sign_in(&app, &client, scope, "doc").await;
    // The picker lists only patients the clinician may reach (alice's care team), never bob.
    assert!(html.contains(&format!("<option value=\"{}\">", w.alice)), "{html}");
    assert!(!html.contains(&w.bob), "bob is not on doc's care team");
    assert!(
        html.contains("<ul id=\"scopes\">")
            && html.contains("Read, search Observation records of the selected patient")
    );
    // A patient the user may not read cannot be chosen by editing the form.
    let refused = consent(&app, &html, "approve", Some(&w.bob)).await;
    assert_eq!(refused.status(), 403);
    let resp = consent(&app, &html, "approve", Some(&w.alice)).await;
    assert_eq!(resp.status(), 303);
    let to = resp.headers()["location"].to_str().unwrap().to_owned();
    let code = query_param(&to, "code").unwrap();
    // The wrong PKCE verifier spends nothing… it fails, and the code is gone with it.
    let (status, body) = exchange(&app, &client, &code, &"x".repeat(43)).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")));
    let (status, _) = exchange(&app, &client, &code, VERIFIER).await;
    assert_eq!(status, 400, "a code is single use, even after a failed exchange");

    let started = std::time::Instant::now();
    let tokens = launch(&app, &client, scope, "doc", Some(&w.alice)).await;
    // Authorize page, sign-in (one argon2id verification), consent (a search and a read as the user, audited),
    // code exchange: the whole round trip a user waits for, minus their typing.
    eprintln!("FIGURE smart-launch backend={:?} authorize+sign-in+consent+token={:?}", app.backend, started.elapsed());
    assert_eq!(tokens["patient"], json!(w.alice));
    assert_eq!(tokens["token_type"], "Bearer");
    let granted = tokens["scope"].as_str().unwrap();
    assert!(granted.contains("patient/Observation.rs") && granted.contains("offline_access"), "{granted}");
    assert!(tokens["refresh_token"].is_string(), "offline_access gives a refresh token");
    let id = claims(tokens["id_token"].as_str().unwrap());
    assert_eq!(id["aud"], json!(client));
    assert_eq!(id["fhirUser"], json!(format!("{}/Practitioner/{}", app.state.records.base(), w.doc_practitioner)));
    let access = claims(tokens["access_token"].as_str().unwrap());
    assert_eq!(access["launch_patient"], json!(w.alice));
    let s = session_of(&tokens);

    assert_eq!(app.get_json(&s, &format!("/fhir/Patient/{}", w.alice)).await.0, 200);
    assert_eq!(app.get_json(&s, &format!("/fhir/Observation/{obs_alice}")).await.0, 200);
    // Confined: another patient is 404 like a missing one, on every route.
    let bob_obs = app.create(&w.front, json!({"resourceType":"Patient","name":[{"family":"Extra"}]})).await;
    for path in [
        format!("/fhir/Patient/{}", w.bob),
        format!("/fhir/Patient/{bob_obs}"),
        format!("/fhir/Patient/{}/$everything", w.bob),
        format!("/fhir/Patient/{}/_history", w.bob),
    ] {
        assert_eq!(app.get_json(&s, &path).await.0, 404, "{path}");
    }
    let (st, b) = app.get_json(&s, "/fhir/Patient").await;
    assert_eq!(st, 200);
    let ids: Vec<&str> = b["entry"].as_array().unwrap().iter().filter_map(|e| e["resource"]["id"].as_str()).collect();
    assert_eq!(ids, [w.alice.as_str()], "a search sees only the patient in context");
    // Types the scopes do not name are refused, though the role could read them.
    assert_eq!(app.get_json(&s, &format!("/fhir/CareTeam/{}", w.care_team)).await.0, 403);
    assert_eq!(app.get_json(&s, "/fhir/Encounter").await.0, 403);
    // `rs` does not write.
    let write = app.post(&s, "/fhir/Observation", &observation(&w.alice, "8480-6", 121.0, "2026-02-02")).await;
    assert_eq!(write.status(), 403);
    // $everything carries only what the scopes name, of this patient.
    let (st, all) = app.get_json(&s, &format!("/fhir/Patient/{}/$everything", w.alice)).await;
    assert_eq!(st, 200);
    let types: std::collections::BTreeSet<&str> =
        all["entry"].as_array().unwrap().iter().filter_map(|e| e["resource"]["resourceType"].as_str()).collect();
    assert_eq!(types.into_iter().collect::<Vec<_>>(), ["Observation", "Patient"]);

    // Refresh keeps the grant as narrow as it was.
    let r = app
        .client
        .post(app.url("/auth/token"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", s.refresh.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let refreshed: Value = r.json().await.unwrap();
    let rc = claims(refreshed["access_token"].as_str().unwrap());
    assert_eq!(
        (rc["scope"].as_str(), rc["launch_patient"].as_str()),
        (access["scope"].as_str(), Some(w.alice.as_str()))
    );
    assert_eq!(rc["client_id"], json!(client));
    let s2 = session_of(&refreshed);
    assert_eq!(app.get_json(&s2, &format!("/fhir/Patient/{}", w.bob)).await.0, 404);
    // Every decision names the app in the audit trail.
    let mut conn = app.state.db.conn().unwrap();
    use carevault::store::schema::audit_events;
    use diesel::prelude::*;
    let bodies: Vec<String> = audit_events::table.select(audit_events::body).load(&mut conn).unwrap();
    assert!(bodies.iter().filter(|b| b.contains(&client)).count() >= 10, "reads audited with the client id");
});

both_backends!(code_replay_revokes_the_tokens_it_issued, |app: TestApp| async move {
    let w: World = app.world().await;
    let (client, _) = register(&app, AppKind::Public, "launch/patient patient/*.rs");
    let html = sign_in(&app, &client, "launch/patient patient/Patient.rs", "doc").await;
    let to = consent(&app, &html, "approve", Some(&w.alice)).await.headers()["location"].to_str().unwrap().to_owned();
    let code = query_param(&to, "code").unwrap();
    let (st, tokens) = exchange(&app, &client, &code, VERIFIER).await;
    assert_eq!(st, 200);
    assert!(tokens.get("refresh_token").is_none(), "no offline_access, no refresh token");
    let s = session_of(&tokens);
    assert_eq!(app.get_json(&s, &format!("/fhir/Patient/{}", w.alice)).await.0, 200);
    let (st, body) = exchange(&app, &client, &code, VERIFIER).await;
    assert_eq!((st, body["error"].as_str()), (400, Some("invalid_grant")));
    app.clock.advance(time::Duration::seconds(6));
    assert_eq!(app.get_json(&s, &format!("/fhir/Patient/{}", w.alice)).await.0, 401, "replay ended the session");
});

// Two exchanges of one code at the same moment: whichever wins, its tokens do not outlive the replay.
both_backends!(concurrent_exchanges_of_one_code_leave_no_live_tokens, |app: TestApp| async move {
    let w: World = app.world().await;
    let (client, _) = register(&app, AppKind::Public, "launch/patient patient/*.rs");
    let mut issued = Vec::new();
    for _ in 0..4 {
        let html = sign_in(&app, &client, "launch/patient patient/Patient.rs", "doc").await;
        let to =
            consent(&app, &html, "approve", Some(&w.alice)).await.headers()["location"].to_str().unwrap().to_owned();
        let code = query_param(&to, "code").unwrap();
        let (a, b) = tokio::join!(exchange(&app, &client, &code, VERIFIER), exchange(&app, &client, &code, VERIFIER));
        let wins: Vec<&Value> = [&a, &b].into_iter().filter(|(st, _)| *st == 200).map(|(_, t)| t).collect();
        assert!(wins.len() <= 1, "one code, at most one token response: {a:?} {b:?}");
        for (st, body) in [&a, &b].into_iter().filter(|(st, _)| *st != 200) {
            assert_eq!((*st, body["error"].as_str()), (400, Some("invalid_grant")));
        }
        issued.extend(wins.into_iter().map(session_of));
    }
    app.clock.advance(time::Duration::seconds(6));
    for s in &issued {
        assert_eq!(app.get_json(s, &format!("/fhir/Patient/{}", w.alice)).await.0, 401, "replay ended the session");
    }
});

both_backends!(authorize_checks_client_redirect_pkce_audience_and_consent, |app: TestApp| async move {
    let _w: World = app.world().await;
    let (client, _) = register(&app, AppKind::Public, "launch/patient openid patient/*.rs user/Patient.rs");
    let get = |url: String| {
        let c = app.client.clone();
        async move { c.get(url).send().await.unwrap() }
    };
    // Unknown client, unregistered redirect: a page, never a redirect (no open redirector).
    for extra in [[("client_id", "app-nope")], [("redirect_uri", "http://127.0.0.1:9/other")]] {
        let r = get(authorize_url(&app, &client, "user/Patient.rs", &extra)).await;
        assert_eq!(r.status(), 400);
        assert!(r.headers().get("location").is_none());
    }
    // Once the redirect URI is verified, errors go back to the app with the state.
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[("code_challenge", "")], "invalid_request"),
        (&[("code_challenge_method", "plain")], "invalid_request"),
        (&[("aud", "https://elsewhere.example/fhir")], "invalid_request"),
        (&[("response_type", "token")], "unsupported_response_type"),
        (&[("scope", "system/Patient.rs user/Nope.r")], "invalid_scope"),
        (&[("state", "")], "invalid_request"),
    ];
    for (extra, error) in cases {
        let r = get(authorize_url(&app, &client, "user/Patient.rs", extra)).await;
        assert_eq!(r.status(), 302, "{extra:?}");
        let to = r.headers()["location"].to_str().unwrap().to_owned();
        assert!(to.starts_with(REDIRECT), "{to}");
        assert_eq!(query_param(&to, "error").as_deref(), Some(error), "{extra:?}");
    }
    // Wrong password: the sign-in page again, one generic message; nothing typed is echoed.
    let page = get(authorize_url(&app, &client, "user/Patient.rs", &[])).await.text().await.unwrap();
    let flow = hidden(&page, "flow").unwrap();
    let r = app
        .client
        .post(app.url("/auth/authorize/login"))
        .form(&[("flow", flow.as_str()), ("username", "doc<script>"), ("password", "canary-pw-Zq9")])
        .send()
        .await
        .unwrap();
    let html = r.text().await.unwrap();
    assert!(html.contains("id=\"error\"") && !html.contains("canary-pw") && !html.contains("doc<script>"));
    // Deny: back to the app with access_denied; the consent cannot be replayed.
    let html = sign_in(&app, &client, "user/Patient.rs", "doc").await;
    let r = consent(&app, &html, "deny", None).await;
    let to = r.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(query_param(&to, "error").as_deref(), Some("access_denied"));
    assert_eq!(consent(&app, &html, "approve", None).await.status(), 400);
    // A forged consent post (right flow, wrong consent token) is refused.
    let html = sign_in(&app, &client, "user/Patient.rs", "doc").await;
    let forged = html.replace(&hidden(&html, "consent").unwrap(), &"A".repeat(43));
    assert_eq!(consent(&app, &forged, "approve", None).await.status(), 400);
    // The signed-in flow cannot be signed in again.
    let r = app
        .client
        .post(app.url("/auth/authorize/login"))
        .form(&[
            ("flow", hidden(&html, "flow").unwrap().as_str()),
            ("username", "doc"),
            ("password", crate::helpers::PASSWORD),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Codes expire after 60 seconds.
    let to = consent(&app, &html, "approve", None).await.headers()["location"].to_str().unwrap().to_owned();
    app.clock.advance(time::Duration::seconds(61));
    let (st, _) = exchange(&app, &client, &query_param(&to, "code").unwrap(), VERIFIER).await;
    assert_eq!(st, 400);
});

// The table: (user, scopes, patient in context, request, expected status, must not contain).
both_backends!(scopes_only_narrow_what_roles_allow, |app: TestApp| async move {
    let w: World = app.world().await;
    let obs = app.create(&w.doc, observation(&w.alice, "8480-6", 120.0, "2026-02-01")).await;
    let (client, _) = register(&app, AppKind::Public, "launch/patient openid fhirUser patient/*.cruds user/*.cruds");
    let alice = format!("/fhir/Patient/{}", w.alice);
    let bob = format!("/fhir/Patient/{}", w.bob);
    let every = format!("/fhir/Patient/{}/$everything", w.alice);
    let obs_path = format!("/fhir/Observation/{obs}");
    let ssn = "123-45-6789";
    type Row<'a> = (&'a str, &'a str, Option<&'a str>, &'a str, u16, Option<&'a str>);
    let table: Vec<Row> = vec![
        // billing may see the SSN by role; a token without Patient scopes reaches no Patient at all.
        ("billing", "user/Observation.rs", None, &alice, 403, Some(ssn)),
        ("billing", "user/Observation.rs", None, &every, 403, Some(ssn)),
        ("billing", "user/Patient.rs", None, &alice, 200, None),
        // front desk may not see the SSN: user/*.cruds does not widen its mask.
        ("front", "user/*.cruds", None, &alice, 200, Some(ssn)),
        // doc's role reaches alice (care team), not bob; user/ scopes keep that.
        ("doc", "user/Patient.rs", None, &alice, 200, Some(ssn)),
        ("doc", "user/Patient.rs", None, &bob, 404, None),
        ("doc", "user/Patient.rs", None, &obs_path, 403, None),
        ("doc", "user/Patient.r", None, "/fhir/Patient", 403, None),
        ("otherdoc", "user/*.rs", None, &alice, 404, None),
        // patient context: only that patient, on every route.
        ("doc", "launch/patient patient/*.rs", Some("alice"), &every, 200, Some(ssn)),
        ("doc", "launch/patient patient/*.rs", Some("alice"), &obs_path, 200, None),
        ("doc", "launch/patient patient/*.rs", Some("alice"), "/fhir/Observation", 200, None),
        ("alice", "launch/patient patient/*.rs", None, &alice, 200, None),
        ("alice", "launch/patient patient/*.rs", None, &bob, 404, None),
        ("alice", "launch/patient patient/Observation.rs", None, &alice, 403, None),
        // v1 forms map to v2.
        ("alice", "launch/patient patient/Patient.read", None, &alice, 200, None),
        ("auditor", "user/Patient.rs", None, &alice, 403, None),
    ];
    for (user, scope, pick, path, want, absent) in table {
        let patient = pick.map(|_| w.alice.as_str());
        let tokens = launch(&app, &client, scope, user, patient).await;
        let s = session_of(&tokens);
        let r = app.get(&s, path).await;
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert_eq!(status, want, "{user} [{scope}] GET {path}: {body}");
        if let Some(a) = absent {
            assert!(!body.contains(a), "{user} [{scope}] GET {path} disclosed {a}");
        }
        if path == "/fhir/Observation" && status == 200 {
            let v: Value = serde_json::from_str(&body).unwrap();
            for e in v["entry"].as_array().unwrap() {
                assert_eq!(e["resource"]["subject"]["reference"], json!(format!("Patient/{}", w.alice)));
            }
        }
    }
    // Sanity: billing's own login sees the SSN (so the 403 above is the scope, not the role).
    let (_, b) = app.get_json(&w.billing, &alice).await;
    assert!(b.to_string().contains(ssn) && b.to_string().contains(SSN_SYSTEM));
});

both_backends!(granular_scopes_filter_reads_searches_and_writes, |app: TestApp| async move {
    let w: World = app.world().await;
    let with_category = |code: &str, cat: &str| {
        let mut o = observation(&w.alice, code, 5.0, "2026-02-01");
        o["category"] =
            json!([{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":cat}]}]);
        o
    };
    let lab = app.create(&w.doc, with_category("2345-7", "laboratory")).await;
    let vital = app.create(&w.doc, with_category("8480-6", "vital-signs")).await;
    let (client, _) = register(&app, AppKind::Public, "launch/patient patient/*.cruds");
    let tokens =
        launch(&app, &client, "launch/patient patient/Observation.crs?category=laboratory", "doc", Some(&w.alice))
            .await;
    let s = session_of(&tokens);
    assert_eq!(app.get_json(&s, &format!("/fhir/Observation/{lab}")).await.0, 200);
    assert_eq!(app.get_json(&s, &format!("/fhir/Observation/{vital}")).await.0, 404, "outside the granular scope");
    let (st, b) = app.get_json(&s, "/fhir/Observation").await;
    assert_eq!(st, 200);
    let ids: Vec<&str> = b["entry"].as_array().unwrap().iter().filter_map(|e| e["resource"]["id"].as_str()).collect();
    assert_eq!(ids, [lab.as_str()]);
    let (st, _) = app.get_json(&s, &format!("/fhir/Patient/{}/$everything", w.alice)).await;
    assert_eq!(st, 403, "$everything needs read on Patient, which this token lacks");
    let wider = launch(
        &app,
        &client,
        "launch/patient patient/Patient.rs patient/Observation.rs?category=laboratory",
        "doc",
        Some(&w.alice),
    )
    .await;
    let (st, every) = app.get_json(&session_of(&wider), &format!("/fhir/Patient/{}/$everything", w.alice)).await;
    assert_eq!(st, 200);
    let obs: Vec<&str> = every["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["resource"]["resourceType"] == "Observation")
        .filter_map(|e| e["resource"]["id"].as_str())
        .collect();
    assert_eq!(obs, [lab.as_str()], "$everything keeps the granular restriction");
    assert_eq!(app.post(&s, "/fhir/Observation", &with_category("2345-7", "laboratory")).await.status(), 201);
    assert_eq!(app.post(&s, "/fhir/Observation", &with_category("8480-6", "vital-signs")).await.status(), 403);
});

/// An ES384 key pair for a backend service: (PKCS#8 PEM of the private key, its public JWK Set).
fn es384_client() -> (String, Value) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let raw = key.public_key_raw();
    assert_eq!(raw.len(), 97);
    let jwk = json!({"kty":"EC","crv":"P-384","kid":"k1","alg":"ES384","use":"sig",
                     "x":URL_SAFE_NO_PAD.encode(&raw[1..49]),"y":URL_SAFE_NO_PAD.encode(&raw[49..])});
    (key.serialize_pem(), json!({"keys":[jwk]}))
}

fn assertion(pem: &str, client: &str, aud: &str, jti: &str, exp: i64) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES384);
    h.kid = Some("k1".into());
    let claims = json!({"iss":client,"sub":client,"aud":aud,"exp":exp,"jti":jti});
    jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).unwrap()).unwrap()
}

const ALERT_10: &str = "[monitor]\nfailed_logins_threshold = 10\n";

both_backends_with!(backend_services_sign_in_with_a_signed_assertion, ALERT_10, |app: TestApp| async move {
    let w: World = app.world().await;
    let (pem, jwks) = es384_client();
    let client = {
        let mut conn = app.state.db.conn().unwrap();
        let new = NewApp {
            name: "claims feed".into(),
            kind: AppKind::Backend,
            redirect_uris: vec![],
            scopes: "system/Patient.rs system/Coverage.rs".into(),
            jwks: Some(jwks.to_string()),
            jwks_url: None,
            role: Some(Role::Billing),
        };
        register_app(&mut conn, new, crate::helpers::start_time()).unwrap().0.client_id
    };
    let aud = format!("{}/auth/token", app.state.config.base_url());
    let now = {
        use carevault::clock::Clock;
        app.clock.now().unix_timestamp()
    };
    let token = |a: String, scope: &'static str| {
        let c = app.client.clone();
        let url = app.url("/auth/token");
        async move {
            let r = c
                .post(url)
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                    ("client_assertion", a.as_str()),
                    ("scope", scope),
                ])
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (st, t) =
        token(assertion(&pem, &client, &aud, "j1", now + 240), "system/Patient.rs system/Observation.rs").await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["scope"], "system/Patient.rs", "requested ∩ registered");
    let s = crate::helpers::Session { access: t["access_token"].as_str().unwrap().into(), refresh: String::new() };
    let (st, p) = app.get_json(&s, &format!("/fhir/Patient/{}", w.alice)).await;
    assert_eq!(st, 200);
    assert!(
        p.to_string().contains("123-45-6789"),
        "billing's role shows the SSN, and system/Patient.rs allows Patient"
    );
    assert_eq!(app.get_json(&s, "/fhir/Observation").await.0, 403, "not granted");
    let (st, b) = token(assertion(&pem, &client, &aud, "j6", now + 240), "system/Observation.rs").await;
    assert_eq!((st, b["error"].as_str()), (400, Some("invalid_scope")));
    // Replay, wrong audience, too long-lived, expired, wrong key: all refused.
    let (other_pem, _) = es384_client();
    for (a, why) in [
        (assertion(&pem, &client, &aud, "j1", now + 240), "replayed jti"),
        (assertion(&pem, &client, "https://elsewhere/token", "j2", now + 240), "audience"),
        (assertion(&pem, &client, &aud, "j3", now + 3600), "lifetime over 5 minutes"),
        (assertion(&pem, &client, &aud, "j4", now - 120), "expired"),
        (assertion(&other_pem, &client, &aud, "j5", now + 240), "signed by another key"),
    ] {
        let (st, b) = token(a, "system/Patient.rs").await;
        assert_eq!((st, b["error"].as_str()), (401, Some("invalid_client")), "{why}");
    }
    // Brute force is throttled (429) and fires the failed-login alert.
    let mut statuses = Vec::new();
    for i in 0..15 {
        statuses.push(
            token(assertion(&other_pem, &client, &aud, &format!("b{i}"), now + 240), "system/Patient.rs").await.0,
        );
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    app.settle_monitor().await;
    let alerts = app.alerts(carevault::monitor::rules::FAILED_LOGINS_ADDRESS);
    assert_eq!(alerts.len(), 1, "failed client authentications feed the failed-login rules");
});

both_backends!(introspection_reports_live_tokens_only, |app: TestApp| async move {
    let w: World = app.world().await;
    let (client, secret) = register(&app, AppKind::Confidential, "launch/patient patient/*.rs");
    let secret = secret.expect("a confidential app gets a secret");
    assert!(URL_SAFE_NO_PAD.decode(&secret).unwrap().len() >= 16, "≥ 128 bits");
    // A confidential app must authenticate its code exchange.
    let html = sign_in(&app, &client, "launch/patient patient/Patient.rs", "doc").await;
    let to = consent(&app, &html, "approve", Some(&w.alice)).await.headers()["location"].to_str().unwrap().to_owned();
    let code = query_param(&to, "code").unwrap();
    let (st, _) = exchange(&app, &client, &code, VERIFIER).await;
    assert_eq!(st, 401, "no client secret");
    let html = sign_in(&app, &client, "launch/patient patient/Patient.rs", "doc").await;
    let to = consent(&app, &html, "approve", Some(&w.alice)).await.headers()["location"].to_str().unwrap().to_owned();
    let r = app
        .client
        .post(app.url("/auth/token"))
        .basic_auth(&client, Some(&secret))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", query_param(&to, "code").unwrap().as_str()),
            ("redirect_uri", REDIRECT),
            ("code_verifier", VERIFIER),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tokens: Value = r.json().await.unwrap();
    let access = tokens["access_token"].as_str().unwrap().to_owned();
    let introspect = |tok: String, pw: String| {
        let (c, url, id) = (app.client.clone(), app.url("/auth/introspect"), client.clone());
        async move {
            let r = c.post(url).basic_auth(id, Some(pw)).form(&[("token", tok)]).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (st, info) = introspect(access.clone(), secret.clone()).await;
    assert_eq!(st, 200);
    assert_eq!(info["active"], true);
    assert_eq!(info["client_id"], json!(client));
    assert_eq!(info["patient"], json!(w.alice));
    assert_eq!(info["scope"], "launch/patient patient/Patient.rs");
    assert_eq!(introspect(access.clone(), "wrong".into()).await.0, 401);
    assert_eq!(introspect("garbage".into(), secret.clone()).await.1, json!({"active": false}));
    // Introspection is not the user's activity: it never moves the session's idle clock.
    let claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(access.split('.').nth(1).unwrap()).unwrap()).unwrap();
    let sid = claims["sid"].as_str().unwrap().to_owned();
    let last_seen = || {
        use carevault::store::schema::sessions;
        use diesel::prelude::*;
        sessions::table
            .filter(sessions::id.eq(&sid))
            .select(sessions::last_seen)
            .first::<i64>(&mut app.state.db.conn().unwrap())
            .unwrap()
    };
    let before = last_seen();
    app.clock.advance(time::Duration::seconds(290));
    assert_eq!(introspect(access.clone(), secret.clone()).await.1["active"], true);
    assert_eq!(last_seen(), before, "introspection touched the session");
    // Revoked: inactive within the session cache window.
    let r = app.client.post(app.url("/auth/revoke")).form(&[("token", access.as_str())]).send().await.unwrap();
    assert_eq!(r.status(), 200);
    app.clock.advance(time::Duration::seconds(6));
    assert_eq!(introspect(access, secret).await.1, json!({"active": false}));
});
