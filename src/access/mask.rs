//! Field masks: which top-level elements of one resource type a role may see or write.
//!
//! Guarantees: [`FieldMask::shape`] leaves only elements the mask allows (and, under `_elements`, only those asked
//! for plus the mandatory ones), drops identifiers of hidden systems, always keeps `resourceType`, `id` and `meta`,
//! and tags the resource `SUBSETTED` exactly when it removed something. A mask that hides identifier systems also
//! hides `text` and `contained`, which could repeat them.

use std::collections::BTreeSet;
use std::fmt;

use serde_json::{Map, Value, json};

/// `meta.tag` system and code marking a resource with elements removed.
pub const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
pub const SUBSETTED_CODE: &str = "SUBSETTED";
/// The identifier system of the US Social Security Number.
pub const SSN_SYSTEM: &str = "http://hl7.org/fhir/sid/us-ssn";
/// The SSN's other system name (its OID), equivalent to [`SSN_SYSTEM`].
const SSN_OID: &str = "urn:oid:2.16.840.1.113883.4.1";
/// HL7 v2 table 0203 (identifier type); its code `SS` types an identifier as an SSN whatever its system.
const IDENTIFIER_TYPE_SYSTEM: &str = "terminology.hl7.org/codesystem/v2-0203";

/// An identifier system in the form systems are compared in: case-folded, without `http://`/`https://` and
/// trailing slashes, the SSN's OID as its URL. So `HTTPS://HL7.org/fhir/sid/us-ssn/` and
/// `urn:oid:2.16.840.1.113883.4.1` are both the SSN class, and a hidden class cannot be sidestepped by spelling.
pub fn canonical_system(system: &str) -> String {
    let lower = system.trim().to_ascii_lowercase();
    if lower.trim_end_matches('/') == SSN_OID {
        return canonical_system(SSN_SYSTEM);
    }
    let bare = lower.strip_prefix("https://").or_else(|| lower.strip_prefix("http://")).unwrap_or(&lower);
    bare.trim_end_matches('/').to_owned()
}

/// The system class of one identifier: its canonical system, or the SSN's when its `type` says `SS` (HL7 v2
/// table 0203) whatever system it names; `None` without either.
pub fn identifier_class(identifier: &Value) -> Option<String> {
    let typed_ssn = identifier.pointer("/type/coding").and_then(Value::as_array).is_some_and(|codings| {
        codings.iter().any(|c| {
            c.get("code").and_then(Value::as_str) == Some("SS")
                && c.get("system")
                    .and_then(Value::as_str)
                    .is_some_and(|s| canonical_system(s) == IDENTIFIER_TYPE_SYSTEM)
        })
    });
    if typed_ssn {
        return Some(canonical_system(SSN_SYSTEM));
    }
    identifier.get("system").and_then(Value::as_str).map(canonical_system)
}

/// Whether an identifier is an SSN, by any of its spellings or by its type.
pub fn is_ssn(identifier: &Value) -> bool {
    identifier_class(identifier).is_some_and(|c| c == canonical_system(SSN_SYSTEM))
}

/// Elements every shaped resource keeps, whatever the mask.
const ALWAYS: [&str; 3] = ["resourceType", "id", "meta"];
/// Elements hidden whenever identifier systems are hidden: they may repeat the hidden identifier.
const HIDDEN_WITH_IDENTIFIERS: [&str; 2] = ["text", "contained"];

/// The elements one role may see (or write) of one resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldMask {
    /// Allowed element names (choice elements as `value[x]`); `None` = every element.
    elements: Option<BTreeSet<String>>,
    /// Elements removed even when `elements` is `None`.
    hidden: BTreeSet<String>,
    /// Identifiers with one of these systems are removed.
    hidden_identifier_systems: Vec<String>,
    /// Identifier systems the role may write but never see (`write_only_identifier_systems`): hidden in its
    /// read mask, writable in its write mask; recorded on both, for `policy explain` and the write path.
    write_only_identifier_systems: Vec<String>,
    /// Choice elements of the type: (`value`, `value[x]`).
    choices: Vec<(String, String)>,
    /// Mandatory elements of the type, kept under `_elements`.
    mandatory: Vec<String>,
}

impl FieldMask {
    /// Builds a mask. `type_elements` are the type's elements (for its choice elements), `mandatory` its
    /// mandatory ones; `elements` `None` means all.
    pub fn new(
        elements: Option<BTreeSet<String>>,
        hidden_identifier_systems: Vec<String>,
        type_elements: &[String],
        mandatory: Vec<String>,
    ) -> Self {
        let hidden = if hidden_identifier_systems.is_empty() {
            BTreeSet::new()
        } else {
            HIDDEN_WITH_IDENTIFIERS.iter().map(|s| (*s).to_owned()).collect()
        };
        let choices = type_elements
            .iter()
            .filter_map(|e| e.strip_suffix("[x]").map(|stem| (stem.to_owned(), e.clone())))
            .collect();
        Self { elements, hidden, hidden_identifier_systems, choices, mandatory, write_only_identifier_systems: vec![] }
    }

