//! Encryption at rest (CONTRACT §6): a raw scan of the database (SQLite file with its WAL and shared-memory
//! files; a `pg_dump` of PostgreSQL) finds no canary in plaintext or base64; a ciphertext moved to another row
//! or element fails closed with a generic 500 and a decrypt-failure alert; a wrong master key is refused at
//! start; blind indexes hold short hex only.

use crate::both_backends;
use crate::helpers::{Backend, TestApp, policy_dir};
use carevault::store::schema::{alerts, resources, search_index};
use diesel::prelude::*;
use serde_json::{Value, json};

const CANARIES: &[&str] = &[
    "Vexmoorland",
    "Quillabeth",
    "Canarywharf Lane",
    "Zantheville",
    "quillabeth.vex@example.org",
    "555-867-5309",
    "1931-02-03",
    "MRN-CANARY-55813",
    "Glimmerquartz assay",
    "GLIMQ-4471",
    "Frobnicated spleen",
    "xylophone-garden fears",
    "OBS-CANARY-7731",
    "Peppercorn-Snuffle",
];

fn canary_patient() -> Value {
    json!({"resourceType":"Patient",
        "name":[{"family":"Vexmoorland","given":["Quillabeth"]},{"use":"old","family":"Peppercorn-Snuffle"}],
        "birthDate":"1931-02-03","gender":"female",
        "address":[{"line":["42 Canarywharf Lane"],"city":"Zantheville","state":"IL"}],
        "telecom":[{"system":"phone","value":"555-867-5309"},{"system":"email","value":"quillabeth.vex@example.org"}],
        "identifier":[{"system":"urn:mrn","value":"MRN-CANARY-55813"}]})
}

