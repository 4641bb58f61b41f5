//! Reference integrity of a write: every reference in the resource that names a resource of this server must
//! resolve to a live resource the caller may reach, and a reference from a resource in a patient's compartment
//! into a patient compartment must stay in the same patient's compartment.
//!
//! Which references: every `Reference` anywhere in the resource (extensions and contained resources included),
//! not only the declared paths ([`ResourceDecl::references`]):
//! - `#id` (a contained resource) is not looked up;
//! - on a declared path, the reference is `Type/{id}` (relative) with a declared target type;
//! - on any other path, a relative `Type/{id}` (or an absolute URL under this server's base) names a served
//!   type; an absolute `http(s)` URL of another server is kept as the client sent it (it names nothing here);
//! - anything else that names no resource here is refused: `urn:uuid:`/`urn:oid:` (only a transaction Bundle
//!   resolves them), conditional references (`Type?query`), unknown types, ids that are not carevault ids;
//! - `Type/{id}/_history/{n}` must name an existing version of a live resource.
//!
//! Which targets the caller may use: a target in a patient compartment must be within the caller's scope filter
//! (the same SQL scope as a read), and, when the written resource is in a compartment too, in the written
//! resource's own patient's compartment. A target outside compartments (Practitioner, Organization) only has to
//! exist. Every refusal is the same 400, naming the element path only: a missing target, one out of scope, one
//! in another patient's compartment and a deleted one cannot be told apart.

use serde_json::Value;
use uuid::Uuid;

use super::store::{self, ScopeFilter};
use crate::error::{AppError, AppResult};
use crate::fhir::{PatientLink, ResourceDecl, decl};
use crate::store::AnyConnection;

const NOT_RESOLVED: &str = "The reference does not resolve to a resource of an allowed type.";
const NO_PATIENT: &str = "A reference to the Patient is required.";

/// Declared references whose purpose is to cross compartments: `Patient.link.other` points to another Patient
/// record (of the same person: replaced-by, see-also). Checked within the caller's scope only.
const CROSS_COMPARTMENT: &[(&str, &str)] = &[("Patient", "link.other")];

/// Elements named `reference` that are not `Reference.reference` (R4: `uri` elements), by type and path of the
/// object holding them. (`Expression.reference` and `DetectedIssue.reference` are told apart by their siblings:
/// see [`is_reference`].)
const NOT_REFERENCES: &[(&str, &str)] = &[("Immunization", "education")];

/// The elements a FHIR `Reference` has.
const REFERENCE_KEYS: &[&str] =
    &["id", "extension", "reference", "_reference", "type", "_type", "identifier", "display", "_display"];

/// A local target a reference names.
struct Target<'a> {
    path: String,
    rtype: &'a str,
    id: String,
    version: Option<i64>,
}

/// Checks every reference of `resource` (of type `d`, being written by a caller whose scope on `d` is `reach`).
/// `base` is the server's FHIR base URL (`https://host/fhir`).
pub(super) fn check(
    conn: &mut AnyConnection,
    d: &ResourceDecl,
    resource: &Value,
    reach: &ScopeFilter,
    base: &str,
) -> AppResult<()> {
    let mut found = Vec::new();
    collect(resource, &mut String::new(), (d.name, 0), &mut found);
    let mut targets = Vec::with_capacity(found.len());
    for (path, reference) in found {
        let bad = || AppError::invalid(format!("{}.{path}", d.name), NOT_RESOLVED);
        match parse(d, &path, reference, base) {
            Parsed::Local(rtype, id, version) => targets.push(Target { path, rtype, id, version }),
            Parsed::Elsewhere => {}
            Parsed::Refused => return Err(bad()),
        }
    }
    if targets.is_empty() {
        return Ok(());
    }
    // The written resource's own patient, read once when a compartment target needs it.
    let mut own: Option<Option<String>> = None;
    for t in &targets {
        let bad = || AppError::invalid(format!("{}.{}", d.name, t.path), NOT_RESOLVED);
        let Some(target_decl) = decl::decl(t.rtype) else { return Err(bad()) };
        let scope = if target_decl.patient_link == PatientLink::None {
            ScopeFilter::All
        } else if d.patient_link == PatientLink::None || CROSS_COMPARTMENT.contains(&(d.name, t.path.as_str())) {
            reach.clone()
        } else {
            let patient = match &own {
                Some(p) => p.clone(),
                None => {
                    let p = own_patient(conn, d, resource)?;
                    own = Some(p.clone());
                    p
                }
            };
            let Some(patient) = patient else { return Err(bad()) };
            ScopeFilter::Confined(Box::new(reach.clone()), patient)
        };
        match store::current(conn, t.rtype, &t.id, &scope)? {
            Some(row) if !row.deleted && t.version.is_none_or(|v| v <= row.version_id) => {}
            _ => return Err(bad()),
        }
    }
    Ok(())
}