    /// Marks identifier systems as write-only for the role: a read mask must hide them too (the caller
    /// builds it with them among its hidden systems), a write mask lets them be written. Either way `text` and
    /// `contained`, which could repeat such an identifier, are hidden.
    pub fn with_write_only_identifier_systems(mut self, systems: Vec<String>) -> Self {
        if !systems.is_empty() {
            self.hidden.extend(HIDDEN_WITH_IDENTIFIERS.iter().map(|s| (*s).to_owned()));
        }
        self.write_only_identifier_systems = systems;
        self
    }

    /// The identifier systems the role may write but never see.
    pub fn write_only_identifier_systems(&self) -> &[String] {
        &self.write_only_identifier_systems
    }

    /// Whether identifiers of this one's class may be written but never seen by the role.
    pub fn writes_blind(&self, identifier: &Value) -> bool {
        identifier_class(identifier)
            .is_some_and(|c| self.write_only_identifier_systems.iter().any(|w| canonical_system(w) == c))
    }

    /// Every element, nothing hidden (no choice elements known: names are matched exactly).
    pub fn everything() -> Self {
        Self::new(None, Vec::new(), &[], Vec::new())
    }

    /// No element at all (beyond `resourceType`, `id`, `meta`): the mask of a denied decision.
    pub fn nothing() -> Self {
        Self::new(Some(BTreeSet::new()), Vec::new(), &[], Vec::new())
    }

    /// True when the mask removes nothing.
    pub fn is_everything(&self) -> bool {
        self.elements.is_none() && self.hidden.is_empty() && self.hidden_identifier_systems.is_empty()
    }

    /// True when the mask allows no element beyond `resourceType`, `id` and `meta`.
    pub fn is_nothing(&self) -> bool {
        self.elements.as_ref().is_some_and(BTreeSet::is_empty)
    }

    pub fn hidden_identifier_systems(&self) -> &[String] {
        &self.hidden_identifier_systems
    }

    /// Whether the top-level element (JSON key: `birthDate`, `_birthDate`, `valueQuantity`) may be seen
    /// (read mask) or written (write mask). The decryption layer skips elements for which this is false.
    /// `identifier` being allowed does not mean every identifier is: see [`FieldMask::hides_identifier`].
    pub fn allows(&self, element: &str) -> bool {
        let base = element.strip_prefix('_').unwrap_or(element);
        if ALWAYS.contains(&base) {
            return true;
        }
        let name = self.canonical(base);
        if self.hidden.contains(name) {
            return false;
        }
        match &self.elements {
            None => true,
            Some(set) => set.contains(name),
        }
    }

    /// Whether this one identifier (an element of `identifier`) is hidden by its system class
    /// ([`identifier_class`]: spelling variants and the `SS` type included).
    pub fn hides_identifier(&self, identifier: &Value) -> bool {
        identifier_class(identifier).is_some_and(|c| self.hides_class(&c))
    }

    /// Whether identifiers of `system` (any spelling of it) are hidden.
    pub fn hides_system(&self, system: &str) -> bool {
        self.hides_class(&canonical_system(system))
    }

    fn hides_class(&self, class: &str) -> bool {
        self.hidden_identifier_systems.iter().any(|h| canonical_system(h) == class)
    }

    /// Removes what the mask does not allow, and what `_elements` (if given) does not ask for, from a resource.
    /// Returns true, and adds the `SUBSETTED` tag, when anything was removed.
    pub fn shape(&self, resource: &mut Value, elements: Option<&[String]>) -> bool {
        let Some(obj) = resource.as_object_mut() else {
            return false;
        };
        let before = obj.len();
        obj.retain(|key, _| self.allows(key) && self.requested(key, elements));
        let mut removed = obj.len() != before;
        if !self.hidden_identifier_systems.is_empty() {
            removed |= self.filter_identifiers(obj);
        }
        if removed {
            add_subsetted_tag(obj);
        }
        removed
    }

    /// Under `_elements`, whether the key was asked for (or is mandatory, or always kept).
    fn requested(&self, key: &str, elements: Option<&[String]>) -> bool {
        let Some(wanted) = elements else {
            return true;
        };
        let base = key.strip_prefix('_').unwrap_or(key);
        if ALWAYS.contains(&base) {
            return true;
        }
        let name = self.canonical(base);
        self.mandatory.iter().any(|m| m == name) || wanted.iter().any(|w| self.canonical(w.trim()) == name)
    }

    /// Drops hidden identifiers; removes `identifier` when none is left. True when any was dropped.
    fn filter_identifiers(&self, obj: &mut Map<String, Value>) -> bool {
        let Some(Value::Array(ids)) = obj.get_mut("identifier") else {
            return false;
        };
        let before = ids.len();
        ids.retain(|id| !self.hides_identifier(id));
        let removed = ids.len() != before;
        if ids.is_empty() {
            obj.remove("identifier");
        }
        removed
    }

