//! Fidelity and integrity of what is written (issue 14 part 4): decimals come back exactly as sent, and every
//! reference resolves within the caller's scope and the resource's own patient compartment. Both backends.

use crate::both_backends;
use crate::helpers::{Session, TestApp};
use crate::world::observation;
use serde_json::{Value, json};

// Decimals are kept exactly as the client wrote them (CONTRACT §5): `5.10` stays `5.10`, digits past f64 and
// exponents survive, on every path that returns the resource. Checked in the raw response text, never through
// a parsed number.
both_backends!(decimals_are_returned_exactly_as_sent, |app: TestApp| async move {
    let w = app.world().await;
    // As sent, and as returned: the digits exactly; an exponent is written `e` with its sign (serde_json).
    const SENT: [(&str, &str); 7] = [
        ("5.10", "5.10"),
        ("0.1000000000000000055511151231257827", "0.1000000000000000055511151231257827"),
        ("12345678901234567890.5", "12345678901234567890.5"),
        ("1e2", "1e+2"),
        ("1.0", "1.0"),
        ("-0.000", "-0.000"),
        ("6.02214076E23", "6.02214076e+23"),
    ];
    const DECIMALS: [&str; 7] = {
        let mut out = [""; 7];
        let mut i = 0;
        while i < 7 {
            out[i] = SENT[i].1;
            i += 1;
        }
        out
    };
    let body = format!(
        r#"{{"resourceType":"Observation","status":"final",
            "code":{{"coding":[{{"system":"http://loinc.org","code":"85354-9"}}]}},
            "subject":{{"reference":"Patient/{alice}"}},"effectiveDateTime":"2024-05-01T10:00:00Z",
            "valueQuantity":{{"value":{d0},"unit":"mmol/L"}},
            "component":[{{"code":{{"text":"a"}},"valueQuantity":{{"value":{d1}}}}},
                         {{"code":{{"text":"b"}},"valueQuantity":{{"value":{d2}}}}},
                         {{"code":{{"text":"c"}},"valueQuantity":{{"value":{d6}}}}}],
            "referenceRange":[{{"low":{{"value":{d3}}},"high":{{"value":{d4}}}}},{{"low":{{"value":{d5}}}}}]}}"#,
        alice = w.alice,
        d0 = SENT[0].0,
        d1 = SENT[1].0,
        d2 = SENT[2].0,
        d3 = SENT[3].0,
        d4 = SENT[4].0,
        d5 = SENT[5].0,
        d6 = SENT[6].0,
    );
    let r = app
        .client
        .post(app.url("/fhir/Observation"))
        .bearer_auth(&w.doc.access)
        .header("content-type", "application/fhir+json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let created = r.text().await.unwrap();
    assert_eq!(status, 201, "{created}");
    let id = serde_json::from_str::<Value>(&created).unwrap()["id"].as_str().unwrap().to_owned();
    let exact = |what: &str, text: &str| {
        for d in DECIMALS {
            assert!(
                text.contains(&format!("\"value\":{d}}}")) || text.contains(&format!("\"value\":{d},")),
                "{what}: {d} not returned as sent: {text}"
            );
        }
        app.assert_valid(&serde_json::from_str(text).unwrap());
    };
    exact("create", &created);
    let raw = |path: String| {
        let app = &app;
        let s = &w.doc;
        async move {
            let r = app.get(s, &path).await;
            assert_eq!(r.status(), 200, "{path}");
            r.text().await.unwrap()
        }
    };
    exact("read", &raw(format!("/fhir/Observation/{id}")).await);
    exact("vread", &raw(format!("/fhir/Observation/{id}/_history/1")).await);
    exact("search", &raw(format!("/fhir/Observation?patient={}", w.alice)).await);
    exact("history", &raw(format!("/fhir/Observation/{id}/_history")).await);
    exact("$everything", &raw(format!("/fhir/Patient/{}/$everything", w.alice)).await);
    // An update keeps what it sends, and the first version keeps what it had.
    let read = raw(format!("/fhir/Observation/{id}")).await;
    let updated = read.replacen("\"value\":5.10", "\"value\":5.100", 1);
    assert_ne!(read, updated);
    let r = app
        .client
        .put(app.url(&format!("/fhir/Observation/{id}")))
        .bearer_auth(&w.doc.access)
        .header("content-type", "application/fhir+json")
        .header("if-match", "W/\"1\"")
        .body(updated)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(raw(format!("/fhir/Observation/{id}")).await.contains("\"value\":5.100}"));
    assert!(raw(format!("/fhir/Observation/{id}/_history/1")).await.contains("\"value\":5.10}"));
    // An integer element takes an integer: `1.0` or `1e2` is a decimal (the schema cannot tell, the text can).
    for bad in ["1.0", "1e2", "2147483648"] {
        let body = format!(
            r#"{{"resourceType":"Observation","status":"final","code":{{"text":"count"}},
                "subject":{{"reference":"Patient/{}"}},"valueInteger":{bad}}}"#,
            w.alice
        );
        let r = app
            .client
            .post(app.url("/fhir/Observation"))
            .bearer_auth(&w.doc.access)
            .header("content-type", "application/fhir+json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "valueInteger {bad}");
        let text = r.text().await.unwrap();
        assert!(text.contains("Observation.valueInteger") && !text.contains(bad), "{text}");
    }
    let ok = json!({"resourceType":"Observation","status":"final","code":{"text":"count"},
                    "subject":{"reference":format!("Patient/{}", w.alice)},"valueInteger":-7});
    assert_eq!(app.post(&w.doc, "/fhir/Observation", &ok).await.status(), 201);
});

