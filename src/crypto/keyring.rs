//! The key ring: every data-key version (to decrypt old rows), the active version (to encrypt new ones) and the
//! blind-index key, all unwrapped in memory only and zeroized on drop.
//!
//! Guarantees: keys are 256-bit values from the OS CSPRNG; what leaves this module for storage is only the
//! [`WrappedKey`] form; each key is wrapped with its id (`carevault/data/v3`, `carevault/index/v1`) as
//! associated data, so swapping wrapped keys between slots fails; loading with the wrong master key is refused
//! with [`CryptoError::WrongMasterKey`], and a single tampered key with [`CryptoError::KeyIntegrity`].

use super::blind::BlindIndexer;
use super::master::{KEY_LEN, KeyProvider};
use super::{CryptoError, random_bytes};
use std::collections::BTreeMap;
use std::fmt;
use zeroize::Zeroizing;

/// What a stored key is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyPurpose {
    /// Encrypts fields (AES-256-GCM-SIV).
    Data,
    /// Derives blind-index keys (HKDF-SHA256, then HMAC-SHA256).
    Index,
}

impl KeyPurpose {
    /// The name stored in the database and used in key ids.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Index => "index",
        }
    }

    /// The inverse of [`KeyPurpose::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "data" => Some(Self::Data),
            "index" => Some(Self::Index),
            _ => None,
        }
    }

    /// The key id bound as associated data when wrapping: `carevault/{purpose}/v{version}`.
    pub fn key_id(self, version: u32) -> String {
        format!("carevault/{}/v{version}", self.as_str())
    }
}

/// A key as the database stores it: wrapped by the master key, never in the clear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    pub purpose: KeyPurpose,
    pub version: u32,
    pub wrapped: Vec<u8>,
}

/// An unwrapped data key. Zeroized on drop; `Debug` shows only the version.
#[derive(Clone)]
pub struct DataKey {
    version: u32,
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl DataKey {
    pub fn version(&self) -> u32 {
        self.version
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.key
    }

    fn random(version: u32) -> Result<Self, CryptoError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        random_bytes(key.as_mut())?;
        Ok(Self { version, key })
    }

    fn wrap(&self, purpose: KeyPurpose, provider: &dyn KeyProvider) -> Result<WrappedKey, CryptoError> {
        let wrapped = provider.wrap(&purpose.key_id(self.version), self.key.as_ref())?;
        Ok(WrappedKey { purpose, version: self.version, wrapped })
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey").field("version", &self.version).finish_non_exhaustive()
    }
}

/// Every data-key version, the active one, and the blind-index keys. Immutable: rotation builds a new ring.
///
/// Normally one index key is held. During an index-key rotation (`keys reindex`) two are: the newest computes
/// every index value written, and searches look under all of them, so rows not yet rebuilt stay findable.
#[derive(Clone)]
pub struct KeyRing {
    data: BTreeMap<u32, DataKey>,
    active: u32,
    /// The newest index key: new index values use it. Stored as a `DataKey` for its zeroizing container; its
    /// purpose is [`KeyPurpose::Index`].
    index: DataKey,
    /// Older index keys still held during an index-key rotation (searched, never used for new values).
    older_index: BTreeMap<u32, DataKey>,
}

impl KeyRing {
    /// A new ring for an empty database: data key v1 (active) and index key v1. Store every returned
    /// [`WrappedKey`] before using the ring.
    pub fn generate(provider: &dyn KeyProvider) -> Result<(Self, Vec<WrappedKey>), CryptoError> {
        let data = DataKey::random(1)?;
        let index = DataKey::random(1)?;
        let wrapped = vec![data.wrap(KeyPurpose::Data, provider)?, index.wrap(KeyPurpose::Index, provider)?];
        Ok((Self { data: BTreeMap::from([(1, data)]), active: 1, index, older_index: BTreeMap::new() }, wrapped))
    }

