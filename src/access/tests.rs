use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::role::Role;

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

fn catalog() -> Arc<dyn ElementCatalog> {
    Arc::new(R4Catalog)
}

fn real() -> PolicySet {
    PolicySet::load_dir(&policies_dir(), &R4Catalog).unwrap()
}

fn source(file: &str) -> String {
    std::fs::read_to_string(policies_dir().join(file)).unwrap()
}

/// Loads the real files with one of them replaced.
fn load_with(file: &str, text: &str) -> Result<PolicySet, PolicyError> {
    let pick = |name: &str| {
        if name == file { text.to_owned() } else { source(name) }
    };
    PolicySet::from_sources(&pick(MODEL_FILE), &pick(POLICY_FILE), &pick(FIELDS_FILE), &R4Catalog)
}

const RF: [Action; 4] = [Action::Read, Action::Vread, Action::Search, Action::History];

/// The US Core clinical types added with issue 14 (CONTRACT §5a): in the patient's compartment; clinicians
/// write them, nurses and the patient read them.
const NEW_CLINICAL: [&str; 11] = [
    "Procedure",
    "DiagnosticReport",
    "Immunization",
    "DocumentReference",
    "CarePlan",
    "Goal",
    "Device",
    "Provenance",
    "MedicationAdministration",
    "ImagingStudy",
    "SupplyDelivery",
];
/// Billing's own records (in the compartment; billing reads and writes them, the patient reads their own).
const FINANCIAL: [&str; 3] = ["Coverage", "Claim", "ExplanationOfBenefit"];
/// The directories: in no compartment, no patient information; every signed-in role reads them.
const DIRECTORIES: [&str; 5] = ["Practitioner", "Organization", "Location", "PractitionerRole", "Medication"];

/// The CONTRACT §4 table, written out: every grant; everything absent is denied.
fn expected() -> HashMap<(Role, &'static str, Action), Scope> {
    use Action::*;
    use Role::*;
    let mut m = HashMap::new();
    let mut grant = |role: Role, ty: &'static str, actions: &[Action], scope: Scope| {
        for a in actions {
            assert!(m.insert((role, ty, *a), scope).is_none());
        }
    };
    let crud = [Read, Vread, Search, History, Create, Update, Delete];
    let mut clinical = vec!["Observation", "Condition", "AllergyIntolerance", "MedicationRequest"];
    clinical.extend(NEW_CLINICAL);

    for role in Role::ALL {
        for ty in DIRECTORIES {
            grant(role, ty, &RF, Scope::All);
        }
    }
    grant(Admin, "Practitioner", &[Create, Update], Scope::All);
    for ty in ["Organization", "Location", "PractitionerRole"] {
        grant(Admin, ty, &[Create, Update], Scope::All);
        grant(FrontDesk, ty, &[Create, Update], Scope::All);
    }
    grant(Admin, "Medication", &[Create, Update], Scope::All);
    grant(Clinician, "Medication", &[Create, Update], Scope::All);
    for ty in FINANCIAL {
        grant(Billing, ty, &[Read, Vread, Search, History, Create, Update], Scope::All);
        grant(Patient, ty, &RF, Scope::Own);
    }

    grant(FrontDesk, "Patient", &crud, Scope::All);
    grant(FrontDesk, "CareTeam", &crud, Scope::All);
    grant(FrontDesk, "Practitioner", &[Create, Update], Scope::All);
    grant(FrontDesk, "Encounter", &[Read, Vread, Search, History, Create, Update], Scope::All);

    for ty in ["Patient", "Encounter", "Condition"] {
        grant(Billing, ty, &RF, Scope::All);
    }

    grant(Nurse, "Patient", &[Read, Vread, Search, History, Everything], Scope::CareTeam);
    for ty in ["CareTeam", "Encounter", "Condition", "AllergyIntolerance", "MedicationRequest"]
        .into_iter()
        .chain(NEW_CLINICAL)
    {
        grant(Nurse, ty, &RF, Scope::CareTeam);
    }
    grant(Nurse, "Observation", &[Read, Vread, Search, History, Create, Update], Scope::CareTeam);

    grant(Clinician, "Patient", &[Read, Vread, Search, History, Everything], Scope::CareTeam);
    grant(Clinician, "CareTeam", &RF, Scope::CareTeam);
    grant(Clinician, "Encounter", &[Read, Vread, Search, History, Create, Update], Scope::CareTeam);
    for ty in clinical.iter().copied() {
        grant(Clinician, ty, &crud, Scope::CareTeam);
    }

    grant(Patient, "Patient", &[Read, Vread, Search, History, Everything, AccessReport], Scope::Own);
    for ty in ["CareTeam", "Encounter"].into_iter().chain(clinical) {
        grant(Patient, ty, &RF, Scope::Own);
    }

    grant(Auditor, "AuditEvent", &RF, Scope::All);
    grant(Auditor, "Patient", &[AccessReport], Scope::All);
    m
}