fn encounter(patient: &str) -> Value {
    json!({"resourceType":"Encounter","status":"finished",
           "class":{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"AMB"},
           "subject":{"reference":format!("Patient/{patient}")}})
}

/// Status and raw body of a POST.
async fn post_raw(app: &TestApp, s: &Session, path: &str, body: &Value) -> (u16, String) {
    let r = app.post(s, path, body).await;
    (r.status().as_u16(), r.text().await.unwrap())
}

// A clinician cannot tell another patient's Encounter from a missing one, nor link a record of one patient to a
// record of another, whether or not both patients are in the clinician's care; same-patient links and links to
// the directory (Practitioner, Organization) work, on declared paths and on any other path.
both_backends!(references_stay_in_scope_and_in_the_patients_compartment, |app: TestApp| async move {
    let w = app.world().await;
    let enc_alice = app.create(&w.front, encounter(&w.alice)).await;
    let enc_bob = app.create(&w.front, encounter(&w.bob)).await;
    let linked = |patient: &str, enc: &str| {
        let mut o = observation(patient, "8480-6", 120.0, "2024-05-01T10:00:00Z");
        o["encounter"] = json!({"reference": format!("Encounter/{enc}")});
        o
    };
    let missing_id = uuid::Uuid::new_v4().to_string();

    // Bob is not in the doctor's care: his Encounter answers exactly like an id that does not exist.
    let missing = post_raw(&app, &w.doc, "/fhir/Observation", &linked(&w.alice, &missing_id)).await;
    assert_eq!(missing.0, 400, "{}", missing.1);
    assert!(missing.1.contains("Observation.encounter") && !missing.1.contains(&missing_id), "{}", missing.1);
    let out_of_scope = post_raw(&app, &w.doc, "/fhir/Observation", &linked(&w.alice, &enc_bob)).await;
    assert_eq!(out_of_scope, missing, "another patient's Encounter outside the caller's care");
    // A deleted record of Alice's is gone too.
    let gone = app.create(&w.doc, observation(&w.alice, "8480-6", 118.0, "2024-04-01T10:00:00Z")).await;
    let del = app.client.delete(app.url(&format!("/fhir/Observation/{gone}"))).bearer_auth(&w.doc.access);
    assert_eq!(del.send().await.unwrap().status(), 204);
    let member = |id: &str| {
        let mut o = observation(&w.alice, "8480-6", 119.0, "2024-05-01T10:00:00Z");
        o["hasMember"] = json!([{"reference": format!("Observation/{id}")}]);
        o
    };
    let deleted = post_raw(&app, &w.doc, "/fhir/Observation", &member(&gone)).await;
    assert_eq!(deleted.0, 400);
    assert_eq!(deleted, post_raw(&app, &w.doc, "/fhir/Observation", &member(&missing_id)).await, "deleted");
    // The same patient's Encounter: 201.
    let ok = post_raw(&app, &w.doc, "/fhir/Observation", &linked(&w.alice, &enc_alice)).await;
    assert_eq!(ok.0, 201, "{}", ok.1);

    // Bob joins the doctor's care: both patients are reachable, and still a record of Alice's cannot point into
    // Bob's compartment (nor the other way round), on the declared path or any other.
    app.create(
        &w.front,
        json!({"resourceType":"CareTeam","status":"active","subject":{"reference":format!("Patient/{}", w.bob)},
               "participant":[{"member":{"reference":format!("Practitioner/{}", w.doc_practitioner)}}]}),
    )
    .await;
    let cross = post_raw(&app, &w.doc, "/fhir/Observation", &linked(&w.alice, &enc_bob)).await;
    assert_eq!(cross, missing, "Alice's Observation into Bob's Encounter, both in the doctor's care");
    let cross_back = post_raw(&app, &w.doc, "/fhir/Observation", &linked(&w.bob, &enc_alice)).await;
    assert_eq!(cross_back.0, 400);
    let bobs = post_raw(&app, &w.doc, "/fhir/Observation", &linked(&w.bob, &enc_bob)).await;
    assert_eq!(bobs.0, 201, "{}", bobs.1);
    let mut performer = linked(&w.alice, &enc_alice);
    performer["performer"] = json!([{"reference": format!("Patient/{}", w.bob)}]);
    assert_eq!(post_raw(&app, &w.doc, "/fhir/Observation", &performer).await.0, 400, "performer: another patient");
    performer["performer"] = json!([{"reference": format!("Patient/{}", w.alice)},
                                    {"reference": format!("Practitioner/{}", w.doc_practitioner)},
                                    {"reference": format!("CareTeam/{}", w.care_team)}]);
    let (status, text) = post_raw(&app, &w.doc, "/fhir/Observation", &performer).await;
    assert_eq!(status, 201, "{text}");
    // An undeclared path (`focus`, an extension): checked the same way.
    let undeclared = |field: &str, value: Value| {
        let mut o = observation(&w.alice, "8480-6", 120.0, "2024-05-01T10:00:00Z");
        o[field] = value;
        o
    };
    let focus = |r: String| undeclared("focus", json!([{"reference": r}]));
    let focus_missing = post_raw(&app, &w.doc, "/fhir/Observation", &focus(format!("Encounter/{missing_id}"))).await;
    assert_eq!(focus_missing.0, 400);
    assert!(focus_missing.1.contains("Observation.focus"), "{}", focus_missing.1);
    let focus_cross = post_raw(&app, &w.doc, "/fhir/Observation", &focus(format!("Encounter/{enc_bob}"))).await;
    assert_eq!(focus_cross, focus_missing);
    assert_eq!(post_raw(&app, &w.doc, "/fhir/Observation", &focus(format!("Encounter/{enc_alice}"))).await.0, 201);
    let ext =
        |r: String| undeclared("extension", json!([{"url": "urn:x-test:related", "valueReference": {"reference": r}}]));
    let ext_cross = post_raw(&app, &w.doc, "/fhir/Observation", &ext(format!("Patient/{}", w.bob))).await;
    assert_eq!(ext_cross.0, 400);
    assert!(ext_cross.1.contains("Observation.extension.valueReference"), "{}", ext_cross.1);
    assert_eq!(post_raw(&app, &w.doc, "/fhir/Observation", &ext(format!("Patient/{}", w.alice))).await.0, 201);
    // Names of nothing here are refused on any path; another server's resource is kept as sent.
    for refused in [format!("urn:uuid:{missing_id}"), "Encounter?identifier=urn:x|1".to_owned(), "Encounter/1".into()] {
        assert_eq!(post_raw(&app, &w.doc, "/fhir/Observation", &focus(refused.clone())).await.0, 400, "{refused}");
        let mut declared = linked(&w.alice, &enc_alice);
        declared["encounter"] = json!({"reference": refused});
        assert_eq!(post_raw(&app, &w.doc, "/fhir/Observation", &declared).await.0, 400, "{refused}");
    }
    let elsewhere = format!("https://elsewhere.example/fhir/Encounter/{missing_id}");
    let (status, text) = post_raw(&app, &w.doc, "/fhir/Observation", &focus(elsewhere.clone())).await;
    assert_eq!(status, 201, "{text}");
    assert!(text.contains(&elsewhere));
    let here = format!("{}/Encounter/{enc_bob}", app.state.records.base());
    assert_eq!(post_raw(&app, &w.doc, "/fhir/Observation", &focus(here)).await, focus_missing, "absolute, here");

    // Directory targets only need to exist: Organization (undeclared `serviceProvider`), Practitioner.
    let org = app.create(&w.front, json!({"resourceType":"Organization","name":"Springfield General"})).await;
    let mut enc = encounter(&w.alice);
    enc["serviceProvider"] = json!({"reference": format!("Organization/{org}")});
    enc["participant"] = json!([{"individual": {"reference": format!("Practitioner/{}", w.other_practitioner)}}]);
    let (status, text) = post_raw(&app, &w.doc, "/fhir/Encounter", &enc).await;
    assert_eq!(status, 201, "{text}");
    enc["serviceProvider"] = json!({"reference": format!("Organization/{missing_id}")});
    let (status, text) = post_raw(&app, &w.doc, "/fhir/Encounter", &enc).await;
    assert_eq!(status, 400);
    assert!(text.contains("Encounter.serviceProvider"), "{text}");

    // An update is checked the same way: relinking Alice's Observation into Bob's Encounter is refused.
    let id = serde_json::from_str::<Value>(&ok.1).unwrap()["id"].as_str().unwrap().to_owned();
    let mut next = linked(&w.alice, &enc_bob);
    next["id"] = json!(id);
    let r = app.put(&w.doc, &format!("/fhir/Observation/{id}"), Some("1"), &next).await;
    assert_eq!(r.status(), 400);
    next["encounter"] = json!({"reference": format!("Encounter/{missing_id}")});
    let r2 = app.put(&w.doc, &format!("/fhir/Observation/{id}"), Some("1"), &next).await;
    assert_eq!(r2.status(), 400);
    assert_eq!(r.text().await.unwrap(), r2.text().await.unwrap());
    next["encounter"] = json!({"reference": format!("Encounter/{enc_alice}")});
    assert_eq!(app.put(&w.doc, &format!("/fhir/Observation/{id}"), Some("1"), &next).await.status(), 200);
});
