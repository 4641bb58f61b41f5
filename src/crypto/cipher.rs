//! The field cipher: one PHI element in, one self-describing ciphertext string out.
//!
//! Format `cv1:{version}:{base64url_nopad(nonce || ciphertext || tag)}`: AES-256-GCM-SIV under data key
//! `version`, a fresh random 96-bit nonce per encryption, the plaintext padded (ISO/IEC 7816-4) to a multiple of
//! 16 bytes so short values of different lengths (e.g. `male` / `female`) look alike. The associated data binds
//! the format, the key version, the resource type, the resource id and the element path, each length-prefixed,
//! so a ciphertext copied to another row, element or resource type fails to decrypt.
//!
//! Guarantees: decryption either returns the whole authenticated plaintext (in a zeroizing buffer) or an error,
//! never partial data; every decryption attempt is counted ([`decryptions`], [`FieldCipher::decryption_count`]),
//! so tests can prove that fields a caller may not see are never decrypted.

use super::blind::BlindIndexer;
use super::keyring::{DataKey, KeyRing};
use super::{CryptoError, push_part, random_bytes};
use aes_gcm_siv::aead::{AeadInPlace, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use zeroize::Zeroizing;

/// Prefix of format 1; a future format gets a new prefix and both decrypt side by side.
const PREFIX: &str = "cv1:";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Plaintexts are padded to a multiple of this many bytes.
const PAD_BLOCK: usize = 16;

static DECRYPTIONS: AtomicU64 = AtomicU64::new(0);
static DECRYPT_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Field decryptions that failed (tampering, a ciphertext moved to another place, a missing key) since start.
pub fn decrypt_failures() -> u64 {
    DECRYPT_FAILURES.load(Ordering::Relaxed)
}

/// Field decryptions attempted by this process since start (all [`FieldCipher`]s).
pub fn decryptions() -> u64 {
    DECRYPTIONS.load(Ordering::Relaxed)
}

/// Where a field lives: bound as associated data, so the ciphertext only decrypts in this place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldAad<'a> {
    /// FHIR resource type, e.g. `Patient`.
    pub resource_type: &'a str,
    /// The resource's logical id.
    pub resource_id: &'a str,
    /// The element path, e.g. `name[0].family` or `birthDate`.
    pub path: &'a str,
}

impl<'a> FieldAad<'a> {
    pub fn new(resource_type: &'a str, resource_id: &'a str, path: &'a str) -> Self {
        Self { resource_type, resource_id, path }
    }

    fn encode(&self, version: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.resource_type.len() + self.resource_id.len() + self.path.len());
        push_part(&mut out, PREFIX.as_bytes());
        push_part(&mut out, &version.to_be_bytes());
        push_part(&mut out, self.resource_type.as_bytes());
        push_part(&mut out, self.resource_id.as_bytes());
        push_part(&mut out, self.path.as_bytes());
        out
    }
}

/// Loads the current ring from where keys are stored (the database), for [`FieldCipher::set_reloader`].
pub type RingLoader = Arc<dyn Fn() -> Result<KeyRing, CryptoError> + Send + Sync>;

/// Encrypts and decrypts fields with a [`KeyRing`]. Cheap to clone; all clones share the ring, so
/// [`FieldCipher::replace_ring`] (after a rotation) reaches every handler at once.
#[derive(Clone)]
pub struct FieldCipher {
    ring: Arc<RwLock<Arc<KeyRing>>>,
    decrypted: Arc<AtomicU64>,
    loader: Arc<OnceLock<RingLoader>>,
}

impl FieldCipher {
    pub fn new(ring: KeyRing) -> Self {
        Self {
            ring: Arc::new(RwLock::new(Arc::new(ring))),
            decrypted: Arc::new(AtomicU64::new(0)),
            loader: Arc::new(OnceLock::new()),
        }
    }

    /// Lets decryption reload the ring once when a ciphertext names a version newer than any held (a key
    /// rotated by another process). Set once, shared by every clone; later calls are ignored.
    pub fn set_reloader(&self, loader: RingLoader) {
        let _ = self.loader.set(loader);
    }

