//! The write interactions of CONTRACT §5a on both backends: conditional create / update / delete, JSON Patch and
//! JSON Merge Patch, `$validate`, `fhir.require_if_match`, and batch / transaction Bundles (atomicity, `urn:uuid:`
//! resolution, conditional entries, per-entry audit, the Bundle body limit).

use crate::both_backends;
use crate::both_backends_with;
use crate::helpers::{Session, TestApp};
use crate::world::observation;
use carevault::store::schema::{audit_events, resources};
use diesel::prelude::*;
use serde_json::{Value, json};

impl TestApp {
    /// The request-path audit events (alerts left out) appended after the first `after` events, in order.
    pub fn events_after(&self, after: i64) -> Vec<Value> {
        let mut conn = self.state.db.conn().unwrap();
        let bodies: Vec<String> = audit_events::table
            .filter(audit_events::seq.gt(after))
            .filter(audit_events::kind.ne("alert"))
            .order(audit_events::seq.asc())
            .select(audit_events::body)
            .load(&mut conn)
            .unwrap();
        bodies.iter().map(|b| serde_json::from_str(b).unwrap()).collect()
    }

    /// The newest audit sequence number (0 when empty).
    pub fn last_seq(&self) -> i64 {
        let mut conn = self.state.db.conn().unwrap();
        audit_events::table
            .select(diesel::dsl::max(audit_events::seq))
            .first::<Option<i64>>(&mut conn)
            .unwrap()
            .unwrap_or(0)
    }

    /// Current (not deleted) resources of a type, counted in the database.
    pub fn live_count(&self, rtype: &str) -> i64 {
        let mut conn = self.state.db.conn().unwrap();
        resources::table
            .filter(resources::resource_type.eq(rtype))
            .filter(resources::deleted.eq(false))
            .count()
            .get_result(&mut conn)
            .unwrap()
    }

    pub async fn send(
        &self,
        s: &Session,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut rb = self.client.request(method, self.url(path)).bearer_auth(&s.access);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.body(b.to_string());
            if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
                rb = rb.header("content-type", "application/fhir+json");
            }
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        (status, headers, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

fn patient(family: &str, mrn: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family, "given": ["Test"]}], "gender": "other",
           "identifier": [{"system": "urn:mrn", "value": mrn}]})
}

both_backends!(conditional_create_makes_one_resource_however_often_it_is_sent, |app: TestApp| async move {
    let w = app.world().await;
    let body = patient("Quist", "MRN-77");
    let before = app.live_count("Patient");
    let cond = [("if-none-exist", "identifier=urn:mrn|MRN-77")];
    let (s1, h1, first) = app.send(&w.front, reqwest::Method::POST, "/fhir/Patient", &cond, Some(&body)).await;
    assert_eq!(s1, 201, "{first}");
    assert!(h1.contains_key("location"));
    let seq = app.last_seq();
    let (s2, h2, second) = app.send(&w.front, reqwest::Method::POST, "/fhir/Patient", &cond, Some(&body)).await;
    assert_eq!(s2, 200, "{second}");
    assert!(!h2.contains_key("location"));
    assert_eq!(first["id"], second["id"]);
    app.assert_valid(&second);
    assert_eq!(app.live_count("Patient"), before + 1, "one resource, not two");
    // The match is audited as what it disclosed: that resource, no write.
    let events = app.events_after(seq);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((&events[0]["kind"], &events[0]["outcome"]), (&json!("create"), &json!("0")));
    assert_eq!(events[0]["detail"], "conditional-match");
    assert_eq!(events[0]["resource_id"], first["id"]);
    assert_eq!(events[0]["query_params"], json!(["identifier"]));
    // Two matches: 412, nothing created.
    app.create(&w.front, patient("Quist", "MRN-78")).await;
    let both = [("if-none-exist", "family=Quist")];
    let (s3, _, outcome) = app.send(&w.front, reqwest::Method::POST, "/fhir/Patient", &both, Some(&body)).await;
    assert_eq!(s3, 412, "{outcome}");
    assert!(!outcome.to_string().contains("Quist"));
    assert_eq!(app.live_count("Patient"), before + 2);
    // A match outside the caller's reach is not seen: the clinician off the care team creates its own.
    let obs = observation(&w.alice, "8480-6", 120.0, "2024-05-01T10:00:00Z");
    let (s4, _, _) = app
        .send(&w.doc, reqwest::Method::POST, "/fhir/Observation", &[("if-none-exist", "code=8480-6")], Some(&obs))
        .await;
    assert_eq!(s4, 201);
    let (s5, _, _) = app
        .send(&w.doc, reqwest::Method::POST, "/fhir/Observation", &[("if-none-exist", "code=8480-6")], Some(&obs))
        .await;
    assert_eq!(s5, 200);
});

