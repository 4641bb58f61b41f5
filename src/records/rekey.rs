//! `keys reencrypt` and `keys status` on stored records: every encrypted column (resource and history
//! documents, break-glass reasons, alert acknowledgement notes) moved to the active data key, online, in
//! batches, with version checks against concurrent writers.

use crate::crypto::{CryptoError, FieldAad, FieldCipher};
use crate::error::{AppError, AppResult};
use crate::store::schema::{alerts, break_glass, resource_history, resources};
use crate::store::{AnyConnection, db_err};
use diesel::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;

/// Rows per `key_version` of one table.
pub fn key_version_counts(conn: &mut AnyConnection, history: bool) -> AppResult<BTreeMap<i32, i64>> {
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

/// What a `reencrypt` run did.
#[derive(Debug, Default)]
pub struct Reencrypted {
    pub active: u32,
    pub resources: u64,
    pub history: u64,
    /// Break-glass grants whose encrypted reason was moved.
    pub grants: u64,
    /// Alert acknowledgement notes moved.
    pub notes: u64,
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
    let notes = i64::try_from(notes_below(conn, active)?.len()).unwrap_or(i64::MAX);
    Ok(current + history + grants + notes)
}

/// Break-glass reasons and alert notes (the sealed free texts) still under a data key below `active`:
/// (reasons, notes).
pub fn sealed_text_below(conn: &mut AnyConnection, active: i32) -> AppResult<(i64, i64)> {
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    Ok((count(grants_below(conn, active)?.len()), count(notes_below(conn, active)?.len())))
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

/// Alert acknowledgement notes under a data key below `active`: (alert id, note ciphertext). Few rows, no
/// version column: the versions are read off the ciphertexts.
fn notes_below(conn: &mut AnyConnection, active: i32) -> AppResult<Vec<(String, String)>> {
    let rows: Vec<(String, Option<String>)> = alerts::table
        .filter(alerts::ack_note.is_not_null())
        .select((alerts::id, alerts::ack_note))
        .load(conn)
        .map_err(db_err)?;
    let active = u32::try_from(active).unwrap_or(0);
    Ok(rows
        .into_iter()
        .filter_map(|(id, ct)| ct.map(|ct| (id, ct)))
        .filter(|(_, ct)| FieldCipher::version_of(ct).is_none_or(|v| v < active))
        .collect())
}

/// The free texts sealed outside resource documents: break-glass reasons and alert acknowledgement notes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sealed {
    Reason,
    Note,
}

/// Re-encrypts the sealed texts of one kind still under an older key. They are written once; one changed
/// meanwhile is left for the next pass (the update checks the old ciphertext).
fn sealed_pass(
    conn: &mut AnyConnection,
    cipher: &FieldCipher,
    active: i32,
    kind: Sealed,
    bar: &indicatif::ProgressBar,
    report: &mut Reencrypted,
) -> AppResult<()> {
    let rows = match kind {
        Sealed::Reason => grants_below(conn, active)?,
        Sealed::Note => notes_below(conn, active)?,
    };
    for (id, ct) in rows {
        let aad = match kind {
            Sealed::Reason => FieldAad::new("BreakGlass", &id, "reason"),
            Sealed::Note => crate::monitor::ack_note_aad(&id),
        };
        match cipher.reencrypt(&aad, &ct) {
            Ok(Some(fresh)) => {
                let n = match kind {
                    Sealed::Reason => diesel::update(
                        break_glass::table.filter(break_glass::id.eq(&id)).filter(break_glass::reason.eq(&ct)),
                    )
                    .set(break_glass::reason.eq(fresh))
                    .execute(conn),
                    Sealed::Note => {
                        diesel::update(alerts::table.filter(alerts::id.eq(&id)).filter(alerts::ack_note.eq(&ct)))
                            .set(alerts::ack_note.eq(fresh))
                            .execute(conn)
                    }
                }
                .map_err(db_err)? as u64;
                match kind {
                    Sealed::Reason => report.grants += n,
                    Sealed::Note => report.notes += n,
                }
            }
            Ok(None) => {}
            Err(_) => report.failed.push(match kind {
                Sealed::Reason => format!("break-glass grant {id}"),
                Sealed::Note => format!("alert note {id}"),
            }),
        }
        bar.inc(1);
    }
    Ok(())
}

/// Most passes of one run: rows written under an old key during the run are picked up by the next pass, but a
/// writer that keeps doing so (a replica that never reloads) must not keep the command running forever.
const MAX_PASSES: usize = 5;

/// Moves every row below the cipher's active version to it (current and history rows, the encrypted reasons of
/// break-glass grants and alert acknowledgement notes), `batch` rows per transaction, with a progress bar.
/// Passes repeat (up to [`MAX_PASSES`]) while they make progress, so rows written under an old key during the run
/// (by a replica that had not yet reloaded its keys) are picked up too.
pub fn reencrypt(
    conn: &mut AnyConnection,
    cipher: &FieldCipher,
    batch: i64,
    bar: &indicatif::ProgressBar,
) -> AppResult<Reencrypted> {
    let active_u = cipher.active_version();
    let active = i32::try_from(active_u).map_err(|_| AppError::internal("key version out of range"))?;
    let mut report = Reencrypted { active: active_u, ..Default::default() };
    bar.set_length(u64::try_from(below_active(conn, active)?).unwrap_or(0));
    for _ in 0..MAX_PASSES {
        report.failed.clear();
        let before = report.resources + report.history + report.grants + report.notes;
        current_pass(conn, cipher, active, batch, bar, &mut report)?;
        history_pass(conn, cipher, active, batch, bar, &mut report)?;
        sealed_pass(conn, cipher, active, Sealed::Reason, bar, &mut report)?;
        sealed_pass(conn, cipher, active, Sealed::Note, bar, &mut report)?;
        report.remaining = below_active(conn, active)?;
        if report.remaining == 0 || report.resources + report.history + report.grants + report.notes == before {
            break;
        }
        bar.inc_length(u64::try_from(report.remaining).unwrap_or(0));
    }
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
