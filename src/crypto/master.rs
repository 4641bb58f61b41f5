//! The master key (key-encryption key) and the [`KeyProvider`] seam that wraps and unwraps data keys with it.
//!
//! Guarantees: the master key never enters the database (it comes from a file, the environment or an external
//! KMS); its bytes are zeroized on drop and never printed (`Debug` shows only a non-reversible fingerprint);
//! a generated key file is created with mode 0600 and never overwritten. Wrapping binds the key id
//! (`carevault/data/v3`) as associated data, so a wrapped key swapped into another slot fails to unwrap.

use super::{CryptoError, random_bytes};
use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::io::Write;
use std::path::Path;
use zeroize::Zeroizing;

/// Length of the master key and of every data key, in bytes.
pub const KEY_LEN: usize = 32;
/// First byte of a wrapped key produced by [`LocalKeyProvider`]: the format version.
const WRAP_FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Why a key file was refused when its content is wrong (the content itself is never echoed).
const FILE_REASON_FORMAT: &str = "content is not one line of base64 encoding 32 bytes";

/// Wraps (encrypts) and unwraps data keys with a master key the database never sees.
///
/// Implement this for a KMS or a Vault transit backend: `wrap` calls the service's encrypt operation and
/// `unwrap` its decrypt operation, passing `key_id` as the encryption context / associated data. `unwrap`
/// must fail with [`CryptoError::Decrypt`] when the wrapped bytes do not authenticate under this master key (so
/// the key ring can report a wrong master key) and with [`CryptoError::Provider`] when the service is
/// unavailable.
pub trait KeyProvider: Send + Sync + fmt::Debug {
    /// A stable, non-secret identifier of the master key (shown by `keys status` and in errors).
    fn id(&self) -> String;
    /// Encrypts `key` under the master key, binding `key_id`.
    fn wrap(&self, key_id: &str, key: &[u8]) -> Result<Vec<u8>, CryptoError>;
    /// Decrypts what [`KeyProvider::wrap`] returned for the same `key_id`.
    fn unwrap(&self, key_id: &str, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError>;
}

/// A 256-bit master key held in memory. Zeroized on drop; `Debug` prints only the fingerprint.
pub struct MasterKey(Zeroizing<[u8; KEY_LEN]>);

impl MasterKey {
    /// A fresh random key (development and tests, and `keys rotate-master`).
    pub fn generate() -> Result<Self, CryptoError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        random_bytes(key.as_mut())?;
        Ok(Self(key))
    }

    /// Parses one line of standard base64 (padding required) encoding exactly 32 bytes; surrounding
    /// whitespace, including the final newline, is ignored.
    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        let text = text.trim();
        // 32 bytes encode to 44 characters; anything much longer is not a key (and would not fit `buf`).
        if text.len() > 64 {
            return Err(CryptoError::MasterKeyFormat);
        }
        let mut buf = Zeroizing::new([0u8; 48]);
        let len = STANDARD.decode_slice(text, buf.as_mut()).map_err(|_| CryptoError::MasterKeyFormat)?;
        if len != KEY_LEN {
            return Err(CryptoError::MasterKeyFormat);
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(&buf[..KEY_LEN]);
        Ok(Self(key))
    }

    /// Reads the key file named by `keys.master_key_file`. Errors name the file, never its content.
    pub fn load_file(path: &Path) -> Result<Self, CryptoError> {
        let bytes = std::fs::read(path).map(Zeroizing::new).map_err(|e| io_error(path, e))?;
        let text = std::str::from_utf8(&bytes).map_err(|_| file_error(path, FILE_REASON_FORMAT))?;
        Self::from_base64(text).map_err(|_| file_error(path, FILE_REASON_FORMAT))
    }