both_backends!(conditional_update_creates_updates_or_refuses_ambiguity, |app: TestApp| async move {
    let w = app.world().await;
    let path = "/fhir/Patient?identifier=urn:mrn|MRN-90";
    let (s1, h1, created) = app.send(&w.front, reqwest::Method::PUT, path, &[], Some(&patient("Ode", "MRN-90"))).await;
    assert_eq!(s1, 201, "{created}");
    assert_eq!(h1["etag"], "W/\"1\"");
    let id = created["id"].as_str().unwrap().to_owned();
    let (s2, h2, updated) =
        app.send(&w.front, reqwest::Method::PUT, path, &[], Some(&patient("Odell", "MRN-90"))).await;
    assert_eq!(s2, 200, "{updated}");
    assert_eq!(
        (updated["id"].as_str(), &h2["etag"]),
        (Some(id.as_str()), &"W/\"2\"".parse::<reqwest::header::HeaderValue>().unwrap())
    );
    assert_eq!(updated["name"][0]["family"], "Odell");
    // A stale If-Match on the one match: 412.
    let (s3, _, _) =
        app.send(&w.front, reqwest::Method::PUT, path, &[("if-match", "W/\"1\"")], Some(&patient("X", "MRN-90"))).await;
    assert_eq!(s3, 412);
    // A body id other than the match's: 400.
    let mut other = patient("Odell", "MRN-90");
    other["id"] = json!(w.bob);
    let (s4, _, _) = app.send(&w.front, reqwest::Method::PUT, path, &[], Some(&other)).await;
    assert_eq!(s4, 400);
    // Two matches: 412 and nothing changed.
    app.create(&w.front, patient("Odell", "MRN-91")).await;
    let (s5, _, _) = app
        .send(&w.front, reqwest::Method::PUT, "/fhir/Patient?family=Odell", &[], Some(&patient("Y", "MRN-92")))
        .await;
    assert_eq!(s5, 412);
    let (_, current) = app.get_json(&w.front, &format!("/fhir/Patient/{id}")).await;
    assert_eq!(current["meta"]["versionId"], "2");
});

both_backends!(conditional_delete_removes_the_one_match, |app: TestApp| async move {
    let w = app.world().await;
    let id = app.create(&w.front, patient("Dell", "MRN-50")).await;
    app.create(&w.front, patient("Dell", "MRN-51")).await;
    let (many, _, _) = app.send(&w.front, reqwest::Method::DELETE, "/fhir/Patient?family=Dell", &[], None).await;
    assert_eq!(many, 412);
    let (one, _, _) =
        app.send(&w.front, reqwest::Method::DELETE, "/fhir/Patient?identifier=urn:mrn|MRN-50", &[], None).await;
    assert_eq!(one, 204);
    assert_eq!(app.get(&w.front, &format!("/fhir/Patient/{id}")).await.status(), 410);
    let seq = app.last_seq();
    let (none, _, _) =
        app.send(&w.front, reqwest::Method::DELETE, "/fhir/Patient?identifier=urn:mrn|MRN-50", &[], None).await;
    assert_eq!(none, 204, "no match: nothing to delete");
    let events = app.events_after(seq);
    assert_eq!(events.len(), 1);
    assert_eq!((&events[0]["kind"], &events[0]["outcome"]), (&json!("delete"), &json!("0")));
    assert_eq!(events[0]["resource_id"], Value::Null, "nothing was deleted");
});

