//! Cross-cutting checks of the declarations against the official schema and examples
//! (fixtures copied from the R4 publication, CC0, into tests/fixtures/fhir).

#![allow(clippy::panic)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::{Value, json};

use super::bundle::{HistoryEntry, HistoryMethod, history, searchset};
use super::capability::capability_statement;
use super::decl::{ParamKind, PatientLink, ResourceDecl, WriteHook, all, check, decl};
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

/// The elements of every declared type are the schema's, read independently of `schema.rs`; what the
/// declaration does not list as plain is PHI.
#[test]
fn elements_come_from_the_schema_and_unclassified_ones_are_phi() {
    check().unwrap();
    for d in all() {
        let elements: BTreeSet<String> = d.elements().map(str::to_owned).collect();
        assert_eq!(elements, schema_elements(d.name), "{}", d.name);
        let plain: BTreeSet<&str> = d.plain.iter().copied().collect();
        assert_eq!(plain.len(), d.plain.len(), "{} lists a plain element twice", d.name);
        assert!(plain.iter().all(|p| elements.contains(*p)), "{}", d.name);
        let phi: BTreeSet<&str> = d.phi_elements().collect();
        assert_eq!(phi.len() + plain.len(), elements.len(), "{}", d.name);
        assert!(phi.is_disjoint(&plain) && phi.contains("meta") && phi.contains("extension"), "{}", d.name);
        assert!(d.is_phi("_birthDate") && d.is_phi("madeUp") && !d.is_phi("id") && !d.is_phi("resourceType"));
    }
}

fn bare(name: &'static str, plain: &'static [&'static str], required: &'static [&'static str]) -> ResourceDecl {
    ResourceDecl {
        name,
        plain,
        search: &[],
        patient_link: PatientLink::None,
        references: &[],
        read_only: false,
        required,
        hook: None,
    }
}

/// Fail closed: an element a declaration does not classify is PHI, and a declaration naming something the
/// schema does not define is refused (the validator runs the same check at startup).
#[test]
fn declarations_fail_closed_and_are_checked_against_the_schema() {
    let d = bare("Observation", &["resourceType", "id"], &["status"]);
    d.check().unwrap();
    let phi: Vec<&str> = d.phi_elements().collect();
    for e in ["status", "code", "valueQuantity", "valueString", "subject", "meta"] {
        assert!(phi.contains(&e) && d.is_phi(e), "{e}");
    }
    assert!(bare("Observation", &["resourceType", "id", "statuz"], &[]).check().unwrap_err().contains("statuz"));
    // `code` and `subject` are expressible (complex; the schema requires `code`); `valueString` is a variant.
    for bad in ["code", "subject", "category", "valueString", "nope"] {
        let leaked: &'static [&'static str] = Vec::leak(vec![bad]);
        assert!(bare("Observation", &[], leaked).check().unwrap_err().contains(bad), "{bad}");
    }
    bare("Observation", &[], &["status", "value[x]"]).check().unwrap();
    assert!(bare("Medication2", &[], &[]).check().is_err());
    let search = &[super::decl::SearchParamDecl {
        name: "x",
        kind: ParamKind::Token,
        paths: &["codee.coding"],
        phi: true,
        indexed: true,
        targets: &[],
    }];
    let with_search = ResourceDecl { search, ..bare("Observation", &[], &[]) };
    assert!(with_search.check().unwrap_err().contains("codee.coding"));
    let with_link = ResourceDecl { patient_link: PatientLink::Element("patient"), ..bare("Observation", &[], &[]) };
    assert!(with_link.check().is_err());
}

/// The schema model reads choice elements from the schema's structure, not from a list of type names.
#[test]
fn choice_elements_are_read_from_the_schema() {
    let s = super::schema::schema().unwrap();
    assert_eq!(s.len(), 146);
    let variants = |ty: &str, c: &str| -> Vec<String> {
        s.resource(ty).unwrap().named(c).map(|e| e.name.clone()).collect::<Vec<_>>()
    };
    assert_eq!(variants("Observation", "value[x]").len(), 11);
    assert_eq!(variants("MedicationRequest", "medication[x]"), ["medicationCodeableConcept", "medicationReference"]);
    assert_eq!(variants("MedicationRequest", "reported[x]"), ["reportedBoolean", "reportedReference"]);
    assert_eq!(variants("Patient", "deceased[x]"), ["deceasedBoolean", "deceasedDateTime"]);
    assert_eq!(variants("ServiceRequest", "quantity[x]").len(), 3);
    // Look like choices by name, are not: a `$ref` to a primitive is a plain element; arrays are never choices.
    for (ty, e) in [
        ("Patient", "birthDate"),
        ("PaymentReconciliation", "paymentDate"),
        ("PaymentReconciliation", "paymentIdentifier"),
        ("Task", "instantiatesCanonical"),
        ("Task", "instantiatesUri"),
        ("MedicationRequest", "instantiatesCanonical"),
        ("MedicationRequest", "groupIdentifier"),
        ("Observation", "referenceRange"),
    ] {
        let el = s.resource(ty).unwrap().element(e).unwrap();
        assert!(!el.is_choice(), "{ty}.{e}");
    }
    // Every variant is a non-array element; a choice has at least two; variant names are distinct.
    for ty in ["Observation", "Condition", "MedicationRequest", "Patient", "ServiceRequest", "Task"] {
        let r = s.resource(ty).unwrap();
        for e in r.elements.iter().filter(|e| e.is_choice()) {
            assert!(!e.array && r.named(&e.canonical).count() >= 2, "{ty}.{}", e.name);
        }
    }
}

/// The 1..1 elements declared by hand (the schema cannot express them) are in every official example of
/// the type: a wrong declaration (an optional element declared required) fails here.
#[test]
fn declared_required_elements_are_in_every_official_example() {
    for (file, example) in fixtures() {
        let Some(d) = decl(example["resourceType"].as_str().unwrap()) else { continue };
        for r in d.required {
            assert!(
                d.variants(r).any(|v| example.get(v).is_some() || example.get(format!("_{v}")).is_some()),
                "{file}: {r}"
            );
        }
    }
    assert_eq!(decl("MedicationRequest").unwrap().required, ["status", "intent", "medication[x]"]);
    let mr = json!({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
        "subject": {"reference": "Patient/p"}});
    let err = validator().validate("MedicationRequest", &mr).unwrap_err();
    assert!(format!("{err:?}").contains("MedicationRequest.medication[x]"), "{err:?}");
    let mut ok = mr;
    ok["medicationReference"] = json!({"reference": "Medication/m"});
    validator().validate("MedicationRequest", &ok).unwrap();
}

/// Each served type has official examples in tests/fixtures/fhir (copied from the R4 publication), so the
/// example-driven tests cover a new type as soon as it is declared.
#[test]
fn every_declared_type_has_examples() {
    let files = fixtures();
    for d in all() {
        assert!(
            files.iter().any(|(_, v)| v["resourceType"] == d.name),
            "no example of {} in tests/fixtures/fhir",
            d.name
        );
    }
}

/// The CareTeam write hook is declared, and no other type has one.
#[test]
fn care_relationships_are_the_care_team_hook() {
    let p = "8f1c6e3a-4f6b-4a51-9d8e-0c9a3f1b2d7e";
    let pr = "0b7d9c2e-1a3f-4e5d-8c6b-9a0f1e2d3c4b";
    let team = json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": format!("Patient/{p}")},
        "participant": [{"member": {"reference": format!("Practitioner/{pr}")}}]});
    let care_team = decl("CareTeam").unwrap();
    assert!(care_team.has_care_relationships());
    assert_eq!(care_team.care_relationships(&team), Some(vec![(p.to_owned(), pr.to_owned())]));
    for d in all().iter().filter(|d| d.name != "CareTeam") {
        assert!(!d.has_care_relationships() && d.care_relationships(&team).is_none(), "{}", d.name);
    }
}

