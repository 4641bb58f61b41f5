//! `Patient/{id}/$access-report`: who accessed a patient's record, when, how and why (CONTRACT §5).
//!
//! Shape: a FHIR `Parameters` resource (the usual result of an operation that returns data, not resources):
//!
//! ```text
//! parameter[0]  name "patient"  valueReference Patient/{id}
//! parameter[1]  name "count"    valueUnsignedInt  number of accesses listed
//! parameter[n]  name "access"   part:
//!     "when"         valueInstant   recorded time (UTC)
//!     "who"          valueString    the actor's display name ("unknown" when none is known)
//!     "role"         valueCoding    {SYSTEM_BASE}/CodeSystem/role, when known
//!     "interaction"  valueCoding    {SYSTEM_BASE}/CodeSystem/audit-kind (read, search, everything, break-glass …)
//!     "resource"     valueReference the resource touched, when there is one ({type}/{id})
//!     "why"          valueCoding    v3-ActReason purpose of use (TREAT, BTG …), when recorded
//!     "outcome"      valueCode      FHIR audit-event-outcome (0 success, 4 refused, 8/12 server failure)
//! ```
//!
//! Accesses are the events that name this patient (alone, or among the patients a search disclosed), oldest first. Addresses, client ids and account
//! ids are left out: the patient learns who and why, not the server's internals.

use super::event::AuditEvent;
use super::fhir::{ACT_REASON, instant, system};
use serde_json::{Value, json};
use uuid::Uuid;

/// Builds the access report for `patient` from `events` (any superset of its events; others are skipped).
/// `display` maps an agent's `user` (account id or subject) to a display name.
pub fn access_report(patient: Uuid, events: &[AuditEvent], display: &dyn Fn(&str) -> Option<String>) -> Value {
    let mut mine: Vec<&AuditEvent> = events.iter().filter(|e| e.disclosed().contains(&patient)).collect();
    mine.sort_by_key(|e| (e.recorded, e.id));
    let mut parameters = vec![
        json!({ "name": "patient", "valueReference": { "reference": format!("Patient/{patient}") } }),
        json!({ "name": "count", "valueUnsignedInt": mine.len() }),
    ];
    parameters.extend(mine.into_iter().map(|e| access(e, display)));
    json!({ "resourceType": "Parameters", "parameter": parameters })
}

fn access(e: &AuditEvent, display: &dyn Fn(&str) -> Option<String>) -> Value {
    let who = e
        .agent
        .user
        .as_deref()
        .and_then(display)
        .or_else(|| e.agent.username.clone())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    let mut part =
        vec![json!({ "name": "when", "valueInstant": instant(e) }), json!({ "name": "who", "valueString": who })];
    if let Some(role) = e.agent.role {
        part.push(
            json!({ "name": "role", "valueCoding": { "system": system("CodeSystem/role"), "code": role.as_str() } }),
        );
    }
    part.push(json!({
        "name": "interaction",
        "valueCoding": { "system": system("CodeSystem/audit-kind"), "code": e.kind.as_str() },
    }));
    if let (Some(t), Some(id)) = (&e.resource_type, e.resource_id) {
        part.push(json!({ "name": "resource", "valueReference": { "reference": format!("{t}/{id}") } }));
    }
    if let Some(why) = &e.purpose_of_use {
        part.push(json!({ "name": "why", "valueCoding": { "system": ACT_REASON, "code": why } }));
    }
    part.push(json!({ "name": "outcome", "valueCode": e.outcome.code() }));
    json!({ "name": "access", "part": part })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::{AuditKind, Outcome};
    use crate::audit::fhir::tests::{CANARY_VALUE, assert_valid_fhir, every_kind};
    use time::Duration;

    #[test]
    fn lists_who_when_how_and_why_for_this_patient_only() {
        let mut events = every_kind();
        // Reverse time order in the input; the report sorts oldest first.
        for (i, e) in events.iter_mut().enumerate() {
            e.recorded -= Duration::minutes(i as i64);
        }
        let other = AuditEvent::new(AuditKind::Read, events[0].recorded, Outcome::Success, events[0].agent.clone())
            .with_patient(Uuid::from_u128(0x5678));
        events.push(other);
        let patient = Uuid::from_u128(0x1234);
        let expected = events.iter().filter(|e| e.patient == Some(patient)).count();
        let display = |user: &str| (user == "acct-1").then(|| "Joy Nurse, RN".to_owned());

        let report = access_report(patient, &events, &display);
        assert_valid_fhir(&report);
        let text = report.to_string();
        assert!(!text.contains("Canary") && !text.contains(CANARY_VALUE));
        assert!(!text.contains("2001:db8") && !text.contains("00000000-0000-0000-0000-000000005678"));

        let params = report["parameter"].as_array().unwrap();
        assert_eq!(params[1]["valueUnsignedInt"], json!(expected));
        let accesses: Vec<&Value> = params.iter().filter(|p| p["name"] == json!("access")).collect();
        assert_eq!(accesses.len(), expected);
        let part =
            |a: &Value, name: &str| a["part"].as_array().unwrap().iter().find(|p| p["name"] == json!(name)).cloned();
        let whens: Vec<String> =
            accesses.iter().map(|a| part(a, "when").unwrap()["valueInstant"].as_str().unwrap().to_owned()).collect();
        let mut sorted = whens.clone();
        sorted.sort();
        assert_eq!(whens, sorted);

        let read =
            accesses.iter().find(|a| part(a, "interaction").unwrap()["valueCoding"]["code"] == json!("read")).unwrap();
        assert_eq!(part(read, "who").unwrap()["valueString"], json!("Joy Nurse, RN"));
        assert_eq!(part(read, "role").unwrap()["valueCoding"]["code"], json!("nurse"));
        assert_eq!(part(read, "why").unwrap()["valueCoding"]["code"], json!("TREAT"));
        assert_eq!(
            part(read, "resource").unwrap()["valueReference"]["reference"],
            json!("Observation/00000000-0000-0000-0000-000000000099")
        );
        let btg = accesses
            .iter()
            .find(|a| part(a, "interaction").unwrap()["valueCoding"]["code"] == json!("break-glass"))
            .unwrap();
        assert_eq!(part(btg, "why").unwrap()["valueCoding"]["code"], json!("BTG"));
        // Agents without a known name are "unknown", never an account id.
        assert!(accesses.iter().any(|a| part(a, "who").unwrap()["valueString"] == json!("unknown")));
        assert!(!text.contains("acct-1"));
    }

    #[test]
    fn an_empty_report_is_valid() {
        let report = access_report(Uuid::from_u128(1), &[], &|_| None);
        assert_valid_fhir(&report);
        assert_eq!(report["parameter"].as_array().unwrap().len(), 2);
    }
}
