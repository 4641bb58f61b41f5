//! What carevault reads about each resource type from the embedded official R4 JSON schema
//! (`fhir.schema.json`, FHIR 4.0.1): its top-level elements, which of them are variants of a choice element
//! (`valueQuantity`, `valueString`… of `value[x]`), and which the schema requires. Parsed once, on first use.
//!
//! What the schema contains, and so what is derived here rather than declared:
//! - every top-level element of a type (`properties`, without the `_name` extension siblings), including each
//!   typed variant of a choice element;
//! - `required`: the complex, non-choice elements of minimum cardinality 1 (`Observation.code`,
//!   `Encounter.class`, `AuditEvent.agent`…);
//! - choice elements, recognised structurally: the schema generator writes a primitive variant inline (its
//!   type's `pattern` and JSON `type`), whereas a plain primitive element is a `$ref` to the primitive
//!   (`birthDate` → `#/definitions/date`). A variant is a non-array element named `stem` + its type's name
//!   (`effectivePeriod`: a `Period`), inline for a primitive; a choice is a stem with two or more variants.
//!
//! What the schema cannot say: the minimum cardinality of primitives and of choice elements
//! (`Observation.status`, `MedicationRequest.medication[x]` are 1..1, but JSON schema `required` cannot allow
//! `_status` instead of `status`, nor one of several names). Those stay declared by hand in
//! [`ResourceDecl::required`](super::decl::ResourceDecl::required), checked against this model and the
//! official examples.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

/// The official FHIR R4 (4.0.1) JSON schema.
pub(crate) const SCHEMA: &str = include_str!("fhir.schema.json");

/// One top-level element of a resource type, as the schema defines it.
#[derive(Debug)]
pub struct Element {
    /// The JSON property name (`valueQuantity`, `status`).
    pub name: String,
    /// The R4 element name: `stem[x]` for a variant of a choice element (`value[x]`), else `name`.
    pub canonical: String,
    /// 0..* (a JSON array).
    pub array: bool,
    /// In the schema's `required` list (complex, non-choice, minimum cardinality 1).
    pub required: bool,
    /// A primitive data type (its value may be replaced by the `_name` extension sibling).
    pub primitive: bool,
}

impl Element {
    /// Whether this is one typed variant of a choice element.
    pub fn is_choice(&self) -> bool {
        self.canonical != self.name
    }
}

/// The top-level elements of one resource type, sorted by JSON name.
#[derive(Debug)]
pub struct ResourceSchema {
    pub name: String,
    pub elements: Vec<Element>,
}

impl ResourceSchema {
    /// The element with this JSON name (`valueQuantity`, not `value[x]`).
    pub fn element(&self, name: &str) -> Option<&Element> {
        self.elements.iter().find(|e| e.name == name)
    }

    /// The elements with this R4 name: the variants of a choice (`value[x]`), or the one element.
    pub fn named<'a>(&'a self, canonical: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.elements.iter().filter(move |e| e.canonical == canonical)
    }
}

/// Every resource type the schema defines.
#[derive(Debug)]
pub struct Schema {
    types: HashMap<String, ResourceSchema>,
}

impl Schema {
    /// Reads the model out of a parsed FHIR JSON schema.
    pub fn from_value(schema: &Value) -> Result<Self, String> {
        let defs = schema.get("definitions").and_then(Value::as_object).ok_or("the schema has no definitions")?;
        let names = schema
            .pointer("/discriminator/mapping")
            .and_then(Value::as_object)
            .ok_or("the schema has no resource type mapping")?;
        // Primitive types by (pattern, JSON type), to recognise the inline primitive variants of choices.
        let mut primitives: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
        for (name, def) in defs {
            if name.starts_with(|c: char| c.is_ascii_lowercase())
                && let Some(pattern) = def.get("pattern").and_then(Value::as_str)
            {
                let json_type = def.get("type").and_then(Value::as_str).unwrap_or_default();
                primitives.entry((pattern, json_type)).or_default().push(name);
            }
        }
        let mut types = HashMap::new();
        for name in names.keys() {
            let def = defs.get(name).ok_or_else(|| format!("the schema maps {name} but does not define it"))?;
            let props =
                def.get("properties").and_then(Value::as_object).ok_or_else(|| format!("{name} has no properties"))?;
            let required: Vec<&str> =
                def.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
            // (element, variant stem, primitive)
            let mut elements: Vec<(Element, Option<String>)> = Vec::new();
            for (key, prop) in props.iter().filter(|(k, _)| !k.starts_with('_')) {
                let array = prop.get("items").is_some();
                let target = prop.get("items").unwrap_or(prop);
                let reference =
                    target.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/definitions/"));
                let inline = target.get("pattern").and_then(Value::as_str).map(|pattern| {
                    let json_type = target.get("type").and_then(Value::as_str).unwrap_or_default();
                    primitives.get(&(pattern, json_type)).cloned().unwrap_or_default()
                });
                let primitive = match reference {
                    Some(r) => r.starts_with(|c: char| c.is_ascii_lowercase()),
                    // Inline: a primitive (pattern) or a code with a required binding (enum).
                    None => true,
                };
                let variant_types: Vec<&str> = match (reference, &inline) {
                    (_, Some(types)) => types.clone(),
                    (Some(r), None) if !primitive => vec![r],
                    _ => vec![],
                };
                let stem = if array {
                    None
                } else {
                    variant_types.iter().find_map(|t| {
                        let suffix = upper_first(t);
                        key.strip_suffix(&suffix).filter(|s| !s.is_empty()).map(str::to_owned)
                    })
                };
                let element = Element {
                    name: key.clone(),
                    canonical: key.clone(),
                    array,
                    required: required.contains(&key.as_str()),
                    primitive,
                };
                elements.push((element, stem));
            }
            let count = |stem: &str| elements.iter().filter(|(_, s)| s.as_deref() == Some(stem)).count();
            let stems: Vec<Option<String>> =
                elements.iter().map(|(_, s)| s.clone().filter(|stem| count(stem) >= 2)).collect();
            let elements = elements
                .into_iter()
                .zip(stems)
                .map(|((mut e, _), stem)| {
                    if let Some(stem) = stem {
                        e.canonical = format!("{stem}[x]");
                    }
                    e
                })
                .collect();
            types.insert(name.clone(), ResourceSchema { name: name.clone(), elements });
        }
        Ok(Self { types })
    }

    /// The resource type of this exact name.
    pub fn resource(&self, name: &str) -> Option<&ResourceSchema> {
        self.types.get(name)
    }

    /// How many resource types the schema defines.
    pub fn len(&self) -> usize {
        self.types.len()
    }

    /// Whether the schema defines no resource type (never for the embedded one).
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }
}

fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
}

/// The model of the embedded schema, read on first use. `Err` only if the embedded file is unreadable, which
/// the tests rule out; callers fail closed (the validator refuses to start, the element catalog knows no type).
pub fn schema() -> Result<&'static Schema, &'static str> {
    static MODEL: OnceLock<Result<Schema, String>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let value: Value = serde_json::from_str(SCHEMA).map_err(|e| format!("the FHIR schema is not JSON: {e}"))?;
            Schema::from_value(&value)
        })
        .as_ref()
        .map_err(String::as_str)
}

/// The schema of one resource type of the embedded schema.
pub fn resource(name: &str) -> Option<&'static ResourceSchema> {
    schema().ok()?.resource(name)
}
