//! Persistence of the key ring: wrapped keys in `crypto_keys`, the master key outside the database.
//!
//! The master key comes from `keys.master_key` / `keys.master_key_file`; in development, when neither is set, one
//! is generated into `DATA_DIR/keys/master.key` (0600). Exactly one data key is `active`; retired ones stay for
//! decryption until `keys reencrypt` has moved every row off them.

use super::{CryptoError, FieldCipher, KeyProvider, KeyPurpose, KeyRing, LocalKeyProvider, MasterKey, WrappedKey};
use crate::config::{Config, Profile};
use crate::error::AppError;
use crate::store::schema::crypto_keys;
use crate::store::{AnyConnection, StoreError};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use diesel::prelude::*;
use secrecy::ExposeSecret;
use std::sync::Arc;
use time::OffsetDateTime;

#[derive(Debug, Queryable, Selectable, Insertable)]
#[diesel(table_name = crypto_keys)]
pub struct KeyRow {
    pub purpose: String,
    pub version: i32,
    pub wrapped: String,
    pub state: String,
    pub master_id: String,
    pub created_at: i64,
}

/// The master-key provider the configuration names (generating the development key where allowed).
pub fn master_provider(cfg: &Config) -> Result<Arc<dyn KeyProvider>, CryptoError> {
    let key = if let Some(text) = &cfg.keys.master_key {
        MasterKey::from_base64(text.expose_secret())?
    } else if let Some(path) = &cfg.keys.master_key_file {
        MasterKey::load_file(path)?
    } else if cfg.profile == Profile::Production {
        return Err(CryptoError::KeyRing("production needs keys.master_key_file"));
    } else {
        let path = cfg.keys_dir().join("master.key");
        if path.is_file() { MasterKey::load_file(&path)? } else { MasterKey::generate_file(&path)? }
    };
    Ok(Arc::new(LocalKeyProvider::new(key)))
}