/// Lines of a Markdown table (`| a | b |`) between the heading `heading` and the next heading, as cells.
fn table_rows(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let start = doc.find(heading).unwrap_or_else(|| panic!("no {heading}"));
    doc[start + heading.len()..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with('|') && !l.starts_with("| ---"))
        .skip(1)
        .map(|l| l.trim().trim_matches('|').split(" | ").map(|c| c.trim().to_owned()).collect())
        .collect()
}

fn doc(name: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs").join(name)).unwrap()
}

/// docs/fhir-model.md's table of served types is exactly what the declarations say.
#[test]
fn the_docs_table_of_types_matches_the_declarations() {
    let rows = table_rows(&doc("fhir-model.md"), "## Served resource types");
    let expected: Vec<Vec<String>> = all()
        .iter()
        .map(|d| {
            let link = match d.patient_link {
                PatientLink::Itself => "itself".to_owned(),
                PatientLink::Element(e) => format!("`{e}`"),
                PatientLink::None => "none".to_owned(),
            };
            let search: Vec<String> = d.search.iter().map(|p| format!("`{}`", p.name)).collect();
            let mandatory: Vec<String> = d.mandatory().iter().map(|m| format!("`{m}`")).collect();
            vec![
                d.name.to_owned(),
                if d.read_only { "server only".to_owned() } else { "clients".to_owned() },
                link,
                search.join(", "),
                if mandatory.is_empty() { "none".to_owned() } else { mandatory.join(", ") },
                match d.hook {
                    Some(WriteHook::CareRelationships(_)) => "care relationships".to_owned(),
                    None => "none".to_owned(),
                },
            ]
        })
        .collect();
    let show =
        |rows: &[Vec<String>]| rows.iter().map(|r| format!("| {} |", r.join(" | "))).collect::<Vec<_>>().join("\n");
    assert_eq!(show(&rows), show(&expected), "docs/fhir-model.md: the table should read:\n{}", show(&expected));
}

/// docs/plaintext-elements.md justifies exactly the plain elements the declarations list.
#[test]
fn every_plain_element_is_justified_in_the_docs() {
    let mut documented = BTreeSet::new();
    for row in table_rows(&doc("plaintext-elements.md"), "# Elements stored in plaintext") {
        let types: Vec<&str> =
            if row[0] == "every type" { all().iter().map(|d| d.name).collect() } else { row[0].split(", ").collect() };
        for ty in types {
            for e in row[1].split(", ") {
                assert!(documented.insert((ty.to_owned(), e.trim_matches('`').to_owned())), "{ty}.{e} twice");
            }
        }
    }
    let declared: BTreeSet<(String, String)> =
        all().iter().flat_map(|d| d.plain.iter().map(|e| (d.name.to_owned(), (*e).to_owned()))).collect();
    assert_eq!(documented, declared);
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
    assert_eq!(ops, ["everything", "access-report", "validate"]);
    let system: Vec<&str> =
        cs["rest"][0]["interaction"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap()).collect();
    assert_eq!(system, ["transaction", "batch"]);
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
