//! Micro-benchmarks of field encryption: one element, one whole Patient (15 PHI elements), one blind index.
//! Run: `cargo bench --bench crypto`.
// A benchmark whose setup fails should stop at once; there is no caller to hand an error to.
#![allow(clippy::expect_used)]

use carevault::crypto::{FieldAad, FieldCipher, KeyRing, LocalKeyProvider, MasterKey, normalize_text};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use std::hint::black_box;

const ID: &str = "0190b2f4-6c1e-7d2a-9f3b-5a8e2c4d6f01";

/// The PHI elements of a typical Patient, one ciphertext each, as the store keeps them.
fn patient_fields() -> Vec<(&'static str, Value)> {
    vec![
        ("identifier[0].value", json!("MRN-00482913")),
        ("identifier[1].value", json!("123-45-6789")),
        ("name[0].family", json!("García-López")),
        ("name[0].given", json!(["María", "José"])),
        ("name[0].prefix", json!(["Sra."])),
        ("telecom[0].value", json!("+1 555 0100 2233")),
        ("telecom[1].value", json!("maria.garcia@example.org")),
        ("gender", json!("female")),
        ("birthDate", json!("1984-07-21")),
        ("address[0].line", json!(["1234 Elm Street", "Apt 5B"])),
        ("address[0].city", json!("Springfield")),
        ("address[0].postalCode", json!("62704")),
        (
            "maritalStatus",
            json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"}]}),
        ),
        ("contact[0].name", json!({"family": "López", "given": ["Ana"]})),
        ("contact[0].telecom[0].value", json!("+1 555 0100 4455")),
    ]
}

fn cipher() -> FieldCipher {
    let provider = LocalKeyProvider::new(MasterKey::generate().expect("random master key"));
    let (ring, _) = KeyRing::generate(&provider).expect("key ring");
    FieldCipher::new(ring)
}

fn bench(c: &mut Criterion) {
    let cipher = cipher();
    let aad = FieldAad::new("Patient", ID, "name[0].family");
    let value = json!("García-López");
    let sealed = cipher.encrypt_json(&aad, &value).expect("encrypt");

    c.bench_function("field/encrypt", |b| b.iter(|| cipher.encrypt_json(&aad, black_box(&value))));
    c.bench_function("field/decrypt", |b| b.iter(|| cipher.decrypt_json(&aad, black_box(&sealed))));

    let fields = patient_fields();
    let sealed_fields: Vec<(&str, String)> = fields
        .iter()
        .map(|(path, v)| (*path, cipher.encrypt_json(&FieldAad::new("Patient", ID, path), v).expect("encrypt")))
        .collect();
    c.bench_function("patient_15_fields/encrypt", |b| {
        b.iter(|| {
            fields
                .iter()
                .map(|(path, v)| cipher.encrypt_json(&FieldAad::new("Patient", ID, path), black_box(v)))
                .collect::<Result<Vec<_>, _>>()
        })
    });
    c.bench_function("patient_15_fields/decrypt", |b| {
        b.iter(|| {
            sealed_fields
                .iter()
                .map(|(path, ct)| cipher.decrypt_json(&FieldAad::new("Patient", ID, path), black_box(ct)))
                .collect::<Result<Vec<_>, _>>()
        })
    });

    let indexer = cipher.blind_indexer();
    c.bench_function("blind_index/index", |b| b.iter(|| indexer.index("Patient", "family", black_box("garcia"))));
    c.bench_function("blind_index/normalize_and_index", |b| {
        b.iter(|| indexer.index("Patient", "name", &normalize_text(black_box("  María José GARCÍA-López "))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