    /// The ring to open a `version` ciphertext with: the current one, or a freshly loaded one when `version`
    /// is newer than every version held and a loader is set (a failed load keeps the current ring).
    fn ring_for(&self, version: u32) -> Arc<KeyRing> {
        let ring = self.ring();
        let newer = ring.versions().last().is_none_or(|newest| version > *newest);
        if ring.data_key(version).is_some() || !newer {
            return ring;
        }
        match self.loader.get().map(|load| load()) {
            Some(Ok(fresh)) if fresh.data_key(version).is_some() => {
                let fresh = Arc::new(fresh);
                *self.ring.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&fresh);
                fresh
            }
            _ => ring,
        }
    }

    /// The current ring (a snapshot: a concurrent replacement does not change it).
    pub fn ring(&self) -> Arc<KeyRing> {
        // The lock only guards an `Arc` swap, which cannot be left half-done: a poisoned lock is still valid.
        Arc::clone(&self.ring.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Installs a new ring (after a rotation, or a reload that found new versions). It must hold every version
    /// still used by stored rows and the same index key.
    pub fn replace_ring(&self, ring: KeyRing) {
        *self.ring.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(ring);
    }

    /// The data-key version new encryptions use.
    pub fn active_version(&self) -> u32 {
        self.ring().active_version()
    }

    /// The blind indexer for the current ring's index key.
    pub fn blind_indexer(&self) -> BlindIndexer {
        self.ring().blind_indexer()
    }

    /// Decryptions attempted through this cipher and its clones.
    pub fn decryption_count(&self) -> u64 {
        self.decrypted.load(Ordering::Relaxed)
    }

    /// Seals `plaintext` for the place `aad` under the active data key.
    pub fn encrypt(&self, aad: &FieldAad<'_>, plaintext: &[u8]) -> Result<String, CryptoError> {
        let ring = self.ring();
        let key = ring.active_key()?;
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        let padded_len = (plaintext.len() / PAD_BLOCK + 1) * PAD_BLOCK;
        // Exact capacity: growing would leave an unzeroized copy of the plaintext behind.
        let mut buf = Zeroizing::new(Vec::with_capacity(padded_len + TAG_LEN));
        buf.extend_from_slice(plaintext);
        buf.push(0x80);
        buf.resize(padded_len, 0);
        cipher(key)?
            .encrypt_in_place(&Nonce::from(nonce), &aad.encode(key.version()), &mut *buf)
            .map_err(|_| CryptoError::Encrypt)?;
        let mut raw = Vec::with_capacity(NONCE_LEN + buf.len());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&buf);
        Ok(format!("{PREFIX}{}:{}", key.version(), URL_SAFE_NO_PAD.encode(raw)))
    }

    /// Opens a ciphertext made by [`FieldCipher::encrypt`] for the same place. Any mismatch (other row, element
    /// or type; tampering; unknown version) is an error; nothing partial is returned.
    pub fn decrypt(&self, aad: &FieldAad<'_>, ciphertext: &str) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        DECRYPTIONS.fetch_add(1, Ordering::Relaxed);
        self.decrypted.fetch_add(1, Ordering::Relaxed);
        let opened = self.open(aad, ciphertext);
        if opened.is_err() {
            DECRYPT_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
        opened
    }

    fn open(&self, aad: &FieldAad<'_>, ciphertext: &str) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let (version, body) = parse(ciphertext).ok_or(CryptoError::Malformed)?;
        let ring = self.ring_for(version);
        let key = ring.data_key(version).ok_or(CryptoError::UnknownKeyVersion(version))?;
        let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| CryptoError::Malformed)?;
        if raw.len() < NONCE_LEN + PAD_BLOCK + TAG_LEN || !(raw.len() - NONCE_LEN - TAG_LEN).is_multiple_of(PAD_BLOCK) {
            return Err(CryptoError::Malformed);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Malformed)?;
        let mut buf = Zeroizing::new(sealed.to_vec());
        cipher(key)?
            .decrypt_in_place(&Nonce::from(nonce), &aad.encode(version), &mut *buf)
            .map_err(|_| CryptoError::Decrypt)?;
        // Strip the padding: trailing zeros, then the 0x80 marker (authenticated, so only a bug could break it).
        let marker = buf.iter().rposition(|&b| b != 0).ok_or(CryptoError::Malformed)?;
        if buf[marker] != 0x80 {
            return Err(CryptoError::Malformed);
        }
        buf.truncate(marker);
        Ok(buf)
    }

    /// Encrypts one FHIR element (any JSON value) as its compact JSON text.
    pub fn encrypt_json(&self, aad: &FieldAad<'_>, value: &serde_json::Value) -> Result<String, CryptoError> {
        let text = Zeroizing::new(serde_json::to_vec(value).map_err(|_| CryptoError::Encrypt)?);
        self.encrypt(aad, &text)
    }

    /// Decrypts one element written by [`FieldCipher::encrypt_json`].
    pub fn decrypt_json(&self, aad: &FieldAad<'_>, ciphertext: &str) -> Result<serde_json::Value, CryptoError> {
        let text = self.decrypt(aad, ciphertext)?;
        serde_json::from_slice(&text).map_err(|_| CryptoError::Malformed)
    }

    /// Re-encryption after a rotation: `None` when the ciphertext already uses the active version, otherwise
    /// the same plaintext sealed under the active version (the old one must still be in the ring).
    pub fn reencrypt(&self, aad: &FieldAad<'_>, ciphertext: &str) -> Result<Option<String>, CryptoError> {
        let version = Self::version_of(ciphertext).ok_or(CryptoError::Malformed)?;
        if version == self.active_version() {
            return Ok(None);
        }
        let plaintext = self.decrypt(aad, ciphertext)?;
        self.encrypt(aad, &plaintext).map(Some)
    }

    /// The data-key version a ciphertext was made with, or `None` when it is not in a known format.
    pub fn version_of(ciphertext: &str) -> Option<u32> {
        parse(ciphertext).map(|(version, _)| version)
    }
}

