//! `GET /openapi.json` (CONTRACT §5b), locked by a snapshot: the served document must equal
//! `tests/fixtures/openapi.json` once its host-dependent part (the server's base URL, with its port) is
//! replaced by `https://carevault.example`.
//!
//! After an intended change to the API, rewrite the snapshot and review the diff:
//!
//! ```sh
//! CAREVAULT_BLESS=1 cargo test --test api openapi::
//! git diff tests/fixtures/openapi.json
//! ```

use crate::both_backends;
use crate::helpers::TestApp;
use carevault::api::openapi::{Method, ROUTES};
use serde_json::Value;
use std::path::PathBuf;

const PLACEHOLDER: &str = "https://carevault.example";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openapi.json")
}

/// The served document with the server's own base URL replaced by [`PLACEHOLDER`], pretty-printed.
async fn served(app: &TestApp) -> (String, Value) {
    let r = app.client.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), 200, "served without authentication");
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let text = r.text().await.unwrap();
    let normalised = text.replace(&app.state.config.base_url(), PLACEHOLDER);
    assert!(!normalised.contains(&format!(":{}", app.port)), "a host-dependent part was not normalised");
    let doc: Value = serde_json::from_str(&normalised).unwrap();
    (serde_json::to_string_pretty(&doc).unwrap() + "\n", doc)
}

fn assert_openapi_3_1(doc: &Value) {
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    assert_eq!(doc["servers"][0]["url"], PLACEHOLDER);
    let paths = doc["paths"].as_object().expect("paths");
    for (path, item) in paths {
        assert!(path.starts_with('/'), "{path}");
        for (method, op) in item.as_object().unwrap() {
            assert!(["get", "post", "put", "patch", "delete"].contains(&method.as_str()), "{path} {method}");
            let responses = op["responses"].as_object().unwrap_or_else(|| panic!("{path} {method}: responses"));
            assert!(!responses.is_empty(), "{path} {method}");
            // Every path template parameter is declared.
            for name in path.split('{').skip(1).filter_map(|s| s.split('}').next()) {
                let declared = op["parameters"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["name"] == name && p["in"] == "path"));
                assert!(declared, "{path} {method}: path parameter {name}");
            }
        }
    }
    // Every $ref resolves to a component.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = vec![];
    refs(doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let pointer = r.strip_prefix('#').expect("local reference");
        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
    }
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["type"], "http");
    assert_eq!(schemes["bearer"]["bearerFormat"], "JWT");
    assert_eq!(schemes["smart"]["type"], "oauth2");
    assert!(schemes["smart"]["flows"]["authorizationCode"]["tokenUrl"].is_string());
}

/// Every route of the table (and so of `routes()`, which a unit test compares with it) is in the document:
/// FHIR templates once per served type, writes only for the types clients may write.
fn assert_every_route(doc: &Value) {
    let paths = doc["paths"].as_object().unwrap();
    for (method, template) in ROUTES {
        let m = method.as_str();
        if template.contains("{type}") {
            let writes = matches!(method, Method::Put | Method::Patch | Method::Delete)
                || (*method == Method::Post && !template.ends_with("_search"));
            for d in carevault::fhir::decl::all() {
                let path = template.replace("{type}", d.name);
                let present = paths.get(&path).is_some_and(|item| item[m].is_object());
                assert_eq!(present, !(writes && d.read_only), "{m} {path}");
            }
        } else {
            assert!(paths.get(*template).is_some_and(|item| item[m].is_object()), "{m} {template} is not documented");
        }
    }
}

both_backends!(openapi_document_matches_the_snapshot, |app: TestApp| async move {
    let (text, doc) = served(&app).await;
    assert_openapi_3_1(&doc);
    assert_every_route(&doc);
    let path = fixture();
    if std::env::var("CAREVAULT_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "the served /openapi.json differs from tests/fixtures/openapi.json; if the change is intended, run \
         `CAREVAULT_BLESS=1 cargo test --test api openapi::` and review the diff"
    );
    // No PHI, no secret: the document is the same on a server full of data, and names no account.
    for word in ["password\":\"", "demo-", "BEGIN "] {
        assert!(!text.contains(word), "{word}");
    }
});
