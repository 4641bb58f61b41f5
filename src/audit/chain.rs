//! Tamper evidence for the audit trail: a SHA-256 hash chain over canonical event bytes, and signed checkpoints.
//!
//! Record `seq` (1, 2, 3, … with no gaps) stores `prev_hash` (the hash of record `seq - 1`, [`GENESIS`] for
//! the first) and `hash = link(prev_hash, seq, canonical_bytes)`. [`Verifier`] walks the records in `seq` order
//! and names the first bad one: edited, missing (deleted), inserted, reordered, or unlinked. Anyone with
//! write access to the table could recompute the whole chain after an edit, so the chain alone proves only
//! internal consistency; a [`Checkpoint`] (the head, signed with a server Ed25519 key kept outside the
//! database, and exported off-site) pins every record up to its `seq`, and also exposes truncation.
//!
//! # Appending (for the store)
//! The chain has one order only if appends are serialized **per database**, across every replica: a single
//! appender task per process batches events (group commit) and, in one transaction, reads the head row with
//! `SELECT … FOR UPDATE` on PostgreSQL (or starts with `BEGIN IMMEDIATE` on SQLite), assigns `seq = head + 1, …`,
//! links each event to the previous hash, inserts the rows, updates the head and commits; only then are the
//! waiting requests released (a PHI response leaves only after its record is durable). A unique constraint on
//! `seq` backs this up. Store the event (its serde JSON) with `seq`, `prev_hash` and `hash`; `audit verify` feeds
//! rows to [`Verifier::push_stored`] in `seq` order, and passes the latest verified checkpoint to `finish`.

use super::event::AuditEvent;
use base64::Engine as _;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use time::OffsetDateTime;

const LINK_TAG: &[u8] = b"carevault.audit.link.v1\0";
const CHECKPOINT_TAG: &[u8] = b"carevault.audit.checkpoint.v1\0";

pub type Hash = [u8; 32];

/// The `prev_hash` of record 1: SHA-256 of `carevault.audit.genesis.v1`.
pub const GENESIS: Hash = [
    0xa4, 0xc9, 0x81, 0x91, 0x10, 0x99, 0x80, 0x64, 0xb2, 0xef, 0x5f, 0x49, 0x04, 0xec, 0x64, 0x88, 0xd8, 0xb5, 0x72,
    0xb8, 0xf4, 0x07, 0xba, 0x26, 0x6e, 0x3d, 0x96, 0xf2, 0x94, 0xe8, 0xfe, 0x99,
];

/// Where one record sits in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainLink {
    pub seq: i64,
    pub prev_hash: Hash,
    pub hash: Hash,
}

impl ChainLink {
    /// The link for the record after `prev` (or the first record when `prev` is `None`).
    pub fn next(prev: Option<&ChainLink>, canonical: &[u8]) -> ChainLink {
        let (seq, prev_hash) = prev.map_or((1, GENESIS), |p| (p.seq + 1, p.hash));
        ChainLink { seq, prev_hash, hash: link(&prev_hash, seq, canonical) }
    }
}

/// SHA-256 over `tag ‖ prev_hash (32) ‖ seq (i64 BE) ‖ len(canonical) (u64 BE) ‖ canonical`.
pub fn link(prev_hash: &Hash, seq: i64, canonical: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(LINK_TAG);
    h.update(prev_hash);
    h.update(seq.to_be_bytes());
    h.update((canonical.len() as u64).to_be_bytes());
    h.update(canonical);
    h.finalize().into()
}

/// How the chain is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakKind {
    /// The record's content (or its stored hash) changed.
    Edited,
    /// The record with this seq is missing (deleted): the next one has a later seq.
    Missing,
    /// This record was inserted: it repeats a seq, or a later record still links past it.
    Inserted,
    /// This record and the next one were swapped.
    Reordered,
    /// The record does not link to its predecessor: records before it were deleted and the rest renumbered,
    /// or its stored link was changed.
    Unlinked,
    /// The trail ends before a signed checkpoint: records from this seq on were removed.
    Truncated,
    /// The chain up to this seq differs from the signed checkpoint: history was rewritten and re-hashed.
    CheckpointMismatch,
    /// A seal does not verify under the sealing key (the record or one before it was rewritten and re-hashed
    /// after it was sealed), or a seal is present and the sealing key is not.
    BadSeal,
    /// Records from this seq on (from the sealing transition point) are not covered by any seal: they were
    /// appended or rewritten by someone without the key, or the seals were removed.
    Unsealed,
    /// An `audit-checkpoint` record names a checkpoint that is no longer stored.
    CheckpointMissing,
    /// The newest checkpoint is older than twice the checkpoint interval (checkpoints stopped or were deleted).
    StaleCheckpoint,
    /// A checkpoint before the end of the walk was not registered with [`Verifier::anchored`], so it could not
    /// be checked (a caller error; fails closed).
    Unanchored,
}

