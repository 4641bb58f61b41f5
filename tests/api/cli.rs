//! The operator CLI (`keys`, `audit`, `policy`), run as the real binary against the data dir and database of a
//! running test server, on both backends.

use crate::both_backends;
use crate::helpers::{TestApp, policy_dir};
use carevault::audit::chain::{hash_from_hex, to_hex};
use carevault::audit::{Agent, AuditEvent, AuditKind, ChainLink, Outcome};
use carevault::config::DatabaseTarget;
use carevault::crypto::{FieldAad, FieldCipher, MasterKey};
use carevault::records::fault_injection::{Row, WriteExtras, insert, replace};
use carevault::store::schema::{audit_events, audit_head, resource_history, resources};
use diesel::prelude::*;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use time::macros::datetime;
use uuid::Uuid;

fn db_url(app: &TestApp) -> String {
    match app.state.config.database().unwrap() {
        DatabaseTarget::Postgres(url) => url.0.expose_secret().to_owned(),
        DatabaseTarget::Sqlite(path) => format!("sqlite://{}", path.display()),
    }
}

/// Runs `carevault --data-dir DIR ARGS…` on the app's database, with extra environment.
fn cli_env(app: &TestApp, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_carevault"));
    cmd.arg("--data-dir")
        .arg(app.dir.path())
        .args(args)
        .env("CAREVAULT_DATABASE_URL", db_url(app))
        .env("CAREVAULT_ACCESS__POLICY_DIR", policy_dir())
        .env("USER", "tester")
        .env_remove("CAREVAULT_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::task::block_in_place(|| cmd.output().unwrap())
}

fn cli(app: &TestApp, args: &[&str]) -> Output {
    cli_env(app, args, &[])
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "exit {:?}\nstdout: {}\nstderr: {}", o.status, stdout(&o), stderr(&o));
    stdout(&o)
}

/// The `detail` code of the newest audit record.
fn last_detail(app: &TestApp) -> String {
    let mut conn = app.state.db.conn().unwrap();
    let body: String =
        audit_events::table.order(audit_events::seq.desc()).select(audit_events::body).first(&mut conn).unwrap();
    serde_json::from_str::<Value>(&body).unwrap()["detail"].as_str().unwrap_or_default().to_owned()
}

/// The `detail` code of the newest administrative audit record (requests may have been recorded after it).
fn last_admin_detail(app: &TestApp) -> String {
    let mut conn = app.state.db.conn().unwrap();
    let bodies: Vec<String> = audit_events::table
        .order(audit_events::seq.desc())
        .select(audit_events::body)
        .limit(500)
        .load(&mut conn)
        .unwrap();
    bodies
        .iter()
        .map(|b| serde_json::from_str::<Value>(b).unwrap()["detail"].as_str().unwrap_or_default().to_owned())
        .find(|d| !d.is_empty())
        .unwrap_or_default()
}

const PHI: [&str; 2] = ["name", "birthDate"];

/// A stored Patient in the documented format: PHI elements as `cv1:` ciphertexts, the rest plain.
fn patient_content(cipher: &FieldCipher, id: &str, n: i64) -> (String, i32) {
    let mut doc = json!({"resourceType": "Patient", "id": id, "active": true});
    let plain = [json!([{"family": format!("Family{n}"), "given": ["Ann"]}]), json!(format!("19{:02}-01-01", n % 100))];
    for (element, value) in PHI.iter().zip(plain) {
        doc[*element] = json!(cipher.encrypt_json(&FieldAad::new("Patient", id, element), &value).unwrap());
    }
    doc["counter"] = json!(cipher.encrypt_json(&FieldAad::new("Patient", id, "counter"), &json!(n)).unwrap());
    (doc.to_string(), i32::try_from(cipher.active_version()).unwrap())
}

/// Writes `count` patients (version 1) and gives every third a version 2, with `cipher`; returns their ids.
fn write_patients(app: &TestApp, cipher: &FieldCipher, count: usize) -> Vec<String> {
    let mut conn = app.state.db.conn().unwrap();
    let ids: Vec<String> = (0..count).map(|_| Uuid::new_v4().to_string()).collect();
    for (i, id) in ids.iter().enumerate() {
        let (content, key_version) = patient_content(cipher, id, 0);
        let mut row = Row {
            resource_type: "Patient".into(),
            id: id.clone(),
            version_id: 1,
            last_updated: 1,
            deleted: false,
            patient_id: Some(id.clone()),
            key_version,
            content,
            index_version: 1,
        };
        insert(&mut conn, &row, &WriteExtras::default()).unwrap();
        if i.is_multiple_of(3) {
            row.version_id = 2;
            (row.content, row.key_version) = patient_content(cipher, id, 0);
            replace(&mut conn, &row, 1, &WriteExtras::default()).unwrap();
        }
    }
    ids
}

/// Every stored row (current and history): (type, id, key_version, content).
fn all_rows(app: &TestApp) -> Vec<(String, String, i32, String)> {
    let mut conn = app.state.db.conn().unwrap();
    let mut rows: Vec<(String, String, i32, String)> = resources::table
        .select((resources::resource_type, resources::id, resources::key_version, resources::content))
        .load(&mut conn)
        .unwrap();
    rows.extend(
        resource_history::table
            .select((
                resource_history::resource_type,
                resource_history::id,
                resource_history::key_version,
                resource_history::content,
            ))
            .load::<(String, String, i32, String)>(&mut conn)
            .unwrap(),
    );
    rows
}

/// Asserts every row is on `active` and every PHI element decrypts under its own place; returns the counters.
fn assert_all_current(app: &TestApp, cipher: &FieldCipher, active: u32) -> HashMap<String, i64> {
    let mut counters = HashMap::new();
    let rows = all_rows(app);
    assert!(!rows.is_empty());
    for (rtype, id, key_version, content) in rows {
        assert_eq!(key_version, i32::try_from(active).unwrap(), "{rtype}/{id}");
        let doc: Value = serde_json::from_str(&content).unwrap();
        for element in PHI.iter().chain(&["counter"]) {
            let ct = doc[*element].as_str().unwrap();
            assert_eq!(FieldCipher::version_of(ct), Some(active), "{rtype}/{id}.{element}");
            let value = cipher.decrypt_json(&FieldAad::new(&rtype, &id, element), ct).unwrap();
            if *element == "counter" {
                let n = value.as_i64().unwrap();
                counters.entry(id.clone()).and_modify(|c: &mut i64| *c = (*c).max(n)).or_insert(n);
            }
        }
        assert_eq!(doc["active"], json!(true), "plain elements are kept");
    }
    counters
}

