//! The US Core 6.1 types of CONTRACT §5a, end to end: each created by the role that may write it from its
//! example (tests/fixtures/fhir/*-carevault.json), read back as every role (full, shaped, 403 or 404 as §4
//! says), searched the way US Core clients search, stored encrypted; the front desk's write-only SSN; the 403
//! naming the element path; unsupported types answering `not-supported`.

use crate::both_backends;
use crate::helpers::{Session, TestApp};
use crate::world::{SSN_SYSTEM, World};
use serde_json::{Value, json};

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fhir").join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// The example with its references pointed at this test's resources.
fn example(ty: &str, refs: &[(&str, &str)]) -> Value {
    let mut text = fixture(&format!("{}-carevault.json", ty.to_lowercase())).to_string();
    for (from, to) in refs {
        text = text.replace(&format!("\"{from}/example\""), &format!("\"{from}/{to}\""));
    }
    assert!(!text.contains("/example\""), "{ty}: an unresolved reference");
    serde_json::from_str(&text).unwrap()
}

fn subsetted(v: &Value) -> bool {
    v["meta"]["tag"].as_array().is_some_and(|t| t.iter().any(|x| x["code"] == "SUBSETTED"))
}

fn without_meta(v: &Value) -> Value {
    let mut v = v.clone();
    v.as_object_mut().unwrap().remove("meta");
    v
}

/// What the type is, for CONTRACT §4.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Directory,
    Clinical,
    Financial,
}

const TYPES: [(&str, Kind); 17] = [
    ("Location", Kind::Directory),
    ("PractitionerRole", Kind::Directory),
    ("Medication", Kind::Directory),
    ("Procedure", Kind::Clinical),
    ("DiagnosticReport", Kind::Clinical),
    ("Immunization", Kind::Clinical),
    ("DocumentReference", Kind::Clinical),
    ("CarePlan", Kind::Clinical),
    ("Goal", Kind::Clinical),
    ("Device", Kind::Clinical),
    ("Provenance", Kind::Clinical),
    ("MedicationAdministration", Kind::Clinical),
    ("ImagingStudy", Kind::Clinical),
    ("SupplyDelivery", Kind::Clinical),
    ("Coverage", Kind::Financial),
    ("Claim", Kind::Financial),
    ("ExplanationOfBenefit", Kind::Financial),
];

/// Text of the examples' PHI elements: none may be stored in plaintext.
const CANARIES: [&str; 10] = [
    "Amy V. Shaw",
    "Appendectomy",
    "Uneventful laparoscopic",
    "Leukocytosis",
    "AAJN11K",
    "Cardiac pacemaker",
    "AB9876543",
    "Return to normal activity",
    "Post-operative wound care",
    "Acme Clinic",
];

fn writer<'a>(w: &'a World, ty: &str, kind: Kind) -> &'a Session {
    match kind {
        Kind::Directory if ty == "Medication" => &w.doc,
        Kind::Directory => &w.front,
        Kind::Clinical => &w.doc,
        Kind::Financial => &w.billing,
    }
}

/// Status of a read of Alice's resource of this kind, per role (CONTRACT §4).
fn expected_read(role: &str, kind: Kind) -> u16 {
    match (kind, role) {
        (Kind::Directory, _) => 200,
        (Kind::Clinical, "doc" | "nurse" | "alice") => 200,
        (Kind::Clinical, "other_doc") => 404,
        (Kind::Financial, "billing" | "alice") => 200,
        _ => 403,
    }
}