both_backends!(patch_applies_to_what_the_caller_sees_under_the_write_mask, |app: TestApp| async move {
    let w = app.world().await;
    let obs = app.create(&w.doc, observation(&w.alice, "8480-6", 120.0, "2024-05-01T10:00:00Z")).await;
    let path = format!("/fhir/Observation/{obs}");
    let ops = json!([{"op": "replace", "path": "/status", "value": "amended"},
                     {"op": "add", "path": "/note", "value": [{"text": "rechecked"}]}]);
    let jp = ("content-type", "application/json-patch+json");
    let (s0, _, _) = app.send(&w.doc, reqwest::Method::PATCH, &path, &[jp], Some(&ops)).await;
    assert_eq!(s0, 428, "If-Match is required by default");
    let (s1, _, _) = app.send(&w.doc, reqwest::Method::PATCH, &path, &[jp, ("if-match", "W/\"9\"")], Some(&ops)).await;
    assert_eq!(s1, 412);
    let seq = app.last_seq();
    let (s2, h2, patched) =
        app.send(&w.doc, reqwest::Method::PATCH, &path, &[jp, ("if-match", "W/\"1\"")], Some(&ops)).await;
    assert_eq!(s2, 200, "{patched}");
    assert_eq!(h2["etag"], "W/\"2\"");
    app.assert_valid(&patched);
    assert_eq!((patched["status"].as_str(), patched["note"][0]["text"].as_str()), (Some("amended"), Some("rechecked")));
    assert_eq!(patched["valueQuantity"]["value"], json!(120.0), "untouched elements kept");
    let events = app.events_after(seq);
    assert_eq!(events.len(), 1);
    assert_eq!(
        (&events[0]["kind"], &events[0]["action"], &events[0]["resource_version"]),
        (&json!("patch"), &json!("U"), &json!(2))
    );
    // A test that fails: 400, nothing written.
    let failing = json!([{"op": "test", "path": "/status", "value": "final"}, {"op": "remove", "path": "/note"}]);
    let (s3, _, _) =
        app.send(&w.doc, reqwest::Method::PATCH, &path, &[jp, ("if-match", "W/\"2\"")], Some(&failing)).await;
    assert_eq!(s3, 400);
    // Merge patch (what fhirpy sends as FHIR JSON): members replace, null removes.
    let merge = json!({"status": "final", "note": null});
    let (s4, _, merged) =
        app.send(&w.doc, reqwest::Method::PATCH, &path, &[("if-match", "W/\"2\"")], Some(&merge)).await;
    assert_eq!(s4, 200, "{merged}");
    assert_eq!(merged["status"], "final");
    assert!(merged.get("note").is_none());
    // Patching the id is refused.
    let rename = json!([{"op": "replace", "path": "/id", "value": w.bob}]);
    let (s5, _, _) =
        app.send(&w.doc, reqwest::Method::PATCH, &path, &[jp, ("if-match", "W/\"3\"")], Some(&rename)).await;
    assert_eq!(s5, 400);
    // Another content type: 415.
    let (s6, _, _) = app
        .send(
            &w.doc,
            reqwest::Method::PATCH,
            &path,
            &[("content-type", "text/plain"), ("if-match", "W/\"3\"")],
            Some(&ops),
        )
        .await;
    assert_eq!(s6, 415);

    // Front desk sees the Patient's demographics only: an operation on a hidden element is 403 naming the
    // element (never the value), and a visible-but-unwritable one is refused by the write mask.
    let pat = format!("/fhir/Patient/{}", w.bob);
    let secret = "CONFIDENTIAL-MARITAL";
    let hidden = json!([{"op": "add", "path": "/maritalStatus", "value": {"text": secret}}]);
    let (s7, _, outcome) =
        app.send(&w.front, reqwest::Method::PATCH, &pat, &[jp, ("if-match", "W/\"1\"")], Some(&hidden)).await;
    assert_eq!(s7, 403, "{outcome}");
    let text = outcome.to_string();
    assert!(text.contains("Patient.maritalStatus") && !text.contains(secret), "{text}");
    let visible = json!([{"op": "replace", "path": "/name/0/family", "value": "Browning"}]);
    let (s8, _, renamed) =
        app.send(&w.front, reqwest::Method::PATCH, &pat, &[jp, ("if-match", "W/\"1\"")], Some(&visible)).await;
    assert_eq!(s8, 200, "{renamed}");
    assert_eq!(renamed["name"][0]["family"], "Browning");
    // A nurse may read a Patient but not write it.
    let (s9, _, _) = app
        .send(
            &w.nurse,
            reqwest::Method::PATCH,
            &format!("/fhir/Patient/{}", w.alice),
            &[jp, ("if-match", "W/\"1\"")],
            Some(&visible),
        )
        .await;
    assert_eq!(s9, 403);
});