/// A cipher over the keys currently stored.
fn stored_cipher(app: &TestApp) -> FieldCipher {
    let mut conn = app.state.db.conn().unwrap();
    FieldCipher::new(carevault::crypto::store::load(&mut conn, app.state.keys.as_ref()).unwrap())
}

both_backends!(keys_status_reports_versions_rows_and_signing_keys, |app: TestApp| async move {
    write_patients(&app, &app.state.cipher, 6);
    let status: Value = serde_json::from_str(&ok(cli(&app, &["keys", "status", "--json"]))).unwrap();
    assert_eq!(status["active_data_key_version"], 1);
    assert_eq!(status["index_key_version"], 1);
    assert_eq!(status["master_key_id"], app.state.keys.id());
    assert_eq!(status["keys_wrapped_by_other_master_keys"], 0);
    assert_eq!(status["rows_by_key_version"]["resources"], json!({"1": 6}));
    assert_eq!(status["rows_by_key_version"]["resource_history"], json!({"1": 8}));
    assert_eq!(status["rows_below_active_version"], 0);
    assert_eq!(status["data_keys"].as_array().unwrap().len(), 1);
    let signing = status["signing_keys"].as_array().unwrap();
    assert_eq!(signing.len(), 1);
    assert_eq!(signing[0]["state"], "active");
    assert!(signing[0]["kid"].as_str().is_some_and(|k| !k.is_empty()));
    assert_eq!(last_detail(&app), "keys-status");

    ok(cli(&app, &["keys", "rotate-signing"]));
    assert_eq!(last_detail(&app), "signing-key-rotated");
    let text = ok(cli(&app, &["keys", "status"]));
    assert!(text.contains("active data key:       v1"), "{text}");
    assert!(text.contains("v1: 6") && text.contains("v1: 8"), "{text}");
    assert_eq!(text.matches("retiring").count(), 1, "{text}");
    assert!(text.contains(&app.state.keys.id()), "{text}");
});

/// Stores a break-glass grant whose reason is sealed with `cipher`, as `POST /auth/break-glass` does.
fn write_grant(app: &TestApp, cipher: &FieldCipher, patient: &str, reason: &str) -> String {
    use carevault::store::schema::{accounts, break_glass};
    app.add_user("grant-nurse", carevault::role::Role::Nurse, Some(&Uuid::new_v4().to_string()), None);
    let id = Uuid::new_v4().to_string();
    let sealed = cipher.encrypt(&FieldAad::new("BreakGlass", &id, "reason"), reason.as_bytes()).unwrap();
    let mut conn = app.state.db.conn().unwrap();
    let account: String =
        accounts::table.filter(accounts::username.eq("grant-nurse")).select(accounts::id).first(&mut conn).unwrap();
    diesel::insert_into(break_glass::table)
        .values((
            break_glass::id.eq(&id),
            break_glass::account_id.eq(account),
            break_glass::patient_id.eq(patient),
            break_glass::reason.eq(sealed),
            break_glass::created_at.eq(1i64),
            break_glass::expires_at.eq(2i64),
        ))
        .execute(&mut conn)
        .unwrap();
    id
}

/// The break-glass reason of grant `id`, as stored.
fn grant_reason(app: &TestApp, id: &str) -> String {
    use carevault::store::schema::break_glass;
    let mut conn = app.state.db.conn().unwrap();
    break_glass::table.filter(break_glass::id.eq(id)).select(break_glass::reason).first(&mut conn).unwrap()
}

// The operator a CLI record names comes from the process's uid, not from `$USER`, which anyone can set.
both_backends!(cli_records_name_the_real_operator_not_the_user_variable, |app: TestApp| async move {
    ok(cli_env(&app, &["keys", "rotate"], &[("USER", "mallory")]));
    let agent: Option<String> = {
        let mut conn = app.state.db.conn().unwrap();
        audit_events::table
            .filter(audit_events::kind.eq("admin"))
            .order(audit_events::seq.desc())
            .select(audit_events::agent)
            .first(&mut conn)
            .unwrap()
    };
    let me = Command::new("id").arg("-un").output().unwrap();
    let me = String::from_utf8_lossy(&me.stdout).trim().to_owned();
    assert_eq!(agent, Some(format!("cli:{me}")));
});

