//! FHIR search, without a database: parsing query pairs into a typed [`SearchRequest`], and extracting from a
//! resource the [`IndexEntry`]s a store keeps so those requests can be answered.
//!
//! Matching model (what the store implements):
//! - string, token, reference: equality. A query value matches when one of its
//!   [`SearchValue::keys`] equals an indexed key of the same parameter. Strings are normalized
//!   ([`normalize_text`]) and indexed as the whole value and as each word, so `name=peter` and
//!   `name=ZOË` match; prefixes (`pet`) do not: whole-word matching, which blind indexes can support.
//! - token keys: a coding with system `s` and code `c` is indexed as `s|c`, `c` and `s|`; without a system as
//!   `|c` and `c`. So `code`, `system|code`, `|code` and `system|` all find it.
//! - date: ranges. Every value is a half-open range `[lo, hi)` of unix seconds (a partial date covers its
//!   whole year, month or day); [`DatePrefix::matches`] gives FHIR's semantics of `eq ge le gt lt`.
//! - several values of one parameter (`a,b`) are OR; repeated parameters are AND.
//!
//! Errors name a declared parameter (or the fixed word `search`) and never repeat a submitted name or value.

use serde_json::Value;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

use super::decl::{ParamKind, ResourceDecl, SearchParamDecl};
use super::normalize::{normalize_text, words};
use crate::error::{AppError, AppResult};

pub const DEFAULT_COUNT: u32 = 20;
pub const MAX_COUNT: u32 = 100;
/// At most this many values (OR) in one parameter, and this many parameters (AND) in one search: every value
/// costs index lookups and, for PHI parameters, a decrypt-and-compare per candidate, so the bounds keep one
/// request from occupying the server (a 20,000-value search took 8.9 s before them). Over either: 400 naming it.
pub const MAX_VALUES_PER_PARAM: usize = 100;
pub const MAX_CLAUSES: usize = 32;
/// The parameter carrying the opaque paging cursor of a `next` link.
pub const CURSOR_PARAM: &str = "_cursor";

/// `Prefer: handling=strict` (the default) or `handling=lenient`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    Strict,
    Lenient,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatePrefix {
    Eq,
    Ge,
    Le,
    Gt,
    Lt,
}

