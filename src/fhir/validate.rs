//! FHIR R4 validation of every write, and of every resource or Bundle the API returns.
//!
//! The official R4 JSON schema (embedded, compiled once by [`FhirValidator::new`]) checks cardinalities, data
//! types, required bindings (gender, status...) and rejects unknown elements. On top of it this module checks
//! what the schema cannot: `resourceType` matching the URL, nesting depth and size limits (before the schema
//! runs), real calendar dates (`2023-02-30` passes the schema's pattern), 1..1 primitives declared in
//! [`ResourceDecl::required`](super::decl::ResourceDecl::required) (primitives and choices), and no client-set
//! `meta.security`.
//!
//! Server-owned elements: `id`, `meta.versionId` and `meta.lastUpdated` are overwritten by the caller with
//! [`stamp`]; a client's values for them are accepted and ignored. `meta.security` from a client is rejected.
//!
//! Errors name the FHIR path of the first failing element (`Patient.name[0].given[1]`) with a fixed reason.
//! They never contain a submitted value: the schema library's messages (which quote values) are never used.

use std::collections::HashMap;

use jsonschema::ValidationError;
use jsonschema::error::ValidationErrorKind;
use jsonschema::paths::LocationSegment;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::decl;
use crate::error::{AppError, AppResult};

use super::schema::SCHEMA;

/// Deepest nesting of objects and arrays accepted in one resource (the resource itself is depth 1).
pub const MAX_DEPTH: usize = 32;
/// Most JSON values (objects, arrays, scalars) accepted in one written resource.
pub const MAX_NODES: usize = 20_000;

/// The schema-typed kind of an element, for the checks the schema cannot make.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ElemType {
    Date,
    /// `integer`, `positiveInt` or `unsignedInt`, by the least value allowed: the schema types them as
    /// `number` (its `pattern` applies to strings only), so `1.0`, `1e2` or `2147483648` pass it. The number's
    /// text as the client wrote it (serde_json `arbitrary_precision`) must be an integer literal in range.
    Integer(i64),
    /// A complex type or backbone element, by definition name.
    Object(String),
    /// Any resource (`contained`, `Bundle.entry.resource`): the definition is named by its `resourceType`.
    Resource,
    Other,
}

/// Compiled once at startup; share it behind an `Arc`.
pub struct FhirValidator {
    /// One validator for any resource: the schema with its 146-way `ResourceList` `oneOf` turned into a
    /// dispatch on `resourceType` (same meaning, since each type fixes its `resourceType`), so an error
    /// points into the resource, also inside `contained` and Bundle entries, and validation stays cheap.
    validator: jsonschema::Validator,
    /// definition name → element name → kind.
    types: HashMap<String, HashMap<String, ElemType>>,
    /// Resource type names the schema defines (its discriminator mapping).
    resource_types: Vec<String>,
}

impl std::fmt::Debug for FhirValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FhirValidator").field("resource_types", &self.resource_types.len()).finish()
    }
}