impl BreakKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Edited => "edited",
            Self::Missing => "missing (deleted)",
            Self::Inserted => "inserted",
            Self::Reordered => "reordered",
            Self::Unlinked => "unlinked from its predecessor",
            Self::Truncated => "truncated",
            Self::CheckpointMismatch => "does not match the signed checkpoint",
            Self::Unanchored => "checkpoint not registered before the walk",
            Self::BadSeal => "seal does not verify (rewritten after sealing, or the seal key is missing)",
            Self::Unsealed => "not covered by a seal (appended or rewritten without the key)",
            Self::CheckpointMissing => "its checkpoint is missing (deleted)",
            Self::StaleCheckpoint => "the newest checkpoint is older than twice the checkpoint interval",
        }
    }
}

/// The first bad record. Contains only a sequence number and a kind, never event content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("audit record {seq}: {}", kind.as_str())]
pub struct ChainError {
    pub seq: i64,
    pub kind: BreakKind,
}

fn broken(seq: i64, kind: BreakKind) -> ChainError {
    ChainError { seq, kind }
}

/// A record whose link failed, held back one step to tell a swap from other breaks.
#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: i64,
    stored_prev: Hash,
    error: ChainError,
}

/// Checks records pushed in `seq` order. An error names the first bad record; it may be reported at the next
/// `push` or at `finish` (one record of look-ahead), and once reported every later call repeats it.
#[derive(Debug, Clone)]
pub struct Verifier {
    expected_seq: i64,
    /// Hash of the last good record (GENESIS before the first).
    running: Hash,
    /// `prev_hash` of the last good record, when known.
    running_prev: Option<Hash>,
    pending: Option<Pending>,
    failed: Option<ChainError>,
    anchors: BTreeMap<i64, Hash>,
    count: u64,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

/// The last record of a verified walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: i64,
    pub hash: Hash,
    /// Records checked.
    pub count: u64,
}

impl Verifier {
    /// A walk from record 1.
    pub fn new() -> Self {
        Self::resume(0, GENESIS)
    }

    /// A walk that starts after an already verified (or checkpointed) record `seq` with hash `hash`.
    pub fn resume(seq: i64, hash: Hash) -> Self {
        Self {
            expected_seq: seq + 1,
            running: hash,
            running_prev: None,
            pending: None,
            failed: None,
            anchors: BTreeMap::new(),
            count: 0,
        }
    }

    /// Requires record `seq` to have hash `hash` (a verified checkpoint). Register every checkpoint the walk
    /// passes; the latest one may instead be given to [`Verifier::finish`].
    pub fn anchored(mut self, seq: i64, hash: Hash) -> Self {
        self.anchors.insert(seq, hash);
        self
    }

    pub fn push(
        &mut self,
        seq: i64,
        canonical: &[u8],
        stored_prev: &Hash,
        stored_hash: &Hash,
    ) -> Result<(), ChainError> {
        self.checked(seq, Some(canonical), stored_prev, stored_hash)
    }

    /// Checks a record by its canonical bytes; `None` for a row that has none (it cannot be genuine).
    pub fn push_canonical(
        &mut self,
        seq: i64,
        canonical: Option<&[u8]>,
        stored_prev: &Hash,
        stored_hash: &Hash,
    ) -> Result<(), ChainError> {
        self.checked(seq, canonical, stored_prev, stored_hash)
    }

    /// Checks a stored row whose event is kept as JSON (the serde form of [`AuditEvent`]): the JSON is parsed
    /// and canonicalized here, and a row that does not parse counts as edited.
    pub fn push_stored(
        &mut self,
        seq: i64,
        event_json: &[u8],
        stored_prev: &Hash,
        stored_hash: &Hash,
    ) -> Result<(), ChainError> {
        let canonical = serde_json::from_slice::<AuditEvent>(event_json).ok().and_then(|e| e.canonical_bytes().ok());
        self.checked(seq, canonical.as_deref(), stored_prev, stored_hash)
    }

