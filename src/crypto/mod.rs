//! Field-level encryption at rest: pure cryptography, no database code.
//!
//! Guarantees:
//! - Every field is sealed with AES-256-GCM-SIV under a versioned data key, with associated data binding the
//!   resource type, resource id, element path and key version: a ciphertext moved to another row, element or
//!   resource type fails to decrypt ([`cipher`]).
//! - Data keys and the blind-index key are random 256-bit keys, stored only wrapped by a master key that never
//!   enters the database ([`master`], [`keyring`]); unwrapped keys live in memory only and are zeroized on drop.
//! - Search over encrypted elements uses truncated keyed hashes (blind indexes) under a key derived per resource
//!   type and search parameter ([`blind`]).
//! - Fail closed: any decrypt, unwrap or format failure is an error, never partial data. Error messages are
//!   generic and carry no key material and no plaintext.
//!
//! See `docs/encryption.md` for the formats and the reasoning.

pub mod blind;
pub mod cipher;
pub mod keyring;
pub mod master;
pub mod store;

pub use blind::{BLIND_INDEX_BITS, BlindIndexer, normalize_text, words};
pub use cipher::{FieldAad, FieldCipher, decrypt_failures, decryptions};
pub use keyring::{DataKey, KeyPurpose, KeyRing, WrappedKey};
pub use master::{KeyProvider, LocalKeyProvider, MasterKey};

use rand::RngCore;
use rand::rngs::OsRng;
use std::path::PathBuf;

/// Everything that can go wrong in this module. Messages are fixed texts plus, at most, a key version number,
/// a provider id (a non-reversible fingerprint) or an operator-supplied file path: never key bytes, never
/// plaintext, never a client-supplied value.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The master key text is not one line of base64 encoding exactly 32 bytes.
    #[error("the master key must be 32 random bytes, base64-encoded on one line")]
    MasterKeyFormat,
    /// The master key file (setting `keys.master_key_file`) could not be read or written.
    #[error("master key file {} (setting keys.master_key_file): {reason}", path.display())]
    MasterKeyFile { path: PathBuf, reason: &'static str },
    /// The master key file could not be read or written, with the operating system's error (which names no
    /// content).
    #[error("master key file {} (setting keys.master_key_file): {reason}", path.display())]
    MasterKeyFileIo {
        path: PathBuf,
        reason: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// No stored key could be unwrapped: the master key is not the one the keys were wrapped with.
    #[error("the master key {provider} cannot unwrap the stored keys: wrong master key (check keys.master_key_file)")]
    WrongMasterKey { provider: String },
    /// One stored key failed its integrity check while others unwrapped: the key table was tampered with.
    #[error("stored {purpose} key version {version} failed its integrity check")]
    KeyIntegrity { purpose: &'static str, version: u32 },
    /// The stored keys do not form a usable ring (fixed reason).
    #[error("key ring unusable: {0}")]
    KeyRing(&'static str),
    /// A ciphertext names a data-key version this ring does not hold (reload the ring, then retry).
    #[error("ciphertext uses unknown data key version {0}")]
    UnknownKeyVersion(u32),
    /// The ciphertext is not in a format this build understands.
    #[error("ciphertext is malformed")]
    Malformed,
    /// Authentication failed: wrong key, wrong associated data (moved ciphertext) or tampering.
    #[error("decryption failed: integrity check")]
    Decrypt,
    /// Sealing failed (not expected with valid keys).
    #[error("encryption failed")]
    Encrypt,
    /// The operating system's random number generator failed.
    #[error("random number generator unavailable")]
    Random,
    /// An external key provider (KMS, Vault) failed; the text must not contain key material.
    #[error("key provider error: {0}")]
    Provider(String),
}

/// On the request path a cryptographic failure is an internal error (500), with the fixed-text cause kept.
impl From<CryptoError> for crate::error::AppError {
    fn from(e: CryptoError) -> Self {
        crate::error::AppError::internal_from("cryptography", e)
    }
}

/// Fills `buf` from the operating system's CSPRNG; an error instead of a panic when it is unavailable.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<(), CryptoError> {
    OsRng.try_fill_bytes(buf).map_err(|_| CryptoError::Random)
}

/// Appends `part` with an 8-byte big-endian length prefix, so that concatenated parts are unambiguous
/// (`("ab", "c")` and `("a", "bc")` encode differently).
pub(crate) fn push_part(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u64).to_be_bytes());
    out.extend_from_slice(part);
}