    /// Unwraps the stored keys. `active_version` is the data-key version new encryptions use; new index values
    /// use the highest stored index version, searches every stored one. Refuses with [`CryptoError::WrongMasterKey`] when no key unwraps, and
    /// with [`CryptoError::KeyIntegrity`] when some unwrap but one does not.
    pub fn from_wrapped(
        provider: &dyn KeyProvider,
        stored: &[WrappedKey],
        active_version: u32,
    ) -> Result<Self, CryptoError> {
        if stored.is_empty() {
            return Err(CryptoError::KeyRing("no stored keys"));
        }
        let mut data = BTreeMap::new();
        let mut index = BTreeMap::new();
        let mut first_failure: Option<&WrappedKey> = None;
        let mut unwrapped_any = false;
        for item in stored {
            if item.version == 0 {
                return Err(CryptoError::KeyRing("key version 0"));
            }
            let key = match provider.unwrap(&item.purpose.key_id(item.version), &item.wrapped) {
                Ok(bytes) => bytes,
                Err(CryptoError::Decrypt | CryptoError::Malformed) => {
                    first_failure = first_failure.or(Some(item));
                    continue;
                }
                Err(other) => return Err(other),
            };
            unwrapped_any = true;
            let bytes: &[u8; KEY_LEN] =
                key.as_slice().try_into().map_err(|_| CryptoError::KeyRing("unwrapped key has the wrong length"))?;
            let key = DataKey { version: item.version, key: Zeroizing::new(*bytes) };
            match item.purpose {
                KeyPurpose::Data => {
                    if data.insert(item.version, key).is_some() {
                        return Err(CryptoError::KeyRing("duplicate data key version"));
                    }
                }
                KeyPurpose::Index => {
                    if index.insert(item.version, key).is_some() {
                        return Err(CryptoError::KeyRing("duplicate index key version"));
                    }
                }
            }
        }
        if let Some(failed) = first_failure {
            return Err(if unwrapped_any {
                CryptoError::KeyIntegrity { purpose: failed.purpose.as_str(), version: failed.version }
            } else {
                CryptoError::WrongMasterKey { provider: provider.id() }
            });
        }
        if !data.contains_key(&active_version) {
            return Err(CryptoError::KeyRing("the active data key version is not stored"));
        }
        let newest = index.keys().next_back().copied().ok_or(CryptoError::KeyRing("no index key stored"))?;
        let index_key = index.remove(&newest).ok_or(CryptoError::KeyRing("no index key stored"))?;
        Ok(Self { data, active: active_version, index: index_key, older_index: index })
    }

    /// A fresh random data key with the given version, and its wrapped form to store. Use with
    /// [`KeyRing::with_data_key`] when the version comes from the database (several writers); [`KeyRing::rotate`]
    /// does both for the next version.
    pub fn new_data_key(provider: &dyn KeyProvider, version: u32) -> Result<(DataKey, WrappedKey), CryptoError> {
        if version == 0 {
            return Err(CryptoError::KeyRing("key version 0"));
        }
        let key = DataKey::random(version)?;
        let wrapped = key.wrap(KeyPurpose::Data, provider)?;
        Ok((key, wrapped))
    }

    /// This ring plus `key`, which becomes the active version. Old versions stay, so old rows still decrypt.
    pub fn with_data_key(&self, key: DataKey) -> Result<Self, CryptoError> {
        if self.data.contains_key(&key.version) {
            return Err(CryptoError::KeyRing("duplicate data key version"));
        }
        let mut next = self.clone();
        next.active = key.version;
        next.data.insert(key.version, key);
        Ok(next)
    }

    /// Rotation: a new data key with the next version, active in the returned ring. Store the [`WrappedKey`]
    /// (and the new active version) first, then install the ring; until then nothing has changed.
    pub fn rotate(&self, provider: &dyn KeyProvider) -> Result<(Self, WrappedKey), CryptoError> {
        let newest = self.data.keys().next_back().copied().unwrap_or(0);
        let version = newest.checked_add(1).ok_or(CryptoError::KeyRing("data key versions exhausted"))?;
        let (key, wrapped) = Self::new_data_key(provider, version)?;
        Ok((self.with_data_key(key)?, wrapped))
    }