both_backends!(rotate_then_reencrypt_moves_every_row, |app: TestApp| async move {
    let ids = write_patients(&app, &app.state.cipher, 130);
    let grant = write_grant(&app, &app.state.cipher, &ids[0], "unconscious on arrival");
    let out = ok(cli(&app, &["keys", "rotate"]));
    assert!(out.contains("data key version 2 is now active"), "{out}");
    assert_eq!(last_detail(&app), "keys-rotated");

    // The running server picks the new key up without a restart.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while app.state.cipher.active_version() != 2 {
        assert!(std::time::Instant::now() < deadline, "the server did not reload the data keys");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let status: Value = serde_json::from_str(&ok(cli(&app, &["keys", "status", "--json"]))).unwrap();
    assert_eq!(status["rows_below_active_version"], 130 + 174 + 1);
    assert_eq!(status["break_glass_reasons_below_active_version"], 1);

    let out = ok(cli(&app, &["keys", "reencrypt", "--batch", "50"]));
    assert!(
        out.contains(
            "re-encrypted 130 current and 174 history row(s), 1 break-glass reason(s) and 0 alert note(s) to data key version 2"
        ),
        "{out}"
    );
    assert_eq!(last_detail(&app), "keys-reencrypted");
    let counters = assert_all_current(&app, &stored_cipher(&app), 2);
    assert_eq!(counters.len(), ids.len());
    let reason = grant_reason(&app, &grant);
    assert_eq!(FieldCipher::version_of(&reason), Some(2));
    let opened = stored_cipher(&app).decrypt(&FieldAad::new("BreakGlass", &grant, "reason"), &reason).unwrap();
    assert_eq!(opened.as_slice(), b"unconscious on arrival");

    // Resumable / idempotent: nothing left to do.
    let out = ok(cli(&app, &["keys", "reencrypt"]));
    assert!(
        out.contains("re-encrypted 0 current and 0 history row(s), 0 break-glass reason(s) and 0 alert note(s)"),
        "{out}"
    );
    let status: Value = serde_json::from_str(&ok(cli(&app, &["keys", "status", "--json"]))).unwrap();
    assert_eq!(status["rows_below_active_version"], 0);
    assert_eq!(status["rows_by_key_version"]["resources"], json!({"2": 130}));

    // A row that does not decrypt (ciphertexts moved from another resource) is reported and left alone; the
    // command fails.
    {
        let mut conn = app.state.db.conn().unwrap();
        let (content, key_version) = patient_content(&stored_cipher(&app), "elsewhere", 1);
        assert_eq!(key_version, 2);
        diesel::update(resources::table.filter(resources::id.eq(&ids[1])))
            .set(resources::content.eq(content))
            .execute(&mut conn)
            .unwrap();
    }
    ok(cli(&app, &["keys", "rotate"]));
    assert_eq!(stored_cipher(&app).active_version(), 3);
    let out = cli(&app, &["keys", "reencrypt"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&format!("cannot re-encrypt Patient/{}/_history/1", ids[1])), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 row(s) remain below data key version 3"), "{}", stderr(&out));
    assert_eq!(last_detail(&app), "keys-reencrypt-incomplete");
});

both_backends!(reencrypt_under_a_concurrent_writer_loses_no_update, |app: TestApp| async move {
    let ids = write_patients(&app, &app.state.cipher, 300);
    let stale = FieldCipher::new((*app.state.cipher.ring()).clone());
    ok(cli(&app, &["keys", "rotate"]));
    let fresh = stored_cipher(&app);
    assert_eq!(fresh.active_version(), 2);

    // A writer updating 30 rows with version checks, alternately as a server that has not reloaded its keys
    // yet (old key) and one that has, while `reencrypt` runs.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, stop, ids) = (app.state.db.clone(), stop.clone(), ids[..30].to_vec());
        let (stale, fresh) = (stale.clone(), fresh.clone());
        std::thread::spawn(move || {
            let mut written: HashMap<String, i64> = HashMap::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let id = &ids[i % ids.len()];
                let cipher = if i.is_multiple_of(2) { &stale } else { &fresh };
                i += 1;
                let mut conn = db.conn().unwrap();
                let (version, content): (i64, String) = resources::table
                    .filter(resources::id.eq(id))
                    .select((resources::version_id, resources::content))
                    .first(&mut conn)
                    .unwrap();
                let doc: Value = serde_json::from_str(&content).unwrap();
                let ct = doc["counter"].as_str().unwrap();
                let n = fresh.decrypt_json(&FieldAad::new("Patient", id, "counter"), ct).unwrap().as_i64().unwrap();
                let (content, key_version) = patient_content(cipher, id, n + 1);
                let row = Row {
                    resource_type: "Patient".into(),
                    id: id.clone(),
                    version_id: version + 1,
                    last_updated: 2,
                    deleted: false,
                    patient_id: Some(id.clone()),
                    key_version,
                    content,
                    index_version: 1,
                };
                let done = conn.transaction(|c| replace(c, &row, version, &WriteExtras::default()));
                if done.is_ok() {
                    *written.entry(id.clone()).or_default() += 1;
                }
            }
            written
        })
    };
    let first = cli(&app, &["keys", "reencrypt", "--batch", "20"]);
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written.values().sum::<i64>() > 30, "the writer made progress: {written:?}");
    // The run may end with rows a stale writer put back on the old key meanwhile; a second run finishes them.
    assert!(first.status.success() || stderr(&first).contains("remain below"), "{}", stderr(&first));
    ok(cli(&app, &["keys", "reencrypt"]));

    let counters = assert_all_current(&app, &fresh, 2);
    let mut conn = app.state.db.conn().unwrap();
    for id in &ids[..30] {
        let current: String =
            resources::table.filter(resources::id.eq(id)).select(resources::content).first(&mut conn).unwrap();
        let doc: Value = serde_json::from_str(&current).unwrap();
        let n = fresh
            .decrypt_json(&FieldAad::new("Patient", id, "counter"), doc["counter"].as_str().unwrap())
            .unwrap()
            .as_i64()
            .unwrap();
        let expected = written.get(id).copied().unwrap_or(0);
        assert_eq!(n, expected, "Patient/{id}: every committed update survives re-encryption");
        assert_eq!(counters[id], expected);
    }
});

both_backends!(rotate_master_rewraps_every_key, |app: TestApp| async move {
    write_patients(&app, &app.state.cipher, 5);
    ok(cli(&app, &["audit", "checkpoint"]));
    let new_file = app.dir.path().join("master.new");
    MasterKey::generate_file(&new_file).unwrap();
    let new_path = new_file.to_str().unwrap();
    let old_id = app.state.keys.id();

    let out = ok(cli(&app, &["keys", "rotate-master", "--new-master-key-file", new_path]));
    assert!(
        out.contains("rewrapped 2 data/index key(s), 1 token-signing key(s) and 1 audit checkpoint key(s)"),
        "{out}"
    );
    assert!(out.contains("keys.master_key_file"), "{out}");

    // The old master key no longer opens anything.
    let refused = cli(&app, &["keys", "status"]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("wrong master key"), "{}", stderr(&refused));
    let with_new = [("CAREVAULT_KEYS__MASTER_KEY_FILE", new_path)];
    let status: Value = serde_json::from_str(&ok(cli_env(&app, &["keys", "status", "--json"], &with_new))).unwrap();
    assert_ne!(status["master_key_id"], old_id);
    assert_eq!(status["keys_wrapped_by_other_master_keys"], 0);
    // The checkpoint key was rewrapped too: the signed checkpoint still verifies.
    let verified = ok(cli_env(&app, &["audit", "verify"], &with_new));
    assert!(verified.contains("intact") && verified.contains("checkpoint at record"), "{verified}");
    let again = ok(cli_env(&app, &["keys", "rotate-master", "--new-master-key-file", new_path], &with_new));
    assert!(again.contains("already wrapped"), "{again}");

    // A server opens with the new key, decrypts the stored rows, and refuses the old key.
    let open = |key_file: &str| {
        let toml = format!(
            "database_url = \"{}\"\nlisten = \"127.0.0.1:0\"\n[keys]\nmaster_key_file = \"{key_file}\"\n",
            db_url(&app)
        );
        let over = carevault::config::Overrides { data_dir: app.dir.path().to_path_buf(), ..Default::default() };
        let cfg = carevault::config::Config::from_toml(&toml, &over).unwrap();
        carevault::app::AppState::open(cfg, carevault::clock::system())
    };
    let state = open(new_path).unwrap();
    let mut conn = state.db.conn().unwrap();
    let (rtype, id, content): (String, String, String) = resources::table
        .select((resources::resource_type, resources::id, resources::content))
        .first(&mut conn)
        .unwrap();
    let doc: Value = serde_json::from_str(&content).unwrap();
    state.cipher.decrypt_json(&FieldAad::new(&rtype, &id, "name"), doc["name"].as_str().unwrap()).unwrap();
    let old_file = app.dir.path().join("keys/master.key");
    let err = open(old_file.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("wrong master key"), "{err}");
});

