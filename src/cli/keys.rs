//! `carevault keys status | rotate | reencrypt | reindex | rotate-master | rotate-signing` (CONTRACT §6,
//! docs/key-rotation.md).
//!
//! Guarantees: every command works online, next to running servers (which pick up a new data or signing key
//! within [`crate::app::KEY_POLL`]); every one is recorded in the audit trail. `reencrypt` never loses a
//! concurrent update (a current row is replaced only if its `version_id` is still the one read, otherwise it is
//! read again), commits batch by batch, and is resumable: it works on whatever is still below the active version.
//! A row it cannot decrypt is left untouched and reported (by type, id and version, never content), and the
//! command then fails. `reindex` rotates the blind-index key and rebuilds every search index under it, with the
//! same guarantees (see [`crate::records::reindex`]); the old index key is destroyed only when no row uses it.
//! `rotate-master` rewraps every stored key in one transaction: all or nothing.

use super::{Cli, CliError, Context};
use crate::auth::service::{from_micros, rotate_signing_key, signing_key_id};
use crate::crypto::store::{KeyRow, master_provider};
use crate::crypto::{CryptoError, FieldAad, FieldCipher, KeyProvider, LocalKeyProvider, MasterKey};
use crate::error::{AppError, AppResult};
use crate::store::schema::{break_glass, crypto_keys, resource_history, resources, signing_keys};
use crate::store::{AnyConnection, db_err};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use diesel::prelude::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Key versions, rows per data-key version, master key id, signing keys.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Create a new active data key; older versions stay readable (run `keys reencrypt` next).
    Rotate,
    /// Re-encrypt every stored row still under an older data key with the active one (online, resumable).
    Reencrypt {
        /// Rows per transaction.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        batch: i64,
    },
    /// Rotate the blind-index key and rebuild every search index under it (online, resumable: after an
    /// interruption, run it again to finish the same rotation).
    Reindex {
        /// Rows per transaction.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        batch: i64,
    },
    /// Rewrap every stored key under a new master key, then point `keys.master_key_file` at it.
    RotateMaster {
        #[arg(long)]
        new_master_key_file: PathBuf,
    },
    /// Create a new token-signing key; the previous one stays published until its tokens have expired.
    RotateSigning,
}

pub fn run(cli: &Cli, cmd: &KeysCommand) -> Result<(), CliError> {
    if let KeysCommand::RotateMaster { new_master_key_file } = cmd {
        return rotate_master(cli, new_master_key_file);
    }
    let state = super::open_state(cli)?;
    let now = state.clock.now();
    let mut conn = super::connect(&state)?;
    match cmd {
        KeysCommand::Status { json } => {
            let report = status(&mut conn, state.keys.as_ref()).context("cannot read the key status")?;
            super::audit_admin(&state, &mut conn, "keys-status")?;
            if *json {
                println!("{report}");
            } else {
                print_status(&report);
            }
            Ok(())
        }
        KeysCommand::Rotate => {
            let version = crate::crypto::store::rotate(&mut conn, state.keys.as_ref(), now)
                .context("cannot rotate the data key")?;
            super::audit_admin(&state, &mut conn, "keys-rotated")?;
            println!("data key version {version} is now active; run `carevault keys reencrypt` to move older rows");
            Ok(())
        }
        KeysCommand::Reencrypt { batch } => {
            // The newest stored ring (another process may have rotated since this one opened).
            let ring = crate::crypto::store::load(&mut conn, state.keys.as_ref())?;
            state.cipher.replace_ring(ring);
            let result = reencrypt(&mut conn, &state.cipher, *batch);
            let outcome = match &result {
                Ok(r) if r.remaining == 0 => "keys-reencrypted",
                _ => "keys-reencrypt-incomplete",
            };
            super::audit_admin(&state, &mut conn, outcome)?;
            let r = result.context("cannot re-encrypt")?;
            println!(
                "re-encrypted {} current and {} history row(s) and {} break-glass reason(s) to data key version {} \
                 ({} concurrent update(s) retried)",
                r.resources, r.history, r.grants, r.active, r.conflicts
            );
            if r.remaining > 0 {
                for f in &r.failed {
                    eprintln!("cannot re-encrypt {f}");
                }
                return Err(format!(
                    "{} row(s) remain below data key version {}; fix the rows named above, then run `keys reencrypt` again",
                    r.remaining, r.active
                )
                .into());
            }
            Ok(())
        }
        KeysCommand::Reindex { batch } => reindex(&state, &mut conn, *batch),
        KeysCommand::RotateSigning => {
            let kid =
                rotate_signing_key(&mut conn, state.keys.as_ref(), now).context("cannot rotate the signing key")?;
            super::audit_admin(&state, &mut conn, "signing-key-rotated")?;
            println!("token-signing key {kid} is now active; the previous key stays published until its tokens expire");
            Ok(())
        }
        KeysCommand::RotateMaster { .. } => Ok(()),
    }
}

