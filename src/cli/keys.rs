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
use crate::crypto::{KeyProvider, LocalKeyProvider, MasterKey};
use crate::error::{AppError, AppResult};
use crate::store::schema::{crypto_keys, signing_keys};
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
            let bar = super::progress(0, "re-encrypting");
            let result = crate::records::maintenance::reencrypt(&mut conn, &state.cipher, *batch, &bar);
            bar.finish_and_clear();
            let outcome = match &result {
                Ok(r) if r.remaining == 0 => "keys-reencrypted",
                _ => "keys-reencrypt-incomplete",
            };
            super::audit_admin(&state, &mut conn, outcome)?;
            let r = result.context("cannot re-encrypt")?;
            println!(
                "re-encrypted {} current and {} history row(s), {} break-glass reason(s) and {} alert note(s) to data \
                 key version {} ({} concurrent update(s) retried)",
                r.resources, r.history, r.grants, r.notes, r.active, r.conflicts
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
    let total = crate::records::maintenance::below(conn, version).context("cannot count the rows to reindex")?;
    let bar = super::progress(u64::try_from(total).unwrap_or(0), "reindexing");
    let result = crate::records::maintenance::reindex(&state.records, conn, batch, &|n| {
        if bar.position() + n > bar.length().unwrap_or(0) {
            bar.inc_length(n);
        }
        bar.inc(n);
    });
    bar.finish_and_clear();
    let destroyed = match &result {
        Ok(r) if r.remaining == 0 && r.failed.is_empty() => {
            // A concurrent writer can hold the lock for a moment: a few tries before giving up.
            let mut finished = None;
            for attempt in 1..=5 {
                match finish_index_rotation(conn, r.index_version, crate::records::maintenance::below) {
                    Ok(n) => {
                        finished = Some(n);
                        break;
                    }
                    Err(e) if attempt == 5 => eprintln!("cannot retire the old blind-index keys: {e}"),
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(200 * attempt)),
                }
            }
            finished
        }
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
    let remaining = crate::records::maintenance::below(conn, version).context("cannot count the rows to reindex")?;
    Err(format!(
        "{remaining} resource(s) still use an older blind-index key, which is kept; fix the rows named above (if \
         any), then run `keys reindex` again to finish this rotation"
    )
    .into())
}

fn rfc3339(micros: i64) -> String {
    from_micros(micros).format(&Rfc3339).unwrap_or_default()
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
    let by_index: BTreeMap<i32, i64> = crate::records::maintenance::rows_by_index_version(conn)?.into_iter().collect();
    let below_index: i64 = by_index.iter().filter(|(v, _)| Some(**v) < index).map(|(_, n)| *n).sum();
    let data_keys: Vec<Value> = keys
        .iter()
        .filter(|k| k.purpose == "data")
        .map(|k| json!({"version": k.version, "state": k.state, "master_key_id": k.master_id, "created": rfc3339(k.created_at)}))
        .collect();
    let (current, history) = (
        crate::records::maintenance::key_version_counts(conn, false)?,
        crate::records::maintenance::key_version_counts(conn, true)?,
    );
    let active_v = active.unwrap_or(0);
    let (grants_below, notes_below) = crate::records::maintenance::sealed_text_below(conn, active_v)?;
    let below: i64 = current.iter().chain(history.iter()).filter(|(v, _)| **v < active_v).map(|(_, n)| *n).sum::<i64>()
        + grants_below
        + notes_below;
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
        "alert_notes_below_active_version": notes_below,
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

/// `keys rotate-master`: unwraps every stored key (data, index, token-signing, audit-checkpoint) with the
/// configured master key and wraps it with the one in `file`, in one transaction.
fn rotate_master(cli: &Cli, file: &std::path::Path) -> Result<(), CliError> {
    let cfg = cli.load_config(|_| {})?;
    super::require_existing_data(&cfg)?;
    let key = MasterKey::load_file(file)?;
    crate::crypto::store::refuse_development_key(cfg.profile, &key, "--new-master-key-file")?;
    let new: Box<dyn KeyProvider> = Box::new(LocalKeyProvider::new(key));
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
            // The seal key is rewrapped too (its bytes, and so every seal, stay the same).
            let sealer = crate::audit::seal::load_or_create(c, old.as_ref(), now)?;
            crate::audit::seal::rewrap(c, old.as_ref(), new.as_ref())?;
            crate::audit::store::append(c, &sealer, &[super::admin_event(now, "master-key-rotated")])?;
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
