//! Seals: the audit chain keyed outside the database.
//!
//! The hash chain alone is unkeyed: anyone who can write the table can rewrite a record and re-hash everything
//! after it. So the last record of every appended batch (one group commit, or one write's transaction) carries
//! `seal = "<key_id>:" hex(HMAC-SHA256(K, "carevault.audit.seal.v1\0" ‖ seq (i64 BE) ‖ hash))`. The chain hash
//! covers every earlier record, so one MAC per batch pins the whole prefix; the cost is one HMAC per batch.
//!
//! `K` is 256 random bits created once per database, stored only wrapped by the master key (`audit_seal_keys`,
//! wrap key id `carevault/audit-seal/<key_id>`), held in memory by the appenders. Its `first_seq` (the head + 1
//! when the key was created, inside the chain lock) is the transition point: records before it were written
//! before seals existed and are verified the old way; from it on the trail must end in a valid seal.

use super::chain::Hash;
use crate::crypto::KeyProvider;
use crate::crypto::master::{KEY_LEN, hex, hmac_sha256};
use crate::crypto::store::micros;
use crate::error::{AppError, AppResult};
use crate::store::AnyConnection;
use crate::store::schema::audit_seal_keys;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use diesel::prelude::*;
use time::OffsetDateTime;
use zeroize::Zeroizing;

const SEAL_TAG: &[u8] = b"carevault.audit.seal.v1\0";

fn wrap_id(key_id: &str) -> String {
    format!("carevault/audit-seal/{key_id}")
}

/// The sealing key of one database. `Debug` prints only the key id.
pub struct Sealer {
    key_id: String,
    key: Zeroizing<[u8; KEY_LEN]>,
    first_seq: i64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("key_id", &self.key_id).field("first_seq", &self.first_seq).finish()
    }
}

impl Sealer {
    /// A sealer from raw parts (unit tests and benchmarks).
    pub fn from_parts(key_id: &str, key: [u8; KEY_LEN], first_seq: i64) -> Self {
        Self { key_id: key_id.to_owned(), key: Zeroizing::new(key), first_seq }
    }

    /// The first record that must be covered by a seal.
    pub fn first_seq(&self) -> i64 {
        self.first_seq
    }

    fn mac(&self, seq: i64, hash: &Hash) -> [u8; 32] {
        let mut msg = Vec::with_capacity(SEAL_TAG.len() + 40);
        msg.extend_from_slice(SEAL_TAG);
        msg.extend_from_slice(&seq.to_be_bytes());
        msg.extend_from_slice(hash);
        hmac_sha256(&self.key, &msg)
    }

    /// The seal of record `seq` with chain hash `hash`.
    pub fn seal(&self, seq: i64, hash: &Hash) -> String {
        format!("{}:{}", self.key_id, hex(&self.mac(seq, hash)))
    }

    /// Whether `stored` is this key's seal of `(seq, hash)` (constant-time comparison).
    pub fn check(&self, seq: i64, hash: &Hash, stored: &str) -> bool {
        let Some((key_id, mac)) = stored.split_once(':') else { return false };
        if key_id != self.key_id {
            return false;
        }
        let expected = hex(&self.mac(seq, hash));
        expected.len() == mac.len() && expected.bytes().zip(mac.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// The stored sealing key, unwrapped; `None` when the database has none yet (a trail from before seals).
pub fn load(conn: &mut AnyConnection, provider: &dyn KeyProvider) -> AppResult<Option<Sealer>> {
    let row: Option<(String, String, i64)> = audit_seal_keys::table
        .order(audit_seal_keys::created_at.asc())
        .select((audit_seal_keys::key_id, audit_seal_keys::wrapped, audit_seal_keys::first_seq))
        .first(conn)
        .optional()?;
    let Some((key_id, wrapped, first_seq)) = row else { return Ok(None) };
    let bytes = STANDARD.decode(wrapped).map_err(|_| AppError::internal("audit seal key is malformed"))?;
    let key = provider.unwrap(&wrap_id(&key_id), &bytes).map_err(AppError::internal)?;
    let key: [u8; KEY_LEN] =
        key.as_slice().try_into().map_err(|_| AppError::internal("audit seal key has the wrong length"))?;
    Ok(Some(Sealer { key_id, key: Zeroizing::new(key), first_seq }))
}

/// The sealing key, created on first use inside the chain lock, so its transition point is exact.
pub fn load_or_create(conn: &mut AnyConnection, provider: &dyn KeyProvider, now: OffsetDateTime) -> AppResult<Sealer> {
    if let Some(s) = load(conn, provider)? {
        return Ok(s);
    }
    conn.transaction(|c| {
        let head = super::store::lock_head(c)?;
        if let Some(s) = load(c, provider)? {
            return Ok(s);
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, key.as_mut());
        let mut id = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
        let key_id = hex(&id);
        let wrapped = provider.wrap(&wrap_id(&key_id), key.as_ref()).map_err(AppError::internal)?;
        let first_seq = head.map_or(1, |h| h.seq + 1);
        diesel::insert_into(audit_seal_keys::table)
            .values((
                audit_seal_keys::key_id.eq(&key_id),
                audit_seal_keys::wrapped.eq(STANDARD.encode(wrapped)),
                audit_seal_keys::first_seq.eq(first_seq),
                audit_seal_keys::created_at.eq(micros(now)),
            ))
            .execute(c)?;
        Ok(Sealer { key_id, key, first_seq })
    })
}

/// `keys rotate-master`: rewraps the sealing key under `new`, in the caller's transaction; returns how many.
pub fn rewrap(conn: &mut AnyConnection, old: &dyn KeyProvider, new: &dyn KeyProvider) -> AppResult<usize> {
    let rows: Vec<(String, String)> =
        audit_seal_keys::table.select((audit_seal_keys::key_id, audit_seal_keys::wrapped)).load(conn)?;
    let mut n = 0;
    for (key_id, wrapped) in rows {
        let bytes = STANDARD.decode(&wrapped).map_err(|_| AppError::internal("audit seal key is malformed"))?;
        let key = match new.unwrap(&wrap_id(&key_id), &bytes) {
            Ok(_) => continue,
            Err(_) => old.unwrap(&wrap_id(&key_id), &bytes).map_err(AppError::internal)?,
        };
        let rewrapped = new.wrap(&wrap_id(&key_id), &key).map_err(AppError::internal)?;
        diesel::update(audit_seal_keys::table.filter(audit_seal_keys::key_id.eq(&key_id)))
            .set(audit_seal_keys::wrapped.eq(STANDARD.encode(rewrapped)))
            .execute(conn)?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seal_binds_seq_hash_and_key() {
        let s = Sealer::from_parts("k1", [7; KEY_LEN], 1);
        let seal = s.seal(5, &[1; 32]);
        assert!(s.check(5, &[1; 32], &seal));
        assert!(!s.check(6, &[1; 32], &seal));
        assert!(!s.check(5, &[2; 32], &seal));
        assert!(!Sealer::from_parts("k1", [8; KEY_LEN], 1).check(5, &[1; 32], &seal));
        assert!(!Sealer::from_parts("k2", [7; KEY_LEN], 1).check(5, &[1; 32], &seal));
        assert!(!s.check(5, &[1; 32], "k1:00"));
        assert!(!s.check(5, &[1; 32], "garbage"));
    }
}
