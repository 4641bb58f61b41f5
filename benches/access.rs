//! Access decisions must be cheap (goal: under 5 µs): one decision, and shaping one Patient.
#![allow(clippy::expect_used)] // a benchmark without its policy has nothing to measure

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use carevault::access::{AccessControl, Action, R4Catalog};
use carevault::role::Role;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use serde_json::json;

fn access(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let ac = AccessControl::load(&dir, Arc::new(R4Catalog)).expect("policies/ must load");

    c.bench_function("decide one role", |b| {
        b.iter(|| {
            ac.decide(
                black_box(&[Role::Nurse]),
                black_box("Observation"),
                black_box(Action::Search),
            )
        })
    });
    c.bench_function("decide two roles", |b| {
        b.iter(|| {
            ac.decide(
                black_box(&[Role::FrontDesk, Role::Billing]),
                black_box("Patient"),
                Action::Read,
            )
        })
    });

    let patient = json!({
        "resourceType": "Patient", "id": "0f1c7a52-8d4e-4b53-9d1a-2a0e7c3b9f10",
        "meta": { "versionId": "3", "lastUpdated": "2026-01-01T00:00:00Z" },
        "text": { "status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Jane Doe</div>" },
        "identifier": [ { "system": "urn:mrn", "value": "MRN-1" }, { "system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789" } ],
        "active": true,
        "name": [ { "family": "Doe", "given": ["Jane", "Q"] } ],
        "telecom": [ { "system": "phone", "value": "555-0100" }, { "system": "email", "value": "j@example.org" } ],
        "gender": "female", "birthDate": "1980-01-02",
        "address": [ { "line": ["1 Main St"], "city": "Springfield", "postalCode": "12345" } ],
        "maritalStatus": { "text": "Married" },
        "contact": [ { "name": { "family": "Doe", "given": ["John"] } } ]
    });
    let front_desk = ac.decide(&[Role::FrontDesk], "Patient", Action::Read);
    c.bench_function("shape Patient for front_desk", |b| {
        b.iter_batched(
            || patient.clone(),
            |mut p| front_desk.read_mask.shape(&mut p, None),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, access);
criterion_main!(benches);