    /// The R4 name of a top-level element a JSON key stands for (`_birthDate` → `birthDate`, `valueQuantity` →
    /// `value[x]`), for error paths: `None` for anything that is not an element name (never echo client text).
    pub fn element_name(&self, key: &str) -> Option<String> {
        let base = key.strip_prefix('_').unwrap_or(key);
        let name = self.canonical(base);
        let plausible = !name.is_empty()
            && name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '[' || c == ']');
        plausible.then(|| name.to_owned())
    }

    /// The element name a JSON key stands for: `valueQuantity` and `value` → `value[x]`; others unchanged.
    fn canonical<'a>(&'a self, key: &'a str) -> &'a str {
        for (stem, full) in &self.choices {
            if let Some(rest) = key.strip_prefix(stem.as_str())
                && (rest.is_empty() || rest == "[x]" || rest.starts_with(|c: char| c.is_ascii_uppercase()))
            {
                return full;
            }
        }
        key
    }

    /// The union of two masks of the same type: an element is allowed if either allows it; an identifier
    /// system is hidden only if both hide it.
    pub fn union(&self, other: &FieldMask) -> FieldMask {
        let elements = match (&self.elements, &other.elements) {
            (Some(a), Some(b)) => Some(a.union(b).cloned().collect()),
            _ => None,
        };
        let systems = self
            .hidden_identifier_systems
            .iter()
            .filter(|s| other.hidden_identifier_systems.contains(s))
            .cloned()
            .collect::<Vec<_>>();
        let hidden = if systems.is_empty() { BTreeSet::new() } else { self.hidden.clone() };
        let choices = if self.choices.is_empty() { other.choices.clone() } else { self.choices.clone() };
        let mandatory = if self.mandatory.is_empty() { other.mandatory.clone() } else { self.mandatory.clone() };
        // Write-only for the union when either role writes it blind and the union still hides it from reading.
        let mut write_only: Vec<String> = self.write_only_identifier_systems.clone();
        for s in &other.write_only_identifier_systems {
            if !write_only.contains(s) {
                write_only.push(s.clone());
            }
        }
        let hidden = if write_only.is_empty() {
            hidden
        } else {
            HIDDEN_WITH_IDENTIFIERS
                .iter()
                .map(|s| (*s).to_owned())
                .collect::<BTreeSet<String>>()
                .union(&hidden)
                .cloned()
                .collect()
        };
        FieldMask {
            elements,
            hidden,
            hidden_identifier_systems: systems,
            choices,
            mandatory,
            write_only_identifier_systems: write_only,
        }
    }

    /// Removes the `SUBSETTED` tag (a client sending back a shaped resource): stored resources are complete.
    pub(crate) fn strip_subsetted_tag(resource: &mut Map<String, Value>) {
        let Some(Value::Object(meta)) = resource.get_mut("meta") else {
            return;
        };
        if let Some(Value::Array(tags)) = meta.get_mut("tag") {
            tags.retain(|t| !is_subsetted(t));
            if tags.is_empty() {
                meta.remove("tag");
            }
        }
        if meta.is_empty() {
            resource.remove("meta");
        }
    }
}

fn is_subsetted(tag: &Value) -> bool {
    tag.get("system").and_then(Value::as_str) == Some(SUBSETTED_SYSTEM)
        && tag.get("code").and_then(Value::as_str) == Some(SUBSETTED_CODE)
}

pub fn add_subsetted_tag(obj: &mut Map<String, Value>) {
    let meta = obj.entry("meta").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    let tags = meta.entry("tag").or_insert_with(|| json!([]));
    if !tags.is_array() {
        *tags = json!([]);
    }
    if let Some(tags) = tags.as_array_mut()
        && !tags.iter().any(is_subsetted)
    {
        tags.push(json!({ "system": SUBSETTED_SYSTEM, "code": SUBSETTED_CODE }));
    }
}

impl fmt::Display for FieldMask {
    /// Plain English, for `policy explain`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.elements {
            None if self.hidden.is_empty() => f.write_str("every element")?,
            None => {
                let hidden: Vec<&str> = self.hidden.iter().map(String::as_str).collect();
                write!(f, "every element except {}", hidden.join(", "))?;
            }
            Some(set) if set.is_empty() => f.write_str("nothing")?,
            Some(set) => {
                let names: Vec<&str> = set.iter().map(String::as_str).collect();
                f.write_str(&names.join(", "))?;
            }
        }
        let never: Vec<&str> = self
            .hidden_identifier_systems
            .iter()
            .filter(|s| !self.write_only_identifier_systems.contains(s))
            .map(String::as_str)
            .collect();
        if !never.is_empty() {
            write!(f, "; never identifiers of system {}", never.join(", "))?;
        }
        if !self.write_only_identifier_systems.is_empty() {
            write!(f, "; identifiers of system {} write-only", self.write_only_identifier_systems.join(", "))?;
        }
        Ok(())
    }
}