impl DatePrefix {
    /// Whether a resource's value range `[v_lo, v_hi)` matches the parameter range `[p_lo, p_hi)`.
    pub fn matches(self, p_lo: i64, p_hi: i64, v_lo: i64, v_hi: i64) -> bool {
        match self {
            Self::Eq => v_lo >= p_lo && v_hi <= p_hi,
            Self::Ge => v_hi > p_lo,
            Self::Le => v_lo < p_hi,
            Self::Gt => v_hi > p_hi,
            Self::Lt => v_lo < p_lo,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchValue {
    /// A normalized string.
    Text(String),
    /// `system|code`: `system` is `Some("")` for `|code` (no system), `None` for a bare `code`.
    Token { system: Option<String>, code: Option<String> },
    /// A (partial) date as the range `[lo, hi)` in unix seconds, with its comparison prefix.
    Date { prefix: DatePrefix, lo: i64, hi: i64 },
    /// `Type/id` or a bare `id` (any of the parameter's target types).
    Reference { resource_type: Option<String>, id: String },
}

impl SearchValue {
    /// The index keys any one of which this value matches (string, token, reference; empty for dates).
    pub fn keys(&self, param: &SearchParamDecl) -> Vec<String> {
        match self {
            Self::Text(t) => vec![t.clone()],
            Self::Token { system, code } => match (system, code) {
                (None, Some(c)) => vec![c.clone()],
                (Some(s), Some(c)) => vec![format!("{s}|{c}")],
                (Some(s), None) => vec![format!("{s}|")],
                (None, None) => vec![],
            },
            Self::Reference { resource_type: Some(t), id } => vec![format!("{t}/{id}")],
            Self::Reference { resource_type: None, id } => param.targets.iter().map(|t| format!("{t}/{id}")).collect(),
            Self::Date { .. } => vec![],
        }
    }

    /// Whether this value matches one indexed value of the same parameter.
    pub fn matches(&self, param: &SearchParamDecl, indexed: &IndexValue) -> bool {
        match (self, indexed) {
            (Self::Date { prefix, lo, hi }, IndexValue::Date { lo: vlo, hi: vhi }) => {
                prefix.matches(*lo, *hi, *vlo, *vhi)
            }
            (_, IndexValue::Text(k) | IndexValue::Token(k) | IndexValue::Reference(k)) => {
                self.keys(param).iter().any(|q| q == k)
            }
            _ => false,
        }
    }
}

/// One parameter of the query: its values are OR-ed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clause {
    pub param: &'static SearchParamDecl,
    pub values: Vec<SearchValue>,
}

/// A parsed search: clauses are AND-ed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchRequest {
    pub clauses: Vec<Clause>,
    /// Page size, 0..=100 (over 100 is clamped to 100; 0 returns no entries, only the total).
    pub count: u32,
    /// `_elements`: top-level element names to keep (declared names only).
    pub elements: Option<Vec<String>>,
    /// `_summary=count`: the total only.
    pub summary_count: bool,
    /// The opaque cursor from a `next` link.
    pub cursor: Option<String>,
}

/// Parses the query pairs of a search on one type.
pub fn parse(decl: &'static ResourceDecl, pairs: &[(String, String)], handling: Handling) -> AppResult<SearchRequest> {
    let mut req =
        SearchRequest { clauses: vec![], count: DEFAULT_COUNT, elements: None, summary_count: false, cursor: None };
    let unknown = |path: &'static str, reason: &'static str| -> AppResult<()> {
        match handling {
            Handling::Strict => Err(AppError::invalid(path, reason)),
            Handling::Lenient => Ok(()),
        }
    };
    for (name, value) in pairs {
        match name.as_str() {
            "_count" => {
                let n: u32 =
                    value.parse().map_err(|_| AppError::invalid("_count", "The count must be a whole number."))?;
                req.count = n.min(MAX_COUNT);
            }
            "_summary" => match value.as_str() {
                "count" => req.summary_count = true,
                "false" => req.summary_count = false,
                _ => unknown("_summary", "Only _summary=count is supported.")?,
            },
            "_elements" => {
                let mut keep = Vec::new();
                for e in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                    match decl.elements().find(|d| *d == e) {
                        Some(d) => keep.push(d.to_owned()),
                        None => unknown("_elements", "An element is not known for this type.")?,
                    }
                }
                req.elements = Some(keep);
            }
            CURSOR_PARAM => req.cursor = Some(value.clone()),
            "_format" if matches!(value.as_str(), "json" | "application/json" | "application/fhir+json") => {}
            _ => {
                let (base, modifier) = match name.split_once(':') {
                    Some((b, m)) => (b, Some(m)),
                    None => (name.as_str(), None),
                };
                let Some(param) = decl.param(base) else {
                    unknown("search", "A search parameter is not supported for this type.")?;
                    continue;
                };
                if modifier.is_some() {
                    unknown(param.name, "Search modifiers are not supported.")?;
                    continue;
                }
                let raw = split_values(value);
                if raw.len() > MAX_VALUES_PER_PARAM {
                    return Err(AppError::invalid(param.name, "A search parameter has more than 100 values."));
                }
                if req.clauses.len() == MAX_CLAUSES {
                    return Err(AppError::invalid("search", "A search has more than 32 parameters."));
                }
                let values = raw.iter().map(|v| parse_value(param, v)).collect::<AppResult<Vec<_>>>()?;
                req.clauses.push(Clause { param, values });
            }
        }
    }
    Ok(req)
}

/// Splits on unescaped commas and removes FHIR's escapes (`\,` `\|` `\$` `\\`) except `\|`, which
/// [`split_token`] needs.
fn split_values(raw: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('|') => out.last_mut().into_iter().for_each(|s| s.push_str("\\|")),
                Some(n) => out.last_mut().into_iter().for_each(|s| s.push(n)),
                None => out.last_mut().into_iter().for_each(|s| s.push('\\')),
            },
            ',' => out.push(String::new()),
            c => out.last_mut().into_iter().for_each(|s| s.push(c)),
        }
    }
    out
}