    /// Every key wrapped again under `provider` (master-key rotation): store the result in place of the old
    /// wrapped keys, then switch the process to the new master key.
    pub fn rewrap(&self, provider: &dyn KeyProvider) -> Result<Vec<WrappedKey>, CryptoError> {
        let mut out = Vec::with_capacity(self.data.len() + 1);
        for key in self.data.values() {
            out.push(key.wrap(KeyPurpose::Data, provider)?);
        }
        for key in self.older_index.values().chain([&self.index]) {
            out.push(key.wrap(KeyPurpose::Index, provider)?);
        }
        Ok(out)
    }

    /// A fresh random index key with the given version, and its wrapped form to store (index-key rotation).
    pub fn new_index_key(provider: &dyn KeyProvider, version: u32) -> Result<WrappedKey, CryptoError> {
        if version == 0 {
            return Err(CryptoError::KeyRing("key version 0"));
        }
        DataKey::random(version)?.wrap(KeyPurpose::Index, provider)
    }

    /// Remove a data-key version once no row uses it any more (after re-encryption). The active version
    /// cannot be retired.
    pub fn without_data_key(&self, version: u32) -> Result<Self, CryptoError> {
        if version == self.active {
            return Err(CryptoError::KeyRing("the active data key cannot be retired"));
        }
        let mut next = self.clone();
        next.data.remove(&version);
        Ok(next)
    }

    /// The data-key version new encryptions use.
    pub fn active_version(&self) -> u32 {
        self.active
    }

    /// Every data-key version held, ascending.
    pub fn versions(&self) -> Vec<u32> {
        self.data.keys().copied().collect()
    }

    /// The version of the blind-index key new index values use (the highest held).
    pub fn index_version(&self) -> u32 {
        self.index.version
    }

    /// Every index-key version held, ascending (two during an index-key rotation).
    pub fn index_versions(&self) -> Vec<u32> {
        self.older_index.keys().copied().chain([self.index.version]).collect()
    }

    /// The blind indexer for new index values: keyed by the newest index key.
    pub fn blind_indexer(&self) -> BlindIndexer {
        BlindIndexer::new(self.index.bytes())
    }

    /// One blind indexer per index key held, newest first: a search looks up the values of each, so rows whose
    /// index has not yet been rebuilt under the newest key are still found.
    pub fn blind_indexers(&self) -> Vec<BlindIndexer> {
        [&self.index].into_iter().chain(self.older_index.values().rev()).map(|k| BlindIndexer::new(k.bytes())).collect()
    }

    /// A 256-bit key for another keyed-hash purpose (`label`, e.g. `carevault/throttle/v1`), derived from the
    /// newest index key by HKDF-SHA256. Never stored; it changes when the index key is rotated.
    pub fn derived_key(&self, label: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        hkdf::Hkdf::<sha2::Sha256>::new(Some(b"carevault/derived-key/v1"), self.index.bytes())
            .expand(label.as_bytes(), out.as_mut())
            .map_err(|_| CryptoError::KeyRing("derived key length"))?;
        Ok(out)
    }

    /// What [`crate::crypto::store::key_stamp`] reads from the database for this ring: (active data-key version,
    /// number of data-key versions, index-key versions).
    pub fn stamp(&self) -> (u32, usize, Vec<u32>) {
        (self.active, self.data.len(), self.index_versions())
    }

    pub(crate) fn active_key(&self) -> Result<&DataKey, CryptoError> {
        self.data.get(&self.active).ok_or(CryptoError::KeyRing("the active data key version is not held"))
    }