/// `keys reindex`: begin (or resume) an index-key rotation, let running servers load the new key, rebuild, then
/// destroy the old key.
fn reindex(state: &crate::app::AppState, conn: &mut AnyConnection, batch: i64) -> Result<(), CliError> {
    use crate::crypto::store::{begin_index_rotation, finish_index_rotation, load};
    let rotation = begin_index_rotation(conn, state.keys.as_ref(), state.clock.now())
        .context("cannot begin the index rotation")?;
    if rotation.new_key {
        super::audit_admin(state, conn, "index-key-rotated")?;
        println!("blind-index key version {} created; rebuilding the search index under it", rotation.version);
    } else {
        println!("resuming the rebuild under blind-index key version {}", rotation.version);
    }
    state.cipher.replace_ring(load(conn, state.keys.as_ref())?);
    // Running servers load the new key within KEY_POLL; until then they search under the old key only, so rows
    // rebuilt earlier would be missing from their results. Wait two polls from the key's creation.
    let settle = rotation.created_at + crate::app::KEY_POLL * 2 - state.clock.now();
    if let Ok(wait) = std::time::Duration::try_from(settle)
        && !wait.is_zero()
    {
        eprintln!("waiting {}s for running servers to load the new index key", wait.as_secs().max(1));
        std::thread::sleep(wait);
    }
    let version = i32::try_from(rotation.version).map_err(|_| "index key version out of range")?;
    let total = crate::records::reindex::below(conn, version).context("cannot count the rows to reindex")?;
    let bar = super::progress(u64::try_from(total).unwrap_or(0), "reindexing");
    let result = crate::records::reindex::reindex(&state.records, conn, batch, &|n| {
        if bar.position() + n > bar.length().unwrap_or(0) {
            bar.inc_length(n);
        }
        bar.inc(n);
    });
    bar.finish_and_clear();
    let destroyed = match &result {
        Ok(r) if r.remaining == 0 && r.failed.is_empty() => finish_index_rotation(conn, r.index_version).ok(),
        _ => None,
    };
    super::audit_admin(state, conn, if destroyed.is_some() { "keys-reindexed" } else { "keys-reindex-incomplete" })?;
    let r = result.context("cannot rebuild the search index")?;
    println!(
        "rebuilt the search index of {} resource(s) under blind-index key version {} ({} concurrent update(s))",
        r.rebuilt, r.index_version, r.conflicts
    );
    if let Some(n) = destroyed {
        state.cipher.replace_ring(load(conn, state.keys.as_ref())?);
        println!("destroyed {n} old blind-index key(s)");
        return Ok(());
    }
    for f in &r.failed {
        eprintln!("cannot reindex {f}");
    }
    // Counted again: a server that had not reloaded may have written under the old key after the last pass.
    let remaining = crate::records::reindex::below(conn, version).context("cannot count the rows to reindex")?;
    Err(format!(
        "{remaining} resource(s) still use an older blind-index key, which is kept; fix the rows named above (if \
         any), then run `keys reindex` again to finish this rotation"
    )
    .into())
}

fn rfc3339(micros: i64) -> String {
    from_micros(micros).format(&Rfc3339).unwrap_or_default()
}