fn split_token(v: &str) -> (Option<String>, String) {
    let mut prev = '\0';
    for (i, c) in v.char_indices() {
        if c == '|' && prev != '\\' {
            return (Some(v[..i].replace("\\|", "|")), v[i + 1..].replace("\\|", "|"));
        }
        prev = c;
    }
    (None, v.replace("\\|", "|"))
}

fn parse_value(param: &'static SearchParamDecl, v: &str) -> AppResult<SearchValue> {
    let bad = |reason: &'static str| AppError::invalid(param.name, reason);
    if v.is_empty() {
        return Err(bad("A search value is empty."));
    }
    match param.kind {
        ParamKind::String => {
            let t = normalize_text(v);
            if t.is_empty() { Err(bad("A search value is empty.")) } else { Ok(SearchValue::Text(t)) }
        }
        ParamKind::Token => {
            let (system, code) = split_token(v);
            let code = Some(code).filter(|c| !c.is_empty());
            match (&system, &code) {
                (Some(s), None) if s.is_empty() => Err(bad("A token needs a system or a code.")),
                (None, None) => Err(bad("A search value is empty.")),
                _ => Ok(SearchValue::Token { system, code }),
            }
        }
        ParamKind::Date => {
            let (prefix, rest) = match v.get(..2) {
                Some("eq") => (DatePrefix::Eq, &v[2..]),
                Some("ge") => (DatePrefix::Ge, &v[2..]),
                Some("le") => (DatePrefix::Le, &v[2..]),
                Some("gt") => (DatePrefix::Gt, &v[2..]),
                Some("lt") => (DatePrefix::Lt, &v[2..]),
                Some(p) if p.chars().all(|c| c.is_ascii_lowercase()) => {
                    return Err(bad("Only the prefixes eq, ge, le, gt and lt are supported."));
                }
                _ => (DatePrefix::Eq, v),
            };
            let (lo, hi) = date_range(rest).ok_or_else(|| bad("The value is not a valid date."))?;
            Ok(SearchValue::Date { prefix, lo, hi })
        }
        ParamKind::Reference => {
            let (resource_type, id) = split_reference(v).ok_or_else(|| bad("The value is not a valid reference."))?;
            if let Some(t) = &resource_type
                && !param.targets.contains(&t.as_str())
            {
                return Err(bad("The reference points to a type this parameter does not support."));
            }
            Ok(SearchValue::Reference { resource_type, id })
        }
    }
}

fn is_fhir_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

/// `Type/id`, an absolute URL ending in `Type/id` (optionally `/_history/n`), or a bare `id`.
pub(crate) fn split_reference(v: &str) -> Option<(Option<String>, String)> {
    let v = v.split("/_history/").next().unwrap_or(v);
    let mut parts = v.rsplit('/');
    let id = parts.next().filter(|id| is_fhir_id(id))?;
    match parts.next() {
        None => Some((None, id.to_owned())),
        Some(t)
            if !t.is_empty()
                && t.starts_with(|c: char| c.is_ascii_uppercase())
                && t.chars().all(|c| c.is_ascii_alphabetic()) =>
        {
            Some((Some(t.to_owned()), id.to_owned()))
        }
        Some(_) => None,
    }
}

