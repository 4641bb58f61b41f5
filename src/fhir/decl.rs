//! The one declaration of each resource type carevault serves. A declaration says only what is carevault's
//! choice: which top-level elements are stored in plaintext (each justified in `docs/plaintext-elements.md`;
//! everything else is PHI, encrypted element by element), the search parameters with their kinds and paths,
//! how the type links to a patient (its compartment), which references it may hold, whether clients may write
//! it, the 1..1 elements the schema cannot require, and an optional write hook.
//!
//! What FHIR itself defines is read from the embedded official schema ([`super::schema`]), never repeated
//! here: the type's elements ([`ResourceDecl::elements`]), its choice elements (`value[x]`,
//! [`ResourceDecl::canonical_elements`]) and the minimum cardinality the schema expresses
//! ([`ResourceDecl::mandatory`]). Fail closed: an element the schema has and the declaration does not list as
//! plain is PHI ([`ResourceDecl::is_phi`] is true for any name not in `plain`).
//!
//! [`all`] is the only list of served types: the access catalog (`access::RESOURCE_TYPES`, the mandatory
//! elements), the CapabilityStatement, the docs tables and the tests derive from it or are checked against it.
//! [`check`] verifies every declaration against the schema; the validator runs it at startup, so a
//! declaration naming an element the schema does not have stops the server from starting.

use serde_json::Value;

use super::schema::{self, ResourceSchema};

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
    /// False for a PHI parameter with so few distinct values (gender) that even a blind index would show each
    /// patient's class by counting equal hashes (docs/encryption.md): it has no index rows and is answered by
    /// decrypt-and-filter within a bounded candidate set only.
    pub indexed: bool,
    /// For references: the resource types a value may point to (the first is the default for a bare id).
    pub targets: &'static [&'static str],
}

/// How a resource belongs to a patient's compartment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatientLink {
    /// The resource is the Patient.
    Itself,
    /// The top-level element holding the `Reference` to the Patient (e.g. `subject`, `patient`). When the
    /// element is an array of references (`Provenance.target`), the one `Patient` reference among them; none,
    /// or two different patients, is refused.
    Element(&'static str),
    /// Not in any patient's compartment (Practitioner, AuditEvent).
    None,
}

/// A per-type side effect of a write, run by the records service inside the write's transaction.
#[derive(Clone, Copy)]
pub enum WriteHook {
    /// The resource defines care relationships `(patient id, practitioner id)`: on create and update they
    /// replace the ones the resource defined before; a delete clears them (see
    /// [`ResourceDecl::care_relationships`]).
    CareRelationships(fn(&Value) -> Vec<(String, String)>),
}

impl std::fmt::Debug for WriteHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CareRelationships(_) => f.write_str("CareRelationships"),
        }
    }
}

#[derive(Debug)]
pub struct ResourceDecl {
    pub name: &'static str,
    /// Top-level elements stored in plaintext, each justified in `docs/plaintext-elements.md` (a test checks
    /// the document lists exactly these). Every other element of the type is PHI.
    pub plain: &'static [&'static str],
    pub search: &'static [SearchParamDecl],
    pub patient_link: PatientLink,
    /// Reference elements (dotted paths) and the resource types they may point to, for integrity checks. The
    /// schema cannot supply these: it types every reference as `Reference`, without target types.
    pub references: &'static [(&'static str, &'static [&'static str])],
    /// Written by the server only: clients may read and search, never create, update or delete.
    pub read_only: bool,
    /// Primitive and choice elements of minimum cardinality 1, by R4 name (`status`, `medication[x]`): the
    /// JSON schema's `required` cannot express them (a primitive may be given by its `_x` extension sibling
    /// alone; a choice by any of its variants), so they are declared here, from the R4 definitions. Checked by
    /// the validator; [`check`] refuses any that is not a primitive or choice element of the type.
    pub required: &'static [&'static str],
    /// A side effect of writes of this type, if any.
    pub hook: Option<WriteHook>,
}