/// Appends `n` events recorded at `at`, `at + 1h`, …
fn append_events(app: &TestApp, n: usize, at: time::OffsetDateTime) {
    let mut conn = app.state.db.conn().unwrap();
    let events: Vec<AuditEvent> = (0..n)
        .map(|i| {
            AuditEvent::new(
                AuditKind::Read,
                at + time::Duration::hours(i64::try_from(i).unwrap()),
                Outcome::Success,
                Agent::user("account-1", Some("nurse1".into()), Some(carevault::role::Role::Nurse)),
            )
            .with_patient(Uuid::new_v4())
            .with_resource("Patient", Some(Uuid::new_v4()), Some(1))
        })
        .collect();
    carevault::audit::store::append(&mut conn, app.state.audit.sealer(), &events).unwrap();
}

/// Every column of a row (the helper restores them all: `audit verify` checks each one).
type AuditRow =
    (i64, String, i64, String, Option<String>, Option<String>, String, String, String, Option<String>, String);

fn snapshot(app: &TestApp) -> (Vec<AuditRow>, (i64, String)) {
    let mut conn = app.state.db.conn().unwrap();
    let rows = audit_events::table
        .order(audit_events::seq.asc())
        .select((
            audit_events::seq,
            audit_events::id,
            audit_events::recorded,
            audit_events::kind,
            audit_events::agent,
            audit_events::patient_id,
            audit_events::body,
            audit_events::prev_hash,
            audit_events::hash,
            audit_events::seal,
            audit_events::action,
        ))
        .load(&mut conn)
        .unwrap();
    let head = audit_head::table.select((audit_head::seq, audit_head::hash)).first(&mut conn).unwrap();
    (rows, head)
}

fn restore(app: &TestApp, (rows, head): &(Vec<AuditRow>, (i64, String))) {
    let mut conn = app.state.db.conn().unwrap();
    diesel::delete(audit_events::table).execute(&mut conn).unwrap();
    for r in rows {
        insert_row(&mut conn, r.clone());
    }
    diesel::update(audit_head::table)
        .set((audit_head::seq.eq(head.0), audit_head::hash.eq(&head.1)))
        .execute(&mut conn)
        .unwrap();
}

fn insert_row(conn: &mut carevault::store::AnyConnection, r: AuditRow) {
    diesel::insert_into(audit_events::table)
        .values((
            audit_events::seq.eq(r.0),
            audit_events::id.eq(r.1),
            audit_events::recorded.eq(r.2),
            audit_events::kind.eq(r.3),
            audit_events::agent.eq(r.4),
            audit_events::patient_id.eq(r.5),
            audit_events::body.eq(r.6),
            audit_events::prev_hash.eq(r.7),
            audit_events::hash.eq(r.8),
            audit_events::seal.eq(r.9),
            audit_events::action.eq(r.10),
        ))
        .execute(conn)
        .unwrap();
}

/// `audit verify` fails naming `message`.
fn assert_broken(app: &TestApp, message: &str) {
    let out = cli(app, &["audit", "verify"]);
    assert!(!out.status.success(), "tampering went unnoticed: {}", stdout(&out));
    assert!(stderr(&out).contains(message), "expected {message:?}, got {}", stderr(&out));
}