both_backends!(a_patch_keeps_the_ssn_the_caller_never_saw, |app: TestApp| async move {
    let w = app.world().await;
    let pat = format!("/fhir/Patient/{}", w.alice);
    let (_, before) = app.get_json(&w.front, &pat).await;
    assert!(!before.to_string().contains("123-45-6789"));
    let v = before["meta"]["versionId"].as_str().unwrap().to_owned();
    let ops = json!([{"op": "replace", "path": "/identifier/0/value", "value": "MRN-1b"}]);
    let (s, _, _) = app
        .send(
            &w.front,
            reqwest::Method::PATCH,
            &pat,
            &[("content-type", "application/json-patch+json"), ("if-match", &format!("W/\"{v}\""))],
            Some(&ops),
        )
        .await;
    assert_eq!(s, 200);
    let (_, billing) = app.get_json(&w.billing, &pat).await;
    let ids = billing["identifier"].to_string();
    assert!(ids.contains("123-45-6789") && ids.contains("MRN-1b"), "{ids}");
});

both_backends_with!(
    updates_without_if_match_when_the_deployment_allows_it,
    "[fhir]\nrequire_if_match = false\n",
    |app: TestApp| async move {
        let w = app.world().await;
        let path = format!("/fhir/Patient/{}", w.bob);
        let (_, mut bob) = app.get_json(&w.front, &path).await;
        bob["name"][0]["family"] = json!("Bowman");
        let r = app.put(&w.front, &path, None, &bob).await;
        assert_eq!(r.status(), 200);
        // A stale one is still refused.
        assert_eq!(app.put(&w.front, &path, Some("1"), &bob).await.status(), 412);
    }
);

both_backends!(validate_checks_like_a_create_and_stores_nothing, |app: TestApp| async move {
    let w = app.world().await;
    let before = app.live_count("Observation");
    let good = observation(&w.alice, "8480-6", 120.0, "2024-05-01T10:00:00Z");
    let (s1, _, ok) = app.send(&w.doc, reqwest::Method::POST, "/fhir/Observation/$validate", &[], Some(&good)).await;
    assert_eq!(s1, 200, "{ok}");
    assert_eq!(
        (ok["resourceType"].as_str(), ok["issue"][0]["severity"].as_str()),
        (Some("OperationOutcome"), Some("information"))
    );
    let mut bad = good.clone();
    bad["status"] = json!("not-a-status-PHI-7731");
    let (s2, _, err) = app.send(&w.doc, reqwest::Method::POST, "/fhir/Observation/$validate", &[], Some(&bad)).await;
    assert_eq!(s2, 200, "{err}");
    assert_eq!(err["issue"][0]["severity"], "error");
    assert!(!err.to_string().contains("PHI-7731"));
    // Another patient's compartment (off the care team) validates like a create: refused.
    let other = observation(&w.bob, "8480-6", 120.0, "2024-05-01T10:00:00Z");
    let (_, _, off) = app.send(&w.doc, reqwest::Method::POST, "/fhir/Observation/$validate", &[], Some(&other)).await;
    assert_eq!(off["issue"][0]["severity"], "error");
    // A role that may not create the type: 403.
    let (s3, _, _) = app.send(&w.front, reqwest::Method::POST, "/fhir/Observation/$validate", &[], Some(&good)).await;
    assert_eq!(s3, 403);
    assert_eq!(app.live_count("Observation"), before, "nothing stored");
});

