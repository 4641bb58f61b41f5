//! Which top-level elements each resource type has, so `fields.toml` can be validated against them, and which are
//! mandatory (kept under `_elements`, as FHIR asks).
//!
//! Everything here derives from the FHIR declarations ([`crate::fhir::decl::all`], the only list of served
//! types) and the official schema they read their elements from; [`R4Catalog`] serves them through
//! [`ElementCatalog`], which also lets tests plug in other catalogs.

use std::sync::OnceLock;

use crate::fhir::decl;

/// The resource types the policy may name: exactly the served types, in the order of `fhir::decl::all()`
/// (computed from the declarations at compile time).
pub const RESOURCE_TYPES: [&str; decl::COUNT] = decl::NAMES;

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

/// The R4 top-level elements of the served types, as the embedded official schema defines them, with choice
/// elements in their canonical form (`valueQuantity`, `valueString`, … → `value[x]`). Knows no type when the
/// schema cannot be read (the policy then fails to load: fail closed).
#[derive(Debug, Clone, Copy, Default)]
pub struct R4Catalog;

impl ElementCatalog for R4Catalog {
    fn elements(&self, resource_type: &str) -> Option<Vec<String>> {
        let d = decl::decl(resource_type)?;
        d.schema()?;
        Some(d.canonical_elements().into_iter().map(str::to_owned).collect())
    }
}

/// R4 top-level elements with `min = 1` of a served type ([`decl::ResourceDecl::mandatory`]: the schema's
/// `required` plus the declared 1..1 primitives and choices); empty for any other type.
pub fn r4_mandatory(resource_type: &str) -> &'static [&'static str] {
    static MANDATORY: OnceLock<Vec<Vec<&'static str>>> = OnceLock::new();
    let all = MANDATORY.get_or_init(|| decl::all().iter().map(decl::ResourceDecl::mandatory).collect());
    decl::all().iter().position(|d| d.name == resource_type).and_then(|i| all.get(i)).map_or(&[], Vec::as_slice)
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
            // `Immunization.doseQuantity` is an element of its own (type Quantity), not a choice variant.
            let variant = |e: &String| (e.ends_with("Quantity") && e != "doseQuantity") || e.ends_with("DateTime");
            assert!(els.iter().all(|e| e != "resourceType" && !variant(e)), "{t}");
            assert!(els.contains(&"id".to_owned()) && els.contains(&"meta".to_owned()), "{t}");
            let unique: std::collections::BTreeSet<&String> = els.iter().collect();
            assert_eq!(unique.len(), els.len(), "{t}");
        }
        assert_eq!(R4Catalog.elements("Basic"), None);
    }

    #[test]
    fn types_and_mandatory_elements_derive_from_the_declarations() {
        assert_eq!(RESOURCE_TYPES.to_vec(), decl::all().iter().map(|d| d.name).collect::<Vec<_>>());
        // The table this replaced (R4 `min = 1`, kept by hand for the first nine types): the derivation from the
        // schema's `required` and the declared primitives and choices reproduces it exactly.
        for (t, want) in [
            ("Patient", &[][..]),
            ("Practitioner", &[]),
            ("CareTeam", &[]),
            ("Encounter", &["status", "class"]),
            ("Observation", &["status", "code"]),
            ("Condition", &["subject"]),
            ("AllergyIntolerance", &["patient"]),
            ("MedicationRequest", &["status", "intent", "medication[x]", "subject"]),
            ("AuditEvent", &["type", "recorded", "agent", "source"]),
        ] {
            let got: std::collections::BTreeSet<&str> = r4_mandatory(t).iter().copied().collect();
            assert_eq!(got, want.iter().copied().collect(), "{t}");
        }
        assert!(r4_mandatory("Basic").is_empty());
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