    /// Generates a key into a new file (mode 0600; missing parent directories are created with mode 0700).
    /// Refuses to overwrite an existing file: a lost master key makes every stored record unreadable.
    pub fn generate_file(path: &Path) -> Result<Self, CryptoError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            create_private_dir(parent).map_err(|e| io_error(path, e))?;
        }
        let key = Self::generate()?;
        let mut line = Zeroizing::new(STANDARD.encode(key.0.as_ref()));
        line.push('\n');
        let mut file = create_private_file(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => file_error(path, "already exists; refusing to overwrite it"),
            _ => io_error(path, e),
        })?;
        if let Err(e) = file.write_all(line.as_bytes()).and_then(|()| file.sync_all()) {
            drop(file);
            // A half-written key file must not be mistaken for a key later; the write error is what matters.
            let _ = std::fs::remove_file(path);
            return Err(io_error(path, e));
        }
        Ok(key)
    }

    /// A short, non-reversible identifier: the first 8 bytes, in hex, of HMAC-SHA256(key, "carevault master
    /// key id"). Safe to print; lets operators tell keys apart.
    pub fn fingerprint(&self) -> String {
        let mac = hmac_sha256(&self.0, b"carevault master key id");
        hex(&mac[..8])
    }

    fn cipher(&self) -> Result<Aes256GcmSiv, CryptoError> {
        Aes256GcmSiv::new_from_slice(self.0.as_ref()).map_err(|_| CryptoError::KeyRing("master key length"))
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey").field("fingerprint", &self.fingerprint()).finish()
    }
}

/// The built-in provider: a master key held in process memory (from `keys.master_key_file`).
///
/// Wrapped format: `0x01 || nonce (12 bytes, random) || AES-256-GCM-SIV(master, nonce, key, aad = key_id)`.
#[derive(Debug)]
pub struct LocalKeyProvider {
    key: MasterKey,
}

impl LocalKeyProvider {
    pub fn new(key: MasterKey) -> Self {
        Self { key }
    }
}

impl KeyProvider for LocalKeyProvider {
    fn id(&self) -> String {
        format!("local:{}", self.key.fingerprint())
    }

    fn wrap(&self, key_id: &str, key: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        let sealed = self
            .key
            .cipher()?
            .encrypt(&Nonce::from(nonce), Payload { msg: key, aad: key_id.as_bytes() })
            .map_err(|_| CryptoError::Encrypt)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(WRAP_FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unwrap(&self, key_id: &str, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let Some((&WRAP_FORMAT_V1, rest)) = wrapped.split_first() else {
            return Err(CryptoError::Malformed);
        };
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Malformed);
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Malformed)?;
        self.key
            .cipher()?
            .decrypt(&Nonce::from(nonce), Payload { msg: sealed, aad: key_id.as_bytes() })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Decrypt)
    }
}