/// The range `[lo, hi)` in unix seconds covered by a FHIR date, dateTime or instant, possibly partial
/// (`1980`, `1980-04`, `1980-04-12`, `1980-04-12T10:30`, `…:15.5+02:00`). A time without a zone is UTC.
pub fn date_range(s: &str) -> Option<(i64, i64)> {
    let num = |r: std::ops::Range<usize>| -> Option<u16> {
        let part = s.get(r)?;
        if part.chars().all(|c| c.is_ascii_digit()) { part.parse().ok() } else { None }
    };
    let year = i32::from(num(0..4)?);
    let month = |m: u16| Month::try_from(u8::try_from(m).ok()?).ok();
    let midnight = |d: Date| d.midnight().assume_utc().unix_timestamp();
    match s.len() {
        4 => {
            let lo = Date::from_calendar_date(year, Month::January, 1).ok()?;
            let hi = Date::from_calendar_date(year + 1, Month::January, 1).ok()?;
            Some((midnight(lo), midnight(hi)))
        }
        7 if s.as_bytes().get(4) == Some(&b'-') => {
            let m = month(num(5..7)?)?;
            let lo = Date::from_calendar_date(year, m, 1).ok()?;
            let hi = if m == Month::December {
                Date::from_calendar_date(year + 1, Month::January, 1).ok()?
            } else {
                Date::from_calendar_date(year, m.next(), 1).ok()?
            };
            Some((midnight(lo), midnight(hi)))
        }
        n if n >= 10 && s.as_bytes().get(4) == Some(&b'-') && s.as_bytes().get(7) == Some(&b'-') => {
            let date = Date::from_calendar_date(year, month(num(5..7)?)?, u8::try_from(num(8..10)?).ok()?).ok()?;
            if n == 10 {
                let lo = midnight(date);
                return Some((lo, lo + 86_400));
            }
            if s.as_bytes().get(10) != Some(&b'T') || s.as_bytes().get(13) != Some(&b':') {
                return None;
            }
            let (hour, minute) = (u8::try_from(num(11..13)?).ok()?, u8::try_from(num(14..16)?).ok()?);
            let mut rest = &s[16..];
            let mut second = None;
            if let Some(r) = rest.strip_prefix(':') {
                let sec: u8 = r.get(..2).filter(|x| x.chars().all(|c| c.is_ascii_digit()))?.parse().ok()?;
                second = Some(sec.min(59)); // a leap second is the last second of its minute
                rest = &r[2..];
                if let Some(frac) = rest.strip_prefix('.') {
                    let digits = frac.chars().take_while(char::is_ascii_digit).count();
                    if digits == 0 {
                        return None;
                    }
                    rest = &frac[digits..];
                }
            }
            let offset = match rest {
                "" | "Z" => UtcOffset::UTC,
                _ => {
                    let sign: i8 = match rest.as_bytes().first() {
                        Some(b'+') => 1,
                        Some(b'-') => -1,
                        _ => return None,
                    };
                    let hm = rest.get(1..)?;
                    let (h, m) = hm.split_once(':')?;
                    if h.len() != 2 || m.len() != 2 {
                        return None;
                    }
                    UtcOffset::from_hms(sign * h.parse::<i8>().ok()?, sign * m.parse::<i8>().ok()?, 0).ok()?
                }
            };
            let time = Time::from_hms(hour, minute, second.unwrap_or(0)).ok()?;
            let at: OffsetDateTime = PrimitiveDateTime::new(date, time).assume_offset(offset);
            let lo = at.unix_timestamp();
            Some((lo, lo + if second.is_some() { 1 } else { 60 }))
        }
        _ => None,
    }
}

/// What the search index stores for one parameter of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexValue {
    /// A normalized whole string or one normalized word of it.
    Text(String),
    /// A token key (see the module doc).
    Token(String),
    /// A date range `[lo, hi)` in unix seconds; open ends are `i64::MIN` / `i64::MAX`.
    Date { lo: i64, hi: i64 },
    /// `Type/id`, for the parameter's target types only.
    Reference(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub param: &'static str,
    pub value: IndexValue,
}

/// Every index entry of a (valid) resource, de-duplicated per parameter.
pub fn extract_index(decl: &'static ResourceDecl, resource: &Value) -> Vec<IndexEntry> {
    let mut out: Vec<IndexEntry> = Vec::new();
    for param in decl.search {
        let mut values = Vec::new();
        for path in param.paths {
            for node in at_path(resource, path) {
                index_node(param, node, &mut values);
            }
        }
        for value in values {
            let entry = IndexEntry { param: param.name, value };
            if !out.contains(&entry) {
                out.push(entry);
            }
        }
    }
    out
}