fn entry(method: &str, url: &str, resource: Option<Value>, full_url: Option<&str>) -> Value {
    let mut e = json!({"request": {"method": method, "url": url}});
    if let Some(r) = resource {
        e["resource"] = r;
    }
    if let Some(u) = full_url {
        e["fullUrl"] = json!(u);
    }
    e
}

fn bundle(kind: &str, entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": kind, "entry": entries})
}

both_backends!(a_transaction_resolves_urn_uuids_and_answers_per_entry, |app: TestApp| async move {
    let w = app.world().await;
    // The front desk registers a patient and assigns the care team in one transaction.
    let seq = app.last_seq();
    let team = json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"},
                      "participant": [{"member": {"reference": format!("Practitioner/{}", w.doc_practitioner)}}]});
    let tx = bundle(
        "transaction",
        vec![
            entry("POST", "CareTeam", Some(team), None),
            entry(
                "POST",
                "Patient",
                Some(patient("Tran", "MRN-300")),
                Some("urn:uuid:11111111-1111-4111-8111-111111111111"),
            ),
        ],
    );
    let (s, _, resp) = app.send(&w.front, reqwest::Method::POST, "/fhir", &[], Some(&tx)).await;
    assert_eq!(s, 200, "{resp}");
    app.assert_valid(&resp);
    assert_eq!(resp["type"], "transaction-response");
    let entries = resp["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["response"]["status"], "201 Created");
    assert_eq!(entries[1]["response"]["etag"], "W/\"1\"");
    let patient_id = entries[1]["resource"]["id"].as_str().unwrap().to_owned();
    assert!(
        entries[1]["response"]["location"].as_str().unwrap().starts_with(&format!("Patient/{patient_id}/_history/1"))
    );
    assert_eq!(entries[0]["resource"]["subject"]["reference"], format!("Patient/{patient_id}"), "urn:uuid resolved");
    // Audited: each entry as its own create (with its patient), then the transaction.
    let events = app.events_after(seq);
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["create", "create", "transaction"], "{events:?}");
    assert!(events.iter().take(2).all(|e| e["patient"] == json!(patient_id) && e["outcome"] == "0"));
    // The care team is live: the clinician reaches the new patient, and records an encounter and an observation
    // linked by urn:uuid, with a conditional create of the encounter.
    let enc = json!({"resourceType": "Encounter", "status": "finished", "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                     "subject": {"reference": format!("Patient/{patient_id}")}, "identifier": [{"system": "urn:visit", "value": "V-1"}]});
    let mut obs = observation(&patient_id, "8480-6", 5.0, "2024-05-01T10:00:00Z");
    obs["encounter"] = json!({"reference": "urn:uuid:22222222-2222-4222-8222-222222222222"});
    let mut cond = entry("POST", "Encounter", Some(enc), Some("urn:uuid:22222222-2222-4222-8222-222222222222"));
    cond["request"]["ifNoneExist"] = json!(format!("patient={patient_id}&status=finished"));
    let tx2 = bundle("transaction", vec![entry("POST", "Observation", Some(obs.clone()), None), cond.clone()]);
    let (s2, _, resp2) = app.send(&w.doc, reqwest::Method::POST, "/fhir", &[], Some(&tx2)).await;
    assert_eq!(s2, 200, "{resp2}");
    let enc_id = resp2["entry"][1]["resource"]["id"].as_str().unwrap().to_owned();
    assert_eq!(resp2["entry"][0]["resource"]["encounter"]["reference"], format!("Encounter/{enc_id}"));
    // Sent again: the encounter matches (200, same id) and the new observation links to it.
    let (_, _, resp3) = app.send(&w.doc, reqwest::Method::POST, "/fhir", &[], Some(&tx2)).await;
    assert_eq!(resp3["entry"][1]["response"]["status"], "200 OK");
    assert_eq!(resp3["entry"][1]["resource"]["id"], json!(enc_id));
    assert_eq!(resp3["entry"][0]["resource"]["encounter"]["reference"], format!("Encounter/{enc_id}"));
    assert_eq!(app.live_count("Encounter"), 1);
    // A GET entry runs after the writes, as a read of its own.
    let tx4 = bundle("transaction", vec![entry("GET", &format!("Encounter/{enc_id}"), None, None)]);
    let (_, _, resp4) = app.send(&w.doc, reqwest::Method::POST, "/fhir", &[], Some(&tx4)).await;
    assert_eq!(resp4["entry"][0]["response"]["status"], "200 OK");
    assert_eq!(resp4["entry"][0]["resource"]["id"], json!(enc_id));
});

