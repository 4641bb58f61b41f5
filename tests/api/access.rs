//! Minimum necessary on every path: object-level scope (care teams, own compartment, break-glass), field
//! masks with SUBSETTED, hidden fields surviving writes, and fields outside the mask never decrypted.

use crate::both_backends;
use crate::helpers::TestApp;
use crate::world::{SSN_SYSTEM, observation};
use serde_json::{Value, json};
use time::Duration;

fn has_ssn(v: &Value) -> bool {
    v.to_string().contains("123-45-6789")
}

fn subsetted(v: &Value) -> bool {
    v["meta"]["tag"].as_array().is_some_and(|t| t.iter().any(|x| x["code"] == "SUBSETTED"))
}

both_backends!(care_team_scope_on_every_id_route_and_search, |app: TestApp| async move {
    let w = app.world().await;
    let obs = app.create(&w.doc, observation(&w.alice, "8480-6", 120.0, "2024-05-01T10:00:00Z")).await;
    // The clinician on the care team reaches Alice; the other clinician gets 404 exactly like a missing id.
    let missing = "00000000-0000-4000-8000-000000000001";
    for path in [
        format!("/fhir/Patient/{}", w.alice),
        format!("/fhir/Patient/{}/_history", w.alice),
        format!("/fhir/Patient/{}/_history/1", w.alice),
        format!("/fhir/Patient/{}/$everything", w.alice),
        format!("/fhir/Observation/{obs}"),
        format!("/fhir/Observation/{obs}/_history/1"),
    ] {
        assert_eq!(app.get(&w.doc, &path).await.status(), 200, "{path}");
        let other = app.get(&w.other_doc, &path).await;
        assert_eq!(other.status(), 404, "{path}");
        let absent = app.get(&w.other_doc, &path.replace(&w.alice, missing).replace(&obs, missing)).await;
        assert_eq!(absent.status(), 404);
        assert_eq!(other.text().await.unwrap(), absent.text().await.unwrap(), "out of scope looks like absent");
    }
    // Searches never count what the caller cannot see.
    let (_, b) = app.get_json(&w.other_doc, "/fhir/Observation?_summary=count").await;
    assert_eq!(b["total"], 0);
    let (_, b) = app.get_json(&w.other_doc, "/fhir/Patient?_summary=count").await;
    assert_eq!(b["total"], 0);
    let (_, b) = app.get_json(&w.doc, "/fhir/Patient?_summary=count").await;
    assert_eq!(b["total"], 1, "only the care-team patient, never Bob");
    // Writes out of scope: the other clinician cannot update or delete Alice's observation.
    let mut o: Value = app.get_json(&w.doc, &format!("/fhir/Observation/{obs}")).await.1;
    o["status"] = json!("amended");
    assert_eq!(app.put(&w.other_doc, &format!("/fhir/Observation/{obs}"), Some("1"), &o).await.status(), 404);
    let del = app
        .client
        .delete(app.url(&format!("/fhir/Observation/{obs}")))
        .bearer_auth(&w.other_doc.access)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 404);
    // Creating for a patient out of scope looks like a reference to a missing patient.
    assert_eq!(
        app.post(&w.other_doc, "/fhir/Observation", &observation(&w.alice, "1", 1.0, "2024-01-01")).await.status(),
        400
    );
    // Leaving the care team takes effect on the next request.
    let ct_path = format!("/fhir/CareTeam/{}", w.care_team);
    let mut ct = app.get_json(&w.front, &ct_path).await.1;
    ct["status"] = json!("inactive");
    assert_eq!(app.put(&w.front, &ct_path, Some("1"), &ct).await.status(), 200);
    assert_eq!(app.get(&w.doc, &format!("/fhir/Patient/{}", w.alice)).await.status(), 404);
});

both_backends!(patients_see_only_their_own_compartment, |app: TestApp| async move {
    let w = app.world().await;
    app.create(&w.doc, observation(&w.alice, "8480-6", 120.0, "2024-05-01T10:00:00Z")).await;
    let (s, me) = app.get_json(&w.alice_user, &format!("/fhir/Patient/{}", w.alice)).await;
    assert_eq!(s, 200);
    assert!(has_ssn(&me), "a patient sees all of their own record");
    let before = app.audit_count().await;
    assert_eq!(app.get(&w.alice_user, &format!("/fhir/Patient/{}", w.bob)).await.status(), 404);
    assert_eq!(app.audit_count().await, before + 1, "a refused read is audited too");
    let (_, obs) = app.get_json(&w.alice_user, "/fhir/Observation").await;
    assert_eq!(obs["entry"].as_array().unwrap().len(), 1);
    assert_eq!(
        app.post(&w.alice_user, "/fhir/Observation", &observation(&w.alice, "1", 1.0, "2024-01-01")).await.status(),
        403
    );
    assert_eq!(app.get(&w.alice_user, "/fhir/AuditEvent").await.status(), 403);
});