    fn checked(
        &mut self,
        seq: i64,
        canonical: Option<&[u8]>,
        stored_prev: &Hash,
        stored_hash: &Hash,
    ) -> Result<(), ChainError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let result = self.step(seq, canonical, stored_prev, stored_hash);
        if let Err(e) = result {
            self.failed = Some(e);
        }
        result
    }

    /// `canonical` is `None` for a row whose content has no canonical form (it cannot be genuine).
    fn step(
        &mut self,
        seq: i64,
        canonical: Option<&[u8]>,
        stored_prev: &Hash,
        stored_hash: &Hash,
    ) -> Result<(), ChainError> {
        if let Some(p) = self.pending.take() {
            // Swapped pair: the held record links after this one, and this one links to the last good record.
            // Otherwise, if this record links to the last good one, the held record was put in between.
            let next = seq == p.seq + 1 && stored_prev == &self.running;
            return Err(if next && stored_hash == &p.stored_prev {
                broken(p.seq, BreakKind::Reordered)
            } else if next {
                broken(p.seq, BreakKind::Inserted)
            } else {
                p.error
            });
        }
        if seq > self.expected_seq {
            return Err(broken(self.expected_seq, BreakKind::Missing));
        }
        if seq < self.expected_seq {
            return Err(broken(seq, BreakKind::Inserted));
        }
        if stored_prev != &self.running {
            if self.running_prev.as_ref() == Some(stored_prev) {
                // This record links to the same predecessor as the previous one: the previous one was put in.
                return Err(broken(seq - 1, BreakKind::Inserted));
            }
            self.pending = Some(Pending { seq, stored_prev: *stored_prev, error: broken(seq, BreakKind::Unlinked) });
            return Ok(());
        }
        if canonical.is_none_or(|c| &link(&self.running, seq, c) != stored_hash) {
            return Err(broken(seq, BreakKind::Edited));
        }
        if let Some(anchor) = self.anchors.get(&seq)
            && anchor != stored_hash
        {
            return Err(broken(seq, BreakKind::CheckpointMismatch));
        }
        self.running_prev = Some(self.running);
        self.running = *stored_hash;
        self.expected_seq += 1;
        self.count += 1;
        Ok(())
    }

    /// Ends the walk. `expected_head` is the latest signed checkpoint (already signature-checked): the trail
    /// must reach it and agree with it. Returns the last record (`None` for an empty walk).
    pub fn finish(mut self, expected_head: Option<(i64, Hash)>) -> Result<Option<ChainHead>, ChainError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if let Some(p) = self.pending.take() {
            return Err(p.error);
        }
        let last = self.expected_seq - 1;
        let latest_anchor = self.anchors.last_key_value().map(|(s, h)| (*s, *h));
        for (seq, hash) in expected_head.into_iter().chain(latest_anchor) {
            if seq > last {
                return Err(broken(last + 1, BreakKind::Truncated));
            }
            if seq == last && hash != self.running {
                return Err(broken(seq, BreakKind::CheckpointMismatch));
            }
            if seq < last && self.anchors.get(&seq).is_none_or(|h| *h != hash) {
                return Err(broken(seq, BreakKind::Unanchored));
            }
        }
        Ok((self.count > 0).then_some(ChainHead { seq: last, hash: self.running, count: self.count }))
    }
}

/// A signed statement "the trail's record `seq` has hash `hash`", made at `at`. Export these off-site.
/// JSON form: `{"seq":…,"hash":"<hex>","at":"<RFC 3339>","key_id":"<hex>","signature":"<base64url>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub seq: i64,
    #[serde(with = "hex32")]
    pub hash: Hash,
    /// Whole seconds, UTC.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Names the signing key: the first 8 bytes of SHA-256 of its public key, in hex.
    pub key_id: String,
    #[serde(with = "b64")]
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint signing key is malformed")]
    BadKey,
    #[error("checkpoint was signed with another key")]
    WrongKey,
    #[error("checkpoint signature is invalid")]
    BadSignature,
}