impl FhirValidator {
    /// Parses and compiles the embedded schema. Takes around a second: call once.
    pub fn new() -> AppResult<Self> {
        let schema: Value = serde_json::from_str(SCHEMA).map_err(AppError::internal)?;
        let defs = schema
            .get("definitions")
            .and_then(Value::as_object)
            .ok_or_else(|| AppError::internal("FHIR schema has no definitions"))?;
        let resource_types: Vec<String> = schema
            .pointer("/discriminator/mapping")
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let date_patterns: Vec<&str> = ["date", "dateTime", "instant"]
            .iter()
            .filter_map(|d| defs.get(*d).and_then(|v| v.get("pattern")).and_then(Value::as_str))
            .collect();
        // (pattern of the integer type, least value): choice variants (`valueInteger`) are written inline.
        let integer_patterns: Vec<(&str, i64)> =
            INTEGER_TYPES.iter().filter_map(|(d, min)| Some((defs.get(*d)?.get("pattern")?.as_str()?, *min))).collect();
        let kind_of = |prop: &Value| -> ElemType {
            let target = prop.get("items").unwrap_or(prop);
            if let Some(name) =
                target.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/definitions/"))
            {
                if let Some((_, min)) = INTEGER_TYPES.iter().find(|(t, _)| *t == name) {
                    return ElemType::Integer(*min);
                }
                return match name {
                    "date" | "dateTime" | "instant" => ElemType::Date,
                    "ResourceList" => ElemType::Resource,
                    _ if defs.get(name).is_some_and(|d| d.get("properties").is_some()) => {
                        ElemType::Object(name.to_owned())
                    }
                    _ => ElemType::Other,
                };
            }
            match target.get("pattern").and_then(Value::as_str) {
                Some(p) if date_patterns.contains(&p) => ElemType::Date,
                Some(p) => match integer_patterns.iter().find(|(ip, _)| *ip == p) {
                    Some((_, min)) => ElemType::Integer(*min),
                    None => ElemType::Other,
                },
                _ => ElemType::Other,
            }
        };
        let types = defs
            .iter()
            .filter_map(|(name, def)| {
                let props = def.get("properties")?.as_object()?;
                let map = props
                    .iter()
                    .filter_map(|(k, v)| match kind_of(v) {
                        ElemType::Other => None,
                        kind => Some((k.clone(), kind)),
                    })
                    .collect();
                Some((name.clone(), map))
            })
            .collect();
        let root = dispatching_schema(schema, &resource_types)?;
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft7)
            .build(&root)
            .map_err(|e| AppError::internal(format!("FHIR schema does not compile: {e}")))?;
        // Every declaration names only elements the schema defines: otherwise the server does not start.
        decl::check().map_err(|e| AppError::internal(format!("resource declarations: {e}")))?;
        Ok(Self { validator, types, resource_types })
    }

    /// Validates a resource a client writes to `/fhir/{resource_type}`.
    pub fn validate(&self, resource_type: &str, resource: &Value) -> AppResult<()> {
        let decl = decl::decl(resource_type).ok_or_else(|| AppError::invalid("resourceType", UNSUPPORTED_TYPE))?;
        let obj = resource.as_object().ok_or_else(|| AppError::invalid(resource_type, NOT_OBJECT))?;
        if obj.get("resourceType").and_then(Value::as_str) != Some(resource_type) {
            return Err(AppError::invalid(format!("{resource_type}.resourceType"), WRONG_TYPE));
        }
        check_limits(resource, resource_type)?;
        if resource.pointer("/meta/security").is_some() {
            return Err(AppError::invalid(format!("{resource_type}.meta.security"), SERVER_SECURITY));
        }
        self.check(resource_type, resource)?;
        for element in decl.required {
            // A primitive by its value or its `_x` extension sibling; a choice (`medication[x]`) by any variant.
            if !decl.variants(element).any(|v| obj.contains_key(v) || obj.contains_key(&format!("_{v}"))) {
                return Err(AppError::invalid(format!("{resource_type}.{element}"), REQUIRED));
            }
        }
        Ok(())
    }

    /// Validates any resource the API returns (a served type, Bundle, CapabilityStatement, OperationOutcome...)
    /// against the schema and the calendar; no write-only rules.
    pub fn validate_output(&self, resource: &Value) -> AppResult<()> {
        let rt = resource.get("resourceType").and_then(Value::as_str).unwrap_or_default();
        if !self.resource_types.iter().any(|t| t == rt) {
            return Err(AppError::invalid("resourceType", UNSUPPORTED_TYPE));
        }
        self.check(rt, resource)
    }

    fn check(&self, resource_type: &str, resource: &Value) -> AppResult<()> {
        self.validator.validate(resource).map_err(|e| schema_error(resource_type, &e))?;
        let mut path = resource_type.to_owned();
        self.check_values(resource_type, resource, &mut path)
    }

    /// Walks the resource with its schema types and checks every date, dateTime and instant is on the calendar
    /// and every integer is an integer literal in its type's range.
    fn check_values(&self, def: &str, value: &Value, path: &mut String) -> AppResult<()> {
        let (Some(props), Some(obj)) = (self.types.get(def), value.as_object()) else {
            return Ok(());
        };
        for (key, child) in obj {
            let Some(kind) = props.get(key) else { continue };
            let items: Vec<(Option<usize>, &Value)> = match child {
                Value::Array(a) => a.iter().enumerate().map(|(i, v)| (Some(i), v)).collect(),
                v => vec![(None, v)],
            };
            for (index, item) in items {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                if let Some(i) = index {
                    path.push_str(&format!("[{i}]"));
                }
                match kind {
                    ElemType::Date => {
                        if item.as_str().is_some_and(|s| !is_calendar_date(s)) {
                            return Err(AppError::invalid(path.clone(), BAD_DATE));
                        }
                    }
                    ElemType::Integer(min) => {
                        if let Value::Number(n) = item
                            && !is_integer_literal(&n.to_string(), *min)
                        {
                            return Err(AppError::invalid(path.clone(), BAD_INTEGER));
                        }
                    }
                    ElemType::Object(name) => self.check_values(name, item, path)?,
                    ElemType::Resource => {
                        if let Some(rt) = item.get("resourceType").and_then(Value::as_str) {
                            self.check_values(rt, item, path)?;
                        }
                    }
                    ElemType::Other => {}
                }
                path.truncate(len);
            }
        }
        Ok(())
    }
}