impl fmt::Debug for FieldCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FieldCipher").field("ring", &self.ring()).finish()
    }
}

/// Splits `cv1:{version}:{body}`; the version must be canonical decimal (no sign, no leading zero), not 0.
fn parse(ciphertext: &str) -> Option<(u32, &str)> {
    let (version, body) = ciphertext.strip_prefix(PREFIX)?.split_once(':')?;
    let canonical = !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit()) && !version.starts_with('0');
    if !canonical {
        return None;
    }
    Some((version.parse().ok()?, body))
}

/// A cipher instance per operation: the key schedule lives only as long as the call.
fn cipher(key: &DataKey) -> Result<Aes256GcmSiv, CryptoError> {
    Aes256GcmSiv::new_from_slice(key.bytes()).map_err(|_| CryptoError::KeyRing("data key length"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keyring::WrappedKey;
    use crate::crypto::master::{LocalKeyProvider, MasterKey};
    use serde_json::json;

    fn setup() -> (FieldCipher, LocalKeyProvider, Vec<WrappedKey>) {
        let provider = LocalKeyProvider::new(MasterKey::generate().unwrap());
        let (ring, wrapped) = KeyRing::generate(&provider).unwrap();
        (FieldCipher::new(ring), provider, wrapped)
    }

    const HERE: FieldAad<'static> = FieldAad { resource_type: "Patient", resource_id: "p1", path: "name[0].family" };

    #[test]
    fn round_trip_including_empty_and_block_sized_values() {
        let (c, _, _) = setup();
        for plain in [&b""[..], b"Smith", &[0u8; 15], &[0x80u8; 16], &[0u8; 17], "Zoë Ångström".as_bytes()] {
            let ct = c.encrypt(&HERE, plain).unwrap();
            assert!(ct.starts_with("cv1:1:"), "{ct}");
            assert_eq!(c.decrypt(&HERE, &ct).unwrap().as_slice(), plain);
        }
    }

    #[test]
    fn ciphertext_hides_the_plaintext_and_short_lengths() {
        let (c, _, _) = setup();
        let male = c.encrypt(&HERE, b"\"male\"").unwrap();
        let female = c.encrypt(&HERE, b"\"female\"").unwrap();
        assert_eq!(male.len(), female.len(), "padding hides short length differences");
        assert!(!male.contains("male"));
    }

    #[test]
    fn json_elements_round_trip() {
        let (c, _, _) = setup();
        let value = json!({"family": "García", "given": ["Ana", "María"]});
        let ct = c.encrypt_json(&HERE, &value).unwrap();
        assert_eq!(c.decrypt_json(&HERE, &ct).unwrap(), value);
    }

    #[test]
    fn moved_ciphertext_fails_to_decrypt() {
        let (c, _, _) = setup();
        let ct = c.encrypt(&HERE, b"Smith").unwrap();
        for elsewhere in [
            FieldAad::new("Patient", "p2", "name[0].family"),
            FieldAad::new("Patient", "p1", "name[0].given[0]"),
            FieldAad::new("Practitioner", "p1", "name[0].family"),
        ] {
            assert!(matches!(c.decrypt(&elsewhere, &ct), Err(CryptoError::Decrypt)), "{elsewhere:?}");
        }
    }

    #[test]
    fn aad_parts_are_length_prefixed() {
        assert_ne!(FieldAad::new("ab", "c", "x").encode(1), FieldAad::new("a", "bc", "x").encode(1));
        assert_ne!(FieldAad::new("a", "b", "c").encode(1), FieldAad::new("a", "b", "c").encode(2));
        let (c, _, _) = setup();
        let ct = c.encrypt(&FieldAad::new("Patient", "ab", "c"), b"x").unwrap();
        assert!(c.decrypt(&FieldAad::new("Patient", "a", "bc"), &ct).is_err());
    }

    #[test]
    fn every_tampered_byte_fails() {
        let (c, _, _) = setup();
        let ct = c.encrypt(&HERE, b"Smith").unwrap();
        let body = ct.strip_prefix("cv1:1:").unwrap();
        let raw = URL_SAFE_NO_PAD.decode(body).unwrap();
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x01;
            let bad = format!("cv1:1:{}", URL_SAFE_NO_PAD.encode(&bad));
            assert!(matches!(c.decrypt(&HERE, &bad), Err(CryptoError::Decrypt)), "byte {i}");
        }
        let truncated = format!("cv1:1:{}", URL_SAFE_NO_PAD.encode(&raw[..raw.len() - 16]));
        assert!(matches!(c.decrypt(&HERE, &truncated), Err(CryptoError::Malformed)));
    }

    #[test]
    fn malformed_prefixes_are_refused() {
        let (c, _, _) = setup();
        let ct = c.encrypt(&HERE, b"Smith").unwrap();
        let body = ct.strip_prefix("cv1:1:").unwrap();
        for bad in [
            format!("cv2:1:{body}"),
            format!("cv1:01:{body}"),
            format!("cv1:+1:{body}"),
            format!("cv1::{body}"),
            format!("cv1:1:{body}="),
            format!("cv1:1{body}"),
            "Smith".to_string(),
        ] {
            assert!(matches!(c.decrypt(&HERE, &bad), Err(CryptoError::Malformed)), "{bad}");
        }
        assert!(matches!(c.decrypt(&HERE, &format!("cv1:9:{body}")), Err(CryptoError::UnknownKeyVersion(9))));
        assert_eq!(FieldCipher::version_of(&ct), Some(1));
        assert_eq!(FieldCipher::version_of("cv1:0:abc"), None);
        assert_eq!(FieldCipher::version_of("plain text"), None);
    }

    #[test]
    fn nonces_are_fresh() {
        let (c, _, _) = setup();
        let a = c.encrypt(&HERE, b"Smith").unwrap();
        let b = c.encrypt(&HERE, b"Smith").unwrap();
        assert_ne!(a, b);
        assert_ne!(&a[6..22], &b[6..22], "the nonce differs");
    }

    #[test]
    fn rotation_keeps_old_ciphertexts_readable_and_encrypts_with_the_new_key() {
        let (c, provider, mut wrapped) = setup();
        let old = c.encrypt(&HERE, b"Smith").unwrap();
        let clone = c.clone();
        let (ring2, w2) = c.ring().rotate(&provider).unwrap();
        wrapped.push(w2);
        c.replace_ring(ring2);
        assert_eq!(clone.active_version(), 2, "clones share the ring");
        let new = clone.encrypt(&HERE, b"Smith").unwrap();
        assert_eq!(FieldCipher::version_of(&new), Some(2));
        assert_eq!(c.decrypt(&HERE, &old).unwrap().as_slice(), b"Smith");
        let moved = c.reencrypt(&HERE, &old).unwrap().unwrap();
        assert_eq!(FieldCipher::version_of(&moved), Some(2));
        assert_eq!(c.reencrypt(&HERE, &moved).unwrap(), None);
        // A process restarted on the stored keys reads both generations.
        let reloaded = FieldCipher::new(KeyRing::from_wrapped(&provider, &wrapped, 2).unwrap());
        assert_eq!(reloaded.decrypt(&HERE, &old).unwrap().as_slice(), b"Smith");
        assert_eq!(reloaded.decrypt(&HERE, &new).unwrap().as_slice(), b"Smith");
        // The version is bound: relabelling a v1 ciphertext as v2 fails.
        let relabelled = old.replacen("cv1:1:", "cv1:2:", 1);
        assert!(matches!(c.decrypt(&HERE, &relabelled), Err(CryptoError::Decrypt)));
    }

    #[test]
    fn other_key_ring_cannot_decrypt() {
        let (a, _, _) = setup();
        let (b, _, _) = setup();
        let ct = a.encrypt(&HERE, b"Smith").unwrap();
        assert!(matches!(b.decrypt(&HERE, &ct), Err(CryptoError::Decrypt)));
    }

    #[test]
    fn every_decrypt_attempt_is_counted() {
        let (c, _, _) = setup();
        let ct = c.encrypt(&HERE, b"Smith").unwrap();
        let global = decryptions();
        assert_eq!(c.decryption_count(), 0, "encryption is not counted");
        c.decrypt(&HERE, &ct).unwrap();
        let _ = c.clone().decrypt(&FieldAad::new("Patient", "p2", "x"), &ct);
        assert_eq!(c.decryption_count(), 2);
        assert!(decryptions() >= global + 2);
    }

    #[test]
    fn an_unknown_newer_version_reloads_the_ring_once() {
        let (c, provider, _) = setup();
        let (ring2, _) = c.ring().rotate(&provider).unwrap();
        let writer = FieldCipher::new(ring2.clone());
        let ct = writer.encrypt(&HERE, b"Smith").unwrap();
        assert!(matches!(c.decrypt(&HERE, &ct), Err(CryptoError::UnknownKeyVersion(2))), "no loader yet");
        let loads = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&loads);
        c.set_reloader(Arc::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
            Ok(ring2.clone())
        }));
        assert_eq!(c.decrypt(&HERE, &ct).unwrap().as_slice(), b"Smith");
        assert_eq!((c.active_version(), loads.load(Ordering::Relaxed)), (2, 1));
        c.decrypt(&HERE, &ct).unwrap();
        assert_eq!(loads.load(Ordering::Relaxed), 1, "a held version needs no reload");
        let body = ct.strip_prefix("cv1:2:").unwrap();
        assert!(matches!(c.decrypt(&HERE, &format!("cv1:7:{body}")), Err(CryptoError::UnknownKeyVersion(7))));
        assert_eq!(loads.load(Ordering::Relaxed), 2, "one reload per unknown newer version, then failure");
    }

    #[test]
    fn errors_and_debug_carry_no_secrets() {
        let (c, _, _) = setup();
        let ct = c.encrypt(&HERE, b"Smith").unwrap();
        let err = c.decrypt(&FieldAad::new("Patient", "p2", "x"), &ct).unwrap_err().to_string();
        assert!(!err.contains("Smith") && !err.contains("p2"), "{err}");
        let shown = format!("{c:?}");
        assert!(shown.contains("active") && !shown.contains("key:"), "{shown}");
    }
}
