//! Signed checkpoints of the audit trail, stored: the checkpoint signing key (Ed25519) wrapped by the master key
//! in `audit_signing_keys`, and each signed head in `audit_checkpoints`.
//!
//! Guarantees: a checkpoint is made inside the chain lock, so it names a head that exists; the private key is
//! stored only wrapped (key id `carevault/audit-checkpoint/<key_id>`), and verification derives the public key
//! from the unwrapped private key, so a key or checkpoint inserted by someone without the master key is refused.
//! Anyone who can write the database can still delete checkpoint rows: export each checkpoint off-site and
//! verify against the exported copy as well (`audit verify --anchor FILE`).

use super::chain::{Checkpoint, CheckpointSigner, hash_from_hex, public_key_b64, to_hex};
use super::event::AuditEvent;
use super::store::{append_locked, lock_head};
use crate::auth::service::from_micros;
use crate::crypto::KeyProvider;
use crate::crypto::store::micros;
use crate::error::{AppError, AppResult};
use crate::store::schema::{audit_checkpoints, audit_signing_keys};
use crate::store::{AnyConnection, db_err};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use diesel::prelude::*;
use time::OffsetDateTime;

fn wrap_id(key_id: &str) -> String {
    format!("carevault/audit-checkpoint/{key_id}")
}

/// Unwraps one stored checkpoint key; its id must be the id of the key it holds.
fn unwrap_signer(provider: &dyn KeyProvider, key_id: &str, wrapped: &str) -> AppResult<CheckpointSigner> {
    let bytes = STANDARD.decode(wrapped).map_err(|_| AppError::internal("checkpoint key is malformed"))?;
    let pkcs8 = provider.unwrap(&wrap_id(key_id), &bytes).map_err(AppError::internal)?;
    let signer = CheckpointSigner::from_pkcs8(&pkcs8).map_err(AppError::internal)?;
    if signer.key_id() != key_id {
        return Err(AppError::internal("checkpoint key does not match its id"));
    }
    Ok(signer)
}

/// The active checkpoint signing key, created (and stored wrapped) on first use.
pub fn signer(
    conn: &mut AnyConnection,
    provider: &dyn KeyProvider,
    now: OffsetDateTime,
) -> AppResult<CheckpointSigner> {
    let active: Option<(String, String)> = audit_signing_keys::table
        .filter(audit_signing_keys::retired_at.is_null())
        .order(audit_signing_keys::created_at.desc())
        .select((audit_signing_keys::key_id, audit_signing_keys::wrapped))
        .first(conn)
        .optional()
        .map_err(db_err)?;
    if let Some((key_id, wrapped)) = active {
        return unwrap_signer(provider, &key_id, &wrapped);
    }
    let (signer, pkcs8) = CheckpointSigner::generate().map_err(AppError::internal)?;
    let wrapped = provider.wrap(&wrap_id(signer.key_id()), &pkcs8).map_err(AppError::internal)?;
    diesel::insert_into(audit_signing_keys::table)
        .values((
            audit_signing_keys::key_id.eq(signer.key_id()),
            audit_signing_keys::wrapped.eq(STANDARD.encode(wrapped)),
            audit_signing_keys::public_key.eq(URL_SAFE_NO_PAD.encode(signer.public_key())),
            audit_signing_keys::created_at.eq(micros(now)),
        ))
        .execute(conn)
        .map_err(db_err)?;
    Ok(signer)
}

/// Appends `event` (the admin record of this checkpoint) and signs the resulting head, in one transaction
/// holding the chain lock. Returns the checkpoint and the signer's public key (base64url).
pub fn checkpoint(
    conn: &mut AnyConnection,
    provider: &dyn KeyProvider,
    event: AuditEvent,
    now: OffsetDateTime,
) -> AppResult<(Checkpoint, String)> {
    conn.transaction(|c| {
        let head = lock_head(c)?;
        let sealer = super::seal::load_or_create(c, provider, now)?;
        let head = append_locked(c, &sealer, head, &[event])?.ok_or_else(|| AppError::internal("empty audit trail"))?;
        let signer = signer(c, provider, now)?;
        let cp = signer.sign(head.seq, head.hash, now);
        diesel::insert_into(audit_checkpoints::table)
            .values((
                audit_checkpoints::seq.eq(cp.seq),
                audit_checkpoints::hash.eq(to_hex(&cp.hash)),
                audit_checkpoints::at.eq(micros(cp.at)),
                audit_checkpoints::signature.eq(URL_SAFE_NO_PAD.encode(&cp.signature)),
                audit_checkpoints::key_id.eq(&cp.key_id),
            ))
            .execute(c)
            .map_err(db_err)?;
        Ok((cp, public_key_b64(signer.public_key())))
    })
}

/// Why a checkpoint cannot be trusted (no content, only the checkpoint's seq).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointInvalid {
    #[error("checkpoint at audit record {0}: signing key unknown or not wrapped by this master key")]
    UnknownKey(i64),
    #[error("checkpoint at audit record {0}: invalid signature")]
    BadSignature(i64),
    #[error("checkpoint at audit record {0}: stored checkpoint is malformed")]
    Malformed(i64),
}

/// Checks `cp`'s signature with the stored (unwrapped) key it names.
pub fn check(
    conn: &mut AnyConnection,
    provider: &dyn KeyProvider,
    cp: &Checkpoint,
) -> AppResult<Result<(), CheckpointInvalid>> {
    let wrapped: Option<String> = audit_signing_keys::table
        .filter(audit_signing_keys::key_id.eq(&cp.key_id))
        .select(audit_signing_keys::wrapped)
        .first(conn)
        .optional()
        .map_err(db_err)?;
    let Some(signer) = wrapped.and_then(|w| unwrap_signer(provider, &cp.key_id, &w).ok()) else {
        return Ok(Err(CheckpointInvalid::UnknownKey(cp.seq)));
    };
    Ok(cp.verify(signer.public_key()).map_err(|_| CheckpointInvalid::BadSignature(cp.seq)))
}

