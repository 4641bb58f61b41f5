//! The one declaration of each resource type carevault serves: which top-level elements are PHI (encrypted
//! element by element) and which are plain, the search parameters with their kinds and paths, how the type
//! links to a patient (its compartment), and whether clients may write it.
//!
//! Guarantees (checked by tests against the official schema): `phi` and `plain` together list every
//! top-level element of the type, without overlap; an element not listed in `plain` is treated as PHI
//! ([`ResourceDecl::is_phi`] fails closed); every search parameter whose path starts in a PHI element is
//! blind-indexed (`phi: true`), except references (random resource ids, which identify no one).

/// The kind of a search parameter, as FHIR names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    String,
    Token,
    Date,
    Reference,
}

impl ParamKind {
    /// The FHIR `SearchParamType` code.
    pub fn code(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Token => "token",
            Self::Date => "date",
            Self::Reference => "reference",
        }
    }
}

/// One search parameter of one type.
#[derive(Debug, PartialEq, Eq)]
pub struct SearchParamDecl {
    pub name: &'static str,
    pub kind: ParamKind,
    /// Simple dotted paths into the resource (arrays flatten); a value found at any of them matches.
    pub paths: &'static [&'static str],
    /// True when the indexed values must be blind-indexed (keyed hashes), never stored in plaintext.
    pub phi: bool,
    /// For references: the resource types a value may point to (the first is the default for a bare id).
    pub targets: &'static [&'static str],
}

/// How a resource belongs to a patient's compartment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatientLink {
    /// The resource is the Patient.
    Itself,
    /// The top-level element holding the `Reference` to the Patient (e.g. `subject`, `patient`).
    Element(&'static str),
    /// Not in any patient's compartment (Practitioner, AuditEvent).
    None,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ResourceDecl {
    pub name: &'static str,
    /// Top-level elements that are PHI: each is encrypted on its own, bound to type, id and element name.
    pub phi: &'static [&'static str],
    /// Top-level elements stored in plaintext, each justified in `docs/plaintext-elements.md`.
    pub plain: &'static [&'static str],
    pub search: &'static [SearchParamDecl],
    pub patient_link: PatientLink,
    /// Reference elements (dotted paths) and the resource types they may point to, for integrity checks.
    pub references: &'static [(&'static str, &'static [&'static str])],
    /// Written by the server only: clients may read and search, never create, update or delete.
    pub read_only: bool,
    /// Elements of cardinality 1..1 that the JSON schema cannot require (primitives: the value or its `_x`
    /// extension sibling may carry them). Checked by the validator.
    pub required: &'static [&'static str],
}

impl ResourceDecl {
    /// Every top-level element of the type (PHI first, then plain).
    pub fn elements(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.phi.iter().chain(self.plain.iter()).copied()
    }

    /// Whether a top-level element (or its `_x` extension sibling) is PHI. Unknown names are PHI.
    pub fn is_phi(&self, element: &str) -> bool {
        let base = element.strip_prefix('_').unwrap_or(element);
        !self.plain.contains(&base)
    }

    /// The id of the Patient whose compartment this resource belongs to. Fails closed: a type linked to a
    /// patient must name one as a plain `Patient/{id}` reference (relative or absolute; not contained, not by
    /// identifier only). `None` for types outside any compartment, or a Patient without an id yet.
    pub fn patient_id(&self, resource: &serde_json::Value) -> crate::error::AppResult<Option<String>> {
        match self.patient_link {
            PatientLink::None => Ok(None),
            PatientLink::Itself => Ok(resource.get("id").and_then(serde_json::Value::as_str).map(str::to_owned)),
            PatientLink::Element(element) => {
                let reference = resource.get(element).and_then(|r| r.get("reference")).and_then(|r| r.as_str());
                match reference.and_then(super::search::split_reference) {
                    Some((Some(t), id)) if t == "Patient" => Ok(Some(id)),
                    _ => Err(crate::error::AppError::invalid(
                        format!("{}.{element}", self.name),
                        "The resource must reference its patient as Patient/{id}.",
                    )),
                }
            }
        }
    }

    /// The search parameter of this type with this name.
    pub fn param(&self, name: &str) -> Option<&'static SearchParamDecl> {
        self.search.iter().find(|p| p.name == name)
    }
}