both_backends!(every_new_type_is_written_read_searched_and_stored_per_contract, |app: TestApp| async move {
    let w = app.world().await;
    let org = app.create(&w.front, json!({"resourceType":"Organization","name":"Acme Clinic"})).await;
    let mut refs: Vec<(&str, String)> =
        vec![("Patient", w.alice.clone()), ("Practitioner", w.doc_practitioner.clone()), ("Organization", org.clone())];
    let readers: [(&str, &Session); 8] = [
        ("front", &w.front),
        ("billing", &w.billing),
        ("auditor", &w.auditor),
        ("admin", &w.admin),
        ("doc", &w.doc),
        ("other_doc", &w.other_doc),
        ("nurse", &w.nurse),
        ("alice", &w.alice_user),
    ];
    let mut created = Vec::new();
    for (ty, kind) in TYPES {
        let r: Vec<(&str, &str)> = refs.iter().map(|(t, id)| (*t, id.as_str())).collect();
        let mut body = example(ty, &r);
        if ty == "Provenance" {
            // A provenance of Alice's procedure: the Patient among its targets is its compartment.
            let procedure = &created.iter().find(|(t, _, _)| *t == "Procedure").unwrap().1;
            body["target"] = json!([{"reference": format!("Procedure/{procedure}")},
                                    {"reference": format!("Patient/{}", w.alice)}]);
        }
        // Roles the contract does not let write this type are refused before anything is stored.
        for (name, s) in readers {
            // Admin keeps the directories; the other clinician may write clinical records and Medication too
            // (its refusal for Alice is the scope's, tested elsewhere).
            let may = std::ptr::eq(s, writer(&w, ty, kind))
                || (kind == Kind::Directory && name == "admin")
                || ((kind == Kind::Clinical || ty == "Medication") && name == "other_doc");
            if !may {
                let st = app.post(s, &format!("/fhir/{ty}"), &body).await.status().as_u16();
                assert!(st == 403, "{name} creates {ty}: {st}");
            }
        }
        let resp = app.post(writer(&w, ty, kind), &format!("/fhir/{ty}"), &body).await;
        let status = resp.status().as_u16();
        let out: Value = resp.json().await.unwrap();
        assert_eq!(status, 201, "create {ty}: {out}");
        app.assert_valid(&out);
        assert!(!subsetted(&out), "{ty}: the writer sees all it wrote");
        let id = out["id"].as_str().unwrap().to_owned();
        if ty == "Location" {
            refs.push(("Location", id.clone()));
        }
        created.push((ty, id, out));
    }
    // Read back as every role.
    for (ty, id, out) in &created {
        let kind = TYPES.iter().find(|(t, _)| t == ty).unwrap().1;
        for (name, s) in readers {
            let (st, got) = app.get_json(s, &format!("/fhir/{ty}/{id}")).await;
            assert_eq!(st, expected_read(name, kind), "{name} reads {ty}: {got}");
            if st == 200 {
                app.assert_valid(&got);
                assert_eq!(without_meta(&got), without_meta(out), "{name} sees all of {ty}");
                assert!(!subsetted(&got), "{name} {ty}");
            } else {
                assert_eq!(got["resourceType"], "OperationOutcome");
                assert!(!got.to_string().contains("Amy V. Shaw"));
            }
        }
    }
    // Searches US Core clients make (R4 parameter names), as a role that may read each.
    let a = &w.alice;
    for (s, query) in [
        (&w.doc, format!("Procedure?patient={a}&date=ge2023-01-01&status=completed")),
        (&w.doc, format!("Procedure?patient={a}&code=http://snomed.info/sct|80146002")),
        (&w.nurse, format!("DiagnosticReport?patient={a}&category=LAB&date=2023-02-02")),
        (&w.doc, format!("DiagnosticReport?patient={a}&code=http://loinc.org|58410-2")),
        (&w.doc, format!("Immunization?patient={a}&vaccine-code=http://hl7.org/fhir/sid/cvx|140&date=ge2022")),
        (&w.doc, format!("DocumentReference?patient={a}&type=http://loinc.org|34117-2&category=clinical-note")),
        (&w.doc, format!("CarePlan?patient={a}&category=assess-plan&status=active")),
        (&w.doc, format!("Goal?patient={a}&lifecycle-status=active")),
        (&w.doc, format!("Device?patient={a}&type=http://snomed.info/sct|14106009")),
        (&w.doc, format!("Provenance?patient={a}")),
        (&w.doc, format!("MedicationAdministration?patient={a}&status=completed")),
        (&w.doc, format!("ImagingStudy?patient={a}&modality=CT")),
        (&w.doc, format!("SupplyDelivery?patient={a}&status=completed")),
        (&w.billing, format!("Coverage?beneficiary={a}&status=active")),
        (&w.billing, format!("Claim?patient={a}&use=claim")),
        (&w.billing, format!("ExplanationOfBenefit?patient={a}&created=ge2023-02-01")),
        (&w.alice_user, "Claim".to_owned()),
        (&w.alice_user, "Procedure".to_owned()),
        (&w.front, "Location?address-city=Springfield".to_owned()),
        (&w.billing, format!("PractitionerRole?practitioner={}", w.doc_practitioner)),
        (&w.nurse, "Medication?code=http://www.nlm.nih.gov/research/umls/rxnorm|1049221".to_owned()),
    ] {
        let (st, b) = app.get_json(s, &format!("/fhir/{query}")).await;
        assert_eq!(st, 200, "{query}: {b}");
        app.assert_valid(&b);
        assert_eq!(b["entry"].as_array().map(Vec::len), Some(1), "{query}: {b}");
    }
    // Out of scope: the other clinician's searches find nothing; Bob's compartment holds none of it.
    let (_, b) = app.get_json(&w.other_doc, "/fhir/Procedure?_summary=count").await;
    assert_eq!(b["total"], 0);
    let (_, b) = app.get_json(&w.billing, &format!("/fhir/Claim?patient={}&_summary=count", w.bob)).await;
    assert_eq!(b["total"], 0);
    // A Provenance naming two patients belongs to no compartment: refused.
    let two = json!({"resourceType":"Provenance","recorded":"2023-02-03T12:05:00-05:00",
        "target":[{"reference":format!("Patient/{}", w.alice)},{"reference":format!("Patient/{}", w.bob)}],
        "agent":[{"who":{"reference":format!("Practitioner/{}", w.doc_practitioner)}}]});
    assert_eq!(app.post(&w.doc, "/fhir/Provenance", &two).await.status(), 400);
    // $everything carries the new clinical types for the clinician.
    let (st, all) = app.get_json(&w.doc, &format!("/fhir/Patient/{}/$everything", w.alice)).await;
    assert_eq!(st, 200);
    app.assert_valid(&all);
    let types: Vec<&str> =
        all["entry"].as_array().unwrap().iter().filter_map(|e| e["resource"]["resourceType"].as_str()).collect();
    for (ty, kind) in TYPES {
        assert_eq!(types.contains(&ty), kind == Kind::Clinical, "$everything {ty}: {types:?}");
    }

    // A raw scan of what is stored: no PHI of the examples in plaintext, anywhere.
    use carevault::store::schema::{resource_history, resources, search_index};
    use diesel::prelude::*;
    let mut conn = app.state.db.conn().unwrap();
    let mut stored: Vec<String> = resources::table.select(resources::content).load(&mut conn).unwrap();
    stored.extend(resource_history::table.select(resource_history::content).load::<String>(&mut conn).unwrap());
    stored.extend(search_index::table.select(search_index::value).load::<String>(&mut conn).unwrap());
    let all_text = stored.join("\n");
    assert!(all_text.contains(&w.alice), "the scan reads the stored rows");
    for canary in CANARIES {
        assert!(!all_text.contains(canary), "{canary} is stored in plaintext");
    }
    // The plain elements are the declared ones: a stored Procedure shows its status, nothing else readable.
    let procedure = &created.iter().find(|(t, _, _)| *t == "Procedure").unwrap().1;
    let content: String = resources::table
        .filter(resources::resource_type.eq("Procedure"))
        .filter(resources::id.eq(procedure))
        .select(resources::content)
        .first(&mut conn)
        .unwrap();
    let doc: serde_json::Map<String, Value> = serde_json::from_str(&content).unwrap();
    assert_eq!(doc["status"], "completed");
    assert!(doc["subject"].as_str().is_some_and(|c| c.starts_with("cv1:")), "the patient link is encrypted");
    assert!(doc["code"].as_str().is_some_and(|c| c.starts_with("cv1:")));
});