/// The latest stored checkpoint, if any (not yet checked: see [`check`]).
pub fn latest(conn: &mut AnyConnection) -> AppResult<Option<Result<Checkpoint, CheckpointInvalid>>> {
    stored(conn, None)
}

/// The stored checkpoint at exactly `seq` (the anchor a retention purge left), if any.
pub fn at_seq(conn: &mut AnyConnection, seq: i64) -> AppResult<Option<Result<Checkpoint, CheckpointInvalid>>> {
    stored(conn, Some(seq))
}

fn stored(conn: &mut AnyConnection, seq: Option<i64>) -> AppResult<Option<Result<Checkpoint, CheckpointInvalid>>> {
    let mut q = audit_checkpoints::table.into_boxed();
    if let Some(seq) = seq {
        q = q.filter(audit_checkpoints::seq.eq(seq));
    }
    let row: Option<(i64, String, i64, String, String)> = q
        .order(audit_checkpoints::seq.desc())
        .select((
            audit_checkpoints::seq,
            audit_checkpoints::hash,
            audit_checkpoints::at,
            audit_checkpoints::signature,
            audit_checkpoints::key_id,
        ))
        .first(conn)
        .optional()
        .map_err(db_err)?;
    Ok(row.map(|(seq, hash, at, signature, key_id)| {
        let hash = hash_from_hex(&hash).ok_or(CheckpointInvalid::Malformed(seq))?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| CheckpointInvalid::Malformed(seq))?;
        Ok(Checkpoint { seq, hash, at: from_micros(at), key_id, signature })
    }))
}

/// `keys rotate-master`: rewraps every checkpoint key under `new`, in the caller's transaction.
pub fn rewrap(conn: &mut AnyConnection, old: &dyn KeyProvider, new: &dyn KeyProvider) -> AppResult<usize> {
    let rows: Vec<(String, String)> = audit_signing_keys::table
        .select((audit_signing_keys::key_id, audit_signing_keys::wrapped))
        .load(conn)
        .map_err(db_err)?;
    for (key_id, wrapped) in &rows {
        let bytes = STANDARD.decode(wrapped).map_err(|_| AppError::internal("checkpoint key is malformed"))?;
        let pkcs8 = old.unwrap(&wrap_id(key_id), &bytes).map_err(AppError::internal)?;
        let again = new.wrap(&wrap_id(key_id), &pkcs8).map_err(AppError::internal)?;
        diesel::update(audit_signing_keys::table.filter(audit_signing_keys::key_id.eq(key_id)))
            .set(audit_signing_keys::wrapped.eq(STANDARD.encode(again)))
            .execute(conn)
            .map_err(db_err)?;
    }
    Ok(rows.len())
}

/// (key id, created, retired) of every checkpoint key, for `keys status`.
pub fn list_keys(conn: &mut AnyConnection) -> AppResult<Vec<(String, i64, Option<i64>)>> {
    audit_signing_keys::table
        .order(audit_signing_keys::created_at.asc())
        .select((audit_signing_keys::key_id, audit_signing_keys::created_at, audit_signing_keys::retired_at))
        .load(conn)
        .map_err(db_err)
}

/// Retention purge: removes every record recorded before `cutoff`, in one transaction holding the chain lock.
/// Before deleting, the last removed record's hash is signed as a checkpoint, so `audit verify` can resume the
/// chain after it (re-anchoring); the purge itself is recorded (`event`). Returns the last purged sequence.
pub fn purge(
    conn: &mut AnyConnection,
    provider: &dyn KeyProvider,
    cutoff: OffsetDateTime,
    event: AuditEvent,
    now: OffsetDateTime,
) -> AppResult<Option<i64>> {
    use crate::store::schema::{audit_events, audit_patients};
    conn.transaction(|c| {
        let head = lock_head(c)?;
        let boundary: Option<(i64, String)> = audit_events::table
            .filter(audit_events::recorded.lt(micros(cutoff)))
            .order(audit_events::seq.desc())
            .select((audit_events::seq, audit_events::hash))
            .first(c)
            .optional()
            .map_err(db_err)?;
        let sealer = super::seal::load_or_create(c, provider, now)?;
        let Some((seq, hash)) = boundary else {
            append_locked(c, &sealer, head, &[event])?;
            return Ok(None);
        };
        let hash = hash_from_hex(&hash).ok_or_else(|| AppError::internal("stored audit hash is malformed"))?;
        let signer = signer(c, provider, now)?;
        let cp = signer.sign(seq, hash, now);
        let exists: i64 =
            audit_checkpoints::table.filter(audit_checkpoints::seq.eq(seq)).count().get_result(c).map_err(db_err)?;
        if exists == 0 {
            diesel::insert_into(audit_checkpoints::table)
                .values((
                    audit_checkpoints::seq.eq(cp.seq),
                    audit_checkpoints::hash.eq(to_hex(&cp.hash)),
                    audit_checkpoints::at.eq(micros(cp.at)),
                    audit_checkpoints::signature.eq(URL_SAFE_NO_PAD.encode(&cp.signature)),
                    audit_checkpoints::key_id.eq(&cp.key_id),
                ))
                .execute(c)
                .map_err(db_err)?;
        }
        diesel::delete(audit_events::table.filter(audit_events::seq.le(seq))).execute(c).map_err(db_err)?;
        diesel::delete(audit_patients::table.filter(audit_patients::seq.le(seq))).execute(c).map_err(db_err)?;
        append_locked(c, &sealer, head, &[event])?;
        Ok(Some(seq))
    })
}