fn signed_message(seq: i64, hash: &Hash, at: OffsetDateTime, key_id: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_TAG.len() + 56 + key_id.len());
    m.extend_from_slice(CHECKPOINT_TAG);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m.extend_from_slice(&at.unix_timestamp().to_be_bytes());
    m.extend_from_slice(&(key_id.len() as u64).to_be_bytes());
    m.extend_from_slice(key_id.as_bytes());
    m
}

/// The key id of an Ed25519 public key.
pub fn key_id(public_key: &[u8]) -> String {
    to_hex(&Sha256::digest(public_key)[..8])
}

/// The server's checkpoint signing key (Ed25519). Keep its PKCS#8 document with the other keys, outside the
/// database; publish [`CheckpointSigner::public_key`] with the exported checkpoints.
#[derive(Debug)]
pub struct CheckpointSigner {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl CheckpointSigner {
    /// A new key; returns it with its PKCS#8 v2 document (secret: store it like the master key).
    pub fn generate() -> Result<(Self, zeroize::Zeroizing<Vec<u8>>), CheckpointError> {
        let doc =
            Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).map_err(|_| CheckpointError::BadKey)?;
        let pkcs8 = zeroize::Zeroizing::new(doc.as_ref().to_vec());
        Ok((Self::from_pkcs8(&pkcs8)?, pkcs8))
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, CheckpointError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| CheckpointError::BadKey)?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(Self { pair, key_id })
    }

    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs the head `(seq, hash)` at `at` (truncated to whole seconds).
    pub fn sign(&self, seq: i64, hash: Hash, at: OffsetDateTime) -> Checkpoint {
        let at = at.to_offset(time::UtcOffset::UTC).replace_nanosecond(0).unwrap_or(at);
        let signature = self.pair.sign(&signed_message(seq, &hash, at, &self.key_id)).as_ref().to_vec();
        Checkpoint { seq, hash, at, key_id: self.key_id.clone(), signature }
    }
}

impl Checkpoint {
    /// Checks the signature against the server's public key.
    pub fn verify(&self, public_key: &[u8]) -> Result<(), CheckpointError> {
        if key_id(public_key) != self.key_id {
            return Err(CheckpointError::WrongKey);
        }
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&signed_message(self.seq, &self.hash, self.at, &self.key_id), &self.signature)
            .map_err(|_| CheckpointError::BadSignature)
    }
}

/// Lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A 32-byte hash from 64 hex digits.
pub fn hash_from_hex(s: &str) -> Option<Hash> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(h: &super::Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::to_hex(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<super::Hash, D::Error> {
        let s = String::deserialize(d)?;
        super::hash_from_hex(&s).ok_or_else(|| D::Error::custom("expected 64 hex digits"))
    }
}

mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&URL_SAFE_NO_PAD.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        URL_SAFE_NO_PAD.decode(s).map_err(|_| D::Error::custom("expected base64url"))
    }
}