/// The values at a dotted path, arrays flattened at every step.
fn at_path<'a>(root: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut nodes = vec![root];
    for key in path.split('.') {
        nodes = nodes.into_iter().filter_map(|n| n.get(key)).flat_map(flatten).collect();
    }
    nodes
}

fn flatten(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(a) => a.iter().collect(),
        v => vec![v],
    }
}

/// Parts of HumanName and Address that string search looks at.
const STRING_PARTS: &[&str] =
    &["text", "family", "given", "prefix", "suffix", "line", "city", "district", "state", "postalCode", "country"];

fn index_node(param: &SearchParamDecl, node: &Value, out: &mut Vec<IndexValue>) {
    match param.kind {
        ParamKind::String => {
            let mut texts = Vec::new();
            collect_strings(node, &mut texts);
            for t in texts {
                let whole = normalize_text(t);
                if !whole.is_empty() {
                    out.push(IndexValue::Text(whole));
                }
                out.extend(words(t).into_iter().map(IndexValue::Text));
            }
        }
        ParamKind::Token => {
            let mut push = |system: Option<&str>, code: Option<&str>| {
                let Some(c) = code.filter(|c| !c.is_empty()) else {
                    return;
                };
                out.push(IndexValue::Token(c.to_owned()));
                match system.filter(|s| !s.is_empty()) {
                    Some(s) => {
                        out.push(IndexValue::Token(format!("{s}|{c}")));
                        out.push(IndexValue::Token(format!("{s}|")));
                    }
                    None => out.push(IndexValue::Token(format!("|{c}"))),
                }
            };
            match node {
                Value::String(code) => push(None, Some(code)),
                Value::Bool(b) => push(None, Some(if *b { "true" } else { "false" })),
                Value::Object(o) => {
                    let system = o.get("system").and_then(Value::as_str);
                    if let Some(codings) = o.get("coding").and_then(Value::as_array) {
                        for c in codings {
                            push(c.get("system").and_then(Value::as_str), c.get("code").and_then(Value::as_str));
                        }
                    }
                    push(system, o.get("code").and_then(Value::as_str));
                    push(system, o.get("value").and_then(Value::as_str));
                }
                _ => {}
            }
        }
        ParamKind::Date => {
            let range = match node {
                Value::String(s) => date_range(s),
                Value::Object(o) => {
                    let start = o.get("start").and_then(Value::as_str).and_then(date_range);
                    let end = o.get("end").and_then(Value::as_str).and_then(date_range);
                    (start.is_some() || end.is_some())
                        .then(|| (start.map_or(i64::MIN, |s| s.0), end.map_or(i64::MAX, |e| e.1)))
                }
                _ => None,
            };
            if let Some((lo, hi)) = range {
                out.push(IndexValue::Date { lo, hi });
            }
        }
        ParamKind::Reference => {
            let target = node.get("reference").and_then(Value::as_str).and_then(split_reference);
            if let Some((Some(t), id)) = target
                && param.targets.contains(&t.as_str())
            {
                out.push(IndexValue::Reference(format!("{t}/{id}")));
            }
        }
    }
}

