//! Which top-level elements each resource type has, so `fields.toml` can be validated against them, and which are
//! mandatory (kept under `_elements`, as FHIR asks).
//!
//! The FHIR declarations (the `fhir` module) are the authority for elements; [`R4Catalog`] reads them through
//! [`ElementCatalog`], which also lets tests plug in other catalogs.

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
        r4_mandatory(resource_type).iter().map(|s| (*s).to_owned()).collect()
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

/// The R4 top-level elements of the nine served types, from the FHIR resource declarations
/// ([`crate::fhir::decl`]), with choice elements in their canonical form (`valueQuantity`, `valueString`, … →
/// `value[x]`).
#[derive(Debug, Clone, Copy, Default)]
pub struct R4Catalog;

impl ElementCatalog for R4Catalog {
    fn elements(&self, resource_type: &str) -> Option<Vec<String>> {
        crate::fhir::decl::decl(resource_type).map(|d| canonical_elements(d.elements()))
    }
}

/// R4 data types that name a choice element's type as a suffix (`onsetDateTime` is `onset[x]` as a dateTime).
const CHOICE_TYPES: &[&str] = &[
    "Age",
    "Boolean",
    "CodeableConcept",
    "Date",
    "DateTime",
    "Instant",
    "Integer",
    "Period",
    "Quantity",
    "Range",
    "Ratio",
    "Reference",
    "SampledData",
    "String",
    "Time",
    "Timing",
];

/// `names` (without `resourceType`) with every choice element collapsed to `stem[x]`: a name is a choice when it
/// is a stem plus a data-type suffix and at least one other name has the same stem (so `birthDate` and
/// `referenceRange` stay as they are). Order of first appearance.
fn canonical_elements<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let names: Vec<&str> = names.filter(|n| *n != "resourceType").collect();
    let stems = |name: &'a str| {
        CHOICE_TYPES
            .iter()
            .filter_map(move |t| name.strip_suffix(t))
            .filter(|s| s.ends_with(|c: char| c.is_ascii_lowercase()))
    };
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in &names {
        let choice =
            stems(name).find(|stem| names.iter().filter(|other| stems(other).any(|s| s == *stem)).count() >= 2);
        let canonical = choice.map_or_else(|| (*name).to_owned(), |stem| format!("{stem}[x]"));
        if !out.contains(&canonical) {
            out.push(canonical);
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn elements(t: &str) -> Vec<String> {
        R4Catalog.elements(t).unwrap()
    }

    #[test]
    fn choice_elements_collapse_to_their_r4_names() {
        let has = |t: &str, e: &str| elements(t).iter().any(|x| x == e);
        for (t, e) in [
            ("Patient", "deceased[x]"),
            ("Patient", "multipleBirth[x]"),
            ("Observation", "value[x]"),
            ("Observation", "effective[x]"),
            ("Condition", "onset[x]"),
            ("Condition", "abatement[x]"),
            ("AllergyIntolerance", "onset[x]"),
            ("MedicationRequest", "medication[x]"),
            ("MedicationRequest", "reported[x]"),
        ] {
            assert!(has(t, e), "{t}.{e}");
        }
        // Not choices: one name with a type-like suffix, and two elements that merely share a stem.
        for (t, e) in [
            ("Patient", "birthDate"),
            ("Condition", "recordedDate"),
            ("Observation", "referenceRange"),
            ("MedicationRequest", "reasonReference"),
            ("MedicationRequest", "instantiatesCanonical"),
            ("MedicationRequest", "instantiatesUri"),
        ] {
            assert!(has(t, e), "{t}.{e}");
        }
        for t in RESOURCE_TYPES {
            let els = elements(t);
            assert!(els.iter().all(|e| e != "resourceType" && !e.ends_with("Quantity") && !e.ends_with("DateTime")));
            assert!(els.contains(&"id".to_owned()) && els.contains(&"meta".to_owned()), "{t}");
            let unique: std::collections::BTreeSet<&String> = els.iter().collect();
            assert_eq!(unique.len(), els.len(), "{t}");
        }
        assert_eq!(R4Catalog.elements("Basic"), None);
    }

    #[test]
    fn mandatory_elements_are_elements() {
        for t in RESOURCE_TYPES {
            for m in r4_mandatory(t) {
                assert!(elements(t).iter().any(|e| e == m), "{t}.{m}");
            }
        }
    }
}
