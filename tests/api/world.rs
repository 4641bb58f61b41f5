//! A small clinic for tests: one user per role, two practitioners, two patients, one care team.

use crate::helpers::{Session, TestApp};
use carevault::role::Role;
use serde_json::{Value, json};

pub const SSN_SYSTEM: &str = "http://hl7.org/fhir/sid/us-ssn";

pub struct World {
    pub front: Session,
    pub billing: Session,
    pub auditor: Session,
    pub admin: Session,
    /// On the care team of `alice`.
    pub doc: Session,
    /// On no care team.
    pub other_doc: Session,
    pub nurse: Session,
    pub alice_user: Session,
    pub doc_practitioner: String,
    pub other_practitioner: String,
    pub nurse_practitioner: String,
    pub alice: String,
    pub bob: String,
    pub care_team: String,
}

impl TestApp {
    pub async fn post(&self, s: &Session, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(&s.access)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, s: &Session, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).bearer_auth(&s.access).send().await.unwrap()
    }

    pub async fn get_json(&self, s: &Session, path: &str) -> (u16, Value) {
        let r = self.get(s, path).await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn put(&self, s: &Session, path: &str, version: Option<&str>, body: &Value) -> reqwest::Response {
        let mut rb = self
            .client
            .put(self.url(path))
            .bearer_auth(&s.access)
            .header("content-type", "application/fhir+json")
            .body(body.to_string());
        if let Some(v) = version {
            rb = rb.header("if-match", format!("W/\"{v}\""));
        }
        rb.send().await.unwrap()
    }

    /// Creates and returns the new id (asserting 201).
    pub async fn create(&self, s: &Session, body: Value) -> String {
        let rtype = body["resourceType"].as_str().unwrap().to_owned();
        let r = self.post(s, &format!("/fhir/{rtype}"), &body).await;
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 201, "create {rtype}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        v["id"].as_str().unwrap().to_owned()
    }

    /// Asserts that a response body is valid FHIR R4 (the official schema).
    pub fn assert_valid(&self, v: &Value) {
        if let Err(e) = self.state.records.validator().validate_output(v) {
            panic!("invalid FHIR returned: {e:?}\n{v}");
        }
    }

    pub async fn world(&self) -> World {
        let front = self.user("front", Role::FrontDesk, None).await;
        let practitioner =
            |family: &str| json!({"resourceType":"Practitioner","name":[{"family":family,"given":["Pat"]}]});
        let doc_practitioner = self.create(&front, practitioner("Osler")).await;
        let other_practitioner = self.create(&front, practitioner("Galen")).await;
        let nurse_practitioner = self.create(&front, practitioner("Nightingale")).await;
        let alice = self
            .create(
                &front,
                json!({"resourceType":"Patient","name":[{"family":"Zoë-Lindqvist","given":["Alice"]}],"gender":"female",
                       "birthDate":"1980-04-12","identifier":[{"system":"urn:mrn","value":"MRN-1"}],
                       "telecom":[{"system":"phone","value":"555-0100"}],"address":[{"city":"Springfield","state":"IL"}]}),
            )
            .await;
        // The SSN arrives from the registration feed, stored as an import would (the front desk may also write it,
        // blind: tests/api/types.rs).
        self.seed_identifier(&alice, json!({"system":SSN_SYSTEM,"value":"123-45-6789"}));
        let bob = self
            .create(&front, json!({"resourceType":"Patient","name":[{"family":"Brown","given":["Bob"]}],"gender":"male","birthDate":"1975-01-02"}))
            .await;
        let care_team = self
            .create(
                &front,
                json!({"resourceType":"CareTeam","status":"active","subject":{"reference":format!("Patient/{alice}")},
                       "participant":[{"member":{"reference":format!("Practitioner/{doc_practitioner}")}},
                                      {"member":{"reference":format!("Practitioner/{nurse_practitioner}")}}]}),
            )
            .await;
        World {
            billing: self.user("billing", Role::Billing, None).await,
            auditor: self.user("auditor", Role::Auditor, None).await,
            admin: self.user("admin", Role::Admin, None).await,
            doc: self.user("doc", Role::Clinician, Some(&doc_practitioner)).await,
            other_doc: self.user("otherdoc", Role::Clinician, Some(&other_practitioner)).await,
            nurse: self.user("nurse", Role::Nurse, Some(&nurse_practitioner)).await,
            alice_user: self.user("alice", Role::Patient, Some(&alice)).await,
            front,
            doc_practitioner,
            other_practitioner,
            nurse_practitioner,
            alice,
            bob,
            care_team,
        }
    }
}

impl TestApp {
    /// Adds an identifier to a stored Patient as an import would: encrypted in place, same version.
    pub fn seed_identifier(&self, patient: &str, identifier: Value) {
        use carevault::crypto::FieldAad;
        use carevault::store::schema::resources;
        use diesel::prelude::*;
        let mut conn = self.state.db.conn().unwrap();
        let content: String = resources::table
            .filter(resources::resource_type.eq("Patient"))
            .filter(resources::id.eq(patient))
            .select(resources::content)
            .first(&mut conn)
            .unwrap();
        use carevault::records::{RESTRICTED_IDENTIFIERS, join_restricted, split_restricted};
        let mut doc: serde_json::Map<String, Value> = serde_json::from_str(&content).unwrap();
        let cipher = &self.state.cipher;
        // The stored format: restricted identifiers (SSN) apart from the rest, each part its own ciphertext.
        let mut plain = serde_json::Map::new();
        for element in ["identifier", RESTRICTED_IDENTIFIERS] {
            if let Some(Value::String(ct)) = doc.remove(element) {
                plain.insert(
                    element.into(),
                    cipher.decrypt_json(&FieldAad::new("Patient", patient, element), &ct).unwrap(),
                );
            }
        }
        if let Some(restricted) = plain.remove(RESTRICTED_IDENTIFIERS) {
            join_restricted(&mut plain, restricted).unwrap();
        }
        plain.entry("identifier").or_insert_with(|| json!([])).as_array_mut().unwrap().push(identifier);
        if let Some(restricted) = split_restricted(&mut plain) {
            plain.insert(RESTRICTED_IDENTIFIERS.into(), restricted);
        }
        for (element, value) in plain {
            let ct = cipher.encrypt_json(&FieldAad::new("Patient", patient, &element), &value).unwrap();
            doc.insert(element, Value::String(ct));
        }
        let doc = Value::Object(doc);
        diesel::update(
            resources::table.filter(resources::resource_type.eq("Patient")).filter(resources::id.eq(patient)),
        )
        .set(resources::content.eq(doc.to_string()))
        .execute(&mut conn)
        .unwrap();
        use carevault::store::schema::resource_history as h;
        diesel::update(
            h::table.filter(h::resource_type.eq("Patient")).filter(h::id.eq(patient)).filter(h::version_id.eq(1)),
        )
        .set(h::content.eq(doc.to_string()))
        .execute(&mut conn)
        .unwrap();
    }
}

pub fn observation(patient: &str, code: &str, value: f64, when: &str) -> Value {
    json!({"resourceType":"Observation","status":"final",
           "code":{"coding":[{"system":"http://loinc.org","code":code}]},
           "subject":{"reference":format!("Patient/{patient}")},
           "effectiveDateTime":when,
           "valueQuantity":{"value":value,"unit":"mmHg"}})
}