/// Rows per `key_version` of one table.
fn counts(conn: &mut AnyConnection, history: bool) -> AppResult<BTreeMap<i32, i64>> {
    let rows: Vec<(i32, i64)> = if history {
        resource_history::table
            .group_by(resource_history::key_version)
            .select((resource_history::key_version, diesel::dsl::count_star()))
            .load(conn)
    } else {
        resources::table
            .group_by(resources::key_version)
            .select((resources::key_version, diesel::dsl::count_star()))
            .load(conn)
    }
    .map_err(db_err)?;
    Ok(rows.into_iter().collect())
}

/// The non-secret state of every key, as JSON (the `--json` output).
pub fn status(conn: &mut AnyConnection, provider: &dyn KeyProvider) -> AppResult<Value> {
    let keys: Vec<KeyRow> = crate::crypto::store::list(conn)?;
    let active = keys.iter().filter(|k| k.purpose == "data" && k.state == "active").map(|k| k.version).max();
    let index = keys.iter().filter(|k| k.purpose == "index").map(|k| k.version).max();
    let index_keys: Vec<Value> = keys
        .iter()
        .filter(|k| k.purpose == "index")
        .map(|k| json!({"version": k.version, "state": k.state, "master_key_id": k.master_id, "created": rfc3339(k.created_at)}))
        .collect();
    let by_index: BTreeMap<i32, i64> = crate::records::store::rows_by_index_version(conn)?.into_iter().collect();
    let below_index: i64 = by_index.iter().filter(|(v, _)| Some(**v) < index).map(|(_, n)| *n).sum();
    let data_keys: Vec<Value> = keys
        .iter()
        .filter(|k| k.purpose == "data")
        .map(|k| json!({"version": k.version, "state": k.state, "master_key_id": k.master_id, "created": rfc3339(k.created_at)}))
        .collect();
    let (current, history) = (counts(conn, false)?, counts(conn, true)?);
    let active_v = active.unwrap_or(0);
    let grants_below = i64::try_from(grants_below(conn, active_v)?.len()).unwrap_or(i64::MAX);
    let below: i64 = current.iter().chain(history.iter()).filter(|(v, _)| **v < active_v).map(|(_, n)| *n).sum::<i64>()
        + grants_below;
    let by_version = |m: &BTreeMap<i32, i64>| -> Value { m.iter().map(|(v, n)| (v.to_string(), json!(n))).collect() };
    let signing: Vec<(String, i64, Option<i64>)> = signing_keys::table
        .order(signing_keys::created_at.asc())
        .select((signing_keys::kid, signing_keys::created_at, signing_keys::retired_at))
        .load(conn)
        .map_err(db_err)?;
    let signing: Vec<Value> = signing
        .into_iter()
        .map(|(kid, created, retired)| {
            json!({"kid": kid, "state": if retired.is_some() { "retiring" } else { "active" },
                   "created": rfc3339(created), "retired": retired.map(rfc3339)})
        })
        .collect();
    let checkpoint: Vec<Value> = crate::audit::checkpoints::list_keys(conn)?
        .into_iter()
        .map(|(id, created, retired)| json!({"key_id": id, "created": rfc3339(created), "retired": retired.map(rfc3339)}))
        .collect();
    let stale = keys.iter().filter(|k| k.master_id != provider.id()).count();
    Ok(json!({
        "master_key_id": provider.id(),
        "keys_wrapped_by_other_master_keys": stale,
        "active_data_key_version": active,
        "index_key_version": index,
        "index_keys": index_keys,
        "rows_by_index_version": by_version(&by_index),
        "rows_below_index_version": below_index,
        "data_keys": data_keys,
        "rows_by_key_version": {"resources": by_version(&current), "resource_history": by_version(&history)},
        "rows_below_active_version": below,
        "break_glass_reasons_below_active_version": grants_below,
        "signing_keys": signing,
        "audit_checkpoint_keys": checkpoint,
    }))
}

