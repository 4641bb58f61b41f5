//! Cross-cutting checks of the declarations against the official schema and examples
//! (fixtures copied from the R4 publication, CC0, into tests/fixtures/fhir).

#![allow(clippy::panic)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::{Value, json};

use super::bundle::{HistoryEntry, HistoryMethod, history, searchset};
use super::capability::capability_statement;
use super::decl::{ParamKind, PatientLink, all, decl};
use super::search::extract_index;
use super::validate::FhirValidator;

fn validator() -> &'static FhirValidator {
    static V: OnceLock<FhirValidator> = OnceLock::new();
    V.get_or_init(|| FhirValidator::new().unwrap())
}

fn fixtures() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fhir");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let v = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn schema_elements(ty: &str) -> BTreeSet<String> {
    let schema: Value = serde_json::from_str(include_str!("fhir.schema.json")).unwrap();
    schema["definitions"][ty]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !k.starts_with('_'))
        .cloned()
        .collect()
}

#[test]
fn phi_and_plain_partition_the_schema_elements() {
    for d in all() {
        let declared: BTreeSet<String> = d.elements().map(str::to_owned).collect();
        assert_eq!(declared.len(), d.phi.len() + d.plain.len(), "{} lists an element twice", d.name);
        assert_eq!(declared, schema_elements(d.name), "{}", d.name);
        assert!(d.is_phi("_birthDate") && d.is_phi("madeUp") && !d.is_phi("id"));
    }
}

#[test]
fn search_parameters_are_coherent_with_the_elements() {
    for d in all() {
        let mut names = BTreeSet::new();
        for p in d.search {
            assert!(names.insert(p.name), "{}.{} declared twice", d.name, p.name);
            for path in p.paths {
                let top = path.split('.').next().unwrap();
                assert!(top == "meta" || d.elements().any(|e| e == top), "{}.{} path {path}", d.name, p.name);
                // A value taken from a PHI element is blind-indexed, except references (random ids).
                let expected = d.is_phi(top) && p.kind != ParamKind::Reference && top != "meta";
                assert_eq!(p.phi, expected, "{}.{} phi", d.name, p.name);
            }
            assert_eq!(p.kind == ParamKind::Reference, !p.targets.is_empty(), "{}.{}", d.name, p.name);
        }
        if let PatientLink::Element(e) = d.patient_link {
            assert!(d.is_phi(e), "the link element may carry a display name");
            assert!(d.param("patient").is_some_and(|p| p.paths == [e]), "{}", d.name);
        }
    }
    let required = [
        ("Patient", &["_id", "identifier", "name", "family", "given", "birthdate", "gender"][..]),
        ("Practitioner", &["_id", "name", "identifier"]),
        ("CareTeam", &["patient", "participant", "status"]),
        ("Encounter", &["patient", "subject", "date", "status"]),
        ("Observation", &["patient", "subject", "code", "date", "status", "category"]),
        ("Condition", &["patient", "subject", "code", "date", "clinical-status", "category"]),
        ("AllergyIntolerance", &["patient", "subject", "code", "date", "clinical-status", "category"]),
        ("MedicationRequest", &["patient", "subject", "code", "date", "status", "category"]),
        ("AuditEvent", &["patient", "agent", "date", "action"]),
    ];
    for (ty, params) in required {
        for p in params {
            assert!(decl(ty).unwrap().param(p).is_some(), "{ty}?{p}");
        }
    }
    assert!(decl("AuditEvent").unwrap().read_only && all().iter().filter(|d| d.read_only).count() == 1);
    assert!(decl("Medication").is_none());
}

/// Every official example of a served type is accepted as a write once the server-owned `id` and `meta`
/// are removed (narrative `text` kept), validates as output as published, and indexes without surprise.
#[test]
fn official_examples_validate() {
    let mut seen = 0;
    for (file, example) in fixtures() {
        let ty = example["resourceType"].as_str().unwrap().to_owned();
        validator().validate_output(&example).unwrap_or_else(|e| panic!("{file}: {e:?}"));
        let Some(d) = decl(&ty) else { continue };
        let mut body = example.clone();
        body.as_object_mut().unwrap().remove("id");
        body.as_object_mut().unwrap().remove("meta");
        if d.read_only {
            continue;
        }
        validator().validate(&ty, &body).unwrap_or_else(|e| panic!("{file}: {e:?}"));
        let index = extract_index(d, &example);
        if matches!(d.patient_link, PatientLink::Element(_)) && d.patient_id(&example).is_ok() {
            assert!(index.iter().any(|e| e.param == "patient"), "{file}");
        }
        seen += 1;
    }
    assert!(seen >= 80, "{seen}");
}

