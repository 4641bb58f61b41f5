//! Which top-level elements each resource type has, so `fields.toml` can be validated against them, and which are
//! mandatory (kept under `_elements`, as FHIR asks).
//!
//! The FHIR declarations (the `fhir` module) are the authority for elements; they plug in through
//! [`ElementCatalog`]. [`R4Catalog`] is the R4 list of the nine types served, taken from the official
//! `fhir.schema.json`, for the CLI and tests.

/// The resource types the policy may name (CONTRACT §5).
pub const RESOURCE_TYPES: [&str; 9] = [
    "Patient",
    "Practitioner",
    "CareTeam",
    "Encounter",
    "Observation",
    "Condition",
    "AllergyIntolerance",
    "MedicationRequest",
    "AuditEvent",
];

/// Knows the top-level elements of each resource type.
pub trait ElementCatalog: Send + Sync {
    /// The top-level element names of `resource_type` as its R4 StructureDefinition names them (choice elements
    /// as `value[x]`, without `resourceType`), or `None` for a type the catalog does not know.
    fn elements(&self, resource_type: &str) -> Option<Vec<String>>;

    /// Top-level elements with minimum cardinality 1: kept by `_elements` even when not asked for.
    fn mandatory(&self, resource_type: &str) -> Vec<String> {
        r4_mandatory(resource_type)
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    }
}

impl<F> ElementCatalog for F
where
    F: Fn(&str) -> Option<Vec<String>> + Send + Sync,
{
    fn elements(&self, resource_type: &str) -> Option<Vec<String>> {
        self(resource_type)
    }
}

/// The R4 top-level elements of the nine served types.
#[derive(Debug, Clone, Copy, Default)]
pub struct R4Catalog;

impl ElementCatalog for R4Catalog {
    fn elements(&self, resource_type: &str) -> Option<Vec<String>> {
        R4_ELEMENTS
            .iter()
            .find(|(t, _)| *t == resource_type)
            .map(|(_, els)| els.iter().map(|s| (*s).to_owned()).collect())
    }
}

/// R4 top-level elements with `min = 1`.
pub fn r4_mandatory(resource_type: &str) -> &'static [&'static str] {
    match resource_type {
        "Encounter" => &["status", "class"],
        "Observation" => &["status", "code"],
        "Condition" => &["subject"],
        "AllergyIntolerance" => &["patient"],
        "MedicationRequest" => &["status", "intent", "medication[x]", "subject"],
        "AuditEvent" => &["type", "recorded", "agent", "source"],
        _ => &[],
    }
}

const R4_ELEMENTS: &[(&str, &[&str])] = &[
    (
        "Patient",
        &[
            "id",
            "meta",
            "implicitRules",
            "language",
            "text",
            "contained",
            "extension",
            "modifierExtension",
            "identifier",
            "active",
            "name",
            "telecom",
            "gender",
            "birthDate",
            "deceased[x]",
            "address",
            "maritalStatus",
            "multipleBirth[x]",
            "photo",
            "contact",
            "communication",
            "generalPractitioner",
            "managingOrganization",
            "link",
        ],
    ),
    (
        "Practitioner",
        &[
            "id",
            "meta",
            "implicitRules",
            "language",
            "text",
            "contained",
            "extension",
            "modifierExtension",
            "identifier",
            "active",
            "name",
            "telecom",
            "address",
            "gender",
            "birthDate",
            "photo",
            "qualification",
            "communication",
        ],
    ),
    (
        "CareTeam",
        &[
            "id",
            "meta",
            "implicitRules",
            "language",
            "text",
            "contained",
            "extension",
            "modifierExtension",
            "identifier",
            "status",
            "category",
            "name",
            "subject",
            "encounter",
            "period",
            "participant",
            "reasonCode",
            "reasonReference",
            "managingOrganization",
            "telecom",
            "note",
        ],
    ),
    (
        "Encounter",
        &[
            "id",
            "meta",
            "implicitRules",
            "language",
            "text",
            "contained",
            "extension",
            "modifierExtension",
            "identifier",
            "status",
            "statusHistory",
            "class",
            "classHistory",
            "type",
            "serviceType",
            "priority",
            "subject",
            "episodeOfCare",
            "basedOn",
            "participant",
            "appointment",
            "period",
            "length",
            "reasonCode",
            "reasonReference",
            "diagnosis",
            "account",
            "hospitalization",
            "location",
            "serviceProvider",
            "partOf",
        ],
    ),
    (
        "Observation",
        &[
            "id",
            "meta",
            "implicitRules",
            "language",
            "text",
            "contained",
            "extension",
            "modifierExtension",
            "identifier",
            "basedOn",
            "partOf",
            "status",
            "category",
            "code",
            "subject",
            "focus",
            "encounter",
            "effective[x]",
            "issued",
            "performer",
            "value[x]",
            "dataAbsentReason",
            "interpretation",
            "note",
            "bodySite",
            "method",
            "specimen",
            "device",
            "referenceRange",
            "hasMember",
            "derivedFrom",
            "component",
        ],
    ),
    (
        "Condition",
        &[
            "id",
            "meta",
            "implicitRules",
            "language",
            "text",
            "contained",
            "extension",
            "modifierExtension",
            "identifier",
            "clinicalStatus",
            "verificationStatus",
            "category",
            "severity",
            "code",
            "bodySite",
            "subject",
            "encounter",
            "onset[x]",
            "abatement[x]",
            "recordedDate",
            "recorder",
            "asserter",
            "stage",
            "evidence",
            "note",
        ],
    ),
    (
        "AllergyIntolerance",
        &[
            "id",
            "meta",
            "implicitRules",
            "language",
            "text",
            "contained",
            "extension",
            "modifierExtension",
            "identifier",
            "clinicalStatus",
            "verificationStatus",
            "type",
            "category",
            "criticality",
            "code",
            "patient",
            "encounter",
            "onset[x]",
            "recordedDate",
            "recorder",
            "asserter",
            "lastOccurrence",
            "note",
            "reaction",
        ],
    ),
    (
        "MedicationRequest",
        &[
            "id",
            "meta",
            "implicitRules",
            "language",
            "text",
            "contained",
            "extension",
            "modifierExtension",
            "identifier",
            "status",
            "statusReason",
            "intent",
            "category",
            "priority",
            "doNotPerform",
            "reported[x]",
            "medication[x]",
            "subject",
            "encounter",
            "supportingInformation",
            "authoredOn",
            "requester",
            "performer",
            "performerType",
            "recorder",
            "reasonCode",
            "reasonReference",
            "instantiatesCanonical",
            "instantiatesUri",
            "basedOn",
            "groupIdentifier",
            "courseOfTherapyType",
            "insurance",
            "note",
            "dosageInstruction",
            "dispenseRequest",
            "substitution",
            "priorPrescription",
            "detectedIssue",
            "eventHistory",
        ],
    ),
    (
        "AuditEvent",
        &[
            "id",
            "meta",
            "implicitRules",
            "language",
            "text",
            "contained",
            "extension",
            "modifierExtension",
            "type",
            "subtype",
            "action",
            "period",
            "recorded",
            "outcome",
            "outcomeDesc",
            "purposeOfEvent",
            "agent",
            "source",
            "entity",
        ],
    ),
];