#[test]
fn matrix_every_role_type_action() {
    let set = real();
    let expected = expected();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for role in Role::ALL {
        for ty in RESOURCE_TYPES {
            for action in Action::ALL {
                let d = set.decide_role(role, ty, action);
                let want = expected.get(&(role, ty, action)).copied();
                if d.scope != want || d.allowed != want.is_some() {
                    wrong.push(format!("{role} {action} {ty}: got {:?}, want {want:?}", d.scope));
                }
                if d.allowed {
                    let line = format!("p, {role}, {ty}, {action}, {}", d.scope.unwrap());
                    let via_group = format!("p, signed_in, {ty}, {action}, all");
                    assert!(d.rule.contains(&line) || d.rule.contains(&via_group), "{}", d.rule);
                    assert!(d.rule.starts_with("policy.csv line "), "{}", d.rule);
                } else {
                    assert!(d.read_mask.is_nothing() && d.write_mask.is_nothing());
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, Role::ALL.len() * crate::fhir::decl::all().len() * Action::ALL.len());
    assert!(wrong.is_empty(), "policy differs from CONTRACT §4:\n{}", wrong.join("\n"));
    assert!(!set.decide_role(Role::Admin, "Bundle", Action::Read).allowed);
}

/// The catalog check, driven by the declarations: every role has a field rule for every served type it may
/// read or write, naming only elements of that type, and the loader refuses the policy when one is missing.
#[test]
fn every_role_has_field_rules_for_every_type_it_may_read() {
    let set = real();
    let fields = source(FIELDS_FILE);
    let file: BTreeMap<String, BTreeMap<String, FieldRuleText>> = toml::from_str(&fields).unwrap();
    let mut required_sections = 0;
    let mut refused = BTreeSet::new();
    for role in Role::ALL {
        for d in crate::fhir::decl::all() {
            let may = |kind: fn(Action) -> bool| {
                Action::ALL.into_iter().any(|a| kind(a) && set.decide_role(role, d.name, a).allowed)
            };
            let (may_read, may_write) = (may(Action::reads), may(Action::writes));
            let section = file.get(role.as_str()).and_then(|t| t.get(d.name));
            assert_eq!(section.is_some(), may_read || may_write, "[{role}.{}]", d.name);
            let Some(rule) = section else { continue };
            required_sections += 1;
            let known = R4Catalog.elements(d.name).unwrap();
            for e in rule.read.iter().chain(&rule.write).filter(|e| *e != "*") {
                assert!(known.contains(e), "[{role}.{}] names {e}", d.name);
            }
            if may_read {
                let mask = set.decide_role(role, d.name, Action::Read).read_mask;
                assert!(!rule.read.is_empty() && !mask.is_nothing(), "[{role}.{}]", d.name);
                assert!(mask.allows("id") && mask.allows("meta"), "[{role}.{}]", d.name);
            }
            // Without the section, the policy does not load (checked for one role per type: each load costs
            // about a second in a debug build).
            if !refused.insert(d.name) {
                continue;
            }
            let mut without: toml::Table = toml::from_str(&fields).unwrap();
            without.get_mut(role.as_str()).and_then(toml::Value::as_table_mut).unwrap().remove(d.name);
            let err = load_with(FIELDS_FILE, &toml::to_string(&without).unwrap()).err().unwrap().to_string();
            assert!(err.contains(&format!("[{role}.{}] is missing", d.name)), "{err}");
        }
    }
    assert_eq!(required_sections, file.values().map(BTreeMap::len).sum::<usize>());
    assert_eq!(refused.len(), crate::fhir::decl::all().len());
}

#[derive(serde::Deserialize)]
struct FieldRuleText {
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
}

#[test]
fn role_discriminants_index_the_table() {
    for (i, r) in Role::ALL.into_iter().enumerate() {
        assert_eq!(r as usize, i);
    }
    for (i, a) in Action::ALL.into_iter().enumerate() {
        assert_eq!(a as usize, i);
        assert_eq!(a.as_str().parse::<Action>().unwrap(), a);
    }
    assert_eq!("$everything".parse::<Action>().unwrap(), Action::Everything);
    assert_eq!("$access-report".parse::<Action>().unwrap(), Action::AccessReport);
    assert!("patch".parse::<Action>().is_err());
}

fn masks(set: &PolicySet, role: Role, ty: &str) -> (Arc<FieldMask>, Arc<FieldMask>) {
    let d = set.decide_role(role, ty, Action::Read);
    assert!(d.allowed, "{role} cannot read {ty}");
    (d.read_mask, d.write_mask)
}

fn ssn() -> Value {
    json!({ "system": SSN_SYSTEM, "value": "123-45-6789" })
}

#[test]
fn field_masks_follow_the_contract_table() {
    let set = real();
    let only = |m: &FieldMask, ty: &str, allowed: &[&str]| {
        for e in R4Catalog.elements(ty).unwrap() {
            let want = allowed.contains(&e.as_str()) || ["id", "meta"].contains(&e.as_str());
            assert_eq!(m.allows(&e), want, "{ty}.{e}");
        }
    };

    let demographics =
        ["identifier", "name", "telecom", "address", "gender", "birthDate", "active", "communication", "extension"];
    let (r, w) = masks(&set, Role::FrontDesk, "Patient");
    only(&r, "Patient", &demographics);
    only(&w, "Patient", &demographics);
    // The SSN is write-only for the front desk: hidden when reading, writable (blind) when writing.
    assert!(r.hides_identifier(&ssn()) && !w.hides_identifier(&ssn()) && w.writes_blind(&ssn()));
    assert!(!w.allows("text") && !w.allows("contained"), "narrative could repeat the SSN");
    assert!(!r.hides_identifier(&json!({ "system": "urn:mrn", "value": "1" })));
    // The SSN class, however it is spelled or typed (the red team's upper-case and https variants were shown).
    for variant in [
        json!({ "system": "urn:oid:2.16.840.1.113883.4.1", "value": "1" }),
        json!({ "system": "URN:OID:2.16.840.1.113883.4.1", "value": "1" }),
        json!({ "system": "HTTPS://HL7.org/fhir/sid/us-ssn/", "value": "1" }),
        json!({ "system": " http://hl7.org/fhir/sid/US-SSN ", "value": "1" }),
        json!({ "system": "urn:x-local", "value": "1",
                "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "SS" }] } }),
        json!({ "value": "1", "type": { "coding": [{ "system": "https://terminology.hl7.org/CodeSystem/v2-0203/", "code": "SS" }] } }),
    ] {
        assert!(crate::access::is_ssn(&variant), "{variant}");
        assert!(r.hides_identifier(&variant) && w.writes_blind(&variant), "{variant}");
    }
    assert!(r.hides_system("urn:oid:2.16.840.1.113883.4.1") && !r.hides_system("urn:mrn"));
    let not_ssn =
        json!({ "system": "urn:x", "value": "1", "type": { "coding": [{ "code": "SS", "system": "urn:other" }] } });
    assert!(!crate::access::is_ssn(&not_ssn) && !r.hides_identifier(&not_ssn));

    let scheduling = ["status", "class", "type", "serviceType", "subject", "participant", "period", "location"];
    let (r, w) = masks(&set, Role::FrontDesk, "Encounter");
    only(&r, "Encounter", &scheduling);
    only(&w, "Encounter", &scheduling);
    let (r, w) = masks(&set, Role::FrontDesk, "CareTeam");
    assert!(r.is_everything() && w.is_everything());

    let (r, w) = masks(&set, Role::Billing, "Patient");
    only(&r, "Patient", &["identifier", "name", "birthDate", "address"]);
    assert!(!r.hides_identifier(&ssn()));
    assert!(w.is_nothing());
    only(
        &masks(&set, Role::Billing, "Encounter").0,
        "Encounter",
        &["status", "class", "period", "serviceType", "subject"],
    );
    only(&masks(&set, Role::Billing, "Condition").0, "Condition", &["code", "subject", "encounter"]);

    for role in [Role::Nurse, Role::Clinician] {
        let (r, w) = masks(&set, role, "Patient");
        assert!(r.hides_identifier(&ssn()));
        assert!(r.allows("telecom") && r.allows("maritalStatus") && r.allows("deceasedBoolean"));
        assert!(!r.allows("text") && !r.allows("contained"), "narrative could repeat the SSN");
        assert!(w.is_nothing());
        assert!(masks(&set, role, "Observation").0.is_everything());
        assert!(masks(&set, role, "Observation").1.is_everything());
        assert!(masks(&set, role, "CareTeam").1.is_nothing());
    }
    assert!(masks(&set, Role::Nurse, "Condition").1.is_nothing());
    assert!(masks(&set, Role::Clinician, "MedicationRequest").1.is_everything());

    for ty in ["Patient", "Observation", "CareTeam"] {
        let (r, w) = masks(&set, Role::Patient, ty);
        assert!(r.is_everything() && w.is_nothing(), "{ty}");
    }
    assert!(masks(&set, Role::Auditor, "AuditEvent").0.is_everything());

    // The workforce directory: only admin sees a practitioner's SSN.
    assert!(masks(&set, Role::Admin, "Practitioner").0.is_everything());
    for role in Role::ALL.into_iter().filter(|r| *r != Role::Admin) {
        assert!(masks(&set, role, "Practitioner").0.hides_identifier(&ssn()), "{role}");
    }
}

fn full_patient() -> Value {
    json!({
        "resourceType": "Patient",
        "id": "p1",
        "meta": { "versionId": "3" },
        "text": { "status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">SSN 123-45-6789</div>" },
        "identifier": [ { "system": "urn:mrn", "value": "MRN-1" }, ssn() ],
        "active": true,
        "name": [ { "family": "Doe", "given": ["Jane"] } ],
        "telecom": [ { "system": "phone", "value": "555-0100" } ],
        "gender": "female",
        "birthDate": "1980-01-02",
        "_birthDate": { "extension": [ { "url": "http://example.org/x", "valueString": "approx" } ] },
        "deceasedBoolean": false,
        "maritalStatus": { "text": "Married" },
        "address": [ { "city": "Springfield" } ]
    })
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn subsetted_tags(v: &Value) -> usize {
    v["meta"]["tag"]
        .as_array()
        .map(|t| t.iter().filter(|t| t["system"] == SUBSETTED_SYSTEM && t["code"] == SUBSETTED_CODE).count())
        .unwrap_or(0)
}

#[test]
fn shaping_removes_hidden_elements_and_tags_subsetted() {
    let set = real();
    let (front, _) = masks(&set, Role::FrontDesk, "Patient");
    let mut p = full_patient();
    assert!(front.shape(&mut p, None));
    let want: BTreeSet<String> = [
        "resourceType",
        "id",
        "meta",
        "identifier",
        "name",
        "telecom",
        "gender",
        "birthDate",
        "_birthDate",
        "address",
        "active",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(keys(&p), want);
    assert_eq!(p["identifier"], json!([{ "system": "urn:mrn", "value": "MRN-1" }]));
    assert_eq!(p["meta"]["versionId"], "3");
    assert_eq!(subsetted_tags(&p), 1);
    // Shaping again removes nothing more and does not tag twice.
    assert!(!front.shape(&mut p, None));
    assert_eq!(subsetted_tags(&p), 1);

    // Only the SSN removed: still subsetted; no identifier left means no identifier element.
    let (nurse, _) = masks(&set, Role::Nurse, "Patient");
    let mut p = json!({ "resourceType": "Patient", "id": "p1", "identifier": [ssn()], "gender": "male" });
    assert!(nurse.shape(&mut p, None));
    assert_eq!(keys(&p), ["resourceType", "id", "meta", "gender"].into_iter().map(String::from).collect());
    assert_eq!(subsetted_tags(&p), 1);

    // Nothing removed: no tag.
    let (own, _) = masks(&set, Role::Patient, "Patient");
    let mut p = full_patient();
    assert!(!own.shape(&mut p, None));
    assert_eq!(p, full_patient());

    let (billing, _) = masks(&set, Role::Billing, "Patient");
    let mut p = full_patient();
    assert!(billing.shape(&mut p, None));
    assert_eq!(p["identifier"].as_array().unwrap().len(), 2, "billing sees the SSN");
    assert!(p.get("telecom").is_none());
}

#[test]
fn elements_parameter_narrows_within_the_mask() {
    let set = real();
    let names = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

    let (own, _) = masks(&set, Role::Patient, "Patient");
    let mut p = full_patient();
    assert!(own.shape(&mut p, Some(&names(&["name", "birthDate"]))));
    let want: BTreeSet<String> =
        ["resourceType", "id", "meta", "name", "birthDate", "_birthDate"].into_iter().map(String::from).collect();
    assert_eq!(keys(&p), want);
    assert_eq!(subsetted_tags(&p), 1);

    // _elements cannot widen the mask.
    let (billing, _) = masks(&set, Role::Billing, "Patient");
    let mut p = full_patient();
    billing.shape(&mut p, Some(&names(&["telecom", "name"])));
    assert_eq!(keys(&p), ["resourceType", "id", "meta", "name"].into_iter().map(String::from).collect());

    // Choice elements and mandatory elements (Observation.status and .code are kept though not asked for).
    let (clin, _) = masks(&set, Role::Clinician, "Observation");
    let obs = json!({
        "resourceType": "Observation", "id": "o1", "status": "final", "code": { "text": "HR" },
        "subject": { "reference": "Patient/p1" }, "valueQuantity": { "value": 60 }, "note": [ { "text": "calm" } ]
    });
    for asked in [&["value"][..], &["value[x]"], &["valueQuantity"]] {
        let mut o = obs.clone();
        assert!(clin.shape(&mut o, Some(&names(asked))));
        let want: BTreeSet<String> =
            ["resourceType", "id", "meta", "status", "code", "valueQuantity"].into_iter().map(String::from).collect();
        assert_eq!(keys(&o), want, "{asked:?}");
    }
    // Everything present asked for: nothing removed, no tag.
    let mut o = obs.clone();
    assert!(!clin.shape(&mut o, Some(&names(&["subject", "value", "note"]))));
    assert_eq!(o, obs);
}

fn front_desk_update() -> Decision {
    let d = real().decide_role(Role::FrontDesk, "Patient", Action::Update);
    assert!(d.allowed);
    d
}

/// What a front desk gets on read: the shaped stored Patient.
fn front_desk_view() -> Value {
    let d = front_desk_update();
    let mut v = full_patient();
    d.read_mask.shape(&mut v, None);
    v
}

#[test]
fn front_desk_put_keeps_the_ssn_and_other_hidden_elements() {
    let d = front_desk_update();
    let stored = full_patient();
    let mut body = front_desk_view();
    body["name"] = json!([{ "family": "Roe", "given": ["Jane"] }]);
    body["telecom"] = json!([]);
    d.merge_hidden(Some(&stored), &mut body).unwrap();

    assert_eq!(body["name"][0]["family"], "Roe");
    assert_eq!(body["telecom"], json!([]));
    let ids = body["identifier"].as_array().unwrap();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&ssn()), "the SSN survives");
    assert!(ids.contains(&json!({ "system": "urn:mrn", "value": "MRN-1" })));
    for hidden in ["maritalStatus", "text", "active", "deceasedBoolean"] {
        assert_eq!(body[hidden], stored[hidden], "{hidden}");
    }
    assert_eq!(subsetted_tags(&body), 0, "the stored resource is complete: no SUBSETTED tag");

    // Dropping all visible identifiers keeps the hidden SSN.
    let mut body = front_desk_view();
    body.as_object_mut().unwrap().remove("identifier");
    d.merge_hidden(Some(&stored), &mut body).unwrap();
    assert_eq!(body["identifier"], json!([ssn()]));
}

#[test]
fn writes_outside_the_write_mask_are_refused() {
    let d = front_desk_update();
    let stored = full_patient();

    // The front desk writes the SSN blind: one in the body replaces the stored one, whatever the stored value
    // (nothing is compared with it: no oracle); the stored one is never part of the result.
    for ssn_value in ["123-45-6789", "999-99-9999"] {
        let mut body = front_desk_view();
        let sent = json!({ "system": SSN_SYSTEM, "value": ssn_value });
        body["identifier"].as_array_mut().unwrap().push(sent.clone());
        d.merge_hidden(Some(&stored), &mut body).unwrap();
        let ssns: Vec<&Value> =
            body["identifier"].as_array().unwrap().iter().filter(|i| crate::access::is_ssn(i)).collect();
        assert_eq!(ssns, [&sent]);
    }
    // An identifier of a hidden (not write-only) system is refused, naming the element: the front desk on a
    // Practitioner's SSN.
    let practitioner = real().decide_role(Role::FrontDesk, "Practitioner", Action::Update);
    let mut body = json!({ "resourceType": "Practitioner", "identifier": [ssn()] });
    assert_eq!(practitioner.merge_hidden(None, &mut body), Err(WriteDenied { element: Some("identifier".into()) }));
    // A hidden element, even with its stored value: refused, naming the element (never its value).
    let mut body = front_desk_view();
    body["maritalStatus"] = stored["maritalStatus"].clone();
    assert_eq!(d.merge_hidden(Some(&stored), &mut body), Err(WriteDenied { element: Some("maritalStatus".into()) }));
    let mut body = front_desk_view();
    body["deceasedBoolean"] = json!(true);
    let denied = d.merge_hidden(Some(&stored), &mut body).unwrap_err();
    assert_eq!(denied.element.as_deref(), Some("deceased[x]"));
    assert!(matches!(denied.at("Patient"), AppError::ForbiddenElement { path } if path == "Patient.deceased[x]"));

    // Create: demographics fine, an SSN written blind, nothing hidden invented.
    let create = real().decide_role(Role::FrontDesk, "Patient", Action::Create);
    let mut body = json!({ "resourceType": "Patient", "name": [ { "family": "New" } ] });
    create.merge_hidden(None, &mut body).unwrap();
    assert_eq!(keys(&body), ["resourceType", "name"].into_iter().map(String::from).collect());
    let mut body = json!({ "resourceType": "Patient", "identifier": [ssn()] });
    create.merge_hidden(None, &mut body).unwrap();
    assert_eq!(body["identifier"], json!([ssn()]));

    // Roles without write access are refused outright.
    let set = real();
    let mut body = front_desk_view();
    assert_eq!(
        set.decide_role(Role::Nurse, "Patient", Action::Update).merge_hidden(Some(&stored), &mut body),
        Err(WriteDenied::ALL)
    );
    assert_eq!(
        set.decide_role(Role::Billing, "Patient", Action::Read).merge_hidden(Some(&stored), &mut body),
        Err(WriteDenied::ALL)
    );
    let mut not_object = json!([1]);
    assert_eq!(d.merge_hidden(Some(&stored), &mut not_object), Err(WriteDenied::ALL));

    // Clinicians write every element of clinical resources.
    let upd = set.decide_role(Role::Clinician, "Observation", Action::Update);
    let stored = json!({ "resourceType": "Observation", "id": "o", "status": "final", "code": { "text": "x" }, "note": [ { "text": "a" } ] });
    let mut body = json!({ "resourceType": "Observation", "id": "o", "status": "amended", "code": { "text": "x" } });
    let sent = body.clone();
    upd.merge_hidden(Some(&stored), &mut body).unwrap();
    assert_eq!(body, sent, "a full writer's PUT replaces the resource");
}

#[test]
fn readable_but_not_writable_elements_may_be_sent_back_unchanged() {
    let read =
        FieldMask::new(Some(["name", "gender"].into_iter().map(String::from).collect()), Vec::new(), &[], Vec::new());
    let write = FieldMask::new(Some(["name"].into_iter().map(String::from).collect()), Vec::new(), &[], Vec::new());
    let d = Decision {
        allowed: true,
        scope: Some(Scope::All),
        read_mask: Arc::new(read),
        write_mask: Arc::new(write),
        rule: Arc::from("test"),
        narrowing: None,
    };
    let stored =
        json!({ "resourceType": "Patient", "gender": "female", "name": [ { "family": "A" } ], "active": true });
    let mut body = json!({ "resourceType": "Patient", "gender": "female", "name": [ { "family": "B" } ] });
    d.merge_hidden(Some(&stored), &mut body).unwrap();
    assert_eq!(
        body,
        json!({ "resourceType": "Patient", "gender": "female", "name": [ { "family": "B" } ], "active": true })
    );
    let mut body = json!({ "resourceType": "Patient", "gender": "male" });
    assert_eq!(d.merge_hidden(Some(&stored), &mut body), Err(WriteDenied { element: Some("gender".into()) }));
}

#[test]
fn several_roles_take_the_broadest_scope_without_mixing_masks() {
    let set = real();
    // nurse (careteam, all but SSN) + billing (all patients, a few fields): billing's scope and mask only.
    let d = set.decide(&[Role::Nurse, Role::Billing], "Patient", Action::Read);
    assert_eq!(d.scope, Some(Scope::All));
    assert!(!d.read_mask.allows("telecom"), "nurse fields must not spread to every patient");
    // Only the nurse reads observations.
    let d = set.decide(&[Role::Billing, Role::Nurse], "Observation", Action::Read);
    assert_eq!(d.scope, Some(Scope::CareTeam));
    assert!(d.read_mask.is_everything());
    // Same scope: masks united (telecom from front desk, SSN from billing).
    let d = set.decide(&[Role::FrontDesk, Role::Billing], "Patient", Action::Read);
    assert_eq!(d.scope, Some(Scope::All));
    assert!(d.read_mask.allows("telecom") && !d.read_mask.hides_identifier(&ssn()));
    assert!(!d.read_mask.allows("maritalStatus"));
    assert!(d.rule.contains('|'));
    // No role: denied.
    assert!(!set.decide(&[], "Practitioner", Action::Read).allowed);
}

#[test]
fn explain_names_the_deciding_rule() {
    let set = real();
    let text = set.explain(Role::FrontDesk, "Patient", Action::Update);
    let line = source(POLICY_FILE).lines().position(|l| l == "p, front_desk, Patient, update, all").unwrap() + 1;
    assert!(text.contains("ALLOWED, scope all"), "{text}");
    assert!(text.contains(&format!("policy.csv line {line}: p, front_desk, Patient, update, all")), "{text}");
    assert!(text.contains("identifiers of system http://hl7.org/fhir/sid/us-ssn write-only"), "{text}");
    let text = set.explain(Role::FrontDesk, "Practitioner", Action::Update);
    assert!(text.contains("never identifiers of system http://hl7.org/fhir/sid/us-ssn"), "{text}");
    let text = set.explain(Role::FrontDesk, "Observation", Action::Read);
    assert!(text.contains("DENIED") && text.contains("no line of policy.csv grants"), "{text}");
    assert!(PolicySet::deny_all().explain(Role::Admin, "Patient", Action::Read).contains("no access policy is loaded"));
}

#[test]
fn no_policy_denies_everything() {
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(AccessControl::load(empty.path(), catalog()), Err(PolicyError::Io { .. })));
    let ac = AccessControl::deny_all(catalog());
    for role in Role::ALL {
        for ty in RESOURCE_TYPES {
            for action in Action::ALL {
                let d = ac.decide(&[role], ty, action);
                assert!(!d.allowed && d.scope.is_none() && d.read_mask.is_nothing());
            }
        }
    }
}

fn copy_policies(to: &Path) {
    for f in [MODEL_FILE, POLICY_FILE, FIELDS_FILE] {
        std::fs::copy(policies_dir().join(f), to.join(f)).unwrap();
    }
}

#[test]
fn failed_reload_keeps_the_previous_policy_and_a_good_one_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    copy_policies(dir.path());
    let ac = AccessControl::load(dir.path(), catalog()).unwrap();
    assert!(ac.decide(&[Role::Billing], "Condition", Action::Read).allowed);

    std::fs::write(dir.path().join(POLICY_FILE), "p, billing, Condition\nthis is not a policy\n").unwrap();
    assert!(ac.reload_from_dir(dir.path()).is_err());
    assert!(ac.decide(&[Role::Billing], "Condition", Action::Read).allowed);
    std::fs::remove_file(dir.path().join(FIELDS_FILE)).unwrap();
    assert!(ac.reload_from_dir(dir.path()).is_err());
    assert!(ac.decide(&[Role::Billing], "Condition", Action::Read).allowed);

    // A valid edit: billing loses Condition (both files edited together).
    copy_policies(dir.path());
    let policy = source(POLICY_FILE);
    let policy: Vec<&str> = policy.lines().filter(|l| !l.starts_with("p, billing, Condition")).collect();
    std::fs::write(dir.path().join(POLICY_FILE), policy.join("\n")).unwrap();
    let fields = source(FIELDS_FILE).replace("[billing.Condition]\nread = [\"code\", \"subject\", \"encounter\"]", "");
    std::fs::write(dir.path().join(FIELDS_FILE), fields).unwrap();
    ac.reload_from_dir(dir.path()).unwrap();
    assert!(!ac.decide(&[Role::Billing], "Condition", Action::Read).allowed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_reloads_on_change() {
    let dir = tempfile::tempdir().unwrap();
    copy_policies(dir.path());
    let ac = Arc::new(AccessControl::deny_all(catalog()));
    let task = spawn_policy_watcher(Arc::clone(&ac), dir.path().to_path_buf(), Duration::from_millis(50));
    let until = |want: bool| {
        let ac = Arc::clone(&ac);
        async move {
            // Up to 30 s: with 26 types one load asks casbin some 4,000 questions, several seconds in a debug
            // build on a loaded machine.
            for _ in 0..1200 {
                if ac.decide(&[Role::Admin], "Practitioner", Action::Create).allowed == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            false
        }
    };
    assert!(until(true).await, "first poll loads the policy");
    let policy = source(POLICY_FILE).replace("p, admin, Practitioner, create, all\n", "");
    std::fs::write(dir.path().join(POLICY_FILE), policy).unwrap();
    assert!(until(false).await, "the change is picked up without a restart");
    std::fs::write(dir.path().join(POLICY_FILE), "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(ac.decide(&[Role::Admin], "Practitioner", Action::Update).allowed, "bad edit: previous policy stays");
    task.abort();
}

#[test]
fn invalid_policies_fail_to_load() {
    let fields = source(FIELDS_FILE);
    let policy = source(POLICY_FILE);
    let model = source(MODEL_FILE);
    let bad = [
        (
            FIELDS_FILE,
            fields.replace("\"telecom\", \"address\", \"gender\"", "\"telecom\", \"addresses\", \"gender\""),
            "unknown element",
        ),
        (FIELDS_FILE, fields.replace("[billing.Condition]", "[accountant.Condition]"), "unknown role"),
        (FIELDS_FILE, fields.replace("[billing.Condition]", "[billing.Claim]"), "unknown type"),
        (FIELDS_FILE, fields.replace("[billing.Condition]\nread", "[billing.Condition]\nreads"), "unknown key"),
        (
            FIELDS_FILE,
            fields.replace("[billing.Condition]\nread = [\"code\", \"subject\", \"encounter\"]", ""),
            "missing section",
        ),
        (FIELDS_FILE, format!("{fields}\n[billing.Observation]\nread = [\"code\"]\n"), "section without grant"),
        (FIELDS_FILE, format!("{fields}\n[billing.Condition]\n"), "duplicate section"),
        (
            FIELDS_FILE,
            fields.replace("[nurse.Condition]\nread = [\"*\"]", "[nurse.Condition]\nread = [\"*\"]\nwrite = [\"*\"]"),
            "write without grant",
        ),
        (
            FIELDS_FILE,
            fields.replace(
                "[billing.Condition]\nread = [\"code\", \"subject\", \"encounter\"]",
                "[billing.Condition]\nread = [\"code\", \"*\"]",
            ),
            "star mixed",
        ),
        (FIELDS_FILE, "this is = not toml [".to_owned(), "malformed toml"),
        (
            POLICY_FILE,
            policy.replace("p, billing, Condition, read, all", "p, accountant, Condition, read, all"),
            "unknown role",
        ),
        (
            POLICY_FILE,
            policy.replace("p, billing, Condition, read, all", "p, billing, Claim, read, all"),
            "unknown type",
        ),
        (
            POLICY_FILE,
            policy.replace("p, billing, Condition, read, all", "p, billing, Condition, patch, all"),
            "unknown action",
        ),
        (
            POLICY_FILE,
            policy.replace("p, billing, Condition, read, all", "p, billing, Condition, read, everyone"),
            "unknown scope",
        ),
        (
            POLICY_FILE,
            policy.replace("p, billing, Condition, read, all", "p, billing, Condition, read, careteam"),
            "scope misfit",
        ),
        (
            POLICY_FILE,
            policy.replace("p, billing, Condition, read, all", "p, billing, Condition, read, all # claims"),
            "inline comment",
        ),
        (POLICY_FILE, policy.replace("p, billing, Condition, read, all", "p, billing, Condition, read"), "short line"),
        (POLICY_FILE, format!("{policy}\np, nurse, Patient, read, all\n"), "two scopes"),
        (POLICY_FILE, format!("{policy}\np, admin, Practitioner, create, all\n"), "duplicate"),
        (POLICY_FILE, format!("{policy}\ng, nurse, clinician\n"), "group named like a role"),
        (MODEL_FILE, "[request_definition]\nr = sub, obj\n".to_owned(), "malformed model"),
        (MODEL_FILE, model.replace("r.obj == p.obj &&", ""), "model ignoring the type"),
        (
            MODEL_FILE,
            model.replace("r.obj == p.obj && r.act == p.act && r.scope == p.scope && g(r.sub, p.sub)", "true"),
            "model granting all",
        ),
    ];
    for (file, text, what) in bad {
        assert_ne!(text, source(file), "{what}: the test edit must change {file}");
        assert!(load_with(file, &text).is_err(), "{what} in {file} must not load");
    }
    assert!(load_with(FIELDS_FILE, &fields).is_ok());
}

/// CONTRACT §4 on every declared type, derived from the declarations rather than listed: for each type of
/// `decl::all()` and each role, which may read and write it, at which scope, that every readable type has a
/// mask, that no role but billing, admin (directory) and the patient sees an SSN where the type identifies a
/// person, that the front desk gets no clinical type and billing nothing beyond its list.
#[test]
fn contract_rules_hold_on_every_declared_type_for_every_role() {
    use crate::fhir::decl::{PatientLink, all};
    let set = real();
    let reads = |role: Role, ty: &str| RF.iter().all(|a| set.decide_role(role, ty, *a).allowed);
    let reads_any = |role: Role, ty: &str| RF.iter().any(|a| set.decide_role(role, ty, *a).allowed);
    let writes_any = |role: Role, ty: &str| {
        [Action::Create, Action::Update, Action::Delete].iter().any(|a| set.decide_role(role, ty, *a).allowed)
    };
    let scope = |role: Role, ty: &str| set.decide_role(role, ty, Action::Read).scope;
    let mut clinical_seen = 0;
    for d in all() {
        let ty = d.name;
        let in_compartment = matches!(d.patient_link, PatientLink::Element(_) | PatientLink::Itself);
        let directory = d.patient_link == PatientLink::None && !d.read_only;
        let financial = FINANCIAL.contains(&ty);
        let scheduling = ["CareTeam", "Encounter"].contains(&ty);
        let clinical = matches!(d.patient_link, PatientLink::Element(_)) && !financial && !scheduling;
        clinical_seen += usize::from(clinical);
        assert!(directory || in_compartment || ty == "AuditEvent", "{ty}: unclassified");
        assert!(!(directory && in_compartment), "{ty}");

        for role in Role::ALL {
            // Every readable type has a mask that shows something (the loader refuses a missing section).
            if reads_any(role, ty) {
                let m = masks(&set, role, ty).0;
                assert!(!m.is_nothing() && m.allows("id"), "{role} reads {ty} without a mask");
            }
            if directory {
                assert!(reads(role, ty) && scope(role, ty) == Some(Scope::All), "{role} reads the {ty} directory");
            }
        }
        if directory {
            for role in [Role::Nurse, Role::Billing, Role::Patient, Role::Auditor] {
                assert!(!writes_any(role, ty), "{role} writes the {ty} directory");
            }
            continue;
        }
        // The patient reads their own compartment, every element of it, and writes nothing.
        if in_compartment {
            assert!(reads(Role::Patient, ty) && scope(Role::Patient, ty) == Some(Scope::Own), "patient {ty}");
            assert!(masks(&set, Role::Patient, ty).0.is_everything(), "patient sees all of {ty}");
        }
        assert!(!writes_any(Role::Patient, ty), "patient writes {ty}");
        // Auditor and admin: no PHI type at all.
        for role in [Role::Auditor, Role::Admin] {
            if ty != "AuditEvent" || role == Role::Admin {
                assert!(!reads_any(role, ty) && !writes_any(role, ty), "{role} {ty}");
            }
        }
        if clinical {
            // Front desk and billing: no clinical type (billing's coded Condition excepted, by contract).
            assert!(!reads_any(Role::FrontDesk, ty) && !writes_any(Role::FrontDesk, ty), "front desk {ty}");
            if ty != "Condition" {
                assert!(!reads_any(Role::Billing, ty), "billing {ty}");
            }
            assert!(!writes_any(Role::Billing, ty), "billing writes {ty}");
            // Nurse reads every clinical type of care-team patients; writes Observation only.
            assert!(reads(Role::Nurse, ty) && scope(Role::Nurse, ty) == Some(Scope::CareTeam), "nurse {ty}");
            assert!(masks(&set, Role::Nurse, ty).0.is_everything(), "nurse sees all of {ty}");
            assert_eq!(writes_any(Role::Nurse, ty), ty == "Observation", "nurse writes {ty}");
            // Clinician: create, read, update, delete, every element, care-team patients.
            for a in Action::ALL.into_iter().filter(|a| a.reads() || a.writes() || *a == Action::Delete) {
                if a == Action::Everything {
                    continue;
                }
                let dec = set.decide_role(Role::Clinician, ty, a);
                assert_eq!(dec.scope, Some(Scope::CareTeam), "clinician {a} {ty}");
            }
            let (r, w) = masks(&set, Role::Clinician, ty);
            assert!(r.is_everything() && w.is_everything(), "clinician {ty}");
        }
        if financial {
            // Billing's own records: read and write, never delete; nobody else but the patient.
            assert!(reads(Role::Billing, ty) && scope(Role::Billing, ty) == Some(Scope::All), "billing {ty}");
            for a in [Action::Create, Action::Update] {
                assert!(set.decide_role(Role::Billing, ty, a).allowed, "billing {a} {ty}");
            }
            assert!(!set.decide_role(Role::Billing, ty, Action::Delete).allowed, "billing deletes {ty}");
            for role in [Role::FrontDesk, Role::Nurse, Role::Clinician] {
                assert!(!reads_any(role, ty) && !writes_any(role, ty), "{role} {ty}");
            }
        }
    }
    assert_eq!(clinical_seen, 4 + NEW_CLINICAL.len());

    // Billing reads nothing beyond its list (and the directories); writes only its own records.
    for d in all().iter().filter(|d| d.patient_link != PatientLink::None) {
        let listed = ["Patient", "Encounter", "Condition"].contains(&d.name) || FINANCIAL.contains(&d.name);
        assert_eq!(reads_any(Role::Billing, d.name), listed, "billing reads {}", d.name);
        assert_eq!(writes_any(Role::Billing, d.name), FINANCIAL.contains(&d.name), "billing writes {}", d.name);
    }
    // The front desk: Patient, CareTeam, Encounter in the compartment, nothing else.
    for d in all().iter().filter(|d| d.patient_link != PatientLink::None) {
        let listed = ["Patient", "CareTeam", "Encounter"].contains(&d.name);
        assert_eq!(reads_any(Role::FrontDesk, d.name), listed, "front desk reads {}", d.name);
    }

    // SSNs where a type identifies a person (Patient, Practitioner): hidden from clinicians, nurses and the
    // front desk on every such type (write-only for the front desk on Patient); billing sees the patient's.
    for d in all().iter().filter(|d| ["Patient", "Practitioner"].contains(&d.name)) {
        assert!(d.elements().any(|e| e == "identifier"));
        for role in [Role::Clinician, Role::Nurse, Role::FrontDesk] {
            let r = masks(&set, role, d.name).0;
            assert!(r.hides_identifier(&ssn()) && !r.allows("text"), "{role} sees SSNs on {}", d.name);
        }
    }
    assert!(!masks(&set, Role::Billing, "Patient").0.hides_identifier(&ssn()));
    // Nobody but the front desk writes a patient's SSN, and it writes it blind.
    for role in Role::ALL {
        let w = set.decide_role(role, "Patient", Action::Update).write_mask;
        let writes_ssn = w.allows("identifier") && !w.hides_identifier(&ssn());
        assert_eq!(writes_ssn, role == Role::FrontDesk, "{role} writes SSNs");
    }
}

/// `write_only_identifier_systems`: the loader's rules for it.
#[test]
fn write_only_identifier_systems_are_validated() {
    let fields = source(FIELDS_FILE);
    let swap = |from: &str, to: &str| {
        assert!(fields.contains(from));
        load_with(FIELDS_FILE, &fields.replacen(from, to, 1)).err().map(|e| e.to_string())
    };
    let wo = "write_only_identifier_systems = [\"http://hl7.org/fhir/sid/us-ssn\"]";
    // Both hidden and write-only: refused (whatever the spelling).
    let err = swap(wo, &format!("{wo}\nhide_identifier_systems = [\"urn:oid:2.16.840.1.113883.4.1\"]")).unwrap();
    assert!(err.contains("either hidden or write-only"), "{err}");
    // Write-only needs identifier among the writable elements.
    let write_line = "write = [\"identifier\", \"name\", \"telecom\", \"address\", \"gender\", \"birthDate\", \"active\", \"communication\", \"extension\"]";
    let err = swap(write_line, "write = [\"name\"]").unwrap();
    assert!(err.contains("write-only identifiers need write to include identifier"), "{err}");
    // Text cannot be read where identifiers are write-only.
    let read_line = "read = [\"identifier\", \"name\", \"telecom\", \"address\", \"gender\", \"birthDate\", \"active\", \"communication\", \"extension\"]";
    let err = swap(read_line, &read_line.replace("\"extension\"", "\"extension\", \"text\"")).unwrap();
    assert!(err.contains("text and contained are hidden"), "{err}");
    assert!(swap(wo, "write_only_identifier_systems = [\"\"]").unwrap().contains("empty identifier system"));
    // Explain says it.
    let explained = real().explain(Role::FrontDesk, "Patient", Action::Update);
    assert!(explained.contains("write-only"), "{explained}");
}