both_backends!(field_masks_on_read_search_history_and_write_bodies, |app: TestApp| async move {
    let w = app.world().await;
    let alice = format!("/fhir/Patient/{}", w.alice);
    // Front desk: demographics without the SSN, tagged SUBSETTED, on read, search, history and vread.
    for path in [alice.clone(), format!("{alice}/_history/1")] {
        let (_, p) = app.get_json(&w.front, &path).await;
        assert!(!has_ssn(&p) && subsetted(&p), "{path}: {p}");
        assert_eq!(p["identifier"][0]["value"], "MRN-1");
        app.assert_valid(&p);
    }
    let (_, bundle) = app.get_json(&w.front, "/fhir/Patient?family=zoe-lindqvist").await;
    assert!(!has_ssn(&bundle) && subsetted(&bundle["entry"][0]["resource"]));
    let (_, hist) = app.get_json(&w.front, &format!("{alice}/_history")).await;
    assert!(!has_ssn(&hist));
    // Billing sees the SSN but not the telecom.
    let (_, b) = app.get_json(&w.billing, &alice).await;
    assert!(has_ssn(&b) && b.get("telecom").is_none() && subsetted(&b));
    // Clinicians see no SSN.
    let (_, c) = app.get_json(&w.doc, &alice).await;
    assert!(!has_ssn(&c) && c["telecom"].is_array());
    // A front-desk PUT keeps the SSN it was not shown.
    let mut p = app.get_json(&w.front, &alice).await.1;
    p["name"][0]["family"] = json!("Lindqvist");
    let put = app.put(&w.front, &alice, Some("1"), &p).await;
    assert_eq!(put.status(), 200);
    let body: Value = put.json().await.unwrap();
    assert!(!has_ssn(&body), "the write body is shaped too");
    let (_, b) = app.get_json(&w.billing, &alice).await;
    assert!(has_ssn(&b), "SSN survived the front-desk update");
    assert_eq!(b["name"][0]["family"], "Lindqvist");
    // Sending an SSN is refused for a role that may not write it (no overwrite, no probing): the front desk
    // writes a patient's SSN blind (tests/api/types.rs) but never a practitioner's.
    let pr = format!("/fhir/Practitioner/{}", w.doc_practitioner);
    let mut body = app.get_json(&w.front, &pr).await.1;
    body["identifier"] = json!([{"system":SSN_SYSTEM,"value":"999-99-9999"}]);
    assert_eq!(app.put(&w.front, &pr, Some("1"), &body).await.status(), 403);
    // Billing: Condition code/subject/encounter only.
    let cond = app
        .create(
            &w.doc,
            json!({"resourceType":"Condition","subject":{"reference":format!("Patient/{}", w.alice)},
            "code":{"text":"Hypertension"},"note":[{"text":"CANARY-NOTE lives alone"}],"recordedDate":"2024-02-02"}),
        )
        .await;
    let (_, c) = app.get_json(&w.billing, &format!("/fhir/Condition/{cond}")).await;
    assert!(
        c.get("note").is_none()
            && c.get("recordedDate").is_none()
            && c["code"]["text"] == "Hypertension"
            && subsetted(&c)
    );
    // Front desk may not read clinical resources at all.
    assert_eq!(app.get(&w.front, &format!("/fhir/Condition/{cond}")).await.status(), 403);
    assert_eq!(app.get(&w.front, "/fhir/Observation").await.status(), 403);
    // Searching by what one may not see is refused.
    assert_eq!(app.get(&w.front, &format!("/fhir/Patient?identifier={SSN_SYSTEM}|123-45-6789")).await.status(), 403);
    // Every spelling of the SSN system is the SSN: searching by one is refused too.
    for system in ["urn:oid:2.16.840.1.113883.4.1", "HTTPS://hl7.org/fhir/sid/us-ssn/"] {
        let q = serde_urlencoded::to_string([("identifier", format!("{system}|123-45-6789"))]).unwrap();
        assert_eq!(app.get(&w.front, &format!("/fhir/Patient?{q}")).await.status(), 403, "{system}");
    }
});

