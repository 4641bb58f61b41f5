//! The FHIR R4 form of an audit record: an `AuditEvent` following the IHE Basic Audit Log Patterns (BALP).
//!
//! - REST kinds: type `rest` (audit-event-type), subtype the FHIR restful interaction (`read`, `vread`,
//!   `search-type`, `history-instance`, `create`, `update`, `delete`, `operation`).
//! - Security kinds: DICOM event ids: `110114` User Authentication (login, login failure, logout, refresh),
//!   `110113` Security Alert (break-glass with subtype `110127` Emergency Override Started, admin, alert),
//!   `110106` Export.
//! - Every event also carries our own kind (and detail code, when present) as extra `subtype` codings.
//! - Agents: the user (type `IRCP`, `requestor`, role, purpose of use), the client application (`110153` Source
//!   Role ID, with the network address), and this server (`110152` Destination Role ID).
//! - Entities: the patient (`Patient/{id}`, type 1 Person, role 1 Patient); the resource (type 2, role 4
//!   Domain Resource, versioned reference when known); for searches a query entity (role 24 Query) whose
//!   `detail` holds the resource type and the parameter **names** (`param-names`, comma-separated). The
//!   query string itself (`entity.query`) is never filled in, since it would hold values.
//! - The account an administrative action changed (the event's `target`): an entity of type 2 System Object,
//!   role 6 User, `what` the account identifier (`sid/account`, display the username) or, for an app, the client
//!   identifier (`sid/client`); `detail` `role` (the role affected) and `client-id`.
//!
//! The output holds exactly what the record holds (ids, codes, names), so it holds no PHI payload either.

use super::event::{AuditEvent, AuditKind, normalize_time};
use serde_json::{Map, Value, json};
use time::format_description::well_known::Rfc3339;

/// Base of the identifier and code systems this server defines.
pub const SYSTEM_BASE: &str = "https://carevault.example.org/fhir";

pub const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
const AUDIT_EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
const RESTFUL_INTERACTION: &str = "http://hl7.org/fhir/restful-interaction";
const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const PARTICIPATION_TYPE: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
const SOURCE_TYPE: &str = "http://terminology.hl7.org/CodeSystem/security-source-type";

/// Our code systems and identifier systems.
pub fn system(name: &str) -> String {
    format!("{SYSTEM_BASE}/{name}")
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({ "system": system, "code": code, "display": display })
}

fn own_coding(system_name: &str, code: &str) -> Value {
    json!({ "system": system(system_name), "code": code })
}

/// `(type, standard subtype)` of a kind.
fn type_codes(kind: AuditKind) -> (Value, Option<Value>) {
    let rest = || coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation");
    let interaction = |code: &str, display: &str| Some(coding(RESTFUL_INTERACTION, code, display));
    let auth = || coding(DCM, "110114", "User Authentication");
    let alert = || coding(DCM, "110113", "Security Alert");
    match kind {
        AuditKind::Read => (rest(), interaction("read", "read")),
        AuditKind::Vread => (rest(), interaction("vread", "vread")),
        AuditKind::Search => (rest(), interaction("search-type", "search type")),
        AuditKind::History => (rest(), interaction("history-instance", "history instance")),
        AuditKind::Create => (rest(), interaction("create", "create")),
        AuditKind::Update => (rest(), interaction("update", "update")),
        AuditKind::Delete => (rest(), interaction("delete", "delete")),
        AuditKind::Patch => (rest(), interaction("patch", "patch")),
        AuditKind::Transaction => (rest(), interaction("transaction", "transaction")),
        AuditKind::Batch => (rest(), interaction("batch", "batch")),
        AuditKind::Everything | AuditKind::AccessReport | AuditKind::Validate => {
            (rest(), interaction("operation", "operation"))
        }
        AuditKind::Login | AuditKind::LoginFailure => (auth(), Some(coding(DCM, "110122", "Login"))),
        AuditKind::Logout => (auth(), Some(coding(DCM, "110123", "Logout"))),
        AuditKind::Refresh => (auth(), None),
        AuditKind::BreakGlass => (alert(), Some(coding(DCM, "110127", "Emergency Override Started"))),
        AuditKind::Admin | AuditKind::Alert => (alert(), None),
        AuditKind::Export => (coding(DCM, "110106", "Export"), None),
    }
}