/// The official schema, rewritten: `ResourceList` dispatches on `resourceType` (draft-07 `if`/`then`)
/// instead of trying every type (`oneOf`), and the root is `ResourceList`.
fn dispatching_schema(mut schema: Value, resource_types: &[String]) -> AppResult<Value> {
    let branches: Vec<Value> = resource_types
        .iter()
        .map(|t| {
            serde_json::json!({
                "if": { "properties": { "resourceType": { "const": t } } },
                "then": { "$ref": format!("#/definitions/{t}") }
            })
        })
        .collect();
    let list = serde_json::json!({
        "type": "object",
        "required": ["resourceType"],
        "properties": { "resourceType": { "enum": resource_types } },
        "allOf": branches
    });
    let obj = schema.as_object_mut().ok_or_else(|| AppError::internal("FHIR schema is not an object"))?;
    obj.remove("oneOf");
    obj.remove("discriminator");
    obj.remove("id");
    obj.insert("$schema".into(), Value::String("http://json-schema.org/draft-07/schema#".into()));
    obj.insert("$ref".into(), Value::String("#/definitions/ResourceList".into()));
    let defs = obj
        .get_mut("definitions")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| AppError::internal("FHIR schema has no definitions"))?;
    defs.insert("ResourceList".into(), list);
    Ok(schema)
}

/// Sets the server-owned elements of a resource about to be stored: `id`, `meta.versionId`,
/// `meta.lastUpdated` (replacing whatever the client sent; other `meta` elements are kept).
pub fn stamp(resource: &mut Value, id: &str, version_id: u64, last_updated: OffsetDateTime) -> AppResult<()> {
    let when = last_updated.format(&Rfc3339).map_err(AppError::internal)?;
    let obj = resource.as_object_mut().ok_or_else(|| AppError::invalid("resourceType", NOT_OBJECT))?;
    obj.insert("id".into(), Value::String(id.to_owned()));
    let meta = obj.entry("meta").or_insert_with(|| Value::Object(Default::default()));
    if !meta.is_object() {
        *meta = Value::Object(Default::default());
    }
    if let Some(m) = meta.as_object_mut() {
        m.insert("versionId".into(), Value::String(version_id.to_string()));
        m.insert("lastUpdated".into(), Value::String(when));
    }
    Ok(())
}

const UNSUPPORTED_TYPE: &str = "The resource type is not supported.";
const NOT_OBJECT: &str = "The resource must be a JSON object.";
const WRONG_TYPE: &str = "The resourceType does not match the type in the URL.";
const SERVER_SECURITY: &str = "Security labels are assigned by the server.";
const REQUIRED: &str = "A required element is missing.";
const BAD_DATE: &str = "The value is not a valid calendar date.";
const BAD_INTEGER: &str = "The value is not an integer in the range of its data type.";