/// Base64url (no padding) of a public key, for publishing next to exported checkpoints.
pub fn public_key_b64(public_key: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[derive(Clone)]
    struct Row {
        seq: i64,
        canonical: Vec<u8>,
        prev: Hash,
        hash: Hash,
    }

    fn trail(n: usize) -> Vec<Row> {
        let mut rows: Vec<Row> = Vec::new();
        let mut last: Option<ChainLink> = None;
        for i in 0..n {
            let canonical = format!("{{\"event\":{i}}}").into_bytes();
            let l = ChainLink::next(last.as_ref(), &canonical);
            rows.push(Row { seq: l.seq, canonical, prev: l.prev_hash, hash: l.hash });
            last = Some(l);
        }
        rows
    }

    fn verify(rows: &[Row], head: Option<(i64, Hash)>) -> Result<Option<ChainHead>, ChainError> {
        let mut v = Verifier::new();
        for r in rows {
            v.push(r.seq, &r.canonical, &r.prev, &r.hash)?;
        }
        v.finish(head)
    }

    fn err(seq: i64, kind: BreakKind) -> Result<Option<ChainHead>, ChainError> {
        Err(ChainError { seq, kind })
    }

    #[test]
    fn genesis_is_the_hash_of_its_tag() {
        assert_eq!(GENESIS, <[u8; 32]>::from(Sha256::digest(b"carevault.audit.genesis.v1")));
    }

    #[test]
    fn link_is_pinned_and_separates_fields() {
        assert_eq!(
            to_hex(&link(&GENESIS, 1, b"x")),
            to_hex(&{
                let mut h = Sha256::new();
                h.update(b"carevault.audit.link.v1\0");
                h.update(GENESIS);
                h.update(1i64.to_be_bytes());
                h.update(1u64.to_be_bytes());
                h.update(b"x");
                <[u8; 32]>::from(h.finalize())
            })
        );
        assert_ne!(link(&GENESIS, 1, b"x"), link(&GENESIS, 2, b"x"));
        assert_ne!(link(&GENESIS, 1, b"x"), link(&[0; 32], 1, b"x"));
    }

    #[test]
    fn an_intact_trail_verifies() {
        let rows = trail(10);
        let head = verify(&rows, Some((10, rows[9].hash))).unwrap().unwrap();
        assert_eq!((head.seq, head.hash, head.count), (10, rows[9].hash, 10));
        assert_eq!(verify(&[], None).unwrap(), None);
        // Resuming from a verified point checks only the rest.
        let mut v = Verifier::resume(5, rows[4].hash);
        for r in &rows[5..] {
            v.push(r.seq, &r.canonical, &r.prev, &r.hash).unwrap();
        }
        assert_eq!(v.finish(None).unwrap().unwrap().count, 5);
    }

    #[test]
    fn an_edited_byte_is_named() {
        let mut rows = trail(10);
        rows[3].canonical[2] ^= 1;
        assert_eq!(verify(&rows, None), err(4, BreakKind::Edited));
        // Changing the stored hash is an edit too.
        let mut rows = trail(10);
        rows[6].hash[0] ^= 1;
        assert_eq!(verify(&rows, None), err(7, BreakKind::Edited));
    }

    #[test]
    fn a_deleted_record_is_named() {
        let mut rows = trail(10);
        rows.remove(4);
        assert_eq!(verify(&rows, None), err(5, BreakKind::Missing));
        // Deleted and the rest renumbered to hide the gap.
        let mut rows = trail(10);
        rows.remove(4);
        for r in &mut rows[4..] {
            r.seq -= 1;
        }
        assert_eq!(verify(&rows, None), err(5, BreakKind::Unlinked));
    }

    #[test]
    fn an_inserted_record_is_named() {
        // A forged record linked correctly, later records renumbered.
        let mut rows = trail(10);
        let canonical = b"{\"event\":\"forged\"}".to_vec();
        let prev = rows[3].hash;
        rows.insert(4, Row { seq: 5, hash: link(&prev, 5, &canonical), canonical, prev });
        for r in &mut rows[5..] {
            r.seq += 1;
        }
        assert_eq!(verify(&rows, None), err(5, BreakKind::Inserted));
        // A forged record with a made-up link.
        let mut rows = trail(10);
        rows.insert(4, Row { seq: 5, canonical: b"{}".to_vec(), prev: [7; 32], hash: [8; 32] });
        for r in &mut rows[5..] {
            r.seq += 1;
        }
        assert_eq!(verify(&rows, None), err(5, BreakKind::Inserted));
        // A second record under an existing seq.
        let mut rows = trail(10);
        let dup = Row { canonical: b"{}".to_vec(), ..rows[4].clone() };
        rows.insert(5, dup);
        assert_eq!(verify(&rows, None), err(5, BreakKind::Inserted));
    }

    #[test]
    fn swapped_records_are_named() {
        let mut rows = trail(10);
        rows.swap(5, 6);
        rows[5].seq = 6;
        rows[6].seq = 7;
        assert_eq!(verify(&rows, None), err(6, BreakKind::Reordered));
        // Swapping only the event contents in place reads as an edit of the first.
        let mut rows = trail(10);
        let c = rows[5].canonical.clone();
        rows[5].canonical = rows[6].canonical.clone();
        rows[6].canonical = c;
        assert_eq!(verify(&rows, None), err(6, BreakKind::Edited));
        // Swapping the last two: the held record is resolved by the last push.
        let mut rows = trail(10);
        rows.swap(8, 9);
        rows[8].seq = 9;
        rows[9].seq = 10;
        assert_eq!(verify(&rows, None), err(9, BreakKind::Reordered));
        // A break held at the end of the walk is reported by finish.
        let mut rows = trail(3);
        rows[2].prev = [1; 32];
        assert_eq!(verify(&rows, None), err(3, BreakKind::Unlinked));
    }

    #[test]
    fn truncation_is_caught_against_a_checkpoint() {
        let rows = trail(10);
        let cp = (8, rows[7].hash);
        assert_eq!(verify(&rows[..6], Some(cp)), err(7, BreakKind::Truncated));
        assert_eq!(verify(&[], Some(cp)), err(1, BreakKind::Truncated));
        // Records after the checkpoint may go missing only up to it.
        assert!(verify(&rows[..8], Some(cp)).is_ok());
        // A checkpoint passed mid-walk must be registered.
        assert_eq!(verify(&rows, Some(cp)), err(8, BreakKind::Unanchored));
        let mut v = Verifier::new().anchored(cp.0, cp.1);
        for r in &rows {
            v.push(r.seq, &r.canonical, &r.prev, &r.hash).unwrap();
        }
        assert!(v.finish(Some(cp)).is_ok());
        // A registered checkpoint beyond the end also reports truncation.
        let mut v = Verifier::new().anchored(cp.0, cp.1);
        for r in &rows[..5] {
            v.push(r.seq, &r.canonical, &r.prev, &r.hash).unwrap();
        }
        assert_eq!(v.finish(None), err(6, BreakKind::Truncated));
    }

    #[test]
    fn a_rehashed_history_fails_the_checkpoint() {
        let rows = trail(10);
        let cp = (8, rows[7].hash);
        // Edit record 3 and recompute every later link: internally consistent, but not what was signed.
        let mut forged = rows.clone();
        forged[2].canonical = b"{\"event\":\"rewritten\"}".to_vec();
        let mut last: Option<ChainLink> = Some(ChainLink { seq: 2, prev_hash: forged[1].prev, hash: forged[1].hash });
        for r in &mut forged[2..] {
            let l = ChainLink::next(last.as_ref(), &r.canonical);
            (r.prev, r.hash) = (l.prev_hash, l.hash);
            last = Some(l);
        }
        assert!(verify(&forged, None).is_ok());
        let mut v = Verifier::new().anchored(cp.0, cp.1);
        let result = forged.iter().try_for_each(|r| v.push(r.seq, &r.canonical, &r.prev, &r.hash));
        assert_eq!(result, Err(ChainError { seq: 8, kind: BreakKind::CheckpointMismatch }));
        assert_eq!(verify(&forged[..8], Some(cp)), err(8, BreakKind::CheckpointMismatch));
    }

    #[test]
    fn stored_event_json_is_verified_and_unparsable_rows_count_as_edited() {
        let e = crate::audit::event::tests::sample();
        let json: Vec<Vec<u8>> = (0..3)
            .map(|i| {
                let mut e = e.clone();
                e.resource_version = Some(i);
                serde_json::to_vec(&e).unwrap()
            })
            .collect();
        let mut links: Vec<ChainLink> = Vec::new();
        for j in &json {
            let canonical = serde_json::from_slice::<AuditEvent>(j).unwrap().canonical_bytes().unwrap();
            links.push(ChainLink::next(links.last(), &canonical));
        }
        let walk = |rows: &[Vec<u8>]| {
            let mut v = Verifier::new();
            for (j, l) in rows.iter().zip(&links) {
                v.push_stored(l.seq, j, &l.prev_hash, &l.hash)?;
            }
            v.finish(None)
        };
        assert_eq!(walk(&json).unwrap().unwrap().count, 3);
        let mut tampered = json.clone();
        tampered[1] = String::from_utf8(tampered[1].clone()).unwrap().replace("TREAT", "BTG").into_bytes();
        assert_eq!(walk(&tampered), err(2, BreakKind::Edited));
        tampered[1] = b"{not json".to_vec();
        assert_eq!(walk(&tampered), err(2, BreakKind::Edited));
        // Order is checked before content: an unparsable row after a deleted one names the deletion.
        let mut v = Verifier::new();
        v.push_stored(1, &json[0], &links[0].prev_hash, &links[0].hash).unwrap();
        let gap = v.push_stored(3, b"{not json", &links[2].prev_hash, &links[2].hash);
        assert_eq!(gap, Err(ChainError { seq: 2, kind: BreakKind::Missing }));
    }

    #[test]
    fn errors_are_sticky_and_name_only_a_seq() {
        let mut rows = trail(5);
        rows[1].canonical = b"{\"secret\":\"Jane Doe\"}".to_vec();
        let mut v = Verifier::new();
        v.push(1, &rows[0].canonical, &rows[0].prev, &rows[0].hash).unwrap();
        let e = v.push(2, &rows[1].canonical, &rows[1].prev, &rows[1].hash).unwrap_err();
        assert_eq!(e.to_string(), "audit record 2: edited");
        assert_eq!(v.push(3, &rows[2].canonical, &rows[2].prev, &rows[2].hash), Err(e));
        assert_eq!(v.finish(None), Err(e));
    }

    #[test]
    fn checkpoints_sign_verify_and_detect_tampering() {
        let (signer, pkcs8) = CheckpointSigner::generate().unwrap();
        let again = CheckpointSigner::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(again.public_key(), signer.public_key());
        let at = datetime!(2026-05-06 07:08:09.5 UTC);
        let cp = signer.sign(42, [9; 32], at);
        assert_eq!(cp.at, datetime!(2026-05-06 07:08:09 UTC));
        cp.verify(signer.public_key()).unwrap();

        // JSON round trip for off-site export.
        let json = serde_json::to_string(&cp).unwrap();
        assert!(json.contains(&to_hex(&[9; 32])));
        let back: Checkpoint = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cp);
        back.verify(signer.public_key()).unwrap();

        let mut t = cp.clone();
        t.seq = 41;
        assert_eq!(t.verify(signer.public_key()), Err(CheckpointError::BadSignature));
        let mut t = cp.clone();
        t.hash[0] ^= 1;
        assert_eq!(t.verify(signer.public_key()), Err(CheckpointError::BadSignature));
        let mut t = cp.clone();
        t.at += time::Duration::seconds(1);
        assert_eq!(t.verify(signer.public_key()), Err(CheckpointError::BadSignature));
        let mut t = cp.clone();
        t.signature[0] ^= 1;
        assert_eq!(t.verify(signer.public_key()), Err(CheckpointError::BadSignature));
        let (other, _) = CheckpointSigner::generate().unwrap();
        assert_eq!(cp.verify(other.public_key()), Err(CheckpointError::WrongKey));
        // Claiming the other key's id does not help.
        let mut t = cp.clone();
        t.key_id = other.key_id().to_owned();
        assert_eq!(t.verify(other.public_key()), Err(CheckpointError::BadSignature));
        assert!(CheckpointSigner::from_pkcs8(b"not a key").is_err());
    }

    #[test]
    fn hex_round_trips() {
        let h = link(&GENESIS, 3, b"abc");
        assert_eq!(hash_from_hex(&to_hex(&h)), Some(h));
        assert_eq!(hash_from_hex("zz"), None);
        assert_eq!(hash_from_hex(&"g".repeat(64)), None);
    }

    /// Verify throughput, debug build: `cargo test --lib audit::chain -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn verify_throughput() {
        let e = crate::audit::event::tests::sample();
        let n = 100_000usize;
        let rows: Vec<Row> = {
            let mut last: Option<ChainLink> = None;
            (0..n)
                .map(|_| {
                    let canonical = e.canonical_bytes().unwrap();
                    let l = ChainLink::next(last.as_ref(), &canonical);
                    last = Some(l);
                    Row { seq: l.seq, canonical, prev: l.prev_hash, hash: l.hash }
                })
                .collect()
        };
        let start = std::time::Instant::now();
        let head = verify(&rows, None).unwrap().unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(head.count, n as u64);
        println!(
            "chain only: {n} records of {} bytes in {secs:.3}s = {:.0} events/s",
            rows[0].canonical.len(),
            n as f64 / secs
        );
        // As `audit verify` runs: parse the stored event JSON, recompute its canonical bytes, check the link.
        let start = std::time::Instant::now();
        let mut v = Verifier::new();
        for r in &rows {
            let parsed: crate::audit::AuditEvent = serde_json::from_slice(&r.canonical).unwrap();
            v.push(r.seq, &parsed.canonical_bytes().unwrap(), &r.prev, &r.hash).unwrap();
        }
        v.finish(None).unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!("parse + canonicalize + chain: {n} records in {secs:.3}s = {:.0} events/s", n as f64 / secs);
    }
}