pub fn micros(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

fn to_wrapped(rows: &[KeyRow]) -> Result<Vec<WrappedKey>, CryptoError> {
    rows.iter()
        .map(|r| {
            Ok(WrappedKey {
                purpose: KeyPurpose::parse(&r.purpose).ok_or(CryptoError::KeyRing("unknown key purpose"))?,
                version: u32::try_from(r.version).map_err(|_| CryptoError::KeyRing("bad key version"))?,
                wrapped: STANDARD.decode(&r.wrapped).map_err(|_| CryptoError::Malformed)?,
            })
        })
        .collect()
}

fn row(w: &WrappedKey, state: &str, master_id: &str, now: OffsetDateTime) -> KeyRow {
    KeyRow {
        purpose: w.purpose.as_str().to_owned(),
        version: i32::try_from(w.version).unwrap_or(i32::MAX),
        wrapped: STANDARD.encode(&w.wrapped),
        state: state.to_owned(),
        master_id: master_id.to_owned(),
        created_at: micros(now),
    }
}

/// What can go wrong persisting the key ring, with the cause kept. Texts are fixed (plus key versions): never
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("key store: cannot read or write the stored keys")]
    Db(#[source] StoreError),
    /// The stored keys are not in the state the operation needs (fixed reason).
    #[error("key store: {0}")]
    State(&'static str),
}

impl From<diesel::result::Error> for KeyStoreError {
    fn from(e: diesel::result::Error) -> Self {
        KeyStoreError::Db(StoreError::query(&e))
    }
}

impl From<KeyStoreError> for AppError {
    fn from(e: KeyStoreError) -> Self {
        match &e {
            KeyStoreError::Db(db) if db.is_unavailable() => AppError::unavailable_from("key store", e),
            _ => AppError::internal_from("key store", e),
        }
    }
}

/// Loads the ring from the database, creating the first keys on a fresh database.
pub fn load_or_create(
    conn: &mut AnyConnection,
    provider: &dyn KeyProvider,
    now: OffsetDateTime,
) -> Result<KeyRing, KeyStoreError> {
    conn.transaction(|conn| {
        let rows: Vec<KeyRow> = crypto_keys::table.select(KeyRow::as_select()).load(conn)?;
        if rows.is_empty() {
            let (ring, wrapped) = KeyRing::generate(provider)?;
            for w in &wrapped {
                diesel::insert_into(crypto_keys::table).values(row(w, "active", &provider.id(), now)).execute(conn)?;
            }
            return Ok(ring);
        }
        ring_from_rows(&rows, provider)
    })
}

fn ring_from_rows(rows: &[KeyRow], provider: &dyn KeyProvider) -> Result<KeyRing, KeyStoreError> {
    let active = rows
        .iter()
        .filter(|r| r.purpose == "data" && r.state == "active")
        .map(|r| r.version)
        .max()
        .ok_or(CryptoError::KeyRing("no active data key"))?;
    let active = u32::try_from(active).map_err(|_| CryptoError::KeyRing("bad key version"))?;
    Ok(KeyRing::from_wrapped(provider, &to_wrapped(rows)?, active)?)
}

/// Reloads the ring (after another process rotated keys).
pub fn load(conn: &mut AnyConnection, provider: &dyn KeyProvider) -> Result<KeyRing, KeyStoreError> {
    let rows: Vec<KeyRow> = crypto_keys::table.select(KeyRow::as_select()).load(conn)?;
    ring_from_rows(&rows, provider)
}

/// `keys rotate`: a new active data key; the previous one is retired (decrypt only, never encrypts again).
pub fn rotate(conn: &mut AnyConnection, provider: &dyn KeyProvider, now: OffsetDateTime) -> Result<u32, KeyStoreError> {
    conn.transaction(|conn| {
        let ring = load(conn, provider)?;
        let (next, wrapped) = ring.rotate(provider)?;
        install_active(conn, &wrapped, provider, now)?;
        Ok(next.active_version())
    })
}

/// Stores `wrapped` as the active key of its purpose and marks every other key of that purpose `retired`, in
/// the caller's transaction.
fn install_active(
    conn: &mut AnyConnection,
    wrapped: &WrappedKey,
    provider: &dyn KeyProvider,
    now: OffsetDateTime,
) -> Result<(), KeyStoreError> {
    diesel::update(crypto_keys::table.filter(crypto_keys::purpose.eq(wrapped.purpose.as_str())))
        .set(crypto_keys::state.eq("retired"))
        .execute(conn)?;
    diesel::insert_into(crypto_keys::table).values(row(wrapped, "active", &provider.id(), now)).execute(conn)?;
    Ok(())
}

/// `keys rotate-master`: rewraps every stored key under a new master key (data untouched).
pub fn rewrap(conn: &mut AnyConnection, old: &dyn KeyProvider, new: &dyn KeyProvider) -> Result<usize, KeyStoreError> {
    conn.transaction(|conn| {
        let rows: Vec<KeyRow> = crypto_keys::table.select(KeyRow::as_select()).load(conn)?;
        let ring = ring_from_rows(&rows, old)?;
        let rewrapped = ring.rewrap(new)?;
        for w in &rewrapped {
            diesel::update(
                crypto_keys::table
                    .filter(crypto_keys::purpose.eq(w.purpose.as_str()))
                    .filter(crypto_keys::version.eq(i32::try_from(w.version).unwrap_or(i32::MAX))),
            )
            .set((crypto_keys::wrapped.eq(STANDARD.encode(&w.wrapped)), crypto_keys::master_id.eq(new.id())))
            .execute(conn)?;
        }
        Ok(rewrapped.len())
    })
}

/// Stored key rows (for `keys status`).
pub fn list(conn: &mut AnyConnection) -> Result<Vec<KeyRow>, KeyStoreError> {
    crypto_keys::table
        .order((crypto_keys::purpose, crypto_keys::version))
        .select(KeyRow::as_select())
        .load(conn)
        .map_err(KeyStoreError::from)
}

/// Makes `cipher` reload the ring from the database when it meets a data-key version newer than any it holds
/// (rotated by another process), instead of failing at once.
pub fn install_reloader(cipher: &FieldCipher, db: crate::store::Db, provider: Arc<dyn KeyProvider>) {
    cipher.set_reloader(Arc::new(move || {
        let mut conn = db.conn().map_err(|_| unavailable_text())?;
        load(&mut conn, provider.as_ref()).map_err(|e| match e {
            KeyStoreError::Crypto(c) => c,
            KeyStoreError::Db(_) | KeyStoreError::State(_) => unavailable_text(),
        })
    }));
}

/// What the stored ring looks like, cheaply: (active data-key version, number of data-key versions, index-key
/// versions ascending). A server compares it with [`KeyRing::stamp`] to notice a rotation made elsewhere.
pub fn key_stamp(conn: &mut AnyConnection) -> Result<(u32, usize, Vec<u32>), KeyStoreError> {
    let rows: Vec<(String, i32, String)> = crypto_keys::table
        .select((crypto_keys::purpose, crypto_keys::version, crypto_keys::state))
        .order(crypto_keys::version.asc())
        .load(conn)?;
    let data = rows.iter().filter(|(p, _, _)| p == "data");
    let active = data.clone().filter(|(_, _, s)| s == "active").map(|(_, v, _)| *v).max().unwrap_or(0);
    let index = rows.iter().filter(|(p, _, _)| p == "index").filter_map(|(_, v, _)| u32::try_from(*v).ok()).collect();
    Ok((u32::try_from(active).unwrap_or(0), data.count(), index))
}

/// An index-key rotation in progress: the version new index values use, and when its key was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexRotation {
    pub version: u32,
    pub created_at: OffsetDateTime,
    /// False when an earlier, interrupted `keys reindex` had already created this key (resuming).
    pub new_key: bool,
}

