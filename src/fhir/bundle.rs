//! The Bundles the API returns: `searchset` (search, `$everything`) and `history`. Entries carry
//! `fullUrl` `{base}/{type}/{id}`; resources are given already shaped for the caller.

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

fn links(self_link: &str, next_link: Option<String>) -> Value {
    let mut links = vec![json!({ "relation": "self", "url": self_link })];
    if let Some(next) = next_link {
        links.push(json!({ "relation": "next", "url": next }));
    }
    Value::Array(links)
}

fn full_url(base: &str, resource_type: &str, id: &str) -> String {
    format!("{}/{resource_type}/{id}", base.trim_end_matches('/'))
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// A `searchset` Bundle of full resources (each with `resourceType` and `id`), all with search mode `match`.
pub fn searchset(
    entries: Vec<Value>,
    base: &str,
    self_link: &str,
    next_link: Option<String>,
    total: Option<u64>,
) -> Value {
    let entry: Vec<Value> = entries
        .into_iter()
        .map(|resource| {
            let url = full_url(base, str_of(&resource, "resourceType"), str_of(&resource, "id"));
            json!({ "fullUrl": url, "resource": resource, "search": { "mode": "match" } })
        })
        .collect();
    let mut bundle = json!({ "resourceType": "Bundle", "type": "searchset", "link": links(self_link, next_link) });
    if let Some(t) = total {
        bundle["total"] = json!(t);
    }
    if !entry.is_empty() {
        bundle["entry"] = Value::Array(entry);
    }
    bundle
}

/// What a version in the history was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryMethod {
    Create,
    Update,
    Delete,
}

/// One version of one resource, newest first in a history Bundle.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub resource_type: String,
    pub id: String,
    pub version_id: u64,
    pub last_updated: OffsetDateTime,
    pub method: HistoryMethod,
    /// The version's content (shaped); `None` for a deletion.
    pub resource: Option<Value>,
}

/// A `history` Bundle.
pub fn history(
    entries: Vec<HistoryEntry>,
    base: &str,
    self_link: &str,
    next_link: Option<String>,
    total: Option<u64>,
) -> Value {
    let entry: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            let url = full_url(base, &e.resource_type, &e.id);
            let (method, request_url, status) = match e.method {
                HistoryMethod::Create => ("POST", e.resource_type.clone(), "201 Created"),
                HistoryMethod::Update => ("PUT", format!("{}/{}", e.resource_type, e.id), "200 OK"),
                HistoryMethod::Delete => ("DELETE", format!("{}/{}", e.resource_type, e.id), "204 No Content"),
            };
            let mut response = json!({ "status": status, "etag": format!("W/\"{}\"", e.version_id) });
            if let Ok(when) = e.last_updated.format(&Rfc3339) {
                response["lastModified"] = json!(when);
            }
            let mut out =
                json!({ "fullUrl": url, "request": { "method": method, "url": request_url }, "response": response });
            if let Some(r) = e.resource {
                out["resource"] = r;
            }
            out
        })
        .collect();
    let mut bundle = json!({ "resourceType": "Bundle", "type": "history", "link": links(self_link, next_link) });
    if let Some(t) = total {
        bundle["total"] = json!(t);
    }
    if !entry.is_empty() {
        bundle["entry"] = Value::Array(entry);
    }
    bundle
}