// An SSN stored under the OID, in upper case or typed `SS` is the SSN: kept apart, shown only to billing/admin.
both_backends!(ssn_variants_are_one_class, |app: TestApp| async move {
    let w = app.world().await;
    let variants = [
        json!({"system": "urn:oid:2.16.840.1.113883.4.1", "value": "987-65-4321"}),
        json!({"system": "HTTPS://HL7.ORG/fhir/sid/us-ssn/", "value": "987-65-4322"}),
        json!({"system": "urn:x-local", "value": "987-65-4323",
               "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "SS"}]}}),
    ];
    for v in &variants {
        app.seed_identifier(&w.alice, v.clone());
    }
    let path = format!("/fhir/Patient/{}", w.alice);
    for who in [&w.doc, &w.front, &w.nurse] {
        let (st, body) = app.get_json(who, &path).await;
        assert_eq!(st, 200);
        assert!(!body.to_string().contains("987-65-43"), "{body}");
    }
    let (_, billing) = app.get_json(&w.billing, &path).await;
    for n in 1..=3 {
        assert!(billing.to_string().contains(&format!("987-65-432{n}")), "{billing}");
    }
});

both_backends!(fields_outside_the_mask_are_never_decrypted, |app: TestApp| async move {
    let w = app.world().await;
    let cond = app
        .create(
            &w.doc,
            json!({"resourceType":"Condition","subject":{"reference":format!("Patient/{}", w.alice)},
            "code":{"text":"Asthma"},"note":[{"text":"n"}],"recordedDate":"2024-02-02","onsetDateTime":"2020-01-01",
            "bodySite":[{"text":"lung"}],"severity":{"text":"mild"}}),
        )
        .await;
    let path = format!("/fhir/Condition/{cond}");
    let before = app.state.cipher.decryption_count();
    assert_eq!(app.get(&w.billing, &path).await.status(), 200);
    let billing = app.state.cipher.decryption_count() - before;
    let before = app.state.cipher.decryption_count();
    assert_eq!(app.get(&w.doc, &path).await.status(), 200);
    let clinician = app.state.cipher.decryption_count() - before;
    // Billing may see code and subject (encounter is absent): exactly two decryptions; the clinician all seven.
    assert_eq!(billing, 2, "billing decrypted {billing}");
    assert_eq!(clinician, 7, "clinician decrypted {clinician}");
});

/// The stored (encrypted) top-level elements of a resource.
fn stored(app: &TestApp, id: &str) -> serde_json::Map<String, Value> {
    use carevault::store::schema::resources;
    use diesel::prelude::*;
    let mut conn = app.state.db.conn().unwrap();
    let content: String =
        resources::table.filter(resources::id.eq(id)).select(resources::content).first(&mut conn).unwrap();
    serde_json::from_str(&content).unwrap()
}

fn set_stored(app: &TestApp, id: &str, doc: &serde_json::Map<String, Value>) {
    use carevault::store::schema::resources;
    use diesel::prelude::*;
    let mut conn = app.state.db.conn().unwrap();
    diesel::update(resources::table.filter(resources::id.eq(id)))
        .set(resources::content.eq(Value::Object(doc.clone()).to_string()))
        .execute(&mut conn)
        .unwrap();
}

both_backends!(a_hidden_ssn_is_never_decrypted_even_inside_identifier, |app: TestApp| async move {
    use carevault::crypto::FieldAad;
    use carevault::records::RESTRICTED_IDENTIFIERS;
    let w = app.world().await;
    let alice = format!("/fhir/Patient/{}", w.alice);
    // The SSN is stored apart: `identifier` holds the MRN only, `identifier#restricted` the SSN and its position.
    let doc = stored(&app, &w.alice);
    let open = |element: &str| {
        let ct = doc[element].as_str().unwrap();
        app.state.cipher.decrypt_json(&FieldAad::new("Patient", &w.alice, element), ct).unwrap()
    };
    assert_eq!(open("identifier"), json!([{"system":"urn:mrn","value":"MRN-1"}]));
    assert_eq!(open(RESTRICTED_IDENTIFIERS), json!([[1, {"system":SSN_SYSTEM,"value":"123-45-6789"}]]));

    // Damage the SSN's ciphertext: whoever may not see the SSN reads on (it is never decrypted for them); billing
    // and the patient herself, who may, get the generic 500 (fail closed), never a record without it.
    let mut damaged = doc.clone();
    let ct = doc[RESTRICTED_IDENTIFIERS].as_str().unwrap();
    let flipped = if ct.ends_with('A') { 'B' } else { 'A' };
    damaged[RESTRICTED_IDENTIFIERS] = json!(format!("{}{flipped}", &ct[..ct.len() - 1]));
    set_stored(&app, &w.alice, &damaged);
    for who in [&w.front, &w.doc, &w.nurse] {
        let (status, p) = app.get_json(who, &alice).await;
        assert_eq!(status, 200, "{p}");
        assert!(!has_ssn(&p) && p["identifier"][0]["value"] == "MRN-1", "{p}");
    }
    assert_eq!(app.get(&w.billing, &alice).await.status(), 500);
    assert_eq!(app.get(&w.alice_user, &alice).await.status(), 500);

    // A front-desk update carries the SSN over as the very same ciphertext, without opening it.
    let mut p = app.get_json(&w.front, &alice).await.1;
    p["telecom"] = json!([{"system":"phone","value":"555-0199"}]);
    assert_eq!(app.put(&w.front, &alice, Some("1"), &p).await.status(), 200);
    let after = stored(&app, &w.alice);
    assert_eq!(after[RESTRICTED_IDENTIFIERS], damaged[RESTRICTED_IDENTIFIERS]);

    // With the ciphertext repaired, billing and the patient see the SSN back in its original place.
    let mut repaired = after.clone();
    repaired[RESTRICTED_IDENTIFIERS] = doc[RESTRICTED_IDENTIFIERS].clone();
    set_stored(&app, &w.alice, &repaired);
    let (status, b) = app.get_json(&w.billing, &alice).await;
    assert_eq!(status, 200);
    assert_eq!(b["identifier"][1], json!({"system":SSN_SYSTEM,"value":"123-45-6789"}), "{b}");
    assert_eq!(b["identifier"][0]["value"], "MRN-1");
    assert!(has_ssn(&app.get_json(&w.alice_user, &alice).await.1));
});

both_backends!(break_glass_opens_one_patient_for_a_limited_time, |app: TestApp| async move {
    let w = app.world().await;
    let bob = format!("/fhir/Patient/{}", w.bob);
    assert_eq!(app.get(&w.nurse, &bob).await.status(), 404);
    let bg = |s: &crate::helpers::Session, body: Value| {
        let app = &app;
        let s = s.clone();
        async move { app.client.post(app.url("/auth/break-glass")).bearer_auth(&s.access).json(&body).send().await.unwrap() }
    };
    assert_eq!(bg(&w.nurse, json!({"patient":format!("Patient/{}", w.bob),"reason":""})).await.status(), 400);
    assert_eq!(
        bg(&w.billing, json!({"patient":format!("Patient/{}", w.bob),"reason":"billing emergency"})).await.status(),
        403
    );
    assert_eq!(bg(&w.front, json!({"patient":format!("Patient/{}", w.bob),"reason":"x"})).await.status(), 403);
    let r = bg(&w.nurse, json!({"patient":format!("Patient/{}", w.bob),"reason":"CANARY-BTG unconscious in ER"})).await;
    assert_eq!(r.status(), 201);
    assert_eq!(app.get(&w.nurse, &bob).await.status(), 200);
    assert_eq!(app.get(&w.other_doc, &bob).await.status(), 404, "the grant is the nurse's alone");
    // Audited with purpose of use BTG; the reason never enters the trail.
    let (_, events) = app.get_json(&w.auditor, &format!("/fhir/AuditEvent?patient={}", w.bob)).await;
    let text = events.to_string();
    assert!(text.contains("\"BTG\""), "{text}");
    assert!(!text.contains("CANARY-BTG"));
    app.clock.advance(Duration::minutes(61));
    let s = app.login_as("nurse").await;
    assert_eq!(app.get(&s, &bob).await.status(), 404, "the grant expired");
});

both_backends!(admin_sees_no_phi_and_everyone_reads_the_directory, |app: TestApp| async move {
    let w = app.world().await;
    for path in [format!("/fhir/Patient/{}", w.alice), "/fhir/Observation".to_owned(), "/fhir/AuditEvent".to_owned()] {
        assert_eq!(app.get(&w.admin, &path).await.status(), 403, "{path}");
    }
    for s in [&w.admin, &w.alice_user, &w.billing, &w.auditor, &w.nurse] {
        for id in [&w.other_practitioner, &w.nurse_practitioner] {
            let (status, p) = app.get_json(s, &format!("/fhir/Practitioner/{id}")).await;
            assert_eq!(status, 200);
            app.assert_valid(&p);
        }
    }
});