/// The R4 integer types and the least value of each; all are 32-bit (at most 2,147,483,647).
const INTEGER_TYPES: [(&str, i64); 3] = [("integer", i32::MIN as i64), ("unsignedInt", 0), ("positiveInt", 1)];

/// Whether a JSON number's text is an integer literal (`-?(0|[1-9][0-9]*)`: no fraction, no exponent) between
/// `min` and 2,147,483,647.
fn is_integer_literal(text: &str, min: i64) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let literal =
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && (digits == "0" || !digits.starts_with('0'));
    literal && text.parse::<i64>().is_ok_and(|v| (min..=i64::from(i32::MAX)).contains(&v))
}
const TOO_DEEP: &str = "The resource is nested too deeply.";
const TOO_LARGE: &str = "The resource has too many elements.";

/// Depth and size limits, checked iteratively before anything recursive looks at the document.
fn check_limits(resource: &Value, resource_type: &str) -> AppResult<()> {
    let mut stack = vec![(resource, 1usize)];
    let mut nodes = 0usize;
    while let Some((v, depth)) = stack.pop() {
        nodes += 1;
        if nodes > MAX_NODES {
            return Err(AppError::invalid(resource_type, TOO_LARGE));
        }
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Object(o) => Box::new(o.values()),
            Value::Array(a) => Box::new(a.iter()),
            _ => continue,
        };
        if depth >= MAX_DEPTH {
            return Err(AppError::invalid(resource_type, TOO_DEEP));
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    Ok(())
}

/// Whether a FHIR date/dateTime/instant (already matching the schema's pattern) names a real day.
pub(crate) fn is_calendar_date(s: &str) -> bool {
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<u16>().ok());
    match (num(0..4), s.len() >= 7, s.len() >= 10) {
        (Some(_), false, _) => true,
        (Some(_), true, false) => num(5..7).is_some_and(|m| (1..=12).contains(&m)),
        (Some(y), true, true) => match (num(5..7), num(8..10)) {
            (Some(m), Some(d)) => time::Month::try_from(m as u8)
                .ok()
                .and_then(|m| time::Date::from_calendar_date(i32::from(y), m, d as u8).ok())
                .is_some(),
            _ => false,
        },
        _ => false,
    }
}