/// The FHIR R4 `AuditEvent` for `event`, as observed by the server named `server_id` (e.g. its host name).
pub fn to_fhir(event: &AuditEvent, server_id: &str) -> Value {
    let (event_type, subtype) = type_codes(event.kind);
    let mut subtypes: Vec<Value> = subtype.into_iter().collect();
    subtypes.push(own_coding("CodeSystem/audit-kind", event.kind.as_str()));
    if let Some(detail) = &event.detail {
        subtypes.push(own_coding("CodeSystem/audit-detail", detail));
    }
    let purpose: Option<Value> =
        event.purpose_of_use.as_ref().map(|p| json!([{ "coding": [{ "system": ACT_REASON, "code": p }] }]));

    let mut out = Map::new();
    out.insert("resourceType".into(), json!("AuditEvent"));
    out.insert("id".into(), json!(event.id.to_string()));
    out.insert("type".into(), event_type);
    out.insert("subtype".into(), Value::Array(subtypes));
    out.insert("action".into(), json!(event.action.as_str()));
    out.insert("recorded".into(), json!(instant(event)));
    out.insert("outcome".into(), json!(event.outcome.code()));
    if let Some(p) = &purpose {
        out.insert("purposeOfEvent".into(), p.clone());
    }
    out.insert("agent".into(), Value::Array(agents(event, server_id, purpose)));
    out.insert(
        "source".into(),
        json!({
            "site": server_id,
            "observer": { "display": server_id },
            "type": [coding(SOURCE_TYPE, "4", "Application Server")],
        }),
    );
    let entities = entities(event);
    if !entities.is_empty() {
        out.insert("entity".into(), Value::Array(entities));
    }
    Value::Object(out)
}

/// `recorded` as a FHIR instant (UTC, microseconds).
pub fn instant(event: &AuditEvent) -> String {
    normalize_time(event.recorded).format(&Rfc3339).unwrap_or_default()
}

fn agents(event: &AuditEvent, server_id: &str, purpose: Option<Value>) -> Vec<Value> {
    let a = &event.agent;
    let network = a.address.as_ref().map(|ip| json!({ "address": ip, "type": "2" }));
    let mut agents = Vec::new();
    let has_user = a.user.is_some() || a.username.is_some() || a.role.is_some() || a.client_id.is_none();
    if has_user {
        let mut user = Map::new();
        user.insert("type".into(), json!({ "coding": [coding(PARTICIPATION_TYPE, "IRCP", "information recipient")] }));
        if let Some(role) = a.role {
            user.insert("role".into(), json!([{ "coding": [own_coding("CodeSystem/role", role.as_str())] }]));
        }
        let mut who = Map::new();
        if let Some(id) = &a.user {
            who.insert("identifier".into(), json!({ "system": system("sid/account"), "value": id }));
        }
        if let Some(name) = &a.username {
            who.insert("display".into(), json!(name));
        }
        if !who.is_empty() {
            user.insert("who".into(), Value::Object(who));
        }
        user.insert("requestor".into(), json!(true));
        if let (Some(n), None) = (&network, &a.client_id) {
            user.insert("network".into(), n.clone());
        }
        if let Some(p) = purpose.clone() {
            user.insert("purposeOfUse".into(), p);
        }
        agents.push(Value::Object(user));
    }
    if let Some(client) = &a.client_id {
        let mut c = Map::new();
        c.insert("type".into(), json!({ "coding": [coding(DCM, "110153", "Source Role ID")] }));
        c.insert("who".into(), json!({ "identifier": { "system": system("sid/client"), "value": client } }));
        c.insert("requestor".into(), json!(!has_user));
        if let Some(n) = network {
            c.insert("network".into(), n);
        }
        if let (Some(p), false) = (purpose, has_user) {
            c.insert("purposeOfUse".into(), p);
        }
        agents.push(Value::Object(c));
    }
    agents.push(json!({
        "type": { "coding": [coding(DCM, "110152", "Destination Role ID")] },
        "who": { "identifier": { "system": system("sid/server"), "value": server_id } },
        "requestor": false,
    }));
    agents
}