enum Parsed<'a> {
    /// A resource of this server: type, canonical id, version.
    Local(&'a str, String, Option<i64>),
    /// Another server's resource, or a contained one: nothing to look up.
    Elsewhere,
    Refused,
}

fn parse<'a>(d: &ResourceDecl, path: &str, reference: &'a str, base: &str) -> Parsed<'a> {
    if reference.starts_with('#') {
        return Parsed::Elsewhere;
    }
    let declared = d.references.iter().find(|(p, _)| *p == path).map(|(_, targets)| *targets);
    let relative = match declared {
        Some(_) => reference,
        None => {
            let under_base = base.strip_suffix('/').unwrap_or(base);
            match reference.strip_prefix(under_base).and_then(|r| r.strip_prefix('/')) {
                Some(r) if !under_base.is_empty() => r,
                _ if reference.starts_with("https://") || reference.starts_with("http://") => {
                    return Parsed::Elsewhere;
                }
                _ => reference,
            }
        }
    };
    let mut parts = relative.split('/');
    let (Some(rtype), Some(id)) = (parts.next(), parts.next()) else { return Parsed::Refused };
    let version = match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => None,
        (Some("_history"), Some(v), None) if !v.starts_with('0') && v.bytes().all(|b| b.is_ascii_digit()) => {
            match v.parse::<i64>() {
                Ok(v) => Some(v),
                Err(_) => return Parsed::Refused,
            }
        }
        _ => return Parsed::Refused,
    };
    let allowed = match declared {
        Some(targets) => targets.contains(&rtype),
        None => decl::decl(rtype).is_some(),
    };
    match Uuid::parse_str(id) {
        Ok(uuid) if allowed => Parsed::Local(rtype, uuid.to_string(), version),
        _ => Parsed::Refused,
    }
}

/// Whether an object is a FHIR `Reference` with a `reference`: only the elements a Reference has, and not a
/// resource (`DetectedIssue.reference` is a uri of the resource itself; `Expression` has `language`).
fn is_reference(o: &serde_json::Map<String, Value>) -> bool {
    o.get("reference").is_some_and(Value::is_string) && o.keys().all(|k| REFERENCE_KEYS.contains(&k.as_str()))
}