/// Maps a schema error to the FHIR path of the element and a fixed reason. The error's own message quotes
/// the submitted value and is never used.
fn schema_error(resource_type: &str, e: &ValidationError<'_>) -> AppError {
    let mut path = resource_type.to_owned();
    for seg in e.instance_path().segments() {
        match seg {
            LocationSegment::Property(p) => {
                path.push('.');
                path.push_str(&p);
            }
            LocationSegment::Index(i) => path.push_str(&format!("[{i}]")),
        }
    }
    let reason = match e.kind() {
        ValidationErrorKind::Required { property } => {
            if let Some(name) = property.as_str() {
                path.push('.');
                path.push_str(name);
            }
            REQUIRED
        }
        ValidationErrorKind::AdditionalProperties { .. } => {
            // The unknown name is client-chosen (it can carry PHI: `Patient.zyxwvutqanary`): the error names the
            // known element that holds it, never the name itself.
            "The element is not known for this type."
        }
        ValidationErrorKind::Type { .. } => "The element has the wrong data type.",
        ValidationErrorKind::Pattern { .. } => "The value does not have the format of its data type.",
        ValidationErrorKind::Enum { .. } | ValidationErrorKind::Constant { .. } => {
            "The code is not in the required value set."
        }
        ValidationErrorKind::OneOfNotValid { .. }
        | ValidationErrorKind::OneOfMultipleValid { .. }
        | ValidationErrorKind::AnyOf { .. } => "The element does not match any allowed type.",
        _ => "The element is not valid.",
    };
    AppError::invalid(path, reason)
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::OnceLock;

    pub(crate) fn validator() -> &'static FhirValidator {
        static V: OnceLock<FhirValidator> = OnceLock::new();
        V.get_or_init(|| FhirValidator::new().unwrap())
    }

    /// Asserts the write is rejected, naming `path`, and that the error never carries `secret`.
    fn rejects(rt: &str, body: Value, path: &str, secret: &str) {
        let err = validator().validate(rt, &body).unwrap_err();
        let AppError::Invalid { path: Some(p), reason } = &err else { panic!("{err:?}") };
        assert_eq!(p, path);
        let shown = format!("{err:?} {err}");
        assert!(!secret.is_empty() && !shown.contains(secret), "{shown}");
        assert!(!reason.contains(secret));
    }

    fn patient() -> Value {
        json!({"resourceType": "Patient", "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
               "gender": "male", "birthDate": "1974-12-25"})
    }

    #[test]
    fn accepts_a_plain_patient() {
        validator().validate("Patient", &patient()).unwrap();
    }

    #[test]
    fn rejects_wrong_types_and_formats_by_path_only() {
        let mut p = patient();
        p["birthDate"] = json!("2024-13-45");
        rejects("Patient", p, "Patient.birthDate", "2024-13-45");
        let mut p = patient();
        p["birthDate"] = json!("2023-02-30");
        rejects("Patient", p, "Patient.birthDate", "2023-02-30");
        let mut p = patient();
        p["name"][0]["given"][1] = json!(4711);
        rejects("Patient", p, "Patient.name[0].given[1]", "4711");
        let mut p = patient();
        p["gender"] = json!("martian");
        rejects("Patient", p, "Patient.gender", "martian");
        let mut p = patient();
        p["name"] = json!({"family": "Solo"});
        rejects("Patient", p, "Patient.name", "Solo");
    }

    #[test]
    fn integers_are_integer_literals_in_range_and_decimals_keep_their_text() {
        let obs = |value: &str| -> Value {
            serde_json::from_str(&format!(
                r#"{{"resourceType":"Observation","status":"final","code":{{"text":"n"}},{value}}}"#
            ))
            .unwrap()
        };
        for ok in ["0", "-0", "7", "-2147483648", "2147483647"] {
            validator().validate("Observation", &obs(&format!(r#""valueInteger":{ok}"#))).unwrap();
        }
        for bad in ["1.0", "1e2", "1E0", "2147483648", "-2147483649", "12345678901234567890"] {
            rejects("Observation", obs(&format!(r#""valueInteger":{bad}"#)), "Observation.valueInteger", bad);
        }
        // positiveInt / unsignedInt by their ranges, also where the schema names the type by reference.
        let range = r#""valueSampledData":{"origin":{"value":1},"period":1,"dimensions":DIM}"#;
        validator().validate("Observation", &obs(&range.replace("DIM", "3"))).unwrap();
        for bad in ["0", "-1", "2.5"] {
            rejects("Observation", obs(&range.replace("DIM", bad)), "Observation.valueSampledData.dimensions", bad);
        }
        // A decimal element takes any JSON number, and its digits are what is kept (serde_json writes an exponent
        // as `e` with its sign: `1E2` is kept as `1e+2`, same digits, same precision).
        for (d, kept) in [
            ("5.10", "5.10"),
            ("1.0", "1.0"),
            ("-0.000", "-0.000"),
            ("0.1000000000000000055511151231257827", "0.1000000000000000055511151231257827"),
            ("1e2", "1e+2"),
            ("1E-7", "1e-7"),
            ("1.50E+400", "1.50e+400"),
        ] {
            let v = obs(&format!(r#""valueQuantity":{{"value":{d}}}"#));
            validator().validate("Observation", &v).unwrap();
            assert_eq!(v["valueQuantity"]["value"].to_string(), kept);
            assert!(v.to_string().contains(&format!(r#""value":{kept}}}"#)), "{v}");
        }
        assert!(is_integer_literal("0", 0) && !is_integer_literal("00", 0) && !is_integer_literal("-", i64::MIN));
        assert!(!is_integer_literal("0", 1) && !is_integer_literal("+1", 0) && !is_integer_literal("", 0));
    }

    #[test]
    fn rejects_unknown_elements() {
        let mut p = patient();
        p["favouriteColour"] = json!("Vermilion");
        rejects("Patient", p, "Patient", "favouriteColour");
        let mut p = patient();
        p["name"][0]["zyxwvutqanary"] = json!("Vermilion");
        rejects("Patient", p, "Patient.name[0]", "zyxwvutqanary");
        let mut p = patient();
        p["name"][0]["John Smith 123-45-6789"] = json!(true);
        rejects("Patient", p, "Patient.name[0]", "John Smith");
    }

    #[test]
    fn rejects_resource_type_mismatch_and_unserved_types() {
        rejects("Observation", patient(), "Observation.resourceType", "Chalmers");
        rejects("Medication", patient(), "resourceType", "Chalmers");
        rejects("Patient", json!(["Chalmers"]), "Patient", "Chalmers");
    }

    #[test]
    fn dates_inside_nested_and_choice_elements_are_checked() {
        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient/a"}, "effectivePeriod": {"start": "2023-02-29T10:00:00Z"}});
        rejects("Observation", obs, "Observation.effectivePeriod.start", "2023-02-29");
        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "effectiveDateTime": "2024-02-29T23:59:60+01:00", "valueDateTime": "2021-04-31"});
        rejects("Observation", obs, "Observation.valueDateTime", "2021-04-31");
        let mut p = patient();
        p["contained"] = json!([{"resourceType": "Practitioner", "birthDate": "1990-06-31"}]);
        rejects("Patient", p, "Patient.contained[0].birthDate", "1990-06-31");
        let mut p = patient();
        p["extension"] = json!([{"url": "http://x.org/e", "valueDate": "2001-11-31"}]);
        rejects("Patient", p, "Patient.extension[0].valueDate", "2001-11-31");
    }

    #[test]
    fn rejects_missing_required_primitive_and_required_complex() {
        rejects(
            "Observation",
            json!({"resourceType": "Observation", "code": {"text": "Glucose"}}),
            "Observation.status",
            "Glucose",
        );
        rejects(
            "Observation",
            json!({"resourceType": "Observation", "status": "final", "note": [{"text": "Glucose"}]}),
            "Observation.code",
            "Glucose",
        );
        let ok = json!({"resourceType": "Observation", "_status": {"extension": [{"url": "http://x.org/e", "valueString": "s"}]},
            "code": {"text": "Glucose"}});
        validator().validate("Observation", &ok).unwrap();
    }

    #[test]
    fn rejects_nesting_beyond_the_limit_and_client_security_labels() {
        let mut deep = json!("Chalmers");
        for _ in 0..MAX_DEPTH {
            deep = json!([deep]);
        }
        let mut p = patient();
        p["extension"] = deep;
        rejects("Patient", p, "Patient", "Chalmers");
        let mut p = patient();
        p["meta"] = json!({"security": [{"system": "http://x.org", "code": "Chalmers"}]});
        rejects("Patient", p, "Patient.meta.security", "Chalmers");
        let many: Vec<Value> = (0..MAX_NODES).map(|i| json!(i.to_string())).collect();
        let mut p = patient();
        p["name"][0]["given"] = Value::Array(many);
        rejects("Patient", p, "Patient", "Chalmers");
    }

    #[test]
    fn calendar_dates() {
        for ok in ["2024", "2024-02", "2024-02-29", "2023-12-31T23:59:60Z", "0001-01-01"] {
            assert!(is_calendar_date(ok), "{ok}");
        }
        for bad in ["2023-02-29", "2024-04-31", "2024-13", "2024-00-10", "x"] {
            assert!(!is_calendar_date(bad), "{bad}");
        }
    }

    #[test]
    fn stamp_overwrites_server_owned_elements_only() {
        let mut p = patient();
        p["id"] = json!("client-id");
        p["meta"] = json!({"versionId": "99", "lastUpdated": "1999-01-01T00:00:00Z", "tag": [{"code": "t"}]});
        stamp(&mut p, "abc", 3, time::macros::datetime!(2026-01-02 03:04:05 UTC)).unwrap();
        assert_eq!(p["id"], "abc");
        assert_eq!(p["meta"]["versionId"], "3");
        assert_eq!(p["meta"]["lastUpdated"], "2026-01-02T03:04:05Z");
        assert_eq!(p["meta"]["tag"][0]["code"], "t");
        validator().validate_output(&p).unwrap();
    }
}