both_backends!(audit_verify_names_the_first_bad_record, |app: TestApp| async move {
    append_events(&app, 12, datetime!(2026-03-01 09:00 UTC));
    let clean = snapshot(&app);
    assert_eq!(clean.0.len(), 12);
    let out = ok(cli(&app, &["audit", "verify"]));
    assert!(out.contains("audit trail intact: 12 record(s) verified") && out.contains("events/s"), "{out}");
    assert_eq!(last_detail(&app), "audit-verified");
    let json: Value = serde_json::from_str(&ok(cli(&app, &["audit", "verify", "--json"]))).unwrap();
    assert_eq!((json["intact"].clone(), json["records"].clone()), (json!(true), json!(13)));
    restore(&app, &clean);

    let mut conn = app.state.db.conn().unwrap();
    // One byte of a body (a digit of the event id).
    let mut body = clean.0[4].6.clone().into_bytes();
    body[10] = if body[10] == b'a' { b'b' } else { b'a' };
    diesel::update(audit_events::table.filter(audit_events::seq.eq(5)))
        .set(audit_events::body.eq(String::from_utf8(body).unwrap()))
        .execute(&mut conn)
        .unwrap();
    assert_broken(&app, "audit record 5: edited");
    let json: Value = serde_json::from_str(&stdout(&cli(&app, &["audit", "verify", "--json"]))).unwrap();
    assert_eq!((json["intact"].clone(), json["first_bad_record"].clone()), (json!(false), json!(5)));
    restore(&app, &clean);

    // A deleted row.
    diesel::delete(audit_events::table.filter(audit_events::seq.eq(7))).execute(&mut conn).unwrap();
    assert_broken(&app, "audit record 7: missing");
    restore(&app, &clean);

    // An inserted row, properly linked to its predecessor, the later rows renumbered.
    diesel::update(audit_events::table.filter(audit_events::seq.gt(6)))
        .set(audit_events::seq.eq(audit_events::seq * -1))
        .execute(&mut conn)
        .unwrap();
    diesel::update(audit_events::table.filter(audit_events::seq.lt(0)))
        .set(audit_events::seq.eq(audit_events::seq * -1 + 1))
        .execute(&mut conn)
        .unwrap();
    let forged = AuditEvent::new(AuditKind::Login, datetime!(2026-03-01 15:30 UTC), Outcome::Success, Agent::default());
    let canonical = forged.canonical_bytes().unwrap();
    let prev = ChainLink { seq: 6, prev_hash: [0; 32], hash: hash_from_hex(&clean.0[5].8).unwrap() };
    let link = ChainLink::next(Some(&prev), &canonical);
    insert_row(
        &mut conn,
        (
            7,
            forged.id.to_string(),
            0,
            "login".into(),
            None,
            None,
            String::from_utf8(canonical).unwrap(),
            to_hex(&link.prev_hash),
            to_hex(&link.hash),
            None,
            "R".into(),
        ),
    );
    assert_broken(&app, "audit record 7: inserted");
    restore(&app, &clean);

    // Two rows swapped.
    for (seq, from) in [(4, &clean.0[4]), (5, &clean.0[3])] {
        diesel::update(audit_events::table.filter(audit_events::seq.eq(seq)))
            .set((audit_events::body.eq(&from.6), audit_events::prev_hash.eq(&from.7), audit_events::hash.eq(&from.8)))
            .execute(&mut conn)
            .unwrap();
    }
    assert_broken(&app, "audit record 4: reordered");
    restore(&app, &clean);

    // The tail cut off (the head still names the last record).
    diesel::delete(audit_events::table.filter(audit_events::seq.gt(10))).execute(&mut conn).unwrap();
    assert_broken(&app, "audit record 11: truncated");
    restore(&app, &clean);

    // The tail cut off and the head moved back to match: the signed checkpoint still catches it.
    let cp: Value = serde_json::from_str(&ok(cli(&app, &["audit", "checkpoint"]))).unwrap();
    assert_eq!(cp["checkpoint"]["seq"], 13, "the checkpoint covers its own admin record");
    let anchor = app.dir.path().join("anchor.json");
    std::fs::write(&anchor, cp.to_string()).unwrap();
    ok(cli(&app, &["audit", "verify", "--anchor", anchor.to_str().unwrap()]));
    diesel::delete(audit_events::table.filter(audit_events::seq.gt(11))).execute(&mut conn).unwrap();
    diesel::update(audit_head::table)
        .set((audit_head::seq.eq(11), audit_head::hash.eq(&clean.0[10].8)))
        .execute(&mut conn)
        .unwrap();
    assert_broken(&app, "audit record 12: truncated");
    // Deleting the stored checkpoint too is caught by the exported copy.
    diesel::delete(carevault::store::schema::audit_checkpoints::table).execute(&mut conn).unwrap();
    diesel::delete(audit_events::table.filter(audit_events::seq.gt(11))).execute(&mut conn).unwrap();
    diesel::update(audit_head::table)
        .set((audit_head::seq.eq(11), audit_head::hash.eq(&clean.0[10].8)))
        .execute(&mut conn)
        .unwrap();
    let out = cli(&app, &["audit", "verify", "--anchor", anchor.to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("audit record 12: truncated"), "{}", stderr(&out));

    // A forged checkpoint signature is refused.
    let mut forged = cp.clone();
    forged["checkpoint"]["seq"] = json!(3);
    std::fs::write(&anchor, forged.to_string()).unwrap();
    let out = cli(&app, &["audit", "verify", "--anchor", anchor.to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("invalid signature"), "{}", stderr(&out));
});

both_backends!(audit_export_writes_fhir_audit_events, |app: TestApp| async move {
    append_events(&app, 3, datetime!(2026-03-01 23:00 UTC)); // 23:00 on the 1st, 00:00 and 01:00 on the 2nd
    append_events(&app, 2, datetime!(2026-03-05 10:00 UTC));
    let day = ok(cli(&app, &["audit", "export", "--since", "2026-03-02", "--until", "2026-03-02"]));
    assert_eq!(day.lines().count(), 2, "{day}");
    assert_eq!(last_detail(&app), "audit-exported");

    let file = app.dir.path().join("export.ndjson");
    let out = cli(
        &app,
        &[
            "audit",
            "export",
            "--since",
            "2026-03-01T00:00:00Z",
            "--until",
            "2026-03-06T00:00:00Z",
            "--output",
            file.to_str().unwrap(),
        ],
    );
    assert!(stderr(ok_keep(&out)).contains("exported 5 audit event(s)"), "{}", stderr(&out));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let text = std::fs::read_to_string(&file).unwrap();
    let schema: Value = serde_json::from_slice(
        &std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fhir.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut recorded = Vec::new();
    for line in text.lines() {
        let event: Value = serde_json::from_str(line).unwrap();
        assert_eq!(event["resourceType"], "AuditEvent");
        assert!(validator.is_valid(&event), "not a valid FHIR AuditEvent: {event:#}");
        recorded.push(event["recorded"].as_str().unwrap().to_owned());
    }
    assert_eq!(recorded.len(), 5);
    assert!(recorded.windows(2).all(|w| w[0] <= w[1]), "oldest first: {recorded:?}");

    let bad = cli(&app, &["audit", "export", "--since", "yesterday"]);
    assert!(!bad.status.success() && stderr(&bad).contains("--since"), "{}", stderr(&bad));
});

fn ok_keep(o: &Output) -> &Output {
    assert!(o.status.success(), "exit {:?}\nstderr: {}", o.status, stderr(o));
    o
}

#[test]
fn policy_explain_prints_the_decision_and_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_carevault"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["policy", "explain"])
            .args(args)
            .env("CAREVAULT_ACCESS__POLICY_DIR", policy_dir())
            .env_remove("CAREVAULT_CONFIG")
            .output()
            .unwrap()
    };
    let out = run(&["--role", "nurse", "--type", "Observation", "--action", "read"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("nurse read Observation: ALLOWED, scope careteam"), "{text}");
    assert!(text.contains("rule: policy.csv line"), "{text}");

    let out = run(&["--role", "billing", "--type", "Observation", "--action", "delete"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("billing delete Observation: DENIED"), "{}", stdout(&out));

    let out = run(&["--role", "patient", "--type", "Patient", "--action", "$everything", "--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((json["allowed"].clone(), json["scope"].clone()), (json!(true), json!("own")), "{json}");
    assert!(json["rule"].as_str().unwrap().contains("policy.csv"), "{json}");

    let out = run(&["--role", "front_desk", "--type", "Observation", "--action", "read", "--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((json["allowed"].clone(), json["scope"].clone()), (json!(false), Value::Null), "{json}");

    let out = run(&["--role", "nurse", "--type", "Observation", "--action", "peek"]);
    assert!(!out.status.success() && stderr(&out).contains("unknown --action"), "{}", stderr(&out));
    let out = run(&["--role", "janitor", "--type", "Observation", "--action", "read"]);
    assert!(!out.status.success());
}

/// Ids of the patients a front-desk search for `family` returns (every page).
async fn family_hits(client: &reqwest::Client, base: &str, token: &str, family: &str) -> Vec<String> {
    let url = format!("{base}/fhir/Patient?family={family}&_count=100");
    // A kept-alive connection the server closed just as it was reused fails the send (hyper's
    // IncompleteMessage) under this test's load; a GET is safe to send again once.
    let r = match client.get(&url).bearer_auth(token).send().await {
        Ok(r) => r,
        Err(e) if e.is_request() => client.get(&url).bearer_auth(token).send().await.unwrap(),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(r.status(), 200);
    let bundle: Value = r.json().await.unwrap();
    assert!(bundle["link"].as_array().unwrap().iter().all(|l| l["relation"] != "next"));
    let mut ids: Vec<String> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["resource"]["id"].as_str().unwrap().into())
        .collect();
    ids.sort();
    ids
}

/// The stored `family` index values of one patient.
fn family_index(app: &TestApp, id: &str) -> Vec<String> {
    use carevault::store::schema::search_index;
    let mut conn = app.state.db.conn().unwrap();
    search_index::table
        .filter(search_index::id.eq(id))
        .filter(search_index::param.eq("family"))
        .select(search_index::value)
        .load(&mut conn)
        .unwrap()
}

async fn wait_for_index_keys(app: &TestApp, versions: &[u32]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while app.state.cipher.ring().index_versions() != versions {
        assert!(std::time::Instant::now() < deadline, "the server did not reload the index keys: want {versions:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

both_backends!(index_key_rotation_keeps_searches_exact_and_resumes, |app: TestApp| async move {
    use carevault::role::Role;
    let front = app.user("front", Role::FrontDesk, None).await;
    let mut by_family: HashMap<String, Vec<String>> = HashMap::new();
    for n in 0..40 {
        let family = format!("Rotham{}", n % 8);
        let id = app
            .create(&front, json!({"resourceType":"Patient","name":[{"family":family.clone(),"given":["Eve"]}]}))
            .await;
        by_family.entry(family.to_lowercase()).or_default().push(id);
    }
    let first = by_family["rotham3"][0].clone();
    let v1_index = family_index(&app, &first);
    assert_eq!(v1_index, vec![app.state.cipher.ring().blind_indexer().index("Patient", "family", "rotham3")]);

    // An interrupted `keys reindex`: the new key exists, no row is rebuilt yet. The server loads both keys and
    // writes new index values under the newest; searches find rows under either key.
    let rotation = {
        let mut conn = app.state.db.conn().unwrap();
        carevault::crypto::store::begin_index_rotation(&mut conn, app.state.keys.as_ref(), app.state.clock.now())
            .unwrap()
    };
    assert_eq!((rotation.version, rotation.new_key), (2, true));
    wait_for_index_keys(&app, &[1, 2]).await;
    let late =
        app.create(&front, json!({"resourceType":"Patient","name":[{"family":"Rotham3","given":["Late"]}]})).await;
    by_family.get_mut("rotham3").unwrap().push(late.clone());
    assert_eq!(
        family_index(&app, &late),
        vec![app.state.cipher.ring().blind_indexer().index("Patient", "family", "rotham3")]
    );
    assert_ne!(family_index(&app, &late), v1_index, "new values use the new key");
    let base = app.url("");
    let base = base.trim_end_matches('/');
    for (family, ids) in &by_family {
        let mut want = ids.clone();
        want.sort();
        assert_eq!(family_hits(&app.client, base, &front.access, family).await, want, "{family} mid-rotation");
    }
    {
        let mut conn = app.state.db.conn().unwrap();
        assert!(
            carevault::crypto::store::finish_index_rotation(&mut conn, 2, carevault::records::maintenance::below)
                .is_err(),
            "old rows still use v1"
        );
    }
    let status: Value = serde_json::from_str(&ok(cli(&app, &["keys", "status", "--json"]))).unwrap();
    assert_eq!(status["index_key_version"], 2);
    assert_eq!(status["index_keys"].as_array().unwrap().len(), 2);
    assert_eq!(status["rows_below_index_version"], 40);
    assert!(ok(cli(&app, &["keys", "status"])).contains("rotation in progress: v1 still searched"));

    // A row that does not decrypt (ciphertext moved from another patient) stops the rotation: reported, old key
    // kept, the command fails.
    let broken = by_family["rotham5"][0].clone();
    let saved: String = {
        let mut conn = app.state.db.conn().unwrap();
        let saved: String =
            resources::table.filter(resources::id.eq(&broken)).select(resources::content).first(&mut conn).unwrap();
        let donor: String =
            resources::table.filter(resources::id.eq(&first)).select(resources::content).first(&mut conn).unwrap();
        diesel::update(resources::table.filter(resources::id.eq(&broken)))
            .set(resources::content.eq(donor))
            .execute(&mut conn)
            .unwrap();
        saved
    };
    let out = cli(&app, &["keys", "reindex", "--batch", "7"]);
    assert!(!out.status.success());
    assert!(stdout(&out).contains("resuming the rebuild under blind-index key version 2"), "{}", stdout(&out));
    assert!(stderr(&out).contains(&format!("cannot reindex Patient/{broken}/_history/1")), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 resource(s) still use an older blind-index key"), "{}", stderr(&out));
    assert_eq!(last_detail(&app), "keys-reindex-incomplete");
    assert_eq!(app.state.cipher.ring().index_versions(), vec![1, 2], "the old key is kept");
    {
        let mut conn = app.state.db.conn().unwrap();
        diesel::update(resources::table.filter(resources::id.eq(&broken)))
            .set(resources::content.eq(saved))
            .execute(&mut conn)
            .unwrap();
    }

    // The rerun finishes the same rotation while a client keeps searching and another keeps writing: every
    // search result stays exact throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let searcher = {
        let (client, base, token, stop) = (app.client.clone(), base.to_owned(), front.access.clone(), stop.clone());
        let mut want = by_family["rotham3"].clone();
        want.sort();
        tokio::spawn(async move {
            let mut searches = 0;
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(family_hits(&client, &base, &token, "rotham3").await, want, "during reindex");
                searches += 1;
            }
            searches
        })
    };
    let writer = {
        let (client, base, token, stop) = (app.client.clone(), base.to_owned(), front.access.clone(), stop.clone());
        let id = by_family["rotham6"][0].clone();
        tokio::spawn(async move {
            let mut writes = 0;
            let mut version = 1;
            while !stop.load(Ordering::Relaxed) {
                let body = json!({"resourceType":"Patient","id":id,"name":[{"family":"Rotham6","given":[format!("W{writes}")]}]});
                let r = client
                    .put(format!("{base}/fhir/Patient/{id}"))
                    .bearer_auth(&token)
                    .header("content-type", "application/fhir+json")
                    .header("if-match", format!("W/\"{version}\""))
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                version += 1;
                writes += 1;
            }
            writes
        })
    };
    let out = ok(cli(&app, &["keys", "reindex", "--batch", "7"]));
    stop.store(true, Ordering::Relaxed);
    let (searches, writes) = (searcher.await.unwrap(), writer.await.unwrap());
    assert!(searches > 0 && writes > 0, "searches {searches}, writes {writes}");
    assert!(out.contains("resuming the rebuild under blind-index key version 2"), "{out}");
    assert!(out.contains("destroyed 1 old blind-index key(s)"), "{out}");
    assert_eq!(last_admin_detail(&app), "keys-reindexed");

    let status: Value = serde_json::from_str(&ok(cli(&app, &["keys", "status", "--json"]))).unwrap();
    assert_eq!(status["index_keys"].as_array().unwrap().len(), 1, "the old index key is destroyed");
    assert_eq!(status["rows_below_index_version"], 0);
    assert_eq!(status["rows_by_index_version"]["2"], 41);
    wait_for_index_keys(&app, &[2]).await;
    let new_index = family_index(&app, &first);
    assert_ne!(new_index, v1_index);
    assert_eq!(new_index, vec![app.state.cipher.ring().blind_indexer().index("Patient", "family", "rotham3")]);
    for (family, ids) in &by_family {
        let mut want = ids.clone();
        want.sort();
        assert_eq!(family_hits(&app.client, base, &front.access, family).await, want, "{family} after rotation");
    }
});

both_backends!(apps_are_registered_listed_and_removed, |app: TestApp| async move {
    let w: crate::world::World = app.world().await;
    // A confidential app: the secret is made by the server, shown once, never listed.
    let out = ok(cli(
        &app,
        &[
            "apps",
            "add",
            "--name",
            "Growth <Chart> & Co",
            "--kind",
            "confidential",
            "--redirect-uri",
            crate::smart::REDIRECT,
            "--scopes",
            "launch/patient patient/*.rs",
            "--json",
        ],
    ));
    let added: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let client = added["client_id"].as_str().unwrap().to_owned();
    let secret = added["client_secret"].as_str().unwrap().to_owned();
    assert!(secret.len() >= 43, "256 random bits, base64url");
    let listed = ok(cli(&app, &["apps", "list", "--json"]));
    assert!(listed.contains(&client) && !listed.contains(&secret), "{listed}");
    // Refused registrations name the problem, not the value.
    for (args, why) in [
        (
            vec!["--kind", "public", "--redirect-uri", "http://app.example/cb", "--scopes", "user/Patient.rs"],
            "redirect",
        ),
        (
            vec!["--kind", "public", "--redirect-uri", "https://app.example/cb", "--scopes", "system/Patient.rs"],
            "system/",
        ),
        (
            vec![
                "--kind",
                "backend",
                "--scopes",
                "system/Patient.rs",
                "--role",
                "clinician",
                "--jwks-url",
                "https://x/j",
            ],
            "role",
        ),
        (vec!["--kind", "public", "--redirect-uri", "https://app.example/cb", "--scopes", "openid"], "resource scope"),
    ] {
        let mut all = vec!["apps", "add", "--name", "x"];
        all.extend(args);
        let o = cli(&app, &all);
        assert!(!o.status.success(), "{all:?}");
        assert!(stderr(&o).contains(why), "{all:?}: {}", stderr(&o));
    }
    // The app opens a session; removing the app ends it at once.
    let html = crate::smart::sign_in(&app, &client, "launch/patient patient/Patient.rs", "doc").await;
    let to = crate::smart::consent(&app, &html, "approve", Some(&w.alice)).await.headers()["location"]
        .to_str()
        .unwrap()
        .to_owned();
    let code = to.split("code=").nth(1).unwrap().split('&').next().unwrap().to_owned();
    let r = app
        .client
        .post(app.url("/auth/token"))
        .basic_auth(&client, Some(&secret))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", crate::smart::REDIRECT),
            ("code_verifier", "dBjftJeZ4CVP-mJ92K1hqvqLY0ZA3JnxDoS2yVx6RkWk4nDtlvv7mQaZ2FdLqQbB0cY9"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tokens: serde_json::Value = r.json().await.unwrap();
    let s = crate::helpers::Session { access: tokens["access_token"].as_str().unwrap().into(), refresh: String::new() };
    assert_eq!(app.get_json(&s, &format!("/fhir/Patient/{}", w.alice)).await.0, 200);
    let removed = ok(cli(&app, &["apps", "remove", &client]));
    assert!(removed.contains("1 session(s) ended"), "{removed}");
    app.clock.advance(time::Duration::seconds(6));
    assert_eq!(app.get_json(&s, &format!("/fhir/Patient/{}", w.alice)).await.0, 401);
    assert!(!cli(&app, &["apps", "remove", &client]).status.success(), "gone");
});

both_backends!(service_client_secrets_are_generated_not_chosen, |app: TestApp| async move {
    let o = cli(&app, &["users", "add", "--username", "feed", "--role", "billing", "--service", "--password-stdin"]);
    assert!(!o.status.success() && stderr(&o).contains("generated"), "{}", stderr(&o));
    let out = ok(cli(&app, &["users", "add", "--username", "feed", "--role", "billing", "--service"]));
    let secret = out.lines().find_map(|l| l.strip_prefix("client_secret (shown once, store it now): ")).unwrap();
    assert!(secret.len() >= 43);
    let r = app
        .client
        .post(app.url("/auth/token"))
        .form(&[("grant_type", "client_credentials"), ("client_id", "feed"), ("client_secret", secret)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
});

/// `carevault ARGS…` on the app's database with `input` on standard input.
fn cli_input(app: &TestApp, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_carevault"));
    cmd.arg("--data-dir")
        .arg(app.dir.path())
        .args(args)
        .env("CAREVAULT_DATABASE_URL", db_url(app))
        .env("CAREVAULT_ACCESS__POLICY_DIR", policy_dir())
        .env_remove("CAREVAULT_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    tokio::task::block_in_place(|| {
        let mut child = cmd.spawn().unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    })
}

/// Every administrative audit body, oldest first.
fn admin_bodies(app: &TestApp) -> Vec<Value> {
    let mut conn = app.state.db.conn().unwrap();
    let bodies: Vec<String> = audit_events::table
        .filter(audit_events::kind.eq("admin").or(audit_events::kind.eq("export")))
        .order(audit_events::seq.asc())
        .select(audit_events::body)
        .load(&mut conn)
        .unwrap();
    bodies.iter().map(|b| serde_json::from_str(b).unwrap()).collect()
}

// Each CLI command that changes an account or an app names, as structured fields of its audit record, the account
// it changed (id and username), the role affected and the app's client id; the operator stays the real uid.
both_backends!(cli_account_changes_name_the_target_account_and_role, |app: TestApp| async move {
    let password = "Plenty-of-entropy-here-4711";
    ok(cli_input(
        &app,
        &["users", "add", "--username", "t.billing", "--role", "billing", "--password-stdin"],
        password,
    ));
    ok(cli_input(
        &app,
        &["users", "add", "--username", "t.desk", "--role", "front_desk", "--password-stdin"],
        password,
    ));
    ok(cli(&app, &["users", "add", "--username", "t.feed", "--role", "billing", "--service"]));
    ok(cli(&app, &["users", "totp-enroll", "--username", "t.billing"]));
    ok(cli(&app, &["users", "disable", "t.billing"]));
    ok(cli(&app, &["incident", "contain", "--user", "t.desk"]));
    ok(cli(&app, &["incident", "report", "--user", "t.desk", "--since", "2020-01-01"]));
    let added = ok(cli(
        &app,
        &[
            "apps",
            "add",
            "--name",
            "audit feed",
            "--kind",
            "backend",
            "--role",
            "auditor",
            "--jwks-url",
            "https://feed.example.org/jwks",
            "--scopes",
            "system/AuditEvent.rs",
            "--json",
        ],
    ));
    let client = serde_json::from_str::<Value>(added.trim()).unwrap()["client_id"].as_str().unwrap().to_owned();
    ok(cli(&app, &["apps", "remove", &client]));

    let accounts: Value = serde_json::from_str(&ok(cli(&app, &["users", "list", "--json"]))).unwrap();
    let id_of =
        |name: &str| accounts.as_array().unwrap().iter().find(|a| a["username"] == json!(name)).unwrap()["id"].clone();
    let events = admin_bodies(&app);
    let me = Command::new("id").arg("-un").output().unwrap();
    let me = format!("cli:{}", String::from_utf8_lossy(&me.stdout).trim());
    for (detail, username, role, client_id) in [
        ("user-created", "t.billing", "billing", None),
        ("user-created", "t.desk", "front_desk", None),
        ("user-created", "t.feed", "billing", None),
        ("totp-enrolled", "t.billing", "billing", None),
        ("user-disabled", "t.billing", "billing", None),
        ("incident-contain", "t.desk", "front_desk", None),
        ("incident-report", "t.desk", "front_desk", None),
        ("app-registered", client.as_str(), "auditor", Some(client.as_str())),
        ("app-removed", client.as_str(), "auditor", Some(client.as_str())),
    ] {
        let event = events
            .iter()
            .find(|e| e["detail"] == json!(detail) && e["target"]["username"] == json!(username))
            .unwrap_or_else(|| panic!("no {detail} record naming {username}: {events:#?}"));
        let target = &event["target"];
        assert_eq!(target["account"], id_of(username), "{detail}: {target}");
        assert_eq!(target["role"], json!(role), "{detail}: {target}");
        assert_eq!(target["client_id"], json!(client_id), "{detail}: {target}");
        assert_eq!(event["agent"]["user"], json!(me), "{detail}: the operator is the real uid");
        assert!(!event.to_string().contains(password), "{detail}: no secret in the record");
    }
    // The FHIR form names the account too (entity role 6 User, with the role as a detail).
    let out = ok(cli(&app, &["audit", "export", "--since", "2020-01-01"]));
    let disabled = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["subtype"].as_array().unwrap().iter().any(|c| c["code"] == json!("user-disabled")))
        .unwrap();
    let user = disabled["entity"].as_array().unwrap().iter().find(|e| e["role"]["code"] == json!("6")).unwrap();
    assert_eq!(user["what"]["identifier"]["value"], id_of("t.billing"));
    assert_eq!(user["what"]["display"], json!("t.billing"));
    assert_eq!(user["detail"][0], json!({"type": "role", "valueString": "billing"}));
});

/// A one-shot webhook that answers 200 to every POST and hands over each body.
async fn anchor_webhook() -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/anchors", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                let Some(i) = text.find("\r\n\r\n") else { continue };
                let len = text[..i]
                    .to_lowercase()
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                    .unwrap_or(0);
                if buf.len() >= i + 4 + len {
                    let _ = tx.send(text[i + 4..i + 4 + len].to_owned());
                    let _ = sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                    break;
                }
            }
        }
    });
    (url, rx)
}

// `audit checkpoint` ships its checkpoint to every configured anchor sink, as the server's checkpointer does: the
// webhook receives the anchor line and the anchor directory gets it appended; a sink that cannot take it fails the
// command.
both_backends!(audit_checkpoint_ships_to_every_anchor_sink, |app: TestApp| async move {
    let (url, mut bodies) = anchor_webhook().await;
    let anchors = tempfile::tempdir().unwrap();
    let dir = anchors.path().to_str().unwrap();
    let env = [("CAREVAULT_AUDIT__ANCHOR_WEBHOOK_URL", url.as_str()), ("CAREVAULT_AUDIT__ANCHOR_DIR", dir)];
    let printed: Value = serde_json::from_str(ok(cli_env(&app, &["audit", "checkpoint"], &env)).trim()).unwrap();
    let seq = printed["checkpoint"]["seq"].as_i64().unwrap();
    let posted = tokio::time::timeout(std::time::Duration::from_secs(20), bodies.recv()).await.unwrap().unwrap();
    let shipped = carevault::audit::anchor::parse(&posted).expect("an anchor line");
    assert_eq!(shipped.checkpoint.seq, seq);
    assert_eq!(shipped.sealed_from, Some(app.state.audit.sealer().first_seq()), "the server's line, sealed_from too");
    let mut conn = app.state.db.conn().unwrap();
    let valid = carevault::audit::checkpoints::check(&mut conn, app.state.keys.as_ref(), &shipped.checkpoint).unwrap();
    assert_eq!(valid, Ok(()));
    let in_dir = carevault::audit::anchor::all_in_dir(anchors.path()).unwrap();
    assert_eq!(in_dir.iter().map(|a| a.checkpoint.seq).collect::<Vec<_>>(), vec![seq]);
    // `audit verify` checks the trail against the shipped anchors.
    let verified = ok(cli_env(&app, &["audit", "verify"], &env[1..]));
    assert!(verified.contains("intact"), "{verified}");
    // An anchor directory that cannot be written: the command fails, naming the sinks.
    let file = anchors.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let broken = cli_env(&app, &["audit", "checkpoint"], &[("CAREVAULT_AUDIT__ANCHOR_DIR", file.to_str().unwrap())]);
    assert!(!broken.status.success(), "{}", stdout(&broken));
    assert!(stderr(&broken).contains("`audit.anchor_dir`"), "{}", stderr(&broken));
});