both_backends!(a_transaction_with_one_forbidden_entry_leaves_nothing_behind, |app: TestApp| async move {
    let w = app.world().await;
    let mut entries: Vec<Value> = (0..39)
        .map(|i| {
            entry(
                "POST",
                "Observation",
                Some(observation(&w.alice, "8480-6", f64::from(i), "2024-05-01T10:00:00Z")),
                None,
            )
        })
        .collect();
    // The 40th: an observation of a patient the clinician does not reach.
    entries.push(entry("POST", "Observation", Some(observation(&w.bob, "8480-6", 1.0, "2024-05-01T10:00:00Z")), None));
    let before = app.live_count("Observation");
    let seq = app.last_seq();
    let (s, _, outcome) =
        app.send(&w.doc, reqwest::Method::POST, "/fhir", &[], Some(&bundle("transaction", entries))).await;
    assert!(s == 400 || s == 403 || s == 404, "{s} {outcome}");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["expression"][0], "Bundle.entry[39]", "{outcome}");
    assert!(!outcome.to_string().contains(&w.bob));
    assert_eq!(app.live_count("Observation"), before, "nothing of the 39 others is left");
    // Exactly the audit the contract asks for: the refused entry, then the failed transaction; no event of a
    // write that did not happen.
    let events = app.events_after(seq);
    let got: Vec<(&str, &str)> =
        events.iter().map(|e| (e["kind"].as_str().unwrap(), e["outcome"].as_str().unwrap())).collect();
    assert_eq!(got, [("create", "4"), ("transaction", "4")], "{events:?}");
    // A forbidden type anywhere (front desk may not write Observation) fails the same way, before storage.
    let mixed = bundle(
        "transaction",
        vec![
            entry("POST", "Patient", Some(patient("Never", "MRN-400")), None),
            entry("POST", "Observation", Some(observation(&w.alice, "8480-6", 1.0, "2024-05-01T10:00:00Z")), None),
        ],
    );
    let before_p = app.live_count("Patient");
    let (s2, _, o2) = app.send(&w.front, reqwest::Method::POST, "/fhir", &[], Some(&mixed)).await;
    assert_eq!(s2, 403, "{o2}");
    assert_eq!(o2["issue"][0]["expression"][0], "Bundle.entry[1]");
    assert_eq!(app.live_count("Patient"), before_p);
    let mut conn = app.state.db.conn().unwrap();
    carevault::audit::store::verify(&mut conn, |_| {}).unwrap().expect("the chain is intact");
});