/// HMAC-SHA256 under a 32-byte key. HMAC zero-pads keys shorter than the hash block (64 bytes), so padding
/// here yields the same MAC and allows the infallible fixed-size constructor.
pub(crate) fn hmac_sha256(key: &[u8; KEY_LEN], msg: &[u8]) -> [u8; 32] {
    let mut block = Zeroizing::new([0u8; 64]);
    block[..KEY_LEN].copy_from_slice(key);
    let block: &[u8; 64] = &block;
    <Hmac<Sha256> as Mac>::new(block.into()).chain_update(msg).finalize().into_bytes().into()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn file_error(path: &Path, reason: &'static str) -> CryptoError {
    CryptoError::MasterKeyFile { path: path.to_path_buf(), reason }
}

fn io_error(path: &Path, source: std::io::Error) -> CryptoError {
    CryptoError::MasterKeyFileIo { path: path.to_path_buf(), reason: io_reason(&source), source }
}

fn io_reason(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound => "not found",
        std::io::ErrorKind::PermissionDenied => "permission denied",
        std::io::ErrorKind::AlreadyExists => "already exists",
        _ => "cannot be read or written",
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

#[cfg(not(unix))]
fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().write(true).create_new(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_and_rejects_wrong_lengths() {
        let key = MasterKey::generate().unwrap();
        let text = STANDARD.encode(key.0.as_ref());
        let parsed = MasterKey::from_base64(&format!("  {text}\n")).unwrap();
        assert_eq!(parsed.fingerprint(), key.fingerprint());
        assert!(matches!(MasterKey::from_base64(&STANDARD.encode([7u8; 31])), Err(CryptoError::MasterKeyFormat)));
        assert!(matches!(MasterKey::from_base64(&STANDARD.encode([7u8; 33])), Err(CryptoError::MasterKeyFormat)));
        assert!(matches!(MasterKey::from_base64("not base64!"), Err(CryptoError::MasterKeyFormat)));
        assert!(matches!(MasterKey::from_base64(&"A".repeat(200)), Err(CryptoError::MasterKeyFormat)));
    }

    #[test]
    fn fingerprint_is_short_stable_and_distinct() {
        let a = MasterKey::from_base64(&STANDARD.encode([1u8; 32])).unwrap();
        let b = MasterKey::from_base64(&STANDARD.encode([2u8; 32])).unwrap();
        assert_eq!(a.fingerprint().len(), 16);
        assert_eq!(a.fingerprint(), MasterKey::from_base64(&STANDARD.encode([1u8; 32])).unwrap().fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn padded_hmac_matches_the_variable_length_constructor() {
        let key = [0x5au8; 32];
        let reference = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap().chain_update(b"m").finalize();
        assert_eq!(hmac_sha256(&key, b"m").as_slice(), reference.into_bytes().as_slice());
    }

    #[test]
    fn debug_prints_no_key_bytes() {
        let key = MasterKey::from_base64(&STANDARD.encode([0xabu8; 32])).unwrap();
        let mut shown = format!("{key:?}");
        shown.push_str(&format!("{:?}", LocalKeyProvider::new(key)));
        assert!(!shown.contains("abab"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
        assert!(!shown.contains(&STANDARD.encode([0xabu8; 32])), "{shown}");
    }

    #[test]
    fn generated_file_is_private_loadable_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys").join("master.key");
        let key = MasterKey::generate_file(&path).unwrap();
        assert_eq!(MasterKey::load_file(&path).unwrap().fingerprint(), key.fingerprint());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
            assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        }
        let before = std::fs::read(&path).unwrap();
        let err = MasterKey::generate_file(&path).unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn load_errors_name_the_setting_not_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let missing = MasterKey::load_file(&dir.path().join("absent.key")).unwrap_err();
        assert!(missing.to_string().contains("keys.master_key_file"));
        let path = dir.path().join("bad.key");
        std::fs::write(&path, "secret-looking-content\n").unwrap();
        let err = MasterKey::load_file(&path).unwrap_err().to_string();
        assert!(err.contains("keys.master_key_file") && !err.contains("secret-looking"), "{err}");
    }

    #[test]
    fn wrap_binds_the_key_id_and_the_master_key() {
        let provider = LocalKeyProvider::new(MasterKey::generate().unwrap());
        let wrapped = provider.wrap("carevault/data/v1", &[9u8; 32]).unwrap();
        assert_eq!(provider.unwrap("carevault/data/v1", &wrapped).unwrap().as_slice(), &[9u8; 32]);
        assert!(matches!(provider.unwrap("carevault/data/v2", &wrapped), Err(CryptoError::Decrypt)));
        let other = LocalKeyProvider::new(MasterKey::generate().unwrap());
        assert!(matches!(other.unwrap("carevault/data/v1", &wrapped), Err(CryptoError::Decrypt)));
        assert!(matches!(provider.unwrap("carevault/data/v1", &wrapped[..20]), Err(CryptoError::Malformed)));
        assert_ne!(provider.wrap("carevault/data/v1", &[9u8; 32]).unwrap(), wrapped, "fresh nonce per wrap");
    }
}