fn entities(event: &AuditEvent) -> Vec<Value> {
    let mut entities = Vec::new();
    for patient in event.disclosed() {
        entities.push(json!({
            "what": { "reference": format!("Patient/{patient}") },
            "type": coding(ENTITY_TYPE, "1", "Person"),
            "role": coding(OBJECT_ROLE, "1", "Patient"),
        }));
    }
    let type_detail = event.resource_type.as_ref().map(|t| json!({ "type": "resource-type", "valueString": t }));
    if event.kind == AuditKind::Search {
        let mut detail: Vec<Value> = type_detail.into_iter().collect();
        if !event.query_params.is_empty() {
            let mut names = event.query_params.clone();
            names.sort();
            names.dedup();
            detail.push(json!({ "type": "param-names", "valueString": names.join(",") }));
        }
        let mut q = Map::new();
        q.insert("type".into(), coding(ENTITY_TYPE, "2", "System Object"));
        q.insert("role".into(), coding(OBJECT_ROLE, "24", "Query"));
        if !detail.is_empty() {
            q.insert("detail".into(), Value::Array(detail));
        }
        entities.push(Value::Object(q));
    } else if let Some(t) = &event.resource_type {
        let mut r = Map::new();
        if let Some(id) = event.resource_id {
            let reference = match event.resource_version {
                Some(v) => format!("{t}/{id}/_history/{v}"),
                None => format!("{t}/{id}"),
            };
            r.insert("what".into(), json!({ "reference": reference }));
        }
        r.insert("type".into(), coding(ENTITY_TYPE, "2", "System Object"));
        r.insert("role".into(), coding(OBJECT_ROLE, "4", "Domain Resource"));
        if let Some(d) = type_detail {
            r.insert("detail".into(), json!([d]));
        }
        entities.push(Value::Object(r));
    }
    if let Some(t) = &event.target {
        let mut what = Map::new();
        match (&t.account, &t.client_id) {
            (Some(id), _) => what.insert("identifier".into(), json!({ "system": system("sid/account"), "value": id })),
            (None, Some(c)) => what.insert("identifier".into(), json!({ "system": system("sid/client"), "value": c })),
            (None, None) => None,
        };
        if let Some(name) = &t.username {
            what.insert("display".into(), json!(name));
        }
        let mut detail = Vec::new();
        if let Some(role) = t.role {
            detail.push(json!({ "type": "role", "valueString": role.as_str() }));
        }
        if let Some(c) = &t.client_id {
            detail.push(json!({ "type": "client-id", "valueString": c }));
        }
        let mut e = Map::new();
        if !what.is_empty() {
            e.insert("what".into(), Value::Object(what));
        }
        e.insert("type".into(), coding(ENTITY_TYPE, "2", "System Object"));
        e.insert("role".into(), coding(OBJECT_ROLE, "6", "User"));
        if !detail.is_empty() {
            e.insert("detail".into(), Value::Array(detail));
        }
        entities.push(Value::Object(e));
    }
    entities
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::audit::event::{Action, Agent, Outcome, purpose};
    use crate::role::Role;
    use std::sync::OnceLock;
    use time::macros::datetime;
    use uuid::Uuid;

    /// The official FHIR R4 JSON schema, compiled once.
    fn validator() -> &'static jsonschema::Validator {
        static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
        VALIDATOR.get_or_init(|| {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fhir.schema.json");
            let schema: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            jsonschema::validator_for(&schema).unwrap()
        })
    }

    /// The schema narrowed to one resource type, whose errors say what is wrong (the root `oneOf` does not).
    fn explain(resource: &Value) -> Vec<String> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fhir.schema.json");
        let mut schema: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let target = format!("#/definitions/{}", resource["resourceType"].as_str().unwrap_or("Resource"));
        let schema = json!({ "$schema": schema["$schema"].clone(), "definitions": schema["definitions"].take(), "allOf": [{ "$ref": target }] });
        let v = jsonschema::validator_for(&schema).unwrap();
        v.iter_errors(resource)
            .map(|e| format!("{} (schema {}): {:.300}", e.instance_path(), e.schema_path(), e.to_string()))
            .collect()
    }

    pub(crate) fn assert_valid_fhir(resource: &Value) {
        assert!(
            validator().is_valid(resource),
            "invalid FHIR: {:?}
{resource:#}",
            explain(resource)
        );
    }

    pub(crate) const CANARY_VALUE: &str = "Canary-Smith-1970";

    /// One event of every kind, with every optional field exercised somewhere.
    pub(crate) fn every_kind() -> Vec<AuditEvent> {
        let at = datetime!(2026-02-03 04:05:06.789 UTC);
        let patient = Uuid::from_u128(0x1234);
        AuditKind::ALL
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let agent = match i % 3 {
                    0 => Agent::user("acct-1", Some("nurse.joy".into()), Some(Role::Nurse))
                        .with_address("2001:db8::1".parse().unwrap()),
                    1 => Agent::client("billing-service").with_address("10.0.0.9".parse().unwrap()),
                    _ => Agent::default(),
                };
                let mut e = AuditEvent::new(kind, at, Outcome::Success, agent);
                if kind.is_rest() || kind == AuditKind::BreakGlass {
                    e = e.with_patient(patient).with_purpose(purpose::TREAT);
                }
                match kind {
                    AuditKind::Search => {
                        // The request was `?family=Canary-Smith-1970&Canary-Smith-1970=x`: only names reach the event.
                        e = e
                            .with_resource("Patient", None, None)
                            .with_query_params(["family", CANARY_VALUE, "birthdate"], |n| n != CANARY_VALUE)
                    }
                    AuditKind::Read | AuditKind::Update | AuditKind::Delete => {
                        e = e.with_resource("Observation", Some(Uuid::from_u128(0x99)), None)
                    }
                    AuditKind::Vread | AuditKind::Create => {
                        e = e.with_resource("Observation", Some(Uuid::from_u128(0x99)), Some(3))
                    }
                    AuditKind::History => e = e.with_resource("Condition", Some(Uuid::from_u128(0x98)), None),
                    AuditKind::LoginFailure => {
                        e.outcome = Outcome::MinorFailure;
                        e = e.with_detail("invalid-credentials")
                    }
                    AuditKind::BreakGlass => e = e.with_purpose(purpose::BTG),
                    AuditKind::Admin => {
                        e = e.with_action(Action::C).with_detail("user-created").with_target(
                            crate::audit::Target::account("acct-2", "front.desk", Some(Role::FrontDesk))
                                .with_client("app-1"),
                        )
                    }
                    AuditKind::Alert => e = e.with_detail("bulk-access"),
                    _ => {}
                }
                e
            })
            .collect()
    }

    #[test]
    fn every_kind_is_a_valid_fhir_audit_event_without_canaries() {
        for e in every_kind() {
            let r = to_fhir(&e, "carevault-1");
            assert_valid_fhir(&r);
            let text = r.to_string();
            assert!(!text.contains("Canary"), "{text}");
            assert_eq!(r["id"], json!(e.id.to_string()));
            assert_eq!(r["recorded"], json!("2026-02-03T04:05:06.789Z"));
            assert_eq!(
                r["agent"].as_array().unwrap().last().unwrap()["who"]["identifier"]["value"],
                json!("carevault-1")
            );
            assert_eq!(
                r["subtype"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|c| c == &&own_coding("CodeSystem/audit-kind", e.kind.as_str()))
                    .count(),
                1
            );
        }
    }

    #[test]
    fn a_search_records_parameter_names_only() {
        let e = every_kind().into_iter().find(|e| e.kind == AuditKind::Search).unwrap();
        let r = to_fhir(&e, "s");
        assert_eq!(r["type"]["code"], json!("rest"));
        assert_eq!(r["subtype"][0]["code"], json!("search-type"));
        assert_eq!(r["action"], json!("E"));
        let query = r["entity"].as_array().unwrap().iter().find(|x| x["role"]["code"] == json!("24")).unwrap();
        assert_eq!(
            query["detail"][1],
            json!({ "type": "param-names", "valueString": "(unrecognised),birthdate,family" })
        );
        assert!(query.get("query").is_none());
        assert_eq!(r["entity"][0]["what"]["reference"], json!("Patient/00000000-0000-0000-0000-000000001234"));
    }

    #[test]
    fn the_balp_shape_of_a_read_and_a_break_glass() {
        let events = every_kind();
        let read = to_fhir(events.iter().find(|e| e.kind == AuditKind::Read).unwrap(), "s");
        assert_eq!(read["subtype"][0], json!({ "system": RESTFUL_INTERACTION, "code": "read", "display": "read" }));
        assert_eq!(read["action"], json!("R"));
        assert_eq!(read["outcome"], json!("0"));
        let user = &read["agent"][0];
        assert_eq!(user["requestor"], json!(true));
        assert_eq!(user["role"][0]["coding"][0]["code"], json!("nurse"));
        assert_eq!(user["network"], json!({ "address": "2001:db8::1", "type": "2" }));
        assert_eq!(user["purposeOfUse"][0]["coding"][0]["code"], json!("TREAT"));
        assert_eq!(read["entity"][1]["what"]["reference"], json!("Observation/00000000-0000-0000-0000-000000000099"));
        assert_eq!(read["entity"][1]["role"]["code"], json!("4"));

        let btg = to_fhir(events.iter().find(|e| e.kind == AuditKind::BreakGlass).unwrap(), "s");
        assert_eq!(btg["type"]["code"], json!("110113"));
        assert_eq!(btg["subtype"][0]["code"], json!("110127"));
        assert_eq!(btg["purposeOfEvent"][0]["coding"][0], json!({ "system": ACT_REASON, "code": "BTG" }));

        let failure = to_fhir(events.iter().find(|e| e.kind == AuditKind::LoginFailure).unwrap(), "s");
        assert_eq!(failure["type"]["code"], json!("110114"));
        assert_eq!(failure["outcome"], json!("4"));
    }

    #[test]
    fn an_admin_event_names_the_account_it_changed_and_the_role() {
        let e = every_kind().into_iter().find(|e| e.kind == AuditKind::Admin).unwrap();
        let r = to_fhir(&e, "cv-test");
        assert_valid_fhir(&r);
        let user = r["entity"].as_array().unwrap().iter().find(|x| x["role"]["code"] == json!("6")).unwrap();
        assert_eq!(user["what"]["identifier"]["value"], json!("acct-2"));
        assert_eq!(user["what"]["display"], json!("front.desk"));
        assert_eq!(user["detail"][0], json!({ "type": "role", "valueString": "front_desk" }));
        assert_eq!(user["detail"][1], json!({ "type": "client-id", "valueString": "app-1" }));
    }

    #[test]
    fn a_service_client_is_the_requestor_when_there_is_no_user() {
        let e = AuditEvent::new(
            AuditKind::Read,
            datetime!(2026-01-01 00:00 UTC),
            Outcome::Success,
            Agent::client("svc").with_address("10.1.2.3".parse().unwrap()),
        );
        let r = to_fhir(&e, "s");
        let agents = r["agent"].as_array().unwrap();
        assert_eq!(agents.len(), 2);
        assert_eq!(agents[0]["requestor"], json!(true));
        assert_eq!(agents[0]["network"]["address"], json!("10.1.2.3"));
        assert_valid_fhir(&r);
    }

    #[test]
    fn the_validator_rejects_a_broken_audit_event() {
        // Guards the schema check itself: an unknown outcome code, or a missing agent, must fail.
        let mut r = to_fhir(&every_kind()[0], "s");
        assert!(validator().is_valid(&r));
        r.as_object_mut().unwrap().insert("outcome".into(), json!("5"));
        assert!(!validator().is_valid(&r));
        let mut r = to_fhir(&every_kind()[0], "s");
        r.as_object_mut().unwrap().remove("agent");
        assert!(!validator().is_valid(&r));
    }
}