const fn p(name: &'static str, kind: ParamKind, paths: &'static [&'static str], phi: bool) -> SearchParamDecl {
    SearchParamDecl { name, kind, paths, phi, targets: &[] }
}

const fn r(name: &'static str, paths: &'static [&'static str], targets: &'static [&'static str]) -> SearchParamDecl {
    SearchParamDecl { name, kind: ParamKind::Reference, paths, phi: false, targets }
}

use ParamKind::{Date, String as Str, Token};

const ID: SearchParamDecl = p("_id", Token, &["id"], false);
const LAST_UPDATED: SearchParamDecl = p("_lastUpdated", Date, &["meta.lastUpdated"], false);
const PATIENT: &[&str] = &["Patient"];

static ALL: [ResourceDecl; 9] = [
    ResourceDecl {
        name: "Patient",
        phi: &[
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
            "deceasedBoolean",
            "deceasedDateTime",
            "address",
            "maritalStatus",
            "multipleBirthBoolean",
            "multipleBirthInteger",
            "photo",
            "contact",
            "communication",
            "generalPractitioner",
            "managingOrganization",
            "link",
        ],
        plain: &["resourceType", "id"],
        search: &[
            ID,
            LAST_UPDATED,
            p("identifier", Token, &["identifier"], true),
            p("name", Str, &["name"], true),
            p("family", Str, &["name.family"], true),
            p("given", Str, &["name.given"], true),
            p("birthdate", Date, &["birthDate"], true),
            p("gender", Token, &["gender"], true),
        ],
        patient_link: PatientLink::Itself,
        references: &[("generalPractitioner", &["Practitioner"]), ("link.other", PATIENT)],
        read_only: false,
        required: &[],
    },
    ResourceDecl {
        name: "Practitioner",
        phi: &[
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
        plain: &["resourceType", "id"],
        search: &[
            ID,
            LAST_UPDATED,
            p("identifier", Token, &["identifier"], true),
            p("name", Str, &["name"], true),
            p("family", Str, &["name.family"], true),
            p("given", Str, &["name.given"], true),
        ],
        patient_link: PatientLink::None,
        references: &[],
        read_only: false,
        required: &[],
    },
    ResourceDecl {
        name: "CareTeam",
        phi: &[
            "meta",
            "implicitRules",
            "language",
            "text",
            "contained",
            "extension",
            "modifierExtension",
            "identifier",
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
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["subject"], PATIENT),
            r("subject", &["subject"], PATIENT),
            r("participant", &["participant.member"], &["Practitioner", "Patient"]),
            p("status", Token, &["status"], false),
            p("category", Token, &["category"], true),
            p("date", Date, &["period"], true),
        ],
        patient_link: PatientLink::Element("subject"),
        references: &[
            ("subject", PATIENT),
            ("participant.member", &["Practitioner", "Patient", "CareTeam"]),
            ("encounter", &["Encounter"]),
        ],
        read_only: false,
        required: &[],
    },
    ResourceDecl {
        name: "Encounter",
        phi: &[
            "meta",
            "implicitRules",
            "language",
            "text",
            "contained",
            "extension",
            "modifierExtension",
            "identifier",
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
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["subject"], PATIENT),
            r("subject", &["subject"], PATIENT),
            r("participant", &["participant.individual"], &["Practitioner"]),
            p("status", Token, &["status"], false),
            p("class", Token, &["class"], true),
            p("type", Token, &["type"], true),
            p("date", Date, &["period"], true),
        ],
        patient_link: PatientLink::Element("subject"),
        references: &[
            ("subject", PATIENT),
            ("participant.individual", &["Practitioner"]),
            ("diagnosis.condition", &["Condition"]),
            ("partOf", &["Encounter"]),
        ],
        read_only: false,
        required: &["status"],
    },
    ResourceDecl {
        name: "Observation",
        phi: &[
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
            "category",
            "code",
            "subject",
            "focus",
            "encounter",
            "effectiveDateTime",
            "effectivePeriod",
            "effectiveTiming",
            "effectiveInstant",
            "issued",
            "performer",
            "valueQuantity",
            "valueCodeableConcept",
            "valueString",
            "valueBoolean",
            "valueInteger",
            "valueRange",
            "valueRatio",
            "valueSampledData",
            "valueTime",
            "valueDateTime",
            "valuePeriod",
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
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["subject"], PATIENT),
            r("subject", &["subject"], PATIENT),
            r("encounter", &["encounter"], &["Encounter"]),
            p("code", Token, &["code"], true),
            p("category", Token, &["category"], true),
            p("date", Date, &["effectiveDateTime", "effectivePeriod", "effectiveInstant"], true),
            p("status", Token, &["status"], false),
        ],
        patient_link: PatientLink::Element("subject"),
        references: &[
            ("subject", PATIENT),
            ("encounter", &["Encounter"]),
            ("performer", &["Practitioner", "Patient", "CareTeam"]),
            ("hasMember", &["Observation"]),
            ("derivedFrom", &["Observation"]),
        ],
        read_only: false,
        required: &["status"],
    },
    ResourceDecl {
        name: "Condition",
        phi: &[
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
            "onsetDateTime",
            "onsetAge",
            "onsetPeriod",
            "onsetRange",
            "onsetString",
            "abatementDateTime",
            "abatementAge",
            "abatementPeriod",
            "abatementRange",
            "abatementString",
            "recordedDate",
            "recorder",
            "asserter",
            "stage",
            "evidence",
            "note",
        ],
        plain: &["resourceType", "id"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["subject"], PATIENT),
            r("subject", &["subject"], PATIENT),
            r("encounter", &["encounter"], &["Encounter"]),
            p("code", Token, &["code"], true),
            p("category", Token, &["category"], true),
            p("clinical-status", Token, &["clinicalStatus"], true),
            p("verification-status", Token, &["verificationStatus"], true),
            p("date", Date, &["onsetDateTime", "onsetPeriod", "recordedDate"], true),
            p("onset-date", Date, &["onsetDateTime", "onsetPeriod"], true),
            p("recorded-date", Date, &["recordedDate"], true),
        ],
        patient_link: PatientLink::Element("subject"),
        references: &[
            ("subject", PATIENT),
            ("encounter", &["Encounter"]),
            ("recorder", &["Practitioner", "Patient"]),
            ("asserter", &["Practitioner", "Patient"]),
        ],
        read_only: false,
        required: &[],
    },
    ResourceDecl {
        name: "AllergyIntolerance",
        phi: &[
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
            "onsetDateTime",
            "onsetAge",
            "onsetPeriod",
            "onsetRange",
            "onsetString",
            "recordedDate",
            "recorder",
            "asserter",
            "lastOccurrence",
            "note",
            "reaction",
        ],
        plain: &["resourceType", "id"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["patient"], PATIENT),
            r("subject", &["patient"], PATIENT),
            p("code", Token, &["code"], true),
            p("category", Token, &["category"], true),
            p("clinical-status", Token, &["clinicalStatus"], true),
            p("verification-status", Token, &["verificationStatus"], true),
            p("criticality", Token, &["criticality"], true),
            p("date", Date, &["recordedDate", "onsetDateTime", "onsetPeriod"], true),
        ],
        patient_link: PatientLink::Element("patient"),
        references: &[
            ("patient", PATIENT),
            ("encounter", &["Encounter"]),
            ("recorder", &["Practitioner", "Patient"]),
            ("asserter", &["Practitioner", "Patient"]),
        ],
        read_only: false,
        required: &[],
    },
    ResourceDecl {
        name: "MedicationRequest",
        phi: &[
            "meta",
            "implicitRules",
            "language",
            "text",
            "contained",
            "extension",
            "modifierExtension",
            "identifier",
            "statusReason",
            "category",
            "priority",
            "doNotPerform",
            "reportedBoolean",
            "reportedReference",
            "medicationCodeableConcept",
            "medicationReference",
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
        plain: &["resourceType", "id", "status", "intent"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["subject"], PATIENT),
            r("subject", &["subject"], PATIENT),
            r("encounter", &["encounter"], &["Encounter"]),
            r("requester", &["requester"], &["Practitioner"]),
            p("code", Token, &["medicationCodeableConcept"], true),
            p("category", Token, &["category"], true),
            p("date", Date, &["authoredOn"], true),
            p("authoredon", Date, &["authoredOn"], true),
            p("status", Token, &["status"], false),
            p("intent", Token, &["intent"], false),
        ],
        patient_link: PatientLink::Element("subject"),
        references: &[
            ("subject", PATIENT),
            ("encounter", &["Encounter"]),
            ("requester", &["Practitioner", "Patient"]),
            ("recorder", &["Practitioner"]),
        ],
        read_only: false,
        required: &["status", "intent"],
    },
    ResourceDecl {
        name: "AuditEvent",
        phi: &[
            "meta",
            "implicitRules",
            "language",
            "text",
            "contained",
            "extension",
            "modifierExtension",
            "outcomeDesc",
        ],
        plain: &[
            "resourceType",
            "id",
            "type",
            "subtype",
            "action",
            "period",
            "recorded",
            "outcome",
            "purposeOfEvent",
            "agent",
            "source",
            "entity",
        ],
        search: &[
            ID,
            r("patient", &["entity.what"], PATIENT),
            r("agent", &["agent.who"], &["Practitioner", "Patient"]),
            p("date", Date, &["recorded"], false),
            p("action", Token, &["action"], false),
        ],
        patient_link: PatientLink::None,
        references: &[("entity.what", &["Patient"]), ("agent.who", &["Practitioner", "Patient"])],
        read_only: true,
        required: &["recorded"],
    },
];

/// The declaration of a served type, by its exact FHIR name.
pub fn decl(name: &str) -> Option<&'static ResourceDecl> {
    ALL.iter().find(|d| d.name == name)
}

/// Every served type, in a fixed order.
pub fn all() -> &'static [ResourceDecl] {
    &ALL
}