fn collect_strings<'a>(node: &'a Value, out: &mut Vec<&'a str>) {
    match node {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(o) => {
            for part in STRING_PARTS {
                if let Some(v) = o.get(*part) {
                    collect_strings(v, out);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::*;
    use crate::fhir::decl::decl;
    use serde_json::json;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    }

    fn parse_on(ty: &str, pairs: &[(&str, &str)]) -> AppResult<SearchRequest> {
        parse(decl(ty).unwrap(), &q(pairs), Handling::Strict)
    }

    fn err_path(e: AppError) -> String {
        match e {
            AppError::Invalid { path: Some(p), .. } => p,
            other => panic!("{other:?}"),
        }
    }

    fn ts(s: &str) -> i64 {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap().unix_timestamp()
    }

    #[test]
    fn defaults_and_paging_controls() {
        let r = parse_on("Patient", &[]).unwrap();
        assert_eq!((r.count, r.summary_count, r.elements, r.cursor), (20, false, None, None));
        let r = parse_on(
            "Patient",
            &[("_count", "500"), ("_summary", "count"), ("_cursor", "abc"), ("_elements", "name,gender")],
        )
        .unwrap();
        assert_eq!(r.count, 100);
        assert!(r.summary_count);
        assert_eq!(r.cursor.as_deref(), Some("abc"));
        assert_eq!(r.elements, Some(vec!["name".to_owned(), "gender".to_owned()]));
        assert_eq!(err_path(parse_on("Patient", &[("_count", "many")]).unwrap_err()), "_count");
        assert_eq!(err_path(parse_on("Patient", &[("_elements", "name,secretStuff")]).unwrap_err()), "_elements");
    }

    #[test]
    fn values_and_clauses_are_bounded_and_the_error_names_the_limit() {
        let values = |n: usize| (0..n).map(|i| format!("id{i}")).collect::<Vec<_>>().join(",");
        assert_eq!(
            parse_on("Patient", &[("_id", &values(MAX_VALUES_PER_PARAM))]).unwrap().clauses[0].values.len(),
            100
        );
        let e = parse_on("Patient", &[("_id", &values(MAX_VALUES_PER_PARAM + 1))]).unwrap_err();
        assert!(matches!(&e, AppError::Invalid { reason, .. } if reason.contains("100")), "{e:?}");
        assert!(!format!("{e:?}").contains("id7"));
        assert_eq!(err_path(e), "_id");
        let clauses = |n: usize| (0..n).map(|_| ("gender", "male")).collect::<Vec<_>>();
        assert_eq!(parse_on("Patient", &clauses(MAX_CLAUSES)).unwrap().clauses.len(), MAX_CLAUSES);
        let e = parse_on("Patient", &clauses(MAX_CLAUSES + 1)).unwrap_err();
        assert!(matches!(&e, AppError::Invalid { reason, .. } if reason.contains("32")), "{e:?}");
        assert_eq!(err_path(e), "search");
    }

    #[test]
    fn unknown_parameters_strict_versus_lenient() {
        let pairs = q(&[("shoeSize", "Chalmers"), ("gender", "male")]);
        let e = parse(decl("Patient").unwrap(), &pairs, Handling::Strict).unwrap_err();
        let shown = format!("{e:?}");
        assert!(!shown.contains("shoeSize") && !shown.contains("Chalmers"), "{shown}");
        assert_eq!(err_path(e), "search");
        let r = parse(decl("Patient").unwrap(), &pairs, Handling::Lenient).unwrap();
        assert_eq!(r.clauses.len(), 1);
        assert_eq!(r.clauses[0].param.name, "gender");
        // A parameter of another type is unknown here.
        assert_eq!(err_path(parse_on("Practitioner", &[("birthdate", "1980")]).unwrap_err()), "search");
        assert_eq!(err_path(parse_on("Patient", &[("name:contains", "pet")]).unwrap_err()), "name");
    }

    #[test]
    fn string_values_are_normalized_or_and_and() {
        let r = parse_on("Patient", &[("name", "Zoë,PETER"), ("family", " Chalmers ")]).unwrap();
        assert_eq!(r.clauses.len(), 2);
        assert_eq!(r.clauses[0].values, vec![SearchValue::Text("zoe".into()), SearchValue::Text("peter".into())]);
        assert_eq!(r.clauses[1].values, vec![SearchValue::Text("chalmers".into())]);
        assert_eq!(err_path(parse_on("Patient", &[("name", "")]).unwrap_err()), "name");
    }

    #[test]
    fn token_forms() {
        let r = parse_on("Observation", &[("code", "http://loinc.org|8480-6,8462-4,|x,http://loinc.org|,a\\|b\\,c")])
            .unwrap();
        let p = r.clauses[0].param;
        let keys: Vec<Vec<String>> = r.clauses[0].values.iter().map(|v| v.keys(p)).collect();
        assert_eq!(
            keys,
            vec![vec!["http://loinc.org|8480-6"], vec!["8462-4"], vec!["|x"], vec!["http://loinc.org|"], vec!["a|b,c"]]
        );
        assert_eq!(err_path(parse_on("Observation", &[("code", "|")]).unwrap_err()), "code");
    }

    #[test]
    fn date_prefixes_and_partial_dates() {
        let r = parse_on(
            "Patient",
            &[("birthdate", "1980"), ("birthdate", "ge1980-04"), ("birthdate", "lt1980-04-12T10:30:00+02:00")],
        )
        .unwrap();
        assert_eq!(
            r.clauses[0].values,
            vec![SearchValue::Date {
                prefix: DatePrefix::Eq,
                lo: ts("1980-01-01T00:00:00Z"),
                hi: ts("1981-01-01T00:00:00Z")
            }]
        );
        assert_eq!(
            r.clauses[1].values,
            vec![SearchValue::Date {
                prefix: DatePrefix::Ge,
                lo: ts("1980-04-01T00:00:00Z"),
                hi: ts("1980-05-01T00:00:00Z")
            }]
        );
        assert_eq!(
            r.clauses[2].values,
            vec![SearchValue::Date {
                prefix: DatePrefix::Lt,
                lo: ts("1980-04-12T08:30:00Z"),
                hi: ts("1980-04-12T08:30:01Z")
            }]
        );
        for bad in ["2024-13-45", "2023-02-30", "sa2020", "ne2020", "20x0", "2020-01-01T10"] {
            let e = parse_on("Patient", &[("birthdate", bad)]).unwrap_err();
            assert!(!format!("{e:?}").contains(bad));
            assert_eq!(err_path(e), "birthdate", "{bad}");
        }
    }

    #[test]
    fn date_prefix_semantics() {
        let day = |d: &str| date_range(d).unwrap();
        let (lo, hi) = day("1980-04-12");
        let check = |prefix, q: &str| {
            let (plo, phi) = day(q);
            prefix_matches(prefix, plo, phi, lo, hi)
        };
        fn prefix_matches(p: DatePrefix, a: i64, b: i64, c: i64, d: i64) -> bool {
            p.matches(a, b, c, d)
        }
        assert!(
            check(DatePrefix::Eq, "1980") && check(DatePrefix::Eq, "1980-04") && check(DatePrefix::Eq, "1980-04-12")
        );
        assert!(!check(DatePrefix::Eq, "1980-04-13") && !check(DatePrefix::Eq, "1981"));
        assert!(
            check(DatePrefix::Ge, "1980-04-12")
                && check(DatePrefix::Ge, "1970")
                && !check(DatePrefix::Ge, "1980-04-13")
        );
        assert!(check(DatePrefix::Le, "1980-04-12") && !check(DatePrefix::Le, "1980-04-11"));
        assert!(check(DatePrefix::Gt, "1980-04-11") && !check(DatePrefix::Gt, "1980-04-12"));
        assert!(check(DatePrefix::Lt, "1980-04-13") && !check(DatePrefix::Lt, "1980-04-12"));
    }

    #[test]
    fn references_with_and_without_type() {
        let r =
            parse_on("Observation", &[("subject", "Patient/abc,xyz,https://h/fhir/Patient/p1/_history/2")]).unwrap();
        let p = r.clauses[0].param;
        let keys: Vec<Vec<String>> = r.clauses[0].values.iter().map(|v| v.keys(p)).collect();
        assert_eq!(keys, vec![vec!["Patient/abc"], vec!["Patient/xyz"], vec!["Patient/p1"]]);
        assert_eq!(err_path(parse_on("Observation", &[("patient", "Practitioner/abc")]).unwrap_err()), "patient");
        assert_eq!(err_path(parse_on("Observation", &[("patient", "a b")]).unwrap_err()), "patient");
        let r = parse_on("CareTeam", &[("participant", "pr1")]).unwrap();
        let p = r.clauses[0].param;
        assert_eq!(r.clauses[0].values[0].keys(p), vec!["Practitioner/pr1", "Patient/pr1"]);
    }

    /// Every declared parameter of every type parses a value of its kind.
    #[test]
    fn every_declared_parameter_parses() {
        for d in crate::fhir::decl::all() {
            for p in d.search {
                let v = match p.kind {
                    ParamKind::String => "smith",
                    ParamKind::Token => "http://x.org|c",
                    ParamKind::Date => "ge2020-01",
                    ParamKind::Reference => "abc",
                };
                let r = parse(d, &q(&[(p.name, v)]), Handling::Strict).unwrap();
                assert_eq!(r.clauses[0].param, p);
            }
        }
    }

    fn matching(ty: &str, resource: &Value, pairs: &[(&str, &str)]) -> bool {
        let d = decl(ty).unwrap();
        let index = extract_index(d, resource);
        let req = parse(d, &q(pairs), Handling::Strict).unwrap();
        req.clauses.iter().all(|c| {
            c.values.iter().any(|v| index.iter().any(|e| e.param == c.param.name && v.matches(c.param, &e.value)))
        })
    }

    #[test]
    fn index_extraction_answers_searches() {
        let p = json!({"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1980-04-12",
            "name": [{"use": "official", "family": "Müller-Lüdenscheidt", "given": ["Zoë", "Ann Marie"]}],
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789"}, {"value": "MRN7"}]});
        assert!(matching("Patient", &p, &[("_id", "p1")]));
        assert!(matching("Patient", &p, &[("family", "muller-ludenscheidt")]));
        assert!(matching("Patient", &p, &[("name", "LUDENSCHEIDT"), ("given", "zoe")]));
        assert!(matching("Patient", &p, &[("given", "ann marie")]));
        assert!(!matching("Patient", &p, &[("name", "official")]));
        assert!(!matching("Patient", &p, &[("name", "zo")]));
        assert!(matching("Patient", &p, &[("gender", "male,female")]));
        assert!(!matching("Patient", &p, &[("gender", "male")]));
        assert!(matching("Patient", &p, &[("identifier", "http://hl7.org/fhir/sid/us-ssn|123-45-6789")]));
        assert!(matching("Patient", &p, &[("identifier", "http://hl7.org/fhir/sid/us-ssn|")]));
        assert!(matching("Patient", &p, &[("identifier", "|MRN7")]));
        assert!(!matching("Patient", &p, &[("identifier", "|123-45-6789")]));
        assert!(matching("Patient", &p, &[("birthdate", "1980-04"), ("birthdate", "lt1981")]));
        assert!(!matching("Patient", &p, &[("birthdate", "gt1980-04-12")]));

        let o = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "subject": {"reference": "Patient/p1", "display": "Zoë"},
            "effectivePeriod": {"start": "2024-01-05T10:00:00Z"}});
        assert!(matching("Observation", &o, &[("patient", "p1"), ("code", "8867-4"), ("category", "vital-signs")]));
        assert!(matching("Observation", &o, &[("subject", "Patient/p1"), ("status", "final,amended")]));
        assert!(matching("Observation", &o, &[("date", "ge2024-01-05"), ("date", "gt2030")])); // open end
        assert!(!matching("Observation", &o, &[("date", "lt2024-01-05")]));
        assert!(!matching("Observation", &o, &[("patient", "p2")]));
        let idx = extract_index(decl("Observation").unwrap(), &o);
        assert!(idx.iter().all(|e| e.value != IndexValue::Text("zoe".into())), "display is not indexed");
    }

    #[test]
    fn audit_event_patient_indexes_patient_references_only() {
        let a = json!({"resourceType": "AuditEvent", "action": "R", "recorded": "2024-01-01T00:00:00Z",
            "agent": [{"who": {"reference": "Practitioner/dr1"}, "requestor": true}],
            "entity": [{"what": {"reference": "Patient/p1"}}, {"what": {"reference": "Observation/o1"}}],
            "source": {"observer": {"reference": "Device/x"}}, "type": {"code": "rest"}});
        let idx = extract_index(decl("AuditEvent").unwrap(), &a);
        let refs: Vec<_> = idx.iter().filter(|e| e.param == "patient").collect();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].value, IndexValue::Reference("Patient/p1".into()));
        assert!(matching("AuditEvent", &a, &[("agent", "dr1"), ("action", "R"), ("date", "2024")]));
    }
}