fn print_status(s: &Value) {
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    println!("master key:            {}", text(&s["master_key_id"]));
    println!("active data key:       v{}", s["active_data_key_version"]);
    println!("blind-index key:       v{}", s["index_key_version"]);
    let older: Vec<String> = s["index_keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|k| k["version"] != s["index_key_version"])
        .map(|k| format!("v{}", k["version"]))
        .collect();
    if !older.is_empty() {
        println!(
            "  rotation in progress: {} still searched; {} resource(s) to rebuild (run `keys reindex`)",
            older.join(", "),
            s["rows_below_index_version"]
        );
    }
    println!("data keys:");
    for k in s["data_keys"].as_array().into_iter().flatten() {
        println!(
            "  v{:<4} {:<8} created {}  wrapped by {}",
            k["version"],
            text(&k["state"]),
            text(&k["created"]),
            text(&k["master_key_id"])
        );
    }
    for table in ["resources", "resource_history"] {
        let counts = s["rows_by_key_version"][table]
            .as_object()
            .map(|m| m.iter().map(|(v, n)| format!("v{v}: {n}")).collect::<Vec<_>>().join(", "));
        println!("rows in {table:<17} {}", counts.filter(|c| !c.is_empty()).unwrap_or_else(|| "none".into()));
    }
    println!("rows below the active version: {}", s["rows_below_active_version"]);
    println!("token-signing keys:");
    for k in s["signing_keys"].as_array().into_iter().flatten() {
        let retired = k["retired"].as_str().map(|r| format!(", retired {r}")).unwrap_or_default();
        println!("  {}  {:<8} created {}{retired}", text(&k["kid"]), text(&k["state"]), text(&k["created"]));
    }
    println!("audit checkpoint keys:");
    for k in s["audit_checkpoint_keys"].as_array().into_iter().flatten() {
        println!("  {}  created {}", text(&k["key_id"]), text(&k["created"]));
    }
    if s["keys_wrapped_by_other_master_keys"].as_u64().is_some_and(|n| n > 0) {
        println!("WARNING: some keys are wrapped by another master key; see docs/key-rotation.md");
    }
}

/// What a `reencrypt` run did.
#[derive(Debug, Default)]
pub struct Reencrypted {
    pub active: u32,
    pub resources: u64,
    pub history: u64,
    /// Break-glass grants whose encrypted reason was moved.
    pub grants: u64,
    /// Current rows changed by another writer between read and update (each was read again).
    pub conflicts: u64,
    /// Rows that could not be re-encrypted (`Type/id/_history/version`).
    pub failed: Vec<String>,
    /// Rows still below the active version at the end.
    pub remaining: i64,
}

/// Re-encrypts each top-level element whose value is a `cv1:` ciphertext (AAD: type, id, element name) under the
/// active key. Anything that does not decrypt fails the whole row (nothing partial is written).
pub fn reencrypt_content(cipher: &FieldCipher, rtype: &str, id: &str, content: &str) -> Result<String, CryptoError> {
    let mut doc: Value = serde_json::from_str(content).map_err(|_| CryptoError::Malformed)?;
    let obj = doc.as_object_mut().ok_or(CryptoError::Malformed)?;
    for (element, value) in obj.iter_mut() {
        if let Value::String(ct) = value
            && ct.starts_with("cv1:")
            && let Some(fresh) = cipher.reencrypt(&FieldAad::new(rtype, id, element), ct)?
        {
            *value = Value::String(fresh);
        }
    }
    serde_json::to_string(&doc).map_err(|_| CryptoError::Encrypt)
}

fn below_active(conn: &mut AnyConnection, active: i32) -> AppResult<i64> {
    let current: i64 =
        resources::table.filter(resources::key_version.lt(active)).count().get_result(conn).map_err(db_err)?;
    let history: i64 = resource_history::table
        .filter(resource_history::key_version.lt(active))
        .count()
        .get_result(conn)
        .map_err(db_err)?;
    let grants = i64::try_from(grants_below(conn, active)?.len()).unwrap_or(i64::MAX);
    Ok(current + history + grants)
}

/// Break-glass grants whose encrypted reason uses a data key below `active`: (id, reason ciphertext). The table
/// is small (one row per emergency access) and has no version column, so the versions are read off the
/// ciphertexts.
fn grants_below(conn: &mut AnyConnection, active: i32) -> AppResult<Vec<(String, String)>> {
    let rows: Vec<(String, String)> =
        break_glass::table.select((break_glass::id, break_glass::reason)).load(conn).map_err(db_err)?;
    let active = u32::try_from(active).unwrap_or(0);
    Ok(rows.into_iter().filter(|(_, ct)| FieldCipher::version_of(ct).is_none_or(|v| v < active)).collect())
}

/// Re-encrypts the reasons of break-glass grants still under an older key. A reason changed meanwhile (it never
/// is: grants are written once) is left for the next pass.
fn break_glass_pass(
    conn: &mut AnyConnection,
    cipher: &FieldCipher,
    active: i32,
    bar: &indicatif::ProgressBar,
    report: &mut Reencrypted,
) -> AppResult<()> {
    for (id, ct) in grants_below(conn, active)? {
        match cipher.reencrypt(&FieldAad::new("BreakGlass", &id, "reason"), &ct) {
            Ok(Some(fresh)) => {
                let n = diesel::update(
                    break_glass::table.filter(break_glass::id.eq(&id)).filter(break_glass::reason.eq(&ct)),
                )
                .set(break_glass::reason.eq(fresh))
                .execute(conn)
                .map_err(db_err)?;
                report.grants += n as u64;
            }
            Ok(None) => {}
            Err(_) => report.failed.push(format!("break-glass grant {id}")),
        }
        bar.inc(1);
    }
    Ok(())
}

/// Most passes of one run: rows written under an old key during the run are picked up by the next pass, but a
/// writer that keeps doing so (a replica that never reloads) must not keep the command running forever.
const MAX_PASSES: usize = 5;

/// Moves every row below the cipher's active version to it (current and history rows, and the encrypted reasons
/// of break-glass grants), `batch` rows per transaction, with a progress bar.
/// Passes repeat (up to [`MAX_PASSES`]) while they make progress, so rows written under an old key during the run
/// (by a replica that had not yet reloaded its keys) are picked up too.
pub fn reencrypt(conn: &mut AnyConnection, cipher: &FieldCipher, batch: i64) -> AppResult<Reencrypted> {
    let active_u = cipher.active_version();
    let active = i32::try_from(active_u).map_err(|_| AppError::internal("key version out of range"))?;
    let mut report = Reencrypted { active: active_u, ..Default::default() };
    let bar = super::progress(u64::try_from(below_active(conn, active)?).unwrap_or(0), "re-encrypting");
    for _ in 0..MAX_PASSES {
        report.failed.clear();
        let before = report.resources + report.history + report.grants;
        current_pass(conn, cipher, active, batch, &bar, &mut report)?;
        history_pass(conn, cipher, active, batch, &bar, &mut report)?;
        break_glass_pass(conn, cipher, active, &bar, &mut report)?;
        report.remaining = below_active(conn, active)?;
        if report.remaining == 0 || report.resources + report.history + report.grants == before {
            break;
        }
        bar.inc_length(u64::try_from(report.remaining).unwrap_or(0));
    }
    bar.finish_and_clear();
    Ok(report)
}

type CurrentRow = (String, String, i64, String);

fn current_pass(
    conn: &mut AnyConnection,
    cipher: &FieldCipher,
    active: i32,
    batch: i64,
    bar: &indicatif::ProgressBar,
    report: &mut Reencrypted,
) -> AppResult<()> {
    use resources::dsl as r;
    let mut cursor = (String::new(), String::new());
    loop {
        let rows: Vec<CurrentRow> = r::resources
            .filter(r::key_version.lt(active))
            .filter(r::resource_type.gt(&cursor.0).or(r::resource_type.eq(&cursor.0).and(r::id.gt(&cursor.1))))
            .order((r::resource_type.asc(), r::id.asc()))
            .limit(batch)
            .select((r::resource_type, r::id, r::version_id, r::content))
            .load(conn)
            .map_err(db_err)?;
        let Some(last) = rows.last() else { return Ok(()) };
        cursor = (last.0.clone(), last.1.clone());
        let mut ready = Vec::with_capacity(rows.len());
        for (rtype, id, version, content) in rows {
            match reencrypt_content(cipher, &rtype, &id, &content) {
                Ok(fresh) => ready.push((rtype, id, version, fresh)),
                Err(_) => report.failed.push(format!("{rtype}/{id}/_history/{version}")),
            }
        }
        // One transaction per batch; a row whose version moved on is retried on its own afterwards.
        let conflicted = conn.transaction(|c| {
            let mut conflicted = Vec::new();
            for (rtype, id, version, fresh) in &ready {
                let n = diesel::update(
                    r::resources
                        .filter(r::resource_type.eq(rtype))
                        .filter(r::id.eq(id))
                        .filter(r::version_id.eq(version)),
                )
                .set((r::content.eq(fresh), r::key_version.eq(active)))
                .execute(c)?;
                if n == 1 {
                    report.resources += 1;
                } else {
                    conflicted.push((rtype.clone(), id.clone()));
                }
            }
            Ok::<_, diesel::result::Error>(conflicted)
        });
        let conflicted = conflicted.map_err(db_err)?;
        report.conflicts += conflicted.len() as u64;
        for (rtype, id) in conflicted {
            retry_current(conn, cipher, active, &rtype, &id, report)?;
        }
        bar.inc(ready.len() as u64);
    }
}

/// Re-reads one current row changed by another writer and tries again, until it is current or moved.
fn retry_current(
    conn: &mut AnyConnection,
    cipher: &FieldCipher,
    active: i32,
    rtype: &str,
    id: &str,
    report: &mut Reencrypted,
) -> AppResult<()> {
    use resources::dsl as r;
    for _ in 0..20 {
        let row: Option<(i64, i32, String)> = r::resources
            .filter(r::resource_type.eq(rtype))
            .filter(r::id.eq(id))
            .select((r::version_id, r::key_version, r::content))
            .first(conn)
            .optional()
            .map_err(db_err)?;
        let Some((version, key_version, content)) = row else { return Ok(()) };
        if key_version >= active {
            return Ok(());
        }
        let Ok(fresh) = reencrypt_content(cipher, rtype, id, &content) else {
            report.failed.push(format!("{rtype}/{id}/_history/{version}"));
            return Ok(());
        };
        let n = diesel::update(
            r::resources.filter(r::resource_type.eq(rtype)).filter(r::id.eq(id)).filter(r::version_id.eq(version)),
        )
        .set((r::content.eq(fresh), r::key_version.eq(active)))
        .execute(conn)
        .map_err(db_err)?;
        if n == 1 {
            report.resources += 1;
            return Ok(());
        }
        report.conflicts += 1;
    }
    // Still contended: left for the next pass (or run).
    Ok(())
}

type HistoryKey = (String, String, i64);

fn history_pass(
    conn: &mut AnyConnection,
    cipher: &FieldCipher,
    active: i32,
    batch: i64,
    bar: &indicatif::ProgressBar,
    report: &mut Reencrypted,
) -> AppResult<()> {
    use resource_history::dsl as h;
    let mut cursor: HistoryKey = (String::new(), String::new(), 0);
    loop {
        let (ct, ci, cv) = cursor.clone();
        let rows: Vec<(String, String, i64, String)> = h::resource_history
            .filter(h::key_version.lt(active))
            .filter(
                h::resource_type
                    .gt(ct.clone())
                    .or(h::resource_type.eq(ct.clone()).and(h::id.gt(ci.clone())))
                    .or(h::resource_type.eq(ct).and(h::id.eq(ci)).and(h::version_id.gt(cv))),
            )
            .order((h::resource_type.asc(), h::id.asc(), h::version_id.asc()))
            .limit(batch)
            .select((h::resource_type, h::id, h::version_id, h::content))
            .load(conn)
            .map_err(db_err)?;
        let Some(last) = rows.last() else { return Ok(()) };
        cursor = (last.0.clone(), last.1.clone(), last.2);
        let mut ready = Vec::with_capacity(rows.len());
        for (rtype, id, version, content) in rows {
            match reencrypt_content(cipher, &rtype, &id, &content) {
                Ok(fresh) => ready.push((rtype, id, version, fresh)),
                Err(_) => report.failed.push(format!("{rtype}/{id}/_history/{version}")),
            }
        }
        // History rows are immutable (only this command rewrites them, with the same plaintext): plain updates.
        let moved = conn
            .transaction(|c| {
                let mut moved = 0u64;
                for (rtype, id, version, fresh) in &ready {
                    moved += diesel::update(
                        h::resource_history
                            .filter(h::resource_type.eq(rtype))
                            .filter(h::id.eq(id))
                            .filter(h::version_id.eq(version))
                            .filter(h::key_version.lt(active)),
                    )
                    .set((h::content.eq(fresh), h::key_version.eq(active)))
                    .execute(c)? as u64;
                }
                Ok::<_, diesel::result::Error>(moved)
            })
            .map_err(db_err)?;
        report.history += moved;
        bar.inc(ready.len() as u64);
    }
}

/// `keys rotate-master`: unwraps every stored key (data, index, token-signing, audit-checkpoint) with the
/// configured master key and wraps it with the one in `file`, in one transaction.
fn rotate_master(cli: &Cli, file: &std::path::Path) -> Result<(), CliError> {
    let cfg = cli.load_config(|_| {})?;
    let new: Box<dyn KeyProvider> = Box::new(LocalKeyProvider::new(MasterKey::load_file(file)?));
    let db = crate::store::Db::connect(&cfg.database()?, 2)?;
    db.migrate()?;
    let mut conn = db.conn().context("cannot get a database connection")?;
    let done = format!(
        "now set keys.master_key_file = \"{}\" on every host and restart them one at a time; keep the old key file \
         until all run with the new one, then destroy it",
        file.display()
    );
    let wrapped_by: Vec<String> = crypto_keys::table.select(crypto_keys::master_id).load(&mut conn)?;
    if !wrapped_by.is_empty() && wrapped_by.iter().all(|m| *m == new.id()) {
        println!("every key is already wrapped by master key {}; {done}", new.id());
        return Ok(());
    }
    let old = master_provider(&cfg)?;
    if old.id() == new.id() {
        return Err("the new master key file holds the master key already in use".into());
    }
    let now = crate::clock::system().now();
    let counts = conn
        .transaction(|c| {
            let data = crate::crypto::store::rewrap(c, old.as_ref(), new.as_ref())?;
            let signing = rewrap_signing(c, old.as_ref(), new.as_ref())?;
            let checkpoint = crate::audit::checkpoints::rewrap(c, old.as_ref(), new.as_ref())?;
            crate::audit::store::append(c, &[super::admin_event(now, "master-key-rotated")])?;
            Ok::<_, AppError>((data, signing, checkpoint))
        })
        .context("cannot rewrap the keys; nothing was changed")?;
    println!(
        "rewrapped {} data/index key(s), {} token-signing key(s) and {} audit checkpoint key(s) under master key {}",
        counts.0,
        counts.1,
        counts.2,
        new.id()
    );
    println!("{done}");
    Ok(())
}

fn rewrap_signing(conn: &mut AnyConnection, old: &dyn KeyProvider, new: &dyn KeyProvider) -> AppResult<usize> {
    let rows: Vec<(String, String)> =
        signing_keys::table.select((signing_keys::kid, signing_keys::wrapped)).load(conn).map_err(db_err)?;
    for (kid, wrapped) in &rows {
        let bytes = STANDARD.decode(wrapped).map_err(|_| AppError::internal("signing key is malformed"))?;
        let pkcs8 = old.unwrap(&signing_key_id(kid), &bytes)?;
        let again = new.wrap(&signing_key_id(kid), &pkcs8)?;
        diesel::update(signing_keys::table.filter(signing_keys::kid.eq(kid)))
            .set(signing_keys::wrapped.eq(STANDARD.encode(again)))
            .execute(conn)
            .map_err(db_err)?;
    }
    Ok(rows.len())
}