impl ResourceDecl {
    /// What the embedded schema defines for this type (`None` only if the schema were unreadable).
    pub fn schema(&self) -> Option<&'static ResourceSchema> {
        schema::resource(self.name)
    }

    /// Every top-level element of the type by JSON name (`valueQuantity`, `resourceType`), from the schema.
    pub fn elements(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.schema().into_iter().flat_map(|s| s.elements.iter()).map(|e| e.name.as_str())
    }

    /// The top-level elements that are PHI: every element of the schema not declared plain.
    pub fn phi_elements(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.elements().filter(|e| self.is_phi(e))
    }

    /// Whether a top-level element (or its `_x` extension sibling) is PHI. Unknown names are PHI.
    pub fn is_phi(&self, element: &str) -> bool {
        let base = element.strip_prefix('_').unwrap_or(element);
        !self.plain.contains(&base)
    }

    /// The R4 names of the type's top-level elements (choice elements once, as `value[x]`), without
    /// `resourceType`, sorted by JSON name: the names `policies/fields.toml` uses.
    pub fn canonical_elements(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for e in self.schema().into_iter().flat_map(|s| s.elements.iter()) {
            if e.name != "resourceType" && !out.contains(&e.canonical.as_str()) {
                out.push(e.canonical.as_str());
            }
        }
        out
    }

    /// The R4 names of the top-level elements of minimum cardinality 1: the schema's `required` (complex
    /// elements) and the declared [`required`](Self::required) (primitives and choices), sorted by JSON name.
    pub fn mandatory(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for e in self.schema().into_iter().flat_map(|s| s.elements.iter()) {
            let canonical = e.canonical.as_str();
            let min_one = (e.required && e.name != "resourceType") || self.required.contains(&canonical);
            if min_one && !out.contains(&canonical) {
                out.push(canonical);
            }
        }
        out
    }

    /// The JSON names of the elements a declared R4 name stands for: the variants of `medication[x]`, or the
    /// one element.
    pub fn variants<'a>(&'a self, canonical: &'a str) -> impl Iterator<Item = &'static str> + 'a {
        let elements = self.schema().into_iter().flat_map(|s| s.elements.iter());
        elements.filter(move |e| e.canonical == canonical).map(|e| e.name.as_str())
    }

    /// The id of the Patient whose compartment this resource belongs to. Fails closed: a type linked to a
    /// patient must name one as a plain `Patient/{id}` reference (relative or absolute; not contained, not by
    /// identifier only). `None` for types outside any compartment, or a Patient without an id yet.
    pub fn patient_id(&self, resource: &serde_json::Value) -> crate::error::AppResult<Option<String>> {
        match self.patient_link {
            PatientLink::None => Ok(None),
            PatientLink::Itself => Ok(resource.get("id").and_then(serde_json::Value::as_str).map(str::to_owned)),
            PatientLink::Element(element) => {
                let bad = || {
                    crate::error::AppError::invalid(
                        format!("{}.{element}", self.name),
                        "The resource must reference its patient as Patient/{id}.",
                    )
                };
                // An array of references (Provenance.target): the one Patient among them.
                if let Some(Value::Array(targets)) = resource.get(element) {
                    let mut patients = targets
                        .iter()
                        .filter_map(|t| {
                            t.get("reference").and_then(Value::as_str).and_then(super::search::split_reference)
                        })
                        .filter(|(t, _)| t.as_deref() == Some("Patient"))
                        .map(|(_, id)| id);
                    let first = patients.next().ok_or_else(bad)?;
                    return if patients.all(|p| p == first) { Ok(Some(first)) } else { Err(bad()) };
                }
                let reference = resource.get(element).and_then(|r| r.get("reference")).and_then(|r| r.as_str());
                match reference.and_then(super::search::split_reference) {
                    Some((Some(t), id)) if t == "Patient" => Ok(Some(id)),
                    _ => Err(bad()),
                }
            }
        }
    }

    /// The search parameter of this type with this name.
    pub fn param(&self, name: &str) -> Option<&'static SearchParamDecl> {
        self.search.iter().find(|p| p.name == name)
    }

    /// The care relationships `(patient id, practitioner id)` this version of a resource defines, for a type
    /// declared with [`WriteHook::CareRelationships`]; `None` for every other type. The records service
    /// stores them with the write (replacing the previous version's); on delete it stores an empty list for
    /// every type where [`has_care_relationships`](Self::has_care_relationships) holds.
    pub fn care_relationships(&self, resource: &Value) -> Option<Vec<(String, String)>> {
        let Some(WriteHook::CareRelationships(pairs)) = self.hook else { return None };
        Some(pairs(resource))
    }

    /// Whether writes of this type maintain care relationships.
    pub fn has_care_relationships(&self) -> bool {
        matches!(self.hook, Some(WriteHook::CareRelationships(_)))
    }

    /// Checks the declaration against the schema's definition of the type: every name it uses is an element
    /// the schema defines. The message names the declaration and the offending name.
    pub fn check(&self) -> Result<(), String> {
        let schema = self.schema().ok_or_else(|| format!("the FHIR schema does not define {}", self.name))?;
        let fail = |what: &str, name: &str| Err(format!("{}: {what} {name} is not an element of the type", self.name));
        let top = |path: &str| path.split('.').next().unwrap_or(path).to_owned();
        for plain in self.plain {
            if schema.element(plain).is_none() {
                return fail("plain element", plain);
            }
        }
        for required in self.required {
            let variants: Vec<_> = schema.named(required).collect();
            let expressible = variants.iter().any(|e| e.required || !(e.primitive || e.is_choice()));
            if variants.is_empty() || expressible {
                return fail("required (a primitive or choice the schema cannot require)", required);
            }
        }
        for p in self.search {
            for path in p.paths {
                if schema.element(&top(path)).is_none() {
                    return fail(&format!("search parameter {} path", p.name), path);
                }
            }
        }
        for (path, _) in self.references {
            if schema.element(&top(path)).is_none() {
                return fail("reference", path);
            }
        }
        if let PatientLink::Element(e) = self.patient_link
            && schema.element(e).is_none()
        {
            return fail("patient link", e);
        }
        Ok(())
    }
}

