//! Reading FHIR `Reference`s to resources stored here, and the care relationships a CareTeam defines (the
//! CareTeam declaration's write hook). Pure: no database.

use serde_json::Value;
use uuid::Uuid;

/// The id of the `rtype` resource a `Reference` element points to, when it is a relative `{rtype}/{id}`
/// reference whose id is a carevault id (a UUID), in canonical form. `None` for anything else: another type,
/// an absolute URL, a version-specific or contained reference, an identifier-only reference, a missing one.
pub fn local_id(reference: Option<&Value>, rtype: &str) -> Option<String> {
    let r = reference?.get("reference")?.as_str()?;
    let id = r.strip_prefix(rtype)?.strip_prefix('/')?;
    Uuid::parse_str(id).ok().map(|u| u.to_string())
}

/// The Patient id a `Reference` element points to (`Patient/{uuid}`), as [`local_id`] reads it. For an array
/// of references (`Provenance.target`, the one patient link R4 expresses that way) the one Patient among them:
/// `None` when there is none, or when they name two different patients (fail closed: a record belongs to one
/// compartment).
pub fn patient_of_reference(reference: Option<&Value>) -> Option<String> {
    match reference? {
        Value::Array(items) => {
            let mut patients = items.iter().filter(|r| is_patient_reference(r)).map(|r| local_id(Some(r), "Patient"));
            let first = patients.next()??;
            patients.all(|p| p.as_deref() == Some(first.as_str())).then_some(first)
        }
        single => local_id(Some(single), "Patient"),
    }
}

/// Whether a `Reference` names a Patient (`Patient/…`), whatever its id looks like.
fn is_patient_reference(reference: &Value) -> bool {
    reference.get("reference").and_then(Value::as_str).is_some_and(|r| r.starts_with("Patient/"))
}

/// The care relationships (patient id, practitioner id) an active CareTeam defines: its `subject` Patient with
/// each `participant.member` that is a Practitioner. None for a CareTeam that is not `active`, or without a
/// Patient subject.
pub fn care_pairs(resource: &Value) -> Vec<(String, String)> {
    if resource.get("status").and_then(Value::as_str) != Some("active") {
        return vec![];
    }
    let Some(patient) = patient_of_reference(resource.get("subject")) else { return vec![] };
    let mut pairs: Vec<(String, String)> = Vec::new();
    let members = resource.get("participant").and_then(Value::as_array).into_iter().flatten();
    for practitioner in members.filter_map(|p| local_id(p.get("member"), "Practitioner")) {
        pairs.push((patient.clone(), practitioner));
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const P: &str = "8f1c6e3a-4f6b-4a51-9d8e-0c9a3f1b2d7e";
    const D: &str = "0b7d9c2e-1a3f-4e5d-8c6b-9a0f1e2d3c4b";

    #[test]
    fn local_ids_are_relative_references_to_uuids_of_the_type() {
        let r = |s: &str| json!({ "reference": s });
        assert_eq!(patient_of_reference(Some(&r(&format!("Patient/{P}")))).as_deref(), Some(P));
        let upper = format!("Patient/{}", P.to_uppercase());
        assert_eq!(patient_of_reference(Some(&r(&upper))).as_deref(), Some(P));
        for bad in [
            format!("Practitioner/{P}"),
            format!("PatientX/{P}"),
            format!("Patient{P}"),
            format!("https://h/fhir/Patient/{P}"),
            format!("Patient/{P}/_history/2"),
            "Patient/example".to_owned(),
            "#p1".to_owned(),
        ] {
            assert_eq!(patient_of_reference(Some(&r(&bad))), None, "{bad}");
        }
        assert_eq!(patient_of_reference(Some(&json!({ "identifier": { "value": P } }))), None);
        assert_eq!(patient_of_reference(None), None);
        // An array (Provenance.target): the one Patient among the targets; none, two or a malformed one fail.
        let other = r("Procedure/5b0a7d4e-7d0c-4c3e-9f27-1d1b7a9c2e11");
        let p = r(&format!("Patient/{P}"));
        assert_eq!(patient_of_reference(Some(&json!([other, p, p]))).as_deref(), Some(P));
        assert_eq!(patient_of_reference(Some(&json!([other]))), None);
        let q = r("Patient/0d7c1c77-2a4f-4b32-9a0e-59d5c3b1f2aa");
        assert_eq!(patient_of_reference(Some(&json!([p, q]))), None);
        assert_eq!(patient_of_reference(Some(&json!([p, r("Patient/not-a-uuid")]))), None);
        assert_eq!(local_id(Some(&r(&format!("Practitioner/{D}"))), "Practitioner").as_deref(), Some(D));
    }

    #[test]
    fn care_pairs_of_an_active_care_team_only() {
        let team = |status: &str| {
            json!({"resourceType": "CareTeam", "status": status, "subject": {"reference": format!("Patient/{P}")},
                "participant": [{"member": {"reference": format!("Practitioner/{D}")}},
                                {"member": {"reference": format!("Patient/{P}")}},
                                {"member": {"reference": "Practitioner/not-a-uuid"}},
                                {"role": [{"text": "no member"}]}]})
        };
        assert_eq!(care_pairs(&team("active")), vec![(P.to_owned(), D.to_owned())]);
        for status in ["proposed", "suspended", "inactive", "entered-in-error"] {
            assert!(care_pairs(&team(status)).is_empty(), "{status}");
        }
        let mut no_patient = team("active");
        no_patient["subject"] = json!({"reference": "Group/g"});
        assert!(care_pairs(&no_patient).is_empty());
    }
}