/// Every (dotted path, reference) in `v`, arrays flattened (no indices in the path), contained resources
/// included (their paths start with `contained.`). `owner` is the type of the resource being walked (the
/// written one, or a contained one) and where its path starts.
fn collect<'a>(v: &'a Value, path: &mut String, owner: (&'a str, usize), out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::Array(a) => {
            for item in a {
                collect(item, path, owner, out);
            }
        }
        Value::Object(o) => {
            let owner = match o.get("resourceType") {
                Some(Value::String(t)) => (t.as_str(), path.len()),
                _ => owner,
            };
            let within = path[owner.1..].trim_start_matches('.');
            if is_reference(o)
                && !NOT_REFERENCES.contains(&(owner.0, within))
                && let Some(Value::String(r)) = o.get("reference")
            {
                out.push((path.clone(), r.as_str()));
            }
            for (key, child) in o {
                if !(child.is_object() || child.is_array()) {
                    continue;
                }
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                collect(child, path, owner, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// The patient whose compartment the written resource is in: its own id (Patient), the Patient its link element
/// references, or, when the link element is not readable here (an update keeps a link the caller may not see
/// as its stored ciphertext), the compartment stored for the resource. `None` for a type outside compartments.
fn own_patient(conn: &mut AnyConnection, d: &ResourceDecl, resource: &Value) -> AppResult<Option<String>> {
    let id = resource.get("id").and_then(Value::as_str);
    match d.patient_link {
        PatientLink::None => Ok(None),
        PatientLink::Itself => Ok(id.and_then(|id| Uuid::parse_str(id).ok()).map(|u| u.to_string())),
        PatientLink::Element(e) => {
            let required = || AppError::invalid(format!("{}.{e}", d.name), NO_PATIENT);
            match resource.get(e) {
                Some(Value::String(_)) => {
                    let id = id.ok_or_else(required)?;
                    let stored = store::current(conn, d.name, id, &ScopeFilter::All)?;
                    Ok(stored.and_then(|row| row.patient_id))
                }
                link => crate::fhir::patient_of_reference(link).map(Some).ok_or_else(required),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const U: &str = "8f1c6e3a-4f6b-4a51-9d8e-0c9a3f1b2d7e";
    const BASE: &str = "https://carevault.example/fhir";

    fn obs() -> &'static ResourceDecl {
        decl::decl("Observation").unwrap()
    }

    fn local(p: Parsed<'_>) -> Option<(String, String, Option<i64>)> {
        match p {
            Parsed::Local(t, id, v) => Some((t.to_owned(), id, v)),
            _ => None,
        }
    }

    #[test]
    fn references_are_found_on_every_path_but_not_uris_or_resources() {
        let r = |s: &str| json!({ "reference": s, "display": "x" });
        let body = json!({
            "resourceType": "Observation", "subject": r("Patient/1"), "basedOn": [r("ServiceRequest/2")],
            "extension": [{"url": "urn:x", "valueReference": r("Encounter/3")}],
            "_status": {"extension": [{"url": "urn:y", "valueReference": r("Practitioner/4")}]},
            "contained": [{"resourceType": "DetectedIssue", "reference": "https://x/y",
                            "patient": r("Patient/5")}],
            "code": {"text": "no reference here"},
            "note": [{"authorReference": {"reference": "Practitioner/6", "unknownKey": 1}}]
        });
        let mut out = Vec::new();
        collect(&body, &mut String::new(), ("Observation", 0), &mut out);
        out.sort();
        assert_eq!(
            out,
            vec![
                ("_status.extension.valueReference".to_owned(), "Practitioner/4"),
                ("basedOn".to_owned(), "ServiceRequest/2"),
                ("contained.patient".to_owned(), "Patient/5"),
                ("extension.valueReference".to_owned(), "Encounter/3"),
                ("subject".to_owned(), "Patient/1"),
            ]
        );
        // Immunization.education.reference is a uri, written or contained; the same shape elsewhere is not.
        let education = json!([{"reference": "https://x/leaflet"}]);
        let imm = json!({"resourceType": "Immunization", "education": education,
                         "contained": [{"resourceType": "Immunization", "education": education}]});
        let mut out = Vec::new();
        collect(&imm, &mut String::new(), ("Immunization", 0), &mut out);
        assert!(out.is_empty(), "{out:?}");
        let other = json!({"resourceType": "CarePlan", "education": education});
        let mut out = Vec::new();
        collect(&other, &mut String::new(), ("CarePlan", 0), &mut out);
        assert_eq!(out, vec![("education".to_owned(), "https://x/leaflet")]);
    }

    #[test]
    fn what_a_reference_names() {
        let p = |path: &str, r: &str| local(parse(obs(), path, r, BASE));
        assert_eq!(p("subject", &format!("Patient/{U}")), Some(("Patient".into(), U.into(), None)));
        let upper = format!("Encounter/{}", U.to_uppercase());
        assert_eq!(p("encounter", &upper), Some(("Encounter".into(), U.into(), None)));
        assert_eq!(p("encounter", &format!("Encounter/{U}/_history/3")), Some(("Encounter".into(), U.into(), Some(3))));
        // Undeclared paths: any served type, relative or under this server's base.
        assert_eq!(p("basedOn", &format!("Organization/{U}")), Some(("Organization".into(), U.into(), None)));
        assert_eq!(p("focus", &format!("{BASE}/Condition/{U}")), Some(("Condition".into(), U.into(), None)));
        for refused in [
            format!("Practitioner/{U}"),
            format!("{BASE}/Encounter/{U}"),
            format!("https://elsewhere.example/fhir/Encounter/{U}"),
            format!("urn:uuid:{U}"),
            "Encounter?identifier=x|1".into(),
            "Encounter/example".into(),
            format!("Encounter/{U}/_history/0"),
            format!("Encounter/{U}/_history/x"),
            format!("Encounter/{U}/extra"),
            format!("Encounter/{U}/_history/1/more"),
            format!("Encounter{U}"),
            String::new(),
        ] {
            assert!(matches!(parse(obs(), "encounter", &refused, BASE), Parsed::Refused), "{refused}");
        }
        for refused in [
            format!("urn:uuid:{U}"),
            "urn:oid:1.2.3".to_owned(),
            format!("ImplementationGuide/{U}"),
            "Patient?name=x".into(),
        ] {
            assert!(matches!(parse(obs(), "basedOn", &refused, BASE), Parsed::Refused), "{refused}");
        }
        for elsewhere in [format!("https://elsewhere.example/fhir/Patient/{U}"), "#contained-1".into()] {
            assert!(matches!(parse(obs(), "basedOn", &elsewhere, BASE), Parsed::Elsewhere), "{elsewhere}");
        }
        assert!(matches!(parse(obs(), "encounter", "#c", BASE), Parsed::Elsewhere));
    }
}