/// A complete US Core Patient as a registration desk sends it: identifiers (MRN and SSN), name, telecom,
/// gender, birth date, address, active, communication, race / ethnicity / birth sex extensions, profile claim.
fn us_core_patient(ssn: &str) -> Value {
    json!({"resourceType":"Patient",
        "meta":{"profile":["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},
        "extension":[
            {"url":"http://hl7.org/fhir/us/core/StructureDefinition/us-core-race","extension":[
                {"url":"ombCategory","valueCoding":{"system":"urn:oid:2.16.840.1.113883.6.238","code":"2106-3","display":"White"}},
                {"url":"text","valueString":"White"}]},
            {"url":"http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity","extension":[
                {"url":"ombCategory","valueCoding":{"system":"urn:oid:2.16.840.1.113883.6.238","code":"2186-5","display":"Not Hispanic or Latino"}},
                {"url":"text","valueString":"Not Hispanic or Latino"}]},
            {"url":"http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex","valueCode":"F"}],
        "identifier":[
            {"use":"usual","type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"MR"}]},
             "system":"urn:oid:1.2.36.146.595.217.0.1","value":"MRN-7781"},
            {"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"SS"}]},
             "system":SSN_SYSTEM,"value":ssn}],
        "active":true,
        "name":[{"use":"official","family":"Quarrington","given":["Edwina","Mae"]}],
        "telecom":[{"system":"phone","value":"555-201-7781","use":"home"}],
        "gender":"female","birthDate":"1987-02-20",
        "address":[{"line":["49 Meadow St"],"city":"Mounds","state":"OK","postalCode":"74047","country":"US"}],
        "communication":[{"language":{"coding":[{"system":"urn:ietf:bcp:47","code":"en-US"}]},"preferred":true}]})
}

async fn put_json(app: &TestApp, s: &Session, path: &str, version: &str, body: &Value) -> (u16, Value) {
    let r = app.put(s, path, Some(version), body).await;
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

both_backends!(front_desk_writes_the_ssn_blind, |app: TestApp| async move {
    let w = app.world().await;
    let (old, new) = ("512-44-7781", "512-44-9902");
    // Registration: 201, and the body returned to the front desk has no SSN.
    let resp = app.post(&w.front, "/fhir/Patient", &us_core_patient(old)).await;
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    app.assert_valid(&created);
    assert!(!created.to_string().contains(old) && subsetted(&created), "{created}");
    for kept in ["extension", "communication", "active", "telecom"] {
        assert!(created.get(kept).is_some(), "{kept}: {created}");
    }
    assert_eq!(created["identifier"].as_array().unwrap().len(), 1, "the MRN only");
    assert_eq!(created["meta"]["profile"], json!(["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]));
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("/fhir/Patient/{id}");
    // Front desk reads: no SSN, and it is never decrypted for it (the restricted part is left encrypted).
    let before = app.state.cipher.decryption_count();
    let (_, seen) = app.get_json(&w.front, &path).await;
    let front_decryptions = app.state.cipher.decryption_count() - before;
    assert!(!seen.to_string().contains(old) && seen["extension"].is_array());
    let before = app.state.cipher.decryption_count();
    let (_, b) = app.get_json(&w.billing, &path).await;
    let billing_decryptions = app.state.cipher.decryption_count() - before;
    assert!(b.to_string().contains(old), "billing sees the SSN: {b}");
    // The front desk has every stored element decrypted but the SSN, kept apart; billing has the SSN decrypted.
    let stored: serde_json::Map<String, Value> = {
        use carevault::store::schema::resources;
        use diesel::prelude::*;
        let mut conn = app.state.db.conn().unwrap();
        let c: String =
            resources::table.filter(resources::id.eq(&id)).select(resources::content).first(&mut conn).unwrap();
        serde_json::from_str(&c).unwrap()
    };
    let restricted = carevault::records::RESTRICTED_IDENTIFIERS;
    assert!(stored.contains_key(restricted) && !stored.values().any(|v| v.to_string().contains(old)));
    let encrypted = |k: &String| stored[k].as_str().is_some_and(|c| c.starts_with("cv1:"));
    let others = stored.keys().filter(|k| *k != restricted && encrypted(k)).count();
    assert_eq!(front_decryptions, others as u64, "the front desk never has the SSN decrypted");
    let billing_sees = ["identifier", "name", "birthDate", "address", "meta", restricted];
    let billing_stored = stored.keys().filter(|k| billing_sees.contains(&k.as_str()) && encrypted(k)).count();
    assert_eq!(billing_decryptions, billing_stored as u64);
    // The clinician and nurse never see it.
    let doc_team = json!({"resourceType":"CareTeam","status":"active","subject":{"reference":format!("Patient/{id}")},
        "participant":[{"member":{"reference":format!("Practitioner/{}", w.doc_practitioner)}}]});
    app.create(&w.front, doc_team).await;
    let (st, c) = app.get_json(&w.doc, &path).await;
    assert_eq!(st, 200);
    assert!(!c.to_string().contains(old) && c["communication"].is_array());

    // An update that sends no SSN keeps it; the response has none.
    let mut p = seen.clone();
    p["name"][0]["family"] = json!("Quarrington-Vale");
    let (st, put) = put_json(&app, &w.front, &path, "1", &p).await;
    assert_eq!(st, 200, "{put}");
    assert!(!put.to_string().contains(old));
    let (_, b) = app.get_json(&w.billing, &path).await;
    assert!(b.to_string().contains(old) && b["name"][0]["family"] == "Quarrington-Vale", "{b}");
    // An update that sends an SSN replaces the stored one (never read); the response has neither.
    let mut p = app.get_json(&w.front, &path).await.1;
    p["identifier"].as_array_mut().unwrap().push(json!({"system":"urn:oid:2.16.840.1.113883.4.1","value":new}));
    let (st, put) = put_json(&app, &w.front, &path, "2", &p).await;
    assert_eq!(st, 200, "{put}");
    assert!(!put.to_string().contains(new) && !put.to_string().contains(old));
    let (_, b) = app.get_json(&w.billing, &path).await;
    assert!(b.to_string().contains(new) && !b.to_string().contains(old), "{b}");
    assert_eq!(b["identifier"].as_array().unwrap().len(), 2, "the MRN and the one new SSN: {b}");

    // Nobody else writes an SSN; the refusal names the element path, never the value.
    let mut p = app.get_json(&w.doc, &path).await.1;
    p["identifier"] = json!([{"system":SSN_SYSTEM,"value":"999-00-1111"}]);
    let r = app.put(&w.doc, &path, Some("3"), &p).await;
    assert_eq!(r.status(), 403);
    assert!(!r.text().await.unwrap().contains("999-00-1111"));
    let pr = format!("/fhir/Practitioner/{}", w.other_practitioner);
    let mut body = app.get_json(&w.front, &pr).await.1;
    body["identifier"] = json!([{"system":SSN_SYSTEM,"value":"999-00-2222"}]);
    let (st, oo) = put_json(&app, &w.front, &pr, "1", &body).await;
    assert_eq!(st, 403);
    assert_eq!(oo["issue"][0]["code"], "forbidden");
    assert_eq!(oo["issue"][0]["expression"], json!(["Practitioner.identifier"]), "{oo}");
    assert!(!oo.to_string().contains("999-00-2222"));
    // An element outside the front desk's mask: 403 naming Patient.maritalStatus, not the value sent.
    let mut p = app.get_json(&w.front, &path).await.1;
    p["maritalStatus"] = json!({"text":"Widowed-CANARY"});
    let (st, oo) = put_json(&app, &w.front, &path, "3", &p).await;
    assert_eq!(st, 403);
    assert_eq!(oo["issue"][0]["expression"], json!(["Patient.maritalStatus"]), "{oo}");
    assert!(!oo.to_string().contains("CANARY"));
    // A choice element is named by its R4 name.
    let mut p = app.get_json(&w.front, &path).await.1;
    p["deceasedDateTime"] = json!("2024-01-01");
    let (st, oo) = put_json(&app, &w.front, &path, "3", &p).await;
    assert_eq!(st, 403);
    assert_eq!(oo["issue"][0]["expression"], json!(["Patient.deceased[x]"]), "{oo}");
    // The front desk still cannot search by SSN (write-only is not findable either).
    let q = serde_urlencoded::to_string([("identifier", format!("{SSN_SYSTEM}|{new}"))]).unwrap();
    assert_eq!(app.get(&w.front, &format!("/fhir/Patient?{q}")).await.status(), 403);
});

both_backends!(unserved_r4_types_are_not_supported, |app: TestApp| async move {
    let w = app.world().await;
    for (method, path) in [("GET", "/fhir/Basic/x"), ("POST", "/fhir/Substance"), ("GET", "/fhir/Specimen?patient=x")] {
        let r = match method {
            "GET" => app.get(&w.doc, path).await,
            _ => app.post(&w.doc, path, &json!({"resourceType":"Substance","code":{"text":"x"}})).await,
        };
        assert_eq!(r.status(), 404, "{method} {path}");
        let oo: Value = r.json().await.unwrap();
        assert_eq!(oo["issue"][0]["code"], "not-supported", "{method} {path}: {oo}");
        app.assert_valid(&oo);
    }
    // A name that is no R4 type at all stays the plain not-found.
    let (st, oo) = app.get_json(&w.doc, "/fhir/Frobnicator/x").await;
    assert_eq!((st, oo["issue"][0]["code"].as_str()), (404, Some("not-found")), "{oo}");
});
