//! The CapabilityStatement served at `GET /fhir/metadata`, generated from the resource declarations so it
//! lists exactly what the server implements: each type, its interactions and search parameters, and the two
//! Patient operations.

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::decl::{ResourceDecl, all};

/// Interactions of every type clients may write.
const WRITABLE: &[&str] = &["read", "vread", "update", "patch", "delete", "history-instance", "create", "search-type"];
/// Interactions of a server-written type.
const READ_ONLY: &[&str] = &["read", "search-type"];

/// The CapabilityStatement of this server. `base_url` is the FHIR base (e.g. `https://host/fhir`).
pub fn capability_statement(base_url: &str, now: OffsetDateTime) -> Value {
    let date = now.format(&Rfc3339).unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned());
    let server = base_url.strip_suffix("/fhir").unwrap_or(base_url);
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "carevault",
        "kind": "instance",
        "software": { "name": "carevault", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "carevault FHIR R4 patient-records API", "url": base_url },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "Search results are paged with _count (default 20, at most 100) and an opaque \
                next link; _summary=count and _elements are supported; several values of a parameter (a,b) \
                are OR-ed, repeated parameters AND-ed; string search matches whole words and whole values, \
                case- and accent-insensitively; an unknown parameter is an error unless \
                Prefer: handling=lenient.",
            "security": {
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [
                        { "url": "authorize", "valueUri": format!("{server}/auth/authorize") },
                        { "url": "token", "valueUri": format!("{server}/auth/token") },
                        { "url": "introspect", "valueUri": format!("{server}/auth/introspect") },
                        { "url": "revoke", "valueUri": format!("{server}/auth/revoke") }
                    ]
                }],
                "service": [{ "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR"
                }]}],
                "description": "Bearer tokens; access is limited by role, care relationship and field policy."
            },
            "resource": all().iter().map(|d| resource(d, base_url)).collect::<Vec<_>>(),
            "interaction": [{ "code": "transaction" }, { "code": "batch" }]
        }]
    })
}

fn resource(d: &ResourceDecl, base_url: &str) -> Value {
    let interactions = if d.read_only { READ_ONLY } else { WRITABLE };
    let mut r = json!({
        "type": d.name,
        "interaction": interactions.iter().map(|c| json!({ "code": c })).collect::<Vec<_>>(),
        "versioning": if d.read_only { "no-version" } else { "versioned-update" },
        "readHistory": !d.read_only,
        "updateCreate": false,
        "conditionalCreate": !d.read_only,
        "conditionalUpdate": !d.read_only,
        "conditionalDelete": if d.read_only { "not-supported" } else { "single" },
        "searchParam": d.search.iter().map(|p| json!({ "name": p.name, "type": p.kind.code() })).collect::<Vec<_>>()
    });
    let validate =
        json!({ "name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate" });
    if d.name == "Patient" {
        r["operation"] = json!([
            { "name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything" },
            { "name": "access-report", "definition": format!("{base_url}/OperationDefinition/Patient-access-report") },
            validate
        ]);
    } else if !d.read_only {
        r["operation"] = json!([validate]);
    }
    r
}