    pub(crate) fn data_key(&self, version: u32) -> Option<&DataKey> {
        self.data.get(&version)
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("versions", &self.versions())
            .field("active", &self.active)
            .field("index_versions", &self.index_versions())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::master::{LocalKeyProvider, MasterKey};

    fn provider() -> LocalKeyProvider {
        LocalKeyProvider::new(MasterKey::generate().unwrap())
    }

    #[test]
    fn generate_then_reload_gives_the_same_keys() {
        let p = provider();
        let (ring, wrapped) = KeyRing::generate(&p).unwrap();
        assert_eq!(wrapped.len(), 2);
        assert_eq!((ring.active_version(), ring.versions(), ring.index_version()), (1, vec![1], 1));
        let reloaded = KeyRing::from_wrapped(&p, &wrapped, 1).unwrap();
        assert_eq!(reloaded.active_key().unwrap().bytes(), ring.active_key().unwrap().bytes());
        assert_eq!(reloaded.index.bytes(), ring.index.bytes());
        assert!(reloaded.older_index.is_empty());
        assert_ne!(ring.index.bytes(), ring.active_key().unwrap().bytes(), "independent keys");
        assert!(wrapped.iter().all(|w| { w.wrapped.windows(32).all(|win| win != ring.index.bytes().as_slice()) }));
    }

    #[test]
    fn wrong_master_key_is_refused_clearly() {
        let (_, wrapped) = KeyRing::generate(&provider()).unwrap();
        let other = provider();
        let err = KeyRing::from_wrapped(&other, &wrapped, 1).unwrap_err();
        assert!(matches!(&err, CryptoError::WrongMasterKey { provider } if *provider == other.id()), "{err:?}");
        assert!(err.to_string().contains("wrong master key"), "{err}");
    }

    #[test]
    fn one_tampered_or_swapped_key_is_an_integrity_error() {
        let p = provider();
        let (ring, mut wrapped) = KeyRing::generate(&p).unwrap();
        let (_, w2) = ring.rotate(&p).unwrap();
        wrapped.push(w2);
        let mut tampered = wrapped.clone();
        let last = tampered[2].wrapped.len() - 1;
        tampered[2].wrapped[last] ^= 1;
        assert!(matches!(
            KeyRing::from_wrapped(&p, &tampered, 1),
            Err(CryptoError::KeyIntegrity { purpose: "data", version: 2 })
        ));
        // A data key relabelled as another version fails: the key id is the wrap's associated data.
        let mut swapped = wrapped.clone();
        swapped[2].wrapped = wrapped[0].wrapped.clone();
        assert!(matches!(KeyRing::from_wrapped(&p, &swapped, 1), Err(CryptoError::KeyIntegrity { .. })));
    }

    #[test]
    fn incomplete_rings_are_refused() {
        let p = provider();
        let (_, wrapped) = KeyRing::generate(&p).unwrap();
        assert!(matches!(KeyRing::from_wrapped(&p, &wrapped, 2), Err(CryptoError::KeyRing(_))));
        assert!(matches!(KeyRing::from_wrapped(&p, &wrapped[..1], 1), Err(CryptoError::KeyRing(_))));
        assert!(matches!(KeyRing::from_wrapped(&p, &[], 1), Err(CryptoError::KeyRing(_))));
        let doubled = [wrapped[0].clone(), wrapped[0].clone(), wrapped[1].clone()];
        assert!(matches!(KeyRing::from_wrapped(&p, &doubled, 1), Err(CryptoError::KeyRing(_))));
    }

    #[test]
    fn rotation_adds_a_version_and_keeps_the_old_ones() {
        let p = provider();
        let (ring, mut wrapped) = KeyRing::generate(&p).unwrap();
        let (ring2, w2) = ring.rotate(&p).unwrap();
        assert_eq!((w2.purpose, w2.version), (KeyPurpose::Data, 2));
        assert_eq!((ring2.active_version(), ring2.versions()), (2, vec![1, 2]));
        assert_eq!(ring.active_version(), 1, "the old ring is unchanged");
        wrapped.push(w2);
        let reloaded = KeyRing::from_wrapped(&p, &wrapped, 2).unwrap();
        assert_eq!(reloaded.data_key(1).unwrap().bytes(), ring.data_key(1).unwrap().bytes());
        assert_eq!(reloaded.data_key(2).unwrap().bytes(), ring2.data_key(2).unwrap().bytes());
        assert!(ring2.without_data_key(2).is_err());
        assert_eq!(ring2.without_data_key(1).unwrap().versions(), vec![2]);
    }

    #[test]
    fn an_index_rotation_holds_both_index_keys_and_writes_with_the_newest() {
        let p = provider();
        let (ring, mut wrapped) = KeyRing::generate(&p).unwrap();
        let old = ring.blind_indexer().index("Patient", "family", "smith");
        let w2 = KeyRing::new_index_key(&p, 2).unwrap();
        assert_eq!((w2.purpose, w2.version), (KeyPurpose::Index, 2));
        wrapped.push(w2);
        let during = KeyRing::from_wrapped(&p, &wrapped, 1).unwrap();
        assert_eq!((during.index_version(), during.index_versions()), (2, vec![1, 2]));
        let new = during.blind_indexer().index("Patient", "family", "smith");
        // Two 16-bit indexes of one value under independent keys are equal with probability 2^-16; compare the
        // indexer lists by several values instead of trusting one.
        let all = |r: &KeyRing| -> Vec<Vec<String>> {
            r.blind_indexers()
                .iter()
                .map(|b| ["smith", "jones", "lee"].map(|v| b.index("Patient", "family", v)).to_vec())
                .collect()
        };
        let lists = all(&during);
        assert_eq!(lists.len(), 2);
        assert_eq!((lists[0][0].as_str(), lists[1][0].as_str()), (new.as_str(), old.as_str()), "newest first");
        assert_ne!(lists[0], lists[1]);
        assert_eq!(during.stamp(), (1, 1, vec![1, 2]));
        // Rewrapping keeps both; without the old key the ring searches under the new one only.
        assert_eq!(during.rewrap(&p).unwrap().iter().filter(|w| w.purpose == KeyPurpose::Index).count(), 2);
        let after = KeyRing::from_wrapped(&p, &[wrapped[0].clone(), wrapped[2].clone()], 1).unwrap();
        assert_eq!((after.index_versions(), all(&after)), (vec![2], vec![lists[0].clone()]));
        assert!(KeyRing::new_index_key(&p, 0).is_err());
    }

    #[test]
    fn rewrap_moves_every_key_to_a_new_master_key() {
        let old = provider();
        let (ring, _) = KeyRing::generate(&old).unwrap();
        let (ring, _) = ring.rotate(&old).unwrap();
        let new = provider();
        let rewrapped = ring.rewrap(&new).unwrap();
        assert_eq!(rewrapped.len(), 3);
        let reloaded = KeyRing::from_wrapped(&new, &rewrapped, 2).unwrap();
        assert_eq!(reloaded.data_key(1).unwrap().bytes(), ring.data_key(1).unwrap().bytes());
        assert!(matches!(KeyRing::from_wrapped(&old, &rewrapped, 2), Err(CryptoError::WrongMasterKey { .. })));
    }

    #[test]
    fn purpose_names_round_trip_and_key_ids_are_versioned() {
        for purpose in [KeyPurpose::Data, KeyPurpose::Index] {
            assert_eq!(KeyPurpose::parse(purpose.as_str()), Some(purpose));
        }
        assert_eq!(KeyPurpose::parse("other"), None);
        assert_eq!(KeyPurpose::Data.key_id(3), "carevault/data/v3");
    }

    #[test]
    fn debug_prints_no_key_bytes() {
        let (ring, _) = KeyRing::generate(&provider()).unwrap();
        let shown = format!("{ring:?} {:?}", ring.active_key().unwrap());
        let key = ring.active_key().unwrap().bytes();
        assert!(!shown.contains(&crate::crypto::master::hex(&key[..4])), "{shown}");
        let as_list = format!("{:?}", &key[..4]);
        assert!(!shown.contains(as_list.trim_end_matches(']')), "{shown}");
        assert!(shown.contains("versions") && shown.contains("DataKey"), "{shown}");
    }
}