/// The examples that do not link to a Patient by id are the ones `patient_id` refuses (fail closed).
#[test]
fn patient_link_fails_closed_on_the_examples_without_a_patient_reference() {
    let mut refused = Vec::new();
    for (file, example) in fixtures() {
        let Some(d) = decl(example["resourceType"].as_str().unwrap()) else {
            continue;
        };
        match d.patient_id(&example) {
            Ok(Some(_)) => {}
            Ok(None) => assert!(matches!(d.patient_link, PatientLink::None | PatientLink::Itself), "{file}"),
            Err(_) => refused.push(file),
        }
    }
    assert_eq!(
        refused,
        [
            "observation-example-10minute-apgar-score.json",
            "observation-example-1minute-apgar-score.json",
            "observation-example-2minute-apgar-score.json",
            "observation-example-5minute-apgar-score.json",
            "observation-example-vp-oyster.json",
        ]
    );
    let obs = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p-1"}});
    assert_eq!(decl("Observation").unwrap().patient_id(&obs).unwrap().as_deref(), Some("p-1"));
    let group = json!({"resourceType": "Observation", "subject": {"reference": "Group/g"}});
    assert!(decl("Observation").unwrap().patient_id(&group).is_err());
}

#[test]
fn capability_statement_lists_the_declarations_and_validates() {
    let now = time::macros::datetime!(2026-01-01 00:00 UTC);
    let cs = capability_statement("https://example.org/fhir", now);
    validator().validate_output(&cs).unwrap();
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    assert_eq!(resources.len(), all().len());
    for (r, d) in resources.iter().zip(all()) {
        assert_eq!(r["type"], d.name);
        let params: Vec<&str> =
            r["searchParam"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(params, d.search.iter().map(|p| p.name).collect::<Vec<_>>());
        let codes: Vec<&str> =
            r["interaction"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap()).collect();
        assert_eq!(codes.contains(&"create"), !d.read_only, "{}", d.name);
    }
    let ops: Vec<&str> =
        resources[0]["operation"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(ops, ["everything", "access-report"]);
}

#[test]
fn bundles_validate() {
    let of = |ty: &str| fixtures().into_iter().map(|(_, v)| v).filter(|v| v["resourceType"] == ty).collect::<Vec<_>>();
    let examples: Vec<Value> = [of("Patient"), of("Observation")].concat();
    let b = searchset(
        examples.clone(),
        "https://h/fhir/",
        "https://h/fhir/Patient?name=x",
        Some("https://h/fhir/Patient?_cursor=c".into()),
        Some(99),
    );
    validator().validate_output(&b).unwrap();
    assert_eq!(b["entry"][0]["fullUrl"], format!("https://h/fhir/Patient/{}", examples[0]["id"].as_str().unwrap()));
    assert_eq!(b["link"][1]["relation"], "next");
    assert_eq!(b["total"], 99);
    let empty = searchset(vec![], "https://h/fhir", "https://h/fhir/Patient?_summary=count", None, Some(0));
    validator().validate_output(&empty).unwrap();
    assert!(empty.get("entry").is_none());

    let at = time::macros::datetime!(2026-01-01 10:00 UTC);
    let entry = |v, m, r| HistoryEntry {
        resource_type: "Patient".into(),
        id: "example".into(),
        version_id: v,
        last_updated: at,
        method: m,
        resource: r,
    };
    let h = history(
        vec![
            entry(3, HistoryMethod::Delete, None),
            entry(2, HistoryMethod::Update, Some(examples[0].clone())),
            entry(1, HistoryMethod::Create, Some(examples[0].clone())),
        ],
        "https://h/fhir",
        "https://h/fhir/Patient/example/_history",
        None,
        Some(3),
    );
    validator().validate_output(&h).unwrap();
    assert_eq!(h["entry"][0]["request"]["method"], "DELETE");
    assert_eq!(h["entry"][1]["response"]["etag"], "W/\"2\"");

    // The validator is really looking inside entries.
    let mut bad = b.clone();
    bad["entry"][1]["resource"]["birthDate"] = json!("1999-02-30");
    let err = validator().validate_output(&bad).unwrap_err();
    assert!(format!("{err:?}").contains("Bundle.entry[1].resource.birthDate"), "{err:?}");
    assert!(!format!("{err:?}").contains("1999-02-30"));
    let mut bad = b;
    bad["entry"][0]["resource"]["gender"] = json!(7);
    assert!(validator().validate_output(&bad).is_err());
}

#[test]
fn operation_outcome_validates() {
    let oo = crate::error::operation_outcome(
        "error",
        "invalid",
        "The value is not a valid calendar date.",
        Some("Patient.birthDate"),
    );
    validator().validate_output(&oo).unwrap();
    assert!(validator().validate_output(&json!({"resourceType": "NoSuchType"})).is_err());
}
