//! Measures the FHIR schema validator: startup compile time and per-resource validation time.
//! `cargo run --example schema_timing` (numbers recorded in docs/fhir-model.md).
#![allow(clippy::unwrap_used)] // a measurement tool, not service code
use carevault::fhir::FhirValidator;
use std::time::Instant;

fn main() {
    let t = Instant::now();
    let v = FhirValidator::new().unwrap();
    println!("startup: parse + compile {:?}", t.elapsed());
    let p: serde_json::Value =
        serde_json::from_str(include_str!("../tests/fixtures/fhir/patient-example.json")).unwrap();
    let o: serde_json::Value =
        serde_json::from_str(include_str!("../tests/fixtures/fhir/observation-example-bloodpressure-dar.json"))
            .unwrap();
    let n = 1000u32;
    for (name, r) in [("Patient", &p), ("Observation", &o)] {
        let t = Instant::now();
        for _ in 0..n {
            v.validate(name, r).unwrap();
        }
        println!("validate {name} example: {:?} each", t.elapsed() / n);
    }
    let entries: Vec<_> = (0..20)
        .map(|i| serde_json::json!({"fullUrl": format!("https://x/fhir/Patient/{i}"), "resource": p, "search": {"mode": "match"}}))
        .collect();
    let b = serde_json::json!({"resourceType": "Bundle", "type": "searchset", "total": 20, "entry": entries});
    let t = Instant::now();
    for _ in 0..100 {
        v.validate_output(&b).unwrap();
    }
    println!("validate_output searchset of 20 Patients: {:?} each", t.elapsed() / 100);
}