/// Checks every declaration against the embedded schema ([`ResourceDecl::check`]), and that no type is
/// declared twice.
pub fn check() -> Result<(), String> {
    for (i, d) in all().iter().enumerate() {
        if all()[..i].iter().any(|o| o.name == d.name) {
            return Err(format!("{} is declared twice", d.name));
        }
        d.check()?;
    }
    Ok(())
}

const fn p(name: &'static str, kind: ParamKind, paths: &'static [&'static str], phi: bool) -> SearchParamDecl {
    SearchParamDecl { name, kind, paths, phi, indexed: true, targets: &[] }
}

/// A low-cardinality PHI parameter: never indexed, matched by decrypting the candidates.
const fn filtered(name: &'static str, kind: ParamKind, paths: &'static [&'static str]) -> SearchParamDecl {
    SearchParamDecl { name, kind, paths, phi: true, indexed: false, targets: &[] }
}

const fn r(name: &'static str, paths: &'static [&'static str], targets: &'static [&'static str]) -> SearchParamDecl {
    SearchParamDecl { name, kind: ParamKind::Reference, paths, phi: false, indexed: true, targets }
}

use ParamKind::{Date, String as Str, Token};

const ID: SearchParamDecl = p("_id", Token, &["id"], false);
const LAST_UPDATED: SearchParamDecl = p("_lastUpdated", Date, &["meta.lastUpdated"], false);
const PATIENT: &[&str] = &["Patient"];
/// Who may perform a procedure or an imaging series.
const PERFORMERS: &[&str] = &["Practitioner", "PractitionerRole", "Organization", "CareTeam", "Patient", "Device"];
/// Who may author a document or act in a provenance record.
const AUTHORS: &[&str] = &["Practitioner", "PractitionerRole", "Organization", "Patient", "Device"];
/// Who provides the care a claim bills for.
const PROVIDERS: &[&str] = &["Practitioner", "PractitionerRole", "Organization"];
/// What a Provenance may be about: any served type but the server's own AuditEvent.
const PROVENANCE_TARGETS: &[&str] = &[
    "Patient",
    "Practitioner",
    "CareTeam",
    "Encounter",
    "Observation",
    "Condition",
    "AllergyIntolerance",
    "MedicationRequest",
    "Organization",
    "Location",
    "PractitionerRole",
    "Procedure",
    "DiagnosticReport",
    "Immunization",
    "DocumentReference",
    "CarePlan",
    "Goal",
    "Device",
    "Coverage",
    "Provenance",
    "Medication",
    "MedicationAdministration",
    "ImagingStudy",
    "SupplyDelivery",
    "Claim",
    "ExplanationOfBenefit",
];

/// The declarations, in a fixed order. A `const` so that [`NAMES`] is computed at compile time.
const DECLS: &[ResourceDecl] = &[
    ResourceDecl {
        name: "Patient",
        plain: &["resourceType", "id"],
        search: &[
            ID,
            LAST_UPDATED,
            p("identifier", Token, &["identifier"], true),
            p("name", Str, &["name"], true),
            p("family", Str, &["name.family"], true),
            p("given", Str, &["name.given"], true),
            p("birthdate", Date, &["birthDate"], true),
            filtered("gender", Token, &["gender"]),
        ],
        patient_link: PatientLink::Itself,
        references: &[("generalPractitioner", &["Practitioner"]), ("link.other", PATIENT)],
        read_only: false,
        required: &[],
        hook: None,
    },
    ResourceDecl {
        name: "Practitioner",
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
        hook: None,
    },
    ResourceDecl {
        name: "CareTeam",
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
        hook: Some(WriteHook::CareRelationships(super::reference::care_pairs)),
    },
    ResourceDecl {
        name: "Encounter",
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
        hook: None,
    },
    ResourceDecl {
        name: "Observation",
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
        hook: None,
    },
    ResourceDecl {
        name: "Condition",
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
        hook: None,
    },
    ResourceDecl {
        name: "AllergyIntolerance",
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
        hook: None,
    },
    ResourceDecl {
        name: "MedicationRequest",
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
        required: &["status", "intent", "medication[x]"],
        hook: None,
    },
    ResourceDecl {
        name: "AuditEvent",
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
        hook: None,
    },
    ResourceDecl {
        name: "Organization",
        plain: &["resourceType", "id"],
        search: &[
            ID,
            LAST_UPDATED,
            p("identifier", Token, &["identifier"], true),
            p("name", Str, &["name", "alias"], true),
        ],
        patient_link: PatientLink::None,
        references: &[("partOf", &["Organization"])],
        read_only: false,
        required: &[],
        hook: None,
    },
    // ---- US Core 6.1 types beyond the first nine (CONTRACT §5a) -------------------------------------------
    ResourceDecl {
        name: "Location",
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            p("identifier", Token, &["identifier"], true),
            p("name", Str, &["name", "alias"], true),
            p("address", Str, &["address"], true),
            p("address-city", Str, &["address.city"], true),
            p("address-state", Str, &["address.state"], true),
            p("address-postalcode", Str, &["address.postalCode"], true),
            p("type", Token, &["type"], true),
            p("status", Token, &["status"], false),
            r("organization", &["managingOrganization"], &["Organization"]),
            r("partof", &["partOf"], &["Location"]),
        ],
        patient_link: PatientLink::None,
        references: &[("managingOrganization", &["Organization"]), ("partOf", &["Location"])],
        read_only: false,
        required: &[],
        hook: None,
    },
    ResourceDecl {
        name: "PractitionerRole",
        plain: &["resourceType", "id"],
        search: &[
            ID,
            LAST_UPDATED,
            p("identifier", Token, &["identifier"], true),
            r("practitioner", &["practitioner"], &["Practitioner"]),
            r("organization", &["organization"], &["Organization"]),
            r("location", &["location"], &["Location"]),
            p("role", Token, &["code"], true),
            p("specialty", Token, &["specialty"], true),
            p("date", Date, &["period"], true),
        ],
        patient_link: PatientLink::None,
        references: &[
            ("practitioner", &["Practitioner"]),
            ("organization", &["Organization"]),
            ("location", &["Location"]),
        ],
        read_only: false,
        required: &[],
        hook: None,
    },
    ResourceDecl {
        name: "Procedure",
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["subject"], PATIENT),
            r("subject", &["subject"], PATIENT),
            r("encounter", &["encounter"], &["Encounter"]),
            p("identifier", Token, &["identifier"], true),
            p("code", Token, &["code"], true),
            p("category", Token, &["category"], true),
            p("date", Date, &["performedDateTime", "performedPeriod"], true),
            p("status", Token, &["status"], false),
            r("performer", &["performer.actor"], PERFORMERS),
            r("location", &["location"], &["Location"]),
            r("based-on", &["basedOn"], &["CarePlan"]),
        ],
        patient_link: PatientLink::Element("subject"),
        references: &[
            ("subject", PATIENT),
            ("encounter", &["Encounter"]),
            ("recorder", &["Practitioner", "PractitionerRole", "Patient"]),
            ("asserter", &["Practitioner", "PractitionerRole", "Patient"]),
            ("performer.actor", PERFORMERS),
            ("location", &["Location"]),
            ("basedOn", &["CarePlan"]),
            ("reasonReference", &["Condition", "Observation", "Procedure", "DiagnosticReport", "DocumentReference"]),
        ],
        read_only: false,
        required: &["status"],
        hook: None,
    },
    ResourceDecl {
        name: "DiagnosticReport",
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["subject"], PATIENT),
            r("subject", &["subject"], PATIENT),
            r("encounter", &["encounter"], &["Encounter"]),
            p("identifier", Token, &["identifier"], true),
            p("code", Token, &["code"], true),
            p("category", Token, &["category"], true),
            p("date", Date, &["effectiveDateTime", "effectivePeriod"], true),
            p("issued", Date, &["issued"], true),
            p("status", Token, &["status"], false),
            r("performer", &["performer"], &["Practitioner", "PractitionerRole", "Organization", "CareTeam"]),
            r("result", &["result"], &["Observation"]),
        ],
        patient_link: PatientLink::Element("subject"),
        references: &[
            ("subject", PATIENT),
            ("encounter", &["Encounter"]),
            ("basedOn", &["CarePlan", "MedicationRequest"]),
            ("performer", &["Practitioner", "PractitionerRole", "Organization", "CareTeam"]),
            ("resultsInterpreter", &["Practitioner", "PractitionerRole", "Organization", "CareTeam"]),
            ("result", &["Observation"]),
            ("imagingStudy", &["ImagingStudy"]),
        ],
        read_only: false,
        required: &["status"],
        hook: None,
    },
    ResourceDecl {
        name: "Immunization",
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["patient"], PATIENT),
            r("subject", &["patient"], PATIENT),
            p("identifier", Token, &["identifier"], true),
            p("vaccine-code", Token, &["vaccineCode"], true),
            p("date", Date, &["occurrenceDateTime"], true),
            p("status", Token, &["status"], false),
            r("location", &["location"], &["Location"]),
            r("performer", &["performer.actor"], &["Practitioner", "PractitionerRole", "Organization"]),
            r("manufacturer", &["manufacturer"], &["Organization"]),
        ],
        patient_link: PatientLink::Element("patient"),
        references: &[
            ("patient", PATIENT),
            ("encounter", &["Encounter"]),
            ("location", &["Location"]),
            ("manufacturer", &["Organization"]),
            ("performer.actor", &["Practitioner", "PractitionerRole", "Organization"]),
            ("reasonReference", &["Condition", "Observation", "DiagnosticReport"]),
        ],
        read_only: false,
        required: &["status", "occurrence[x]"],
        hook: None,
    },
    ResourceDecl {
        name: "DocumentReference",
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["subject"], PATIENT),
            r("subject", &["subject"], PATIENT),
            r("encounter", &["context.encounter"], &["Encounter"]),
            p("identifier", Token, &["masterIdentifier", "identifier"], true),
            p("type", Token, &["type"], true),
            p("category", Token, &["category"], true),
            p("date", Date, &["date"], true),
            p("period", Date, &["context.period"], true),
            p("status", Token, &["status"], false),
            r("author", &["author"], AUTHORS),
        ],
        patient_link: PatientLink::Element("subject"),
        references: &[
            ("subject", PATIENT),
            ("author", AUTHORS),
            ("authenticator", &["Practitioner", "PractitionerRole", "Organization"]),
            ("custodian", &["Organization"]),
            ("relatesTo.target", &["DocumentReference"]),
            ("context.encounter", &["Encounter"]),
        ],
        read_only: false,
        required: &["status"],
        hook: None,
    },
    ResourceDecl {
        name: "CarePlan",
        plain: &["resourceType", "id", "status", "intent"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["subject"], PATIENT),
            r("subject", &["subject"], PATIENT),
            r("encounter", &["encounter"], &["Encounter"]),
            p("identifier", Token, &["identifier"], true),
            p("category", Token, &["category"], true),
            p("date", Date, &["period"], true),
            p("status", Token, &["status"], false),
            p("intent", Token, &["intent"], false),
        ],
        patient_link: PatientLink::Element("subject"),
        references: &[
            ("subject", PATIENT),
            ("encounter", &["Encounter"]),
            ("author", &["Practitioner", "PractitionerRole", "Patient", "Organization", "CareTeam"]),
            ("contributor", &["Practitioner", "PractitionerRole", "Patient", "Organization", "CareTeam"]),
            ("careTeam", &["CareTeam"]),
            ("addresses", &["Condition"]),
            ("goal", &["Goal"]),
            ("basedOn", &["CarePlan"]),
            ("replaces", &["CarePlan"]),
            ("partOf", &["CarePlan"]),
        ],
        read_only: false,
        required: &["status", "intent"],
        hook: None,
    },
    ResourceDecl {
        name: "Goal",
        plain: &["resourceType", "id", "lifecycleStatus"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["subject"], PATIENT),
            r("subject", &["subject"], PATIENT),
            p("identifier", Token, &["identifier"], true),
            p("lifecycle-status", Token, &["lifecycleStatus"], false),
            p("category", Token, &["category"], true),
            p("target-date", Date, &["target.dueDate"], true),
        ],
        patient_link: PatientLink::Element("subject"),
        references: &[
            ("subject", PATIENT),
            ("expressedBy", &["Patient", "Practitioner", "PractitionerRole"]),
            ("addresses", &["Condition", "Observation", "MedicationRequest"]),
        ],
        read_only: false,
        required: &["lifecycleStatus"],
        hook: None,
    },
    ResourceDecl {
        name: "Device",
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["patient"], PATIENT),
            r("subject", &["patient"], PATIENT),
            p("identifier", Token, &["identifier"], true),
            p("type", Token, &["type"], true),
            p("status", Token, &["status"], false),
            p("device-name", Str, &["deviceName.name"], true),
            p("manufacturer", Str, &["manufacturer"], true),
            p("model", Str, &["modelNumber"], true),
            p("udi-di", Str, &["udiCarrier.deviceIdentifier"], true),
            r("organization", &["owner"], &["Organization"]),
            r("location", &["location"], &["Location"]),
        ],
        patient_link: PatientLink::Element("patient"),
        references: &[
            ("patient", PATIENT),
            ("owner", &["Organization"]),
            ("location", &["Location"]),
            ("parent", &["Device"]),
        ],
        read_only: false,
        required: &[],
        hook: None,
    },
    ResourceDecl {
        name: "Coverage",
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["beneficiary"], PATIENT),
            r("beneficiary", &["beneficiary"], PATIENT),
            r("subscriber", &["subscriber"], PATIENT),
            r("policy-holder", &["policyHolder"], &["Patient", "Organization"]),
            r("payor", &["payor"], &["Organization", "Patient"]),
            p("identifier", Token, &["identifier"], true),
            p("type", Token, &["type"], true),
            p("status", Token, &["status"], false),
        ],
        patient_link: PatientLink::Element("beneficiary"),
        references: &[
            ("beneficiary", PATIENT),
            ("subscriber", PATIENT),
            ("policyHolder", &["Patient", "Organization"]),
            ("payor", &["Organization", "Patient"]),
        ],
        read_only: false,
        required: &["status"],
        hook: None,
    },
    ResourceDecl {
        // R4 puts Provenance in the Patient compartment through `target` (its `patient` parameter is
        // `target.where(resolve() is Patient)`): the patient link is the one Patient reference among the
        // targets ([`ResourceDecl::patient_id`]; none, or two different patients, is refused).
        name: "Provenance",
        plain: &["resourceType", "id"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["target"], PATIENT),
            r("target", &["target"], PROVENANCE_TARGETS),
            r("agent", &["agent.who"], AUTHORS),
            r("location", &["location"], &["Location"]),
            p("recorded", Date, &["recorded"], true),
        ],
        patient_link: PatientLink::Element("target"),
        references: &[
            ("target", PROVENANCE_TARGETS),
            ("agent.who", AUTHORS),
            ("agent.onBehalfOf", AUTHORS),
            ("location", &["Location"]),
        ],
        read_only: false,
        required: &["recorded"],
        hook: None,
    },
    ResourceDecl {
        name: "Medication",
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            p("identifier", Token, &["identifier"], true),
            p("code", Token, &["code"], true),
            p("form", Token, &["form"], true),
            p("status", Token, &["status"], false),
            r("manufacturer", &["manufacturer"], &["Organization"]),
            r("ingredient", &["ingredient.itemReference"], &["Medication"]),
        ],
        patient_link: PatientLink::None,
        references: &[("manufacturer", &["Organization"]), ("ingredient.itemReference", &["Medication"])],
        read_only: false,
        required: &[],
        hook: None,
    },
    ResourceDecl {
        name: "MedicationAdministration",
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["subject"], PATIENT),
            r("subject", &["subject"], PATIENT),
            r("context", &["context"], &["Encounter"]),
            p("identifier", Token, &["identifier"], true),
            p("code", Token, &["medicationCodeableConcept"], true),
            r("medication", &["medicationReference"], &["Medication"]),
            p("effective-time", Date, &["effectiveDateTime", "effectivePeriod"], true),
            p("status", Token, &["status"], false),
            r("performer", &["performer.actor"], &["Practitioner", "PractitionerRole", "Patient", "Device"]),
            r("request", &["request"], &["MedicationRequest"]),
        ],
        patient_link: PatientLink::Element("subject"),
        references: &[
            ("subject", PATIENT),
            ("context", &["Encounter"]),
            ("medicationReference", &["Medication"]),
            ("performer.actor", &["Practitioner", "PractitionerRole", "Patient", "Device"]),
            ("request", &["MedicationRequest"]),
            ("device", &["Device"]),
            ("reasonReference", &["Condition", "Observation", "DiagnosticReport"]),
        ],
        read_only: false,
        required: &["status", "medication[x]", "effective[x]"],
        hook: None,
    },
    ResourceDecl {
        name: "ImagingStudy",
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["subject"], PATIENT),
            r("subject", &["subject"], PATIENT),
            r("encounter", &["encounter"], &["Encounter"]),
            p("identifier", Token, &["identifier"], true),
            p("modality", Token, &["series.modality"], true),
            p("started", Date, &["started"], true),
            p("status", Token, &["status"], false),
            r("performer", &["series.performer.actor"], PERFORMERS),
        ],
        patient_link: PatientLink::Element("subject"),
        references: &[
            ("subject", PATIENT),
            ("encounter", &["Encounter"]),
            ("basedOn", &["CarePlan"]),
            ("referrer", &["Practitioner", "PractitionerRole"]),
            ("interpreter", &["Practitioner", "PractitionerRole"]),
            ("location", &["Location"]),
            ("procedureReference", &["Procedure"]),
            ("reasonReference", &["Condition", "Observation", "DiagnosticReport", "DocumentReference"]),
            ("series.performer.actor", PERFORMERS),
        ],
        read_only: false,
        required: &["status"],
        hook: None,
    },
    ResourceDecl {
        name: "SupplyDelivery",
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["patient"], PATIENT),
            r("subject", &["patient"], PATIENT),
            p("identifier", Token, &["identifier"], true),
            p("status", Token, &["status"], false),
            r("supplier", &["supplier"], &["Practitioner", "PractitionerRole", "Organization"]),
            r("receiver", &["receiver"], &["Practitioner", "PractitionerRole"]),
        ],
        patient_link: PatientLink::Element("patient"),
        references: &[
            ("patient", PATIENT),
            ("supplier", &["Practitioner", "PractitionerRole", "Organization"]),
            ("receiver", &["Practitioner", "PractitionerRole"]),
            ("destination", &["Location"]),
        ],
        read_only: false,
        required: &[],
        hook: None,
    },
    ResourceDecl {
        name: "Claim",
        plain: &["resourceType", "id", "status", "use"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["patient"], PATIENT),
            r("encounter", &["item.encounter"], &["Encounter"]),
            p("identifier", Token, &["identifier"], true),
            p("created", Date, &["created"], true),
            p("status", Token, &["status"], false),
            p("use", Token, &["use"], false),
            r("provider", &["provider"], PROVIDERS),
            r("insurer", &["insurer"], &["Organization"]),
            r("facility", &["facility"], &["Location"]),
        ],
        patient_link: PatientLink::Element("patient"),
        references: &[
            ("patient", PATIENT),
            ("provider", PROVIDERS),
            ("enterer", &["Practitioner", "PractitionerRole"]),
            ("insurer", &["Organization"]),
            ("facility", &["Location"]),
            ("careTeam.provider", PROVIDERS),
            ("diagnosis.diagnosisReference", &["Condition"]),
            ("procedure.procedureReference", &["Procedure"]),
            ("insurance.coverage", &["Coverage"]),
            ("prescription", &["MedicationRequest"]),
            ("item.encounter", &["Encounter"]),
            ("related.claim", &["Claim"]),
        ],
        read_only: false,
        required: &["status", "use", "created"],
        hook: None,
    },
    ResourceDecl {
        name: "ExplanationOfBenefit",
        plain: &["resourceType", "id", "status"],
        search: &[
            ID,
            LAST_UPDATED,
            r("patient", &["patient"], PATIENT),
            r("claim", &["claim"], &["Claim"]),
            r("coverage", &["insurance.coverage"], &["Coverage"]),
            r("encounter", &["item.encounter"], &["Encounter"]),
            p("identifier", Token, &["identifier"], true),
            p("created", Date, &["created"], true),
            p("status", Token, &["status"], false),
            r("provider", &["provider"], PROVIDERS),
        ],
        patient_link: PatientLink::Element("patient"),
        references: &[
            ("patient", PATIENT),
            ("claim", &["Claim"]),
            ("provider", PROVIDERS),
            ("enterer", &["Practitioner", "PractitionerRole"]),
            ("insurer", &["Organization"]),
            ("facility", &["Location"]),
            ("careTeam.provider", PROVIDERS),
            ("diagnosis.diagnosisReference", &["Condition"]),
            ("procedure.procedureReference", &["Procedure"]),
            ("insurance.coverage", &["Coverage"]),
            ("prescription", &["MedicationRequest"]),
            ("item.encounter", &["Encounter"]),
        ],
        read_only: false,
        required: &["status", "use", "created", "outcome"],
        hook: None,
    },
];

/// How many types are served.
pub const COUNT: usize = DECLS.len();

static ALL: &[ResourceDecl] = DECLS;

/// The names of the served types, in the order of [`all`]; computed at compile time from the declarations.
pub const NAMES: [&str; COUNT] = {
    let mut names = [""; COUNT];
    let mut i = 0;
    while i < COUNT {
        names[i] = DECLS[i].name;
        i += 1;
    }
    names
};

/// The declaration of a served type, by its exact FHIR name.
pub fn decl(name: &str) -> Option<&'static ResourceDecl> {
    ALL.iter().find(|d| d.name == name)
}

/// Every served type, in a fixed order: the only list of them.
pub fn all() -> &'static [ResourceDecl] {
    ALL
}