/// Every form a canary could take in stored bytes: itself, and its base64 (standard and URL-safe) at each of
/// the three alignments it can have inside a longer encoded value (only the characters it alone determines).
fn forms(canary: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let mut out = vec![canary.as_bytes().to_vec()];
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for shift in 0..3usize {
            let mut bytes = vec![0u8; shift];
            bytes.extend_from_slice(canary.as_bytes());
            let enc = engine.encode(&bytes);
            let start = (shift * 8).div_ceil(6);
            let end = (bytes.len() * 8) / 6;
            out.push(enc.as_bytes()[start..end].to_vec());
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    needle.len() <= haystack.len() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn assert_no_canary(what: &str, bytes: &[u8]) {
    for canary in CANARIES {
        for form in forms(canary) {
            assert!(!find(bytes, &form), "{canary} found in {what} (as {:?})", String::from_utf8_lossy(&form));
        }
    }
}

fn database_url(app: &TestApp) -> String {
    use secrecy::ExposeSecret;
    match app.state.config.database().unwrap() {
        carevault::config::DatabaseTarget::Sqlite(path) => format!("sqlite://{}", path.display()),
        carevault::config::DatabaseTarget::Postgres(url) => url.0.expose_secret().to_owned(),
    }
}

/// Writes canary-laden resources through the API (create, update, search) and returns the patient id.
async fn write_canaries(app: &TestApp) -> (crate::world::World, String) {
    let w = app.world().await;
    let id = app.create(&w.front, canary_patient()).await;
    let path = format!("/fhir/Patient/{id}");
    let (_, mut p) = app.get_json(&w.front, &path).await;
    p["name"][0]["given"] = json!(["Quillabeth", "Quillabeth"]);
    assert_eq!(app.put(&w.front, &path, Some("1"), &p).await.status(), 200);
    app.create(
        &w.doc,
        json!({"resourceType":"Observation","status":"final",
            "identifier":[{"system":"urn:obs","value":"OBS-CANARY-7731"}],
            "code":{"coding":[{"system":"urn:lab","code":"GLIMQ-4471"}],"text":"Glimmerquartz assay"},
            "subject":{"reference":format!("Patient/{}", w.alice)},"effectiveDateTime":"1931-02-03",
            "valueString":"xylophone-garden fears","note":[{"text":"Frobnicated spleen"}]}),
    )
    .await;
    app.create(
        &w.doc,
        json!({"resourceType":"Condition","subject":{"reference":format!("Patient/{}", w.alice)},
            "code":{"text":"Frobnicated spleen"},"note":[{"text":"xylophone-garden fears"}],"onsetDateTime":"1931-02-03"}),
    )
    .await;
    // Searches by PHI values (blind-indexed) find the record.
    let (s, b) = app.get_json(&w.front, "/fhir/Patient?family=Vexmoorland&birthdate=1931-02-03").await;
    assert_eq!((s, b["entry"].as_array().map(Vec::len)), (200, Some(1)), "{b}");
    let (s, b) = app.get_json(&w.doc, &format!("/fhir/Observation?patient={}&code=urn:lab|GLIMQ-4471", w.alice)).await;
    assert_eq!((s, b["entry"].as_array().map(Vec::len)), (200, Some(1)), "{b}");
    (w, id)
}

both_backends!(a_raw_scan_finds_no_phi, |app: TestApp| async move {
    // The scanner itself finds a canary in every form it looks for.
    {
        use base64::Engine;
        let sample = format!("xx{}yy", "Vexmoorland");
        assert!(find(sample.as_bytes(), &forms("Vexmoorland")[0]));
        for prefix in ["", "a", "ab"] {
            let plain = format!("{prefix}{{\"family\":\"Vexmoorland\"}}");
            let std_enc = base64::engine::general_purpose::STANDARD.encode(&plain);
            let url_enc = base64::engine::general_purpose::URL_SAFE.encode(&plain);
            assert!(forms("Vexmoorland").iter().any(|f| find(std_enc.as_bytes(), f)), "{prefix}");
            assert!(forms("Vexmoorland").iter().any(|f| find(url_enc.as_bytes(), f)), "{prefix}");
        }
    }
    write_canaries(&app).await;
    match app.backend {
        Backend::Sqlite => {
            let db = app.dir.path().join("carevault.db");
            let mut scanned = 0;
            for suffix in ["", "-wal", "-shm"] {
                let path = format!("{}{suffix}", db.display());
                if let Ok(bytes) = std::fs::read(&path) {
                    assert_no_canary(&path, &bytes);
                    scanned += bytes.len();
                }
            }
            assert!(scanned > 100_000, "the database files were read");
            // The scan would see plaintext: the audit trail's own ids are there in the clear.
            let id = account_id(&app);
            let all: Vec<u8> = ["", "-wal"]
                .iter()
                .flat_map(|s| std::fs::read(format!("{}{s}", db.display())).unwrap_or_default())
                .collect();
            assert!(find(&all, id.as_bytes()));
        }
        Backend::Postgres => {
            let out = std::process::Command::new("pg_dump")
                .arg("--no-owner")
                .arg(database_url(&app))
                .output()
                .expect("pg_dump must be installed (Debian: postgresql-client)");
            assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
            assert!(out.stdout.len() > 10_000, "the dump holds the data");
            assert!(find(&out.stdout, account_id(&app).as_bytes()), "the dump holds plain ids");
            assert_no_canary("pg_dump", &out.stdout);
        }
    }
});

fn account_id(app: &TestApp) -> String {
    let mut conn = app.state.db.conn().unwrap();
    carevault::auth::service::find_account(&mut conn, "front").unwrap().unwrap().id
}

fn content(app: &TestApp, rtype: &str, id: &str) -> serde_json::Map<String, Value> {
    let mut conn = app.state.db.conn().unwrap();
    let c: String = resources::table
        .filter(resources::resource_type.eq(rtype))
        .filter(resources::id.eq(id))
        .select(resources::content)
        .first(&mut conn)
        .unwrap();
    serde_json::from_str(&c).unwrap()
}

fn set_content(app: &TestApp, rtype: &str, id: &str, doc: &serde_json::Map<String, Value>) {
    let mut conn = app.state.db.conn().unwrap();
    let n = diesel::update(resources::table.filter(resources::resource_type.eq(rtype)).filter(resources::id.eq(id)))
        .set(resources::content.eq(Value::Object(doc.clone()).to_string()))
        .execute(&mut conn)
        .unwrap();
    assert_eq!(n, 1);
}

/// A 500 that says nothing: a generic OperationOutcome, no data, no ciphertext, no detail.
async fn assert_generic_500(r: reqwest::Response) {
    assert_eq!(r.status(), 500);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert_eq!(body["issue"].as_array().unwrap().len(), 1);
    assert_eq!(body["issue"][0]["code"], "exception");
    assert_eq!(body["issue"][0]["diagnostics"], "An internal error occurred.", "a fixed text only");
    assert!(body["issue"][0].get("expression").is_none() && body["issue"][0].get("details").is_none());
    let text = body.to_string();
    assert!(!text.contains("cv1:") && !text.contains("decrypt") && !text.contains("Brown"), "{text}");
    assert_no_canary("error body", text.as_bytes());
}

both_backends!(a_moved_ciphertext_fails_closed_and_alerts, |app: TestApp| async move {
    let w = app.world().await;
    let target = app.create(&w.front, canary_patient()).await;
    let path = format!("/fhir/Patient/{target}");
    assert_eq!(app.get(&w.front, &path).await.status(), 200);
    let original = content(&app, "Patient", &target);
    // Another row's `name` ciphertext, pasted over this row's `name`.
    let bob = content(&app, "Patient", &w.bob);
    let mut moved = original.clone();
    moved.insert("name".into(), bob["name"].clone());
    set_content(&app, "Patient", &target, &moved);
    assert_generic_500(app.get(&w.front, &path).await).await;
    // The search that decrypts the candidate fails closed too (no partial page).
    assert_generic_500(app.get(&w.front, "/fhir/Patient?family=Vexmoorland&birthdate=1931-02-03").await).await;
    // This row's own `name` ciphertext, moved to its `birthDate` element.
    let mut swapped = original.clone();
    swapped.insert("birthDate".into(), original["name"].clone());
    set_content(&app, "Patient", &target, &swapped);
    assert_generic_500(app.get(&w.front, &path).await).await;
    // Put back, it reads again: the failure was the move, not the data.
    set_content(&app, "Patient", &target, &original);
    let (s, p) = app.get_json(&w.front, &path).await;
    assert_eq!((s, p["name"][0]["family"].as_str()), (200, Some("Vexmoorland")));

    // One critical decrypt-failure alert, about the cipher (no patient, no record named).
    let started = std::time::Instant::now();
    let raised = loop {
        let rows: Vec<(String, String, String)> = {
            let mut conn = app.state.db.conn().unwrap();
            alerts::table
                .filter(alerts::rule.eq("decrypt-failure"))
                .select((alerts::severity, alerts::subject, alerts::id))
                .load(&mut conn)
                .unwrap()
        };
        if !rows.is_empty() || started.elapsed() > std::time::Duration::from_secs(10) {
            break rows;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert_eq!((raised[0].0.as_str(), raised[0].1.as_str()), ("critical", "field-cipher"));
    assert!(!raised[0].1.contains(&target));
});

both_backends!(a_wrong_master_key_is_refused_at_start, |app: TestApp| async move {
    let w = app.world().await;
    let id = app.create(&w.front, canary_patient()).await;
    let config = |extra: &str| {
        let toml = format!(
            "database_url = \"{}\"\nlisten = \"127.0.0.1:0\"\n[access]\npolicy_dir = \"{}\"\n{extra}",
            database_url(&app),
            policy_dir().display()
        );
        let over = carevault::config::Overrides { data_dir: app.dir.path().to_path_buf(), ..Default::default() };
        carevault::config::Config::from_toml(&toml, &over).unwrap()
    };
    let clock = || std::sync::Arc::new(app.clock.clone()) as carevault::clock::SharedClock;
    // The right key (the generated one in the data directory) opens the same database.
    assert!(carevault::app::AppState::open(config(""), clock()).is_ok());
    let other = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode([7u8; 32])
    };
    let wrong = format!("[keys]\nmaster_key = \"{other}\"\n");
    let err = carevault::app::AppState::open(config(&wrong), clock()).unwrap_err().to_string();
    assert!(err.contains("wrong master key") && err.contains("keys.master_key"), "{err}");
    assert!(!err.contains(&other), "the key is never echoed: {err}");
    let Err(err) = carevault::app::Application::build(config(&wrong), clock()) else {
        panic!("a server started with the wrong master key")
    };
    assert!(err.to_string().contains("keys.master_key"), "{err}");
    // Nothing was changed by the refused starts: the running server still reads its data.
    let (s, p) = app.get_json(&w.front, &format!("/fhir/Patient/{id}")).await;
    assert_eq!((s, p["name"][0]["family"].as_str()), (200, Some("Vexmoorland")));
});

both_backends!(blind_indexes_hold_short_hex_only, |app: TestApp| async move {
    let (_, id) = write_canaries(&app).await;
    let mut conn = app.state.db.conn().unwrap();
    let rows: Vec<(String, String, String)> = search_index::table
        .select((search_index::resource_type, search_index::param, search_index::value))
        .load(&mut conn)
        .unwrap();
    let mut phi_rows = 0;
    // Deliberately truncated (colliding) keyed hashes: a few hex digits, never the value.
    let hex_len = usize::try_from(carevault::crypto::BLIND_INDEX_BITS / 4).unwrap();
    for (rtype, param, value) in &rows {
        let d = carevault::fhir::decl::decl(rtype).unwrap();
        let p = d.param(param).unwrap();
        assert!(!CANARIES.iter().any(|c| value.to_lowercase().contains(&c.to_lowercase())), "{rtype}.{param}");
        if p.phi {
            phi_rows += 1;
            assert!(
                value.len() == hex_len && value.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "{rtype}.{param} holds {value:?}"
            );
        }
    }
    assert!(phi_rows >= 10, "the canary patient's names, telecom, address, identifier are indexed");
    // The same value under another parameter or type gets another index (no cross-parameter linking).
    let family: Vec<String> = search_index::table
        .filter(search_index::id.eq(&id))
        .filter(search_index::param.eq("family"))
        .select(search_index::value)
        .load(&mut conn)
        .unwrap();
    let blind = app.state.cipher.blind_indexer();
    assert!(family.contains(&blind.index("Patient", "family", "vexmoorland")), "{family:?}");
    assert_ne!(blind.index("Patient", "family", "vexmoorland"), blind.index("Patient", "given", "vexmoorland"));
});