both_backends!(a_batch_runs_each_entry_on_its_own, |app: TestApp| async move {
    let w = app.world().await;
    let seq = app.last_seq();
    let b = bundle(
        "batch",
        vec![
            entry("POST", "Observation", Some(observation(&w.alice, "8480-6", 1.0, "2024-05-01T10:00:00Z")), None),
            entry("POST", "Observation", Some(observation(&w.bob, "8480-6", 1.0, "2024-05-01T10:00:00Z")), None),
            entry("GET", &format!("Patient/{}", w.alice), None, None),
            entry("GET", &format!("Patient/{}", w.bob), None, None),
            entry("DELETE", "Observation/not-a-uuid", None, None),
        ],
    );
    let (s, _, resp) = app.send(&w.doc, reqwest::Method::POST, "/fhir", &[], Some(&b)).await;
    assert_eq!(s, 200, "{resp}");
    app.assert_valid(&resp);
    assert_eq!(resp["type"], "batch-response");
    let statuses: Vec<&str> =
        resp["entry"].as_array().unwrap().iter().map(|e| e["response"]["status"].as_str().unwrap()).collect();
    assert_eq!(statuses[0], "201 Created");
    assert_ne!(statuses[1], "201 Created", "another patient's compartment is refused");
    assert_eq!(statuses[2], "200 OK");
    assert_eq!(statuses[3], "404", "out of scope reads like missing");
    assert_eq!(resp["entry"][3]["response"]["outcome"]["resourceType"], "OperationOutcome");
    // Each entry audited on its own, then the batch.
    let events = app.events_after(seq);
    let kinds: Vec<String> =
        events.iter().map(|e| format!("{} {}", e["kind"].as_str().unwrap(), e["outcome"].as_str().unwrap())).collect();
    assert_eq!(kinds.len(), 6, "{kinds:?}");
    assert_eq!((kinds[0].as_str(), kinds[2].as_str(), kinds[3].as_str()), ("create 0", "read 0", "read 4"));
    assert_eq!(kinds[5], "batch 0");
});

both_backends_with!(
    bundles_have_their_own_body_limit,
    "[limits]\nmax_body_bytes = 4096\nmax_bundle_bytes = 65536\n",
    |app: TestApp| async move {
        let w = app.world().await;
        let entries: Vec<Value> = (0..30)
            .map(|i| {
                entry(
                    "POST",
                    "Observation",
                    Some(observation(&w.alice, "8480-6", f64::from(i), "2024-05-01T10:00:00Z")),
                    None,
                )
            })
            .collect();
        let b = bundle("transaction", entries);
        assert!(b.to_string().len() > 4096);
        let (s, _, _) = app.send(&w.doc, reqwest::Method::POST, "/fhir", &[], Some(&b)).await;
        assert_eq!(s, 200, "larger than max_body_bytes, within max_bundle_bytes");
        let big: Vec<Value> = (0..400)
            .map(|i| {
                entry(
                    "POST",
                    "Observation",
                    Some(observation(&w.alice, "8480-6", f64::from(i), "2024-05-01T10:00:00Z")),
                    None,
                )
            })
            .collect();
        let (s2, _, _) = app.send(&w.doc, reqwest::Method::POST, "/fhir", &[], Some(&bundle("transaction", big))).await;
        assert_eq!(s2, 413);
        // Other bodies keep max_body_bytes.
        let mut obs = observation(&w.alice, "8480-6", 1.0, "2024-05-01T10:00:00Z");
        obs["note"] = json!([{"text": "x".repeat(5000)}]);
        let (s3, _, _) = app.send(&w.doc, reqwest::Method::POST, "/fhir/Observation", &[], Some(&obs)).await;
        assert_eq!(s3, 413);
    }
);