/// `keys reindex`, step 1: a new index key (the previous one is kept, marked `retired`, so searches still find
/// rows not yet rebuilt) — or, when an earlier run was interrupted and two index keys are stored, that run's
/// newest key (resume: no third key).
pub fn begin_index_rotation(
    conn: &mut AnyConnection,
    provider: &dyn KeyProvider,
    now: OffsetDateTime,
) -> Result<IndexRotation, KeyStoreError> {
    conn.transaction(|conn| {
        let rows: Vec<KeyRow> = crypto_keys::table
            .filter(crypto_keys::purpose.eq("index"))
            .order(crypto_keys::version.asc())
            .select(KeyRow::as_select())
            .load(conn)?;
        let newest = rows.last().ok_or(KeyStoreError::State("no index key stored"))?;
        let newest_version =
            u32::try_from(newest.version).map_err(|_| KeyStoreError::State("index key version out of range"))?;
        if rows.len() > 1 {
            return Ok(IndexRotation {
                version: newest_version,
                created_at: crate::auth::service::from_micros(newest.created_at),
                new_key: false,
            });
        }
        let version = newest_version.checked_add(1).ok_or(KeyStoreError::State("index key versions exhausted"))?;
        let wrapped = KeyRing::new_index_key(provider, version)?;
        install_active(conn, &wrapped, provider, now)?;
        Ok(IndexRotation { version, created_at: now, new_key: true })
    })
}

/// `keys reindex`, last step: destroys the index keys older than `version` once no current resource uses them.
/// Returns how many were destroyed; refuses (nothing changed) while `rows_below` (which counts the current rows
/// indexed under a key older than the version it is given, in this transaction) finds any.
pub fn finish_index_rotation(
    conn: &mut AnyConnection,
    version: u32,
    rows_below: impl FnOnce(&mut AnyConnection, i32) -> crate::error::AppResult<i64>,
) -> Result<usize, KeyStoreError> {
    let version = i32::try_from(version).map_err(|_| KeyStoreError::State("index key version out of range"))?;
    conn.transaction(|conn| {
        let left = rows_below(conn, version)
            .map_err(|_| KeyStoreError::State("cannot count the rows under older index keys"))?;
        if left > 0 {
            return Err(KeyStoreError::State("rows still use an older index key"));
        }
        diesel::delete(
            crypto_keys::table.filter(crypto_keys::purpose.eq("index")).filter(crypto_keys::version.lt(version)),
        )
        .execute(conn)
        .map_err(KeyStoreError::from)
    })
}

/// The cipher the server uses, built from the stored ring.
pub fn cipher(
    conn: &mut AnyConnection,
    provider: &dyn KeyProvider,
    now: OffsetDateTime,
) -> Result<FieldCipher, KeyStoreError> {
    Ok(FieldCipher::new(load_or_create(conn, provider, now)?))
}

/// The reloader's error when the key table cannot be read (a `CryptoError` has fixed texts only).
fn unavailable_text() -> CryptoError {
    CryptoError::KeyRing("key store unavailable")
}
